/* fuzz_check.h - what the fuzz targets share for checking their properties. */
#ifndef IMDSD_FUZZ_CHECK_H
#define IMDSD_FUZZ_CHECK_H

#include <stdio.h>

/* the checks themselves are not what is fuzzed: no coverage feedback from them (and faster) */
#define NOCOV __attribute__((no_sanitize("coverage")))

/* A property that must hold: names the check that failed, then aborts (libFuzzer saves the input).
 */
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #cond);                             \
            __builtin_trap();                                                                      \
        }                                                                                          \
    } while (0)

#endif

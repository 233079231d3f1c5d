/* unit.h - shared by the table-driven unit tests: one cmocka test per table row, and per-test
 * allocations released by the teardown (also after a failed assertion), so that ASan and
 * valgrind report only the code under test. Each test file is its own executable. */
#ifndef IMDSD_TEST_UNIT_H
#define IMDSD_TEST_UNIT_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"
#include "json.h"

#ifndef MAX_TESTS
#define MAX_TESTS 256
#endif

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- registration of one cmocka test per table row ---------------------------------------- */

static inline int cleanup(void **state);

static struct CMUnitTest tests[MAX_TESTS];
static char names[MAX_TESTS][160];
static size_t ntests;

static inline void add(const char *table, const char *row, CMUnitTestFunction fn, const void *state)
{
    if (ntests >= MAX_TESTS)
        abort();
    snprintf(names[ntests], sizeof names[ntests], "%s: %s", table, row);
    tests[ntests] = (struct CMUnitTest){names[ntests], fn, NULL, cleanup, (void *)state};
    ntests++;
}

#define ADD_ROWS(table, rows, fn)                                                                  \
    for (size_t i_ = 0; i_ < ARRAY_LEN(rows); i_++)                                                \
    add(table, (rows)[i_].name, fn, &(rows)[i_])

/* ---- per-test resources, released by the teardown (also after a failed assertion) ---------- */

#define MAX_DEFERRED 64
static struct {
    void (*fn)(void *);
    void *arg;
} deferred[MAX_DEFERRED];
static int ndeferred;

static inline void *defer(void (*fn)(void *), void *arg)
{
    if (ndeferred >= MAX_DEFERRED)
        abort();
    deferred[ndeferred].fn = fn;
    deferred[ndeferred].arg = arg;
    ndeferred++;
    return arg;
}

static inline int cleanup(void **state)
{
    (void)state;
    while (ndeferred > 0) {
        ndeferred--;
        deferred[ndeferred].fn(deferred[ndeferred].arg);
    }
    return 0;
}

static inline void *tmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        abort();
    return defer(free, p);
}

/* Exact-size heap copy without a NUL: a read past n is caught by ASan and valgrind. */
static inline char *tcopy(const char *s, size_t n)
{
    char *p = tmalloc(n);
    memcpy(p, s, n);
    return p;
}

static inline void buf_release(void *p)
{
    buf_free(p);
    free(p);
}

static inline struct buf *tbuf(size_t max)
{
    struct buf *b = malloc(sizeof *b);
    if (!b)
        abort();
    buf_init(b, max);
    return defer(buf_release, b);
}

static inline void json_release(void *p)
{
    json_obj_free(p);
    free(p);
}

/* Parses an exact-size copy of src; the object is freed by the teardown. */
static inline struct json_obj *tparse(const char *src, size_t len, int *rc)
{
    struct json_obj *o = calloc(1, sizeof *o);
    if (!o)
        abort();
    defer(json_release, o);
    *rc = json_parse_object(o, tcopy(src, len), len);
    return o;
}

#endif

/* log.h - one line per event on stderr: "ts=... level=... event=NAME key=value ...". */
#ifndef IMDSD_LOG_H
#define IMDSD_LOG_H

#include <stddef.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_OFF };

extern enum log_level log_min_level;

/* Writes one line; fmt continues the key=value list after "event=EVENT". Keeps errno. */
void log_msg(enum log_level level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_debug(ev, ...)                                                                         \
    do {                                                                                           \
        if (log_min_level <= LOG_DEBUG)                                                            \
            log_msg(LOG_DEBUG, ev, __VA_ARGS__);                                                   \
    } while (0)
#define log_info(ev, ...)  log_msg(LOG_INFO, ev, __VA_ARGS__)
#define log_warn(ev, ...)  log_msg(LOG_WARN, ev, __VA_ARGS__)
#define log_error(ev, ...) log_msg(LOG_ERROR, ev, __VA_ARGS__)

/* Parses "debug|info|warn|error|off"; returns 0 or -1. */
int log_level_parse(const char *s, enum log_level *out);

/* Copies s into out (size n) as a log-safe value: quotes and escapes when needed, truncates
 * long values with "...". Returns out. Never use it on secrets. */
const char *log_quote(char *out, size_t n, const char *s, size_t len);

#endif

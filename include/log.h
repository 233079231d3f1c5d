/* log.h - one line per event on stderr: "ts=... level=... event=NAME key=value ..." (logfmt), or
 * the same fields as one JSON object per line (--log-format json). */
#ifndef IMDSD_LOG_H
#define IMDSD_LOG_H

#include <stddef.h>
#include <stdint.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_OFF };

extern enum log_level log_min_level;

enum log_format { LOG_FORMAT_LOGFMT, LOG_FORMAT_JSON };
extern enum log_format log_format;
/* Parses "logfmt|json"; returns 0 or -1. */
int log_format_parse(const char *s, enum log_format *out);
/* Pure: the logfmt line (len bytes, no newline) as one JSON object, NUL-terminated, in out (size
 * n >= 64): values in quotes unquoted, integers as numbers, everything else a string. A field
 * that does not fit is dropped and "truncated":true added. Returns its length. */
size_t log_to_json(const char *line, size_t len, char *out, size_t n);

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

/* For an event that a client can cause at will (a refused request, a failed challenge, an evicted
 * connection): counts it in *count and says whether to log it, the first and then one in
 * LOG_SAMPLE_EVERY, so that a flood costs a few lines. The line should carry the count. */
#define LOG_SAMPLE_EVERY 1000
static inline int log_sampled(uint64_t *count)
{
    return (*count)++ % LOG_SAMPLE_EVERY == 0;
}

/* Why imdsd cannot start, after the configuration was read: "imdsd: TEXT" on stderr, or with
 * --log-format json an event=fatal line with error=TEXT. */
void log_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parses "debug|info|warn|error|off"; returns 0 or -1. */
int log_level_parse(const char *s, enum log_level *out);

/* Copies s into out (size n) as a log-safe value: quotes and escapes when needed, truncates
 * long values with "...". Returns out. Never use it on secrets. */
const char *log_quote(char *out, size_t n, const char *s, size_t len);

#endif

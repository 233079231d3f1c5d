#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

enum log_level log_min_level = LOG_INFO;
enum log_format log_format = LOG_FORMAT_LOGFMT;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void log_msg(enum log_level level, const char *event, const char *fmt, ...)
{
    if (level < log_min_level)
        return;
    int saved = errno;
    char line[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s event=%s",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, level_names[level], event);
    if (n > 0 && (size_t)n < sizeof line - 2 && fmt && *fmt) {
        line[n++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
        va_end(ap);
        if (m > 0)
            n += m;
    }
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof line - 2)
        n = (int)sizeof line - 2;
    if (log_format == LOG_FORMAT_JSON) {
        char json[8192];
        size_t m = log_to_json(line, (size_t)n, json, sizeof json - 1);
        json[m++] = '\n';
        fwrite(json, 1, m, stderr);
    } else {
        line[n++] = '\n';
        fwrite(line, 1, (size_t)n, stderr);
    }
    errno = saved;
}

void log_fatal(const char *fmt, ...)
{
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (log_format == LOG_FORMAT_JSON) {
        char q[1100];
        log_msg(LOG_ERROR, "fatal", "error=%s", log_quote(q, sizeof q, text, strlen(text)));
    } else {
        fprintf(stderr, "imdsd: %s\n", text);
    }
}

int log_format_parse(const char *s, enum log_format *out)
{
    if (strcasecmp(s, "logfmt") == 0)
        *out = LOG_FORMAT_LOGFMT;
    else if (strcasecmp(s, "json") == 0)
        *out = LOG_FORMAT_JSON;
    else
        return -1;
    return 0;
}

/* ---- logfmt -> JSON ------------------------------------------------------------------------ */

struct jout {
    char *p;
    size_t n, o;
    int full;
};

static void jput(struct jout *j, const char *s, size_t len)
{
    if (j->full || j->o + len > j->n) {
        j->full = 1;
        return;
    }
    memcpy(j->p + j->o, s, len);
    j->o += len;
}

/* s as the inside of a JSON string: quotes, backslashes and control characters escaped, bytes
 * outside ASCII as \u00XX (log values are ASCII already: log_quote escapes the rest) */
static void jstr(struct jout *j, const char *s, size_t len)
{
    for (size_t i = 0; i < len && !j->full; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            jput(j, esc, 2);
        } else if (c < 0x20 || c >= 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            jput(j, esc, 6);
        } else {
            jput(j, (const char *)&c, 1);
        }
    }
}

/* a bare value that JSON can carry as a number: -?(0|[1-9][0-9]*), at most 15 digits */
static int is_int(const char *s, size_t len)
{
    size_t i = len && s[0] == '-';
    if (i == len || len - i > 15 || (s[i] == '0' && len - i > 1))
        return 0;
    for (; i < len; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

size_t log_to_json(const char *line, size_t len, char *out, size_t n)
{
    static const char cut_mark[] = ",\"truncated\":true";
    struct jout j = {out, n - sizeof cut_mark - 2, 0, 0}; /* room kept for the mark and '}' */
    size_t i = 0;
    int first = 1;
    jput(&j, "{", 1);
    while (i < len && !j.full) {
        while (i < len && line[i] == ' ')
            i++;
        size_t k0 = i;
        while (i < len && line[i] != '=' && line[i] != ' ')
            i++;
        size_t klen = i - k0;
        if (klen == 0 || i >= len || line[i] != '=') {
            i++; /* not key=value: skipped */
            continue;
        }
        i++; /* '=' */
        const char *v = line + i;
        size_t vlen;
        int quoted = i < len && line[i] == '"';
        char buf[2048];
        if (quoted) { /* logfmt's quoting undone: \" and \\ (\xNN stays as text) */
            vlen = 0;
            for (i++; i < len && line[i] != '"'; i++) {
                if (line[i] == '\\' && i + 1 < len && (line[i + 1] == '"' || line[i + 1] == '\\'))
                    i++;
                if (vlen < sizeof buf)
                    buf[vlen++] = line[i];
            }
            i++; /* the closing quote (or the end of a cut line) */
            v = buf;
        } else {
            while (i < len && line[i] != ' ')
                i++;
            vlen = (size_t)(line + i - v);
        }
        size_t mark = j.o;
        if (!first)
            jput(&j, ",", 1);
        jput(&j, "\"", 1);
        jstr(&j, line + k0, klen);
        jput(&j, "\":", 2);
        if (!quoted && is_int(v, vlen)) {
            jput(&j, v, vlen);
        } else {
            jput(&j, "\"", 1);
            jstr(&j, v, vlen);
            jput(&j, "\"", 1);
        }
        if (j.full)
            j.o = mark; /* the whole field goes */
        first = 0;
    }
    int cut = j.full;
    j.full = 0;
    j.n = n - 1;
    if (cut)
        jput(&j, cut_mark + (j.o == 1), sizeof cut_mark - 1 - (j.o == 1));
    jput(&j, "}", 1);
    out[j.o] = 0;
    return j.o;
}

int log_level_parse(const char *s, enum log_level *out)
{
    for (size_t i = 0; i < sizeof level_names / sizeof level_names[0]; i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

const char *log_quote(char *out, size_t n, const char *s, size_t len)
{
    size_t o = 0;
    int quote = len == 0;
    for (size_t i = 0; i < len && !quote; i++)
        quote = s[i] <= ' ' || s[i] == '"' || s[i] == '=' || s[i] == '\\' ||
                (unsigned char)s[i] >= 0x7f;
    if (n < 8) {
        if (n)
            out[0] = 0;
        return out;
    }
    if (quote)
        out[o++] = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (o + 8 >= n) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < ' ' || c >= 0x7f) {
            o += (size_t)snprintf(out + o, n - o, "\\x%02x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    if (quote)
        out[o++] = '"';
    out[o] = 0;
    return out;
}

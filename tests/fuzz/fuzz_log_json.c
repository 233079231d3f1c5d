/* libFuzzer: the logfmt quoting and --log-format json on arbitrary bytes. Whatever a log line
 * holds (a raw, cut or hostile line, or a value from outside passed through log_quote), log_to_json
 * writes one flat JSON object of printable ASCII that json_parse_object reads, and a quoted value
 * never forges another field. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A strict check of the one shape log_to_json writes: a flat object whose values are strings or
 * integers (independent of json.c, whose reader caps the token count below what a long line has).
 */
static const char *string_end(const char *p, const char *end)
{
    if (p >= end || *p++ != '"')
        return NULL;
    while (p < end && *p != '"') {
        if (*p == '\\') {
            if (++p >= end)
                return NULL;
            if (*p == 'u') {
                for (int i = 1; i <= 4; i++)
                    if (p + i >= end || !strchr("0123456789abcdefABCDEF", p[i]) || !p[i])
                        return NULL;
                p += 4;
            } else if (!strchr("\"\\/bfnrt", *p) || !*p) {
                return NULL;
            }
        } else if ((unsigned char)*p < 0x20) {
            return NULL;
        }
        p++;
    }
    return p < end ? p + 1 : NULL;
}

static const char *int_end(const char *p, const char *end)
{
    if (p < end && *p == '-')
        p++;
    if (p >= end || *p < '0' || *p > '9')
        return NULL;
    if (*p == '0')
        return p + 1;
    while (p < end && *p >= '0' && *p <= '9')
        p++;
    return p;
}

static void check(const char *out, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (out[i] < 0x20 || out[i] >= 0x7f)
            __builtin_trap();
    const char *p = out, *end = out + len;
    if (p >= end || *p++ != '{')
        __builtin_trap();
    if (p < end && *p == '}' && p + 1 == end)
        return;
    for (;;) {
        if (!(p = string_end(p, end)) || p >= end || *p++ != ':')
            __builtin_trap();
        const char *v = p < end && *p == '"'                        ? string_end(p, end)
                        : end - p >= 4 && memcmp(p, "true", 4) == 0 ? p + 4 /* truncated */
                                                                    : int_end(p, end);
        if (!v || v >= end)
            __builtin_trap();
        p = v;
        if (*p == '}' && p + 1 == end)
            return;
        if (*p++ != ',')
            __builtin_trap();
    }
}

/* log_quote's output is one logfmt value: bare (printable, no blank, quote, '=' or backslash) or
 * quoted with \" \\ and \xHH escapes; it decodes to the input, or to a prefix of it and "...". */
static void check_logfmt_value(const char *q, const uint8_t *in, size_t inlen)
{
    static char dec[8192];
    size_t n = strlen(q), d = 0;
    for (size_t i = 0; i < n; i++)
        if (q[i] < (q[0] == '"' ? 0x20 : 0x21) || q[i] >= 0x7f)
            __builtin_trap(); /* a blank only inside quotes */
    if (n && q[0] == '"') {
        if (n < 2 || q[n - 1] != '"')
            __builtin_trap();
        for (size_t i = 1; i < n - 1; i++) {
            if (q[i] == '"')
                __builtin_trap(); /* would end the value early */
            if (q[i] != '\\') {
                dec[d++] = q[i];
                continue;
            }
            if (q[i + 1] == '"' || q[i + 1] == '\\') {
                dec[d++] = q[++i];
            } else if (q[i + 1] == 'x' && i + 3 < n - 1) {
                char hex[3] = {q[i + 2], q[i + 3], 0};
                dec[d++] = (char)strtoul(hex, NULL, 16);
                i += 3;
            } else {
                __builtin_trap();
            }
        }
    } else {
        if (!n || strpbrk(q, "\"=\\"))
            __builtin_trap(); /* an empty value must be quoted; these need quotes */
        memcpy(dec, q, n);
        d = n;
    }
    if (d == inlen && memcmp(dec, in, d) == 0)
        return;
    if (d < 3 || memcmp(dec + d - 3, "...", 3) != 0 || d - 3 > inlen || memcmp(dec, in, d - 3) != 0)
        __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char out[16384], q[8192], line[9000];
    /* the bytes as a whole line, in a buffer that is large, then one that is small */
    size_t len = log_to_json((const char *)data, size, out, sizeof out);
    check(out, len);
    len = log_to_json((const char *)data, size, out, 80);
    check(out, len);
    /* the bytes as one value, quoted the way every log call quotes values from outside */
    log_quote(q, sizeof q, (const char *)data, size);
    check_logfmt_value(q, data, size);
    int n = snprintf(line, sizeof line, "ts=T level=info event=e v=%s after=7", q);
    len = log_to_json(line, (size_t)n, out, sizeof out);
    check(out, len);
    struct json_obj o;
    char *ev = NULL;
    int64_t after = 0;
    if (json_parse_object(&o, out, len) != 0 || json_get_string(&o, "event", &ev) != 0 ||
        strcmp(ev, "e") != 0 || json_get_int(&o, "after", &after) != 0 || after != 7)
        __builtin_trap();
    free(ev);
    json_obj_free(&o);
    return 0;
}

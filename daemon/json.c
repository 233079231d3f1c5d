#include "json.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define JSMN_STATIC
#define JSMN_STRICT
#define JSMN_PARENT_LINKS
#include <jsmn.h>

#include "util.h"

/* A strict RFC 8259 syntax check. jsmn tokenises but accepts some malformed input (a key
 * without a value, trailing commas, bare words), which would pair keys with the wrong values. */
#define JSON_MAX_DEPTH 32

struct scan {
    const char *s;
    size_t n, i;
};

static void ws(struct scan *c)
{
    while (c->i < c->n &&
           (c->s[c->i] == ' ' || c->s[c->i] == '\t' || c->s[c->i] == '\n' || c->s[c->i] == '\r'))
        c->i++;
}

static int lit(struct scan *c, const char *w)
{
    size_t k = strlen(w);
    if (c->n - c->i < k || memcmp(c->s + c->i, w, k) != 0)
        return -1;
    c->i += k;
    return 0;
}

static int digits(struct scan *c)
{
    size_t start = c->i;
    while (c->i < c->n && c->s[c->i] >= '0' && c->s[c->i] <= '9')
        c->i++;
    return c->i > start ? 0 : -1;
}

static int number(struct scan *c)
{
    if (c->i < c->n && c->s[c->i] == '-')
        c->i++;
    if (c->i < c->n && c->s[c->i] == '0')
        c->i++;
    else if (digits(c) < 0)
        return -1;
    if (c->i < c->n && c->s[c->i] == '.') {
        c->i++;
        if (digits(c) < 0)
            return -1;
    }
    if (c->i < c->n && (c->s[c->i] == 'e' || c->s[c->i] == 'E')) {
        c->i++;
        if (c->i < c->n && (c->s[c->i] == '+' || c->s[c->i] == '-'))
            c->i++;
        if (digits(c) < 0)
            return -1;
    }
    return 0;
}

static int string(struct scan *c)
{
    if (c->i >= c->n || c->s[c->i] != '"')
        return -1;
    for (c->i++; c->i < c->n; c->i++) {
        unsigned char ch = (unsigned char)c->s[c->i];
        if (ch == '"') {
            c->i++;
            return 0;
        }
        if (ch < 0x20)
            return -1;
        if (ch == '\\') {
            if (++c->i >= c->n || !strchr("\"\\/bfnrtu", c->s[c->i]))
                return -1;
        }
    }
    return -1;
}

static int value(struct scan *c, int depth);

static int members(struct scan *c, int depth, char close, int keyed)
{
    c->i++; /* the opening bracket */
    ws(c);
    if (c->i < c->n && c->s[c->i] == close) {
        c->i++;
        return 0;
    }
    for (;;) {
        if (keyed) {
            if (string(c) < 0)
                return -1;
            ws(c);
            if (c->i >= c->n || c->s[c->i] != ':')
                return -1;
            c->i++;
        }
        if (value(c, depth + 1) < 0)
            return -1;
        ws(c);
        if (c->i >= c->n)
            return -1;
        if (c->s[c->i] == close) {
            c->i++;
            return 0;
        }
        if (c->s[c->i] != ',')
            return -1;
        c->i++;
        ws(c);
    }
}

static int value(struct scan *c, int depth)
{
    ws(c);
    if (c->i >= c->n || depth > JSON_MAX_DEPTH)
        return -1;
    switch (c->s[c->i]) {
    case '{':
        return members(c, depth, '}', 1);
    case '[':
        return members(c, depth, ']', 0);
    case '"':
        return string(c);
    case 't':
        return lit(c, "true");
    case 'f':
        return lit(c, "false");
    case 'n':
        return lit(c, "null");
    default:
        return number(c);
    }
}

static int valid_object(const char *s, size_t n)
{
    struct scan c = {s, n, 0};
    ws(&c);
    if (c.i >= n || s[c.i] != '{' || value(&c, 0) < 0)
        return 0;
    ws(&c);
    return c.i == n;
}

int json_parse_object(struct json_obj *o, const char *src, size_t len)
{
    o->tok = NULL;
    o->ntok = 0;
    if (!valid_object(src, len))
        return -1;

    jsmn_parser p;
    jsmntok_t *t = xmalloc(sizeof(jsmntok_t) * JSON_MAX_TOKENS);
    jsmn_init(&p);
    int n = jsmn_parse(&p, src, len, t, JSON_MAX_TOKENS);
    /* jsmn accepts trailing garbage after a complete value; refuse it (only whitespace allowed). */
    if (n < 1 || t[0].type != JSMN_OBJECT || p.toksuper != -1)
        goto fail;
    for (size_t i = (size_t)t[0].end; i < len; i++)
        if (src[i] != ' ' && src[i] != '\t' && src[i] != '\r' && src[i] != '\n')
            goto fail;
    o->src = src;
    o->ntok = n;
    o->tok = t;
    return 0;
fail:
    free(t);
    o->tok = NULL;
    o->ntok = 0;
    return -1;
}

void json_obj_free(struct json_obj *o)
{
    free(o->tok);
    o->tok = NULL;
    o->ntok = 0;
}

/* Index of the value token of top-level key, or -1. */
static int find(const struct json_obj *o, const char *key)
{
    const jsmntok_t *t = o->tok;
    size_t klen = strlen(key);
    for (int i = 1; i < o->ntok; i++) {
        if (t[i].parent != 0 || t[i].type != JSMN_STRING)
            continue;
        /* keys are the direct children of the root; a key token's value follows it */
        if ((size_t)(t[i].end - t[i].start) == klen &&
            memcmp(o->src + t[i].start, key, klen) == 0 && i + 1 < o->ntok)
            return i + 1;
    }
    return -1;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int put_utf8(char *out, size_t *o, unsigned cp)
{
    if (cp == 0)
        return -1; /* refuse embedded NUL */
    if (cp < 0x80) {
        out[(*o)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*o)++] = (char)(0xc0 | (cp >> 6));
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        out[(*o)++] = (char)(0xe0 | (cp >> 12));
        out[(*o)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    } else {
        out[(*o)++] = (char)(0xf0 | (cp >> 18));
        out[(*o)++] = (char)(0x80 | ((cp >> 12) & 0x3f));
        out[(*o)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    }
    return 0;
}

static int read_u4(const char *s, unsigned *cp)
{
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(s[k]);
        if (h < 0)
            return -1;
        v = v * 16 + (unsigned)h;
    }
    *cp = v;
    return 0;
}

/* Decodes the JSON string body s[0..n) (no quotes) into a new NUL-terminated string. */
static int unescape(const char *s, size_t n, char **out)
{
    char *r = xmalloc(n + 1); /* unescaped UTF-8 is never longer than its escaped form */
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\') {
            r[o++] = s[i];
            continue;
        }
        if (++i >= n)
            goto fail;
        switch (s[i]) {
        case '"':
            r[o++] = '"';
            break;
        case '\\':
            r[o++] = '\\';
            break;
        case '/':
            r[o++] = '/';
            break;
        case 'b':
            r[o++] = '\b';
            break;
        case 'f':
            r[o++] = '\f';
            break;
        case 'n':
            r[o++] = '\n';
            break;
        case 'r':
            r[o++] = '\r';
            break;
        case 't':
            r[o++] = '\t';
            break;
        case 'u': {
            unsigned cp, lo;
            if (n - i < 5 || read_u4(s + i + 1, &cp) < 0)
                goto fail;
            i += 4;
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (n - i < 7 || s[i + 1] != '\\' || s[i + 2] != 'u' ||
                    read_u4(s + i + 3, &lo) < 0 || lo < 0xdc00 || lo >= 0xe000)
                    goto fail;
                i += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp < 0xe000) {
                goto fail;
            }
            if (put_utf8(r, &o, cp) < 0)
                goto fail;
            break;
        }
        default:
            goto fail;
        }
    }
    r[o] = 0;
    *out = r;
    return 0;
fail:
    secret_zero(r, n + 1);
    free(r);
    return -1;
}

int json_get_string(const struct json_obj *o, const char *key, char **out)
{
    int i = find(o, key);
    if (i < 0)
        return -1;
    const jsmntok_t *t = (const jsmntok_t *)o->tok + i;
    if (t->type != JSMN_STRING)
        return -2;
    return unescape(o->src + t->start, (size_t)(t->end - t->start), out) < 0 ? -2 : 0;
}

static int parse_int(const char *s, size_t n, int64_t *out)
{
    char tmp[24];
    if (n == 0 || n >= sizeof tmp)
        return -1;
    memcpy(tmp, s, n);
    tmp[n] = 0;
    char *end;
    errno = 0;
    long long v = strtoll(tmp, &end, 10);
    if (errno || *end || tmp[0] == '+' || tmp[0] == ' ')
        return -1;
    *out = v;
    return 0;
}

int json_get_int(const struct json_obj *o, const char *key, int64_t *out)
{
    int i = find(o, key);
    if (i < 0)
        return -1;
    const jsmntok_t *t = (const jsmntok_t *)o->tok + i;
    if (t->type != JSMN_PRIMITIVE && t->type != JSMN_STRING)
        return -2;
    return parse_int(o->src + t->start, (size_t)(t->end - t->start), out) < 0 ? -2 : 0;
}

int json_get_first_int(const struct json_obj *o, const char *key, int64_t *out)
{
    int i = find(o, key);
    if (i < 0)
        return -1;
    const jsmntok_t *t = (const jsmntok_t *)o->tok + i;
    if (t->type != JSMN_ARRAY || t->size < 1 || i + 1 >= o->ntok)
        return -2;
    t++;
    if (t->type != JSMN_PRIMITIVE)
        return -2;
    return parse_int(o->src + t->start, (size_t)(t->end - t->start), out) < 0 ? -2 : 0;
}

int json_get_first_string(const struct json_obj *o, const char *key, char **out)
{
    int i = find(o, key);
    if (i < 0)
        return -1;
    const jsmntok_t *t = (const jsmntok_t *)o->tok + i;
    if (t->type != JSMN_ARRAY || t->size < 1 || i + 1 >= o->ntok || t[1].type != JSMN_STRING)
        return -2;
    t++;
    return unescape(o->src + t->start, (size_t)(t->end - t->start), out) < 0 ? -2 : 0;
}

int json_put_string(struct buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    if (buf_append(b, "\"", 1) < 0)
        return -1;
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c != 0x7f)
            continue;
        if (buf_append(b, s + run, i - run) < 0)
            return -1;
        char esc[7] = {'\\', 0};
        size_t n = 2;
        switch (c) {
        case '"':
            esc[1] = '"';
            break;
        case '\\':
            esc[1] = '\\';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            n = 6;
        }
        if (buf_append(b, esc, n) < 0)
            return -1;
        run = i + 1;
    }
    if (buf_append(b, s + run, len - run) < 0)
        return -1;
    return buf_append(b, "\"", 1);
}

#include "form.h"

#include <string.h>

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Decodes s[0..n) into out (at most cap bytes). Returns the decoded length, -1 for bad
 * encoding (a bad %XX, %00, or a raw control character) or -2 when over cap. */
static long decode(char *out, size_t cap, const char *s, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f)
            return -1;
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            int hi, lo;
            if (n - i < 3 || (hi = hexval((unsigned char)s[i + 1])) < 0 ||
                (lo = hexval((unsigned char)s[i + 2])) < 0)
                return -1;
            c = (unsigned char)(hi << 4 | lo);
            if (c == 0)
                return -1;
            i += 2;
        }
        if (o >= cap)
            return -2;
        out[o++] = (char)c;
    }
    return (long)o;
}

static int decode_err(long rc)
{
    return rc == -2 ? QUERY_E_TOO_MANY : QUERY_E_ENCODING;
}

int query_parse(struct query *q, const char *s, size_t len)
{
    size_t used = 0, decoded = 0;
    q->n = 0;
    size_t i = 0;
    while (i <= len) {
        size_t end = i;
        while (end < len && s[end] != '&')
            end++;
        if (end > i) {
            const char *eq = memchr(s + i, '=', end - i);
            size_t klen = eq ? (size_t)(eq - (s + i)) : end - i;
            size_t vlen = eq ? end - i - klen - 1 : 0;
            if (q->n >= QUERY_MAX_PARAMS)
                return QUERY_E_TOO_MANY;
            /* room for the decoded key and value plus their NULs, within QUERY_MAX_BYTES */
            size_t room = QUERY_MAX_BYTES - decoded;
            char *k = q->storage + used;
            long kn = decode(k, room, s + i, klen);
            if (kn < 0)
                return decode_err(kn);
            k[kn] = 0;
            char *v = k + kn + 1;
            long vn = eq ? decode(v, room - (size_t)kn, eq + 1, vlen) : 0;
            if (vn < 0)
                return decode_err(vn);
            v[vn] = 0;
            used += (size_t)kn + (size_t)vn + 2;
            decoded += (size_t)kn + (size_t)vn;
            if (query_get(q, k))
                return QUERY_E_DUPLICATE;
            q->p[q->n].key = k;
            q->p[q->n].val = v;
            q->p[q->n].val_len = (size_t)vn;
            q->n++;
        }
        i = end + 1;
    }
    return QUERY_OK;
}

const struct query_param *query_get(const struct query *q, const char *key)
{
    for (int i = 0; i < q->n; i++)
        if (strcmp(q->p[i].key, key) == 0)
            return &q->p[i];
    return NULL;
}

int form_encode(struct buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            if (buf_append(b, s + i, 1) < 0)
                return -1;
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            if (buf_append(b, e, 3) < 0)
                return -1;
        }
    }
    return 0;
}

int form_add(struct buf *b, const char *key, const char *val, size_t val_len)
{
    if (b->len && buf_append(b, "&", 1) < 0)
        return -1;
    if (form_encode(b, key, strlen(key)) < 0 || buf_append(b, "=", 1) < 0)
        return -1;
    return form_encode(b, val, val_len);
}

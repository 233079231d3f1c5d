/* libFuzzer: the JSON writers (json_put_string) and the IMDS bodies imds.c renders with them.
 *
 *  - json_put_string on any bytes writes one JSON string, strictly well-formed (no raw control
 *    byte or DEL, only the escapes JSON has), that decodes to exactly those bytes (NUL included:
 *    bytes from 0x80 are passed through), pure ASCII for ASCII input and valid UTF-8 for valid
 *    UTF-8 input; with a buffer too small it fails, never overruns max, and leaves a prefix of what
 *    it would have written;
 *  - imds_render_token, _appservice_token, _msi2017_token, _error and _appservice_error write one
 *    strict JSON object with exactly the members each promises, in order and once each, every value
 *    decoding to what was given (access token, client id, resource, error, description), the times
 *    as decimal strings (expires_in counting down from now, never below 0, ext_expires_in never
 *    below it; the 2017 date as "MM/DD/YYYY HH:MM:SS +00:00"), statusCode a number; valid UTF-8
 *    when what was given is;
 *  - imds_error_from_entra maps any Entra result to a 400, 429 (with a Retry-After) or 503.
 *
 * Input: byte 0 is flags, bytes 1..12 three 32-bit numbers for the times, then the access token,
 * the client id, the resource, the error and its description, NUL-separated. json_put_string
 * also gets the rest whole, NULs included. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "buf.h"
#include "entra_msg.h"
#include "imds.h"
#include "json.h"
#include "token.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_MEMBERS 8

/* ---- a strict RFC 8259 reader, independent of json.c ------------------------------------- */

struct rd {
    const char *p, *end;
};

NOCOV static void ws(struct rd *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

NOCOV static int hex4(const char *p, unsigned *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        unsigned d = c >= '0' && c <= '9'   ? (unsigned)(c - '0')
                     : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                     : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10)
                                            : 16;
        if (d > 15)
            return -1;
        *v = *v * 16 + d;
    }
    return 0;
}

NOCOV static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* A string at r->p, decoded into out (room for as many bytes as the string has) when not NULL.
 * Bytes from 0x80 are taken as they are; a lone surrogate escape is refused. */
NOCOV static int rd_string(struct rd *r, char *out, size_t *olen)
{
    size_t o = 0;
    if (r->p >= r->end || *r->p != '"')
        return -1;
    for (r->p++; r->p < r->end; r->p++) {
        unsigned char c = (unsigned char)*r->p;
        if (c == '"') {
            r->p++;
            if (olen)
                *olen = o;
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c != '\\') {
            if (out)
                out[o] = (char)c;
            o++;
            continue;
        }
        if (++r->p >= r->end)
            return -1;
        const char *esc = strchr("\"\\/bfnrt", *r->p);
        if (*r->p && esc) {
            if (out)
                out[o] = "\"\\/\b\f\n\r\t"[esc - "\"\\/bfnrt"];
            o++;
            continue;
        }
        unsigned cp, lo;
        if (*r->p != 'u' || r->end - r->p < 5 || hex4(r->p + 1, &cp) < 0)
            return -1;
        r->p += 4;
        if (cp >= 0xdc00 && cp < 0xe000)
            return -1;
        if (cp >= 0xd800 && cp < 0xdc00) {
            if (r->end - r->p < 7 || r->p[1] != '\\' || r->p[2] != 'u' || hex4(r->p + 3, &lo) < 0 ||
                lo < 0xdc00 || lo >= 0xe000)
                return -1;
            r->p += 6;
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        }
        char tmp[4];
        size_t k = put_utf8(tmp, cp);
        if (out)
            memcpy(out + o, tmp, k);
        o += k;
    }
    return -1;
}

NOCOV static int rd_number(struct rd *r)
{
    const char *s = r->p;
    if (r->p < r->end && *r->p == '-')
        r->p++;
    if (r->p < r->end && *r->p == '0') {
        r->p++;
    } else {
        const char *d = r->p;
        while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
            r->p++;
        if (r->p == d || *d == '0')
            return -1;
    }
    if (r->p < r->end && *r->p == '.') {
        const char *d = ++r->p;
        while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
            r->p++;
        if (r->p == d)
            return -1;
    }
    if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
        r->p++;
        if (r->p < r->end && (*r->p == '+' || *r->p == '-'))
            r->p++;
        const char *d = r->p;
        while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
            r->p++;
        if (r->p == d)
            return -1;
    }
    return r->p > s ? 0 : -1;
}

struct member {
    char *key, *val; /* decoded, malloc'd; val is the number's text for a number */
    size_t klen, vlen;
    int is_string;
};

struct object {
    struct member m[MAX_MEMBERS];
    int n;
};

NOCOV static void object_free(struct object *o)
{
    for (int i = 0; i < o->n; i++) {
        free(o->m[i].key);
        free(o->m[i].val);
    }
    o->n = 0;
}

/* The whole of [s, s + n) as one flat object of string and number members; 0 or -1. */
NOCOV static int rd_object(const char *s, size_t n, struct object *o)
{
    struct rd r = {s, s + n};
    o->n = 0;
    ws(&r);
    if (r.p >= r.end || *r.p++ != '{')
        return -1;
    ws(&r);
    if (r.p < r.end && *r.p == '}') {
        r.p++;
    } else {
        for (;;) {
            if (o->n >= MAX_MEMBERS)
                return -1;
            struct member *m = &o->m[o->n];
            struct rd save = r;
            if (rd_string(&r, NULL, NULL) < 0)
                return -1;
            m->key = malloc((size_t)(r.p - save.p) + 1);
            m->val = NULL;
            o->n++;
            r = save;
            rd_string(&r, m->key, &m->klen);
            ws(&r);
            if (r.p >= r.end || *r.p++ != ':')
                return -1;
            ws(&r);
            save = r;
            m->is_string = r.p < r.end && *r.p == '"';
            if (m->is_string) {
                if (rd_string(&r, NULL, NULL) < 0)
                    return -1;
                m->val = malloc((size_t)(r.p - save.p) + 1);
                r = save;
                rd_string(&r, m->val, &m->vlen);
            } else {
                if (rd_number(&r) < 0)
                    return -1;
                m->vlen = (size_t)(r.p - save.p);
                m->val = malloc(m->vlen + 1);
                memcpy(m->val, save.p, m->vlen);
            }
            ws(&r);
            if (r.p >= r.end)
                return -1;
            if (*r.p == '}') {
                r.p++;
                break;
            }
            if (*r.p++ != ',')
                return -1;
            ws(&r);
        }
    }
    ws(&r);
    return r.p == r.end ? 0 : -1;
}

NOCOV static int utf8_valid(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t k = c < 0x80             ? 1
                   : (c & 0xe0) == 0xc0 ? 2
                   : (c & 0xf0) == 0xe0 ? 3
                   : (c & 0xf8) == 0xf0 ? 4
                                        : 0;
        if (!k || i + k > n)
            return 0;
        unsigned cp = k == 1 ? c : k == 2 ? c & 0x1f : k == 3 ? c & 0x0f : c & 0x07;
        for (size_t j = 1; j < k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        static const unsigned min[] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min[k] || cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000))
            return 0;
        i += k;
    }
    return 1;
}

/* ---- json_put_string ---------------------------------------------------------------------- */

static void check_put_string(const char *s, size_t n, size_t small)
{
    struct buf b;
    buf_init(&b, 8 * n + 16);
    CHECK(json_put_string(&b, s, n) == 0);
    CHECK(b.len >= 2 && b.len <= 2 + 6 * n && b.data[b.len] == 0);
    for (size_t i = 0; i < b.len; i++)
        CHECK((unsigned char)b.data[i] >= 0x20 && (unsigned char)b.data[i] != 0x7f);
    /* one strict string, exactly the bytes given */
    char *dec = malloc(b.len + 1);
    size_t dn = 0;
    struct rd r = {b.data, b.data + b.len};
    CHECK(rd_string(&r, dec, &dn) == 0 && r.p == r.end);
    CHECK(dn == n && memcmp(dec, s, n) == 0);
    free(dec);
    int ascii = 1;
    for (size_t i = 0; i < n; i++)
        ascii &= (unsigned char)s[i] < 0x80;
    for (size_t i = 0; ascii && i < b.len; i++)
        CHECK((unsigned char)b.data[i] < 0x80);
    if (utf8_valid((const unsigned char *)s, n))
        CHECK(utf8_valid((const unsigned char *)b.data, b.len));
    /* json.c's reader agrees (it refuses an encoded NUL) */
    if (!memchr(s, 0, n)) {
        struct buf w;
        struct json_obj o;
        char *back = NULL;
        buf_init(&w, b.len + 16);
        CHECK(buf_puts(&w, "{\"v\":") == 0 && buf_append(&w, b.data, b.len) == 0 &&
              buf_puts(&w, "}") == 0);
        CHECK(json_parse_object(&o, w.data, w.len) == 0);
        CHECK(json_get_string(&o, "v", &back) == 0 && strlen(back) == n && !memcmp(back, s, n));
        free(back);
        json_obj_free(&o);
        buf_free(&w);
    }
    /* a buffer too small: -1, within max, a prefix of the whole */
    struct buf t;
    buf_init(&t, small);
    int rc = json_put_string(&t, s, n);
    CHECK(rc == (b.len <= small ? 0 : -1));
    CHECK(t.len <= small);
    CHECK(t.len == 0 || memcmp(t.data, b.data, t.len) == 0);
    CHECK(rc < 0 || t.len == b.len);
    buf_free(&t);
    buf_free(&b);
}

/* ---- the IMDS bodies ---------------------------------------------------------------------- */

NOCOV static const struct member *get(const struct object *o, int i, const char *key)
{
    CHECK(i < o->n && o->m[i].klen == strlen(key) && memcmp(o->m[i].key, key, o->m[i].klen) == 0);
    return &o->m[i];
}

NOCOV static void expect_str(const struct object *o, int i, const char *key, const char *v,
                             size_t n)
{
    const struct member *m = get(o, i, key);
    CHECK(m->is_string && m->vlen == n && memcmp(m->val, v, n) == 0);
}

NOCOV static void expect_num(const struct object *o, int i, const char *key, int64_t v, int quoted)
{
    char want[32];
    int n = snprintf(want, sizeof want, "%lld", (long long)v);
    const struct member *m = get(o, i, key);
    CHECK(m->is_string == quoted && m->vlen == (size_t)n && memcmp(m->val, want, (size_t)n) == 0);
}

/* Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm), not gmtime. */
NOCOV static void civil(int64_t t, int *y, int *mo, int *d, int *h, int *mi, int *s)
{
    int64_t days = t >= 0 ? t / 86400 : -((-t + 86399) / 86400), rem = t - days * 86400;
    *h = (int)(rem / 3600);
    *mi = (int)(rem / 60 % 60);
    *s = (int)(rem % 60);
    int64_t z = days + 719468, era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097, yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *mo = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = (int)(yoe + era * 400 + (*mo <= 2));
}

static void parse_body(const struct buf *b, struct object *o, int utf8_in, int json_c)
{
    CHECK(b->data && b->data[b->len] == 0 && strlen(b->data) == b->len);
    CHECK(rd_object(b->data, b->len, o) == 0);
    if (utf8_in)
        CHECK(utf8_valid((const unsigned char *)b->data, b->len));
    if (json_c) { /* json.c's reader takes it too */
        struct json_obj jo;
        CHECK(json_parse_object(&jo, b->data, b->len) == 0);
        json_obj_free(&jo);
    }
}

static void check_bodies(unsigned flags, const char *tokb, size_t tokn, const char *cid,
                         const char *res, size_t resn, const char *error, const char *desc,
                         int64_t now, int64_t d1, int64_t d2, int utf8_in)
{
    struct token tok = {.access_token = (char *)tokb,
                        .len = tokn,
                        .expires_on = now + d1,
                        .ext_expires_on = now + d1 + d2,
                        .not_before = now - (d2 & 0xffff)};
    struct buf b;
    struct object o;
    size_t cn = strlen(cid);
    buf_init(&b, 1 << 20);

    CHECK(imds_render_token(&b, &tok, cid, res, resn, now) == 0);
    parse_body(&b, &o, utf8_in, 1);
    int64_t in = tok.expires_on - now < 0 ? 0 : tok.expires_on - now;
    int64_t ext = tok.ext_expires_on - now < in ? in : tok.ext_expires_on - now;
    CHECK(o.n == 8);
    expect_str(&o, 0, "access_token", tokb, tokn);
    expect_str(&o, 1, "client_id", cid, cn);
    expect_num(&o, 2, "expires_in", in, 1);
    expect_num(&o, 3, "expires_on", tok.expires_on, 1);
    expect_num(&o, 4, "ext_expires_in", ext, 1);
    expect_num(&o, 5, "not_before", tok.not_before, 1);
    expect_str(&o, 6, "resource", res, resn);
    expect_str(&o, 7, "token_type", "Bearer", 6);
    object_free(&o);

    buf_reset(&b);
    CHECK(imds_render_appservice_token(&b, &tok, cid, res, resn) == 0);
    parse_body(&b, &o, utf8_in, 0);
    CHECK(o.n == 6);
    expect_str(&o, 0, "access_token", tokb, tokn);
    expect_str(&o, 1, "client_id", cid, cn);
    expect_num(&o, 2, "expires_on", tok.expires_on, 1);
    expect_num(&o, 3, "not_before", tok.not_before, 1);
    expect_str(&o, 4, "resource", res, resn);
    expect_str(&o, 5, "token_type", "Bearer", 6);
    object_free(&o);

    buf_reset(&b);
    int epoch = flags & 1;
    CHECK(imds_render_msi2017_token(&b, &tok, cid, res, resn, epoch) == 0);
    parse_body(&b, &o, utf8_in, 0);
    CHECK(o.n == 5);
    expect_str(&o, 0, "access_token", tokb, tokn);
    expect_str(&o, 1, "client_id", cid, cn);
    if (epoch) {
        expect_num(&o, 2, "expires_on", tok.expires_on, 1);
    } else {
        int y, mo, d, h, mi, s;
        char want[64];
        civil(tok.expires_on, &y, &mo, &d, &h, &mi, &s);
        int n =
            snprintf(want, sizeof want, "%02d/%02d/%04d %02d:%02d:%02d +00:00", mo, d, y, h, mi, s);
        expect_str(&o, 2, "expires_on", want, (size_t)n);
    }
    expect_str(&o, 3, "resource", res, resn);
    expect_str(&o, 4, "token_type", "Bearer", 6);
    object_free(&o);

    /* errors: as given, or as mapped from an Entra result */
    struct imds_error e = {400 + (int)(flags >> 1) % 200, error, desc, 0};
    struct entra_result er;
    memset(&er, 0, sizeof er);
    if (flags & 0x80) {
        er.kind = (enum entra_kind)((flags >> 1) & 3);
        er.aadsts = (flags & 8) ? 700024 : 0;
        er.retry_after = (int)(d2 & 0xff) - 16;
        snprintf(er.error, sizeof er.error, "%s", error);
        snprintf(er.description, sizeof er.description, "%s", desc);
        imds_error_from_entra(&er, &e);
        CHECK(e.status == 400 || e.status == 429 || e.status == 503);
        CHECK(e.status != 429 || e.retry_after > 0);
        CHECK(e.retry_after >= 0 && e.error && e.error[0] && e.description && e.description[0]);
    }
    /* (an Entra result's fields may have cut a UTF-8 sequence) */
    utf8_in = utf8_valid((const unsigned char *)e.error, strlen(e.error)) &&
              utf8_valid((const unsigned char *)e.description, strlen(e.description));
    for (int appservice = 0; appservice < 2; appservice++) {
        buf_reset(&b);
        CHECK((appservice ? imds_render_appservice_error(&b, &e) : imds_render_error(&b, &e)) == 0);
        parse_body(&b, &o, utf8_in, 1);
        CHECK(o.n == (appservice ? 4 : 2));
        expect_str(&o, 0, "error", e.error, strlen(e.error));
        expect_str(&o, 1, "error_description", e.description, strlen(e.description));
        if (appservice) {
            expect_num(&o, 2, "statusCode", e.status, 0);
            expect_str(&o, 3, "message", e.description, strlen(e.description));
        }
        object_free(&o);
    }
    buf_free(&b);
}

/* ---- the input ------------------------------------------------------------------------------ */

static uint32_t u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 13)
        return 0;
    unsigned flags = data[0];
    /* times as the daemon has them: now since 1970 (to 2106), lifetimes within +-2^31 s */
    int64_t now = u32(data + 1), d1 = (int32_t)u32(data + 5), d2 = (int32_t)u32(data + 9);
    const char *s = (const char *)data + 13, *end = (const char *)data + size;
    size_t n = (size_t)(end - s);

    check_put_string(s, n, (flags * 7) % (n + 8));

    /* the fields, NUL-terminated copies */
    char *copy = malloc(n + 1);
    memcpy(copy, s, n);
    copy[n] = 0;
    const char *f[5] = {"", "", "", "", ""};
    size_t fn[5] = {0};
    char *p = copy;
    for (int i = 0; i < 5 && p <= copy + n; i++) {
        f[i] = p;
        fn[i] = strlen(p);
        p += fn[i] + 1;
    }
    int utf8_in = 1;
    for (int i = 0; i < 5; i++)
        utf8_in &= utf8_valid((const unsigned char *)f[i], fn[i]);
    check_bodies(flags, f[0], fn[0], f[1], f[2], fn[2], f[3], f[4], now, d1, d2, utf8_in);
    free(copy);
    return 0;
}

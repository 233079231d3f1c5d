/* test_form.c - query_parse / query_get / form_encode / form_add, table-driven.
 * Each table row becomes one cmocka test named "<table>: <row>". */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"
#include "form.h"

#include "unit.h"

/* ---- query_parse ---------------------------------------------------------------------------- */

struct kv {
    const char *key;
    const char *val; /* expected decoded value */
    size_t val_len;  /* 0 = strlen(val) */
};

struct query_row {
    const char *name;
    const char *in;
    size_t in_len; /* 0 = strlen(in) */
    int rc;
    int n; /* expected parameter count when rc == QUERY_OK */
    struct kv kv[4];
};

static const struct query_row query_rows[] = {
    {"empty string", "", 0, QUERY_OK, 0, {{0}}},
    {"plain pair", "a=1", 0, QUERY_OK, 1, {{"a", "1", 0}}},
    {"two pairs",
     "api-version=2018-02-01&resource=https://vault.azure.net",
     0,
     QUERY_OK,
     2,
     {{"api-version", "2018-02-01", 0}, {"resource", "https://vault.azure.net", 0}}},
    {"plus is space", "a=x+y", 0, QUERY_OK, 1, {{"a", "x y", 0}}},
    {"%20 is space", "a=x%20y", 0, QUERY_OK, 1, {{"a", "x y", 0}}},
    {"%2B is a literal plus", "a=x%2By", 0, QUERY_OK, 1, {{"a", "x+y", 0}}},
    {"lower and upper hex", "a=%2f%2F%3a%3A", 0, QUERY_OK, 1, {{"a", "//::", 0}}},
    {"encoded resource URL",
     "resource=https%3A%2F%2Fmanagement.azure.com%2F",
     0,
     QUERY_OK,
     1,
     {{"resource", "https://management.azure.com/", 0}}},
    {"encoded name", "api%2Dversion=1", 0, QUERY_OK, 1, {{"api-version", "1", 0}}},
    {"UTF-8 percent sequences",
     "r=%E2%9C%93%C3%A9%F0%9F%98%80",
     0,
     QUERY_OK,
     1,
     {{"r", "\xE2\x9C\x93\xC3\xA9\xF0\x9F\x98\x80", 0}}},
    {"%26 and %3D stay inside the value",
     "a=x%26b%3Dc&b=2",
     0,
     QUERY_OK,
     2,
     {{"a", "x&b=c", 0}, {"b", "2", 0}}},
    {"second '=' belongs to the value", "a==b", 0, QUERY_OK, 1, {{"a", "=b", 0}}},
    {"name without '=' has an empty value", "a", 0, QUERY_OK, 1, {{"a", "", 0}}},
    {"name with '=' and nothing after", "a=&b=2", 0, QUERY_OK, 2, {{"a", "", 0}, {"b", "2", 0}}},
    {"empty segments are skipped", "&&a=1&&&b=2&", 0, QUERY_OK, 2, {{"a", "1", 0}, {"b", "2", 0}}},
    {"only separators", "&&&", 0, QUERY_OK, 0, {{0}}},
    {"len is honoured (no read past it)", "a=1&b=2", 3, QUERY_OK, 1, {{"a", "1", 0}}},
    {"%zz", "a=%zz", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"%4 (one hex digit)", "a=%4", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"%4 then more", "a=%4&b=1", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"%4g", "a=%4g", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"trailing %", "a=1%", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"lone % value", "a=%", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"%00 (decoded NUL)", "a=x%00y", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"bad escape in the name", "%zz=1", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"%00 in the name", "a%00=1", 0, QUERY_E_ENCODING, 0, {{0}}},
    {"duplicate name", "a=1&a=2", 0, QUERY_E_DUPLICATE, 0, {{0}}},
    {"duplicate with equal values", "a=1&a=1", 0, QUERY_E_DUPLICATE, 0, {{0}}},
    {"duplicate after decoding the name", "a=1&%61=2", 0, QUERY_E_DUPLICATE, 0, {{0}}},
    {"duplicate bare names", "a&a", 0, QUERY_E_DUPLICATE, 0, {{0}}},
    {"duplicate resource",
     "resource=x&api-version=2018-02-01&resource=y",
     0,
     QUERY_E_DUPLICATE,
     0,
     {{0}}},
};

static void t_query(void **state)
{
    const struct query_row *r = *state;
    size_t len = r->in_len ? r->in_len : strlen(r->in);
    struct query *q = tmalloc(sizeof *q);
    int rc = query_parse(q, tcopy(r->in, len), len);
    assert_int_equal(rc, r->rc);
    if (rc == QUERY_OK) {
        assert_int_equal(q->n, r->n);
        for (int i = 0; i < r->n; i++) {
            const struct query_param *p = query_get(q, r->kv[i].key);
            assert_non_null(p);
            size_t vl = r->kv[i].val_len ? r->kv[i].val_len : strlen(r->kv[i].val);
            assert_int_equal(p->val_len, vl);
            assert_memory_equal(p->val, r->kv[i].val, vl);
            assert_int_equal(p->val[vl], 0);                /* NUL-terminated */
            assert_string_equal(q->p[i].key, r->kv[i].key); /* order is kept */
        }
    }
}

/* ---- limits ------------------------------------------------------------------------------ */

/* "p0=0&p1=1&..." with n parameters. */
static char *repeat_params(int n)
{
    char *s = tmalloc((size_t)n * 16 + 1);
    size_t o = 0;
    for (int i = 0; i < n; i++)
        o += (size_t)sprintf(s + o, "%sp%d=%d", i ? "&" : "", i, i);
    return s;
}

static void t_max_params_ok(void **state)
{
    (void)state;
    struct query *q = tmalloc(sizeof *q);
    char *s = repeat_params(QUERY_MAX_PARAMS);
    assert_int_equal(query_parse(q, s, strlen(s)), QUERY_OK);
    assert_int_equal(q->n, QUERY_MAX_PARAMS);
    assert_string_equal(query_get(q, "p31")->val, "31");
}

static void t_too_many_params(void **state)
{
    (void)state;
    struct query *q = tmalloc(sizeof *q);
    char *s = repeat_params(QUERY_MAX_PARAMS + 1);
    assert_int_equal(query_parse(q, s, strlen(s)), QUERY_E_TOO_MANY);
    /* empty segments do not count as parameters */
    char many_amps[200];
    memset(many_amps, '&', sizeof many_amps - 4);
    memcpy(many_amps + sizeof many_amps - 4, "a=1", 4);
    assert_int_equal(query_parse(q, many_amps, strlen(many_amps)), QUERY_OK);
    assert_int_equal(q->n, 1);
}

/* "a=" followed by vlen copies of unit. */
static char *long_value(size_t vlen, const char *unit)
{
    size_t ul = strlen(unit);
    char *s = tmalloc(2 + vlen * ul + 1);
    memcpy(s, "a=", 2);
    for (size_t i = 0; i < vlen; i++)
        memcpy(s + 2 + i * ul, unit, ul);
    s[2 + vlen * ul] = 0;
    return s;
}

static void t_bytes_at_limit(void **state)
{
    (void)state;
    struct query *q = tmalloc(sizeof *q);
    char *s = long_value(QUERY_MAX_BYTES - 1, "x"); /* key 1 + value 4095 = 4096 decoded */
    assert_int_equal(query_parse(q, s, strlen(s)), QUERY_OK);
    assert_int_equal(query_get(q, "a")->val_len, QUERY_MAX_BYTES - 1);
}

/* form.h: QUERY_E_TOO_MANY is "over QUERY_MAX_PARAMS or QUERY_MAX_BYTES", and QUERY_MAX_BYTES
 * counts the decoded bytes of all keys and values. */
static void t_bytes_over_limit(void **state)
{
    (void)state;
    struct query *q = tmalloc(sizeof *q);
    char *s = long_value(QUERY_MAX_BYTES + 8, "x"); /* 4105 decoded bytes */
    assert_int_equal(query_parse(q, s, strlen(s)), QUERY_E_TOO_MANY);
}

static void t_bytes_limit_counts_decoded(void **state)
{
    (void)state;
    struct query *q = tmalloc(sizeof *q);
    char *s = long_value(2000, "%41"); /* 6002 raw bytes, 2001 decoded */
    assert_int_equal(query_parse(q, s, strlen(s)), QUERY_OK);
}

static void t_query_get_absent(void **state)
{
    (void)state;
    struct query *q = tmalloc(sizeof *q);
    assert_int_equal(query_parse(q, "a=1&bb=2", 8), QUERY_OK);
    assert_null(query_get(q, "b"));
    assert_null(query_get(q, "A")); /* names are case-sensitive */
    assert_null(query_get(q, "bbb"));
    assert_null(query_get(q, ""));
    assert_non_null(query_get(q, "bb"));
}

/* ---- form_encode / form_add -------------------------------------------------------------- */

struct enc_row {
    const char *name;
    const char *in;
    size_t in_len; /* 0 = strlen */
    const char *out;
};

static const struct enc_row enc_rows[] = {
    {"unreserved stay", "AZaz09-._~", 0, "AZaz09-._~"},
    {"space is %20", "a b", 0, "a%20b"},
    {"plus slash equals", "+/=", 0, "%2B%2F%3D"},
    {"ampersand percent", "&%", 0, "%26%25"},
    {"scope URL", "https://management.azure.com//.default", 0,
     "https%3A%2F%2Fmanagement.azure.com%2F%2F.default"},
    {"assertion type URN", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", 0,
     "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"},
    {"UTF-8 bytes", "\xC3\xA9", 0, "%C3%A9"},
    {"control and high bytes", "\n\x7f\xff", 0, "%0A%7F%FF"},
    {"embedded NUL with explicit length", "a\0b", 3, "a%00b"},
    {"empty", "", 0, ""},
};

static void t_encode(void **state)
{
    const struct enc_row *r = *state;
    size_t len = r->in_len ? r->in_len : strlen(r->in);
    struct buf *b = tbuf(4096);
    assert_int_equal(form_encode(b, tcopy(r->in, len), len), 0);
    assert_int_equal(b->len, strlen(r->out));
    if (b->len)
        assert_string_equal(b->data, r->out);
}

static void t_encode_roundtrip_all_bytes(void **state)
{
    (void)state;
    char in[255];
    for (int i = 0; i < 255; i++)
        in[i] = (char)(i + 1); /* every byte but NUL */
    struct buf *b = tbuf(4096);
    assert_int_equal(form_add(b, "k", in, sizeof in), 0);
    struct query *q = tmalloc(sizeof *q);
    assert_int_equal(query_parse(q, b->data, b->len), QUERY_OK);
    const struct query_param *p = query_get(q, "k");
    assert_non_null(p);
    assert_int_equal(p->val_len, sizeof in);
    assert_memory_equal(p->val, in, sizeof in);
}

static void t_form_add(void **state)
{
    (void)state;
    struct buf *b = tbuf(4096);
    assert_int_equal(form_add(b, "client_id", "abc", 3), 0);
    assert_string_equal(b->data, "client_id=abc"); /* no leading '&' */
    assert_int_equal(form_add(b, "scope", "a b+c", 5), 0);
    assert_string_equal(b->data, "client_id=abc&scope=a%20b%2Bc");
    assert_int_equal(form_add(b, "x y", "", 0), 0); /* key encoded, empty value */
    assert_string_equal(b->data, "client_id=abc&scope=a%20b%2Bc&x%20y=");
    assert_int_equal(form_add(b, "t", "abcdef", 2), 0); /* val_len honoured */
    assert_string_equal(b->data, "client_id=abc&scope=a%20b%2Bc&x%20y=&t=ab");
}

static void t_form_full_buffer(void **state)
{
    (void)state;
    struct buf *b = tbuf(8);
    assert_int_equal(form_encode(b, "abcd", 4), 0);
    assert_int_equal(form_encode(b, "////", 4), -1); /* 12 more bytes do not fit */
    assert_true(b->len <= 8);
}

int main(void)
{
    ADD_ROWS("query_parse", query_rows, t_query);
    add("query_parse", "32 params accepted", t_max_params_ok, NULL);
    add("query_parse", "33 params -> TOO_MANY", t_too_many_params, NULL);
    add("query_parse", "4096 decoded bytes accepted", t_bytes_at_limit, NULL);
    add("query_parse", "4105 decoded bytes -> TOO_MANY", t_bytes_over_limit, NULL);
    add("query_parse", "2001 decoded bytes from %XX accepted", t_bytes_limit_counts_decoded, NULL);
    add("query_get", "absent and case-sensitive names", t_query_get_absent, NULL);
    ADD_ROWS("form_encode", enc_rows, t_encode);
    add("form_encode", "every byte round-trips through query_parse", t_encode_roundtrip_all_bytes,
        NULL);
    add("form_add", "separators and encoding", t_form_add, NULL);
    add("form_encode", "full buffer -> -1", t_form_full_buffer, NULL);
    return _cmocka_run_group_tests("form", tests, ntests, NULL, NULL);
}

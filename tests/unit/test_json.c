/* test_json.c - json_parse_object, top-level lookups, unescaping and json_put_string. */
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

#include "unit.h"

/* json_get_string whose result is freed by the teardown. */
static int get_string(const struct json_obj *o, const char *key, char **out)
{
    *out = NULL;
    int rc = json_get_string(o, key, out);
    if (rc == 0)
        defer(free, *out);
    return rc;
}

/* ---- json_parse_object --------------------------------------------------------------------- */

struct parse_row {
    const char *name;
    const char *in;
    size_t len; /* 0 = strlen */
    int rc;
};

static const struct parse_row parse_rows[] = {
    {"empty object", "{}", 0, 0},
    {"flat object", "{\"a\":1,\"b\":\"x\",\"c\":true,\"d\":null}", 0, 0},
    {"nested object and array", "{\"a\":{\"b\":[1,2,{\"c\":3}]},\"d\":\"e\"}", 0, 0},
    {"whitespace around", " \t\r\n{ \"a\" : 1 }\n\r\t ", 0, 0},
    {"empty input", "", 0, -1},
    {"only whitespace", "   ", 0, -1},
    {"array root", "[1,2]", 0, -1},
    {"string root", "\"str\"", 0, -1},
    {"number root", "123", 0, -1},
    {"true root", "true", 0, -1},
    {"null root", "null", 0, -1},
    {"truncated object", "{\"a\":1", 0, -1},
    {"truncated string", "{\"a\":\"xyz", 0, -1},
    {"unquoted key", "{a:1}", 0, -1},
    {"trailing garbage", "{\"a\":1} x", 0, -1},
    {"second object", "{\"a\":1}{\"b\":2}", 0, -1},
    {"trailing string", "{\"a\":1}\"x\"", 0, -1},
    {"extra closing brace", "{\"a\":1}}", 0, -1},
    {"mismatched bracket", "{\"a\":[1}", 0, -1},
    {"NUL after the object", "{\"a\":1}\0", 8, -1},
    {"NUL inside a string", "{\"a\":\"x\0y\"}", 11, -1},
    {"invalid escape \\x", "{\"a\":\"\\x\"}", 0, -1},
    {"short \\u escape", "{\"a\":\"\\u12\"}", 0, -1},
    {"non-hex \\u escape", "{\"a\":\"\\u12g4\"}", 0, -1},
    /* Not well-formed JSON (json.h: -1 "if it is not a well-formed object"). */
    {"member without value", "{\"a\":}", 0, -1},
    {"member without colon", "{\"a\" \"b\"}", 0, -1},
    {"trailing comma", "{\"a\":1,}", 0, -1},
    {"missing value before comma", "{\"access_token\":,\"expires_in\":3599}", 0, -1},
    {"bad literal", "{\"a\":nope}", 0, -1},
};

static void t_parse(void **state)
{
    const struct parse_row *r = *state;
    int rc;
    struct json_obj *o = tparse(r->in, r->len ? r->len : strlen(r->in), &rc);
    assert_int_equal(rc, r->rc);
    if (rc != 0)
        assert_null(o->tok);
}

/* An object with nkeys members "kN":N has 1 + 2 * nkeys tokens. */
static char *object_with_keys(int nkeys)
{
    char *s = tmalloc((size_t)nkeys * 16 + 3);
    size_t o = 0;
    s[o++] = '{';
    for (int i = 0; i < nkeys; i++)
        o += (size_t)sprintf(s + o, "%s\"k%d\":%d", i ? "," : "", i, i);
    s[o++] = '}';
    s[o] = 0;
    return s;
}

static void t_tokens_at_limit(void **state)
{
    (void)state;
    char *s = object_with_keys((JSON_MAX_TOKENS - 1) / 2); /* 511 tokens */
    int rc;
    struct json_obj *o = tparse(s, strlen(s), &rc);
    assert_int_equal(rc, 0);
    int64_t v;
    assert_int_equal(json_get_int(o, "k254", &v), 0);
    assert_int_equal(v, 254);
}

static void t_tokens_overflow(void **state)
{
    (void)state;
    char *s = object_with_keys((JSON_MAX_TOKENS + 1) / 2); /* 513 tokens */
    int rc;
    tparse(s, strlen(s), &rc);
    assert_int_equal(rc, -1);
    /* deep nesting also runs out of tokens */
    size_t depth = 2 * JSON_MAX_TOKENS;
    char *d = tmalloc(depth * 2 + 16);
    size_t n = (size_t)sprintf(d, "{\"a\":");
    memset(d + n, '[', depth);
    n += depth;
    memset(d + n, ']', depth);
    n += depth;
    d[n++] = '}';
    tparse(d, n, &rc);
    assert_int_equal(rc, -1);
}

/* ---- json_get_string ----------------------------------------------------------------------- */

struct str_row {
    const char *name;
    const char *json;
    const char *key;
    int rc;
    const char *want; /* when rc == 0 */
};

static const struct str_row str_rows[] = {
    {"simple", "{\"a\":\"b\"}", "a", 0, "b"},
    {"empty string", "{\"a\":\"\"}", "a", 0, ""},
    {"absent", "{\"a\":\"b\"}", "z", -1, NULL},
    {"number is wrong type", "{\"a\":1}", "a", -2, NULL},
    {"object is wrong type", "{\"a\":{}}", "a", -2, NULL},
    {"array is wrong type", "{\"a\":[\"x\"]}", "a", -2, NULL},
    {"null is wrong type", "{\"a\":null}", "a", -2, NULL},
    {"nested key not found at top level", "{\"x\":{\"access_token\":\"nested\"}}", "access_token",
     -1, NULL},
    {"nested key before the top-level one",
     "{\"x\":{\"access_token\":\"nested\"},\"access_token\":\"top\"}", "access_token", 0, "top"},
    {"deeply nested key", "{\"x\":{\"y\":{\"access_token\":\"deep\"}}}", "access_token", -1, NULL},
    {"key inside an array of objects", "{\"x\":[{\"access_token\":\"v\"}]}", "access_token", -1,
     NULL},
    {"string in an array equal to the key", "{\"x\":[\"access_token\",\"v\"]}", "access_token", -1,
     NULL},
    {"value equal to the key name", "{\"x\":\"access_token\",\"y\":\"z\"}", "access_token", -1,
     NULL},
    {"prefix of a key", "{\"access_token_x\":\"no\"}", "access_token", -1, NULL},
    {"key is a prefix", "{\"access\":\"no\"}", "access_token", -1, NULL},
    {"later key after a nested object", "{\"a\":{\"b\":1},\"c\":\"d\"}", "c", 0, "d"},
    {"simple escapes", "{\"a\":\"q\\\"b\\\\s\\/n\\nt\\tr\\rb\\bf\\f\"}", "a", 0,
     "q\"b\\s/n\nt\tr\rb\bf\f"},
    {"\\u0041", "{\"a\":\"\\u0041\"}", "a", 0, "A"},
    {"\\u00e9 (2 bytes)", "{\"a\":\"\\u00e9\"}", "a", 0, "\xC3\xA9"},
    {"\\u20AC (3 bytes)", "{\"a\":\"\\u20AC\"}", "a", 0, "\xE2\x82\xAC"},
    {"\\u001f control", "{\"a\":\"\\u001f\"}", "a", 0, "\x1f"},
    {"surrogate pair", "{\"a\":\"x\\ud83d\\ude00y\"}", "a", 0, "x\xF0\x9F\x98\x80y"},
    {"surrogate pair upper case", "{\"a\":\"\\uD83D\\uDE00\"}", "a", 0, "\xF0\x9F\x98\x80"},
    {"highest code point", "{\"a\":\"\\udbff\\udfff\"}", "a", 0, "\xF4\x8F\xBF\xBF"},
    {"raw UTF-8 passes through", "{\"a\":\"\xC3\xA9\xE2\x9C\x93\"}", "a", 0,
     "\xC3\xA9\xE2\x9C\x93"},
    {"\\u0000 rejected", "{\"a\":\"x\\u0000y\"}", "a", -2, NULL},
    {"lone high surrogate at end", "{\"a\":\"\\ud83d\"}", "a", -2, NULL},
    {"high surrogate then text", "{\"a\":\"\\ud83dxxxxxx\"}", "a", -2, NULL},
    {"high surrogate then non-low \\u", "{\"a\":\"\\ud83d\\u0041\"}", "a", -2, NULL},
    {"high surrogate then \\n", "{\"a\":\"\\ud83d\\n\"}", "a", -2, NULL},
    {"two high surrogates", "{\"a\":\"\\ud83d\\ud83d\"}", "a", -2, NULL},
    {"lone low surrogate", "{\"a\":\"\\ude00\"}", "a", -2, NULL},
};

static void t_get_string(void **state)
{
    const struct str_row *r = *state;
    int rc;
    char *out;
    struct json_obj *o = tparse(r->json, strlen(r->json), &rc);
    assert_int_equal(rc, 0);
    rc = get_string(o, r->key, &out);
    assert_int_equal(rc, r->rc);
    if (rc == 0) {
        assert_non_null(out);
        assert_string_equal(out, r->want);
    }
}

/* ---- json_get_int / json_get_first_int ------------------------------------------------------ */

struct int_row {
    const char *name;
    const char *json;
    int first; /* use json_get_first_int */
    int rc;
    int64_t want;
};

static const struct int_row int_rows[] = {
    {"number", "{\"v\":3599}", 0, 0, 3599},
    {"numeric string", "{\"v\":\"3599\"}", 0, 0, 3599},
    {"negative", "{\"v\":-5}", 0, 0, -5},
    {"zero", "{\"v\":0}", 0, 0, 0},
    {"int64 max", "{\"v\":9223372036854775807}", 0, 0, INT64_MAX},
    {"int64 overflow", "{\"v\":9223372036854775808}", 0, -2, 0},
    {"huge", "{\"v\":99999999999999999999999}", 0, -2, 0},
    {"float", "{\"v\":3599.5}", 0, -2, 0},
    {"float string", "{\"v\":\"3599.0\"}", 0, -2, 0},
    {"exponent", "{\"v\":1e3}", 0, -2, 0},
    {"true", "{\"v\":true}", 0, -2, 0},
    {"null", "{\"v\":null}", 0, -2, 0},
    {"text string", "{\"v\":\"abc\"}", 0, -2, 0},
    {"empty string", "{\"v\":\"\"}", 0, -2, 0},
    {"leading space string", "{\"v\":\" 3599\"}", 0, -2, 0},
    {"leading plus string", "{\"v\":\"+3599\"}", 0, -2, 0},
    {"trailing text string", "{\"v\":\"3599s\"}", 0, -2, 0},
    {"object", "{\"v\":{}}", 0, -2, 0},
    {"array", "{\"v\":[1]}", 0, -2, 0},
    {"absent", "{\"w\":1}", 0, -1, 0},
    {"nested only", "{\"x\":{\"v\":1}}", 0, -1, 0},
    {"nested first, top-level later", "{\"x\":{\"v\":1},\"v\":2}", 0, 0, 2},
    {"first: one element", "{\"v\":[700016]}", 1, 0, 700016},
    {"first: two elements", "{\"v\":[700016,50001]}", 1, 0, 700016},
    {"first: empty array", "{\"v\":[]}", 1, -2, 0},
    {"first: not an array", "{\"v\":700016}", 1, -2, 0},
    {"first: string element", "{\"v\":[\"700016\"]}", 1, -2, 0},
    {"first: nested array", "{\"v\":[[1]]}", 1, -2, 0},
    {"first: absent", "{\"w\":[1]}", 1, -1, 0},
    {"first: nested only", "{\"x\":{\"v\":[1]}}", 1, -1, 0},
};

static void t_get_int(void **state)
{
    const struct int_row *r = *state;
    int rc;
    int64_t v = 12345;
    struct json_obj *o = tparse(r->json, strlen(r->json), &rc);
    assert_int_equal(rc, 0);
    rc = r->first ? json_get_first_int(o, "v", &v) : json_get_int(o, "v", &v);
    assert_int_equal(rc, r->rc);
    if (rc == 0)
        assert_true(v == r->want);
}

/* ---- json_put_string ---------------------------------------------------------------------- */

struct put_row {
    const char *name;
    const char *in;
    size_t len; /* 0 = strlen */
    const char *out;
};

static const struct put_row put_rows[] = {
    {"plain", "abc", 0, "\"abc\""},
    {"empty", "", 0, "\"\""},
    {"quote", "a\"b", 0, "\"a\\\"b\""},
    {"backslash", "a\\b", 0, "\"a\\\\b\""},
    {"newline CR tab", "\n\r\t", 0, "\"\\n\\r\\t\""},
    {"other controls as \\u00XX", "\x01\x08\x0c\x1f", 0, "\"\\u0001\\u0008\\u000c\\u001f\""},
    {"DEL", "\x7f", 0, "\"\\u007f\""},
    {"embedded NUL with length", "a\0b", 3, "\"a\\u0000b\""},
    {"UTF-8 passes through", "\xC3\xA9\xF0\x9F\x98\x80", 0, "\"\xC3\xA9\xF0\x9F\x98\x80\""},
    {"slash unescaped", "https://x/", 0, "\"https://x/\""},
    {"length honoured", "abcdef", 3, "\"abc\""},
};

static void t_put(void **state)
{
    const struct put_row *r = *state;
    size_t len = r->len ? r->len : strlen(r->in);
    struct buf *b = tbuf(4096);
    assert_int_equal(json_put_string(b, tcopy(r->in, len), len), 0);
    assert_int_equal(b->len, strlen(r->out));
    assert_string_equal(b->data, r->out);
}

static void t_put_roundtrip(void **state)
{
    (void)state;
    char in[255];
    for (int i = 0; i < 255; i++)
        in[i] = (char)(i + 1);
    struct buf *b = tbuf(8192);
    assert_int_equal(buf_puts(b, "{\"k\":"), 0);
    assert_int_equal(json_put_string(b, in, sizeof in), 0);
    assert_int_equal(buf_puts(b, "}"), 0);
    for (size_t i = 0; i < b->len; i++)
        assert_true((unsigned char)b->data[i] >= 0x20); /* no raw control characters */
    int rc;
    struct json_obj *o = tparse(b->data, b->len, &rc);
    assert_int_equal(rc, 0);
    char *out;
    assert_int_equal(get_string(o, "k", &out), 0);
    assert_int_equal(strlen(out), sizeof in);
    assert_memory_equal(out, in, sizeof in);
}

static void t_put_full(void **state)
{
    (void)state;
    assert_int_equal(json_put_string(tbuf(4), "abcdef", 6), -1);
    assert_int_equal(json_put_string(tbuf(8), "\x01\x01", 2), -1); /* escapes do not fit */
}

int main(void)
{
    ADD_ROWS("json_parse_object", parse_rows, t_parse);
    add("json_parse_object", "511 tokens accepted", t_tokens_at_limit, NULL);
    add("json_parse_object", "token-count overflow -> -1", t_tokens_overflow, NULL);
    ADD_ROWS("json_get_string", str_rows, t_get_string);
    ADD_ROWS("json_get_int", int_rows, t_get_int);
    ADD_ROWS("json_put_string", put_rows, t_put);
    add("json_put_string", "every byte round-trips", t_put_roundtrip, NULL);
    add("json_put_string", "full buffer -> -1", t_put_full, NULL);
    return _cmocka_run_group_tests("json", tests, ntests, NULL, NULL);
}

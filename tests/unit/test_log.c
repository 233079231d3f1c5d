/* test_log.c - log_to_json (the --log-format json rendering of a logfmt line), table-driven, and
 * log_quote + log_to_json together on hostile bytes: the result always parses as one flat JSON
 * object of printable ASCII. */
#include "unit.h"

#include "log.h"

struct json_row {
    const char *name;
    const char *line;
    size_t outsize; /* 0: plenty */
    const char *want;
};

static const struct json_row json_rows[] = {
    {"fields, an integer as a number", "ts=T level=info event=x a=1 b=abc", 0,
     "{\"ts\":\"T\",\"level\":\"info\",\"event\":\"x\",\"a\":1,\"b\":\"abc\"}"},
    {"quoted value unquoted, \\xNN kept as text", "r=\"a \\\"b\\\" \\\\c \\x0a\" n=2", 0,
     "{\"r\":\"a \\\"b\\\" \\\\c \\\\x0a\",\"n\":2}"},
    {"a quoted number stays a string", "a=\"12\"", 0, "{\"a\":\"12\"}"},
    {"numbers JSON allows only", "z=0 neg=-5 lead=0123 big=1234567890123456 half=1.5 dash=-", 0,
     "{\"z\":0,\"neg\":-5,\"lead\":\"0123\",\"big\":\"1234567890123456\",\"half\":\"1.5\","
     "\"dash\":\"-\"}"},
    {"a cut line in a quoted value", "a=1 b=\"abc", 0, "{\"a\":1,\"b\":\"abc\"}"},
    {"words that are not key=value", "hello a=1 =x b  c=", 0, "{\"a\":1,\"c\":\"\"}"},
    {"raw control and high bytes", "k=a\x01\x7f\xff", 0, "{\"k\":\"a\\u0001\\u007f\\u00ff\"}"},
    {"empty line", "", 0, "{}"},
    {"too long: whole fields dropped, marked", "a=1 b=22222222222222222222222222222222222222", 48,
     "{\"a\":1,\"truncated\":true}"},
    {"too long from the first field", "b=22222222222222222222222222222222222222", 40,
     "{\"truncated\":true}"},
};

static void t_json(void **state)
{
    const struct json_row *r = *state;
    size_t n = r->outsize ? r->outsize : 4096;
    char *out = tmalloc(n);
    size_t len = log_to_json(r->line, strlen(r->line), out, n);
    assert_int_equal(len, strlen(out));
    assert_true(len < n);
    assert_string_equal(out, r->want);
}

/* what a log call does with a value from outside: log_quote, then (json) log_to_json */
static void t_hostile_values(void **state)
{
    (void)state;
    static const char *const values[] = {
        "plain",       "",
        "with space",  "quote\"in",
        "back\\slash", "new\nline",
        "\r\n\t",      "\xc3\x28 invalid utf-8",
        "\xff\xfe",    "key=value inside",
        "\"",          "\\",
        "end\\",       "ts=1 level=error event=forged",
    };
    for (size_t i = 0; i < ARRAY_LEN(values); i++) {
        char q[256], line[512], out[1024];
        log_quote(q, sizeof q, values[i], strlen(values[i]));
        int n = snprintf(line, sizeof line, "ts=T level=info event=e v=%s after=1", q);
        size_t len = log_to_json(line, (size_t)n, out, sizeof out);
        for (size_t k = 0; k < len; k++)
            assert_true(out[k] >= 0x20 && out[k] < 0x7f);
        struct json_obj o;
        assert_int_equal(json_parse_object(&o, out, len), 0);
        char *v = NULL, *ev = NULL;
        int64_t after = 0;
        assert_int_equal(json_get_string(&o, "event", &ev), 0);
        assert_string_equal(ev, "e"); /* a value never forges another field */
        assert_int_equal(json_get_string(&o, "v", &v), 0);
        assert_int_equal(json_get_int(&o, "after", &after), 0);
        assert_int_equal(after, 1);
        free(v);
        free(ev);
        json_obj_free(&o);
    }
}

int main(void)
{
    ADD_ROWS("log_to_json", json_rows, t_json);
    add("log_quote + log_to_json", "hostile values", t_hostile_values, NULL);
    return _cmocka_run_group_tests("log", tests, ntests, NULL, NULL);
}

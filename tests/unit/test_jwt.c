/* Unit tests for jwt.c (claims decoding, base64url), token_file_classify (states), and
 * token_file's first read against a rotation that lands before its watch is set. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "b64url.h"
#include "jwt.h"
#include "token_file.h"

static char *b64(const char *s)
{
    size_t n = strlen(s);
    char *out = malloc(n * 4 / 3 + 4);
    b64url(s, n, out);
    return out;
}

/* header.payload.signature with the payload given as JSON text */
static char *jws(const char *payload)
{
    char *h = b64("{\"alg\":\"RS256\",\"kid\":\"k\"}"), *p = b64(payload), *s = b64("sig-bytes");
    size_t n = strlen(h) + strlen(p) + strlen(s) + 3;
    char *out = malloc(n);
    snprintf(out, n, "%s.%s.%s", h, p, s);
    free(h);
    free(p);
    free(s);
    return out;
}

static const char K8S[] =
    "{\"aud\":[\"api://AzureADTokenExchange\"],\"exp\":2000003600,\"iat\":2000000000,"
    "\"iss\":\"https://oidc.prod-aks.azure.com/abc/\",\"kubernetes.io\":{\"namespace\":\"ns\","
    "\"pod\":{\"name\":\"p\",\"uid\":\"u\"},\"serviceaccount\":{\"name\":\"sa\",\"uid\":\"v\"}},"
    "\"nbf\":2000000000,\"sub\":\"system:serviceaccount:ns:sa\"}";

static void t_kubernetes_claims(void **state)
{
    (void)state;
    char *t = jws(K8S);
    struct jwt_claims c;
    assert_int_equal(jwt_decode(t, strlen(t), &c), JWT_OK);
    assert_int_equal(c.exp, 2000003600);
    assert_int_equal(c.nbf, 2000000000);
    assert_int_equal(c.iat, 2000000000);
    assert_string_equal(c.iss, "https://oidc.prod-aks.azure.com/abc/");
    assert_string_equal(c.sub, "system:serviceaccount:ns:sa");
    assert_string_equal(c.aud, "api://AzureADTokenExchange");
    free(t);
}

static void t_string_aud_and_nested_decoys(void **state)
{
    (void)state;
    /* a nested "exp"/"sub" must not be taken for the top-level claim */
    char *t = jws("{\"x\":{\"exp\":1,\"sub\":\"decoy\"},\"aud\":\"one\",\"exp\":2000000001,"
                  "\"sub\":\"real\"}");
    struct jwt_claims c;
    assert_int_equal(jwt_decode(t, strlen(t), &c), JWT_OK);
    assert_int_equal(c.exp, 2000000001);
    assert_string_equal(c.sub, "real");
    assert_string_equal(c.aud, "one");
    free(t);
}

struct bad_row {
    const char *name;
    const char *token; /* literal token, or NULL to build one from payload */
    const char *payload;
    int err;
};

static const struct bad_row bad_rows[] = {
    {"empty", "", NULL, JWT_E_FORMAT},
    {"one part", "abc", NULL, JWT_E_FORMAT},
    {"two parts", "abc.def", NULL, JWT_E_FORMAT},
    {"four parts", "a.b.c.d", NULL, JWT_E_FORMAT},
    {"empty payload", "eyJh..c2ln", NULL, JWT_E_FORMAT},
    {"empty signature", "eyJh.eyJh.", NULL, JWT_E_FORMAT},
    {"standard base64 '+'", "eyJh.ey+h.c2ln", NULL, JWT_E_BASE64},
    {"standard base64 '/'", "eyJh.ey/h.c2ln", NULL, JWT_E_BASE64},
    {"space inside", "eyJh.ey h.c2ln", NULL, JWT_E_BASE64},
    {"impossible length (4n+1)", "eyJh.eyJhY.c2ln", NULL, JWT_E_BASE64},
    {"payload not JSON", NULL, "not json at all", JWT_E_JSON},
    {"payload a JSON array", NULL, "[1,2,3]", JWT_E_JSON},
    {"payload truncated JSON", NULL, "{\"exp\":1", JWT_E_JSON},
    {"exp missing", NULL, "{\"sub\":\"s\"}", JWT_E_CLAIMS},
    {"exp a string of letters", NULL, "{\"exp\":\"soon\"}", JWT_E_CLAIMS},
    {"exp a float", NULL, "{\"exp\":2000000000.5}", JWT_E_CLAIMS},
    {"exp zero", NULL, "{\"exp\":0}", JWT_E_CLAIMS},
    {"exp negative", NULL, "{\"exp\":-5}", JWT_E_CLAIMS},
    {"nbf an object", NULL, "{\"exp\":2000000000,\"nbf\":{}}", JWT_E_CLAIMS},
    {"deeply nested", NULL,
     "{\"exp\":2000000000,\"a\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"
     "]]]]]]]]}",
     JWT_E_JSON},
};

static void t_bad(void **state)
{
    const struct bad_row *r = *state;
    char *t = r->token ? strdup(r->token) : jws(r->payload);
    struct jwt_claims c;
    assert_int_equal(jwt_decode(t, strlen(t), &c), r->err);
    assert_non_null(jwt_strerror(r->err));
    free(t);
}

static void t_padding_accepted(void **state)
{
    (void)state;
    /* base64url with and without '=' padding decodes the same */
    unsigned char out[16];
    assert_int_equal(base64url_decode("YQ", 2, out), 1);
    assert_int_equal(out[0], 'a');
    assert_int_equal(base64url_decode("YQ==", 4, out), 1);
    assert_int_equal(base64url_decode("YWI", 3, out), 2);
    assert_int_equal(base64url_decode("YWI=", 4, out), 2);
    assert_int_equal(base64url_decode("YWJj", 4, out), 3);
    assert_int_equal(base64url_decode("", 0, out), 0);
    /* non-canonical trailing bits are refused */
    assert_int_equal(base64url_decode("YR", 2, out), -1);
    assert_int_equal(base64url_decode("_-8", 3, out), 2);
    assert_int_equal(out[0], 0xff);
    assert_int_equal(out[1], 0xef);
}

static void t_huge_claims_truncated(void **state)
{
    (void)state;
    char payload[8192];
    char sub[3000];
    memset(sub, 'x', sizeof sub - 1);
    sub[sizeof sub - 1] = 0;
    snprintf(payload, sizeof payload, "{\"exp\":2000000000,\"sub\":\"%s\",\"iss\":\"\\u0001ctl\"}",
             sub);
    char *t = jws(payload);
    struct jwt_claims c;
    assert_int_equal(jwt_decode(t, strlen(t), &c), JWT_OK);
    assert_int_equal(strlen(c.sub), JWT_CLAIM_MAX - 1);
    assert_string_equal(c.iss, "?ctl"); /* control characters never reach logs */
    free(t);
}

static void t_over_cap(void **state)
{
    (void)state;
    size_t n = JWT_MAX_BYTES + 1;
    char *t = malloc(n);
    memset(t, 'a', n);
    t[10] = '.';
    t[20] = '.';
    struct jwt_claims c;
    assert_int_equal(jwt_decode(t, n, &c), JWT_E_FORMAT);
    free(t);
}

/* ---- token_file_classify ---------------------------------------------------------------- */

#define NOW 2000001000

struct state_row {
    const char *name;
    int err;
    const char *payload; /* NULL: no content */
    const char *raw;     /* literal content instead of a built JWS */
    enum token_state state;
    const char *reason_in;
};

static const struct state_row state_rows[] = {
    {"ok", 0, K8S, NULL, TOKEN_OK, "expires in 2600 s"},
    {"missing", -ENOENT, NULL, NULL, TOKEN_MISSING, "does not exist"},
    {"missing directory", -ENOTDIR, NULL, NULL, TOKEN_MISSING, "does not exist"},
    {"permission", -EACCES, NULL, NULL, TOKEN_UNREADABLE, "Permission denied"},
    {"a directory", -EISDIR, NULL, NULL, TOKEN_UNREADABLE, "not a regular file"},
    {"empty", -ENODATA, NULL, NULL, TOKEN_EMPTY, "empty"},
    {"too large", -EFBIG, NULL, NULL, TOKEN_TOO_LARGE, "larger than 65536"},
    {"garbage", 0, NULL, "hello world", TOKEN_MALFORMED, "not a compact JWS"},
    {"not JSON", 0, "plain", NULL, TOKEN_MALFORMED, "not a JSON object"},
    {"expired", 0, "{\"exp\":2000000999}", NULL, TOKEN_EXPIRED, "expired 1 s ago"},
    {"expires exactly now", 0, "{\"exp\":2000001000}", NULL, TOKEN_EXPIRED, "expired 0 s ago"},
    {"nbf within leeway", 0, "{\"exp\":2000009999,\"nbf\":2000001060}", NULL, TOKEN_OK, NULL},
    {"nbf beyond leeway", 0, "{\"exp\":2000009999,\"nbf\":2000001061}", NULL, TOKEN_NOT_YET_VALID,
     "in 61 s"},
};

static void t_state(void **state)
{
    const struct state_row *r = *state;
    char *tok = r->raw ? strdup(r->raw) : r->payload ? jws(r->payload) : NULL;
    struct token_file_status st;
    token_file_classify(r->err, tok, tok ? strlen(tok) : 0, NOW, &st);
    assert_int_equal(st.state, r->state);
    assert_non_null(token_state_name(st.state));
    if (r->reason_in && !strstr(st.reason, r->reason_in))
        fail_msg("reason '%s' lacks '%s'", st.reason, r->reason_in);
    if (tok)
        assert_int_equal(strlen(st.fp), 12);
    if (tok && strstr(st.reason, tok))
        fail_msg("the token reached the reason text");
    free(tok);
}

#define ROWS(arr, fn, prefix)                                                                      \
    for (size_t i = 0; i < sizeof arr / sizeof arr[0]; i++) {                                      \
        snprintf(names[n], sizeof names[n], "%s: %s", prefix, arr[i].name);                        \
        tests[n] = (struct CMUnitTest){names[n], fn, NULL, NULL, (void *)&arr[i]};                 \
        n++;                                                                                       \
    }

static void write_token(const char *dir, const char *path, const char *sub)
{
    char payload[256], tmp[512];
    snprintf(payload, sizeof payload,
             "{\"aud\":\"api://AzureADTokenExchange\",\"exp\":%lld,\"iss\":\"https://i/"
             "\",\"sub\":\"%s\"}",
             (long long)time(NULL) + 3600, sub);
    char *t = jws(payload);
    snprintf(tmp, sizeof tmp, "%s/.new", dir);
    FILE *f = fopen(tmp, "w");
    assert_non_null(f);
    assert_int_equal(fputs(t, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(rename(tmp, path), 0); /* replaced in one step, as the kubelet does */
    free(t);
}

static void on_deadline(uv_timer_t *t)
{
    *(int *)t->data = 1;
}

/* The first read runs on the thread pool and the directory watch starts when it is back: a
 * rotation in between raises no event for the new watch, so the read after it must catch it
 * (else the old token stays until the periodic re-read, a minute later). */
static void t_rotation_before_watch(void **state)
{
    (void)state;
    char dir[] = "/tmp/imdsd-unit-tf-XXXXXX", path[64];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/token", dir);
    write_token(dir, path, "first");
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct token_file *tf = token_file_new(&loop, path);
    struct timespec pause = {0,
                             300 * 1000 * 1000}; /* the pool reads "first"; the loop has not run */
    nanosleep(&pause, NULL);
    write_token(dir, path, "second");
    int expired = 0;
    uv_timer_t deadline;
    uv_timer_init(&loop, &deadline);
    deadline.data = &expired;
    uv_timer_start(&deadline, on_deadline, 5000, 0); /* valgrind on a busy machine */
    struct token_file_status st = {0};
    while (!expired) { /* until "second" is seen, 5 s at most */
        uv_run(&loop, UV_RUN_ONCE);
        token_file_status(tf, (int64_t)time(NULL), &st);
        if (st.state == TOKEN_OK && strcmp(st.claims.sub, "second") == 0)
            break;
    }
    assert_int_equal(st.state, TOKEN_OK);
    assert_string_equal(st.claims.sub, "second");
    token_file_free(tf);
    uv_close((uv_handle_t *)&deadline, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    static struct CMUnitTest tests[64];
    static char names[64][96];
    size_t n = 0;
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_kubernetes_claims);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_string_aud_and_nested_decoys);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_padding_accepted);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_huge_claims_truncated);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_over_cap);
    ROWS(bad_rows, t_bad, "jwt_decode rejects");
    ROWS(state_rows, t_state, "token_file_classify");
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_rotation_before_watch);
    return _cmocka_run_group_tests("jwt", tests, n, NULL, NULL);
}

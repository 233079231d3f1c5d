/* test_entra_msg.c - scope derivation, the client-credentials form and the classification of
 * Entra's token endpoint answers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"
#include "entra_msg.h"
#include "form.h"

#include "unit.h"

static void entra_release(void *p)
{
    entra_result_free(p);
    free(p);
}

/* A result freed by the teardown, filled with garbage so that the parser must initialise it. */
static struct entra_result *tresult(void)
{
    struct entra_result *r = malloc(sizeof *r);
    if (!r)
        abort();
    memset(r, 0xa5, sizeof *r);
    r->access_token = NULL; /* so that the teardown can always free it */
    return defer(entra_release, r);
}

#define CID            "0a1b2c3d-0000-4000-8000-00000000000a"
#define ASSERTION_TYPE "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

/* ---- entra_scope ----------------------------------------------------------------------------- */

struct scope_row {
    const char *name;
    const char *resource;
    const char *scope;
};

static const struct scope_row scope_rows[] = {
    {"trailing slash kept (T11)", "https://management.azure.com/",
     "https://management.azure.com//.default"},
    {"no trailing slash", "https://vault.azure.net", "https://vault.azure.net/.default"},
    {"http resource with slash", "http://database.windows.net/",
     "http://database.windows.net//.default"},
    {"bare GUID", "00000003-0000-0000-c000-000000000000",
     "00000003-0000-0000-c000-000000000000/.default"},
    {"api:// id", "api://x", "api://x/.default"},
    {"already /.default", "https://graph.microsoft.com/.default",
     "https://graph.microsoft.com/.default"},
    {"already //.default", "https://management.azure.com//.default",
     "https://management.azure.com//.default"},
    {"only /.default", "/.default", "/.default"},
    {".default without slash is not the suffix", "x.default", "x.default/.default"},
    {"spaces kept verbatim", " https://x ", " https://x /.default"},
};

static void t_scope(void **state)
{
    const struct scope_row *r = *state;
    struct buf *b = tbuf(4096);
    size_t n = strlen(r->resource);
    char *res = tcopy(r->resource, n + 1); /* exact size with its NUL */
    assert_int_equal(entra_scope(b, res), 0);
    assert_int_equal(b->len, strlen(r->scope));
    assert_string_equal(b->data, r->scope);
}

/* ---- entra_build_form ------------------------------------------------------------------------ */

struct form_row {
    const char *name;
    const char *client_id;
    const char *resource;
    const char *assertion;
    size_t assertion_len; /* 0 = strlen */
    const char *scope;
    const char *want_assertion;
};

static const struct form_row form_rows[] = {
    {"management with trailing slash", CID, "https://management.azure.com/", "eyJ0.eyJ1.c2ln", 0,
     "https://management.azure.com//.default", "eyJ0.eyJ1.c2ln"},
    {"assertion with + / = characters", CID, "https://vault.azure.net",
     "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0+Lz0ifQ==.c2ln+/=", 0,
     "https://vault.azure.net/.default",
     "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0+Lz0ifQ==.c2ln+/="},
    {"GUID resource", CID, "00000003-0000-0000-c000-000000000000", "a.b.c", 0,
     "00000003-0000-0000-c000-000000000000/.default", "a.b.c"},
    {"resource with & = + space", CID, "api://a&b=c+d e", "a.b.c", 0, "api://a&b=c+d e/.default",
     "a.b.c"},
    {"assertion length honoured", CID, "api://x", "a.b.c\n\nGARBAGE", 5, "api://x/.default",
     "a.b.c"},
};

static void t_form(void **state)
{
    const struct form_row *r = *state;
    size_t alen = r->assertion_len ? r->assertion_len : strlen(r->assertion);
    struct buf *b = tbuf(1 << 16);
    assert_int_equal(
        entra_build_form(b, r->client_id, r->resource, tcopy(r->assertion, alen), alen), 0);
    /* a raw '+' or space would reach Entra as a space */
    assert_null(memchr(b->data, '+', b->len));
    assert_null(memchr(b->data, ' ', b->len));
    assert_non_null(strstr(b->data, "grant_type=client_credentials"));
    assert_non_null(strstr(b->data, "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-"
                                    "assertion-type%3Ajwt-bearer"));
    struct query *q = tmalloc(sizeof *q);
    assert_int_equal(query_parse(q, b->data, b->len), QUERY_OK);
    assert_int_equal(q->n, 5);
    const struct query_param *p;
    assert_non_null(p = query_get(q, "client_id"));
    assert_string_equal(p->val, r->client_id);
    assert_non_null(p = query_get(q, "scope"));
    assert_string_equal(p->val, r->scope);
    assert_non_null(p = query_get(q, "grant_type"));
    assert_string_equal(p->val, "client_credentials");
    assert_non_null(p = query_get(q, "client_assertion_type"));
    assert_string_equal(p->val, ASSERTION_TYPE);
    assert_non_null(p = query_get(q, "client_assertion"));
    assert_int_equal(p->val_len, strlen(r->want_assertion));
    assert_string_equal(p->val, r->want_assertion);
}

static void t_form_full(void **state)
{
    (void)state;
    assert_int_equal(entra_build_form(tbuf(64), CID, "https://vault.azure.net", "a.b.c", 5), -1);
}

/* ---- entra_code_is_transient ----------------------------------------------------------------- */

struct code_row {
    const char *name;
    int64_t code;
    int transient;
};

static const struct code_row code_rows[] = {
    {"70021 FIC propagation", 70021, 1},         {"700024 stale assertion", 700024, 1},
    {"90024 RequestBudgetExceeded", 90024, 1},   {"90055 TenantThrottling", 90055, 1},
    {"90006 ExternalServerRetryable", 90006, 1}, {"700016 app not found", 700016, 0},
    {"90002 tenant not found", 90002, 0},        {"500011 resource not found", 500011, 0},
    {"70011 invalid scope", 70011, 0},           {"0 no code", 0, 0},
};

static void t_code(void **state)
{
    const struct code_row *r = *state;
    assert_int_equal(!!entra_code_is_transient(r->code), r->transient);
}

/* ---- entra_parse_response -------------------------------------------------------------------- */

struct resp_row {
    const char *name;
    int http;
    const char *body;
    size_t body_len; /* 0 = strlen */
    const char *retry_after;
    enum entra_kind kind;
    /* ENTRA_OK */
    const char *token;
    int64_t expires_in, ext_expires_in, refresh_in;
    /* errors */
    int64_t aadsts;
    int retry;
    const char *error;   /* exact, when set */
    const char *desc;    /* exact, when set */
    const char *desc_in; /* substring, when set */
};

#define OK_BODY(extra)                                                                             \
    "{\"token_type\":\"Bearer\",\"access_token\":\"eyJ0eXAi.eyJhdWQi.c2ln\"" extra "}"
#define TOK "eyJ0eXAi.eyJhdWQi.c2ln"
#define DESC_700016                                                                                \
    "AADSTS700016: Application with identifier '" CID "' was not found in the directory "          \
    "'contoso.onmicrosoft.com'. This can happen if the application has not been installed by "     \
    "the administrator of the tenant or consented to by any user in the tenant. You may have "     \
    "sent your authentication request to the wrong tenant."
#define BODY_700016                                                                                \
    "{\"error\":\"unauthorized_client\",\"error_description\":\"" DESC_700016                      \
    "\\r\\nTrace ID: 0f9e8d7c-0000-0000-0000-000000000000\\r\\nCorrelation ID: "                   \
    "1a2b3c4d-0000-0000-0000-000000000000\\r\\nTimestamp: 2024-05-01 10:00:00Z\","                 \
    "\"error_codes\":[700016],\"timestamp\":\"2024-05-01 10:00:00Z\",\"trace_id\":"                \
    "\"0f9e8d7c-0000-0000-0000-000000000000\",\"correlation_id\":"                                 \
    "\"1a2b3c4d-0000-0000-0000-000000000000\",\"error_uri\":"                                      \
    "\"https://login.microsoftonline.com/error?code=700016\"}"
#define ERR_BODY(err, code, desc)                                                                  \
    "{\"error\":\"" err "\",\"error_description\":\"" desc "\\r\\nTrace ID: x\\r\\n"               \
    "Correlation ID: y\",\"error_codes\":[" code "]}"

static const struct resp_row resp_rows[] = {
    /* 200 */
    {.name = "200 numbers",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599,\"ext_expires_in\":3599"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599},
    {.name = "200 numeric strings",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":\"3599\",\"ext_expires_in\":\"3600\""),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3600},
    {.name = "200 key order does not matter",
     .http = 200,
     .body = "{\"expires_in\":3599,\"access_token\":\"" TOK "\",\"token_type\":\"Bearer\"}",
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599},
    {.name = "200 ext_expires_in absent -> expires_in",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599},
    {.name = "200 ext_expires_in below expires_in -> expires_in",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599,\"ext_expires_in\":10"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599},
    {.name = "200 refresh_in kept",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":86399,\"ext_expires_in\":86399,\"refresh_in\":43199"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 86399,
     .ext_expires_in = 86399,
     .refresh_in = 43199},
    {.name = "200 refresh_in as a string",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":86399,\"refresh_in\":\"43199\""),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 86399,
     .ext_expires_in = 86399,
     .refresh_in = 43199},
    {.name = "200 refresh_in >= expires_in -> 0",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599,\"refresh_in\":3599"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599,
     .refresh_in = 0},
    {.name = "200 refresh_in negative -> 0",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599,\"refresh_in\":-1"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599,
     .refresh_in = 0},
    {.name = "200 refresh_in float -> 0",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599,\"refresh_in\":1799.5"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599,
     .refresh_in = 0},
    {.name = "200 token_type bearer in lower case",
     .http = 200,
     .body = "{\"token_type\":\"bearer\",\"access_token\":\"" TOK "\",\"expires_in\":3599}",
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599},
    {.name = "200 expires_in of 7 days accepted",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":604800"),
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 604800,
     .ext_expires_in = 604800},
    {.name = "200 nested access_token ignored",
     .http = 200,
     .body = "{\"x\":{\"access_token\":\"nested\"},\"access_token\":\"" TOK "\","
             "\"token_type\":\"Bearer\",\"expires_in\":3599}",
     .kind = ENTRA_OK,
     .token = TOK,
     .expires_in = 3599,
     .ext_expires_in = 3599},
    {.name = "200 without access_token",
     .http = 200,
     .body = "{\"token_type\":\"Bearer\",\"expires_in\":3599}",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 with only a nested access_token",
     .http = 200,
     .body = "{\"x\":{\"access_token\":\"nested\"},\"token_type\":\"Bearer\",\"expires_in\":3599}",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 empty access_token",
     .http = 200,
     .body = "{\"token_type\":\"Bearer\",\"access_token\":\"\",\"expires_in\":3599}",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 access_token not a string",
     .http = 200,
     .body = "{\"token_type\":\"Bearer\",\"access_token\":123,\"expires_in\":3599}",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 empty body", .http = 200, .body = "", .kind = ENTRA_TRANSIENT},
    {.name = "200 non-JSON", .http = 200, .body = "<html>ok</html>", .kind = ENTRA_TRANSIENT},
    {.name = "200 JSON array",
     .http = 200,
     .body = "[" OK_BODY(",\"expires_in\":3599") "]",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 truncated JSON",
     .http = 200,
     .body = "{\"token_type\":\"Bearer\",\"access_token\":\"" TOK "\",\"expires_in\":35",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 trailing garbage after the object",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599") "garbage",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 second object after the first",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599") "{}",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 malformed: access_token without a value",
     .http = 200,
     .body = "{\"access_token\":,\"token_type\":\"Bearer\",\"expires_in\":3599}",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in 0",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":0"),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in negative",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":-3599"),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in float",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3599.5"),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in float string",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":\"3599.0\""),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in exponent",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":3.6e3"),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in huge",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":99999999999999999999999"),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in over 7 days",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":604801"),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in missing", .http = 200, .body = OK_BODY(""), .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in empty string",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":\"\""),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 expires_in true",
     .http = 200,
     .body = OK_BODY(",\"expires_in\":true"),
     .kind = ENTRA_TRANSIENT},
    {.name = "200 token_type pop",
     .http = 200,
     .body = "{\"token_type\":\"pop\",\"access_token\":\"" TOK "\",\"expires_in\":3599}",
     .kind = ENTRA_TRANSIENT},
    {.name = "200 token_type not a string",
     .http = 200,
     .body = "{\"token_type\":1,\"access_token\":\"" TOK "\",\"expires_in\":3599}",
     .kind = ENTRA_TRANSIENT},
    /* 4xx with an AADSTS code */
    {.name = "400 AADSTS700016 -> permanent, first line only",
     .http = 400,
     .body = BODY_700016,
     .kind = ENTRA_PERMANENT,
     .aadsts = 700016,
     .error = "unauthorized_client",
     .desc = DESC_700016},
    {.name = "400 AADSTS90002 -> permanent",
     .http = 400,
     .body = ERR_BODY("invalid_request", "90002", "AADSTS90002: Tenant 'x' not found."),
     .kind = ENTRA_PERMANENT,
     .aadsts = 90002,
     .error = "invalid_request",
     .desc = "AADSTS90002: Tenant 'x' not found."},
    {.name = "400 AADSTS500011 -> permanent",
     .http = 400,
     .body = ERR_BODY("invalid_resource", "500011",
                      "AADSTS500011: The resource principal named "
                      "https://x was not found."),
     .kind = ENTRA_PERMANENT,
     .aadsts = 500011,
     .error = "invalid_resource",
     .desc = "AADSTS500011: The resource principal named https://x was not found."},
    {.name = "400 AADSTS70011 -> permanent",
     .http = 400,
     .body = ERR_BODY("invalid_scope", "70011", "AADSTS70011: The provided value is not valid."),
     .kind = ENTRA_PERMANENT,
     .aadsts = 70011,
     .error = "invalid_scope"},
    {.name = "401 AADSTS700024 -> transient",
     .http = 401,
     .body = ERR_BODY("invalid_client", "700024",
                      "AADSTS700024: Client assertion is not within its valid time range."),
     .kind = ENTRA_TRANSIENT,
     .aadsts = 700024,
     .error = "invalid_client",
     .desc = "AADSTS700024: Client assertion is not within its valid time range."},
    {.name = "400 AADSTS70021 -> transient",
     .http = 400,
     .body = ERR_BODY("invalid_request", "70021",
                      "AADSTS70021: No matching federated identity record found for presented "
                      "assertion."),
     .kind = ENTRA_TRANSIENT,
     .aadsts = 70021,
     .error = "invalid_request",
     .desc_in = "AADSTS70021"},
    {.name = "400 error_codes missing, AADSTS700016 in description",
     .http = 400,
     .body = "{\"error\":\"unauthorized_client\",\"error_description\":\"AADSTS700016: App not "
             "found.\\r\\nTrace ID: x\"}",
     .kind = ENTRA_PERMANENT,
     .aadsts = 700016,
     .error = "unauthorized_client",
     .desc = "AADSTS700016: App not found."},
    {.name = "400 error_codes missing, AADSTS70021 in description",
     .http = 400,
     .body = "{\"error\":\"invalid_request\",\"error_description\":\"AADSTS70021: No matching "
             "federated identity record found.\"}",
     .kind = ENTRA_TRANSIENT,
     .aadsts = 70021,
     .error = "invalid_request"},
    {.name = "400 with Retry-After keeps it in the result",
     .http = 400,
     .body = ERR_BODY("unauthorized_client", "700016", "AADSTS700016: x"),
     .retry_after = "30",
     .kind = ENTRA_PERMANENT,
     .aadsts = 700016,
     .retry = 30,
     .error = "unauthorized_client",
     .desc = "AADSTS700016: x"},
    {.name = "400 JSON with trailing garbage -> transient",
     .http = 400,
     .body = ERR_BODY("unauthorized_client", "700016", "AADSTS700016: x") " trailing",
     .kind = ENTRA_TRANSIENT,
     .aadsts = 0},
    {.name = "400 non-JSON -> transient",
     .http = 400,
     .body = "Bad Request",
     .kind = ENTRA_TRANSIENT,
     .aadsts = 0},
    {.name = "404 HTML -> transient",
     .http = 404,
     .body = "<html>Not Found</html>",
     .kind = ENTRA_TRANSIENT,
     .aadsts = 0},
    {.name = "400 empty body -> transient", .http = 400, .body = "", .kind = ENTRA_TRANSIENT},
    /* throttling */
    {.name = "429 without Retry-After -> 60",
     .http = 429,
     .body = "",
     .kind = ENTRA_THROTTLED,
     .retry = 60},
    {.name = "429 Retry-After 120",
     .http = 429,
     .body = "{}",
     .retry_after = "120",
     .kind = ENTRA_THROTTLED,
     .retry = 120},
    {.name = "429 Retry-After 3600",
     .http = 429,
     .body = "",
     .retry_after = "3600",
     .kind = ENTRA_THROTTLED,
     .retry = 3600},
    {.name = "429 Retry-After 7200 capped at 3600",
     .http = 429,
     .body = "",
     .retry_after = "7200",
     .kind = ENTRA_THROTTLED,
     .retry = 3600},
    {.name = "429 Retry-After huge capped at 3600",
     .http = 429,
     .body = "",
     .retry_after = "99999999999999999999",
     .kind = ENTRA_THROTTLED,
     .retry = 3600},
    {.name = "429 Retry-After HTTP-date -> 60",
     .http = 429,
     .body = "",
     .retry_after = "Wed, 21 Oct 2015 07:28:00 GMT",
     .kind = ENTRA_THROTTLED,
     .retry = 60},
    {.name = "429 Retry-After negative -> 60",
     .http = 429,
     .body = "",
     .retry_after = "-5",
     .kind = ENTRA_THROTTLED,
     .retry = 60},
    {.name = "429 with an AADSTS body",
     .http = 429,
     .body = ERR_BODY("temporarily_unavailable", "90055", "AADSTS90055: TenantThrottling"),
     .retry_after = "10",
     .kind = ENTRA_THROTTLED,
     .retry = 10,
     .aadsts = 90055},
    /* 5xx and no answer */
    {.name = "500 -> transient", .http = 500, .body = "oops", .kind = ENTRA_TRANSIENT},
    {.name = "502 -> transient", .http = 502, .body = "", .kind = ENTRA_TRANSIENT},
    {.name = "503 with Retry-After -> transient, retry kept",
     .http = 503,
     .body = "",
     .retry_after = "30",
     .kind = ENTRA_TRANSIENT,
     .retry = 30},
    {.name = "503 with a JSON AADSTS700016 body is still transient",
     .http = 503,
     .body = BODY_700016,
     .kind = ENTRA_TRANSIENT,
     .aadsts = 0},
    {.name = "no HTTP answer (status 0)", .http = 0, .body = "", .kind = ENTRA_TRANSIENT},
};

static const char *kind_name(enum entra_kind k)
{
    switch (k) {
    case ENTRA_OK:
        return "OK";
    case ENTRA_PERMANENT:
        return "PERMANENT";
    case ENTRA_TRANSIENT:
        return "TRANSIENT";
    case ENTRA_THROTTLED:
        return "THROTTLED";
    }
    return "?";
}

static void t_resp(void **state)
{
    const struct resp_row *r = *state;
    size_t len = r->body_len ? r->body_len : strlen(r->body);
    struct entra_result *rp = tresult();
    /* exact size, not NUL-terminated */
    entra_parse_response(rp, r->http, tcopy(r->body, len), len, r->retry_after);
    struct entra_result res = *rp;
    if (res.kind != r->kind)
        print_error("kind %s, want %s (error '%s', description '%s', access_token '%s')\n",
                    kind_name(res.kind), kind_name(r->kind), res.error, res.description,
                    res.kind == ENTRA_OK && res.access_token ? res.access_token : "");
    assert_int_equal(res.kind, r->kind);
    assert_int_equal(res.http_status, r->http);
    if (r->kind == ENTRA_OK) {
        assert_non_null(res.access_token);
        assert_int_equal(res.token_len, strlen(r->token));
        assert_string_equal(res.access_token, r->token);
        assert_true(res.expires_in == r->expires_in);
        assert_true(res.ext_expires_in == r->ext_expires_in);
        assert_true(res.refresh_in == r->refresh_in);
    } else {
        assert_null(res.access_token);
        assert_true(res.aadsts == r->aadsts);
        /* every failure carries a code and a log-safe one-line description */
        assert_true(res.error[0] != 0);
        assert_true(res.description[0] != 0);
        assert_true(strlen(res.description) < sizeof res.description);
        for (const char *p = res.description; *p; p++)
            assert_true((unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f);
        assert_null(strstr(res.description, "Trace ID"));
        assert_null(strstr(res.description, "Correlation ID"));
    }
    assert_int_equal(res.retry_after, r->retry);
    if (r->error)
        assert_string_equal(res.error, r->error);
    if (r->desc)
        assert_string_equal(res.description, r->desc);
    if (r->desc_in && !strstr(res.description, r->desc_in)) {
        print_error("description '%s' lacks '%s'\n", res.description, r->desc_in);
        fail();
    }
    entra_result_free(rp);
    assert_null(rp->access_token);
}

static void t_resp_big_token(void **state)
{
    (void)state;
    for (size_t n = ENTRA_MAX_TOKEN_BYTES; n <= ENTRA_MAX_TOKEN_BYTES + 1; n++) {
        struct buf *b = tbuf(1 << 20);
        assert_int_equal(buf_puts(b, "{\"token_type\":\"Bearer\",\"expires_in\":3599,"
                                     "\"access_token\":\""),
                         0);
        for (size_t i = 0; i < n; i++)
            assert_int_equal(buf_append(b, "a", 1), 0);
        assert_int_equal(buf_puts(b, "\"}"), 0);
        struct entra_result *res = tresult();
        entra_parse_response(res, 200, b->data, b->len, NULL);
        if (n == ENTRA_MAX_TOKEN_BYTES) {
            assert_int_equal(res->kind, ENTRA_OK);
            assert_int_equal(res->token_len, n);
        } else {
            assert_int_equal(res->kind, ENTRA_TRANSIENT);
            assert_null(res->access_token);
        }
    }
}

static void t_resp_long_description(void **state)
{
    (void)state;
    struct buf *b = tbuf(1 << 16);
    assert_int_equal(buf_puts(b, "{\"error\":\"invalid_request\",\"error_description\":"
                                 "\"AADSTS90002: "),
                     0);
    for (int i = 0; i < 2000; i++)
        assert_int_equal(buf_append(b, "x", 1), 0);
    assert_int_equal(buf_puts(b, "\\u00e9\\u0001\",\"error_codes\":[90002]}"), 0);
    struct entra_result *res = tresult();
    entra_parse_response(res, 400, b->data, b->len, NULL);
    assert_int_equal(res->kind, ENTRA_PERMANENT);
    assert_true(strlen(res->description) < ENTRA_DESCRIPTION_MAX);
    assert_true(strncmp(res->description, "AADSTS90002: xxx", 16) == 0);
}

int main(void)
{
    ADD_ROWS("entra_scope", scope_rows, t_scope);
    ADD_ROWS("entra_build_form", form_rows, t_form);
    add("entra_build_form", "full buffer -> -1", t_form_full, NULL);
    ADD_ROWS("entra_code_is_transient", code_rows, t_code);
    ADD_ROWS("entra_parse_response", resp_rows, t_resp);
    add("entra_parse_response", "access_token size limit", t_resp_big_token, NULL);
    add("entra_parse_response", "long description bounded", t_resp_long_description, NULL);
    return _cmocka_run_group_tests("entra_msg", tests, ntests, NULL, NULL);
}

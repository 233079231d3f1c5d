/* test_imds.c - routing, token request validation (in IMDS order), identity selection, the
 * Entra -> IMDS error mapping and the rendering of token and error bodies. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"
#include "endpoints.h"
#include "entra_msg.h"
#include "form.h"
#include "imds.h"
#include "json.h"
#include "token.h"

#define MAX_TESTS 320
#include "unit.h"

static void entra_release(void *p)
{
    entra_result_free(p);
    free(p);
}

/* ---- endpoints_route (imds_path_normalize, then the route table) ----------------------------- */

struct route_row {
    const char *name;
    const char *path;
    size_t len; /* 0 = strlen */
    enum endpoints_route want;
};

static const struct route_row route_rows[] = {
    {"token path", "/metadata/identity/oauth2/token", 0, ROUTE_TOKEN},
    {"trailing slash", "/metadata/identity/oauth2/token/", 0, ROUTE_TOKEN},
    {"leading double slash", "//metadata/identity/oauth2/token", 0, ROUTE_TOKEN},
    {"double slash and trailing slash", "//metadata/identity/oauth2/token/", 0, ROUTE_TOKEN},
    {"repeated inner slashes", "/metadata//identity///oauth2/token", 0, ROUTE_TOKEN},
    {"trailing double slash", "/metadata/identity/oauth2/token//", 0, ROUTE_TOKEN},
    {"mixed case", "/METADATA/Identity/oauth2/token", 0, ROUTE_TOKEN},
    {"upper case", "/METADATA/IDENTITY/OAUTH2/TOKEN", 0, ROUTE_TOKEN},
    {"many leading slashes",
     "/////////////////////////////////////////////////////////////////////////////////"
     "/metadata/identity/oauth2/token",
     0, ROUTE_TOKEN},
    {"len honoured", "/metadata/identity/oauth2/tokenXYZ", 31, ROUTE_TOKEN},
    {"extra segment", "/metadata/identity/oauth2/token/extra", 0, ROUTE_NOT_FOUND},
    {"longer last segment", "/metadata/identity/oauth2/tokens", 0, ROUTE_NOT_FOUND},
    {"prefix only", "/metadata/identity/oauth2", 0, ROUTE_NOT_FOUND},
    {"getplatformmetadata (IMDSv2 probe)", "/metadata/identity/getplatformmetadata", 0,
     ROUTE_NOT_FOUND},
    {"issuecredential", "/metadata/identity/issuecredential", 0, ROUTE_NOT_FOUND},
    {"credential", "/metadata/identity/credential", 0, ROUTE_NOT_FOUND},
    {"instance metadata", "/metadata/instance", 0, ROUTE_NOT_FOUND},
    {"root", "/", 0, ROUTE_NOT_FOUND},
    {"empty", "", 0, ROUTE_NOT_FOUND},
    {"no leading slash", "metadata/identity/oauth2/token", 0, ROUTE_NOT_FOUND},
    {"encoded slash", "/metadata/identity/oauth2%2Ftoken", 0, ROUTE_NOT_FOUND},
    {"very long path",
     "/metadata/identity/oauth2/token/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
     "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
     0, ROUTE_NOT_FOUND},
    {"healthz", "/healthz", 0, ROUTE_HEALTHZ},
    {"healthz trailing slash", "/healthz/", 0, ROUTE_HEALTHZ},
    {"readyz", "/readyz", 0, ROUTE_READYZ},
    {"readyz double slash", "//readyz", 0, ROUTE_READYZ},
    {"healthz prefix", "/healthzz", 0, ROUTE_NOT_FOUND},
    {"healthz under metadata", "/metadata/healthz", 0, ROUTE_NOT_FOUND},
};

static void t_route(void **state)
{
    const struct route_row *r = *state;
    size_t len = r->len ? r->len : strlen(r->path);
    assert_int_equal(endpoints_route(tcopy(r->path, len), len), r->want);
}

/* ---- imds_check_token_request ---------------------------------------------------------------- */

#define DEF         "0a1b2c3d-0000-4000-8000-00000000000a"
#define DEF_UPPER   "0A1B2C3D-0000-4000-8000-00000000000A"
#define EXTRA       "5e6f7a8b-1111-4111-8111-11111111111b"
#define EXTRA_UPPER "5E6F7A8B-1111-4111-8111-11111111111B"
#define UNKNOWN     "99999999-9999-4999-8999-999999999999"
#define API         "api-version=2018-02-01"
#define RES         "resource=https%3A%2F%2Fmanagement.azure.com%2F"
#define OK_Q        API "&" RES

static char extra_id[] = EXTRA;
static char *const allowed_ids[] = {extra_id};
static char alias_obj[] = "0b000000-0000-4000-8000-000000000001";
static char alias_res[] = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/"
                          "userAssignedIdentities/u";
static char alias_stale[] = "0b000000-0000-4000-8000-0000000000ff";
static char stale_target[] = UNKNOWN; /* an alias to an id that is not served must not select it */
static const struct imds_alias aliases[] = {
    {alias_obj, extra_id}, {alias_res, extra_id}, {alias_stale, stale_target}};
static const struct imds_identities ids_default = {
    .default_client_id = DEF, .allowed = allowed_ids, .nallowed = 1};
static const struct imds_identities ids_no_default = {
    .default_client_id = NULL, .allowed = allowed_ids, .nallowed = 1};
static const struct imds_identities ids_aliases = {.default_client_id = DEF,
                                                   .allowed = allowed_ids,
                                                   .nallowed = 1,
                                                   .aliases = aliases,
                                                   .naliases = 3};

#define MD_MISSING  "Required metadata header not specified"
#define RES_MISSING "Required query variable 'resource' is missing"
#define UTF8_BAD    "Query variable 'resource' is not valid UTF-8"
#define NOT_FOUND   "Identity not found"

struct check_row {
    const char *name;
    int is_get, md, xff;
    const char *query; /* NULL = no query string */
    const struct imds_identities *ids;
    int status;            /* 0 = success */
    const char *error;     /* expected error code (when status != 0) */
    const char *desc;      /* exact description, or NULL */
    const char *desc_in;   /* substring of the description, or NULL */
    const char *resource;  /* expected decoded resource (success) */
    const char *client_id; /* expected selected client id (success) */
};

#define GET  1, 1, 0
#define G(q) GET, q, &ids_default

static const struct check_row check_rows[] = {
    /* method first */
    {"POST -> 405", 0, 1, 0, OK_Q, &ids_default, 405, "method_not_allowed", NULL, NULL, NULL, NULL},
    {"POST without Metadata and with XFF -> 405", 0, 0, 1, "%zz", &ids_default, 405,
     "method_not_allowed", NULL, NULL, NULL, NULL},
    /* then X-Forwarded-For */
    {"X-Forwarded-For -> 400", 1, 1, 1, OK_Q, &ids_default, 400, "invalid_request", NULL,
     "Forwarded", NULL, NULL},
    {"X-Forwarded-For without Metadata -> 400 XFF", 1, 0, 1, OK_Q, &ids_default, 400,
     "invalid_request", NULL, "Forwarded", NULL, NULL},
    /* then Metadata, before the query is looked at */
    {"no Metadata", 1, 0, 0, OK_Q, &ids_default, 400, "invalid_request", MD_MISSING, NULL, NULL,
     NULL},
    {"no Metadata, no query", 1, 0, 0, NULL, &ids_default, 400, "invalid_request", MD_MISSING, NULL,
     NULL, NULL},
    {"no Metadata, bad %-encoding", 1, 0, 0, API "&resource=%zz", &ids_default, 400,
     "invalid_request", MD_MISSING, NULL, NULL, NULL},
    {"no Metadata, duplicate params", 1, 0, 0, OK_Q "&" RES, &ids_default, 400, "invalid_request",
     MD_MISSING, NULL, NULL, NULL},
    {"no Metadata, api-version only (MSAL.NET discovery)", 1, 0, 0, API, &ids_default, 400,
     "invalid_request", MD_MISSING, NULL, NULL, NULL},
    {"no Metadata, unknown identity", 1, 0, 0, OK_Q "&client_id=" UNKNOWN, &ids_default, 400,
     "invalid_request", MD_MISSING, NULL, NULL, NULL},
    /* query syntax */
    {"%zz", G(API "&resource=%zz"), 400, "invalid_request", NULL, NULL, NULL, NULL},
    {"%4", G(API "&resource=%4"), 400, "invalid_request", NULL, NULL, NULL, NULL},
    {"trailing %", G(API "&resource=abc%"), 400, "invalid_request", NULL, NULL, NULL, NULL},
    {"%00", G(API "&resource=a%00b"), 400, "invalid_request", NULL, NULL, NULL, NULL},
    {"duplicate resource", G(OK_Q "&resource=x"), 400, "invalid_request", NULL, "duplicate", NULL,
     NULL},
    {"duplicate api-version", G(OK_Q "&api-version=2018-02-01"), 400, "invalid_request", NULL,
     "duplicate", NULL, NULL},
    {"duplicate client_id", G(OK_Q "&client_id=" DEF "&client_id=" DEF), 400, "invalid_request",
     NULL, "duplicate", NULL, NULL},
    {"duplicate beats a missing api-version", G("resource=a&resource=b"), 400, "invalid_request",
     NULL, "duplicate", NULL, NULL},
    {"too many params",
     G(OK_Q "&a1&a2&a3&a4&a5&a6&a7&a8&a9&a10&a11&a12&a13&a14&a15&a16&a17&a18&a19&a20&a21&a22&a23"
            "&a24&a25&a26&a27&a28&a29&a30&a31"),
     400, "invalid_request", NULL, NULL, NULL, NULL},
    /* api-version */
    {"no query at all", G(NULL), 400, "invalid_request", NULL, "api-version", NULL, NULL},
    {"missing api-version", G(RES), 400, "invalid_request", NULL, "api-version", NULL, NULL},
    {"empty api-version", G("api-version=&" RES), 400, "invalid_request", NULL, "api-version", NULL,
     NULL},
    {"api-version 2018-01-31", G("api-version=2018-01-31&" RES), 400, "invalid_request", NULL,
     "api-version", NULL, NULL},
    {"api-version 2018-02-30", G("api-version=2018-02-30&" RES), 400, "invalid_request", NULL,
     "api-version", NULL, NULL},
    {"api-version latest", G("api-version=latest&" RES), 400, "invalid_request", NULL,
     "api-version", NULL, NULL},
    {"api-version 2018-2-1", G("api-version=2018-2-1&" RES), 400, "invalid_request", NULL,
     "api-version", NULL, NULL},
    {"bad api-version checked before resource", G("api-version=latest"), 400, "invalid_request",
     NULL, "api-version", NULL, NULL},
    /* resource */
    {"missing resource", G(API), 400, "invalid_request", RES_MISSING, NULL, NULL, NULL},
    {"empty resource", G(API "&resource="), 400, "invalid_request", RES_MISSING, NULL, NULL, NULL},
    {"resource without '='", G(API "&resource"), 400, "invalid_request", RES_MISSING, NULL, NULL,
     NULL},
    {"Resource in other case is not resource", G(API "&Resource=x"), 400, "invalid_request",
     RES_MISSING, NULL, NULL, NULL},
    {"missing resource beats unknown identity", G(API "&client_id=" UNKNOWN), 400,
     "invalid_request", RES_MISSING, NULL, NULL, NULL},
    /* success and identity selection */
    {"ok: default identity", G(OK_Q), 0, NULL, NULL, NULL, "https://management.azure.com/", DEF},
    {"ok: api-version 2023-07-01", G("api-version=2023-07-01&resource=https://vault.azure.net"), 0,
     NULL, NULL, NULL, "https://vault.azure.net", DEF},
    {"ok: plus and %20 in resource", G(API "&resource=a+b%20c"), 0, NULL, NULL, NULL, "a b c", DEF},
    {"ok: resource with UTF-8", G(API "&resource=%E2%9C%93"), 0, NULL, NULL, NULL, "\xE2\x9C\x93",
     DEF},
    {"ok: resource with a 4-byte character", G(API "&resource=a%F0%9F%94%91"), 0, NULL, NULL, NULL,
     "a\xF0\x9F\x94\x91", DEF},
    {"a byte that is not UTF-8", G(API "&resource=a%FFb"), 400, "invalid_request", UTF8_BAD, NULL,
     NULL, NULL},
    {"a cut UTF-8 character", G(API "&resource=a%E2%9C"), 400, "invalid_request", UTF8_BAD, NULL,
     NULL, NULL},
    {"an overlong '/'", G(API "&resource=a%C0%AF"), 400, "invalid_request", UTF8_BAD, NULL, NULL,
     NULL},
    {"an overlong 3-byte form", G(API "&resource=%E0%80%AF"), 400, "invalid_request", UTF8_BAD,
     NULL, NULL, NULL},
    {"a surrogate", G(API "&resource=%ED%A0%80"), 400, "invalid_request", UTF8_BAD, NULL, NULL,
     NULL},
    {"above U+10FFFF", G(API "&resource=%F4%90%80%80"), 400, "invalid_request", UTF8_BAD, NULL,
     NULL, NULL},
    {"ok: explicit default", G(OK_Q "&client_id=" DEF), 0, NULL, NULL, NULL,
     "https://management.azure.com/", DEF},
    {"ok: explicit default in upper case", G(OK_Q "&client_id=" DEF_UPPER), 0, NULL, NULL, NULL,
     "https://management.azure.com/", DEF},
    {"ok: allowed extra id", G(OK_Q "&client_id=" EXTRA), 0, NULL, NULL, NULL,
     "https://management.azure.com/", EXTRA},
    {"ok: allowed extra id in upper case", G(OK_Q "&client_id=" EXTRA_UPPER), 0, NULL, NULL, NULL,
     "https://management.azure.com/", EXTRA},
    {"ok: extra id without a default", GET, OK_Q "&client_id=" EXTRA, &ids_no_default, 0, NULL,
     NULL, NULL, "https://management.azure.com/", EXTRA},
    {"ok: unknown params ignored",
     G(OK_Q "&xms_cc=cp1&bypass_cache=true&authority=x&token_sha256_to_refresh=ab"), 0, NULL, NULL,
     NULL, "https://management.azure.com/", DEF},
    {"ok: params in any order", G(RES "&client_id=" EXTRA "&" API), 0, NULL, NULL, NULL,
     "https://management.azure.com/", EXTRA},
    {"unknown client_id", G(OK_Q "&client_id=" UNKNOWN), 400, "invalid_request", NOT_FOUND, NULL,
     NULL, NULL},
    {"client_id not a GUID", G(OK_Q "&client_id=nope"), 400, "invalid_request", NOT_FOUND, NULL,
     NULL, NULL},
    {"client_id prefix of the default", G(OK_Q "&client_id=0a1b2c3d"), 400, "invalid_request",
     NOT_FOUND, NULL, NULL, NULL},
    {"no default and no client_id", GET, OK_Q, &ids_no_default, 400, "invalid_request", NOT_FOUND,
     NULL, NULL, NULL},
    {"object_id", G(OK_Q "&object_id=" DEF), 400, "invalid_request", NOT_FOUND, NULL, NULL, NULL},
    {"principal_id", G(OK_Q "&principal_id=" DEF), 400, "invalid_request", NOT_FOUND, NULL, NULL,
     NULL},
    {"msi_res_id", G(OK_Q "&msi_res_id=%2Fsubscriptions%2Fx"), 400, "invalid_request", NOT_FOUND,
     NULL, NULL, NULL},
    {"mi_res_id", G(OK_Q "&mi_res_id=%2Fsubscriptions%2Fx"), 400, "invalid_request", NOT_FOUND,
     NULL, NULL, NULL},
    {"msi-res-id (.NET probe)", G(OK_Q "&msi-res-id=%2Fsubscriptions%2Fx"), 400, "invalid_request",
     NOT_FOUND, NULL, NULL, NULL},
#define A(q) GET, q, &ids_aliases
    {"alias: object_id maps to its client id",
     A(OK_Q "&object_id=0B000000-0000-4000-8000-000000000001"), 0, NULL, NULL, NULL,
     "https://management.azure.com/", EXTRA},
    {"alias: principal_id maps like object_id",
     A(OK_Q "&principal_id=0b000000-0000-4000-8000-000000000001"), 0, NULL, NULL, NULL,
     "https://management.azure.com/", EXTRA},
    {"alias: msi_res_id, any case",
     A(OK_Q "&msi_res_id=%2FSUBSCRIPTIONS%2Fs%2FresourceGroups%2Frg"
            "%2Fproviders%2FMicrosoft.ManagedIdentity%2F"
            "userAssignedIdentities%2Fu"),
     0, NULL, NULL, NULL, "https://management.azure.com/", EXTRA},
    {"alias: mi_res_id",
     A(OK_Q "&mi_res_id=%2Fsubscriptions%2Fs%2FresourceGroups%2Frg%2Fproviders"
            "%2FMicrosoft.ManagedIdentity%2FuserAssignedIdentities%2Fu"),
     0, NULL, NULL, NULL, "https://management.azure.com/", EXTRA},
    {"alias: msi-res-id (.NET probe spelling)",
     A(OK_Q "&msi-res-id=%2Fsubscriptions%2Fs%2FresourceGroups%2Frg%2Fproviders"
            "%2FMicrosoft.ManagedIdentity%2FuserAssignedIdentities%2Fu"),
     0, NULL, NULL, NULL, "https://management.azure.com/", EXTRA},
    {"alias: unknown object id", A(OK_Q "&object_id=0b000000-0000-4000-8000-000000000002"), 400,
     "invalid_request", NOT_FOUND, NULL, NULL, NULL},
    {"alias: a client id is not an object id", A(OK_Q "&object_id=" EXTRA), 400, "invalid_request",
     NOT_FOUND, NULL, NULL, NULL},
    {"alias: to an id that is not served",
     A(OK_Q "&object_id=0b000000-0000-4000-8000-0000000000ff"), 400, "invalid_request", NOT_FOUND,
     NULL, NULL, NULL},
    {"alias: two selectors",
     A(OK_Q "&client_id=" EXTRA "&object_id=0b000000-0000-4000-8000-000000000001"), 400,
     "invalid_request", NULL, "only one of", NULL, NULL},
};

/* The App Service protocol: secret first, then the same query rules from 2019-08-01 on. */
#define SECRET "s3cret-value"
struct appsvc_row {
    const char *name;
    int is_get, xff;
    const char *header; /* NULL = absent */
    const char *query;
    int status;
    const char *error;
    const char *client_id;
    const char *legacy; /* the 2017-09-01 `secret` header, NULL = absent */
    int metadata;       /* Metadata: true sent */
    int msi2017;        /* expected: 0, 1 (a date), 2 (epoch seconds) */
    int one_secret;     /* only SECRET is valid (else PREVIOUS too: a rotation's overlap) */
};

#define PREVIOUS "previous-s3cret"

#define Q17 "api-version=2017-09-01&resource=r"

static const struct appsvc_row appsvc_rows[] = {
    {"good", 1, 0, SECRET, "api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net", 0, NULL,
     DEF, NULL, 0, 0, 0},
    {"good, user-assigned by principal_id", 1, 0, SECRET,
     "api-version=2019-08-01&resource=r&principal_id=0b000000-0000-4000-8000-000000000001", 0, NULL,
     EXTRA, NULL, 0, 0, 0},
    {"missing header", 1, 0, NULL, "api-version=2019-08-01&resource=r", 401, "unauthorized_client",
     NULL, NULL, 0, 0, 0},
    {"wrong header", 1, 0, "s3cret-valuf", "api-version=2019-08-01&resource=r", 401,
     "unauthorized_client", NULL, NULL, 0, 0, 0},
    {"header is a prefix of the secret", 1, 0, "s3cret", "api-version=2019-08-01&resource=r", 401,
     "unauthorized_client", NULL, NULL, 0, 0, 0},
    {"secret is a prefix of the header", 1, 0, SECRET "x", "api-version=2019-08-01&resource=r", 401,
     "unauthorized_client", NULL, NULL, 0, 0, 0},
    {"empty header", 1, 0, "", "api-version=2019-08-01&resource=r", 401, "unauthorized_client",
     NULL, NULL, 0, 0, 0},
    {"header checked before the query", 1, 0, "nope", "%zz", 401, "unauthorized_client", NULL, NULL,
     0, 0, 0},
    {"old api-version", 1, 0, SECRET, "api-version=2018-02-01&resource=r", 400, "invalid_request",
     NULL, NULL, 0, 0, 0},
    {"no resource", 1, 0, SECRET, "api-version=2019-08-01", 400, "invalid_request", NULL, NULL, 0,
     0, 0},
    {"unknown client", 1, 0, SECRET, "api-version=2019-08-01&resource=r&client_id=" UNKNOWN, 400,
     "invalid_request", NULL, NULL, 0, 0, 0},
    {"POST", 0, 0, SECRET, "api-version=2019-08-01&resource=r", 405, "method_not_allowed", NULL,
     NULL, 0, 0, 0},
    {"X-Forwarded-For", 1, 1, SECRET, "api-version=2019-08-01&resource=r", 400, "invalid_request",
     NULL, NULL, 0, 0, 0},
    {"2017: secret header", 1, 0, NULL, Q17, 0, NULL, DEF, SECRET, 0, 1, 0},
    {"2017: Azure ML client (Metadata: true): epoch expires_on", 1, 0, NULL, Q17, 0, NULL, DEF,
     SECRET, 1, 2, 0},
    {"2017: clientid", 1, 0, NULL, Q17 "&clientid=" EXTRA, 0, NULL, EXTRA, SECRET, 0, 1, 0},
    {"2017: clientid of an identity not served", 1, 0, NULL, Q17 "&clientid=" UNKNOWN, 400,
     "invalid_request", NULL, SECRET, 0, 0, 0},
    {"2017: clientid and client_id", 1, 0, NULL, Q17 "&clientid=" EXTRA "&client_id=" EXTRA, 400,
     "invalid_request", NULL, SECRET, 0, 0, 0},
    {"2017: empty clientid is the default", 1, 0, NULL, Q17 "&clientid=", 0, NULL, DEF, SECRET, 0,
     1, 0},
    {"2017: wrong secret", 1, 0, NULL, Q17, 401, "unauthorized_client", NULL, "s3cret-valuf", 0, 0,
     0},
    {"2017: empty secret", 1, 0, NULL, Q17, 401, "unauthorized_client", NULL, "", 0, 0, 0},
    {"2017: X-IDENTITY-HEADER wins over secret", 1, 0, SECRET, "api-version=2019-08-01&resource=r",
     0, NULL, DEF, "wrong", 0, 0, 0},
    {"2017: a wrong X-IDENTITY-HEADER is not saved by a good secret", 1, 0, "wrong", Q17, 401,
     "unauthorized_client", NULL, SECRET, 0, 0, 0},
    {"2017: X-IDENTITY-HEADER needs 2019-08-01", 1, 0, SECRET, Q17, 400, "invalid_request", NULL,
     NULL, 0, 0, 0},
    {"2017: secret with 2019-08-01 answers in the 2019 shape", 1, 0, NULL,
     "api-version=2019-08-01&resource=r", 0, NULL, DEF, SECRET, 0, 0, 0},
    {"2017: no other date before 2018", 1, 0, NULL, "api-version=2017-09-02&resource=r", 400,
     "invalid_request", NULL, SECRET, 0, 0, 0},
    {"2017: clientid means nothing in 2019-08-01", 1, 0, SECRET,
     "api-version=2019-08-01&resource=r&clientid=" EXTRA, 0, NULL, DEF, NULL, 0, 0, 0},
    {"rotation: the previous secret during its overlap", 1, 0, PREVIOUS,
     "api-version=2019-08-01&resource=r", 0, NULL, DEF, NULL, 0, 0, 0},
    {"rotation: the previous secret after its overlap", 1, 0, PREVIOUS,
     "api-version=2019-08-01&resource=r", 401, "unauthorized_client", NULL, NULL, 0, 0, 1},
    {"rotation: the previous secret as 2017's secret header", 1, 0, NULL, Q17, 0, NULL, DEF,
     PREVIOUS, 0, 1, 0},
    {"rotation: a prefix of the previous secret", 1, 0, "previous",
     "api-version=2019-08-01&resource=r", 401, "unauthorized_client", NULL, NULL, 0, 0, 0},
};

static void t_appsvc(void **state)
{
    const struct appsvc_row *r = *state;
    struct imds_input in = {.is_get = r->is_get, .has_xff = r->xff};
    in.query_len = strlen(r->query);
    in.query = tcopy(r->query, in.query_len);
    if (r->header) {
        in.identity_header_len = strlen(r->header);
        in.identity_header = tcopy(r->header, in.identity_header_len);
    }
    if (r->legacy) {
        in.legacy_secret_len = strlen(r->legacy);
        in.legacy_secret = tcopy(r->legacy, in.legacy_secret_len);
    }
    in.has_metadata_true = r->metadata;
    struct query *q = tmalloc(sizeof *q);
    struct imds_token_req out = {0};
    struct imds_error err = {0, NULL, NULL, -1};
    /* the current secret and, as during a rotation's overlap, the previous one */
    struct imds_secret secrets[2] = {{tcopy(SECRET, strlen(SECRET)), strlen(SECRET)},
                                     {tcopy(PREVIOUS, strlen(PREVIOUS)), strlen(PREVIOUS)}};
    int rc = imds_check_appservice_request(&in, &ids_aliases, secrets, r->one_secret ? 1 : 2, q,
                                           &out, &err);
    if (r->status == 0) {
        assert_int_equal(rc, 0);
        assert_string_equal(out.client_id, r->client_id);
        assert_int_equal(out.msi2017 + out.msi2017_epoch, r->msi2017);
    } else {
        assert_int_equal(rc, -1);
        assert_int_equal(err.status, r->status);
        assert_string_equal(err.error, r->error);
        assert_int_equal(err.retry_after, 0);
    }
}

/* Cloud Shell: POST, Metadata, a form body */
#define RESID_Q                                                                                    \
    "%2Fsubscriptions%2Fs%2FresourceGroups%2Frg%2Fproviders%2FMicrosoft.ManagedIdentity%2F"        \
    "userAssignedIdentities%2Fu"
struct cs_row {
    const char *name;
    int is_post, metadata, form, xff;
    const char *body;
    const char *query; /* in the URL: never read */
    int status;
    const char *client_id;
};

static const struct cs_row cs_rows[] = {
    {"good", 1, 1, 1, 0, "resource=https%3A%2F%2Fvault.azure.net", NULL, 0, DEF},
    {"user-assigned client_id", 1, 1, 1, 0, "resource=r&client_id=" EXTRA, NULL, 0, EXTRA},
    {"msi_res_id alias", 1, 1, 1, 0, "resource=r&msi_res_id=" RESID_Q, NULL, 0, EXTRA},
    {"a valid api-version may come", 1, 1, 1, 0, "resource=r&api-version=2018-02-01", NULL, 0, DEF},
    {"an invalid api-version may not", 1, 1, 1, 0, "resource=r&api-version=2017-01-01", NULL, 400,
     NULL},
    {"GET is not Cloud Shell", 0, 1, 1, 0, "resource=r", NULL, 405, NULL},
    {"no Metadata", 1, 0, 1, 0, "resource=r", NULL, 400, NULL},
    {"not a form", 1, 1, 0, 0, "resource=r", NULL, 400, NULL},
    {"X-Forwarded-For", 1, 1, 1, 1, "resource=r", NULL, 400, NULL},
    {"empty body", 1, 1, 1, 0, "", NULL, 400, NULL},
    {"the URL's query is not read", 1, 1, 1, 0, "", "resource=r", 400, NULL},
    {"duplicate", 1, 1, 1, 0, "resource=a&resource=b", NULL, 400, NULL},
    {"two selectors", 1, 1, 1, 0, "resource=r&client_id=" EXTRA "&msi_res_id=" RESID_Q, NULL, 400,
     NULL},
    {"unknown identity", 1, 1, 1, 0, "resource=r&client_id=" UNKNOWN, NULL, 400, NULL},
};

static void t_cs(void **state)
{
    const struct cs_row *r = *state;
    struct imds_input in = {.is_post = r->is_post,
                            .is_get = !r->is_post,
                            .has_metadata_true = r->metadata,
                            .form_body = r->form,
                            .has_xff = r->xff};
    in.body_len = strlen(r->body);
    in.body = tcopy(r->body, in.body_len);
    in.has_body = in.body_len > 0;
    if (r->query) {
        in.query_len = strlen(r->query);
        in.query = tcopy(r->query, in.query_len);
    }
    struct query *q = tmalloc(sizeof *q);
    struct imds_token_req out = {0};
    struct imds_error err = {0, NULL, NULL, -1};
    int rc = imds_check_cloudshell_request(&in, &ids_aliases, q, &out, &err);
    if (r->status == 0) {
        assert_int_equal(rc, 0);
        assert_string_equal(out.client_id, r->client_id);
        assert_int_equal(out.msi2017, 0);
    } else {
        assert_int_equal(rc, -1);
        assert_int_equal(err.status, r->status);
    }
}

/* --allow-resource */
struct res_row {
    const char *name;
    const char *resource;
    int allowed; /* against res_patterns */
};

static char *res_patterns[] = {"https://management.azure.com/", "https://*.vault.azure.net",
                               "api://my-api", "https://*.blob.core.windows.net/"};

static const struct res_row res_rows[] = {
    {"exact, the pattern's trailing slash", "https://management.azure.com/", 1},
    {"exact without the trailing slash", "https://management.azure.com", 1},
    {"case ignored", "HTTPS://Management.Azure.com/", 1},
    {"two trailing slashes are a difference", "https://management.azure.com//", 0},
    {"a path is a difference", "https://management.azure.com/x", 0},
    {"a prefix is not a match", "https://management.azure.co", 0},
    {"wildcard: one label", "https://myvault.vault.azure.net", 1},
    {"wildcard: with a trailing slash", "https://myvault.vault.azure.net/", 1},
    {"wildcard: not zero characters", "https://.vault.azure.net", 0},
    {"wildcard: not the bare domain", "https://vault.azure.net", 0},
    {"wildcard: not two labels", "https://a.b.vault.azure.net", 0},
    {"wildcard: not a path", "https://evil.com/x.vault.azure.net", 0},
    {"wildcard: not a look-alike suffix", "https://myvault.vault.azure.net.evil.com", 0},
    {"wildcard: not a query", "https://a?.vault.azure.net", 0},
    {"an app id URI", "api://my-api", 1},
    {"an app id URI with a slash", "api://my-api/", 1},
    {"something else", "https://graph.microsoft.com/", 0},
    {"second wildcard pattern, trailing slash on the pattern", "https://acct.blob.core.windows.net",
     1},
    {"empty", "", 0},
};

static void t_res(void **state)
{
    const struct res_row *r = *state;
    size_t n = strlen(r->resource);
    const char *copy = tcopy(r->resource, n);
    assert_int_equal(imds_resource_allowed(copy, n, res_patterns, 4), r->allowed);
    assert_int_equal(imds_resource_allowed(copy, n, res_patterns, 0), 1); /* none: all */
}

struct pat_row {
    const char *name;
    const char *pattern;
    int ok;
};

static const struct pat_row pat_rows[] = {
    {"plain", "https://vault.azure.net", 1},
    {"wildcard in the host", "https://*.vault.azure.net", 1},
    {"an app id URI", "api://00000000-0000-0000-0000-000000000001", 1},
    {"two wildcards", "https://*.*.azure.net", 0},
    {"wildcard in the path", "https://vault.azure.net/*", 0},
    {"wildcard without a scheme", "*.vault.azure.net", 0},
    {"a space", "https://vault azure.net", 0},
    {"a control character", "https://vault\x01.azure.net", 0},
    {"empty", "", 0},
};

static void t_pat(void **state)
{
    const struct pat_row *r = *state;
    assert_int_equal(imds_resource_pattern_ok(r->pattern), r->ok);
}

static void t_appsvc_render(void **state)
{
    (void)state;
    struct token tok = {.access_token = "at",
                        .len = 2,
                        .expires_on = 2000003600,
                        .ext_expires_on = 2000003600,
                        .not_before = 2000000000};
    struct buf b;
    buf_init(&b, 1 << 16);
    assert_int_equal(imds_render_appservice_token(&b, &tok, DEF, "https://vault.azure.net", 23), 0);
    assert_string_equal(b.data,
                        "{\"access_token\":\"at\",\"client_id\":\"" DEF "\","
                        "\"expires_on\":\"2000003600\",\"not_before\":\"2000000000\","
                        "\"resource\":\"https://vault.azure.net\",\"token_type\":\"Bearer\"}");
    buf_reset(&b); /* 2017-09-01: 2000003600 is 2033-05-18 04:33:20 UTC */
    assert_int_equal(imds_render_msi2017_token(&b, &tok, DEF, "r", 1, 0), 0);
    assert_string_equal(b.data, "{\"access_token\":\"at\",\"client_id\":\"" DEF "\","
                                "\"expires_on\":\"05/18/2033 04:33:20 +00:00\","
                                "\"resource\":\"r\",\"token_type\":\"Bearer\"}");
    buf_reset(&b);
    assert_int_equal(imds_render_msi2017_token(&b, &tok, DEF, "r", 1, 1), 0);
    assert_string_equal(b.data, "{\"access_token\":\"at\",\"client_id\":\"" DEF "\","
                                "\"expires_on\":\"2000003600\",\"resource\":\"r\","
                                "\"token_type\":\"Bearer\"}");
    buf_reset(&b);
    struct imds_error e = {401, "unauthorized_client", "X-IDENTITY-HEADER is not valid", 0};
    assert_int_equal(imds_render_appservice_error(&b, &e), 0);
    assert_string_equal(b.data, "{\"error\":\"unauthorized_client\",\"error_description\":"
                                "\"X-IDENTITY-HEADER is not valid\",\"statusCode\":401,"
                                "\"message\":\"X-IDENTITY-HEADER is not valid\"}");
    buf_free(&b);
}

static void t_check(void **state)
{
    const struct check_row *r = *state;
    struct imds_input in = {.is_get = r->is_get, .has_metadata_true = r->md, .has_xff = r->xff};
    if (r->query) {
        in.query_len = strlen(r->query);
        in.query = tcopy(r->query, in.query_len); /* not NUL-terminated on purpose */
    }
    struct query *q = tmalloc(sizeof *q);
    struct imds_token_req out = {0};
    struct imds_error err = {0, NULL, NULL, -1};
    int rc = imds_check_token_request(&in, r->ids, q, &out, &err);
    if (r->status == 0) {
        if (rc != 0)
            print_error("unexpected error %d %s: %s\n", err.status, err.error, err.description);
        assert_int_equal(rc, 0);
        assert_int_equal(out.resource_len, strlen(r->resource));
        assert_memory_equal(out.resource, r->resource, out.resource_len);
        assert_non_null(out.client_id);
        assert_string_equal(out.client_id, r->client_id);
    } else {
        assert_int_equal(rc, -1);
        assert_int_equal(err.status, r->status);
        assert_non_null(err.error);
        assert_string_equal(err.error, r->error);
        assert_non_null(err.description);
        assert_true(err.description[0] != 0);
        if (r->desc)
            assert_string_equal(err.description, r->desc);
        if (r->desc_in && !strstr(err.description, r->desc_in)) {
            print_error("description '%s' lacks '%s'\n", err.description, r->desc_in);
            fail();
        }
        assert_int_equal(err.retry_after, 0); /* never Retry-After on a 4xx (T13) */
    }
}

/* ---- Host (DNS rebinding) and request bodies ------------------------------------------------- */

struct host_row {
    const char *name;
    const char *host; /* NULL: no Host header */
    int allowed;
};

static char *const extra_hosts[] = {"imdsd", "imds.example.internal"};

static const struct host_row host_rows[] = {
    {"no Host", NULL, 1},
    {"empty Host", "", 1},
    {"IPv4 with port", "127.0.0.1:8000", 1},
    {"IPv4 without port", "169.254.169.254", 1},
    {"pod IP", "10.244.1.17:8001", 1},
    {"IPv4 short form", "127.1:8000", 1},
    {"IPv6 with port", "[::1]:8000", 1},
    {"IPv6 without port", "[fe80::1]", 1},
    {"localhost", "localhost", 1},
    {"localhost with port", "localhost:8000", 1},
    {"LOCALHOST", "LocalHost:8000", 1},
    {"localhost.", "localhost.:8000", 1},
    {"allowed name", "imdsd:8000", 1},
    {"allowed name, other case", "IMDS.example.Internal", 1},
    {"rebinding name", "attacker.example:8000", 0},
    {"name ending in localhost", "evil-localhost:8000", 0},
    {"subdomain of localhost", "a.localhost:8000", 0},
    {"suffix of an allowed name", "x.imdsd:8000", 0},
    {"IPv6 without brackets", "::1", 0},
    {"IPv6 unterminated", "[::1:8000", 0},
    {"IPv6 junk after bracket", "[::1]x", 0},
    {"IPv6 invalid", "[localhost]:8000", 0},
    {"port not digits", "localhost:80a", 0},
    {"port empty", "localhost:", 0},
    {"port too long", "localhost:123456", 0},
    {"NUL inside", "localhost\0.evil", 0},
};

static void t_host(void **state)
{
    const struct host_row *r = *state;
    size_t n = r->host ? strlen(r->host) : 0;
    if (r->host && strstr(r->name, "NUL"))
        n = sizeof "localhost\0.evil" - 1;
    const char *h = r->host ? tcopy(r->host, n) : NULL; /* not NUL-terminated on purpose */
    assert_int_equal(imds_host_allowed(h, n, extra_hosts, 2), r->allowed);
}

static void t_host_too_long(void **state)
{
    (void)state;
    char *h = tmalloc(IMDS_MAX_HOST + 1);
    memset(h, '1', IMDS_MAX_HOST + 1);
    assert_int_equal(imds_host_allowed(h, IMDS_MAX_HOST + 1, NULL, 0), 0);
}

struct order_row {
    const char *name;
    const char *host;
    int body, md, xff;
    int status;
    const char *error;
};

static const struct order_row order_rows[] = {
    {"rebinding Host -> 403 before the Metadata check", "evil.example", 0, 0, 0, 403, "forbidden"},
    {"rebinding Host with Metadata -> 403", "evil.example:8000", 0, 1, 0, 403, "forbidden"},
    {"GET with a body -> 400", "127.0.0.1:8000", 1, 1, 0, 400, "invalid_request"},
    {"GET with a body, no Metadata -> 400 for the body", "localhost", 1, 0, 0, 400,
     "invalid_request"},
    {"localhost, Metadata -> 200", "localhost:8000", 0, 1, 0, 0, NULL},
};

static void t_order(void **state)
{
    const struct order_row *r = *state;
    struct imds_input in = {.is_get = 1,
                            .has_metadata_true = r->md,
                            .has_xff = r->xff,
                            .has_body = r->body,
                            .host = r->host,
                            .host_len = strlen(r->host),
                            .query = OK_Q,
                            .query_len = strlen(OK_Q)};
    struct query *q = tmalloc(sizeof *q);
    struct imds_token_req out = {0};
    struct imds_error err = {0, NULL, NULL, -1};
    int rc = imds_check_token_request(&in, &ids_default, q, &out, &err);
    if (!r->status) {
        assert_int_equal(rc, 0);
        return;
    }
    assert_int_equal(rc, -1);
    assert_int_equal(err.status, r->status);
    assert_string_equal(err.error, r->error);
    assert_null(strstr(err.description, "unreachable")); /* the JS SDK's Docker Desktop test */
    /* the App Service protocol applies the same checks */
    struct imds_secret one = {"s", 1};
    rc = imds_check_appservice_request(&in, &ids_default, &one, 1, q, &out, &err);
    assert_int_equal(rc, -1);
    assert_int_equal(err.status, r->status);
}

#ifdef IMDS_MAX_RESOURCE
/* A resource of n decoded bytes ("a" * n) must be accepted up to IMDS_MAX_RESOURCE. */
static void check_resource_len(size_t n, int want_status)
{
    size_t prefix = strlen(API "&resource=");
    char *query = tmalloc(prefix + n);
    memcpy(query, API "&resource=", prefix);
    memset(query + prefix, 'a', n);
    struct imds_input in = {
        .is_get = 1, .has_metadata_true = 1, .query = query, .query_len = prefix + n};
    struct query *q = tmalloc(sizeof *q);
    struct imds_token_req out = {0};
    struct imds_error err = {0, NULL, NULL, -1};
    int rc = imds_check_token_request(&in, &ids_default, q, &out, &err);
    if (want_status == 0) {
        assert_int_equal(rc, 0);
        assert_int_equal(out.resource_len, n);
    } else {
        assert_int_equal(rc, -1);
        assert_int_equal(err.status, want_status);
        assert_string_equal(err.error, "invalid_request");
        assert_int_equal(err.retry_after, 0);
    }
}

static void t_resource_at_limit(void **state)
{
    (void)state;
    check_resource_len(IMDS_MAX_RESOURCE, 0);
}

static void t_resource_over_limit(void **state)
{
    (void)state;
    check_resource_len(IMDS_MAX_RESOURCE + 1, 400);
}
#endif

/* ---- imds_api_version_ok / imds_is_guid ------------------------------------------------------ */

struct str_bool_row {
    const char *name;
    const char *in;
    int want;
};

static const struct str_bool_row api_rows[] = {
    {"2018-02-01", "2018-02-01", 1},
    {"2019-08-01", "2019-08-01", 1},
    {"2023-07-01", "2023-07-01", 1},
    {"2020-02-29 leap day", "2020-02-29", 1},
    {"2018-12-31", "2018-12-31", 1},
    {"9999-12-31", "9999-12-31", 1},
    {"2018-01-31 too old", "2018-01-31", 0},
    {"2017-12-31 too old", "2017-12-31", 0},
    {"2018-02-30", "2018-02-30", 0},
    {"2019-02-29 not a leap year", "2019-02-29", 0},
    {"2018-04-31", "2018-04-31", 0},
    {"2018-13-01", "2018-13-01", 0},
    {"2018-00-10", "2018-00-10", 0},
    {"2018-02-00", "2018-02-00", 0},
    {"latest", "latest", 0},
    {"2018-2-1", "2018-2-1", 0},
    {"empty", "", 0},
    {"trailing space", "2018-02-01 ", 0},
    {"leading space", " 2018-02-01", 0},
    {"slashes", "2018/02/01", 0},
    {"plus sign", "+018-02-01", 0},
    {"minus in month", "2018--2-01", 0},
    {"suffix", "2018-02-01-preview", 0},
    {"letters", "2O18-02-01", 0},
};

static void t_api(void **state)
{
    const struct str_bool_row *r = *state;
    assert_int_equal(!!imds_api_version_ok(r->in), r->want);
}

static const struct str_bool_row guid_rows[] = {
    {"lower case", "0a1b2c3d-0000-4000-8000-00000000000a", 1},
    {"upper case", "0A1B2C3D-ABCD-4EF0-8000-00000000000A", 1},
    {"35 chars", "0a1b2c3d-0000-4000-8000-00000000000", 0},
    {"37 chars", "0a1b2c3d-0000-4000-8000-00000000000aa", 0},
    {"no dashes", "0a1b2c3d00004000800000000000000a", 0},
    {"dash moved", "0a1b2c3-d0000-4000-8000-00000000000a", 0},
    {"non-hex", "0g1b2c3d-0000-4000-8000-00000000000a", 0},
    {"braces", "{0a1b2c3d-0000-4000-8000-00000000000a}", 0},
    {"empty", "", 0},
    {"all dashes", "------------------------------------", 0},
};

static void t_guid(void **state)
{
    const struct str_bool_row *r = *state;
    assert_int_equal(!!imds_is_guid(r->in), r->want);
}

/* ---- imds_render_token ------------------------------------------------------------------------
 */

#define EXP 1700003600
#define NBF 1700000000

/* Renders the token body into *bp and parses it back. */
static struct json_obj *render_and_parse(struct buf **bp, const char *access_token,
                                         int64_t ext_expires_on, const char *resource,
                                         size_t resource_len, int64_t now)
{
    size_t alen = strlen(access_token);
    struct token tok = {.access_token = tcopy(access_token, alen),
                        .len = alen,
                        .expires_on = EXP,
                        .ext_expires_on = ext_expires_on,
                        .not_before = NBF,
                        .refresh_in = 43199};
    struct buf *b = *bp = tbuf(1 << 16);
    assert_int_equal(
        imds_render_token(b, &tok, DEF, tcopy(resource, resource_len), resource_len, now), 0);
    int rc;
    struct json_obj *o = tparse(b->data, b->len, &rc);
    assert_int_equal(rc, 0);
    return o;
}

/* The member's value, which must be a JSON string; freed by the teardown. */
static char *get_str(const struct json_obj *o, const char *key)
{
    char *s = NULL;
    int rc = json_get_string(o, key, &s);
    if (rc != 0)
        print_error("member '%s': json_get_string -> %d (not a JSON string?)\n", key, rc);
    assert_int_equal(rc, 0);
    return defer(free, s);
}

static int64_t get_str_int(const struct json_obj *o, const char *key)
{
    char *s = get_str(o, key);
    char *end;
    long long v = strtoll(s, &end, 10);
    assert_true(*s && *end == 0); /* a decimal integer, no float, no date */
    assert_true(s[0] != '+' && s[0] != ' ');
    return v;
}

static void t_render_fields(void **state)
{
    (void)state;
    struct buf *b;
    const char *res = "https://management.azure.com/";
    struct json_obj *o =
        render_and_parse(&b, "eyJ0eXAi.eyJhdWQi.sig", EXP + 100, res, strlen(res), NBF + 1);
    assert_string_equal(get_str(o, "access_token"), "eyJ0eXAi.eyJhdWQi.sig");
    assert_string_equal(get_str(o, "client_id"), DEF);
    assert_string_equal(get_str(o, "resource"), res);
    assert_string_equal(get_str(o, "token_type"), "Bearer");
    assert_true(get_str_int(o, "expires_in") == EXP - (NBF + 1));
    assert_true(get_str_int(o, "expires_on") == EXP);
    assert_true(get_str_int(o, "ext_expires_in") == EXP + 100 - (NBF + 1));
    assert_true(get_str_int(o, "not_before") == NBF);
    /* T12: never refresh_in / refresh_on, even though the token has a refresh hint */
    char *s;
    assert_int_equal(json_get_string(o, "refresh_in", &s), -1);
    assert_int_equal(json_get_string(o, "refresh_on", &s), -1);
}

struct countdown_row {
    const char *name;
    int64_t now;
    int64_t expires_in;
};

static const struct countdown_row countdown_rows[] = {
    {"at issue", NBF, 3600},         {"one second later", NBF + 1, 3599},
    {"half-life", NBF + 1800, 1800}, {"last second", EXP - 1, 1},
    {"at expiry", EXP, 0},           {"after expiry never negative", EXP + 500, 0},
};

static void t_countdown(void **state)
{
    const struct countdown_row *r = *state;
    struct buf *b;
    struct json_obj *o = render_and_parse(&b, "tok", EXP, "r", 1, r->now);
    int64_t in = get_str_int(o, "expires_in");
    int64_t on = get_str_int(o, "expires_on");
    int64_t ext = get_str_int(o, "ext_expires_in");
    assert_true(in == r->expires_in);
    assert_true(on == EXP);
    assert_true(in >= 0 && ext >= in);
    if (r->now <= EXP)
        assert_true(on - r->now == in); /* consistent (T1) */
}

struct resource_row {
    const char *name;
    const char *resource;
    size_t len; /* 0 = strlen */
};

static const struct resource_row resource_rows[] = {
    {"trailing slash kept", "https://management.azure.com/", 0},
    {"bare GUID", "00000003-0000-0000-c000-000000000000", 0},
    {"api:// id", "api://5e6f7a8b-1111-4111-8111-11111111111b", 0},
    {"double quote", "a\"b", 0},
    {"backslash", "a\\b", 0},
    {"control characters", "a\x01\x1f\n\r\tb", 0},
    {"DEL", "a\x7f", 0},
    {"UTF-8", "https://\xC3\xA9.example/\xE2\x9C\x93\xF0\x9F\x98\x80", 0},
    {"JSON-looking text", "\",\"resource\":\"evil", 0},
    {"len honoured", "abcdef", 3},
};

static void t_render_resource(void **state)
{
    const struct resource_row *r = *state;
    size_t len = r->len ? r->len : strlen(r->resource);
    struct buf *b;
    struct json_obj *o = render_and_parse(&b, "tok", EXP, r->resource, len, NBF);
    for (size_t i = 0; i < b->len; i++)
        assert_true((unsigned char)b->data[i] >= 0x20 && b->data[i] != 0x7f);
    char *s = get_str(o, "resource");
    assert_int_equal(strlen(s), len);
    assert_memory_equal(s, r->resource, len);
    /* an injected member must not shadow the real ones */
    assert_string_equal(get_str(o, "token_type"), "Bearer");
}

/* ---- imds_render_error ----------------------------------------------------------------------- */

struct err_render_row {
    const char *name;
    const char *error;
    const char *desc;
};

static const struct err_render_row err_render_rows[] = {
    {"plain", "invalid_request", MD_MISSING},
    {"resource missing text", "invalid_request", RES_MISSING},
    {"quotes and backslash", "invalid_request", "bad \"value\" in C:\\path"},
    {"control characters", "server_error", "line1\r\nline2\t\x01"},
    {"UTF-8", "invalid_resource", "AADSTS500011: resource '\xE2\x9C\x93' not found"},
};

static void t_render_error(void **state)
{
    const struct err_render_row *r = *state;
    struct imds_error e = {400, r->error, r->desc, 0};
    struct buf *b = tbuf(4096);
    assert_int_equal(imds_render_error(b, &e), 0);
    for (size_t i = 0; i < b->len; i++)
        assert_true((unsigned char)b->data[i] >= 0x20);
    int rc;
    struct json_obj *o = tparse(b->data, b->len, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(o->ntok, 5); /* exactly two members */
    assert_string_equal(get_str(o, "error"), r->error);
    assert_string_equal(get_str(o, "error_description"), r->desc);
}

/* ---- imds_error_from_entra ---------------------------------------------------------------------
 */

struct map_row {
    const char *name;
    enum entra_kind kind;
    const char *error, *desc;
    int retry_after_in;
    int status;
    const char *want_error; /* NULL = do not check the code */
    int retry_after;        /* -1 = any positive value */
};

static const struct map_row map_rows[] = {
    {"permanent -> 400 with Entra's code and text", ENTRA_PERMANENT, "unauthorized_client",
     "AADSTS700016: Application not found", 0, 400, "unauthorized_client", 0},
    {"permanent with a Retry-After -> 400 without one", ENTRA_PERMANENT, "invalid_resource",
     "AADSTS500011: not found", 30, 400, "invalid_resource", 0},
    {"throttled -> 429 with its Retry-After", ENTRA_THROTTLED, "too_many_requests", "slow down",
     120, 429, "too_many_requests", 120},
    {"throttled without Retry-After -> 429 with one", ENTRA_THROTTLED, "too_many_requests",
     "slow down", 0, 429, "too_many_requests", -1},
    {"transient -> 503", ENTRA_TRANSIENT, "service_unavailable", "Entra answered HTTP 503", 0, 503,
     NULL, 0},
    {"transient AADSTS70021 -> 503, not 400", ENTRA_TRANSIENT, "invalid_request",
     "AADSTS70021: No matching federated identity record found", 0, 503, NULL, 0},
    {"transient without text -> 503 with text", ENTRA_TRANSIENT, "", "", 0, 503, NULL, 0},
};

static void t_map(void **state)
{
    const struct map_row *r = *state;
    struct entra_result er;
    memset(&er, 0, sizeof er);
    er.kind = r->kind;
    er.retry_after = r->retry_after_in;
    snprintf(er.error, sizeof er.error, "%s", r->error);
    snprintf(er.description, sizeof er.description, "%s", r->desc);
    struct imds_error e = {0, NULL, NULL, -7};
    imds_error_from_entra(&er, &e);
    assert_int_equal(e.status, r->status);
    assert_non_null(e.error);
    assert_true(e.error[0] != 0);
    assert_non_null(e.description);
    assert_true(e.description[0] != 0);
    if (r->want_error)
        assert_string_equal(e.error, r->want_error);
    if (r->kind == ENTRA_PERMANENT)
        assert_string_equal(e.description, r->desc);
    if (r->retry_after < 0)
        assert_true(e.retry_after > 0);
    else if (r->status != 503)
        assert_int_equal(e.retry_after, r->retry_after);
    else
        assert_true(e.retry_after >= 0);
}

/* From Entra's HTTP answer to the IMDS answer, through both modules. */
struct e2e_row {
    const char *name;
    int http;
    const char *body;
    const char *retry_after;
    int status;
    const char *error;
    const char *desc;
    int retry;
};

static const struct e2e_row e2e_rows[] = {
    {"400 AADSTS700016 -> 400 passthrough", 400,
     "{\"error\":\"unauthorized_client\",\"error_description\":\"AADSTS700016: Application with "
     "identifier 'x' was not found in the directory 'y'.\\r\\nTrace ID: 1\\r\\nCorrelation ID: "
     "2\",\"error_codes\":[700016]}",
     NULL, 400, "unauthorized_client",
     "AADSTS700016: Application with identifier 'x' was not found in the directory 'y'.", 0},
    {"401 AADSTS700024 -> 503", 401,
     "{\"error\":\"invalid_client\",\"error_description\":\"AADSTS700024: Client assertion is not "
     "within its valid time range.\",\"error_codes\":[700024]}",
     NULL, 503, NULL, NULL, 0},
    {"429 without Retry-After -> 429 Retry-After 60", 429, "", NULL, 429, "too_many_requests", NULL,
     60},
    {"429 Retry-After 7200 -> 429 Retry-After 3600", 429, "{}", "7200", 429, "too_many_requests",
     NULL, 3600},
    {"500 -> 503", 500, "oops", NULL, 503, NULL, NULL, 0},
};

static void t_e2e(void **state)
{
    const struct e2e_row *r = *state;
    struct entra_result *er = calloc(1, sizeof *er);
    if (!er)
        abort();
    defer(entra_release, er);
    size_t len = strlen(r->body);
    entra_parse_response(er, r->http, tcopy(r->body, len), len, r->retry_after);
    struct imds_error e;
    imds_error_from_entra(er, &e);
    assert_int_equal(e.status, r->status);
    if (r->error)
        assert_string_equal(e.error, r->error);
    if (r->desc)
        assert_string_equal(e.description, r->desc);
    if (r->status != 503)
        assert_int_equal(e.retry_after, r->retry);
    struct buf *b = tbuf(4096);
    assert_int_equal(imds_render_error(b, &e), 0);
    int rc;
    struct json_obj *o = tparse(b->data, b->len, &rc);
    assert_int_equal(rc, 0);
    assert_string_equal(get_str(o, "error"), e.error);
    assert_null(strstr(get_str(o, "error_description"), "Trace ID"));
}

int main(void)
{
    ADD_ROWS("endpoints_route", route_rows, t_route);
    ADD_ROWS("imds_check_token_request", check_rows, t_check);
#ifdef IMDS_MAX_RESOURCE
    add("imds_check_token_request", "resource of IMDS_MAX_RESOURCE bytes", t_resource_at_limit,
        NULL);
    add("imds_check_token_request", "resource over IMDS_MAX_RESOURCE -> 400", t_resource_over_limit,
        NULL);
#endif
    ADD_ROWS("imds_check_appservice_request", appsvc_rows, t_appsvc);
    ADD_ROWS("imds_host_allowed", host_rows, t_host);
    ADD_ROWS("imds_resource_allowed", res_rows, t_res);
    ADD_ROWS("imds_check_cloudshell_request", cs_rows, t_cs);
    ADD_ROWS("imds_resource_pattern_ok", pat_rows, t_pat);
    add("imds_host_allowed", "Host over IMDS_MAX_HOST", t_host_too_long, NULL);
    ADD_ROWS("token request check order", order_rows, t_order);
    add("imds_render_appservice", "token and error shapes", t_appsvc_render, NULL);
    ADD_ROWS("imds_api_version_ok", api_rows, t_api);
    ADD_ROWS("imds_is_guid", guid_rows, t_guid);
    add("imds_render_token", "every field a JSON string with the right value", t_render_fields,
        NULL);
    ADD_ROWS("imds_render_token countdown", countdown_rows, t_countdown);
    ADD_ROWS("imds_render_token resource echoed", resource_rows, t_render_resource);
    ADD_ROWS("imds_render_error", err_render_rows, t_render_error);
    ADD_ROWS("imds_error_from_entra", map_rows, t_map);
    ADD_ROWS("entra -> imds error", e2e_rows, t_e2e);
    return _cmocka_run_group_tests("imds", tests, ntests, NULL, NULL);
}

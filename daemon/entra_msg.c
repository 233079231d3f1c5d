#include "entra_msg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "form.h"
#include "json.h"
#include "util.h"

static const char DEFAULT_SUFFIX[] = "/.default";

int entra_scope(struct buf *b, const char *resource)
{
    size_t n = strlen(resource), s = sizeof DEFAULT_SUFFIX - 1;
    if (buf_append(b, resource, n) < 0)
        return -1;
    if (n >= s && strcmp(resource + n - s, DEFAULT_SUFFIX) == 0)
        return 0;
    return buf_append(b, DEFAULT_SUFFIX, s);
}

int entra_build_form(struct buf *b, const char *client_id, const char *resource,
                     const char *assertion, size_t assertion_len)
{
    static const char assertion_type[] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    static const char grant[] = "client_credentials";
    struct buf scope;
    buf_init(&scope, 8192);
    int rc = entra_scope(&scope, resource);
    if (rc == 0)
        rc = form_add(b, "client_id", client_id, strlen(client_id)) |
             form_add(b, "scope", scope.data, scope.len) |
             form_add(b, "grant_type", grant, sizeof grant - 1) |
             form_add(b, "client_assertion_type", assertion_type, sizeof assertion_type - 1) |
             form_add(b, "client_assertion", assertion, assertion_len);
    buf_free(&scope);
    return rc ? -1 : 0;
}

int entra_code_is_transient(int64_t aadsts)
{
    switch (aadsts) {
    case 70021:  /* no matching federated identity record: also seen for minutes after creation */
    case 700024: /* assertion outside its validity window: re-read the token file */
    case 90024:  /* RequestBudgetExceeded */
    case 90055:  /* TenantThrottling */
    case 90006:  /* ExternalServerRetryable */
    case 90061:  /* request to the external OIDC endpoint (cluster issuer) failed */
    case 50166:  /* same, AKS wording */
        return 1;
    default:
        return 0;
    }
}

static void set_error(struct entra_result *r, enum entra_kind kind, const char *error,
                      const char *desc)
{
    r->kind = kind;
    snprintf(r->error, sizeof r->error, "%s", error);
    snprintf(r->description, sizeof r->description, "%s", desc);
}

/* Copies the first line of d, keeping only printable ASCII, and bounded. */
static void first_line(char *out, size_t n, const char *d)
{
    size_t o = 0;
    for (; *d && *d != '\r' && *d != '\n' && o + 1 < n; d++)
        out[o++] = ((unsigned char)*d >= 0x20 && (unsigned char)*d < 0x7f) ? *d : '?';
    out[o] = 0;
}

static int valid_error_code(const char *e)
{
    if (!*e || strlen(e) >= 64)
        return 0;
    for (; *e; e++)
        if (!((*e >= 'a' && *e <= 'z') || *e == '_'))
            return 0;
    return 1;
}

static void parse_ok(struct entra_result *r, const struct json_obj *o)
{
    char *tok = NULL, *type = NULL;
    int64_t exp;
    if (json_get_string(o, "access_token", &tok) < 0 || !*tok ||
        strlen(tok) > ENTRA_MAX_TOKEN_BYTES) {
        set_error(r, ENTRA_TRANSIENT, "server_error",
                  "Entra's token response has no usable access_token");
        goto out;
    }
    int has_type = json_get_string(o, "token_type", &type);
    if (has_type == -2 || (has_type == 0 && strcasecmp(type, "Bearer") != 0)) {
        set_error(r, ENTRA_TRANSIENT, "server_error",
                  "Entra's token response is not a Bearer token");
        goto out;
    }
    if (json_get_int(o, "expires_in", &exp) < 0 || exp <= 0 || exp > ENTRA_MAX_LIFETIME_S) {
        set_error(r, ENTRA_TRANSIENT, "server_error",
                  "Entra's token response has no valid expires_in");
        goto out;
    }
    r->kind = ENTRA_OK;
    r->access_token = tok;
    r->token_len = strlen(tok);
    tok = NULL;
    r->expires_in = exp;
    if (json_get_int(o, "ext_expires_in", &r->ext_expires_in) < 0 || r->ext_expires_in < exp ||
        r->ext_expires_in > ENTRA_MAX_LIFETIME_S)
        r->ext_expires_in = exp;
    if (json_get_int(o, "refresh_in", &r->refresh_in) < 0 || r->refresh_in <= 0 ||
        r->refresh_in >= exp)
        r->refresh_in = 0;
out:
    secret_free_str(tok);
    free(type);
}

static int64_t code_from_description(const char *d)
{
    const char *p = strstr(d, "AADSTS");
    if (!p)
        return 0;
    return strtoll(p + 6, NULL, 10);
}

void entra_parse_response(struct entra_result *r, int http_status, const char *body, size_t len,
                          const char *retry_after)
{
    memset(r, 0, sizeof *r);
    r->http_status = http_status;
    if (retry_after) {
        long ra = strtol(retry_after, NULL, 10);
        r->retry_after = ra > 0 ? (ra > 3600 ? 3600 : (int)ra) : 0;
    }
    struct json_obj o;
    int have_json = json_parse_object(&o, body, len) == 0;

    if (http_status == 200) {
        if (have_json)
            parse_ok(r, &o);
        else
            set_error(r, ENTRA_TRANSIENT, "server_error", "Entra's token response is not JSON");
    } else if (http_status == 429) {
        set_error(r, ENTRA_THROTTLED, "too_many_requests", "Entra is throttling token requests");
        if (!r->retry_after)
            r->retry_after = 60;
        if (have_json)
            json_get_first_int(&o, "error_codes", &r->aadsts);
    } else if (http_status >= 400 && http_status < 500 && have_json) {
        char *err = NULL, *desc = NULL;
        json_get_string(&o, "error", &err);
        json_get_string(&o, "error_description", &desc);
        if (json_get_first_int(&o, "error_codes", &r->aadsts) < 0 && desc)
            r->aadsts = code_from_description(desc);
        if (err && valid_error_code(err) && r->aadsts > 0) {
            r->kind = entra_code_is_transient(r->aadsts) ? ENTRA_TRANSIENT : ENTRA_PERMANENT;
            snprintf(r->error, sizeof r->error, "%s", err);
            if (desc)
                first_line(r->description, sizeof r->description, desc);
            if (!strstr(r->description, "AADSTS"))
                snprintf(r->description, sizeof r->description, "AADSTS%lld", (long long)r->aadsts);
        } else {
            set_error(r, ENTRA_TRANSIENT, "server_error",
                      "Entra answered an unexpected error without an AADSTS code");
        }
        free(err);
        free(desc);
    } else {
        char d[96];
        snprintf(d, sizeof d, "Entra answered HTTP %d", http_status);
        set_error(r, ENTRA_TRANSIENT, "service_unavailable", d);
    }
    if (have_json)
        json_obj_free(&o);
}

void entra_result_free(struct entra_result *r)
{
    secret_free_str(r->access_token);
    r->access_token = NULL;
    r->token_len = 0;
}

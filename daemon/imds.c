#include "imds.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "json.h"

int imds_path_normalize(const char *path, size_t len, char *out, size_t size)
{
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (path[i] == '/' && o > 0 && out[o - 1] == '/')
            continue;
        if (o + 1 >= size)
            return -1;
        out[o++] = (char)tolower((unsigned char)path[i]);
    }
    if (o > 1 && out[o - 1] == '/')
        o--;
    out[o] = 0;
    return 0;
}

/* Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const char *p, size_t n)
{
    const unsigned char *s = (const unsigned char *)p, *end = s + n;
    while (s < end) {
        unsigned c = *s++;
        if (c < 0x80)
            continue;
        int more = c >= 0xc2 && c <= 0xdf   ? 1
                   : c >= 0xe0 && c <= 0xef ? 2
                   : c >= 0xf0 && c <= 0xf4 ? 3
                                            : -1;
        if (more < 0 || end - s < more)
            return 0;
        unsigned lo = 0x80, hi = 0xbf; /* the second byte's range */
        if (c == 0xe0)
            lo = 0xa0; /* overlong */
        else if (c == 0xed)
            hi = 0x9f; /* surrogates */
        else if (c == 0xf0)
            lo = 0x90; /* overlong */
        else if (c == 0xf4)
            hi = 0x8f; /* above U+10FFFF */
        if (s[0] < lo || s[0] > hi)
            return 0;
        for (int i = 1; i < more; i++)
            if (s[i] < 0x80 || s[i] > 0xbf)
                return 0;
        s += more;
    }
    return 1;
}

static int fail(struct imds_error *err, int status, const char *code, const char *desc)
{
    err->status = status;
    err->error = code;
    err->description = desc;
    err->retry_after = 0;
    return -1;
}

int imds_is_guid(const char *s)
{
    static const int dash[] = {8, 13, 18, 23};
    if (strlen(s) != 36)
        return 0;
    for (int i = 0, d = 0; i < 36; i++) {
        if (d < 4 && i == dash[d]) {
            if (s[i] != '-')
                return 0;
            d++;
        } else if (!isxdigit((unsigned char)s[i])) {
            return 0;
        }
    }
    return 1;
}

int imds_api_version_ok(const char *v)
{
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    for (int i = 0; i < 10; i++)
        if (!v[i] || (i == 4 || i == 7 ? v[i] != '-' : !isdigit((unsigned char)v[i])))
            return 0;
    if (v[10])
        return 0;
    int y = (v[0] - '0') * 1000 + (v[1] - '0') * 100 + (v[2] - '0') * 10 + (v[3] - '0');
    int m = (v[5] - '0') * 10 + (v[6] - '0'), d = (v[8] - '0') * 10 + (v[9] - '0');
    if (m < 1 || m > 12 || d < 1 || d > mdays[m - 1])
        return 0;
    if (m == 2 && d == 29 && !(y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)))
        return 0;
    return y * 10000 + m * 100 + d >= 20180201;
}

/* The served client id equal (ignoring case) to id, or NULL. */
static const char *served(const struct imds_identities *ids, const char *id)
{
    if (ids->default_client_id && strcasecmp(ids->default_client_id, id) == 0)
        return ids->default_client_id;
    for (int i = 0; i < ids->nallowed; i++)
        if (strcasecmp(ids->allowed[i], id) == 0)
            return ids->allowed[i];
    return NULL;
}

static const char *alias(const struct imds_identities *ids, const char *key)
{
    for (int i = 0; i < ids->naliases; i++)
        if (strcasecmp(ids->aliases[i].key, key) == 0)
            return served(ids, ids->aliases[i].client_id);
    return NULL;
}

const char *imds_resolve_identity(const struct imds_identities *ids, const char *id)
{
    const char *s = served(ids, id);
    return s ? s : alias(ids, id);
}

int imds_resource_ok(const char *r, size_t n)
{
    if (n == 0 || n > IMDS_MAX_RESOURCE || !utf8_valid(r, n))
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)r[i] <= ' ' || r[i] == 0x7f)
            return 0;
    return 1;
}

static const char *const selectors[] = {"client_id",  "object_id", "principal_id",
                                        "msi_res_id", "mi_res_id", "msi-res-id"};

static int has_selector(const struct query *q)
{
    for (size_t i = 0; i < sizeof selectors / sizeof selectors[0]; i++) {
        const struct query_param *p = query_get(q, selectors[i]);
        if (p && p->val_len)
            return 1;
    }
    return 0;
}

const char *imds_select_identity(const struct query *q, const struct imds_identities *ids,
                                 int *several)
{
    const struct query_param *sel = NULL;
    *several = 0;
    for (size_t i = 0; i < sizeof selectors / sizeof selectors[0]; i++) {
        const struct query_param *p = query_get(q, selectors[i]);
        if (!p || !p->val_len)
            continue;
        if (sel)
            *several = 1;
        sel = p;
    }
    if (*several)
        return NULL;
    if (!sel)
        return ids->default_client_id;
    if (strcmp(sel->key, "client_id") == 0)
        return served(ids, sel->val);
    return alias(ids, sel->val);
}

/* The checks both protocols share once the caller is authenticated: query, api-version,
 * resource, identity. */
static int check_query(const struct imds_input *in, const struct imds_identities *ids,
                       const char *min_api, int msi2017_ok, struct query *q,
                       struct imds_token_req *out, struct imds_error *err)
{
    const char *params = min_api ? in->query : in->body; /* Cloud Shell: the form body */
    size_t params_len = min_api ? in->query_len : in->body_len;
    switch (query_parse(q, params ? params : "", params ? params_len : 0)) {
    case QUERY_OK:
        break;
    case QUERY_E_DUPLICATE:
        return fail(err, 400, "invalid_request",
                    "Requests with duplicate query parameter names are not allowed");
    case QUERY_E_TOO_MANY:
        return fail(err, 400, "invalid_request", "Too many query parameters");
    default:
        return fail(err, 400, "invalid_request", "Malformed query string");
    }
    const struct query_param *api = query_get(q, "api-version");
    if (min_api && (!api || !api->val_len))
        return fail(err, 400, "invalid_request",
                    "Required query variable 'api-version' is missing");
    int api_ok = !api || imds_api_version_ok(api->val) ||
                 (msi2017_ok && strcmp(api->val, "2017-09-01") == 0);
    if (!api_ok || (min_api && strcmp(api->val, min_api) < 0))
        return fail(err, 400, "invalid_request", "Invalid or unsupported api-version");
    const struct query_param *res = query_get(q, "resource");
    if (!res || !res->val_len)
        return fail(err, 400, "invalid_request", "Required query variable 'resource' is missing");
    if (res->val_len > IMDS_MAX_RESOURCE)
        return fail(err, 400, "invalid_request", "Query variable 'resource' is too long");
    if (!utf8_valid(res->val, res->val_len)) /* it is echoed in the JSON body */
        return fail(err, 400, "invalid_request", "Query variable 'resource' is not valid UTF-8");
    int several;
    const char *selected = imds_select_identity(q, ids, &several);
    out->msi2017 = msi2017_ok && api && strcmp(api->val, "2019-08-01") < 0;
    out->msi2017_epoch = out->msi2017 && in->has_metadata_true;
    const struct query_param *legacy_id = query_get(q, "clientid");
    if (out->msi2017 && legacy_id && legacy_id->val_len) { /* 2017-09-01's name for client_id */
        several = several || has_selector(q);
        selected = served(ids, legacy_id->val);
    }
    if (several)
        return fail(err, 400, "invalid_request",
                    "Identity not found: only one of client_id, object_id, principal_id or "
                    "msi_res_id may be given");
    if (!selected)
        return fail(err, 400, "invalid_request", "Identity not found");
    out->resource = res->val;
    out->resource_len = res->val_len;
    out->client_id = selected;
    return 0;
}

int imds_host_allowed(const char *host, size_t len, char *const *names, int nnames)
{
    char h[IMDS_MAX_HOST + 1];
    if (!host || len == 0)
        return 1; /* no Host (HTTP/1.0): not something a browser sends */
    if (len > IMDS_MAX_HOST || memchr(host, 0, len))
        return 0;
    memcpy(h, host, len);
    h[len] = 0;
    char *end = h + len;
    if (h[0] == '[') { /* [IPv6]:port */
        char *close = strchr(h, ']');
        if (!close || (close[1] && close[1] != ':'))
            return 0;
        end = close + 1;
    } else {
        char *colon = strrchr(h, ':');
        if (colon)
            end = colon;
    }
    if (*end == ':') { /* the port: digits only */
        if (!end[1] || strlen(end + 1) > 5)
            return 0;
        for (const char *p = end + 1; *p; p++)
            if (!isdigit((unsigned char)*p))
                return 0;
    }
    *end = 0;
    unsigned char addr[16];
    struct in_addr a4;
    if (h[0] == '[') {
        end[-1] = 0;
        return inet_pton(AF_INET6, h + 1, addr) == 1;
    }
    if (inet_aton(h, &a4)) /* dotted quad, and the short and numeric forms browsers accept */
        return 1;
    size_t n = strlen(h);
    if (n && h[n - 1] == '.')
        h[--n] = 0; /* the root label */
    if (strcasecmp(h, "localhost") == 0)
        return 1;
    for (int i = 0; i < nnames; i++)
        if (strcasecmp(h, names[i]) == 0)
            return 1;
    return 0;
}

/* The Host check, the same for every protocol. */
static int check_host(const struct imds_input *in, const struct imds_identities *ids,
                      struct imds_error *err)
{
    if (!imds_host_allowed(in->host, in->host_len, ids->allowed_hosts, ids->nallowed_hosts))
        return fail(err, 403, "forbidden",
                    "The Host of a token request must be an IP address, localhost or a name "
                    "allowed with --allow-host (a DNS name pointed at this address could be a "
                    "web page's DNS rebinding)");
    return 0;
}

static int check_xff(const struct imds_input *in, struct imds_error *err)
{
    if (in->has_xff)
        return fail(err, 400, "invalid_request",
                    "Requests with an X-Forwarded-For header are not allowed");
    return 0;
}

/* Checks shared by the GET token protocols, before the caller's authentication. */
static int check_request(const struct imds_input *in, const struct imds_identities *ids,
                         struct imds_error *err)
{
    if (!in->is_get)
        return fail(err, 405, "method_not_allowed", "The requested method is not allowed");
    if (check_host(in, ids, err) < 0)
        return -1;
    if (in->has_body)
        return fail(err, 400, "invalid_request", "A token request must not have a body");
    return check_xff(in, err);
}

int imds_check_cloudshell_request(const struct imds_input *in, const struct imds_identities *ids,
                                  struct query *q, struct imds_token_req *out,
                                  struct imds_error *err)
{
    if (!in->is_post)
        return fail(err, 405, "method_not_allowed", "The requested method is not allowed");
    if (check_host(in, ids, err) < 0 || check_xff(in, err) < 0)
        return -1;
    if (!in->has_metadata_true)
        return fail(err, 400, "invalid_request", "Required metadata header not specified");
    if (!in->form_body)
        return fail(err, 400, "invalid_request",
                    "A POST token request needs an application/x-www-form-urlencoded body");
    return check_query(in, ids, NULL, 0, q, out, err);
}

int imds_check_token_request(const struct imds_input *in, const struct imds_identities *ids,
                             struct query *q, struct imds_token_req *out, struct imds_error *err)
{
    if (check_request(in, ids, err) < 0)
        return -1;
    if (!in->has_metadata_true)
        return fail(err, 400, "invalid_request", "Required metadata header not specified");
    return check_query(in, ids, "2018-02-01", 0, q, out, err);
}

int imds_secret_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    /* runs over b (the configured secret) whatever a is, so time reveals only lengths */
    unsigned char diff = (unsigned char)(alen != blen);
    for (size_t i = 0; i < blen; i++)
        diff |= (unsigned char)(b[i] ^ (i < alen ? a[i] : 0));
    return diff == 0;
}

int imds_check_appservice_request(const struct imds_input *in, const struct imds_identities *ids,
                                  const struct imds_secret *secrets, int n, struct query *q,
                                  struct imds_token_req *out, struct imds_error *err)
{
    if (check_request(in, ids, err) < 0)
        return -1;
    /* X-IDENTITY-HEADER (2019-08-01) wins over `secret` (2017-09-01) when both are sent */
    int legacy = !in->identity_header && in->legacy_secret;
    if (!in->identity_header && !in->legacy_secret)
        return fail(err, 401, "unauthorized_client",
                    "Required header X-IDENTITY-HEADER (or secret, for api-version 2017-09-01) "
                    "is missing");
    const char *given = legacy ? in->legacy_secret : in->identity_header;
    size_t given_len = legacy ? in->legacy_secret_len : in->identity_header_len;
    int match = 0;
    for (int i = 0; i < n; i++) /* every one compared: the time does not tell which matched */
        match |= imds_secret_equal(given, given_len, secrets[i].value, secrets[i].len);
    if (!match)
        return fail(err, 401, "unauthorized_client",
                    legacy ? "The secret header is not valid" : "X-IDENTITY-HEADER is not valid");
    /* `secret` came with 2017-09-01; X-IDENTITY-HEADER with 2019-08-01 */
    return check_query(in, ids, legacy ? "2017-09-01" : "2019-08-01", legacy, q, out, err);
}

int imds_resource_pattern_ok(const char *s)
{
    const char *star = strchr(s, '*'), *scheme = strstr(s, "://");
    if (!*s || strlen(s) > IMDS_MAX_RESOURCE)
        return 0;
    for (const char *p = s; *p; p++)
        if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
            return 0;
    if (!star)
        return 1;
    if (strchr(star + 1, '*') || !scheme || star < scheme + 3)
        return 0;
    const char *path = strchr(scheme + 3, '/');
    return !path || star < path;
}

/* a pattern part (no '*') against a resource part, ignoring case */
static int same(const char *p, size_t plen, const char *r, size_t rlen)
{
    return plen == rlen && strncasecmp(p, r, plen) == 0;
}

static int resource_matches(const char *pat, const char *r, size_t rlen)
{
    size_t plen = strlen(pat);
    if (plen > 1 && pat[plen - 1] == '/') /* one trailing '/' on either side is not a difference */
        plen--;
    if (rlen > 1 && r[rlen - 1] == '/')
        rlen--;
    const char *star = memchr(pat, '*', plen);
    if (!star)
        return same(pat, plen, r, rlen);
    size_t pre = (size_t)(star - pat), post = plen - pre - 1;
    if (rlen < pre + post + 1 || !same(pat, pre, r, pre) ||
        !same(star + 1, post, r + rlen - post, post))
        return 0;
    for (size_t i = pre; i < rlen - post; i++) /* what the '*' stands for: one host label part */
        if (r[i] == '/' || r[i] == '.' || r[i] == '?' || r[i] == '#')
            return 0;
    return 1;
}

int imds_resource_allowed(const char *resource, size_t len, char *const *patterns, int n)
{
    if (n == 0)
        return 1;
    for (int i = 0; i < n; i++)
        if (resource_matches(patterns[i], resource, len))
            return 1;
    return 0;
}

int imds_is_resource_id(const char *s)
{
    static const char prefix[] = "/subscriptions/";
    if (strncasecmp(s, prefix, sizeof prefix - 1) != 0 || strlen(s) > 1024)
        return 0;
    for (; *s; s++)
        if ((unsigned char)*s <= ' ' || (unsigned char)*s >= 0x7f)
            return 0;
    return 1;
}

void imds_error_from_entra(const struct entra_result *r, struct imds_error *err)
{
    err->retry_after = 0;
    err->error = r->error[0] ? r->error : "service_unavailable";
    err->description = r->description[0] ? r->description : "Token exchange with Entra failed";
    switch (r->kind) {
    case ENTRA_PERMANENT:
        err->status = 400;
        break;
    case ENTRA_THROTTLED:
        err->status = 429;
        err->error = "too_many_requests";
        err->retry_after = r->retry_after > 0 ? r->retry_after : 60;
        break;
    case ENTRA_OK:
    case ENTRA_TRANSIENT:
    default:
        /* A transient AADSTS carries an "invalid_*" code that would read as a client error:
         * clients get service_unavailable and the AADSTS text, and retry. */
        err->status = 503;
        if (r->aadsts)
            err->error = "service_unavailable";
        err->retry_after = r->retry_after > 0 ? r->retry_after : 0;
        break;
    }
}

static int put_num(struct buf *b, const char *key, int64_t v, int comma)
{
    return buf_printf(b, "%s\"%s\":\"%lld\"", comma ? "," : "", key, (long long)v);
}

int imds_render_token(struct buf *b, const struct token *tok, const char *client_id,
                      const char *resource, size_t resource_len, int64_t now)
{
    int64_t in = tok->expires_on - now, ext = tok->ext_expires_on - now;
    if (in < 0)
        in = 0;
    if (ext < in)
        ext = in;
    int rc = buf_puts(b, "{\"access_token\":");
    rc |= json_put_string(b, tok->access_token, tok->len);
    rc |= buf_puts(b, ",\"client_id\":");
    rc |= json_put_string(b, client_id, strlen(client_id));
    rc |= put_num(b, "expires_in", in, 1);
    rc |= put_num(b, "expires_on", tok->expires_on, 1);
    rc |= put_num(b, "ext_expires_in", ext, 1);
    rc |= put_num(b, "not_before", tok->not_before, 1);
    rc |= buf_puts(b, ",\"resource\":");
    rc |= json_put_string(b, resource, resource_len);
    rc |= buf_puts(b, ",\"token_type\":\"Bearer\"}");
    return rc ? -1 : 0;
}

int imds_render_appservice_token(struct buf *b, const struct token *tok, const char *client_id,
                                 const char *resource, size_t resource_len)
{
    int rc = buf_puts(b, "{\"access_token\":");
    rc |= json_put_string(b, tok->access_token, tok->len);
    rc |= buf_puts(b, ",\"client_id\":");
    rc |= json_put_string(b, client_id, strlen(client_id));
    rc |= put_num(b, "expires_on", tok->expires_on, 1);
    rc |= put_num(b, "not_before", tok->not_before, 1);
    rc |= buf_puts(b, ",\"resource\":");
    rc |= json_put_string(b, resource, resource_len);
    rc |= buf_puts(b, ",\"token_type\":\"Bearer\"}");
    return rc ? -1 : 0;
}

int imds_render_msi2017_token(struct buf *b, const struct token *tok, const char *client_id,
                              const char *resource, size_t resource_len, int epoch)
{
    struct tm tm;
    time_t t = (time_t)tok->expires_on;
    gmtime_r(&t, &tm);
    int rc = buf_puts(b, "{\"access_token\":");
    rc |= json_put_string(b, tok->access_token, tok->len);
    rc |= buf_puts(b, ",\"client_id\":");
    rc |= json_put_string(b, client_id, strlen(client_id));
    if (epoch)
        rc |= put_num(b, "expires_on", tok->expires_on, 1);
    else
        rc |=
            buf_printf(b, ",\"expires_on\":\"%02d/%02d/%04d %02d:%02d:%02d +00:00\"", tm.tm_mon + 1,
                       tm.tm_mday, tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
    rc |= buf_puts(b, ",\"resource\":");
    rc |= json_put_string(b, resource, resource_len);
    rc |= buf_puts(b, ",\"token_type\":\"Bearer\"}");
    return rc ? -1 : 0;
}

static int render_error(struct buf *b, const struct imds_error *err, int appservice)
{
    int rc = buf_puts(b, "{\"error\":");
    rc |= json_put_string(b, err->error, strlen(err->error));
    rc |= buf_puts(b, ",\"error_description\":");
    rc |= json_put_string(b, err->description, strlen(err->description));
    if (appservice) {
        rc |= buf_printf(b, ",\"statusCode\":%d,\"message\":", err->status);
        rc |= json_put_string(b, err->description, strlen(err->description));
    }
    rc |= buf_puts(b, "}");
    return rc ? -1 : 0;
}

int imds_render_error(struct buf *b, const struct imds_error *err)
{
    return render_error(b, err, 0);
}

int imds_render_appservice_error(struct buf *b, const struct imds_error *err)
{
    return render_error(b, err, 1);
}

#include "endpoints.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "json.h"
#include "log.h"
#include "metrics.h"
#include "metrics_render.h"
#include "util.h"

/* http_server keeps HTTP_MAX_HOST bytes of Host and reports a longer one by its full length, which
 * imds_host_allowed refuses unread only if it is over IMDS_MAX_HOST too */
_Static_assert(IMDS_MAX_HOST <= HTTP_MAX_HOST, "a Host imds reads must be one http_server kept");

/* The shape of an answer: IMDS, App Service 2019-08-01, App Service 2017-09-01 with expires_on as
 * a date or (Azure ML's clients) as epoch seconds. Errors: IMDS's, or App Service's for the rest */
enum answer_shape { SHAPE_IMDS, SHAPE_APPSERVICE, SHAPE_MSI2017, SHAPE_MSI2017_EPOCH };

/* A token request waiting for an exchange (the cold path; the cached path allocates nothing). */
struct pending {
    struct token_cache_waiter w;
    struct http_conn *conn;
    enum answer_shape shape;
    char *client_id;
    size_t resource_len;
    char resource[]; /* decoded, NUL-terminated */
};

int endpoints_init(struct endpoints *ep, uv_loop_t *loop, const struct config *cfg,
                   struct token_cache *cache, struct token_file *tf, char *err, size_t errlen)
{
    ep->tf = tf;
    ep->refused_hosts = 0;
    ep->secrets = NULL;
    ep->arc = NULL;
    ep->loop = loop;
    ep->cfg = cfg;
    ep->cache = cache;
    ep->ids = config_identities(cfg);
    if (cfg->arc_key_dir &&
        !(ep->arc = arc_new(loop, cfg->arc_key_dir, (gid_t)cfg->arc_gid, err, errlen)))
        return -1;
    if (cfg->identity_header)
        ep->secrets = secret_watch_new(loop, cfg->identity_header_file, cfg->identity_header,
                                       cfg->identity_header_len, cfg->identity_header_overlap_s);
    return 0;
}

void endpoints_reload(struct endpoints *ep)
{
    if (ep->secrets)
        secret_watch_reload(ep->secrets);
}

void endpoints_free(struct endpoints *ep)
{
    secret_watch_free(ep->secrets);
    ep->secrets = NULL;
    arc_free(ep->arc);
    ep->arc = NULL;
}

static void send_error(struct http_conn *c, const struct imds_error *err, enum answer_shape shape)
{
    struct buf *b = http_conn_scratch(c);
    char hdr[48] = "";
    /* 4xx are the clients' business (SDK probes send no Metadata header on purpose) */
    static uint64_t failed; /* one loop: every 5xx answered, for the log's sampling */
    if (err->status >= 500 && log_sampled(&failed))
        log_info("request_failed", "status=%d error=%s failed_total=%llu", err->status, err->error,
                 (unsigned long long)failed);
    else
        log_debug("request_rejected", "status=%d error=%s", err->status, err->error);
    buf_reset(b);
    if (shape != SHAPE_IMDS)
        imds_render_appservice_error(b, err);
    else
        imds_render_error(b, err);
    if (err->retry_after > 0 && err->status != 400)
        snprintf(hdr, sizeof hdr, "Retry-After: %d\r\n", err->retry_after);
    http_conn_respond(c, err->status, hdr, b->data, b->len);
}

void endpoints_error_body(struct buf *b, int status, const char *reason, void *arg)
{
    (void)arg;
    const char *code = status == 400   ? "invalid_request"
                       : status == 503 ? "service_unavailable"
                                       : "bad_request";
    struct imds_error e = {status, code, reason, 0};
    imds_render_error(b, &e);
}

static void send_token(struct http_conn *c, const struct token *tok, const char *client_id,
                       const char *resource, size_t rlen, enum answer_shape shape)
{
    struct buf *b = http_conn_scratch(c);
    buf_reset(b);
    int rc = shape >= SHAPE_MSI2017 ? imds_render_msi2017_token(b, tok, client_id, resource, rlen,
                                                                shape == SHAPE_MSI2017_EPOCH)
             : shape == SHAPE_APPSERVICE
                 ? imds_render_appservice_token(b, tok, client_id, resource, rlen)
                 : imds_render_token(b, tok, client_id, resource, rlen,
                                     token_now_epoch(tok, (int64_t)now_ms()));
    if (rc < 0) {
        struct imds_error e = {500, "server_error", "Response too large", 0};
        send_error(c, &e, shape);
        return;
    }
    http_conn_respond(c, 200, NULL, b->data, b->len);
}

/* The cached IMDS path: the body only changes when expires_in does, once a second of the token's
 * count (token_now_epoch: expires_in is the lifetime left, even after the wall clock stepped). */
static void send_cached(struct http_conn *c, struct token *tok, const char *client_id,
                        const char *resource, size_t rlen)
{
    int64_t now_s = token_now_epoch(tok, (int64_t)now_ms());
    if (tok->body_sec != now_s || !tok->body.len) {
        if (!tok->body.max)
            buf_init(&tok->body, 1 << 20);
        buf_reset(&tok->body);
        if (imds_render_token(&tok->body, tok, client_id, resource, rlen, now_s) < 0) {
            buf_reset(&tok->body);
            send_token(c, tok, client_id, resource, rlen, SHAPE_IMDS);
            return;
        }
        tok->body_sec = now_s;
    }
    http_conn_respond(c, 200, NULL, tok->body.data, tok->body.len);
}

static void on_token(struct token_cache_waiter *w, const struct token *tok,
                     const struct entra_result *r)
{
    struct pending *p = w->data;
    if (tok) {
        send_token(p->conn, tok, p->client_id, p->resource, p->resource_len, p->shape);
    } else {
        struct imds_error e;
        imds_error_from_entra(r, &e);
        send_error(p->conn, &e, p->shape);
    }
    free(p);
}

static void on_token_abort(struct http_conn *c, void *arg)
{
    (void)c;
    struct pending *p = arg;
    token_cache_cancel(&p->w);
    log_debug("client_gone", "state=waiting_for_token");
    free(p);
}

/* ---- the Azure Arc challenge ----------------------------------------------------------------- */

struct arc_wait {
    struct http_conn *conn;
    struct arc_challenge *ch;
};

static void on_arc_abort(struct http_conn *c, void *arg)
{
    (void)c;
    struct arc_wait *w = arg;
    arc_cancel(w->ch); /* its callback will not run */
    free(w);
}

static void on_arc_key(void *arg, const char *path)
{
    struct arc_wait *w = arg;
    struct http_conn *c = w->conn;
    free(w);
    if (!path) {
        struct imds_error e = {503, "service_unavailable", "Cannot create the Azure Arc key file",
                               5};
        send_error(c, &e, SHAPE_IMDS);
        return;
    }
    struct imds_error e = {401, "unauthorized_client",
                           "Read the key file named in WWW-Authenticate and send its content as "
                           "Authorization: Basic <key>",
                           0};
    char hdr[300];
    snprintf(hdr, sizeof hdr, "WWW-Authenticate: Basic realm=%s\r\n", path);
    struct buf *b = http_conn_scratch(c);
    buf_reset(b);
    imds_render_error(b, &e);
    http_conn_respond(c, 401, hdr, b->data, b->len);
}

/* 1 when the request may go on; else it is answered (a challenge, or a wrong key). */
static int arc_check(struct endpoints *ep, struct http_conn *c, const struct http_request *req)
{
    if (req->authorization) {
        if (arc_verify(ep->arc, req->authorization, req->authorization_len))
            return 1;
        struct imds_error e = {401, "unauthorized_client",
                               "The Authorization key is not valid (each key is good once, for a "
                               "minute)",
                               0};
        send_error(c, &e, SHAPE_IMDS);
        return 0;
    }
    struct arc_wait *w = xmalloc(sizeof *w);
    w->conn = c;
    int refused;
    /* each user has a share of the key slots: one user's flood is refused alone */
    w->ch = arc_challenge(ep->arc, arc_peer_uid(ep->arc, http_conn_fd(c)), on_arc_key, w, &refused);
    if (!w->ch) {
        free(w);
        /* a flood of challenges (this user's, or many users'): what IMDS answers when it
         * throttles, which the SDKs retry after Retry-After */
        struct imds_error busy = {429, "too_many_requests",
                                  "Too many Azure Arc challenges are outstanding; retry later",
                                  ARC_RETRY_AFTER_S};
        struct imds_error fail = {503, "service_unavailable",
                                  "Cannot create the Azure Arc key file", 5};
        send_error(c, refused ? &busy : &fail, SHAPE_IMDS);
        return 0;
    }
    http_conn_on_abort(c, on_arc_abort, w);
    return 0;
}

/* Both token protocols after validation: cache hit, Entra throttling, or a cache wait. */
static void handle_token(struct endpoints *ep, struct http_conn *c, const struct http_request *req,
                         enum answer_shape shape)
{
    struct imds_input in = {
        .is_get = req->is_get,
        .has_metadata_true = req->has_metadata_true,
        .has_xff = req->has_xff,
        .has_body = req->has_body,
        .host = req->host,
        .host_len = req->host_len,
        .query = req->query,
        .query_len = req->query_len,
        .identity_header = req->identity_header,
        .identity_header_len = req->identity_header_len,
        .legacy_secret = req->legacy_secret,
        .legacy_secret_len = req->legacy_secret_len,
        .is_post = req->is_post,
        .body = req->body,
        .body_len = req->body_len,
        .form_body = req->form_body,
    };
    struct query q;
    struct imds_token_req tr;
    struct imds_error err;
    struct imds_secret secrets[2];
    int nsecrets = ep->secrets ? secret_watch_get(ep->secrets, secrets) : 0;
    /* the token path also takes Cloud Shell's POST (see routes[]) */
    int rc = shape == SHAPE_APPSERVICE
                 ? imds_check_appservice_request(&in, &ep->ids, secrets, nsecrets, &q, &tr, &err)
             : req->is_post ? imds_check_cloudshell_request(&in, &ep->ids, &q, &tr, &err)
                            : imds_check_token_request(&in, &ep->ids, &q, &tr, &err);
    if (rc < 0) {
        if (err.status == 403 && log_sampled(&ep->refused_hosts)) {
            char host[80];
            log_quote(host, sizeof host, req->host, req->host_len);
            log_warn("request_host_refused", "host=%s refused_total=%llu", host,
                     (unsigned long long)ep->refused_hosts);
        }
        send_error(c, &err, shape);
        return;
    }
    if (!imds_resource_allowed(tr.resource, tr.resource_len, ep->cfg->allowed_resources,
                               ep->cfg->nallowed_resources)) {
        /* least privilege: what real IMDS answers for a resource it will not issue, before any
         * exchange (an application tricked into fetching URLs gets nothing more) */
        if (log_sampled(&metrics.resources_refused)) {
            char res[160];
            log_warn("resource_refused", "client_id=%s resource=%s refused_total=%llu",
                     tr.client_id, log_quote(res, sizeof res, tr.resource, tr.resource_len),
                     (unsigned long long)metrics.resources_refused);
        }
        struct imds_error e = {400, "invalid_resource",
                               "The resource is not one this endpoint issues tokens for "
                               "(--allow-resource)",
                               0};
        send_error(c, &e, shape);
        return;
    }
    if (shape == SHAPE_IMDS && ep->arc && !arc_check(ep, c, req))
        return;
    if (shape == SHAPE_APPSERVICE && tr.msi2017)
        shape = tr.msi2017_epoch ? SHAPE_MSI2017_EPOCH : SHAPE_MSI2017;
    struct token *tok;
    struct entra_result fail;
    /* first without a waiter: a hit or an immediate failure never touches the heap */
    enum cache_result cr =
        token_cache_get(ep->cache, NULL, tr.client_id, tr.resource, tr.resource_len, &tok, &fail);
    switch (cr) {
    case CACHE_HIT:
        if (shape != SHAPE_IMDS)
            send_token(c, tok, tr.client_id, tr.resource, tr.resource_len, shape);
        else
            send_cached(c, tok, tr.client_id, tr.resource, tr.resource_len);
        return;
    case CACHE_FAIL: {
        struct imds_error e;
        imds_error_from_entra(&fail, &e);
        send_error(c, &e, shape);
        return;
    }
    case CACHE_FULL: {
        struct imds_error e = {503, "service_unavailable", "Token cache is full", 5};
        send_error(c, &e, shape);
        return;
    }
    case CACHE_WAIT:
        break;
    }
    struct pending *p = xmalloc(sizeof *p + tr.resource_len + 1);
    p->w.done = on_token;
    p->w.data = p;
    p->conn = c;
    p->shape = shape;
    p->client_id = (char *)tr.client_id; /* owned by the config, which outlives requests */
    p->resource_len = tr.resource_len;
    memcpy(p->resource, tr.resource, tr.resource_len + 1);
    cr = token_cache_get(ep->cache, &p->w, p->client_id, p->resource, p->resource_len, &tok, &fail);
    /* a hit or a failure cannot appear between the two calls: nothing ran in between. Only room
     * for a new key is looked for with a waiter (token_cache_get) */
    assert(cr == CACHE_WAIT || cr == CACHE_FULL);
    if (cr != CACHE_WAIT) {
        free(p);
        struct imds_error e = {503, "service_unavailable", "Token cache is full", 5};
        send_error(c, &e, shape);
        return;
    }
    http_conn_on_abort(c, on_token_abort, p);
}

static void handle_ready(struct endpoints *ep, struct http_conn *c, const struct http_request *req,
                         enum answer_shape shape)
{
    (void)req;
    (void)shape;
    struct token_file_status st;
    int64_t now = now_epoch();
    token_file_status(ep->tf, now, &st);
    /* with --prefetch, ready means those tokens are in hand, not only a usable token file */
    char why[400];
    int total, missing = token_cache_prefetch_missing(ep->cache, &total, why, sizeof why);
    int ok = st.state == TOKEN_OK && !missing;
    const char *reason = st.state != TOKEN_OK ? st.reason : why;
    struct buf *b = http_conn_scratch(c);
    buf_reset(b);
    if (ok) {
        buf_puts(b, "{\"status\":\"ready\",");
    } else {
        buf_puts(b, "{\"status\":\"not_ready\",\"error\":\"service_unavailable\","
                    "\"error_description\":");
        json_put_string(b, reason, strlen(reason));
        buf_puts(b, ",");
    }
    if (total)
        buf_printf(b, "\"prefetch\":{\"tokens\":%d,\"ready\":%d},", total, total - missing);
    buf_puts(b, "\"token_file\":{\"path\":");
    json_put_string(b, ep->cfg->token_file, strlen(ep->cfg->token_file));
    buf_printf(b, ",\"state\":\"%s\"", token_state_name(st.state));
    if (st.claims.exp) {
        buf_puts(b, ",\"subject\":");
        json_put_string(b, st.claims.sub, strlen(st.claims.sub));
        buf_puts(b, ",\"issuer\":");
        json_put_string(b, st.claims.iss, strlen(st.claims.iss));
        buf_puts(b, ",\"audience\":");
        json_put_string(b, st.claims.aud, strlen(st.claims.aud));
        int64_t left = st.claims.exp - now;
        buf_printf(b, ",\"expires_on\":\"%lld\",\"expires_in\":\"%lld\"", (long long)st.claims.exp,
                   (long long)(left > 0 ? left : 0));
    }
    buf_puts(b, "}}");
    http_conn_respond(c, ok ? 200 : 503, NULL, b->data, b->len);
}

static void handle_healthz(struct endpoints *ep, struct http_conn *c,
                           const struct http_request *req, enum answer_shape shape)
{
    (void)ep;
    (void)req;
    (void)shape;
    static const char ok[] = "{\"status\":\"ok\"}";
    http_conn_respond(c, 200, NULL, ok, sizeof ok - 1);
}

static void handle_metrics(struct endpoints *ep, struct http_conn *c,
                           const struct http_request *req, enum answer_shape shape)
{
    (void)req;
    (void)shape;
    struct buf *b = http_conn_scratch(c);
    buf_reset(b);
    metrics_render(b, ep->tf, ep->cache, http_conn_server(c));
    http_conn_respond_type(c, 200, "text/plain; version=0.0.4; charset=utf-8", b->data, b->len);
}

static void handle_not_found(struct endpoints *ep, struct http_conn *c,
                             const struct http_request *req, enum answer_shape shape)
{
    (void)ep;
    (void)req;
    struct imds_error e = {404, "not_found", "The requested path was not found", 0};
    send_error(c, &e, shape);
}

/* The rest of IMDS, which the workload-identity proxy sidecar forwarded to the node: instance
 * metadata (MSAL's region discovery) and managed identity v2 (where a 404 means "v1 only"); said at
 * once, so that a client falls back without waiting. A request for text (?format=text) gets an
 * empty body: MSAL for Python before it parsed the answer as JSON (Debian 12 ships 1.21) takes
 * whatever body /metadata/instance/compute/location?format=text returns, status unchecked, for its
 * region name, and would send its token requests to https://{"error":...}.login.microsoft.com;
 * empty, it keeps the global authority. */
static void handle_not_served(struct endpoints *ep, struct http_conn *c,
                              const struct http_request *req, enum answer_shape shape)
{
    (void)ep;
    struct query q;
    const struct query_param *fmt;
    if (query_parse(&q, req->query, req->query_len) == QUERY_OK &&
        (fmt = query_get(&q, "format")) && fmt->val_len == 4 &&
        strncasecmp(fmt->val, "text", 4) == 0) {
        log_debug("request_rejected", "status=404 error=not_found body=empty");
        http_conn_respond_type(c, 404, "text/plain; charset=utf-8", "", 0);
        return;
    }
    struct imds_error e = {404, "not_found",
                           "imdsd serves only managed identity tokens "
                           "(/metadata/identity/oauth2/token), no other instance metadata",
                           0};
    send_error(c, &e, shape);
}

/* ---- the routes ------------------------------------------------------------------------------ */

#define METHOD_GET   1u
#define METHOD_POST  2u
#define ON(listener) (1u << (listener))

static int app_service_on(const struct endpoints *ep)
{
    return ep->cfg->identity_header != NULL;
}

struct route {
    enum endpoints_route id;
    const char *path;   /* as imds_path_normalize writes it */
    unsigned methods;   /* METHOD_*: any other method is answered 405 (0: any method) */
    unsigned listeners; /* ON(LISTENER_*): on any other listener the path is not found */
    int (*offered)(const struct endpoints *ep); /* NULL, or whether the configuration offers it */
    enum metrics_endpoint metric;               /* the endpoint label of its answers */
    enum answer_shape shape;                    /* of its answers, errors included */
    void (*handle)(struct endpoints *ep, struct http_conn *c, const struct http_request *req,
                   enum answer_shape shape);
};

/* Never a token on the health listener, where the cluster network can ask; never /metrics on a
 * token listener, where the application would learn about the others. The token path also takes
 * Cloud Shell's POST (MSI_ENDPOINT alone); the answer is IMDS's. */
static const struct route routes[] = {
    {ROUTE_TOKEN, "/metadata/identity/oauth2/token", METHOD_GET | METHOD_POST, ON(LISTENER_TOKENS),
     NULL, EP_TOKEN, SHAPE_IMDS, handle_token},
    {ROUTE_APPSERVICE, "/msi/token", METHOD_GET, ON(LISTENER_TOKENS), app_service_on, EP_MSI,
     SHAPE_APPSERVICE, handle_token},
    {ROUTE_HEALTHZ, "/healthz", METHOD_GET, ON(LISTENER_TOKENS) | ON(LISTENER_HEALTH), NULL,
     EP_HEALTHZ, SHAPE_IMDS, handle_healthz},
    {ROUTE_READYZ, "/readyz", METHOD_GET, ON(LISTENER_TOKENS) | ON(LISTENER_HEALTH), NULL,
     EP_READYZ, SHAPE_IMDS, handle_ready},
    {ROUTE_METRICS, "/metrics", METHOD_GET, ON(LISTENER_HEALTH), NULL, EP_METRICS, SHAPE_IMDS,
     handle_metrics},
};

/* what answers a path no row names, or one its row does not serve on this listener */
static const struct route not_found = {ROUTE_NOT_FOUND, NULL, 0, 0, NULL, EP_OTHER, SHAPE_IMDS,
                                       handle_not_found};
/* a path under /metadata/ that no row names: IMDS's, not imdsd's */
static const struct route not_served = {ROUTE_NOT_FOUND,  NULL, 0, 0, NULL, EP_OTHER, SHAPE_IMDS,
                                        handle_not_served};

static const struct route *find_route(const char *path, size_t len)
{
    char norm[IMDS_MAX_PATH];
    if (imds_path_normalize(path, len, norm, sizeof norm) < 0)
        return NULL;
    for (size_t i = 0; i < ARRAY_LEN(routes); i++)
        if (strcmp(norm, routes[i].path) == 0)
            return &routes[i];
    return NULL;
}

enum endpoints_route endpoints_route(const char *path, size_t len)
{
    const struct route *r = find_route(path, len);
    return r ? r->id : ROUTE_NOT_FOUND;
}

void endpoints_handle(struct http_conn *c, const struct http_request *req, void *arg)
{
    struct endpoints *ep = arg;
    const struct route *r = find_route(req->path, req->path_len);
    if (!r)
        r = req->path_len > 10 && strncasecmp(req->path, "/metadata/", 10) == 0 ? &not_served
                                                                                : &not_found;
    else if (!(r->listeners & ON(req->tag)) || (r->offered && !r->offered(ep)))
        r = &not_found;
    http_conn_count_as(c, r->metric);
    unsigned method = (req->is_get ? METHOD_GET : 0) | (req->is_post ? METHOD_POST : 0);
    if (r->methods && !(r->methods & method)) {
        struct imds_error e = {405, "method_not_allowed", "The requested method is not allowed", 0};
        send_error(c, &e, r->shape);
        return;
    }
    r->handle(ep, c, req, r->shape);
}

#include "endpoints.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "token_file.h"
#include "util.h"

/* A token request waiting for an exchange (the cold path; the cached path allocates nothing). */
struct pending {
    struct token_cache_waiter w;
    struct http_conn *conn;
    int appservice; /* answer in the App Service shape */
    char *client_id;
    size_t resource_len;
    char resource[]; /* decoded, NUL-terminated */
};

void endpoints_init(struct endpoints *ep, uv_loop_t *loop, const struct config *cfg,
                    struct token_cache *cache)
{
    ep->loop = loop;
    ep->cfg = cfg;
    ep->cache = cache;
    ep->ids.default_client_id = cfg->client_id;
    ep->ids.allowed = cfg->allowed_client_ids;
    ep->ids.nallowed = cfg->nallowed;
    ep->ids.aliases = cfg->aliases;
    ep->ids.naliases = cfg->naliases;
}

static void send_error(struct http_conn *c, const struct imds_error *err, int appservice)
{
    struct buf *b = http_conn_scratch(c);
    char hdr[48] = "";
    /* 4xx are the clients' business (SDK probes send no Metadata header on purpose) */
    if (err->status >= 500)
        log_info("request_failed", "status=%d error=%s", err->status, err->error);
    else
        log_debug("request_rejected", "status=%d error=%s", err->status, err->error);
    buf_reset(b);
    if (appservice)
        imds_render_appservice_error(b, err);
    else
        imds_render_error(b, err);
    if (err->retry_after > 0 && err->status != 400)
        snprintf(hdr, sizeof hdr, "Retry-After: %d\r\n", err->retry_after);
    http_conn_respond(c, err->status, hdr, b->data, b->len);
}

static void send_token(struct http_conn *c, const struct token *tok, const char *client_id,
                       const char *resource, size_t rlen, int appservice)
{
    struct buf *b = http_conn_scratch(c);
    buf_reset(b);
    int rc = appservice ? imds_render_appservice_token(b, tok, client_id, resource, rlen)
                        : imds_render_token(b, tok, client_id, resource, rlen, now_epoch());
    if (rc < 0) {
        struct imds_error e = {500, "server_error", "Response too large", 0};
        send_error(c, &e, appservice);
        return;
    }
    http_conn_respond(c, 200, NULL, b->data, b->len);
}

static void on_token(struct token_cache_waiter *w, const struct token *tok,
                     const struct entra_result *r)
{
    struct pending *p = w->data;
    if (tok) {
        send_token(p->conn, tok, p->client_id, p->resource, p->resource_len, p->appservice);
    } else {
        struct imds_error e;
        imds_error_from_entra(r, &e);
        send_error(p->conn, &e, p->appservice);
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

/* Both token protocols after validation: cache hit, Entra throttling, or a cache wait. */
static void handle_token(struct endpoints *ep, struct http_conn *c, const struct http_request *req,
                         int appservice)
{
    struct imds_input in = {
        .is_get = req->is_get,
        .has_metadata_true = req->has_metadata_true,
        .has_xff = req->has_xff,
        .query = req->query,
        .query_len = req->query_len,
        .identity_header = req->identity_header,
        .identity_header_len = req->identity_header_len,
    };
    struct query q;
    struct imds_token_req tr;
    struct imds_error err;
    int rc = appservice ? imds_check_appservice_request(&in, &ep->ids, ep->cfg->identity_header,
                                                        ep->cfg->identity_header_len, &q, &tr,
                                                        &err)
                        : imds_check_token_request(&in, &ep->ids, &q, &tr, &err);
    if (rc < 0) {
        send_error(c, &err, appservice);
        return;
    }
    int64_t now = now_epoch();
    const struct token *tok =
        token_cache_lookup(ep->cache, tr.client_id, tr.resource, tr.resource_len, now);
    if (tok) {
        send_token(c, tok, tr.client_id, tr.resource, tr.resource_len, appservice);
        return;
    }
    int throttled = token_cache_throttled(ep->cache, tr.client_id, tr.resource, tr.resource_len,
                                          now);
    if (throttled > 0) {
        struct imds_error e = {429, "too_many_requests",
                               "Entra is throttling token requests for this identity and resource",
                               throttled};
        send_error(c, &e, appservice);
        return;
    }
    struct pending *p = xmalloc(sizeof *p + tr.resource_len + 1);
    p->w.done = on_token;
    p->w.data = p;
    p->conn = c;
    p->appservice = appservice;
    p->client_id = (char *)tr.client_id; /* owned by the config, which outlives requests */
    p->resource_len = tr.resource_len;
    memcpy(p->resource, tr.resource, tr.resource_len + 1);
    if (token_cache_fetch(ep->cache, &p->w, p->client_id, p->resource, p->resource_len) < 0) {
        free(p);
        struct imds_error e = {503, "service_unavailable", "Token cache is full", 5};
        send_error(c, &e, appservice);
        return;
    }
    http_conn_on_abort(c, on_token_abort, p);
}

static void on_ready_read(struct token_file_read *r, int err, const char *tok, size_t len)
{
    (void)tok;
    (void)len;
    struct http_conn *c = r->data;
    struct buf *b = http_conn_scratch(c);
    buf_reset(b);
    if (err == 0) {
        buf_printf(b, "{\"status\":\"ready\",\"token_file\":{\"present\":\"true\",\"bytes\":\"%zu\"}}",
                   len);
        http_conn_respond(c, 200, NULL, b->data, b->len);
        return;
    }
    char desc[160];
    snprintf(desc, sizeof desc, "Service account token file is not usable: %s",
             token_file_strerror(err));
    struct imds_error e = {503, "service_unavailable", desc, 0};
    buf_puts(b, "{\"status\":\"not_ready\",");
    struct buf tail;
    buf_init(&tail, 4096);
    imds_render_error(&tail, &e);
    buf_append(b, tail.data + 1, tail.len - 1); /* merge the error object's members */
    buf_free(&tail);
    http_conn_respond(c, 503, NULL, b->data, b->len);
}

static void on_ready_abort(struct http_conn *c, void *arg)
{
    (void)c;
    token_file_cancel(arg);
}

static void handle_ready(struct endpoints *ep, struct http_conn *c)
{
    struct token_file_read *r = token_file_read_new(on_ready_read, c);
    if (token_file_read(ep->loop, r, ep->cfg->token_file) < 0) {
        free(r);
        struct imds_error e = {503, "service_unavailable", "Cannot check the token file", 0};
        send_error(c, &e, 0);
        return;
    }
    http_conn_on_abort(c, on_ready_abort, r);
}

void endpoints_handle(struct http_conn *c, const struct http_request *req, void *arg)
{
    struct endpoints *ep = arg;
    enum imds_route route = imds_route(req->path, req->path_len);
    if (route == ROUTE_APPSERVICE && !ep->cfg->identity_header)
        route = ROUTE_NOT_FOUND;
    switch (route) {
    case ROUTE_TOKEN:
        handle_token(ep, c, req, 0);
        return;
    case ROUTE_APPSERVICE:
        handle_token(ep, c, req, 1);
        return;
    case ROUTE_NOT_FOUND: {
        struct imds_error e = {404, "not_found", "The requested path was not found", 0};
        send_error(c, &e, 0);
        return;
    }
    default:
        break;
    }
    if (!req->is_get) {
        struct imds_error e = {405, "method_not_allowed", "The requested method is not allowed", 0};
        send_error(c, &e, 0);
        return;
    }
    if (route == ROUTE_HEALTHZ) {
        static const char ok[] = "{\"status\":\"ok\"}";
        http_conn_respond(c, 200, NULL, ok, sizeof ok - 1);
        return;
    }
    handle_ready(ep, c);
}

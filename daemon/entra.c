#include "entra.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "metrics.h"
#include "util.h"

struct entra {
    struct https_client *http;
    const struct config *cfg;
    char *path; /* "/prefix/<tenant>/oauth2/v2.0/token" */
};

int entra_new(struct entra **out, uv_loop_t *loop, const struct config *cfg, char *err,
              size_t errlen)
{
    struct https_client_opts o = {
        .host = cfg->authority_host,
        .port = cfg->authority_port,
        .ca_file = cfg->ca_file,
        .connect_timeout_ms = 5000,
        .request_timeout_ms = (uint64_t)cfg->entra_timeout_s * 1000,
        .max_response = HTTPS_DEFAULT_MAX_RESPONSE,
        .proxy = cfg->use_proxy ? &cfg->proxy : NULL,
    };
    if (o.connect_timeout_ms > o.request_timeout_ms)
        o.connect_timeout_ms = o.request_timeout_ms;
    struct entra *e = xcalloc(1, sizeof *e);
    if (https_client_new(&e->http, loop, &o, err, errlen) < 0) {
        free(e);
        return -1;
    }
    e->cfg = cfg;
    size_t n = strlen(cfg->authority_path) + strlen(cfg->tenant_id) + 32;
    e->path = xmalloc(n);
    snprintf(e->path, n, "%s/%s/oauth2/v2.0/token", cfg->authority_path, cfg->tenant_id);
    *out = e;
    return 0;
}

static void transport_error(struct entra_result *r, const struct entra *e, int err)
{
    memset(r, 0, sizeof *r);
    r->kind = ENTRA_TRANSIENT;
    snprintf(r->error, sizeof r->error, "service_unavailable");
    if (err == HTTPS_E_VERIFY)
        snprintf(r->description, sizeof r->description,
                 "TLS certificate verification failed for %s", e->cfg->authority_host);
    else
        snprintf(r->description, sizeof r->description, "Cannot reach Entra at %s%s%s: %s",
                 e->cfg->authority_host, e->cfg->use_proxy ? " through the proxy " : "",
                 e->cfg->use_proxy ? proxy_describe(&e->cfg->proxy) : "", https_strerror(err));
}

static void log_result(const struct entra_fetch *f, const struct entra_result *r)
{
    char res[160];
    uint64_t ms = now_ms() - f->started_ms;
    log_quote(res, sizeof res, f->resource, strlen(f->resource));
    if (r->kind == ENTRA_OK) {
        char fp[13];
        fingerprint(r->access_token, r->token_len, fp);
        log_info("entra_token",
                 "client_id=%s resource=%s duration_ms=%llu token_len=%zu "
                 "token_fp=%s expires_in=%lld",
                 f->client_id, res, (unsigned long long)ms, r->token_len, fp,
                 (long long)r->expires_in);
    } else {
        char desc[ENTRA_DESCRIPTION_MAX + 16];
        log_quote(desc, sizeof desc, r->description, strlen(r->description));
        log_warn("entra_error",
                 "client_id=%s resource=%s duration_ms=%llu http_status=%d "
                 "error=%s aadsts=%lld kind=%s description=%s",
                 f->client_id, res, (unsigned long long)ms, r->http_status, r->error,
                 (long long)r->aadsts,
                 r->kind == ENTRA_PERMANENT   ? "permanent"
                 : r->kind == ENTRA_THROTTLED ? "throttled"
                                              : "transient",
                 desc);
    }
}

static void on_done(struct https_request *req, int err, const struct https_response *resp)
{
    struct entra_fetch *f = req->data;
    struct entra_result r;
    assert(f->active); /* done runs once per entra_fetch that returned 0, never once canceled */
    f->active = 0;
    if (err != HTTPS_OK)
        transport_error(&r, f->e, err);
    else
        entra_parse_response(&r, resp->status, resp->body, resp->body_len, resp->retry_after);
    log_result(f, &r);
    static const enum metrics_outcome outcome[] = {
        [ENTRA_OK] = OUT_OK,
        [ENTRA_PERMANENT] = OUT_PERMANENT,
        [ENTRA_TRANSIENT] = OUT_TRANSIENT,
        [ENTRA_THROTTLED] = OUT_THROTTLED,
    };
    metrics_exchange(outcome[r.kind], (double)(now_ms() - f->started_ms) / 1000.0);
    f->done(f, &r);
    entra_result_free(&r);
}

int entra_fetch(struct entra *e, struct entra_fetch *f, const char *client_id, const char *resource,
                const char *assertion, size_t assertion_len)
{
    struct buf body;
    unsigned char rnd[16];
    buf_init(&body, 256 * 1024);
    if (entra_build_form(&body, client_id, resource, assertion, assertion_len) < 0) {
        buf_free(&body);
        return -1;
    }
    if (uv_random(NULL, NULL, rnd, sizeof rnd, 0, NULL) < 0)
        memset(rnd, 0, sizeof rnd);
    rnd[6] = (unsigned char)((rnd[6] & 0x0f) | 0x40);
    rnd[8] = (unsigned char)((rnd[8] & 0x3f) | 0x80);
    snprintf(f->headers, sizeof f->headers,
             "Content-Type: application/x-www-form-urlencoded\r\nAccept: application/json\r\n"
             "x-ms-lib-capability: retry-after, h429\r\nreturn-client-request-id: true\r\n"
             "client-request-id: %02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x\r\n",
             rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7], rnd[8], rnd[9],
             rnd[10], rnd[11], rnd[12], rnd[13], rnd[14], rnd[15]);
    f->e = e;
    f->client_id = client_id;
    f->resource = resource;
    f->started_ms = now_ms();
    f->sent_mono_ms = (int64_t)f->started_ms;
    f->sent_wall_ms = now_wall_ms();
    memset(&f->req, 0, sizeof f->req);
    f->req.method = "POST";
    f->req.path = e->path;
    f->req.headers = f->headers;
    f->req.body = body.data;
    f->req.body_len = body.len;
    f->req.done = on_done;
    f->req.data = f;
    int rc = https_client_send(e->http, &f->req); /* copies the body */
    buf_free(&body);
    if (rc < 0)
        return rc;
    f->active = 1;
    return 0;
}

void entra_cancel(struct entra_fetch *f)
{
    if (f->active)
        https_client_cancel(&f->req);
    f->active = 0;
}

void entra_free(struct entra *e)
{
    if (!e)
        return;
    https_client_free(e->http);
    free(e->path);
    free(e);
}

/* entra.c - the token exchange. With an AKS identity binding (AZURE_KUBERNETES_TOKEN_PROXY) it
 * goes where azidentity's customtokenproxy sends it: to the proxy's host and port, at the proxy's
 * path joined with the token endpoint's, still for Entra's host (the Host header), verified as
 * AZURE_KUBERNETES_SNI_NAME against only the binding's CA. AZURE_KUBERNETES_CA_FILE is read
 * again before every exchange, on the thread pool (one read at a time, shared by the exchanges
 * that wait for it): changed, it replaces the trust anchors; empty (mid-rotation), the last ones
 * stay; unreadable or without a certificate, the exchange fails and is retried as any other. */
#include "entra.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"
#include "tls.h"
#include "util.h"

#define CA_FILE_MAX (1024 * 1024) /* a CA bundle longer than this is refused */

/* One read of the CA file on the thread pool; orphaned (e NULL) if entra_free runs first. */
struct ca_read {
    uv_work_t work;
    struct entra *e;
    char *path;
    int err; /* 0, or an errno (EFBIG: over CA_FILE_MAX) */
    char *data;
    size_t len;
};

struct entra {
    struct https_client *http;
    const struct config *cfg;
    char *path;       /* "/proxy-path/prefix/<tenant>/oauth2/v2.0/token" */
    char where[300];  /* "Entra at HOST" or "the AKS token proxy at HOST:PORT", for errors */
    char verify[420]; /* the name verified, and where */
    char *ca_pem;     /* the CA file's content the trust anchors came from */
    size_t ca_len;
    struct ca_read *ca_job;         /* in flight, or NULL */
    struct entra_fetch *ca_waiting; /* exchanges waiting for the read in flight */
    struct entra_fetch **ca_tail;   /* where the next one goes */
    uv_loop_t *loop;
};

/* The CA file: read whole (at most CA_FILE_MAX bytes); 0 or an errno. */
static int read_ca(const char *path, char **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    struct buf b;
    buf_init(&b, CA_FILE_MAX + 1);
    char chunk[8192];
    int err = 0;
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            err = n < 0 ? errno : 0;
            break;
        }
        if (buf_append(&b, chunk, (size_t)n) < 0) {
            err = EFBIG;
            break;
        }
    }
    close(fd);
    if (err) {
        buf_free(&b);
        return err;
    }
    *data = b.data;
    *len = b.len;
    return 0;
}

int entra_new(struct entra **out, uv_loop_t *loop, const struct config *cfg, char *err,
              size_t errlen)
{
    const struct config_url *tp = &cfg->token_proxy;
    struct https_client_opts o = {
        .host = tp->url ? tp->host : cfg->authority_host,
        .port = tp->url ? tp->port : cfg->authority_port,
        .tls_name = tp->url ? cfg->sni_name : NULL,
        .origin_host = tp->url ? cfg->authority_host : NULL,
        .origin_port = tp->url ? cfg->authority_port : NULL,
        .ca_file = cfg->ca_file,
        .connect_timeout_ms = 5000,
        .request_timeout_ms = (uint64_t)cfg->entra_timeout_s * 1000,
        .max_response = HTTPS_DEFAULT_MAX_RESPONSE,
        .proxy = cfg->use_proxy ? &cfg->proxy : NULL,
    };
    if (o.connect_timeout_ms > o.request_timeout_ms)
        o.connect_timeout_ms = o.request_timeout_ms;
    struct entra *e = xcalloc(1, sizeof *e);
    e->ca_tail = &e->ca_waiting;
    const char *what = "AZURE_KUBERNETES_CA_DATA";
    char what_file[300];
    const char *pem = cfg->k8s_ca_data;
    size_t pem_len = pem ? strlen(pem) : 0;
    if (cfg->k8s_ca_file) { /* at start a problem is a configuration error, as in azidentity */
        int rc = read_ca(cfg->k8s_ca_file, &e->ca_pem, &e->ca_len);
        snprintf(what_file, sizeof what_file, "AZURE_KUBERNETES_CA_FILE '%s'", cfg->k8s_ca_file);
        what = what_file;
        if (rc || !e->ca_len) {
            snprintf(err, errlen, "%s: %s", what_file,
                     rc == EFBIG ? "over 1 MiB"
                     : rc        ? strerror(rc)
                                 : "empty (no CA certificate)");
            free(e->ca_pem);
            free(e);
            return -1;
        }
        pem = e->ca_pem;
        pem_len = e->ca_len;
    }
    if (pem && tls_ctx_new_pem(&o.tls, pem, pem_len, what, err, errlen) < 0) {
        free(e->ca_pem);
        free(e);
        return -1;
    }
    int rc = https_client_new(&e->http, loop, &o, err, errlen);
    tls_ctx_free(o.tls); /* the client holds its own reference */
    if (rc < 0) {
        free(e->ca_pem);
        free(e);
        return -1;
    }
    e->cfg = cfg;
    e->loop = loop;
    size_t n =
        strlen(tp->url ? tp->path : "") + strlen(cfg->authority_path) + strlen(cfg->tenant_id) + 32;
    e->path = xmalloc(n);
    snprintf(e->path, n, "%s%s/%s/oauth2/v2.0/token", tp->url ? tp->path : "", cfg->authority_path,
             cfg->tenant_id);
    if (tp->url) {
        snprintf(e->where, sizeof e->where, "the AKS token proxy at %s:%s", tp->host, tp->port);
        snprintf(e->verify, sizeof e->verify, "%.253s (%.163s)",
                 cfg->sni_name ? cfg->sni_name : tp->host, e->where);
    } else {
        snprintf(e->where, sizeof e->where, "Entra at %s", cfg->authority_host);
        snprintf(e->verify, sizeof e->verify, "%.253s", cfg->authority_host);
    }
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
                 "TLS certificate verification failed for %s", e->verify);
    else
        snprintf(r->description, sizeof r->description, "Cannot reach %s%s%s: %s", e->where,
                 e->cfg->use_proxy ? " through the proxy " : "",
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

/* The end of every exchange: logged, counted, handed to done. */
static void fetch_done(struct entra_fetch *f, struct entra_result *r)
{
    assert(f->active); /* done runs once per entra_fetch that returned 0, never once canceled */
    f->active = 0;
    buf_free(&f->body);
    log_result(f, r);
    static const enum metrics_outcome outcome[] = {
        [ENTRA_OK] = OUT_OK,
        [ENTRA_PERMANENT] = OUT_PERMANENT,
        [ENTRA_TRANSIENT] = OUT_TRANSIENT,
        [ENTRA_THROTTLED] = OUT_THROTTLED,
    };
    metrics_exchange(outcome[r->kind], (double)(now_ms() - f->started_ms) / 1000.0);
    f->done(f, r);
    entra_result_free(r);
}

static void on_done(struct https_request *req, int err, const struct https_response *resp)
{
    struct entra_fetch *f = req->data;
    struct entra_result r;
    if (err != HTTPS_OK)
        transport_error(&r, f->e, err);
    else
        entra_parse_response(&r, resp->status, resp->body, resp->body_len, resp->retry_after);
    fetch_done(f, &r);
}

/* Sends f (its body is copied); or ends it with err's description. */
static void fetch_send(struct entra_fetch *f)
{
    if (https_client_send(f->e->http, &f->req) == 0) {
        buf_free(&f->body);
        return;
    }
    struct entra_result r;
    transport_error(&r, f->e, HTTPS_E_IO);
    fetch_done(f, &r);
}

/* An exchange that cannot start because of the CA file: why, for its log line and its client. */
static void fetch_fail(struct entra_fetch *f, const char *why)
{
    struct entra_result r = {.kind = ENTRA_TRANSIENT};
    snprintf(r.error, sizeof r.error, "service_unavailable");
    snprintf(r.description, sizeof r.description, "%s", why);
    fetch_done(f, &r);
}

static void ca_read_work(uv_work_t *w)
{
    struct ca_read *j = w->data;
    j->err = read_ca(j->path, &j->data, &j->len);
}

static void ca_start_read(struct entra *e);

/* The read is back: take the CA file's content (or keep the last one), then send or fail every
 * exchange that waited for it. */
static void ca_read_done(uv_work_t *w, int status)
{
    struct ca_read *j = w->data;
    struct entra *e = j->e;
    char why[ENTRA_DESCRIPTION_MAX] = "";
    if (!e)
        goto out;
    e->ca_job = NULL;
    const char *path = e->cfg->k8s_ca_file;
    char qpath[300];
    log_quote(qpath, sizeof qpath, path, strlen(path));
    if (status < 0 || j->err) {
        int err = status < 0 ? ECANCELED : j->err;
        snprintf(why, sizeof why, "Cannot read AZURE_KUBERNETES_CA_FILE %s: %s", path,
                 err == EFBIG ? "over 1 MiB" : strerror(err));
        log_warn("token_proxy_ca_unreadable", "file=%s error=%s", qpath,
                 err == EFBIG ? "too_large" : strerror(err));
    } else if (j->len == 0) {
        /* the middle of a rotation: keep the anchors we have, as azidentity does */
        log_debug("token_proxy_ca_empty", "file=%s kept=1", qpath);
    } else if (j->len != e->ca_len || memcmp(j->data, e->ca_pem, j->len) != 0) {
        struct tls_ctx *tls;
        char err[TLS_REASON_MAX];
        char fp[13];
        fingerprint(j->data, j->len, fp);
        if (tls_ctx_new_pem(&tls, j->data, j->len, "AZURE_KUBERNETES_CA_FILE", err, sizeof err) <
            0) {
            snprintf(why, sizeof why, "AZURE_KUBERNETES_CA_FILE %s: no usable CA certificate",
                     path);
            log_warn("token_proxy_ca_invalid", "file=%s bytes=%zu fp=%s kept=1", qpath, j->len, fp);
        } else {
            https_client_set_tls(e->http, tls);
            log_info("token_proxy_ca_changed", "file=%s bytes=%zu fp=%s certificates=%d", qpath,
                     j->len, fp, tls_ctx_count(tls));
            tls_ctx_free(tls);
            free(e->ca_pem);
            e->ca_pem = j->data;
            e->ca_len = j->len;
            j->data = NULL;
        }
    }
    /* Detach the batch first: a done callback may start another exchange (and read). */
    struct entra_fetch *batch = e->ca_waiting;
    e->ca_waiting = NULL;
    e->ca_tail = &e->ca_waiting;
    for (struct entra_fetch *f = batch; f; f = f->ca_next)
        f->ca_batch = &batch;
    while (batch) {
        struct entra_fetch *f = batch;
        batch = f->ca_next;
        f->ca_next = NULL;
        f->ca_batch = NULL;
        if (why[0])
            fetch_fail(f, why);
        else
            fetch_send(f);
    }
    if (e->ca_waiting && !e->ca_job)
        ca_start_read(e);
out:
    free(j->data);
    free(j->path);
    free(j);
}

static void ca_start_read(struct entra *e)
{
    struct ca_read *j = xcalloc(1, sizeof *j);
    j->work.data = j;
    j->e = e;
    j->path = xstrdup(e->cfg->k8s_ca_file);
    e->ca_job = j;
    int rc = uv_queue_work(e->loop, &j->work, ca_read_work, ca_read_done);
    assert(rc == 0); /* fails only without a work callback */
    (void)rc;
}

int entra_fetch(struct entra *e, struct entra_fetch *f, const char *client_id, const char *resource,
                const char *assertion, size_t assertion_len)
{
    unsigned char rnd[16];
    buf_init(&f->body, 256 * 1024);
    if (entra_build_form(&f->body, client_id, resource, assertion, assertion_len) < 0) {
        buf_free(&f->body);
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
    f->ca_next = NULL;
    f->ca_batch = NULL;
    memset(&f->req, 0, sizeof f->req);
    f->req.method = "POST";
    f->req.path = e->path;
    f->req.headers = f->headers;
    f->req.body = f->body.data;
    f->req.body_len = f->body.len;
    f->req.done = on_done;
    f->req.data = f;
    if (e->cfg->k8s_ca_file) { /* sent once the CA file has been read again */
        *e->ca_tail = f;
        e->ca_tail = &f->ca_next;
        f->active = 1;
        if (!e->ca_job)
            ca_start_read(e);
        return 0;
    }
    int rc = https_client_send(e->http, &f->req); /* copies the body */
    buf_free(&f->body);
    if (rc < 0)
        return rc;
    f->active = 1;
    return 0;
}

/* Unlinks f from the list at *head, if it is there; returns whether it was. */
static int unlink_fetch(struct entra_fetch **head, struct entra_fetch *f)
{
    for (struct entra_fetch **p = head; *p; p = &(*p)->ca_next) {
        if (*p == f) {
            *p = f->ca_next;
            f->ca_next = NULL;
            return 1;
        }
    }
    return 0;
}

void entra_cancel(struct entra_fetch *f)
{
    if (!f->active)
        return;
    f->active = 0;
    struct entra *e = f->e;
    if (f->ca_batch) { /* in the batch ca_read_done is going through */
        unlink_fetch(f->ca_batch, f);
        f->ca_batch = NULL;
    } else if (unlink_fetch(&e->ca_waiting, f)) {
        e->ca_tail = &e->ca_waiting;
        while (*e->ca_tail)
            e->ca_tail = &(*e->ca_tail)->ca_next;
    } else {
        https_client_cancel(&f->req);
    }
    buf_free(&f->body);
}

void entra_free(struct entra *e)
{
    if (!e)
        return;
    if (e->ca_job)
        e->ca_job->e = NULL; /* frees itself when it is back */
    while (e->ca_waiting) {  /* ended as https_client_free ends the requests it holds */
        struct entra_fetch *f = e->ca_waiting;
        e->ca_waiting = f->ca_next;
        f->ca_next = NULL;
        struct entra_result r;
        transport_error(&r, e, HTTPS_E_CANCELED);
        fetch_done(f, &r);
    }
    https_client_free(e->http);
    free(e->ca_pem);
    free(e->path);
    free(e);
}

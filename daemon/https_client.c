#include "https_client.h"

#include <assert.h>
#include <inttypes.h>
#include <llhttp.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "buf.h"
#include "log.h"
#include "proxy.h"
#include "proxy_answer.h"
#include "tls.h"
#include "util.h"
#include "worker.h"

#ifndef IMDSD_VERSION
#define IMDSD_VERSION "0.0.0"
#endif

#define HTTPS_READ_BUF_SIZE   16384        /* one uv_read's worth of ciphertext */
#define HTTPS_PLAIN_CHUNK     4096         /* plaintext decrypted per tls_conn_read() */
#define HTTPS_MAX_REQUEST     (512 * 1024) /* serialized request: head + body */
#define HTTPS_HEADER_NAME_MAX 32           /* longer response header names are never ours */
#define HTTPS_RETRY_AFTER_MAX 64           /* Retry-After values are truncated to this */
#define HTTPS_ERR_MAX         256
#define HTTPS_LOG_REASON_MAX  320
#define HTTPS_ADDR_MAX        64
#define HTTPS_PORT_MAX        65535
#define HTTPS_VIA_MAX         600 /* " proxy=<description>" for log lines */
/* target, target, then "Proxy-Authorization: ", its value, "\r\n" (or three empty strings) */
#define HTTPS_CONNECT_FMT "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s%s%s\r\n"

enum https_conn_state {
    CONN_RESOLVING,
    CONN_CONNECTING,
    CONN_TUNNEL, /* waiting for the proxy's answer to CONNECT */
    CONN_HANDSHAKE,
    CONN_ACTIVE, /* serving conn->req */
    CONN_IDLE,   /* in the keep-alive pool */
};

static const char *const state_names[] = {"resolving", "connecting", "tunnel",
                                          "handshake", "active",     "idle"};
_Static_assert(sizeof state_names / sizeof *state_names == CONN_IDLE + 1,
               "a name for every https_conn_state");
_Static_assert(CONN_RESOLVING == 0, "conn_new's xcalloc starts a connection resolving");

#define TO(s) (1u << (s))
/* The states each state may change to (set_state), as a set of bits. Closing is not a state
 * (conn->closing): a connection closes from any of them. */
static const unsigned conn_next[] = {
    [CONN_RESOLVING] = TO(CONN_CONNECTING),                   /* resolved */
    [CONN_CONNECTING] = TO(CONN_TUNNEL) | TO(CONN_HANDSHAKE), /* through the proxy, or not */
    [CONN_TUNNEL] = TO(CONN_HANDSHAKE),                       /* the proxy opened it */
    [CONN_HANDSHAKE] = TO(CONN_ACTIVE),
    [CONN_ACTIVE] = TO(CONN_IDLE), /* the response is complete: pooled */
    [CONN_IDLE] = TO(CONN_ACTIVE), /* reused */
};
#undef TO

struct https_client {
    uv_loop_t *loop;
    char *host;
    char *port;
    char *tls_name;    /* sent as SNI and verified: host, or opts.tls_name */
    char *host_header; /* "host" or "host:port", IPv6 literals bracketed */
    /* Through a proxy: where to connect, and what to ask for. NULL proxy_host = direct. */
    char *proxy_host;
    char *proxy_port;
    char *proxy_auth;        /* Proxy-Authorization value or NULL: a secret */
    char *connect_target;    /* "host:port", IPv6 literals bracketed */
    char via[HTTPS_VIA_MAX]; /* " proxy=<description>" (password masked), or "" */
    struct tls_ctx *tls;
    uint64_t connect_timeout_ms;
    uint64_t request_timeout_ms;
    size_t max_response;
    struct https_conn *conns;      /* every connection not yet destroyed */
    struct https_request *pending; /* every request whose done has not run */
    unsigned n_idle;
    struct worker *worker; /* runs the TLS handshakes' steps, one at a time */
    uint64_t next_conn_id;
    int freeing;
};

/* One TCP+TLS connection. Freed only once its timer and TCP handle have closed and its
 * getaddrinfo and handshake step (if any) have called back: refs counts those. */
struct https_conn {
    struct https_client *c;
    struct https_conn *prev, *next;
    uint64_t id;
    enum https_conn_state state;
    int closing;
    int refs;
    int tcp_open;   /* tcp initialised and its close callback has not run */
    int gai_active; /* getaddrinfo in flight */
    int hs_active;  /* a handshake step with the worker: it owns tls, reading is stopped */
    int reused;     /* a request completed on it before the current one */
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    struct worker_job hs_job;
    struct addrinfo *addrs, *next_addr;
    int last_err; /* libuv error of the last failed connect attempt */
    char addr[HTTPS_ADDR_MAX];
    uint64_t connect_deadline; /* loop time */
    uint64_t req_deadline;
    uint64_t idle_since;
    struct tls_conn *tls;
    char rbuf[HTTPS_READ_BUF_SIZE];

    /* The request being served, its serialized form and the response parse state. */
    struct https_request *req;
    struct buf reqbuf;
    int head_only;
    llhttp_t parser;
    size_t resp_bytes; /* plaintext response bytes received */
    int msg_complete;
    int too_large;
    struct buf body;
    char hname[HTTPS_HEADER_NAME_MAX + 1];
    size_t hname_len;
    int hname_overflow;
    int in_retry_after;
    int have_retry_after;
    char retry_after[HTTPS_RETRY_AFTER_MAX + 1];
    size_t retry_after_len;

    /* The proxy's answer to CONNECT. */
    struct proxy_answer answer;
    int proxy_status; /* its status when it refused */
};

struct https_write {
    uv_write_t req;
    struct https_conn *conn;
    char *data;
    size_t len;
    int secret; /* zero data before freeing it */
};

static void conn_close(struct https_conn *conn, const char *why);
static void conn_fail(struct https_conn *conn, int err, const char *event, const char *reason);
static void conn_pump(struct https_conn *conn);
static void conn_try_connect(struct https_conn *conn);
static void conn_timer_cb(uv_timer_t *t);
static void conn_alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *b);
static void conn_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static int conn_start(struct https_client *c, struct https_request *req, struct buf *reqbuf,
                      uint64_t req_deadline, int head_only);

const char *https_strerror(int err)
{
    switch (err) {
    case HTTPS_OK:
        return "ok";
    case HTTPS_E_RESOLVE:
        return "name resolution failed";
    case HTTPS_E_CONNECT:
        return "connection failed";
    case HTTPS_E_TLS:
        return "TLS failure";
    case HTTPS_E_VERIFY:
        return "certificate verification failed";
    case HTTPS_E_TIMEOUT:
        return "timed out";
    case HTTPS_E_IO:
        return "connection closed or reset";
    case HTTPS_E_PROTO:
        return "invalid HTTP";
    case HTTPS_E_TOO_LARGE:
        return "response too large";
    case HTTPS_E_CANCELED:
        return "canceled";
    case HTTPS_E_PROXY:
        return "the proxy did not open a tunnel";
    default:
        return "unknown error";
    }
}

/* ---- small helpers ------------------------------------------------------------------------ */

static const char *quote(char *out, size_t n, const char *s)
{
    return log_quote(out, n, s, strlen(s));
}

static void pending_remove(struct https_client *c, struct https_request *req)
{
    for (struct https_request **p = &c->pending; *p; p = &(*p)->next) {
        if (*p == req) {
            *p = req->next;
            break;
        }
    }
    req->next = NULL;
}

/* Detaches req from everything and calls done: the last thing any caller does. */
static void req_complete(struct https_request *req, int err, const struct https_response *resp)
{
    assert(req->client); /* done runs exactly once: not for a request completed or canceled */
    pending_remove(req->client, req);
    req->client = NULL;
    req->conn = NULL;
    req->done(req, err, resp);
}

static void client_destroy(struct https_client *c)
{
    worker_free(c->worker);
    tls_ctx_free(c->tls);
    free(c->host);
    free(c->port);
    free(c->tls_name);
    free(c->host_header);
    free(c->proxy_host);
    free(c->proxy_port);
    secret_free_str(c->proxy_auth);
    free(c->connect_target);
    free(c);
}

/* ---- response parsing --------------------------------------------------------------------- */

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct https_conn *conn = p->data;
    if (conn->hname_overflow || len > HTTPS_HEADER_NAME_MAX - conn->hname_len) {
        conn->hname_overflow = 1;
        return 0;
    }
    memcpy(conn->hname + conn->hname_len, at, len);
    conn->hname_len += len;
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    struct https_conn *conn = p->data;
    conn->hname[conn->hname_len] = 0;
    conn->in_retry_after = !conn->hname_overflow && strcasecmp(conn->hname, "Retry-After") == 0;
    if (conn->in_retry_after) {
        conn->have_retry_after = 1; /* the last one wins */
        conn->retry_after_len = 0;
        conn->retry_after[0] = 0;
    }
    conn->hname_len = 0;
    conn->hname_overflow = 0;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct https_conn *conn = p->data;
    if (!conn->in_retry_after)
        return 0;
    size_t room = HTTPS_RETRY_AFTER_MAX - conn->retry_after_len;
    if (len > room)
        len = room;
    memcpy(conn->retry_after + conn->retry_after_len, at, len);
    conn->retry_after_len += len;
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    struct https_conn *conn = p->data;
    if (conn->in_retry_after) {
        while (conn->retry_after_len > 0 && (conn->retry_after[conn->retry_after_len - 1] == ' ' ||
                                             conn->retry_after[conn->retry_after_len - 1] == '\t'))
            conn->retry_after_len--;
        conn->retry_after[conn->retry_after_len] = 0;
    }
    conn->in_retry_after = 0;
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct https_conn *conn = p->data;
    if (p->status_code == 101)
        return -1; /* we never ask to switch protocols */
    if (conn->head_only && p->status_code >= 200)
        return 1; /* no body follows */
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct https_conn *conn = p->data;
    if (buf_append(&conn->body, at, len) < 0) {
        conn->too_large = 1;
        return -1;
    }
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct https_conn *conn = p->data;
    if (p->status_code < 200) { /* interim 1xx: the real response follows */
        buf_reset(&conn->body);
        conn->have_retry_after = 0;
        return 0;
    }
    conn->msg_complete = 1;
    return HPE_PAUSED;
}

static const llhttp_settings_t https_parser_settings = {
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- connection lifecycle ----------------------------------------------------------------- */

/* Every change of a connection's state goes through here: one allowed by conn_next, traced at
 * debug level. */
static void set_state(struct https_conn *conn, enum https_conn_state to)
{
    assert(conn_next[conn->state] & (1u << to));
    log_debug("https_conn_state", "host=%s port=%s conn=%" PRIu64 " from=%s to=%s", conn->c->host,
              conn->c->port, conn->id, state_names[conn->state], state_names[to]);
    conn->state = to;
}

static void conn_destroy(struct https_conn *conn)
{
    struct https_client *c = conn->c;
    if (conn->prev)
        conn->prev->next = conn->next;
    else
        c->conns = conn->next;
    if (conn->next)
        conn->next->prev = conn->prev;
    uv_freeaddrinfo(conn->addrs);
    tls_conn_free(conn->tls);
    buf_free(&conn->reqbuf);
    buf_free(&conn->body);
    secret_zero(conn->retry_after, sizeof conn->retry_after);
    free(conn);
    if (c->freeing && !c->conns)
        client_destroy(c);
}

static void conn_unref(struct https_conn *conn)
{
    if (--conn->refs == 0)
        conn_destroy(conn);
}

static void conn_handle_close_cb(uv_handle_t *h)
{
    conn_unref(h->data);
}

/* The TCP handle closed: either for good, or after a failed attempt to move to the next address
 * (a handle whose connect failed cannot be reused, so it is closed and initialised again). */
static void conn_tcp_close_cb(uv_handle_t *h)
{
    struct https_conn *conn = h->data;
    conn->tcp_open = 0;
    if (conn->closing) {
        conn_unref(conn);
        return;
    }
    conn->refs--; /* the timer still holds a reference */
    conn_try_connect(conn);
}

static struct https_conn *conn_new(struct https_client *c)
{
    struct https_conn *conn = xcalloc(1, sizeof *conn);
    conn->c = c;
    conn->id = ++c->next_conn_id;
    buf_init(&conn->reqbuf, HTTPS_MAX_REQUEST);
    buf_init(&conn->body, c->max_response);
    uv_timer_init(c->loop, &conn->timer);
    conn->timer.data = conn;
    conn->gai.data = conn;
    conn->connect_req.data = conn;
    conn->hs_job.data = conn;
    conn->refs = 1;
    conn->next = c->conns;
    if (c->conns)
        c->conns->prev = conn;
    c->conns = conn;
    return conn;
}

/* Sends a close_notify if it can go out right now; never waits for it. */
static void conn_say_goodbye(struct https_conn *conn)
{
    size_t len;
    tls_conn_close_notify(conn->tls);
    char *p = tls_conn_take_output(conn->tls, &len);
    if (!p)
        return;
    uv_buf_t b = uv_buf_init(p, (unsigned)len);
    (void)uv_try_write((uv_stream_t *)&conn->tcp, &b, 1);
    free(p);
}

/* Starts closing conn. Its request, if any, must have been detached by the caller. */
static void conn_close(struct https_conn *conn, const char *why)
{
    struct https_client *c = conn->c;
    assert(!conn->req);
    if (conn->closing)
        return;
    char q[HTTPS_LOG_REASON_MAX];
    log_debug("https_conn_close", "host=%s port=%s conn=%" PRIu64 " reason=%s", c->host, c->port,
              conn->id, quote(q, sizeof q, why));
    int was_idle = conn->state == CONN_IDLE;
    if (was_idle) {
        assert(c->n_idle > 0);
        c->n_idle--;
    }
    conn->closing = 1;
    uv_timer_stop(&conn->timer);
    uv_close((uv_handle_t *)&conn->timer, conn_handle_close_cb);
    if (conn->gai_active)
        uv_cancel((uv_req_t *)&conn->gai);
    if (conn->hs_active) /* if it already runs, its done callback lets go of conn */
        worker_cancel(c->worker, &conn->hs_job);
    if (conn->tcp_open && !uv_is_closing((uv_handle_t *)&conn->tcp)) {
        if (was_idle)
            conn_say_goodbye(conn);
        uv_close((uv_handle_t *)&conn->tcp, conn_tcp_close_cb);
    }
}

static void conn_arm_timer(struct https_conn *conn)
{
    uint64_t now = uv_now(conn->c->loop);
    uint64_t due;
    if (conn->state == CONN_IDLE) {
        due = conn->idle_since + HTTPS_IDLE_TIMEOUT_MS;
    } else {
        due = conn->req_deadline;
        if (conn->state < CONN_ACTIVE && conn->connect_deadline < due)
            due = conn->connect_deadline;
    }
    uv_timer_start(&conn->timer, conn_timer_cb, due > now ? due - now : 0, 0);
}

static void conn_timer_cb(uv_timer_t *t)
{
    static const char *const phase[] = {
        [CONN_RESOLVING] = "connect deadline passed while resolving",
        [CONN_CONNECTING] = "connect deadline passed while connecting",
        [CONN_TUNNEL] = "connect deadline passed while waiting for the proxy to open a tunnel",
        [CONN_HANDSHAKE] = "connect deadline passed during the TLS handshake",
    };
    struct https_conn *conn = t->data;
    uint64_t now = uv_now(conn->c->loop);
    if (conn->closing)
        return;
    if (conn->state == CONN_IDLE) {
        if (now >= conn->idle_since + HTTPS_IDLE_TIMEOUT_MS)
            conn_close(conn, "idle timeout");
        else
            conn_arm_timer(conn);
        return;
    }
    if (now >= conn->req_deadline)
        conn_fail(conn, HTTPS_E_TIMEOUT, "https_timeout", "request deadline passed");
    else if (conn->state < CONN_ACTIVE && now >= conn->connect_deadline)
        conn_fail(conn, HTTPS_E_TIMEOUT, "https_timeout", phase[conn->state]);
    else
        conn_arm_timer(conn);
}

/* Fails conn's request (or retries it once on a fresh connection when a reused connection broke
 * before any response byte) and closes conn. */
static void conn_fail(struct https_conn *conn, int err, const char *event, const char *reason)
{
    struct https_client *c = conn->c;
    struct https_request *req = conn->req;
    char q[HTTPS_LOG_REASON_MAX];
    char q2[HTTPS_LOG_REASON_MAX];
    conn->req = NULL;
    if (req && conn->reused && conn->resp_bytes == 0 && !req->retried && !c->freeing &&
        (err == HTTPS_E_IO || err == HTTPS_E_TLS)) {
        log_debug("https_retry", "host=%s port=%s conn=%" PRIu64 " reason=%s", c->host, c->port,
                  conn->id, quote(q, sizeof q, reason));
        struct buf reqbuf = conn->reqbuf;
        buf_init(&conn->reqbuf, HTTPS_MAX_REQUEST);
        int head_only = conn->head_only;
        uint64_t deadline = conn->req_deadline;
        conn_close(conn, reason);
        req->retried = 1;
        int r = conn_start(c, req, &reqbuf, deadline, head_only);
        if (r == 0)
            return;
        log_warn("https_resolve_failed", "host=%s port=%s%s reason=%s", c->host, c->port, c->via,
                 quote(q, sizeof q, uv_strerror(r)));
        req_complete(req, HTTPS_E_RESOLVE, NULL);
        return;
    }
    if (req && conn->proxy_status)
        log_warn(event, "host=%s port=%s conn=%" PRIu64 "%s proxy_status=%d error=%s reason=%s",
                 c->host, c->port, conn->id, c->via, conn->proxy_status,
                 quote(q, sizeof q, https_strerror(err)), quote(q2, sizeof q2, reason));
    else if (req)
        log_warn(event, "host=%s port=%s conn=%" PRIu64 "%s error=%s reason=%s", c->host, c->port,
                 conn->id, c->via, quote(q, sizeof q, https_strerror(err)),
                 quote(q2, sizeof q2, reason));
    conn_close(conn, reason);
    if (req)
        req_complete(req, err, NULL);
}

/* ---- I/O ---------------------------------------------------------------------------------- */

static void conn_write_cb(uv_write_t *wr, int status)
{
    struct https_write *w = wr->data;
    struct https_conn *conn = w->conn;
    if (w->secret)
        secret_zero(w->data, w->len);
    free(w->data);
    free(w);
    if (status >= 0 || status == UV_ECANCELED || conn->closing)
        return;
    if (conn->state == CONN_IDLE)
        conn_close(conn, uv_strerror(status));
    else
        conn_fail(conn, HTTPS_E_IO, "https_io_error", uv_strerror(status));
}

/* Writes the malloc'd p (taking it over; zeroed before it is freed when secret). Returns 0 or a
 * libuv error. */
static int conn_send(struct https_conn *conn, char *p, size_t len, int secret)
{
    struct https_write *w = xmalloc(sizeof *w);
    w->conn = conn;
    w->data = p;
    w->len = len;
    w->secret = secret;
    w->req.data = w;
    uv_buf_t b = uv_buf_init(p, (unsigned)len);
    int r = uv_write(&w->req, (uv_stream_t *)&conn->tcp, &b, 1, conn_write_cb);
    if (r < 0) {
        if (secret)
            secret_zero(p, len);
        free(p);
        free(w);
    }
    return r;
}

/* Sends whatever TLS queued. Returns 0 or a libuv error. */
static int conn_flush(struct https_conn *conn)
{
    size_t len;
    char *p = tls_conn_take_output(conn->tls, &len);
    if (!p)
        return 0;
    return conn_send(conn, p, len, 0);
}

/* Encrypts and sends the serialized request. Returns 0, HTTPS_E_TLS or HTTPS_E_IO; never calls
 * done (https_client_send relies on that). */
static int conn_write_request(struct https_conn *conn)
{
    enum tls_status st = tls_conn_write(conn->tls, conn->reqbuf.data, conn->reqbuf.len);
    secret_zero_registers(); /* mbedTLS copied the request (a secret's carrier) into its record */
    if (st != TLS_OK)
        return HTTPS_E_TLS;
    return conn_flush(conn) < 0 ? HTTPS_E_IO : 0;
}

/* Resets the per-request state and attaches req (taking over *reqbuf). */
static void conn_bind(struct https_conn *conn, struct https_request *req, struct buf *reqbuf,
                      uint64_t req_deadline, int head_only)
{
    assert(!conn->req); /* one request at a time */
    conn->req = req;
    req->conn = conn;
    buf_free(&conn->reqbuf);
    conn->reqbuf = *reqbuf;
    buf_init(reqbuf, HTTPS_MAX_REQUEST);
    conn->req_deadline = req_deadline;
    conn->head_only = head_only;
    llhttp_init(&conn->parser, HTTP_RESPONSE, &https_parser_settings);
    conn->parser.data = conn;
    conn->resp_bytes = 0;
    conn->msg_complete = 0;
    conn->too_large = 0;
    buf_free(&conn->body);
    conn->hname_len = 0;
    conn->hname_overflow = 0;
    conn->in_retry_after = 0;
    conn->have_retry_after = 0;
    conn->retry_after_len = 0;
}

static void conn_make_idle(struct https_conn *conn)
{
    struct https_client *c = conn->c;
    assert(!conn->req);
    set_state(conn, CONN_IDLE);
    conn->reused = 1;
    conn->idle_since = uv_now(c->loop);
    c->n_idle++;
    log_debug("https_conn_idle", "host=%s port=%s conn=%" PRIu64 " idle=%u", c->host, c->port,
              conn->id, c->n_idle);
    if (c->n_idle > HTTPS_MAX_IDLE_CONNS) {
        struct https_conn *oldest = NULL;
        for (struct https_conn *o = c->conns; o; o = o->next) {
            if (o != conn && o->state == CONN_IDLE && !o->closing &&
                (!oldest || o->idle_since < oldest->idle_since))
                oldest = o;
        }
        if (oldest)
            conn_close(oldest, "idle pool full");
    }
    conn_arm_timer(conn);
}

/* The response is complete. no_reuse: why conn cannot go back to the pool, or NULL. */
static void conn_response_done(struct https_conn *conn, const char *no_reuse)
{
    struct https_client *c = conn->c;
    struct https_request *req = conn->req;
    char retry_after[HTTPS_RETRY_AFTER_MAX + 1];
    if (!no_reuse && !llhttp_should_keep_alive(&conn->parser))
        no_reuse = "not keep-alive";
    struct https_response resp = {.status = conn->parser.status_code};
    struct buf body = conn->body;

    buf_init(&conn->body, c->max_response);
    if (conn->have_retry_after)
        memcpy(retry_after, conn->retry_after, conn->retry_after_len + 1);
    resp.retry_after = conn->have_retry_after ? retry_after : NULL;
    resp.body = body.data ? body.data : "";
    resp.body_len = body.len;
    conn->req = NULL;
    buf_free(&conn->reqbuf);
    log_debug("https_response", "host=%s port=%s conn=%" PRIu64 " status=%d bytes=%zu reused=%d",
              c->host, c->port, conn->id, resp.status, conn->resp_bytes, conn->reused);
    /* Pool (or close) before done runs, so that done may start the next request on it. */
    if (!no_reuse && tls_conn_ctx(conn->tls) != c->tls)
        no_reuse = "trust anchors replaced";
    if (no_reuse || c->freeing)
        conn_close(conn, no_reuse ? no_reuse : "client freed");
    else
        conn_make_idle(conn);
    req_complete(req, HTTPS_OK, &resp);
    buf_free(&body);
    secret_zero(retry_after, sizeof retry_after);
}

/* The peer closed (EOF or close_notify) while conn served a request. */
static void conn_peer_closed(struct https_conn *conn, const char *why)
{
    if (conn->resp_bytes > 0 && llhttp_message_needs_eof(&conn->parser)) {
        (void)llhttp_finish(&conn->parser); /* calls on_message_complete if the body was whole */
        if (conn->msg_complete) {
            conn_response_done(conn, why);
            return;
        }
    }
    conn_fail(conn, HTTPS_E_IO, "https_io_error", why);
}

/* Feeds plaintext to the parser. Returns 1 when the request is finished (done ran or will not),
 * 0 to keep reading. */
static int conn_parse(struct https_conn *conn, const char *data, size_t n)
{
    struct https_client *c = conn->c;
    size_t allowed = c->max_response - conn->resp_bytes;
    size_t feed = n < allowed ? n : allowed;
    char why[HTTPS_ERR_MAX];

    conn->resp_bytes += feed;
    llhttp_errno_t e = feed ? llhttp_execute(&conn->parser, data, feed) : HPE_OK;
    if (e == HPE_PAUSED && conn->msg_complete) {
        size_t used = (size_t)(llhttp_get_error_pos(&conn->parser) - data);
        int extra = used < n || tls_conn_has_input(conn->tls);
        conn_response_done(conn, extra ? "data after the response" : NULL);
        return 1;
    }
    if (e != HPE_OK && !conn->too_large) {
        const char *r = llhttp_get_error_reason(&conn->parser);
        snprintf(why, sizeof why, "%s: %s", llhttp_errno_name(e), r ? r : "");
        conn_fail(conn, HTTPS_E_PROTO, "https_bad_response", why);
        return 1;
    }
    if (e != HPE_OK || feed < n) {
        snprintf(why, sizeof why, "response over %zu bytes", c->max_response);
        conn_fail(conn, HTTPS_E_TOO_LARGE, "https_response_too_large", why);
        return 1;
    }
    return 0;
}

/* Decrypts and handles everything buffered. */
static void conn_pump(struct https_conn *conn)
{
    char plain[HTTPS_PLAIN_CHUNK];
    for (;;) {
        size_t got;
        enum tls_status st = tls_conn_read(conn->tls, plain, sizeof plain, &got);
        if (st == TLS_WANT_IO) {
            (void)conn_flush(conn); /* alerts; a failed write shows up in the write callback */
            break;
        }
        if (conn->state == CONN_IDLE) {
            conn_close(conn, st == TLS_CLOSED   ? "close_notify from peer"
                             : st == TLS_FAILED ? tls_conn_reason(conn->tls)
                                                : "unexpected data on an idle connection");
            break;
        }
        if (st == TLS_CLOSED) {
            conn_peer_closed(conn, "close_notify from peer");
            break;
        }
        if (st == TLS_FAILED) {
            conn_fail(conn, HTTPS_E_TLS, "tls_failed", tls_conn_reason(conn->tls));
            break;
        }
        if (conn_parse(conn, plain, got))
            break;
    }
    secret_zero(plain, sizeof plain);
}

static void conn_hs_work_cb(struct worker_job *j)
{
    struct https_conn *conn = j->data;
    tls_conn_handshake_step(conn->tls);
}

static void conn_hs_done_cb(struct worker_job *j, int canceled);

/* A handshake step is back from the worker. */
static void conn_hs_done_cb(struct worker_job *j, int canceled)
{
    struct https_conn *conn = j->data;
    struct https_client *c = conn->c;
    conn->hs_active = 0;
    if (conn->closing) { /* canceled, or closed while the step ran */
        conn_unref(conn);
        return;
    }
    conn_unref(conn); /* the timer still holds a reference */
    if (canceled) {   /* the worker's thread could not be started */
        conn_fail(conn, HTTPS_E_TLS, "tls_handshake_failed", "no thread for the handshake");
        return;
    }
    enum tls_status st = tls_conn_handshake_finish(conn->tls);
    int fr = conn_flush(conn);

    switch (st) {
    case TLS_WANT_IO: /* the peer's next flight: read again */
        if (fr == 0)
            fr = uv_read_start((uv_stream_t *)&conn->tcp, conn_alloc_cb, conn_read_cb);
        if (fr < 0)
            conn_fail(conn, HTTPS_E_IO, "https_io_error", uv_strerror(fr));
        return;
    case TLS_OK:
        break;
    case TLS_VERIFY_FAILED:
        conn_fail(conn, HTTPS_E_VERIFY, "tls_verify_failed", tls_conn_reason(conn->tls));
        return;
    default:
        conn_fail(conn, HTTPS_E_TLS, "tls_handshake_failed", tls_conn_reason(conn->tls));
        return;
    }
    log_debug("tls_handshake_done",
              "host=%s port=%s conn=%" PRIu64 " version=%s cipher=%s resumed=%d", c->host, c->port,
              conn->id, tls_conn_version(conn->tls), tls_conn_cipher(conn->tls),
              tls_conn_resumed(conn->tls));
    set_state(conn, CONN_ACTIVE);
    conn_arm_timer(conn);
    int r = conn_write_request(conn);
    if (r < 0) {
        conn_fail(conn, r, "https_io_error", "cannot send the request");
        return;
    }
    r = uv_read_start((uv_stream_t *)&conn->tcp, conn_alloc_cb, conn_read_cb);
    if (r < 0) {
        conn_fail(conn, HTTPS_E_IO, "https_io_error", uv_strerror(r));
        return;
    }
    conn_pump(conn); /* anything that arrived with the last handshake flight */
}

/* Advances the TLS handshake with what has been fed to it, on the client's worker thread
 * (worker.h): a full handshake's CPU work (the chain's signatures, the key exchange: milliseconds)
 * would otherwise stall every cached answer behind it. Until the step is back the worker owns
 * conn->tls, so reading stops (what arrives meanwhile waits in the socket) and nothing else
 * touches it. The worker runs one step at a time, the client's in order, which is also what tls.h
 * requires: one step at a time for the sessions of a tls_ctx. */
static void conn_handshake(struct https_conn *conn)
{
    assert(!conn->hs_active);
    (void)uv_read_stop((uv_stream_t *)&conn->tcp);
    conn->hs_job.work = conn_hs_work_cb;
    conn->hs_job.done = conn_hs_done_cb;
    conn->hs_active = 1;
    conn->refs++; /* until the step is back */
    worker_submit(conn->c->worker, &conn->hs_job);
}

/* ---- the tunnel through the proxy --------------------------------------------------------- */

/* Starts the TLS handshake with the origin (over the tunnel, if any). early: bytes of the TLS
 * stream that arrived with the proxy's answer. */
static void conn_start_tls(struct https_conn *conn, const char *early, size_t n)
{
    struct https_client *c = conn->c;
    char err[HTTPS_ERR_MAX];
    set_state(conn, CONN_HANDSHAKE);
    conn->tls = tls_conn_new(c->tls, c->tls_name, err, sizeof err);
    if (!conn->tls) {
        conn_fail(conn, HTTPS_E_TLS, "tls_handshake_failed", err);
        return;
    }
    if (n && tls_conn_feed(conn->tls, early, n) < 0) {
        conn_fail(conn, HTTPS_E_TLS, "tls_failed", "too much unread input");
        return;
    }
    conn_handshake(conn);
}

/* Asks the proxy for a tunnel to the origin. */
static void conn_tunnel_start(struct https_conn *conn)
{
    struct https_client *c = conn->c;
    const char *auth = c->proxy_auth ? c->proxy_auth : "";
    const char *auth_name = c->proxy_auth ? "Proxy-Authorization: " : "";
    const char *auth_end = c->proxy_auth ? "\r\n" : "";
    set_state(conn, CONN_TUNNEL);
    conn->proxy_status = 0;
    proxy_answer_init(&conn->answer, HTTPS_PROXY_RESPONSE_MAX);
    /* Sized up front and written once, so that no copy of the credentials is left behind by a
     * reallocation; conn_send zeroes the buffer once it is written. */
    int n = snprintf(NULL, 0, HTTPS_CONNECT_FMT, c->connect_target, c->connect_target, auth_name,
                     auth, auth_end);
    if (n < 0) {
        conn_fail(conn, HTTPS_E_PROXY, "https_proxy_failed", "cannot build the CONNECT request");
        return;
    }
    char *msg = xmalloc((size_t)n + 1);
    snprintf(msg, (size_t)n + 1, HTTPS_CONNECT_FMT, c->connect_target, c->connect_target, auth_name,
             auth, auth_end);
    log_debug("https_proxy_connect", "host=%s port=%s conn=%" PRIu64 "%s auth=%d", c->host, c->port,
              conn->id, c->via, c->proxy_auth != NULL);
    int r = conn_send(conn, msg, (size_t)n, 1); /* takes msg over */
    if (r < 0)
        conn_fail(conn, HTTPS_E_IO, "https_io_error", uv_strerror(r));
}

/* Bytes from the proxy while waiting for its answer to CONNECT. */
static void conn_tunnel_input(struct https_conn *conn, const char *data, size_t n)
{
    struct https_client *c = conn->c;
    char why[HTTPS_ERR_MAX];
    char q[HTTPS_LOG_REASON_MAX];
    size_t used;

    switch (proxy_answer_feed(&conn->answer, data, n, &used, why, sizeof why)) {
    case PROXY_ANSWER_MORE:
        return;
    case PROXY_ANSWER_OPEN:
        log_debug("https_tunnel_open", "host=%s port=%s conn=%" PRIu64 "%s status=%d reason=%s",
                  c->host, c->port, conn->id, c->via, conn->answer.status,
                  quote(q, sizeof q, conn->answer.reason));
        /* Whatever followed the answer already belongs to the origin's TLS stream. */
        conn_start_tls(conn, data + used, n - used);
        return;
    case PROXY_ANSWER_REFUSED:
        conn->proxy_status = conn->answer.status;
        conn_fail(conn, HTTPS_E_PROXY, "https_proxy_refused", why);
        return;
    default:
        conn_fail(conn, HTTPS_E_PROXY, "https_proxy_bad_response", why);
    }
}

static void conn_alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    struct https_conn *conn = h->data;
    (void)hint;
    *b = uv_buf_init(conn->rbuf, sizeof conn->rbuf);
}

static void conn_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct https_conn *conn = s->data;
    assert(!conn->hs_active); /* reading stops meanwhile */
    if (conn->closing || nread == 0)
        return;
    if (nread < 0) {
        const char *why = nread == UV_EOF ? "connection closed by peer" : uv_strerror((int)nread);
        if (conn->state == CONN_IDLE)
            conn_close(conn, why);
        else if (conn->state == CONN_TUNNEL)
            conn_fail(conn, HTTPS_E_IO, "https_proxy_failed",
                      nread == UV_EOF ? "proxy closed the connection before answering CONNECT"
                                      : uv_strerror((int)nread));
        else if (conn->state == CONN_HANDSHAKE)
            conn_fail(conn, HTTPS_E_TLS, "tls_handshake_failed", why);
        else
            conn_peer_closed(conn, why);
        return;
    }
    if (conn->state == CONN_TUNNEL) {
        conn_tunnel_input(conn, b->base, (size_t)nread);
        return;
    }
    if (tls_conn_feed(conn->tls, b->base, (size_t)nread) < 0) {
        if (conn->state == CONN_IDLE)
            conn_close(conn, "too much unread input");
        else
            conn_fail(conn, HTTPS_E_TLS, "tls_failed", "too much unread input");
        return;
    }
    if (conn->state == CONN_HANDSHAKE)
        conn_handshake(conn);
    else
        conn_pump(conn);
}

static void conn_connect_cb(uv_connect_t *cr, int status)
{
    struct https_conn *conn = cr->data;
    struct https_client *c = conn->c;
    char q[HTTPS_LOG_REASON_MAX];

    if (conn->closing || status == UV_ECANCELED)
        return;
    if (status < 0) {
        conn->last_err = status;
        log_debug("https_connect_attempt_failed",
                  "host=%s port=%s conn=%" PRIu64 "%s addr=%s reason=%s", c->host, c->port,
                  conn->id, c->via, conn->addr, quote(q, sizeof q, uv_strerror(status)));
        uv_close((uv_handle_t *)&conn->tcp, conn_tcp_close_cb); /* goes on with the next address */
        return;
    }
    log_debug("https_connected", "host=%s port=%s conn=%" PRIu64 "%s addr=%s", c->host, c->port,
              conn->id, c->via, conn->addr);
    (void)uv_tcp_nodelay(&conn->tcp, 1);
    int r = uv_read_start((uv_stream_t *)&conn->tcp, conn_alloc_cb, conn_read_cb);
    if (r < 0) {
        conn_fail(conn, HTTPS_E_IO, "https_io_error", uv_strerror(r));
        return;
    }
    if (c->proxy_host)
        conn_tunnel_start(conn);
    else
        conn_start_tls(conn, NULL, 0);
}

static void conn_try_connect(struct https_conn *conn)
{
    struct https_client *c = conn->c;
    char q[HTTPS_LOG_REASON_MAX];
    struct addrinfo *ai;

    while ((ai = conn->next_addr)) {
        conn->next_addr = ai->ai_next;
        if (ai->ai_family == AF_INET)
            uv_ip4_name((const struct sockaddr_in *)ai->ai_addr, conn->addr, sizeof conn->addr);
        else if (ai->ai_family == AF_INET6)
            uv_ip6_name((const struct sockaddr_in6 *)ai->ai_addr, conn->addr, sizeof conn->addr);
        else
            continue;
        int r = uv_tcp_init(c->loop, &conn->tcp);
        if (r < 0) {
            conn->last_err = r;
            continue;
        }
        conn->tcp.data = conn;
        conn->tcp_open = 1;
        conn->refs++;
        r = uv_tcp_connect(&conn->connect_req, &conn->tcp, ai->ai_addr, conn_connect_cb);
        if (r == 0) {
            log_debug("https_connecting", "host=%s port=%s conn=%" PRIu64 "%s addr=%s", c->host,
                      c->port, conn->id, c->via, conn->addr);
            return;
        }
        conn->last_err = r;
        log_debug("https_connect_attempt_failed",
                  "host=%s port=%s conn=%" PRIu64 "%s addr=%s reason=%s", c->host, c->port,
                  conn->id, c->via, conn->addr, quote(q, sizeof q, uv_strerror(r)));
        uv_close((uv_handle_t *)&conn->tcp, conn_tcp_close_cb); /* goes on with the next address */
        return;
    }
    const char *why = conn->last_err ? uv_strerror(conn->last_err) : "no usable address";
    char pwhy[HTTPS_ERR_MAX];
    if (c->proxy_host) {
        snprintf(pwhy, sizeof pwhy, "cannot connect to the proxy: %s", why);
        why = pwhy;
    }
    conn_fail(conn, HTTPS_E_CONNECT, "https_connect_failed", why);
}

static void conn_gai_cb(uv_getaddrinfo_t *g, int status, struct addrinfo *res)
{
    struct https_conn *conn = g->data;
    struct https_client *c = conn->c;
    conn->gai_active = 0;
    if (conn->closing) {
        uv_freeaddrinfo(res);
        conn_unref(conn);
        return;
    }
    conn_unref(conn); /* the timer still holds a reference */
    if (status < 0) {
        char why[HTTPS_ERR_MAX];
        snprintf(why, sizeof why, "%s%s", c->proxy_host ? "cannot resolve the proxy: " : "",
                 uv_strerror(status));
        conn_fail(conn, HTTPS_E_RESOLVE, "https_resolve_failed", why);
        return;
    }
    unsigned n = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next)
        n++;
    log_debug("https_resolved", "host=%s port=%s conn=%" PRIu64 "%s addresses=%u", c->host, c->port,
              conn->id, c->via, n);
    conn->addrs = res;
    conn->next_addr = res;
    set_state(conn, CONN_CONNECTING);
    conn_try_connect(conn);
}

/* Starts a fresh connection for req, taking over *reqbuf. Returns 0, or a libuv error with req
 * detached again (and never calls done). */
static int conn_start(struct https_client *c, struct https_request *req, struct buf *reqbuf,
                      uint64_t req_deadline, int head_only)
{
    struct https_conn *conn = conn_new(c);
    struct addrinfo hints;

    /* a new connection is resolving (CONN_RESOLVING is 0) */
    conn->connect_deadline = uv_now(c->loop) + c->connect_timeout_ms;
    conn_bind(conn, req, reqbuf, req_deadline, head_only);
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = AI_NUMERICSERV;
    const char *dial_host = c->proxy_host ? c->proxy_host : c->host;
    const char *dial_port = c->proxy_host ? c->proxy_port : c->port;
    int r = uv_getaddrinfo(c->loop, &conn->gai, conn_gai_cb, dial_host, dial_port, &hints);
    if (r < 0) {
        conn->req = NULL;
        req->conn = NULL;
        conn_close(conn, uv_strerror(r));
        return r;
    }
    conn->gai_active = 1;
    conn->refs++;
    conn_arm_timer(conn);
    log_debug("https_resolving", "host=%s port=%s conn=%" PRIu64 "%s retry=%d", c->host, c->port,
              conn->id, c->via, req->retried);
    return 0;
}

/* ---- public API --------------------------------------------------------------------------- */

static int host_is_valid(const char *h)
{
    if (!*h)
        return 0;
    for (; *h; h++) {
        unsigned char ch = (unsigned char)*h;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '-' || ch == '_' || ch == ':'))
            return 0;
    }
    return 1;
}

static int port_parse(const char *p)
{
    long v = 0;
    if (!*p || strlen(p) > 5)
        return -1;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (*p - '0');
    }
    return v >= 1 && v <= HTTPS_PORT_MAX ? (int)v : -1;
}

int https_client_new(struct https_client **out, uv_loop_t *loop, const struct https_client_opts *o,
                     char *err, size_t errlen)
{
    struct tls_ctx *tls;
    char tmp[HTTPS_ERR_MAX];
    *out = NULL;
    if (!err || !errlen) {
        err = tmp;
        errlen = sizeof tmp;
    }
    if (!o->host || !host_is_valid(o->host)) {
        snprintf(err, errlen, "host=%s: not a DNS name or IP address", o->host ? o->host : "");
        return -1;
    }
    int port = o->port ? port_parse(o->port) : -1;
    if (port < 0) {
        snprintf(err, errlen, "port=%s: not a TCP port number", o->port ? o->port : "");
        return -1;
    }
    if (o->proxy &&
        (!o->proxy->host || !host_is_valid(o->proxy->host) || port_parse(o->proxy->port) < 0)) {
        snprintf(err, errlen, "proxy=%s: not a usable proxy", proxy_describe(o->proxy));
        return -1;
    }
    if (o->tls_name && !host_is_valid(o->tls_name)) {
        snprintf(err, errlen, "tls_name=%s: not a DNS name or IP address", o->tls_name);
        return -1;
    }
    const char *origin = o->origin_host ? o->origin_host : o->host;
    int origin_port = o->origin_host ? port_parse(o->origin_port ? o->origin_port : "") : port;
    if (!host_is_valid(origin) || origin_port < 0) {
        snprintf(err, errlen, "origin=%s: not a host and port", origin);
        return -1;
    }
    if (o->tls)
        tls = tls_ctx_ref(o->tls);
    else if (tls_ctx_new(&tls, o->ca_file, err, errlen) < 0)
        return -1;

    struct https_client *c = xcalloc(1, sizeof *c);
    struct buf hh;
    c->loop = loop;
    c->tls = tls;
    if (worker_new(&c->worker, loop, err, errlen) < 0) {
        client_destroy(c);
        return -1;
    }
    c->host = xstrdup(o->host);
    c->port = xstrdup(o->port);
    c->tls_name = xstrdup(o->tls_name ? o->tls_name : o->host);
    c->connect_timeout_ms =
        o->connect_timeout_ms ? o->connect_timeout_ms : HTTPS_DEFAULT_CONNECT_TIMEOUT_MS;
    c->request_timeout_ms =
        o->request_timeout_ms ? o->request_timeout_ms : HTTPS_DEFAULT_REQUEST_TIMEOUT_MS;
    c->max_response = o->max_response ? o->max_response : HTTPS_DEFAULT_MAX_RESPONSE;
    buf_init(&hh, HTTPS_ERR_MAX);
    int bracket = strchr(origin, ':') != NULL;
    if (buf_printf(&hh, "%s%s%s", bracket ? "[" : "", origin, bracket ? "]" : "") < 0 ||
        (origin_port != 443 && buf_printf(&hh, ":%d", origin_port) < 0)) {
        snprintf(err, errlen, "host=%s: too long", o->host);
        buf_free(&hh);
        client_destroy(c);
        return -1;
    }
    c->host_header = hh.data;
    if (o->proxy) {
        char q[HTTPS_VIA_MAX - sizeof " proxy="];
        const char *desc = proxy_describe(o->proxy);
        c->proxy_host = xstrdup(o->proxy->host);
        c->proxy_port = xstrdup(o->proxy->port);
        c->proxy_auth = o->proxy->authorization ? xstrdup(o->proxy->authorization) : NULL;
        buf_init(&hh, HTTPS_ERR_MAX);
        bracket = strchr(o->host, ':') != NULL;
        if (buf_printf(&hh, "%s%s%s:%d", bracket ? "[" : "", o->host, bracket ? "]" : "", port) <
            0) {
            snprintf(err, errlen, "host=%s: too long", o->host);
            buf_free(&hh);
            client_destroy(c);
            return -1;
        }
        c->connect_target = hh.data;
        snprintf(c->via, sizeof c->via, " proxy=%s", quote(q, sizeof q, desc));
    }
    *out = c;
    return 0;
}

/* A method or request target: visible ASCII without spaces. */
static int token_is_valid(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++) {
        if ((unsigned char)*s <= ' ' || (unsigned char)*s >= 0x7f)
            return 0;
    }
    return 1;
}

/* Extra header lines: each ends in CRLF, no blank line, no bare CR or LF. */
static int headers_are_valid(const char *h)
{
    size_t n = strlen(h);
    if (n == 0)
        return 1;
    if (n < 2 || h[n - 2] != '\r' || h[n - 1] != '\n')
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (h[i] == '\r' && (h[i + 1] != '\n' || i == 0 || h[i - 1] == '\n'))
            return 0;
        if (h[i] == '\n' && (i == 0 || h[i - 1] != '\r'))
            return 0;
    }
    return 1;
}

int https_client_send(struct https_client *c, struct https_request *req)
{
    struct buf rb;
    if (!c || !req || !req->method || !req->path || !req->done || (req->body_len && !req->body) ||
        !token_is_valid(req->method) || !token_is_valid(req->path) ||
        (req->headers && !headers_are_valid(req->headers)))
        return HTTPS_E_PROTO;
    if (c->freeing)
        return HTTPS_E_CANCELED;

    buf_init(&rb, HTTPS_MAX_REQUEST);
    if (buf_printf(&rb,
                   "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: imdsd/%s\r\nContent-Length: %zu\r\n"
                   "Connection: keep-alive\r\n%s\r\n",
                   req->method, req->path, c->host_header, IMDSD_VERSION, req->body_len,
                   req->headers ? req->headers : "") < 0 ||
        buf_append(&rb, req->body, req->body_len) < 0) {
        buf_free(&rb);
        return HTTPS_E_PROTO;
    }

    uv_update_time(c->loop);
    uint64_t deadline = uv_now(c->loop) + c->request_timeout_ms;
    int head_only = strcmp(req->method, "HEAD") == 0;
    req->client = c;
    req->conn = NULL;
    req->retried = 0;
    req->next = c->pending;
    c->pending = req;

    /* The most recently pooled idle connection, if any. */
    struct https_conn *conn = NULL;
    for (struct https_conn *o = c->conns; o; o = o->next) {
        if (o->state == CONN_IDLE && !o->closing && (!conn || o->idle_since > conn->idle_since))
            conn = o;
    }
    if (conn) {
        assert(c->n_idle > 0);
        c->n_idle--;
        set_state(conn, CONN_ACTIVE);
        conn_bind(conn, req, &rb, deadline, head_only);
        log_debug("https_conn_reuse", "host=%s port=%s conn=%" PRIu64, c->host, c->port, conn->id);
        conn_arm_timer(conn);
        if (conn_write_request(conn) == 0)
            return 0;
        /* Broke under us: start over on a fresh connection (done must not run from here). */
        rb = conn->reqbuf;
        buf_init(&conn->reqbuf, HTTPS_MAX_REQUEST);
        conn->req = NULL;
        req->conn = NULL;
        conn_close(conn, "cannot send on a reused connection");
    }
    int r = conn_start(c, req, &rb, deadline, head_only);
    buf_free(&rb);
    if (r < 0) {
        char q[HTTPS_LOG_REASON_MAX];
        log_warn("https_resolve_failed", "host=%s port=%s%s reason=%s", c->host, c->port, c->via,
                 quote(q, sizeof q, uv_strerror(r)));
        pending_remove(c, req);
        req->client = NULL;
        return HTTPS_E_RESOLVE;
    }
    return 0;
}

void https_client_cancel(struct https_request *req)
{
    if (!req || !req->client)
        return;
    struct https_conn *conn = req->conn;
    pending_remove(req->client, req);
    req->client = NULL;
    req->conn = NULL;
    if (conn) {
        conn->req = NULL;
        conn_close(conn, "request canceled");
    }
}

void https_client_set_tls(struct https_client *c, struct tls_ctx *tls)
{
    tls_ctx_ref(tls);
    tls_ctx_free(c->tls);
    c->tls = tls;
    for (struct https_conn *conn = c->conns; conn; conn = conn->next)
        if (conn->state == CONN_IDLE && !conn->closing)
            conn_close(conn, "trust anchors replaced");
}

unsigned https_client_handshake_steps(const struct https_client *c, unsigned *waiting)
{
    if (waiting)
        *waiting = worker_queued(c->worker);
    return worker_outstanding(c->worker);
}

void https_client_free(struct https_client *c)
{
    if (!c || c->freeing)
        return;
    c->freeing = 1;
    while (c->pending) {
        struct https_request *req = c->pending;
        struct https_conn *conn = req->conn;
        if (conn) {
            conn->req = NULL;
            conn_close(conn, "client freed");
        }
        req_complete(req, HTTPS_E_CANCELED, NULL);
    }
    for (struct https_conn *conn = c->conns; conn; conn = conn->next)
        conn_close(conn, "client freed");
    if (!c->conns)
        client_destroy(c);
}

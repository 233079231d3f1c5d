#include "http_server.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <llhttp.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "buf.h"
#include "log.h"
#include "metrics.h"
#include "util.h"

enum conn_state {
    CONN_READING,  /* parsing a request */
    CONN_HANDLING, /* the handler owns the request */
    CONN_WRITING,  /* response queued */
    CONN_CLOSING,
};

static const char *const state_names[] = {"reading", "handling", "writing", "closing"};
_Static_assert(sizeof state_names / sizeof *state_names == CONN_CLOSING + 1,
               "a name for every conn_state");
_Static_assert(CONN_READING == 0, "serve_accepted's xcalloc starts a connection reading");

#define TO(s) (1u << (s))
/* The states each state may change to (set_state), as a set of bits: any but closing closes. */
static const unsigned conn_next[] = {
    [CONN_READING] = TO(CONN_HANDLING) | TO(CONN_CLOSING), /* dispatch or reject; conn_close */
    [CONN_HANDLING] = TO(CONN_WRITING) | TO(CONN_CLOSING), /* respond */
    [CONN_WRITING] = TO(CONN_READING) | TO(CONN_CLOSING),  /* on_write: the next request */
    [CONN_CLOSING] = 0,
};
#undef TO

enum header_kind { H_OTHER, H_METADATA, H_XFF, H_IDENTITY, H_SECRET, H_AUTH, H_HOST, H_CTYPE };

/* A connection starts "bare": an accepted socket with no libuv handle and no epoll registration.
 * serve_accepted reads the request at once and, when the answer is ready at once and the client
 * asked to close (the common one-request case), writes it and closes the socket: accept4, read,
 * writev, close, where a libuv stream also costs an epoll_ctl ADD and DEL and a final accept4
 * that finds the queue empty. Anything that must wait (a partial request, keep-alive, a request
 * the handler answers later, a response the socket cannot take at once) first attaches the socket
 * to libuv (conn_attach). A bare connection never outlives serve_accepted's stack. */
struct http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer; /* idle check; runs all the time, see on_timeout */
    int fd;
    int bare;               /* no libuv handles yet: fd is the socket */
    int tag;                /* the listener's */
    uint64_t last_active;   /* loop time of the last response, or of the accept */
    uint64_t request_start; /* loop time of a request's first byte, while it is arriving */
    uint64_t handle_start;  /* loop time the handler got the request (CONN_HANDLING) */
    uint64_t stall_start;   /* loop time an answer was queued that the socket did not take */
    int arriving;           /* part of a request is in: on_message_begin ran, not complete */
    unsigned pool;          /* the listener tag's connection pool */
    size_t held;            /* storage of url, body, pending and out, counted in server->held */
    uv_write_t wreq;
    struct http_server *server;
    struct http_conn *prev, *next;
    llhttp_t parser;
    enum conn_state state;
    int handles_open; /* tcp + timer, freed when both closed */
    int keep_alive;
    int close_after_write;
    int in_drive; /* drive() is on the stack: do not re-enter */
    int reading;  /* uv_read_start is active */
    int peer_eof; /* the client half-closed: answer what it sent, then close */
    int nodelay;  /* TCP_NODELAY is set, see set_nodelay */
    /* the request being parsed or handled */
    struct buf url;
    char hname[24];
    size_t hname_len;
    enum header_kind hkind;
    char hval[32];
    size_t hval_len;
    char idval[HTTP_SECRET_HEADER_MAX]; /* X-IDENTITY-HEADER; zeroed after each request */
    size_t idval_len;
    char secval[HTTP_SECRET_HEADER_MAX]; /* `secret` (App Service 2017-09-01); zeroed likewise */
    size_t secval_len;
    char authval[HTTP_SECRET_HEADER_MAX]; /* Authorization (the Azure Arc key); zeroed likewise */
    size_t authval_len;
    char ctype[64]; /* Content-Type, enough to tell a form */
    size_t ctype_len;
    struct buf body;          /* a POST's body (Cloud Shell's form), up to HTTP_MAX_BODY */
    char host[HTTP_MAX_HOST]; /* the Host header (host_len may be more than is kept) */
    size_t host_len;
    int headers_done; /* past the header section: trailer fields count for nothing */
    size_t header_bytes;
    unsigned nheaders;
    size_t body_bytes;
    int reject_status; /* set by a callback that hit a cap */
    unsigned endpoint; /* metrics: what answers the request (EP_OTHER until the handler says) */
    struct http_request req;
    http_abort_cb *abort_cb;
    void *abort_arg;
    /* bytes received while a request is being handled (pipelining) */
    struct buf pending;
    struct buf out; /* the part of an answer the socket did not take at once */
};

struct http_listener {
    uv_poll_t poll; /* on the listening socket; connections are accepted by hand */
    int fd;
    int tag;
    struct http_server *server;
    struct http_listener *next;
};

struct http_server {
    uv_loop_t *loop;
    struct http_server_opts opts;
    http_handler_cb *handler;
    void *arg;
    struct http_listener *listeners;
    struct http_conn *conns;
    unsigned nconns;
    unsigned pool_conns[HTTP_POOLS];
    size_t held, budget; /* bytes kept for clients (see http_server_opts.buffer_budget) */
    /* one buffer for every body rendered: a handler renders and answers in one go (respond copies
     * what the socket does not take), so no connection needs one of its own */
    struct buf scratch;
    unsigned open_handles; /* listeners + connections not yet closed */
    int freeing;
    llhttp_settings_t settings;
    uint64_t rejected; /* at the connection limit (metrics.connections_refused counts more) */
    uint64_t accept_failed;
    uv_timer_t accept_pause; /* out of descriptors: listeners rest, see on_listen_ready */
    int paused;
    /* connections allocated (closed ones too, until their handles have closed), the most of them
     * since memory was last given back, and whether a flood is ebbing */
    unsigned live, high;
    int ebbing;
    int reserve_fd; /* closed to accept and drop a connection when out of descriptors */
    /* graceful shutdown */
    int draining;
    uv_timer_t grace;
    void (*drained)(void *arg);
    void *drained_arg;
};

#define TRIM_AFTER 128 /* connections: a flood, after which memory is given back */
#define TRIM_LOW   8   /* connections: the flood is over */

/* Every change of a connection's state goes through here: one allowed by conn_next, traced at
 * debug level. */
static void set_state(struct http_conn *c, enum conn_state to)
{
    assert(conn_next[c->state] & (1u << to));
    log_debug("http_conn_state", "fd=%d from=%s to=%s", c->fd, state_names[c->state],
              state_names[to]);
    c->state = to;
}

static char read_buf[65536]; /* one loop, one reader at a time */

static void conn_close(struct http_conn *c);
static void drive(struct http_conn *c);
static void watch_arrival(struct http_conn *c);
static void respond(struct http_conn *c, int status, const char *content_type,
                    const char *extra_headers, const char *body, size_t len);
static void on_drained(uv_timer_t *t);
static void maybe_free_server(struct http_server *s);
static void update_reading(struct http_conn *c);

/* ---- what connections keep for their clients --------------------------------------------- */

/* Re-counts the storage of c's buffers into the server's total (after they may have changed). */
static void account(struct http_conn *c)
{
    size_t held = c->url.cap + c->body.cap + c->pending.cap + c->out.cap;
    assert(c->server->held >= c->held); /* the sum of every connection's */
    c->server->held = c->server->held - c->held + held;
    c->held = held;
}

/* Gives back what c keeps for its client (c is closing, or its request is over). */
static void release_buffers(struct http_conn *c)
{
    buf_free(&c->url);
    buf_free(&c->body);
    buf_free(&c->pending);
    buf_free(&c->out);
    account(c);
}

/* The connection, other than keep, whose kept bytes have waited longest: an answer its client
 * has not taken in (the oldest stall first), else a request still arriving (the oldest first).
 * Input pipelined behind a request being answered is not taken: the client is waiting for that
 * answer, and the bytes are bounded by reading no more while the budget is spent (on_alloc). */
static struct http_conn *stalest(struct http_server *s, const struct http_conn *keep)
{
    struct http_conn *best = NULL;
    int best_rank = 0;
    uint64_t best_t = 0;
    for (struct http_conn *c = s->conns; c; c = c->next) {
        int rank;
        uint64_t t;
        if (c == keep || c->in_drive || !c->held)
            continue;
        if (c->state == CONN_WRITING)
            rank = 2, t = c->stall_start;
        else if (c->state == CONN_READING && c->arriving)
            rank = 1, t = c->request_start;
        else
            continue;
        if (rank > best_rank || (rank == best_rank && t <= best_t))
            best = c, best_rank = rank, best_t = t;
    }
    return best;
}

/* Counts a connection closed, or its pipelined input dropped, for the budget (what: which). */
static void count_shed(struct http_server *s, const char *what)
{
    if (log_sampled(&metrics.connections_shed))
        log_warn("http_buffer_budget", "budget_bytes=%zu closed=%s shed_total=%llu", s->budget,
                 what, (unsigned long long)metrics.connections_shed);
}

/* Keeps server->held within the budget by closing the stalest holders other than c. Returns -1
 * when that is not enough: c must then give up what it holds. */
static int within_budget(struct http_conn *c)
{
    struct http_server *s = c->server;
    while (s->held > s->budget) {
        struct http_conn *v = stalest(s, c);
        if (!v)
            return -1;
        count_shed(s, v->state == CONN_WRITING ? "stalled_answer" : "arriving");
        conn_close(v); /* gives its buffers back at once */
    }
    return 0;
}

/* After c's parser or its pipelined input took more storage: within the budget, or c gives up
 * what it cannot keep. A request still arriving cannot be kept: c closes. Pipelined requests
 * behind a complete one are dropped and c closes after answering it, with Connection: close: a
 * client retries what a closed connection did not answer (RFC 9112, section 9.3.2). Returns -1
 * when c closed. */
static int keep_within_budget(struct http_conn *c)
{
    account(c);
    if (within_budget(c) == 0)
        return 0;
    count_shed(c->server, c->arriving ? "arriving" : "pipelined");
    if (c->arriving) {
        conn_close(c);
        return -1;
    }
    if (!c->pending.len)
        return 0; /* nothing of c's to give up: the budget is held by requests being answered */
    buf_free(&c->pending);
    account(c);
    c->close_after_write = 1;
    update_reading(c);
    return 0;
}

/* ---- response writing -------------------------------------------------------------------- */

static const char *status_text(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 413:
        return "Payload Too Large";
    case 414:
        return "URI Too Long";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Unknown";
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b);
static void on_timeout(uv_timer_t *t);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);

/* A response is one writev, so Nagle cannot hold it back while nothing else is in flight. Once a
 * connection carries a second request (pipelining) or a response needs a second write, it could:
 * switch it off then. Like nginx's tcp_nodelay, this spares one-request connections a syscall. */
static void set_nodelay(struct http_conn *c)
{
    if (!c->nodelay) {
        uv_tcp_nodelay(&c->tcp, 1);
        c->nodelay = 1;
    }
}

/* Gives a bare connection its libuv handles: the socket, reading, and the idle timer. */
static int conn_attach(struct http_conn *c)
{
    if (!c->bare)
        return 0;
    struct http_server *s = c->server;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->bare = 0;
    c->handles_open = 2;
    if (uv_tcp_open(&c->tcp, c->fd) < 0) {
        close(c->fd); /* the handle did not take it; conn_close closes the two handles */
        return -1;
    }
    uv_timer_start(&c->timer, on_timeout, s->opts.idle_timeout_ms, s->opts.idle_timeout_ms);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0)
        return -1;
    c->reading = 1;
    return 0;
}

/* Reads while the client may still send and there is room to keep what it sends: a client
 * pipelining faster than its requests are answered waits in its socket. Nothing is read while an
 * answer waits for the client to take it in: what it sends meanwhile stays in its socket, so a
 * client that never reads costs its answer and no more. */
static void update_reading(struct http_conn *c)
{
    int want = !c->peer_eof && !c->close_after_write && c->state != CONN_WRITING &&
               c->pending.len < HTTP_MAX_PENDING;
    if (c->bare || c->state == CONN_CLOSING || want == c->reading)
        return;
    if (!want)
        uv_read_stop((uv_stream_t *)&c->tcp);
    else if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0)
        return;
    c->reading = want;
}

static void on_write(uv_write_t *w, int status)
{
    struct http_conn *c = w->data;
    if (c->state == CONN_CLOSING)
        return;
    /* once draining, a response is the connection's last, even one started before */
    if (status < 0 || c->close_after_write || !c->keep_alive || c->server->draining) {
        conn_close(c);
        return;
    }
    if (c->out.cap) {
        buf_free(&c->out); /* an answer the socket took in more than one go: rare, give it back */
        account(c);
    }
    set_state(c, CONN_READING);
    c->last_active = uv_now(c->server->loop);
    llhttp_resume(&c->parser);
    if (conn_attach(c) < 0) {
        conn_close(c);
        return;
    }
    set_nodelay(c);
    drive(c);
    update_reading(c);
    watch_arrival(c);
}

/* Appends the decimal form of v at p; returns the end. */
static char *put_uint(char *p, size_t v)
{
    char tmp[24];
    int n = 0;
    do
        tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_str(char *p, const char *s, size_t n)
{
    memcpy(p, s, n);
    return p + n;
}

#define PUT_LIT(p, lit) put_str(p, lit, sizeof lit - 1)

static const char JSON_TYPE[] = "application/json; charset=utf-8";

void http_conn_respond(struct http_conn *c, int status, const char *extra_headers, const char *body,
                       size_t len)
{
    respond(c, status, JSON_TYPE, extra_headers, body, len);
}

void http_conn_respond_type(struct http_conn *c, int status, const char *content_type,
                            const char *body, size_t len)
{
    respond(c, status, content_type, NULL, body, len);
}

static void respond(struct http_conn *c, int status, const char *content_type,
                    const char *extra_headers, const char *body, size_t len)
{
    /* once per request, and never after its abort callback ran (http_handler_cb) */
    assert(c->state == CONN_HANDLING);
    c->abort_cb = NULL;
    set_state(c, CONN_WRITING);
    metrics_request(c->endpoint, status);
    /* the request is over: a long URL or a body is not kept for a connection's next request */
    if (c->url.cap > 1024 || c->body.cap) {
        if (c->url.cap > 1024)
            buf_free(&c->url);
        buf_free(&c->body);
        account(c);
    }
    /* a client that never reads its response is dropped like an idle one */
    c->last_active = uv_now(c->server->loop);
    if (c->server->draining)
        c->close_after_write = 1;
    int close = c->close_after_write || !c->keep_alive;
    const char *text = status_text(status);
    size_t extra = extra_headers ? strlen(extra_headers) : 0;
    char head[512];
    if (extra > sizeof head - 200) {
        conn_close(c);
        return;
    }
    /* formatted by hand: this runs for every request */
    char *p = PUT_LIT(head, "HTTP/1.1 ");
    p = put_uint(p, (size_t)status);
    *p++ = ' ';
    p = put_str(p, text, strlen(text));
    p = PUT_LIT(p, "\r\nContent-Type: ");
    p = content_type == JSON_TYPE ? PUT_LIT(p, JSON_TYPE)
                                  : put_str(p, content_type, strlen(content_type));
    p = PUT_LIT(p, "\r\nContent-Length: ");
    p = put_uint(p, len);
    p = PUT_LIT(p, "\r\n");
    p = put_str(p, extra_headers ? extra_headers : "", extra);
    if (close)
        p = PUT_LIT(p, "Connection: close\r\n");
    p = PUT_LIT(p, "\r\n");
    size_t hlen = (size_t)(p - head);
    /* try to send header and body straight away; copy only what the socket did not take */
    ssize_t n;
    if (c->bare) {
        struct iovec iov[2] = {{head, hlen}, {(char *)body, len}};
        do
            n = writev(c->fd, iov, 2);
        while (n < 0 && errno == EINTR);
    } else {
        uv_buf_t bufs[2] = {uv_buf_init(head, (unsigned)hlen),
                            uv_buf_init((char *)body, (unsigned)len)};
        n = uv_try_write((uv_stream_t *)&c->tcp, bufs, 2);
    }
    size_t sent = n > 0 ? (size_t)n : 0;
    if (sent == hlen + len) {
        on_write(&c->wreq, 0);
        return;
    }
    if (c->bare && n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        conn_close(c); /* reset by the client */
        return;
    }
    buf_reset(&c->out);
    if ((sent < hlen && buf_append(&c->out, head + sent, hlen - sent) < 0) ||
        buf_append(&c->out, body + (sent > hlen ? sent - hlen : 0),
                   len - (sent > hlen ? sent - hlen : 0)) < 0) {
        conn_close(c);
        return;
    }
    if (conn_attach(c) < 0) {
        conn_close(c);
        return;
    }
    set_nodelay(c);
    c->stall_start = uv_now(c->server->loop);
    uv_buf_t b = uv_buf_init(c->out.data, (unsigned)c->out.len);
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write) < 0) {
        conn_close(c);
        return;
    }
    update_reading(c);
    account(c);
    if (within_budget(c) < 0)
        conn_close(c); /* no other holder to close: this answer is the one that does not fit */
}

void http_conn_on_abort(struct http_conn *c, http_abort_cb *cb, void *arg)
{
    assert(c->state == CONN_HANDLING); /* for the request being handled */
    c->abort_cb = cb;
    c->abort_arg = arg;
}

struct buf *http_conn_scratch(struct http_conn *c)
{
    return &c->server->scratch;
}

void http_conn_count_as(struct http_conn *c, unsigned endpoint)
{
    c->endpoint = endpoint;
}

struct http_server *http_conn_server(struct http_conn *c)
{
    return c->server;
}

int http_conn_fd(const struct http_conn *c)
{
    assert(c->state == CONN_HANDLING); /* while its request is being handled */
    return c->fd; /* bare or attached (uv_tcp_open took this same descriptor) */
}

unsigned http_server_connections(const struct http_server *s)
{
    return s->nconns;
}

size_t http_server_buffered(const struct http_server *s)
{
    return s->held;
}

/* The body of an answer the server gives itself, in s->scratch (see http_error_body_cb). */
static struct buf *error_body(struct http_server *s, int status, const char *reason)
{
    buf_reset(&s->scratch);
    if (s->opts.error_body)
        s->opts.error_body(&s->scratch, status, reason, s->opts.error_arg);
    return &s->scratch;
}

/* Answers a request that never reached the handler (parse error, cap) and closes. */
static void reject(struct http_conn *c, int status, const char *desc)
{
    log_info("http_reject", "status=%d reason=\"%s\"", status, desc);
    set_state(c, CONN_HANDLING);
    c->close_after_write = 1;
    struct buf *b = error_body(c->server, status, desc);
    http_conn_respond(c, status, NULL, b->data, b->len);
}

/* ---- llhttp callbacks -------------------------------------------------------------------- */

/* the buffer and length of a secret-carrying header */
static char *secret_buf(struct http_conn *c, enum header_kind k)
{
    return k == H_IDENTITY ? c->idval : k == H_SECRET ? c->secval : c->authval;
}

static size_t *secret_len(struct http_conn *c, enum header_kind k)
{
    return k == H_IDENTITY ? &c->idval_len : k == H_SECRET ? &c->secval_len : &c->authval_len;
}

/* Zeroes what a secret-carrying header left in its buffer: its length's worth (the value's bytes;
 * on_header_value only adds to it, trimming takes only blanks off), so that a connection that
 * carried no secret costs nothing here. */
static void secret_header_clear(struct http_conn *c, enum header_kind k)
{
    size_t *len = secret_len(c, k);
    if (*len) {
        secret_zero(secret_buf(c, k),
                    *len < HTTP_SECRET_HEADER_MAX ? *len : HTTP_SECRET_HEADER_MAX);
        *len = 0;
    }
}

static void secret_headers_clear(struct http_conn *c)
{
    secret_header_clear(c, H_IDENTITY);
    secret_header_clear(c, H_SECRET);
    secret_header_clear(c, H_AUTH);
}

static struct http_conn *conn_of(llhttp_t *p)
{
    return p->data;
}

static int on_message_begin(llhttp_t *p)
{
    struct http_conn *c = conn_of(p);
    buf_reset(&c->url);
    c->hname_len = c->hval_len = c->header_bytes = c->body_bytes = 0;
    c->nheaders = 0;
    c->hkind = H_OTHER;
    c->host_len = 0;
    c->headers_done = 0;
    c->endpoint = EP_OTHER;
    c->arriving = 1;
    c->request_start = uv_now(c->server->loop);
    c->ctype_len = 0;
    buf_reset(&c->body);
    memset(&c->req, 0, sizeof c->req);
    secret_headers_clear(c);
    return 0;
}

static int cap(struct http_conn *c, int status)
{
    c->reject_status = status;
    return -1;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    struct http_conn *c = conn_of(p);
    if (buf_append(&c->url, at, len) < 0)
        return cap(c, 414);
    return 0;
}

static int add_header_bytes(struct http_conn *c, size_t len)
{
    c->header_bytes += len;
    return c->header_bytes + c->url.len > HTTP_MAX_HEADER_BYTES ? cap(c, 431) : 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct http_conn *c = conn_of(p);
    if (add_header_bytes(c, len) < 0)
        return -1;
    if (c->hname_len + len < sizeof c->hname)
        memcpy(c->hname + c->hname_len, at, len);
    c->hname_len += len;
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    struct http_conn *c = conn_of(p);
    if (++c->nheaders > HTTP_MAX_HEADERS)
        return cap(c, 431);
    c->hkind = H_OTHER;
    if (c->headers_done) {
        /* a trailer field of a chunked body: a client could add it where it cannot add headers
         * (the request forgery that the Metadata header guards against), so none counts */
    } else if (c->hname_len < sizeof c->hname) {
        c->hname[c->hname_len] = 0;
        if (strcasecmp(c->hname, "metadata") == 0)
            c->hkind = H_METADATA;
        else if (strcasecmp(c->hname, "x-forwarded-for") == 0)
            c->hkind = H_XFF;
        else if (strcasecmp(c->hname, "x-identity-header") == 0) {
            c->hkind = H_IDENTITY; /* the last one counts */
            secret_header_clear(c, H_IDENTITY);
        } else if (strcasecmp(c->hname, "content-type") == 0) {
            c->hkind = H_CTYPE;
            c->ctype_len = 0;
        } else if (strcasecmp(c->hname, "secret") == 0) {
            c->hkind = H_SECRET;
            secret_header_clear(c, H_SECRET);
        } else if (strcasecmp(c->hname, "authorization") == 0) {
            c->hkind = H_AUTH;
            secret_header_clear(c, H_AUTH);
        } else if (strcasecmp(c->hname, "host") == 0) {
            if (c->req.host)
                return cap(c, 400); /* two Host fields: RFC 9112 section 3.2 */
            c->hkind = H_HOST;
            c->req.host = c->host;
        }
    }
    c->hname_len = 0;
    c->hval_len = 0;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct http_conn *c = conn_of(p);
    if (add_header_bytes(c, len) < 0)
        return -1;
    if (c->hkind == H_METADATA && c->hval_len + len < sizeof c->hval)
        memcpy(c->hval + c->hval_len, at, len);
    if (c->hkind == H_IDENTITY || c->hkind == H_SECRET || c->hkind == H_AUTH) {
        char *v = secret_buf(c, c->hkind);
        size_t *vlen = secret_len(c, c->hkind);
        if (*vlen < HTTP_SECRET_HEADER_MAX) {
            size_t n = HTTP_SECRET_HEADER_MAX - *vlen;
            memcpy(v + *vlen, at, len < n ? len : n);
        }
        *vlen += len;
    }
    if (c->hkind == H_CTYPE) {
        size_t n =
            len < sizeof c->ctype - 1 - c->ctype_len ? len : sizeof c->ctype - 1 - c->ctype_len;
        memcpy(c->ctype + c->ctype_len, at, n);
        c->ctype_len += n;
    }
    if (c->hkind == H_HOST) {
        if (c->host_len < sizeof c->host)
            memcpy(c->host + c->host_len, at,
                   len < sizeof c->host - c->host_len ? len : sizeof c->host - c->host_len);
        c->host_len += len;
    }
    c->hval_len += len;
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    struct http_conn *c = conn_of(p);
    if (c->hkind == H_XFF) {
        c->req.has_xff = 1;
    } else if (c->hkind == H_IDENTITY || c->hkind == H_SECRET || c->hkind == H_AUTH) {
        char *v = secret_buf(c, c->hkind);
        size_t *vlen = secret_len(c, c->hkind);
        while (*vlen && *vlen <= HTTP_SECRET_HEADER_MAX &&
               (v[*vlen - 1] == ' ' || v[*vlen - 1] == '\t'))
            (*vlen)--;
        if (c->hkind == H_IDENTITY) {
            c->req.identity_header = v;
            c->req.identity_header_len = *vlen;
        } else if (c->hkind == H_SECRET) {
            c->req.legacy_secret = v;
            c->req.legacy_secret_len = *vlen;
        } else {
            c->req.authorization = v;
            c->req.authorization_len = *vlen;
        }
    } else if (c->hkind == H_HOST) {
        size_t n = c->host_len < sizeof c->host ? c->host_len : sizeof c->host;
        while (n && (c->host[n - 1] == ' ' || c->host[n - 1] == '\t'))
            n--;
        c->req.host_len = c->host_len <= sizeof c->host ? n : c->host_len; /* too long: > kept */
    } else if (c->hkind == H_METADATA && c->hval_len < sizeof c->hval) {
        size_t n = c->hval_len;
        const char *v = c->hval;
        while (n && (*v == ' ' || *v == '\t'))
            v++, n--;
        while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
            n--;
        if (n == 4 && strncasecmp(v, "true", 4) == 0)
            c->req.has_metadata_true = 1;
    }
    c->hname_len = 0;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct http_conn *c = conn_of(p);
    c->body_bytes += len;
    if (c->body_bytes > HTTP_MAX_BODY)
        return cap(c, 413);
    if (p->method == HTTP_POST && buf_append(&c->body, at, len) < 0)
        return cap(c, 413);
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct http_conn *c = conn_of(p);
    if (p->content_length > HTTP_MAX_BODY && (p->flags & F_CONTENT_LENGTH))
        return cap(c, 413);
    c->headers_done = 1;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct http_conn *c = conn_of(p);
    c->arriving = 0;
    c->req.method = llhttp_method_name((llhttp_method_t)p->method);
    c->req.tag = c->tag;
    c->req.is_get = p->method == HTTP_GET;
    c->req.is_post = p->method == HTTP_POST;
    c->req.has_body = c->body_bytes > 0;
    c->req.body = c->body.data ? c->body.data : "";
    c->req.body_len = c->body.len;
    c->ctype[c->ctype_len] = 0;
    const char *ct = c->ctype;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    static const char form[] = "application/x-www-form-urlencoded";
    c->req.form_body =
        strncasecmp(ct, form, sizeof form - 1) == 0 &&
        (ct[sizeof form - 1] == 0 || ct[sizeof form - 1] == ';' || ct[sizeof form - 1] == ' ');
    c->keep_alive = llhttp_should_keep_alive(p);
    const char *u = c->url.data ? c->url.data : "";
    const char *q = memchr(u, '?', c->url.len);
    c->req.path = u;
    c->req.path_len = q ? (size_t)(q - u) : c->url.len;
    c->req.query = q ? q + 1 : NULL;
    c->req.query_len = q ? c->url.len - c->req.path_len - 1 : 0;
    return HPE_PAUSED;
}

/* ---- connection life cycle --------------------------------------------------------------- */

static void dispatch(struct http_conn *c)
{
    if (c->req.path_len == 0 || c->req.path[0] != '/') {
        reject(c, 400, "Malformed request target"); /* absolute-form or asterisk targets */
        return;
    }
    set_state(c, CONN_HANDLING);
    c->handle_start = uv_now(c->server->loop);
    c->server->handler(c, &c->req, c->server->arg);
}

static void parse_failed(struct http_conn *c, llhttp_errno_t err)
{
    switch (c->reject_status) {
    case 400:
        reject(c, 400, "More than one Host header");
        break;
    case 413:
        reject(c, 413, "Request body too large");
        break;
    case 414:
        reject(c, 414, "Request URL too long");
        break;
    case 431:
        reject(c, 431, "Request headers too large or too many");
        break;
    default:
        if (err == HPE_PAUSED_UPGRADE)
            reject(c, 400, "Protocol upgrades are not supported");
        else
            reject(c, 400, "Malformed HTTP request");
    }
}

/* Runs the parser over data. Returns the bytes it used: all of them, or those up to the end of a
 * complete request, in which case *complete is set and the caller dispatches the request once it
 * has kept what follows. */
static size_t feed(struct http_conn *c, const char *data, size_t len, int *complete)
{
    llhttp_errno_t err = llhttp_execute(&c->parser, data, len);
    *complete = err == HPE_PAUSED;
    if (err == HPE_OK)
        return len;
    if (err != HPE_PAUSED) {
        parse_failed(c, err);
        return len;
    }
    const char *pos = llhttp_get_error_pos(&c->parser);
    return pos ? (size_t)(pos - data) : len;
}

/* Parses buffered bytes while the connection is ready for a request. A response completed
 * synchronously by the handler makes the loop continue with the next pipelined request,
 * instead of recursing. */
static void drive(struct http_conn *c)
{
    if (c->in_drive)
        return;
    c->in_drive = 1;
    while (c->state == CONN_READING && c->pending.len) {
        int complete;
        buf_consume(&c->pending, feed(c, c->pending.data, c->pending.len, &complete));
        if (c->state == CONN_READING && keep_within_budget(c) < 0)
            break; /* closed */
        if (complete)
            dispatch(c);
    }
    c->in_drive = 0;
    if (!c->pending.len && c->pending.cap && c->state != CONN_CLOSING) {
        buf_free(&c->pending); /* pipelining is rare: give the storage back */
        account(c);
    }
    if (c->state == CONN_READING && c->peer_eof)
        conn_close(c); /* every complete request the client sent is answered */
}

/* The common case, nothing buffered: parse straight from the read buffer and keep only what
 * follows a complete request (pipelining) for drive(). */
static void parse_direct(struct http_conn *c, const char *data, size_t len)
{
    int complete;
    size_t used = feed(c, data, len, &complete);
    if (used < len && buf_append(&c->pending, data + used, len - used) < 0) {
        conn_close(c);
        return;
    }
    if (c->state == CONN_READING && keep_within_budget(c) < 0)
        return;
    if (complete)
        dispatch(c); /* a synchronous response goes on to the kept rest through drive() */
}

/* Each read takes no more than the pending buffer can still keep, so input behind a request
 * being answered never overflows it. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)suggested;
    struct http_conn *c = h->data;
    struct http_server *s = c->server;
    size_t room = HTTP_MAX_PENDING - c->pending.len;
    /* what goes to pending (behind a request being answered) also waits for the budget: with
     * none left, reading stops (UV_ENOBUFS) until the request is answered (on_write) */
    if (c->state != CONN_READING || c->pending.len) {
        size_t left = s->held < s->budget ? s->budget - s->held : 0;
        if (left < room)
            room = left;
    }
    *b = uv_buf_init(read_buf, (unsigned)(room < sizeof read_buf ? room : sizeof read_buf));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct http_conn *c = s->data;
    if (nread == UV_EOF && c->state != CONN_READING && c->state != CONN_CLOSING) {
        /* half-closed after sending its request(s) (printf | nc -N, some libraries): answer
         * them, then close */
        c->peer_eof = 1;
        update_reading(c);
        return;
    }
    if (nread == UV_ENOBUFS) { /* no room: update_reading stops before that, but be sure */
        uv_read_stop(s);
        c->reading = 0;
        return;
    }
    if (nread < 0) {
        conn_close(c); /* reset, or EOF with no request or half a request */
        return;
    }
    if (nread == 0)
        return;
    if (c->state == CONN_READING && !c->pending.len && !c->in_drive)
        parse_direct(c, b->base, (size_t)nread);
    else if (buf_append(&c->pending, b->base, (size_t)nread) == 0) { /* fits: see on_alloc */
        account(c);
        drive(c);
    }
    update_reading(c);
    watch_arrival(c); /* every request has the header deadline, not only a connection's first */
}

/* The idle timer is not touched per request (timer heap operations showed in profiles): it
 * fires every idle period and checks how long the connection has been idle. A request being
 * handled is bounded by the handler (Entra deadline), not by this. */
static void on_timeout(uv_timer_t *t)
{
    struct http_conn *c = t->data;
    uint64_t now = uv_now(c->server->loop), idle = c->server->opts.idle_timeout_ms,
             quiet = now - c->last_active, left = quiet < idle ? idle - quiet : 0;
    if (c->state == CONN_HANDLING)
        return;
    if (c->state == CONN_READING && c->arriving) { /* the header deadline, if sooner */
        uint64_t hdr = c->server->opts.header_timeout_ms, since = now - c->request_start;
        if (since >= hdr) {
            log_debug("http_header_timeout", "after_ms=%llu", (unsigned long long)since);
            conn_close(c);
            return;
        }
        if (hdr - since < left)
            left = hdr - since;
    }
    if (left > 0) {
        uv_timer_start(t, on_timeout, left, idle);
        return;
    }
    log_debug("http_idle_timeout", "state=%s", state_names[c->state]);
    conn_close(c);
}

/* A request is still arriving when a read ends: make sure the timer fires by its header
 * deadline (complete requests, the common case, never get here). */
static void watch_arrival(struct http_conn *c)
{
    if (c->bare || c->state != CONN_READING || !c->arriving)
        return;
    uint64_t now = uv_now(c->server->loop),
             due = c->request_start + c->server->opts.header_timeout_ms;
    if (now + uv_timer_get_due_in(&c->timer) > due)
        uv_timer_start(&c->timer, on_timeout, due > now ? due - now : 0,
                       c->server->opts.idle_timeout_ms);
}

static void conn_free(struct http_conn *c)
{
    struct http_server *s = c->server;
    secret_headers_clear(c);
    release_buffers(c); /* done by conn_close; a bare connection's too */
    free(c);
    s->open_handles--;
    /* As a flood (hundreds of connections) ebbs, give the heap's free pages back to the system
     * each time a quarter is left: malloc keeps them otherwise, and the RSS would stay at the
     * flood's peak. */
    s->live--;
    if ((s->high >= TRIM_AFTER || s->ebbing) && s->live <= s->high / 4) {
        malloc_trim(0);
        s->ebbing = s->live > TRIM_LOW; /* again at the next quarter, down to a few */
        s->high = s->live;
    }
    maybe_free_server(s);
}

static void on_handle_closed(uv_handle_t *h)
{
    struct http_conn *c = h->data;
    if (--c->handles_open == 0)
        conn_free(c);
}

static void conn_close(struct http_conn *c)
{
    if (c->state == CONN_CLOSING)
        return;
    enum conn_state was = c->state;
    set_state(c, CONN_CLOSING);
    if (was == CONN_HANDLING && c->abort_cb) {
        http_abort_cb *cb = c->abort_cb;
        c->abort_cb = NULL;
        cb(c, c->abort_arg);
    }
    struct http_server *s = c->server;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    assert(s->nconns > 0 && s->pool_conns[c->pool] > 0);
    s->nconns--;
    s->pool_conns[c->pool]--;
    release_buffers(c); /* at once: the budget counts on it (a canceled write does not read out) */
    if (c->bare) {
        close(c->fd); /* serve_accepted frees c once it is off the stack */
    } else {
        uv_close((uv_handle_t *)&c->timer, on_handle_closed);
        uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    }
    if (s->draining && s->nconns == 0 && s->drained)
        uv_timer_start(&s->grace, on_drained, 0, 0); /* from the loop, not from this stack */
}

/* Out of descriptors: the pending connection would wake the loop forever. Give back the spare
 * descriptor, accept the connection with it and close it (its client learns at once), then take
 * the spare again. A thread-pool open can take the descriptor in between, and the spare is then
 * lost: returns -1 when no connection could be dropped, and the listeners rest instead. */
static int drop_one(struct http_server *s, int lfd)
{
    int dropped = 0;
    if (s->reserve_fd >= 0) {
        close(s->reserve_fd);
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0) {
            close(fd);
            metrics.connections_refused++;
            dropped = 1;
        }
    }
    s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return dropped ? 0 : -1;
}

#define ACCEPT_PAUSE_MS 100 /* listeners rest this long when out of descriptors */

static void on_accept_pause_over(uv_timer_t *t);

/* Out of descriptors with no spare: stop polling the listeners for ACCEPT_PAUSE_MS (nginx does the
 * same), so that a backlog that cannot be accepted does not spin the loop; descriptors come back
 * as connections close. */
static void pause_accepting(struct http_server *s)
{
    if (s->paused)
        return;
    s->paused = 1;
    for (struct http_listener *l = s->listeners; l; l = l->next)
        uv_poll_stop(&l->poll);
    uv_timer_start(&s->accept_pause, on_accept_pause_over, ACCEPT_PAUSE_MS, 0);
}

/* A request waiting for its answer is closed to make room: it gets a 503 if its socket takes one
 * at once (its client knows to retry), and its handler its abort callback (conn_close). */
#define HTTP_WAIT_EVICT_MS 1000

static void close_waiting(struct http_conn *c)
{
    const struct buf *body = error_body(c->server, 503, "imdsd is at its connection limit; retry");
    char head[200];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 503 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Retry-After: 1\r\nConnection: close\r\n\r\n",
                     status_text(503), JSON_TYPE, body->len);
    metrics_request(c->endpoint, 503);
    uv_buf_t b[2] = {uv_buf_init(head, (unsigned)n), uv_buf_init(body->data, (unsigned)body->len)};
    (void)uv_try_write((uv_stream_t *)&c->tcp, b, 2);
    conn_close(c);
}

/* At a pool's --max-connections, room for a new connection, taken from that pool. First a
 * connection that is doing nothing for anyone: a keep-alive connection idle, or one whose answer
 * its client does not take in (stalled), whichever has made no progress longest (nginx frees idle
 * keep-alive connections the same way). Then the request that has been arriving longest. Last,
 * the request that has been waiting longest for its answer (from Entra), once it has waited
 * HTTP_WAIT_EVICT_MS: a burst of requests does not displace itself. So a client that opens
 * connections and never reads, or never finishes a request, only ever displaces its own kind, and
 * a new client always gets in. */
static int make_room(struct http_server *s, unsigned pool)
{
    struct http_conn *still = NULL, *arriving = NULL, *waiting = NULL;
    uint64_t still_t = 0, now = uv_now(s->loop);
    /* the list runs from the newest connection to the oldest: on a tie, the older one goes */
    for (struct http_conn *c = s->conns; c; c = c->next) {
        if (c->pool != pool || c->in_drive || c->bare)
            continue;
        if (c->state == CONN_WRITING ||
            (c->state == CONN_READING && !c->arriving && !c->pending.len)) {
            uint64_t t = c->state == CONN_WRITING ? c->stall_start : c->last_active;
            if (!still || t <= still_t)
                still = c, still_t = t;
        } else if (c->state == CONN_READING) {
            if (!arriving || c->request_start <= arriving->request_start)
                arriving = c;
        } else if (c->state == CONN_HANDLING && now - c->handle_start >= HTTP_WAIT_EVICT_MS) {
            if (!waiting || c->handle_start <= waiting->handle_start)
                waiting = c;
        }
    }
    struct http_conn *v = still ? still : arriving ? arriving : waiting;
    if (!v)
        return -1;
    if (log_sampled(&metrics.connections_evicted))
        log_warn("http_connection_evicted",
                 "max_connections=%u listener=%u state=%s evicted_total=%llu",
                 s->opts.max_connections[pool], pool,
                 v->state == CONN_WRITING ? "stalled"
                 : v == still             ? "idle"
                 : v == arriving          ? "arriving"
                                          : "waiting",
                 (unsigned long long)metrics.connections_evicted);
    if (v == waiting)
        close_waiting(v);
    else
        conn_close(v);
    return 0;
}

static void serve_accepted(struct http_server *s, int fd, int tag)
{
    unsigned pool = tag >= 0 && tag < HTTP_POOLS ? (unsigned)tag : 0;
    if (s->pool_conns[pool] >= s->opts.max_connections[pool] && make_room(s, pool) < 0) {
        close(fd);
        metrics.connections_refused++;
        if (log_sampled(&s->rejected))
            log_warn("http_connection_limit", "max_connections=%u listener=%u rejected_total=%llu",
                     s->opts.max_connections[pool], pool, (unsigned long long)s->rejected);
        return;
    }
    struct http_conn *c = xcalloc(1, sizeof *c);
    c->server = s;
    c->fd = fd;
    c->tag = tag;
    c->pool = pool;
    s->pool_conns[pool]++;
    c->bare = 1;
    c->endpoint = EP_OTHER;
    c->tcp.data = c->timer.data = c->wreq.data = c;
    s->open_handles++;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    if (++s->live > s->high)
        s->high = s->live;
    buf_init(&c->url, HTTP_MAX_URL);
    buf_init(&c->pending, HTTP_MAX_PENDING);
    buf_init(&c->out, 1 << 20);
    buf_init(&c->body, HTTP_MAX_BODY);
    llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
    c->parser.data = c;
    c->last_active = uv_now(s->loop);
    /* clients send their request as soon as they are connected: it is usually here already */
    ssize_t n;
    do
        n = read(fd, read_buf, sizeof read_buf);
    while (n < 0 && errno == EINTR);
    if (n > 0)
        parse_direct(c, read_buf, (size_t)n);
    else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
        conn_close(c);
    if (!c->bare) {
        watch_arrival(c);
        return;
    }
    if (c->state == CONN_CLOSING)
        conn_free(c);
    else if (conn_attach(c) < 0)
        conn_close(c); /* attached or not, the handles are set up: they free c */
    else
        watch_arrival(c);
}

void http_server_adopt(struct http_server *s, int fd, int tag)
{
    serve_accepted(s, fd, tag);
}

/* One connection per wake-up, like nginx without multi_accept: the poll is level-triggered, so
 * a backlog wakes the loop again, and no accept4 is spent finding the queue empty. */
static void on_listen_ready(uv_poll_t *p, int status, int events)
{
    (void)events;
    struct http_listener *l = p->data;
    struct http_server *s = l->server;
    if (status < 0) {
        log_warn("http_accept_failed", "error=%s", uv_strerror(status));
        return;
    }
    int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
        serve_accepted(s, fd, l->tag);
        return;
    }
    int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ECONNABORTED)
        return;
    if (log_sampled(&s->accept_failed))
        log_warn("http_accept_failed", "error=\"%s\" failed_total=%llu", strerror(err),
                 (unsigned long long)s->accept_failed);
    /* a backlog that cannot be taken would wake the loop at once, forever */
    if ((err == EMFILE || err == ENFILE) && drop_one(s, l->fd) < 0)
        pause_accepting(s);
}

static void on_accept_pause_over(uv_timer_t *t)
{
    struct http_server *s = t->data;
    s->paused = 0;
    for (struct http_listener *l = s->listeners; l; l = l->next)
        uv_poll_start(&l->poll, UV_READABLE, on_listen_ready);
}

struct http_server *http_server_new(uv_loop_t *loop, const struct http_server_opts *o,
                                    http_handler_cb *handler, void *arg)
{
    struct http_server *s = xcalloc(1, sizeof *s);
    s->loop = loop;
    s->opts = *o;
    uv_timer_init(loop, &s->grace);
    s->grace.data = s;
    uv_timer_init(loop, &s->accept_pause);
    s->accept_pause.data = s;
    s->open_handles = 2; /* the grace and accept-pause timers */
    s->budget = o->buffer_budget ? o->buffer_budget : HTTP_BUFFER_BUDGET;
    buf_init(&s->scratch, 1 << 20);
    s->handler = handler;
    s->arg = arg;
    s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    llhttp_settings_init(&s->settings);
    s->settings.on_message_begin = on_message_begin;
    s->settings.on_url = on_url;
    s->settings.on_header_field = on_header_field;
    s->settings.on_header_field_complete = on_header_field_complete;
    s->settings.on_header_value = on_header_value;
    s->settings.on_header_value_complete = on_header_value_complete;
    s->settings.on_headers_complete = on_headers_complete;
    s->settings.on_body = on_body;
    s->settings.on_message_complete = on_message_complete;
    return s;
}

/* Socket buffers of the connections a listener accepts (they inherit the listener's). Linux
 * grows them up to 4 MiB each by default, and a client that never reads gets both filled: about
 * 4.5 MiB of kernel memory per connection, charged to imdsd's memory cgroup. Requests (12 KiB at
 * most) and answers (a few KiB) need far less; fixed sizes bound a connection's socket memory. */
#define HTTP_SOCKET_BUFFER 8192 /* asked for; the kernel doubles it for its own overhead */

/* Polls the listening socket fd (owned from here on: closed with the listener, or now on error). */
static int add_listener(struct http_server *s, int fd, int tag)
{
    int size = HTTP_SOCKET_BUFFER;
    /* best effort: without it, connections only cost more kernel memory */
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct http_listener *l = xcalloc(1, sizeof *l);
    l->server = s;
    l->fd = fd;
    l->tag = tag;
    int rc = uv_poll_init_socket(s->loop, &l->poll, fd);
    if (rc < 0) {
        close(fd);
        free(l);
        return rc;
    }
    l->poll.data = l;
    s->open_handles++;
    l->next = s->listeners;
    s->listeners = l;
    return uv_poll_start(&l->poll, UV_READABLE, on_listen_ready);
}

int http_server_listen(struct http_server *s, const char *host, int port, int tag)
{
    struct sockaddr_storage ss;
    int v6 = strchr(host, ':') != NULL;
    int rc = v6 ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss)
                : uv_ip4_addr(host, port, (struct sockaddr_in *)&ss);
    if (rc < 0)
        return rc;
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* TCP_DEFER_ACCEPT: a connection is queued for accept4 when its first bytes arrive, so
     * serve_accepted finds the request there (without it, mostly not yet). A connection that sends
     * nothing waits in the kernel for about a second, then is accepted and idled out as usual. */
    int on = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0 ||
        (v6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on) < 0) ||
        setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &on, sizeof on) < 0 ||
        bind(fd, (struct sockaddr *)&ss,
             v6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in)) < 0 ||
        listen(fd, 511) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    return add_listener(s, fd, tag);
}

int http_server_listen_fd(struct http_server *s, int fd, int tag)
{
    int type = 0, domain = 0, listening = 0, defer = 0;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return errno == EBADF ? -ENOTSOCK : -errno;
    len = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0)
        return -errno;
    if (type != SOCK_STREAM || (domain != AF_INET && domain != AF_INET6))
        return -EPROTOTYPE;
    len = sizeof listening;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0)
        return -errno;
    if (!listening)
        return -EINVAL;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -errno;
    /* the socket is shared with systemd: keep a DeferAcceptSec= of the socket unit, else defer
     * as http_server_listen does (best effort: the accept path copes without) */
    len = sizeof defer;
    int on = 1;
    if (getsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, &len) == 0 && defer == 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &on, sizeof on);
    return add_listener(s, fd, tag);
}

static void on_listener_closed(uv_handle_t *h)
{
    struct http_listener *l = h->data;
    struct http_server *s = l->server;
    close(l->fd);
    free(l);
    s->open_handles--;
    maybe_free_server(s);
}

static void maybe_free_server(struct http_server *s)
{
    if (s->freeing && s->open_handles == 0) {
        if (s->reserve_fd >= 0)
            close(s->reserve_fd);
        buf_free(&s->scratch);
        free(s);
    }
}

static void on_drained(uv_timer_t *t)
{
    struct http_server *s = t->data;
    void (*cb)(void *) = s->drained;
    s->drained = NULL;
    if (cb)
        cb(s->drained_arg);
}

static void on_grace(uv_timer_t *t)
{
    struct http_server *s = t->data;
    for (struct http_conn *c = s->conns, *n; c; c = n) {
        n = c->next;
        if (c->state != CONN_HANDLING)
            continue;
        if (c->abort_cb) {
            http_abort_cb *cb = c->abort_cb;
            c->abort_cb = NULL;
            cb(c, c->abort_arg);
        }
        log_info("http_shutdown_abort", "reason=grace_period_over");
        const struct buf *b = error_body(s, 503, "imdsd is shutting down");
        http_conn_respond(c, 503, NULL, b->data, b->len);
    }
    /* what is left is a client that does not read its answer (or the 503 just queued) */
    while (s->conns) {
        log_info("http_shutdown_close", "state=%s reason=grace_period_over",
                 state_names[s->conns->state]);
        conn_close(s->conns);
    }
    on_drained(t);
}

void http_server_shutdown(struct http_server *s, unsigned grace_ms, void (*drained)(void *arg),
                          void *arg)
{
    s->draining = 1;
    s->drained = drained;
    s->drained_arg = arg;
    for (struct http_listener *l = s->listeners, *n; l; l = n) {
        n = l->next;
        uv_close((uv_handle_t *)&l->poll, on_listener_closed);
    }
    s->listeners = NULL;
    unsigned busy = 0;
    for (struct http_conn *c = s->conns, *n; c; c = n) {
        n = c->next;
        if (c->state == CONN_READING)
            conn_close(c); /* idle, or a request not complete yet */
        else
            busy++;
    }
    log_info("http_draining", "in_flight=%u grace_ms=%u", busy, grace_ms);
    uv_timer_start(&s->grace, s->nconns ? on_grace : on_drained, s->nconns ? grace_ms : 0, 0);
}

static void on_grace_closed(uv_handle_t *h)
{
    struct http_server *s = h->data;
    s->open_handles--;
    maybe_free_server(s);
}

void http_server_free(struct http_server *s)
{
    if (!s)
        return;
    s->freeing = 1;
    s->drained = NULL;
    s->open_handles++; /* hold the server while closing */
    for (struct http_listener *l = s->listeners, *n; l; l = n) {
        n = l->next;
        uv_close((uv_handle_t *)&l->poll, on_listener_closed);
    }
    s->listeners = NULL;
    while (s->conns)
        conn_close(s->conns);
    uv_close((uv_handle_t *)&s->grace, on_grace_closed);
    uv_close((uv_handle_t *)&s->accept_pause, on_grace_closed);
    s->open_handles--;
    maybe_free_server(s);
}

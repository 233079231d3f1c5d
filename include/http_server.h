/* http_server.h - the loopback HTTP/1.1 listener: per-connection parsing with hard caps,
 * keep-alive and pipelining, an idle/slow-request timeout and a connection limit. It knows no
 * routes: every complete request goes to one handler, which answers now or later; nor the shape
 * of an error: the body of one it gives itself comes from opts.error_body. */
#ifndef IMDSD_HTTP_SERVER_H
#define IMDSD_HTTP_SERVER_H

#include <stddef.h>
#include <uv.h>

#define HTTP_MAX_URL           4096  /* longer request target -> 414 */
#define HTTP_MAX_HEADER_BYTES  8192  /* request line + headers -> 431 */
#define HTTP_MAX_HEADERS       64    /* more header fields -> 431 */
#define HTTP_MAX_BODY          4096  /* request body -> 413 */
#define HTTP_MAX_PENDING       65535 /* pipelined bytes kept on one connection (64 KiB stored) */
#define HTTP_POOLS             2     /* listener tags, each with a connection pool of its own */
#define HTTP_BUFFER_BUDGET     (2u << 20) /* default opts.buffer_budget */
#define HTTP_SECRET_HEADER_MAX 256        /* X-IDENTITY-HEADER value kept for the handler */
#define HTTP_MAX_HOST          300        /* Host value kept for the handler */

struct buf;
struct http_conn;

struct http_request {
    int is_get;
    int is_post;
    const char *method; /* "GET", "POST", ... */
    const char *path;   /* request target up to '?' (not NUL-terminated) */
    size_t path_len;
    const char *query; /* after '?', or NULL */
    size_t query_len;
    int has_metadata_true;
    int has_xff;
    int has_body;     /* the request had body bytes */
    const char *body; /* a POST's body (body_len bytes, not NUL-terminated) */
    size_t body_len;
    int form_body;               /* Content-Type: application/x-www-form-urlencoded */
    const char *host;            /* the Host header without surrounding blanks, NULL when absent */
    size_t host_len;             /* its length; over HTTP_MAX_HOST when it was too long to keep */
    int tag;                     /* the listener's, see http_server_listen */
    const char *identity_header; /* X-IDENTITY-HEADER, NULL when absent; a secret */
    size_t identity_header_len;  /* its full length (only HTTP_SECRET_HEADER_MAX bytes kept) */
    const char *legacy_secret;   /* the `secret` header of App Service 2017-09-01, likewise */
    size_t legacy_secret_len;
    const char *authorization; /* Authorization (the Azure Arc key), likewise */
    size_t authorization_len;
};

/* Called once per complete request. The handler must eventually call http_conn_respond()
 * exactly once, unless the abort callback it registered has run. req is valid until then. */
typedef void http_handler_cb(struct http_conn *c, const struct http_request *req, void *arg);
/* Called if the connection goes away while the handler has not responded yet. */
typedef void http_abort_cb(struct http_conn *c, void *arg);
/* Appends to b the JSON body of an error answer the server gives itself, without the handler: a
 * malformed request or one over a cap (reason is one line of text), a request closed at the
 * connection limit or at the end of a shutdown's grace period (status 503). */
typedef void http_error_body_cb(struct buf *b, int status, const char *reason, void *arg);

struct http_server_opts {
    /* per listener tag: the listeners with one tag share a pool of this many connections, so that
     * a flood on one (the health listener, which may face the pod network) cannot take the other's
     */
    unsigned max_connections[HTTP_POOLS];
    unsigned idle_timeout_ms;
    unsigned header_timeout_ms; /* a request still arriving after this is dropped */
    /* bytes kept for clients across all connections beyond the connections themselves: requests
     * arriving (URL, body), input pipelined behind a request, answers a client has not taken in.
     * Past it the connections holding the most-stale of these are closed. 0: HTTP_BUFFER_BUDGET */
    size_t buffer_budget;
    http_error_body_cb *error_body; /* NULL: those answers have an empty body */
    void *error_arg;
};

struct http_server;

/* Copies o. Cannot fail: it only allocates (and xcalloc aborts when out of memory). */
struct http_server *http_server_new(uv_loop_t *loop, const struct http_server_opts *o,
                                    http_handler_cb *handler, void *arg);
/* Binds and listens on host:port (numeric). Every request from it carries tag (req->tag, below
 * HTTP_POOLS), so the handler can tell listeners apart; its connections count against
 * opts.max_connections[tag]. Returns 0 or a negative libuv error. */
int http_server_listen(struct http_server *s, const char *host, int port, int tag);
/* The same on fd, a listening socket passed by systemd (socket activation): made non-blocking and
 * close-on-exec, and owned by the server once this returns 0. Returns 0, -ENOTSOCK (not a socket,
 * or not open), -EPROTOTYPE (not SOCK_STREAM over IPv4 or IPv6), -EINVAL (not listening) or
 * another negative errno. */
int http_server_listen_fd(struct http_server *s, int fd, int tag);
/* Serves fd, a connected stream socket (non-blocking, close-on-exec), as if accepted from a
 * listener with tag: the fuzz target feeds the whole request path through it. Takes fd. */
void http_server_adopt(struct http_server *s, int fd, int tag);
/* Graceful stop: closes the listeners and idle connections at once, lets requests being handled
 * finish (their connections close after the response), and after grace_ms answers those still
 * pending with 503 JSON. Calls drained(arg) once, from the loop, when no connection is left. */
void http_server_shutdown(struct http_server *s, unsigned grace_ms, void (*drained)(void *arg),
                          void *arg);
/* Stops listening, closes every connection (pending handlers get their abort callback) and
 * frees the server once all handles have closed. */
void http_server_free(struct http_server *s);

/* Sends a complete response. extra_headers is NULL or header lines each ending "\r\n".
 * body is copied. The connection stays open when the client asked for keep-alive. */
void http_conn_respond(struct http_conn *c, int status, const char *extra_headers, const char *body,
                       size_t len);
/* Registers the abort callback for the request being handled. */
void http_conn_on_abort(struct http_conn *c, http_abort_cb *cb, void *arg);
/* A scratch buffer owned by the connection for rendering a body (reset per request). */
struct buf *http_conn_scratch(struct http_conn *c);
/* The same with a Content-Type other than JSON (and no extra headers). */
void http_conn_respond_type(struct http_conn *c, int status, const char *content_type,
                            const char *body, size_t len);
/* The metrics endpoint (enum metrics_endpoint) that c's current request is counted under. */
void http_conn_count_as(struct http_conn *c, unsigned endpoint);
struct http_server *http_conn_server(struct http_conn *c);
/* The connection's socket, while its request is being handled: for getsockname and getpeername
 * (the Azure Arc challenge asks the kernel which user the peer's socket belongs to). Not to be
 * read, written or closed. */
int http_conn_fd(const struct http_conn *c);
/* Client connections open now. */
unsigned http_server_connections(const struct http_server *s);
/* Bytes kept for clients now (see opts.buffer_budget). */
size_t http_server_buffered(const struct http_server *s);

#endif

/* https_client.h - non-blocking HTTPS/1.1 client on a libuv loop, for one origin (host, port).
 *
 * Resolves asynchronously, connects (trying every address), runs a TLS handshake with SNI and
 * full chain + hostname verification (there is no way to turn it off), sends one request and
 * parses one response (Content-Length or chunked) with a size cap. Idle keep-alive connections
 * are kept and reused; a request that fails on a reused connection before any response byte
 * arrived is retried once on a fresh one.
 *
 * Optionally every connection goes through an HTTP CONNECT proxy (struct proxy, proxy.h): the
 * client resolves and connects to the proxy, asks it for a tunnel to host:port, and runs the TLS
 * handshake with the origin through it (SNI and verification against the origin's name, exactly
 * as without a proxy). Tunnelled connections are pooled and reused the same way. */
#ifndef IMDSD_HTTPS_CLIENT_H
#define IMDSD_HTTPS_CLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define HTTPS_DEFAULT_CONNECT_TIMEOUT_MS 5000
#define HTTPS_DEFAULT_REQUEST_TIMEOUT_MS 15000
#define HTTPS_DEFAULT_MAX_RESPONSE       (64 * 1024)
#define HTTPS_MAX_IDLE_CONNS             4
#define HTTPS_IDLE_TIMEOUT_MS            60000
#define HTTPS_PROXY_RESPONSE_MAX                                                                   \
    8192 /* cap on the proxy's answer to CONNECT (status + headers)                                \
          */

struct proxy;
struct tls_ctx;

enum https_err {
    HTTPS_OK = 0,
    HTTPS_E_RESOLVE = -1,   /* name resolution failed */
    HTTPS_E_CONNECT = -2,   /* every address refused / unreachable */
    HTTPS_E_TLS = -3,       /* handshake or record-layer failure (not a verification failure) */
    HTTPS_E_VERIFY = -4,    /* certificate chain or hostname verification failed */
    HTTPS_E_TIMEOUT = -5,   /* connect deadline or whole-request deadline passed */
    HTTPS_E_IO = -6,        /* connection reset or closed before the response was complete */
    HTTPS_E_PROTO = -7,     /* response is not valid HTTP/1.x */
    HTTPS_E_TOO_LARGE = -8, /* response body or headers over the cap */
    HTTPS_E_CANCELED = -9,  /* client freed while the request was pending */
    HTTPS_E_PROXY = -10,    /* the proxy did not open a tunnel: non-2xx answer to CONNECT (e.g.
                             * 403, 407, 502), or an invalid or over-long answer */
};

/* A short, log-safe English description of an https_err. */
const char *https_strerror(int err);

struct https_client_opts {
    const char *host;     /* where to connect: DNS name or IP literal (no brackets) */
    const char *port;     /* decimal, e.g. "443" */
    const char *tls_name; /* the name sent as SNI and verified; NULL = host */
    /* the Host header's name and port; NULL = host and port. An AKS identity binding's token
     * proxy is sent the request azidentity sends it: to the proxy, for Entra's host */
    const char *origin_host, *origin_port;
    struct tls_ctx *tls; /* trust anchors (the client takes a reference), or NULL: ca_file */
    const char *ca_file; /* PEM bundle of trust anchors; NULL = system bundle */
    uint64_t connect_timeout_ms; /* 0 = default; covers resolve + TCP connect (+ CONNECT through
                                  * the proxy) + TLS handshake */
    uint64_t request_timeout_ms; /* 0 = default; whole request from send() to done */
    size_t max_response;         /* 0 = default; cap on response head + body bytes */
    const struct proxy *proxy;   /* HTTP CONNECT proxy, or NULL to connect directly; copied by
                                  * https_client_new (the caller may free it afterwards) */
};

struct https_response {
    int status;       /* HTTP status code */
    const char *body; /* valid only during the done callback; NUL-terminated */
    size_t body_len;
    const char *retry_after; /* value of Retry-After, or NULL; valid only during the callback */
};

struct https_request;
/* err is HTTPS_OK with resp set, or an https_err with resp NULL. Called exactly once per
 * successful https_client_send(), never from inside https_client_send() itself. */
typedef void https_done_cb(struct https_request *req, int err, const struct https_response *resp);

struct https_request {
    /* Filled by the caller; borrowed until done is called or the request is canceled. */
    const char *method;  /* "POST" */
    const char *path;    /* origin-form, e.g. "/tenant/oauth2/v2.0/token" */
    const char *headers; /* extra header lines, each ending "\r\n", or NULL */
    const char *body;    /* may be NULL when body_len is 0 */
    size_t body_len;
    https_done_cb *done;
    void *data; /* for the caller */
    /* Private to https_client. */
    struct https_client *client;
    struct https_conn *conn;
    struct https_request *next;
    int retried;
};

/* Creates a client; loads the CA bundle now. On failure returns <0 and writes a one-line reason
 * into err (the setting and the value). */
int https_client_new(struct https_client **out, uv_loop_t *loop, const struct https_client_opts *o,
                     char *err, size_t errlen);

/* Starts req. Returns 0 and later calls req->done exactly once, or returns <0 and never calls it.
 * The request body is copied before send returns, so the caller may free it after send. */
int https_client_send(struct https_client *c, struct https_request *req);

/* Detaches req: done is never called for it. A no-op if done already ran. */
void https_client_cancel(struct https_request *req);

/* Verifies the connections made from now on against tls's trust anchors (the client takes a
 * reference): closes the idle ones, and a connection made before is not reused once its answer is
 * in. */
void https_client_set_tls(struct https_client *c, struct tls_ctx *tls);

/* Fails every pending request with HTTPS_E_CANCELED (calling done), closes all handles and frees
 * the client once they have closed. The loop must be run afterwards for the closes to finish. */
void https_client_free(struct https_client *c);

/* How many of c's connections have handed a TLS handshake step to the client's worker thread and
 * not had it back (the handshake's CPU work runs there, off the loop: worker.h), and how many of
 * those steps have not started: for tests. */
unsigned https_client_handshake_steps(const struct https_client *c, unsigned *waiting);

#endif

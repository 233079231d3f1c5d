/* tls.h - TLS 1.2 client sessions over memory buffers (mbedTLS), for an event loop.
 *
 * The network layer owns the socket: it feeds received ciphertext in with tls_conn_feed(), drives
 * the session with tls_conn_handshake_step() and _finish() / tls_conn_read() / tls_conn_write(),
 * and after every call sends whatever tls_conn_take_output() hands back. Nothing here blocks or
 * touches a socket.
 *
 * Peer verification is always on: the chain must lead to a trust anchor of the tls_ctx and the
 * certificate must match the host name given to tls_conn_new() (which is also sent as SNI).
 * There is no way to turn verification off. This is the only module that includes the mbedTLS
 * SSL and X.509 headers. */
#ifndef IMDSD_TLS_H
#define IMDSD_TLS_H

#include <stddef.h>

#define TLS_DEFAULT_CA_FILE "/etc/ssl/certs/ca-certificates.crt"
#define TLS_REASON_MAX      256 /* size of the failure-reason buffer, NUL included */

enum tls_status {
    TLS_OK = 0,             /* the operation completed */
    TLS_WANT_IO = 1,        /* needs more ciphertext input; send pending output and retry later */
    TLS_CLOSED = 2,         /* the peer sent close_notify */
    TLS_VERIFY_FAILED = -1, /* certificate chain or host name verification failed */
    TLS_FAILED = -2,        /* any other handshake or record-layer failure */
};

/* Shared configuration for one client: trust anchors, RNG and the last resumable session. */
struct tls_ctx;
/* One TLS session on one transport connection. */
struct tls_conn;

/* Loads the PEM bundle ca_file (NULL = TLS_DEFAULT_CA_FILE) and seeds the RNG. On failure returns
 * -1 and writes a one-line reason naming the file into err. */
int tls_ctx_new(struct tls_ctx **out, const char *ca_file, char *err, size_t errlen);
/* The same from len bytes of PEM in memory (at least one certificate must parse); a failure's
 * reason begins with what, e.g. "AZURE_KUBERNETES_CA_DATA". */
int tls_ctx_new_pem(struct tls_ctx **out, const char *pem, size_t len, const char *what, char *err,
                    size_t errlen);
/* How many trust anchors ctx holds. */
int tls_ctx_count(const struct tls_ctx *ctx);
/* A ctx is counted: tls_ctx_ref takes another reference (and returns ctx), tls_ctx_free drops one
 * and frees with the last. Every tls_conn holds one, so a ctx replaced while sessions on it are
 * still open lives until they are freed. */
struct tls_ctx *tls_ctx_ref(struct tls_ctx *ctx);
void tls_ctx_free(struct tls_ctx *ctx);

/* A client session that verifies hostname and offers the ctx's last session for resumption.
 * Returns NULL (with a reason in err) if mbedTLS cannot set it up. It holds a reference to ctx. */
struct tls_conn *tls_conn_new(struct tls_ctx *ctx, const char *hostname, char *err, size_t errlen);
/* The ctx the session was made from. */
const struct tls_ctx *tls_conn_ctx(const struct tls_conn *t);
/* Frees the session, zeroing key material and buffered plaintext. NULL is fine. */
void tls_conn_free(struct tls_conn *t);

/* Queues n bytes of ciphertext received from the peer. Returns 0, or -1 if more than an internal
 * cap is buffered (the caller should treat that as a failure). */
int tls_conn_feed(struct tls_conn *t, const void *p, size_t n);

/* The handshake in two halves, so that its CPU work (verifying the chain, the key exchange:
 * milliseconds each) can run off the event loop. tls_conn_handshake_step advances the handshake
 * as far as the fed input allows and may run on another thread, provided nothing else touches t
 * meanwhile (no feed, take_output, free, ...). At most one step of the ctx's sessions may run at a
 * time: verifying a signature with a trust anchor's EC key makes mbedTLS 2.28 cache a precomputed
 * table in that key (ecp_mul_comb, MBEDTLS_ECP_FIXED_POINT_OPTIM), a write to the ctx's shared
 * state; the RNG, the other one, is locked. Other sessions may read and write records meanwhile.
 * tls_conn_handshake_finish, back on the ctx's own thread, returns the step's outcome: TLS_OK once
 * the handshake is complete (the session is then remembered in the ctx for resumption),
 * TLS_WANT_IO, TLS_VERIFY_FAILED or TLS_FAILED (see tls_conn_reason()). */
void tls_conn_handshake_step(struct tls_conn *t);
enum tls_status tls_conn_handshake_finish(struct tls_conn *t);

/* Encrypts all n bytes into the output queue: TLS_OK or TLS_FAILED. Handshake must be done. */
enum tls_status tls_conn_write(struct tls_conn *t, const void *p, size_t n);

/* Decrypts up to cap bytes into p: TLS_OK with *got > 0, TLS_WANT_IO when no complete record is
 * buffered, TLS_CLOSED on close_notify, or TLS_FAILED. */
enum tls_status tls_conn_read(struct tls_conn *t, void *p, size_t cap, size_t *got);

/* Queues a close_notify alert (best effort). */
void tls_conn_close_notify(struct tls_conn *t);

/* Non-zero if received bytes are buffered that no tls_conn_read() has returned yet (ciphertext
 * not yet processed, or decrypted bytes not yet read). */
int tls_conn_has_input(const struct tls_conn *t);

/* Hands over the queued ciphertext to send: a malloc'd buffer the caller frees, or NULL (and
 * *len = 0) when nothing is queued. */
char *tls_conn_take_output(struct tls_conn *t, size_t *len);

/* Why the last call failed: log-safe text (for verification failures the reasons from
 * mbedtls_x509_crt_verify_info joined with "; "), or "" if nothing failed. */
const char *tls_conn_reason(const struct tls_conn *t);

/* After a completed handshake: protocol version and cipher suite names, and whether the
 * handshake resumed the ctx's previous session. */
const char *tls_conn_version(const struct tls_conn *t);
const char *tls_conn_cipher(const struct tls_conn *t);
int tls_conn_resumed(const struct tls_conn *t);

#endif

#include "tls.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "util.h"

/* Ciphertext buffered in either direction; the network layer drains both after every call, so
 * these only bound a misbehaving peer or caller. */
#define TLS_MAX_INPUT  (256 * 1024)
#define TLS_MAX_OUTPUT (1024 * 1024)
#define TLS_MASTER_LEN 48

static const char tls_drbg_pers[] = "imdsd-tls-client";

struct tls_ctx {
    mbedtls_ssl_config conf;
    mbedtls_x509_crt ca;
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    pthread_mutex_t drbg_lock; /* handshake steps run on worker threads (tls_conn_handshake_step) */
    mbedtls_ssl_session *session; /* last full handshake's session, or NULL */
    char *session_host;           /* the host name session was verified for */
    int refs;                     /* the creator's, and one per tls_conn */
};

struct tls_conn {
    struct tls_ctx *ctx;
    char *host; /* the name verified and sent as SNI */
    mbedtls_ssl_context ssl;
    struct buf in; /* received ciphertext; bytes before in_off are consumed */
    size_t in_off;
    struct buf out; /* ciphertext to send */
    int handshake_done;
    int step_result; /* mbedtls_ssl_handshake's, for tls_conn_handshake_finish */
    int failed;
    int offered; /* a session was offered for resumption */
    int resumed;
    char reason[TLS_REASON_MAX];
};

__attribute__((format(printf, 3, 4))) static void tls_set_err(char *err, size_t errlen,
                                                              const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* The RNG every session of ctx draws from, on the loop's thread and on the workers that run
 * handshake steps alike. */
static int ctx_random(void *p, unsigned char *out, size_t len)
{
    struct tls_ctx *ctx = p;
    pthread_mutex_lock(&ctx->drbg_lock);
    int r = mbedtls_ctr_drbg_random(&ctx->drbg, out, len);
    pthread_mutex_unlock(&ctx->drbg_lock);
    return r;
}

/* The configuration around ctx->ca, which holds at least one certificate. */
static int ctx_setup(struct tls_ctx *ctx, char *err, size_t errlen)
{
    char why[128];
    int r = mbedtls_ctr_drbg_seed(&ctx->drbg, mbedtls_entropy_func, &ctx->entropy,
                                  (const unsigned char *)tls_drbg_pers, sizeof tls_drbg_pers - 1);
    if (r != 0) {
        mbedtls_strerror(r, why, sizeof why);
        tls_set_err(err, errlen, "tls: cannot seed the RNG: %s", why);
        return -1;
    }

    r = mbedtls_ssl_config_defaults(&ctx->conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                    MBEDTLS_SSL_PRESET_DEFAULT);
    if (r != 0) {
        mbedtls_strerror(r, why, sizeof why);
        tls_set_err(err, errlen, "tls: cannot configure: %s", why);
        return -1;
    }
    mbedtls_ssl_conf_authmode(&ctx->conf, MBEDTLS_SSL_VERIFY_REQUIRED);
    mbedtls_ssl_conf_ca_chain(&ctx->conf, &ctx->ca, NULL);
    mbedtls_ssl_conf_rng(&ctx->conf, ctx_random, ctx);
    /* TLS 1.2 only: 1.3 is experimental in mbedTLS 2.28 and anything older is obsolete. */
    mbedtls_ssl_conf_min_version(&ctx->conf, MBEDTLS_SSL_MAJOR_VERSION_3,
                                 MBEDTLS_SSL_MINOR_VERSION_3);
    mbedtls_ssl_conf_max_version(&ctx->conf, MBEDTLS_SSL_MAJOR_VERSION_3,
                                 MBEDTLS_SSL_MINOR_VERSION_3);
    mbedtls_ssl_conf_renegotiation(&ctx->conf, MBEDTLS_SSL_RENEGOTIATION_DISABLED);
    /* the cheap key exchanges first: mbedTLS 2.28 lists secp521r1 first, about 2.9 ms of CPU per
     * handshake where X25519 and P-256 take 1.2 (a server that follows the client's order would
     * pick it); the list also bounds the curves of the server's certificate key */
    static const mbedtls_ecp_group_id curves[] = {
        MBEDTLS_ECP_DP_CURVE25519, MBEDTLS_ECP_DP_SECP256R1, MBEDTLS_ECP_DP_SECP384R1,
        MBEDTLS_ECP_DP_SECP521R1, MBEDTLS_ECP_DP_NONE};
    mbedtls_ssl_conf_curves(&ctx->conf, curves);
    mbedtls_ssl_conf_session_tickets(&ctx->conf, MBEDTLS_SSL_SESSION_TICKETS_ENABLED);
    return 0;
}

static struct tls_ctx *ctx_alloc(void)
{
    struct tls_ctx *ctx = xcalloc(1, sizeof *ctx);
    ctx->refs = 1;
    mbedtls_ssl_config_init(&ctx->conf);
    mbedtls_x509_crt_init(&ctx->ca);
    mbedtls_entropy_init(&ctx->entropy);
    mbedtls_ctr_drbg_init(&ctx->drbg);
    pthread_mutex_init(&ctx->drbg_lock, NULL);
    return ctx;
}

/* r is mbedtls_x509_crt_parse*'s result: < 0 an error, > 0 the certificates that failed to
 * parse, which is fine if at least one did (as Go's AppendCertsFromPEM). */
static int ca_parsed(const struct tls_ctx *ctx, int r, const char *what, char *err, size_t errlen)
{
    char why[128];
    if (r >= 0 && ctx->ca.version != 0)
        return 0;
    if (r < 0)
        mbedtls_strerror(r, why, sizeof why);
    else
        snprintf(why, sizeof why, "no PEM certificate");
    tls_set_err(err, errlen, "%s: no usable certificates (%s)", what, why);
    return -1;
}

int tls_ctx_new(struct tls_ctx **out, const char *ca_file, char *err, size_t errlen)
{
    const char *path = ca_file ? ca_file : TLS_DEFAULT_CA_FILE;
    char what[PATH_MAX + 16];
    *out = NULL;

    FILE *f = fopen(path, "rb");
    if (!f) {
        tls_set_err(err, errlen, "ca_file=%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    fclose(f);

    struct tls_ctx *ctx = ctx_alloc();
    int r = mbedtls_x509_crt_parse_file(&ctx->ca, path);
    snprintf(what, sizeof what, "ca_file=%s", path);
    if (r == MBEDTLS_ERR_PK_FILE_IO_ERROR) {
        tls_set_err(err, errlen, "ca_file=%s: cannot read the file", path);
        goto fail;
    }
    if (ca_parsed(ctx, r, what, err, errlen) < 0 || ctx_setup(ctx, err, errlen) < 0)
        goto fail;
    *out = ctx;
    return 0;

fail:
    tls_ctx_free(ctx);
    return -1;
}

int tls_ctx_new_pem(struct tls_ctx **out, const char *pem, size_t len, const char *what, char *err,
                    size_t errlen)
{
    *out = NULL;
    /* mbedTLS parses PEM only from a NUL-terminated buffer, its length counting the NUL */
    char *z = xmalloc(len + 1);
    memcpy(z, pem, len);
    z[len] = 0;
    struct tls_ctx *ctx = ctx_alloc();
    int r = memchr(pem, 0, len)
                ? MBEDTLS_ERR_X509_INVALID_FORMAT
                : mbedtls_x509_crt_parse(&ctx->ca, (const unsigned char *)z, len + 1);
    free(z);
    if (ca_parsed(ctx, r, what, err, errlen) < 0 || ctx_setup(ctx, err, errlen) < 0) {
        tls_ctx_free(ctx);
        return -1;
    }
    *out = ctx;
    return 0;
}

int tls_ctx_count(const struct tls_ctx *ctx)
{
    int n = 0;
    for (const mbedtls_x509_crt *c = &ctx->ca; c && c->version; c = c->next)
        n++;
    return n;
}

struct tls_ctx *tls_ctx_ref(struct tls_ctx *ctx)
{
    ctx->refs++;
    return ctx;
}

static void tls_ctx_forget_session(struct tls_ctx *ctx)
{
    if (ctx->session) {
        mbedtls_ssl_session_free(ctx->session);
        free(ctx->session);
        ctx->session = NULL;
    }
    free(ctx->session_host);
    ctx->session_host = NULL;
}

void tls_ctx_free(struct tls_ctx *ctx)
{
    if (!ctx || --ctx->refs > 0)
        return;
    tls_ctx_forget_session(ctx);
    mbedtls_ssl_config_free(&ctx->conf);
    mbedtls_x509_crt_free(&ctx->ca);
    mbedtls_ctr_drbg_free(&ctx->drbg);
    mbedtls_entropy_free(&ctx->entropy);
    pthread_mutex_destroy(&ctx->drbg_lock);
    free(ctx);
}

static int tls_bio_send(void *p, const unsigned char *data, size_t len)
{
    struct tls_conn *t = p;
    if (len > INT_MAX)
        len = INT_MAX;
    if (buf_append(&t->out, data, len) < 0)
        return MBEDTLS_ERR_SSL_WANT_WRITE;
    return (int)len;
}

static int tls_bio_recv(void *p, unsigned char *data, size_t len)
{
    struct tls_conn *t = p;
    size_t avail = t->in.len - t->in_off;
    if (avail == 0)
        return MBEDTLS_ERR_SSL_WANT_READ;
    if (len > avail)
        len = avail;
    if (len > INT_MAX)
        len = INT_MAX;
    memcpy(data, t->in.data + t->in_off, len);
    t->in_off += len;
    if (t->in_off == t->in.len) {
        buf_reset(&t->in);
        t->in_off = 0;
    }
    return (int)len;
}

struct tls_conn *tls_conn_new(struct tls_ctx *ctx, const char *hostname, char *err, size_t errlen)
{
    struct tls_conn *t = xcalloc(1, sizeof *t);
    char why[128];
    t->ctx = tls_ctx_ref(ctx);
    t->host = xstrdup(hostname);
    mbedtls_ssl_init(&t->ssl);
    t->step_result = MBEDTLS_ERR_SSL_WANT_READ; /* no step yet */
    buf_init(&t->in, TLS_MAX_INPUT);
    buf_init(&t->out, TLS_MAX_OUTPUT);

    int r = mbedtls_ssl_setup(&t->ssl, &ctx->conf);
    if (r == 0)
        r = mbedtls_ssl_set_hostname(&t->ssl, hostname);
    if (r != 0) {
        mbedtls_strerror(r, why, sizeof why);
        tls_set_err(err, errlen, "tls: cannot set up a session: %s", why);
        tls_conn_free(t);
        return NULL;
    }
    if (ctx->session && strcmp(ctx->session_host, hostname) == 0 &&
        mbedtls_ssl_set_session(&t->ssl, ctx->session) == 0)
        t->offered = 1;
    mbedtls_ssl_set_bio(&t->ssl, t, tls_bio_send, tls_bio_recv, NULL);
    return t;
}

void tls_conn_free(struct tls_conn *t)
{
    if (!t)
        return;
    mbedtls_ssl_free(&t->ssl);
    free(t->host);
    buf_free(&t->in);
    buf_free(&t->out);
    tls_ctx_free(t->ctx);
    free(t);
}

const struct tls_ctx *tls_conn_ctx(const struct tls_conn *t)
{
    return t->ctx;
}

int tls_conn_feed(struct tls_conn *t, const void *p, size_t n)
{
    if (t->in_off) {
        buf_consume(&t->in, t->in_off);
        t->in_off = 0;
    }
    return buf_append(&t->in, p, n);
}

static enum tls_status tls_fail(struct tls_conn *t, int r)
{
    t->failed = 1;
    mbedtls_strerror(r, t->reason, sizeof t->reason);
    return TLS_FAILED;
}

/* Turns verification flags into "reason; reason" without the newlines verify_info adds. */
static void tls_verify_reason(struct tls_conn *t, uint32_t flags)
{
    char info[512];
    int n = mbedtls_x509_crt_verify_info(info, sizeof info, "", flags);
    if (n <= 0) {
        snprintf(t->reason, sizeof t->reason, "certificate verification failed (flags 0x%x)",
                 (unsigned)flags);
        return;
    }
    size_t o = 0;
    for (char *line = info; *line && o + 1 < sizeof t->reason;) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (o && len)
            o += (size_t)snprintf(t->reason + o, sizeof t->reason - o, "; ");
        if (o + 1 < sizeof t->reason)
            o += (size_t)snprintf(t->reason + o, sizeof t->reason - o, "%.*s", (int)len, line);
        if (!nl)
            break;
        line = nl + 1;
    }
    if (o >= sizeof t->reason)
        t->reason[sizeof t->reason - 1] = 0;
}

/* After a completed handshake: note whether it resumed, else remember its session. */
static void tls_conn_save_session(struct tls_conn *t)
{
    struct tls_ctx *ctx = t->ctx;
    mbedtls_ssl_session *s = xmalloc(sizeof *s);
    mbedtls_ssl_session_init(s);
    if (mbedtls_ssl_get_session(&t->ssl, s) != 0)
        goto drop;
    if (t->offered && ctx->session &&
        memcmp(s->master, ctx->session->master, TLS_MASTER_LEN) == 0) {
        t->resumed = 1;
        goto drop;
    }
    char *host = xstrdup(t->host);
    tls_ctx_forget_session(ctx);
    ctx->session = s;
    ctx->session_host = host;
    return;
drop:
    mbedtls_ssl_session_free(s);
    free(s);
}

void tls_conn_handshake_step(struct tls_conn *t)
{
    if (!t->failed && !t->handshake_done)
        t->step_result = mbedtls_ssl_handshake(&t->ssl);
}

enum tls_status tls_conn_handshake_finish(struct tls_conn *t)
{
    if (t->failed)
        return TLS_FAILED;
    if (t->handshake_done)
        return TLS_OK;
    int r = t->step_result;
    if (r == 0) {
        t->handshake_done = 1;
        tls_conn_save_session(t);
        return TLS_OK;
    }
    if (r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE)
        return TLS_WANT_IO;
    if (r == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED) {
        uint32_t flags = mbedtls_ssl_get_verify_result(&t->ssl);
        t->failed = 1;
        if (flags != 0 && flags != (uint32_t)-1)
            tls_verify_reason(t, flags);
        else
            mbedtls_strerror(r, t->reason, sizeof t->reason);
        return TLS_VERIFY_FAILED;
    }
    return tls_fail(t, r);
}

enum tls_status tls_conn_write(struct tls_conn *t, const void *p, size_t n)
{
    const unsigned char *d = p;
    if (t->failed || !t->handshake_done)
        return TLS_FAILED;
    while (n > 0) {
        int r = mbedtls_ssl_write(&t->ssl, d, n);
        if (r <= 0) /* WANT_WRITE here means the output cap was hit: nobody drains mid-call */
            return tls_fail(t, r ? r : MBEDTLS_ERR_SSL_INTERNAL_ERROR);
        d += r;
        n -= (size_t)r;
    }
    return TLS_OK;
}

enum tls_status tls_conn_read(struct tls_conn *t, void *p, size_t cap, size_t *got)
{
    *got = 0;
    if (t->failed || !t->handshake_done)
        return TLS_FAILED;
    int r = mbedtls_ssl_read(&t->ssl, p, cap);
    if (r > 0) {
        *got = (size_t)r;
        return TLS_OK;
    }
    if (r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE)
        return TLS_WANT_IO;
    if (r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY || r == 0)
        return TLS_CLOSED;
    return tls_fail(t, r);
}

void tls_conn_close_notify(struct tls_conn *t)
{
    if (t->handshake_done && !t->failed)
        (void)mbedtls_ssl_close_notify(&t->ssl);
}

int tls_conn_has_input(const struct tls_conn *t)
{
    return t->in.len > t->in_off || mbedtls_ssl_get_bytes_avail(&t->ssl) > 0 ||
           mbedtls_ssl_check_pending(&t->ssl);
}

char *tls_conn_take_output(struct tls_conn *t, size_t *len)
{
    *len = t->out.len;
    if (t->out.len == 0)
        return NULL;
    char *p = t->out.data;
    buf_init(&t->out, TLS_MAX_OUTPUT);
    return p;
}

const char *tls_conn_reason(const struct tls_conn *t)
{
    return t->reason;
}

const char *tls_conn_version(const struct tls_conn *t)
{
    return mbedtls_ssl_get_version(&t->ssl);
}

const char *tls_conn_cipher(const struct tls_conn *t)
{
    const char *s = mbedtls_ssl_get_ciphersuite(&t->ssl);
    return s ? s : "none";
}

int tls_conn_resumed(const struct tls_conn *t)
{
    return t->resumed;
}

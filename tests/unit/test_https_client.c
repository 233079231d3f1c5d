/* test_https_client.c - https_client against an in-process mbedTLS server on a thread, directly
 * and through an in-process HTTP CONNECT proxy on another thread.
 *
 * A throwaway PKI is made with the openssl CLI at start: CA + leaf for DNS:localhost, a leaf for
 * the wrong name from the same CA, and a localhost leaf from an unrelated second CA. Every test
 * runs its own uv loop with a watchdog and ends with uv_loop_close() == 0. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/ssl_cache.h>
#include <mbedtls/x509_crt.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "https_client.h"
#include "log.h"
#include "proxy.h"
#include "util.h"

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#ifndef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#endif

#define WATCHDOG_MS        5000 /* per test; times VALGRIND_SLOWDOWN under valgrind */
#define VALGRIND_SLOWDOWN  4
#define PROCESS_ALARM_S    60    /* last resort if something wedges outside the loop */
#define SRV_POLL_MS        10000 /* server-side waits give up after this */
#define SRV_HEAD_MAX       8192
#define SRV_BODY_MAX       4096
#define LARGE_BODY         200000
#define SHORT_TIMEOUT_MS   300
#define REQUEST_TIMEOUT_MS 1000 /* an ASan TLS handshake on a loaded machine fits well inside */
#define RESULT_BODY_MAX    1024
#define PRX_HEAD_MAX       8192 /* the test proxy reads CONNECT heads up to this */
#define PRX_RELAY_CHUNK    16384
#define PRX_HUGE_HEAD      (HTTPS_PROXY_RESPONSE_MAX + 1024)
#define LOG_CAPTURE_MAX    65536

/* ---- PKI ---------------------------------------------------------------------------------- */

static char pki_dir[64];

static const char *pki(const char *name)
{
    static char paths[8][128];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, sizeof paths[0], "%s/%s", pki_dir, name);
    return p;
}

static int pki_setup(void **state)
{
    (void)state;
    char cmd[2048];
    snprintf(pki_dir, sizeof pki_dir, "/tmp/imdsd-https-test-XXXXXX");
    if (!mkdtemp(pki_dir))
        return -1;
    snprintf(cmd, sizeof cmd,
             "set -e; cd '%s'\n"
             "gen() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 "
             "-out $1.key; }\n"
             "ca() { gen $1; openssl req -x509 -new -key $1.key -subj /CN=$2 -days 2 -sha256 "
             "-addext basicConstraints=critical,CA:TRUE "
             "-addext keyUsage=critical,keyCertSign,cRLSign -out $1.crt; }\n"
             "leaf() { gen $1; openssl req -new -key $1.key -subj /CN=$2 -out $1.csr\n"
             "  printf 'subjectAltName=DNS:%%s\\nbasicConstraints=CA:FALSE\\n"
             "keyUsage=digitalSignature\\nextendedKeyUsage=serverAuth\\n' $2 > $1.ext\n"
             "  openssl x509 -req -in $1.csr -CA $3.crt -CAkey $3.key -CAcreateserial -days 2 "
             "-sha256 -extfile $1.ext -out $1.crt; }\n"
             "{ ca ca imdsd-test-ca; ca ca2 imdsd-other-ca; leaf leaf localhost ca\n"
             "  leaf wrong wrong.example ca; leaf other localhost ca2\n"
             "  : > empty.pem; } > openssl.log 2>&1 || { cat openssl.log >&2; exit 1; }\n",
             pki_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static int pki_teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", pki_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* ---- the test server ---------------------------------------------------------------------- */

enum srv_mode {
    SRV_OK,         /* Content-Length response with Retry-After, keep-alive */
    SRV_CHUNKED,    /* chunked response in several records */
    SRV_CLOSE,      /* Connection: close, then close_notify */
    SRV_EOF_BODY,   /* no length: body runs until close_notify */
    SRV_DROP_AFTER, /* keep-alive response, then a plain close() */
    SRV_RESET,      /* half a response, then RST */
    SRV_LARGE,      /* LARGE_BODY bytes */
    SRV_HANG,       /* reads the request, never answers */
    SRV_SILENT,     /* accepts TCP, never speaks TLS */
};

struct srv {
    int lfd;
    int port;
    int stop[2];
    pthread_t th;
    enum srv_mode mode;
    mbedtls_ssl_config conf;
    mbedtls_x509_crt crt;
    mbedtls_pk_context key;
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    mbedtls_ssl_cache_context cache;
    pthread_mutex_t mu;
    int accepts, requests, cache_hits;
    char head[SRV_HEAD_MAX + 1]; /* last request head */
    char body[SRV_BODY_MAX + 1]; /* last request body */
    size_t body_len;
};

struct srv_io {
    struct srv *s;
    int fd;
};

/* 0 when fd is ready, -1 on stop or timeout. */
static int srv_wait(struct srv *s, int fd, short events)
{
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = s->stop[0], .events = POLLIN}};
    int r;
    do {
        r = poll(p, 2, SRV_POLL_MS);
    } while (r < 0 && errno == EINTR);
    if (r <= 0 || p[1].revents)
        return -1;
    return 0;
}

static int srv_send(void *ctx, const unsigned char *b, size_t n)
{
    struct srv_io *io = ctx;
    if (srv_wait(io->s, io->fd, POLLOUT) < 0)
        return MBEDTLS_ERR_NET_SEND_FAILED;
    ssize_t r = send(io->fd, b, n, MSG_NOSIGNAL);
    return r < 0 ? MBEDTLS_ERR_NET_SEND_FAILED : (int)r;
}

static int srv_recv(void *ctx, unsigned char *b, size_t n)
{
    struct srv_io *io = ctx;
    if (srv_wait(io->s, io->fd, POLLIN) < 0)
        return MBEDTLS_ERR_NET_RECV_FAILED;
    ssize_t r = recv(io->fd, b, n, 0);
    return r < 0 ? MBEDTLS_ERR_NET_RECV_FAILED : (int)r;
}

static int srv_cache_get(void *p, mbedtls_ssl_session *session)
{
    struct srv *s = (struct srv *)((char *)p - offsetof(struct srv, cache));
    int r = mbedtls_ssl_cache_get(p, session);
    if (r == 0) {
        pthread_mutex_lock(&s->mu);
        s->cache_hits++;
        pthread_mutex_unlock(&s->mu);
    }
    return r;
}

static int srv_write_all(mbedtls_ssl_context *ssl, const char *p, size_t n)
{
    while (n > 0) {
        int r = mbedtls_ssl_write(ssl, (const unsigned char *)p, n);
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int srv_write_str(mbedtls_ssl_context *ssl, const char *s)
{
    return srv_write_all(ssl, s, strlen(s));
}

/* Reads one request into s->head / s->body. 0, or -1 when the connection ended. */
static int srv_read_request(struct srv *s, mbedtls_ssl_context *ssl)
{
    char in[SRV_HEAD_MAX + SRV_BODY_MAX + 1];
    size_t len = 0;
    char *end = NULL;
    while (!end) {
        if (len >= sizeof in - 1)
            return -1;
        int r = mbedtls_ssl_read(ssl, (unsigned char *)in + len, sizeof in - 1 - len);
        if (r <= 0)
            return -1;
        len += (size_t)r;
        in[len] = 0;
        end = strstr(in, "\r\n\r\n");
    }
    size_t head_len = (size_t)(end + 4 - in);
    size_t clen = 0;
    for (char *h = strstr(in, "\r\n"); h && h < end; h = strstr(h + 2, "\r\n")) {
        if (strncasecmp(h + 2, "Content-Length:", 15) == 0)
            clen = strtoul(h + 17, NULL, 10);
    }
    if (head_len > SRV_HEAD_MAX || clen > SRV_BODY_MAX)
        return -1;
    while (len < head_len + clen) {
        int r = mbedtls_ssl_read(ssl, (unsigned char *)in + len, head_len + clen - len);
        if (r <= 0)
            return -1;
        len += (size_t)r;
    }
    pthread_mutex_lock(&s->mu);
    s->requests++;
    memcpy(s->head, in, head_len);
    s->head[head_len] = 0;
    memcpy(s->body, in + head_len, clen);
    s->body[clen] = 0;
    s->body_len = clen;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* Waits for the peer to go away (or for stop). */
static void srv_drain(struct srv *s, int fd)
{
    char junk[4096];
    while (srv_wait(s, fd, POLLIN) == 0 && recv(fd, junk, sizeof junk, 0) > 0)
        ;
}

static void srv_reset(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

/* Serves one connection; closes fd. */
static void srv_handle(struct srv *s, int fd)
{
    struct srv_io io = {.s = s, .fd = fd};
    mbedtls_ssl_context ssl;
    char big[16384];

    if (s->mode == SRV_SILENT) {
        srv_drain(s, fd);
        close(fd);
        return;
    }
    mbedtls_ssl_init(&ssl);
    if (mbedtls_ssl_setup(&ssl, &s->conf) != 0)
        goto out;
    mbedtls_ssl_set_bio(&ssl, &io, srv_send, srv_recv, NULL);
    if (mbedtls_ssl_handshake(&ssl) != 0)
        goto out;
    while (srv_read_request(s, &ssl) == 0) {
        switch (s->mode) {
        case SRV_OK:
            if (srv_write_str(&ssl, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                    "Retry-After: 7\r\nContent-Length: 11\r\n\r\nhello world") < 0)
                goto out;
            continue;
        case SRV_CHUNKED:
            if (srv_write_str(&ssl, "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n") <
                    0 ||
                srv_write_str(&ssl, "5\r\nhello\r\n") < 0 ||
                srv_write_str(&ssl, "6\r\n world\r\n") < 0 || srv_write_str(&ssl, "0\r\n\r\n") < 0)
                goto out;
            continue;
        case SRV_CLOSE:
            srv_write_str(&ssl, "HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                "Content-Length: 2\r\n\r\nok");
            mbedtls_ssl_close_notify(&ssl);
            goto out;
        case SRV_EOF_BODY:
            srv_write_str(&ssl, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil ");
            srv_write_str(&ssl, "the end");
            mbedtls_ssl_close_notify(&ssl);
            goto out;
        case SRV_DROP_AFTER:
            srv_write_str(&ssl, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            goto out;
        case SRV_RESET:
            srv_write_str(&ssl, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial");
            usleep(20000);
            srv_reset(fd);
            goto out;
        case SRV_LARGE:
            memset(big, 'x', sizeof big);
            snprintf(big, sizeof big, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", LARGE_BODY);
            big[strlen(big)] = 'x';
            for (size_t sent = 0; sent < LARGE_BODY; sent += sizeof big) {
                if (srv_write_all(&ssl, big, sizeof big) < 0)
                    break;
            }
            goto out;
        case SRV_HANG:
        case SRV_SILENT:
            srv_drain(s, fd);
            goto out;
        }
    }
out:
    mbedtls_ssl_free(&ssl);
    close(fd);
}

static int srv_stopping(struct srv *s)
{
    struct pollfd p = {.fd = s->stop[0], .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

static void *srv_main(void *arg)
{
    struct srv *s = arg;
    while (!srv_stopping(s)) {
        if (srv_wait(s, s->lfd, POLLIN) < 0)
            continue;
        int fd = accept(s->lfd, NULL, NULL);
        if (fd < 0)
            continue;
        pthread_mutex_lock(&s->mu);
        s->accepts++;
        pthread_mutex_unlock(&s->mu);
        srv_handle(s, fd);
    }
    return NULL;
}

static void srv_start(struct srv *s, enum srv_mode mode, const char *crt, const char *key)
{
    static const char pers[] = "test-server";
    memset(s, 0, sizeof *s);
    s->mode = mode;
    pthread_mutex_init(&s->mu, NULL);
    mbedtls_ssl_config_init(&s->conf);
    mbedtls_x509_crt_init(&s->crt);
    mbedtls_pk_init(&s->key);
    mbedtls_entropy_init(&s->entropy);
    mbedtls_ctr_drbg_init(&s->drbg);
    mbedtls_ssl_cache_init(&s->cache);
    assert_int_equal(mbedtls_ctr_drbg_seed(&s->drbg, mbedtls_entropy_func, &s->entropy,
                                           (const unsigned char *)pers, sizeof pers - 1),
                     0);
    assert_int_equal(mbedtls_x509_crt_parse_file(&s->crt, crt), 0);
    assert_int_equal(mbedtls_pk_parse_keyfile(&s->key, key, NULL), 0);
    assert_int_equal(mbedtls_ssl_config_defaults(&s->conf, MBEDTLS_SSL_IS_SERVER,
                                                 MBEDTLS_SSL_TRANSPORT_STREAM,
                                                 MBEDTLS_SSL_PRESET_DEFAULT),
                     0);
    mbedtls_ssl_conf_rng(&s->conf, mbedtls_ctr_drbg_random, &s->drbg);
    assert_int_equal(mbedtls_ssl_conf_own_cert(&s->conf, &s->crt, &s->key), 0);
    mbedtls_ssl_conf_session_cache(&s->conf, &s->cache, srv_cache_get, mbedtls_ssl_cache_set);

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s->lfd >= 0);
    assert_int_equal(bind(s->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(s->lfd, 16), 0);
    assert_int_equal(getsockname(s->lfd, (struct sockaddr *)&sa, &sl), 0);
    s->port = ntohs(sa.sin_port);
    assert_int_equal(pipe(s->stop), 0);
    assert_int_equal(pthread_create(&s->th, NULL, srv_main, s), 0);
}

static void srv_stop(struct srv *s)
{
    assert_int_equal(write(s->stop[1], "x", 1), 1);
    pthread_join(s->th, NULL);
    close(s->lfd);
    close(s->stop[0]);
    close(s->stop[1]);
    mbedtls_ssl_cache_free(&s->cache);
    mbedtls_ssl_config_free(&s->conf);
    mbedtls_x509_crt_free(&s->crt);
    mbedtls_pk_free(&s->key);
    mbedtls_ctr_drbg_free(&s->drbg);
    mbedtls_entropy_free(&s->entropy);
    pthread_mutex_destroy(&s->mu);
}

static int srv_get(struct srv *s, const int *field)
{
    pthread_mutex_lock(&s->mu);
    int v = *field;
    pthread_mutex_unlock(&s->mu);
    return v;
}

/* ---- the test CONNECT proxy --------------------------------------------------------------- */

enum prx_mode {
    PRX_TUNNEL,    /* 200, then relays to 127.0.0.1:target_port */
    PRX_INTERIM,   /* 100 Continue, then 200 with headers, then relays */
    PRX_REFUSE,    /* answers refuse_status with a small body, then closes */
    PRX_CLOSE_MID, /* half a status line, then close() */
    PRX_CLOSE,     /* close() without a word */
    PRX_GARBAGE,   /* something that is not HTTP */
    PRX_HUGE,      /* an endless header block */
    PRX_HANG,      /* reads CONNECT, never answers */
};

struct prx {
    int lfd;
    int port;
    int stop[2];
    pthread_t th;
    enum prx_mode mode;
    int refuse_status;
    int target_port;
    pthread_mutex_t mu;
    int accepts, connects;
    char head[PRX_HEAD_MAX + 1]; /* last CONNECT head */
};

static int prx_get(struct prx *p, const int *field)
{
    pthread_mutex_lock(&p->mu);
    int v = *field;
    pthread_mutex_unlock(&p->mu);
    return v;
}

static void prx_set(struct prx *p, int *field, int v)
{
    pthread_mutex_lock(&p->mu);
    *field = v;
    pthread_mutex_unlock(&p->mu);
}

static int prx_wait(struct prx *p, int fd, short events)
{
    struct pollfd pf[2] = {{.fd = fd, .events = events}, {.fd = p->stop[0], .events = POLLIN}};
    int r;
    do {
        r = poll(pf, 2, SRV_POLL_MS);
    } while (r < 0 && errno == EINTR);
    if (r <= 0 || pf[1].revents)
        return -1;
    return 0;
}

static int prx_send(int fd, const char *b, size_t n)
{
    while (n > 0) {
        ssize_t r = send(fd, b, n, MSG_NOSIGNAL);
        if (r <= 0)
            return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

static void prx_drain(struct prx *p, int fd)
{
    char junk[4096];
    while (prx_wait(p, fd, POLLIN) == 0 && recv(fd, junk, sizeof junk, 0) > 0)
        ;
}

/* Copies bytes both ways until either side closes (or stop). */
static void prx_relay(struct prx *p, int a, int b)
{
    char buf[PRX_RELAY_CHUNK];
    for (;;) {
        struct pollfd pf[3] = {{.fd = a, .events = POLLIN},
                               {.fd = b, .events = POLLIN},
                               {.fd = p->stop[0], .events = POLLIN}};
        int r = poll(pf, 3, SRV_POLL_MS);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || pf[2].revents)
            return;
        for (int i = 0; i < 2; i++) {
            if (!pf[i].revents)
                continue;
            ssize_t n = recv(pf[i].fd, buf, sizeof buf, 0);
            if (n <= 0 || prx_send(i == 0 ? b : a, buf, (size_t)n) < 0)
                return;
        }
    }
}

static void prx_handle(struct prx *p, int fd)
{
    char in[PRX_HEAD_MAX + 1];
    size_t len = 0;
    char *end = NULL;
    while (!end) {
        if (len >= PRX_HEAD_MAX || prx_wait(p, fd, POLLIN) < 0)
            goto out;
        ssize_t r = recv(fd, in + len, PRX_HEAD_MAX - len, 0);
        if (r <= 0)
            goto out;
        len += (size_t)r;
        in[len] = 0;
        end = strstr(in, "\r\n\r\n");
    }
    pthread_mutex_lock(&p->mu);
    p->connects++;
    memcpy(p->head, in, (size_t)(end + 4 - in));
    p->head[end + 4 - in] = 0;
    pthread_mutex_unlock(&p->mu);

    char msg[256];
    switch (p->mode) {
    case PRX_REFUSE:
        snprintf(msg, sizeof msg,
                 "HTTP/1.1 %d Go Away\r\nProxy-Authenticate: Basic realm=\"test\"\r\n"
                 "Content-Length: 4\r\n\r\nnope",
                 prx_get(p, &p->refuse_status));
        prx_send(fd, msg, strlen(msg));
        goto out;
    case PRX_CLOSE_MID:
        prx_send(fd, "HTTP/1.1 200 Conn", 17);
        goto out;
    case PRX_CLOSE:
        goto out;
    case PRX_GARBAGE:
        prx_send(fd, "SSH-2.0-OpenSSH_9.2\r\n\r\n", 23);
        prx_drain(p, fd);
        goto out;
    case PRX_HUGE: {
        static char big[PRX_HUGE_HEAD];
        memset(big, 'x', sizeof big);
        memcpy(big, "HTTP/1.1 200 OK\r\nX-Pad: ", 24);
        prx_send(fd, big, sizeof big);
        prx_drain(p, fd);
        goto out;
    }
    case PRX_HANG:
        prx_drain(p, fd);
        goto out;
    case PRX_TUNNEL:
    case PRX_INTERIM:
        break;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                             .sin_port = htons((uint16_t)p->target_port)};
    int up = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (up < 0)
        goto out;
    if (connect(up, (struct sockaddr *)&sa, sizeof sa) < 0) {
        snprintf(msg, sizeof msg, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        prx_send(fd, msg, strlen(msg));
        close(up);
        goto out;
    }
    if (p->mode == PRX_INTERIM)
        prx_send(fd, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    snprintf(msg, sizeof msg, "HTTP/1.1 200 Connection established\r\n%s\r\n",
             p->mode == PRX_INTERIM ? "Via: 1.1 test\r\nContent-Length: 0\r\n" : "");
    if (prx_send(fd, msg, strlen(msg)) == 0)
        prx_relay(p, fd, up);
    close(up);
out:
    close(fd);
}

static void *prx_main(void *arg)
{
    struct prx *p = arg;
    struct pollfd stop = {.fd = p->stop[0], .events = POLLIN};
    while (poll(&stop, 1, 0) <= 0) {
        if (prx_wait(p, p->lfd, POLLIN) < 0)
            continue;
        int fd = accept(p->lfd, NULL, NULL);
        if (fd < 0)
            continue;
        pthread_mutex_lock(&p->mu);
        p->accepts++;
        pthread_mutex_unlock(&p->mu);
        prx_handle(p, fd);
    }
    return NULL;
}

static void prx_start(struct prx *p, enum prx_mode mode, int target_port)
{
    memset(p, 0, sizeof *p);
    p->mode = mode;
    p->target_port = target_port;
    pthread_mutex_init(&p->mu, NULL);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    p->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(p->lfd >= 0);
    assert_int_equal(bind(p->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(p->lfd, 16), 0);
    assert_int_equal(getsockname(p->lfd, (struct sockaddr *)&sa, &sl), 0);
    p->port = ntohs(sa.sin_port);
    assert_int_equal(pipe(p->stop), 0);
    assert_int_equal(pthread_create(&p->th, NULL, prx_main, p), 0);
}

static void prx_stop(struct prx *p)
{
    assert_int_equal(write(p->stop[1], "x", 1), 1);
    pthread_join(p->th, NULL);
    close(p->lfd);
    close(p->stop[0]);
    close(p->stop[1]);
    pthread_mutex_destroy(&p->mu);
}

/* ---- fixture ------------------------------------------------------------------------------ */

struct result {
    int calls;
    int err;
    int status;
    char body[RESULT_BODY_MAX + 1];
    size_t body_len;
    int has_retry_after;
    char retry_after[64];
    uint64_t at_ms;
    /* Optional: send this request from inside done. */
    struct https_client *then_client;
    struct https_request *then_req;
    int then_rc;
    int then_free; /* free then_client from inside done */
};

struct fixture {
    uv_loop_t loop;
    uv_timer_t watchdog;
    int watchdog_fired;
    struct srv srv;
    int srv_running;
    struct https_client *client;
    char port[8];
    struct prx prx;
    int prx_running;
    struct proxy proxy; /* used by make_client when proxy.host is set */
    char *log;          /* captured stderr, see capture_start() */
    const void *row;    /* the table row of this case (cmocka's initial state), or NULL */
};

static void watchdog_cb(uv_timer_t *t)
{
    struct fixture *f = t->data;
    f->watchdog_fired = 1;
    uv_stop(t->loop);
}

static int fx_setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    if (!f || uv_loop_init(&f->loop) != 0)
        return -1;
    f->row = *state; /* a table row, or NULL */
    uv_timer_init(&f->loop, &f->watchdog);
    f->watchdog.data = f;
    uv_timer_start(&f->watchdog, watchdog_cb,
                   RUNNING_ON_VALGRIND ? WATCHDOG_MS * VALGRIND_SLOWDOWN : WATCHDOG_MS, 0);
    uv_unref((uv_handle_t *)&f->watchdog); /* fires, but does not keep the loop alive */
    *state = f;
    return 0;
}

static void count_handles(uv_handle_t *h, void *arg)
{
    (void)h;
    (*(int *)arg)++;
}

static int fx_teardown(void **state)
{
    struct fixture *f = *state;
    int rc = 0;
    if (f->client)
        https_client_free(f->client);
    f->client = NULL;
    uv_run(&f->loop, UV_RUN_DEFAULT); /* the unref'd watchdog still bounds this */
    if (f->watchdog_fired) {
        fprintf(stderr, "watchdog fired\n");
        rc = -1;
    }
    uv_close((uv_handle_t *)&f->watchdog, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    int left = 0;
    uv_walk(&f->loop, count_handles, &left);
    if (left || uv_loop_close(&f->loop) != 0) {
        fprintf(stderr, "loop not empty: %d handles\n", left);
        rc = -1;
    }
    if (f->prx_running)
        prx_stop(&f->prx);
    if (f->srv_running)
        srv_stop(&f->srv);
    proxy_free(&f->proxy);
    free(f->log);
    free(f);
    return rc;
}

/* Runs the loop until *flag is set; fails on watchdog or when nothing is left to wait for. */
static void run_until(struct fixture *f, const int *flag)
{
    while (!*flag) {
        int alive = uv_run(&f->loop, UV_RUN_ONCE);
        assert_false(f->watchdog_fired);
        if (!alive && !*flag)
            fail_msg("loop went idle before the condition was met");
    }
}

static void sleep_cb(uv_timer_t *t)
{
    *(int *)t->data = 1;
}

static void run_for(struct fixture *f, uint64_t ms)
{
    uv_timer_t t;
    int done = 0;
    uv_timer_init(&f->loop, &t);
    t.data = &done;
    uv_timer_start(&t, sleep_cb, ms, 0);
    run_until(f, &done);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&f->loop, UV_RUN_NOWAIT);
}

static void start_server(struct fixture *f, enum srv_mode mode, const char *leaf)
{
    char crt[64], key[64];
    snprintf(crt, sizeof crt, "%s.crt", leaf);
    snprintf(key, sizeof key, "%s.key", leaf);
    srv_start(&f->srv, mode, pki(crt), pki(key));
    f->srv_running = 1;
    snprintf(f->port, sizeof f->port, "%d", f->srv.port);
}

static void make_client_opts(struct fixture *f, const char *ca, uint64_t connect_ms,
                             uint64_t request_ms)
{
    char err[256] = "";
    struct https_client_opts o = {
        .host = "localhost",
        .port = f->port,
        .ca_file = pki(ca),
        .connect_timeout_ms = connect_ms,
        .request_timeout_ms = request_ms,
        .proxy = f->proxy.host ? &f->proxy : NULL,
    };
    int r = https_client_new(&f->client, &f->loop, &o, err, sizeof err);
    if (r != 0)
        fail_msg("https_client_new: %s", err);
}

static void make_client(struct fixture *f)
{
    make_client_opts(f, "ca.crt", 0, 0);
}

static void on_done(struct https_request *req, int err, const struct https_response *resp)
{
    struct result *res = req->data;
    res->calls++;
    res->err = err;
    res->at_ms = now_ms();
    if (resp) {
        res->status = resp->status;
        res->body_len = resp->body_len;
        size_t n = resp->body_len < RESULT_BODY_MAX ? resp->body_len : RESULT_BODY_MAX;
        memcpy(res->body, resp->body, n);
        res->body[n] = 0;
        res->has_retry_after = resp->retry_after != NULL;
        if (resp->retry_after)
            snprintf(res->retry_after, sizeof res->retry_after, "%s", resp->retry_after);
        if (resp->body[resp->body_len] != 0)
            res->status = -1; /* must be NUL-terminated */
    }
    if (res->then_req)
        res->then_rc = https_client_send(res->then_client, res->then_req);
    if (res->then_free)
        https_client_free(res->then_client);
}

static void init_req(struct https_request *req, struct result *res)
{
    memset(req, 0, sizeof *req);
    memset(res, 0, sizeof *res);
    req->method = "POST";
    req->path = "/token";
    req->headers = "X-Test: yes\r\n";
    req->body = "a=1&b=two";
    req->body_len = 9;
    req->done = on_done;
    req->data = res;
}

/* Sends a fresh request, runs until done, checks it succeeded. */
static void roundtrip_ok(struct fixture *f, struct https_request *req, struct result *res)
{
    init_req(req, res);
    assert_int_equal(https_client_send(f->client, req), 0);
    run_until(f, &res->calls);
    assert_int_equal(res->calls, 1);
    if (res->err != HTTPS_OK)
        fail_msg("request failed: %s", https_strerror(res->err));
}

static void expect_error(struct fixture *f, int want)
{
    struct https_request req;
    struct result res;
    init_req(&req, &res);
    assert_int_equal(https_client_send(f->client, &req), 0);
    assert_int_equal(res.calls, 0); /* never from inside send */
    run_until(f, &res.calls);
    if (res.err != want)
        fail_msg("got %d (%s), want %d (%s)", res.err, https_strerror(res.err), want,
                 https_strerror(want));
    run_for(f, 20);
    assert_int_equal(res.calls, 1);
}

/* Starts the test proxy in front of the test server (start_server first) and makes the next
 * client use it. userinfo: "user:password@" or "". */
static void start_proxy(struct fixture *f, enum prx_mode mode, const char *userinfo)
{
    char url[256];
    const char *why = NULL;
    prx_start(&f->prx, mode, f->srv_running ? f->srv.port : 1);
    f->prx_running = 1;
    snprintf(url, sizeof url, "http://%s127.0.0.1:%d/", userinfo, f->prx.port);
    if (proxy_parse(&f->proxy, url, &why) != 0)
        fail_msg("proxy_parse(%s): %s", url, why);
}

/* A port nobody listens on: bind one, note it, close it. */
static int unused_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

/* Redirects stderr (the log) into a file until capture_stop(), which leaves it in f->log. */
static int capture_saved_fd = -1;
static enum log_level capture_saved_level;

static void capture_start(void)
{
    fflush(stderr);
    int fd = open(pki("stderr.log"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    capture_saved_fd = dup(2);
    assert_true(capture_saved_fd >= 0);
    assert_true(dup2(fd, 2) == 2);
    close(fd);
    capture_saved_level = log_min_level;
    log_min_level = LOG_DEBUG;
}

static void capture_stop(struct fixture *f)
{
    fflush(stderr);
    dup2(capture_saved_fd, 2);
    close(capture_saved_fd);
    capture_saved_fd = -1;
    log_min_level = capture_saved_level;
    free(f->log);
    f->log = calloc(1, LOG_CAPTURE_MAX + 1);
    assert_non_null(f->log);
    int fd = open(pki("stderr.log"), O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    ssize_t n = read(fd, f->log, LOG_CAPTURE_MAX);
    close(fd);
    assert_true(n >= 0);
}

/* The captured log line of event ev (e.g. "event=https_proxy_refused "), or fails. */
static const char *log_line(struct fixture *f, const char *ev)
{
    const char *l = strstr(f->log, ev);
    if (!l)
        fail_msg("no %s in the log:\n%s", ev, f->log);
    return l;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_ca_file_errors(void **state)
{
    struct fixture *f = *state;
    struct https_client *c = NULL;
    char err[256] = "";
    struct https_client_opts o = {.host = "localhost", .port = "443"};

    o.ca_file = pki("missing.pem");
    assert_true(https_client_new(&c, &f->loop, &o, err, sizeof err) < 0);
    assert_null(c);
    assert_non_null(strstr(err, o.ca_file));
    assert_null(strchr(err, '\n'));

    o.ca_file = pki("empty.pem");
    assert_true(https_client_new(&c, &f->loop, &o, err, sizeof err) < 0);
    assert_non_null(strstr(err, o.ca_file));

    o.ca_file = pki("leaf.key"); /* PEM, but no certificate */
    assert_true(https_client_new(&c, &f->loop, &o, err, sizeof err) < 0);
    assert_non_null(strstr(err, o.ca_file));

    o.ca_file = pki("ca.crt");
    o.port = "99999";
    assert_true(https_client_new(&c, &f->loop, &o, err, sizeof err) < 0);
    assert_non_null(strstr(err, "port"));
}

static void test_post_content_length(void **state)
{
    struct fixture *f = *state;
    struct https_request req;
    struct result res;
    char want[64];
    start_server(f, SRV_OK, "leaf");
    make_client(f);
    roundtrip_ok(f, &req, &res);
    assert_int_equal(res.status, 200);
    assert_int_equal(res.body_len, 11);
    assert_string_equal(res.body, "hello world");
    assert_true(res.has_retry_after);
    assert_string_equal(res.retry_after, "7");

    pthread_mutex_lock(&f->srv.mu);
    assert_true(strncmp(f->srv.head, "POST /token HTTP/1.1\r\n", 22) == 0);
    snprintf(want, sizeof want, "\r\nHost: localhost:%d\r\n", f->srv.port);
    assert_non_null(strstr(f->srv.head, want));
    assert_non_null(strstr(f->srv.head, "\r\nUser-Agent: imdsd/" IMDSD_VERSION "\r\n"));
    assert_non_null(strstr(f->srv.head, "\r\nContent-Length: 9\r\n"));
    assert_non_null(strstr(f->srv.head, "\r\nConnection: keep-alive\r\n"));
    assert_non_null(strstr(f->srv.head, "\r\nX-Test: yes\r\n\r\n"));
    assert_int_equal(f->srv.body_len, 9);
    assert_string_equal(f->srv.body, "a=1&b=two");
    pthread_mutex_unlock(&f->srv.mu);

    /* Canceling after done is a no-op. */
    https_client_cancel(&req);
}

static void test_idle_closed_by_server(void **state)
{
    struct fixture *f = *state;
    struct https_request req1, req2;
    struct result res1, res2;
    start_server(f, SRV_DROP_AFTER, "leaf");
    make_client(f);
    roundtrip_ok(f, &req1, &res1);
    run_for(f, 50); /* the client notices the close and drops the pooled connection */
    roundtrip_ok(f, &req2, &res2);
    assert_int_equal(req2.retried, 0);
    assert_int_equal(srv_get(&f->srv, &f->srv.accepts), 2);
}

static void test_free_from_done(void **state)
{
    struct fixture *f = *state;
    struct https_request req1, req2;
    struct result res1, res2;
    start_server(f, SRV_OK, "leaf");
    make_client(f);
    init_req(&req1, &res1);
    init_req(&req2, &res2);
    res1.then_client = f->client;
    res1.then_req = &req2; /* goes out on the pooled connection, then the client is freed */
    res1.then_free = 1;
    assert_int_equal(https_client_send(f->client, &req1), 0);
    f->client = NULL;
    run_until(f, &res1.calls);
    assert_int_equal(res1.err, HTTPS_OK);
    assert_int_equal(res1.then_rc, 0);
    assert_int_equal(res2.calls, 1);
    assert_int_equal(res2.err, HTTPS_E_CANCELED);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(res1.calls, 1);
    assert_int_equal(res2.calls, 1);
}

static void test_connection_close_and_resumption(void **state)
{
    struct fixture *f = *state;
    struct https_request req1, req2;
    struct result res1, res2;
    start_server(f, SRV_CLOSE, "leaf");
    make_client(f);
    roundtrip_ok(f, &req1, &res1);
    assert_string_equal(res1.body, "ok");
    roundtrip_ok(f, &req2, &res2);
    assert_string_equal(res2.body, "ok");
    assert_int_equal(srv_get(&f->srv, &f->srv.accepts), 2);
    assert_int_equal(srv_get(&f->srv, &f->srv.cache_hits), 1); /* the second one resumed */
}

static void test_cancel(void **state)
{
    struct fixture *f = *state;
    struct https_request req1, req2;
    struct result res1, res2;
    start_server(f, SRV_HANG, "leaf");
    make_client(f);

    /* Right away, while resolving. */
    init_req(&req1, &res1);
    assert_int_equal(https_client_send(f->client, &req1), 0);
    https_client_cancel(&req1);
    https_client_cancel(&req1); /* twice is fine */

    /* Once the request is on the wire. */
    init_req(&req2, &res2);
    assert_int_equal(https_client_send(f->client, &req2), 0);
    for (int i = 0; i < 100 && srv_get(&f->srv, &f->srv.requests) == 0; i++)
        run_for(f, 10);
    assert_int_equal(srv_get(&f->srv, &f->srv.requests), 1);
    https_client_cancel(&req2);
    run_for(f, 50);
    assert_int_equal(res1.calls, 0);
    assert_int_equal(res2.calls, 0);
}

static void test_free_with_pending(void **state)
{
    struct fixture *f = *state;
    struct https_request req1, req2;
    struct result res1, res2;
    start_server(f, SRV_HANG, "leaf");
    make_client(f);
    init_req(&req1, &res1);
    init_req(&req2, &res2);
    assert_int_equal(https_client_send(f->client, &req1), 0);
    for (int i = 0; i < 100 && srv_get(&f->srv, &f->srv.requests) == 0; i++)
        run_for(f, 10);
    assert_int_equal(https_client_send(f->client, &req2), 0); /* still resolving */
    https_client_free(f->client);
    f->client = NULL;
    assert_int_equal(res1.calls, 1);
    assert_int_equal(res1.err, HTTPS_E_CANCELED);
    assert_int_equal(res2.calls, 1);
    assert_int_equal(res2.err, HTTPS_E_CANCELED);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(res1.calls, 1);
    assert_int_equal(res2.calls, 1);
}

/* ---- the handshake's steps run on the worker thread ------------------------------------------ */

/* Runs the loop until the nth handshake step of c has been handed to the worker (and is not back
 * yet: its done callback runs on the loop, which does not run until the caller does). */
static void run_until_step_in_pool(struct fixture *f, struct https_client *c, int nth)
{
    int seen = 0, busy = 0;
    while (seen < nth) {
        int alive = uv_run(&f->loop, UV_RUN_ONCE);
        assert_false(f->watchdog_fired);
        int now = https_client_handshake_steps(c, NULL) > 0;
        seen += now && !busy;
        busy = now;
        if (!alive)
            fail_msg("loop went idle before handshake step %d", nth);
    }
}

/* A request canceled while a step of its handshake is with the worker (the first step, the
 * ClientHello; the second, the server's first flight: verifying the chain and the key exchange;
 * the third, the server's Finished): done never runs, the step's result is dropped, nothing leaks
 * (fx_teardown: the loop closes) and the next request gets through. */
static void test_cancel_during_handshake_step(void **state)
{
    struct fixture *f = *state;
    start_server(f, SRV_OK, "leaf");
    make_client(f);
    for (int nth = 1; nth <= 3; nth++) {
        struct https_request req;
        struct result res;
        init_req(&req, &res);
        assert_int_equal(https_client_send(f->client, &req), 0);
        run_until_step_in_pool(f, f->client, nth);
        https_client_cancel(&req);
        run_for(f, 20);
        assert_int_equal(res.calls, 0);
    }
    struct https_request req;
    struct result res;
    roundtrip_ok(f, &req, &res);
    assert_string_equal(res.body, "hello world");
    assert_int_equal(https_client_handshake_steps(f->client, NULL), 0);
}

/* The client freed while a handshake step is with the worker: done runs at once (canceled),
 * and the connection is freed when the step is back. */
static void test_free_during_handshake_step(void **state)
{
    struct fixture *f = *state;
    struct https_request req;
    struct result res;
    start_server(f, SRV_OK, "leaf");
    make_client(f);
    init_req(&req, &res);
    assert_int_equal(https_client_send(f->client, &req), 0);
    run_until_step_in_pool(f, f->client, 2);
    https_client_free(f->client);
    f->client = NULL;
    assert_int_equal(res.calls, 1);
    assert_int_equal(res.err, HTTPS_E_CANCELED);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(res.calls, 1);
}

#define STORM 8 /* requests sent at once, each on a new connection */

/* STORM requests at once: their connections' handshake steps take turns on the worker (test_worker:
 * one job at a time, in order), and all get their answer. With free_when_queued the
 * client is freed as soon as a step waits for its turn: every request is canceled, and the waiting
 * connections leave the queue (fx_teardown: nothing is left behind). */
static void handshake_storm(void **state, int free_when_queued)
{
    struct fixture *f = *state;
    struct https_request req[STORM];
    struct result res[STORM];
    start_server(f, SRV_CLOSE, "leaf");
    make_client(f);
    for (int i = 0; i < STORM; i++) {
        init_req(&req[i], &res[i]);
        assert_int_equal(https_client_send(f->client, &req[i]), 0);
    }
    unsigned queued = 0;
    int done = 0;
    while (done < STORM) {
        int alive = uv_run(&f->loop, UV_RUN_ONCE);
        assert_false(f->watchdog_fired);
        unsigned waiting;
        (void)https_client_handshake_steps(f->client, &waiting);
        queued = waiting > queued ? waiting : queued;
        if (queued && free_when_queued)
            break;
        done = 0;
        for (int i = 0; i < STORM; i++)
            done += res[i].calls;
        if (!alive && done < STORM)
            fail_msg("loop went idle with %d of %d answered", done, STORM);
    }
    assert_true(queued > 0); /* connected in the same turns: they had to take turns */
    if (free_when_queued) {
        https_client_free(f->client);
        f->client = NULL;
    }
    for (int i = 0; i < STORM; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_int_equal(res[i].err, free_when_queued ? HTTPS_E_CANCELED : HTTPS_OK);
    }
}

static void test_handshake_steps_take_turns(void **state)
{
    handshake_storm(state, 0);
}

static void test_free_with_handshakes_queued(void **state)
{
    handshake_storm(state, 1);
}

/* ---- through a CONNECT proxy -------------------------------------------------------------- */

static void test_proxy_tunnel(void **state)
{
    struct fixture *f = *state;
    struct https_request req;
    struct result res;
    char want[256];
    start_server(f, SRV_OK, "leaf");
    start_proxy(f, PRX_TUNNEL, "");
    make_client(f);
    roundtrip_ok(f, &req, &res);
    assert_int_equal(res.status, 200);
    assert_string_equal(res.body, "hello world");
    assert_int_equal(prx_get(&f->prx, &f->prx.connects), 1);
    /* Exactly the CONNECT request, without credentials. */
    snprintf(want, sizeof want, "CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n",
             f->srv.port, f->srv.port);
    pthread_mutex_lock(&f->prx.mu);
    assert_string_equal(f->prx.head, want);
    pthread_mutex_unlock(&f->prx.mu);
    /* The origin sees the usual request, with its own Host. */
    pthread_mutex_lock(&f->srv.mu);
    assert_true(strncmp(f->srv.head, "POST /token HTTP/1.1\r\n", 22) == 0);
    snprintf(want, sizeof want, "\r\nHost: localhost:%d\r\n", f->srv.port);
    assert_non_null(strstr(f->srv.head, want));
    assert_null(strcasestr(f->srv.head, "Proxy-Authorization"));
    pthread_mutex_unlock(&f->srv.mu);
}

static void test_proxy_authorization(void **state)
{
    struct fixture *f = *state;
    struct https_request req;
    struct result res;
    char want[256];
    start_server(f, SRV_OK, "leaf");
    start_proxy(f, PRX_TUNNEL, "user:p%40ss@"); /* base64("user:p@ss") = dXNlcjpwQHNz */
    make_client(f);
    capture_start();
    init_req(&req, &res);
    int rc = https_client_send(f->client, &req);
    if (rc == 0)
        run_until(f, &res.calls);
    capture_stop(f);
    assert_int_equal(rc, 0);
    assert_int_equal(res.err, HTTPS_OK);
    snprintf(want, sizeof want,
             "CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n"
             "Proxy-Authorization: Basic dXNlcjpwQHNz\r\n\r\n",
             f->srv.port, f->srv.port);
    pthread_mutex_lock(&f->prx.mu);
    assert_string_equal(f->prx.head, want);
    pthread_mutex_unlock(&f->prx.mu);
    /* The header goes to the proxy only, and no log line (debug included) shows it. */
    pthread_mutex_lock(&f->srv.mu);
    assert_null(strcasestr(f->srv.head, "Proxy-Authorization"));
    pthread_mutex_unlock(&f->srv.mu);
    assert_non_null(log_line(f, "event=https_proxy_connect "));
    snprintf(want, sizeof want, "proxy=http://user:***@127.0.0.1:%d", f->prx.port);
    assert_non_null(strstr(f->log, want));
    assert_null(strstr(f->log, "dXNlcjpwQHNz"));
    assert_null(strstr(f->log, "p@ss"));
    assert_null(strstr(f->log, "p%40ss"));
}

static void test_proxy_refuses_407(void **state)
{
    struct fixture *f = *state;
    char want[128];
    start_server(f, SRV_OK, "leaf");
    start_proxy(f, PRX_REFUSE, "user:secret@");
    prx_set(&f->prx, &f->prx.refuse_status, 407);
    make_client(f);
    capture_start();
    struct https_request req;
    struct result res;
    init_req(&req, &res);
    int rc = https_client_send(f->client, &req);
    if (rc == 0)
        run_until(f, &res.calls);
    capture_stop(f);
    assert_int_equal(rc, 0);
    assert_int_equal(res.err, HTTPS_E_PROXY);
    assert_string_equal(https_strerror(HTTPS_E_PROXY), "the proxy did not open a tunnel");
    assert_int_equal(srv_get(&f->srv, &f->srv.accepts), 0);
    /* One warn line naming the proxy (password masked) and its status. */
    const char *l = log_line(f, "event=https_proxy_refused ");
    const char *eol = strchr(l, '\n');
    assert_non_null(eol);
    assert_non_null(strstr(f->log, "level=warn event=https_proxy_refused "));
    snprintf(want, sizeof want, " proxy=http://user:***@127.0.0.1:%d ", f->prx.port);
    const char *at = strstr(l, want);
    assert_true(at && at < eol);
    at = strstr(l, " proxy_status=407 ");
    assert_true(at && at < eol);
    at = strstr(l, "407 Go Away");
    assert_true(at && at < eol);
    assert_null(strstr(f->log, "secret"));
    assert_null(strstr(f->log, "Basic "));
}

static void test_proxy_unreachable(void **state)
{
    struct fixture *f = *state;
    const char *why = NULL;
    char url[64], want[64];
    start_server(f, SRV_OK, "leaf");
    int port = unused_port();
    snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
    assert_int_equal(proxy_parse(&f->proxy, url, &why), 0);
    make_client(f);
    capture_start();
    struct https_request req;
    struct result res;
    init_req(&req, &res);
    int rc = https_client_send(f->client, &req);
    if (rc == 0)
        run_until(f, &res.calls);
    capture_stop(f);
    assert_int_equal(rc, 0);
    assert_int_equal(res.err, HTTPS_E_CONNECT);
    const char *l = log_line(f, "level=warn event=https_connect_failed ");
    snprintf(want, sizeof want, " proxy=http://127.0.0.1:%d ", port);
    assert_non_null(strstr(l, want));
    assert_non_null(strstr(l, "cannot connect to the proxy"));
    assert_int_equal(srv_get(&f->srv, &f->srv.accepts), 0);
}

/* An IPv6 origin is bracketed in CONNECT (the test proxy tunnels to the IPv4 server anyway, whose
 * certificate is for localhost, so verification then fails as it must). */
static void test_proxy_ipv6_target(void **state)
{
    struct fixture *f = *state;
    char err[256] = "", want[128];
    start_server(f, SRV_OK, "leaf");
    start_proxy(f, PRX_TUNNEL, "");
    struct https_client_opts o = {
        .host = "::1", .port = f->port, .ca_file = pki("ca.crt"), .proxy = &f->proxy};
    assert_int_equal(https_client_new(&f->client, &f->loop, &o, err, sizeof err), 0);
    expect_error(f, HTTPS_E_VERIFY);
    snprintf(want, sizeof want, "CONNECT [::1]:%d HTTP/1.1\r\nHost: [::1]:%d\r\n\r\n", f->srv.port,
             f->srv.port);
    pthread_mutex_lock(&f->prx.mu);
    assert_string_equal(f->prx.head, want);
    pthread_mutex_unlock(&f->prx.mu);
}

/* The client copies the proxy: the caller's struct may go away after https_client_new. */
static void test_proxy_copied(void **state)
{
    struct fixture *f = *state;
    struct https_request req;
    struct result res;
    start_server(f, SRV_OK, "leaf");
    start_proxy(f, PRX_TUNNEL, "a:b@");
    make_client(f);
    proxy_free(&f->proxy);
    roundtrip_ok(f, &req, &res);
    assert_int_equal(prx_get(&f->prx, &f->prx.connects), 1);
    pthread_mutex_lock(&f->prx.mu);
    assert_non_null(strstr(f->prx.head, "\r\nProxy-Authorization: Basic YTpi\r\n"));
    pthread_mutex_unlock(&f->prx.mu);
}

static void test_proxy_cancel_and_free(void **state)
{
    struct fixture *f = *state;
    struct https_request req1, req2;
    struct result res1, res2;
    start_server(f, SRV_OK, "leaf");
    start_proxy(f, PRX_HANG, "");
    make_client(f);
    init_req(&req1, &res1);
    assert_int_equal(https_client_send(f->client, &req1), 0);
    for (int i = 0; i < 100 && prx_get(&f->prx, &f->prx.connects) == 0; i++)
        run_for(f, 10);
    assert_int_equal(prx_get(&f->prx, &f->prx.connects), 1);
    https_client_cancel(&req1); /* while waiting for the proxy's answer */
    run_for(f, 20);
    init_req(&req2, &res2);
    assert_int_equal(https_client_send(f->client, &req2), 0);
    https_client_free(f->client);
    f->client = NULL;
    assert_int_equal(res1.calls, 0);
    assert_int_equal(res2.calls, 1);
    assert_int_equal(res2.err, HTTPS_E_CANCELED);
}

static void test_proxy_invalid(void **state)
{
    struct fixture *f = *state;
    char err[256] = "";
    struct proxy p = {0};
    struct https_client_opts o = {
        .host = "localhost", .port = "443", .ca_file = pki("ca.crt"), .proxy = &p};
    assert_true(https_client_new(&f->client, &f->loop, &o, err, sizeof err) < 0);
    assert_null(f->client);
    assert_non_null(strstr(err, "proxy"));
}

/* ---- tables of cases: one cmocka case per row ---------------------------------------------- */

#define N(v) ((v) + 1) /* a counter a row expects; 0 = not checked */

/* Counters of the test server and proxy after a case; N(value) each, 0 = not checked. */
struct counts {
    int srv_accepts, srv_requests, prx_accepts, prx_connects;
    int srv_requests_not_on_valgrind; /* skip srv_requests under valgrind (too slow for the
                                         handshake) */
};

static void check_counts(struct fixture *f, const struct counts *c)
{
    if (c->srv_accepts)
        assert_int_equal(srv_get(&f->srv, &f->srv.accepts), c->srv_accepts - 1);
    if (c->srv_requests && !(c->srv_requests_not_on_valgrind && RUNNING_ON_VALGRIND))
        assert_int_equal(srv_get(&f->srv, &f->srv.requests), c->srv_requests - 1);
    if (c->prx_accepts)
        assert_int_equal(prx_get(&f->prx, &f->prx.accepts), c->prx_accepts - 1);
    if (c->prx_connects)
        assert_int_equal(prx_get(&f->prx, &f->prx.connects), c->prx_connects - 1);
}

/* Where a case's client connects: the test server (leaf: its certificate), directly or through
 * the test proxy (mode prx, userinfo "user:password@" or ""), or a port nobody listens on. */
struct route {
    enum srv_mode srv;
    const char *leaf; /* NULL: no server, the port is unused */
    int proxy;        /* through the test proxy */
    enum prx_mode prx;
    const char *userinfo;
};

/* designated, so that a row names only what it sets (clang warns on partial positional ones) */
// clang-format off
#define DIRECT(s, l)     {.srv = (s), .leaf = (l)}
#define PROXIED(s, l, p) {.srv = (s), .leaf = (l), .proxy = 1, .prx = (p)}
// clang-format on

static void start_route(struct fixture *f, const struct route *r)
{
    if (r->leaf)
        start_server(f, r->srv, r->leaf);
    else
        snprintf(f->port, sizeof f->port, "%d", unused_port());
    if (r->proxy)
        start_proxy(f, r->prx, r->userinfo ? r->userinfo : "");
}

/* ---- one request fails with an error ---- */

struct error_row {
    const char *name;
    struct route route;
    uint64_t connect_ms, request_ms; /* the client's timeouts (0: its defaults) */
    int refuse[2];                   /* PRX_REFUSE: the proxy's status for each request in turn */
    int want;                        /* the https error, for every request */
    uint64_t took_ms;                /* nonzero: the error came after about this long */
    struct counts counts;
};

static const struct error_row error_rows[] = {
    {.name = "unknown CA",
     .route = DIRECT(SRV_OK, "other"),
     .want = HTTPS_E_VERIFY,
     .counts = {.srv_requests = N(0)}},
    {.name = "wrong hostname",
     .route = DIRECT(SRV_OK, "wrong"),
     .want = HTTPS_E_VERIFY,
     .counts = {.srv_requests = N(0)}},
    {.name = "reset mid-response", .route = DIRECT(SRV_RESET, "leaf"), .want = HTTPS_E_IO},
    {.name = "too large", .route = DIRECT(SRV_LARGE, "leaf"), .want = HTTPS_E_TOO_LARGE},
    /* It got as far as sending the request (valgrind may be too slow for the handshake). */
    {.name = "request timeout",
     .route = DIRECT(SRV_HANG, "leaf"),
     .request_ms = REQUEST_TIMEOUT_MS,
     .want = HTTPS_E_TIMEOUT,
     .took_ms = REQUEST_TIMEOUT_MS,
     .counts = {.srv_requests = N(1), .srv_requests_not_on_valgrind = 1}},
    {.name = "connect timeout",
     .route = DIRECT(SRV_SILENT, "leaf"),
     .connect_ms = SHORT_TIMEOUT_MS,
     .want = HTTPS_E_TIMEOUT,
     .took_ms = SHORT_TIMEOUT_MS},
    {.name = "connection refused", .route = {.leaf = NULL}, .want = HTTPS_E_CONNECT},
    /* The origin's certificate is verified through the tunnel, against the origin's name. */
    {.name = "proxy: origin with the wrong hostname",
     .route = PROXIED(SRV_OK, "wrong", PRX_TUNNEL),
     .want = HTTPS_E_VERIFY,
     .counts = {.prx_connects = N(1), .srv_requests = N(0)}},
    {.name = "proxy: origin from an unknown CA",
     .route = PROXIED(SRV_OK, "other", PRX_TUNNEL),
     .want = HTTPS_E_VERIFY,
     .counts = {.srv_requests = N(0)}},
    /* 502 is read on the next connection. */
    {.name = "proxy refuses 403 and 502",
     .route = PROXIED(SRV_OK, "leaf", PRX_REFUSE),
     .refuse = {403, 502},
     .want = HTTPS_E_PROXY,
     .counts = {.prx_connects = N(2), .srv_accepts = N(0)}},
    {.name = "proxy closes mid-CONNECT",
     .route = PROXIED(SRV_OK, "leaf", PRX_CLOSE_MID),
     .want = HTTPS_E_IO,
     .counts = {.srv_accepts = N(0)}},
    {.name = "proxy closes silently",
     .route = PROXIED(SRV_OK, "leaf", PRX_CLOSE),
     .want = HTTPS_E_IO},
    {.name = "proxy answers garbage",
     .route = PROXIED(SRV_OK, "leaf", PRX_GARBAGE),
     .want = HTTPS_E_PROXY},
    {.name = "proxy answers a huge head",
     .route = PROXIED(SRV_OK, "leaf", PRX_HUGE),
     .want = HTTPS_E_PROXY},
    {.name = "proxy hangs",
     .route = PROXIED(SRV_OK, "leaf", PRX_HANG),
     .connect_ms = SHORT_TIMEOUT_MS,
     .want = HTTPS_E_TIMEOUT,
     .took_ms = SHORT_TIMEOUT_MS,
     .counts = {.prx_connects = N(1)}},
    /* The origin's failures come through the tunnel as they do directly. */
    {.name = "proxy: origin resets mid-response",
     .route = PROXIED(SRV_RESET, "leaf", PRX_TUNNEL),
     .want = HTTPS_E_IO},
    {.name = "proxy: origin answers too large",
     .route = PROXIED(SRV_LARGE, "leaf", PRX_TUNNEL),
     .want = HTTPS_E_TOO_LARGE},
    /* The request deadline covers the tunnel too: a hanging origin behind the proxy. */
    {.name = "proxy: request timeout",
     .route = PROXIED(SRV_HANG, "leaf", PRX_TUNNEL),
     .request_ms = REQUEST_TIMEOUT_MS,
     .want = HTTPS_E_TIMEOUT,
     .took_ms = REQUEST_TIMEOUT_MS},
};

static void t_error(void **state)
{
    struct fixture *f = *state;
    const struct error_row *r = f->row;
    start_route(f, &r->route);
    make_client_opts(f, "ca.crt", r->connect_ms, r->request_ms);
    uint64_t t0 = now_ms();
    if (!r->refuse[0]) {
        expect_error(f, r->want);
    } else {
        for (size_t i = 0; i < ARRAY_LEN(r->refuse) && r->refuse[i]; i++) {
            prx_set(&f->prx, &f->prx.refuse_status, r->refuse[i]);
            expect_error(f, r->want);
        }
    }
    uint64_t took = now_ms() - t0;
    check_counts(f, &r->counts);
    if (r->took_ms) {
        assert_true(took >= r->took_ms - 50);
        assert_true(took < r->took_ms + 1500);
    }
}

/* ---- one request succeeds ---- */

struct ok_row {
    const char *name;
    struct route route;
    int status;
    const char *body;
    const char *retry_after; /* NULL: not checked; "": none */
};

static const struct ok_row ok_rows[] = {
    {.name = "chunked",
     .route = DIRECT(SRV_CHUNKED, "leaf"),
     .status = 201,
     .body = "hello world",
     .retry_after = ""},
    {.name = "body until close",
     .route = DIRECT(SRV_EOF_BODY, "leaf"),
     .status = 200,
     .body = "until the end"},
    {.name = "proxy: body until close",
     .route = PROXIED(SRV_EOF_BODY, "leaf", PRX_TUNNEL),
     .status = 200,
     .body = "until the end"},
    {.name = "proxy: interim response before the 200",
     .route = PROXIED(SRV_CHUNKED, "leaf", PRX_INTERIM),
     .status = 201,
     .body = "hello world"},
};

static void t_ok(void **state)
{
    struct fixture *f = *state;
    const struct ok_row *r = f->row;
    struct https_request req;
    struct result res;
    start_route(f, &r->route);
    make_client(f);
    roundtrip_ok(f, &req, &res);
    assert_int_equal(res.status, r->status);
    assert_string_equal(res.body, r->body);
    if (r->retry_after && !*r->retry_after)
        assert_false(res.has_retry_after);
}

/* ---- a second request sent from inside the first one's done callback ---- */

struct chain_row {
    const char *name;
    struct route route;
    int warm_up; /* two plain round trips first (the connection is pooled in between) */
    const char *body;
    int retried; /* N(value) of the second request's retried; 0 = not checked */
    struct counts counts;
};

static const struct chain_row chain_rows[] = {
    /* The second one goes out while the connection has just gone back to the pool. */
    {.name = "connection reuse",
     .route = DIRECT(SRV_OK, "leaf"),
     .warm_up = 1,
     .body = "hello world",
     .counts = {.srv_accepts = N(1), .srv_requests = N(4)}},
    /* The server closes right after each response; the second request goes out on the pooled
     * connection before the client has seen that, fails there and is retried on a new one. */
    {.name = "retry on a stale connection",
     .route = DIRECT(SRV_DROP_AFTER, "leaf"),
     .body = "ok",
     .retried = N(1),
     .counts = {.srv_accepts = N(2)}},
    {.name = "proxy: connection reuse",
     .route = {.srv = SRV_OK, .leaf = "leaf", .proxy = 1, .prx = PRX_TUNNEL, .userinfo = "u:p@"},
     .warm_up = 1,
     .body = "hello world",
     .counts =
         {.prx_accepts = N(1), .prx_connects = N(1), .srv_accepts = N(1), .srv_requests = N(4)}},
    /* A pooled tunnel the origin closed: the request is retried on a fresh tunnel. */
    {.name = "proxy: retry on a stale tunnel",
     .route = PROXIED(SRV_DROP_AFTER, "leaf", PRX_TUNNEL),
     .body = "ok",
     .retried = N(1),
     .counts = {.prx_connects = N(2), .srv_accepts = N(2)}},
};

static void t_chain(void **state)
{
    struct fixture *f = *state;
    const struct chain_row *r = f->row;
    struct https_request req1, req2;
    struct result res1, res2;
    start_route(f, &r->route);
    make_client(f);
    if (r->warm_up) {
        roundtrip_ok(f, &req1, &res1);
        run_for(f, 20);
        roundtrip_ok(f, &req2, &res2);
    }
    init_req(&req1, &res1);
    init_req(&req2, &res2);
    res1.then_client = f->client;
    res1.then_req = &req2;
    assert_int_equal(https_client_send(f->client, &req1), 0);
    run_until(f, &res2.calls);
    assert_int_equal(res1.err, HTTPS_OK);
    assert_int_equal(res1.then_rc, 0);
    assert_int_equal(res2.err, HTTPS_OK);
    assert_string_equal(res2.body, r->body);
    if (r->retried)
        assert_int_equal(req2.retried, r->retried - 1);
    check_counts(f, &r->counts);
}

/* ---- registration ---------------------------------------------------------------------------- */

#define MAX_TESTS 64
static struct CMUnitTest tests[MAX_TESTS];
static char names[MAX_TESTS][128];
static size_t ntests;

/* One case with the fixture; row (or NULL) is what fx_setup leaves in f->row. */
static void add(const char *name, CMUnitTestFunction fn, const void *row)
{
    if (ntests >= MAX_TESTS)
        abort();
    snprintf(names[ntests], sizeof names[ntests], "%s", name);
    tests[ntests] = (struct CMUnitTest){names[ntests], fn, fx_setup, fx_teardown, (void *)row};
    ntests++;
}

#define ADD(fn) add(#fn, fn, NULL)
#define ADD_ROWS(table, rows, fn)                                                                  \
    for (size_t i_ = 0; i_ < ARRAY_LEN(rows); i_++) {                                              \
        char name_[128];                                                                           \
        snprintf(name_, sizeof name_, "%s: %s", table, (rows)[i_].name);                           \
        add(name_, fn, &(rows)[i_]);                                                               \
    }

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    alarm(PROCESS_ALARM_S);
    if (getenv("TEST_DEBUG"))
        log_min_level = LOG_DEBUG;
    ADD(test_ca_file_errors);
    ADD(test_post_content_length);
    ADD_ROWS("request ok", ok_rows, t_ok);
    ADD_ROWS("second request from done", chain_rows, t_chain);
    ADD(test_idle_closed_by_server);
    ADD(test_free_from_done);
    ADD(test_connection_close_and_resumption);
    ADD_ROWS("request fails", error_rows, t_error);
    ADD(test_cancel);
    ADD(test_free_with_pending);
    ADD(test_cancel_during_handshake_step);
    ADD(test_free_during_handshake_step);
    ADD(test_handshake_steps_take_turns);
    ADD(test_free_with_handshakes_queued);
    ADD(test_proxy_tunnel);
    ADD(test_proxy_authorization);
    ADD(test_proxy_refuses_407);
    ADD(test_proxy_unreachable);
    ADD(test_proxy_ipv6_target);
    ADD(test_proxy_copied);
    ADD(test_proxy_cancel_and_free);
    ADD(test_proxy_invalid);
    return _cmocka_run_group_tests("tests", tests, ntests, pki_setup, pki_teardown);
}

/* probe.c - `imdsd --probe 127.0.0.1:8000/readyz`: the kubelet's exec probe (or podman's health
 * check) for an image that has no shell and no curl. A short-lived process with blocking calls
 * bounded by one deadline; it never runs inside the daemon's event loop. */
#include "probe.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for events on fd until the deadline; 1 when ready, 0 on timeout, -1 on error. */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 ? -1 : r > 0;
    }
}

int probe_run(const struct config_listen *l, const char *path, char *err, size_t errlen)
{
    char addr[CONFIG_LISTEN_STR];
    config_listen_str(l, addr);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t sslen;
    struct sockaddr_in *in4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, l->host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)l->port);
        sslen = sizeof *in4;
    } else {
        inet_pton(AF_INET6, l->host, &in6->sin6_addr); /* config_parse_listen checked it */
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)l->port);
        sslen = sizeof *in6;
    }
    long long deadline = now_ms() + PROBE_TIMEOUT_MS;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "%s%s: socket: %s", addr, path, strerror(errno));
        return -1;
    }
    int status = -1;
    if (connect(fd, (struct sockaddr *)&ss, sslen) < 0 && errno != EINPROGRESS) {
        snprintf(err, errlen, "%s%s: %s", addr, path, strerror(errno));
        goto out;
    }
    int r = wait_fd(fd, POLLOUT, deadline), soerr = 0;
    socklen_t len = sizeof soerr;
    if (r > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr != 0) {
        snprintf(err, errlen, "%s%s: %s", addr, path, strerror(soerr));
        goto out;
    }
    if (r <= 0) {
        snprintf(err, errlen, "%s%s: no connection within %d ms", addr, path, PROBE_TIMEOUT_MS);
        goto out;
    }
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                     path, addr);
    if (n < 0 || (size_t)n >= sizeof req || send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
        snprintf(err, errlen, "%s%s: cannot send the request", addr, path);
        goto out;
    }
    /* the status line, then (imdsd closes after it) the body, for the reason of a failure */
    char buf[2048];
    size_t got = 0;
    while (got < sizeof buf - 1) {
        if ((r = wait_fd(fd, POLLIN, deadline)) <= 0 && memchr(buf, '\n', got))
            break; /* a status line, and no close: enough */
        if (r <= 0) {
            snprintf(err, errlen, "%s%s: no answer within %d ms", addr, path, PROBE_TIMEOUT_MS);
            goto out;
        }
        ssize_t k = recv(fd, buf + got, sizeof buf - 1 - got, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (k <= 0)
            break;
        got += (size_t)k;
    }
    buf[got] = 0;
    if (strncmp(buf, "HTTP/1.", 7) != 0 || got < 12 || buf[8] != ' ' || !memchr(buf, '\n', got)) {
        snprintf(err, errlen, "%s%s: not an HTTP answer", addr, path);
        goto out;
    }
    status = atoi(buf + 9);
    if (status < 100 || status > 599) {
        snprintf(err, errlen, "%s%s: not an HTTP answer", addr, path);
        status = -1;
    } else if (status != 200) { /* imdsd's JSON error says why: "error_description":"..." */
        static const char key[] = "\"error_description\":\"";
        const char *why = strstr(buf, key), *end = why ? strchr(why + sizeof key - 1, '"') : NULL;
        if (end)
            snprintf(err, errlen, "%s%s answered %d: %.*s", addr, path, status,
                     (int)(end - why - (sizeof key - 1)), why + sizeof key - 1);
        else
            snprintf(err, errlen, "%s%s answered %d", addr, path, status);
        for (char *q = err; *q; q++) /* the answer's bytes: never a control character on a tty */
            if ((unsigned char)*q < ' ' || *q == 0x7f)
                *q = '?';
    }
out:
    close(fd);
    return status;
}

int probe_wait(const struct config_listen *l, const char *path, char *err, size_t errlen)
{
    long long deadline = now_ms() + PROBE_WAIT_MS;
    for (;;) {
        int status = probe_run(l, path, err, errlen);
        if (status == 200 || now_ms() >= deadline)
            return status;
        struct timespec pause = {.tv_nsec = PROBE_RETRY_MS * 1000000L};
        nanosleep(&pause, NULL);
    }
}

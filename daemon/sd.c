/* sd.c - systemd, natively (see sd.h for why not libsystemd). The notification protocol: each
 * message is one datagram of "KEY=VALUE" lines sent to the AF_UNIX socket in $NOTIFY_SOCKET, a
 * path, or an abstract address written with a leading '@'. Socket activation: when LISTEN_PID is
 * this process, LISTEN_FDS sockets start at descriptor 3, named by the colon-separated
 * LISTEN_FDNAMES. The watchdog: WATCHDOG=1 at least every WATCHDOG_USEC. */
#include "sd.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

#define SD_FDNAME_MAX 255 /* systemd's limit on FileDescriptorName= */

static struct {
    struct sockaddr_un addr; /* $NOTIFY_SOCKET */
    socklen_t addr_len;      /* 0: no notifications */
    char socket_name[sizeof(struct sockaddr_un)];
    uint64_t watchdog_usec; /* 0: no watchdog */
    int nfds;               /* sockets passed */
    char fdnames[SD_MAX_LISTEN_FDS * (SD_FDNAME_MAX + 1)];
    struct sd_socket socks[SD_MAX_LISTEN_FDS];
    int send_failing; /* the last message was not sent (logged once per streak) */
    int stopping;
    int ready_sent;          /* READY=1 went out (and no reload is under way) */
    sd_status_cb *status_cb; /* set by sd_ready */
    void *status_arg;
    uv_timer_t watchdog, status;
    int timers; /* the timers are initialised and not closed yet */
    char status_sent[PATH_MAX + 200];
} sd;

static int parse_u64(const char *s, uint64_t *out)
{
    if (!s || *s < '0' || *s > '9')
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

/* One datagram; never blocks the loop (a notification systemd cannot take now is dropped and
 * logged: a lost WATCHDOG=1 is sent again half a period later). */
static void notify(const char *msg)
{
    if (!sd.addr_len)
        return;
    ssize_t n = -1;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        n = sendto(fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT,
                   (const struct sockaddr *)&sd.addr, sd.addr_len);
        int e = errno;
        close(fd);
        errno = e;
    }
    if (n < 0 && !sd.send_failing) {
        char q[160];
        log_warn("sd_notify_failed", "socket=%s error=\"%s\"",
                 log_quote(q, sizeof q, sd.socket_name, strlen(sd.socket_name)), strerror(errno));
    }
    sd.send_failing = n < 0;
}

static void set_notify_socket(const char *v)
{
    size_t len = strlen(v);
    if ((v[0] != '/' && v[0] != '@') || len >= sizeof sd.addr.sun_path || len < 2) {
        char q[160];
        log_warn("sd_notify_unsupported",
                 "NOTIFY_SOCKET=%s reason=\"not a path or @abstract name\"",
                 log_quote(q, sizeof q, v, len));
        return;
    }
    memset(&sd.addr, 0, sizeof sd.addr);
    sd.addr.sun_family = AF_UNIX;
    memcpy(sd.addr.sun_path, v, len);
    if (v[0] == '@')
        sd.addr.sun_path[0] = 0; /* abstract: the length below counts the name's bytes only */
    sd.addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + (v[0] == '/'));
    memcpy(sd.socket_name, v, len + 1);
}

static int listen_env(char *err, size_t errlen)
{
    const char *pid_s = getenv("LISTEN_PID"), *fds_s = getenv("LISTEN_FDS");
    const char *names_s = getenv("LISTEN_FDNAMES");
    uint64_t pid, n;
    if (!pid_s || !*pid_s)
        return 0;
    if (parse_u64(pid_s, &pid) < 0) {
        snprintf(err, errlen, "LISTEN_PID: '%s' is not a process id", pid_s);
        return -1;
    }
    if (pid != (uint64_t)getpid())
        return 0; /* meant for another process */
    if (parse_u64(fds_s, &n) < 0) {
        snprintf(err, errlen, "LISTEN_FDS: '%s' is not a number", fds_s ? fds_s : "");
        return -1;
    }
    if (n > SD_MAX_LISTEN_FDS) {
        snprintf(err, errlen, "LISTEN_FDS: %" PRIu64 " sockets, at most %d", n, SD_MAX_LISTEN_FDS);
        return -1;
    }
    for (int i = 0; i < (int)n; i++) {
        if (fcntl(SD_LISTEN_FDS_START + i, F_SETFD, FD_CLOEXEC) < 0) {
            snprintf(err, errlen, "LISTEN_FDS: descriptor %d: %s", SD_LISTEN_FDS_START + i,
                     strerror(errno));
            return -1;
        }
        sd.socks[i].fd = SD_LISTEN_FDS_START + i;
        sd.socks[i].name = "";
    }
    if (names_s && *names_s && n > 0) {
        if (strlen(names_s) >= sizeof sd.fdnames) {
            snprintf(err, errlen, "LISTEN_FDNAMES: longer than %zu bytes", sizeof sd.fdnames - 1);
            return -1;
        }
        strcpy(sd.fdnames, names_s);
        int k = 0;
        for (char *p = sd.fdnames, *colon;; p = colon + 1) {
            colon = strchr(p, ':');
            if (colon)
                *colon = 0;
            if (k < (int)n)
                sd.socks[k].name = p;
            k++;
            if (!colon)
                break;
        }
        if (k != (int)n) {
            snprintf(err, errlen, "LISTEN_FDNAMES: '%s' names %d sockets, LISTEN_FDS=%" PRIu64,
                     names_s, k, n);
            return -1;
        }
    }
    sd.nfds = (int)n;
    return sd.nfds;
}

int sd_init(char *err, size_t errlen)
{
    static const char *const vars[] = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                       "LISTEN_PID",    "LISTEN_FDS",    "LISTEN_FDNAMES"};
    memset(&sd, 0, sizeof sd);
    const char *v = getenv("NOTIFY_SOCKET");
    if (v && *v)
        set_notify_socket(v);
    const char *usec = getenv("WATCHDOG_USEC"), *wpid = getenv("WATCHDOG_PID");
    uint64_t u, pid;
    if (usec && *usec) {
        if (parse_u64(usec, &u) < 0 || u == 0)
            log_warn("sd_watchdog_ignored", "reason=\"WATCHDOG_USEC is not a positive number\"");
        else if (!wpid || !*wpid || (parse_u64(wpid, &pid) == 0 && pid == (uint64_t)getpid()))
            sd.watchdog_usec = u;
    }
    int rc = listen_env(err, errlen);
    /* as sd_notify's unset_environment does: children never see them (all parsed above) */
    for (size_t i = 0; i < ARRAY_LEN(vars); i++)
        unsetenv(vars[i]);
    return rc;
}

int sd_listen(const struct sd_socket **out)
{
    *out = sd.socks;
    return sd.nfds;
}

/* The caller's status text as a STATUS= line (a newline would start another field); returns
 * whether the caller is ready. */
static int status_line(char *out, size_t n)
{
    static const char key[] = "STATUS=";
    snprintf(out, n, "%s", key);
    int ready = sd.status_cb(out + sizeof key - 1, n - (sizeof key - 1), sd.status_arg);
    for (char *p = out; *p; p++)
        if (*p == '\n')
            *p = '?';
    return ready;
}

static void ready(void);

static void on_status(uv_timer_t *t)
{
    (void)t;
    char line[sizeof sd.status_sent];
    if (sd.stopping)
        return;
    int is_ready = status_line(line, sizeof line);
    if (!sd.ready_sent && is_ready) {
        ready();
        return;
    }
    if (strcmp(line, sd.status_sent) != 0) {
        strcpy(sd.status_sent, line);
        notify(line);
    }
}

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    notify("WATCHDOG=1");
}

/* READY=1 and the current status in one message, once the caller is ready; until then the status
 * alone, asked again every SD_READY_CHECK_MS */
static void ready(void)
{
    char msg[sizeof sd.status_sent + 16];
    int is_ready = status_line(sd.status_sent, sizeof sd.status_sent);
    snprintf(msg, sizeof msg, "%s%s", is_ready ? "READY=1\n" : "", sd.status_sent);
    notify(msg);
    sd.ready_sent = is_ready;
    if (sd.timers) {
        uint64_t every = is_ready ? SD_STATUS_CHECK_MS : SD_READY_CHECK_MS;
        uv_timer_start(&sd.status, on_status, every, every);
    }
}

void sd_ready(uv_loop_t *loop, sd_status_cb *status, void *arg)
{
    sd.status_cb = status;
    sd.status_arg = arg;
    if (!sd.addr_len)
        return;
    char q[160];
    uint64_t period_ms = sd.watchdog_usec / 2000 ? sd.watchdog_usec / 2000 : 1;
    log_info("sd_notify", "socket=%s watchdog_ms=%" PRIu64,
             log_quote(q, sizeof q, sd.socket_name, strlen(sd.socket_name)),
             sd.watchdog_usec ? period_ms : 0);
    uv_timer_init(loop, &sd.status);
    uv_timer_init(loop, &sd.watchdog);
    uv_unref((uv_handle_t *)&sd.status);
    uv_unref((uv_handle_t *)&sd.watchdog);
    sd.timers = 1;
    ready();
    if (sd.watchdog_usec)
        uv_timer_start(&sd.watchdog, on_watchdog, period_ms, period_ms);
}

void sd_reloading(void)
{
    if (sd.stopping)
        return;
    struct timespec ts;
    char msg[96];
    clock_gettime(CLOCK_MONOTONIC, &ts);
    snprintf(msg, sizeof msg, "RELOADING=1\nMONOTONIC_USEC=%" PRIu64 "\nSTATUS=reloading",
             (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u);
    notify(msg);
    sd.ready_sent = 0; /* systemd waits for READY=1 again */
}

void sd_reloaded(void)
{
    if (!sd.stopping && sd.status_cb)
        ready();
}

void sd_stopping(void)
{
    if (sd.stopping)
        return;
    sd.stopping = 1;
    notify("STOPPING=1\nSTATUS=stopping");
}

void sd_close(void)
{
    if (!sd.timers)
        return;
    sd.timers = 0;
    uv_close((uv_handle_t *)&sd.status, NULL);
    uv_close((uv_handle_t *)&sd.watchdog, NULL);
}

/* loadgen.c - HTTP/1.1 GET load at a fixed request rate (open loop), for make bench.
 *
 *   loadgen --port N --path P --rate R --seconds S [--connections C] [--close] [--header H]...
 *           [--dump FILE]
 *
 * wrk keeps every connection busy: each waits for its response before sending the next request,
 * so the client's own loop sets the pace and the latencies it reports are an artefact of how the
 * two event loops interleave (coordinated omission). This sends request k at t0 + k/R whatever
 * happened before, on a free connection (at most C in flight), and measures each latency from
 * that scheduled time, so a server that stalls is charged for every request it delayed. wrk2
 * does the same but is not packaged in Debian. Both latencies are reported: from the scheduled
 * time ("latency") and from the moment the request was written ("service").
 *
 * Keep-alive: C connections opened up front and reused. --close: a new connection per request
 * (sends "Connection: close"; the connect is part of the latency). Prints one JSON line.
 *
 * --dump FILE also writes one line per answered request: its scheduled time (CLOCK_MONOTONIC, ns,
 * the clock Python's time.monotonic_ns() reads), its latency and its service time (ns), so that a
 * caller can pick the requests that were due while something else happened. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_FREE, ST_IDLE, ST_CONNECTING, ST_WAITING };

struct conn {
    int fd;
    int state;
    uint64_t scheduled, sent; /* ns */
    size_t have;
    char buf[8192];
};

static struct {
    int port, rate, seconds, nconns, close_mode;
    const char *path, *dump;
    char req[2048];
    size_t req_len;
} cfg = {.nconns = 64};

static struct {
    uint64_t completed, ok, non200, errors, timeouts, late;
    uint64_t *lat, *svc, *sched; /* ns, one per completed request */
} st;

static struct conn *conns;
static int *free_stack, nfree, epfd;
static struct sockaddr_in addr;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void release(int i)
{
    struct conn *c = &conns[i];
    if (c->state == ST_FREE || c->state == ST_IDLE) {
        free_stack[nfree++] = i;
        return;
    }
    abort();
}

static void drop(int i)
{
    struct conn *c = &conns[i];
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = ST_FREE;
    release(i);
}

static int open_conn(struct conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(c->fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS)
        return -1;
    struct epoll_event ev = {.events = EPOLLIN | (r < 0 ? EPOLLOUT : 0u),
                             .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl");
    return r < 0 ? 1 : 0;
}

static int send_request(struct conn *c)
{
    c->sent = now_ns();
    c->have = 0;
    c->state = ST_WAITING;
    return write(c->fd, cfg.req, cfg.req_len) == (ssize_t)cfg.req_len ? 0 : -1;
}

/* Starts the request scheduled at `when` on free connection i. */
static void start(int i, uint64_t when)
{
    struct conn *c = &conns[i];
    c->scheduled = when;
    if (c->fd < 0) {
        int r = open_conn(c);
        if (r < 0) {
            st.errors++;
            drop(i);
            return;
        }
        if (r == 1) {
            c->state = ST_CONNECTING;
            return;
        }
    }
    if (send_request(c) < 0) {
        st.errors++;
        drop(i);
    }
}

/* 1: a whole response is in c->buf; 0: not yet; -1: malformed. */
static int response_done(struct conn *c, int *status)
{
    char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
    if (!end)
        return c->have >= sizeof c->buf ? -1 : 0;
    if (c->have < 12 || memcmp(c->buf, "HTTP/1.", 7) != 0)
        return -1;
    *status = atoi(c->buf + 9);
    size_t head = (size_t)(end - c->buf) + 4, len = 0;
    for (char *p = c->buf; p < end; p++) {
        if (*p == '\n' && strncasecmp(p + 1, "content-length:", 15) == 0) {
            len = strtoul(p + 16, NULL, 10);
            break;
        }
    }
    if (head + len > sizeof c->buf)
        return -1;
    return c->have >= head + len ? 1 : 0;
}

static void on_event(int i, uint32_t events)
{
    struct conn *c = &conns[i];
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (err || epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0 || send_request(c) < 0) {
            st.errors++;
            drop(i);
        }
        return;
    }
    if (c->state != ST_WAITING) { /* the server closed an idle keep-alive connection */
        if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
            c->state = ST_FREE;
            close(c->fd);
            c->fd = -1;
        }
        return;
    }
    ssize_t n = read(c->fd, c->buf + c->have, sizeof c->buf - c->have);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    int status = 0, r = n > 0 ? (c->have += (size_t)n, response_done(c, &status)) : -1;
    if (r == 0)
        return;
    if (r < 0) {
        st.errors++;
        drop(i);
        return;
    }
    uint64_t t = now_ns();
    st.lat[st.completed] = t - c->scheduled;
    st.svc[st.completed] = t - c->sent;
    st.sched[st.completed] = c->scheduled;
    st.completed++;
    if (status == 200)
        st.ok++;
    else
        st.non200++;
    if (cfg.close_mode) {
        drop(i);
    } else {
        c->state = ST_IDLE;
        release(i);
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(const uint64_t *v, uint64_t n, double q)
{
    if (!n)
        return 0;
    uint64_t k = (uint64_t)(q / 100.0 * (double)(n - 1) + 0.5);
    return (double)v[k] / 1000.0;
}

static void print_dist(const char *name, uint64_t *v, uint64_t n)
{
    qsort(v, n, sizeof *v, cmp_u64);
    printf("\"%s\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f}", name,
           pct_us(v, n, 50), pct_us(v, n, 90), pct_us(v, n, 99), pct_us(v, n, 99.9),
           n ? (double)v[n - 1] / 1000.0 : 0.0);
}

static void usage(void)
{
    fprintf(stderr, "usage: loadgen --port N --path P --rate R --seconds S [--connections C] "
                    "[--close] [--header H]... [--dump FILE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"port", required_argument, 0, 'p'},
                                         {"path", required_argument, 0, 'u'},
                                         {"rate", required_argument, 0, 'r'},
                                         {"seconds", required_argument, 0, 's'},
                                         {"connections", required_argument, 0, 'c'},
                                         {"close", no_argument, 0, 'x'},
                                         {"header", required_argument, 0, 'H'},
                                         {"dump", required_argument, 0, 'd'},
                                         {0, 0, 0, 0}};
    char headers[1024] = "";
    size_t hlen = 0;
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 'p':
            cfg.port = atoi(optarg);
            break;
        case 'u':
            cfg.path = optarg;
            break;
        case 'r':
            cfg.rate = atoi(optarg);
            break;
        case 's':
            cfg.seconds = atoi(optarg);
            break;
        case 'c':
            cfg.nconns = atoi(optarg);
            break;
        case 'x':
            cfg.close_mode = 1;
            break;
        case 'd':
            cfg.dump = optarg;
            break;
        case 'H': {
            int n = snprintf(headers + hlen, sizeof headers - hlen, "%s\r\n", optarg);
            if (n < 0 || (size_t)n >= sizeof headers - hlen)
                usage();
            hlen += (size_t)n;
            break;
        }
        default:
            usage();
        }
    }
    if (cfg.port <= 0 || !cfg.path || cfg.rate <= 0 || cfg.seconds <= 0 || cfg.nconns <= 0)
        usage();
    int n = snprintf(cfg.req, sizeof cfg.req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s%s\r\n",
                     cfg.path, cfg.port, headers, cfg.close_mode ? "Connection: close\r\n" : "");
    if (n < 0 || (size_t)n >= sizeof cfg.req)
        usage();
    cfg.req_len = (size_t)n;
    addr = (struct sockaddr_in){.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)cfg.port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};

    uint64_t total = (uint64_t)cfg.rate * (uint64_t)cfg.seconds;
    conns = calloc((size_t)cfg.nconns, sizeof *conns);
    free_stack = calloc((size_t)cfg.nconns, sizeof *free_stack);
    st.lat = calloc(total, sizeof *st.lat);
    st.svc = calloc(total, sizeof *st.svc);
    st.sched = calloc(total, sizeof *st.sched);
    if (!conns || !free_stack || !st.lat || !st.svc || !st.sched)
        die("calloc");
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake at the scheduled time, not up to 50 us later */
    if ((epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
        die("epoll_create1");
    for (int i = cfg.nconns - 1; i >= 0; i--) {
        conns[i].fd = -1;
        if (!cfg.close_mode) { /* connect up front, blocking, so that no latency includes it */
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
            if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
                die("connect");
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
                die("epoll_ctl");
            conns[i].fd = fd;
            conns[i].state = ST_IDLE;
        }
        free_stack[nfree++] = i;
    }

    const double gap = 1e9 / cfg.rate;
    uint64_t t0 = now_ns() + 1000000, next = 0, drain_until = 0;
    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = now_ns();
        while (next < total && nfree > 0) {
            uint64_t when = t0 + (uint64_t)((double)next * gap);
            if (when > now)
                break;
            if (now - when > 1000000)
                st.late++; /* sent more than 1 ms after its time: no connection was free */
            next++;
            start(free_stack[--nfree], when);
        }
        if (next == total && !drain_until)
            drain_until = now + 2000000000u; /* 2 s for the last answers */
        if (drain_until && (nfree == cfg.nconns || now >= drain_until))
            break;
        struct timespec ts = {0, 100000000}; /* no request due: wake for the drain check */
        if (next < total && nfree > 0) {
            uint64_t when = t0 + (uint64_t)((double)next * gap), d = when > now ? when - now : 0;
            ts = (struct timespec){(time_t)(d / 1000000000u), (long)(d % 1000000000u)};
        }
        int k = epoll_pwait2(epfd, evs, 256, &ts, NULL);
        if (k < 0 && errno != EINTR)
            die("epoll_pwait2");
        for (int j = 0; j < k; j++)
            on_event((int)evs[j].data.u32, evs[j].events);
    }
    for (int i = 0; i < cfg.nconns; i++)
        if (conns[i].state == ST_WAITING || conns[i].state == ST_CONNECTING)
            st.timeouts++;
    double secs = (double)(now_ns() - t0) / 1e9;
    if (cfg.dump) { /* before print_dist sorts the latencies */
        FILE *f = fopen(cfg.dump, "w");
        if (!f)
            die(cfg.dump);
        for (uint64_t k = 0; k < st.completed; k++)
            fprintf(f, "%llu %llu %llu\n", (unsigned long long)st.sched[k],
                    (unsigned long long)st.lat[k], (unsigned long long)st.svc[k]);
        if (fclose(f) != 0)
            die(cfg.dump);
    }
    printf(
        "LOADGEN {\"rate\":%d,\"seconds\":%d,\"connections\":%d,\"close\":%s,\"scheduled\":%llu,"
        "\"completed\":%llu,\"status_200\":%llu,\"non200\":%llu,\"errors\":%llu,\"timeouts\":%llu,"
        "\"late\":%llu,\"achieved_rps\":%.1f,",
        cfg.rate, cfg.seconds, cfg.nconns, cfg.close_mode ? "true" : "false",
        (unsigned long long)total, (unsigned long long)st.completed, (unsigned long long)st.ok,
        (unsigned long long)st.non200, (unsigned long long)st.errors,
        (unsigned long long)st.timeouts, (unsigned long long)st.late,
        secs > 0 ? (double)st.completed / secs : 0.0);
    print_dist("latency_us", st.lat, st.completed);
    putchar(',');
    print_dist("service_us", st.svc, st.completed);
    printf("}\n");
    return st.completed == total && st.errors == 0 && st.timeouts == 0 ? 0 : 1;
}

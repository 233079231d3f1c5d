/* test_arc.c - the Azure Arc key files on a real loop and a real directory, with both clocks
 * under the test's control (--wrap=now_ms,--wrap=now_wall_ms): a key is good once, for
 * ARC_KEY_TTL_MS of the monotonic clock whatever the wall clock does, in constant-time comparison
 * with every live key; files are 0640 and removed after use, expiry and arc_free; at most
 * ARC_MAX_KEYS are outstanding and ARC_MAX_PER_S made a second, and a flood beyond is refused
 * without touching a live key; one user holds ARC_MAX_KEYS_PER_UID of them at most, that user
 * being the owner of the peer's socket on real loopback connections. */
#include "unit.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "arc.h"
#include "metrics.h"

static uint64_t fake_now = 5000000; /* the monotonic clock: counts from boot */
static int64_t fake_wall = 1700000000000;
uint64_t __wrap_now_ms(void);
uint64_t __wrap_now_ms(void)
{
    return fake_now;
}
int64_t __wrap_now_wall_ms(void);
int64_t __wrap_now_wall_ms(void)
{
    return fake_wall;
}

static int no_netlink; /* socket(AF_NETLINK, ...) fails, as systemd's RestrictAddressFamilies= */
int __real_socket(int domain, int type, int protocol);
int __wrap_socket(int domain, int type, int protocol);
int __wrap_socket(int domain, int type, int protocol)
{
    if (no_netlink && domain == AF_NETLINK) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    return __real_socket(domain, type, protocol);
}

struct got {
    char path[4096];
    int calls;
};

static void on_key(void *arg, const char *path)
{
    struct got *g = arg;
    g->calls++;
    snprintf(g->path, sizeof g->path, "%s", path ? path : "");
}

static int files_in(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        n += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return n;
}

static char *read_key(const char *path)
{
    static char key[ARC_KEY_HEX + 8];
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = fread(key, 1, sizeof key - 1, f);
    fclose(f);
    key[n] = 0;
    return key;
}

static int verify(struct arc *a, const char *key)
{
    char auth[ARC_KEY_HEX + 16];
    snprintf(auth, sizeof auth, "Basic %s", key);
    return arc_verify(a, auth, strlen(auth));
}

static void challenge(uv_loop_t *loop, struct arc *a, struct got *g)
{
    int before = g->calls, refused = -1;
    assert_non_null(arc_challenge(a, getuid(), on_key, g, &refused));
    assert_int_equal(refused, 0);
    while (g->calls == before)
        uv_run(loop, UV_RUN_ONCE);
    assert_true(g->path[0] != 0);
}

/* A key directory in /tmp, a loop, and an arc on them (no --arc-key-group). */
struct fixture {
    char dir[32];
    uv_loop_t loop;
    struct arc *a;
};

static void open_arc(struct fixture *f)
{
    snprintf(f->dir, sizeof f->dir, "/tmp/imdsd-arc-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    uv_loop_init(&f->loop);
    char err[256];
    f->a = arc_new(&f->loop, f->dir, (gid_t)-1, err, sizeof err);
    assert_non_null(f->a);
}

/* arc_free removes every file the arc made; then the loop and the directory go. */
static void close_arc(struct fixture *f)
{
    arc_free(f->a);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(files_in(f->dir), 0);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    rmdir(f->dir);
}

static void t_keys(void **state)
{
    (void)state;
    struct fixture f;
    open_arc(&f);
    struct arc *a = f.a;
    uv_loop_t *loop = &f.loop;
    const char *dir = f.dir;
    struct got g = {{0}, 0};

    /* a file 0640 named *.key in the directory, holding 64 hex digits */
    challenge(loop, a, &g);
    struct stat st;
    assert_int_equal(stat(g.path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    assert_int_equal(strncmp(g.path, dir, strlen(dir)), 0);
    assert_string_equal(g.path + strlen(g.path) - 4, ".key");
    char key[ARC_KEY_HEX + 1];
    snprintf(key, sizeof key, "%s", read_key(g.path));
    assert_int_equal(strlen(key), ARC_KEY_HEX);
    assert_int_equal(strspn(key, "0123456789abcdef"), ARC_KEY_HEX);

    /* wrong answers: another key, a prefix, no "Basic ", empty */
    char wrong[ARC_KEY_HEX + 1];
    memcpy(wrong, key, sizeof wrong);
    wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
    assert_false(verify(a, wrong));
    char prefix[ARC_KEY_HEX];
    memcpy(prefix, key, ARC_KEY_HEX - 1);
    prefix[ARC_KEY_HEX - 1] = 0;
    assert_false(verify(a, prefix));
    assert_false(arc_verify(a, key, ARC_KEY_HEX));
    assert_false(arc_verify(a, "Basic ", 6));

    /* right once ("basic" in any case), then never again; the file goes */
    char auth[ARC_KEY_HEX + 16];
    snprintf(auth, sizeof auth, "bAsIc %s", key);
    assert_true(arc_verify(a, auth, strlen(auth)));
    assert_false(verify(a, key));
    for (int i = 0; i < 100 && access(g.path, F_OK) == 0; i++)
        uv_run(loop, UV_RUN_ONCE); /* the unlink runs on the thread pool */
    assert_int_equal(access(g.path, F_OK), -1);

    /* expiry: good until ARC_KEY_TTL_MS, not after */
    challenge(loop, a, &g);
    snprintf(key, sizeof key, "%s", read_key(g.path));
    fake_now += ARC_KEY_TTL_MS - 1;
    char path2[4096];
    struct got g2 = {{0}, 0};
    challenge(loop, a, &g2);
    snprintf(path2, sizeof path2, "%s", g2.path);
    char key2[ARC_KEY_HEX + 1];
    snprintf(key2, sizeof key2, "%s", read_key(path2));
    fake_now += 1;
    assert_false(verify(a, key)); /* expired */
    assert_true(verify(a, key2)); /* younger: still good */

    /* (at most ARC_MAX_KEYS outstanding: t_flood) */
    /* arc_free removes every file */
    close_arc(&f);
}

/* One challenge of uid's: 1 when admitted (the key is then made, into g), 0 when refused. */
static int try_challenge(uv_loop_t *loop, struct arc *a, uid_t uid, struct got *g)
{
    int before = g->calls, refused = -1;
    struct arc_challenge *ch = arc_challenge(a, uid, on_key, g, &refused);
    assert_true(refused == 0 || refused == 1);
    assert_int_equal(ch == NULL, refused); /* a refusal has no callback */
    while (ch && g->calls == before)
        uv_run(loop, UV_RUN_ONCE);
    return ch != NULL;
}

static int key_files(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        n += strlen(e->d_name) > 4 && strcmp(e->d_name + strlen(e->d_name) - 4, ".key") == 0;
    if (d)
        closedir(d);
    return n;
}

/* A flood of challenges (from more users than ARC_MAX_KEYS / ARC_MAX_KEYS_PER_UID, whose shares
 * do not bind) fills the slots and is then refused: it never drops the key a slower client was
 * given first, which stays good for its whole lifetime. Past ARC_MAX_PER_S a second, challenges
 * are refused too; keys being made hold their slots; a key used or expired frees its slot; every
 * refusal is counted. */
#define FLOODERS   16 /* users: 16 shares of 32 are twice ARC_MAX_KEYS */
#define FLOODER(n) ((uid_t)(2000 + (unsigned)(n) % FLOODERS))
static void t_flood(void **state)
{
    (void)state;
    struct fixture f;
    open_arc(&f);
    struct arc *a = f.a;
    uv_loop_t *loop = &f.loop;
    const char *dir = f.dir;
    uint64_t refused0 = metrics.arc_challenges_refused;
    fake_now += 1000; /* a new second */
    struct got victim = {{0}, 0}, g = {{0}, 0};
    challenge(loop, a, &victim);
    char vkey[ARC_KEY_HEX + 1];
    snprintf(vkey, sizeof vkey, "%s", read_key(victim.path));

    /* ARC_MAX_PER_S a second: the victim's and 99 more; then refusals until the next second */
    int made = 1;
    while (made < 2 * ARC_MAX_PER_S && try_challenge(loop, a, FLOODER(made), &g))
        made++;
    assert_int_equal(made, ARC_MAX_PER_S);
    assert_false(try_challenge(loop, a, FLOODER(made), &g));
    assert_int_equal(metrics.arc_challenges_refused - refused0, 2);
    /* the next seconds until every slot is live, then the flood is refused, however long */
    for (int s = 0; made < ARC_MAX_KEYS && s < ARC_MAX_KEYS; s++) {
        fake_now += 1000;
        while (made < ARC_MAX_KEYS && try_challenge(loop, a, FLOODER(made), &g))
            made++;
    }
    uint64_t before = metrics.arc_challenges_refused;
    int flood = 0;
    for (int s = 0; s < 5; s++, fake_now += 1000)
        for (int i = 0; i < 2000; i++)
            flood += try_challenge(loop, a, FLOODER(i), &g);
    assert_int_equal(key_files(dir), ARC_MAX_KEYS);
    assert_true(verify(a, vkey)); /* 5 s and 10,000 challenges later */
    assert_int_equal(flood, 0);
    assert_int_equal(metrics.arc_challenges_refused - before, 5 * 2000);
    assert_true(try_challenge(loop, a, FLOODER(0), &g)); /* its slot is free again */
    assert_false(try_challenge(loop, a, FLOODER(1), &g));

    /* keys expire: their slots are free, the files go */
    fake_now += ARC_KEY_TTL_MS;
    assert_true(try_challenge(loop, a, FLOODER(0), &g));
    for (int i = 0; i < 1000 && key_files(dir) > 1; i++)
        uv_run(loop, UV_RUN_ONCE);
    assert_int_equal(key_files(dir), 1);

    /* keys being made hold their slots: a burst before the loop runs is bounded alike */
    fake_now += ARC_KEY_TTL_MS; /* the last one expires too */
    struct got burst = {{0}, 0};
    int admitted = 0, refused = 0;
    for (int s = 0; s < 4; s++, fake_now += 1000)
        for (int i = 0; i < ARC_MAX_PER_S; i++)
            admitted += arc_challenge(a, FLOODER(i), on_key, &burst, &refused) != NULL;
    assert_int_equal(admitted, ARC_MAX_KEYS);
    while (burst.calls < ARC_MAX_KEYS)
        uv_run(loop, UV_RUN_ONCE);
    assert_int_equal(key_files(dir), ARC_MAX_KEYS);

    close_arc(&f);
}

/* One user's flood holds ARC_MAX_KEYS_PER_UID keys at most, live or being made: past it that
 * user is refused (counted as per_user) while another user, and the peers of unknown users (one
 * shared quota), still get keys at once. A key used or expired gives its user a slot back; eight
 * users at their shares still meet the global bound, where a ninth is refused as max_keys. */
static void t_per_user(void **state)
{
    (void)state;
    struct fixture f;
    open_arc(&f);
    struct arc *a = f.a;
    uv_loop_t *loop = &f.loop;
    const char *dir = f.dir;
    const uid_t flooder = 1001, victim = 1002;
    uint64_t refused0 = metrics.arc_challenges_refused;
    uint64_t per0 = metrics.arc_challenges_refused_per_user;
    fake_now += 1000; /* a new second */

    /* a burst before the loop runs: the keys being made count against the share */
    struct got fg = {{0}, 0}, g = {{0}, 0};
    int admitted = 0, refused = -1;
    for (int i = 0; i < 2 * ARC_MAX_KEYS_PER_UID; i++)
        admitted += arc_challenge(a, flooder, on_key, &fg, &refused) != NULL;
    assert_int_equal(admitted, ARC_MAX_KEYS_PER_UID);
    assert_int_equal(refused, 1);
    while (fg.calls < ARC_MAX_KEYS_PER_UID)
        uv_run(loop, UV_RUN_ONCE);
    /* the flood goes on, seconds long: refused, all of it, as per_user */
    for (int s = 0; s < 3; s++) {
        fake_now += 1000;
        for (int i = 0; i < 1000; i++)
            assert_false(try_challenge(loop, a, flooder, &g));
    }
    assert_int_equal(metrics.arc_challenges_refused_per_user - per0, ARC_MAX_KEYS_PER_UID + 3000);
    assert_int_equal(metrics.arc_challenges_refused - refused0, ARC_MAX_KEYS_PER_UID + 3000);
    /* meanwhile another user gets its key, and it is good */
    struct got v = {{0}, 0};
    assert_true(try_challenge(loop, a, victim, &v));
    assert_true(verify(a, read_key(v.path)));
    /* the unknown peers: one quota, theirs, not the flooder's */
    for (int i = 0; i < ARC_MAX_KEYS_PER_UID; i++)
        assert_true(try_challenge(loop, a, ARC_UID_UNKNOWN, &g));
    assert_false(try_challenge(loop, a, ARC_UID_UNKNOWN, &g));
    assert_true(try_challenge(loop, a, victim, &v));

    /* a key the flooder uses gives it a slot back, one */
    assert_true(verify(a, read_key(fg.path)));
    assert_true(try_challenge(loop, a, flooder, &fg));
    assert_false(try_challenge(loop, a, flooder, &fg));
    /* its keys expire: its whole share again */
    fake_now += ARC_KEY_TTL_MS;
    for (int i = 0; i < ARC_MAX_KEYS_PER_UID; i++)
        assert_true(try_challenge(loop, a, flooder, &fg));
    assert_false(try_challenge(loop, a, flooder, &fg));

    /* ARC_MAX_KEYS / ARC_MAX_KEYS_PER_UID users at their shares fill every slot: the global bound
     * holds, and a further user is refused as max_keys, not per_user */
    fake_now += ARC_KEY_TTL_MS;
    for (int n = 0; n < ARC_MAX_KEYS; n++) {
        if (n % ARC_MAX_PER_S == 0)
            fake_now += 1000;
        assert_true(try_challenge(loop, a, (uid_t)(3000 + n / ARC_MAX_KEYS_PER_UID), &g));
    }
    uint64_t per1 = metrics.arc_challenges_refused_per_user;
    uint64_t refused1 = metrics.arc_challenges_refused;
    assert_false(try_challenge(loop, a, 4000, &g));
    assert_false(try_challenge(loop, a, ARC_UID_UNKNOWN, &g));
    assert_int_equal(metrics.arc_challenges_refused - refused1, 2);
    assert_int_equal(metrics.arc_challenges_refused_per_user, per1);
    assert_int_equal(key_files(dir), ARC_MAX_KEYS);

    close_arc(&f);
}

/* A listening TCP socket on the loopback address of family (port chosen by the kernel), or -1
 * when the family is not there (no IPv6). */
static int listen_lo(int family)
{
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t len;
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof *in;
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_addr = in6addr_loopback;
        len = sizeof *in6;
    }
    if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, 8) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A client socket connected to the listener lfd. */
static int connect_to(int lfd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&ss, &len), 0);
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&ss, len), 0);
    return fd;
}

/* arc_peer_uid on real loopback connections, IPv4, IPv6 and IPv4 to a dual-stack listener: the
 * owner of the client's socket (this process's; a child's that switched to uid 65534, when run as
 * root), the same after the client half-closed; unknown once the client closed its socket
 * (TIME_WAIT would say uid 0), and for what is not a connected TCP socket. Prints what one query
 * costs. */
static void t_peer_uid(void **state)
{
    (void)state;
    struct fixture fx;
    open_arc(&fx);
    struct arc *a = fx.a;
    static const int families[] = {AF_INET, AF_INET6};
    for (int f = 0; f < 2; f++) {
        int lfd = listen_lo(families[f]);
        if (lfd < 0) {
            assert_int_equal(families[f], AF_INET6); /* a host without IPv6 */
            continue;
        }
        int cfd = connect_to(lfd);
        int sfd = accept(lfd, NULL, NULL);
        assert_true(sfd >= 0);
        assert_int_equal(arc_peer_uid(a, sfd), geteuid());
        /* the connection the other way round: our accepted socket's owner is us too */
        assert_int_equal(arc_peer_uid(a, cfd), geteuid());
        if (families[f] == AF_INET) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (int i = 0; i < 10000; i++)
                assert_int_equal(arc_peer_uid(a, sfd), geteuid());
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("arc_peer_uid: %.2f us a query (getsockname, getpeername, send, recv)\n",
                   ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) /
                       10000 / 1000);
        }
        /* half-closed (the client still reads): still its owner's */
        assert_int_equal(shutdown(cfd, SHUT_WR), 0);
        char c;
        assert_int_equal(read(sfd, &c, 1), 0); /* the FIN is in, and acknowledged */
        assert_int_equal(arc_peer_uid(a, sfd), geteuid());
        /* closed by its process: TIME_WAIT (FIN_WAIT2), which the kernel reports as uid 0 */
        close(cfd);
        assert_int_equal(arc_peer_uid(a, sfd), ARC_UID_UNKNOWN);
        close(sfd);

        if (geteuid() == 0) { /* a client of another user's */
            int go[2];
            assert_int_equal(pipe(go), 0);
            pid_t pid = fork();
            assert_true(pid >= 0);
            if (pid == 0) {
                if (setgid(65534) < 0 || setuid(65534) < 0)
                    _exit(1);
                int fd = connect_to(lfd);
                if (write(go[1], "x", 1) != 1)
                    _exit(1);
                for (;;)
                    pause();
                (void)fd;
            }
            assert_int_equal(read(go[0], &c, 1), 1);
            sfd = accept(lfd, NULL, NULL);
            assert_true(sfd >= 0);
            assert_int_equal(arc_peer_uid(a, sfd), 65534);
            kill(pid, SIGKILL);
            assert_int_equal(waitpid(pid, NULL, 0), pid);
            close(sfd);
            close(go[0]);
            close(go[1]);
        }
        /* a listening socket, a UDP socket, no socket: unknown */
        assert_int_equal(arc_peer_uid(a, lfd), ARC_UID_UNKNOWN);
        close(lfd);
    }
    /* an IPv4 client of a dual-stack listener: ::ffff:127.0.0.1 to the listener */
    int lfd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd >= 0) {
        int off = 0;
        struct sockaddr_in6 in6 = {.sin6_family = AF_INET6};
        assert_int_equal(inet_pton(AF_INET6, "::ffff:127.0.0.1", &in6.sin6_addr), 1);
        assert_int_equal(setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off), 0);
        assert_int_equal(bind(lfd, (struct sockaddr *)&in6, sizeof in6), 0);
        assert_int_equal(listen(lfd, 8), 0);
        socklen_t len = sizeof in6;
        assert_int_equal(getsockname(lfd, (struct sockaddr *)&in6, &len), 0);
        struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = in6.sin6_port};
        in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_int_equal(connect(cfd, (struct sockaddr *)&in, sizeof in), 0);
        int sfd = accept(lfd, NULL, NULL);
        assert_true(sfd >= 0);
        struct sockaddr_storage ss;
        len = sizeof ss;
        assert_int_equal(getpeername(sfd, (struct sockaddr *)&ss, &len), 0);
        assert_int_equal(ss.ss_family, AF_INET6); /* mapped */
        assert_int_equal(arc_peer_uid(a, sfd), geteuid());
        close(sfd);
        close(cfd);
        close(lfd);
    }
    int ufd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_int_equal(arc_peer_uid(a, ufd), ARC_UID_UNKNOWN);
    close(ufd);
    assert_int_equal(arc_peer_uid(a, -1), ARC_UID_UNKNOWN);

    close_arc(&fx);
}

/* Without a netlink socket (a service whose RestrictAddressFamilies= lacks AF_NETLINK) arc_new
 * still works: no user is known, and there is no per-user share (a single one would hold every
 * challenge to ARC_MAX_KEYS_PER_UID): the bounds of before, ARC_MAX_KEYS and ARC_MAX_PER_S. */
static void t_no_sock_diag(void **state)
{
    (void)state;
    no_netlink = 1; /* socket(AF_NETLINK) fails in arc_new */
    struct fixture f;
    open_arc(&f);
    no_netlink = 0;
    struct arc *a = f.a;
    uv_loop_t *loop = &f.loop;
    int lfd = listen_lo(AF_INET);
    assert_true(lfd >= 0);
    int cfd = connect_to(lfd);
    int sfd = accept(lfd, NULL, NULL);
    assert_true(sfd >= 0);
    assert_int_equal(arc_peer_uid(a, sfd), ARC_UID_UNKNOWN);
    close(sfd);
    close(cfd);
    close(lfd);
    uint64_t per0 = metrics.arc_challenges_refused_per_user;
    fake_now += 1000;
    struct got g = {{0}, 0};
    int made = 0;
    while (made < 2 * ARC_MAX_PER_S && try_challenge(loop, a, ARC_UID_UNKNOWN, &g))
        made++;
    assert_int_equal(made, ARC_MAX_PER_S);
    assert_int_equal(metrics.arc_challenges_refused_per_user, per0);
    close_arc(&f);
}

/* Validity runs on the monotonic clock: a wall clock stepped back an hour (NTP, an operator) does
 * not keep a key good past ARC_KEY_TTL_MS, and one stepped forward does not cut a key short. */
static void t_wall_clock(void **state)
{
    (void)state;
    struct fixture f;
    open_arc(&f);
    struct arc *a = f.a;
    uv_loop_t *loop = &f.loop;
    struct got g = {{0}, 0};
    char key[ARC_KEY_HEX + 1];

    challenge(loop, a, &g);
    snprintf(key, sizeof key, "%s", read_key(g.path));
    fake_wall -= 3600 * 1000;
    fake_now += ARC_KEY_TTL_MS;
    assert_false(verify(a, key)); /* a minute has passed, whatever the wall clock says */

    challenge(loop, a, &g);
    snprintf(key, sizeof key, "%s", read_key(g.path));
    fake_wall += 2 * 3600 * 1000;
    fake_now += 1;
    assert_true(verify(a, key)); /* a millisecond old */

    close_arc(&f);
}

static gid_t file_gid(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return st.st_gid;
}

/* The key file's group is set, never inherited: in a setgid directory whose group is another
 * (users, 100), a key file without --arc-key-group still gets imdsd's group; with it, that one. */
static void t_setgid_dir(void **state)
{
    (void)state;
    if (geteuid() != 0)
        skip(); /* chown to another group */
    char dir[] = "/tmp/imdsd-arc-XXXXXX";
    assert_non_null(mkdtemp(dir));
    assert_int_equal(chown(dir, 0, 100), 0);
    assert_int_equal(chmod(dir, 02755), 0);
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[256];
    struct got g = {{0}, 0};
    struct arc *a = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(a);
    challenge(&loop, a, &g);
    assert_int_equal(file_gid(g.path), getegid()); /* not 100 */
    arc_free(a);
    a = arc_new(&loop, dir, 65532, err, sizeof err);
    assert_non_null(a);
    challenge(&loop, a, &g);
    assert_int_equal(file_gid(g.path), 65532);
    arc_free(a);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(files_in(dir), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
    rmdir(dir);
}

/* arc_new with dir's owner and mode set: NULL with err naming the setting and the directory, or
 * an arc (freed at once) when want is NULL. */
static void dir_check(const char *dir, uid_t uid, gid_t gid, mode_t mode, const char *want)
{
    assert_int_equal(chown(dir, uid, gid), 0);
    assert_int_equal(chmod(dir, mode), 0);
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[256] = "";
    struct arc *a = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    if (want) {
        assert_null(a);
        char head[128];
        snprintf(head, sizeof head, "--arc-key-dir: '%s' ", dir);
        assert_int_equal(strncmp(err, head, strlen(head)), 0);
        assert_non_null(strstr(err, want));
        assert_null(strchr(err, '\n'));
    } else {
        assert_non_null(a);
        arc_free(a);
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* A key directory others can write to is refused at start-up: a writer may unlink or plant files
 * among the keys. World-writable (sticky or not), group-writable by a group that is not imdsd's,
 * owned by another user; root's or imdsd's, written by imdsd's own group at most, is fine. */
static void t_dir_writers(void **state)
{
    (void)state;
    if (geteuid() != 0)
        skip();
    char dir[] = "/tmp/imdsd-arc-XXXXXX";
    assert_non_null(mkdtemp(dir));
    dir_check(dir, 0, 0, 0777, "(mode 0777, gid 0) is writable by other users");
    dir_check(dir, 0, 0, 01777, "(mode 1777, gid 0) is writable by other users");
    dir_check(dir, 0, 100, 0775, "(mode 0775, gid 100) is writable by other users");
    dir_check(dir, 0, 100, 02775, "is writable by other users");
    dir_check(dir, 1234, 0, 0755, "is owned by uid 1234");
    dir_check(dir, 0, 0, 0755, NULL);
    dir_check(dir, 0, getegid(), 0775, NULL); /* imdsd's own group */
    dir_check(dir, 0, 100, 02750, NULL);      /* read by another group: its files' group is set */
    dir_check(dir, 0, 0, 0700, NULL);
    rmdir(dir);
}

static int exists(const char *dir, const char *name)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return access(p, F_OK) == 0;
}

static void touch(const char *dir, const char *name)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    int fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0600);
    assert_true(fd >= 0);
    close(fd);
}

/* A child process with its own arc in dir: writes its key file's path to fd, then waits to be
 * killed (a crash: nothing is cleaned up). */
static pid_t instance_in_child(const char *dir, int fd)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uv_loop_t loop;
        uv_loop_init(&loop);
        char err[256];
        struct arc *a = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
        struct got g = {{0}, 0};
        int refused;
        if (a && arc_challenge(a, getuid(), on_key, &g, &refused))
            while (g.calls == 0)
                uv_run(&loop, UV_RUN_ONCE);
        if (write(fd, g.path, strlen(g.path) + 1) < 0)
            _exit(1);
        for (;;)
            pause();
    }
    return pid;
}

/* Two instances on one directory, in one process (the same pid, as two containers' pid 1s are):
 * the second start leaves the first's live key files alone. The files of dead instances go: one
 * killed with SIGKILL, one whose lock file is left unlocked, an older imdsd's pid-named ones; a
 * live child's stay until it dies; names that are not imdsd's are never touched. */
static void t_instances(void **state)
{
    (void)state;
    char dir[] = "/tmp/imdsd-arc-XXXXXX";
    assert_non_null(mkdtemp(dir));
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[256];
    struct got ga = {{0}, 0}, gb = {{0}, 0};
    struct arc *a = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(a);
    challenge(&loop, a, &ga);
    struct arc *b = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(b);
    assert_int_equal(access(ga.path, F_OK), 0); /* a's key survived b's start */
    challenge(&loop, b, &gb);
    assert_int_equal(files_in(dir), 4); /* two keys, two locks */

    /* a dead instance's lock and key, an older imdsd's key, and files that are not imdsd's */
    touch(dir, "imdsd-0123456789abcdef.lock");
    touch(dir, "imdsd-0123456789abcdef-0011223344556677.key");
    touch(dir, "imdsd-4242-0011223344556677.key");
    touch(dir, "imdsd-fedcba9876543210-0011223344556677.key"); /* its lock is gone */
    touch(dir, "other.key");
    touch(dir, "imdsd-xyz.lock");
    /* a live instance in another process, then the same killed */
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t child = instance_in_child(dir, fds[1]);
    char cpath[4096] = "";
    assert_true(read(fds[0], cpath, sizeof cpath) > 0);
    close(fds[0]);
    close(fds[1]);
    assert_true(cpath[0] == '/');
    struct arc *c = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(c);
    assert_int_equal(access(cpath, F_OK), 0); /* the child lives: its key stays */
    assert_false(exists(dir, "imdsd-0123456789abcdef.lock"));
    assert_false(exists(dir, "imdsd-0123456789abcdef-0011223344556677.key"));
    assert_false(exists(dir, "imdsd-4242-0011223344556677.key"));
    assert_false(exists(dir, "imdsd-fedcba9876543210-0011223344556677.key"));
    assert_true(exists(dir, "other.key") && exists(dir, "imdsd-xyz.lock"));
    assert_int_equal(access(ga.path, F_OK), 0);
    assert_int_equal(access(gb.path, F_OK), 0);
    kill(child, SIGKILL);
    assert_int_equal(waitpid(child, NULL, 0), child);
    struct arc *d = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(d);
    assert_int_equal(access(cpath, F_OK), -1);  /* dead now: its key and lock are gone */
    assert_int_equal(files_in(dir), 4 + 2 + 2); /* 4 locks, the keys of a and b, not imdsd's */

    arc_free(a);
    arc_free(b);
    arc_free(c);
    arc_free(d);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(files_in(dir), 2);
    assert_int_equal(uv_loop_close(&loop), 0);
    unlink(strcat(strcpy(cpath, dir), "/other.key"));
    unlink(strcat(strcpy(cpath, dir), "/imdsd-xyz.lock"));
    rmdir(dir);
}

static void t_bad_dir(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[256];
    assert_null(arc_new(&loop, "relative/dir", (gid_t)-1, err, sizeof err));
    assert_non_null(strstr(err, "--arc-key-dir"));
    assert_null(arc_new(&loop, "/nonexistent/imdsd", (gid_t)-1, err, sizeof err));
    assert_non_null(strstr(err, "'/nonexistent/imdsd' is not a directory"));
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    add("arc", "keys: once, expiry, bound, removal", t_keys, NULL);
    add("arc", "a flood is refused, a live key never dropped", t_flood, NULL);
    add("arc", "one user's flood is refused, other users get keys", t_per_user, NULL);
    add("arc", "the peer's uid from sock_diag", t_peer_uid, NULL);
    add("arc", "without sock_diag, no per-user share", t_no_sock_diag, NULL);
    add("arc", "the wall clock stepped does not move expiry", t_wall_clock, NULL);
    add("arc", "a setgid directory's group is not the key files'", t_setgid_dir, NULL);
    add("arc", "a directory others can write is refused", t_dir_writers, NULL);
    add("arc", "instances sharing a directory", t_instances, NULL);
    add("arc", "a bad directory", t_bad_dir, NULL);
    return _cmocka_run_group_tests("arc", tests, ntests, NULL, NULL);
}

/* test_arc.c - the Azure Arc key files on a real loop and a real directory, with both clocks
 * under the test's control (--wrap=now_ms,--wrap=now_wall_ms): a key is good once, for
 * ARC_KEY_TTL_MS of the monotonic clock whatever the wall clock does, in constant-time comparison
 * with every live key; files are 0640 and removed after use, expiry and arc_free; at most
 * ARC_MAX_KEYS are outstanding and ARC_MAX_PER_S made a second, and a flood beyond is refused
 * without touching a live key. */
#include "unit.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
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
    assert_non_null(arc_challenge(a, on_key, g, &refused));
    assert_int_equal(refused, 0);
    while (g->calls == before)
        uv_run(loop, UV_RUN_ONCE);
    assert_true(g->path[0] != 0);
}

static void t_keys(void **state)
{
    (void)state;
    char dir[] = "/tmp/imdsd-arc-XXXXXX";
    assert_non_null(mkdtemp(dir));
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[256];
    struct arc *a = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(a);
    struct got g = {{0}, 0};

    /* a file 0640 named *.key in the directory, holding 64 hex digits */
    challenge(&loop, a, &g);
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
        uv_run(&loop, UV_RUN_ONCE); /* the unlink runs on the thread pool */
    assert_int_equal(access(g.path, F_OK), -1);

    /* expiry: good until ARC_KEY_TTL_MS, not after */
    challenge(&loop, a, &g);
    snprintf(key, sizeof key, "%s", read_key(g.path));
    fake_now += ARC_KEY_TTL_MS - 1;
    char path2[4096];
    struct got g2 = {{0}, 0};
    challenge(&loop, a, &g2);
    snprintf(path2, sizeof path2, "%s", g2.path);
    char key2[ARC_KEY_HEX + 1];
    snprintf(key2, sizeof key2, "%s", read_key(path2));
    fake_now += 1;
    assert_false(verify(a, key)); /* expired */
    assert_true(verify(a, key2)); /* younger: still good */

    /* (at most ARC_MAX_KEYS outstanding: t_flood) */
    /* arc_free removes every file */
    arc_free(a);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(files_in(dir), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
    rmdir(dir);
}

/* One challenge: 1 when admitted (the key is then made, into g), 0 when refused. */
static int try_challenge(uv_loop_t *loop, struct arc *a, struct got *g)
{
    int before = g->calls, refused = -1;
    struct arc_challenge *ch = arc_challenge(a, on_key, g, &refused);
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

/* A flood of challenges (any local user can send one) fills the slots and is then refused: it
 * never drops the key a slower client was given first, which stays good for its whole lifetime.
 * Past ARC_MAX_PER_S a second, challenges are refused too; keys being made hold their slots;
 * a key used or expired frees its slot; every refusal is counted. */
static void t_flood(void **state)
{
    (void)state;
    char dir[] = "/tmp/imdsd-arc-XXXXXX";
    assert_non_null(mkdtemp(dir));
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[256];
    struct arc *a = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(a);
    uint64_t refused0 = metrics.arc_challenges_refused;
    fake_now += 1000; /* a new second */
    struct got victim = {{0}, 0}, g = {{0}, 0};
    challenge(&loop, a, &victim);
    char vkey[ARC_KEY_HEX + 1];
    snprintf(vkey, sizeof vkey, "%s", read_key(victim.path));

    /* ARC_MAX_PER_S a second: the victim's and 99 more; then refusals until the next second */
    int made = 1;
    while (made < 2 * ARC_MAX_PER_S && try_challenge(&loop, a, &g))
        made++;
    assert_int_equal(made, ARC_MAX_PER_S);
    assert_false(try_challenge(&loop, a, &g));
    assert_int_equal(metrics.arc_challenges_refused - refused0, 2);
    /* the next seconds until every slot is live, then the flood is refused, however long */
    for (int s = 0; made < ARC_MAX_KEYS && s < ARC_MAX_KEYS; s++) {
        fake_now += 1000;
        while (made < ARC_MAX_KEYS && try_challenge(&loop, a, &g))
            made++;
    }
    uint64_t before = metrics.arc_challenges_refused;
    int flood = 0;
    for (int s = 0; s < 5; s++, fake_now += 1000)
        for (int i = 0; i < 2000; i++)
            flood += try_challenge(&loop, a, &g);
    assert_int_equal(key_files(dir), ARC_MAX_KEYS);
    assert_true(verify(a, vkey)); /* 5 s and 10,000 challenges later */
    assert_int_equal(flood, 0);
    assert_int_equal(metrics.arc_challenges_refused - before, 5 * 2000);
    assert_true(try_challenge(&loop, a, &g)); /* its slot is free again */
    assert_false(try_challenge(&loop, a, &g));

    /* keys expire: their slots are free, the files go */
    fake_now += ARC_KEY_TTL_MS;
    assert_true(try_challenge(&loop, a, &g));
    for (int i = 0; i < 1000 && key_files(dir) > 1; i++)
        uv_run(&loop, UV_RUN_ONCE);
    assert_int_equal(key_files(dir), 1);

    /* keys being made hold their slots: a burst before the loop runs is bounded alike */
    fake_now += ARC_KEY_TTL_MS; /* the last one expires too */
    struct got burst = {{0}, 0};
    int admitted = 0, refused = 0;
    for (int s = 0; s < 4; s++, fake_now += 1000)
        for (int i = 0; i < ARC_MAX_PER_S; i++)
            admitted += arc_challenge(a, on_key, &burst, &refused) != NULL;
    assert_int_equal(admitted, ARC_MAX_KEYS);
    while (burst.calls < ARC_MAX_KEYS)
        uv_run(&loop, UV_RUN_ONCE);
    assert_int_equal(key_files(dir), ARC_MAX_KEYS);

    arc_free(a);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(files_in(dir), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
    rmdir(dir);
}

/* Validity runs on the monotonic clock: a wall clock stepped back an hour (NTP, an operator) does
 * not keep a key good past ARC_KEY_TTL_MS, and one stepped forward does not cut a key short. */
static void t_wall_clock(void **state)
{
    (void)state;
    char dir[] = "/tmp/imdsd-arc-XXXXXX";
    assert_non_null(mkdtemp(dir));
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[256];
    struct arc *a = arc_new(&loop, dir, (gid_t)-1, err, sizeof err);
    assert_non_null(a);
    struct got g = {{0}, 0};
    char key[ARC_KEY_HEX + 1];

    challenge(&loop, a, &g);
    snprintf(key, sizeof key, "%s", read_key(g.path));
    fake_wall -= 3600 * 1000;
    fake_now += ARC_KEY_TTL_MS;
    assert_false(verify(a, key)); /* a minute has passed, whatever the wall clock says */

    challenge(&loop, a, &g);
    snprintf(key, sizeof key, "%s", read_key(g.path));
    fake_wall += 2 * 3600 * 1000;
    fake_now += 1;
    assert_true(verify(a, key)); /* a millisecond old */

    arc_free(a);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(files_in(dir), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
    rmdir(dir);
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
        if (a && arc_challenge(a, on_key, &g, &refused))
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
    add("arc", "the wall clock stepped does not move expiry", t_wall_clock, NULL);
    add("arc", "a setgid directory's group is not the key files'", t_setgid_dir, NULL);
    add("arc", "a directory others can write is refused", t_dir_writers, NULL);
    add("arc", "instances sharing a directory", t_instances, NULL);
    add("arc", "a bad directory", t_bad_dir, NULL);
    return _cmocka_run_group_tests("arc", tests, ntests, NULL, NULL);
}

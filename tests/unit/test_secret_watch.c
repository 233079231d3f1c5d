/* test_secret_watch.c - the --identity-header-file follower on a real loop and a real file, with
 * both clocks under the test's control (--wrap=now_ms,--wrap=now_wall_ms) and its log captured
 * (fd 2): the previous secret's overlap is counted on the monotonic clock, so a wall clock stepped
 * either way neither extends nor cuts it; a file caught half-written (truncated, then written in
 * two steps) is never taken, and the previous secret keeps its overlap; a file that turns empty,
 * too long, unreadable or missing keeps the current secret, logged once, by length only. */
#include "unit.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "log.h"
#include "secret_watch.h"
#include "util.h"

static uint64_t fake_mono = 5000000;
static int64_t fake_wall = 1700000000000;
uint64_t __wrap_now_ms(void);
uint64_t __wrap_now_ms(void)
{
    return fake_mono;
}
int64_t __wrap_now_wall_ms(void);
int64_t __wrap_now_wall_ms(void)
{
    return fake_wall;
}

#define A "secret-A-0123456789"
#define B "secret-B-9876543210"
#define C "secret-C-5555555555"

struct fx {
    char dir[32], path[64], log[64];
    uv_loop_t loop;
    uv_timer_t alive; /* the watch's timers do not keep a loop running: in imdsd the server does */
    struct secret_watch *sw;
    int saved_stderr;
};

static void write_file(const char *path, const char *content)
{
    char tmp[96];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(content, 1, strlen(content), f), strlen(content));
    assert_int_equal(fclose(f), 0);
    assert_int_equal(rename(tmp, path), 0); /* whole at once, as the kubelet's swap */
}

static void fx_free(void *arg)
{
    struct fx *f = arg;
    int fd = open(f->path, O_WRONLY | O_NONBLOCK); /* frees a reader stuck opening a FIFO */
    if (fd >= 0)
        close(fd);
    secret_watch_free(f->sw);
    uv_close((uv_handle_t *)&f->alive, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    /* the captured log back on the real stderr: run-unit.sh shows it when a test fails */
    fflush(stderr);
    dup2(f->saved_stderr, 2);
    close(f->saved_stderr);
    FILE *l = fopen(f->log, "r");
    char line[2048];
    while (l && fgets(line, sizeof line, l))
        fputs(line, stderr);
    if (l)
        fclose(l);
    unlink(f->log);
    unlink(f->path);
    rmdir(f->path); /* when a test made it a directory */
    rmdir(f->dir);
    free(f);
}

static void never(uv_timer_t *t)
{
    (void)t;
}

/* The file holds content; the configuration's start-up read found secret. */
static struct fx *fx_new_read(const char *content, const char *secret, unsigned overlap_s)
{
    struct fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    snprintf(f->dir, sizeof f->dir, "/tmp/imdsd-sw-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/identity-header", f->dir);
    snprintf(f->log, sizeof f->log, "%s/log", f->dir);
    write_file(f->path, content);
    fflush(stderr);
    f->saved_stderr = dup(2);
    int fd = open(f->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0 && f->saved_stderr >= 0);
    dup2(fd, 2);
    close(fd);
    log_min_level = LOG_DEBUG;
    uv_loop_init(&f->loop);
    uv_timer_init(&f->loop, &f->alive);
    assert_int_equal(uv_timer_start(&f->alive, never, 3600 * 1000, 0), 0);
    f->sw = secret_watch_new(&f->loop, f->path, secret, strlen(secret), overlap_s);
    return defer(fx_free, f);
}

static struct fx *fx_new(const char *secret, unsigned overlap_s)
{
    return fx_new_read(secret, secret, overlap_s);
}

/* Whether s is one of the secrets a request may present now; n: how many there are. */
static int accepts(struct fx *f, const char *s, int *n)
{
    struct imds_secret out[2];
    int k = secret_watch_get(f->sw, out), hit = 0;
    for (int i = 0; i < k; i++)
        hit |= out[i].len == strlen(s) && memcmp(out[i].value, s, out[i].len) == 0;
    if (n)
        *n = k;
    return hit;
}

static int is_current(struct fx *f, const char *s)
{
    struct imds_secret out[2];
    secret_watch_get(f->sw, out);
    return out[0].len == strlen(s) && memcmp(out[0].value, s, out[0].len) == 0;
}

/* Runs the loop until s is the current secret (the reads go through the thread pool). */
static void wait_current(struct fx *f, const char *s)
{
    for (int i = 0; i < 5000 && !is_current(f, s); i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    assert_true(is_current(f, s));
}

/* The log so far (static: valid until the next call). */
static const char *log_text(struct fx *f)
{
    static char text[1 << 16];
    fflush(stderr);
    FILE *l = fopen(f->log, "r");
    assert_non_null(l);
    size_t n = fread(text, 1, sizeof text - 1, l);
    fclose(l);
    text[n] = 0;
    return text;
}

static int count(const char *text, const char *needle)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)); p++)
        n++;
    return n;
}

/* Runs the loop until the log holds needle (n times), checking on every turn that the current
 * secret is still cur and that old is still accepted. */
static void pump_until_log(struct fx *f, const char *needle, int n, const char *cur,
                           const char *old)
{
    for (int i = 0; i < 5000 && count(log_text(f), needle) < n; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        assert_true(is_current(f, cur));
        if (old)
            assert_true(accepts(f, old, NULL));
        usleep(1000);
    }
    assert_int_equal(count(log_text(f), needle), n);
}

/* Runs the loop until s is current, checking on every turn that never is. */
static void pump_until_current(struct fx *f, const char *s, const char *never)
{
    for (int i = 0; i < 5000 && !is_current(f, s); i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        assert_false(accepts(f, never, NULL));
        usleep(1000);
    }
    assert_true(is_current(f, s));
}

/* Runs the loop for ms milliseconds. */
static void pump_ms(struct fx *f, int ms)
{
    uint64_t end = uv_hrtime() + (uint64_t)ms * 1000000u;
    while (uv_hrtime() < end) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
}

static void t_half_written(void **state)
{
    (void)state;
    struct fx *f = fx_new(A, 300);

    /* truncated, the first 11 bytes written, and a read sees just that */
    int fd = open(f->path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, B, 11), 11);
    secret_watch_reload(f->sw);
    pump_until_log(f, "event=identity_header_changed", 1, A, NULL);
    assert_non_null(strstr(log_text(f), " bytes=11 "));
    /* the rest: B is taken, the fragment never, and A keeps its overlap */
    assert_int_equal(write(fd, &B[11], strlen(B) - 11), (ssize_t)strlen(B) - 11);
    close(fd);
    pump_until_current(f, B, "secret-B-98");
    int n;
    assert_true(accepts(f, A, &n));
    assert_int_equal(n, 2);
    assert_int_equal(count(log_text(f), "event=identity_header_rotated"), 1);

    /* truncated to nothing and seen so: not "empty", not a rotation, until C is written */
    fd = open(f->path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    secret_watch_reload(f->sw);
    pump_until_log(f, " bytes=0 ", 1, B, A);
    assert_int_equal(write(fd, C, strlen(C)), (ssize_t)strlen(C));
    close(fd);
    pump_until_current(f, C, "");
    assert_true(accepts(f, B, &n)); /* the previous one is B, whose overlap begins now */
    assert_int_equal(n, 2);
    const char *text = log_text(f);
    assert_int_equal(count(text, "event=identity_header_rotated"), 2);
    assert_null(strstr(text, "identity_header_unusable"));
    assert_null(strstr(text, "secret-"));
}

static void t_startup_cut(void **state)
{
    (void)state;
    /* the configuration read B half-written; the first confirming read finds all of it */
    struct fx *f = fx_new_read(B "\n", "secret-B-98", 300);
    pump_until_current(f, B, A);
    int n;
    assert_false(accepts(f, "secret-B-98", &n));
    assert_int_equal(n, 1);
    assert_non_null(strstr(log_text(f), "previous_valid_s=0 previous=\"cut at start-up\""));
    /* B is confirmed (read twice): a real rotation gives it its overlap */
    write_file(f->path, C);
    secret_watch_reload(f->sw);
    pump_until_current(f, C, A);
    assert_true(accepts(f, B, &n));
    assert_int_equal(n, 2);
}

static void t_startup_cut_reread(void **state)
{
    (void)state;
    /* a SIGHUP at once reads the same cut: too soon to confirm it */
    struct fx *f = fx_new("secret-B-98", 300);
    secret_watch_reload(f->sw);
    pump_ms(f, 100);
    write_file(f->path, B);
    secret_watch_reload(f->sw);
    pump_until_current(f, B, A);
    int n;
    assert_false(accepts(f, "secret-B-98", &n));
    assert_int_equal(n, 1);
}

static void t_startup_confirmed(void **state)
{
    (void)state;
    /* a start-up value confirmed by a read a second later keeps its overlap even when the next
     * secret begins with it */
    struct fx *f = fx_new("secret-B-98", 300);
    pump_until_log(f, "event=identity_header_confirmed", 1, "secret-B-98", NULL);
    write_file(f->path, B);
    secret_watch_reload(f->sw);
    pump_until_current(f, B, A);
    int n;
    assert_true(accepts(f, "secret-B-98", &n));
    assert_int_equal(n, 2);
}

/* One bad file: made, then read until its problem is logged; the current secret stays. */
struct bad {
    const char *name;
    const char *content; /* NULL: see make */
    int make;            /* 1: a directory, 2: no file at all, 3: a FIFO */
    const char *reason;
    const char *bytes; /* " bytes=N " logged, or NULL: none */
};

static const struct bad bad_rows[] = {
    {"empty", "", 0, "is empty", " bytes=0 "},
    {"blank", " \n\t \n", 0, "is empty", " bytes=5 "},
    {"too long", NULL, 0, "holds more than 255 bytes", NULL},
    {"a control character", "secret-X\001yz", 0, "holds characters that cannot be sent",
     " bytes=11 "},
    {"a directory", NULL, 1, "cannot be read", NULL},
    {"missing", NULL, 2, "cannot be opened", NULL},
    {"a FIFO", NULL, 3, "cannot be read", NULL}, /* pread: ESPIPE */
};

static void t_bad_file(void **state)
{
    const struct bad *r = *state;
    struct fx *f = fx_new(A, 300);
    char fpA[13], want[64];
    fingerprint(A, strlen(A), fpA);
    if (r->make == 1) {
        assert_int_equal(unlink(f->path), 0);
        assert_int_equal(mkdir(f->path, 0700), 0);
    } else if (r->make == 2) {
        assert_int_equal(unlink(f->path), 0);
    } else if (r->make == 3) {
        assert_int_equal(unlink(f->path), 0);
        assert_int_equal(mkfifo(f->path, 0600), 0);
    } else if (r->content) {
        write_file(f->path, r->content);
    } else {
        char big[400];
        memset(big, 'x', sizeof big - 1);
        big[sizeof big - 1] = 0;
        write_file(f->path, big);
    }
    secret_watch_reload(f->sw);
    pump_until_log(f, "event=identity_header_unusable", 1, A, NULL);
    const char *text = log_text(f);
    snprintf(want, sizeof want, "reason=\"%s", r->reason);
    assert_non_null(strstr(text, want));
    assert_non_null(strstr(text, "action=keep_current"));
    snprintf(want, sizeof want, "current_fp=%s", fpA);
    assert_non_null(strstr(text, want));
    if (r->bytes)
        assert_non_null(strstr(text, r->bytes));
    else
        assert_null(strstr(strstr(text, "event=identity_header_unusable"), " bytes="));
    assert_null(strstr(text, "secret-"));
    assert_null(strstr(text, "xxxx"));
    int n;
    assert_true(accepts(f, A, &n));
    assert_int_equal(n, 1);
}

static void t_bad_once(void **state)
{
    (void)state;
    struct fx *f = fx_new(A, 300);
    write_file(f->path, "");
    secret_watch_reload(f->sw);
    pump_until_log(f, "event=identity_header_unusable", 1, A, NULL);
    /* read again and again while it stays so: logged once */
    secret_watch_reload(f->sw);
    pump_ms(f, 2 * SECRET_SETTLE_MS + 200);
    int changes = count(log_text(f), "event=identity_header_changed");
    assert_int_equal(changes, 1); /* the same problem again is no change */
    assert_int_equal(count(log_text(f), "event=identity_header_unusable"), 1);
    /* good again (the same secret: at once, nothing logged), then bad again: logged again */
    write_file(f->path, A);
    secret_watch_reload(f->sw);
    pump_ms(f, 100);
    write_file(f->path, "\n");
    secret_watch_reload(f->sw);
    pump_until_log(f, "event=identity_header_unusable", 2, A, NULL);
    const char *text = log_text(f);
    assert_int_equal(count(text, "event=identity_header_changed"), changes + 1);
    assert_null(strstr(text, "identity_header_rotated"));
}

static void t_clock_steps(void **state)
{
    (void)state;
    struct fx *f = fx_new(A, 2);
    int n;
    assert_true(accepts(f, A, &n));
    assert_int_equal(n, 1);

    /* a rotation, then the wall clock stepped back an hour: the overlap still ends 2 s on */
    write_file(f->path, B);
    secret_watch_reload(f->sw);
    wait_current(f, B);
    assert_true(accepts(f, A, &n));
    assert_int_equal(n, 2);
    fake_wall -= 3600 * 1000;
    fake_mono += 1999;
    assert_true(accepts(f, A, NULL));
    fake_mono += 1;
    assert_false(accepts(f, A, &n));
    assert_int_equal(n, 1);
    assert_true(accepts(f, B, NULL));

    /* stepped forward an hour: the overlap is not cut short either */
    write_file(f->path, C);
    secret_watch_reload(f->sw);
    wait_current(f, C);
    fake_wall += 3600 * 1000;
    fake_mono += 1000;
    assert_true(accepts(f, B, &n));
    assert_int_equal(n, 2);
    fake_mono += 1000;
    assert_false(accepts(f, B, NULL));
    assert_true(accepts(f, C, NULL));
}

int main(void)
{
    add("secret_watch", "the overlap ignores wall clock steps", t_clock_steps, NULL);
    add("secret_watch", "a half-written file is never taken", t_half_written, NULL);
    add("secret_watch", "a start-up value cut short gets no overlap", t_startup_cut, NULL);
    add("secret_watch", "a start-up value read again at once is not confirmed",
        t_startup_cut_reread, NULL);
    add("secret_watch", "a confirmed start-up value keeps its overlap", t_startup_confirmed, NULL);
    ADD_ROWS("secret_watch: a bad file keeps the secret", bad_rows, t_bad_file);
    add("secret_watch", "a bad file is logged once until good again", t_bad_once, NULL);
    return _cmocka_run_group_tests("secret_watch", tests, ntests, NULL, NULL);
}

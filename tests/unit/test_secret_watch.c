/* test_secret_watch.c - the --identity-header-file follower on a real loop and a real file, with
 * both clocks under the test's control (--wrap=now_ms,--wrap=now_wall_ms) and its log captured
 * (fd 2): the previous secret's overlap is counted on the monotonic clock, so a wall clock stepped
 * either way neither extends nor cuts it. */
#include "unit.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "log.h"
#include "secret_watch.h"

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
    secret_watch_free(f->sw);
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

static struct fx *fx_new(const char *secret, unsigned overlap_s)
{
    struct fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    snprintf(f->dir, sizeof f->dir, "/tmp/imdsd-sw-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/identity-header", f->dir);
    snprintf(f->log, sizeof f->log, "%s/log", f->dir);
    write_file(f->path, secret);
    fflush(stderr);
    f->saved_stderr = dup(2);
    int fd = open(f->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0 && f->saved_stderr >= 0);
    dup2(fd, 2);
    close(fd);
    log_min_level = LOG_DEBUG;
    uv_loop_init(&f->loop);
    f->sw = secret_watch_new(&f->loop, f->path, secret, strlen(secret), overlap_s);
    return defer(fx_free, f);
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
    return _cmocka_run_group_tests("secret_watch", tests, ntests, NULL, NULL);
}

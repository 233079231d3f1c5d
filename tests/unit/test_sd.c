/* test_sd.c - sd_init's reading of the systemd variables (and their removal from the
 * environment), and the notification datagrams to path and abstract addresses. The loop side
 * (READY=1 with STATUS=, the watchdog, socket activation) is tested end to end in
 * tests/integration/test_systemd.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "sd.h"

static const char *const VARS[] = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                   "LISTEN_PID",    "LISTEN_FDS",    "LISTEN_FDNAMES"};

static void assert_env_clean(void)
{
    for (size_t i = 0; i < sizeof VARS / sizeof VARS[0]; i++)
        assert_null(getenv(VARS[i]));
}

static void set_pid(const char *name, pid_t pid)
{
    char v[32];
    snprintf(v, sizeof v, "%d", (int)pid);
    setenv(name, v, 1);
}

/* a datagram socket standing for systemd's; abstract when name starts with '@' */
static int bind_notify(const char *name)
{
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t len = strlen(name);
    memcpy(a.sun_path, name, len);
    if (name[0] == '@')
        a.sun_path[0] = 0;
    else
        unlink(name);
    assert_int_equal(
        bind(fd, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)),
        0);
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static void receive(int fd, char *out, size_t n)
{
    ssize_t got = recv(fd, out, n - 1, 0);
    assert_true(got > 0);
    out[got] = 0;
}

static void test_variables_are_read_then_unset(void **state)
{
    (void)state;
    char err[256] = "";
    setenv("NOTIFY_SOCKET", "@imdsd-unit-unused", 1);
    setenv("WATCHDOG_USEC", "30000000", 1);
    set_pid("WATCHDOG_PID", getpid());
    set_pid("LISTEN_PID", getpid() + 1); /* another process's sockets: not ours */
    setenv("LISTEN_FDS", "2", 1);
    setenv("LISTEN_FDNAMES", "tokens:health", 1);
    assert_int_equal(sd_init(err, sizeof err), 0);
    assert_env_clean();
}

static void test_malformed_listen_variables(void **state)
{
    (void)state;
    static const struct {
        const char *fds, *names, *err;
    } rows[] = {
        {"x", NULL, "LISTEN_FDS: 'x' is not a number"},
        {"", NULL, "LISTEN_FDS: '' is not a number"},
        {"-1", NULL, "LISTEN_FDS: '-1' is not a number"},
        {"17", NULL, "LISTEN_FDS: 17 sockets, at most 16"},
        {"1", "a:b", "LISTEN_FDNAMES: 'a:b' names 2 sockets, LISTEN_FDS=1"},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        char err[256] = "";
        set_pid("LISTEN_PID", getpid());
        setenv("LISTEN_FDS", rows[i].fds, 1);
        if (rows[i].names)
            setenv("LISTEN_FDNAMES", rows[i].names, 1);
        /* descriptor 3 must exist for the names check to be reached */
        int fd = dup2(STDERR_FILENO, SD_LISTEN_FDS_START);
        assert_int_equal(sd_init(err, sizeof err), -1);
        close(fd);
        assert_string_equal(err, rows[i].err);
        assert_env_clean();
    }
    char err[256] = "";
    setenv("LISTEN_PID", "abc", 1);
    assert_int_equal(sd_init(err, sizeof err), -1);
    assert_string_equal(err, "LISTEN_PID: 'abc' is not a process id");
}

static void notifications_to(const char *addr)
{
    char err[256] = "", msg[256];
    int fd = bind_notify(addr);
    setenv("NOTIFY_SOCKET", addr, 1);
    assert_int_equal(sd_init(err, sizeof err), 0);
    assert_env_clean();
    sd_reloading();
    receive(fd, msg, sizeof msg);
    unsigned long long usec = 0;
    assert_int_equal(sscanf(msg, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading", &usec), 1);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long now = (unsigned long long)ts.tv_sec * 1000000u + ts.tv_nsec / 1000u;
    assert_true(usec <= now && now - usec < 2000000u);
    sd_stopping();
    receive(fd, msg, sizeof msg);
    assert_string_equal(msg, "STOPPING=1\nSTATUS=stopping");
    sd_stopping();  /* once only */
    sd_reloading(); /* and no reload while stopping */
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    assert_true(recv(fd, msg, sizeof msg, 0) < 0);
    close(fd);
    if (addr[0] == '/')
        unlink(addr);
}

static void test_notify_abstract_address(void **state)
{
    (void)state;
    char name[64];
    snprintf(name, sizeof name, "@imdsd-unit-%d", (int)getpid());
    notifications_to(name);
}

static void test_notify_path(void **state)
{
    (void)state;
    char path[64];
    snprintf(path, sizeof path, "/tmp/imdsd-unit-notify-%d", (int)getpid());
    notifications_to(path);
}

static void test_unusable_notify_socket_is_ignored(void **state)
{
    (void)state;
    char err[256] = "";
    setenv("NOTIFY_SOCKET", "relative/path", 1);
    assert_int_equal(sd_init(err, sizeof err), 0);
    assert_env_clean();
    sd_reloading(); /* nowhere to send: nothing happens */
    sd_stopping();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_variables_are_read_then_unset),
        cmocka_unit_test(test_malformed_listen_variables),
        cmocka_unit_test(test_notify_abstract_address),
        cmocka_unit_test(test_notify_path),
        cmocka_unit_test(test_unusable_notify_socket_is_ignored),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* sd.h - systemd, natively: the readiness protocol (Type=notify: READY=1, RELOADING=1,
 * STOPPING=1, STATUS=), the watchdog (WatchdogSec=) and socket activation (LISTEN_FDS).
 *
 * Written by hand instead of linking libsystemd: the protocol is one datagram per message on the
 * AF_UNIX socket named by $NOTIFY_SOCKET and a few environment variables, about forty lines, not
 * worth a run-time dependency (and the static image has no libsystemd at all). Everything here is
 * a no-op when imdsd does not run under systemd (the variables are not set). */
#ifndef IMDSD_SD_H
#define IMDSD_SD_H

#include <stddef.h>
#include <uv.h>

#define SD_LISTEN_FDS_START 3  /* the first descriptor systemd passes */
#define SD_MAX_LISTEN_FDS   16 /* more is a configuration error */
#define SD_STATUS_CHECK_MS  1000
#define SD_READY_CHECK_MS   100 /* while not ready yet */

/* Reads NOTIFY_SOCKET, WATCHDOG_USEC / WATCHDOG_PID and LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES,
 * then removes all of them from the environment, so that nothing imdsd runs inherits them. Call
 * it once, before any thread exists (unsetenv is not thread-safe). Returns how many listening
 * sockets systemd passed (0: none, or meant for another process), or -1 with a one-line reason
 * naming the variable in err. */
int sd_init(char *err, size_t errlen);

/* A listening socket systemd passed: its descriptor and its FileDescriptorName= ("" when none). */
struct sd_socket {
    int fd;
    const char *name;
};

/* The sockets systemd passed (descriptors 3 ... 3+N-1, close-on-exec), in order: points *out at
 * them (valid until the next sd_init) and returns how many (0: none was passed). What each one
 * serves is the caller's business. */
int sd_listen(const struct sd_socket **out);

/* Writes the text of a STATUS= line (without "STATUS=") into out, n bytes; returns whether the
 * daemon is ready (READY=1 may be sent: with --prefetch, once those tokens are in hand). */
typedef int sd_status_cb(char *out, size_t n, void *arg);

/* Every listener is open: sends READY=1 with a STATUS= line that status(arg) writes as soon as
 * status says ready (until then it asks every SD_READY_CHECK_MS and sends STATUS= alone), then
 * keeps STATUS= up to date (asks every second, sends what changed; a newline becomes '?') and,
 * when systemd asked for it, sends WATCHDOG=1 every WATCHDOG_USEC/2 from the loop. The timers
 * never keep the loop alive; sd_close() closes them. */
void sd_ready(uv_loop_t *loop, sd_status_cb *status, void *arg);
/* SIGHUP: RELOADING=1 (with MONOTONIC_USEC=, which systemd 253 and newer want); then, once the
 * reload has been started, sd_reloaded() sends READY=1 again. */
void sd_reloading(void);
void sd_reloaded(void);
/* Shutdown begins: STOPPING=1. No STATUS= update follows; the watchdog goes on until sd_close(). */
void sd_stopping(void);
/* Closes the timers (teardown); safe to call more than once, or without sd_ready(). */
void sd_close(void);

#endif

/* secret_watch.c - re-reads the --identity-header-file every SECRET_REREAD_MS with libuv's
 * asynchronous file calls (the thread pool: never a blocking read on the loop). Polling instead
 * of inotify: the kubelet updates Secret volumes on its sync period (a minute or more), so five
 * seconds more cost nothing, and a poll survives every way the file can be replaced.
 *
 * A read is one snapshot of a file that someone else may be writing: an operator's
 * "echo new > file" truncates and then writes, and a read in between finds it empty or cut. So a
 * change is taken only once a read at least SECRET_SETTLE_MS later finds the same (the same
 * secret, or the same problem); until then the current secret stays, and with it the previous
 * one's overlap. The kubelet's ..data swap is atomic: it settles at the first confirming read.
 * The start-up value was read once, by the configuration: until a read SECRET_SETTLE_MS later
 * confirms it, it may be such a cut, and it gets no overlap when the file then turns out to hold
 * a secret that begins with it. */
#include "secret_watch.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "util.h"

struct secret_watch {
    uv_loop_t *loop;
    const char *path; /* borrowed from the configuration */
    char qpath[512];
    unsigned overlap_s;
    char cur[CONFIG_MAX_SECRET + 1], prev[CONFIG_MAX_SECRET + 1];
    size_t cur_len, prev_len;
    uint64_t prev_until_ms; /* now_ms(), monotonic: a duration, not a date */
    int cur_confirmed;      /* read again SECRET_SETTLE_MS after it was first read */
    uint64_t cur_seen_ms;   /* uv_now at secret_watch_new: after the configuration read it */
    /* a change seen by one read and not yet confirmed: a secret (pend_why NULL) or a problem */
    int pending;
    char pend[CONFIG_MAX_SECRET + 1];
    size_t pend_len;
    const char *pend_why;
    uint64_t pend_seen_ms;  /* uv_now when the read that saw it ended */
    uint64_t read_start_ms; /* uv_now when the read in flight started */
    uv_timer_t timer, settle;
    uv_fs_t req;
    int fd;
    int busy;                 /* a read in flight */
    int again;                /* reload() or the settle timer asked during a read */
    int closing;              /* secret_watch_free called */
    ssize_t nread;            /* the read's result, kept across the close */
    const char *read_why;     /* why the read failed, kept across the close */
    int handles;              /* the timers, until closed */
    const char *last_problem; /* logged once until the file is good again */
    char rbuf[CONFIG_SECRET_READ];
};

static void start_read(struct secret_watch *sw);

static void maybe_free(struct secret_watch *sw)
{
    if (sw->closing && !sw->busy && !sw->handles) {
        secret_zero(sw, sizeof *sw);
        free(sw);
    }
}

static int same_why(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

static void drop_pending(struct secret_watch *sw)
{
    if (sw->pending) /* else the timer may be confirming the start-up value */
        uv_timer_stop(&sw->settle);
    secret_zero(sw->pend, sizeof sw->pend);
    sw->pend_len = 0;
    sw->pend_why = NULL;
    sw->pending = 0;
}

/* " bytes=N" for a log line about a file that is not (yet) a secret: its length, never its bytes
 * nor a fingerprint (one of a cut secret's few bytes would give them away). Nothing when the read
 * failed (n < 0) or stopped at CONFIG_SECRET_READ (the file's length is not known). */
static const char *bytes_field(char out[32], ssize_t n)
{
    out[0] = 0;
    if (n >= 0 && n < CONFIG_SECRET_READ)
        snprintf(out, 32, " bytes=%zd", n);
    return out;
}

static void problem(struct secret_watch *sw, const char *why, ssize_t n)
{
    if (!same_why(sw->last_problem, why)) {
        char fp[13], bytes[32];
        fingerprint(sw->cur, sw->cur_len, fp);
        log_warn("identity_header_unusable",
                 "path=%s reason=\"%s\"%s action=keep_current current_fp=%s", sw->qpath, why,
                 bytes_field(bytes, n), fp);
    }
    sw->last_problem = why;
}

static void rotate(struct secret_watch *sw, const char *secret, size_t len)
{
    char oldfp[13], newfp[13];
    fingerprint(sw->cur, sw->cur_len, oldfp);
    fingerprint(secret, len, newfp);
    /* an unconfirmed start-up value that the new secret begins with was the configuration's read
     * of a file half-written: never a secret, so no overlap */
    int cut = !sw->cur_confirmed && sw->cur_len < len && memcmp(secret, sw->cur, sw->cur_len) == 0;
    unsigned valid_s = cut ? 0 : sw->overlap_s;
    secret_zero(sw->prev, sizeof sw->prev);
    memcpy(sw->prev, sw->cur, sw->cur_len);
    sw->prev_len = cut ? 0 : sw->cur_len;
    sw->prev_until_ms = now_ms() + (uint64_t)valid_s * 1000u;
    secret_zero(sw->cur, sizeof sw->cur);
    memcpy(sw->cur, secret, len);
    sw->cur_len = len;
    sw->cur_confirmed = 1; /* it was read twice */
    log_info("identity_header_rotated", "fp=%s bytes=%zu previous_fp=%s previous_valid_s=%u%s",
             newfp, len, oldfp, valid_s, cut ? " previous=\"cut at start-up\"" : "");
    sw->last_problem = NULL;
}

static void on_settle(uv_timer_t *t)
{
    start_read(t->data);
}

/* What one read found: n bytes in rbuf, or why (n < 0) there are none. */
static void judge(struct secret_watch *sw, ssize_t n, const char *why)
{
    size_t start = 0, len = 0;
    if (!why)
        len = config_check_secret(sw->rbuf, (size_t)n, &start, &why);
    const char *got = sw->rbuf + start;
    if (!why && len == sw->cur_len && memcmp(got, sw->cur, len) == 0) {
        drop_pending(sw); /* back to the current secret: what was pending did not last */
        sw->last_problem = NULL;
        if (!sw->cur_confirmed && sw->read_start_ms - sw->cur_seen_ms >= SECRET_SETTLE_MS) {
            sw->cur_confirmed = 1;
            log_debug("identity_header_confirmed", "path=%s", sw->qpath);
        }
        return;
    }
    if (why && same_why(why, sw->last_problem)) {
        drop_pending(sw); /* still the problem already logged */
        return;
    }
    if (!sw->pending || !same_why(why, sw->pend_why) ||
        (!why && (len != sw->pend_len || memcmp(got, sw->pend, len) != 0))) {
        drop_pending(sw);
        sw->pending = 1;
        sw->pend_why = why;
        if (!why) {
            memcpy(sw->pend, got, len);
            sw->pend_len = len;
        }
        sw->pend_seen_ms = uv_now(sw->loop);
        char bytes[32];
        log_debug("identity_header_changed", "path=%s%s%s%s%s settle_ms=%d", sw->qpath,
                  bytes_field(bytes, n), why ? " reason=\"" : "", why ? why : "", why ? "\"" : "",
                  SECRET_SETTLE_MS);
        uv_timer_start(&sw->settle, on_settle, SECRET_SETTLE_MS, 0);
        return;
    }
    /* the same again, from a read that started SECRET_SETTLE_MS after the first ended; one that
     * started sooner (a SIGHUP, the poll) does not count: the settle timer reads again */
    if (sw->read_start_ms - sw->pend_seen_ms < SECRET_SETTLE_MS)
        return;
    drop_pending(sw);
    if (why)
        problem(sw, why, n);
    else
        rotate(sw, got, len);
}

/* The read is over (n bytes, or n < 0 and why). */
static void finish(struct secret_watch *sw, ssize_t n, const char *why)
{
    sw->busy = 0;
    if (!sw->closing)
        judge(sw, n, n < 0 ? why : NULL);
    secret_zero(sw->rbuf, sizeof sw->rbuf);
    if (sw->again && !sw->closing) {
        sw->again = 0;
        start_read(sw);
        return;
    }
    maybe_free(sw);
}

static void on_close(uv_fs_t *req)
{
    struct secret_watch *sw = req->data;
    uv_fs_req_cleanup(req);
    finish(sw, sw->nread, sw->read_why);
}

static void on_read(uv_fs_t *req)
{
    struct secret_watch *sw = req->data;
    ssize_t n = req->result;
    uv_fs_req_cleanup(req);
    sw->req.data = sw;
    sw->nread = n;
    sw->read_why = "cannot be read";
    if (uv_fs_close(sw->loop, &sw->req, sw->fd, on_close) < 0)
        finish(sw, n, sw->read_why);
}

static void on_open(uv_fs_t *req)
{
    struct secret_watch *sw = req->data;
    ssize_t fd = req->result;
    uv_fs_req_cleanup(req);
    if (fd < 0) {
        finish(sw, -1, "cannot be opened");
        return;
    }
    sw->fd = (int)fd;
    sw->req.data = sw;
    uv_buf_t b = uv_buf_init(sw->rbuf, sizeof sw->rbuf);
    if (uv_fs_read(sw->loop, &sw->req, sw->fd, &b, 1, 0, on_read) < 0) {
        uv_fs_t c;
        uv_fs_close(NULL, &c, sw->fd, NULL); /* synchronous: only on a failed submit */
        uv_fs_req_cleanup(&c);
        finish(sw, -1, "cannot be read");
    }
}

static void start_read(struct secret_watch *sw)
{
    if (sw->busy) {
        sw->again = 1;
        return;
    }
    sw->busy = 1;
    sw->read_start_ms = uv_now(sw->loop);
    sw->req.data = sw;
    /* O_NONBLOCK: a FIFO put at the path would block a thread-pool thread in open() for good */
    if (uv_fs_open(sw->loop, &sw->req, sw->path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0,
                   on_open) < 0)
        finish(sw, -1, "cannot be opened");
}

static void on_timer(uv_timer_t *t)
{
    start_read(t->data);
}

struct secret_watch *secret_watch_new(uv_loop_t *loop, const char *path, const char *secret,
                                      size_t len, unsigned overlap_s)
{
    struct secret_watch *sw = xcalloc(1, sizeof *sw);
    sw->loop = loop;
    sw->path = path;
    log_quote(sw->qpath, sizeof sw->qpath, path, strlen(path));
    sw->overlap_s = overlap_s;
    memcpy(sw->cur, secret, len < CONFIG_MAX_SECRET ? len : CONFIG_MAX_SECRET);
    sw->cur_len = len < CONFIG_MAX_SECRET ? len : CONFIG_MAX_SECRET;
    uv_timer_init(loop, &sw->timer);
    uv_timer_init(loop, &sw->settle);
    sw->timer.data = sw->settle.data = sw;
    sw->handles = 2;
    uv_timer_start(&sw->timer, on_timer, SECRET_REREAD_MS, SECRET_REREAD_MS);
    uv_unref((uv_handle_t *)&sw->timer); /* never what keeps the loop running */
    uv_unref((uv_handle_t *)&sw->settle);
    sw->cur_seen_ms = uv_now(loop);
    uv_timer_start(&sw->settle, on_settle, SECRET_SETTLE_MS, 0); /* confirms the start-up value */
    return sw;
}

int secret_watch_get(const struct secret_watch *sw, struct imds_secret out[2])
{
    out[0].value = sw->cur;
    out[0].len = sw->cur_len;
    if (sw->prev_len && now_ms() < sw->prev_until_ms) {
        out[1].value = sw->prev;
        out[1].len = sw->prev_len;
        return 2;
    }
    return 1;
}

void secret_watch_reload(struct secret_watch *sw)
{
    start_read(sw);
}

static void on_timer_closed(uv_handle_t *h)
{
    struct secret_watch *sw = h->data;
    sw->handles--;
    maybe_free(sw);
}

void secret_watch_free(struct secret_watch *sw)
{
    if (!sw)
        return;
    sw->closing = 1;
    uv_close((uv_handle_t *)&sw->timer, on_timer_closed);
    uv_close((uv_handle_t *)&sw->settle, on_timer_closed);
}

/* secret_watch.c - re-reads the --identity-header-file every SECRET_REREAD_MS with libuv's
 * asynchronous file calls (the thread pool: never a blocking read on the loop). Polling instead
 * of inotify: the kubelet updates Secret volumes on its sync period (a minute or more), so five
 * seconds more cost nothing, and a poll survives every way the file can be replaced. */
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
    uv_timer_t timer;
    uv_fs_t req;
    int fd;
    int busy;                 /* a read in flight */
    int again;                /* reload() asked during a read */
    int closing;              /* secret_watch_free called */
    ssize_t nread;            /* the read's result, kept across the close */
    int handles;              /* the timer, until closed */
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

static void problem(struct secret_watch *sw, const char *why)
{
    if (sw->last_problem != why)
        log_warn("identity_header_unusable", "path=%s reason=\"%s\" action=keep_current", sw->qpath,
                 why);
    sw->last_problem = why;
}

/* The read is over (n bytes, or n < 0): take a new secret if it is one. */
static void finish(struct secret_watch *sw, ssize_t n)
{
    sw->busy = 0;
    if (!sw->closing && n >= 0) {
        size_t start;
        const char *why;
        size_t len = config_check_secret(sw->rbuf, (size_t)n, &start, &why);
        if (!len) {
            problem(sw, why);
        } else if (len != sw->cur_len || memcmp(sw->rbuf + start, sw->cur, len) != 0) {
            char oldfp[13], newfp[13];
            fingerprint(sw->cur, sw->cur_len, oldfp);
            fingerprint(sw->rbuf + start, len, newfp);
            secret_zero(sw->prev, sizeof sw->prev);
            memcpy(sw->prev, sw->cur, sw->cur_len);
            sw->prev_len = sw->cur_len;
            sw->prev_until_ms = now_ms() + (uint64_t)sw->overlap_s * 1000u;
            secret_zero(sw->cur, sizeof sw->cur);
            memcpy(sw->cur, sw->rbuf + start, len);
            sw->cur_len = len;
            log_info("identity_header_rotated", "fp=%s previous_fp=%s previous_valid_s=%u", newfp,
                     oldfp, sw->overlap_s);
            sw->last_problem = NULL;
        } else {
            sw->last_problem = NULL;
        }
    }
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
    finish(sw, sw->nread);
}

static void on_read(uv_fs_t *req)
{
    struct secret_watch *sw = req->data;
    ssize_t n = req->result;
    uv_fs_req_cleanup(req);
    if (n < 0)
        problem(sw, "cannot be read");
    sw->req.data = sw;
    sw->nread = n;
    if (uv_fs_close(sw->loop, &sw->req, sw->fd, on_close) < 0)
        finish(sw, n);
}

static void on_open(uv_fs_t *req)
{
    struct secret_watch *sw = req->data;
    ssize_t fd = req->result;
    uv_fs_req_cleanup(req);
    if (fd < 0) {
        problem(sw, "cannot be opened");
        finish(sw, -1);
        return;
    }
    sw->fd = (int)fd;
    sw->req.data = sw;
    uv_buf_t b = uv_buf_init(sw->rbuf, sizeof sw->rbuf);
    if (uv_fs_read(sw->loop, &sw->req, sw->fd, &b, 1, 0, on_read) < 0) {
        uv_fs_t c;
        uv_fs_close(NULL, &c, sw->fd, NULL); /* synchronous: only on a failed submit */
        uv_fs_req_cleanup(&c);
        finish(sw, -1);
    }
}

static void start_read(struct secret_watch *sw)
{
    if (sw->busy) {
        sw->again = 1;
        return;
    }
    sw->busy = 1;
    sw->req.data = sw;
    if (uv_fs_open(sw->loop, &sw->req, sw->path, O_RDONLY | O_CLOEXEC, 0, on_open) < 0)
        finish(sw, -1);
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
    sw->timer.data = sw;
    sw->handles = 1;
    uv_timer_start(&sw->timer, on_timer, SECRET_REREAD_MS, SECRET_REREAD_MS);
    uv_unref((uv_handle_t *)&sw->timer); /* never what keeps the loop running */
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
    sw->handles = 0;
    maybe_free(sw);
}

void secret_watch_free(struct secret_watch *sw)
{
    if (!sw)
        return;
    sw->closing = 1;
    uv_close((uv_handle_t *)&sw->timer, on_timer_closed);
}

#include "token_file.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"
#include "util.h"

#define WATCH_MAX_LEVELS 8 /* how far up to look for "..data" */

/* One read on the thread pool; owned by the token_file, or by itself once orphaned. */
struct read_job {
    uv_work_t work;
    struct token_file *tf; /* NULL once the token_file is freed */
    char *path;
    int prev_err;     /* the previous read's result (1: none yet) ... */
    char prev_fp[13]; /* ... and its content's fingerprint */
    /* results */
    int err;
    char *content;
    size_t len;
    char watch_dir[PATH_MAX];
    char watch_child[NAME_MAX + 1];
};

struct token_file {
    uv_loop_t *loop;
    const char *path;
    uv_fs_event_t event;
    uv_timer_t debounce, periodic;
    int handles_open;
    int watching;
    char watch_dir[PATH_MAX];
    char watch_child[NAME_MAX + 1];    /* the entry of watch_dir on the way to the token */
    char qpath[512], qdir[512];        /* path and watch_dir as log values (log_quote) */
    struct read_job *job;              /* in flight, or NULL */
    struct token_file_waiter *current; /* served by the read in flight */
    struct token_file_waiter *next;    /* arrived during it: served by the next read */
    struct token_file_waiter *serving; /* being called back, see serve */
    int reread;                        /* another read is wanted after the one in flight */
    struct token_file_status st;
    int last_err; /* the last read's error (0, -errno, 1: not read yet); its content is st.fp */
    int freeing;
};

static const char *const state_names[] = {"ok",      "missing",       "unreadable",
                                          "empty",   "too_large",     "malformed",
                                          "expired", "not_yet_valid", "unknown"};

const char *token_state_name(enum token_state s)
{
    return state_names[s];
}

/* Shared by the classification at read time and the re-evaluation at status time. */
static void set_expired(struct token_file_status *st, int64_t now)
{
    st->state = TOKEN_EXPIRED;
    snprintf(st->reason, sizeof st->reason, "token expired %lld s ago (exp=%lld)",
             (long long)(now - st->claims.exp), (long long)st->claims.exp);
}

void token_file_classify(int err, const char *tok, size_t len, int64_t now,
                         struct token_file_status *st)
{
    memset(st, 0, sizeof *st);
    st->len = len;
    if (err == -ENOENT || err == -ENOTDIR) {
        st->state = TOKEN_MISSING;
        snprintf(st->reason, sizeof st->reason, "token file does not exist");
        return;
    }
    if (err == -EFBIG) {
        st->state = TOKEN_TOO_LARGE;
        snprintf(st->reason, sizeof st->reason, "token file is larger than %d bytes",
                 TOKEN_FILE_MAX_BYTES);
        return;
    }
    if (err == -ENODATA) {
        st->state = TOKEN_EMPTY;
        snprintf(st->reason, sizeof st->reason, "token file is empty");
        return;
    }
    if (err < 0) {
        st->state = TOKEN_UNREADABLE;
        snprintf(st->reason, sizeof st->reason, "token file cannot be read: %s",
                 err == -EISDIR ? "it is not a regular file" : strerror(-err));
        return;
    }
    fingerprint(tok, len, st->fp);
    int jerr = jwt_decode(tok, len, &st->claims);
    if (jerr != JWT_OK) {
        st->state = TOKEN_MALFORMED;
        snprintf(st->reason, sizeof st->reason, "token is not a usable JWT: %s",
                 jwt_strerror(jerr));
        return;
    }
    if (now >= st->claims.exp) {
        set_expired(st, now);
        return;
    }
    if (st->claims.nbf && st->claims.nbf > now + TOKEN_FILE_NBF_LEEWAY_S) {
        st->state = TOKEN_NOT_YET_VALID;
        snprintf(st->reason, sizeof st->reason, "token is not valid before nbf=%lld (in %lld s)",
                 (long long)st->claims.nbf, (long long)(st->claims.nbf - now));
        return;
    }
    st->state = TOKEN_OK;
    snprintf(st->reason, sizeof st->reason, "token expires in %lld s",
             (long long)(st->claims.exp - now));
}

/* ---- on the thread pool -------------------------------------------------------------------- */

/* The directory to watch: the first ancestor holding "..data" (the kubelet's volume root), else
 * the file's directory, else the nearest ancestor that exists. Returns 1 for the first. */
static int find_watch_dir(const char *path, char *out)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash) {
        strcpy(out, ".");
        return 0;
    }
    *slash = 0;
    if (!dir[0])
        strcpy(dir, "/");
    char first[PATH_MAX], probe[PATH_MAX + 8];
    snprintf(first, sizeof first, "%s", dir);
    for (int level = 0; level < WATCH_MAX_LEVELS; level++) {
        struct stat sb;
        snprintf(probe, sizeof probe, "%s/..data", dir);
        if (lstat(probe, &sb) == 0 && S_ISLNK(sb.st_mode)) {
            snprintf(out, PATH_MAX, "%s", dir);
            return 1;
        }
        char *s = strrchr(dir, '/');
        if (!s || s == dir)
            break;
        *s = 0;
    }
    snprintf(dir, sizeof dir, "%s", first);
    for (;;) {
        struct stat sb;
        if (stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            snprintf(out, PATH_MAX, "%s", dir);
            return 0;
        }
        char *s = strrchr(dir, '/');
        if (!s || s == dir) {
            strcpy(out, "/");
            return 0;
        }
        *s = 0;
    }
}

/* The entry of dir that leads to path: only events on it (or on "..data") matter. Other
 * entries of an ancestor directory, such as log files, are none of our business. */
static void first_component(const char *path, const char *dir, char *out)
{
    size_t n = strlen(dir);
    const char *rel = strcmp(dir, "/") == 0 ? path + 1 : path + n + 1;
    if (strncmp(path, dir, n) != 0 || strlen(path) <= n) {
        out[0] = 0;
        return;
    }
    size_t k = strcspn(rel, "/");
    if (k > NAME_MAX)
        k = NAME_MAX;
    memcpy(out, rel, k);
    out[k] = 0;
}

/* One read of path: *err 0 and the trimmed content (NUL-terminated, malloc'd) in *content, or
 * *err < 0 and *content NULL. */
static void read_once(const char *path, int *err, char **content, size_t *clen)
{
    *err = 0;
    *content = NULL;
    *clen = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        *err = -errno;
        return;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        *err = -EISDIR;
        close(fd);
        return;
    }
    char *buf = xmalloc(TOKEN_FILE_MAX_BYTES + 1);
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, TOKEN_FILE_MAX_BYTES + 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            *err = n < 0 ? -errno : 0;
            break;
        }
        len += (size_t)n;
        if (len > TOKEN_FILE_MAX_BYTES) {
            *err = -EFBIG;
            break;
        }
    }
    close(fd);
    size_t start = 0;
    while (start < len && strchr(" \t\r\n", buf[start]))
        start++;
    while (len > start && strchr(" \t\r\n", buf[len - 1]))
        len--;
    if (!*err && len == start)
        *err = -ENODATA;
    if (*err) {
        secret_zero(buf, TOKEN_FILE_MAX_BYTES + 1);
        free(buf);
        return;
    }
    memmove(buf, buf + start, len - start);
    *clen = len - start;
    secret_zero(buf + *clen, len - *clen); /* the tail the move left behind */
    buf[*clen] = 0;
    *content = buf;
    secret_zero_registers(); /* the move's */
}

static void free_content(char *content, size_t len)
{
    if (content) {
        secret_zero(content, len);
        free(content);
    }
}

/* Whether the job's read differs from err/content/len (or, fp non-NULL, from the content whose
 * fingerprint is fp). */
static int read_differs(const struct read_job *j, int err, const char *content, size_t len,
                        const char *fp)
{
    if (j->err != err)
        return 1;
    if (j->err)
        return 0;
    if (fp) {
        char mine[13];
        fingerprint(j->content, j->len, mine);
        return strcmp(mine, fp) != 0;
    }
    return j->len != len || memcmp(j->content, content, len) != 0;
}

static void read_settled(struct read_job *j)
{
    int atomic = find_watch_dir(j->path, j->watch_dir);
    first_component(j->path, j->watch_dir, j->watch_child);
    read_once(j->path, &j->err, &j->content, &j->len);
    /* A file rewritten in place (truncated, then written) can be read in between: empty, or a JWT
     * cut in its signature that still decodes and that Entra rejects as a permanent error (held
     * PERMANENT_ERROR_HOLD_MS). So a read that differs from the previous one counts once a read
     * TOKEN_FILE_SETTLE_MS later finds the same (a few times at most, then the last read counts).
     * The kubelet's ..data swap is atomic: no wait there. */
    if (atomic || !read_differs(j, j->prev_err, NULL, 0, j->prev_fp))
        return;
    for (int i = 0; i < TOKEN_FILE_SETTLE_TRIES; i++) {
        int err;
        char *content;
        size_t len;
        usleep(TOKEN_FILE_SETTLE_MS * 1000);
        read_once(j->path, &err, &content, &len);
        int same = !read_differs(j, err, content, len, NULL);
        free_content(j->content, j->len);
        j->err = err;
        j->content = content;
        j->len = len;
        if (same)
            return;
    }
}

static void read_work(uv_work_t *w)
{
    read_settled(w->data);
    secret_zero_registers(); /* the comparisons' */
}

static void job_free(struct read_job *j)
{
    free_content(j->content, j->len);
    free(j->path);
    free(j);
}

/* ---- on the loop ----------------------------------------------------------------------------- */

static void start_read(struct token_file *tf);
static void on_fs_event(uv_fs_event_t *h, const char *name, int events, int status);

/* Returns 1 when it started watching a directory it was not watching before. */
static int set_watch(struct token_file *tf, const char *dir, const char *child)
{
    snprintf(tf->watch_child, sizeof tf->watch_child, "%s", child);
    if (tf->watching && strcmp(dir, tf->watch_dir) == 0)
        return 0;
    if (tf->watching)
        uv_fs_event_stop(&tf->event);
    tf->watching = 0;
    snprintf(tf->watch_dir, sizeof tf->watch_dir, "%s", dir);
    log_quote(tf->qdir, sizeof tf->qdir, dir, strlen(dir));
    int rc = uv_fs_event_start(&tf->event, on_fs_event, tf->watch_dir, 0);
    if (rc < 0) {
        log_warn("token_file_watch_failed", "dir=%s error=\"%s\" fallback_reread_s=%d", tf->qdir,
                 uv_strerror(rc), TOKEN_FILE_REREAD_MS / 1000);
        return 0;
    }
    tf->watching = 1;
    log_info("token_file_watch", "dir=%s path=%s", tf->qdir, tf->qpath);
    return 1;
}

static void log_status(struct token_file *tf, const struct token_file_status *old)
{
    const struct token_file_status *st = &tf->st;
    if (st->state != old->state) {
        char reason[260];
        log_quote(reason, sizeof reason, st->reason, strlen(st->reason));
        if (st->state == TOKEN_OK)
            log_info("token_file_state", "state=ok path=%s reason=%s", tf->qpath, reason);
        else
            log_warn("token_file_state", "state=%s path=%s reason=%s", token_state_name(st->state),
                     tf->qpath, reason);
    }
    if (st->state == TOKEN_OK && strcmp(st->fp, old->fp) != 0) {
        char sub[JWT_CLAIM_MAX + 8], iss[JWT_CLAIM_MAX + 8];
        metrics.token_file_loads++;
        log_info("token_file_loaded", "path=%s bytes=%zu fp=%s sub=%s iss=%s exp=%lld", tf->qpath,
                 st->len, st->fp,
                 log_quote(sub, sizeof sub, st->claims.sub, strlen(st->claims.sub)),
                 log_quote(iss, sizeof iss, st->claims.iss, strlen(st->claims.iss)),
                 (long long)st->claims.exp);
    }
}

/* Calls back the waiters of list. They wait on tf->serving meanwhile, where a callback may cancel
 * one that is still due (or add new ones to tf->next). */
static void serve(struct token_file *tf, struct token_file_waiter *list,
                  const struct token_file_status *st, const char *tok, size_t len)
{
    struct token_file_waiter *w;
    tf->serving = list;
    while ((w = tf->serving)) {
        assert(w->linked); /* called back once: unlinked from here on */
        tf->serving = w->next;
        if (w->next)
            w->next->prev = NULL;
        w->linked = 0;
        w->prev = w->next = NULL;
        w->cb(w->arg, st, st->state == TOKEN_OK ? tok : NULL, st->state == TOKEN_OK ? len : 0);
    }
}

static void read_done(uv_work_t *w, int status)
{
    struct read_job *j = w->data;
    struct token_file *tf = j->tf;
    if (!tf) { /* the token_file was freed meanwhile */
        job_free(j);
        secret_zero_registers();
        return;
    }
    tf->job = NULL;
    struct token_file_status old = tf->st;
    tf->last_err = status < 0 ? status : j->err;
    token_file_classify(tf->last_err, j->content, j->len, now_epoch(), &tf->st);
    log_status(tf, &old);
    /* a change between this read and a new watch would go unseen until the periodic re-read */
    if (set_watch(tf, j->watch_dir, j->watch_child))
        tf->reread = 1;
    struct token_file_waiter *batch = tf->current;
    tf->current = NULL;
    if (tf->next || tf->reread) {
        tf->reread = 0;
        start_read(tf); /* moves tf->next to tf->current */
    }
    /* a copy: a callback may start the next read, whose result replaces tf->st */
    struct token_file_status st = tf->st;
    serve(tf, batch, &st, j->content, j->len);
    job_free(j);
    /* the token went through them: its parsing, and a waiter's exchange (form, request, record) */
    secret_zero_registers();
}

static void start_read(struct token_file *tf)
{
    if (tf->job) {
        tf->reread = 1;
        return;
    }
    struct read_job *j = xcalloc(1, sizeof *j);
    j->tf = tf;
    j->path = xstrdup(tf->path);
    j->prev_err = tf->last_err;
    memcpy(j->prev_fp, tf->st.fp, sizeof j->prev_fp);
    j->work.data = j;
    tf->current = tf->next;
    tf->next = NULL;
    for (struct token_file_waiter *w = tf->current; w; w = w->next)
        w->linked = 1;
    /* fails only for a NULL work callback: a waiter is never called back before get returns */
    if (uv_queue_work(tf->loop, &j->work, read_work, read_done) < 0)
        abort();
    tf->job = j;
}

static void on_debounce(uv_timer_t *t)
{
    start_read(t->data);
}

static void on_fs_event(uv_fs_event_t *h, const char *name, int events, int status)
{
    (void)events;
    struct token_file *tf = h->data;
    if (status < 0)
        log_warn("token_file_watch_error", "dir=%s error=\"%s\"", tf->qdir, uv_strerror(status));
    else if (name && tf->watch_child[0] && strcmp(name, tf->watch_child) != 0 &&
             strcmp(name, "..data") != 0)
        return;
    log_debug("token_file_event", "dir=%s name=%s", tf->qdir, name ? name : "-");
    /* a pending re-read already covers this event; restarting would let a busy directory
     * postpone it forever */
    if (!uv_is_active((uv_handle_t *)&tf->debounce))
        uv_timer_start(&tf->debounce, on_debounce, TOKEN_FILE_DEBOUNCE_MS, 0);
}

static void on_periodic(uv_timer_t *t)
{
    start_read(t->data);
}

struct token_file *token_file_new(uv_loop_t *loop, const char *path)
{
    struct token_file *tf = xcalloc(1, sizeof *tf);
    tf->loop = loop;
    tf->path = path;
    log_quote(tf->qpath, sizeof tf->qpath, path, strlen(path));
    tf->st.state = TOKEN_UNKNOWN;
    tf->last_err = 1;
    snprintf(tf->st.reason, sizeof tf->st.reason, "token file not read yet");
    uv_fs_event_init(loop, &tf->event);
    uv_timer_init(loop, &tf->debounce);
    uv_timer_init(loop, &tf->periodic);
    tf->event.data = tf->debounce.data = tf->periodic.data = tf;
    tf->handles_open = 3;
    uv_timer_start(&tf->periodic, on_periodic, TOKEN_FILE_REREAD_MS, TOKEN_FILE_REREAD_MS);
    start_read(tf);
    return tf;
}

void token_file_status(struct token_file *tf, int64_t now, struct token_file_status *out)
{
    *out = tf->st;
    if (out->state == TOKEN_OK && now >= out->claims.exp)
        set_expired(out, now);
}

void token_file_get(struct token_file *tf, struct token_file_waiter *w)
{
    if (w->linked)
        return; /* already waiting: a second link would corrupt the lists */
    w->tf = tf;
    w->prev = NULL;
    w->next = tf->next;
    if (tf->next)
        tf->next->prev = w;
    tf->next = w;
    w->linked = 1;
    start_read(tf);
}

void token_file_cancel(struct token_file_waiter *w)
{
    if (!w->linked)
        return;
    struct token_file *tf = w->tf;
    if (w->prev)
        w->prev->next = w->next;
    else if (tf->serving == w)
        tf->serving = w->next;
    else if (tf->current == w)
        tf->current = w->next;
    else
        tf->next = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->linked = 0;
    w->prev = w->next = NULL;
}

void token_file_reload(struct token_file *tf)
{
    log_info("token_file_reload", "path=%s", tf->qpath);
    start_read(tf);
}

static void on_closed(uv_handle_t *h)
{
    struct token_file *tf = h->data;
    if (--tf->handles_open == 0)
        free(tf);
}

void token_file_free(struct token_file *tf)
{
    if (!tf)
        return;
    if (tf->job)
        tf->job->tf = NULL; /* it frees itself when the thread pool is done with it */
    struct token_file_status st;
    memset(&st, 0, sizeof st);
    st.state = TOKEN_UNREADABLE;
    snprintf(st.reason, sizeof st.reason, "imdsd is shutting down");
    struct token_file_waiter *a = tf->current, *b = tf->next;
    tf->current = tf->next = NULL;
    serve(tf, a, &st, NULL, 0);
    serve(tf, b, &st, NULL, 0);
    uv_close((uv_handle_t *)&tf->event, on_closed);
    uv_close((uv_handle_t *)&tf->debounce, on_closed);
    uv_close((uv_handle_t *)&tf->periodic, on_closed);
}

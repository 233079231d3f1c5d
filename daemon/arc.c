/* arc.c - key files for the Azure Arc challenge. Creating a file is file-system I/O, so it runs
 * on libuv's thread pool; removing one uses uv_fs_unlink. Keys live in memory (ARC_MAX_KEYS at
 * most, each used once and for ARC_KEY_TTL_MS at most) and on disk under names that carry this
 * instance's random id, next to a lock file it holds while it lives, so that a restarted imdsd
 * removes what a dead one left and never what a live one sharing the directory made. */
#include "arc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "imds.h"
#include "log.h"
#include "metrics.h"
#include "util.h"

/* a key file's name: imdsd-ID-RANDOM.key */
#define KEY_NAME_MAX (sizeof "imdsd--.key" + ARC_ID_HEX + 16)

struct arc_key {
    char name[KEY_NAME_MAX]; /* in the directory (not the path: the 256 slots take 32 KiB) */
    char key[ARC_KEY_HEX + 1];
    uint64_t expires_ms; /* monotonic: a wall clock stepped back must not extend a key */
    int live;
};

struct arc {
    uv_loop_t *loop;
    char dir[PATH_MAX - 64];
    gid_t gid;               /* the key files' group: --arc-key-group, else the process's */
    char id[ARC_ID_HEX + 1]; /* this instance, in every file name it makes */
    int lock_fd;             /* imdsd-ID.lock, flock()ed while this instance lives */
    struct arc_key keys[ARC_MAX_KEYS];
    unsigned making;      /* challenges admitted whose key is not made yet: they hold a slot */
    uint64_t second_ms;   /* when the current second of ARC_MAX_PER_S began (monotonic) */
    unsigned this_second; /* challenges admitted in it */
    uv_timer_t sweep;
    int closing, pending; /* challenges and unlinks in flight */
};

struct arc_challenge {
    uv_work_t work;
    struct arc *arc;
    arc_done_cb *done;
    void *arg;
    int canceled, failed;
    char path[PATH_MAX];
    char key[ARC_KEY_HEX + 1];
};

static void lock_path(char *out, size_t n, const char *dir, const char *id)
{
    snprintf(out, n, "%s/imdsd-%s.lock", dir, id);
}

/* after arc_free: once the timer has closed and nothing is in flight */
static void maybe_free(struct arc *a)
{
    if (a->closing == 2 && a->pending == 0) {
        /* the lock goes last: until every key file is gone, they are a live instance's */
        char p[PATH_MAX];
        lock_path(p, sizeof p, a->dir, a->id);
        unlink(p);
        close(a->lock_fd);
        secret_zero(a, sizeof *a);
        free(a);
    }
}

static void on_unlinked(uv_fs_t *req)
{
    struct arc *a = req->data;
    uv_fs_req_cleanup(req);
    free(req);
    a->pending--;
    maybe_free(a);
}

/* Removes a key file without blocking the loop. */
static void remove_file(struct arc *a, const char *path)
{
    uv_fs_t *req = xcalloc(1, sizeof *req);
    req->data = a;
    a->pending++;
    if (uv_fs_unlink(a->loop, req, path, on_unlinked) < 0) {
        free(req);
        a->pending--;
    }
}

/* Forgets a key and removes its file. */
static void drop(struct arc *a, struct arc_key *k)
{
    if (!k->live)
        return;
    k->live = 0;
    secret_zero(k->key, sizeof k->key);
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/%s", a->dir, k->name);
    remove_file(a, p);
}

static void on_sweep(uv_timer_t *t)
{
    struct arc *a = t->data;
    uint64_t now = now_ms();
    for (unsigned i = 0; i < ARC_MAX_KEYS; i++)
        if (a->keys[i].live && now >= a->keys[i].expires_ms)
            drop(a, &a->keys[i]);
}

/* ---- instances: whose key files a starting imdsd may remove --------------------------------- */

/* A pid cannot tell instances apart (two containers sharing the directory are both pid 1, and a
 * pid is reused), and a process that died by SIGKILL removed nothing. So each instance holds an
 * flock() on imdsd-ID.lock, which the kernel drops however it ends, and names its key files
 * imdsd-ID-RANDOM.key: a key file is a dead instance's when its lock is absent or can be taken. */

/* 'k' for a key file name imdsd-ID-*.key, 'l' for a lock imdsd-ID.lock (ID: 1 to ARC_ID_HEX hex
 * digits, copied to id; an older imdsd's pid reads as one), 0 for any other name. */
static int parse_name(const char *name, char id[ARC_ID_HEX + 1])
{
    if (strncmp(name, "imdsd-", 6) != 0)
        return 0;
    const char *p = name + 6;
    size_t n = strspn(p, "0123456789abcdef");
    if (n == 0 || n > ARC_ID_HEX)
        return 0;
    memcpy(id, p, n);
    id[n] = 0;
    p += n;
    size_t len = strlen(p);
    if (strcmp(p, ".lock") == 0)
        return 'l';
    return p[0] == '-' && len > 5 && strcmp(p + len - 4, ".key") == 0 ? 'k' : 0;
}

struct verdict {
    char id[ARC_ID_HEX + 1];
    int live;
    int fd; /* a dead instance's lock file, held until its key files are gone; else -1 */
};

/* Whether instance id is alive: its lock file exists and someone holds its flock, or it cannot be
 * opened to tell (another user's): its files are then left alone. */
static int instance_live(const char *dir, const char *id, int *fd)
{
    char p[PATH_MAX];
    lock_path(p, sizeof p, dir, id);
    *fd = open(p, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (*fd < 0)
        return errno != ENOENT; /* no lock: it died before or after it had one (or is older) */
    if (flock(*fd, LOCK_EX | LOCK_NB) == 0)
        return 0;
    close(*fd);
    *fd = -1;
    return 1;
}

/* Removes the key files and the lock files of instances that are gone (a crash, a kill -9). */
static void remove_stale(struct arc *a)
{
    DIR *d = opendir(a->dir);
    if (!d)
        return;
    struct verdict *v = NULL;
    size_t nv = 0, cap = 0;
    struct dirent *e;
    char p[PATH_MAX];
    while ((e = readdir(d))) {
        char id[ARC_ID_HEX + 1];
        int kind = parse_name(e->d_name, id);
        if (!kind || strcmp(id, a->id) == 0)
            continue;
        size_t i = 0;
        while (i < nv && strcmp(v[i].id, id) != 0)
            i++;
        if (i == nv) { /* asked once per instance, when its first file turns up */
            if (nv == cap)
                v = xrealloc(v, (cap = cap ? 2 * cap : 8) * sizeof *v);
            snprintf(v[i].id, sizeof v[i].id, "%s", id);
            v[i].live = instance_live(a->dir, id, &v[i].fd);
            nv++;
        }
        if (kind == 'k' && !v[i].live)
            unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
    /* the dead instances' locks last: should this process die meanwhile, the next start still
     * finds what is left */
    for (size_t i = 0; i < nv; i++) {
        if (v[i].fd < 0)
            continue;
        lock_path(p, sizeof p, a->dir, v[i].id);
        unlink(p);
        close(v[i].fd);
    }
    free(v);
}

/* A new random id and its lock file, created and flock()ed. A starting imdsd that opens the file
 * between the two takes the lock, reads the instance as dead and removes the file: the lock then
 * fails, or holds a file that no longer has the name, and a new id is tried. */
static int take_id(struct arc *a, char *err, size_t errlen)
{
    char p[PATH_MAX];
    for (int tries = 0; tries < 5; tries++) {
        unsigned char rnd[ARC_ID_HEX / 2];
        if (uv_random(NULL, NULL, rnd, sizeof rnd, 0, NULL) < 0)
            break;
        for (int i = 0; i < ARC_ID_HEX / 2; i++)
            snprintf(a->id + 2 * i, 3, "%02x", rnd[i]);
        lock_path(p, sizeof p, a->dir, a->id);
        int fd = open(p, O_RDONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) {
            if (errno == EEXIST)
                continue;
            snprintf(err, errlen, "--arc-key-dir: '%s': cannot create a lock file: %s", a->dir,
                     strerror(errno));
            return -1;
        }
        struct stat mine, named;
        if (flock(fd, LOCK_EX | LOCK_NB) == 0 && fstat(fd, &mine) == 0 && stat(p, &named) == 0 &&
            mine.st_dev == named.st_dev && mine.st_ino == named.st_ino) {
            a->lock_fd = fd;
            return 0;
        }
        close(fd);
    }
    snprintf(err, errlen, "--arc-key-dir: '%s': cannot take a lock file", a->dir);
    return -1;
}

struct arc *arc_new(uv_loop_t *loop, const char *dir, gid_t gid, char *err, size_t errlen)
{
    struct stat st;
    if (strlen(dir) >= sizeof((struct arc *)0)->dir || dir[0] != '/') {
        snprintf(err, errlen, "--arc-key-dir: '%s' is not an absolute path", dir);
        return NULL;
    }
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "--arc-key-dir: '%s' is not a directory", dir);
        return NULL;
    }
    /* Whoever may write the directory may unlink or replace key files, and its owner may chmod
     * it: only root and imdsd's own user and group may (a sticky bit does not stop a writer from
     * planting names). */
    if (st.st_uid != 0 && st.st_uid != geteuid()) {
        snprintf(err, errlen,
                 "--arc-key-dir: '%s' is owned by uid %u: it must be root's or imdsd's (uid %u)",
                 dir, (unsigned)st.st_uid, (unsigned)geteuid());
        return NULL;
    }
    if ((st.st_mode & S_IWOTH) || ((st.st_mode & S_IWGRP) && st.st_gid != getegid())) {
        snprintf(err, errlen,
                 "--arc-key-dir: '%s' (mode %04o, gid %u) is writable by other users: make it 0755 "
                 "or 0750",
                 dir, (unsigned)(st.st_mode & 07777), (unsigned)st.st_gid);
        return NULL;
    }
    if (access(dir, W_OK | X_OK) < 0) {
        snprintf(err, errlen, "--arc-key-dir: '%s' is not writable: %s", dir, strerror(errno));
        return NULL;
    }
    struct arc *a = xcalloc(1, sizeof *a);
    a->loop = loop;
    snprintf(a->dir, sizeof a->dir, "%s", dir);
    /* always set: a setgid directory would otherwise give its own group read access */
    a->gid = gid != (gid_t)-1 ? gid : getegid();
    if (take_id(a, err, errlen) < 0) {
        free(a);
        return NULL;
    }
    remove_stale(a); /* at start-up, before the loop runs; ours are live from now on */
    uv_timer_init(loop, &a->sweep);
    a->sweep.data = a;
    uv_timer_start(&a->sweep, on_sweep, 1000, 1000);
    uv_unref((uv_handle_t *)&a->sweep);
    return a;
}

/* ---- a challenge: the file is made on the thread pool ---------------------------------------- */

static void make_key(uv_work_t *w)
{
    struct arc_challenge *ch = w->data;
    int fd = open(ch->path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd < 0) {
        ch->failed = errno;
        return;
    }
    /* the mode again (the umask may have taken bits), then the group that may read it: set
     * even when it is ours, since a setgid directory gives new files the directory's group */
    if (fchmod(fd, 0640) < 0 || fchown(fd, (uid_t)-1, ch->arc->gid) < 0 ||
        write(fd, ch->key, ARC_KEY_HEX) != ARC_KEY_HEX) {
        ch->failed = errno ? errno : EIO;
        close(fd);
        unlink(ch->path);
        return;
    }
    if (close(fd) < 0) {
        ch->failed = errno;
        unlink(ch->path);
    }
}

static void made_key(uv_work_t *w, int status)
{
    struct arc_challenge *ch = w->data;
    struct arc *a = ch->arc;
    a->pending--;
    a->making--;
    if (status < 0 && !ch->failed)
        ch->failed = ECANCELED;
    if (!ch->failed && (ch->canceled || a->closing)) {
        remove_file(a, ch->path); /* nobody will read it: the client went away meanwhile */
        ch->failed = ECANCELED;
    }
    struct arc_key *k = NULL;
    for (unsigned i = 0; !ch->failed && !k && i < ARC_MAX_KEYS; i++)
        if (!a->keys[i].live)
            k = &a->keys[i]; /* there is one: admit counted this key in making */
    if (!ch->failed && !k) {
        remove_file(a, ch->path);
        ch->failed = ENOSPC;
    }
    if (!ch->failed) {
        snprintf(k->name, sizeof k->name, "%s", ch->path + strlen(a->dir) + 1);
        memcpy(k->key, ch->key, sizeof k->key);
        k->expires_ms = now_ms() + ARC_KEY_TTL_MS;
        k->live = 1;
    } else if (ch->failed != ECANCELED) {
        log_warn("arc_key_failed", "dir=%s error=\"%s\"", a->dir, strerror(ch->failed));
    }
    if (!ch->canceled)
        ch->done(ch->arg, ch->failed ? NULL : ch->path);
    secret_zero(ch->key, sizeof ch->key);
    free(ch);
    maybe_free(a);
}

/* Whether a new challenge may have a key: a slot (ARC_MAX_KEYS count the live keys and the keys
 * being made; expired ones are dropped here) and room in this second's ARC_MAX_PER_S. Refused
 * before any allocation or file: a flood costs a scan of the slots per request, and it can never
 * push out a key that a slower client is about to read. */
static int admit(struct arc *a)
{
    uint64_t now = now_ms();
    if (now - a->second_ms >= 1000) {
        a->second_ms = now;
        a->this_second = 0;
    }
    unsigned live = 0;
    for (unsigned i = 0; i < ARC_MAX_KEYS; i++) {
        struct arc_key *k = &a->keys[i];
        if (k->live && now >= k->expires_ms)
            drop(a, k);
        live += k->live;
    }
    const char *why = live + a->making >= ARC_MAX_KEYS  ? "max_keys"
                      : a->this_second >= ARC_MAX_PER_S ? "max_per_second"
                                                        : NULL;
    if (!why) {
        a->this_second++;
        return 1;
    }
    if (log_sampled(&metrics.arc_challenges_refused))
        log_warn("arc_challenge_refused", "reason=%s live=%u making=%u refused_total=%llu", why,
                 live, a->making, (unsigned long long)metrics.arc_challenges_refused);
    return 0;
}

struct arc_challenge *arc_challenge(struct arc *a, arc_done_cb *done, void *arg, int *refused)
{
    *refused = !admit(a);
    if (*refused)
        return NULL;
    struct arc_challenge *ch = xcalloc(1, sizeof *ch);
    unsigned char rnd[ARC_KEY_HEX / 2 + 8];
    ch->arc = a;
    ch->done = done;
    ch->arg = arg;
    ch->work.data = ch;
    if (uv_random(NULL, NULL, rnd, sizeof rnd, 0, NULL) < 0) {
        ch->failed = EIO;
    } else {
        for (int i = 0; i < ARC_KEY_HEX / 2; i++)
            snprintf(ch->key + 2 * i, 3, "%02x", rnd[i]);
        snprintf(ch->path, sizeof ch->path, "%s/imdsd-%s-%02x%02x%02x%02x%02x%02x%02x%02x.key",
                 a->dir, a->id, rnd[32], rnd[33], rnd[34], rnd[35], rnd[36], rnd[37], rnd[38],
                 rnd[39]);
    }
    secret_zero(rnd, sizeof rnd);
    a->pending++;
    a->making++;
    if (ch->failed || uv_queue_work(a->loop, &ch->work, make_key, made_key) < 0) {
        ch->failed = ch->failed ? ch->failed : EAGAIN;
        ch->canceled = 1; /* the caller answers at once: no callback */
        made_key(&ch->work, 0);
        return NULL;
    }
    return ch;
}

void arc_cancel(struct arc_challenge *ch)
{
    if (ch)
        ch->canceled = 1;
}

int arc_verify(struct arc *a, const char *auth, size_t len)
{
    static const char basic[] = "Basic ";
    if (len < sizeof basic - 1 || strncasecmp(auth, basic, sizeof basic - 1) != 0)
        return 0;
    const char *v = auth + sizeof basic - 1;
    size_t vlen = len - (sizeof basic - 1);
    uint64_t now = now_ms();
    struct arc_key *hit = NULL;
    for (unsigned i = 0; i < ARC_MAX_KEYS; i++) { /* all compared: time tells nothing */
        struct arc_key *k = &a->keys[i];
        int eq = imds_secret_equal(v, vlen, k->key, ARC_KEY_HEX);
        if (eq && k->live && now < k->expires_ms)
            hit = k;
    }
    if (hit)
        drop(a, hit); /* used once */
    return hit != NULL;
}

static void on_sweep_closed(uv_handle_t *h)
{
    struct arc *a = h->data;
    a->closing = 2;
    maybe_free(a);
}

void arc_free(struct arc *a)
{
    if (!a)
        return;
    for (unsigned i = 0; i < ARC_MAX_KEYS; i++)
        drop(a, &a->keys[i]);
    a->closing = 1;
    uv_close((uv_handle_t *)&a->sweep, on_sweep_closed);
}

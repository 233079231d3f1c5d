/* arc.c - key files for the Azure Arc challenge. Creating a file is file-system I/O, so it runs
 * on libuv's thread pool; removing one uses uv_fs_unlink. Keys live in memory (ARC_MAX_KEYS at
 * most, each used once and for ARC_KEY_TTL_MS at most) and on disk under names that carry this
 * instance's random id, next to a lock file it holds while it lives, so that a restarted imdsd
 * removes what a dead one left and never what a live one sharing the directory made. */
#include "arc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
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
    uid_t uid;           /* whose challenge it answers (arc_peer_uid) */
    unsigned char live;
    unsigned char making; /* the slot is held for a challenge whose file is being made */
};
_Static_assert(sizeof(struct arc_key) <= 128, "the slots' size in the comment above");

struct arc {
    uv_loop_t *loop;
    char dir[PATH_MAX - 64];
    gid_t gid;               /* the key files' group: --arc-key-group, else the process's */
    char id[ARC_ID_HEX + 1]; /* this instance, in every file name it makes */
    int lock_fd;             /* imdsd-ID.lock, flock()ed while this instance lives */
    struct arc_key keys[ARC_MAX_KEYS];
    uint64_t second_ms;   /* when the current second of ARC_MAX_PER_S began (monotonic) */
    unsigned this_second; /* challenges admitted in it */
    uv_timer_t sweep;
    int closing, pending; /* challenges and unlinks in flight */
    int diag_fd;          /* NETLINK_SOCK_DIAG, for arc_peer_uid; -1: no per-user quota */
    uint32_t diag_seq;
};

struct arc_challenge {
    uv_work_t work;
    struct arc *arc;
    struct arc_key *slot; /* held (making) since admission */
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
        if (a->diag_fd >= 0)
            close(a->diag_fd);
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
        hex_encode(rnd, sizeof rnd, a->id);
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
    /* non-blocking: arc_peer_uid reads the answer the kernel queued within the send, or none */
    a->diag_fd = socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (a->diag_fd < 0)
        log_warn("arc_peer_uid_unavailable", "error=\"%s\" per_user_share=off",
                 strerror(errno)); /* the bounds for all users together stay */
    uv_timer_init(loop, &a->sweep);
    a->sweep.data = a;
    uv_timer_start(&a->sweep, on_sweep, 1000, 1000);
    uv_unref((uv_handle_t *)&a->sweep);
    return a;
}

/* ---- whose challenge: the owner of the peer's socket ----------------------------------------- */

/* The address and port (network order) of an AF_INET or AF_INET6 sockaddr, as inet_diag wants
 * them: 4 words, an IPv4 address in the first. */
static int diag_addr(const struct sockaddr_storage *ss, uint32_t addr[4], uint16_t *port)
{
    memset(addr, 0, 4 * sizeof *addr);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        memcpy(addr, &in->sin_addr, sizeof in->sin_addr);
        *port = in->sin_port;
        return 0;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        memcpy(addr, &in6->sin6_addr, sizeof in6->sin6_addr);
        *port = in6->sin6_port;
        return 0;
    }
    return -1;
}

/* An IPv4 client of a dual-stack listener (a socket systemd passed, [::]:port) shows as
 * ::ffff:a.b.c.d: its socket is an AF_INET one, which the kernel reports in IPv4's form. */
static void unmap_v4(struct sockaddr_storage *ss)
{
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
    if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
        return;
    struct sockaddr_in in;
    memset(&in, 0, sizeof in);
    in.sin_family = AF_INET;
    in.sin_port = in6->sin6_port;
    memcpy(&in.sin_addr, &in6->sin6_addr.s6_addr[12], sizeof in.sin_addr);
    memcpy(ss, &in, sizeof in);
}

uid_t arc_peer_uid(struct arc *a, int fd)
{
    struct sockaddr_storage mine, peer;
    socklen_t mlen = sizeof mine, plen = sizeof peer;
    if (a->diag_fd < 0 || getsockname(fd, (struct sockaddr *)&mine, &mlen) < 0 ||
        getpeername(fd, (struct sockaddr *)&peer, &plen) < 0)
        return ARC_UID_UNKNOWN;
    unmap_v4(&mine);
    unmap_v4(&peer);
    if (mine.ss_family != peer.ss_family)
        return ARC_UID_UNKNOWN;
    /* the peer's socket: its source is our remote end, its destination our local one */
    struct {
        struct nlmsghdr nh;
        struct inet_diag_req_v2 r;
    } q;
    memset(&q, 0, sizeof q);
    q.nh.nlmsg_len = sizeof q;
    q.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    q.nh.nlmsg_flags = NLM_F_REQUEST; /* no NLM_F_DUMP: the one socket with this exact tuple */
    q.nh.nlmsg_seq = ++a->diag_seq;
    q.r.sdiag_family = (uint8_t)peer.ss_family;
    q.r.sdiag_protocol = IPPROTO_TCP;
    q.r.idiag_states = ~0u;
    q.r.id.idiag_cookie[0] = q.r.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
    if (diag_addr(&peer, q.r.id.idiag_src, &q.r.id.idiag_sport) < 0 ||
        diag_addr(&mine, q.r.id.idiag_dst, &q.r.id.idiag_dport) < 0)
        return ARC_UID_UNKNOWN;
    if (send(a->diag_fd, &q, sizeof q, MSG_DONTWAIT) != (ssize_t)sizeof q)
        return ARC_UID_UNKNOWN;
    /* The kernel answers within send(). A few reads at most: an answer left over from an earlier
     * query (whose reader gave up) is skipped by its sequence number; nothing queued is unknown. */
    for (int reads = 0; reads < 4; reads++) {
        union {
            struct nlmsghdr nh;
            char bytes[8192];
        } in;
        ssize_t n = recv(a->diag_fd, &in, sizeof in, MSG_DONTWAIT);
        if (n <= 0)
            return ARC_UID_UNKNOWN;
        unsigned int len = (unsigned int)n; /* NLMSG_OK compares it with a __u32 */
        for (struct nlmsghdr *h = &in.nh; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_seq != q.nh.nlmsg_seq)
                continue;
            if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY ||
                h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
                return ARC_UID_UNKNOWN; /* NLMSG_ERROR: ENOENT, no such socket here */
            const struct inet_diag_msg *m = NLMSG_DATA(h);
            /* The very tuple asked, and a socket a process still has open. A lookup that finds
             * no connection falls back to a listener on the source address and port (a peer
             * from elsewhere whose source port is some local service's: not its owner's
             * request). A socket its process closed (inode 0) is orphaned or TIME_WAIT, which
             * reports uid 0 whatever its owner was: a client that sends and closes at once
             * would be counted as root. A real client keeps its socket to read the answer. */
            if (m->idiag_inode == 0 || m->idiag_state == TCP_LISTEN ||
                m->id.idiag_sport != q.r.id.idiag_sport ||
                m->id.idiag_dport != q.r.id.idiag_dport ||
                memcmp(m->id.idiag_src, q.r.id.idiag_src, sizeof q.r.id.idiag_src) != 0 ||
                memcmp(m->id.idiag_dst, q.r.id.idiag_dst, sizeof q.r.id.idiag_dst) != 0)
                return ARC_UID_UNKNOWN;
            return (uid_t)m->idiag_uid;
        }
    }
    return ARC_UID_UNKNOWN;
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
    struct arc_key *k = ch->slot;
    a->pending--;
    k->making = 0;
    if (status < 0 && !ch->failed)
        ch->failed = ECANCELED;
    if (!ch->failed && (ch->canceled || a->closing)) {
        remove_file(a, ch->path); /* nobody will read it: the client went away meanwhile */
        ch->failed = ECANCELED;
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

/* The slot a new challenge of uid's may hold, or NULL: uid's share (ARC_MAX_KEYS_PER_UID of its
 * live keys and keys being made), a free slot (ARC_MAX_KEYS; expired keys are dropped here) and
 * room in this second's ARC_MAX_PER_S. Refused before any allocation or file: a flood costs a
 * scan of the slots per request, and it can never push out a key that a slower client is about
 * to read. The per-user share is checked first: a flooding user is told it is its own. */
static struct arc_key *admit(struct arc *a, uid_t uid)
{
    uint64_t now = now_ms();
    if (now - a->second_ms >= 1000) {
        a->second_ms = now;
        a->this_second = 0;
    }
    unsigned live = 0, making = 0, mine = 0;
    struct arc_key *slot = NULL;
    for (unsigned i = 0; i < ARC_MAX_KEYS; i++) {
        struct arc_key *k = &a->keys[i];
        if (k->live && now >= k->expires_ms)
            drop(a, k);
        live += k->live;
        making += k->making;
        if (k->live || k->making)
            mine += k->uid == uid;
        else if (!slot)
            slot = k;
    }
    /* without sock_diag every challenge is ARC_UID_UNKNOWN: one share would be all there is */
    const char *why = a->diag_fd >= 0 && mine >= ARC_MAX_KEYS_PER_UID ? "per_user"
                      : !slot                                         ? "max_keys"
                      : a->this_second >= ARC_MAX_PER_S               ? "max_per_second"
                                                                      : NULL;
    if (!why) {
        a->this_second++;
        slot->making = 1;
        slot->uid = uid;
        return slot;
    }
    if (why[0] == 'p')
        metrics.arc_challenges_refused_per_user++;
    if (log_sampled(&metrics.arc_challenges_refused))
        log_warn("arc_challenge_refused", "reason=%s uid=%lld live=%u making=%u refused_total=%llu",
                 why, uid == ARC_UID_UNKNOWN ? -1LL : (long long)uid, live, making,
                 (unsigned long long)metrics.arc_challenges_refused);
    return NULL;
}

struct arc_challenge *arc_challenge(struct arc *a, uid_t uid, arc_done_cb *done, void *arg,
                                    int *refused)
{
    struct arc_key *slot = admit(a, uid);
    *refused = !slot;
    if (!slot)
        return NULL;
    struct arc_challenge *ch = xcalloc(1, sizeof *ch);
    unsigned char rnd[ARC_KEY_HEX / 2 + 8];
    ch->arc = a;
    ch->slot = slot;
    ch->done = done;
    ch->arg = arg;
    ch->work.data = ch;
    if (uv_random(NULL, NULL, rnd, sizeof rnd, 0, NULL) < 0) {
        ch->failed = EIO;
    } else {
        char name[17];
        hex_encode(rnd, ARC_KEY_HEX / 2, ch->key);
        hex_encode(rnd + ARC_KEY_HEX / 2, 8, name);
        snprintf(ch->path, sizeof ch->path, "%s/imdsd-%s-%s.key", a->dir, a->id, name);
    }
    secret_zero(rnd, sizeof rnd);
    a->pending++;
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

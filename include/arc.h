/* arc.h - the Azure Arc challenge (--arc-key-dir): a token request on the IMDS path without
 * Authorization gets 401 with WWW-Authenticate: Basic realm=<a new key file>; only a process that
 * can read that file (its owner, and --arc-key-group) can answer with Authorization: Basic <key>.
 * This authenticates local users on a shared VM or node, where anyone can reach loopback. */
#ifndef IMDSD_ARC_H
#define IMDSD_ARC_H

#include <stddef.h>
#include <sys/types.h>
#include <uv.h>

#define ARC_KEY_TTL_MS       60000 /* a key not used within this is removed */
#define ARC_MAX_KEYS         256   /* live keys and keys being made: past it, challenges get 429 */
#define ARC_MAX_KEYS_PER_UID 32    /* of them, one user's (the peer socket's owner, arc_peer_uid) */
#define ARC_MAX_PER_S        100   /* challenges admitted per second: bounds a flood's file churn */
#define ARC_RETRY_AFTER_S    1     /* a refused challenge's Retry-After */
#define ARC_KEY_HEX          64    /* the key: 32 random bytes as hex */
#define ARC_ID_HEX           16    /* an instance's id in its file names: 8 random bytes as hex */

struct arc;

/* The directory must exist, belong to root or imdsd's user, and be writable by nobody else: not
 * by others, and by its group only when that is imdsd's own (effective) group. Key files are
 * created there, mode 0640, group gid (-1: the process's effective group, set explicitly: a
 * setgid directory's group never applies), named imdsd-ID-RANDOM.key, ID being this instance's;
 * it holds an flock() on imdsd-ID.lock (0600) until arc_free has removed its files. Removes the
 * files of instances that are gone (lock free or absent, whatever their pid was), never those of
 * a live one sharing the directory. NULL with err (one line naming --arc-key-dir and the
 * directory) on failure. */
struct arc *arc_new(uv_loop_t *loop, const char *dir, gid_t gid, char *err, size_t errlen);

/* A challenge's user: the uid owning the client's end of the TCP connection, asked of the kernel
 * (netlink sock_diag, NETLINK_SOCK_DIAG) with the connection's exact 4-tuple. One socket, opened
 * by arc_new, non-blocking: the kernel answers within the send (a local table lookup, a few
 * microseconds), and a query it did not answer at once reads as ARC_UID_UNKNOWN.
 * ARC_UID_UNKNOWN is also every peer the kernel cannot vouch for, which share one quota: a peer
 * outside imdsd's network namespace (NAT, another host), and a socket its process has closed
 * already (orphaned or TIME_WAIT, which reports uid 0: a client that sends and closes at once
 * must not count as root). A uid that imdsd's user namespace does not map reads as the overflow
 * uid (65534), one more shared quota.
 * The kernel's answer names the user that created the socket: a process given another user's
 * socket (SCM_RIGHTS, fork before a setuid) is counted as that user. */
#define ARC_UID_UNKNOWN ((uid_t)-1)
/* The user owning the peer's socket of fd (a connected TCP socket of imdsd's), or
 * ARC_UID_UNKNOWN (never blocks: see above). When arc_new could not open the netlink socket
 * (seccomp, systemd's RestrictAddressFamilies= without AF_NETLINK) it logged so once, and every
 * challenge is ARC_UID_UNKNOWN with no per-user quota: the bounds of before. */
uid_t arc_peer_uid(struct arc *a, int fd);

struct arc_challenge;
/* done(arg, path): the realm to send, or NULL when no key file could be made. */
typedef void arc_done_cb(void *arg, const char *path);
/* Makes a new key file for user uid (arc_peer_uid) off the loop; done is called from the loop
 * unless arc_cancel(ch) is called first. Returns the handle to cancel with, or NULL when the
 * caller answers at once: with *refused set when uid holds ARC_MAX_KEYS_PER_UID keys live or
 * being made (reason per_user: one user's flood exhausts its own share, and other users still
 * get keys), or ARC_MAX_KEYS keys are (max_keys: floods of eight users or more), or
 * ARC_MAX_PER_S challenges were admitted in the current second (max_per_second). Answer 429
 * with Retry-After ARC_RETRY_AFTER_S; counted in metrics.arc_challenges_refused (per_user also
 * in metrics.arc_challenges_refused_per_user) and logged once per 1000 with the reason and the
 * uid. *refused is 0 when no key file could be made. A live key is never dropped to make room:
 * a flood cannot take the key a slower client is about to read. */
struct arc_challenge *arc_challenge(struct arc *a, uid_t uid, arc_done_cb *done, void *arg,
                                    int *refused);
void arc_cancel(struct arc_challenge *ch);
/* Whether the Authorization value (len bytes: "Basic <key>") answers a live challenge; the key
 * is then used up and its file removed. Compared in constant time against every live key. */
int arc_verify(struct arc *a, const char *auth, size_t len);
/* Removes every key file; frees once the handles have closed. */
void arc_free(struct arc *a);

#endif

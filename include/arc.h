/* arc.h - the Azure Arc challenge (--arc-key-dir): a token request on the IMDS path without
 * Authorization gets 401 with WWW-Authenticate: Basic realm=<a new key file>; only a process that
 * can read that file (its owner, and --arc-key-group) can answer with Authorization: Basic <key>.
 * This authenticates local users on a shared VM or node, where anyone can reach loopback. */
#ifndef IMDSD_ARC_H
#define IMDSD_ARC_H

#include <stddef.h>
#include <sys/types.h>
#include <uv.h>

#define ARC_KEY_TTL_MS    60000 /* a key not used within this is removed */
#define ARC_MAX_KEYS      256   /* live keys and keys being made: past it, challenges get 429 */
#define ARC_MAX_PER_S     100   /* challenges admitted per second: bounds a flood's file churn */
#define ARC_RETRY_AFTER_S 1     /* a refused challenge's Retry-After */
#define ARC_KEY_HEX       64    /* the key: 32 random bytes as hex */
#define ARC_ID_HEX        16    /* an instance's id in its file names: 8 random bytes as hex */

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

struct arc_challenge;
/* done(arg, path): the realm to send, or NULL when no key file could be made. */
typedef void arc_done_cb(void *arg, const char *path);
/* Makes a new key file off the loop; done is called from the loop unless arc_cancel(ch) is
 * called first. Returns the handle to cancel with, or NULL when the caller answers at once: with
 * *refused set when ARC_MAX_KEYS keys are live or being made, or ARC_MAX_PER_S challenges were
 * admitted in the current second (a flood, any local user's: answer 429 with Retry-After
 * ARC_RETRY_AFTER_S, counted in metrics.arc_challenges_refused and logged once per 1000), else
 * when no key file could be made. A live key is never dropped to make room: a flood cannot
 * take the key a slower client is about to read. */
struct arc_challenge *arc_challenge(struct arc *a, arc_done_cb *done, void *arg, int *refused);
void arc_cancel(struct arc_challenge *ch);
/* Whether the Authorization value (len bytes: "Basic <key>") answers a live challenge; the key
 * is then used up and its file removed. Compared in constant time against every live key. */
int arc_verify(struct arc *a, const char *auth, size_t len);
/* Removes every key file; frees once the handles have closed. */
void arc_free(struct arc *a);

#endif

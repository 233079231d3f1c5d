/* secret_watch.h - the App Service shared secret (--identity-header-file), followed as it rotates.
 * A Kubernetes Secret volume is rewritten the way the kubelet writes the projected token (a new
 * ..data directory swapped in); applications that read IDENTITY_HEADER from their environment keep
 * the old value until they restart. So a new secret takes effect as soon as it is read (twice,
 * below) and the previous one stays valid for an overlap (--identity-header-overlap). A changed
 * file is taken only once it reads the same SECRET_SETTLE_MS later: never a file caught
 * half-written. */
#ifndef IMDSD_SECRET_WATCH_H
#define IMDSD_SECRET_WATCH_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "imds.h"

#define SECRET_REREAD_MS 5000 /* the file is re-read this often (and on SIGHUP) */
/* a change is taken when a read this much later finds the same: a rotation takes effect within
 * SECRET_REREAD_MS + SECRET_SETTLE_MS (about SECRET_SETTLE_MS after a SIGHUP) */
#define SECRET_SETTLE_MS 1000

struct secret_watch;

/* Starts following path, whose current content (already read and checked by the configuration)
 * is secret. overlap_s: how long a replaced secret is still accepted. */
struct secret_watch *secret_watch_new(uv_loop_t *loop, const char *path, const char *secret,
                                      size_t len, unsigned overlap_s);
/* The secrets a request may present now: the current one, then the previous one during its
 * overlap. Returns how many (1 or 2) are in out (valid until control returns to the loop). The
 * overlap is counted on the monotonic clock (now_ms), read here rather than passed in: a wall
 * clock stepped back by NTP or an operator must not keep a rotated-out secret valid longer. */
int secret_watch_get(const struct secret_watch *sw, struct imds_secret out[2]);
/* Reads the file again now (SIGHUP). */
void secret_watch_reload(struct secret_watch *sw);
/* Zeroes the secrets; frees once the handles have closed (the loop must run). */
void secret_watch_free(struct secret_watch *sw);

#endif

/* token_cache.h - access tokens keyed by (client_id, resource).
 *
 * Concurrent requests for a key that is not cached share one exchange (single flight). A
 * cached token is refreshed in the background before clients would consider it expired
 * (refresh.h), and keeps being served while Entra fails until shortly before it expires.
 * Transient failures are retried with full-jitter backoff, honouring Retry-After, within the
 * deadline of the clients waiting; permanent ones are not retried and are repeated from memory
 * for a while; 429 holds identical requests until its Retry-After. At most
 * CACHE_MAX_EXCHANGES exchanges run at once. */
#ifndef IMDSD_TOKEN_CACHE_H
#define IMDSD_TOKEN_CACHE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "entra_msg.h"
#include "token.h"

#define CACHE_MAX_ENTRIES     1024
#define CACHE_MAX_TOKEN_BYTES (8u << 20) /* all cached access tokens together */
#define CACHE_MAX_EXCHANGES   8          /* concurrent exchanges with Entra */

struct entra;
struct token_file;
struct token_cache;
struct token_cache_waiter;
struct cache_entry;

/* Exactly one of tok and err is non-NULL; both are valid only during the callback. */
typedef void token_cache_done_cb(struct token_cache_waiter *w, const struct token *tok,
                                 const struct entra_result *err);

struct token_cache_waiter {
    token_cache_done_cb *done;
    void *data; /* for the caller */
    /* private */
    struct cache_entry *entry;
    struct token_cache_waiter *prev, *next;
    int64_t deadline_ms;
};

enum cache_result { CACHE_HIT, CACHE_FAIL, CACHE_WAIT, CACHE_FULL = -1 };

struct token_cache_opts {
    unsigned entra_timeout_s; /* a waiter is answered within this (--entra-timeout) */
};

/* Copies o; borrows loop, entra and the token file for the cache's lifetime. */
struct token_cache *token_cache_new(uv_loop_t *loop, const struct token_cache_opts *o,
                                    struct entra *entra, struct token_file *tf);

/* Looks up (client_id, resource) now. The cache reads the monotonic clock itself (now_ms()):
 * every lifetime, hold, Retry-After and deadline it keeps is measured on it, so a stepped wall
 * clock neither serves a token past its expiry nor stretches a held error or a 429.
 * CACHE_HIT: *tok is a servable token (valid until control returns to the loop; the caller
 *            may fill its body render slot);
 * CACHE_FAIL: *err says why the request is answered at once (held permanent error, 429);
 * CACHE_WAIT: w->done will be called exactly once, from the loop (never before this returns)
 *             and within opts.entra_timeout_s, unless token_cache_cancel(w) is called first.
 *             done may re-enter the cache (get, cancel) freely;
 * CACHE_FULL: no room for a new key. The cached path allocates nothing.
 * With w NULL nothing is registered or started: CACHE_WAIT then means "call again with a
 * waiter" (so that callers allocate a waiter only on a miss); that call, made before control
 * returns to the loop, answers CACHE_WAIT, or CACHE_FULL (room for a new key is only looked for
 * with a waiter). */
enum cache_result token_cache_get(struct token_cache *c, struct token_cache_waiter *w,
                                  const char *client_id, const char *resource, size_t resource_len,
                                  struct token **tok, struct entra_result *err);
/* --prefetch: fetches (client_id, resource) now (once the token file is usable: until then it
 * asks again every second), keeps its token fresh like any other, retries failures with backoff
 * for as long as it has none, and never evicts or drops it. Strings are copied. */
void token_cache_prefetch(struct token_cache *c, const char *client_id, const char *resource);
/* How many prefetched keys have no servable token now; *total: how many there are. why (n bytes):
 * the first missing key (in the order they were prefetched) and the reason (the last error, or
 * "being fetched"), when one is. */
int token_cache_prefetch_missing(struct token_cache *c, int *total, char *why, size_t n);

/* What /metrics shows of one entry. */
struct token_cache_info {
    const char *client_id;
    const char *resource; /* resource_len bytes, not NUL-terminated */
    size_t resource_len;
    int has_token;      /* a token is cached and servable */
    int64_t expires_ms; /* monotonic (now_ms()), when has_token */
    int64_t refresh_ms; /* monotonic: the background refresh is due, when has_token */
};
/* Calls fn for every entry (fn must not touch the cache). */
void token_cache_foreach(struct token_cache *c,
                         void (*fn)(void *arg, const struct token_cache_info *), void *arg);
/* Detaches w: done is never called. A no-op when it already ran. */
void token_cache_cancel(struct token_cache_waiter *w);
/* Fails waiting requests with a "shutting down" error, stops timers and frees everything once
 * the timer handle has closed (the loop must run). */
void token_cache_free(struct token_cache *c);

#endif

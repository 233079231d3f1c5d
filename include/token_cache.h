/* token_cache.h - access tokens keyed by (client_id, resource), with single-flight exchanges:
 * concurrent requests for a key that is not cached share one read of the token file and one
 * exchange with Entra. */
#ifndef IMDSD_TOKEN_CACHE_H
#define IMDSD_TOKEN_CACHE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "entra.h"
#include "entra_msg.h"
#include "imds.h"
#include "token.h"
#include "token_file.h"

#define CACHE_MAX_ENTRIES 1024
#define CACHE_EARLY_REFRESH_S 300 /* SDKs treat less than this as expired */

struct token_cache;
struct token_cache_waiter;

/* Exactly one of tok and err is non-NULL; both are valid only during the callback. */
typedef void token_cache_done_cb(struct token_cache_waiter *w, const struct token *tok,
                                 const struct entra_result *err);

struct token_cache_waiter {
    token_cache_done_cb *done;
    void *data; /* for the caller */
    /* private */
    struct cache_entry *entry;
    struct token_cache_waiter *prev, *next;
};

/* Borrows loop, cfg, entra and the token file for the cache's lifetime. */
struct token_cache *token_cache_new(uv_loop_t *loop, const struct config *cfg, struct entra *entra,
                                    struct token_file *tf);
/* A token that is fresh at now, or NULL. The pointer is valid until control returns to the loop. */
const struct token *token_cache_lookup(struct token_cache *c, const char *client_id,
                                       const char *resource, size_t resource_len, int64_t now);
/* Seconds left of a throttling period Entra imposed on this key with 429 + Retry-After (0 when
 * none): identical requests are answered 429 without calling Entra until it ends. */
int token_cache_throttled(struct token_cache *c, const char *client_id, const char *resource,
                          size_t resource_len, int64_t now);
/* Waits for a token for the key, joining the exchange in flight or starting one. Returns 0 and
 * later calls w->done exactly once (unless canceled), or <0 without calling it. */
int token_cache_fetch(struct token_cache *c, struct token_cache_waiter *w, const char *client_id,
                      const char *resource, size_t resource_len);
/* Detaches w: done is never called. A no-op when it already ran. */
void token_cache_cancel(struct token_cache_waiter *w);
/* Fails waiting requests with a "shutting down" error and frees everything. */
void token_cache_free(struct token_cache *c);

/* True when a token obtained with this expiry is still worth serving at now (pure policy). */
int token_cache_is_fresh(const struct token *t, int64_t now);

#endif

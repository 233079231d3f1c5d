#include "token_cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "token_file.h"
#include "util.h"

#define NBUCKETS 256

struct cache_entry {
    struct token_cache *cache;
    struct cache_entry *next; /* hash chain */
    char *client_id;
    char *resource;
    size_t resource_len;
    uint64_t hash;
    struct token tok; /* access_token NULL when nothing is cached */
    int64_t last_used;
    int64_t throttled_until; /* epoch seconds; Entra's 429 Retry-After */
    /* the exchange in flight */
    int fetching;
    struct token_cache_waiter *waiters;
    struct token_file_waiter read;
    struct entra_fetch fetch;
    int retried; /* this exchange already re-read the token file after AADSTS700024 */
};

struct token_cache {
    uv_loop_t *loop;
    const struct config *cfg;
    struct entra *entra;
    struct token_file *tf;
    struct cache_entry *buckets[NBUCKETS];
    unsigned nentries;
};

static uint64_t hash_key(const char *client_id, const char *resource, size_t rlen)
{
    uint64_t h = 1469598103934665603ull;
    for (const char *p = client_id; *p; p++)
        h = (h ^ (unsigned char)(*p | 0x20)) * 1099511628211ull;
    h = (h ^ 0xff) * 1099511628211ull;
    for (size_t i = 0; i < rlen; i++)
        h = (h ^ (unsigned char)resource[i]) * 1099511628211ull;
    return h;
}

static struct cache_entry *find(struct token_cache *c, uint64_t h, const char *client_id,
                                const char *resource, size_t rlen)
{
    for (struct cache_entry *e = c->buckets[h % NBUCKETS]; e; e = e->next)
        if (e->hash == h && e->resource_len == rlen && memcmp(e->resource, resource, rlen) == 0 &&
            strcasecmp(e->client_id, client_id) == 0)
            return e;
    return NULL;
}

int token_cache_is_fresh(const struct token *t, int64_t now)
{
    if (!t->access_token)
        return 0;
    int64_t lifetime = t->expires_on - t->not_before;
    int64_t margin = lifetime / 2 < CACHE_EARLY_REFRESH_S ? lifetime / 2 : CACHE_EARLY_REFRESH_S;
    return now < t->expires_on - margin;
}

struct token_cache *token_cache_new(uv_loop_t *loop, const struct config *cfg, struct entra *entra,
                                    struct token_file *tf)
{
    struct token_cache *c = xcalloc(1, sizeof *c);
    c->tf = tf;
    c->loop = loop;
    c->cfg = cfg;
    c->entra = entra;
    return c;
}

const struct token *token_cache_lookup(struct token_cache *c, const char *client_id,
                                       const char *resource, size_t resource_len, int64_t now)
{
    struct cache_entry *e = find(c, hash_key(client_id, resource, resource_len), client_id,
                                 resource, resource_len);
    if (!e || !token_cache_is_fresh(&e->tok, now))
        return NULL;
    e->last_used = now;
    return &e->tok;
}

int token_cache_throttled(struct token_cache *c, const char *client_id, const char *resource,
                          size_t resource_len, int64_t now)
{
    struct cache_entry *e = find(c, hash_key(client_id, resource, resource_len), client_id,
                                 resource, resource_len);
    return e && now < e->throttled_until ? (int)(e->throttled_until - now) : 0;
}

static void clear_token(struct token *t)
{
    secret_free_str(t->access_token);
    memset(t, 0, sizeof *t);
}

static void entry_free(struct cache_entry *e)
{
    clear_token(&e->tok);
    free(e->client_id);
    free(e->resource);
    free(e);
}

static void unlink_entry(struct token_cache *c, struct cache_entry *e)
{
    struct cache_entry **pp = &c->buckets[e->hash % NBUCKETS];
    while (*pp != e)
        pp = &(*pp)->next;
    *pp = e->next;
    c->nentries--;
}

/* Makes room by dropping the least recently used entry that has no exchange in flight. */
static int evict_one(struct token_cache *c)
{
    struct cache_entry *victim = NULL;
    for (int b = 0; b < NBUCKETS; b++)
        for (struct cache_entry *e = c->buckets[b]; e; e = e->next)
            if (!e->fetching && (!victim || e->last_used < victim->last_used))
                victim = e;
    if (!victim)
        return -1;
    unlink_entry(c, victim);
    entry_free(victim);
    return 0;
}

/* Calls every waiter once; the list is detached first so callbacks may cancel or re-fetch. */
static void complete(struct cache_entry *e, const struct token *tok, const struct entra_result *r)
{
    struct token_cache_waiter *w = e->waiters;
    e->waiters = NULL;
    e->fetching = 0;
    while (w) {
        struct token_cache_waiter *next = w->next;
        w->entry = NULL;
        w->prev = w->next = NULL;
        w->done(w, tok, r);
        w = next;
    }
}

static void on_token_file(void *arg, const struct token_file_status *st, const char *tok,
                          size_t len);

static void on_entra(struct entra_fetch *f, struct entra_result *r, int64_t sent_epoch)
{
    struct cache_entry *e = f->data;
    if (r->kind == ENTRA_THROTTLED)
        e->throttled_until = now_epoch() + r->retry_after;
    if (r->aadsts == 700024 && !e->retried) {
        /* the assertion is outside its validity window: the kubelet may have rotated it since */
        e->retried = 1;
        log_info("entra_retry", "client_id=%s aadsts=700024 action=reread_token_file", e->client_id);
        token_file_get(e->cache->tf, &e->read);
        return;
    }
    if (r->kind != ENTRA_OK) {
        complete(e, NULL, r);
        return;
    }
    clear_token(&e->tok);
    e->tok.access_token = r->access_token;
    e->tok.len = r->token_len;
    r->access_token = NULL;
    e->tok.not_before = sent_epoch;
    e->tok.expires_on = sent_epoch + r->expires_in;
    e->tok.ext_expires_on = sent_epoch + r->ext_expires_in;
    e->tok.refresh_in = r->refresh_in;
    complete(e, &e->tok, NULL);
}

static void fail_local(struct cache_entry *e, const char *error, const char *desc, int retry_after)
{
    struct entra_result r;
    memset(&r, 0, sizeof r);
    r.kind = ENTRA_TRANSIENT;
    r.retry_after = retry_after;
    snprintf(r.error, sizeof r.error, "%s", error);
    snprintf(r.description, sizeof r.description, "%s", desc);
    complete(e, NULL, &r);
}

static void on_token_file(void *arg, const struct token_file_status *st, const char *tok,
                          size_t len)
{
    struct cache_entry *e = arg;
    if (!tok) {
        char desc[240];
        snprintf(desc, sizeof desc, "Service account token is not usable (%s): %s",
                 token_state_name(st->state), st->reason);
        fail_local(e, "service_unavailable", desc, 5);
        return;
    }
    e->fetch.done = on_entra;
    e->fetch.data = e;
    if (entra_fetch(e->cache->entra, &e->fetch, e->client_id, e->resource, tok, len) < 0)
        fail_local(e, "server_error", "Could not start the token exchange", 0);
}

int token_cache_fetch(struct token_cache *c, struct token_cache_waiter *w, const char *client_id,
                      const char *resource, size_t resource_len)
{
    if (resource_len > IMDS_MAX_RESOURCE)
        return -1;
    uint64_t h = hash_key(client_id, resource, resource_len);
    struct cache_entry *e = find(c, h, client_id, resource, resource_len);
    if (!e) {
        if (c->nentries >= CACHE_MAX_ENTRIES && evict_one(c) < 0)
            return -1;
        e = xcalloc(1, sizeof *e);
        e->cache = c;
        e->client_id = xstrdup(client_id);
        e->resource = xstrndup(resource, resource_len);
        e->resource_len = resource_len;
        e->hash = h;
        e->next = c->buckets[h % NBUCKETS];
        c->buckets[h % NBUCKETS] = e;
        c->nentries++;
    }
    e->last_used = now_epoch();
    w->entry = e;
    w->prev = NULL;
    w->next = e->waiters;
    if (e->waiters)
        e->waiters->prev = w;
    e->waiters = w;
    if (e->fetching)
        return 0;
    e->fetching = 1;
    e->retried = 0;
    e->read.cb = on_token_file;
    e->read.arg = e;
    token_file_get(c->tf, &e->read);
    return 0;
}

void token_cache_cancel(struct token_cache_waiter *w)
{
    struct cache_entry *e = w->entry;
    if (!e)
        return;
    if (w->prev)
        w->prev->next = w->next;
    else
        e->waiters = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->entry = NULL;
    w->prev = w->next = NULL;
}

void token_cache_free(struct token_cache *c)
{
    if (!c)
        return;
    for (int b = 0; b < NBUCKETS; b++) {
        while (c->buckets[b]) {
            struct cache_entry *e = c->buckets[b];
            c->buckets[b] = e->next;
            token_file_cancel(&e->read);
            if (e->fetching)
                entra_cancel(&e->fetch);
            if (e->waiters)
                fail_local(e, "service_unavailable", "imdsd is shutting down", 0);
            entry_free(e);
        }
    }
    free(c);
}

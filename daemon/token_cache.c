#include "token_cache.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "entra.h"
#include "log.h"
#include "metrics.h"
#include "refresh.h"
#include "token_file.h"
#include "util.h"

#define NBUCKETS 256
/* a prefetched key whose token file is not usable yet asks again this often */
#define PREFETCH_FILE_RETRY_MS 1000

enum entry_state {
    E_IDLE,       /* nothing in flight */
    E_SLOT,       /* waiting for one of the CACHE_MAX_EXCHANGES slots */
    E_READING,    /* reading the token file */
    E_EXCHANGING, /* talking to Entra */
    E_BACKOFF,    /* waiting to retry */
};

static const char *const entry_state_names[] = {"idle", "slot", "reading", "exchanging", "backoff"};
_Static_assert(sizeof entry_state_names / sizeof *entry_state_names == E_BACKOFF + 1,
               "a name for every entry_state");

#define TO(s) (1u << (s))
/* The states each state may change to (set_state), as a set of bits. */
static const unsigned entry_next[] = {
    [E_IDLE] = TO(E_SLOT) | TO(E_READING) | TO(E_BACKOFF), /* start_attempt, attempt_failed */
    [E_SLOT] = TO(E_READING),                              /* fill_slots gave it a slot */
    [E_READING] = TO(E_EXCHANGING) | TO(E_IDLE),           /* the token file read, or not */
    [E_EXCHANGING] = TO(E_READING) | TO(E_IDLE),           /* AADSTS700024 re-reads; end_attempt */
    [E_BACKOFF] = TO(E_IDLE), /* due, cut short by a waiter, or given up */
};
#undef TO

struct cache_entry {
    struct token_cache *cache;
    struct cache_entry *next;      /* hash chain */
    struct cache_entry *slot_next; /* queue of entries waiting for an exchange slot */
    char *client_id;
    char *resource;
    size_t resource_len;
    uint64_t hash;
    struct token tok; /* access_token NULL when nothing is cached */
    /* every time in this file is on mono_now()'s clock, the deadlines of waiters too */
    int64_t obtained_ms, expires_ms, serve_until_ms, refresh_ms;
    int64_t last_used_ms;
    enum entry_state state;
    unsigned attempt;         /* failed attempts in the current series */
    int64_t backoff_until_ms; /* E_BACKOFF */
    int64_t throttled_until_ms;
    int64_t held_until_ms;    /* a permanent error is repeated until then */
    struct entra_result held; /* that error (no token) */
    struct entra_result last; /* the last failure, for waiters that time out */
    int have_last;
    int retried_700024;
    struct token_cache_waiter *waiters;
    struct token_cache_waiter *completing; /* being answered */
    unsigned pins; /* > 0 while code that runs waiter callbacks has this entry on its stack */
    int prefetch;  /* --prefetch: fetched at start, kept fresh, never evicted nor dropped */
    struct cache_entry *prefetch_next; /* the next prefetched key, in the order they were given */
    struct token_file_waiter read;
    struct entra_fetch fetch;
};

struct token_cache {
    uv_loop_t *loop;
    struct token_cache_opts opts;
    struct entra *entra;
    struct token_file *tf;
    struct cache_entry *buckets[NBUCKETS];
    unsigned nentries;
    size_t token_bytes;
    unsigned exchanges; /* in E_READING or E_EXCHANGING */
    struct cache_entry *slot_head, *slot_tail;
    struct cache_entry *prefetch_head, *prefetch_tail; /* live as long as the cache */
    uv_timer_t tick;
    int64_t tick_due_ms;
    uint64_t rng;
};

static void on_token_file(void *arg, const struct token_file_status *st, const char *tok,
                          size_t len);
static void arm_tick(struct token_cache *c);

/* ---- small helpers ------------------------------------------------------------------------- */

/* The clock of every validity window, hold, backoff and deadline here: the monotonic one. On the
 * wall clock, a clock stepped back an hour would keep serving a token an hour past its expiry
 * and repeat a held error or a 429 for an hour; stepped forward, it would drop good tokens. The
 * wall clock only dates what clients are told (struct token's epoch fields). */
static int64_t mono_now(void)
{
    return (int64_t)now_ms();
}

static double rnd(struct token_cache *c)
{
    /* xorshift64*: jitter only, not secrets */
    c->rng ^= c->rng >> 12;
    c->rng ^= c->rng << 25;
    c->rng ^= c->rng >> 27;
    return (double)((c->rng * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

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

static void clear_token(struct cache_entry *e)
{
    if (e->tok.access_token) {
        assert(e->cache->token_bytes >= e->tok.len);
        e->cache->token_bytes -= e->tok.len;
    }
    secret_free_str(e->tok.access_token);
    buf_free(&e->tok.body);
    memset(&e->tok, 0, sizeof e->tok);
    e->obtained_ms = e->expires_ms = e->serve_until_ms = e->refresh_ms = 0;
}

static int busy(const struct cache_entry *e)
{
    return e->state != E_IDLE && e->state != E_BACKOFF;
}

static void log_key(const struct cache_entry *e, char *res, size_t n)
{
    log_quote(res, n, e->resource, e->resource_len);
}

/* Every change of an entry's state goes through here: one allowed by entry_next, traced at debug
 * level (nothing is formatted otherwise). */
static void set_state(struct cache_entry *e, enum entry_state to)
{
    assert(entry_next[e->state] & (1u << to));
    if (log_min_level <= LOG_DEBUG) {
        char res[160];
        log_key(e, res, sizeof res);
        log_debug("cache_state", "client_id=%s resource=%s from=%s to=%s", e->client_id, res,
                  entry_state_names[e->state], entry_state_names[to]);
    }
    e->state = to;
}

/* ---- completing waiters -------------------------------------------------------------------- */

/* Re-entrancy. A waiter's callback may do whatever the cache's users can: answer its client, and
 * so dispatch that connection's next pipelined request, which may look up, create or evict
 * entries, start attempts or cancel other waiters, all before the callback returns. Hence:
 *  - callbacks run only in complete(), and complete() is the last thing its caller does to the
 *    entry: every change of state is made before it, so none overwrites what a callback did;
 *  - complete() pins its entry, and a pinned entry is never freed (evict_one, on_tick);
 *  - a loop that may run callbacks (on_tick, fill_slots) re-reads its position from the live
 *    structures after each step. */

/* A waiter is on e->waiters, or on e->completing while its callback is due. */
static void unlink_waiter(struct cache_entry *e, struct token_cache_waiter *w)
{
    assert(w->entry == e);
    if (w->prev)
        w->prev->next = w->next;
    else if (e->completing == w)
        e->completing = w->next;
    else
        e->waiters = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->entry = NULL;
    w->prev = w->next = NULL;
}

/* Answers every waiter, or only those whose deadline is at or before due_ms when due_ms is not
 * 0. They move to a separate list first, so a callback that starts a new request on this key
 * waits for the next attempt instead of receiving this answer, and a callback that cancels
 * another waiter is safe. tok may be &e->tok: nothing a callback can do synchronously clears it. */
static void complete(struct cache_entry *e, const struct token *tok, const struct entra_result *r,
                     int64_t due_ms)
{
    struct token_cache_waiter *w = e->waiters, *tail = e->completing;
    assert((tok != NULL) != (r != NULL)); /* token_cache_done_cb: exactly one of them */
    while (tail && tail->next)
        tail = tail->next;
    while (w) {
        struct token_cache_waiter *next = w->next;
        if (!due_ms || w->deadline_ms <= due_ms) {
            unlink_waiter(e, w);
            w->entry = e;
            w->prev = tail;
            if (tail)
                tail->next = w;
            else
                e->completing = w;
            tail = w;
        }
        w = next;
    }
    e->pins++;
    while ((w = e->completing)) {
        unlink_waiter(e, w);
        w->done(w, tok, r);
    }
    e->pins--;
}

static void set_local_error(struct entra_result *r, enum entra_kind kind, const char *error,
                            const char *desc, int retry_after)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->retry_after = retry_after;
    snprintf(r->error, sizeof r->error, "%s", error);
    snprintf(r->description, sizeof r->description, "%s", desc);
}

static void remember(struct entra_result *dst, const struct entra_result *src)
{
    *dst = *src;
    dst->access_token = NULL;
    dst->token_len = 0;
}

/* ---- exchange slots ------------------------------------------------------------------------ */

/* Takes an exchange slot and starts reading the token file (e is idle or was queued for the
 * slot, and a slot is free). */
static void take_slot(struct cache_entry *e)
{
    struct token_cache *c = e->cache;
    assert(c->exchanges < CACHE_MAX_EXCHANGES);
    c->exchanges++;
    if (e->attempt > 0)
        metrics.retries++;
    set_state(e, E_READING);
    e->retried_700024 = 0;
    e->read.cb = on_token_file;
    e->read.arg = e;
    token_file_get(c->tf, &e->read);
}

/* Gives queued entries the free slots, in order. */
static void fill_slots(struct token_cache *c)
{
    while (c->slot_head && c->exchanges < CACHE_MAX_EXCHANGES) {
        struct cache_entry *e = c->slot_head;
        c->slot_head = e->slot_next;
        if (!c->slot_head)
            c->slot_tail = NULL;
        e->slot_next = NULL;
        take_slot(e);
    }
}

/* The attempt in flight is over: the entry is idle and its slot free for fill_slots. */
static void end_attempt(struct cache_entry *e)
{
    assert(e->cache->exchanges > 0);
    set_state(e, E_IDLE);
    e->cache->exchanges--;
}

static void start_attempt(struct cache_entry *e)
{
    struct token_cache *c = e->cache;
    if (busy(e))
        return;
    if (c->exchanges >= CACHE_MAX_EXCHANGES || c->slot_head) {
        set_state(e, E_SLOT);
        if (c->slot_tail)
            c->slot_tail->slot_next = e;
        else
            c->slot_head = e;
        c->slot_tail = e;
        return;
    }
    take_slot(e);
}

/* ---- one attempt --------------------------------------------------------------------------- */

/* After a failed attempt: retry later, or give up on the waiters. A stale assertion that a
 * re-read did not fix (AADSTS700024 twice) is answered at once: retrying cannot help until the
 * kubelet writes a new token, which the watcher sees. Ends with complete(). */
static void attempt_failed(struct cache_entry *e, const struct entra_result *r)
{
    int stale_assertion = r->aadsts == 700024;
    struct token_cache *c = e->cache;
    int64_t now = mono_now();
    char res[160];
    remember(&e->last, r);
    e->have_last = 1;
    if (r->kind == ENTRA_PERMANENT) {
        /* a permanent rejection: tell the clients, keep the answer for a while, evict the token
         * (Entra no longer issues it), and do not retry */
        remember(&e->held, r);
        e->held_until_ms = now + PERMANENT_ERROR_HOLD_MS;
        clear_token(e);
        e->attempt = 0;
        complete(e, NULL, r, 0);
        return;
    }
    if (r->kind == ENTRA_THROTTLED)
        e->throttled_until_ms = now + (int64_t)r->retry_after * 1000;
    int has_token = e->tok.access_token && now < e->serve_until_ms;
    uint64_t cap = e->waiters ? BACKOFF_FOREGROUND_CAP_MS : BACKOFF_BACKGROUND_CAP_MS;
    uint64_t wait = retry_wait_ms(e->attempt, cap, r->retry_after, rnd(c));
    int64_t retry_ms = now + (int64_t)wait, due_ms = stale_assertion ? 0 : retry_ms;
    /* waiters whose deadline comes before the next attempt are answered now, the others wait */
    int staying = 0;
    for (struct token_cache_waiter *w = e->waiters; w && due_ms; w = w->next)
        staying += w->deadline_ms > due_ms;
    struct entra_result now_r = *r;
    now_r.access_token = NULL;
    if (!now_r.retry_after)
        now_r.retry_after = (int)((wait + 999) / 1000);
    if (staying || has_token || e->prefetch) {
        e->attempt++;
        set_state(e, E_BACKOFF);
        e->backoff_until_ms = retry_ms;
        log_key(e, res, sizeof res);
        log_info("entra_retry_scheduled",
                 "client_id=%s resource=%s attempt=%u in_ms=%llu "
                 "waiting_clients=%s serving_cached=%s",
                 e->client_id, res, e->attempt, (unsigned long long)wait, staying ? "yes" : "no",
                 has_token ? "yes" : "no");
    } else {
        e->attempt = 0; /* nobody waits and nothing to keep fresh: stop here */
    }
    complete(e, NULL, &now_r, due_ms);
}

static void on_entra(struct entra_fetch *f, struct entra_result *r)
{
    struct cache_entry *e = f->data;
    struct token_cache *c = e->cache;
    if (r->aadsts == 700024 && !e->retried_700024) {
        /* the assertion is outside its validity window: the kubelet may have rotated it */
        e->retried_700024 = 1;
        log_info("entra_retry", "client_id=%s aadsts=700024 action=reread_token_file",
                 e->client_id);
        metrics.retries++;
        set_state(e, E_READING);
        token_file_get(c->tf, &e->read);
        return;
    }
    end_attempt(e);
    if (r->kind != ENTRA_OK) {
        attempt_failed(e, r);
    } else {
        clear_token(e);
        int64_t sent_ms = f->sent_mono_ms, sent_wall_s = f->sent_wall_ms / 1000;
        e->tok.access_token = r->access_token;
        e->tok.len = r->token_len;
        r->access_token = NULL;
        c->token_bytes += e->tok.len;
        e->tok.not_before = sent_wall_s;
        e->tok.expires_on = sent_wall_s + r->expires_in;
        e->tok.ext_expires_on = sent_wall_s + r->ext_expires_in;
        e->tok.refresh_in = r->refresh_in;
        e->tok.wall_minus_mono_ms = f->sent_wall_ms - f->sent_mono_ms;
        e->obtained_ms = sent_ms;
        e->expires_ms = sent_ms + r->expires_in * 1000;
        e->serve_until_ms = refresh_serve_until_ms(e->obtained_ms, e->expires_ms);
        e->refresh_ms = refresh_at_ms(e->obtained_ms, e->expires_ms, r->refresh_in, rnd(c));
        e->attempt = 0;
        e->have_last = 0;
        e->held_until_ms = 0;
        log_debug("token_refresh_scheduled", "client_id=%s in_ms=%lld expires_in_ms=%lld",
                  e->client_id, (long long)(e->refresh_ms - mono_now()),
                  (long long)(e->expires_ms - mono_now()));
        complete(e, &e->tok, NULL, 0);
    }
    /* e may be anything now: only the cache is touched from here on */
    fill_slots(c);
    arm_tick(c);
}

static void on_token_file(void *arg, const struct token_file_status *st, const char *tok,
                          size_t len)
{
    struct cache_entry *e = arg;
    struct token_cache *c = e->cache;
    struct entra_result r;
    if (!tok) {
        /* no usable assertion: answer now (the watcher notices when it comes back) */
        char desc[240];
        snprintf(desc, sizeof desc, "Service account token is not usable (%s): %s",
                 token_state_name(st->state), st->reason);
        set_local_error(&r, ENTRA_TRANSIENT, "service_unavailable", desc, 5);
        end_attempt(e);
        remember(&e->last, &r);
        e->have_last = 1;
        if (e->prefetch) { /* asked again soon: the token arrives when the file does */
            set_state(e, E_BACKOFF);
            e->backoff_until_ms = mono_now() + PREFETCH_FILE_RETRY_MS;
        }
        complete(e, NULL, &r, 0);
    } else {
        set_state(e, E_EXCHANGING);
        e->fetch.done = on_entra;
        e->fetch.data = e;
        if (entra_fetch(c->entra, &e->fetch, e->client_id, e->resource, tok, len) == 0)
            return;
        set_local_error(&r, ENTRA_TRANSIENT, "server_error", "Could not start the token exchange",
                        0);
        end_attempt(e);
        attempt_failed(e, &r);
    }
    fill_slots(c);
    arm_tick(c);
}

/* Starts the exchange that replaces a token still being served. trigger: "due" (the tick) or
 * "request" (a request found it due first). */
static void start_refresh(struct cache_entry *e, int64_t now, const char *trigger)
{
    char res[160];
    log_key(e, res, sizeof res);
    log_info("token_refresh", "client_id=%s resource=%s expires_in_s=%lld trigger=%s", e->client_id,
             res, (long long)((e->expires_ms - now) / 1000), trigger);
    start_attempt(e);
}

/* ---- entries ------------------------------------------------------------------------------- */

/* A new idle entry for the key, in its bucket. */
static struct cache_entry *entry_new(struct token_cache *c, uint64_t h, const char *client_id,
                                     const char *resource, size_t rlen, int64_t now)
{
    struct cache_entry *e = xcalloc(1, sizeof *e);
    e->cache = c;
    e->client_id = xstrdup(client_id);
    e->resource = xstrndup(resource, rlen);
    e->resource_len = rlen;
    e->hash = h;
    e->last_used_ms = now;
    e->next = c->buckets[h % NBUCKETS];
    c->buckets[h % NBUCKETS] = e;
    c->nentries++;
    return e;
}

static void entry_free(struct cache_entry *e)
{
    assert(!e->pins); /* see "Re-entrancy" above */
    clear_token(e);
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

/* Nothing in flight, nobody waiting or being answered, no callback on the stack. */
static int idle(const struct cache_entry *e)
{
    return e->state == E_IDLE && !e->waiters && !e->completing && !e->pins;
}

/* Drops the least recently used idle entry. */
static int evict_one(struct token_cache *c)
{
    struct cache_entry *victim = NULL;
    for (int b = 0; b < NBUCKETS; b++)
        for (struct cache_entry *e = c->buckets[b]; e; e = e->next)
            if (idle(e) && !e->prefetch && (!victim || e->last_used_ms < victim->last_used_ms))
                victim = e;
    if (!victim)
        return -1;
    unlink_entry(c, victim);
    entry_free(victim);
    return 0;
}

/* ---- the tick: refreshes, retries, deadlines, expiry --------------------------------------- */

/* One entry's due work. Returns 1 when nobody used its token during the whole life of the token:
 * the caller drops it instead of refreshing it. */
static int tick_entry(struct cache_entry *e, int64_t now)
{
    char res[160];
    if (e->waiters) {
        /* clients whose deadline passed get the last error, or a timeout */
        struct entra_result r;
        if (e->have_last)
            r = e->last;
        else
            set_local_error(&r, ENTRA_TRANSIENT, "service_unavailable",
                            "Timed out waiting for Entra", 5);
        complete(e, NULL, &r, now);
    }
    /* callbacks may have run: what follows reads the entry afresh */
    if (e->state == E_BACKOFF && now >= e->backoff_until_ms) {
        set_state(e, E_IDLE);
        start_attempt(e);
    }
    if (e->tok.access_token && now >= e->serve_until_ms && !busy(e)) {
        log_key(e, res, sizeof res);
        log_info("token_expired", "client_id=%s resource=%s", e->client_id, res);
        clear_token(e);
        if (e->state == E_BACKOFF && !e->waiters)
            set_state(e, E_IDLE);
    }
    if (e->held_until_ms && now >= e->held_until_ms)
        e->held_until_ms = 0;
    if (e->tok.access_token && e->state == E_IDLE && now >= e->refresh_ms) {
        int64_t life = e->expires_ms - e->obtained_ms;
        if (!e->prefetch && now - e->last_used_ms > life && !e->waiters && !e->completing)
            return 1;
        start_refresh(e, now, "due");
    }
    /* a prefetched key is never left without a token and nothing under way: at start, once a
     * held permanent error has had its time, once its token expired */
    if (e->prefetch && !e->tok.access_token && e->state == E_IDLE && !e->held_until_ms)
        start_attempt(e);
    return 0;
}

static void on_tick(uv_timer_t *t)
{
    struct token_cache *c = t->data;
    int64_t now = mono_now();
    char res[160];
    c->tick_due_ms = 0;
    for (int b = 0; b < NBUCKETS; b++) {
        struct cache_entry *e = c->buckets[b];
        while (e) {
            e->pins++; /* callbacks may evict anything but a pinned entry, e->next included */
            int unused = tick_entry(e, now);
            e->pins--;
            struct cache_entry *next = e->next;
            if (unused && idle(e)) {
                log_key(e, res, sizeof res);
                log_info("token_dropped", "client_id=%s resource=%s reason=unused", e->client_id,
                         res);
                unlink_entry(c, e);
                entry_free(e);
            }
            e = next;
        }
    }
    arm_tick(c);
}

/* Arms the tick for the earliest thing due. */
static void arm_tick(struct token_cache *c)
{
    int64_t due = 0;
#define CONSIDER(t)                                                                                \
    do {                                                                                           \
        if ((t) > 0 && (!due || (t) < due))                                                        \
            due = (t);                                                                             \
    } while (0)
    for (int b = 0; b < NBUCKETS; b++)
        for (struct cache_entry *e = c->buckets[b]; e; e = e->next) {
            for (struct token_cache_waiter *w = e->waiters; w; w = w->next)
                CONSIDER(w->deadline_ms);
            if (e->state == E_BACKOFF)
                CONSIDER(e->backoff_until_ms);
            /* only what on_tick acts on: a due time it ignores would make the tick spin */
            if (e->tok.access_token && e->state == E_IDLE)
                CONSIDER(e->refresh_ms);
            if (e->tok.access_token && !busy(e))
                CONSIDER(e->serve_until_ms);
            CONSIDER(e->held_until_ms);
        }
#undef CONSIDER
    if (!due) {
        uv_timer_stop(&c->tick);
        c->tick_due_ms = 0;
        return;
    }
    int64_t delay = due - mono_now(); /* libuv's timers are monotonic too */
    /* at least 1 ms: a timer re-armed at 0 runs again before the loop polls for I/O */
    uint64_t in_ms = delay > 1 ? (uint64_t)delay : 1;
    /* armed for this already, and not later than that (the clocks agree, but not a test's) */
    if (c->tick_due_ms == due && uv_is_active((uv_handle_t *)&c->tick) &&
        uv_timer_get_due_in(&c->tick) <= in_ms)
        return;
    c->tick_due_ms = due;
    uv_timer_start(&c->tick, on_tick, in_ms, 0);
}

/* ---- public -------------------------------------------------------------------------------- */

struct token_cache *token_cache_new(uv_loop_t *loop, const struct token_cache_opts *o,
                                    struct entra *entra, struct token_file *tf)
{
    struct token_cache *c = xcalloc(1, sizeof *c);
    c->loop = loop;
    c->opts = *o;
    c->entra = entra;
    c->tf = tf;
    uv_timer_init(loop, &c->tick);
    c->tick.data = c;
    if (uv_random(NULL, NULL, &c->rng, sizeof c->rng, 0, NULL) < 0 || !c->rng)
        c->rng = (uint64_t)now_wall_ms() | 1;
    return c;
}

enum cache_result token_cache_get(struct token_cache *c, struct token_cache_waiter *w,
                                  const char *client_id, const char *resource, size_t resource_len,
                                  struct token **tok, struct entra_result *err)
{
    int64_t now = mono_now();
    uint64_t h = hash_key(client_id, resource, resource_len);
    struct cache_entry *e = find(c, h, client_id, resource, resource_len);
    if (e) {
        e->last_used_ms = now;
        if (e->tok.access_token && now < e->serve_until_ms) {
            if (now >= e->refresh_ms && e->state == E_IDLE) /* before the tick saw it, or */
                start_refresh(e, now, "request");           /* after a failed refresh gave up */
            *tok = &e->tok;
            metrics.cache_hits++;
            return CACHE_HIT;
        }
        if (now < e->held_until_ms) {
            *err = e->held;
            return CACHE_FAIL;
        }
        if (now < e->throttled_until_ms) {
            set_local_error(err, ENTRA_THROTTLED, "too_many_requests",
                            "Entra is throttling token requests for this identity and resource",
                            (int)((e->throttled_until_ms - now + 999) / 1000));
            return CACHE_FAIL;
        }
    }
    if (!w)
        return CACHE_WAIT; /* the caller asks again with a waiter */
    if (!e) {
        if ((c->nentries >= CACHE_MAX_ENTRIES || c->token_bytes >= CACHE_MAX_TOKEN_BYTES) &&
            evict_one(c) < 0)
            return CACHE_FULL;
        e = entry_new(c, h, client_id, resource, resource_len, now);
    }
    w->entry = e;
    w->prev = NULL;
    w->next = e->waiters;
    w->deadline_ms = now + (int64_t)c->opts.entra_timeout_s * 1000;
    if (e->waiters)
        e->waiters->prev = w;
    e->waiters = w;
    if (e->state == E_BACKOFF && e->backoff_until_ms - now > BACKOFF_FOREGROUND_CAP_MS) {
        /* a long background backoff: a waiting client should not sit through it */
        set_state(e, E_IDLE);
    }
    metrics.cache_waits++;
    if (e->state == E_IDLE) {
        metrics.cache_misses++; /* this request starts the exchange; the others join it */
        start_attempt(e);
    }
    arm_tick(c);
    return CACHE_WAIT;
}

void token_cache_prefetch(struct token_cache *c, const char *client_id, const char *resource)
{
    size_t rlen = strlen(resource);
    uint64_t h = hash_key(client_id, resource, rlen);
    struct cache_entry *e = find(c, h, client_id, resource, rlen);
    if (!e)
        e = entry_new(c, h, client_id, resource, rlen, mono_now());
    if (!e->prefetch) {
        e->prefetch = 1;
        if (c->prefetch_tail)
            c->prefetch_tail->prefetch_next = e;
        else
            c->prefetch_head = e;
        c->prefetch_tail = e;
    }
    char res[160];
    log_key(e, res, sizeof res);
    log_info("token_prefetch", "client_id=%s resource=%s", e->client_id, res);
    if (e->state == E_IDLE && !e->tok.access_token)
        start_attempt(e);
    arm_tick(c);
}

int token_cache_prefetch_missing(struct token_cache *c, int *total, char *why, size_t n)
{
    int64_t now = mono_now();
    int missing = 0;
    *total = 0;
    if (n)
        why[0] = 0;
    for (struct cache_entry *e = c->prefetch_head; e; e = e->prefetch_next) {
        ++*total;
        if (e->tok.access_token && now < e->serve_until_ms)
            continue;
        if (missing++ || !n)
            continue;
        char res[160];
        log_key(e, res, sizeof res);
        const char *reason = now < e->held_until_ms ? e->held.description
                             : e->have_last         ? e->last.description
                             : busy(e)              ? "being fetched"
                                                    : "not fetched yet";
        snprintf(why, n, "no token yet for client_id=%s resource=%s: %s", e->client_id, res,
                 reason);
    }
    return missing;
}

void token_cache_foreach(struct token_cache *c,
                         void (*fn)(void *arg, const struct token_cache_info *), void *arg)
{
    int64_t now = mono_now();
    for (int b = 0; b < NBUCKETS; b++)
        for (struct cache_entry *e = c->buckets[b]; e; e = e->next) {
            struct token_cache_info i = {e->client_id, e->resource, e->resource_len, 0, 0, 0};
            if (e->tok.access_token && now < e->serve_until_ms) {
                i.has_token = 1;
                i.expires_ms = e->expires_ms;
                i.refresh_ms = e->refresh_ms;
            }
            fn(arg, &i);
        }
}

void token_cache_cancel(struct token_cache_waiter *w)
{
    if (w->entry)
        unlink_waiter(w->entry, w);
}

static void on_tick_closed(uv_handle_t *h)
{
    free(h->data);
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
            entra_cancel(&e->fetch);
            if (e->waiters) {
                struct entra_result r;
                set_local_error(&r, ENTRA_TRANSIENT, "service_unavailable",
                                "imdsd is shutting down", 0);
                complete(e, NULL, &r, 0);
            }
            entry_free(e);
        }
    }
    c->slot_head = c->slot_tail = NULL;
    uv_timer_stop(&c->tick);
    uv_close((uv_handle_t *)&c->tick, on_tick_closed);
}

/* Unit tests for token_cache.c: what a waiter's callback may do while the cache runs it.
 *
 * The callback of a waiter answers an HTTP client, and answering may dispatch that connection's
 * next pipelined request at once, so the callback can look up, create, evict or cancel anything
 * before it returns. These tests drive the cache with the token file and Entra replaced by
 * scripted fakes (this file defines token_file_get, entra_fetch, ... so the linker does not take
 * token_file.o and entra.o from the library), and let callbacks re-enter the cache the way the
 * HTTP server does. They run under ASan and valgrind too, where a use after free is reported.
 *
 * The clocks are wrapped (-Wl,--wrap=now_ms,--wrap=now_wall_ms): they run in real time, with a
 * skew a test may set (the loop's timers run in real time too), or frozen at values a test steps,
 * to show that a wall clock stepped either way changes no validity window. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "entra.h"
#include "log.h"
#include "refresh.h"
#include "token_cache.h"
#include "token_file.h"
#include "util.h"

#define CLIENT  "11111111-2222-3333-4444-555555555555"
#define HOUR_MS (3600 * 1000)

/* ---- the clocks ------------------------------------------------------------------------------ */

static int frozen;         /* 0: real time (plus mono_skew); 1: fake_mono and fake_wall */
static int64_t mono_skew;  /* added to the real monotonic clock */
static uint64_t fake_mono; /* counts from boot */
static int64_t fake_wall;  /* milliseconds since the epoch */
uint64_t __real_now_ms(void);
uint64_t __wrap_now_ms(void);
uint64_t __wrap_now_ms(void)
{
    return frozen ? fake_mono : __real_now_ms() + (uint64_t)mono_skew;
}
int64_t __real_now_wall_ms(void);
int64_t __wrap_now_wall_ms(void);
int64_t __wrap_now_wall_ms(void)
{
    return frozen ? fake_wall : __real_now_wall_ms();
}

static void freeze(void)
{
    frozen = 1;
    fake_mono = 5000000;
    fake_wall = 1700000000000;
}

/* ---- fakes for token_file and entra ---------------------------------------------------------- */

#define MAX_PENDING 64

static struct token_file_waiter *reads[MAX_PENDING]; /* token_file_get calls not answered yet */
static int nreads;
static int double_links; /* token_file_get for a waiter that was still waiting */
static struct entra_fetch *fetches[MAX_PENDING];
static int nfetches;

void token_file_get(struct token_file *tf, struct token_file_waiter *w)
{
    (void)tf;
    if (w->linked) {
        double_links++;
        return;
    }
    if (nreads == MAX_PENDING)
        abort();
    w->linked = 1;
    reads[nreads++] = w;
}

void token_file_cancel(struct token_file_waiter *w)
{
    for (int i = 0; i < nreads; i++)
        if (reads[i] == w) {
            reads[i] = reads[--nreads];
            break;
        }
    w->linked = 0;
}

const char *token_state_name(enum token_state s)
{
    return s == TOKEN_OK ? "ok" : "missing";
}

int entra_fetch(struct entra *e, struct entra_fetch *f, const char *client_id, const char *resource,
                const char *assertion, size_t assertion_len)
{
    (void)e;
    (void)assertion;
    (void)assertion_len;
    if (nfetches == MAX_PENDING)
        abort();
    f->client_id = client_id;
    f->resource = resource;
    f->sent_mono_ms = (int64_t)now_ms();
    f->sent_wall_ms = now_wall_ms();
    f->active = 1;
    fetches[nfetches++] = f;
    return 0;
}

void entra_cancel(struct entra_fetch *f)
{
    for (int i = 0; i < nfetches; i++)
        if (fetches[i] == f) {
            fetches[i] = fetches[--nfetches];
            break;
        }
    f->active = 0;
}

/* Answers the oldest pending token-file read with st, and tok (NULL: no usable token). */
static void answer_read(const struct token_file_status *st, const char *tok)
{
    assert_true(nreads > 0);
    struct token_file_waiter *w = reads[0];
    memmove(reads, reads + 1, sizeof reads[0] * (size_t)--nreads);
    w->linked = 0;
    w->cb(w->arg, st, tok, tok ? strlen(tok) : 0);
}

/* Answers the oldest pending token-file read with a usable token. */
static void finish_read(void)
{
    struct token_file_status st = {.state = TOKEN_OK};
    answer_read(&st, "a.b.c");
}

/* Answers the pending exchange for resource: a token for 3599 s when kind is ENTRA_OK, else an
 * error with Retry-After: retry_after when not 0. */
static void finish_fetch_ra(const char *resource, enum entra_kind kind, int64_t aadsts,
                            int retry_after)
{
    int i = 0;
    while (i < nfetches && strcmp(fetches[i]->resource, resource) != 0)
        i++;
    if (i == nfetches)
        fail_msg("no exchange pending for %s", resource);
    struct entra_fetch *f = fetches[i];
    fetches[i] = fetches[--nfetches];
    f->active = 0;
    struct entra_result r = {.kind = kind, .aadsts = aadsts, .retry_after = retry_after};
    if (kind == ENTRA_OK) {
        r.access_token = xstrdup("eyJ0eXAiOiJKV1QifQ.e30.c2ln");
        r.token_len = strlen(r.access_token);
        r.expires_in = r.ext_expires_in = 3599;
        r.http_status = 200;
    } else {
        r.http_status = kind == ENTRA_PERMANENT ? 400 : 401;
        snprintf(r.error, sizeof r.error, "%s",
                 kind == ENTRA_PERMANENT ? "invalid_resource" : "invalid_client");
    }
    f->done(f, &r);
    secret_free_str(r.access_token);
}

static void finish_fetch(const char *resource, enum entra_kind kind, int64_t aadsts)
{
    finish_fetch_ra(resource, kind, aadsts, 0);
}

/* ---- the cache under test, and waiters that act like HTTP connections ------------------------ */

static uv_loop_t loop;
static struct token_cache_opts opts;
static struct token_cache *cache;

struct twaiter {
    struct token_cache_waiter w;
    int called, ok;
    /* what the callback does next, like the next pipelined request on the same connection */
    const char *then_resource;
    struct twaiter *then;  /* the waiter it registers (NULL: a lookup only) */
    struct twaiter *abort; /* or: the waiter of another connection it cancels */
    enum cache_result then_rc;
};

#define MAX_WAITERS 2100
static struct twaiter waiters[MAX_WAITERS];
static int nwaiters;

static void on_done(struct token_cache_waiter *w, const struct token *tok,
                    const struct entra_result *err)
{
    struct twaiter *t = w->data;
    t->called++;
    t->ok = tok != NULL && err == NULL && tok->access_token != NULL;
    if (t->abort)
        token_cache_cancel(&t->abort->w);
    if (t->then_resource) {
        struct token *tk;
        struct entra_result e;
        t->then_rc = token_cache_get(cache, t->then ? &t->then->w : NULL, CLIENT, t->then_resource,
                                     strlen(t->then_resource), &tk, &e);
    }
}

static struct twaiter *tw(void)
{
    if (nwaiters == MAX_WAITERS)
        abort();
    struct twaiter *t = &waiters[nwaiters++];
    memset(t, 0, sizeof *t);
    t->w.done = on_done;
    t->w.data = t;
    return t;
}

/* A lookup; *tokp and *errp, when not NULL, receive what the cache gave. */
static enum cache_result get_r(const char *resource, struct twaiter *t, struct token **tokp,
                               struct entra_result *errp)
{
    struct token *tok = NULL;
    struct entra_result err;
    memset(&err, 0, sizeof err);
    enum cache_result rc =
        token_cache_get(cache, t ? &t->w : NULL, CLIENT, resource, strlen(resource), &tok, &err);
    if (tokp)
        *tokp = tok;
    if (errp)
        *errp = err;
    return rc;
}

static enum cache_result get(const char *resource, struct twaiter *t)
{
    return get_r(resource, t, NULL, NULL);
}

/* A lookup made ago_ms earlier: the least recently used entry is the one evicted. */
static enum cache_result get_ago(const char *resource, struct twaiter *t, int64_t ago_ms)
{
    mono_skew -= ago_ms;
    enum cache_result rc = get(resource, t);
    mono_skew += ago_ms;
    return rc;
}

static int setup(void **state)
{
    (void)state;
    log_min_level = LOG_WARN;
    nreads = nfetches = double_links = nwaiters = 0;
    frozen = 0;
    mono_skew = 0;
    memset(&opts, 0, sizeof opts);
    opts.entra_timeout_s = 15;
    assert_int_equal(uv_loop_init(&loop), 0);
    cache = token_cache_new(&loop, &opts, NULL, NULL);
    return 0;
}

/* The cache again, its waiters waiting at most timeout_s (it copies its options when made). */
static void remake_cache(unsigned timeout_s)
{
    token_cache_free(cache);
    uv_run(&loop, UV_RUN_DEFAULT); /* its timer handle closes */
    opts.entra_timeout_s = timeout_s;
    cache = token_cache_new(&loop, &opts, NULL, NULL);
}

static int teardown(void **state)
{
    (void)state;
    token_cache_free(cache);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    return 0;
}

static void on_stop(uv_timer_t *t)
{
    uv_stop(t->loop);
}

/* Runs the loop (the cache's tick) for ms milliseconds. */
static void run_for(uint64_t ms)
{
    uv_timer_t t;
    uv_timer_init(&loop, &t);
    uv_timer_start(&t, on_stop, ms, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
}

/* Creates n entries holding a permanent error (idle, evictable), used now. */
static void fill(const char *prefix, int n)
{
    char res[64];
    for (int i = 0; i < n; i++) {
        snprintf(res, sizeof res, "https://%s%d.example/", prefix, i);
        struct twaiter *t = tw();
        assert_int_equal(get(res, t), CACHE_WAIT);
        finish_read();
        finish_fetch(res, ENTRA_PERMANENT, 500011);
        assert_int_equal(t->called, 1);
        nwaiters--; /* answered: the slot can be reused */
    }
}

/* ---- tests ----------------------------------------------------------------------------------- */

/* The review's sequence: T's answer is sent, the client's pipelined request for a new key N finds
 * the cache full and evicts the least recently used idle entry, which is T itself. */
static void t_pipelined_request_evicts_entry_being_answered(void **state)
{
    (void)state;
    struct twaiter *t = tw();
    t->then_resource = "https://n.example/";
    t->then = tw();
    assert_int_equal(get_ago("https://t.example/", t, 10), CACHE_WAIT);
    finish_read();
    fill("fill", CACHE_MAX_ENTRIES - 1);
    finish_fetch("https://t.example/", ENTRA_OK, 0);
    assert_int_equal(t->called, 1);
    assert_true(t->ok);
    assert_int_equal(t->then_rc, CACHE_WAIT); /* room was made by evicting another entry */
    assert_int_equal(get("https://t.example/", NULL), CACHE_HIT);
    assert_int_equal(nreads, 1); /* N's attempt started */
    finish_read();
    finish_fetch("https://n.example/", ENTRA_OK, 0);
    assert_int_equal(t->then->called, 1);
    assert_true(t->then->ok);
}

/* A stale assertion twice (AADSTS700024) answers the waiters at once; the callback's request for
 * the same key starts a new attempt, which the failed one must not overwrite with a backoff (a tick
 * would then start a second attempt on the same entry: a doubly linked waiter, a lost slot). */
static void t_same_key_request_from_failure_callback(void **state)
{
    (void)state;
    const char *k = "https://k.example/";
    struct twaiter *t = tw();
    t->then_resource = k;
    t->then = tw();
    assert_int_equal(get(k, t), CACHE_WAIT);
    finish_read();
    finish_fetch(k, ENTRA_TRANSIENT, 700024); /* re-reads the token file */
    finish_read();
    finish_fetch(k, ENTRA_TRANSIENT, 700024); /* still stale: answered now */
    assert_int_equal(t->called, 1);
    assert_false(t->ok);
    assert_int_equal(t->then_rc, CACHE_WAIT);
    assert_int_equal(nreads, 1);
    run_for(1100); /* longer than any first backoff */
    assert_int_equal(double_links, 0);
    assert_int_equal(nreads, 1);
    assert_int_equal(nfetches, 0);
    finish_read();
    finish_fetch(k, ENTRA_OK, 0);
    assert_int_equal(t->then->called, 1);
    assert_true(t->then->ok);
    /* every exchange slot came back: as many new keys start at once as there are slots */
    char res[64];
    for (int i = 0; i < CACHE_MAX_EXCHANGES; i++) {
        snprintf(res, sizeof res, "https://slot%d.example/", i);
        assert_int_equal(get(res, tw()), CACHE_WAIT);
    }
    assert_int_equal(nreads, CACHE_MAX_EXCHANGES);
}

/* Mirrors token_cache.c's hash_key and bucket count, to place two keys in one hash chain. */
static unsigned bucket_of(const char *client_id, const char *resource)
{
    uint64_t h = 1469598103934665603ull;
    for (const char *p = client_id; *p; p++)
        h = (h ^ (unsigned char)(*p | 0x20)) * 1099511628211ull;
    h = (h ^ 0xff) * 1099511628211ull;
    for (const char *p = resource; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    return (unsigned)(h % 256);
}

/* The tick answers a waiter whose deadline passed; its callback's new key evicts the entry that
 * follows in the same hash chain, which the tick visits next. */
static void t_tick_callback_evicts_next_entry(void **state)
{
    (void)state;
    remake_cache(1);
    const char *b = "https://b.example/";
    char a[64];
    for (int i = 0;; i++) {
        snprintf(a, sizeof a, "https://a%d.example/", i);
        if (bucket_of(CLIENT, a) == bucket_of(CLIENT, b))
            break;
    }
    struct twaiter *tb = tw();
    assert_int_equal(get_ago(b, tb, 1000), CACHE_WAIT); /* the least recently used */
    finish_read();
    finish_fetch(b, ENTRA_PERMANENT, 500011);
    struct twaiter *ta = tw();
    ta->then_resource = "https://new.example/";
    ta->then = tw();
    assert_int_equal(get(a, ta), CACHE_WAIT); /* heads b's chain; Entra never answers */
    finish_read();
    fill("fill", CACHE_MAX_ENTRIES - 2);
    run_for(1500);
    assert_int_equal(ta->called, 1);
    assert_false(ta->ok);
    assert_int_equal(ta->then_rc, CACHE_WAIT);
    assert_int_equal(get(b, NULL), CACHE_WAIT); /* b was evicted */
}

/* A callback that cancels another waiter of the same answer: that one is never called. */
static void t_callback_cancels_other_waiter(void **state)
{
    (void)state;
    const char *k = "https://k.example/";
    struct twaiter *t1 = tw(), *t2 = tw();
    assert_int_equal(get(k, t1), CACHE_WAIT);
    assert_int_equal(get(k, t2), CACHE_WAIT);
    /* waiters are answered newest first: t2 runs first and cancels t1 */
    t2->abort = t1;
    finish_read();
    finish_fetch(k, ENTRA_OK, 0);
    assert_int_equal(t2->called, 1);
    assert_int_equal(t1->called, 0);
}

/* A callback that asks again for the key it was just answered for gets the token from memory. */
static void t_callback_gets_the_token_it_was_given(void **state)
{
    (void)state;
    const char *k = "https://k.example/";
    struct twaiter *t = tw();
    t->then_resource = k;
    assert_int_equal(get(k, t), CACHE_WAIT);
    finish_read();
    finish_fetch(k, ENTRA_OK, 0);
    assert_true(t->ok);
    assert_int_equal(t->then_rc, CACHE_HIT);
    assert_int_equal(nreads + nfetches, 0);
}

/* ---- a stepped wall clock -------------------------------------------------------------------- */

/* Makes k hold a permanent error, answered at the frozen clocks' present. */
static void hold_error(const char *k)
{
    struct twaiter *t = tw();
    assert_int_equal(get(k, t), CACHE_WAIT);
    finish_read();
    finish_fetch(k, ENTRA_PERMANENT, 500011);
    assert_int_equal(t->called, 1);
    assert_false(t->ok);
    assert_int_equal(get(k, NULL), CACHE_FAIL);
}

/* A permanent error is repeated for PERMANENT_ERROR_HOLD_MS of real time, however the wall clock
 * is stepped meanwhile: back an hour, it is not repeated for an hour more (every client of the
 * key would get the error without Entra being asked); forward, it is not dropped early. */
static void t_held_error_ignores_wall_clock_steps(void **state)
{
    (void)state;
    const char *k = "https://held.example/", *k2 = "https://held2.example/";
    freeze();
    uint64_t start = fake_mono;
    hold_error(k);
    fake_wall -= HOUR_MS;
    fake_mono += 1000;
    assert_int_equal(get(k, NULL), CACHE_FAIL); /* still held */
    fake_mono = start + PERMANENT_ERROR_HOLD_MS - 1;
    assert_int_equal(get(k, NULL), CACHE_FAIL); /* the last millisecond of the hold */
    fake_mono += 1;
    assert_int_equal(get(k, NULL), CACHE_WAIT); /* over: the next request asks Entra again */
    /* forward an hour */
    start = fake_mono;
    hold_error(k2);
    fake_wall += HOUR_MS;
    fake_mono += 1000;
    assert_int_equal(get(k2, NULL), CACHE_FAIL);
    fake_mono = start + PERMANENT_ERROR_HOLD_MS;
    assert_int_equal(get(k2, NULL), CACHE_WAIT);
    assert_int_equal(nreads + nfetches, 0);
}

/* Fetches a token for k (expires_in 3599) at the frozen clocks' present. */
static void fetch_token(const char *k)
{
    struct twaiter *t = tw();
    assert_int_equal(get(k, t), CACHE_WAIT);
    finish_read();
    finish_fetch(k, ENTRA_OK, 0);
    assert_true(t->ok);
}

/* A token is served for its real lifetime: stepped back an hour, the wall clock does not keep it
 * an hour past its expiry (Entra's resources would refuse it); stepped forward, it does not drop
 * it. It is refreshed when due on the monotonic clock, and expires_in as clients see it
 * (token_now_epoch) is the lifetime really left while expires_on keeps the date of the answer. */
static void t_token_lifetime_ignores_wall_clock_steps(void **state)
{
    (void)state;
    const char *k = "https://tok.example/", *k2 = "https://tok2.example/";
    freeze();
    int64_t sent_mono = (int64_t)fake_mono, sent_wall_s = fake_wall / 1000;
    struct token *tok;
    fetch_token(k);
    fake_wall -= HOUR_MS;
    fake_mono += 1000 * 1000;
    assert_int_equal(get_r(k, NULL, &tok, NULL), CACHE_HIT);
    assert_int_equal(tok->expires_on, sent_wall_s + 3599);
    assert_int_equal(tok->expires_on - token_now_epoch(tok, (int64_t)now_ms()), 2599);
    assert_int_equal(nreads, 0);
    /* the refresh is due at the latest REFRESH_LATEST_BEFORE_EXPIRY_MS before expiry */
    fake_mono = (uint64_t)(sent_mono + 3599 * 1000 - REFRESH_LATEST_BEFORE_EXPIRY_MS);
    assert_int_equal(get_r(k, NULL, &tok, NULL), CACHE_HIT);
    assert_int_equal(nreads, 1); /* a request found it due: the refresh started */
    /* Entra does not answer the refresh: the token is served until the margin before expiry */
    fake_mono = (uint64_t)(sent_mono + 3599 * 1000 - REFRESH_SERVE_MARGIN_MS - 1);
    assert_int_equal(get_r(k, NULL, &tok, NULL), CACHE_HIT);
    fake_mono += 1;
    assert_int_equal(get(k, NULL), CACHE_WAIT); /* not served: the refresh must bring a new one */
    finish_read();
    finish_fetch(k, ENTRA_OK, 0);
    assert_int_equal(get_r(k, NULL, &tok, NULL), CACHE_HIT);
    /* the new token's expires_on is dated on the (stepped) wall clock of its send */
    assert_int_equal(tok->expires_on, fake_wall / 1000 + 3599);
    assert_int_equal(tok->expires_on - token_now_epoch(tok, (int64_t)now_ms()), 3599);
    /* forward an hour */
    sent_mono = (int64_t)fake_mono;
    sent_wall_s = fake_wall / 1000;
    fetch_token(k2);
    fake_wall += HOUR_MS;
    fake_mono += 10 * 1000;
    assert_int_equal(get_r(k2, NULL, &tok, NULL), CACHE_HIT);
    assert_int_equal(tok->expires_on, sent_wall_s + 3599);
    assert_int_equal(tok->expires_on - token_now_epoch(tok, (int64_t)now_ms()), 3589);
    assert_int_equal(nreads, 0);
}

/* Makes k throttled for retry_after seconds, answered at the frozen clocks' present. */
static void throttle(const char *k, int retry_after)
{
    struct twaiter *t = tw();
    struct entra_result err;
    assert_int_equal(get(k, t), CACHE_WAIT);
    finish_read();
    finish_fetch_ra(k, ENTRA_THROTTLED, 0, retry_after);
    assert_int_equal(t->called, 1);
    assert_false(t->ok);
    assert_int_equal(get_r(k, NULL, NULL, &err), CACHE_FAIL);
    assert_int_equal(err.kind, ENTRA_THROTTLED);
    assert_int_equal(err.retry_after, retry_after);
}

/* Entra's 429 holds the key for Retry-After seconds of real time: a wall clock stepped back does
 * not make it last an hour more, stepped forward it does not end it early (Entra would throttle
 * harder). The Retry-After told to clients counts down in real time. */
static void t_retry_after_ignores_wall_clock_steps(void **state)
{
    (void)state;
    const char *k = "https://throttled.example/", *k2 = "https://throttled2.example/";
    struct entra_result err;
    freeze();
    uint64_t start = fake_mono;
    throttle(k, 60);
    fake_wall -= HOUR_MS;
    fake_mono += 1000;
    assert_int_equal(get_r(k, NULL, NULL, &err), CACHE_FAIL);
    assert_int_equal(err.retry_after, 59);
    fake_mono = start + 60 * 1000 - 1;
    assert_int_equal(get_r(k, NULL, NULL, &err), CACHE_FAIL);
    assert_int_equal(err.retry_after, 1);
    fake_mono += 1;
    assert_int_equal(get(k, NULL), CACHE_WAIT); /* over: Entra is asked again */
    /* forward an hour */
    start = fake_mono;
    throttle(k2, 60);
    fake_wall += HOUR_MS;
    fake_mono += 1000;
    assert_int_equal(get_r(k2, NULL, NULL, &err), CACHE_FAIL);
    assert_int_equal(err.retry_after, 59);
    fake_mono = start + 60 * 1000;
    assert_int_equal(get(k2, NULL), CACHE_WAIT);
}

/* ---- --prefetch ----------------------------------------------------------------------------- */

#define PRE "https://pre.example/"

static int prefetch_missing(void)
{
    int total;
    char why[200];
    return token_cache_prefetch_missing(cache, &total, why, sizeof why);
}

/* Answers the oldest pending token-file read with "the file is missing". */
static void finish_read_missing(void)
{
    struct token_file_status st = {.state = TOKEN_MISSING};
    snprintf(st.reason, sizeof st.reason, "token file does not exist");
    answer_read(&st, NULL);
}

/* A prefetched key is fetched with no request, and then outlives a cache filled to the brim by
 * keys used after it: the least recently used idle entry is evicted, never a prefetched one. */
static void t_prefetch_never_evicted(void **state)
{
    (void)state;
    int total;
    char why[200];
    mono_skew = -60000; /* made a minute before the others: the least recently used */
    token_cache_prefetch(cache, CLIENT, PRE);
    mono_skew = 0;
    assert_int_equal(token_cache_prefetch_missing(cache, &total, why, sizeof why), 1);
    assert_int_equal(total, 1);
    assert_non_null(strstr(why, "resource=" PRE ": being fetched"));
    finish_read();
    finish_fetch(PRE, ENTRA_OK, 0);
    assert_int_equal(prefetch_missing(), 0);
    fill("full", CACHE_MAX_ENTRIES + 8); /* every new key past the limit evicts one */
    struct token *tok = NULL;
    assert_int_equal(get_r(PRE, NULL, &tok, NULL), CACHE_HIT);
    assert_non_null(tok);
    assert_int_equal(nfetches, 0);
}

/* A failed prefetch is retried with backoff although nobody waits (a requested key's failure with
 * nobody waiting and nothing cached is not), and the reason is kept for /readyz. */
static void t_prefetch_retries_failures(void **state)
{
    (void)state;
    int total;
    char why[200];
    token_cache_prefetch(cache, CLIENT, PRE);
    struct twaiter *t = tw();
    assert_int_equal(get("https://asked.example/", t), CACHE_WAIT);
    finish_read();
    finish_read();
    token_cache_cancel(&t->w); /* its client went away */
    finish_fetch(PRE, ENTRA_TRANSIENT, 0);
    finish_fetch("https://asked.example/", ENTRA_TRANSIENT, 0);
    assert_int_equal(t->called, 0);
    assert_int_equal(nreads + nfetches, 0);
    assert_int_equal(token_cache_prefetch_missing(cache, &total, why, sizeof why), 1);
    run_for(BACKOFF_BASE_MS * 2 + 200); /* the first retry waits at most 2 s (full jitter) */
    assert_int_equal(nreads, 1);        /* the prefetched key's, not the other */
    finish_read();
    finish_fetch(PRE, ENTRA_OK, 0);
    assert_int_equal(prefetch_missing(), 0);
}

/* Before the token file exists, the prefetched key asks again every second (the readiness says
 * why), and its token comes as soon as the file does. */
static void t_prefetch_waits_for_token_file(void **state)
{
    (void)state;
    int total;
    char why[200];
    token_cache_prefetch(cache, CLIENT, PRE);
    finish_read_missing();
    assert_int_equal(nreads, 0);
    assert_int_equal(token_cache_prefetch_missing(cache, &total, why, sizeof why), 1);
    assert_non_null(strstr(why, "token file does not exist"));
    run_for(1200);
    assert_int_equal(nreads, 1);
    finish_read();
    finish_fetch(PRE, ENTRA_OK, 0);
    assert_int_equal(prefetch_missing(), 0);
}

static void latest_refresh(void *arg, const struct token_cache_info *i)
{
    int64_t *due = arg;
    if (i->has_token && i->refresh_ms > *due)
        *due = i->refresh_ms;
}

static void count_entries(void *arg, const struct token_cache_info *i)
{
    (void)i;
    ++*(int *)arg;
}

/* Steps the frozen clock to the last refresh due and lets the tick run. */
static void tick_past_refreshes(void)
{
    int64_t due = 0;
    token_cache_foreach(cache, latest_refresh, &due);
    assert_true(due > 0);
    fake_mono = (uint64_t)due + 1;
    struct twaiter *t = tw(); /* a lookup arms the tick for what is due now */
    assert_int_equal(get("https://kick.example/", t), CACHE_WAIT);
    run_for(20);
}

/* A token nobody asked for during its whole life is dropped at its refresh, not refreshed; a
 * prefetched one is refreshed for as long as imdsd runs. */
static int fetch_pending(const char *resource)
{
    for (int i = 0; i < nfetches; i++)
        if (strcmp(fetches[i]->resource, resource) == 0)
            return 1;
    return 0;
}

static void t_prefetch_refreshed_though_unused(void **state)
{
    (void)state;
    freeze();
    const char *k = "https://asked-once.example/";
    fetch_token(k);
    token_cache_prefetch(cache, CLIENT, PRE);
    finish_read();
    finish_fetch(PRE, ENTRA_OK, 0);
    /* refreshes come about half-way through a token's life: k is refreshed until a refresh finds
     * it unused for a whole lifetime (the third, or the fourth with the jitter) */
    int k_refreshes = 0;
    for (int round = 0; round < 5; round++) {
        tick_past_refreshes();
        while (nreads)
            finish_read();
        assert_true(fetch_pending(PRE)); /* refreshed every time */
        finish_fetch(PRE, ENTRA_OK, 0);
        if (fetch_pending(k)) {
            k_refreshes++;
            finish_fetch(k, ENTRA_OK, 0);
        }
    }
    assert_true(k_refreshes >= 1 && k_refreshes < 4);
    int n = 0;
    token_cache_foreach(cache, count_entries, &n);
    assert_int_equal(n, 2); /* PRE and the kick: k was dropped */
    struct token *tok;
    assert_int_equal(get_r(PRE, NULL, &tok, NULL), CACHE_HIT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(t_pipelined_request_evicts_entry_being_answered, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(t_same_key_request_from_failure_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(t_tick_callback_evicts_next_entry, setup, teardown),
        cmocka_unit_test_setup_teardown(t_callback_cancels_other_waiter, setup, teardown),
        cmocka_unit_test_setup_teardown(t_callback_gets_the_token_it_was_given, setup, teardown),
        cmocka_unit_test_setup_teardown(t_held_error_ignores_wall_clock_steps, setup, teardown),
        cmocka_unit_test_setup_teardown(t_token_lifetime_ignores_wall_clock_steps, setup, teardown),
        cmocka_unit_test_setup_teardown(t_retry_after_ignores_wall_clock_steps, setup, teardown),
        cmocka_unit_test_setup_teardown(t_prefetch_never_evicted, setup, teardown),
        cmocka_unit_test_setup_teardown(t_prefetch_retries_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(t_prefetch_waits_for_token_file, setup, teardown),
        cmocka_unit_test_setup_teardown(t_prefetch_refreshed_though_unused, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* metrics_render.c - the Prometheus text exposition of imdsd's counters (GET /metrics on the health
 * listener). Counting happens where things happen (metrics.h); this file only renders, and
 * rendering runs when a scraper asks, never on the token path. */
#include "metrics_render.h"

#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "buf.h"
#include "http_server.h"
#include "metrics.h"
#include "token_cache.h"
#include "token_file.h"
#include "util.h"

#define TOKEN_SERIES_MAX 64 /* per-token gauges shown, soonest expiry first */

static void head(struct buf *b, const char *name, const char *type, const char *help)
{
    buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A metric without labels whose value is a whole number. */
static void scalar(struct buf *b, const char *name, const char *type, const char *help,
                   uint64_t value)
{
    head(b, name, type, help);
    buf_printf(b, "%s %llu\n", name, (unsigned long long)value);
}

/* A label value: \, " and newline escaped; bytes outside printable ASCII (a client-chosen
 * resource may hold anything) become '?', so the exposition stays valid UTF-8; cut at
 * LABEL_MAX bytes with "..." (64 series of long resources must not fill the buffer). */
#define LABEL_MAX 256
static void label_value(struct buf *b, const char *s, size_t n)
{
    char out[2 * LABEL_MAX + 4];
    size_t o = 0;
    for (size_t i = 0; i < n && i < LABEL_MAX; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '\\' || ch == '"' || ch == '\n') {
            out[o++] = '\\';
            out[o++] = ch == '\n' ? 'n' : (char)ch;
        } else {
            out[o++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
        }
    }
    if (n > LABEL_MAX) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    buf_append(b, out, o);
}

/* ---- per-token gauges: the TOKEN_SERIES_MAX entries that expire first -------------------- */

struct token_pick {
    struct token_cache_info e[TOKEN_SERIES_MAX];
    int n;
    unsigned entries, with_token;
};

static void pick_token(void *arg, const struct token_cache_info *i)
{
    struct token_pick *p = arg;
    p->entries++;
    if (!i->has_token)
        return;
    p->with_token++;
    if (p->n < TOKEN_SERIES_MAX) {
        p->e[p->n++] = *i;
        return;
    }
    int latest = 0; /* replace the latest-expiring one if this expires sooner */
    for (int k = 1; k < p->n; k++)
        if (p->e[k].expires_ms > p->e[latest].expires_ms)
            latest = k;
    if (i->expires_ms < p->e[latest].expires_ms)
        p->e[latest] = *i;
}

static void token_series(struct buf *b, const struct token_pick *p, const char *name, int refresh,
                         int64_t now_ms)
{
    for (int k = 0; k < p->n; k++) {
        const struct token_cache_info *i = &p->e[k];
        buf_printf(b, "%s{client_id=\"", name);
        label_value(b, i->client_id, strlen(i->client_id));
        buf_puts(b, "\",resource=\"");
        label_value(b, i->resource, i->resource_len);
        int64_t at = refresh ? i->refresh_ms : i->expires_ms;
        buf_printf(b, "\"} %.3f\n", (double)(at - now_ms) / 1000.0);
    }
}

static void render_cache(struct buf *b, struct token_cache *cache)
{
    scalar(b, "imdsd_cache_hits_total", "counter", "Token requests answered from the cache.",
           metrics.cache_hits);
    scalar(b, "imdsd_cache_misses_total", "counter",
           "Token requests that found nothing usable cached and started an exchange with Entra.",
           metrics.cache_misses);
    scalar(b, "imdsd_cache_waits_total", "counter",
           "Token requests that waited for an exchange (started by them or already running).",
           metrics.cache_waits);

    static struct token_pick p; /* 64 entries: not on the stack */
    memset(&p, 0, sizeof p);
    if (cache)
        token_cache_foreach(cache, pick_token, &p);
    scalar(b, "imdsd_cache_entries", "gauge", "Keys (client id, resource) in the cache.",
           p.entries);
    scalar(b, "imdsd_cache_tokens", "gauge", "Cached tokens that can be served.", p.with_token);
    int64_t now = (int64_t)now_ms(); /* the cache's clock */
    head(b, "imdsd_token_expiry_seconds", "gauge",
         "Seconds until a cached token expires (the 64 that expire first).");
    token_series(b, &p, "imdsd_token_expiry_seconds", 0, now);
    head(b, "imdsd_token_refresh_seconds", "gauge",
         "Seconds until a cached token is refreshed in the background (negative: overdue).");
    token_series(b, &p, "imdsd_token_refresh_seconds", 1, now);
}

static void render_entra(struct buf *b)
{
    scalar(b, "imdsd_resources_refused_total", "counter",
           "Token requests refused before Entra for a resource --allow-resource does not name.",
           metrics.resources_refused);
    scalar(b, "imdsd_arc_challenges_refused_total", "counter",
           "Azure Arc challenges refused with 429: the user's share of the key slots or every slot "
           "held by live keys, or too many keys made in the last second.",
           metrics.arc_challenges_refused);
    scalar(
        b, "imdsd_arc_challenges_refused_per_user_total", "counter",
        "Of the refused Azure Arc challenges, those of a user holding its share of the key slots "
        "(one user's flood).",
        metrics.arc_challenges_refused_per_user);
    head(b, "imdsd_entra_exchanges_total", "counter", "Token exchanges with Entra, by outcome.");
    for (int o = 0; o < OUT_COUNT; o++)
        buf_printf(b, "imdsd_entra_exchanges_total{outcome=\"%s\"} %llu\n",
                   metrics_outcome_names[o], (unsigned long long)metrics.exchanges[o]);
    head(b, "imdsd_entra_exchange_duration_seconds", "histogram",
         "Duration of token exchanges with Entra, connection set-up included.");
    uint64_t cum = 0;
    for (int i = 0; i <= METRICS_LAT_BUCKETS; i++) {
        cum += metrics.exchange_latency[i];
        if (i < METRICS_LAT_BUCKETS)
            buf_printf(b, "imdsd_entra_exchange_duration_seconds_bucket{le=\"%g\"} %llu\n",
                       metrics_latency_bounds[i], (unsigned long long)cum);
        else
            buf_printf(b, "imdsd_entra_exchange_duration_seconds_bucket{le=\"+Inf\"} %llu\n",
                       (unsigned long long)cum);
    }
    buf_printf(b, "imdsd_entra_exchange_duration_seconds_sum %.6f\n", metrics.exchange_seconds_sum);
    buf_printf(b, "imdsd_entra_exchange_duration_seconds_count %llu\n", (unsigned long long)cum);
    scalar(b, "imdsd_entra_retries_total", "counter",
           "Exchange attempts after a failed one for the same key (backoff retries, stale-token "
           "re-reads).",
           metrics.retries);
    scalar(b, "imdsd_entra_failures_in_row", "gauge",
           "Failed exchanges since the last successful one (0: Entra answers).",
           metrics.entra_failures_in_row);
}

static void render_token_file(struct buf *b, struct token_file *tf)
{
    struct token_file_status st = {.state = TOKEN_UNKNOWN};
    if (tf)
        token_file_status(tf, now_wall_ms() / 1000, &st);
    head(b, "imdsd_token_file_state", "gauge",
         "The service-account token file's state: 1 for the current one.");
    for (int s = TOKEN_OK; s <= TOKEN_UNKNOWN; s++)
        buf_printf(b, "imdsd_token_file_state{state=\"%s\"} %d\n", token_state_name(s),
                   (int)st.state == s);
    head(b, "imdsd_token_file_expiry_timestamp_seconds", "gauge",
         "The exp claim of the service-account token (0: none read).");
    buf_printf(b, "imdsd_token_file_expiry_timestamp_seconds %lld\n",
               (long long)(st.state == TOKEN_OK || st.state == TOKEN_EXPIRED ||
                                   st.state == TOKEN_NOT_YET_VALID
                               ? st.claims.exp
                               : 0));
    scalar(b, "imdsd_token_file_loads_total", "counter",
           "New service-account tokens read (rotations, and the first one).",
           metrics.token_file_loads);
}

static void render_http(struct buf *b, struct http_server *server)
{
    head(b, "imdsd_http_requests_total", "counter",
         "HTTP requests answered, by endpoint and code.");
    for (int e = 0; e < EP_COUNT; e++) {
        for (int i = 0; i < METRICS_CODES && metrics.codes[e][i]; i++)
            buf_printf(b, "imdsd_http_requests_total{endpoint=\"%s\",code=\"%u\"} %llu\n",
                       metrics_endpoint_names[e], metrics.codes[e][i],
                       (unsigned long long)metrics.requests[e][i]);
        if (metrics.requests[e][METRICS_CODES])
            buf_printf(b, "imdsd_http_requests_total{endpoint=\"%s\",code=\"other\"} %llu\n",
                       metrics_endpoint_names[e],
                       (unsigned long long)metrics.requests[e][METRICS_CODES]);
    }
    scalar(b, "imdsd_http_connections", "gauge", "Client connections open.",
           server ? http_server_connections(server) : 0);
    scalar(
        b, "imdsd_http_connections_evicted_total", "counter",
        "Connections closed at a listener's connection limit to admit new ones: idle or stalled "
        "(the client does not read), then requests still arriving, then requests waiting longest.",
        metrics.connections_evicted);
    scalar(b, "imdsd_http_buffered_bytes", "gauge",
           "Bytes kept for clients: requests arriving, pipelined input, answers not yet taken in.",
           server ? http_server_buffered(server) : 0);
    scalar(b, "imdsd_http_connections_shed_total", "counter",
           "Connections closed, or their pipelined input dropped, to keep buffered bytes within "
           "the budget.",
           metrics.connections_shed);
    scalar(b, "imdsd_http_connections_refused_total", "counter",
           "Client connections closed at once: at a listener's connection limit with none to "
           "close, or out of descriptors.",
           metrics.connections_refused);
}

static void render_process(struct buf *b)
{
    head(b, "imdsd_build_info", "gauge", "imdsd's version, as a label; the value is 1.");
    buf_printf(b, "imdsd_build_info{version=\"%s\"} 1\n", IMDSD_VERSION);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    head(b, "process_cpu_seconds_total", "counter", "User and system CPU time spent.");
    buf_printf(b, "process_cpu_seconds_total %.3f\n",
               (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                   (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    long size = 0, pages = 0;
    FILE *f = fopen("/proc/self/statm", "re");
    if (f) {
        if (fscanf(f, "%ld %ld", &size, &pages) != 2)
            pages = 0;
        fclose(f);
    }
    head(b, "process_resident_memory_bytes", "gauge", "Resident memory size.");
    buf_printf(b, "process_resident_memory_bytes %lld\n", (long long)pages * sysconf(_SC_PAGESIZE));
    head(b, "process_start_time_seconds", "gauge", "Start time of the process (Unix seconds).");
    buf_printf(b, "process_start_time_seconds %lld\n", (long long)metrics.start_time_s);
}

void metrics_render(struct buf *b, struct token_file *tf, struct token_cache *cache,
                    struct http_server *server)
{
    render_http(b, server);
    render_cache(b, cache);
    render_entra(b);
    render_token_file(b, tf);
    render_process(b);
}

/* metrics.h - imdsd's counters and gauges, rendered as Prometheus text on the health listener.
 *
 * One process, one loop thread: the counters are plain integers that the code paths bump in
 * place (no allocation, no lock, no lookup per request). Values that already live elsewhere (the
 * token file's state, the cache's entries, open connections) are read when /metrics is rendered. */
#ifndef IMDSD_METRICS_H
#define IMDSD_METRICS_H

#include <stdint.h>

/* what answered: the endpoint label of imdsd_http_requests_total */
enum metrics_endpoint {
    EP_TOKEN,   /* /metadata/identity/oauth2/token */
    EP_MSI,     /* /msi/token (App Service) */
    EP_HEALTHZ, /* /healthz */
    EP_READYZ,  /* /readyz */
    EP_METRICS, /* /metrics */
    EP_OTHER,   /* anything else, and requests refused before routing (malformed, too large) */
    EP_COUNT
};
/* the label values, by enum metrics_endpoint */
extern const char *const metrics_endpoint_names[EP_COUNT];

/* outcome label of imdsd_entra_exchanges_total */
enum metrics_outcome { OUT_OK, OUT_THROTTLED, OUT_TRANSIENT, OUT_PERMANENT, OUT_COUNT };
/* the label values, by enum metrics_outcome */
extern const char *const metrics_outcome_names[OUT_COUNT];

#define METRICS_CODES       16 /* distinct status codes counted per endpoint; more go to "other" */
#define METRICS_LAT_BUCKETS 12

struct metrics {
    /* requests answered, by endpoint and status code (codes[i] filled in first-seen order) */
    uint16_t codes[EP_COUNT][METRICS_CODES];
    uint64_t requests[EP_COUNT][METRICS_CODES + 1]; /* [METRICS_CODES]: any other code */
    uint64_t cache_hits;                            /* answered from the cache */
    uint64_t cache_misses;                          /* nothing usable cached: an exchange started */
    uint64_t cache_waits; /* waited for an exchange (started by it or already running) */
    uint64_t exchanges[OUT_COUNT];
    uint64_t exchange_latency[METRICS_LAT_BUCKETS + 1]; /* per bucket; the last is +Inf */
    double exchange_seconds_sum;
    uint64_t retries;             /* exchange attempts after the first, for one key */
    uint64_t token_file_loads;    /* a new service-account token read (fingerprint changed) */
    uint64_t connections_refused; /* closed at once: --max-connections or out of descriptors */
    uint64_t resources_refused;   /* token requests for a resource --allow-resource does not name */
    uint64_t connections_evicted; /* closed at --max-connections to admit a new one */
    uint64_t connections_shed;    /* closed to keep what clients hold within the buffer budget */
    uint64_t arc_challenges_refused;          /* Azure Arc challenges refused with 429 (arc.h) */
    uint64_t arc_challenges_refused_per_user; /* of them, a user over its share */
    uint64_t entra_failures_in_row; /* failed exchanges since the last success (0: healthy) */
    enum metrics_outcome entra_last_failure; /* outcome of the last failure, when in_row > 0 */
    int64_t start_time_s;                    /* wall clock, set by main */
};

extern struct metrics metrics;
/* upper bounds of imdsd_entra_exchange_duration_seconds's buckets (+Inf after them) */
extern const double metrics_latency_bounds[METRICS_LAT_BUCKETS];

/* Counts one answer: a handful of comparisons, no allocation (the token path calls it). */
static inline void metrics_request(unsigned endpoint, int status)
{
    uint16_t *codes = metrics.codes[endpoint];
    for (int i = 0; i < METRICS_CODES; i++) {
        if (codes[i] == status || codes[i] == 0) {
            codes[i] = (uint16_t)status;
            metrics.requests[endpoint][i]++;
            return;
        }
    }
    metrics.requests[endpoint][METRICS_CODES]++;
}

/* One exchange with Entra ended with outcome after seconds. */
void metrics_exchange(enum metrics_outcome outcome, double seconds);

#endif

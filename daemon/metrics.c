/* metrics.c - the counters (see metrics.h). They live apart from their rendering
 * (metrics_render.c) so that a module that counts links without what renders. */
#include "metrics.h"

struct metrics metrics;

const char *const metrics_endpoint_names[EP_COUNT] = {"token",  "msi",     "healthz",
                                                      "readyz", "metrics", "other"};
const char *const metrics_outcome_names[OUT_COUNT] = {"ok", "throttled", "transient", "permanent"};

const double metrics_latency_bounds[METRICS_LAT_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                            0.5,   1,    2.5,   5,    10,  30};

void metrics_exchange(enum metrics_outcome outcome, double seconds)
{
    metrics.exchanges[outcome]++;
    int i = 0;
    while (i < METRICS_LAT_BUCKETS && seconds > metrics_latency_bounds[i])
        i++;
    metrics.exchange_latency[i]++;
    metrics.exchange_seconds_sum += seconds;
    if (outcome == OUT_OK) {
        metrics.entra_failures_in_row = 0;
    } else {
        metrics.entra_failures_in_row++;
        metrics.entra_last_failure = outcome;
    }
}

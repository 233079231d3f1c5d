/* probe.h - imdsd's exec probe: a GET to a running imdsd, for images without a shell or curl. */
#ifndef IMDSD_PROBE_H
#define IMDSD_PROBE_H

#include <stddef.h>

#include "config.h"

#define PROBE_TIMEOUT_MS 2000

#define PROBE_WAIT_MS  10000 /* probe_wait: how long it retries */
#define PROBE_RETRY_MS 100

/* Sends "GET path" to l and reads the answer, all within PROBE_TIMEOUT_MS. Returns the HTTP
 * status; unless it is 200, err has one line saying why: connection refused, timeout, not HTTP
 * (then -1), or the status and the error_description of imdsd's answer. */
int probe_run(const struct config_listen *l, const char *path, char *err, size_t errlen);

/* probe_run again every PROBE_RETRY_MS until 200 or PROBE_WAIT_MS have passed: the proxy
 * sidecar's postStart hook, which must not return before imdsd serves (and holds the application
 * back until then where imdsd is the pod's first container). Returns the last status. */
int probe_wait(const struct config_listen *l, const char *path, char *err, size_t errlen);

#endif

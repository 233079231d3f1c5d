/* probe.h - imdsd's exec probe: one GET to a running imdsd, for images without a shell or curl. */
#ifndef IMDSD_PROBE_H
#define IMDSD_PROBE_H

#include <stddef.h>

#include "config.h"

#define PROBE_TIMEOUT_MS 2000

/* Sends "GET path" to l and reads the status line, all within PROBE_TIMEOUT_MS. Returns the HTTP
 * status, or -1 with one line in err (connection refused, timeout, not HTTP). */
int probe_run(const struct config_listen *l, const char *path, char *err, size_t errlen);

#endif

/* refresh.h - pure timing policy for cached tokens and upstream retries. Times are arguments
 * (milliseconds on one clock: the cache passes the monotonic one) and randomness is an argument
 * u in [0, 1), so every rule is a table test. */
#ifndef IMDSD_REFRESH_H
#define IMDSD_REFRESH_H

#include <stdint.h>

#define REFRESH_LATEST_BEFORE_EXPIRY_MS (10 * 60 * 1000) /* when the lifetime allows it */
#define REFRESH_JITTER_FRACTION         0.10 /* refresh up to 10% earlier, so pods spread out */
#define REFRESH_SERVE_MARGIN_MS         (15 * 1000) /* stop serving a token this close to expiry */
#define BACKOFF_BASE_MS                 1000
#define BACKOFF_BACKGROUND_CAP_MS       (5 * 60 * 1000) /* Vault Agent's ceiling */
#define BACKOFF_FOREGROUND_CAP_MS       (8 * 1000)      /* a client is waiting */
#define PERMANENT_ERROR_HOLD_MS         (30 * 1000) /* repeat a permanent answer without asking */

/* When to refresh a token obtained at obtained_ms that expires at expires_ms: at Entra's
 * refresh_in when given, else at half-life; up to REFRESH_JITTER_FRACTION earlier (u); never
 * later than REFRESH_LATEST_BEFORE_EXPIRY_MS before expiry when the lifetime allows it. */
int64_t refresh_at_ms(int64_t obtained_ms, int64_t expires_ms, int64_t refresh_in_s, double u);

/* Until when a token may be handed to clients: REFRESH_SERVE_MARGIN_MS before expiry (a quarter
 * of the lifetime for very short-lived tokens). */
int64_t refresh_serve_until_ms(int64_t obtained_ms, int64_t expires_ms);

/* Full-jitter exponential backoff: u * min(cap, base * 2^attempt), at least 1 ms. */
uint64_t backoff_ms(unsigned attempt, uint64_t base_ms, uint64_t cap_ms, double u);

/* The wait before the next attempt: the backoff, or Entra's Retry-After when longer. */
uint64_t retry_wait_ms(unsigned attempt, uint64_t cap_ms, int retry_after_s, double u);

#endif

#include "refresh.h"

int64_t refresh_at_ms(int64_t obtained_ms, int64_t expires_ms, int64_t refresh_in_s, double u)
{
    int64_t life = expires_ms - obtained_ms;
    if (life <= 0)
        return obtained_ms;
    int64_t base = life / 2;
    if (refresh_in_s > 0 && refresh_in_s * 1000 < life)
        base = refresh_in_s * 1000;
    base -= (int64_t)(u * REFRESH_JITTER_FRACTION * (double)base);
    int64_t latest = life > 2 * REFRESH_LATEST_BEFORE_EXPIRY_MS
                         ? life - REFRESH_LATEST_BEFORE_EXPIRY_MS
                         : life / 2;
    int64_t at = base < latest ? base : latest;
    int64_t floor = life / 4 < 1000 ? life / 4 : 1000;
    if (at < floor)
        at = floor;
    return obtained_ms + at;
}

int64_t refresh_serve_until_ms(int64_t obtained_ms, int64_t expires_ms)
{
    int64_t life = expires_ms - obtained_ms;
    int64_t margin = life / 4 < REFRESH_SERVE_MARGIN_MS ? life / 4 : REFRESH_SERVE_MARGIN_MS;
    if (margin < 0)
        margin = 0;
    return expires_ms - margin;
}

uint64_t backoff_ms(unsigned attempt, uint64_t base_ms, uint64_t cap_ms, double u)
{
    uint64_t ceil = base_ms;
    for (unsigned i = 0; i < attempt && ceil < cap_ms; i++)
        ceil *= 2;
    if (ceil > cap_ms)
        ceil = cap_ms;
    uint64_t d = (uint64_t)(u * (double)ceil);
    return d ? d : 1;
}

uint64_t retry_wait_ms(unsigned attempt, uint64_t cap_ms, int retry_after_s, double u)
{
    uint64_t d = backoff_ms(attempt, BACKOFF_BASE_MS, cap_ms, u);
    uint64_t ra = retry_after_s > 0 ? (uint64_t)retry_after_s * 1000 : 0;
    return ra > d ? ra : d;
}

/* Unit tests for refresh.c: refresh time, serving window, backoff and jitter bounds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "refresh.h"

#define S   1000LL
#define MIN (60 * S)
#define H   (60 * MIN)
#define T0  2000000000000LL /* obtained, ms */

struct at_row {
    const char *name;
    int64_t life_ms, refresh_in_s;
    double u;
    int64_t want_offset_ms;
};

static const struct at_row at_rows[] = {
    /* half-life for lifetimes long enough, jitter pulls it up to 10% earlier */
    {"1 h token, no jitter: half-life", 1 * H, 0, 0.0, 30 * MIN},
    {"1 h token, max jitter: 10% earlier", 1 * H, 0, 0.999999, 27 * MIN},
    {"24 h token: half-life", 24 * H, 0, 0.0, 12 * H},
    /* Entra's refresh_in wins when given */
    {"refresh_in 43199 s of 86399 s", 86399 * S, 43199, 0.0, 43199 * S},
    {"refresh_in 600 s", 1 * H, 600, 0.0, 600 * S},
    {"refresh_in over the lifetime is ignored", 1 * H, 7200, 0.0, 30 * MIN},
    /* never later than 10 min before expiry when the lifetime allows it */
    {"refresh_in too late is pulled to exp-10min", 1 * H, 3500, 0.0, 50 * MIN},
    {"25 min token: half-life (12.5 min)", 25 * MIN, 0, 0.0, 750 * S},
    {"20 min token: exp-10min == half-life", 20 * MIN, 0, 0.0, 10 * MIN},
    /* short lifetimes: half-life, jitter, floor */
    {"5 s token: 2.5 s", 5 * S, 0, 0.0, 2500},
    {"5 s token, max jitter", 5 * S, 0, 0.999999, 2250},
    {"refresh_in 1 s of 3599 s", 3599 * S, 1, 0.0, 1000},
    {"2 s token: floor L/4", 2 * S, 0, 0.0, 1000},
    {"zero lifetime", 0, 0, 0.0, 0},
};

static void t_at(void **state)
{
    const struct at_row *r = *state;
    int64_t got = refresh_at_ms(T0, T0 + r->life_ms, r->refresh_in_s, r->u) - T0;
    if (got < r->want_offset_ms - 1 || got > r->want_offset_ms + 1)
        fail_msg("refresh at +%lld ms, want +%lld ms", (long long)got,
                 (long long)r->want_offset_ms);
}

/* For every lifetime and every u, the refresh comes after obtaining, at least 10 min before
 * expiry when the lifetime is over 20 min, and before the serving window closes. */
static void t_at_invariants(void **state)
{
    (void)state;
    static const int64_t lives[] = {4 * S, 30 * S, 10 * MIN, 21 * MIN,
                                    1 * H, 6 * H,  24 * H,   7 * 24 * H};
    static const int64_t hints[] = {0, 1, 60, 1800, 43199, 100000};
    for (size_t i = 0; i < sizeof lives / sizeof lives[0]; i++)
        for (size_t k = 0; k < sizeof hints / sizeof hints[0]; k++)
            for (int j = 0; j <= 100; j++) {
                double u = j / 100.0 * 0.999999;
                int64_t exp = T0 + lives[i];
                int64_t at = refresh_at_ms(T0, exp, hints[k], u);
                assert_true(at > T0);
                assert_true(at < refresh_serve_until_ms(T0, exp));
                if (lives[i] > 20 * MIN)
                    assert_true(exp - at >= 10 * MIN);
            }
}

static void t_jitter_spreads(void **state)
{
    (void)state;
    /* different u give different times within [90%, 100%] of half-life */
    int64_t lo = refresh_at_ms(T0, T0 + H, 0, 0.999999), hi = refresh_at_ms(T0, T0 + H, 0, 0.0);
    int64_t mid = refresh_at_ms(T0, T0 + H, 0, 0.5);
    assert_true(lo < mid && mid < hi);
    assert_int_equal(hi - lo, 3 * MIN - 1); /* 10% of 30 min, minus rounding */
}

static void t_serve_until(void **state)
{
    (void)state;
    assert_int_equal(refresh_serve_until_ms(T0, T0 + H) - T0, H - 15 * S);
    assert_int_equal(refresh_serve_until_ms(T0, T0 + 24 * H) - T0, 24 * H - 15 * S);
    assert_int_equal(refresh_serve_until_ms(T0, T0 + 20 * S) - T0, 15 * S); /* L/4 = 5 s margin */
    assert_int_equal(refresh_serve_until_ms(T0, T0 + 4 * S) - T0, 3 * S);
    assert_int_equal(refresh_serve_until_ms(T0, T0) - T0, 0);
}

static void t_backoff(void **state)
{
    (void)state;
    /* full jitter: u * min(cap, base * 2^n); the ceiling doubles and stops at the cap */
    assert_int_equal(backoff_ms(0, 1000, 300000, 0.999999), 999);
    assert_int_equal(backoff_ms(1, 1000, 300000, 0.999999), 1999);
    assert_int_equal(backoff_ms(3, 1000, 300000, 0.5), 4000);
    assert_int_equal(backoff_ms(8, 1000, 300000, 0.999999), 255999);
    assert_int_equal(backoff_ms(9, 1000, 300000, 0.999999), 299999);
    assert_int_equal(backoff_ms(60, 1000, 300000, 0.999999), 299999); /* no overflow */
    assert_int_equal(backoff_ms(1000, 1000, 300000, 0.5), 150000);
    assert_int_equal(backoff_ms(5, 1000, 8000, 0.999999), 7999);
    assert_int_equal(backoff_ms(0, 1000, 300000, 0.0), 1); /* never 0: no busy loop */
}

static void t_backoff_bounds(void **state)
{
    (void)state;
    for (unsigned n = 0; n < 40; n++)
        for (int j = 0; j < 100; j++) {
            uint64_t d = backoff_ms(n, BACKOFF_BASE_MS, BACKOFF_BACKGROUND_CAP_MS, j / 100.0);
            assert_true(d >= 1 && d <= BACKOFF_BACKGROUND_CAP_MS);
            uint64_t ceil = n < 20 ? (uint64_t)BACKOFF_BASE_MS << n : UINT64_MAX;
            assert_true(d <= ceil);
        }
}

static void t_retry_after_wins(void **state)
{
    (void)state;
    assert_int_equal(retry_wait_ms(0, 8000, 7, 0.5),
                     7000); /* Retry-After: 7 over a 500 ms backoff */
    assert_int_equal(retry_wait_ms(5, 8000, 1, 0.999999),
                     7999); /* backoff over a short Retry-After */
    assert_int_equal(retry_wait_ms(0, 8000, 0, 0.5), 500);
}

int main(void)
{
    static struct CMUnitTest tests[32];
    static char names[32][96];
    size_t n = 0;
    for (size_t i = 0; i < sizeof at_rows / sizeof at_rows[0]; i++, n++) {
        snprintf(names[n], sizeof names[n], "refresh_at_ms: %s", at_rows[i].name);
        tests[n] = (struct CMUnitTest){names[n], t_at, NULL, NULL, (void *)&at_rows[i]};
    }
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_at_invariants);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_jitter_spreads);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_serve_until);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_backoff);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_backoff_bounds);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(t_retry_after_wins);
    return _cmocka_run_group_tests("refresh", tests, n, NULL, NULL);
}

/* token.h - an access token as the cache holds it. */
#ifndef IMDSD_TOKEN_H
#define IMDSD_TOKEN_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

struct token {
    char *access_token; /* owned secret */
    size_t len;
    int64_t expires_on;     /* epoch seconds: time the request was sent + expires_in */
    int64_t ext_expires_on; /* epoch seconds */
    int64_t not_before;     /* epoch seconds: time the request was sent */
    int64_t refresh_in;     /* Entra's hint in seconds, 0 when absent */
    /* The wall clock minus the monotonic clock (now_ms()) when the request was sent: see
     * token_now_epoch. */
    int64_t wall_minus_mono_ms;
    /* The IMDS body rendered during second body_sec (token_now_epoch), kept by the endpoint so
     * that the cached path renders once a second instead of once a request. A secret; freed with
     * the token. */
    struct buf body;
    int64_t body_sec;
};

/* The epoch second now as tok counts it: the wall clock at the request's send plus the monotonic
 * time since (mono_ms is now_ms()). expires_on minus it is the lifetime really left, which is
 * what expires_in must say even after the wall clock was stepped (expires_on itself stays the
 * wall-clock date Entra's answer implies). */
static inline int64_t token_now_epoch(const struct token *tok, int64_t mono_ms)
{
    return (mono_ms + tok->wall_minus_mono_ms) / 1000;
}

#endif

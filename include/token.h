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
    /* The IMDS body rendered during second body_sec, kept by the endpoint so that the cached
     * path renders once a second instead of once a request. A secret; freed with the token. */
    struct buf body;
    int64_t body_sec;
};

#endif

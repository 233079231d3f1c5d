/* entra_msg.h - pure Entra v2 token endpoint messages: the client-credentials form with a
 * jwt-bearer assertion, and the classification of Entra's answers. No I/O, no clock. */
#ifndef IMDSD_ENTRA_MSG_H
#define IMDSD_ENTRA_MSG_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define ENTRA_MAX_TOKEN_BYTES (32 * 1024)
#define ENTRA_MAX_LIFETIME_S  (7 * 24 * 3600)
#define ENTRA_DESCRIPTION_MAX 512

enum entra_kind {
    ENTRA_OK,        /* access_token and expires_in are set */
    ENTRA_PERMANENT, /* Entra rejected the request for a reason a retry will not fix */
    ENTRA_TRANSIENT, /* upstream trouble; retrying may help */
    ENTRA_THROTTLED, /* 429; retry_after seconds */
};

struct entra_result {
    enum entra_kind kind;
    int http_status;    /* Entra's status, 0 if no HTTP answer */
    char *access_token; /* owned secret (ENTRA_OK) */
    size_t token_len;
    int64_t expires_in;                      /* seconds, from Entra */
    int64_t ext_expires_in;                  /* seconds; = expires_in when absent */
    int64_t refresh_in;                      /* seconds, 0 when absent */
    int64_t aadsts;                          /* first error code, 0 when none */
    int retry_after;                         /* seconds, 0 when absent */
    char error[64];                          /* OAuth error code, e.g. "invalid_request" */
    char description[ENTRA_DESCRIPTION_MAX]; /* first line of error_description, log-safe */
};

/* scope = resource + "/.default" verbatim, unless resource already ends in "/.default". */
int entra_scope(struct buf *b, const char *resource);
/* The POST body: client_id, scope, grant_type, client_assertion_type, client_assertion. */
int entra_build_form(struct buf *b, const char *client_id, const char *resource,
                     const char *assertion, size_t assertion_len);
/* Classifies an HTTP answer from the token endpoint into r (which it initialises). */
void entra_parse_response(struct entra_result *r, int http_status, const char *body, size_t len,
                          const char *retry_after);
/* True for AADSTS codes that are worth retrying (FIC propagation, stale assertion, throttling). */
int entra_code_is_transient(int64_t aadsts);
/* Zeroes and frees the token. */
void entra_result_free(struct entra_result *r);

#endif

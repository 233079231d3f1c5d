/* entra.h - one token exchange with Entra ID: form, HTTPS POST, classification, log line. */
#ifndef IMDSD_ENTRA_H
#define IMDSD_ENTRA_H

#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "config.h"
#include "entra_msg.h"
#include "https_client.h"

struct entra;
struct entra_fetch;

/* r is valid only during the callback (the caller may take r->access_token and NULL it).
 * f->sent_mono_ms and f->sent_wall_ms are when the request was sent: the token expires expires_in
 * after it. */
typedef void entra_done_cb(struct entra_fetch *f, struct entra_result *r);

struct entra_fetch {
    entra_done_cb *done;
    void *data; /* for the caller */
    /* private */
    struct entra *e;
    struct https_request req;
    char headers[256];
    /* The send time twice: on the monotonic clock (now_ms()) for everything the cache measures
     * from it, since a wall clock stepped back would stretch a token past its real expiry; on
     * the wall clock only for the epoch times clients are told (expires_on, not_before). */
    int64_t sent_mono_ms;
    int64_t sent_wall_ms;
    uint64_t started_ms;
    const char *client_id; /* borrowed until done */
    const char *resource;
    int active;
    struct buf body;               /* the form, until sent */
    struct entra_fetch *ca_next;   /* waiting for the CA file's read */
    struct entra_fetch **ca_batch; /* the list ca_read_done is sending from, or NULL */
};

/* Creates the client for cfg's authority. On failure returns <0 with a one-line reason in err. */
int entra_new(struct entra **out, uv_loop_t *loop, const struct config *cfg, char *err,
              size_t errlen);
/* Starts an exchange; client_id and resource are borrowed until done, the assertion is copied.
 * Returns 0 and calls done exactly once, or <0 without calling it. */
int entra_fetch(struct entra *e, struct entra_fetch *f, const char *client_id, const char *resource,
                const char *assertion, size_t assertion_len);
/* done will not be called. */
void entra_cancel(struct entra_fetch *f);
void entra_free(struct entra *e);

#endif

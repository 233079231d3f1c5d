/* token_file.h - the projected service-account token: watched, read off the loop, validated.
 *
 * The kubelet never modifies the file: it writes a new hidden timestamped directory and swaps
 * the "..data" symlink with rename(). So imdsd watches the directory that holds "..data"
 * (walking up from the configured path), or the file's own directory for plain files, or the
 * nearest existing ancestor while the path does not exist yet; plus a periodic re-read. Every
 * exchange with Entra reads the file afresh, so none presents a rotated-away token. */
#ifndef IMDSD_TOKEN_FILE_H
#define IMDSD_TOKEN_FILE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "jwt.h"

#define TOKEN_FILE_MAX_BYTES    (64 * 1024)
#define TOKEN_FILE_REREAD_MS    (60 * 1000) /* safety net for missed events */
#define TOKEN_FILE_DEBOUNCE_MS  10          /* coalesce the burst of events one rotation makes */
#define TOKEN_FILE_NBF_LEEWAY_S 60          /* clock skew tolerated on nbf */
/* a plain file's changed content counts once a read this much later finds the same (a file
 * rewritten in place can be read half-written), TOKEN_FILE_SETTLE_TRIES times at most */
#define TOKEN_FILE_SETTLE_MS    50
#define TOKEN_FILE_SETTLE_TRIES 4

enum token_state {
    TOKEN_OK,
    TOKEN_MISSING,
    TOKEN_UNREADABLE,
    TOKEN_EMPTY,
    TOKEN_TOO_LARGE,
    TOKEN_MALFORMED,
    TOKEN_EXPIRED,
    TOKEN_NOT_YET_VALID,
    TOKEN_UNKNOWN, /* not read yet */
};

struct token_file_status {
    enum token_state state;
    char reason[200];         /* human text for logs, /readyz and errors (never the token) */
    struct jwt_claims claims; /* meaningful for OK, EXPIRED and NOT_YET_VALID */
    size_t len;
    char fp[13]; /* fingerprint of the token */
};

/* st is valid only during the call; tok is the trimmed token when st->state is TOKEN_OK, else
 * NULL. */
typedef void token_file_cb(void *arg, const struct token_file_status *st, const char *tok,
                           size_t len);

struct token_file_waiter {
    token_file_cb *cb;
    void *arg;
    /* private */
    struct token_file *tf;
    struct token_file_waiter *prev, *next;
    int linked;
};

/* Starts watching path (borrowed for the lifetime) and reads it once. */
struct token_file *token_file_new(uv_loop_t *loop, const char *path);
/* The state as of the last read, with expiry re-evaluated at now. */
void token_file_status(struct token_file *tf, int64_t now, struct token_file_status *out);
/* Reads the file afresh (a read that started before this call does not count) and calls
 * w->cb exactly once, unless canceled. */
void token_file_get(struct token_file *tf, struct token_file_waiter *w);
void token_file_cancel(struct token_file_waiter *w);
/* Re-reads now (SIGHUP). */
void token_file_reload(struct token_file *tf);
/* Waiting callbacks run with TOKEN_UNREADABLE "shutting down"; frees after handles close. */
void token_file_free(struct token_file *tf);

const char *token_state_name(enum token_state s);
/* Pure: classifies a read result (0 or -errno) and its content at time now. */
void token_file_classify(int err, const char *tok, size_t len, int64_t now,
                         struct token_file_status *st);

#endif

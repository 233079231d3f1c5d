/* token_file.h - reads the projected service-account token without blocking the loop. */
#ifndef IMDSD_TOKEN_FILE_H
#define IMDSD_TOKEN_FILE_H

#include <stddef.h>
#include <uv.h>

#define TOKEN_FILE_MAX_BYTES (64 * 1024)

struct token_file_read;
/* err is 0 with the whitespace-trimmed token, or a negative errno-style code (-ENOENT,
 * -EACCES, -EFBIG for over the cap, -ENODATA for an empty file) with tok NULL. tok is valid
 * only during the callback and is zeroed afterwards. */
typedef void token_file_done_cb(struct token_file_read *r, int err, const char *tok, size_t len);

struct token_file_read {
    token_file_done_cb *done;
    void *data; /* for the caller */
    /* private */
    uv_work_t work;
    const char *path;
    int canceled;
    int err;
    char *content;
    size_t len;
    int self_free; /* zero in a caller-embedded request */
};

/* Reads path on the thread pool. Returns 0 and calls done exactly once later (unless canceled),
 * or a negative libuv error and never calls it. path is borrowed until done. r must stay
 * allocated until done ran or, after token_file_cancel, until the loop has run once more; use
 * token_file_read_new() for a self-freeing request when the caller may go away. */
int token_file_read(uv_loop_t *loop, struct token_file_read *r, const char *path);
/* Allocates a request that frees itself after done (or after being canceled). */
struct token_file_read *token_file_read_new(token_file_done_cb *done, void *data);
/* done will not be called; a self-freeing request is freed when the read finishes. */
void token_file_cancel(struct token_file_read *r);

/* Human text for token_file errors. */
const char *token_file_strerror(int err);

#endif

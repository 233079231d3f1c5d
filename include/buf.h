/* buf.h - growable byte buffer with a hard cap. Buffers carry secrets (assertions, access tokens,
 * the X-IDENTITY-HEADER), so none leaves a copy behind: storage is zeroed before it is freed, when
 * it grows and where buf_consume moved bytes away. */
#ifndef IMDSD_BUF_H
#define IMDSD_BUF_H

#include <stddef.h>

struct buf {
    char *data; /* owned; always NUL-terminated past len when non-NULL */
    size_t len;
    size_t cap;
    size_t max; /* appends that would exceed max fail with -1 and change nothing */
};

void buf_init(struct buf *b, size_t max);
int buf_append(struct buf *b, const void *p, size_t n);
int buf_puts(struct buf *b, const char *s);
int buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drops the first n bytes. */
void buf_consume(struct buf *b, size_t n);
void buf_reset(struct buf *b);
/* Zeroes and frees the storage; leaves an empty, reusable buf. */
void buf_free(struct buf *b);

#endif

/* form.h - application/x-www-form-urlencoded: encoding for the Entra request, strict decoding of
 * the IMDS query string. No allocation: decoded strings live in the caller's struct query. */
#ifndef IMDSD_FORM_H
#define IMDSD_FORM_H

#include <stddef.h>

#include "buf.h"

#define QUERY_MAX_BYTES  4096 /* decoded bytes of all keys and values */
#define QUERY_MAX_PARAMS 32

enum query_err {
    QUERY_OK = 0,
    QUERY_E_ENCODING = -1,  /* bad %XX, or a decoded NUL */
    QUERY_E_DUPLICATE = -2, /* the same name twice */
    QUERY_E_TOO_MANY = -3,  /* over QUERY_MAX_PARAMS or QUERY_MAX_BYTES */
};

struct query_param {
    const char *key; /* NUL-terminated, inside query.storage */
    const char *val;
    size_t val_len;
};

struct query {
    int n;
    struct query_param p[QUERY_MAX_PARAMS];
    char storage[QUERY_MAX_BYTES + 2 * QUERY_MAX_PARAMS];
};

/* Decodes "a=1&b=%20x+y" ('+' is a space); empty segments are skipped, "a" alone is a="" .
 * On error *q is unspecified. */
int query_parse(struct query *q, const char *s, size_t len);
/* The value of key, or NULL when absent. */
const struct query_param *query_get(const struct query *q, const char *key);

/* Appends s percent-encoded for a form body (unreserved characters stay; others %XX). */
int form_encode(struct buf *b, const char *s, size_t len);
/* Appends "&key=value" (no '&' when b is empty), value encoded. */
int form_add(struct buf *b, const char *key, const char *val, size_t val_len);

#endif

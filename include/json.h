/* json.h - read fields of a flat JSON object (jsmn underneath) and write JSON strings. */
#ifndef IMDSD_JSON_H
#define IMDSD_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define JSON_MAX_TOKENS 512

struct json_obj {
    const char *src; /* borrowed; must outlive the object */
    int ntok;
    void *tok; /* owned jsmn token array */
};

/* Parses src as one JSON object. Returns 0, or -1 if it is not a well-formed object within
 * JSON_MAX_TOKENS tokens (then o holds nothing to free). */
int json_parse_object(struct json_obj *o, const char *src, size_t len);
void json_obj_free(struct json_obj *o);

/* Top-level member lookups. Return 0 on success, -1 if the key is absent, -2 if it has the wrong
 * type or cannot be decoded. */
int json_get_string(const struct json_obj *o, const char *key, char **out); /* *out malloc'd */
/* Accepts a JSON integer or a string holding a decimal integer (Entra sends numbers). */
int json_get_int(const struct json_obj *o, const char *key, int64_t *out);
/* First element of an array of integers, e.g. "error_codes":[700016]. */
int json_get_first_int(const struct json_obj *o, const char *key, int64_t *out);

/* First element of an array of strings, e.g. "aud":["api://AzureADTokenExchange"]. */
int json_get_first_string(const struct json_obj *o, const char *key, char **out);

/* Appends s as a quoted JSON string with escapes. Returns 0 or -1 if b is full. */
int json_put_string(struct buf *b, const char *s, size_t len);

#endif

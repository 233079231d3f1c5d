/* util.h - allocation that aborts on OOM, secret hygiene, small string and time helpers. */
#ifndef IMDSD_UTIL_H
#define IMDSD_UTIL_H

#include <stddef.h>
#include <stdint.h>

void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* Zeroes n bytes in a way the compiler cannot drop. */
void secret_zero(void *p, size_t n);
/* Zeroes then frees a NUL-terminated secret string (NULL is fine). */
void secret_free_str(char *s);
/* Zeroes the calling thread's vector registers, where memcpy, memchr and the like leave the last
 * bytes they moved (a secret's, too) until other code happens to overwrite them. */
void secret_zero_registers(void);

/* Writes n bytes as 2n lowercase hex digits + NUL into out (no stdio: the bytes may be secret). */
void hex_encode(const void *p, size_t n, char *out);
/* Writes the first 6 bytes of SHA-256(p) as 12 hex digits + NUL: a log-safe fingerprint. */
void fingerprint(const void *p, size_t n, char out[13]);

/* Writes "host:port", or "[host]:port" when host is an IPv6 address (has a ':'), into out (n
 * bytes, cut to fit); returns out. */
const char *hostport_str(char *out, size_t n, const char *host, int port);

/* Wall clock in seconds and in milliseconds since the epoch; a monotonic clock in ms. */
int64_t now_epoch(void);
int64_t now_wall_ms(void);
uint64_t now_ms(void);

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif

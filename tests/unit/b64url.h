/* b64url.h - base64url without padding (RFC 4648 section 5), for the unit tests that build JWTs. */
#ifndef IMDSD_TEST_B64URL_H
#define IMDSD_TEST_B64URL_H

#include <stddef.h>

/* Encodes n bytes of in into out (room for n * 4 / 3 + 4 bytes), NUL-terminated. */
static inline void b64url(const char *in, size_t n, char *out)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned char)in[i] << 16;
        if (i + 1 < n)
            v |= (unsigned char)in[i + 1] << 8;
        if (i + 2 < n)
            v |= (unsigned char)in[i + 2];
        out[o++] = a[(v >> 18) & 63];
        out[o++] = a[(v >> 12) & 63];
        if (i + 1 < n)
            out[o++] = a[(v >> 6) & 63];
        if (i + 2 < n)
            out[o++] = a[v & 63];
    }
    out[o] = 0;
}

#endif

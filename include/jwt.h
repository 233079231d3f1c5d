/* jwt.h - decodes (without verifying) the claims of a compact JWS such as the projected
 * service-account token, so that its expiry and subject can be reported. Pure: no I/O. */
#ifndef IMDSD_JWT_H
#define IMDSD_JWT_H

#include <stddef.h>
#include <stdint.h>

#define JWT_MAX_BYTES (64 * 1024)
#define JWT_CLAIM_MAX 256 /* longer iss/sub/aud are cut (they are only reported) */

struct jwt_claims {
    int64_t exp; /* 0 when absent */
    int64_t nbf;
    int64_t iat;
    char iss[JWT_CLAIM_MAX];
    char sub[JWT_CLAIM_MAX];
    char aud[JWT_CLAIM_MAX]; /* the first audience when aud is an array */
};

enum jwt_err {
    JWT_OK = 0,
    JWT_E_FORMAT = -1, /* not three base64url segments */
    JWT_E_BASE64 = -2, /* a segment is not valid base64url */
    JWT_E_JSON = -3,   /* the payload is not a JSON object */
    JWT_E_CLAIMS = -4, /* exp missing or not an integer, or a claim of the wrong type */
};

/* Decodes tok[0..len) into c. */
int jwt_decode(const char *tok, size_t len, struct jwt_claims *c);
const char *jwt_strerror(int err);

/* base64url (padding optional) into out (room for at least len * 3 / 4 + 3 bytes); returns the
 * decoded length or -1. */
long base64url_decode(const char *in, size_t len, unsigned char *out);

#endif

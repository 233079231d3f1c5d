#include "jwt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "util.h"

static int b64val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

long base64url_decode(const char *in, size_t len, unsigned char *out)
{
    while (len && in[len - 1] == '=')
        len--;
    if (len % 4 == 1)
        return -1;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64val((unsigned char)in[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    /* leftover bits must be zero, as RFC 4648 canonical encoding requires */
    if (bits && (acc & ((1u << bits) - 1)))
        return -1;
    return (long)o;
}

static void copy_claim(const struct json_obj *o, const char *key, char *out)
{
    char *v = NULL;
    if (json_get_string(o, key, &v) == 0) {
        snprintf(out, JWT_CLAIM_MAX, "%s", v);
        /* reported in logs and JSON: keep printable ASCII only */
        for (char *p = out; *p; p++)
            if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
                *p = '?';
    }
    free(v);
}

int jwt_decode(const char *tok, size_t len, struct jwt_claims *c)
{
    memset(c, 0, sizeof *c);
    if (len == 0 || len > JWT_MAX_BYTES)
        return JWT_E_FORMAT;
    const char *d1 = memchr(tok, '.', len);
    if (!d1)
        return JWT_E_FORMAT;
    const char *d2 = memchr(d1 + 1, '.', len - (size_t)(d1 + 1 - tok));
    if (!d2 || memchr(d2 + 1, '.', len - (size_t)(d2 + 1 - tok)))
        return JWT_E_FORMAT;
    size_t hlen = (size_t)(d1 - tok), plen = (size_t)(d2 - d1 - 1),
           slen = len - (size_t)(d2 + 1 - tok);
    if (!hlen || !plen || !slen)
        return JWT_E_FORMAT;
    unsigned char *buf = xmalloc(len + 4);
    int rc = JWT_OK;
    if (base64url_decode(tok, hlen, buf) < 0 || base64url_decode(d2 + 1, slen, buf) < 0) {
        rc = JWT_E_BASE64;
        goto out;
    }
    long n = base64url_decode(d1 + 1, plen, buf);
    if (n < 0) {
        rc = JWT_E_BASE64;
        goto out;
    }
    struct json_obj o;
    if (json_parse_object(&o, (const char *)buf, (size_t)n) < 0) {
        rc = JWT_E_JSON;
        goto out;
    }
    if (json_get_int(&o, "exp", &c->exp) < 0 || c->exp <= 0 ||
        json_get_int(&o, "nbf", &c->nbf) == -2 || json_get_int(&o, "iat", &c->iat) == -2) {
        rc = JWT_E_CLAIMS;
    } else {
        copy_claim(&o, "iss", c->iss);
        copy_claim(&o, "sub", c->sub);
        copy_claim(&o, "aud", c->aud); /* a string audience */
        char *first = NULL;            /* or the first of an array, as Kubernetes writes it */
        if (!c->aud[0] && json_get_first_string(&o, "aud", &first) == 0) {
            snprintf(c->aud, sizeof c->aud, "%s", first);
            for (char *p = c->aud; *p; p++)
                if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
                    *p = '?';
        }
        free(first);
    }
    json_obj_free(&o);
out:
    secret_zero(buf, len + 4);
    free(buf);
    return rc;
}

const char *jwt_strerror(int err)
{
    switch (err) {
    case JWT_OK:
        return "ok";
    case JWT_E_FORMAT:
        return "not a compact JWS (three base64url parts separated by '.')";
    case JWT_E_BASE64:
        return "a part is not valid base64url";
    case JWT_E_JSON:
        return "the payload is not a JSON object";
    default:
        return "the exp, nbf or iat claim is missing or not an integer";
    }
}

/* libFuzzer: decoding the claims of arbitrary service-account "tokens". */
#include <stdint.h>
#include <string.h>

#include "jwt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct jwt_claims c;
    int rc = jwt_decode((const char *)data, size, &c);
    if (rc == JWT_OK && c.exp <= 0)
        __builtin_trap();
    /* reported claims are NUL-terminated printable text */
    const char *claims[] = {c.iss, c.sub, c.aud};
    for (int i = 0; i < 3; i++) {
        const char *end = memchr(claims[i], 0, JWT_CLAIM_MAX);
        if (!end)
            __builtin_trap();
        for (const char *p = claims[i]; p < end; p++)
            if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
                __builtin_trap();
    }
    return 0;
}

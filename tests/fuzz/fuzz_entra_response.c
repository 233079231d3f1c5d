/* libFuzzer: classification of arbitrary Entra answers; a token only ever comes from a 200. */
#include <stdint.h>
#include <string.h>

#include "entra_msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const int statuses[] = {200, 400, 401, 429, 500, 503, 302, 404};
    if (size < 1)
        return 0;
    int status = statuses[data[0] & 7];
    const char *retry_after = (data[0] & 8) ? "17" : NULL;
    struct entra_result r;
    entra_parse_response(&r, status, (const char *)data + 1, size - 1, retry_after);
    if (r.kind == ENTRA_OK && (status != 200 || !r.access_token || r.expires_in <= 0 ||
                               strlen(r.access_token) != r.token_len))
        __builtin_trap();
    if (r.kind != ENTRA_OK && r.access_token)
        __builtin_trap();
    if (memchr(r.description, 0, sizeof r.description) == NULL)
        __builtin_trap();
    entra_result_free(&r);
    return 0;
}

/* libFuzzer: IMDS request validation and rendering on arbitrary paths, queries and flags. */
#include <stdint.h>
#include <string.h>

#include "buf.h"
#include "imds.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char *const allowed[] = {"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"};
    if (size < 1)
        return 0;
    unsigned flags = data[0];
    const char *s = (const char *)data + 1;
    size_t n = size - 1;
    imds_route(s, n);
    struct imds_input in = {flags & 1, (flags >> 1) & 1, (flags >> 2) & 1, s, n};
    struct imds_identities ids = {"11111111-2222-3333-4444-555555555555", allowed, 1};
    struct query q;
    struct imds_token_req tr;
    struct imds_error err;
    struct buf b;
    buf_init(&b, 1 << 20);
    if (imds_check_token_request(&in, &ids, &q, &tr, &err) == 0) {
        if (strlen(tr.resource) != tr.resource_len || tr.resource_len == 0)
            __builtin_trap();
        struct token t = {"tok", 3, 2000000000, 2000000000, 1999996400, 0};
        if (imds_render_token(&b, &t, tr.client_id, tr.resource, tr.resource_len, 1999996500) < 0)
            __builtin_trap();
    } else {
        if (err.status < 400 || !err.error || !err.description)
            __builtin_trap();
        imds_render_error(&b, &err);
    }
    buf_free(&b);
    return 0;
}

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
    char path[IMDS_MAX_PATH];
    imds_path_normalize(s, n, path, sizeof path);
    static char *const hosts[] = {"imdsd.internal"};
    int host_ok = imds_host_allowed(s, n, hosts, 1); /* the bytes as a Host header, too */
    static const struct imds_alias aliases[] = {
        {"0b000000-0000-4000-8000-000000000001", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"}};
    struct imds_input in = {.is_get = flags & 1,
                            .has_metadata_true = (flags >> 1) & 1,
                            .has_xff = (flags >> 2) & 1,
                            .query = s,
                            .query_len = n,
                            .identity_header = (flags & 8) ? "secret" : NULL,
                            .identity_header_len = (flags & 16) ? 6 : 5,
                            .has_body = (flags >> 6) & 1,
                            .host = (flags & 128) ? s : NULL,
                            .host_len = n,
                            /* App Service 2017-09-01 when there is no X-IDENTITY-HEADER */
                            .legacy_secret = (flags & 8) ? NULL : "secret",
                            .legacy_secret_len = 6,
                            /* a POST (Cloud Shell): the same bytes as its form body */
                            .is_post = !(flags & 1),
                            .body = s,
                            .body_len = n,
                            .form_body = (flags >> 4) & 1};
    struct imds_identities ids = {.default_client_id = "11111111-2222-3333-4444-555555555555",
                                  .allowed = allowed,
                                  .nallowed = 1,
                                  .aliases = aliases,
                                  .naliases = 1};
    struct query q;
    struct imds_token_req tr;
    struct imds_error err;
    struct buf b;
    buf_init(&b, 1 << 20);
    static const struct imds_secret secrets[2] = {{"secret", 6}, {"previous", 8}};
    int rc = (flags & 32) ? imds_check_appservice_request(&in, &ids, secrets, 2, &q, &tr, &err)
             : in.is_post ? imds_check_cloudshell_request(&in, &ids, &q, &tr, &err)
                          : imds_check_token_request(&in, &ids, &q, &tr, &err);
    if (rc == 0) {
        if ((flags & 128) && !host_ok)
            __builtin_trap(); /* a refused Host never gets a token */
        if (strlen(tr.resource) != tr.resource_len || tr.resource_len == 0)
            __builtin_trap();
        struct token t = {.access_token = "tok",
                          .len = 3,
                          .expires_on = 2000000000,
                          .ext_expires_on = 2000000000,
                          .not_before = 1999996400};
        if (imds_render_token(&b, &t, tr.client_id, tr.resource, tr.resource_len, 1999996500) < 0)
            __builtin_trap();
        if (tr.msi2017 && imds_render_msi2017_token(&b, &t, tr.client_id, tr.resource,
                                                    tr.resource_len, tr.msi2017_epoch) < 0)
            __builtin_trap();
        if (in.is_post && !(flags & 32) && (!in.form_body || !in.has_metadata_true))
            __builtin_trap(); /* Cloud Shell needs both */
    } else {
        if (err.status < 400 || !err.error || !err.description)
            __builtin_trap();
        imds_render_error(&b, &err);
    }
    buf_free(&b);
    return 0;
}

/* test_endpoints.c - the bodies of the errors http_server gives itself, as endpoints_error_body
 * writes them: byte for byte what the server wrote before it took them from a callback (the
 * connection limit's 503 was a literal in http_server.c). */
#include "unit.h"

#include "endpoints.h"

struct error_body_row {
    const char *name;
    int status;
    const char *reason;
    const char *want;
};

static const struct error_body_row error_body_rows[] = {
    {"malformed request", 400, "Malformed HTTP request",
     "{\"error\":\"invalid_request\",\"error_description\":\"Malformed HTTP request\"}"},
    {"body over the cap", 413, "Request body too large",
     "{\"error\":\"bad_request\",\"error_description\":\"Request body too large\"}"},
    {"URL over the cap", 414, "Request URL too long",
     "{\"error\":\"bad_request\",\"error_description\":\"Request URL too long\"}"},
    {"headers over the cap", 431, "Request headers too large or too many",
     "{\"error\":\"bad_request\",\"error_description\":\"Request headers too large or too "
     "many\"}"},
    {"connection limit", 503, "imdsd is at its connection limit; retry",
     "{\"error\":\"service_unavailable\",\"error_description\":"
     "\"imdsd is at its connection limit; retry\"}"},
    {"shutdown grace over", 503, "imdsd is shutting down",
     "{\"error\":\"service_unavailable\",\"error_description\":\"imdsd is shutting down\"}"},
};

static void t_error_body(void **state)
{
    const struct error_body_row *r = *state;
    struct buf *b = tbuf(4096);
    endpoints_error_body(b, r->status, r->reason, NULL);
    assert_int_equal(b->len, strlen(r->want));
    assert_memory_equal(b->data, r->want, b->len);
}

int main(void)
{
    ADD_ROWS("endpoints_error_body", error_body_rows, t_error_body);
    return _cmocka_run_group_tests("endpoints", tests, ntests, NULL, NULL);
}

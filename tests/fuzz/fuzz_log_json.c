/* libFuzzer: --log-format json on arbitrary bytes. Whatever a log line holds (a raw, cut or
 * hostile line, or a value from outside passed through log_quote), log_to_json writes one flat
 * JSON object of printable ASCII that json_parse_object reads, and a quoted value never forges
 * another field. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(const char *out, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (out[i] < 0x20 || out[i] >= 0x7f)
            __builtin_trap();
    struct json_obj o;
    if (json_parse_object(&o, out, len) != 0)
        __builtin_trap();
    json_obj_free(&o);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char out[16384], q[8192], line[9000];
    /* the bytes as a whole line, in a buffer that is large, then one that is small */
    size_t len = log_to_json((const char *)data, size, out, sizeof out);
    check(out, len);
    len = log_to_json((const char *)data, size, out, 80);
    check(out, len);
    /* the bytes as one value, quoted the way every log call quotes values from outside */
    log_quote(q, sizeof q, (const char *)data, size);
    int n = snprintf(line, sizeof line, "ts=T level=info event=e v=%s after=7", q);
    len = log_to_json(line, (size_t)n, out, sizeof out);
    check(out, len);
    struct json_obj o;
    char *ev = NULL;
    int64_t after = 0;
    if (json_parse_object(&o, out, len) != 0 || json_get_string(&o, "event", &ev) != 0 ||
        strcmp(ev, "e") != 0 || json_get_int(&o, "after", &after) != 0 || after != 7)
        __builtin_trap();
    free(ev);
    json_obj_free(&o);
    return 0;
}

/* libFuzzer: the JSON reader on arbitrary bytes, and the writer's escaping round trip. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct json_obj o;
    if (json_parse_object(&o, (const char *)data, size) == 0) {
        char *s = NULL;
        int64_t v;
        if (json_get_string(&o, "a", &s) == 0)
            free(s);
        json_get_int(&o, "b", &v);
        json_get_first_int(&o, "c", &v);
        json_obj_free(&o);
    }
    /* any bytes written as a JSON string value must read back identically (NUL excepted) */
    if (memchr(data, 0, size))
        return 0;
    struct buf b;
    buf_init(&b, 1 << 22);
    buf_puts(&b, "{\"a\":");
    json_put_string(&b, (const char *)data, size);
    buf_puts(&b, "}");
    if (json_parse_object(&o, b.data, b.len) != 0)
        __builtin_trap();
    char *back = NULL;
    if (json_get_string(&o, "a", &back) != 0 || strlen(back) != size || memcmp(back, data, size))
        __builtin_trap();
    free(back);
    json_obj_free(&o);
    buf_free(&b);
    return 0;
}

/* Unit tests for buf.c: bounds, and that no copy of what a buffer held is left in memory that is
 * freed or that the buffer no longer uses. Linked with -Wl,--wrap=free,--wrap=realloc: every
 * block freed (or handed to realloc, which may free it unzeroed) is searched for a marker that
 * only the secret content carries. */
#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"

#define MARKER "S3CR3T-assertion-bytes."

void __real_free(void *p);
void *__real_realloc(void *p, size_t n);

static int scanning;
static int left_behind; /* blocks freed or realloc'ed with the marker inside */

static int holds_marker(const void *p)
{
    if (!p || !scanning)
        return 0;
    size_t n = malloc_usable_size((void *)p);
    return memmem(p, n, MARKER, sizeof MARKER - 1) != NULL;
}

void __wrap_free(void *p)
{
    left_behind += holds_marker(p);
    __real_free(p);
}

void *__wrap_realloc(void *p, size_t n)
{
    left_behind += holds_marker(p);
    return __real_realloc(p, n);
}

static int start(void **state)
{
    (void)state;
    left_behind = 0;
    scanning = 1;
    return 0;
}

static int stop(void **state)
{
    (void)state;
    scanning = 0;
    return 0;
}

static void t_growth_leaves_no_copy(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b, 1 << 20);
    for (int i = 0; i < 2000; i++) /* 256 B to 64 KiB: nine growths */
        assert_int_equal(buf_append(&b, MARKER, sizeof MARKER - 1), 0);
    assert_int_equal(b.len, 2000 * (sizeof MARKER - 1));
    assert_non_null(memmem(b.data, b.len, MARKER, sizeof MARKER - 1));
    buf_free(&b);
    assert_null(b.data);
    assert_int_equal(left_behind, 0);
}

static void t_printf_growth_leaves_no_copy(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b, 1 << 20);
    for (int i = 0; i < 500; i++)
        assert_int_equal(buf_printf(&b, "%s%d", MARKER, i), 0);
    buf_free(&b);
    assert_int_equal(left_behind, 0);
}

static void t_consume_clears_what_it_moved(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b, 4096);
    assert_int_equal(buf_puts(&b, "GET / HTTP/1.1\r\nX-IDENTITY-HEADER: " MARKER "\r\n\r\n"), 0);
    size_t first = b.len;
    assert_int_equal(buf_puts(&b, "GET /next HTTP/1.1\r\n\r\n"), 0);
    size_t written = b.len; /* the bytes the buffer ever held (the rest is uninitialised) */
    buf_consume(&b, first); /* the first request is parsed: only the second one stays */
    assert_string_equal(b.data, "GET /next HTTP/1.1\r\n\r\n");
    assert_null(memmem(b.data, written, MARKER, sizeof MARKER - 1));
    assert_int_equal(buf_puts(&b, MARKER), 0);
    buf_consume(&b, b.len); /* everything */
    assert_int_equal(b.len, 0);
    assert_null(memmem(b.data, written, MARKER, sizeof MARKER - 1));
    buf_free(&b);
    assert_int_equal(left_behind, 0);
}

static void t_cap_refuses_and_keeps(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b, 10);
    assert_int_equal(buf_puts(&b, "0123456789"), 0);
    assert_int_equal(buf_puts(&b, "x"), -1);
    assert_int_equal(buf_printf(&b, "%d", 7), -1);
    assert_string_equal(b.data, "0123456789");
    buf_consume(&b, 4);
    assert_string_equal(b.data, "456789");
    buf_reset(&b);
    assert_int_equal(b.len, 0);
    assert_string_equal(b.data, "");
    buf_free(&b);
    buf_free(&b); /* idempotent */
}

/* The detector itself: a block freed with the marker inside is counted. */
static void t_detector_sees_unzeroed_free(void **state)
{
    (void)state;
    static void (*volatile release)(void *) = free; /* keeps the compiler from eliding it */
    char *p = malloc(64);
    assert_non_null(p);
    memcpy(p, MARKER, sizeof MARKER);
    release(p);
    assert_int_equal(left_behind, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(t_growth_leaves_no_copy, start, stop),
        cmocka_unit_test_setup_teardown(t_printf_growth_leaves_no_copy, start, stop),
        cmocka_unit_test_setup_teardown(t_consume_clears_what_it_moved, start, stop),
        cmocka_unit_test_setup_teardown(t_cap_refuses_and_keeps, start, stop),
        cmocka_unit_test_setup_teardown(t_detector_sees_unzeroed_free, start, stop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for deliverer/envelope: what a retry carries survives the
 * trip through AMQP headers exactly; missing or garbled headers read as
 * a first attempt; the dead-letter headers.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "deliverer/envelope.h"

/* A delivery whose string headers are the given ones, as mq builds it. */
static mq_delivery_t delivery_with(const mq_header_t *h, size_t n)
{
    mq_delivery_t d;
    memset(&d, 0, sizeof(d));
    d.hkeys = calloc(n ? n : 1, sizeof(char *));
    d.hvals = calloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        d.hkeys[i] = (char *)h[i].key;
        d.hvals[i] = (char *)h[i].value;
    }
    d.nheaders = n;
    return d;
}

static void delivery_done(mq_delivery_t *d)
{
    free(d->hkeys);
    free(d->hvals);
}

static void test_round_trip(void **state)
{
    envelope_t in = { .attempt = 7, .first_seen_ms = 1700000000123ULL, .pending = "a@x.test,B@y.test",
                      .appended = 1, .append_needed = 0, .append_only = 0 };
    envelope_headers_t h;
    envelope_write(&in, &h);
    assert_int_equal(h.n, 6);
    for (size_t i = 0; i < h.n; i++)
        assert_memory_equal(h.hdr[i].key, "x-mailpump-", 11); /* every name in one namespace */
    mq_delivery_t d = delivery_with(h.hdr, h.n);
    envelope_t out;
    envelope_read(&d, 1800000000000ULL, &out);
    assert_int_equal(out.attempt, 7);
    assert_int_equal(out.first_seen_ms, 1700000000123ULL);
    assert_string_equal(out.pending, "a@x.test,B@y.test");
    assert_int_equal(out.appended, 1);
    assert_int_equal(out.append_needed, 0);
    assert_int_equal(out.append_only, 0);
    assert_true(envelope_is_pending(&out, "a@x.test"));
    assert_true(envelope_is_pending(&out, "b@Y.TEST")); /* case-insensitive */
    assert_false(envelope_is_pending(&out, "a@x.tes"));
    assert_false(envelope_is_pending(&out, "c@z.test"));
    delivery_done(&d);

    envelope_t only = { .attempt = 2, .first_seen_ms = 5, .pending = "", .append_needed = 1, .append_only = 1 };
    envelope_write(&only, &h);
    d = delivery_with(h.hdr, h.n);
    envelope_read(&d, 10, &out);
    assert_int_equal(out.append_only, 1);
    assert_int_equal(out.append_needed, 1);
    assert_int_equal(out.appended, 0);
    assert_string_equal(out.pending, "");
    assert_false(envelope_is_pending(&out, "a@x.test")); /* "" names nobody */
    delivery_done(&d);
}

/* An application publishing straight to the queue sends none of them;
 * a broken or foreign value must not turn into a late attempt. */
static void test_first_attempt_and_garbage(void **state)
{
    mq_delivery_t d = delivery_with(NULL, 0);
    envelope_t e;
    envelope_read(&d, 42, &e);
    assert_int_equal(e.attempt, 1);
    assert_int_equal(e.first_seen_ms, 42);
    assert_null(e.pending);
    assert_true(envelope_is_pending(&e, "anyone@x.test"));
    assert_int_equal(e.appended + e.append_needed + e.append_only, 0);
    delivery_done(&d);

    const mq_header_t bad[] = {
        { "x-mailpump-attempt", "-3" },
        { "x-mailpump-first-seen-ms", "999999999999999" }, /* in the future */
        { "x-mailpump-appended", "yes" },
        { "x-mailpump-append-only", "10" },
    };
    d = delivery_with(bad, 4);
    envelope_read(&d, 1000, &e);
    assert_int_equal(e.attempt, 1);
    assert_int_equal(e.first_seen_ms, 1000);
    assert_int_equal(e.appended, 0);
    assert_int_equal(e.append_only, 0);
    delivery_done(&d);
}

static void test_dead_headers(void **state)
{
    envelope_dead_t h;
    envelope_dead_write("poison: redelivered 6 times", 1234, &h);
    assert_int_equal(h.n, 2);
    assert_string_equal(h.hdr[0].key, "x-mailpump-reason");
    assert_string_equal(h.hdr[0].value, "poison: redelivered 6 times");
    assert_string_equal(h.hdr[1].key, "x-mailpump-dead-at-ms");
    assert_string_equal(h.hdr[1].value, "1234");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_first_attempt_and_garbage),
        cmocka_unit_test(test_dead_headers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for deliverer/envelope: what a retry carries survives the
 * trip through AMQP headers exactly (the pending set bit by bit, the
 * assigned id); the legacy pending list; missing or garbled headers read
 * as a first attempt; the dead-letter headers.
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
    /* recipients 0, 2 and 9 of ten pending */
    unsigned char set[2] = { 0 };
    envelope_set_bit(set, 0);
    envelope_set_bit(set, 2);
    envelope_set_bit(set, 9);
    envelope_t in = { .attempt = 7, .first_seen_ms = 1700000000123ULL, .pending_set = set, .pending_nbits = 10,
                      .appended = 1, .append_needed = 0, .append_only = 0, .id = "given-1" };
    envelope_headers_t h;
    envelope_write(&in, &h);
    assert_int_equal(h.n, 7);
    for (size_t i = 0; i < h.n; i++)
        assert_memory_equal(h.hdr[i].key, "x-mailpump-", 11); /* every name in one namespace */
    mq_delivery_t d = delivery_with(h.hdr, h.n);
    envelope_t out;
    envelope_read(&d, 1800000000000ULL, &out);
    assert_int_equal(out.attempt, 7);
    assert_int_equal(out.first_seen_ms, 1700000000123ULL);
    assert_string_equal(out.id, "given-1");
    assert_int_equal(out.pending_nbits, 16); /* whole bytes */
    for (size_t i = 0; i < 16; i++)
        assert_int_equal(envelope_is_pending(&out, i, "ignored@x.test"), i == 0 || i == 2 || i == 9);
    assert_int_equal(out.appended, 1);
    assert_int_equal(out.append_needed, 0);
    assert_int_equal(out.append_only, 0);
    envelope_free(&out);
    delivery_done(&d);
    envelope_headers_free(&h);

    /* nobody pending (only the Sent copy is left) is not "everybody" */
    unsigned char none[1] = { 0 };
    envelope_t only = { .attempt = 2, .first_seen_ms = 5, .pending_set = none, .pending_nbits = 0,
                        .append_needed = 1, .append_only = 1 };
    envelope_write(&only, &h);
    assert_int_equal(h.n, 6); /* no id header without an assigned id */
    d = delivery_with(h.hdr, h.n);
    envelope_read(&d, 10, &out);
    assert_int_equal(out.append_only, 1);
    assert_int_equal(out.append_needed, 1);
    assert_int_equal(out.appended, 0);
    assert_null(out.id);
    assert_false(envelope_is_pending(&out, 0, "a@x.test"));
    envelope_free(&out);
    delivery_done(&d);
    envelope_headers_free(&h);
}

/* Retries written by earlier versions name the pending recipients. */
static void test_legacy_list(void **state)
{
    const mq_header_t h[] = { { "x-mailpump-pending", "a@x.test,B@y.test" } };
    mq_delivery_t d = delivery_with(h, 1);
    envelope_t e;
    envelope_read(&d, 1, &e);
    assert_true(envelope_is_pending(&e, 5, "a@x.test"));
    assert_true(envelope_is_pending(&e, 0, "b@Y.TEST")); /* case-insensitive */
    assert_false(envelope_is_pending(&e, 1, "a@x.tes"));
    assert_false(envelope_is_pending(&e, 1, "c@z.test"));
    envelope_free(&e);
    delivery_done(&d);
}

/* A garbled set names nobody: the job dead-letters the retry with a
 * reason instead of sending to everyone again. */
static void test_garbled_set(void **state)
{
    const mq_header_t h[] = { { "x-mailpump-pending-set", "!!not base64" } };
    mq_delivery_t d = delivery_with(h, 1);
    envelope_t e;
    envelope_read(&d, 1, &e);
    assert_false(envelope_is_pending(&e, 0, "a@x.test"));
    envelope_free(&e);
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
    assert_null(e.pending_set);
    assert_null(e.pending_list);
    assert_null(e.id);
    assert_true(envelope_is_pending(&e, 3, "anyone@x.test"));
    assert_int_equal(e.appended + e.append_needed + e.append_only, 0);
    envelope_free(&e);
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
    envelope_free(&e);
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
        cmocka_unit_test(test_legacy_list),
        cmocka_unit_test(test_garbled_set),
        cmocka_unit_test(test_first_attempt_and_garbage),
        cmocka_unit_test(test_dead_headers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

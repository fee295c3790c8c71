/*
 * SUMMARY
 *  tests/unit/test_heartbeat.c - metrics/heartbeat: the /healthz decision
 *  on the workers' loop heartbeats.
 * DESCRIPTION
 *  A fake clock (the times are arguments): a worker whose heartbeat is
 *  older than stuck_after is reported by index with 503; exactly at the
 *  limit it is not; a worker that is not running (never stamped, or left
 *  its loop) is never stuck; 0 turns the check off; the body is compared
 *  whole.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/buf.h"
#include "metrics/heartbeat.h"

static void assert_health(uint64_t now, unsigned want_status, const char *want_body)
{
    buf_t b = BUF_INIT;
    unsigned status = heartbeat_health(&b, now);
    buf_putc(&b, '\0');
    assert_string_equal(buf_head(&b), want_body);
    assert_int_equal(status, want_status);
    buf_free(&b);
}

static void test_decision(void **state)
{
    (void)state;
    uint64_t beats[3] = { 1000, 5000, 0 }, age = 99;
    assert_int_equal(heartbeat_stuck(beats, 3, 31000, 30000, &age), -1); /* 30000: at the limit */
    assert_int_equal(age, 30000);
    assert_int_equal(heartbeat_stuck(beats, 3, 31001, 30000, &age), 0);
    assert_int_equal(age, 30001);
    beats[0] = 31000;
    assert_int_equal(heartbeat_stuck(beats, 3, 35000, 30000, &age), -1);
    assert_int_equal(age, 30000);
    assert_int_equal(heartbeat_stuck(beats, 3, 35001, 30000, &age), 1);
    assert_int_equal(age, 30001);
    /* the not-running slot is skipped whatever the clock */
    assert_int_equal(heartbeat_stuck(beats, 3, 1u << 30, 0, &age), -1);
    assert_int_equal(heartbeat_stuck(beats + 2, 1, 1u << 30, 1, &age), -1);
    assert_int_equal(age, 0);
    /* a clock behind a stamp (another thread's newer reading) is age 0 */
    uint64_t ahead[1] = { 50000 };
    assert_int_equal(heartbeat_stuck(ahead, 1, 49000, 10, &age), -1);
    assert_int_equal(age, 0);
}

static void test_health(void **state)
{
    (void)state;
    heartbeat_init(3, 30000);
    assert_health(100, 200, "ok: 3 workers\nheartbeat age ms: - - -\n");
    heartbeat_stamp(0, 1000);
    heartbeat_stamp(1, 2000);
    heartbeat_stamp(2, 3000);
    heartbeat_stamp(3, 1);      /* out of range: ignored */
    heartbeat_stamp(-1, 1);
    assert_health(4000, 200, "ok: 3 workers\nheartbeat age ms: 3000 2000 1000\n");
    /* worker 0 keeps stamping, worker 1 stops (stuck in a callback) */
    heartbeat_stamp(0, 32000);
    heartbeat_stamp(2, 32000);
    assert_health(32000, 200, "ok: 3 workers\nheartbeat age ms: 0 30000 0\n");
    assert_health(32001, 503,
                  "stuck: worker 1 heartbeat age 30001 ms > 30000 ms\nheartbeat age ms: 1 30001 1\n");
    /* it comes round again */
    heartbeat_stamp(1, 32500);
    assert_health(33000, 200, "ok: 3 workers\nheartbeat age ms: 1000 500 1000\n");
    /* a worker that left its loop (draining done) is not stuck */
    heartbeat_stamp(2, 0);
    assert_health(62600, 503,
                  "stuck: worker 0 heartbeat age 30600 ms > 30000 ms\nheartbeat age ms: 30600 30100 -\n");
    heartbeat_stamp(0, 0);
    heartbeat_stamp(1, 0);
    assert_health(99999, 200, "ok: 3 workers\nheartbeat age ms: - - -\n");
}

static void test_off_and_uninitialised(void **state)
{
    (void)state;
    heartbeat_init(0, 30000);
    assert_health(5, 200, "ok: 0 workers\nheartbeat age ms:\n");
    heartbeat_stamp(0, 1); /* no slots: ignored */
    assert_health(1u << 30, 200, "ok: 0 workers\nheartbeat age ms:\n");
    heartbeat_init(1, 0); /* stuck_after = 0: off */
    heartbeat_stamp(0, 1);
    assert_health(1000001, 200, "ok: 1 workers\nheartbeat age ms: 1000000\n");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decision),
        cmocka_unit_test(test_health),
        cmocka_unit_test(test_off_and_uninitialised),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

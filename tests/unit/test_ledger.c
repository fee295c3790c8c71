/*
 * Unit tests for deliverer/ledger without a Redis client: every call
 * completes exactly once with ok=0, never synchronously, newest first;
 * a cancelled call never completes; calls made from a callback complete
 * later; ledger_free() completes what is left.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <string.h>

#include "core/loop.h"
#include "deliverer/ledger.h"

typedef struct seen {
    int       order[2048];
    int       n;
    int       ok_sum;
    ledger_t *l;   /* for callbacks that make another call */
    int       chain;
} seen_t;

typedef struct tag {
    seen_t *s;
    int     id;
} tag_t;

static void on_done(void *arg, int ok)
{
    tag_t *t = arg;
    t->s->order[t->s->n++] = t->id;
    t->s->ok_sum += ok;
}

static void on_lookup(void *arg, int ok, const ledger_state_t *states)
{
    assert_int_equal(states[0], LEDGER_NONE);
    assert_int_equal(states[1], LEDGER_NONE);
    on_done(arg, ok);
}

static void on_count(void *arg, int ok, long long count)
{
    on_done(arg, ok);
}

static tag_t chained = { NULL, 99 };

static void on_done_chain(void *arg, int ok)
{
    tag_t *t = arg;
    on_done(arg, ok);
    if (t->s->chain-- > 0) {
        chained.s = t->s;
        const char *r[] = { "a@b" };
        ledger_mark(t->s->l, "m2", r, 1, LEDGER_DONE, on_done, &chained);
    }
}

static void spin(loop_t *loop)
{
    for (int i = 0; i < 5; i++)
        loop_run_once(loop, 5);
}

static void test_no_client_calls_fail_from_the_loop(void **state)
{
    loop_t *loop = loop_new();
    ledger_t *l = ledger_new(loop, NULL, 0);
    seen_t s;
    memset(&s, 0, sizeof(s));
    const char *rc[] = { "x@y", "Z@y" };
    tag_t t[4] = { { &s, 0 }, { &s, 1 }, { &s, 2 }, { &s, 3 } };
    ledger_lookup(l, "m1", rc, 2, on_lookup, &t[0]);
    uint64_t id1 = ledger_mark(l, "m1", rc, 2, LEDGER_SENDING, on_done, &t[1]);
    ledger_poison_count(l, "m1", on_count, &t[2]);
    ledger_mark(l, "m1", rc, 0, LEDGER_NONE, on_done, &t[3]);
    assert_int_equal(s.n, 0); /* never synchronously */
    ledger_cancel(l, id1);
    ledger_cancel(l, 123456); /* unknown: harmless */
    spin(loop);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.ok_sum, 0);
    /* newest first */
    assert_int_equal(s.order[0], 3);
    assert_int_equal(s.order[1], 2);
    assert_int_equal(s.order[2], 0);
    spin(loop);
    assert_int_equal(s.n, 3); /* exactly once */
    assert_int_equal(loop_timer_count(loop), 0);
    ledger_free(l);
    loop_free(loop);
}

static void test_many_calls_and_cancels(void **state)
{
    enum { N = 1000 };
    loop_t *loop = loop_new();
    ledger_t *l = ledger_new(loop, NULL, 0);
    static seen_t s;
    memset(&s, 0, sizeof(s));
    static tag_t t[N];
    uint64_t ids[N];
    for (int i = 0; i < N; i++) {
        t[i] = (tag_t){ &s, i };
        ids[i] = i % 2 ? ledger_poison_charge(l, "m", on_count, &t[i]) : ledger_poison_count(l, "m", on_count, &t[i]);
    }
    for (int i = 0; i < N; i += 2)
        ledger_cancel(l, ids[i]);
    spin(loop);
    assert_int_equal(s.n, N / 2);
    for (int i = 0; i < N / 2; i++)
        assert_int_equal(s.order[i], N - 1 - 2 * i);
    ledger_free(l);
    loop_free(loop);
}

static void test_calls_from_callbacks_and_free(void **state)
{
    loop_t *loop = loop_new();
    ledger_t *l = ledger_new(loop, NULL, 0);
    seen_t s;
    memset(&s, 0, sizeof(s));
    s.l = l;
    s.chain = 1;
    const char *rc[] = { "x@y" };
    tag_t t0 = { &s, 0 };
    ledger_mark(l, "m1", rc, 1, LEDGER_DONE, on_done_chain, &t0);
    spin(loop);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.order[0], 0);
    assert_int_equal(s.order[1], 99);

    /* ledger_free completes what is still pending, with ok=0 */
    tag_t t1 = { &s, 1 }, t2 = { &s, 2 };
    ledger_mark(l, "m3", rc, 1, LEDGER_DONE, on_done, &t1);
    uint64_t id = ledger_mark(l, "m3", rc, 1, LEDGER_DONE, on_done, &t2);
    ledger_cancel(l, id);
    ledger_free(l);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.order[2], 1);
    assert_int_equal(s.ok_sum, 0);
    assert_int_equal(loop_timer_count(loop), 0);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_client_calls_fail_from_the_loop),
        cmocka_unit_test(test_many_calls_and_cancels),
        cmocka_unit_test(test_calls_from_callbacks_and_free),
    };
    return cmocka_run_group_tests_name("ledger", tests, NULL, NULL);
}

/*
 * Unit tests for deliverer/ledger without a Redis client: every call
 * completes exactly once with ok=0, never synchronously, newest first;
 * a cancelled call never completes; calls made from a callback complete
 * later; ledger_free() completes what is left. Then against the fake
 * Redis of tests/support/fakeredis.h: the marks of one loop iteration
 * go as one batch, in order.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <string.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/ledger.h"
#include "tests/support/fakeredis.h"

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

static void on_lookup(void *arg, int ok, const ledger_state_t *states, const char *const *hops)
{
    assert_int_equal(states[0], LEDGER_NONE);
    assert_int_equal(states[1], LEDGER_NONE);
    assert_null(hops[0]);
    assert_null(hops[1]);
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

static int hop_seen;

static void on_hop_lookup(void *arg, int ok, const ledger_state_t *states, const char *const *hops)
{
    assert_int_equal(ok, 1);
    assert_int_equal(states[0], LEDGER_HANDING);
    assert_string_equal(hops[0], "hop-1");
    assert_int_equal(states[1], LEDGER_HANDED);
    assert_string_equal(hops[1], "hop-2");
    assert_int_equal(states[2], LEDGER_NONE);
    assert_null(hops[2]);
    hop_seen = 1;
}

/* Marks made in one loop iteration share one EVAL, applied in order (a
 * key marked twice ends as the second); a failed batch fails every call
 * in it; a cancelled call in a batch stays silent. */
static void test_marks_batched_per_iteration(void **state)
{
    loop_t *loop = loop_new();
    fakeredis_t *fr = fakeredis_new(loop);
    rclient_config_t rcfg = { .host = "127.0.0.1", .port = fr->port, .timeout_ms = 500 };
    rclient_t *rc = rclient_new(loop, &rcfg);
    for (uint64_t until = util_mono_ms() + 2000; !rclient_connected(rc) && util_mono_ms() < until;)
        loop_run_once(loop, 10);
    assert_true(rclient_connected(rc));
    ledger_t *l = ledger_new(loop, rc, 1000);
    seen_t s = { .n = 0 };
    tag_t t[4] = { { &s, 1 }, { &s, 2 }, { &s, 3 }, { &s, 4 } };
    const char *ab[] = { "A@b", "c@d" };
    const char *a[] = { "a@b" };
    const char *c[] = { "c@d" };
    ledger_mark(l, "m1", ab, 2, LEDGER_SENDING, on_done, &t[0]);
    ledger_mark(l, "m1", a, 1, LEDGER_DONE, on_done, &t[1]);
    ledger_mark(l, "m1", c, 1, LEDGER_NONE, on_done, &t[2]);
    uint64_t gone = ledger_mark(l, "m2", a, 1, LEDGER_DONE_FLAGGED, on_done, &t[3]);
    ledger_cancel(l, gone);
    assert_int_equal(s.n, 0);
    for (uint64_t until = util_mono_ms() + 2000; s.n < 3 && util_mono_ms() < until;)
        loop_run_once(loop, 10);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.ok_sum, 3);
    assert_int_equal(ledger_batches(l), 1);
    assert_int_equal(fr->nevals, 1);
    assert_string_equal(buf_head(&fr->log),
                        "EVAL <script> 5 mp:r:m1:a@b mp:r:m1:c@d mp:r:m1:a@b mp:r:m1:c@d mp:r:m2:a@b 1000 "
                        "sending sending done  done-dup\n");
    assert_string_equal(fakeredis_get(fr, "mp:r:m1:a@b"), "done");
    assert_null(fakeredis_get(fr, "mp:r:m1:c@d"));
    assert_string_equal(fakeredis_get(fr, "mp:r:m2:a@b"), "done-dup");

    /* a recipient handed to a retry reads back with the retry's token */
    s.n = s.ok_sum = 0;
    ledger_mark_handoff(l, "m4", a, 1, LEDGER_HANDING, "hop-1", on_done, &t[0]);
    ledger_mark_handoff(l, "m4", c, 1, LEDGER_HANDED, "hop-2", on_done, &t[1]);
    for (uint64_t until = util_mono_ms() + 2000; s.n < 2 && util_mono_ms() < until;)
        loop_run_once(loop, 10);
    assert_int_equal(s.ok_sum, 2);
    assert_string_equal(fakeredis_get(fr, "mp:r:m4:a@b"), "retry:hop-1");
    assert_string_equal(fakeredis_get(fr, "mp:r:m4:c@d"), "retried:hop-2");
    hop_seen = 0;
    const char *ac[] = { "a@b", "c@d", "x@y" };
    ledger_lookup(l, "m4", ac, 3, on_hop_lookup, NULL);
    for (uint64_t until = util_mono_ms() + 2000; !hop_seen && util_mono_ms() < until;)
        loop_run_once(loop, 10);
    assert_int_equal(hop_seen, 1);
    assert_int_equal(ledger_batches(l), 2);

    /* a batch Redis refuses fails each of its calls */
    fr->fail_next = 1;
    s.n = s.ok_sum = 0;
    ledger_mark(l, "m3", a, 1, LEDGER_DONE, on_done, &t[0]);
    ledger_mark(l, "m3", c, 1, LEDGER_DONE, on_done, &t[1]);
    for (uint64_t until = util_mono_ms() + 2000; s.n < 2 && util_mono_ms() < until;)
        loop_run_once(loop, 10);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.ok_sum, 0);
    assert_int_equal(ledger_batches(l), 3);
    rclient_free(rc);
    ledger_free(l);
    fakeredis_free(fr);
    for (int i = 0; i < 50 && (loop_fd_count(loop) || loop_timer_count(loop)); i++)
        loop_run_once(loop, 10);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_client_calls_fail_from_the_loop),
        cmocka_unit_test(test_many_calls_and_cancels),
        cmocka_unit_test(test_calls_from_callbacks_and_free),
        cmocka_unit_test(test_marks_batched_per_iteration),
    };
    return cmocka_run_group_tests_name("ledger", tests, NULL, NULL);
}

/*
 * Unit tests for deliverer/pool: who gets a slot, and in which order,
 * when destinations and the worker are at their limits. Only slots are
 * exercised (SMTP_POOL_CONNECT grants released without a session), so
 * the order of the callbacks is exact.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "core/loop.h"
#include "deliverer/pool.h"

typedef struct waiter {
    smtp_pool_wait_t w;
    const char      *name;
    char            *log; /* appended to on grant */
    int              how;
} waiter_t;

static void on_grant(void *arg, int how, smtp_session_t *s)
{
    waiter_t *w = arg;
    (void)s;
    w->how = how;
    strcat(w->log, w->name);
    strcat(w->log, " ");
}

static void run_once(loop_t *loop)
{
    loop_run_once(loop, 0);
}

static int acquire(smtp_pool_t *p, const char *key, waiter_t *w, const char *name, char *log)
{
    smtp_session_t *s = NULL;
    memset(w, 0, sizeof(*w));
    w->name = name;
    w->log = log;
    return smtp_pool_acquire(p, key, &s, &w->w, on_grant, w);
}

/* A destination at its limit waits for its own releases; the worker at
 * max_total serves the destinations that starved for room in the order
 * they starved, before a newcomer. */
static void test_per_dest_and_worker_order(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    smtp_pool_limits_t lim = { .max_per_dest = 1, .max_total = 2 };
    smtp_pool_t *p = smtp_pool_new(loop, &lim);
    char log[256] = "";
    waiter_t a1, a2, b1, c1, d1, b2;
    assert_int_equal(acquire(p, "A", &a1, "a1", log), SMTP_POOL_CONNECT);
    assert_int_equal(acquire(p, "A", &a2, "a2", log), SMTP_POOL_WAIT); /* A at its limit */
    assert_int_equal(acquire(p, "B", &b1, "b1", log), SMTP_POOL_CONNECT);
    assert_int_equal(acquire(p, "C", &c1, "c1", log), SMTP_POOL_WAIT); /* the worker full */
    assert_int_equal(acquire(p, "D", &d1, "d1", log), SMTP_POOL_WAIT);
    smtp_pool_stats_t st;
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.waiting, 3);
    assert_int_equal(st.busy, 2);

    /* A's slot frees room in the worker: C starved first and gets it,
     * A's own waiter now waits for room behind D */
    smtp_pool_release(p, "A", NULL);
    run_once(loop);
    assert_string_equal(log, "c1 ");
    assert_int_equal(c1.how, SMTP_POOL_CONNECT);

    /* B's slot: D starved before A's waiter did */
    smtp_pool_release(p, "B", NULL);
    run_once(loop);
    assert_string_equal(log, "c1 d1 ");
    /* a newcomer queues behind the starved one, even for a fresh key */
    assert_int_equal(acquire(p, "B", &b2, "b2", log), SMTP_POOL_WAIT);
    smtp_pool_release(p, "C", NULL);
    run_once(loop);
    assert_string_equal(log, "c1 d1 a2 ");
    smtp_pool_release(p, "D", NULL);
    run_once(loop);
    assert_string_equal(log, "c1 d1 a2 b2 ");
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(st.busy, 2);
    smtp_pool_release(p, "A", NULL);
    smtp_pool_release(p, "B", NULL);
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.busy, 0);
    assert_int_equal(st.dests, 0); /* nothing holds them: freed */
    smtp_pool_free(p);
    loop_free(loop);
}

/* Thousands of waiters at one destination at its limit: a release at
 * another destination grants nothing there and wakes nobody. */
static void test_waiters_elsewhere_untouched(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    smtp_pool_limits_t lim = { .max_per_dest = 1, .max_total = 100 };
    smtp_pool_t *p = smtp_pool_new(loop, &lim);
    char log[64] = "";
    static waiter_t many[2000];
    waiter_t x1, x2;
    assert_int_equal(acquire(p, "slow", &many[0], "m", log), SMTP_POOL_CONNECT);
    for (int i = 1; i < 2000; i++)
        assert_int_equal(acquire(p, "slow", &many[i], "m", log), SMTP_POOL_WAIT);
    assert_int_equal(acquire(p, "fast", &x1, "x1", log), SMTP_POOL_CONNECT);
    assert_int_equal(acquire(p, "fast", &x2, "x2", log), SMTP_POOL_WAIT);
    smtp_pool_release(p, "fast", NULL);
    run_once(loop);
    assert_string_equal(log, "x2 ");
    /* one release at "slow": exactly its next waiter */
    smtp_pool_release(p, "slow", NULL);
    run_once(loop);
    assert_string_equal(log, "x2 m ");
    assert_int_equal(many[1].how, SMTP_POOL_CONNECT);
    assert_int_equal(many[2].how, 0);
    for (int i = 2; i < 2000; i++)
        smtp_pool_cancel(p, &many[i].w);
    smtp_pool_release(p, "slow", NULL);
    smtp_pool_release(p, "fast", NULL);
    smtp_pool_stats_t st;
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(st.dests, 0);
    smtp_pool_free(p);
    loop_free(loop);
}

/* Freeing the pool fails its waiters with how = 0. */
static void test_free_fails_waiters(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    smtp_pool_limits_t lim = { .max_per_dest = 1 };
    smtp_pool_t *p = smtp_pool_new(loop, &lim);
    char log[64] = "";
    waiter_t a1, a2;
    assert_int_equal(acquire(p, "A", &a1, "a1", log), SMTP_POOL_CONNECT);
    assert_int_equal(acquire(p, "A", &a2, "a2", log), SMTP_POOL_WAIT);
    a2.how = -1;
    smtp_pool_free(p);
    assert_string_equal(log, "a2 ");
    assert_int_equal(a2.how, 0);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_per_dest_and_worker_order),
        cmocka_unit_test(test_waiters_elsewhere_untouched),
        cmocka_unit_test(test_free_fails_waiters),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

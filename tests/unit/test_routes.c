/*
 * Unit tests for deliverer/routes: the route penalty table the workers
 * share. Exact penalties (doubling, cap), forgetting, the full table,
 * disabled tables, and many threads at once.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "deliverer/routes.h"

static void test_doubling_and_cap(void **state)
{
    routes_t *r = routes_new(200, 1000);
    route_state_t st;
    unsigned f = 0;
    assert_int_equal(routes_down(r, "10.0.0.1|25", 0, &st), 0);
    assert_int_equal(routes_failed(r, "10.0.0.1|25", 1000, 0, "refused", &f), 200);
    assert_int_equal(f, 1);
    assert_int_equal(routes_down(r, "10.0.0.1|25", 1199, &st), 1);
    assert_int_equal(st.until_ms, 1200);
    assert_int_equal(st.failures, 1);
    assert_string_equal(st.why, "refused");
    assert_int_equal(routes_down(r, "10.0.0.1|25", 1200, &st), 0); /* served its time */
    assert_int_equal(routes_down(r, "10.0.0.1|26", 1100, &st), 0); /* another port */
    assert_int_equal(routes_failed(r, "10.0.0.1|25", 2000, 0, "again", &f), 400);
    assert_int_equal(routes_failed(r, "10.0.0.1|25", 3000, 0, "again", &f), 800);
    assert_int_equal(routes_failed(r, "10.0.0.1|25", 4000, 0, "again", &f), 1000); /* capped */
    assert_int_equal(routes_failed(r, "10.0.0.1|25", 5000, 0, "again", &f), 1000);
    assert_int_equal(f, 5);
    assert_int_equal(routes_ok(r, "10.0.0.1|25"), 5);
    assert_int_equal(routes_ok(r, "10.0.0.1|25"), 0);
    assert_int_equal(routes_down(r, "10.0.0.1|25", 5001, &st), 0);
    assert_int_equal(routes_failed(r, "10.0.0.1|25", 6000, 0, "new run", &f), 200); /* the count starts over */
    /* the kind of the failure is kept with its words */
    routes_failed(r, "10.0.0.7|25", 6000, -2, "greeting timeout", &f);
    assert_int_equal(routes_down(r, "10.0.0.7|25", 6100, &st), 1);
    assert_int_equal(st.cause, -2);
    assert_string_equal(st.why, "greeting timeout");
    routes_free(r);
}

/* An address nobody tries again is forgotten once its penalty has been
 * over for the maximum; before that the count for the doubling stays. */
static void test_forgotten_after_max(void **state)
{
    routes_t *r = routes_new(200, 1000);
    route_state_t st;
    unsigned f = 0;
    assert_int_equal(routes_failed(r, "10.0.0.9|25", 1000, 0, "refused", &f), 200); /* until 1200 */
    assert_int_equal(routes_down(r, "10.0.0.1|25", 2199, &st), 0);               /* prunes nothing yet */
    assert_int_equal(routes_failed(r, "10.0.0.9|25", 2199, 0, "again", &f), 400);   /* until 2599 */
    assert_int_equal(f, 2);
    assert_int_equal(routes_down(r, "10.0.0.1|25", 3598, &st), 0);
    assert_int_equal(routes_ok(r, "10.0.0.9|25"), 2); /* still remembered at 3598 */
    assert_int_equal(routes_failed(r, "10.0.0.9|25", 4000, 0, "new", &f), 200); /* until 4200 */
    assert_int_equal(routes_down(r, "10.0.0.1|25", 5200, &st), 0);          /* 4200 + 1000: gone */
    assert_int_equal(routes_ok(r, "10.0.0.9|25"), 0);
    assert_int_equal(routes_failed(r, "10.0.0.9|25", 5300, 0, "fresh", &f), 200);
    assert_int_equal(f, 1);
    routes_free(r);
}

static void test_full_table_and_disabled(void **state)
{
    routes_t *r = routes_new(100, 0);
    char key[32];
    unsigned f;
    for (int i = 0; i < ROUTES_MAX; i++) {
        snprintf(key, sizeof(key), "10.1.%d.%d|25", i / 250, i % 250);
        routes_failed(r, key, (uint64_t)i, 0, "x", &f);
    }
    /* full: the one that frees up soonest (the first) makes room */
    routes_failed(r, "10.9.9.9|25", 500, 0, "newest", &f);
    route_state_t st;
    assert_int_equal(routes_down(r, "10.1.0.0|25", 50, &st), 0);
    assert_int_equal(routes_down(r, "10.9.9.9|25", 550, &st), 1);
    assert_int_equal(routes_down(r, "10.1.0.1|25", 50, &st), 1);
    routes_free(r);

    routes_t *off = routes_new(0, 0);
    f = 77;
    assert_int_equal(routes_failed(off, "10.0.0.1|25", 0, 0, "x", &f), 0);
    assert_int_equal(f, 77);
    assert_int_equal(routes_down(off, "10.0.0.1|25", 0, &st), 0);
    routes_free(off);
    routes_free(NULL);
}

static void *hammer(void *arg)
{
    routes_t *r = arg;
    char key[32];
    route_state_t st;
    unsigned f;
    for (int i = 0; i < 20000; i++) {
        snprintf(key, sizeof(key), "10.2.0.%d|25", i % 8);
        switch (i % 3) {
        case 0: routes_failed(r, key, (uint64_t)i, 0, "busy", &f); break;
        case 1: routes_down(r, key, (uint64_t)i, &st); break;
        default: routes_ok(r, key); break;
        }
    }
    return NULL;
}

/* Workers mark, look up and forget at once: no lost entry, no torn one
 * (ASan/UBSan in CI; the table stays within its 8 keys). */
static void test_threads(void **state)
{
    routes_t *r = routes_new(100, 1000);
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&th[i], NULL, hammer, r), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    unsigned f;
    routes_failed(r, "10.2.0.0|25", 1000000, 0, "last", &f);
    route_state_t st;
    assert_int_equal(routes_down(r, "10.2.0.0|25", 1000001, &st), 1);
    assert_string_equal(st.why, "last");
    routes_free(r);
}

typedef struct {
    routes_t          *r;
    pthread_barrier_t *go;
    int                base;
} marker_t;

static void *mark_keys(void *arg)
{
    marker_t *m = arg;
    char key[32];
    unsigned f;
    pthread_barrier_wait(m->go);
    for (int i = 0; i < 50; i++) {
        snprintf(key, sizeof(key), "10.3.%d.%d|25", m->base, i);
        routes_failed(m->r, key, 1000, 0, "refused", &f);
    }
    return NULL;
}

/* Four workers mark 50 new addresses each at the same instant, 40 times
 * over: every one of the 200 is then down with exactly one failure (an
 * unguarded table loses or doubles entries). */
static void test_threads_no_entry_lost(void **state)
{
    for (int round = 0; round < 40; round++) {
        routes_t *r = routes_new(100, 1000);
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, 4);
        marker_t m[4];
        pthread_t th[4];
        for (int i = 0; i < 4; i++) {
            m[i] = (marker_t){ r, &go, i };
            assert_int_equal(pthread_create(&th[i], NULL, mark_keys, &m[i]), 0);
        }
        for (int i = 0; i < 4; i++)
            pthread_join(th[i], NULL);
        pthread_barrier_destroy(&go);
        char key[32];
        route_state_t st;
        for (int t = 0; t < 4; t++)
            for (int i = 0; i < 50; i++) {
                snprintf(key, sizeof(key), "10.3.%d.%d|25", t, i);
                if (!routes_down(r, key, 1001, &st) || st.failures != 1)
                    fail_msg("round %d: %s lost or counted twice", round, key);
            }
        routes_free(r);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_doubling_and_cap),
        cmocka_unit_test(test_forgotten_after_max),
        cmocka_unit_test(test_full_table_and_disabled),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_threads_no_entry_lost),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for deliverer/throttle: parsing [smtp] rate_limits, which
 * rule a domain falls under, the exact waits of the spacing (GCRA), a
 * wait too long reserving nothing, and many threads sharing a rule.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "deliverer/throttle.h"

static throttle_t *make(const char *spec)
{
    throttle_t *t = NULL;
    char err[256] = "";
    if (throttle_new(spec, &t, err, sizeof(err)) != 0)
        fail_msg("spec \"%s\" refused: %s", spec, err);
    return t;
}

static void test_parse(void **state)
{
    throttle_t *t = NULL;
    char err[256];
    assert_int_equal(throttle_new("", &t, err, sizeof(err)), 0);
    assert_null(t);
    assert_int_equal(throttle_new(NULL, &t, err, sizeof(err)), 0);
    assert_null(t);
    assert_int_equal(throttle_new(" , ", &t, err, sizeof(err)), 0);
    assert_null(t);
    t = make(" gmail.com:100/s , .yahoo.com:20/m,example.org:5000/h ");
    char rule[96];
    assert_int_equal(throttle_take(t, "gmail.com", 0, 0, rule, sizeof(rule)), 0);
    assert_string_equal(rule, "gmail.com:100/s");
    assert_int_equal(throttle_take(t, "mail.yahoo.com", 0, 0, rule, sizeof(rule)), 0);
    assert_string_equal(rule, ".yahoo.com:20/m");
    assert_int_equal(throttle_take(t, "example.org", 0, 0, rule, sizeof(rule)), 0);
    assert_string_equal(rule, "example.org:5000/h");
    throttle_free(t);

    const char *bad[] = { "gmail.com", "gmail.com:", ":5/s", "gmail.com:0/s", "gmail.com:5", "gmail.com:5/d",
                          "gmail.com:5/ss", "gmail.com:x/s", "gm ail.com:5/s", ".:5/s", "a.com:5/s,b.com",
                          "gmail.com:1000001/s" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        t = NULL;
        err[0] = '\0';
        if (throttle_new(bad[i], &t, err, sizeof(err)) != -1)
            fail_msg("\"%s\" accepted", bad[i]);
        assert_null(t);
        assert_non_null(strstr(err, "[smtp] rate_limits: \""));
    }
    assert_int_equal(throttle_new("a.com:5/s, gmail.com:5/d", &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "\"gmail.com:5/d\""));
}

/* Exact names, ".suffix" for the domain and its subdomains, case, and
 * the first matching rule wins; other domains are not limited. */
static void test_matching(void **state)
{
    throttle_t *t = make("mx.example.org:1/s, .example.org:2/s, Gmail.COM:3/s");
    char rule[96];
    assert_int_equal(throttle_take(t, "mx.example.org", 0, 0, rule, sizeof(rule)), 0);
    assert_string_equal(rule, "mx.example.org:1/s");
    assert_int_equal(throttle_take(t, "example.org", 0, 0, rule, sizeof(rule)), 0);
    assert_string_equal(rule, ".example.org:2/s");
    assert_int_equal(throttle_take(t, "a.b.EXAMPLE.org", 0, 0, rule, sizeof(rule)), 500);
    assert_string_equal(rule, ".example.org:2/s"); /* one budget for the rule */
    assert_int_equal(throttle_take(t, "gmail.com", 0, 0, rule, sizeof(rule)), 0);
    assert_int_equal(throttle_take(t, "notexample.org", 0, 0, NULL, 0), -1);
    assert_int_equal(throttle_take(t, "mail.gmail.com", 0, 0, NULL, 0), -1);
    assert_int_equal(throttle_take(t, "org", 0, 0, NULL, 0), -1);
    assert_int_equal(throttle_take(NULL, "gmail.com", 0, 0, NULL, 0), -1);
    throttle_free(t);
}

/* 4 per second: one message every 250 ms. Messages arriving together
 * wait 0, 250, 500 ...; a wait over the caller's limit reserves nothing;
 * after a quiet spell the next goes at once and no credit piles up. */
static void test_spacing(void **state)
{
    throttle_t *t = make("d.test:4/s");
    const int64_t want[] = { 0, 250, 500, 750, 1000 };
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(throttle_take(t, "d.test", 10000, 1000, NULL, 0), want[i]);
    /* the next would wait 1250 ms: over the limit, nothing reserved */
    assert_int_equal(throttle_take(t, "d.test", 10000, 1000, NULL, 0), 1250);
    assert_int_equal(throttle_take(t, "d.test", 10000, 1000, NULL, 0), 1250);
    /* 1000 ms later the queue has moved on by 4 slots */
    assert_int_equal(throttle_take(t, "d.test", 11000, 1000, NULL, 0), 250);
    /* quiet for a minute: at once, then spaced again (no burst saved up) */
    assert_int_equal(throttle_take(t, "d.test", 71000, 1000, NULL, 0), 0);
    assert_int_equal(throttle_take(t, "d.test", 71000, 1000, NULL, 0), 250);
    assert_int_equal(throttle_take(t, "d.test", 71100, 1000, NULL, 0), 400);
    throttle_free(t);

    /* 5000/h: 720 ms apart; a fraction of a ms rounds up */
    t = make("h.test:5000/h, m.test:7/m");
    assert_int_equal(throttle_take(t, "h.test", 0, 10000, NULL, 0), 0);
    assert_int_equal(throttle_take(t, "h.test", 0, 10000, NULL, 0), 720);
    assert_int_equal(throttle_take(t, "m.test", 0, 60000, NULL, 0), 0);
    assert_int_equal(throttle_take(t, "m.test", 0, 60000, NULL, 0), 8572); /* 60000 / 7 = 8571.4 */
    throttle_free(t);
}

#define TAKES 20000

typedef struct {
    throttle_t        *t;
    pthread_barrier_t *go;
    int64_t            waits[TAKES];
} worker_arg_t;

static void *taker(void *arg)
{
    worker_arg_t *a = arg;
    pthread_barrier_wait(a->go);
    for (int i = 0; i < TAKES; i++)
        a->waits[i] = throttle_take(a->t, "x.test", 5000, 100000000, NULL, 0);
    return NULL;
}

/* Four threads take 20,000 slots each, starting at the same instant: the
 * 80,000 waits are exactly 0, 10, 20 ... ms, each once (none lost, none
 * shared; without the lock some are). */
static void test_threads(void **state)
{
    throttle_t *t = make("x.test:100/s");
    static worker_arg_t a[4];
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, 4);
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        a[i].t = t;
        a[i].go = &go;
        assert_int_equal(pthread_create(&th[i], NULL, taker, &a[i]), 0);
    }
    static int seen[4 * TAKES];
    memset(seen, 0, sizeof(seen));
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        for (int k = 0; k < TAKES; k++) {
            int64_t w = a[i].waits[k];
            if (!(w >= 0 && w % 10 == 0 && w / 10 < 4 * TAKES))
                fail_msg("thread %d take %d: wait %lld", i, k, (long long)w);
            seen[w / 10]++;
        }
    }
    pthread_barrier_destroy(&go);
    for (int i = 0; i < 4 * TAKES; i++)
        if (seen[i] != 1)
            fail_msg("slot %d taken %d times", i, seen[i]);
    throttle_free(t);
}

/* The ask without Redis answers at once from the process's table: -1
 * when no rule limits the domain, else the same spacing as
 * throttle_take(); the callback never fires. */
static int asks_fired;
static void on_answer(void *arg, const throttle_answer_t *ans)
{
    asks_fired++;
}

static void test_ask_without_redis(void **state)
{
    throttle_t *t = NULL;
    char err[256];
    assert_int_equal(throttle_new("slow.test:2/s", &t, err, sizeof(err)), 0);
    throttle_ask_t ask;
    throttle_answer_t now;
    assert_int_equal(throttle_ask_start(&ask, t, NULL, "fast.test", 10000, on_answer, NULL, &now), 1);
    assert_int_equal(now.wait_ms, -1);
    assert_string_equal(now.rule, "");
    assert_int_equal(throttle_ask_start(&ask, t, NULL, "slow.test", 10000, on_answer, NULL, &now), 1);
    assert_int_equal(now.wait_ms, 0);
    assert_string_equal(now.rule, "slow.test:2/s");
    assert_int_equal(now.local_fallback, 0);
    assert_int_equal(throttle_ask_start(&ask, t, NULL, "slow.test", 10000, on_answer, NULL, &now), 1);
    assert_in_range(now.wait_ms, 490, 500); /* the next slot, 500 ms after the first */
    /* a slot further than max_wait reserves nothing: the same wait again */
    assert_int_equal(throttle_ask_start(&ask, t, NULL, "slow.test", 100, on_answer, NULL, &now), 1);
    assert_in_range(now.wait_ms, 900, 1000);
    assert_int_equal(throttle_ask_start(&ask, t, NULL, "slow.test", 100, on_answer, NULL, &now), 1);
    assert_in_range(now.wait_ms, 900, 1000);
    throttle_ask_cancel(&ask); /* nothing in flight: harmless */
    assert_int_equal(asks_fired, 0);
    /* no table at all ([smtp] rate_limits empty) */
    assert_int_equal(throttle_ask_start(&ask, NULL, NULL, "slow.test", 100, on_answer, NULL, &now), 1);
    assert_int_equal(now.wait_ms, -1);
    throttle_free(t);
}

/* An explicit rate (shaping) keeps its own budget per rule text. */
static void test_ask_rate(void **state)
{
    (void)state;
    double iv = 0;
    assert_int_equal(throttle_parse_rate("300/m", &iv), 0);
    assert_true(iv > 199.9 && iv < 200.1);
    assert_int_equal(throttle_parse_rate("5/h", &iv), 0);
    assert_true(iv > 719999.0 && iv < 720001.0);
    const char *bad[] = { "", "0/s", "5", "5/d", "x/s", "2000000/s", "5/ss" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(throttle_parse_rate(bad[i], &iv), -1);

    throttle_ask_t ask;
    throttle_answer_t now;
    /* 1/h: the first message goes at once, the next is an hour away and
     * not reserved (further than max wait), a second key is independent */
    assert_int_equal(throttle_ask_rate(&ask, NULL, "t.example@mta1:1/h", 3600000.0, 1000, on_answer, NULL, &now), 1);
    assert_int_equal(now.wait_ms, 0);
    assert_string_equal(now.rule, "t.example@mta1:1/h");
    assert_int_equal(now.local_fallback, 0);
    assert_int_equal(throttle_ask_rate(&ask, NULL, "t.example@mta1:1/h", 3600000.0, 1000, on_answer, NULL, &now), 1);
    assert_true(now.wait_ms > 3590000 && now.wait_ms <= 3600000);
    assert_int_equal(throttle_ask_rate(&ask, NULL, "t.example@mta1:1/h", 3600000.0, 1000, on_answer, NULL, &now), 1);
    assert_true(now.wait_ms > 3590000 && now.wait_ms <= 3600000); /* nothing was reserved */
    assert_int_equal(throttle_ask_rate(&ask, NULL, "t.example@mta2:1/h", 3600000.0, 1000, on_answer, NULL, &now), 1);
    assert_int_equal(now.wait_ms, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_matching),
        cmocka_unit_test(test_spacing),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_ask_without_redis),
        cmocka_unit_test(test_ask_rate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

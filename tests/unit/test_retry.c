/*
 * Unit tests for deliverer/retry: levels, classes, backoff with jitter,
 * level choice, fast retries, and delays asked for by servers.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "deliverer/retry.h"

static void test_levels_parse(void **state)
{
    retry_levels_t l;
    assert_int_equal(retry_levels_parse("30s, 1m,90s,2h,1d", &l), 0);
    assert_int_equal(l.n, 5);
    const unsigned long long ms[] = { 30000, 60000, 90000, 7200000, 86400000 };
    const char *names[] = { "30s", "1m", "90s", "2h", "1d" };
    for (size_t i = 0; i < l.n; i++) {
        assert_int_equal(l.ms[i], ms[i]);
        assert_string_equal(l.names[i], names[i]);
    }
    retry_levels_free(&l);
    assert_int_equal(retry_levels_parse("250ms,500", &l), 0);
    assert_string_equal(l.names[0], "250ms");
    assert_string_equal(l.names[1], "500ms");
    retry_levels_free(&l);
    const char *bad[] = { "", "1m,30s", "30s,30s", "0s", "x", "5q", "-1s" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(retry_levels_parse(bad[i], &l), -1);
        assert_int_equal(l.n, 0);
    }
}

static void test_classes(void **state)
{
    const int want[11] = { 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0 };
    for (int p = 0; p <= 10; p++)
        assert_int_equal(retry_class(p), want[p]);
}

static void test_backoff_doubles_with_bounded_jitter(void **state)
{
    for (unsigned a = 1; a <= 6; a++) {
        unsigned long long nominal = 1000ull << (a - 1);
        unsigned long long lo = retry_backoff_ms(1000, a, 0.0);
        unsigned long long hi = retry_backoff_ms(1000, a, 0.999999);
        unsigned long long mid = retry_backoff_ms(1000, a, 0.5);
        assert_int_equal(lo, nominal * 85 / 100);
        assert_true(hi < nominal * 115 / 100 + 1 && hi > nominal * 114 / 100);
        assert_int_equal(mid, nominal);
    }
}

static void test_pick_level(void **state)
{
    retry_levels_t l;
    assert_int_equal(retry_levels_parse("30s,1m,5m,1h", &l), 0);
    assert_int_equal(retry_pick_level(&l, 1000, 0), 0);
    assert_int_equal(retry_pick_level(&l, 30000, 0), 0);
    assert_int_equal(retry_pick_level(&l, 30001, 0), 1);
    assert_int_equal(retry_pick_level(&l, 61000, 0), 2);
    assert_int_equal(retry_pick_level(&l, 99999999, 0), 3); /* capped at the longest */
    /* a server that asks for 10 minutes gets at least that */
    assert_int_equal(retry_pick_level(&l, 30000, 600000), 3);
    assert_int_equal(retry_pick_level(&l, 30000, 45000), 1);
    retry_levels_free(&l);
}

static void test_fast_delay(void **state)
{
    assert_int_equal(retry_fast_delay_ms(50, 0, 0.5), 50);
    assert_int_equal(retry_fast_delay_ms(50, 1, 0.5), 100);
    assert_int_equal(retry_fast_delay_ms(50, 3, 0.5), 400);
    assert_int_equal(retry_fast_delay_ms(1000, 5, 0.5), 3000); /* capped at 3 s */
    assert_int_equal(retry_fast_delay_ms(1000, 5, 0.0), 2550);
    assert_true(retry_fast_delay_ms(1000, 9, 0.999) < 3450);
}

static void test_server_delay(void **state)
{
    static const struct {
        const char *text;
        unsigned long long ms;
    } cases[] = {
        { "Greylisted, please try again in 300 seconds", 300000 },
        { "4.7.1 Try again in 5 minutes", 300000 },
        { "rate limited: retry after 2 hours", 7200000 },
        { "too many connections, wait 30s", 30000 },
        { "Please retry in 1 min", 60000 },
        { "4.2.0 try again later", 0 },
        { "Mailbox in 4.2.2 over quota", 0 },
        { "queued as 4Xk2 in 12ms", 0 },
        { "", 0 },
        { "main 5 minutes", 0 }, /* "in" inside a word is no introduction */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (retry_server_delay_ms(cases[i].text) != cases[i].ms)
            fail_msg("\"%s\": got %llu, want %llu", cases[i].text,
                     (unsigned long long)retry_server_delay_ms(cases[i].text), cases[i].ms);
    assert_int_equal(retry_server_delay_ms(NULL), 0);
}

/* [retry] translated once: each class's keys land in its own struct. */
static void test_policy_from_config(void **state)
{
    mp_config_t cfg;
    config_defaults(&cfg);
    cfg.retry_base_ms[1] = 1111;
    cfg.retry_max_age_ms[2] = 86400000ULL * 9; /* the longest: the ledger's TTL */
    cfg.retry_max_attempts[0] = 7;
    cfg.retry_fast_retries[2] = 4;
    cfg.retry_fast_base_ms[0] = 33;
    cfg.retry_poison_redeliveries = 9;
    retry_policy_t p;
    char err[128];
    assert_int_equal(retry_policy_init(&p, &cfg, err, sizeof(err)), 0);
    assert_int_equal(p.cls[1].base_ms, 1111);
    assert_int_equal(p.cls[0].base_ms, 30000);
    assert_int_equal(p.cls[2].max_age_ms, 86400000ULL * 9);
    assert_int_equal(p.max_age_ms, 86400000ULL * 9);
    assert_int_equal(p.cls[0].max_attempts, 7);
    assert_int_equal(p.cls[2].fast_retries, 4);
    assert_int_equal(p.cls[0].fast_base_ms, 33);
    assert_int_equal(p.poison_redeliveries, 9);
    assert_string_equal(p.queue_prefix, "mail.retry");
    assert_int_equal(p.levels.n, 12);
    char q[64];
    retry_queue_name(p.queue_prefix, &p.levels, 3, q, sizeof(q));
    assert_string_equal(q, "mail.retry.5m");
    retry_policy_free(&p);
    free(cfg.retry_levels);
    cfg.retry_levels = strdup("1m,30s");
    assert_int_equal(retry_policy_init(&p, &cfg, err, sizeof(err)), -1);
    assert_string_equal(err, "[retry] levels: cannot parse \"1m,30s\"");
    config_free(&cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_policy_from_config),
        cmocka_unit_test(test_levels_parse),
        cmocka_unit_test(test_classes),
        cmocka_unit_test(test_backoff_doubles_with_bounded_jitter),
        cmocka_unit_test(test_pick_level),
        cmocka_unit_test(test_fast_delay),
        cmocka_unit_test(test_server_delay),
    };
    return cmocka_run_group_tests_name("retry", tests, NULL, NULL);
}

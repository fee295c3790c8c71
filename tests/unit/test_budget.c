/*
 * Unit tests for deliverer/budget: the derived size limits, the cgroup
 * and automatic memory limit, the charge accounting (pause and resume
 * thresholds, the hard bound, a lone large message), the size syntax of
 * [message] inflight_memory and its start-up check (env_build).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "deliverer/budget.h"
#include "deliverer/env.h"

#define MiB (1024ULL * 1024ULL)

static void test_max_body_and_charge(void **state)
{
    /* the default max_size, 25 MiB: 2 x + 64 KiB */
    assert_int_equal(budget_max_body(26214400), 52494336);
    assert_int_equal(budget_max_body(1 * MiB), 2 * MiB + 65536);
    assert_int_equal(budget_charge(1000, 0), 1000 * BUDGET_CHARGE_FACTOR);
    /* a truncated delivery is charged only the head it keeps */
    assert_int_equal(budget_charge(80000000, 1), BUDGET_HEAD_BYTES);
    assert_int_equal(budget_charge(100, 1), 100);
}

static void test_parse_limit(void **state)
{
    uint64_t n = 0;
    assert_int_equal(budget_parse_limit("max\n", &n), 0);
    assert_int_equal(budget_parse_limit("", &n), 0);
    assert_int_equal(budget_parse_limit(NULL, &n), 0);
    assert_int_equal(budget_parse_limit("garbage", &n), 0);
    assert_int_equal(budget_parse_limit("12x\n", &n), 0);
    assert_int_equal(budget_parse_limit("0\n", &n), 0);
    /* v1 without a limit: LONG_MAX rounded down to a page */
    assert_int_equal(budget_parse_limit("9223372036854771712\n", &n), 0);
    assert_int_equal(budget_parse_limit("536870912\n", &n), 1);
    assert_int_equal(n, 536870912);
    assert_int_equal(budget_parse_limit("  2147483648", &n), 1);
    assert_int_equal(n, 2147483648ULL);
}

static void test_memory_from(void **state)
{
    uint64_t phys = 8192 * MiB;
    /* v2 first, then v1, never above physical RAM, else physical RAM */
    assert_int_equal(budget_memory_from("1073741824\n", "536870912\n", phys), 1073741824ULL);
    assert_int_equal(budget_memory_from("max\n", "536870912\n", phys), 536870912ULL);
    assert_int_equal(budget_memory_from(NULL, "536870912\n", phys), 536870912ULL);
    assert_int_equal(budget_memory_from("max\n", "9223372036854771712\n", phys), phys);
    assert_int_equal(budget_memory_from(NULL, NULL, phys), phys);
    assert_int_equal(budget_memory_from("17179869184\n", NULL, phys), phys);
}

static void test_auto(void **state)
{
    /* a quarter of the memory, divided among the workers */
    assert_int_equal(budget_auto(4096 * MiB, 2, 50 * MiB), 512 * MiB);
    assert_int_equal(budget_auto(4096 * MiB, 0, 50 * MiB), 1024 * MiB);
    /* never below the largest allowed body */
    assert_int_equal(budget_auto(256 * MiB, 8, 50 * MiB), 50 * MiB);
}

static void test_pause_resume(void **state)
{
    budget_t b;
    budget_init(&b, 1000, 400);
    assert_int_equal(b.hard, 1400);
    assert_int_equal(budget_resume_below(&b), 750);
    assert_int_equal(budget_take(&b, 600), 1);
    assert_int_equal(budget_update(&b), BUDGET_STEADY);
    assert_int_equal(budget_take(&b, 399), 1);
    assert_int_equal(budget_update(&b), BUDGET_STEADY); /* 999 */
    assert_int_equal(budget_take(&b, 1), 1);
    assert_int_equal(budget_update(&b), BUDGET_PAUSE); /* 1000: at the limit */
    assert_int_equal(b.paused, 1);
    assert_int_equal(budget_update(&b), BUDGET_STEADY); /* told once */
    budget_release(&b, 1);
    assert_int_equal(budget_update(&b), BUDGET_STEADY); /* 999: not yet below 3/4 */
    budget_release(&b, 399);
    assert_int_equal(budget_update(&b), BUDGET_RESUME); /* 600 < 750 */
    assert_int_equal(b.charge, 600);
    assert_int_equal(b.held, 1);
}

static void test_resume_below_three_quarters(void **state)
{
    budget_t b;
    budget_init(&b, 1000, 400);
    assert_int_equal(budget_take(&b, 500), 1);
    assert_int_equal(budget_take(&b, 500), 1);
    assert_int_equal(budget_update(&b), BUDGET_PAUSE);
    budget_release(&b, 250);
    assert_int_equal(budget_update(&b), BUDGET_STEADY); /* 750 is not below 750 */
    budget_take(&b, 0);
    budget_release(&b, 1);
    assert_int_equal(budget_update(&b), BUDGET_RESUME); /* 749 */
    assert_int_equal(b.paused, 0);
    assert_int_equal(budget_update(&b), BUDGET_STEADY);
}

static void test_hard_bound(void **state)
{
    budget_t b;
    budget_init(&b, 1000, 400);
    assert_int_equal(budget_take(&b, 900), 1);
    assert_int_equal(budget_take(&b, 300), 1); /* in transit: 1200 <= 1400 */
    assert_int_equal(budget_update(&b), BUDGET_PAUSE);
    assert_int_equal(budget_take(&b, 200), 1); /* exactly the hard bound */
    assert_int_equal(b.charge, 1400);
    assert_int_equal(budget_take(&b, 1), 0);   /* refused: nothing charged */
    assert_int_equal(b.charge, 1400);
    assert_int_equal(b.held, 3);
}

static void test_lone_large_message(void **state)
{
    budget_t b;
    budget_init(&b, 1000, 400);
    /* larger than the hard bound, but the worker holds nothing: taken */
    assert_int_equal(budget_take(&b, 5000), 1);
    assert_int_equal(budget_update(&b), BUDGET_PAUSE);
    assert_int_equal(budget_take(&b, 10), 0); /* now something is held */
    budget_release(&b, 5000);
    assert_int_equal(b.held, 0);
    assert_int_equal(b.charge, 0);
    assert_int_equal(budget_update(&b), BUDGET_RESUME);
    assert_int_equal(budget_take(&b, 10), 1);
}

static void test_size_syntax(void **state)
{
    uint64_t n = 1;
    assert_int_equal(config_parse_size("auto", &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(config_parse_size("65536", &n), 0);
    assert_int_equal(n, 65536);
    assert_int_equal(config_parse_size("512MiB", &n), 0);
    assert_int_equal(n, 512 * MiB);
    assert_int_equal(config_parse_size("2 G", &n), 0);
    assert_int_equal(n, 2048 * MiB);
    assert_int_equal(config_parse_size("64k", &n), 0);
    assert_int_equal(n, 65536);
    assert_int_equal(config_parse_size("12 parsecs", &n), -1);
    assert_int_equal(config_parse_size("-1", &n), -1);
    char s[32];
    config_format_size(26214400, s, sizeof(s));
    assert_string_equal(s, "25 MiB");
    config_format_size(1000, s, sizeof(s));
    assert_string_equal(s, "1000 bytes");
}

static void test_config_check(void **state)
{
    mp_config_t cfg;
    worker_env_t env;
    char err[512] = "";
    config_defaults(&cfg);
    cfg.worker_count = 2;
    cfg.message_max_size = 1 * MiB;
    /* below 2 x 1 MiB + 64 KiB: refused */
    cfg.message_inflight_memory = 2 * MiB;
    assert_int_equal(env_build(&cfg, &env, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "[message] inflight_memory"));
    env_free(&env);
    cfg.message_inflight_memory = 2 * MiB + 65536;
    assert_int_equal(env_build(&cfg, &env, err, sizeof(err)), 0);
    assert_int_equal(env.inflight_limit, 2 * MiB + 65536);
    assert_int_equal(env.max_body, 2 * MiB + 65536);
    assert_int_equal(env.nworkers, 2);
    env_free(&env);
    /* auto: from the machine, at least the largest body */
    cfg.message_inflight_memory = 0;
    assert_int_equal(env_build(&cfg, &env, err, sizeof(err)), 0);
    assert_true(env.inflight_memory > 0);
    assert_int_equal(env.inflight_limit, budget_auto(env.inflight_memory, 2, env.max_body));
    env_free(&env);
    config_free(&cfg);
}

/* The automatic session budget and prefetch: memory, descriptors, clamps. */
static void test_sessions_auto(void **state)
{
    (void)state;
    const uint64_t GiB = 1024ull * 1024 * 1024;
    /* 1 GiB pod, 2 workers: 1 GiB / 8 / 2 / 64 KiB */
    assert_int_equal(budget_sessions(GiB, 2, 1u << 20), 1024);
    /* 24 GiB: clamped at 10000 */
    assert_int_equal(budget_sessions(24 * GiB, 2, 1u << 20), 10000);
    /* descriptors bind first: (4096 - 256) / 2 */
    assert_int_equal(budget_sessions(24 * GiB, 2, 4096), 1920);
    /* never below 100, even with 1024 descriptors and 8 workers */
    assert_int_equal(budget_sessions(24 * GiB, 8, 1024), 100);
    assert_int_equal(budget_sessions(GiB, 0, 1u << 20), 2048); /* 0 workers counts as 1 */
    assert_int_equal(budget_prefetch(1024), 2048);
    assert_int_equal(budget_prefetch(10000), 20000);
    assert_int_equal(budget_prefetch(40000), 65535);
    assert_int_equal(budget_prefetch(10), 64);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_max_body_and_charge),
        cmocka_unit_test(test_parse_limit),
        cmocka_unit_test(test_memory_from),
        cmocka_unit_test(test_auto),
        cmocka_unit_test(test_pause_resume),
        cmocka_unit_test(test_resume_below_three_quarters),
        cmocka_unit_test(test_hard_bound),
        cmocka_unit_test(test_lone_large_message),
        cmocka_unit_test(test_size_syntax),
        cmocka_unit_test(test_config_check),
        cmocka_unit_test(test_sessions_auto),
    };
    return cmocka_run_group_tests_name("budget", tests, NULL, NULL);
}

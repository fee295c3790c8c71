/*
 * SUMMARY
 *  tests/integration/itest_warmup.c - deliverer/warmup against the stack's
 *  Redis.
 * DESCRIPTION
 *  Two tables on two loops with their own Redis clients (two processes of
 *  one worker each) share a source's day limit of 100 for a site:
 *   - one after the other: A counts 60 and flushes; B learns the 60 and
 *     is allowed exactly 40 of its 60; the key holds 100 with a TTL of
 *     about 2 days; A, which still knew 60, refuses once it re-read the
 *     key (a key with nothing to flush is read every few seconds);
 *   - at once: both count 60 within one flush period, before either knows
 *     the other's (the documented approximation: up to a second of
 *     sending per worker); the key holds 120 and both refuse after their
 *     flushes.
 *  The real WARMUP_REDIS_SCRIPT also answers 0 for a key nobody wrote
 *  (GET) without creating it. The source name is unique per run; the keys
 *  are deleted at the end.
 * DIAGNOSTICS
 *  A stack that is down fails every test naming `deploy/local/stack up`.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/policy.h"
#include "deliverer/warmup.h"
#include "tests/support/stackredis.h"

static char redis_host[64];
static unsigned redis_port;
static char source_name[48];

/* Both loops, for ms. */
static void run_both(loop_t *a, loop_t *b, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (util_mono_ms() < end) {
        loop_run_once(a, 5);
        if (b)
            loop_run_once(b, 5);
    }
}

/* How many of up to max tries are allowed (each allowed one counted). */
static unsigned take(warmup_t *w, const egress_source_t *s, const char *site, uint64_t now, unsigned max)
{
    unsigned n = 0;
    while (n < max && warmup_allows(w, s, site, now)) {
        warmup_count(w, s, site, now);
        n++;
    }
    return n;
}

/* Run the table's loop until it has sent `flushes` EVALs and is answered. */
static void run_flushes(loop_t *l, warmup_t *w, uint64_t flushes, unsigned ms)
{
    warmup_stats_t st;
    uint64_t end = util_mono_ms() + ms;
    do {
        loop_run_once(l, 10);
        warmup_get_stats(w, &st);
    } while ((st.flushes < flushes || st.fallback) && util_mono_ms() < end);
    for (int i = 0; i < 20; i++) /* the reply of the last one */
        loop_run_once(l, 5);
    warmup_get_stats(w, &st);
    assert_true(st.flushes >= flushes);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.redis_errors, 0);
}

static void key_of(char *out, size_t outlen, const char *site, uint64_t now)
{
    snprintf(out, outlen, "mp:wu:%s:%s:%08u", source_name, site, policy_day_yyyymmdd(policy_day_of(now)));
}

static void expect_key(loop_t *l, rclient_t *c, const char *key, const char *value)
{
    sr_rec_t r;
    const char *get[] = { "GET", key };
    sr_command(l, c, &r, 2, get, 3000);
    assert_int_equal(r.type, REDIS_REPLY_STRING);
    assert_string_equal(r.str, value);
    const char *ttl[] = { "TTL", key };
    sr_command(l, c, &r, 2, ttl, 3000);
    assert_int_equal(r.type, REDIS_REPLY_INTEGER);
    if (r.integer < 172800 - 60 || r.integer > 172800)
        fail_msg("TTL of %s is %lld, expected about 2 days (172800 s)", key, r.integer);
}

static void del_key(loop_t *l, rclient_t *c, const char *key)
{
    sr_rec_t r;
    const char *del[] = { "DEL", key };
    sr_command(l, c, &r, 2, del, 3000);
    const char *ex[] = { "EXISTS", key };
    sr_command(l, c, &r, 2, ex, 3000);
    assert_int_equal(r.integer, 0);
}

static void test_two_processes_share_the_day(void **state)
{
    (void)state;
    loop_t *la = loop_new(), *lb = loop_new();
    rclient_t *ca = sr_connect(la, redis_host, redis_port, 1000);
    rclient_t *cb = sr_connect(lb, redis_host, redis_port, 1000);
    uint32_t ramp[1] = { 100 };
    uint64_t now = util_wall_ms(); /* fixed: the test's day even across midnight */
    egress_source_t src = { .name = source_name, .warmup = ramp, .nwarmup = 1,
                            .warmup_start_day = policy_day_of(now) };
    assert_int_equal(policy_warmup_limit(&src, now), 100);
    warmup_t *a = warmup_new(la, ca, 1), *b = warmup_new(lb, cb, 1);
    char k1[160], k2[160];
    key_of(k1, sizeof(k1), "seq.example", now);
    key_of(k2, sizeof(k2), "both.example", now);

    /* one after the other */
    assert_int_equal(take(a, &src, "seq.example", now, 60), 60);
    run_flushes(la, a, 1, 3000);
    expect_key(la, ca, k1, "60");
    assert_int_equal(warmup_allows(b, &src, "seq.example", now), 1); /* new to B: read */
    run_flushes(lb, b, 1, 3000);
    assert_int_equal(take(b, &src, "seq.example", now, 60), 40);
    assert_int_equal(warmup_allows(b, &src, "seq.example", now), 0);
    warmup_stats_t st;
    warmup_get_stats(b, &st);
    run_flushes(lb, b, st.flushes + 1, 3000);
    expect_key(lb, cb, k1, "100");
    assert_int_equal(warmup_allows(b, &src, "seq.example", now), 0);
    /* A still knows 60 until it re-reads the key */
    assert_int_equal(warmup_allows(a, &src, "seq.example", now), 1);
    run_both(la, lb, 4200);
    assert_int_equal(warmup_allows(a, &src, "seq.example", now), 0);
    assert_int_equal(take(a, &src, "seq.example", now, 60), 0);

    /* at once, within one flush period: each sees only its own count */
    assert_int_equal(take(a, &src, "both.example", now, 60), 60);
    assert_int_equal(take(b, &src, "both.example", now, 60), 60);
    run_both(la, lb, 4200); /* both flush, then re-read what the other added */
    expect_key(la, ca, k2, "120");
    assert_int_equal(warmup_allows(a, &src, "both.example", now), 0);
    assert_int_equal(warmup_allows(b, &src, "both.example", now), 0);
    warmup_get_stats(a, &st);
    assert_int_equal(st.keys, 2);
    assert_int_equal(st.redis_errors, 0);
    assert_int_equal(st.fallback, 0);
    warmup_get_stats(b, &st);
    assert_int_equal(st.keys, 2);
    assert_int_equal(st.redis_errors, 0);

    warmup_free(a);
    warmup_free(b);
    del_key(la, ca, k1);
    del_key(la, ca, k2);
    rclient_free(ca);
    rclient_free(cb);
    loop_free(la);
    loop_free(lb);
}

/* The script itself: INCRBY + EXPIRE for a count, GET (0 when absent,
 * nothing created) for none, totals in KEYS order. */
static void test_script(void **state)
{
    (void)state;
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 1000);
    char k1[160], k2[160];
    uint64_t now = util_wall_ms();
    key_of(k1, sizeof(k1), "s1.example", now);
    key_of(k2, sizeof(k2), "s2.example", now);
    sr_rec_t r;
    const char *e1[] = { "EVAL", WARMUP_REDIS_SCRIPT, "2", k1, k2, "172800", "7", "0" };
    sr_command(l, c, &r, 8, e1, 3000);
    assert_int_equal(r.type, REDIS_REPLY_ARRAY);
    assert_int_equal(r.n, 2);
    assert_int_equal(r.v[0], 7);
    assert_int_equal(r.v[1], 0);
    const char *ex[] = { "EXISTS", k2 };
    sr_command(l, c, &r, 2, ex, 3000);
    assert_int_equal(r.integer, 0);
    const char *e2[] = { "EVAL", WARMUP_REDIS_SCRIPT, "2", k1, k2, "172800", "0", "5" };
    sr_command(l, c, &r, 8, e2, 3000);
    assert_int_equal(r.v[0], 7);
    assert_int_equal(r.v[1], 5);
    expect_key(l, c, k1, "7");
    expect_key(l, c, k2, "5");
    del_key(l, c, k1);
    del_key(l, c, k2);
    rclient_free(c);
    loop_free(l);
}

static int setup(void **state)
{
    (void)state;
    if (sr_stack_redis(redis_host, sizeof(redis_host), &redis_port) < 0)
        return -1;
    snprintf(source_name, sizeof(source_name), "itest-wu-%016llx", (unsigned long long)util_rand64());
    return 0;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_script),
        cmocka_unit_test(test_two_processes_share_the_day),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}

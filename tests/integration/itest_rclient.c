/*
 * SUMMARY
 *  tests/integration/itest_rclient.c - core/rclient against the stack's Redis.
 * DESCRIPTION
 *  Reads MP_REDIS_HOST/MP_REDIS_PORT from the stack's env file. Binary-safe
 *  SET/GET with a TTL, an error reply, a thousand pipelined commands, a
 *  command timeout that only blocks our own connection (BLPOP on a key
 *  nobody pushes to; never DEBUG SLEEP or CLIENT PAUSE, which would stall
 *  the shared Redis), a port nobody listens on, and teardown with commands
 *  outstanding. Keys are prefixed with a random test id and expire.
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
#include "tests/support/stackredis.h"

static char redis_host[64];
static unsigned redis_port;
static char prefix[40];

static int setup(void **state)
{
    if (sr_stack_redis(redis_host, sizeof(redis_host), &redis_port) < 0)
        return -1;
    snprintf(prefix, sizeof(prefix), "mp:itest:rclient:%016llx", (unsigned long long)util_rand64());
    return 0;
}

static void test_set_get_binary(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 1000);
    char key[80];
    snprintf(key, sizeof(key), "%s:bin", prefix);
    const char val[] = { 'x', 0, '\r', '\n', (char)0xff, 'y' };
    const char *argv[5] = { "SET", key, val, "PX", "60000" };
    const size_t lens[5] = { 3, strlen(key), sizeof(val), 2, 5 };
    sr_rec_t set = { 0 }, get = { 0 }, pttl = { 0 };
    rclient_commandargv(c, sr_rec_cb, &set, 5, argv, lens);
    rclient_command(c, sr_rec_cb, &get, "GET %s", key);
    rclient_command(c, sr_rec_cb, &pttl, "PTTL %s", key);
    sr_run_until(l, &pttl.calls, 2000);
    assert_int_equal(set.type, REDIS_REPLY_STATUS);
    assert_int_equal(get.type, REDIS_REPLY_STRING);
    assert_int_equal(get.len, sizeof(val));
    assert_memory_equal(get.str, val, sizeof(val));
    assert_int_equal(pttl.type, REDIS_REPLY_INTEGER);
    assert_true(pttl.integer > 50000 && pttl.integer <= 60000);

    sr_rec_t del = { 0 }, nil = { 0 };
    rclient_command(c, sr_rec_cb, &del, "DEL %s", key);
    rclient_command(c, sr_rec_cb, &nil, "GET %s", key);
    sr_run_until(l, &nil.calls, 2000);
    assert_int_equal(del.integer, 1);
    assert_int_equal(nil.type, REDIS_REPLY_NIL);
    assert_int_equal(rclient_errors(c), 0);
    rclient_free(c);
    assert_int_equal(loop_fd_count(l), 0);
    assert_int_equal(loop_timer_count(l), 0);
    loop_free(l);
}

static void test_error_reply(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 1000);
    char key[80];
    snprintf(key, sizeof(key), "%s:notint", prefix);
    sr_rec_t set = { 0 }, incr = { 0 }, unknown = { 0 };
    rclient_command(c, sr_rec_cb, &set, "SET %s abc PX 60000", key);
    rclient_command(c, sr_rec_cb, &incr, "INCR %s", key);
    rclient_command(c, sr_rec_cb, &unknown, "NOSUCHCOMMAND");
    sr_run_until(l, &unknown.calls, 2000);
    assert_int_equal(incr.type, -1);
    assert_non_null(strstr(incr.err, "ERR"));
    assert_int_equal(unknown.type, -1);
    assert_non_null(strstr(unknown.err, "unknown command"));
    assert_true(rclient_connected(c)); /* an error reply is not a failure */
    rclient_free(c);
    loop_free(l);
}

static void test_pipelined_thousand(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 2000);
    char key[80];
    snprintf(key, sizeof(key), "%s:counter", prefix);
    enum { N = 1000 };
    static sr_rec_t r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++)
        rclient_command(c, sr_rec_cb, &r[i], "INCR %s", key);
    sr_rec_t ex = { 0 };
    rclient_command(c, sr_rec_cb, &ex, "PEXPIRE %s 60000", key);
    sr_run_until(l, &ex.calls, 5000);
    for (int i = 0; i < N; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_int_equal(r[i].integer, i + 1); /* in order */
    }
    rclient_free(c);
    loop_free(l);
}

static void test_timeout_blocks_only_us(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 100);
    char key[80];
    snprintf(key, sizeof(key), "%s:never", prefix);
    sr_rec_t blp = { 0 }, after = { 0 };
    uint64_t t0 = util_mono_ms();
    rclient_command(c, sr_rec_cb, &blp, "BLPOP %s 1", key); /* Redis answers nil after 1 s */
    sr_run_until(l, &blp.calls, 2000);
    uint64_t took = util_mono_ms() - t0;
    assert_string_equal(blp.err, "timeout");
    assert_true(took >= 95 && took < 500);
    /* the late nil is dropped; PING afterwards gets its own PONG */
    rclient_command(c, sr_rec_cb, &after, "PING");
    sr_run_until(l, &after.calls, 3000);
    /* PING waits behind BLPOP on this connection: it may time out too */
    assert_int_equal(after.calls, 1);
    sr_rec_t ping = { 0 };
    sr_run_for(l, 1500); /* let the BLPOP finish */
    rclient_command(c, sr_rec_cb, &ping, "PING");
    sr_run_until(l, &ping.calls, 1000);
    assert_int_equal(ping.type, REDIS_REPLY_STATUS);
    assert_string_equal(ping.str, "PONG");
    assert_true(rclient_errors(c) >= 1);
    rclient_free(c);
    loop_free(l);
}

static void test_nobody_listening(void **state)
{
    loop_t *l = loop_new();
    rclient_config_t cfg = { .host = "127.0.0.1", .port = 1, .timeout_ms = 100 };
    rclient_t *c = rclient_new(l, &cfg);
    sr_rec_t r = { 0 };
    uint64_t t0 = util_mono_ms();
    rclient_command(c, sr_rec_cb, &r, "PING");
    sr_run_until(l, &r.calls, 1000);
    assert_int_equal(r.type, -1);
    assert_true(util_mono_ms() - t0 < 100);
    assert_false(rclient_connected(c));
    rclient_free(c);
    assert_int_equal(loop_fd_count(l), 0);
    assert_int_equal(loop_timer_count(l), 0);
    loop_free(l);
}

static void test_free_outstanding(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 1000);
    sr_rec_t r[3];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < 3; i++)
        rclient_command(c, sr_rec_cb, &r[i], "PING");
    rclient_free(c);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_string_equal(r[i].err, "shutting down");
    }
    assert_int_equal(loop_fd_count(l), 0);
    assert_int_equal(loop_timer_count(l), 0);
    loop_free(l);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_set_get_binary),
        cmocka_unit_test(test_error_reply),
        cmocka_unit_test(test_pipelined_thousand),
        cmocka_unit_test(test_timeout_blocks_only_us),
        cmocka_unit_test(test_nobody_listening),
        cmocka_unit_test(test_free_outstanding),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}

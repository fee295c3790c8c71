/*
 * Unit tests for deliverer/pool: who gets a slot, and in which order,
 * when destinations and the worker are at their limits. Only slots are
 * exercised (SMTP_POOL_CONNECT grants released without a session), so
 * the order of the callbacks is exact. The site tag tests park real IDLE
 * sessions to fake SMTP servers (tests/support/fakesmtp.h), one server
 * per destination, so each server's transcript says whether the pool
 * said QUIT to that session.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "core/loop.h"
#include "deliverer/pool.h"
#include "deliverer/session.h"
#include "tests/support/fakesmtp.h"

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

/* ---- site tags ---- */

#define PAYLOAD "Subject: t\r\n\r\nhi\r\n.\r\n"

static void on_txn(void *arg, smtp_session_t *s, const smtp_session_result_t *res)
{
    int *reusable = arg;
    (void)s;
    *reusable = res->reusable ? 1 : -1;
}

/* A session to fs that has carried one message and is IDLE (kept open). */
static smtp_session_t *idle_session(loop_t *loop, const fake_server_t *fs)
{
    static const char *const rcpts[] = { "b@y" };
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons(fs->port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    smtp_session_params_t prm = {
        .helo_name = "pool.test",
        .tls = SMTP_TLS_NONE,
        .mx_host = "mx.fake.test",
        .addr = (const struct sockaddr *)&sin,
        .addrlen = sizeof(sin),
        .mail_from = "a@x",
        .rcpts = rcpts,
        .nrcpts = 1,
        .data = PAYLOAD,
        .len = strlen(PAYLOAD),
        .keep_open = 1,
    };
    smtp_timeouts_default(&prm.timeouts, 100);
    int reusable = 0;
    smtp_session_t *s = smtp_session_start(loop, &prm, on_txn, &reusable);
    for (int i = 0; i < 1000 && reusable == 0; i++)
        loop_run_once(loop, 10);
    assert_int_equal(reusable, 1);
    assert_int_equal(smtp_session_state(s), SMTP_STATE_IDLE);
    return s;
}

/* Open a session to fs under key and park it with tag. */
static smtp_session_t *park(loop_t *loop, smtp_pool_t *p, const char *key, fake_server_t *fs, const char *tag)
{
    char log[16] = "";
    waiter_t w;
    assert_int_equal(acquire(p, key, &w, "x", log), SMTP_POOL_CONNECT);
    smtp_session_t *s = idle_session(loop, fs);
    assert_int_equal(smtp_pool_release_tagged(p, key, s, 0, tag), 1);
    return s;
}

static int said_quit(fake_server_t *fs)
{
    return strstr(fake_server_transcript(fs), "QUIT\r\n") != NULL;
}

/* Tags count idle sessions, a reused session leaves its tag and takes
 * the one it is released with, and a trim QUITs a tag's oldest idle
 * sessions beyond keep: never a busy one, another tag's or an untagged
 * one. */
static void test_site_tags_count_and_trim(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    smtp_pool_limits_t lim = { .max_idle_ms = 60000 };
    smtp_pool_t *p = smtp_pool_new(loop, &lim);
    enum { A, B, C, D, E, F, N };
    static const char *const keys[N] = { "A", "B", "C", "D", "E", "F" };
    fake_server_t *fs[N];
    smtp_session_t *s[N];
    for (int i = 0; i < N; i++)
        fs[i] = fake_server_new(loop, &fakesmtp_script_ok);
    smtp_pool_stats_t st;

    s[A] = park(loop, p, keys[A], fs[A], "s@a");
    s[B] = park(loop, p, keys[B], fs[B], "s@a");
    s[C] = park(loop, p, keys[C], fs[C], "s@a");
    s[F] = park(loop, p, keys[F], fs[F], "t@b");
    s[D] = park(loop, p, keys[D], fs[D], "t@b");
    s[E] = park(loop, p, keys[E], fs[E], NULL); /* untagged */
    assert_int_equal(smtp_pool_idle_tagged(p, "s@a"), 3);
    assert_int_equal(smtp_pool_idle_tagged(p, "t@b"), 2);
    assert_int_equal(smtp_pool_idle_tagged(p, NULL), 0);
    assert_int_equal(smtp_pool_idle_tagged(p, "nope"), 0);
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.idle, 6);

    /* reuse takes D off "t@b"; released with "s@a" it counts there */
    char log[16] = "";
    waiter_t w;
    smtp_session_t *got = NULL;
    memset(&w, 0, sizeof(w));
    w.name = "w";
    w.log = log;
    assert_int_equal(smtp_pool_acquire(p, keys[D], &got, &w.w, on_grant, &w), SMTP_POOL_REUSE);
    assert_ptr_equal(got, s[D]);
    assert_int_equal(smtp_pool_idle_tagged(p, "t@b"), 1);
    assert_int_equal(smtp_pool_idle_tagged(p, "s@a"), 3);
    assert_int_equal(smtp_pool_release_tagged(p, keys[D], got, 0, "s@a"), 1);
    assert_int_equal(smtp_pool_idle_tagged(p, "s@a"), 4);
    assert_int_equal(smtp_pool_idle_tagged(p, "t@b"), 1);
    /* D busy again: its tag is gone with it */
    assert_int_equal(smtp_pool_acquire(p, keys[D], &got, &w.w, on_grant, &w), SMTP_POOL_REUSE);
    assert_ptr_equal(got, s[D]);
    assert_int_equal(smtp_pool_idle_tagged(p, "s@a"), 3);

    /* keep 1 of A, B, C: the two parked first go */
    assert_int_equal(smtp_pool_trim_tag(p, "s@a", 1), 2);
    assert_int_equal(smtp_pool_idle_tagged(p, "s@a"), 1);
    assert_int_equal(smtp_pool_idle_tagged(p, "t@b"), 1);
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.idle, 3); /* C, E, F */
    assert_int_equal(st.busy, 1); /* D */
    assert_int_equal(st.evicted, 2);
    assert_int_equal(st.dests, 4); /* A and B forgotten */
    for (int i = 0; i < 200 && (fake_server_busy(fs[A]) || fake_server_busy(fs[B])); i++)
        loop_run_once(loop, 10);
    assert_false(fake_server_busy(fs[A])); /* QUIT answered, closed */
    assert_false(fake_server_busy(fs[B]));
    assert_string_equal(fake_server_transcript(fs[A]),
                        "EHLO pool.test\r\nMAIL FROM:<a@x> SIZE=21\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD
                        "QUIT\r\n");
    assert_true(said_quit(fs[B]));
    for (int i = C; i < N; i++) {
        assert_false(said_quit(fs[i]));
        assert_true(fake_server_busy(fs[i]));
    }
    /* nothing more to trim there, nothing at all elsewhere */
    assert_int_equal(smtp_pool_trim_tag(p, "s@a", 1), 0);
    assert_int_equal(smtp_pool_trim_tag(p, "nope", 0), 0);
    assert_int_equal(smtp_pool_trim_tag(p, NULL, 0), 0);

    /* C was the one kept */
    assert_int_equal(smtp_pool_acquire(p, keys[C], &got, &w.w, on_grant, &w), SMTP_POOL_REUSE);
    assert_ptr_equal(got, s[C]);
    assert_int_equal(smtp_pool_idle_tagged(p, "s@a"), 0);
    assert_int_equal(smtp_pool_release(p, keys[C], got), 1); /* untagged now */
    assert_int_equal(smtp_pool_trim_tag(p, "s@a", 0), 0);

    /* the other tag's last one; the busy D and the untagged stay */
    assert_int_equal(smtp_pool_trim_tag(p, "t@b", 0), 1);
    assert_int_equal(smtp_pool_idle_tagged(p, "t@b"), 0);
    for (int i = 0; i < 200 && fake_server_busy(fs[F]); i++)
        loop_run_once(loop, 10);
    assert_true(said_quit(fs[F]));
    assert_false(said_quit(fs[C]));
    assert_false(said_quit(fs[D]));
    assert_false(said_quit(fs[E]));
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.idle, 2); /* C, E */
    assert_int_equal(st.evicted, 3);
    assert_int_equal(smtp_pool_release(p, keys[D], s[D]), 1);
    assert_string_equal(log, ""); /* nobody waited */

    smtp_pool_free(p); /* QUITs C, D, E */
    for (int i = 0; i < N; i++)
        fake_server_free(fs[i]);
    for (int i = 0; i < 100 && (loop_fd_count(loop) || loop_timer_count(loop)); i++)
        loop_run_once(loop, 10);
    assert_int_equal(loop_fd_count(loop), 0);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_per_dest_and_worker_order),
        cmocka_unit_test(test_waiters_elsewhere_untouched),
        cmocka_unit_test(test_free_fails_waiters),
        cmocka_unit_test(test_site_tags_count_and_trim),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

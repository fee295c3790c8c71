/*
 * SUMMARY
 *  tests/integration/itest_actions.c - deliverer/actions against the
 *  stack's Redis.
 * DESCRIPTION
 *  The write script driven directly (a merge keeps the later expiry and
 *  the earlier creation and takes the newer reason; a write that changes
 *  nothing leaves the version; expired fields dropped; the key's PTTL is
 *  the latest expiry; a remove bumps the version); two tables on two loops
 *  with two clients, as two processes would be: an add on A is found by B
 *  within 1.5 s, a repeated add extends the one field (HLEN stays 1), an
 *  action of 1.5 s lapses on both within a second of its expiry, a remove
 *  propagates, a corrupt field is skipped and counted; and a port nobody
 *  listens on (fallback, local adds still in force). The keys are fixed
 *  (mp:act, mp:act@v): deleted at the start and at the end.
 * DIAGNOSTICS
 *  A stack that is down fails every test naming `deploy/local/stack up`.
 *  Timings are printed ("actions: ...").
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/actions.h"
#include "tests/support/stackredis.h"

static char redis_host[64];
static unsigned redis_port;

/* ------------------------------------------------------------ helpers */

static void del_keys(loop_t *l, rclient_t *c)
{
    sr_rec_t r;
    const char *argv[] = { "DEL", ACTIONS_KEY, ACTIONS_VERSION_KEY };
    sr_command(l, c, &r, 3, argv, 2000);
}

static long long hlen(loop_t *l, rclient_t *c)
{
    sr_rec_t r;
    const char *argv[] = { "HLEN", ACTIONS_KEY };
    sr_command(l, c, &r, 2, argv, 2000);
    return r.v[0];
}

static long long version(loop_t *l, rclient_t *c)
{
    sr_rec_t r;
    const char *argv[] = { "GET", ACTIONS_VERSION_KEY };
    sr_command(l, c, &r, 2, argv, 2000);
    return r.type == REDIS_REPLY_STRING ? atoll(r.str) : 0;
}

/* The stored field, parsed; NULL when there is none. */
static json_t *field(loop_t *l, rclient_t *c, const char *id)
{
    sr_rec_t r;
    const char *argv[] = { "HGET", ACTIONS_KEY, id };
    sr_command(l, c, &r, 3, argv, 2000);
    if (r.type != REDIS_REPLY_STRING)
        return NULL;
    json_error_t e;
    json_t *o = json_loads(r.str, 0, &e);
    assert_non_null(o);
    return o;
}

static long long jint(const json_t *o, const char *k)
{
    const json_t *v = json_object_get(o, k);
    if (json_is_integer(v))
        return (long long)json_integer_value(v);
    assert_true(json_is_real(v));
    return (long long)json_real_value(v);
}

static char *json_of(const char *id, const char *reason, unsigned long long created, unsigned long long expires)
{
    char *s = xmalloc(1024);
    snprintf(s, 1024,
             "{\"id\":\"%s\",\"kind\":\"suspend\",\"sel\":\"site\",\"value\":\"yahoo.com\",\"source\":\"\","
             "\"rate\":0.0,\"rate_text\":\"\",\"conn\":0,\"created\":%llu,\"expires\":%llu,\"reason\":\"%s\","
             "\"origin\":\"automation:t\"}",
             id, created, expires, reason);
    return s;
}

/* The write script with ops ("+", json | "-", id); returns { version, changed } in r. */
static void write_ops(loop_t *l, rclient_t *c, sr_rec_t *r, int nops, const char **ops)
{
    const char *argv[16] = { "EVAL", ACTIONS_WRITE_SCRIPT, "2", ACTIONS_KEY, ACTIONS_VERSION_KEY };
    int a = 5;
    for (int i = 0; i < 2 * nops; i++)
        argv[a++] = ops[i];
    sr_command(l, c, r, a, argv, 2000);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->n, 2);
}

typedef struct rep {
    int calls;
} rep_t;

static void on_changed(void *arg)
{
    ((rep_t *)arg)->calls++;
}

/* ------------------------------------------------------------ tests */

static void test_script_direct(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 500);
    del_keys(l, c);
    uint64_t now = util_wall_ms();
    sr_rec_t r;

    char *j1 = json_of("s1", "first", now, now + 60000);
    const char *ops1[] = { "+", j1 };
    write_ops(l, c, &r, 1, ops1);
    assert_int_equal(r.v[0], 1);
    assert_int_equal(r.v[1], 1);
    assert_int_equal(hlen(l, c), 1);

    /* the same again: nothing changes, the version stays */
    write_ops(l, c, &r, 1, ops1);
    assert_int_equal(r.v[0], 1);
    assert_int_equal(r.v[1], 0);

    /* newer trigger, earlier expiry: the expiry and the creation kept, the reason taken */
    char *j2 = json_of("s1", "second", now + 1000, now + 30000);
    const char *ops2[] = { "+", j2 };
    write_ops(l, c, &r, 1, ops2);
    assert_int_equal(r.v[0], 2);
    json_t *o = field(l, c, "s1");
    assert_int_equal(jint(o, "expires"), (long long)(now + 60000));
    assert_int_equal(jint(o, "created"), (long long)now);
    assert_string_equal(json_string_value(json_object_get(o, "reason")), "second");
    json_decref(o);

    /* a later expiry extends; the hash's PTTL follows the latest expiry */
    char *j3 = json_of("s1", "third", now + 2000, now + 90000);
    char *j4 = json_of("s2", "other", now, now + 5000);
    const char *ops3[] = { "+", j3, "+", j4 };
    write_ops(l, c, &r, 2, ops3);
    assert_int_equal(r.v[0], 3);
    assert_int_equal(r.v[1], 2);
    o = field(l, c, "s1");
    assert_int_equal(jint(o, "expires"), (long long)(now + 90000));
    assert_int_equal(jint(o, "created"), (long long)now);
    json_decref(o);
    assert_int_equal(hlen(l, c), 2);
    const char *pttl[] = { "PTTL", ACTIONS_KEY };
    sr_command(l, c, &r, 2, pttl, 2000);
    long long left = (long long)(now + 90000) - (long long)util_wall_ms();
    assert_true(r.v[0] > left - 2000 && r.v[0] <= left + 50);

    /* an expired field goes with the next write; an expired add is not stored */
    char *j5 = json_of("old", "x", now - 10000, now - 1);
    const char *hset[] = { "HSET", ACTIONS_KEY, "old", j5 };
    sr_command(l, c, &r, 4, hset, 2000);
    assert_int_equal(hlen(l, c), 3);
    char *j6 = json_of("late", "x", now - 10000, now - 5);
    const char *ops4[] = { "+", j6, "-", "s2" };
    write_ops(l, c, &r, 2, ops4);
    assert_int_equal(r.v[0], 4); /* the remove changed something */
    assert_int_equal(r.v[1], 1);
    assert_int_equal(hlen(l, c), 1);
    assert_null(field(l, c, "old"));
    assert_null(field(l, c, "late"));
    assert_null(field(l, c, "s2"));
    /* removing what is not there: no change */
    const char *ops5[] = { "-", "s2" };
    write_ops(l, c, &r, 1, ops5);
    assert_int_equal(r.v[0], 4);
    assert_int_equal(r.v[1], 0);

    /* a corrupt field is left alone (and does not break the script) */
    const char *junk[] = { "HSET", ACTIONS_KEY, "junk", "{not json" };
    sr_command(l, c, &r, 4, junk, 2000);
    write_ops(l, c, &r, 1, ops1);
    assert_int_equal(hlen(l, c), 2);

    /* the poll: the version alone when it matches, the hash otherwise */
    char v[32];
    snprintf(v, sizeof(v), "%lld", version(l, c));
    const char *poll[] = { "EVAL", ACTIONS_POLL_SCRIPT, "2", ACTIONS_KEY, ACTIONS_VERSION_KEY, v };
    sr_command(l, c, &r, 6, poll, 2000);
    assert_int_equal(r.n, 1);
    poll[5] = "";
    sr_command(l, c, &r, 6, poll, 2000);
    assert_int_equal(r.n, 2);

    del_keys(l, c);
    free(j1);
    free(j2);
    free(j3);
    free(j4);
    free(j5);
    free(j6);
    rclient_free(c);
    loop_free(l);
}

/* Two "processes": a loop, a client and a table each, run in turn. */
typedef struct proc {
    loop_t    *l;
    rclient_t *c;
    actions_t *t;
    rep_t      r;
} proc_t;

static void proc_init(proc_t *p, unsigned port)
{
    memset(p, 0, sizeof(*p));
    p->l = loop_new();
    p->c = sr_connect(p->l, redis_host, port, 500);
    p->t = actions_new(p->l, p->c, NULL, on_changed, &p->r);
}

static void proc_fini(proc_t *p)
{
    actions_free(p->t);
    rclient_free(p->c);
    loop_free(p->l);
}

static void run_both(proc_t *a, proc_t *b, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    do {
        loop_run_once(a->l, 2);
        loop_run_once(b->l, 2);
    } while (util_mono_ms() < end);
}

/* Run both until find on p answers non-NULL (want 1) or NULL (want 0); the ms it took, or -1. */
static long long until_found(proc_t *a, proc_t *b, proc_t *p, action_kind_t k, const action_query_t *q, int want,
                             unsigned ms)
{
    uint64_t start = util_mono_ms(), end = start + ms;
    while (util_mono_ms() < end) {
        if ((actions_find(p->t, k, q) != NULL) == want)
            return (long long)(util_mono_ms() - start);
        loop_run_once(a->l, 2);
        loop_run_once(b->l, 2);
    }
    return -1;
}

static action_t mk(action_kind_t kind, const char *site, uint64_t expires, const char *reason)
{
    action_t a;
    memset(&a, 0, sizeof(a));
    a.kind = kind;
    a.sel = SEL_SITE;
    snprintf(a.value, sizeof(a.value), "%s", site);
    a.expires_ms = expires;
    snprintf(a.reason, sizeof(a.reason), "%s", reason);
    snprintf(a.origin, sizeof(a.origin), "automation:itest");
    if (kind == ACTION_RATE) {
        a.rate_per_s = 0.5;
        snprintf(a.rate_text, sizeof(a.rate_text), "30/m");
    }
    return a;
}

static void test_two_processes(void **state)
{
    proc_t A, B;
    proc_init(&A, redis_port);
    del_keys(A.l, A.c);
    proc_init(&B, redis_port);
    run_both(&A, &B, 300); /* both have read the (empty) set */
    actions_stats_t st;
    actions_get_stats(B.t, &st);
    assert_int_equal(st.fallback, 0);

    /* an add on A: B finds it within 1.5 s */
    uint64_t now = util_wall_ms();
    action_t a = mk(ACTION_RATE, "yahoo.com", now + 30000, "421 4.7.0 [TS01] first");
    assert_int_equal(actions_add(A.t, &a), 0);
    action_query_t q = { .site = "yahoo.com", .domain = "yahoo.co.uk" };
    long long ms = until_found(&A, &B, &B, ACTION_RATE, &q, 1, 1500);
    printf("actions: an add on A found by B after %lld ms\n", ms);
    assert_true(ms >= 0);
    const action_t *f = actions_find(B.t, ACTION_RATE, &q);
    assert_string_equal(f->id, "rate:site:yahoo.com");
    assert_true(f->rate_per_s == 0.5);
    assert_string_equal(f->rate_text, "30/m");
    assert_int_equal(f->expires_ms, now + 30000);
    assert_string_equal(f->origin, "automation:itest");
    actions_get_stats(B.t, &st);
    assert_int_equal(st.from_redis, 1);
    assert_int_equal(hlen(A.l, A.c), 1);

    /* repeated on B, later: one field, expiry extended, seen by A */
    a = mk(ACTION_RATE, "yahoo.com", now + 40000, "421 4.7.0 [TS01] again");
    assert_int_equal(actions_add(B.t, &a), 0);
    uint64_t start = util_mono_ms(), end = start + 1500;
    while (util_mono_ms() < end && actions_find(A.t, ACTION_RATE, &q)->expires_ms != now + 40000)
        run_both(&A, &B, 5);
    f = actions_find(A.t, ACTION_RATE, &q);
    assert_int_equal(f->expires_ms, now + 40000);
    assert_string_equal(f->reason, "421 4.7.0 [TS01] again");
    printf("actions: an extension on B seen by A after %llu ms\n", (unsigned long long)(util_mono_ms() - start));
    assert_int_equal(hlen(A.l, A.c), 1);
    assert_int_equal(actions_count(A.t), 1);
    assert_int_equal(actions_count(B.t), 1);
    json_t *o = field(A.l, A.c, "rate:site:yahoo.com");
    assert_int_equal(jint(o, "expires"), (long long)(now + 40000));
    json_decref(o);

    /* an action of 1.5 s: in force on both, then gone from both within a second of its expiry */
    now = util_wall_ms();
    action_t s = mk(ACTION_SUSPEND, "yahoo.com", now + 1500, "short");
    assert_int_equal(actions_add(A.t, &s), 0);
    assert_true(until_found(&A, &B, &B, ACTION_SUSPEND, &q, 1, 1500) >= 0);
    run_both(&A, &B, 50); /* the callbacks of the add and of its learning */
    int ca = A.r.calls, cb = B.r.calls;
    while (util_wall_ms() < now + 1500)
        run_both(&A, &B, 5);
    assert_null(actions_find(A.t, ACTION_SUSPEND, &q)); /* find compares with the clock */
    assert_null(actions_find(B.t, ACTION_SUSPEND, &q));
    end = util_mono_ms() + 1000;
    while ((actions_count(A.t) != 1 || actions_count(B.t) != 1) && util_mono_ms() < end)
        run_both(&A, &B, 5);
    printf("actions: expired on both %llu ms after its expiry\n",
           (unsigned long long)(util_wall_ms() - (now + 1500)));
    assert_int_equal(actions_count(A.t), 1);
    assert_int_equal(actions_count(B.t), 1);
    assert_int_equal(A.r.calls, ca + 1);
    assert_int_equal(B.r.calls, cb + 1);

    /* remove on B: gone from A */
    assert_int_equal(actions_remove(B.t, "rate:site:yahoo.com"), 0);
    ms = until_found(&A, &B, &A, ACTION_RATE, &q, 0, 1500);
    printf("actions: a remove on B seen by A after %lld ms\n", ms);
    assert_true(ms >= 0);
    assert_int_equal(actions_count(A.t), 0);
    run_both(&A, &B, 50);
    assert_int_equal(hlen(A.l, A.c), 0);

    /* a corrupt field (and one under the wrong name): skipped and counted, the rest read */
    now = util_wall_ms();
    a = mk(ACTION_BOUNCE, "aol.com", now + 30000, "bounce");
    assert_int_equal(actions_add(A.t, &a), 0);
    q.site = "aol.com";
    assert_true(until_found(&A, &B, &B, ACTION_BOUNCE, &q, 1, 1500) >= 0);
    sr_rec_t r;
    const char *hset[] = { "HSET", ACTIONS_KEY, "junk", "{\"id\":\"junk\",\"kind\":\"explode\"}" };
    sr_command(A.l, A.c, &r, 4, hset, 2000);
    const char *incr[] = { "INCR", ACTIONS_VERSION_KEY };
    sr_command(A.l, A.c, &r, 2, incr, 2000);
    actions_stats_t sa, sb;
    end = util_mono_ms() + 1500;
    do {
        run_both(&A, &B, 10);
        actions_get_stats(A.t, &sa);
        actions_get_stats(B.t, &sb);
    } while ((sa.corrupt == 0 || sb.corrupt == 0) && util_mono_ms() < end);
    assert_int_equal(sa.corrupt, 1);
    assert_int_equal(sb.corrupt, 1);
    assert_int_equal(sa.active, 1);
    assert_int_equal(sb.active, 1);
    assert_non_null(actions_find(B.t, ACTION_BOUNCE, &q));
    assert_int_equal(sa.fallback, 0);
    assert_int_equal(sb.fallback, 0);

    del_keys(A.l, A.c);
    proc_fini(&A);
    proc_fini(&B);
}

static void test_nobody_listening(void **state)
{
    loop_t *l = loop_new();
    rclient_config_t cfg = { .host = "127.0.0.1", .port = 1, .timeout_ms = 100, .connect_timeout_ms = 100 };
    rclient_t *c = rclient_new(l, &cfg);
    rep_t rep = { 0 };
    actions_config_t acfg = { .poll_ms = 100 };
    actions_t *t = actions_new(l, c, &acfg, on_changed, &rep);
    sr_run_for(l, 400);
    actions_stats_t st;
    actions_get_stats(t, &st);
    assert_int_equal(st.fallback, 1);
    assert_true(st.redis_errors >= 2);
    action_t a = mk(ACTION_SUSPEND, "yahoo.com", util_wall_ms() + 10000, "local");
    assert_int_equal(actions_add(t, &a), 0);
    action_query_t q = { .site = "yahoo.com" };
    assert_non_null(actions_find(t, ACTION_SUSPEND, &q));
    sr_run_for(l, 300);
    assert_non_null(actions_find(t, ACTION_SUSPEND, &q)); /* kept while unwritten */
    assert_int_equal(rep.calls, 1);
    actions_free(t);
    rclient_free(c);
    assert_int_equal(loop_timer_count(l), 0);
    loop_free(l);
}

static int setup(void **state)
{
    return sr_stack_redis(redis_host, sizeof(redis_host), &redis_port);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_script_direct),
        cmocka_unit_test(test_two_processes),
        cmocka_unit_test(test_nobody_listening),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}

/*
 * Unit tests for deliverer/lease: the fallback share, exactly; a table
 * without Redis (the local share, no timer, entries that go at once);
 * against tests/support/fakeredis.h with a model of the script: the
 * renewal (one EVAL with every site, its words), the allowance before and
 * after the first answer, a new site's early claim, reports only from the
 * reply and only on a change, the fallback on a failed or malformed reply
 * (one warn, one info), release of a site nobody wants, lease_free's HDEL
 * and ZREM, and a callback that frees its table.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/lease.h"
#include "tests/support/fakeredis.h"
#include "tests/support/logcapture.h"

static void test_fallback_share(void **state)
{
    static const struct {
        unsigned limit, holders, share;
    } cases[] = {
        { 10, 1, 10 }, { 10, 2, 5 }, { 10, 3, 4 }, { 10, 4, 3 }, { 10, 9, 2 }, { 10, 10, 1 }, { 10, 11, 1 },
        { 10, 1000, 1 }, { 9, 3, 3 }, { 7, 0, 7 }, { 0, 3, 1 }, { 0, 0, 1 }, { 1, 1, 1 },
        { UINT_MAX, 1, UINT_MAX }, { UINT_MAX, 2, 2147483648u }, { UINT_MAX, UINT_MAX, 1 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (lease_fallback_share(cases[i].limit, cases[i].holders) != cases[i].share)
            fail_msg("share(%u, %u) = %u, not %u", cases[i].limit, cases[i].holders,
                     lease_fallback_share(cases[i].limit, cases[i].holders), cases[i].share);
}

/* ------------------------------------------------------------ reports */

typedef struct rep {
    int      calls;
    int      inside_want; /* set by the test around lease_want() */
    char     site[64];
    unsigned allowance;
    unsigned by_site[8]; /* "s0".."s7" */
    lease_table_t **free_me; /* the callback frees this table */
    lease_table_t  *drop_in; /* the callback gives its site up in this table */
    size_t          dropped_len; /* and reads the site it was given afterwards */
} rep_t;

static void on_changed(void *arg, const char *site, unsigned allowance)
{
    rep_t *r = arg;
    if (r->inside_want)
        fail_msg("callback from inside lease_want()");
    r->calls++;
    snprintf(r->site, sizeof(r->site), "%s", site);
    r->allowance = allowance;
    if (site[0] == 's' && site[1] >= '0' && site[1] <= '7' && site[2] == '\0')
        r->by_site[site[1] - '0'] = allowance;
    if (r->drop_in) {
        lease_want(r->drop_in, site, 10, 0);
        r->dropped_len += strlen(site);
    }
    if (r->free_me && *r->free_me) {
        lease_free(*r->free_me);
        *r->free_me = NULL;
    }
}

static unsigned want(rep_t *r, lease_table_t *t, const char *site, unsigned limit, unsigned w)
{
    r->inside_want = 1;
    unsigned a = lease_want(t, site, limit, w);
    r->inside_want = 0;
    return a;
}

static void test_no_redis(void **state)
{
    loop_t *l = loop_new();
    rep_t r = { 0 };
    lease_config_t cfg = { .local_holders = 3 };
    lease_table_t *t = lease_new(l, NULL, "h", &cfg, on_changed, &r);
    assert_int_equal(loop_timer_count(l), 0); /* nothing to renew */
    assert_int_equal(want(&r, t, "a.example", 10, 10), 4);
    assert_int_equal(want(&r, t, "a.example", 20, 5), 7);
    assert_int_equal(want(&r, t, "b.example", 2, 2), 1);
    lease_stats_t st;
    lease_get_stats(t, &st);
    assert_int_equal(st.sites, 2);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.renewals, 0);
    assert_int_equal(st.holders, 0);
    assert_int_equal(want(&r, t, "a.example", 20, 0), 0); /* goes at once */
    assert_int_equal(want(&r, t, "never.example", 20, 0), 0); /* not even made */
    lease_get_stats(t, &st);
    assert_int_equal(st.sites, 1);
    loop_run_once(l, 0);
    assert_int_equal(r.calls, 0);
    lease_free(t);
    assert_int_equal(loop_timer_count(l), 0);
    lease_free(NULL);
    loop_free(l);
}

/* --------------------------------------------- a model of the script */

#define MODEL_KEYS 200 /* a renewal carries at most 128 sites and the registry */

typedef struct model {
    int      evals;
    int      nkeys;           /* of the last EVAL, the registry included */
    char     keys[MODEL_KEYS][64];
    char     ttl[16], holder[32];
    unsigned limits[MODEL_KEYS], wants[MODEL_KEYS], helds[MODEL_KEYS];
    uint64_t at_ms;           /* when it came */
    unsigned holders;         /* what to answer */
    unsigned cap;             /* grant = min(want, cap) */
    int      bad_shape;       /* answer one element too few */
    int      contended;       /* the flag answered for every site */
} model_t;

static void model_eval(void *arg, int argc, char **argv, buf_t *out)
{
    model_t *m = arg;
    m->evals++;
    m->at_ms = util_mono_ms();
    assert_string_equal(argv[1], LEASE_REDIS_SCRIPT);
    m->nkeys = atoi(argv[2]);
    assert_true(m->nkeys >= 1 && m->nkeys <= MODEL_KEYS);
    assert_int_equal(argc, 3 + m->nkeys + 2 + 3 * (m->nkeys - 1));
    for (int i = 0; i < m->nkeys; i++)
        snprintf(m->keys[i], sizeof(m->keys[i]), "%s", argv[3 + i]);
    char **av = argv + 3 + m->nkeys;
    snprintf(m->ttl, sizeof(m->ttl), "%s", av[0]);
    snprintf(m->holder, sizeof(m->holder), "%s", av[1]);
    int n = m->nkeys - 1 - m->bad_shape;
    buf_printf(out, "*%d\r\n:%u\r\n", 2 * n + 1, m->holders);
    for (int i = 0; i < m->nkeys - 1; i++) {
        m->limits[i + 1] = (unsigned)atoi(av[2 + 3 * i]);
        m->wants[i + 1] = (unsigned)atoi(av[3 + 3 * i]);
        m->helds[i + 1] = (unsigned)atoi(av[4 + 3 * i]);
        if (i < n)
            buf_printf(out, ":%u\r\n", m->wants[i + 1] < m->cap ? m->wants[i + 1] : m->cap);
    }
    for (int i = 0; i < n; i++) /* the contended flags */
        buf_printf(out, ":%d\r\n", m->contended);
}

/* Index of key in the last EVAL, or -1. */
static int model_key(const model_t *m, const char *key)
{
    for (int i = 0; i < m->nkeys; i++)
        if (strcmp(m->keys[i], key) == 0)
            return i;
    return -1;
}

typedef struct fix {
    loop_t        *l;
    fakeredis_t   *f;
    rclient_t     *c;
    model_t        m;
    rep_t          r;
    lease_table_t *t;
} fix_t;

static void run_evals(fix_t *x, int n, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    size_t goal = x->f->ncommands + (size_t)n; /* the renewals are all it gets */
    while (x->f->ncommands < goal && util_mono_ms() < end)
        loop_run_once(x->l, 5);
    assert_int_equal(x->f->ncommands, goal);
    loop_run_once(x->l, 5); /* the reply */
    loop_run_once(x->l, 5);
}

static fix_t *fix_new(unsigned local_holders)
{
    fix_t *x = xcalloc(1, sizeof(*x));
    x->l = loop_new();
    x->f = fakeredis_new(x->l);
    x->f->eval_hook = model_eval;
    x->f->eval_arg = &x->m;
    x->m.holders = 5;
    x->m.cap = 2;
    rclient_config_t rc = { .host = "127.0.0.1", .port = x->f->port, .timeout_ms = 200 };
    x->c = rclient_new(x->l, &rc);
    lease_config_t cfg = { .ttl_ms = 1000, .renew_ms = 100, .local_holders = local_holders, .prefix = "t:p" };
    x->t = lease_new(x->l, x->c, "w1", &cfg, on_changed, &x->r);
    return x;
}

static void fix_free(fix_t *x)
{
    lease_free(x->t);
    rclient_free(x->c);
    fakeredis_free(x->f);
    assert_int_equal(loop_fd_count(x->l), 0);
    assert_int_equal(loop_timer_count(x->l), 0);
    loop_free(x->l);
    free(x);
}

static void test_renewal(void **state)
{
    fix_t *x = fix_new(4);
    lease_stats_t st;
    /* before Redis ever answered: ceil(limit / local_holders), no report */
    assert_int_equal(want(&x->r, x->t, "s0", 10, 10), 3);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallbacks, 0);
    /* the first renewal goes at once, with the site just asked for */
    run_evals(x, 1, 1000);
    assert_int_equal(x->m.nkeys, 2);
    assert_string_equal(x->m.keys[0], "t:p@holders");
    assert_string_equal(x->m.keys[1], "t:p:s0");
    assert_string_equal(x->m.ttl, "1000");
    assert_string_equal(x->m.holder, "w1");
    assert_int_equal(x->m.limits[1], 10);
    assert_int_equal(x->m.wants[1], 10);
    /* the grant (2), reported from the reply */
    assert_int_equal(x->r.calls, 1);
    assert_string_equal(x->r.site, "s0");
    assert_int_equal(x->r.allowance, 2);
    assert_int_equal(want(&x->r, x->t, "s0", 10, 10), 2);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.holders, 5);
    assert_int_equal(st.renewals, 1);

    /* a new site: 0 until its grant; its claim is brought forward */
    uint64_t t0 = util_mono_ms();
    assert_int_equal(want(&x->r, x->t, "s1", 10, 1), 0);
    assert_int_equal(want(&x->r, x->t, "s2", 3, 3), 0);
    assert_int_equal(want(&x->r, x->t, "s0", 1, 10), 1); /* capped by the new limit */
    run_evals(x, 1, 1000);
    assert_true(x->m.at_ms - t0 < 60); /* a quarter period, not a whole one */
    /* ONE EVAL for every site */
    assert_int_equal(x->m.nkeys, 4);
    int k0 = model_key(&x->m, "t:p:s0"), k1 = model_key(&x->m, "t:p:s1"), k2 = model_key(&x->m, "t:p:s2");
    assert_true(k0 > 0 && k1 > 0 && k2 > 0);
    assert_int_equal(x->m.limits[k0], 1);
    assert_int_equal(x->m.wants[k0], 10);
    assert_int_equal(x->m.limits[k1], 10);
    assert_int_equal(x->m.wants[k1], 1);
    assert_int_equal(x->m.limits[k2], 3);
    assert_int_equal(x->m.wants[k2], 3);
    /* reports: s1 0 -> 1, s2 0 -> 2; s0 stays 1 (told so already) */
    assert_int_equal(x->r.calls, 3);
    assert_int_equal(x->r.by_site[1], 1);
    assert_int_equal(x->r.by_site[2], 2);
    assert_int_equal(want(&x->r, x->t, "s0", 10, 10), 2);
    /* settled: renewals every period, nothing reported */
    t0 = util_mono_ms();
    run_evals(x, 3, 1000);
    uint64_t dt = x->m.at_ms - t0;
    assert_true(dt >= 200 && dt < 400);
    assert_int_equal(x->r.calls, 3);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.renewals, 5);
    assert_int_equal(st.renewals_failed, 0);
    assert_int_equal(st.sites, 3);
    fix_free(x);
}

/* A settled site (granted what it wants, nobody waiting) is renewed only
 * every ttl / 4; a site that wants more than its grant, or that another
 * holder waits at, every period; a limit or held count that changes the
 * claim at the next period. */
static void test_incremental_renewal(void **state)
{
    fix_t *x = fix_new(1); /* ttl 1000, renew 100: refresh 250 ms */
    x->m.cap = 100;
    want(&x->r, x->t, "s0", 10, 5);
    want(&x->r, x->t, "s1", 10, 5);
    run_evals(x, 1, 1000);
    assert_int_equal(x->m.nkeys, 3);
    uint64_t first = x->m.at_ms;
    /* settled: the periods in between send nothing */
    size_t seen = x->f->ncommands;
    uint64_t end = util_mono_ms() + 150;
    while (util_mono_ms() < end)
        loop_run_once(x->l, 5);
    assert_int_equal(x->f->ncommands, seen);
    /* then both, with the registry, a refresh period after the first */
    run_evals(x, 1, 1000);
    assert_true(x->m.at_ms - first >= 240);
    assert_int_equal(x->m.nkeys, 3);
    first = x->m.at_ms;

    /* s1 wants more than its grant: the next period carries it alone */
    assert_int_equal(want(&x->r, x->t, "s1", 10, 8), 5);
    x->m.cap = 6;
    run_evals(x, 1, 1000);
    assert_true(x->m.at_ms - first < 150);
    assert_int_equal(x->m.nkeys, 2);
    assert_string_equal(x->m.keys[1], "t:p:s1");
    assert_int_equal(x->r.by_site[1], 6);
    /* ... and every period while it waits */
    first = x->m.at_ms;
    run_evals(x, 1, 1000);
    assert_true(x->m.at_ms - first < 150);
    assert_int_equal(x->m.nkeys, 2);

    /* another holder waits at s0 (the flag): s0 every period too */
    x->m.cap = 100;
    run_evals(x, 1, 1000); /* s1 satisfied now (8) */
    x->m.contended = 1;
    run_evals(x, 1, 1000); /* the refresh of s0 (and s1) learns it */
    x->m.contended = 0;
    first = x->m.at_ms;
    run_evals(x, 1, 1000);
    assert_true(x->m.at_ms - first < 150);
    assert_int_equal(x->m.nkeys, 3); /* both were flagged */
    /* the flag gone: settled again, nothing until the refresh */
    seen = x->f->ncommands;
    end = util_mono_ms() + 150;
    while (util_mono_ms() < end)
        loop_run_once(x->l, 5);
    assert_int_equal(x->f->ncommands, seen);

    /* connections held beyond the grant change the claim: sent at once */
    lease_held(x->t, "s0", 9); /* grant 5 */
    run_evals(x, 1, 1000);
    assert_int_equal(x->m.nkeys, 2);
    assert_string_equal(x->m.keys[1], "t:p:s0");
    assert_int_equal(x->m.helds[1], 9);
    fix_free(x);
}

/* More sites than one EVAL carries: the round goes in chunks of 128, each
 * sent when the one before is answered, every site once. */
static void test_renewal_chunks(void **state)
{
    fix_t *x = fix_new(1);
    x->m.cap = 100;
    char site[16];
    for (int i = 0; i < 300; i++) {
        snprintf(site, sizeof(site), "c%03d", i);
        want(&x->r, x->t, site, 10, 1);
    }
    int seen[300] = { 0 };
    int sizes[3];
    uint64_t at[3];
    for (int k = 0; k < 3; k++) {
        run_evals(x, 1, 1000);
        at[k] = x->m.at_ms;
        sizes[k] = x->m.nkeys - 1;
        for (int i = 1; i < x->m.nkeys; i++)
            seen[atoi(x->m.keys[i] + strlen("t:p:c"))]++;
    }
    assert_int_equal(sizes[0], 128);
    assert_int_equal(sizes[1], 128);
    assert_int_equal(sizes[2], 44);
    /* back to back, not a renewal period (100 ms) apart */
    assert_true(at[1] - at[0] < 50 && at[2] - at[1] < 50);
    for (int i = 0; i < 300; i++)
        assert_int_equal(seen[i], 1);
    lease_stats_t st;
    lease_get_stats(x->t, &st);
    assert_int_equal(st.renewals, 3);
    fix_free(x);
}

static void test_failure_fallback(void **state)
{
    fix_t *x = fix_new(1);
    want(&x->r, x->t, "s0", 10, 10);
    want(&x->r, x->t, "s1", 20, 20);
    run_evals(x, 1, 1000);
    assert_int_equal(x->r.by_site[0], 2);
    assert_int_equal(x->r.by_site[1], 2);
    int calls = x->r.calls;

    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    /* a failed renewal: ceil(limit / 5 holders seen), reported */
    x->f->fail_next = 2;
    run_evals(x, 1, 1000);
    /* s0: ceil(10 / 5) = 2, unchanged; s1: 2 -> ceil(20 / 5) = 4 */
    assert_int_equal(x->r.calls, calls + 1);
    assert_int_equal(x->r.by_site[1], 4);
    lease_stats_t st;
    lease_get_stats(x->t, &st);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallbacks, 1);
    assert_int_equal(st.renewals_failed, 1);
    assert_int_equal(want(&x->r, x->t, "s0", 10, 10), 2);
    assert_int_equal(want(&x->r, x->t, "s1", 20, 20), 4);
    assert_int_equal(want(&x->r, x->t, "s3", 21, 21), 5); /* ceil(21 / 5) at once */
    assert_int_equal(want(&x->r, x->t, "s4", 4, 4), 1);
    run_evals(x, 1, 1000); /* still failing (fail_next had 2) */
    lease_get_stats(x->t, &st);
    assert_int_equal(st.renewals_failed, 2);
    assert_int_equal(st.fallbacks, 1);
    /* back: the model's grants (min(want, 2)) for all four */
    run_evals(x, 1, 1000);
    char logs[4096];
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.renewals_failed, 2);
    assert_int_equal(x->r.by_site[1], 2);
    assert_int_equal(x->r.by_site[3], 2);
    assert_int_equal(x->r.by_site[4], 2);
    assert_int_equal(want(&x->r, x->t, "s3", 21, 21), 2);
    const char *w = strstr(logs, "level=warn mod=lease event=fallback holder=\"w1\" error=\"ERR injected failure\" holders=5");
    assert_non_null(w);
    assert_null(strstr(w + 40, "event=fallback")); /* past this line's own */
    const char *b = strstr(logs, "level=info mod=lease event=redis_back holder=\"w1\" sites=4 holders=5");
    assert_non_null(b);
    assert_null(strstr(b + 40, "event=redis_back"));

    /* a reply of the wrong shape is a failure too */
    x->m.bad_shape = 1;
    run_evals(x, 1, 1000);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallbacks, 2);
    assert_int_equal(st.renewals_failed, 3);
    assert_int_equal(x->r.by_site[3], 5);
    fix_free(x);
}

static void test_release(void **state)
{
    fix_t *x = fix_new(1);
    want(&x->r, x->t, "s0", 10, 10);
    want(&x->r, x->t, "s1", 10, 10);
    run_evals(x, 1, 1000);
    lease_stats_t st;
    /* want 0 with a claim in Redis: kept until the release is answered */
    assert_int_equal(want(&x->r, x->t, "s1", 10, 0), 2);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.sites, 2);
    run_evals(x, 1, 1000);
    int k1 = model_key(&x->m, "t:p:s1");
    assert_true(k1 > 0);
    assert_int_equal(x->m.wants[k1], 0);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.sites, 1);
    run_evals(x, 1, 1000);
    assert_int_equal(model_key(&x->m, "t:p:s1"), -1); /* not carried any more */
    /* a site never sent to Redis goes at once */
    assert_int_equal(want(&x->r, x->t, "s2", 10, 10), 0);
    assert_int_equal(want(&x->r, x->t, "s2", 10, 0), 0);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.sites, 1);

    /* lease_free: HDEL of each claim and ZREM of the registry, not waited for */
    buf_reset(&x->f->log);
    lease_free(x->t);
    x->t = NULL;
    for (int i = 0; i < 5; i++)
        loop_run_once(x->l, 5);
    const char *log = buf_head(&x->f->log);
    assert_non_null(strstr(log, "HDEL t:p:s0 w1\n"));
    assert_non_null(strstr(log, "ZREM t:p@holders w1\n"));
    assert_null(strstr(log, "s1"));
    assert_null(strstr(log, "EVAL"));
    fix_free(x);
}

static void test_callback_frees(void **state)
{
    fix_t *x = fix_new(1);
    want(&x->r, x->t, "s0", 10, 10);
    want(&x->r, x->t, "s1", 10, 10);
    x->r.free_me = &x->t;
    run_evals(x, 1, 1000);
    assert_null(x->t);
    assert_int_equal(x->r.calls, 1); /* freed in the first report: no second */
    for (int i = 0; i < 5; i++)
        loop_run_once(x->l, 5);
    assert_non_null(strstr(buf_head(&x->f->log), "ZREM t:p@holders w1\n"));
    fix_free(x);
}

static void test_callback_drops_its_site(void **state)
{
    fix_t *x = fix_new(1);
    want(&x->r, x->t, "s0", 10, 10);
    want(&x->r, x->t, "s1", 10, 10);
    x->r.drop_in = x->t;
    run_evals(x, 1, 1000);
    assert_int_equal(x->r.calls, 2);
    assert_int_equal(x->r.dropped_len, 4); /* "s0", "s1": still there when read */
    x->r.drop_in = NULL;
    lease_stats_t st;
    lease_get_stats(x->t, &st);
    assert_int_equal(st.sites, 2); /* their claims are in Redis: released first */
    run_evals(x, 1, 1000);
    assert_int_equal(x->m.wants[1], 0);
    assert_int_equal(x->m.wants[2], 0);
    lease_get_stats(x->t, &st);
    assert_int_equal(st.sites, 0);
    assert_int_equal(x->r.calls, 2); /* given up: not reported */
    fix_free(x);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fallback_share),
        cmocka_unit_test(test_no_redis),
        cmocka_unit_test(test_renewal),
        cmocka_unit_test(test_incremental_renewal),
        cmocka_unit_test(test_renewal_chunks),
        cmocka_unit_test(test_failure_fallback),
        cmocka_unit_test(test_release),
        cmocka_unit_test(test_callback_frees),
        cmocka_unit_test(test_callback_drops_its_site),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

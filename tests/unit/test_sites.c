/*
 * Unit tests for deliverer/sites: site names from MX hosts, the limits
 * map, and who runs, waits or is parked, in which order, with the allow
 * function told what the worker wants.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "core/loop.h"
#include "core/util.h"
#include "deliverer/sites.h"

static void test_names(void **state)
{
    (void)state;
    char s[256];
    sites_name("aspmx.l.google.com", s, sizeof(s));
    assert_string_equal(s, "google.com");
    sites_name("ALT1.Gmail-SMTP-In.L.Google.COM.", s, sizeof(s));
    assert_string_equal(s, "google.com");
    sites_name("mx.example.co.uk", s, sizeof(s));
    assert_string_equal(s, "example.co.uk");
    sites_name("mx.w0001.example", s, sizeof(s));
    assert_string_equal(s, "w0001.example");
    sites_name("localhost", s, sizeof(s));
    assert_string_equal(s, "localhost");
    sites_name("co.uk", s, sizeof(s));
    assert_string_equal(s, "co.uk");
    sites_name("127.0.0.1", s, sizeof(s));
    assert_string_equal(s, "127.0.0.1");
    sites_name("::1", s, sizeof(s));
    assert_string_equal(s, "::1");
}

static void test_limits_parse(void **state)
{
    (void)state;
    sites_config_t c = { 0 };
    char err[256];
    assert_int_equal(sites_limits_parse("Google.com=400, outlook.com=20\tyahoo.com=1", &c, err, sizeof(err)), 0);
    assert_int_equal(c.nlimits, 3);
    assert_string_equal(c.limits[0].site, "google.com");
    assert_int_equal(c.limits[0].connections, 400);
    assert_string_equal(c.limits[2].site, "yahoo.com");
    assert_int_equal(c.limits[2].connections, 1);
    sites_config_free(&c);
    assert_int_equal(sites_limits_parse("", &c, err, sizeof(err)), 0);
    assert_int_equal(c.nlimits, 0);
    const char *bad[] = { "google.com", "google.com=", "=5", "google.com=0", "google.com=5x", "a=1 b" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(sites_limits_parse(bad[i], &c, err, sizeof(err)), -1);
        assert_non_null(strstr(err, "expected SITE=CONNECTIONS"));
        assert_int_equal(c.nlimits, 0);
    }
}

typedef struct leg {
    site_slot_t slot;
    const char *name;
    char       *log;
    int         how;
    char        why[320];
} leg_t;

static void on_site(void *arg, int how, const char *why)
{
    leg_t *l = arg;
    l->how = how;
    snprintf(l->why, sizeof(l->why), "%s", why ? why : "");
    strcat(l->log, how == SITE_GO ? "go:" : "park:");
    strcat(l->log, l->name);
    strcat(l->log, " ");
}

typedef struct allow {
    unsigned share;
    unsigned last_want;
    unsigned calls;
    char     last_site[64];
} allow_t;

static unsigned allow_fn(void *arg, const char *site, unsigned limit, unsigned want)
{
    allow_t *a = arg;
    a->calls++;
    a->last_want = want;
    snprintf(a->last_site, sizeof(a->last_site), "%s", site);
    if (want == 0)
        return 0; /* as lease_want() for a site it does not hold */
    return a->share < limit ? a->share : limit;
}

static int enter(sites_t *t, const char *site, leg_t *l, const char *name, char *log, const char **why)
{
    memset(l, 0, sizeof(*l));
    l->name = name;
    l->log = log;
    l->how = -1;
    return sites_enter(t, site, &l->slot, on_site, l, why);
}

static void test_run_wait_park(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    allow_t a = { .share = 2 };
    sites_config_t c = { .max_connections = 10, .max_waiting = 2, .max_wait_ms = 100000 };
    sites_t *t = sites_new(loop, &c, allow_fn, &a);
    char log[256] = "";
    leg_t l[6], other;
    const char *why = NULL;
    /* the entering leg counts in what is wanted (a lease grants nothing
     * to a site nobody wants) */
    assert_int_equal(enter(t, "s.example", &l[0], "0", log, &why), SITE_GO);
    assert_int_equal(a.last_want, 1);
    assert_int_equal(enter(t, "s.example", &l[1], "1", log, &why), SITE_GO);
    assert_int_equal(enter(t, "s.example", &l[2], "2", log, &why), SITE_WAIT); /* the share is 2 */
    assert_int_equal(a.last_want, 3);
    assert_int_equal(enter(t, "s.example", &l[3], "3", log, &why), SITE_WAIT);
    assert_int_equal(enter(t, "s.example", &l[4], "4", log, &why), SITE_PARK); /* 2 waiting already */
    assert_string_equal(why, "parked: site s.example has 2 of 10 connections busy and 2 messages waiting "
                             "(too many waiting)");
    /* another site is not held up */
    assert_int_equal(enter(t, "o.example", &other, "o", log, &why), SITE_GO);
    sites_stats_t st;
    sites_get_stats(t, &st);
    assert_int_equal(st.sites, 2);
    assert_int_equal(st.running, 3);
    assert_int_equal(st.waiting, 2);
    assert_int_equal(st.parked, 1);

    /* a place given back goes to the first waiter, from the loop */
    sites_leave(t, &l[0].slot);
    assert_string_equal(log, "");
    loop_run_once(loop, 0);
    assert_string_equal(log, "go:2 ");
    /* a waiter withdrawn is never called */
    sites_leave(t, &l[3].slot);
    sites_leave(t, &l[1].slot);
    loop_run_once(loop, 0);
    assert_string_equal(log, "go:2 ");
    /* a bigger share lets more run at once */
    a.share = 3;
    assert_int_equal(enter(t, "s.example", &l[5], "5", log, &why), SITE_GO);
    sites_leave(t, &l[2].slot);
    sites_leave(t, &l[5].slot);
    sites_leave(t, &other.slot);
    sites_get_stats(t, &st);
    assert_int_equal(st.sites, 0);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(a.last_want, 0); /* the share was given back */
    sites_free(t);
    loop_free(loop);
}

static void test_wait_expires(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    allow_t a = { .share = 1 };
    sites_config_t c = { .max_connections = 1, .max_waiting = 10, .max_wait_ms = 50 };
    sites_t *t = sites_new(loop, &c, allow_fn, &a);
    char log[256] = "";
    leg_t l0, l1;
    assert_int_equal(enter(t, "tarpit.example", &l0, "0", log, NULL), SITE_GO);
    uint64_t t0 = util_mono_ms();
    assert_int_equal(enter(t, "tarpit.example", &l1, "1", log, NULL), SITE_WAIT);
    while (l1.how == -1 && util_mono_ms() - t0 < 2000)
        loop_run_once(loop, 100);
    uint64_t waited = util_mono_ms() - t0;
    assert_string_equal(log, "park:1 ");
    assert_true(waited >= 45 && waited < 500);
    assert_string_equal(l1.why, "parked: site tarpit.example has 1 of 1 connections busy and 0 messages waiting "
                                "(waited too long)");
    sites_leave(t, &l0.slot);
    sites_free(t);
    loop_free(loop);
}

static void test_limits_and_disabled(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    sites_config_t c = { .max_connections = 1, .max_waiting = 0, .max_wait_ms = 1000 };
    char err[128];
    assert_int_equal(sites_limits_parse("big.example=3", &c, err, sizeof(err)), 0);
    sites_t *t = sites_new(loop, &c, NULL, NULL); /* no allow: the whole limit */
    sites_config_free(&c);                          /* the table keeps its own copy */
    char log[128] = "";
    leg_t b[4], s0, s1;
    assert_int_equal(sites_limit(t, "big.example"), 3);
    assert_int_equal(sites_limit(t, "small.example"), 1);
    for (int i = 0; i < 3; i++)
        assert_int_equal(enter(t, "big.example", &b[i], "b", log, NULL), SITE_GO);
    assert_int_equal(enter(t, "big.example", &b[3], "b", log, NULL), SITE_PARK); /* max_waiting 0 */
    assert_int_equal(enter(t, "small.example", &s0, "s", log, NULL), SITE_GO);
    assert_int_equal(enter(t, "small.example", &s1, "s", log, NULL), SITE_PARK);
    for (int i = 0; i < 3; i++)
        sites_leave(t, &b[i].slot);
    sites_leave(t, &s0.slot);
    sites_free(t);

    sites_config_t off = { .disabled = 1, .max_connections = 1 };
    t = sites_new(loop, &off, NULL, NULL);
    for (int i = 0; i < 4; i++)
        assert_int_equal(enter(t, "big.example", &b[i], "b", log, NULL), SITE_GO);
    sites_stats_t st;
    sites_get_stats(t, &st);
    assert_int_equal(st.running, 4);
    for (int i = 0; i < 4; i++)
        sites_leave(t, &b[i].slot);
    sites_free(t);
    loop_free(loop);
}

/* A limit given at entry (shaping) replaces the configured one, even
 * with the caps off, and a raised one lets the waiters in. */
static void test_given_limit(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    sites_config_t off = { .disabled = 1, .max_connections = 100, .max_waiting = 5, .max_wait_ms = 100000 };
    sites_t *t = sites_new(loop, &off, NULL, NULL);
    char log[128] = "";
    leg_t l[3];
    const char *why = NULL;
    memset(l, 0, sizeof(l));
    for (int i = 0; i < 3; i++) {
        l[i].name = i == 0 ? "0" : i == 1 ? "1" : "2";
        l[i].log = log;
        l[i].how = -1;
    }
    assert_int_equal(sites_enter_limit(t, "g.example@mta1", 1, 1, &l[0].slot, on_site, &l[0], &why), SITE_GO);
    assert_int_equal(sites_enter_limit(t, "g.example@mta1", 1, 1, &l[1].slot, on_site, &l[1], &why), SITE_WAIT);
    assert_int_equal(sites_limit(t, "g.example@mta1"), 0); /* the caps are off: the configuration says none */
    /* the next entry raises it to 3: the waiter goes from the loop */
    assert_int_equal(sites_enter_limit(t, "g.example@mta1", 3, 1, &l[2].slot, on_site, &l[2], &why), SITE_WAIT);
    loop_run_once(loop, 0);
    assert_string_equal(log, "go:1 go:2 ");
    for (int i = 0; i < 3; i++)
        sites_leave(t, &l[i].slot);
    sites_stats_t st;
    sites_get_stats(t, &st);
    assert_int_equal(st.sites, 0);
    sites_free(t);
    loop_free(loop);
}

/* Idle pooled connections count against a key's limit: they keep the
 * key known, and those beyond the allowance are closed. */
typedef struct idle_pool {
    unsigned idle;
    unsigned idle_d; /* of d.example, under the default cap */
    unsigned trims;
    unsigned last_keep;
} idle_pool_t;

static unsigned idle_fn(void *arg, const char *key)
{
    idle_pool_t *p = arg;
    return strcmp(key, "i.example") == 0 ? p->idle : strcmp(key, "d.example") == 0 ? p->idle_d : 0;
}

static void trim_fn(void *arg, const char *key, unsigned keep)
{
    idle_pool_t *p = arg;
    assert_string_equal(key, "i.example");
    p->trims++;
    p->last_keep = keep;
    if (p->idle > keep)
        p->idle = keep;
}

static void test_idle_connections(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    allow_t a = { .share = 2 };
    sites_config_t c = { .max_connections = 10, .max_waiting = 5, .max_wait_ms = 100000 };
    char err[128];
    assert_int_equal(sites_limits_parse("i.example=10", &c, err, sizeof(err)), 0); /* explicit: strict */
    sites_t *t = sites_new(loop, &c, allow_fn, &a);
    sites_config_free(&c);
    idle_pool_t ip = { 0 };
    sites_set_idle(t, idle_fn, trim_fn, &ip);
    assert_int_equal(sites_limit_named(t, "i.example"), 1);
    assert_int_equal(sites_limit_named(t, "d.example"), 0);
    char log[128] = "";
    leg_t l[3];
    assert_int_equal(enter(t, "i.example", &l[0], "0", log, NULL), SITE_GO);
    ip.idle = 1; /* its session stays open after the leg */
    sites_leave(t, &l[0].slot);
    sites_stats_t st;
    sites_get_stats(t, &st);
    assert_int_equal(st.sites, 1); /* kept: the connection is still open */
    assert_int_equal(a.last_want, 1);
    loop_run_once(loop, 0);
    assert_int_equal(ip.trims, 0); /* 1 idle within a share of 2 */
    /* two legs run (one of them would reuse the idle one); then the share
     * shrinks to 1: the idle connection goes, the running ones stay */
    assert_int_equal(enter(t, "i.example", &l[1], "1", log, NULL), SITE_GO);
    assert_int_equal(enter(t, "i.example", &l[2], "2", log, NULL), SITE_GO);
    a.share = 1;
    sites_tick(t);
    assert_int_equal(ip.trims, 1);
    assert_int_equal(ip.last_keep, 0);
    assert_int_equal(ip.idle, 0);
    ip.idle = 2; /* their sessions go idle (the pool has them back first) */
    sites_leave(t, &l[1].slot);
    sites_leave(t, &l[2].slot);
    assert_int_equal(ip.trims, 1); /* share 1: one goes, from the loop */
    loop_run_once(loop, 0);
    assert_int_equal(ip.trims, 2);
    assert_int_equal(ip.last_keep, 1);
    assert_int_equal(ip.idle, 1);
    /* the pool closed the last one by itself (idle time): the next tick
     * forgets the key and gives the share back */
    ip.idle = 0;
    sites_tick(t);
    sites_get_stats(t, &st);
    assert_int_equal(st.sites, 0);
    assert_int_equal(a.last_want, 0);
    /* the default cap counts running legs only: idle ones neither keep
     * the site nor are closed */
    ip.idle_d = 3;
    assert_int_equal(enter(t, "d.example", &l[0], "d", log, NULL), SITE_GO);
    assert_int_equal(a.last_want, 1);
    sites_leave(t, &l[0].slot);
    sites_tick(t);
    loop_run_once(loop, 0);
    sites_get_stats(t, &st);
    assert_int_equal(st.sites, 0);
    assert_int_equal(ip.trims, 2);
    assert_int_equal(ip.idle_d, 3);
    sites_free(t);
    loop_free(loop);
}

/* Freeing the table parks its waiters. */
static void test_free_parks_waiters(void **state)
{
    (void)state;
    loop_t *loop = loop_new();
    sites_config_t c = { .max_connections = 1, .max_waiting = 5, .max_wait_ms = 10000 };
    sites_t *t = sites_new(loop, &c, NULL, NULL);
    char log[64] = "";
    leg_t l0, l1;
    assert_int_equal(enter(t, "a.example", &l0, "0", log, NULL), SITE_GO);
    assert_int_equal(enter(t, "a.example", &l1, "1", log, NULL), SITE_WAIT);
    sites_leave(t, &l0.slot);
    sites_free(t); /* before the wake: the waiter is parked, not run */
    assert_string_equal(log, "park:1 ");
    assert_string_equal(l1.why, "parked: the worker is stopping");
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_limits_parse),
        cmocka_unit_test(test_run_wait_park),
        cmocka_unit_test(test_wait_expires),
        cmocka_unit_test(test_limits_and_disabled),
        cmocka_unit_test(test_free_parks_waiters),
        cmocka_unit_test(test_given_limit),
        cmocka_unit_test(test_idle_connections),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

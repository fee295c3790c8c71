/*
 * Unit tests for deliverer/actions: names; validation and normalisation
 * (derived ids, the hashed id of a long value, lower case, created);
 * without Redis: find by each selector, kinds kept apart, source
 * qualification, the most restrictive rate and connection limit, the
 * latest suspend, merging by id (expiry extended, newer reason, earliest
 * created), expiry on an injected clock and on the real one, remove, the
 * changed callback (never inside a call, once per loop pass, not for a
 * repeat that changes nothing, a callback that frees its table), the log
 * lines and the metrics; against tests/support/fakeredis.h with a model
 * of the two scripts: the write (its words, ops in order, one in flight,
 * repeated adds folded), a second table learning it, the poll asking for
 * the hash only when the version moved, corrupt fields skipped and
 * counted, a local add kept while unwritten, the fallback (one warn, one
 * info) and the writes retried after it.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/actions.h"
#include "metrics/metrics.h"
#include "tests/support/fakeredis.h"
#include "tests/support/logcapture.h"

#define T0 1800000000000ull /* Unix ms of the injected clock's start */

static uint64_t fake_now(void *arg)
{
    return *(uint64_t *)arg;
}

typedef struct rep {
    int         calls;
    int         inside;   /* set by the test around its calls */
    actions_t **free_me;  /* the callback frees this table */
} rep_t;

static void on_changed(void *arg)
{
    rep_t *r = arg;
    if (r->inside)
        fail_msg("callback from inside a call");
    r->calls++;
    if (r->free_me && *r->free_me) {
        actions_free(*r->free_me);
        *r->free_me = NULL;
    }
}

static action_t mk(action_kind_t kind, action_sel_t sel, const char *value, const char *source, uint64_t expires)
{
    action_t a;
    memset(&a, 0, sizeof(a));
    a.kind = kind;
    a.sel = sel;
    snprintf(a.value, sizeof(a.value), "%s", value);
    snprintf(a.source, sizeof(a.source), "%s", source);
    a.expires_ms = expires;
    snprintf(a.reason, sizeof(a.reason), "421 4.7.0 [TS01] temporarily deferred");
    snprintf(a.origin, sizeof(a.origin), "automation:yahoo-ts01");
    if (kind == ACTION_RATE) {
        a.rate_per_s = 1;
        snprintf(a.rate_text, sizeof(a.rate_text), "1/s");
    }
    if (kind == ACTION_CONNECTIONS)
        a.connections = 2;
    return a;
}

static int add(rep_t *r, actions_t *t, const action_t *a)
{
    r->inside = 1;
    int rc = actions_add(t, a);
    r->inside = 0;
    return rc;
}

/* A table without Redis on an injected clock at T0. */
typedef struct local {
    loop_t    *l;
    actions_t *t;
    rep_t      r;
    uint64_t   now;
} local_t;

static local_t *local_new(uint64_t poll_ms)
{
    local_t *x = xcalloc(1, sizeof(*x));
    x->l = loop_new();
    x->now = T0;
    actions_config_t cfg = { .poll_ms = poll_ms };
    x->t = actions_new(x->l, NULL, &cfg, on_changed, &x->r);
    actions_set_clock(x->t, fake_now, &x->now);
    return x;
}

static void local_free(local_t *x)
{
    actions_free(x->t);
    assert_int_equal(loop_timer_count(x->l), 0);
    assert_int_equal(loop_fd_count(x->l), 0);
    loop_free(x->l);
    free(x);
}

static void run_for(loop_t *l, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    do
        loop_run_once(l, 5);
    while (util_mono_ms() < end);
}

/* ------------------------------------------------------------ names, validation */

static void test_names(void **state)
{
    const char *kinds[] = { "suspend", "bounce", "rate", "connection_limit" };
    const char *sels[] = { "site", "domain", "source", "pool", "tenant", "campaign" };
    for (int i = 0; i < 4; i++) {
        assert_string_equal(action_kind_name((action_kind_t)(i + 1)), kinds[i]);
        assert_int_equal(action_kind_parse(kinds[i]), i + 1);
    }
    for (int i = 0; i < 6; i++) {
        assert_string_equal(action_sel_name((action_sel_t)(i + 1)), sels[i]);
        assert_int_equal(action_sel_parse(sels[i]), i + 1);
    }
    assert_string_equal(action_kind_name((action_kind_t)0), "?");
    assert_string_equal(action_kind_name((action_kind_t)5), "?");
    assert_string_equal(action_sel_name((action_sel_t)7), "?");
    assert_int_equal(action_kind_parse("Suspend"), -1);
    assert_int_equal(action_kind_parse("connections"), -1);
    assert_int_equal(action_kind_parse(""), -1);
    assert_int_equal(action_kind_parse(NULL), -1);
    assert_int_equal(action_sel_parse("sites"), -1);
    assert_int_equal(action_sel_parse(NULL), -1);
}

static void test_validation(void **state)
{
    local_t *x = local_new(0);
    uint64_t exp = T0 + 60000;
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", exp);
    a.kind = 0;
    assert_int_equal(actions_add(x->t, &a), -1);
    a.kind = 5;
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", exp);
    a.sel = 0;
    assert_int_equal(actions_add(x->t, &a), -1);
    a.sel = 7;
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_SUSPEND, SEL_SITE, "", "", exp);
    assert_int_equal(actions_add(x->t, &a), -1);          /* empty value */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo\n.com", "", exp);
    assert_int_equal(actions_add(x->t, &a), -1);          /* control byte */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "ip\x01", exp);
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_SUSPEND, SEL_SITE, "ya\xffhoo.com", "", exp);
    assert_int_equal(actions_add(x->t, &a), -1);          /* not UTF-8 */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", T0);
    assert_int_equal(actions_add(x->t, &a), -1);          /* expired already */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", 0);
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_RATE, SEL_SITE, "yahoo.com", "", exp);
    a.rate_per_s = 0;
    assert_int_equal(actions_add(x->t, &a), -1);
    a.rate_per_s = -1;
    assert_int_equal(actions_add(x->t, &a), -1);
    a.rate_per_s = NAN;
    assert_int_equal(actions_add(x->t, &a), -1);
    a.rate_per_s = INFINITY;
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_CONNECTIONS, SEL_SITE, "yahoo.com", "", exp);
    a.connections = 0;
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", exp);
    memset(a.value, 'a', sizeof(a.value));                /* not terminated */
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", exp);
    memset(a.reason, 'r', sizeof(a.reason));
    assert_int_equal(actions_add(x->t, &a), -1);
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", exp);
    snprintf(a.id, sizeof(a.id), "admin\t1");
    assert_int_equal(actions_add(x->t, &a), -1);
    assert_int_equal(actions_count(x->t), 0);
    actions_stats_t st;
    actions_get_stats(x->t, &st);
    assert_int_equal(st.added, 0);

    /* normalised: derived id, lower case, created filled, other kinds' fields cleared */
    a = mk(ACTION_SUSPEND, SEL_SITE, "Yahoo.COM", "ip-1", exp);
    a.rate_per_s = 5;
    a.connections = 3;
    assert_int_equal(actions_add(x->t, &a), 0);
    action_query_t q = { .site = "YAHOO.com", .source = "ip-1" };
    const action_t *f = actions_find(x->t, ACTION_SUSPEND, &q);
    assert_non_null(f);
    assert_string_equal(f->id, "suspend:site:yahoo.com@ip-1");
    assert_string_equal(f->value, "yahoo.com");
    assert_int_equal(f->created_ms, T0);
    assert_int_equal(f->expires_ms, exp);
    assert_true(f->rate_per_s == 0);
    assert_int_equal(f->connections, 0);
    assert_string_equal(f->origin, "automation:yahoo-ts01");

    a = mk(ACTION_CONNECTIONS, SEL_TENANT, "Acme", "", exp);
    a.created_ms = T0 - 5;
    assert_int_equal(actions_add(x->t, &a), 0);
    q = (action_query_t){ .tenant = "Acme" };
    f = actions_find(x->t, ACTION_CONNECTIONS, &q);
    assert_non_null(f);
    assert_string_equal(f->id, "connection_limit:tenant:Acme"); /* tenants keep their case */
    assert_int_equal(f->created_ms, T0 - 5);
    q.tenant = "acme";
    assert_null(actions_find(x->t, ACTION_CONNECTIONS, &q));

    /* a value too long for a readable id: named by its hash */
    char longv[200];
    memset(longv, 'x', sizeof(longv) - 1);
    longv[sizeof(longv) - 1] = '\0';
    a = mk(ACTION_BOUNCE, SEL_CAMPAIGN, longv, "", exp);
    assert_int_equal(actions_add(x->t, &a), 0);
    q = (action_query_t){ .campaign = longv };
    f = actions_find(x->t, ACTION_BOUNCE, &q);
    assert_non_null(f);
    assert_int_equal(strncmp(f->id, "bounce:campaign:#", 17), 0);
    assert_int_equal(strlen(f->id), 17 + 16);
    assert_string_equal(f->value, longv);

    /* an id given is kept; reason bytes that are not UTF-8 become '?' */
    a = mk(ACTION_SUSPEND, SEL_POOL, "p1", "", exp);
    snprintf(a.id, sizeof(a.id), "admin-42");
    snprintf(a.reason, sizeof(a.reason), "bad \xff byte");
    assert_int_equal(actions_add(x->t, &a), 0);
    q = (action_query_t){ .pool = "p1" };
    f = actions_find(x->t, ACTION_SUSPEND, &q);
    assert_non_null(f);
    assert_string_equal(f->id, "admin-42");
    assert_string_equal(f->reason, "bad ? byte");
    assert_int_equal(actions_count(x->t), 4);
    local_free(x);
}

/* ------------------------------------------------------------ find */

static void test_find_each_selector(void **state)
{
    local_t *x = local_new(0);
    uint64_t exp = T0 + 60000;
    const char *values[] = { NULL, "gmail.com", "example.org", "192.0.2.1", "pool-a", "tenant-a", "camp-a" };
    for (int s = SEL_SITE; s <= SEL_CAMPAIGN; s++) {
        action_t a = mk(ACTION_SUSPEND, (action_sel_t)s, values[s], "", exp + (uint64_t)s);
        assert_int_equal(actions_add(x->t, &a), 0);
    }
    assert_int_equal(actions_count(x->t), 6);
    for (int s = SEL_SITE; s <= SEL_CAMPAIGN; s++) {
        /* only the field of that selector set, to its value */
        action_query_t q = { 0 };
        const char **fields[] = { NULL, &q.site, &q.domain, &q.source, &q.pool, &q.tenant, &q.campaign };
        *fields[s] = values[s];
        const action_t *f = actions_find(x->t, ACTION_SUSPEND, &q);
        assert_non_null(f);
        assert_int_equal(f->sel, s);
        assert_string_equal(f->value, values[s]);
        assert_null(actions_find(x->t, ACTION_BOUNCE, &q)); /* kinds apart */
        assert_null(actions_find(x->t, ACTION_RATE, &q));
        /* the same value under another selector's field matches nothing */
        action_query_t other = { 0 };
        const char **ofields[] = { NULL, &other.site, &other.domain, &other.source, &other.pool, &other.tenant,
                                   &other.campaign };
        *ofields[s == SEL_CAMPAIGN ? SEL_SITE : s + 1] = values[s];
        assert_null(actions_find(x->t, ACTION_SUSPEND, &other));
    }
    /* a query with every field: the one expiring last */
    action_query_t all = { .site = values[1], .domain = values[2], .source = values[3], .pool = values[4],
                           .tenant = values[5], .campaign = values[6] };
    const action_t *f = actions_find(x->t, ACTION_SUSPEND, &all);
    assert_non_null(f);
    assert_int_equal(f->sel, SEL_CAMPAIGN);
    assert_int_equal(f->expires_ms, exp + SEL_CAMPAIGN);
    /* nothing matching, an empty query, NULL */
    action_query_t none = { .site = "other.com", .domain = "other.com" };
    assert_null(actions_find(x->t, ACTION_SUSPEND, &none));
    action_query_t empty = { 0 };
    assert_null(actions_find(x->t, ACTION_SUSPEND, &empty));
    assert_null(actions_find(x->t, ACTION_SUSPEND, NULL));
    local_free(x);
}

static void test_many(void **state)
{
    local_t *x = local_new(0);
    char v[64];
    for (int i = 0; i < 3000; i++) {
        snprintf(v, sizeof(v), "site%d.example", i);
        action_t a = mk(i % 2 ? ACTION_SUSPEND : ACTION_RATE, SEL_SITE, v, "", T0 + 10000 + (uint64_t)i);
        a.rate_per_s = 1 + i;
        assert_int_equal(actions_add(x->t, &a), 0);
    }
    assert_int_equal(actions_count(x->t), 3000);
    for (int i = 0; i < 3000; i += 7) {
        snprintf(v, sizeof(v), "site%d.example", i);
        action_query_t q = { .site = v };
        const action_t *f = actions_find(x->t, i % 2 ? ACTION_SUSPEND : ACTION_RATE, &q);
        assert_non_null(f);
        assert_string_equal(f->value, v);
        assert_null(actions_find(x->t, i % 2 ? ACTION_RATE : ACTION_SUSPEND, &q));
    }
    x->now = T0 + 10000 + 1499; /* the first 1,500 have expired */
    action_query_t q = { .site = "site1499.example" };
    assert_null(actions_find(x->t, ACTION_SUSPEND, &q));
    q.site = "site1501.example";
    assert_non_null(actions_find(x->t, ACTION_SUSPEND, &q));
    run_for(x->l, 1100);
    assert_int_equal(actions_count(x->t), 1500);
    local_free(x);
}

static void test_source_qualification(void **state)
{
    local_t *x = local_new(0);
    uint64_t exp = T0 + 60000;
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "ip-1", exp);
    assert_int_equal(actions_add(x->t, &a), 0);
    action_query_t q = { .site = "yahoo.com", .source = "ip-1" };
    assert_non_null(actions_find(x->t, ACTION_SUSPEND, &q));
    q.source = "ip-2";
    assert_null(actions_find(x->t, ACTION_SUSPEND, &q));
    q.source = "IP-1"; /* sources match exactly */
    assert_null(actions_find(x->t, ACTION_SUSPEND, &q));
    q.source = NULL;
    assert_null(actions_find(x->t, ACTION_SUSPEND, &q));
    /* the same site for any source: a separate action (its own id) */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", exp - 1000);
    assert_int_equal(actions_add(x->t, &a), 0);
    assert_int_equal(actions_count(x->t), 2);
    const action_t *f = actions_find(x->t, ACTION_SUSPEND, &q);
    assert_non_null(f);
    assert_string_equal(f->id, "suspend:site:yahoo.com");
    q.source = "ip-9";
    f = actions_find(x->t, ACTION_SUSPEND, &q);
    assert_non_null(f);
    assert_string_equal(f->source, "");
    q.source = "ip-1"; /* both apply: the one expiring last */
    f = actions_find(x->t, ACTION_SUSPEND, &q);
    assert_non_null(f);
    assert_string_equal(f->id, "suspend:site:yahoo.com@ip-1");
    local_free(x);
}

static void test_most_restrictive(void **state)
{
    local_t *x = local_new(0);
    uint64_t exp = T0 + 60000;
    action_t a = mk(ACTION_RATE, SEL_SITE, "yahoo.com", "", exp + 3000);
    a.rate_per_s = 10;
    assert_int_equal(actions_add(x->t, &a), 0);
    a = mk(ACTION_RATE, SEL_DOMAIN, "yahoo.co.uk", "", exp);
    a.rate_per_s = 0.5;
    snprintf(a.rate_text, sizeof(a.rate_text), "30/m");
    assert_int_equal(actions_add(x->t, &a), 0);
    a = mk(ACTION_RATE, SEL_TENANT, "acme", "", exp);
    a.rate_per_s = 2;
    assert_int_equal(actions_add(x->t, &a), 0);
    a = mk(ACTION_RATE, SEL_SITE, "yahoo.com", "ip-1", exp); /* not for this source */
    a.rate_per_s = 0.1;
    assert_int_equal(actions_add(x->t, &a), 0);

    action_query_t q = { .site = "yahoo.com", .source = "ip-2" };
    const action_t *f = actions_find(x->t, ACTION_RATE, &q);
    assert_non_null(f);
    assert_true(f->rate_per_s == 10);
    q.tenant = "acme";
    f = actions_find(x->t, ACTION_RATE, &q);
    assert_true(f->rate_per_s == 2);
    q.domain = "yahoo.co.uk";
    f = actions_find(x->t, ACTION_RATE, &q);
    assert_true(f->rate_per_s == 0.5);
    assert_string_equal(f->rate_text, "30/m");
    q.source = "ip-1";
    f = actions_find(x->t, ACTION_RATE, &q);
    assert_true(f->rate_per_s == 0.1);

    a = mk(ACTION_CONNECTIONS, SEL_SITE, "yahoo.com", "", exp);
    a.connections = 4;
    assert_int_equal(actions_add(x->t, &a), 0);
    a = mk(ACTION_CONNECTIONS, SEL_POOL, "shared", "", exp);
    a.connections = 1;
    assert_int_equal(actions_add(x->t, &a), 0);
    a = mk(ACTION_CONNECTIONS, SEL_CAMPAIGN, "c1", "", exp);
    a.connections = 3;
    assert_int_equal(actions_add(x->t, &a), 0);
    action_query_t c = { .site = "yahoo.com", .campaign = "c1" };
    f = actions_find(x->t, ACTION_CONNECTIONS, &c);
    assert_int_equal(f->connections, 3);
    c.pool = "shared";
    f = actions_find(x->t, ACTION_CONNECTIONS, &c);
    assert_int_equal(f->connections, 1);
    c.pool = "other";
    f = actions_find(x->t, ACTION_CONNECTIONS, &c);
    assert_int_equal(f->connections, 3);
    local_free(x);
}

/* ------------------------------------------------------------ merge, expiry, remove */

static void test_merge_by_id(void **state)
{
    local_t *x = local_new(0);
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", T0 + 10000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    run_for(x->l, 5);
    assert_int_equal(x->r.calls, 1);

    x->now = T0 + 1000; /* a repeated trigger, later expiry, new reason */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", T0 + 20000);
    snprintf(a.reason, sizeof(a.reason), "second");
    assert_int_equal(add(&x->r, x->t, &a), 0);
    assert_int_equal(actions_count(x->t), 1);
    action_query_t q = { .site = "yahoo.com" };
    const action_t *f = actions_find(x->t, ACTION_SUSPEND, &q);
    assert_int_equal(f->expires_ms, T0 + 20000);
    assert_int_equal(f->created_ms, T0); /* the first creation */
    assert_string_equal(f->reason, "second");
    run_for(x->l, 5);
    assert_int_equal(x->r.calls, 2);

    /* an earlier expiry never shortens it; the newer reason still wins */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", T0 + 15000);
    snprintf(a.reason, sizeof(a.reason), "third");
    assert_int_equal(add(&x->r, x->t, &a), 0);
    f = actions_find(x->t, ACTION_SUSPEND, &q);
    assert_int_equal(f->expires_ms, T0 + 20000);
    assert_string_equal(f->reason, "third");
    run_for(x->l, 5);
    assert_int_equal(x->r.calls, 3);

    /* the same again: nothing changes, no callback */
    assert_int_equal(add(&x->r, x->t, &a), 0);
    run_for(x->l, 5);
    assert_int_equal(x->r.calls, 3);
    actions_stats_t st;
    actions_get_stats(x->t, &st);
    assert_int_equal(st.added, 4);
    assert_int_equal(st.active, 1);

    /* an id given again with another selector value: moved in the index */
    action_t g = mk(ACTION_SUSPEND, SEL_SITE, "a.example", "", T0 + 9000);
    snprintf(g.id, sizeof(g.id), "admin-7");
    assert_int_equal(add(&x->r, x->t, &g), 0);
    snprintf(g.value, sizeof(g.value), "b.example");
    assert_int_equal(add(&x->r, x->t, &g), 0);
    action_query_t qa = { .site = "a.example" }, qb = { .site = "b.example" };
    assert_null(actions_find(x->t, ACTION_SUSPEND, &qa));
    assert_string_equal(actions_find(x->t, ACTION_SUSPEND, &qb)->id, "admin-7");
    assert_int_equal(actions_count(x->t), 2);
    assert_int_equal(actions_remove(x->t, "admin-7"), 0);

    /* another kind for the same site is another action */
    a = mk(ACTION_RATE, SEL_SITE, "yahoo.com", "", T0 + 5000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    assert_int_equal(actions_count(x->t), 2);
    local_free(x);
}

static void test_expiry_injected_clock(void **state)
{
    local_t *x = local_new(20);
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", T0 + 1000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    a = mk(ACTION_BOUNCE, SEL_DOMAIN, "aol.com", "", T0 + 5000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    run_for(x->l, 30);
    assert_int_equal(x->r.calls, 1);
    action_query_t q = { .site = "yahoo.com", .domain = "aol.com" };
    assert_non_null(actions_find(x->t, ACTION_SUSPEND, &q));

    x->now = T0 + 999;
    assert_non_null(actions_find(x->t, ACTION_SUSPEND, &q));
    x->now = T0 + 1000; /* at its expiry: gone for find at once */
    assert_null(actions_find(x->t, ACTION_SUSPEND, &q));
    assert_non_null(actions_find(x->t, ACTION_BOUNCE, &q));
    assert_int_equal(x->r.calls, 1);
    run_for(x->l, 60); /* the sweep (at most poll_ms away) */
    assert_int_equal(x->r.calls, 2);
    assert_int_equal(actions_count(x->t), 1);
    actions_stats_t st;
    actions_get_stats(x->t, &st);
    assert_int_equal(st.expired, 1);
    assert_int_equal(st.active, 1);

    x->now = T0 + 6000;
    assert_null(actions_find(x->t, ACTION_BOUNCE, &q));
    run_for(x->l, 60);
    assert_int_equal(x->r.calls, 3);
    assert_int_equal(actions_count(x->t), 0);
    assert_int_equal(loop_timer_count(x->l), 0); /* nothing left to watch */
    local_free(x);
}

static void test_expiry_real_clock(void **state)
{
    loop_t *l = loop_new();
    rep_t r = { 0 };
    actions_t *t = actions_new(l, NULL, NULL, on_changed, &r);
    uint64_t start = util_wall_ms();
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", start + 150);
    assert_int_equal(actions_add(t, &a), 0);
    run_for(l, 5);
    assert_int_equal(r.calls, 1);
    action_query_t q = { .site = "yahoo.com" };
    assert_non_null(actions_find(t, ACTION_SUSPEND, &q));
    uint64_t end = util_mono_ms() + 2000;
    while (r.calls < 2 && util_mono_ms() < end)
        loop_run_once(l, 5);
    uint64_t took = util_wall_ms() - start;
    assert_int_equal(r.calls, 2);
    assert_true(took >= 150 && took < 1000);
    assert_null(actions_find(t, ACTION_SUSPEND, &q));
    assert_int_equal(actions_count(t), 0);
    actions_free(t);
    assert_int_equal(loop_timer_count(l), 0);
    loop_free(l);
}

static void test_remove(void **state)
{
    local_t *x = local_new(0);
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", T0 + 10000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    a = mk(ACTION_RATE, SEL_SITE, "yahoo.com", "", T0 + 10000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    run_for(x->l, 5);
    assert_int_equal(x->r.calls, 1);
    x->r.inside = 1;
    assert_int_equal(actions_remove(x->t, "suspend:site:yahoo.com"), 0);
    assert_int_equal(actions_remove(x->t, "no-such-id"), 0);
    assert_int_equal(actions_remove(x->t, ""), -1);
    assert_int_equal(actions_remove(x->t, NULL), -1);
    char longid[200];
    memset(longid, 'i', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    assert_int_equal(actions_remove(x->t, longid), -1);
    x->r.inside = 0;
    action_query_t q = { .site = "yahoo.com" };
    assert_null(actions_find(x->t, ACTION_SUSPEND, &q));
    assert_non_null(actions_find(x->t, ACTION_RATE, &q));
    assert_int_equal(actions_count(x->t), 1);
    run_for(x->l, 5);
    assert_int_equal(x->r.calls, 2);
    assert_int_equal(actions_remove(x->t, "suspend:site:yahoo.com"), 0); /* again: nothing changes */
    run_for(x->l, 5);
    assert_int_equal(x->r.calls, 2);
    /* added again after removal: a new action */
    a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", T0 + 3000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    assert_int_equal(actions_find(x->t, ACTION_SUSPEND, &q)->expires_ms, T0 + 3000);
    local_free(x);
}

static void collect(void *arg, const action_t *a)
{
    char *out = arg;
    strcat(out, a->id);
    strcat(out, ";");
}

static void test_list_and_callbacks(void **state)
{
    local_t *x = local_new(0);
    /* two adds in one pass: one callback, never inside */
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "a.com", "", T0 + 1000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    a = mk(ACTION_SUSPEND, SEL_SITE, "b.com", "", T0 + 2000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    assert_int_equal(x->r.calls, 0);
    run_for(x->l, 10);
    assert_int_equal(x->r.calls, 1);
    char ids[256] = "";
    actions_list(x->t, collect, ids);
    assert_true(strstr(ids, "suspend:site:a.com;") != NULL);
    assert_true(strstr(ids, "suspend:site:b.com;") != NULL);
    assert_int_equal(strlen(ids), strlen("suspend:site:a.com;suspend:site:b.com;"));
    x->now = T0 + 1500; /* listed only while in force */
    ids[0] = '\0';
    actions_list(x->t, collect, ids);
    assert_string_equal(ids, "suspend:site:b.com;");

    /* a callback that frees its table */
    x->r.free_me = &x->t;
    a = mk(ACTION_SUSPEND, SEL_SITE, "c.com", "", T0 + 3000);
    assert_int_equal(add(&x->r, x->t, &a), 0);
    run_for(x->l, 10);
    assert_int_equal(x->r.calls, 2);
    assert_null(x->t);
    assert_int_equal(loop_timer_count(x->l), 0);
    loop_free(x->l);
    free(x);
}

static void test_logs_and_metrics(void **state)
{
    uint64_t added0 = metrics_counter(MET_SHAPING_ACTIONS_ADDED);
    int64_t active0 = metrics_gauge(MET_SHAPING_ACTIONS_ACTIVE);
    local_t *x = local_new(20);
    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    action_t a = mk(ACTION_RATE, SEL_SITE, "yahoo.com", "ip-1", T0 + 90000);
    a.rate_per_s = 0.5;
    snprintf(a.rate_text, sizeof(a.rate_text), "30/m");
    assert_int_equal(actions_add(x->t, &a), 0);
    a.expires_ms = T0 + 95000; /* an extension: debug only */
    assert_int_equal(actions_add(x->t, &a), 0);
    a = mk(ACTION_SUSPEND, SEL_DOMAIN, "aol.com", "", T0 + 1000);
    assert_int_equal(actions_add(x->t, &a), 0);
    char logs[4096];
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    assert_true(strstr(logs, "mod=shaping event=action id=\"rate:site:yahoo.com@ip-1\" kind=rate selector=site "
                             "value=\"yahoo.com\" source=\"ip-1\" rate_per_s=0.5 rate=\"30/m\" connections=0 "
                             "duration_ms=90000 reason=\"421 4.7.0 [TS01] temporarily deferred\" "
                             "origin=\"automation:yahoo-ts01\"") != NULL);
    assert_true(strstr(logs, "event=action id=\"suspend:domain:aol.com\"") != NULL);
    assert_null(strstr(logs, "event=extended"));
    const char *p = logs;
    int lines = 0;
    while ((p = strstr(p, "event=action")) != NULL) {
        lines++;
        p++;
    }
    assert_int_equal(lines, 2);
    assert_int_equal(metrics_counter(MET_SHAPING_ACTIONS_ADDED) - added0, 3);
    assert_int_equal(metrics_gauge(MET_SHAPING_ACTIONS_ACTIVE) - active0, 2);
    x->now = T0 + 2000;
    run_for(x->l, 60);
    assert_int_equal(metrics_gauge(MET_SHAPING_ACTIONS_ACTIVE) - active0, 1);
    local_free(x);
    assert_int_equal(metrics_gauge(MET_SHAPING_ACTIONS_ACTIVE), active0);
}

/* ------------------------------------------------------------ a model of the scripts */

typedef struct model {
    char     fields[16][96];
    char    *vals[16];
    int      n;
    long long version;
    int      writes, polls, full_polls;
    char     last_write[2048]; /* the ops of the last write: "+id -id ..." */
    int      corrupt;          /* add a corrupt field and a wrong-named one */
} model_t;

static int model_find(model_t *m, const char *f)
{
    for (int i = 0; i < m->n; i++)
        if (strcmp(m->fields[i], f) == 0)
            return i;
    return -1;
}

static void model_del(model_t *m, int i)
{
    free(m->vals[i]);
    m->n--;
    if (i != m->n) {
        memcpy(m->fields[i], m->fields[m->n], sizeof(m->fields[i]));
        m->vals[i] = m->vals[m->n];
    }
}

static void model_set(model_t *m, const char *f, const char *v)
{
    int i = model_find(m, f);
    if (i < 0) {
        assert_true(m->n < 16);
        i = m->n++;
        snprintf(m->fields[i], sizeof(m->fields[i]), "%s", f);
    } else {
        free(m->vals[i]);
    }
    m->vals[i] = xstrdup(v);
}

static void bulk(buf_t *out, const char *s)
{
    buf_printf(out, "$%zu\r\n%s\r\n", strlen(s), s);
}

static void model_eval(void *arg, int argc, char **argv, buf_t *out)
{
    model_t *m = arg;
    assert_true(argc >= 5);
    assert_string_equal(argv[2], "2");
    assert_string_equal(argv[3], "mp:act");
    assert_string_equal(argv[4], "mp:act@v");
    if (strcmp(argv[1], ACTIONS_WRITE_SCRIPT) == 0) {
        m->writes++;
        assert_true((argc - 5) % 2 == 0 && argc > 5);
        m->last_write[0] = '\0';
        int changed = 0;
        for (int i = 5; i + 1 < argc; i += 2) {
            if (strcmp(argv[i], "-") == 0) {
                int k = model_find(m, argv[i + 1]);
                if (k >= 0) {
                    model_del(m, k);
                    changed++;
                }
                strcat(m->last_write, "-");
                strcat(m->last_write, argv[i + 1]);
            } else {
                assert_string_equal(argv[i], "+");
                json_error_t e;
                json_t *o = json_loads(argv[i + 1], 0, &e);
                assert_non_null(o);
                const char *id = json_string_value(json_object_get(o, "id"));
                assert_non_null(id);
                model_set(m, id, argv[i + 1]);
                changed++;
                strcat(m->last_write, "+");
                strcat(m->last_write, id);
                json_decref(o);
            }
            strcat(m->last_write, " ");
        }
        if (changed)
            m->version++;
        buf_printf(out, "*2\r\n:%lld\r\n:%d\r\n", m->version, changed);
        return;
    }
    assert_string_equal(argv[1], ACTIONS_POLL_SCRIPT);
    assert_int_equal(argc, 6);
    m->polls++;
    char v[32];
    snprintf(v, sizeof(v), "%lld", m->version);
    if (strcmp(argv[5], v) == 0) {
        buf_puts(out, "*1\r\n");
        bulk(out, v);
        return;
    }
    m->full_polls++;
    int extra = m->corrupt ? 2 : 0;
    buf_printf(out, "*2\r\n");
    bulk(out, v);
    buf_printf(out, "*%d\r\n", 2 * (m->n + extra));
    for (int i = 0; i < m->n; i++) {
        bulk(out, m->fields[i]);
        bulk(out, m->vals[i]);
    }
    if (m->corrupt) {
        bulk(out, "junk");
        bulk(out, "{not json");
        bulk(out, "wrong-name"); /* a valid action stored under another id */
        bulk(out, m->n > 0 ? m->vals[0] : "{}");
    }
}

static void model_fini(model_t *m)
{
    for (int i = 0; i < m->n; i++)
        free(m->vals[i]);
    m->n = 0;
}

typedef struct fix {
    loop_t      *l;
    fakeredis_t *f;
    rclient_t   *c1, *c2;
    actions_t   *t1, *t2;
    rep_t        r1, r2;
    model_t      m;
} fix_t;

static fix_t *fix_new(void)
{
    fix_t *x = xcalloc(1, sizeof(*x));
    x->l = loop_new();
    x->f = fakeredis_new(x->l);
    x->f->eval_hook = model_eval;
    x->f->eval_arg = &x->m;
    rclient_config_t rc = { .host = "127.0.0.1", .port = x->f->port, .timeout_ms = 200 };
    x->c1 = rclient_new(x->l, &rc);
    x->c2 = rclient_new(x->l, &rc);
    actions_config_t cfg = { .poll_ms = 50 };
    x->t1 = actions_new(x->l, x->c1, &cfg, on_changed, &x->r1);
    x->t2 = actions_new(x->l, x->c2, &cfg, on_changed, &x->r2);
    return x;
}

static void fix_free(fix_t *x)
{
    actions_free(x->t1);
    actions_free(x->t2);
    rclient_free(x->c1);
    rclient_free(x->c2);
    fakeredis_free(x->f);
    assert_int_equal(loop_fd_count(x->l), 0);
    assert_int_equal(loop_timer_count(x->l), 0);
    loop_free(x->l);
    model_fini(&x->m);
    free(x);
}

static int count_of(const char *logs, const char *what)
{
    int n = 0;
    for (const char *p = logs; (p = strstr(p, what)) != NULL; p++)
        n++;
    return n;
}

static void test_redis_share(void **state)
{
    fix_t *x = fix_new();
    actions_stats_t st;
    actions_get_stats(x->t1, &st);
    assert_int_equal(st.fallback, 1); /* until the first answer */
    run_for(x->l, 80);
    actions_get_stats(x->t1, &st);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(x->m.writes, 0);
    int polls = x->m.polls, full = x->m.full_polls;
    assert_true(polls >= 2);
    assert_int_equal(full, 2); /* one each: the version is known after */

    uint64_t now = util_wall_ms();
    action_t a = mk(ACTION_SUSPEND, SEL_SITE, "yahoo.com", "", now + 60000);
    assert_int_equal(add(&x->r1, x->t1, &a), 0);
    a.expires_ms = now + 61000; /* folded into the same op: the first is in flight */
    assert_int_equal(add(&x->r1, x->t1, &a), 0);
    a.expires_ms = now + 62000;
    assert_int_equal(add(&x->r1, x->t1, &a), 0);
    action_t b = mk(ACTION_RATE, SEL_DOMAIN, "aol.com", "ip-1", now + 60000);
    assert_int_equal(add(&x->r1, x->t1, &b), 0);
    assert_int_equal(actions_remove(x->t1, "gone"), 0);
    action_query_t q = { .site = "yahoo.com", .domain = "aol.com", .source = "ip-1" };
    assert_non_null(actions_find(x->t1, ACTION_SUSPEND, &q)); /* at once, locally */
    assert_null(actions_find(x->t2, ACTION_SUSPEND, &q));
    uint64_t end = util_mono_ms() + 1000;
    while (actions_count(x->t2) < 2 && util_mono_ms() < end)
        loop_run_once(x->l, 5);
    assert_int_equal(actions_count(x->t2), 2);
    assert_int_equal(x->m.writes, 2);
    assert_string_equal(x->m.last_write, "+suspend:site:yahoo.com +rate:domain:aol.com@ip-1 -gone ");
    assert_int_equal(x->m.n, 2);
    const action_t *f = actions_find(x->t2, ACTION_SUSPEND, &q);
    assert_non_null(f);
    assert_int_equal(f->expires_ms, now + 62000);
    assert_string_equal(f->reason, "421 4.7.0 [TS01] temporarily deferred");
    f = actions_find(x->t2, ACTION_RATE, &q);
    assert_non_null(f);
    assert_true(f->rate_per_s == 1);
    actions_get_stats(x->t2, &st);
    assert_int_equal(st.from_redis, 2);
    actions_get_stats(x->t1, &st);
    assert_int_equal(st.from_redis, 0); /* its own: not learned */

    /* quiet: polls go on, the hash is read no more (within 10 s) */
    run_for(x->l, 100);
    int c1 = x->r1.calls, c2 = x->r2.calls;
    full = x->m.full_polls;
    polls = x->m.polls;
    run_for(x->l, 300);
    assert_true(x->m.polls - polls >= 4); /* about 12: two tables every 50 ms */
    assert_int_equal(x->m.full_polls, full);
    assert_int_equal(x->r1.calls, c1);
    assert_int_equal(x->r2.calls, c2);

    /* removed on t2: gone from t1 by its next poll */
    assert_int_equal(actions_remove(x->t2, "suspend:site:yahoo.com"), 0);
    end = util_mono_ms() + 1000;
    while (actions_count(x->t1) != 1 && util_mono_ms() < end)
        loop_run_once(x->l, 5);
    assert_null(actions_find(x->t1, ACTION_SUSPEND, &q));
    assert_int_equal(actions_count(x->t1), 1);
    assert_int_equal(x->r1.calls, c1 + 1);

    /* corrupt fields: skipped, counted on every read, one warn */
    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    uint64_t corrupt0 = metrics_counter(MET_SHAPING_ACTIONS_CORRUPT);
    x->m.corrupt = 1;
    x->m.version++;
    run_for(x->l, 150);
    x->m.version++;
    run_for(x->l, 150);
    char logs[4096];
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    actions_get_stats(x->t1, &st);
    assert_int_equal(st.corrupt, 4);
    assert_int_equal(st.active, 1);
    assert_int_equal(metrics_counter(MET_SHAPING_ACTIONS_CORRUPT) - corrupt0, 8);
    assert_non_null(strstr(logs, "event=corrupt key=mp:act skipped=2"));
    assert_int_equal(count_of(logs, "event=corrupt"), 2); /* one per table */
    assert_int_equal(x->r1.calls, c1 + 1); /* nothing in force changed */
    fix_free(x);
}

static void test_redis_fallback(void **state)
{
    fix_t *x = fix_new();
    run_for(x->l, 80);
    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    x->f->mute = 1; /* Redis stops answering: the client times out after 200 ms */
    uint64_t now = util_wall_ms();
    action_t a = mk(ACTION_BOUNCE, SEL_TENANT, "spammer", "", now + 60000);
    assert_int_equal(add(&x->r1, x->t1, &a), 0);
    run_for(x->l, 600);
    actions_stats_t st1, st2;
    actions_get_stats(x->t1, &st1);
    actions_get_stats(x->t2, &st2);
    assert_int_equal(st1.fallback, 1);
    assert_int_equal(st2.fallback, 1);
    assert_true(st1.redis_errors >= 2); /* the write and a poll at least */
    action_query_t q = { .tenant = "spammer" };
    assert_non_null(actions_find(x->t1, ACTION_BOUNCE, &q)); /* the local add stays */
    assert_null(actions_find(x->t2, ACTION_BOUNCE, &q));
    int writes = x->m.writes;
    assert_true(writes >= 2); /* sent again on a poll tick after its timeout */
    fakeredis_unmute(x->f);
    uint64_t end = util_mono_ms() + 2000;
    while (actions_count(x->t2) < 1 && util_mono_ms() < end)
        loop_run_once(x->l, 5);
    run_for(x->l, 100);
    assert_non_null(actions_find(x->t2, ACTION_BOUNCE, &q));
    assert_non_null(actions_find(x->t1, ACTION_BOUNCE, &q));
    actions_get_stats(x->t1, &st1);
    actions_get_stats(x->t2, &st2);
    assert_int_equal(st1.fallback, 0);
    assert_int_equal(st2.fallback, 0);
    char logs[8192];
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    assert_int_equal(count_of(logs, "event=fallback"), 2); /* one per table */
    assert_int_equal(count_of(logs, "event=redis_back"), 2);
    assert_int_equal(count_of(logs, "event=write_failed"), 1);
    assert_int_equal(count_of(logs, "event=written"), 1);
    fix_free(x);
}

static void test_redis_write_retried(void **state)
{
    fix_t *x = fix_new();
    run_for(x->l, 80);
    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    x->f->fail_only = "mp:act@v + {"; /* writes refused (an error reply), polls answered */
    x->f->fail_next = 3;
    uint64_t now = util_wall_ms();
    action_t a = mk(ACTION_CONNECTIONS, SEL_SITE, "outlook.com", "", now + 60000);
    a.connections = 3;
    assert_int_equal(add(&x->r1, x->t1, &a), 0);
    action_t b = mk(ACTION_SUSPEND, SEL_SITE, "outlook.com", "", now + 60000);
    assert_int_equal(add(&x->r1, x->t1, &b), 0);
    run_for(x->l, 30);
    action_query_t q = { .site = "outlook.com" };
    assert_null(actions_find(x->t2, ACTION_CONNECTIONS, &q));
    /* the polls answered meanwhile replaced nothing of the local adds */
    assert_int_equal(actions_find(x->t1, ACTION_CONNECTIONS, &q)->connections, 3);
    assert_non_null(actions_find(x->t1, ACTION_SUSPEND, &q));
    uint64_t end = util_mono_ms() + 2000;
    while (actions_count(x->t2) < 2 && util_mono_ms() < end)
        loop_run_once(x->l, 5);
    assert_int_equal(actions_count(x->t2), 2);
    assert_int_equal(actions_find(x->t2, ACTION_CONNECTIONS, &q)->connections, 3);
    assert_int_equal(x->f->fail_next, 0);
    assert_int_equal(x->m.writes, 1); /* the model saw only the one that got through */
    assert_string_equal(x->m.last_write, "+connection_limit:site:outlook.com +suspend:site:outlook.com ");
    actions_stats_t st;
    actions_get_stats(x->t1, &st);
    assert_int_equal(st.redis_errors, 3);
    assert_int_equal(st.fallback, 0);
    char logs[8192];
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    assert_int_equal(count_of(logs, "event=write_failed"), 1);
    assert_int_equal(count_of(logs, "event=written"), 1);
    assert_int_equal(count_of(logs, "event=fallback"), 0);
    fix_free(x);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_find_each_selector),
        cmocka_unit_test(test_many),
        cmocka_unit_test(test_source_qualification),
        cmocka_unit_test(test_most_restrictive),
        cmocka_unit_test(test_merge_by_id),
        cmocka_unit_test(test_expiry_injected_clock),
        cmocka_unit_test(test_expiry_real_clock),
        cmocka_unit_test(test_remove),
        cmocka_unit_test(test_list_and_callbacks),
        cmocka_unit_test(test_logs_and_metrics),
        cmocka_unit_test(test_redis_share),
        cmocka_unit_test(test_redis_fallback),
        cmocka_unit_test(test_redis_write_retried),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

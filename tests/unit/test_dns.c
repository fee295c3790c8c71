/*
 * SUMMARY
 *  tests/unit/test_dns.c - dns/ without the network.
 * DESCRIPTION
 *  The pure functions (status texts and permanence, c-ares status mapping,
 *  name syntax, MX ordering) are checked from tables. The resolver itself
 *  runs against the mock DNS server of tests/support/fakedns.h: a UDP
 *  socket on 127.0.0.1 served from the same loop, answering from the small
 *  table-driven zone below, so every outcome (null MX, implicit MX, NXDOMAIN,
 *  SERVFAIL, timeouts, partial host failures) is deterministic. Also:
 *  teardown with queries outstanding towards a closed port, cancel,
 *  re-entrant use from callbacks, and injected allocation failures.
 *  Every resolver test ends with the loop empty (no fd, no timer).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <ares.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "core/loop.h"
#include "core/util.h"
#include "dns/mx.h"
#include "dns/resolver.h"
#include "tests/support/fakedns.h"

/* ---- pure functions ---- */

static void test_strerror_permanent(void **state)
{
    static const struct {
        int status;
        int permanent;
    } cases[] = {
        { DNS_OK, 0 },           { DNS_ENOMEM, 0 },  { DNS_NXDOMAIN, 1 },
        { DNS_NULLMX, 1 },       { DNS_NOADDR, 1 },  { DNS_TEMPFAIL, 0 },
        { DNS_TIMEOUT, 0 },      { DNS_EBADNAME, 1 }, { DNS_ECANCELLED, 0 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(dns_status_is_permanent(cases[i].status), cases[i].permanent);
        assert_string_not_equal(dns_strerror(cases[i].status), "unknown dns status");
        for (size_t j = 0; j < i; j++) /* every text distinct */
            assert_string_not_equal(dns_strerror(cases[i].status), dns_strerror(cases[j].status));
    }
    assert_string_equal(dns_strerror(-99), "unknown dns status");
    assert_string_equal(dns_strerror(5), "unknown dns status");
    assert_int_equal(dns_status_is_permanent(-99), 0);
}

static void test_status_from_ares(void **state)
{
    static const struct {
        int ares, dns;
    } cases[] = {
        { ARES_SUCCESS, DNS_OK },          { ARES_ENOTFOUND, DNS_NXDOMAIN },
        { ARES_ENODATA, DNS_NOADDR },      { ARES_ESERVFAIL, DNS_TEMPFAIL },
        { ARES_EREFUSED, DNS_TEMPFAIL },   { ARES_ECONNREFUSED, DNS_TEMPFAIL },
        { ARES_EFORMERR, DNS_TEMPFAIL },   { ARES_ENOTIMP, DNS_TEMPFAIL },
        { ARES_EBADRESP, DNS_TEMPFAIL },   { ARES_ETIMEOUT, DNS_TIMEOUT },
        { ARES_ENOMEM, DNS_ENOMEM },       { ARES_EBADNAME, DNS_EBADNAME },
        { ARES_ECANCELLED, DNS_ECANCELLED }, { ARES_EDESTRUCTION, DNS_ECANCELLED },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        assert_int_equal(dns_status_from_ares(cases[i].ares), cases[i].dns);
}

static void test_name_check(void **state)
{
    char l63[64], l64[65], n253[254], n254[255], n253dot[255];
    memset(l63, 'a', 63);
    l63[63] = '\0';
    memset(l64, 'a', 64);
    l64[64] = '\0';
    /* 4 labels of 63 + 3 dots = 255; trim to 253 and 254 */
    for (size_t i = 0; i < 254; i++)
        n254[i] = (i % 64 == 63) ? '.' : 'a';
    n254[254] = '\0';
    memcpy(n253, n254, 253);
    n253[253] = '\0';
    memcpy(n253dot, n253, 253);
    n253dot[253] = '.';
    n253dot[254] = '\0';

    static const struct {
        const char *name;
        size_t len;
    } cases[] = {
        { "example.com", 11 },     { "example.com.", 11 },   { "EXAMPLE.Com", 11 },
        { "a-b.c0m", 7 },          { "xn--bcher-kva.example", 21 }, { "localhost", 9 },
        { "1.2.3.example", 13 },   { "test.example", 12 },   { "a.b.c.d.e", 9 },
        { "", 0 },                 { ".", 0 },               { "..", 0 },
        { "example..com", 0 },     { ".example.com", 0 },    { "example.com..", 0 },
        { "-example.com", 0 },     { "example-.com", 0 },    { "ex ample.com", 0 },
        { "ex_ample.com", 0 },     { "example.com/x", 0 },   { "[192.0.2.1]", 0 },
        { "192.0.2.1", 0 },        { "192.0.2.1.", 0 },      { "exa\xc3\xa9mple.com", 0 },
        { "example.123", 0 },      { "a.-b.com", 0 },        { "a.b-.com", 0 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t got = dns_name_check(cases[i].name);
        if (got != cases[i].len)
            fail_msg("dns_name_check(\"%s\") = %zu, want %zu", cases[i].name, got, cases[i].len);
    }
    assert_int_equal(dns_name_check(NULL), 0);
    assert_int_equal(dns_name_check(l63), 63);
    assert_int_equal(dns_name_check(l64), 0);
    assert_int_equal(dns_name_check(n253), 253);
    assert_int_equal(dns_name_check(n253dot), 253);
    assert_int_equal(dns_name_check(n254), 0);
}

static int perm_index(const dns_mx_host_t *h, size_t from)
{
    /* the permutation of names "a","b","c" at h[from..from+2] as 0..5 */
    static const char *perms[6] = { "abc", "acb", "bac", "bca", "cab", "cba" };
    char s[4] = { h[from].name[0], h[from + 1].name[0], h[from + 2].name[0], '\0' };
    for (int i = 0; i < 6; i++)
        if (strcmp(perms[i], s) == 0)
            return i;
    return -1;
}

static void test_sort_mx(void **state)
{
    static const dns_mx_host_t input[] = {
        { .name = "z", .pref = 30 }, { .name = "a", .pref = 20 }, { .name = "y", .pref = 5 },
        { .name = "b", .pref = 20 }, { .name = "x", .pref = 65535 }, { .name = "c", .pref = 20 },
    };
    enum { N = sizeof(input) / sizeof(input[0]) };
    unsigned seen[6] = { 0 };
    for (uint64_t seed = 0; seed < 1200; seed++) {
        dns_mx_host_t h[N];
        memcpy(h, input, sizeof(h));
        dns_sort_mx(h, N, seed);
        assert_string_equal(h[0].name, "y");
        for (size_t i = 1; i < N; i++)
            assert_true(h[i - 1].pref <= h[i].pref);
        assert_string_equal(h[4].name, "z");
        assert_string_equal(h[5].name, "x");
        int p = perm_index(h, 1);
        assert_true(p >= 0); /* a, b, c each exactly once */
        seen[p]++;

        dns_mx_host_t again[N];
        memcpy(again, input, sizeof(again));
        dns_sort_mx(again, N, seed);
        for (size_t i = 0; i < N; i++) /* deterministic per seed */
            assert_ptr_equal(again[i].name, h[i].name);
    }
    /* uniform: 200 expected per permutation; allow wide slack */
    for (int i = 0; i < 6; i++)
        if (seen[i] < 120 || seen[i] > 280)
            fail_msg("permutation %d seen %u times of 1200", i, seen[i]);

    dns_sort_mx(NULL, 0, 1); /* harmless */
    dns_mx_host_t one = { .name = "only", .pref = 7 };
    dns_sort_mx(&one, 1, 1);
    assert_string_equal(one.name, "only");
}

/* ---- the mock DNS server's zone (tests/support/fakedns.h) ---- */

static const fakedns_rr_t mock_zone[] = {
    { "a.test", T_MX, 0, 60, 10, "mx1.a.test", 0 },
    { "a.test", T_MX, 0, 60, 20, "mx2.a.test", 0 },
    { "a.test", T_MX, 0, 60, 20, "mx3.a.test", 0 },
    { "mx1.a.test", T_A, 0, 60, 0, "192.0.2.1", 0 },
    { "mx1.a.test", T_AAAA, 0, 60, 0, "2001:db8::1", 0 },
    { "mx2.a.test", T_A, 0, 60, 0, "192.0.2.2", 0 },
    { "mx2.a.test", T_A, 0, 60, 0, "192.0.2.22", 0 },
    { "mx3.a.test", T_A, 0, 60, 0, "192.0.2.3", 0 },
    { "nomx.test", T_A, 0, 60, 0, "192.0.2.9", 0 },
    { "nomx6.test", T_AAAA, 0, 60, 0, "2001:db8::9", 0 },
    { "null.test", T_MX, 0, 60, 0, "", 0 },
    { "mixnull.test", T_MX, 0, 60, 0, "", 0 },
    { "mixnull.test", T_MX, 0, 60, 10, "mx3.a.test", 0 },
    { "rootpref.test", T_MX, 0, 60, 10, "", 0 },
    { "nx.test", 0, ns_r_nxdomain, 0, 0, NULL, 0 },
    { "fail.test", 0, ns_r_servfail, 0, 0, NULL, 0 },
    { "drop.test", 0, FAKEDNS_DROP, 0, 0, NULL, 0 },
    { "slow.test", 0, FAKEDNS_DROP, 0, 0, NULL, 0 },
    { "noaddr.test", T_MX, 0, 60, 10, "gone.test", 0 },
    { "noaddr.test", T_MX, 0, 60, 20, "empty.test", 0 },
    { "empty.test", T_TXT, 0, 60, 0, NULL, 0 }, /* exists, without MX or addresses */
    { "bare.test", T_TXT, 0, 60, 0, NULL, 0 },
    { "half.test", T_MX, 0, 60, 10, "slow.test", 0 },
    { "half.test", T_MX, 0, 60, 20, "mx3.a.test", 0 },
    { "allslow.test", T_MX, 0, 60, 10, "slow.test", 0 },
    { "allslow.test", T_MX, 0, 60, 20, "gone.test", 0 },
    { "mxfail.test", T_MX, 0, 60, 10, "fail.test", 0 },
    { "dup.test", T_MX, 0, 60, 10, "mx3.a.test", 0 },
    { "dup.test", T_MX, 0, 60, 20, "MX3.A.TEST", 0 },
};

/* ---- resolver fixtures ---- */

typedef struct got {
    int      calls;
    int      status;
    int      implicit;
    char     text[1024]; /* "pref name addr addr; ..." in result order */
    unsigned prefs[DNS_MAX_HOSTS];
    size_t   nhosts;
} got_t;

static void addr_text(const struct sockaddr_storage *ss, char *out, size_t outlen)
{
    char buf[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        assert_int_equal(ntohs(sin->sin_port), 0);
        inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf));
    } else {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        assert_int_equal(ss->ss_family, AF_INET6);
        assert_int_equal(ntohs(sin6->sin6_port), 0);
        inet_ntop(AF_INET6, &sin6->sin6_addr, buf, sizeof(buf));
    }
    snprintf(out, outlen, "%s", buf);
}

static void on_result(void *arg, const dns_mx_result_t *res)
{
    got_t *g = arg;
    g->calls++;
    g->status = res->status;
    g->implicit = res->implicit;
    g->nhosts = res->nhosts;
    g->text[0] = '\0';
    assert_true(res->status == DNS_OK ? res->nhosts > 0 && res->hosts != NULL : res->nhosts == 0);
    for (size_t i = 0; i < res->nhosts && i < DNS_MAX_HOSTS; i++) {
        const dns_mx_host_t *h = &res->hosts[i];
        size_t len = strlen(g->text);
        g->prefs[i] = h->pref;
        snprintf(g->text + len, sizeof(g->text) - len, "%s%u %s", i ? "; " : "", h->pref, h->name);
        assert_true(h->naddrs > 0);
        for (size_t j = 0; j < h->naddrs; j++) {
            char a[INET6_ADDRSTRLEN];
            addr_text(&h->addrs[j], a, sizeof(a));
            len = strlen(g->text);
            snprintf(g->text + len, sizeof(g->text) - len, " %s", a);
        }
    }
}

/* Run the loop until *flag is set or ms pass. */
static void run_until(loop_t *loop, const int *flag, uint64_t ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (!*flag && util_mono_ms() < end)
        assert_true(loop_run_once(loop, 50) >= 0);
}

/* Run the loop until it holds nothing but keep fds (the mock's), or ms pass. */
static void run_idle(loop_t *loop, size_t keep_fds, uint64_t ms)
{
    uint64_t end = util_mono_ms() + ms;
    while ((loop_fd_count(loop) > keep_fds || loop_timer_count(loop) > 0) && util_mono_ms() < end)
        assert_true(loop_run_once(loop, 50) >= 0);
}

static void assert_loop_empty(loop_t *loop)
{
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
}

typedef struct fixture {
    loop_t         *loop;
    fakedns_t       mock;
    dns_resolver_t *r;
} fixture_t;

static dns_resolver_t *new_resolver(loop_t *loop, const char *servers, unsigned timeout_ms, unsigned tries)
{
    char err[256] = "";
    dns_config_t cfg = { .servers = servers, .timeout_ms = timeout_ms, .tries = tries };
    dns_resolver_t *r = dns_resolver_new(loop, &cfg, err, sizeof(err));
    if (r == NULL)
        fail_msg("dns_resolver_new: %s", err);
    return r;
}

static int setup_mock(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    f->loop = loop_new();
    assert_non_null(f->loop);
    assert_int_equal(fakedns_start(&f->mock, f->loop, mock_zone, sizeof(mock_zone) / sizeof(mock_zone[0])), 0);
    f->r = new_resolver(f->loop, f->mock.addr, 200, 1);
    *state = f;
    return 0;
}

static int teardown_mock(void **state)
{
    fixture_t *f = *state;
    dns_resolver_free(f->r);
    fakedns_stop(&f->mock);
    assert_loop_empty(f->loop);
    loop_free(f->loop);
    free(f);
    return 0;
}

/* ---- resolver against the mock zone ---- */

static void test_mock_zone(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *domain;
        int         status;
        int         implicit;
        const char *text; /* exact, or NULL when equal preferences make it vary */
    } cases[] = {
        { "mx1.a.test", DNS_OK, 1, "0 mx1.a.test 192.0.2.1 2001:db8::1" },
        { "nomx.test", DNS_OK, 1, "0 nomx.test 192.0.2.9" },
        { "nomx.test.", DNS_OK, 1, "0 nomx.test 192.0.2.9" },
        { "NoMx.Test", DNS_OK, 1, "0 nomx.test 192.0.2.9" }, /* names are normalised */
        { "nomx6.test", DNS_OK, 1, "0 nomx6.test 2001:db8::9" },
        { "null.test", DNS_NULLMX, 0, "" },
        { "mixnull.test", DNS_NULLMX, 0, "" },
        { "rootpref.test", DNS_NOADDR, 0, "" },
        { "nx.test", DNS_NXDOMAIN, 0, "" },
        { "unknown.test", DNS_NXDOMAIN, 0, "" },
        { "fail.test", DNS_TEMPFAIL, 0, "" },
        { "drop.test", DNS_TIMEOUT, 0, "" },
        { "noaddr.test", DNS_NOADDR, 0, "" },
        { "bare.test", DNS_NOADDR, 1, "" },
        { "half.test", DNS_OK, 0, "20 mx3.a.test 192.0.2.3" },
        { "allslow.test", DNS_TIMEOUT, 0, "" },
        { "mxfail.test", DNS_TEMPFAIL, 0, "" },
        { "dup.test", DNS_OK, 0, "10 mx3.a.test 192.0.2.3" },
        { "bad_name.test", DNS_EBADNAME, 0, "" },
        { "192.0.2.1", DNS_EBADNAME, 0, "" },
        { "", DNS_EBADNAME, 0, "" },
    };
    enum { N = sizeof(cases) / sizeof(cases[0]) };
    got_t got[N];
    memset(got, 0, sizeof(got));
    /* all at once: the answers interleave in one loop */
    for (size_t i = 0; i < N; i++) {
        uint64_t id = dns_mx_query(f->r, cases[i].domain, on_result, &got[i]);
        assert_int_not_equal(id, 0);
        assert_int_equal(got[i].calls, 0); /* never synchronous */
    }
    run_idle(f->loop, 1, 3000);
    for (size_t i = 0; i < N; i++) {
        if (got[i].calls != 1 || got[i].status != cases[i].status || got[i].implicit != cases[i].implicit ||
            (cases[i].text && strcmp(got[i].text, cases[i].text) != 0))
            fail_msg("%s: calls=%d status=%s implicit=%d hosts \"%s\"; want status=%s implicit=%d \"%s\"",
                     cases[i].domain, got[i].calls, dns_strerror(got[i].status), got[i].implicit,
                     got[i].text, dns_strerror(cases[i].status), cases[i].implicit, cases[i].text);
    }
}

static void test_mock_equal_preference(void **state)
{
    fixture_t *f = *state;
    int orders[2] = { 0, 0 };
    for (int round = 0; round < 40; round++) {
        got_t g = { 0 };
        dns_mx_query(f->r, "a.test", on_result, &g);
        run_until(f->loop, &g.calls, 2000);
        assert_int_equal(g.calls, 1);
        assert_int_equal(g.status, DNS_OK);
        assert_int_equal(g.implicit, 0);
        if (strcmp(g.text, "10 mx1.a.test 192.0.2.1 2001:db8::1; 20 mx2.a.test 192.0.2.2 192.0.2.22; "
                          "20 mx3.a.test 192.0.2.3") == 0)
            orders[0]++;
        else if (strcmp(g.text, "10 mx1.a.test 192.0.2.1 2001:db8::1; 20 mx3.a.test 192.0.2.3; "
                                "20 mx2.a.test 192.0.2.2 192.0.2.22") == 0)
            orders[1]++;
        else
            fail_msg("unexpected result \"%s\"", g.text);
    }
    /* 40 rounds: each order missing has probability 2^-40 */
    assert_true(orders[0] > 0 && orders[1] > 0);
    run_idle(f->loop, 1, 1000);
}

static void test_mock_cancel(void **state)
{
    fixture_t *f = *state;
    got_t cancelled = { 0 }, kept = { 0 }, late = { 0 };
    uint64_t a = dns_mx_query(f->r, "a.test", on_result, &cancelled);
    uint64_t b = dns_mx_query(f->r, "nomx.test", on_result, &kept);
    uint64_t c = dns_mx_query(f->r, "bad..name", on_result, &late);
    assert_true(a != 0 && b != 0 && c != 0 && a != b && b != c && a != c);
    dns_cancel(f->r, a);
    dns_cancel(f->r, c); /* already complete, waiting for the loop */
    dns_cancel(f->r, a); /* twice: harmless */
    dns_cancel(f->r, 999999); /* unknown: harmless */
    run_idle(f->loop, 1, 2000);
    assert_int_equal(cancelled.calls, 0);
    assert_int_equal(late.calls, 0);
    assert_int_equal(kept.calls, 1);
    assert_int_equal(kept.status, DNS_OK);
    dns_cancel(f->r, b); /* finished: harmless */
    assert_int_equal(kept.calls, 1);
}

/* A burst far beyond DNS_MAX_INFLIGHT: handed to the server in slices, so
 * no datagram is dropped in a socket buffer and none is retransmitted
 * (the mock counts exactly one query per lookup), and all are answered.
 * Distinct names (unknown ones: NXDOMAIN) each need their own query; the
 * repeated ones share one resolution per name (single flight). */
static void test_mock_burst(void **state)
{
    fixture_t *f = *state;
    enum { N = 400 };
    got_t *g = calloc(2 * N, sizeof(*g));
    assert_non_null(g);
    for (size_t i = 0; i < N; i++) {
        char name[32];
        snprintf(name, sizeof(name), "nx%zu.test", i);
        dns_mx_query(f->r, name, on_result, &g[2 * i]);
        dns_mx_query(f->r, i % 2 ? "a.test" : "nomx.test", on_result, &g[2 * i + 1]);
    }
    run_idle(f->loop, 1, 5000);
    for (size_t i = 0; i < N; i++) {
        assert_int_equal(g[2 * i].calls, 1);
        assert_int_equal(g[2 * i].status, DNS_NXDOMAIN);
        assert_int_equal(g[2 * i + 1].calls, 1);
        assert_int_equal(g[2 * i + 1].status, DNS_OK);
        assert_int_equal(g[2 * i + 1].nhosts, i % 2 ? 3 : 1);
    }
    /* N NXDOMAIN; a.test: MX + 3 hosts x (A, AAAA); nomx.test: MX, A, AAAA */
    assert_int_equal(f->mock.nqueries, N + 7 + 3);
    free(g);
}

/* A callback that starts a follow-up query and cancels another. */
typedef struct chain {
    dns_resolver_t *r;
    got_t           first, second, victim;
    uint64_t        victim_id;
} chain_t;

static void on_chain(void *arg, const dns_mx_result_t *res)
{
    chain_t *c = arg;
    on_result(&c->first, res);
    dns_mx_query(c->r, "nomx.test", on_result, &c->second);
    assert_int_equal(c->second.calls, 0);
    dns_cancel(c->r, c->victim_id);
}

static void test_mock_reentrant(void **state)
{
    fixture_t *f = *state;
    chain_t c = { .r = f->r };
    dns_mx_query(f->r, "nx.test", on_chain, &c);
    c.victim_id = dns_mx_query(f->r, "drop.test", on_result, &c.victim);
    run_idle(f->loop, 1, 2000);
    assert_int_equal(c.first.calls, 1);
    assert_int_equal(c.first.status, DNS_NXDOMAIN);
    assert_int_equal(c.second.calls, 1);
    assert_int_equal(c.second.status, DNS_OK);
    assert_int_equal(c.victim.calls, 0);
}

/* The n-th allocation of dns/ fails, for every n: each query still
 * completes exactly once, with its answer or DNS_ENOMEM, and nothing leaks
 * (valgrind). */
static void test_mock_alloc_failures(void **state)
{
    fixture_t *f = *state;
    int last_failed = 1;
    long n;
    for (n = 0; n < 400 && last_failed; n++) {
        dns_test_fail_alloc_after(n);
        char err[128];
        dns_config_t cfg = { .servers = f->mock.addr, .timeout_ms = 200, .tries = 1 };
        dns_resolver_t *r = dns_resolver_new(f->loop, &cfg, err, sizeof(err));
        if (r == NULL) {
            assert_string_equal(err, "dns: out of memory");
            last_failed = dns_test_fail_alloc_after(-1) > 0;
            continue;
        }
        got_t g[3];
        memset(g, 0, sizeof(g));
        uint64_t ids[3] = { dns_mx_query(r, "a.test", on_result, &g[0]),
                            dns_mx_query(r, "nomx.test", on_result, &g[1]),
                            dns_mx_query(r, "null.test", on_result, &g[2]) };
        run_idle(f->loop, 1, 2000);
        dns_resolver_free(r);
        last_failed = dns_test_fail_alloc_after(-1) > 0;
        static const int want[3] = { DNS_OK, DNS_OK, DNS_NULLMX };
        for (int i = 0; i < 3; i++) {
            if (ids[i] == 0) { /* the query itself could not be recorded */
                assert_int_equal(g[i].calls, 0);
                continue;
            }
            assert_int_equal(g[i].calls, 1);
            if (g[i].status != want[i] && g[i].status != DNS_ENOMEM)
                fail_msg("alloc fails after %ld: query %d status %s", n, i, dns_strerror(g[i].status));
        }
        assert_int_equal(loop_fd_count(f->loop), 1);
        assert_int_equal(loop_timer_count(f->loop), 0);
    }
    assert_false(last_failed); /* reached a budget where nothing fails */
    assert_true(n > 10);
    print_message("allocation failure injected at each of the first %ld allocations\n", n - 1);
}

/* ---- teardown with an unreachable server ---- */

static void test_free_with_query_outstanding(void **state)
{
    loop_t *loop = loop_new();
    dns_resolver_t *r = new_resolver(loop, "127.0.0.1:9", 500, 2);
    got_t g = { 0 };
    assert_int_not_equal(dns_mx_query(r, "test.example", on_result, &g), 0);
    assert_int_equal(g.calls, 0);
    assert_true(loop_fd_count(loop) + loop_timer_count(loop) > 0);
    /* one iteration: the query is on the wire (or already refused) */
    assert_true(loop_run_once(loop, 0) >= 0);
    dns_resolver_free(r);
    assert_int_equal(g.calls, 1);
    if (g.status != DNS_ECANCELLED && g.status != DNS_TEMPFAIL)
        fail_msg("status %s", dns_strerror(g.status));
    print_message("outstanding query ended with: %s\n", dns_strerror(g.status));
    assert_loop_empty(loop);
    loop_free(loop);
}

static void test_unreachable_server_tempfails(void **state)
{
    loop_t *loop = loop_new();
    dns_resolver_t *r = new_resolver(loop, "127.0.0.1:9", 500, 2);
    got_t g = { 0 };
    dns_mx_query(r, "test.example", on_result, &g);
    run_until(loop, &g.calls, 5000);
    assert_int_equal(g.calls, 1);
    /* the closed port answers ICMP port unreachable: ECONNREFUSED */
    if (g.status != DNS_TEMPFAIL)
        fail_msg("status %s", dns_strerror(g.status));
    run_idle(loop, 0, 1000);
    assert_loop_empty(loop);
    dns_resolver_free(r);
    assert_int_equal(g.calls, 1);
    assert_loop_empty(loop);
    loop_free(loop);
}

/* dns_resolver_free() from inside a callback: the other outstanding
 * queries fire once with ECANCELLED, after the callback returned. */
typedef struct freer {
    dns_resolver_t *r;
    got_t           first, other, bad;
    int             in_cb;
} freer_t;

static void on_free_inside(void *arg, const dns_mx_result_t *res)
{
    freer_t *fr = arg;
    on_result(&fr->first, res);
    fr->in_cb = 1;
    dns_resolver_free(fr->r);
    dns_resolver_free(fr->r); /* still pending: a second call is a no-op */
    assert_int_equal(fr->other.calls, 0); /* not from inside this callback */
    fr->in_cb = 0;
}

static void on_other(void *arg, const dns_mx_result_t *res)
{
    freer_t *fr = arg;
    assert_int_equal(fr->in_cb, 0);
    on_result(&fr->other, res);
}

static void on_bad(void *arg, const dns_mx_result_t *res)
{
    freer_t *fr = arg;
    on_result(&fr->bad, res);
}

static void test_free_inside_callback(void **state)
{
    loop_t *loop = loop_new();
    freer_t fr = { 0 };
    fr.r = new_resolver(loop, "127.0.0.1:9", 500, 2);
    dns_mx_query(fr.r, "bad name", on_free_inside, &fr); /* completes first */
    dns_mx_query(fr.r, "test.example", on_other, &fr);
    dns_mx_query(fr.r, "-bad", on_bad, &fr);
    run_until(loop, &fr.first.calls, 2000);
    assert_int_equal(fr.first.calls, 1);
    assert_int_equal(fr.first.status, DNS_EBADNAME);
    assert_int_equal(fr.other.calls, 1);
    assert_int_equal(fr.other.status, DNS_ECANCELLED);
    assert_int_equal(fr.bad.calls, 1);
    assert_int_equal(fr.bad.status, DNS_ECANCELLED);
    assert_loop_empty(loop);
    loop_free(loop);
}

static void test_new_errors(void **state)
{
    loop_t *loop = loop_new();
    char err[256] = "";
    dns_config_t cfg = { .servers = "not-an-ip:53" };
    assert_null(dns_resolver_new(loop, &cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "not-an-ip:53"));
    assert_null(dns_resolver_new(loop, &cfg, NULL, 0));
    /* defaults, system servers: creating and freeing touches nothing */
    dns_resolver_t *r = dns_resolver_new(loop, NULL, err, sizeof(err));
    assert_non_null(r);
    assert_loop_empty(loop);
    dns_cancel(r, 1);
    dns_resolver_free(r);
    dns_resolver_free(NULL);
    assert_loop_empty(loop);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_strerror_permanent),
        cmocka_unit_test(test_status_from_ares),
        cmocka_unit_test(test_name_check),
        cmocka_unit_test(test_sort_mx),
        cmocka_unit_test_setup_teardown(test_mock_zone, setup_mock, teardown_mock),
        cmocka_unit_test_setup_teardown(test_mock_equal_preference, setup_mock, teardown_mock),
        cmocka_unit_test_setup_teardown(test_mock_burst, setup_mock, teardown_mock),
        cmocka_unit_test_setup_teardown(test_mock_cancel, setup_mock, teardown_mock),
        cmocka_unit_test_setup_teardown(test_mock_reentrant, setup_mock, teardown_mock),
        cmocka_unit_test_setup_teardown(test_mock_alloc_failures, setup_mock, teardown_mock),
        cmocka_unit_test(test_free_with_query_outstanding),
        cmocka_unit_test(test_unreachable_server_tempfails),
        cmocka_unit_test(test_free_inside_callback),
        cmocka_unit_test(test_new_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * SUMMARY
 *  tests/integration/itest_dns.c - dns/ against the local stack's dnsmasq.
 * DESCRIPTION
 *  Reads MP_DNS_SERVER from ${MP_STACK_DIR:-/tmp/mpstack}/env (written by
 *  deploy/local/stack up) and resolves the test zone through the real
 *  resolver in a real loop: two MX, failover order, implicit MX, null MX,
 *  NXDOMAIN, a forwarded name that times out, hundreds of concurrent
 *  queries, cancel, and teardown with queries outstanding. Every test ends
 *  with the loop empty.
 * DIAGNOSTICS
 *  A missing env file or a server that does not answer fails every test
 *  with a message naming `deploy/local/stack up`: an integration test that
 *  skips would hide a broken stack.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/loop.h"
#include "core/util.h"
#include "dns/resolver.h"
#include "tests/support/stackenv.h"

#define STACK_HINT "run `deploy/local/stack up` first"

static char dns_server[128];


typedef struct got {
    int      calls;
    int      status;
    int      implicit;
    char     text[1024]; /* "pref name addr addr; ..." in result order */
    uint64_t at_ms;
} got_t;

static void on_result(void *arg, const dns_mx_result_t *res)
{
    got_t *g = arg;
    g->calls++;
    g->status = res->status;
    g->implicit = res->implicit;
    g->at_ms = util_mono_ms();
    g->text[0] = '\0';
    assert_true(res->status == DNS_OK ? res->nhosts > 0 : res->nhosts == 0);
    for (size_t i = 0; i < res->nhosts; i++) {
        const dns_mx_host_t *h = &res->hosts[i];
        size_t len = strlen(g->text);
        snprintf(g->text + len, sizeof(g->text) - len, "%s%u %s", i ? "; " : "", h->pref, h->name);
        for (size_t j = 0; j < h->naddrs; j++) {
            char a[INET6_ADDRSTRLEN] = "?";
            if (h->addrs[j].ss_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)&h->addrs[j])->sin_addr, a, sizeof(a));
            else if (h->addrs[j].ss_family == AF_INET6)
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&h->addrs[j])->sin6_addr, a, sizeof(a));
            len = strlen(g->text);
            snprintf(g->text + len, sizeof(g->text) - len, " %s", a);
        }
    }
}

/* Run until the loop holds nothing, or ms pass. */
static void run_idle(loop_t *loop, uint64_t ms)
{
    uint64_t end = util_mono_ms() + ms;
    while ((loop_fd_count(loop) > 0 || loop_timer_count(loop) > 0) && util_mono_ms() < end)
        assert_true(loop_run_once(loop, 100) >= 0);
    if (loop_fd_count(loop) > 0 || loop_timer_count(loop) > 0)
        fail_msg("loop not idle after %llu ms: %zu fds, %zu timers", (unsigned long long)ms,
                 loop_fd_count(loop), loop_timer_count(loop));
}

static void assert_loop_empty(loop_t *loop)
{
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
}

typedef struct fixture {
    loop_t         *loop;
    dns_resolver_t *r;
} fixture_t;

static dns_resolver_t *new_resolver(loop_t *loop, unsigned timeout_ms, unsigned tries)
{
    char err[256] = "";
    dns_config_t cfg = { .servers = dns_server, .timeout_ms = timeout_ms, .tries = tries };
    dns_resolver_t *r = dns_resolver_new(loop, &cfg, err, sizeof(err));
    if (r == NULL)
        fail_msg("dns_resolver_new(%s): %s", dns_server, err);
    return r;
}

/* Find the server, and check once that it answers; fail loudly if not. */
static void require_stack(void)
{
    static int checked;
    if (checked)
        return;
    if (stackenv_get("MP_DNS_SERVER", dns_server, sizeof(dns_server)) < 0 || dns_server[0] == '\0')
        fail_msg("MP_DNS_SERVER not found in %s: the local stack is not up; " STACK_HINT,
                 stackenv_path());

    loop_t *loop = loop_new();
    dns_resolver_t *r = new_resolver(loop, 500, 2);
    got_t g = { 0 };
    dns_mx_query(r, "test.example", on_result, &g);
    run_idle(loop, 5000);
    dns_resolver_free(r);
    loop_free(loop);
    if (g.calls != 1 || g.status != DNS_OK)
        fail_msg("DNS server %s (from %s) did not answer MX test.example: %s; " STACK_HINT, dns_server,
                 stackenv_path(), g.calls ? dns_strerror(g.status) : "no callback");
    checked = 1;
}

static int setup(void **state)
{
    require_stack();
    fixture_t *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    f->loop = loop_new();
    assert_non_null(f->loop);
    f->r = new_resolver(f->loop, 2000, 2);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    dns_resolver_free(f->r);
    assert_loop_empty(f->loop);
    loop_free(f->loop);
    free(f);
    return 0;
}

static void expect(const got_t *g, const char *domain, int status, int implicit, const char *text)
{
    if (g->calls != 1 || g->status != status || g->implicit != implicit || strcmp(g->text, text) != 0)
        fail_msg("%s: calls=%d status=%s implicit=%d hosts \"%s\"; want status=%s implicit=%d \"%s\"",
                 domain, g->calls, dns_strerror(g->status), g->implicit, g->text,
                 dns_strerror(status), implicit, text);
}

static const struct {
    const char *domain;
    int         status;
    int         implicit;
    const char *text;
} zone[] = {
    { "test.example", DNS_OK, 0, "10 mx1.test.example 127.0.0.2; 20 mx2.test.example 127.0.0.3" },
    { "failover.test.example", DNS_OK, 0, "10 down.test.example 127.0.0.4; 20 mx2.test.example 127.0.0.3" },
    { "nomx.test.example", DNS_OK, 1, "0 nomx.test.example 127.0.0.2" },
    { "nullmx.test.example", DNS_NULLMX, 0, "" },
    { "nxdomain.test.example", DNS_NXDOMAIN, 0, "" },
    { "Test.Example.", DNS_OK, 0, "10 mx1.test.example 127.0.0.2; 20 mx2.test.example 127.0.0.3" },
    { "not a domain", DNS_EBADNAME, 0, "" },
};
enum { NZONE = sizeof(zone) / sizeof(zone[0]) };

static void test_zone_one_by_one(void **state)
{
    fixture_t *f = *state;
    for (size_t i = 0; i < NZONE; i++) {
        got_t g = { 0 };
        assert_int_not_equal(dns_mx_query(f->r, zone[i].domain, on_result, &g), 0);
        assert_int_equal(g.calls, 0); /* never synchronous */
        run_idle(f->loop, 5000);
        expect(&g, zone[i].domain, zone[i].status, zone[i].implicit, zone[i].text);
        assert_int_equal(dns_status_is_permanent(g.status),
                         zone[i].status == DNS_NULLMX || zone[i].status == DNS_NXDOMAIN ||
                             zone[i].status == DNS_EBADNAME);
    }
}

static void test_timeout(void **state)
{
    loop_t *loop = loop_new();
    dns_resolver_t *r = new_resolver(loop, 300, 2);
    got_t g = { 0 };
    uint64_t start = util_mono_ms();
    dns_mx_query(r, "timeout.test.example", on_result, &g);
    run_idle(loop, 10000);
    expect(&g, "timeout.test.example", DNS_TIMEOUT, 0, "");
    assert_false(dns_status_is_permanent(g.status));
    /* try 1 waits 300 ms, try 2 (second round) 600 ms */
    uint64_t took = g.at_ms - start;
    if (took < 800 || took > 3000)
        fail_msg("timeout after %llu ms, want about 900", (unsigned long long)took);
    dns_resolver_free(r);
    assert_loop_empty(loop);
    loop_free(loop);
}

/* Many queries in flight in one loop, mixed, all answered exactly once. */
static void test_concurrent(void **state)
{
    fixture_t *f = *state;
    enum { NSAME = 200, NMIX = 20 };
    got_t *same = calloc(NSAME, sizeof(*same));
    got_t *mix = calloc(NMIX * NZONE, sizeof(*mix));
    uint64_t *ids = calloc(NSAME + NMIX * NZONE, sizeof(*ids));
    assert_true(same && mix && ids);
    size_t nids = 0;
    for (size_t i = 0; i < NSAME; i++)
        ids[nids++] = dns_mx_query(f->r, "test.example", on_result, &same[i]);
    for (size_t k = 0; k < NMIX; k++)
        for (size_t i = 0; i < NZONE; i++)
            ids[nids++] = dns_mx_query(f->r, zone[i].domain, on_result, &mix[k * NZONE + i]);
    for (size_t i = 0; i < nids; i++) {
        assert_int_not_equal(ids[i], 0);
        for (size_t j = 0; j < i; j++)
            assert_true(ids[i] != ids[j]);
    }
    uint64_t start = util_mono_ms();
    run_idle(f->loop, 20000);
    uint64_t took = util_mono_ms() - start;
    for (size_t i = 0; i < NSAME; i++)
        expect(&same[i], "test.example", DNS_OK, 0, zone[0].text);
    for (size_t k = 0; k < NMIX; k++)
        for (size_t i = 0; i < NZONE; i++)
            expect(&mix[k * NZONE + i], zone[i].domain, zone[i].status, zone[i].implicit, zone[i].text);
    print_message("%zu concurrent MX queries answered in %llu ms\n", nids, (unsigned long long)took);
    free(same);
    free(mix);
    free(ids);
}

static void test_cancel(void **state)
{
    fixture_t *f = *state;
    enum { N = 40 };
    got_t g[N];
    uint64_t ids[N];
    memset(g, 0, sizeof(g));
    for (size_t i = 0; i < N; i++)
        ids[i] = dns_mx_query(f->r, zone[i % NZONE].domain, on_result, &g[i]);
    for (size_t i = 0; i < N; i += 2)
        dns_cancel(f->r, ids[i]);
    /* a slow one too: its lookup keeps running inside c-ares after the
     * cancel, and the loop must still go idle once c-ares gives up */
    loop_t *loop = loop_new();
    dns_resolver_t *r = new_resolver(loop, 300, 1);
    got_t slow = { 0 };
    dns_cancel(r, dns_mx_query(r, "timeout.test.example", on_result, &slow));

    run_idle(f->loop, 5000);
    for (size_t i = 0; i < N; i++) {
        if (i % 2 == 0)
            assert_int_equal(g[i].calls, 0);
        else
            expect(&g[i], zone[i % NZONE].domain, zone[i % NZONE].status, zone[i % NZONE].implicit,
                   zone[i % NZONE].text);
    }
    for (size_t i = 0; i < N; i++)
        dns_cancel(f->r, ids[i]); /* all finished or gone: harmless */

    run_idle(loop, 5000);
    assert_int_equal(slow.calls, 0);
    dns_resolver_free(r);
    assert_int_equal(slow.calls, 0);
    assert_loop_empty(loop);
    loop_free(loop);
}

/* Freed with queries in flight: each callback fires once, ECANCELLED. */
static void test_free_outstanding(void **state)
{
    loop_t *loop = loop_new();
    dns_resolver_t *r = new_resolver(loop, 2000, 2);
    got_t g[3];
    memset(g, 0, sizeof(g));
    dns_mx_query(r, "timeout.test.example", on_result, &g[0]);
    dns_mx_query(r, "test.example", on_result, &g[1]);
    dns_mx_query(r, "failover.test.example", on_result, &g[2]);
    /* let some lookups get under way: at most one loop iteration */
    assert_true(loop_run_once(loop, 0) >= 0);
    dns_resolver_free(r);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(g[i].calls, 1);
        assert_true(g[i].status == DNS_ECANCELLED || g[i].status == DNS_OK);
    }
    assert_int_equal(g[0].status, DNS_ECANCELLED);
    assert_loop_empty(loop);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_zone_one_by_one, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_outstanding, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * SUMMARY
 *  tests/integration/itest_dns_cache.c - the DNS caches against the
 *  stack's dnsmasq and Redis, and against a private Redis.
 * DESCRIPTION
 *  - the test zone through L1 and L2: two preferences, implicit MX, null
 *    MX, NXDOMAIN, a timeout (never cached), each answer's layer and TTL;
 *  - the additional section dnsmasq sends with MX answers saves the A
 *    lookups;
 *  - TTL expiry observed in real time with max_ttl_s = 1;
 *  - two resolvers (two workers) share an L2 entry in the stack's Redis
 *    (keys under a random prefix, so runs and other users never meet);
 *  - Redis stopped mid-run: this test starts its OWN redis-server on a
 *    free port (the stack's Redis is shared and never touched), stops it
 *    by pid, checks lookups go on over DNS without delay, restarts it on
 *    the same port and checks L2 is used again.
 *  - CNAME chains against a real dnsmasq: the stack's zone has none, so
 *    this test starts its OWN dnsmasq (127.0.0.155, a free port) with a
 *    few CNAMEs, and stops it by pid.
 * DIAGNOSTICS
 *  A stack that is down fails every test naming `deploy/local/stack up`.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "dns/resolver.h"
#include "tests/support/stackenv.h"

#define STACK_HINT "run `deploy/local/stack up` first"

static char dns_server[128];
static char redis_host[64];
static unsigned redis_port;
static char prefix[64];

typedef struct got {
    int      calls, status, implicit, layer;
    unsigned ttl;
    char     text[512];
    uint64_t ms;
} got_t;

static void on_result(void *arg, const dns_mx_result_t *res)
{
    got_t *g = arg;
    g->calls++;
    g->status = res->status;
    g->implicit = res->implicit;
    g->layer = res->layer;
    g->ttl = res->ttl_s;
    g->text[0] = '\0';
    for (size_t i = 0; i < res->nhosts; i++) {
        const dns_mx_host_t *h = &res->hosts[i];
        size_t len = strlen(g->text);
        snprintf(g->text + len, sizeof(g->text) - len, "%s%u %s", i ? "; " : "", h->pref, h->name);
        for (size_t j = 0; j < h->naddrs; j++) {
            char a[INET6_ADDRSTRLEN] = "?";
            if (h->addrs[j].ss_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)&h->addrs[j])->sin_addr, a, sizeof(a));
            len = strlen(g->text);
            snprintf(g->text + len, sizeof(g->text) - len, " %s", a);
        }
    }
}

static got_t ask(loop_t *l, dns_resolver_t *r, const char *domain)
{
    got_t g;
    memset(&g, 0, sizeof(g));
    uint64_t t0 = util_mono_ms();
    dns_mx_query(r, domain, on_result, &g);
    uint64_t end = t0 + 10000;
    while (!g.calls && util_mono_ms() < end)
        loop_run_once(l, 20);
    g.ms = util_mono_ms() - t0;
    if (g.calls != 1)
        fail_msg("%s: no answer: " STACK_HINT, domain);
    return g;
}

static rclient_t *redis_client(loop_t *l, const char *host, unsigned port, int must)
{
    rclient_config_t cfg = { .host = host, .port = port, .timeout_ms = 50, .reconnect_max_ms = 200 };
    rclient_t *c = rclient_new(l, &cfg);
    uint64_t end = util_mono_ms() + 2000;
    while (!rclient_connected(c) && util_mono_ms() < end)
        loop_run_once(l, 10);
    if (must && !rclient_connected(c))
        fail_msg("no Redis at %s:%u", host, port);
    return c;
}

static dns_resolver_t *resolver(loop_t *l, rclient_t *rc, unsigned max_ttl)
{
    char err[256];
    dns_config_t cfg = { .servers = dns_server, .timeout_ms = 300, .tries = 1, .max_ttl_s = max_ttl,
                         .redis = rc, .l2_prefix = prefix };
    dns_resolver_t *r = dns_resolver_new(l, &cfg, err, sizeof(err));
    if (r == NULL)
        fail_msg("dns_resolver_new: %s", err);
    return r;
}

/* Let the fire-and-forget Redis writes finish. */
static void settle(loop_t *l, dns_resolver_t *r)
{
    dns_stats_t st;
    uint64_t end = util_mono_ms() + 2000;
    do {
        loop_run_once(l, 5);
        dns_resolver_stats(r, &st);
    } while (st.l2_inflight > 0 && util_mono_ms() < end);
}

static void assert_empty(loop_t *l)
{
    assert_int_equal(loop_fd_count(l), 0);
    assert_int_equal(loop_timer_count(l), 0);
}

/* Each test its own key space in the shared Redis. */
static void new_prefix(void)
{
    snprintf(prefix, sizeof(prefix), "mp:itest:dns:%016llx:", (unsigned long long)util_rand64());
}

static int setup(void **state)
{
    char port[16];
    if (stackenv_get("MP_DNS_SERVER", dns_server, sizeof(dns_server)) < 0 ||
        stackenv_get("MP_REDIS_HOST", redis_host, sizeof(redis_host)) < 0 ||
        stackenv_get("MP_REDIS_PORT", port, sizeof(port)) < 0) {
        fprintf(stderr, "missing %s: " STACK_HINT "\n", stackenv_path());
        return -1;
    }
    redis_port = (unsigned)atoi(port);
    return 0;
}

static void test_zone_through_the_layers(void **state)
{
    new_prefix();
    loop_t *l = loop_new();
    rclient_t *rc = redis_client(l, redis_host, redis_port, 1);
    dns_resolver_t *r = resolver(l, rc, 0);
    static const struct {
        const char *domain;
        int         status, implicit;
        const char *text;
    } cases[] = {
        { "test.example", DNS_OK, 0, "10 mx1.test.example 127.0.0.2; 20 mx2.test.example 127.0.0.3" },
        { "nomx.test.example", DNS_OK, 1, "0 nomx.test.example 127.0.0.2" },
        { "nullmx.test.example", DNS_NULLMX, 0, "" },
        { "nosuchname.test.example", DNS_NXDOMAIN, 0, "" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int round = 0; round < 2; round++) {
            got_t g = ask(l, r, cases[i].domain);
            if (g.status != cases[i].status || g.implicit != cases[i].implicit ||
                strcmp(g.text, cases[i].text) != 0)
                fail_msg("%s: status=%s implicit=%d \"%s\"", cases[i].domain, dns_strerror(g.status),
                         g.implicit, g.text);
            /* first from DNS (dnsmasq's local-ttl is 60 s), then from L1 */
            assert_int_equal(g.layer, round == 0 ? DNS_LAYER_DNS : DNS_LAYER_L1);
            assert_true(g.ttl >= 59 && g.ttl <= 60);
        }
    }
    /* a timeout is never cached */
    got_t g = ask(l, r, "x.timeout.test.example");
    assert_int_equal(g.status, DNS_TIMEOUT);
    assert_int_equal(g.ttl, 0);
    assert_int_equal(ask(l, r, "x.timeout.test.example").layer, DNS_LAYER_DNS);
    dns_stats_t st;
    dns_resolver_stats(r, &st);
    /* dnsmasq sends the MX hosts' A records as additional data */
    assert_true(st.additional >= 2);
    settle(l, r);
    dns_resolver_free(r);
    rclient_free(rc);
    assert_empty(l);
    loop_free(l);
}

static void test_ttl_expiry_observed(void **state)
{
    loop_t *l = loop_new();
    dns_resolver_t *r = resolver(l, NULL, 1); /* answers live 1 s */
    got_t g = ask(l, r, "test.example");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_int_equal(g.ttl, 1);
    assert_int_equal(ask(l, r, "test.example").layer, DNS_LAYER_L1);
    usleep(1100 * 1000);
    loop_update_time(l);
    assert_int_equal(ask(l, r, "test.example").layer, DNS_LAYER_DNS);
    dns_resolver_free(r);
    assert_empty(l);
    loop_free(l);
}

static void test_two_workers_share_l2(void **state)
{
    new_prefix();
    loop_t *l = loop_new();
    rclient_t *rc1 = redis_client(l, redis_host, redis_port, 1);
    rclient_t *rc2 = redis_client(l, redis_host, redis_port, 1);
    dns_resolver_t *w1 = resolver(l, rc1, 0), *w2 = resolver(l, rc2, 0);
    got_t a = ask(l, w1, "test.example");
    assert_int_equal(a.layer, DNS_LAYER_DNS);
    settle(l, w1);
    got_t b = ask(l, w2, "test.example");
    assert_int_equal(b.layer, DNS_LAYER_L2);
    assert_int_equal(b.status, DNS_OK);
    assert_string_equal(b.text, "10 mx1.test.example 127.0.0.2; 20 mx2.test.example 127.0.0.3");
    assert_true(b.ttl >= 58 && b.ttl <= 60);
    assert_true(b.ms < 50);
    /* negative answers too */
    assert_int_equal(ask(l, w2, "gone.test.example").layer, DNS_LAYER_DNS);
    settle(l, w2);
    got_t c = ask(l, w1, "gone.test.example");
    assert_int_equal(c.layer, DNS_LAYER_L2);
    assert_int_equal(c.status, DNS_NXDOMAIN);
    dns_stats_t s1, s2;
    dns_resolver_stats(w1, &s1);
    dns_resolver_stats(w2, &s2);
    assert_int_equal(s1.l2_errors + s2.l2_errors, 0);
    dns_resolver_free(w1);
    dns_resolver_free(w2);
    rclient_free(rc1);
    rclient_free(rc2);
    assert_empty(l);
    loop_free(l);
}

/* ---- a private Redis, started and stopped by pid ---- */

static pid_t g_redis_pid = -1; /* stopped by the group teardown if a test fails midway */

static unsigned free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    getsockname(fd, (struct sockaddr *)&a, &al);
    close(fd);
    return ntohs(a.sin_port);
}

static pid_t redis_start(unsigned port)
{
    char p[16];
    snprintf(p, sizeof(p), "%u", port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--daemonize", "no", "--logfile", "/dev/null",
               (char *)NULL);
        _exit(127);
    }
    /* wait until it accepts connections */
    for (int i = 0; i < 200; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        int ok = connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
        close(fd);
        if (ok) {
            g_redis_pid = pid;
            return pid;
        }
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    fail_msg("redis-server did not start on port %u", port);
    return -1;
}

static void redis_stop(pid_t pid)
{
    kill(pid, SIGTERM);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (pid == g_redis_pid)
        g_redis_pid = -1;
}

static pid_t g_dnsmasq_pid = -1;

/* ---- the CLI, as an operator runs it ---- */

/* Run the mailpump binary built next to this test; its stdout+stderr in out. */
static int run_cli(const char *args, char *out, size_t outlen)
{
    char self[512], cmd[1024];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    assert_true(n > 0);
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    *slash = '\0'; /* .../tests */
    snprintf(cmd, sizeof(cmd), "%s/../mailpump %s 2>&1", self, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t got = fread(out, 1, outlen - 1, p);
    out[got] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_cli_resolve_and_prewarm(void **state)
{
    char args[512], out[4096];
    snprintf(args, sizeof(args), "dns resolve --servers %s --no-l2 test.example nullmx.test.example test.example",
             dns_server);
    int rc = run_cli(args, out, sizeof(out));
    print_message("%s", out);
    assert_int_equal(rc, 1); /* the null MX is a failure */
    assert_non_null(strstr(out, "test.example: ok layer=dns ttl=60s\n"
                                "     10 mx1.test.example 127.0.0.2\n"
                                "     20 mx2.test.example 127.0.0.3\n"));
    assert_non_null(strstr(out, "nullmx.test.example: nullmx (domain does not accept mail (null MX), permanent)"));
    assert_non_null(strstr(out, "test.example: ok layer=l1 ttl="));

    /* prewarm into a private Redis, then resolve from it */
    unsigned port = free_port();
    pid_t pid = redis_start(port);
    char list[] = "/tmp/mp-itest-prewarm.XXXXXX";
    int fd = mkstemp(list);
    assert_true(fd >= 0);
    const char *names = "test.example\n# a comment\n\nnomx.test.example\nnullmx.test.example\n";
    assert_int_equal(write(fd, names, strlen(names)), (ssize_t)strlen(names));
    close(fd);
    snprintf(args, sizeof(args), "dns prewarm --servers %s --redis 127.0.0.1:%u %s", dns_server, port, list);
    rc = run_cli(args, out, sizeof(out));
    print_message("%s", out);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(out, "prewarm: 3 resolved (2 ok, 1 permanent failures, 0 transient failures, "
                                "0 already in Redis), 0 in flight"));
    assert_non_null(strstr(out, "prewarm: 3 written to Redis, 0 Redis errors"));
    snprintf(args, sizeof(args), "dns resolve --servers %s --redis 127.0.0.1:%u nomx.test.example", dns_server,
             port);
    rc = run_cli(args, out, sizeof(out));
    assert_int_equal(rc, 0);
    assert_non_null(strstr(out, "nomx.test.example: ok layer=l2 ttl="));
    assert_non_null(strstr(out, "implicit-mx\n      0 nomx.test.example 127.0.0.2\n"));
    unlink(list);
    redis_stop(pid);
}

static int teardown(void **state)
{
    if (g_redis_pid > 0)
        redis_stop(g_redis_pid);
    if (g_dnsmasq_pid > 0) {
        kill(g_dnsmasq_pid, SIGTERM);
        waitpid(g_dnsmasq_pid, NULL, 0);
        g_dnsmasq_pid = -1;
    }
    return 0;
}

static void test_cname_private_dnsmasq(void **state)
{
    /* a free UDP port on 127.0.0.155 */
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    inet_pton(AF_INET, "127.0.0.155", &a.sin_addr);
    socklen_t al = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    getsockname(fd, (struct sockaddr *)&a, &al);
    close(fd);
    unsigned port = ntohs(a.sin_port);

    char dir[] = "/tmp/mp-itest-cname.XXXXXX", conf[128], logf[128];
    assert_non_null(mkdtemp(dir));
    snprintf(conf, sizeof(conf), "%s/dnsmasq.conf", dir);
    snprintf(logf, sizeof(logf), "%s/dnsmasq.log", dir);
    FILE *f = fopen(conf, "w");
    assert_non_null(f);
    fprintf(f, "port=%u\nlisten-address=127.0.0.155\nbind-interfaces\nno-resolv\nno-hosts\nno-poll\n"
               "no-negcache\nuser=root\nlocal-ttl=60\nlocal=/#/\n"
               "host-record=target.cn.test,127.0.0.9\n"
               "cname=alias.cn.test,target.cn.test\n"   /* CNAME to a name without MX */
               "cname=chain.cn.test,alias.cn.test\n"    /* two hops */
               "mx-host=viacname.cn.test,mxcn.cn.test,10\n"
               "cname=mxcn.cn.test,mx.cn.test\n"        /* an MX host behind a CNAME */
               "host-record=mx.cn.test,127.0.0.10\n", port);
    fclose(f);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char cf[160], lf[160];
        snprintf(cf, sizeof(cf), "--conf-file=%s", conf);
        snprintf(lf, sizeof(lf), "--log-facility=%s", logf);
        execlp("dnsmasq", "dnsmasq", "-k", cf, lf, (char *)NULL);
        _exit(127);
    }
    g_dnsmasq_pid = pid;
    char servers[64];
    snprintf(servers, sizeof(servers), "127.0.0.155:%u", port);
    loop_t *l = loop_new();
    char err[256];
    dns_config_t cfg = { .servers = servers, .timeout_ms = 200, .tries = 1 };
    dns_resolver_t *r = dns_resolver_new(l, &cfg, err, sizeof(err));
    assert_non_null(r);
    got_t g;
    for (int i = 0; i < 50; i++) { /* until dnsmasq answers */
        g = ask(l, r, "alias.cn.test");
        if (g.status == DNS_OK)
            break;
        usleep(20000);
    }
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.implicit, 1);
    assert_string_equal(g.text, "0 target.cn.test 127.0.0.9");
    g = ask(l, r, "chain.cn.test");
    assert_int_equal(g.status, DNS_OK);
    assert_string_equal(g.text, "0 target.cn.test 127.0.0.9");
    g = ask(l, r, "viacname.cn.test");
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.implicit, 0);
    assert_string_equal(g.text, "10 mxcn.cn.test 127.0.0.10");
    dns_resolver_free(r);
    assert_empty(l);
    loop_free(l);
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    g_dnsmasq_pid = -1;
    unlink(conf);
    unlink(logf);
    rmdir(dir);
}

static void test_redis_stopped_and_restarted(void **state)
{
    unsigned port = free_port();
    pid_t pid = redis_start(port);
    loop_t *l = loop_new();
    rclient_t *rc = redis_client(l, "127.0.0.1", port, 1);
    dns_resolver_t *w1 = resolver(l, rc, 0), *w2 = resolver(l, rc, 0);

    assert_int_equal(ask(l, w1, "test.example").layer, DNS_LAYER_DNS);
    settle(l, w1);
    assert_int_equal(ask(l, w2, "test.example").layer, DNS_LAYER_L2);

    /* Redis goes away mid-run */
    redis_stop(pid);
    for (int i = 0; i < 20 && rclient_connected(rc); i++)
        loop_run_once(l, 10);
    assert_false(rclient_connected(rc));
    /* lookups keep working, over DNS, without waiting on Redis */
    got_t g = ask(l, w2, "nomx.test.example");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_int_equal(g.status, DNS_OK);
    assert_true(g.ms < 100);
    g = ask(l, w1, "nullmx.test.example");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_int_equal(g.status, DNS_NULLMX);
    /* and L1 still answers what it knows */
    assert_int_equal(ask(l, w1, "test.example").layer, DNS_LAYER_L1);

    /* back on the same port (empty: no persistence) */
    pid = redis_start(port);
    uint64_t end = util_mono_ms() + 3000;
    while (!rclient_connected(rc) && util_mono_ms() < end)
        loop_run_once(l, 10);
    assert_true(rclient_connected(rc));
    assert_int_equal(ask(l, w1, "gone.test.example").layer, DNS_LAYER_DNS);
    settle(l, w1);
    g = ask(l, w2, "gone.test.example");
    assert_int_equal(g.layer, DNS_LAYER_L2); /* L2 used again */
    assert_int_equal(g.status, DNS_NXDOMAIN);

    dns_resolver_free(w1);
    dns_resolver_free(w2);
    rclient_free(rc);
    assert_empty(l);
    loop_free(l);
    redis_stop(pid);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_zone_through_the_layers),
        cmocka_unit_test(test_ttl_expiry_observed),
        cmocka_unit_test(test_two_workers_share_l2),
        cmocka_unit_test(test_redis_stopped_and_restarted),
        cmocka_unit_test(test_cname_private_dnsmasq),
        cmocka_unit_test(test_cli_resolve_and_prewarm),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

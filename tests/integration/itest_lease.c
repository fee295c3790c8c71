/*
 * SUMMARY
 *  tests/integration/itest_lease.c - deliverer/lease against the stack's
 *  Redis.
 * DESCRIPTION
 *  The renewal script driven directly, with exact grants (the example of
 *  lease.h, water filling, the remainder, expiry, release); three tables
 *  on one loop sharing a limit of 10 (the sum of allowances never above
 *  10, then 4+3+3); a holder in a child process killed with SIGKILL (its
 *  share goes to the others once its claim expires, not before); Redis cut
 *  off behind a proxy (fallback share = ceil(limit / holders last seen),
 *  one warn, one info when it answers again) and a port nobody listens on
 *  (ceil(limit / local_holders)); and the time of one renewal of 1,000
 *  sites. Keys use a random prefix and are deleted at the end.
 * DIAGNOSTICS
 *  A stack that is down fails every test naming `deploy/local/stack up`.
 *  Timings are printed ("lease: ...").
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/lease.h"
#include "tests/support/logcapture.h"
#include "tests/support/stackredis.h"

static char redis_host[64];
static unsigned redis_port;
static char prefix[48];

/* ------------------------------------------------------------ helpers */

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* One run of the script for holder over sites[0..n) of prefix p. */
static void script_held(loop_t *l, rclient_t *c, const char *p, const char *holder, unsigned ttl, size_t n,
                        const char *const *sites, const unsigned *limits, const unsigned *wants,
                        const unsigned *helds, sr_rec_t *out)
{
    size_t argc = 6 + 4 * n, a = 0;
    const char **argv = xcalloc(argc, sizeof(char *));
    char **own = xcalloc(3 * n + 3, sizeof(char *));
    size_t o = 0;
    argv[a++] = "EVAL";
    argv[a++] = LEASE_REDIS_SCRIPT;
    own[o] = xmalloc(24);
    snprintf(own[o], 24, "%zu", n + 1);
    argv[a++] = own[o++];
    own[o] = xmalloc(96);
    snprintf(own[o], 96, "%s@holders", p);
    argv[a++] = own[o++];
    for (size_t i = 0; i < n; i++) {
        own[o] = xmalloc(160);
        snprintf(own[o], 160, "%s:%s", p, sites[i]);
        argv[a++] = own[o++];
    }
    own[o] = xmalloc(24);
    snprintf(own[o], 24, "%u", ttl);
    argv[a++] = own[o++];
    argv[a++] = holder;
    char (*num)[16] = xcalloc(3 * n, 16);
    for (size_t i = 0; i < n; i++) {
        snprintf(num[3 * i], 16, "%u", limits[i]);
        snprintf(num[3 * i + 1], 16, "%u", wants[i]);
        snprintf(num[3 * i + 2], 16, "%u", helds ? helds[i] : 0);
        argv[a++] = num[3 * i];
        argv[a++] = num[3 * i + 1];
        argv[a++] = num[3 * i + 2];
    }
    sr_command(l, c, out, (int)a, argv, 3000);
    for (size_t i = 0; i < o; i++)
        free(own[i]);
    free(own);
    free(num);
    free(argv);
}

static void script(loop_t *l, rclient_t *c, const char *p, const char *holder, unsigned ttl, size_t n,
                   const char *const *sites, const unsigned *limits, const unsigned *wants, sr_rec_t *out)
{
    script_held(l, c, p, holder, ttl, n, sites, limits, wants, NULL, out);
}

/* The grant of holder for one site, holding held connections there. */
static long long grant_held(loop_t *l, rclient_t *c, const char *p, const char *holder, const char *site,
                            unsigned limit, unsigned want, unsigned held)
{
    sr_rec_t *r = xcalloc(1, sizeof(*r));
    script_held(l, c, p, holder, 60000, 1, &site, &limit, &want, &held, r);
    assert_int_equal(r->n, 3); /* holders, grant, contended */
    long long g = r->v[1];
    free(r);
    return g;
}

/* The grant of holder for one site, and in *contended the script's flag:
 * another live holder wants more than it claims there. */
static long long grant1f(loop_t *l, rclient_t *c, const char *p, const char *holder, const char *site,
                         unsigned limit, unsigned want, long long *contended)
{
    sr_rec_t *r = xcalloc(1, sizeof(*r));
    script(l, c, p, holder, 60000, 1, &site, &limit, &want, r);
    assert_int_equal(r->n, 3);
    *contended = r->v[2];
    long long g = r->v[1];
    free(r);
    return g;
}

/* The grant of holder for one site (and the registry's count in *holders). */
static long long grant1(loop_t *l, rclient_t *c, const char *p, const char *holder, unsigned ttl,
                        const char *site, unsigned limit, unsigned want, long long *holders)
{
    sr_rec_t *r = xcalloc(1, sizeof(*r));
    script(l, c, p, holder, ttl, 1, &site, &limit, &want, r);
    assert_int_equal(r->n, 3); /* holders, grant, contended */
    if (holders)
        *holders = r->v[0];
    long long g = r->v[1];
    free(r);
    return g;
}

/* Delete the test's keys (their names are known: no KEYS on the shared
 * Redis) and check none is left. */
static void del_sites(loop_t *l, rclient_t *c, const char *p, size_t n, const char *const *sites)
{
    const char **argv = xcalloc(n + 2, sizeof(char *));
    char (*keys)[160] = xcalloc(n + 1, 160);
    argv[0] = "DEL";
    snprintf(keys[0], 160, "%s@holders", p);
    for (size_t i = 0; i < n; i++)
        snprintf(keys[i + 1], 160, "%s:%s", p, sites[i]);
    for (size_t i = 0; i <= n; i++)
        argv[i + 1] = keys[i];
    sr_rec_t *r = xcalloc(1, sizeof(*r));
    sr_command(l, c, r, (int)n + 2, argv, 3000);
    argv[0] = "EXISTS";
    sr_command(l, c, r, (int)n + 2, argv, 3000);
    assert_int_equal(r->v[0], 0);
    free(r);
    free(keys);
    free(argv);
}

static void del_site(loop_t *l, rclient_t *c, const char *p, const char *site)
{
    del_sites(l, c, p, 1, &site);
}

/* ----------------------------------------------- the script, exactly */

static void test_script_exact(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 2000);
    char p[64];
    snprintf(p, sizeof(p), "%s:s", prefix);
    long long holders = 0;

    /* lease.h's example: A holds 100 of 100, B wants 50 */
    assert_int_equal(grant1(l, c, p, "A", 60000, "ex", 100, 100, &holders), 100);
    assert_int_equal(holders, 1);
    assert_int_equal(grant1(l, c, p, "B", 60000, "ex", 100, 50, &holders), 0);
    assert_int_equal(holders, 2);
    long long cont = -1;
    /* A learns that B waits (B wants 50, claims 0) */
    assert_int_equal(grant1f(l, c, p, "A", "ex", 100, 100, &cont), 50);
    assert_int_equal(cont, 1);
    /* B: A wants 100 and claims 50 */
    assert_int_equal(grant1f(l, c, p, "B", "ex", 100, 50, &cont), 50);
    assert_int_equal(cont, 1);
    /* settled: renewals change nothing; A sees nobody waiting */
    assert_int_equal(grant1f(l, c, p, "A", "ex", 100, 100, &cont), 50);
    assert_int_equal(cont, 0);
    assert_int_equal(grant1(l, c, p, "B", 60000, "ex", 100, 50, NULL), 50);

    /* a holder whose share shrank claims what it still holds: limit 3, A
     * holds 3, B wants 3. A's fair share is 2, but until A has closed
     * its third connection B is granted nothing */
    assert_int_equal(grant_held(l, c, p, "A", "sh", 3, 3, 3), 3);
    assert_int_equal(grant_held(l, c, p, "B", "sh", 3, 3, 0), 0);
    assert_int_equal(grant_held(l, c, p, "A", "sh", 3, 3, 3), 2);
    assert_int_equal(grant_held(l, c, p, "B", "sh", 3, 3, 0), 0); /* A still holds 3 */
    assert_int_equal(grant_held(l, c, p, "A", "sh", 3, 3, 2), 2);   /* one closed */
    assert_int_equal(grant_held(l, c, p, "B", "sh", 3, 3, 0), 1);
    /* water filling: B wants 10, A and C 100 of 100 -> 45, 10, 45 */
    assert_int_equal(grant1(l, c, p, "A", 60000, "wf", 100, 100, NULL), 100);
    assert_int_equal(grant1(l, c, p, "B", 60000, "wf", 100, 10, NULL), 0);
    assert_int_equal(grant1(l, c, p, "C", 60000, "wf", 100, 100, NULL), 0);
    assert_int_equal(grant1(l, c, p, "A", 60000, "wf", 100, 100, NULL), 45);
    assert_int_equal(grant1(l, c, p, "B", 60000, "wf", 100, 10, NULL), 10);
    assert_int_equal(grant1(l, c, p, "C", 60000, "wf", 100, 100, NULL), 45);
    assert_int_equal(grant1(l, c, p, "A", 60000, "wf", 100, 100, NULL), 45);

    /* the remainder: 10 over three -> 4 to the first name, 3 and 3 */
    assert_int_equal(grant1(l, c, p, "z", 60000, "rm", 10, 10, NULL), 10);
    assert_int_equal(grant1(l, c, p, "y", 60000, "rm", 10, 10, NULL), 0);
    assert_int_equal(grant1(l, c, p, "x", 60000, "rm", 10, 10, NULL), 0);
    assert_int_equal(grant1(l, c, p, "z", 60000, "rm", 10, 10, NULL), 3);
    assert_int_equal(grant1(l, c, p, "y", 60000, "rm", 10, 10, NULL), 3);
    assert_int_equal(grant1(l, c, p, "x", 60000, "rm", 10, 10, NULL), 4);

    /* want 0 releases: the others grow */
    assert_int_equal(grant1(l, c, p, "x", 60000, "rm", 10, 0, NULL), 0);
    assert_int_equal(grant1(l, c, p, "y", 60000, "rm", 10, 10, NULL), 5);
    assert_int_equal(grant1(l, c, p, "z", 60000, "rm", 10, 10, NULL), 5);

    /* expiry on Redis' clock: P's 10 of 10 block Q until they expire */
    assert_int_equal(grant1(l, c, p, "P", 300, "exp", 10, 10, NULL), 10);
    assert_int_equal(grant1(l, c, p, "Q", 300, "exp", 10, 10, &holders), 0);
    sr_run_for(l, 400);
    assert_int_equal(grant1(l, c, p, "Q", 300, "exp", 10, 10, &holders), 10);
    /* P expired from the registry too (the others hold 60 s) */
    assert_int_equal(holders, 7);

    /* the site keys carry a PEXPIRE of 3 x ttl */
    sr_rec_t pt = { 0 };
    char key[96];
    snprintf(key, sizeof(key), "%s:exp", p);
    rclient_command(c, sr_rec_cb, &pt, "PTTL %s", key);
    sr_run_until(l, &pt.calls, 2000);
    assert_true(pt.ok && pt.v[0] > 500 && pt.v[0] <= 900);

    const char *used[] = { "ex", "wf", "rm", "exp", "sh" };
    del_sites(l, c, p, 5, used);
    rclient_free(c);
    loop_free(l);
}

/* ------------------------------------------------- tables on one loop */

typedef struct watch {
    int      calls;
    unsigned last;
} watch_t;

static void on_changed(void *arg, const char *site, unsigned allowance)
{
    watch_t *w = arg;
    w->calls++;
    w->last = allowance;
}

static lease_table_t *table(loop_t *l, rclient_t *c, const char *p, const char *holder, watch_t *w)
{
    lease_config_t cfg = { .ttl_ms = 1500, .renew_ms = 200, .local_holders = 1, .prefix = p };
    return lease_new(l, c, holder, &cfg, on_changed, w);
}

static int all_answered(lease_table_t **t, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        lease_stats_t st;
        lease_get_stats(t[i], &st);
        if (st.fallback)
            return 0;
    }
    return 1;
}

static void wait_answered(loop_t *l, lease_table_t **t, size_t n)
{
    uint64_t end = util_mono_ms() + 3000;
    while (!all_answered(t, n) && util_mono_ms() < end)
        loop_run_once(l, 10);
    assert_true(all_answered(t, n));
}

static void test_three_tables_fair(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 500);
    char p[64];
    snprintf(p, sizeof(p), "%s:f", prefix);
    watch_t w[3] = { { 0 } };
    const char *names[3] = { "h1", "h2", "h3" };
    lease_table_t *t[3];
    for (int i = 0; i < 3; i++)
        t[i] = table(l, c, p, names[i], &w[i]);
    wait_answered(l, t, 3);

    /* all three want 10 of 10, asked every iteration as a caller would */
    uint64_t t0 = util_mono_ms(), settled = 0;
    unsigned a[3] = { 0 }, max_sum = 0;
    while (util_mono_ms() - t0 < 3000) {
        loop_run_once(l, 10);
        unsigned sum = 0;
        for (int i = 0; i < 3; i++)
            sum += a[i] = lease_want(t[i], "fair.example", 10, 10);
        if (sum > max_sum)
            max_sum = sum;
        if (sum > 10)
            fail_msg("allowances %u+%u+%u > 10 at %llu ms", a[0], a[1], a[2],
                     (unsigned long long)(util_mono_ms() - t0));
        if (!settled && a[0] == 4 && a[1] == 3 && a[2] == 3)
            settled = util_mono_ms() - t0;
    }
    printf("lease: three tables, limit 10: 4+3+3 after %llu ms (renew 200 ms); max sum %u\n",
           (unsigned long long)settled, max_sum);
    assert_true(settled > 0 && settled < 1500);
    /* "h1" comes first in the script's order: it has the remainder */
    assert_int_equal(a[0], 4);
    assert_int_equal(a[1], 3);
    assert_int_equal(a[2], 3);
    /* the callbacks told the same */
    for (int i = 0; i < 3; i++)
        assert_int_equal(w[i].last, a[i]);

    /* h3 leaves (want 0): the others grow to 5 + 5 */
    assert_int_equal(lease_want(t[2], "fair.example", 10, 0), 3);
    t0 = util_mono_ms();
    settled = 0;
    while (util_mono_ms() - t0 < 2000 && !settled) {
        loop_run_once(l, 10);
        unsigned s0 = lease_want(t[0], "fair.example", 10, 10), s1 = lease_want(t[1], "fair.example", 10, 10);
        unsigned s2 = lease_want(t[2], "fair.example", 10, 0); /* 3 until released, then no entry: 0 */
        if (s0 + s1 + s2 > 10)
            fail_msg("allowances %u+%u+%u > 10", s0, s1, s2);
        if (s0 == 5 && s1 == 5)
            settled = util_mono_ms() - t0;
    }
    assert_true(settled > 0);
    lease_stats_t st;
    lease_get_stats(t[2], &st);
    assert_int_equal(st.sites, 0); /* released in Redis, then gone */
    assert_int_equal(st.renewals_failed, 0);
    assert_int_equal(st.holders, 3);

    for (int i = 0; i < 3; i++)
        lease_free(t[i]);
    sr_run_for(l, 100); /* the HDELs go out */
    char key[96];
    snprintf(key, sizeof(key), "%s:fair.example", p);
    sr_rec_t ex = { 0 };
    rclient_command(c, sr_rec_cb, &ex, "EXISTS %s", key);
    sr_run_until(l, &ex.calls, 2000);
    assert_int_equal(ex.v[0], 0); /* every claim given up */
    del_site(l, c, p, "fair.example");
    rclient_free(c);
    assert_int_equal(loop_timer_count(l), 0);
    loop_free(l);
}

/* ------------------------------------------------------- a killed holder */

static void child_holder(const char *p, int ready_fd)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    loop_t *l = loop_new();
    rclient_config_t cfg = { .host = redis_host, .port = redis_port, .timeout_ms = 500 };
    rclient_t *c = rclient_new(l, &cfg);
    watch_t w = { 0 };
    lease_table_t *t = table(l, c, p, "h0-child", &w);
    int told = 0;
    for (;;) {
        loop_run_once(l, 10);
        unsigned a = lease_want(t, "kill.example", 10, 10);
        if (a > 0 && !told) {
            if (write(ready_fd, "r", 1) != 1)
                _exit(2);
            told = 1;
        }
    }
}

static void test_killed_holder_expires(void **state)
{
    char p[64];
    snprintf(p, sizeof(p), "%s:k", prefix);
    int pipefd[2];
    assert_int_equal(pipe(pipefd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(pipefd[0]);
        child_holder(p, pipefd[1]);
        _exit(0);
    }
    close(pipefd[1]);
    char ch;
    assert_int_equal(read(pipefd[0], &ch, 1), 1); /* the child holds a grant */
    close(pipefd[0]);

    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 500);
    watch_t w[2] = { { 0 } };
    lease_table_t *t[2] = { table(l, c, p, "h1", &w[0]), table(l, c, p, "h2", &w[1]) };
    wait_answered(l, t, 2);
    /* three holders share 10: ours settle at 3 + 3 (the child, first in
     * name order, has the remainder) */
    uint64_t t0 = util_mono_ms();
    unsigned a0 = 0, a1 = 0;
    while (util_mono_ms() - t0 < 3000 && !(a0 == 3 && a1 == 3)) {
        loop_run_once(l, 10);
        a0 = lease_want(t[0], "kill.example", 10, 10);
        a1 = lease_want(t[1], "kill.example", 10, 10);
    }
    assert_int_equal(a0, 3);
    assert_int_equal(a1, 3);

    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    uint64_t killed = util_mono_ms(), grown = 0;
    while (util_mono_ms() - killed < 4000 && !grown) {
        loop_run_once(l, 10);
        a0 = lease_want(t[0], "kill.example", 10, 10);
        a1 = lease_want(t[1], "kill.example", 10, 10);
        assert_true(a0 + a1 <= 10);
        if (a0 == 5 && a1 == 5)
            grown = util_mono_ms() - killed;
    }
    printf("lease: killed holder's share taken after %llu ms (ttl 1500, renew 200)\n",
           (unsigned long long)grown);
    /* not before its claim expired (it renewed at most 200 ms before the
     * kill), and within ttl + renew + a renewal's round trips */
    assert_true(grown >= 1500 - 200 - 50);
    assert_true(grown <= 1500 + 200 + 300);
    lease_stats_t st;
    lease_get_stats(t[0], &st);
    assert_int_equal(st.holders, 2);

    lease_free(t[0]);
    lease_free(t[1]);
    sr_run_for(l, 50);
    del_site(l, c, p, "kill.example");
    rclient_free(c);
    loop_free(l);
}

/* ---------------------------------------------- Redis cut off: fallback */

/* A TCP proxy to the stack's Redis on the test's loop, to cut off. */
typedef struct proxy {
    loop_t  *loop;
    int      lfd;
    unsigned port;
    int      fds[16]; /* pairs: client, upstream */
    int      n;
} proxy_t;

static void proxy_close_all(proxy_t *x)
{
    for (int i = 0; i < x->n; i++)
        if (x->fds[i] >= 0) {
            loop_fd_del(x->loop, x->fds[i]);
            close(x->fds[i]);
            x->fds[i] = -1;
        }
    x->n = 0;
}

static void proxy_on_data(loop_t *loop, int fd, unsigned ev, void *arg)
{
    proxy_t *x = arg;
    int i = 0;
    while (i < x->n && x->fds[i] != fd)
        i++;
    if (i == x->n)
        return;
    int peer = x->fds[i ^ 1];
    char buf[65536];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0 || write(peer, buf, (size_t)n) != n) {
        proxy_close_all(x);
        return;
    }
}

static void proxy_on_accept(loop_t *loop, int fd, unsigned ev, void *arg)
{
    proxy_t *x = arg;
    int cfd = accept(fd, NULL, NULL);
    if (cfd < 0)
        return;
    int ufd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)redis_port) };
    inet_pton(AF_INET, redis_host, &a.sin_addr);
    if (x->n + 2 > 16 || connect(ufd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        close(cfd);
        close(ufd);
        return;
    }
    x->fds[x->n++] = cfd;
    x->fds[x->n++] = ufd;
    loop_fd_add(loop, cfd, LOOP_READ, proxy_on_data, x);
    loop_fd_add(loop, ufd, LOOP_READ, proxy_on_data, x);
}

static void proxy_listen(proxy_t *x)
{
    x->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(x->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)x->port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    assert_int_equal(bind(x->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(x->lfd, 8), 0);
    getsockname(x->lfd, (struct sockaddr *)&a, &al);
    x->port = ntohs(a.sin_port);
    loop_fd_add(x->loop, x->lfd, LOOP_READ, proxy_on_accept, x);
}

static void proxy_cut(proxy_t *x)
{
    proxy_close_all(x);
    loop_fd_del(x->loop, x->lfd);
    close(x->lfd);
    x->lfd = -1;
}

static void test_fallback_share(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 500);
    char p[64];
    snprintf(p, sizeof(p), "%s:b", prefix);
    proxy_t x = { .loop = l, .lfd = -1 };
    proxy_listen(&x);
    rclient_t *pc = sr_connect(l, redis_host, x.port, 100);

    /* three holders seen; the proxied one learns it */
    watch_t w[3] = { { 0 } };
    lease_table_t *t[3] = { table(l, c, p, "h1", &w[0]), table(l, c, p, "h2", &w[1]),
                            table(l, pc, p, "h3", &w[2]) };
    wait_answered(l, t, 3);
    for (int k = 0; k < 20; k++) {
        sr_run_for(l, 50);
        for (int i = 0; i < 3; i++)
            lease_want(t[i], "cut.example", 10, 10);
    }
    lease_stats_t st;
    lease_get_stats(t[2], &st);
    assert_int_equal(st.holders, 3);
    assert_int_equal(lease_want(t[2], "cut.example", 10, 10), 3);

    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    proxy_cut(&x);
    w[2].calls = 0;
    uint64_t t0 = util_mono_ms();
    while (util_mono_ms() - t0 < 2000 && w[2].calls == 0)
        loop_run_once(l, 10);
    /* the failed renewal's report: ceil(10 / 3) */
    assert_int_equal(w[2].calls, 1);
    assert_int_equal(w[2].last, 4);
    assert_int_equal(lease_want(t[2], "cut.example", 10, 10), 4);
    assert_int_equal(lease_want(t[2], "new.example", 7, 7), 3); /* ceil(7 / 3), at once */
    sr_run_for(l, 600); /* more failed renewals: no more lines, no more reports */
    assert_int_equal(w[2].calls, 1);
    lease_get_stats(t[2], &st);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallbacks, 1);
    assert_true(st.renewals_failed >= 3);

    /* Redis answers again: the grants come back, reported */
    proxy_listen(&x);
    t0 = util_mono_ms();
    do {
        loop_run_once(l, 10);
        lease_get_stats(t[2], &st);
    } while (st.fallback && util_mono_ms() - t0 < 8000);
    sr_run_for(l, 600);
    char logs[8192];
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.fallbacks, 1);
    const char *warn = strstr(logs, "event=fallback");
    assert_non_null(warn);
    assert_null(strstr(warn + 1, "event=fallback"));
    assert_non_null(strstr(logs, "level=warn mod=lease event=fallback holder=\"h3\""));
    const char *back = strstr(logs, "mod=lease event=redis_back holder=\"h3\"");
    assert_non_null(back);
    assert_null(strstr(back + strlen("mod=lease event=redis_back"), "event=redis_back"));
    unsigned a = lease_want(t[2], "cut.example", 10, 10);
    assert_true(a <= 4);
    assert_int_equal(w[2].last, a);

    for (int i = 0; i < 3; i++)
        lease_free(t[i]);
    sr_run_for(l, 50);
    const char *used[] = { "cut.example", "new.example" };
    del_sites(l, c, p, 2, used);
    rclient_free(pc);
    rclient_free(c);
    proxy_cut(&x);
    loop_free(l);
}

static void test_nobody_listening(void **state)
{
    loop_t *l = loop_new();
    /* a loopback port just closed */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    getsockname(fd, (struct sockaddr *)&a, &al);
    close(fd);
    rclient_config_t rc = { .host = "127.0.0.1", .port = ntohs(a.sin_port), .timeout_ms = 100 };
    rclient_t *c = rclient_new(l, &rc);
    watch_t w = { 0 };
    lease_config_t cfg = { .ttl_ms = 1500, .renew_ms = 200, .local_holders = 4 };
    lease_table_t *t = lease_new(l, c, "lonely", &cfg, on_changed, &w);
    assert_int_equal(lease_want(t, "x.example", 10, 10), 3); /* ceil(10 / 4) */
    sr_run_for(l, 700);
    lease_stats_t st;
    lease_get_stats(t, &st);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.fallbacks, 0); /* it never answered: no fall */
    assert_true(st.renewals >= 3 && st.renewals_failed == st.renewals);
    assert_int_equal(st.holders, 0);
    assert_int_equal(lease_want(t, "x.example", 10, 10), 3);
    assert_int_equal(lease_want(t, "y.example", 2, 2), 1);
    assert_int_equal(w.calls, 0); /* the share never changed */
    lease_free(t);
    rclient_free(c);
    loop_free(l);
}

/* ------------------------------------------------------ 1,000 sites */

static void test_thousand_sites(void **state)
{
    loop_t *l = loop_new();
    rclient_t *c = sr_connect(l, redis_host, redis_port, 5000);
    char p[64];
    snprintf(p, sizeof(p), "%s:m", prefix);
    enum { N = 1000 };
    char (*names)[32] = xcalloc(N, 32);
    const char **sites = xcalloc(N, sizeof(char *));
    unsigned *limits = xcalloc(N, sizeof(unsigned)), *wants = xcalloc(N, sizeof(unsigned));
    for (int i = 0; i < N; i++) {
        snprintf(names[i], 32, "site%04d.example", i);
        sites[i] = names[i];
        limits[i] = 20;
        wants[i] = 8;
    }
    sr_rec_t *r = xcalloc(1, sizeof(*r));
    const char *holders[4] = { "m1", "m2", "m3", "m4" };
    uint64_t best = UINT64_MAX;
    for (int round = 0; round < 3; round++)
        for (int h = 0; h < 4; h++) {
            uint64_t t0 = mono_us();
            script(l, c, p, holders[h], 60000, N, sites, limits, wants, r);
            uint64_t dt = mono_us() - t0;
            if (round == 2 && dt < best)
                best = dt;
            assert_int_equal(r->n, 2 * N + 1);
        }
    /* settled: 4 holders x 5 of 20, and each of them waits for more */
    for (int i = 1; i <= N; i++) {
        assert_int_equal(r->v[i], 5);
        assert_int_equal(r->v[N + i], 1);
    }
    /* the round trip on loopback: Redis' time for the script plus
     * hiredis' encoding and parsing of 3,000 arguments */
    printf("lease: one renewal EVAL of %d sites, 4 holders each: %.2f ms round trip (best of the last 4)\n",
           N, best / 1000.0);
    assert_true(best < 200000);

    /* a table renewing 1,000 sites: rounds of 8 EVALs (chunks of 128), one
     * every 200 ms; every site wants more than it gets, so each round
     * carries all of them */
    watch_t w = { 0 };
    lease_config_t cfg = { .ttl_ms = 1500, .renew_ms = 200, .prefix = p };
    lease_table_t *t = lease_new(l, c, "m5", &cfg, on_changed, &w);
    for (int i = 0; i < N; i++)
        lease_want(t, sites[i], 20, 8);
    sr_run_for(l, 700);
    lease_stats_t st;
    lease_get_stats(t, &st);
    assert_int_equal(st.sites, N);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.renewals_failed, 0);
    assert_true(st.renewals >= 2 * 8 && st.renewals <= 4 * 8);
    /* four others hold 5 each of 20: nothing free */
    assert_int_equal(lease_want(t, sites[0], 20, 8), 0);
    lease_free(t);
    sr_run_for(l, 100);

    del_sites(l, c, p, N, sites);
    free(r);
    free(names);
    free(sites);
    free(limits);
    free(wants);
    rclient_free(c);
    loop_free(l);
}

static int setup(void **state)
{
    if (sr_stack_redis(redis_host, sizeof(redis_host), &redis_port) < 0)
        return -1;
    snprintf(prefix, sizeof(prefix), "mp:itest:lease:%016llx", (unsigned long long)util_rand64());
    return 0;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_script_exact),
        cmocka_unit_test(test_three_tables_fair),
        cmocka_unit_test(test_killed_holder_expires),
        cmocka_unit_test(test_fallback_share),
        cmocka_unit_test(test_nobody_listening),
        cmocka_unit_test(test_thousand_sites),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}

/*
 * SUMMARY
 *  tests/bench/bench_dns.c - figures for the DNS layers (tests/bench/dns.sh).
 * DESCRIPTION
 *  bench_dns l1   --servers S [--name DOMAIN] [--seconds N]
 *      one resolver, one thread: lookups of a name already in L1, issued
 *      in batches of 1000 and answered through the loop (the real
 *      asynchronous path: ask, deferred callback). Prints l1_hits_per_s.
 *  bench_dns l2   --servers S --redis H:P [--rate R] [--seconds N] [--names K]
 *      K names resolved once into Redis (under a random key prefix), then
 *      a resolver whose L1 holds a single entry looks them up in turn at R
 *      lookups per second, so that every lookup is an L2 hit; the latency
 *      of each (query to callback) gives l2_p50_ms and l2_p99_ms.
 *  bench_dns cold --servers S --domains FILE [--concurrency C]
 *      every domain in FILE once, with no cache warm and no Redis, at most
 *      C lookups in flight (the resolver itself bounds c-ares to 128).
 *      Prints cold_<n>_s and the number that failed.
 * DIAGNOSTICS
 *  Exit 1 when the figures could not be measured (a lookup failed where
 *  none should).
 */
#include <arpa/inet.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "dns/resolver.h"

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

typedef struct opts {
    const char *servers, *redis, *domains, *name;
    unsigned    seconds, rate, names, concurrency;
} opts_t;

static dns_resolver_t *make_resolver(loop_t *l, const opts_t *o, rclient_t *rc, unsigned l1, const char *prefix)
{
    char err[256];
    dns_config_t cfg = { .servers = o->servers, .timeout_ms = 1000, .tries = 2, .l1_entries = l1,
                         .redis = rc, .l2_prefix = prefix };
    dns_resolver_t *r = dns_resolver_new(l, &cfg, err, sizeof(err));
    if (r == NULL) {
        fprintf(stderr, "bench_dns: %s\n", err);
        exit(1);
    }
    return r;
}

/* ---- l1 ---- */

static unsigned l1_answered, l1_bad;

static void l1_cb(void *arg, const dns_mx_result_t *res)
{
    l1_answered++;
    if (res->status != DNS_OK || res->layer != DNS_LAYER_L1)
        l1_bad++;
}

static int bench_l1(const opts_t *o)
{
    loop_t *l = loop_new();
    dns_resolver_t *r = make_resolver(l, o, NULL, 0, NULL);
    dns_mx_query(r, o->name, l1_cb, NULL);
    while (l1_answered == 0)
        loop_run_once(l, 100);
    l1_answered = l1_bad = 0;
    uint64_t t0 = now_us(), end = t0 + (uint64_t)o->seconds * 1000000u, n = 0;
    while (now_us() < end) {
        for (int i = 0; i < 1000; i++)
            dns_mx_query(r, o->name, l1_cb, NULL);
        n += 1000;
        while (l1_answered < n)
            loop_run_once(l, 0);
    }
    double s = (double)(now_us() - t0) / 1e6;
    if (l1_bad) {
        fprintf(stderr, "bench_dns: %u lookups were not L1 hits\n", l1_bad);
        return 1;
    }
    printf("BENCH dns l1_hits_per_s %.0f hits/s\n", (double)n / s);
    dns_resolver_free(r);
    loop_free(l);
    return 0;
}

/* ---- l2 ---- */

typedef struct l2_ask {
    uint64_t t0;
    int      done;
} l2_ask_t;

static uint64_t *lat_us;
static size_t    nlat, l2_bad, l2_layer_miss;

static void prime_cb(void *arg, const dns_mx_result_t *res)
{
    (*(unsigned *)arg)++;
}

static void l2_cb(void *arg, const dns_mx_result_t *res)
{
    l2_ask_t *a = arg;
    lat_us[nlat++] = now_us() - a->t0;
    if (res->status != DNS_OK)
        l2_bad++;
    if (res->layer != DNS_LAYER_L2)
        l2_layer_miss++;
    free(a);
}

/* The reference: plain GETs through the same rclient, paced the same way. */
static void ref_cb(void *arg, const redisReply *reply, const char *err)
{
    l2_ask_t *a = arg;
    lat_us[nlat++] = now_us() - a->t0;
    if (reply == NULL)
        l2_bad++;
    free(a);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int bench_l2(const opts_t *o)
{
    char host[64];
    const char *colon = o->redis ? strrchr(o->redis, ':') : NULL;
    if (colon == NULL || (size_t)(colon - o->redis) >= sizeof(host)) {
        fprintf(stderr, "bench_dns: --redis HOST:PORT\n");
        return 1;
    }
    memcpy(host, o->redis, (size_t)(colon - o->redis));
    host[colon - o->redis] = '\0';
    loop_t *l = loop_new();
    rclient_config_t rcfg = { .host = host, .port = (unsigned)atoi(colon + 1), .timeout_ms = 50 };
    rclient_t *rc = rclient_new(l, &rcfg);
    uint64_t until = util_mono_ms() + 2000;
    while (!rclient_connected(rc) && util_mono_ms() < until)
        loop_run_once(l, 10);
    if (!rclient_connected(rc)) {
        fprintf(stderr, "bench_dns: Redis %s not reachable\n", o->redis);
        return 1;
    }
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "mp:bench:dns:%016llx:", (unsigned long long)util_rand64());
    FILE *f = fopen(o->domains, "r");
    if (f == NULL) {
        perror(o->domains);
        return 1;
    }
    char (*names)[256] = calloc(o->names, sizeof(*names));
    unsigned k = 0;
    while (k < o->names && fgets(names[k], sizeof(names[k]), f) != NULL) {
        names[k][strcspn(names[k], "\r\n")] = '\0';
        if (names[k][0])
            k++;
    }
    fclose(f);

    /* resolve them into Redis */
    dns_resolver_t *w = make_resolver(l, o, rc, 0, prefix);
    unsigned primed = 0;
    for (unsigned i = 0; i < k; i++)
        dns_mx_query(w, names[i], prime_cb, &primed);
    while (primed < k)
        loop_run_once(l, 100);
    dns_stats_t st;
    do {
        loop_run_once(l, 5);
        dns_resolver_stats(w, &st);
    } while (st.l2_inflight > 0);
    dns_resolver_free(w);

    /* every lookup an L2 hit: L1 holds one entry, names rotate */
    dns_resolver_t *r = make_resolver(l, o, rc, 1, prefix);
    size_t total = (size_t)o->rate * o->seconds;
    lat_us = calloc(total, sizeof(*lat_us));
    uint64_t t0 = now_us(), period_ns = 1000000000ull / o->rate;
    size_t sent = 0;
    while (sent < total || nlat < sent) {
        uint64_t due = (uint64_t)((now_us() - t0) * 1000u / period_ns) + 1;
        while (sent < total && sent < due) {
            l2_ask_t *a = calloc(1, sizeof(*a));
            a->t0 = now_us();
            dns_mx_query(r, names[sent % k], l2_cb, a);
            sent++;
        }
        loop_run_once(l, 1);
    }
    double secs = (double)(now_us() - t0) / 1e6;
    qsort(lat_us, nlat, sizeof(*lat_us), cmp_u64);
    printf("BENCH dns l2_rate %.0f lookups/s\n", (double)nlat / secs);
    printf("BENCH dns l2_p50_ms %.3f ms\n", (double)lat_us[nlat / 2] / 1000.0);
    printf("BENCH dns l2_p99_ms %.3f ms\n", (double)lat_us[nlat * 99 / 100] / 1000.0);
    printf("BENCH dns l2_max_ms %.3f ms\n", (double)lat_us[nlat - 1] / 1000.0);
    dns_resolver_stats(r, &st);

    /* reference figure: the bare Redis round trip at the same rate */
    size_t bad_before = l2_bad;
    nlat = 0;
    t0 = now_us();
    sent = 0;
    char key[512];
    while (sent < total || nlat < sent) {
        uint64_t due = (uint64_t)((now_us() - t0) * 1000u / period_ns) + 1;
        while (sent < total && sent < due) {
            l2_ask_t *a = calloc(1, sizeof(*a));
            a->t0 = now_us();
            snprintf(key, sizeof(key), "%s%s", prefix, names[sent % k]);
            rclient_command(rc, ref_cb, a, "GET %s", key);
            sent++;
        }
        loop_run_once(l, 1);
    }
    qsort(lat_us, nlat, sizeof(*lat_us), cmp_u64);
    printf("BENCH dns ref_rclient_get_p50_ms %.3f ms\n", (double)lat_us[nlat / 2] / 1000.0);
    printf("BENCH dns ref_rclient_get_p99_ms %.3f ms\n", (double)lat_us[nlat * 99 / 100] / 1000.0);
    l2_bad = bad_before;

    int rc_ok = 0;
    if (l2_bad || l2_layer_miss || st.l2_errors) {
        fprintf(stderr, "bench_dns: %zu failed, %zu not from L2, %llu Redis errors\n", l2_bad, l2_layer_miss,
                (unsigned long long)st.l2_errors);
        rc_ok = 1;
    }
    dns_resolver_free(r);
    rclient_free(rc);
    loop_free(l);
    free(lat_us);
    free(names);
    return rc_ok;
}

/* ---- cold ---- */

typedef struct cold {
    dns_resolver_t *r;
    FILE           *in;
    unsigned        inflight, limit, done, failed;
    int             eof;
} cold_t;

static void cold_more(cold_t *c);

static void cold_cb(void *arg, const dns_mx_result_t *res)
{
    cold_t *c = arg;
    c->inflight--;
    c->done++;
    if (res->status != DNS_OK || res->layer != DNS_LAYER_DNS)
        c->failed++;
    cold_more(c);
}

static void cold_more(cold_t *c)
{
    char line[512];
    while (!c->eof && c->inflight < c->limit) {
        if (fgets(line, sizeof(line), c->in) == NULL) {
            c->eof = 1;
            break;
        }
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '\0')
            continue;
        c->inflight++;
        dns_mx_query(c->r, line, cold_cb, c);
    }
}

static int bench_cold(const opts_t *o)
{
    loop_t *l = loop_new();
    cold_t c = { .r = make_resolver(l, o, NULL, 20000, NULL), .limit = o->concurrency };
    c.in = fopen(o->domains, "r");
    if (c.in == NULL) {
        perror(o->domains);
        return 1;
    }
    uint64_t t0 = now_us();
    cold_more(&c);
    while (c.inflight > 0)
        loop_run_once(l, 100);
    double s = (double)(now_us() - t0) / 1e6;
    fclose(c.in);
    dns_stats_t st;
    dns_resolver_stats(c.r, &st);
    printf("BENCH dns cold_%uk_s %.3f s\n", c.done / 1000, s);
    printf("BENCH dns cold_failed %u lookups\n", c.failed);
    printf("BENCH dns cold_wire_queries %llu queries\n", (unsigned long long)st.wire_queries);
    printf("BENCH dns cold_lookups_per_s %.0f lookups/s\n", (double)c.done / s);
    dns_resolver_free(c.r);
    loop_free(l);
    return c.failed ? 1 : 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    static const struct option lo[] = {
        { "servers", required_argument, NULL, 's' }, { "redis", required_argument, NULL, 'r' },
        { "domains", required_argument, NULL, 'd' }, { "seconds", required_argument, NULL, 't' },
        { "rate", required_argument, NULL, 'R' },    { "names", required_argument, NULL, 'k' },
        { "concurrency", required_argument, NULL, 'c' }, { "name", required_argument, NULL, 'n' },
        { NULL, 0, NULL, 0 },
    };
    opts_t o = { .seconds = 2, .rate = 10000, .names = 1000, .concurrency = 512, .name = "test.example" };
    if (argc < 2) {
        fprintf(stderr, "usage: bench_dns l1|l2|cold [options]\n");
        return 2;
    }
    const char *mode = argv[1];
    optind = 2;
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 's': o.servers = optarg; break;
        case 'r': o.redis = optarg; break;
        case 'd': o.domains = optarg; break;
        case 't': o.seconds = (unsigned)atoi(optarg); break;
        case 'R': o.rate = (unsigned)atoi(optarg); break;
        case 'k': o.names = (unsigned)atoi(optarg); break;
        case 'c': o.concurrency = (unsigned)atoi(optarg); break;
        case 'n': o.name = optarg; break;
        default: return 2;
        }
    }
    if (strcmp(mode, "l1") == 0)
        return bench_l1(&o);
    if (strcmp(mode, "l2") == 0 && o.domains)
        return bench_l2(&o);
    if (strcmp(mode, "cold") == 0 && o.domains)
        return bench_cold(&o);
    fprintf(stderr, "usage: bench_dns l1|l2|cold [options]\n");
    return 2;
}

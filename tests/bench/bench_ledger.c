/*
 * bench_ledger - the ledger's marks under many concurrent transactions,
 * against a real Redis.
 *
 * usage: bench_ledger HOST PORT CONCURRENT ROUNDS TIMEOUT_MS
 *
 * CONCURRENT transactions each write "sending" and then "done" for one
 * recipient, all started in the same loop iteration (the worst case: a
 * burst of end-of-data replies), ROUNDS times. Each mark's latency (call
 * to callback) is recorded; the Redis client's command timeout is
 * TIMEOUT_MS, as [redis] timeout_ms. Prints "BENCH ledger <metric>
 * <value> <unit>": p50/p99/max latency, marks failed (what would be
 * ledger_unavailable), EVALs sent. Keys live under a random prefix and
 * expire after 60 s.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/ledger.h"

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

typedef struct txn {
    uint64_t started;
    int      step; /* 0 sending, 1 done, 2 over */
    int      id;
} txn_t;

static loop_t   *g_loop;
static ledger_t *g_ledger;
static char      g_prefix[64];
static uint64_t *g_lat;
static size_t    g_nlat, g_failed, g_left;

static void on_mark(void *arg, int ok);

static void mark(txn_t *t)
{
    char msg[96], rcpt[64];
    snprintf(msg, sizeof(msg), "%s-%d", g_prefix, t->id);
    snprintf(rcpt, sizeof(rcpt), "r%d@bench.test", t->id);
    const char *r[1] = { rcpt };
    t->started = mono_us();
    ledger_mark(g_ledger, msg, r, 1, t->step == 0 ? LEDGER_SENDING : LEDGER_DONE, on_mark, t);
}

static void on_mark(void *arg, int ok)
{
    txn_t *t = arg;
    g_lat[g_nlat++] = mono_us() - t->started;
    if (!ok)
        g_failed++;
    if (++t->step == 1)
        mark(t);
    else
        g_left--;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: bench_ledger HOST PORT CONCURRENT ROUNDS TIMEOUT_MS\n");
        return 2;
    }
    int n = atoi(argv[3]), rounds = atoi(argv[4]);
    g_loop = loop_new();
    rclient_config_t rc = { .host = argv[1], .port = atoi(argv[2]), .timeout_ms = (unsigned)atoi(argv[5]) };
    rclient_t *c = rclient_new(g_loop, &rc);
    for (uint64_t until = util_mono_ms() + 3000; !rclient_connected(c) && util_mono_ms() < until;)
        loop_run_once(g_loop, 10);
    if (!rclient_connected(c)) {
        fprintf(stderr, "bench_ledger: cannot connect to Redis %s:%s\n", argv[1], argv[2]);
        return 1;
    }
    g_ledger = ledger_new(g_loop, c, 60000);
    snprintf(g_prefix, sizeof(g_prefix), "bench-%llx", (unsigned long long)mono_us());
    txn_t *t = xcalloc((size_t)n, sizeof(*t));
    g_lat = xcalloc((size_t)n * 2 * (size_t)rounds, sizeof(*g_lat));
    uint64_t t0 = mono_us();
    for (int r = 0; r < rounds; r++) {
        g_left = (size_t)n;
        for (int i = 0; i < n; i++) {
            t[i].step = 0;
            t[i].id = r * n + i;
            mark(&t[i]);
        }
        while (g_left > 0)
            loop_run_once(g_loop, 100);
    }
    double secs = (double)(mono_us() - t0) / 1e6;
    qsort(g_lat, g_nlat, sizeof(*g_lat), cmp);
    printf("BENCH ledger concurrent %d txn\n", n);
    printf("BENCH ledger marks %zu marks\n", g_nlat);
    printf("BENCH ledger marks_per_s %.0f 1/s\n", (double)g_nlat / secs);
    printf("BENCH ledger p50_ms %.2f ms\n", (double)g_lat[g_nlat / 2] / 1000.0);
    printf("BENCH ledger p99_ms %.2f ms\n", (double)g_lat[g_nlat * 99 / 100] / 1000.0);
    printf("BENCH ledger max_ms %.2f ms\n", (double)g_lat[g_nlat - 1] / 1000.0);
    printf("BENCH ledger failed %zu marks\n", g_failed);
    printf("BENCH ledger evals %llu commands\n", (unsigned long long)ledger_batches(g_ledger));
    rclient_free(c);
    ledger_free(g_ledger);
    loop_free(g_loop);
    free(t);
    free(g_lat);
    return 0;
}

/*
 * SUMMARY
 *  metrics/heartbeat.c - per-worker liveness heartbeats behind /healthz.
 * DESCRIPTION
 *  One atomic millisecond stamp per worker, written by its loop thread,
 *  read by the HTTP thread. The slot array is published once (before the
 *  workers start) through an atomic count, so a request that comes before
 *  heartbeat_init() sees no workers and answers 200: the process answers,
 *  nothing is known to be stuck yet. It lives until the process exits (the
 *  HTTP thread may read it to the end). See metrics/heartbeat.h.
 */
#include "metrics/heartbeat.h"

#include <stdatomic.h>
#include <stdlib.h>

#include "core/util.h"

static _Atomic uint64_t *beats;
static _Atomic unsigned  nbeats;
static _Atomic uint64_t  stuck_after;

void heartbeat_init(unsigned nworkers, uint64_t stuck_after_ms)
{
    /* mailpumpd calls this once, before any worker stamps; only tests call
     * it again, from one thread with no request in progress */
    atomic_store(&nbeats, 0);
    free((void *)beats);
    beats = xcalloc(nworkers ? nworkers : 1, sizeof(*beats));
    for (unsigned i = 0; i < nworkers; i++)
        atomic_init(&beats[i], 0);
    atomic_store(&stuck_after, stuck_after_ms);
    atomic_store(&nbeats, nworkers);
}

void heartbeat_stamp(int worker, uint64_t now_ms)
{
    unsigned n = atomic_load(&nbeats);
    if (worker < 0 || (unsigned)worker >= n)
        return;
    atomic_store(&beats[worker], now_ms);
}

int heartbeat_stuck(const uint64_t *b, unsigned n, uint64_t now_ms, uint64_t stuck_after_ms,
                    uint64_t *age_ms)
{
    uint64_t oldest = 0;
    for (unsigned i = 0; i < n; i++) {
        if (b[i] == 0)
            continue;
        uint64_t age = now_ms > b[i] ? now_ms - b[i] : 0;
        if (stuck_after_ms > 0 && age > stuck_after_ms) {
            *age_ms = age;
            return (int)i;
        }
        if (age > oldest)
            oldest = age;
    }
    *age_ms = oldest;
    return -1;
}

unsigned heartbeat_health(buf_t *out, uint64_t now_ms)
{
    unsigned n = atomic_load(&nbeats);
    uint64_t limit = atomic_load(&stuck_after);
    uint64_t *snap = xcalloc(n ? n : 1, sizeof(*snap));
    for (unsigned i = 0; i < n; i++)
        snap[i] = atomic_load(&beats[i]);
    uint64_t age;
    int stuck = heartbeat_stuck(snap, n, now_ms, limit, &age);
    if (stuck >= 0)
        buf_printf(out, "stuck: worker %d heartbeat age %llu ms > %llu ms\n", stuck,
                   (unsigned long long)age, (unsigned long long)limit);
    else
        buf_printf(out, "ok: %u workers\n", n);
    buf_puts(out, "heartbeat age ms:");
    for (unsigned i = 0; i < n; i++) {
        if (snap[i] == 0)
            buf_puts(out, " -");
        else
            buf_printf(out, " %llu", (unsigned long long)(now_ms > snap[i] ? now_ms - snap[i] : 0));
    }
    buf_puts(out, "\n");
    free(snap);
    return stuck >= 0 ? 503 : 200;
}

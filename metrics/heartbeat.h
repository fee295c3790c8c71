/*
 * SUMMARY
 *  metrics/heartbeat.h - per-worker liveness heartbeats behind /healthz.
 * DESCRIPTION
 *  Each worker's event loop stamps its slot once a second from a loop
 *  timer (deliverer/worker.c). The HTTP thread (metrics/metrics.c) asks
 *  heartbeat_health() whether any running worker has not stamped for
 *  [metrics] stuck_after: a thread stuck in a callback or a blocking
 *  call, which readiness cannot see (docs/operations.md). Slots are
 *  atomics; stamping takes no lock. Times are util_mono_ms() milliseconds,
 *  passed in so tests can use their own clock.
 */
#ifndef MAILPUMP_METRICS_HEARTBEAT_H
#define MAILPUMP_METRICS_HEARTBEAT_H

#include <stdint.h>

#include "core/buf.h"

/* Once, before the workers start: nworkers slots, all "not running";
 * stuck_after_ms 0 turns the check off (always 200). Calling it again
 * resets the slots (tests). */
void heartbeat_init(unsigned nworkers, uint64_t stuck_after_ms);

/* Worker `worker` is alive at now_ms (> 0); 0 marks it not running (left
 * its loop): a stopped worker is not stuck. Out-of-range indexes are
 * ignored. */
void heartbeat_stamp(int worker, uint64_t now_ms);

/* The decision: the index of the first running worker (beat != 0) whose
 * beat is older than stuck_after_ms at now_ms, or -1; *age_ms gets its
 * age (or the largest age when none is stuck). Pure, for tests. */
int heartbeat_stuck(const uint64_t *beats, unsigned n, uint64_t now_ms, uint64_t stuck_after_ms,
                    uint64_t *age_ms);

/* /healthz: writes the body into out and returns the HTTP status, 200 or
 * 503. Body: "ok: N workers, heartbeat age ms: a b ...\n" or
 * "stuck: worker I heartbeat age A ms > S ms\n" plus the ages line
 * ("-" for a worker not running). */
unsigned heartbeat_health(buf_t *out, uint64_t now_ms);

#endif

/*
 * deliverer/warmup.h - the warm-up of egress sources: how many messages a
 * source has sent to a destination site today, fleet-wide, against the
 * day's volume its [source] warmup gives (policy_warmup_limit()).
 *
 * A new source address has no reputation with the big mailbox providers,
 * so it sends a growing volume day by day (docs/egress-and-shaping.md,
 * "Warm-up"). One counter per source, site and UTC day, shared by the
 * fleet in Redis:
 *
 *   mp:wu:<source>:<site>:<yyyymmdd>   integer, messages counted that day
 *
 * Each worker has one table. warmup_count() adds to the entry's unflushed
 * count; every second ONE EVAL of WARMUP_REDIS_SCRIPT carries the table's
 * keys: INCRBY of the unflushed count and EXPIRE 2 days for the keys that
 * have one, GET for those that do not (each such key at most every 3 s, so
 * a worker that sends nothing there still learns what the others sent).
 * Each answer is the fleet's total for that key. A new UTC day is a new
 * key: counts start at 0. Entries not used for 10 minutes are forgotten.
 *
 * warmup_allows(): with Redis answering, the fleet's last known total plus
 * what this worker counted since (unflushed, or in the flush in flight) is
 * below the limit. So the fleet may exceed the limit by up to a second of
 * sending per worker (each decides on a total that is up to a flush old).
 * Without Redis, before the first answer for a key, or while flushes fail:
 * the worker's own count today is below ceil(limit / local_workers) (and,
 * if Redis answered for the key before, the last known total plus the
 * unflushed count is below the limit too). A failed flush puts its counts
 * back to be sent again: a flush that reached Redis but whose reply was
 * lost is counted twice, which only stops the source early.
 *
 * DIAGNOSTICS: info warmup/limit_reached once per key and day when a
 * source is refused for its day's volume; counter
 * mailpump_warmup_limited_total (each refusal).
 * One table per worker thread, used only from that worker's loop.
 */
#ifndef MP_DELIVERER_WARMUP_H
#define MP_DELIVERER_WARMUP_H

#include <stddef.h>
#include <stdint.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "deliverer/policy.h"

typedef struct warmup warmup_t;

/* redis may be NULL (local only); it is borrowed and must outlive the
 * table. local_workers: the workers of this process (0 counts as 1). */
warmup_t *warmup_new(loop_t *loop, rclient_t *redis, unsigned local_workers);
/* Cancels the flush in flight (its counts are lost: up to a second of
 * this worker's sending). NULL harmless. */
void      warmup_free(warmup_t *w);

/* 1 when source s may send one more message to site today (now_ms: Unix
 * time in ms, whose UTC day picks the limit and the key); always 1 without
 * a limit. Cheap: a hash lookup, no I/O. A 0 counts
 * mailpump_warmup_limited_total. */
int  warmup_allows(warmup_t *w, const egress_source_t *s, const char *site, uint64_t now_ms);
/* One message of s to site taken (call when a source is chosen for a
 * domain leg). Nothing is counted for a source without a limit today. */
void warmup_count(warmup_t *w, const egress_source_t *s, const char *site, uint64_t now_ms);

typedef struct warmup_stats {
    uint64_t flushes;      /* EVALs sent */
    uint64_t redis_errors; /* of those, failed, timed out or answered in the wrong shape */
    size_t   keys;         /* entries held (source, site; today's key) */
    int      fallback;     /* 1 while Redis is configured and not answering (or not yet) */
} warmup_stats_t;
void warmup_get_stats(const warmup_t *w, warmup_stats_t *st);

/* The flush script; exposed for tests. KEYS = the day keys; ARGV[1] the
 * TTL in seconds, then one count per key (0: GET). Returns the totals. */
extern const char WARMUP_REDIS_SCRIPT[];

#endif

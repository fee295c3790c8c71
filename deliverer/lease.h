/*
 * deliverer/lease.h - fleet-wide connection limits per destination site,
 * kept in Redis as leases that expire.
 *
 * Every worker of every process has its own SMTP pool, so a limit of N
 * connections to a site ("google.com" for every domain whose MX hosts end
 * in google.com) kept by each pool alone would be N x workers x pods. A
 * lease table (one per worker) tells its worker how many connections it
 * may use for a site so that the whole fleet stays within N.
 *
 * Data in Redis (prefix "mp:cl" by default):
 *   <prefix>:<site>    hash, field = holder, value = "claim want expiry_ms"
 *   <prefix>@holders   sorted set of the live holders, score = expiry_ms
 * expiry_ms is Redis' own clock (TIME inside the script), so the pods'
 * clocks do not matter. Both keys get a PEXPIRE of 3 x ttl on every write,
 * so a site nobody claims any more disappears.
 *
 * Renewal: every renew_ms the table sends an EVAL of LEASE_REDIS_SCRIPT
 * (KEYS = the registry, then the site keys; ARGV = ttl, holder, then
 * limit, want and held per site) for the sites due: one not answered yet,
 * or while the fallback is in force; one whose limit changed, or whose
 * claim would (held above its grant, or no longer); one that wants more
 * than its grant (it waits for room); one where the last answer said
 * another holder waits (contended, below); one to release (want 0); and
 * any other once refresh_ms (ttl / 4, at least renew_ms) has passed since
 * it was last sent, which keeps its claim from expiring. A settled site
 * (granted what it wants, nobody waiting) thus costs one renewal every
 * refresh_ms instead of every renew_ms, and a period with no site due and
 * the registry fresh sends nothing. At most LEASE_CHUNK (128) sites go in
 * one EVAL; a round with more sends the next chunk as soon as the one
 * before is answered, so no single script holds Redis (single-threaded)
 * long and this connection's other commands (the ledger's marks) are not
 * queued behind the whole round. For each site the script drops
 * the fields whose expiry has passed, then computes this holder's grant:
 *
 *   others  = the other live holders of the site (claim c_o, want w_o)
 *   free    = max(0, limit - sum(c_o))
 *   target  = this holder's max-min fair share of limit over the wants of
 *             every holder that wants something (water filling: holders
 *             wanting less than an equal split get what they want, the
 *             rest split what is left equally; the remainder of that split
 *             goes one each to the first holders in the order of their
 *             names, so every holder computes the same division)
 *   grant   = min(want, free, target)
 *
 * (the reply: { live holders, each site's grant, then each site's
 * contended flag: 1 when another live holder there wants more than it
 * claims, so this holder's share may have to shrink or what it frees is
 * awaited: such a site is renewed every period until the flag clears)
 * and stores "claim want now+ttl" as its field, claim = max(grant, held)
 * (want 0 deletes the field: the claim is released). held is what the
 * holder still has open there (lease_held()): a holder whose share
 * shrank keeps claiming the connections it has not closed yet, so the
 * others are not granted them before they are closed. Since grant <=
 * free, the claims of a site never sum to more than its limit, whatever
 * the order of renewals, except by what a shrinking holder still holds. They
 * converge: a holder over its target is cut to it by its next renewal,
 * after which the free room of each holder under its target covers it;
 * so within about two renewal periods of the wants settling every holder
 * has its target (a settled holder learns that another waits at its next
 * refresh, within refresh_ms, then renews every period).
 * Example, limit 100: A holds 100, B wants 50. B's
 * renewal: free 0, grant 0. A's: target 50, grant 50. B's next: free 50,
 * grant 50. Never more than 100 claimed. (target is at least the simpler
 * max(floor(limit / n_wanting), limit - sum(w_o)), and sums to the limit
 * when demand exceeds it.) A holder that stops renewing (killed) keeps its
 * claim until its expiry, then the others' next renewals take its share:
 * within ttl + renew_ms. Each holder uses the limit it is given; holders
 * configured with different limits for one site each respect their own.
 * Cost: the script reads every field of a site on every renewal of every
 * holder of it, so Redis spends about holders^2 x sites field reads per
 * renewal period (measured on Redis 7, loopback: one renewal of 100 sites
 * x 100 holders 14.6 ms, of 1 site x 1,000 holders 2.7 ms; 1,000 sites x
 * 4 holders 9-15 ms round trip, about 10 ms of it Redis' own time). Fine
 * for tens of holders per site and sites with a configured limit; a fleet
 * of hundreds of workers all sending to one site needs a longer renew_ms
 * or per-process holders, and a renewal must fit the Redis client's
 * command timeout (a failed one is the fallback).
 *
 * Allowance: what lease_want() returns and lease_changed_cb reports.
 *  - Redis answering: the last grant, capped by the current limit; a site
 *    not yet claimed gets 0 until its first answer (its first claim goes
 *    out early, a quarter renewal period after the last one at most).
 *  - Fallback: before Redis has ever answered, or since a renewal failed
 *    or timed out: max(1, ceil(limit / holders)), holders = the live
 *    holders the last successful answer counted (the registry's size), or
 *    cfg.local_holders when none did. Logged once per transition (warn
 *    falling back, info when Redis answers again).
 *  - No Redis configured (redis NULL): always max(1, ceil(limit /
 *    local_holders)), never called "fallback".
 * The caller shrinks by not opening new connections while it holds more
 * than its allowance (and by closing idle ones, sites.h); what it still
 * holds stays claimed (lease_held), so the sum of open connections stays
 * within the limit while a shrinking holder's connections end.
 *
 * Callbacks: lease_changed_cb fires from a renewal's reply (or failure)
 * for each site whose allowance differs from what the caller last got
 * (returned or reported); never from inside lease_want().
 * One table per worker thread, used only from that worker's loop.
 */
#ifndef MP_DELIVERER_LEASE_H
#define MP_DELIVERER_LEASE_H

#include <stddef.h>
#include <stdint.h>

#include "core/loop.h"
#include "core/rclient.h"

typedef struct lease_config {
    unsigned    ttl_ms;        /* a holder's claims expire this long after its last renewal; 0 means 15000 */
    unsigned    renew_ms;      /* renewal period; 0 means 1000 */
    unsigned    local_holders; /* holders assumed before Redis ever answered (this process's worker count); 0 means 1 */
    const char *prefix;        /* key prefix; NULL or "" means "mp:cl" */
} lease_config_t;

typedef struct lease_table lease_table_t;

typedef struct lease_stats {
    uint64_t renewals;        /* renewal EVALs sent */
    uint64_t renewals_failed; /* renewals that failed, timed out or got a reply of the wrong shape */
    uint64_t fallbacks;       /* transitions to the fallback share */
    size_t   sites;           /* entries held */
    int      fallback;        /* 1 while the fallback share is in force (Redis configured, not answering) */
    unsigned holders;         /* live holders the last successful answer counted; 0 before one */
} lease_stats_t;

/* allowance of one site changed (grown or shrunk) - called from the renewal's reply, never inside lease_want() */
typedef void (*lease_changed_cb)(void *arg, const char *site, unsigned allowance);

/* redis may be NULL (no Redis configured: always the local share); it is
 * borrowed and must outlive the table. holder: unique per worker in the
 * fleet, e.g. "<hostname>:<pid>:<worker-index>" (caller builds it). cfg
 * may be NULL (defaults). Never NULL. */
lease_table_t *lease_new(loop_t *loop, rclient_t *redis, const char *holder, const lease_config_t *cfg,
                         lease_changed_cb cb, void *arg);
/* Best effort: gives up this holder's claims (one HDEL per site and a ZREM
 * of the registry, sent without waiting; they go out when the loop next
 * runs, so free the table before the Redis client's last loop pass; lost
 * ones expire within ttl). No callback after this. NULL harmless. */
void lease_free(lease_table_t *t);

/* Say how many connections this worker would like for site under the
 * fleet-wide limit `limit` (want already capped by the caller) and get how
 * many it may use now. Cheap: a hash lookup, no I/O; the claim is sent on
 * the next renewal tick. want = 0 with nothing held lets the entry go
 * after its claim is released in Redis (at once without Redis, or when
 * Redis never had it). */
unsigned lease_want(lease_table_t *t, const char *site, unsigned limit, unsigned want);
/* The connections the caller holds at site now (running and idle), sent
 * with the next renewal; for a site lease_want() created. */
void lease_held(lease_table_t *t, const char *site, unsigned conns);

/* counters for metrics/tests: renewals sent, failed, sites known, fallback in force */
void lease_get_stats(const lease_table_t *t, lease_stats_t *st);

/* The fallback share: max(1, ceil(limit / holders)); holders 0 counts as 1. */
unsigned lease_fallback_share(unsigned limit, unsigned holders);

/* The renewal script (see above); exposed for tests that drive it directly. */
extern const char LEASE_REDIS_SCRIPT[];

#endif

/*
 * SUMMARY
 *  deliverer/lease.c - fleet-wide connection limits per site as leases in
 *  Redis (see lease.h for the data model and the grant).
 * DESCRIPTION
 *  An entry per site (core/htable.h, keyed by the site name) keeps the
 *  caller's limit and want, the last grant and what the caller was last
 *  told. lease_want() only updates the entry and answers from it. One loop
 *  timer per table renews: every renew_ms a round starts, whose EVALs
 *  carry the entries due (entry_due(): lease.h, "Renewal"), at most
 *  LEASE_CHUNK each, one after the other (more_timer), plus the holder
 *  registry; one renewal is in flight at a time (a tick that finds one
 *  still out waits for the next). The reply sets the grants of the entries it carried, then every
 *  entry whose allowance changed is reported (lease_changed_cb); a failure
 *  switches the table to the fallback share and reports the same way.
 *  A new site, while Redis answers, gets 0 until its first grant, so its
 *  first claim is brought forward (at most a quarter period after the last
 *  renewal).
 *
 *  Entries are freed only where no pointer to them is live: an entry
 *  carried by the renewal in flight or waiting in a report walk is "busy";
 *  lease_want() with want 0 frees an entry at once only when it is not
 *  busy and holds nothing in Redis (no claim sent since its last release,
 *  or the last one surely expired); others go after the reply that
 *  released them, or at a tick once their claim has expired.
 *
 *  Callbacks may call lease_want() (entries inserted meanwhile are
 *  reported by the next reply) and lease_free(), which is then deferred
 *  until the walk returns (`depth`, `free_pending`).
 * DIAGNOSTICS
 *  warn lease/fallback when a renewal fails while Redis answered (or before
 *  it ever did), info lease/redis_back when one succeeds again; one line
 *  per transition. Counters: mailpump_lease_renewals_total,
 *  mailpump_lease_renewals_failed_total; gauge mailpump_lease_fallback.
 */
#include "deliverer/lease.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "core/htable.h"
#include "core/log.h"
#include "core/util.h"
#include "metrics/metrics.h"

#define LEASE_DEFAULT_TTL_MS   15000u
#define LEASE_DEFAULT_RENEW_MS 1000u
#define LEASE_DEFAULT_PREFIX   "mp:cl"

typedef struct entry {
    htable_node_t node;      /* in t->sites, keyed by site */
    char         *site;
    char         *key;       /* <prefix>:<site> */
    unsigned      limit, want;
    unsigned      conns;     /* connections the caller holds there (lease_held) */
    unsigned      grant;     /* the last grant Redis gave */
    int           answered;  /* a successful renewal carried it */
    unsigned      told;      /* the allowance the caller last got */
    int           busy;      /* carried by the renewal in flight, or waiting in a report walk */
    unsigned      sent_want; /* the want the renewal in flight carries */
    unsigned      sent_limit, sent_held; /* ... its limit and held (capped by the limit) */
    unsigned      a_limit, a_want, a_held; /* what the last answered renewal carried */
    int           contended; /* that answer said another holder wants more than it claims */
    uint64_t      renewed_ms; /* loop time of that renewal's sending */
    uint64_t      round;     /* the renewal round that last carried it */
    int           held;      /* a claim may be in Redis */
    uint64_t      held_until; /* loop time after which that claim has surely expired */
} entry_t;

struct lease_table {
    loop_t          *loop;
    rclient_t       *rc;
    char            *holder;
    char            *prefix;
    char            *registry;  /* <prefix>@holders */
    unsigned         ttl_ms, renew_ms, local_holders;
    lease_changed_cb cb;
    void            *arg;
    htable_t         sites;
    loop_timer_t     tick;
    loop_timer_t     more_timer; /* sends the next chunk of a round */
    uint64_t         inflight;  /* the renewal's command id, 0 when none */
    entry_t        **sent;      /* the entries it carries, in KEYS order */
    size_t           nsent;
    uint64_t         last_sent_ms;
    int              fallback;  /* the fallback share is in force */
    int              failing;   /* the last renewal failed (logged) */
    unsigned         holders;   /* live holders the last answer counted */
    unsigned         depth;     /* report walks on the stack */
    int              free_pending;
    int              early;     /* a new site waits for the renewal in flight to end */
    uint64_t         round;     /* renewal rounds started (a tick starts one) */
    int              more;      /* the round has entries left for another chunk */
    unsigned         refresh_ms; /* a settled entry is renewed at least this often */
    uint64_t         renewals, renewals_failed, fallbacks;
};

/* KEYS[1] the holder registry, KEYS[2..] the sites; ARGV[1] ttl, ARGV[2]
 * holder, then limit, want and held per site. Returns { live holders,
 * grant of each site, then contended (1: another live holder wants more
 * than it claims there) of each site }. See lease.h for the algorithm. */
const char LEASE_REDIS_SCRIPT[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local ttl = tonumber(ARGV[1])\n"
    "local me = ARGV[2]\n"
    "local exp = now + ttl\n"
    "local keep = ttl * 3\n"
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)\n"
    "redis.call('ZADD', KEYS[1], exp, me)\n"
    "redis.call('PEXPIRE', KEYS[1], keep)\n"
    "local out = { redis.call('ZCARD', KEYS[1]) }\n"
    "local flags = {}\n"
    "for i = 2, #KEYS do\n"
    "  local key = KEYS[i]\n"
    "  local limit = tonumber(ARGV[3 * i - 3])\n"
    "  local want = tonumber(ARGV[3 * i - 2])\n"
    "  local held = tonumber(ARGV[3 * i - 1])\n"
    "  local f = redis.call('HGETALL', key)\n"
    "  local taken = 0\n"
    "  local list = {}\n"
    "  local waiting = 0\n"
    "  for j = 1, #f, 2 do\n"
    "    local h = f[j]\n"
    "    if h ~= me then\n"
    "      local c, w, e = string.match(f[j + 1], '^(%d+) (%d+) (%d+)$')\n"
    "      if e == nil or tonumber(e) <= now then\n"
    "        redis.call('HDEL', key, h)\n"
    "      else\n"
    "        taken = taken + tonumber(c)\n"
    "        if tonumber(w) > 0 then list[#list + 1] = { tonumber(w), h } end\n"
    "        if tonumber(w) > tonumber(c) then waiting = 1 end\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  local grant = 0\n"
    "  if want > 0 then\n"
    "    list[#list + 1] = { want, me }\n"
    "    table.sort(list, function(a, b)\n"
    "      if a[1] ~= b[1] then return a[1] < b[1] end\n"
    "      return a[2] < b[2]\n"
    "    end)\n"
    "    local rem, k, idx, target = limit, #list, 1, nil\n"
    "    while idx <= #list do\n"
    "      if list[idx][1] > math.floor(rem / k) then break end\n"
    "      if list[idx][2] == me then target = want break end\n"
    "      rem = rem - list[idx][1]\n"
    "      k = k - 1\n"
    "      idx = idx + 1\n"
    "    end\n"
    "    if target == nil then\n"
    "      local rank = 0\n"
    "      for j = idx, #list do\n"
    "        if list[j][2] < me then rank = rank + 1 end\n"
    "      end\n"
    "      target = math.floor(rem / k)\n"
    "      if rank < rem % k then target = target + 1 end\n"
    "    end\n"
    "    local free = limit - taken\n"
    "    if free < 0 then free = 0 end\n"
    "    grant = math.min(want, target, free)\n"
    "    local claim = math.max(grant, math.min(held, limit))\n"
    "    redis.call('HSET', key, me, string.format('%d %d %d', claim, want, exp))\n"
    "    redis.call('PEXPIRE', key, keep)\n"
    "  else\n"
    "    redis.call('HDEL', key, me)\n"
    "  end\n"
    "  out[#out + 1] = grant\n"
    "  flags[#flags + 1] = waiting\n"
    "end\n"
    "for i = 1, #flags do out[#out + 1] = flags[i] end\n"
    "return out\n";

unsigned lease_fallback_share(unsigned limit, unsigned holders)
{
    if (holders == 0)
        holders = 1;
    unsigned share = limit / holders + (limit % holders != 0);
    return share > 0 ? share : 1;
}

static unsigned allowance(const lease_table_t *t, const entry_t *e)
{
    if (t->rc == NULL)
        return lease_fallback_share(e->limit, t->local_holders);
    if (t->fallback)
        return lease_fallback_share(e->limit, t->holders ? t->holders : t->local_holders);
    if (!e->answered)
        return 0;
    return e->grant < e->limit ? e->grant : e->limit;
}

static entry_t *entry_find(const lease_table_t *t, const char *site)
{
    htable_node_t *n = htable_find_str(&t->sites, site);
    return n ? HTABLE_ENTRY(n, entry_t, node) : NULL;
}

static void entry_free(lease_table_t *t, entry_t *e)
{
    htable_remove(&t->sites, &e->node);
    free(e->site);
    free(e->key);
    free(e);
}

/* Nothing of it is in Redis, or what is has expired by now. */
static int entry_empty(const lease_table_t *t, const entry_t *e)
{
    return !e->held || loop_now_ms(t->loop) >= e->held_until;
}

static void table_release(lease_table_t *t);

/* Report every entry whose allowance differs from what its caller last
 * got. The walk runs over a snapshot whose entries are busy (not freed
 * by lease_want()) until their turn is over; entries the callbacks add
 * wait for the next report. */
static void report_all(lease_table_t *t)
{
    size_t n = htable_count(&t->sites), k = 0;
    if (n == 0 || t->cb == NULL)
        return;
    entry_t **snap = xcalloc(n, sizeof(*snap));
    htable_iter_t it;
    htable_node_t *node;
    htable_iter_init(&it, &t->sites);
    while ((node = htable_iter_next(&it)) != NULL) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, node);
        e->busy = 1;
        snap[k++] = e;
    }
    t->depth++;
    for (size_t i = 0; i < k; i++) {
        entry_t *e = snap[i];
        /* busy through its own callback too: lease_want(site, 0) there
         * must not free the site string the callback was given */
        unsigned a = allowance(t, e);
        if (!t->free_pending && a != e->told) {
            e->told = a;
            t->cb(t->arg, e->site, a);
        }
        e->busy = 0;
    }
    t->depth--;
    free(snap);
}

static void set_fallback(lease_table_t *t, int on)
{
    if (t->fallback == on)
        return;
    t->fallback = on;
    metrics_gauge_add(MET_LEASE_FALLBACK, on ? 1 : -1);
    if (on)
        t->fallbacks++;
}

static void arm_tick(lease_table_t *t, uint64_t ms)
{
    loop_timer_set(t->loop, &t->tick, ms);
}

/* A new site gets 0 until its first grant: renew a quarter period after
 * the last renewal rather than a whole one (or right after the renewal
 * in flight ends). */
static void bring_forward(lease_table_t *t)
{
    if (t->rc == NULL || t->fallback)
        return;
    if (t->inflight != 0) {
        t->early = 1;
        return;
    }
    uint64_t now = loop_now_ms(t->loop), due = t->last_sent_ms + t->renew_ms / 4;
    if (!loop_timer_active(&t->tick) || due < t->tick.when)
        arm_tick(t, due > now ? due - now : 0);
}

static void arm_more(lease_table_t *t)
{
    loop_timer_set(t->loop, &t->more_timer, 0);
}

static void on_renewal(void *arg, const redisReply *r, const char *err)
{
    lease_table_t *t = arg;
    t->inflight = 0;
    int ok = r != NULL && r->type == REDIS_REPLY_ARRAY && r->elements == 2 * t->nsent + 1;
    for (size_t i = 0; ok && i < r->elements; i++)
        ok = r->element[i]->type == REDIS_REPLY_INTEGER && r->element[i]->integer >= 0;
    if (ok) {
        long long h = r->element[0]->integer;
        t->holders = h > 0 ? (unsigned)h : 1;
        set_fallback(t, 0);
        if (t->failing)
            log_info("lease", "redis_back", "holder=%s sites=%zu holders=%u", LOG_Q(t->holder), t->nsent,
                     t->holders);
        t->failing = 0;
    } else {
        t->renewals_failed++;
        metrics_inc(MET_LEASE_RENEWALS_FAILED, 1);
        if (!t->failing) {
            unsigned h = t->holders ? t->holders : t->local_holders;
            log_warn("lease", "fallback", "holder=%s error=%s holders=%u", LOG_Q(t->holder),
                     LOG_Q(err ? err : "unexpected reply"), h);
        }
        t->failing = 1;
        /* before the first answer the fallback is in force already */
        set_fallback(t, 1);
    }
    for (size_t i = 0; i < t->nsent; i++) {
        entry_t *e = t->sent[i];
        e->busy = 0;
        if (!ok)
            continue;
        e->answered = 1;
        e->grant = (unsigned)r->element[i + 1]->integer;
        e->contended = r->element[t->nsent + i + 1]->integer != 0;
        e->a_limit = e->sent_limit;
        e->a_want = e->sent_want;
        e->a_held = e->sent_held;
        if (e->sent_want == 0) {
            e->held = 0;
            if (e->want == 0) /* released, and still wanted by nobody */
                entry_free(t, e);
        }
    }
    t->nsent = 0;
    if (ok && t->more) /* the rest of this round, at once: one chunk at a time */
        arm_more(t);
    if (t->early) {
        t->early = 0;
        bring_forward(t);
    }
    report_all(t);
    if (t->free_pending)
        table_release(t);
}

/* Sites per renewal EVAL: a round with more goes in several, one after
 * the other, so that no single script holds Redis (single-threaded) for
 * long and the other commands of this connection (the ledger's marks)
 * are not queued behind all of it. */
#define LEASE_CHUNK 128

static unsigned held_capped(const entry_t *e)
{
    return e->conns < e->limit ? e->conns : e->limit;
}

/* Whether this round's renewal must carry e (see lease.h, "Renewal"). */
static int entry_due(const lease_table_t *t, const entry_t *e, uint64_t now)
{
    if (e->busy || e->round == t->round)
        return 0;
    if (t->fallback || !e->answered)
        return 1;
    if (e->want == 0)
        return e->held; /* its claim is to be released */
    unsigned h = held_capped(e), ha = e->a_held < e->a_limit ? e->a_held : e->a_limit;
    unsigned claim_now = e->grant > h ? e->grant : h, claim_then = e->grant > ha ? e->grant : ha;
    return e->limit != e->a_limit || claim_now != claim_then || e->want > e->grant || e->contended ||
           now - e->renewed_ms >= t->refresh_ms;
}

static void renew(lease_table_t *t)
{
    uint64_t now = loop_now_ms(t->loop);
    /* entries wanting nothing whose claim expired need no release */
    htable_node_t *node;
    htable_iter_t it;
    htable_iter_init(&it, &t->sites);
    size_t due = 0;
    while ((node = htable_iter_next(&it)) != NULL) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, node);
        if (e->want == 0 && !e->busy && entry_empty(t, e))
            entry_free(t, e); /* the node just returned: safe */
        else if (entry_due(t, e, now))
            due++;
    }
    t->more = due > LEASE_CHUNK;
    size_t n = due > LEASE_CHUNK ? LEASE_CHUNK : due;
    /* nothing to say: the registry entry is refreshed at least every refresh_ms */
    if (n == 0 && !t->fallback && t->holders > 0 && now - t->last_sent_ms < t->refresh_ms)
        return;
    size_t argc = 6 + 4 * n; /* EVAL script numkeys registry keys... ttl holder (limit want held)... */
    const char **argv = xcalloc(argc, sizeof(char *));
    char **owned = xcalloc(3 * n + 2, sizeof(char *));
    size_t a = 0, o = 0;
    t->sent = xrealloc(t->sent, (n ? n : 1) * sizeof(entry_t *));
    t->nsent = 0;
    argv[a++] = "EVAL";
    argv[a++] = LEASE_REDIS_SCRIPT;
    owned[o] = xmalloc(24);
    snprintf(owned[o], 24, "%zu", n + 1);
    argv[a++] = owned[o++];
    argv[a++] = t->registry;
    htable_iter_init(&it, &t->sites);
    while (t->nsent < n && (node = htable_iter_next(&it)) != NULL) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, node);
        if (!entry_due(t, e, now))
            continue;
        argv[a++] = e->key;
        t->sent[t->nsent++] = e;
    }
    owned[o] = xmalloc(24);
    snprintf(owned[o], 24, "%u", t->ttl_ms);
    argv[a++] = owned[o++];
    argv[a++] = t->holder;
    for (size_t i = 0; i < t->nsent; i++) {
        entry_t *e = t->sent[i];
        e->busy = 1;
        e->round = t->round;
        e->renewed_ms = now;
        e->sent_want = e->want;
        e->sent_limit = e->limit;
        e->sent_held = e->conns;
        if (e->want > 0) {
            e->held = 1;
            e->held_until = now + t->ttl_ms + t->renew_ms;
        }
        owned[o] = xmalloc(24);
        snprintf(owned[o], 24, "%u", e->limit);
        argv[a++] = owned[o++];
        owned[o] = xmalloc(24);
        snprintf(owned[o], 24, "%u", e->want);
        argv[a++] = owned[o++];
        owned[o] = xmalloc(24);
        snprintf(owned[o], 24, "%u", e->conns);
        argv[a++] = owned[o++];
    }
    t->renewals++;
    metrics_inc(MET_LEASE_RENEWALS, 1);
    t->last_sent_ms = now;
    t->inflight = rclient_commandargv(t->rc, on_renewal, t, (int)a, argv, NULL);
    for (size_t i = 0; i < o; i++)
        free(owned[i]);
    free(owned);
    free(argv);
}

static void on_tick(loop_t *loop, loop_timer_t *timer, void *arg)
{
    lease_table_t *t = arg;
    arm_tick(t, t->renew_ms);
    if (t->inflight == 0) {
        t->round++;
        renew(t);
    }
}

/* The next chunk of the round, once the last one is answered. */
static void on_more(loop_t *loop, loop_timer_t *timer, void *arg)
{
    lease_table_t *t = arg;
    if (t->inflight == 0 && t->more)
        renew(t);
}

lease_table_t *lease_new(loop_t *loop, rclient_t *redis, const char *holder, const lease_config_t *cfg,
                         lease_changed_cb cb, void *arg)
{
    lease_table_t *t = xcalloc(1, sizeof(*t));
    t->loop = loop;
    t->rc = redis;
    t->holder = xstrdup(holder && holder[0] ? holder : "-");
    t->ttl_ms = cfg && cfg->ttl_ms ? cfg->ttl_ms : LEASE_DEFAULT_TTL_MS;
    t->renew_ms = cfg && cfg->renew_ms ? cfg->renew_ms : LEASE_DEFAULT_RENEW_MS;
    t->local_holders = cfg && cfg->local_holders ? cfg->local_holders : 1;
    t->prefix = xstrdup(cfg && cfg->prefix && cfg->prefix[0] ? cfg->prefix : LEASE_DEFAULT_PREFIX);
    buf_t b = BUF_INIT;
    buf_printf(&b, "%s@holders", t->prefix);
    t->registry = buf_steal(&b, NULL);
    t->cb = cb;
    t->arg = arg;
    htable_init(&t->sites, HTABLE_STR, 16, NULL); /* xcalloc: cannot fail */
    loop_timer_init(&t->tick, on_tick, t);
    loop_timer_init(&t->more_timer, on_more, t);
    t->refresh_ms = t->ttl_ms / 4 > t->renew_ms ? t->ttl_ms / 4 : t->renew_ms;
    if (redis != NULL) {
        set_fallback(t, 1); /* until the first answer; not counted as a fall */
        t->fallbacks = 0;
        arm_tick(t, 0); /* register at once: the holder count comes with the answer */
    }
    return t;
}

static void table_release(lease_table_t *t)
{
    if (t->inflight)
        rclient_cancel(t->rc, t->inflight);
    loop_timer_cancel(t->loop, &t->tick);
    loop_timer_cancel(t->loop, &t->more_timer);
    htable_node_t *n;
    size_t hint = 0;
    while ((n = htable_first(&t->sites, &hint)) != NULL) {
        entry_t *e = HTABLE_ENTRY(n, entry_t, node);
        if (t->rc != NULL && e->held) {
            const char *argv[] = { "HDEL", e->key, t->holder };
            rclient_commandargv(t->rc, NULL, NULL, 3, argv, NULL);
        }
        entry_free(t, e);
    }
    if (t->rc != NULL) {
        const char *argv[] = { "ZREM", t->registry, t->holder };
        rclient_commandargv(t->rc, NULL, NULL, 3, argv, NULL);
    }
    set_fallback(t, 0);
    htable_fini(&t->sites);
    free(t->sent);
    free(t->holder);
    free(t->prefix);
    free(t->registry);
    free(t);
}

void lease_free(lease_table_t *t)
{
    if (t == NULL)
        return;
    if (t->depth > 0) {
        t->free_pending = 1;
        return;
    }
    table_release(t);
}

unsigned lease_want(lease_table_t *t, const char *site, unsigned limit, unsigned want)
{
    entry_t *e = entry_find(t, site);
    if (e == NULL) {
        if (want == 0)
            return 0;
        e = xcalloc(1, sizeof(*e));
        e->site = xstrdup(site);
        buf_t b = BUF_INIT;
        buf_printf(&b, "%s:%s", t->prefix, site);
        e->key = buf_steal(&b, NULL);
        htable_insert_str(&t->sites, &e->node, e->site);
        bring_forward(t);
    }
    e->limit = limit;
    e->want = want;
    if (want == 0 && !e->busy && (t->rc == NULL || entry_empty(t, e))) {
        entry_free(t, e);
        return 0;
    }
    e->told = allowance(t, e);
    return e->told;
}

void lease_held(lease_table_t *t, const char *site, unsigned conns)
{
    entry_t *e = entry_find(t, site);
    if (e != NULL)
        e->conns = conns;
}

void lease_get_stats(const lease_table_t *t, lease_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    st->renewals = t->renewals;
    st->renewals_failed = t->renewals_failed;
    st->fallbacks = t->fallbacks;
    st->sites = htable_count(&t->sites);
    st->fallback = t->fallback;
    st->holders = t->holders;
}

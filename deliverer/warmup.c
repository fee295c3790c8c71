/*
 * SUMMARY
 *  deliverer/warmup.c - counts each source's messages per destination site
 *  and UTC day, fleet-wide in Redis, against its warm-up volume (see
 *  warmup.h for the data model and the rule).
 * DESCRIPTION
 *  An entry per (source, site) (core/htable.h, keyed "<source>:<site>":
 *  source names hold no ':') keeps the day it counts, that day's key, the
 *  fleet's last known total, what this worker counted and has not flushed
 *  (unflushed), what the flush in flight carries (inflight) and this
 *  worker's own count of the day. warmup_allows() and warmup_count() only
 *  touch the entry. A call on another UTC day than the entry's starts it
 *  over on the new day's key (counts 0); a flush in flight for the old day
 *  is then ignored when it answers.
 *
 *  One loop timer per table: every FLUSH_MS one EVAL carries the entries
 *  with something unflushed and, for the others, those not read for
 *  READ_MS (a new entry at once: its flush is brought forward to a quarter
 *  period after the last one). One flush is in flight at a time (a tick
 *  that finds one out waits for the next). Its reply sets the fleet's
 *  totals; a failure puts the carried counts back into unflushed, to be
 *  sent with the next flush, and keeps the fallback share in force until
 *  a flush succeeds. Entries unused for FORGET_MS are freed at a tick with
 *  no flush in flight (so no reply can find a freed entry), unless they
 *  still hold counts for Redis.
 * DIAGNOSTICS
 *  info warmup/limit_reached source= site= limit= day= once per entry and
 *  day; warn warmup/fallback when flushes start failing, info
 *  warmup/redis_back when one succeeds again. Counter
 *  mailpump_warmup_limited_total.
 */
#include "deliverer/warmup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "core/htable.h"
#include "core/log.h"
#include "core/util.h"
#include "metrics/metrics.h"

#define WARMUP_PREFIX    "mp:wu"
#define WARMUP_FLUSH_MS  1000u
#define WARMUP_READ_MS   3000u             /* re-read of a key with nothing to flush */
#define WARMUP_FORGET_MS (10u * 60 * 1000) /* an entry unused this long is forgotten */
#define WARMUP_TTL_S     (2u * 86400)      /* EXPIRE of a day's key */

typedef struct entry {
    htable_node_t node;      /* in w->entries, keyed by id */
    char         *id;        /* "<source>:<site>" */
    char         *source;
    char         *site;
    int64_t       day;       /* the UTC day counted (days since 1970-01-01) */
    char         *key;       /* mp:wu:<source>:<site>:<yyyymmdd> */
    uint64_t      fleet;     /* the last total Redis gave for key */
    int           known;     /* Redis answered for key */
    uint64_t      unflushed; /* counted, not sent yet */
    uint64_t      inflight;  /* carried by the flush in flight */
    uint64_t      own;       /* this worker's count of the day */
    uint64_t      used_ms;   /* loop time of the last call for it */
    uint64_t      read_ms;   /* loop time of the last flush carrying it; 0: due */
    int           logged;    /* limit_reached logged for day */
    int           busy;      /* carried by the flush in flight */
    int64_t       sent_day;  /* the day that flush counts */
} entry_t;

struct warmup {
    loop_t      *loop;
    rclient_t   *rc;
    unsigned     local_workers;
    htable_t     entries;
    loop_timer_t tick;
    uint64_t     inflight;   /* the flush's command id, 0 when none */
    entry_t    **sent;       /* the entries it carries, in KEYS order */
    size_t       nsent;
    uint64_t     last_sent_ms;
    int          early;      /* a new entry waits for the flush in flight to end */
    int          fallback;   /* Redis configured, not answering (or not yet) */
    int          failing;    /* the last flush failed (logged) */
    uint64_t     flushes, redis_errors;
};

/* KEYS the day keys; ARGV[1] the TTL (s), ARGV[1 + i] the count of KEYS[i]
 * (0: only read it). Returns the totals, in KEYS order. */
const char WARMUP_REDIS_SCRIPT[] =
    "local ttl = tonumber(ARGV[1])\n"
    "local out = {}\n"
    "for i = 1, #KEYS do\n"
    "  local n = tonumber(ARGV[i + 1])\n"
    "  if n > 0 then\n"
    "    out[i] = redis.call('INCRBY', KEYS[i], n)\n"
    "    redis.call('EXPIRE', KEYS[i], ttl)\n"
    "  else\n"
    "    out[i] = tonumber(redis.call('GET', KEYS[i]) or '0') or 0\n"
    "  end\n"
    "end\n"
    "return out\n";

static void set_key(entry_t *e, int64_t day)
{
    buf_t b = BUF_INIT;
    buf_printf(&b, "%s:%s:%08u", WARMUP_PREFIX, e->id, policy_day_yyyymmdd(day));
    free(e->key);
    e->key = buf_steal(&b, NULL);
}

/* Start the entry over on day (a new key, counts 0). */
static void entry_roll(entry_t *e, int64_t day)
{
    if (e->day == day)
        return;
    e->day = day;
    e->fleet = 0;
    e->known = 0;
    e->unflushed = 0;
    e->inflight = 0;
    e->own = 0;
    e->logged = 0;
    e->read_ms = 0;
    set_key(e, day);
}

static void entry_free(warmup_t *w, entry_t *e)
{
    htable_remove(&w->entries, &e->node);
    free(e->id);
    free(e->source);
    free(e->site);
    free(e->key);
    free(e);
}

static void arm_tick(warmup_t *w, uint64_t ms)
{
    loop_timer_set(w->loop, &w->tick, ms);
}

/* A new entry has only the fallback share until its first answer: flush a
 * quarter period after the last flush rather than a whole one (or right
 * after the flush in flight ends). */
static void bring_forward(warmup_t *w)
{
    if (w->rc == NULL || w->fallback)
        return;
    if (w->inflight != 0) {
        w->early = 1;
        return;
    }
    uint64_t now = loop_now_ms(w->loop), due = w->last_sent_ms + WARMUP_FLUSH_MS / 4;
    if (!loop_timer_active(&w->tick) || due < w->tick.when)
        arm_tick(w, due > now ? due - now : 0);
}

static entry_t *entry_get(warmup_t *w, const egress_source_t *s, const char *site, uint64_t now_ms)
{
    char small[384];
    size_t ln = strlen(s->name), ls = strlen(site), need = ln + ls + 2;
    char *id = need <= sizeof(small) ? small : xmalloc(need);
    memcpy(id, s->name, ln);
    id[ln] = ':';
    memcpy(id + ln + 1, site, ls + 1);
    htable_node_t *n = htable_find_str(&w->entries, id);
    entry_t *e;
    if (n != NULL) {
        e = HTABLE_ENTRY(n, entry_t, node);
    } else {
        e = xcalloc(1, sizeof(*e));
        e->id = xstrdup(id);
        e->source = xstrdup(s->name);
        e->site = xstrdup(site);
        e->day = policy_day_of(now_ms);
        set_key(e, e->day);
        htable_insert_str(&w->entries, &e->node, e->id);
        bring_forward(w);
    }
    if (id != small)
        free(id);
    entry_roll(e, policy_day_of(now_ms));
    e->used_ms = loop_now_ms(w->loop);
    return e;
}

static uint64_t local_share(uint64_t limit, unsigned workers)
{
    return limit / workers + (limit % workers != 0);
}

int warmup_allows(warmup_t *w, const egress_source_t *s, const char *site, uint64_t now_ms)
{
    uint64_t limit = policy_warmup_limit(s, now_ms);
    if (limit == 0)
        return 1;
    entry_t *e = entry_get(w, s, site, now_ms);
    uint64_t fleet = e->fleet + e->unflushed + e->inflight;
    int ok;
    if (w->rc != NULL && !w->fallback && e->known)
        ok = fleet < limit;
    else /* the last known total, if any, still holds */
        ok = e->own < local_share(limit, w->local_workers) && (!e->known || fleet < limit);
    if (!ok) {
        metrics_inc(MET_WARMUP_LIMITED, 1);
        if (!e->logged) {
            e->logged = 1;
            log_info("warmup", "limit_reached", "source=%s site=%s limit=%llu day=%08u counted=%llu",
                     LOG_Q(e->source), LOG_Q(e->site), (unsigned long long)limit, policy_day_yyyymmdd(e->day),
                     (unsigned long long)(e->known ? fleet : e->own));
        }
    }
    return ok;
}

void warmup_count(warmup_t *w, const egress_source_t *s, const char *site, uint64_t now_ms)
{
    if (policy_warmup_limit(s, now_ms) == 0)
        return;
    entry_t *e = entry_get(w, s, site, now_ms);
    e->own++;
    if (w->rc != NULL)
        e->unflushed++;
}

static void on_flush(void *arg, const redisReply *r, const char *err)
{
    warmup_t *w = arg;
    w->inflight = 0;
    int ok = r != NULL && r->type == REDIS_REPLY_ARRAY && r->elements == w->nsent;
    for (size_t i = 0; ok && i < r->elements; i++)
        ok = r->element[i]->type == REDIS_REPLY_INTEGER && r->element[i]->integer >= 0;
    if (ok) {
        w->fallback = 0;
        if (w->failing)
            log_info("warmup", "redis_back", "keys=%zu", w->nsent);
        w->failing = 0;
    } else {
        w->redis_errors++;
        if (!w->failing)
            log_warn("warmup", "fallback", "error=%s keys=%zu workers=%u", LOG_Q(err ? err : "unexpected reply"),
                     w->nsent, w->local_workers);
        w->failing = 1;
        w->fallback = 1;
    }
    for (size_t i = 0; i < w->nsent; i++) {
        entry_t *e = w->sent[i];
        e->busy = 0;
        if (e->day != e->sent_day) /* started over on a new day meanwhile */
            continue;
        if (ok) {
            e->fleet = (uint64_t)r->element[i]->integer;
            e->known = 1;
        } else {
            e->unflushed += e->inflight; /* again with the next flush */
            e->read_ms = 0;
        }
        e->inflight = 0;
    }
    w->nsent = 0;
    if (w->early) {
        w->early = 0;
        bring_forward(w);
    }
}

static void flush(warmup_t *w)
{
    uint64_t now = loop_now_ms(w->loop);
    size_t n = 0;
    htable_iter_t it;
    htable_node_t *node;
    htable_iter_init(&it, &w->entries);
    while ((node = htable_iter_next(&it)) != NULL) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, node);
        if (now - e->used_ms >= WARMUP_FORGET_MS && (e->unflushed == 0 || w->rc == NULL)) {
            entry_free(w, e); /* the node just returned: safe; none is busy between flushes */
            continue;
        }
        if (w->rc != NULL && (e->unflushed > 0 || e->read_ms == 0 || now - e->read_ms >= WARMUP_READ_MS))
            n++;
    }
    if (n == 0)
        return;
    size_t argc = 4 + 2 * n, a = 0; /* EVAL script numkeys keys... ttl counts... */
    const char **argv = xcalloc(argc, sizeof(char *));
    char **owned = xcalloc(n + 2, sizeof(char *));
    size_t o = 0;
    w->sent = xrealloc(w->sent, n * sizeof(entry_t *));
    w->nsent = 0;
    argv[a++] = "EVAL";
    argv[a++] = WARMUP_REDIS_SCRIPT;
    owned[o] = xmalloc(24);
    snprintf(owned[o], 24, "%zu", n);
    argv[a++] = owned[o++];
    htable_iter_init(&it, &w->entries);
    while ((node = htable_iter_next(&it)) != NULL && w->nsent < n) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, node);
        if (!(e->unflushed > 0 || e->read_ms == 0 || now - e->read_ms >= WARMUP_READ_MS))
            continue;
        argv[a++] = e->key;
        w->sent[w->nsent++] = e;
    }
    owned[o] = xmalloc(24);
    snprintf(owned[o], 24, "%u", WARMUP_TTL_S);
    argv[a++] = owned[o++];
    for (size_t i = 0; i < w->nsent; i++) {
        entry_t *e = w->sent[i];
        e->busy = 1;
        e->sent_day = e->day;
        e->inflight = e->unflushed;
        e->unflushed = 0;
        e->read_ms = now ? now : 1;
        owned[o] = xmalloc(24);
        snprintf(owned[o], 24, "%llu", (unsigned long long)e->inflight);
        argv[a++] = owned[o++];
    }
    w->flushes++;
    w->last_sent_ms = now;
    w->inflight = rclient_commandargv(w->rc, on_flush, w, (int)a, argv, NULL);
    for (size_t i = 0; i < o; i++)
        free(owned[i]);
    free(owned);
    free(argv);
}

static void on_tick(loop_t *loop, loop_timer_t *timer, void *arg)
{
    (void)loop;
    (void)timer;
    warmup_t *w = arg;
    arm_tick(w, w->rc != NULL ? WARMUP_FLUSH_MS : WARMUP_FORGET_MS / 10);
    if (w->inflight == 0)
        flush(w);
}

warmup_t *warmup_new(loop_t *loop, rclient_t *redis, unsigned local_workers)
{
    warmup_t *w = xcalloc(1, sizeof(*w));
    w->loop = loop;
    w->rc = redis;
    w->local_workers = local_workers ? local_workers : 1;
    htable_init(&w->entries, HTABLE_STR, 16, NULL); /* xcalloc: cannot fail */
    loop_timer_init(&w->tick, on_tick, w);
    w->fallback = redis != NULL; /* until the first answer */
    arm_tick(w, redis != NULL ? WARMUP_FLUSH_MS : WARMUP_FORGET_MS / 10);
    return w;
}

void warmup_free(warmup_t *w)
{
    if (w == NULL)
        return;
    if (w->inflight)
        rclient_cancel(w->rc, w->inflight);
    loop_timer_cancel(w->loop, &w->tick);
    htable_node_t *n;
    size_t hint = 0;
    while ((n = htable_first(&w->entries, &hint)) != NULL)
        entry_free(w, HTABLE_ENTRY(n, entry_t, node));
    htable_fini(&w->entries);
    free(w->sent);
    free(w);
}

void warmup_get_stats(const warmup_t *w, warmup_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    st->flushes = w->flushes;
    st->redis_errors = w->redis_errors;
    st->keys = htable_count(&w->entries);
    st->fallback = w->fallback;
}

/*
 * SUMMARY
 *  deliverer/pool.c - the per-worker SMTP session pool.
 * DESCRIPTION
 *  Two levels as in Postfix scache: destination key -> its idle sessions
 *  (most recently used first, so the rest age out) and its busy count.
 *  Destinations sit in a hash table (core/htable.h) keyed by the
 *  destination key, because every acquire and release looks one up; a
 *  destination nothing holds any more (no busy or idle session, no
 *  waiter, no cap in force) is freed at once by dest_gc(), and one kept
 *  only for its cap is freed by the sweep once the cap runs out.
 *  Waiters sit in one FIFO for the whole worker; every release, loss or
 *  eviction schedules a zero-delay "wake" that grants what it can, so a
 *  callback never runs inside acquire() or release().
 *
 *  Expiry is a sweep timer (at most once a second, armed only while
 *  something is idle) rather than a timer per session: idle sessions are
 *  few and the sweep is a short walk. Idle sessions carry no I/O timeout;
 *  the session reports any event on them (EOF, a 421) through its closed
 *  callback and the pool drops them at once.
 * DIAGNOSTICS
 *  Debug lines for reuse, park, loss and eviction; counters in
 *  smtp_pool_get_stats().
 */
#include "deliverer/pool.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/htable.h"
#include "core/log.h"
#include "core/util.h"

typedef struct pdest pdest_t;

typedef struct pconn {
    LIST_ENTRY(pconn) link; /* its destination's idle list, or the closing list */
    smtp_session_t *s;
    pdest_t        *d;      /* NULL once closing: the destination may be gone */
    uint64_t        idle_since;
    int             closing;
    smtp_pool_t    *pool;
} pconn_t;

typedef LIST_HEAD(pconn_list, pconn) pconn_list_t;

struct pdest {
    htable_node_t node;   /* in p->dests, keyed by key */
    char         *key;
    unsigned      busy;
    unsigned      nidle;
    unsigned      nwait;  /* waiters for this key in p->waits */
    int           proven; /* a transaction completed here: slow start is over */
    unsigned      cap;    /* smtp_pool_refused(): connections allowed until cap_until; 0 none */
    uint64_t      cap_until;
    pconn_list_t  idle;   /* MRU first */
};

struct smtp_pool {
    loop_t            *loop;
    smtp_pool_limits_t lim;
    htable_t           dests;   /* key -> pdest_t */
    size_t             capped;  /* destinations with a cap (d->cap != 0) */
    pconn_list_t       closing;
    TAILQ_HEAD(, smtp_pool_wait) waits;
    loop_timer_t       sweep_timer;
    loop_timer_t       wake_timer;
    size_t             busy, idle, waiting;
    smtp_pool_stats_t  st;
};

static pdest_t *dest_find(smtp_pool_t *p, const char *key)
{
    htable_node_t *n = htable_find_str(&p->dests, key);
    return n ? HTABLE_ENTRY(n, pdest_t, node) : NULL;
}

static pdest_t *dest_get(smtp_pool_t *p, const char *key)
{
    pdest_t *d = dest_find(p, key);
    if (d != NULL)
        return d;
    d = xcalloc(1, sizeof(*d));
    d->key = xstrdup(key);
    LIST_INIT(&d->idle);
    htable_insert_str(&p->dests, &d->node, d->key);
    return d;
}

static void dest_free(smtp_pool_t *p, pdest_t *d)
{
    htable_remove(&p->dests, &d->node);
    if (d->cap)
        p->capped--;
    free(d->key);
    free(d);
}

static int cap_in_force(smtp_pool_t *p, const pdest_t *d)
{
    return d->cap && loop_now_ms(p->loop) < d->cap_until;
}

/* Free d when nothing holds it any more, so that the table holds the
 * destinations in use rather than every one the worker ever met. Only
 * where no caller still has d in hand. */
static void dest_gc(smtp_pool_t *p, pdest_t *d)
{
    if (d->busy == 0 && d->nidle == 0 && d->nwait == 0 && !cap_in_force(p, d))
        dest_free(p, d);
}

static void wake_soon(smtp_pool_t *p)
{
    if (!TAILQ_EMPTY(&p->waits) && !loop_timer_active(&p->wake_timer))
        loop_timer_set(p->loop, &p->wake_timer, 0);
}

/* The sweep runs while something is idle, and while a destination is
 * capped (a capped one nothing else holds is freed there once its cap
 * has run out). */
static void arm_sweep(smtp_pool_t *p)
{
    if (p->idle == 0 && p->capped == 0) {
        loop_timer_cancel(p->loop, &p->sweep_timer);
        return;
    }
    if (!loop_timer_active(&p->sweep_timer)) {
        unsigned every = p->lim.max_idle_ms < 1000 ? p->lim.max_idle_ms : 1000;
        if (p->lim.max_age_ms < every)
            every = p->lim.max_age_ms;
        loop_timer_set(p->loop, &p->sweep_timer, every ? every : 1);
    }
}

static void on_closed(void *arg, smtp_session_t *s)
{
    pconn_t *c = arg;
    smtp_pool_t *p = c->pool;
    LIST_REMOVE(c, link);
    if (!c->closing) {
        /* the server closed an idle connection: nothing spent, just gone */
        c->d->nidle--;
        p->idle--;
        p->st.idle_lost++;
        log_debug("pool", "idle_lost", "session=%016" PRIx64 " dest=%s", smtp_session_id(s), LOG_Q(c->d->key));
        dest_gc(p, c->d);
        arm_sweep(p);
        wake_soon(p);
    }
    smtp_session_free(s); /* deferred by the session until its callback returns */
    free(c);
}

/* Unlink an idle session and say QUIT; on_closed frees it. The caller
 * runs dest_gc() on c's destination when it may have been the last. */
static void evict(smtp_pool_t *p, pconn_t *c, const char *why)
{
    LIST_REMOVE(c, link);
    c->d->nidle--;
    p->idle--;
    p->st.evicted++;
    log_debug("pool", "evict", "session=%016" PRIx64 " dest=%s reason=%s", smtp_session_id(c->s), LOG_Q(c->d->key),
              LOG_Q(why));
    c->closing = 1;
    c->d = NULL;
    LIST_INSERT_HEAD(&p->closing, c, link);
    smtp_session_quit(c->s);
    wake_soon(p);
}

static int too_old(const smtp_pool_t *p, smtp_session_t *s)
{
    return smtp_session_transactions(s) >= p->lim.max_msgs_per_session ||
           smtp_session_age_ms(s) >= p->lim.max_age_ms;
}

/* Room for one more connection to d, evicting another key's idle
 * session (least recently used) when the worker is full. */
static int room_for(smtp_pool_t *p, pdest_t *d)
{
    unsigned limit = p->lim.max_per_dest;
    if (!d->proven && p->lim.initial_per_dest > 0 && p->lim.initial_per_dest < limit)
        limit = p->lim.initial_per_dest;
    if (d->cap && loop_now_ms(p->loop) >= d->cap_until) {
        log_info("pool", "dest_cap_lifted", "dest=%s cap=%u", LOG_Q(d->key), d->cap);
        d->cap = 0;
        p->capped--;
    }
    if (d->cap && d->cap < limit)
        limit = d->cap;
    if (d->busy + d->nidle >= limit)
        return 0;
    if (p->busy + p->idle < p->lim.max_total)
        return 1;
    pconn_t *victim = NULL;
    htable_iter_t it;
    htable_iter_init(&it, &p->dests);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        pdest_t *o = HTABLE_ENTRY(n, pdest_t, node);
        if (o == d)
            continue;
        pconn_t *c;
        LIST_FOREACH(c, &o->idle, link)
            if (victim == NULL || c->idle_since < victim->idle_since)
                victim = c;
    }
    if (victim == NULL)
        return 0;
    pdest_t *o = victim->d;
    evict(p, victim, "worker_limit");
    dest_gc(p, o); /* another key's: nobody has it in hand */
    return 1;
}

/* Grant without queueing: REUSE, CONNECT or 0. */
static int try_grant(smtp_pool_t *p, pdest_t *d, smtp_session_t **out)
{
    pconn_t *c;
    while ((c = LIST_FIRST(&d->idle)) != NULL) {
        if (!smtp_session_usable(c->s)) {
            /* closed while idle and not noticed yet: drop, costs nothing */
            LIST_REMOVE(c, link);
            d->nidle--;
            p->idle--;
            p->st.idle_lost++;
            smtp_session_free(c->s);
            free(c);
            continue;
        }
        if (too_old(p, c->s)) {
            evict(p, c, "limits");
            continue;
        }
        LIST_REMOVE(c, link);
        d->nidle--;
        p->idle--;
        d->busy++;
        p->busy++;
        p->st.reuses++;
        *out = c->s;
        log_debug("pool", "reuse", "session=%016" PRIx64 " dest=%s txn=%u", smtp_session_id(c->s), LOG_Q(d->key),
                  smtp_session_transactions(c->s));
        free(c);
        arm_sweep(p);
        return SMTP_POOL_REUSE;
    }
    if (!room_for(p, d))
        return 0;
    d->busy++;
    p->busy++;
    p->st.connects++;
    *out = NULL;
    return SMTP_POOL_CONNECT;
}

/* Take w off the FIFO. Returns its destination (not freed here: the
 * caller decides). */
static pdest_t *wait_unlink(smtp_pool_t *p, smtp_pool_wait_t *w)
{
    pdest_t *d = dest_find(p, w->key);
    if (d != NULL)
        d->nwait--;
    TAILQ_REMOVE(&p->waits, w, link);
    w->queued = 0;
    free(w->key);
    w->key = NULL;
    p->waiting--;
    return d;
}

static void wake_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    smtp_pool_t *p = arg;
    smtp_pool_wait_t *w = TAILQ_FIRST(&p->waits);
    while (w) {
        smtp_pool_wait_t *next = TAILQ_NEXT(w, link);
        smtp_session_t *s = NULL;
        int how = try_grant(p, dest_get(p, w->key), &s);
        if (how) {
            smtp_pool_cb cb = w->cb;
            void *cbarg = w->arg;
            wait_unlink(p, w);
            /* the callback may acquire, release or cancel: restart the
             * walk from the head afterwards */
            cb(cbarg, how, s);
            next = TAILQ_FIRST(&p->waits);
            if (next == w)
                break;
        }
        w = next;
    }
}

static void sweep_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    smtp_pool_t *p = arg;
    uint64_t now = loop_update_time(loop);
    htable_iter_t it;
    htable_iter_init(&it, &p->dests);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        pdest_t *d = HTABLE_ENTRY(n, pdest_t, node);
        pconn_t *c, *next;
        /* evict() moves c to the closing list */
        LIST_FOREACH_SAFE(c, &d->idle, link, next) {
            if (now - c->idle_since >= p->lim.max_idle_ms)
                evict(p, c, "idle_time");
            else if (smtp_session_age_ms(c->s) >= p->lim.max_age_ms)
                evict(p, c, "age");
        }
        dest_gc(p, d); /* the iterator allows freeing the current one */
    }
    arm_sweep(p);
}

smtp_pool_t *smtp_pool_new(loop_t *loop, const smtp_pool_limits_t *lim)
{
    smtp_pool_t *p = xcalloc(1, sizeof(*p));
    p->loop = loop;
    if (lim)
        p->lim = *lim;
    if (p->lim.max_msgs_per_session == 0)
        p->lim.max_msgs_per_session = 100;
    if (p->lim.max_age_ms == 0)
        p->lim.max_age_ms = 300000;
    if (p->lim.max_idle_ms == 0)
        p->lim.max_idle_ms = 5000;
    if (p->lim.max_per_dest == 0)
        p->lim.max_per_dest = 20;
    if (p->lim.max_total == 0)
        p->lim.max_total = 1000;
    if (p->lim.refused_backoff_ms == 0)
        p->lim.refused_backoff_ms = 60000;
    htable_init(&p->dests, HTABLE_STR, 16, NULL); /* xcalloc: cannot fail */
    LIST_INIT(&p->closing);
    TAILQ_INIT(&p->waits);
    loop_timer_init(&p->sweep_timer, sweep_fired, p);
    loop_timer_init(&p->wake_timer, wake_fired, p);
    return p;
}

void smtp_pool_free(smtp_pool_t *p)
{
    if (p == NULL)
        return;
    loop_timer_cancel(p->loop, &p->sweep_timer);
    loop_timer_cancel(p->loop, &p->wake_timer);
    smtp_pool_wait_t *w;
    while ((w = TAILQ_FIRST(&p->waits)) != NULL) {
        smtp_pool_cb cb = w->cb;
        void *arg = w->arg;
        wait_unlink(p, w);
        cb(arg, 0, NULL);
    }
    pconn_t *c;
    while ((c = LIST_FIRST(&p->closing)) != NULL) {
        LIST_REMOVE(c, link);
        smtp_session_free(c->s);
        free(c);
    }
    htable_iter_t it;
    htable_iter_init(&it, &p->dests);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        pdest_t *d = HTABLE_ENTRY(n, pdest_t, node);
        while ((c = LIST_FIRST(&d->idle)) != NULL) {
            LIST_REMOVE(c, link);
            smtp_session_set_closed_cb(c->s, NULL, NULL);
            smtp_session_quit(c->s); /* QUIT is written at once, best effort */
            smtp_session_free(c->s);
            free(c);
        }
        dest_free(p, d);
    }
    htable_fini(&p->dests);
    free(p);
}

int smtp_pool_acquire(smtp_pool_t *p, const char *key, smtp_session_t **s, smtp_pool_wait_t *w,
                      smtp_pool_cb cb, void *arg)
{
    pdest_t *d = dest_get(p, key);
    *s = NULL;
    if (p->lim.disabled) {
        d->busy++;
        p->busy++;
        p->st.connects++;
        return SMTP_POOL_CONNECT;
    }
    /* FIFO: someone already waiting for this key goes first */
    if (d->nwait == 0) {
        int how = try_grant(p, d, s);
        if (how)
            return how;
    }
    memset(w, 0, sizeof(*w));
    w->key = xstrdup(key);
    w->cb = cb;
    w->arg = arg;
    w->queued = 1;
    TAILQ_INSERT_TAIL(&p->waits, w, link);
    d->nwait++;
    p->waiting++;
    return SMTP_POOL_WAIT;
}

void smtp_pool_cancel(smtp_pool_t *p, smtp_pool_wait_t *w)
{
    if (p && w && w->queued) {
        pdest_t *d = wait_unlink(p, w);
        if (d != NULL)
            dest_gc(p, d);
    }
}

int smtp_pool_release(smtp_pool_t *p, const char *key, smtp_session_t *s)
{
    pdest_t *d = dest_get(p, key);
    if (d->busy > 0) {
        d->busy--;
        p->busy--;
    }
    wake_soon(p);
    if (s == NULL) {
        dest_gc(p, d);
        return 0;
    }
    int idle = smtp_session_state(s) == SMTP_STATE_IDLE;
    if (idle && smtp_session_usable(s) && smtp_session_transactions(s) > 0)
        d->proven = 1; /* waiters woken above may now open the other connections */
    if (!p->lim.disabled && idle && smtp_session_usable(s) && !too_old(p, s) &&
        d->busy + d->nidle < p->lim.max_per_dest) {
        pconn_t *c = xcalloc(1, sizeof(*c));
        c->s = s;
        c->d = d;
        c->pool = p;
        c->idle_since = loop_now_ms(p->loop);
        smtp_session_set_closed_cb(s, on_closed, c);
        LIST_INSERT_HEAD(&d->idle, c, link);
        d->nidle++;
        p->idle++;
        arm_sweep(p);
        log_debug("pool", "park", "session=%016" PRIx64 " dest=%s txn=%u", smtp_session_id(s), LOG_Q(key),
                  smtp_session_transactions(s));
        return 1;
    }
    if (idle && smtp_session_usable(s)) {
        /* in sync but over a limit: a clean QUIT */
        pconn_t *c = xcalloc(1, sizeof(*c));
        c->s = s;
        c->pool = p;
        c->closing = 1;
        LIST_INSERT_HEAD(&p->closing, c, link);
        smtp_session_set_closed_cb(s, on_closed, c);
        p->st.evicted++;
        smtp_session_quit(s);
        dest_gc(p, d);
        return 0;
    }
    smtp_session_free(s);
    dest_gc(p, d);
    return 0;
}

int smtp_pool_refused(smtp_pool_t *p, const char *key)
{
    if (p->lim.disabled || p->lim.no_refused_backoff)
        return 0;
    pdest_t *d = dest_get(p, key);
    unsigned others = d->busy + d->nidle;
    if (others > 0)
        others--; /* the caller's own slot */
    if (others == 0) {
        dest_gc(p, d); /* a key without the caller's slot: nothing to keep */
        return 0;
    }
    if (d->cap == 0)
        p->capped++;
    if (d->cap == 0 || others < d->cap)
        d->cap = others;
    d->cap_until = loop_now_ms(p->loop) + p->lim.refused_backoff_ms;
    arm_sweep(p);
    p->st.refused++;
    log_info("pool", "dest_capped", "dest=%s cap=%u for_ms=%u", LOG_Q(key), d->cap, p->lim.refused_backoff_ms);
    return 1;
}

void smtp_pool_get_stats(const smtp_pool_t *p, smtp_pool_stats_t *st)
{
    *st = p->st;
    st->idle = p->idle;
    st->busy = p->busy;
    st->waiting = p->waiting;
    st->dests = htable_count(&p->dests);
}

int smtp_pool_disabled(const smtp_pool_t *p)
{
    return p->lim.disabled;
}

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
 *  Waiters sit in a FIFO per destination, so that a release wakes only
 *  the waiters it can help: a slot freed at one destination puts that
 *  destination on the pending list, and room freed in the worker (when
 *  max_total was what held waiters back) goes to the destinations on the
 *  starved list in the order they starved. Each release, loss or eviction
 *  schedules a zero-delay "wake" that grants what it can from those two
 *  lists only, so a callback never runs inside acquire() or release()
 *  and thousands of waiters at other destinations cost nothing.
 *
 *  Expiry is a sweep timer (at most once a second, armed only while
 *  something is idle) rather than a timer per session: idle sessions are
 *  few and the sweep is a short walk. Idle sessions carry no I/O timeout;
 *  the session reports any event on them (EOF, a 421) through its closed
 *  callback and the pool drops them at once.
 *
 *  Site tags: an idle session released with a tag (the caller's site)
 *  is also on that tag's list in p->tags (core/htable.h, keyed by the
 *  tag, the entry freed when its last idle session leaves), most recently
 *  parked first, so counting a tag's idle sessions is a lookup and a trim
 *  walks only that tag's sessions from the oldest. The tag belongs to the
 *  idle session: a reused one leaves its tag's list at once and joins
 *  whatever tag it is released with next.
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
typedef struct ptag ptag_t;

typedef struct pconn {
    LIST_ENTRY(pconn) link; /* its destination's idle list, or the closing list */
    TAILQ_ENTRY(pconn) tlink; /* its tag's idle list, while t is set */
    smtp_session_t *s;
    pdest_t        *d;      /* NULL once closing: the destination may be gone */
    ptag_t         *t;      /* idle with a site tag; NULL untagged or not idle */
    uint64_t        idle_since;
    int             closing;
    smtp_pool_t    *pool;
} pconn_t;

typedef LIST_HEAD(pconn_list, pconn) pconn_list_t;
typedef TAILQ_HEAD(pconn_tq, pconn) pconn_tq_t;

/* The idle sessions of one site tag. */
struct ptag {
    htable_node_t node;  /* in p->tags, keyed by tag */
    char         *tag;
    size_t        nidle;
    pconn_tq_t    idle;  /* most recently parked first */
};

struct pdest {
    htable_node_t node;   /* in p->dests, keyed by key */
    char         *key;
    unsigned      busy;
    unsigned      nidle;
    unsigned      nwait;  /* waiters in d->waits */
    int           pending; /* on p->pending: a slot may be free here */
    int           starved; /* on p->starved: its first waiter wants room in the worker */
    int           pinned;  /* wake_fired() has it in hand: dest_gc() leaves it */
    TAILQ_HEAD(, smtp_pool_wait) waits;
    TAILQ_ENTRY(pdest) plink; /* p->pending */
    TAILQ_ENTRY(pdest) slink; /* p->starved */
    int           proven; /* a transaction completed here: slow start is over */
    unsigned      cap;    /* smtp_pool_refused(): connections allowed until cap_until; 0 none */
    uint64_t      cap_until;
    pconn_list_t  idle;   /* MRU first */
};

struct smtp_pool {
    loop_t            *loop;
    smtp_pool_limits_t lim;
    htable_t           dests;   /* key -> pdest_t */
    htable_t           tags;    /* site tag -> ptag_t, while it has idle sessions */
    size_t             capped;  /* destinations with a cap (d->cap != 0) */
    pconn_list_t       closing;
    TAILQ_HEAD(, pdest) pending; /* destinations where a slot may have come free */
    TAILQ_HEAD(, pdest) starved; /* destinations waiting for room in the worker, FIFO */
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
    TAILQ_INIT(&d->waits);
    htable_insert_str(&p->dests, &d->node, d->key);
    return d;
}

static void dest_free(smtp_pool_t *p, pdest_t *d)
{
    if (d->pending)
        TAILQ_REMOVE(&p->pending, d, plink);
    if (d->starved)
        TAILQ_REMOVE(&p->starved, d, slink);
    htable_remove(&p->dests, &d->node);
    if (d->cap)
        p->capped--;
    free(d->key);
    free(d);
}

static ptag_t *tag_find(const smtp_pool_t *p, const char *tag)
{
    htable_node_t *n = tag ? htable_find_str(&p->tags, tag) : NULL;
    return n ? HTABLE_ENTRY(n, ptag_t, node) : NULL;
}

/* c has just become idle: put it first on tag's list (NULL: untagged). */
static void tag_attach(smtp_pool_t *p, pconn_t *c, const char *tag)
{
    if (tag == NULL)
        return;
    ptag_t *t = tag_find(p, tag);
    if (t == NULL) {
        t = xcalloc(1, sizeof(*t));
        t->tag = xstrdup(tag);
        TAILQ_INIT(&t->idle);
        htable_insert_str(&p->tags, &t->node, t->tag);
    }
    TAILQ_INSERT_HEAD(&t->idle, c, tlink);
    t->nidle++;
    c->t = t;
}

/* c stops being idle: off its tag's list, the tag freed with its last. */
static void tag_detach(smtp_pool_t *p, pconn_t *c)
{
    ptag_t *t = c->t;
    if (t == NULL)
        return;
    TAILQ_REMOVE(&t->idle, c, tlink);
    c->t = NULL;
    if (--t->nidle == 0) {
        htable_remove(&p->tags, &t->node);
        free(t->tag);
        free(t);
    }
}

/* Take an idle session off its destination's and its tag's lists. */
static void idle_unlink(smtp_pool_t *p, pconn_t *c)
{
    LIST_REMOVE(c, link);
    c->d->nidle--;
    p->idle--;
    tag_detach(p, c);
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
    if (d->busy == 0 && d->nidle == 0 && d->nwait == 0 && !d->pinned && !cap_in_force(p, d))
        dest_free(p, d);
}

static void wake_soon(smtp_pool_t *p)
{
    if ((!TAILQ_EMPTY(&p->pending) || !TAILQ_EMPTY(&p->starved)) && !loop_timer_active(&p->wake_timer))
        loop_timer_set(p->loop, &p->wake_timer, 0);
}

/* A slot may have come free at d (a release, a loss, an eviction, a cap
 * run out): its waiters, if any, are looked at on the next wake. The
 * worker has room again too, which the starved list takes first. */
static void dest_freed(smtp_pool_t *p, pdest_t *d)
{
    if (d != NULL && d->nwait > 0 && !d->pending) {
        d->pending = 1;
        TAILQ_INSERT_TAIL(&p->pending, d, plink);
    }
    wake_soon(p);
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
    if (c->closing) {
        LIST_REMOVE(c, link);
    } else {
        /* the server closed an idle connection: nothing spent, just gone */
        idle_unlink(p, c);
        p->st.idle_lost++;
        log_debug("pool", "idle_lost", "session=%016" PRIx64 " dest=%s", smtp_session_id(s), LOG_Q(c->d->key));
        pdest_t *d = c->d;
        dest_freed(p, d);
        dest_gc(p, d);
        arm_sweep(p);
    }
    smtp_session_free(s); /* deferred by the session until its callback returns */
    free(c);
}

/* Unlink an idle session and say QUIT; on_closed frees it. The caller
 * runs dest_gc() on c's destination when it may have been the last. */
static void evict(smtp_pool_t *p, pconn_t *c, const char *why)
{
    idle_unlink(p, c);
    p->st.evicted++;
    log_debug("pool", "evict", "session=%016" PRIx64 " dest=%s reason=%s", smtp_session_id(c->s), LOG_Q(c->d->key),
              LOG_Q(why));
    dest_freed(p, c->d);
    c->closing = 1;
    c->d = NULL;
    LIST_INSERT_HEAD(&p->closing, c, link);
    smtp_session_quit(c->s);
}

static int too_old(const smtp_pool_t *p, smtp_session_t *s, unsigned max_msgs)
{
    if (max_msgs == 0 || max_msgs > p->lim.max_msgs_per_session)
        max_msgs = p->lim.max_msgs_per_session;
    return smtp_session_transactions(s) >= max_msgs ||
           smtp_session_age_ms(s) >= p->lim.max_age_ms;
}

/* Room for one more connection to d, evicting another key's idle
 * session (least recently used) when the worker is full: 1; 0 when d is
 * at its own limit; -1 when the worker is full and nothing idle can go. */
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
        return -1;
    pdest_t *o = victim->d;
    evict(p, victim, "worker_limit");
    dest_gc(p, o); /* another key's: nobody has it in hand */
    return 1;
}

/* Grant without queueing: REUSE, CONNECT, 0 (d at its limit) or -1
 * (the worker full). */
static int try_grant(smtp_pool_t *p, pdest_t *d, smtp_session_t **out)
{
    pconn_t *c;
    while ((c = LIST_FIRST(&d->idle)) != NULL) {
        if (!smtp_session_usable(c->s)) {
            /* closed while idle and not noticed yet: drop, costs nothing */
            idle_unlink(p, c);
            p->st.idle_lost++;
            smtp_session_free(c->s);
            free(c);
            continue;
        }
        if (too_old(p, c->s, 0)) {
            evict(p, c, "limits");
            continue;
        }
        idle_unlink(p, c); /* its tag goes: the next release names one */
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
    int room = room_for(p, d);
    if (room <= 0)
        return room;
    d->busy++;
    p->busy++;
    p->st.connects++;
    *out = NULL;
    return SMTP_POOL_CONNECT;
}

/* Take w off its destination's FIFO. Returns that destination (not
 * freed here: the caller decides). */
static pdest_t *wait_unlink(smtp_pool_t *p, smtp_pool_wait_t *w)
{
    pdest_t *d = w->dest;
    TAILQ_REMOVE(&d->waits, w, link);
    d->nwait--;
    w->queued = 0;
    w->dest = NULL;
    p->waiting--;
    return d;
}

/* Grant d's waiters in order while it and the worker have room. Returns
 * the last refusal: 0 (d at its limit, or no waiter left), -1 (the
 * worker is full). The callbacks may acquire, release or cancel
 * anything; d is pinned so that it outlives them. */
static int grant_waiters(smtp_pool_t *p, pdest_t *d)
{
    int how = 0;
    d->pinned++;
    smtp_pool_wait_t *w;
    while ((w = TAILQ_FIRST(&d->waits)) != NULL) {
        smtp_session_t *s = NULL;
        how = try_grant(p, d, &s);
        if (how <= 0)
            break;
        smtp_pool_cb cb = w->cb;
        void *cbarg = w->arg;
        wait_unlink(p, w);
        cb(cbarg, how, s);
        how = 0;
    }
    d->pinned--;
    return how;
}

static void starve(smtp_pool_t *p, pdest_t *d)
{
    if (!d->starved) {
        d->starved = 1;
        TAILQ_INSERT_TAIL(&p->starved, d, slink);
    }
}

static void wake_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    smtp_pool_t *p = arg;
    pdest_t *d;
    /* room in the worker first goes to whoever starved first */
    while ((d = TAILQ_FIRST(&p->starved)) != NULL) {
        int how = grant_waiters(p, d);
        if (how < 0)
            break; /* still full: d stays first */
        TAILQ_REMOVE(&p->starved, d, slink);
        d->starved = 0;
        dest_gc(p, d);
    }
    while ((d = TAILQ_FIRST(&p->pending)) != NULL) {
        TAILQ_REMOVE(&p->pending, d, plink);
        d->pending = 0;
        if (grant_waiters(p, d) < 0)
            starve(p, d);
        dest_gc(p, d);
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
        if (d->cap && now >= d->cap_until)
            dest_freed(p, d); /* its waiters may now open the connections the cap held back */
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
    htable_init(&p->tags, HTABLE_STR, 16, NULL);
    LIST_INIT(&p->closing);
    TAILQ_INIT(&p->pending);
    TAILQ_INIT(&p->starved);
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
    htable_iter_t it;
    htable_iter_init(&it, &p->dests);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        pdest_t *d = HTABLE_ENTRY(n, pdest_t, node);
        smtp_pool_wait_t *w;
        while ((w = TAILQ_FIRST(&d->waits)) != NULL) {
            smtp_pool_cb cb = w->cb;
            void *arg = w->arg;
            wait_unlink(p, w);
            cb(arg, 0, NULL); /* must not acquire from a pool being freed */
        }
    }
    pconn_t *c;
    while ((c = LIST_FIRST(&p->closing)) != NULL) {
        LIST_REMOVE(c, link);
        smtp_session_free(c->s);
        free(c);
    }
    htable_iter_init(&it, &p->dests);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        pdest_t *d = HTABLE_ENTRY(n, pdest_t, node);
        while ((c = LIST_FIRST(&d->idle)) != NULL) {
            LIST_REMOVE(c, link);
            tag_detach(p, c);
            smtp_session_set_closed_cb(c->s, NULL, NULL);
            smtp_session_quit(c->s); /* QUIT is written at once, best effort */
            smtp_session_free(c->s);
            free(c);
        }
        dest_free(p, d);
    }
    htable_fini(&p->dests);
    htable_fini(&p->tags); /* empty: every idle session left its tag above */
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
    /* FIFO: someone already waiting for this key goes first, and so do
     * the destinations that starved for room in the worker before it
     * (an idle session of its own needs no room) */
    int how = 0;
    if (d->nwait == 0 && (TAILQ_EMPTY(&p->starved) || d->nidle > 0)) {
        how = try_grant(p, d, s);
        if (how > 0)
            return how;
    }
    memset(w, 0, sizeof(*w));
    w->dest = d;
    w->cb = cb;
    w->arg = arg;
    w->queued = 1;
    TAILQ_INSERT_TAIL(&d->waits, w, link);
    d->nwait++;
    p->waiting++;
    if (how < 0 || !TAILQ_EMPTY(&p->starved))
        starve(p, d);
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
    return smtp_pool_release_max(p, key, s, 0);
}

int smtp_pool_release_max(smtp_pool_t *p, const char *key, smtp_session_t *s, unsigned max_msgs)
{
    return smtp_pool_release_tagged(p, key, s, max_msgs, NULL);
}

int smtp_pool_release_tagged(smtp_pool_t *p, const char *key, smtp_session_t *s, unsigned max_msgs,
                             const char *tag)
{
    pdest_t *d = dest_get(p, key);
    if (d->busy > 0) {
        d->busy--;
        p->busy--;
    }
    dest_freed(p, d);
    if (s == NULL) {
        dest_gc(p, d);
        return 0;
    }
    int idle = smtp_session_state(s) == SMTP_STATE_IDLE;
    if (idle && smtp_session_usable(s) && smtp_session_transactions(s) > 0)
        d->proven = 1; /* waiters woken above may now open the other connections */
    if (!p->lim.disabled && idle && smtp_session_usable(s) && !too_old(p, s, max_msgs) &&
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
        tag_attach(p, c, tag);
        arm_sweep(p);
        log_debug("pool", "park", "session=%016" PRIx64 " dest=%s txn=%u tag=%s", smtp_session_id(s), LOG_Q(key),
                  smtp_session_transactions(s), LOG_Q(tag ? tag : ""));
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

size_t smtp_pool_idle_tagged(const smtp_pool_t *p, const char *tag)
{
    const ptag_t *t = tag_find(p, tag);
    return t ? t->nidle : 0;
}

size_t smtp_pool_trim_tag(smtp_pool_t *p, const char *tag, size_t keep)
{
    ptag_t *t = tag_find(p, tag);
    if (t == NULL || t->nidle <= keep)
        return 0;
    size_t n = t->nidle - keep;
    /* t is freed with its last idle session: not looked at after that */
    for (size_t i = 0; i < n; i++) {
        pconn_t *c = TAILQ_LAST(&t->idle, pconn_tq);
        pdest_t *d = c->d;
        evict(p, c, "site_trim");
        dest_gc(p, d); /* pinned when a caller has it in hand */
    }
    arm_sweep(p);
    return n;
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

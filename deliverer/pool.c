/*
 * SUMMARY
 *  deliverer/pool.c - the per-worker SMTP session pool.
 * DESCRIPTION
 *  Two levels as in Postfix scache: destination key -> its idle sessions
 *  (most recently used first, so the rest age out) and its busy count.
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

#include "core/log.h"
#include "core/util.h"

typedef struct pdest pdest_t;

typedef struct pconn {
    struct pconn   *next, *prev;
    smtp_session_t *s;
    pdest_t        *d;
    uint64_t        idle_since;
    int             closing;
    smtp_pool_t    *pool;
} pconn_t;

struct pdest {
    pdest_t  *next;
    char     *key;
    unsigned  busy;
    unsigned  nidle;
    int       proven; /* a transaction completed here: slow start is over */
    unsigned  cap;    /* smtp_pool_refused(): connections allowed until cap_until; 0 none */
    uint64_t  cap_until;
    pconn_t  *idle;   /* MRU first */
};

struct smtp_pool {
    loop_t            *loop;
    smtp_pool_limits_t lim;
    pdest_t           *dests;
    pconn_t           *closing;
    smtp_pool_wait_t  *wait_head, *wait_tail;
    loop_timer_t       sweep_timer;
    loop_timer_t       wake_timer;
    size_t             busy, idle, waiting;
    smtp_pool_stats_t  st;
};

static void list_add(pconn_t **head, pconn_t *c)
{
    c->prev = NULL;
    c->next = *head;
    if (*head)
        (*head)->prev = c;
    *head = c;
}

static void list_del(pconn_t **head, pconn_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        *head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = c->prev = NULL;
}

static pdest_t *dest_get(smtp_pool_t *p, const char *key)
{
    for (pdest_t *d = p->dests; d; d = d->next)
        if (strcmp(d->key, key) == 0)
            return d;
    pdest_t *d = xcalloc(1, sizeof(*d));
    d->key = xstrdup(key);
    d->next = p->dests;
    p->dests = d;
    return d;
}

static void wake_soon(smtp_pool_t *p)
{
    if (p->wait_head && !loop_timer_active(&p->wake_timer))
        loop_timer_set(p->loop, &p->wake_timer, 0);
}

static void arm_sweep(smtp_pool_t *p)
{
    if (p->idle == 0) {
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
        list_del(&p->closing, c);
    } else {
        /* the server closed an idle connection: nothing spent, just gone */
        list_del(&c->d->idle, c);
        c->d->nidle--;
        p->idle--;
        p->st.idle_lost++;
        log_debug("pool", "idle_lost", "session=%016" PRIx64 " dest=%s", smtp_session_id(s), c->d->key);
        arm_sweep(p);
        wake_soon(p);
    }
    smtp_session_free(s); /* deferred by the session until its callback returns */
    free(c);
}

/* Unlink an idle session and say QUIT; on_closed frees it. */
static void evict(smtp_pool_t *p, pconn_t *c, const char *why)
{
    list_del(&c->d->idle, c);
    c->d->nidle--;
    p->idle--;
    p->st.evicted++;
    log_debug("pool", "evict", "session=%016" PRIx64 " dest=%s reason=%s", smtp_session_id(c->s), c->d->key, why);
    c->closing = 1;
    list_add(&p->closing, c);
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
        log_info("pool", "dest_cap_lifted", "dest=%s cap=%u", d->key, d->cap);
        d->cap = 0;
    }
    if (d->cap && d->cap < limit)
        limit = d->cap;
    if (d->busy + d->nidle >= limit)
        return 0;
    if (p->busy + p->idle < p->lim.max_total)
        return 1;
    pconn_t *victim = NULL;
    for (pdest_t *o = p->dests; o; o = o->next) {
        if (o == d)
            continue;
        for (pconn_t *c = o->idle; c; c = c->next)
            if (victim == NULL || c->idle_since < victim->idle_since)
                victim = c;
    }
    if (victim == NULL)
        return 0;
    evict(p, victim, "worker_limit");
    return 1;
}

/* Grant without queueing: REUSE, CONNECT or 0. */
static int try_grant(smtp_pool_t *p, pdest_t *d, smtp_session_t **out)
{
    while (d->idle) {
        pconn_t *c = d->idle;
        if (!smtp_session_usable(c->s)) {
            /* closed while idle and not noticed yet: drop, costs nothing */
            list_del(&d->idle, c);
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
        list_del(&d->idle, c);
        d->nidle--;
        p->idle--;
        d->busy++;
        p->busy++;
        p->st.reuses++;
        *out = c->s;
        log_debug("pool", "reuse", "session=%016" PRIx64 " dest=%s txn=%u", smtp_session_id(c->s), d->key,
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

static void wait_unlink(smtp_pool_t *p, smtp_pool_wait_t *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        p->wait_head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    else
        p->wait_tail = w->prev;
    w->next = w->prev = NULL;
    w->queued = 0;
    free(w->key);
    w->key = NULL;
    p->waiting--;
}

static void wake_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    smtp_pool_t *p = arg;
    smtp_pool_wait_t *w = p->wait_head;
    while (w) {
        smtp_pool_wait_t *next = w->next;
        smtp_session_t *s = NULL;
        int how = try_grant(p, dest_get(p, w->key), &s);
        if (how) {
            smtp_pool_cb cb = w->cb;
            void *cbarg = w->arg;
            wait_unlink(p, w);
            /* the callback may acquire, release or cancel: restart the
             * walk from the head afterwards */
            cb(cbarg, how, s);
            next = p->wait_head;
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
    for (pdest_t *d = p->dests; d; d = d->next) {
        pconn_t *c = d->idle;
        while (c) {
            pconn_t *next = c->next;
            if (now - c->idle_since >= p->lim.max_idle_ms)
                evict(p, c, "idle_time");
            else if (smtp_session_age_ms(c->s) >= p->lim.max_age_ms)
                evict(p, c, "age");
            c = next;
        }
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
    while (p->wait_head) {
        smtp_pool_wait_t *w = p->wait_head;
        smtp_pool_cb cb = w->cb;
        void *arg = w->arg;
        wait_unlink(p, w);
        cb(arg, 0, NULL);
    }
    while (p->closing) {
        pconn_t *c = p->closing;
        list_del(&p->closing, c);
        smtp_session_free(c->s);
        free(c);
    }
    while (p->dests) {
        pdest_t *d = p->dests;
        p->dests = d->next;
        while (d->idle) {
            pconn_t *c = d->idle;
            list_del(&d->idle, c);
            smtp_session_set_closed_cb(c->s, NULL, NULL);
            smtp_session_quit(c->s); /* QUIT is written at once, best effort */
            smtp_session_free(c->s);
            free(c);
        }
        free(d->key);
        free(d);
    }
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
    int queued_same = 0;
    for (smtp_pool_wait_t *o = p->wait_head; o && !queued_same; o = o->next)
        queued_same = strcmp(o->key, key) == 0;
    if (!queued_same) {
        int how = try_grant(p, d, s);
        if (how)
            return how;
    }
    memset(w, 0, sizeof(*w));
    w->key = xstrdup(key);
    w->cb = cb;
    w->arg = arg;
    w->queued = 1;
    w->prev = p->wait_tail;
    if (p->wait_tail)
        p->wait_tail->next = w;
    else
        p->wait_head = w;
    p->wait_tail = w;
    p->waiting++;
    return SMTP_POOL_WAIT;
}

void smtp_pool_cancel(smtp_pool_t *p, smtp_pool_wait_t *w)
{
    if (p && w && w->queued)
        wait_unlink(p, w);
}

int smtp_pool_release(smtp_pool_t *p, const char *key, smtp_session_t *s)
{
    pdest_t *d = dest_get(p, key);
    if (d->busy > 0) {
        d->busy--;
        p->busy--;
    }
    wake_soon(p);
    if (s == NULL)
        return 0;
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
        list_add(&d->idle, c);
        d->nidle++;
        p->idle++;
        arm_sweep(p);
        log_debug("pool", "park", "session=%016" PRIx64 " dest=%s txn=%u", smtp_session_id(s), key,
                  smtp_session_transactions(s));
        return 1;
    }
    if (idle && smtp_session_usable(s)) {
        /* in sync but over a limit: a clean QUIT */
        pconn_t *c = xcalloc(1, sizeof(*c));
        c->s = s;
        c->d = d;
        c->pool = p;
        c->closing = 1;
        list_add(&p->closing, c);
        smtp_session_set_closed_cb(s, on_closed, c);
        p->st.evicted++;
        smtp_session_quit(s);
        return 0;
    }
    smtp_session_free(s);
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
    if (others == 0)
        return 0;
    if (d->cap == 0 || others < d->cap)
        d->cap = others;
    d->cap_until = loop_now_ms(p->loop) + p->lim.refused_backoff_ms;
    p->st.refused++;
    log_info("pool", "dest_capped", "dest=%s cap=%u for_ms=%u", key, d->cap, p->lim.refused_backoff_ms);
    return 1;
}

void smtp_pool_get_stats(const smtp_pool_t *p, smtp_pool_stats_t *st)
{
    *st = p->st;
    st->idle = p->idle;
    st->busy = p->busy;
    st->waiting = p->waiting;
}

int smtp_pool_disabled(const smtp_pool_t *p)
{
    return p->lim.disabled;
}

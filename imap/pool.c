/*
 * SUMMARY
 *  imap/pool.c - logged-in IMAP sessions kept per account, the appends
 *  waiting for one, and MULTIAPPEND batches (RFC 3502).
 * DESCRIPTION
 *  Two levels as in the SMTP pool: account key -> its parked sessions
 *  (most recently used first, so the rest age out), the appends queued
 *  for it (oldest first) and its connection count; the pool itself holds
 *  the busy sessions and those saying LOGOUT in the background.
 *
 *  A session (imap_pool_sess_t) is a connection (conn.c) plus the
 *  requests whose job it runs. Its states (imap_pool_sess_state_t),
 *  changed only in sess_move() together with the list that holds it:
 *
 *    BUSY -> IDLE -> BUSY ... -> CLOSING -> freed
 *    BUSY -> DETACHED (imap_pool_free: it finishes on its own)
 *
 *  After a stored job the requests get their results first and only then
 *  is the session parked (pool_park), with nothing of their messages
 *  referenced. Parked sessions keep their connection's callback: any
 *  event on them (bytes, EOF, error) drops them at once. Each has its own
 *  idle timer (the loop's min-heap) set to the idle time or the rest of
 *  its age, whichever ends first; it says LOGOUT in the background.
 *
 *  A request that finds every connection of its account busy waits, first
 *  come first served, until a session is parked or a connection closes
 *  (a zero-delay wake timer serves waiters outside the call that freed
 *  the slot), or until its own timeout. When a parked session is handed
 *  to a waiter and the server has MULTIAPPEND, the waiters behind it go
 *  in the same APPEND, up to max_batch messages and IMAP_BATCH_MAX_BYTES;
 *  requests that must look for an earlier copy first go alone.
 *
 *  A reused session that dies in the job before any answer, where the
 *  server cannot have the message (imap_conn_info().loss), is run once more on
 *  a fresh connection; after a clean EOF with the whole APPEND sent that
 *  happens only when the Message-ID is known, and the fresh connection
 *  looks for it first. A batch is never retried here: its copies go back
 *  to their owners.
 * DIAGNOSTICS
 *  Debug lines as mod=imap_pool: open, park, reuse, retry, retry_check,
 *  idle_lost, not_reusable, logout (with a reason), wait, wait_served,
 *  batch_done; counters in imap_pool_get_stats().
 */
#include "imap/pool.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "core/list.h"
#include "core/log.h"
#include "core/util.h"

/* defaults (imap_pool_limits_t) */
#define IMAP_POOL_MAX_APPENDS    100u
#define IMAP_POOL_MAX_AGE_MS     300000u
#define IMAP_POOL_IDLE_MS        10000u
#define IMAP_POOL_IDLE_PER_ACCT  4u
#define IMAP_POOL_IDLE_TOTAL     64u
#define IMAP_POOL_CONNS_PER_ACCT 2u
#define IMAP_POOL_MAX_BATCH      16u
#define IMAP_BATCH_MAX_BYTES     (8u << 20) /* a MULTIAPPEND adds messages up to this total */

typedef enum {
    IMAP_POOL_SESS_BUSY = 0, /* running a job */
    IMAP_POOL_SESS_IDLE,     /* parked */
    IMAP_POOL_SESS_CLOSING,  /* LOGOUT in the background; nobody waits for it */
    IMAP_POOL_SESS_DETACHED, /* its pool is gone: it finishes its job, then closes */
    IMAP_POOL_SESS_ST_LAST
} imap_pool_sess_state_t;

static const char *sess_strstate(imap_pool_sess_state_t st)
{
    static const char *const names[IMAP_POOL_SESS_ST_LAST] = { "BUSY", "IDLE", "CLOSING", "DETACHED" };
    return st < IMAP_POOL_SESS_ST_LAST ? names[st] : "?";
}

typedef struct imap_pool_sess imap_pool_sess_t;
typedef struct imap_pool_acct imap_pool_acct_t;
TAILQ_HEAD(imap_pool_sess_list, imap_pool_sess);
TAILQ_HEAD(imap_pool_wait_list, imap_append);

struct imap_pool_sess {
    TAILQ_ENTRY(imap_pool_sess) link; /* on the list of its state */
    imap_pool_sess_state_t  state;
    loop_t       *loop;
    imap_pool_t  *pool; /* NULL once detached */
    imap_pool_acct_t      *pa;
    imap_conn_t  *conn;
    /* the requests of the job in flight, in the order their messages go
     * (a slot is NULL once its request is withdrawn) */
    imap_append_t *reqs[IMAP_MAX_UIDS];
    size_t         nreqs;
    int            reused;      /* the job started on a parked session */
    int            retried;     /* the job moved to a fresh connection once */
    unsigned       connections; /* connections opened for the job */
    uint64_t       idle_since;
    loop_timer_t   idle_timer;
};

struct imap_pool_acct {
    LIST_ENTRY(imap_pool_acct) link;
    char            *key;
    struct imap_pool_sess_list idle; /* MRU first */
    unsigned         nidle;
    struct imap_pool_wait_list waiters; /* oldest first */
    unsigned         nconn;   /* sessions of this key: busy, parked or logging out */
};

struct imap_pool {
    loop_t            *loop;
    imap_pool_limits_t lim;
    LIST_HEAD(, imap_pool_acct) accts;
    struct imap_pool_sess_list   busy;
    struct imap_pool_sess_list   closing;
    size_t             nidle;
    size_t             nwait;
    loop_timer_t       wake_timer; /* serves waiters outside the call that freed a session */
    int                freeing;
    imap_pool_stats_t  st;
};

static void sess_on_conn(void *arg, imap_conn_t *c, imap_conn_event_t ev, const char *why);
static void pool_wake(imap_pool_t *p);

/* ---------------------------------------------------------------- logging */

static void pool_debug(const char *ref, uint64_t id, const imap_conn_acct_t *ac, unsigned appends, uint64_t age_ms,
                       const imap_pool_t *p, const char *event, const char *reason)
{
    log_debug("imap_pool", event,
              "%s session=%016" PRIx64 " user=%s host=%s appends=%u age_ms=%" PRIu64 " idle=%zu reason=%s", ref, id,
              LOG_Q(ac->user), LOG_Q(ac->host), appends, age_ms, p ? p->nidle : 0, LOG_Q(reason));
}

static void sess_debug(const imap_pool_sess_t *s, const char *event, const char *reason)
{
    if (!log_enabled(LOG_DEBUG))
        return;
    imap_conn_info_t in = imap_conn_info(s->conn);
    pool_debug(in.log_ref, in.id, in.acct, in.appends, loop_now_ms(s->loop) - in.opened_ms, s->pool, event, reason);
}

static void wait_debug(const imap_append_t *a, const imap_pool_t *p, const char *event, const char *reason)
{
    if (log_enabled(LOG_DEBUG))
        pool_debug(a->log_ref ? a->log_ref : LOG_MSG(a->log_id, a->trace_id), a->id, &a->acct, 0, 0, p, event, reason);
}

/* ---------------------------------------------------------------- sessions */

static struct imap_pool_sess_list *list_of(const imap_pool_sess_t *s, imap_pool_sess_state_t st)
{
    if (s->pool == NULL)
        return NULL;
    switch (st) {
    case IMAP_POOL_SESS_BUSY: return &s->pool->busy;
    case IMAP_POOL_SESS_IDLE: return &s->pa->idle;
    case IMAP_POOL_SESS_CLOSING: return &s->pool->closing;
    default: return NULL;
    }
}

/* The one place a session changes state, and list with it. */
static void sess_move(imap_pool_sess_t *s, imap_pool_sess_state_t st)
{
    struct imap_pool_sess_list *from = list_of(s, s->state), *to = list_of(s, st);
    if (log_enabled(LOG_DEBUG)) {
        imap_conn_info_t in = imap_conn_info(s->conn);
        log_debug("imap_pool", "state", "%s session=%016" PRIx64 " from=%s to=%s", in.log_ref, in.id,
                  sess_strstate(s->state), sess_strstate(st));
    }
    if (from)
        TAILQ_REMOVE(from, s, link);
    if (s->state == IMAP_POOL_SESS_IDLE && s->pool) {
        s->pa->nidle--;
        s->pool->nidle--;
        loop_timer_cancel(s->loop, &s->idle_timer);
    }
    s->state = st;
    if (to)
        TAILQ_INSERT_HEAD(to, s, link);
    if (st == IMAP_POOL_SESS_IDLE && s->pool) {
        s->pa->nidle++;
        s->pool->nidle++;
    }
}

/* Open a connection for the job of the one request in s. */
static void sess_open(imap_pool_sess_t *s)
{
    imap_append_t *a = s->reqs[0];
    imap_conn_msg_t m = { a->data, a->len };
    char ref[IMAP_LOG_REF_MAX];
    imap_conn_job_t job = { .msgs = &m, .nmsgs = 1, .check_msgid = a->check_msgid, .timeout_ms = a->timeout_ms,
                            .keep_open = 1, .log_ref = imap_append_log_ref(&a, 1, ref, sizeof(ref)),
                            .blame_id = a->log_id };
    s->conn = imap_conn_open(a->loop, &a->acct, &job, sess_on_conn, s);
    s->connections++;
    if (s->pool)
        s->pool->st.opened++;
    sess_debug(s, "open", s->retried ? "retry" : NULL);
}

static void idle_fired(loop_t *loop, loop_timer_t *t, void *arg);

/* A session on a fresh connection for a, holding one of pa's slots. */
static void sess_new(imap_pool_t *p, imap_pool_acct_t *pa, imap_append_t *a)
{
    imap_pool_sess_t *s = xcalloc(1, sizeof(*s));
    s->state = IMAP_POOL_SESS_DETACHED; /* on no list until the move below */
    s->loop = p->loop;
    s->pool = p;
    s->pa = pa;
    loop_timer_init(&s->idle_timer, idle_fired, s);
    pa->nconn++;
    s->reqs[0] = a;
    s->nreqs = 1;
    a->sess = s;
    imap_append_enter(a, IMAP_APPEND_ST_POOLED);
    sess_open(s);
    sess_move(s, IMAP_POOL_SESS_BUSY);
}

/* Each request still in s gets res (its own uid from a batch), from its
 * own timer (post) or at once. */
static void sess_report(imap_pool_sess_t *s, const imap_append_result_t *r, int post)
{
    size_t n = s->nreqs;
    s->nreqs = 0; /* before any callback: the session holds none of them now */
    for (size_t i = 0; i < n; i++) {
        imap_append_t *a = s->reqs[i];
        if (a == NULL) /* withdrawn */
            continue;
        s->reqs[i] = NULL;
        a->sess = NULL;
        imap_append_result_t res = *r;
        res.reused = s->reused;
        if (n > 1) {
            res.batched = (unsigned)n;
            if (res.status == IMAP_OK)
                res.uid = imap_conn_info(s->conn).uids[i];
        } else {
            res.connections = s->connections;
        }
        if (post)
            imap_append_report(a, &res);
        else
            imap_append_finish(a, &res);
    }
}

static void sess_free(imap_pool_sess_t *s)
{
    if (s->nreqs) { /* closed before the results were handed out */
        imap_append_result_t res;
        memset(&res, 0, sizeof(res));
        res.status = IMAP_ENETWORK;
        snprintf(res.mailbox, sizeof(res.mailbox), "%s", imap_conn_result(s->conn)->mailbox);
        snprintf(res.error, sizeof(res.error),
                 "the connection carrying this copy was closed before the server answered");
        sess_report(s, &res, 1);
    }
    imap_pool_t *p = s->pool;
    sess_move(s, IMAP_POOL_SESS_DETACHED);
    if (p) {
        s->pa->nconn--;
        if (!TAILQ_EMPTY(&s->pa->waiters))
            pool_wake(p); /* a connection slot came free */
    }
    loop_timer_cancel(s->loop, &s->idle_timer);
    imap_conn_free(s->conn);
    free(s);
}

/* Say LOGOUT in the background; the session is freed when it has ended. */
static void retire(imap_pool_sess_t *s, const char *why, uint64_t *counter)
{
    (*counter)++;
    sess_debug(s, "logout", why);
    sess_move(s, IMAP_POOL_SESS_CLOSING);
    imap_conn_logout(s->conn);
}

static void idle_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    imap_pool_sess_t *s = arg;
    imap_pool_t *p = s->pool;
    int old = loop_now_ms(loop) - imap_conn_info(s->conn).opened_ms >= p->lim.max_age_ms;
    retire(s, old ? "max_age" : "idle_timeout", &p->st.expired);
}

/* After the results of a stored job: park s, or retire it. */
static void pool_park(imap_pool_sess_t *s)
{
    imap_pool_t *p = s->pool;
    imap_conn_park(s->conn); /* nothing of the finished job stays referenced */
    uint64_t now = loop_now_ms(p->loop);
    uint64_t age = now - imap_conn_info(s->conn).opened_ms;
    if (!imap_conn_reusable(s->conn)) {
        /* the server spoke or hung up behind its OK: not worth a LOGOUT */
        p->st.lost++;
        sess_debug(s, "idle_lost", "not_clean");
        sess_free(s);
        return;
    }
    if (imap_conn_info(s->conn).appends >= p->lim.max_appends) {
        retire(s, "max_appends", &p->st.retired);
        return;
    }
    if (age >= p->lim.max_age_ms) {
        retire(s, "max_age", &p->st.retired);
        return;
    }
    if (s->pa->nidle >= p->lim.max_idle_per_account) {
        retire(s, "account_idle_full", &p->st.retired);
        return;
    }
    if (p->nidle >= p->lim.max_idle_total) {
        /* make room: the least recently used idle session of the pool goes */
        imap_pool_sess_t *victim = NULL, *c;
        imap_pool_acct_t *pa;
        LIST_FOREACH (pa, &p->accts, link)
            TAILQ_FOREACH (c, &pa->idle, link)
                if (victim == NULL || c->idle_since < victim->idle_since)
                    victim = c;
        if (victim == NULL) {
            retire(s, "pool_idle_full", &p->st.retired);
            return;
        }
        retire(victim, "pool_idle_full", &p->st.retired);
    }
    s->idle_since = now;
    sess_move(s, IMAP_POOL_SESS_IDLE);
    p->st.parked++;
    uint64_t left = p->lim.max_age_ms - age;
    loop_timer_set(p->loop, &s->idle_timer, left < p->lim.idle_ms ? left : p->lim.idle_ms);
    sess_debug(s, "park", NULL);
    if (!TAILQ_EMPTY(&s->pa->waiters))
        pool_wake(p);
}

/* The job on s is over (its connection said so, outside any I/O). */
static void sess_done(imap_pool_sess_t *s)
{
    imap_conn_t *c = s->conn;
    if (s->state == IMAP_POOL_SESS_CLOSING) { /* a background LOGOUT has ended: nobody to tell */
        sess_free(s);
        return;
    }
    imap_conn_loss_t loss = imap_conn_info(c).loss;
    imap_append_t *a = s->reqs[0];
    if (s->nreqs == 1 && a && s->reused && !s->retried &&
        (loss == IMAP_CONN_LOSS_UNSENT || (loss == IMAP_CONN_LOSS_UNSURE && a->msgid))) {
        int check = loss == IMAP_CONN_LOSS_UNSURE;
        if (s->pool)
            s->pool->st.retried++;
        sess_debug(s, check ? "retry_check" : "retry", imap_conn_result(c)->error);
        if (check && a->check_msgid == NULL)
            a->check_msgid = xstrdup(a->msgid);
        imap_conn_free(c); /* inside its own callback: it does nothing more */
        s->retried = 1;
        sess_open(s);
        return;
    }
    if (s->nreqs > 1)
        sess_debug(s, "batch_done", imap_strerror(imap_conn_result(c)->status));
    /* batched copies hear from their own timers; a lone one at once, so its
     * callback runs before the session is parked or freed (an append it
     * starts finds the session still busy) */
    sess_report(s, imap_conn_result(c), s->nreqs > 1);
    if (imap_conn_info(c).state != IMAP_CONN_ST_READY) {
        sess_free(s);
    } else if (s->pool) {
        pool_park(s);
    } else { /* detached by imap_pool_free(): nobody will reuse it */
        sess_move(s, IMAP_POOL_SESS_CLOSING);
        imap_conn_logout(c);
    }
}

static void sess_on_conn(void *arg, imap_conn_t *c, imap_conn_event_t ev, const char *why)
{
    imap_pool_sess_t *s = arg;
    if (ev == IMAP_CONN_EV_DONE) {
        sess_done(s);
        return;
    }
    if (s->state == IMAP_POOL_SESS_IDLE) { /* parked: drop it now */
        s->pool->st.lost++;
        sess_debug(s, "idle_lost", why);
        sess_free(s); /* inside the stream's callback: the stream defers its own release */
        return;
    }
    sess_debug(s, "not_reusable", why); /* its job's report is still to come: not parked then */
}

/* ---------------------------------------------------------------- accounts */

static unsigned or_default(unsigned v, unsigned def)
{
    return v ? v : def;
}

/* The pool key: server address and port, TLS mode, host name and its
 * check, user. Returns a malloc'd string. */
static char *account_key(const imap_conn_acct_t *ac)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    const struct sockaddr *sa = (const struct sockaddr *)&ac->addr;
    if (sa->sa_family == AF_INET && ac->addrlen >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
        port = ntohs(sin->sin_port);
    } else if (sa->sa_family == AF_INET6 && ac->addrlen >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
        port = ntohs(sin6->sin6_port);
    }
    buf_t b = BUF_INIT;
    buf_printf(&b, "[%s]:%u tls=%d host=%s verify=%d user=", ip, port, (int)ac->tls, ac->host,
               ac->verify_host ? 1 : 0);
    buf_puts(&b, ac->user);
    return buf_steal(&b, NULL);
}

static imap_pool_acct_t *pacct_get(imap_pool_t *p, const imap_conn_acct_t *ac)
{
    char *key = account_key(ac);
    imap_pool_acct_t *pa;
    LIST_FOREACH (pa, &p->accts, link)
        if (strcmp(pa->key, key) == 0) {
            free(key);
            return pa;
        }
    pa = xcalloc(1, sizeof(*pa));
    pa->key = key;
    TAILQ_INIT(&pa->idle);
    TAILQ_INIT(&pa->waiters);
    LIST_INSERT_HEAD(&p->accts, pa, link);
    return pa;
}

/* A parked session of pa that still looks alive, or NULL. */
static imap_pool_sess_t *pool_take(imap_pool_t *p, imap_pool_acct_t *pa)
{
    imap_pool_sess_t *s;
    while ((s = TAILQ_FIRST(&pa->idle)) != NULL) {
        if (imap_conn_info(s->conn).appends >= p->lim.max_appends ||
            loop_now_ms(p->loop) - imap_conn_info(s->conn).opened_ms >= p->lim.max_age_ms) {
            retire(s, "limits", &p->st.retired);
            continue;
        }
        if (!imap_conn_reusable(s->conn)) {
            /* closed while idle and not noticed yet: costs nothing */
            p->st.lost++;
            sess_debug(s, "idle_lost", "probe");
            sess_free(s);
            continue;
        }
        return s;
    }
    return NULL;
}

/* Run the job of the n requests in m on the parked session s. */
static void sess_run(imap_pool_t *p, imap_pool_sess_t *s, imap_append_t *const *m, size_t n)
{
    imap_conn_msg_t msgs[IMAP_MAX_UIDS];
    for (size_t i = 0; i < n; i++) {
        s->reqs[i] = m[i];
        m[i]->sess = s;
        imap_append_enter(m[i], IMAP_APPEND_ST_POOLED);
        msgs[i].data = m[i]->data;
        msgs[i].len = m[i]->len;
    }
    s->nreqs = n;
    s->reused = 1;
    s->retried = 0;
    s->connections = 0;
    sess_move(s, IMAP_POOL_SESS_BUSY);
    p->st.reused++;
    if (n > 1) {
        p->st.batches++;
        p->st.batched += n;
    }
    sess_debug(s, "reuse", NULL);
    char ref[IMAP_LOG_REF_MAX];
    imap_conn_job_t job = { .msgs = msgs, .nmsgs = n, .check_msgid = n == 1 ? m[0]->check_msgid : NULL,
                            .timeout_ms = m[0]->timeout_ms, .keep_open = 1,
                            .log_ref = imap_append_log_ref(m, n, ref, sizeof(ref)),
                            .blame_id = n == 1 ? m[0]->log_id : NULL };
    imap_conn_run(s->conn, &job);
}

/* ------------------------------------------------------ waiting for a session */

static void wait_fired(loop_t *loop, loop_timer_t *t, void *arg);

static void wait_add(imap_pool_t *p, imap_pool_acct_t *pa, imap_append_t *a)
{
    a->pool = p;
    a->pa = pa;
    TAILQ_INSERT_TAIL(&pa->waiters, a, wait_link);
    p->nwait++;
    p->st.waited++;
    imap_append_enter(a, IMAP_APPEND_ST_WAIT);
    loop_timer_init(&a->wait_timer, wait_fired, a);
    loop_timer_set(p->loop, &a->wait_timer, a->timeout_ms);
    wait_debug(a, p, "wait", NULL);
}

static void wait_del(imap_append_t *a)
{
    TAILQ_REMOVE(&a->pa->waiters, a, wait_link);
    a->pool->nwait--;
    loop_timer_cancel(a->loop, &a->wait_timer);
    a->pool = NULL;
    a->pa = NULL;
}

static void wait_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    imap_append_t *a = arg;
    unsigned busy = a->pa->nconn;
    wait_del(a);
    imap_append_fail(a, IMAP_ETIMEOUT, "no IMAP session of the account came free within %u ms (%u connections busy)",
                     a->timeout_ms, busy);
}

/* Queued requests to send with w in one MULTIAPPEND on the parked session
 * s: w first, then the next oldest, up to max_batch messages and
 * IMAP_BATCH_MAX_BYTES. None (0) when the server cannot take them or w
 * must look for an earlier copy first. */
static size_t gather_batch(const imap_pool_t *p, const imap_pool_sess_t *s, imap_append_t *w, imap_append_t **m)
{
    if (p->lim.max_batch < 2 || !(imap_conn_info(s->conn).caps & IMAP_CAP_MULTIAPPEND) || w->check_msgid)
        return 0;
    size_t n = 0, bytes = 0;
    for (imap_append_t *c = w; c && n < p->lim.max_batch; c = TAILQ_NEXT(c, wait_link)) {
        if (c->check_msgid || (n > 0 && bytes + c->len > IMAP_BATCH_MAX_BYTES))
            continue;
        m[n++] = c;
        bytes += c->len;
    }
    return n < 2 ? 0 : n;
}

/* Give the oldest waiter w a session: a parked one if any is alive (with
 * the waiters behind it when they can share its APPEND), else a fresh
 * connection when the account has a slot free. 0 when neither. */
static int serve_waiter(imap_pool_t *p, imap_append_t *w)
{
    imap_pool_acct_t *pa = w->pa;
    imap_pool_sess_t *s = pool_take(p, pa);
    if (s) {
        imap_append_t *m[IMAP_MAX_UIDS]; /* max_batch is at most that */
        size_t n = gather_batch(p, s, w, m);
        if (n == 0)
            m[n++] = w;
        for (size_t i = 0; i < n; i++) {
            wait_del(m[i]);
            wait_debug(m[i], p, "wait_served", n > 1 ? "batch" : "parked");
        }
        sess_run(p, s, m, n);
        return 1;
    }
    if (pa->nconn >= p->lim.max_conns_per_account)
        return 0;
    wait_del(w);
    wait_debug(w, p, "wait_served", "fresh");
    sess_new(p, pa, w);
    return 1;
}

static void wake_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    imap_pool_t *p = arg;
    imap_pool_acct_t *pa;
    imap_append_t *w;
    LIST_FOREACH (pa, &p->accts, link)
        while ((w = TAILQ_FIRST(&pa->waiters)) != NULL)
            if (!serve_waiter(p, w))
                break;
}

/* Serve waiters from a timer, never inside the call that freed or parked
 * a session (that may be a stream callback or the caller's callback). */
static void pool_wake(imap_pool_t *p)
{
    if (!p->freeing)
        loop_timer_set(p->loop, &p->wake_timer, 0);
}

void imap_pool_submit(imap_pool_t *p, imap_append_t *a)
{
    imap_pool_acct_t *pa = pacct_get(p, &a->acct);
    /* first come, first served: with requests queued, a parked session is
     * theirs (the wake timer hands it over) */
    imap_pool_sess_t *s = TAILQ_EMPTY(&pa->waiters) ? pool_take(p, pa) : NULL;
    if (s)
        sess_run(p, s, &a, 1);
    else if (pa->nconn >= p->lim.max_conns_per_account)
        wait_add(p, pa, a); /* for the first that is parked or closed, within the timeout */
    else
        sess_new(p, pa, a);
}

void imap_pool_withdraw(imap_append_t *a)
{
    if (a->state == IMAP_APPEND_ST_WAIT) {
        wait_del(a);
        return;
    }
    imap_pool_sess_t *s = a->sess;
    a->sess = NULL;
    int batch = s->nreqs > 1;
    for (size_t i = 0; i < s->nreqs; i++)
        if (s->reqs[i] == a)
            s->reqs[i] = NULL;
    if (batch && !imap_conn_sending(s->conn))
        return; /* all written out (or answered): nothing of this copy is referenced
                 * any more; the others go on (the server may store this one) */
    sess_free(s); /* alone, or the batch's bytes are still to be sent: the
                   * connection goes, the rest of its batch fails */
}

/* ---------------------------------------------------------------- public */

imap_pool_t *imap_pool_new(loop_t *loop, const imap_pool_limits_t *lim)
{
    imap_pool_t *p = xcalloc(1, sizeof(*p));
    p->loop = loop;
    imap_pool_limits_t z = { 0 };
    if (lim == NULL)
        lim = &z;
    p->lim.max_appends = or_default(lim->max_appends, IMAP_POOL_MAX_APPENDS);
    p->lim.max_age_ms = or_default(lim->max_age_ms, IMAP_POOL_MAX_AGE_MS);
    p->lim.idle_ms = or_default(lim->idle_ms, IMAP_POOL_IDLE_MS);
    p->lim.max_idle_per_account = or_default(lim->max_idle_per_account, IMAP_POOL_IDLE_PER_ACCT);
    p->lim.max_idle_total = or_default(lim->max_idle_total, IMAP_POOL_IDLE_TOTAL);
    p->lim.max_conns_per_account = or_default(lim->max_conns_per_account, IMAP_POOL_CONNS_PER_ACCT);
    p->lim.max_batch = or_default(lim->max_batch, IMAP_POOL_MAX_BATCH);
    if (p->lim.max_batch > IMAP_MAX_UIDS)
        p->lim.max_batch = IMAP_MAX_UIDS;
    LIST_INIT(&p->accts);
    TAILQ_INIT(&p->busy);
    TAILQ_INIT(&p->closing);
    loop_timer_init(&p->wake_timer, wake_fired, p);
    return p;
}

void imap_pool_free(imap_pool_t *p)
{
    if (p == NULL)
        return;
    p->freeing = 1; /* nothing is served from here on */
    loop_timer_cancel(p->loop, &p->wake_timer);
    imap_pool_sess_t *s;
    while ((s = TAILQ_FIRST(&p->busy)) != NULL) {
        /* in flight: they finish without the pool */
        sess_move(s, IMAP_POOL_SESS_DETACHED);
        s->pool = NULL;
        s->pa = NULL;
    }
    imap_pool_acct_t *pa;
    imap_append_t *w;
    LIST_FOREACH (pa, &p->accts, link)
        while ((w = TAILQ_FIRST(&pa->waiters)) != NULL) {
            /* queued: each goes on its own connection */
            wait_del(w);
            imap_append_run_alone(w);
        }
    while ((s = TAILQ_FIRST(&p->closing)) != NULL)
        sess_free(s); /* no result is owed */
    while ((pa = LIST_FIRST(&p->accts)) != NULL) {
        while ((s = TAILQ_FIRST(&pa->idle)) != NULL) {
            sess_debug(s, "logout", "pool_free");
            imap_conn_logout(s->conn); /* written at once, best effort */
            sess_free(s);
        }
        LIST_REMOVE(pa, link);
        free(pa->key);
        free(pa);
    }
    free(p);
}

void imap_pool_get_stats(const imap_pool_t *p, imap_pool_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    if (p == NULL)
        return;
    *st = p->st;
    st->idle = p->nidle;
    st->waiting = p->nwait;
}

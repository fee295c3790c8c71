/*
 * SUMMARY
 *  deliverer/worker.c - a worker thread: its loop, its broker connection
 *  and the jobs of the messages it consumes.
 * DESCRIPTION
 *  Each worker thread owns one epoll loop and everything that runs on it:
 *  the AMQP connection, the c-ares resolver, the Redis client, the SMTP
 *  session pool and the IMAP pool. Every consumed message becomes a job
 *  (job.h) that runs on the same loop; the worker keeps the list of its
 *  jobs and learns from each job's end callback when to drop it.
 *
 *  A lost broker connection acks nothing more (the broker redelivers
 *  every unacked message). Jobs that have not reached SMTP are dropped;
 *  jobs in an SMTP transaction finish it and record it in the ledger, so
 *  the redelivery skips those recipients (on_lost). Reconnecting waits for
 *  them and backs off with jitter.
 *
 *  Shutdown: the consumer is cancelled, in-flight jobs finish within the
 *  grace period, and whatever is still unfinished is left unacked.
 *
 *  Memory: every delivery is charged against the worker's budget
 *  (budget.h) from its content header (on_admit) until its job is freed
 *  (worker_drop_job), or until its connection is lost while its body was
 *  still arriving (on_lost). worker_charge() and worker_uncharge() are the
 *  only code that changes the charge; they pause the consumer when it
 *  reaches [message] inflight_memory and resume it below 3/4 of that.
 * DIAGNOSTICS
 *  Info lines consuming, finishing_smtp, draining, stopped,
 *  consumer_paused, consumer_resumed; errors broker_unavailable and
 *  dns_init_failed; gauges of in-flight messages and bytes and ready and
 *  blocked workers.
 */
#include "deliverer/worker.h"

#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/crash.h"
#include "core/list.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/util.h"
#include "deliverer/actions.h"
#include "deliverer/budget.h"
#include "deliverer/job.h"
#include "deliverer/lease.h"
#include "deliverer/ledger.h"
#include "deliverer/qstat.h"
#include "deliverer/warmup.h"
#include "deliverer/wrr.h"
#include "dns/resolver.h"
#include "imap/imap.h"
#include "metrics/heartbeat.h"
#include "metrics/metrics.h"
#include "queue/mq.h"

/* A job in the worker's list. */
typedef struct worker_job {
    TAILQ_ENTRY(worker_job) link;
    worker_t               *w;
    job_t                  *job;
    uint64_t                charge; /* against w->budget until the job is freed */
} worker_job_t;

struct worker {
    const worker_env_t *env;
    int                 index;
    pthread_t           thread;
    loop_t             *loop;
    job_ctx_t           jc;        /* what the jobs run on; jc.mq is the live connection */
    mq_t               *mq_dead;   /* lost connection awaiting release */
    rclient_t          *redis;     /* NULL when [redis] host is empty */
    lease_table_t      *leases;    /* this worker's shares of the sites' connection limits */
    TAILQ_HEAD(, worker_job) jobs;
    size_t              njobs;
    atomic_int          stop_requested;
    int                 draining;
    int                 ready;
    unsigned            reconnect_delay_ms;
    uint64_t            connected_ms;  /* mono time of the last successful connect */
    uint64_t            lost_ms;       /* mono time of the last connection loss */
    loop_timer_t        reconnect_timer;
    loop_timer_t        grace_timer;
    loop_timer_t        release_timer;
    loop_timer_t        trim_timer;    /* gives freed heap back once idle */
    loop_timer_t        gauge_timer;   /* connections and sites into the gauges, every second */
    loop_timer_t        heartbeat_timer; /* liveness stamp for /healthz, every second */
    int64_t             g_conns, g_running, g_waiting; /* this worker's share of those gauges */
    qstat_table_t      *qstat;         /* destinations deferred and parked: the status record */
    struct status_rows *status_rows;   /* scratch for it */
    unsigned            status_ticks;  /* gauge ticks since the last status record */
    uint64_t            status_cmd;    /* its SET, unanswered (0: none) */
    char                status_key[360]; /* mp:st:<host>:<pid>:<worker> */
    budget_t            budget;        /* bodies in flight: [message] inflight_memory */
    uint64_t            assembling;    /* charge of the admitted delivery whose body is arriving */
    int                 exit_code;
};

static void worker_connect(worker_t *w);

/* ---- jobs ---- */

static void worker_check_drained(worker_t *w)
{
    if (w->draining && w->njobs == 0)
        loop_stop(w->loop);
}

/* ---- the memory budget ---- */

/* Pause or resume the consumer as the charge asks. Nothing to tell a lost
 * connection: the next one starts consuming (worker_connect). */
static void worker_budget_update(worker_t *w)
{
    budget_action_t a = budget_update(&w->budget);
    if (a == BUDGET_STEADY)
        return;
    if (a == BUDGET_PAUSE) {
        metrics_inc(MET_CONSUMER_PAUSES, 1);
        log_info("worker", "consumer_paused", "worker=%d charged=%llu limit=%llu hard=%llu inflight=%zu",
                 w->index, (unsigned long long)w->budget.charge, (unsigned long long)w->budget.limit,
                 (unsigned long long)w->budget.hard, w->budget.held);
        if (w->jc.mq)
            mq_pause(w->jc.mq);
    } else {
        log_info("worker", "consumer_resumed", "worker=%d charged=%llu resume_below=%llu inflight=%zu",
                 w->index, (unsigned long long)w->budget.charge,
                 (unsigned long long)budget_resume_below(&w->budget), w->budget.held);
        if (w->jc.mq && !w->draining)
            mq_resume(w->jc.mq);
    }
}

/* 1 when the delivery is taken and charged c. */
static int worker_charge(worker_t *w, uint64_t c)
{
    if (!budget_take(&w->budget, c))
        return 0;
    metrics_gauge_add(MET_INFLIGHT_BYTES, (int64_t)c);
    worker_budget_update(w);
    return 1;
}

static void worker_uncharge(worker_t *w, uint64_t c)
{
    budget_release(&w->budget, c);
    metrics_gauge_add(MET_INFLIGHT_BYTES, -(int64_t)c);
    worker_budget_update(w);
}

/* A delivery's content header: take it (charged until its job is freed)
 * or, while paused past the hard bound, refuse it (mq nacks it back). */
static int on_admit(void *arg, size_t announced, int truncated)
{
    worker_t *w = arg;
    uint64_t c = budget_charge(announced, truncated);
    if (!worker_charge(w, c)) {
        metrics_inc(MET_DELIVERIES_REFUSED, 1);
        return 0;
    }
    w->assembling = c;
    return 1;
}

static void worker_drop_job(worker_job_t *wj)
{
    worker_t *w = wj->w;
    TAILQ_REMOVE(&w->jobs, wj, link);
    w->njobs--;
    metrics_gauge_add(MET_INFLIGHT, -1);
    job_free(wj->job);
    uint64_t c = wj->charge;
    free(wj);
    worker_uncharge(w, c);
}

/* A burst leaves the heap at its high-water mark: a thousand messages in
 * flight with their sessions' buffers are freed but stay resident, and
 * the worker's RSS would never come down to what it still holds (idle
 * pooled sessions, caches). Half a second after the worker runs out of
 * work, hand the free pages back. At most twice a second per worker, and
 * never while there is work. */
static void on_trim(loop_t *loop, loop_timer_t *t, void *arg)
{
    worker_t *w = arg;
    if (w->njobs == 0)
        malloc_trim(0);
}

static void on_job_end(void *arg, job_t *j)
{
    worker_job_t *wj = arg;
    worker_t *w = wj->w;
    worker_drop_job(wj);
    if (w->njobs == 0 && !loop_timer_active(&w->trim_timer))
        loop_timer_set(w->loop, &w->trim_timer, 500);
    worker_check_drained(w);
}

static void on_delivery(void *arg, mq_delivery_t *dv)
{
    worker_t *w = arg;
    metrics_inc(MET_MESSAGES_CONSUMED, 1);
    worker_job_t *wj = xcalloc(1, sizeof(*wj));
    wj->w = w;
    wj->charge = w->assembling; /* admitted at its header */
    w->assembling = 0;
    wj->job = job_new(&w->jc, dv, on_job_end, wj);
    TAILQ_INSERT_HEAD(&w->jobs, wj, link);
    w->njobs++;
    metrics_gauge_add(MET_INFLIGHT, 1);
    job_run(wj->job);
}

static void worker_drop_jobs(worker_t *w)
{
    while (!TAILQ_EMPTY(&w->jobs))
        worker_drop_job(TAILQ_FIRST(&w->jobs));
}

/* ---- connection management ---- */

static void release_dead_mq(loop_t *loop, loop_timer_t *t, void *arg)
{
    worker_t *w = arg;
    mq_free(w->mq_dead);
    w->mq_dead = NULL;
}

/* Exponential backoff with jitter: the workers and pods that lost the
 * broker together do not all come back in the same instant. */
static void worker_schedule_reconnect(worker_t *w)
{
    unsigned ms = (unsigned)(w->reconnect_delay_ms * (0.8 + 0.4 * util_rand01()));
    loop_timer_set(w->loop, &w->reconnect_timer, ms);
    w->reconnect_delay_ms = w->reconnect_delay_ms * 2 > 30000 ? 30000 : w->reconnect_delay_ms * 2;
}

/* Every unacked message returns to the queue once the broker sees the
 * connection gone. Jobs that have not reached SMTP are dropped: they have
 * nothing in the ledger ("sending" is only written by a transaction
 * holding its body), so the redelivery starts them afresh. A job whose
 * SMTP has begun is left to finish it (job_survives_loss): cut after the
 * final dot, its recipients would stay "sending" and the redelivery would
 * send them again, flagged; a transaction still in its envelope goes on
 * to mark, send and record like any other. It records its outcome in the
 * ledger and stops there; the redelivery skips what it delivered.
 * Finishing an envelope already under way costs less than redoing it,
 * and a job kept a little early is never wrong. Reconnecting waits for
 * these jobs (on_reconnect), so the redelivery never runs beside them. */
static void on_lost(void *arg, const char *why)
{
    worker_t *w = arg;
    if (w->ready) {
        w->ready = 0;
        metrics_gauge_add(MET_WORKERS_READY, -1);
    }
    w->mq_dead = w->jc.mq;
    w->jc.mq = NULL;
    if (w->assembling) { /* admitted, its body never completed */
        uint64_t c = w->assembling;
        w->assembling = 0;
        worker_uncharge(w, c);
    }
    worker_job_t *wj, *next;
    TAILQ_FOREACH_SAFE(wj, &w->jobs, link, next)
        if (!job_survives_loss(wj->job))
            worker_drop_job(wj);
    loop_timer_set(w->loop, &w->release_timer, 0);
    w->lost_ms = util_mono_ms();
    if (w->njobs)
        log_info("worker", "finishing_smtp", "worker=%d inflight=%zu reason=%s", w->index, w->njobs, LOG_Q(why));
    if (w->draining) {
        worker_check_drained(w); /* else the grace timer ends it */
        return;
    }
    /* a connection that dies soon after it was made (a broker that accepts
     * and then closes) must not turn into a reconnect storm */
    if (util_mono_ms() - w->connected_ms >= 30000)
        w->reconnect_delay_ms = 500;
    worker_schedule_reconnect(w);
}

static void on_reconnect(loop_t *loop, loop_timer_t *t, void *arg)
{
    worker_t *w = arg;
    if (w->njobs > 0) {
        /* jobs of the lost connection are finishing SMTP (see on_lost) */
        if (util_mono_ms() - w->lost_ms < w->env->cfg->worker_shutdown_grace_ms) {
            loop_timer_set(loop, t, 100);
            return;
        }
        log_warn("worker", "smtp_abandoned", "worker=%d unfinished=%zu", w->index, w->njobs);
        worker_drop_jobs(w);
    }
    worker_connect(w);
}

/* The broker's resource alarm blocked this worker's publishes (events,
 * retries): they are held in mq until it unblocks; deliveries go on. */
static void on_broker_blocked(void *arg, int blocked, const char *reason)
{
    (void)arg;
    (void)reason; /* logged by mq */
    metrics_gauge_add(MET_WORKERS_BLOCKED, blocked ? 1 : -1);
}

static void worker_connect(worker_t *w)
{
    const worker_env_t *env = w->env;
    const mp_config_t *cfg = env->cfg;
    mq_config_t mc = {
        .host = cfg->amqp_host, .port = cfg->amqp_port, .user = cfg->amqp_user,
        .password = cfg->amqp_password, .vhost = cfg->amqp_vhost,
        .heartbeat = cfg->amqp_heartbeat, .prefetch = env->prefetch,
        .queue = cfg->amqp_queue, .dead_queue = cfg->amqp_dead_queue,
        .events_exchange = cfg->amqp_events_exchange,
        .max_body = (size_t)env->max_body, .head_bytes = BUDGET_HEAD_BYTES,
    };
    char err[512] = "";
    mq_t *mq = mq_open(w->loop, &mc, err, sizeof(err));
    const retry_policy_t *rp = &env->retry;
    for (size_t i = 0; mq && i < rp->levels.n; i++) {
        char queue[256];
        retry_queue_name(rp->queue_prefix, &rp->levels, i, queue, sizeof(queue));
        if (mq_declare_delay_queue(mq, queue, (unsigned)rp->levels.ms[i], err, sizeof(err)) < 0) {
            mq_free(mq);
            mq = NULL;
        }
    }
    if (mq && mq_consume(mq, on_delivery, on_lost, w, err, sizeof(err)) < 0) {
        mq_free(mq);
        mq = NULL;
    }
    if (mq == NULL) {
        log_error("worker", "broker_unavailable", "worker=%d retry_ms=%u reason=%s", w->index,
                  w->reconnect_delay_ms, LOG_Q(err));
        worker_schedule_reconnect(w);
        return;
    }
    w->jc.mq = mq;
    mq_on_blocked(mq, on_broker_blocked, w);
    mq_on_admit(mq, on_admit, w);
    /* the new consumer runs whatever the last one was told; the jobs of
     * the lost connection are gone (on_reconnect waited for them) */
    w->budget.paused = 0;
    w->connected_ms = util_mono_ms();
    w->ready = 1;
    metrics_gauge_add(MET_WORKERS_READY, 1);
    log_info("worker", "consuming", "worker=%d queue=%s prefetch=%u max_sessions=%u", w->index,
             LOG_Q(cfg->amqp_queue), env->prefetch, env->max_sessions);
}

/* ---- shutdown ---- */

static void on_grace_expired(loop_t *loop, loop_timer_t *t, void *arg)
{
    worker_t *w = arg;
    log_warn("worker", "grace_expired", "worker=%d unfinished=%zu action=leave_unacked", w->index, w->njobs);
    loop_stop(loop);
}

static void on_wakeup(loop_t *loop, void *arg)
{
    worker_t *w = arg;
    if (!atomic_load(&w->stop_requested) || w->draining)
        return;
    w->draining = 1;
    loop_timer_cancel(loop, &w->reconnect_timer);
    log_info("worker", "draining", "worker=%d inflight=%zu", w->index, w->njobs);
    if (w->jc.mq)
        mq_cancel(w->jc.mq);
    loop_timer_set(loop, &w->grace_timer, w->env->cfg->worker_shutdown_grace_ms);
    worker_check_drained(w);
}

/* ---- the thread ---- */

/* The resolver's counters, into the process-wide metrics. */
static void on_dns_event(void *arg, const dns_event_t *ev)
{
    switch (ev->kind) {
    case DNS_EV_LOOKUP:
        metrics_dns_lookup(dns_layer_name(ev->layer), dns_status_tag(ev->status), ev->latency_us);
        break;
    case DNS_EV_L1_SIZE:
        metrics_gauge_add(MET_DNS_L1_ENTRIES, ev->l1_delta);
        break;
    case DNS_EV_L2_ERROR:
        metrics_inc(MET_DNS_L2_ERRORS, 1);
        break;
    }
}

/* The idle pooled sessions of a site key, and closing those beyond keep
 * (sites.h: idle connections count against the limit). */
static unsigned worker_site_idle(void *arg, const char *key)
{
    worker_t *w = arg;
    return (unsigned)deliver_ctx_idle_tagged(w->jc.svc.dctx, key);
}

static void worker_site_trim(void *arg, const char *key, unsigned keep)
{
    worker_t *w = arg;
    size_t n = deliver_ctx_trim(w->jc.svc.dctx, key, keep);
    if (n)
        log_debug("worker", "site_trim", "key=%s closed=%zu kept=%u", LOG_Q(key), n, keep);
}

/* This worker's share of a site's connection limit: its leases in Redis
 * (lease.h), or without Redis the process's share. */
static unsigned worker_site_allow(void *arg, const char *site, unsigned limit, unsigned want)
{
    worker_t *w = arg;
    unsigned a = lease_want(w->leases, site, limit, want);
    lease_held(w->leases, site, w->jc.svc.sites ? sites_held(w->jc.svc.sites, site) : 0);
    return a;
}

static void worker_lease_changed(void *arg, const char *site, unsigned allowance)
{
    worker_t *w = arg;
    (void)allowance;
    if (w->jc.svc.sites)
        sites_allowance_changed(w->jc.svc.sites, site);
}

static void gauge_move(metric_gauge_t g, int64_t *mine, int64_t now)
{
    if (now != *mine) {
        metrics_gauge_add(g, now - *mine);
        *mine = now;
    }
}

/* ---- the status record (docs/operations.md, "Queue summary") ---- */

#define STATUS_SITE_ROWS 256

typedef struct status_rows {
    qstat_row_t    rows[STATUS_SITE_ROWS];
    size_t         n;
    qstat_row_t    mine[QSTAT_DESTS];
    qstat_record_t rec;
} status_rows_t;

static void status_site(void *arg, const char *key, unsigned running, unsigned waiting)
{
    status_rows_t *sr = arg;
    (void)running;
    if (waiting == 0)
        return;
    qstat_row_t r;
    memset(&r, 0, sizeof(r));
    size_t len = strcspn(key, "@"); /* destination[@source]: the destination */
    if (len >= sizeof(r.dest))
        len = sizeof(r.dest) - 1;
    memcpy(r.dest, key, len);
    r.waiting = waiting;
    sr->n = qstat_merge(sr->rows, sr->n, STATUS_SITE_ROWS, &r, 1);
}

static void on_status_written(void *arg, const redisReply *reply, const char *err)
{
    worker_t *w = arg;
    (void)reply;
    (void)err; /* the next one, 2 s later, replaces it */
    w->status_cmd = 0;
}

/* One SET a period, skipped while the last one is unanswered. */
static void worker_write_status(worker_t *w, const deliver_stats_t *ds)
{
    if (w->redis == NULL || w->status_cmd != 0 || w->qstat == NULL)
        return;
    uint64_t now = util_wall_ms();
    status_rows_t *sr = w->status_rows;
    sr->n = 0;
    if (w->jc.svc.sites)
        sites_each(w->jc.svc.sites, status_site, sr);
    qstat_expire(w->qstat, now);
    size_t nmine = qstat_table_rows(w->qstat, sr->mine, QSTAT_DESTS, now);
    sr->n = qstat_merge(sr->rows, sr->n, STATUS_SITE_ROWS, sr->mine, nmine);
    qstat_record_t *r = &sr->rec;
    memset(r, 0, sizeof(*r));
    util_copy_text(r->queue, sizeof(r->queue), w->env->cfg->amqp_queue);
    if (gethostname(r->host, sizeof(r->host) - 1) != 0 || r->host[0] == '\0')
        util_copy_text(r->host, sizeof(r->host), "localhost");
    r->pid = (long)getpid();
    r->worker = w->index;
    r->inflight = w->njobs;
    r->inflight_bytes = w->budget.charge;
    r->smtp_connections = ds->pool.busy + ds->pool.idle;
    worker_job_t *wj;
    TAILQ_FOREACH(wj, &w->jobs, link) {
        uint64_t fs = job_first_seen_ms(wj->job);
        if (fs != 0 && (r->oldest_first_seen_ms == 0 || fs < r->oldest_first_seen_ms))
            r->oldest_first_seen_ms = fs;
    }
    r->updated_ms = now;
    r->nrows = sr->n < QSTAT_TOP ? sr->n : QSTAT_TOP;
    memcpy(r->rows, sr->rows, r->nrows * sizeof(r->rows[0]));
    char *json = qstat_encode(r);
    snprintf(w->status_key, sizeof(w->status_key), "%s%s:%ld:%d", QSTAT_KEY_PREFIX, r->host, r->pid, w->index);
    char ttl[16];
    snprintf(ttl, sizeof(ttl), "%u", (unsigned)QSTAT_TTL_MS);
    const char *argv[5] = { "SET", w->status_key, json, "PX", ttl };
    size_t lens[5] = { 3, strlen(w->status_key), strlen(json), 2, strlen(ttl) };
    w->status_cmd = rclient_commandargv(w->redis, on_status_written, w, 5, argv, lens);
    free(json);
}

static void on_gauges(loop_t *loop, loop_timer_t *t, void *arg)
{
    worker_t *w = arg;
    deliver_stats_t ds;
    sites_stats_t ss = { 0 };
    deliver_ctx_stats(w->jc.svc.dctx, &ds);
    if (w->jc.svc.sites && t) {
        sites_tick(w->jc.svc.sites); /* idle sessions closed by the pool itself, shares that shrank */
        sites_get_stats(w->jc.svc.sites, &ss);
    }
    gauge_move(MET_SMTP_CONNECTIONS, &w->g_conns, (int64_t)(ds.pool.busy + ds.pool.idle));
    gauge_move(MET_SITE_RUNNING, &w->g_running, (int64_t)ss.running);
    gauge_move(MET_SITE_WAITING, &w->g_waiting, (int64_t)ss.waiting);
    if (t && ++w->status_ticks >= QSTAT_PERIOD_MS / 1000) {
        w->status_ticks = 0;
        worker_write_status(w, &ds);
    }
    if (t)
        loop_timer_set(loop, t, 1000);
}

/* The liveness heartbeat (metrics/heartbeat.h): a loop that stops coming
 * round stops stamping, and /healthz reports it stuck. */
static void on_heartbeat(loop_t *loop, loop_timer_t *t, void *arg)
{
    worker_t *w = arg;
    heartbeat_stamp(w->index, util_mono_ms());
    loop_timer_set(loop, t, 1000);
}

/* The worker's services: Redis and the ledger, the resolver, the SMTP
 * and IMAP pools. 0, or -1 with err (nothing left to free). */
static int worker_open_services(worker_t *w, char *err, size_t errlen)
{
    const mp_config_t *cfg = w->env->cfg;
    domain_services_t *svc = &w->jc.svc;
    if (cfg->redis_host[0]) {
        rclient_config_t rc = { .host = cfg->redis_host, .port = cfg->redis_port,
                                .timeout_ms = cfg->redis_timeout_ms };
        w->redis = rclient_new(w->loop, &rc);
        svc->ledger = ledger_new(w->loop, w->redis, w->env->retry.max_age_ms);
    }
    /* The same rclient carries the DNS L2 cache: dns_resolver_free(), which
     * runs before rclient_free(), cancels the resolver's Redis commands. */
    dns_config_t dc = { .servers = cfg->dns_servers, .timeout_ms = cfg->dns_timeout_ms,
                        .tries = cfg->dns_tries, .l1_entries = cfg->dns_l1_entries,
                        .max_ttl_s = cfg->dns_max_ttl_s, .negative_ttl_s = cfg->dns_negative_ttl_s,
                        .redis = cfg->dns_l2 ? w->redis : NULL,
                        .on_event = on_dns_event, .event_arg = w };
    svc->dns = dns_resolver_new(w->loop, &dc, err, errlen);
    if (svc->dns == NULL) {
        rclient_free(w->redis);
        ledger_free(svc->ledger);
        w->redis = NULL;
        svc->ledger = NULL;
        return -1;
    }
    svc->loop = w->loop;
    svc->redis = w->redis;
    svc->throttle = w->env->throttle;
    svc->dcfg = &w->env->dcfg;
    svc->rate_limit_max_wait_ms = cfg->smtp_rate_limit_max_wait_ms;
    svc->mark_wait_ms = cfg->redis_mark_wait_ms;
    svc->send_unrecorded = cfg->redis_send_unrecorded != 0;
    svc->dctx = deliver_ctx_new(w->loop, &w->env->dcfg);
    char holder[320], host[256] = "";
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0')
        snprintf(host, sizeof(host), "localhost");
    snprintf(holder, sizeof(holder), "%s:%ld:%d", host, (long)getpid(), w->index);
    lease_config_t lc = { .ttl_ms = (unsigned)cfg->smtp_site_lease_ttl_ms,
                          .renew_ms = (unsigned)cfg->smtp_site_lease_renew_ms,
                          .local_holders = w->env->nworkers };
    w->leases = lease_new(w->loop, w->redis, holder, &lc, worker_lease_changed, w);
    svc->sites = sites_new(w->loop, &w->env->sites, worker_site_allow, w);
    sites_set_idle(svc->sites, worker_site_idle, worker_site_trim, w);
    svc->policy = w->env->policy;
    svc->wrr = wrr_new(0);
    /* polled a little more often than once a second, so that an action
     * taken anywhere is honoured here within a second */
    actions_config_t ac = { .poll_ms = 800 };
    svc->actions = actions_new(w->loop, w->redis, &ac, NULL, NULL);
    svc->warmup = warmup_new(w->loop, w->redis, w->env->nworkers);
    w->qstat = xcalloc(1, sizeof(*w->qstat));
    w->status_rows = xcalloc(1, sizeof(*w->status_rows));
    w->jc.qstat = w->qstat;
    w->status_ticks = QSTAT_PERIOD_MS / 1000 - 1; /* the first record a second after start */
    loop_timer_init(&w->gauge_timer, on_gauges, w);
    loop_timer_set(w->loop, &w->gauge_timer, 1000);
    if (cfg->imap_pool) {
        imap_pool_limits_t il = { .max_appends = cfg->imap_pool_max_appends,
                                  .idle_ms = cfg->imap_pool_idle_ms,
                                  .max_conns_per_account = cfg->imap_pool_max_connections,
                                  .max_batch = cfg->imap_pool_max_batch };
        w->jc.imap_pool = imap_pool_new(w->loop, &il);
    }
    return 0;
}

/* In this order: the jobs first (they cancel their deliveries, appends,
 * queries and Redis commands), then what they ran on; the Redis client
 * before the ledger, whose pending replies it still delivers. */
static void worker_close_services(worker_t *w)
{
    domain_services_t *svc = &w->jc.svc;
    worker_drop_jobs(w);
    loop_timer_cancel(w->loop, &w->gauge_timer);
    sites_free(svc->sites);
    svc->sites = NULL;
    actions_free(svc->actions); /* before the Redis client: it cancels its commands */
    svc->actions = NULL;
    wrr_free(svc->wrr);
    svc->wrr = NULL;
    warmup_free(svc->warmup);
    svc->warmup = NULL;
    lease_free(w->leases); /* its releases go out before the Redis client goes */
    w->leases = NULL;
    on_gauges(w->loop, NULL, w); /* the sites are gone */
    gauge_move(MET_SMTP_CONNECTIONS, &w->g_conns, 0);
    deliver_ctx_free(svc->dctx);
    svc->dctx = NULL;
    imap_pool_free(w->jc.imap_pool);
    w->jc.imap_pool = NULL;
    dns_resolver_free(svc->dns);
    svc->dns = NULL;
    if (w->redis != NULL) {
        rclient_cancel(w->redis, w->status_cmd);
        w->status_cmd = 0;
        if (w->status_key[0]) { /* gone from the summary now, not in 10 s (best effort) */
            const char *argv[2] = { "DEL", w->status_key };
            rclient_commandargv(w->redis, NULL, NULL, 2, argv, NULL);
        }
        rclient_flush(w->redis); /* the DEL, and the leases' releases above */
    }
    w->jc.qstat = NULL;
    free(w->qstat);
    free(w->status_rows);
    w->qstat = NULL;
    w->status_rows = NULL;
    rclient_free(w->redis);
    ledger_free(svc->ledger);
    w->redis = svc->redis = NULL;
    svc->ledger = NULL;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    char err[512];
    crash_thread_init(); /* a stack overflow is caught too (core/crash.h) */
    char tname[16];
    snprintf(tname, sizeof(tname), "mp-worker-%d", w->index % 10000);
    pthread_setname_np(pthread_self(), tname); /* top -H, /proc/PID/task/TID/comm */
    heartbeat_stamp(w->index, util_mono_ms()); /* running from here: a hang opening services counts */
    if (worker_open_services(w, err, sizeof(err)) < 0) {
        heartbeat_stamp(w->index, 0);
        log_error("worker", "dns_init_failed", "worker=%d reason=%s", w->index, LOG_Q(err));
        w->exit_code = 1;
        kill(getpid(), SIGUSR1); /* main takes it with sigwait and stops the others */
        crash_thread_fini();
        return NULL;
    }
    w->reconnect_delay_ms = 500;
    if (!atomic_load(&w->stop_requested))
        worker_connect(w);
    on_wakeup(w->loop, w); /* a stop that came before the loop ran */
    loop_timer_set(w->loop, &w->heartbeat_timer, 1000);
    loop_run(w->loop);
    loop_timer_cancel(w->loop, &w->heartbeat_timer);
    heartbeat_stamp(w->index, 0); /* out of its loop: stopping, not stuck */

    /* the connection first: mq_free() fails the unconfirmed publishes, and
     * their jobs finish (unacked) while they still exist */
    if (w->ready)
        metrics_gauge_add(MET_WORKERS_READY, -1);
    mq_free(w->jc.mq);
    mq_free(w->mq_dead);
    w->jc.mq = w->mq_dead = NULL;
    worker_close_services(w);
    loop_timer_cancel(w->loop, &w->grace_timer);
    loop_timer_cancel(w->loop, &w->reconnect_timer);
    loop_timer_cancel(w->loop, &w->release_timer);
    loop_timer_cancel(w->loop, &w->trim_timer);
    log_info("worker", "stopped", "worker=%d", w->index);
    crash_thread_fini();
    return NULL;
}

worker_t *worker_start(const worker_env_t *env, int index)
{
    worker_t *w = xcalloc(1, sizeof(*w));
    w->env = env;
    w->index = index;
    w->jc.env = env;
    w->jc.worker_index = index;
    TAILQ_INIT(&w->jobs);
    atomic_init(&w->stop_requested, 0);
    w->loop = loop_new();
    if (w->loop == NULL) {
        free(w);
        return NULL;
    }
    loop_timer_init(&w->reconnect_timer, on_reconnect, w);
    loop_timer_init(&w->grace_timer, on_grace_expired, w);
    loop_timer_init(&w->release_timer, release_dead_mq, w);
    loop_timer_init(&w->trim_timer, on_trim, w);
    loop_timer_init(&w->heartbeat_timer, on_heartbeat, w);
    budget_init(&w->budget, env->inflight_limit, budget_charge(env->max_body, 0));
    loop_set_wakeup(w->loop, on_wakeup, w);
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
        loop_free(w->loop);
        free(w);
        return NULL;
    }
    return w;
}

void worker_stop(worker_t *w)
{
    atomic_store(&w->stop_requested, 1);
    loop_wakeup(w->loop);
}

int worker_join(worker_t *w)
{
    pthread_join(w->thread, NULL);
    int rc = w->exit_code;
    loop_free(w->loop);
    free(w);
    return rc;
}

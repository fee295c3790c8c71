/*
 * SUMMARY
 *  deliverer/worker.c - a worker thread and the life of each message.
 * DESCRIPTION
 *  Every consumed message becomes a job that moves through
 *    PARSE -> RESOLVE (per recipient domain) -> SMTP (per domain)
 *          -> APPEND (sender's Sent folder, when mapped) -> EVENTS -> ACK
 *  Domains of one message are resolved and delivered concurrently. The
 *  job is acked only after every event it produced (or its dead letter)
 *  has been confirmed by the broker; if a confirm fails it is nacked
 *  back to the queue instead, so nothing is ever acked unaccounted for.
 *
 *  Malformed input (bad JSON, invalid addresses, headers that cannot be
 *  built) is published to the dead-letter queue with the reason in the
 *  x-mailpump-reason header, announced with a "dead" event, then acked.
 *
 *  The ledger (ledger.h): a lookup when the job starts (skip "done",
 *  flag "sending" as possible duplicates); "sending" for the recipients a
 *  server accepted, written while that transaction holds its body after
 *  the 354 (deliver.h before_body), so only a transaction that was about
 *  to send its final dot leaves the mark; "done" (or no record) once every
 *  domain is settled. Redis failing never holds a delivery back: the
 *  body goes on and the failure is counted.
 *
 *  A lost broker connection acks nothing more (the broker redelivers every
 *  unacked message). Jobs that have not reached SMTP are dropped; jobs in
 *  an SMTP transaction finish it and record it in the ledger, so the
 *  redelivery skips those recipients (on_lost). Reconnecting waits for
 *  them and backs off with jitter.
 *
 *  Shutdown: the consumer is cancelled, in-flight jobs finish within the
 *  grace period, and whatever is still unfinished is left unacked.
 */
#include "deliverer/worker.h"

#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <signal.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/buf.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/message.h"
#include "core/util.h"
#include "deliverer/outcome.h"
#include "deliverer/ledger.h"
#include "deliverer/retry.h"
#include "deliverer/throttle.h"
#include "dns/resolver.h"
#include "imap/imap.h"
#include "metrics/metrics.h"
#include "mime/build.h"
#include "queue/event.h"
#include "queue/mq.h"
#include "queue/msgjson.h"

typedef struct job job_t;

typedef struct job_rcpt {
    const char *addr;   /* into the message */
    size_t      domain; /* index into job->domains */
    outcome_t   outcome;
    const char *reason;
    int         code;
    char        enh[16];
    char        text[512];
    int         skip;          /* the ledger says an earlier attempt delivered it */
    int         possible_dup;  /* the ledger found it mid-transaction */
} job_rcpt_t;

typedef struct job_domain job_domain_t;

/* What an asynchronous callback (DNS, SMTP, timer) gets back: the job and
 * the domain's index. Embedded in the domain, valid for the job's life;
 * job_free() cancels every callback that could still use it. */
typedef struct domain_ref {
    job_t *job;
    size_t idx;
} domain_ref_t;

struct job_domain {
    char      *name;
    domain_ref_t self;
    uint64_t   dns_id;
    deliver_t *dl;
    deliver_candidate_t *cand; /* from DNS, kept for fast retries */
    size_t     ncand;
    unsigned   fast_tries;
    loop_timer_t fast_timer;
    char       mx_host[256];
    char       mx_addr[64];
    char       tls_version[32];
    char       tls_cipher[96];
    int        done;
    uint64_t   mark_op;  /* ledger "sending" of the held transaction, 0 if none */
    uint64_t   rate_op;  /* Redis command asking the fleet's rate_limits budget, 0 if none */
    int        slot_granted; /* fast_timer is the wait for a rate_limits slot already taken */
    uint64_t   hold;     /* its deliver hold id */
};

struct job {
    worker_t       *w;
    job_t          *prev, *next;
    mq_delivery_t  *dv;
    message_t      *msg;
    buf_t           raw;  /* RFC 5322 bytes, built once: IMAP APPEND and SMTP DATA */
    mime_seg_t     *wire; /* SMTP DATA: raw dot-stuffed, as segments pointing into raw */
    size_t          nwire;
    buf_t           wire_copy; /* the dot-stuffed copy, only if raw is not all CRLF */
    job_rcpt_t     *rcpts;
    size_t          nrcpts;
    job_domain_t   *domains;
    size_t          ndomains;
    size_t          domains_left;
    imap_append_t  *append;
    int             append_tried;
    int             appended_before; /* an earlier attempt already stored the Sent copy */
    int             append_needed;   /* an earlier attempt delivered but could not append */
    int             append_only;     /* this attempt only retries the Sent copy */
    unsigned        attempt;         /* 1 for the first delivery attempt */
    uint64_t        first_seen_ms;   /* wall clock of the first consume; travels in headers */
    uint64_t        retry_in_ms;     /* delay chosen for the next attempt */
    uint64_t        throttle_ms;     /* longest rate_limits wait of a deferred domain */
    char            give_up[160];    /* why transient recipients are not retried */
    imap_append_result_t append_res;
    size_t          confirms_left;
    int             confirm_failed;
    int             dead;
    uint64_t        started_ms;
    uint64_t        ledger_op;       /* outstanding ledger call, 0 if none */
    uint64_t        ledger_op2;
    int             smtp_started;    /* some domain reached domain_start_smtp(): see on_lost */
};

struct worker {
    const worker_env_t *env;
    int                 index;
    pthread_t           thread;
    loop_t             *loop;
    mq_t               *mq;
    mq_t               *mq_dead;   /* lost connection awaiting release */
    dns_resolver_t     *dns;
    deliver_ctx_t      *dctx;      /* SMTP session pool and TLS session cache */
    imap_pool_t        *imap_pool; /* logged-in IMAP sessions per account; NULL when [imap] pool = 0 */
    rclient_t          *redis;     /* NULL when [redis] host is empty */
    ledger_t           *ledger;
    job_t              *jobs;
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
    int                 exit_code;
};

static void job_publish_events(job_t *j);
static void job_finish(job_t *j, int ack);
static void worker_connect(worker_t *w);
static void on_appended(void *arg, const imap_append_result_t *res);
static void job_check_ledger(job_t *j);
static void job_resolve(job_t *j);
static void on_redelivery_counted(void *arg, int ok, long long count);

/* ---- job bookkeeping ---- */

static void job_link(worker_t *w, job_t *j)
{
    j->next = w->jobs;
    if (w->jobs)
        w->jobs->prev = j;
    w->jobs = j;
    w->njobs++;
    metrics_gauge_add(MET_INFLIGHT, 1);
}

static void job_unlink(worker_t *w, job_t *j)
{
    if (j->prev)
        j->prev->next = j->next;
    else
        w->jobs = j->next;
    if (j->next)
        j->next->prev = j->prev;
    w->njobs--;
    metrics_gauge_add(MET_INFLIGHT, -1);
}

/* Release a job and everything it still holds. Outstanding DNS queries,
 * SMTP deliveries and the IMAP append are cancelled: their callbacks will
 * not fire. Pending publish confirms must already be resolved. */
static void job_free(job_t *j)
{
    worker_t *w = j->w;
    for (size_t i = 0; i < j->ndomains; i++) {
        job_domain_t *d = &j->domains[i];
        if (d->dns_id && w->dns)
            dns_cancel(w->dns, d->dns_id);
        if (d->dl)
            deliver_cancel(d->dl);
        if (d->mark_op)
            ledger_cancel(w->ledger, d->mark_op);
        if (d->rate_op && w->redis)
            rclient_cancel(w->redis, d->rate_op);
        loop_timer_cancel(w->loop, &d->fast_timer);
        free(d->cand);
        free(d->name);
    }
    if (j->append)
        imap_append_cancel(j->append);
    if (j->ledger_op)
        ledger_cancel(w->ledger, j->ledger_op);
    if (j->ledger_op2)
        ledger_cancel(w->ledger, j->ledger_op2);
    free(j->domains);
    free(j->rcpts);
    free(j->wire);
    buf_free(&j->wire_copy);
    buf_free(&j->raw);
    message_free(j->msg);
    mq_delivery_free(j->dv);
    free(j);
}

static void worker_check_drained(worker_t *w)
{
    if (w->draining && w->njobs == 0)
        loop_stop(w->loop);
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

static void job_finish(job_t *j, int ack)
{
    worker_t *w = j->w;
    if (w->mq && mq_is_open(w->mq)) {
        if (ack)
            mq_ack(w->mq, j->dv->tag);
        else
            mq_nack(w->mq, j->dv->tag, 1);
    }
    if (ack)
        metrics_inc(MET_MESSAGES_DONE, 1);
    log_info("worker", "message_done", "msg=%s ack=%d rcpts=%zu ms=%llu",
             j->msg ? j->msg->id : "-", ack, j->nrcpts,
             (unsigned long long)(util_mono_ms() - j->started_ms));
    job_unlink(w, j);
    job_free(j);
    if (w->njobs == 0 && !loop_timer_active(&w->trim_timer))
        loop_timer_set(w->loop, &w->trim_timer, 500);
    worker_check_drained(w);
}

/* ---- confirmed publishing ---- */

static void on_confirm(void *arg, int ok)
{
    job_t *j = arg;
    if (ok) {
        metrics_inc(MET_EVENTS_PUBLISHED, 1);
    } else {
        metrics_inc(MET_PUBLISH_FAILED, 1);
        j->confirm_failed = 1;
    }
    if (--j->confirms_left == 0)
        job_finish(j, !j->confirm_failed);
}

static void job_publish(job_t *j, const char *exchange, const char *rkey, const char *body,
                        size_t len, const mq_publish_opts_t *opts)
{
    worker_t *w = j->w;
    j->confirms_left++;
    if (w->mq == NULL || mq_publish(w->mq, exchange, rkey, body, len, opts, on_confirm, j) < 0) {
        /* the connection is gone; the job is dropped with it */
        j->confirms_left--;
        j->confirm_failed = 1;
    }
}

static void job_publish_event(job_t *j, const mq_event_t *ev)
{
    char *json = mq_event_to_json(ev);
    mq_publish_opts_t o = { .message_id = j->msg ? j->msg->id : NULL, .priority = -1,
                            .persistent = 1 };
    job_publish(j, j->w->env->cfg->amqp_events_exchange, ev->event, json, strlen(json), &o);
    free(json);
}

/* Publish the original body to the dead-letter queue with the reason,
 * announce it, and ack once both are confirmed. */
static void job_dead_letter(job_t *j, const char *reason)
{
    worker_t *w = j->w;
    const mp_config_t *cfg = w->env->cfg;
    j->dead = 1;
    metrics_inc(MET_MESSAGES_DEAD, 1);
    log_warn("worker", "dead_letter", "tag=%llu msg=%s reason=\"%s\"",
             (unsigned long long)j->dv->tag, j->msg ? j->msg->id : "-", reason);
    char when[32];
    snprintf(when, sizeof(when), "%llu", (unsigned long long)util_wall_ms());
    mq_header_t hdrs[] = {
        { "x-mailpump-reason", reason },
        { "x-mailpump-dead-at-ms", when },
    };
    mq_publish_opts_t o = { .content_type = "application/octet-stream",
                            .message_id = j->dv->message_id, .priority = -1, .persistent = 1,
                            .headers = hdrs, .nheaders = 2 };
    job_publish(j, "", cfg->amqp_dead_queue, j->dv->body, j->dv->len, &o);
    mq_event_t ev = { .event = "dead", .message_id = j->msg ? j->msg->id : j->dv->message_id,
                      .error = reason, .attempt = j->attempt };
    job_publish_event(j, &ev);
    if (j->confirms_left == 0)
        job_finish(j, 0);
}

/* ---- results ---- */

static void rcpt_set(job_rcpt_t *r, outcome_t o, const char *reason, int code, const char *enh,
                     const char *text)
{
    r->outcome = o;
    r->reason = reason;
    r->code = code;
    snprintf(r->enh, sizeof(r->enh), "%s", enh ? enh : "");
    snprintf(r->text, sizeof(r->text), "%s", text ? text : "");
}

static void job_after_smtp(job_t *j);

static void job_domain_done(job_t *j)
{
    if (--j->domains_left > 0)
        return;
    job_after_smtp(j);
}

/* Every domain is settled: record the outcome in the ledger, then store
 * the Sent copy, then publish the events. */
static void job_store_sent_copy(job_t *j);

/* Redis could not answer a ledger call: delivery goes on at-least-once,
 * and operators see it in the metric and the log. */
static void ledger_unavailable(const job_t *j, const char *step)
{
    metrics_inc(MET_LEDGER_UNAVAILABLE, 1);
    log_warn("worker", "ledger_unavailable", "msg=%s step=%s (at-least-once)", j->msg->id, step);
}

static void on_ledger_done_marked(void *arg, int ok)
{
    job_t *j = arg;
    j->ledger_op = 0;
    if (!ok)
        ledger_unavailable(j, "mark_done");
    if (j->ledger_op2 == 0)
        job_store_sent_copy(j);
}

static void on_ledger_cleared(void *arg, int ok)
{
    job_t *j = arg;
    j->ledger_op2 = 0;
    if (!ok)
        ledger_unavailable(j, "clear");
    if (j->ledger_op == 0)
        job_store_sent_copy(j);
}

static void job_after_smtp(job_t *j)
{
    worker_t *w = j->w;
    if (w->ledger == NULL || j->nrcpts == 0) {
        job_store_sent_copy(j);
        return;
    }
    /* delivered -> "done" (a redelivery skips them); the rest -> no record,
     * so a later attempt does not mistake them for possible duplicates,
     * except those an earlier attempt left "sending": the server may still
     * have that copy, and the attempt that delivers must say so */
    const char **done = xcalloc(j->nrcpts, sizeof(char *));
    const char **clear = xcalloc(j->nrcpts, sizeof(char *));
    size_t nd = 0, nc = 0;
    for (size_t i = 0; i < j->nrcpts; i++) {
        if (j->rcpts[i].skip)
            continue;
        if (j->rcpts[i].outcome == OUTCOME_DELIVERED)
            done[nd++] = j->rcpts[i].addr;
        else if (!j->rcpts[i].possible_dup)
            clear[nc++] = j->rcpts[i].addr;
    }
    if (nd == 0 && nc == 0) {
        free(done);
        free(clear);
        job_store_sent_copy(j);
        return;
    }
    /* both ids are set before either callback can run (never synchronous) */
    if (nd)
        j->ledger_op = ledger_mark(w->ledger, j->msg->id, done, nd, LEDGER_DONE,
                                   on_ledger_done_marked, j);
    if (nc)
        j->ledger_op2 = ledger_mark(w->ledger, j->msg->id, clear, nc, LEDGER_NONE,
                                    on_ledger_cleared, j);
    free(done);
    free(clear);
}

static void job_store_sent_copy(job_t *j)
{
    worker_t *w = j->w;
    const worker_env_t *env = w->env;
    if (w->mq == NULL || !mq_is_open(w->mq)) {
        /* the delivery's channel is gone (see on_lost): the ledger holds
         * what this attempt delivered; the redelivery appends the Sent
         * copy and publishes the events */
        job_finish(j, 0);
        return;
    }
    size_t delivered = 0;
    for (size_t i = 0; i < j->nrcpts; i++)
        if (j->rcpts[i].outcome == OUTCOME_DELIVERED)
            delivered++;
    const account_t *acct = env->imap_addrlen ? accounts_find(&env->accounts, j->msg->from.addr)
                                              : NULL;
    if ((delivered == 0 && !j->append_needed) || acct == NULL || j->appended_before) {
        job_publish_events(j);
        return;
    }
    imap_account_t ia = {
        .addr = (const struct sockaddr *)&env->imap_addr,
        .addrlen = env->imap_addrlen,
        .host = env->cfg->imap_host,
        .tls = env->imap_tls,
        .ssl_ctx = env->imap_ctx,
        .verify_host = 1,
        .user = acct->login,
        .password = acct->password,
        .timeout_ms = env->cfg->imap_timeout_ms,
        .pool = w->imap_pool,
    };
    /* a retried append, or a message back after a worker or connection
     * died, may find its copy already stored: look before appending; and
     * a pooled session lost in an uncertain way looks before its retry */
    char mid[512];
    if (mime_header_find(buf_head(&j->raw), buf_size(&j->raw), "Message-ID", mid, sizeof(mid)) == MIME_OK) {
        ia.message_id = mid;
        if (j->append_only || j->dv->redelivered)
            ia.check_message_id = mid;
    }
    j->append_tried = 1;
    j->append = imap_append_start(w->loop, &ia, buf_head(&j->raw), buf_size(&j->raw), on_appended, j);
}

static void on_appended(void *arg, const imap_append_result_t *res)
{
    job_t *j = arg;
    j->append = NULL;
    j->append_res = *res;
    metrics_inc(MET_IMAP_SESSIONS, res->connections);
    metrics_inc(MET_IMAP_SESSIONS_REUSED, (uint64_t)res->reused);
    metrics_inc(MET_IMAP_ALREADY_STORED, (uint64_t)res->already_stored);
    if (res->batched > 1)
        metrics_inc(MET_IMAP_BATCHED, 1);
    if (res->status == IMAP_ENOUIDPLUS) {
        /* stored, only the UID is unknown: never append it twice */
        j->append_res.status = IMAP_OK;
        j->append_res.uid = j->append_res.uidvalidity = 0;
    }
    if (res->status == IMAP_OK)
        metrics_inc(MET_IMAP_APPENDED, 1);
    else
        metrics_inc(MET_IMAP_APPEND_FAILED, 1);
    job_publish_events(j);
}

static const char *event_name(outcome_t o)
{
    switch (o) {
    case OUTCOME_DELIVERED: return "delivered";
    case OUTCOME_TRANSIENT: return "deferred";
    default: return "bounced";
    }
}

/* Delay queue of level i: <prefix>.<level>, e.g. mail.retry.5m. */
static void retry_queue_name(const worker_env_t *env, size_t i, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s.%s", env->cfg->retry_queue_prefix, env->levels.names[i]);
}

static double rand01(void)
{
    return (double)(util_rand64() >> 11) / 9007199254740992.0; /* 2^53 */
}

/* The Sent copy failed for a reason a later try can cure (network, TLS,
 * timeout, a refusal such as over quota); not for bad credentials or a
 * missing \Sent mailbox, which need an operator. */
static int job_append_retryable(const job_t *j)
{
    if (!j->append_tried)
        return 0;
    switch (j->append_res.status) {
    case IMAP_ENETWORK:
    case IMAP_ETIMEOUT:
    case IMAP_ETLS:
    case IMAP_EPROTO:
    case IMAP_EREFUSED:
    case IMAP_EBUSY:
        return 1;
    default:
        return 0;
    }
}

/* Republish the original body to a delay queue with the recipients still
 * pending; the broker routes it back to the outbound queue when the delay
 * expires. Returns 1 if a retry was scheduled; 0 when attempts or age are
 * used up (j->give_up says which). */
static int job_schedule_retry(job_t *j)
{
    worker_t *w = j->w;
    const worker_env_t *env = w->env;
    const mp_config_t *cfg = env->cfg;
    int c = retry_class(j->dv->priority);
    uint64_t server_ms = j->throttle_ms; /* our own rate limit counts like a server's request */
    buf_t pending = BUF_INIT;
    int throttled_only = 1; /* every recipient left waits for a rate_limits slot: no attempt spent */
    for (size_t i = 0; i < j->nrcpts; i++) {
        const job_rcpt_t *r = &j->rcpts[i];
        if (r->outcome != OUTCOME_TRANSIENT)
            continue;
        if (buf_size(&pending))
            buf_putc(&pending, ',');
        buf_puts(&pending, r->addr);
        if (r->code == 0 && r->reason && strcmp(r->reason, "rate_limited") == 0)
            continue; /* deferred by rate_limits before any server was asked */
        throttled_only = 0;
        uint64_t asked = retry_server_delay_ms(r->text);
        if (asked > server_ms)
            server_ms = asked;
    }
    if (buf_size(&pending) == 0 && !job_append_retryable(j)) {
        buf_free(&pending);
        return 0; /* nothing to retry */
    }
    throttled_only = throttled_only && buf_size(&pending) > 0;
    unsigned next_attempt = throttled_only ? j->attempt : j->attempt + 1;
    uint64_t want = throttled_only ? 0 : retry_backoff_ms(cfg->retry_base_ms[c], j->attempt, rand01());
    size_t level = retry_pick_level(&env->levels, want, server_ms);
    uint64_t delay = env->levels.ms[level];
    uint64_t age = util_wall_ms() - j->first_seen_ms;
    if (!throttled_only && j->attempt >= cfg->retry_max_attempts[c]) {
        snprintf(j->give_up, sizeof(j->give_up), "retries exhausted after %u attempts", j->attempt);
    } else if (age + delay > cfg->retry_max_age_ms[c]) {
        char a[32];
        config_format_duration(cfg->retry_max_age_ms[c], a, sizeof(a));
        snprintf(j->give_up, sizeof(j->give_up), "expired: next attempt would pass the maximum "
                 "age of %s (P%d)", a, c);
    }
    if (j->give_up[0]) {
        buf_free(&pending);
        return 0;
    }
    char attempt[16], first[32], queue[256];
    snprintf(attempt, sizeof(attempt), "%u", next_attempt);
    snprintf(first, sizeof(first), "%llu", (unsigned long long)j->first_seen_ms);
    retry_queue_name(env, level, queue, sizeof(queue));
    int appended = j->appended_before || (j->append_tried && j->append_res.status == IMAP_OK);
    int needed = !appended && job_append_retryable(j);
    mq_header_t hdrs[] = {
        { "x-mailpump-pending", buf_head(&pending) },
        { "x-mailpump-attempt", attempt },
        { "x-mailpump-first-seen-ms", first },
        { "x-mailpump-appended", appended ? "1" : "0" },
        { "x-mailpump-append-needed", needed ? "1" : "0" },
        { "x-mailpump-append-only", buf_size(&pending) == 0 ? "1" : "0" },
    };
    mq_publish_opts_t o = { .message_id = j->msg->id, .priority = j->dv->priority,
                            .persistent = 1, .headers = hdrs, .nheaders = 6 };
    j->retry_in_ms = delay;
    log_info("worker", "retry_scheduled",
             "msg=%s class=P%d attempt=%u queue=%s delay_ms=%llu server_ms=%llu pending=%s",
             j->msg->id, c, next_attempt, queue, (unsigned long long)delay,
             (unsigned long long)server_ms, buf_head(&pending));
    job_publish(j, "", queue, j->dv->body, j->dv->len, &o);
    buf_free(&pending);
    return 1;
}

static void job_publish_events(job_t *j)
{
    int appended = j->append_tried && j->append_res.status == IMAP_OK;
    size_t transient = 0;
    for (size_t i = 0; i < j->nrcpts; i++)
        transient += j->rcpts[i].outcome == OUTCOME_TRANSIENT;
    int retrying = (transient > 0 || job_append_retryable(j)) && job_schedule_retry(j);
    for (size_t i = 0; i < j->nrcpts; i++) {
        job_rcpt_t *r = &j->rcpts[i];
        job_domain_t *d = &j->domains[r->domain];
        char exhausted[700] = "";
        if (r->outcome == OUTCOME_TRANSIENT && !retrying) {
            /* out of attempts or time: the last transient answer becomes final */
            snprintf(exhausted, sizeof(exhausted), "%s; last reply: %s", j->give_up, r->text);
            r->outcome = OUTCOME_PERMANENT;
        }
        switch (r->outcome) {
        case OUTCOME_DELIVERED: metrics_inc(MET_RCPT_DELIVERED, 1); break;
        case OUTCOME_TRANSIENT: metrics_inc(MET_RCPT_DEFERRED, 1); break;
        default: metrics_inc(MET_RCPT_FAILED, 1); break;
        }
        mq_event_t ev = {
            .event = event_name(r->outcome),
            .message_id = j->msg->id,
            .trace_id = j->msg->trace_id,
            .sender = j->msg->from.addr,
            .recipient = r->addr,
            .outcome = outcome_name(r->outcome),
            .reason = r->reason,
            .smtp_code = r->code,
            .smtp_enhanced = r->enh,
            .smtp_text = r->text,
            .mx_host = d->mx_host,
            .mx_addr = d->mx_addr,
            .tls_version = d->tls_version[0] ? d->tls_version : NULL,
            .tls_cipher = d->tls_cipher[0] ? d->tls_cipher : NULL,
            .attempt = j->attempt,
            .imap_appended = appended && r->outcome == OUTCOME_DELIVERED,
            .imap_uidvalidity = j->append_res.uidvalidity,
            .imap_uid = j->append_res.uid,
            .imap_mailbox = j->append_res.mailbox,
            /* no server answered: the local reason ("connect: Connection
             * refused", a DNS failure, a rate limit) */
            .error = exhausted[0] ? exhausted : r->code == 0 && r->text[0] ? r->text : NULL,
            .retry_in_ms = r->outcome == OUTCOME_TRANSIENT ? j->retry_in_ms : 0,
            .possible_duplicate = r->possible_dup && r->outcome == OUTCOME_DELIVERED,
            .already_delivered = r->skip,
            .age_ms = util_wall_ms() - j->first_seen_ms,
        };
        log_info("worker", event_name(r->outcome),
                 "msg=%s rcpt=%s attempt=%u code=%d enh=%s reason=%s mx=%s tls=%s", j->msg->id,
                 r->addr, j->attempt, r->code, r->enh[0] ? r->enh : "-",
                 r->reason ? r->reason : "-", d->mx_host[0] ? d->mx_host : "-",
                 d->tls_version[0] ? d->tls_version : "none");
        job_publish_event(j, &ev);
    }
    if (j->append_tried) {
        mq_event_t ev = {
            .event = appended ? "appended" : "append_failed",
            .message_id = j->msg->id,
            .trace_id = j->msg->trace_id,
            .sender = j->msg->from.addr,
            .attempt = j->attempt,
            .imap_appended = appended,
            .imap_uidvalidity = j->append_res.uidvalidity,
            .imap_uid = j->append_res.uid,
            .imap_mailbox = j->append_res.mailbox,
            .error = appended ? NULL : j->append_res.error,
            .retry_in_ms = !appended && retrying && job_append_retryable(j) ? j->retry_in_ms : 0,
            .age_ms = util_wall_ms() - j->first_seen_ms,
        };
        job_publish_event(j, &ev);
    }
    if (j->confirms_left == 0)
        job_finish(j, 0);
}

/* ---- SMTP per domain ---- */

static void on_delivered(void *arg, const deliver_result_t *res);

/* A session-level network failure or timeout for every recipient: no
 * server decided anything, so this is jitter worth a quick retry. */
static int worth_fast_retry(const deliver_result_t *res)
{
    if (res->nrcpts == 0)
        return 0;
    for (size_t i = 0; i < res->nrcpts; i++) {
        const deliver_rcpt_result_t *r = &res->rcpts[i];
        if (r->outcome != OUTCOME_TRANSIENT || r->code != 0 || r->reason == NULL ||
            (strcmp(r->reason, "network") != 0 && strcmp(r->reason, "timeout") != 0))
            return 0;
    }
    return 1;
}

static void domain_start_smtp(job_t *j, size_t di);
static void domain_go(job_t *j, size_t di);

/* fast_timer: the end of a wait for a rate_limits slot (SMTP now), or a
 * fast retry, which is another transaction and takes a slot of its own */
static void on_fast_retry(loop_t *loop, loop_timer_t *t, void *arg)
{
    domain_ref_t *ref = arg;
    job_domain_t *d = &ref->job->domains[ref->idx];
    if (d->slot_granted) {
        d->slot_granted = 0;
        domain_start_smtp(ref->job, ref->idx);
        return;
    }
    domain_go(ref->job, ref->idx);
}

static void on_delivered_domain(job_t *j, size_t di, const deliver_result_t *res)
{
    job_domain_t *d = &j->domains[di];
    d->dl = NULL;
    if (d->mark_op) {
        /* a transaction ended while held (timeout, lost connection): its
         * mark still lands in Redis, before the marks job_after_smtp()
         * sends on the same connection; only the resume is void now */
        ledger_cancel(j->w->ledger, d->mark_op);
        d->mark_op = 0;
    }
    /* cut between the final dot and its reply: whatever attempt delivers
     * these recipients later (a fast retry, a retry level) may be a second
     * copy; the "sending" mark stays (job_after_smtp) */
    for (size_t i = 0, k = 0; i < j->nrcpts && k < res->nrcpts; i++) {
        if (j->rcpts[i].domain != di || j->rcpts[i].skip)
            continue;
        if (res->rcpts[k++].maybe_sent && !j->rcpts[i].possible_dup) {
            j->rcpts[i].possible_dup = 1;
            metrics_inc(MET_POSSIBLE_DUPLICATES, 1);
        }
    }
    metrics_inc(MET_SMTP_SESSIONS, res->connections); /* new connections, not pooled reuses */
    metrics_inc(MET_SMTP_SESSIONS_REUSED, res->reused);
    metrics_inc(MET_TLS_FULL_HANDSHAKES, res->tls_full);
    metrics_inc(MET_TLS_RESUMED_HANDSHAKES, res->tls_resumed);
    int c = retry_class(j->dv->priority);
    const mp_config_t *cfg = j->w->env->cfg;
    if (worth_fast_retry(res) && d->fast_tries < cfg->retry_fast_retries[c]) {
        uint64_t ms = retry_fast_delay_ms(cfg->retry_fast_base_ms[c], d->fast_tries, rand01());
        d->fast_tries++;
        log_info("worker", "fast_retry", "msg=%s domain=%s try=%u delay_ms=%llu reason=\"%s\"",
                 j->msg->id, d->name, d->fast_tries, (unsigned long long)ms, res->rcpts[0].text);
        loop_timer_set(j->w->loop, &d->fast_timer, ms);
        return;
    }
    snprintf(d->mx_host, sizeof(d->mx_host), "%s", res->mx_host);
    snprintf(d->mx_addr, sizeof(d->mx_addr), "%s", res->mx_addr);
    snprintf(d->tls_version, sizeof(d->tls_version), "%s", res->tls_version ? res->tls_version : "");
    snprintf(d->tls_cipher, sizeof(d->tls_cipher), "%s", res->tls_cipher ? res->tls_cipher : "");
    /* results come back in request order: the domain's recipients */
    size_t k = 0;
    for (size_t i = 0; i < j->nrcpts && k < res->nrcpts; i++) {
        if (j->rcpts[i].domain != di || j->rcpts[i].skip)
            continue;
        const deliver_rcpt_result_t *rr = &res->rcpts[k++];
        rcpt_set(&j->rcpts[i], rr->outcome, rr->reason, rr->code, rr->enh, rr->text);
    }
    d->done = 1;
    job_domain_done(j);
}

/* Deliveries report back with a small heap cell naming job and domain. */
static void on_delivered(void *arg, const deliver_result_t *res)
{
    domain_ref_t *ref = arg;
    on_delivered_domain(ref->job, ref->idx, res);
}

static void on_mx(void *arg, const dns_mx_result_t *mx);

static void domain_fail(job_t *j, size_t di, outcome_t o, const char *reason, const char *text)
{
    for (size_t i = 0; i < j->nrcpts; i++)
        if (j->rcpts[i].domain == di && !j->rcpts[i].skip)
            rcpt_set(&j->rcpts[i], o, reason, 0, NULL, text);
    j->domains[di].done = 1;
    job_domain_done(j);
}

static void on_mx_domain(job_t *j, size_t di, const dns_mx_result_t *mx)
{
    worker_t *w = j->w;
    job_domain_t *d = &j->domains[di];
    d->dns_id = 0;
    if (mx->status != DNS_OK) {
        char text[256];
        snprintf(text, sizeof(text), "%s: %s", d->name, dns_strerror(mx->status));
        domain_fail(j, di, dns_status_is_permanent(mx->status) ? OUTCOME_PERMANENT : OUTCOME_TRANSIENT,
                    "dns", text);
        return;
    }
    d->cand = deliver_candidates_from_mx(mx, w->env->dcfg.max_mx, &d->ncand);
    domain_go(j, di);
}

/* RFC 6531: a non-ASCII envelope address needs SMTPUTF8 (the MIME
 * builder's output is 7-bit, so BODY=8BITMIME is never needed). */
static int job_needs_smtputf8(const job_t *j)
{
    for (const unsigned char *p = (const unsigned char *)j->msg->from.addr; p && *p; p++)
        if (*p >= 0x80)
            return 1;
    for (size_t i = 0; i < j->nrcpts; i++)
        for (const unsigned char *p = (const unsigned char *)j->rcpts[i].addr; p && *p; p++)
            if (*p >= 0x80)
                return 1;
    return 0;
}

static void on_sending_marked(void *arg, int ok)
{
    domain_ref_t *ref = arg;
    job_t *j = ref->job;
    job_domain_t *d = &j->domains[ref->idx];
    d->mark_op = 0;
    if (!ok)
        ledger_unavailable(j, "mark_sending"); /* the body goes all the same */
    deliver_resume(d->dl, d->hold);
}

/* A transaction of this domain has its 354 and holds its body: record its
 * accepted recipients as "sending" first. From the final dot on, the
 * server may take the message without our hearing of it (RFC 1047); a
 * redelivery must then flag them, and before it nothing can have been
 * delivered, so nothing is marked. */
static void on_before_body(void *arg, deliver_t *dl, uint64_t hold, const char *const *accepted, size_t n)
{
    domain_ref_t *ref = arg;
    job_t *j = ref->job;
    job_domain_t *d = &j->domains[ref->idx];
    if (d->mark_op)
        ledger_cancel(j->w->ledger, d->mark_op); /* of a transaction that ended while held */
    d->hold = hold;
    d->mark_op = ledger_mark(j->w->ledger, j->msg->id, accepted, n, LEDGER_SENDING, on_sending_marked, ref);
}

/* Deliver the domain's recipients over its MX candidates. */
static void domain_start_smtp(job_t *j, size_t di)
{
    worker_t *w = j->w;
    job_domain_t *d = &j->domains[di];
    if (w->mq == NULL || !mq_is_open(w->mq)) {
        /* no transaction is started for a message the broker redelivers */
        domain_fail(j, di, OUTCOME_TRANSIENT, "network", "broker connection lost");
        return;
    }
    j->smtp_started = 1;
    const char **rcpts = xcalloc(j->nrcpts, sizeof(char *));
    size_t n = 0;
    for (size_t i = 0; i < j->nrcpts; i++)
        if (j->rcpts[i].domain == di && !j->rcpts[i].skip)
            rcpts[n++] = j->rcpts[i].addr;
    deliver_request_t req = {
        .mail_from = j->msg->from.addr,
        .rcpts = rcpts,
        .nrcpts = n,
        .data = buf_head(&j->wire_copy),
        .len = buf_size(&j->wire_copy),
        .segs = j->wire,
        .nsegs = j->nwire,
        .message_size = buf_size(&j->raw),
        .candidates = d->cand,
        .ncandidates = d->ncand,
        .log_id = j->msg->id,
        .domain = d->name,
        .need = job_needs_smtputf8(j) ? SMTP_NEED_SMTPUTF8 : 0,
        /* without a ledger there is nothing to record: no hold at all */
        .before_body = w->ledger ? on_before_body : NULL,
        .before_body_arg = &d->self,
    };
    d->dl = deliver_ctx_start(w->dctx, &req, on_delivered, &d->self);
    free(rcpts);
    if (d->dl == NULL)
        domain_fail(j, di, OUTCOME_TRANSIENT, "network", "cannot start SMTP delivery");
}

static void on_mx(void *arg, const dns_mx_result_t *mx)
{
    domain_ref_t *ref = arg;
    on_mx_domain(ref->job, ref->idx, mx);
}

/* SMTP for the domain after its rate limit said wait (ms): at once, after
 * a wait for its slot (on fast_timer), or, when the slot is further away
 * than rate_limit_max_wait, deferred to a retry queue no sooner than it,
 * without spending an attempt (job_schedule_retry). */
static void domain_throttled(job_t *j, size_t di, int64_t wait, const char *rule)
{
    worker_t *w = j->w;
    job_domain_t *d = &j->domains[di];
    const mp_config_t *cfg = w->env->cfg;
    if (wait <= 0) {
        domain_start_smtp(j, di);
        return;
    }
    if ((uint64_t)wait > cfg->smtp_rate_limit_max_wait_ms) {
        char text[256];
        /* for people; the wait itself travels in j->throttle_ms */
        snprintf(text, sizeof(text), "local rate limit %s: next free slot in %llu s", rule,
                 (unsigned long long)((wait + 999) / 1000));
        if ((uint64_t)wait > j->throttle_ms)
            j->throttle_ms = (uint64_t)wait; /* the retry comes no sooner (job_schedule_retry) */
        metrics_inc(MET_RATE_LIMIT_DEFERRED, 1);
        log_info("worker", "rate_limited", "msg=%s domain=%s rule=%s wait_ms=%lld deferred=1", j->msg->id, d->name,
                 rule, (long long)wait);
        domain_fail(j, di, OUTCOME_TRANSIENT, "rate_limited", text);
        return;
    }
    metrics_inc(MET_RATE_LIMIT_WAITS, 1);
    log_debug("worker", "rate_limited", "msg=%s domain=%s rule=%s wait_ms=%lld", j->msg->id, d->name, rule,
              (long long)wait);
    d->slot_granted = 1;
    loop_timer_set(w->loop, &d->fast_timer, (uint64_t)wait);
}

/* The process's own budget: without Redis, or while it cannot answer. */
static int64_t local_take(job_t *j, size_t di)
{
    const worker_env_t *env = j->w->env;
    return throttle_take(env->throttle, j->domains[di].name, util_mono_ms(), env->cfg->smtp_rate_limit_max_wait_ms,
                         NULL, 0);
}

static void on_rate_reply(void *arg, const redisReply *reply, const char *err)
{
    domain_ref_t *ref = arg;
    job_t *j = ref->job;
    job_domain_t *d = &j->domains[ref->idx];
    char rule[96] = "";
    d->rate_op = 0;
    throttle_rule(j->w->env->throttle, d->name, NULL, rule, sizeof(rule));
    int64_t wait;
    if (reply && reply->type == REDIS_REPLY_INTEGER) {
        wait = reply->integer;
    } else {
        metrics_inc(MET_RATE_LIMIT_REDIS_ERRORS, 1);
        log_debug("worker", "rate_limit_local", "msg=%s domain=%s error=\"%s\"", j->msg->id, d->name,
                  err ? err : "unexpected reply");
        wait = local_take(j, ref->idx);
    }
    domain_throttled(j, ref->idx, wait, rule);
}

/* The domain's message-rate limit ([smtp] rate_limits), then SMTP. With
 * Redis the budget is the fleet's (one key per rule, THROTTLE_REDIS_SCRIPT);
 * without, or when Redis fails, the process's own. */
static void domain_go(job_t *j, size_t di)
{
    worker_t *w = j->w;
    job_domain_t *d = &j->domains[di];
    double interval = 0;
    char rule[96];
    if (!throttle_rule(w->env->throttle, d->name, &interval, rule, sizeof(rule))) {
        domain_start_smtp(j, di);
        return;
    }
    if (w->redis && rclient_connected(w->redis)) {
        char key[128], iv[32], mw[32];
        snprintf(key, sizeof(key), "mp:rl:%s", rule);
        snprintf(iv, sizeof(iv), "%.3f", interval);
        snprintf(mw, sizeof(mw), "%llu", (unsigned long long)w->env->cfg->smtp_rate_limit_max_wait_ms);
        const char *argv[] = { "EVAL", THROTTLE_REDIS_SCRIPT, "1", key, iv, mw };
        d->rate_op = rclient_commandargv(w->redis, on_rate_reply, &d->self, 6, argv, NULL);
        return;
    }
    domain_throttled(j, di, local_take(j, di), rule);
}

/* ---- a new message ---- */

static size_t job_domain_index(job_t *j, const char *domain)
{
    for (size_t i = 0; i < j->ndomains; i++)
        if (strcasecmp(j->domains[i].name, domain) == 0)
            return i;
    j->domains = xrealloc(j->domains, (j->ndomains + 1) * sizeof(job_domain_t));
    memset(&j->domains[j->ndomains], 0, sizeof(job_domain_t));
    j->domains[j->ndomains].name = xstrdup(domain);
    loop_timer_init(&j->domains[j->ndomains].fast_timer, on_fast_retry, NULL);
    return j->ndomains++;
}

/* 1 if addr is in the comma-separated list (case-insensitive). */
static int in_list(const char *list, const char *addr)
{
    size_t alen = strlen(addr);
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == alen && strncasecmp(p, addr, len) == 0)
            return 1;
        p += len + (end ? 1 : 0);
    }
    return 0;
}

/* Add recipients, once each; on a retry only those still pending. */
static void job_add_rcpts(job_t *j, const mp_address_t *list, size_t n, const char *pending)
{
    for (size_t i = 0; i < n; i++) {
        if (pending && !in_list(pending, list[i].addr))
            continue;
        int dup = 0;
        for (size_t k = 0; k < j->nrcpts && !dup; k++)
            dup = strcasecmp(j->rcpts[k].addr, list[i].addr) == 0;
        if (dup)
            continue; /* one copy per recipient, whatever the header lists */
        j->rcpts = xrealloc(j->rcpts, (j->nrcpts + 1) * sizeof(job_rcpt_t));
        job_rcpt_t *r = &j->rcpts[j->nrcpts++];
        memset(r, 0, sizeof(*r));
        r->addr = list[i].addr;
        r->domain = job_domain_index(j, message_addr_domain(list[i].addr));
    }
}

/* Resolve every domain that still has a recipient to deliver. */
static void job_resolve(job_t *j)
{
    worker_t *w = j->w;
    j->domains_left = 0;
    for (size_t i = 0; i < j->ndomains; i++) {
        int work = 0;
        for (size_t r = 0; r < j->nrcpts && !work; r++)
            work = j->rcpts[r].domain == i && !j->rcpts[r].skip;
        j->domains[i].done = !work;
        j->domains_left += work;
    }
    if (j->domains_left == 0) {
        job_after_smtp(j);
        return;
    }
    /* counted down, not compared with j->ndomains: a delivery that fails
     * synchronously can settle the job's last domain and finish the job */
    for (size_t i = 0, left = j->domains_left; left > 0; i++) {
        if (j->domains[i].done)
            continue;
        left--;
        if (w->env->dcfg.nrelay > 0) { /* relay mode: the smarthost replaces MX */
            domain_go(j, i);
            continue;
        }
        metrics_inc(MET_DNS_QUERIES, 1);
        j->domains[i].dns_id = dns_mx_query(w->dns, j->domains[i].name, on_mx, &j->domains[i].self);
        if (j->domains[i].dns_id == 0)
            abort(); /* only when out of memory: core policy */
    }
}

static void on_ledger_looked_up(void *arg, int ok, const ledger_state_t *states)
{
    job_t *j = arg;
    j->ledger_op = 0;
    if (!ok) {
        ledger_unavailable(j, "lookup");
        if (j->dv->redelivered) {
            /* back unacked from a worker that died: it may have been cut
             * between a final dot and its reply, and nothing says for
             * whom. Flag every recipient rather than miss a copy. */
            for (size_t i = 0; i < j->nrcpts; i++) {
                j->rcpts[i].possible_dup = 1;
                metrics_inc(MET_POSSIBLE_DUPLICATES, 1);
            }
        }
        job_resolve(j);
        return;
    }
    for (size_t i = 0; i < j->nrcpts; i++) {
        job_rcpt_t *r = &j->rcpts[i];
        if (states[i] == LEDGER_DONE) {
            r->skip = 1;
            rcpt_set(r, OUTCOME_DELIVERED, "already_delivered", 0, NULL,
                     "delivered by an earlier attempt of this message (ledger)");
            metrics_inc(MET_RCPT_SKIPPED_DONE, 1);
            continue;
        }
        if (states[i] == LEDGER_SENDING) {
            /* an earlier attempt was cut between its final dot and the
             * reply: the server may have it. The mark stays until this
             * attempt settles the recipient. */
            r->possible_dup = 1;
            metrics_inc(MET_POSSIBLE_DUPLICATES, 1);
        }
    }
    /* "sending" is written per transaction, just before its body
     * (on_before_body), not here */
    job_resolve(j);
}

static void job_check_ledger(job_t *j)
{
    const char **rcpts = xcalloc(j->nrcpts, sizeof(char *));
    for (size_t i = 0; i < j->nrcpts; i++)
        rcpts[i] = j->rcpts[i].addr;
    j->ledger_op = ledger_lookup(j->w->ledger, j->msg->id, rcpts, j->nrcpts, on_ledger_looked_up, j);
    free(rcpts);
}

static void on_redelivery_counted(void *arg, int ok, long long count)
{
    job_t *j = arg;
    j->ledger_op = 0;
    unsigned limit = j->w->env->cfg->retry_poison_redeliveries;
    if (ok && limit > 0 && count > (long long)limit) {
        char why[160];
        snprintf(why, sizeof(why), "poison: redelivered %lld times without finishing (limit %u)",
                 count, limit);
        metrics_inc(MET_MESSAGES_POISON, 1);
        job_dead_letter(j, why);
        return;
    }
    if (!ok)
        ledger_unavailable(j, "count_redelivery");
    job_check_ledger(j);
}

static void on_delivery(void *arg, mq_delivery_t *dv)
{
    worker_t *w = arg;
    metrics_inc(MET_MESSAGES_CONSUMED, 1);
    job_t *j = xcalloc(1, sizeof(*j));
    j->w = w;
    j->dv = dv;
    j->started_ms = util_mono_ms();
    buf_init(&j->raw);
    buf_init(&j->wire_copy);
    job_link(w, j);
    const char *h = mq_delivery_header(dv, "x-mailpump-attempt");
    j->attempt = h && atoi(h) > 0 ? (unsigned)atoi(h) : 1;
    h = mq_delivery_header(dv, "x-mailpump-first-seen-ms");
    j->first_seen_ms = h ? strtoull(h, NULL, 10) : 0;
    if (j->first_seen_ms == 0 || j->first_seen_ms > util_wall_ms())
        j->first_seen_ms = util_wall_ms();
    h = mq_delivery_header(dv, "x-mailpump-appended");
    j->appended_before = h && strcmp(h, "1") == 0;
    h = mq_delivery_header(dv, "x-mailpump-append-needed");
    j->append_needed = h && strcmp(h, "1") == 0;
    h = mq_delivery_header(dv, "x-mailpump-append-only");
    j->append_only = h && strcmp(h, "1") == 0;

    char err[512];
    int rc = msgjson_parse(dv->body, dv->len, &j->msg, err, sizeof(err));
    if (rc != MSGJSON_OK) {
        job_dead_letter(j, err);
        return;
    }
    j->msg->priority = dv->priority;
    mime_opts_t mo = { .now = 0, .max_size = w->env->cfg->message_max_size };
    rc = mime_build(j->msg, &mo, &j->raw, err, sizeof(err));
    if (rc != MIME_OK) {
        char why[600];
        snprintf(why, sizeof(why), "%s: %s", mime_strerror(rc), err);
        job_dead_letter(j, why);
        return;
    }
    if (w->env->dkim) {
        /* signed once here: the same bytes go to SMTP and to IMAP */
        rc = dkim_sign(w->env->dkim, message_addr_domain(j->msg->from.addr), &j->raw, 0, err,
                       sizeof(err));
        if (rc == DKIM_EINVAL) {
            job_dead_letter(j, err);
            return;
        }
        if (rc == DKIM_ENOKEY)
            log_debug("worker", "dkim_unsigned", "msg=%s reason=\"%s\"", j->msg->id, err);
        else if (rc != DKIM_OK)
            log_error("worker", "dkim_failed", "msg=%s reason=\"%s\" action=send_unsigned",
                      j->msg->id, err);
    }
    message_drop_content(j->msg); /* from here on the built bytes are the message */
    /* SMTP DATA is sent from raw itself; mime_build's output is all CRLF,
     * so the dot-stuffed copy is only a fallback (or the core's answer to
     * an allocation failure) */
    if (mime_wire_segments(buf_head(&j->raw), buf_size(&j->raw), &j->wire, &j->nwire) != MIME_OK)
        mime_dotstuff(buf_head(&j->raw), buf_size(&j->raw), &j->wire_copy);

    const char *pending = mq_delivery_header(dv, "x-mailpump-pending");
    job_add_rcpts(j, j->msg->to, j->msg->nto, pending);
    job_add_rcpts(j, j->msg->cc, j->msg->ncc, pending);
    job_add_rcpts(j, j->msg->bcc, j->msg->nbcc, pending);
    if (j->append_only) {
        /* every recipient is settled; only the Sent copy is retried, so an
         * IMAP failure never causes an SMTP resend */
        log_info("worker", "message_received", "tag=%llu msg=%s attempt=%u append_only=1",
                 (unsigned long long)dv->tag, j->msg->id, j->attempt);
        j->nrcpts = 0;
        j->domains_left = 1;
        job_domain_done(j);
        return;
    }
    if (j->nrcpts == 0) {
        job_dead_letter(j, "retry carries no pending recipient of this message");
        return;
    }
    log_info("worker", "message_received",
             "tag=%llu msg=%s trace=%s prio=%d attempt=%u rcpts=%zu domains=%zu bytes=%zu worker=%d",
             (unsigned long long)dv->tag, j->msg->id, j->msg->trace_id ? j->msg->trace_id : "-",
             dv->priority, j->attempt, j->nrcpts, j->ndomains, buf_size(&j->raw), w->index);
    /* the domain array is final now: point each callback cell at it */
    for (size_t i = 0; i < j->ndomains; i++) {
        job_domain_t *d = &j->domains[i];
        d->self.job = j;
        d->self.idx = i;
        d->fast_timer.arg = &d->self;
    }
    if (w->ledger == NULL) {
        job_resolve(j);
    } else if (dv->redelivered) {
        j->ledger_op = ledger_count_redelivery(w->ledger, j->msg->id, on_redelivery_counted, j);
    } else {
        job_check_ledger(j);
    }
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
    unsigned ms = (unsigned)(w->reconnect_delay_ms * (0.8 + 0.4 * rand01()));
    loop_timer_set(w->loop, &w->reconnect_timer, ms);
    w->reconnect_delay_ms = w->reconnect_delay_ms * 2 > 30000 ? 30000 : w->reconnect_delay_ms * 2;
}

static void worker_drop_jobs(worker_t *w)
{
    while (w->jobs) {
        job_t *j = w->jobs;
        job_unlink(w, j);
        job_free(j);
    }
}

/* Every unacked message returns to the queue once the broker sees the
 * connection gone. Jobs that have not reached SMTP are dropped: they have
 * nothing in the ledger ("sending" is only written by a transaction
 * holding its body), so the redelivery starts them afresh. A job whose
 * SMTP has begun (smtp_started) is left to finish it: cut after the
 * final dot, its recipients would stay "sending" and the redelivery would
 * send them again, flagged; a transaction still in its envelope goes on
 * to mark, send and record like any other. It records its outcome in the
 * ledger and stops there (job_store_sent_copy); the redelivery skips what
 * it delivered. smtp_started deliberately still means "a domain reached
 * domain_start_smtp()", not "a body was held": finishing an envelope
 * already under way costs less than redoing it, and a job kept a little
 * early is never wrong. Reconnecting waits for these jobs (on_reconnect),
 * so the redelivery never runs beside them. */
static void on_lost(void *arg, const char *why)
{
    worker_t *w = arg;
    if (w->ready) {
        w->ready = 0;
        metrics_gauge_add(MET_WORKERS_READY, -1);
    }
    job_t *next;
    for (job_t *j = w->jobs; j; j = next) {
        next = j->next;
        if (!j->smtp_started || j->append_tried) {
            job_unlink(w, j);
            job_free(j);
        }
    }
    w->mq_dead = w->mq;
    w->mq = NULL;
    loop_timer_set(w->loop, &w->release_timer, 0);
    w->lost_ms = util_mono_ms();
    if (w->njobs)
        log_info("worker", "finishing_smtp", "worker=%d inflight=%zu reason=\"%s\"", w->index,
                 w->njobs, why);
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
    const mp_config_t *cfg = w->env->cfg;
    mq_config_t mc = {
        .host = cfg->amqp_host, .port = cfg->amqp_port, .user = cfg->amqp_user,
        .password = cfg->amqp_password, .vhost = cfg->amqp_vhost,
        .heartbeat = cfg->amqp_heartbeat, .prefetch = cfg->amqp_prefetch,
        .queue = cfg->amqp_queue, .dead_queue = cfg->amqp_dead_queue,
        .events_exchange = cfg->amqp_events_exchange,
    };
    char err[512] = "";
    w->mq = mq_open(w->loop, &mc, err, sizeof(err));
    for (size_t i = 0; w->mq && i < w->env->levels.n; i++) {
        char queue[256];
        retry_queue_name(w->env, i, queue, sizeof(queue));
        if (mq_declare_delay_queue(w->mq, queue, (unsigned)w->env->levels.ms[i], err,
                                   sizeof(err)) < 0) {
            mq_free(w->mq);
            w->mq = NULL;
        }
    }
    if (w->mq && mq_consume(w->mq, on_delivery, on_lost, w, err, sizeof(err)) < 0) {
        mq_free(w->mq);
        w->mq = NULL;
    }
    if (w->mq == NULL) {
        log_error("worker", "broker_unavailable", "worker=%d retry_ms=%u reason=\"%s\"", w->index,
                  w->reconnect_delay_ms, err);
        worker_schedule_reconnect(w);
        return;
    }
    mq_on_blocked(w->mq, on_broker_blocked, w);
    w->connected_ms = util_mono_ms();
    w->ready = 1;
    metrics_gauge_add(MET_WORKERS_READY, 1);
    log_info("worker", "consuming", "worker=%d queue=%s prefetch=%u", w->index, cfg->amqp_queue,
             cfg->amqp_prefetch);
}

/* ---- shutdown ---- */

static void on_grace_expired(loop_t *loop, loop_timer_t *t, void *arg)
{
    worker_t *w = arg;
    log_warn("worker", "grace_expired", "worker=%d unfinished=%zu (left unacked: they return to the queue)",
             w->index, w->njobs);
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
    if (w->mq)
        mq_cancel(w->mq);
    loop_timer_set(loop, &w->grace_timer, w->env->cfg->worker_shutdown_grace_ms);
    worker_check_drained(w);
}

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

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    char err[512];
    const mp_config_t *cfg = w->env->cfg;
    if (cfg->redis_host[0]) {
        rclient_config_t rc = { .host = cfg->redis_host, .port = cfg->redis_port,
                                .timeout_ms = cfg->redis_timeout_ms };
        w->redis = rclient_new(w->loop, &rc);
        uint64_t ttl = 0;
        for (int c = 0; c < RETRY_CLASSES; c++)
            if (cfg->retry_max_age_ms[c] > ttl)
                ttl = cfg->retry_max_age_ms[c];
        w->ledger = ledger_new(w->loop, w->redis, ttl);
    }
    /* The same rclient carries the DNS L2 cache: dns_resolver_free(), which
     * runs before rclient_free(), cancels the resolver's Redis commands. */
    dns_config_t dc = { .servers = cfg->dns_servers, .timeout_ms = cfg->dns_timeout_ms,
                        .tries = cfg->dns_tries, .l1_entries = cfg->dns_l1_entries,
                        .max_ttl_s = cfg->dns_max_ttl_s, .negative_ttl_s = cfg->dns_negative_ttl_s,
                        .redis = cfg->dns_l2 ? w->redis : NULL,
                        .on_event = on_dns_event, .event_arg = w };
    w->dns = dns_resolver_new(w->loop, &dc, err, sizeof(err));
    if (w->dns == NULL) {
        log_error("worker", "dns_init_failed", "worker=%d reason=\"%s\"", w->index, err);
        rclient_free(w->redis);
        ledger_free(w->ledger);
        w->redis = NULL;
        w->ledger = NULL;
        w->exit_code = 1;
        kill(getpid(), SIGUSR1); /* main takes it with sigwait and stops the others */
        return NULL;
    }
    w->dctx = deliver_ctx_new(w->loop, &w->env->dcfg);
    if (w->env->cfg->imap_pool) {
        imap_pool_limits_t il = { .max_appends = w->env->cfg->imap_pool_max_appends,
                                  .idle_ms = w->env->cfg->imap_pool_idle_ms,
                                  .max_conns_per_account = w->env->cfg->imap_pool_max_connections,
                                  .max_batch = w->env->cfg->imap_pool_max_batch };
        w->imap_pool = imap_pool_new(w->loop, &il);
    }
    w->reconnect_delay_ms = 500;
    if (!atomic_load(&w->stop_requested))
        worker_connect(w);
    on_wakeup(w->loop, w); /* a stop that came before the loop ran */
    loop_run(w->loop);

    /* the connection first: mq_free() fails the unconfirmed publishes, and
     * their jobs finish (unacked) while they still exist */
    if (w->ready)
        metrics_gauge_add(MET_WORKERS_READY, -1);
    mq_free(w->mq);
    mq_free(w->mq_dead);
    w->mq = w->mq_dead = NULL;
    worker_drop_jobs(w);
    deliver_ctx_free(w->dctx); /* after the jobs: they cancel their deliveries first */
    w->dctx = NULL;
    imap_pool_free(w->imap_pool); /* after the jobs too: they cancel their appends first */
    w->imap_pool = NULL;
    dns_resolver_free(w->dns);
    w->dns = NULL;
    rclient_free(w->redis); /* first: its pending replies still find the ledger */
    ledger_free(w->ledger);
    w->redis = NULL;
    w->ledger = NULL;
    loop_timer_cancel(w->loop, &w->grace_timer);
    loop_timer_cancel(w->loop, &w->reconnect_timer);
    loop_timer_cancel(w->loop, &w->release_timer);
    loop_timer_cancel(w->loop, &w->trim_timer);
    log_info("worker", "stopped", "worker=%d", w->index);
    return NULL;
}

worker_t *worker_start(const worker_env_t *env, int index)
{
    worker_t *w = xcalloc(1, sizeof(*w));
    w->env = env;
    w->index = index;
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

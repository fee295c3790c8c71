/*
 * SUMMARY
 *  deliverer/job.c - one consumed message, from its JSON to its ack.
 * DESCRIPTION
 *  The job is a state machine (enum job_state, job.h lists the states).
 *  Each state has an enter function in job_states[] that starts the
 *  state's work; when that work is over (at once, or in a callback) it
 *  calls job_next(), the one place that decides what follows. Every
 *  transition is traced at debug as "from -> to".
 *
 *  Nothing is acked before what replaces the message is confirmed by
 *  the broker: the events, a retry republished to a delay queue, or the
 *  dead letter. If any confirm fails the message is nacked back to the
 *  queue instead, so nothing is ever acked unaccounted for.
 *
 *  The ledger (ledger.h): LOOKUP skips recipients recorded "done" and
 *  flags those left "sending" (an earlier attempt was cut between its
 *  final dot and the reply) as possible duplicates; each domain leg
 *  records its transactions as they happen (domain.c): "sending" before
 *  the final dot, then "done" ("done-dup" for a flagged recipient) or no
 *  record, the mark kept for one whose copy may be at the server. A leg
 *  reports only once those writes are answered, so by SENT_COPY the
 *  ledger holds what this attempt did. A Redis that cannot record a
 *  "sending" mark keeps that copy from being sent (the leg defers it)
 *  unless [redis] send_unrecorded says otherwise; other ledger failures
 *  never hold a delivery back: the job goes on at-least-once and counts
 *  them.
 *
 *  Suppression (suplist.h, docs/operations.md#suppression-lists): the
 *  LOOKUP command also reads each recipient in the global list and the
 *  tenant's; one found there is skipped like a delivered one and gets a
 *  "suppressed" event, final. Redis unable to answer: sent, or deferred
 *  without an attempt ([suppression] when_unavailable). A permanent
 *  bounce of a reason in [suppression] auto_reasons adds its recipient
 *  at EVENTS, fire-and-forget.
 *
 *  Poison (docs/architecture.md, "What makes a message poison"): the
 *  count mp:d:<id> holds the attempts of the message that crashed a worker
 *  (core/crash.h counts them from the signal handler, blamed by
 *  job_blame() in every callback) or could not be finished (CHARGE, after
 *  a publish failed with the broker still there). A redelivery reads it
 *  at COUNT, after LOOKUP: at the limit the recipients the ledger shows
 *  done are reported and only the others dead-lettered; with every one
 *  done the message is not poison. SIGKILL and a lost connection never
 *  count.
 *
 *  Broker loss: the owner frees jobs that have not reached SMTP (the
 *  redelivery starts them afresh) and keeps the others
 *  (job_survives_loss); a kept job finishes its SMTP (its legs record it
 *  in the ledger) and ends at SENT_COPY without events: the redelivery
 *  skips what it delivered and publishes them.
 *
 *  History (history.h): EVENTS and DEAD keep the events they publish
 *  and, once all are published, write them after an attempt record to
 *  the message's history in one Redis command, unawaited.
 * DIAGNOSTICS
 *  Info lines message_received, one per recipient outcome, retry_scheduled,
 *  poison_charged, poison_settled and message_done; warn lines dead_letter
 *  and ledger_unavailable.
 */
#include "deliverer/job.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <ctype.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "core/buf.h"
#include "core/crash.h"
#include "core/htable.h"
#include "core/log.h"
#include "core/message.h"
#include "core/util.h"
#include "deliverer/envelope.h"
#include "deliverer/history.h"
#include "deliverer/outcome.h"
#include "deliverer/policy.h"
#include "deliverer/qstat.h"
#include "deliverer/retry.h"
#include "deliverer/suplist.h"
#include "deliverer/sites.h"
#include "metrics/metrics.h"
#include "metrics/ops.h"
#include "mime/build.h"
#include "queue/event.h"
#include "queue/msgjson.h"

enum job_state {
    JOB_INTAKE = 0,
    JOB_ASSIGN,
    JOB_IDENTITY,
    JOB_LOOKUP,
    JOB_COUNT,
    JOB_BUILD,
    JOB_DOMAINS,
    JOB_SENT_COPY,
    JOB_HANDOFF,
    JOB_EVENTS,
    JOB_HANDED,
    JOB_DEAD,
    JOB_CHARGE,
    JOB_DONE,
    JOB_STATE_LAST
};

typedef struct job_rcpt {
    const char      *addr;   /* into the message */
    size_t           index;  /* position in the message's recipient list (the envelope's bit) */
    size_t           domain; /* index into job->domains */
    outcome_t        outcome;
    outcome_reason_t reason;
    int              code;
    char             enh[16];
    char             text[512];
    int              skip;         /* the ledger says an earlier attempt delivered it */
    int              possible_dup; /* the ledger found it mid-send, or a leg was cut after its dot */
    int              handed;       /* a retry republished by an earlier attempt carries it: not ours */
    int              held;         /* not sent by this attempt: suppressed, or deferred without a check */
    char            *sup_list;     /* suppressed: "global" or the tenant */
    suplist_entry_t *sup;          /* ... the entry that suppressed it */
    char            *source;       /* what its leg reported for its event (NULL: none), copied */
    char            *source_addr;
    char            *shaping;
} job_rcpt_t;

typedef struct job_domain {
    job_t        *job;   /* the leg's callbacks find the job and the domain through this */
    char         *name;  /* lower case */
    htable_node_t node;  /* in job->domain_index */
    domain_leg_t *leg;
    const char  **rcpts; /* the leg's recipients (it borrows them) */
    size_t       *idx;   /* their indexes into job->rcpts */
    unsigned char *flagged; /* theirs: possible duplicates already (read by domain_start) */
    size_t        n;
    char          mx_host[256];
    char          mx_addr[64];
    char          tls_version[32];
    char          tls_cipher[96];
} job_domain_t;

struct job {
    job_ctx_t           *ctx;
    enum job_state       state;
    loop_timer_t         ledger_timer; /* a ledger call of this state, again */
    uint64_t             ledger_until; /* ... until then (0: not retrying) */
    unsigned             ledger_tries;
    job_end_cb           end;
    void                *end_arg;
    mq_delivery_t       *dv;
    message_t           *msg;
    envelope_t           envelope;  /* what earlier attempts left; attempt 1 when none */
    buf_t                raw;       /* RFC 5322 bytes, built once: IMAP APPEND and SMTP DATA */
    mime_seg_t          *wire;      /* SMTP DATA: raw dot-stuffed, as segments pointing into raw */
    size_t               nwire;
    buf_t                wire_copy; /* the dot-stuffed copy, only if raw is not all CRLF */
    unsigned             need;      /* SMTP_NEED_* of the envelope addresses */
    job_rcpt_t          *rcpts;     /* pending recipients, in the message's order */
    size_t               nrcpts;
    size_t               nlisted;   /* recipients of the message, each once, pending or not */
    job_domain_t        *domains;   /* allocated once, room for a domain per recipient */
    size_t               ndomains;
    htable_t             domain_index;
    char                 digest[65]; /* SHA-256 of the body, hex: the message's identity check */
    size_t               legs_left;
    int                  smtp_started; /* a leg went on to SMTP: see job_survives_loss */
    uint64_t             ledger_op;    /* the ledger call of ASSIGN, IDENTITY, LOOKUP, COUNT or CHARGE */
    uint64_t             throttle_ms;  /* longest rate_limits wait of a deferred domain */
    imap_append_t       *append;
    int                  append_tried;
    imap_append_result_t append_res;
    uint64_t             retry_in_ms;  /* delay chosen for the next attempt */
    int                  retrying;     /* HANDOFF planned a retry; EVENTS publishes it */
    size_t               retry_level;
    int                  retry_throttled_only;
    uint64_t             retry_server_ms;
    char                 hop[37];      /* the retry's token, named in the ledger ("" none) */
    char                 give_up[160]; /* why transient recipients are not retried */
    char                 dead_reason[640]; /* set: the message goes to the dead-letter queue */
    size_t               confirms_left;
    int                  confirm_failed;
    int                  broker_lost;  /* found at SENT_COPY: the job ends unacked */
    int                  copy_dropped; /* a second republish of an id-less message: acked, nothing else */
    int                  poison;       /* COUNT found the limit reached: DEAD for the recipients not done */
    uint64_t             started_ms;
    uint64_t             started_wall_ms;
    char               **hist;      /* this attempt's events, for its history (history.h) */
    size_t               nhist, hist_cap;
    size_t               hist_rcpts; /* recipients' events published */
    size_t               hist_omitted; /* events past [trace] max_records, not kept */
    log_msgctx_t         log;       /* the message's log fields, lent to the legs (set at DOMAINS) */
};

/* The message names a pool while the egress file has pools, none of
 * them that one. Without pools the field is only a label. */
static int job_unknown_pool(const job_t *j)
{
    const policy_t *p = j->ctx->svc.policy;
    int unknown = 0;
    if (j->msg->pool == NULL || p == NULL || policy_npools(p) == 0)
        return 0;
    policy_pool_for(p, j->msg->pool, NULL, &unknown);
    return unknown;
}

/* The message fields of a job's log lines (trace, tenant, campaign and
 * pool when set): before the body parsed, the AMQP message-id property
 * (or msg=-). */
static const log_msgctx_t *job_logctx(const job_t *j, const char *id, log_msgctx_t *c)
{
    const message_t *m = j->msg;
    if (m == NULL)
        *c = (log_msgctx_t){ .id = id ? id : j->dv->message_id };
    else
        *c = (log_msgctx_t){ .id = id ? id : m->id, .trace = m->trace_id, .tenant = m->tenant,
                             .campaign = m->campaign, .pool = m->pool };
    return c;
}
#define JOB_MSG(j) LOG_MSGCTX(job_logctx((j), NULL, &(log_msgctx_t){ 0 }))

static void job_enter_intake(job_t *j);
static void job_enter_assign(job_t *j);
static void job_enter_identity(job_t *j);
static void job_enter_lookup(job_t *j);
static void job_enter_count(job_t *j);
static void job_enter_build(job_t *j);
static void job_enter_domains(job_t *j);
static void job_enter_sent_copy(job_t *j);
static void job_enter_handoff(job_t *j);
static void job_enter_events(job_t *j);
static void job_enter_handed(job_t *j);
static void job_enter_dead(job_t *j);
static void job_enter_charge(job_t *j);
static void job_enter_done(job_t *j);

static const struct {
    const char *name;
    void (*enter)(job_t *j);
} job_states[JOB_STATE_LAST] = {
    [JOB_INTAKE] = { "intake", job_enter_intake },
    [JOB_ASSIGN] = { "assign", job_enter_assign },
    [JOB_IDENTITY] = { "identity", job_enter_identity },
    [JOB_LOOKUP] = { "lookup", job_enter_lookup },
    [JOB_COUNT] = { "count", job_enter_count },
    [JOB_BUILD] = { "build", job_enter_build },
    [JOB_DOMAINS] = { "domains", job_enter_domains },
    [JOB_SENT_COPY] = { "sent_copy", job_enter_sent_copy },
    [JOB_HANDOFF] = { "handoff", job_enter_handoff },
    [JOB_EVENTS] = { "events", job_enter_events },
    [JOB_HANDED] = { "handed", job_enter_handed },
    [JOB_DEAD] = { "dead", job_enter_dead },
    [JOB_CHARGE] = { "charge", job_enter_charge },
    [JOB_DONE] = { "done", job_enter_done },
};

/* A crash from here on is this message's (core/crash.h): every callback
 * of the job says so first. A message without an id of its own yet is
 * not blamed: its id is new on every parse. */
static void job_blame(const job_t *j)
{
    crash_blame_set(j->msg && !j->msg->id_generated ? j->msg->id : NULL);
}

static int job_broker_open(const job_t *j);

/* The job ends nacked because something it published failed or was
 * returned while the broker connection stayed up: this attempt could not
 * be finished, and it counts against the message (CHARGE). A connection
 * lost is nobody's fault: not counted. */
static int job_chargeable(const job_t *j)
{
    return j->confirm_failed && j->ctx->svc.ledger != NULL && j->msg != NULL && !j->msg->id_generated &&
           job_broker_open(j);
}

/* The current state's work is over: every transition is decided here.
 * Always the caller's last action (the job may be gone when it returns). */
static void job_next(job_t *j)
{
    enum job_state next = JOB_DONE;
    job_blame(j);
    switch (j->state) {
    case JOB_INTAKE:
        if (j->dead_reason[0])
            next = JOB_DEAD;
        else if (j->msg->id_generated)
            next = JOB_ASSIGN; /* no id: republished with one, then acked */
        else if (j->envelope.append_only || j->ctx->svc.ledger == NULL)
            next = JOB_BUILD; /* a Sent copy only (no SMTP resend), or no ledger to ask */
        else
            next = JOB_IDENTITY;
        break;
    case JOB_ASSIGN: next = JOB_DONE; break; /* no id of its own to count against yet */
    case JOB_IDENTITY:
        next = j->dead_reason[0] ? JOB_DEAD
               : j->copy_dropped ? JOB_DONE /* acked: another copy carries the message */
                                 : JOB_LOOKUP;
        break;
    case JOB_LOOKUP: next = j->dv->redelivered ? JOB_COUNT : JOB_BUILD; break;
    case JOB_COUNT: next = j->poison ? JOB_DEAD : JOB_BUILD; break;
    case JOB_BUILD:
        next = j->dead_reason[0]         ? JOB_DEAD
               : j->envelope.append_only ? JOB_SENT_COPY /* every recipient is settled */
                                         : JOB_DOMAINS;
        break;
    case JOB_DOMAINS: next = JOB_SENT_COPY; break;
    case JOB_SENT_COPY: next = j->broker_lost ? JOB_DONE : JOB_HANDOFF; break;
    case JOB_HANDOFF: next = JOB_EVENTS; break;
    case JOB_EVENTS:
        next = job_chargeable(j)                                           ? JOB_CHARGE
               : j->hop[0] && !j->confirm_failed && job_broker_open(j) ? JOB_HANDED /* then acked */
                                                                           : JOB_DONE;
        break;
    case JOB_HANDED: next = JOB_DONE; break;
    case JOB_DEAD: next = job_chargeable(j) ? JOB_CHARGE : JOB_DONE; break;
    case JOB_CHARGE: next = JOB_DONE; break;
    case JOB_DONE:
    case JOB_STATE_LAST: return; /* nothing follows */
    }
    log_debug("job", "state", "%s from=%s to=%s", JOB_MSG(j), job_states[j->state].name, job_states[next].name);
    j->state = next;
    j->ledger_until = 0;
    j->ledger_tries = 0;
    job_states[next].enter(j);
}

static int job_broker_open(const job_t *j)
{
    return j->ctx->mq != NULL && mq_is_open(j->ctx->mq);
}

/* Redis could not answer a ledger call: delivery goes on at-least-once,
 * and operators see it in the metric and the log. */
/* A ledger call Redis did not answer in time, while connected: Redis is
 * slow, not gone, so the state's call is made again (50 ms doubling)
 * until [redis] mark_wait is spent. 1 when it will be; 0 when the caller
 * goes on without it. Redis disconnected fails at once, as before. */
static int job_ledger_again(job_t *j)
{
    const domain_services_t *svc = &j->ctx->svc;
    uint64_t now = loop_now_ms(svc->loop);
    if (svc->redis == NULL || !rclient_connected(svc->redis))
        return 0;
    if (j->ledger_until == 0)
        j->ledger_until = now + svc->mark_wait_ms;
    if (now >= j->ledger_until)
        return 0;
    uint64_t ms = 50ull << (j->ledger_tries < 4 ? j->ledger_tries : 4);
    if (ms > j->ledger_until - now)
        ms = j->ledger_until - now;
    j->ledger_tries++;
    loop_timer_set(svc->loop, &j->ledger_timer, ms);
    return 1;
}

static void job_mark_handoff(job_t *j, ledger_state_t st);

static void job_on_ledger_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    job_t *j = arg;
    job_blame(j);
    switch (j->state) { /* the same call, once more */
    case JOB_HANDOFF: job_mark_handoff(j, LEDGER_HANDING); break; /* the planned retry and its hop stay */
    case JOB_HANDED: job_mark_handoff(j, LEDGER_HANDED); break;
    default: job_states[j->state].enter(j); break; /* IDENTITY, LOOKUP: nothing but the call */
    }
}

static void job_ledger_unavailable(const job_t *j, const char *step)
{
    metrics_inc(MET_LEDGER_UNAVAILABLE, 1);
    log_warn("job", "ledger_unavailable", "%s step=%s delivery=at_least_once", JOB_MSG(j), step);
}

static void job_flag_possible_dup(job_rcpt_t *r)
{
    if (r->possible_dup)
        return;
    r->possible_dup = 1;
    metrics_inc(MET_POSSIBLE_DUPLICATES, 1);
}

static void rcpt_set(job_rcpt_t *r, outcome_t o, outcome_reason_t reason, int code, const char *enh,
                     const char *text)
{
    r->outcome = o;
    r->reason = reason;
    r->code = code;
    snprintf(r->enh, sizeof(r->enh), "%s", enh ? enh : "");
    snprintf(r->text, sizeof(r->text), "%s", text ? text : "");
}

/* The leg's egress source and shaping for the recipient's event. */
static void rcpt_set_egress(job_rcpt_t *r, const char *source, const char *source_addr, const char *shaping)
{
    free(r->source);
    free(r->source_addr);
    free(r->shaping);
    r->source = source && source[0] ? xstrdup(source) : NULL;
    r->source_addr = source_addr && source_addr[0] ? xstrdup(source_addr) : NULL;
    r->shaping = shaping && shaping[0] ? xstrdup(shaping) : NULL;
}

/* ---- publishing with confirms ---- */

static void job_on_confirm(void *arg, int ok)
{
    job_t *j = arg;
    job_blame(j);
    if (ok) {
        metrics_inc(MET_EVENTS_PUBLISHED, 1);
    } else {
        metrics_inc(MET_PUBLISH_FAILED, 1);
        j->confirm_failed = 1;
    }
    if (--j->confirms_left == 0)
        job_next(j);
}

static void job_publish(job_t *j, const char *exchange, const char *rkey, const char *body, size_t len,
                        const mq_publish_opts_t *opts)
{
    j->confirms_left++;
    if (j->ctx->mq == NULL ||
        mq_publish(j->ctx->mq, exchange, rkey, body, len, opts, job_on_confirm, j) < 0) {
        /* the connection is gone; the message comes back */
        j->confirms_left--;
        j->confirm_failed = 1;
    }
}

/* The message's history is written ([trace] enabled, Redis configured). */
static int job_history_on(const job_t *j)
{
    return j->ctx->env->cfg->trace_enabled && j->ctx->svc.redis != NULL;
}

static void job_publish_event(job_t *j, const mq_event_t *ev)
{
    char *json = mq_event_to_json(ev);
    mq_publish_opts_t o = { .message_id = j->msg ? j->msg->id : NULL, .priority = -1, .persistent = 1 };
    job_publish(j, j->ctx->env->cfg->amqp_events_exchange, ev->event, json, strlen(json), &o);
    if (job_history_on(j)) { /* the history keeps the event as published */
        j->hist_rcpts += ev->recipient != NULL;
        if (j->nhist + 1 >= j->ctx->env->cfg->trace_max_records) {
            /* the attempt record and the first events fill the list */
            j->hist_omitted++;
            free(json);
            return;
        }
        if (j->nhist == j->hist_cap) {
            j->hist_cap = j->hist_cap ? 2 * j->hist_cap : 8;
            j->hist = xrealloc(j->hist, j->hist_cap * sizeof(char *));
        }
        j->hist[j->nhist++] = json;
        return;
    }
    free(json);
}

/* The attempt's records to its history, in one command (history.h): the
 * attempt record, then its events. Nothing waits for it. */
static void job_write_history(job_t *j)
{
    const char *id = j->msg ? j->msg->id : j->dv->message_id;
    if (!job_history_on(j) || id == NULL || id[0] == '\0')
        return;
    const retry_policy_t *rp = &j->ctx->env->retry;
    char queue[256] = "";
    if (j->retrying)
        retry_queue_name(rp->queue_prefix, &rp->levels, j->retry_level, queue, sizeof(queue));
    history_attempt_t a = {
        .message_id = id,
        .attempt = j->envelope.attempt,
        .started_ms = j->started_wall_ms,
        .recipients = j->hist_rcpts,
        .omitted = j->hist_omitted,
        .retrying = j->retrying && j->state == JOB_EVENTS,
        .retry_level = j->retry_level,
        .retry_queue = queue,
        .retry_delay_ms = j->retry_in_ms,
        .retry_attempt = j->retry_throttled_only ? j->envelope.attempt : j->envelope.attempt + 1,
        .give_up = j->give_up,
        .dead_reason = j->state == JOB_DEAD ? j->dead_reason : NULL,
        .dead_queue = j->ctx->env->cfg->amqp_dead_queue,
    };
    const char **recs = xcalloc(j->nhist + 1, sizeof(char *));
    char *attempt = history_attempt_json(&a);
    recs[0] = attempt;
    for (size_t i = 0; i < j->nhist; i++)
        recs[i + 1] = j->hist[i];
    const mp_config_t *cfg = j->ctx->env->cfg;
    history_write(j->ctx->svc.redis, id, recs, j->nhist + 1, cfg->trace_ttl_ms, cfg->trace_max_records);
    free(recs);
    free(attempt);
    for (size_t i = 0; i < j->nhist; i++)
        free(j->hist[i]);
    j->nhist = 0;
}

/* Everything is published: DONE once the confirms are in (at once when
 * every publish failed on the spot). */
static void job_await_confirms(job_t *j)
{
    if (j->confirms_left == 0)
        job_next(j);
}

/* ---- INTAKE ---- */

static void job_dead_letter(job_t *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void job_dead_letter(job_t *j, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->dead_reason, sizeof(j->dead_reason), fmt, ap);
    va_end(ap);
    if (j->dead_reason[0] == '\0')
        snprintf(j->dead_reason, sizeof(j->dead_reason), "invalid message");
}

static size_t job_domain_index(job_t *j, const char *domain)
{
    char *name = xstrdup(domain);
    for (char *c = name; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    htable_node_t *n = htable_find_str(&j->domain_index, name);
    if (n) {
        free(name);
        return (size_t)(HTABLE_ENTRY(n, job_domain_t, node) - j->domains);
    }
    job_domain_t *d = &j->domains[j->ndomains];
    memset(d, 0, sizeof(*d));
    d->name = name;
    htable_insert_str(&j->domain_index, &d->node, d->name);
    return j->ndomains++;
}

/* The message's recipients, each address once (case-insensitive),
 * whatever the headers list; of those, only the ones still pending on a
 * retry. A recipient's position in the deduplicated list is its bit in
 * the envelope. Linear: a message may name [message] max_recipients. */
typedef struct job_listed {
    htable_node_t node;
    char         *key;
} job_listed_t;

static void job_collect_rcpts(job_t *j)
{
    const message_t *m = j->msg;
    const struct { const mp_address_t *a; size_t n; } lists[] = { { m->to, m->nto }, { m->cc, m->ncc },
                                                                 { m->bcc, m->nbcc } };
    size_t total = m->nto + m->ncc + m->nbcc;
    job_listed_t *seen = xcalloc(total ? total : 1, sizeof(*seen));
    htable_t index;
    htable_init(&index, HTABLE_STR, total, NULL);
    j->rcpts = xcalloc(total ? total : 1, sizeof(job_rcpt_t));
    j->domains = xcalloc(total ? total : 1, sizeof(job_domain_t));
    htable_init(&j->domain_index, HTABLE_STR, total, NULL);
    size_t nseen = 0;
    for (size_t l = 0; l < 3; l++) {
        for (size_t i = 0; i < lists[l].n; i++) {
            const char *addr = lists[l].a[i].addr;
            job_listed_t *e = &seen[nseen];
            e->key = xstrdup(addr);
            for (char *c = e->key; *c; c++)
                *c = (char)tolower((unsigned char)*c);
            if (htable_find_str(&index, e->key)) {
                free(e->key);
                continue;
            }
            htable_insert_str(&index, &e->node, e->key);
            size_t pos = nseen++;
            if (!envelope_is_pending(&j->envelope, pos, addr))
                continue;
            job_rcpt_t *r = &j->rcpts[j->nrcpts++];
            r->addr = addr;
            r->index = pos;
            r->domain = job_domain_index(j, message_addr_domain(addr));
        }
    }
    j->nlisted = nseen;
    for (size_t i = 0; i < nseen; i++)
        free(seen[i].key);
    free(seen);
    htable_fini(&index);
}

/* RFC 6531: a non-ASCII envelope address needs SMTPUTF8. RFC 6152: 8-bit
 * bytes in the message (only a "raw" message can have them: the MIME
 * builder's own output is 7-bit) need BODY=8BITMIME, and a server that
 * does not offer it gets no such message (session.c refuses, 5.6.3). */
static unsigned job_smtp_need(const job_t *j)
{
    unsigned need = 0;
    const unsigned char *b = (const unsigned char *)buf_head(&j->raw);
    for (size_t i = 0, n = buf_size(&j->raw); i < n; i++) {
        if (b[i] >= 0x80) {
            need |= SMTP_NEED_8BITMIME;
            break;
        }
    }
    for (const unsigned char *p = (const unsigned char *)j->msg->from.addr; p && *p; p++)
        if (*p >= 0x80)
            return need | SMTP_NEED_SMTPUTF8;
    for (size_t i = 0; i < j->nrcpts; i++)
        for (const unsigned char *p = (const unsigned char *)j->rcpts[i].addr; p && *p; p++)
            if (*p >= 0x80)
                return need | SMTP_NEED_SMTPUTF8;
    return need;
}

/* The RFC 5322 bytes, built and signed once: the same bytes go to SMTP
 * and to IMAP. 0, or -1 with the job's dead_reason set. */
static int job_build(job_t *j)
{
    const worker_env_t *env = j->ctx->env;
    char err[512];
    mime_opts_t mo = { .now = 0, .max_size = env->cfg->message_max_size };
    int rc = mime_build(j->msg, &mo, &j->raw, err, sizeof(err));
    if (rc != MIME_OK) {
        job_dead_letter(j, "%s: %s", mime_strerror(rc), err);
        return -1;
    }
    if (env->dkim) {
        rc = dkim_sign(env->dkim, message_addr_domain(j->msg->from.addr), &j->raw, 0, err, sizeof(err));
        if (rc == DKIM_EINVAL) {
            job_dead_letter(j, "%s", err);
            return -1;
        }
        if (rc == DKIM_ENOKEY)
            log_debug("job", "dkim_unsigned", "%s reason=%s", JOB_MSG(j), LOG_Q(err));
        else if (rc != DKIM_OK)
            log_error("job", "dkim_failed", "%s reason=%s action=send_unsigned", JOB_MSG(j), LOG_Q(err));
    }
    message_drop_content(j->msg); /* from here on the built bytes are the message */
    /* SMTP DATA is sent from raw itself; mime_build's output is all CRLF,
     * so the dot-stuffed copy is only a fallback (or the core's answer to
     * an allocation failure) */
    if (mime_wire_segments(buf_head(&j->raw), buf_size(&j->raw), &j->wire, &j->nwire) != MIME_OK)
        mime_dotstuff(buf_head(&j->raw), buf_size(&j->raw), &j->wire_copy);
    return 0;
}

static void job_body_digest(job_t *j)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(j->dv->body, j->dv->len, md, &n, EVP_sha256(), NULL);
    for (unsigned i = 0; i < n && 2 * i + 2 < sizeof(j->digest); i++)
        snprintf(j->digest + 2 * i, 3, "%02x", md[i]);
}

static void job_enter_intake(job_t *j)
{
    mq_delivery_t *dv = j->dv;
    char err[512];
    envelope_read(dv, util_wall_ms(), &j->envelope);
    if (dv->truncated) {
        /* only its head was read (queue/mq.c): it cannot build within max_size */
        char most[32];
        config_format_size(j->ctx->env->cfg->message_max_size, most, sizeof(most));
        metrics_inc(MET_MESSAGES_TOO_LARGE, 1);
        job_dead_letter(j, "too large: %zu bytes announced, at most %llu ([message] max_size %s)", dv->announced,
                        (unsigned long long)j->ctx->env->max_body, most);
        job_next(j);
        return;
    }
    if (msgjson_parse(dv->body, dv->len, &j->msg, err, sizeof(err)) != MSGJSON_OK) {
        job_dead_letter(j, "%s", err);
        job_next(j);
        return;
    }
    j->msg->priority = dv->priority;
    job_blame(j); /* from here on a crash is this message's */
    job_body_digest(j);
    if (j->msg->id_generated && j->envelope.id && msgjson_valid_id(j->envelope.id)) {
        /* the id an earlier attempt assigned (JOB_ASSIGN) */
        free(j->msg->id);
        j->msg->id = xstrdup(j->envelope.id);
        j->msg->id_generated = 0;
    }
    size_t named = j->msg->nto + j->msg->ncc + j->msg->nbcc;
    unsigned most = j->ctx->env->cfg->message_max_recipients;
    if (named > most) {
        job_dead_letter(j, "too many recipients: %zu (at most %u per message, [message] max_recipients)", named,
                        most);
        job_next(j);
        return;
    }
    if (job_unknown_pool(j)) {
        /* the application named a pool the egress file does not have:
         * kept in the dead letters until the file has it (redrive) */
        job_dead_letter(j, "unknown pool \"%s\": the egress file ([egress] file) has no [pool %s]", j->msg->pool,
                        j->msg->pool);
        job_next(j);
        return;
    }
    if (j->msg->id_generated) {
        job_next(j); /* JOB_ASSIGN: nothing is built for a message that is republished */
        return;
    }
    job_collect_rcpts(j);
    if (j->envelope.append_only) {
        log_info("job", "message_received", "tag=%llu %s attempt=%u append_only=1", (unsigned long long)dv->tag,
                 JOB_MSG(j), j->envelope.attempt);
        j->nrcpts = 0;
        job_next(j);
        return;
    }
    if (j->nrcpts == 0) {
        job_dead_letter(j, "retry carries no pending recipient of this message");
        job_next(j);
        return;
    }
    log_info("job", "message_received",
             "tag=%llu %s prio=%d attempt=%u rcpts=%zu domains=%zu body_bytes=%zu worker=%d",
             (unsigned long long)dv->tag, JOB_MSG(j), dv->priority,
             j->envelope.attempt, j->nrcpts, j->ndomains, dv->len, j->ctx->worker_index);
    job_next(j);
}

/* ---- BUILD ---- */

/* The RFC 5322 bytes, built and signed once, after the ledger and the
 * poison count were read: a message whose content crashes the builder
 * or the signer is counted (core/crash.h) and, redelivered, stopped at
 * COUNT before it is built again. */
static void job_enter_build(job_t *j)
{
    if (job_build(j) == 0) {
        j->need = job_smtp_need(j);
        log_debug("job", "built", "%s bytes=%zu", JOB_MSG(j), buf_size(&j->raw));
    }
    job_next(j);
}

/* ---- ASSIGN ---- */

/* A message published without "id" would be a new message on every
 * parse: to the ledger, the poison counter, its Message-ID and the Sent
 * folder search. It gets one id, once: the body is republished to the
 * outbound queue with the id in its envelope (confirmed), and only then
 * is the original acked. A worker dying between that confirm and the
 * ack brings the original back redelivered: the id it was given is then
 * found under the body's digest in the ledger and it is republished
 * again, so two copies with the same id may be queued. Each republish
 * carries a copy token of its own, and IDENTITY lets only the first copy
 * that claims the id go on: the other is acked and dropped before any
 * delivery work, so they never race each other through SMTP and IMAP. */
static void job_republish_with_id(job_t *j, const char *id)
{
    const mp_config_t *cfg = j->ctx->env->cfg;
    char copy[37];
    util_uuid(copy);
    envelope_t next = { .attempt = j->envelope.attempt, .first_seen_ms = j->envelope.first_seen_ms, .id = id,
                        .copy = copy };
    envelope_headers_t hdrs;
    envelope_write(&next, &hdrs);
    mq_publish_opts_t o = { .content_type = "application/json", .message_id = id, .priority = j->dv->priority,
                            .persistent = 1, .headers = hdrs.hdr, .nheaders = hdrs.n, .mandatory = 1,
                            .timestamp_s = j->dv->timestamp_s };
    log_info("job", "id_assigned", "tag=%llu %s redelivered=%d", (unsigned long long)j->dv->tag,
             LOG_MSGCTX(job_logctx(j, id, &(log_msgctx_t){ 0 })),
             j->dv->redelivered);
    job_publish(j, "", cfg->amqp_queue, j->dv->body, j->dv->len, &o);
    envelope_headers_free(&hdrs);
    job_await_confirms(j);
}

static void job_on_id_claimed(void *arg, int ok, const char *holder)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    if (!ok)
        job_ledger_unavailable(j, "assign_id");
    job_republish_with_id(j, ok && holder && msgjson_valid_id(holder) ? holder : j->msg->id);
}

static void job_enter_assign(job_t *j)
{
    ledger_t *ledger = j->ctx->svc.ledger;
    if (ledger == NULL) {
        job_republish_with_id(j, j->msg->id);
        return;
    }
    /* a first delivery takes a new id (an identical body published again
     * is another message); a redelivery takes the one its first delivery
     * may have given it */
    j->ledger_op = ledger_claim(ledger, 'a', j->digest, j->msg->id, !j->dv->redelivered, job_on_id_claimed, j);
}

/* ---- IDENTITY ---- */

/* The body's digest under the message id: a retry, a redelivery or a
 * publisher's own resend of the same bytes finds its own digest; an id
 * reused for other bytes within the ledger's lifetime finds another and
 * is dead-lettered, instead of having its recipients skipped as
 * delivered and its Sent copy reported as found. */
/* Which republish of an id-less message holds its id: ours, or a
 * second copy of the same original that must not be delivered again. */
static void job_on_copy_claimed(void *arg, int ok, const char *holder)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    if (!ok) {
        job_ledger_unavailable(j, "claim_copy");
    } else if (holder && strcmp(holder, j->envelope.copy) != 0) {
        log_info("job", "copy_dropped", "%s copy=%s holder=%s", JOB_MSG(j), LOG_Q(j->envelope.copy), LOG_Q(holder));
        j->copy_dropped = 1;
    }
    job_next(j);
}

static void job_on_identity(void *arg, int ok, const char *holder)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    if (!ok && job_ledger_again(j))
        return;
    if (!ok) {
        job_ledger_unavailable(j, "identity");
    } else if (holder && strcmp(holder, j->digest) != 0) {
        char ttl[32];
        config_format_duration(j->ctx->env->retry.max_age_ms, ttl, sizeof(ttl));
        job_dead_letter(j, "id reused: message id \"%s\" was given to a different message (another body) "
                        "within the last %s", j->msg->id, ttl);
    } else if (j->envelope.copy) {
        /* a republish that assigned the id: only one such copy goes on */
        j->ledger_op = ledger_claim(j->ctx->svc.ledger, 'c', j->msg->id, j->envelope.copy, 0, job_on_copy_claimed,
                                    j);
        return;
    }
    job_next(j);
}

static void job_enter_identity(job_t *j)
{
    j->ledger_op = ledger_claim(j->ctx->svc.ledger, 'm', j->msg->id, j->digest, 0, job_on_identity, j);
}

/* ---- LOOKUP ---- */

/* What the ledger says of each recipient (ok=0: nothing). */
static void job_apply_ledger(job_t *j, int ok, const ledger_state_t *states, const char *const *hops)
{
    if (!ok) {
        job_ledger_unavailable(j, "lookup");
        if (j->dv->redelivered) {
            /* back unacked from a worker that died: it may have been cut
             * between a final dot and its reply, and nothing says for
             * whom. Flag every recipient rather than miss a copy. */
            for (size_t i = 0; i < j->nrcpts; i++)
                job_flag_possible_dup(&j->rcpts[i]);
        }
        return;
    }
    for (size_t i = 0; i < j->nrcpts; i++) {
        job_rcpt_t *r = &j->rcpts[i];
        if (states[i] == LEDGER_DONE || states[i] == LEDGER_DONE_FLAGGED) {
            r->skip = 1;
            rcpt_set(r, OUTCOME_DELIVERED, OUTCOME_R_ALREADY_DELIVERED, 0, NULL,
                     "delivered by an earlier attempt of this message (ledger)");
            /* that attempt's copy may have been a second one: it was
             * counted then, and its event may never have gone out */
            r->possible_dup = states[i] == LEDGER_DONE_FLAGGED;
            metrics_inc(MET_RCPT_SKIPPED_DONE, 1);
        } else if (states[i] == LEDGER_SENDING) {
            /* an earlier attempt was cut between its final dot and the
             * reply: the server may have it. The mark stays until this
             * attempt settles the recipient. */
            job_flag_possible_dup(r);
        } else if ((states[i] == LEDGER_HANDED || states[i] == LEDGER_HANDING) && hops[i] &&
                   (j->envelope.hop == NULL || strcmp(hops[i], j->envelope.hop) != 0)) {
            if (states[i] == LEDGER_HANDED) {
                /* an earlier run of this very delivery deferred it and
                 * its retry is queued (confirmed), events included: that
                 * copy owns it now, this one leaves it alone */
                r->skip = r->handed = 1;
                log_info("job", "handed_off", "%s rcpt=%s hop=%s", JOB_MSG(j), LOG_Q(r->addr), LOG_Q(hops[i]));
            } else {
                /* it was being handed to a retry when that run died: the
                 * retry may be queued and deliver it too */
                job_flag_possible_dup(r);
            }
        }
    }
}

static void job_on_looked_up(void *arg, int ok, const ledger_state_t *states, const char *const *hops)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    if (!ok && job_ledger_again(j))
        return;
    job_apply_ledger(j, ok, states, hops);
    job_next(j);
}

/* The suppression check is on: [suppression] enabled, with Redis. */
static int job_sup_on(const job_t *j)
{
    return j->ctx->env->cfg->suppression_enabled && j->ctx->svc.redis != NULL;
}

/* Whether the last check of the process could be made: logged once per
 * change, not per message. */
static atomic_int job_sup_down;

static void job_sup_state(const job_t *j, int down)
{
    if (atomic_exchange_explicit(&job_sup_down, down, memory_order_relaxed) == down)
        return;
    if (down)
        log_warn("job", "suppression_unavailable", "%s when_unavailable=%s", JOB_MSG(j),
                 j->ctx->env->cfg->suppression_when_unavailable == MP_SUP_UNAVAILABLE_DEFER ? "defer" : "send");
    else
        log_info("job", "suppression_available", "%s", JOB_MSG(j));
}

/* Recipient r was found on list (tenant, or NULL: global) with value v. */
static int job_suppress(job_t *j, job_rcpt_t *r, const char *tenant, const char *v)
{
    suplist_entry_t e;
    if (suplist_decode(v, strlen(v), &e) < 0) {
        log_warn("job", "suppression_corrupt", "%s rcpt=%s list=%s", JOB_MSG(j), LOG_Q(r->addr),
                 tenant ? tenant : "global");
        return 0; /* not an entry: sent as if absent */
    }
    if (suplist_expired(&e, util_wall_ms() / 1000))
        return 0;
    r->skip = r->held = 1;
    r->sup_list = xstrdup(tenant ? tenant : "global");
    r->sup = xmalloc(sizeof(*r->sup));
    *r->sup = e;
    char text[300];
    snprintf(text, sizeof(text), "on the %s suppression list%s%s", tenant ? "tenant's" : "global",
             e.reason[0] ? ": " : "", e.reason);
    rcpt_set(r, OUTCOME_PERMANENT, OUTCOME_R_SUPPRESSED, 0, NULL, text);
    return 1;
}

/* The ledger and both suppression lists, one command (ledger.h). */
static void job_on_looked_up_sup(void *arg, int ok, const ledger_state_t *states, const char *const *hops,
                                 const char *const *sup)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    if (!ok && job_ledger_again(j))
        return;
    job_apply_ledger(j, ok, states, hops);
    const char *tenant = j->msg->tenant;
    size_t n = j->nrcpts;
    if (!ok) {
        metrics_inc(MET_SUP_UNAVAILABLE, 1);
        job_sup_state(j, 1);
        if (j->ctx->env->cfg->suppression_when_unavailable == MP_SUP_UNAVAILABLE_DEFER) {
            for (size_t i = 0; i < n; i++) {
                job_rcpt_t *r = &j->rcpts[i];
                if (r->skip)
                    continue;
                r->skip = r->held = 1;
                rcpt_set(r, OUTCOME_TRANSIENT, OUTCOME_R_SUPPRESSION_UNAVAILABLE, 0, NULL,
                         "suppression lists unavailable (Redis): deferred");
            }
        }
        job_next(j);
        return;
    }
    job_sup_state(j, 0);
    for (size_t i = 0; i < n; i++) {
        job_rcpt_t *r = &j->rcpts[i];
        if (r->skip)
            continue; /* delivered before, or a retry's */
        if (!(sup[i] && job_suppress(j, r, NULL, sup[i])) && tenant && sup[n + i])
            job_suppress(j, r, tenant, sup[n + i]);
        if (r->held)
            log_info("job", "suppressed", "%s rcpt=%s list=%s reason=%s", JOB_MSG(j), LOG_Q(r->addr),
                     LOG_Q(r->sup_list), LOG_Q(r->sup->reason));
    }
    job_next(j);
}

static void job_enter_lookup(job_t *j)
{
    size_t n = j->nrcpts;
    const char **rcpts = xcalloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; i < n; i++)
        rcpts[i] = j->rcpts[i].addr;
    if (!job_sup_on(j)) {
        j->ledger_op = ledger_lookup(j->ctx->svc.ledger, j->msg->id, rcpts, n, job_on_looked_up, j);
        free(rcpts);
        return;
    }
    char **fields = xcalloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        char f[SUPLIST_ADDR_MAX];
        if (suplist_normalize(j->rcpts[i].addr, f) == 0)
            fields[i] = xstrdup(f);
    }
    char *keys[2] = { suplist_key(NULL), j->msg->tenant ? suplist_key(j->msg->tenant) : NULL };
    j->ledger_op = ledger_lookup_sup(j->ctx->svc.ledger, j->msg->id, rcpts, n, (const char *const *)keys,
                                     keys[1] ? 2 : 1, (const char *const *)fields, job_on_looked_up_sup, j);
    for (size_t i = 0; i < n; i++)
        free(fields[i]);
    free(fields);
    free(keys[0]);
    free(keys[1]);
    free(rcpts);
}

/* ---- COUNT ---- */

/* A redelivered message, after LOOKUP: how many of its attempts crashed
 * a worker (the crash handler counts those, core/crash.h) or could not be
 * finished (CHARGE). Only read here: a redelivery itself is no fault of
 * the message (a worker killed with SIGKILL, a lost connection). At the
 * limit the message is poison for the recipients the ledger does not
 * show delivered; when it shows them all delivered there is nothing left
 * to fear from it, and it is reported and acked as usual. */
static void job_on_counted(void *arg, int ok, long long count)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    unsigned limit = j->ctx->env->retry.poison_redeliveries;
    size_t left = 0;
    for (size_t i = 0; i < j->nrcpts; i++)
        left += !j->rcpts[i].skip;
    if (!ok) {
        job_ledger_unavailable(j, "poison_count");
    } else if (limit > 0 && count >= (long long)limit && left > 0) {
        metrics_inc(MET_MESSAGES_POISON, 1);
        j->poison = 1;
        job_dead_letter(j, "poison: %lld attempts of this message crashed a worker or could not be finished "
                        "(limit %u)", count, limit);
    } else if (limit > 0 && count >= (long long)limit) {
        log_info("job", "poison_settled", "%s count=%lld limit=%u rcpts_done=%zu", JOB_MSG(j), count, limit,
                 j->nrcpts);
    }
    job_next(j);
}

static void job_enter_count(job_t *j)
{
    j->ledger_op = ledger_poison_count(j->ctx->svc.ledger, j->msg->id, job_on_counted, j);
}

/* ---- DOMAINS ---- */

static int job_gate(void *arg, const char **why)
{
    job_domain_t *d = arg;
    job_blame(d->job);
    if (!job_broker_open(d->job)) {
        /* no transaction is started for a message the broker redelivers */
        *why = "broker connection lost";
        return 0;
    }
    d->job->smtp_started = 1;
    return 1;
}

/* Cut between the final dot and its reply: whichever attempt delivers
 * this recipient later (a fast retry, a retry level) may be a second
 * copy; the leg keeps its "sending" mark. */
static void job_on_leg_cut(void *arg, size_t k)
{
    job_domain_t *d = arg;
    job_blame(d->job);
    if (k < d->n)
        job_flag_possible_dup(&d->job->rcpts[d->idx[k]]);
}

static void job_on_leg_done(void *arg, const domain_result_t *res)
{
    job_domain_t *d = arg;
    job_t *j = d->job;
    job_blame(j);
    snprintf(d->mx_host, sizeof(d->mx_host), "%s", res->mx_host);
    snprintf(d->mx_addr, sizeof(d->mx_addr), "%s", res->mx_addr);
    snprintf(d->tls_version, sizeof(d->tls_version), "%s", res->tls_version);
    snprintf(d->tls_cipher, sizeof(d->tls_cipher), "%s", res->tls_cipher);
    for (size_t k = 0; k < res->nrcpts && k < d->n; k++) {
        const domain_rcpt_result_t *rr = &res->rcpts[k];
        job_rcpt_t *r = &j->rcpts[d->idx[k]];
        rcpt_set(r, rr->outcome, rr->reason, rr->code, rr->enh, rr->text);
        rcpt_set_egress(r, rr->source, rr->source_addr, rr->shaping);
    }
    if (res->throttle_wait_ms > j->throttle_ms)
        j->throttle_ms = res->throttle_wait_ms; /* the retry comes no sooner */
    domain_free(d->leg);
    d->leg = NULL;
    if (--j->legs_left == 0)
        job_next(j);
}

static void job_enter_domains(job_t *j)
{
    const retry_class_policy_t *rc = &j->ctx->env->retry.cls[retry_class(j->dv->priority)];
    /* each domain's recipients: counted, then placed (linear) */
    for (size_t i = 0; i < j->nrcpts; i++)
        if (!j->rcpts[i].skip)
            j->domains[j->rcpts[i].domain].n++;
    for (size_t i = 0; i < j->ndomains; i++) {
        job_domain_t *d = &j->domains[i];
        d->rcpts = xcalloc(d->n ? d->n : 1, sizeof(*d->rcpts));
        d->idx = xcalloc(d->n ? d->n : 1, sizeof(*d->idx));
        d->flagged = xcalloc(d->n ? d->n : 1, 1);
        d->n = 0;
    }
    for (size_t i = 0; i < j->nrcpts; i++) {
        if (j->rcpts[i].skip)
            continue;
        job_domain_t *d = &j->domains[j->rcpts[i].domain];
        d->rcpts[d->n] = j->rcpts[i].addr;
        d->flagged[d->n] = (unsigned char)j->rcpts[i].possible_dup;
        d->idx[d->n++] = i;
    }
    j->legs_left = 0;
    for (size_t i = 0; i < j->ndomains; i++)
        j->legs_left += j->domains[i].n > 0;
    if (j->legs_left == 0) {
        job_next(j);
        return;
    }
    job_logctx(j, NULL, &j->log); /* the message is settled: the legs borrow it */
    /* legs report asynchronously (domain.h): every leg starts before any
     * of them can end the state */
    for (size_t i = 0; i < j->ndomains; i++) {
        job_domain_t *d = &j->domains[i];
        if (d->n == 0)
            continue;
        d->job = j;
        domain_request_t req = {
            .name = d->name,
            .msg_id = j->msg->id,
            .trace_id = j->msg->trace_id,
            .tenant = j->msg->tenant,
            .campaign = j->msg->campaign,
            .pool = j->msg->pool,
            .log = &j->log,
            .mail_from = j->msg->from.addr,
            .rcpts = d->rcpts,
            .nrcpts = d->n,
            .data = buf_head(&j->wire_copy),
            .len = buf_size(&j->wire_copy),
            .segs = j->wire,
            .nsegs = j->nwire,
            .message_size = buf_size(&j->raw),
            .need = j->need,
            .flagged = d->flagged,
            .fast_retries = rc->fast_retries,
            .fast_base_ms = rc->fast_base_ms,
            .gate = job_gate,
            .cut = job_on_leg_cut,
            .done = job_on_leg_done,
            .arg = d,
        };
        d->leg = domain_start(&j->ctx->svc, &req);
    }
}

/* ---- SENT_COPY ---- */

static void job_on_appended(void *arg, const imap_append_result_t *res)
{
    job_t *j = arg;
    job_blame(j);
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
    metrics_inc(j->append_res.status == IMAP_OK ? MET_IMAP_APPENDED : MET_IMAP_APPEND_FAILED, 1);
    job_next(j);
}

static void job_enter_sent_copy(job_t *j)
{
    job_ctx_t *ctx = j->ctx;
    const worker_env_t *env = ctx->env;
    if (!job_broker_open(j)) {
        /* the delivery's channel is gone: the ledger holds what this
         * attempt delivered; the redelivery stores the Sent copy and
         * publishes the events */
        j->broker_lost = 1;
        job_next(j);
        return;
    }
    size_t delivered = 0;
    for (size_t i = 0; i < j->nrcpts; i++)
        delivered += j->rcpts[i].outcome == OUTCOME_DELIVERED && !j->rcpts[i].handed;
    const account_t *acct = env->imap_addrlen ? accounts_find(&env->accounts, j->msg->from.addr) : NULL;
    if ((delivered == 0 && !j->envelope.append_needed) || acct == NULL || j->envelope.appended) {
        job_next(j);
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
        .pool = ctx->imap_pool,
        .log_id = j->msg->id,
        .trace_id = j->msg->trace_id,
        .log_ref = JOB_MSG(j),
    };
    /* a retried append, or a message back after a worker or connection
     * died, may find its copy already stored: look before appending; and
     * a pooled session lost in an uncertain way looks before its retry */
    char mid[512];
    if (mime_header_find(buf_head(&j->raw), buf_size(&j->raw), "Message-ID", mid, sizeof(mid)) == MIME_OK) {
        ia.message_id = mid;
        /* also when an earlier attempt's append failed: one that timed
         * out may still have been stored */
        if (j->envelope.append_only || j->envelope.append_needed || j->dv->redelivered)
            ia.check_message_id = mid;
    }
    j->append_tried = 1;
    j->append = imap_append_start(ctx->svc.loop, &ia, buf_head(&j->raw), buf_size(&j->raw), job_on_appended, j);
}

/* ---- EVENTS ---- */

static const char *event_name(const job_rcpt_t *r)
{
    if (r->reason == OUTCOME_R_SUPPRESSED && r->held)
        return "suppressed";
    switch (r->outcome) {
    case OUTCOME_DELIVERED: return "delivered";
    case OUTCOME_TRANSIENT: return "deferred";
    default: return "bounced";
    }
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
 * expires. Planned once (HANDOFF), published with the events: 1 if a
 * retry is planned; 0 when there is nothing to retry or attempts or age
 * are used up (j->give_up says which). */
static int job_plan_retry(job_t *j)
{
    const retry_policy_t *rp = &j->ctx->env->retry;
    int c = retry_class(j->dv->priority);
    const retry_class_policy_t *rc = &rp->cls[c];
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
        if (r->code == 0 && (r->reason == OUTCOME_R_RATE_LIMITED || r->reason == OUTCOME_R_PARKED ||
                             r->reason == OUTCOME_R_SUSPENDED || r->reason == OUTCOME_R_SUPPRESSION_UNAVAILABLE))
            continue; /* deferred by a rate limit, parked by its site or suspended before any server was asked */
        throttled_only = 0;
        uint64_t asked = retry_server_delay_ms(r->text);
        if (asked > server_ms)
            server_ms = asked;
    }
    if (buf_size(&pending) == 0 && !job_append_retryable(j)) {
        buf_free(&pending);
        return 0;
    }
    throttled_only = throttled_only && buf_size(&pending) > 0;
    unsigned attempt = j->envelope.attempt;
    uint64_t want = throttled_only ? 0 : retry_backoff_ms(rc->base_ms, attempt, util_rand01());
    size_t level = retry_pick_level(&rp->levels, want, server_ms);
    uint64_t delay = rp->levels.ms[level];
    uint64_t age = util_wall_ms() - j->envelope.first_seen_ms;
    if (!throttled_only && attempt >= rc->max_attempts) {
        snprintf(j->give_up, sizeof(j->give_up), "retries exhausted after %u attempts", attempt);
    } else if (age + delay > rc->max_age_ms) {
        char a[32];
        config_format_duration(rc->max_age_ms, a, sizeof(a));
        snprintf(j->give_up, sizeof(j->give_up), "expired: next attempt would pass the maximum age of %s (P%d)",
                 a, c);
    }
    buf_free(&pending);
    if (j->give_up[0])
        return 0;
    j->retry_level = level;
    j->retry_in_ms = delay;
    j->retry_server_ms = server_ms;
    j->retry_throttled_only = throttled_only;
    return 1;
}

static void job_publish_retry(job_t *j)
{
    const retry_policy_t *rp = &j->ctx->env->retry;
    int c = retry_class(j->dv->priority);
    unsigned attempt = j->envelope.attempt;
    buf_t pending = BUF_INIT;
    for (size_t i = 0; i < j->nrcpts; i++) {
        if (j->rcpts[i].outcome != OUTCOME_TRANSIENT)
            continue;
        if (buf_size(&pending))
            buf_putc(&pending, ',');
        buf_puts(&pending, j->rcpts[i].addr);
    }
    int appended = j->envelope.appended || (j->append_tried && j->append_res.status == IMAP_OK);
    unsigned char *set = xcalloc(1, envelope_set_bytes(j->nlisted) + 1);
    for (size_t i = 0; i < j->nrcpts; i++)
        if (j->rcpts[i].outcome == OUTCOME_TRANSIENT)
            envelope_set_bit(set, j->rcpts[i].index);
    envelope_t next = {
        .attempt = j->retry_throttled_only ? attempt : attempt + 1,
        .first_seen_ms = j->envelope.first_seen_ms,
        .id = j->envelope.id, /* the id ASSIGN gave, if that is where it came from */
        .pending_set = set,
        .pending_nbits = j->nlisted,
        .appended = appended,
        .append_needed = !appended && job_append_retryable(j),
        .append_only = buf_size(&pending) == 0,
        .hop = j->hop[0] ? j->hop : NULL,
    };
    envelope_headers_t hdrs;
    envelope_write(&next, &hdrs);
    char queue[256];
    retry_queue_name(rp->queue_prefix, &rp->levels, j->retry_level, queue, sizeof(queue));
    /* its age goes on counting from when it was first enqueued (or consumed) */
    mq_publish_opts_t o = { .message_id = j->msg->id, .priority = j->dv->priority, .persistent = 1,
                            .headers = hdrs.hdr, .nheaders = hdrs.n, .mandatory = 1,
                            .timestamp_s = j->dv->timestamp_s ? j->dv->timestamp_s
                                                              : j->envelope.first_seen_ms / 1000 };
    log_info("job", "retry_scheduled", "%s class=P%d attempt=%u queue=%s delay_ms=%llu server_ms=%llu pending=%s",
             JOB_MSG(j), c, next.attempt, LOG_Q(queue), (unsigned long long)j->retry_in_ms,
             (unsigned long long)j->retry_server_ms, LOG_Q(buf_head(&pending)));
    job_publish(j, "", queue, j->dv->body, j->dv->len, &o);
    envelope_headers_free(&hdrs);
    free(set);
    buf_free(&pending);
}

/* One recipient's outcome by the message's tenant and pool and the
 * source its leg used (r NULL: none, a message dead-lettered as a whole). */
static void job_count_sender(const job_t *j, const job_rcpt_t *r, metrics_outcome_t o)
{
    metrics_count_labeled(MET_FAM_TENANT, j->msg ? j->msg->tenant : NULL, o);
    metrics_count_labeled(MET_FAM_POOL, j->msg ? j->msg->pool : NULL, o);
    metrics_count_labeled(MET_FAM_CAMPAIGN, j->msg ? j->msg->campaign : NULL, o);
    metrics_count_labeled(MET_FAM_SOURCE, r ? r->source : NULL, o);
    if (r == NULL) {
        metrics_count_labeled(MET_FAM_SITE, NULL, o);
    } else {
        const job_domain_t *d = &j->domains[r->domain];
        char site[256];
        sites_name(d->mx_host[0] ? d->mx_host : d->name, site, sizeof(site));
        metrics_count_labeled(MET_FAM_SITE, site, o);
    }
}

/* The outcome label of a recipient's event (metrics.h): its event's
 * name, parked apart from deferred. */
static metrics_outcome_t job_metric_outcome(const job_rcpt_t *r)
{
    if (r->reason == OUTCOME_R_SUPPRESSED && r->held)
        return MET_OUT_SUPPRESSED;
    switch (r->outcome) {
    case OUTCOME_DELIVERED: return MET_OUT_DELIVERED;
    case OUTCOME_TRANSIENT: return r->reason == OUTCOME_R_PARKED ? MET_OUT_PARKED : MET_OUT_DEFERRED;
    default: return MET_OUT_BOUNCED;
    }
}

static void job_on_auto_added(void *arg, const redisReply *r, const char *err)
{
    (void)arg;
    if (r == NULL || r->type == REDIS_REPLY_ERROR) {
        metrics_inc(MET_SUP_AUTO_FAILED, 1);
        log_warn("job", "suppression_add_failed", "error=%s",
                 LOG_Q(r ? r->str : err ? err : "no reply"));
    }
}

/* A permanent bounce of a reason in [suppression] auto_reasons: the
 * recipient goes on its tenant's list (the global one without a tenant),
 * fire-and-forget; a write that fails is counted. */
static void job_auto_suppress(job_t *j, const job_rcpt_t *r)
{
    const mp_config_t *cfg = j->ctx->env->cfg;
    const char *reason = outcome_reason_name(r->reason);
    char field[SUPLIST_ADDR_MAX];
    if (!job_sup_on(j) || !suplist_reason_in(cfg->suppression_auto_reasons, reason) ||
        suplist_normalize(r->addr, field) < 0)
        return;
    uint64_t now = util_wall_ms() / 1000;
    suplist_entry_t e = { .added_s = now, .origin = SUPLIST_AUTO, .code = r->code,
                          .expires_s = cfg->suppression_auto_ttl ? now + cfg->suppression_auto_ttl : 0 };
    snprintf(e.reason, sizeof(e.reason), "%s", reason);
    snprintf(e.enh, sizeof(e.enh), "%s", r->enh);
    snprintf(e.message_id, sizeof(e.message_id), "%s", j->msg->id);
    snprintf(e.text, sizeof(e.text), "%.*s", (int)sizeof(e.text) - 1, r->text);
    char *key = suplist_key(j->msg->tenant);
    char *val = suplist_encode(&e);
    const char *argv[] = { "HSET", key, field, val };
    size_t lens[] = { 4, strlen(key), strlen(field), strlen(val) };
    rclient_commandargv(j->ctx->svc.redis, job_on_auto_added, NULL, 4, argv, lens);
    metrics_inc(MET_SUP_AUTO_ADDED, 1);
    log_info("job", "suppression_added", "%s rcpt=%s list=%s reason=%s code=%d", JOB_MSG(j), LOG_Q(r->addr),
             LOG_Q(j->msg->tenant ? j->msg->tenant : "global"), reason, r->code);
    free(key);
    free(val);
}

/* A recipient deferred or parked, into the worker's status table, under
 * its site (docs/operations.md, "Queue summary"). */
static void job_note_deferred(job_t *j, const job_domain_t *d, const job_rcpt_t *r)
{
    char site[256], error[600];
    sites_name(d->mx_host[0] ? d->mx_host : d->name, site, sizeof(site));
    int parked = r->reason == OUTCOME_R_PARKED;
    if (r->code > 0)
        snprintf(error, sizeof(error), "%d%s%s %s", r->code, r->enh[0] ? " " : "", r->enh, r->text);
    else
        snprintf(error, sizeof(error), "%s", r->text);
    qstat_note(j->ctx->qstat, site, parked, parked ? NULL : error, util_wall_ms());
}

uint64_t job_first_seen_ms(const job_t *j)
{
    return j->envelope.first_seen_ms;
}

/* mailpump_recipients_total and, for a final event, the delivery latency
 * (from the message's first enqueue) and the age at delivery. */
static void job_count_event(const job_t *j, metrics_event_t ev, int reason)
{
    uint64_t now = util_wall_ms(), fs = j->envelope.first_seen_ms;
    metrics_recipient_event(ev, reason, metrics_latency_us(now, j->dv->timestamp_s, fs),
                            fs && now > fs ? (now - fs) * 1000 : 0);
}

static void job_publish_rcpt_event(job_t *j, job_rcpt_t *r, int retrying, int appended)
{
    const job_domain_t *d = &j->domains[r->domain];
    char exhausted[700] = "";
    if (r->outcome == OUTCOME_PERMANENT && r->code >= 500 && !r->held && !r->skip)
        job_auto_suppress(j, r);
    if (r->outcome == OUTCOME_TRANSIENT && !retrying) {
        /* out of attempts or time: the last transient answer becomes final */
        snprintf(exhausted, sizeof(exhausted), "%s; last reply: %s", j->give_up, r->text);
        r->outcome = OUTCOME_PERMANENT;
    }
    metrics_outcome_t mo = job_metric_outcome(r);
    switch (mo) {
    case MET_OUT_DELIVERED: metrics_inc(MET_RCPT_DELIVERED, 1); break;
    case MET_OUT_SUPPRESSED: metrics_inc(MET_RCPT_SUPPRESSED, 1); break;
    case MET_OUT_DEFERRED:
    case MET_OUT_PARKED: metrics_inc(MET_RCPT_DEFERRED, 1); break;
    default: metrics_inc(MET_RCPT_FAILED, 1); break;
    }
    if (r->outcome == OUTCOME_TRANSIENT && j->ctx->qstat != NULL)
        job_note_deferred(j, d, r);
    job_count_sender(j, r, mo);
    job_count_event(j, mo == MET_OUT_DELIVERED    ? MET_EV_DELIVERED
                       : mo == MET_OUT_SUPPRESSED ? MET_EV_SUPPRESSED
                       : mo == MET_OUT_BOUNCED    ? MET_EV_BOUNCED
                                                  : MET_EV_DEFERRED,
                    r->reason);
    const char *reason = outcome_reason_name(r->reason);
    mq_event_t ev = {
        .event = event_name(r),
        .message_id = j->msg->id,
        .trace_id = j->msg->trace_id,
        .tenant = j->msg->tenant,
        .campaign = j->msg->campaign,
        .pool = j->msg->pool,
        .sender = j->msg->from.addr,
        .recipient = r->addr,
        .outcome = outcome_name(r->outcome),
        .reason = reason,
        .smtp_code = r->code,
        .smtp_enhanced = r->enh,
        .smtp_text = r->text,
        .mx_host = d->mx_host,
        .mx_addr = d->mx_addr,
        .source = r->source,
        .source_addr = r->source_addr,
        .shaping = r->shaping,
        .tls_version = d->tls_version[0] ? d->tls_version : NULL,
        .tls_cipher = d->tls_cipher[0] ? d->tls_cipher : NULL,
        .attempt = j->envelope.attempt,
        .imap_appended = appended && r->outcome == OUTCOME_DELIVERED,
        .imap_uidvalidity = j->append_res.uidvalidity,
        .imap_uid = j->append_res.uid,
        .imap_mailbox = j->append_res.mailbox,
        /* no server answered: the local reason ("connect: Connection
         * refused", a DNS failure, a rate limit) */
        .error = exhausted[0] ? exhausted : r->code == 0 && r->text[0] ? r->text : NULL,
        .retry_in_ms = r->outcome == OUTCOME_TRANSIENT ? j->retry_in_ms : 0,
        .possible_duplicate = r->possible_dup && r->outcome == OUTCOME_DELIVERED,
        .already_delivered = r->skip && !r->held,
        .suppression_list = r->sup_list,
        .suppression_reason = r->sup ? r->sup->reason : NULL,
        .suppression_added_s = r->sup ? r->sup->added_s : 0,
        .age_ms = util_wall_ms() - j->envelope.first_seen_ms,
    };
    log_info("job", event_name(r), "%s rcpt=%s attempt=%u code=%d enh=%s reason=%s mx=%s tls=%s",
             JOB_MSG(j), LOG_Q(r->addr), j->envelope.attempt, r->code, r->enh[0] ? r->enh : "-", reason,
             LOG_Q(d->mx_host[0] ? d->mx_host : NULL), d->tls_version[0] ? d->tls_version : "none");
    job_publish_event(j, &ev);
}

/* ---- HANDOFF, HANDED ---- */

/* A retry republish and the attempt that made it may both be alive: the
 * attempt's worker dies after the retry is queued but before its ack,
 * and the broker redelivers it while the retry runs. So the recipients
 * handed to a retry are recorded with its token (envelope hop) twice:
 * "retry:<hop>" before it is published (HANDOFF) and "retried:<hop>"
 * once it and the events are confirmed (HANDED, just before the ack). A
 * redelivery of the attempt leaves a "retried" recipient to the retry
 * (no event, no SMTP), and flags a "retry" one: that retry may or may
 * not be queued. The retry itself finds its own token and goes on. */
static void job_on_handoff_marked(void *arg, int ok)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    if (!ok && job_ledger_again(j))
        return;
    if (!ok)
        job_ledger_unavailable(j, j->state == JOB_HANDOFF ? "handoff" : "handed");
    job_next(j);
}

static void job_mark_handoff(job_t *j, ledger_state_t st)
{
    const char **rcpts = xcalloc(j->nrcpts ? j->nrcpts : 1, sizeof(char *));
    size_t n = 0;
    for (size_t i = 0; i < j->nrcpts; i++)
        if (j->rcpts[i].outcome == OUTCOME_TRANSIENT)
            rcpts[n++] = j->rcpts[i].addr;
    j->ledger_op = ledger_mark_handoff(j->ctx->svc.ledger, j->msg->id, rcpts, n, st, j->hop,
                                       job_on_handoff_marked, j);
    free(rcpts);
}

static void job_enter_handoff(job_t *j)
{
    size_t transient = 0;
    for (size_t i = 0; i < j->nrcpts; i++)
        transient += j->rcpts[i].outcome == OUTCOME_TRANSIENT;
    j->retrying = (transient > 0 || job_append_retryable(j)) && job_plan_retry(j);
    if (!j->retrying || transient == 0 || j->ctx->svc.ledger == NULL) {
        job_next(j);
        return;
    }
    util_uuid(j->hop);
    job_mark_handoff(j, LEDGER_HANDING);
}

static void job_enter_handed(job_t *j)
{
    job_mark_handoff(j, LEDGER_HANDED);
}

static void job_enter_events(job_t *j)
{
    int appended = j->append_tried && j->append_res.status == IMAP_OK;
    int retrying = j->retrying;
    if (retrying)
        job_publish_retry(j);
    for (size_t i = 0; i < j->nrcpts; i++)
        if (!j->rcpts[i].handed)
            job_publish_rcpt_event(j, &j->rcpts[i], retrying, appended);
    if (j->append_tried) {
        mq_event_t ev = {
            .event = appended ? "appended" : "append_failed",
            .message_id = j->msg->id,
            .trace_id = j->msg->trace_id,
            .tenant = j->msg->tenant,
            .campaign = j->msg->campaign,
            .pool = j->msg->pool,
            .sender = j->msg->from.addr,
            .attempt = j->envelope.attempt,
            .imap_appended = appended,
            .imap_uidvalidity = j->append_res.uidvalidity,
            .imap_uid = j->append_res.uid,
            .imap_mailbox = j->append_res.mailbox,
            .error = appended ? NULL : j->append_res.error,
            .retry_in_ms = !appended && retrying && job_append_retryable(j) ? j->retry_in_ms : 0,
            .age_ms = util_wall_ms() - j->envelope.first_seen_ms,
        };
        job_publish_event(j, &ev);
    }
    job_write_history(j);
    job_await_confirms(j);
}

/* ---- DEAD ---- */

/* The "id" of a body the parser refused, when it is a JSON object whose
 * id is a valid one (msgjson_valid_id); else NULL. Dead letters only. */
static char *job_salvage_id(const mq_delivery_t *dv)
{
    if (dv->truncated || dv->body == NULL)
        return NULL;
    json_t *root = json_loadb(dv->body, dv->len, JSON_REJECT_DUPLICATES, NULL);
    const json_t *id = json_is_object(root) ? json_object_get(root, "id") : NULL;
    char *out = json_is_string(id) && msgjson_valid_id(json_string_value(id)) ? xstrdup(json_string_value(id))
                                                                              : NULL;
    json_decref(root);
    return out;
}

/* The original body to the dead-letter queue with the reason, and a dead
 * event; acked once both are confirmed. A poison message first reports
 * the recipients the ledger shows delivered (already_delivered, as any
 * redelivery does), and gets one dead event per recipient it leaves
 * undelivered instead of one for the message. */
static void job_enter_dead(job_t *j)
{
    const mp_config_t *cfg = j->ctx->env->cfg;
    if (j->poison)
        for (size_t i = 0; i < j->nrcpts; i++)
            if (j->rcpts[i].skip && !j->rcpts[i].handed)
                job_publish_rcpt_event(j, &j->rcpts[i], 0, 0);
    metrics_inc(MET_MESSAGES_DEAD, 1);
    log_warn("job", "dead_letter", "tag=%llu %s reason=%s", (unsigned long long)j->dv->tag, JOB_MSG(j),
             LOG_Q(j->dead_reason));
    envelope_dead_t hdrs;
    envelope_dead_write(j->dead_reason, util_wall_ms(), &hdrs);
    if (j->dv->truncated)
        envelope_dead_truncated(&hdrs, j->dv->announced);
    /* a body refused by validation may still name a valid id: the dead
     * copy and the dead event carry it, for `mailpump dead` and trace */
    char *salvaged = j->msg == NULL && j->dv->message_id == NULL ? job_salvage_id(j->dv) : NULL;
    const char *dead_id = j->msg ? j->msg->id : j->dv->message_id ? j->dv->message_id : salvaged;
    /* its priority kept: a redrive republishes it with it (docs/operations.md) */
    mq_publish_opts_t o = { .content_type = "application/octet-stream", .message_id = dead_id,
                            .priority = j->dv->priority, .persistent = 1, .headers = hdrs.hdr, .nheaders = hdrs.n,
                            .mandatory = 1, .timestamp_s = j->dv->timestamp_s };
    job_publish(j, "", cfg->amqp_dead_queue, j->dv->body, j->dv->len, &o);
    mq_event_t ev = { .event = "dead", .message_id = dead_id,
                      .trace_id = j->msg ? j->msg->trace_id : NULL, .error = j->dead_reason,
                      .attempt = j->envelope.attempt };
    if (j->msg) {
        ev.tenant = j->msg->tenant;
        ev.campaign = j->msg->campaign;
        ev.pool = j->msg->pool;
    }
    if (j->poison) {
        ev.sender = j->msg->from.addr;
        for (size_t i = 0; i < j->nrcpts; i++) {
            if (j->rcpts[i].skip)
                continue;
            ev.recipient = j->rcpts[i].addr;
            job_count_sender(j, &j->rcpts[i], MET_OUT_DEAD);
            job_count_event(j, MET_EV_DEAD, OUTCOME_R_OTHER);
            job_publish_event(j, &ev);
        }
    } else {
        job_count_sender(j, NULL, MET_OUT_DEAD); /* one dead event, for the message */
        job_publish_event(j, &ev);
    }
    job_write_history(j);
    free(salvaged);
    job_await_confirms(j);
}

/* ---- CHARGE ---- */

/* This attempt could not be finished (job_chargeable): one more on the
 * message's poison count before it is nacked, so that a message whose
 * retry or dead letter no queue takes ends in mail.dead after the limit
 * instead of coming round for ever. Waited for: the redelivery reads the
 * count. */
static void job_on_charged(void *arg, int ok, long long count)
{
    job_t *j = arg;
    job_blame(j);
    j->ledger_op = 0;
    if (!ok)
        job_ledger_unavailable(j, "poison_charge");
    else
        log_info("job", "poison_charged", "%s count=%lld limit=%u reason=publish_failed", JOB_MSG(j), count,
                 j->ctx->env->retry.poison_redeliveries);
    job_next(j);
}

static void job_enter_charge(job_t *j)
{
    j->ledger_op = ledger_poison_charge(j->ctx->svc.ledger, j->msg->id, job_on_charged, j);
}

/* ---- DONE ---- */

static void job_enter_done(job_t *j)
{
    /* nothing published failed (a lost connection fails them all) */
    int ack = !j->broker_lost && !j->confirm_failed;
    if (job_broker_open(j)) {
        if (ack)
            mq_ack(j->ctx->mq, j->dv->tag);
        else
            mq_nack(j->ctx->mq, j->dv->tag, 1);
    }
    if (ack)
        metrics_inc(MET_MESSAGES_DONE, 1);
    log_info("job", "message_done", "%s ack=%d rcpts=%zu ms=%llu", JOB_MSG(j), ack, j->nrcpts,
             (unsigned long long)(util_mono_ms() - j->started_ms));
    j->end(j->end_arg, j); /* may free the job */
    crash_blame_clear();
}

/* ---- the job ---- */

job_t *job_new(job_ctx_t *ctx, mq_delivery_t *dv, job_end_cb end, void *arg)
{
    job_t *j = xcalloc(1, sizeof(*j));
    j->ctx = ctx;
    j->dv = dv;
    j->end = end;
    j->end_arg = arg;
    j->started_ms = util_mono_ms();
    j->started_wall_ms = util_wall_ms();
    loop_timer_init(&j->ledger_timer, job_on_ledger_timer, j);
    buf_init(&j->raw);
    buf_init(&j->wire_copy);
    return j;
}

void job_run(job_t *j)
{
    j->state = JOB_INTAKE;
    job_states[JOB_INTAKE].enter(j);
    crash_blame_clear(); /* the caller's code is no message's */
}

int job_survives_loss(const job_t *j)
{
    return j->smtp_started && !j->append_tried;
}

void job_free(job_t *j)
{
    ledger_t *ledger = j->ctx->svc.ledger;
    envelope_free(&j->envelope);
    htable_fini(&j->domain_index);
    for (size_t i = 0; i < j->ndomains; i++) {
        domain_free(j->domains[i].leg);
        free(j->domains[i].rcpts);
        free(j->domains[i].idx);
        free(j->domains[i].flagged);
        free(j->domains[i].name);
    }
    imap_append_free(j->append);
    if (j->ledger_op)
        ledger_cancel(ledger, j->ledger_op);
    loop_timer_cancel(j->ctx->svc.loop, &j->ledger_timer);
    free(j->domains);
    for (size_t i = 0; i < j->nrcpts; i++) {
        rcpt_set_egress(&j->rcpts[i], NULL, NULL, NULL);
        free(j->rcpts[i].sup_list);
        free(j->rcpts[i].sup);
    }
    free(j->rcpts);
    for (size_t i = 0; i < j->nhist; i++)
        free(j->hist[i]);
    free(j->hist);
    free(j->wire);
    buf_free(&j->wire_copy);
    buf_free(&j->raw);
    message_free(j->msg);
    mq_delivery_free(j->dv);
    free(j);
}

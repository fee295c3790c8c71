/*
 * SUMMARY
 *  deliverer/domain.c - one domain leg of a message: MX, rate limit,
 *  SMTP, fast retries, the ledger's "sending" mark.
 * DESCRIPTION
 *  The leg is a small state machine (enum leg_state). Each asynchronous
 *  step (DNS answer, rate-limit answer, timer, SMTP result) lands in one
 *  handler that checks the state it expects and moves on with
 *  leg_enter(); every transition is traced at debug as "from -> to".
 *  One timer serves the three waits a leg can have: the slot of a rate
 *  limit, the pause before a fast retry, and the zero-delay report that
 *  keeps the done callback out of domain_start().
 *
 *  The "sending" mark: a transaction that has its 354 holds its body
 *  (deliver.h before_body) until the ledger has recorded the recipients
 *  the server accepted. From the final dot on, the server may take the
 *  message without our hearing of it (RFC 1047); a redelivery must then
 *  flag them. Before the dot nothing can have been delivered, so nothing
 *  needs marking. A Redis that cannot answer never holds the body back.
 * DIAGNOSTICS
 *  Log lines fast_retry and rate_limited (info when deferred, debug when
 *  waited for); metrics for DNS queries, SMTP sessions, TLS handshakes
 *  and rate-limit waits and deferrals.
 */
#include "deliverer/domain.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/crash.h"
#include "core/log.h"
#include "core/util.h"
#include "deliverer/retry.h"
#include "metrics/metrics.h"

enum leg_state {
    LEG_MX = 0,    /* the MX query is in flight */
    LEG_THROTTLE,  /* the fleet's rate limit is asked of Redis */
    LEG_SLOT_WAIT, /* a rate-limit slot is taken; the timer runs to it */
    LEG_SMTP,      /* the delivery attempt runs */
    LEG_FAST_WAIT, /* a network failure; the timer runs to the fast retry */
    LEG_REPORT,    /* the result is set; a zero-delay timer reports it */
    LEG_DONE,      /* reported */
    LEG_STATE_LAST
};

static const char *const leg_state_names[LEG_STATE_LAST] = {
    [LEG_MX] = "mx", [LEG_THROTTLE] = "throttle", [LEG_SLOT_WAIT] = "slot_wait", [LEG_SMTP] = "smtp",
    [LEG_FAST_WAIT] = "fast_wait", [LEG_REPORT] = "report", [LEG_DONE] = "done",
};

struct domain_leg {
    const domain_services_t *svc;
    domain_request_t         req;
    enum leg_state           state;
    uint64_t                 dns_id;
    deliver_candidate_t     *cand;   /* from DNS, kept for fast retries */
    size_t                   ncand;
    throttle_ask_t           ask;
    loop_timer_t             timer;
    deliver_t               *dl;
    uint64_t                 mark_op; /* ledger "sending" of the held transaction, 0 if none */
    uint64_t                 hold;    /* its deliver hold id */
    unsigned                 fast_tries;
    int                      smtp_started;
    domain_rcpt_result_t    *res;
    char                     mx_host[256];
    char                     mx_addr[64];
    char                     tls_version[32];
    char                     tls_cipher[96];
    uint64_t                 throttle_wait_ms;
};

/* The message fields of a leg's log lines. */
#define LEG_MSG(leg) LOG_MSG((leg)->req.msg_id, (leg)->req.trace_id)

static void leg_throttle(domain_leg_t *leg);
static void leg_smtp(domain_leg_t *leg);

static void leg_set_state(domain_leg_t *leg, enum leg_state st)
{
    if (st == leg->state)
        return; /* a relay leg starts at THROTTLE */
    log_debug("domain", "state", "%s domain=%s from=%s to=%s", LEG_MSG(leg), LOG_Q(leg->req.name),
              leg_state_names[leg->state], leg_state_names[st]);
    leg->state = st;
}

/* Every recipient of the leg ends alike, without a server's answer. */
static void leg_fail(domain_leg_t *leg, outcome_t o, outcome_reason_t reason, const char *text)
{
    for (size_t i = 0; i < leg->req.nrcpts; i++) {
        domain_rcpt_result_t *r = &leg->res[i];
        r->outcome = o;
        r->reason = reason;
        r->code = 0;
        r->enh[0] = '\0';
        snprintf(r->text, sizeof(r->text), "%s", text);
    }
    leg_set_state(leg, LEG_REPORT);
    loop_timer_set(leg->svc->loop, &leg->timer, 0);
}

static void leg_report(domain_leg_t *leg)
{
    leg_set_state(leg, LEG_DONE);
    domain_result_t out = {
        .rcpts = leg->res,
        .nrcpts = leg->req.nrcpts,
        .mx_host = leg->mx_host,
        .mx_addr = leg->mx_addr,
        .tls_version = leg->tls_version,
        .tls_cipher = leg->tls_cipher,
        .throttle_wait_ms = leg->throttle_wait_ms,
    };
    leg->req.done(leg->req.arg, &out); /* may free the leg */
}

static void leg_on_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    switch (leg->state) {
    case LEG_SLOT_WAIT: leg_smtp(leg); break;
    case LEG_FAST_WAIT: leg_throttle(leg); break; /* another transaction: another slot */
    case LEG_REPORT: leg_report(leg); break;
    default: break;
    }
}

/* ---- MX ---- */

static void leg_on_mx(void *arg, const dns_mx_result_t *mx)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    leg->dns_id = 0;
    if (mx->status != DNS_OK) {
        char text[256];
        snprintf(text, sizeof(text), "%s: %s", leg->req.name, dns_strerror(mx->status));
        leg_fail(leg, dns_status_is_permanent(mx->status) ? OUTCOME_PERMANENT : OUTCOME_TRANSIENT,
                 OUTCOME_R_DNS, text);
        return;
    }
    leg->cand = deliver_candidates_from_mx(mx, leg->svc->dcfg->max_mx, &leg->ncand);
    leg_throttle(leg);
}

/* ---- rate limit ---- */

/* SMTP after the rate limit said wait (ms): at once, after a wait for its
 * slot, or, when the slot is further away than rate_limit_max_wait, the
 * leg ends deferred no sooner than it (the job's retry spends no attempt
 * on it). */
static void leg_on_throttle(void *arg, const throttle_answer_t *ans)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    int64_t wait = ans->wait_ms;
    if (ans->local_fallback)
        log_debug("domain", "rate_limit_local", "%s domain=%s rule=%s budget=local", LEG_MSG(leg),
                  LOG_Q(leg->req.name), LOG_Q(ans->rule));
    if (wait <= 0) {
        leg_smtp(leg);
        return;
    }
    if ((uint64_t)wait > leg->svc->rate_limit_max_wait_ms) {
        char text[256];
        snprintf(text, sizeof(text), "local rate limit %s: next free slot in %llu s", ans->rule,
                 (unsigned long long)((wait + 999) / 1000));
        leg->throttle_wait_ms = (uint64_t)wait;
        metrics_inc(MET_RATE_LIMIT_DEFERRED, 1);
        log_info("domain", "rate_limited", "%s domain=%s rule=%s wait_ms=%lld deferred=1", LEG_MSG(leg),
                 LOG_Q(leg->req.name), LOG_Q(ans->rule), (long long)wait);
        leg_fail(leg, OUTCOME_TRANSIENT, OUTCOME_R_RATE_LIMITED, text);
        return;
    }
    metrics_inc(MET_RATE_LIMIT_WAITS, 1);
    log_debug("domain", "rate_limited", "%s domain=%s rule=%s wait_ms=%lld", LEG_MSG(leg), LOG_Q(leg->req.name),
              LOG_Q(ans->rule), (long long)wait);
    leg_set_state(leg, LEG_SLOT_WAIT);
    loop_timer_set(leg->svc->loop, &leg->timer, (uint64_t)wait);
}

static void leg_throttle(domain_leg_t *leg)
{
    throttle_answer_t now;
    leg_set_state(leg, LEG_THROTTLE);
    if (throttle_ask_start(&leg->ask, leg->svc->throttle, leg->svc->redis, leg->req.name,
                           leg->svc->rate_limit_max_wait_ms, leg_on_throttle, leg, &now))
        leg_on_throttle(leg, &now);
}

/* ---- SMTP ---- */

/* A session-level network failure or timeout for every recipient: no
 * server decided anything, so this is jitter worth a quick retry. */
static int leg_worth_fast_retry(const deliver_result_t *res)
{
    if (res->nrcpts == 0)
        return 0;
    for (size_t i = 0; i < res->nrcpts; i++) {
        const deliver_rcpt_result_t *r = &res->rcpts[i];
        if (r->outcome != OUTCOME_TRANSIENT || r->code != 0 ||
            (r->reason != OUTCOME_R_NETWORK && r->reason != OUTCOME_R_TIMEOUT))
            return 0;
    }
    return 1;
}

static void leg_on_delivered(void *arg, const deliver_result_t *res)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    if (leg->state != LEG_SMTP)
        return; /* cannot happen: deliver reports once, and only while the leg waits for it */
    leg->dl = NULL;
    if (leg->mark_op) {
        /* a transaction ended while held (timeout, lost connection): its
         * mark still lands in Redis, before the marks the job sends on the
         * same connection; only the resume is void now */
        ledger_cancel(leg->svc->ledger, leg->mark_op);
        leg->mark_op = 0;
    }
    /* cut between the final dot and its reply: whichever transaction
     * delivers these recipients later (a fast retry, a retry level) may
     * be a second copy */
    for (size_t i = 0; i < res->nrcpts && i < leg->req.nrcpts; i++)
        if (res->rcpts[i].maybe_sent && leg->req.cut)
            leg->req.cut(leg->req.arg, i);
    metrics_inc(MET_SMTP_SESSIONS, res->connections); /* new connections, not pooled reuses */
    metrics_inc(MET_SMTP_SESSIONS_REUSED, res->reused);
    metrics_inc(MET_TLS_FULL_HANDSHAKES, res->tls_full);
    metrics_inc(MET_TLS_RESUMED_HANDSHAKES, res->tls_resumed);
    if (leg_worth_fast_retry(res) && leg->fast_tries < leg->req.fast_retries) {
        uint64_t ms = retry_fast_delay_ms(leg->req.fast_base_ms, leg->fast_tries, util_rand01());
        leg->fast_tries++;
        log_info("domain", "fast_retry", "%s domain=%s try=%u delay_ms=%llu reason=%s", LEG_MSG(leg),
                 LOG_Q(leg->req.name), leg->fast_tries, (unsigned long long)ms, LOG_Q(res->rcpts[0].text));
        leg_set_state(leg, LEG_FAST_WAIT);
        loop_timer_set(leg->svc->loop, &leg->timer, ms);
        return;
    }
    snprintf(leg->mx_host, sizeof(leg->mx_host), "%s", res->mx_host);
    snprintf(leg->mx_addr, sizeof(leg->mx_addr), "%s", res->mx_addr);
    snprintf(leg->tls_version, sizeof(leg->tls_version), "%s", res->tls_version ? res->tls_version : "");
    snprintf(leg->tls_cipher, sizeof(leg->tls_cipher), "%s", res->tls_cipher ? res->tls_cipher : "");
    /* results come back in request order */
    for (size_t i = 0; i < res->nrcpts && i < leg->req.nrcpts; i++) {
        const deliver_rcpt_result_t *rr = &res->rcpts[i];
        domain_rcpt_result_t *r = &leg->res[i];
        r->outcome = rr->outcome;
        r->reason = rr->reason;
        r->code = rr->code;
        snprintf(r->enh, sizeof(r->enh), "%s", rr->enh);
        snprintf(r->text, sizeof(r->text), "%s", rr->text);
    }
    leg_report(leg);
}

static void leg_on_sending_marked(void *arg, int ok)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    leg->mark_op = 0;
    if (!ok) {
        /* the body goes all the same: at-least-once, and operators see it */
        metrics_inc(MET_LEDGER_UNAVAILABLE, 1);
        log_warn("domain", "ledger_unavailable", "%s step=mark_sending delivery=at_least_once", LEG_MSG(leg));
    }
    deliver_resume(leg->dl, leg->hold);
}

static void leg_on_before_body(void *arg, deliver_t *dl, uint64_t hold, const char *const *accepted, size_t n)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    if (leg->mark_op)
        ledger_cancel(leg->svc->ledger, leg->mark_op); /* of a transaction that ended while held */
    leg->hold = hold;
    leg->mark_op = ledger_mark(leg->svc->ledger, leg->req.msg_id, accepted, n, LEDGER_SENDING,
                               leg_on_sending_marked, leg);
}

static void leg_smtp(domain_leg_t *leg)
{
    const domain_request_t *rq = &leg->req;
    const char *why = NULL;
    if (rq->gate && !rq->gate(rq->arg, &why)) {
        leg_fail(leg, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, why ? why : "not started");
        return;
    }
    leg->smtp_started = 1;
    leg_set_state(leg, LEG_SMTP);
    const deliver_config_t *dcfg = leg->svc->dcfg;
    deliver_request_t dr = {
        .mail_from = rq->mail_from,
        .rcpts = rq->rcpts,
        .nrcpts = rq->nrcpts,
        .data = rq->data,
        .len = rq->len,
        .segs = rq->segs,
        .nsegs = rq->nsegs,
        .message_size = rq->message_size,
        /* relay mode: the smarthost replaces MX (deliver knows it) */
        .candidates = dcfg->nrelay > 0 ? NULL : leg->cand,
        .ncandidates = dcfg->nrelay > 0 ? 0 : leg->ncand,
        .log_id = rq->msg_id,
        .trace_id = rq->trace_id,
        .domain = rq->name,
        .need = rq->need,
        /* without a ledger there is nothing to record: no hold at all */
        .before_body = leg->svc->ledger ? leg_on_before_body : NULL,
        .before_body_arg = leg,
    };
    leg->dl = deliver_ctx_start(leg->svc->dctx, &dr, leg_on_delivered, leg);
    if (leg->dl == NULL)
        leg_fail(leg, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, "cannot start SMTP delivery");
}

/* ---- the leg ---- */

domain_leg_t *domain_start(const domain_services_t *svc, const domain_request_t *req)
{
    domain_leg_t *leg = xcalloc(1, sizeof(*leg));
    leg->svc = svc;
    leg->req = *req;
    leg->res = xcalloc(req->nrcpts ? req->nrcpts : 1, sizeof(*leg->res));
    loop_timer_init(&leg->timer, leg_on_timer, leg);
    for (size_t i = 0; i < req->nrcpts; i++) { /* what a result the leg never got says */
        leg->res[i].outcome = OUTCOME_TRANSIENT;
        leg->res[i].reason = OUTCOME_R_OTHER;
        snprintf(leg->res[i].text, sizeof(leg->res[i].text), "no result");
    }
    if (svc->dcfg->nrelay > 0) { /* relay mode: no MX lookup */
        leg->state = LEG_THROTTLE;
        leg_throttle(leg);
        return leg;
    }
    leg->state = LEG_MX;
    metrics_inc(MET_DNS_QUERIES, 1);
    leg->dns_id = dns_mx_query(svc->dns, req->name, leg_on_mx, leg);
    if (leg->dns_id == 0)
        abort(); /* only when out of memory: the core's policy */
    return leg;
}

int domain_smtp_started(const domain_leg_t *leg)
{
    return leg->smtp_started;
}

void domain_free(domain_leg_t *leg)
{
    if (leg == NULL)
        return;
    const domain_services_t *svc = leg->svc;
    if (leg->dns_id && svc->dns)
        dns_cancel(svc->dns, leg->dns_id);
    throttle_ask_cancel(&leg->ask);
    if (leg->dl)
        deliver_cancel(leg->dl);
    if (leg->mark_op)
        ledger_cancel(svc->ledger, leg->mark_op);
    loop_timer_cancel(svc->loop, &leg->timer);
    free(leg->cand);
    free(leg->res);
    free(leg);
}

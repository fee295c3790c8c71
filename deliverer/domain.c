/*
 * SUMMARY
 *  deliverer/domain.c - one domain leg of a message: MX, its site's
 *  place, rate limit, SMTP, fast retries, the ledger's records of each
 *  transaction.
 * DESCRIPTION
 *  The leg is a small state machine (enum leg_state). Each asynchronous
 *  step (DNS answer, rate-limit answer, timer, SMTP result) lands in one
 *  handler that checks the state it expects and moves on with
 *  leg_enter(); every transition is traced at debug as "from -> to".
 *  One timer serves the three waits a leg can have: the slot of a rate
 *  limit, the pause before a fast retry, and the zero-delay report that
 *  keeps the done callback out of domain_start().
 *
 *  Before its rate limit and SMTP (and again before each fast retry) the
 *  leg takes a place in its site (sites.h): at once, after a wait in the
 *  site's FIFO, or not at all, when the site is busy with others of this
 *  worker waiting already; then the leg ends parked (no attempt spent).
 *  The place is given back when the SMTP attempt ends.
 *
 *  The ledger (ledger.h), per transaction. One that has its 354 sends
 *  its body at once but holds the final dot (deliver.h before_body)
 *  until the ledger has recorded the recipients the server accepted as
 *  "sending": from the dot on, the server may take the message without
 *  our hearing of it (RFC 1047), and a redelivery must then flag them.
 *  Before the dot nothing can have been delivered, so nothing is marked
 *  earlier. A mark Redis cannot record is tried again until mark_wait
 *  is spent; then the transaction is abandoned before its dot (the
 *  connection closed, the server discards it) and its recipients are
 *  deferred as ledger_unavailable, unless send_unrecorded lets the dot
 *  go unrecorded. As soon as a held transaction is over (deliver.h
 *  after_txn) the leg records what became of its recipients, without
 *  waiting for the rest of the leg or the message: "done" for a 2xx
 *  ("done-dup" when the copy may be a second one: the job flagged the
 *  recipient, or an earlier transaction of the leg was cut after its
 *  dot), nothing (the mark deleted) for one not sent, and the mark kept
 *  for one cut after its dot. The leg reports only once those writes are
 *  answered, so that what it reports is what the ledger holds.
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
#include "deliverer/actions.h"
#include "deliverer/policy.h"
#include "deliverer/retry.h"
#include "deliverer/warmup.h"
#include "deliverer/wrr.h"
#include "metrics/metrics.h"

enum leg_state {
    LEG_MX = 0,    /* the MX query is in flight */
    LEG_SITE,      /* waiting for a place in the site */
    LEG_THROTTLE,  /* the fleet's rate limit is asked of Redis */
    LEG_SLOT_WAIT, /* a rate-limit slot is taken; the timer runs to it */
    LEG_SMTP,      /* the delivery attempt runs */
    LEG_FAST_WAIT, /* a network failure; the timer runs to the fast retry */
    LEG_RECORD,    /* the result is set; the ledger's answers to its writes are awaited */
    LEG_REPORT,    /* the result is set; a zero-delay timer reports it */
    LEG_DONE,      /* reported */
    LEG_STATE_LAST
};

static const char *const leg_state_names[LEG_STATE_LAST] = {
    [LEG_MX] = "mx", [LEG_SITE] = "site", [LEG_THROTTLE] = "throttle", [LEG_SLOT_WAIT] = "slot_wait", [LEG_SMTP] = "smtp",
    [LEG_FAST_WAIT] = "fast_wait", [LEG_RECORD] = "record", [LEG_REPORT] = "report", [LEG_DONE] = "done",
};

struct domain_leg {
    const domain_services_t *svc;
    domain_request_t         req;
    enum leg_state           state;
    uint64_t                 dns_id;
    deliver_candidate_t     *cand;   /* from DNS, kept for fast retries */
    size_t                   ncand;
    throttle_ask_t           ask;
    site_slot_t              slot;
    char                     site[256];
    /* egress and shaping (leg_route): the source, the key of the
     * connection limit and the rate budget, what the events say */
    const egress_pool_t     *pool;     /* NULL: no egress pool, the host's address */
    const egress_source_t   *src;      /* the source chosen from it */
    deliver_source_t         dsrc;
    shaping_params_t         shape;
    char                     key[340]; /* destination[@source] */
    unsigned                 conn_limit; /* SITES_LIMIT_CONFIG, or what shaping says */
    int                      conn_strict; /* an explicit limit: idle sessions count against it */
    double                   rate_iv;  /* > 0: shaping's spacing (ms), budget rate_rule */
    char                     rate_rule[400];
    char                     shaping[256]; /* for the events, "" none */
    int                      triggered; /* an automation rule fired on this leg's replies */
    loop_timer_t             timer;
    deliver_t               *dl;
    uint64_t                 mark_op; /* ledger "sending" of the held transaction, 0 if none */
    uint64_t                 hold;    /* its deliver hold id, 0 if none */
    size_t                  *held;    /* its recipients (request positions) */
    size_t                   nheld;
    uint64_t                 mark_deadline_ms; /* its dot waits for the mark until then */
    unsigned                 mark_tries;
    unsigned char           *flag;     /* per recipient: a delivery now may be a second copy */
    unsigned char           *not_sent; /* per recipient: in a transaction abandoned for want of its mark */
    struct leg_write       **writes;   /* ledger writes of ended transactions */
    size_t                   nwrites, writes_cap;
    size_t                   writes_left; /* not answered yet */
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
#define LEG_MSG(leg) \
    ((leg)->req.log ? LOG_MSGCTX((leg)->req.log) : LOG_MSG((leg)->req.msg_id, (leg)->req.trace_id))

static void leg_site(domain_leg_t *leg);
static void leg_route(domain_leg_t *leg);
static void leg_park(domain_leg_t *leg, const char *why);
static void leg_throttle(domain_leg_t *leg);
static void leg_smtp(domain_leg_t *leg);
static void leg_mark_sending(domain_leg_t *leg);

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
        snprintf(r->text, sizeof(r->text), "%.*s", (int)sizeof(r->text) - 1, text); /* cut to fit */
    }
    leg_set_state(leg, LEG_REPORT);
    loop_timer_set(leg->svc->loop, &leg->timer, 0);
}

static void leg_report(domain_leg_t *leg)
{
    if (leg->writes_left > 0) {
        leg_set_state(leg, LEG_RECORD); /* leg_on_written reports */
        return;
    }
    leg_set_state(leg, LEG_DONE);
    for (size_t i = 0; i < leg->req.nrcpts; i++) {
        leg->res[i].source = leg->src ? leg->src->name : NULL;
        leg->res[i].source_addr = leg->src ? leg->src->addr_text : NULL;
        leg->res[i].shaping = leg->shaping[0] ? leg->shaping : NULL;
    }
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
    case LEG_SMTP: leg_mark_sending(leg); break; /* the held dot's mark, again */
    case LEG_SLOT_WAIT: leg_smtp(leg); break;
    case LEG_FAST_WAIT: leg_site(leg); break; /* another transaction: another place and slot */
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
    sites_name(leg->ncand > 0 ? leg->cand[0].host : leg->req.name, leg->site, sizeof(leg->site));
    leg_route(leg);
}

/* ---- egress source and shaping ---- */

static void leg_query(const domain_leg_t *leg, action_query_t *q)
{
    *q = (action_query_t){ .domain = leg->req.name, .site = leg->site,
                           .source = leg->src ? leg->src->name : NULL,
                           .pool = leg->pool ? leg->pool->name : NULL,
                           .tenant = leg->req.tenant, .campaign = leg->req.campaign };
}

#define DOMAIN_ADMIN_RECHECK_MS 60000u /* the longest retry delay an operator's suspend asks for */

/* An action in force holds the leg: a suspended destination's recipients
 * are deferred without an attempt, no sooner than the action ends; a
 * bounced one's end permanent (reason admin when an operator's action,
 * origin "admin:<who>", bounced them, with who and why in the text). */
static void leg_held(domain_leg_t *leg, const action_t *a)
{
    char text[700];
    uint64_t now = util_wall_ms();
    uint64_t left = a->expires_ms > now ? a->expires_ms - now : 0;
    int admin = strncmp(a->origin, "admin:", 6) == 0;
    snprintf(leg->shaping, sizeof(leg->shaping), "%s:%s", action_kind_name(a->kind), a->origin);
    if (a->kind == ACTION_BOUNCE) {
        if (admin)
            snprintf(text, sizeof(text), "bounced by %s: %s (action %s)", a->origin, a->reason, a->id);
        else
            snprintf(text, sizeof(text), "bounced by shaping action %s (%s): %s", a->id, a->origin, a->reason);
        metrics_inc(MET_SHAPING_BOUNCED, leg->req.nrcpts);
        log_info("domain", "shaping_bounced", "%s domain=%s site=%s action=%s origin=%s", LEG_MSG(leg),
                 LOG_Q(leg->req.name), LOG_Q(leg->site), LOG_Q(a->id), LOG_Q(a->origin));
        leg_fail(leg, OUTCOME_PERMANENT, admin ? OUTCOME_R_ADMIN : OUTCOME_R_SHAPING, text);
        return;
    }
    if (admin)
        snprintf(text, sizeof(text), "suspended by %s for %llu s more: %s (action %s)", a->origin,
                 (unsigned long long)((left + 999) / 1000), a->reason, a->id);
    else
        snprintf(text, sizeof(text), "suspended by shaping action %s for %llu s more (%s): %s", a->id,
                 (unsigned long long)((left + 999) / 1000), a->origin, a->reason);
    /* the retry comes no sooner; an operator's suspend usually ends by a
     * resume, so its messages come back to look at least every
     * DOMAIN_ADMIN_RECHECK_MS (docs/operations.md) */
    leg->throttle_wait_ms = admin && left > DOMAIN_ADMIN_RECHECK_MS ? DOMAIN_ADMIN_RECHECK_MS : left;
    metrics_inc(MET_SHAPING_SUSPENDED, leg->req.nrcpts);
    log_info("domain", "suspended", "%s domain=%s site=%s source=%s action=%s left_ms=%llu", LEG_MSG(leg),
             LOG_Q(leg->req.name), LOG_Q(leg->site), LOG_Q(leg->src ? leg->src->name : ""), LOG_Q(a->id),
             (unsigned long long)left);
    leg_fail(leg, OUTCOME_TRANSIENT, OUTCOME_R_SUSPENDED, text);
}

/* The source for this leg: weighted round robin over the pool's sources
 * that no action suspends, per pool and site. -1 when none is left; *held
 * then names an action that suspends one. */
static int leg_pick_source(domain_leg_t *leg, const action_t **held)
{
    const egress_pool_t *pool = leg->pool;
    unsigned char *ok = xcalloc(pool->n, 1);
    action_query_t q;
    leg_query(leg, &q);
    *held = NULL;
    uint64_t now = util_wall_ms();
    for (size_t i = 0; i < pool->n; i++) {
        q.source = pool->sources[i]->name;
        const action_t *a = leg->svc->actions ? actions_find(leg->svc->actions, ACTION_SUSPEND, &q) : NULL;
        if (a != NULL) {
            if (*held == NULL)
                *held = a;
            continue;
        }
        if (leg->svc->warmup && !warmup_allows(leg->svc->warmup, pool->sources[i], leg->site, now))
            continue; /* at its warm-up volume for the site today */
        ok[i] = 1;
    }
    char key[400];
    snprintf(key, sizeof(key), "%s/%s", pool->name, leg->site);
    int k = wrr_pick(leg->svc->wrr, key, pool->weights, ok, pool->n);
    free(ok);
    if (k >= 0 && leg->svc->warmup)
        warmup_count(leg->svc->warmup, pool->sources[k], leg->site, now);
    return k;
}

/* After the MX lookup (or at once in relay mode): the source, the actions
 * in force and the shaping rules decide the key the leg's connection
 * limit and rate budget are kept under, and their values. */
static void leg_route(domain_leg_t *leg)
{
    const domain_services_t *svc = leg->svc;
    const policy_t *p = svc->policy;
    int unknown = 0;
    leg->pool = p ? policy_pool_for(p, leg->req.pool, leg->req.tenant, &unknown) : NULL;
    if (leg->pool != NULL && leg->pool->n > 0) {
        const action_t *held = NULL;
        int k = leg_pick_source(leg, &held);
        if (k < 0 && held != NULL) {
            leg_held(leg, held);
            return;
        }
        if (k < 0) {
            char why[600];
            snprintf(why, sizeof(why), "parked: every source of pool %s has sent its warm-up volume to site %s today",
                     leg->pool->name, leg->site);
            leg_park(leg, why);
            return;
        }
        leg->src = leg->pool->sources[k];
        leg->dsrc = (deliver_source_t){ .name = leg->src->name, .addr = (const struct sockaddr *)&leg->src->addr,
                                        .addrlen = leg->src->addrlen, .addr_text = leg->src->addr_text,
                                        .helo = leg->src->ehlo };
    }
    action_query_t q;
    leg_query(leg, &q);
    const action_t *a = NULL;
    if (svc->actions && ((a = actions_find(svc->actions, ACTION_BOUNCE, &q)) != NULL ||
                         (a = actions_find(svc->actions, ACTION_SUSPEND, &q)) != NULL)) {
        leg_held(leg, a);
        return;
    }
    policy_shaping(p, leg->req.name, leg->site, leg->pool ? leg->pool->name : NULL, leg->src ? leg->src->name : NULL,
                   &leg->shape);
    /* limits are per destination and source: receivers count per address */
    const char *dest = strstr(leg->shape.rule, "domain:") != NULL ? leg->req.name : leg->site;
    snprintf(leg->key, sizeof(leg->key), "%s%s%s", dest, leg->src ? "@" : "", leg->src ? leg->src->name : "");
    unsigned lim = leg->shape.connection_limit;
    int strict = lim != 0 || (svc->sites && sites_limit_named(svc->sites, leg->site));
    if (lim == 0)
        lim = leg->src || dest != leg->site ? (svc->sites ? sites_limit(svc->sites, leg->site) : 0)
                                            : SITES_LIMIT_CONFIG;
    if (leg->shape.rule[0])
        snprintf(leg->shaping, sizeof(leg->shaping), "rule:%s", leg->shape.rule);
    if (svc->actions && (a = actions_find(svc->actions, ACTION_CONNECTIONS, &q)) != NULL) {
        unsigned base = lim == SITES_LIMIT_CONFIG ? (svc->sites ? sites_limit(svc->sites, leg->site) : 0) : lim;
        if (base == 0 || a->connections < base) {
            lim = a->connections;
            strict = 1;
            snprintf(leg->shaping, sizeof(leg->shaping), "%s:%s", action_kind_name(a->kind), a->origin);
        }
    }
    leg->conn_limit = lim;
    leg->conn_strict = strict;
    leg->rate_iv = 0;
    if (leg->shape.rate_per_s > 0) {
        leg->rate_iv = 1000.0 / leg->shape.rate_per_s;
        snprintf(leg->rate_rule, sizeof(leg->rate_rule), "%s:%s", leg->key, leg->shape.rate_text);
    }
    if (svc->actions && (a = actions_find(svc->actions, ACTION_RATE, &q)) != NULL &&
        (leg->rate_iv == 0 || 1000.0 / a->rate_per_s > leg->rate_iv)) {
        leg->rate_iv = 1000.0 / a->rate_per_s;
        snprintf(leg->rate_rule, sizeof(leg->rate_rule), "%s:%s", leg->key, a->rate_text);
        snprintf(leg->shaping, sizeof(leg->shaping), "%s:%s", action_kind_name(a->kind), a->origin);
    }
    leg_site(leg);
}

/* A reply an automation rule matches starts its action for this site (or
 * domain) and source, fleet-wide; once per leg. */
static void leg_automation(domain_leg_t *leg, const domain_rcpt_result_t *r)
{
    const domain_services_t *svc = leg->svc;
    if (leg->triggered || svc->actions == NULL || svc->policy == NULL || r->code < 400)
        return;
    const char *src = leg->src ? leg->src->name : NULL;
    const automation_rule_t *rule = policy_match_reply(svc->policy, leg->req.name, leg->site, src, r->code, r->enh,
                                                       r->text);
    if (rule == NULL)
        return;
    leg->triggered = 1;
    action_t a;
    memset(&a, 0, sizeof(a));
    switch (rule->action) {
    case POLICY_ACT_SUSPEND: a.kind = ACTION_SUSPEND; break;
    case POLICY_ACT_BOUNCE: a.kind = ACTION_BOUNCE; break;
    case POLICY_ACT_RATE:
        a.kind = ACTION_RATE;
        a.rate_per_s = rule->rate_per_s;
        snprintf(a.rate_text, sizeof(a.rate_text), "%s", rule->rate_text);
        break;
    case POLICY_ACT_CONNECTIONS:
        a.kind = ACTION_CONNECTIONS;
        a.connections = rule->connections;
        break;
    }
    a.sel = rule->domain ? SEL_DOMAIN : SEL_SITE;
    snprintf(a.value, sizeof(a.value), "%s", rule->domain ? leg->req.name : leg->site);
    snprintf(a.source, sizeof(a.source), "%s", src ? src : "");
    a.expires_ms = util_wall_ms() + rule->duration_ms;
    snprintf(a.reason, sizeof(a.reason), "%d%s%.15s %.200s", r->code, r->enh[0] ? " " : "", r->enh, r->text);
    snprintf(a.origin, sizeof(a.origin), "automation:%s", rule->name);
    if (actions_add(svc->actions, &a) == 0)
        snprintf(leg->shaping, sizeof(leg->shaping), "triggered:%s:%s", action_kind_name(a.kind), a.origin);
}

/* ---- the site's place ---- */

static void leg_park(domain_leg_t *leg, const char *why)
{
    metrics_inc(MET_SITE_PARKED, 1);
    log_info("domain", "parked", "%s domain=%s site=%s", LEG_MSG(leg), LOG_Q(leg->req.name), LOG_Q(leg->site));
    leg_fail(leg, OUTCOME_TRANSIENT, OUTCOME_R_PARKED, why);
}

static void leg_on_site(void *arg, int how, const char *why)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    if (leg->state != LEG_SITE)
        return; /* cannot happen: the wait is withdrawn when the leg moves on */
    if (how == SITE_GO)
        leg_throttle(leg);
    else
        leg_park(leg, why ? why : "parked");
}

static void leg_site(domain_leg_t *leg)
{
    const char *why = NULL;
    leg_set_state(leg, LEG_SITE);
    if (leg->svc->sites == NULL) {
        leg_throttle(leg);
        return;
    }
    switch (sites_enter_limit(leg->svc->sites, leg->key, leg->conn_limit, leg->conn_strict, &leg->slot, leg_on_site,
                              leg, &why)) {
    case SITE_GO: leg_throttle(leg); break;
    case SITE_WAIT: break; /* leg_on_site */
    default: leg_park(leg, why ? why : "parked"); break;
    }
}

static void leg_leave_site(domain_leg_t *leg)
{
    if (leg->svc->sites)
        sites_leave(leg->svc->sites, &leg->slot);
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
        leg_leave_site(leg);
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
    int ready;
    leg_set_state(leg, LEG_THROTTLE);
    if (leg->rate_iv > 0) /* shaping's rate, per destination and source */
        ready = throttle_ask_rate(&leg->ask, leg->svc->redis, leg->rate_rule, leg->rate_iv,
                                  leg->svc->rate_limit_max_wait_ms, leg_on_throttle, leg, &now);
    else
        ready = throttle_ask_start(&leg->ask, leg->svc->throttle, leg->svc->redis, leg->req.name,
                                   leg->svc->rate_limit_max_wait_ms, leg_on_throttle, leg, &now);
    if (ready)
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
    leg_leave_site(leg);
    /* cut between the final dot and its reply: whichever transaction
     * delivers these recipients later (a fast retry, a retry level) may
     * be a second copy */
    int abandoned = 0;
    for (size_t i = 0; i < res->nrcpts && i < leg->req.nrcpts; i++) {
        if (res->rcpts[i].maybe_sent) {
            leg->flag[i] = 1;
            if (leg->req.cut)
                leg->req.cut(leg->req.arg, i);
        }
        abandoned |= leg->not_sent[i];
    }
    metrics_inc(MET_SMTP_SESSIONS, res->connections); /* new connections, not pooled reuses */
    metrics_inc(MET_SMTP_SESSIONS_REUSED, res->reused);
    metrics_inc(MET_TLS_FULL_HANDSHAKES, res->tls_full);
    metrics_inc(MET_TLS_RESUMED_HANDSHAKES, res->tls_resumed);
    /* a transaction abandoned for want of its ledger mark is not worth a
     * fast retry: Redis was given mark_wait already */
    if (!abandoned && leg_worth_fast_retry(res) && leg->fast_tries < leg->req.fast_retries) {
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
        if (leg->not_sent[i] && r->outcome == OUTCOME_TRANSIENT && r->code == 0)
            r->reason = OUTCOME_R_LEDGER;
        if (r->outcome != OUTCOME_DELIVERED)
            leg_automation(leg, r);
    }
    leg_report(leg);
}

/* ---- the ledger, per transaction ---- */

#define LEG_NOT_SENT_TEXT "not sent: the ledger could not record this copy before its final dot (Redis unavailable)"

static void leg_on_sending_marked(void *arg, int ok)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    leg->mark_op = 0;
    if (ok) {
        deliver_resume(leg->dl, leg->hold);
        return;
    }
    uint64_t now = loop_now_ms(leg->svc->loop);
    if (now < leg->mark_deadline_ms) {
        /* Redis is slow or away: the dot waits and the mark is tried again */
        uint64_t ms = 50ull << (leg->mark_tries < 4 ? leg->mark_tries : 4);
        if (ms > leg->mark_deadline_ms - now)
            ms = leg->mark_deadline_ms - now;
        leg->mark_tries++;
        loop_timer_set(leg->svc->loop, &leg->timer, ms);
        return;
    }
    metrics_inc(MET_LEDGER_UNAVAILABLE, 1);
    if (leg->svc->send_unrecorded) {
        /* the operator chose at-least-once over waiting for Redis */
        log_warn("domain", "ledger_unavailable", "%s step=mark_sending tries=%u delivery=at_least_once", LEG_MSG(leg),
                 leg->mark_tries + 1);
        deliver_resume(leg->dl, leg->hold);
        return;
    }
    metrics_inc(MET_LEDGER_NOT_SENT, 1);
    log_warn("domain", "ledger_unavailable", "%s step=mark_sending tries=%u action=not_sent rcpts=%zu", LEG_MSG(leg),
             leg->mark_tries + 1, leg->nheld);
    for (size_t i = 0; i < leg->nheld; i++)
        leg->not_sent[leg->held[i]] = 1;
    deliver_abort(leg->dl, leg->hold, LEG_NOT_SENT_TEXT);
}

static void leg_mark_sending(domain_leg_t *leg)
{
    const char **r = xcalloc(leg->nheld ? leg->nheld : 1, sizeof(*r));
    for (size_t i = 0; i < leg->nheld; i++)
        r[i] = leg->req.rcpts[leg->held[i]];
    leg->mark_op = ledger_mark(leg->svc->ledger, leg->req.msg_id, r, leg->nheld, LEDGER_SENDING,
                               leg_on_sending_marked, leg);
    free(r);
}

static void leg_on_before_body(void *arg, deliver_t *dl, uint64_t hold, const size_t *accepted, size_t n)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    leg->hold = hold;
    leg->nheld = 0;
    for (size_t i = 0; i < n; i++)
        if (accepted[i] < leg->req.nrcpts)
            leg->held[leg->nheld++] = accepted[i];
    leg->mark_tries = 0;
    leg->mark_deadline_ms = loop_now_ms(leg->svc->loop) + leg->svc->mark_wait_ms;
    leg_mark_sending(leg);
}

/* One record of an ended transaction. A "done" that fails is sent again
 * (50 ms doubling) until mark_wait is spent: it is final, so no later
 * write of the leg can overtake it. A deleted mark is not: a failed
 * delete leaves the "sending" mark, which only makes a redelivery flag
 * the recipient, and a delete sent late could remove a newer mark. */
typedef struct leg_write {
    domain_leg_t  *leg;
    uint64_t       op;       /* in flight, 0 when answered */
    ledger_state_t st;
    const char   **rcpts;    /* the request's strings */
    size_t         n;
    unsigned       tries;
    uint64_t       deadline_ms;
    loop_timer_t   timer;
} leg_write_t;

static void leg_write_send(leg_write_t *w);

static void leg_write_again(loop_t *loop, loop_timer_t *t, void *arg)
{
    leg_write_t *w = arg;
    crash_blame_set(w->leg->req.msg_id);
    leg_write_send(w);
}

static void leg_on_written(void *arg, int ok)
{
    leg_write_t *w = arg;
    domain_leg_t *leg = w->leg;
    crash_blame_set(leg->req.msg_id);
    w->op = 0;
    if (!ok && w->st != LEDGER_NONE) {
        uint64_t now = loop_now_ms(leg->svc->loop);
        if (now < w->deadline_ms) {
            uint64_t ms = 50ull << (w->tries < 4 ? w->tries : 4);
            if (ms > w->deadline_ms - now)
                ms = w->deadline_ms - now;
            w->tries++;
            loop_timer_set(leg->svc->loop, &w->timer, ms);
            return;
        }
    }
    if (!ok) {
        /* a "done" lost: the "sending" mark stays, and a redelivery flags
         * the recipient instead of skipping it */
        metrics_inc(MET_LEDGER_UNAVAILABLE, 1);
        log_warn("domain", "ledger_unavailable", "%s step=record tries=%u delivery=at_least_once", LEG_MSG(leg),
                 w->tries + 1);
    }
    if (--leg->writes_left == 0 && leg->state == LEG_RECORD)
        leg_report(leg);
}

static void leg_write_send(leg_write_t *w)
{
    domain_leg_t *leg = w->leg;
    w->op = ledger_mark(leg->svc->ledger, leg->req.msg_id, w->rcpts, w->n, w->st, leg_on_written, w);
}

static void leg_write(domain_leg_t *leg, const char **rcpts, size_t n, ledger_state_t st)
{
    if (n == 0)
        return;
    if (leg->nwrites == leg->writes_cap) {
        leg->writes_cap = leg->writes_cap ? leg->writes_cap * 2 : 4;
        leg->writes = xrealloc(leg->writes, leg->writes_cap * sizeof(*leg->writes));
    }
    leg_write_t *w = xcalloc(1, sizeof(*w));
    w->leg = leg;
    w->st = st;
    w->rcpts = xcalloc(n, sizeof(*w->rcpts));
    memcpy(w->rcpts, rcpts, n * sizeof(*rcpts));
    w->n = n;
    w->deadline_ms = loop_now_ms(leg->svc->loop) + leg->svc->mark_wait_ms;
    loop_timer_init(&w->timer, leg_write_again, w);
    leg->writes[leg->nwrites++] = w;
    leg->writes_left++;
    leg_write_send(w);
}

/* A held transaction is over: record at once what became of its
 * recipients. Its mark, if still unanswered, is superseded (the writes
 * below follow it on the same connection). */
static void leg_on_txn_over(void *arg, deliver_t *dl, const size_t *accepted, const deliver_txn_state_t *st,
                            size_t n)
{
    domain_leg_t *leg = arg;
    crash_blame_set(leg->req.msg_id);
    if (leg->mark_op) {
        ledger_cancel(leg->svc->ledger, leg->mark_op);
        leg->mark_op = 0;
    }
    if (leg->state == LEG_SMTP)
        loop_timer_cancel(leg->svc->loop, &leg->timer); /* a mark's retry */
    leg->hold = 0;
    const char **g[3];
    size_t ng[3] = { 0, 0, 0 };
    for (int i = 0; i < 3; i++)
        g[i] = xcalloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        size_t k = accepted[i];
        if (k >= leg->req.nrcpts)
            continue;
        switch (st[i]) {
        case DELIVER_TXN_DELIVERED: g[leg->flag[k] ? 1 : 0][ng[leg->flag[k] ? 1 : 0]++] = leg->req.rcpts[k]; break;
        case DELIVER_TXN_MAYBE_SENT: leg->flag[k] = 1; break; /* the mark stays */
        case DELIVER_TXN_NOT_SENT:
            if (!leg->flag[k]) /* a flagged one keeps its mark: an earlier copy may be there */
                g[2][ng[2]++] = leg->req.rcpts[k];
            break;
        }
    }
    leg_write(leg, g[0], ng[0], LEDGER_DONE);
    leg_write(leg, g[1], ng[1], LEDGER_DONE_FLAGGED);
    leg_write(leg, g[2], ng[2], LEDGER_NONE);
    for (int i = 0; i < 3; i++)
        free(g[i]);
}

static void leg_smtp(domain_leg_t *leg)
{
    const domain_request_t *rq = &leg->req;
    const char *why = NULL;
    if (rq->gate && !rq->gate(rq->arg, &why)) {
        leg_leave_site(leg);
        leg_fail(leg, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, why ? why : "not started");
        return;
    }
    leg->smtp_started = 1;
    memset(leg->not_sent, 0, leg->req.nrcpts ? leg->req.nrcpts : 1);
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
        .log = rq->log,
        .domain = rq->name,
        .need = rq->need,
        /* without a ledger there is nothing to record: no hold at all */
        .before_body = leg->svc->ledger ? leg_on_before_body : NULL,
        .after_txn = leg_on_txn_over,
        .before_body_arg = leg,
        .source = leg->src ? &leg->dsrc : NULL,
        .site_tag = leg->key, /* its idle sessions count against the key's connection limit */
        .tls_override = leg->shape.tls >= 0 ? DELIVER_TLS_OVERRIDE(deliver_tls_policy_of(leg->shape.tls)) : 0,
        .max_msgs_per_conn = leg->shape.max_msgs_per_connection,
        .connect_timeout_ms = leg->shape.connect_timeout_ms,
        .command_timeout_ms = leg->shape.command_timeout_ms,
    };
    leg->dl = deliver_ctx_start(leg->svc->dctx, &dr, leg_on_delivered, leg);
    if (leg->dl == NULL) {
        leg_leave_site(leg);
        leg_fail(leg, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, "cannot start SMTP delivery");
    }
}

/* ---- the leg ---- */

domain_leg_t *domain_start(const domain_services_t *svc, const domain_request_t *req)
{
    domain_leg_t *leg = xcalloc(1, sizeof(*leg));
    leg->svc = svc;
    leg->req = *req;
    size_t n = req->nrcpts ? req->nrcpts : 1;
    leg->res = xcalloc(n, sizeof(*leg->res));
    leg->held = xcalloc(n, sizeof(*leg->held));
    leg->flag = xcalloc(n, 1);
    leg->not_sent = xcalloc(n, 1);
    for (size_t i = 0; req->flagged && i < req->nrcpts; i++)
        leg->flag[i] = req->flagged[i] != 0;
    leg->req.flagged = NULL; /* read here only */
    loop_timer_init(&leg->timer, leg_on_timer, leg);
    for (size_t i = 0; i < req->nrcpts; i++) { /* what a result the leg never got says */
        leg->res[i].outcome = OUTCOME_TRANSIENT;
        leg->res[i].reason = OUTCOME_R_OTHER;
        snprintf(leg->res[i].text, sizeof(leg->res[i].text), "no result");
    }
    leg->conn_limit = SITES_LIMIT_CONFIG;
    leg->shape.tls = -1;
    if (svc->dcfg->nrelay > 0) { /* relay mode: no MX lookup; the smarthost is the site */
        sites_name(svc->dcfg->relay[0].host, leg->site, sizeof(leg->site));
        leg->state = LEG_SITE;
        leg_route(leg);
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
    leg_leave_site(leg);
    if (leg->dl)
        deliver_cancel(leg->dl);
    if (leg->mark_op)
        ledger_cancel(svc->ledger, leg->mark_op);
    for (size_t i = 0; i < leg->nwrites; i++) {
        leg_write_t *w = leg->writes[i];
        if (w->op)
            ledger_cancel(svc->ledger, w->op);
        loop_timer_cancel(svc->loop, &w->timer);
        free(w->rcpts);
        free(w);
    }
    loop_timer_cancel(svc->loop, &leg->timer);
    free(leg->cand);
    free(leg->res);
    free(leg->held);
    free(leg->flag);
    free(leg->not_sent);
    free(leg->writes);
    free(leg);
}

/*
 * SUMMARY
 *  deliverer/deliver.c - one delivery attempt over a domain's MX candidates.
 * DESCRIPTION
 *  Owns a copy of the envelope and of the candidate list, runs one SMTP
 *  session at a time (session.c) and folds each session's per-recipient
 *  replies into the result, classified by outcome.c. Recipients settled by
 *  one session are not offered to the next: each session gets the list of
 *  those still open and an index map back into the request.
 *
 *  The user callback always runs from a zero-delay timer of our own: never
 *  inside deliver_start(), never deep inside a session/stream callback
 *  chain, and the deliver_t can be released right after it returns.
 * DIAGNOSTICS
 *  The sessions log one info line each; this file adds a debug summary.
 */
#include "deliverer/deliver.h"

#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/util.h"

struct deliver {
    loop_t                *loop;
    deliver_config_t       cfg;
    char                  *helo_name;
    smtp_timeouts_t        timeouts;
    char                  *mail_from;
    char                 **rcpts;
    size_t                 nrcpts;
    const char            *data;
    size_t                 len;
    size_t                 message_size;
    char                  *log_id;
    deliver_candidate_t   *cands;
    size_t                 ncands;
    size_t                 next;        /* next candidate to try */
    unsigned               hosts_tried;
    deliver_rcpt_result_t *results;
    unsigned char         *settled;     /* per recipient: results[i] is final */
    size_t                *open_idx;    /* current session's recipients -> request index */
    const char           **open_rcpts;
    size_t                 nopen;
    smtp_session_t        *sess;
    /* why the last session ended, for recipients left without an answer */
    int                    last_status;
    int                    last_has_reply;
    smtp_reply_t           last_reply;
    char                   last_error[256];
    int                    tried_any;
    deliver_result_t       res;
    loop_timer_t           done_timer;
    deliver_cb             cb;
    void                  *arg;
    int                    in_cb;
};

static void copy_text(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* No CR/LF/controls (command injection), no angle brackets (they would
 * end the path early). Quoted local parts with spaces stay possible. */
static int address_ok(const char *a, int empty_ok)
{
    if (a == NULL || (!empty_ok && a[0] == '\0'))
        return 0;
    for (const unsigned char *p = (const unsigned char *)a; *p; p++)
        if (*p < 0x20 || *p == 0x7f || *p == '<' || *p == '>')
            return 0;
    return 1;
}

static void release(deliver_t *d)
{
    smtp_session_free(d->sess);
    loop_timer_cancel(d->loop, &d->done_timer);
    free(d->helo_name);
    free(d->mail_from);
    for (size_t i = 0; i < d->nrcpts; i++)
        free(d->rcpts[i]);
    free(d->rcpts);
    free(d->log_id);
    free(d->cands);
    free(d->results);
    free(d->settled);
    free(d->open_idx);
    free(d->open_rcpts);
    free(d);
}

static void settle(deliver_t *d, size_t i, int code, const char *enh, const char *text)
{
    deliver_rcpt_result_t *r = &d->results[i];
    r->outcome = outcome_classify(code, enh, text, &r->reason);
    r->code = code;
    copy_text(r->enh, sizeof(r->enh), enh ? enh : "");
    copy_text(r->text, sizeof(r->text), text ? text : "");
    d->settled[i] = 1;
}

static int error_kind(int status)
{
    switch (status) {
    case SMTP_ETIMEOUT:
        return OUTCOME_ERR_TIMEOUT;
    case SMTP_ETLS:
        return OUTCOME_ERR_TLS;
    case SMTP_EPROTO:
        return OUTCOME_ERR_PROTOCOL;
    default:
        return OUTCOME_ERR_NETWORK;
    }
}

static void done_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    deliver_t *d = arg;
    d->res.rcpts = d->results;
    d->res.nrcpts = d->nrcpts;
    d->in_cb = 1;
    d->cb(d->arg, &d->res);
    d->in_cb = 0;
    release(d);
}

/* Classify what is left and report from the loop. */
static void finish(deliver_t *d)
{
    for (size_t i = 0; i < d->nrcpts; i++) {
        if (d->settled[i])
            continue;
        deliver_rcpt_result_t *r = &d->results[i];
        if (!d->tried_any) {
            r->outcome = outcome_for_error(OUTCOME_ERR_DNS, &r->reason);
            r->code = 0;
            copy_text(r->text, sizeof(r->text), "no MX candidate to try");
        } else if (d->last_status == SMTP_EREJECTED && d->last_has_reply) {
            /* the server spoke, but about the session, not this recipient:
             * keep its words, try again later (Postfix skips 5xx greetings
             * and defers when every MX refused) */
            settle(d, i, d->last_reply.code, d->last_reply.enh, d->last_reply.text);
            r->outcome = OUTCOME_TRANSIENT;
        } else {
            r->outcome = outcome_for_error(error_kind(d->last_status), &r->reason);
            r->code = 0;
            r->enh[0] = '\0';
            copy_text(r->text, sizeof(r->text), d->last_error[0] ? d->last_error : "no answer");
        }
        d->settled[i] = 1;
    }
    log_debug("deliver", "attempt", "msg=%s mx=%s addr=%s attempts=%u rcpts=%zu tls=%s",
              d->log_id ? d->log_id : "-", d->res.mx_host[0] ? d->res.mx_host : "-",
              d->res.mx_addr[0] ? d->res.mx_addr : "-", d->res.attempts_made, d->nrcpts,
              d->res.tls_version ? d->res.tls_version : "none");
    loop_timer_set(d->loop, &d->done_timer, 0);
}

static void on_session(void *arg, smtp_session_t *s, const smtp_session_result_t *sr);

static void set_port(struct sockaddr_storage *ss, unsigned short port)
{
    if (ss->ss_family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        if (sin->sin_port == 0)
            sin->sin_port = htons(port);
    } else if (ss->ss_family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        if (sin6->sin6_port == 0)
            sin6->sin6_port = htons(port);
    }
}

/* Start a session on the next candidate, or finish when none is left. */
static void try_next(deliver_t *d)
{
    unsigned max_mx = d->cfg.max_mx ? d->cfg.max_mx : 5;
    while (d->next < d->ncands) {
        const deliver_candidate_t *c = &d->cands[d->next];
        int new_host = d->next == 0 || strcmp(c->host, d->cands[d->next - 1].host) != 0;
        if (new_host) {
            if (d->hosts_tried >= max_mx)
                break;
            d->hosts_tried++;
        }
        d->next++;

        d->nopen = 0;
        for (size_t i = 0; i < d->nrcpts; i++) {
            if (d->settled[i])
                continue;
            d->open_idx[d->nopen] = i;
            d->open_rcpts[d->nopen] = d->rcpts[i];
            d->nopen++;
        }
        if (d->nopen == 0)
            break;

        smtp_session_params_t p = {
            .helo_name = d->helo_name,
            .tls = d->cfg.tls,
            .tls_verify_ctx = d->cfg.tls_verify_ctx,
            .tls_noverify_ctx = d->cfg.tls_noverify_ctx,
            .timeouts = d->timeouts,
            .mx_host = c->host,
            .addr = (const struct sockaddr *)&c->addr,
            .addrlen = c->addrlen,
            .mail_from = d->mail_from,
            .rcpts = d->open_rcpts,
            .nrcpts = d->nopen,
            .data = d->data,
            .len = d->len,
            .message_size = d->message_size,
            .log_id = d->log_id,
        };
        copy_text(d->res.mx_host, sizeof(d->res.mx_host), c->host);
        smtp_addr_text((const struct sockaddr *)&c->addr, d->res.mx_addr, sizeof(d->res.mx_addr));
        d->res.tls_version = NULL;
        d->res.tls_cipher = NULL;
        d->res.attempts_made++;
        d->tried_any = 1;
        d->sess = smtp_session_start(d->loop, &p, on_session, d);
        return;
    }
    finish(d);
}

static void on_session(void *arg, smtp_session_t *s, const smtp_session_result_t *sr)
{
    deliver_t *d = arg;
    size_t still_open = 0;

    d->res.tls_version = sr->tls_version;
    d->res.tls_cipher = sr->tls_cipher;
    for (size_t j = 0; j < sr->nrcpts && j < d->nopen; j++) {
        const smtp_rcpt_reply_t *rr = &sr->rcpts[j];
        if (rr->final)
            settle(d, d->open_idx[j], rr->code, rr->enh, rr->text);
        else
            still_open++;
    }
    d->last_status = sr->status;
    d->last_has_reply = sr->has_reply;
    d->last_reply = sr->reply;
    copy_text(d->last_error, sizeof(d->last_error), sr->error);

    smtp_session_free(s); /* deferred by the session until its callback returns */
    d->sess = NULL;

    if (sr->status != SMTP_OK && !sr->dot_sent && still_open > 0)
        try_next(d);
    else
        finish(d);
}

deliver_t *deliver_start(loop_t *loop, const deliver_config_t *cfg, const deliver_request_t *req,
                         deliver_cb cb, void *arg)
{
    deliver_t *d = xcalloc(1, sizeof(*d));
    d->loop = loop;
    d->cfg = *cfg;
    d->cb = cb;
    d->arg = arg;
    d->helo_name = xstrdup(cfg->helo_name && *cfg->helo_name ? cfg->helo_name : "localhost");
    d->cfg.helo_name = d->helo_name;
    if (cfg->timeouts)
        d->timeouts = *cfg->timeouts;
    else
        smtp_timeouts_default(&d->timeouts, cfg->timeout_scale_pct);
    d->cfg.timeouts = NULL;
    d->mail_from = xstrdup(req->mail_from ? req->mail_from : "");
    d->nrcpts = req->nrcpts;
    d->rcpts = xcalloc(req->nrcpts ? req->nrcpts : 1, sizeof(*d->rcpts));
    for (size_t i = 0; i < req->nrcpts; i++)
        d->rcpts[i] = xstrdup(req->rcpts[i] ? req->rcpts[i] : "");
    d->data = req->data;
    d->len = req->len;
    d->message_size = req->message_size;
    d->log_id = req->log_id ? xstrdup(req->log_id) : NULL;
    d->ncands = req->ncandidates;
    d->cands = xcalloc(req->ncandidates ? req->ncandidates : 1, sizeof(*d->cands));
    if (req->ncandidates)
        memcpy(d->cands, req->candidates, req->ncandidates * sizeof(*d->cands));
    unsigned short port = cfg->port ? cfg->port : 25;
    for (size_t i = 0; i < d->ncands; i++) {
        deliver_candidate_t *c = &d->cands[i];
        c->host[sizeof(c->host) - 1] = '\0';
        set_port(&c->addr, port);
        if (c->addrlen == 0)
            c->addrlen = c->addr.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                       : sizeof(struct sockaddr_in);
    }
    size_t n = d->nrcpts ? d->nrcpts : 1;
    d->results = xcalloc(n, sizeof(*d->results));
    d->settled = xcalloc(n, 1);
    d->open_idx = xcalloc(n, sizeof(*d->open_idx));
    d->open_rcpts = xcalloc(n, sizeof(*d->open_rcpts));
    loop_timer_init(&d->done_timer, done_fired, d);

    int from_ok = address_ok(d->mail_from, 1);
    for (size_t i = 0; i < d->nrcpts; i++) {
        d->results[i].rcpt = d->rcpts[i];
        if (!from_ok || !address_ok(d->rcpts[i], 0)) {
            settle(d, i, 0, "", "");
            d->results[i].outcome = OUTCOME_PERMANENT;
            d->results[i].reason = "other";
            copy_text(d->results[i].text, sizeof(d->results[i].text),
                      from_ok ? "invalid recipient address" : "invalid sender address");
        }
    }
    /* sessions report asynchronously, finish() through a timer: either way
     * the callback cannot fire before we return */
    try_next(d);
    return d;
}

void deliver_cancel(deliver_t *d)
{
    if (d == NULL || d->in_cb)
        return;
    release(d);
}

deliver_candidate_t *deliver_candidates_from_mx(const dns_mx_result_t *mx, unsigned max_mx, size_t *n)
{
    size_t total = 0, hosts;
    *n = 0;
    if (mx == NULL || mx->status != DNS_OK || mx->nhosts == 0)
        return NULL;
    if (max_mx == 0)
        max_mx = 5;
    hosts = mx->nhosts < max_mx ? mx->nhosts : max_mx;
    for (size_t h = 0; h < hosts; h++)
        total += mx->hosts[h].naddrs;
    if (total == 0)
        return NULL;
    deliver_candidate_t *c = xcalloc(total, sizeof(*c));
    size_t k = 0;
    for (size_t h = 0; h < hosts; h++) {
        const dns_mx_host_t *mh = &mx->hosts[h];
        for (size_t a = 0; a < mh->naddrs; a++) {
            copy_text(c[k].host, sizeof(c[k].host), mh->name ? mh->name : "");
            c[k].pref = mh->pref;
            c[k].addr = mh->addrs[a];
            c[k].addrlen = mh->addrs[a].ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                              : sizeof(struct sockaddr_in);
            k++;
        }
    }
    *n = k;
    return c;
}

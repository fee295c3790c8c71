/*
 * SUMMARY
 *  imap/append.c - the append request: the caller's handle for one Sent
 *  copy, from imap_append_start() to its one callback.
 * DESCRIPTION
 *  A request checks its arguments, copies the account and goes either to
 *  its pool (pool.c) or onto a connection of its own (conn.c), which says
 *  LOGOUT after the APPEND. Whoever serves it hands back one result; the
 *  request passes it to the caller's callback, from its own zero-delay
 *  timer (imap_append_report()) or straight from the connection's timer
 *  handler, which already runs outside any stream callback
 *  (imap_append_finish()): never inside imap_append_start() or I/O.
 *
 *  States (imap_append_state_t), changed only in imap_append_enter():
 *
 *    INIT -> OWN ------------------------------> DONE   no pool
 *    INIT -> [WAIT ->] POOLED -> [REPORT ->] DONE       pooled
 *    INIT | WAIT -> REPORT -> DONE                      bad arguments,
 *                                                       wait timed out
 *    WAIT -> OWN -> DONE                                pool freed
 *
 *  REPORT is the zero-delay hop: bad arguments too come back later,
 *  through the callback.
 *
 *  The handle is the caller's until imap_append_free(): DONE keeps it
 *  (nothing else points at it any more). Freed before DONE it first
 *  cancels, taking itself back from whatever serves it; freed from inside
 *  its own callback it only notes so, and deliver() releases it once the
 *  callback has returned, since the call chain still holds it.
 * DIAGNOSTICS
 *  One info line per stored message (user, mailbox, uidvalidity, uid),
 *  one warn line per failure, state changes and cancels at debug
 *  (mod=imap).
 */
#include "imap/append.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/util.h"
#include "imap/pool.h"

const char *imap_strerror(int status)
{
    switch (status) {
    case IMAP_OK: return "ok";
    case IMAP_ENETWORK: return "network error";
    case IMAP_ETIMEOUT: return "timeout";
    case IMAP_ETLS: return "TLS error";
    case IMAP_EAUTH: return "authentication failed";
    case IMAP_ENOSENT: return "no \\Sent mailbox";
    case IMAP_EPROTO: return "protocol error";
    case IMAP_EREFUSED: return "APPEND refused";
    case IMAP_ENOUIDPLUS: return "appended without APPENDUID";
    case IMAP_EBUSY: return "server busy";
    default: return "unknown imap status";
    }
}

/* The message fields of an append's log lines. */
#define APPEND_MSG(a) ((a)->log_ref ? (a)->log_ref : LOG_MSG((a)->log_id, (a)->trace_id))

static const char *const state_names[IMAP_APPEND_ST_LAST] = {
    [IMAP_APPEND_ST_INIT] = "INIT",     [IMAP_APPEND_ST_OWN] = "OWN",       [IMAP_APPEND_ST_WAIT] = "WAIT",
    [IMAP_APPEND_ST_POOLED] = "POOLED", [IMAP_APPEND_ST_REPORT] = "REPORT", [IMAP_APPEND_ST_DONE] = "DONE",
};

const char *imap_append_strstate(imap_append_state_t st)
{
    return st < IMAP_APPEND_ST_LAST ? state_names[st] : "?";
}

void imap_append_enter(imap_append_t *a, imap_append_state_t st)
{
    log_debug("imap", "append_state", "%s append=%016" PRIx64 " from=%s to=%s", APPEND_MSG(a), a->id,
              imap_append_strstate(a->state), imap_append_strstate(st));
    a->state = st;
}

const char *imap_append_log_ref(imap_append_t *const *a, size_t n, char *dst, size_t len)
{
    if (n == 1 && a[0]->log_ref) {
        snprintf(dst, len, "%s", a[0]->log_ref);
        return dst;
    }
    if (n == 1)
        return log_msgref(a[0]->log_id, a[0]->trace_id, dst, len);
    char ids[LOG_QUOTE_MAX];
    size_t o = 0;
    ids[0] = '\0';
    for (size_t i = 0; i < n && o + 1 < sizeof(ids); i++)
        o += (size_t)snprintf(ids + o, sizeof(ids) - o, "%s%s", i ? "," : "", a[i]->log_id ? a[i]->log_id : "-");
    return log_msgref(ids, NULL, dst, len);
}

static void log_result(const imap_append_t *a)
{
    if (a->res.status == IMAP_OK)
        log_info("imap", "appended",
                 "%s session=%016" PRIx64 " user=%s host=%s mailbox=%s uidvalidity=%" PRIu32
                 " uid=%" PRIu32 " size=%zu reused=%d already_stored=%d",
                 APPEND_MSG(a), a->id, LOG_Q(a->acct.user), LOG_Q(a->acct.host), LOG_Q(a->res.mailbox),
                 a->res.uidvalidity, a->res.uid, a->len, a->res.reused, a->res.already_stored);
    else
        log_warn("imap", "append_failed", "%s session=%016" PRIx64 " user=%s host=%s mailbox=%s status=%s error=%s",
                 APPEND_MSG(a), a->id, LOG_Q(a->acct.user), LOG_Q(a->acct.host), LOG_Q(a->res.mailbox),
                 LOG_Q(imap_strerror(a->res.status)), LOG_Q(a->res.error));
}

static void release(imap_append_t *a)
{
    loop_timer_cancel(a->loop, &a->done_timer);
    imap_conn_acct_clear(&a->acct);
    free(a->check_msgid);
    free(a->msgid);
    free(a->log_id);
    free(a->trace_id);
    free(a->log_ref);
    free(a);
}

/* The one callback. The handle stays the caller's; one freed from inside
 * its own callback is released here, once the callback has returned. */
static void deliver(imap_append_t *a)
{
    log_result(a);
    imap_append_enter(a, IMAP_APPEND_ST_DONE);
    a->in_cb = 1;
    a->cb(a->arg, &a->res);
    a->in_cb = 0;
    if (a->free_asked)
        release(a);
}

static void done_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    deliver(arg);
}

void imap_append_report(imap_append_t *a, const imap_append_result_t *res)
{
    a->res = *res;
    imap_append_enter(a, IMAP_APPEND_ST_REPORT);
    loop_timer_set(a->loop, &a->done_timer, 0);
}

void imap_append_fail(imap_append_t *a, int status, const char *fmt, ...)
{
    imap_append_result_t res;
    memset(&res, 0, sizeof(res));
    res.status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res.error, sizeof(res.error), fmt, ap);
    va_end(ap);
    imap_append_report(a, &res);
}

void imap_append_finish(imap_append_t *a, const imap_append_result_t *res)
{
    a->res = *res;
    deliver(a);
}

/* ---------------------------------------------------------------- alone */

static void own_on_conn(void *arg, imap_conn_t *c, imap_conn_event_t ev, const char *why)
{
    imap_append_t *a = arg;
    if (ev != IMAP_CONN_EV_DONE)
        return; /* never READY without keep_open, so never unfit */
    imap_append_result_t res = *imap_conn_result(c);
    res.connections = 1;
    imap_conn_free(c); /* closed already: it said LOGOUT or died */
    a->conn = NULL;
    imap_append_finish(a, &res);
}

void imap_append_run_alone(imap_append_t *a)
{
    imap_conn_msg_t m = { a->data, a->len };
    char ref[IMAP_LOG_REF_MAX];
    imap_conn_job_t job = { .msgs = &m, .nmsgs = 1, .check_msgid = a->check_msgid, .timeout_ms = a->timeout_ms,
                            .log_ref = imap_append_log_ref(&a, 1, ref, sizeof(ref)), .blame_id = a->log_id };
    imap_append_enter(a, IMAP_APPEND_ST_OWN);
    a->conn = imap_conn_open(a->loop, &a->acct, &job, own_on_conn, a);
}

/* ---------------------------------------------------------------- public */

/* IMAP_OK, or the status (and in err the reason) of an account no
 * connection can be opened with. */
static int account_check(const imap_account_t *acct, const char *data, size_t len, char *err, size_t n)
{
    if (acct->addr == NULL || acct->addrlen == 0 || acct->addrlen > sizeof(struct sockaddr_storage))
        return snprintf(err, n, "no usable server address"), IMAP_EPROTO;
    if (acct->tls != IMAP_TLS_IMAPS && acct->tls != IMAP_TLS_STARTTLS && acct->tls != IMAP_TLS_NONE)
        return snprintf(err, n, "unknown TLS mode %d", (int)acct->tls), IMAP_EPROTO;
    if (acct->tls != IMAP_TLS_NONE && acct->ssl_ctx == NULL)
        return snprintf(err, n, "TLS required but no SSL_CTX given"), IMAP_ETLS;
    if (acct->verify_host && (acct->host == NULL || acct->host[0] == '\0'))
        return snprintf(err, n, "certificate name check asked without a host name"), IMAP_ETLS;
    if (acct->user == NULL || acct->password == NULL)
        return snprintf(err, n, "no user or password"), IMAP_EAUTH;
    if (data == NULL && len > 0)
        return snprintf(err, n, "no message data"), IMAP_EPROTO;
    return IMAP_OK;
}

imap_append_t *imap_append_start(loop_t *loop, const imap_account_t *acct, const char *data, size_t len,
                                 imap_append_cb cb, void *arg)
{
    if (loop == NULL || acct == NULL || cb == NULL)
        return NULL;
    imap_append_t *a = xcalloc(1, sizeof(*a));
    a->loop = loop;
    a->id = util_rand64();
    a->state = IMAP_APPEND_ST_INIT;
    a->data = data;
    a->len = len;
    a->cb = cb;
    a->arg = arg;
    a->timeout_ms = acct->timeout_ms ? acct->timeout_ms : IMAP_DEFAULT_TIMEOUT_MS;
    a->log_id = acct->log_id ? xstrdup(acct->log_id) : NULL;
    a->trace_id = acct->trace_id ? xstrdup(acct->trace_id) : NULL;
    a->log_ref = acct->log_ref ? xstrdup(acct->log_ref) : NULL;
    loop_timer_init(&a->done_timer, done_fired, a);

    char err[128];
    int status = account_check(acct, data, len, err, sizeof(err));
    if (status != IMAP_OK) {
        imap_append_fail(a, status, "%s", err); /* later, through the callback */
        return a;
    }
    imap_conn_acct_t view = { .addrlen = acct->addrlen, .host = (char *)acct->host, .user = (char *)acct->user,
                              .password = (char *)acct->password, .tls = acct->tls, .ssl_ctx = acct->ssl_ctx,
                              .verify_host = acct->verify_host };
    memcpy(&view.addr, acct->addr, acct->addrlen);
    imap_conn_acct_copy(&a->acct, &view);
    if (acct->check_message_id && acct->check_message_id[0])
        a->check_msgid = xstrdup(acct->check_message_id);
    if (acct->message_id && acct->message_id[0])
        a->msgid = xstrdup(acct->message_id);
    if (acct->pool)
        imap_pool_submit(acct->pool, a);
    else
        imap_append_run_alone(a);
    return a;
}

/* Whatever serves a lets go of it; no result will come. */
static void cancel(imap_append_t *a)
{
    log_debug("imap", "cancel", "%s append=%016" PRIx64 " state=%s", APPEND_MSG(a), a->id,
              imap_append_strstate(a->state));
    switch (a->state) {
    case IMAP_APPEND_ST_OWN:
        imap_conn_free(a->conn);
        a->conn = NULL;
        return;
    case IMAP_APPEND_ST_WAIT:
    case IMAP_APPEND_ST_POOLED:
        imap_pool_withdraw(a);
        return;
    default: /* INIT, REPORT (release cancels the timer) */
        return;
    }
}

void imap_append_free(imap_append_t *a)
{
    if (a == NULL)
        return;
    if (a->in_cb) { /* deliver() still has it on its stack */
        a->free_asked = 1;
        return;
    }
    if (a->state != IMAP_APPEND_ST_DONE)
        cancel(a);
    release(a);
}

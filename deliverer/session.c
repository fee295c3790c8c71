/*
 * SUMMARY
 *  deliverer/session.c - the SMTP client state machine (one connection,
 *  one transaction).
 * DESCRIPTION
 *  Shape after OpenSMTPD mta_session.c: enter_state() sends the command
 *  that belongs to a state, on_reply() switches on the state to decide
 *  the next one, and smtp_strstate() names states for the from= and to= of state traces.
 *  Everything per state (name, timeout, how to word a failure) lives in
 *  one table, after Postfix smtp_proto.c.
 *
 *  Input is read only through smtp_reply_parse_resume() (a reply arriving
 *  a chunk at a time is checked once, not once per chunk); the EHLO keywords
 *  arrive through its per-line callback, so nothing parses continuations
 *  twice. s->expect counts the replies the server owes us: a reply nobody
 *  asked for is a protocol error.
 *
 *  PIPELINING (Postfix smtp_loop): the send cursor runs ahead, the state
 *  is the receive cursor. With s->batch set, entering MAIL writes MAIL,
 *  every RCPT and DATA at once; MAIL/RCPT/DATA replies then only move the
 *  state without sending. A refused MAIL still owes us the RCPT and DATA
 *  replies: they are read and ignored (s->mail_failed). A 354 to DATA
 *  when nobody was accepted cannot be answered with RSET (it would be
 *  message text), so that connection is closed instead of reused.
 *
 *  Hold (params.before_body): a 354 that would start the body enters
 *  HOLD instead and hands the accepted recipients to the owner; the body
 *  goes out on smtp_session_resume(). The hook may resume from inside
 *  (s->in_hold_cb: the flag is acted on once it returns, so the hook
 *  never runs inside enter_state(BODY)). While held the server owes us
 *  nothing: any reply is unsolicited, and the stream's inactivity
 *  timeout (data_block) and the transaction deadline still run.
 *
 *  Deadlines (smtp_timeouts_t in session.h): the stream's timer is an
 *  inactivity timer, reset by every byte; on top of it deadline_timer
 *  gives the awaited reply an absolute deadline, armed by wait_reply()
 *  whenever a wait starts: a command queued (enter_state), the connection
 *  made (GREETING), the final dot written (body_sent), or, pipelined, the
 *  reply before completed (set_state and the RCPT-to-RCPT step); a batch
 *  was queued before that, so "the later of the two" is always now. The
 *  TLS handshake keeps STARTTLS's deadline; HOLD and BODY before the dot
 *  keep only the data block's inactivity rule. txn_timer runs from MAIL
 *  FROM to end_transaction(). The reply-line bucket counts the lines the
 *  parser's cursor reports for the reply being read, against the burst
 *  plus the rate times the time since its wait started.
 *
 *  Reuse: with keep_open the end of a transaction leads to IDLE (after
 *  RSET when the server may still hold an open transaction) instead of
 *  QUIT. An IDLE session has no timeout of its own (the pool expires it)
 *  and any event on it ends it through the closed callback.
 *
 *  Lifetime: the owner's callback fires exactly once, from a
 *  stream event or a deferred timer, never from smtp_session_start(). The
 *  owner may free the session inside it: every entry point counts itself
 *  in s->in_cb and the release happens once the outermost one returns.
 *
 *  Failure policy: the first failure wins and is kept in s->res. When the
 *  connection is still in sync (the server answered something we did not
 *  like) we say QUIT; after 421, timeouts and lost connections we just
 *  close. QUIT itself never fails a session.
 * DIAGNOSTICS
 *  One info line per session (mod=smtp event=session) with message id,
 *  session id, MX, TLS version and the result; state transitions, commands,
 *  replies, and a hold with its accepted recipients and (on resume) how
 *  long it lasted (event=hold / event=resume held_ms=) at debug. Sessions ending in a network, TLS or timeout
 *  error count in MET_SMTP_SESSION_ERRORS (opened sessions are counted by
 *  the worker from deliver_result_t.attempts_made). A session ended by an
 *  absolute deadline while the server was still sending (command: bytes
 *  of the reply came in after its wait started; or the transaction's)
 *  logs event=deadline kind=command|transaction state= elapsed_ms=
 *  limit_ms= at info and counts in MET_SMTP_DEADLINES; its error reads
 *  "timeout while <doing>" or "transaction deadline exceeded while
 *  <doing>", status SMTP_ETIMEOUT either way. A deadline passing on a
 *  silent server is what inactivity would have done: not counted. A reply
 *  flood logs event=reply_flood lines= allowed= elapsed_ms= and counts in
 *  MET_SMTP_REPLY_FLOODS, SMTP_EPROTO "reply flood: N lines in M ms while
 *  <doing>".
 */
#include "deliverer/session.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/base64.h"
#include "core/crash.h"
#include "core/log.h"
#include "core/stream.h"
#include "core/tls.h"
#include "core/util.h"
#include "deliverer/outcome.h"
#include "metrics/metrics.h"
#include "metrics/ops.h"

#define TIMEOUT_NONE ((size_t)-1)

struct smtp_session {
    loop_t               *loop;
    stream_t             *st;
    smtp_session_params_t p;
    smtp_session_cb       cb;
    void                 *cb_arg;
    smtp_state_t          state;
    uint64_t              id;
    unsigned              expect;    /* replies the server still owes us */
    size_t                rcpt_sent; /* RCPT commands written */
    size_t                rcpt_done; /* RCPT replies received */
    size_t                naccepted;
    smtp_features_t       ehlo_feat; /* filled by the line callback while parsing EHLO */
    smtp_reply_cursor_t   reply_cur; /* input the parser already checked (smtp_reply_parse_resume) */
    smtp_session_result_t res;
    loop_timer_t          defer_timer;
    int                   in_cb;
    int                   freed;
    int                   finished;
    char                  addr_text[64];
    unsigned              port;
    /* engine: pipelining, reuse, AUTH, resumption */
    int                   batch;       /* this transaction's envelope was pipelined */
    int                   mail_failed; /* MAIL refused in a batch: absorb RCPT/DATA replies */
    int                   txn_open;    /* MAIL accepted and no end-of-data reply yet */
    int                   idle_report; /* defer_timer reports the end of a transaction */
    int                   quitting;    /* smtp_session_quit(): ends with closed_cb */
    int                   dead;        /* connection gone: only smtp_session_free() remains */
    unsigned              ntxn;        /* transactions completed on this connection */
    uint64_t              born_ms;
    unsigned              txn_seq;     /* bumped by smtp_session_next() */
    int                   in_hold_cb;  /* inside params.before_body */
    int                   hold_resumed;/* smtp_session_resume() came from inside it */
    int                   held;        /* this transaction went through HOLD */
    int                   hold_aborted;/* smtp_session_abort() came from inside it */
    size_t                hold_at;     /* payload bytes written before the hold: all but the final dot */
    char                  abort_why[200];
    uint64_t              held_ms;     /* when HOLD was entered (for the log) */
    /* the connection outlives the delivery that opened it: own copies */
    char                  mx_host[256];
    struct sockaddr_storage addr;
    struct sockaddr_storage bind_addr; /* the source address (p.bind_addr), when given */
    char                  source_name[65];
    char                  helo_name[256];
    unsigned              auth_step;
    char                  tls_key[400];
    smtp_session_closed_cb closed_cb;
    void                 *closed_arg;
    /* deadlines (see DESCRIPTION) */
    loop_timer_t          deadline_timer; /* the awaited reply's absolute deadline */
    loop_timer_t          txn_timer;      /* the transaction's */
    uint64_t              wait_ms;        /* when the wait for the next reply started */
    uint64_t              tls_ms;         /* when the TLS handshake started */
    uint64_t              wait_bytes_in;  /* stream_bytes_in() then */
    uint64_t              txn_ms;         /* when MAIL FROM was sent */
};

/*
 * Per-state table: trace name, timeout (offset into smtp_timeouts_t), and
 * what we were doing, for "timeout while %s" / "connection lost while %s".
 * BODY has a second wording once the final dot is out: from then on the
 * server may have taken the message, and a retry may duplicate it.
 */
static const struct smtp_state_info {
    const char *name;
    size_t      timeout;
    const char *doing;
} state_info[] = {
    [SMTP_STATE_CONNECT] = { "CONNECT", offsetof(smtp_timeouts_t, connect_ms), "connecting" },
    [SMTP_STATE_GREETING] = { "GREETING", offsetof(smtp_timeouts_t, greeting_ms),
                              "receiving the initial server greeting" },
    [SMTP_STATE_EHLO] = { "EHLO", offsetof(smtp_timeouts_t, helo_ms), "sending EHLO" },
    [SMTP_STATE_HELO] = { "HELO", offsetof(smtp_timeouts_t, helo_ms), "sending HELO" },
    [SMTP_STATE_STARTTLS] = { "STARTTLS", offsetof(smtp_timeouts_t, starttls_ms), "sending STARTTLS" },
    [SMTP_STATE_TLS_HANDSHAKE] = { "TLS_HANDSHAKE", offsetof(smtp_timeouts_t, starttls_ms),
                                   "performing the TLS handshake" },
    [SMTP_STATE_EHLO_TLS] = { "EHLO_TLS", offsetof(smtp_timeouts_t, helo_ms),
                              "sending EHLO after STARTTLS" },
    [SMTP_STATE_AUTH] = { "AUTH", offsetof(smtp_timeouts_t, helo_ms), "authenticating" },
    [SMTP_STATE_MAIL] = { "MAIL", offsetof(smtp_timeouts_t, mail_ms), "sending MAIL FROM" },
    [SMTP_STATE_RCPT] = { "RCPT", offsetof(smtp_timeouts_t, rcpt_ms), "sending RCPT TO" },
    [SMTP_STATE_DATA] = { "DATA", offsetof(smtp_timeouts_t, data_init_ms), "sending DATA command" },
    /* we are the silent side: the server waits 5 minutes for data (RFC
     * 5321 §4.5.3.2.7); the data block timeout (§4.5.3.2.5, 3 minutes)
     * ends a hold well inside that */
    [SMTP_STATE_HOLD] = { "HOLD", offsetof(smtp_timeouts_t, data_block_ms),
                          "waiting to send the message body" },
    [SMTP_STATE_BODY] = { "BODY", offsetof(smtp_timeouts_t, data_block_ms), "sending message body" },
    [SMTP_STATE_RSET] = { "RSET", offsetof(smtp_timeouts_t, rset_ms), "sending RSET" },
    [SMTP_STATE_IDLE] = { "IDLE", TIMEOUT_NONE, "idle between transactions" },
    [SMTP_STATE_QUIT] = { "QUIT", offsetof(smtp_timeouts_t, quit_ms), "sending QUIT" },
    [SMTP_STATE_DONE] = { "DONE", TIMEOUT_NONE, "finishing" },
};
_Static_assert(sizeof(state_info) / sizeof(state_info[0]) == SMTP_STATE_LAST,
               "state_info must have one row per smtp_state_t");

static const char BODY_SENT_DOING[] = "sending end of data -- message may be sent more than once";

static const char *const status_text[] = {
    [0] = "ok",
    [1] = "network error",
    [2] = "timeout",
    [3] = "TLS failure",
    [4] = "protocol error",
    [5] = "rejected by server",
    [6] = "local resources exhausted",
    [7] = "abandoned before the final dot",
};

/* logfmt-safe one-word form of the status, for result= in the log line */
static const char *const status_token[] = { "ok", "network", "timeout", "tls", "protocol", "rejected", "local",
                                             "aborted" };
_Static_assert(sizeof(status_token) == sizeof(status_text), "one token per status");

static const char *status_tok(int status)
{
    int i = -status;
    return (i >= 0 && i < (int)(sizeof(status_token) / sizeof(status_token[0]))) ? status_token[i] : "unknown";
}

const char *smtp_strstate(smtp_state_t st)
{
    return (unsigned)st < SMTP_STATE_LAST ? state_info[st].name : "?";
}

const char *smtp_strerror(int status)
{
    int i = -status;
    return (i >= 0 && i < (int)(sizeof(status_text) / sizeof(status_text[0]))) ? status_text[i]
                                                                               : "unknown smtp status";
}

/* A connect that failed for want of something of ours, not the peer's. */
static int local_errno(int e)
{
    return e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM || e == EADDRNOTAVAIL;
}

static unsigned scale_timeout(unsigned ms, unsigned pct)
{
    uint64_t v = (uint64_t)ms * pct / 100;
    return v == 0 ? 1 : v > UINT32_MAX ? UINT32_MAX : (unsigned)v;
}

void smtp_timeouts_default(smtp_timeouts_t *t, unsigned scale_pct)
{
    static const smtp_timeouts_t rfc = {
        .connect_ms = 30000,
        .greeting_ms = 300000,
        .helo_ms = 300000,
        .starttls_ms = 300000,
        .mail_ms = 300000,
        .rcpt_ms = 300000,
        .data_init_ms = 120000,
        .data_block_ms = 180000,
        .data_done_ms = 600000,
        .rset_ms = 20000,
        .quit_ms = 10000,
        .transaction_ms = 1800000,
    };
    if (scale_pct == 0)
        scale_pct = 100;
#define SCALE(state) t->state = scale_timeout(rfc.state, scale_pct)
    SCALE(connect_ms);
    SCALE(greeting_ms);
    SCALE(helo_ms);
    SCALE(starttls_ms);
    SCALE(mail_ms);
    SCALE(rcpt_ms);
    SCALE(data_init_ms);
    SCALE(data_block_ms);
    SCALE(data_done_ms);
    SCALE(rset_ms);
    SCALE(quit_ms);
    SCALE(transaction_ms);
#undef SCALE
    t->reply_lines_burst = SMTP_REPLY_LINES_BURST;
    t->reply_lines_per_s = SMTP_REPLY_LINES_PER_S;
}

const char *smtp_addr_text(const struct sockaddr *sa, char *buf, size_t len)
{
    const void *a = NULL;
    if (sa && sa->sa_family == AF_INET)
        a = &((const struct sockaddr_in *)sa)->sin_addr;
    else if (sa && sa->sa_family == AF_INET6)
        a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (a == NULL || inet_ntop(sa->sa_family, a, buf, (socklen_t)len) == NULL)
        snprintf(buf, len, "?");
    return buf;
}

/* ---- EHLO keywords ---------------------------------------------------- */

static const struct {
    const char *kw;
    unsigned    flag;
} ehlo_keywords[] = {
    { "PIPELINING", SMTP_FEAT_PIPELINING },
    { "STARTTLS", SMTP_FEAT_STARTTLS },
    { "SIZE", SMTP_FEAT_SIZE },
    { "8BITMIME", SMTP_FEAT_8BITMIME },
    { "SMTPUTF8", SMTP_FEAT_SMTPUTF8 },
    { "ENHANCEDSTATUSCODES", SMTP_FEAT_ENHANCEDSTATUSCODES },
    { "CHUNKING", SMTP_FEAT_CHUNKING },
    { "AUTH", SMTP_FEAT_AUTH },
};

void smtp_features_parse_line(smtp_features_t *f, const char *line, size_t len)
{
    size_t kl = 0;
    /* "AUTH=LOGIN PLAIN" is the pre-RFC 2554 spelling some servers still send */
    while (kl < len && line[kl] != ' ' && line[kl] != '=')
        kl++;
    const char *args = line + kl;
    size_t alen = len - kl;
    while (alen > 0 && (*args == ' ' || *args == '=')) {
        args++;
        alen--;
    }
    for (size_t i = 0; i < sizeof(ehlo_keywords) / sizeof(ehlo_keywords[0]); i++) {
        if (strlen(ehlo_keywords[i].kw) != kl || util_strncasecmp(line, ehlo_keywords[i].kw, kl) != 0)
            continue;
        if (ehlo_keywords[i].flag == SMTP_FEAT_SIZE) {
            /* RFC 1870: digits only. "SIZE -1", "SIZE 12abc" or a number
             * that does not fit say nothing usable: ignored, as if no
             * SIZE were offered (no limit, no SIZE= parameter) */
            size_t v = 0;
            for (size_t j = 0; j < alen && args[j] != ' '; j++) {
                unsigned d = (unsigned char)args[j] - '0';
                if (d > 9 || v > (SIZE_MAX - d) / 10)
                    return;
                v = v * 10 + d;
            }
            f->size_max = v;
        } else if (ehlo_keywords[i].flag == SMTP_FEAT_AUTH) {
            size_t have = strlen(f->auth);
            for (size_t j = 0; j < alen && have + 2 < sizeof(f->auth); j++) {
                if (j == 0 && have > 0)
                    f->auth[have++] = ' ';
                unsigned char c = (unsigned char)args[j];
                f->auth[have++] = (c < 0x20 || c >= 0x7f) ? '?' : (char)c;
            }
            f->auth[have] = '\0';
        }
        f->flags |= ehlo_keywords[i].flag;
        return;
    }
}

static void ehlo_line(void *arg, int index, const char *text, size_t len)
{
    smtp_session_t *s = arg;
    if (index == 0) {
        /* the first line is the server's name and greeting, not a keyword */
        memset(&s->ehlo_feat, 0, sizeof(s->ehlo_feat));
        return;
    }
    smtp_features_parse_line(&s->ehlo_feat, text, len);
}

/* ---- the state machine ------------------------------------------------ */

static void enter_state(smtp_session_t *s, smtp_state_t next);
static void stop_timers(smtp_session_t *s);

static unsigned state_timeout(const smtp_session_t *s, smtp_state_t st)
{
    size_t off = state_info[st].timeout;
    if (st == SMTP_STATE_BODY && s->res.dot_sent)
        off = offsetof(smtp_timeouts_t, data_done_ms);
    if (off == TIMEOUT_NONE)
        return 0;
    return *(const unsigned *)((const char *)&s->p.timeouts + off);
}

static const char *state_doing(const smtp_session_t *s)
{
    if (s->state == SMTP_STATE_BODY && s->res.dot_sent)
        return BODY_SENT_DOING;
    return state_info[s->state].doing;
}

/* For the log line: reply text without double quotes. */
/* The message fields of a session's log lines (msg=- between messages). */
#define SESS_MSG(s) ((s)->p.log_ref ? (s)->p.log_ref : LOG_MSG((s)->p.log_id, (s)->p.trace_id))

static void log_session(smtp_session_t *s)
{
    size_t n[3] = { 0, 0, 0 }, open = 0;
    for (size_t i = 0; i < s->res.nrcpts; i++) {
        const smtp_rcpt_reply_t *r = &s->res.rcpts[i];
        if (!r->final) {
            open++;
            continue;
        }
        n[outcome_classify(r->code, r->enh, r->text, NULL)]++;
    }
    log_info("smtp", "session",
             "%s session=%016" PRIx64 " mx=%s addr=%s port=%u source=%s tls=%s cipher=%s resumed=%d result=%s "
             "state=%s txn=%u reused=%d pipelined=%d kept=%d rcpts=%zu delivered=%zu transient=%zu "
             "permanent=%zu unanswered=%zu bytes_in=%llu code=%d enh=%s reply=%s error=%s",
             SESS_MSG(s), s->id, LOG_Q(s->p.mx_host),
             s->addr_text, s->port, LOG_Q(s->p.source_name), s->res.tls_version ? s->res.tls_version : "none",
             s->res.tls_cipher ? s->res.tls_cipher : "none", s->res.tls_resumed,
             status_tok(s->res.status), smtp_strstate(s->res.state), s->ntxn, s->res.reused,
             s->res.pipelined, s->res.reusable, s->res.nrcpts, n[OUTCOME_DELIVERED],
             n[OUTCOME_TRANSIENT], n[OUTCOME_PERMANENT], open, (unsigned long long)s->res.bytes_in,
             s->res.has_reply ? s->res.reply.code : 0, s->res.has_reply && s->res.reply.enh[0] ? s->res.reply.enh : "-",
             LOG_Q(s->res.has_reply ? s->res.reply.text : ""), LOG_Q(s->res.status == SMTP_OK ? "" : s->res.error));
}

static void close_stream(smtp_session_t *s)
{
    if (s->st) {
        s->res.bytes_in = stream_bytes_in(s->st);
        stream_free(s->st); /* safe inside its own callback */
        s->st = NULL;
    }
    s->dead = 1;
}

/* The connection of an IDLE or quitting session ended. */
static void closed(smtp_session_t *s)
{
    if (s->finished)
        return;
    s->finished = 1;
    loop_timer_cancel(s->loop, &s->defer_timer);
    log_debug("smtp", "state", "%s session=%016" PRIx64 " from=%s to=%s", SESS_MSG(s), s->id,
              smtp_strstate(s->state), smtp_strstate(SMTP_STATE_DONE));
    s->state = SMTP_STATE_DONE;
    stop_timers(s);
    close_stream(s);
    if (s->closed_cb)
        s->closed_cb(s->closed_arg, s);
}

/* Close the connection and report. Callers return right after. */
static void finish(smtp_session_t *s)
{
    if (s->finished)
        return;
    if (s->quitting) {
        closed(s);
        return;
    }
    s->finished = 1;
    if (s->res.status == SMTP_OK)
        s->res.state = SMTP_STATE_DONE;
    log_debug("smtp", "state", "%s session=%016" PRIx64 " from=%s to=%s", SESS_MSG(s), s->id,
              smtp_strstate(s->state), smtp_strstate(SMTP_STATE_DONE));
    s->state = SMTP_STATE_DONE;
    loop_timer_cancel(s->loop, &s->defer_timer);
    stop_timers(s);
    close_stream(s);
    s->res.reusable = 0;
    log_session(s);
    if (s->res.status == SMTP_ENETWORK || s->res.status == SMTP_ETLS || s->res.status == SMTP_ETIMEOUT)
        metrics_inc(MET_SMTP_SESSION_ERRORS, 1);
    if (s->res.status == SMTP_ELOCAL)
        metrics_inc(MET_LOCAL_RESOURCE_ERRORS, 1);
    s->cb(s->cb_arg, s, &s->res);
}

/* Record the first failure; then QUIT politely when the dialogue is still
 * in sync, else close at once. */
static void session_fail(smtp_session_t *s, int status, int quit, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void session_fail(smtp_session_t *s, int status, int quit, const char *fmt, ...)
{
    if (s->res.status == SMTP_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->res.error, sizeof(s->res.error), fmt, ap);
        va_end(ap);
        s->res.status = status;
        s->res.state = s->state;
    }
    if (quit && s->st && s->state != SMTP_STATE_QUIT && s->expect == 0)
        enter_state(s, SMTP_STATE_QUIT);
    else
        finish(s);
}

/* The server refused the session (421, or greeting/EHLO/HELO not 2xx). */
static void session_rejected(smtp_session_t *s, const smtp_reply_t *r)
{
    /* 421: the server is closing the channel (RFC 5321 §3.8); no QUIT */
    session_fail(s, SMTP_EREJECTED, r->code != 421, "server refused the session while %s: %d%s%s %s",
                 state_info[s->state].doing, r->code, r->enh[0] ? " " : "", r->enh, r->text);
}

/* ---- deadlines and the reply-line cap --------------------------------- */

/* The absolute deadline of the reply awaited in the current state, 0 for
 * none: CONNECT (nothing can trickle), HOLD and BODY before the dot (the
 * data block's inactivity rule, stream_set_timeout), IDLE, DONE. */
static unsigned reply_deadline(const smtp_session_t *s)
{
    switch (s->state) {
    case SMTP_STATE_CONNECT:
    case SMTP_STATE_HOLD:
    case SMTP_STATE_IDLE:
    case SMTP_STATE_DONE:
    case SMTP_STATE_LAST:
        return 0;
    case SMTP_STATE_BODY:
        return s->res.dot_sent ? state_timeout(s, SMTP_STATE_BODY) : 0;
    default:
        return state_timeout(s, s->state);
    }
}

/* The wait for the next reply starts now: its command was just queued,
 * or the reply before it just completed (a pipelined command was queued
 * earlier, so now is the later of the two). Arms that reply's deadline
 * and restarts the reply-line bucket. */
static void wait_reply(smtp_session_t *s)
{
    s->wait_ms = loop_now_ms(s->loop);
    s->wait_bytes_in = s->st ? stream_bytes_in(s->st) : 0;
    unsigned ms = reply_deadline(s);
    if (ms)
        loop_timer_set(s->loop, &s->deadline_timer, ms);
    else
        loop_timer_cancel(s->loop, &s->deadline_timer);
}

static uint64_t since_ms(const smtp_session_t *s, uint64_t t)
{
    uint64_t now = loop_now_ms(s->loop);
    return now > t ? now - t : 0;
}

/* The transaction's clock starts with MAIL FROM and stops at its final
 * reply (end_transaction(), or the end of the session). */
static void txn_start(smtp_session_t *s)
{
    s->txn_ms = loop_now_ms(s->loop);
    if (s->p.timeouts.transaction_ms)
        loop_timer_set(s->loop, &s->txn_timer, s->p.timeouts.transaction_ms);
}

static void stop_timers(smtp_session_t *s)
{
    loop_timer_cancel(s->loop, &s->deadline_timer);
    loop_timer_cancel(s->loop, &s->txn_timer);
}

/* The reply being read has n lines so far: more than the bucket allows
 * after the time spent waiting for it ends the session (no QUIT: the
 * server is still talking). Returns 1 then. */
static int reply_flood(smtp_session_t *s, unsigned n)
{
    const smtp_timeouts_t *t = &s->p.timeouts;
    if (t->reply_lines_burst == 0 || s->finished)
        return 0;
    uint64_t waited = since_ms(s, s->wait_ms);
    uint64_t allowed = t->reply_lines_burst + (uint64_t)t->reply_lines_per_s * waited / 1000;
    if (n <= allowed)
        return 0;
    metrics_inc(MET_SMTP_REPLY_FLOODS, 1);
    log_info("smtp", "reply_flood", "%s session=%016" PRIx64 " mx=%s state=%s lines=%u allowed=%llu elapsed_ms=%llu",
             SESS_MSG(s), s->id, LOG_Q(s->p.mx_host), smtp_strstate(s->state), n, (unsigned long long)allowed,
             (unsigned long long)waited);
    session_fail(s, SMTP_EPROTO, 0, "reply flood: %u lines in %llu ms while %s", n, (unsigned long long)waited,
                 state_doing(s));
    return 1;
}

static void set_rcpt_reply(smtp_rcpt_reply_t *rr, int code, const char *enh, const char *text, int final)
{
    rr->code = code;
    util_copy_text(rr->enh, sizeof(rr->enh), enh);
    util_copy_text(rr->text, sizeof(rr->text), text);
    rr->final = final;
}

/* A reply that settles every recipient still waiting for one: all of
 * them when MAIL is refused; after RCPT only the accepted ones are left
 * (the refused ones already have their answer), for DATA and end of data.
 * Recipients deferred to another transaction (452 too many) stay open. */
static void settle_rcpts(smtp_session_t *s, int code, const char *enh, const char *text)
{
    for (size_t i = 0; i < s->res.nrcpts; i++) {
        smtp_rcpt_reply_t *rr = &s->res.rcpts[i];
        if (!rr->final && !rr->retry_txn)
            set_rcpt_reply(rr, code, enh, text, 1);
    }
}

static void log_cmd(smtp_session_t *s, const char *cmd)
{
    if (strncmp(cmd, "AUTH ", 5) == 0 || s->state == SMTP_STATE_AUTH)
        cmd = "AUTH ********"; /* never log credentials */
    log_debug("smtp", "send", "%s session=%016" PRIx64 " cmd=%s", SESS_MSG(s), s->id, LOG_Q(cmd));
}

static void send_cmd(smtp_session_t *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void send_cmd(smtp_session_t *s, const char *fmt, ...)
{
    buf_t b = BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(&b, fmt, ap);
    va_end(ap);
    log_cmd(s, buf_head(&b));
    buf_puts(&b, "\r\n");
    stream_write(s->st, buf_head(&b), buf_size(&b));
    buf_free(&b);
    s->expect++;
}

static SSL_CTX *tls_ctx(const smtp_session_t *s)
{
    return s->p.tls == SMTP_TLS_VERIFY ? s->p.tls_verify_ctx : s->p.tls_noverify_ctx;
}

/* The envelope can start: AUTH first in relay mode. */
static void ready_for_mail(smtp_session_t *s)
{
    if (s->p.auth_user && s->p.auth_user[0]) {
        if (s->st == NULL || !stream_is_tls(s->st)) {
            /* credentials never travel in the clear */
            session_fail(s, SMTP_ETLS, 1, "AUTH configured but the session is not protected by TLS");
            return;
        }
        enter_state(s, SMTP_STATE_AUTH);
        return;
    }
    enter_state(s, SMTP_STATE_MAIL);
}

/* After EHLO or HELO in plaintext: STARTTLS or straight to the envelope. */
static void after_hello(smtp_session_t *s)
{
    int offered = (s->res.features.flags & SMTP_FEAT_STARTTLS) != 0;
    if (s->p.tls == SMTP_TLS_VERIFY && (s->p.mx_host == NULL || s->p.mx_host[0] == '\0')) {
        session_fail(s, SMTP_ETLS, 1, "TLS verification required but no MX host name to verify");
        return;
    }
    if (s->p.tls != SMTP_TLS_NONE && offered && tls_ctx(s) != NULL) {
        enter_state(s, SMTP_STATE_STARTTLS);
        return;
    }
    if (s->p.tls >= SMTP_TLS_REQUIRED) {
        session_fail(s, SMTP_ETLS, 1, "%s", tls_ctx(s) == NULL ? "TLS required but no TLS context configured"
                                            : "TLS required but the server does not offer STARTTLS");
        return;
    }
    ready_for_mail(s);
}

/* The payload goes out of the caller's memory: referenced, not copied
 * (the same bytes serve IMAP APPEND). One system call for all of it as
 * far as the socket takes it. */
/* The payload byte at offset off (segments or one buffer). */
static char payload_at(const smtp_session_t *s, size_t off)
{
    if (s->p.nsegs == 0)
        return s->p.data[off];
    for (size_t i = 0; i < s->p.nsegs; i++) {
        if (off < s->p.segs[i].n)
            return s->p.segs[i].p[off];
        off -= s->p.segs[i].n;
    }
    return '\0';
}

/* Where a held transaction stops: before the ".\r\n" that ends the
 * payload (it always follows a CRLF), so that only the final dot waits
 * for the owner; 0 (everything waits) for a payload without one. */
static size_t hold_point(const smtp_session_t *s)
{
    size_t n = s->p.len; /* with segments too: their total (payload_len) */
    if (n >= 5 && payload_at(s, n - 5) == '\r' && payload_at(s, n - 4) == '\n' && payload_at(s, n - 3) == '.' &&
        payload_at(s, n - 2) == '\r' && payload_at(s, n - 1) == '\n')
        return n - 3;
    return 0;
}

/* Write payload bytes [from, to), from where they lie. */
static void send_body(smtp_session_t *s, size_t from, size_t to)
{
    stream_cork(s->st, 1);
    if (s->p.nsegs == 0) {
        if (to > from)
            stream_write_ref(s->st, s->p.data + from, to - from);
    } else {
        size_t at = 0;
        for (size_t i = 0; i < s->p.nsegs && at < to; i++) {
            size_t a = at, b = at + s->p.segs[i].n;
            at = b;
            if (b <= from)
                continue;
            size_t lo = a < from ? from : a, hi = b > to ? to : b;
            if (hi > lo)
                stream_write_ref(s->st, s->p.segs[i].p + (lo - a), hi - lo);
        }
    }
    stream_cork(s->st, 0);
}

static void body_sent(smtp_session_t *s)
{
    s->res.dot_sent = 1;
    stream_set_timeout(s->st, state_timeout(s, SMTP_STATE_BODY));
    wait_reply(s); /* data_done, from the dot */
    log_debug("smtp", "send", "%s session=%016" PRIx64 " body_bytes=%zu", SESS_MSG(s), s->id, s->p.len);
}

/* Move the receive cursor without sending (pipelined replies). */
static void set_state(smtp_session_t *s, smtp_state_t next)
{
    log_debug("smtp", "state", "%s session=%016" PRIx64 " from=%s to=%s pipelined=1", SESS_MSG(s), s->id,
              smtp_strstate(s->state), smtp_strstate(next));
    s->state = next;
    stream_set_timeout(s->st, state_timeout(s, next));
    wait_reply(s); /* the reply before completed just now */
}

/* One AUTH line (credentials), sent without logging its content. */
static void send_auth(smtp_session_t *s, const char *prefix, const unsigned char *p, size_t n)
{
    buf_t b = BUF_INIT;
    buf_puts(&b, prefix);
    base64_encode(&b, p, n);
    log_cmd(s, "AUTH");
    buf_puts(&b, "\r\n");
    stream_write(s->st, buf_head(&b), buf_size(&b));
    buf_free(&b);
    s->expect++;
}

static int auth_offers(const smtp_session_t *s, const char *mech)
{
    const char *a = s->res.features.auth;
    size_t ml = strlen(mech);
    while (*a) {
        size_t l = strcspn(a, " ");
        if (l == ml && util_strncasecmp(a, mech, ml) == 0)
            return 1;
        a += l;
        while (*a == ' ')
            a++;
    }
    return 0;
}

static void auth_step(smtp_session_t *s)
{
    const char *u = s->p.auth_user, *pw = s->p.auth_pass ? s->p.auth_pass : "";
    if (s->auth_step == 0) {
        if (auth_offers(s, "PLAIN")) {
            /* RFC 4616: authzid NUL authcid NUL passwd, as the initial response */
            size_t ul = strlen(u), pl = strlen(pw);
            unsigned char *m = xmalloc(ul + pl + 2);
            m[0] = '\0';
            memcpy(m + 1, u, ul);
            m[ul + 1] = '\0';
            memcpy(m + ul + 2, pw, pl);
            send_auth(s, "AUTH PLAIN ", m, ul + pl + 2);
            memset(m, 0, ul + pl + 2);
            free(m);
            s->auth_step = 10; /* PLAIN: the next reply is the verdict */
        } else if (auth_offers(s, "LOGIN")) {
            send_cmd(s, "AUTH LOGIN");
            s->auth_step = 1;
        } else {
            session_fail(s, SMTP_EPROTO, 1, "AUTH configured but the server offers neither PLAIN nor LOGIN (\"%s\")",
                         s->res.features.auth);
        }
    } else if (s->auth_step == 1) {
        send_auth(s, "", (const unsigned char *)u, strlen(u));
        s->auth_step = 2;
    } else if (s->auth_step == 2) {
        send_auth(s, "", (const unsigned char *)pw, strlen(pw));
        s->auth_step = 10;
    }
}

static int use_pipelining(const smtp_session_t *s)
{
    return (s->res.features.flags & SMTP_FEAT_PIPELINING) && !s->p.no_pipelining;
}

/* Local refusals before MAIL: the server said what it cannot take. */
static int refuse_locally(smtp_session_t *s)
{
    size_t size = s->p.message_size ? s->p.message_size : s->p.len;
    const smtp_features_t *f = &s->res.features;
    const char *who = s->p.mx_host ? s->p.mx_host : s->addr_text;
    char text[200];
    if ((f->flags & SMTP_FEAT_SIZE) && f->size_max > 0 && size > f->size_max) {
        /* RFC 1870 §6: do not send what the server already said it refuses */
        snprintf(text, sizeof(text), "message size %zu exceeds size limit %zu of server %s", size,
                 f->size_max, who);
        settle_rcpts(s, 552, "5.3.4", text);
        return 1;
    }
    if ((s->p.need & SMTP_NEED_SMTPUTF8) && !(f->flags & SMTP_FEAT_SMTPUTF8)) {
        snprintf(text, sizeof(text), "message needs SMTPUTF8 but server %s does not support it", who);
        settle_rcpts(s, 553, "5.6.7", text);
        return 1;
    }
    if ((s->p.need & SMTP_NEED_8BITMIME) && !(f->flags & SMTP_FEAT_8BITMIME)) {
        snprintf(text, sizeof(text), "message needs 8BITMIME but server %s does not support it", who);
        settle_rcpts(s, 554, "5.6.3", text);
        return 1;
    }
    return 0;
}

static void end_transaction(smtp_session_t *s);

static void send_envelope(smtp_session_t *s)
{
    size_t size = s->p.message_size ? s->p.message_size : s->p.len;
    const smtp_features_t *f = &s->res.features;
    buf_t b = BUF_INIT;
    buf_printf(&b, "MAIL FROM:<%s>", s->p.mail_from);
    if (f->flags & SMTP_FEAT_SIZE)
        buf_printf(&b, " SIZE=%zu", size);
    if ((s->p.need & SMTP_NEED_8BITMIME) && (f->flags & SMTP_FEAT_8BITMIME))
        buf_puts(&b, " BODY=8BITMIME");
    if ((s->p.need & SMTP_NEED_SMTPUTF8) && (f->flags & SMTP_FEAT_SMTPUTF8))
        buf_puts(&b, " SMTPUTF8");
    if (!s->batch) {
        send_cmd(s, "%s", buf_head(&b));
        buf_free(&b);
        return;
    }
    /* RFC 2920 §3.1: MAIL, RCPT and DATA may all be in one group; DATA
     * is the last command of it */
    log_cmd(s, buf_head(&b));
    buf_puts(&b, "\r\n");
    s->expect++;
    for (size_t i = 0; i < s->p.nrcpts; i++) {
        size_t at = buf_size(&b);
        buf_printf(&b, "RCPT TO:<%s>", s->p.rcpts[i]);
        log_cmd(s, buf_head(&b) + at);
        buf_puts(&b, "\r\n");
        s->expect++;
    }
    s->rcpt_sent = s->p.nrcpts;
    log_cmd(s, "DATA");
    buf_puts(&b, "DATA\r\n");
    s->expect++;
    stream_write(s->st, buf_head(&b), buf_size(&b));
    buf_free(&b);
}

/* The 354 is in: hand the accepted recipients to the owner, who resumes
 * now or later. Runs inside a stream callback (on_reply), whose in_cb
 * count defers a release the hook might cause. */
static void hold_body(smtp_session_t *s)
{
    size_t *acc = xcalloc(s->naccepted ? s->naccepted : 1, sizeof(*acc));
    size_t n = 0;
    for (size_t i = 0; i < s->res.nrcpts && n < s->naccepted; i++)
        if (s->res.rcpts[i].accepted)
            acc[n++] = i;
    s->held_ms = loop_now_ms(s->loop);
    s->hold_resumed = 0;
    s->hold_at = hold_point(s);
    s->held = 1;
    /* the body goes now; only the final dot waits for the owner */
    send_body(s, 0, s->hold_at);
    s->in_hold_cb = 1;
    log_debug("smtp", "hold", "%s session=%016" PRIx64 " accepted=%zu held_bytes=%zu", SESS_MSG(s), s->id, n,
              s->p.len - s->hold_at);
    s->p.before_body(s->p.before_body_arg, s, acc, n);
    s->in_hold_cb = 0;
    free(acc);
    if (s->freed || s->finished || s->state != SMTP_STATE_HOLD)
        return;
    if (s->hold_aborted)
        session_fail(s, SMTP_EABORTED, 0, "%s", s->abort_why);
    else if (s->hold_resumed)
        enter_state(s, SMTP_STATE_BODY);
}

static void enter_state(smtp_session_t *s, smtp_state_t next)
{
    log_debug("smtp", "state", "%s session=%016" PRIx64 " from=%s to=%s", SESS_MSG(s), s->id,
              smtp_strstate(s->state), smtp_strstate(next));
    s->state = next;
    if (s->st)
        stream_set_timeout(s->st, state_timeout(s, next));
    if (next != SMTP_STATE_TLS_HANDSHAKE)
        wait_reply(s); /* the handshake runs on STARTTLS's deadline */
    if (next == SMTP_STATE_MAIL)
        txn_start(s);

    switch (next) {
    case SMTP_STATE_GREETING:
        s->expect++; /* the server speaks first */
        break;
    case SMTP_STATE_EHLO:
    case SMTP_STATE_EHLO_TLS:
        send_cmd(s, "EHLO %s", s->p.helo_name);
        break;
    case SMTP_STATE_HELO:
        send_cmd(s, "HELO %s", s->p.helo_name);
        break;
    case SMTP_STATE_STARTTLS:
        send_cmd(s, "STARTTLS");
        break;
    case SMTP_STATE_TLS_HANDSHAKE: {
        s->tls_ms = loop_now_ms(s->loop);
        SSL_SESSION *resume = s->p.tls_cache ? tls_session_cache_get(s->p.tls_cache, s->tls_key) : NULL;
        log_debug("smtp", "tls_resume", "%s session=%016" PRIx64 " offered=%d", SESS_MSG(s), s->id, resume != NULL);
        /* refuses when bytes are buffered after the 220: STARTTLS injection */
        if (stream_tls_client_resume(s->st, tls_ctx(s), s->p.mx_host,
                                     s->p.tls == SMTP_TLS_VERIFY ? s->p.mx_host : NULL, resume) < 0)
            session_fail(s, SMTP_ETLS, 0, "%s", stream_error(s->st));
        break;
    }
    case SMTP_STATE_AUTH:
        s->auth_step = 0;
        auth_step(s);
        break;
    case SMTP_STATE_MAIL:
        s->batch = use_pipelining(s);
        s->res.pipelined = s->batch;
        if (refuse_locally(s)) {
            s->batch = 0;
            end_transaction(s);
            break;
        }
        send_envelope(s);
        break;
    case SMTP_STATE_RCPT:
        send_cmd(s, "RCPT TO:<%s>", s->p.rcpts[s->rcpt_sent]);
        s->rcpt_sent++;
        break;
    case SMTP_STATE_DATA:
        send_cmd(s, "DATA");
        break;
    case SMTP_STATE_HOLD:
        s->expect++; /* the reply to the final dot, owed from the first byte of the body */
        hold_body(s);
        break;
    case SMTP_STATE_BODY:
        if (!s->held)
            s->expect++; /* the reply to the final dot */
        send_body(s, s->hold_at, s->p.len);
        if (stream_pending_out(s->st) == 0)
            body_sent(s);
        /* else STREAM_EV_DRAINED completes it */
        break;
    case SMTP_STATE_RSET:
        send_cmd(s, "RSET");
        break;
    case SMTP_STATE_QUIT:
        send_cmd(s, "QUIT");
        break;
    case SMTP_STATE_IDLE:
        /* the pool decides how long an idle connection lives */
        stream_set_timeout(s->st, 0);
        stream_trim(s->st);
        s->idle_report = 1;
        loop_timer_set(s->loop, &s->defer_timer, 0);
        break;
    case SMTP_STATE_CONNECT:
    case SMTP_STATE_DONE:
    case SMTP_STATE_LAST:
        finish(s);
        break;
    }
}

/* The transaction is over (whatever the answers): clean up the server's
 * side when it may still hold a transaction, then idle or quit. */
static void end_transaction(smtp_session_t *s)
{
    loop_timer_cancel(s->loop, &s->txn_timer); /* the final reply is in */
    if (s->txn_open) {
        enter_state(s, SMTP_STATE_RSET);
        return;
    }
    s->ntxn++;
    if (s->p.keep_open && s->res.status == SMTP_OK && s->st)
        enter_state(s, SMTP_STATE_IDLE);
    else
        enter_state(s, SMTP_STATE_QUIT);
}

/* RFC 5321 §4.5.3.1.10: "452 too many recipients" asks for another
 * transaction, it is no verdict on the recipient. */
static int too_many_rcpts(const smtp_reply_t *r)
{
    if (r->code != 452 && r->code != 451)
        return 0;
    if (strcmp(r->enh, "4.5.3") == 0)
        return 1;
    const char *t = r->text;
    for (; *t; t++)
        if (util_strncasecmp(t, "too many recipients", 19) == 0)
            return 1;
    return 0;
}

static void rcpt_reply(smtp_session_t *s, const smtp_reply_t *r)
{
    int cls = r->code / 100;
    smtp_rcpt_reply_t *rr = &s->res.rcpts[s->rcpt_done++];
    if (s->mail_failed)
        return; /* 503 "need MAIL first": the MAIL refusal already answered it */
    if (too_many_rcpts(r)) {
        set_rcpt_reply(rr, r->code, r->enh, r->text, 0);
        rr->retry_txn = 1;
        return;
    }
    set_rcpt_reply(rr, r->code, r->enh, r->text, cls != 2);
    if (cls == 2) {
        rr->accepted = 1;
        s->naccepted++;
    }
}

/* A reply that cannot answer the command it is matched with (354 to MAIL
 * or RCPT, 2xx to DATA): the server answered fewer (or more) replies than
 * we sent commands, so nothing it says from here can be matched. Drop the
 * connection at once, no QUIT, never reused. */
static void out_of_step(smtp_session_t *s, const char *cmd, const smtp_reply_t *r)
{
    session_fail(s, SMTP_EPROTO, 0, "out-of-step reply to %s: %d %s", cmd, r->code, r->text);
}

static void on_reply(smtp_session_t *s, const smtp_reply_t *r)
{
    int cls = r->code / 100;

    /* "421 ... closing transmission channel" may come at any time; at the
     * end of data it is that message's answer, settled below like any other */
    if (r->code == 421 && s->state != SMTP_STATE_BODY && s->state != SMTP_STATE_QUIT) {
        session_rejected(s, r);
        return;
    }

    switch (s->state) {
    case SMTP_STATE_GREETING:
        if (cls == 2)
            enter_state(s, SMTP_STATE_EHLO);
        else
            session_rejected(s, r);
        break;

    case SMTP_STATE_EHLO:
        if (cls == 2) {
            s->res.features = s->ehlo_feat;
            after_hello(s);
        } else if (cls == 5) {
            enter_state(s, SMTP_STATE_HELO); /* RFC 5321 §3.2: an old server */
        } else {
            session_rejected(s, r);
        }
        break;

    case SMTP_STATE_HELO:
        if (cls == 2) {
            memset(&s->res.features, 0, sizeof(s->res.features));
            after_hello(s);
        } else {
            session_rejected(s, r);
        }
        break;

    case SMTP_STATE_STARTTLS:
        if (cls == 2)
            enter_state(s, SMTP_STATE_TLS_HANDSHAKE);
        else if (s->p.tls == SMTP_TLS_OPPORTUNISTIC)
            ready_for_mail(s); /* still a valid plaintext session */
        else
            session_fail(s, SMTP_ETLS, 1, "STARTTLS refused by server: %d%s%s %s", r->code,
                         r->enh[0] ? " " : "", r->enh, r->text);
        break;

    case SMTP_STATE_EHLO_TLS:
        if (cls == 2) {
            s->res.features = s->ehlo_feat;
            ready_for_mail(s);
        } else {
            session_rejected(s, r);
        }
        break;

    case SMTP_STATE_AUTH:
        if (cls == 3 && (s->auth_step == 1 || s->auth_step == 2)) {
            wait_reply(s); /* each AUTH line is a command of its own */
            auth_step(s);
        }
        else if (cls == 2 && s->auth_step == 10)
            enter_state(s, SMTP_STATE_MAIL);
        else if (cls == 3)
            session_fail(s, SMTP_EPROTO, 0, "unexpected AUTH challenge: %d %s", r->code, r->text);
        else
            /* 535 5.7.8 bad credentials, 454 4.7.0 temporary failure: the
             * relay refused us, not the recipients */
            session_rejected(s, r);
        break;

    case SMTP_STATE_MAIL:
        s->res.txn_replies++;
        if (cls == 3) {
            out_of_step(s, "MAIL FROM", r);
        } else if (cls == 2) {
            s->txn_open = 1;
            if (s->batch)
                set_state(s, SMTP_STATE_RCPT);
            else
                enter_state(s, SMTP_STATE_RCPT);
        } else {
            /* the sender was refused: that is every recipient's answer */
            settle_rcpts(s, r->code, r->enh, r->text);
            if (s->batch) {
                s->mail_failed = 1; /* the RCPT and DATA replies are still owed */
                set_state(s, SMTP_STATE_RCPT);
            } else {
                end_transaction(s);
            }
        }
        break;

    case SMTP_STATE_RCPT:
        s->res.txn_replies++;
        if (cls == 3) {
            out_of_step(s, "RCPT TO", r);
            break;
        }
        rcpt_reply(s, r);
        if (s->rcpt_done < s->res.nrcpts) {
            if (s->batch) {
                stream_set_timeout(s->st, state_timeout(s, SMTP_STATE_RCPT));
                wait_reply(s); /* the next RCPT's reply: its wait starts now */
            } else
                enter_state(s, SMTP_STATE_RCPT);
        } else if (s->batch) {
            set_state(s, SMTP_STATE_DATA); /* DATA went out with the batch */
        } else if (s->naccepted > 0) {
            enter_state(s, SMTP_STATE_DATA);
        } else {
            end_transaction(s);
        }
        break;

    case SMTP_STATE_DATA:
        s->res.txn_replies++;
        if (cls == 3) {
            if (s->naccepted > 0 && !s->mail_failed) {
                enter_state(s, s->p.before_body ? SMTP_STATE_HOLD : SMTP_STATE_BODY);
            } else {
                /* 354 with nobody accepted: RSET or QUIT now would be
                 * taken as message text. Every recipient has its answer;
                 * drop this connection rather than send an empty message. */
                log_warn("smtp", "data_without_rcpt", "%s session=%016" PRIx64 " code=%d action=close",
                         SESS_MSG(s), s->id, r->code);
                s->txn_open = 0;
                finish(s);
            }
        } else if (cls == 2) {
            /* accepting DATA without 354 would "deliver" a message never
             * sent; usually the late answer to an earlier command */
            out_of_step(s, "DATA", r);
        } else {
            /* in a batch this is usually "554 5.5.1 no valid recipients"
             * after every RCPT was refused: only accepted ones take it */
            if (s->naccepted > 0 && !s->mail_failed)
                settle_rcpts(s, r->code, r->enh, r->text);
            end_transaction(s);
        }
        break;

    case SMTP_STATE_HOLD: /* the body is going out: an answer before the dot, as in BODY */
    case SMTP_STATE_BODY:
        s->res.txn_replies++;
        if (cls == 3) {
            session_fail(s, SMTP_EPROTO, 0, "unexpected reply to end of data: %d %s", r->code, r->text);
            break;
        }
        if (!s->res.dot_sent)
            log_warn("smtp", "early_reply", "%s session=%016" PRIx64 " code=%d before=end_of_data",
                     SESS_MSG(s), s->id, r->code);
        settle_rcpts(s, r->code, r->enh, r->text);
        s->txn_open = 0;
        if (r->code == 421) {
            finish(s);
        } else if (!s->res.dot_sent) {
            /* the server answered before reading the whole body: the rest
             * of our bytes would be read as commands, and a QUIT as part
             * of the body; close without another word */
            s->p.keep_open = 0;
            s->ntxn++;
            finish(s);
        } else {
            end_transaction(s);
        }
        break;

    case SMTP_STATE_RSET:
        s->txn_open = 0;
        if (cls != 2)
            s->p.keep_open = 0; /* a server that cannot reset cannot be reused */
        end_transaction(s);
        break;

    case SMTP_STATE_QUIT:
        finish(s);
        break;

    case SMTP_STATE_CONNECT:
    case SMTP_STATE_TLS_HANDSHAKE:
    case SMTP_STATE_IDLE:
    case SMTP_STATE_DONE:
    case SMTP_STATE_LAST:
        session_fail(s, SMTP_EPROTO, 0, "unexpected reply while %s: %d %s", state_doing(s), r->code,
                     r->text);
        break;
    }
}

/* Keep the newest session/ticket the server issued for the next connect. */
static void harvest_tls_session(smtp_session_t *s)
{
    if (s->p.tls_cache == NULL || s->st == NULL)
        return;
    SSL_SESSION *sess = stream_tls_take_session(s->st);
    if (sess) {
        log_debug("smtp", "tls_session", "%s session=%016" PRIx64 " stored=1 resumable=%d lifetime=%lu",
                  SESS_MSG(s), s->id, SSL_SESSION_is_resumable(sess), (unsigned long)SSL_SESSION_get_ticket_lifetime_hint(sess));
        tls_session_cache_put(s->p.tls_cache, s->tls_key, sess);
    }
}

/* An IDLE connection ended. When the end of the transaction has not been
 * reported yet, it still is (not reusable); otherwise the owner hears it
 * through the closed callback. */
static void idle_lost(smtp_session_t *s)
{
    if (s->idle_report) {
        close_stream(s);
        return;
    }
    closed(s);
}

/* mailpump_smtp_command_seconds: a reply complete, timed from its wait's
 * start (wait_reply: the command queued; pipelined, the reply before it;
 * the final dot written). AUTH and RSET are not timed. */
static void observe_reply(const smtp_session_t *s)
{
    metrics_smtp_cmd_t c;
    switch (s->state) {
    case SMTP_STATE_GREETING: c = MET_CMD_GREETING; break;
    case SMTP_STATE_EHLO:
    case SMTP_STATE_EHLO_TLS:
    case SMTP_STATE_HELO: c = MET_CMD_EHLO; break;
    case SMTP_STATE_STARTTLS: c = MET_CMD_STARTTLS; break;
    case SMTP_STATE_MAIL: c = MET_CMD_MAIL; break;
    case SMTP_STATE_RCPT: c = MET_CMD_RCPT; break;
    case SMTP_STATE_DATA: c = MET_CMD_DATA; break;
    case SMTP_STATE_BODY:
        if (!s->res.dot_sent)
            return;
        c = MET_CMD_DOT;
        break;
    case SMTP_STATE_QUIT: c = MET_CMD_QUIT; break;
    default: return;
    }
    metrics_smtp_command(c, since_ms(s, s->wait_ms) * 1000);
}

static void on_data(smtp_session_t *s)
{
    buf_t *in = stream_input(s->st);
    if (s->state == SMTP_STATE_IDLE) {
        /* nobody asked: typically "421 idle timeout" before a close */
        log_debug("smtp", "idle_input", "%s session=%016" PRIx64 " bytes=%zu", SESS_MSG(s), s->id, buf_size(in));
        idle_lost(s);
        return;
    }
    harvest_tls_session(s);
    while (!s->finished && s->st && buf_size(in) > 0 && s->state != SMTP_STATE_IDLE) {
        smtp_reply_t r;
        size_t used = 0;
        int ehlo = s->state == SMTP_STATE_EHLO || s->state == SMTP_STATE_EHLO_TLS;
        int rc = smtp_reply_parse_resume(buf_head(in), buf_size(in), &s->reply_cur, &used, &r,
                                         ehlo ? ehlo_line : NULL, s);
        if (rc == SMTP_REPLY_AGAIN) {
            reply_flood(s, s->reply_cur.lines);
            return;
        }
        if (rc == SMTP_REPLY_EPROTO) {
            char junk[64];
            util_quote_text(buf_head(in), junk, sizeof(junk));
            session_fail(s, SMTP_EPROTO, 0, "malformed reply while %s: \"%s\"", state_doing(s), junk);
            return;
        }
        if (reply_flood(s, (unsigned)r.nlines))
            return;
        buf_consume(in, used);
        log_debug("smtp", "recv", "%s session=%016" PRIx64 " state=%s code=%d enh=%s lines=%d text=%s",
                  SESS_MSG(s), s->id, smtp_strstate(s->state), r.code, r.enh[0] ? r.enh : "-", r.nlines,
                  LOG_Q(r.text));
        if (s->res.status == SMTP_OK && s->state != SMTP_STATE_QUIT && s->state != SMTP_STATE_RSET &&
            !(s->mail_failed && (s->state == SMTP_STATE_RCPT || s->state == SMTP_STATE_DATA))) {
            /* keep the reply that decided things (or caused the failure),
             * not the courtesy replies to RSET and QUIT */
            s->res.reply = r;
            s->res.has_reply = 1;
        }
        if (s->expect == 0) {
            session_fail(s, SMTP_EPROTO, 0, "unsolicited reply while %s: %d %s", state_doing(s), r.code,
                         r.text);
            return;
        }
        s->expect--;
        observe_reply(s);
        on_reply(s, &r);
        if (s->state == SMTP_STATE_TLS_HANDSHAKE)
            return; /* what follows is TLS, read by the stream */
    }
}

static void on_stream(stream_t *st, stream_event_t ev, void *arg);

static void release(smtp_session_t *s)
{
    free(s->res.rcpts);
    free(s);
}

/* The awaited reply is not complete by its deadline. When nothing at all
 * came since the wait started, the inactivity rule would have ended the
 * session just the same (the stream's timer runs alongside with the same
 * value); otherwise it is the deadline that did: counted and logged. */
static void deadline_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    (void)loop;
    (void)t;
    smtp_session_t *s = arg;
    crash_blame_set(s->p.log_id);
    s->in_cb++;
    if (s->finished || s->freed) {
        /* nothing left to end */
    } else if (s->state == SMTP_STATE_QUIT) {
        finish(s); /* the transaction is over; 221 is a courtesy */
    } else {
        uint64_t got = s->st ? stream_bytes_in(s->st) - s->wait_bytes_in : 0;
        if (got > 0 || s->state == SMTP_STATE_TLS_HANDSHAKE) {
            metrics_inc(MET_SMTP_DEADLINES, 1);
            log_info("smtp", "deadline", "%s session=%016" PRIx64 " mx=%s kind=command state=%s elapsed_ms=%llu "
                     "limit_ms=%u bytes=%llu", SESS_MSG(s), s->id, LOG_Q(s->p.mx_host), smtp_strstate(s->state),
                     (unsigned long long)since_ms(s, s->wait_ms), reply_deadline(s), (unsigned long long)got);
        }
        session_fail(s, SMTP_ETIMEOUT, 0, "timeout while %s", state_doing(s));
    }
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

static void txn_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    (void)loop;
    (void)t;
    smtp_session_t *s = arg;
    crash_blame_set(s->p.log_id);
    s->in_cb++;
    if (!s->finished && !s->freed && s->state != SMTP_STATE_IDLE && s->state != SMTP_STATE_QUIT) {
        metrics_inc(MET_SMTP_DEADLINES, 1);
        log_info("smtp", "deadline", "%s session=%016" PRIx64 " mx=%s kind=transaction state=%s elapsed_ms=%llu "
                 "limit_ms=%u", SESS_MSG(s), s->id, LOG_Q(s->p.mx_host), smtp_strstate(s->state),
                 (unsigned long long)since_ms(s, s->txn_ms), s->p.timeouts.transaction_ms);
        session_fail(s, SMTP_ETIMEOUT, 0, "transaction deadline exceeded while %s", state_doing(s));
    }
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

static void on_stream(stream_t *st, stream_event_t ev, void *arg)
{
    smtp_session_t *s = arg;
    crash_blame_set(s->p.log_id); /* the transaction's message; none when idle */
    s->in_cb++;
    if (s->state == SMTP_STATE_IDLE && ev != STREAM_EV_DATA && ev != STREAM_EV_DRAINED) {
        idle_lost(s); /* the server hung up on an idle connection */
        goto out;
    }
    switch (ev) {
    case STREAM_EV_CONNECTED:
        if (s->state == SMTP_STATE_CONNECT) {
            metrics_smtp_command(MET_CMD_CONNECT, since_ms(s, s->born_ms) * 1000);
            enter_state(s, SMTP_STATE_GREETING);
        }
        break;
    case STREAM_EV_TLS_READY:
        metrics_smtp_command(MET_CMD_TLS, since_ms(s, s->tls_ms) * 1000);
        s->res.tls_version = stream_tls_version(st);
        s->res.tls_cipher = stream_tls_cipher(st);
        s->res.tls_resumed = stream_tls_resumed(st);
        harvest_tls_session(s);
        enter_state(s, SMTP_STATE_EHLO_TLS);
        break;
    case STREAM_EV_DATA:
        on_data(s);
        break;
    case STREAM_EV_DRAINED:
        if (s->state == SMTP_STATE_BODY && !s->res.dot_sent)
            body_sent(s);
        break;
    case STREAM_EV_TIMEOUT:
        if (s->state == SMTP_STATE_QUIT)
            finish(s); /* the transaction is over; 221 is a courtesy */
        else
            session_fail(s, SMTP_ETIMEOUT, 0, "timeout while %s", state_doing(s));
        break;
    case STREAM_EV_CLOSED:
        if (s->state == SMTP_STATE_QUIT)
            finish(s);
        else
            session_fail(s, SMTP_ENETWORK, 0, "connection closed by server while %s", state_doing(s));
        break;
    case STREAM_EV_ERROR:
        if (s->state == SMTP_STATE_QUIT)
            finish(s);
        else if (s->state == SMTP_STATE_TLS_HANDSHAKE)
            session_fail(s, SMTP_ETLS, 0, "%s", stream_error(st));
        else if (s->state == SMTP_STATE_CONNECT)
            session_fail(s, local_errno(stream_errno(st)) ? SMTP_ELOCAL : SMTP_ENETWORK, 0, "%s", stream_error(st));
        else
            session_fail(s, SMTP_ENETWORK, 0, "%s while %s", stream_error(st), state_doing(s));
        break;
    case STREAM_EV_LAST:
        break;
    }
out:
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

/* End of a transaction on a kept connection: report from the loop. */
static void report_idle(smtp_session_t *s)
{
    s->idle_report = 0;
    if (s->st && stream_pending_refs(s->st) > 0)
        close_stream(s); /* never park a connection still sending the owner's bytes */
    s->res.reusable = !s->dead;
    s->res.state = SMTP_STATE_DONE;
    if (s->st)
        s->res.bytes_in = stream_bytes_in(s->st);
    if (s->dead) {
        s->finished = 1;
        s->state = SMTP_STATE_DONE;
    }
    log_session(s);
    unsigned seq = s->txn_seq;
    s->cb(s->cb_arg, s, &s->res);
    if (!s->freed && s->txn_seq == seq) {
        /* parked: what the transaction pointed to belongs to its owner,
         * who is done with it; never touch it again */
        s->p.mail_from = "";
        s->p.rcpts = NULL;
        s->p.nrcpts = 0;
        s->p.data = NULL;
        s->p.len = 0;
        s->p.segs = NULL;
        s->p.nsegs = 0;
        s->p.log_id = NULL;
        s->p.trace_id = NULL;
        s->p.log_ref = NULL;
        s->p.before_body = NULL;
        s->p.before_body_arg = NULL;
    }
}

static void defer_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    smtp_session_t *s = arg;
    crash_blame_set(s->p.log_id);
    s->in_cb++;
    if (s->quitting && s->dead)
        closed(s);
    else if (s->idle_report && s->state == SMTP_STATE_IDLE)
        report_idle(s);
    else
        finish(s);
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

/* With segments, len is their total: SIZE= and the logs use it. */
static void payload_len(smtp_session_t *s)
{
    if (s->p.nsegs == 0)
        return;
    s->p.len = 0;
    for (size_t i = 0; i < s->p.nsegs; i++)
        s->p.len += s->p.segs[i].n;
}

static void reset_txn(smtp_session_t *s, const smtp_session_params_t *p)
{
    s->txn_seq++;
    s->p.mail_from = p->mail_from ? p->mail_from : "";
    s->p.rcpts = p->rcpts;
    s->p.nrcpts = p->nrcpts;
    s->p.data = p->data;
    s->p.len = p->len;
    s->p.segs = p->segs;
    s->p.nsegs = p->nsegs;
    payload_len(s);
    s->p.message_size = p->message_size;
    s->p.log_id = p->log_id;
    s->p.trace_id = p->trace_id;
    s->p.log_ref = p->log_ref;
    s->p.need = p->need;
    s->p.keep_open = p->keep_open;
    s->p.before_body = p->before_body;
    s->p.before_body_arg = p->before_body_arg;
    if (p->txn_timeouts)
        s->p.timeouts = *p->txn_timeouts;
    s->expect = 0;
    memset(&s->reply_cur, 0, sizeof(s->reply_cur));
    s->rcpt_sent = s->rcpt_done = s->naccepted = 0;
    s->batch = s->mail_failed = s->txn_open = 0;
    s->res.status = SMTP_OK;
    s->res.error[0] = '\0';
    s->res.has_reply = 0;
    s->res.dot_sent = 0;
    s->held = s->hold_aborted = 0;
    s->hold_at = 0;
    s->abort_why[0] = '\0';
    s->res.reusable = 0;
    s->res.txn_replies = 0;
    s->res.pipelined = 0;
    free(s->res.rcpts);
    s->res.nrcpts = p->nrcpts;
    s->res.rcpts = xcalloc(p->nrcpts ? p->nrcpts : 1, sizeof(*s->res.rcpts));
}

smtp_session_t *smtp_session_start(loop_t *loop, const smtp_session_params_t *params,
                                   smtp_session_cb cb, void *arg)
{
    smtp_session_t *s = xcalloc(1, sizeof(*s));
    s->loop = loop;
    s->p = *params;
    payload_len(s);
    util_copy_text(s->helo_name, sizeof(s->helo_name),
                   s->p.helo_name && s->p.helo_name[0] ? s->p.helo_name : "localhost");
    s->p.helo_name = s->helo_name;
    if (s->p.mail_from == NULL)
        s->p.mail_from = "";
    if (params->mx_host) {
        util_copy_text(s->mx_host, sizeof(s->mx_host), params->mx_host);
        s->p.mx_host = s->mx_host;
    }
    if (params->addr && params->addrlen <= sizeof(s->addr)) {
        memcpy(&s->addr, params->addr, params->addrlen);
        s->p.addr = (const struct sockaddr *)&s->addr;
    }
    if (params->bind_addr && params->bind_addrlen > 0 && params->bind_addrlen <= sizeof(s->bind_addr)) {
        memcpy(&s->bind_addr, params->bind_addr, params->bind_addrlen);
        s->p.bind_addr = (const struct sockaddr *)&s->bind_addr;
    } else {
        s->p.bind_addr = NULL;
        s->p.bind_addrlen = 0;
    }
    if (params->source_name) {
        util_copy_text(s->source_name, sizeof(s->source_name), params->source_name);
        s->p.source_name = s->source_name;
    }
    s->p.txn_timeouts = NULL;
    s->cb = cb;
    s->cb_arg = arg;
    s->id = util_rand64();
    s->born_ms = loop_now_ms(loop);
    s->state = SMTP_STATE_CONNECT;
    s->res.state = SMTP_STATE_CONNECT;
    s->res.nrcpts = params->nrcpts;
    s->res.rcpts = xcalloc(params->nrcpts ? params->nrcpts : 1, sizeof(*s->res.rcpts));
    smtp_addr_text(params->addr, s->addr_text, sizeof(s->addr_text));
    s->port = util_sockaddr_port(params->addr);
    /* a session is only offered where it was issued: same address, port,
     * name (SNI and verified name) and policy, and from the same source */
    snprintf(s->tls_key, sizeof(s->tls_key), "%s|%u|%s|%d%s%s", s->addr_text, s->port,
             s->p.mx_host ? s->p.mx_host : "", (int)s->p.tls, s->p.source_name ? "|" : "",
             s->p.source_name ? s->p.source_name : "");
    loop_timer_init(&s->defer_timer, defer_fired, s);
    loop_timer_init(&s->deadline_timer, deadline_fired, s);
    loop_timer_init(&s->txn_timer, txn_fired, s);

    log_debug("smtp", "state", "%s session=%016" PRIx64 " to=%s mx=%s addr=%s port=%u", SESS_MSG(s), s->id,
              smtp_strstate(SMTP_STATE_CONNECT), LOG_Q(s->p.mx_host), s->addr_text, s->port);
    s->st = stream_new(loop, on_stream, s);
    /* the parser refuses a reply past its budget first: this is only the
     * stream's backstop, never more unparsed than one reply may take */
    stream_set_max_input(s->st, SMTP_REPLY_MAX_BYTES);
    stream_set_timeout(s->st, state_timeout(s, SMTP_STATE_CONNECT));
    if (params->nrcpts == 0 ||
        stream_connect_from(s->st, s->p.bind_addr, s->p.bind_addrlen, params->addr, params->addrlen) < 0) {
        /* report from the loop, never from inside the caller's start call;
         * a source address that cannot be bound is ours, never the MX's */
        s->res.status = params->nrcpts == 0                                             ? SMTP_EPROTO
                        : stream_bind_failed(s->st) || local_errno(stream_errno(s->st)) ? SMTP_ELOCAL
                                                                                        : SMTP_ENETWORK;
        snprintf(s->res.error, sizeof(s->res.error), "%s",
                 params->nrcpts == 0 ? "no recipients" : stream_error(s->st));
        loop_timer_set(loop, &s->defer_timer, 0);
    }
    return s;
}

int smtp_session_next(smtp_session_t *s, const smtp_session_params_t *txn, smtp_session_cb cb, void *arg)
{
    if (s == NULL || s->state != SMTP_STATE_IDLE || s->finished || s->dead || s->quitting ||
        txn->nrcpts == 0)
        return -1;
    loop_timer_cancel(s->loop, &s->defer_timer);
    s->idle_report = 0;
    s->cb = cb;
    s->cb_arg = arg;
    reset_txn(s, txn);
    s->res.reused = 1;
    /* a refusal made locally (SIZE) answers from IDLE again: through the
     * defer timer, so never from inside this call */
    enter_state(s, SMTP_STATE_MAIL);
    return 0;
}

void smtp_session_resume(smtp_session_t *s)
{
    if (s == NULL || s->freed || s->finished || s->state != SMTP_STATE_HOLD)
        return;
    if (s->in_hold_cb) {
        s->hold_resumed = 1; /* hold_body() goes on once the hook returns */
        return;
    }
    log_debug("smtp", "resume", "%s session=%016" PRIx64 " held_ms=%llu", SESS_MSG(s), s->id,
              (unsigned long long)(loop_now_ms(s->loop) - s->held_ms));
    s->in_cb++;
    enter_state(s, SMTP_STATE_BODY);
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

void smtp_session_abort(smtp_session_t *s, const char *why)
{
    if (s == NULL || s->freed || s->finished || s->state != SMTP_STATE_HOLD)
        return;
    util_copy_text(s->abort_why, sizeof(s->abort_why), why && why[0] ? why : "abandoned by the sender");
    if (s->in_hold_cb) {
        s->hold_aborted = 1; /* hold_body() acts on it once the hook returns */
        return;
    }
    s->in_cb++;
    /* the final dot was never written: closing the connection now makes
     * the server discard the transaction (RFC 5321 §4.1.1.4) */
    session_fail(s, SMTP_EABORTED, 0, "%s", s->abort_why);
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

void smtp_session_set_closed_cb(smtp_session_t *s, smtp_session_closed_cb cb, void *arg)
{
    s->closed_cb = cb;
    s->closed_arg = arg;
}

void smtp_session_quit(smtp_session_t *s)
{
    if (s == NULL || s->finished || s->quitting)
        return;
    s->quitting = 1;
    loop_timer_cancel(s->loop, &s->defer_timer);
    s->idle_report = 0;
    if (s->state == SMTP_STATE_IDLE && s->st && !s->dead) {
        enter_state(s, SMTP_STATE_QUIT);
        return;
    }
    close_stream(s);
    loop_timer_set(s->loop, &s->defer_timer, 0); /* closed_cb from the loop */
}

int smtp_session_usable(const smtp_session_t *s)
{
    return s != NULL && s->state == SMTP_STATE_IDLE && !s->finished && !s->dead && !s->quitting &&
           s->st != NULL && !s->idle_report && !stream_peek_closed(s->st);
}

smtp_state_t smtp_session_state(const smtp_session_t *s)
{
    return s->state;
}

const smtp_features_t *smtp_session_features(const smtp_session_t *s)
{
    return &s->res.features;
}

unsigned smtp_session_transactions(const smtp_session_t *s)
{
    return s->ntxn;
}

uint64_t smtp_session_age_ms(const smtp_session_t *s)
{
    uint64_t now = loop_now_ms(s->loop);
    return now > s->born_ms ? now - s->born_ms : 0;
}

void smtp_session_free(smtp_session_t *s)
{
    if (s == NULL || s->freed)
        return;
    s->freed = 1;
    s->finished = 1; /* a cancel: the callback must not fire any more */
    loop_timer_cancel(s->loop, &s->defer_timer);
    stop_timers(s);
    if (s->st) {
        stream_free(s->st);
        s->st = NULL;
    }
    if (s->in_cb == 0)
        release(s);
}

uint64_t smtp_session_id(const smtp_session_t *s)
{
    return s->id;
}

/*
 * SUMMARY
 *  deliverer/session.c - the SMTP client state machine (one connection,
 *  one transaction).
 * DESCRIPTION
 *  Shape after OpenSMTPD mta_session.c: enter_state() sends the command
 *  that belongs to a state, on_reply() switches on the state to decide
 *  the next one, and smtp_strstate() names states for "%s -> %s" traces.
 *  Everything per state (name, timeout, how to word a failure) lives in
 *  one table, after Postfix smtp_proto.c.
 *
 *  Input is read only through smtp_reply_parse_lines(); the EHLO keywords
 *  arrive through its per-line callback, so nothing parses continuations
 *  twice. s->expect counts the replies the server owes us: a reply nobody
 *  asked for is a protocol error (and the hook for PIPELINING later).
 *
 *  Lifetime (STYLE §4): the owner's callback fires exactly once, from a
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
 *  session id, MX, TLS version and the result; state transitions, commands
 *  and replies at debug. Sessions ending in a network, TLS or timeout
 *  error count in MET_SMTP_SESSION_ERRORS (opened sessions are counted by
 *  the worker from deliver_result_t.attempts_made).
 */
#include "deliverer/session.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/stream.h"
#include "core/util.h"
#include "deliverer/outcome.h"
#include "metrics/metrics.h"

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
    smtp_session_result_t res;
    loop_timer_t          defer_timer;
    int                   in_cb;
    int                   freed;
    int                   finished;
    char                  addr_text[64];
    unsigned              port;
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
    [SMTP_STATE_MAIL] = { "MAIL", offsetof(smtp_timeouts_t, mail_ms), "sending MAIL FROM" },
    [SMTP_STATE_RCPT] = { "RCPT", offsetof(smtp_timeouts_t, rcpt_ms), "sending RCPT TO" },
    [SMTP_STATE_DATA] = { "DATA", offsetof(smtp_timeouts_t, data_init_ms), "sending DATA command" },
    [SMTP_STATE_BODY] = { "BODY", offsetof(smtp_timeouts_t, data_block_ms), "sending message body" },
    [SMTP_STATE_RSET] = { "RSET", offsetof(smtp_timeouts_t, rset_ms), "sending RSET" },
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
};

/* logfmt-safe one-word form of the status, for result= in the log line */
static const char *const status_token[] = { "ok", "network", "timeout", "tls", "protocol", "rejected" };
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
    };
    unsigned *dst = (unsigned *)t;
    const unsigned *src = (const unsigned *)&rfc;
    if (scale_pct == 0)
        scale_pct = 100;
    for (size_t i = 0; i < sizeof(rfc) / sizeof(unsigned); i++) {
        uint64_t v = (uint64_t)src[i] * scale_pct / 100;
        dst[i] = v == 0 ? 1 : v > UINT32_MAX ? UINT32_MAX : (unsigned)v;
    }
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

static unsigned addr_port(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)sa)->sin_port);
    if (sa->sa_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
    return 0;
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
        f->flags |= ehlo_keywords[i].flag;
        if (ehlo_keywords[i].flag == SMTP_FEAT_SIZE) {
            size_t v = 0;
            for (size_t j = 0; j < alen && args[j] >= '0' && args[j] <= '9'; j++)
                v = v > SIZE_MAX / 10 - 10 ? SIZE_MAX : v * 10 + (size_t)(args[j] - '0');
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

static void copy_text(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* For the log line: reply text without double quotes. */
static void quote_safe(char *dst, size_t cap, const char *src)
{
    copy_text(dst, cap, src);
    for (char *p = dst; *p; p++)
        if (*p == '"' || *p == '\\')
            *p = '\'';
}

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
    char reply[300], err[300];
    quote_safe(reply, sizeof(reply), s->res.has_reply ? s->res.reply.text : "");
    quote_safe(err, sizeof(err), s->res.status == SMTP_OK ? "" : s->res.error);
    log_info("smtp", "session",
             "msg=%s session=%016" PRIx64 " mx=%s addr=%s port=%u tls=%s cipher=%s result=%s "
             "state=%s rcpts=%zu delivered=%zu transient=%zu permanent=%zu unanswered=%zu "
             "code=%d enh=%s reply=\"%s\" error=\"%s\"",
             s->p.log_id ? s->p.log_id : "-", s->id, s->p.mx_host ? s->p.mx_host : "-",
             s->addr_text, s->port, s->res.tls_version ? s->res.tls_version : "none",
             s->res.tls_cipher ? s->res.tls_cipher : "none",
             status_tok(s->res.status),
             smtp_strstate(s->res.state), s->res.nrcpts, n[OUTCOME_DELIVERED], n[OUTCOME_TRANSIENT],
             n[OUTCOME_PERMANENT], open, s->res.has_reply ? s->res.reply.code : 0,
             s->res.has_reply && s->res.reply.enh[0] ? s->res.reply.enh : "-", reply, err);
}

/* Close the connection and report. Callers return right after. */
static void finish(smtp_session_t *s)
{
    if (s->finished)
        return;
    s->finished = 1;
    if (s->res.status == SMTP_OK)
        s->res.state = SMTP_STATE_DONE;
    log_debug("smtp", "state", "session=%016" PRIx64 " %s -> %s", s->id, smtp_strstate(s->state),
              smtp_strstate(SMTP_STATE_DONE));
    s->state = SMTP_STATE_DONE;
    loop_timer_cancel(s->loop, &s->defer_timer);
    if (s->st) {
        stream_free(s->st); /* safe inside its own callback */
        s->st = NULL;
    }
    log_session(s);
    if (s->res.status == SMTP_ENETWORK || s->res.status == SMTP_ETLS || s->res.status == SMTP_ETIMEOUT)
        metrics_inc(MET_SMTP_SESSION_ERRORS, 1);
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
    if (quit && s->st && s->state != SMTP_STATE_QUIT)
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

static void set_rcpt_reply(smtp_rcpt_reply_t *rr, int code, const char *enh, const char *text, int final)
{
    rr->code = code;
    copy_text(rr->enh, sizeof(rr->enh), enh);
    copy_text(rr->text, sizeof(rr->text), text);
    rr->final = final;
}

/* A reply that settles every recipient still waiting for one: all of
 * them when MAIL is refused; after RCPT only the accepted ones are left
 * (the refused ones already have their answer), for DATA and end of data. */
static void settle_rcpts(smtp_session_t *s, int code, const char *enh, const char *text)
{
    for (size_t i = 0; i < s->res.nrcpts; i++) {
        smtp_rcpt_reply_t *rr = &s->res.rcpts[i];
        if (!rr->final)
            set_rcpt_reply(rr, code, enh, text, 1);
    }
}

static void send_cmd(smtp_session_t *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void send_cmd(smtp_session_t *s, const char *fmt, ...)
{
    buf_t b = BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(&b, fmt, ap);
    va_end(ap);
    log_debug("smtp", "send", "session=%016" PRIx64 " cmd=\"%s\"", s->id, buf_head(&b));
    buf_puts(&b, "\r\n");
    stream_write(s->st, buf_head(&b), buf_size(&b));
    buf_free(&b);
    s->expect++;
}

static SSL_CTX *tls_ctx(const smtp_session_t *s)
{
    return s->p.tls == SMTP_TLS_VERIFY ? s->p.tls_verify_ctx : s->p.tls_noverify_ctx;
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
    enter_state(s, SMTP_STATE_MAIL);
}

static void body_sent(smtp_session_t *s)
{
    s->res.dot_sent = 1;
    stream_set_timeout(s->st, state_timeout(s, SMTP_STATE_BODY));
    log_debug("smtp", "send", "session=%016" PRIx64 " body=%zu bytes written", s->id, s->p.len);
}

static void enter_state(smtp_session_t *s, smtp_state_t next)
{
    log_debug("smtp", "state", "session=%016" PRIx64 " %s -> %s", s->id, smtp_strstate(s->state),
              smtp_strstate(next));
    s->state = next;
    stream_set_timeout(s->st, state_timeout(s, next));

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
    case SMTP_STATE_TLS_HANDSHAKE:
        /* refuses when bytes are buffered after the 220: STARTTLS injection */
        if (stream_tls_client(s->st, tls_ctx(s), s->p.mx_host,
                              s->p.tls == SMTP_TLS_VERIFY ? s->p.mx_host : NULL) < 0)
            session_fail(s, SMTP_ETLS, 0, "%s", stream_error(s->st));
        break;
    case SMTP_STATE_MAIL: {
        size_t size = s->p.message_size ? s->p.message_size : s->p.len;
        const smtp_features_t *f = &s->res.features;
        if ((f->flags & SMTP_FEAT_SIZE) && f->size_max > 0 && size > f->size_max) {
            /* RFC 1870 §6: do not send what the server already said it refuses */
            char text[160];
            snprintf(text, sizeof(text), "message size %zu exceeds size limit %zu of server %s", size,
                     f->size_max, s->p.mx_host ? s->p.mx_host : s->addr_text);
            settle_rcpts(s, 552, "5.3.4", text);
            enter_state(s, SMTP_STATE_QUIT);
            break;
        }
        if (f->flags & SMTP_FEAT_SIZE)
            send_cmd(s, "MAIL FROM:<%s> SIZE=%zu", s->p.mail_from, size);
        else
            send_cmd(s, "MAIL FROM:<%s>", s->p.mail_from);
        break;
    }
    case SMTP_STATE_RCPT:
        send_cmd(s, "RCPT TO:<%s>", s->p.rcpts[s->rcpt_sent]);
        s->rcpt_sent++;
        break;
    case SMTP_STATE_DATA:
        send_cmd(s, "DATA");
        break;
    case SMTP_STATE_BODY:
        s->expect++; /* the reply to the final dot */
        stream_write(s->st, s->p.data, s->p.len);
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
    case SMTP_STATE_CONNECT:
    case SMTP_STATE_DONE:
    case SMTP_STATE_LAST:
        finish(s);
        break;
    }
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
            enter_state(s, SMTP_STATE_MAIL); /* still a valid plaintext session */
        else
            session_fail(s, SMTP_ETLS, 1, "STARTTLS refused by server: %d%s%s %s", r->code,
                         r->enh[0] ? " " : "", r->enh, r->text);
        break;

    case SMTP_STATE_EHLO_TLS:
        if (cls == 2) {
            s->res.features = s->ehlo_feat;
            enter_state(s, SMTP_STATE_MAIL);
        } else {
            session_rejected(s, r);
        }
        break;

    case SMTP_STATE_MAIL:
        if (cls == 2) {
            enter_state(s, SMTP_STATE_RCPT);
        } else {
            /* the sender was refused: that is every recipient's answer */
            settle_rcpts(s, r->code, r->enh, r->text);
            enter_state(s, SMTP_STATE_QUIT);
        }
        break;

    case SMTP_STATE_RCPT: {
        smtp_rcpt_reply_t *rr = &s->res.rcpts[s->rcpt_done++];
        set_rcpt_reply(rr, r->code, r->enh, r->text, cls != 2);
        if (cls == 2) {
            rr->accepted = 1;
            s->naccepted++;
        }
        if (s->rcpt_sent < s->res.nrcpts)
            enter_state(s, SMTP_STATE_RCPT);
        else if (s->naccepted > 0)
            enter_state(s, SMTP_STATE_DATA);
        else
            enter_state(s, SMTP_STATE_RSET);
        break;
    }

    case SMTP_STATE_DATA:
        if (cls == 3) {
            enter_state(s, SMTP_STATE_BODY);
        } else if (cls == 2) {
            /* accepting DATA without 354 would "deliver" a message never sent */
            session_fail(s, SMTP_EPROTO, 1, "unexpected reply to DATA: %d %s", r->code, r->text);
        } else {
            settle_rcpts(s, r->code, r->enh, r->text);
            enter_state(s, SMTP_STATE_QUIT);
        }
        break;

    case SMTP_STATE_BODY:
        if (cls == 3) {
            session_fail(s, SMTP_EPROTO, 0, "unexpected reply to end of data: %d %s", r->code, r->text);
            break;
        }
        if (!s->res.dot_sent)
            log_warn("smtp", "early_reply", "session=%016" PRIx64 " code=%d before the end of data",
                     s->id, r->code);
        settle_rcpts(s, r->code, r->enh, r->text);
        if (r->code == 421)
            finish(s);
        else
            enter_state(s, SMTP_STATE_QUIT);
        break;

    case SMTP_STATE_RSET:
        enter_state(s, SMTP_STATE_QUIT);
        break;

    case SMTP_STATE_QUIT:
        finish(s);
        break;

    case SMTP_STATE_CONNECT:
    case SMTP_STATE_TLS_HANDSHAKE:
    case SMTP_STATE_DONE:
    case SMTP_STATE_LAST:
        session_fail(s, SMTP_EPROTO, 0, "unexpected reply while %s: %d %s", state_doing(s), r->code,
                     r->text);
        break;
    }
}

static void on_data(smtp_session_t *s)
{
    buf_t *in = stream_input(s->st);
    while (!s->finished && s->st && buf_size(in) > 0) {
        smtp_reply_t r;
        size_t used = 0;
        int ehlo = s->state == SMTP_STATE_EHLO || s->state == SMTP_STATE_EHLO_TLS;
        int rc = smtp_reply_parse_lines(buf_head(in), buf_size(in), &used, &r, ehlo ? ehlo_line : NULL, s);
        if (rc == SMTP_REPLY_AGAIN)
            return;
        if (rc == SMTP_REPLY_EPROTO) {
            char junk[64];
            quote_safe(junk, sizeof(junk), buf_head(in));
            for (char *p = junk; *p; p++)
                if ((unsigned char)*p < 0x20)
                    *p = '?';
            session_fail(s, SMTP_EPROTO, 0, "malformed reply while %s: \"%s\"", state_doing(s), junk);
            return;
        }
        buf_consume(in, used);
        log_debug("smtp", "recv", "session=%016" PRIx64 " state=%s code=%d enh=%s lines=%d text=\"%s\"",
                  s->id, smtp_strstate(s->state), r.code, r.enh[0] ? r.enh : "-", r.nlines, r.text);
        if (s->res.status == SMTP_OK && s->state != SMTP_STATE_QUIT && s->state != SMTP_STATE_RSET) {
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

static void on_stream(stream_t *st, stream_event_t ev, void *arg)
{
    smtp_session_t *s = arg;
    s->in_cb++;
    switch (ev) {
    case STREAM_EV_CONNECTED:
        if (s->state == SMTP_STATE_CONNECT)
            enter_state(s, SMTP_STATE_GREETING);
        break;
    case STREAM_EV_TLS_READY:
        s->res.tls_version = stream_tls_version(st);
        s->res.tls_cipher = stream_tls_cipher(st);
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
            session_fail(s, SMTP_ENETWORK, 0, "%s", stream_error(st));
        else
            session_fail(s, SMTP_ENETWORK, 0, "%s while %s", stream_error(st), state_doing(s));
        break;
    case STREAM_EV_LAST:
        break;
    }
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

static void defer_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    smtp_session_t *s = arg;
    s->in_cb++;
    finish(s);
    s->in_cb--;
    if (s->freed && s->in_cb == 0)
        release(s);
}

smtp_session_t *smtp_session_start(loop_t *loop, const smtp_session_params_t *params,
                                   smtp_session_cb cb, void *arg)
{
    smtp_session_t *s = xcalloc(1, sizeof(*s));
    s->loop = loop;
    s->p = *params;
    if (s->p.helo_name == NULL || s->p.helo_name[0] == '\0')
        s->p.helo_name = "localhost";
    if (s->p.mail_from == NULL)
        s->p.mail_from = "";
    s->cb = cb;
    s->cb_arg = arg;
    s->id = util_rand64();
    s->state = SMTP_STATE_CONNECT;
    s->res.state = SMTP_STATE_CONNECT;
    s->res.nrcpts = params->nrcpts;
    s->res.rcpts = xcalloc(params->nrcpts ? params->nrcpts : 1, sizeof(*s->res.rcpts));
    smtp_addr_text(params->addr, s->addr_text, sizeof(s->addr_text));
    s->port = addr_port(params->addr);
    loop_timer_init(&s->defer_timer, defer_fired, s);

    log_debug("smtp", "state", "session=%016" PRIx64 " msg=%s -> %s mx=%s addr=%s port=%u", s->id,
              s->p.log_id ? s->p.log_id : "-", smtp_strstate(SMTP_STATE_CONNECT),
              s->p.mx_host ? s->p.mx_host : "-", s->addr_text, s->port);
    s->st = stream_new(loop, on_stream, s);
    stream_set_timeout(s->st, state_timeout(s, SMTP_STATE_CONNECT));
    if (params->nrcpts == 0 || stream_connect(s->st, params->addr, params->addrlen) < 0) {
        /* report from the loop, never from inside the caller's start call */
        s->res.status = params->nrcpts == 0 ? SMTP_EPROTO : SMTP_ENETWORK;
        snprintf(s->res.error, sizeof(s->res.error), "%s",
                 params->nrcpts == 0 ? "no recipients" : stream_error(s->st));
        loop_timer_set(loop, &s->defer_timer, 0);
    }
    return s;
}

void smtp_session_free(smtp_session_t *s)
{
    if (s == NULL || s->freed)
        return;
    s->freed = 1;
    s->finished = 1; /* a cancel: the callback must not fire any more */
    loop_timer_cancel(s->loop, &s->defer_timer);
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

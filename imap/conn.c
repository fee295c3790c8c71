/*
 * SUMMARY
 *  imap/conn.c - one IMAP client connection: log in, find \Sent, APPEND
 *  (RFC 3501, 3502, 4315, 6154, 7888), LOGOUT.
 * DESCRIPTION
 *  An explicit state machine (imap_conn_state_t) rides on core/stream and
 *  never sees EAGAIN. send_*() functions write a command and move to the
 *  state that waits for its reply, on_tagged() switches on the state, and
 *  set_state() is the only place the state changes:
 *
 *    CONNECT -> [TLS] -> GREETING -> [CAPABILITY] -> [STARTTLS ->
 *    STARTTLS_TLS -> CAPABILITY] -> LOGIN -> [AUTH_CAPABILITY] -> LIST ->
 *    [EXAMINE -> SEARCH -> CLOSE] -> APPEND -> LOGOUT | READY -> DONE
 *
 *  READY (job.keep_open, after a stored job) keeps the connection; the
 *  next job re-enters at [EXAMINE] or APPEND.
 *
 *  Capabilities (the greeting's [CAPABILITY] code or a CAPABILITY command)
 *  are forgotten after STARTTLS (RFC 3501 §6.2.1) and after login, where
 *  Dovecot first announces UIDPLUS, SPECIAL-USE and LITERAL+.
 *
 *  Commands are built as chunks; a synchronising literal "{n}" ends one,
 *  and the rest waits for the server's "+". With LITERAL+ (or LITERAL- up
 *  to 4096 octets) literals are "{n+}" and the command goes at once. A
 *  tagged reply instead of "+" completes the command: the literal is never
 *  sent. Messages are never copied: the stream sends them from the
 *  owner's memory (stream_write_ref()), the bytes the SMTP session sent.
 *
 *  Credentials never travel in clear unless the account says
 *  IMAP_TLS_NONE; a PREAUTH greeting in STARTTLS mode is refused, since
 *  it would make STARTTLS impossible (an attacker's downgrade).
 *
 *  The owner hears of a finished job from the connection's own zero-delay
 *  timer, never inside a stream callback, and may free, park or reuse the
 *  connection right there. After a server's refusal (tagged NO/BAD, no
 *  \Sent mailbox) it still says LOGOUT first; after a transport failure it
 *  just closes, noting whether the server can have stored the message
 *  (info.loss): whether to try again elsewhere is the owner's decision.
 * DIAGNOSTICS
 *  State transitions, the TLS parameters and the first line of each
 *  command (credentials redacted) and response at debug (mod=imap, with
 *  session=<id>). Failures are reported to the owner as status and text,
 *  not logged here.
 */
#include "imap/conn.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>

#include "core/base64.h"
#include "core/buf.h"
#include "core/crash.h"
#include "core/log.h"
#include "core/stream.h"
#include "core/util.h"

#define IMAP_LOGOUT_TIMEOUT_MS 5000u /* the result is known: do not wait long for goodbyes */
#define IMAP_LITERAL_MINUS_MAX 4096u /* RFC 7888 §5: LITERAL- non-sync limit */
#define IMAP_MAX_QUOTED        1024u /* longer strings go as literals */

/* Per state: trace name, and what was going on when a timeout or a lost
 * connection interrupted it (for the error text). */
static const struct {
    const char *name;
    const char *doing;
} state_info[IMAP_CONN_ST_LAST] = {
    [IMAP_CONN_ST_INIT] = { "INIT", "starting" },
    [IMAP_CONN_ST_CONNECT] = { "CONNECT", "connecting" },
    [IMAP_CONN_ST_TLS] = { "TLS", "in the TLS handshake" },
    [IMAP_CONN_ST_GREETING] = { "GREETING", "waiting for the server greeting" },
    [IMAP_CONN_ST_CAPABILITY] = { "CAPABILITY", "waiting for the CAPABILITY reply" },
    [IMAP_CONN_ST_STARTTLS] = { "STARTTLS", "waiting for the STARTTLS reply" },
    [IMAP_CONN_ST_STARTTLS_TLS] = { "STARTTLS_TLS", "in the TLS handshake after STARTTLS" },
    [IMAP_CONN_ST_LOGIN] = { "LOGIN", "waiting for the login reply" },
    [IMAP_CONN_ST_AUTH_CAPABILITY] = { "AUTH_CAPABILITY", "waiting for the CAPABILITY reply after login" },
    [IMAP_CONN_ST_LIST] = { "LIST", "waiting for the LIST reply" },
    [IMAP_CONN_ST_EXAMINE] = { "EXAMINE", "waiting for the EXAMINE reply" },
    [IMAP_CONN_ST_SEARCH] = { "SEARCH", "waiting for the UID SEARCH reply" },
    [IMAP_CONN_ST_CLOSE] = { "CLOSE", "waiting for the CLOSE reply" },
    [IMAP_CONN_ST_APPEND] = { "APPEND", "waiting for the APPEND reply -- the message may be stored twice if retried" },
    [IMAP_CONN_ST_LOGOUT] = { "LOGOUT", "waiting for the LOGOUT reply" },
    [IMAP_CONN_ST_READY] = { "READY", "idle" },
    [IMAP_CONN_ST_DONE] = { "DONE", "finished" },
};

const char *imap_conn_strstate(imap_conn_state_t st)
{
    return st < IMAP_CONN_ST_LAST ? state_info[st].name : "?";
}

typedef struct cmd_chunk {
    size_t      off;  /* into c->cmd when ext == NULL */
    size_t      len;
    const char *ext;  /* the owner's message bytes: referenced, not copied */
    int         sync; /* after sending this chunk wait for "+" */
} imap_conn_chunk_t;

struct imap_conn {
    loop_t           *loop;
    uint64_t          id; /* for log lines */
    imap_conn_state_t state;
    imap_conn_acct_t  acct;
    unsigned          timeout_ms;
    imap_conn_cb      cb;
    void             *arg;
    stream_t         *stream;

    /* the command in flight */
    unsigned     tagno;
    char         tag[16]; /* "" when no tagged reply is awaited */
    buf_t        cmd;
    imap_conn_chunk_t *chunks;
    size_t       chunks_cap;
    size_t       nchunks;
    size_t       next_chunk;
    int          waiting_cont;
    int          cmd_sensitive; /* holds credentials: redact, wipe */

    /* what the server told this connection */
    unsigned caps;
    int      caps_known;
    char    *sent_special; /* first selectable mailbox with \Sent */
    char    *sent_named;   /* "Sent" */
    char    *sent_inbox;   /* "INBOX<delim>Sent" (servers with INBOX-prefixed namespaces) */
    char     mailbox[256]; /* the \Sent mailbox chosen, kept for later jobs */
    char     bye[512];     /* text of an untagged BYE */
    uint64_t opened_ms;
    unsigned nappends;     /* messages stored (or found) on this connection */

    /* the job */
    imap_conn_msg_t      msgs[IMAP_MAX_UIDS];
    size_t               nmsgs;
    char                *check_msgid;
    char                *log_ref; /* the job's msg= (and trace=) fields, or NULL */
    char                *blame_id; /* the job's one message, blamed for a crash here; NULL */
    int                  keep_open;
    int                  append_answered; /* the server said something (not BYE) to the APPEND */
    uint32_t             found_uid, found_uidvalidity;
    imap_append_result_t res;
    int                  have_result;
    uint32_t             uids[IMAP_MAX_UIDS];
    imap_conn_loss_t     loss;
    loop_timer_t         done_timer;
    imap_resp_t          resp;
};

/* The message fields of a connection's log lines. */
#define CONN_MSG(c) ((c)->log_ref ? (c)->log_ref : "msg=-")

/* The first min(n, 200) bytes of a protocol line, for a log value. */
static const char *head_text(const char *line, size_t n, char dst[201])
{
    n = n > 200 ? 200 : n;
    memcpy(dst, line, n);
    dst[n] = '\0';
    return dst;
}

void imap_conn_acct_copy(imap_conn_acct_t *dst, const imap_conn_acct_t *src)
{
    *dst = *src;
    dst->host = xstrdup(src->host ? src->host : "");
    dst->user = src->user ? xstrdup(src->user) : NULL;
    dst->password = src->password ? xstrdup(src->password) : NULL;
    dst->ssl_ctx = NULL;
    if (src->ssl_ctx && SSL_CTX_up_ref(src->ssl_ctx) == 1)
        dst->ssl_ctx = src->ssl_ctx;
}

void imap_conn_acct_clear(imap_conn_acct_t *a)
{
    if (a->password) {
        OPENSSL_cleanse(a->password, strlen(a->password));
        free(a->password);
    }
    free(a->user);
    free(a->host);
    if (a->ssl_ctx)
        SSL_CTX_free(a->ssl_ctx);
    memset(a, 0, sizeof(*a));
}

/* ---------------------------------------------------------------- helpers */

/* Every state change goes through here (and shows in the debug trace). */
static void set_state(imap_conn_t *c, imap_conn_state_t st)
{
    log_debug("imap", "state", "%s session=%016" PRIx64 " from=%s to=%s", CONN_MSG(c), c->id,
              imap_conn_strstate(c->state), imap_conn_strstate(st));
    c->state = st;
}

/* Record the first outcome only: later failures are consequences of it. */
static void set_result(imap_conn_t *c, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_result(imap_conn_t *c, int status, const char *fmt, ...)
{
    if (c->have_result)
        return;
    c->have_result = 1;
    c->res.status = status;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->res.error, sizeof(c->res.error), fmt, ap);
        va_end(ap);
    }
}

static void close_stream(imap_conn_t *c)
{
    set_state(c, IMAP_CONN_ST_DONE);
    stream_free(c->stream); /* safe inside the stream's own callback */
    c->stream = NULL;
}

/* Close the connection and tell the owner from the done timer. */
static void finish(imap_conn_t *c)
{
    if (c->state == IMAP_CONN_ST_DONE)
        return;
    close_stream(c);
    loop_timer_set(c->loop, &c->done_timer, 0);
}

/* The connection failed: record why (unless already settled) and close.
 * Like a function; c is evaluated twice. */
#define fail(c, ...) (set_result((c), __VA_ARGS__), finish(c))

static void wipe_cmd(imap_conn_t *c)
{
    if (c->cmd_sensitive && c->cmd.data)
        OPENSSL_cleanse(c->cmd.data, c->cmd.cap);
    c->cmd_sensitive = 0;
}

/* Let go of the command buffers (an idle connection keeps none). */
static void cmd_release(imap_conn_t *c)
{
    wipe_cmd(c);
    buf_free(&c->cmd);
    free(c->chunks);
    c->chunks = NULL;
    c->chunks_cap = c->nchunks = c->next_chunk = 0;
}

/* ---------------------------------------------------------------- commands */

static imap_conn_chunk_t *cmd_new_chunk(imap_conn_t *c)
{
    if (c->nchunks == c->chunks_cap) {
        c->chunks_cap = c->chunks_cap ? c->chunks_cap * 2 : 8;
        c->chunks = xrealloc(c->chunks, c->chunks_cap * sizeof(*c->chunks));
    }
    imap_conn_chunk_t *ch = &c->chunks[c->nchunks++];
    memset(ch, 0, sizeof(*ch));
    ch->off = c->cmd.len;
    return ch;
}

static void cmd_bytes(imap_conn_t *c, const char *p, size_t n)
{
    imap_conn_chunk_t *ch = c->nchunks ? &c->chunks[c->nchunks - 1] : NULL;
    if (ch == NULL || ch->ext || ch->sync)
        ch = cmd_new_chunk(c);
    buf_append(&c->cmd, p, n);
    ch->len += n;
}

static void cmd_text(imap_conn_t *c, const char *s)
{
    cmd_bytes(c, s, strlen(s));
}

static void cmd_printf(imap_conn_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void cmd_printf(imap_conn_t *c, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0)
        cmd_bytes(c, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* What was written so far waits for a "+" before the rest is sent. */
static void cmd_sync(imap_conn_t *c)
{
    if (c->nchunks)
        c->chunks[c->nchunks - 1].sync = 1;
}

static void cmd_begin(imap_conn_t *c, const char *verb, int sensitive)
{
    wipe_cmd(c);
    buf_reset(&c->cmd);
    c->nchunks = c->next_chunk = 0;
    c->waiting_cont = 0;
    c->cmd_sensitive = sensitive;
    snprintf(c->tag, sizeof(c->tag), "A%u", ++c->tagno);
    cmd_printf(c, "%s %s", c->tag, verb);
}

/* literal: "{n}" CRLF and wait for "+", or "{n+}" CRLF when allowed. */
static void cmd_literal(imap_conn_t *c, const char *p, size_t n, int referenced)
{
    int nonsync = (c->caps & IMAP_CAP_LITERAL_PLUS) ||
                  ((c->caps & IMAP_CAP_LITERAL_MINUS) && n <= IMAP_LITERAL_MINUS_MAX);
    cmd_printf(c, "{%zu%s}\r\n", n, nonsync ? "+" : "");
    if (!nonsync)
        cmd_sync(c);
    if (referenced) {
        imap_conn_chunk_t *ch = cmd_new_chunk(c);
        ch->ext = p;
        ch->len = n;
    } else {
        cmd_bytes(c, p, n);
    }
}

/* astring: a quoted string when every octet is printable ASCII, else a
 * literal (8-bit, control characters, very long values). */
static void cmd_astring(imap_conn_t *c, const char *s)
{
    size_t n = strlen(s);
    int quotable = n <= IMAP_MAX_QUOTED;
    for (size_t i = 0; quotable && i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            quotable = 0;
    if (!quotable) {
        cmd_literal(c, s, n, 0);
        return;
    }
    cmd_bytes(c, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' || s[i] == '"')
            cmd_bytes(c, "\\", 1);
        cmd_bytes(c, s + i, 1);
    }
    cmd_bytes(c, "\"", 1);
}

/* Send chunks until one waits for a continuation. */
static void cmd_flush(imap_conn_t *c)
{
    c->waiting_cont = 0;
    stream_cork(c->stream, 1);
    while (c->next_chunk < c->nchunks) {
        const imap_conn_chunk_t *ch = &c->chunks[c->next_chunk++];
        if (ch->ext) /* a message: sent from the owner's memory (alive until the job is reported) */
            stream_write_ref(c->stream, ch->ext, ch->len);
        else
            stream_write(c->stream, c->cmd.data + ch->off, ch->len);
        if (ch->sync) {
            c->waiting_cont = 1;
            break;
        }
    }
    stream_cork(c->stream, 0);
}

static void cmd_end(imap_conn_t *c, imap_conn_state_t next)
{
    cmd_bytes(c, "\r\n", 2);
    if (log_enabled(LOG_DEBUG)) {
        const char *line = c->cmd.data;
        size_t n = strcspn(line, "\r\n");
        if (c->cmd_sensitive)
            log_debug("imap", "send", "%s session=%016" PRIx64 " tag=%s line=\"<credentials>\"", CONN_MSG(c),
                      c->id, LOG_Q(c->tag));
        else
            log_debug("imap", "send", "%s session=%016" PRIx64 " line=%s", CONN_MSG(c), c->id,
                      LOG_Q(head_text(line, n, (char[201]){ 0 })));
    }
    set_state(c, next);
    unsigned t = c->timeout_ms;
    if (next == IMAP_CONN_ST_LOGOUT && t > IMAP_LOGOUT_TIMEOUT_MS)
        t = IMAP_LOGOUT_TIMEOUT_MS;
    stream_set_timeout(c->stream, t);
    cmd_flush(c);
}

/* ---------------------------------------------------------------- steps */

void imap_conn_logout(imap_conn_t *c)
{
    cmd_begin(c, "LOGOUT", 0);
    cmd_end(c, IMAP_CONN_ST_LOGOUT);
}

/* Stored, and the owner wants the connection kept: it hears of the
 * result from the done timer and decides then what comes next. */
static void go_ready(imap_conn_t *c)
{
    c->nappends += (unsigned)c->nmsgs;
    set_state(c, IMAP_CONN_ST_READY);
    stream_set_timeout(c->stream, 0);
    loop_timer_set(c->loop, &c->done_timer, 0);
}

/* The server refused something: record why, then say goodbye politely. */
#define refuse(c, ...) (set_result((c), __VA_ARGS__), imap_conn_logout(c))

static void send_capability(imap_conn_t *c, imap_conn_state_t next)
{
    cmd_begin(c, "CAPABILITY", 0);
    cmd_end(c, next);
}

static void start_tls(imap_conn_t *c, imap_conn_state_t next)
{
    const char *verify = c->acct.verify_host ? c->acct.host : NULL;
    if (stream_tls_client(c->stream, c->acct.ssl_ctx, c->acct.host, verify) < 0) {
        fail(c, IMAP_ETLS, "%s", stream_error(c->stream));
        return;
    }
    set_state(c, next);
}

static void send_login(imap_conn_t *c)
{
    if (c->acct.tls != IMAP_TLS_NONE && !stream_is_tls(c->stream)) {
        /* cannot happen by construction; keep it impossible */
        fail(c, IMAP_ETLS, "refusing to send credentials without TLS");
        return;
    }
    if (!(c->caps & IMAP_CAP_LOGINDISABLED)) {
        cmd_begin(c, "LOGIN", 1);
        cmd_text(c, " ");
        cmd_astring(c, c->acct.user);
        cmd_text(c, " ");
        cmd_astring(c, c->acct.password);
    } else if (c->caps & IMAP_CAP_AUTH_PLAIN) {
        /* RFC 4616: authzid NUL authcid NUL passwd, base64 */
        buf_t raw = BUF_INIT, b64 = BUF_INIT;
        buf_putc(&raw, '\0');
        buf_puts(&raw, c->acct.user);
        buf_putc(&raw, '\0');
        buf_puts(&raw, c->acct.password);
        base64_encode(&b64, raw.data, raw.len);
        cmd_begin(c, "AUTHENTICATE PLAIN", 1);
        if (c->caps & IMAP_CAP_SASL_IR) {
            cmd_text(c, " ");
        } else {
            cmd_text(c, "\r\n");
            cmd_sync(c);
        }
        cmd_bytes(c, b64.data, b64.len);
        OPENSSL_cleanse(raw.data, raw.cap);
        OPENSSL_cleanse(b64.data, b64.cap);
        buf_free(&raw);
        buf_free(&b64);
    } else {
        refuse(c, IMAP_EAUTH, "server advertises LOGINDISABLED and offers no AUTH=PLAIN");
        return;
    }
    /* the login reply (or a CAPABILITY after it) says what is allowed now */
    c->caps_known = 0;
    cmd_end(c, IMAP_CONN_ST_LOGIN);
}

/* Capabilities known, not logged in yet. */
static void after_capabilities(imap_conn_t *c)
{
    if (c->acct.tls == IMAP_TLS_STARTTLS && !stream_is_tls(c->stream)) {
        if (!(c->caps & IMAP_CAP_STARTTLS)) {
            refuse(c, IMAP_ETLS, "server does not offer STARTTLS");
            return;
        }
        cmd_begin(c, "STARTTLS", 0);
        cmd_end(c, IMAP_CONN_ST_STARTTLS);
        return;
    }
    send_login(c);
}

/* Logged in, capabilities known: look for \Sent. */
static void after_login(imap_conn_t *c)
{
    cmd_begin(c, "LIST", 0);
    if ((c->caps & IMAP_CAP_SPECIAL_USE) && (c->caps & IMAP_CAP_LIST_EXTENDED))
        cmd_text(c, " (SPECIAL-USE) \"\" \"*\""); /* RFC 6154 §5.1: only special-use mailboxes */
    else
        cmd_text(c, " \"\" \"*\""); /* attributes (if any) come with plain LIST */
    cmd_end(c, IMAP_CONN_ST_LIST);
}

static void send_append(imap_conn_t *c)
{
    c->append_answered = 0;
    cmd_begin(c, "APPEND", 0);
    cmd_text(c, " ");
    cmd_astring(c, c->mailbox);
    for (size_t i = 0; i < c->nmsgs; i++) {
        cmd_text(c, " (\\Seen) ");
        cmd_literal(c, c->msgs[i].data, c->msgs[i].len, 1);
    }
    cmd_end(c, IMAP_CONN_ST_APPEND);
}

/* An earlier attempt may have stored this copy and lost the answer (the
 * connection dropped after APPEND, the worker died before recording it):
 * when asked, look for its Message-ID first. EXAMINE is read-only, so the
 * CLOSE after the search expunges nothing. */
static void before_append(imap_conn_t *c)
{
    if (c->check_msgid == NULL || c->nmsgs != 1) {
        send_append(c);
        return;
    }
    c->found_uid = c->found_uidvalidity = 0;
    cmd_begin(c, "EXAMINE", 0);
    cmd_text(c, " ");
    cmd_astring(c, c->mailbox);
    cmd_end(c, IMAP_CONN_ST_EXAMINE);
}

static void on_check_reply(imap_conn_t *c, const imap_resp_t *r)
{
    switch (c->state) {
    case IMAP_CONN_ST_EXAMINE:
        if (r->cond != IMAP_COND_OK) { /* cannot look: store it */
            send_append(c);
            return;
        }
        cmd_begin(c, "UID SEARCH", 0);
        cmd_text(c, " HEADER Message-ID ");
        cmd_astring(c, c->check_msgid);
        cmd_end(c, IMAP_CONN_ST_SEARCH);
        return;
    case IMAP_CONN_ST_SEARCH:
        if (r->cond != IMAP_COND_OK)
            c->found_uid = 0;
        cmd_begin(c, "CLOSE", 0);
        cmd_end(c, IMAP_CONN_ST_CLOSE);
        return;
    default: /* CLOSE */
        if (c->found_uid == 0 || c->found_uidvalidity == 0) {
            send_append(c);
            return;
        }
        c->res.uid = c->found_uid;
        c->res.uidvalidity = c->found_uidvalidity;
        c->res.already_stored = 1;
        set_result(c, IMAP_OK, NULL);
        if (c->keep_open) {
            go_ready(c);
            return;
        }
        imap_conn_logout(c);
        return;
    }
}

/* Logged in (or PREAUTH): capabilities since login first, then LIST. */
static void authenticated(imap_conn_t *c)
{
    if (c->caps_known)
        after_login(c);
    else
        send_capability(c, IMAP_CONN_ST_AUTH_CAPABILITY);
}

/* ---------------------------------------------------------------- replies */

static void on_greeting(imap_conn_t *c, const imap_resp_t *r)
{
    switch (r->cond) {
    case IMAP_COND_OK:
        if (c->caps_known)
            after_capabilities(c);
        else
            send_capability(c, IMAP_CONN_ST_CAPABILITY);
        return;
    case IMAP_COND_PREAUTH:
        if (c->acct.tls == IMAP_TLS_STARTTLS) {
            refuse(c, IMAP_ETLS, "server greeted with PREAUTH: STARTTLS impossible");
            return;
        }
        authenticated(c);
        return;
    case IMAP_COND_BYE:
        fail(c, IMAP_ENETWORK, "server refused the connection: BYE %s", r->text);
        return;
    default:
        fail(c, IMAP_EPROTO, "unexpected greeting: %s %s", r->keyword, r->text);
        return;
    }
}

static void on_list_entry(imap_conn_t *c, const imap_resp_t *r)
{
    if (r->mbx_name_truncated || (r->mbx_flags & (IMAP_MBX_NOSELECT | IMAP_MBX_NONEXISTENT)))
        return;
    const char *name = r->mbx_name;
    if ((r->mbx_flags & IMAP_MBX_SENT) && c->sent_special == NULL)
        c->sent_special = xstrdup(name);
    if (c->sent_named == NULL && strcmp(name, "Sent") == 0)
        c->sent_named = xstrdup(name);
    if (c->sent_inbox == NULL && r->mbx_delim && util_strncasecmp(name, "INBOX", 5) == 0 &&
        name[5] == r->mbx_delim && strcmp(name + 6, "Sent") == 0)
        c->sent_inbox = xstrdup(name);
}

static void on_untagged(imap_conn_t *c, const imap_resp_t *r)
{
    if (c->state == IMAP_CONN_ST_GREETING) {
        on_greeting(c, r);
        return;
    }
    if (r->cond == IMAP_COND_BYE) {
        /* the server is about to close: keep its reason for the error */
        snprintf(c->bye, sizeof(c->bye), "%s", r->text[0] ? r->text : "(no text)");
        return;
    }
    if (c->state == IMAP_CONN_ST_LIST && (strcmp(r->keyword, "LIST") == 0 || strcmp(r->keyword, "XLIST") == 0))
        on_list_entry(c, r);
    if (c->state == IMAP_CONN_ST_EXAMINE && r->has_uidvalidity)
        c->found_uidvalidity = r->uidvalidity;
    if (c->state == IMAP_CONN_ST_SEARCH && strcmp(r->keyword, "SEARCH") == 0 && r->search_max > c->found_uid)
        c->found_uid = r->search_max; /* the newest copy, if several */
    /* anything else (EXISTS, FLAGS, OK [ALERT] ...) is not ours to act on */
}

static void on_continuation(imap_conn_t *c, const imap_resp_t *r)
{
    if (!c->waiting_cont) {
        fail(c, IMAP_EPROTO, "unexpected continuation request %s: + %s", state_info[c->state].doing, r->text);
        return;
    }
    cmd_flush(c);
}

/* "NO [CODE] text" for error messages. */
static const char *reply_text(const imap_resp_t *r, char *buf, size_t n)
{
    snprintf(buf, n, "%s%s%s%s%s", imap_cond_name(r->cond), r->code[0] ? " [" : "", r->code,
             r->code[0] ? "]" : "", r->text[0] ? " " : "");
    size_t used = strlen(buf);
    snprintf(buf + used, n - used, "%s", r->text);
    return buf;
}

static void on_append_reply(imap_conn_t *c, const imap_resp_t *r)
{
    char why[600];
    if (r->cond != IMAP_COND_OK) {
        refuse(c, IMAP_EREFUSED, "APPEND to %s: %s", c->res.mailbox, reply_text(r, why, sizeof(why)));
        return;
    }
    size_t want = c->nmsgs;
    if (r->has_appenduid && r->nuids == want) {
        c->res.uidvalidity = r->uidvalidity;
        c->res.uid = r->uid;
        memcpy(c->uids, r->uids, want * sizeof(*c->uids));
        set_result(c, IMAP_OK, NULL);
    } else if (r->has_appenduid) {
        set_result(c, IMAP_EPROTO, "APPEND of %zu message%s to %s: APPENDUID lists %u uid%s", want,
                   want == 1 ? "" : "s", c->res.mailbox, r->nuids, r->nuids == 1 ? "" : "s");
    } else if (strcmp(r->code, "APPENDUID") == 0) {
        set_result(c, IMAP_EPROTO, "APPEND to %s: malformed APPENDUID: %s", c->res.mailbox,
                   reply_text(r, why, sizeof(why)));
    } else {
        set_result(c, IMAP_ENOUIDPLUS, "appended to %s but the server returned no APPENDUID%s", c->res.mailbox,
                   (c->caps & IMAP_CAP_UIDPLUS) ? "" : " (no UIDPLUS)");
    }
    if (c->keep_open && (c->res.status == IMAP_OK || c->res.status == IMAP_ENOUIDPLUS)) {
        go_ready(c);
        return;
    }
    imap_conn_logout(c);
}

static void on_list_done(imap_conn_t *c, const imap_resp_t *r)
{
    char why[600];
    if (r->cond != IMAP_COND_OK) {
        refuse(c, IMAP_EPROTO, "LIST: %s", reply_text(r, why, sizeof(why)));
        return;
    }
    const char *mailbox = c->sent_special;
    if (mailbox == NULL && !(c->caps & IMAP_CAP_SPECIAL_USE))
        mailbox = c->sent_named ? c->sent_named : c->sent_inbox;
    if (mailbox == NULL) {
        refuse(c, IMAP_ENOSENT, "%s", (c->caps & IMAP_CAP_SPECIAL_USE)
                                         ? "no selectable mailbox has the \\Sent attribute"
                                         : "server has no SPECIAL-USE and no mailbox named Sent");
        return;
    }
    snprintf(c->res.mailbox, sizeof(c->res.mailbox), "%s", mailbox);
    snprintf(c->mailbox, sizeof(c->mailbox), "%s", mailbox);
    before_append(c);
}

static void on_tagged(imap_conn_t *c, const imap_resp_t *r)
{
    char why[600];
    if (c->tag[0] == '\0' || strcmp(r->tag, c->tag) != 0) {
        fail(c, IMAP_EPROTO, "unexpected tagged reply %s: %s %s", state_info[c->state].doing, r->tag,
             reply_text(r, why, sizeof(why)));
        return;
    }
    /* the command is complete; a literal still waiting for "+" is never sent */
    c->tag[0] = '\0';
    c->waiting_cont = 0;
    c->next_chunk = c->nchunks;
    wipe_cmd(c);

    switch (c->state) {
    case IMAP_CONN_ST_CAPABILITY:
    case IMAP_CONN_ST_AUTH_CAPABILITY:
        if (r->cond != IMAP_COND_OK) {
            refuse(c, IMAP_EPROTO, "CAPABILITY: %s", reply_text(r, why, sizeof(why)));
        } else if (!c->caps_known) {
            fail(c, IMAP_EPROTO, "CAPABILITY completed without capability data");
        } else if (c->state == IMAP_CONN_ST_CAPABILITY) {
            after_capabilities(c);
        } else {
            after_login(c);
        }
        return;
    case IMAP_CONN_ST_STARTTLS:
        if (r->cond != IMAP_COND_OK) {
            refuse(c, IMAP_ETLS, "STARTTLS: %s", reply_text(r, why, sizeof(why)));
            return;
        }
        c->caps = 0; /* RFC 3501 §6.2.1: forget what was said in clear */
        c->caps_known = 0;
        start_tls(c, IMAP_CONN_ST_STARTTLS_TLS);
        return;
    case IMAP_CONN_ST_LOGIN:
        if (r->cond != IMAP_COND_OK) {
            /* RFC 5530: these codes say "not now", not "wrong credentials"
             * (Dovecot: NO [LIMIT] past mail_max_userip_connections) */
            int busy = strcmp(r->code, "UNAVAILABLE") == 0 || strcmp(r->code, "LIMIT") == 0 ||
                       strcmp(r->code, "INUSE") == 0 || strcmp(r->code, "SERVERBUG") == 0;
            refuse(c, busy ? IMAP_EBUSY : IMAP_EAUTH, "login as %s: %s", c->acct.user, reply_text(r, why, sizeof(why)));
            return;
        }
        authenticated(c);
        return;
    case IMAP_CONN_ST_LIST:
        on_list_done(c, r);
        return;
    case IMAP_CONN_ST_EXAMINE:
    case IMAP_CONN_ST_SEARCH:
    case IMAP_CONN_ST_CLOSE:
        on_check_reply(c, r);
        return;
    case IMAP_CONN_ST_APPEND:
        on_append_reply(c, r);
        return;
    case IMAP_CONN_ST_LOGOUT:
        finish(c);
        return;
    default:
        fail(c, IMAP_EPROTO, "tagged reply in state %s", imap_conn_strstate(c->state));
        return;
    }
}

static void on_response(imap_conn_t *c, const imap_resp_t *r)
{
    if (r->has_caps) {
        c->caps = r->caps;
        c->caps_known = 1;
    }
    if (c->state == IMAP_CONN_ST_APPEND && !(r->kind == IMAP_RESP_UNTAGGED && r->cond == IMAP_COND_BYE))
        c->append_answered = 1; /* from here on a lost connection is never retried */
    switch (r->kind) {
    case IMAP_RESP_UNTAGGED:
        on_untagged(c, r);
        return;
    case IMAP_RESP_CONTINUATION:
        on_continuation(c, r);
        return;
    default:
        on_tagged(c, r);
        return;
    }
}

/* A READY connection saw something it did not ask for: it is no good
 * for another job. Closed at once; the owner hears it now, inside the
 * stream callback (a DONE still pending for the last job comes later). */
static void unfit(imap_conn_t *c, const char *why)
{
    close_stream(c);
    c->cb(c->arg, c, IMAP_CONN_EV_UNFIT, why); /* c may be gone */
}

static void on_data(imap_conn_t *c)
{
    buf_t *in = stream_input(c->stream);
    /* the state check comes first: a finished connection has let go of its stream */
    while (c->state != IMAP_CONN_ST_DONE && buf_size(in) > 0) {
        if (c->state == IMAP_CONN_ST_READY) {
            /* nothing is asked of an idle connection: whatever comes (a
             * BYE before the server hangs up, an alert) makes it unfit */
            unfit(c, buf_size(in) >= 5 && util_strncasecmp(buf_head(in), "* BYE", 5) == 0 ? "bye"
                                                                                         : "unsolicited_data");
            return; /* c may be gone */
        }
        size_t used = 0;
        int rc = imap_resp_parse(buf_head(in), buf_size(in), &c->resp, &used);
        if (rc == IMAP_PARSE_MORE)
            return;
        if (rc == IMAP_PARSE_ERROR) {
            fail(c, IMAP_EPROTO, "bad response %s: %s", state_info[c->state].doing, c->resp.error);
            return;
        }
        if (log_enabled(LOG_DEBUG)) {
            size_t n = strcspn(buf_head(in), "\r\n");
            log_debug("imap", "recv", "%s session=%016" PRIx64 " line=%s", CONN_MSG(c), c->id,
                      LOG_Q(head_text(buf_head(in), n, (char[201]){ 0 })));
        }
        /* consumed before acting: STARTTLS must find nothing pipelined behind its OK */
        buf_consume(in, used);
        on_response(c, &c->resp);
    }
}

/* The stream died (not a timeout) during a job: can the server have the
 * message? Not while the check runs, nor when the APPEND had not all
 * left or the connection was reset (the server's socket was gone when
 * our bytes arrived). A clean EOF after everything left is ambiguous. */
static imap_conn_loss_t loss_of(const imap_conn_t *c, stream_t *s)
{
    if (c->state == IMAP_CONN_ST_EXAMINE || c->state == IMAP_CONN_ST_SEARCH || c->state == IMAP_CONN_ST_CLOSE)
        return IMAP_CONN_LOSS_UNSENT;
    if (c->state != IMAP_CONN_ST_APPEND || c->append_answered)
        return IMAP_CONN_LOSS_NONE;
    if (c->waiting_cont || c->next_chunk < c->nchunks || stream_pending_out(s) > 0)
        return IMAP_CONN_LOSS_UNSENT;
    int e = stream_errno(s);
    if (e == ECONNRESET || e == EPIPE)
        return IMAP_CONN_LOSS_UNSENT;
    return IMAP_CONN_LOSS_UNSURE;
}

static void on_stream(stream_t *s, stream_event_t ev, void *arg)
{
    imap_conn_t *c = arg;
    crash_blame_set(c->blame_id);
    if (c->state == IMAP_CONN_ST_DONE)
        return;
    if (c->state == IMAP_CONN_ST_READY && ev != STREAM_EV_DATA) {
        if (ev != STREAM_EV_DRAINED)
            unfit(c, ev == STREAM_EV_CLOSED ? "closed_by_server" : stream_event_name(ev)); /* c may be gone */
        return;
    }
    switch (ev) {
    case STREAM_EV_CONNECTED:
        if (c->acct.tls == IMAP_TLS_IMAPS)
            start_tls(c, IMAP_CONN_ST_TLS);
        else
            set_state(c, IMAP_CONN_ST_GREETING);
        return;
    case STREAM_EV_TLS_READY:
        log_debug("imap", "tls", "%s session=%016" PRIx64 " version=%s cipher=%s", CONN_MSG(c), c->id,
                  stream_tls_version(s), stream_tls_cipher(s));
        if (c->state == IMAP_CONN_ST_TLS)
            set_state(c, IMAP_CONN_ST_GREETING);
        else
            send_capability(c, IMAP_CONN_ST_CAPABILITY);
        return;
    case STREAM_EV_DATA:
        on_data(c);
        return;
    case STREAM_EV_DRAINED:
        return;
    default:
        break;
    }

    /* TIMEOUT, CLOSED, ERROR: the stream is dead */
    if (c->state == IMAP_CONN_ST_LOGOUT) {
        finish(c); /* the result was settled before LOGOUT */
        return;
    }
    if (ev != STREAM_EV_TIMEOUT)
        c->loss = loss_of(c, s);
    const char *doing = state_info[c->state].doing;
    if (ev == STREAM_EV_TIMEOUT) {
        fail(c, IMAP_ETIMEOUT, "timeout %s (%u ms)", doing, c->timeout_ms);
    } else if (ev == STREAM_EV_CLOSED) {
        if (c->bye[0])
            fail(c, IMAP_ENETWORK, "server closed the connection %s: BYE %s", doing, c->bye);
        else
            fail(c, IMAP_ENETWORK, "server closed the connection %s", doing);
    } else {
        int tls = c->state == IMAP_CONN_ST_TLS || c->state == IMAP_CONN_ST_STARTTLS_TLS;
        fail(c, tls ? IMAP_ETLS : IMAP_ENETWORK, "%s %s: %s", tls ? "TLS failed" : "connection failed", doing,
             stream_error(s));
    }
}

/* ---------------------------------------------------------------- lifetime */

static void done_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    imap_conn_t *c = arg;
    crash_blame_set(c->blame_id);
    if (c->nmsgs && !c->have_result) /* every path sets one; never report success by accident */
        set_result(c, IMAP_EPROTO, "session ended without a result");
    c->cb(c->arg, c, IMAP_CONN_EV_DONE, NULL); /* c may be gone */
}

/* A new job: nothing of the last one's outcome stays. */
static void job_begin(imap_conn_t *c, const imap_conn_job_t *job)
{
    c->nmsgs = job->nmsgs < IMAP_MAX_UIDS ? job->nmsgs : IMAP_MAX_UIDS;
    memcpy(c->msgs, job->msgs, c->nmsgs * sizeof(*c->msgs));
    free(c->check_msgid);
    c->check_msgid = job->check_msgid && job->check_msgid[0] ? xstrdup(job->check_msgid) : NULL;
    free(c->log_ref);
    c->log_ref = job->log_ref ? xstrdup(job->log_ref) : NULL;
    free(c->blame_id);
    c->blame_id = job->blame_id ? xstrdup(job->blame_id) : NULL;
    c->keep_open = job->keep_open;
    c->timeout_ms = job->timeout_ms ? job->timeout_ms : IMAP_DEFAULT_TIMEOUT_MS;
    memset(&c->res, 0, sizeof(c->res));
    snprintf(c->res.mailbox, sizeof(c->res.mailbox), "%s", c->mailbox);
    c->have_result = 0;
    c->loss = IMAP_CONN_LOSS_NONE;
    c->bye[0] = '\0';
}

imap_conn_t *imap_conn_open(loop_t *loop, const imap_conn_acct_t *acct, const imap_conn_job_t *job,
                            imap_conn_cb cb, void *arg)
{
    imap_conn_t *c = xcalloc(1, sizeof(*c));
    c->loop = loop;
    c->id = util_rand64();
    c->cb = cb;
    c->arg = arg;
    imap_conn_acct_copy(&c->acct, acct);
    buf_init(&c->cmd);
    loop_timer_init(&c->done_timer, done_fired, c);
    job_begin(c, job);
    c->stream = stream_new(loop, on_stream, c);
    stream_set_timeout(c->stream, c->timeout_ms);
    c->opened_ms = loop_now_ms(loop);
    set_state(c, IMAP_CONN_ST_CONNECT);
    if (stream_connect(c->stream, (const struct sockaddr *)&c->acct.addr, c->acct.addrlen) < 0)
        fail(c, IMAP_ENETWORK, "%s", stream_error(c->stream));
    return c;
}

void imap_conn_run(imap_conn_t *c, const imap_conn_job_t *job)
{
    job_begin(c, job);
    before_append(c);
}

void imap_conn_park(imap_conn_t *c)
{
    c->nmsgs = 0;
    free(c->check_msgid);
    c->check_msgid = NULL;
    free(c->log_ref);
    c->log_ref = NULL;
    free(c->blame_id);
    c->blame_id = NULL;
    cmd_release(c);
    stream_set_timeout(c->stream, 0); /* the owner's idle timer rules now */
    stream_trim(c->stream);
}

void imap_conn_free(imap_conn_t *c)
{
    if (c == NULL)
        return;
    loop_timer_cancel(c->loop, &c->done_timer);
    if (c->stream)
        stream_free(c->stream); /* safe inside the stream's own callback */
    cmd_release(c);
    free(c->check_msgid);
    free(c->log_ref);
    free(c->blame_id);
    free(c->sent_special);
    free(c->sent_named);
    free(c->sent_inbox);
    imap_conn_acct_clear(&c->acct);
    free(c);
}

/* ---------------------------------------------------------------- queries */

imap_conn_info_t imap_conn_info(const imap_conn_t *c)
{
    imap_conn_info_t in = { c->id, c->state, c->caps, c->nappends, c->opened_ms, c->loss, &c->acct, c->uids,
                            CONN_MSG(c) };
    return in;
}

const imap_append_result_t *imap_conn_result(const imap_conn_t *c)
{
    return &c->res;
}

int imap_conn_reusable(const imap_conn_t *c)
{
    return c->state == IMAP_CONN_ST_READY && stream_pending_out(c->stream) == 0 && !stream_peek_closed(c->stream);
}

int imap_conn_sending(const imap_conn_t *c)
{
    return c->state == IMAP_CONN_ST_APPEND &&
           (c->waiting_cont || c->next_chunk < c->nchunks || stream_pending_out(c->stream) > 0);
}

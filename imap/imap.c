/*
 * SUMMARY
 *  imap/imap.c - one IMAP session that APPENDs a sent message to the
 *  sender's \Sent mailbox and reports its UID (RFC 3501, 4315, 6154, 7888).
 * DESCRIPTION
 *  An explicit state machine (imap_state_t) rides on core/stream: it
 *  sees CONNECTED / TLS_READY / DATA / TIMEOUT / CLOSED / ERROR and never
 *  EAGAIN. enter-style send_*() functions write a command and move to the
 *  state that waits for its reply; on_tagged() switches on the state.
 *
 *    CONNECT -> [TLS] -> GREETING -> [CAPABILITY] -> [STARTTLS ->
 *    STARTTLS_TLS -> CAPABILITY] -> LOGIN -> [AUTH_CAPABILITY] -> LIST ->
 *    APPEND -> LOGOUT -> DONE
 *
 *  Capabilities come from the greeting's [CAPABILITY] code or a
 *  CAPABILITY command, are forgotten after STARTTLS (RFC 3501 §6.2.1) and
 *  after login, where servers such as Dovecot first announce UIDPLUS,
 *  SPECIAL-USE and LITERAL+; the login reply usually carries them.
 *
 *  Commands are built as chunks. A synchronising literal "{n}" ends a
 *  chunk: the rest waits for the server's "+" continuation. With
 *  LITERAL+ (or LITERAL- for up to 4096 octets) literals are "{n+}" and
 *  the whole command goes at once. A tagged reply that arrives instead
 *  of "+" completes the command and the literal is never sent. The
 *  message literal is never copied: the stream sends it from the caller's
 *  memory (stream_write_ref()), the same bytes the SMTP session sent.
 *
 *  Credentials never travel in clear unless the account says
 *  IMAP_TLS_NONE; a PREAUTH greeting in STARTTLS mode is refused, since
 *  it would make STARTTLS impossible (an attacker's downgrade).
 *
 *  The user callback fires exactly once, from the session's own
 *  zero-delay timer: never inside imap_append_start(), never inside a
 *  stream callback, and the session is freed only after it returns.
 *  After a server's refusal (tagged NO/BAD, no \Sent mailbox) the session
 *  still says LOGOUT; after a transport failure it just closes.
 *
 *  Pooled (acct->pool): a tagged OK to APPEND moves the session to IDLE
 *  instead of LOGOUT; after the callback the pool parks it per account
 *  key, and a later append for the key re-enters at APPEND. The pool lives
 *  in this file too (section "pool") because it drives the same state
 *  machine; see its comment for the details.
 * DIAGNOSTICS
 *  One info line per stored message (user, mailbox, uidvalidity, uid),
 *  one warn line per failure; state transitions and the first line of
 *  each command (credentials redacted) and response at debug. The pool
 *  logs open, park, reuse, retry, idle_lost, not_reusable and logout
 *  (with a reason) at debug as mod=imap_pool; counters in
 *  imap_pool_get_stats().
 */
#include "imap/imap.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>

#include "core/buf.h"
#include "core/log.h"
#include "core/stream.h"
#include "core/util.h"
#include "imap/parser.h"

#define IMAP_DEFAULT_TIMEOUT_MS 30000u
#define IMAP_LOGOUT_TIMEOUT_MS  5000u  /* the result is known: do not wait long for goodbyes */
#define IMAP_LITERAL_MINUS_MAX  4096u  /* RFC 7888 §5: LITERAL- non-sync limit */
#define IMAP_MAX_QUOTED         1024u  /* longer strings go as literals */
#define IMAP_BATCH_MAX_BYTES    (8u << 20) /* a MULTIAPPEND adds messages up to this total */

/* pool defaults (imap_pool_limits_t) */
#define IMAP_POOL_MAX_APPENDS   100u
#define IMAP_POOL_MAX_AGE_MS    300000u
#define IMAP_POOL_IDLE_MS       10000u
#define IMAP_POOL_IDLE_PER_ACCT 4u
#define IMAP_POOL_IDLE_TOTAL    64u
#define IMAP_POOL_CONNS_PER_ACCT 2u
#define IMAP_POOL_MAX_BATCH     16u

typedef enum {
    IMAP_ST_INIT = 0,
    IMAP_ST_CONNECT,         /* TCP connect */
    IMAP_ST_TLS,             /* implicit TLS handshake (imaps) */
    IMAP_ST_GREETING,        /* waiting for "* OK" / "* PREAUTH" */
    IMAP_ST_CAPABILITY,      /* CAPABILITY before login */
    IMAP_ST_STARTTLS,        /* STARTTLS sent */
    IMAP_ST_STARTTLS_TLS,    /* handshake after STARTTLS OK */
    IMAP_ST_LOGIN,           /* LOGIN or AUTHENTICATE PLAIN sent */
    IMAP_ST_AUTH_CAPABILITY, /* CAPABILITY after login */
    IMAP_ST_LIST,            /* looking for \Sent */
    IMAP_ST_EXAMINE,         /* check_message_id: EXAMINE the \Sent mailbox */
    IMAP_ST_SEARCH,          /* check_message_id: UID SEARCH HEADER Message-ID */
    IMAP_ST_CLOSE,           /* check_message_id: CLOSE (read-only: nothing expunged) */
    IMAP_ST_APPEND,
    IMAP_ST_LOGOUT,
    IMAP_ST_IDLE,            /* pooled: APPEND done, connection kept (callback pending, or parked) */
    IMAP_ST_WAIT,            /* pooled: every connection of the account is busy; queued */
    IMAP_ST_DONE,            /* result set, callback pending */
    IMAP_ST_LAST
} imap_state_t;

/* Per state: trace name, and what was going on when a timeout or a lost
 * connection interrupted it (the wording of the error). */
static const struct {
    const char *name;
    const char *doing;
} state_info[IMAP_ST_LAST] = {
    [IMAP_ST_INIT] = { "INIT", "starting" },
    [IMAP_ST_CONNECT] = { "CONNECT", "connecting" },
    [IMAP_ST_TLS] = { "TLS", "in the TLS handshake" },
    [IMAP_ST_GREETING] = { "GREETING", "waiting for the server greeting" },
    [IMAP_ST_CAPABILITY] = { "CAPABILITY", "waiting for the CAPABILITY reply" },
    [IMAP_ST_STARTTLS] = { "STARTTLS", "waiting for the STARTTLS reply" },
    [IMAP_ST_STARTTLS_TLS] = { "STARTTLS_TLS", "in the TLS handshake after STARTTLS" },
    [IMAP_ST_LOGIN] = { "LOGIN", "waiting for the login reply" },
    [IMAP_ST_AUTH_CAPABILITY] = { "AUTH_CAPABILITY", "waiting for the CAPABILITY reply after login" },
    [IMAP_ST_LIST] = { "LIST", "waiting for the LIST reply" },
    [IMAP_ST_EXAMINE] = { "EXAMINE", "waiting for the EXAMINE reply" },
    [IMAP_ST_SEARCH] = { "SEARCH", "waiting for the UID SEARCH reply" },
    [IMAP_ST_CLOSE] = { "CLOSE", "waiting for the CLOSE reply" },
    [IMAP_ST_APPEND] = { "APPEND",
                         "waiting for the APPEND reply -- the message may be stored twice if retried" },
    [IMAP_ST_LOGOUT] = { "LOGOUT", "waiting for the LOGOUT reply" },
    [IMAP_ST_IDLE] = { "IDLE", "idle in the pool" },
    [IMAP_ST_WAIT] = { "WAIT", "waiting for a free IMAP session of the account" },
    [IMAP_ST_DONE] = { "DONE", "finished" },
};

static const char *strstate(imap_state_t st)
{
    return st < IMAP_ST_LAST ? state_info[st].name : "?";
}

typedef struct cmd_chunk {
    size_t      off;  /* into a->cmd when ext == NULL */
    size_t      len;
    const char *ext;  /* the caller's message bytes: referenced, not copied */
    int         sync; /* after sending this chunk wait for "+" */
} cmd_chunk_t;

typedef struct pacct pacct_t;

/* Which pool list a session is on (one set of links serves them all). */
typedef enum { ON_NONE = 0, ON_BUSY, ON_IDLE, ON_CLOSING, ON_WAIT } pool_list_t;

struct imap_append {
    loop_t      *loop;
    uint64_t     id;    /* session id for log lines */
    imap_state_t state;

    /* copied from the account */
    struct sockaddr_storage addr;
    socklen_t               addrlen;
    char                   *host;
    char                   *user;
    char                   *password;
    imap_tls_t              tls;
    SSL_CTX                *ssl_ctx; /* our reference */
    int                     verify_host;
    unsigned                timeout_ms;

    const char    *data; /* the message: referenced */
    size_t         len;
    imap_append_cb cb;
    void          *arg;

    stream_t *stream;

    /* the command in flight */
    unsigned    tagno;
    char        tag[16];   /* "" when no tagged reply is awaited */
    buf_t       cmd;
    cmd_chunk_t *chunks;
    size_t      chunks_cap;
    size_t      nchunks;
    size_t      next_chunk;
    int         waiting_cont;
    int         cmd_sensitive; /* holds credentials: redact, wipe */

    unsigned caps;
    int      caps_known;
    char    *sent_special; /* first selectable mailbox with \Sent */
    char    *sent_named;   /* "Sent" */
    char    *sent_inbox;   /* "INBOX<delim>Sent" (servers with INBOX-prefixed namespaces) */
    char     bye[512];     /* text of an untagged BYE */

    imap_append_result_t res;
    int                  have_result;
    int                  in_user_cb;
    loop_timer_t         done_timer;
    imap_resp_t          resp;

    /* pooling: the connection outlives the append when it succeeded */
    imap_pool_t        *pool;     /* NULL: unpooled (or detached by imap_pool_free) */
    pacct_t            *pa;       /* the pool's entry for this key */
    struct imap_append *next, *prev;
    pool_list_t         on;
    char                mailbox[256]; /* the \Sent mailbox found by LIST, kept for reuse */
    uint64_t            opened_ms;    /* loop clock when this connection was opened */
    uint64_t            idle_since;
    unsigned            nappends;     /* successful APPENDs on this connection */
    int                 reused;       /* the append in flight runs on a parked connection */
    int                 job_reused;   /* the append started on a parked connection (result) */
    int                 retried;      /* already moved to a fresh connection once */
    int                 append_answered; /* the server said something (not BYE) to the APPEND in flight */
    unsigned            connections;  /* connections opened for the append in flight */
    int                 counted;      /* holds one of its account's connection slots (pa->nconn) */
    char               *check_msgid;  /* look for this Message-ID in \Sent before APPEND; NULL: don't */
    char               *msgid;        /* the message's Message-ID (account's message_id), or NULL */
    uint32_t            found_uid, found_uidvalidity;
    struct imap_append *served_by;    /* WAIT handle: the parked session running its append */
    /* MULTIAPPEND (RFC 3502): the queued appends whose messages one APPEND
     * carries, oldest first (a slot is NULL once its handle is cancelled),
     * and their uids from APPENDUID. Each gets its result from its own
     * done timer. */
    struct imap_append **batch;
    size_t              nbatch;
    uint32_t           *batch_uids;
    loop_timer_t        idle_timer;   /* parked: idle/age expiry; WAIT: the wait's deadline */
};

struct pacct {
    pacct_t     *next;
    char        *key;
    imap_append_t *idle; /* MRU first */
    unsigned     nidle;
    imap_append_t *waiters; /* appends queued for a session, newest first (served oldest first) */
    unsigned     nconn;  /* connections of this key: busy, parked or logging out */
};

struct imap_pool {
    loop_t            *loop;
    imap_pool_limits_t lim;
    pacct_t           *accts;
    imap_append_t     *busy;    /* pooled appends in flight */
    imap_append_t     *closing; /* background LOGOUTs (no callback) */
    size_t             nidle;
    size_t             nwait;
    loop_timer_t       wake_timer; /* serves waiters outside the call that freed a session */
    int                freeing;
    imap_pool_stats_t  st;
};

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

/* ---------------------------------------------------------------- helpers */

static void set_state(imap_append_t *a, imap_state_t st)
{
    log_debug("imap", "state", "session=%016" PRIx64 " %s -> %s", a->id, strstate(a->state), strstate(st));
    a->state = st;
}

static void set_result(imap_append_t *a, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_result(imap_append_t *a, int status, const char *fmt, ...)
{
    if (a->have_result)
        return; /* the first outcome is the one that counts */
    a->have_result = 1;
    a->res.status = status;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(a->res.error, sizeof(a->res.error), fmt, ap);
        va_end(ap);
    }
}

/* Close the connection and hand the result to the done timer. */
static void finish(imap_append_t *a)
{
    if (a->state == IMAP_ST_DONE)
        return;
    set_state(a, IMAP_ST_DONE);
    if (a->stream) {
        stream_free(a->stream); /* safe inside the stream's own callback */
        a->stream = NULL;
    }
    loop_timer_set(a->loop, &a->done_timer, 0);
}

/* Record the first failure only: later ones are consequences of it. */
static void set_result_v(imap_append_t *a, int status, const char *fmt, va_list ap)
{
    if (a->have_result)
        return;
    a->have_result = 1;
    a->res.status = status;
    vsnprintf(a->res.error, sizeof(a->res.error), fmt, ap);
}

static void fail(imap_append_t *a, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(imap_append_t *a, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_result_v(a, status, fmt, ap);
    va_end(ap);
    finish(a);
}

static void wipe_cmd(imap_append_t *a)
{
    if (a->cmd_sensitive && a->cmd.data)
        OPENSSL_cleanse(a->cmd.data, a->cmd.cap);
    a->cmd_sensitive = 0;
}

static char *xstrdup_or_null(const char *s)
{
    return s ? xstrdup(s) : NULL;
}

static void free_secret(char *s)
{
    if (s) {
        OPENSSL_cleanse(s, strlen(s));
        free(s);
    }
}

/* For a log value inside double quotes. */
static const char *logsafe(char *dst, size_t n, const char *src)
{
    size_t i = 0;
    for (; src && src[i] && i + 1 < n; i++) {
        unsigned char c = (unsigned char)src[i];
        dst[i] = c == '"' ? '\'' : (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    dst[i] = '\0';
    return dst;
}

static void go_idle(imap_append_t *a);
static void idle_unfit(imap_append_t *a, const char *why);
static int  may_retry(imap_append_t *a, stream_t *s);
static void retry_fresh(imap_append_t *a, const char *why, int check);
static void on_stream(stream_t *s, stream_event_t ev, void *arg);

/* ---------------------------------------------------------------- commands */

static cmd_chunk_t *cmd_new_chunk(imap_append_t *a)
{
    if (a->nchunks == a->chunks_cap) {
        a->chunks_cap = a->chunks_cap ? a->chunks_cap * 2 : 8;
        a->chunks = xrealloc(a->chunks, a->chunks_cap * sizeof(*a->chunks));
    }
    cmd_chunk_t *c = &a->chunks[a->nchunks++];
    memset(c, 0, sizeof(*c));
    c->off = a->cmd.len;
    return c;
}

static void cmd_bytes(imap_append_t *a, const char *p, size_t n)
{
    cmd_chunk_t *c = a->nchunks ? &a->chunks[a->nchunks - 1] : NULL;
    if (c == NULL || c->ext || c->sync)
        c = cmd_new_chunk(a);
    buf_append(&a->cmd, p, n);
    c->len += n;
}

static void cmd_text(imap_append_t *a, const char *s)
{
    cmd_bytes(a, s, strlen(s));
}

static void cmd_printf(imap_append_t *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void cmd_printf(imap_append_t *a, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0)
        cmd_bytes(a, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* What was written so far waits for a "+" before the rest is sent. */
static void cmd_sync(imap_append_t *a)
{
    if (a->nchunks)
        a->chunks[a->nchunks - 1].sync = 1;
}

static void cmd_begin(imap_append_t *a, const char *verb, int sensitive)
{
    wipe_cmd(a);
    buf_reset(&a->cmd);
    a->nchunks = a->next_chunk = 0;
    a->waiting_cont = 0;
    a->cmd_sensitive = sensitive;
    snprintf(a->tag, sizeof(a->tag), "A%u", ++a->tagno);
    cmd_printf(a, "%s %s", a->tag, verb);
}

/* literal: "{n}" CRLF and wait for "+", or "{n+}" CRLF when allowed. */
static void cmd_literal(imap_append_t *a, const char *p, size_t n, int referenced)
{
    int nonsync = (a->caps & IMAP_CAP_LITERAL_PLUS) ||
                  ((a->caps & IMAP_CAP_LITERAL_MINUS) && n <= IMAP_LITERAL_MINUS_MAX);
    cmd_printf(a, "{%zu%s}\r\n", n, nonsync ? "+" : "");
    if (!nonsync)
        cmd_sync(a);
    if (referenced) {
        cmd_chunk_t *c = cmd_new_chunk(a);
        c->ext = p;
        c->len = n;
    } else {
        cmd_bytes(a, p, n);
    }
}

/* astring: a quoted string when every octet is printable ASCII, else a
 * literal (8-bit, control characters, very long values). */
static void cmd_astring(imap_append_t *a, const char *s)
{
    size_t n = strlen(s);
    int quotable = n <= IMAP_MAX_QUOTED;
    for (size_t i = 0; quotable && i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            quotable = 0;
    if (!quotable) {
        cmd_literal(a, s, n, 0);
        return;
    }
    cmd_bytes(a, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' || s[i] == '"')
            cmd_bytes(a, "\\", 1);
        cmd_bytes(a, s + i, 1);
    }
    cmd_bytes(a, "\"", 1);
}

/* Send chunks until one waits for a continuation. */
static void cmd_flush(imap_append_t *a)
{
    a->waiting_cont = 0;
    stream_cork(a->stream, 1);
    while (a->next_chunk < a->nchunks) {
        const cmd_chunk_t *c = &a->chunks[a->next_chunk++];
        if (c->ext) /* the message: sent from the caller's memory (alive until the callback) */
            stream_write_ref(a->stream, c->ext, c->len);
        else
            stream_write(a->stream, a->cmd.data + c->off, c->len);
        if (c->sync) {
            a->waiting_cont = 1;
            break;
        }
    }
    stream_cork(a->stream, 0);
}

static void cmd_end(imap_append_t *a, imap_state_t next)
{
    cmd_bytes(a, "\r\n", 2);
    if (log_enabled(LOG_DEBUG)) {
        const char *line = a->cmd.data;
        size_t n = strcspn(line, "\r\n");
        if (a->cmd_sensitive)
            log_debug("imap", "send", "session=%016" PRIx64 " %s <credentials>", a->id, a->tag);
        else
            log_debug("imap", "send", "session=%016" PRIx64 " %.*s", a->id, (int)(n > 200 ? 200 : n), line);
    }
    set_state(a, next);
    unsigned t = a->timeout_ms;
    if (next == IMAP_ST_LOGOUT && t > IMAP_LOGOUT_TIMEOUT_MS)
        t = IMAP_LOGOUT_TIMEOUT_MS;
    stream_set_timeout(a->stream, t);
    cmd_flush(a);
}

/* ---------------------------------------------------------------- steps */

static void send_logout(imap_append_t *a)
{
    cmd_begin(a, "LOGOUT", 0);
    cmd_end(a, IMAP_ST_LOGOUT);
}

/* Pooled and stored: keep the connection. The callback fires from the
 * done timer; pool_park() decides afterwards whether it is kept. */
static void go_idle(imap_append_t *a)
{
    a->nappends += a->nbatch ? (unsigned)a->nbatch : 1;
    set_state(a, IMAP_ST_IDLE);
    stream_set_timeout(a->stream, 0);
    loop_timer_set(a->loop, &a->done_timer, 0);
}

/* The server refused something: record why, then say goodbye politely. */
static void refuse(imap_append_t *a, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void refuse(imap_append_t *a, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_result_v(a, status, fmt, ap);
    va_end(ap);
    send_logout(a);
}

static void send_capability(imap_append_t *a, imap_state_t next)
{
    cmd_begin(a, "CAPABILITY", 0);
    cmd_end(a, next);
}

static void start_tls(imap_append_t *a, imap_state_t next)
{
    const char *verify = a->verify_host ? a->host : NULL;
    if (stream_tls_client(a->stream, a->ssl_ctx, a->host, verify) < 0) {
        fail(a, IMAP_ETLS, "%s", stream_error(a->stream));
        return;
    }
    set_state(a, next);
}

static void b64_encode(buf_t *out, const unsigned char *p, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)p[i] << 16;
        if (i + 1 < n)
            v |= (unsigned)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        char q[4] = { tab[(v >> 18) & 63], tab[(v >> 12) & 63], i + 1 < n ? tab[(v >> 6) & 63] : '=',
                      i + 2 < n ? tab[v & 63] : '=' };
        buf_append(out, q, 4);
    }
}

static void send_login(imap_append_t *a)
{
    if (a->tls != IMAP_TLS_NONE && !stream_is_tls(a->stream)) {
        /* cannot happen by construction; keep it impossible */
        fail(a, IMAP_ETLS, "refusing to send credentials without TLS");
        return;
    }
    if (!(a->caps & IMAP_CAP_LOGINDISABLED)) {
        cmd_begin(a, "LOGIN", 1);
        cmd_text(a, " ");
        cmd_astring(a, a->user);
        cmd_text(a, " ");
        cmd_astring(a, a->password);
    } else if (a->caps & IMAP_CAP_AUTH_PLAIN) {
        /* RFC 4616: authzid NUL authcid NUL passwd, base64 */
        buf_t raw = BUF_INIT, b64 = BUF_INIT;
        buf_putc(&raw, '\0');
        buf_puts(&raw, a->user);
        buf_putc(&raw, '\0');
        buf_puts(&raw, a->password);
        b64_encode(&b64, (const unsigned char *)raw.data, raw.len);
        cmd_begin(a, "AUTHENTICATE PLAIN", 1);
        if (a->caps & IMAP_CAP_SASL_IR) {
            cmd_text(a, " ");
        } else {
            cmd_text(a, "\r\n");
            cmd_sync(a);
        }
        cmd_bytes(a, b64.data, b64.len);
        OPENSSL_cleanse(raw.data, raw.cap);
        OPENSSL_cleanse(b64.data, b64.cap);
        buf_free(&raw);
        buf_free(&b64);
    } else {
        refuse(a, IMAP_EAUTH, "server advertises LOGINDISABLED and offers no AUTH=PLAIN");
        return;
    }
    /* the login reply (or a CAPABILITY after it) says what is allowed now */
    a->caps_known = 0;
    cmd_end(a, IMAP_ST_LOGIN);
}

/* Capabilities known, not logged in yet. */
static void after_capabilities(imap_append_t *a)
{
    if (a->tls == IMAP_TLS_STARTTLS && !stream_is_tls(a->stream)) {
        if (!(a->caps & IMAP_CAP_STARTTLS)) {
            refuse(a, IMAP_ETLS, "server does not offer STARTTLS");
            return;
        }
        cmd_begin(a, "STARTTLS", 0);
        cmd_end(a, IMAP_ST_STARTTLS);
        return;
    }
    send_login(a);
}

/* Logged in, capabilities known: look for \Sent. */
static void after_login(imap_append_t *a)
{
    cmd_begin(a, "LIST", 0);
    if ((a->caps & IMAP_CAP_SPECIAL_USE) && (a->caps & IMAP_CAP_LIST_EXTENDED))
        cmd_text(a, " (SPECIAL-USE) \"\" \"*\""); /* RFC 6154 §5.1: only special-use mailboxes */
    else
        cmd_text(a, " \"\" \"*\""); /* attributes (if any) come with plain LIST */
    cmd_end(a, IMAP_ST_LIST);
}

static void send_append(imap_append_t *a, const char *mailbox)
{
    a->append_answered = 0;
    cmd_begin(a, "APPEND", 0);
    cmd_text(a, " ");
    cmd_astring(a, mailbox);
    if (a->nbatch) {
        for (size_t i = 0; i < a->nbatch; i++) {
            cmd_text(a, " (\\Seen) ");
            cmd_literal(a, a->batch[i]->data, a->batch[i]->len, 1);
        }
    } else {
        cmd_text(a, " (\\Seen) ");
        cmd_literal(a, a->data, a->len, 1);
    }
    cmd_end(a, IMAP_ST_APPEND);
}

/* An earlier attempt may have stored this copy and lost the answer (the
 * connection dropped after APPEND, the worker died before recording it):
 * when asked, look for its Message-ID first. EXAMINE is read-only, so the
 * CLOSE after the search expunges nothing. */
static void before_append(imap_append_t *a)
{
    if (a->check_msgid == NULL) {
        send_append(a, a->mailbox);
        return;
    }
    a->found_uid = a->found_uidvalidity = 0;
    cmd_begin(a, "EXAMINE", 0);
    cmd_text(a, " ");
    cmd_astring(a, a->mailbox);
    cmd_end(a, IMAP_ST_EXAMINE);
}

static void on_check_reply(imap_append_t *a, const imap_resp_t *r)
{
    switch (a->state) {
    case IMAP_ST_EXAMINE:
        if (r->cond != IMAP_COND_OK) { /* cannot look: store it */
            send_append(a, a->mailbox);
            return;
        }
        cmd_begin(a, "UID SEARCH", 0);
        cmd_text(a, " HEADER Message-ID ");
        cmd_astring(a, a->check_msgid);
        cmd_end(a, IMAP_ST_SEARCH);
        return;
    case IMAP_ST_SEARCH:
        if (r->cond != IMAP_COND_OK)
            a->found_uid = 0;
        cmd_begin(a, "CLOSE", 0);
        cmd_end(a, IMAP_ST_CLOSE);
        return;
    default: /* CLOSE */
        if (a->found_uid == 0 || a->found_uidvalidity == 0) {
            send_append(a, a->mailbox);
            return;
        }
        a->res.uid = a->found_uid;
        a->res.uidvalidity = a->found_uidvalidity;
        a->res.already_stored = 1;
        set_result(a, IMAP_OK, NULL);
        if (a->pool) {
            go_idle(a);
            return;
        }
        send_logout(a);
        return;
    }
}

/* ---------------------------------------------------------------- replies */

static void on_greeting(imap_append_t *a, const imap_resp_t *r)
{
    switch (r->cond) {
    case IMAP_COND_OK:
        if (a->caps_known)
            after_capabilities(a);
        else
            send_capability(a, IMAP_ST_CAPABILITY);
        return;
    case IMAP_COND_PREAUTH:
        if (a->tls == IMAP_TLS_STARTTLS) {
            refuse(a, IMAP_ETLS, "server greeted with PREAUTH: STARTTLS impossible");
            return;
        }
        if (a->caps_known)
            after_login(a);
        else
            send_capability(a, IMAP_ST_AUTH_CAPABILITY);
        return;
    case IMAP_COND_BYE:
        fail(a, IMAP_ENETWORK, "server refused the connection: BYE %s", r->text);
        return;
    default:
        fail(a, IMAP_EPROTO, "unexpected greeting: %s %s", r->keyword, r->text);
        return;
    }
}

static void on_list_entry(imap_append_t *a, const imap_resp_t *r)
{
    if (r->mbx_name_truncated || (r->mbx_flags & (IMAP_MBX_NOSELECT | IMAP_MBX_NONEXISTENT)))
        return;
    const char *name = r->mbx_name;
    if ((r->mbx_flags & IMAP_MBX_SENT) && a->sent_special == NULL)
        a->sent_special = xstrdup(name);
    if (a->sent_named == NULL && strcmp(name, "Sent") == 0)
        a->sent_named = xstrdup(name);
    if (a->sent_inbox == NULL && r->mbx_delim && util_strncasecmp(name, "INBOX", 5) == 0 &&
        name[5] == r->mbx_delim && strcmp(name + 6, "Sent") == 0)
        a->sent_inbox = xstrdup(name);
}

static void on_untagged(imap_append_t *a, const imap_resp_t *r)
{
    if (a->state == IMAP_ST_GREETING) {
        on_greeting(a, r);
        return;
    }
    if (r->cond == IMAP_COND_BYE) {
        /* the server is about to close: keep its reason for the error */
        snprintf(a->bye, sizeof(a->bye), "%s", r->text[0] ? r->text : "(no text)");
        return;
    }
    if (a->state == IMAP_ST_LIST && (strcmp(r->keyword, "LIST") == 0 || strcmp(r->keyword, "XLIST") == 0))
        on_list_entry(a, r);
    if (a->state == IMAP_ST_EXAMINE && r->has_uidvalidity)
        a->found_uidvalidity = r->uidvalidity;
    if (a->state == IMAP_ST_SEARCH && strcmp(r->keyword, "SEARCH") == 0 && r->search_max > a->found_uid)
        a->found_uid = r->search_max; /* the newest copy, if several */
    /* anything else (EXISTS, FLAGS, OK [ALERT] ...) is not ours to act on */
}

static void on_continuation(imap_append_t *a, const imap_resp_t *r)
{
    if (!a->waiting_cont) {
        fail(a, IMAP_EPROTO, "unexpected continuation request %s: + %s", state_info[a->state].doing, r->text);
        return;
    }
    cmd_flush(a);
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

static void on_append_reply(imap_append_t *a, const imap_resp_t *r)
{
    char why[600];
    if (r->cond != IMAP_COND_OK) {
        refuse(a, IMAP_EREFUSED, "APPEND to %s: %s", a->res.mailbox, reply_text(r, why, sizeof(why)));
        return;
    }
    size_t want = a->nbatch ? a->nbatch : 1;
    if (r->has_appenduid && r->nuids == want) {
        a->res.uidvalidity = r->uidvalidity;
        a->res.uid = r->uid;
        if (a->nbatch) {
            a->batch_uids = xcalloc(want, sizeof(*a->batch_uids));
            memcpy(a->batch_uids, r->uids, want * sizeof(*a->batch_uids));
        }
        set_result(a, IMAP_OK, NULL);
    } else if (r->has_appenduid) {
        set_result(a, IMAP_EPROTO, "APPEND of %zu message%s to %s: APPENDUID lists %u uid%s", want,
                   want == 1 ? "" : "s", a->res.mailbox, r->nuids, r->nuids == 1 ? "" : "s");
    } else if (strcmp(r->code, "APPENDUID") == 0) {
        set_result(a, IMAP_EPROTO, "APPEND to %s: malformed APPENDUID: %s", a->res.mailbox,
                   reply_text(r, why, sizeof(why)));
    } else {
        set_result(a, IMAP_ENOUIDPLUS, "appended to %s but the server returned no APPENDUID%s", a->res.mailbox,
                   (a->caps & IMAP_CAP_UIDPLUS) ? "" : " (no UIDPLUS)");
    }
    if (a->pool && (a->res.status == IMAP_OK || a->res.status == IMAP_ENOUIDPLUS)) {
        go_idle(a);
        return;
    }
    send_logout(a);
}

static void on_list_done(imap_append_t *a, const imap_resp_t *r)
{
    char why[600];
    if (r->cond != IMAP_COND_OK) {
        refuse(a, IMAP_EPROTO, "LIST: %s", reply_text(r, why, sizeof(why)));
        return;
    }
    const char *mailbox = a->sent_special;
    if (mailbox == NULL && !(a->caps & IMAP_CAP_SPECIAL_USE))
        mailbox = a->sent_named ? a->sent_named : a->sent_inbox;
    if (mailbox == NULL) {
        refuse(a, IMAP_ENOSENT, "%s", (a->caps & IMAP_CAP_SPECIAL_USE)
                                         ? "no selectable mailbox has the \\Sent attribute"
                                         : "server has no SPECIAL-USE and no mailbox named Sent");
        return;
    }
    snprintf(a->res.mailbox, sizeof(a->res.mailbox), "%s", mailbox);
    snprintf(a->mailbox, sizeof(a->mailbox), "%s", mailbox);
    before_append(a);
}

static void on_tagged(imap_append_t *a, const imap_resp_t *r)
{
    char why[600];
    if (a->tag[0] == '\0' || strcmp(r->tag, a->tag) != 0) {
        fail(a, IMAP_EPROTO, "unexpected tagged reply %s: %s %s", state_info[a->state].doing, r->tag,
             reply_text(r, why, sizeof(why)));
        return;
    }
    /* the command is complete; a literal still waiting for "+" is never sent */
    a->tag[0] = '\0';
    a->waiting_cont = 0;
    a->next_chunk = a->nchunks;
    wipe_cmd(a);

    switch (a->state) {
    case IMAP_ST_CAPABILITY:
    case IMAP_ST_AUTH_CAPABILITY:
        if (r->cond != IMAP_COND_OK) {
            refuse(a, IMAP_EPROTO, "CAPABILITY: %s", reply_text(r, why, sizeof(why)));
        } else if (!a->caps_known) {
            fail(a, IMAP_EPROTO, "CAPABILITY completed without capability data");
        } else if (a->state == IMAP_ST_CAPABILITY) {
            after_capabilities(a);
        } else {
            after_login(a);
        }
        return;
    case IMAP_ST_STARTTLS:
        if (r->cond != IMAP_COND_OK) {
            refuse(a, IMAP_ETLS, "STARTTLS: %s", reply_text(r, why, sizeof(why)));
            return;
        }
        a->caps = 0; /* RFC 3501 §6.2.1: forget what was said in clear */
        a->caps_known = 0;
        start_tls(a, IMAP_ST_STARTTLS_TLS);
        return;
    case IMAP_ST_LOGIN:
        if (r->cond != IMAP_COND_OK) {
            /* RFC 5530: these codes say "not now", not "wrong credentials"
             * (Dovecot: NO [LIMIT] past mail_max_userip_connections) */
            int busy = strcmp(r->code, "UNAVAILABLE") == 0 || strcmp(r->code, "LIMIT") == 0 ||
                       strcmp(r->code, "INUSE") == 0 || strcmp(r->code, "SERVERBUG") == 0;
            refuse(a, busy ? IMAP_EBUSY : IMAP_EAUTH, "login as %s: %s", a->user, reply_text(r, why, sizeof(why)));
            return;
        }
        if (a->caps_known)
            after_login(a);
        else
            send_capability(a, IMAP_ST_AUTH_CAPABILITY);
        return;
    case IMAP_ST_LIST:
        on_list_done(a, r);
        return;
    case IMAP_ST_EXAMINE:
    case IMAP_ST_SEARCH:
    case IMAP_ST_CLOSE:
        on_check_reply(a, r);
        return;
    case IMAP_ST_APPEND:
        on_append_reply(a, r);
        return;
    case IMAP_ST_LOGOUT:
        finish(a);
        return;
    default:
        fail(a, IMAP_EPROTO, "tagged reply in state %s", strstate(a->state));
        return;
    }
}

static void on_response(imap_append_t *a, const imap_resp_t *r)
{
    if (r->has_caps) {
        a->caps = r->caps;
        a->caps_known = 1;
    }
    if (a->state == IMAP_ST_APPEND && !(r->kind == IMAP_RESP_UNTAGGED && r->cond == IMAP_COND_BYE))
        a->append_answered = 1; /* from here on a lost connection is never retried */
    switch (r->kind) {
    case IMAP_RESP_UNTAGGED:
        on_untagged(a, r);
        return;
    case IMAP_RESP_CONTINUATION:
        on_continuation(a, r);
        return;
    default:
        on_tagged(a, r);
        return;
    }
}

static void on_data(imap_append_t *a)
{
    buf_t *in = stream_input(a->stream);
    /* the state check comes first: a finished session has let go of its stream */
    while (a->state != IMAP_ST_DONE && buf_size(in) > 0) {
        if (a->state == IMAP_ST_IDLE) {
            /* nothing is asked of an idle session: whatever comes (a BYE
             * before the server hangs up, an alert) makes it unfit */
            idle_unfit(a, buf_size(in) >= 5 && util_strncasecmp(buf_head(in), "* BYE", 5) == 0
                              ? "bye"
                              : "unsolicited_data");
            return; /* a may be gone */
        }
        size_t used = 0;
        int rc = imap_resp_parse(buf_head(in), buf_size(in), &a->resp, &used);
        if (rc == IMAP_PARSE_MORE)
            return;
        if (rc == IMAP_PARSE_ERROR) {
            fail(a, IMAP_EPROTO, "bad response %s: %s", state_info[a->state].doing, a->resp.error);
            return;
        }
        if (log_enabled(LOG_DEBUG)) {
            size_t n = strcspn(buf_head(in), "\r\n");
            log_debug("imap", "recv", "session=%016" PRIx64 " %.*s", a->id, (int)(n > 200 ? 200 : n),
                      buf_head(in));
        }
        /* consumed before acting: STARTTLS must find nothing pipelined behind its OK */
        buf_consume(in, used);
        on_response(a, &a->resp);
    }
}

static void on_stream(stream_t *s, stream_event_t ev, void *arg)
{
    imap_append_t *a = arg;
    if (a->state == IMAP_ST_DONE)
        return;
    if (a->state == IMAP_ST_IDLE && ev != STREAM_EV_DATA) {
        if (ev != STREAM_EV_DRAINED)
            idle_unfit(a, ev == STREAM_EV_CLOSED ? "closed_by_server" : stream_event_name(ev)); /* a may be gone */
        return;
    }
    switch (ev) {
    case STREAM_EV_CONNECTED:
        if (a->tls == IMAP_TLS_IMAPS)
            start_tls(a, IMAP_ST_TLS);
        else
            set_state(a, IMAP_ST_GREETING);
        return;
    case STREAM_EV_TLS_READY:
        log_debug("imap", "tls", "session=%016" PRIx64 " version=%s cipher=%s", a->id,
                  stream_tls_version(s), stream_tls_cipher(s));
        if (a->state == IMAP_ST_TLS)
            set_state(a, IMAP_ST_GREETING);
        else
            send_capability(a, IMAP_ST_CAPABILITY);
        return;
    case STREAM_EV_DATA:
        on_data(a);
        return;
    case STREAM_EV_DRAINED:
        return;
    default:
        break;
    }

    /* TIMEOUT, CLOSED, ERROR: the stream is dead */
    if (a->state == IMAP_ST_LOGOUT) {
        finish(a); /* the result was settled before LOGOUT */
        return;
    }
    int retry = ev != STREAM_EV_TIMEOUT ? may_retry(a, s) : 0;
    if (retry) {
        retry_fresh(a, ev == STREAM_EV_CLOSED ? "closed by server" : stream_error(s), retry == 2);
        return;
    }
    const char *doing = state_info[a->state].doing;
    if (ev == STREAM_EV_TIMEOUT) {
        fail(a, IMAP_ETIMEOUT, "timeout %s (%u ms)", doing, a->timeout_ms);
    } else if (ev == STREAM_EV_CLOSED) {
        if (a->bye[0])
            fail(a, IMAP_ENETWORK, "server closed the connection %s: BYE %s", doing, a->bye);
        else
            fail(a, IMAP_ENETWORK, "server closed the connection %s", doing);
    } else {
        int tls = a->state == IMAP_ST_TLS || a->state == IMAP_ST_STARTTLS_TLS;
        fail(a, tls ? IMAP_ETLS : IMAP_ENETWORK, "%s %s: %s", tls ? "TLS failed" : "connection failed", doing,
             stream_error(s));
    }
}

/* ---------------------------------------------------------------- lifetime */

static void list_add(imap_append_t **head, imap_append_t *a)
{
    a->prev = NULL;
    a->next = *head;
    if (*head)
        (*head)->prev = a;
    *head = a;
}

static void list_del(imap_append_t **head, imap_append_t *a)
{
    if (a->prev)
        a->prev->next = a->next;
    else
        *head = a->next;
    if (a->next)
        a->next->prev = a->prev;
    a->next = a->prev = NULL;
}

/* Take a off whatever pool list holds it. */
static void pool_unlink(imap_append_t *a)
{
    imap_pool_t *p = a->pool;
    switch (a->on) {
    case ON_BUSY:
        list_del(&p->busy, a);
        break;
    case ON_IDLE:
        list_del(&a->pa->idle, a);
        a->pa->nidle--;
        p->nidle--;
        loop_timer_cancel(a->loop, &a->idle_timer);
        break;
    case ON_CLOSING:
        list_del(&p->closing, a);
        break;
    case ON_WAIT:
        list_del(&a->pa->waiters, a);
        p->nwait--;
        loop_timer_cancel(a->loop, &a->idle_timer);
        break;
    default:
        break;
    }
    a->on = ON_NONE;
}

static void pool_wake(imap_pool_t *p);

static void batch_dispatch(imap_append_t *s);

static void session_free(imap_append_t *a)
{
    if (a->nbatch) { /* closed before its result was handed out */
        set_result(a, IMAP_ENETWORK, "the connection carrying this copy was closed before the server answered");
        batch_dispatch(a);
    }
    if (a->pool) {
        pool_unlink(a);
        if (a->counted) {
            a->pa->nconn--;
            if (a->pa->waiters)
                pool_wake(a->pool); /* a connection slot came free */
        }
    }
    loop_timer_cancel(a->loop, &a->done_timer);
    loop_timer_cancel(a->loop, &a->idle_timer);
    if (a->stream)
        stream_free(a->stream);
    if (a->ssl_ctx)
        SSL_CTX_free(a->ssl_ctx); /* from imap_append_start() */
    wipe_cmd(a);
    buf_free(&a->cmd);
    free(a->chunks);
    free_secret(a->password);
    free(a->user);
    free(a->host);
    free(a->check_msgid);
    free(a->msgid);
    free(a->sent_special);
    free(a->sent_named);
    free(a->sent_inbox);
    free(a);
}

static void log_result(imap_append_t *a)
{
    char user[300], mbx[300], err[600];
    logsafe(user, sizeof(user), a->user);
    logsafe(mbx, sizeof(mbx), a->res.mailbox);
    if (a->res.status == IMAP_OK)
        log_info("imap", "appended",
                 "session=%016" PRIx64 " user=\"%s\" host=%s mailbox=\"%s\" uidvalidity=%" PRIu32
                 " uid=%" PRIu32 " size=%zu reused=%d already_stored=%d",
                 a->id, user, a->host, mbx, a->res.uidvalidity, a->res.uid, a->len, a->job_reused,
                 a->res.already_stored);
    else
        log_warn("imap", "append_failed",
                 "session=%016" PRIx64 " user=\"%s\" host=%s mailbox=\"%s\" status=%s error=\"%s\"", a->id,
                 user, a->host, mbx, imap_strerror(a->res.status), logsafe(err, sizeof(err), a->res.error));
}

static void pool_park(imap_append_t *a);
static void pool_debug(const imap_append_t *a, const char *event, const char *reason);

static void done_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    imap_append_t *a = arg;
    if (a->nbatch) {
        if (!a->have_result)
            set_result(a, IMAP_EPROTO, "session ended without a result");
        pool_debug(a, "batch_done", a->res.status == IMAP_OK ? "ok" : imap_strerror(a->res.status));
        batch_dispatch(a);
        if (a->state == IMAP_ST_IDLE && a->pool)
            pool_park(a);
        else
            session_free(a);
        return;
    }
    if (a->cb == NULL) { /* a background LOGOUT (pool) has ended: nobody to tell */
        session_free(a);
        return;
    }
    if (!a->have_result) /* every path sets one; never report success by accident */
        set_result(a, IMAP_EPROTO, "session ended without a result");
    a->res.connections = a->connections;
    a->res.reused = a->job_reused;
    log_result(a);
    a->in_user_cb = 1;
    a->cb(a->arg, &a->res);
    a->in_user_cb = 0;
    if (a->state == IMAP_ST_IDLE && a->pool)
        pool_park(a); /* the append is over for the caller; the connection stays */
    else
        session_free(a);
}

/* Open a fresh connection for the append in a. */
static void open_connection(imap_append_t *a)
{
    a->stream = stream_new(a->loop, on_stream, a);
    stream_set_timeout(a->stream, a->timeout_ms);
    a->opened_ms = loop_now_ms(a->loop);
    a->connections++;
    if (a->pool) {
        a->pool->st.opened++;
        pool_debug(a, "open", a->retried ? "retry" : NULL);
    }
    set_state(a, IMAP_ST_CONNECT);
    if (stream_connect(a->stream, (const struct sockaddr *)&a->addr, a->addrlen) < 0)
        fail(a, IMAP_ENETWORK, "%s", stream_error(a->stream));
}

/* ---------------------------------------------------------------- pool */

/*
 * The pool reuses the session object itself: after a successful APPEND a
 * pooled session enters IMAP_ST_IDLE, the callback fires from the done
 * timer as usual, and only then is the object parked (pool_park) with its
 * callback, argument and message pointer cleared, so nothing of the
 * finished append stays referenced. Reuse hands the same object out as
 * the new append's handle.
 *
 * Idle sessions keep their stream callback: any event on them (bytes,
 * EOF, error) drops them at once (idle_unfit). Each has its own idle
 * timer (the loop's min-heap) set to the idle time or the rest of its
 * age, whichever ends first; it says LOGOUT in the background, on the
 * closing list, without a callback.
 */

static unsigned or_default(unsigned v, unsigned def)
{
    return v ? v : def;
}

static pacct_t *pacct_get(imap_pool_t *p, const char *key, int create)
{
    for (pacct_t *pa = p->accts; pa; pa = pa->next)
        if (strcmp(pa->key, key) == 0)
            return pa;
    if (!create)
        return NULL;
    pacct_t *pa = xcalloc(1, sizeof(*pa));
    pa->key = xstrdup(key);
    pa->next = p->accts;
    p->accts = pa;
    return pa;
}

/* The pool key: server address and port, TLS mode, host name and its
 * check, user. Returns a malloc'd string. */
static char *account_key(const imap_account_t *acct)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (acct->addr->sa_family == AF_INET && acct->addrlen >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)acct->addr;
        inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
        port = ntohs(sin->sin_port);
    } else if (acct->addr->sa_family == AF_INET6 && acct->addrlen >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)acct->addr;
        inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
        port = ntohs(sin6->sin6_port);
    }
    buf_t b = BUF_INIT;
    buf_printf(&b, "[%s]:%u tls=%d host=%s verify=%d user=", ip, port, (int)acct->tls, acct->host ? acct->host : "",
               acct->verify_host ? 1 : 0);
    buf_puts(&b, acct->user);
    return buf_steal(&b, NULL);
}

/* The same checks imap_append_start() reports through the callback: only
 * a valid request may take a parked session. */
static int account_valid(const imap_account_t *acct, const char *data, size_t len)
{
    if (acct->addr == NULL || acct->addrlen == 0 || acct->addrlen > sizeof(struct sockaddr_storage))
        return 0;
    if (acct->tls != IMAP_TLS_IMAPS && acct->tls != IMAP_TLS_STARTTLS && acct->tls != IMAP_TLS_NONE)
        return 0;
    if (acct->tls != IMAP_TLS_NONE && acct->ssl_ctx == NULL)
        return 0;
    if (acct->verify_host && (acct->host == NULL || acct->host[0] == '\0'))
        return 0;
    if (acct->user == NULL || acct->password == NULL)
        return 0;
    return !(data == NULL && len > 0);
}

static void pool_debug(const imap_append_t *a, const char *event, const char *reason)
{
    if (!log_enabled(LOG_DEBUG))
        return;
    char user[300];
    logsafe(user, sizeof(user), a->user);
    log_debug("imap_pool", event,
              "session=%016" PRIx64 " user=\"%s\" host=%s appends=%u age_ms=%" PRIu64 " idle=%zu reason=%s", a->id,
              user, a->host, a->nappends, loop_now_ms(a->loop) - a->opened_ms, a->pool ? a->pool->nidle : 0,
              reason ? reason : "-");
}

/* Say LOGOUT in the background; done_fired() frees a when it has ended. */
static void retire(imap_append_t *a, const char *why, uint64_t *counter)
{
    imap_pool_t *p = a->pool;
    pool_unlink(a);
    (*counter)++;
    pool_debug(a, "logout", why);
    a->cb = NULL;
    a->arg = NULL;
    a->on = ON_CLOSING;
    list_add(&p->closing, a);
    send_logout(a);
}

/* An idle session saw an event it did not ask for. Parked: drop it now.
 * Callback still pending: finish without LOGOUT, so it is not parked. */
static void idle_unfit(imap_append_t *a, const char *why)
{
    if (a->on == ON_IDLE) {
        a->pool->st.lost++;
        pool_debug(a, "idle_lost", why);
        session_free(a); /* inside the stream's callback: the stream defers its own release */
        return;
    }
    pool_debug(a, "not_reusable", why);
    finish(a);
}

static void idle_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    imap_append_t *a = arg;
    imap_pool_t *p = a->pool;
    if (a->state == IMAP_ST_WAIT) {
        unsigned busy = a->pa->nconn;
        pool_unlink(a);
        fail(a, IMAP_ETIMEOUT, "no IMAP session of the account came free within %u ms (%u connections busy)",
             a->timeout_ms, busy);
        return;
    }
    int old = loop_now_ms(loop) - a->opened_ms >= p->lim.max_age_ms;
    retire(a, old ? "max_age" : "idle_timeout", &p->st.expired);
}

/* After the callback of a successful pooled append: park or retire. */
static void pool_park(imap_append_t *a)
{
    imap_pool_t *p = a->pool;
    pool_unlink(a); /* from busy */
    /* nothing of the finished append stays with the connection */
    a->cb = NULL;
    a->arg = NULL;
    a->data = NULL;
    a->len = 0;
    free(a->check_msgid);
    free(a->msgid);
    a->check_msgid = a->msgid = NULL;
    a->nchunks = a->next_chunk = 0;
    a->reused = a->job_reused = 0;
    a->retried = 0;
    a->connections = 0;
    wipe_cmd(a);
    buf_free(&a->cmd);
    free(a->chunks);
    a->chunks = NULL;
    a->chunks_cap = 0;

    uint64_t now = loop_now_ms(a->loop);
    uint64_t age = now - a->opened_ms;
    if (stream_pending_out(a->stream) > 0 || stream_peek_closed(a->stream)) {
        /* the server spoke or hung up behind its OK: not worth a LOGOUT */
        p->st.lost++;
        pool_debug(a, "idle_lost", "not_clean");
        session_free(a);
        return;
    }
    if (a->nappends >= p->lim.max_appends) {
        retire(a, "max_appends", &p->st.retired);
        return;
    }
    if (age >= p->lim.max_age_ms) {
        retire(a, "max_age", &p->st.retired);
        return;
    }
    if (a->pa->nidle >= p->lim.max_idle_per_account) {
        retire(a, "account_idle_full", &p->st.retired);
        return;
    }
    if (p->nidle >= p->lim.max_idle_total) {
        /* make room: the least recently used idle session of the pool goes */
        imap_append_t *victim = NULL;
        for (pacct_t *pa = p->accts; pa; pa = pa->next)
            for (imap_append_t *c = pa->idle; c; c = c->next)
                if (victim == NULL || c->idle_since < victim->idle_since)
                    victim = c;
        if (victim == NULL) {
            retire(a, "pool_idle_full", &p->st.retired);
            return;
        }
        retire(victim, "pool_idle_full", &p->st.retired);
    }
    stream_set_timeout(a->stream, 0); /* the idle timer rules now */
    stream_trim(a->stream);
    a->idle_since = now;
    a->on = ON_IDLE;
    list_add(&a->pa->idle, a);
    a->pa->nidle++;
    p->nidle++;
    p->st.parked++;
    uint64_t left = p->lim.max_age_ms - age;
    loop_timer_set(a->loop, &a->idle_timer, left < p->lim.idle_ms ? left : p->lim.idle_ms);
    pool_debug(a, "park", NULL);
    if (a->pa->waiters)
        pool_wake(p);
}

/* A parked session for key that still looks alive, or NULL. */
static imap_append_t *pool_take(imap_pool_t *p, const char *key)
{
    pacct_t *pa = pacct_get(p, key, 0);
    imap_append_t *a;
    while (pa && (a = pa->idle) != NULL) {
        pool_unlink(a);
        if (a->nappends >= p->lim.max_appends ||
            loop_now_ms(a->loop) - a->opened_ms >= p->lim.max_age_ms) {
            retire(a, "limits", &p->st.retired);
            continue;
        }
        if (stream_peek_closed(a->stream)) {
            /* closed while idle and not noticed yet: costs nothing */
            p->st.lost++;
            pool_debug(a, "idle_lost", "probe");
            session_free(a);
            continue;
        }
        return a;
    }
    return NULL;
}

/* The parked session a is busy again for a new command. */
static void reuse_begin(imap_append_t *a, unsigned timeout_ms)
{
    imap_pool_t *p = a->pool;
    memset(&a->res, 0, sizeof(a->res));
    a->have_result = 0;
    a->in_user_cb = 0;
    a->timeout_ms = timeout_ms;
    a->reused = a->job_reused = 1;
    a->retried = 0;
    a->connections = 0;
    a->bye[0] = '\0';
    buf_init(&a->cmd);
    a->on = ON_BUSY;
    list_add(&p->busy, a);
    p->st.reused++;
    pool_debug(a, "reuse", NULL);
    snprintf(a->res.mailbox, sizeof(a->res.mailbox), "%s", a->mailbox);
}

/* Run the new append on the parked session a: APPEND only. */
static imap_append_t *start_reused(imap_append_t *a, unsigned timeout_ms, const char *check_msgid,
                                   const char *msgid, const char *data, size_t len, imap_append_cb cb,
                                   void *arg)
{
    reuse_begin(a, timeout_ms);
    a->data = data;
    a->len = len;
    a->cb = cb;
    a->arg = arg;
    free(a->check_msgid);
    a->check_msgid = check_msgid && check_msgid[0] ? xstrdup(check_msgid) : NULL;
    free(a->msgid);
    a->msgid = msgid && msgid[0] ? xstrdup(msgid) : NULL;
    before_append(a);
    return a;
}

/* ------------------------------------------------------ waiting for a session */

/* The batch's command is over (or its connection gone): every queued
 * append in it gets the result, with its own uid, from its own done
 * timer; the handles are done afterwards. */
static void batch_dispatch(imap_append_t *s)
{
    for (size_t i = 0; i < s->nbatch; i++) {
        imap_append_t *w = s->batch[i];
        if (w == NULL) /* cancelled */
            continue;
        w->served_by = NULL;
        w->res = s->res;
        if (s->res.status == IMAP_OK && s->batch_uids)
            w->res.uid = s->batch_uids[i];
        w->res.batched = (unsigned)s->nbatch;
        w->job_reused = 1;
        w->have_result = 1;
        loop_timer_set(w->loop, &w->done_timer, 0);
    }
    free(s->batch);
    free(s->batch_uids);
    s->batch = NULL;
    s->batch_uids = NULL;
    s->nbatch = 0;
}

/* Queued appends of w's account to send with w in one MULTIAPPEND on the
 * parked session s: w first, then the next oldest, up to max_batch
 * messages and IMAP_BATCH_MAX_BYTES. None (0) when the server cannot take
 * them or w must look for an earlier copy first. */
static size_t gather_batch(imap_pool_t *p, const imap_append_t *s, imap_append_t *w, imap_append_t ***out)
{
    if (p->lim.max_batch < 2 || !(s->caps & IMAP_CAP_MULTIAPPEND) || w->check_msgid)
        return 0;
    imap_append_t *m[IMAP_MAX_UIDS]; /* max_batch is at most that */
    size_t n = 0, bytes = 0;
    /* the waiters list is newest first: from w (the oldest) towards the head */
    for (imap_append_t *c = w; c && n < p->lim.max_batch; c = c->prev) {
        if (c->check_msgid || (n > 0 && bytes + c->len > IMAP_BATCH_MAX_BYTES))
            continue;
        m[n++] = c;
        bytes += c->len;
    }
    if (n < 2)
        return 0; /* nothing to share: no allocation */
    *out = xcalloc(n, sizeof(**out));
    memcpy(*out, m, n * sizeof(*m));
    return n;
}

/* One APPEND on the parked session s for the n queued appends in m. */
static void start_batch(imap_pool_t *p, imap_append_t *s, imap_append_t **m, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        pool_unlink(m[i]); /* off the waiters, its deadline cancelled */
        m[i]->pool = NULL; /* from now on only a handle for its caller */
        m[i]->pa = NULL;
        m[i]->served_by = s;
        pool_debug(m[i], "wait_served", "batch");
    }
    reuse_begin(s, m[0]->timeout_ms);
    s->data = NULL;
    s->len = 0;
    s->cb = NULL;
    s->arg = NULL;
    free(s->check_msgid);
    free(s->msgid);
    s->check_msgid = s->msgid = NULL;
    s->batch = m;
    s->nbatch = n;
    p->st.batches++;
    p->st.batched += n;
    send_append(s, s->mailbox);
}

/* The parked session s ran the append of the queued handle w: report it
 * as w's (the caller holds w), then w is done. */
static void forward_done(void *arg, const imap_append_result_t *res)
{
    imap_append_t *w = arg;
    w->served_by = NULL;
    w->in_user_cb = 1;
    w->cb(w->arg, res);
    w->in_user_cb = 0;
    session_free(w);
}

/* Give the queued append w a session: a parked one if any is alive, else
 * a fresh connection when the account has a slot free. 0 when neither. */
static int serve_waiter(imap_pool_t *p, imap_append_t *w)
{
    imap_append_t *s = pool_take(p, w->pa->key);
    imap_append_t **m = NULL;
    size_t n = s ? gather_batch(p, s, w, &m) : 0;
    if (n) {
        start_batch(p, s, m, n);
        return 1;
    }
    if (s) {
        pool_unlink(w);
        w->pool = NULL; /* from now on only a handle for the caller */
        w->pa = NULL;
        w->served_by = s;
        pool_debug(w, "wait_served", "parked");
        start_reused(s, w->timeout_ms, w->check_msgid, w->msgid, w->data, w->len, forward_done, w);
        return 1;
    }
    if (w->pa->nconn >= p->lim.max_conns_per_account)
        return 0;
    pool_unlink(w);
    w->counted = 1;
    w->pa->nconn++;
    w->on = ON_BUSY;
    list_add(&p->busy, w);
    pool_debug(w, "wait_served", "fresh");
    open_connection(w);
    return 1;
}

static void wake_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    imap_pool_t *p = arg;
    for (pacct_t *pa = p->accts; pa; pa = pa->next) {
        while (pa->waiters) {
            imap_append_t *w = pa->waiters;
            while (w->next) /* the oldest: served in arrival order */
                w = w->next;
            if (!serve_waiter(p, w))
                break;
        }
    }
}

/* Serve waiters from a timer, never inside the call that freed or parked
 * a session (that may be a stream callback or the caller's callback). */
static void pool_wake(imap_pool_t *p)
{
    if (!p->freeing)
        loop_timer_set(p->loop, &p->wake_timer, 0);
}

/* A reused connection died in the APPEND without any answer. 1: retry,
 * the server cannot have the message (the literal had not all left, or
 * the connection was reset: the server's socket was gone when our bytes
 * arrived). A clean EOF after everything left is ambiguous: 2 (retry, but
 * look for the Message-ID first) when it is known, else 0 (fail). */
static int may_retry(imap_append_t *a, stream_t *s)
{
    if (!a->reused || a->retried || a->nbatch)
        return 0; /* a batch's copies are retried by their owners */
    if (a->state == IMAP_ST_EXAMINE || a->state == IMAP_ST_SEARCH || a->state == IMAP_ST_CLOSE)
        return 1; /* nothing stored yet */
    if (a->state != IMAP_ST_APPEND || a->append_answered)
        return 0;
    if (a->waiting_cont || a->next_chunk < a->nchunks || stream_pending_out(s) > 0)
        return 1;
    int e = stream_errno(s);
    if (e == ECONNRESET || e == EPIPE)
        return 1;
    return a->msgid ? 2 : 0;
}

static void retry_fresh(imap_append_t *a, const char *why, int check)
{
    if (a->pool)
        a->pool->st.retried++;
    pool_debug(a, check ? "retry_check" : "retry", why);
    if (check && a->check_msgid == NULL)
        a->check_msgid = xstrdup(a->msgid);
    stream_free(a->stream); /* inside its own callback: released once it returns */
    a->stream = NULL;
    /* a new connection knows nothing yet */
    a->id = util_rand64();
    a->caps = 0;
    a->caps_known = 0;
    free(a->sent_special);
    free(a->sent_named);
    free(a->sent_inbox);
    a->sent_special = a->sent_named = a->sent_inbox = NULL;
    a->mailbox[0] = '\0';
    a->res.mailbox[0] = '\0';
    a->bye[0] = '\0';
    a->tag[0] = '\0';
    a->tagno = 0;
    wipe_cmd(a);
    buf_reset(&a->cmd);
    a->nchunks = a->next_chunk = 0;
    a->waiting_cont = 0;
    a->nappends = 0;
    a->reused = 0;
    a->retried = 1;
    open_connection(a);
}

imap_pool_t *imap_pool_new(loop_t *loop, const imap_pool_limits_t *lim)
{
    imap_pool_t *p = xcalloc(1, sizeof(*p));
    p->loop = loop;
    imap_pool_limits_t z = { 0 };
    if (lim == NULL)
        lim = &z;
    p->lim.max_appends = or_default(lim->max_appends, IMAP_POOL_MAX_APPENDS);
    p->lim.max_age_ms = or_default(lim->max_age_ms, IMAP_POOL_MAX_AGE_MS);
    p->lim.idle_ms = or_default(lim->idle_ms, IMAP_POOL_IDLE_MS);
    p->lim.max_idle_per_account = or_default(lim->max_idle_per_account, IMAP_POOL_IDLE_PER_ACCT);
    p->lim.max_idle_total = or_default(lim->max_idle_total, IMAP_POOL_IDLE_TOTAL);
    p->lim.max_conns_per_account = or_default(lim->max_conns_per_account, IMAP_POOL_CONNS_PER_ACCT);
    p->lim.max_batch = or_default(lim->max_batch, IMAP_POOL_MAX_BATCH);
    if (p->lim.max_batch > IMAP_MAX_UIDS)
        p->lim.max_batch = IMAP_MAX_UIDS;
    loop_timer_init(&p->wake_timer, wake_fired, p);
    return p;
}

void imap_pool_free(imap_pool_t *p)
{
    if (p == NULL)
        return;
    p->freeing = 1; /* nothing is served from here on */
    loop_timer_cancel(p->loop, &p->wake_timer);
    while (p->busy) {
        /* in flight: they finish as unpooled appends */
        imap_append_t *a = p->busy;
        pool_unlink(a);
        a->pool = NULL;
        a->pa = NULL;
        a->counted = 0;
    }
    for (pacct_t *pa = p->accts; pa; pa = pa->next) {
        while (pa->waiters) {
            /* queued: each goes on its own connection, unpooled */
            imap_append_t *w = pa->waiters;
            pool_unlink(w);
            w->pool = NULL;
            w->pa = NULL;
            open_connection(w);
        }
    }
    while (p->closing)
        session_free(p->closing); /* unlinks itself; no callback is owed */
    while (p->accts) {
        pacct_t *pa = p->accts;
        while (pa->idle) {
            imap_append_t *a = pa->idle;
            pool_unlink(a);
            pool_debug(a, "logout", "pool_free");
            send_logout(a); /* written at once, best effort */
            session_free(a);
        }
        p->accts = pa->next;
        free(pa->key);
        free(pa);
    }
    free(p);
}

void imap_pool_get_stats(const imap_pool_t *p, imap_pool_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    if (p == NULL)
        return;
    *st = p->st;
    st->idle = p->nidle;
    st->waiting = p->nwait;
}

/* ---------------------------------------------------------------- public */

imap_append_t *imap_append_start(loop_t *loop, const imap_account_t *acct, const char *data, size_t len,
                                 imap_append_cb cb, void *arg)
{
    if (loop == NULL || acct == NULL || cb == NULL)
        return NULL;
    char *key = NULL;
    if (acct->pool && account_valid(acct, data, len)) {
        key = account_key(acct);
        /* first come, first served: with appends queued, a parked session
         * is theirs (the wake timer hands it over) */
        const pacct_t *pa = pacct_get(acct->pool, key, 0);
        imap_append_t *reused = pa && pa->waiters ? NULL : pool_take(acct->pool, key);
        if (reused) {
            free(key);
            return start_reused(reused, acct->timeout_ms ? acct->timeout_ms : IMAP_DEFAULT_TIMEOUT_MS,
                                acct->check_message_id, acct->message_id, data, len, cb, arg);
        }
    }
    imap_append_t *a = xcalloc(1, sizeof(*a));
    a->loop = loop;
    a->id = util_rand64();
    a->state = IMAP_ST_INIT;
    a->host = xstrdup(acct->host ? acct->host : "");
    a->user = xstrdup_or_null(acct->user);
    a->password = xstrdup_or_null(acct->password);
    if (acct->check_message_id && acct->check_message_id[0])
        a->check_msgid = xstrdup(acct->check_message_id);
    if (acct->message_id && acct->message_id[0])
        a->msgid = xstrdup(acct->message_id);
    a->tls = acct->tls;
    a->verify_host = acct->verify_host;
    a->timeout_ms = acct->timeout_ms ? acct->timeout_ms : IMAP_DEFAULT_TIMEOUT_MS;
    if (acct->ssl_ctx && SSL_CTX_up_ref(acct->ssl_ctx) == 1)
        a->ssl_ctx = acct->ssl_ctx;
    a->data = data;
    a->len = len;
    a->cb = cb;
    a->arg = arg;
    buf_init(&a->cmd);
    loop_timer_init(&a->done_timer, done_fired, a);
    loop_timer_init(&a->idle_timer, idle_fired, a);

    /* argument errors still come back through the callback, later */
    if (acct->addr == NULL || acct->addrlen == 0 || acct->addrlen > sizeof(a->addr)) {
        fail(a, IMAP_EPROTO, "no usable server address");
        return a;
    }
    memcpy(&a->addr, acct->addr, acct->addrlen);
    a->addrlen = acct->addrlen;
    if (a->tls != IMAP_TLS_IMAPS && a->tls != IMAP_TLS_STARTTLS && a->tls != IMAP_TLS_NONE) {
        fail(a, IMAP_EPROTO, "unknown TLS mode %d", (int)a->tls);
        return a;
    }
    if (a->tls != IMAP_TLS_NONE && a->ssl_ctx == NULL) {
        fail(a, IMAP_ETLS, "TLS required but no SSL_CTX given");
        return a;
    }
    if (a->verify_host && a->host[0] == '\0') {
        fail(a, IMAP_ETLS, "certificate name check asked without a host name");
        return a;
    }
    if (a->user == NULL || a->password == NULL) {
        fail(a, IMAP_EAUTH, "no user or password");
        return a;
    }
    if (data == NULL && len > 0) {
        fail(a, IMAP_EPROTO, "no message data");
        return a;
    }

    if (key) {
        imap_pool_t *p = acct->pool;
        a->pool = p;
        a->pa = pacct_get(p, key, 1);
        free(key);
        if (a->pa->nconn >= p->lim.max_conns_per_account) {
            /* every connection of the account is busy: queue for the
             * first that is parked or closed, within the timeout */
            set_state(a, IMAP_ST_WAIT);
            a->on = ON_WAIT;
            list_add(&a->pa->waiters, a);
            p->nwait++;
            p->st.waited++;
            loop_timer_set(loop, &a->idle_timer, a->timeout_ms);
            pool_debug(a, "wait", NULL);
            return a;
        }
        a->counted = 1;
        a->pa->nconn++;
        a->on = ON_BUSY;
        list_add(&p->busy, a);
    }
    open_connection(a);
    return a;
}

void imap_append_cancel(imap_append_t *a)
{
    if (a == NULL || a->in_user_cb)
        return;
    log_debug("imap", "cancel", "session=%016" PRIx64 " in state %s", a->id, strstate(a->state));
    if (a->served_by) { /* queued, then given a parked session */
        imap_append_t *s = a->served_by;
        int in_batch = 0;
        for (size_t i = 0; i < s->nbatch; i++)
            if (s->batch[i] == a) {
                s->batch[i] = NULL;
                in_batch = 1;
            }
        int leaving = s->state == IMAP_ST_APPEND &&
                      (s->waiting_cont || s->next_chunk < s->nchunks || stream_pending_out(s->stream) > 0);
        if (in_batch && !leaving) {
            /* the batch has been written out (or answered): nothing of this
             * copy is referenced any more, the others go on (the server
             * may store this one) */
            session_free(a);
            return;
        }
        session_free(s); /* its bytes are still to be sent: the connection goes, the
                          * rest of its batch fails */
    }
    session_free(a); /* a pooled one is closed, never parked */
}

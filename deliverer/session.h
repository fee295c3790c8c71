/*
 * deliverer/session.h - one SMTP client connection to one MX address,
 * carrying one mail transaction, as an explicit state machine.
 *
 * The session owns its stream (core/stream.h) and sees only its events.
 * It knows nothing about failover or retries: it reports, per recipient,
 * the reply that decides its fate (if one came) and, for the session as
 * a whole, an smtp_status_t saying why it ended early. deliver.c turns
 * that into per-recipient outcomes and picks the next MX.
 *
 * PIPELINING (RFC 2920): when the server offers it, MAIL, every RCPT and
 * DATA go out in one write and the replies are matched in order by a
 * separate receive cursor; the body is only sent when at least one RCPT
 * was accepted, otherwise the transaction is RSET. Without PIPELINING the
 * same states run lock-step.
 *
 * Hold before the final dot (params.before_body, optional): after the
 * 354 the session hands the recipients accepted at RCPT to its owner and
 * writes the body, all but the ".\r\n" that ends it, which waits for
 * smtp_session_resume(). This is where an owner records "about to send
 * the final dot" (the delivery ledger) while the body travels: the one
 * window in which a message may be delivered without its sender knowing
 * (RFC 1047) starts with the dot, not before. smtp_session_abort()
 * instead closes the connection without the dot, so the server discards
 * the transaction. The session stays in SMTP_STATE_HOLD under the
 * data_block timeout and the transaction deadline; a reply before the dot is handled as in
 * SMTP_STATE_BODY; a timeout, a lost connection or smtp_session_free()
 * ends it as in any other state, the dot never sent. Without the hook
 * the whole payload follows the 354 at once.
 *
 * A session can outlive its transaction (params.keep_open): it then
 * parks in SMTP_STATE_IDLE, still authenticated and inside TLS, and the
 * owner (the pool, pool.h) can run the next transaction on it with
 * smtp_session_next(), say QUIT with smtp_session_quit(), or free it.
 *
 * Thread-safety: none; everything runs in the thread of the session's loop.
 */
#ifndef MP_DELIVERER_SESSION_H
#define MP_DELIVERER_SESSION_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <openssl/ssl.h>

#include "mime/build.h" /* mime_seg_t */

#include "core/loop.h"
#include "core/tls.h"
#include "deliverer/reply.h"

typedef enum {
    SMTP_TLS_NONE = 0,      /* never STARTTLS */
    SMTP_TLS_OPPORTUNISTIC, /* STARTTLS when offered, certificate not checked; plaintext otherwise */
    SMTP_TLS_REQUIRED,      /* STARTTLS mandatory (tls error when not offered), certificate not checked */
    SMTP_TLS_VERIFY,        /* STARTTLS mandatory, chain verified and name == MX host name */
} smtp_tls_policy_t;

typedef enum {
    SMTP_STATE_CONNECT = 0,
    SMTP_STATE_GREETING,
    SMTP_STATE_EHLO,
    SMTP_STATE_HELO,          /* fallback when EHLO was answered 5xx */
    SMTP_STATE_STARTTLS,
    SMTP_STATE_TLS_HANDSHAKE,
    SMTP_STATE_EHLO_TLS,      /* EHLO again inside TLS (RFC 3207 §4.2) */
    SMTP_STATE_AUTH,          /* AUTH PLAIN / LOGIN (relay mode), only inside TLS */
    SMTP_STATE_MAIL,
    SMTP_STATE_RCPT,
    SMTP_STATE_DATA,
    SMTP_STATE_HOLD,          /* 354 in, body written, the final dot held until the owner resumes */
    SMTP_STATE_BODY,          /* payload being written, then waiting for the final reply */
    SMTP_STATE_RSET,          /* no recipient accepted: abort the transaction */
    SMTP_STATE_IDLE,          /* between transactions, kept open for reuse */
    SMTP_STATE_QUIT,
    SMTP_STATE_DONE,
    SMTP_STATE_LAST
} smtp_state_t;

/* "EHLO", "RCPT", ... ; "?" out of range. */
const char *smtp_strstate(smtp_state_t st);

/* Why a session ended before completing its transaction. */
typedef enum {
    SMTP_OK = 0,         /* transaction completed: every recipient has its final reply */
    SMTP_ENETWORK = -1,  /* connect failed, connection lost, socket error */
    SMTP_ETIMEOUT = -2,  /* a reply not complete within its deadline, no progress writing the body,
                          * or the transaction deadline passed (smtp_timeouts_t) */
    SMTP_ETLS = -3,      /* STARTTLS unavailable under REQUIRED/VERIFY, refused, handshake/verify failure */
    SMTP_EPROTO = -4,    /* unparseable or unexpected reply */
    SMTP_EREJECTED = -5, /* the server refused the session: 421 at any point, greeting, EHLO/HELO not 2xx */
    SMTP_ELOCAL = -6,    /* no connection for want of local resources (descriptors, ports, memory):
                          * back-pressure, never the destination's fault */
    SMTP_EABORTED = -7,  /* the owner abandoned a held transaction (smtp_session_abort): the
                          * connection was closed before the final dot, nothing delivered */
} smtp_status_t;

const char *smtp_strerror(int status);

/* EHLO keywords (RFC 5321 §4.1.1.1 and the extensions we care about). */
#define SMTP_FEAT_PIPELINING          0x001u
#define SMTP_FEAT_STARTTLS            0x002u
#define SMTP_FEAT_SIZE                0x004u
#define SMTP_FEAT_8BITMIME            0x008u
#define SMTP_FEAT_SMTPUTF8            0x010u
#define SMTP_FEAT_ENHANCEDSTATUSCODES 0x020u
#define SMTP_FEAT_CHUNKING            0x040u
#define SMTP_FEAT_AUTH                0x080u

typedef struct smtp_features {
    unsigned flags;    /* SMTP_FEAT_* */
    size_t   size_max; /* SIZE argument; 0 when absent or unlimited */
    char     auth[128];/* AUTH mechanisms, space separated, truncated */
} smtp_features_t;

/* Fold one EHLO keyword line ("SIZE 10240000", "AUTH PLAIN LOGIN", ...;
 * no CRLF, need not be NUL terminated) into f. Unknown keywords are
 * ignored, and so is a SIZE whose argument is not a number that fits a
 * size_t ("SIZE -1", 21 digits): no limit is taken from it. */
void smtp_features_parse_line(smtp_features_t *f, const char *line, size_t len);

/*
 * The time budget of a dialogue, in milliseconds (0 = none).
 *
 * Waiting for a reply, a state's value is an absolute deadline: the whole
 * reply must be in within it, counted from when the wait started, and
 * bytes trickling in do not extend it. A wait starts when the state's
 * command is queued for writing (the greeting's when the connection is
 * made; the end-of-data reply's when the final dot is written) or when
 * the reply before it completed, whichever is later: with PIPELINING the
 * reply to the third RCPT of a batch gets rcpt_ms from the end of the
 * second's reply. STARTTLS and its TLS handshake share one deadline. The
 * connect has no bytes to trickle (its value is both). Writing the body
 * (HOLD, BODY before the dot) is the one inactivity timeout: it restarts
 * on every byte read or written, which is what RFC 5321 §4.5.3.2 asks for
 * the data block ("3 minutes per send"), so a big body over a slow link
 * is fine as long as it moves.
 *
 * transaction_ms bounds a whole transaction, from MAIL FROM to its final
 * reply, body included. Both kinds of deadline end a session as
 * SMTP_ETIMEOUT.
 *
 * reply_lines_burst and reply_lines_per_s are a token bucket on the lines
 * of one reply: it may have burst lines plus per_s more per second spent
 * waiting for it (since its wait started, as above); one more ends the
 * session as a protocol error ("reply flood"), closed without QUIT. A
 * burst of 0 disables the cap. (The bytes of a reply are bounded by the
 * parser, reply.h.)
 */
typedef struct smtp_timeouts {
    unsigned connect_ms;    /* 30 s (TCP connect) */
    unsigned greeting_ms;   /* 300 s  §4.5.3.2.1 */
    unsigned helo_ms;       /* 300 s  EHLO/HELO (like MAIL), each AUTH step */
    unsigned starttls_ms;   /* 300 s  STARTTLS reply and TLS handshake (Postfix smtp_starttls_timeout) */
    unsigned mail_ms;       /* 300 s  §4.5.3.2.2 */
    unsigned rcpt_ms;       /* 300 s  §4.5.3.2.3 */
    unsigned data_init_ms;  /* 120 s  §4.5.3.2.4 */
    unsigned data_block_ms; /* 180 s  §4.5.3.2.5, inactivity while the payload is being written */
    unsigned data_done_ms;  /* 600 s  §4.5.3.2.6, waiting for the reply to the final dot */
    unsigned rset_ms;       /* 20 s   (Postfix smtp_rset_timeout) */
    unsigned quit_ms;       /* 10 s   we do not wait long for 221 */
    unsigned transaction_ms;/* 1800 s MAIL FROM to the transaction's final reply */
    /* not times, not scaled: the pace at which a reply may grow */
    unsigned reply_lines_burst; /* 100 lines */
    unsigned reply_lines_per_s; /* 10 lines per second of waiting */
} smtp_timeouts_t;

#define SMTP_REPLY_LINES_BURST 100u
#define SMTP_REPLY_LINES_PER_S 10u

/* Fill t with the defaults above, the times scaled by scale_pct percent
 * (0 means 100; every non-zero result is at least 1 ms), the reply-line
 * bucket as it is. */
void smtp_timeouts_default(smtp_timeouts_t *t, unsigned scale_pct);

/* The reply that decided one recipient. */
typedef struct smtp_rcpt_reply {
    int  code;      /* 0 while no reply */
    char enh[16];
    char text[512];
    int  accepted;  /* RCPT got 2xx: waiting for the end-of-data reply */
    int  final;     /* code/enh/text is this recipient's final answer (RCPT
                     * rejection, MAIL/DATA rejection, or end-of-data reply) */
    int  retry_txn; /* RCPT got "452 4.5.3 too many recipients" (RFC 5321
                     * §4.5.3.1.10): not final, offer it in a new transaction */
} smtp_rcpt_reply_t;

typedef struct smtp_session_result {
    int                status;      /* smtp_status_t */
    smtp_state_t       state;       /* state in which status was set (DONE when OK) */
    char               error[256];  /* wording for status != OK, e.g. "timeout while sending RCPT TO" */
    int                has_reply;
    smtp_reply_t       reply;       /* last reply that mattered (has_reply): not RSET's or QUIT's,
                                     * nothing after a failure */
    int                dot_sent;    /* the whole payload incl. final dot was written: the
                                     * server may have accepted it, do not resend elsewhere */
    const char        *tls_version; /* static OpenSSL strings, NULL if plaintext */
    const char        *tls_cipher;
    smtp_features_t    features;    /* from the last EHLO */
    smtp_rcpt_reply_t *rcpts;       /* same order as params.rcpts */
    size_t             nrcpts;
    int                reusable;    /* the session is IDLE: smtp_session_next() may run another
                                     * transaction on it */
    int                reused;      /* this transaction ran on a connection that had carried an
                                     * earlier one */
    unsigned           txn_replies; /* replies received for this transaction's commands: 0 with
                                     * ENETWORK on a reused session means the server had closed
                                     * it while idle (no attempt spent) */
    int                pipelined;   /* the envelope went out as one PIPELINING batch */
    int                tls_resumed; /* the TLS handshake was abbreviated (session resumption) */
    uint64_t           bytes_in;    /* bytes read from the server on this connection so far
                                     * (after TLS decryption) */
} smtp_session_result_t;

typedef struct smtp_session smtp_session_t;

/* The 354 of a transaction is in: accepted[0..n-1] (n >= 1) are the
 * positions in params.rcpts of the recipients the server took at RCPT,
 * in order; the array is valid only during the call. The body is on its way; call smtp_session_resume(s) when
 * the final dot may follow, or smtp_session_abort(s, why) to abandon the
 * transaction, now (from inside the hook) or later from the loop. Do not
 * free s here. */
typedef void (*smtp_session_hold_cb)(void *arg, smtp_session_t *s, const size_t *accepted, size_t n);

typedef struct smtp_session_params {
    const char            *helo_name;
    smtp_tls_policy_t      tls;
    SSL_CTX               *tls_verify_ctx;   /* used by SMTP_TLS_VERIFY */
    SSL_CTX               *tls_noverify_ctx; /* used by OPPORTUNISTIC and REQUIRED */
    smtp_timeouts_t        timeouts;
    const char            *mx_host;          /* SNI, name verified under VERIFY, logs */
    const struct sockaddr *addr;             /* with the port set */
    socklen_t              addrlen;
    const char            *mail_from;        /* "" for the null sender */
    const char *const     *rcpts;
    size_t                 nrcpts;           /* >= 1 */
    const char            *data;             /* dot-stuffed payload ending in CRLF.CRLF, written as is */
    size_t                 len;
    const mime_seg_t      *segs;             /* or (nsegs > 0) the payload as segments
                                              * (mime_wire_segments()); data/len unused */
    size_t                 nsegs;
    size_t                 message_size;     /* SIZE= value; 0: the payload's length */
    const char            *log_id;           /* message id for log lines, may be NULL */
    const char            *trace_id;         /* its trace id for log lines, may be NULL */
    const char            *log_ref;          /* or (non-NULL) the message's fields for log lines as
                                              * log_msgctx() formats them, replacing both */
    /* --- engine additions; zero keeps the lock-step, one-shot behaviour --- */
    int                    keep_open;        /* go IDLE after the transaction instead of QUIT */
    int                    no_pipelining;    /* lock-step even when PIPELINING is offered */
    unsigned               need;             /* SMTP_NEED_*: what the message requires */
    const char            *auth_user;        /* relay: AUTH PLAIN/LOGIN after STARTTLS; NULL none */
    const char            *auth_pass;
    struct tls_session_cache *tls_cache;     /* resumption cache (core/tls.h), may be NULL */
    smtp_session_hold_cb   before_body;      /* per transaction; NULL: the body follows the 354 */
    void                  *before_body_arg;
    /* --- egress source; NULL / 0: the host's default address --- */
    const struct sockaddr *bind_addr;        /* the socket is bound to it (port ignored) before it
                                              * connects (stream_connect_from); copied. A bind that
                                              * fails ends the session SMTP_ELOCAL, state CONNECT */
    socklen_t              bind_addrlen;
    const char            *source_name;      /* the source's name: in the TLS session cache key (a
                                              * session is only resumed from the source that got it)
                                              * and the log line (source=); copied; NULL none */
    /* per transaction (smtp_session_next), optional: the deadlines from
     * this transaction on; NULL keeps the connection's */
    const smtp_timeouts_t *txn_timeouts;
} smtp_session_params_t;

/* params.need: the message is 8-bit (BODY=8BITMIME, RFC 6152) or has
 * UTF-8 addresses/headers (SMTPUTF8, RFC 6531). A server that does not
 * offer the extension gets no MAIL: every recipient is answered locally,
 * permanent "554 5.6.3" / "553 5.6.7" (mailpump does not downgrade). */
#define SMTP_NEED_8BITMIME 0x1u
#define SMTP_NEED_SMTPUTF8 0x2u

/* Fires exactly once per session that is not freed first, never from
 * inside smtp_session_start(). res is valid only during the call. The
 * owner must call smtp_session_free() afterwards, and may do so inside
 * the callback (the release is then deferred until it returns). */
typedef void (*smtp_session_cb)(void *arg, smtp_session_t *s, const smtp_session_result_t *res);

/*
 * Connect and run the transaction. The params struct is copied, and so
 * are mx_host, the address, helo_name, bind_addr and source_name. The transaction's strings, arrays and
 * payload must stay valid until the callback has fired (the payload is
 * sent from where it lies, never copied); auth_user/auth_pass, the SSL_CTXs and tls_cache for as long as the
 * session lives (a kept session outlives the delivery that opened it).
 * Never returns NULL (a connect that cannot even start is reported
 * through the callback).
 */
smtp_session_t *smtp_session_start(loop_t *loop, const smtp_session_params_t *params,
                                   smtp_session_cb cb, void *arg);
/* Close and release. Before the callback has fired it is a cancel: the
 * callback never fires. NULL is harmless. */
void smtp_session_free(smtp_session_t *s);

/*
 * Run another transaction on an IDLE session (after a callback that said
 * res->reusable). Only the transaction fields of txn are used (mail_from,
 * rcpts, nrcpts, data, len, segs, nsegs, message_size, log_id (trace_id, log_ref), need,
 * keep_open, before_body, before_body_arg, and txn_timeouts when it is
 * not NULL); the
 * connection keeps the parameters it was started with. cb fires exactly
 * once, never from inside this call. Returns 0, or -1 (nothing happens)
 * when the session is not IDLE.
 */
int smtp_session_next(smtp_session_t *s, const smtp_session_params_t *txn, smtp_session_cb cb, void *arg);

/* Send the body of the transaction held by before_body. Harmless when
 * the session is not held (any more): its transaction may have ended
 * meanwhile (timeout, lost connection) and been reported. May be called
 * from inside the hook. Never after smtp_session_free(). */
void smtp_session_resume(smtp_session_t *s);
/* Abandon the held transaction instead: the connection is closed without
 * the final dot and the callback reports SMTP_EABORTED with why as the
 * error (every accepted recipient left without a final reply). Same
 * rules as smtp_session_resume(). */
void smtp_session_abort(smtp_session_t *s, const char *why);

/* Called at most once while the session is IDLE or quitting, when the
 * connection ends: the server closed it or sent something unsolicited
 * (a 421 before an idle timeout), an I/O error, or the QUIT started by
 * smtp_session_quit() is over. The session is then dead: free it (may be
 * done inside the callback). */
typedef void (*smtp_session_closed_cb)(void *arg, smtp_session_t *s);
void smtp_session_set_closed_cb(smtp_session_t *s, smtp_session_closed_cb cb, void *arg);
/* IDLE session: send QUIT and close on 221, EOF or quit timeout, then
 * fire the closed callback. Any other state: close at once, same callback
 * from the loop. */
void smtp_session_quit(smtp_session_t *s);
/* 1 when IDLE and the connection still looks usable (no EOF, no bytes
 * waiting: stream_peek_closed()). */
int smtp_session_usable(const smtp_session_t *s);
smtp_state_t smtp_session_state(const smtp_session_t *s);
const smtp_features_t *smtp_session_features(const smtp_session_t *s);
/* Transactions completed on this connection (its "messages"). */
unsigned smtp_session_transactions(const smtp_session_t *s);
/* Milliseconds since smtp_session_start(). */
uint64_t smtp_session_age_ms(const smtp_session_t *s);
/* The random 64-bit id used in this session's log lines. */
uint64_t smtp_session_id(const smtp_session_t *s);

/* Numeric host of sa into buf ("192.0.2.1", "2001:db8::1"); returns buf. */
const char *smtp_addr_text(const struct sockaddr *sa, char *buf, size_t len);

#endif

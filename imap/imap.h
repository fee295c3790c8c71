/*
 * imap/imap.h - APPEND the sent copy of a message to the sender's IMAP
 * \Sent mailbox and report the new UID (RFC 4315 UIDPLUS).
 *
 * One imap_append_t is the caller's handle for one message. Without a
 * pool it runs one short session: connect, TLS (implicit or STARTTLS), log
 * in, find the \Sent mailbox, APPEND (\Seen), read [APPENDUID uidvalidity
 * uid], LOGOUT. It runs inside the caller's loop and is used only from the
 * thread that runs that loop.
 *
 * Ownership:
 *  - imap_append_start() copies what it needs from acct (address, host,
 *    user, password; it takes its own reference on acct->ssl_ctx).
 *  - The message bytes are referenced, not copied: the caller keeps
 *    data alive until the callback fires or imap_append_free() returns.
 *  - The result passed to the callback is valid only during the call.
 *  - The handle is the caller's: one per message, never handed out again
 *    for another. The caller releases it with imap_append_free(), after
 *    the callback (or before, to cancel), and before freeing the loop.
 *
 * Callback: fires exactly once per started append, never synchronously
 * inside imap_append_start() (even for immediate failures: a zero-delay
 * timer delivers them), and never after imap_append_free().
 *
 * Pooling (imap_pool_t, optional): an account with acct->pool set runs
 * its append through that pool. Sessions are keyed by server address and
 * port, TLS mode, host name, certificate check and user (a password
 * change within the process is not expected). A pooled session that
 * completed its APPEND with a tagged OK (with or without APPENDUID)
 * reports the result at once and is parked instead of saying LOGOUT; the
 * next append for the same key reuses it and sends only APPEND (the \Sent
 * mailbox and the capabilities it learned are kept). Any failure or
 * unexpected response closes the session as without a pool. Two appends
 * at once for one key get two connections, up to
 * max_conns_per_account; beyond that an append queues (first come, first
 * served) for a session that is parked or a connection that closes, and
 * fails with IMAP_ETIMEOUT if none comes within its timeout_ms (servers
 * cap connections per user: Dovecot's mail_max_userip_connections is 10). A parked session holds nothing of the append it finished (no
 * reference to the message bytes, no callback). Idle sessions are
 * watched (BYE, EOF or any unsolicited byte drops them), probed before
 * reuse, logged out after the idle time, and never reused past the
 * per-session append count or age. A reused session that dies before its
 * APPEND got any answer, at a point where the server cannot have taken
 * the message (the literal had not all left, or the connection was reset:
 * the server's socket was gone), is retried once on a fresh connection,
 * transparently; a clean EOF after the whole APPEND left is reported as
 * IMAP_ENETWORK since the server may have stored it.
 */
#ifndef MP_IMAP_IMAP_H
#define MP_IMAP_IMAP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <openssl/ssl.h>

#include "core/loop.h"

typedef enum {
    IMAP_TLS_IMAPS = 0, /* TLS from the first byte (port 993) */
    IMAP_TLS_STARTTLS,  /* plaintext, CAPABILITY, STARTTLS, then TLS (port 143) */
    IMAP_TLS_NONE,      /* plaintext throughout: tests and trusted loopback only */
} imap_tls_t;

typedef enum {
    IMAP_OK = 0,
    IMAP_ENETWORK = -1,   /* connect failed, connection lost, server said BYE */
    IMAP_ETIMEOUT = -2,   /* no reply within acct->timeout_ms */
    IMAP_ETLS = -3,       /* handshake/verification failed, STARTTLS missing or refused */
    IMAP_EAUTH = -4,      /* LOGIN/AUTHENTICATE refused, or no usable mechanism */
    IMAP_ENOSENT = -5,    /* no \Sent mailbox */
    IMAP_EPROTO = -6,     /* malformed or unexpected server response, bad arguments */
    IMAP_EREFUSED = -7,   /* APPEND answered NO/BAD */
    IMAP_ENOUIDPLUS = -8, /* appended but server gave no APPENDUID */
    IMAP_EBUSY = -9,      /* LOGIN refused for now: [UNAVAILABLE], [LIMIT], [INUSE], [SERVERBUG] (RFC 5530) */
} imap_status_t;

/* Static English text for an imap_status_t; "unknown imap status" otherwise. */
const char *imap_strerror(int status);

typedef struct imap_account {
    const struct sockaddr *addr;  /* resolved by the caller, port included */
    socklen_t              addrlen;
    const char            *host;  /* for SNI and the certificate name check */
    imap_tls_t             tls;
    SSL_CTX               *ssl_ctx;     /* verifying or not, the caller's choice */
    int                    verify_host; /* check the certificate name against host */
    const char            *user, *password;
    unsigned               timeout_ms;  /* per command, 0 means 30000 */
    struct imap_pool      *pool;        /* NULL: one session per append (LOGOUT after it) */
    /* Non-NULL: before APPEND, EXAMINE the \Sent mailbox and UID SEARCH
     * HEADER Message-ID for this value; a copy found is reported as
     * stored (its UID, already_stored = 1) instead of appending a second.
     * For retries after an uncertain outcome; costs three round trips. */
    const char            *check_message_id;
    /* The message's Message-ID, or NULL. With it, a parked session that
     * closes cleanly after the whole APPEND went out (the server may or
     * may not have stored the copy) is not reported as a failure: the
     * append moves once to a fresh connection, which looks for this
     * Message-ID before appending. */
    const char            *message_id;
    /* For log lines (msg= and trace=): the queue message id and its trace
     * id, or NULL; copied. */
    const char            *log_id;
    const char            *trace_id;
    const char            *log_ref;  /* or the message's fields for log lines, formatted (log_msgctx()); copied */
} imap_account_t;

typedef struct imap_append_result {
    int      status;           /* imap_status_t */
    uint32_t uidvalidity, uid; /* from [APPENDUID v u] when status == IMAP_OK */
    char     mailbox[256];     /* the \Sent mailbox name used ("" if none found) */
    char     error[512];       /* server text or local reason when status != OK */
    unsigned connections;      /* connections this append opened (0 when it ran on a parked session) */
    int      reused;           /* 1 when it started on a parked (pooled) session */
    int      already_stored;   /* check_message_id found it: nothing appended, uid is the existing copy's */
    unsigned batched;          /* > 1: stored by one APPEND with this many messages (MULTIAPPEND) */
} imap_append_result_t;

typedef void (*imap_append_cb)(void *arg, const imap_append_result_t *res); /* res valid only during the call */

typedef struct imap_append imap_append_t;

/* Connect, log in, find the mailbox with SPECIAL-USE \Sent (LIST
 * (SPECIAL-USE) "" "*" with LIST-EXTENDED, else LIST "" "*"; a mailbox
 * literally named "Sent" is used only if the server has no SPECIAL-USE),
 * APPEND (\Seen) the message (CRLF bytes, not dot-stuffed; referenced),
 * read APPENDUID, LOGOUT.
 * Credentials are never sent without TLS unless acct->tls == IMAP_TLS_NONE.
 * Returns the handle; NULL only when loop, acct or cb is NULL (a
 * programming error: nothing is started and no callback fires). Every
 * other failure is reported through the callback. */
imap_append_t *imap_append_start(loop_t *loop, const imap_account_t *acct, const char *data, size_t len,
                                 imap_append_cb cb, void *arg);

/* Release the handle. Harmless with NULL.
 *  - After the callback: only releases it.
 *  - From inside its own callback: releases it once the callback returns
 *    (do not use it after this call).
 *  - Before the callback (cancel): closes the append's connection, the
 *    callback will not fire, and the message bytes are no longer
 *    referenced when it returns. An append that shares a MULTIAPPEND with
 *    others (see imap_pool_limits_t.max_batch) leaves the batch alone once
 *    all its bytes have been written out; before that the shared
 *    connection is closed and the others of the batch fail with
 *    IMAP_ENETWORK, for their owners to retry. A message whose APPEND was
 *    already sent may still be stored. */
void imap_append_free(imap_append_t *a);

/* ---------------------------------------------------------------- pool */

typedef struct imap_pool imap_pool_t;

/* Zero means the default given in brackets. */
typedef struct imap_pool_limits {
    unsigned max_appends;          /* successful appends per session [100] */
    unsigned max_age_ms;           /* a session older than this is not reused [300000] */
    unsigned idle_ms;              /* idle time before LOGOUT [10000] */
    unsigned max_idle_per_account; /* idle sessions kept per key [4] */
    unsigned max_idle_total;       /* idle sessions kept per pool [64] */
    unsigned max_conns_per_account; /* connections per key at once (busy, idle or logging out) [2];
                                     * further appends queue for one, up to their timeout_ms */
    unsigned max_batch;             /* queued appends of one account sent in one APPEND when the
                                     * server has MULTIAPPEND (RFC 3502) [16, at most 64]; 1: never */
} imap_pool_limits_t;

typedef struct imap_pool_stats {
    uint64_t opened;   /* connections opened for pooled appends (retries included) */
    uint64_t reused;   /* appends started on a parked session */
    uint64_t parked;   /* sessions put back idle after a successful APPEND */
    uint64_t expired;  /* idle sessions logged out after idle_ms or max_age_ms */
    uint64_t retired;  /* sessions logged out instead of parked (limits, pool full) */
    uint64_t lost;     /* idle sessions found closed (watch or probe before reuse) */
    uint64_t retried;  /* appends moved to a fresh connection after a reused one died */
    uint64_t waited;   /* appends that queued because the account's connections were all busy */
    uint64_t batches;  /* MULTIAPPEND commands (several queued appends in one APPEND) */
    uint64_t batched;  /* appends sent in them */
    size_t   idle;     /* sessions idle right now */
    size_t   waiting;  /* appends queued right now */
} imap_pool_stats_t;

/* One pool per loop (worker thread); used only from that loop's thread.
 * lim may be NULL (all defaults). Never returns NULL (core aborts on OOM). */
imap_pool_t *imap_pool_new(loop_t *loop, const imap_pool_limits_t *lim);
/* Say LOGOUT (written at once, best effort) to every idle session and
 * close it, close sessions still logging out, and release the pool. No
 * callback is pending afterwards and no fd or timer of the pool is left
 * in the loop. Appends still in flight are detached: they finish as
 * unpooled ones and their callbacks still fire (free their handles first
 * if that is not wanted). Harmless with NULL. */
void imap_pool_free(imap_pool_t *p);
void imap_pool_get_stats(const imap_pool_t *p, imap_pool_stats_t *st);

#endif

/*
 * imap/conn.h - one IMAP client connection (internal to imap/): TCP, TLS
 * (implicit or STARTTLS), greeting, CAPABILITY, LOGIN or AUTHENTICATE
 * PLAIN, LIST to find the \Sent mailbox, then jobs: an optional Message-ID
 * check (EXAMINE, UID SEARCH, CLOSE) and one APPEND of one or more
 * messages (MULTIAPPEND, RFC 3502), and LOGOUT.
 *
 * A connection serves one job at a time and knows nothing of who asked
 * for it: its owner (an unpooled append, or a pool session) gives it the
 * message bytes and hears back through one callback.
 *
 * Ownership:
 *  - imap_conn_open() copies the account (imap_conn_acct_copy()) and the
 *    job description; the message bytes are referenced until the job's
 *    DONE event, imap_conn_park() or imap_conn_free().
 *  - The owner frees the connection with imap_conn_free(), at any time,
 *    also from inside the connection's callback. No callback fires after.
 *
 * Callback (imap_conn_cb), events:
 *  IMAP_CONN_EV_DONE   the job, or the LOGOUT asked by imap_conn_logout(),
 *                      is over; imap_conn_result() says how. Fires from the
 *                      connection's own zero-delay timer, never inside a
 *                      stream callback or an imap_conn_*() call. The state
 *                      is then READY (job stored, connection kept: only with
 *                      job.keep_open) or DONE (closed).
 *  IMAP_CONN_EV_UNFIT  a READY connection saw something nobody asked for
 *                      (BYE, EOF, bytes, an error); it is closed now (state
 *                      DONE). Fires inside a stream callback. A DONE event
 *                      still pending for the last job still comes.
 */
#ifndef MP_IMAP_CONN_H
#define MP_IMAP_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <openssl/ssl.h>

#include "core/loop.h"
#include "imap/imap.h"
#include "imap/parser.h"

#define IMAP_DEFAULT_TIMEOUT_MS 30000u

typedef enum {
    IMAP_CONN_ST_INIT = 0,
    IMAP_CONN_ST_CONNECT,         /* TCP connect */
    IMAP_CONN_ST_TLS,             /* implicit TLS handshake (imaps) */
    IMAP_CONN_ST_GREETING,        /* waiting for "* OK" / "* PREAUTH" */
    IMAP_CONN_ST_CAPABILITY,      /* CAPABILITY before login */
    IMAP_CONN_ST_STARTTLS,        /* STARTTLS sent */
    IMAP_CONN_ST_STARTTLS_TLS,    /* handshake after STARTTLS OK */
    IMAP_CONN_ST_LOGIN,           /* LOGIN or AUTHENTICATE PLAIN sent */
    IMAP_CONN_ST_AUTH_CAPABILITY, /* CAPABILITY after login */
    IMAP_CONN_ST_LIST,            /* looking for \Sent */
    IMAP_CONN_ST_EXAMINE,         /* check_msgid: EXAMINE the \Sent mailbox */
    IMAP_CONN_ST_SEARCH,          /* check_msgid: UID SEARCH HEADER Message-ID */
    IMAP_CONN_ST_CLOSE,           /* check_msgid: CLOSE (read-only: nothing expunged) */
    IMAP_CONN_ST_APPEND,
    IMAP_CONN_ST_LOGOUT,
    IMAP_CONN_ST_READY,           /* logged in, \Sent known, no command in flight */
    IMAP_CONN_ST_DONE,            /* closed */
    IMAP_CONN_ST_LAST
} imap_conn_state_t;

/* "APPEND", "READY" ...; "?" out of range. */
const char *imap_conn_strstate(imap_conn_state_t st);

/* How a connection that died during a job's check or APPEND (before any
 * answer to it) left the message; timeouts are always NONE. */
typedef enum {
    IMAP_CONN_LOSS_NONE = 0, /* not in a job, answered, or timed out: nothing to conclude */
    IMAP_CONN_LOSS_UNSENT,   /* the server cannot have stored it (not all sent, or reset) */
    IMAP_CONN_LOSS_UNSURE,   /* clean EOF after the whole APPEND left: it may be stored */
} imap_conn_loss_t;

/* The account as a connection keeps it: owned copies. */
typedef struct imap_conn_acct {
    struct sockaddr_storage addr;
    socklen_t               addrlen;
    char                   *host; /* never NULL once copied ("" when none) */
    char                   *user;
    char                   *password;
    imap_tls_t              tls;
    SSL_CTX                *ssl_ctx; /* one reference of ours, or NULL */
    int                     verify_host;
} imap_conn_acct_t;

/* dst gets copies of src's strings and a reference on its SSL_CTX. */
void imap_conn_acct_copy(imap_conn_acct_t *dst, const imap_conn_acct_t *src);
/* Wipe the password, release what imap_conn_acct_copy() took. */
void imap_conn_acct_clear(imap_conn_acct_t *a);

typedef struct imap_conn_msg {
    const char *data; /* CRLF bytes, referenced */
    size_t      len;
} imap_conn_msg_t;

typedef struct imap_conn_job {
    const imap_conn_msg_t *msgs; /* the array is copied, the bytes referenced */
    size_t                 nmsgs; /* 1 .. IMAP_MAX_UIDS */
    const char            *check_msgid; /* non-NULL: look for it before APPEND (nmsgs == 1); copied */
    unsigned               timeout_ms;  /* per command; 0 means IMAP_DEFAULT_TIMEOUT_MS */
    int                    keep_open;   /* stored: go READY instead of LOGOUT */
    const char            *log_ref;     /* the job's message fields for log lines (log_msgref()); copied,
                                         * NULL: msg=- */
    const char            *blame_id;    /* the one message whose code this is, for a crash (core/crash.h);
                                         * copied, NULL for a batch of several */
} imap_conn_job_t;

typedef enum { IMAP_CONN_EV_DONE = 0, IMAP_CONN_EV_UNFIT } imap_conn_event_t;

typedef struct imap_conn imap_conn_t;

/* why: for UNFIT a short reason ("bye", "closed_by_server" ...), else NULL. */
typedef void (*imap_conn_cb)(void *arg, imap_conn_t *c, imap_conn_event_t ev, const char *why);

/* Connect and run job once logged in. acct must be valid (checked by the
 * caller). Never NULL; every failure comes as a DONE event. */
imap_conn_t *imap_conn_open(loop_t *loop, const imap_conn_acct_t *acct, const imap_conn_job_t *job,
                            imap_conn_cb cb, void *arg);
/* Run job on a READY connection (tags go on; no LIST again). */
void imap_conn_run(imap_conn_t *c, const imap_conn_job_t *job);
/* Say LOGOUT on a READY connection; a DONE event follows when it is over. */
void imap_conn_logout(imap_conn_t *c);
/* A READY connection whose job is reported: let go of the job (no
 * reference to its bytes stays), no I/O timeout, empty buffers released. */
void imap_conn_park(imap_conn_t *c);
/* Close at once and release; no callback after. NULL harmless. */
void imap_conn_free(imap_conn_t *c);

/* What the owner may read of a connection. */
typedef struct imap_conn_info {
    uint64_t          id; /* for log lines */
    imap_conn_state_t state;
    unsigned          caps;      /* IMAP_CAP_* */
    unsigned          appends;   /* messages stored (or found) on this connection */
    uint64_t          opened_ms; /* loop clock at connect */
    imap_conn_loss_t  loss;      /* of the last job */
    const imap_conn_acct_t *acct; /* the connection's copy */
    const uint32_t *uids; /* per message of the last job, when its result is IMAP_OK */
    const char     *log_ref; /* the current job's message fields for log lines; "msg=-" between jobs */
} imap_conn_info_t;

imap_conn_info_t imap_conn_info(const imap_conn_t *c);
/* The job's outcome (valid at its DONE event until the next job):
 * status, uidvalidity, uid of the first message, mailbox, error,
 * already_stored; the other fields are the owner's to fill. */
const imap_append_result_t *imap_conn_result(const imap_conn_t *c);
/* 1: READY, nothing queued to send, and the probe (MSG_PEEK) finds the
 * peer silent and connected. */
int imap_conn_reusable(const imap_conn_t *c);
/* 1 while part of the APPEND in flight is still to be written out (a
 * literal waits for "+", or bytes are queued): its messages are still
 * referenced. */
int imap_conn_sending(const imap_conn_t *c);

#endif

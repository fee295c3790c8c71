/*
 * imap/append.h - the append request (internal to imap/): the caller's
 * handle for one message, never reused for another.
 *
 * A request is served either by a connection of its own (no pool) or by
 * its pool (pool.h), which queues it and hands it to a session. Whoever
 * serves it hands back one result with imap_append_report() or
 * imap_append_finish(); from then on the request belongs to nobody but
 * its caller.
 */
#ifndef MP_IMAP_APPEND_H
#define MP_IMAP_APPEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/list.h"
#include "core/log.h"
#include "core/loop.h"
#include "imap/conn.h"
#include "imap/imap.h"

typedef enum {
    IMAP_APPEND_ST_INIT = 0,
    IMAP_APPEND_ST_OWN,    /* on a connection of its own (no pool) */
    IMAP_APPEND_ST_WAIT,   /* queued in its pool for a session */
    IMAP_APPEND_ST_POOLED, /* carried by a pool session, alone or in a MULTIAPPEND */
    IMAP_APPEND_ST_REPORT, /* result known, callback due from the done timer */
    IMAP_APPEND_ST_DONE,   /* callback fired */
    IMAP_APPEND_ST_LAST
} imap_append_state_t;

struct imap_pool_sess;
struct imap_pool_acct;

struct imap_append {
    loop_t             *loop;
    uint64_t            id; /* for log lines */
    imap_append_state_t state;
    imap_conn_acct_t    acct; /* copied from the caller's account */
    unsigned            timeout_ms;
    char               *check_msgid; /* look for it in \Sent before APPEND; NULL: don't */
    char               *msgid;       /* the message's Message-ID, or NULL */
    char               *log_id;      /* queue message id and trace id for log lines, or NULL */
    char               *trace_id;
    char               *log_ref;     /* or their log fields, formatted (tenant, campaign, pool too), or NULL */
    const char         *data;        /* the message: referenced until the callback or the free */
    size_t              len;
    imap_append_cb      cb;
    void               *arg;

    imap_append_result_t res;
    loop_timer_t         done_timer;
    int                  in_cb;      /* inside its callback: a free waits until it returns */
    int                  free_asked;

    imap_conn_t *conn; /* OWN */

    /* pool.c's: WAIT (pool, pa, wait_link, wait_timer) and POOLED (sess) */
    struct imap_pool      *pool;
    struct imap_pool_acct *pa;
    TAILQ_ENTRY(imap_append) wait_link;
    loop_timer_t           wait_timer; /* the wait's deadline */
    struct imap_pool_sess *sess;
};

/* "WAIT", "POOLED" ...; "?" out of range. */
const char *imap_append_strstate(imap_append_state_t st);
/* The one place a request changes state. */
void imap_append_enter(imap_append_t *a, imap_append_state_t st);
/* The request's outcome: its callback fires from its zero-delay timer. */
void imap_append_report(imap_append_t *a, const imap_append_result_t *res);
/* Same, as a failure with this status and text (result fields zero). */
void imap_append_fail(imap_append_t *a, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The outcome, with the callback now: only from a timer's handler (never
 * inside imap_append_start() or a stream callback). a may be gone after. */
void imap_append_finish(imap_append_t *a, const imap_append_result_t *res);
/* The msg= (and trace=) fields of a job carrying a[0..n): the one
 * message's (log_msgref()), or msg="<id>,<id>,..." for a MULTIAPPEND.
 * Returns dst. */
const char *imap_append_log_ref(imap_append_t *const *a, size_t n, char *dst, size_t len);
/* Room for imap_append_log_ref() of up to IMAP_MAX_UIDS appends. */
#define IMAP_LOG_REF_MAX (2 * LOG_QUOTE_MAX + 16)
/* Serve a on a connection of its own, LOGOUT after its APPEND. */
void imap_append_run_alone(imap_append_t *a);

#endif

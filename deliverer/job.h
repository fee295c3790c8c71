/*
 * deliverer/job.h - the life of one consumed message.
 *
 * A job walks one state table (job.c):
 *   INTAKE     parse the JSON, read the retry envelope, collect the
 *              recipients
 *   ASSIGN     a message without id: republish it once with one, then ack
 *   IDENTITY   the body's digest under the id: an id reused for another
 *              message is dead-lettered
 *   LOOKUP     the ledger: skip recipients delivered before, flag those
 *              an earlier attempt left mid-send as possible duplicates;
 *              in the same command, the suppression lists (suplist.h):
 *              a recipient on one is settled "suppressed"
 *   COUNT      a redelivered message: read its poison count (attempts that
 *              crashed a worker or could not be finished); at the limit it
 *              is poison for the recipients the ledger does not show done
 *   BUILD      build the RFC 5322 bytes once and DKIM-sign them (after
 *              COUNT: content that crashes the builder is counted first)
 *   DOMAINS    one domain leg per recipient domain, concurrently (domain.h);
 *              each records its transactions in the ledger as they end
 *   SENT_COPY  APPEND to the sender's IMAP Sent folder (UIDPLUS)
 *   EVENTS     the retry (republished to a delay queue) and one event per
 *              recipient and per Sent copy, all with publisher confirms
 *   DEAD       bad input or poison: the body to the dead-letter queue, a
 *              dead event (a poison message's done recipients reported)
 *   CHARGE     a publish failed with the broker still there: one more on
 *              the poison count before the nack
 *   DONE       ack once everything it published is confirmed; nack (the
 *              broker delivers the message again) when anything failed
 * and reports its end to its owner through job_end_cb.
 *
 * Thread-safety: none; a job lives on its worker's loop.
 */
#ifndef MP_DELIVERER_JOB_H
#define MP_DELIVERER_JOB_H

#include "deliverer/domain.h"
#include "deliverer/env.h"
#include "imap/imap.h"
#include "queue/mq.h"

/* What a job runs on, owned by the worker and shared by its jobs. */
typedef struct job_ctx {
    const worker_env_t *env;
    domain_services_t   svc;       /* loop, DNS, SMTP, ledger, Redis, rate limits */
    imap_pool_t        *imap_pool; /* NULL: one IMAP session per Sent copy */
    mq_t               *mq;        /* the broker connection the jobs' messages came on;
                                    * the worker sets NULL once it is lost */
    int                 worker_index;
    struct qstat_table *qstat;     /* recipients deferred and parked, per destination
                                    * (deliverer/qstat.h); NULL: not counted */
} job_ctx_t;

typedef struct job job_t;

/* Wall-clock ms of the message's first consume (its retry envelope's
 * first-seen time, counting earlier attempts); 0 before it is read. */
uint64_t job_first_seen_ms(const job_t *j);

/* The job is over: it acked or nacked its message (or could not, the
 * connection being gone). The owner frees it, from inside the call or
 * later; nothing of the job runs after this returns. */
typedef void (*job_end_cb)(void *arg, job_t *j);

/* The job of dv (ownership taken), not started yet. ctx must outlive it.
 * Never NULL (the core aborts on OOM). */
job_t *job_new(job_ctx_t *ctx, mq_delivery_t *dv, job_end_cb end, void *arg);
/* Start it. It may end before this returns (bad input whose dead letter
 * could not even be published): end has fired then. */
void job_run(job_t *j);

/* The broker connection was lost. Returns 1 when the job should go on:
 * its SMTP has begun, and finishing it records what it delivered in the
 * ledger, so the redelivery skips those recipients instead of sending
 * them again; it then ends without events (the redelivery publishes
 * them). 0 when it should be freed now: the redelivery starts it afresh. */
int job_survives_loss(const job_t *j);

/* Cancel whatever is in flight (no callback of it fires afterwards; end
 * does not fire either) and release the job and its message. Publishes
 * awaiting confirms must already be resolved (the connection freed). */
void job_free(job_t *j);

#endif

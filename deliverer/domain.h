/*
 * deliverer/domain.h - one leg of a message: its recipients of one
 * domain, from the MX lookup to the last SMTP reply.
 *
 * A leg walks
 *   MX -> ROUTE -> SITE -> RATE LIMIT -> SMTP -> (FAST RETRY -> SITE -> RATE LIMIT -> SMTP)* -> RECORD -> DONE
 *   - MX: dns/ resolves the domain (skipped in relay mode, where the
 *     smarthost replaces the MX list);
 *   - ROUTE: the egress source (the message's pool, weighted round robin
 *     over the sources no action suspends and whose warm-up allows), the
 *     shaping actions in force (bounce, suspend: the leg ends at once)
 *     and the shaping rules: the key and values of the connection limit
 *     and the rate, the TLS policy, timeouts, messages per connection;
 *   - SITE: a place under the key's connection limit (sites.h), or parked;
 *   - RATE LIMIT: [smtp] rate_limits (throttle.h). A slot within
 *     rate_limit_max_wait is waited for; a later one ends the leg
 *     transient, rate_limited, with the wait in throttle_wait_ms;
 *   - SMTP: one delivery attempt over the candidates (deliver.h). While
 *     a transaction's body goes out after the 354, the leg records its
 *     accepted recipients as "sending" in the ledger (ledger.h), and the
 *     final dot waits for that record; as soon as the transaction is
 *     over it records what became of them: "done" (or "done-dup" for a
 *     recipient flagged as a possible second copy), or no record for
 *     one that was not sent;
 *   - FAST RETRY: a failure of the network alone (refused, reset,
 *     timeout) for every recipient is retried within the attempt, up to
 *     the job's fast-retry budget, each try taking a rate-limit slot;
 *   - RECORD: the leg's ledger writes are answered (or failed).
 * The leg reports once, by callback, with every recipient's result in
 * request order. It knows nothing of the job that started it.
 *
 * Thread-safety: none; use from the loop's thread only.
 */
#ifndef MP_DELIVERER_DOMAIN_H
#define MP_DELIVERER_DOMAIN_H

#include <stddef.h>
#include <stdint.h>

#include "core/log.h"
#include "core/loop.h"
#include "core/rclient.h"
#include "deliverer/deliver.h"
#include "deliverer/ledger.h"
#include "deliverer/outcome.h"
#include "deliverer/sites.h"
#include "deliverer/throttle.h"
#include "dns/resolver.h"
#include "mime/build.h"

/* The worker's services a leg runs on, borrowed for the leg's life. */
typedef struct domain_services {
    loop_t                 *loop;
    dns_resolver_t         *dns;
    deliver_ctx_t          *dctx;
    ledger_t               *ledger;   /* NULL: no "sending" marks and no hold before the body */
    rclient_t              *redis;    /* the fleet's rate limits; NULL: the process's own */
    throttle_t             *throttle; /* NULL: no rate limits */
    sites_t                *sites;    /* per-site caps; NULL: none */
    const struct policy    *policy;   /* egress sources and pools, shaping rules (policy.h); NULL: none */
    struct actions         *actions;  /* fleet-wide shaping actions (actions.h); NULL: none */
    struct wrr             *wrr;      /* the worker's weighted round robin over a pool's sources */
    struct warmup          *warmup;   /* the sources' warm-up volumes (warmup.h); NULL: none counted */
    const deliver_config_t *dcfg;
    uint64_t                rate_limit_max_wait_ms;
    uint64_t                mark_wait_ms;     /* a final dot waits this long for its "sending" mark */
    int                     send_unrecorded;  /* 1: the dot goes when the mark cannot be recorded */
} domain_services_t;

/* One recipient's final result. */
typedef struct domain_rcpt_result {
    outcome_t        outcome;
    outcome_reason_t reason;
    int              code;      /* 0: no server answered (text says why) */
    char             enh[16];
    char             text[512];
    /* For its event (NULL: omitted), valid during the done call like the
     * rest: the egress source the recipient went out from and its
     * address, and the shaping rule or action that decided its outcome,
     * e.g. "suspend:automation:yahoo-deferral". */
    const char      *source;
    const char      *source_addr;
    const char      *shaping;
} domain_rcpt_result_t;

typedef struct domain_result {
    const domain_rcpt_result_t *rcpts;  /* in request order */
    size_t                      nrcpts;
    const char                 *mx_host; /* "" when no server was reached */
    const char                 *mx_addr;
    const char                 *tls_version; /* "" for plaintext */
    const char                 *tls_cipher;
    uint64_t                    throttle_wait_ms; /* ended by a rate limit: the next free
                                                   * slot is this far (0 otherwise) */
} domain_result_t;

/* res is valid only during the call. The leg is finished: free it
 * (domain_free) from inside the call or later. */
typedef void (*domain_done_cb)(void *arg, const domain_result_t *res);
/* Asked just before each SMTP attempt of the leg (fast retries too): 1
 * to go on, 0 to end the leg transient, network, with the text given
 * back in *why. The job says no once the broker connection that would
 * confirm the outcome is gone. */
typedef int (*domain_gate_cb)(void *arg, const char **why);

/* A transaction of the leg (a fast retry's too) was cut between its
 * final dot and the reply: the server may have the message for request
 * recipient k, whatever its outcome will say. Called as soon as that
 * attempt returns, once per recipient and cut. It must not free the leg
 * (done comes later, and may). */
typedef void (*domain_cut_cb)(void *arg, size_t k);

typedef struct domain_request {
    const char        *name;         /* the recipient domain; borrowed */
    const char        *msg_id;       /* ledger key and log lines; borrowed */
    const char        *trace_id;     /* the message's trace id for log lines, or NULL; borrowed */
    const char        *tenant;       /* the message's sender fields (pool choice, log lines), or NULL; */
    const char        *campaign;     /* borrowed */
    const char        *pool;
    const log_msgctx_t *log;         /* all of the above for log lines (LOG_MSGCTX), the job's; borrowed */
    const char        *mail_from;    /* borrowed, as everything below */
    const char *const *rcpts;
    size_t             nrcpts;
    const char        *data;         /* the payload as deliver_request_t */
    size_t             len;
    const mime_seg_t  *segs;
    size_t             nsegs;
    size_t             message_size;
    unsigned           need;         /* SMTP_NEED_* */
    const unsigned char *flagged;    /* per recipient, or NULL: an earlier attempt may have delivered
                                      * it (the ledger found it "sending"), so a delivery now is
                                      * recorded "done-dup"; read at domain_start() */
    unsigned           fast_retries; /* fast retries allowed within this attempt */
    uint64_t           fast_base_ms;
    domain_gate_cb     gate;
    domain_cut_cb      cut;
    domain_done_cb     done;
    void              *arg;
} domain_request_t;

typedef struct domain_leg domain_leg_t;

/* Start the leg. Everything req points to must outlive the leg. done
 * fires exactly once, unless domain_free() comes first, and always from
 * the loop: a leg that ends without a delivery result (DNS, gate, rate
 * limit) reports from a zero-delay timer, so never from inside
 * domain_start(). Never NULL. */
domain_leg_t *domain_start(const domain_services_t *svc, const domain_request_t *req);

/* 1 once the leg's gate let it go on to SMTP. */
int domain_smtp_started(const domain_leg_t *leg);

/* Cancel whatever is in flight (DNS, rate-limit ask, SMTP, ledger mark,
 * timer: no callback fires afterwards) and release the leg. NULL is
 * harmless. May be called from inside done. */
void domain_free(domain_leg_t *leg);

#endif

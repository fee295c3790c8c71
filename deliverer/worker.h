/*
 * deliverer/worker.h - one worker thread: its loop, broker connection,
 * resolver and sessions, and the life of every message it consumes.
 *
 * Workers share only the read-only worker_env_t and the atomic metrics.
 * worker_stop() is the one call made from another thread.
 */
#ifndef MP_DELIVERER_WORKER_H
#define MP_DELIVERER_WORKER_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>

#include "core/config.h"
#include "deliverer/accounts.h"
#include "deliverer/deliver.h"
#include "deliverer/retry.h"
#include "imap/imap.h"
#include "mime/dkim.h"

/* Process-wide, built once by main before threads start, then read-only. */
typedef struct worker_env {
    const mp_config_t      *cfg;
    deliver_config_t        dcfg;        /* SMTP settings and TLS contexts */
    SSL_CTX                *smtp_verify_ctx;
    SSL_CTX                *smtp_noverify_ctx;
    SSL_CTX                *imap_ctx;
    imap_tls_t              imap_tls;    /* [imap] tls */
    accounts_t              accounts;
    retry_levels_t          levels;      /* delay queues, ascending */
    struct sockaddr_storage imap_addr;
    socklen_t               imap_addrlen; /* 0: no IMAP configured */
    dkim_signer_t          *dkim;        /* NULL: [dkim] keys_file empty, no signing */
    struct throttle        *throttle;    /* [smtp] rate_limits, shared by the workers; NULL: none */
} worker_env_t;

typedef struct worker worker_t;

/* Start a worker thread. Returns NULL on thread creation failure. */
worker_t *worker_start(const worker_env_t *env, int index);
/* Thread-safe: stop consuming, finish in-flight messages within the
 * grace period, then let the thread end. */
void worker_stop(worker_t *w);
/* Wait for the thread and free it. Returns the worker's exit status
 * (0 = clean). */
int  worker_join(worker_t *w);

#endif

/*
 * deliverer/env.h - what the whole process shares: the configuration and
 * everything built from it once at start-up (TLS contexts, the IMAP
 * account map, retry levels, DKIM keys, rate limits).
 *
 * main.c builds it before any worker thread starts; from then on it is
 * read-only, except what its members guard themselves (the route
 * penalties and the rate-limit table take their own locks).
 */
#ifndef MP_DELIVERER_ENV_H
#define MP_DELIVERER_ENV_H

#include <sys/socket.h>
#include <openssl/ssl.h>

#include "core/config.h"
#include "deliverer/accounts.h"
#include "deliverer/deliver.h"
#include "deliverer/sites.h"
#include "deliverer/retry.h"
#include "imap/imap.h"
#include "mime/dkim.h"

typedef struct worker_env {
    const mp_config_t      *cfg;
    deliver_config_t        dcfg;        /* SMTP settings and TLS contexts */
    SSL_CTX                *smtp_verify_ctx;
    SSL_CTX                *smtp_noverify_ctx;
    SSL_CTX                *imap_ctx;
    imap_tls_t              imap_tls;    /* [imap] tls */
    accounts_t              accounts;
    retry_policy_t          retry;       /* [retry], delay queues ascending */
    struct sockaddr_storage imap_addr;
    socklen_t               imap_addrlen; /* 0: no IMAP configured */
    dkim_signer_t          *dkim;        /* NULL: [dkim] keys_file empty, no signing */
    struct throttle        *throttle;    /* [smtp] rate_limits, shared by the workers; NULL: none */
    deliver_config_store_t  smtp_store;  /* what dcfg points into */
    unsigned                nworkers;    /* [worker] count, 0 resolved to the CPUs */
    uint64_t                max_body;    /* largest announced body read (budget_max_body) */
    uint64_t                inflight_limit; /* per worker: [message] inflight_memory, auto resolved */
    uint64_t                inflight_memory; /* auto: the memory it was derived from; 0 when set */
    unsigned                max_sessions; /* per worker: [smtp] pool_max_total, auto resolved */
    unsigned                prefetch;     /* per worker: [amqp] prefetch, auto resolved */
    uint64_t                nofile;       /* descriptors the process may open (the hard limit) */
    sites_config_t          sites;        /* [smtp] site_* */
    struct policy          *policy;       /* [egress] file and [shaping] file (policy.h); never NULL after
                                           * env_build: empty when neither is set */
} worker_env_t;

/*
 * Every check start-up makes before it runs a worker, building *env from
 * cfg (zeroed first; env->cfg = cfg): config_validate(), the syntax of
 * [metrics] listen (metrics_listen_parse), the TLS contexts and CA files,
 * the IMAP accounts file and host, the DKIM keys, the retry levels,
 * deliver_config_build() ([smtp]: helo_name, tls_policy and
 * tls_policy_file, the relay), the rate limits (throttle_load) and the
 * memory budget of bodies in flight (deliverer/budget.h: the worker
 * count, [message] inflight_memory, auto resolved from the cgroup limit
 * or physical RAM, never below the largest allowed body).
 * `mailpumpd --check-config` runs exactly this and stops. Blocking (files,
 * getaddrinfo): start-up only. Returns 0, or -1 with err; either way
 * env_free() afterwards.
 */
int  env_build(const mp_config_t *cfg, worker_env_t *env, char *err, size_t errlen);
void env_free(worker_env_t *env);

#endif

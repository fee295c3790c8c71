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
} worker_env_t;

#endif

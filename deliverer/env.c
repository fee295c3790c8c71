/*
 * SUMMARY
 *  deliverer/env.c - the start-up checks and the state they build.
 * DESCRIPTION
 *  env_build() is every check mailpumpd makes before it starts a worker,
 *  in one place, so that `mailpumpd --check-config` (which stops after
 *  it) accepts exactly the configurations start-up accepts: the values
 *  (config_validate), the syntax of [metrics] listen (the parse the
 *  endpoint itself uses; only the bind is left to start-up), the TLS CA
 *  files, the IMAP accounts file and host, the DKIM keys, the retry
 *  levels, the [smtp] translation (helo_name, tls_policy and its file,
 *  the relay's resolution) and the rate limits and their file.
 */
#include "deliverer/env.h"
#include "deliverer/policy.h"

#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "core/tls.h"
#include "deliverer/budget.h"
#include "deliverer/throttle.h"
#include "metrics/metrics.h"

static imap_tls_t imap_tls_of(mp_imap_tls_t t)
{
    switch (t) {
    case MP_IMAP_TLS_STARTTLS: return IMAP_TLS_STARTTLS;
    case MP_IMAP_TLS_NONE: return IMAP_TLS_NONE;
    case MP_IMAP_TLS_IMAPS: break;
    }
    return IMAP_TLS_IMAPS;
}

static int resolve_imap(const mp_config_t *cfg, worker_env_t *env, char *err, size_t errlen)
{
    if (cfg->imap_host[0] == '\0')
        return 0;
    char port[16];
    snprintf(port, sizeof(port), "%u", cfg->imap_port);
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL;
    /* once at start-up, before any worker runs: blocking is fine here */
    int r = getaddrinfo(cfg->imap_host, port, &hints, &res);
    if (r != 0) {
        snprintf(err, errlen, "[imap] host %s: %s", cfg->imap_host, gai_strerror(r));
        return -1;
    }
    memcpy(&env->imap_addr, res->ai_addr, res->ai_addrlen);
    env->imap_addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* The workers, and what each may hold of message bodies in flight. */
static int memory_budget(const mp_config_t *cfg, worker_env_t *env, char *err, size_t errlen)
{
    env->nworkers = cfg->worker_count;
    if (env->nworkers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        env->nworkers = n > 0 ? (unsigned)n : 1;
    }
    env->max_body = budget_max_body(cfg->message_max_size);
    if (cfg->message_inflight_memory == 0) {
        env->inflight_memory = budget_memory();
        env->inflight_limit = budget_auto(env->inflight_memory, env->nworkers, env->max_body);
        return 0;
    }
    if (cfg->message_inflight_memory < env->max_body) {
        char most[32], have[32];
        config_format_size(env->max_body, most, sizeof(most));
        config_format_size(cfg->message_inflight_memory, have, sizeof(have));
        snprintf(err, errlen, "[message] inflight_memory %s is below the largest body a message may "
                              "announce, %s (2 x [message] max_size + 64 KiB)", have, most);
        return -1;
    }
    env->inflight_limit = cfg->message_inflight_memory;
    return 0;
}

/* The session budget and the prefetch that goes with it, from the hard
 * descriptor limit: mailpumpd raises the soft one to it at start-up (and
 * logs fd_limit), since thousands of SMTP connections per worker are the
 * point. */
static void session_budget(const mp_config_t *cfg, worker_env_t *env)
{
    struct rlimit rl;
    env->nofile = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
        env->nofile = rl.rlim_max == RLIM_INFINITY ? 1u << 20 : (uint64_t)rl.rlim_max;
    uint64_t mem = env->inflight_memory ? env->inflight_memory : budget_memory();
    env->max_sessions = cfg->smtp_pool_max_total ? cfg->smtp_pool_max_total
                                                 : budget_sessions(mem, env->nworkers, env->nofile);
    env->prefetch = cfg->amqp_prefetch ? cfg->amqp_prefetch : budget_prefetch(env->max_sessions);
}

/* The egress and shaping files (docs/egress-and-shaping.md), and every
 * source address bound once: an address this host does not have is an
 * error now, not at the first message. */
static int load_policy(const mp_config_t *cfg, worker_env_t *env, char *err, size_t errlen)
{
    env->policy = policy_load(cfg->egress_file, cfg->shaping_file, err, errlen);
    if (env->policy == NULL)
        return -1;
    for (size_t i = 0; i < policy_nsources(env->policy); i++) {
        const egress_source_t *s = policy_source(env->policy, i);
        char e[256];
        if (egress_check_bind((const struct sockaddr *)&s->addr, s->addrlen, e, sizeof(e)) < 0) {
            snprintf(err, errlen, "[egress] file: source %s: %s", s->name, e);
            return -1;
        }
    }
    return 0;
}

int env_build(const mp_config_t *cfg, worker_env_t *env, char *err, size_t errlen)
{
    char e0[256];
    memset(env, 0, sizeof(*env));
    env->cfg = cfg;
    if (config_validate(cfg, err, errlen) < 0)
        return -1;
    if (memory_budget(cfg, env, err, errlen) < 0)
        return -1;
    session_budget(cfg, env);
    env->sites.disabled = !cfg->smtp_site_isolation;
    env->sites.max_connections = cfg->smtp_site_max_connections;
    env->sites.max_waiting = cfg->smtp_site_max_waiting;
    env->sites.max_wait_ms = cfg->smtp_site_max_wait_ms;
    if (sites_limits_parse(cfg->smtp_site_limits, &env->sites, e0, sizeof(e0)) < 0) {
        snprintf(err, errlen, "[smtp] site_limits: %s", e0);
        return -1;
    }
    if (cfg->metrics_listen[0]) { /* the syntax; the bind comes when the endpoint starts */
        struct sockaddr_storage ss;
        if (metrics_listen_parse(cfg->metrics_listen, &ss, err, errlen) < 0)
            return -1;
    }
    env->imap_tls = imap_tls_of(cfg->imap_tls);
    char e[256];
    env->smtp_verify_ctx = tls_client_ctx_new(cfg->smtp_ca_file, 1, e, sizeof(e));
    if (env->smtp_verify_ctx == NULL) {
        snprintf(err, errlen, "[smtp] ca_file: %s", e);
        return -1;
    }
    env->smtp_noverify_ctx = tls_client_ctx_new(NULL, 0, e, sizeof(e));
    if (env->smtp_noverify_ctx == NULL) {
        snprintf(err, errlen, "TLS: %s", e);
        return -1;
    }
    if (cfg->imap_host[0]) {
        env->imap_ctx = tls_client_ctx_new(cfg->imap_ca_file, 1, e, sizeof(e));
        if (env->imap_ctx == NULL) {
            snprintf(err, errlen, "[imap] ca_file: %s", e);
            return -1;
        }
        if (accounts_load(&env->accounts, cfg->imap_accounts_file, err, errlen) < 0)
            return -1;
        if (resolve_imap(cfg, env, err, errlen) < 0)
            return -1;
    }
    if (cfg->dkim_keys_file[0]) {
        env->dkim = dkim_load(cfg->dkim_keys_file, cfg->dkim_headers, e, sizeof(e));
        if (env->dkim == NULL) {
            snprintf(err, errlen, "[dkim] keys_file: %s", e);
            return -1;
        }
    }
    if (retry_policy_init(&env->retry, cfg, err, errlen) < 0)
        return -1;
    /* [smtp]: one translation, validated there (exit 2 on a bad value) */
    if (deliver_config_build(&env->dcfg, cfg, env->smtp_verify_ctx, env->smtp_noverify_ctx, &env->smtp_store,
                             err, errlen) < 0)
        return -1;
    env->dcfg.pool.max_total = env->max_sessions;
    /* message-rate limits per destination domain, one table per process */
    if (throttle_load(cfg->smtp_rate_limits, cfg->smtp_rate_limits_file, &env->throttle, err, errlen) < 0)
        return -1;
    return load_policy(cfg, env, err, errlen);
}

void env_free(worker_env_t *env)
{
    SSL_CTX_free(env->smtp_verify_ctx);
    SSL_CTX_free(env->smtp_noverify_ctx);
    SSL_CTX_free(env->imap_ctx);
    accounts_free(&env->accounts);
    retry_policy_free(&env->retry);
    dkim_free(env->dkim);
    deliver_config_store_free(&env->smtp_store);
    env->dcfg.routes = NULL;
    env->dcfg.relay = NULL;
    throttle_free(env->throttle);
    env->throttle = NULL;
    policy_free(env->policy);
    env->policy = NULL;
    sites_config_free(&env->sites);
}


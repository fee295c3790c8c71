/*
 * SUMMARY
 *  mailpumpd - the delivery daemon.
 * DESCRIPTION
 *  Loads the configuration (file, then MAILPUMP_<SECTION>_<KEY>), builds
 *  the read-only environment the workers share (TLS contexts, the IMAP
 *  account map and address), starts the metrics endpoint and W worker
 *  threads, then waits for a signal. SIGTERM/SIGINT drain the workers
 *  (stop consuming, finish in flight, exit 0) - what Kubernetes sends on
 *  scale-down. Signals are blocked in every thread and taken by sigwait()
 *  here, so no handler runs inside a worker's loop.
 * DIAGNOSTICS
 *  Exit 0 after a clean drain, 1 on a worker failure, 2 on bad
 *  configuration or usage.
 */
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/config.h"
#include "core/log.h"
#include "core/tls.h"
#include "core/util.h"
#include "deliverer/routes.h"
#include "deliverer/throttle.h"
#include "deliverer/worker.h"
#include "metrics/metrics.h"

#define MAILPUMPD_VERSION "0.1.0"

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpumpd [--config FILE] [--check-config] [--help] [--version]\n"
            "\n"
            "Outbound mail delivery engine: consumes JSON messages from RabbitMQ,\n"
            "delivers them over SMTP (STARTTLS), appends the sent copy to the\n"
            "sender's IMAP Sent folder and publishes one event per recipient.\n"
            "\n"
            "  -c, --config FILE    INI configuration file (see README: Configuration)\n"
            "      --check-config   validate the configuration, print it with secrets\n"
            "                       masked, and exit (0 = valid)\n"
            "  -h, --help           this text\n"
            "  -V, --version        print the version\n"
            "\n"
            "Every key can be overridden from the environment as\n"
            "MAILPUMP_<SECTION>_<KEY>, e.g. MAILPUMP_AMQP_HOST=rabbitmq.\n"
            "Signals: SIGTERM/SIGINT stop consuming, finish in-flight messages\n"
            "within [worker] shutdown_grace_ms, and exit 0.\n");
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

static smtp_tls_policy_t tls_policy(const char *s)
{
    if (strcmp(s, "none") == 0)
        return SMTP_TLS_NONE;
    if (strcmp(s, "required") == 0)
        return SMTP_TLS_REQUIRED;
    if (strcmp(s, "verify") == 0)
        return SMTP_TLS_VERIFY;
    return SMTP_TLS_OPPORTUNISTIC;
}

static smtp_timeouts_t      smtp_timeouts; /* env.dcfg.timeouts points here */
static deliver_candidate_t *smtp_relay;    /* [smtp] relay, resolved at start-up */

static int build_env(const mp_config_t *cfg, worker_env_t *env, char *helo, size_t helolen,
                     char *err, size_t errlen)
{
    memset(env, 0, sizeof(*env));
    env->cfg = cfg;
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
    env->imap_tls = strcmp(cfg->imap_tls, "starttls") == 0 ? IMAP_TLS_STARTTLS
                    : strcmp(cfg->imap_tls, "none") == 0   ? IMAP_TLS_NONE
                                                           : IMAP_TLS_IMAPS;
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
    if (cfg->smtp_helo_name[0]) {
        snprintf(helo, helolen, "%s", cfg->smtp_helo_name);
    } else if (gethostname(helo, helolen) != 0 || helo[0] == '\0') {
        snprintf(helo, helolen, "localhost");
    }
    if (cfg->dkim_keys_file[0]) {
        env->dkim = dkim_load(cfg->dkim_keys_file, cfg->dkim_headers, e, sizeof(e));
        if (env->dkim == NULL) {
            snprintf(err, errlen, "[dkim] keys_file: %s", e);
            return -1;
        }
    }
    if (retry_levels_parse(cfg->retry_levels, &env->levels) < 0) {
        snprintf(err, errlen, "[retry] levels: cannot parse \"%s\"", cfg->retry_levels);
        return -1;
    }
    deliver_config_t *d = &env->dcfg;
    d->port = (unsigned short)cfg->smtp_port;
    d->helo_name = helo;
    d->tls = tls_policy(cfg->smtp_tls);
    d->tls_verify_ctx = env->smtp_verify_ctx;
    d->tls_noverify_ctx = env->smtp_noverify_ctx;
    d->max_mx = cfg->smtp_max_mx;
    d->timeout_scale_pct = cfg->smtp_timeout_scale;
    /* pipelining, max_rcpts, pool limits, tls_policy map, per-state
     * timeouts, relay + AUTH (validated here: exit 2 on a bad value) */
    if (deliver_config_engine(d, cfg, &smtp_timeouts, &smtp_relay, err, errlen) < 0)
        return -1;
    /* one route penalty table for every worker: a dead MX address costs
     * one failed connect per penalty, not one per worker */
    d->routes = routes_new(d->route_penalty_ms, d->route_penalty_max_ms);
    /* message-rate limits per destination domain, one table per process */
    return throttle_new(cfg->smtp_rate_limits, &env->throttle, err, errlen);
}

static void free_env(worker_env_t *env)
{
    SSL_CTX_free(env->smtp_verify_ctx);
    SSL_CTX_free(env->smtp_noverify_ctx);
    SSL_CTX_free(env->imap_ctx);
    accounts_free(&env->accounts);
    free(smtp_relay);
    smtp_relay = NULL;
    retry_levels_free(&env->levels);
    dkim_free(env->dkim);
    routes_free(env->dcfg.routes);
    env->dcfg.routes = NULL;
    throttle_free(env->throttle);
    env->throttle = NULL;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' },
        { "check-config", no_argument, NULL, 'k' },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    const char *config_path = NULL;
    int check_only = 0, c;
    while ((c = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_path = optarg; break;
        case 'k': check_only = 1; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("mailpumpd %s\n", MAILPUMPD_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "mailpumpd: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    mp_config_t cfg;
    char err[1024];
    config_defaults(&cfg);
    if (config_load(&cfg, config_path, err, sizeof(err)) < 0 ||
        config_validate(&cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "mailpumpd: configuration error: %s\n", err);
        config_free(&cfg);
        return 2;
    }
    log_setup((enum log_level)log_level_from_name(cfg.log_level),
              strcmp(cfg.log_format, "json") == 0 ? LOG_FMT_JSON : LOG_FMT_LOGFMT);

    worker_env_t env;
    char helo[256];
    if (build_env(&cfg, &env, helo, sizeof(helo), err, sizeof(err)) < 0) {
        fprintf(stderr, "mailpumpd: configuration error: %s\n", err);
        free_env(&env);
        config_free(&cfg);
        return 2;
    }
    if (check_only) {
        config_dump(&cfg, stdout);
        printf("\n# configuration is valid (%zu IMAP accounts)\n", env.accounts.n);
        free_env(&env);
        config_free(&cfg);
        return 0;
    }

    /* every thread inherits this mask: signals are taken only by sigwait */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    metrics_server_t *ms = NULL;
    if (cfg.metrics_listen[0]) {
        ms = metrics_server_start(cfg.metrics_listen, err, sizeof(err));
        if (ms == NULL) {
            fprintf(stderr, "mailpumpd: %s\n", err);
            free_env(&env);
            config_free(&cfg);
            return 2;
        }
    }

    unsigned nworkers = cfg.worker_count;
    if (nworkers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nworkers = n > 0 ? (unsigned)n : 1;
    }
    metrics_gauge_set(MET_WORKERS, nworkers);
    log_info("main", "start", "version=%s workers=%u queue=%s amqp=%s:%u metrics=%s smtp_tls=%s",
             MAILPUMPD_VERSION, nworkers, cfg.amqp_queue, cfg.amqp_host, cfg.amqp_port,
             cfg.metrics_listen[0] ? cfg.metrics_listen : "off", cfg.smtp_tls);

    worker_t **workers = xcalloc(nworkers, sizeof(worker_t *));
    int rc = 0;
    unsigned started = 0;
    for (; started < nworkers; started++) {
        workers[started] = worker_start(&env, (int)started);
        if (workers[started] == NULL) {
            log_error("main", "worker_start_failed", "worker=%u reason=\"%s\"", started,
                      strerror(errno));
            rc = 1;
            break;
        }
    }
    if (rc == 0) {
        int sig = 0;
        sigwait(&set, &sig);
        log_info("main", "signal", "signal=%s action=drain", strsignal(sig));
    }
    for (unsigned i = 0; i < started; i++)
        worker_stop(workers[i]);
    for (unsigned i = 0; i < started; i++)
        if (worker_join(workers[i]) != 0)
            rc = 1;
    free(workers);
    metrics_server_stop(ms);
    free_env(&env);
    config_free(&cfg);
    log_info("main", "exit", "status=%d", rc);
    return rc;
}

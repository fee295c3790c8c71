/*
 * SUMMARY
 *  mailpumpd - the delivery daemon.
 * DESCRIPTION
 *  Loads the configuration (file, then MAILPUMP_<SECTION>_<KEY>), builds
 *  the read-only environment the workers share (TLS contexts, the IMAP
 *  account map and address), starts the metrics endpoint, the HTTP API
 *  when [api] listen is set (api/http.h), and W worker
 *  threads, then waits for a signal. SIGTERM/SIGINT drain the workers
 *  (stop consuming, finish in flight, exit 0) - what Kubernetes sends on
 *  scale-down. Signals are blocked in every thread and taken by
 *  sigtimedwait() here, so no handler runs inside a worker's loop; the
 *  exception is a crash (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT), whose
 *  handler counts it against the message the crashing thread was running
 *  (core/crash.h) over a Redis connection of its own, which this thread
 *  makes again every CRASH_CHECK_S seconds when Redis closed it.
 * DIAGNOSTICS
 *  Exit 0 after a clean drain, 1 on a worker failure, 2 on bad
 *  configuration or usage.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "api/http.h"
#include "api/control.h"
#include "api/submit.h"
#include "core/config.h"
#include "core/crash.h"
#include "core/log.h"
#include "core/util.h"
#include "deliverer/env.h"
#include "deliverer/outcome.h"
#include "deliverer/policy.h"
#include "deliverer/worker.h"
#include "metrics/heartbeat.h"
#include "metrics/metrics.h"
#include "metrics/ops.h"

#define MAILPUMPD_VERSION MAILPUMP_VERSION /* CMake's project(VERSION) */
#define CRASH_CHECK_S     3 /* how often the crash reporter's connection is looked at */

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpumpd [--config FILE] [--check-config]\n"
            "                 [--print-config-reference [--format markdown|man]]\n"
            "                 [--help] [--version]\n"
            "\n"
            "Outbound mail delivery engine: consumes JSON messages from RabbitMQ,\n"
            "delivers them over SMTP (STARTTLS), appends the sent copy to the\n"
            "sender's IMAP Sent folder and publishes one event per recipient.\n"
            "\n"
            "  -c, --config FILE    INI configuration file (see docs/configuration.md)\n"
            "      --check-config   run every check start-up runs, print the\n"
            "                       configuration with secrets masked, and exit\n"
            "                       (0 = valid)\n"
            "      --print-config-reference\n"
            "                       print every key (type, default, environment\n"
            "                       variable, meaning) as Markdown, and exit\n"
            "                       (docs/configuration.md is this output)\n"
            "      --format man     with --print-config-reference: the same as\n"
            "                       the roff man page mailpumpd.ini(5)\n"
            "  -h, --help           this text\n"
            "  -V, --version        print the version\n"
            "\n"
            "Every key can be overridden from the environment as\n"
            "MAILPUMP_<SECTION>_<KEY>, e.g. MAILPUMP_AMQP_HOST=rabbitmq.\n"
            "Signals: SIGTERM/SIGINT stop consuming, finish in-flight messages\n"
            "within [worker] shutdown_grace_ms, and exit 0. SIGHUP validates the\n"
            "configuration again and logs the result; changes still need a restart.\n");
}

/* SIGHUP: the configuration is read and validated again, and the result
 * logged; nothing is applied (every setting still needs a restart) and
 * nothing stops: a HUP never drops a message. */
static void reload_check(const char *config_path)
{
    mp_config_t next;
    char err[512];
    config_defaults(&next);
    if (config_load(&next, config_path, err, sizeof(err)) < 0 || config_validate(&next, err, sizeof(err)) < 0)
        log_warn("main", "reload", "config=%s valid=0 reason=%s action=keep_running",
                 LOG_Q(config_path ? config_path : "-"), LOG_Q(err));
    else
        log_info("main", "reload", "config=%s valid=1 action=keep_running note=%s",
                 LOG_Q(config_path ? config_path : "-"), LOG_Q("live reload is not supported yet: restart to apply"));
    config_free(&next);
}

/* The one mapping of the configuration's enums to the modules' own. */
static enum log_level log_level_of(mp_log_level_t l)
{
    switch (l) {
    case MP_LOG_LEVEL_ERROR: return LOG_ERROR;
    case MP_LOG_LEVEL_WARN: return LOG_WARN;
    case MP_LOG_LEVEL_DEBUG: return LOG_DEBUG;
    case MP_LOG_LEVEL_INFO: break;
    }
    return LOG_INFO;
}

static enum log_format log_format_of(mp_log_format_t f)
{
    return f == MP_LOG_FORMAT_JSON ? LOG_FMT_JSON : LOG_FMT_LOGFMT;
}

/* Every SMTP and IMAP session, DNS socket and pooled connection is a
 * descriptor: the soft limit (often 1024) would be reached long before
 * the memory or the sessions run out. Raise it to the hard limit once,
 * at start-up, and say what we got. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t before = rl.rlim_cur;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            getrlimit(RLIMIT_NOFILE, &rl);
    }
    log_info("main", "fd_limit", "soft=%llu hard=%llu was=%llu", (unsigned long long)rl.rlim_cur,
             (unsigned long long)rl.rlim_max, (unsigned long long)before);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' },
        { "check-config", no_argument, NULL, 'k' },
        { "print-config-reference", no_argument, NULL, 'r' },
        { "format", required_argument, NULL, 'f' },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    const char *config_path = NULL;
    const char *ref_format = NULL;
    int check_only = 0, print_ref = 0, c;
    while ((c = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_path = optarg; break;
        case 'k': check_only = 1; break;
        case 'r': print_ref = 1; break;
        case 'f': ref_format = optarg; break;
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
    if (ref_format && !print_ref) {
        fprintf(stderr, "mailpumpd: --format goes with --print-config-reference\n");
        return 2;
    }
    if (print_ref) {
        if (ref_format == NULL || strcmp(ref_format, "markdown") == 0) {
            config_print_reference(stdout);
        } else if (strcmp(ref_format, "man") == 0) {
            config_print_reference_man(stdout, MAILPUMPD_VERSION);
        } else {
            fprintf(stderr, "mailpumpd: unknown reference format \"%s\" (markdown, man)\n", ref_format);
            return 2;
        }
        return 0;
    }

    mp_config_t cfg;
    char err[1024];
    config_defaults(&cfg);
    if (config_load(&cfg, config_path, err, sizeof(err)) < 0) {
        fprintf(stderr, "mailpumpd: configuration error: %s\n", err);
        config_free(&cfg);
        return 2;
    }
    log_setup(log_level_of(cfg.log_level), log_format_of(cfg.log_format));

    /* every check start-up makes: --check-config stops after it */
    worker_env_t env;
    if (env_build(&cfg, &env, err, sizeof(err)) < 0 || api_config_check(&cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "mailpumpd: configuration error: %s\n", err);
        env_free(&env);
        config_free(&cfg);
        return 2;
    }
    if (check_only) {
        char summary[256]; /* the egress and shaping files, loaded by env_build() */
        policy_summary(env.policy, summary, sizeof(summary));
        config_dump(&cfg, stdout);
        printf("\n# %s\n", summary);
        printf("# configuration is valid (%zu IMAP accounts)\n", env.accounts.n);
        env_free(&env);
        config_free(&cfg);
        return 0;
    }

    /* every thread inherits this mask: signals are taken only by sigwait */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    if (crash_install() != 0)
        log_warn("main", "crash_handlers", "reason=%s", LOG_Q(strerror(errno)));
    if (cfg.redis_host[0])
        crash_reporter_connect(cfg.redis_host, cfg.redis_port, env.retry.max_age_ms,
                               cfg.redis_timeout_ms > 500 ? cfg.redis_timeout_ms : 500);

    /* the label values of the per-tenant, per-pool and per-source series,
     * fixed before anything counts (every other value counts as "other") */
    metrics_label_add_list(MET_FAM_TENANT, cfg.metrics_tenants);
    for (int i = 0; i < OUTCOME_R_LAST; i++)
        metrics_reason_name(i, outcome_reason_name((outcome_reason_t)i));
    metrics_label_add_list(MET_FAM_CAMPAIGN, cfg.metrics_campaigns);
    metrics_label_add_list(MET_FAM_SITE, cfg.metrics_sites);
    for (size_t i = 0; i < policy_npools(env.policy); i++)
        metrics_label_add(MET_FAM_POOL, policy_pool(env.policy, i)->name);
    for (size_t i = 0; i < policy_nsources(env.policy); i++)
        metrics_label_add(MET_FAM_SOURCE, policy_source(env.policy, i)->name);

    metrics_server_t *ms = NULL;
    if (cfg.metrics_listen[0]) {
        ms = metrics_server_start(cfg.metrics_listen, err, sizeof(err));
        if (ms == NULL) {
            fprintf(stderr, "mailpumpd: %s\n", err);
            env_free(&env);
            config_free(&cfg);
            return 2;
        }
    }

    /* the HTTP API (api/http.h), off unless [api] listen is set */
    api_server_t *api = NULL;
    api_submit_t *submit = NULL;
    if (cfg.api_listen[0]) {
        api = api_server_new(&cfg, err, sizeof(err));
        if (api != NULL)
            submit = api_submit_start(&cfg, err, sizeof(err));
        if (api == NULL || submit == NULL || api_submit_route(api, submit) < 0 ||
            api_control_routes(api, err, sizeof(err)) < 0 || api_server_start(api, err, sizeof(err)) < 0) {
            fprintf(stderr, "mailpumpd: %s\n", err);
            api_server_free(api);
            api_submit_stop(submit);
            metrics_server_stop(ms);
            env_free(&env);
            config_free(&cfg);
            return 2;
        }
    }

    unsigned nworkers = env.nworkers;
    metrics_gauge_set(MET_WORKERS, nworkers);
    heartbeat_init(nworkers, cfg.metrics_stuck_after_ms);
    log_info("main", "start", "version=%s workers=%u queue=%s amqp=%s:%u metrics=%s smtp_tls=%s",
             MAILPUMPD_VERSION, nworkers, LOG_Q(cfg.amqp_queue), cfg.amqp_host, cfg.amqp_port,
             cfg.metrics_listen[0] ? cfg.metrics_listen : "off",
             config_enum_name("smtp", "tls", (int)cfg.smtp_tls));
    char summary[256];
    policy_summary(env.policy, summary, sizeof(summary));
    log_info("main", "egress", "summary=%s", LOG_Q(summary));
    /* the memory budget of bodies in flight (deliverer/budget.h) */
    log_info("main", "inflight_memory",
             "per_worker=%llu workers=%u source=%s memory=%llu max_body=%llu resume_below=%llu",
             (unsigned long long)env.inflight_limit, nworkers, env.inflight_memory ? "auto" : "config",
             (unsigned long long)env.inflight_memory, (unsigned long long)env.max_body,
             (unsigned long long)(env.inflight_limit / 4 * 3));

    worker_t **workers = xcalloc(nworkers, sizeof(worker_t *));
    int rc = 0;
    unsigned started = 0;
    for (; started < nworkers; started++) {
        workers[started] = worker_start(&env, (int)started);
        if (workers[started] == NULL) {
            log_error("main", "worker_start_failed", "worker=%u reason=%s", started,
                      LOG_Q(strerror(errno)));
            rc = 1;
            break;
        }
    }
    if (rc == 0) {
        int sig;
        struct timespec tick = { .tv_sec = CRASH_CHECK_S, .tv_nsec = 0 };
        for (;;) {
            while ((sig = sigtimedwait(&set, NULL, &tick)) < 0)
                if (errno == EAGAIN && cfg.redis_host[0])
                    crash_reporter_check(); /* off every worker's path */
            if (sig != SIGHUP)
                break;
            reload_check(config_path);
        }
        log_info("main", "signal", "signal=%s action=drain", LOG_Q(strsignal(sig)));
    }
    /* the API first: no new submissions while the workers drain */
    api_server_free(api);
    api_submit_stop(submit);
    for (unsigned i = 0; i < started; i++)
        worker_stop(workers[i]);
    for (unsigned i = 0; i < started; i++)
        if (worker_join(workers[i]) != 0)
            rc = 1;
    free(workers);
    metrics_server_stop(ms);
    crash_reporter_close();
    env_free(&env);
    config_free(&cfg);
    log_info("main", "exit", "status=%d", rc);
    return rc;
}

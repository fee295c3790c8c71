/*
 * SUMMARY
 *  cli/dns_cmd.c - `mailpump dns resolve DOMAIN...` and
 *  `mailpump dns prewarm FILE`.
 * DESCRIPTION
 *  resolve prints, per domain, the status, the layer that answered (l1,
 *  l2, dns), how long the answer stays cached, and the MX hosts in the
 *  order a delivery would try them (preference, shuffled among equals)
 *  with their addresses.
 *
 *  prewarm reads domains, one per line ('#' comments and blank lines
 *  skipped), and resolves them with at most --concurrency lookups in
 *  flight: every answer that comes from DNS is written to Redis by the
 *  resolver, so the workers of every pod find it there. A progress line
 *  on stderr is rewritten at most five times a second. It waits for the
 *  Redis writes to be acknowledged before it exits.
 * DIAGNOSTICS
 *  Exit 2 for usage and configuration errors (prewarm without Redis),
 *  1 when a lookup failed (resolve) or Redis failed (prewarm), else 0.
 */
#include "cli/dns_cmd.h"

#include <arpa/inet.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "dns/resolver.h"

void dns_cmd_usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump [--config FILE] dns resolve [OPTIONS] DOMAIN...\n"
            "       mailpump [--config FILE] dns prewarm [OPTIONS] FILE|-\n"
            "\n"
            "resolve: print the MX hosts (in delivery order, with preference and\n"
            "addresses) the engine would use, the layer that answered (l1, l2, dns)\n"
            "and how long the answer stays cached.\n"
            "prewarm: resolve a list of domains (one per line) into the Redis cache,\n"
            "with a progress line.\n"
            "\n"
            "Options:\n"
            "  -s, --servers H:P,...  DNS servers (default: [dns] servers, else the system's)\n"
            "  -r, --redis HOST:PORT  Redis for the L2 cache (default: [redis] host/port)\n"
            "      --no-l2            do not use Redis (resolve only)\n"
            "  -n, --concurrency N    lookups in flight (prewarm, default 64)\n"
            "  -h, --help             this text\n"
            "\n"
            "Cache settings come from [dns] l1_entries, max_ttl_s, negative_ttl_s, l2\n"
            "and [redis] host, port, timeout_ms, as for mailpumpd.\n");
}

typedef struct dns_cli {
    loop_t         *loop;
    rclient_t      *rc;
    dns_resolver_t *r;
} dns_cli_t;

/* Build loop, Redis client (when wanted) and resolver. 0 or -1 (printed). */
static int dns_cli_open(dns_cli_t *c, const mp_config_t *cfg, const char *servers, const char *redis,
                        int no_l2)
{
    memset(c, 0, sizeof(*c));
    c->loop = loop_new();
    if (c->loop == NULL) {
        fprintf(stderr, "mailpump: cannot create the event loop\n");
        return -1;
    }
    char host[256] = "";
    unsigned port = cfg->redis_port;
    if (redis != NULL) {
        const char *colon = strrchr(redis, ':');
        if (colon == NULL || colon == redis || (size_t)(colon - redis) >= sizeof(host) ||
            (port = (unsigned)strtoul(colon + 1, NULL, 10)) == 0) {
            fprintf(stderr, "mailpump: --redis expects HOST:PORT\n");
            return -1;
        }
        memcpy(host, redis, (size_t)(colon - redis));
        host[colon - redis] = '\0';
    } else if (cfg->redis_host != NULL && cfg->dns_l2) {
        snprintf(host, sizeof(host), "%s", cfg->redis_host);
    }
    if (host[0] != '\0' && !no_l2) {
        rclient_config_t rcfg = { .host = host, .port = port, .timeout_ms = cfg->redis_timeout_ms };
        c->rc = rclient_new(c->loop, &rcfg);
        /* lookups skip L2 until connected: wait briefly for it */
        uint64_t end = util_mono_ms() + 1000;
        while (!rclient_connected(c->rc) && util_mono_ms() < end)
            loop_run_once(c->loop, 10);
        if (!rclient_connected(c->rc))
            fprintf(stderr, "mailpump: Redis %s:%u not reachable; resolving without L2\n", host, port);
    }
    char err[256];
    dns_config_t dc = { .servers = servers ? servers : cfg->dns_servers, .timeout_ms = cfg->dns_timeout_ms,
                        .tries = cfg->dns_tries, .l1_entries = cfg->dns_l1_entries,
                        .max_ttl_s = cfg->dns_max_ttl_s, .negative_ttl_s = cfg->dns_negative_ttl_s,
                        .redis = c->rc };
    c->r = dns_resolver_new(c->loop, &dc, err, sizeof(err));
    if (c->r == NULL) {
        fprintf(stderr, "mailpump: %s\n", err);
        return -1;
    }
    return 0;
}

static void dns_cli_close(dns_cli_t *c)
{
    dns_resolver_free(c->r);
    rclient_free(c->rc);
    if (c->loop != NULL)
        loop_free(c->loop);
}

/* ---- resolve ---- */

typedef struct resolve_one {
    const char *domain;
    int         done;
    int         ok;
} resolve_one_t;

static void resolve_print(void *arg, const dns_mx_result_t *res)
{
    resolve_one_t *o = arg;
    o->done = 1;
    o->ok = res->status == DNS_OK;
    printf("%s", o->domain);
    if (res->name != NULL && strcmp(res->name, o->domain) != 0)
        printf(" (%s)", res->name);
    printf(": %s", dns_status_tag(res->status));
    if (res->status != DNS_OK)
        printf(" (%s%s)", dns_strerror(res->status),
               dns_status_is_permanent(res->status) ? ", permanent" : ", transient");
    printf(" layer=%s ttl=%us%s\n", dns_layer_name(res->layer), res->ttl_s,
           res->implicit ? " implicit-mx" : "");
    for (size_t i = 0; i < res->nhosts; i++) {
        const dns_mx_host_t *h = &res->hosts[i];
        printf("  %5u %s", h->pref, h->name);
        for (size_t j = 0; j < h->naddrs; j++) {
            char a[INET6_ADDRSTRLEN] = "?";
            if (h->addrs[j].ss_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)&h->addrs[j])->sin_addr, a, sizeof(a));
            else if (h->addrs[j].ss_family == AF_INET6)
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&h->addrs[j])->sin6_addr, a, sizeof(a));
            printf(" %s", a);
        }
        printf("\n");
    }
    fflush(stdout);
}

static int dns_resolve(dns_cli_t *c, int n, char **domains)
{
    resolve_one_t *o = xcalloc((size_t)n, sizeof(*o));
    int failed = 0;
    /* One at a time, in the order given: the output reads like the input,
     * and a name given twice shows the L1 answer the second time. */
    for (int i = 0; i < n; i++) {
        o[i].domain = domains[i];
        dns_mx_query(c->r, domains[i], resolve_print, &o[i]);
        while (!o[i].done)
            loop_run_once(c->loop, 100);
        failed += !o[i].ok;
    }
    free(o);
    return failed ? 1 : 0;
}

/* ---- prewarm ---- */

typedef struct prewarm {
    dns_cli_t *c;
    FILE      *in;
    unsigned   limit;
    unsigned   inflight;
    unsigned   started, done, ok, permanent, transient, cached;
    int        eof;
    uint64_t   t0, last_print;
} prewarm_t;

static void prewarm_start_more(prewarm_t *p);

static void prewarm_progress(prewarm_t *p, int final)
{
    uint64_t now = util_mono_ms();
    if (!final && now - p->last_print < 200)
        return;
    p->last_print = now;
    fprintf(stderr,
            "\rprewarm: %u resolved (%u ok, %u permanent failures, %u transient failures, %u already in Redis), "
            "%u in flight, %.1fs%s",
            p->done, p->ok, p->permanent, p->transient, p->cached, p->inflight, (double)(now - p->t0) / 1000.0,
            final ? "\n" : "  ");
    fflush(stderr);
}

static void prewarm_on_result(void *arg, const dns_mx_result_t *res)
{
    prewarm_t *p = arg;
    p->inflight--;
    p->done++;
    if (res->layer == DNS_LAYER_L2)
        p->cached++;
    if (res->status == DNS_OK)
        p->ok++;
    else if (dns_status_is_permanent(res->status))
        p->permanent++; /* cached too: a negative answer */
    else
        p->transient++; /* not cached */
    prewarm_progress(p, 0);
    prewarm_start_more(p);
}

static void prewarm_start_more(prewarm_t *p)
{
    char line[1024];
    while (!p->eof && p->inflight < p->limit) {
        if (fgets(line, sizeof(line), p->in) == NULL) {
            p->eof = 1;
            break;
        }
        char *s = line;
        while (*s == ' ' || *s == '\t')
            s++;
        size_t len = strcspn(s, " \t\r\n#");
        if (len == 0)
            continue;
        s[len] = '\0';
        p->inflight++;
        p->started++;
        dns_mx_query(p->c->r, s, prewarm_on_result, p);
    }
}

static int dns_prewarm(dns_cli_t *c, const char *path, unsigned limit)
{
    if (c->rc == NULL) {
        fprintf(stderr, "mailpump: prewarm needs Redis: set [redis] host (and [dns] l2 = 1) or --redis\n");
        return 2;
    }
    if (!rclient_connected(c->rc))
        return 1;
    prewarm_t p = { .c = c, .limit = limit ? limit : 64, .t0 = util_mono_ms() };
    p.in = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
    if (p.in == NULL) {
        perror(path);
        return 2;
    }
    prewarm_start_more(&p);
    while (p.inflight > 0)
        loop_run_once(c->loop, 100);
    /* the last answers' Redis writes */
    dns_stats_t st;
    uint64_t end = util_mono_ms() + 5000;
    do {
        loop_run_once(c->loop, 10);
        dns_resolver_stats(c->r, &st);
    } while (st.l2_inflight > 0 && util_mono_ms() < end);
    prewarm_progress(&p, 1);
    if (p.in != stdin)
        fclose(p.in);
    fprintf(stderr, "prewarm: %llu written to Redis, %llu Redis errors\n", (unsigned long long)st.l2_sets,
            (unsigned long long)st.l2_errors);
    return st.l2_errors > 0 || st.l2_inflight > 0 ? 1 : 0;
}

int dns_cmd_main(const mp_config_t *cfg, int argc, char **argv)
{
    static const struct option opts[] = {
        { "servers", required_argument, NULL, 's' }, { "redis", required_argument, NULL, 'r' },
        { "no-l2", no_argument, NULL, 'N' },         { "concurrency", required_argument, NULL, 'n' },
        { "help", no_argument, NULL, 'h' },          { NULL, 0, NULL, 0 },
    };
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        dns_cmd_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    const char *servers = NULL, *redis = NULL;
    int no_l2 = 0, opt;
    unsigned concurrency = 64;
    optind = 0; /* glibc: reinitialise; parsing starts at argv[1], after the subcommand */
    argc--;
    argv++;
    while ((opt = getopt_long(argc, argv, "s:r:n:h", opts, NULL)) != -1) {
        switch (opt) {
        case 's': servers = optarg; break;
        case 'r': redis = optarg; break;
        case 'N': no_l2 = 1; break;
        case 'n': concurrency = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'h': dns_cmd_usage(stdout); return 0;
        default: dns_cmd_usage(stderr); return 2;
        }
    }
    int nargs = argc - optind;
    char **args = argv + optind;
    if (strcmp(sub, "resolve") != 0 && strcmp(sub, "prewarm") != 0) {
        fprintf(stderr, "mailpump: dns: unknown command \"%s\" (resolve or prewarm)\n", sub);
        return 2;
    }
    if (nargs < 1 || (strcmp(sub, "prewarm") == 0 && nargs != 1) || concurrency == 0) {
        dns_cmd_usage(stderr);
        return 2;
    }
    dns_cli_t c;
    int rc;
    if (dns_cli_open(&c, cfg, servers, redis, no_l2 && strcmp(sub, "resolve") == 0) < 0)
        rc = 2;
    else if (strcmp(sub, "resolve") == 0)
        rc = dns_resolve(&c, nargs, args);
    else
        rc = dns_prewarm(&c, args[0], concurrency);
    dns_cli_close(&c);
    return rc;
}

/*
 * SUMMARY
 *  tests/bench/bench_imap.c - Sent copies per second into the stack's
 *  Dovecot, one session per copy against pooled sessions.
 * DESCRIPTION
 *  bench_imap --count N --concurrency C --size BYTES --pool 0|1 [--batch N]
 *
 *  --batch is [imap] pool_max_batch: 1 sends one copy per APPEND, more
 *  lets queued copies of the account share one (MULTIAPPEND).
 *
 *  One loop (one worker thread's share of the work) keeps C appends in
 *  flight over IMAPS with the certificate verified, as the worker does,
 *  until N are stored. Prints, as "BENCH imap <metric> <value> <unit>":
 *  appends per second, p50/p99 latency from start to callback, and the
 *  connections opened. Reads the stack's addresses from
 *  ${MP_STACK_DIR:-/tmp/mpstack}/env; exits 1 on any failed append.
 */
#include <arpa/inet.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/log.h"
#include "core/loop.h"
#include "core/tls.h"
#include "core/util.h"
#include "imap/imap.h"
#include "tests/support/stackenv.h"

typedef struct bench {
    loop_t         *loop;
    imap_account_t  acct;
    const char     *msg;
    size_t          msglen;
    unsigned        count, started, done, failed, inflight;
    uint64_t        connections;
    double         *lat_ms;
} bench_t;

typedef struct slot {
    bench_t       *b;
    double         t0;
    imap_append_t *h;
} slot_t;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void start_one(bench_t *b, slot_t *s);

static void on_done(void *arg, const imap_append_result_t *res)
{
    slot_t *s = arg;
    bench_t *b = s->b;
    imap_append_free(s->h); /* inside its own callback: released once it returns */
    s->h = NULL;
    b->inflight--;
    b->connections += res->connections;
    if (res->status != IMAP_OK) {
        fprintf(stderr, "bench_imap: append failed: %s: %s\n", imap_strerror(res->status), res->error);
        b->failed++;
    }
    b->lat_ms[b->done++] = now_ms() - s->t0;
    if (b->started < b->count)
        start_one(b, s);
    else
        free(s);
}

static void start_one(bench_t *b, slot_t *s)
{
    s->t0 = now_ms();
    b->started++;
    b->inflight++;
    s->h = imap_append_start(b->loop, &b->acct, b->msg, b->msglen, on_done, s);
    if (s->h == NULL) {
        fprintf(stderr, "bench_imap: imap_append_start refused its arguments\n");
        exit(1);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static char *make_message(const char *from, size_t size)
{
    char *m = xmalloc(size + 512);
    int n = snprintf(m, 512,
                     "From: <%s>\r\nTo: <bench@test.example>\r\nSubject: bench imap\r\n"
                     "Message-ID: <bench-imap@test.example>\r\nMIME-Version: 1.0\r\n"
                     "Content-Type: text/plain; charset=us-ascii\r\n\r\n",
                     from);
    size_t len = (size_t)n;
    while (len + 80 < size + (size_t)n) {
        memcpy(m + len, "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstu\r\n", 80);
        len += 80;
    }
    m[len] = '\0';
    return m;
}

int main(int argc, char **argv)
{
    unsigned count = 1000, conc = 8, pool_on = 1, batch = 0;
    size_t size = 10240;
    static const struct option opts[] = {
        { "count", required_argument, NULL, 'n' },
        { "concurrency", required_argument, NULL, 'c' },
        { "size", required_argument, NULL, 's' },
        { "pool", required_argument, NULL, 'p' },
        { "batch", required_argument, NULL, 'b' },
        { NULL, 0, NULL, 0 },
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'n': count = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'c': conc = (unsigned)strtoul(optarg, NULL, 10); break;
        case 's': size = (size_t)strtoul(optarg, NULL, 10); break;
        case 'p': pool_on = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'b': batch = (unsigned)strtoul(optarg, NULL, 10); break;
        default:
            fprintf(stderr, "usage: bench_imap [--count N] [--concurrency C] [--size BYTES] [--pool 0|1] "
                            "[--batch N]\n");
            return 2;
        }
    }
    if (count == 0 || conc == 0 || conc > count) {
        fprintf(stderr, "bench_imap: need 0 < concurrency <= count\n");
        return 2;
    }
    log_setup(LOG_WARN, LOG_FMT_LOGFMT);
    char host[64], port[16], ca[512], users[256], password[128], user[128];
    if (stackenv_get("MP_IMAP_HOST", host, sizeof(host)) < 0 || stackenv_get("MP_IMAPS_PORT", port, sizeof(port)) < 0 ||
        stackenv_get("MP_CA_FILE", ca, sizeof(ca)) < 0 || stackenv_get("MP_IMAP_USERS", users, sizeof(users)) < 0 ||
        stackenv_get("MP_IMAP_PASSWORD", password, sizeof(password)) < 0 ||
        sscanf(users, "%127s", user) != 1) {
        fprintf(stderr, "bench_imap: %s is missing or incomplete: run deploy/local/stack up\n", stackenv_path());
        return 1;
    }
    char err[256];
    SSL_CTX *ctx = tls_client_ctx_new(ca, 1, err, sizeof(err));
    if (ctx == NULL) {
        fprintf(stderr, "bench_imap: %s\n", err);
        return 1;
    }
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port)) };
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        fprintf(stderr, "bench_imap: MP_IMAP_HOST %s is not an IPv4 address\n", host);
        return 1;
    }
    bench_t b = { 0 };
    b.loop = loop_new();
    b.count = count;
    b.lat_ms = xcalloc(count, sizeof(double));
    char *msg = make_message(user, size);
    b.msg = msg;
    b.msglen = strlen(msg);
    imap_pool_limits_t lim = { .max_batch = batch };
    imap_pool_t *pool = pool_on ? imap_pool_new(b.loop, &lim) : NULL;
    b.acct = (imap_account_t){ .addr = (struct sockaddr *)&sin, .addrlen = sizeof(sin), .host = "imap.test.example",
                               .tls = IMAP_TLS_IMAPS, .ssl_ctx = ctx, .verify_host = 1, .user = user,
                               .password = password, .timeout_ms = 10000, .pool = pool };
    double t0 = now_ms();
    for (unsigned i = 0; i < conc; i++) {
        slot_t *s = xcalloc(1, sizeof(*s));
        s->b = &b;
        start_one(&b, s);
    }
    while (b.done < count)
        loop_run_once(b.loop, 100);
    double secs = (now_ms() - t0) / 1e3;
    imap_pool_stats_t st;
    imap_pool_get_stats(pool, &st); /* zeros without a pool */
    imap_pool_free(pool);
    loop_free(b.loop);

    qsort(b.lat_ms, count, sizeof(double), cmp_double);
    const char *mode = !pool_on ? "nopool" : batch == 1 ? "pool_nobatch" : "pool";
    printf("BENCH imap appends_per_s_%s %.0f msg/s\n", mode, count / secs);
    printf("BENCH imap append_p50_ms_%s %.2f ms\n", mode, b.lat_ms[count / 2]);
    printf("BENCH imap append_p99_ms_%s %.2f ms\n", mode, b.lat_ms[(size_t)(count * 0.99)]);
    printf("BENCH imap connections_%s %" PRIu64 " connections\n", mode, b.connections);
    /* APPEND commands: each batch is one, every other copy its own */
    printf("BENCH imap copies_per_append_%s %.2f copies\n", mode,
           (double)count / (double)(count - st.batched + st.batches));
    free(b.lat_ms);
    free(msg);
    SSL_CTX_free(ctx);
    return b.failed ? 1 : 0;
}

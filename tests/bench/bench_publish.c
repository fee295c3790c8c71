/*
 * SUMMARY
 *  tests/bench/bench_publish.c - fast message publisher and event tap for
 *  the benchmarks (tests/bench/smtp.sh).
 * DESCRIPTION
 *  bench_publish publish: N JSON messages (one recipient, a text body of
 *  --size bytes) into --queue with publisher confirms, keeping --window
 *  publishes unconfirmed at a time (queue/mq.c on one loop), or paced at
 *  --rate messages per second. Each message carries its enqueue wall time
 *  in its trace_id ("bench:<prefix>:<epoch-ms>") so enqueue-to-delivered
 *  latency can be read from the events. --to-file gives the recipients:
 *  message i goes to line i (mod the number of lines) of the file, so a
 *  caller can spread messages over domains in any mix and order it likes.
 *  Prints the number confirmed and
 *  the publish rate; exits 1 if any publish was not confirmed.
 *
 *  bench_publish events: binds a private queue to --exchange and writes
 *  every event body as one line to --out until SIGTERM or --max-seconds.
 *  Prints "subscribed" once the binding exists, so a caller can start the
 *  daemon knowing no event is missed.
 * DIAGNOSTICS
 *  Exit 0 on success, 1 on a broker failure, 2 on a usage error.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <getopt.h>

#include "cli/client.h"
#include "core/buf.h"
#include "core/loop.h"
#include "core/util.h"
#include "queue/mq.h"

typedef struct bench_opts {
    const char   *host, *user, *password, *vhost;
    unsigned      port;
    const char   *queue, *dead_queue, *exchange;
    const char   *from, *to, *to_file, *prefix, *out;
    unsigned long count, size, window, rate, max_seconds;
} bench_opts_t;

typedef struct bench_pub {
    const bench_opts_t *o;
    loop_t       *loop;
    mq_t         *mq;
    loop_timer_t  pace;
    buf_t         text;       /* JSON-escaped body text */
    char        **rcpts;      /* --to-file lines */
    size_t        nrcpts;
    unsigned long sent, confirmed, failed;
    double        credit;     /* paced mode: publishes allowed so far */
    uint64_t      start_ms;
} bench_pub_t;

static void on_confirm(void *arg, int ok)
{
    bench_pub_t *p = arg;
    p->confirmed++;
    if (!ok)
        p->failed++;
    if (p->confirmed == p->o->count)
        loop_stop(p->loop);
}

static void publish_one(bench_pub_t *p)
{
    char id[128], trace[128];
    snprintf(id, sizeof(id), "%s-%lu", p->o->prefix, p->sent);
    snprintf(trace, sizeof(trace), "bench:%s:%llu", p->o->prefix, (unsigned long long)util_wall_ms());
    buf_t b = BUF_INIT;
    buf_printf(&b, "{\"id\":\"%s\",\"trace_id\":\"%s\",\"from\":\"%s\",\"to\":[\"%s\"],"
                   "\"subject\":\"bench %s\",\"text\":\"", id, trace, p->o->from,
               p->nrcpts ? p->rcpts[p->sent % p->nrcpts] : p->o->to, id);
    buf_append(&b, buf_head(&p->text), buf_size(&p->text));
    buf_puts(&b, "\"}");
    mq_publish_opts_t po = { .content_type = "application/json", .message_id = id,
                             .priority = -1, .persistent = 1 };
    if (mq_publish(p->mq, "", p->o->queue, buf_head(&b), buf_size(&b), &po, on_confirm, p) < 0) {
        /* no confirm will come for this one */
        p->failed++;
        p->confirmed++;
        if (p->confirmed == p->o->count)
            loop_stop(p->loop);
    }
    p->sent++;
    buf_free(&b);
}

/* Before every epoll_wait: top the unconfirmed window up. */
static void pump(loop_t *loop, void *arg)
{
    (void)loop;
    bench_pub_t *p = arg;
    if (p->o->rate)
        return;
    while (p->sent < p->o->count && p->sent - p->confirmed < p->o->window)
        publish_one(p);
}

static void pace_tick(loop_t *loop, loop_timer_t *t, void *arg)
{
    bench_pub_t *p = arg;
    double elapsed = (double)(util_mono_ms() - p->start_ms) / 1000.0;
    while (p->sent < p->o->count && (double)p->sent < elapsed * (double)p->o->rate)
        publish_one(p);
    if (p->sent < p->o->count)
        loop_timer_set(loop, t, 5);
}

static int do_publish(const bench_opts_t *o)
{
    bench_pub_t p;
    memset(&p, 0, sizeof(p));
    p.o = o;
    p.loop = loop_new();
    loop_timer_init(&p.pace, pace_tick, &p);
    if (o->to_file) {
        FILE *f = fopen(o->to_file, "r");
        if (f == NULL) {
            perror(o->to_file);
            return 1;
        }
        char line[512];
        while (fgets(line, sizeof(line), f)) {
            line[strcspn(line, "\r\n")] = '\0';
            if (line[0] == '\0' || line[0] == '#')
                continue;
            p.rcpts = xrealloc(p.rcpts, (p.nrcpts + 1) * sizeof(*p.rcpts));
            p.rcpts[p.nrcpts++] = xstrdup(line);
        }
        fclose(f);
        if (p.nrcpts == 0) {
            fprintf(stderr, "bench_publish: %s: no recipients\n", o->to_file);
            return 1;
        }
    }
    /* text: 78-octet lines, JSON-escaped newlines */
    static const char line[] = "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrst";
    for (size_t n = 0; n < o->size;) {
        size_t take = sizeof(line) - 1;
        if (take > o->size - n)
            take = o->size - n;
        buf_append(&p.text, line, take);
        buf_puts(&p.text, "\\n");
        n += take + 1;
    }
    mq_config_t cfg = { .host = o->host, .port = o->port, .user = o->user, .password = o->password,
                        .vhost = o->vhost, .heartbeat = 30, .prefetch = 1, .queue = o->queue,
                        .dead_queue = o->dead_queue, .events_exchange = o->exchange };
    char err[512];
    p.mq = mq_open(p.loop, &cfg, err, sizeof(err));
    if (p.mq == NULL) {
        fprintf(stderr, "bench_publish: %s\n", err);
        return 1;
    }
    p.start_ms = util_mono_ms();
    if (o->rate) {
        loop_timer_set(p.loop, &p.pace, 0);
    } else {
        loop_set_before_sleep(p.loop, pump, &p);
    }
    if (o->count > 0)
        loop_run(p.loop);
    uint64_t ms = util_mono_ms() - p.start_ms;
    loop_timer_cancel(p.loop, &p.pace);
    mq_free(p.mq);
    loop_free(p.loop);
    buf_free(&p.text);
    for (size_t i = 0; i < p.nrcpts; i++)
        free(p.rcpts[i]);
    free(p.rcpts);
    printf("published %lu confirmed %lu failed %lu in %llu ms (%.0f msg/s)\n", p.sent,
           p.confirmed - p.failed, p.failed, (unsigned long long)ms,
           ms ? (double)p.sent * 1000.0 / (double)ms : 0.0);
    return p.failed ? 1 : 0;
}

static volatile sig_atomic_t stop_flag;

static void on_term(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static int do_events(const bench_opts_t *o)
{
    mp_client_opts_t co = { .host = o->host, .port = o->port, .user = o->user,
                            .password = o->password, .vhost = o->vhost, .queue = o->queue,
                            .events_exchange = o->exchange };
    char err[512];
    FILE *out = fopen(o->out, "w");
    if (out == NULL) {
        perror(o->out);
        return 1;
    }
    mp_client_t *c = mp_client_connect(&co, err, sizeof(err));
    if (c == NULL || mp_client_subscribe(c, "#", err, sizeof(err)) < 0) {
        fprintf(stderr, "bench_publish: %s\n", err);
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("subscribed\n");
    fflush(stdout);
    uint64_t deadline = util_mono_ms() + o->max_seconds * 1000;
    unsigned long n = 0;
    int rc = 0;
    while (!stop_flag && util_mono_ms() < deadline) {
        char *body = NULL;
        size_t len = 0;
        int r = mp_client_next_event(c, 200, &body, &len, err, sizeof(err));
        if (r < 0) {
            fprintf(stderr, "bench_publish: %s\n", err);
            rc = 1;
            break;
        }
        if (r == 0) {
            fflush(out);
            continue;
        }
        fwrite(body, 1, len, out);
        fputc('\n', out);
        free(body);
        if (++n % 256 == 0)
            fflush(out);
    }
    fclose(out);
    mp_client_close(c);
    return rc;
}

static void usage(FILE *f)
{
    fputs("usage: bench_publish publish --queue Q --dead-queue D --exchange X --count N\n"
          "                     [--size BYTES] [--from A] [--to A | --to-file F] [--prefix P] [--window W]\n"
          "                     [--rate R]   (--to-file: message i to line i mod lines)\n"
          "       bench_publish events --queue Q --exchange X --out FILE [--max-seconds S]\n"
          "common: --host H --port P --user U --password P --vhost V (default 127.0.0.1:5672 guest)\n",
          f);
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *mode = argv[1];
    bench_opts_t o = { .host = "127.0.0.1", .port = 5672, .user = "guest", .password = "guest",
                       .vhost = "/", .from = "bench@test.example", .to = "sink@test.example",
                       .prefix = "bench", .size = 10240, .window = 2000, .max_seconds = 600,
                       .dead_queue = "bench.dead" };
    static const struct option opts[] = {
        { "host", 1, NULL, 'H' }, { "port", 1, NULL, 'P' }, { "user", 1, NULL, 'u' },
        { "password", 1, NULL, 'p' }, { "vhost", 1, NULL, 'v' }, { "queue", 1, NULL, 'q' },
        { "dead-queue", 1, NULL, 'd' }, { "exchange", 1, NULL, 'x' }, { "count", 1, NULL, 'n' },
        { "size", 1, NULL, 's' }, { "from", 1, NULL, 'f' }, { "to", 1, NULL, 't' },
        { "prefix", 1, NULL, 'i' }, { "window", 1, NULL, 'w' }, { "rate", 1, NULL, 'r' },
        { "out", 1, NULL, 'o' }, { "to-file", 1, NULL, 'T' }, { "max-seconds", 1, NULL, 'm' }, { NULL, 0, NULL, 0 },
    };
    int c;
    optind = 2;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'H': o.host = optarg; break;
        case 'P': o.port = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'u': o.user = optarg; break;
        case 'p': o.password = optarg; break;
        case 'v': o.vhost = optarg; break;
        case 'q': o.queue = optarg; break;
        case 'd': o.dead_queue = optarg; break;
        case 'x': o.exchange = optarg; break;
        case 'n': o.count = strtoul(optarg, NULL, 10); break;
        case 's': o.size = strtoul(optarg, NULL, 10); break;
        case 'f': o.from = optarg; break;
        case 't': o.to = optarg; break;
        case 'i': o.prefix = optarg; break;
        case 'w': o.window = strtoul(optarg, NULL, 10); break;
        case 'r': o.rate = strtoul(optarg, NULL, 10); break;
        case 'o': o.out = optarg; break;
        case 'T': o.to_file = optarg; break;
        case 'm': o.max_seconds = strtoul(optarg, NULL, 10); break;
        default: usage(stderr); return 2;
        }
    }
    if (o.queue == NULL || o.exchange == NULL || o.window == 0) {
        usage(stderr);
        return 2;
    }
    if (strcmp(mode, "publish") == 0)
        return do_publish(&o);
    if (strcmp(mode, "events") == 0 && o.out)
        return do_events(&o);
    usage(stderr);
    return 2;
}

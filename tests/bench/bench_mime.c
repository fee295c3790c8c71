/*
 * SUMMARY
 *  tests/bench/bench_mime.c - mime/ and DKIM throughput, peak memory.
 * DESCRIPTION
 *  bench_mime          prints, as "BENCH mime <metric> <value> <unit>":
 *    text10k_per_s       mime_build() of a 10 KB mostly-ASCII text message
 *    text10k_path_per_s  the worker's path for it: msgjson_parse, mime_build,
 *                        mime_wire_segments (reference)
 *    attach_mb_per_s     mime_build() of a message with a 10 MB binary
 *                        attachment, in MB of attachment per second
 *    memcpy_mb_per_s     reference: memcpy of 10 MB, same loop
 *    b64_ref_mb_per_s    reference: OpenSSL EVP_EncodeBlock over 10 MB
 *    dkim_rsa_per_s      dkim_sign() of the 10 KB message, RSA-2048
 *    dkim_ed25519_per_s  the same with Ed25519
 *  bench_mime rss      peak RSS growth while parsing, building and signing
 *                      a message whose built size is 25 MB (JSON body
 *                      already in memory, as the AMQP layer holds it),
 *                      divided by the built size: peak_rss_ratio_25mb
 *  bench_mime rss-worker  the worker's whole path for that message, the
 *                      JSON body counted: parse, build, sign, drop the
 *                      decoded content, frame as mime_wire_segments()
 *                      and send it all through a stream (referenced, not
 *                      copied) to a reader that discards it:
 *                      peak_rss_ratio_25mb_worker, wire_mb_per_s
 *  bench_mime rss-worker-copy  the same path as it was before the zero-copy
 *                      output: decoded content kept, a dot-stuffed copy,
 *                      and the stream's own copy of it (reference):
 *                      peak_rss_ratio_25mb_worker_copy, wire_copy_mb_per_s
 *  Each rss mode runs in its own process so the peak is its own.
 */
#include <pthread.h>
#include <sys/socket.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/message.h"
#include "core/stream.h"
#include "core/util.h"
#include "mime/build.h"
#include "mime/dkim.h"
#include "queue/msgjson.h"

#define MB (1024.0 * 1024.0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static message_t *text_message(void)
{
    message_t *m = message_new();
    m->id = xstrdup("bench-1");
    m->from.addr = xstrdup("alice@test.example");
    m->from.name = xstrdup("Alice Example");
    m->to = xcalloc(1, sizeof(*m->to));
    m->nto = 1;
    m->to[0].addr = xstrdup("bob@test.example");
    m->subject = xstrdup("Your monthly statement — Grüße");
    buf_t t = BUF_INIT;
    while (buf_size(&t) < 10240)
        buf_puts(&t, "Lorem ipsum dolor sit amet, consectetur adipiscing elit, café crème.\n");
    m->text = buf_steal(&t, NULL);
    return m;
}

static char *json_of_text(const message_t *m)
{
    buf_t j = BUF_INIT;
    buf_puts(&j, "{\"from\":\"Alice Example <alice@test.example>\",\"to\":[\"bob@test.example\"],"
                 "\"subject\":\"Your monthly statement\",\"text\":\"");
    for (const char *p = m->text; *p; p++) {
        if (*p == '\n')
            buf_puts(&j, "\\n");
        else
            buf_putc(&j, *p);
    }
    buf_puts(&j, "\"}");
    return buf_steal(&j, NULL);
}

static void fill_random(unsigned char *d, size_t n)
{
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d[i] = (unsigned char)x;
    }
}

static message_t *attach_message(size_t n)
{
    message_t *m = text_message();
    m->attachments = xcalloc(1, sizeof(*m->attachments));
    m->nattachments = 1;
    m->attachments[0].filename = xstrdup("data.bin");
    m->attachments[0].content_type = xstrdup("application/octet-stream");
    m->attachments[0].data = xmalloc(n);
    m->attachments[0].len = n;
    fill_random(m->attachments[0].data, n);
    return m;
}

static dkim_signer_t *signer(const char *dir, const char *alg, EVP_PKEY *k)
{
    char path[512], keys[1024], err[256];
    snprintf(path, sizeof(path), "%s/%s.pem", dir, alg);
    FILE *f = fopen(path, "w");
    if (f == NULL || PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) != 1)
        exit(1);
    fclose(f);
    snprintf(keys, sizeof(keys), "test.example sel %s %s\n", alg, path);
    dkim_signer_t *s = dkim_load_mem(keys, strlen(keys), "bench", NULL, NULL, err, sizeof(err));
    unlink(path);
    if (s == NULL) {
        fprintf(stderr, "bench_mime: %s\n", err);
        exit(1);
    }
    return s;
}

static long rss_kb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = 0;
    size_t fl = strlen(field);
    while (f && fgets(line, sizeof(line), f))
        if (strncmp(line, field, fl) == 0)
            v = strtol(line + fl, NULL, 10);
    if (f)
        fclose(f);
    return v;
}

/* A JSON body whose message builds to about 25 MB. */
static char *json_25mb(size_t *len)
{
    size_t n = (size_t)(25 * MB * 57 / 78);
    unsigned char *d = xmalloc(n);
    fill_random(d, n);
    char *b64 = xmalloc(4 * ((n + 2) / 3) + 1);
    EVP_EncodeBlock((unsigned char *)b64, d, (int)n);
    free(d);
    buf_t j = BUF_INIT;
    buf_puts(&j, "{\"from\":\"alice@test.example\",\"to\":[\"bob@test.example\"],\"subject\":\"big\","
                 "\"text\":\"see attachment\",\"attachments\":[{\"filename\":\"big.bin\","
                 "\"content_base64\":\"");
    buf_puts(&j, b64);
    buf_puts(&j, "\"}]}");
    free(b64);
    return buf_steal(&j, len);
}

/* ---- the worker's path: a stream to a reader that discards ---- */

typedef enum { RSS_BUILD = 0, RSS_WORKER, RSS_WORKER_COPY } rss_t;

static char drain_buf[1 << 20];

static void *drain_thread(void *arg)
{
    int fd = *(int *)arg;
    while (read(fd, drain_buf, sizeof(drain_buf)) > 0)
        ;
    return NULL;
}

static void on_stream(stream_t *s, stream_event_t ev, void *arg)
{
    (void)s;
    if (ev == STREAM_EV_ERROR || ev == STREAM_EV_CLOSED || ev == STREAM_EV_TIMEOUT)
        *(int *)arg = 1;
}

/* Send raw as SMTP DATA through a stream: from raw itself (segments) or,
 * as before, from a dot-stuffed copy that the stream copies again.
 * Returns MB/s; the copies live until the stream has sent everything. */
static double send_wire(loop_t *l, const buf_t *raw, int zero_copy)
{
    int sv[2], dead = 0;
    pthread_t th;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0 || pthread_create(&th, NULL, drain_thread, &sv[1]) != 0)
        exit(1);
    stream_t *st = stream_new(l, on_stream, &dead);
    if (stream_attach(st, sv[0]) != 0)
        exit(1);
    buf_t wire = BUF_INIT;
    mime_seg_t *segs = NULL;
    size_t nsegs = 0, total;
    double t0 = now_s();
    if (zero_copy) {
        if (mime_wire_segments(buf_head(raw), buf_size(raw), &segs, &nsegs) != MIME_OK)
            exit(1);
        stream_cork(st, 1);
        for (size_t i = 0; i < nsegs; i++)
            stream_write_ref(st, segs[i].p, segs[i].n);
        stream_cork(st, 0);
    } else {
        mime_dotstuff(buf_head(raw), buf_size(raw), &wire);
        stream_write(st, buf_head(&wire), buf_size(&wire));
    }
    total = stream_pending_out(st);
    while (stream_pending_out(st) > 0 && !dead)
        loop_run_once(l, 100);
    double t = now_s() - t0;
    if (dead) {
        fprintf(stderr, "bench_mime: stream: %s\n", stream_error(st));
        exit(1);
    }
    stream_free(st); /* the reader sees the end */
    pthread_join(th, NULL);
    close(sv[1]);
    buf_free(&wire);
    free(segs);
    return (double)total / MB / t;
}

static int rss_mode(rss_t mode)
{
    static const char *suffix[] = { "", "_worker", "_worker_copy" };
    EVP_PKEY *ek = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    char dir[] = "/tmp/bench_mime.XXXXXX";
    if (ek == NULL || mkdtemp(dir) == NULL)
        return 1;
    dkim_signer_t *s = signer(dir, "ed25519-sha256", ek);
    rmdir(dir);
    EVP_PKEY_free(ek);
    loop_t *l = loop_new();
    memset(drain_buf, 0, sizeof(drain_buf)); /* the reader's buffer is no part of the peak */
    long base = rss_kb("VmRSS:");
    size_t jlen;
    char *json = json_25mb(&jlen);
    if (mode == RSS_BUILD)
        base = rss_kb("VmRSS:"); /* the body belongs to the AMQP layer */
    message_t *m = NULL;
    char err[256];
    buf_t raw = BUF_INIT;
    if (msgjson_parse(json, jlen, &m, err, sizeof(err)) != MSGJSON_OK ||
        mime_build(m, NULL, &raw, err, sizeof(err)) != MIME_OK ||
        dkim_sign(s, "test.example", &raw, 0, err, sizeof(err)) != DKIM_OK) {
        fprintf(stderr, "bench_mime: %s\n", err);
        return 1;
    }
    double mbs = 0;
    if (mode == RSS_WORKER) {
        message_drop_content(m);
        mbs = send_wire(l, &raw, 1);
    } else if (mode == RSS_WORKER_COPY) {
        mbs = send_wire(l, &raw, 0);
    }
    long peak = rss_kb("VmHWM:");
    double size = (double)buf_size(&raw);
    printf("BENCH mime peak_rss_ratio_25mb%s %.2f x\n", suffix[mode], (double)(peak - base) * 1024.0 / size);
    if (mode == RSS_BUILD)
        printf("BENCH mime built_size_25mb %.1f MB\n", size / MB);
    else
        printf("BENCH mime %s_mb_per_s %.0f MB/s\n", mode == RSS_WORKER ? "wire" : "wire_copy", mbs);
    buf_free(&raw);
    message_free(m);
    free(json);
    dkim_free(s);
    loop_free(l);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "rss") == 0)
        return rss_mode(RSS_BUILD);
    if (argc > 1 && strcmp(argv[1], "rss-worker") == 0)
        return rss_mode(RSS_WORKER);
    if (argc > 1 && strcmp(argv[1], "rss-worker-copy") == 0)
        return rss_mode(RSS_WORKER_COPY);
    char err[256];
    mime_opts_t mo = { .now = 1700000000, .max_size = 0 };
    buf_t out = BUF_INIT;

    /* 10 KB text message */
    message_t *tm = text_message();
    long iters = 0;
    double t0 = now_s(), t;
    do {
        buf_reset(&out);
        if (mime_build(tm, &mo, &out, err, sizeof(err)) != MIME_OK)
            return 1;
        iters++;
    } while ((t = now_s() - t0) < 1.0);
    printf("BENCH mime text10k_per_s %.0f msg/s\n", (double)iters / t);

    char *json = json_of_text(tm);
    size_t jl = strlen(json);
    iters = 0;
    t0 = now_s();
    do {
        message_t *m;
        mime_seg_t *segs;
        size_t nsegs;
        buf_reset(&out);
        if (msgjson_parse(json, jl, &m, err, sizeof(err)) != MSGJSON_OK ||
            mime_build(m, &mo, &out, err, sizeof(err)) != MIME_OK ||
            mime_wire_segments(buf_head(&out), buf_size(&out), &segs, &nsegs) != MIME_OK)
            return 1;
        free(segs);
        message_free(m);
        iters++;
    } while ((t = now_s() - t0) < 1.0);
    printf("BENCH mime text10k_path_per_s %.0f msg/s\n", (double)iters / t);
    free(json);

    /* 10 MB attachment: a fresh output buffer each time, as the worker has */
    size_t an = 10u << 20;
    message_t *am = attach_message(an);
    iters = 0;
    t0 = now_s();
    do {
        buf_t o = BUF_INIT;
        if (mime_build(am, &mo, &o, err, sizeof(err)) != MIME_OK)
            return 1;
        buf_free(&o);
        iters++;
    } while ((t = now_s() - t0) < 2.0);
    printf("BENCH mime attach_mb_per_s %.0f MB/s\n", (double)iters * (double)an / MB / t);

    char *dst = xmalloc(2 * an);
    iters = 0;
    t0 = now_s();
    do {
        char *d2 = xmalloc(an);
        memcpy(d2, am->attachments[0].data, an);
        __asm__ volatile("" : : "r"(d2) : "memory");
        free(d2);
        iters++;
    } while ((t = now_s() - t0) < 1.0);
    printf("BENCH mime memcpy_mb_per_s %.0f MB/s\n", (double)iters * (double)an / MB / t);
    iters = 0;
    t0 = now_s();
    do {
        EVP_EncodeBlock((unsigned char *)dst, am->attachments[0].data, (int)an);
        iters++;
    } while ((t = now_s() - t0) < 1.0);
    printf("BENCH mime b64_ref_mb_per_s %.0f MB/s\n", (double)iters * (double)an / MB / t);
    free(dst);
    message_free(am);

    /* DKIM over the 10 KB message */
    char dir[] = "/tmp/bench_mime.XXXXXX";
    if (mkdtemp(dir) == NULL)
        return 1;
    EVP_PKEY *rk = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    EVP_PKEY *ek = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    dkim_signer_t *rs = signer(dir, "rsa-sha256", rk), *es = signer(dir, "ed25519-sha256", ek);
    rmdir(dir);
    buf_reset(&out);
    if (mime_build(tm, &mo, &out, err, sizeof(err)) != MIME_OK)
        return 1;
    const dkim_signer_t *ss[2] = { rs, es };
    const char *names[2] = { "dkim_rsa_per_s", "dkim_ed25519_per_s" };
    for (int k = 0; k < 2; k++) {
        buf_t sig = BUF_INIT;
        iters = 0;
        t0 = now_s();
        do {
            buf_reset(&sig);
            if (dkim_signature(ss[k], "test.example", buf_head(&out), buf_size(&out), 0, &sig,
                               err, sizeof(err)) != DKIM_OK)
                return 1;
            iters++;
        } while ((t = now_s() - t0) < 1.0);
        printf("BENCH mime %s %.0f sig/s\n", names[k], (double)iters / t);
        buf_free(&sig);
    }
    dkim_free(rs);
    dkim_free(es);
    EVP_PKEY_free(rk);
    EVP_PKEY_free(ek);
    message_free(tm);
    buf_free(&out);
    return 0;
}

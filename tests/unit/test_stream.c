/*
 * Unit tests for core/stream's output queue: bytes written by reference
 * (stream_write_ref) and by copy (stream_write) keep their order, the
 * referenced bytes are read from the caller's memory when they are sent
 * (never copied at queue time), corking holds writes back, and a stream
 * freed with referenced bytes queued never touches them again. The same
 * over TLS, where small segments are gathered into records.
 *
 * Writer and reader are two streams on one loop over a socketpair, so the
 * queue really fills: a socketpair takes a few hundred KiB at most, the
 * tests queue megabytes.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/stream.h"
#include "core/tls.h"

typedef struct peer {
    stream_t *st;
    buf_t     got;        /* reader: everything received */
    size_t    want;       /* reader: stop once this much arrived */
    int       events[STREAM_EV_LAST];
    int       done;
} peer_t;

static void on_writer(stream_t *s, stream_event_t ev, void *arg)
{
    peer_t *p = arg;
    p->events[ev]++;
}

static void on_reader(stream_t *s, stream_event_t ev, void *arg)
{
    peer_t *p = arg;
    p->events[ev]++;
    if (ev == STREAM_EV_DATA) {
        buf_t *in = stream_input(s);
        buf_append(&p->got, buf_head(in), buf_size(in));
        buf_consume(in, buf_size(in));
        if (buf_size(&p->got) >= p->want)
            p->done = 1;
    } else if (ev == STREAM_EV_CLOSED || ev == STREAM_EV_ERROR || ev == STREAM_EV_TIMEOUT) {
        p->done = 1;
    }
}

static void run_until(loop_t *l, const int *flag)
{
    for (int i = 0; i < 20000 && !*flag; i++)
        assert_true(loop_run_once(l, 100) >= 0);
    assert_true(*flag);
}

static void pair(loop_t *l, peer_t *w, peer_t *r)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    memset(w, 0, sizeof(*w));
    memset(r, 0, sizeof(*r));
    buf_init(&r->got);
    w->st = stream_new(l, on_writer, w);
    r->st = stream_new(l, on_reader, r);
    assert_int_equal(stream_attach(w->st, sv[0]), 0);
    assert_int_equal(stream_attach(r->st, sv[1]), 0);
}

static char *pattern(size_t n, unsigned seed)
{
    char *p = malloc(n);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = (char)('a' + (i * 7 + seed) % 26);
    return p;
}

/* Copied and referenced pieces arrive in order; a referenced piece is read
 * when it is sent, so a change made after queueing shows on the wire. */
static void test_ref_order_and_not_copied(void **state)
{
    loop_t *l = loop_new();
    peer_t w, r;
    pair(l, &w, &r);
    const size_t big = 4u << 20;
    char *body = pattern(big, 1);
    char small[8] = "1234567";

    stream_write(w.st, "HEAD:", 5);
    stream_write_ref(w.st, body, big);
    stream_write(w.st, "|MID|", 5);
    stream_write_ref(w.st, small, 3);
    stream_write_ref(w.st, small + 3, 4); /* contiguous with the one before */
    stream_puts(w.st, "END");
    size_t total = 5 + big + 5 + 7 + 3;
    assert_true(stream_pending_refs(w.st) > 0);          /* the socket is full */
    assert_true(stream_pending_refs(w.st) <= big + 7);
    assert_true(stream_pending_out(w.st) < total);       /* some went at once */
    assert_true(stream_pending_out(w.st) >= stream_pending_refs(w.st) + 5 + 3);

    /* the caller's memory is what gets sent: change it now */
    memcpy(body + big - 6, "CHANGE", 6);
    memcpy(small, "abcdefg", 7);

    r.want = total;
    run_until(l, &r.done);
    assert_int_equal(buf_size(&r.got), total);
    const char *g = buf_head(&r.got);
    assert_memory_equal(g, "HEAD:", 5);
    assert_memory_equal(g + 5, body, big);
    assert_memory_equal(g + 5 + big - 6, "CHANGE", 6);
    assert_memory_equal(g + 5 + big, "|MID|abcdefgEND", 15);
    assert_int_equal(stream_pending_out(w.st), 0);
    assert_int_equal(stream_pending_refs(w.st), 0);
    assert_int_equal(w.events[STREAM_EV_DRAINED], 1);
    assert_int_equal(w.events[STREAM_EV_ERROR], 0);

    stream_free(w.st);
    stream_free(r.st);
    buf_free(&r.got);
    free(body);
    assert_int_equal(loop_fd_count(l), 0);
    loop_free(l);
}

/* Corked writes wait; uncorking sends them all. */
static void test_cork(void **state)
{
    loop_t *l = loop_new();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    peer_t w = { 0 };
    w.st = stream_new(l, on_writer, &w);
    assert_int_equal(stream_attach(w.st, sv[0]), 0);
    static const char ref[] = "-ref-";

    stream_cork(w.st, 1);
    stream_puts(w.st, "one");
    stream_write_ref(w.st, ref, 5);
    stream_puts(w.st, "two");
    assert_int_equal(stream_pending_out(w.st), 11);
    assert_int_equal(stream_pending_refs(w.st), 5);
    char got[32];
    assert_int_equal(read(sv[1], got, sizeof(got)), -1);
    assert_int_equal(errno, EAGAIN);

    stream_cork(w.st, 0);
    assert_int_equal(stream_pending_out(w.st), 0);
    assert_int_equal(read(sv[1], got, sizeof(got)), 11);
    assert_memory_equal(got, "one-ref-two", 11);

    stream_free(w.st);
    close(sv[1]);
    assert_int_equal(loop_fd_count(l), 0);
    loop_free(l);
}

/* A stream freed with referenced bytes queued forgets them: the memory may
 * go right away (ASan would report a later read), and the peer sees a
 * clean end after what was sent. */
static void test_free_with_refs_queued(void **state)
{
    loop_t *l = loop_new();
    peer_t w, r;
    pair(l, &w, &r);
    const size_t big = 2u << 20;
    char *body = pattern(big, 2);
    stream_write_ref(w.st, body, big);
    assert_true(stream_pending_refs(w.st) > 0);
    size_t sent = big - stream_pending_refs(w.st);
    stream_free(w.st);
    free(body);

    r.want = (size_t)-1;
    run_until(l, &r.done);
    assert_int_equal(r.events[STREAM_EV_CLOSED], 1);
    assert_int_equal(buf_size(&r.got), sent);
    stream_free(r.st);
    buf_free(&r.got);
    assert_int_equal(loop_fd_count(l), 0);
    loop_free(l);
}

/* ---- TLS ---- */

static SSL_CTX *server_ctx(void)
{
    EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    X509 *x = X509_new();
    assert_non_null(k);
    assert_non_null(x);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -60);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, k);
    X509_NAME *n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *)"stream.test", -1, -1, 0);
    X509_set_issuer_name(x, n);
    assert_true(X509_sign(x, k, EVP_sha256()) > 0);
    SSL_CTX *c = SSL_CTX_new(TLS_server_method());
    assert_non_null(c);
    assert_int_equal(SSL_CTX_use_certificate(c, x), 1);
    assert_int_equal(SSL_CTX_use_PrivateKey(c, k), 1);
    X509_free(x);
    EVP_PKEY_free(k);
    return c;
}

typedef struct tls_writer {
    peer_t      p;
    const char *body;
    size_t      big;
    char       *dots;   /* many small segments: "." and short lines */
    int         queued;
} tls_writer_t;

static void on_tls_writer(stream_t *s, stream_event_t ev, void *arg)
{
    tls_writer_t *t = arg;
    t->p.events[ev]++;
    if (ev != STREAM_EV_TLS_READY)
        return;
    /* the shape of a dot-stuffed body: big pieces with a "." between
     * short lines, plus copied bytes in the middle */
    stream_cork(s, 1);
    stream_write_ref(s, t->body, t->big / 2);
    for (size_t i = 0; i < 3000; i++) {
        stream_write_ref(s, ".", 1);
        stream_write_ref(s, t->dots + i * 4, 4);
    }
    stream_puts(s, "<copied>");
    stream_write_ref(s, t->body + t->big / 2, t->big - t->big / 2);
    stream_write_ref(s, "\r\n.\r\n", 5);
    stream_cork(s, 0);
    t->queued = 1;
}

/* Over TLS: the decrypted stream is exactly the queue, small segments
 * included, and big referenced pieces are still read from the caller's
 * memory when they are sent. */
static void test_ref_over_tls(void **state)
{
    loop_t *l = loop_new();
    SSL_CTX *sctx = server_ctx();
    char err[256];
    SSL_CTX *cctx = tls_client_ctx_new(NULL, 0, err, sizeof(err));
    assert_non_null(cctx);

    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    tls_writer_t w = { 0 };
    peer_t r = { 0 };
    buf_init(&r.got);
    w.big = 3u << 20;
    char *body = pattern(w.big, 3);
    w.body = body;
    w.dots = pattern(3000 * 4, 4);
    w.p.st = stream_new(l, on_tls_writer, &w);
    r.st = stream_new(l, on_reader, &r);
    assert_int_equal(stream_attach(w.p.st, sv[0]), 0);
    assert_int_equal(stream_attach(r.st, sv[1]), 0);
    assert_int_equal(stream_tls_server(r.st, sctx), 0);
    assert_int_equal(stream_tls_client(w.p.st, cctx, NULL, NULL), 0);

    run_until(l, &w.queued);
    assert_int_equal(r.events[STREAM_EV_ERROR], 0);
    assert_true(stream_pending_refs(w.p.st) > 0);
    memcpy(body + w.big - 6, "CHANGE", 6); /* not sent yet: the change shows */

    size_t total = w.big + 3000 * 5 + 8 + 5;
    r.want = total;
    run_until(l, &r.done);
    assert_int_equal(r.events[STREAM_EV_ERROR], 0);
    assert_int_equal(buf_size(&r.got), total);

    buf_t want = BUF_INIT;
    buf_append(&want, body, w.big / 2);
    for (size_t i = 0; i < 3000; i++) {
        buf_putc(&want, '.');
        buf_append(&want, w.dots + i * 4, 4);
    }
    buf_puts(&want, "<copied>");
    buf_append(&want, body + w.big / 2, w.big - w.big / 2);
    buf_puts(&want, "\r\n.\r\n");
    assert_memory_equal(buf_head(&r.got), buf_head(&want), total);
    assert_memory_equal(buf_head(&r.got) + total - 11, "CHANGE\r\n.\r\n", 11);
    assert_int_equal(stream_pending_out(w.p.st), 0);
    assert_int_equal(w.p.events[STREAM_EV_DRAINED], 1);

    buf_free(&want);
    stream_free(w.p.st);
    stream_free(r.st);
    buf_free(&r.got);
    free(body);
    free(w.dots);
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
    for (int i = 0; i < 100 && (loop_fd_count(l) || loop_timer_count(l)); i++)
        loop_run_once(l, 10);
    assert_int_equal(loop_fd_count(l), 0);
    loop_free(l);
}

/* stream_errno(): the failing system call's errno, 0 for a clean EOF. */
static void test_errno(void **state)
{
    loop_t *l = loop_new();
    /* the peer is gone when we write: EPIPE */
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    peer_t w = { 0 };
    w.st = stream_new(l, on_reader, &w);
    assert_int_equal(stream_attach(w.st, sv[0]), 0);
    close(sv[1]);
    stream_write(w.st, "x", 1);
    run_until(l, &w.done);
    assert_int_equal(w.events[STREAM_EV_ERROR], 1);
    assert_int_equal(stream_errno(w.st), EPIPE);
    stream_free(w.st);

    /* a clean EOF is no system call's failure */
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    peer_t r = { 0 };
    buf_init(&r.got);
    r.want = 1;
    r.st = stream_new(l, on_reader, &r);
    assert_int_equal(stream_attach(r.st, sv[0]), 0);
    close(sv[1]);
    run_until(l, &r.done);
    assert_int_equal(r.events[STREAM_EV_CLOSED], 1);
    assert_int_equal(stream_errno(r.st), 0);
    stream_free(r.st);
    buf_free(&r.got);

    /* nobody listens on the port: ECONNREFUSED */
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sin, &sl), 0);
    close(lfd); /* the port is free and closed now */
    peer_t c = { 0 };
    c.st = stream_new(l, on_reader, &c);
    assert_int_equal(stream_connect(c.st, (struct sockaddr *)&sin, sizeof(sin)), 0);
    run_until(l, &c.done);
    assert_int_equal(c.events[STREAM_EV_ERROR], 1);
    assert_int_equal(stream_errno(c.st), ECONNREFUSED);
    stream_free(c.st);
    loop_free(l);
}

/* stream_connect_from: the connection leaves from the source address
 * (the listener sees 127.0.0.2, the port one the kernel picked at
 * connect time, whatever port src named); a source not on this host
 * fails at once, saying which, with the bind's errno. */
static void test_connect_from(void **state)
{
    (void)state;
    loop_t *l = loop_new();
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(listen(lfd, 4), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sin, &sl), 0);
    struct sockaddr_in src = { .sin_family = AF_INET, .sin_port = htons(1) };
    assert_int_equal(inet_pton(AF_INET, "127.0.0.2", &src.sin_addr), 1);
    peer_t c = { 0 };
    c.st = stream_new(l, on_writer, &c);
    assert_int_equal(stream_connect_from(c.st, (struct sockaddr *)&src, sizeof(src), (struct sockaddr *)&sin,
                                         sizeof(sin)), 0);
    for (int i = 0; i < 100 && c.events[STREAM_EV_CONNECTED] == 0; i++)
        loop_run_once(l, 10);
    assert_int_equal(c.events[STREAM_EV_CONNECTED], 1);
    struct sockaddr_in peer;
    socklen_t pl = sizeof(peer);
    int afd = accept(lfd, (struct sockaddr *)&peer, &pl);
    assert_true(afd >= 0);
    char text[32];
    assert_non_null(inet_ntop(AF_INET, &peer.sin_addr, text, sizeof(text)));
    assert_string_equal(text, "127.0.0.2");
    assert_int_not_equal(ntohs(peer.sin_port), 1);
    assert_int_equal(stream_bind_failed(c.st), 0);
    close(afd);
    stream_free(c.st);

    assert_int_equal(inet_pton(AF_INET, "192.0.2.1", &src.sin_addr), 1);
    peer_t b = { 0 };
    b.st = stream_new(l, on_writer, &b);
    assert_int_equal(stream_connect_from(b.st, (struct sockaddr *)&src, sizeof(src), (struct sockaddr *)&sin,
                                         sizeof(sin)), -1);
    assert_int_equal(stream_bind_failed(b.st), 1);
    assert_int_equal(stream_errno(b.st), EADDRNOTAVAIL);
    assert_string_equal(stream_error(b.st), "source address 192.0.2.1 cannot be bound: Cannot assign requested address");
    assert_int_equal(stream_fd(b.st), -1);
    stream_free(b.st);
    close(lfd);
    assert_int_equal(loop_fd_count(l), 0);
    loop_free(l);
}

/* A reader that parses nothing: it keeps every byte in the stream's input. */
typedef struct hoard {
    int    events[STREAM_EV_LAST];
    size_t seen;      /* input size at the last DATA */
    size_t max_step;  /* most new bytes one DATA brought */
    int    done;
} hoard_t;

static void on_hoard(stream_t *s, stream_event_t ev, void *arg)
{
    hoard_t *h = arg;
    h->events[ev]++;
    if (ev == STREAM_EV_DATA) {
        size_t n = buf_size(stream_input(s));
        if (n - h->seen > h->max_step)
            h->max_step = n - h->seen;
        h->seen = n;
    } else if (ev == STREAM_EV_CLOSED || ev == STREAM_EV_ERROR || ev == STREAM_EV_TIMEOUT) {
        h->done = 1;
    }
}

/* Input reaches the owner one read chunk at a time, and an owner's cap on
 * what it leaves unparsed ends the stream after at most the cap plus one
 * chunk; without a cap of its own a stream keeps the 8 MB default. */
static void test_input_cap_per_chunk(void **state)
{
    loop_t *l = loop_new();
    size_t total = 1024 * 1024, cap = 100000;
    char *data = pattern(total, 3);
    for (int capped = 1; capped >= 0; capped--) {
        int sv[2];
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
        peer_t w;
        memset(&w, 0, sizeof(w));
        hoard_t h;
        memset(&h, 0, sizeof(h));
        w.st = stream_new(l, on_writer, &w);
        stream_t *r = stream_new(l, on_hoard, &h);
        assert_int_equal(stream_attach(w.st, sv[0]), 0);
        assert_int_equal(stream_attach(r, sv[1]), 0);
        if (capped)
            stream_set_max_input(r, cap);
        stream_write(w.st, data, total);
        if (capped) {
            run_until(l, &h.done);
            assert_int_equal(h.events[STREAM_EV_ERROR], 1);
            assert_string_equal(stream_error(r), "peer sent more than 100000 unparsed bytes");
            assert_true(stream_bytes_in(r) > cap);
            assert_true(stream_bytes_in(r) <= cap + 16384);
        } else {
            for (int i = 0; i < 20000 && stream_bytes_in(r) < total; i++)
                assert_true(loop_run_once(l, 100) >= 0);
            assert_int_equal(stream_bytes_in(r), total);
            assert_int_equal(h.events[STREAM_EV_ERROR], 0);
            assert_int_equal(buf_size(stream_input(r)), total);
        }
        assert_true(h.max_step <= 16384); /* one chunk per DATA */
        assert_true((size_t)h.events[STREAM_EV_DATA] >= stream_bytes_in(r) / 16384);
        stream_free(r);
        stream_free(w.st);
    }
    free(data);
    loop_free(l);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as the daemon: a closed peer is an error event */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ref_order_and_not_copied),
        cmocka_unit_test(test_cork),
        cmocka_unit_test(test_free_with_refs_queued),
        cmocka_unit_test(test_ref_over_tls),
        cmocka_unit_test(test_errno),
        cmocka_unit_test(test_connect_from),
        cmocka_unit_test(test_input_cap_per_chunk),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for the DNS caches: the record format, the L1 LRU, IDN, and
 * the resolver's layering (L1 -> L2 -> DNS), TTLs, negative caching
 * (RFC 2308), single flight, CNAME chains and the additional section.
 *
 * Runs the mock DNS server of tests/support/fakedns.h (UDP) and a fake
 * Redis (RESP over TCP, GET/SET in memory) inside the test's own loop.
 * The resolver's clock is moved with dns_resolver_test_advance() so
 * expiry needs no sleeping. Every test ends with the loop empty.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/log.h"
#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "dns/cache.h"
#include "dns/idn.h"
#include "dns/msg.h"
#include "dns/mx.h"
#include "dns/record.h"
#include "dns/resolver.h"
#include "tests/support/fakedns.h"

/* ---- helpers to build records ---- */

static struct sockaddr_storage v4(const char *s)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    sin->sin_family = AF_INET;
    assert_int_equal(inet_pton(AF_INET, s, &sin->sin_addr), 1);
    return ss;
}

static struct sockaddr_storage v6(const char *s)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    sin6->sin6_family = AF_INET6;
    assert_int_equal(inet_pton(AF_INET6, s, &sin6->sin6_addr), 1);
    return ss;
}

static dns_record_t *sample_record(void)
{
    struct sockaddr_storage a1[3] = { v4("192.0.2.1"), v4("192.0.2.11"), v6("2001:db8::1") };
    struct sockaddr_storage a2[1] = { v4("192.0.2.2") };
    dns_mx_host_t hosts[2] = {
        { .name = (char *)"mx2.example", .pref = 20, .addrs = a2, .naddrs = 1 },
        { .name = (char *)"mx1.example", .pref = 10, .addrs = a1, .naddrs = 3 },
    };
    dns_record_t *rec = dns_record_new(DNS_OK, 0, 300, hosts, 2);
    assert_non_null(rec);
    return rec;
}

static void assert_same_record(const dns_record_t *a, const dns_record_t *b)
{
    assert_int_equal(a->status, b->status);
    assert_int_equal(a->implicit, b->implicit);
    assert_int_equal(a->nhosts, b->nhosts);
    for (size_t i = 0; i < a->nhosts; i++) {
        assert_string_equal(a->hosts[i].name, b->hosts[i].name);
        assert_int_equal(a->hosts[i].pref, b->hosts[i].pref);
        assert_int_equal(a->hosts[i].naddrs, b->hosts[i].naddrs);
        for (size_t j = 0; j < a->hosts[i].naddrs; j++) {
            assert_int_equal(a->hosts[i].addrs[j].ss_family, b->hosts[i].addrs[j].ss_family);
            size_t len = a->hosts[i].addrs[j].ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                                                    : sizeof(struct sockaddr_in6);
            assert_memory_equal(&a->hosts[i].addrs[j], &b->hosts[i].addrs[j], len);
        }
    }
}

/* ---- record ---- */

static void test_record_sorted_and_round_trip(void **state)
{
    dns_record_t *rec = sample_record();
    assert_string_equal(rec->hosts[0].name, "mx1.example"); /* stored sorted */
    assert_int_equal(rec->hosts[0].naddrs, 3);

    unsigned char buf[1024];
    size_t n = dns_record_encode(rec, 1000000, buf, sizeof(buf));
    assert_int_equal(n, dns_record_encoded_size(rec));
    assert_true(n < 90); /* compact */
    dns_record_t *back = NULL;
    assert_int_equal(dns_record_decode(buf, n, 1000100, &back), DNS_OK);
    assert_same_record(rec, back);
    assert_int_equal(back->ttl_s, 200); /* what remains */
    dns_record_unref(back);

    /* too small a buffer, and not cacheable statuses, encode nothing */
    assert_int_equal(dns_record_encode(rec, 1000000, buf, n - 1), 0);
    dns_record_t *tf = dns_record_new(DNS_TEMPFAIL, 0, 10, NULL, 0);
    assert_int_equal(dns_record_encode(tf, 1000000, buf, sizeof(buf)), 0);
    dns_record_unref(tf);

    /* negative records, with and without the implicit flag */
    static const int st[3] = { DNS_NXDOMAIN, DNS_NULLMX, DNS_NOADDR };
    for (int i = 0; i < 3; i++) {
        dns_record_t *neg = dns_record_new(st[i], i == 2, 60, NULL, 0);
        size_t m = dns_record_encode(neg, 5000, buf, sizeof(buf));
        assert_int_equal(m, 12);
        assert_int_equal(dns_record_decode(buf, m, 5000, &back), DNS_OK);
        assert_same_record(neg, back);
        assert_int_equal(back->ttl_s, 60);
        dns_record_unref(back);
        dns_record_unref(neg);
    }
    dns_record_unref(rec);
}

static void test_record_rejects_corrupt(void **state)
{
    dns_record_t *rec = sample_record(), *out = (dns_record_t *)1;
    unsigned char good[1024], bad[1024];
    size_t n = dns_record_encode(rec, 1000000, good, sizeof(good));
    dns_record_unref(rec);

    /* every truncation */
    for (size_t len = 0; len < n; len++) {
        assert_int_equal(dns_record_decode(good, len, 1000000, &out), DNS_EBADVALUE);
        assert_null(out);
    }
    /* a trailing byte */
    memcpy(bad, good, n);
    bad[n] = 0;
    assert_int_equal(dns_record_decode(bad, n + 1, 1000000, &out), DNS_EBADVALUE);

    static const struct {
        size_t        off;
        unsigned char val;
    } flips[] = {
        { 0, 2 },    /* version */
        { 1, 5 },    /* TEMPFAIL is never stored */
        { 1, 0x7f }, /* no such status */
        { 2, 2 },    /* unknown flag */
        { 11, 3 },   /* host count says 3: the bytes run out */
        { 11, 0 },   /* OK without hosts */
        { 11, 33 },  /* more than DNS_MAX_HOSTS */
        { 14, 0 },   /* first name length 0 */
        { 14, 200 }, /* first name longer than the value */
        { 15, '-' }, /* first name starts with '-' */
        { 15, '.' }, /* first name starts with an empty label */
        { 26, 0 },   /* IPv4 count 2 -> 0 (then the rest misaligns) */
        { 26, 17 },  /* more than DNS_MAX_ADDRS */
    };
    for (size_t i = 0; i < sizeof(flips) / sizeof(flips[0]); i++) {
        memcpy(bad, good, n);
        assert_true(flips[i].off < n);
        bad[flips[i].off] = flips[i].val;
        int st = dns_record_decode(bad, n, 1000000, &out);
        if (st != DNS_EBADVALUE)
            fail_msg("byte %zu := %u decoded with status %d", flips[i].off, flips[i].val, st);
        assert_null(out);
    }
    /* timestamps: from the future, a TTL of zero, beyond a week, expired */
    memcpy(bad, good, n);
    assert_int_equal(dns_record_decode(bad, n, 1000000 - 301, &out), DNS_EBADVALUE);
    memcpy(bad + 7, "\0\0\0\0", 4);
    assert_int_equal(dns_record_decode(bad, n, 1000000, &out), DNS_EBADVALUE);
    memcpy(bad + 7, "\x00\x09\x3a\x81", 4); /* 604801 */
    assert_int_equal(dns_record_decode(bad, n, 1000000, &out), DNS_EBADVALUE);
    assert_int_equal(dns_record_decode(good, n, 1000300, &out), DNS_EEXPIRED);
    assert_null(out);
    /* random garbage never crashes and never decodes to nonsense */
    for (int round = 0; round < 2000; round++) {
        size_t len = (size_t)(util_rand64() % 64);
        for (size_t k = 0; k < len; k++)
            bad[k] = (unsigned char)util_rand64();
        bad[0] = 1;
        if (dns_record_decode(bad, len, 1000000, &out) == DNS_OK) {
            assert_true(out->status == DNS_OK ? out->nhosts > 0 : out->nhosts == 0);
            dns_record_unref(out);
        }
    }
}

/* ---- L1 ---- */

static void test_cache_lru_and_expiry(void **state)
{
    dns_cache_t *c = dns_cache_new(2);
    dns_record_t *a = dns_record_new(DNS_NXDOMAIN, 0, 10, NULL, 0);
    dns_record_t *b = dns_record_new(DNS_NOADDR, 0, 10, NULL, 0);
    dns_record_t *d = dns_record_new(DNS_NULLMX, 0, 10, NULL, 0);
    uint64_t exp = 0;
    assert_int_equal(dns_cache_put(c, "a.example", a, 1000), DNS_OK);
    assert_int_equal(dns_cache_put(c, "b.example", b, 2000), DNS_OK);
    assert_ptr_equal(dns_cache_get(c, "a.example", 0, &exp), a); /* a is now most recent */
    assert_int_equal(exp, 1000);
    assert_int_equal(dns_cache_put(c, "d.example", d, 3000), DNS_OK); /* evicts b */
    assert_int_equal(dns_cache_size(c), 2);
    assert_int_equal(dns_cache_evictions(c), 1);
    assert_null(dns_cache_get(c, "b.example", 0, NULL));
    assert_ptr_equal(dns_cache_get(c, "d.example", 0, NULL), d);
    assert_ptr_equal(dns_cache_get(c, "a.example", 999, NULL), a);
    /* expiry: at its time the entry is gone */
    assert_null(dns_cache_get(c, "a.example", 1000, NULL));
    assert_int_equal(dns_cache_size(c), 1);
    /* replace keeps one entry and takes the new expiry */
    assert_int_equal(dns_cache_put(c, "d.example", a, 5000), DNS_OK);
    assert_ptr_equal(dns_cache_get(c, "d.example", 4000, &exp), a);
    assert_int_equal(exp, 5000);
    assert_int_equal(dns_cache_size(c), 1);
    /* the cache holds its own references */
    dns_record_unref(a);
    dns_record_unref(b);
    dns_record_unref(d);
    assert_int_equal(dns_cache_get(c, "d.example", 0, NULL)->status, DNS_NXDOMAIN);
    dns_cache_remove(c, "d.example");
    assert_int_equal(dns_cache_size(c), 0);
    dns_cache_free(c);

    /* many keys through a small cache: always bounded, most recent kept */
    c = dns_cache_new(100);
    dns_record_t *r = dns_record_new(DNS_NXDOMAIN, 0, 10, NULL, 0);
    for (int i = 0; i < 1000; i++) {
        char k[32];
        snprintf(k, sizeof(k), "k%d.example", i);
        assert_int_equal(dns_cache_put(c, k, r, 10), DNS_OK);
        assert_true(dns_cache_size(c) <= 100);
    }
    assert_non_null(dns_cache_get(c, "k999.example", 0, NULL));
    assert_non_null(dns_cache_get(c, "k900.example", 0, NULL));
    assert_null(dns_cache_get(c, "k899.example", 0, NULL));
    dns_record_unref(r);
    dns_cache_free(c);
}

/* ---- IDN ---- */

static void test_idn(void **state)
{
    static const struct {
        const char *in, *out;
        int         st;
    } cases[] = {
        { "Example.COM.", "example.com", DNS_OK },
        { "b\xc3\xbc" "cher.example", "xn--bcher-kva.example", DNS_OK },
        { "B\xc3\x9c" "CHER.Example", "xn--bcher-kva.example", DNS_OK }, /* UTS #46 folds case */
        { "\xe4\xbe\x8b\xe3\x81\x88.\xe3\x83\x86\xe3\x82\xb9\xe3\x83\x88", "xn--r8jz45g.xn--zckzah", DNS_OK },
        { "xn--bcher-kva.example", "xn--bcher-kva.example", DNS_OK },
        { "", NULL, DNS_EBADNAME },
        { ".", NULL, DNS_EBADNAME },
        { "a..b", NULL, DNS_EBADNAME },
        { "bad_name.example", NULL, DNS_EBADNAME },
        { "192.0.2.1", NULL, DNS_EBADNAME },
        { "\xff\xfe.example", NULL, DNS_EBADNAME }, /* not UTF-8 */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char out[DNS_NAME_MAX];
        int st = dns_name_normalize(cases[i].in, out);
        if (st != cases[i].st || (st == DNS_OK && strcmp(out, cases[i].out) != 0))
            fail_msg("normalize(\"%s\") = %d \"%s\", want %d \"%s\"", cases[i].in, st,
                     st == DNS_OK ? out : "", cases[i].st, cases[i].out ? cases[i].out : "");
    }
    assert_int_equal(dns_name_normalize(NULL, (char[DNS_NAME_MAX]){ 0 }), DNS_EBADNAME);

    assert_int_equal(dns_addr_needs_smtputf8("\xe7\x94\xa8\xe6\x88\xb7@example.com"), 1);
    assert_int_equal(dns_addr_needs_smtputf8("j\xc3\xb6rg@example.com"), 1);
    assert_int_equal(dns_addr_needs_smtputf8("user@b\xc3\xbc" "cher.example"), 0);
    assert_int_equal(dns_addr_needs_smtputf8("user@example.com"), 0);
    assert_int_equal(dns_addr_needs_smtputf8("\"a@b\"@example.com"), 0);
    assert_int_equal(dns_addr_needs_smtputf8(NULL), 0);
    assert_int_equal(dns_addr_domain_is_utf8("user@b\xc3\xbc" "cher.example"), 1);
    assert_int_equal(dns_addr_domain_is_utf8("j\xc3\xb6rg@example.com"), 0);
    assert_int_equal(dns_addr_domain_is_utf8("no-at-sign"), 0);
}

/* ---- the mock DNS server's zone (tests/support/fakedns.h) ---- */

static const fakedns_rr_t zone[] = {
    { "two.test", T_MX, 0, 300, 10, "mx1.two.test", 0 },
    { "two.test", T_MX, 0, 300, 20, "mx2.two.test", 0 },
    { "mx1.two.test", T_A, 0, 40, 0, "192.0.2.1", 0 },
    { "mx2.two.test", T_A, 0, 300, 0, "192.0.2.2", 0 },
    { "eq.test", T_MX, 0, 300, 10, "a.eq.test", 0 },
    { "eq.test", T_MX, 0, 300, 10, "b.eq.test", 0 },
    { "a.eq.test", T_A, 0, 300, 0, "192.0.2.5", 0 },
    { "b.eq.test", T_A, 0, 300, 0, "192.0.2.6", 0 },
    { "implicit.test", T_A, 0, 120, 0, "192.0.2.9", 0 },
    { "null.test", T_MX, 0, 500, 0, "", 0 },
    { "noaddr.test", T_MX, 0, 300, 10, "gone.noaddr.test", 0 },
    { "fail.test", 0, ns_r_servfail, 0, 0, NULL, 0 },
    { "slow.test", 0, FAKEDNS_DROP, 0, 0, NULL, 0 },
    /* CNAME the server chases (the target's MX in the same answer) */
    { "alias.test", T_CNAME, 0, 50, 0, "two.test", FAKEDNS_CHASE },
    /* CNAME whose target's MX the server leaves out: a second MX query */
    { "lazy.test", T_CNAME, 0, 300, 0, "implicit.test", 0 },
    { "loop1.test", T_CNAME, 0, 300, 0, "loop2.test", 0 },
    { "loop2.test", T_CNAME, 0, 300, 0, "loop1.test", 0 },
    /* MX host behind a CNAME */
    { "cnmx.test", T_MX, 0, 300, 10, "host.cnmx.test", 0 },
    { "host.cnmx.test", T_CNAME, 0, 300, 0, "mx2.two.test", FAKEDNS_CHASE },
    /* additional section with the MX hosts' A records */
    { "add.test", T_MX, 0, 300, 10, "mx1.two.test", FAKEDNS_ADDITIONAL },
    /* IDN */
    { "xn--bcher-kva.test", T_A, 0, 300, 0, "192.0.2.77", 0 },
};

/* ---- fake Redis: GET/SET in memory, optionally silent ---- */

#define KV_MAX 64

typedef struct fredis {
    loop_t *loop;
    int     lfd, cfd;
    unsigned port;
    char    in[65536];
    size_t  nin;
    int     silent;   /* read commands, never answer */
    unsigned ngets, nsets;
    struct {
        char   key[256];
        char   val[4096];
        size_t vlen;
        int    used;
    } kv[KV_MAX];
} fredis_t;

static int fr_find(fredis_t *f, const char *key, int create)
{
    for (int i = 0; i < KV_MAX; i++)
        if (f->kv[i].used && strcmp(f->kv[i].key, key) == 0)
            return i;
    if (!create)
        return -1;
    for (int i = 0; i < KV_MAX; i++)
        if (!f->kv[i].used) {
            f->kv[i].used = 1;
            snprintf(f->kv[i].key, sizeof(f->kv[i].key), "%s", key);
            return i;
        }
    fail_msg("fake redis full");
    return -1;
}

static void fr_send(fredis_t *f, const void *p, size_t n)
{
    if (!f->silent && f->cfd >= 0)
        assert_int_equal(write(f->cfd, p, n), (ssize_t)n);
}

static int fr_one(fredis_t *f)
{
    char *p = f->in, *end = f->in + f->nin;
    char *nl = memchr(p, '\n', (size_t)(end - p));
    if (nl == NULL)
        return 0;
    int argc = atoi(p + 1);
    p = nl + 1;
    const char *args[6];
    size_t lens[6];
    for (int i = 0; i < argc; i++) {
        nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL)
            return 0;
        size_t len = (size_t)atoi(p + 1);
        p = nl + 1;
        if ((size_t)(end - p) < len + 2)
            return 0;
        if (i < 6) {
            args[i] = p;
            lens[i] = len;
        }
        p += len + 2;
    }
    char cmd[16] = "", key[256] = "";
    snprintf(cmd, sizeof(cmd), "%.*s", (int)lens[0], args[0]);
    if (argc > 1)
        snprintf(key, sizeof(key), "%.*s", (int)lens[1], args[1]);
    if (strcasecmp(cmd, "GET") == 0) {
        f->ngets++;
        int i = fr_find(f, key, 0);
        if (i < 0) {
            fr_send(f, "$-1\r\n", 5);
        } else {
            /* one write, as Redis does: separate small writes meet Nagle
             * and delayed ACKs and arrive 40 ms late */
            char out[4200];
            int h = snprintf(out, sizeof(out), "$%zu\r\n", f->kv[i].vlen);
            memcpy(out + h, f->kv[i].val, f->kv[i].vlen);
            memcpy(out + (size_t)h + f->kv[i].vlen, "\r\n", 2);
            fr_send(f, out, (size_t)h + f->kv[i].vlen + 2);
        }
    } else if (strcasecmp(cmd, "SET") == 0) {
        f->nsets++;
        int i = fr_find(f, key, 1);
        assert_true(lens[2] <= sizeof(f->kv[i].val));
        memcpy(f->kv[i].val, args[2], lens[2]);
        f->kv[i].vlen = lens[2];
        fr_send(f, "+OK\r\n", 5);
    } else {
        fr_send(f, "-ERR unknown\r\n", 14);
    }
    size_t used = (size_t)(p - f->in);
    memmove(f->in, p, f->nin - used);
    f->nin -= used;
    return 1;
}

static void fr_on_conn(loop_t *loop, int fd, unsigned events, void *arg)
{
    fredis_t *f = arg;
    ssize_t n = read(fd, f->in + f->nin, sizeof(f->in) - f->nin);
    if (n <= 0) {
        loop_fd_del(loop, fd);
        close(fd);
        f->cfd = -1;
        return;
    }
    f->nin += (size_t)n;
    while (fr_one(f))
        ;
}

static void fr_on_accept(loop_t *loop, int fd, unsigned events, void *arg)
{
    fredis_t *f = arg;
    int c = accept(fd, NULL, NULL);
    if (c < 0)
        return;
    if (f->cfd >= 0) { /* one client at a time is all the tests need */
        close(c);
        return;
    }
    f->cfd = c;
    f->nin = 0;
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    assert_int_equal(loop_fd_add(loop, c, LOOP_READ, fr_on_conn, f), 0);
}

static void fr_start(fredis_t *f, loop_t *loop)
{
    memset(f, 0, sizeof(*f));
    f->loop = loop;
    f->cfd = -1;
    f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof(a);
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(f->lfd, 8), 0);
    getsockname(f->lfd, (struct sockaddr *)&a, &al);
    f->port = ntohs(a.sin_port);
    assert_int_equal(loop_fd_add(loop, f->lfd, LOOP_READ, fr_on_accept, f), 0);
}

static void fr_stop(fredis_t *f)
{
    if (f->cfd >= 0) {
        loop_fd_del(f->loop, f->cfd);
        close(f->cfd);
        f->cfd = -1;
    }
    loop_fd_del(f->loop, f->lfd);
    close(f->lfd);
}

/* ---- the answer parser on hostile input ---- */

/* Parse a copy in a heap block of exactly len bytes, so that ASan and
 * valgrind see any read past the end. */
static int parse_exact(const unsigned char *buf, size_t len, dns_msg_t *msg)
{
    unsigned char *copy = malloc(len ? len : 1);
    memcpy(copy, buf, len);
    int st = dns_msg_parse(copy, (int)len, msg);
    if (st == DNS_OK) {
        uint32_t ttl = UINT32_MAX;
        int hops = 0;
        for (size_t i = 0; i < msg->nrr; i++)
            (void)dns_msg_chase(msg, msg->rr[i].name, &ttl, &hops);
        (void)dns_msg_negative_ttl(msg);
    }
    free(copy);
    return st;
}

static void test_msg_parse_hostile(void **state)
{
    fakedns_t m;
    assert_int_equal(fakedns_init(&m, zone, sizeof(zone) / sizeof(zone[0])), 0);
    m.soa_ttl = 100;
    m.soa_min = 20;
    unsigned char q[512], a[4096], bad[4096];
    static const struct {
        const char *name;
        int         type;
    } qs[] = { { "two.test", T_MX }, { "alias.test", T_MX }, { "add.test", T_MX },
               { "nothere.test", T_MX }, { "host.cnmx.test", T_A } };
    for (size_t i = 0; i < sizeof(qs) / sizeof(qs[0]); i++) {
        size_t qlen = fakedns_query(q, sizeof(q), qs[i].name, qs[i].type);
        size_t alen = fakedns_answer(&m, q, qlen, a, sizeof(a));
        assert_true(alen > 12);
        dns_msg_t msg;
        assert_int_equal(dns_msg_parse(a, (int)alen, &msg), DNS_OK);
        assert_true(msg.nrr > 0);
        dns_msg_free(&msg);
        /* every truncation fails cleanly (or parses what is whole) */
        for (size_t len = 0; len < alen; len++) {
            int st = parse_exact(a, len, &msg);
            assert_true(st == DNS_OK || st == DNS_TEMPFAIL);
            dns_msg_free(&msg);
        }
        /* random corruption: never a crash, never an overread (ASan, valgrind) */
        for (int round = 0; round < 3000; round++) {
            memcpy(bad, a, alen);
            for (int k = 0; k < 3; k++)
                bad[util_rand64() % alen] = (unsigned char)util_rand64();
            int st = parse_exact(bad, alen, &msg);
            assert_true(st == DNS_OK || st == DNS_TEMPFAIL);
            dns_msg_free(&msg);
        }
    }
    /* a message whose counts promise more than it holds */
    size_t qlen = fakedns_query(q, sizeof(q), "two.test", T_MX);
    memcpy(bad, q, qlen);
    bad[6] = 0xff; /* ANCOUNT 65535 */
    bad[7] = 0xff;
    dns_msg_t msg;
    assert_int_equal(parse_exact(bad, qlen, &msg), DNS_TEMPFAIL);
    dns_msg_free(&msg);
    /* a CNAME loop inside one answer stops */
    dns_rr_t rr[2] = { { .section = DNS_SEC_ANSWER, .type = T_CNAME, .ttl = 5, .name = "x.test", .target = "y.test" },
                       { .section = DNS_SEC_ANSWER, .type = T_CNAME, .ttl = 9, .name = "y.test", .target = "x.test" } };
    dns_msg_t loopmsg = { .rcode = 0, .nrr = 2, .rr = rr };
    uint32_t ttl = UINT32_MAX;
    int hops = 0;
    dns_msg_chase(&loopmsg, "x.test", &ttl, &hops);
    assert_true(hops > DNS_MAX_CNAME);
    assert_int_equal(ttl, 5);
}

/* ---- fixture ---- */

typedef struct got {
    int      calls;
    int      status, implicit, layer;
    unsigned ttl;
    char     name[256];
    char     text[1024];
} got_t;

static void on_result(void *arg, const dns_mx_result_t *res)
{
    got_t *g = arg;
    g->calls++;
    g->status = res->status;
    g->implicit = res->implicit;
    g->layer = res->layer;
    g->ttl = res->ttl_s;
    snprintf(g->name, sizeof(g->name), "%s", res->name ? res->name : "(null)");
    g->text[0] = '\0';
    for (size_t i = 0; i < res->nhosts; i++) {
        const dns_mx_host_t *h = &res->hosts[i];
        size_t len = strlen(g->text);
        snprintf(g->text + len, sizeof(g->text) - len, "%s%u %s", i ? "; " : "", h->pref, h->name);
        for (size_t j = 0; j < h->naddrs; j++) {
            char a[INET6_ADDRSTRLEN];
            if (h->addrs[j].ss_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)&h->addrs[j])->sin_addr, a, sizeof(a));
            else
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&h->addrs[j])->sin6_addr, a, sizeof(a));
            len = strlen(g->text);
            snprintf(g->text + len, sizeof(g->text) - len, " %s", a);
        }
    }
}

typedef struct fx {
    loop_t         *loop;
    fakedns_t       mock;
    fredis_t        redis;
    int             with_redis;
    rclient_t      *rc;
    dns_resolver_t *r;
    long            l1_gauge;
    unsigned        ev_lookups[DNS_LAYER_LAST];
    unsigned        ev_l2_errors;
} fx_t;

static void on_event(void *arg, const dns_event_t *ev)
{
    fx_t *f = arg;
    if (ev->kind == DNS_EV_LOOKUP)
        f->ev_lookups[ev->layer]++;
    else if (ev->kind == DNS_EV_L1_SIZE)
        f->l1_gauge += ev->l1_delta;
    else if (ev->kind == DNS_EV_L2_ERROR)
        f->ev_l2_errors++;
}

static dns_resolver_t *fx_resolver(fx_t *f, unsigned l1, unsigned max_ttl, unsigned neg_ttl)
{
    char err[256] = "";
    dns_config_t cfg = { .servers = f->mock.addr, .timeout_ms = 200, .tries = 1, .l1_entries = l1,
                         .max_ttl_s = max_ttl, .negative_ttl_s = neg_ttl, .redis = f->rc,
                         .on_event = on_event, .event_arg = f };
    dns_resolver_t *r = dns_resolver_new(f->loop, &cfg, err, sizeof(err));
    if (r == NULL)
        fail_msg("dns_resolver_new: %s", err);
    return r;
}

static void run_until(loop_t *loop, const int *flag, uint64_t ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (!*flag && util_mono_ms() < end)
        assert_true(loop_run_once(loop, 20) >= 0);
}

static void run_ms(loop_t *loop, uint64_t ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (util_mono_ms() < end)
        assert_true(loop_run_once(loop, 10) >= 0);
}

static void fx_setup_common(fx_t *f, int with_redis)
{
    memset(f, 0, sizeof(*f));
    f->loop = loop_new();
    assert_int_equal(fakedns_start(&f->mock, f->loop, zone, sizeof(zone) / sizeof(zone[0])), 0);
    f->with_redis = with_redis;
    if (with_redis) {
        fr_start(&f->redis, f->loop);
        rclient_config_t rc = { .host = "127.0.0.1", .port = f->redis.port, .timeout_ms = 30,
                                .reconnect_max_ms = 100 };
        f->rc = rclient_new(f->loop, &rc);
        uint64_t end = util_mono_ms() + 2000;
        while (!rclient_connected(f->rc) && util_mono_ms() < end)
            loop_run_once(f->loop, 10);
        assert_true(rclient_connected(f->rc));
    }
}

static int setup(void **state)
{
    fx_t *f = calloc(1, sizeof(*f));
    fx_setup_common(f, 0);
    f->r = fx_resolver(f, 100, 3600, 900);
    *state = f;
    return 0;
}

static int setup_redis(void **state)
{
    fx_t *f = calloc(1, sizeof(*f));
    fx_setup_common(f, 1);
    f->r = fx_resolver(f, 100, 3600, 900);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx_t *f = *state;
    dns_resolver_free(f->r);
    assert_int_equal(f->l1_gauge, 0); /* the gauge went back to zero */
    rclient_free(f->rc);
    if (f->with_redis)
        fr_stop(&f->redis);
    fakedns_stop(&f->mock);
    assert_int_equal(loop_fd_count(f->loop), 0);
    assert_int_equal(loop_timer_count(f->loop), 0);
    loop_free(f->loop);
    free(f);
    return 0;
}

static got_t ask(fx_t *f, const char *domain)
{
    got_t g;
    memset(&g, 0, sizeof(g));
    assert_true(dns_mx_query(f->r, domain, on_result, &g) != 0);
    assert_int_equal(g.calls, 0);
    run_until(f->loop, &g.calls, 3000);
    assert_int_equal(g.calls, 1);
    return g;
}

/* ---- resolver: layers and lifetimes ---- */

static void test_l1_hit_and_ttl(void **state)
{
    fx_t *f = *state;
    got_t g = ask(f, "two.test");
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_string_equal(g.text, "10 mx1.two.test 192.0.2.1; 20 mx2.two.test 192.0.2.2");
    assert_int_equal(g.ttl, 40); /* the smallest TTL: mx1's A record */
    unsigned wire = f->mock.nqueries;

    g = ask(f, "TWO.test.");
    assert_int_equal(g.layer, DNS_LAYER_L1);
    assert_string_equal(g.name, "two.test");
    assert_string_equal(g.text, "10 mx1.two.test 192.0.2.1; 20 mx2.two.test 192.0.2.2");
    assert_true(g.ttl <= 40 && g.ttl >= 39);
    assert_int_equal(f->mock.nqueries, wire);

    dns_resolver_test_advance(f->r, 30000);
    g = ask(f, "two.test");
    assert_int_equal(g.layer, DNS_LAYER_L1);
    assert_true(g.ttl <= 10 && g.ttl >= 9);

    dns_resolver_test_advance(f->r, 10000); /* 40 s: expired */
    g = ask(f, "two.test");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_int_equal(f->mock.nqueries, 2 * wire);
    assert_int_equal(f->ev_lookups[DNS_LAYER_L1], 2);
    assert_int_equal(f->ev_lookups[DNS_LAYER_DNS], 2);
    assert_int_equal(f->l1_gauge, 1);
}

static void test_max_ttl_cap(void **state)
{
    fx_t *f = *state;
    dns_resolver_free(f->r);
    f->r = fx_resolver(f, 100, 5, 900);
    got_t g = ask(f, "implicit.test"); /* TTL 120, NODATA for MX without SOA */
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.implicit, 1);
    assert_int_equal(g.ttl, 5);
    dns_resolver_test_advance(f->r, 4000);
    assert_int_equal(ask(f, "implicit.test").layer, DNS_LAYER_L1);
    dns_resolver_test_advance(f->r, 1000);
    assert_int_equal(ask(f, "implicit.test").layer, DNS_LAYER_DNS);
}

static void test_negative_caching(void **state)
{
    fx_t *f = *state;
    /* NXDOMAIN with an SOA: min(SOA TTL, MINIMUM) = 20 */
    f->mock.soa_ttl = 100;
    f->mock.soa_min = 20;
    got_t g = ask(f, "nothere.test");
    assert_int_equal(g.status, DNS_NXDOMAIN);
    assert_int_equal(g.ttl, 20);
    unsigned wire = f->mock.nqueries;
    g = ask(f, "nothere.test");
    assert_int_equal(g.layer, DNS_LAYER_L1);
    assert_int_equal(g.status, DNS_NXDOMAIN);
    assert_int_equal(f->mock.nqueries, wire);
    dns_resolver_test_advance(f->r, 20000);
    assert_int_equal(ask(f, "nothere.test").layer, DNS_LAYER_DNS);

    /* SOA TTL below MINIMUM wins */
    f->mock.soa_ttl = 7;
    assert_int_equal(ask(f, "gone1.test").ttl, 7);
    /* no SOA: the fallback, 60 s */
    f->mock.soa_ttl = -1;
    assert_int_equal(ask(f, "gone2.test").ttl, 60);
    /* NOADDR: the MX exists, its host does not */
    f->mock.soa_ttl = 100;
    f->mock.soa_min = 30;
    g = ask(f, "noaddr.test");
    assert_int_equal(g.status, DNS_NOADDR);
    assert_int_equal(g.ttl, 30);
    assert_int_equal(ask(f, "noaddr.test").layer, DNS_LAYER_L1);
    /* null MX lives as its record does */
    g = ask(f, "null.test");
    assert_int_equal(g.status, DNS_NULLMX);
    assert_int_equal(g.ttl, 500);
    assert_int_equal(ask(f, "null.test").status, DNS_NULLMX);

    /* the cap */
    dns_resolver_free(f->r);
    f->r = fx_resolver(f, 100, 3600, 10);
    f->mock.soa_ttl = 3600;
    f->mock.soa_min = 3600;
    assert_int_equal(ask(f, "capped.test").ttl, 10);
    dns_resolver_test_advance(f->r, 10000);
    assert_int_equal(ask(f, "capped.test").layer, DNS_LAYER_DNS);
}

static void test_transient_not_cached(void **state)
{
    fx_t *f = *state;
    got_t g = ask(f, "fail.test");
    assert_int_equal(g.status, DNS_TEMPFAIL);
    assert_int_equal(g.ttl, 0);
    g = ask(f, "fail.test");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    g = ask(f, "slow.test");
    assert_int_equal(g.status, DNS_TIMEOUT);
    assert_int_equal(ask(f, "slow.test").layer, DNS_LAYER_DNS);
    g = ask(f, "bad..name");
    assert_int_equal(g.status, DNS_EBADNAME);
    assert_int_equal(g.layer, DNS_LAYER_NONE);
    assert_string_equal(g.name, "(null)");
}

static void test_lru_eviction(void **state)
{
    fx_t *f = *state;
    dns_resolver_free(f->r);
    f->r = fx_resolver(f, 2, 3600, 900);
    ask(f, "two.test");
    ask(f, "implicit.test");
    assert_int_equal(ask(f, "two.test").layer, DNS_LAYER_L1); /* two.test most recent */
    ask(f, "null.test");                                      /* evicts implicit.test */
    dns_stats_t st;
    dns_resolver_stats(f->r, &st);
    assert_int_equal(st.l1_size, 2);
    assert_int_equal(st.l1_evictions, 1);
    assert_int_equal(f->l1_gauge, 2);
    assert_int_equal(ask(f, "two.test").layer, DNS_LAYER_L1);
    assert_int_equal(ask(f, "null.test").layer, DNS_LAYER_L1);
    assert_int_equal(ask(f, "implicit.test").layer, DNS_LAYER_DNS);
}

static void test_single_flight(void **state)
{
    fx_t *f = *state;
    enum { N = 50 };
    got_t g[N];
    uint64_t ids[N];
    memset(g, 0, sizeof(g));
    for (int i = 0; i < N; i++)
        ids[i] = dns_mx_query(f->r, i % 2 ? "two.test" : "Two.Test", on_result, &g[i]);
    dns_cancel(f->r, ids[7]); /* one waiter leaves; the rest still get the answer */
    run_until(f->loop, &g[N - 1].calls, 3000);
    run_ms(f->loop, 20);
    for (int i = 0; i < N; i++) {
        assert_int_equal(g[i].calls, i == 7 ? 0 : 1);
        if (i != 7) {
            assert_int_equal(g[i].status, DNS_OK);
            assert_int_equal(g[i].layer, DNS_LAYER_DNS);
        }
    }
    /* one MX query, and A + AAAA for each of the two hosts */
    assert_int_equal(f->mock.nmx, 1);
    assert_int_equal(f->mock.nqueries, 5);
    dns_stats_t st;
    dns_resolver_stats(f->r, &st);
    assert_int_equal(st.coalesced, N - 1);

    /* a flight whose every waiter cancelled still fills the cache */
    got_t lone = { 0 };
    uint64_t id = dns_mx_query(f->r, "implicit.test", on_result, &lone);
    dns_cancel(f->r, id);
    run_ms(f->loop, 100);
    assert_int_equal(lone.calls, 0);
    assert_int_equal(ask(f, "implicit.test").layer, DNS_LAYER_L1);
}

static void test_equal_preference_shuffled_from_cache(void **state)
{
    fx_t *f = *state;
    int ab = 0, ba = 0;
    for (int i = 0; i < 40; i++) {
        got_t g = ask(f, "eq.test");
        assert_int_equal(g.layer, i == 0 ? DNS_LAYER_DNS : DNS_LAYER_L1);
        if (strcmp(g.text, "10 a.eq.test 192.0.2.5; 10 b.eq.test 192.0.2.6") == 0)
            ab++;
        else if (strcmp(g.text, "10 b.eq.test 192.0.2.6; 10 a.eq.test 192.0.2.5") == 0)
            ba++;
        else
            fail_msg("unexpected \"%s\"", g.text);
    }
    assert_true(ab > 0 && ba > 0);
}

static void test_cname_chains(void **state)
{
    fx_t *f = *state;
    /* the server chased it: one MX query */
    got_t g = ask(f, "alias.test");
    assert_int_equal(g.status, DNS_OK);
    assert_string_equal(g.text, "10 mx1.two.test 192.0.2.1; 20 mx2.two.test 192.0.2.2");
    assert_int_equal(g.ttl, 40);
    assert_string_equal(g.name, "alias.test");
    assert_int_equal(f->mock.nmx, 1);
    /* it did not: a second MX query for the target, which has none */
    g = ask(f, "lazy.test");
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.implicit, 1);
    assert_string_equal(g.text, "0 implicit.test 192.0.2.9");
    assert_int_equal(f->mock.nmx, 3);
    /* a loop ends, transiently */
    g = ask(f, "loop1.test");
    assert_int_equal(g.status, DNS_TEMPFAIL);
    /* an MX host behind a CNAME */
    g = ask(f, "cnmx.test");
    assert_int_equal(g.status, DNS_OK);
    assert_string_equal(g.text, "10 host.cnmx.test 192.0.2.2");
}

static void test_additional_section(void **state)
{
    fx_t *f = *state;
    got_t g = ask(f, "add.test");
    assert_int_equal(g.status, DNS_OK);
    assert_string_equal(g.text, "10 mx1.two.test 192.0.2.1");
    /* MX and AAAA: the A record came in the additional section */
    assert_int_equal(f->mock.nmx, 1);
    assert_int_equal(f->mock.na, 0);
    assert_int_equal(f->mock.nqueries, 2);
    dns_stats_t st;
    dns_resolver_stats(f->r, &st);
    assert_int_equal(st.additional, 1);
}

static void test_idn_lookup(void **state)
{
    fx_t *f = *state;
    got_t g = ask(f, "B\xc3\xbc" "cher.test");
    assert_int_equal(g.status, DNS_OK);
    assert_string_equal(g.name, "xn--bcher-kva.test");
    assert_string_equal(g.text, "0 xn--bcher-kva.test 192.0.2.77");
    g = ask(f, "xn--bcher-kva.test");
    assert_int_equal(g.layer, DNS_LAYER_L1); /* same key */
}

/* ---- L2 ---- */

static void test_l2_shared_by_two_resolvers(void **state)
{
    fx_t *f = *state;
    got_t g = ask(f, "two.test");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    run_ms(f->loop, 30); /* the SET reaches the fake */
    assert_int_equal(f->redis.nsets, 1);
    unsigned wire = f->mock.nqueries;

    /* a second worker: its L1 is empty, L2 answers */
    dns_resolver_t *other = f->r;
    f->r = fx_resolver(f, 100, 3600, 900);
    g = ask(f, "two.test");
    assert_int_equal(g.layer, DNS_LAYER_L2);
    assert_int_equal(g.status, DNS_OK);
    assert_string_equal(g.text, "10 mx1.two.test 192.0.2.1; 20 mx2.two.test 192.0.2.2");
    assert_true(g.ttl >= 39 && g.ttl <= 40);
    assert_int_equal(f->mock.nqueries, wire);
    /* and now from its own L1 */
    assert_int_equal(ask(f, "two.test").layer, DNS_LAYER_L1);
    /* negative answers are shared too */
    assert_int_equal(ask(f, "nothere.test").layer, DNS_LAYER_DNS);
    run_ms(f->loop, 30);
    dns_resolver_t *third = f->r;
    f->r = other;
    g = ask(f, "nothere.test");
    assert_int_equal(g.layer, DNS_LAYER_L2);
    assert_int_equal(g.status, DNS_NXDOMAIN);
    dns_stats_t st;
    dns_resolver_stats(f->r, &st);
    assert_int_equal(st.l2_hits, 1);
    dns_resolver_free(third);
}

static void test_l2_corrupt_value_falls_through(void **state)
{
    fx_t *f = *state;
    int i = fr_find(&f->redis, "mp:dns:1:two.test", 1);
    memcpy(f->redis.kv[i].val, "\x01garbage", 8);
    f->redis.kv[i].vlen = 8;
    got_t g = ask(f, "two.test");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(f->ev_l2_errors, 1);
    run_ms(f->loop, 30);
    assert_true(f->redis.kv[i].vlen > 8); /* overwritten with a good value */
    dns_record_t *rec = NULL;
    assert_int_equal(dns_record_decode((unsigned char *)f->redis.kv[i].val, f->redis.kv[i].vlen,
                                       util_wall_ms() / 1000, &rec), DNS_OK);
    assert_int_equal(rec->nhosts, 2);
    dns_record_unref(rec);
}

static void test_l2_slow_falls_through(void **state)
{
    fx_t *f = *state;
    f->redis.silent = 1; /* Redis accepts commands and never answers */
    uint64_t t0 = util_mono_ms();
    got_t g = ask(f, "two.test");
    uint64_t took = util_mono_ms() - t0;
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_int_equal(g.status, DNS_OK);
    assert_true(took >= 25 && took < 200); /* the 30 ms rclient timeout, then DNS */
    assert_int_equal(f->ev_l2_errors, 1);
    run_ms(f->loop, 60); /* the SET times out too */
    assert_int_equal(f->ev_l2_errors, 2);
}

static void test_l2_down_goes_to_dns(void **state)
{
    fx_t *f = *state;
    fr_stop(&f->redis);
    run_ms(f->loop, 20);
    assert_false(rclient_connected(f->rc));
    uint64_t t0 = util_mono_ms();
    got_t g = ask(f, "two.test");
    assert_int_equal(g.layer, DNS_LAYER_DNS);
    assert_true(util_mono_ms() - t0 < 100);
    dns_stats_t st;
    dns_resolver_stats(f->r, &st);
    assert_int_equal(st.l2_gets, 0); /* not even tried */
    fr_start(&f->redis, f->loop);    /* teardown closes it; a new port nobody uses */
}

static void test_free_with_l2_read_outstanding(void **state)
{
    fx_t *f = *state;
    f->redis.silent = 1;
    got_t g[3];
    memset(g, 0, sizeof(g));
    dns_mx_query(f->r, "two.test", on_result, &g[0]);
    dns_mx_query(f->r, "two.test", on_result, &g[1]);
    dns_mx_query(f->r, "null.test", on_result, &g[2]);
    run_ms(f->loop, 5);
    dns_resolver_free(f->r);
    f->r = NULL;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(g[i].calls, 1);
        assert_int_equal(g[i].status, DNS_ECANCELLED);
    }
    run_ms(f->loop, 60); /* the rclient timeouts would fire here: cancelled */
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    if (getenv("DNS_DEBUG") != NULL) /* DNS_DEBUG=1 traces resolver and Redis client */
        log_setup(LOG_DEBUG, LOG_FMT_LOGFMT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_record_sorted_and_round_trip),
        cmocka_unit_test(test_record_rejects_corrupt),
        cmocka_unit_test(test_cache_lru_and_expiry),
        cmocka_unit_test(test_idn),
        cmocka_unit_test(test_msg_parse_hostile),
        cmocka_unit_test_setup_teardown(test_l1_hit_and_ttl, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_ttl_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_negative_caching, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transient_not_cached, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lru_eviction, setup, teardown),
        cmocka_unit_test_setup_teardown(test_single_flight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_equal_preference_shuffled_from_cache, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cname_chains, setup, teardown),
        cmocka_unit_test_setup_teardown(test_additional_section, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idn_lookup, setup, teardown),
        cmocka_unit_test_setup_teardown(test_l2_shared_by_two_resolvers, setup_redis, teardown),
        cmocka_unit_test_setup_teardown(test_l2_corrupt_value_falls_through, setup_redis, teardown),
        cmocka_unit_test_setup_teardown(test_l2_slow_falls_through, setup_redis, teardown),
        cmocka_unit_test_setup_teardown(test_l2_down_goes_to_dns, setup_redis, teardown),
        cmocka_unit_test_setup_teardown(test_free_with_l2_read_outstanding, setup_redis, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

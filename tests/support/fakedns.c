/*
 * SUMMARY
 *  tests/support/fakedns.c - a fake DNS server on the test's loop.
 * DESCRIPTION
 *  One UDP socket; each datagram is read, answered from the zone table by
 *  fakedns_answer() and sent back at once, all inside the loop's read
 *  callback. The answer is built in sections: the CNAME chain (as far as
 *  the zone lets the server chase it), the records of the type asked for,
 *  the SOA of a negative answer, then the additional records.
 * DIAGNOSTICS
 *  A malformed zone row fails fakedns_init() and is named on stderr. An
 *  answer that does not fit its buffer aborts: the zone is too big for a
 *  unit test.
 */
#include "tests/support/fakedns.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define FAKEDNS_MAX_HOPS 4

/* An output buffer; full is set, and nothing more written, once it would
 * overflow. */
typedef struct wbuf {
    unsigned char *p;
    size_t         len, size;
    int            full;
} wbuf_t;

static void put_bytes(wbuf_t *w, const void *src, size_t n)
{
    if (w->full || n > w->size - w->len) {
        w->full = 1;
        return;
    }
    memcpy(w->p + w->len, src, n);
    w->len += n;
}

static void put16(wbuf_t *w, unsigned v)
{
    unsigned char b[2] = { (unsigned char)(v >> 8), (unsigned char)v };
    put_bytes(w, b, 2);
}

static void put32(wbuf_t *w, unsigned v)
{
    put16(w, v >> 16);
    put16(w, v & 0xffff);
}

/* Overwrite the 16 bits at off, already written. */
static void patch16(wbuf_t *w, size_t off, unsigned v)
{
    if (w->full)
        return;
    w->p[off] = (unsigned char)(v >> 8);
    w->p[off + 1] = (unsigned char)v;
}

/* The length of name in wire form, or 0 when it has an empty or too long
 * label or is too long as a whole. "" is the root. */
static size_t name_wire_len(const char *name)
{
    size_t total = 1;
    while (*name) {
        const char *dot = strchr(name, '.');
        size_t len = dot ? (size_t)(dot - name) : strlen(name);
        if (len == 0 || len > 63)
            return 0;
        total += 1 + len;
        name += len + (dot ? 1 : 0);
    }
    return total <= NS_MAXCDNAME ? total : 0;
}

/* Uncompressed; the name was checked by name_wire_len(). */
static void put_name(wbuf_t *w, const char *name)
{
    while (*name) {
        const char *dot = strchr(name, '.');
        size_t len = dot ? (size_t)(dot - name) : strlen(name);
        unsigned char l = (unsigned char)len;
        put_bytes(w, &l, 1);
        put_bytes(w, name, len);
        name += len + (dot ? 1 : 0);
    }
    put_bytes(w, "", 1);
}

/* One resource record; qname is the question's name, at offset 12. */
static void put_rr(wbuf_t *w, const fakedns_rr_t *rr, const char *qname)
{
    if (strcasecmp(rr->name, qname) == 0)
        put16(w, 0xc000 | NS_HFIXEDSZ);
    else
        put_name(w, rr->name);
    put16(w, (unsigned)rr->type);
    put16(w, ns_c_in);
    put32(w, rr->ttl);
    size_t rdlen_at = w->len;
    put16(w, 0);
    size_t rd = w->len;
    if (rr->type == T_MX) {
        put16(w, rr->pref);
        put_name(w, rr->data);
    } else if (rr->type == T_CNAME) {
        put_name(w, rr->data);
    } else if (rr->type == T_A || rr->type == T_AAAA) {
        unsigned char addr[16];
        int v6 = rr->type == T_AAAA;
        inet_pton(v6 ? AF_INET6 : AF_INET, rr->data, addr); /* checked by fakedns_init() */
        put_bytes(w, addr, v6 ? 16 : 4);
    } else { /* T_TXT: one character-string */
        size_t len = rr->data ? strlen(rr->data) : 0;
        unsigned char l = (unsigned char)len;
        put_bytes(w, &l, 1);
        put_bytes(w, rr->data ? rr->data : "", len);
    }
    patch16(w, rdlen_at, (unsigned)(w->len - rd));
}

static void put_soa(wbuf_t *w, unsigned ttl, unsigned minimum)
{
    put_name(w, "test");
    put16(w, T_SOA);
    put16(w, ns_c_in);
    put32(w, ttl);
    size_t rdlen_at = w->len;
    put16(w, 0);
    size_t rd = w->len;
    put_name(w, "ns.test");
    put_name(w, "hostmaster.test");
    put32(w, 1);     /* serial */
    put32(w, 3600);  /* refresh */
    put32(w, 600);   /* retry */
    put32(w, 86400); /* expire */
    put32(w, minimum);
    patch16(w, rdlen_at, (unsigned)(w->len - rd));
}

static int zone_has(const fakedns_t *d, const char *name)
{
    for (size_t i = 0; i < d->nzone; i++)
        if (strcasecmp(d->zone[i].name, name) == 0)
            return 1;
    return 0;
}

static const fakedns_rr_t *zone_cname(const fakedns_t *d, const char *name)
{
    for (size_t i = 0; i < d->nzone; i++)
        if (d->zone[i].type == T_CNAME && strcasecmp(d->zone[i].name, name) == 0)
            return &d->zone[i];
    return NULL;
}

/* Every row of type at name goes to w; returns how many. */
static unsigned put_rrset(wbuf_t *w, const fakedns_t *d, const char *name, int type, const char *qname)
{
    unsigned n = 0;
    for (size_t i = 0; i < d->nzone; i++)
        if (d->zone[i].type == type && strcasecmp(d->zone[i].name, name) == 0) {
            put_rr(w, &d->zone[i], qname);
            n++;
        }
    return n;
}

static int row_ok(const fakedns_rr_t *rr)
{
    unsigned char addr[16];
    if (rr->name == NULL || name_wire_len(rr->name) == 0)
        return 0;
    switch (rr->type) {
    case 0:
        return rr->rcode != ns_r_noerror && rr->flags == 0;
    case T_MX:
        return rr->data && name_wire_len(rr->data) > 0 && rr->pref <= 0xffff &&
               (rr->flags & ~FAKEDNS_ADDITIONAL) == 0;
    case T_CNAME:
        return rr->data && rr->data[0] && name_wire_len(rr->data) > 0 && (rr->flags & ~FAKEDNS_CHASE) == 0;
    case T_A:
        return rr->data && inet_pton(AF_INET, rr->data, addr) == 1 && rr->flags == 0;
    case T_AAAA:
        return rr->data && inet_pton(AF_INET6, rr->data, addr) == 1 && rr->flags == 0;
    case T_TXT:
        return (rr->data == NULL || strlen(rr->data) <= 255) && rr->flags == 0;
    default:
        return 0;
    }
}

int fakedns_init(fakedns_t *d, const fakedns_rr_t *zone, size_t nzone)
{
    memset(d, 0, sizeof(*d));
    d->fd = -1;
    d->soa_ttl = -1;
    for (size_t i = 0; i < nzone; i++)
        if (!row_ok(&zone[i])) {
            fprintf(stderr, "fakedns: zone row %zu (%s, type %d) is malformed\n", i,
                    zone[i].name ? zone[i].name : "(null)", zone[i].type);
            return -1;
        }
    d->zone = zone;
    d->nzone = nzone;
    return 0;
}

size_t fakedns_answer(fakedns_t *d, const unsigned char *q, size_t qlen, unsigned char *a, size_t asize)
{
    char qname[NS_MAXDNAME];
    size_t nl = 0, off = NS_HFIXEDSZ;
    if (qlen < NS_HFIXEDSZ)
        return 0;
    while (off < qlen && q[off] != 0) {
        size_t len = q[off++];
        if (len > 63 || off + len > qlen || nl + len + 1 >= sizeof(qname))
            return 0;
        if (nl > 0)
            qname[nl++] = '.';
        memcpy(qname + nl, q + off, len);
        nl += len;
        off += len;
    }
    qname[nl] = '\0';
    off++;
    if (off + 4 > qlen)
        return 0;
    int qtype = q[off] << 8 | q[off + 1];
    off += 4; /* type and class */
    if (qtype == T_MX)
        d->nmx++;
    if (qtype == T_A)
        d->na++;

    int rcode = ns_r_noerror;
    for (size_t i = 0; i < d->nzone; i++) {
        if (d->zone[i].type != 0 || strcasecmp(d->zone[i].name, qname) != 0)
            continue;
        if (d->zone[i].rcode == FAKEDNS_DROP)
            return 0;
        rcode = d->zone[i].rcode;
    }
    if (rcode == ns_r_noerror && !zone_has(d, qname))
        rcode = ns_r_nxdomain;

    wbuf_t w = { .p = a, .size = asize };
    put_bytes(&w, q, off); /* header and question */
    patch16(&w, 2, (0x84u | (q[2] & 0x01u)) << 8 | 0x80u | (unsigned)rcode); /* QR AA (RD) RA */
    patch16(&w, 6, 0);
    patch16(&w, 8, 0);
    patch16(&w, 10, 0);

    unsigned an = 0, ns = 0, ar = 0;
    char cur[NS_MAXDNAME];
    snprintf(cur, sizeof(cur), "%s", qname);
    for (int hop = 0; rcode == ns_r_noerror && qtype != T_CNAME && hop < FAKEDNS_MAX_HOPS; hop++) {
        const fakedns_rr_t *cn = zone_cname(d, cur);
        if (cn == NULL)
            break;
        put_rr(&w, cn, qname);
        an++;
        if (!(cn->flags & FAKEDNS_CHASE)) {
            cur[0] = '\0'; /* the answer stops at the CNAME */
            break;
        }
        snprintf(cur, sizeof(cur), "%s", cn->data);
    }
    if (rcode == ns_r_noerror && cur[0])
        an += put_rrset(&w, d, cur, qtype, qname);

    if ((rcode == ns_r_nxdomain || (rcode == ns_r_noerror && an == 0)) && d->soa_ttl >= 0) {
        put_soa(&w, (unsigned)d->soa_ttl, (unsigned)d->soa_min);
        ns++;
    }

    for (size_t i = 0; rcode == ns_r_noerror && qtype == T_MX && i < d->nzone; i++) {
        const fakedns_rr_t *mx = &d->zone[i];
        if (mx->type != T_MX || !(mx->flags & FAKEDNS_ADDITIONAL) || strcasecmp(mx->name, qname) != 0)
            continue;
        ar += put_rrset(&w, d, mx->data, T_A, qname);
        ar += put_rrset(&w, d, mx->data, T_AAAA, qname);
    }

    patch16(&w, 6, an);
    patch16(&w, 8, ns);
    patch16(&w, 10, ar);
    if (w.full) {
        fprintf(stderr, "fakedns: the answer for %s type %d does not fit %zu bytes\n", qname, qtype, asize);
        abort();
    }
    return w.len;
}

size_t fakedns_query(unsigned char *q, size_t qsize, const char *name, int type)
{
    static const unsigned char header[NS_HFIXEDSZ] = { 0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 };
    if (name == NULL || name_wire_len(name) == 0)
        return 0;
    wbuf_t w = { .p = q, .size = qsize };
    put_bytes(&w, header, sizeof(header));
    put_name(&w, name);
    put16(&w, (unsigned)type);
    put16(&w, ns_c_in);
    return w.full ? 0 : w.len;
}

static void fakedns_on_read(loop_t *loop, int fd, unsigned events, void *arg)
{
    fakedns_t *d = arg;
    for (;;) {
        unsigned char q[512], a[4096];
        struct sockaddr_storage from;
        socklen_t fromlen = sizeof(from);
        ssize_t n = recvfrom(fd, q, sizeof(q), 0, (struct sockaddr *)&from, &fromlen);
        if (n < 0)
            return;
        d->nqueries++;
        size_t alen = fakedns_answer(d, q, (size_t)n, a, sizeof(a));
        if (alen > 0)
            sendto(fd, a, alen, 0, (struct sockaddr *)&from, fromlen);
    }
}

int fakedns_start(fakedns_t *d, loop_t *loop, const fakedns_rr_t *zone, size_t nzone)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(sin);
    if (fakedns_init(d, zone, nzone) < 0) {
        errno = EINVAL;
        return -1;
    }
    d->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (d->fd < 0)
        return -1;
    if (bind(d->fd, (struct sockaddr *)&sin, sizeof(sin)) < 0 ||
        getsockname(d->fd, (struct sockaddr *)&sin, &len) < 0 ||
        loop_fd_add(loop, d->fd, LOOP_READ, fakedns_on_read, d) < 0) {
        int saved = errno;
        close(d->fd);
        d->fd = -1;
        errno = saved;
        return -1;
    }
    d->loop = loop;
    d->port = ntohs(sin.sin_port);
    snprintf(d->addr, sizeof(d->addr), "127.0.0.1:%u", (unsigned)d->port);
    return 0;
}

void fakedns_stop(fakedns_t *d)
{
    if (d->fd < 0)
        return;
    loop_fd_del(d->loop, d->fd);
    close(d->fd);
    d->fd = -1;
}

/*
 * SUMMARY
 *  dns/record.c - cached answers: build, share, (de)serialise.
 * DESCRIPTION
 *  A record is laid out as [dns_record_t][hosts][addresses][names] in one
 *  block so that copying it in (from c-ares results or a Redis value) is
 *  one allocation and dropping it one free().
 *
 *  The decoder treats the Redis value as untrusted input: another version
 *  of mailpump, a truncated write or an operator's SET may have put
 *  anything there. It checks every length before reading and rejects the
 *  whole value on the first inconsistency; the caller then resolves over
 *  DNS and overwrites it.
 * DIAGNOSTICS
 *  Status codes only (DNS_EBADVALUE, DNS_EEXPIRED, DNS_ENOMEM).
 */
#include "dns/record.h"

#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "dns/mx.h"

int dns_status_cacheable(int status)
{
    return status == DNS_OK || status == DNS_NXDOMAIN || status == DNS_NULLMX || status == DNS_NOADDR;
}

static size_t dns_align(size_t n)
{
    return (n + 15u) & ~(size_t)15u;
}

dns_record_t *dns_record_new(int status, int implicit, uint32_t ttl_s,
                             const dns_mx_host_t *hosts, size_t nhosts)
{
    size_t naddrs = 0, names = 0;
    for (size_t i = 0; i < nhosts; i++) {
        naddrs += hosts[i].naddrs;
        names += strlen(hosts[i].name) + 1;
    }
    size_t off_hosts = dns_align(sizeof(dns_record_t));
    size_t off_addrs = off_hosts + dns_align(nhosts * sizeof(dns_mx_host_t));
    size_t off_names = off_addrs + naddrs * sizeof(struct sockaddr_storage);
    unsigned char *blk = dns_malloc(off_names + names);
    if (blk == NULL)
        return NULL;
    dns_record_t *rec = (dns_record_t *)blk;
    rec->refs = 1;
    rec->status = status;
    rec->implicit = implicit;
    rec->ttl_s = ttl_s;
    rec->nhosts = nhosts;
    rec->hosts = nhosts ? (dns_mx_host_t *)(blk + off_hosts) : NULL;
    struct sockaddr_storage *addrs = (struct sockaddr_storage *)(blk + off_addrs);
    char *name = (char *)(blk + off_names);
    /* insertion sort by preference: stable, and n <= DNS_MAX_HOSTS */
    size_t order[DNS_MAX_HOSTS + 1];
    size_t n = nhosts < DNS_MAX_HOSTS ? nhosts : DNS_MAX_HOSTS;
    rec->nhosts = n;
    for (size_t i = 0; i < n; i++) {
        size_t j = i;
        while (j > 0 && hosts[order[j - 1]].pref > hosts[i].pref) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    for (size_t k = 0; k < n; k++) {
        const dns_mx_host_t *src = &hosts[order[k]];
        dns_mx_host_t *dst = &rec->hosts[k];
        size_t len = strlen(src->name);
        memcpy(name, src->name, len + 1);
        dst->name = name;
        name += len + 1;
        dst->pref = src->pref;
        dst->addrs = addrs;
        dst->naddrs = src->naddrs;
        if (src->naddrs)
            memcpy(addrs, src->addrs, src->naddrs * sizeof(*addrs));
        addrs += src->naddrs;
    }
    return rec;
}

dns_record_t *dns_record_ref(dns_record_t *rec)
{
    rec->refs++;
    return rec;
}

void dns_record_unref(dns_record_t *rec)
{
    if (rec != NULL && --rec->refs == 0)
        free(rec);
}

static void dns_count_families(const dns_mx_host_t *h, size_t *n4, size_t *n6)
{
    *n4 = *n6 = 0;
    for (size_t j = 0; j < h->naddrs; j++) {
        if (h->addrs[j].ss_family == AF_INET)
            (*n4)++;
        else if (h->addrs[j].ss_family == AF_INET6)
            (*n6)++;
    }
}

size_t dns_record_encoded_size(const dns_record_t *rec)
{
    size_t n = 12;
    for (size_t i = 0; i < rec->nhosts; i++) {
        size_t n4, n6;
        dns_count_families(&rec->hosts[i], &n4, &n6);
        n += 2 + 1 + strlen(rec->hosts[i].name) + 1 + 4 * n4 + 1 + 16 * n6;
    }
    return n;
}

static unsigned char *dns_put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
    return p + 4;
}

static uint32_t dns_get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

size_t dns_record_encode(const dns_record_t *rec, uint64_t now_s, unsigned char *out, size_t outlen)
{
    if (!dns_status_cacheable(rec->status) || (rec->status == DNS_OK) != (rec->nhosts > 0) ||
        rec->nhosts > DNS_MAX_HOSTS)
        return 0;
    size_t need = dns_record_encoded_size(rec);
    if (need > outlen)
        return 0;
    unsigned char *p = out;
    *p++ = DNS_RECORD_VERSION;
    *p++ = (unsigned char)(-rec->status);
    *p++ = rec->implicit ? 1 : 0;
    p = dns_put32(p, (uint32_t)now_s);
    p = dns_put32(p, rec->ttl_s);
    *p++ = (unsigned char)rec->nhosts;
    for (size_t i = 0; i < rec->nhosts; i++) {
        const dns_mx_host_t *h = &rec->hosts[i];
        size_t n4, n6, len = strlen(h->name);
        dns_count_families(h, &n4, &n6);
        if (len == 0 || len > 253 || n4 > DNS_MAX_ADDRS || n6 > DNS_MAX_ADDRS || h->pref > 65535)
            return 0;
        *p++ = (unsigned char)(h->pref >> 8);
        *p++ = (unsigned char)h->pref;
        *p++ = (unsigned char)len;
        memcpy(p, h->name, len);
        p += len;
        *p++ = (unsigned char)n4;
        for (size_t j = 0; j < h->naddrs; j++)
            if (h->addrs[j].ss_family == AF_INET) {
                memcpy(p, &((const struct sockaddr_in *)&h->addrs[j])->sin_addr, 4);
                p += 4;
            }
        *p++ = (unsigned char)n6;
        for (size_t j = 0; j < h->naddrs; j++)
            if (h->addrs[j].ss_family == AF_INET6) {
                memcpy(p, &((const struct sockaddr_in6 *)&h->addrs[j])->sin6_addr, 16);
                p += 16;
            }
    }
    return (size_t)(p - out);
}

/* Decoding state: a cursor that refuses to run past the end. */
typedef struct dns_rd {
    const unsigned char *p, *end;
    int bad;
} dns_rd_t;

static const unsigned char *dns_rd_take(dns_rd_t *r, size_t n)
{
    if (r->bad || (size_t)(r->end - r->p) < n) {
        r->bad = 1;
        return NULL;
    }
    const unsigned char *at = r->p;
    r->p += n;
    return at;
}

static unsigned dns_rd_u8(dns_rd_t *r)
{
    const unsigned char *p = dns_rd_take(r, 1);
    return p ? p[0] : 0;
}

int dns_record_decode(const unsigned char *buf, size_t n, uint64_t now_s, dns_record_t **out)
{
    *out = NULL;
    dns_rd_t r = { buf, buf + n, 0 };
    if (dns_rd_u8(&r) != DNS_RECORD_VERSION || r.bad)
        return DNS_EBADVALUE;
    int status = -(int)dns_rd_u8(&r);
    unsigned flags = dns_rd_u8(&r);
    const unsigned char *tp = dns_rd_take(&r, 8);
    unsigned nhosts = dns_rd_u8(&r);
    if (r.bad || !dns_status_cacheable(status) || (flags & ~1u) != 0 || nhosts > DNS_MAX_HOSTS ||
        (status == DNS_OK) != (nhosts > 0))
        return DNS_EBADVALUE;
    uint32_t stored = dns_get32(tp), ttl = dns_get32(tp + 4);
    if (ttl == 0 || ttl > DNS_RECORD_TTL_MAX || (uint64_t)stored > now_s + 300u)
        return DNS_EBADVALUE;

    dns_mx_host_t hosts[DNS_MAX_HOSTS];
    struct sockaddr_storage addrs[DNS_MAX_HOSTS > 4 ? 4 * DNS_MAX_ADDRS : 1];
    struct sockaddr_storage *all = NULL;
    char names[DNS_MAX_HOSTS][254];
    size_t nall = 0, cap = sizeof(addrs) / sizeof(addrs[0]);
    int st = DNS_OK;
    for (unsigned i = 0; i < nhosts && st == DNS_OK; i++) {
        const unsigned char *pp = dns_rd_take(&r, 2);
        unsigned len = dns_rd_u8(&r);
        const unsigned char *name = dns_rd_take(&r, len);
        unsigned n4 = dns_rd_u8(&r);
        const unsigned char *a4 = dns_rd_take(&r, 4u * n4);
        unsigned n6 = dns_rd_u8(&r);
        const unsigned char *a6 = dns_rd_take(&r, 16u * n6);
        if (r.bad || len == 0 || len > 253 || n4 > DNS_MAX_ADDRS || n6 > DNS_MAX_ADDRS || n4 + n6 == 0) {
            st = DNS_EBADVALUE;
            break;
        }
        memcpy(names[i], name, len);
        names[i][len] = '\0';
        if (dns_name_check(names[i]) != len) {
            st = DNS_EBADVALUE;
            break;
        }
        if (nall + n4 + n6 > cap) {
            /* more than the stack array: rare, grow on the heap */
            size_t ncap = (nall + n4 + n6) * 2;
            struct sockaddr_storage *g = dns_calloc(ncap, sizeof(*g));
            if (g == NULL) {
                st = DNS_ENOMEM;
                break;
            }
            memcpy(g, all ? all : addrs, nall * sizeof(*g));
            free(all);
            all = g;
            cap = ncap;
        }
        struct sockaddr_storage *base = all ? all : addrs;
        hosts[i].name = names[i];
        hosts[i].pref = (unsigned)pp[0] << 8 | pp[1];
        hosts[i].naddrs = n4 + n6;
        hosts[i].addrs = (struct sockaddr_storage *)(uintptr_t)nall; /* index until final */
        for (unsigned j = 0; j < n4; j++) {
            struct sockaddr_in *sin = (struct sockaddr_in *)&base[nall++];
            memset(sin, 0, sizeof(struct sockaddr_storage));
            sin->sin_family = AF_INET;
            memcpy(&sin->sin_addr, a4 + 4 * j, 4);
        }
        for (unsigned j = 0; j < n6; j++) {
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&base[nall++];
            memset(sin6, 0, sizeof(struct sockaddr_storage));
            sin6->sin6_family = AF_INET6;
            memcpy(&sin6->sin6_addr, a6 + 16 * j, 16);
        }
    }
    if (st == DNS_OK && r.p != r.end)
        st = DNS_EBADVALUE; /* trailing bytes */
    if (st == DNS_OK && (uint64_t)stored + ttl <= now_s)
        st = DNS_EEXPIRED;
    if (st == DNS_OK) {
        struct sockaddr_storage *base = all ? all : addrs;
        for (unsigned i = 0; i < nhosts; i++)
            hosts[i].addrs = base + (uintptr_t)hosts[i].addrs;
        uint64_t left = (uint64_t)stored + ttl - now_s;
        *out = dns_record_new(status, (int)(flags & 1u), (uint32_t)(left < ttl ? left : ttl), hosts, nhosts);
        if (*out == NULL)
            st = DNS_ENOMEM;
    }
    free(all);
    return st;
}

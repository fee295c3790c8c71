/*
 * SUMMARY
 *  dns/msg.c - a small DNS message reader for MX, CNAME, A, AAAA, SOA.
 * DESCRIPTION
 *  Names are decompressed with ares_expand_name() (c-ares already guards
 *  against pointer loops). Only class IN records of the five types we use
 *  are kept; everything else is skipped by its RDLENGTH. A record whose
 *  RDATA does not fit its type fails the whole message: a resolver that
 *  sends that is not to be trusted with the rest either.
 * DIAGNOSTICS
 *  DNS_TEMPFAIL for a malformed message (the next try may get a good one).
 */
#include "dns/msg.h"

#include <ares.h>
#include <arpa/nameser.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dns/mx.h"
#include "dns/resolver.h"

static unsigned dns_u16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static uint32_t dns_u32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Decompress the name at p into a dns_malloc'd string; *used = octets at p. */
static int dns_msg_name(const unsigned char *p, const unsigned char *abuf, int alen, char **out, long *used)
{
    char *s = NULL;
    int st = ares_expand_name(p, abuf, alen, &s, used);
    if (st != ARES_SUCCESS)
        return st == ARES_ENOMEM ? DNS_ENOMEM : DNS_TEMPFAIL;
    size_t len = strlen(s);
    *out = dns_strndup(s, len);
    ares_free_string(s);
    return *out ? DNS_OK : DNS_ENOMEM;
}

void dns_msg_free(dns_msg_t *m)
{
    for (size_t i = 0; i < m->nrr; i++) {
        free(m->rr[i].name);
        free(m->rr[i].target);
    }
    free(m->rr);
    m->rr = NULL;
    m->nrr = 0;
}

int dns_msg_parse(const unsigned char *abuf, int alen, dns_msg_t *m)
{
    memset(m, 0, sizeof(*m));
    if (abuf == NULL || alen < HFIXEDSZ)
        return DNS_TEMPFAIL;
    m->rcode = abuf[3] & 0x0f;
    unsigned qd = dns_u16(abuf + 4);
    unsigned counts[3] = { dns_u16(abuf + 6), dns_u16(abuf + 8), dns_u16(abuf + 10) };
    size_t total = (size_t)counts[0] + counts[1] + counts[2];
    /* every record takes at least 11 octets: a bound on what to allocate */
    if (total > (size_t)alen / 11u)
        return DNS_TEMPFAIL;
    if (total > 0 && (m->rr = dns_calloc(total, sizeof(*m->rr))) == NULL)
        return DNS_ENOMEM;

    const unsigned char *p = abuf + HFIXEDSZ, *end = abuf + alen;
    for (unsigned i = 0; i < qd; i++) {
        char *name;
        long used;
        int st = dns_msg_name(p, abuf, alen, &name, &used);
        if (st != DNS_OK)
            return st;
        free(name);
        p += used;
        if (end - p < QFIXEDSZ)
            return DNS_TEMPFAIL;
        p += QFIXEDSZ;
    }
    for (int sec = 0; sec < 3; sec++) {
        for (unsigned i = 0; i < counts[sec]; i++) {
            if (p >= end)
                return DNS_TEMPFAIL;
            char *name;
            long used;
            int st = dns_msg_name(p, abuf, alen, &name, &used);
            if (st != DNS_OK)
                return st;
            p += used;
            if (end - p < RRFIXEDSZ) {
                free(name);
                return DNS_TEMPFAIL;
            }
            unsigned type = dns_u16(p), cls = dns_u16(p + 2), rdlen = dns_u16(p + 8);
            uint32_t ttl = dns_u32(p + 4);
            if (ttl > 0x7fffffffu) /* RFC 2181 §8: treat as zero */
                ttl = 0;
            p += RRFIXEDSZ;
            if ((size_t)(end - p) < rdlen) {
                free(name);
                return DNS_TEMPFAIL;
            }
            const unsigned char *rd = p;
            p += rdlen;
            if (cls != C_IN || (type != T_MX && type != T_CNAME && type != T_A && type != T_AAAA &&
                                type != T_SOA)) {
                free(name);
                continue;
            }
            dns_rr_t *rr = &m->rr[m->nrr++];
            rr->section = sec + 1;
            rr->type = (int)type;
            rr->ttl = ttl;
            rr->name = name;
            st = DNS_OK;
            if (type == T_A) {
                if (rdlen != 4)
                    st = DNS_TEMPFAIL;
                else
                    memcpy(rr->addr, rd, 4);
            } else if (type == T_AAAA) {
                if (rdlen != 16)
                    st = DNS_TEMPFAIL;
                else
                    memcpy(rr->addr, rd, 16);
            } else if (type == T_MX) {
                if (rdlen < 3)
                    st = DNS_TEMPFAIL;
                else {
                    rr->pref = dns_u16(rd);
                    st = dns_msg_name(rd + 2, abuf, alen, &rr->target, &used);
                }
            } else if (type == T_CNAME) {
                st = dns_msg_name(rd, abuf, alen, &rr->target, &used);
            } else { /* SOA: MNAME, RNAME, then five 32-bit fields */
                char *n1 = NULL, *n2 = NULL;
                long u1 = 0, u2 = 0;
                st = dns_msg_name(rd, abuf, alen, &n1, &u1);
                if (st == DNS_OK)
                    st = dns_msg_name(rd + u1, abuf, alen, &n2, &u2);
                free(n1);
                free(n2);
                if (st == DNS_OK && (long)rdlen - u1 - u2 != 20)
                    st = DNS_TEMPFAIL;
                if (st == DNS_OK)
                    rr->soa_minimum = dns_u32(rd + u1 + u2 + 16);
            }
            if (st != DNS_OK)
                return st;
        }
    }
    return DNS_OK;
}

const char *dns_msg_chase(const dns_msg_t *m, const char *name, uint32_t *ttl, int *hops)
{
    const char *cur = name;
    for (;;) {
        const dns_rr_t *hit = NULL;
        for (size_t i = 0; i < m->nrr && hit == NULL; i++) {
            const dns_rr_t *rr = &m->rr[i];
            if (rr->section == DNS_SEC_ANSWER && rr->type == T_CNAME && strcasecmp(rr->name, cur) == 0)
                hit = rr;
        }
        if (hit == NULL)
            return cur;
        if (++*hops > DNS_MAX_CNAME)
            return cur;
        if (hit->ttl < *ttl)
            *ttl = hit->ttl;
        cur = hit->target;
    }
}

long dns_msg_negative_ttl(const dns_msg_t *m)
{
    for (size_t i = 0; i < m->nrr; i++) {
        const dns_rr_t *rr = &m->rr[i];
        if (rr->section == DNS_SEC_AUTHORITY && rr->type == T_SOA)
            return (long)(rr->ttl < rr->soa_minimum ? rr->ttl : rr->soa_minimum);
    }
    return -1;
}

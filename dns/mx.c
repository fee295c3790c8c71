/*
 * SUMMARY
 *  dns/mx.c - status texts, name syntax, MX ordering, allocator.
 * DESCRIPTION
 *  The parts of MX resolution that need no network: what a status means
 *  and whether it is permanent, whether a string can be looked up at all,
 *  and the RFC 5321 §5.1 order of MX hosts (ascending preference, random
 *  among equals so that equal-preference hosts share the load).
 *
 *  Allocation goes through dns_malloc() and friends so that tests can make
 *  the n-th allocation fail and check that every query still completes
 *  exactly once (c-ares' own test suite does the same with SetAllocFail).
 * DIAGNOSTICS
 *  None: pure functions.
 */
#include "dns/mx.h"

#include <ares.h>
#include <stdlib.h>
#include <string.h>

/* Per thread because every worker thread runs its own resolver; only
 * tests ever arm it. */
static _Thread_local long dns_alloc_budget = -1;
static _Thread_local long dns_alloc_failed;

long dns_test_fail_alloc_after(long n)
{
    long failed = dns_alloc_failed;
    dns_alloc_budget = n;
    dns_alloc_failed = 0;
    return failed;
}

/* Returns 1 when the current allocation must fail. */
static int dns_alloc_fails(void)
{
    if (dns_alloc_budget < 0)
        return 0;
    if (dns_alloc_budget == 0) {
        dns_alloc_failed++;
        return 1;
    }
    dns_alloc_budget--;
    return 0;
}

void *dns_malloc(size_t n)
{
    return dns_alloc_fails() ? NULL : malloc(n ? n : 1);
}

void *dns_calloc(size_t n, size_t size)
{
    return dns_alloc_fails() ? NULL : calloc(n ? n : 1, size ? size : 1);
}

char *dns_strndup(const char *s, size_t n)
{
    char *p = dns_malloc(n + 1);
    if (p != NULL) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

const char *dns_strerror(int status)
{
    switch (status) {
    case DNS_OK:         return "success";
    case DNS_ENOMEM:     return "out of memory";
    case DNS_NXDOMAIN:   return "domain does not exist";
    case DNS_NULLMX:     return "domain does not accept mail (null MX)";
    case DNS_NOADDR:     return "no address for any mail exchanger";
    case DNS_TEMPFAIL:   return "temporary DNS failure";
    case DNS_TIMEOUT:    return "DNS timeout";
    case DNS_EBADNAME:   return "invalid domain name";
    case DNS_ECANCELLED: return "DNS query cancelled";
    case DNS_EBADVALUE:  return "corrupt cached value";
    case DNS_EEXPIRED:   return "cached value expired";
    }
    return "unknown dns status";
}

const char *dns_status_tag(int status)
{
    switch (status) {
    case DNS_OK:         return "ok";
    case DNS_NXDOMAIN:   return "nxdomain";
    case DNS_NULLMX:     return "nullmx";
    case DNS_NOADDR:     return "noaddr";
    case DNS_TEMPFAIL:   return "tempfail";
    case DNS_TIMEOUT:    return "timeout";
    case DNS_EBADNAME:   return "badname";
    case DNS_ECANCELLED: return "cancelled";
    }
    return "error";
}

int dns_status_is_permanent(int status)
{
    /* NOADDR is permanent because the resolver reports it only when every
     * lookup got an authoritative "no such record": if any lookup failed
     * transiently the query reports that transient status instead. */
    switch (status) {
    case DNS_NXDOMAIN:
    case DNS_NULLMX:
    case DNS_NOADDR:
    case DNS_EBADNAME:
        return 1;
    }
    return 0;
}

int dns_status_from_ares(int ares_status)
{
    switch (ares_status) {
    case ARES_SUCCESS:      return DNS_OK;
    case ARES_ENODATA:      return DNS_NOADDR;
    case ARES_ENOTFOUND:    return DNS_NXDOMAIN;
    case ARES_ETIMEOUT:     return DNS_TIMEOUT;
    case ARES_ENOMEM:       return DNS_ENOMEM;
    case ARES_EBADNAME:     return DNS_EBADNAME;
    case ARES_ECANCELLED:
    case ARES_EDESTRUCTION: return DNS_ECANCELLED;
    }
    /* ESERVFAIL, EREFUSED, ECONNREFUSED, EFORMERR, ENOTIMP, EBADRESP...:
     * the answer may well differ on the next attempt or at another server. */
    return DNS_TEMPFAIL;
}

static int dns_is_ldh(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

size_t dns_name_check(const char *name)
{
    if (name == NULL)
        return 0;
    size_t len = strlen(name);
    if (len > 0 && name[len - 1] == '.')
        len--;
    if (len == 0 || len > 253)
        return 0;

    size_t label = 0; /* length of the current label */
    int all_digits = 1;
    for (size_t i = 0; i <= len; i++) {
        unsigned char c = i < len ? (unsigned char)name[i] : '.';
        if (c == '.') {
            if (label == 0 || label > 63 || name[i - 1] == '-')
                return 0;
            label = 0;
            if (i < len)
                all_digits = 1;
            continue;
        }
        if (!dns_is_ldh(c))
            return 0;
        if (label == 0 && c == '-')
            return 0;
        if (c < '0' || c > '9')
            all_digits = 0;
        label++;
    }
    return all_digits ? 0 : len;
}

static int dns_pref_cmp(const void *a, const void *b)
{
    unsigned pa = ((const dns_mx_host_t *)a)->pref, pb = ((const dns_mx_host_t *)b)->pref;
    return pa < pb ? -1 : pa > pb;
}

/* splitmix64: tiny, good enough to spread load; not for secrets. */
static uint64_t dns_rand_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void dns_sort_mx(dns_mx_host_t *hosts, size_t n, uint64_t seed)
{
    if (n < 2)
        return;
    /* qsort is not stable, which does not matter: every run of equal
     * preference is shuffled afterwards anyway. */
    qsort(hosts, n, sizeof(*hosts), dns_pref_cmp);
    uint64_t state = seed;
    size_t start = 0;
    while (start < n) {
        size_t end = start + 1;
        while (end < n && hosts[end].pref == hosts[start].pref)
            end++;
        /* Fisher-Yates over [start, end). The modulo bias is negligible
         * for runs this short. */
        for (size_t i = end - 1; i > start; i--) {
            size_t j = start + (size_t)(dns_rand_next(&state) % (uint64_t)(i - start + 1));
            if (j != i) {
                dns_mx_host_t t = hosts[i];
                hosts[i] = hosts[j];
                hosts[j] = t;
            }
        }
        start = end;
    }
}

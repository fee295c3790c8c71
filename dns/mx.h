/*
 * dns/mx.h - the pure parts of MX resolution: name syntax, status
 * mapping, ordering of MX hosts, and the module's allocator.
 *
 * Nothing here does I/O or touches a resolver; these functions are
 * exposed so unit tests (and a future cache layer) can use them directly.
 */
#ifndef MP_DNS_MX_H
#define MP_DNS_MX_H

#include <stddef.h>
#include <stdint.h>

#include "dns/resolver.h"

/* Most MX hosts resolved for one domain (the most preferred are kept),
 * and most addresses kept per host and address family. A delivery never
 * walks further than this, and it bounds the work one hostile zone can
 * cause. */
#define DNS_MAX_HOSTS 32
#define DNS_MAX_ADDRS 16

/* Syntax check of a domain name: LDH labels of 1..63 octets that neither
 * start nor end with '-', at most 253 octets without the optional final
 * dot, and a last label that is not all digits (so "192.0.2.1" is not
 * taken for a domain). Returns the length of the name without its final
 * dot, or 0 when it is not a valid name. */
size_t dns_name_check(const char *name);

/* Map an ARES_* status of an MX, A or AAAA query to a dns_status_t.
 * ARES_ENODATA (the name exists, no record of that type) maps to
 * DNS_NOADDR; the MX stage handles it before calling this. */
int dns_status_from_ares(int ares_status);

/* Sort hosts by ascending preference, and shuffle hosts of equal
 * preference (RFC 5321 §5.1) with a generator seeded by seed, so that
 * equal-preference hosts share the load. The same seed gives the same
 * order. Only the array order changes. */
void dns_sort_mx(dns_mx_host_t *hosts, size_t n, uint64_t seed);

/* The module's allocator. dns/ reports DNS_ENOMEM instead of aborting
 * (its callers can fail one lookup and go on), so tests inject failures
 * here. */
void *dns_malloc(size_t n);
void *dns_calloc(size_t n, size_t size);
char *dns_strndup(const char *s, size_t n);

/* Test hook: the next n allocations of this thread succeed, the ones after
 * fail until called again; n < 0 turns injection off (the default).
 * Returns how many allocations failed since the previous call. */
long dns_test_fail_alloc_after(long n);

#endif

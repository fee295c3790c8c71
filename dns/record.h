/*
 * dns/record.h - one resolved answer as the caches keep it, and its
 * compact serialised form (the Redis L2 value).
 *
 * A record is immutable once built and reference counted: the L1 cache
 * holds one reference and every answer on its way to a callback holds
 * another, so eviction never frees what a callback is about to read.
 * Hosts, names and addresses live in the record's single allocation.
 * Not thread-safe (one resolver per thread, like everything in dns/).
 *
 * Wire format, version 1 (all integers big-endian):
 *   u8 version=1 | u8 -status | u8 flags (bit 0: implicit MX)
 *   u32 stored_at (unix seconds) | u32 ttl (seconds)
 *   u8 nhosts, then per host:
 *     u16 pref | u8 namelen | name | u8 n4 | n4 x 4 octets | u8 n6 | n6 x 16 octets
 * Only cacheable statuses are encoded: OK (hosts non-empty), NXDOMAIN,
 * NULLMX and NOADDR (no hosts). Two MX with one IPv4 each take about
 * 60 bytes.
 */
#ifndef MP_DNS_RECORD_H
#define MP_DNS_RECORD_H

#include <stddef.h>
#include <stdint.h>

#include "dns/resolver.h"

#define DNS_RECORD_VERSION 1
/* Longest TTL a decoded value may claim: anything above is corrupt. */
#define DNS_RECORD_TTL_MAX (7u * 86400u)

typedef struct dns_record {
    unsigned       refs;
    int            status;   /* dns_status_t */
    int            implicit;
    uint32_t       ttl_s;    /* lifetime granted when the answer was stored */
    size_t         nhosts;
    dns_mx_host_t *hosts;    /* sorted by preference (not shuffled) */
} dns_record_t;

/* 1 when an answer with this status may be cached at all. */
int dns_status_cacheable(int status);

/* Deep copy of hosts into one allocation, with one reference. hosts are
 * stored sorted by preference (stable among equals). NULL on OOM. */
dns_record_t *dns_record_new(int status, int implicit, uint32_t ttl_s,
                             const dns_mx_host_t *hosts, size_t nhosts);
dns_record_t *dns_record_ref(dns_record_t *rec);
/* Drops one reference; frees at zero. NULL is harmless. */
void dns_record_unref(dns_record_t *rec);

/* Bytes dns_record_encode() needs for rec. */
size_t dns_record_encoded_size(const dns_record_t *rec);
/* Serialise rec stored at now_s (unix seconds). Returns the length, or 0
 * when outlen is too small or the record is not cacheable. */
size_t dns_record_encode(const dns_record_t *rec, uint64_t now_s, unsigned char *out, size_t outlen);
/* Parse a value read at now_s. On DNS_OK *out holds a new record (one
 * reference) whose ttl_s is the remaining lifetime (>= 1). Returns
 * DNS_EBADVALUE for anything malformed (unknown version, bad status,
 * lengths that do not add up, invalid names, too many hosts or
 * addresses, trailing bytes, a future timestamp), DNS_EEXPIRED when the
 * lifetime is over, DNS_ENOMEM. */
int dns_record_decode(const unsigned char *p, size_t n, uint64_t now_s, dns_record_t **out);

#endif

/*
 * dns/cache.h - the L1 cache: per resolver (per worker thread), bounded
 * LRU of answers keyed by normalised domain, each with an expiry time.
 *
 * Not thread-safe; no I/O; time is passed in (the loop's clock), so tests
 * drive expiry without sleeping. The cache holds one reference on each
 * record; dns_cache_get() lends it (take your own with dns_record_ref()).
 */
#ifndef MP_DNS_CACHE_H
#define MP_DNS_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "dns/record.h"

typedef struct dns_cache dns_cache_t;

/* A cache of at most max_entries (>= 1). NULL on OOM. */
dns_cache_t *dns_cache_new(size_t max_entries);
void dns_cache_free(dns_cache_t *c);

/* The record for key when present and not expired at now_ms (made most
 * recently used), with its expiry in *expires_ms; NULL otherwise. An
 * expired entry found on the way is dropped. */
dns_record_t *dns_cache_get(dns_cache_t *c, const char *key, uint64_t now_ms, uint64_t *expires_ms);

/* Insert or replace key (the cache takes its own reference), evicting
 * the least recently used entry when full. DNS_OK or DNS_ENOMEM (the
 * cache is then unchanged). */
int dns_cache_put(dns_cache_t *c, const char *key, dns_record_t *rec, uint64_t expires_ms);

/* Drop key if present. */
void dns_cache_remove(dns_cache_t *c, const char *key);

size_t   dns_cache_size(const dns_cache_t *c);
uint64_t dns_cache_evictions(const dns_cache_t *c);

#endif

/*
 * SUMMARY
 *  dns/cache.c - bounded LRU of dns_record_t keyed by domain.
 * DESCRIPTION
 *  A chained hash table (FNV-1a, power-of-two buckets sized once for
 *  max_entries, so it never rehashes) plus an intrusive doubly linked
 *  list in recency order: get moves the entry to the head, put evicts
 *  from the tail. Expired entries are dropped lazily when met by get,
 *  and first in line anyway when they are the least recently used.
 *  The key is stored inline after the entry (one allocation per entry).
 * DIAGNOSTICS
 *  DNS_ENOMEM from put.
 */
#include "dns/cache.h"

#include <stdlib.h>
#include <string.h>

#include "dns/mx.h"

typedef struct dns_centry {
    struct dns_centry *hnext;
    struct dns_centry *prev, *next; /* recency list: head is most recent */
    uint64_t           hash;
    uint64_t           expires_ms;
    dns_record_t      *rec;
    char               key[];
} dns_centry_t;

struct dns_cache {
    dns_centry_t **buckets;
    size_t         nbuckets; /* power of two */
    size_t         size, max;
    dns_centry_t  *head, *tail;
    uint64_t       evictions;
};

static uint64_t dns_hash(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

dns_cache_t *dns_cache_new(size_t max_entries)
{
    dns_cache_t *c = dns_calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->max = max_entries ? max_entries : 1;
    c->nbuckets = 16;
    while (c->nbuckets < c->max && c->nbuckets < ((size_t)1 << 30))
        c->nbuckets *= 2;
    c->buckets = dns_calloc(c->nbuckets, sizeof(*c->buckets));
    if (c->buckets == NULL) {
        free(c);
        return NULL;
    }
    return c;
}

static void dns_lru_unlink(dns_cache_t *c, dns_centry_t *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        c->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void dns_lru_push_front(dns_cache_t *c, dns_centry_t *e)
{
    e->prev = NULL;
    e->next = c->head;
    if (c->head)
        c->head->prev = e;
    else
        c->tail = e;
    c->head = e;
}

static dns_centry_t **dns_cache_slot(dns_cache_t *c, const char *key, uint64_t h)
{
    dns_centry_t **pp = &c->buckets[h & (c->nbuckets - 1)];
    while (*pp != NULL && ((*pp)->hash != h || strcmp((*pp)->key, key) != 0))
        pp = &(*pp)->hnext;
    return pp;
}

static void dns_cache_drop(dns_cache_t *c, dns_centry_t **pp)
{
    dns_centry_t *e = *pp;
    *pp = e->hnext;
    dns_lru_unlink(c, e);
    dns_record_unref(e->rec);
    free(e);
    c->size--;
}

void dns_cache_free(dns_cache_t *c)
{
    if (c == NULL)
        return;
    dns_centry_t *e = c->head, *next;
    for (; e != NULL; e = next) {
        next = e->next;
        dns_record_unref(e->rec);
        free(e);
    }
    free(c->buckets);
    free(c);
}

dns_record_t *dns_cache_get(dns_cache_t *c, const char *key, uint64_t now_ms, uint64_t *expires_ms)
{
    uint64_t h = dns_hash(key);
    dns_centry_t **pp = dns_cache_slot(c, key, h);
    dns_centry_t *e = *pp;
    if (e == NULL)
        return NULL;
    if (e->expires_ms <= now_ms) {
        dns_cache_drop(c, pp);
        return NULL;
    }
    if (c->head != e) {
        dns_lru_unlink(c, e);
        dns_lru_push_front(c, e);
    }
    if (expires_ms)
        *expires_ms = e->expires_ms;
    return e->rec;
}

int dns_cache_put(dns_cache_t *c, const char *key, dns_record_t *rec, uint64_t expires_ms)
{
    uint64_t h = dns_hash(key);
    dns_centry_t **pp = dns_cache_slot(c, key, h);
    if (*pp != NULL) {
        dns_centry_t *e = *pp;
        dns_record_unref(e->rec);
        e->rec = dns_record_ref(rec);
        e->expires_ms = expires_ms;
        dns_lru_unlink(c, e);
        dns_lru_push_front(c, e);
        return DNS_OK;
    }
    size_t len = strlen(key);
    dns_centry_t *e = dns_malloc(sizeof(*e) + len + 1);
    if (e == NULL)
        return DNS_ENOMEM;
    memcpy(e->key, key, len + 1);
    e->hash = h;
    e->expires_ms = expires_ms;
    e->rec = dns_record_ref(rec);
    if (c->size >= c->max) {
        dns_centry_t *old = c->tail;
        dns_cache_drop(c, dns_cache_slot(c, old->key, old->hash));
        c->evictions++;
        pp = dns_cache_slot(c, key, h); /* the chain may have changed */
    }
    e->hnext = *pp;
    *pp = e;
    dns_lru_push_front(c, e);
    c->size++;
    return DNS_OK;
}

void dns_cache_remove(dns_cache_t *c, const char *key)
{
    dns_centry_t **pp = dns_cache_slot(c, key, dns_hash(key));
    if (*pp != NULL)
        dns_cache_drop(c, pp);
}

size_t dns_cache_size(const dns_cache_t *c)
{
    return c->size;
}

uint64_t dns_cache_evictions(const dns_cache_t *c)
{
    return c->evictions;
}

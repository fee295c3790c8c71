/*
 * SUMMARY
 *  dns/cache.c - bounded LRU of dns_record_t keyed by domain.
 * DESCRIPTION
 *  A core/htable.h table of entries (sized once for max_entries, so it
 *  never grows) plus a sys/queue.h TAILQ in recency order: get moves the
 *  entry to the head, put evicts from the tail. Expired entries are
 *  dropped lazily when met by get, and first in line anyway when they are
 *  the least recently used. The key is stored inline after the entry (one
 *  allocation per entry) and is what the table's node points to.
 * DIAGNOSTICS
 *  DNS_ENOMEM from put.
 */
#include "dns/cache.h"

#include <stdlib.h>
#include <string.h>

#include "core/htable.h"
#include "core/list.h"
#include "dns/mx.h"

typedef struct dns_centry {
    htable_node_t           node; /* in c->table, keyed by key */
    TAILQ_ENTRY(dns_centry) lru;  /* head is most recent */
    uint64_t                expires_ms;
    dns_record_t           *rec;
    char                    key[];
} dns_centry_t;

struct dns_cache {
    htable_t                    table;
    TAILQ_HEAD(dns_centry_list, dns_centry) lru;
    size_t                      max;
    uint64_t                    evictions;
};

dns_cache_t *dns_cache_new(size_t max_entries)
{
    dns_cache_t *c = dns_calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->max = max_entries ? max_entries : 1;
    TAILQ_INIT(&c->lru);
    if (htable_init(&c->table, HTABLE_STR, c->max, dns_calloc) != 0) {
        free(c);
        return NULL;
    }
    return c;
}

static dns_centry_t *dns_cache_find(dns_cache_t *c, const char *key)
{
    htable_node_t *n = htable_find_str(&c->table, key);
    return n ? HTABLE_ENTRY(n, dns_centry_t, node) : NULL;
}

static void dns_cache_drop(dns_cache_t *c, dns_centry_t *e)
{
    htable_remove(&c->table, &e->node);
    TAILQ_REMOVE(&c->lru, e, lru);
    dns_record_unref(e->rec);
    free(e);
}

void dns_cache_free(dns_cache_t *c)
{
    if (c == NULL)
        return;
    dns_centry_t *e;
    while ((e = TAILQ_FIRST(&c->lru)) != NULL) {
        TAILQ_REMOVE(&c->lru, e, lru);
        dns_record_unref(e->rec);
        free(e);
    }
    htable_fini(&c->table);
    free(c);
}

dns_record_t *dns_cache_get(dns_cache_t *c, const char *key, uint64_t now_ms, uint64_t *expires_ms)
{
    dns_centry_t *e = dns_cache_find(c, key);
    if (e == NULL)
        return NULL;
    if (e->expires_ms <= now_ms) {
        dns_cache_drop(c, e);
        return NULL;
    }
    if (TAILQ_FIRST(&c->lru) != e) {
        TAILQ_REMOVE(&c->lru, e, lru);
        TAILQ_INSERT_HEAD(&c->lru, e, lru);
    }
    if (expires_ms)
        *expires_ms = e->expires_ms;
    return e->rec;
}

int dns_cache_put(dns_cache_t *c, const char *key, dns_record_t *rec, uint64_t expires_ms)
{
    dns_centry_t *e = dns_cache_find(c, key);
    if (e != NULL) {
        dns_record_unref(e->rec);
        e->rec = dns_record_ref(rec);
        e->expires_ms = expires_ms;
        TAILQ_REMOVE(&c->lru, e, lru);
        TAILQ_INSERT_HEAD(&c->lru, e, lru);
        return DNS_OK;
    }
    size_t len = strlen(key);
    e = dns_malloc(sizeof(*e) + len + 1);
    if (e == NULL)
        return DNS_ENOMEM;
    memcpy(e->key, key, len + 1);
    e->expires_ms = expires_ms;
    e->rec = dns_record_ref(rec);
    if (htable_count(&c->table) >= c->max) {
        dns_cache_drop(c, TAILQ_LAST(&c->lru, dns_centry_list));
        c->evictions++;
    }
    htable_insert_str(&c->table, &e->node, e->key);
    TAILQ_INSERT_HEAD(&c->lru, e, lru);
    return DNS_OK;
}

void dns_cache_remove(dns_cache_t *c, const char *key)
{
    dns_centry_t *e = dns_cache_find(c, key);
    if (e != NULL)
        dns_cache_drop(c, e);
}

size_t dns_cache_size(const dns_cache_t *c)
{
    return htable_count(&c->table);
}

uint64_t dns_cache_evictions(const dns_cache_t *c)
{
    return c->evictions;
}

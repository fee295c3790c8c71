/*
 * SUMMARY
 *  core/htable.c - intrusive chained hash table (see core/htable.h).
 * DESCRIPTION
 *  Power-of-two buckets, a singly linked chain per bucket, the full
 *  64-bit hash kept in each node so that a lookup compares strings only
 *  on a hash match and growing needs no rehashing of keys. String keys
 *  hash with FNV-1a; integer keys with the splitmix64 finaliser, so ids
 *  that differ only in their high bits (or are multiples of a power of
 *  two) still spread over the low bits that pick the bucket.
 *
 *  The table doubles when it holds as many nodes as buckets (load 1),
 *  before linking the new node. Growth is best effort: when the bucket
 *  allocation fails the table carries on at its size.
 * DIAGNOSTICS
 *  htable_init() returns -1 when the caller's allocator fails; nothing
 *  else can fail.
 */
#include "core/htable.h"

#include <stdlib.h>
#include <string.h>

#include "core/util.h"

#define HTABLE_MIN_BUCKETS 16u

static uint64_t htable_hash_str(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t htable_hash_u64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

int htable_init(htable_t *t, htable_kind_t kind, size_t hint, htable_calloc_fn alloc)
{
    size_t nb = HTABLE_MIN_BUCKETS;
    while (nb < hint && nb < ((size_t)1 << 30))
        nb *= 2;
    t->kind = kind;
    t->alloc = alloc != NULL ? alloc : xcalloc;
    t->count = 0;
    t->buckets = t->alloc(nb, sizeof(*t->buckets));
    t->nbuckets = t->buckets != NULL ? nb : 0;
    return t->buckets != NULL ? 0 : -1;
}

void htable_fini(htable_t *t)
{
    if (t == NULL)
        return;
    free(t->buckets);
    t->buckets = NULL;
    t->nbuckets = 0;
    t->count = 0;
}

static void htable_grow(htable_t *t)
{
    size_t nb = t->nbuckets * 2;
    htable_node_t **b = t->alloc(nb, sizeof(*b));
    if (b == NULL)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < t->nbuckets; i++) {
        htable_node_t *n = t->buckets[i], *next;
        for (; n != NULL; n = next) {
            next = n->hnext;
            n->hnext = b[n->hash & (nb - 1)];
            b[n->hash & (nb - 1)] = n;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = nb;
}

static void htable_link(htable_t *t, htable_node_t *n)
{
    if (t->count >= t->nbuckets)
        htable_grow(t);
    htable_node_t **head = &t->buckets[n->hash & (t->nbuckets - 1)];
    n->hnext = *head;
    *head = n;
    t->count++;
}

void htable_insert_str(htable_t *t, htable_node_t *n, const char *key)
{
    n->key.str = key;
    n->hash = htable_hash_str(key);
    htable_link(t, n);
}

void htable_insert_u64(htable_t *t, htable_node_t *n, uint64_t key)
{
    n->key.u64 = key;
    n->hash = htable_hash_u64(key);
    htable_link(t, n);
}

htable_node_t *htable_find_str(const htable_t *t, const char *key)
{
    uint64_t h = htable_hash_str(key);
    for (htable_node_t *n = t->buckets[h & (t->nbuckets - 1)]; n != NULL; n = n->hnext)
        if (n->hash == h && strcmp(n->key.str, key) == 0)
            return n;
    return NULL;
}

htable_node_t *htable_find_u64(const htable_t *t, uint64_t key)
{
    uint64_t h = htable_hash_u64(key);
    for (htable_node_t *n = t->buckets[h & (t->nbuckets - 1)]; n != NULL; n = n->hnext)
        if (n->key.u64 == key)
            return n;
    return NULL;
}

int htable_remove(htable_t *t, htable_node_t *n)
{
    if (t->nbuckets == 0)
        return 0;
    htable_node_t **pp = &t->buckets[n->hash & (t->nbuckets - 1)];
    while (*pp != NULL && *pp != n)
        pp = &(*pp)->hnext;
    if (*pp == NULL)
        return 0;
    *pp = n->hnext;
    n->hnext = NULL;
    t->count--;
    return 1;
}

htable_node_t *htable_first(const htable_t *t, size_t *hint)
{
    if (t->count == 0)
        return NULL;
    /* from the hint to the end, then once more from the start: a node
     * inserted behind the hint (or moved there by growing) is found too */
    size_t start = *hint < t->nbuckets ? *hint : 0;
    for (size_t k = 0; k < t->nbuckets; k++) {
        size_t i = (start + k) & (t->nbuckets - 1);
        if (t->buckets[i] != NULL) {
            *hint = i;
            return t->buckets[i];
        }
    }
    return NULL;
}

/* Move it->next to the first node at or after bucket it->bucket. */
static void htable_iter_advance(htable_iter_t *it)
{
    while (it->next == NULL && it->bucket < it->t->nbuckets)
        it->next = it->t->buckets[it->bucket++];
}

void htable_iter_init(htable_iter_t *it, const htable_t *t)
{
    it->t = t;
    it->bucket = 0;
    it->next = NULL;
    htable_iter_advance(it);
}

htable_node_t *htable_iter_next(htable_iter_t *it)
{
    htable_node_t *n = it->next;
    if (n == NULL)
        return NULL;
    /* computed before the caller sees n, so n may be removed and freed */
    it->next = n->hnext;
    htable_iter_advance(it);
    return n;
}

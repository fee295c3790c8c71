/*
 * SUMMARY
 *  deliverer/wrr.c - smooth weighted round robin per key (wrr.h).
 * DESCRIPTION
 *  One entry per key: the member count, the members' running values
 *  (int64: a member's current stays within +-(n * total weight)), a hash
 *  node and a place in the LRU list (most recently picked first). An
 *  entry beyond max_keys evicts the tail. A pick with another member
 *  count than the entry has resets its values to 0, so a pool that
 *  gained or lost a source restarts its sequence.
 */
#include "deliverer/wrr.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/htable.h"
#include "core/list.h"
#include "core/util.h"

typedef struct wrr_key {
    htable_node_t        node;
    TAILQ_ENTRY(wrr_key) lru;
    size_t               n;
    int64_t             *cur;
    char                *key;
} wrr_key_t;

struct wrr {
    htable_t              keys;
    TAILQ_HEAD(wrr_lru, wrr_key) lru;
    size_t                max_keys;
};

wrr_t *wrr_new(size_t max_keys)
{
    wrr_t *w = xcalloc(1, sizeof(*w));
    w->max_keys = max_keys ? max_keys : 4096;
    htable_init(&w->keys, HTABLE_STR, w->max_keys < 1024 ? w->max_keys : 1024, NULL);
    TAILQ_INIT(&w->lru);
    return w;
}

static void key_free(wrr_t *w, wrr_key_t *k)
{
    htable_remove(&w->keys, &k->node);
    TAILQ_REMOVE(&w->lru, k, lru);
    free(k->cur);
    free(k->key);
    free(k);
}

void wrr_free(wrr_t *w)
{
    if (w == NULL)
        return;
    wrr_key_t *k;
    while ((k = TAILQ_FIRST(&w->lru)) != NULL)
        key_free(w, k);
    htable_fini(&w->keys);
    free(w);
}

size_t wrr_count(const wrr_t *w)
{
    return htable_count(&w->keys);
}

static wrr_key_t *key_get(wrr_t *w, const char *key, size_t n)
{
    htable_node_t *hn = htable_find_str(&w->keys, key);
    wrr_key_t *k;
    if (hn) {
        k = HTABLE_ENTRY(hn, wrr_key_t, node);
        TAILQ_REMOVE(&w->lru, k, lru);
        TAILQ_INSERT_HEAD(&w->lru, k, lru);
        if (k->n != n) { /* members came or went: a fresh sequence */
            free(k->cur);
            k->cur = xcalloc(n, sizeof(*k->cur));
            k->n = n;
        }
        return k;
    }
    while (htable_count(&w->keys) >= w->max_keys && !TAILQ_EMPTY(&w->lru))
        key_free(w, TAILQ_LAST(&w->lru, wrr_lru));
    k = xcalloc(1, sizeof(*k));
    k->key = xstrdup(key);
    k->n = n;
    k->cur = xcalloc(n, sizeof(*k->cur));
    htable_insert_str(&w->keys, &k->node, k->key);
    TAILQ_INSERT_HEAD(&w->lru, k, lru);
    return k;
}

int wrr_pick(wrr_t *w, const char *key, const unsigned *weights, const unsigned char *eligible, size_t n)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        if (weights[i] > 0 && (eligible == NULL || eligible[i]))
            total += weights[i];
    if (total == 0)
        return -1;
    wrr_key_t *k = key_get(w, key ? key : "", n);
    int best = -1;
    for (size_t i = 0; i < n; i++) {
        if (weights[i] == 0 || (eligible && !eligible[i]))
            continue;
        k->cur[i] += weights[i];
        if (best < 0 || k->cur[i] > k->cur[best])
            best = (int)i;
    }
    k->cur[best] -= (int64_t)total;
    return best;
}

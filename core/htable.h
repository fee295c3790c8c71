/*
 * core/htable.h - the one hash table: intrusive, chained, string or
 * 64-bit integer keys, grows by doubling.
 *
 * Intrusive: the caller embeds an htable_node_t in its own object and
 * gets the object back with HTABLE_ENTRY(). The table never allocates,
 * copies or frees a node or a key; it owns only its bucket array. So an
 * insert cannot fail, and a module may remove and free its objects in
 * whatever order its life cycle wants (a DNS flight, a Redis command,
 * an SMTP destination) without the table in the way.
 *
 * Ownership:
 *  - nodes and string keys belong to the caller; a string key must stay
 *    unchanged and alive while its node is in the table (it is usually
 *    stored in the same object);
 *  - the bucket array belongs to the table: htable_init() allocates it
 *    with the caller's calloc (NULL: xcalloc, which aborts on OOM),
 *    htable_fini() frees it and never touches the nodes.
 * A failed allocation while growing is not an error: the table keeps its
 * size and stays correct, only with longer chains (this is what lets
 * dns/, which reports DNS_ENOMEM rather than aborting, use it).
 *
 * Keys are unique only if the caller makes them so (find before insert);
 * with duplicates, find returns the most recently inserted.
 *
 * Iteration (htable_iter_*) visits every node once in no particular
 * order. Removing the node just returned (and freeing it) is safe;
 * removing any other node or inserting while iterating is not (an insert
 * may rehash). Code whose callbacks may do either drains with
 * htable_first() instead.
 *
 * Thread-safety: none.
 */
#ifndef MP_CORE_HTABLE_H
#define MP_CORE_HTABLE_H

#include <stddef.h>
#include <stdint.h>

typedef enum { HTABLE_STR = 1, HTABLE_U64 = 2 } htable_kind_t;

typedef struct htable_node {
    struct htable_node *hnext; /* bucket chain */
    uint64_t            hash;
    union {
        const char *str;
        uint64_t    u64;
    } key;
} htable_node_t;

typedef void *(*htable_calloc_fn)(size_t n, size_t size);

typedef struct htable {
    htable_node_t  **buckets;
    size_t           nbuckets; /* power of two */
    size_t           count;
    htable_kind_t    kind;
    htable_calloc_fn alloc;
} htable_t;

typedef struct htable_iter {
    const htable_t *t;
    size_t          bucket; /* next bucket to look at */
    htable_node_t  *next;   /* next node to return, computed ahead */
} htable_iter_t;

/* The object that embeds node as member. */
#define HTABLE_ENTRY(node, type, member) \
    ((type *)(void *)((char *)(node) - offsetof(type, member)))

/* An empty table of kind with room for about hint nodes before it grows
 * (at least 16 buckets). alloc allocates the buckets (NULL: xcalloc).
 * Returns 0, or -1 when alloc failed (t is then empty and needs no
 * htable_fini). */
int  htable_init(htable_t *t, htable_kind_t kind, size_t hint, htable_calloc_fn alloc);
/* Frees the bucket array; the nodes are the caller's. NULL harmless. */
void htable_fini(htable_t *t);

/* Link n under key (n must not be in a table; a string key must outlive
 * n's membership). Never fails. */
void htable_insert_str(htable_t *t, htable_node_t *n, const char *key);
void htable_insert_u64(htable_t *t, htable_node_t *n, uint64_t key);

/* The node with key, or NULL. */
htable_node_t *htable_find_str(const htable_t *t, const char *key);
htable_node_t *htable_find_u64(const htable_t *t, uint64_t key);

/* Unlink n. Returns 1, or 0 when n was not in t (harmless). */
int  htable_remove(htable_t *t, htable_node_t *n);

static inline size_t htable_count(const htable_t *t) { return t->count; }

/* Some node, or NULL when empty. The search starts at bucket *hint
 * (start with 0) and leaves *hint where the node was found, so
 *   size_t hint = 0;
 *   while ((n = htable_first(t, &hint))) { htable_remove(t, n); ... }
 * drains a table in O(buckets + nodes) even when the code in the loop
 * inserts (and grows the table) or removes other nodes. */
htable_node_t *htable_first(const htable_t *t, size_t *hint);

void           htable_iter_init(htable_iter_t *it, const htable_t *t);
/* The next node, or NULL at the end. */
htable_node_t *htable_iter_next(htable_iter_t *it);

#endif

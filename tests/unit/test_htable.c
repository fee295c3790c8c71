/*
 * Unit tests for core/htable: exact behaviour of insert, find, remove,
 * growth (also when the allocator refuses), iteration while removing,
 * and draining with htable_first() while the loop body inserts.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/htable.h"

typedef struct item {
    htable_node_t node;
    int           seen;
    uint64_t      id;
    char          name[24];
} item_t;

static item_t *item_of(htable_node_t *n)
{
    return n ? HTABLE_ENTRY(n, item_t, node) : NULL;
}

static void test_str_insert_find_remove(void **state)
{
    htable_t t;
    assert_int_equal(htable_init(&t, HTABLE_STR, 0, NULL), 0);
    assert_int_equal(t.nbuckets, 16);
    item_t a = { .name = "example.com" }, b = { .name = "example.org" };
    assert_null(htable_find_str(&t, "example.com"));
    htable_insert_str(&t, &a.node, a.name);
    htable_insert_str(&t, &b.node, b.name);
    assert_int_equal(htable_count(&t), 2);
    assert_ptr_equal(item_of(htable_find_str(&t, "example.com")), &a);
    assert_ptr_equal(item_of(htable_find_str(&t, "example.org")), &b);
    assert_null(htable_find_str(&t, "example.net"));
    assert_null(htable_find_str(&t, "EXAMPLE.COM")); /* keys compare exactly */
    assert_null(htable_find_str(&t, ""));

    assert_int_equal(htable_remove(&t, &a.node), 1);
    assert_int_equal(htable_remove(&t, &a.node), 0); /* not a member: harmless */
    assert_int_equal(htable_count(&t), 1);
    assert_null(htable_find_str(&t, "example.com"));
    assert_ptr_equal(item_of(htable_find_str(&t, "example.org")), &b);

    /* a removed node can go in again, under another key */
    strcpy(a.name, "example.net");
    htable_insert_str(&t, &a.node, a.name);
    assert_ptr_equal(item_of(htable_find_str(&t, "example.net")), &a);
    assert_int_equal(htable_count(&t), 2);
    htable_fini(&t);
    assert_null(t.buckets);
    htable_fini(NULL);
}

static void test_duplicates_find_newest(void **state)
{
    htable_t t;
    assert_int_equal(htable_init(&t, HTABLE_STR, 4, NULL), 0);
    item_t a = { .name = "k" }, b = { .name = "k" };
    htable_insert_str(&t, &a.node, a.name);
    htable_insert_str(&t, &b.node, b.name);
    assert_ptr_equal(item_of(htable_find_str(&t, "k")), &b);
    htable_remove(&t, &b.node);
    assert_ptr_equal(item_of(htable_find_str(&t, "k")), &a);
    htable_fini(&t);
}

static void test_u64_keys(void **state)
{
    htable_t t;
    assert_int_equal(htable_init(&t, HTABLE_U64, 0, NULL), 0);
    /* ids that differ only in high bits or are multiples of a power of
     * two must still be told apart (and spread) */
    uint64_t keys[] = { 0, 1, 2, 1024, 2048, (uint64_t)1 << 40, (uint64_t)1 << 63, UINT64_MAX };
    enum { N = sizeof(keys) / sizeof(keys[0]) };
    item_t it[N];
    memset(it, 0, sizeof(it));
    for (size_t i = 0; i < N; i++) {
        it[i].id = keys[i];
        htable_insert_u64(&t, &it[i].node, keys[i]);
    }
    for (size_t i = 0; i < N; i++)
        assert_ptr_equal(item_of(htable_find_u64(&t, keys[i])), &it[i]);
    assert_null(htable_find_u64(&t, 3));
    assert_null(htable_find_u64(&t, 4096));
    htable_fini(&t);

    /* keys that share their low 20 bits still spread: no long chain */
    enum { M = 4096 };
    item_t *many = calloc(M, sizeof(*many));
    assert_int_equal(htable_init(&t, HTABLE_U64, M, NULL), 0);
    for (uint64_t i = 0; i < M; i++)
        htable_insert_u64(&t, &many[i].node, i << 20);
    size_t longest = 0;
    for (size_t b = 0; b < t.nbuckets; b++) {
        size_t len = 0;
        for (htable_node_t *n = t.buckets[b]; n != NULL; n = n->hnext)
            len++;
        if (len > longest)
            longest = len;
    }
    assert_true(longest <= 10);
    htable_fini(&t);
    free(many);
}

static void test_grow(void **state)
{
    enum { N = 5000 };
    htable_t t;
    assert_int_equal(htable_init(&t, HTABLE_U64, 0, NULL), 0);
    item_t *it = calloc(N, sizeof(*it));
    for (size_t i = 0; i < N; i++) {
        it[i].id = i + 1;
        htable_insert_u64(&t, &it[i].node, i + 1);
        assert_true(htable_count(&t) <= t.nbuckets); /* load at most 1 */
    }
    assert_int_equal(htable_count(&t), N);
    assert_int_equal(t.nbuckets, 8192);
    for (size_t i = 0; i < N; i++)
        assert_ptr_equal(item_of(htable_find_u64(&t, i + 1)), &it[i]);
    /* removing does not shrink; everything left is still found */
    for (size_t i = 0; i < N; i += 2)
        assert_int_equal(htable_remove(&t, &it[i].node), 1);
    assert_int_equal(htable_count(&t), N / 2);
    for (size_t i = 0; i < N; i++)
        assert_ptr_equal(item_of(htable_find_u64(&t, i + 1)), i % 2 ? &it[i] : NULL);
    htable_fini(&t);
    free(it);

    /* the hint sizes the table up front */
    assert_int_equal(htable_init(&t, HTABLE_STR, 1000, NULL), 0);
    assert_int_equal(t.nbuckets, 1024);
    htable_fini(&t);
}

static int fail_calls;
static void *failing_calloc(size_t n, size_t size)
{
    if (fail_calls-- <= 0)
        return NULL;
    return calloc(n, size);
}

/* An allocator that refuses: init reports it; growth carries on at the
 * old size and stays correct. */
static void test_alloc_failure(void **state)
{
    htable_t t;
    fail_calls = 0;
    assert_int_equal(htable_init(&t, HTABLE_STR, 0, failing_calloc), -1);
    assert_null(t.buckets);
    assert_int_equal(t.nbuckets, 0);
    htable_fini(&t);

    fail_calls = 1; /* the buckets, then nothing more */
    assert_int_equal(htable_init(&t, HTABLE_STR, 0, failing_calloc), 0);
    enum { N = 100 };
    item_t it[N];
    memset(it, 0, sizeof(it));
    for (int i = 0; i < N; i++) {
        snprintf(it[i].name, sizeof(it[i].name), "host-%d.example", i);
        htable_insert_str(&t, &it[i].node, it[i].name);
    }
    assert_int_equal(t.nbuckets, 16);
    assert_int_equal(htable_count(&t), N);
    for (int i = 0; i < N; i++)
        assert_ptr_equal(item_of(htable_find_str(&t, it[i].name)), &it[i]);
    htable_fini(&t);
}

/* Every node exactly once; removing (and freeing) the node just returned
 * is allowed, and the rest of the walk is not disturbed. */
static void test_iterate_while_deleting(void **state)
{
    enum { N = 300 };
    htable_t t;
    assert_int_equal(htable_init(&t, HTABLE_U64, 0, NULL), 0);
    for (uint64_t i = 0; i < N; i++) {
        item_t *x = calloc(1, sizeof(*x));
        x->id = i;
        htable_insert_u64(&t, &x->node, i);
    }
    htable_iter_t it;
    int seen[N] = { 0 };
    size_t visits = 0;
    htable_iter_init(&it, &t);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        item_t *x = item_of(n);
        assert_int_equal(n->key.u64, x->id);
        seen[x->id]++;
        visits++;
        if (x->id % 3 != 0) {
            assert_int_equal(htable_remove(&t, n), 1);
            memset(x, 0xa5, sizeof(*x)); /* a walk that still read it would go astray */
            free(x);
        }
    }
    assert_int_equal(visits, N);
    for (int i = 0; i < N; i++)
        assert_int_equal(seen[i], 1);
    assert_int_equal(htable_count(&t), N / 3);
    for (uint64_t i = 0; i < N; i++)
        assert_int_equal(htable_find_u64(&t, i) != NULL, i % 3 == 0);

    /* a second walk sees exactly the survivors; free them all on the way */
    visits = 0;
    htable_iter_init(&it, &t);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        assert_int_equal(item_of(n)->id % 3, 0);
        htable_remove(&t, n);
        free(item_of(n));
        visits++;
    }
    assert_int_equal(visits, N / 3);
    assert_int_equal(htable_count(&t), 0);
    htable_iter_init(&it, &t);
    assert_null(htable_iter_next(&it));
    htable_fini(&t);
}

/* htable_first() drains a table even when the loop body inserts new
 * nodes (enough to make it grow) and removes others, as teardown
 * callbacks do; a hint past the end starts from the beginning. */
static void test_first_drains(void **state)
{
    enum { N = 12, MAX = 200 };
    htable_t t;
    assert_int_equal(htable_init(&t, HTABLE_U64, 0, NULL), 0);
    static item_t it[MAX];
    memset(it, 0, sizeof(it));
    for (int i = 0; i < N; i++) {
        it[i].id = (uint64_t)i;
        htable_insert_u64(&t, &it[i].node, it[i].id);
    }
    size_t hint = 0;
    assert_null(htable_first(&(htable_t){ .buckets = NULL, .nbuckets = 0, .count = 0 }, &hint));
    hint = 1000; /* past the end: starts from the beginning */
    int next_new = N, taken = 0;
    size_t most_buckets = t.nbuckets;
    htable_node_t *n;
    while ((n = htable_first(&t, &hint)) != NULL) {
        htable_remove(&t, n);
        item_of(n)->seen++;
        taken++;
        /* a callback starts two more ... */
        for (int k = 0; k < 2 && next_new < MAX; k++, next_new++) {
            it[next_new].id = (uint64_t)next_new;
            htable_insert_u64(&t, &it[next_new].node, it[next_new].id);
        }
        if (t.nbuckets > most_buckets)
            most_buckets = t.nbuckets;
        /* ... and cancels one */
        htable_node_t *o = htable_find_u64(&t, item_of(n)->id + 1);
        if (o != NULL && item_of(n)->id % 5 == 0) {
            htable_remove(&t, o);
            item_of(o)->seen++;
            taken++;
        }
    }
    assert_true(most_buckets > 16); /* it grew while being drained */
    assert_int_equal(htable_count(&t), 0);
    assert_int_equal(next_new, MAX);
    assert_int_equal(taken, MAX);
    for (int i = 0; i < MAX; i++)
        assert_int_equal(it[i].seen, 1);
    htable_fini(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_str_insert_find_remove),
        cmocka_unit_test(test_duplicates_find_newest),
        cmocka_unit_test(test_u64_keys),
        cmocka_unit_test(test_grow),
        cmocka_unit_test(test_alloc_failure),
        cmocka_unit_test(test_iterate_while_deleting),
        cmocka_unit_test(test_first_drains),
    };
    return cmocka_run_group_tests_name("htable", tests, NULL, NULL);
}

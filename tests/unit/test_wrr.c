/*
 * tests/unit/test_wrr.c - deliverer/wrr: the exact smooth weighted round
 * robin sequence, exact shares over a long run, ineligible members, the
 * reset on a member count change and the LRU bound on keys.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "deliverer/wrr.h"

/* 3:1 is a a b a, twice over 8 picks (nginx's smooth order, not a a a b). */
static void test_smooth_sequence(void **state)
{
    (void)state;
    wrr_t *w = wrr_new(0);
    const unsigned wt[] = { 3, 1 };
    char seq[16] = "";
    for (int i = 0; i < 8; i++)
        seq[i] = (char)('a' + wrr_pick(w, "pool/site", wt, NULL, 2));
    assert_string_equal(seq, "aabaaaba");
    /* 5:1:1 (nginx's documented example): a a b a c a a */
    const unsigned w3[] = { 5, 1, 1 };
    memset(seq, 0, sizeof(seq));
    for (int i = 0; i < 7; i++)
        seq[i] = (char)('a' + wrr_pick(w, "other", w3, NULL, 3));
    assert_string_equal(seq, "aabacaa");
    assert_int_equal(wrr_count(w), 2);
    wrr_free(w);
}

static void test_exact_shares(void **state)
{
    (void)state;
    wrr_t *w = wrr_new(0);
    const unsigned wt[] = { 5, 3, 2 };
    int got[3] = { 0, 0, 0 };
    for (int i = 0; i < 1000; i++) {
        int k = wrr_pick(w, "p/s", wt, NULL, 3);
        assert_in_range(k, 0, 2);
        got[k]++;
    }
    assert_int_equal(got[0], 500);
    assert_int_equal(got[1], 300);
    assert_int_equal(got[2], 200);
    wrr_free(w);
}

/* An ineligible member is never chosen; the others keep 5:2 among
 * themselves (exactly, over whole windows of 7); eligible again, it is
 * back in the rotation. */
static void test_ineligible_skipped(void **state)
{
    (void)state;
    wrr_t *w = wrr_new(0);
    const unsigned wt[] = { 5, 3, 2 };
    const unsigned char el[] = { 1, 0, 1 };
    int got[3] = { 0, 0, 0 };
    for (int i = 0; i < 700; i++)
        got[wrr_pick(w, "p/s", wt, el, 3)]++;
    assert_int_equal(got[0], 500);
    assert_int_equal(got[1], 0);
    assert_int_equal(got[2], 200);
    got[0] = got[1] = got[2] = 0;
    for (int i = 0; i < 1000; i++)
        got[wrr_pick(w, "p/s", wt, NULL, 3)]++;
    assert_int_equal(got[0], 500);
    assert_int_equal(got[1], 300);
    assert_int_equal(got[2], 200);
    /* none eligible, all weights 0, no members: -1 */
    const unsigned char none[] = { 0, 0, 0 };
    assert_int_equal(wrr_pick(w, "p/s", wt, none, 3), -1);
    const unsigned zero[] = { 0, 0 };
    assert_int_equal(wrr_pick(w, "p/z", zero, NULL, 2), -1);
    assert_int_equal(wrr_pick(w, "p/e", wt, NULL, 0), -1);
    /* a weight-0 member counts as ineligible */
    const unsigned wz[] = { 0, 1 };
    for (int i = 0; i < 4; i++)
        assert_int_equal(wrr_pick(w, "p/w", wz, NULL, 2), 1);
    wrr_free(w);
}

/* A changed member count restarts the key's sequence. */
static void test_member_count_change_resets(void **state)
{
    (void)state;
    wrr_t *w = wrr_new(0);
    const unsigned wt[] = { 3, 1, 1 };
    assert_int_equal(wrr_pick(w, "k", wt, NULL, 2), 0); /* a: a=-1 b=1 */
    assert_int_equal(wrr_pick(w, "k", wt, NULL, 2), 0); /* a: a=-2 b=2 */
    /* without the reset, b (2+1=3 against a=1) would come first */
    char seq[8] = "";
    for (int i = 0; i < 5; i++)
        seq[i] = (char)('a' + wrr_pick(w, "k", wt, NULL, 3));
    assert_string_equal(seq, "abaca");
    wrr_free(w);
}

/* At most max_keys keys; the least recently picked one goes (and starts
 * afresh when it comes back). */
static void test_lru_bound(void **state)
{
    (void)state;
    wrr_t *w = wrr_new(2);
    const unsigned wt[] = { 1, 1 };
    /* with 1:1 a remembered key alternates 0 1 0 1; a fresh one starts at 0 */
    assert_int_equal(wrr_pick(w, "A", wt, NULL, 2), 0);
    assert_int_equal(wrr_pick(w, "B", wt, NULL, 2), 0);
    assert_int_equal(wrr_count(w), 2);
    assert_int_equal(wrr_pick(w, "C", wt, NULL, 2), 0); /* evicts A, the least recently picked */
    assert_int_equal(wrr_count(w), 2);
    assert_int_equal(wrr_pick(w, "B", wt, NULL, 2), 1); /* remembered */
    assert_int_equal(wrr_pick(w, "A", wt, NULL, 2), 0); /* forgotten (remembered: 1); evicts C */
    assert_int_equal(wrr_pick(w, "C", wt, NULL, 2), 0); /* forgotten (remembered: 1); evicts B */
    assert_int_equal(wrr_pick(w, "A", wt, NULL, 2), 1); /* remembered */
    assert_int_equal(wrr_count(w), 2);
    wrr_free(w);
    wrr_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_smooth_sequence),
        cmocka_unit_test(test_exact_shares),
        cmocka_unit_test(test_ineligible_skipped),
        cmocka_unit_test(test_member_count_change_resets),
        cmocka_unit_test(test_lru_bound),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

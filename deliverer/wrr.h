/*
 * deliverer/wrr.h - smooth weighted round robin, per key (nginx's
 * upstream algorithm): the choice of an egress source in a pool for one
 * destination ("pool/site" keys).
 *
 * Each key keeps one running "current" value per member. A pick adds
 * every eligible member's weight to its current, takes the member with
 * the largest current (the first one on a tie), and subtracts the total
 * of the eligible weights from it. Over any window of sum(weights) picks
 * every member is chosen exactly weight times, interleaved as evenly as
 * possible (3:1 gives a a b a, not a a a b). An ineligible member (or
 * one of weight 0) neither gains nor is chosen; the others keep their
 * ratio among themselves.
 *
 * Bounded: at most max_keys keys are remembered; one more forgets the
 * least recently picked. A key whose member count changed starts afresh.
 *
 * Thread-safety: none; one table per worker, used from its loop.
 */
#ifndef MP_DELIVERER_WRR_H
#define MP_DELIVERER_WRR_H

#include <stddef.h>

typedef struct wrr wrr_t;

/* A table remembering at most max_keys keys (0 = 4096). */
wrr_t *wrr_new(size_t max_keys);
/* NULL is harmless. */
void   wrr_free(wrr_t *w);
/* weights[n]; eligible NULL = all (else eligible[i] non-zero); returns
 * the chosen index, -1 when none is eligible (or every eligible weight is
 * 0). The key is copied. */
int    wrr_pick(wrr_t *w, const char *key, const unsigned *weights, const unsigned char *eligible, size_t n);
/* Keys remembered now. */
size_t wrr_count(const wrr_t *w);

#endif

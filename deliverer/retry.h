/*
 * deliverer/retry.h - the retry policy, as pure functions.
 *
 * Two layers (docs/operations.md, "Delivery guarantees"):
 *  - fast retries inside one attempt, for network jitter (connection
 *    refused/reset, timeouts): base x 2^n capped at 3 s, +-15 % jitter;
 *  - retries across attempts for transient replies: the message goes to
 *    the delay queue ("level") chosen by exponential backoff with jitter,
 *    per priority class, never shorter than a delay the server asked for.
 * Nothing here does I/O or reads the clock; callers pass the randomness.
 */
#ifndef MP_DELIVERER_RETRY_H
#define MP_DELIVERER_RETRY_H

#include <stddef.h>
#include <stdint.h>

#define RETRY_CLASSES 3 /* P0 = priority 8-10, P1 = 4-7, P2 = 0-3 */

typedef struct retry_levels retry_levels_t;

/* One priority class's policy: [retry] p<N>_* */
typedef struct retry_class_policy {
    uint64_t base_ms;      /* first retry delay; doubles per attempt */
    uint64_t max_age_ms;   /* then the recipients still pending bounce */
    unsigned max_attempts;
    unsigned fast_retries; /* network failures retried within one attempt */
    uint64_t fast_base_ms;
} retry_class_policy_t;

/* The whole [retry] section, translated once at start-up. */
typedef struct retry_policy {
    retry_class_policy_t cls[RETRY_CLASSES]; /* indexed by retry_class() */
    struct retry_levels {
        uint64_t *ms;    /* ascending */
        char    **names; /* "30s", "1m", ...: the queue name suffix */
        size_t    n;
    } levels;
    const char *queue_prefix;        /* delay queue: <prefix>.<level> */
    unsigned    poison_redeliveries; /* redeliveries without finishing -> dead; 0 never */
    uint64_t    max_age_ms;          /* the longest class's: how long the ledger keeps a record */
} retry_policy_t;

struct mp_config;
/* From cfg (validated); queue_prefix points into it. 0, or -1 with err. */
int  retry_policy_init(retry_policy_t *p, const struct mp_config *cfg, char *err, size_t errlen);
void retry_policy_free(retry_policy_t *p);

/* Parse "30s,1m,5m". 0, or -1 (levels left empty) on a bad spec. */
int  retry_levels_parse(const char *spec, retry_levels_t *out);
void retry_levels_free(retry_levels_t *l);

/* The delay queue of level i: "<prefix>.<level name>", e.g. mail.retry.5m. */
void retry_queue_name(const char *prefix, const retry_levels_t *l, size_t i, char *out, size_t outlen);

/* Priority class of an AMQP priority: 0 for 8-10, 1 for 4-7, 2 for 0-3. */
int  retry_class(int priority);

/* Jittered exponential delay: base x 2^(attempt-1) scaled by a factor in
 * [0.85, 1.15) taken from rnd in [0, 1). attempt >= 1. */
uint64_t retry_backoff_ms(uint64_t base_ms, unsigned attempt, double rnd);

/* The level for the next attempt: the shortest level at least as long as
 * max(want_ms, server_ms); the longest level when none is. */
size_t retry_pick_level(const retry_levels_t *l, uint64_t want_ms, uint64_t server_ms);

/* Fast retry n (0-based) inside an attempt: base x 2^n capped at 3 s, with
 * +-15 % jitter from rnd in [0, 1). */
uint64_t retry_fast_delay_ms(uint64_t base_ms, unsigned n, double rnd);

/* A delay the server asked for in its reply text ("try again in 5
 * minutes", "retry after 300 seconds", "wait 2 hours"), in ms; 0 if none. */
uint64_t retry_server_delay_ms(const char *text);

#endif

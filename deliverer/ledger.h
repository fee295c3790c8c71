/*
 * deliverer/ledger.h - per-recipient delivery records in Redis, so a
 * redelivered message never sends a recipient twice.
 *
 * Key mp:r:<message id>:<recipient> holds "sending" (set for the
 * recipients a server accepted, while their transaction holds its body
 * after the 354: just before the final dot) or "done" (set after a 2xx;
 * "done-dup" when that delivery was flagged as a possible duplicate, so
 * the flag outlives an attempt that dies before its event goes out),
 * with TTL = the longest maximum message age. A redelivery skips "done"
 * recipients and delivers "sending" ones again, flagged as possible
 * duplicates: the one window no sender can close (RFC 1047). Key
 * mp:d:<message id> counts the attempts of a message that crashed a
 * worker (core/crash.h writes it from the signal handler) or could not
 * be finished (a publish failed), for the poison-message limit;
 * mp:m:<message id> holds the digest of the message's body and
 * mp:a:<body digest> the id given to a message that came without one
 * (ledger_claim).
 *
 * Every call completes through its callback exactly once and never
 * synchronously; ok=0 means Redis could not answer (down or slow) and the
 * caller carries on at-least-once.
 */
#ifndef MP_DELIVERER_LEDGER_H
#define MP_DELIVERER_LEDGER_H

#include <stddef.h>
#include <stdint.h>

#include "core/rclient.h"

typedef enum {
    LEDGER_NONE = 0,
    LEDGER_SENDING,
    LEDGER_DONE,
    LEDGER_DONE_FLAGGED, /* "done-dup": delivered, and that copy may have been a second one */
    LEDGER_HANDING,      /* "retry:<hop>": being republished, pending, to the retry <hop> */
    LEDGER_HANDED,       /* "retried:<hop>": the retry <hop> is queued (confirmed) with it pending */
} ledger_state_t;

typedef struct ledger ledger_t;

/* states has n entries, valid only during the call (ok=0: all NONE);
 * hops[i] is the retry token of a HANDING or HANDED entry, else NULL. */
typedef void (*ledger_lookup_cb)(void *arg, int ok, const ledger_state_t *states, const char *const *hops);
typedef void (*ledger_done_cb)(void *arg, int ok);
typedef void (*ledger_count_cb)(void *arg, int ok, long long count);

/* rc is borrowed; NULL makes every call complete with ok=0. Free the
 * rclient before the ledger: its pending replies then arrive (as failures)
 * while the ledger still exists. */
ledger_t *ledger_new(loop_t *loop, rclient_t *rc, uint64_t ttl_ms);
void      ledger_free(ledger_t *l); /* pending callbacks fire with ok=0 */

uint64_t ledger_lookup(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                       ledger_lookup_cb cb, void *arg);
/*
 * ledger_lookup() and the suppression lists (deliverer/suplist.h) in the
 * same command, one EVAL: for each of the nkeys hashes keys[] (global,
 * tenant), the value of field fields[i] (NULL: not looked up) for every
 * recipient. sup[k * n + i] is what keys[k] holds for recipient i (NULL:
 * nothing), valid during the call; ok=0 leaves every one NULL.
 */
typedef void (*ledger_lookup_sup_cb)(void *arg, int ok, const ledger_state_t *states, const char *const *hops,
                                     const char *const *sup);
uint64_t ledger_lookup_sup(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                           const char *const *keys, size_t nkeys, const char *const *fields,
                           ledger_lookup_sup_cb cb, void *arg);
/* Set (state SENDING or DONE) or clear (NONE) the records of n recipients. */
uint64_t ledger_mark(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                     ledger_state_t state, ledger_done_cb cb, void *arg);
/* Record n recipients as handed to the retry republish hop: HANDING
 * before it is published, HANDED once the broker confirmed it. */
uint64_t ledger_mark_handoff(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                             ledger_state_t state, const char *hop, ledger_done_cb cb, void *arg);
/* The poison count of msg_id (GET; 0 when there is none), not changed. */
uint64_t ledger_poison_count(ledger_t *l, const char *msg_id, ledger_count_cb cb, void *arg);
/* One more attempt of msg_id that could not be finished (INCR, PEXPIRE);
 * the callback gets the new count. */
uint64_t ledger_poison_charge(ledger_t *l, const char *msg_id, ledger_count_cb cb, void *arg);
/*
 * Claim key mp:<ns>:<name> for value, kept as long as the records (one
 * command, SET ... GET, Redis 7): the callback gets the value that now
 * holds the key: value itself when the key was free (or replace is set:
 * ours overwrites whatever was there), the earlier holder's otherwise.
 * ok=0 (holder NULL): Redis could not answer. holder is valid during the
 * call. The job keeps a message's body digest under its id this way (an
 * id reused for another message is caught) and the id it assigned to a
 * message that came without one under the body's digest.
 */
typedef void (*ledger_claim_cb)(void *arg, int ok, const char *holder);
uint64_t ledger_claim(ledger_t *l, char ns, const char *name, const char *value, int replace, ledger_claim_cb cb,
                      void *arg);
/* EVALs of marks sent so far: every ledger_mark() of one loop iteration
 * shares one (tests and debugging). */
uint64_t ledger_batches(const ledger_t *l);
/* The callback of this call will not fire. */
void     ledger_cancel(ledger_t *l, uint64_t id);

#endif

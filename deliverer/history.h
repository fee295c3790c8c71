/*
 * deliverer/history.h - a message's history in Redis, for
 * `mailpump trace` (control/trace.h): what every attempt did.
 *
 * Key mp:h:<message id> is a list of compact JSON records, oldest first:
 * for each attempt, one "attempt" record (its number, when it started,
 * the retry it planned or the dead letter it chose) followed by the
 * very events the attempt published (queue/event.h: one per recipient,
 * one per Sent copy or dead letter), byte for byte, so the history and
 * the events never disagree. An attempt's records go in with ONE
 * command at the end of the attempt (EVAL: RPUSH, PEXPIRE, LTRIM to the
 * last max_records), never one per recipient; an attempt keeps its
 * record and its first max_records - 1 events (the attempt record counts
 * the others as "omitted"), so a message with very many recipients costs
 * neither the job's memory nor Redis more than that. Nothing waits: a
 * failure is only counted (mailpump_trace_write_failures_total).
 * docs/operations.md, "Tracing a message", says what it costs.
 */
#ifndef MP_DELIVERER_HISTORY_H
#define MP_DELIVERER_HISTORY_H

#include <stddef.h>
#include <stdint.h>

#include "core/rclient.h"

/* The attempt record's fields. */
typedef struct history_attempt {
    const char *message_id;
    unsigned    attempt;
    uint64_t    started_ms;   /* wall clock, when the attempt was consumed */
    uint64_t    finished_ms;  /* wall clock, when its events were built; 0 = now */
    size_t      recipients;   /* recipients it handled (its events), 0 for a dead message */
    size_t      omitted;      /* events not kept: past max_records for one attempt */
    int         retrying;     /* a retry is planned: the fields below are set */
    size_t      retry_level;
    const char *retry_queue;
    uint64_t    retry_delay_ms;
    unsigned    retry_attempt; /* the attempt number the retry will run as */
    const char *give_up;       /* transient recipients made final: why; NULL or "": none */
    const char *dead_reason;   /* set: the message was dead-lettered */
    const char *dead_queue;
} history_attempt_t;

/* The attempt record as compact JSON (malloc'd):
 * {"event":"attempt","message_id","attempt","ts","started_ms","finished_ms",
 *  "recipients", ["omitted"], ["retry":{"level","queue","delay_ms","due","due_ms","attempt"}],
 *  ["give_up"], ["dead":{"reason","queue"}]}; ts is the ISO 8601 start. */
char *history_attempt_json(const history_attempt_t *a);

/* "2026-12-08T01:02:03.456Z" of a wall-clock time in ms. */
void history_format_ts(uint64_t ms, char *out, size_t len);

/* The key of msg_id's history (malloc'd). */
char *history_key(const char *msg_id);

/* Append n records to msg_id's history in one EVAL, keep the last
 * max_records and set the list's lifetime to ttl_ms. Fire and forget:
 * returns at once; a failed write increments the metric. Returns the
 * number of commands sent (1, or 0 when n is 0 or rc NULL), also counted
 * in mailpump_trace_writes_total. */
int history_write(rclient_t *rc, const char *msg_id, const char *const *recs, size_t n, uint64_t ttl_ms,
                  unsigned max_records);

#endif

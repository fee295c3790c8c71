/*
 * deliverer/envelope.h - the state a message carries from one attempt to
 * the next, and the reason a dead letter carries, as AMQP headers.
 *
 * A retried message is the original body republished to a delay queue;
 * what the next attempt must know travels beside it as x-mailpump-*
 * headers. This file is the only code that names them: the job reads an
 * envelope when a message arrives and writes one when it schedules a
 * retry; nothing else looks at those headers.
 *
 * Reading is forgiving (a missing or garbled header gives the value of a
 * first attempt): the headers come from the broker, and an application
 * may publish straight to the queue without them.
 */
#ifndef MP_DELIVERER_ENVELOPE_H
#define MP_DELIVERER_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

#include "queue/mq.h"

typedef struct envelope {
    unsigned    attempt;       /* 1 for the first delivery attempt */
    uint64_t    first_seen_ms; /* wall clock of the first consume */
    const char *pending;       /* recipients still to deliver, comma-separated; NULL: every
                                * recipient of the message (a first attempt) */
    int         appended;      /* an earlier attempt stored the Sent copy */
    int         append_needed; /* an earlier attempt delivered but could not store it */
    int         append_only;   /* every recipient is settled: only the Sent copy is left */
} envelope_t;

/* The envelope dv carries; pending points into dv. A first_seen_ms that
 * is missing, zero or in the future (another host's clock) becomes
 * now_wall_ms. */
void envelope_read(const mq_delivery_t *dv, uint64_t now_wall_ms, envelope_t *out);

/* 1 when addr is one of e's pending recipients (case-insensitive), or
 * when e names none (every recipient is pending). */
int envelope_is_pending(const envelope_t *e, const char *addr);

/* The headers of a republish carrying e: out->hdr[0..out->n-1], pointing
 * into out and into e->pending (keep both alive until mq_publish()
 * returns; it copies them). */
#define ENVELOPE_MAX_HEADERS 6
typedef struct envelope_headers {
    mq_header_t hdr[ENVELOPE_MAX_HEADERS];
    size_t      n;
    char        attempt[16];
    char        first_seen[24];
} envelope_headers_t;
void envelope_write(const envelope_t *e, envelope_headers_t *out);

/* The headers of a dead letter: why, and when (wall clock ms). */
typedef struct envelope_dead {
    mq_header_t hdr[2];
    size_t      n;
    char        when[24];
} envelope_dead_t;
void envelope_dead_write(const char *reason, uint64_t now_wall_ms, envelope_dead_t *out);

#endif

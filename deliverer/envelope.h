/*
 * deliverer/envelope.h - the state a message carries from one attempt to
 * the next, and the reason a dead letter carries, as AMQP headers.
 *
 * A retried message is the original body republished to a delay queue;
 * what the next attempt must know travels beside it as x-mailpump-*
 * headers. This file is the only code that names them: the job reads an
 * envelope when a message arrives and writes one when it schedules a
 * retry or assigns an id; nothing else looks at those headers.
 *
 * The recipients still pending are a bit set over the message's own
 * recipient list (to, cc, bcc in order, each address once: the order the
 * job builds), not their addresses: every address the parser accepts is
 * then unambiguous (a quoted local part may hold a comma), and 10,000
 * recipients take 1,668 bytes, far inside the broker's frame. Retries
 * written by earlier versions carry a comma-separated list instead; it
 * is still read.
 *
 * Reading is forgiving (a missing or garbled header gives the value of a
 * first attempt): the headers come from the broker, and an application
 * may publish straight to the queue without them.
 */
#ifndef MP_DELIVERER_ENVELOPE_H
#define MP_DELIVERER_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "queue/mq.h"

typedef struct envelope {
    unsigned       attempt;       /* 1 for the first delivery attempt */
    uint64_t       first_seen_ms; /* wall clock of the first consume */
    const char    *id;            /* the id assigned to a message that had none; NULL */
    const char    *copy;          /* the republish that assigned it: a token of its own, so
                                   * that a second such republish (see job.c, ASSIGN) is
                                   * known for what it is; NULL on anything else */
    const char    *hop;           /* the retry republish this is: a token of its own, which the
                                   * ledger names for the recipients handed to it (job.c,
                                   * HANDOFF); NULL for the message as first published */
    /* pending recipients: a bit per recipient (bit i of byte i / 8, low bit
     * first), or the legacy list; neither: every recipient (a first attempt) */
    unsigned char *pending_set;   /* owned by the envelope read; borrowed when writing */
    size_t         pending_nbits;
    const char    *pending_list;  /* legacy, comma-separated; read only */
    int            appended;      /* an earlier attempt stored the Sent copy */
    int            append_needed; /* an earlier attempt delivered but could not store it */
    int            append_only;   /* every recipient is settled: only the Sent copy is left */
} envelope_t;

/* The envelope dv carries; id and pending_list point into dv. A
 * first_seen_ms that is missing, zero or in the future (another host's
 * clock) becomes now_wall_ms. Free with envelope_free(). */
void envelope_read(const mq_delivery_t *dv, uint64_t now_wall_ms, envelope_t *out);
/* What envelope_read() allocated. */
void envelope_free(envelope_t *e);

/* 1 when recipient i (addr) is still pending: its bit, or its address in
 * the legacy list (case-insensitive), or every recipient when the
 * envelope names none. */
int envelope_is_pending(const envelope_t *e, size_t i, const char *addr);

/* Bit i of a pending set of nbits (see envelope_t). */
static inline void envelope_set_bit(unsigned char *set, size_t i) { set[i / 8] |= (unsigned char)(1u << (i % 8)); }
static inline size_t envelope_set_bytes(size_t nbits) { return (nbits + 7) / 8; }

/* The headers of a republish carrying e (no pending set: every recipient
 * is pending): out->hdr[0..out->n-1], pointing
 * into out and into e (keep both alive until mq_publish() returns; it
 * copies them). Release with envelope_headers_free(). */
#define ENVELOPE_MAX_HEADERS 10
typedef struct envelope_headers {
    mq_header_t hdr[ENVELOPE_MAX_HEADERS];
    size_t      n;
    char        attempt[16];
    char        first_seen[24];
    buf_t       pending;
} envelope_headers_t;
void envelope_write(const envelope_t *e, envelope_headers_t *out);
void envelope_headers_free(envelope_headers_t *h);

/* The headers of a dead letter: why, and when (wall clock ms). */
typedef struct envelope_dead {
    mq_header_t hdr[4];
    size_t      n;
    char        when[24];
    char        size[24];
} envelope_dead_t;
void envelope_dead_write(const char *reason, uint64_t now_wall_ms, envelope_dead_t *out);
/* After envelope_dead_write(): the dead letter carries only the head of
 * a body announced at announced bytes (x-mailpump-truncated: 1,
 * x-mailpump-original-size). */
void envelope_dead_truncated(envelope_dead_t *out, uint64_t announced);

#endif

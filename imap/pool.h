/*
 * imap/pool.h - the pool's side of an append request (internal to
 * imap/; the public pool API is in imap.h).
 */
#ifndef MP_IMAP_POOL_H
#define MP_IMAP_POOL_H

#include "imap/append.h"

/* Serve the valid request a (state INIT) through p: on a parked session,
 * a new connection, or queued (WAIT) until one comes free or its timeout.
 * Its result comes through imap_append_report() or imap_append_finish(),
 * never from inside this call. */
void imap_pool_submit(imap_pool_t *p, imap_append_t *a);
/* Take back a request in WAIT or POOLED; it gets no result. A request
 * carried alone closes its connection; one of a MULTIAPPEND is only
 * forgotten once all of the batch has been written out, else the shared
 * connection is closed and the others fail with IMAP_ENETWORK. */
void imap_pool_withdraw(imap_append_t *a);

#endif

/*
 * control/queue.h - what is queued and where (`mailpump queue`, GET
 * /v1/queue), and the dead letters: list and re-drive (`mailpump dead`,
 * GET /v1/dead, POST /v1/dead/redrive). Blocking, on a ctl_t
 * (control/ctl.h). The exact semantics are in docs/operations.md,
 * "Queue summary" and "Dead letters: list and re-drive".
 */
#ifndef MP_CONTROL_QUEUE_H
#define MP_CONTROL_QUEUE_H

#include <stddef.h>

#include <jansson.h>

#include "control/ctl.h"

/* The most messages one dead list or redrive reads from the dead queue. */
#define CTL_DEAD_MAX 100000

/* {"queues":[{"name","kind":"outbound"|"retry"|"dead","level":n|null,
 *             "delay_s":n|null,"messages":n|null,"consumers":n|null,
 *             "head_age_s":n|null (only with [amqp] management_url)}],
 *  "workers":[{"host","pid","worker","inflight","inflight_bytes",
 *              "smtp_connections","oldest_inflight_s":n|null,"updated_s_ago"}],
 *  "destinations":[{"destination","waiting","parked","deferred_recent",
 *                   "last_error":s|null,"last_error_age_s":n|null}],
 *  "oldest_age_s":n|null, "oldest_age_covers":"..."}
 * Depths by passive queue.declare (ready messages; a queue that does not
 * exist has null counts). Workers and destinations from the workers'
 * status records in Redis (SCAN mp:st:*): without Redis both are empty
 * and "workers_error" says why. Head ages from the management API
 * (ctl_mgmt_get: each queue's head message's AMQP timestamp), when
 * configured; "management_error" when it cannot answer. oldest_age_s: the
 * oldest of the head ages and of the workers' messages in flight. NULL +
 * *status (CTL_EUNAVAIL) + err when the broker cannot be reached. */
json_t *ctl_queue_summary(ctl_t *c, int *status, char *err, size_t errlen);

/* Browse the dead queue: up to limit messages (0: CTL_DEAD_MAX) whose
 * x-mailpump-reason contains reason_substr (NULL or "": all), read with
 * basic.get unacknowledged on a channel of their own that is then
 * closed, so every one goes back to the queue, in its place, marked
 * redelivered.
 * {"messages":[{"id":s|null,"reason":s|null,"size":n,"dead_at":s|null,
 *               "tenant":s|null,"recipients":n|null}],
 *  "total":n, "scanned":n}
 * total: the dead queue's ready messages before the browse (a dead
 * queue that does not exist has none). */
json_t *ctl_dead_list(ctl_t *c, const char *reason_substr, size_t limit, int *status, char *err,
                      size_t errlen);

/* Move up to limit (0: CTL_DEAD_MAX) dead letters whose reason contains
 * reason_substr back to [amqp] queue: each body is republished with a
 * publisher confirm (persistent, mandatory, its message-id and priority,
 * its headers but x-mailpump-reason and x-death, plus
 * x-mailpump-redriven: the times it was re-driven) and its dead copy is
 * acked only once the confirm arrived. Others are left in place. Only
 * the dead letters the queue held when the call started are read (one
 * re-driven that fails again lands at the tail and is not taken twice). The
 * first publish that fails stops the redrive; its dead copy stays.
 * {"redriven":n,"skipped":n,"failed":n,"ids":[...],"dry_run":b}
 * skipped: read and left (no match, or a truncated dead letter); ids:
 * the ids re-driven (with dry_run: those that would be, nothing moved).
 * NULL + CTL_EUNAVAIL when the broker cannot be reached; a failed
 * publish is not an error: "failed" is 1 and "error" says why. */
json_t *ctl_dead_redrive(ctl_t *c, const char *reason_substr, size_t limit, int dry_run, int *status,
                         char *err, size_t errlen);

#endif

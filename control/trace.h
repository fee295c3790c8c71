/*
 * control/trace.h - "what happened to message X": its history
 * (deliverer/history.h, key mp:h:<id>) and the ledger's records
 * (deliverer/ledger.h, mp:r:<id>:<recipient>) read back and summed up,
 * for `mailpump trace` and the HTTP API.
 *
 * ctl_trace() returns (the caller owns it):
 *   {"id": "...",
 *    "state": "done" | "queued" | "dead" | "in_flight" | "unknown",
 *    "where": {...},              -- by state, see below
 *    "tenant", "campaign", "sender": from the events (absent: not set),
 *    "attempts": attempts recorded,
 *    "expires_in_ms": the history's remaining lifetime ([trace] ttl),
 *    "recipients": [{"recipient", "outcome", "reason", "attempts",
 *                    "ledger" (the ledger's value, when it has one),
 *                    "last": {"attempt", "code", "enhanced", "text",
 *                             "mx_host", "mx_addr", "source", "ts"}}],
 *    "sent_copy": {"appended": bool, "mailbox", "uid", "uidvalidity",
 *                  "error", "ts"} (when a Sent copy was tried),
 *    "history": [every record, oldest first, as stored]}
 * outcome: delivered, deferred, bounced, suppressed (a bounce of reason
 * "suppressed"), dead, or unknown (only the ledger knows the recipient).
 * where:
 *   done       {"attempts", "finished"}: every recipient is final
 *   queued     {"level", "queue", "delay_ms", "due", "due_ms", "attempt",
 *               "pending": [recipients], "overdue": bool}: the last
 *               attempt planned this retry (overdue: its delay is over
 *               and no attempt has been recorded since: it waits in the
 *               outbound queue or is being delivered)
 *   dead       {"reason", "queue", "attempt", "ts"}: dead-lettered
 *   in_flight  {"recipients": [{"recipient", "ledger"}]}: the ledger
 *               shows recipients "sending" (mid-transaction) or
 *               "retry:<hop>" (a retry being queued): an attempt is
 *               running now
 *   unknown    {}: records that settle nothing
 * CTL_ENOTFOUND when nothing is recorded: the id was never seen, or its
 * history expired: the two cannot be told apart.
 */
#ifndef MP_CONTROL_TRACE_H
#define MP_CONTROL_TRACE_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "control/ctl.h"

/* *status is CTL_OK with a result, else a negative ctl_status_t with
 * err: CTL_EINVAL (an empty id), CTL_ENOTFOUND, CTL_EUNAVAIL (Redis). */
json_t *ctl_trace(ctl_t *c, const char *id, int *status, char *err, size_t errlen);

/* No I/O: the result above from the history's records (an array of
 * objects, borrowed) and the ledger's values (an object recipient ->
 * value, borrowed, or NULL), as of now_ms (wall clock). The history is
 * copied into "history"; "expires_in_ms" is not set. */
json_t *trace_summarize(const char *id, const json_t *records, const json_t *ledger, uint64_t now_ms);

#endif

/*
 * control/admin.h - operators' shaping actions: suspend, bounce, lower
 * the rate or the connection limit of deliveries chosen by a selector,
 * for a while, by hand (`mailpump admin`, and the HTTP API's
 * /v1/actions). They are the actions of deliverer/actions.h, written to
 * the same Redis hash (mp:act) with the same script, validated as the
 * workers validate them, with origin "admin:<who>"; every worker of every
 * pod honours one at its next poll (within about a second). See
 * docs/operations.md, "Suspending, resuming and bouncing".
 *
 * Ids: given (a request's "id", the CLI's --id) or generated ("adm-" and
 * 8 hex digits). Adding an id that is in force with the same kind,
 * selector, value and source extends it (expires = the later of both,
 * reason and origin from the new add); with anything else of those
 * different it is refused (CTL_ECONFLICT).
 *
 * An action as these functions return it (one JSON object):
 *   {"id": "adm-1a2b3c4d", "kind": "suspend|bounce|rate|connection_limit",
 *    "selector": "site|domain|source|pool|tenant|campaign",
 *    "value": "example.com", "source": "" (any source) or a source name,
 *    "rate": "30/m" (rate) or null, "connection_limit": 5 (connection_limit)
 *    or null, "created": Unix ms, "expires": Unix ms,
 *    "remaining_s": whole seconds left (rounded up), "reason": "...",
 *    "origin": "admin:alice@ops" or "automation:<rule>"}
 *
 * Errors: CTL_EINVAL for a request that is wrong (unknown kind or
 * selector, a duration, rate or limit that does not parse, a string that
 * does not fit), CTL_ENOTFOUND for an id or selector with nothing in
 * force, CTL_ECONFLICT (above), CTL_EUNAVAIL when Redis cannot answer;
 * err says which.
 *
 * Blocking (control/ctl.h): never from a worker loop.
 */
#ifndef MP_CONTROL_ADMIN_H
#define MP_CONTROL_ADMIN_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "control/ctl.h"
#include "deliverer/actions.h"

#define CTL_ACTION_MAX_MS (366ull * 86400 * 1000) /* the longest duration accepted */

/* A duration given by an operator: a number with a unit, "90s", "30m",
 * "2h", "1d" (also "500ms"), from 1 s to CTL_ACTION_MAX_MS. A bare
 * number is refused (seconds or milliseconds?). 0 + *ms, or -1. */
int ctl_parse_duration(const char *s, uint64_t *ms);

/* The action a request asks for, validated as actions_add() validates
 * it, with created = now_ms, expires = now_ms + duration, origin
 * "admin:<who>" and the id given or generated. No I/O. req:
 *   {"kind": "suspend|bounce|rate|connection_limit" (required),
 *    "selector": "domain" (required), "value": "example.com" (required),
 *    "source": "" (optional: only deliveries through this source),
 *    "duration": "30m" or a number of seconds (required),
 *    "reason": "..." (required, non-empty),
 *    "rate": "30/m" (required for rate, refused for the others),
 *    "connection_limit": 5 (required for connection_limit, refused for the
 *    others), "id": "..." (optional)}
 * Unknown members are refused. who: non-empty, e.g. "alice@ops".
 * CTL_OK, or CTL_EINVAL + err naming the member. */
int ctl_action_from_request(const json_t *req, const char *who, uint64_t now_ms, action_t *out, char *err,
                            size_t errlen);

/* The JSON object above for a (remaining_s counted from now_ms). */
json_t *ctl_action_json(const action_t *a, uint64_t now_ms);

/* Write a (validated again: origin and expiry as given, created 0 = now)
 * with one EVAL of ACTIONS_WRITE_SCRIPT; *out (may be NULL) = the action
 * as stored after the merge. */
int ctl_action_add(ctl_t *c, const action_t *a, json_t **out, char *err, size_t errlen);
/* ctl_action_from_request() then ctl_action_add(): what POST /v1/actions
 * calls; *out = the action as stored. */
int ctl_action_add_json(ctl_t *c, const json_t *req, const char *who, json_t **out, char *err, size_t errlen);

/* Remove the action with this id (any kind or origin); *out (may be NULL)
 * = the action removed. CTL_ENOTFOUND when none is in force. What
 * DELETE /v1/actions/{id} calls. */
int ctl_action_remove(ctl_t *c, const char *id, json_t **out, char *err, size_t errlen);

/* Resume: remove every suspend in force whose selector and value match
 * (site and domain values in any case) and, when source is not NULL,
 * whose source is exactly source ("" = the ones for any source); source
 * NULL matches them whatever their source. One EVAL for all of them.
 * *out (may be NULL) = {"removed": [action, ...]}. CTL_ENOTFOUND when
 * none matched. */
int ctl_action_resume(ctl_t *c, action_sel_t sel, const char *value, const char *source, json_t **out, char *err,
                      size_t errlen);

/* Every action in force (admin and automation), sorted by expiry (then
 * id): *out = [action, ...]. Fields that do not validate are skipped, as
 * the workers skip them. What GET /v1/actions calls. */
int ctl_actions_list(ctl_t *c, json_t **out, char *err, size_t errlen);

#endif

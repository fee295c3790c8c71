/*
 * control/suppress.h - the suppression lists' operations (blocking, on a
 * ctl_t: see ctl.h), for `mailpump suppress` and the HTTP API.
 *
 * A list is the global one (tenant NULL) or a tenant's; its entries are
 * addresses, normalised (deliverer/suplist.h) and validated as message
 * recipients are: an invalid address is reported, never stored. Every
 * operation returns CTL_OK with *out set (the caller owns it), or a
 * negative ctl_status_t with the reason in err: CTL_EINVAL for a bad
 * tenant, address or argument, CTL_ENOTFOUND (get), CTL_EUNAVAIL when
 * Redis could not answer.
 *
 * An entry, as get, list and export (jsonl) give it:
 *   {"address": "bob@example.com", "list": "global"|"<tenant>",
 *    "reason": "...", "added": "2026-12-08T01:02:03Z",
 *    "expires": "...Z" or null, "expired": false,
 *    "origin": "manual"|"auto"|"import",
 *    "reply": {"code": 550, "enhanced": "5.1.1", "text": "..."} or null,
 *    "message_id": "..." or null}
 */
#ifndef MP_CONTROL_SUPPRESS_H
#define MP_CONTROL_SUPPRESS_H

#include <stdio.h>

#include <jansson.h>

#include "control/ctl.h"

/* Add (or replace) addrs with reason (NULL: "manual"), origin manual.
 * {"list": L, "added": N, "invalid": ["addr", ...]}; CTL_EINVAL when
 * none is valid. */
ctl_status_t suppress_add(ctl_t *c, const char *tenant, const char *const *addrs, size_t n,
                          const char *reason, json_t **out, char *err, size_t errlen);
/* {"list": L, "removed": N, "not_found": [...], "invalid": [...]}. */
ctl_status_t suppress_remove(ctl_t *c, const char *tenant, const char *const *addrs, size_t n,
                             json_t **out, char *err, size_t errlen);
/* The entry of addr (above), or CTL_ENOTFOUND. */
ctl_status_t suppress_get(ctl_t *c, const char *tenant, const char *addr, json_t **out, char *err,
                          size_t errlen);
/* One page from cursor (NULL or "0": the start), about limit entries
 * (1..10000; HSCAN's COUNT, a hint): {"list": L, "total": N,
 * "entries": [...], "next_cursor": "..." or null at the end}. */
ctl_status_t suppress_list(ctl_t *c, const char *tenant, const char *cursor, unsigned limit, json_t **out,
                           char *err, size_t errlen);
/* Lines "address[,reason]" from in ('#' comments and blank lines are
 * skipped; reason defaults to dflt_reason, else "import"), written in
 * HSETs of 1,000 entries, pipelined 8 at a time: {"list": L, "lines": N,
 * "added": N, "skipped_invalid": N, "invalid": [{"line": N, "text":
 * "..."}, ...the first 100]}. */
ctl_status_t suppress_import(ctl_t *c, const char *tenant, FILE *in, const char *dflt_reason, json_t **out,
                             char *err, size_t errlen);
/* Every entry to f: "csv" (a header line, then address, reason, added,
 * origin, code, enhanced, text, message_id) or "jsonl" (one entry per
 * line). {"list": L, "exported": N}. */
ctl_status_t suppress_export(ctl_t *c, const char *tenant, FILE *f, const char *format, json_t **out,
                             char *err, size_t errlen);

#endif

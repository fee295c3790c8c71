/*
 * api/control.h - the control plane's HTTP endpoints: thin wrappers of
 * the control/ operations the CLI also runs (docs/http-api.md):
 *
 *   GET    /v1/actions                   actions in force
 *   POST   /v1/actions                   add (suspend, bounce, rate, connection_limit)
 *   DELETE /v1/actions/{id}              remove one
 *   POST   /v1/actions/resume            remove the suspends of a selector
 *   GET    /v1/suppressions              a page of a list (?tenant=, ?cursor=, ?limit=)
 *   POST   /v1/suppressions              add addresses to a list
 *   GET    /v1/suppressions/{address}    one entry (?tenant=)
 *   DELETE /v1/suppressions/{address}    remove one (?tenant=)
 *   GET    /v1/messages/{id}             what happened to a message, where it is now
 *   GET    /v1/queue                     depths, workers, busiest destinations
 *   GET    /v1/dead                      dead letters (?reason=, ?limit=)
 *   POST   /v1/dead/redrive              re-drive dead letters
 */
#ifndef MP_API_CONTROL_H
#define MP_API_CONTROL_H

#include "api/http.h"

/* Register every endpoint above. 0, or -1 + err (a pattern refused: a bug). */
int api_control_routes(api_server_t *s, char *err, size_t errlen);

#endif

/*
 * api/http.h - mailpumpd's HTTP API: a libmicrohttpd server on its own
 * listener ([api] listen, off by default), a router of handlers, bearer
 * token authentication and JSON in and out (docs/http-api.md).
 *
 * Threads: MHD runs a pool of [api] threads threads; handlers run in them
 * and may block (they call the blocking control/ operations and wait for
 * the broker's confirms), which is off every worker's loop by design.
 * Each handling thread has its own ctl_t (api_ctl), made on first use and
 * kept until the server stops.
 *
 * Every path under /v1/ needs "Authorization: Bearer <token>" with a
 * token of [api] tokens_file; the file is re-read when its mtime changes
 * (looked at once a second at most). Every error is JSON:
 *   {"error": {"status": 404, "code": "not_found", "reason": "..."}}
 * The server answers 401 (no or a wrong token, with WWW-Authenticate),
 * 404 (no route), 405 (a route with other methods, with Allow), 400 (a
 * body that is not JSON), 413 (a body above [api] max_body: by its
 * Content-Length before any byte is read, else counted while it arrives
 * and dropped), 415 (a body that is not application/json) before any
 * handler runs; handlers answer the rest.
 */
#ifndef MP_API_HTTP_H
#define MP_API_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "control/ctl.h"
#include "core/config.h"

typedef struct api_server api_server_t;
typedef struct api_call api_call_t; /* one request, valid during its handler */
typedef void (*api_handler_fn)(api_call_t *c, void *arg);

/* ---- the server ---- */

/* Every check of [api] start-up makes (listen's syntax, tokens_file
 * present and holding a token, TLS files both or neither and loadable,
 * the limits), without binding: what `mailpumpd --check-config` runs.
 * Nothing to check when listen is empty. 0, or -1 + err. */
int api_config_check(const mp_config_t *cfg, char *err, size_t errlen);

/* Check cfg as api_config_check() does and load the tokens and TLS
 * files; no listener yet. cfg is borrowed and must outlive the server.
 * NULL + err on failure. */
api_server_t *api_server_new(const mp_config_t *cfg, char *err, size_t errlen);
/* Add a handler for method ("GET", "POST", ...) and a path pattern
 * ("/v1/actions/{id}": literal segments, and {name} segments that match
 * any one non-empty segment, read with api_param()). Before
 * api_server_start() only. 0, or -1 when the pattern is malformed or has
 * more than API_MAX_PARAMS parameters. */
int api_route(api_server_t *s, const char *method, const char *pattern, api_handler_fn fn, void *arg);
/* Bind [api] listen and start serving. 0, or -1 + err. */
int api_server_start(api_server_t *s, char *err, size_t errlen);
/* Stop serving (close the listener, wait for the handlers running) and
 * free. NULL is fine. */
void api_server_free(api_server_t *s);
/* The port actually bound (tests listen on port 0), 0 when not started. */
unsigned api_server_port(const api_server_t *s);
const mp_config_t *api_server_config(const api_server_t *s);

/* ---- inside a handler ---- */

/* A {name} segment of the route's pattern, percent-decoded; NULL if the
 * pattern has none of that name. */
const char *api_param(const api_call_t *c, const char *name);
/* ?name=value of the request's query (decoded), NULL when absent. */
const char *api_query(const api_call_t *c, const char *name);
/* A request header (case-insensitive name), NULL when absent. */
const char *api_header(const api_call_t *c, const char *name);
/* The parsed JSON body, NULL when the request had none. */
const json_t *api_body(const api_call_t *c);
/* The body as received (NUL-terminated), NULL when none. */
const char *api_body_raw(const api_call_t *c, size_t *len);
/* Who made the request: the NAME of its token (NAME:TOKEN), or
 * "token<line>" for a bare token. */
const char *api_who(const api_call_t *c);
/* The peer's address as text ("127.0.0.1:40312"). */
const char *api_peer(const api_call_t *c);
/* This thread's control context (made on first use, kept). */
ctl_t *api_ctl(api_call_t *c);
const mp_config_t *api_config(const api_call_t *c);

/* Answer status with body (stolen; NULL: no body). Once per call: a
 * second answer is ignored. A handler that answers nothing gets 500. */
void api_reply(api_call_t *c, unsigned status, json_t *body);
/* Answer the error format; code is a short snake_case word. */
void api_error(api_call_t *c, unsigned status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* The same with more members for the "error" object (extra stolen,
 * its members copied in: e.g. "messages" of a 422). */
void api_error_with(api_call_t *c, unsigned status, const char *code, json_t *extra,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Answer a control/ failure: CTL_EINVAL 400 invalid, CTL_ENOTFOUND 404
 * not_found, CTL_ECONFLICT 409 conflict, CTL_EUNAVAIL 503 unavailable,
 * anything else 500 internal; err is the reason. */
void api_ctl_error(api_call_t *c, int ctl_status, const char *err);

/* ---- parts exposed for the unit tests ---- */

/* Tokens of a tokens file: one a line, NAME:TOKEN or a bare TOKEN
 * (who = "token<line>"), blanks around ignored, blank lines and lines
 * starting with # ignored. The token follows the last ':' (NAME may hold
 * colons: "admin:ops-alice:TOKEN" is who "admin:ops-alice"). A token is
 * at least API_TOKEN_MIN characters of printable ASCII without spaces or
 * ':'; NAME is 1..64 printable characters without spaces. Only SHA-256
 * digests of the tokens are kept. */
#define API_TOKEN_MIN 16
typedef struct api_tokens api_tokens_t;
/* NULL + err ("line 3: token shorter than 16 characters", "no tokens"). */
api_tokens_t *api_tokens_parse(const char *text, size_t len, char *err, size_t errlen);
/* Read and parse path; *world_readable is set when others may read it. */
api_tokens_t *api_tokens_load(const char *path, int *world_readable, char *err, size_t errlen);
size_t api_tokens_count(const api_tokens_t *t);
/* The who of the token that equals token[0..len), or NULL. Constant
 * time in which token matched: the digest of token is compared with
 * CRYPTO_memcmp against every entry, without an early exit. */
const char *api_tokens_match(const api_tokens_t *t, const char *token, size_t len);
void api_tokens_free(api_tokens_t *t);

/* The token of an Authorization header value: "Bearer <token>" (scheme
 * case-insensitive, one or more spaces), else NULL. *len is its length. */
const char *api_bearer(const char *authorization, size_t *len);

/* Route matching. A match fills p with the parameters' names (borrowed
 * from pattern, namelen characters, not NUL-terminated) and their
 * percent-decoded values (owned: api_params_clear).
 * A segment that decodes to one holding '/' or NUL does not match. */
#define API_MAX_PARAMS 8
typedef struct api_params {
    size_t      n;
    const char *name[API_MAX_PARAMS];
    size_t      namelen[API_MAX_PARAMS];
    char       *value[API_MAX_PARAMS];
} api_params_t;
/* 1 when pattern is well formed (starts with '/', {name} segments whole,
 * at most API_MAX_PARAMS of them), else 0. */
int  api_pattern_valid(const char *pattern);
/* 1 = path (without its query) matches pattern, 0 = not. */
int  api_match(const char *pattern, const char *path, api_params_t *p);
void api_params_clear(api_params_t *p);
/* Percent-decode in place ("+" stays "+"): the decoded length (which
 * strlen() undercounts when it held %00), or -1 on a bad escape. */
long api_url_decode(char *s);

#endif

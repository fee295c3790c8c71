/*
 * queue/msgjson.h - parse the JSON body of a mail.outbound message.
 *
 * Format (unknown fields are ignored, null counts as absent):
 *   from      required: "a@x", "Name <a@x>" or {"address": "a@x", "name": "Name"}
 *   to        required: non-empty array of the same forms, or one string
 *   cc, bcc   optional: array of the same forms, or one string
 *   subject, text, html, trace_id   optional strings
 *   headers   optional object of string -> string; names 1..76 printable
 *             ASCII characters without ':', values without CR or LF
 *             (whether a name may be used at all is decided by mime/)
 *   id        optional: 1..200 printable ASCII without spaces or "<>@";
 *             a random UUID when absent
 *   tenant, pool  optional: 1..64 of ASCII letters, digits, '.', '_', '-'
 *   campaign  optional: 1..128 of those and ':', '/', '@', '+', '='
 *   attachments optional array of objects:
 *             filename       required, 1..255 octets of UTF-8, no control chars
 *             content_type   "type/subtype[; attr=value]..." (not multipart/...),
 *                            default application/octet-stream
 *             content_base64 required, RFC 4648 base64 (blanks/line breaks
 *                            between characters allowed), decoded here
 *             content_id     optional, "id@host" with or without <>
 *             inline         optional boolean: part of multipart/related
 *   raw       optional base64 of a complete RFC 5322 message; excludes
 *             subject, text, html, headers and attachments (from/to/cc/bcc
 *             still give the envelope). Must not be empty or contain NUL.
 * Message priority is an AMQP property, not part of the body: it stays 0.
 *
 * Parsing does no I/O and keeps no state; it is safe from any thread.
 */
#ifndef MP_QUEUE_MSGJSON_H
#define MP_QUEUE_MSGJSON_H

#include <stddef.h>

#include "core/message.h"

typedef enum {
    MSGJSON_OK = 0,
    MSGJSON_ENOMEM = -1, /* e.g. decoding a large attachment */
    MSGJSON_EJSON = -2, /* not JSON at all (or not valid UTF-8) */
    MSGJSON_EINVAL = -3 /* JSON, but not a valid message: dead-letter it */
} msgjson_status_t;

/*
 * Parse a message body of len bytes (need not be NUL-terminated).
 * On success *out is a new message_t owned by the caller (message_free).
 * On error *out is NULL and err (if errlen > 0) holds the reason, e.g.
 * "invalid JSON at line 1 column 5: ...", "missing field \"from\"",
 * "invalid address in \"to\"[1]: \"bob@\"" (array indexes start at 0).
 * Caller-supplied text quoted in err has control characters escaped.
 */
int msgjson_parse(const char *body, size_t len, message_t **out, char *err, size_t errlen)
    __attribute__((warn_unused_result));

const char *msgjson_strerror(int status);

/*
 * Address validation used by the parser (exposed for tests and the CLI):
 * "local@domain" with a dot-atom (UTF-8 allowed, RFC 6531) or quoted local
 * part of at most 64 octets, a domain of LDH labels (or UTF-8 labels, kept
 * as is) of 1..63 octets each, total length <= 254, and no CR, LF, NUL,
 * spaces or angle brackets anywhere. Returns 1 if valid, 0 if not.
 */
int msgjson_valid_address(const char *addr);

/* 1 when id is a valid message id (the "id" field's rules), else 0. */
int msgjson_valid_id(const char *id);

#endif

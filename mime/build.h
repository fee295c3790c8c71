/*
 * mime/build.h - RFC 5322 / MIME message builder and SMTP DATA framing.
 *
 * mime_build() turns the message model into the exact bytes that are sent
 * over SMTP and appended to the IMAP Sent folder (built once, used twice).
 * mime_dotstuff() is the one place where SMTP DATA framing happens
 * (DESIGN.md: CRLF normalisation and dot-stuffing in one place).
 *
 * Nothing here does I/O. Output is always appended to the caller's buffer;
 * on error the buffer is restored to the length it had on entry.
 */
#ifndef MP_MIME_BUILD_H
#define MP_MIME_BUILD_H

#include <stddef.h>
#include <time.h>

#include "core/buf.h"
#include "core/message.h"

typedef enum {
    MIME_OK = 0,
    MIME_ENOMEM = -1,
    MIME_EINVAL = -2, /* the message cannot be represented safely */
    MIME_ETOOBIG = -3 /* built message larger than opts->max_size */
} mime_status_t;

const char *mime_strerror(int status);

typedef struct mime_opts {
    time_t now;      /* for the Date header; 0 = time(NULL) */
    size_t max_size; /* 0 = unlimited; larger result -> MIME_ETOOBIG */
} mime_opts_t;

/*
 * Build the message bytes (CRLF line endings, NOT dot-stuffed) and append
 * them to out. opts may be NULL (defaults). The result always ends in CRLF
 * and no line exceeds 998 octets.
 *
 * Header order: From, To (omitted when m->nto == 0), Cc, Subject (omitted
 * when NULL), Date, Message-ID <m->id@sender-domain>, MIME-Version, the
 * caller's m->headers, X-Mailpump-Trace-Id (when m->trace_id is set),
 * Content-Type, Content-Transfer-Encoding. Bcc is never written.
 * text/html that are NULL or "" count as absent.
 *
 * Returns MIME_OK, or < 0 with a human-readable reason in err (err may be
 * NULL / errlen 0). MIME_EINVAL covers: CR or LF in any header value or
 * display name, a malformed address or id, a header name that is not
 * 1..76 printable ASCII characters without ':', and a caller header that
 * would override a structural one (From, To, Cc, Bcc, Subject, Date,
 * Message-ID, MIME-Version, Content-Type, Content-Transfer-Encoding,
 * X-Mailpump-Trace-Id).
 */
int mime_build(const message_t *m, const mime_opts_t *opts, buf_t *out, char *err,
               size_t errlen) __attribute__((warn_unused_result));

/*
 * SMTP DATA payload: dot-stuff (RFC 5321 4.5.2) and terminate with
 * "\r\n.\r\n" (the final CRLF of the content is shared with the terminator;
 * a missing one is added). Input should already have CRLF line endings
 * (mime_build's output); a bare CR or LF is converted to CRLF so nothing
 * bare ever reaches the wire. Empty input yields just ".\r\n" (the CRLF
 * that ends the DATA command completes the "\r\n.\r\n" sequence on the
 * wire). Appends to out.
 */
void mime_dotstuff(const char *in, size_t len, buf_t *out);

/*
 * Append one complete header field "name: value\r\n" to out.
 * Plain printable ASCII values are written as is, folded at their own
 * whitespace; any other value (non-ASCII, control characters, text that
 * looks like an encoded-word, or a word too long to stay under 998 octets)
 * is written as RFC 2047 encoded-words (UTF-8, B or Q, whichever is
 * shorter), each at most 75 characters and never splitting a UTF-8
 * sequence. Lines are folded to stay within 78 characters where possible.
 *
 * Returns MIME_OK, or MIME_EINVAL (out untouched) when name is not 1..76
 * printable ASCII characters without ':' or value contains CR or LF.
 */
int mime_encode_header_value(buf_t *out, const char *name, const char *value);

#endif

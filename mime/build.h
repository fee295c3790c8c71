/*
 * mime/build.h - RFC 5322 / MIME message builder and SMTP DATA framing.
 *
 * mime_build() turns the message model into the exact bytes that are sent
 * over SMTP and appended to the IMAP Sent folder (built once, used twice).
 * mime_dotstuff() and mime_wire_segments() (the same framing without a
 * copy) are the one place where SMTP DATA framing happens: CRLF
 * normalisation and dot-stuffing live in one place so that no path can put
 * a bare line ending or an unstuffed dot on the wire (SMTP smuggling).
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
 * Body structure, each level only when needed:
 *   multipart/mixed      body (or related) first, then the attachments
 *                        (non-inline ones, and inline ones when there is
 *                        no HTML body; without text and html the
 *                        attachments are the only parts)
 *   > multipart/related  the HTML (or alternative) body, then the inline
 *                        attachments (RFC 2387, type= the root's type)
 *   > multipart/alternative  text/plain, then text/html
 * Content-Transfer-Encoding per part: text bodies 7bit or quoted-printable;
 * text/... attachments 7bit, quoted-printable while under one octet in six
 * needs escaping, else base64 (always for NUL); other attachments 7bit only
 * when printable ASCII with CRLF line endings (copied verbatim), else
 * base64 in 76-character lines. message/... attachments must be 7bit.
 * Never 8bit: the output is 7-bit clean apart from UTF-8 addresses.
 * Attachment part headers: Content-Type (the caller's, plus name=),
 * Content-Transfer-Encoding, Content-ID (when set), Content-Disposition
 * (attachment or inline, filename=). File names that are short printable
 * ASCII are quoted strings; others are RFC 2231 (utf-8'', percent-encoded,
 * split into continuations of at most 60 characters). Boundaries are
 * "=_mp_" plus 128 random bits, distinct per level and checked against
 * every 7bit part (QP and base64 output cannot contain "=_").
 *
 * m->raw (the application's own message) is sent instead of building:
 * line endings become CRLF and a final CRLF is added, nothing else
 * changes. Refused (MIME_EINVAL) when empty, when it holds a NUL, a line
 * over 998 octets, a header-section line that is neither a field nor a
 * continuation, or no From field.
 *
 * Size: the whole output is reserved once (a bound; pages never written
 * stay untouched), so a large body is encoded straight into its final
 * place. With opts->max_size, a message whose decoded content alone
 * exceeds the limit is refused before anything is encoded, and any
 * result larger than the limit is refused too (MIME_ETOOBIG, "message is
 * N bytes, limit is M"); MIME_ENOMEM when the reservation fails.
 *
 * Returns MIME_OK, or < 0 with a human-readable reason in err (err may be
 * NULL / errlen 0). MIME_EINVAL covers: CR or LF in any header value or
 * display name, a malformed address or id, a header name that is not
 * 1..76 printable ASCII characters without ':', and a caller header that
 * would override a structural one (From, To, Cc, Bcc, Subject, Date,
 * Message-ID, MIME-Version, Content-Type, Content-Transfer-Encoding,
 * X-Mailpump-Trace-Id), and for attachments: a file name that is empty,
 * over 255 octets or holds control characters, a content type that is not
 * printable ASCII "type/subtype..." or is multipart, an invalid content id.
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
 * Zero-copy SMTP DATA framing for a session that writes an iovec: the
 * same framing as mime_dotstuff(), but as segments that point into msg
 * (or at static "." / "\r\n" / ".\r\n" strings), so the bytes built once
 * serve IMAP APPEND (msg itself) and SMTP DATA (the segments) without a
 * second copy of the message. The concatenation of the segments equals
 * what mime_dotstuff(msg, len) appends, byte for byte.
 *
 * msg must have CRLF line endings only (mime_build's output always has);
 * a bare CR or LF gives MIME_EINVAL, and the caller falls back to
 * mime_dotstuff(). On MIME_OK *segs is a malloc'ed array of *nseg
 * segments (caller frees; msg must outlive it). MIME_ENOMEM when the
 * array cannot be allocated. One segment per line that starts with "."
 * plus at most three.
 */
typedef struct mime_seg {
    const char *p;
    size_t      n;
} mime_seg_t;

int mime_wire_segments(const char *msg, size_t len, mime_seg_t **segs, size_t *nseg)
    __attribute__((warn_unused_result));

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

/*
 * The value of the first header field called name (case-insensitive) in
 * the header section of msg (up to the first empty line), unfolded (each
 * CRLF or LF before white space removed) and trimmed, NUL-terminated into
 * out. MIME_OK; MIME_EINVAL when there is no such field or its value does
 * not fit in outlen. For a built message's own Message-ID, say.
 */
int mime_header_find(const char *msg, size_t len, const char *name, char *out, size_t outlen);

#endif

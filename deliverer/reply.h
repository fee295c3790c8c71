/*
 * deliverer/reply.h - the one SMTP reply parser (RFC 5321 §4.2, RFC 3463).
 *
 * Pure function over a byte range: no I/O, no allocation, no state kept
 * between calls. The session hands it whatever stream_input() holds and
 * consumes exactly what it reports; nothing else in mailpump splits SMTP
 * replies into lines (OpenSMTPD's mta_io parsing continuations twice is
 * the anti-example).
 */
#ifndef MP_DELIVERER_REPLY_H
#define MP_DELIVERER_REPLY_H

#include <stddef.h>

#define SMTP_REPLY_MAX_LINE  2048 /* octets of one line, without CRLF */
/* Octets of one whole reply, line ends included: the budget for one reply
 * (an EHLO with thousands of extension lines fits; docs/operations.md).
 * The session caps its stream's unparsed input at this, too. */
#define SMTP_REPLY_MAX_BYTES (512u * 1024)

typedef struct smtp_reply {
    int  code;       /* 3-digit code */
    char enh[16];    /* RFC 3463 enhanced code "5.1.1" if present on the first line, else "" */
    char text[1024]; /* text of all lines (without code, separator and enhanced code),
                      * joined with " ", truncated; control characters become '?' */
    int  nlines;
} smtp_reply_t;

enum { SMTP_REPLY_OK = 0, SMTP_REPLY_AGAIN = 1, SMTP_REPLY_EPROTO = -1 };

/*
 * Parse one complete (possibly multi-line "250-...", "250 ...") reply from
 * data. Returns SMTP_REPLY_OK and sets *consumed to the bytes of that reply
 * (never more: a second buffered reply is left for the next call),
 * SMTP_REPLY_AGAIN when more bytes are needed (*consumed untouched), or
 * SMTP_REPLY_EPROTO on garbage: a line not starting with a code 2xx..5xx
 * followed by ' ', '-' or the end of the line, inconsistent codes across
 * lines, a line longer than SMTP_REPLY_MAX_LINE octets, a reply longer
 * than SMTP_REPLY_MAX_BYTES octets (any number of lines up to that), or
 * a NUL byte. Garbage is reported as soon
 * as the buffered prefix proves it, without waiting for the end of line.
 * Accepts LF-only line endings. A bare "250" (no text) is accepted as the
 * last line (RFC 5321 grammar: Reply-code [ SP textstring ] CRLF).
 *
 * An enhanced code is recognised on a line's text when it has the form
 * class.subject.detail (class 2, 4 or 5 equal to the first digit of the
 * reply code, subject and detail 1-3 digits) followed by a space or the
 * end of the line. The first line's one fills out->enh; the same code
 * repeated on continuation lines is stripped from the text as well.
 */
int smtp_reply_parse(const char *data, size_t len, size_t *consumed, smtp_reply_t *out);

/*
 * Same parser, also calling line_cb once per line of a complete, valid
 * reply (never for AGAIN or EPROTO), in order, with the raw text after the
 * code and separator (no CR/LF, enhanced code NOT stripped, not NUL
 * terminated). This is how EHLO keywords are read without a second parser.
 */
typedef void (*smtp_reply_line_cb)(void *arg, int index, const char *text, size_t len);
int smtp_reply_parse_lines(const char *data, size_t len, size_t *consumed, smtp_reply_t *out,
                           smtp_reply_line_cb line_cb, void *arg);

/*
 * Same again, for input that grows between calls: *cur (zeroed for a new
 * reply) says where the previous call, which returned AGAIN on a prefix
 * of the same bytes, stopped checking; lines before it are not checked
 * again, so feeding a reply a chunk at a time costs its length, not its
 * length times the number of chunks. Set on AGAIN, back to zero on OK.
 * Only for a buffer whose head did not move since that call (zero *cur
 * after consuming). On AGAIN cur->lines is the number of complete lines
 * of the reply buffered so far: what the session's reply-line cap
 * (session.h, smtp_timeouts_t) counts while the reply is still growing;
 * a complete reply's count is out->nlines.
 */
typedef struct smtp_reply_cursor {
    size_t   checked; /* bytes of complete, valid lines before the incomplete one */
    unsigned lines;   /* those lines */
} smtp_reply_cursor_t;

int smtp_reply_parse_resume(const char *data, size_t len, smtp_reply_cursor_t *cur, size_t *consumed,
                            smtp_reply_t *out, smtp_reply_line_cb line_cb, void *arg);

#endif

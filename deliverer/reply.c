/*
 * SUMMARY
 *  deliverer/reply.c - the one SMTP reply parser.
 * DESCRIPTION
 *  A reply is a run of lines "NNN-text" ended by "NNN text" (or a bare
 *  "NNN"). The parser first locates the lines of one whole reply, checking
 *  each byte prefix as soon as it is buffered, so a peer that sends garbage
 *  is rejected at once instead of after 2 KB of waiting, and a reply past
 *  SMTP_REPLY_MAX_BYTES as soon as that much of it is buffered. Only when
 *  the whole reply is there does a second pass over its lines fill the
 *  result: code, the RFC 3463 enhanced code of the first line, and the
 *  joined text. The parser bounds bytes only; the complete lines it has
 *  seen of a growing reply are counted in its cursor, and the session
 *  decides how many a reply may have (its reply-line cap depends on time,
 *  which a pure parser does not know).
 *
 *  Like hiredis' redisReaderGetReply it never consumes a partial reply,
 *  so callers simply retry with more bytes after SMTP_REPLY_AGAIN.
 * DIAGNOSTICS
 *  SMTP_REPLY_EPROTO for anything that is not a reply (see reply.h).
 */
#include "deliverer/reply.h"

#include <string.h>

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Check the first bytes of a line (n of them are available) against the
 * reply-code syntax and against the code of the earlier lines (code < 0
 * for the first line). Returns 0 when the prefix can still be valid. */
static int check_prefix(const char *p, size_t n, const char *code)
{
    for (size_t i = 0; i < n && i < 3; i++) {
        if (i == 0 ? (p[0] < '2' || p[0] > '5') : !is_digit(p[i]))
            return -1;
        if (code && p[i] != code[i])
            return -1;
    }
    if (n > 3 && p[3] != ' ' && p[3] != '-')
        return -1;
    return 0;
}

/* Length of an enhanced status code "c.sss.ddd" at the start of t when
 * followed by a space or the end, else 0. The class must match cls. */
static size_t enh_len(const char *t, size_t n, char cls)
{
    size_t i = 0;
    if (n < 5 || t[0] != cls || t[1] != '.')
        return 0;
    i = 2;
    for (int part = 0; part < 2; part++) {
        size_t start = i;
        while (i < n && is_digit(t[i]) && i - start < 4)
            i++;
        if (i == start || i - start > 3)
            return 0;
        if (part == 0) {
            if (i >= n || t[i] != '.')
                return 0;
            i++;
        }
    }
    if (i < n && t[i] != ' ')
        return 0;
    return i;
}

static void text_append(smtp_reply_t *out, size_t *tl, const char *t, size_t n)
{
    size_t cap = sizeof(out->text) - 1;
    if (n == 0)
        return;
    if (*tl > 0 && *tl < cap)
        out->text[(*tl)++] = ' ';
    for (size_t i = 0; i < n && *tl < cap; i++) {
        unsigned char c = (unsigned char)t[i];
        /* replies end up in logs and bounce reports: no control bytes */
        out->text[(*tl)++] = (c < 0x20 || c == 0x7f) ? (c == '\t' ? ' ' : '?') : (char)c;
    }
    out->text[*tl] = '\0';
}

/* The line at data + pos (a complete one: its LF is buffered): where its
 * text starts and ends, and where the next line starts. */
static void line_span(const char *data, size_t pos, size_t len, size_t *tstart, size_t *tend, size_t *next)
{
    const char *p = data + pos;
    const char *lf = memchr(p, '\n', len - pos);
    size_t content = (size_t)(lf - p);
    if (content > 0 && p[content - 1] == '\r')
        content--;
    *tstart = pos + (content > 3 ? 4 : 3);
    *tend = pos + content;
    *next = pos + (size_t)(lf - p) + 1;
}

int smtp_reply_parse_resume(const char *data, size_t len, smtp_reply_cursor_t *cur, size_t *consumed,
                            smtp_reply_t *out, smtp_reply_line_cb line_cb, void *arg)
{
    /* the lines before cur->checked were complete and valid at the last call */
    size_t pos = cur->checked <= len ? cur->checked : 0;
    unsigned n = pos > 0 ? cur->lines : 0;

    /* first pass: find the end of one whole reply, checking as we go */
    for (;;) {
        const char *p = data + pos;
        size_t avail = len - pos;
        const char *lf = memchr(p, '\n', avail);
        size_t linelen = lf ? (size_t)(lf - p) : avail; /* without the LF */
        size_t content = linelen;
        /* without an LF yet, a trailing CR may be the first half of CRLF */
        if (content > 0 && p[content - 1] == '\r')
            content--;

        /* the first line starts at data: its 3 digits are the code */
        if (check_prefix(p, content, n > 0 ? data : NULL) < 0)
            return SMTP_REPLY_EPROTO;
        if (memchr(p, '\0', linelen) != NULL)
            return SMTP_REPLY_EPROTO;
        if (!lf) {
            /* +1: the CR of a CRLF may already be buffered */
            if (linelen > SMTP_REPLY_MAX_LINE + 1 || len > SMTP_REPLY_MAX_BYTES)
                return SMTP_REPLY_EPROTO;
            cur->checked = pos; /* the next call starts at this incomplete line */
            cur->lines = n;
            return SMTP_REPLY_AGAIN;
        }
        if (content > SMTP_REPLY_MAX_LINE || content < 3)
            return SMTP_REPLY_EPROTO;
        pos += linelen + 1;
        if (pos > SMTP_REPLY_MAX_BYTES)
            return SMTP_REPLY_EPROTO; /* the reply is over its budget and still going */
        n++;
        /* a bare "NNN" ends the reply like "NNN " */
        if (content == 3 || p[3] == ' ')
            break;
    }

    memset(out, 0, sizeof(*out));
    out->code = (data[0] - '0') * 100 + (data[1] - '0') * 10 + (data[2] - '0');

    size_t ts, te, next;
    line_span(data, 0, pos, &ts, &te, &next);
    size_t el = enh_len(data + ts, te - ts, data[0]);
    if (el > 0 && el < sizeof(out->enh))
        memcpy(out->enh, data + ts, el);
    else
        el = 0;

    /* second pass over the lines found: text, then the line callback */
    size_t tl = 0;
    for (size_t at = 0; at < pos; at = next) {
        out->nlines++;
        line_span(data, at, pos, &ts, &te, &next);
        const char *t = data + ts;
        size_t tn = te - ts;
        size_t skip = enh_len(t, tn, data[0]);
        if (skip > 0 && (skip != el || memcmp(t, out->enh, el) != 0))
            skip = 0; /* a different code on a later line is text */
        if (skip > 0 && skip < tn)
            skip++; /* the space after it */
        if (tl < sizeof(out->text) - 1)
            text_append(out, &tl, t + skip, tn - skip);
    }
    if (line_cb) {
        int i = 0;
        for (size_t at = 0; at < pos; at = next) {
            line_span(data, at, pos, &ts, &te, &next);
            line_cb(arg, i++, data + ts, te - ts);
        }
    }
    *consumed = pos;
    cur->checked = 0;
    cur->lines = 0;
    return SMTP_REPLY_OK;
}

int smtp_reply_parse_lines(const char *data, size_t len, size_t *consumed, smtp_reply_t *out,
                           smtp_reply_line_cb line_cb, void *arg)
{
    smtp_reply_cursor_t cur = { 0, 0 };
    return smtp_reply_parse_resume(data, len, &cur, consumed, out, line_cb, arg);
}

int smtp_reply_parse(const char *data, size_t len, size_t *consumed, smtp_reply_t *out)
{
    return smtp_reply_parse_lines(data, len, consumed, out, NULL, NULL);
}

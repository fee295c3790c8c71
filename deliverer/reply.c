/*
 * SUMMARY
 *  deliverer/reply.c - the one SMTP reply parser.
 * DESCRIPTION
 *  A reply is a run of lines "NNN-text" ended by "NNN text" (or a bare
 *  "NNN"). The parser first locates the lines of one whole reply, checking
 *  each byte prefix as soon as it is buffered, so a peer that sends garbage
 *  is rejected at once instead of after 2 KB of waiting. Only when the
 *  whole reply is there does it fill the result: code, the RFC 3463
 *  enhanced code of the first line, and the joined text.
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

int smtp_reply_parse_lines(const char *data, size_t len, size_t *consumed, smtp_reply_t *out,
                           smtp_reply_line_cb line_cb, void *arg)
{
    size_t tstart[SMTP_REPLY_MAX_LINES], tend[SMTP_REPLY_MAX_LINES];
    size_t pos = 0;
    int n = 0;

    for (;;) {
        if (n == SMTP_REPLY_MAX_LINES)
            return SMTP_REPLY_EPROTO; /* 100 continuation lines and still going */
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
            if (linelen > SMTP_REPLY_MAX_LINE + 1)
                return SMTP_REPLY_EPROTO;
            return SMTP_REPLY_AGAIN;
        }
        if (content > SMTP_REPLY_MAX_LINE || content < 3)
            return SMTP_REPLY_EPROTO;
        /* a bare "NNN" ends the reply like "NNN " */
        int last = content == 3 || p[3] == ' ';
        tstart[n] = pos + (content > 3 ? 4 : 3);
        tend[n] = pos + content;
        n++;
        pos += linelen + 1;
        if (last)
            break;
    }

    memset(out, 0, sizeof(*out));
    out->code = (data[0] - '0') * 100 + (data[1] - '0') * 10 + (data[2] - '0');
    out->nlines = n;

    size_t el = enh_len(data + tstart[0], tend[0] - tstart[0], data[0]);
    if (el > 0 && el < sizeof(out->enh))
        memcpy(out->enh, data + tstart[0], el);
    else
        el = 0;

    size_t tl = 0;
    for (int i = 0; i < n; i++) {
        const char *t = data + tstart[i];
        size_t tn = tend[i] - tstart[i];
        size_t skip = enh_len(t, tn, data[0]);
        if (skip > 0 && (skip != el || memcmp(t, out->enh, el) != 0))
            skip = 0; /* a different code on a later line is text */
        if (skip > 0 && skip < tn)
            skip++; /* the space after it */
        text_append(out, &tl, t + skip, tn - skip);
    }
    if (line_cb)
        for (int i = 0; i < n; i++)
            line_cb(arg, i, data + tstart[i], tend[i] - tstart[i]);
    *consumed = pos;
    return SMTP_REPLY_OK;
}

int smtp_reply_parse(const char *data, size_t len, size_t *consumed, smtp_reply_t *out)
{
    return smtp_reply_parse_lines(data, len, consumed, out, NULL, NULL);
}

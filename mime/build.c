/*
 * SUMMARY
 *  mime/build.c - build RFC 5322 / MIME message bytes; SMTP dot-stuffing.
 * DESCRIPTION
 *  mime_build() writes the header block (addresses, RFC 2047 encoded
 *  words, Date, Message-ID, the caller's extra headers) and a text/plain,
 *  text/html or multipart/alternative body, choosing 7bit or
 *  quoted-printable per part. The same bytes go to SMTP and to IMAP, so
 *  they are built once and end in CRLF.
 *
 *  Invariants the rest of the system relies on (DESIGN.md, "Protocol
 *  rules"): every line ends in CRLF, no line exceeds 998 octets, no caller
 *  string can inject a header (CR/LF in values is refused, not escaped),
 *  and a caller cannot override a header the builder owns.
 *
 *  mime_dotstuff() is the only place where DATA framing happens: it also
 *  turns any bare CR or LF into CRLF, so even a buggy caller cannot put
 *  a bare line ending on the wire (SMTP smuggling).
 * DIAGNOSTICS
 *  MIME_EINVAL with a reason in err for input that cannot be represented
 *  safely; MIME_ETOOBIG when the result exceeds opts->max_size. The
 *  output buffer is restored to its entry length on any error.
 */
#include "mime/build.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/util.h"

#define MIME_LINE_SOFT 78   /* RFC 5322 2.1.1 SHOULD */
#define MIME_LINE_HARD 998  /* RFC 5322 2.1.1 MUST */
#define MIME_EW_MAX 75      /* RFC 2047 2: encoded-word length */
#define MIME_EW_OVERHEAD 12 /* "=?UTF-8?B?" + "?=" */
#define MIME_QP_MAX 76      /* RFC 2045 6.7 rule 5 */
#define MIME_HNAME_MAX 76   /* "name: " plus one short encoded word fits a line */
#define MIME_ID_MAX 200
#define MIME_ADDR_MAX 254
/* A quoted display name longer than this is encoded instead, because a
 * quoted-string cannot be folded by us and must stay under 998. */
#define MIME_QNAME_MAX 900
#define MIME_BOUNDARY_TRIES 16

const char *mime_strerror(int status)
{
    switch (status) {
    case MIME_OK:
        return "success";
    case MIME_ENOMEM:
        return "out of memory";
    case MIME_EINVAL:
        return "message cannot be built";
    case MIME_ETOOBIG:
        return "message too big";
    default:
        return "unknown mime status";
    }
}

static void mime_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void mime_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Render caller-supplied text for an error message: the reason ends up in
 * logs and dead-letter records, so control bytes are escaped and the text
 * is cut short rather than copied verbatim. */
static const char *mime_errstr(const char *s, char *dst, size_t dstlen)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (o + 8 >= dstlen) {
            memcpy(dst + o, "...", 3);
            o += 3;
            break;
        }
        if (*p == '\r') {
            dst[o++] = '\\';
            dst[o++] = 'r';
        } else if (*p == '\n') {
            dst[o++] = '\\';
            dst[o++] = 'n';
        } else if (*p < 0x20 || *p == 0x7f || *p == '"' || *p == '\\') {
            dst[o++] = '\\';
            dst[o++] = 'x';
            dst[o++] = hex[*p >> 4];
            dst[o++] = hex[*p & 15];
        } else {
            dst[o++] = (char)*p;
        }
    }
    dst[o] = '\0';
    return dst;
}

static void mime_truncate(buf_t *out, size_t size)
{
    out->len = out->off + size;
    if (out->data)
        out->data[out->len] = '\0';
}

/* ---- character classes ------------------------------------------------ */

static int mime_has_crlf(const char *s)
{
    return strpbrk(s, "\r\n") != NULL;
}

/* RFC 5322 ftext, bounded so the field name plus an encoded word fits. */
static int mime_valid_hname(const char *name)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++, n++)
        if (*p < 33 || *p > 126 || *p == ':')
            return 0;
    return n >= 1 && n <= MIME_HNAME_MAX;
}

/* Length of the UTF-8 sequence at s, or 1 when it is not a well-formed
 * one: a stray byte then travels alone, so encoded-words still never cut
 * a real character in two. */
static size_t mime_utf8_len(const unsigned char *s, size_t n)
{
    size_t need;
    if (s[0] < 0x80)
        return 1;
    else if (s[0] >= 0xc2 && s[0] <= 0xdf)
        need = 2;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        need = 3;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        need = 4;
    else
        return 1;
    if (need > n)
        return 1;
    for (size_t i = 1; i < need; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 1;
    return need;
}

/* Q encoding is restricted to the characters RFC 2047 5(3) allows in a
 * phrase, so the same encoder is safe for display names and for
 * unstructured fields. Space travels as "_". */
static int mime_q_literal(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '!' || c == '*' || c == '+' || c == '-' || c == '/' || c == ' ';
}

static size_t mime_q_cost(unsigned char c)
{
    return mime_q_literal(c) ? 1 : 3;
}

static size_t mime_b64_len(size_t n)
{
    return 4 * ((n + 2) / 3);
}

/* ---- RFC 2047 encoded-words ------------------------------------------ */

/* Pick the shorter encoding for the whole value: Q keeps mostly-ASCII text
 * readable, B is denser for scripts that are mostly multi-byte. */
static int mime_ew_use_b(const unsigned char *s, size_t n)
{
    size_t q = 0;
    for (size_t i = 0; i < n; i++)
        q += mime_q_cost(s[i]);
    return mime_b64_len(n) < q;
}

/* How many bytes (whole UTF-8 characters) of s fit in one encoded-word of
 * at most maxw characters. */
static size_t mime_ew_fit(const unsigned char *s, size_t n, int b, size_t maxw)
{
    if (maxw <= MIME_EW_OVERHEAD)
        return 0;
    size_t room = maxw - MIME_EW_OVERHEAD, k = 0, cost = 0;
    while (k < n) {
        size_t cl = mime_utf8_len(s + k, n - k), c2;
        if (b) {
            c2 = mime_b64_len(k + cl);
        } else {
            c2 = cost;
            for (size_t j = 0; j < cl; j++)
                c2 += mime_q_cost(s[k + j]);
        }
        if (c2 > room)
            break;
        cost = c2;
        k += cl;
    }
    return k;
}

static size_t mime_ew_len(const unsigned char *s, size_t k, int b)
{
    size_t payload = 0;
    if (b) {
        payload = mime_b64_len(k);
    } else {
        for (size_t i = 0; i < k; i++)
            payload += mime_q_cost(s[i]);
    }
    return MIME_EW_OVERHEAD + payload;
}

static void mime_b64_put(buf_t *out, const unsigned char *s, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char q[4];
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)s[i + 1] << 8;
        if (i + 2 < n)
            v |= s[i + 2];
        q[0] = tab[(v >> 18) & 63];
        q[1] = tab[(v >> 12) & 63];
        q[2] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        q[3] = i + 2 < n ? tab[v & 63] : '=';
        buf_append(out, q, 4);
    }
}

static void mime_ew_put(buf_t *out, const unsigned char *s, size_t k, int b)
{
    static const char hex[] = "0123456789ABCDEF";
    buf_append(out, b ? "=?UTF-8?B?" : "=?UTF-8?Q?", 10);
    if (b) {
        mime_b64_put(out, s, k);
    } else {
        for (size_t i = 0; i < k; i++) {
            if (s[i] == ' ') {
                buf_putc(out, '_');
            } else if (mime_q_literal(s[i])) {
                buf_putc(out, (char)s[i]);
            } else {
                char e[3] = { '=', hex[s[i] >> 4], hex[s[i] & 15] };
                buf_append(out, e, 3);
            }
        }
    }
    buf_append(out, "?=", 2);
}

/* ---- header writer: tracks the column to fold at 78 -------------------- */

typedef struct mime_hw {
    buf_t *out;
    size_t col;
    int    bare; /* nothing written after "name:" yet */
} mime_hw_t;

static void mime_hw_begin(mime_hw_t *hw, buf_t *out, const char *name)
{
    hw->out = out;
    buf_puts(out, name);
    buf_putc(out, ':');
    hw->col = strlen(name) + 1;
    hw->bare = 1;
}

/* Whitespace before a token of len octets: a fold when the token would
 * push the line past 78. Never right after "name:" (parsers such as
 * Python's then keep the blank as part of an unstructured value), nor
 * on a line that holds only the continuation blank. */
static void mime_hw_space(mime_hw_t *hw, size_t len)
{
    int fold = hw->col + 1 + len > MIME_LINE_SOFT && hw->col > 1 && !hw->bare;
    hw->bare = 0;
    if (fold) {
        buf_append(hw->out, "\r\n ", 3);
        hw->col = 1;
    } else {
        buf_putc(hw->out, ' ');
        hw->col++;
    }
}

static void mime_hw_put(mime_hw_t *hw, const char *s, size_t n)
{
    buf_append(hw->out, s, n);
    hw->col += n;
}

static void mime_hw_end(mime_hw_t *hw)
{
    buf_append(hw->out, "\r\n", 2);
    hw->col = 0;
}

/* Whole value as a run of encoded-words separated by folding whitespace,
 * which decoders drop between adjacent encoded-words (RFC 2047 6.2): the
 * split points are therefore invisible after decoding. */
static void mime_hw_encoded(mime_hw_t *hw, const char *value, size_t n)
{
    const unsigned char *s = (const unsigned char *)value;
    int b = mime_ew_use_b(s, n);
    size_t pos = 0;
    while (pos < n) {
        /* What is left goes in one word when it can, even if that word
         * needs a line of its own: fewer split points, and some decoders
         * (Python's email address parser among them) wrongly keep the
         * blank between adjacent encoded-words in a display name. */
        size_t k = mime_ew_fit(s + pos, n - pos, b, MIME_EW_MAX);
        size_t room = hw->col + 1 < MIME_LINE_SOFT ? MIME_LINE_SOFT - hw->col - 1 : 0;
        /* Otherwise fill the rest of the current line when a useful word
         * fits there, and always right after "name:" where no fold may go
         * (a field name so long that not even one character fits makes
         * that line longer than 78, still far below 998). */
        if ((k < n - pos && room >= 32) || hw->bare) {
            size_t k2 = mime_ew_fit(s + pos, n - pos, b, room);
            if (k2 > 0 && k2 < k)
                k = k2;
        }
        /* k > 0: 63 payload characters always hold one 4-byte character */
        mime_hw_space(hw, mime_ew_len(s + pos, k, b));
        size_t before = buf_size(hw->out);
        mime_ew_put(hw->out, s + pos, k, b);
        hw->col += buf_size(hw->out) - before;
        pos += k;
    }
}

static int mime_is_wsp(char c)
{
    return c == ' ' || c == '\t';
}

/* A plain value is split into chunks that begin at the last blank of each
 * run of whitespace; folding inserts CRLF before a chunk, so unfolding
 * (removing the CRLF) restores the value exactly and no folded line is
 * whitespace only. Returns the end of the chunk starting at i. */
static size_t mime_chunk_end(const char *v, size_t n, size_t i)
{
    size_t j = i + 1;
    while (j < n && !(mime_is_wsp(v[j]) && j + 1 < n && !mime_is_wsp(v[j + 1])))
        j++;
    return j;
}

/* Can the value go out as is? Printable ASCII (and tab), nothing that a
 * decoder would mistake for an encoded-word, and no chunk so long that a
 * line would exceed 998 octets even when folded. */
static int mime_plain_ok(const char *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c != '\t' && (c < 0x20 || c > 0x7e))
            return 0;
    }
    if (memmem(v, n, "=?", 2) != NULL)
        return 0;
    for (size_t i = 0; i < n; i = mime_chunk_end(v, n, i))
        if (mime_chunk_end(v, n, i) - i > MIME_LINE_HARD - 1)
            return 0;
    return 1;
}

static void mime_hw_plain(mime_hw_t *hw, const char *v, size_t n)
{
    size_t i = 0, e = mime_chunk_end(v, n, 0);
    mime_hw_space(hw, e);
    mime_hw_put(hw, v, e);
    for (i = e; i < n; i = e) {
        e = mime_chunk_end(v, n, i);
        if (hw->col + (e - i) > MIME_LINE_SOFT) {
            buf_append(hw->out, "\r\n", 2);
            hw->col = 0;
        }
        mime_hw_put(hw, v + i, e - i);
    }
}

/* Unstructured header field; name and value already validated. */
static void mime_put_field(buf_t *out, const char *name, const char *value)
{
    mime_hw_t hw;
    size_t n = strlen(value);
    mime_hw_begin(&hw, out, name);
    if (n == 0)
        ; /* "Subject:" alone is a valid empty unstructured field */
    else if (mime_plain_ok(value, n))
        mime_hw_plain(&hw, value, n);
    else
        mime_hw_encoded(&hw, value, n);
    mime_hw_end(&hw);
}

int mime_encode_header_value(buf_t *out, const char *name, const char *value)
{
    if (name == NULL || value == NULL || !mime_valid_hname(name) || mime_has_crlf(value))
        return MIME_EINVAL;
    mime_put_field(out, name, value);
    return MIME_OK;
}

/* ---- addresses ---------------------------------------------------------- */

/* The parser validated addresses already; this is the builder's own guard
 * against anything that would break the header syntax if a message was
 * assembled by other code. */
static int mime_addr_ok(const char *a)
{
    if (a == NULL)
        return 0;
    size_t n = strlen(a);
    const char *at = strrchr(a, '@');
    if (n == 0 || n > MIME_ADDR_MAX || at == NULL || at == a || at[1] == '\0')
        return 0;
    for (const unsigned char *p = (const unsigned char *)a; *p; p++)
        if (*p <= 0x20 || *p == 0x7f || *p == '<' || *p == '>')
            return 0;
    return 1;
}

static int mime_name_plain(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return 0;
    return 1;
}

static void mime_hw_mailbox(mime_hw_t *hw, const mp_address_t *a)
{
    size_t alen = strlen(a->addr);
    size_t nlen = a->name ? strlen(a->name) : 0;
    if (nlen == 0) {
        mime_hw_space(hw, alen);
        mime_hw_put(hw, a->addr, alen);
        return;
    }
    size_t qlen = 2;
    for (size_t i = 0; i < nlen; i++)
        qlen += (a->name[i] == '"' || a->name[i] == '\\') ? 2 : 1;
    /* Always quote an ASCII name: it may hold specials (",", ".", "@")
     * that would otherwise split or corrupt the address list. */
    if (mime_name_plain(a->name, nlen) && qlen <= MIME_QNAME_MAX) {
        mime_hw_space(hw, qlen);
        buf_putc(hw->out, '"');
        for (size_t i = 0; i < nlen; i++) {
            if (a->name[i] == '"' || a->name[i] == '\\')
                buf_putc(hw->out, '\\');
            buf_putc(hw->out, a->name[i]);
        }
        buf_putc(hw->out, '"');
        hw->col += qlen;
    } else {
        mime_hw_encoded(hw, a->name, nlen);
    }
    mime_hw_space(hw, alen + 2);
    mime_hw_put(hw, "<", 1);
    mime_hw_put(hw, a->addr, alen);
    mime_hw_put(hw, ">", 1);
}

static int mime_check_addrs(const char *field, const mp_address_t *a, size_t n, char *err,
                            size_t errlen)
{
    char tmp[80];
    for (size_t i = 0; i < n; i++) {
        if (!mime_addr_ok(a[i].addr)) {
            mime_seterr(err, errlen, "invalid address in %s[%zu]: \"%s\"", field, i,
                        a[i].addr ? mime_errstr(a[i].addr, tmp, sizeof(tmp)) : "(null)");
            return MIME_EINVAL;
        }
        if (a[i].name && mime_has_crlf(a[i].name)) {
            mime_seterr(err, errlen, "display name in %s[%zu] contains CR or LF", field, i);
            return MIME_EINVAL;
        }
    }
    return MIME_OK;
}

static void mime_put_addrs(buf_t *out, const char *name, const mp_address_t *a, size_t n)
{
    mime_hw_t hw;
    mime_hw_begin(&hw, out, name);
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            mime_hw_put(&hw, ",", 1);
        mime_hw_mailbox(&hw, &a[i]);
    }
    mime_hw_end(&hw);
}

/* ---- fixed headers -------------------------------------------------------- */

static int mime_valid_id(const char *id)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)id; *p; p++, n++)
        if (*p < 33 || *p > 126 || *p == '<' || *p == '>' || *p == '@')
            return 0;
    return n >= 1 && n <= MIME_ID_MAX;
}

/* RFC 5322 3.3 date-time, always UTC; names are spelled out so the
 * process locale cannot change them. */
static void mime_put_date(buf_t *out, time_t now)
{
    static const char *const wday[] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" };
    static const char *const mon[] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
    struct tm tm;
    gmtime_r(&now, &tm);
    buf_printf(out, "Date: %s, %02d %s %04d %02d:%02d:%02d +0000\r\n", wday[tm.tm_wday],
               tm.tm_mday, mon[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* Headers the builder writes itself; a second copy from the caller would
 * make recipients, threading or MIME parsing ambiguous. */
static const char *const mime_structural[] = {
    "From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding", "X-Mailpump-Trace-Id",
};

static int mime_is_structural(const char *name)
{
    for (size_t i = 0; i < sizeof(mime_structural) / sizeof(mime_structural[0]); i++)
        if (strcasecmp(name, mime_structural[i]) == 0)
            return 1;
    return 0;
}

static int mime_check_headers(const message_t *m, char *err, size_t errlen)
{
    char tmp[80];
    for (size_t i = 0; i < m->nheaders; i++) {
        const mp_header_t *h = &m->headers[i];
        if (h->name == NULL || !mime_valid_hname(h->name)) {
            mime_seterr(err, errlen, "invalid header name \"%s\"",
                        h->name ? mime_errstr(h->name, tmp, sizeof(tmp)) : "(null)");
            return MIME_EINVAL;
        }
        if (mime_is_structural(h->name)) {
            mime_seterr(err, errlen, "header \"%s\" is set by mailpump and cannot be overridden",
                        h->name);
            return MIME_EINVAL;
        }
        if (h->value == NULL || mime_has_crlf(h->value)) {
            mime_seterr(err, errlen, "value of header \"%s\" contains CR or LF", h->name);
            return MIME_EINVAL;
        }
    }
    return MIME_OK;
}

/* ---- bodies --------------------------------------------------------------- */

/* Next logical line of s: CRLF, a lone CR and a lone LF all end a line, so
 * every encoder normalises line endings the same way. */
static int mime_next_line(const char *s, size_t n, size_t *pos, size_t *start, size_t *len,
                          int *eol)
{
    size_t i = *pos;
    if (i >= n)
        return 0;
    while (i < n && s[i] != '\r' && s[i] != '\n')
        i++;
    *start = *pos;
    *len = i - *pos;
    *eol = i < n;
    if (i < n)
        i += (s[i] == '\r' && i + 1 < n && s[i + 1] == '\n') ? 2 : 1;
    *pos = i;
    return 1;
}

/* RFC 2045 2.7: 7bit data is ASCII in lines of at most 998 octets. */
static int mime_is_7bit(const char *s, size_t n)
{
    size_t pos = 0, st, len;
    int eol;
    while (mime_next_line(s, n, &pos, &st, &len, &eol)) {
        if (len > MIME_LINE_HARD)
            return 0;
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)s[st + i] >= 0x80)
                return 0;
    }
    return 1;
}

static void mime_put_7bit(buf_t *out, const char *s, size_t n)
{
    size_t pos = 0, st, len;
    int eol;
    buf_reserve(out, n + n / 32 + 2);
    while (mime_next_line(s, n, &pos, &st, &len, &eol)) {
        buf_append(out, s + st, len);
        if (eol)
            buf_append(out, "\r\n", 2);
    }
}

/* RFC 2045 6.7 on one line (without its line break). Blanks are literal
 * except at the end of the line (rule 3); a token goes to the next line
 * when it would leave no room for the soft-break "=" (rule 5). */
static char *mime_qp_line(char *p, const unsigned char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        int last = i + 1 == n;
        int lit = (c >= 33 && c <= 126 && c != '=') || ((c == ' ' || c == '\t') && !last);
        size_t tl = lit ? 1 : 3;
        if (col + tl > (last ? MIME_QP_MAX : MIME_QP_MAX - 1)) {
            memcpy(p, "=\r\n", 3);
            p += 3;
            col = 0;
        }
        if (lit) {
            *p++ = (char)c;
        } else {
            *p++ = '=';
            *p++ = hex[c >> 4];
            *p++ = hex[c & 15];
        }
        col += tl;
    }
    return p;
}

static void mime_put_qp(buf_t *out, const char *s, size_t n)
{
    size_t pos = 0, st, len;
    int eol;
    while (mime_next_line(s, n, &pos, &st, &len, &eol)) {
        /* worst case: every octet as =XX, plus a soft break per 25 octets
         * (a line holds at least 25 tokens); generous on purpose */
        buf_reserve(out, 3 * len + 3 * (len / 20 + 2) + 2);
        char *p = out->data + out->len;
        p = mime_qp_line(p, (const unsigned char *)s + st, len);
        if (eol) {
            memcpy(p, "\r\n", 2);
            p += 2;
        }
        out->len = (size_t)(p - out->data);
        out->data[out->len] = '\0';
    }
}

/* Content headers and encoded content of one text part. Returns the offset
 * (relative to buf_head) where the encoded content starts. */
static size_t mime_put_part(buf_t *out, const char *subtype, const char *s)
{
    size_t n = strlen(s);
    int seven = mime_is_7bit(s, n);
    buf_printf(out, "Content-Type: text/%s; charset=utf-8\r\n"
                    "Content-Transfer-Encoding: %s\r\n\r\n",
               subtype, seven ? "7bit" : "quoted-printable");
    size_t start = buf_size(out);
    if (seven)
        mime_put_7bit(out, s, n);
    else
        mime_put_qp(out, s, n);
    return start;
}

static int mime_ends_crlf(const buf_t *out)
{
    size_t n = buf_size(out);
    return n >= 2 && memcmp(buf_head(out) + n - 2, "\r\n", 2) == 0;
}

/* multipart/alternative. The boundary is random; it is still checked
 * against both encoded parts, because a 7bit part is arbitrary caller text
 * (quoted-printable output can never contain "=_"). */
static int mime_put_alternative(buf_t *out, const char *text, const char *html, char *err,
                                size_t errlen)
{
    size_t mark = buf_size(out);
    char boundary[48];
    for (int t = 0; t < MIME_BOUNDARY_TRIES; t++) {
        mime_truncate(out, mark);
        snprintf(boundary, sizeof(boundary), "=_mp_%016llx%016llx",
                 (unsigned long long)util_rand64(), (unsigned long long)util_rand64());
        size_t blen = strlen(boundary);
        buf_printf(out, "Content-Type: multipart/alternative;\r\n boundary=\"%s\"\r\n\r\n",
                   boundary);
        buf_printf(out, "--%s\r\n", boundary);
        size_t s1 = mime_put_part(out, "plain", text), e1 = buf_size(out);
        buf_printf(out, "\r\n--%s\r\n", boundary);
        size_t s2 = mime_put_part(out, "html", html), e2 = buf_size(out);
        buf_printf(out, "\r\n--%s--\r\n", boundary);
        const char *h = buf_head(out);
        if (memmem(h + s1, e1 - s1, boundary, blen) == NULL &&
            memmem(h + s2, e2 - s2, boundary, blen) == NULL)
            return MIME_OK;
    }
    mime_seterr(err, errlen, "could not find a MIME boundary absent from the content");
    return MIME_EINVAL;
}

static int mime_put_body(buf_t *out, const message_t *m, char *err, size_t errlen)
{
    int has_text = m->text && *m->text, has_html = m->html && *m->html;
    if (has_text && has_html)
        return mime_put_alternative(out, m->text, m->html, err, errlen);
    mime_put_part(out, has_html ? "html" : "plain", has_html ? m->html : has_text ? m->text : "");
    /* SMTP and IMAP both want the message to end with a line break; adding
     * it here keeps the bytes sent and the bytes filed identical. */
    if (!mime_ends_crlf(out))
        buf_append(out, "\r\n", 2);
    return MIME_OK;
}

/* ---- mime_build ----------------------------------------------------------- */

static int mime_check(const message_t *m, char *err, size_t errlen)
{
    char tmp[80];
    int rc;
    if (m == NULL) {
        mime_seterr(err, errlen, "no message");
        return MIME_EINVAL;
    }
    if (!mime_addr_ok(m->from.addr)) {
        mime_seterr(err, errlen, "invalid sender address \"%s\"",
                    m->from.addr ? mime_errstr(m->from.addr, tmp, sizeof(tmp)) : "(null)");
        return MIME_EINVAL;
    }
    if (m->from.name && mime_has_crlf(m->from.name)) {
        mime_seterr(err, errlen, "sender display name contains CR or LF");
        return MIME_EINVAL;
    }
    if ((rc = mime_check_addrs("to", m->to, m->nto, err, errlen)) != MIME_OK ||
        (rc = mime_check_addrs("cc", m->cc, m->ncc, err, errlen)) != MIME_OK)
        return rc;
    if (m->id == NULL || !mime_valid_id(m->id)) {
        mime_seterr(err, errlen, "invalid message id \"%s\"",
                    m->id ? mime_errstr(m->id, tmp, sizeof(tmp)) : "(null)");
        return MIME_EINVAL;
    }
    if (m->subject && mime_has_crlf(m->subject)) {
        mime_seterr(err, errlen, "subject contains CR or LF");
        return MIME_EINVAL;
    }
    if (m->trace_id && mime_has_crlf(m->trace_id)) {
        mime_seterr(err, errlen, "trace id contains CR or LF");
        return MIME_EINVAL;
    }
    return mime_check_headers(m, err, errlen);
}

static int mime_build_into(const message_t *m, const mime_opts_t *opts, buf_t *out, char *err,
                           size_t errlen)
{
    int rc = mime_check(m, err, errlen);
    if (rc != MIME_OK)
        return rc;

    mime_put_addrs(out, "From", &m->from, 1);
    if (m->nto > 0)
        mime_put_addrs(out, "To", m->to, m->nto);
    if (m->ncc > 0)
        mime_put_addrs(out, "Cc", m->cc, m->ncc);
    /* Bcc recipients are envelope-only: writing them would disclose them
     * to every other recipient. */
    if (m->subject)
        mime_put_field(out, "Subject", m->subject);
    mime_put_date(out, opts && opts->now ? opts->now : time(NULL));
    buf_printf(out, "Message-ID: <%s@%s>\r\n", m->id, message_addr_domain(m->from.addr));
    buf_puts(out, "MIME-Version: 1.0\r\n");
    for (size_t i = 0; i < m->nheaders; i++)
        mime_put_field(out, m->headers[i].name, m->headers[i].value);
    if (m->trace_id)
        mime_put_field(out, "X-Mailpump-Trace-Id", m->trace_id);
    return mime_put_body(out, m, err, errlen);
}

int mime_build(const message_t *m, const mime_opts_t *opts, buf_t *out, char *err, size_t errlen)
{
    size_t mark = buf_size(out);
    if (err && errlen)
        err[0] = '\0';
    int rc = mime_build_into(m, opts, out, err, errlen);
    if (rc == MIME_OK && opts && opts->max_size && buf_size(out) - mark > opts->max_size) {
        mime_seterr(err, errlen, "message is %zu bytes, limit is %zu", buf_size(out) - mark,
                    opts->max_size);
        rc = MIME_ETOOBIG;
    }
    if (rc != MIME_OK)
        mime_truncate(out, mark);
    return rc;
}

/* ---- SMTP DATA framing ---------------------------------------------------- */

void mime_dotstuff(const char *in, size_t len, buf_t *out)
{
    /* worst case: every byte a bare line ending (2x), plus the terminator */
    buf_reserve(out, 2 * len + 5);
    char *p = out->data + out->len;
    int bol = 1;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '\r' || c == '\n') {
            if (c == '\r' && i + 1 < len && in[i + 1] == '\n')
                i++;
            *p++ = '\r';
            *p++ = '\n';
            bol = 1;
            continue;
        }
        /* RFC 5321 4.5.2: a line starting with "." gets one more, so no
         * content line can be mistaken for the terminator. This costs at
         * most one extra byte per line, covered by the 2x reserve because
         * a "." at line start follows a line ending (2 bytes for 1) or is
         * the first byte. */
        if (bol && c == '.')
            *p++ = '.';
        *p++ = c;
        bol = 0;
    }
    if (!bol) {
        *p++ = '\r';
        *p++ = '\n';
    }
    memcpy(p, ".\r\n", 3);
    p += 3;
    out->len = (size_t)(p - out->data);
    out->data[out->len] = '\0';
}

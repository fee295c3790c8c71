/*
 * SUMMARY
 *  mime/build.c - build RFC 5322 / MIME message bytes; SMTP dot-stuffing.
 * DESCRIPTION
 *  mime_build() writes the header block (addresses, RFC 2047 encoded
 *  words, Date, Message-ID, the caller's extra headers) and the body:
 *  text/plain, text/html or multipart/alternative, nested in
 *  multipart/related for inline attachments and multipart/mixed for the
 *  others, choosing 7bit, quoted-printable or base64 per part; or it
 *  passes an application's raw message through, only normalising line
 *  endings. The same bytes go to SMTP and to IMAP, so they are built once
 *  and end in CRLF. The output is reserved once up front, so a large
 *  attachment is base64-encoded straight into its final place.
 *
 *  Invariants the rest of the system relies on (the protocol rules of
 *  docs/architecture.md): every line ends in CRLF, no line exceeds 998 octets, no caller
 *  string can inject a header (CR/LF in values is refused, not escaped),
 *  and a caller cannot override a header the builder owns.
 *
 *  mime_dotstuff() is the only place where DATA framing happens: it also
 *  turns any bare CR or LF into CRLF, so even a buggy caller cannot put
 *  a bare line ending on the wire (SMTP smuggling). mime_wire_segments()
 *  is the same framing as an iovec over the built bytes, for a session
 *  that can write one without copying the message; it refuses input with
 *  a bare line ending rather than frame it differently.
 * DIAGNOSTICS
 *  MIME_EINVAL with a reason in err for input that cannot be represented
 *  safely; MIME_ETOOBIG when the result exceeds opts->max_size. The
 *  output buffer is restored to its entry length on any error.
 */
#include "mime/build.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/base64.h"
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

/* ---- RFC 2047 encoded-words ------------------------------------------ */

/* Pick the shorter encoding for the whole value: Q keeps mostly-ASCII text
 * readable, B is denser for scripts that are mostly multi-byte. */
static int mime_ew_use_b(const unsigned char *s, size_t n)
{
    size_t q = 0;
    for (size_t i = 0; i < n; i++)
        q += mime_q_cost(s[i]);
    return base64_encoded_len(n) < q;
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
            c2 = base64_encoded_len(k + cl);
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
        payload = base64_encoded_len(k);
    } else {
        for (size_t i = 0; i < k; i++)
            payload += mime_q_cost(s[i]);
    }
    return MIME_EW_OVERHEAD + payload;
}

static void mime_ew_put(buf_t *out, const unsigned char *s, size_t k, int b)
{
    static const char hex[] = "0123456789ABCDEF";
    buf_append(out, b ? "=?UTF-8?B?" : "=?UTF-8?Q?", 10);
    if (b) {
        base64_encode(out, s, k);
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
 * line would exceed 998 octets even when folded. prefix: the length of
 * "Name: " before the value. */
static int mime_plain_ok(const char *v, size_t n, size_t prefix)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c != '\t' && (c < 0x20 || c > 0x7e))
            return 0;
    }
    if (memmem(v, n, "=?", 2) != NULL)
        return 0;
    /* the first chunk shares its line with "Name: " and cannot be folded
     * away from it; the others start a line of their own */
    for (size_t i = 0; i < n; i = mime_chunk_end(v, n, i))
        if (mime_chunk_end(v, n, i) - i + (i == 0 ? prefix : 0) > MIME_LINE_HARD - 1)
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
    else if (mime_plain_ok(value, n, strlen(name) + 2))
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
            util_seterr(err, errlen, "invalid address in %s[%zu]: \"%s\"", field, i,
                        a[i].addr ? util_quote_text(a[i].addr, tmp, sizeof(tmp)) : "(null)");
            return MIME_EINVAL;
        }
        if (a[i].name && mime_has_crlf(a[i].name)) {
            util_seterr(err, errlen, "display name in %s[%zu] contains CR or LF", field, i);
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
            util_seterr(err, errlen, "invalid header name \"%s\"",
                        h->name ? util_quote_text(h->name, tmp, sizeof(tmp)) : "(null)");
            return MIME_EINVAL;
        }
        if (mime_is_structural(h->name)) {
            util_seterr(err, errlen, "header \"%s\" is set by mailpump and cannot be overridden",
                        h->name);
            return MIME_EINVAL;
        }
        if (h->value == NULL || mime_has_crlf(h->value)) {
            util_seterr(err, errlen, "value of header \"%s\" contains CR or LF", h->name);
            return MIME_EINVAL;
        }
    }
    return MIME_OK;
}

/* ---- bodies --------------------------------------------------------------- */

#define MIME_ONES 0x0101010101010101ull
#define MIME_HIGH 0x8080808080808080ull

static size_t mime_find_eol_tail(const char *s, size_t i, size_t n)
{
    while (i < n && s[i] != '\r' && s[i] != '\n')
        i++;
    return i;
}

/* Index of the first CR or LF in s[i..n), or n: eight octets at a time
 * (a word holds one when x ^ CR or x ^ LF has a zero octet). */
static size_t mime_find_eol(const char *s, size_t i, size_t n)
{
    for (; i + 8 <= n; i += 8) {
        uint64_t w, a, b, hit;
        memcpy(&w, s + i, 8);
        a = w ^ (MIME_ONES * '\n');
        b = w ^ (MIME_ONES * '\r');
        /* exact for the lowest octet (false hits only above a true one);
         * octet order is the memory order on little-endian machines */
        hit = (((a - MIME_ONES) & ~a) | ((b - MIME_ONES) & ~b)) & MIME_HIGH;
        if (hit)
            return __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
                       ? i + (size_t)__builtin_ctzll(hit) / 8
                       : mime_find_eol_tail(s, i, n);
    }
    return mime_find_eol_tail(s, i, n);
}

/* 1 when no octet of s[0..n) is >= 0x80 */
static int mime_ascii(const char *s, size_t n)
{
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        acc |= w;
    }
    unsigned char t = 0;
    for (; i < n; i++)
        t |= (unsigned char)s[i];
    return (acc & MIME_HIGH) == 0 && t < 0x80;
}

/* Next logical line of s: CRLF, a lone CR and a lone LF all end a line, so
 * every encoder normalises line endings the same way. */
static int mime_next_line(const char *s, size_t n, size_t *pos, size_t *start, size_t *len,
                          int *eol)
{
    size_t i = *pos;
    if (i >= n)
        return 0;
    i = mime_find_eol(s, i, n);
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
        if (len > MIME_LINE_HARD || !mime_ascii(s + st, len))
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

/* ---- leaves: text bodies and attachments ---------------------------------- */

typedef enum { MIME_CTE_7BIT, MIME_CTE_QP, MIME_CTE_B64 } mime_cte_t;

static const char *const mime_cte_name[] = { "7bit", "quoted-printable", "base64" };

/* base64 body (RFC 2045 6.8): 76 characters (57 octets) per line, written
 * straight into reserved memory because this is where large attachments
 * spend their time. The only line-wrapping base64 encoder of the project;
 * the encoding itself is core/base64's, one line at a time. */
static size_t mime_b64_body_len(size_t n)
{
    return base64_encoded_len(n) + 2 * ((n + 56) / 57);
}

/* Writes mime_b64_body_len(n) characters at p (which has room for one
 * more: base64_encode_to() ends each line with a NUL that the CR then
 * overwrites). Returns the end. */
static char *mime_b64_lines(char *p, const unsigned char *s, size_t n)
{
    while (n > 0) {
        size_t k = n < 57 ? n : 57;
        p += base64_encode_to(p, s, k);
        *p++ = '\r';
        *p++ = '\n';
        s += k;
        n -= k;
    }
    return p;
}

static void mime_put_b64(buf_t *out, const unsigned char *s, size_t n)
{
    buf_reserve(out, mime_b64_body_len(n));
    char *p = mime_b64_lines(out->data + out->len, s, n);
    out->len = (size_t)(p - out->data);
    out->data[out->len] = '\0';
}

/* Binary-safe 7bit: printable ASCII and tab, every line ending already
 * CRLF and every line at most 998 octets. Such content is copied
 * verbatim, so the recipient decodes exactly the bytes that were given;
 * other control characters, though legal in 7bit, mark binary data. */
static int mime_is_7bit_exact(const unsigned char *s, size_t n)
{
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 0x7f || (c < 0x20 && c != '\t' && c != '\r' && c != '\n'))
            return 0;
        if (c == '\r') {
            if (i + 1 >= n || s[i + 1] != '\n')
                return 0;
            i++;
            col = 0;
        } else if (c == '\n') {
            return 0;
        } else if (++col > MIME_LINE_HARD) {
            return 0;
        }
    }
    return 1;
}

/* Text: 7bit when it already is (line endings are normalised, which is
 * the canonical form of text, RFC 2049 4), quoted-printable while that is
 * shorter than base64 (under one octet in six needs escaping), base64
 * otherwise and always for NUL. Other types: verbatim 7bit or base64. */
static mime_cte_t mime_choose_cte(const char *ctype, const unsigned char *s, size_t n)
{
    int text = strncasecmp(ctype, "text/", 5) == 0;
    if (!text)
        return mime_is_7bit_exact(s, n) ? MIME_CTE_7BIT : MIME_CTE_B64;
    if (memchr(s, '\0', n) != NULL)
        return MIME_CTE_B64;
    if (mime_is_7bit((const char *)s, n))
        return MIME_CTE_7BIT;
    size_t esc = 0;
    for (size_t i = 0; i < n; i++)
        esc += (s[i] >= 0x80 || (s[i] < 0x20 && s[i] != '\t' && s[i] != '\r' && s[i] != '\n'));
    return esc * 6 < n ? MIME_CTE_QP : MIME_CTE_B64;
}

static void mime_put_content(buf_t *out, mime_cte_t cte, const char *s, size_t n)
{
    switch (cte) {
    case MIME_CTE_7BIT:
        mime_put_7bit(out, s, n);
        break;
    case MIME_CTE_QP:
        mime_put_qp(out, s, n);
        break;
    case MIME_CTE_B64:
        mime_put_b64(out, (const unsigned char *)s, n);
        break;
    }
}

/* Content headers and encoded content of one text body part: 7bit or
 * quoted-printable, so mostly-ASCII mail stays readable in any client. */
static void mime_put_text(buf_t *out, const char *subtype, const char *s)
{
    size_t n = strlen(s);
    mime_cte_t cte = mime_is_7bit(s, n) ? MIME_CTE_7BIT : MIME_CTE_QP;
    buf_printf(out, "Content-Type: text/%s; charset=utf-8\r\n"
                    "Content-Transfer-Encoding: %s\r\n\r\n",
               subtype, mime_cte_name[cte]);
    mime_put_content(out, cte, s, n);
}

/* RFC 2231 attribute-char: what may stay literal in an extended value. */
static int mime_attr_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$&+-.^_`|~", c) != NULL);
}

#define MIME_PARAM_CHUNK 60 /* encoded characters per continuation line */

/*
 * ";\r\n attr=value" for a file name. A short printable-ASCII name is a
 * quoted-string; anything else is RFC 2231 (UTF-8, percent-encoded),
 * split into continuations attr*0*, attr*1*, ... of at most 60 characters
 * that never split a UTF-8 character, so every line stays under 78.
 */
static void mime_put_fname_param(buf_t *out, const char *attr, const char *v)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *s = (const unsigned char *)v;
    size_t n = strlen(v);
    int plain = n <= MIME_PARAM_CHUNK;
    for (size_t i = 0; plain && i < n; i++)
        plain = s[i] >= 0x20 && s[i] < 0x7f && s[i] != '"' && s[i] != '\\';
    /* "=?" inside a quoted name would be decoded as RFC 2047 by some
     * clients: such names take the RFC 2231 form too */
    if (plain && strstr(v, "=?") == NULL) {
        buf_printf(out, ";\r\n %s=\"%s\"", attr, v);
        return;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += mime_attr_char(s[i]) ? 1 : 3;
    int cont = total + 7 > MIME_PARAM_CHUNK; /* "utf-8''" */
    size_t pos = 0;
    for (unsigned idx = 0; pos < n; idx++) {
        if (cont)
            buf_printf(out, ";\r\n %s*%u*=%s", attr, idx, idx == 0 ? "utf-8''" : "");
        else
            buf_printf(out, ";\r\n %s*=utf-8''", attr);
        size_t col = idx == 0 ? 7 : 0;
        while (pos < n) {
            size_t cl = mime_utf8_len(s + pos, n - pos), cost = 0;
            for (size_t j = 0; j < cl; j++)
                cost += mime_attr_char(s[pos + j]) ? 1 : 3;
            if (col > 0 && col + cost > MIME_PARAM_CHUNK)
                break;
            for (size_t j = 0; j < cl; j++) {
                unsigned char c = s[pos + j];
                if (mime_attr_char(c)) {
                    buf_putc(out, (char)c);
                } else {
                    char e[3] = { '%', hex[c >> 4], hex[c & 15] };
                    buf_append(out, e, 3);
                }
            }
            col += cost;
            pos += cl;
        }
    }
}

/* Part headers and encoded content of one attachment. */
static void mime_put_attachment(buf_t *out, const mp_attachment_t *a, mime_cte_t cte,
                                int disp_inline)
{
    buf_printf(out, "Content-Type: %s", a->content_type);
    mime_put_fname_param(out, "name", a->filename);
    buf_printf(out, "\r\nContent-Transfer-Encoding: %s\r\n", mime_cte_name[cte]);
    if (a->content_id)
        buf_printf(out, "Content-ID: <%s>\r\n", a->content_id);
    buf_puts(out, disp_inline ? "Content-Disposition: inline" : "Content-Disposition: attachment");
    mime_put_fname_param(out, "filename", a->filename);
    buf_puts(out, "\r\n\r\n");
    mime_put_content(out, cte, (const char *)a->data, a->len);
}

/* ---- structure: mixed > related > alternative ------------------------------- */

/*
 * Which multipart levels a message needs and the boundary of each. Inline
 * attachments join the HTML in multipart/related (RFC 2387); without an
 * HTML body nothing could refer to them, so they go to multipart/mixed
 * with an inline disposition like the rest.
 */
typedef struct mime_tree {
    const message_t *m;
    int              has_text, has_html;
    size_t           nrelated, nmixed;
    mime_cte_t      *cte; /* per attachment */
    char             b_mixed[40], b_related[40], b_alt[40];
} mime_tree_t;

static int mime_in_related(const mime_tree_t *t, const mp_attachment_t *a)
{
    return a->is_inline && t->has_html;
}

static void mime_new_boundary(char *b, size_t blen)
{
    snprintf(b, blen, "=_mp_%016llx%016llx", (unsigned long long)util_rand64(),
             (unsigned long long)util_rand64());
}

/* A boundary must not occur in any part (RFC 2046 5.1.1). Quoted-printable
 * ("=" is always followed by a hex digit or CRLF) and base64 (no "_") can
 * never contain "=_", so only the 7bit parts are searched, in their source
 * form: normalising line endings cannot create or remove a string that
 * holds no CR or LF. */
static int mime_boundary_clash(const mime_tree_t *t, const char *b)
{
    const message_t *m = t->m;
    size_t bl = strlen(b);
    if (t->has_text && memmem(m->text, strlen(m->text), b, bl))
        return 1;
    if (t->has_html && memmem(m->html, strlen(m->html), b, bl))
        return 1;
    for (size_t i = 0; i < m->nattachments; i++)
        if (t->cte[i] == MIME_CTE_7BIT && memmem(m->attachments[i].data, m->attachments[i].len, b, bl))
            return 1;
    return 0;
}

static int mime_pick_boundary(const mime_tree_t *t, char *b, size_t blen, const char *other1,
                              const char *other2)
{
    for (int i = 0; i < MIME_BOUNDARY_TRIES; i++) {
        mime_new_boundary(b, blen);
        if (!mime_boundary_clash(t, b) && strcmp(b, other1) != 0 && strcmp(b, other2) != 0)
            return MIME_OK;
    }
    return MIME_EINVAL;
}

/* text, html or multipart/alternative of both */
static void mime_put_core(buf_t *out, const mime_tree_t *t)
{
    const message_t *m = t->m;
    if (t->has_text && t->has_html) {
        buf_printf(out, "Content-Type: multipart/alternative;\r\n boundary=\"%s\"\r\n\r\n",
                   t->b_alt);
        buf_printf(out, "--%s\r\n", t->b_alt);
        mime_put_text(out, "plain", m->text);
        buf_printf(out, "\r\n--%s\r\n", t->b_alt);
        mime_put_text(out, "html", m->html);
        buf_printf(out, "\r\n--%s--\r\n", t->b_alt);
    } else {
        mime_put_text(out, t->has_html ? "html" : "plain",
                      t->has_html ? m->html : t->has_text ? m->text : "");
    }
}

static void mime_put_related(buf_t *out, const mime_tree_t *t)
{
    const message_t *m = t->m;
    if (t->nrelated == 0) {
        mime_put_core(out, t);
        return;
    }
    buf_printf(out, "Content-Type: multipart/related;\r\n type=\"%s\";\r\n boundary=\"%s\"\r\n\r\n",
               t->has_text ? "multipart/alternative" : "text/html", t->b_related);
    buf_printf(out, "--%s\r\n", t->b_related);
    mime_put_core(out, t);
    for (size_t i = 0; i < m->nattachments; i++) {
        if (!mime_in_related(t, &m->attachments[i]))
            continue;
        buf_printf(out, "\r\n--%s\r\n", t->b_related);
        mime_put_attachment(out, &m->attachments[i], t->cte[i], 1);
    }
    buf_printf(out, "\r\n--%s--\r\n", t->b_related);
}

static void mime_put_mixed(buf_t *out, const mime_tree_t *t)
{
    const message_t *m = t->m;
    if (t->nmixed == 0) {
        mime_put_related(out, t);
        return;
    }
    buf_printf(out, "Content-Type: multipart/mixed;\r\n boundary=\"%s\"\r\n\r\n", t->b_mixed);
    /* without text or html the attachments are the only parts */
    int first = 1;
    if (t->has_text || t->has_html) {
        buf_printf(out, "--%s\r\n", t->b_mixed);
        mime_put_related(out, t);
        first = 0;
    }
    for (size_t i = 0; i < m->nattachments; i++) {
        const mp_attachment_t *a = &m->attachments[i];
        if (mime_in_related(t, a))
            continue;
        buf_printf(out, first ? "--%s\r\n" : "\r\n--%s\r\n", t->b_mixed);
        first = 0;
        mime_put_attachment(out, a, t->cte[i], a->is_inline);
    }
    buf_printf(out, "\r\n--%s--\r\n", t->b_mixed);
}

static int mime_ends_crlf(const buf_t *out)
{
    size_t n = buf_size(out);
    return n >= 2 && memcmp(buf_head(out) + n - 2, "\r\n", 2) == 0;
}

/* What the caller's attachment says must be safe to copy into headers. */
static int mime_check_attachments(const message_t *m, char *err, size_t errlen)
{
    char tmp[80];
    for (size_t i = 0; i < m->nattachments; i++) {
        const mp_attachment_t *a = &m->attachments[i];
        if (a->filename == NULL || a->filename[0] == '\0' || strlen(a->filename) > 255) {
            util_seterr(err, errlen, "attachment %zu: file name must be 1..255 octets", i);
            return MIME_EINVAL;
        }
        for (const unsigned char *p = (const unsigned char *)a->filename; *p; p++) {
            if (*p < 0x20 || *p == 0x7f) {
                util_seterr(err, errlen, "attachment %zu: control character in file name \"%s\"",
                            i, util_quote_text(a->filename, tmp, sizeof(tmp)));
                return MIME_EINVAL;
            }
        }
        const char *ct = a->content_type;
        size_t cl = ct ? strlen(ct) : 0;
        int ok = cl > 0 && cl <= 200 && strchr(ct, '/') != NULL && ct[0] != '/';
        for (size_t k = 0; ok && k < cl; k++)
            ok = (unsigned char)ct[k] >= 0x20 && (unsigned char)ct[k] < 0x7f;
        if (!ok) {
            util_seterr(err, errlen, "attachment %zu: invalid content type \"%s\"", i,
                        ct ? util_quote_text(ct, tmp, sizeof(tmp)) : "(null)");
            return MIME_EINVAL;
        }
        if (strncasecmp(ct, "multipart/", 10) == 0) {
            util_seterr(err, errlen, "attachment %zu: a multipart content type cannot be attached",
                        i);
            return MIME_EINVAL;
        }
        if (a->content_id) {
            size_t il = strlen(a->content_id);
            ok = il > 0 && il <= 250;
            for (size_t k = 0; ok && k < il; k++) {
                unsigned char c = (unsigned char)a->content_id[k];
                ok = c > 0x20 && c < 0x7f && c != '<' && c != '>';
            }
            if (!ok) {
                util_seterr(err, errlen, "attachment %zu: invalid content id \"%s\"", i,
                            util_quote_text(a->content_id, tmp, sizeof(tmp)));
                return MIME_EINVAL;
            }
        }
        if (a->data == NULL && a->len > 0) {
            util_seterr(err, errlen, "attachment %zu: no data", i);
            return MIME_EINVAL;
        }
    }
    return MIME_OK;
}

/* Room for the whole message before writing it, so a large body is
 * encoded once straight into its final place instead of being moved by
 * the buffer's doubling; a bound, not an exact size (pages never written
 * are never touched). Fails softly: allocation failure is MIME_ENOMEM. */
static int mime_reserve(buf_t *out, size_t extra)
{
    if (out->len + extra + 1 <= out->cap)
        return MIME_OK;
    buf_compact(out);
    size_t want = out->len + extra + 1;
    char *p = realloc(out->data, want);
    if (p == NULL)
        return MIME_ENOMEM;
    out->data = p;
    out->cap = want;
    out->data[out->len] = '\0';
    return MIME_OK;
}

static size_t mime_text_bound(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    /* quoted-printable: 3 per octet plus a soft break per 25 escapes */
    return 3 * n + 3 * (n / 25) + 256;
}

static size_t mime_size_bound(const message_t *m)
{
    size_t b = 8192 + mime_text_bound(m->subject) + mime_text_bound(m->trace_id) +
               mime_text_bound(m->text) + mime_text_bound(m->html);
    b += (m->nto + m->ncc + 1) * 2048;
    for (size_t i = 0; i < m->nheaders; i++)
        b += mime_text_bound(m->headers[i].value) + 100;
    for (size_t i = 0; i < m->nattachments; i++) {
        size_t n = m->attachments[i].len;
        size_t b64 = mime_b64_body_len(n);
        size_t qp = 3 * n + 3 * (n / 25) + 2;
        b += 4096 + (b64 > qp ? b64 : qp);
    }
    return b;
}

static int mime_put_body(buf_t *out, const message_t *m, char *err, size_t errlen)
{
    mime_tree_t t = { .m = m };
    t.has_text = m->text && *m->text;
    t.has_html = m->html && *m->html;
    if (m->nattachments > 0) {
        t.cte = malloc(m->nattachments * sizeof(*t.cte));
        if (t.cte == NULL) {
            util_seterr(err, errlen, "out of memory");
            return MIME_ENOMEM;
        }
    }
    for (size_t i = 0; i < m->nattachments; i++) {
        const mp_attachment_t *a = &m->attachments[i];
        t.cte[i] = mime_choose_cte(a->content_type, a->data, a->len);
        if (mime_in_related(&t, a))
            t.nrelated++;
        else
            t.nmixed++;
    }
    int rc = MIME_OK;
    for (size_t i = 0; i < m->nattachments; i++) {
        if (strncasecmp(m->attachments[i].content_type, "message/", 8) == 0 &&
            t.cte[i] != MIME_CTE_7BIT) {
            /* RFC 2046 5.2: message/... may not be encoded */
            util_seterr(err, errlen,
                        "attachment %zu: message/* content must be 7-bit with CRLF line "
                        "endings; attach it as application/octet-stream",
                        i);
            rc = MIME_EINVAL;
            goto out;
        }
    }
    if ((t.has_text && t.has_html &&
         mime_pick_boundary(&t, t.b_alt, sizeof(t.b_alt), "", "") != MIME_OK) ||
        (t.nrelated && mime_pick_boundary(&t, t.b_related, sizeof(t.b_related), t.b_alt, "") !=
                           MIME_OK) ||
        (t.nmixed && mime_pick_boundary(&t, t.b_mixed, sizeof(t.b_mixed), t.b_alt, t.b_related) !=
                         MIME_OK)) {
        util_seterr(err, errlen, "could not find a MIME boundary absent from the content");
        rc = MIME_EINVAL;
        goto out;
    }
    mime_put_mixed(out, &t);
    /* SMTP and IMAP both want the message to end with a line break; adding
     * it here keeps the bytes sent and the bytes filed identical. */
    if (!mime_ends_crlf(out))
        buf_append(out, "\r\n", 2);
out:
    free(t.cte);
    return rc;
}

/* ---- raw messages ------------------------------------------------------------ */

/*
 * The application's own message: line endings normalised to CRLF, nothing
 * else changed. Refused when a line exceeds 998 octets, a NUL is present,
 * the header section holds a line that is neither a field nor a
 * continuation, or there is no From field (it is what DKIM signs and what
 * recipients judge).
 */
static int mime_put_raw(buf_t *out, const message_t *m, char *err, size_t errlen)
{
    const char *s = m->raw;
    size_t n = m->raw_len, pos = 0, st, len, lineno = 0;
    int eol, in_header = 1, has_from = 0;
    if (n == 0) {
        util_seterr(err, errlen, "raw message is empty");
        return MIME_EINVAL;
    }
    if (memchr(s, '\0', n) != NULL) {
        util_seterr(err, errlen, "raw message contains a NUL byte");
        return MIME_EINVAL;
    }
    while (mime_next_line(s, n, &pos, &st, &len, &eol)) {
        lineno++;
        if (len > MIME_LINE_HARD) {
            util_seterr(err, errlen, "raw message line %zu is %zu octets long (limit %d)", lineno,
                        len, MIME_LINE_HARD);
            return MIME_EINVAL;
        }
        if (!in_header)
            continue;
        if (len == 0) {
            in_header = 0;
            if (lineno == 1) {
                util_seterr(err, errlen, "raw message has no header section");
                return MIME_EINVAL;
            }
            continue;
        }
        if (s[st] == ' ' || s[st] == '\t') {
            if (lineno == 1) {
                util_seterr(err, errlen, "raw message starts with a continuation line");
                return MIME_EINVAL;
            }
            continue;
        }
        size_t k = 0;
        while (k < len && (unsigned char)s[st + k] >= 33 && (unsigned char)s[st + k] <= 126 &&
               s[st + k] != ':')
            k++;
        if (k == 0 || k == len || s[st + k] != ':') {
            util_seterr(err, errlen, "raw message header line %zu is not a header field",
                        lineno);
            return MIME_EINVAL;
        }
        if (k == 4 && strncasecmp(s + st, "From", 4) == 0)
            has_from = 1;
    }
    if (!has_from) {
        util_seterr(err, errlen, "raw message has no From header field");
        return MIME_EINVAL;
    }
    if (mime_reserve(out, n + n / 8 + 4) != MIME_OK) {
        util_seterr(err, errlen, "out of memory");
        return MIME_ENOMEM;
    }
    mime_put_7bit(out, s, n);
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
        util_seterr(err, errlen, "no message");
        return MIME_EINVAL;
    }
    if (!mime_addr_ok(m->from.addr)) {
        util_seterr(err, errlen, "invalid sender address \"%s\"",
                    m->from.addr ? util_quote_text(m->from.addr, tmp, sizeof(tmp)) : "(null)");
        return MIME_EINVAL;
    }
    if (m->from.name && mime_has_crlf(m->from.name)) {
        util_seterr(err, errlen, "sender display name contains CR or LF");
        return MIME_EINVAL;
    }
    if ((rc = mime_check_addrs("to", m->to, m->nto, err, errlen)) != MIME_OK ||
        (rc = mime_check_addrs("cc", m->cc, m->ncc, err, errlen)) != MIME_OK)
        return rc;
    if (m->id == NULL || !mime_valid_id(m->id)) {
        util_seterr(err, errlen, "invalid message id \"%s\"",
                    m->id ? util_quote_text(m->id, tmp, sizeof(tmp)) : "(null)");
        return MIME_EINVAL;
    }
    if (m->subject && mime_has_crlf(m->subject)) {
        util_seterr(err, errlen, "subject contains CR or LF");
        return MIME_EINVAL;
    }
    if (m->trace_id && mime_has_crlf(m->trace_id)) {
        util_seterr(err, errlen, "trace id contains CR or LF");
        return MIME_EINVAL;
    }
    if ((rc = mime_check_attachments(m, err, errlen)) != MIME_OK)
        return rc;
    return mime_check_headers(m, err, errlen);
}

/* A cheap lower bound of the result: refuse an oversized message before
 * spending memory and time encoding it. */
static size_t mime_size_floor(const message_t *m)
{
    size_t n = m->raw_len + (m->text ? strlen(m->text) : 0) + (m->html ? strlen(m->html) : 0);
    for (size_t i = 0; i < m->nattachments; i++)
        n += m->attachments[i].len;
    return n;
}

static int mime_build_into(const message_t *m, const mime_opts_t *opts, buf_t *out, char *err,
                           size_t errlen)
{
    if (m == NULL) {
        util_seterr(err, errlen, "no message");
        return MIME_EINVAL;
    }
    if (opts && opts->max_size && mime_size_floor(m) > opts->max_size) {
        util_seterr(err, errlen, "message is more than %zu bytes, limit is %zu",
                    mime_size_floor(m), opts->max_size);
        return MIME_ETOOBIG;
    }
    if (m->raw) {
        int rc;
        if (!mime_addr_ok(m->from.addr)) {
            util_seterr(err, errlen, "invalid sender address");
            return MIME_EINVAL;
        }
        if ((rc = mime_check_addrs("to", m->to, m->nto, err, errlen)) != MIME_OK ||
            (rc = mime_check_addrs("cc", m->cc, m->ncc, err, errlen)) != MIME_OK)
            return rc;
        return mime_put_raw(out, m, err, errlen);
    }
    int rc = mime_check(m, err, errlen);
    if (rc != MIME_OK)
        return rc;
    if (mime_reserve(out, mime_size_bound(m)) != MIME_OK) {
        util_seterr(err, errlen, "out of memory");
        return MIME_ENOMEM;
    }

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
        util_seterr(err, errlen, "message is %zu bytes, limit is %zu", buf_size(out) - mark,
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

int mime_wire_segments(const char *msg, size_t len, mime_seg_t **segs, size_t *nseg)
{
    /* first pass: check line endings, count the lines that need a dot */
    size_t dots = 0;
    for (size_t i = 0; i < len; i++) {
        if (msg[i] == '\r') {
            if (i + 1 >= len || msg[i + 1] != '\n')
                return MIME_EINVAL;
            i++;
            if (i + 1 < len && msg[i + 1] == '.')
                dots++;
        } else if (msg[i] == '\n') {
            return MIME_EINVAL;
        }
    }
    if (len > 0 && msg[0] == '.')
        dots++;
    mime_seg_t *v = malloc((2 * dots + 3) * sizeof(*v));
    if (v == NULL)
        return MIME_ENOMEM;
    size_t k = 0, start = 0;
    for (size_t ls = 0; ls < len;) {
        if (msg[ls] == '.') {
            /* the segment before, then one extra "." (RFC 5321 4.5.2); the
             * line's own dot starts the next segment */
            if (ls > start)
                v[k++] = (mime_seg_t){ msg + start, ls - start };
            v[k++] = (mime_seg_t){ ".", 1 };
            start = ls;
        }
        const char *nl = memchr(msg + ls, '\n', len - ls);
        if (nl == NULL)
            break;
        ls = (size_t)(nl - msg) + 1;
    }
    if (len > start)
        v[k++] = (mime_seg_t){ msg + start, len - start };
    if (len > 0 && (len < 2 || msg[len - 1] != '\n'))
        v[k++] = (mime_seg_t){ "\r\n", 2 };
    v[k++] = (mime_seg_t){ ".\r\n", 3 };
    *segs = v;
    *nseg = k;
    return MIME_OK;
}

int mime_header_find(const char *msg, size_t len, const char *name, char *out, size_t outlen)
{
    size_t nlen = strlen(name);
    size_t i = 0;
    while (i < len) {
        if (msg[i] == '\r' || msg[i] == '\n')
            break; /* the empty line: end of the header section */
        size_t eol = i;
        while (eol < len && msg[eol] != '\n')
            eol++;
        if (eol - i > nlen && strncasecmp(msg + i, name, nlen) == 0 && msg[i + nlen] == ':') {
            /* the value, with its continuation lines, unfolded */
            size_t o = 0;
            size_t p = i + nlen + 1;
            for (;;) {
                size_t end = p;
                while (end < len && msg[end] != '\n')
                    end++;
                size_t stop = end > p && msg[end - 1] == '\r' ? end - 1 : end;
                for (size_t k = p; k < stop; k++) {
                    if (o + 1 >= outlen)
                        return MIME_EINVAL;
                    out[o++] = msg[k];
                }
                if (end + 1 < len && (msg[end + 1] == ' ' || msg[end + 1] == '\t')) {
                    p = end + 1;
                    continue;
                }
                break;
            }
            size_t b = 0;
            while (b < o && (out[b] == ' ' || out[b] == '\t'))
                b++;
            while (o > b && (out[o - 1] == ' ' || out[o - 1] == '\t'))
                o--;
            if (o == b)
                return MIME_EINVAL;
            memmove(out, out + b, o - b);
            out[o - b] = '\0';
            return MIME_OK;
        }
        i = eol + 1;
    }
    return MIME_EINVAL;
}

/*
 * SUMMARY
 *  imap/parser.c - the one IMAP server-response parser.
 * DESCRIPTION
 *  Two passes over the buffered input, both without I/O or state kept
 *  between calls:
 *
 *  1. Framing finds where the first response ends. A response is a line,
 *     except that a line of untagged data ending in "{n}" is followed by n
 *     literal octets and then more of the same response (a LIST name sent
 *     as a literal, a FETCH body). Status responses (OK, NO, BAD, BYE,
 *     PREAUTH), tagged responses and continuations never carry literals:
 *     a text that happens to end in "{5}" is text, not a literal marker.
 *     Until the whole response is buffered the answer is "more"; the
 *     limits in parser.h bound how much a server can make us buffer.
 *
 *  2. Decoding walks the complete response with a cursor that cannot
 *     run past it, copying what the session needs into imap_resp_t.
 *
 *  Re-framing from the start on every call costs one memchr per line of
 *  the pending response; responses an APPEND session sees are small.
 *
 *  Leniency, where real servers differ from the grammar: bare LF line
 *  ends, runs of spaces, "A1 OK" without text, "+" without a space,
 *  8-bit octets in atoms (UTF-8 mailbox names), unknown capabilities,
 *  attributes and response codes (ignored).
 * DIAGNOSTICS
 *  IMAP_PARSE_ERROR with resp->error set to a static English reason.
 */
#include "imap/parser.h"

#include <stdio.h>
#include <string.h>

#include "core/util.h"

typedef struct cursor {
    const char *p;
    size_t      len;
    size_t      pos;
} cursor_t;

const char *imap_resp_kind_name(imap_resp_kind_t kind)
{
    static const char *names[IMAP_RESP_KIND_LAST] = { "tagged", "untagged", "continuation" };
    return kind < IMAP_RESP_KIND_LAST ? names[kind] : "?";
}

const char *imap_cond_name(imap_cond_t cond)
{
    static const char *names[IMAP_COND_LAST] = { "", "OK", "NO", "BAD", "PREAUTH", "BYE" };
    return cond < IMAP_COND_LAST ? names[cond] : "?";
}

static int ieq(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    return alen == blen && util_strncasecmp(a, b, alen) == 0;
}

unsigned imap_cap_from_name(const char *name, size_t len)
{
    static const struct {
        const char *name;
        unsigned    bits;
    } caps[] = {
        { "IMAP4rev1", IMAP_CAP_IMAP4REV1 },
        { "IMAP4rev2", IMAP_CAP_IMAP4REV2 | IMAP_CAP_UIDPLUS | IMAP_CAP_SPECIAL_USE |
                           IMAP_CAP_LIST_EXTENDED | IMAP_CAP_LITERAL_MINUS },
        { "STARTTLS", IMAP_CAP_STARTTLS },
        { "LOGINDISABLED", IMAP_CAP_LOGINDISABLED },
        { "AUTH=PLAIN", IMAP_CAP_AUTH_PLAIN },
        { "SASL-IR", IMAP_CAP_SASL_IR },
        { "LITERAL+", IMAP_CAP_LITERAL_PLUS },
        { "LITERAL-", IMAP_CAP_LITERAL_MINUS },
        { "UIDPLUS", IMAP_CAP_UIDPLUS },
        { "SPECIAL-USE", IMAP_CAP_SPECIAL_USE },
        { "LIST-EXTENDED", IMAP_CAP_LIST_EXTENDED },
        { "MULTIAPPEND", IMAP_CAP_MULTIAPPEND },
    };
    for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++)
        if (ieq(name, len, caps[i].name))
            return caps[i].bits;
    return 0;
}

static unsigned mbx_flag_from_name(const char *name, size_t len)
{
    static const struct {
        const char *name;
        unsigned    bit;
    } flags[] = {
        { "\\Noselect", IMAP_MBX_NOSELECT },     { "\\NonExistent", IMAP_MBX_NONEXISTENT },
        { "\\Noinferiors", IMAP_MBX_NOINFERIORS }, { "\\HasChildren", IMAP_MBX_HASCHILDREN },
        { "\\HasNoChildren", IMAP_MBX_HASNOCHILDREN }, { "\\Marked", IMAP_MBX_MARKED },
        { "\\Unmarked", IMAP_MBX_UNMARKED },     { "\\Subscribed", IMAP_MBX_SUBSCRIBED },
        { "\\Remote", IMAP_MBX_REMOTE },         { "\\All", IMAP_MBX_ALL },
        { "\\Archive", IMAP_MBX_ARCHIVE },       { "\\Drafts", IMAP_MBX_DRAFTS },
        { "\\Flagged", IMAP_MBX_FLAGGED },       { "\\Junk", IMAP_MBX_JUNK },
        { "\\Sent", IMAP_MBX_SENT },             { "\\Trash", IMAP_MBX_TRASH },
    };
    for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++)
        if (ieq(name, len, flags[i].name))
            return flags[i].bit;
    return 0;
}

/* ---------------------------------------------------------------- framing */

static int is_digit(int ch)
{
    return ch >= '0' && ch <= '9';
}

/* Does this first line start untagged data that may carry literals? */
static int line_may_have_literals(const char *line, size_t n)
{
    if (n < 3 || line[0] != '*' || line[1] != ' ')
        return 0;
    size_t i = 2;
    while (i < n && line[i] == ' ')
        i++;
    if (i < n && is_digit((unsigned char)line[i]))
        return 1; /* "* 3 FETCH (BODY[] {120}" */
    size_t s = i;
    while (i < n && line[i] != ' ' && line[i] != '\r' && line[i] != '\n')
        i++;
    static const char *status[] = { "OK", "NO", "BAD", "BYE", "PREAUTH" };
    for (size_t k = 0; k < sizeof(status) / sizeof(status[0]); k++)
        if (ieq(line + s, i - s, status[k]))
            return 0;
    return 1;
}

/* Does the line (LF excluded) end with a literal marker "{n}" (or the
 * "{n+}" / "~{n}" variants)? Sets *size. */
static int line_literal(const char *line, size_t n, size_t *size)
{
    if (n > 0 && line[n - 1] == '\r')
        n--;
    if (n < 3 || line[n - 1] != '}')
        return 0;
    size_t i = n - 1;
    if (i > 0 && line[i - 1] == '+')
        i--;
    size_t end = i;
    while (i > 0 && is_digit((unsigned char)line[i - 1]))
        i--;
    if (i == end || i == 0 || line[i - 1] != '{' || end - i > 10)
        return 0;
    size_t v = 0;
    for (size_t k = i; k < end; k++)
        v = v * 10 + (size_t)(line[k] - '0'); /* at most 10 digits: fits size_t on LP64 */
    *size = v;
    return 1;
}

static int frame(const char *p, size_t len, size_t *flen, const char **why)
{
    size_t pos = 0;
    int literals_ok = -1;
    for (;;) {
        const char *lf = memchr(p + pos, '\n', len - pos);
        if (lf == NULL) {
            if (len - pos > IMAP_MAX_LINE) {
                *why = "response line too long";
                return IMAP_PARSE_ERROR;
            }
            if (len > IMAP_MAX_RESP) {
                *why = "response too long";
                return IMAP_PARSE_ERROR;
            }
            return IMAP_PARSE_MORE;
        }
        size_t end = (size_t)(lf - p); /* index of the LF */
        if (end - pos > IMAP_MAX_LINE) {
            *why = "response line too long";
            return IMAP_PARSE_ERROR;
        }
        if (literals_ok < 0)
            literals_ok = line_may_have_literals(p, end);
        size_t n = 0;
        if (literals_ok && line_literal(p + pos, end - pos, &n)) {
            if (n > IMAP_MAX_LITERAL) {
                *why = "literal in response too long";
                return IMAP_PARSE_ERROR;
            }
            pos = end + 1;
            if (pos + n > IMAP_MAX_RESP) {
                *why = "response too long";
                return IMAP_PARSE_ERROR;
            }
            if (len - pos < n)
                return IMAP_PARSE_MORE;
            pos += n;
            continue;
        }
        *flen = end + 1;
        return IMAP_PARSE_DONE;
    }
}

/* ---------------------------------------------------------------- cursor */

static int cur_peek(const cursor_t *c)
{
    return c->pos < c->len ? (unsigned char)c->p[c->pos] : -1;
}

static int cur_eol(const cursor_t *c)
{
    int ch = cur_peek(c);
    return ch < 0 || ch == '\r' || ch == '\n';
}

/* One or more spaces. Returns 0 if there is none. */
static int cur_sp(cursor_t *c)
{
    if (cur_peek(c) != ' ')
        return 0;
    while (cur_peek(c) == ' ')
        c->pos++;
    return 1;
}

/* ATOM-CHAR: anything but atom-specials; 8-bit allowed (leniency). */
static int is_atom_char(int ch)
{
    if (ch < 0 || ch <= 0x20 || ch == 0x7f)
        return 0;
    return strchr("(){%*\"\\]", ch) == NULL;
}

/* ASTRING-CHAR: ATOM-CHAR or "]" (resp-specials). */
static int is_astring_char(int ch)
{
    return is_atom_char(ch) || ch == ']';
}

static int is_tag_char(int ch)
{
    return is_astring_char(ch) && ch != '+';
}

/* Read a run of accepted characters into out (NUL-terminated, truncated
 * to outsz - 1, upper-cased if asked). Returns the run's full length. */
static size_t cur_word(cursor_t *c, int (*accept)(int), char *out, size_t outsz, int upper)
{
    size_t n = 0;
    int ch;
    while ((ch = cur_peek(c)) >= 0 && accept(ch)) {
        if (n + 1 < outsz)
            out[n] = (char)(upper && ch >= 'a' && ch <= 'z' ? ch - 32 : ch);
        n++;
        c->pos++;
    }
    if (outsz > 0)
        out[n < outsz ? n : outsz - 1] = '\0';
    return n;
}

static void put(char *out, size_t outsz, size_t *n, int ch)
{
    if (*n + 1 < outsz)
        out[*n] = (char)ch;
    (*n)++;
}

static void terminate(char *out, size_t outsz, size_t n)
{
    out[n < outsz ? n : outsz - 1] = '\0';
}

/* quoted = DQUOTE *QUOTED-CHAR DQUOTE, at '"'. Returns 0 or -1. */
static int cur_quoted(cursor_t *c, char *out, size_t outsz, size_t *outlen)
{
    size_t n = 0;
    c->pos++; /* opening quote */
    for (;;) {
        int ch = cur_peek(c);
        if (ch < 0 || ch == '\r' || ch == '\n')
            return -1;
        c->pos++;
        if (ch == '"')
            break;
        if (ch == '\\') {
            ch = cur_peek(c);
            if (ch < 0 || ch == '\r' || ch == '\n')
                return -1;
            c->pos++;
        }
        put(out, outsz, &n, ch);
    }
    terminate(out, outsz, n);
    *outlen = n;
    return 0;
}

/* literal = "{" number ["+"] "}" CRLF *CHAR8, at '{' (or "~{"). */
static int cur_literal(cursor_t *c, char *out, size_t outsz, size_t *outlen)
{
    if (cur_peek(c) == '~')
        c->pos++;
    if (cur_peek(c) != '{')
        return -1;
    c->pos++;
    size_t v = 0, digits = 0;
    while (is_digit(cur_peek(c)) && digits < 10) {
        v = v * 10 + (size_t)(cur_peek(c) - '0');
        c->pos++;
        digits++;
    }
    if (digits == 0)
        return -1;
    if (cur_peek(c) == '+')
        c->pos++;
    if (cur_peek(c) != '}')
        return -1;
    c->pos++;
    if (cur_peek(c) == '\r')
        c->pos++;
    if (cur_peek(c) != '\n')
        return -1;
    c->pos++;
    if (c->len - c->pos < v)
        return -1;
    size_t n = 0;
    for (size_t i = 0; i < v; i++)
        put(out, outsz, &n, (unsigned char)c->p[c->pos + i]);
    c->pos += v;
    terminate(out, outsz, n);
    *outlen = n;
    return 0;
}

/* astring = 1*ASTRING-CHAR / string. Returns 0 or -1. */
static int cur_astring(cursor_t *c, char *out, size_t outsz, size_t *outlen)
{
    int ch = cur_peek(c);
    if (ch == '"')
        return cur_quoted(c, out, outsz, outlen);
    if (ch == '{' || ch == '~')
        return cur_literal(c, out, outsz, outlen);
    size_t n = cur_word(c, is_astring_char, out, outsz, 0);
    if (n == 0)
        return -1;
    *outlen = n;
    return 0;
}

/* The rest of the line as text, control characters made visible. */
static void cur_text(cursor_t *c, char *out, size_t outsz)
{
    size_t n = 0;
    while (!cur_eol(c)) {
        int ch = cur_peek(c);
        put(out, outsz, &n, ch < 0x20 || ch == 0x7f ? '?' : ch);
        c->pos++;
    }
    terminate(out, outsz, n);
}

/* ---------------------------------------------------------------- decoding */

static int fail(imap_resp_t *r, const char *why)
{
    r->error = why;
    return -1;
}

static unsigned parse_caps(const char *s, size_t n)
{
    unsigned caps = 0;
    size_t i = 0;
    while (i < n) {
        while (i < n && s[i] == ' ')
            i++;
        size_t b = i;
        while (i < n && s[i] != ' ')
            i++;
        if (i > b)
            caps |= imap_cap_from_name(s + b, i - b);
    }
    return caps;
}

/* nz-number that fits in 32 bits. Returns the characters used, 0 if none. */
static size_t parse_nz32(const char *s, size_t n, uint32_t *out)
{
    uint64_t v = 0;
    size_t i = 0;
    while (i < n && is_digit((unsigned char)s[i])) {
        v = v * 10 + (uint64_t)(s[i] - '0');
        if (v > UINT32_MAX)
            return 0;
        i++;
    }
    if (i == 0 || v == 0)
        return 0;
    *out = (uint32_t)v;
    return i;
}

/* "APPENDUID" SP nz-number SP uid-set (RFC 4315): one uid for one
 * message; after a MULTIAPPEND the uids of the messages in the order they
 * were sent, as numbers and ranges ("5:7", "5,9,11:12"; a range counts up
 * from its lower end). More than IMAP_MAX_UIDS uids: not understood. */
static void parse_appenduid(imap_resp_t *r, const char *s, size_t n)
{
    uint32_t v = 0, nuids = 0;
    size_t i = parse_nz32(s, n, &v);
    if (i == 0 || i >= n || s[i] != ' ')
        return;
    while (i < n && s[i] == ' ')
        i++;
    for (;;) {
        uint32_t lo = 0, hi = 0;
        size_t k = parse_nz32(s + i, n - i, &lo);
        if (k == 0)
            return;
        i += k;
        hi = lo;
        if (i < n && s[i] == ':') {
            k = parse_nz32(s + i + 1, n - i - 1, &hi);
            if (k == 0)
                return;
            i += 1 + k;
            if (hi < lo) {
                uint32_t t = lo;
                lo = hi;
                hi = t;
            }
        }
        if ((uint64_t)hi - lo + 1 > IMAP_MAX_UIDS - nuids)
            return;
        for (uint64_t u = lo; u <= hi; u++)
            r->uids[nuids++] = (uint32_t)u;
        if (i < n && s[i] == ',') {
            i++;
            continue;
        }
        break;
    }
    while (i < n && s[i] == ' ')
        i++;
    if (i != n)
        return;
    r->has_appenduid = 1;
    r->uidvalidity = v;
    r->uid = r->uids[0];
    r->nuids = nuids;
}

static int is_code_char(int ch)
{
    return is_atom_char(ch);
}

/* resp-text = ["[" resp-text-code "]" SP] text, after the status word. */
static int parse_resp_text(cursor_t *c, imap_resp_t *r)
{
    if (cur_eol(c))
        return 0; /* "A1 OK" without text: lenient */
    if (!cur_sp(c))
        return fail(r, "expected SP after the status");
    if (cur_peek(c) == '[') {
        c->pos++;
        if (cur_word(c, is_code_char, r->code, sizeof(r->code), 1) == 0)
            return fail(r, "empty response code");
        size_t args = c->pos, args_end = c->pos;
        if (cur_peek(c) == ' ') {
            c->pos++;
            args = c->pos;
            while (!cur_eol(c) && cur_peek(c) != ']')
                c->pos++;
            args_end = c->pos;
        }
        if (cur_peek(c) != ']')
            return fail(r, "unterminated response code");
        c->pos++;
        if (strcmp(r->code, "CAPABILITY") == 0) {
            r->has_caps = 1;
            r->caps = parse_caps(c->p + args, args_end - args);
        } else if (strcmp(r->code, "APPENDUID") == 0) {
            parse_appenduid(r, c->p + args, args_end - args);
        } else if (strcmp(r->code, "UIDVALIDITY") == 0) {
            uint32_t v = 0;
            if (args_end > args && parse_nz32(c->p + args, args_end - args, &v) == args_end - args) {
                r->has_uidvalidity = 1;
                r->uidvalidity = v;
            }
        }
        cur_sp(c);
    }
    cur_text(c, r->text, sizeof(r->text));
    return 0;
}

static imap_cond_t cond_from_word(const char *w, int untagged)
{
    if (strcmp(w, "OK") == 0)
        return IMAP_COND_OK;
    if (strcmp(w, "NO") == 0)
        return IMAP_COND_NO;
    if (strcmp(w, "BAD") == 0)
        return IMAP_COND_BAD;
    if (untagged && strcmp(w, "PREAUTH") == 0)
        return IMAP_COND_PREAUTH;
    if (untagged && strcmp(w, "BYE") == 0)
        return IMAP_COND_BYE;
    return IMAP_COND_NONE;
}

static int is_flag_char(int ch)
{
    return is_atom_char(ch) || ch == '\\' || ch == '*';
}

/* mailbox-list = "(" [mbx-list-flags] ")" SP (DQUOTE QUOTED-CHAR DQUOTE / nil) SP mailbox
 *                [SP mbox-list-extended] */
static int parse_list(cursor_t *c, imap_resp_t *r)
{
    if (!cur_sp(c) || cur_peek(c) != '(')
        return fail(r, "LIST: expected attribute list");
    c->pos++;
    for (;;) {
        cur_sp(c);
        int ch = cur_peek(c);
        if (ch == ')') {
            c->pos++;
            break;
        }
        char flag[64];
        size_t n = cur_word(c, is_flag_char, flag, sizeof(flag), 0);
        if (n == 0)
            return fail(r, "LIST: bad attribute list");
        if (n < sizeof(flag))
            r->mbx_flags |= mbx_flag_from_name(flag, n);
    }
    if (!cur_sp(c))
        return fail(r, "LIST: expected SP after attributes");
    if (cur_peek(c) == '"') {
        char d[4];
        size_t dn = 0;
        if (cur_quoted(c, d, sizeof(d), &dn) < 0 || dn != 1)
            return fail(r, "LIST: bad hierarchy delimiter");
        r->mbx_delim = d[0];
    } else {
        char nil[8];
        size_t n = cur_word(c, is_atom_char, nil, sizeof(nil), 1);
        if (n != 3 || strcmp(nil, "NIL") != 0)
            return fail(r, "LIST: bad hierarchy delimiter");
        r->mbx_delim = '\0';
    }
    if (!cur_sp(c))
        return fail(r, "LIST: expected SP after delimiter");
    size_t nlen = 0;
    if (cur_astring(c, r->mbx_name, sizeof(r->mbx_name), &nlen) < 0)
        return fail(r, "LIST: bad mailbox name");
    r->mbx_name_len = nlen < sizeof(r->mbx_name) ? nlen : sizeof(r->mbx_name) - 1;
    r->mbx_name_truncated = nlen >= sizeof(r->mbx_name);
    if (memchr(r->mbx_name, '\0', r->mbx_name_len) != NULL)
        return fail(r, "LIST: NUL in mailbox name");
    /* mbox-list-extended (CHILDINFO, OLDNAME ...) is not needed */
    return 0;
}

/* "* SEARCH" *(SP nz-number): how many, and the highest. */
static int parse_search(cursor_t *c, imap_resp_t *r)
{
    while (!cur_eol(c)) {
        if (!cur_sp(c))
            return fail(r, "expected SP in SEARCH data");
        if (cur_eol(c))
            break; /* a trailing space: lenient */
        uint32_t v = 0;
        size_t k = parse_nz32(c->p + c->pos, c->len - c->pos, &v);
        if (k == 0)
            return fail(r, "SEARCH data is not a list of numbers");
        c->pos += k;
        r->search_count++;
        if (v > r->search_max)
            r->search_max = v;
    }
    return 0;
}

static int parse_untagged(cursor_t *c, imap_resp_t *r)
{
    r->kind = IMAP_RESP_UNTAGGED;
    c->pos++; /* '*' */
    if (!cur_sp(c))
        return fail(r, "expected SP after '*'");
    if (is_digit(cur_peek(c))) {
        uint64_t acc = 0;
        while (is_digit(cur_peek(c))) {
            acc = acc * 10 + (uint64_t)(cur_peek(c) - '0');
            if (acc > UINT32_MAX)
                return fail(r, "number out of range");
            c->pos++;
        }
        r->number = (uint32_t)acc;
        r->has_number = 1;
        if (!cur_sp(c))
            return fail(r, "expected SP after number");
    }
    if (cur_word(c, is_atom_char, r->keyword, sizeof(r->keyword), 1) == 0)
        return fail(r, "missing untagged keyword");
    if (r->has_number)
        return 0; /* EXISTS, RECENT, EXPUNGE, FETCH: not needed */
    r->cond = cond_from_word(r->keyword, 1);
    if (r->cond != IMAP_COND_NONE)
        return parse_resp_text(c, r);
    if (strcmp(r->keyword, "CAPABILITY") == 0) {
        size_t b = c->pos;
        while (!cur_eol(c))
            c->pos++;
        r->has_caps = 1;
        r->caps = parse_caps(c->p + b, c->pos - b);
        return 0;
    }
    if (strcmp(r->keyword, "LIST") == 0 || strcmp(r->keyword, "LSUB") == 0 ||
        strcmp(r->keyword, "XLIST") == 0)
        return parse_list(c, r);
    if (strcmp(r->keyword, "SEARCH") == 0)
        return parse_search(c, r);
    return 0;
}

static int parse_tagged(cursor_t *c, imap_resp_t *r)
{
    r->kind = IMAP_RESP_TAGGED;
    size_t n = cur_word(c, is_tag_char, r->tag, sizeof(r->tag), 0);
    if (n == 0)
        return fail(r, "not an IMAP response");
    if (n >= sizeof(r->tag))
        return fail(r, "tag too long");
    if (!cur_sp(c))
        return fail(r, "expected SP after tag");
    char word[16];
    if (cur_word(c, is_atom_char, word, sizeof(word), 1) == 0)
        return fail(r, "missing status after tag");
    r->cond = cond_from_word(word, 0);
    if (r->cond == IMAP_COND_NONE)
        return fail(r, "tagged status is not OK, NO or BAD");
    snprintf(r->keyword, sizeof(r->keyword), "%s", word);
    return parse_resp_text(c, r);
}

static int parse_continuation(cursor_t *c, imap_resp_t *r)
{
    r->kind = IMAP_RESP_CONTINUATION;
    c->pos++; /* '+' */
    if (cur_peek(c) == ' ')
        c->pos++;
    cur_text(c, r->text, sizeof(r->text));
    return 0;
}

int imap_resp_parse(const char *p, size_t len, imap_resp_t *r, size_t *used)
{
    *used = 0;
    memset(r, 0, sizeof(*r));
    size_t flen = 0;
    const char *why = NULL;
    int rc = frame(p, len, &flen, &why);
    if (rc != IMAP_PARSE_DONE) {
        r->error = why;
        return rc;
    }
    cursor_t c = { p, flen, 0 };
    int ch = cur_peek(&c);
    int ok;
    if (ch == '*')
        ok = parse_untagged(&c, r);
    else if (ch == '+')
        ok = parse_continuation(&c, r);
    else if (cur_eol(&c))
        ok = fail(r, "empty line");
    else
        ok = parse_tagged(&c, r);
    if (ok < 0)
        return IMAP_PARSE_ERROR;
    *used = flen;
    return IMAP_PARSE_DONE;
}

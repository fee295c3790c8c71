/*
 * SUMMARY
 *  queue/msgjson.c - JSON message body to message_t.
 * DESCRIPTION
 *  The body of a mail.outbound message is untrusted application input.
 *  Everything that later becomes part of an SMTP envelope or a header is
 *  validated here, so a malformed message is dead-lettered with a precise
 *  reason before any connection is opened: addresses are checked
 *  syntactically, and CR/LF is refused in every string that becomes a
 *  header (header injection, SMTP smuggling). Message bodies (text, html)
 *  are kept as given; mime/ normalises their line endings.
 *
 *  Duplicate object keys are refused: two "to" members would otherwise be
 *  read differently by different JSON parsers along the pipeline. So are
 *  \u0000 in any string and ill-formed UTF-8 (queue/jdoc.h).
 *
 *  The body is parsed by simdjson into a jdoc_t (queue/jdoc.h): about 20
 *  times faster than jansson on message bodies (docs/benchmarks.md, "CPU
 *  per message"). jansson still gives the reason for a refused body.
 * DIAGNOSTICS
 *  MSGJSON_EJSON for input that is not JSON (jansson's position and text),
 *  MSGJSON_EINVAL for JSON that is not a valid message. Reasons quote the
 *  offending value with control characters escaped, since they end up in
 *  logs and dead-letter records.
 */
#include "queue/msgjson.h"

#include <ctype.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#include "core/base64.h"
#include "core/util.h"
#include "queue/jdoc.h"

#define MSGJSON_ADDR_MAX 254  /* RFC 5321 4.5.3.1.3 path minus the brackets */
#define MSGJSON_LOCAL_MAX 64  /* RFC 5321 4.5.3.1.1 */
#define MSGJSON_LABEL_MAX 63  /* RFC 1035 2.3.4 */
#define MSGJSON_ID_MAX 200
#define MSGJSON_HNAME_MAX 76  /* same bound as mime/: name plus one encoded word fits a line */
#define MSGJSON_FNAME_MAX 255 /* octets of an attachment file name (common file systems) */
#define MSGJSON_CTYPE_MAX 200
#define MSGJSON_CID_MAX 250

const char *msgjson_strerror(int status)
{
    switch (status) {
    case MSGJSON_OK:
        return "success";
    case MSGJSON_ENOMEM:
        return "out of memory";
    case MSGJSON_EJSON:
        return "invalid JSON";
    case MSGJSON_EINVAL:
        return "invalid message";
    default:
        return "unknown msgjson status";
    }
}



/* ---- address syntax ------------------------------------------------------ */

/* Well-formed UTF-8 (no overlongs, surrogates or values past U+10FFFF).
 * jdoc_check() checks parsed strings already; the CLI calls the validator
 * directly. */
static int msgjson_utf8_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0, k; i < n; i += k)
        if ((k = util_utf8_len(s + i, n - i)) == 0)
            return 0;
    return 1;
}

static int msgjson_atext(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL || c >= 0x80;
}

/* RFC 5321 Local-part: Dot-string or Quoted-string (RFC 6531 adds UTF-8). */
static int msgjson_valid_local(const unsigned char *s, size_t n)
{
    if (n == 0 || n > MSGJSON_LOCAL_MAX)
        return 0;
    if (s[0] == '"') {
        if (n < 3 || s[n - 1] != '"')
            return 0;
        for (size_t i = 1; i < n - 1; i++) {
            if (s[i] == '\\') {
                if (++i >= n - 1 || s[i] < 0x20 || s[i] > 0x7e)
                    return 0;
            } else if (s[i] == '"') {
                return 0;
            } else if (s[i] < 0x20 || s[i] == 0x7f) {
                return 0;
            }
        }
        return 1;
    }
    if (s[0] == '.' || s[n - 1] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '.') {
            if (s[i + 1] == '.')
                return 0;
        } else if (!msgjson_atext(s[i])) {
            return 0;
        }
    }
    return 1;
}

/* Dot-separated labels of letters, digits and inner hyphens; a label with
 * UTF-8 is an IDN in U-label form and is kept as is (no IDNA mapping). */
static int msgjson_valid_domain(const unsigned char *s, size_t n)
{
    if (n == 0)
        return 0;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && s[i] != '.') {
            unsigned char c = s[i];
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-' || c >= 0x80))
                return 0;
            continue;
        }
        size_t len = i - start;
        if (len == 0 || len > MSGJSON_LABEL_MAX || s[start] == '-' || s[i - 1] == '-')
            return 0;
        start = i + 1;
    }
    return 1;
}

int msgjson_valid_address(const char *addr)
{
    if (addr == NULL)
        return 0;
    const unsigned char *s = (const unsigned char *)addr;
    size_t n = strlen(addr);
    if (n < 3 || n > MSGJSON_ADDR_MAX || !msgjson_utf8_ok(s, n))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 0x20 || s[i] == 0x7f || s[i] == '<' || s[i] == '>')
            return 0;
    /* The last "@" splits: a quoted local part may itself contain one. */
    const char *at = strrchr(addr, '@');
    if (at == NULL)
        return 0;
    size_t ll = (size_t)(at - addr);
    return msgjson_valid_local(s, ll) && msgjson_valid_domain(s + ll + 1, n - ll - 1);
}

/* ---- field helpers ---------------------------------------------------------- */

typedef struct msgjson_ctx {
    char         *err;
    size_t        errlen;
    const jdoc_t *d;
} msgjson_ctx_t;

#define IS_STR(v) ((v)->type == JD_STRING)
#define IS_NULL(v) ((v)->type == JD_NULL)
#define IS_OBJ(v) ((v)->type == JD_OBJECT)
#define IS_ARR(v) ((v)->type == JD_ARRAY)
#define ABSENT(v) ((v) == NULL || IS_NULL(v))

static int msgjson_has_crlf(const char *s)
{
    return strpbrk(s, "\r\n") != NULL;
}

/* Display names become header text: no control characters besides tab. */
static int msgjson_valid_name(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if ((*p < 0x20 && *p != '\t') || *p == 0x7f)
            return 0;
    return 1;
}

static int msgjson_is_blank(char c)
{
    return c == ' ' || c == '\t';
}

/* Display name from "Name <addr>": trimmed, and unquoted when given as an
 * RFC 5322 quoted-string. NULL when nothing is left. */
static char *msgjson_take_name(const char *s, size_t n)
{
    while (n > 0 && msgjson_is_blank(s[0]))
        s++, n--;
    while (n > 0 && msgjson_is_blank(s[n - 1]))
        n--;
    if (n >= 2 && s[0] == '"' && s[n - 1] == '"') {
        char *name = xmalloc(n);
        size_t o = 0;
        for (size_t i = 1; i < n - 1; i++) {
            if (s[i] == '\\' && i + 1 < n - 1)
                i++;
            name[o++] = s[i];
        }
        name[o] = '\0';
        if (o == 0) {
            free(name);
            return NULL;
        }
        return name;
    }
    return n ? xstrndup(s, n) : NULL;
}

/* Fill a from a JSON address in one of the accepted forms. where names the
 * field for the error, e.g. "\"to\"[1]". */
static int msgjson_address(msgjson_ctx_t *c, const jd_node_t *v, const char *where, mp_address_t *a)
{
    char tmp[96];
    const char *addr;
    size_t alen;
    if (IS_STR(v)) {
        const char *s = v->u.s;
        size_t n = strlen(s);
        while (n > 0 && msgjson_is_blank(s[n - 1]))
            n--;
        const char *lt = n > 0 && s[n - 1] == '>' ? memrchr(s, '<', n) : NULL;
        /* "Name <addr>"; a bare "<addr>" (no name) stays one string and is
         * refused below like any other address with angle brackets */
        a->name = lt ? msgjson_take_name(s, (size_t)(lt - s)) : NULL;
        if (a->name) {
            addr = lt + 1;
            alen = (size_t)(s + n - 1 - addr);
        } else {
            addr = s;
            alen = strlen(s);
        }
    } else if (IS_OBJ(v)) {
        const jd_node_t *jaddr = jdoc_get(c->d, v, "address");
        const jd_node_t *jname = jdoc_get(c->d, v, "name");
        if (jaddr == NULL) {
            util_seterr(c->err, c->errlen, "missing field \"address\" in %s", where);
            return MSGJSON_EINVAL;
        }
        if (!IS_STR(jaddr)) {
            util_seterr(c->err, c->errlen, "%s.address must be a string", where);
            return MSGJSON_EINVAL;
        }
        if (jname != NULL && !IS_NULL(jname) && !IS_STR(jname)) {
            util_seterr(c->err, c->errlen, "%s.name must be a string", where);
            return MSGJSON_EINVAL;
        }
        if (jname != NULL && IS_STR(jname) && (size_t)jname->n > 0)
            a->name = xstrdup(jname->u.s);
        addr = jaddr->u.s;
        alen = strlen(addr);
    } else {
        util_seterr(c->err, c->errlen, "%s must be a string or an object", where);
        return MSGJSON_EINVAL;
    }
    a->addr = xstrndup(addr, alen);
    if (!msgjson_valid_address(a->addr)) {
        util_seterr(c->err, c->errlen, "invalid address in %s: \"%s\"", where,
                       util_quote_text(a->addr, tmp, sizeof(tmp)));
        return MSGJSON_EINVAL;
    }
    if (a->name && !msgjson_valid_name(a->name)) {
        util_seterr(c->err, c->errlen, "invalid display name in %s: \"%s\"", where,
                       util_quote_text(a->name, tmp, sizeof(tmp)));
        return MSGJSON_EINVAL;
    }
    return MSGJSON_OK;
}

/* A recipient list: an array of addresses, or one address as a string. */
static int msgjson_address_list(msgjson_ctx_t *c, const jd_node_t *root, const char *key, int required,
                                mp_address_t **list, size_t *count)
{
    char where[48];
    const jd_node_t *v = jdoc_get(c->d, root, key);
    if (v == NULL || IS_NULL(v)) {
        if (!required)
            return MSGJSON_OK;
        util_seterr(c->err, c->errlen, "missing field \"%s\"", key);
        return MSGJSON_EINVAL;
    }
    if (IS_STR(v)) {
        *list = xcalloc(1, sizeof(**list));
        *count = 1;
        snprintf(where, sizeof(where), "\"%s\"", key);
        return msgjson_address(c, v, where, &(*list)[0]);
    }
    if (!IS_ARR(v)) {
        util_seterr(c->err, c->errlen, "\"%s\" must be an array or a string", key);
        return MSGJSON_EINVAL;
    }
    size_t n = (size_t)v->n;
    if (n == 0) {
        if (!required)
            return MSGJSON_OK;
        util_seterr(c->err, c->errlen, "\"%s\" must not be empty", key);
        return MSGJSON_EINVAL;
    }
    /* count is set first so message_free() releases a partly filled list */
    *list = xcalloc(n, sizeof(**list));
    *count = n;
    for (size_t i = 0; i < n; i++) {
        snprintf(where, sizeof(where), "\"%s\"[%zu]", key, i);
        int rc = msgjson_address(c, jdoc_at(c->d, v, i), where, &(*list)[i]);
        if (rc != MSGJSON_OK)
            return rc;
    }
    return MSGJSON_OK;
}

/* Optional string member; header_text refuses CR/LF because the value
 * becomes a header. */
static int msgjson_string(msgjson_ctx_t *c, const jd_node_t *root, const char *key, int header_text,
                          char **dst)
{
    const jd_node_t *v = jdoc_get(c->d, root, key);
    if (v == NULL || IS_NULL(v))
        return MSGJSON_OK;
    if (!IS_STR(v)) {
        util_seterr(c->err, c->errlen, "\"%s\" must be a string", key);
        return MSGJSON_EINVAL;
    }
    if (header_text && msgjson_has_crlf(v->u.s)) {
        util_seterr(c->err, c->errlen, "\"%s\" must not contain CR or LF", key);
        return MSGJSON_EINVAL;
    }
    *dst = xstrdup(v->u.s);
    return MSGJSON_OK;
}

/* RFC 5322 dot-atom-text: the id is the left part of the Message-ID. */
int msgjson_valid_id(const char *id)
{
    size_t n = strlen(id);
    if (n < 1 || n > MSGJSON_ID_MAX || id[0] == '.' || id[n - 1] == '.' || strstr(id, ".."))
        return 0;
    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        if (!isalnum(*p) && *p != '.' && strchr("!#$%&'*+-/=?^_`{|}~", *p) == NULL)
            return 0;
    return 1;
}

/* The id ends up as the left part of the Message-ID and in Redis keys. */
static int msgjson_id(msgjson_ctx_t *c, const jd_node_t *root, message_t *m)
{
    char tmp[96];
    int rc = msgjson_string(c, root, "id", 0, &m->id);
    if (rc != MSGJSON_OK)
        return rc;
    if (m->id == NULL) {
        char uuid[37];
        util_uuid(uuid);
        m->id = xstrdup(uuid);
        m->id_generated = 1;
    } else if (!msgjson_valid_id(m->id)) {
        util_seterr(c->err, c->errlen,
                       "invalid \"id\": \"%s\" (1..%d characters: letters, digits, "
                       "\".\" and !#$%%&'*+-/=?^_`{|}~)",
                       util_quote_text(m->id, tmp, sizeof(tmp)), MSGJSON_ID_MAX);
        return MSGJSON_EINVAL;
    }
    return MSGJSON_OK;
}

/* tenant, campaign, pool: who sends the message. Short ASCII names,
 * since they become log fields, metric labels and pool choices; a value
 * outside that alphabet is refused rather than cleaned up. */
static int msgjson_ident(msgjson_ctx_t *c, const jd_node_t *root, const char *key, message_ident_t kind,
                         char **dst)
{
    char tmp[96];
    int rc = msgjson_string(c, root, key, 0, dst);
    if (rc != MSGJSON_OK || *dst == NULL || message_valid_ident(kind, *dst))
        return rc;
    if (kind == MESSAGE_CAMPAIGN)
        util_seterr(c->err, c->errlen,
                    "invalid \"%s\": must be 1-%d characters of letters, digits, '.', '_', '-', ':', '/', "
                    "'@', '+', '=' (got \"%s\")",
                    key, MESSAGE_CAMPAIGN_MAX, util_quote_text(*dst, tmp, sizeof(tmp)));
    else
        util_seterr(c->err, c->errlen,
                    "invalid \"%s\": must be 1-%d characters of letters, digits, '.', '_', '-' (got \"%s\")",
                    key, kind == MESSAGE_POOL ? MESSAGE_POOL_MAX : MESSAGE_TENANT_MAX,
                    util_quote_text(*dst, tmp, sizeof(tmp)));
    return MSGJSON_EINVAL;
}

/* RFC 5322 field-name (ftext), bounded like mime/ does. */
static int msgjson_valid_hname(const char *name)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++, n++)
        if (*p < 33 || *p > 126 || *p == ':')
            return 0;
    return n >= 1 && n <= MSGJSON_HNAME_MAX;
}

/* Whether a header may override a structural one is mime/'s decision (it
 * owns that list); here only syntax is checked. */
static int msgjson_headers(msgjson_ctx_t *c, const jd_node_t *root, message_t *m)
{
    char tmp[96];
    const jd_node_t *v = jdoc_get(c->d, root, "headers");
    if (v == NULL || IS_NULL(v))
        return MSGJSON_OK;
    if (!IS_OBJ(v)) {
        util_seterr(c->err, c->errlen, "\"headers\" must be an object");
        return MSGJSON_EINVAL;
    }
    size_t n = (size_t)v->n;
    if (n == 0)
        return MSGJSON_OK;
    m->headers = xcalloc(n, sizeof(*m->headers));
    for (size_t i = 0; i < n; i++) {
        const jd_node_t *k = jdoc_member(c->d, v, i), *val = k + 1;
        const char *key = k->u.s;
        if (!msgjson_valid_hname(key)) {
            util_seterr(c->err, c->errlen, "invalid header name \"%s\"",
                           util_quote_text(key, tmp, sizeof(tmp)));
            return MSGJSON_EINVAL;
        }
        if (!IS_STR(val)) {
            util_seterr(c->err, c->errlen, "header \"%s\" must have a string value", key);
            return MSGJSON_EINVAL;
        }
        if (msgjson_has_crlf(val->u.s)) {
            util_seterr(c->err, c->errlen, "value of header \"%s\" contains CR or LF", key);
            return MSGJSON_EINVAL;
        }
        mp_header_t *h = &m->headers[m->nheaders++];
        h->name = xstrdup(key);
        h->value = xstrdup(val->u.s);
    }
    return MSGJSON_OK;
}

/* ---- attachments and raw messages ------------------------------------------ */

/*
 * Strict RFC 4648 base64 (core/base64.h: padding required, blanks and line
 * breaks between characters tolerated, as applications often wrap their
 * base64). On success *out is a malloc'ed buffer of *outlen bytes plus a
 * NUL. Returns MSGJSON_OK, MSGJSON_ENOMEM, or MSGJSON_EINVAL with *bad =
 * offset of the first offending character.
 */
static int msgjson_b64_decode(const char *s, size_t n, unsigned char **out, size_t *outlen,
                              size_t *bad)
{
    unsigned char *o = malloc(base64_decoded_max(n) + 1);
    if (o == NULL)
        return MSGJSON_ENOMEM;
    size_t k = 0;
    if (base64_decode(o, &k, s, n, bad) != 0) {
        free(o);
        return MSGJSON_EINVAL;
    }
    o[k] = '\0';
    *out = o;
    *outlen = k;
    return MSGJSON_OK;
}

/* RFC 2045 token: printable ASCII except blanks and tspecials. */
static int msgjson_tchar(unsigned char c)
{
    return c > 32 && c < 127 && strchr("()<>@,;:\\\"/[]?=", c) == NULL;
}

static size_t msgjson_token(const char *s)
{
    size_t n = 0;
    while (s[n] && msgjson_tchar((unsigned char)s[n]))
        n++;
    return n;
}

/* type "/" subtype *(";" attribute "=" (token / quoted-string)), blanks
 * allowed around ";" and "=" (RFC 2045 5.1). multipart/... is refused: an
 * attachment cannot bring its own boundaries. */
static int msgjson_valid_ctype(const char *s)
{
    size_t n = strlen(s), t;
    if (n == 0 || n > MSGJSON_CTYPE_MAX)
        return 0;
    if ((t = msgjson_token(s)) == 0 || s[t] != '/')
        return 0;
    if (strncasecmp(s, "multipart/", 10) == 0)
        return 0;
    s += t + 1;
    if ((t = msgjson_token(s)) == 0)
        return 0;
    s += t;
    for (;;) {
        while (msgjson_is_blank(*s))
            s++;
        if (*s == '\0')
            return 1;
        if (*s++ != ';')
            return 0;
        while (msgjson_is_blank(*s))
            s++;
        if ((t = msgjson_token(s)) == 0)
            return 0;
        s += t;
        while (msgjson_is_blank(*s))
            s++;
        if (*s++ != '=')
            return 0;
        while (msgjson_is_blank(*s))
            s++;
        if (*s == '"') {
            for (s++; *s != '"'; s++) {
                if (*s == '\\')
                    s++;
                if ((unsigned char)*s < 32 || (unsigned char)*s > 126)
                    return 0; /* includes the NUL of an unterminated string */
            }
            s++;
        } else if ((t = msgjson_token(s)) == 0) {
            return 0;
        } else {
            s += t;
        }
    }
}

/* Content-ID: id-left "@" id-right as printable ASCII without blanks,
 * brackets or quotes; given with or without the angle brackets. */
static char *msgjson_take_cid(const char *s)
{
    size_t n = strlen(s);
    if (n >= 2 && s[0] == '<' && s[n - 1] == '>')
        s++, n -= 2;
    if (n == 0 || n > MSGJSON_CID_MAX)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= 32 || c >= 127 || c == '<' || c == '>' || c == '"' || c == '\\' || c == '(' ||
            c == ')' || c == ',' || c == ';' || c == ':')
            return NULL;
    }
    return xstrndup(s, n);
}

static int msgjson_attachment(msgjson_ctx_t *c, const jd_node_t *v, size_t idx, mp_attachment_t *a)
{
    char tmp[96];
    if (!IS_OBJ(v)) {
        util_seterr(c->err, c->errlen, "\"attachments\"[%zu] must be an object", idx);
        return MSGJSON_EINVAL;
    }
    const jd_node_t *jf = jdoc_get(c->d, v, "filename");
    const jd_node_t *jt = jdoc_get(c->d, v, "content_type");
    const jd_node_t *jc = jdoc_get(c->d, v, "content_base64");
    const jd_node_t *ji = jdoc_get(c->d, v, "content_id");
    const jd_node_t *jin = jdoc_get(c->d, v, "inline");
    if (jf == NULL || IS_NULL(jf)) {
        util_seterr(c->err, c->errlen, "missing field \"filename\" in \"attachments\"[%zu]",
                       idx);
        return MSGJSON_EINVAL;
    }
    if (!IS_STR(jf)) {
        util_seterr(c->err, c->errlen, "\"attachments\"[%zu].filename must be a string", idx);
        return MSGJSON_EINVAL;
    }
    const char *fn = jf->u.s;
    size_t fl = strlen(fn);
    if (fl == 0 || fl > MSGJSON_FNAME_MAX) {
        util_seterr(c->err, c->errlen,
                       "\"attachments\"[%zu].filename must be 1..%d octets, not %zu", idx,
                       MSGJSON_FNAME_MAX, fl);
        return MSGJSON_EINVAL;
    }
    for (const unsigned char *p = (const unsigned char *)fn; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            util_seterr(c->err, c->errlen,
                           "\"attachments\"[%zu].filename contains a control character "
                           "(CR, LF, ...): \"%s\"",
                           idx, util_quote_text(fn, tmp, sizeof(tmp)));
            return MSGJSON_EINVAL;
        }
    }
    a->filename = xstrdup(fn);
    if (jt == NULL || IS_NULL(jt)) {
        a->content_type = xstrdup("application/octet-stream");
    } else if (!IS_STR(jt)) {
        util_seterr(c->err, c->errlen, "\"attachments\"[%zu].content_type must be a string",
                       idx);
        return MSGJSON_EINVAL;
    } else if (!msgjson_valid_ctype(jt->u.s)) {
        util_seterr(c->err, c->errlen,
                       "invalid \"attachments\"[%zu].content_type: \"%s\" (type/subtype "
                       "[; name=value], not multipart, no CR or LF)",
                       idx, util_quote_text(jt->u.s, tmp, sizeof(tmp)));
        return MSGJSON_EINVAL;
    } else {
        a->content_type = xstrdup(jt->u.s);
    }
    if (ji != NULL && !IS_NULL(ji)) {
        if (!IS_STR(ji)) {
            util_seterr(c->err, c->errlen, "\"attachments\"[%zu].content_id must be a string",
                           idx);
            return MSGJSON_EINVAL;
        }
        if ((a->content_id = msgjson_take_cid(ji->u.s)) == NULL) {
            util_seterr(c->err, c->errlen,
                           "invalid \"attachments\"[%zu].content_id: \"%s\" (printable ASCII "
                           "without blanks, e.g. \"logo@example.com\")",
                           idx, util_quote_text(ji->u.s, tmp, sizeof(tmp)));
            return MSGJSON_EINVAL;
        }
    }
    if (jin != NULL && !IS_NULL(jin)) {
        if (jin->type != JD_TRUE && jin->type != JD_FALSE) {
            util_seterr(c->err, c->errlen, "\"attachments\"[%zu].inline must be a boolean",
                           idx);
            return MSGJSON_EINVAL;
        }
        a->is_inline = jin->type == JD_TRUE;
    }
    if (jc == NULL || IS_NULL(jc)) {
        util_seterr(c->err, c->errlen,
                       "missing field \"content_base64\" in \"attachments\"[%zu]", idx);
        return MSGJSON_EINVAL;
    }
    if (!IS_STR(jc)) {
        util_seterr(c->err, c->errlen,
                       "\"attachments\"[%zu].content_base64 must be a string", idx);
        return MSGJSON_EINVAL;
    }
    size_t bad = 0;
    int rc = msgjson_b64_decode(jc->u.s, (size_t)jc->n, &a->data, &a->len,
                                &bad);
    if (rc == MSGJSON_ENOMEM) {
        util_seterr(c->err, c->errlen, "out of memory decoding \"attachments\"[%zu]", idx);
        return rc;
    }
    if (rc != MSGJSON_OK) {
        util_seterr(c->err, c->errlen,
                       "\"attachments\"[%zu].content_base64 is not valid base64 (at offset %zu)",
                       idx, bad);
        return rc;
    }
    return MSGJSON_OK;
}

static int msgjson_attachments(msgjson_ctx_t *c, const jd_node_t *root, message_t *m)
{
    const jd_node_t *v = jdoc_get(c->d, root, "attachments");
    if (v == NULL || IS_NULL(v))
        return MSGJSON_OK;
    if (!IS_ARR(v)) {
        util_seterr(c->err, c->errlen, "\"attachments\" must be an array");
        return MSGJSON_EINVAL;
    }
    size_t n = (size_t)v->n;
    if (n == 0)
        return MSGJSON_OK;
    m->attachments = xcalloc(n, sizeof(*m->attachments));
    for (size_t i = 0; i < n; i++) {
        /* counted first so message_free() releases a partly filled entry */
        m->nattachments = i + 1;
        int rc = msgjson_attachment(c, jdoc_at(c->d, v, i), i, &m->attachments[i]);
        if (rc != MSGJSON_OK)
            return rc;
    }
    return MSGJSON_OK;
}

/* "raw": the application's own RFC 5322 message. Everything that would
 * build a message is refused next to it, so nothing is silently ignored;
 * its syntax (header block, line lengths) is mime/'s to check. */
static int msgjson_raw(msgjson_ctx_t *c, const jd_node_t *root, message_t *m)
{
    static const char *const exclusive[] = { "subject", "text", "html", "headers",
                                              "attachments" };
    const jd_node_t *v = jdoc_get(c->d, root, "raw");
    if (v == NULL || IS_NULL(v))
        return MSGJSON_OK;
    if (!IS_STR(v)) {
        util_seterr(c->err, c->errlen, "\"raw\" must be a string (base64)");
        return MSGJSON_EINVAL;
    }
    for (size_t i = 0; i < sizeof(exclusive) / sizeof(exclusive[0]); i++) {
        const jd_node_t *x = jdoc_get(c->d, root, exclusive[i]);
        if (x != NULL && !IS_NULL(x)) {
            util_seterr(c->err, c->errlen, "\"raw\" cannot be combined with \"%s\"",
                           exclusive[i]);
            return MSGJSON_EINVAL;
        }
    }
    size_t bad = 0;
    unsigned char *d = NULL;
    int rc = msgjson_b64_decode(v->u.s, (size_t)v->n, &d, &m->raw_len,
                                &bad);
    if (rc == MSGJSON_ENOMEM) {
        util_seterr(c->err, c->errlen, "out of memory decoding \"raw\"");
        return rc;
    }
    if (rc != MSGJSON_OK) {
        util_seterr(c->err, c->errlen, "\"raw\" is not valid base64 (at offset %zu)", bad);
        return rc;
    }
    m->raw = (char *)d;
    if (m->raw_len == 0) {
        util_seterr(c->err, c->errlen, "\"raw\" is empty");
        return MSGJSON_EINVAL;
    }
    if (memchr(m->raw, '\0', m->raw_len) != NULL) {
        util_seterr(c->err, c->errlen, "\"raw\" contains a NUL byte at offset %zu",
                       (size_t)((char *)memchr(m->raw, '\0', m->raw_len) - m->raw));
        return MSGJSON_EINVAL;
    }
    return MSGJSON_OK;
}

static const char *msgjson_type_name(const jd_node_t *v)
{
    switch (v->type) {
    case JD_ARRAY:
        return "an array";
    case JD_STRING:
        return "a string";
    case JD_NUMBER:
        return "a number";
    case JD_TRUE:
    case JD_FALSE:
        return "a boolean";
    case JD_NULL:
        return "null";
    default:
        return "an object";
    }
}

static int msgjson_fill(msgjson_ctx_t *c, const jd_node_t *root, message_t *m)
{
    int rc;
    const jd_node_t *from = jdoc_get(c->d, root, "from");
    if (from == NULL || IS_NULL(from)) {
        util_seterr(c->err, c->errlen, "missing field \"from\"");
        return MSGJSON_EINVAL;
    }
    if ((rc = msgjson_address(c, from, "\"from\"", &m->from)) != MSGJSON_OK ||
        (rc = msgjson_address_list(c, root, "to", 1, &m->to, &m->nto)) != MSGJSON_OK ||
        (rc = msgjson_address_list(c, root, "cc", 0, &m->cc, &m->ncc)) != MSGJSON_OK ||
        (rc = msgjson_address_list(c, root, "bcc", 0, &m->bcc, &m->nbcc)) != MSGJSON_OK ||
        (rc = msgjson_string(c, root, "subject", 1, &m->subject)) != MSGJSON_OK ||
        (rc = msgjson_string(c, root, "text", 0, &m->text)) != MSGJSON_OK ||
        (rc = msgjson_string(c, root, "html", 0, &m->html)) != MSGJSON_OK ||
        (rc = msgjson_string(c, root, "trace_id", 1, &m->trace_id)) != MSGJSON_OK ||
        (rc = msgjson_ident(c, root, "tenant", MESSAGE_TENANT, &m->tenant)) != MSGJSON_OK ||
        (rc = msgjson_ident(c, root, "campaign", MESSAGE_CAMPAIGN, &m->campaign)) != MSGJSON_OK ||
        (rc = msgjson_ident(c, root, "pool", MESSAGE_POOL, &m->pool)) != MSGJSON_OK ||
        (rc = msgjson_headers(c, root, m)) != MSGJSON_OK ||
        (rc = msgjson_attachments(c, root, m)) != MSGJSON_OK ||
        (rc = msgjson_raw(c, root, m)) != MSGJSON_OK)
        return rc;
    return msgjson_id(c, root, m);
}

int msgjson_from_doc(const jdoc_t *d, message_t **out, char *err, size_t errlen)
{
    msgjson_ctx_t c = { err, errlen, d };
    *out = NULL;
    const jd_node_t *root = jdoc_root(d);
    if (!IS_OBJ(root)) {
        util_seterr(err, errlen, "message must be a JSON object, not %s",
                       msgjson_type_name(root));
        return MSGJSON_EINVAL;
    }
    message_t *m = message_new();
    int rc = msgjson_fill(&c, root, m);
    if (rc == MSGJSON_ENOMEM && c.err && c.errlen && c.err[0] == '\0')
        util_seterr(err, errlen, "out of memory");
    if (rc != MSGJSON_OK) {
        message_free(m);
        return rc;
    }
    *out = m;
    return MSGJSON_OK;
}

/* The reason for a body the parser refused: jansson's position and text,
 * as the messages always had; the check's own text (why) where jansson
 * would have taken the body. */
static int msgjson_refused(const char *body, size_t len, const char *why, char *err,
                           size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            util_seterr(err, errlen, "out of memory parsing JSON");
            return MSGJSON_ENOMEM;
        }
        util_seterr(err, errlen, "invalid JSON at line %d column %d: %s", jerr.line,
                    jerr.column, jerr.text);
        return MSGJSON_EJSON;
    }
    json_decref(root);
    util_seterr(err, errlen, "invalid JSON: %s", why);
    return MSGJSON_EJSON;
}

int msgjson_parse(const char *body, size_t len, message_t **out, char *err, size_t errlen)
{
    jdoc_t d;
    char why[160];
    *out = NULL;
    if (err && errlen)
        err[0] = '\0';
    if (body == NULL)
        body = "", len = 0;
    int prc = jdoc_parse_simd(&d, body, len);
    if (prc == -2) {
        jdoc_free(&d);
        util_seterr(err, errlen, "out of memory parsing JSON");
        return MSGJSON_ENOMEM;
    }
    snprintf(why, sizeof(why), "a number out of range or nesting past %d levels",
             JDOC_MAX_DEPTH);
    /* after the check every string is a proper C string (no NUL) */
    if (prc != 0 || jdoc_check(&d, why, sizeof(why)) != 0) {
        jdoc_free(&d);
        return msgjson_refused(body, len, why, err, errlen);
    }
    int rc = msgjson_from_doc(&d, out, err, errlen);
    jdoc_free(&d);
    return rc;
}

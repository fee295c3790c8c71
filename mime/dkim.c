/*
 * SUMMARY
 *  mime/dkim.c - DKIM signatures (RFC 6376), RSA-SHA256 and Ed25519-SHA256
 *  (RFC 8463), relaxed/relaxed.
 * DESCRIPTION
 *  The canonicalisation is written once here, on OpenSSL's primitives:
 *
 *  - body (3.4.4): runs of blanks become one SP, blanks at line ends and
 *    empty lines at the end go, every line ends in CRLF; an empty body
 *    canonicalises to nothing. The body is streamed into SHA-256 line by
 *    line, and a line without blanks (every base64 line) is hashed in
 *    place, so a large attachment is not copied to be signed.
 *  - header (3.4.2): name lower-cased, value unfolded, blank runs to one
 *    SP, blanks around the colon and at the ends removed.
 *
 *  Header selection (5.4.2): each name in the configured list is signed
 *  once per instance present, taken from the bottom up as verifiers do,
 *  and "from" is listed once more than it occurs, so a From field added
 *  later in transit breaks the signature (oversigning).
 *
 *  RSA signs the header hash input with EVP_DigestSign(SHA-256); Ed25519
 *  (PureEdDSA, which hashes internally) signs the SHA-256 digest of the
 *  same input, as RFC 8463 3 specifies.
 *
 *  Lines are CRLF, CR or LF terminated alike: the signature must match
 *  what mime_dotstuff() puts on the wire, which normalises all three.
 * DIAGNOSTICS
 *  DKIM_ECONFIG with "file:line: reason" from the loaders; DKIM_ENOKEY
 *  when no key covers the sender domain (not an error for callers that
 *  sign opportunistically); DKIM_ECRYPTO with OpenSSL's reason.
 */
#include "mime/dkim.h"

#include <ctype.h>
#include <errno.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/base64.h"
#include "core/util.h"

#define DKIM_MAX_HEADERS 64 /* names in the signed list */
#define DKIM_MAX_FIELDS 1024 /* header fields considered in one message */
#define DKIM_FOLD 76

typedef enum { DKIM_ALG_RSA, DKIM_ALG_ED25519 } dkim_alg_t;

static const char *const dkim_alg_name[] = { "rsa-sha256", "ed25519-sha256" };

typedef struct dkim_key {
    char      *domain; /* lower case */
    char      *selector;
    dkim_alg_t alg;
    EVP_PKEY  *pkey;
} dkim_key_t;

struct dkim_signer {
    dkim_key_t *keys;
    size_t      nkeys;
    char       *hdrs[DKIM_MAX_HEADERS]; /* lower case */
    size_t      nhdrs;
};

const char *dkim_strerror(int status)
{
    switch (status) {
    case DKIM_OK:
        return "success";
    case DKIM_ENOMEM:
        return "out of memory";
    case DKIM_EINVAL:
        return "message cannot be signed";
    case DKIM_ECONFIG:
        return "DKIM configuration error";
    case DKIM_ECRYPTO:
        return "signing failed";
    case DKIM_ENOKEY:
        return "no DKIM key for the sender domain";
    default:
        return "unknown dkim status";
    }
}


static const char *dkim_ssl_reason(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    return r ? r : "unknown OpenSSL error";
}

/* ---- canonicalisation ------------------------------------------------------- */

static int dkim_wsp(char c)
{
    return c == ' ' || c == '\t';
}

/* Next line of s like mime/build.c: CRLF, CR or LF ends it. */
static int dkim_next_line(const char *s, size_t n, size_t *pos, size_t *start, size_t *len)
{
    size_t i = *pos;
    if (i >= n)
        return 0;
    const char *p = s + i;
    /* memchr finds the LF fast; a CR before it is then looked for in the
     * (short) line only */
    const char *lf = memchr(p, '\n', n - i);
    size_t end = lf ? (size_t)(lf - s) : n;
    const char *cr = memchr(p, '\r', end - i);
    if (cr)
        end = (size_t)(cr - s);
    *start = i;
    *len = end - i;
    if (end < n)
        end += (s[end] == '\r' && end + 1 < n && s[end + 1] == '\n') ? 2 : 1;
    *pos = end;
    return 1;
}

typedef void (*dkim_emit_fn)(void *arg, const char *p, size_t n);

/* Relaxed body canonicalisation streamed to emit. scratch holds a line
 * with blanks while it is compressed. */
static void dkim_body_stream(const char *s, size_t n, dkim_emit_fn emit, void *arg,
                             buf_t *scratch)
{
    size_t pos = 0, st, len, pending = 0;
    while (dkim_next_line(s, n, &pos, &st, &len)) {
        const char *l = s + st;
        while (len > 0 && dkim_wsp(l[len - 1]))
            len--;
        if (len == 0) {
            pending++; /* empty: emitted only if a non-empty line follows */
            continue;
        }
        for (; pending > 0; pending--)
            emit(arg, "\r\n", 2);
        if (memchr(l, ' ', len) == NULL && memchr(l, '\t', len) == NULL) {
            emit(arg, l, len);
        } else {
            buf_reset(scratch);
            for (size_t i = 0; i < len; i++) {
                if (dkim_wsp(l[i])) {
                    while (i + 1 < len && dkim_wsp(l[i + 1]))
                        i++;
                    buf_putc(scratch, ' ');
                } else {
                    buf_putc(scratch, l[i]);
                }
            }
            emit(arg, buf_head(scratch), buf_size(scratch));
        }
        emit(arg, "\r\n", 2);
    }
}

static void dkim_emit_buf(void *arg, const char *p, size_t n)
{
    buf_append(arg, p, n);
}

void dkim_canon_body(const char *body, size_t len, buf_t *out)
{
    buf_t scratch = BUF_INIT;
    dkim_body_stream(body, len, dkim_emit_buf, out, &scratch);
    buf_free(&scratch);
}

void dkim_canon_header(const char *field, size_t len, int crlf, buf_t *out)
{
    size_t colon = 0;
    while (colon < len && field[colon] != ':')
        colon++;
    size_t nend = colon;
    while (nend > 0 && (dkim_wsp(field[nend - 1]) || field[nend - 1] == '\r' ||
                        field[nend - 1] == '\n'))
        nend--;
    for (size_t i = 0; i < nend; i++) {
        if (field[i] == '\r' || field[i] == '\n')
            continue;
        buf_putc(out, (char)tolower((unsigned char)field[i]));
    }
    buf_putc(out, ':');
    /* value: unfold (drop CR and LF), blank runs to one SP, trim both ends */
    int blank = 0, started = 0;
    for (size_t i = colon + 1; i < len; i++) {
        char c = field[i];
        if (c == '\r' || c == '\n')
            continue;
        if (dkim_wsp(c)) {
            blank = 1;
            continue;
        }
        if (blank && started)
            buf_putc(out, ' ');
        blank = 0;
        started = 1;
        buf_putc(out, c);
    }
    if (crlf)
        buf_append(out, "\r\n", 2);
}

size_t dkim_body_offset(const char *msg, size_t len)
{
    size_t pos = 0, st, l;
    while (dkim_next_line(msg, len, &pos, &st, &l))
        if (l == 0)
            return pos;
    return len;
}

/* ---- loading keys -------------------------------------------------------------- */

/* LDH labels, as DNS names for d= and s= must be. */
static int dkim_valid_dname(const char *s)
{
    size_t n = strlen(s), start = 0;
    if (n == 0 || n > 253)
        return 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && s[i] != '.') {
            if (!isalnum((unsigned char)s[i]) && s[i] != '-')
                return 0;
            continue;
        }
        size_t l = i - start;
        if (l == 0 || l > 63 || s[start] == '-' || s[i - 1] == '-')
            return 0;
        start = i + 1;
    }
    return 1;
}

static char *dkim_strdup_lower(const char *s)
{
    char *d = strdup(s);
    if (d)
        for (char *p = d; *p; p++)
            *p = (char)tolower((unsigned char)*p);
    return d;
}

void dkim_free(dkim_signer_t *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->nkeys; i++) {
        free(s->keys[i].domain);
        free(s->keys[i].selector);
        EVP_PKEY_free(s->keys[i].pkey);
    }
    free(s->keys);
    for (size_t i = 0; i < s->nhdrs; i++)
        free(s->hdrs[i]);
    free(s);
}

size_t dkim_nkeys(const dkim_signer_t *s)
{
    return s ? s->nkeys : 0;
}

static int dkim_parse_headers(dkim_signer_t *s, const char *list, char *err, size_t errlen)
{
    if (list == NULL || *list == '\0')
        list = DKIM_DEFAULT_HEADERS;
    int has_from = 0;
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == '\t')
            p++;
        size_t n = strcspn(p, ":");
        size_t e = n;
        while (e > 0 && (p[e - 1] == ' ' || p[e - 1] == '\t'))
            e--;
        if (e == 0 || e > 76) {
            util_seterr(err, errlen, "[dkim] headers: empty or overlong field name in \"%.60s\"",
                        list);
            return DKIM_ECONFIG;
        }
        for (size_t i = 0; i < e; i++) {
            unsigned char c = (unsigned char)p[i];
            if (c < 33 || c > 126) {
                util_seterr(err, errlen, "[dkim] headers: invalid field name \"%.*s\"", (int)e, p);
                return DKIM_ECONFIG;
            }
        }
        int dup = 0;
        for (size_t i = 0; i < s->nhdrs; i++)
            dup |= strncasecmp(s->hdrs[i], p, e) == 0 && s->hdrs[i][e] == '\0';
        if (!dup) {
            if (s->nhdrs == DKIM_MAX_HEADERS) {
                util_seterr(err, errlen, "[dkim] headers: more than %d names",
                            DKIM_MAX_HEADERS);
                return DKIM_ECONFIG;
            }
            char *h = strndup(p, e);
            if (h == NULL)
                return DKIM_ENOMEM;
            for (char *q = h; *q; q++)
                *q = (char)tolower((unsigned char)*q);
            if (strcmp(h, "dkim-signature") == 0) {
                free(h);
                util_seterr(err, errlen, "[dkim] headers: DKIM-Signature cannot be signed");
                return DKIM_ECONFIG;
            }
            has_from |= strcmp(h, "from") == 0;
            s->hdrs[s->nhdrs++] = h;
        }
        p += n;
        if (*p == ':')
            p++;
    }
    if (!has_from) {
        util_seterr(err, errlen, "[dkim] headers must include \"from\" (RFC 6376 5.4)");
        return DKIM_ECONFIG;
    }
    return DKIM_OK;
}

static int dkim_load_key(dkim_key_t *k, const char *path, const char *where, char *err,
                         size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        util_seterr(err, errlen, "%s: cannot open key %s: %s", where, path, strerror(errno));
        return DKIM_ECONFIG;
    }
    ERR_clear_error();
    k->pkey = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (k->pkey == NULL) {
        util_seterr(err, errlen, "%s: %s is not a PEM private key (%s)", where, path,
                    dkim_ssl_reason());
        return DKIM_ECONFIG;
    }
    int id = EVP_PKEY_get_base_id(k->pkey);
    if (k->alg == DKIM_ALG_RSA && id != EVP_PKEY_RSA) {
        util_seterr(err, errlen, "%s: %s is not an RSA key but rsa-sha256 was given", where,
                    path);
        return DKIM_ECONFIG;
    }
    if (k->alg == DKIM_ALG_ED25519 && id != EVP_PKEY_ED25519) {
        util_seterr(err, errlen, "%s: %s is not an Ed25519 key but ed25519-sha256 was given",
                    where, path);
        return DKIM_ECONFIG;
    }
    if (k->alg == DKIM_ALG_RSA && EVP_PKEY_get_bits(k->pkey) < 1024) {
        util_seterr(err, errlen, "%s: RSA key %s has %d bits; at least 1024 are required "
                    "(RFC 8301), 2048 advised", where, path, EVP_PKEY_get_bits(k->pkey));
        return DKIM_ECONFIG;
    }
    return DKIM_OK;
}

/* One line "domain selector algorithm key-file" (already split). */
static int dkim_add_key(dkim_signer_t *s, char **f, const char *where, const char *basedir,
                        char *err, size_t errlen)
{
    if (!dkim_valid_dname(f[0])) {
        util_seterr(err, errlen, "%s: invalid domain \"%.80s\"", where, f[0]);
        return DKIM_ECONFIG;
    }
    if (!dkim_valid_dname(f[1])) {
        util_seterr(err, errlen, "%s: invalid selector \"%.80s\"", where, f[1]);
        return DKIM_ECONFIG;
    }
    dkim_alg_t alg;
    if (strcasecmp(f[2], "rsa-sha256") == 0) {
        alg = DKIM_ALG_RSA;
    } else if (strcasecmp(f[2], "ed25519-sha256") == 0) {
        alg = DKIM_ALG_ED25519;
    } else {
        util_seterr(err, errlen,
                    "%s: unknown algorithm \"%.40s\" (rsa-sha256 or ed25519-sha256)", where,
                    f[2]);
        return DKIM_ECONFIG;
    }
    dkim_key_t *nk = realloc(s->keys, (s->nkeys + 1) * sizeof(*nk));
    if (nk == NULL)
        return DKIM_ENOMEM;
    s->keys = nk;
    dkim_key_t *k = &s->keys[s->nkeys];
    memset(k, 0, sizeof(*k));
    k->alg = alg;
    s->nkeys++; /* counted now so dkim_free() releases a half-loaded key */
    k->domain = dkim_strdup_lower(f[0]);
    k->selector = strdup(f[1]);
    if (k->domain == NULL || k->selector == NULL)
        return DKIM_ENOMEM;
    char path[4096];
    if (f[3][0] == '/' || basedir == NULL || basedir[0] == '\0')
        snprintf(path, sizeof(path), "%s", f[3]);
    else
        snprintf(path, sizeof(path), "%s/%s", basedir, f[3]);
    return dkim_load_key(k, path, where, err, errlen);
}

dkim_signer_t *dkim_load_mem(const char *text, size_t len, const char *name,
                             const char *basedir, const char *headers, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (name == NULL)
        name = "keys";
    dkim_signer_t *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        util_seterr(err, errlen, "out of memory");
        return NULL;
    }
    int rc = dkim_parse_headers(s, headers, err, errlen);
    size_t pos = 0, lineno = 0;
    while (rc == DKIM_OK && pos < len) {
        size_t e = pos;
        while (e < len && text[e] != '\n')
            e++;
        char line[1024];
        lineno++;
        size_t ll = e - pos;
        char where[300];
        snprintf(where, sizeof(where), "%.256s:%zu", name, lineno);
        if (ll >= sizeof(line)) {
            util_seterr(err, errlen, "%s: line too long", where);
            rc = DKIM_ECONFIG;
            break;
        }
        memcpy(line, text + pos, ll);
        line[ll] = '\0';
        pos = e + 1;
        if (memchr(line, '\0', ll) != NULL) {
            util_seterr(err, errlen, "%s: NUL byte", where);
            rc = DKIM_ECONFIG;
            break;
        }
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *f[5];
        int nf = 0;
        char *save = NULL;
        for (char *t = strtok_r(line, " \t\r", &save); t; t = strtok_r(NULL, " \t\r", &save)) {
            if (nf == 5)
                break;
            f[nf++] = t;
        }
        if (nf == 0)
            continue;
        if (nf != 4) {
            util_seterr(err, errlen,
                        "%s: expected \"domain selector algorithm key-file\", got %d field%s",
                        where, nf, nf == 1 ? "" : "s");
            rc = DKIM_ECONFIG;
            break;
        }
        rc = dkim_add_key(s, f, where, basedir, err, errlen);
    }
    if (rc == DKIM_OK && s->nkeys == 0) {
        util_seterr(err, errlen, "%s: no keys", name);
        rc = DKIM_ECONFIG;
    }
    if (rc != DKIM_OK) {
        if (rc == DKIM_ENOMEM)
            util_seterr(err, errlen, "out of memory");
        dkim_free(s);
        return NULL;
    }
    return s;
}

dkim_signer_t *dkim_load(const char *path, const char *headers, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        util_seterr(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    buf_t text = BUF_INIT;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0 && buf_size(&text) < (1u << 20))
        buf_append(&text, chunk, n);
    fclose(f);
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        dir[0] = '\0';
    dkim_signer_t *s = dkim_load_mem(buf_head(&text), buf_size(&text), path, dir, headers, err,
                                     errlen);
    buf_free(&text);
    return s;
}

/* ---- signing ----------------------------------------------------------------- */

typedef struct dkim_field {
    const char *p;
    size_t      len;  /* without the final line break */
    size_t      nlen; /* name length (before the colon, blanks trimmed) */
} dkim_field_t;

/* Split the header section into fields (with their continuation lines). */
static size_t dkim_fields(const char *msg, size_t hlen, dkim_field_t *fl, size_t max)
{
    size_t n = 0, pos = 0, st, len;
    while (dkim_next_line(msg, hlen, &pos, &st, &len)) {
        if (len == 0)
            break;
        if (dkim_wsp(msg[st]) && n > 0) {
            fl[n - 1].len = st + len - (size_t)(fl[n - 1].p - msg);
            continue;
        }
        if (n == max)
            break;
        const char *c = memchr(msg + st, ':', len);
        if (c == NULL)
            continue; /* not a field: nothing a verifier could select */
        size_t nl = (size_t)(c - (msg + st));
        while (nl > 0 && dkim_wsp(msg[st + nl - 1]))
            nl--;
        fl[n].p = msg + st;
        fl[n].len = len;
        fl[n].nlen = nl;
        n++;
    }
    return n;
}

typedef struct dkim_md_sink {
    EVP_MD_CTX *md;
    int         fail;
} dkim_md_sink_t;

static void dkim_emit_md(void *arg, const char *p, size_t n)
{
    dkim_md_sink_t *k = arg;
    if (!k->fail && EVP_DigestUpdate(k->md, p, n) != 1)
        k->fail = 1;
}

static int dkim_body_hash(const char *body, size_t len, unsigned char out[32])
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL)
        return DKIM_ENOMEM;
    dkim_md_sink_t k = { md, 0 };
    buf_t scratch = BUF_INIT;
    unsigned int ol = 0;
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
        k.fail = 1;
    else
        dkim_body_stream(body, len, dkim_emit_md, &k, &scratch);
    if (!k.fail && EVP_DigestFinal_ex(md, out, &ol) != 1)
        k.fail = 1;
    buf_free(&scratch);
    EVP_MD_CTX_free(md);
    return k.fail ? DKIM_ECRYPTO : DKIM_OK;
}

static int dkim_do_sign(const dkim_key_t *k, const buf_t *input, unsigned char *sig,
                        size_t *siglen)
{
    unsigned char digest[32];
    const unsigned char *data = (const unsigned char *)buf_head(input);
    size_t dlen = buf_size(input);
    const EVP_MD *md = EVP_sha256();
    if (k->alg == DKIM_ALG_ED25519) {
        unsigned int dl = 0;
        if (EVP_Digest(data, dlen, digest, &dl, EVP_sha256(), NULL) != 1)
            return DKIM_ECRYPTO;
        data = digest;
        dlen = dl;
        md = NULL; /* PureEdDSA: no pre-hash of its own */
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        return DKIM_ENOMEM;
    int ok = EVP_DigestSignInit(ctx, NULL, md, NULL, k->pkey) == 1 &&
             EVP_DigestSign(ctx, sig, siglen, data, dlen) == 1;
    EVP_MD_CTX_free(ctx);
    return ok ? DKIM_OK : DKIM_ECRYPTO;
}

/* Append a tag list item, folding before it when the line would pass 76. */
static void dkim_put(buf_t *out, size_t *col, const char *s, size_t n)
{
    if (*col + n > DKIM_FOLD && *col > 1) {
        buf_append(out, "\r\n\t", 3);
        *col = 1;
        if (n > 0 && s[0] == ' ') /* the fold is the separating blank */
            s++, n--;
    }
    buf_append(out, s, n);
    *col += n;
}

/* One DKIM-Signature field for key k, appended to sig. */
static int dkim_sign_one(const dkim_signer_t *s, const dkim_key_t *k, const dkim_field_t *fl,
                         size_t nf, const char *bh, long long now, buf_t *sig, char *err,
                         size_t errlen)
{
    buf_t h = BUF_INIT, input = BUF_INIT;
    char tmp[320];
    size_t col = 0;
    /* signed names, each once per instance present, plus From once more */
    const char *names[DKIM_MAX_HEADERS * 4];
    size_t nn = 0;
    for (size_t i = 0; i < s->nhdrs; i++) {
        size_t present = 0, hl = strlen(s->hdrs[i]);
        for (size_t j = 0; j < nf; j++)
            present += fl[j].nlen == hl && strncasecmp(fl[j].p, s->hdrs[i], hl) == 0;
        if (strcmp(s->hdrs[i], "from") == 0)
            present++;
        for (size_t j = 0; j < present && nn < sizeof(names) / sizeof(names[0]); j++)
            names[nn++] = s->hdrs[i];
    }
    /* header hash input: for each name, the next instance from the bottom */
    size_t used[DKIM_MAX_HEADERS] = { 0 };
    for (size_t i = 0; i < nn; i++) {
        size_t hi = 0;
        while (s->hdrs[hi] != names[i])
            hi++;
        size_t hl = strlen(names[i]), skip = used[hi]++;
        for (size_t j = nf; j-- > 0;) {
            if (fl[j].nlen != hl || strncasecmp(fl[j].p, names[i], hl) != 0)
                continue;
            if (skip-- == 0) {
                dkim_canon_header(fl[j].p, fl[j].len, 1, &input);
                break;
            }
        }
    }

    int n = snprintf(tmp, sizeof(tmp), "DKIM-Signature: v=1; a=%s; c=relaxed/relaxed;",
                     dkim_alg_name[k->alg]);
    dkim_put(&h, &col, tmp, (size_t)n);
    n = snprintf(tmp, sizeof(tmp), " d=%s;", k->domain);
    dkim_put(&h, &col, tmp, (size_t)n);
    n = snprintf(tmp, sizeof(tmp), " s=%s;", k->selector);
    dkim_put(&h, &col, tmp, (size_t)n);
    n = snprintf(tmp, sizeof(tmp), " t=%lld;", now);
    dkim_put(&h, &col, tmp, (size_t)n);
    for (size_t i = 0; i < nn; i++) {
        n = snprintf(tmp, sizeof(tmp), "%s%s%s", i == 0 ? " h=" : "", names[i],
                     i + 1 == nn ? ";" : ":");
        dkim_put(&h, &col, tmp, (size_t)n);
    }
    n = snprintf(tmp, sizeof(tmp), " bh=%s;", bh);
    dkim_put(&h, &col, tmp, (size_t)n);
    dkim_put(&h, &col, " b=", 3);
    /* the field itself, b= empty, canonicalised without its CRLF (3.7) */
    dkim_canon_header(buf_head(&h), buf_size(&h), 0, &input);

    unsigned char raw[1024];
    size_t rl = sizeof(raw);
    if (k->alg == DKIM_ALG_RSA && (size_t)EVP_PKEY_get_size(k->pkey) > rl) {
        util_seterr(err, errlen, "RSA key for %s too large", k->domain);
        buf_free(&h);
        buf_free(&input);
        return DKIM_ECRYPTO;
    }
    ERR_clear_error();
    int rc = dkim_do_sign(k, &input, raw, &rl);
    if (rc != DKIM_OK) {
        util_seterr(err, errlen, "DKIM %s signature for d=%s failed: %s", dkim_alg_name[k->alg],
                    k->domain, dkim_ssl_reason());
        buf_free(&h);
        buf_free(&input);
        return rc;
    }
    buf_t b = BUF_INIT;
    base64_encode(&b, raw, rl);
    /* the signature, folded: blanks inside b= are ignored by verifiers */
    for (size_t off = 0; off < buf_size(&b);) {
        size_t room = col < DKIM_FOLD ? DKIM_FOLD - col : 0;
        if (room < 8) {
            buf_append(&h, "\r\n\t", 3);
            col = 1;
            continue;
        }
        size_t take = buf_size(&b) - off < room ? buf_size(&b) - off : room;
        buf_append(&h, buf_head(&b) + off, take);
        col += take;
        off += take;
    }
    buf_append(&h, "\r\n", 2);
    buf_append(sig, buf_head(&h), buf_size(&h));
    buf_free(&b);
    buf_free(&h);
    buf_free(&input);
    return DKIM_OK;
}

/* Keys for domain: exact match, else the nearest parent with keys. */
static const char *dkim_find_domain(const dkim_signer_t *s, const char *domain)
{
    for (const char *d = domain; d && *d; d = strchr(d, '.') ? strchr(d, '.') + 1 : NULL)
        for (size_t i = 0; i < s->nkeys; i++)
            if (strcasecmp(s->keys[i].domain, d) == 0)
                return s->keys[i].domain;
    return NULL;
}

int dkim_signature(const dkim_signer_t *s, const char *sender_domain, const char *msg,
                   size_t len, time_t now, buf_t *sig, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    const char *d = s && sender_domain ? dkim_find_domain(s, sender_domain) : NULL;
    if (d == NULL) {
        util_seterr(err, errlen, "no DKIM key for domain \"%.100s\"",
                    sender_domain ? sender_domain : "");
        return DKIM_ENOKEY;
    }
    if (len == 0 || msg[0] == '\r' || msg[0] == '\n' || msg[0] == ' ' || msg[0] == '\t') {
        util_seterr(err, errlen, "message has no header section");
        return DKIM_EINVAL;
    }
    size_t boff = dkim_body_offset(msg, len);
    dkim_field_t *fl = malloc(DKIM_MAX_FIELDS * sizeof(*fl));
    if (fl == NULL) {
        util_seterr(err, errlen, "out of memory");
        return DKIM_ENOMEM;
    }
    size_t nf = dkim_fields(msg, boff, fl, DKIM_MAX_FIELDS);
    unsigned char bh[32];
    int rc = dkim_body_hash(msg + boff, len - boff, bh);
    if (rc != DKIM_OK) {
        util_seterr(err, errlen, "body hash failed: %s", dkim_ssl_reason());
        free(fl);
        return rc;
    }
    buf_t bhb = BUF_INIT;
    base64_encode(&bhb, bh, sizeof(bh));
    size_t mark = buf_size(sig);
    long long t = (long long)(now ? now : time(NULL));
    for (size_t i = 0; i < s->nkeys && rc == DKIM_OK; i++)
        if (s->keys[i].domain == d || strcmp(s->keys[i].domain, d) == 0)
            rc = dkim_sign_one(s, &s->keys[i], fl, nf, buf_head(&bhb), t, sig, err, errlen);
    if (rc != DKIM_OK) {
        sig->len = sig->off + mark;
        if (sig->data)
            sig->data[sig->len] = '\0';
    }
    buf_free(&bhb);
    free(fl);
    return rc;
}

int dkim_sign(const dkim_signer_t *s, const char *sender_domain, buf_t *msg, time_t now,
              char *err, size_t errlen)
{
    buf_t sig = BUF_INIT;
    int rc = dkim_signature(s, sender_domain, buf_head(msg), buf_size(msg), now, &sig, err,
                            errlen);
    if (rc != DKIM_OK) {
        buf_free(&sig);
        return rc;
    }
    size_t n = buf_size(&sig), old = buf_size(msg);
    if (msg->off >= n) {
        /* room in front (consumed space): no move at all */
        msg->off -= n;
    } else {
        buf_compact(msg);
        if (msg->len + n + 1 > msg->cap) {
            char *p = realloc(msg->data, msg->len + n + 1);
            if (p == NULL) {
                buf_free(&sig);
                util_seterr(err, errlen, "out of memory");
                return DKIM_ENOMEM;
            }
            msg->data = p;
            msg->cap = msg->len + n + 1;
        }
        memmove(msg->data + n, msg->data, old + 1);
        msg->len += n;
    }
    memcpy(msg->data + msg->off, buf_head(&sig), n);
    buf_free(&sig);
    return DKIM_OK;
}

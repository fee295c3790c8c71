/*
 * mime/dkim.h - DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256
 * (RFC 8463), relaxed/relaxed canonicalisation.
 *
 * A signer is loaded once at start-up from a keys file and is then
 * read-only: one dkim_signer_t may be used by every worker thread at the
 * same time (each signature uses its own OpenSSL contexts).
 *
 * Keys file: one key per line, blank lines and "#" comments ignored:
 *
 *     domain  selector  algorithm  key-file
 *     example.com  mp2025  rsa-sha256      /etc/mailpump/dkim/example.com.rsa.pem
 *     example.com  mp2025e ed25519-sha256  example.com.ed25519.pem
 *
 * algorithm is rsa-sha256 (RSA key of at least 1024 bits, 2048 advised)
 * or ed25519-sha256; key-file is a PEM private key (PKCS#8 or
 * traditional), relative paths are relative to the keys file. Several
 * lines for one domain sign each message once per key (RFC 8463 advises
 * RSA and Ed25519 side by side). A message from a sub-domain without keys
 * of its own is signed by its nearest parent domain that has keys.
 *
 * Nothing here does network I/O; dkim_load() reads the keys file and the
 * key files, nothing else does I/O.
 */
#ifndef MP_MIME_DKIM_H
#define MP_MIME_DKIM_H

#include <stddef.h>
#include <time.h>

#include "core/buf.h"

typedef enum {
    DKIM_OK = 0,
    DKIM_ENOMEM = -1,
    DKIM_EINVAL = -2,  /* the message cannot be signed (no header section) */
    DKIM_ECONFIG = -3, /* keys file or key unusable */
    DKIM_ECRYPTO = -4, /* OpenSSL failed while signing */
    DKIM_ENOKEY = -5   /* no key for this sender domain: send unsigned */
} dkim_status_t;

const char *dkim_strerror(int status);

typedef struct dkim_signer dkim_signer_t;

/* Default signed header fields (colon-separated, case-insensitive). */
#define DKIM_DEFAULT_HEADERS                                                                      \
    "from:to:cc:subject:date:message-id:mime-version:content-type:"                               \
    "content-transfer-encoding:reply-to:in-reply-to:references:list-id:"                          \
    "list-unsubscribe:list-unsubscribe-post"

/*
 * Load the keys file at path. headers is the colon-separated list of
 * header fields to sign (NULL or "" = DKIM_DEFAULT_HEADERS; it must name
 * "from"). Returns a new signer (dkim_free), or NULL with the reason in err
 * ("keys.txt:3: unknown algorithm \"rsa-sha1\"").
 */
dkim_signer_t *dkim_load(const char *path, const char *headers, char *err, size_t errlen)
    __attribute__((warn_unused_result));

/*
 * Same from a keys-file text of len bytes; relative key paths are taken
 * relative to basedir (NULL = current directory). name labels errors.
 */
dkim_signer_t *dkim_load_mem(const char *text, size_t len, const char *name,
                             const char *basedir, const char *headers, char *err, size_t errlen)
    __attribute__((warn_unused_result));

void dkim_free(dkim_signer_t *s);

/* Number of keys loaded. */
size_t dkim_nkeys(const dkim_signer_t *s);

/*
 * Sign msg (a complete message with CRLF line endings, e.g. mime_build's
 * output) for sender_domain (the domain of the From address) and insert
 * the DKIM-Signature field(s) at the front of msg. now is the t= tag
 * (0 = time(NULL)).
 * Returns DKIM_OK; DKIM_ENOKEY (msg untouched) when no key covers the
 * domain, which callers treat as "send unsigned"; other errors leave msg
 * untouched with a reason in err.
 */
int dkim_sign(const dkim_signer_t *s, const char *sender_domain, buf_t *msg, time_t now,
              char *err, size_t errlen) __attribute__((warn_unused_result));

/*
 * As dkim_sign, but append the DKIM-Signature field(s) (each ending in
 * CRLF) to sig instead of changing the message: the signed message is
 * sig followed by msg.
 */
int dkim_signature(const dkim_signer_t *s, const char *sender_domain, const char *msg,
                   size_t len, time_t now, buf_t *sig, char *err, size_t errlen)
    __attribute__((warn_unused_result));

/* ---- canonicalisation, exposed for tests and fuzzing ---------------------- */

/*
 * Relaxed header canonicalisation (RFC 6376 3.4.2) of one header field
 * (name, colon, value and its continuation lines, without the final
 * CRLF): appends "name:value" and, when crlf is set, CRLF.
 */
void dkim_canon_header(const char *field, size_t len, int crlf, buf_t *out);

/*
 * Relaxed body canonicalisation (RFC 6376 3.4.4) of a whole body, appended
 * to out. CRLF, a lone CR and a lone LF each end a line, as on the wire
 * after mime_dotstuff().
 */
void dkim_canon_body(const char *body, size_t len, buf_t *out);

/*
 * Offset of the body in msg: just past the empty line that ends the
 * header section, or len when there is none (no body).
 */
size_t dkim_body_offset(const char *msg, size_t len);

#endif

/*
 * core/base64.h - RFC 4648 base64 (standard alphabet, with padding), the
 * one encoder and the one strict decoder of the project.
 *
 * Encoding goes through OpenSSL's EVP_EncodeBlock (no line breaks; the
 * MIME body encoder in mime/build.c cuts its 76-character lines from
 * base64_encode_to()). Decoding is our own: OpenSSL's EVP_DecodeBlock
 * accepts what we must refuse (bits a decoder drops, text after the
 * padding, '=' in the middle) and tells no offset, and EVP_DecodeUpdate
 * accepts '-' and '_'; queue/msgjson.c reports the offset of the first
 * bad character to the application that sent it.
 *
 * Nothing here allocates except base64_encode(), which grows the
 * caller's buffer (and aborts on OOM, like every buf_t).
 */
#ifndef MP_CORE_BASE64_H
#define MP_CORE_BASE64_H

#include <stddef.h>

#include "core/buf.h"

/* Characters that encoding n bytes yields: 4 * ceil(n / 3). */
static inline size_t base64_encoded_len(size_t n) { return 4 * ((n + 2) / 3); }
/* Bytes that decoding at most n characters can yield (a bound). */
static inline size_t base64_decoded_max(size_t n) { return n / 4 * 3 + 3; }

/* Append the encoding of p[0..n) to out (out stays NUL-terminated). */
void base64_encode(buf_t *out, const void *p, size_t n);
/* Write the encoding of p[0..n) to dst, which has room for
 * base64_encoded_len(n) + 1 characters, and a NUL after it. Returns
 * base64_encoded_len(n). For callers that reserved the space already. */
size_t base64_encode_to(char *dst, const void *p, size_t n);

/*
 * Strict decoding of s[0..n): padding required; blanks (space, tab, CR,
 * LF) between characters are skipped, since applications often wrap
 * their base64; '=' only at the last one or two places of the last
 * quantum; the bits a decoder would drop must be zero (so every byte
 * string has exactly one accepted encoding); nothing but blanks after
 * the padding. dst has room for base64_decoded_max(n) bytes.
 * Returns 0 with *dstlen bytes in dst, or -1 with *bad = the offset in
 * s of the first offending character (n when the text ends inside a
 * quantum); dst then holds garbage.
 */
int base64_decode(void *dst, size_t *dstlen, const char *s, size_t n, size_t *bad);

#endif

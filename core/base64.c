/*
 * SUMMARY
 *  core/base64.c - base64 encoding (OpenSSL) and strict decoding.
 * DESCRIPTION
 *  EVP_EncodeBlock takes an int length, so long input is encoded in
 *  slices of BASE64_SLICE bytes (a multiple of 3: no padding inside).
 *  The decoder is a plain state machine over 6-bit values; see
 *  core/base64.h for the rules it enforces and why OpenSSL's decoders
 *  do not fit them.
 * DIAGNOSTICS
 *  base64_decode() returns -1 with the offset of the first bad character.
 */
#include "core/base64.h"

#include <stdint.h>

#include <openssl/evp.h>

#define BASE64_SLICE ((size_t)3 << 20)

size_t base64_encode_to(char *dst, const void *p, size_t n)
{
    const unsigned char *s = p;
    size_t o = 0;
    dst[0] = '\0';
    while (n > 0) {
        size_t k = n < BASE64_SLICE ? n : BASE64_SLICE;
        o += (size_t)EVP_EncodeBlock((unsigned char *)dst + o, s, (int)k); /* writes a NUL too */
        s += k;
        n -= k;
    }
    return o;
}

void base64_encode(buf_t *out, const void *p, size_t n)
{
    buf_reserve(out, base64_encoded_len(n)); /* keeps room for the NUL */
    out->len += base64_encode_to(out->data + out->len, p, n);
}

static int base64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

static int base64_blank(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

int base64_decode(void *dst, size_t *dstlen, const char *s, size_t n, size_t *bad)
{
    unsigned char *o = dst;
    size_t k = 0, q = 0, pad = 0;
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (base64_blank(c))
            continue;
        int v = base64_val(c);
        if (c == '=') {
            /* padding: only in the last quantum, at position 3 or 2-3 */
            if (q < 2) {
                *bad = i;
                return -1;
            }
            pad++;
            v = 0;
        } else if (v < 0 || pad > 0) {
            *bad = i;
            return -1;
        }
        acc = (acc << 6) | (uint32_t)v;
        if (++q == 4) {
            o[k++] = (unsigned char)(acc >> 16);
            if (pad < 2)
                o[k++] = (unsigned char)(acc >> 8);
            if (pad < 1)
                o[k++] = (unsigned char)acc;
            /* "ab=c" and the bits a decoder would drop must be zero, so
             * every byte string has exactly one accepted encoding */
            if ((pad == 1 && (acc & 0xff)) || (pad == 2 && (acc & 0xffff))) {
                *bad = i;
                return -1;
            }
            q = 0;
            acc = 0;
            if (pad) {
                /* nothing but blanks may follow the padded quantum */
                for (size_t j = i + 1; j < n; j++) {
                    if (!base64_blank((unsigned char)s[j])) {
                        *bad = j;
                        return -1;
                    }
                }
                break;
            }
        }
    }
    if (q != 0) {
        *bad = n;
        return -1;
    }
    *dstlen = k;
    return 0;
}

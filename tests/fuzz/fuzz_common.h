/*
 * tests/fuzz/fuzz_common.h - wire invariants shared by the harnesses.
 *
 * A violated invariant aborts, which libFuzzer reports as a crash with
 * the input that caused it.
 */
#ifndef MP_FUZZ_COMMON_H
#define MP_FUZZ_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "mime/build.h"

/* CRLF only, lines within 998 octets, ends in CRLF. seven: a built
 * message, so no NUL anywhere and a 7-bit body (addresses in the header
 * may be UTF-8: SMTPUTF8 is the session's business). */
static inline void fuzz_check_message(const char *s, size_t n, int seven)
{
    size_t col = 0;
    int body = 0;
    if (n < 2 || s[n - 2] != '\r' || s[n - 1] != '\n')
        abort();
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (seven && (c == 0 || (body && c >= 0x80)))
            abort();
        if (c == '\r') {
            if (i + 1 >= n || s[i + 1] != '\n' || col > 998)
                abort();
            if (col == 0)
                body = 1;
            col = 0;
            i++;
        } else if (c == '\n') {
            abort();
        } else {
            col++;
        }
    }
}

/* DATA payload of a built (CRLF-only) message: CRLF only, no line "."
 * before the terminator, and mime_wire_segments() gives the same bytes. */
static inline void fuzz_check_wire(const char *s, size_t n)
{
    buf_t w = BUF_INIT;
    mime_dotstuff(s, n, &w);
    const char *o = buf_head(&w);
    size_t ol = buf_size(&w);
    if (ol < 5 || memcmp(o + ol - 5, "\r\n.\r\n", 5) != 0)
        abort();
    for (size_t i = 0; i + 5 < ol; i++) {
        if (o[i] == '\n' && (i == 0 || o[i - 1] != '\r'))
            abort();
        if (o[i] == '\r' && o[i + 1] != '\n')
            abort();
        if (o[i] == '\n' && o[i + 1] == '.' && o[i + 2] == '\r')
            abort(); /* a lone "." line would end DATA early */
    }
    /* the zero-copy framing gives the same bytes */
    mime_seg_t *v = NULL;
    size_t nv = 0, off = 0;
    int rc = mime_wire_segments(s, n, &v, &nv);
    if (rc == MIME_OK) {
        for (size_t i = 0; i < nv; i++) {
            if (off + v[i].n > ol || memcmp(o + off, v[i].p, v[i].n) != 0)
                abort();
            off += v[i].n;
        }
        if (off != ol)
            abort();
        free(v);
    } else {
        abort(); /* only called on built messages: CRLF only */
    }
    buf_free(&w);
}

#endif

/*
 * SUMMARY
 *  core/buf.c - growable byte buffer with a read cursor.
 * DESCRIPTION
 *  Appends grow geometrically; consumed space at the front is reclaimed
 *  when an append would otherwise grow the allocation, so a stream's
 *  input buffer does not creep upward while it is parsed line by line.
 */
#include "core/buf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"

void buf_init(buf_t *b)
{
    memset(b, 0, sizeof(*b));
}

void buf_free(buf_t *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

void buf_reset(buf_t *b)
{
    b->off = b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void buf_compact(buf_t *b)
{
    if (b->off == 0)
        return;
    memmove(b->data, b->data + b->off, b->len - b->off);
    b->len -= b->off;
    b->off = 0;
    b->data[b->len] = '\0';
}

void buf_reserve(buf_t *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return;
    /* reclaim consumed space first when that is enough */
    if (b->off > 0 && b->len - b->off + extra + 1 <= b->cap) {
        buf_compact(b);
        return;
    }
    buf_compact(b);
    size_t want = b->len + extra + 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < want)
        cap *= 2;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
    b->data[b->len] = '\0'; /* the NUL promise holds for a fresh buffer too */
}

void buf_append(buf_t *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void buf_puts(buf_t *b, const char *s)
{
    buf_append(b, s, strlen(s));
}

void buf_putc(buf_t *b, char c)
{
    buf_append(b, &c, 1);
}

void buf_vprintf(buf_t *b, const char *fmt, va_list ap)
{
    va_list cp;
    va_copy(cp, ap);
    int n = vsnprintf(NULL, 0, fmt, cp);
    va_end(cp);
    if (n < 0)
        return;
    buf_reserve(b, (size_t)n);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
}

void buf_printf(buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(b, fmt, ap);
    va_end(ap);
}

void buf_consume(buf_t *b, size_t n)
{
    if (n >= b->len - b->off) {
        buf_reset(b);
        return;
    }
    b->off += n;
}

char *buf_steal(buf_t *b, size_t *len)
{
    buf_compact(b);
    if (b->data == NULL)
        buf_reserve(b, 0);
    char *p = b->data;
    if (len)
        *len = b->len;
    memset(b, 0, sizeof(*b));
    return p;
}

size_t buf_line_len(const buf_t *b)
{
    if (b->data == NULL)
        return 0;
    const char *s = b->data + b->off;
    const char *nl = memchr(s, '\n', b->len - b->off);
    return nl ? (size_t)(nl - s) + 1 : 0;
}

/*
 * core/buf.h - growable byte buffer with a read cursor.
 *
 * Data lives in [data + off, data + len). buf_consume() advances the read
 * cursor; the space is reclaimed lazily by buf_compact() and by appends.
 * The buffer keeps a NUL after the last byte so callers may treat readable
 * text as a C string. Allocation failure aborts, like every core allocation
 * (core/util.h says why).
 */
#ifndef MP_CORE_BUF_H
#define MP_CORE_BUF_H

#include <stdarg.h>
#include <stddef.h>

typedef struct buf {
    char  *data;
    size_t off; /* read cursor */
    size_t len; /* end of data */
    size_t cap;
} buf_t;

#define BUF_INIT { NULL, 0, 0, 0 }

void   buf_init(buf_t *b);
void   buf_free(buf_t *b);               /* releases memory, leaves b empty */
void   buf_reset(buf_t *b);              /* empties, keeps memory */
static inline size_t buf_size(const buf_t *b) { return b->len - b->off; }
static inline char  *buf_head(const buf_t *b) { return b->data ? b->data + b->off : (char *)""; }
void   buf_reserve(buf_t *b, size_t extra); /* room for extra more bytes after len */
void   buf_append(buf_t *b, const void *p, size_t n);
void   buf_puts(buf_t *b, const char *s);
void   buf_putc(buf_t *b, char c);
void   buf_printf(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void   buf_vprintf(buf_t *b, const char *fmt, va_list ap);
void   buf_consume(buf_t *b, size_t n);
void   buf_compact(buf_t *b);
/* Detach the contents as a NUL-terminated heap string (caller frees);
 * *len receives the size if non-NULL. b is left empty. */
char  *buf_steal(buf_t *b, size_t *len);
/* Find a line ending in LF within the readable data. Returns the length
 * of the line including the LF, or 0 if no complete line is buffered. */
size_t buf_line_len(const buf_t *b);

#endif

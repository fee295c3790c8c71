/*
 * core/util.h - small helpers: checked allocation, ids, time.
 *
 * The x* allocators abort on out-of-memory (core policy: STYLE §4);
 * mime/ and dns/ use plain malloc and report MIME_ENOMEM / DNS_ENOMEM.
 */
#ifndef MP_CORE_UTIL_H
#define MP_CORE_UTIL_H

#include <stddef.h>
#include <stdint.h>

void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* A random RFC 4122 version 4 UUID, lower-case, 36 characters + NUL. */
void util_uuid(char out[37]);
/* A random 64-bit id (session ids, correlation). */
uint64_t util_rand64(void);
/* Monotonic and wall clocks in milliseconds. */
uint64_t util_mono_ms(void);
uint64_t util_wall_ms(void);
/* Case-insensitive ASCII compare of at most n bytes. */
int util_strncasecmp(const char *a, const char *b, size_t n);

#endif

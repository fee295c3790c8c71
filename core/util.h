/*
 * core/util.h - small helpers: checked allocation, ids, time, socket
 * addresses.
 *
 * The x* allocators abort on out-of-memory: a worker that cannot allocate
 * a few bytes cannot make progress, and its unacknowledged messages go
 * back to the broker for another (docs/architecture.md). mime/ and dns/
 * are libraries with callers that can recover, so they use plain malloc
 * and report MIME_ENOMEM / DNS_ENOMEM.
 */
#ifndef MP_CORE_UTIL_H
#define MP_CORE_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* A random RFC 4122 version 4 UUID, lower-case, 36 characters + NUL. */
void util_uuid(char out[37]);
/* Copy src into dst (cap > 0 bytes), cut to fit, always terminated. */
void util_copy_text(char *dst, size_t cap, const char *src);
/* A random 64-bit id (session ids, correlation). */
uint64_t util_rand64(void);
/* A uniform random number in [0, 1): jitter for backoffs. */
double   util_rand01(void);
/* Monotonic and wall clocks in milliseconds. */
uint64_t util_mono_ms(void);
uint64_t util_wall_ms(void);
/* vsnprintf into err (when err and errlen are set): the one helper every
 * module uses to fill a caller's reason buffer. */
void util_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Quote caller-supplied text for a reason string that ends up in logs and
 * dead-letter records: CR, LF and TAB as \r \n \t, quotes and backslashes
 * escaped, other control bytes as \xNN, cut short with "..." to fit dst
 * (dstlen >= 16). Returns dst. */
const char *util_quote_text(const char *s, char *dst, size_t dstlen);
/* Length of the well-formed UTF-8 sequence at s (of n >= 1 bytes): 1 for
 * ASCII, 2..4, or 0 when there is none (a stray or cut byte, an overlong
 * form, a surrogate, a value past U+10FFFF). */
size_t util_utf8_len(const unsigned char *s, size_t n);
/* Case-insensitive ASCII compare of at most n bytes. */
int util_strncasecmp(const char *a, const char *b, size_t n);

/* Space, tab, CR, LF, FF, VT. */
int   util_is_blank(char c);
/* s without its leading and trailing blanks, in place. */
char *util_trim(char *s);

/* Reads path line by line (getline: any length, the newline kept) and
 * calls fn(arg, line, len) for each, len counting a NUL byte inside the
 * line (strlen(line) < len says there is one), until fn returns
 * non-zero. Returns fn's non-zero value, 0 at the end of the file, or -1
 * with err ("path: why") when it cannot be opened or read. Start-up only:
 * it blocks. */
int util_file_lines(const char *path, int (*fn)(void *arg, char *line, size_t len), void *arg, char *err,
                    size_t errlen);

/* The port of an AF_INET or AF_INET6 address in host order; 0 for any
 * other family. */
unsigned util_sockaddr_port(const struct sockaddr *sa);
/* Set the port (host order) of an AF_INET or AF_INET6 address; other
 * families are left alone. */
void util_sockaddr_set_port(struct sockaddr *sa, unsigned port);

#endif

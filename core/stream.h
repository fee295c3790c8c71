/*
 * core/stream.h - non-blocking stream I/O with optional TLS, reported
 * upward as events (after OpenSMTPD's ioev). SMTP and IMAP sessions and
 * the test receiver ride on it.
 *
 * The owner never sees EAGAIN or SSL_ERROR_WANT_*: it receives
 *   STREAM_EV_CONNECTED  the TCP connect completed (client side)
 *   STREAM_EV_TLS_READY  the TLS handshake completed
 *   STREAM_EV_DATA       new bytes are in stream_input()
 *   STREAM_EV_DRAINED    everything queued with stream_write() was sent
 *   STREAM_EV_TIMEOUT    no I/O progress for the configured timeout
 *   STREAM_EV_CLOSED     the peer closed the connection (clean EOF)
 *   STREAM_EV_ERROR      connect/read/write/TLS failure; stream_error() says why
 * After CLOSED, ERROR or TIMEOUT the stream does nothing more until freed.
 *
 * stream_free() may be called from inside the stream's own callback: the
 * memory is released once the callback returns, so the stream code that
 * called the callback never touches freed memory on its way out.
 */
#ifndef MP_CORE_STREAM_H
#define MP_CORE_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <openssl/ssl.h>

#include "core/buf.h"
#include "core/loop.h"

typedef struct stream stream_t;

typedef enum {
    STREAM_EV_CONNECTED = 0,
    STREAM_EV_TLS_READY,
    STREAM_EV_DATA,
    STREAM_EV_DRAINED,
    STREAM_EV_TIMEOUT,
    STREAM_EV_CLOSED,
    STREAM_EV_ERROR,
    STREAM_EV_LAST
} stream_event_t;

typedef void (*stream_cb)(stream_t *s, stream_event_t ev, void *arg);

const char *stream_event_name(stream_event_t ev);

stream_t *stream_new(loop_t *loop, stream_cb cb, void *arg);
/* Start a non-blocking connect. Returns 0 (CONNECTED or ERROR follows) or
 * -1 when the socket cannot even be created (stream_error() says why). */
int  stream_connect(stream_t *s, const struct sockaddr *sa, socklen_t salen);
/* The same from a source address: the socket is bound to src (its port
 * ignored, 0; IP_BIND_ADDRESS_NO_PORT, so the ephemeral port is picked
 * at connect time per destination and the ports of one address do not
 * run out across destinations) before it connects. src NULL is
 * stream_connect(). A bind that fails returns -1 at once, like a socket
 * that cannot be created: stream_error() says "source address 192.0.2.1
 * cannot be bound: Cannot assign requested address", stream_errno() the
 * bind's errno and stream_bind_failed() 1. */
int  stream_connect_from(stream_t *s, const struct sockaddr *src, socklen_t srclen, const struct sockaddr *sa,
                         socklen_t salen);
/* 1 when the last stream_connect_from() failed at its bind. */
int  stream_bind_failed(const stream_t *s);
/* Bind fd to src with port 0 (IP_BIND_ADDRESS_NO_PORT first), as
 * stream_connect_from() does: 0, or -1 with errno and err ("source
 * address 192.0.2.1 cannot be bound: <strerror>"). */
int  stream_bind_source(int fd, const struct sockaddr *src, socklen_t srclen, char *err, size_t errlen);
/* Adopt an already connected fd (server side, socketpair in tests).
 * Takes ownership of fd. */
int  stream_attach(stream_t *s, int fd);
/* Begin a client TLS handshake on the connected stream. sni may be NULL.
 * When verify_host is non-NULL the peer certificate must match it (and
 * the ctx must have SSL_VERIFY_PEER). TLS_READY or ERROR follows. */
int  stream_tls_client(stream_t *s, SSL_CTX *ctx, const char *sni, const char *verify_host);
/* Same, offering resume (borrowed; may be NULL) for an abbreviated
 * handshake. A session the server refuses just means a full handshake. */
int  stream_tls_client_resume(stream_t *s, SSL_CTX *ctx, const char *sni, const char *verify_host,
                              SSL_SESSION *resume);
/* The newest session (TLS 1.2) or ticket (TLS 1.3, may arrive after
 * TLS_READY with the first server data) the server issued on this client
 * stream, or NULL. Ownership passes to the caller; a second call returns
 * NULL until the server issues another. */
SSL_SESSION *stream_tls_take_session(stream_t *s);
/* The session in use (a new reference, or NULL without TLS). */
SSL_SESSION *stream_tls_get1_session(const stream_t *s);
/* 1 when the handshake was an abbreviated (resumed) one. */
int  stream_tls_resumed(const stream_t *s);
/* Liveness probe for an idle connection (nginx keepalive, curl
 * conn_seems_healthy): 1 when the peer has closed, sent unsolicited bytes
 * or the socket failed (recv MSG_PEEK), 0 when it looks usable. */
int  stream_peek_closed(const stream_t *s);
/* Begin a server TLS handshake (test receivers). */
int  stream_tls_server(stream_t *s, SSL_CTX *ctx);

/* Queue bytes for sending (copied). Never fails (core aborts on OOM). */
void stream_write(stream_t *s, const void *p, size_t n);
void stream_puts(stream_t *s, const char *str);
void stream_printf(stream_t *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Queue n bytes of the caller's memory without copying them (a message
 * body written once, sent from where it was built). The memory must stay
 * alive and unchanged until the bytes are written (stream_pending_refs()
 * is 0, or STREAM_EV_DRAINED) or the stream is freed; a stream that dies
 * first never touches it again. Order with stream_write() is kept. */
void stream_write_ref(stream_t *s, const void *p, size_t n);
/* While corked, writes only queue; uncorking sends the queue at once
 * (many small pieces, one system call). */
void stream_cork(stream_t *s, int on);
/* Bytes queued and not yet written; of those, bytes of caller memory. */
size_t stream_pending_out(const stream_t *s);
size_t stream_pending_refs(const stream_t *s);

/* The errno of the system call whose failure killed the stream
 * (ECONNRESET, EPIPE, ECONNREFUSED...), 0 when the failure was not a
 * system call's (TLS alert, certificate, clean EOF, timeout). */
int  stream_errno(const stream_t *s);

/* Received bytes; the owner consumes what it parsed with buf_consume().
 * STREAM_EV_DATA comes once per chunk read (at most 16 KB), so a parser
 * sees input as it arrives, not only once the socket is empty. */
buf_t *stream_input(stream_t *s);
/* Cap on the input the owner leaves unparsed (0: the default, 8 MB):
 * with more than max bytes buffered the stream reads no further and
 * fails with STREAM_EV_ERROR, so a peer gets at most max plus one read
 * chunk into memory. Each protocol sets what one of its units needs
 * (an SMTP reply: SMTP_REPLY_MAX_BYTES; IMAP keeps the default, above
 * its largest response). */
void stream_set_max_input(stream_t *s, size_t max);
/* Bytes received since stream_new() (plaintext, after TLS decryption). */
uint64_t stream_bytes_in(const stream_t *s);

/* I/O inactivity timeout in ms (0 disables). Re-armed on every byte read
 * or written, and whenever it is set. */
void stream_set_timeout(stream_t *s, unsigned ms);

/* Release the memory of empty input/output buffers (an idle pooled
 * connection should cost little more than its SSL object). */
void stream_trim(stream_t *s);

/* Pause/resume reading (back-pressure). */
void stream_pause_read(stream_t *s, int paused);

/* Close the connection (TLS close_notify best effort) and release. */
void stream_free(stream_t *s);

int         stream_fd(const stream_t *s);
int         stream_is_tls(const stream_t *s);
const char *stream_error(const stream_t *s);
const char *stream_tls_version(const stream_t *s); /* NULL without TLS */
const char *stream_tls_cipher(const stream_t *s);  /* NULL without TLS */
void        stream_set_callback(stream_t *s, stream_cb cb, void *arg);

#endif

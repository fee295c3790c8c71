/*
 * core/tls.h - OpenSSL context construction shared by SMTP, IMAP and the
 * test receiver. Contexts are created once per process and shared by
 * worker threads (SSL_CTX is thread-safe once configured).
 */
#ifndef MP_CORE_TLS_H
#define MP_CORE_TLS_H

#include <openssl/ssl.h>

/* Client context. ca_file may be NULL (system default paths). When verify
 * is non-zero peers must present a chain that verifies against it.
 * Returns NULL and fills err on failure. */
SSL_CTX *tls_client_ctx_new(const char *ca_file, int verify, char *err, size_t errlen);
/* Server context with a certificate chain and key (PEM files). */
SSL_CTX *tls_server_ctx_new(const char *cert_file, const char *key_file, char *err, size_t errlen);
/*
 * Client session resumption. tls_client_ctx_new() turns on OpenSSL's
 * client session cache in "no internal store" mode: every session (TLS 1.2
 * session or TLS 1.3 ticket) the server hands out is given to the sink
 * attached to that SSL with tls_set_session_sink(), which takes ownership.
 * core/stream.c is the one sink; callers then keep sessions in a
 * tls_session_cache_t keyed by destination and offer them on the next
 * connect (SSL_set_session), so full handshakes become rare.
 */
typedef void (*tls_session_sink_fn)(void *arg, SSL_SESSION *sess); /* takes ownership of sess */
void tls_set_session_sink(SSL *ssl, tls_session_sink_fn fn, void *arg);

/*
 * A small per-worker cache of client sessions keyed by a destination
 * string (address, port, SNI/verified name, policy: never share a session
 * between names or policies). Bounded: the least recently stored entry
 * goes first. Not thread-safe: one per loop.
 */
typedef struct tls_session_cache tls_session_cache_t;
tls_session_cache_t *tls_session_cache_new(size_t max_entries); /* 0 means 1024 */
void tls_session_cache_free(tls_session_cache_t *c);             /* NULL harmless */
/* Borrowed: valid until the next put for that key or the cache's free.
 * Expired or non-resumable sessions are dropped and NULL is returned. */
SSL_SESSION *tls_session_cache_get(tls_session_cache_t *c, const char *key);
/* Takes ownership of sess; NULL removes the key. */
void tls_session_cache_put(tls_session_cache_t *c, const char *key, SSL_SESSION *sess);
size_t tls_session_cache_count(const tls_session_cache_t *c);

/* Last OpenSSL error as text into buf; returns buf. */
const char *tls_error_string(char *buf, size_t len);

#endif

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
/* Last OpenSSL error as text into buf; returns buf. */
const char *tls_error_string(char *buf, size_t len);

#endif

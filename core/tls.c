/*
 * SUMMARY
 *  core/tls.c - OpenSSL contexts for clients (SMTP, IMAP) and test servers.
 * DESCRIPTION
 *  TLS 1.2 is the floor. A peer that closes without close_notify is
 *  treated as a clean EOF (SSL_OP_IGNORE_UNEXPECTED_EOF): many SMTP
 *  servers drop the connection right after "221", and that is not an
 *  error worth reporting. Partial writes and moving write buffers are
 *  enabled because core/stream.c writes from a growable buffer.
 */
#include "core/tls.h"

#include <stdio.h>
#include <openssl/err.h>

const char *tls_error_string(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    if (e == 0)
        snprintf(buf, len, "unknown TLS error");
    else
        ERR_error_string_n(e, buf, len);
    ERR_clear_error();
    return buf;
}

static void set_common(SSL_CTX *ctx)
{
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
}

SSL_CTX *tls_client_ctx_new(const char *ca_file, int verify, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        tls_error_string(err, errlen);
        return NULL;
    }
    set_common(ctx);
    int ok = (ca_file && *ca_file) ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL)
                                   : SSL_CTX_set_default_verify_paths(ctx);
    if (ok != 1) {
        char e[256];
        snprintf(err, errlen, "cannot load CA file %s: %s", ca_file ? ca_file : "(default)",
                 tls_error_string(e, sizeof(e)));
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_verify(ctx, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    return ctx;
}

SSL_CTX *tls_server_ctx_new(const char *cert_file, const char *key_file, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) {
        tls_error_string(err, errlen);
        return NULL;
    }
    set_common(ctx);
    char e[256];
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
        snprintf(err, errlen, "cannot load certificate %s: %s", cert_file,
                 tls_error_string(e, sizeof(e)));
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        snprintf(err, errlen, "cannot load key %s: %s", key_file, tls_error_string(e, sizeof(e)));
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

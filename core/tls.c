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
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <openssl/err.h>

#include "core/util.h"

/* ---- client session hand-over (resumption) ---- */

typedef struct tls_sink {
    tls_session_sink_fn fn;
    void               *arg;
} tls_sink_t;

static int sink_index = -1;
static pthread_once_t sink_once = PTHREAD_ONCE_INIT;

static void sink_index_init(void)
{
    sink_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

static int sink_slot(void)
{
    pthread_once(&sink_once, sink_index_init);
    return sink_index;
}

void tls_set_session_sink(SSL *ssl, tls_session_sink_fn fn, void *arg)
{
    tls_sink_t *old = SSL_get_ex_data(ssl, sink_slot());
    free(old);
    tls_sink_t *k = NULL;
    if (fn) {
        k = xmalloc(sizeof(*k));
        k->fn = fn;
        k->arg = arg;
    }
    SSL_set_ex_data(ssl, sink_slot(), k);
}

/* OpenSSL calls this for each new client session; returning 1 means we
 * keep the reference. The sink memory is freed by the stream before
 * SSL_free (tls_set_session_sink(ssl, NULL, NULL)). */
static int on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    tls_sink_t *k = SSL_get_ex_data(ssl, sink_slot());
    if (k == NULL || k->fn == NULL)
        return 0;
    k->fn(k->arg, sess);
    return 1;
}

/* ---- per-worker session cache ---- */

typedef struct tls_cache_entry {
    char        *key;
    SSL_SESSION *sess;
    uint64_t     seq; /* insertion order: the smallest goes first */
} tls_cache_entry_t;

struct tls_session_cache {
    tls_cache_entry_t *e;
    size_t             n, cap;
    uint64_t           seq;
};

tls_session_cache_t *tls_session_cache_new(size_t max_entries)
{
    tls_session_cache_t *c = xcalloc(1, sizeof(*c));
    c->cap = max_entries ? max_entries : 1024;
    c->e = xcalloc(c->cap, sizeof(*c->e));
    return c;
}

void tls_session_cache_free(tls_session_cache_t *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; i < c->n; i++) {
        free(c->e[i].key);
        SSL_SESSION_free(c->e[i].sess);
    }
    free(c->e);
    free(c);
}

size_t tls_session_cache_count(const tls_session_cache_t *c)
{
    return c ? c->n : 0;
}

static tls_cache_entry_t *cache_find(tls_session_cache_t *c, const char *key)
{
    /* linear: a worker talks to a few hundred destinations at most, and a
     * lookup happens once per new connection, not per message */
    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->e[i].key, key) == 0)
            return &c->e[i];
    return NULL;
}

static void cache_remove(tls_session_cache_t *c, tls_cache_entry_t *e)
{
    free(e->key);
    SSL_SESSION_free(e->sess);
    *e = c->e[--c->n];
}

SSL_SESSION *tls_session_cache_get(tls_session_cache_t *c, const char *key)
{
    if (c == NULL || key == NULL)
        return NULL;
    tls_cache_entry_t *e = cache_find(c, key);
    if (e == NULL)
        return NULL;
    long age = (long)time(NULL) - (long)SSL_SESSION_get_time(e->sess);
    if (!SSL_SESSION_is_resumable(e->sess) || age >= (long)SSL_SESSION_get_timeout(e->sess)) {
        cache_remove(c, e);
        return NULL;
    }
    return e->sess;
}

void tls_session_cache_put(tls_session_cache_t *c, const char *key, SSL_SESSION *sess)
{
    if (c == NULL || key == NULL) {
        SSL_SESSION_free(sess);
        return;
    }
    tls_cache_entry_t *e = cache_find(c, key);
    if (e && sess == NULL) {
        cache_remove(c, e);
        return;
    }
    if (sess == NULL)
        return;
    if (e == NULL) {
        if (c->n == c->cap) {
            tls_cache_entry_t *oldest = &c->e[0];
            for (size_t i = 1; i < c->n; i++)
                if (c->e[i].seq < oldest->seq)
                    oldest = &c->e[i];
            cache_remove(c, oldest);
        }
        e = &c->e[c->n++];
        e->key = xstrdup(key);
        e->sess = NULL;
    }
    SSL_SESSION_free(e->sess);
    e->sess = sess;
    e->seq = ++c->seq;
}

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
    /* sessions go to the stream that received them (tls_set_session_sink),
     * never into OpenSSL's own shared cache: each worker keeps its own */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
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

/*
 * api/http.c - the HTTP API server: libmicrohttpd, the router, bearer
 * tokens, request bodies and JSON answers (see http.h, docs/http-api.md).
 *
 * A request goes through MHD's access handler several times: the first
 * call (headers only) makes its api_call, checks the token, finds the
 * route and refuses a body announced too large or not JSON; the calls
 * with upload data append to the body (or count and drop it once past
 * max_body); the last call parses the body and runs the handler, which
 * answers with api_reply()/api_error(). Nothing here runs on a worker's
 * loop: the MHD threads are the API's own.
 */
#include "api/http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>

#include <microhttpd.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include "core/log.h"
#include "core/util.h"
#include "metrics/metrics.h"

#define API_PATH_PREFIX   "/v1/"
#define AUTH_LOG_EVERY_MS 1000 /* authentication failures: one log line a second at most */
#define TOKENS_CHECK_MS   1000 /* the tokens file's mtime: looked at once a second at most */

/* ---- tokens ---- */

typedef struct token_entry {
    unsigned char digest[SHA256_DIGEST_LENGTH];
    char         *who;
} token_entry_t;

struct api_tokens {
    token_entry_t *v;
    size_t         n;
};

static int token_char(int ch)
{
    return ch > 0x20 && ch < 0x7f;
}

api_tokens_t *api_tokens_parse(const char *text, size_t len, char *err, size_t errlen)
{
    api_tokens_t *t = xcalloc(1, sizeof(*t));
    size_t cap = 0, lineno = 0;
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        lineno++;
        const char *a = p, *b = le;
        p = nl ? nl + 1 : end;
        while (a < b && isspace((unsigned char)*a))
            a++;
        while (b > a && isspace((unsigned char)b[-1]))
            b--;
        if (a == b || *a == '#')
            continue;
        const char *colon = memrchr(a, ':', (size_t)(b - a)); /* a name may hold ':' */
        const char *tok = colon ? colon + 1 : a;
        char who[80];
        if (colon) {
            size_t nlen = (size_t)(colon - a);
            if (nlen == 0 || nlen > 64) {
                snprintf(err, errlen, "line %zu: the name before the last ':' must be 1 to 64 characters",
                         lineno);
                goto fail;
            }
            for (const char *q = a; q < colon; q++)
                if (!token_char((unsigned char)*q)) {
                    snprintf(err, errlen, "line %zu: the name holds a space or a control character", lineno);
                    goto fail;
                }
            snprintf(who, sizeof(who), "%.*s", (int)nlen, a);
        } else {
            snprintf(who, sizeof(who), "token%zu", lineno);
        }
        size_t tlen = (size_t)(b - tok);
        for (const char *q = tok; q < b; q++)
            if (!token_char((unsigned char)*q)) {
                snprintf(err, errlen, "line %zu: the token holds a space or a control character", lineno);
                goto fail;
            }
        if (tlen < API_TOKEN_MIN) {
            snprintf(err, errlen, "line %zu: token shorter than %d characters", lineno, API_TOKEN_MIN);
            goto fail;
        }
        if (t->n == cap) {
            cap = cap ? cap * 2 : 4;
            t->v = xrealloc(t->v, cap * sizeof(*t->v));
        }
        SHA256((const unsigned char *)tok, tlen, t->v[t->n].digest);
        t->v[t->n].who = xstrdup(who);
        t->n++;
    }
    if (t->n == 0) {
        snprintf(err, errlen, "no tokens");
        goto fail;
    }
    return t;
fail:
    api_tokens_free(t);
    return NULL;
}

api_tokens_t *api_tokens_load(const char *path, int *world_readable, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && world_readable != NULL)
        *world_readable = (st.st_mode & S_IROTH) != 0;
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (cap - len < 4096) {
            cap = cap ? cap * 2 : 8192;
            text = xrealloc(text, cap);
        }
        size_t r = fread(text + len, 1, cap - len, f);
        len += r;
        if (r == 0)
            break;
        if (len > (1u << 20)) {
            snprintf(err, errlen, "%s: larger than 1 MiB", path);
            fclose(f);
            free(text);
            return NULL;
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        snprintf(err, errlen, "%s: read error", path);
        free(text);
        return NULL;
    }
    char e[256];
    api_tokens_t *t = api_tokens_parse(text, len, e, sizeof(e));
    OPENSSL_cleanse(text, cap);
    free(text);
    if (t == NULL)
        snprintf(err, errlen, "%s: %s", path, e);
    return t;
}

size_t api_tokens_count(const api_tokens_t *t)
{
    return t ? t->n : 0;
}

const char *api_tokens_match(const api_tokens_t *t, const char *token, size_t len)
{
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)token, len, d);
    size_t found = 0; /* index + 1 of the match */
    for (size_t i = 0; i < t->n; i++) {
        /* no branch on the comparison: a mask selects the index */
        size_t mask = (size_t)0 - (size_t)(CRYPTO_memcmp(d, t->v[i].digest, sizeof(d)) == 0);
        found = (found & ~mask) | ((i + 1) & mask); /* the last match wins */
    }
    OPENSSL_cleanse(d, sizeof(d));
    return found ? t->v[found - 1].who : NULL;
}

void api_tokens_free(api_tokens_t *t)
{
    if (t == NULL)
        return;
    for (size_t i = 0; i < t->n; i++)
        free(t->v[i].who);
    OPENSSL_cleanse(t->v, t->n * sizeof(*t->v));
    free(t->v);
    free(t);
}

const char *api_bearer(const char *h, size_t *len)
{
    if (h == NULL || strncasecmp(h, "Bearer", 6) != 0 || (h[6] != ' ' && h[6] != '\t'))
        return NULL;
    const char *p = h + 6;
    while (*p == ' ' || *p == '\t')
        p++;
    const char *e = p;
    while (*e && *e != ' ' && *e != '\t')
        e++;
    const char *rest = e;
    while (*rest == ' ' || *rest == '\t')
        rest++;
    if (e == p || *rest != '\0')
        return NULL;
    *len = (size_t)(e - p);
    return p;
}

/* ---- routes ---- */

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch = tolower(ch);
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1;
}

long api_url_decode(char *s)
{
    char *w = s;
    for (const char *r = s; *r; r++) {
        if (*r != '%') {
            *w++ = *r;
            continue;
        }
        int hi = hexval((unsigned char)r[1]), lo = hi < 0 ? -1 : hexval((unsigned char)r[2]);
        if (hi < 0 || lo < 0)
            return -1;
        *w++ = (char)(hi * 16 + lo);
        r += 2;
    }
    *w = '\0';
    return (long)(w - s);
}

int api_pattern_valid(const char *pattern)
{
    if (pattern == NULL || pattern[0] != '/')
        return 0;
    size_t nparams = 0;
    const char *p = pattern + 1;
    while (*p) {
        const char *e = strchr(p, '/');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        const char *open = memchr(p, '{', n), *close = memchr(p, '}', n);
        if (open || close) {
            if (n < 3 || p[0] != '{' || p[n - 1] != '}' || memchr(p + 1, '{', n - 2) ||
                memchr(p + 1, '}', n - 2))
                return 0;
            if (++nparams > API_MAX_PARAMS)
                return 0;
        } else if (n == 0 && e != NULL) {
            return 0; /* "//" */
        }
        if (e == NULL)
            break;
        p = e + 1;
    }
    return 1;
}

void api_params_clear(api_params_t *p)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->value[i]);
    p->n = 0;
}

int api_match(const char *pattern, const char *path, api_params_t *p)
{
    p->n = 0;
    size_t plen = strcspn(path, "?");
    const char *a = pattern, *b = path, *bend = path + plen;
    for (;;) {
        if (*a != '/' || b >= bend || *b != '/')
            break;
        a++;
        b++;
        const char *ae = strchr(a, '/');
        size_t an = ae ? (size_t)(ae - a) : strlen(a);
        const char *be = memchr(b, '/', (size_t)(bend - b));
        size_t bn = be ? (size_t)(be - b) : (size_t)(bend - b);
        if (an >= 2 && a[0] == '{') {
            if (bn == 0 || p->n >= API_MAX_PARAMS)
                break;
            char *v = xmalloc(bn + 1);
            memcpy(v, b, bn);
            v[bn] = '\0';
            long dl = api_url_decode(v);
            if (dl < 0 || (size_t)dl != strlen(v) || strchr(v, '/') != NULL) {
                free(v);
                break;
            }
            p->name[p->n] = a + 1;
            p->namelen[p->n] = an - 2;
            p->value[p->n] = v;
            p->n++;
        } else if (an != bn || memcmp(a, b, an) != 0) {
            break;
        }
        a += an;
        b += bn;
        if (*a == '\0' && b == bend)
            return 1;
    }
    api_params_clear(p);
    return 0;
}

/* ---- the server ---- */

typedef struct route {
    char          *method;
    char          *pattern;
    api_handler_fn fn;
    void          *arg;
} route_t;

struct api_server {
    const mp_config_t  *cfg;
    struct MHD_Daemon  *mhd;
    route_t            *routes;
    size_t              nroutes;
    char               *tls_cert;  /* PEM contents */
    char               *tls_key;
    /* the tokens, swapped when the file changes */
    pthread_rwlock_t    tokens_lock;
    api_tokens_t       *tokens;
    pthread_mutex_t     reload_lock; /* one thread looks at the file at a time */
    struct timespec     tokens_mtime;
    uint64_t            tokens_checked_ms;
    /* authentication failures not yet logged */
    pthread_mutex_t     log_lock;
    uint64_t            auth_logged_ms;
    uint64_t            auth_unlogged;
    pthread_key_t       ctl_key;
    int                 ctl_key_made;
};

struct api_call {
    api_server_t          *srv;
    struct MHD_Connection *conn;
    const char            *method;
    char                  *path;
    const route_t         *route;
    api_params_t           params;
    char                  *who;
    char                   peer[64];
    char                  *body;
    size_t                 len, cap;
    int                    has_body;
    int                    too_large;
    json_t                *json;
    int                    replied;
    int                    early;  /* answered at the headers: the body is dropped */
    char                 **strs;   /* decoded query values, freed with the call */
    size_t                 nstrs;
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static char *read_pem(const char *what, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "[api] %s: %s: %s", what, path, strerror(errno));
        return NULL;
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (cap - len < 4096) {
            cap = cap ? cap * 2 : 8192;
            text = xrealloc(text, cap + 1);
        }
        size_t r = fread(text + len, 1, cap - len, f);
        len += r;
        if (r == 0)
            break;
    }
    fclose(f);
    text[len] = '\0';
    if (strstr(text, "-----BEGIN ") == NULL) {
        snprintf(err, errlen, "[api] %s: %s: not a PEM file", what, path);
        free(text);
        return NULL;
    }
    return text;
}

/* The certificate and the key parse and belong together (GnuTLS serves
 * them; OpenSSL only checks them here). */
static int check_pair(const mp_config_t *cfg, const char *cert, const char *key, char *err,
                      size_t errlen)
{
    BIO *cb = BIO_new_mem_buf(cert, -1), *kb = BIO_new_mem_buf(key, -1);
    X509 *x = PEM_read_bio_X509(cb, NULL, NULL, NULL);
    EVP_PKEY *k = PEM_read_bio_PrivateKey(kb, NULL, NULL, NULL);
    int rc = -1;
    if (x == NULL)
        snprintf(err, errlen, "[api] tls_cert: %s: no certificate", cfg->api_tls_cert);
    else if (k == NULL)
        snprintf(err, errlen, "[api] tls_key: %s: no private key (or one with a passphrase)",
                 cfg->api_tls_key);
    else if (X509_check_private_key(x, k) != 1)
        snprintf(err, errlen, "[api] tls_key: %s is not the key of %s", cfg->api_tls_key,
                 cfg->api_tls_cert);
    else
        rc = 0;
    X509_free(x);
    EVP_PKEY_free(k);
    BIO_free(cb);
    BIO_free(kb);
    ERR_clear_error();
    return rc;
}

/* The checks of api_config_check(); with s, also keeps what it loaded. */
static int check_config(const mp_config_t *cfg, api_server_t *s, char *err, size_t errlen)
{
    char e[512];
    struct sockaddr_storage ss;
    if (metrics_listen_parse(cfg->api_listen, &ss, e, sizeof(e)) < 0) {
        const char *m = strncmp(e, "[metrics] listen: ", 18) == 0 ? e + 18 : e;
        snprintf(err, errlen, "[api] listen: %s", m);
        return -1;
    }
    if (cfg->api_tokens_file == NULL || cfg->api_tokens_file[0] == '\0') {
        snprintf(err, errlen, "[api] tokens_file: required when [api] listen is set");
        return -1;
    }
    int world = 0;
    api_tokens_t *t = api_tokens_load(cfg->api_tokens_file, &world, e, sizeof(e));
    if (t == NULL) {
        snprintf(err, errlen, "[api] tokens_file: %s", e);
        return -1;
    }
    if (world)
        log_warn("api", "tokens_file_world_readable", "path=%s", LOG_Q(cfg->api_tokens_file));
    if (s != NULL)
        s->tokens = t;
    else
        api_tokens_free(t);
    int has_cert = cfg->api_tls_cert && cfg->api_tls_cert[0];
    int has_key = cfg->api_tls_key && cfg->api_tls_key[0];
    if (has_cert != has_key) {
        snprintf(err, errlen, "[api] tls_cert and tls_key: set both or neither");
        return -1;
    }
    if (has_cert) {
        if (!MHD_is_feature_supported(MHD_FEATURE_TLS)) {
            snprintf(err, errlen, "[api] tls_cert: this libmicrohttpd has no TLS support");
            return -1;
        }
        char *cert = read_pem("tls_cert", cfg->api_tls_cert, err, errlen);
        if (cert == NULL)
            return -1;
        char *key = read_pem("tls_key", cfg->api_tls_key, err, errlen);
        if (key == NULL) {
            free(cert);
            return -1;
        }
        if (check_pair(cfg, cert, key, err, errlen) < 0) {
            free(cert);
            OPENSSL_cleanse(key, strlen(key));
            free(key);
            return -1;
        }
        if (s != NULL) {
            s->tls_cert = cert;
            s->tls_key = key;
        } else {
            free(cert);
            OPENSSL_cleanse(key, strlen(key));
            free(key);
        }
    }
    if (cfg->api_max_body == 0) {
        snprintf(err, errlen, "[api] max_body: must be at least 1 byte");
        return -1;
    }
    if (cfg->api_timeout_ms < 1000) {
        snprintf(err, errlen, "[api] timeout: must be at least 1s");
        return -1;
    }
    if (cfg->api_max_connections == 0) {
        snprintf(err, errlen, "[api] max_connections: must be at least 1");
        return -1;
    }
    if (cfg->api_threads == 0 || cfg->api_threads > 64) {
        snprintf(err, errlen, "[api] threads: must be 1 to 64");
        return -1;
    }
    if (cfg->api_max_batch == 0 || cfg->api_max_batch > 100000) {
        snprintf(err, errlen, "[api] max_batch: must be 1 to 100000");
        return -1;
    }
    if (cfg->api_publish_timeout_ms < 100) {
        snprintf(err, errlen, "[api] publish_timeout: must be at least 100ms");
        return -1;
    }
    return 0;
}

int api_config_check(const mp_config_t *cfg, char *err, size_t errlen)
{
    if (cfg->api_listen == NULL || cfg->api_listen[0] == '\0')
        return 0;
    return check_config(cfg, NULL, err, errlen);
}

static void ctl_destroy(void *p)
{
    ctl_free(p);
}

api_server_t *api_server_new(const mp_config_t *cfg, char *err, size_t errlen)
{
    api_server_t *s = xcalloc(1, sizeof(*s));
    s->cfg = cfg;
    pthread_rwlock_init(&s->tokens_lock, NULL);
    pthread_mutex_init(&s->reload_lock, NULL);
    pthread_mutex_init(&s->log_lock, NULL);
    if (pthread_key_create(&s->ctl_key, ctl_destroy) != 0) {
        snprintf(err, errlen, "pthread_key_create: %s", strerror(errno));
        api_server_free(s);
        return NULL;
    }
    s->ctl_key_made = 1;
    if (check_config(cfg, s, err, errlen) < 0) {
        api_server_free(s);
        return NULL;
    }
    struct stat st;
    if (stat(cfg->api_tokens_file, &st) == 0)
        s->tokens_mtime = st.st_mtim;
    s->tokens_checked_ms = mono_ms();
    return s;
}

int api_route(api_server_t *s, const char *method, const char *pattern, api_handler_fn fn, void *arg)
{
    if (s->mhd != NULL || method == NULL || fn == NULL || !api_pattern_valid(pattern))
        return -1;
    s->routes = xrealloc(s->routes, (s->nroutes + 1) * sizeof(*s->routes));
    route_t *r = &s->routes[s->nroutes++];
    r->method = xstrdup(method);
    r->pattern = xstrdup(pattern);
    r->fn = fn;
    r->arg = arg;
    return 0;
}

const mp_config_t *api_server_config(const api_server_t *s)
{
    return s->cfg;
}

unsigned api_server_port(const api_server_t *s)
{
    if (s == NULL || s->mhd == NULL)
        return 0;
    const union MHD_DaemonInfo *i = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    return i ? i->port : 0;
}

/* Re-read the tokens file when its mtime (or size) changed; at most once
 * per TOKENS_CHECK_MS, by one thread (the others go on with the tokens
 * they have). A file that no longer parses keeps the old tokens. */
static void tokens_maybe_reload(api_server_t *s)
{
    uint64_t now = mono_ms();
    if (pthread_mutex_trylock(&s->reload_lock) != 0)
        return;
    if (now - s->tokens_checked_ms < TOKENS_CHECK_MS) {
        pthread_mutex_unlock(&s->reload_lock);
        return;
    }
    s->tokens_checked_ms = now;
    struct stat st;
    const char *path = s->cfg->api_tokens_file;
    if (stat(path, &st) == 0 && (st.st_mtim.tv_sec != s->tokens_mtime.tv_sec ||
                                 st.st_mtim.tv_nsec != s->tokens_mtime.tv_nsec)) {
        char e[512];
        int world = 0;
        api_tokens_t *t = api_tokens_load(path, &world, e, sizeof(e));
        if (t == NULL) {
            log_warn("api", "tokens_reload_failed", "reason=%s action=keep_old", LOG_Q(e));
        } else {
            if (world)
                log_warn("api", "tokens_file_world_readable", "path=%s", LOG_Q(path));
            pthread_rwlock_wrlock(&s->tokens_lock);
            api_tokens_t *old = s->tokens;
            s->tokens = t;
            pthread_rwlock_unlock(&s->tokens_lock);
            api_tokens_free(old);
            log_info("api", "tokens_reloaded", "tokens=%zu", api_tokens_count(t));
        }
        s->tokens_mtime = st.st_mtim; /* a broken file is not re-read until it changes again */
    }
    pthread_mutex_unlock(&s->reload_lock);
}

static void auth_failed(api_server_t *s, const api_call_t *c, const char *why)
{
    metrics_inc(MET_API_AUTH_FAILURES, 1);
    uint64_t now = mono_ms(), suppressed = 0;
    int log = 0;
    pthread_mutex_lock(&s->log_lock);
    if (now - s->auth_logged_ms >= AUTH_LOG_EVERY_MS || s->auth_logged_ms == 0) {
        log = 1;
        suppressed = s->auth_unlogged;
        s->auth_unlogged = 0;
        s->auth_logged_ms = now;
    } else {
        s->auth_unlogged++;
    }
    pthread_mutex_unlock(&s->log_lock);
    if (log)
        log_warn("api", "auth_failed", "peer=%s method=%s path=%s reason=%s suppressed=%llu",
                 LOG_Q(c->peer), LOG_Q(c->method), LOG_Q(c->path), LOG_Q(why),
                 (unsigned long long)suppressed);
}

/* ---- answers ---- */

static void queue_json(api_call_t *c, unsigned status, json_t *body, const char *allow)
{
    char *text = NULL;
    size_t len = 0;
    if (body != NULL) {
        char *d = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
        json_decref(body);
        len = strlen(d);
        text = xmalloc(len + 2);
        memcpy(text, d, len);
        text[len++] = '\n';
        text[len] = '\0';
        free(d);
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(len, text ? text : (char *)"",
                                                             text ? MHD_RESPMEM_MUST_FREE
                                                                  : MHD_RESPMEM_PERSISTENT);
    if (text != NULL)
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (status == 401)
        MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (allow != NULL)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    MHD_queue_response(c->conn, status, r);
    MHD_destroy_response(r);
    c->replied = 1;
    metrics_inc(MET_API_REQUESTS, 1);
    if (status >= 500)
        metrics_inc(MET_API_SERVER_ERRORS, 1);
    else if (status >= 400)
        metrics_inc(MET_API_CLIENT_ERRORS, 1);
    log_debug("api", "request", "peer=%s who=%s method=%s path=%s status=%u", LOG_Q(c->peer),
              LOG_Q(c->who ? c->who : "-"), LOG_Q(c->method), LOG_Q(c->path), status);
}

void api_reply(api_call_t *c, unsigned status, json_t *body)
{
    if (c->replied) {
        json_decref(body);
        return;
    }
    queue_json(c, status, body, NULL);
}

static void error_v(api_call_t *c, unsigned status, const char *code, json_t *extra,
                    const char *allow, const char *fmt, va_list ap)
{
    if (c->replied) {
        json_decref(extra);
        return;
    }
    char reason[1024];
    vsnprintf(reason, sizeof(reason), fmt, ap);
    json_t *e = json_pack("{s:i, s:s, s:s}", "status", (int)status, "code", code, "reason", reason);
    if (e == NULL) /* the reason was not UTF-8 */
        e = json_pack("{s:i, s:s, s:s}", "status", (int)status, "code", code, "reason", "(not UTF-8)");
    if (extra != NULL) {
        json_object_update(e, extra);
        json_decref(extra);
    }
    queue_json(c, status, json_pack("{s:o}", "error", e), allow);
}

static void error_allow(api_call_t *c, unsigned status, const char *code, const char *allow,
                        const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void error_allow(api_call_t *c, unsigned status, const char *code, const char *allow,
                        const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_v(c, status, code, NULL, allow, fmt, ap);
    va_end(ap);
}

void api_error(api_call_t *c, unsigned status, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_v(c, status, code, NULL, NULL, fmt, ap);
    va_end(ap);
}

void api_error_with(api_call_t *c, unsigned status, const char *code, json_t *extra,
                    const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_v(c, status, code, extra, NULL, fmt, ap);
    va_end(ap);
}

void api_ctl_error(api_call_t *c, int ctl_status, const char *err)
{
    switch (ctl_status) {
    case CTL_EINVAL: api_error(c, 400, "invalid", "%s", err); break;
    case CTL_ENOTFOUND: api_error(c, 404, "not_found", "%s", err); break;
    case CTL_ECONFLICT: api_error(c, 409, "conflict", "%s", err); break;
    case CTL_EUNAVAIL: api_error(c, 503, "unavailable", "%s", err); break;
    default: api_error(c, 500, "internal", "%s", err); break;
    }
}

/* ---- inside a handler ---- */

const char *api_param(const api_call_t *c, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < c->params.n; i++)
        if (c->params.namelen[i] == n && memcmp(c->params.name[i], name, n) == 0)
            return c->params.value[i];
    return NULL;
}

const char *api_query(const api_call_t *c, const char *name)
{
    /* MHD keeps the arguments undecoded (see unescape_none): decode here */
    const char *v = MHD_lookup_connection_value(c->conn, MHD_GET_ARGUMENT_KIND, name);
    if (v == NULL)
        return NULL;
    char *d = xstrdup(v);
    for (char *p = d; *p; p++)
        if (*p == '+')
            *p = ' ';
    long dl = api_url_decode(d);
    if (dl < 0 || (size_t)dl != strlen(d)) {
        free(d);
        return NULL;
    }
    api_call_t *mc = (api_call_t *)c;
    mc->strs = xrealloc(mc->strs, (mc->nstrs + 1) * sizeof(char *));
    mc->strs[mc->nstrs++] = d;
    return d;
}

const char *api_header(const api_call_t *c, const char *name)
{
    return MHD_lookup_connection_value(c->conn, MHD_HEADER_KIND, name);
}

const json_t *api_body(const api_call_t *c)
{
    return c->json;
}

const char *api_body_raw(const api_call_t *c, size_t *len)
{
    if (len != NULL)
        *len = c->has_body ? c->len : 0;
    return c->has_body ? c->body : NULL;
}

const char *api_who(const api_call_t *c)
{
    return c->who;
}

const char *api_peer(const api_call_t *c)
{
    return c->peer;
}

const mp_config_t *api_config(const api_call_t *c)
{
    return c->srv->cfg;
}

ctl_t *api_ctl(api_call_t *c)
{
    ctl_t *x = pthread_getspecific(c->srv->ctl_key);
    if (x == NULL) {
        x = ctl_new(c->srv->cfg);
        pthread_setspecific(c->srv->ctl_key, x);
    }
    return x;
}

/* ---- MHD's callbacks ---- */

static void format_peer(struct MHD_Connection *conn, char *out, size_t outlen)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    snprintf(out, outlen, "?");
    if (ci == NULL || ci->client_addr == NULL)
        return;
    const struct sockaddr *sa = ci->client_addr;
    char host[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
        snprintf(out, outlen, "%s:%u", host, ntohs(s4->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
        snprintf(out, outlen, "[%s]:%u", host, ntohs(s6->sin6_port));
    }
}

/* The token's who, or NULL (the failure is logged and counted). */
static char *authenticate(api_server_t *s, api_call_t *c)
{
    const char *h = MHD_lookup_connection_value(c->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (h == NULL) {
        auth_failed(s, c, "no Authorization header");
        return NULL;
    }
    size_t len;
    const char *tok = api_bearer(h, &len);
    if (tok == NULL) {
        auth_failed(s, c, "not a Bearer token");
        return NULL;
    }
    tokens_maybe_reload(s);
    pthread_rwlock_rdlock(&s->tokens_lock);
    const char *who = api_tokens_match(s->tokens, tok, len);
    char *copy = who ? xstrdup(who) : NULL;
    pthread_rwlock_unlock(&s->tokens_lock);
    if (copy == NULL)
        auth_failed(s, c, "unknown token");
    return copy;
}

static int json_content_type(const char *ct)
{
    if (ct == NULL)
        return 0;
    while (*ct == ' ')
        ct++;
    size_t n = strlen("application/json");
    if (strncasecmp(ct, "application/json", n) != 0)
        return 0;
    const char *r = ct + n;
    while (*r == ' ')
        r++;
    return *r == '\0' || *r == ';';
}

/* The headers are in: authenticate, route, look at the announced body.
 * Answers (c->early) when the request goes no further. */
static void on_headers(api_server_t *s, api_call_t *c)
{
    if (strncmp(c->path, API_PATH_PREFIX, strlen(API_PATH_PREFIX)) != 0) {
        error_allow(c, 404, "not_found", NULL, "no such path: %s", c->path);
        c->early = 1;
        return;
    }
    c->who = authenticate(s, c);
    if (c->who == NULL) {
        api_error(c, 401, "unauthorized", "a valid bearer token is required");
        c->early = 1;
        return;
    }
    char allow[128] = "";
    size_t alen = 0;
    for (size_t i = 0; i < s->nroutes; i++) {
        api_params_t p;
        if (!api_match(s->routes[i].pattern, c->path, &p))
            continue;
        if (strcmp(s->routes[i].method, c->method) == 0) {
            c->route = &s->routes[i];
            c->params = p;
            break;
        }
        api_params_clear(&p);
        if (strstr(allow, s->routes[i].method) == NULL) {
            int w = snprintf(allow + alen, sizeof(allow) - alen, "%s%s", alen ? ", " : "",
                             s->routes[i].method);
            if (w > 0 && (size_t)w < sizeof(allow) - alen)
                alen += (size_t)w;
        }
    }
    if (c->route == NULL) {
        if (alen)
            error_allow(c, 405, "method_not_allowed", allow, "%s is not allowed on %s (allowed: %s)",
                        c->method, c->path, allow);
        else
            api_error(c, 404, "not_found", "no such path: %s", c->path);
        c->early = 1;
        return;
    }
    const char *cl = MHD_lookup_connection_value(c->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *te = MHD_lookup_connection_value(c->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    int announced = (cl != NULL && strtoull(cl, NULL, 10) > 0) || te != NULL;
    if (cl != NULL && strtoull(cl, NULL, 10) > s->cfg->api_max_body) {
        api_error(c, 413, "too_large", "the body is larger than [api] max_body (%lu bytes)",
                  s->cfg->api_max_body);
        c->early = 1;
        return;
    }
    if (announced) {
        const char *ct = MHD_lookup_connection_value(c->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
        if (!json_content_type(ct)) {
            api_error(c, 415, "unsupported_media_type", "the body must be application/json (got %s)",
                      ct ? ct : "no Content-Type");
            c->early = 1;
            return;
        }
    }
}

static void on_complete(api_server_t *s, api_call_t *c)
{
    if (c->too_large) {
        api_error(c, 413, "too_large", "the body is larger than [api] max_body (%lu bytes)",
                  s->cfg->api_max_body);
        return;
    }
    if (c->has_body) {
        json_error_t je;
        c->json = json_loadb(c->body, c->len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
        if (c->json == NULL) {
            api_error(c, 400, "malformed_json", "invalid JSON at line %d column %d: %s", je.line,
                      je.column, je.text);
            return;
        }
    }
    c->route->fn(c, c->route->arg);
    if (!c->replied)
        api_error(c, 500, "internal", "the handler gave no answer");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    api_server_t *s = cls;
    api_call_t *c = *con_cls;
    if (c == NULL) {
        c = xcalloc(1, sizeof(*c));
        c->srv = s;
        c->conn = conn;
        c->method = method;
        c->path = xstrdup(url);
        format_peer(conn, c->peer, sizeof(c->peer));
        *con_cls = c;
        on_headers(s, c);
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (c->early || c->too_large)
            return MHD_YES; /* dropped */
        if (n > s->cfg->api_max_body - c->len) {
            c->too_large = 1;
            free(c->body);
            c->body = NULL;
            c->len = c->cap = 0;
            return MHD_YES;
        }
        if (c->len + n + 1 > c->cap) {
            size_t cap = c->cap ? c->cap : 16384;
            while (cap < c->len + n + 1)
                cap *= 2;
            c->body = xrealloc(c->body, cap);
            c->cap = cap;
        }
        memcpy(c->body + c->len, upload_data, n);
        c->len += n;
        c->body[c->len] = '\0';
        c->has_body = 1;
        return MHD_YES;
    }
    if (!c->replied)
        on_complete(s, c);
    return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    api_call_t *c = *con_cls;
    if (c == NULL)
        return;
    *con_cls = NULL;
    api_params_clear(&c->params);
    json_decref(c->json);
    for (size_t i = 0; i < c->nstrs; i++)
        free(c->strs[i]);
    free(c->strs);
    free(c->body);
    free(c->who);
    free(c->path);
    free(c);
}

/* Keep the URL and the arguments as they came: path segments are decoded
 * one by one after splitting (so %2F stays inside its segment), the
 * arguments by api_query(). */
static size_t unescape_none(void *cls, struct MHD_Connection *conn, char *uri)
{
    return strlen(uri);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    log_debug("api", "mhd", "message=%s", LOG_Q(line));
}

int api_server_start(api_server_t *s, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    if (metrics_listen_parse(s->cfg->api_listen, &ss, err, errlen) < 0)
        return -1;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    if (s->tls_cert != NULL)
        flags |= MHD_USE_TLS;
    uint16_t port = (uint16_t)util_sockaddr_port((const struct sockaddr *)&ss);
    unsigned timeout_s = (unsigned)(s->cfg->api_timeout_ms / 1000);
    struct MHD_OptionItem tls[3] = {
        { MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert },
        { MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key },
        { MHD_OPTION_END, 0, NULL },
    };
    if (s->tls_cert == NULL)
        tls[0].option = MHD_OPTION_END;
    s->mhd = MHD_start_daemon(flags, port, NULL, NULL, on_request, s,
                              MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                              MHD_OPTION_CONNECTION_LIMIT, s->cfg->api_max_connections,
                              MHD_OPTION_CONNECTION_TIMEOUT, timeout_s,
                              MHD_OPTION_THREAD_POOL_SIZE, s->cfg->api_threads,
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                              MHD_OPTION_UNESCAPE_CALLBACK, unescape_none, s,
                              MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s,
                              MHD_OPTION_ARRAY, tls,
                              MHD_OPTION_END);
    if (s->mhd == NULL) {
        snprintf(err, errlen, "[api] cannot listen on %s (address in use?)", s->cfg->api_listen);
        return -1;
    }
    log_info("api", "listening", "listen=%s port=%u tls=%s threads=%u routes=%zu",
             LOG_Q(s->cfg->api_listen), api_server_port(s), s->tls_cert ? "on" : "off",
             s->cfg->api_threads, s->nroutes);
    return 0;
}

void api_server_free(api_server_t *s)
{
    if (s == NULL)
        return;
    if (s->mhd != NULL)
        MHD_stop_daemon(s->mhd); /* joins the threads: their ctl_t go with them */
    for (size_t i = 0; i < s->nroutes; i++) {
        free(s->routes[i].method);
        free(s->routes[i].pattern);
    }
    free(s->routes);
    api_tokens_free(s->tokens);
    free(s->tls_cert);
    if (s->tls_key != NULL) {
        OPENSSL_cleanse(s->tls_key, strlen(s->tls_key));
        free(s->tls_key);
    }
    if (s->ctl_key_made)
        pthread_key_delete(s->ctl_key);
    pthread_rwlock_destroy(&s->tokens_lock);
    pthread_mutex_destroy(&s->reload_lock);
    pthread_mutex_destroy(&s->log_lock);
    free(s);
}

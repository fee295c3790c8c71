/*
 * SUMMARY
 *  deliverer/deliver.c - one delivery attempt over a domain's MX candidates,
 *  on a per-worker context (session pool, TLS session cache).
 * DESCRIPTION
 *  Owns a copy of the envelope and of the candidate list, runs one SMTP
 *  transaction at a time (session.c) and folds each transaction's
 *  per-recipient replies into the result, classified by outcome.c.
 *  Recipients settled by one transaction are not offered again: each
 *  transaction gets the list of those still open (at most max_rcpts) and
 *  an index map back into the request.
 *
 *  Sessions come from the pool (pool.c) keyed by destination. After a
 *  completed transaction with recipients left (splitting, or "452 too many
 *  recipients"), the next transaction runs on the same connection. A
 *  pooled connection that turns out dead before answering anything (the
 *  server closed it while idle) is dropped and the same candidate is tried
 *  again on a fresh connection: that costs no attempt.
 *
 *  Route penalties (Postfix's dead-host memory; routes.h, one table per
 *  process when cfg.routes is given, else per context): an address whose
 *  fresh connection failed at connect or greeting time is remembered with
 *  a "down until"; later attempts skip it
 *  (other MX addresses first), and an attempt that finds every candidate
 *  down ends without connecting. The penalty doubles with each failure in
 *  a row; the first session past the greeting forgets it. A message that
 *  waited in the pool for a slot on an address that went down meanwhile
 *  gives the slot back instead of connecting.
 *
 *  Hold: with request.before_body each session gets our hook, which
 *  numbers the hold (d->hold), maps the accepted recipients to request
 *  positions and passes them on; deliver_resume() and deliver_abort()
 *  reach the session only for the hold still current, so one that
 *  arrives after its session ended (timeout while held, failover) does
 *  nothing. When the held transaction's session reports, request.after_txn
 *  hears first what became of each of those recipients.
 *
 *  Egress source (request.source): copied into d; session_params() binds
 *  its address and uses its EHLO name, try_next() skips candidates of the
 *  other address family, and the pool key ends in "|src=<name>" (the TLS
 *  cache key gets the name from the session). Per-request knobs
 *  (tls_override, max_msgs_per_conn, connect/command timeouts) are folded
 *  into d->policy, d->max_msgs (smtp_pool_release_max) and d->timeouts,
 *  which every transaction carries (txn_timeouts), pooled or new.
 *  request.site_tag (copied into d) goes with every session we give back
 *  to the pool (smtp_pool_release_tagged), so the leg can count and trim
 *  its site's idle sessions through deliver_ctx_idle_tagged/_trim.
 *
 *  The user callback always runs from a zero-delay timer of our own: never
 *  inside deliver_start(), never deep inside a session/stream callback
 *  chain, and the deliver_t can be released right after it returns.
 * DIAGNOSTICS
 *  The sessions log one info line per transaction; this file adds a debug
 *  summary per attempt.
 */
#include "deliverer/deliver.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/config.h"
#include "core/log.h"
#include "core/stream.h"
#include "core/tls.h"
#include "core/util.h"
#include "deliverer/routes.h"
#include "dns/mx.h"
#include "metrics/metrics.h"


/* An MX address (and port) that failed before or at the greeting. */
struct deliver_ctx {
    loop_t               *loop;
    deliver_config_t      cfg;        /* strings below are our copies */
    char                 *helo_name;
    deliver_tls_map_t     tls_map;    /* cfg.tls_policy_map, parsed */
    char                 *auth_user;
    char                 *auth_pass;
    deliver_candidate_t  *relay;
    smtp_timeouts_t       timeouts;
    smtp_pool_t          *pool;
    tls_session_cache_t  *tls_cache;
    uint64_t              tls_full, tls_resumed, transactions;
    routes_t             *routes;     /* down (or recently down) addresses: cfg.routes or our own */
    int                   routes_owned;
};

struct deliver {
    loop_t                *loop;
    deliver_ctx_t         *ctx;
    int                    own_ctx;     /* deliver_start(): a private, unpooled context */
    smtp_tls_policy_t      policy;
    int                    tls_fell_back; /* this candidate is tried in plaintext after its handshake failed */
    char                  *mail_from;
    char                 **rcpts;
    size_t                 nrcpts;
    const char            *data;
    size_t                 len;
    const mime_seg_t      *segs;
    size_t                 nsegs;
    size_t                 message_size;
    unsigned               need;
    deliver_hold_cb        before_body;
    deliver_txn_cb         after_txn;
    void                  *before_body_arg;
    size_t                *held_pos;    /* the held transaction's recipients, positions in open_rcpts */
    size_t                 nheld;       /* 0: the current transaction was not held */
    uint64_t               hold;        /* id of the held transaction of d->sess; 0 none */
    uint64_t               hold_seq;
    char                  *log_id;
    char                  *trace_id;
    char                  *log_ref;  /* the request's log fields, formatted once; NULL: log_id, trace_id */
    deliver_candidate_t   *cands;
    size_t                 ncands;
    size_t                 next;        /* next candidate to try */
    size_t                 cur;         /* candidate in use */
    unsigned               hosts_tried;
    deliver_rcpt_result_t *results;
    unsigned char         *settled;     /* per recipient: results[i] is final */
    size_t                *open_idx;    /* current transaction's recipients -> request index */
    const char           **open_rcpts;
    size_t                 nopen;
    smtp_session_t        *sess;
    char                   key[700];    /* pool key of the candidate in use */
    int                    holding;     /* we hold a pool slot for key */
    smtp_pool_wait_t       wait;
    unsigned               lost_retries;
    /* why the last session ended, for recipients left without an answer */
    int                    last_status;
    int                    last_has_reply;
    smtp_reply_t           last_reply;
    /* the last refusal a server itself gave about the session (421 at
     * RCPT, a 4xx greeting): it outranks a later candidate that could not
     * even be reached */
    int                    spoke;
    smtp_reply_t           spoke_reply;
    char                   last_error[256];
    int                    tried_any;
    const char            *counted_host; /* the MX host last counted against max_mx */
    size_t                 skipped_down; /* candidates skipped: their address was down */
    char                   down_why[512];/* the first of them, for the result */
    int                    down_cause;   /* and what made it down (smtp_status_t) */
    /* egress source and shaping (request.source, tls_override, ...) */
    int                    has_source;
    char                   source_name[65];
    struct sockaddr_storage source_addr;
    socklen_t              source_addrlen;
    char                   source_helo[256]; /* "" : the context's */
    size_t                 skipped_family;   /* candidates skipped: not the source's address family */
    int                    skipped_af;       /* the family of the first of them */
    smtp_timeouts_t        timeouts;         /* the context's, with the request's overrides */
    unsigned               max_msgs;         /* request.max_msgs_per_conn; 0: the pool's */
    char                  *site_tag;         /* request.site_tag: what our sessions go back with */
    deliver_result_t       res;
    loop_timer_t           done_timer;
    deliver_cb             cb;
    void                  *arg;
    int                    in_cb;
};

/* The message fields of an attempt's log lines. */
#define DELIVER_MSG(d) ((d)->log_ref ? (d)->log_ref : LOG_MSG((d)->log_id, (d)->trace_id))

/* No CR/LF/controls (command injection), no angle brackets (they would
 * end the path early). Quoted local parts with spaces stay possible. */
static int address_ok(const char *a, int empty_ok)
{
    if (a == NULL || (!empty_ok && a[0] == '\0'))
        return 0;
    for (const unsigned char *p = (const unsigned char *)a; *p; p++)
        if (*p < 0x20 || *p == 0x7f || *p == '<' || *p == '>')
            return 0;
    return 1;
}

/* ---- TLS policy per destination domain ---- */

static smtp_tls_policy_t tls_policy_of(mp_smtp_tls_t t);

/* The one mapping of the configuration's [smtp] tls values to ours. */
smtp_tls_policy_t deliver_tls_policy_of(int t)
{
    return tls_policy_of((mp_smtp_tls_t)t);
}

static smtp_tls_policy_t tls_policy_of(mp_smtp_tls_t t)
{
    switch (t) {
    case MP_SMTP_TLS_NONE: return SMTP_TLS_NONE;
    case MP_SMTP_TLS_REQUIRED: return SMTP_TLS_REQUIRED;
    case MP_SMTP_TLS_VERIFY: return SMTP_TLS_VERIFY;
    case MP_SMTP_TLS_OPPORTUNISTIC: break;
    }
    return SMTP_TLS_OPPORTUNISTIC;
}

int deliver_tls_policy_parse(const char *s)
{
    int v = config_enum_parse("smtp", "tls", s); /* the names of [smtp] tls */
    return v < 0 ? -1 : (int)tls_policy_of((mp_smtp_tls_t)v);
}

int deliver_domain_matches(const char *pattern, size_t plen, const char *domain)
{
    size_t dl = strlen(domain);
    if (plen > 0 && pattern[0] == '.') /* ".example.org": the domain and its subdomains */
        return (dl == plen - 1 && util_strncasecmp(domain, pattern + 1, plen - 1) == 0) ||
               (dl > plen && util_strncasecmp(domain + dl - plen, pattern, plen) == 0);
    return dl == plen && util_strncasecmp(domain, pattern, plen) == 0;
}

static size_t trim_blanks(const char **s, size_t n)
{
    while (n > 0 && (**s == ' ' || **s == '\t')) {
        (*s)++;
        n--;
    }
    while (n > 0 && ((*s)[n - 1] == ' ' || (*s)[n - 1] == '\t'))
        n--;
    return n;
}

int deliver_map_next(const char **m, deliver_map_entry_t *e)
{
    const char *p = *m ? *m : "";
    while (*p == ' ' || *p == ',' || *p == '\t')
        p++;
    size_t el = strcspn(p, ",");
    *m = p + el;
    e->entry = p;
    e->elen = trim_blanks(&e->entry, el);
    if (e->elen == 0)
        return 0;
    const char *colon = memchr(e->entry, ':', e->elen);
    e->name = e->entry;
    e->nlen = trim_blanks(&e->name, colon ? (size_t)(colon - e->entry) : e->elen);
    e->value = colon ? colon + 1 : e->entry + e->elen;
    e->vlen = colon ? trim_blanks(&e->value, e->elen - (size_t)(colon - e->entry) - 1) : 0;
    e->has_value = colon != NULL;
    return 1;
}

int deliver_map_load(const char *file_key, const char *inline_map, const char *path, deliver_map_check_fn check,
                     char **out, char *err, size_t errlen)
{
    *out = NULL;
    buf_t b = BUF_INIT;
    buf_puts(&b, inline_map ? inline_map : "");
    if (path && path[0]) {
        FILE *f = fopen(path, "r");
        if (f == NULL) {
            snprintf(err, errlen, "%s: %s: %s", file_key, path, strerror(errno));
            buf_free(&b);
            return -1;
        }
        char *line = NULL;
        size_t cap = 0;
        int lineno = 0, rc = 0;
        while (rc == 0 && getline(&line, &cap, f) >= 0) {
            lineno++;
            const char *s = line;
            size_t n = trim_blanks(&s, strcspn(line, "\r\n"));
            if (n == 0 || s[0] == '#')
                continue;
            line[(size_t)(s - line) + n] = '\0'; /* the entry is the line */
            char why[384];
            deliver_map_entry_t e;
            const char *m = s;
            if (memchr(s, ',', n)) {
                snprintf(why, sizeof(why), "\"%.*s\": one entry per line, without ','", (int)n, s);
                rc = -1;
            } else if (!deliver_map_next(&m, &e) || check(&e, why, sizeof(why)) < 0) {
                rc = -1;
            } else {
                buf_printf(&b, "%s%.*s", buf_size(&b) ? ", " : "", (int)n, s);
                continue;
            }
            snprintf(err, errlen, "%s: %s:%d: %s", file_key, path, lineno, why);
        }
        if (rc == 0 && ferror(f)) {
            snprintf(err, errlen, "%s: %s: %s", file_key, path, strerror(errno));
            rc = -1;
        }
        free(line);
        fclose(f);
        if (rc < 0) {
            buf_free(&b);
            return -1;
        }
    }
    *out = buf_steal(&b, NULL);
    return 0;
}

/* The policy an entry's value names, or -1. */
static int entry_policy(const deliver_map_entry_t *e)
{
    char pol[32];
    if (!e->has_value || e->vlen >= sizeof(pol))
        return -1;
    memcpy(pol, e->value, e->vlen);
    pol[e->vlen] = '\0';
    return deliver_tls_policy_parse(pol);
}

/* A deliver_map_check_fn: "domain:policy" with a known policy. */
static int tls_entry_check(const deliver_map_entry_t *e, char *err, size_t errlen)
{
    if (e->nlen > 0 && entry_policy(e) >= 0)
        return 0;
    char names[128];
    config_enum_list("smtp", "tls", "|", names, sizeof(names));
    snprintf(err, errlen, "\"%.*s\" is not domain:%s", (int)e->elen, e->entry, names);
    return -1;
}

int deliver_tls_map_parse(const char *map, deliver_tls_map_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    int rc = 0;
    size_t cap = 0;
    deliver_map_entry_t e;
    out->text = xstrdup(map ? map : "");
    const char *m = out->text;
    while (deliver_map_next(&m, &e)) {
        char why[256];
        if (tls_entry_check(&e, why, sizeof(why)) < 0) {
            if (rc == 0)
                snprintf(err, errlen, "[smtp] tls_policy: %s", why);
            rc = -1;
            continue;
        }
        int p = entry_policy(&e);
        if (out->n == cap) {
            cap = cap ? 2 * cap : 4;
            out->rules = xrealloc(out->rules, cap * sizeof(*out->rules));
        }
        out->rules[out->n++] = (deliver_tls_rule_t){ e.name, e.nlen, (smtp_tls_policy_t)p };
    }
    return rc;
}

smtp_tls_policy_t deliver_tls_map_lookup(const deliver_tls_map_t *m, smtp_tls_policy_t dflt, const char *domain)
{
    if (domain == NULL || domain[0] == '\0')
        return dflt;
    for (size_t i = 0; i < m->n; i++)
        if (deliver_domain_matches(m->rules[i].pattern, m->rules[i].plen, domain))
            return m->rules[i].policy;
    return dflt;
}

void deliver_tls_map_free(deliver_tls_map_t *m)
{
    free(m->rules);
    free(m->text);
    memset(m, 0, sizeof(*m));
}

int deliver_helo_name_check(const char *name, char *err, size_t errlen)
{
    size_t n = strlen(name);
    if (n >= 2 && name[0] == '[' && name[n - 1] == ']') {
        char lit[64];
        unsigned char addr[16];
        if (n - 2 < sizeof(lit)) {
            memcpy(lit, name + 1, n - 2);
            lit[n - 2] = '\0';
            if (strncasecmp(lit, "IPv6:", 5) == 0 ? inet_pton(AF_INET6, lit + 5, addr) == 1
                                                 : inet_pton(AF_INET, lit, addr) == 1)
                return 0;
        }
    } else if (n > 0 && dns_name_check(name) == n) {
        return 0;
    }
    snprintf(err, errlen, "[smtp] helo_name: \"%s\" is neither a host name nor an address literal like "
             "[192.0.2.1] or [IPv6:2001:db8::1] (RFC 5321 section 4.1.3)", name);
    return -1;
}

static unsigned cap_ms(uint64_t ms)
{
    return (unsigned)(ms > 86400000 ? 86400000 : ms);
}

int deliver_config_build(deliver_config_t *d, const struct mp_config *cfg, SSL_CTX *verify_ctx,
                         SSL_CTX *noverify_ctx, deliver_config_store_t *store, char *err, size_t errlen)
{
    memset(d, 0, sizeof(*d));
    memset(store, 0, sizeof(*store));
    if (deliver_map_load("[smtp] tls_policy_file", cfg->smtp_tls_policy, cfg->smtp_tls_policy_file,
                         tls_entry_check, &store->tls_policy, err, errlen) < 0)
        return -1;
    deliver_tls_map_t map;
    int bad_map = deliver_tls_map_parse(store->tls_policy, &map, err, errlen);
    /* what the relay check below needs; each deliver_ctx parses its own copy */
    int map_unverified = 0;
    for (size_t i = 0; i < map.n; i++)
        map_unverified |= map.rules[i].policy != SMTP_TLS_VERIFY;
    deliver_tls_map_free(&map);
    if (bad_map < 0)
        return -1;
    if (cfg->smtp_helo_name[0] && deliver_helo_name_check(cfg->smtp_helo_name, err, errlen) < 0)
        return -1;
    d->port = (unsigned short)cfg->smtp_port;
    if (cfg->smtp_helo_name[0])
        snprintf(store->helo, sizeof(store->helo), "%s", cfg->smtp_helo_name);
    else if (gethostname(store->helo, sizeof(store->helo)) != 0 || store->helo[0] == '\0')
        snprintf(store->helo, sizeof(store->helo), "localhost");
    store->helo[sizeof(store->helo) - 1] = '\0'; /* gethostname may truncate without one */
    d->helo_name = store->helo;
    d->tls = tls_policy_of(cfg->smtp_tls);
    d->tls_verify_ctx = verify_ctx;
    d->tls_noverify_ctx = noverify_ctx;
    d->max_mx = cfg->smtp_max_mx;
    d->timeout_scale_pct = cfg->smtp_timeout_scale;
    d->tls_policy_map = store->tls_policy[0] ? store->tls_policy : NULL;
    d->max_rcpts = cfg->smtp_max_rcpts;
    d->no_pipelining = cfg->smtp_pipelining == 0;
    d->pool.disabled = cfg->smtp_pool == 0;
    d->pool.max_msgs_per_session = cfg->smtp_pool_max_msgs;
    d->pool.max_age_ms = cfg->smtp_pool_max_age_ms;
    d->pool.max_idle_ms = cfg->smtp_pool_idle_ms;
    d->pool.max_per_dest = cfg->smtp_pool_max_per_dest;
    d->pool.initial_per_dest = cfg->smtp_pool_initial_per_dest;
    d->pool.max_total = cfg->smtp_pool_max_total;
    d->pool.refused_backoff_ms = cap_ms(cfg->smtp_pool_refused_backoff_ms);
    d->pool.no_refused_backoff = cfg->smtp_pool_refused_backoff_ms == 0;
    d->tls_cache_size = cfg->smtp_tls_cache_size;
    d->route_penalty_ms = cap_ms(cfg->smtp_route_penalty_ms);
    d->route_penalty_max_ms = cap_ms(cfg->smtp_route_penalty_max_ms);
    /* one route penalty table for every worker: a dead MX address costs
     * one failed connect per penalty, not one per worker */
    store->routes = routes_new(d->route_penalty_ms, d->route_penalty_max_ms);
    d->routes = store->routes;
    smtp_timeouts_t *t = &store->timeouts;
    smtp_timeouts_default(t, cfg->smtp_timeout_scale);
#define OVERRIDE_TIMEOUT(state) \
    if (cfg->smtp_timeout_##state) \
        t->state = cfg->smtp_timeout_##state
    OVERRIDE_TIMEOUT(connect_ms);
    OVERRIDE_TIMEOUT(greeting_ms);
    OVERRIDE_TIMEOUT(helo_ms);
    OVERRIDE_TIMEOUT(starttls_ms);
    OVERRIDE_TIMEOUT(mail_ms);
    OVERRIDE_TIMEOUT(rcpt_ms);
    OVERRIDE_TIMEOUT(data_init_ms);
    OVERRIDE_TIMEOUT(data_block_ms);
    OVERRIDE_TIMEOUT(data_done_ms);
    OVERRIDE_TIMEOUT(rset_ms);
    OVERRIDE_TIMEOUT(quit_ms);
    OVERRIDE_TIMEOUT(transaction_ms);
#undef OVERRIDE_TIMEOUT
    t->reply_lines_burst = cfg->smtp_reply_lines_burst;
    t->reply_lines_per_s = cfg->smtp_reply_lines_per_s;
    d->timeouts = t;
    if (cfg->smtp_relay[0]) {
        size_t n = 0;
        if (deliver_relay_candidates(cfg->smtp_relay, d->port, &store->relay, &n, err, errlen) < 0)
            return -1;
        if (n == 0) {
            snprintf(err, errlen, "[smtp] relay %s: no address", cfg->smtp_relay);
            return -1;
        }
        d->relay = store->relay;
        d->nrelay = n;
    }
    if (cfg->smtp_relay_user[0]) {
        if (d->tls == SMTP_TLS_NONE) {
            snprintf(err, errlen, "[smtp] relay_user needs tls other than none: AUTH is only sent inside TLS");
            return -1;
        }
        /* a password is only for the relay it belongs to: whoever answers
         * STARTTLS with any certificate must not get it */
        if (!cfg->smtp_relay_auth_unverified) {
            /* the inline entries and those of tls_policy_file alike */
            if (d->tls != SMTP_TLS_VERIFY || map_unverified) {
                snprintf(err, errlen, "[smtp] relay_user needs tls = verify (and no tls_policy entry other than "
                         "verify): the password goes only to a relay whose certificate and name are checked; "
                         "set relay_auth_unverified = 1 to send it without that check");
                return -1;
            }
        }
        d->auth_user = cfg->smtp_relay_user;
        d->auth_pass = cfg->smtp_relay_password;
    }
    return 0;
}

void deliver_config_store_free(deliver_config_store_t *store)
{
    free(store->relay);
    free(store->tls_policy);
    routes_free(store->routes);
    memset(store, 0, sizeof(*store));
}

int deliver_relay_candidates(const char *hostport, unsigned short default_port, deliver_candidate_t **out,
                             size_t *n, char *err, size_t errlen)
{
    char host[256], port[16];
    *out = NULL;
    *n = 0;
    const char *hp = hostport ? hostport : "";
    const char *colon = strrchr(hp, ':');
    if (hp[0] == '[') { /* [IPv6]:port */
        const char *end = strchr(hp, ']');
        if (end == NULL || (size_t)(end - hp - 1) >= sizeof(host)) {
            snprintf(err, errlen, "relay \"%s\": bad address", hp);
            return -1;
        }
        memcpy(host, hp + 1, (size_t)(end - hp - 1));
        host[end - hp - 1] = '\0';
        colon = end[1] == ':' ? end + 1 : NULL;
    } else {
        size_t hl = colon ? (size_t)(colon - hp) : strlen(hp);
        if (hl == 0 || hl >= sizeof(host)) {
            snprintf(err, errlen, "relay \"%s\": bad host", hp);
            return -1;
        }
        memcpy(host, hp, hl);
        host[hl] = '\0';
    }
    snprintf(port, sizeof(port), "%s", colon ? colon + 1 : "");
    if (port[0] == '\0')
        snprintf(port, sizeof(port), "%u", default_port ? default_port : 25);
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL;
    int r = getaddrinfo(host, port, &hints, &res);
    if (r != 0) {
        snprintf(err, errlen, "relay %s: %s", host, gai_strerror(r));
        return -1;
    }
    size_t k = 0;
    for (struct addrinfo *a = res; a; a = a->ai_next)
        k++;
    deliver_candidate_t *c = xcalloc(k ? k : 1, sizeof(*c));
    k = 0;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        if (a->ai_addrlen > sizeof(c[k].addr))
            continue;
        util_copy_text(c[k].host, sizeof(c[k].host), host);
        memcpy(&c[k].addr, a->ai_addr, a->ai_addrlen);
        c[k].addrlen = a->ai_addrlen;
        k++;
    }
    freeaddrinfo(res);
    *out = c;
    *n = k;
    return 0;
}

/* ---- context ---- */

deliver_ctx_t *deliver_ctx_new(loop_t *loop, const deliver_config_t *cfg)
{
    deliver_ctx_t *ctx = xcalloc(1, sizeof(*ctx));
    ctx->loop = loop;
    ctx->cfg = *cfg;
    ctx->helo_name = xstrdup(cfg->helo_name && *cfg->helo_name ? cfg->helo_name : "localhost");
    ctx->cfg.helo_name = ctx->helo_name;
    char e[256];
    /* once per context: an attempt only looks its domain up. A bad entry
     * is left out (mailpumpd refused it already, deliver_config_build) */
    (void)deliver_tls_map_parse(cfg->tls_policy_map, &ctx->tls_map, e, sizeof(e));
    ctx->cfg.tls_policy_map = NULL;
    ctx->auth_user = cfg->auth_user && *cfg->auth_user ? xstrdup(cfg->auth_user) : NULL;
    ctx->auth_pass = cfg->auth_pass ? xstrdup(cfg->auth_pass) : NULL;
    ctx->cfg.auth_user = ctx->auth_user;
    ctx->cfg.auth_pass = ctx->auth_pass;
    if (cfg->routes) {
        ctx->routes = cfg->routes; /* shared with the other workers */
    } else {
        ctx->routes = routes_new(cfg->route_penalty_ms, cfg->route_penalty_max_ms);
        ctx->routes_owned = 1;
    }
    if (cfg->nrelay) {
        ctx->relay = xcalloc(cfg->nrelay, sizeof(*ctx->relay));
        memcpy(ctx->relay, cfg->relay, cfg->nrelay * sizeof(*ctx->relay));
    }
    ctx->cfg.relay = ctx->relay;
    if (cfg->timeouts)
        ctx->timeouts = *cfg->timeouts;
    else
        smtp_timeouts_default(&ctx->timeouts, cfg->timeout_scale_pct);
    ctx->cfg.timeouts = NULL;
    ctx->pool = smtp_pool_new(loop, &cfg->pool);
    ctx->tls_cache = tls_session_cache_new(cfg->tls_cache_size);
    return ctx;
}

void deliver_ctx_free(deliver_ctx_t *ctx)
{
    if (ctx == NULL)
        return;
    smtp_pool_free(ctx->pool);
    tls_session_cache_free(ctx->tls_cache);
    free(ctx->helo_name);
    deliver_tls_map_free(&ctx->tls_map);
    if (ctx->auth_pass)
        memset(ctx->auth_pass, 0, strlen(ctx->auth_pass));
    free(ctx->auth_user);
    free(ctx->auth_pass);
    free(ctx->relay);
    if (ctx->routes_owned)
        routes_free(ctx->routes);
    free(ctx);
}

void deliver_ctx_stats(const deliver_ctx_t *ctx, deliver_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    smtp_pool_get_stats(ctx->pool, &st->pool);
    st->tls_full = ctx->tls_full;
    st->tls_resumed = ctx->tls_resumed;
    st->transactions = ctx->transactions;
    st->tls_cached = tls_session_cache_count(ctx->tls_cache);
}

size_t deliver_ctx_idle_tagged(deliver_ctx_t *ctx, const char *tag)
{
    return smtp_pool_idle_tagged(ctx->pool, tag);
}

size_t deliver_ctx_trim(deliver_ctx_t *ctx, const char *tag, size_t keep)
{
    return smtp_pool_trim_tag(ctx->pool, tag, keep);
}

/* ---- one attempt ---- */

static void drop_session(deliver_t *d, smtp_session_t *keep)
{
    if (d->holding) {
        d->holding = 0;
        smtp_pool_release_tagged(d->ctx->pool, d->key, keep, d->max_msgs, d->site_tag);
    } else if (keep) {
        smtp_session_free(keep);
    }
    d->sess = NULL;
}

static void release(deliver_t *d)
{
    smtp_pool_cancel(d->ctx->pool, &d->wait);
    if (d->sess) {
        smtp_session_t *s = d->sess;
        d->sess = NULL;
        smtp_session_free(s);
    }
    if (d->holding) {
        d->holding = 0;
        smtp_pool_release(d->ctx->pool, d->key, NULL);
    }
    loop_timer_cancel(d->loop, &d->done_timer);
    free(d->mail_from);
    for (size_t i = 0; i < d->nrcpts; i++)
        free(d->rcpts[i]);
    free(d->rcpts);
    free(d->log_id);
    free(d->trace_id);
    free(d->log_ref);
    free(d->site_tag);
    free(d->cands);
    free(d->results);
    free(d->settled);
    free(d->open_idx);
    free(d->held_pos);
    free(d->open_rcpts);
    if (d->own_ctx)
        deliver_ctx_free(d->ctx);
    free(d);
}

static void settle(deliver_t *d, size_t i, int code, const char *enh, const char *text)
{
    deliver_rcpt_result_t *r = &d->results[i];
    r->outcome = outcome_classify(code, enh, text, &r->reason);
    r->code = code;
    util_copy_text(r->enh, sizeof(r->enh), enh ? enh : "");
    util_copy_text(r->text, sizeof(r->text), text ? text : "");
    d->settled[i] = 1;
}

static const char *af_name(int af)
{
    return af == AF_INET ? "IPv4" : af == AF_INET6 ? "IPv6" : "unknown";
}

static int error_kind(int status)
{
    switch (status) {
    case SMTP_ETIMEOUT:
        return OUTCOME_ERR_TIMEOUT;
    case SMTP_ETLS:
        return OUTCOME_ERR_TLS;
    case SMTP_EPROTO:
        return OUTCOME_ERR_PROTOCOL;
    default:
        return OUTCOME_ERR_NETWORK;
    }
}

static void done_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    deliver_t *d = arg;
    d->res.rcpts = d->results;
    d->res.nrcpts = d->nrcpts;
    d->in_cb = 1;
    d->cb(d->arg, &d->res);
    d->in_cb = 0;
    release(d);
}

/* Classify what is left and report from the loop. */
static void finish(deliver_t *d)
{
    for (size_t i = 0; i < d->nrcpts; i++) {
        if (d->settled[i])
            continue;
        deliver_rcpt_result_t *r = &d->results[i];
        if (!d->tried_any && d->skipped_down) {
            /* tagged by the failure that made the address down */
            r->outcome = outcome_for_error(error_kind(d->down_cause), &r->reason);
            r->code = 0;
            util_copy_text(r->text, sizeof(r->text), d->down_why);
        } else if (!d->tried_any && d->skipped_family) {
            /* like no candidate at all: nothing this source can reach */
            r->outcome = outcome_for_error(OUTCOME_ERR_DNS, &r->reason);
            r->code = 0;
            snprintf(r->text, sizeof(r->text), "no MX address of family %s for source %s (%s %s): %zu %s "
                     "address%s skipped", af_name(d->source_addr.ss_family), d->source_name,
                     af_name(d->source_addr.ss_family), d->res.source_addr, d->skipped_family,
                     af_name(d->skipped_af), d->skipped_family == 1 ? "" : "es");
        } else if (!d->tried_any) {
            r->outcome = outcome_for_error(OUTCOME_ERR_DNS, &r->reason);
            r->code = 0;
            util_copy_text(r->text, sizeof(r->text), "no MX candidate to try");
        } else if ((d->last_status == SMTP_EREJECTED && d->last_has_reply) || d->spoke) {
            /* a server spoke, but about the session, not this recipient:
             * keep its words, try again later (Postfix skips 5xx greetings
             * and defers when every MX refused). A later MX that could not
             * be reached says less than that. */
            const smtp_reply_t *sr = d->last_status == SMTP_EREJECTED && d->last_has_reply ? &d->last_reply
                                                                                          : &d->spoke_reply;
            settle(d, i, sr->code, sr->enh, sr->text);
            r->outcome = OUTCOME_TRANSIENT;
        } else {
            r->outcome = outcome_for_error(error_kind(d->last_status), &r->reason);
            r->code = 0;
            r->enh[0] = '\0';
            util_copy_text(r->text, sizeof(r->text), d->last_error[0] ? d->last_error : "no answer");
        }
        d->settled[i] = 1;
    }
    log_debug("deliver", "attempt", "%s mx=%s addr=%s source=%s attempts=%u connections=%u reused=%u txns=%u "
              "rcpts=%zu tls=%s",
              DELIVER_MSG(d), LOG_Q(d->res.mx_host[0] ? d->res.mx_host : NULL),
              d->res.mx_addr[0] ? d->res.mx_addr : "-", LOG_Q(d->has_source ? d->source_name : NULL),
              d->res.attempts_made, d->res.connections,
              d->res.reused, d->res.transactions, d->nrcpts, d->res.tls_version ? d->res.tls_version : "none");
    loop_timer_set(d->loop, &d->done_timer, 0);
}

static void on_session(void *arg, smtp_session_t *s, const smtp_session_result_t *sr);
static void try_next(deliver_t *d);

/* ---- route penalties ---- */

static void route_key(const deliver_candidate_t *c, char *out, size_t n)
{
    char addr[64];
    smtp_addr_text((const struct sockaddr *)&c->addr, addr, sizeof(addr));
    unsigned port = util_sockaddr_port((const struct sockaddr *)&c->addr);
    snprintf(out, n, "%s|%u", addr, port);
}

/* Whether the candidate's address is down now; *st says since when and why. */
static int route_down(deliver_ctx_t *ctx, const deliver_candidate_t *c, route_state_t *st)
{
    if (ctx->cfg.route_penalty_ms == 0)
        return 0;
    char key[72];
    route_key(c, key, sizeof(key));
    return routes_down(ctx->routes, key, loop_now_ms(ctx->loop), st);
}

/* Mark the candidate's address down after sr failed there. The penalty
 * keeps the kind of failure and its wording (with how long a timeout
 * waited), which is what an attempt finding every address down reports. */
static void route_failed(deliver_ctx_t *ctx, const deliver_candidate_t *c, const smtp_session_result_t *sr,
                         const smtp_timeouts_t *to)
{
    if (ctx->cfg.route_penalty_ms == 0)
        return;
    char key[72], text[ROUTES_WHY_LEN], waited[24] = "";
    route_key(c, key, sizeof(key));
    if (sr->status == SMTP_ETIMEOUT) {
        unsigned ms = sr->state == SMTP_STATE_CONNECT ? to->connect_ms : to->greeting_ms;
        snprintf(waited, sizeof(waited), " (after %g s)", ms / 1000.0);
    }
    snprintf(text, sizeof(text), "%.100s [%.60s]: %.170s%s", c->host, key, sr->error, waited);
    unsigned failures = 0;
    uint64_t pen = routes_failed(ctx->routes, key, loop_now_ms(ctx->loop), sr->status, text, &failures);
    metrics_inc(MET_SMTP_ROUTES_DOWN, 1);
    char error[sizeof(sr->error) + sizeof(waited)];
    snprintf(error, sizeof(error), "%s%s", sr->error, waited);
    log_warn("deliver", "route_down", "mx=%s addr=%s failures=%u skip_ms=%llu error=%s", LOG_Q(c->host), key,
             failures, (unsigned long long)pen, LOG_Q(error));
}

static void route_ok(deliver_ctx_t *ctx, const deliver_candidate_t *c)
{
    char key[72];
    route_key(c, key, sizeof(key));
    unsigned had = routes_ok(ctx->routes, key);
    if (had)
        log_info("deliver", "route_up", "mx=%s addr=%s after_failures=%u", LOG_Q(c->host), key, had);
}

/* Skip a down candidate: remember why, for an attempt that finds no other. */
static void skip_down(deliver_t *d, const deliver_candidate_t *c, const route_state_t *r)
{
    d->skipped_down++;
    metrics_inc(MET_SMTP_ROUTE_SKIPS, 1);
    if (d->down_why[0] == '\0') {
        d->down_cause = r->cause;
        uint64_t left = r->until_ms - loop_now_ms(d->loop);
        snprintf(d->down_why, sizeof(d->down_why),
                 "every MX address is down after recent failures (next try in %llu s): %s",
                 (unsigned long long)(left + 999) / 1000, r->why);
    }
    if (log_enabled(LOG_DEBUG)) {
        char key[72];
        route_key(c, key, sizeof(key));
        log_debug("deliver", "route_skip", "%s mx=%s addr=%s", DELIVER_MSG(d), LOG_Q(c->host), key);
    }
}

/* What a finished session says about its route: a fresh connection that
 * failed at connect or greeting time marks it down; a fresh one that got
 * further clears it (reused sessions touch the shared table not at all). */
static void route_learn(deliver_t *d, const smtp_session_result_t *sr)
{
    const deliver_candidate_t *c = &d->cands[d->cur];
    if (sr->status == SMTP_OK || sr->state > SMTP_STATE_GREETING) {
        if (!sr->reused) /* a reused session cleared its route when it was new */
            route_ok(d->ctx, c);
        return;
    }
    /* SMTP_ELOCAL (no descriptor, no port, a source address that cannot
     * be bound) says nothing about the MX: never a penalty */
    if (!sr->reused && (sr->status == SMTP_ENETWORK || sr->status == SMTP_ETIMEOUT))
        route_failed(d->ctx, c, sr, &d->timeouts);
}

/* The next transaction's recipients: open ones, at most max_rcpts. */
static size_t collect_open(deliver_t *d)
{
    size_t max = d->ctx->cfg.max_rcpts ? d->ctx->cfg.max_rcpts : 100;
    d->nopen = 0;
    for (size_t i = 0; i < d->nrcpts && d->nopen < max; i++) {
        if (d->settled[i])
            continue;
        d->open_idx[d->nopen] = i;
        d->open_rcpts[d->nopen] = d->rcpts[i];
        d->nopen++;
    }
    return d->nopen;
}

static size_t open_left(const deliver_t *d)
{
    size_t left = 0;
    for (size_t i = 0; i < d->nrcpts; i++)
        left += !d->settled[i];
    return left;
}

/* The session's 354 is in: number the hold, let the owner decide when.
 * Nothing of d is touched after the owner's hook returns. */
static void on_session_hold(void *arg, smtp_session_t *s, const size_t *accepted, size_t n)
{
    deliver_t *d = arg;
    size_t *idx = xcalloc(n ? n : 1, sizeof(*idx));
    d->nheld = 0;
    for (size_t i = 0; i < n; i++) {
        if (accepted[i] >= d->nopen)
            continue; /* cannot happen: the session's recipients are open_rcpts */
        idx[d->nheld] = d->open_idx[accepted[i]];
        d->held_pos[d->nheld++] = accepted[i];
    }
    d->hold = ++d->hold_seq;
    d->before_body(d->before_body_arg, d, d->hold, idx, d->nheld);
    free(idx);
}

/* The held transaction is over: what became of each of its recipients. */
static void report_held(deliver_t *d, const smtp_session_result_t *sr)
{
    size_t n = d->nheld;
    d->nheld = 0;
    if (n == 0 || d->after_txn == NULL)
        return;
    size_t *idx = xcalloc(n, sizeof(*idx));
    deliver_txn_state_t *st = xcalloc(n, sizeof(*st));
    for (size_t i = 0; i < n; i++) {
        size_t j = d->held_pos[i];
        const smtp_rcpt_reply_t *rr = j < sr->nrcpts ? &sr->rcpts[j] : NULL;
        idx[i] = d->open_idx[j];
        if (rr && rr->final && rr->code >= 200 && rr->code < 300)
            st[i] = DELIVER_TXN_DELIVERED;
        else if (rr && !rr->final && sr->dot_sent)
            st[i] = DELIVER_TXN_MAYBE_SENT;
        else
            st[i] = DELIVER_TXN_NOT_SENT;
    }
    d->after_txn(d->before_body_arg, d, idx, st, n);
    free(idx);
    free(st);
}

void deliver_resume(deliver_t *d, uint64_t hold)
{
    if (d == NULL || hold == 0 || hold != d->hold || d->sess == NULL)
        return;
    d->hold = 0;
    smtp_session_resume(d->sess);
}

void deliver_abort(deliver_t *d, uint64_t hold, const char *why)
{
    if (d == NULL || hold == 0 || hold != d->hold || d->sess == NULL)
        return;
    d->hold = 0;
    smtp_session_abort(d->sess, why);
}

static const char *session_helo(const deliver_t *d)
{
    return d->source_helo[0] ? d->source_helo : d->ctx->helo_name;
}

static smtp_session_params_t session_params(deliver_t *d)
{
    const deliver_ctx_t *ctx = d->ctx;
    const deliver_candidate_t *c = &d->cands[d->cur];
    smtp_session_params_t p = {
        .helo_name = session_helo(d),
        .tls = d->policy,
        .tls_verify_ctx = ctx->cfg.tls_verify_ctx,
        .tls_noverify_ctx = ctx->cfg.tls_noverify_ctx,
        .timeouts = d->timeouts,
        .mx_host = c->host,
        .addr = (const struct sockaddr *)&c->addr,
        .addrlen = c->addrlen,
        .mail_from = d->mail_from,
        .rcpts = d->open_rcpts,
        .nrcpts = d->nopen,
        .data = d->data,
        .len = d->len,
        .segs = d->segs,
        .nsegs = d->nsegs,
        .message_size = d->message_size,
        .log_id = d->log_id,
        .trace_id = d->trace_id,
        .log_ref = d->log_ref,
        /* pooled, or more recipients than one transaction takes: keep the
         * connection for what comes next; otherwise QUIT right away */
        .keep_open = !smtp_pool_disabled(ctx->pool) || d->nopen < open_left(d),
        .no_pipelining = ctx->cfg.no_pipelining,
        .need = d->need,
        .auth_user = ctx->auth_user,
        .auth_pass = ctx->auth_pass,
        .tls_cache = ctx->tls_cache,
        .before_body = d->before_body ? on_session_hold : NULL,
        .before_body_arg = d,
        .bind_addr = d->has_source ? (const struct sockaddr *)&d->source_addr : NULL,
        .bind_addrlen = d->has_source ? d->source_addrlen : 0,
        .source_name = d->has_source ? d->source_name : NULL,
        /* a pooled connection runs each transaction under the deadlines
         * of the request it carries */
        .txn_timeouts = &d->timeouts,
    };
    return p;
}

/* Run the next transaction on s (IDLE, ours). */
static void run_on(deliver_t *d, smtp_session_t *s);
static void use_candidate(deliver_t *d);

static void on_pool(void *arg, int how, smtp_session_t *s)
{
    deliver_t *d = arg;
    if (how == 0) {
        /* the context is going away */
        d->last_status = SMTP_ENETWORK;
        util_copy_text(d->last_error, sizeof(d->last_error), "delivery context shut down");
        finish(d);
        return;
    }
    d->holding = 1;
    if (how == SMTP_POOL_REUSE) {
        run_on(d, s);
        return;
    }
    route_state_t down;
    if (route_down(d->ctx, &d->cands[d->cur], &down)) {
        /* it went down while we waited for the slot: no attempt made */
        d->holding = 0;
        smtp_pool_release(d->ctx->pool, d->key, NULL);
        skip_down(d, &d->cands[d->cur], &down);
        d->res.attempts_made--;
        d->tried_any = d->res.attempts_made > 0;
        d->last_status = down.cause;
        util_copy_text(d->last_error, sizeof(d->last_error), down.why);
        try_next(d);
        return;
    }
    smtp_session_params_t p = session_params(d);
    d->res.connections++;
    d->sess = smtp_session_start(d->loop, &p, on_session, d);
}

static void run_on(deliver_t *d, smtp_session_t *s)
{
    smtp_session_params_t p = session_params(d);
    d->sess = s;
    if (smtp_session_next(s, &p, on_session, d) < 0) {
        /* not IDLE after all: give the slot back, ask again */
        drop_session(d, s);
        use_candidate(d);
    }
}

/* Get a connection to the current candidate for the open recipients. */
static void use_candidate(deliver_t *d)
{
    const deliver_candidate_t *c = &d->cands[d->cur];
    char addr[64];
    if (collect_open(d) == 0) {
        finish(d);
        return;
    }
    smtp_addr_text((const struct sockaddr *)&c->addr, addr, sizeof(addr));
    unsigned port = util_sockaddr_port((const struct sockaddr *)&c->addr);
    /* sessions are kept per source and destination */
    snprintf(d->key, sizeof(d->key), "%s|%u|%d|%s|%s|%s%s%s", addr, port, (int)d->policy, c->host,
             session_helo(d), d->ctx->auth_user ? d->ctx->auth_user : "", d->has_source ? "|src=" : "",
             d->has_source ? d->source_name : "");
    smtp_session_t *s = NULL;
    int how = smtp_pool_acquire(d->ctx->pool, d->key, &s, &d->wait, on_pool, d);
    if (how == SMTP_POOL_WAIT)
        return;
    on_pool(d, how, s);
}

/* Start on the next candidate, or finish when none is left. */
static void try_next(deliver_t *d)
{
    unsigned max_mx = d->ctx->cfg.max_mx ? d->ctx->cfg.max_mx : 5;
    while (d->next < d->ncands) {
        const deliver_candidate_t *c = &d->cands[d->next];
        if (d->has_source && c->addr.ss_family != d->source_addr.ss_family) {
            /* an IPv4 source cannot reach an IPv6 MX, nor the reverse */
            if (d->skipped_family++ == 0)
                d->skipped_af = c->addr.ss_family;
            d->next++;
            continue;
        }
        route_state_t down;
        if (route_down(d->ctx, c, &down)) {
            d->next++;
            skip_down(d, c, &down);
            continue;
        }
        int new_host = d->counted_host == NULL || strcmp(c->host, d->counted_host) != 0;
        if (new_host) {
            if (d->hosts_tried >= max_mx)
                break;
            d->hosts_tried++;
            d->counted_host = c->host;
        }
        d->cur = d->next++;
        if (collect_open(d) == 0)
            break;
        if (d->tls_fell_back) { /* the plaintext retry was for the last candidate only */
            d->tls_fell_back = 0;
            d->policy = SMTP_TLS_OPPORTUNISTIC;
        }
        util_copy_text(d->res.mx_host, sizeof(d->res.mx_host), c->host);
        smtp_addr_text((const struct sockaddr *)&c->addr, d->res.mx_addr, sizeof(d->res.mx_addr));
        d->res.tls_version = NULL;
        d->res.tls_cipher = NULL;
        d->res.attempts_made++;
        d->tried_any = 1;
        use_candidate(d);
        return;
    }
    finish(d);
}

static void on_session(void *arg, smtp_session_t *s, const smtp_session_result_t *sr)
{
    deliver_t *d = arg;
    size_t still_open = 0, progress = 0;

    d->hold = 0; /* a transaction held until now is over: a late resume is void */
    report_held(d, sr);
    d->res.tls_version = sr->tls_version;
    d->res.tls_cipher = sr->tls_cipher;
    d->res.features = sr->features;
    if (!sr->reused && sr->tls_version) {
        if (sr->tls_resumed) {
            d->res.tls_resumed++;
            d->ctx->tls_resumed++;
        } else {
            d->res.tls_full++;
            d->ctx->tls_full++;
        }
    }
    route_learn(d, sr);
    int refused_new = !sr->reused && sr->status == SMTP_EREJECTED && sr->state == SMTP_STATE_GREETING &&
                      sr->has_reply && sr->reply.code >= 400 && sr->reply.code < 500;
    if (refused_new && d->holding && d->lost_retries < 8 && smtp_pool_refused(d->ctx->pool, d->key)) {
        /* "421 too many connections" while this worker has others open
         * there: the server limits connections, not messages. The pool now
         * caps the destination at those; wait for one of them instead of
         * deferring the message */
        d->lost_retries++;
        metrics_inc(MET_SMTP_DEST_CAPPED, 1);
        log_debug("deliver", "refused_wait", "%s mx=%s code=%d", DELIVER_MSG(d), LOG_Q(d->res.mx_host),
                  sr->reply.code);
        drop_session(d, NULL);
        smtp_session_free(s);
        use_candidate(d);
        return;
    }
    int lost_idle = sr->reused && sr->txn_replies == 0 && !sr->dot_sent &&
                    (sr->status == SMTP_ENETWORK ||
                     (sr->status == SMTP_EREJECTED && sr->has_reply && sr->reply.code == 421));
    if (lost_idle && d->lost_retries < 8) {
        /* the server had closed the pooled connection: no answer was lost,
         * no attempt spent; the same candidate again on a fresh one */
        d->lost_retries++;
        log_debug("deliver", "pooled_lost", "%s mx=%s error=%s", DELIVER_MSG(d), LOG_Q(d->res.mx_host),
                  LOG_Q(sr->error));
        drop_session(d, s);
        use_candidate(d);
        return;
    }
    /* opportunistic TLS whose handshake failed: the server offered
     * STARTTLS, but its TLS does not work with us. As Postfix does for
     * "may", the same address once more in plaintext; never under
     * required or verify, whose sessions end here as tls */
    if (sr->status == SMTP_ETLS && sr->state == SMTP_STATE_TLS_HANDSHAKE && d->policy == SMTP_TLS_OPPORTUNISTIC &&
        !sr->dot_sent && !d->tls_fell_back) {
        d->tls_fell_back = 1;
        d->policy = SMTP_TLS_NONE;
        metrics_inc(MET_SMTP_TLS_FALLBACKS, 1);
        log_info("deliver", "tls_fallback", "%s mx=%s error=%s", DELIVER_MSG(d), LOG_Q(d->res.mx_host),
                 LOG_Q(sr->error));
        drop_session(d, NULL);
        smtp_session_free(s);
        use_candidate(d);
        return;
    }
    if (sr->reused)
        d->res.reused++;
    if (sr->txn_replies > 0 || sr->status == SMTP_OK) {
        d->res.transactions++;
        d->ctx->transactions++;
    }
    for (size_t j = 0; j < sr->nrcpts && j < d->nopen; j++) {
        const smtp_rcpt_reply_t *rr = &sr->rcpts[j];
        if (rr->final) {
            settle(d, d->open_idx[j], rr->code, rr->enh, rr->text);
            progress++;
        } else {
            still_open++;
            if (rr->accepted && sr->dot_sent)
                d->results[d->open_idx[j]].maybe_sent = 1;
        }
    }
    d->last_status = sr->status;
    d->last_has_reply = sr->has_reply;
    d->last_reply = sr->reply;
    if (sr->status == SMTP_EREJECTED && sr->has_reply) {
        d->spoke = 1;
        d->spoke_reply = sr->reply;
    }
    util_copy_text(d->last_error, sizeof(d->last_error), sr->error);

    size_t left = 0;
    for (size_t i = 0; i < d->nrcpts; i++)
        left += !d->settled[i];

    if (sr->status == SMTP_OK && left > 0) {
        if (progress == 0) {
            /* a transaction that settled nobody ("452 too many recipients"
             * for the first one): their own replies stand, try later */
            for (size_t j = 0; j < sr->nrcpts && j < d->nopen; j++)
                if (!d->settled[d->open_idx[j]] && sr->rcpts[j].code)
                    settle(d, d->open_idx[j], sr->rcpts[j].code, sr->rcpts[j].enh, sr->rcpts[j].text);
            drop_session(d, sr->reusable ? s : NULL);
            if (!sr->reusable)
                smtp_session_free(s);
            finish(d);
            return;
        }
        /* split transactions: the next batch of recipients */
        if (sr->reusable) {
            collect_open(d);
            run_on(d, s); /* sr is invalid from here */
            return;
        }
        drop_session(d, NULL);
        smtp_session_free(s);
        use_candidate(d);
        return;
    }
    if (sr->reusable) {
        drop_session(d, s);
    } else {
        drop_session(d, NULL);
        smtp_session_free(s); /* deferred by the session until its callback returns */
    }
    if (sr->status != SMTP_OK && sr->status != SMTP_EABORTED && !sr->dot_sent && still_open > 0)
        try_next(d); /* an abandoned transaction ends the attempt: its owner decided */
    else
        finish(d);
}

/* The request's egress source and per-request knobs, copied into d. */
static void request_shaping(deliver_t *d, const deliver_request_t *req)
{
    const deliver_source_t *src = req->source;
    d->timeouts = d->ctx->timeouts;
    if (req->connect_timeout_ms)
        d->timeouts.connect_ms = req->connect_timeout_ms;
    if (req->command_timeout_ms) {
        /* every command reply but the end of data's (data_done_ms) */
        unsigned ms = req->command_timeout_ms;
        d->timeouts.greeting_ms = d->timeouts.helo_ms = d->timeouts.starttls_ms = ms;
        d->timeouts.mail_ms = d->timeouts.rcpt_ms = d->timeouts.data_init_ms = ms;
        d->timeouts.rset_ms = d->timeouts.quit_ms = ms;
    }
    d->max_msgs = req->max_msgs_per_conn;
    if (src == NULL || src->addr == NULL || src->addrlen == 0 || src->addrlen > sizeof(d->source_addr))
        return;
    d->has_source = 1;
    util_copy_text(d->source_name, sizeof(d->source_name), src->name ? src->name : "");
    memcpy(&d->source_addr, src->addr, src->addrlen);
    d->source_addrlen = src->addrlen;
    util_sockaddr_set_port((struct sockaddr *)&d->source_addr, 0);
    if (src->helo && src->helo[0])
        util_copy_text(d->source_helo, sizeof(d->source_helo), src->helo);
    util_copy_text(d->res.source_name, sizeof(d->res.source_name), d->source_name);
    if (src->addr_text && src->addr_text[0])
        util_copy_text(d->res.source_addr, sizeof(d->res.source_addr), src->addr_text);
    else
        smtp_addr_text((const struct sockaddr *)&d->source_addr, d->res.source_addr, sizeof(d->res.source_addr));
}

int egress_check_bind(const struct sockaddr *src, socklen_t srclen, char *err, size_t errlen)
{
    int fd = socket(src->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "source address cannot be bound: socket: %s", strerror(errno));
        return -1;
    }
    int rc = stream_bind_source(fd, src, srclen, err, errlen);
    close(fd);
    return rc;
}

static deliver_t *attempt_new(deliver_ctx_t *ctx, int own, const deliver_request_t *req, deliver_cb cb,
                              void *arg)
{
    deliver_t *d = xcalloc(1, sizeof(*d));
    d->loop = ctx->loop;
    d->ctx = ctx;
    d->own_ctx = own;
    d->cb = cb;
    d->arg = arg;
    d->policy = deliver_tls_map_lookup(&ctx->tls_map, ctx->cfg.tls, req->domain);
    if (DELIVER_TLS_OVERRIDDEN(req->tls_override) >= 0 && DELIVER_TLS_OVERRIDDEN(req->tls_override) <= SMTP_TLS_VERIFY)
        d->policy = (smtp_tls_policy_t)DELIVER_TLS_OVERRIDDEN(req->tls_override);
    d->res.tls_policy = d->policy;
    request_shaping(d, req);
    d->mail_from = xstrdup(req->mail_from ? req->mail_from : "");
    d->nrcpts = req->nrcpts;
    d->rcpts = xcalloc(req->nrcpts ? req->nrcpts : 1, sizeof(*d->rcpts));
    for (size_t i = 0; i < req->nrcpts; i++)
        d->rcpts[i] = xstrdup(req->rcpts[i] ? req->rcpts[i] : "");
    d->data = req->data;
    d->len = req->len;
    d->segs = req->segs;
    d->nsegs = req->nsegs;
    d->message_size = req->message_size;
    d->need = req->need;
    d->before_body = req->before_body;
    d->after_txn = req->before_body ? req->after_txn : NULL;
    d->before_body_arg = req->before_body_arg;
    d->log_id = req->log_id ? xstrdup(req->log_id) : NULL;
    d->trace_id = req->trace_id ? xstrdup(req->trace_id) : NULL;
    if (req->log) {
        char ref[LOG_MSGCTX_MAX];
        d->log_ref = xstrdup(log_msgctx(req->log, ref, sizeof(ref)));
    }
    d->site_tag = req->site_tag ? xstrdup(req->site_tag) : NULL;
    const deliver_candidate_t *src = req->candidates;
    size_t nsrc = req->ncandidates;
    if (ctx->cfg.nrelay) { /* smarthost: the MX list does not matter */
        src = ctx->relay;
        nsrc = ctx->cfg.nrelay;
    }
    d->ncands = nsrc;
    d->cands = xcalloc(nsrc ? nsrc : 1, sizeof(*d->cands));
    if (nsrc)
        memcpy(d->cands, src, nsrc * sizeof(*d->cands));
    unsigned short port = ctx->cfg.port ? ctx->cfg.port : 25;
    for (size_t i = 0; i < d->ncands; i++) {
        deliver_candidate_t *c = &d->cands[i];
        c->host[sizeof(c->host) - 1] = '\0';
        if (util_sockaddr_port((const struct sockaddr *)&c->addr) == 0) /* the caller's port wins */
            util_sockaddr_set_port((struct sockaddr *)&c->addr, port);
        if (c->addrlen == 0)
            c->addrlen = c->addr.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                       : sizeof(struct sockaddr_in);
    }
    size_t n = d->nrcpts ? d->nrcpts : 1;
    d->results = xcalloc(n, sizeof(*d->results));
    d->settled = xcalloc(n, 1);
    d->open_idx = xcalloc(n, sizeof(*d->open_idx));
    d->open_rcpts = xcalloc(n, sizeof(*d->open_rcpts));
    d->held_pos = xcalloc(n, sizeof(*d->held_pos));
    loop_timer_init(&d->done_timer, done_fired, d);

    int from_ok = address_ok(d->mail_from, 1);
    for (size_t i = 0; i < d->nrcpts; i++) {
        d->results[i].rcpt = d->rcpts[i];
        if (!from_ok || !address_ok(d->rcpts[i], 0)) {
            settle(d, i, 0, "", "");
            d->results[i].outcome = OUTCOME_PERMANENT;
            d->results[i].reason = OUTCOME_R_OTHER;
            util_copy_text(d->results[i].text, sizeof(d->results[i].text),
                      from_ok ? "invalid recipient address" : "invalid sender address");
        }
    }
    /* sessions and the pool report asynchronously, finish() through a
     * timer: either way the callback cannot fire before we return */
    try_next(d);
    return d;
}

deliver_t *deliver_ctx_start(deliver_ctx_t *ctx, const deliver_request_t *req, deliver_cb cb, void *arg)
{
    return attempt_new(ctx, 0, req, cb, arg);
}

deliver_t *deliver_start(loop_t *loop, const deliver_config_t *cfg, const deliver_request_t *req,
                         deliver_cb cb, void *arg)
{
    deliver_config_t c = *cfg;
    c.pool.disabled = 1;
    c.tls_cache_size = 1;
    return attempt_new(deliver_ctx_new(loop, &c), 1, req, cb, arg);
}

void deliver_cancel(deliver_t *d)
{
    if (d == NULL || d->in_cb)
        return;
    release(d);
}
deliver_candidate_t *deliver_candidates_from_mx(const dns_mx_result_t *mx, unsigned max_mx, size_t *n)
{
    size_t total = 0, hosts;
    *n = 0;
    if (mx == NULL || mx->status != DNS_OK || mx->nhosts == 0)
        return NULL;
    if (max_mx == 0)
        max_mx = 5;
    hosts = mx->nhosts < max_mx ? mx->nhosts : max_mx;
    for (size_t h = 0; h < hosts; h++)
        total += mx->hosts[h].naddrs;
    if (total == 0)
        return NULL;
    deliver_candidate_t *c = xcalloc(total, sizeof(*c));
    size_t k = 0;
    for (size_t h = 0; h < hosts; h++) {
        const dns_mx_host_t *mh = &mx->hosts[h];
        for (size_t a = 0; a < mh->naddrs; a++) {
            util_copy_text(c[k].host, sizeof(c[k].host), mh->name ? mh->name : "");
            c[k].pref = mh->pref;
            c[k].addr = mh->addrs[a];
            c[k].addrlen = mh->addrs[a].ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                              : sizeof(struct sockaddr_in);
            k++;
        }
    }
    *n = k;
    return c;
}

/*
 * deliverer/deliver.h - one delivery attempt of one message to the
 * recipients of one domain, over that domain's MX candidates.
 *
 * The attempt walks the candidates in order (one SMTP session each, see
 * session.h) until a transaction completes or no candidate is left:
 *   - next candidate after: connect failure, 421, greeting/EHLO/HELO
 *     refusal, TLS failure (incl. STARTTLS missing under REQUIRED/VERIFY),
 *     timeout, lost connection or protocol error, as long as the final
 *     dot has not been written (after that the server may have taken the
 *     message: moving on could deliver it twice);
 *   - recipients that already got their final answer (a RCPT refusal) are
 *     not offered to the next candidate;
 *   - a completed transaction ends the attempt, whatever the replies were.
 * Recipients left without a final answer are transient, tagged by why the
 * last session ended (network, timeout, tls, protocol; dns when there was
 * no candidate; a server refusal keeps its code and tag but stays
 * transient, as Postfix does after skipping every refusing MX).
 *
 *
 * Engine: attempts run on a per-worker deliver_ctx_t holding the
 * session pool (pool.h) and the TLS session cache. Sessions are reused
 * across messages of the same destination; recipients beyond max_rcpts
 * are split over several transactions, on the same connection when it
 * can be kept; a pooled connection found dead before it answered anything
 * is replaced by a fresh one to the same candidate without counting an
 * attempt. The TLS policy comes from the per-domain map (request.domain)
 * or the default; relay mode replaces the MX list by the smarthost and
 * authenticates (only inside TLS).
 *
 * Hold before the final dot (request.before_body, optional): every
 * transaction of the attempt (split recipients, another MX, a fresh
 * connection after a dead pooled one) calls it once, after the server's
 * 354, with the recipients it accepted at RCPT; that transaction's body
 * goes out at once but its final dot waits until the owner calls
 * deliver_resume() (or deliver_abort()). The owner records what it must
 * before the dot (the ledger's "sending"), and request.after_txn tells
 * it, as soon as that transaction is over, what became of each of those
 * recipients (the ledger's "done").
 *
 * Thread-safety: none; use from the loop's thread only.
 */
#ifndef MP_DELIVERER_DELIVER_H
#define MP_DELIVERER_DELIVER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <openssl/ssl.h>

#include "core/log.h"
#include "core/loop.h"
#include "deliverer/outcome.h"
#include "deliverer/pool.h"
#include "deliverer/session.h" /* smtp_tls_policy_t, smtp_timeouts_t */
#include "dns/resolver.h"      /* dns_mx_result_t */

typedef struct deliver_config {
    unsigned short    port;              /* used for candidates whose address has port 0; 0 means 25 */
    const char       *helo_name;         /* copied; NULL or "" sends "localhost" */
    smtp_tls_policy_t tls;
    SSL_CTX          *tls_verify_ctx;    /* SSL_VERIFY_PEER with the CA file; needed by VERIFY */
    SSL_CTX          *tls_noverify_ctx;  /* needed by OPPORTUNISTIC (else plaintext) and REQUIRED */
    unsigned          max_mx;            /* distinct MX hosts tried per attempt; 0 means 5 */
    unsigned          timeout_scale_pct; /* RFC 5321 timeouts scaled: 100 (or 0) = RFC values */
    const smtp_timeouts_t *timeouts;     /* explicit per-state timeouts (ms), copied; when
                                          * non-NULL it replaces the scaled defaults entirely */
    /* --- engine; zero values give the defaults in brackets --- */
    unsigned          max_rcpts;         /* recipients per transaction [100]; more are split over
                                          * transactions, each recipient keeps its own outcome */
    const char       *tls_policy_map;    /* per destination domain, overrides tls: "example.com:verify,
                                          * .example.org:required, legacy.test:none" (".d" also matches
                                          * subdomains); parsed by deliver_ctx_new (deliver_tls_map_t),
                                          * entries that do not parse left out; NULL or "" none */
    int               no_pipelining;     /* lock-step even when the server offers PIPELINING */
    smtp_pool_limits_t pool;             /* see pool.h; pool.disabled closes after each message */
    /* relay / smarthost mode: every message goes to these candidates (resolved once by
     * deliver_relay_candidates()) instead of the request's MX list */
    const struct deliver_candidate *relay; /* copied by deliver_ctx_new */
    size_t            nrelay;
    const char       *auth_user;         /* AUTH PLAIN/LOGIN, only ever sent inside TLS; NULL none */
    const char       *auth_pass;
    unsigned          tls_cache_size;    /* TLS sessions kept for resumption [1024]; deliver_ctx only */
    /* route penalties (deliver_ctx only): an address whose connection failed before or at the
     * greeting (refused, unreachable, timed out) is skipped by later attempts for
     * route_penalty_ms, doubled per failure in a row up to route_penalty_max_ms [300000]; any
     * session that gets past the greeting clears it. An attempt whose candidates are all down
     * ends at once, transient, with the cause that made the first of them down (its reason
     * tag, network or timeout, and its words, a timeout with how long it waited). 0 disables (the default of this struct; mailpumpd's
     * [smtp] route_penalty is 1 s: short enough that fast retries
     * outlive a blip, doubling to minutes for an address that stays dead). */
    unsigned          route_penalty_ms;
    unsigned          route_penalty_max_ms;
    struct routes    *routes;            /* the table to share (mailpumpd: one for all workers, routes.h);
                                          * NULL: each deliver_ctx keeps its own */
} deliver_config_t;

typedef struct deliver_candidate {
    char                    host[256]; /* MX host name: SNI, name verified under VERIFY, logs */
    unsigned                pref;
    struct sockaddr_storage addr;      /* port 0: deliver_config_t.port is used */
    socklen_t               addrlen;   /* 0: derived from the address family */
} deliver_candidate_t;

typedef struct deliver_rcpt_result {
    const char *rcpt;      /* deliver's copy of the request's string, valid during the callback */
    outcome_t   outcome;
    outcome_reason_t reason;
    int         code;      /* deciding reply code, 0 when none (network, timeout, ...) */
    char        enh[16];
    char        text[512]; /* reply text, or what went wrong */
    int         maybe_sent;/* accepted, and its transaction's final dot went out without a
                            * reply (RFC 1047): the server may have the message although the
                            * outcome is not "delivered" */
} deliver_rcpt_result_t;

typedef struct deliver_result {
    deliver_rcpt_result_t *rcpts;       /* same order as the request */
    size_t                 nrcpts;
    char                   mx_host[256]; /* where the transaction took place (or was last tried); "" if none */
    char                   mx_addr[64];  /* numeric address, no port */
    const char            *tls_version;  /* of that last session; NULL if plaintext */
    const char            *tls_cipher;
    unsigned               attempts_made;/* candidates tried (new or pooled connections); an idle
                                          * pooled connection found closed does not count */
    unsigned               connections;  /* new TCP connections opened */
    unsigned               reused;       /* transactions run on pooled connections */
    unsigned               transactions; /* MAIL transactions (recipient splitting) */
    unsigned               tls_full;     /* full TLS handshakes done */
    unsigned               tls_resumed;  /* abbreviated (resumed) TLS handshakes */
    smtp_tls_policy_t      tls_policy;   /* the policy applied to this domain */
    smtp_features_t        features;     /* EHLO of the last session (SIZE limit, 8BITMIME,
                                          * SMTPUTF8, PIPELINING, ...); zero if none answered */
    char                   source_name[65]; /* the request's egress source; "" without one */
    char                   source_addr[64]; /* its numeric address; "" without one */
} deliver_result_t;

typedef struct deliver deliver_t;

/* A transaction of d has its 354: accepted[0..n-1] (n >= 1) are the
 * positions in the request's rcpts of the recipients the server took;
 * the array is valid during the call. The body is on its way; its final
 * dot goes once deliver_resume(d, hold) is called, and
 * deliver_abort(d, hold, why) abandons the transaction instead (from
 * inside the hook or later). Never cancel d from inside. */
typedef void (*deliver_hold_cb)(void *arg, deliver_t *d, uint64_t hold, const size_t *accepted, size_t n);

/* What became of one recipient of a held transaction, once it is over. */
typedef enum {
    DELIVER_TXN_NOT_SENT = 0, /* no final dot went, or the server refused the message: nothing delivered */
    DELIVER_TXN_DELIVERED,    /* 2xx to the final dot */
    DELIVER_TXN_MAYBE_SENT,   /* the dot went out and no reply came (RFC 1047) */
} deliver_txn_state_t;

/* A held transaction of d is over: for each of the recipients its hook
 * named (accepted[i], positions in the request's rcpts), what became of
 * it. Arrays valid during the call. Called before d's own callback, from
 * inside the session's; never cancel d from inside. */
typedef void (*deliver_txn_cb)(void *arg, deliver_t *d, const size_t *accepted, const deliver_txn_state_t *st,
                               size_t n);

/*
 * An egress source: a local address (and its EHLO name) the connections
 * of a request go out from, like a KumoMTA egress source or a PowerMTA
 * virtual MTA. Every connection binds it before connecting
 * (stream_connect_from); only MX addresses of its family are tried; the
 * pool keeps sessions per source and destination, and the TLS session
 * cache per source too. Route penalties stay per MX address, shared by
 * every source, and a source that cannot be bound never marks an MX down
 * (that failure is SMTP_ELOCAL, ours).
 */
typedef struct deliver_source {
    const char            *name;      /* for logs, pool keys, results (at most 64 bytes kept) */
    const struct sockaddr *addr;      /* port 0 */
    socklen_t              addrlen;
    const char            *addr_text; /* numeric */
    const char            *helo;      /* NULL: the deliver_config helo_name */
} deliver_source_t;

/* mailpumpd, at start-up, for every configured source: create a TCP
 * socket, bind src with port 0 (no connect), close it. 0, or -1 with
 * "source address 127.0.0.9 cannot be bound: Cannot assign requested
 * address" in err. Blocking-free but meant for start-up. */
int egress_check_bind(const struct sockaddr *src, socklen_t srclen, char *err, size_t errlen);

typedef struct deliver_request {
    const char        *mail_from;    /* "" for the null sender; copied */
    const char *const *rcpts;        /* copied */
    size_t             nrcpts;
    const char        *data;         /* dot-stuffed payload (mime_dotstuff()); NOT copied: keep it
                                      * alive until the callback */
    size_t             len;
    const mime_seg_t  *segs;         /* or (nsegs > 0) the payload as mime_wire_segments(); the
                                      * array and what it points to: NOT copied, the same rule */
    size_t             nsegs;
    size_t             message_size; /* for SIZE=; 0: len */
    const deliver_candidate_t *candidates; /* sorted; copied by deliver_start */
    size_t             ncandidates;
    const char        *log_id;       /* message id for log lines; copied, may be NULL */
    const char        *trace_id;     /* the message's trace id for log lines; copied, may be NULL */
    const log_msgctx_t *log;         /* or the message's fields for log lines (tenant, campaign, pool
                                      * too), formatted once by deliver_start; may be NULL */
    const char        *domain;       /* recipient domain: picks the TLS policy; NULL: default */
    unsigned           need;         /* SMTP_NEED_8BITMIME / SMTP_NEED_SMTPUTF8 */
    deliver_hold_cb    before_body;  /* NULL: each body follows its 354 at once */
    deliver_txn_cb     after_txn;    /* with before_body: each held transaction's end; may be NULL */
    void              *before_body_arg;
    /* --- egress and shaping; zero / NULL keeps the context's behaviour --- */
    const deliver_source_t *source;  /* NULL: the host's default address; copied. With one, every
                                      * connection binds source->addr and says EHLO source->helo
                                      * (else the config's helo_name); candidates of another address
                                      * family are skipped, and when none is left the attempt ends
                                      * transient, reason dns ("no MX address of family IPv4 for
                                      * source mta1 (IPv4 ...)...") */
    int                tls_override; /* 0 or -1: none (the per-domain map, else the default);
                                      * else DELIVER_TLS_OVERRIDE(policy), which replaces both.
                                      * Not the bare smtp_tls_policy_t: SMTP_TLS_NONE is 0, what
                                      * every zeroed request carries */
    unsigned           max_msgs_per_conn;  /* transactions per pooled connection for this request's
                                            * destination; 0: the pool's max_msgs_per_session. A
                                            * session released having carried this many is QUIT */
    unsigned           connect_timeout_ms; /* 0: the context's connect timeout */
    unsigned           command_timeout_ms; /* 0: the context's; else the deadline of every command
                                            * reply (greeting, EHLO/HELO, STARTTLS, AUTH, MAIL, RCPT,
                                            * DATA, RSET, QUIT) except the end of data's, which keeps
                                            * data_done_ms (10 min); the body's inactivity timeout
                                            * and the transaction deadline are left as they are */
    const char        *site_tag;     /* the destination site this request counts against (the
                                      * leg's site); copied. Every session the request opens or
                                      * reuses is released to the pool with it, so
                                      * deliver_ctx_idle_tagged() / deliver_ctx_trim() find its idle
                                      * sessions; a reused session takes this request's tag. NULL:
                                      * untagged */
} deliver_request_t;

/* deliver_request_t.tls_override for policy p, and back (-1: none). */
#define DELIVER_TLS_OVERRIDE(p) ((int)(p) + 1)
#define DELIVER_TLS_OVERRIDDEN(v) ((v) > 0 ? (int)(v) - 1 : -1)

/* res is valid only during the call. */
typedef void (*deliver_cb)(void *arg, const deliver_result_t *res);

/*
 * Per-worker delivery context: the session pool, the TLS session cache and
 * the parsed configuration. cfg (and what it points to) is copied except
 * the SSL_CTXs, which must outlive the context. deliver_ctx_free() first
 * needs every deliver_t of the context finished or cancelled; it QUITs the
 * idle sessions (best effort) and frees them.
 */
typedef struct deliver_ctx deliver_ctx_t;
deliver_ctx_t *deliver_ctx_new(loop_t *loop, const deliver_config_t *cfg);
void           deliver_ctx_free(deliver_ctx_t *ctx);

typedef struct deliver_stats {
    smtp_pool_stats_t pool;
    uint64_t          tls_full;     /* full handshakes since the context was created */
    uint64_t          tls_resumed;  /* resumed handshakes */
    uint64_t          transactions;
    size_t            tls_cached;   /* TLS sessions kept for resumption */
} deliver_stats_t;
void deliver_ctx_stats(const deliver_ctx_t *ctx, deliver_stats_t *st);

/* The context's idle sessions tagged tag (request.site_tag); 0 for NULL. */
size_t deliver_ctx_idle_tagged(deliver_ctx_t *ctx, const char *tag);
/* QUIT the idle sessions tagged tag beyond keep, the longest idle first
 * (smtp_pool_trim_tag()); busy ones are left alone. Returns how many. */
size_t deliver_ctx_trim(deliver_ctx_t *ctx, const char *tag, size_t keep);

/* Start an attempt on the context's pool (same contract as deliver_start). */
deliver_t *deliver_ctx_start(deliver_ctx_t *ctx, const deliver_request_t *req, deliver_cb cb, void *arg);

/* One "domain:value" entry of a comma-separated per-domain map
 * ([smtp] tls_policy, rate_limits), blanks around each part trimmed. */
typedef struct deliver_map_entry {
    const char *entry, *name, *value; /* into the map, not terminated */
    size_t      elen, nlen, vlen;
    int         has_value;            /* there was a ':' */
} deliver_map_entry_t;
/* The next entry at *m (NULL: an empty map), moving *m past it: 1, or 0
 * at the end. */
int deliver_map_next(const char **m, deliver_map_entry_t *e);
/* Why e is not a valid entry, written into err; returns -1, or 0 when it is. */
typedef int (*deliver_map_check_fn)(const deliver_map_entry_t *e, char *err, size_t errlen);
/*
 * The entries of a map key and of its file form ([smtp] tls_policy and
 * tls_policy_file, rate_limits and rate_limits_file): inline_map's entries
 * first, then one "domain:value" entry per line of path (NULL or "": no
 * file), blank lines and lines whose first non-blank character is '#'
 * ignored. Each file entry is checked with check. *out gets them all in
 * that order, ", "-separated (malloc'd, "" when none), so the first
 * matching entry is an inline one when one matches. Reads the file now
 * (blocking: start-up only). Returns 0, or -1 with "file_key: path:line:
 * reason" (or "file_key: path: error") in err and *out NULL.
 */
int deliver_map_load(const char *file_key, const char *inline_map, const char *path, deliver_map_check_fn check,
                     char **out, char *err, size_t errlen);
/* 1 when domain matches pattern (plen bytes): the same name, or for
 * ".example.org" that domain or one of its subdomains; case-insensitive.
 * The matching of [smtp] tls_policy and rate_limits entries. */
int deliver_domain_matches(const char *pattern, size_t plen, const char *domain);
/* Parse "none|opportunistic|required|verify" (the names of [smtp] tls);
 * -1 when unknown. */
int deliver_tls_policy_parse(const char *s);
/* An [smtp] tls value (mp_smtp_tls_t, as the shaping rules hold it) as our policy. */
smtp_tls_policy_t deliver_tls_policy_of(int t);

/* A per-domain TLS policy map ([smtp] tls_policy) parsed once: its
 * (pattern, policy) entries in the map's order, the first match wins. */
typedef struct deliver_tls_rule {
    const char       *pattern; /* "example.com" or ".example.org" (also its subdomains), plen bytes */
    size_t            plen;
    smtp_tls_policy_t policy;
} deliver_tls_rule_t;
typedef struct deliver_tls_map {
    char               *text;  /* the map's copy the patterns point into */
    deliver_tls_rule_t *rules;
    size_t              n;
} deliver_tls_map_t;
/* Parse map (NULL or "": no entries) into *out; free it with
 * deliver_tls_map_free() whatever the result. Returns 0, or -1 with the
 * first entry that is not "domain:policy" with a known policy in err;
 * *out then holds the valid entries. */
int deliver_tls_map_parse(const char *map, deliver_tls_map_t *out, char *err, size_t errlen);
/* The policy of the first entry matching domain (deliver_domain_matches),
 * else dflt (also for a NULL or empty domain). No parsing. */
smtp_tls_policy_t deliver_tls_map_lookup(const deliver_tls_map_t *m, smtp_tls_policy_t dflt, const char *domain);
void deliver_tls_map_free(deliver_tls_map_t *m);

/* 0 when name is what EHLO may carry (RFC 5321 section 4.1.3): a host
 * name of LDH labels (no final dot, a last label not all digits) or an
 * address literal, "[192.0.2.1]" or "[IPv6:2001:db8::1]"; else -1 with err
 * ("[smtp] helo_name: ..."). */
int deliver_helo_name_check(const char *name, char *err, size_t errlen);

/* What deliver_config_build() makes for the config it fills to point to:
 * keep it alive as long as that config and every deliver_ctx made from it,
 * then deliver_config_store_free(). */
struct routes;
typedef struct deliver_config_store {
    char                 helo[256]; /* [smtp] helo_name, else this host's name, else "localhost" */
    smtp_timeouts_t      timeouts;
    deliver_candidate_t *relay;     /* [smtp] relay's addresses (malloc'd); NULL: MX delivery */
    char                *tls_policy; /* [smtp] tls_policy, then tls_policy_file's entries (malloc'd) */
    struct routes       *routes;    /* the route penalty table every context shares */
} deliver_config_store_t;

/*
 * The one translation of the [smtp] keys of cfg (core/config.h) into d
 * (zeroed first): port, EHLO name (a configured one checked with
 * deliver_helo_name_check()), default TLS policy and the tls_policy
 * map with tls_policy_file's entries after it (read and checked here,
 * kept in store->tls_policy, parsed by each deliver_ctx_new), max_mx, pipelining,
 * max_rcpts, pool limits, TLS cache size, route penalties (one table,
 * store->routes), per-state and transaction timeouts (the scaled
 * defaults, each non-zero smtp_timeout_<state>_ms overriding its own),
 * the reply-line cap ([smtp] reply_lines_*) and relay + AUTH.
 * verify_ctx and noverify_ctx become d's TLS contexts (not owned). A relay
 * is resolved now (blocking: start-up only). d's strings point into cfg
 * and *store. Returns 0, or -1 with err; either way the caller ends with
 * deliver_config_store_free(store).
 */
struct mp_config;
int deliver_config_build(deliver_config_t *d, const struct mp_config *cfg, SSL_CTX *verify_ctx,
                         SSL_CTX *noverify_ctx, deliver_config_store_t *store, char *err, size_t errlen);
void deliver_config_store_free(deliver_config_store_t *store);

/* Resolve "host[:port]" (blocking getaddrinfo: at start-up only) into
 * relay candidates, every address of the host. Returns 0 and a malloc'd
 * array, or -1 with err. */
int deliver_relay_candidates(const char *hostport, unsigned short default_port, deliver_candidate_t **out,
                             size_t *n, char *err, size_t errlen);

/*
 * Start the attempt. cb fires exactly once, never from inside
 * deliver_start(), unless deliver_cancel() comes first. Recipients or a
 * sender containing control characters or angle brackets (command
 * injection) are refused up front: permanent, reason "other", code 0.
 * Never returns NULL. The deliver_t is released by deliver itself right
 * after cb returns; cb may start, cancel or free other deliveries.
 */
deliver_t *deliver_start(loop_t *loop, const deliver_config_t *cfg, const deliver_request_t *req,
                         deliver_cb cb, void *arg);
/* deliver_start() is the one-shot form kept for callers without a context:
 * a private context with pooling disabled, freed with the attempt. */
/* cb will not fire; the connection is closed. NULL is harmless; so is a
 * call from inside the delivery's own callback (nothing more happens). */
void deliver_cancel(deliver_t *d);

/* Let the transaction held with this hold id send its body. Harmless when
 * that transaction is over (its session timed out or lost the connection
 * while held: the attempt went on without it). Only while d is alive:
 * before its callback fires and before deliver_cancel(). */
void deliver_resume(deliver_t *d, uint64_t hold);
/* Abandon it instead: the connection is closed before the final dot, the
 * attempt ends (no other MX is tried) and its accepted recipients stay
 * transient with why as their text, reason network (the owner, who knows
 * why, may retag them). Same rules as deliver_resume(). */
void deliver_abort(deliver_t *d, uint64_t hold, const char *why);

/*
 * Flatten an MX answer into candidates: every address of a host before the
 * next host, hosts in the result's order, at most max_mx hosts (0 means
 * 5). Ports are left 0. Returns a malloc'd array (caller frees) and its
 * length in *n; NULL and *n = 0 when there is nothing to try.
 */
deliver_candidate_t *deliver_candidates_from_mx(const dns_mx_result_t *mx, unsigned max_mx, size_t *n);

#endif

/*
 * deliverer/policy.h - the egress and shaping policy files: where a
 * message connects from, and how each destination is treated.
 *
 * Two operator-edited files, both optional ([egress] file, [shaping] file;
 * docs/egress-and-shaping.md describes them completely):
 *
 *  - the egress file names the sources (a local address to connect from,
 *    with its own EHLO name, and optionally a warm-up: a daily volume
 *    per destination site that grows day by day, counted fleet-wide by
 *    deliverer/warmup.c), groups them into weighted pools, maps tenants to
 *    pools and names a default pool;
 *  - the shaping file sets limits per MX site ([site google.com]) or per
 *    recipient domain ([domain example.org]), optionally only for one
 *    source or pool ([site google.com source=mta1]), and lists automation
 *    rules: a reply that matches (code, enhanced code, text) suspends,
 *    bounces or throttles the destination for a while.
 *
 * policy_load() reads and validates both at once; every error names the
 * file and line. The result is immutable: all worker threads share it
 * read-only without locks (a compiled regex_t is safe for concurrent
 * regexec). The lookups cost a few hash probes and are NULL-safe (a NULL
 * policy is an empty one).
 */
#ifndef MP_DELIVERER_POLICY_H
#define MP_DELIVERER_POLICY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

typedef struct egress_source {
    char                   *name;
    struct sockaddr_storage addr;          /* port 0 */
    socklen_t               addrlen;
    char                    addr_text[64]; /* numeric, as written canonically */
    char                   *ehlo;          /* NULL: the default */
    const uint32_t         *warmup;        /* messages per destination site per UTC day, day 1 first; NULL none */
    size_t                  nwarmup;       /* 0: no warm-up */
    int64_t                 warmup_start_day; /* day 1, in days since 1970-01-01 (UTC) */
} egress_source_t;

typedef struct egress_pool {
    char             *name;
    size_t            n;
    egress_source_t **sources; /* into the policy's sources */
    unsigned         *weights; /* 1..1000 each */
} egress_pool_t;

typedef struct shaping_params {
    unsigned connection_limit;        /* 0 = not set */
    double   rate_per_s;              /* 0 = not set */
    char     rate_text[32];           /* "300/m" as written, "" if not set */
    unsigned max_msgs_per_connection; /* 0 = not set */
    unsigned connect_timeout_ms;      /* 0 = not set */
    unsigned command_timeout_ms;      /* 0 = not set */
    int      tls;                     /* -1 = not set, else mp_smtp_tls_t value */
    char     rule[160];               /* the sections that applied, most specific last, e.g.
                                       * "site:google.com,site:google.com/source=mta1"; "" none */
} shaping_params_t;

typedef enum {
    POLICY_ACT_SUSPEND = 1, /* park the destination's messages, no attempt spent */
    POLICY_ACT_BOUNCE,      /* end them bounced */
    POLICY_ACT_RATE,        /* lower the rate to rate_per_s */
    POLICY_ACT_CONNECTIONS, /* lower the connection limit to connections */
} policy_action_t;

typedef struct automation_rule {
    char           *name;
    char           *site, *domain, *source; /* NULL = any */
    int             code;                   /* 0 any; 4 or 5 = class; else exact */
    char            enhanced[16];           /* "" any */
    /* compiled regex inside, private */
    policy_action_t action;
    double          rate_per_s;             /* POLICY_ACT_RATE */
    char            rate_text[32];
    unsigned        connections;            /* POLICY_ACT_CONNECTIONS */
    uint64_t        duration_ms;            /* > 0, at most 7 days */
} automation_rule_t;

typedef struct policy policy_t;

/* Either path may be NULL or "" (that part empty). On error returns NULL
 * and err says "path:line: why" (or "path: why" when it cannot be read). */
policy_t *policy_load(const char *egress_path, const char *shaping_path, char *err, size_t errlen);
void      policy_free(policy_t *p);

size_t                 policy_nsources(const policy_t *p);
const egress_source_t *policy_source(const policy_t *p, size_t i); /* file order */
const egress_source_t *policy_source_find(const policy_t *p, const char *name);
const egress_pool_t   *policy_pool_find(const policy_t *p, const char *name);
size_t                 policy_npools(const policy_t *p);
const egress_pool_t   *policy_pool(const policy_t *p, size_t i); /* file order */

/* The pool for a message: its own pool name if set (NULL when it names no
 * configured pool: *unknown = 1), else its tenant's mapping, else
 * [default] pool, else NULL (no egress: host default address). unknown
 * may be NULL; otherwise it is always set (0 or 1). */
const egress_pool_t *policy_pool_for(const policy_t *p, const char *msg_pool, const char *tenant, int *unknown);

/* Merge every matching shaping section into out, least specific first:
 * site, site+pool, site+source, domain, domain+pool, domain+source; a key
 * a later section sets replaces the earlier value. pool/source (and
 * domain/site) may be NULL. Names compare case-insensitively. */
void policy_shaping(const policy_t *p, const char *domain, const char *site, const char *pool, const char *source,
                    shaping_params_t *out);

/* The first automation rule (file order) matching this reply seen for
 * domain/site through source, or NULL. enhanced and text may be NULL (a
 * rule that needs them does not match). */
const automation_rule_t *policy_match_reply(const policy_t *p, const char *domain, const char *site,
                                            const char *source, int code, const char *enhanced, const char *text);

int policy_has_shaping(const policy_t *p); /* any site/domain section or automation */

/* Today's volume limit per site for s at now (Unix ms): 0 = no limit (no
 * warm-up, or past its last day); before warmup_start, day 1's. NULL-safe. */
uint64_t policy_warmup_limit(const egress_source_t *s, uint64_t now_ms);

/* The UTC day of a Unix time in ms, in days since 1970-01-01, and its
 * calendar date as yyyymmdd (20261201). */
int64_t  policy_day_of(uint64_t now_ms);
unsigned policy_day_yyyymmdd(int64_t day);

/* One line for --check-config: "egress: 3 sources, 2 pools, 1 tenant
 * mapping, default pool transactional; shaping: 4 rules, 2 automations". */
void policy_summary(const policy_t *p, char *out, size_t outlen);

#endif

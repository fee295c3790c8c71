/*
 * SUMMARY
 *  deliverer/policy.c - reads, validates and indexes the egress and
 *  shaping files (policy.h; docs/egress-and-shaping.md).
 * DESCRIPTION
 *  Format: an INI dialect with named sections ("[source mta1]", "[site
 *  google.com source=mta1]"), the main configuration's syntax, so an
 *  operator reads, diffs and reviews it like the rest of the
 *  configuration and no parser library is needed. It differs from
 *  core/config.c's reader in three ways, which is why it is its own page
 *  of code rather than a shared one: '=' alone separates key and value
 *  (values hold ':' - "mta1:3", IPv6 addresses - and '=' after the
 *  first - "action = rate=10/m"); '#' as well as ';' starts an inline
 *  comment after a blank (a regex that needs " #" writes "[ ]#"); and an
 *  indented line is a key like any other (keys may be indented under
 *  their section). Blank lines and lines starting with '#' or ';' are
 *  comments, a UTF-8 byte order mark is skipped, lines have no length
 *  limit.
 *
 *  Everything is checked at load: unknown section types and keys, a key
 *  or a section given twice, names, numbers, durations, dates, regexes, and
 *  references (a pool's sources, a tenant's pool, a qualifier's source
 *  or pool when an egress file is loaded), each error as "path:line:
 *  why". Pools and tenants may name what a later section defines: the
 *  references are resolved at the end of the file.
 *
 *  The result is indexed once: hash tables of sources, pools, tenants,
 *  shaping sections (keyed "site:google.com/source=mta1", so a lookup is
 *  at most six probes) and automation rules grouped by site and by
 *  domain, merged in file order with the rules for any destination.
 *  Nothing changes after load, so the workers share it without locks.
 */
#include "deliverer/policy.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <regex.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/config.h"
#include "core/htable.h"
#include "core/util.h"

#define NAME_MAX_LEN   64  /* source, pool, tenant and automation names */
#define DOMAIN_MAX_LEN 253 /* site and domain names */
#define WEIGHT_MAX     1000
#define LIMIT_MAX      1000000u
#define RATE_MAX       1000000ul
#define TIMEOUT_MAX_MS 3600000u           /* connect_timeout, command_timeout */
#define DURATION_MAX_MS (7ull * 86400000) /* automation duration */
#define MAX_KEYS       8
#define WARMUP_MAX     100000000ul /* messages per site per day */
#define WARMUP_DAYS    365
#define DAY_MS         86400000ull

typedef struct ptrvec {
    void  **v;
    size_t  n, cap;
} ptrvec_t;

static void vec_push(ptrvec_t *pv, void *item)
{
    if (pv->n == pv->cap) {
        pv->cap = pv->cap ? pv->cap * 2 : 8;
        pv->v = xrealloc(pv->v, pv->cap * sizeof(void *));
    }
    pv->v[pv->n++] = item;
}

typedef struct src {
    htable_node_t   node;
    egress_source_t s;
} src_t;

typedef struct pool {
    htable_node_t node;
    egress_pool_t p;
    char        **names; /* the sources as written, resolved at the end of the file */
    int           line;  /* of its sources key */
} pool_t;

typedef struct tenant {
    htable_node_t        node;
    char                *name;
    char                *pool_name;
    const egress_pool_t *pool;
    int                  line; /* of its pool key */
} tenant_t;

typedef struct shape {
    htable_node_t    node;
    char            *key; /* "site:google.com/source=mta1" */
    shaping_params_t v;   /* rule unused */
} shape_t;

typedef struct arule {
    automation_rule_t r;
    regex_t           re;
    int               has_re;
    size_t            idx; /* file order */
} arule_t;

/* The automation rules of one site or domain, in file order. */
typedef struct abucket {
    htable_node_t node;
    char         *key;
    ptrvec_t      rules;
} abucket_t;

struct policy {
    ptrvec_t             srcs, pools, tenants, shapes, autos, abuckets;
    htable_t             src_by_name, pool_by_name, tenant_by_name, shape_by_key;
    htable_t             auto_by_site, auto_by_domain;
    ptrvec_t             auto_any; /* rules with neither site nor domain */
    char                *default_name;
    int                  default_line;    /* of its pool key */
    int                  default_section; /* the line of [default] */
    const egress_pool_t *default_pool;
    int                  egress_loaded;
};

/* ------------------------------------------------------------ the reader */

typedef enum {
    SEC_NONE = 0,
    SEC_SOURCE,
    SEC_POOL,
    SEC_TENANT,
    SEC_DEFAULT,
    SEC_SITE,
    SEC_DOMAIN,
    SEC_AUTOMATION,
} sec_type_t;

typedef struct sec_def {
    const char *type;
    sec_type_t  sec;
    int         shaping;   /* 1: shaping file, 0: egress file */
    int         named;     /* takes a name */
    const char *keys[MAX_KEYS];
} sec_def_t;

static const sec_def_t sec_defs[] = {
    { "source", SEC_SOURCE, 0, 1, { "address", "ehlo", "warmup", "warmup_start" } },
    { "pool", SEC_POOL, 0, 1, { "sources" } },
    { "tenant", SEC_TENANT, 0, 1, { "pool" } },
    { "default", SEC_DEFAULT, 0, 0, { "pool" } },
    { "site", SEC_SITE, 1, 1,
      { "connection_limit", "rate", "max_messages_per_connection", "connect_timeout", "command_timeout", "tls" } },
    { "domain", SEC_DOMAIN, 1, 1,
      { "connection_limit", "rate", "max_messages_per_connection", "connect_timeout", "command_timeout", "tls" } },
    { "automation", SEC_AUTOMATION, 1, 1,
      { "site", "domain", "source", "code", "enhanced", "match", "action", "duration" } },
};
#define NSECDEFS (sizeof(sec_defs) / sizeof(sec_defs[0]))

typedef struct pctx {
    policy_t        *p;
    const char      *path;
    int              shaping; /* which file */
    int              lineno;
    char            *err;
    size_t           errlen;
    /* the current section */
    const sec_def_t *def;
    int              header_line;
    char             title[320]; /* "[site google.com source=mta1]" for messages */
    int              line_of[MAX_KEYS];
    src_t           *src;
    pool_t          *pool;
    tenant_t        *tenant;
    shape_t         *shape;
    arule_t         *rule;
} pctx_t;

static int perr_at(pctx_t *pc, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int perr_at(pctx_t *pc, int line, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    util_seterr(pc->err, pc->errlen, "%s:%d: %s", pc->path, line, msg);
    return -1;
}

#define perr(pc, ...) perr_at((pc), (pc)->lineno, __VA_ARGS__)


/* Cut s at an inline comment: '#' or ';' at the start or after a blank. */
static void cut_comment(char *s)
{
    int was_blank = 1;
    for (; *s; s++) {
        if (was_blank && (*s == '#' || *s == ';')) {
            *s = '\0';
            return;
        }
        was_blank = util_is_blank(*s);
    }
}

/* Letters, digits, '.', '_', '-', 1..NAME_MAX_LEN of them. */
static int valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > NAME_MAX_LEN)
        return 0;
    for (; *s; s++)
        if (!(isalnum((unsigned char)*s) || *s == '.' || *s == '_' || *s == '-'))
            return 0;
    return 1;
}

/* A site or domain name, lower-cased in place, a trailing dot dropped. */
static int valid_domain(char *s)
{
    size_t n = strlen(s);
    if (n > 1 && s[n - 1] == '.')
        s[--n] = '\0';
    if (n == 0 || n > DOMAIN_MAX_LEN || s[0] == '.' || s[0] == '-' || strstr(s, ".."))
        return 0;
    for (; *s; s++) {
        if (!(isalnum((unsigned char)*s) || *s == '.' || *s == '_' || *s == '-'))
            return 0;
        *s = (char)tolower((unsigned char)*s);
    }
    return 1;
}

/* Lower-case copy of s (a trailing dot dropped) into out; 0, or -1 when
 * it cannot be a configured name. */
static int lower_key(const char *s, char *out, size_t outlen)
{
    size_t n = strlen(s);
    if (n > 1 && s[n - 1] == '.')
        n--;
    if (n == 0 || n >= outlen)
        return -1;
    for (size_t i = 0; i < n; i++)
        out[i] = (char)tolower((unsigned char)s[i]);
    out[n] = '\0';
    return 0;
}

/* A decimal number from lo to hi, nothing else. */
static int parse_uint(const char *s, unsigned long lo, unsigned long hi, unsigned long *out)
{
    if (!isdigit((unsigned char)*s))
        return -1;
    unsigned long n = 0;
    for (; isdigit((unsigned char)*s); s++) {
        n = n * 10 + (unsigned long)(*s - '0');
        if (n > hi)
            return -1;
    }
    if (*s || n < lo)
        return -1;
    *out = n;
    return 0;
}

/* "N/s", "N/m" or "N/h", N from 1 to RATE_MAX (deliverer/throttle.c's syntax). */
static int parse_rate(const char *s, double *per_s)
{
    const char *slash = strchr(s, '/');
    if (slash == NULL || slash - s > 7 || slash[1] == '\0' || slash[2] != '\0')
        return -1;
    char num[8];
    memcpy(num, s, (size_t)(slash - s));
    num[slash - s] = '\0';
    unsigned long n;
    if (parse_uint(num, 1, RATE_MAX, &n) < 0)
        return -1;
    double period;
    switch (slash[1]) {
    case 's': period = 1.0; break;
    case 'm': period = 60.0; break;
    case 'h': period = 3600.0; break;
    default: return -1;
    }
    *per_s = (double)n / period;
    return 0;
}

/* class.subject.detail: class 2, 4 or 5, subject and detail 0..999. */
static int valid_enhanced(const char *s)
{
    if ((s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.')
        return 0;
    s += 2;
    for (int part = 0; part < 2; part++) {
        int digits = 0;
        while (isdigit((unsigned char)*s)) {
            s++;
            digits++;
        }
        if (digits == 0 || digits > 3)
            return 0;
        if (part == 0 && *s++ != '.')
            return 0;
    }
    return *s == '\0';
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
 * days_from_civil), and back. */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

/* "YYYY-MM-DD", a real date from 1970-01-01 to 9999-12-31. */
static int parse_date(const char *s, int64_t *day)
{
    static const unsigned mdays[12] = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    if (strlen(s) != 10 || s[4] != '-' || s[7] != '-')
        return -1;
    for (int i = 0; i < 10; i++)
        if (i != 4 && i != 7 && !isdigit((unsigned char)s[i]))
            return -1;
    unsigned y = (unsigned)((s[0] - '0') * 1000 + (s[1] - '0') * 100 + (s[2] - '0') * 10 + (s[3] - '0'));
    unsigned m = (unsigned)((s[5] - '0') * 10 + (s[6] - '0'));
    unsigned d = (unsigned)((s[8] - '0') * 10 + (s[9] - '0'));
    if (y < 1970 || m < 1 || m > 12 || d < 1 || d > mdays[m - 1])
        return -1;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (m == 2 && d == 29 && !leap)
        return -1;
    *day = days_from_civil(y, m, d);
    return 0;
}

/* ------------------------------------------------------------ sections */

static int finish_section(pctx_t *pc)
{
    const sec_def_t *d = pc->def;
    if (d == NULL)
        return 0;
    int line = pc->header_line;
    switch (d->sec) {
    case SEC_SOURCE:
        if (pc->src->s.addrlen == 0)
            return perr_at(pc, line, "%s has no address (an IPv4 or IPv6 literal is required)", pc->title);
        /* line_of[2] warmup, line_of[3] warmup_start (sec_defs order) */
        if (pc->line_of[2] && !pc->line_of[3])
            return perr_at(pc, line, "%s has warmup but no warmup_start (its day 1, YYYY-MM-DD)", pc->title);
        if (pc->line_of[3] && !pc->line_of[2])
            return perr_at(pc, line, "%s has warmup_start but no warmup (the messages per site for each day)",
                           pc->title);
        break;
    case SEC_POOL:
        if (pc->pool->names == NULL)
            return perr_at(pc, line, "%s has no sources (at least one is required)", pc->title);
        break;
    case SEC_TENANT:
        if (pc->tenant->pool_name == NULL)
            return perr_at(pc, line, "%s has no pool", pc->title);
        break;
    case SEC_DEFAULT:
        if (pc->p->default_name == NULL)
            return perr_at(pc, line, "%s has no pool", pc->title);
        break;
    case SEC_SITE:
    case SEC_DOMAIN: {
        int any = 0;
        for (int i = 0; i < MAX_KEYS; i++)
            any |= pc->line_of[i] != 0;
        if (!any)
            return perr_at(pc, line, "%s sets nothing (expected at least one of connection_limit, rate, "
                                     "max_messages_per_connection, connect_timeout, command_timeout, tls)",
                           pc->title);
        break;
    }
    case SEC_AUTOMATION: {
        automation_rule_t *r = &pc->rule->r;
        if (r->code == 0 && r->enhanced[0] == '\0' && !pc->rule->has_re)
            return perr_at(pc, line, "%s matches every reply: set at least one of code, enhanced, match",
                           pc->title);
        if (r->action == 0)
            return perr_at(pc, line, "%s has no action (suspend, bounce, rate=N/unit, connection_limit=N)",
                           pc->title);
        if (r->duration_ms == 0)
            return perr_at(pc, line, "%s has no duration (required, at most 7d)", pc->title);
        break;
    }
    case SEC_NONE: break;
    }
    pc->def = NULL;
    return 0;
}

static abucket_t *abucket_get(policy_t *p, htable_t *t, const char *key)
{
    htable_node_t *n = htable_find_str(t, key);
    if (n)
        return HTABLE_ENTRY(n, abucket_t, node);
    abucket_t *b = xcalloc(1, sizeof(*b));
    b->key = xstrdup(key);
    htable_insert_str(t, &b->node, b->key);
    vec_push(&p->abuckets, b);
    return b;
}

/* A site/domain section's qualifier "source=NAME" or "pool=NAME". */
static int parse_qualifier(pctx_t *pc, const char *q, char *out, size_t outlen)
{
    const char *eq = strchr(q, '=');
    size_t kl = eq ? (size_t)(eq - q) : 0;
    int is_src = eq && kl == 6 && strncasecmp(q, "source", 6) == 0;
    int is_pool = eq && kl == 4 && strncasecmp(q, "pool", 4) == 0;
    if (!is_src && !is_pool)
        return perr(pc, "unexpected \"%.64s\" in the section header: a qualifier is source=NAME or pool=NAME", q);
    const char *name = eq + 1;
    if (!valid_name(name))
        return perr(pc, "bad %s name \"%.80s\" (letters, digits, '.', '_', '-'; at most %d)",
                    is_src ? "source" : "pool", name, NAME_MAX_LEN);
    if (pc->p->egress_loaded) {
        if (is_src && htable_find_str(&pc->p->src_by_name, name) == NULL)
            return perr(pc, "unknown source \"%s\" (no [source %s] in the egress file)", name, name);
        if (is_pool && htable_find_str(&pc->p->pool_by_name, name) == NULL)
            return perr(pc, "unknown pool \"%s\" (no [pool %s] in the egress file)", name, name);
    }
    snprintf(out, outlen, "/%s=%s", is_src ? "source" : "pool", name);
    return 0;
}

static int begin_section(pctx_t *pc, char *s)
{
    char *end = strchr(s, ']');
    if (end == NULL)
        return perr(pc, "malformed section header \"%.64s\": no closing ]", s);
    char *rest = end + 1;
    cut_comment(rest);
    rest = util_trim(rest);
    if (*rest)
        return perr(pc, "unexpected \"%.64s\" after the section header", rest);
    *end = '\0';
    char *words[4];
    int nw = 0;
    for (char *save = NULL, *w = strtok_r(s + 1, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
        if (nw == 4)
            return perr(pc, "too many words in the section header");
        words[nw++] = w;
    }
    if (nw == 0)
        return perr(pc, "empty section header");
    const sec_def_t *d = NULL;
    for (size_t i = 0; i < NSECDEFS; i++)
        if (strcasecmp(words[0], sec_defs[i].type) == 0)
            d = &sec_defs[i];
    if (d == NULL || d->shaping != pc->shaping)
        return perr(pc, "unknown section type [%.64s] in %s file (expected %s)", words[0],
                    pc->shaping ? "a shaping" : "an egress",
                    pc->shaping ? "[site NAME], [domain NAME] or [automation NAME]"
                                : "[source NAME], [pool NAME], [tenant NAME] or [default]");
    int maxw = d->sec == SEC_SITE || d->sec == SEC_DOMAIN ? 3 : d->named ? 2 : 1;
    if (d->named && nw < 2)
        return perr(pc, "[%s] needs a name: [%s NAME]", d->type, d->type);
    if (nw > maxw)
        return perr(pc, "unexpected \"%.64s\" in the section header [%s%s%s]%s", words[maxw], d->type,
                    d->named ? " " : "", d->named ? words[1] : "",
                    maxw == 3 ? " (one qualifier at most: source=NAME or pool=NAME)" : "");
    policy_t *p = pc->p;
    memset(pc->line_of, 0, sizeof(pc->line_of));
    pc->header_line = pc->lineno;
    if (d->named)
        snprintf(pc->title, sizeof(pc->title), "[%s %s%s%s]", d->type, words[1], nw > 2 ? " " : "",
                 nw > 2 ? words[2] : "");
    else
        snprintf(pc->title, sizeof(pc->title), "[%s]", d->type);
    char *name = nw > 1 ? words[1] : NULL;

    if (d->sec == SEC_SITE || d->sec == SEC_DOMAIN) {
        if (!valid_domain(name))
            return perr(pc, "bad %s name \"%.80s\" (a domain name: letters, digits, '.', '-')", d->type, name);
        char qual[NAME_MAX_LEN + 16] = "";
        if (nw == 3 && parse_qualifier(pc, words[2], qual, sizeof(qual)) < 0)
            return -1;
        char key[DOMAIN_MAX_LEN + sizeof(qual) + 16];
        snprintf(key, sizeof(key), "%s:%s%s", d->type, name, qual);
        if (htable_find_str(&p->shape_by_key, key))
            return perr(pc, "duplicate section %s", pc->title);
        shape_t *sh = xcalloc(1, sizeof(*sh));
        sh->key = xstrdup(key);
        sh->v.tls = -1;
        htable_insert_str(&p->shape_by_key, &sh->node, sh->key);
        vec_push(&p->shapes, sh);
        pc->shape = sh;
        pc->def = d;
        return 0;
    }
    if (name && !valid_name(name))
        return perr(pc, "bad %s name \"%.80s\" (letters, digits, '.', '_', '-'; at most %d)", d->type, name,
                    NAME_MAX_LEN);
    switch (d->sec) {
    case SEC_SOURCE: {
        if (htable_find_str(&p->src_by_name, name))
            return perr(pc, "duplicate section %s", pc->title);
        src_t *sr = xcalloc(1, sizeof(*sr));
        sr->s.name = xstrdup(name);
        htable_insert_str(&p->src_by_name, &sr->node, sr->s.name);
        vec_push(&p->srcs, sr);
        pc->src = sr;
        break;
    }
    case SEC_POOL: {
        if (htable_find_str(&p->pool_by_name, name))
            return perr(pc, "duplicate section %s", pc->title);
        pool_t *po = xcalloc(1, sizeof(*po));
        po->p.name = xstrdup(name);
        htable_insert_str(&p->pool_by_name, &po->node, po->p.name);
        vec_push(&p->pools, po);
        pc->pool = po;
        break;
    }
    case SEC_TENANT: {
        if (htable_find_str(&p->tenant_by_name, name))
            return perr(pc, "duplicate section %s", pc->title);
        tenant_t *t = xcalloc(1, sizeof(*t));
        t->name = xstrdup(name);
        htable_insert_str(&p->tenant_by_name, &t->node, t->name);
        vec_push(&p->tenants, t);
        pc->tenant = t;
        break;
    }
    case SEC_DEFAULT:
        if (p->default_section)
            return perr(pc, "duplicate section [default] (first on line %d)", p->default_section);
        p->default_section = pc->lineno;
        break;
    case SEC_AUTOMATION: {
        for (size_t i = 0; i < p->autos.n; i++)
            if (strcmp(((arule_t *)p->autos.v[i])->r.name, name) == 0)
                return perr(pc, "duplicate section %s", pc->title);
        arule_t *r = xcalloc(1, sizeof(*r));
        r->r.name = xstrdup(name);
        r->idx = p->autos.n;
        vec_push(&p->autos, r);
        pc->rule = r;
        break;
    }
    default: break;
    }
    pc->def = d;
    return 0;
}

/* ------------------------------------------------------------ keys */

static int set_source_key(pctx_t *pc, const char *key, char *v)
{
    egress_source_t *s = &pc->src->s;
    if (strcasecmp(key, "address") == 0) {
        char buf[64];
        util_copy_text(buf, sizeof(buf), v);
        size_t n = strlen(buf);
        if (n > 2 && buf[0] == '[' && buf[n - 1] == ']') { /* [2001:db8::1] */
            memmove(buf, buf + 1, n - 2);
            buf[n - 2] = '\0';
        }
        memset(&s->addr, 0, sizeof(s->addr));
        struct sockaddr_in *a4 = (struct sockaddr_in *)&s->addr;
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&s->addr;
        if (strlen(v) < sizeof(buf) && inet_pton(AF_INET, buf, &a4->sin_addr) == 1) {
            a4->sin_family = AF_INET;
            s->addrlen = sizeof(*a4);
            inet_ntop(AF_INET, &a4->sin_addr, s->addr_text, sizeof(s->addr_text));
        } else if (strlen(v) < sizeof(buf) && inet_pton(AF_INET6, buf, &a6->sin6_addr) == 1) {
            a6->sin6_family = AF_INET6;
            s->addrlen = sizeof(*a6);
            inet_ntop(AF_INET6, &a6->sin6_addr, s->addr_text, sizeof(s->addr_text));
        } else {
            return perr(pc, "%s address: \"%.80s\" is not an IPv4 or IPv6 address literal", pc->title, v);
        }
        return 0;
    }
    if (strcasecmp(key, "warmup") == 0) {
        uint32_t *days = xcalloc(WARMUP_DAYS, sizeof(uint32_t));
        size_t nd = 0;
        for (char *save = NULL, *w = strtok_r(v, " \t,", &save); w; w = strtok_r(NULL, " \t,", &save)) {
            unsigned long n;
            if (nd == WARMUP_DAYS) {
                free(days);
                return perr(pc, "%s warmup: more than %d days", pc->title, WARMUP_DAYS);
            }
            if (parse_uint(w, 1, WARMUP_MAX, &n) < 0) {
                free(days);
                return perr(pc, "%s warmup: day %zu: \"%.32s\" is not a number of messages from 1 to %lu",
                            pc->title, nd + 1, w, WARMUP_MAX);
            }
            days[nd++] = (uint32_t)n;
        }
        if (nd == 0) {
            free(days);
            return perr(pc, "%s warmup: expected the messages per site for each day (N N ...)", pc->title);
        }
        s->warmup = days;
        s->nwarmup = nd;
        return 0;
    }
    if (strcasecmp(key, "warmup_start") == 0) {
        if (parse_date(v, &s->warmup_start_day) < 0)
            return perr(pc, "%s warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"%.64s\"",
                        pc->title, v);
        return 0;
    }
    /* ehlo: a host name or an address literal, one word */
    size_t n = strlen(v);
    if (n == 0 || n > 255)
        return perr(pc, "%s ehlo: expected a host name or an address literal of 1 to 255 characters",
                    pc->title);
    for (const char *c = v; *c; c++)
        if (!(isalnum((unsigned char)*c) || strchr(".-_[]:", *c)))
            return perr(pc, "%s ehlo: \"%.80s\" is not a host name or an address literal", pc->title, v);
    s->ehlo = xstrdup(v);
    return 0;
}

static int set_pool_sources(pctx_t *pc, char *v)
{
    pool_t *po = pc->pool;
    size_t cap = 0;
    for (char *save = NULL, *w = strtok_r(v, " \t,", &save); w; w = strtok_r(NULL, " \t,", &save)) {
        char *colon = strchr(w, ':');
        unsigned long weight = 1;
        if (colon) {
            *colon = '\0';
            if (parse_uint(colon + 1, 1, WEIGHT_MAX, &weight) < 0)
                return perr(pc, "%s sources: weight \"%.32s\" of %.64s is not a number from 1 to %d", pc->title,
                            colon + 1, w, WEIGHT_MAX);
        }
        if (!valid_name(w))
            return perr(pc, "%s sources: bad source name \"%.80s\"", pc->title, w);
        for (size_t i = 0; i < po->p.n; i++)
            if (strcmp(po->names[i], w) == 0)
                return perr(pc, "%s sources: %s is listed twice", pc->title, w);
        if (po->p.n + 1 >= cap) {
            cap = cap ? cap * 2 : 4;
            po->names = xrealloc(po->names, cap * sizeof(char *));
            po->p.weights = xrealloc(po->p.weights, cap * sizeof(unsigned));
        }
        po->names[po->p.n] = xstrdup(w);
        po->p.weights[po->p.n] = (unsigned)weight;
        po->p.n++;
    }
    if (po->p.n == 0)
        return perr(pc, "%s sources: at least one source is required (name[:weight] ...)", pc->title);
    po->line = pc->lineno;
    return 0;
}

static int set_shape_key(pctx_t *pc, const char *key, const char *v)
{
    shaping_params_t *sp = &pc->shape->v;
    unsigned long n;
    uint64_t ms;
    if (strcasecmp(key, "connection_limit") == 0) {
        if (parse_uint(v, 1, LIMIT_MAX, &n) < 0)
            return perr(pc, "%s connection_limit: expected a number from 1 to %u, got \"%.64s\"", pc->title,
                        LIMIT_MAX, v);
        sp->connection_limit = (unsigned)n;
    } else if (strcasecmp(key, "rate") == 0) {
        if (strlen(v) >= sizeof(sp->rate_text) || parse_rate(v, &sp->rate_per_s) < 0)
            return perr(pc, "%s rate: expected N/s, N/m or N/h (N from 1 to %lu), got \"%.64s\"", pc->title,
                        RATE_MAX, v);
        util_copy_text(sp->rate_text, sizeof(sp->rate_text), v);
    } else if (strcasecmp(key, "max_messages_per_connection") == 0) {
        if (parse_uint(v, 1, LIMIT_MAX, &n) < 0)
            return perr(pc, "%s max_messages_per_connection: expected a number from 1 to %u, got \"%.64s\"",
                        pc->title, LIMIT_MAX, v);
        sp->max_msgs_per_connection = (unsigned)n;
    } else if (strcasecmp(key, "connect_timeout") == 0 || strcasecmp(key, "command_timeout") == 0) {
        if (config_parse_duration(v, &ms) < 0 || ms == 0 || ms > TIMEOUT_MAX_MS)
            return perr(pc, "%s %s: expected a duration from 1ms to 1h like 30s or 5m, got \"%.64s\"",
                        pc->title, key, v);
        if (strcasecmp(key, "connect_timeout") == 0)
            sp->connect_timeout_ms = (unsigned)ms;
        else
            sp->command_timeout_ms = (unsigned)ms;
    } else {
        int t = config_enum_parse("smtp", "tls", v);
        if (t < 0) {
            char names[128];
            config_enum_list("smtp", "tls", ", ", names, sizeof(names));
            return perr(pc, "%s tls: \"%.64s\" is not one of %s", pc->title, v, names);
        }
        sp->tls = t;
    }
    return 0;
}

static int set_action(pctx_t *pc, automation_rule_t *r, const char *v)
{
    unsigned long n;
    if (strcasecmp(v, "suspend") == 0) {
        r->action = POLICY_ACT_SUSPEND;
    } else if (strcasecmp(v, "bounce") == 0) {
        r->action = POLICY_ACT_BOUNCE;
    } else if (strncasecmp(v, "rate=", 5) == 0) {
        if (strlen(v + 5) >= sizeof(r->rate_text) || parse_rate(v + 5, &r->rate_per_s) < 0)
            return perr(pc, "%s action: rate=%.64s: expected rate=N/s, rate=N/m or rate=N/h (N from 1 to %lu)",
                        pc->title, v + 5, RATE_MAX);
        util_copy_text(r->rate_text, sizeof(r->rate_text), v + 5);
        r->action = POLICY_ACT_RATE;
    } else if (strncasecmp(v, "connection_limit=", 17) == 0) {
        if (parse_uint(v + 17, 1, LIMIT_MAX, &n) < 0)
            return perr(pc, "%s action: connection_limit=%.64s: expected a number from 1 to %u", pc->title, v + 17,
                        LIMIT_MAX);
        r->connections = (unsigned)n;
        r->action = POLICY_ACT_CONNECTIONS;
    } else {
        return perr(pc, "%s action: \"%.64s\" is not suspend, bounce, rate=N/unit or connection_limit=N",
                    pc->title, v);
    }
    return 0;
}

static int set_auto_key(pctx_t *pc, const char *key, char *v)
{
    arule_t *ar = pc->rule;
    automation_rule_t *r = &ar->r;
    if (strcasecmp(key, "site") == 0 || strcasecmp(key, "domain") == 0) {
        int is_site = tolower((unsigned char)key[0]) == 's';
        if ((is_site && r->domain) || (!is_site && r->site))
            return perr(pc, "%s: site and domain exclude each other (a rule names one destination or none)",
                        pc->title);
        if (!valid_domain(v))
            return perr(pc, "%s %s: bad name \"%.80s\" (a domain name: letters, digits, '.', '-')", pc->title,
                        key, v);
        if (is_site)
            r->site = xstrdup(v);
        else
            r->domain = xstrdup(v);
    } else if (strcasecmp(key, "source") == 0) {
        if (!valid_name(v))
            return perr(pc, "%s source: bad source name \"%.80s\"", pc->title, v);
        if (pc->p->egress_loaded && htable_find_str(&pc->p->src_by_name, v) == NULL)
            return perr(pc, "%s source: unknown source \"%s\" (no [source %s] in the egress file)", pc->title, v, v);
        r->source = xstrdup(v);
    } else if (strcasecmp(key, "code") == 0) {
        unsigned long n;
        if ((v[0] == '4' || v[0] == '5') && (v[1] == '\0' || ((v[1] == 'x' || v[1] == 'X') &&
                                                              (v[2] == 'x' || v[2] == 'X') && v[3] == '\0')))
            r->code = v[0] - '0';
        else if (parse_uint(v, 400, 599, &n) == 0 && strlen(v) == 3)
            r->code = (int)n;
        else
            return perr(pc, "%s code: expected a reply code from 400 to 599, or a class 4 or 5 (4xx, 5xx), "
                            "got \"%.64s\"", pc->title, v);
    } else if (strcasecmp(key, "enhanced") == 0) {
        if (strlen(v) >= sizeof(r->enhanced) || !valid_enhanced(v))
            return perr(pc, "%s enhanced: expected an enhanced status code like 4.7.0, got \"%.64s\"", pc->title, v);
        util_copy_text(r->enhanced, sizeof(r->enhanced), v);
    } else if (strcasecmp(key, "match") == 0) {
        if (*v == '\0')
            return perr(pc, "%s match: empty regex", pc->title);
        int rc = regcomp(&ar->re, v, REG_EXTENDED | REG_NOSUB | REG_ICASE);
        if (rc != 0) {
            char why[160];
            regerror(rc, &ar->re, why, sizeof(why));
            return perr(pc, "%s match: regex \"%.200s\" does not compile: %s", pc->title, v, why);
        }
        ar->has_re = 1;
    } else if (strcasecmp(key, "action") == 0) {
        return set_action(pc, r, v);
    } else {
        uint64_t ms;
        if (config_parse_duration(v, &ms) < 0 || ms == 0 || ms > DURATION_MAX_MS)
            return perr(pc, "%s duration: expected a duration from 1ms to 7d like 30m or 1h, got \"%.64s\"",
                        pc->title, v);
        r->duration_ms = ms;
    }
    return 0;
}

static int set_key(pctx_t *pc, char *key, char *v)
{
    const sec_def_t *d = pc->def;
    int idx = -1;
    char expected[256] = "";
    size_t el = 0;
    for (int i = 0; i < MAX_KEYS && d->keys[i]; i++) {
        if (strcasecmp(key, d->keys[i]) == 0)
            idx = i;
        int w = snprintf(expected + el, sizeof(expected) - el, "%s%s", i ? ", " : "", d->keys[i]);
        if (w > 0 && (size_t)w < sizeof(expected) - el)
            el += (size_t)w;
    }
    if (idx < 0)
        return perr(pc, "unknown key \"%.64s\" in %s (expected %s)", key, pc->title, expected);
    if (pc->line_of[idx])
        return perr(pc, "%s %s is given twice, on lines %d and %d", pc->title, d->keys[idx], pc->line_of[idx],
                    pc->lineno);
    if (*v == '\0')
        return perr(pc, "%s %s: empty value", pc->title, d->keys[idx]);
    int rc = 0;
    switch (d->sec) {
    case SEC_SOURCE: rc = set_source_key(pc, key, v); break;
    case SEC_POOL: rc = set_pool_sources(pc, v); break;
    case SEC_TENANT:
        if (!valid_name(v))
            return perr(pc, "%s pool: bad pool name \"%.80s\"", pc->title, v);
        pc->tenant->pool_name = xstrdup(v);
        pc->tenant->line = pc->lineno;
        break;
    case SEC_DEFAULT:
        if (!valid_name(v))
            return perr(pc, "%s pool: bad pool name \"%.80s\"", pc->title, v);
        pc->p->default_name = xstrdup(v);
        pc->p->default_line = pc->lineno;
        break;
    case SEC_SITE:
    case SEC_DOMAIN: rc = set_shape_key(pc, key, v); break;
    case SEC_AUTOMATION: rc = set_auto_key(pc, key, v); break;
    case SEC_NONE: break;
    }
    if (rc == 0)
        pc->line_of[idx] = pc->lineno;
    return rc;
}

static int parse_line(pctx_t *pc, char *line)
{
    if (pc->lineno == 1 && strncmp(line, "\xef\xbb\xbf", 3) == 0)
        line += 3;
    char *s = util_trim(line);
    if (*s == '\0' || *s == ';' || *s == '#')
        return 0;
    if (*s == '[') {
        if (finish_section(pc) < 0)
            return -1;
        return begin_section(pc, s);
    }
    char *eq = strchr(s, '=');
    if (eq == NULL)
        return perr(pc, "syntax error: expected \"key = value\", \"[section]\" or a comment, got \"%.64s\"", s);
    *eq = '\0';
    char *key = util_trim(s), *v = eq + 1;
    cut_comment(v);
    v = util_trim(v);
    if (*key == '\0')
        return perr(pc, "syntax error: no key name before the '='");
    if (pc->def == NULL)
        return perr(pc, "key \"%.64s\" outside a [section]", key);
    return set_key(pc, key, v);
}

/* The end of the egress file: every name a pool, a tenant or [default]
 * gives must be defined. */
static int resolve_egress(pctx_t *pc)
{
    policy_t *p = pc->p;
    for (size_t i = 0; i < p->pools.n; i++) {
        pool_t *po = p->pools.v[i];
        po->p.sources = xcalloc(po->p.n, sizeof(egress_source_t *));
        for (size_t j = 0; j < po->p.n; j++) {
            htable_node_t *n = htable_find_str(&p->src_by_name, po->names[j]);
            if (n == NULL)
                return perr_at(pc, po->line, "[pool %s] sources: unknown source \"%s\" (no [source %s])",
                               po->p.name, po->names[j], po->names[j]);
            po->p.sources[j] = &HTABLE_ENTRY(n, src_t, node)->s;
        }
    }
    for (size_t i = 0; i < p->tenants.n; i++) {
        tenant_t *t = p->tenants.v[i];
        htable_node_t *n = htable_find_str(&p->pool_by_name, t->pool_name);
        if (n == NULL)
            return perr_at(pc, t->line, "[tenant %s] pool: unknown pool \"%s\" (no [pool %s])", t->name,
                           t->pool_name, t->pool_name);
        t->pool = &HTABLE_ENTRY(n, pool_t, node)->p;
    }
    if (p->default_name) {
        htable_node_t *n = htable_find_str(&p->pool_by_name, p->default_name);
        if (n == NULL)
            return perr_at(pc, p->default_line, "[default] pool: unknown pool \"%s\" (no [pool %s])",
                           p->default_name, p->default_name);
        p->default_pool = &HTABLE_ENTRY(n, pool_t, node)->p;
    }
    return 0;
}

static int file_line(void *arg, char *line, size_t len)
{
    pctx_t *pc = arg;
    pc->lineno++;
    if (strlen(line) != len)
        return perr(pc, "NUL byte in the line (not a text file?)");
    return parse_line(pc, line);
}

static int parse_file(policy_t *p, const char *path, int shaping, char *err, size_t errlen)
{
    pctx_t pc = { .p = p, .path = path, .shaping = shaping, .err = err, .errlen = errlen };
    int rc = util_file_lines(path, file_line, &pc, err, errlen) == 0 ? 0 : -1;
    if (rc == 0)
        rc = finish_section(&pc);
    if (rc == 0 && !shaping)
        rc = resolve_egress(&pc);
    return rc;
}

/* Group the automation rules by site and by domain, in file order. */
static void index_rules(policy_t *p)
{
    for (size_t i = 0; i < p->autos.n; i++) {
        arule_t *r = p->autos.v[i];
        if (r->r.site)
            vec_push(&abucket_get(p, &p->auto_by_site, r->r.site)->rules, r);
        else if (r->r.domain)
            vec_push(&abucket_get(p, &p->auto_by_domain, r->r.domain)->rules, r);
        else
            vec_push(&p->auto_any, r);
    }
}

/* ------------------------------------------------------------ the API */

policy_t *policy_load(const char *egress_path, const char *shaping_path, char *err, size_t errlen)
{
    policy_t *p = xcalloc(1, sizeof(*p));
    htable_init(&p->src_by_name, HTABLE_STR, 16, NULL);
    htable_init(&p->pool_by_name, HTABLE_STR, 16, NULL);
    htable_init(&p->tenant_by_name, HTABLE_STR, 16, NULL);
    htable_init(&p->shape_by_key, HTABLE_STR, 64, NULL);
    htable_init(&p->auto_by_site, HTABLE_STR, 16, NULL);
    htable_init(&p->auto_by_domain, HTABLE_STR, 16, NULL);
    if (egress_path && egress_path[0]) {
        if (parse_file(p, egress_path, 0, err, errlen) < 0)
            goto fail;
        p->egress_loaded = 1;
    }
    if (shaping_path && shaping_path[0] && parse_file(p, shaping_path, 1, err, errlen) < 0)
        goto fail;
    index_rules(p);
    return p;
fail:
    policy_free(p);
    return NULL;
}

void policy_free(policy_t *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->srcs.n; i++) {
        src_t *s = p->srcs.v[i];
        free(s->s.name);
        free(s->s.ehlo);
        free((void *)s->s.warmup);
        free(s);
    }
    for (size_t i = 0; i < p->pools.n; i++) {
        pool_t *po = p->pools.v[i];
        for (size_t j = 0; j < po->p.n; j++)
            free(po->names[j]);
        free(po->names);
        free(po->p.name);
        free(po->p.sources);
        free(po->p.weights);
        free(po);
    }
    for (size_t i = 0; i < p->tenants.n; i++) {
        tenant_t *t = p->tenants.v[i];
        free(t->name);
        free(t->pool_name);
        free(t);
    }
    for (size_t i = 0; i < p->shapes.n; i++) {
        shape_t *sh = p->shapes.v[i];
        free(sh->key);
        free(sh);
    }
    for (size_t i = 0; i < p->autos.n; i++) {
        arule_t *r = p->autos.v[i];
        if (r->has_re)
            regfree(&r->re);
        free(r->r.name);
        free(r->r.site);
        free(r->r.domain);
        free(r->r.source);
        free(r);
    }
    for (size_t i = 0; i < p->abuckets.n; i++) {
        abucket_t *b = p->abuckets.v[i];
        free(b->key);
        free(b->rules.v);
        free(b);
    }
    free(p->srcs.v);
    free(p->pools.v);
    free(p->tenants.v);
    free(p->shapes.v);
    free(p->autos.v);
    free(p->abuckets.v);
    free(p->auto_any.v);
    free(p->default_name);
    htable_fini(&p->src_by_name);
    htable_fini(&p->pool_by_name);
    htable_fini(&p->tenant_by_name);
    htable_fini(&p->shape_by_key);
    htable_fini(&p->auto_by_site);
    htable_fini(&p->auto_by_domain);
    free(p);
}

size_t policy_nsources(const policy_t *p)
{
    return p ? p->srcs.n : 0;
}

const egress_source_t *policy_source(const policy_t *p, size_t i)
{
    return p && i < p->srcs.n ? &((src_t *)p->srcs.v[i])->s : NULL;
}

const egress_source_t *policy_source_find(const policy_t *p, const char *name)
{
    htable_node_t *n = p && name ? htable_find_str(&p->src_by_name, name) : NULL;
    return n ? &HTABLE_ENTRY(n, src_t, node)->s : NULL;
}

const egress_pool_t *policy_pool_find(const policy_t *p, const char *name)
{
    htable_node_t *n = p && name ? htable_find_str(&p->pool_by_name, name) : NULL;
    return n ? &HTABLE_ENTRY(n, pool_t, node)->p : NULL;
}

size_t policy_npools(const policy_t *p)
{
    return p ? p->pools.n : 0;
}

const egress_pool_t *policy_pool(const policy_t *p, size_t i)
{
    return p && i < p->pools.n ? &((pool_t *)p->pools.v[i])->p : NULL;
}

const egress_pool_t *policy_pool_for(const policy_t *p, const char *msg_pool, const char *tenant, int *unknown)
{
    if (unknown)
        *unknown = 0;
    if (msg_pool && msg_pool[0]) {
        const egress_pool_t *po = policy_pool_find(p, msg_pool);
        if (po == NULL && unknown)
            *unknown = 1;
        return po;
    }
    if (p == NULL)
        return NULL;
    if (tenant && tenant[0]) {
        htable_node_t *n = htable_find_str(&p->tenant_by_name, tenant);
        if (n)
            return HTABLE_ENTRY(n, tenant_t, node)->pool;
    }
    return p->default_pool;
}

/* Merge the section key names, if there is one, into out. */
static void merge_section(const policy_t *p, const char *key, shaping_params_t *out)
{
    htable_node_t *n = htable_find_str(&p->shape_by_key, key);
    if (n == NULL)
        return;
    const shaping_params_t *v = &HTABLE_ENTRY(n, shape_t, node)->v;
    if (v->connection_limit)
        out->connection_limit = v->connection_limit;
    if (v->rate_per_s > 0) {
        out->rate_per_s = v->rate_per_s;
        util_copy_text(out->rate_text, sizeof(out->rate_text), v->rate_text);
    }
    if (v->max_msgs_per_connection)
        out->max_msgs_per_connection = v->max_msgs_per_connection;
    if (v->connect_timeout_ms)
        out->connect_timeout_ms = v->connect_timeout_ms;
    if (v->command_timeout_ms)
        out->command_timeout_ms = v->command_timeout_ms;
    if (v->tls >= 0)
        out->tls = v->tls;
    size_t len = strlen(out->rule);
    snprintf(out->rule + len, sizeof(out->rule) - len, "%s%s", len ? "," : "", key);
}

/* The sections of type:name, then with the pool, then with the source. */
static void merge_level(const policy_t *p, const char *type, const char *name, const char *pool,
                        const char *source, shaping_params_t *out)
{
    char lname[DOMAIN_MAX_LEN + 2];
    if (name == NULL || lower_key(name, lname, sizeof(lname)) < 0)
        return;
    char key[sizeof(lname) + NAME_MAX_LEN + 32];
    snprintf(key, sizeof(key), "%s:%s", type, lname);
    merge_section(p, key, out);
    if (pool && pool[0] && strlen(pool) <= NAME_MAX_LEN) {
        snprintf(key, sizeof(key), "%s:%s/pool=%s", type, lname, pool);
        merge_section(p, key, out);
    }
    if (source && source[0] && strlen(source) <= NAME_MAX_LEN) {
        snprintf(key, sizeof(key), "%s:%s/source=%s", type, lname, source);
        merge_section(p, key, out);
    }
}

void policy_shaping(const policy_t *p, const char *domain, const char *site, const char *pool, const char *source,
                    shaping_params_t *out)
{
    memset(out, 0, sizeof(*out));
    out->tls = -1;
    if (p == NULL || p->shapes.n == 0)
        return;
    merge_level(p, "site", site, pool, source, out);
    merge_level(p, "domain", domain, pool, source, out);
}

static int rule_matches(const arule_t *ar, const char *source, int code, const char *enhanced, const char *text)
{
    const automation_rule_t *r = &ar->r;
    if (r->source && (source == NULL || strcmp(r->source, source) != 0))
        return 0;
    if (r->code >= 100 ? code != r->code : r->code ? code / 100 != r->code : 0)
        return 0;
    if (r->enhanced[0] && (enhanced == NULL || strcmp(r->enhanced, enhanced) != 0))
        return 0;
    if (ar->has_re && (text == NULL || regexec(&ar->re, text, 0, NULL, 0) != 0))
        return 0;
    return 1;
}

static const ptrvec_t *bucket_rules(const htable_t *t, const char *name)
{
    char lname[DOMAIN_MAX_LEN + 2];
    if (name == NULL || lower_key(name, lname, sizeof(lname)) < 0)
        return NULL;
    htable_node_t *n = htable_find_str(t, lname);
    return n ? &HTABLE_ENTRY(n, abucket_t, node)->rules : NULL;
}

const automation_rule_t *policy_match_reply(const policy_t *p, const char *domain, const char *site,
                                            const char *source, int code, const char *enhanced, const char *text)
{
    if (p == NULL || p->autos.n == 0)
        return NULL;
    /* the candidates: this site's rules, this domain's, and those for any
     * destination, each in file order; walked merged, in file order */
    const ptrvec_t *lists[3] = { bucket_rules(&p->auto_by_site, site), bucket_rules(&p->auto_by_domain, domain),
                                 &p->auto_any };
    size_t at[3] = { 0, 0, 0 };
    for (;;) {
        int best = -1;
        size_t best_idx = 0;
        for (int i = 0; i < 3; i++) {
            if (lists[i] == NULL || at[i] >= lists[i]->n)
                continue;
            size_t idx = ((const arule_t *)lists[i]->v[at[i]])->idx;
            if (best < 0 || idx < best_idx) {
                best = i;
                best_idx = idx;
            }
        }
        if (best < 0)
            return NULL;
        const arule_t *r = lists[best]->v[at[best]++];
        if (rule_matches(r, source, code, enhanced, text))
            return &r->r;
    }
}

int64_t policy_day_of(uint64_t now_ms)
{
    return (int64_t)(now_ms / DAY_MS);
}

unsigned policy_day_yyyymmdd(int64_t day)
{
    int64_t y;
    unsigned m, d;
    civil_from_days(day, &y, &m, &d);
    return (unsigned)y * 10000 + m * 100 + d;
}

uint64_t policy_warmup_limit(const egress_source_t *s, uint64_t now_ms)
{
    if (s == NULL || s->nwarmup == 0)
        return 0;
    int64_t day = policy_day_of(now_ms) - s->warmup_start_day; /* 0 on day 1 */
    if (day < 0)
        return s->warmup[0];
    if ((uint64_t)day >= s->nwarmup)
        return 0;
    return s->warmup[day];
}

int policy_has_shaping(const policy_t *p)
{
    return p && (p->shapes.n > 0 || p->autos.n > 0);
}

void policy_summary(const policy_t *p, char *out, size_t outlen)
{
    size_t ns = policy_nsources(p), np = policy_npools(p), nt = p ? p->tenants.n : 0;
    size_t nr = p ? p->shapes.n : 0, na = p ? p->autos.n : 0;
    char def[NAME_MAX_LEN + 32] = "";
    if (p && p->default_name)
        snprintf(def, sizeof(def), ", default pool %s", p->default_name);
    snprintf(out, outlen, "egress: %zu source%s, %zu pool%s, %zu tenant mapping%s%s; shaping: %zu rule%s, "
                          "%zu automation%s",
             ns, ns == 1 ? "" : "s", np, np == 1 ? "" : "s", nt, nt == 1 ? "" : "s", def, nr, nr == 1 ? "" : "s",
             na, na == 1 ? "" : "s");
}

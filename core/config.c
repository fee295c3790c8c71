/*
 * SUMMARY
 *  core/config.c - INI configuration with MAILPUMP_<SECTION>_<KEY> overrides.
 * DESCRIPTION
 *  One table lists every key with its type and the field it sets; the
 *  file parser, the environment overlay and the dump all walk it, so a
 *  new key is one line here plus the field in config.h.
 */
#include "core/config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/util.h"

typedef enum { K_STR, K_UINT, K_ULONG, K_MS, K_ENUM } key_type_t;

/* A name of an enumerated key and the value it stands for; a name whose
 * value an earlier name already has is an alias (accepted, not listed). */
typedef struct enum_name {
    const char *name;
    int         value;
} enum_name_t;

typedef struct key_def {
    const char        *section;
    const char        *key;
    key_type_t         type;
    size_t             offset;
    const char        *defval;
    int                secret;
    const enum_name_t *names; /* K_ENUM: the allowed names, { NULL } last */
} key_def_t;

/* K_ENUM fields are stored as int */
_Static_assert(sizeof(mp_smtp_tls_t) == sizeof(int), "enum stored as int");
_Static_assert(sizeof(mp_imap_tls_t) == sizeof(int), "enum stored as int");
_Static_assert(sizeof(mp_log_level_t) == sizeof(int), "enum stored as int");
_Static_assert(sizeof(mp_log_format_t) == sizeof(int), "enum stored as int");

static const enum_name_t smtp_tls_names[] = {
    { "none", MP_SMTP_TLS_NONE },
    { "opportunistic", MP_SMTP_TLS_OPPORTUNISTIC },
    { "required", MP_SMTP_TLS_REQUIRED },
    { "verify", MP_SMTP_TLS_VERIFY },
    { NULL, 0 },
};
static const enum_name_t imap_tls_names[] = {
    { "imaps", MP_IMAP_TLS_IMAPS },
    { "starttls", MP_IMAP_TLS_STARTTLS },
    { "none", MP_IMAP_TLS_NONE },
    { NULL, 0 },
};
static const enum_name_t log_level_names[] = {
    { "error", MP_LOG_LEVEL_ERROR },
    { "warn", MP_LOG_LEVEL_WARN },
    { "info", MP_LOG_LEVEL_INFO },
    { "debug", MP_LOG_LEVEL_DEBUG },
    { "warning", MP_LOG_LEVEL_WARN },
    { NULL, 0 },
};
static const enum_name_t log_format_names[] = {
    { "logfmt", MP_LOG_FORMAT_LOGFMT },
    { "json", MP_LOG_FORMAT_JSON },
    { NULL, 0 },
};

#define F(field) offsetof(mp_config_t, field)

static const key_def_t keys[] = {
    { "worker", "count", K_UINT, F(worker_count), "0", 0, NULL },
    { "worker", "shutdown_grace_ms", K_UINT, F(worker_shutdown_grace_ms), "30000", 0, NULL },
    { "amqp", "host", K_STR, F(amqp_host), "127.0.0.1", 0, NULL },
    { "amqp", "port", K_UINT, F(amqp_port), "5672", 0, NULL },
    { "amqp", "user", K_STR, F(amqp_user), "guest", 0, NULL },
    { "amqp", "password", K_STR, F(amqp_password), "guest", 1, NULL },
    { "amqp", "vhost", K_STR, F(amqp_vhost), "/", 0, NULL },
    { "amqp", "prefetch", K_UINT, F(amqp_prefetch), "64", 0, NULL },
    { "amqp", "heartbeat", K_UINT, F(amqp_heartbeat), "30", 0, NULL },
    { "amqp", "queue", K_STR, F(amqp_queue), "mail.outbound", 0, NULL },
    { "amqp", "dead_queue", K_STR, F(amqp_dead_queue), "mail.dead", 0, NULL },
    { "amqp", "events_exchange", K_STR, F(amqp_events_exchange), "mail.events", 0, NULL },
    { "dns", "servers", K_STR, F(dns_servers), "", 0, NULL },
    { "dns", "timeout_ms", K_UINT, F(dns_timeout_ms), "2000", 0, NULL },
    { "dns", "tries", K_UINT, F(dns_tries), "2", 0, NULL },
    { "dns", "l1_entries", K_UINT, F(dns_l1_entries), "10000", 0, NULL },
    { "dns", "max_ttl_s", K_UINT, F(dns_max_ttl_s), "3600", 0, NULL },
    { "dns", "negative_ttl_s", K_UINT, F(dns_negative_ttl_s), "900", 0, NULL },
    { "dns", "l2", K_UINT, F(dns_l2), "1", 0, NULL },
    { "smtp", "port", K_UINT, F(smtp_port), "25", 0, NULL },
    { "smtp", "helo_name", K_STR, F(smtp_helo_name), "", 0, NULL },
    { "smtp", "tls", K_ENUM, F(smtp_tls), "opportunistic", 0, smtp_tls_names },
    { "smtp", "ca_file", K_STR, F(smtp_ca_file), "", 0, NULL },
    { "smtp", "max_mx", K_UINT, F(smtp_max_mx), "5", 0, NULL },
    { "smtp", "timeout_scale", K_UINT, F(smtp_timeout_scale), "100", 0, NULL },
    { "smtp", "tls_policy", K_STR, F(smtp_tls_policy), "", 0, NULL },
    { "smtp", "rate_limits", K_STR, F(smtp_rate_limits), "", 0, NULL },
    { "smtp", "rate_limit_max_wait", K_MS, F(smtp_rate_limit_max_wait_ms), "10s", 0, NULL },
    { "smtp", "max_rcpts", K_UINT, F(smtp_max_rcpts), "100", 0, NULL },
    { "smtp", "pipelining", K_UINT, F(smtp_pipelining), "1", 0, NULL },
    { "smtp", "pool", K_UINT, F(smtp_pool), "1", 0, NULL },
    { "smtp", "pool_max_msgs", K_UINT, F(smtp_pool_max_msgs), "100", 0, NULL },
    { "smtp", "pool_max_age_ms", K_UINT, F(smtp_pool_max_age_ms), "300000", 0, NULL },
    { "smtp", "pool_idle_ms", K_UINT, F(smtp_pool_idle_ms), "5000", 0, NULL },
    { "smtp", "pool_max_per_dest", K_UINT, F(smtp_pool_max_per_dest), "20", 0, NULL },
    { "smtp", "pool_initial_per_dest", K_UINT, F(smtp_pool_initial_per_dest), "1", 0, NULL },
    { "smtp", "pool_max_total", K_UINT, F(smtp_pool_max_total), "1000", 0, NULL },
    { "smtp", "pool_refused_backoff", K_MS, F(smtp_pool_refused_backoff_ms), "60s", 0, NULL },
    { "smtp", "tls_cache_size", K_UINT, F(smtp_tls_cache_size), "1024", 0, NULL },
    { "smtp", "route_penalty", K_MS, F(smtp_route_penalty_ms), "1s", 0, NULL },
    { "smtp", "route_penalty_max", K_MS, F(smtp_route_penalty_max_ms), "5m", 0, NULL },
    { "smtp", "relay", K_STR, F(smtp_relay), "", 0, NULL },
    { "smtp", "relay_user", K_STR, F(smtp_relay_user), "", 0, NULL },
    { "smtp", "relay_password", K_STR, F(smtp_relay_password), "", 1, NULL },
    { "smtp", "timeout_connect_ms", K_UINT, F(smtp_timeout_connect_ms), "0", 0, NULL },
    { "smtp", "timeout_greeting_ms", K_UINT, F(smtp_timeout_greeting_ms), "0", 0, NULL },
    { "smtp", "timeout_helo_ms", K_UINT, F(smtp_timeout_helo_ms), "0", 0, NULL },
    { "smtp", "timeout_starttls_ms", K_UINT, F(smtp_timeout_starttls_ms), "0", 0, NULL },
    { "smtp", "timeout_mail_ms", K_UINT, F(smtp_timeout_mail_ms), "0", 0, NULL },
    { "smtp", "timeout_rcpt_ms", K_UINT, F(smtp_timeout_rcpt_ms), "0", 0, NULL },
    { "smtp", "timeout_data_init_ms", K_UINT, F(smtp_timeout_data_init_ms), "0", 0, NULL },
    { "smtp", "timeout_data_block_ms", K_UINT, F(smtp_timeout_data_block_ms), "0", 0, NULL },
    { "smtp", "timeout_data_done_ms", K_UINT, F(smtp_timeout_data_done_ms), "0", 0, NULL },
    { "smtp", "timeout_rset_ms", K_UINT, F(smtp_timeout_rset_ms), "0", 0, NULL },
    { "smtp", "timeout_quit_ms", K_UINT, F(smtp_timeout_quit_ms), "0", 0, NULL },
    { "imap", "host", K_STR, F(imap_host), "", 0, NULL },
    { "imap", "port", K_UINT, F(imap_port), "993", 0, NULL },
    { "imap", "tls", K_ENUM, F(imap_tls), "imaps", 0, imap_tls_names },
    { "imap", "ca_file", K_STR, F(imap_ca_file), "", 0, NULL },
    { "imap", "accounts_file", K_STR, F(imap_accounts_file), "", 0, NULL },
    { "imap", "timeout_ms", K_UINT, F(imap_timeout_ms), "30000", 0, NULL },
    { "imap", "pool", K_UINT, F(imap_pool), "1", 0, NULL },
    { "imap", "pool_max_appends", K_UINT, F(imap_pool_max_appends), "100", 0, NULL },
    { "imap", "pool_idle_ms", K_UINT, F(imap_pool_idle_ms), "10000", 0, NULL },
    { "imap", "pool_max_connections", K_UINT, F(imap_pool_max_connections), "2", 0, NULL },
    { "imap", "pool_max_batch", K_UINT, F(imap_pool_max_batch), "16", 0, NULL },
    { "redis", "host", K_STR, F(redis_host), "", 0, NULL },
    { "redis", "port", K_UINT, F(redis_port), "6379", 0, NULL },
    { "redis", "timeout_ms", K_UINT, F(redis_timeout_ms), "50", 0, NULL },
    { "metrics", "listen", K_STR, F(metrics_listen), "127.0.0.1:9464", 0, NULL },
    { "log", "level", K_ENUM, F(log_level), "info", 0, log_level_names },
    { "log", "format", K_ENUM, F(log_format), "logfmt", 0, log_format_names },
    { "retry", "levels", K_STR, F(retry_levels), "30s,1m,2m,5m,10m,20m,40m,1h,2h,4h,8h,16h", 0, NULL },
    { "retry", "queue_prefix", K_STR, F(retry_queue_prefix), "mail.retry", 0, NULL },
    { "retry", "poison_redeliveries", K_UINT, F(retry_poison_redeliveries), "5", 0, NULL },
    { "retry", "p0_base", K_MS, F(retry_base_ms[0]), "30s", 0, NULL },
    { "retry", "p1_base", K_MS, F(retry_base_ms[1]), "1m", 0, NULL },
    { "retry", "p2_base", K_MS, F(retry_base_ms[2]), "5m", 0, NULL },
    { "retry", "p0_max_age", K_MS, F(retry_max_age_ms[0]), "5d", 0, NULL },
    { "retry", "p1_max_age", K_MS, F(retry_max_age_ms[1]), "3d", 0, NULL },
    { "retry", "p2_max_age", K_MS, F(retry_max_age_ms[2]), "1d", 0, NULL },
    { "retry", "p0_max_attempts", K_UINT, F(retry_max_attempts[0]), "40", 0, NULL },
    { "retry", "p1_max_attempts", K_UINT, F(retry_max_attempts[1]), "25", 0, NULL },
    { "retry", "p2_max_attempts", K_UINT, F(retry_max_attempts[2]), "12", 0, NULL },
    { "retry", "p0_fast_retries", K_UINT, F(retry_fast_retries[0]), "5", 0, NULL },
    { "retry", "p1_fast_retries", K_UINT, F(retry_fast_retries[1]), "3", 0, NULL },
    { "retry", "p2_fast_retries", K_UINT, F(retry_fast_retries[2]), "1", 0, NULL },
    { "retry", "p0_fast_base", K_MS, F(retry_fast_base_ms[0]), "50ms", 0, NULL },
    { "retry", "p1_fast_base", K_MS, F(retry_fast_base_ms[1]), "200ms", 0, NULL },
    { "retry", "p2_fast_base", K_MS, F(retry_fast_base_ms[2]), "1s", 0, NULL },
    { "message", "max_size", K_ULONG, F(message_max_size), "26214400", 0, NULL },
    { "dkim", "keys_file", K_STR, F(dkim_keys_file), "", 0, NULL },
    { "dkim", "headers", K_STR, F(dkim_headers),
      "from:to:cc:subject:date:message-id:mime-version:content-type:content-transfer-encoding:"
      "reply-to:in-reply-to:references:list-id:list-unsubscribe:list-unsubscribe-post", 0, NULL },
};
#define NKEYS (sizeof(keys) / sizeof(keys[0]))

static int enum_value(const enum_name_t *names, const char *v)
{
    for (const enum_name_t *n = names; n->name; n++)
        if (strcmp(v, n->name) == 0)
            return n->value;
    return -1;
}

/* The names of an enum key joined by sep, aliases left out. */
static void enum_list(const enum_name_t *names, const char *sep, char *out, size_t outlen)
{
    size_t len = 0;
    out[0] = '\0';
    for (const enum_name_t *n = names; n->name; n++) {
        int alias = 0;
        for (const enum_name_t *m = names; m < n; m++)
            if (m->value == n->value)
                alias = 1;
        if (alias)
            continue;
        int w = snprintf(out + len, outlen - len, "%s%s", len ? sep : "", n->name);
        if (w < 0 || (size_t)w >= outlen - len)
            return;
        len += (size_t)w;
    }
}

static int set_value(mp_config_t *cfg, const key_def_t *k, const char *v, char *err, size_t errlen)
{
    char *base = (char *)cfg + k->offset;
    if (k->type == K_ENUM) {
        int e = enum_value(k->names, v);
        if (e < 0) {
            char allowed[256];
            enum_list(k->names, ", ", allowed, sizeof(allowed));
            snprintf(err, errlen, "[%s] %s: \"%s\" is not one of %s", k->section, k->key, v, allowed);
            return -1;
        }
        *(int *)base = e;
        return 0;
    }
    if (k->type == K_STR) {
        char **p = (char **)base;
        free(*p);
        *p = xstrdup(v);
        return 0;
    }
    if (k->type == K_MS) {
        uint64_t ms;
        if (config_parse_duration(v, &ms) < 0) {
            snprintf(err, errlen, "[%s] %s: expected a duration like 250ms, 30s, 5m, 2h, 1d; got \"%s\"",
                     k->section, k->key, v);
            return -1;
        }
        *(uint64_t *)base = ms;
        return 0;
    }
    char *end;
    errno = 0;
    while (isspace((unsigned char)*v))
        v++;
    if (*v == '-' || *v == '\0') {
        snprintf(err, errlen, "[%s] %s: expected a non-negative number, got \"%s\"", k->section,
                 k->key, v);
        return -1;
    }
    unsigned long n = strtoul(v, &end, 10);
    if (errno || *end != '\0' || (k->type == K_UINT && n > 0xffffffffUL)) {
        snprintf(err, errlen, "[%s] %s: expected a non-negative number, got \"%s\"", k->section,
                 k->key, v);
        return -1;
    }
    if (k->type == K_UINT)
        *(unsigned *)base = (unsigned)n;
    else
        *(unsigned long *)base = n;
    return 0;
}

int config_parse_duration(const char *s, uint64_t *ms)
{
    while (isspace((unsigned char)*s))
        s++;
    if (!isdigit((unsigned char)*s))
        return -1;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno)
        return -1;
    static const struct { const char *unit; uint64_t mult; } units[] = {
        { "", 1 }, { "ms", 1 }, { "s", 1000 }, { "m", 60000 }, { "h", 3600000 }, { "d", 86400000 },
    };
    while (isspace((unsigned char)*end))
        end++;
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcmp(end, units[i].unit) == 0) {
            if (n > UINT64_MAX / units[i].mult)
                return -1;
            *ms = n * units[i].mult;
            return 0;
        }
    }
    return -1;
}

void config_format_duration(uint64_t ms, char *out, size_t outlen)
{
    static const struct { const char *unit; uint64_t mult; } units[] = {
        { "d", 86400000 }, { "h", 3600000 }, { "m", 60000 }, { "s", 1000 },
    };
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (ms >= units[i].mult && ms % units[i].mult == 0) {
            snprintf(out, outlen, "%llu%s", (unsigned long long)(ms / units[i].mult), units[i].unit);
            return;
        }
    }
    snprintf(out, outlen, "%llums", (unsigned long long)ms);
}

static const key_def_t *find_key(const char *section, const char *key)
{
    for (size_t i = 0; i < NKEYS; i++)
        if (strcasecmp(keys[i].section, section) == 0 && strcasecmp(keys[i].key, key) == 0)
            return &keys[i];
    return NULL;
}

void config_defaults(mp_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    char err[64];
    for (size_t i = 0; i < NKEYS; i++)
        set_value(cfg, &keys[i], keys[i].defval, err, sizeof(err));
}

void config_free(mp_config_t *cfg)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (keys[i].type == K_STR) {
            char **p = (char **)((char *)cfg + keys[i].offset);
            free(*p);
            *p = NULL;
        }
    }
}

typedef struct parse_ctx {
    mp_config_t *cfg;
    char        *err;
    size_t       errlen;
    int          failed;
} parse_ctx_t;

static int on_ini(void *user, const char *section, const char *name, const char *value)
{
    parse_ctx_t *pc = user;
    if (pc->failed)
        return 0; /* keep the first error */
    if (section[0] == '\0') {
        snprintf(pc->err, pc->errlen,
                 "key \"%s\" outside a [section] (is a section header malformed?)", name);
        pc->failed = 1;
        return 0;
    }
    const key_def_t *k = find_key(section, name);
    if (k == NULL) {
        snprintf(pc->err, pc->errlen, "unknown key [%s] %s", section, name);
        pc->failed = 1;
        return 0;
    }
    if (set_value(pc->cfg, k, value, pc->err, pc->errlen) < 0) {
        pc->failed = 1;
        return 0;
    }
    return 1;
}

int config_load(mp_config_t *cfg, const char *path, char *err, size_t errlen)
{
    if (path) {
        parse_ctx_t pc = { cfg, err, errlen, 0 };
        FILE *f = fopen(path, "r");
        if (f == NULL) {
            snprintf(err, errlen, "%s: %s", path, strerror(errno));
            return -1;
        }
        int r = ini_parse_file(f, on_ini, &pc);
        fclose(f);
        if (r != 0) {
            if (pc.failed) {
                char tmp[512];
                snprintf(tmp, sizeof(tmp), "%s:%d: %s", path, r, err);
                snprintf(err, errlen, "%s", tmp);
            } else {
                snprintf(err, errlen, "%s:%d: syntax error", path, r);
            }
            return -1;
        }
    }
    for (size_t i = 0; i < NKEYS; i++) {
        char name[128];
        snprintf(name, sizeof(name), "MAILPUMP_%s_%s", keys[i].section, keys[i].key);
        for (char *c = name; *c; c++)
            *c = (char)toupper((unsigned char)*c);
        const char *v = getenv(name);
        if (v == NULL)
            continue;
        if (set_value(cfg, &keys[i], v, err, errlen) < 0) {
            char tmp[512];
            snprintf(tmp, sizeof(tmp), "%s: %s", name, err);
            snprintf(err, errlen, "%s", tmp);
            return -1;
        }
    }
    return 0;
}

int config_validate(const mp_config_t *cfg, char *err, size_t errlen)
{
    if (cfg->amqp_port == 0 || cfg->amqp_port > 65535 || cfg->smtp_port == 0 ||
        cfg->smtp_port > 65535 || cfg->imap_port == 0 || cfg->imap_port > 65535) {
        snprintf(err, errlen, "ports must be between 1 and 65535");
        return -1;
    }
    if (cfg->amqp_prefetch == 0 || cfg->amqp_prefetch > 65535) {
        snprintf(err, errlen, "[amqp] prefetch must be between 1 and 65535");
        return -1;
    }
    if (cfg->worker_count > 256) {
        snprintf(err, errlen, "[worker] count must be at most 256");
        return -1;
    }
    if (cfg->dns_l1_entries == 0 || cfg->dns_max_ttl_s == 0 || cfg->dns_negative_ttl_s == 0 ||
        cfg->dns_l2 > 1) {
        snprintf(err, errlen, "[dns] l1_entries, max_ttl_s, negative_ttl_s must be > 0 and l2 0 or 1");
        return -1;
    }
    if (cfg->smtp_max_mx == 0 || cfg->dns_tries == 0 || cfg->dns_timeout_ms == 0 ||
        cfg->smtp_timeout_scale == 0) {
        snprintf(err, errlen, "[smtp] max_mx, timeout_scale and [dns] tries, timeout_ms must be > 0");
        return -1;
    }
    for (int c = 0; c < 3; c++) {
        if (cfg->retry_max_attempts[c] == 0 || cfg->retry_base_ms[c] == 0 ||
            cfg->retry_max_age_ms[c] == 0) {
            snprintf(err, errlen, "[retry] p%d_max_attempts, p%d_base and p%d_max_age must be > 0",
                     c, c, c);
            return -1;
        }
    }
    {
        /* every level a duration, ascending, within RabbitMQ's TTL range */
        char *copy = xstrdup(cfg->retry_levels), *save = NULL;
        uint64_t prev = 0;
        int n = 0, bad = 0;
        for (char *t = strtok_r(copy, ", ", &save); t; t = strtok_r(NULL, ", ", &save)) {
            uint64_t ms;
            if (config_parse_duration(t, &ms) < 0 || ms == 0 || ms <= prev || ms > 0x7fffffffu) {
                bad = 1;
                break;
            }
            prev = ms;
            n++;
        }
        free(copy);
        if (bad || n == 0) {
            snprintf(err, errlen, "[retry] levels: expected ascending durations like "
                                  "\"30s,1m,5m,1h\", got \"%s\"", cfg->retry_levels);
            return -1;
        }
    }
    if (cfg->imap_host[0] && !cfg->imap_accounts_file[0]) {
        snprintf(err, errlen, "[imap] host is set but accounts_file is empty");
        return -1;
    }
    return 0;
}

void config_dump(const mp_config_t *cfg, void *stream)
{
    FILE *f = stream;
    const char *section = "";
    for (size_t i = 0; i < NKEYS; i++) {
        const key_def_t *k = &keys[i];
        if (strcmp(section, k->section) != 0) {
            fprintf(f, "%s[%s]\n", i ? "\n" : "", k->section);
            section = k->section;
        }
        const char *base = (const char *)cfg + k->offset;
        switch (k->type) {
        case K_STR:
            fprintf(f, "%s = %s\n", k->key, k->secret ? "********" : *(char *const *)base);
            break;
        case K_UINT:
            fprintf(f, "%s = %u\n", k->key, *(const unsigned *)base);
            break;
        case K_ULONG:
            fprintf(f, "%s = %lu\n", k->key, *(const unsigned long *)base);
            break;
        case K_MS: {
            char d[32];
            config_format_duration(*(const uint64_t *)base, d, sizeof(d));
            fprintf(f, "%s = %s\n", k->key, d);
            break;
        }
        case K_ENUM:
            fprintf(f, "%s = %s\n", k->key, config_enum_name(k->section, k->key, *(const int *)base));
            break;
        }
    }
}

/* The enumerated key [section] key, or NULL. */
static const key_def_t *find_enum(const char *section, const char *key)
{
    const key_def_t *k = find_key(section, key);
    return k && k->type == K_ENUM ? k : NULL;
}

int config_enum_parse(const char *section, const char *key, const char *s)
{
    const key_def_t *k = find_enum(section, key);
    return k && s ? enum_value(k->names, s) : -1;
}

const char *config_enum_name(const char *section, const char *key, int value)
{
    const key_def_t *k = find_enum(section, key);
    for (const enum_name_t *n = k ? k->names : NULL; n && n->name; n++)
        if (n->value == value)
            return n->name;
    return "?";
}

void config_enum_list(const char *section, const char *key, const char *sep, char *out, size_t outlen)
{
    const key_def_t *k = find_enum(section, key);
    if (k)
        enum_list(k->names, sep, out, outlen);
    else if (outlen)
        out[0] = '\0';
}

/*
 * SUMMARY
 *  deliverer/throttle.c - per-domain message-rate limits (GCRA), one
 *  table per process.
 * DESCRIPTION
 *  Each rule keeps a theoretical arrival time (tat): the earliest moment
 *  its next message may go. A message at now waits max(0, tat - now); a
 *  wait within the caller's limit moves tat one interval past
 *  max(tat, now). Without a burst allowance the spacing is exact, which
 *  is what a receiver's "N per period" limit can count on.
 */
#include "deliverer/throttle.h"

#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/htable.h"
#include "core/log.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/deliver.h"
#include "metrics/metrics.h"

#define THROTTLE_RULE_LEN 64

typedef struct rule {
    char   name[THROTTLE_RULE_LEN]; /* "gmail.com" or ".yahoo.com" */
    size_t namelen;
    char   text[THROTTLE_RULE_LEN + 24]; /* "gmail.com:100/s" */
    double interval_ms;
    double tat_ms; /* guarded by the table's lock */
} rule_t;

struct throttle {
    pthread_mutex_t lock;
    rule_t         *rules;
    size_t          nrules;
};

/* "name:N/s|m|h" of length n into r; -1 when it is not one. */
static int parse_rule(const char *s, size_t n, rule_t *r)
{
    const char *colon = memchr(s, ':', n);
    if (colon == NULL || colon == s || (size_t)(colon - s) >= sizeof(r->name))
        return -1;
    size_t nl = (size_t)(colon - s);
    for (size_t i = 0; i < nl; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '.' || s[i] == '-'))
            return -1;
    if (nl == 1 && s[0] == '.')
        return -1;
    const char *p = colon + 1, *end = s + n;
    if (p >= end || !isdigit((unsigned char)*p))
        return -1;
    unsigned long rate = 0;
    while (p < end && isdigit((unsigned char)*p)) {
        rate = rate * 10 + (unsigned long)(*p - '0');
        if (rate > 1000000)
            return -1;
        p++;
    }
    if (rate == 0 || p + 2 != end || p[0] != '/')
        return -1;
    double period;
    switch (p[1]) {
    case 's': period = 1000.0; break;
    case 'm': period = 60000.0; break;
    case 'h': period = 3600000.0; break;
    default: return -1;
    }
    memcpy(r->name, s, nl);
    r->name[nl] = '\0';
    r->namelen = nl;
    snprintf(r->text, sizeof(r->text), "%.*s", (int)n, s);
    r->interval_ms = period / (double)rate;
    r->tat_ms = 0;
    return 0;
}

/* A deliver_map_check_fn: a rule parse_rule() takes. */
static int rule_check(const deliver_map_entry_t *e, char *err, size_t errlen)
{
    rule_t r;
    if (parse_rule(e->entry, e->elen, &r) == 0)
        return 0;
    snprintf(err, errlen, "\"%.*s\" is not domain:N/s, domain:N/m or domain:N/h "
             "(N from 1 to 1000000; .domain also matches subdomains)", (int)e->elen, e->entry);
    return -1;
}

int throttle_new(const char *spec, throttle_t **out, char *err, size_t errlen)
{
    *out = NULL;
    rule_t *rules = NULL;
    size_t n = 0;
    deliver_map_entry_t e;
    while (deliver_map_next(&spec, &e)) {
        rule_t r;
        if (parse_rule(e.entry, e.elen, &r) < 0) {
            char why[256];
            rule_check(&e, why, sizeof(why));
            snprintf(err, errlen, "[smtp] rate_limits: %s", why);
            free(rules);
            return -1;
        }
        rules = xrealloc(rules, (n + 1) * sizeof(*rules));
        rules[n++] = r;
    }
    if (n == 0)
        return 0;
    throttle_t *t = xcalloc(1, sizeof(*t));
    pthread_mutex_init(&t->lock, NULL);
    t->rules = rules;
    t->nrules = n;
    *out = t;
    return 0;
}

int throttle_load(const char *spec, const char *path, throttle_t **out, char *err, size_t errlen)
{
    char *all;
    *out = NULL;
    if (deliver_map_load("[smtp] rate_limits_file", spec, path, rule_check, &all, err, errlen) < 0)
        return -1;
    int rc = throttle_new(all, out, err, errlen);
    free(all);
    return rc;
}

void throttle_free(throttle_t *t)
{
    if (t == NULL)
        return;
    pthread_mutex_destroy(&t->lock);
    free(t->rules);
    free(t);
}

static rule_t *find_rule(const throttle_t *t, const char *domain)
{
    if (t == NULL || domain == NULL)
        return NULL;
    for (size_t i = 0; i < t->nrules; i++) /* names never change: no lock */
        if (deliver_domain_matches(t->rules[i].name, t->rules[i].namelen, domain))
            return &t->rules[i];
    return NULL;
}

int throttle_rule(const throttle_t *t, const char *domain, double *interval_ms, char *rule, size_t rulelen)
{
    const rule_t *r = find_rule(t, domain);
    if (r == NULL)
        return 0;
    if (interval_ms)
        *interval_ms = r->interval_ms;
    if (rule && rulelen)
        snprintf(rule, rulelen, "%s", r->text);
    return 1;
}

int64_t throttle_take(throttle_t *t, const char *domain, uint64_t now_ms, uint64_t max_wait_ms, char *rule,
                      size_t rulelen)
{
    rule_t *r = find_rule(t, domain);
    if (r == NULL)
        return -1;
    if (rule && rulelen)
        snprintf(rule, rulelen, "%s", r->text);
    double now = (double)now_ms;
    pthread_mutex_lock(&t->lock);
    double tat = r->tat_ms > now ? r->tat_ms : now;
    double wait = tat - now;
    if (wait <= (double)max_wait_ms)
        r->tat_ms = tat + r->interval_ms;
    pthread_mutex_unlock(&t->lock);
    return (int64_t)(wait + 0.999); /* a fraction of a ms waits one more */
}

/* GCRA on Redis' clock: the key holds the rule's theoretical arrival time
 * (ms), kept a little longer than it matters. Fractions of a ms are kept
 * (%.3f) so 7/m stays 8571.429 ms apart. */
static const char throttle_redis_script[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000\n"
    "local interval = tonumber(ARGV[1])\n"
    "local maxwait = tonumber(ARGV[2])\n"
    "local tat = tonumber(redis.call('GET', KEYS[1])) or now\n"
    "if tat < now then tat = now end\n"
    "local wait = tat - now\n"
    "if wait <= maxwait then\n"
    "  redis.call('SET', KEYS[1], string.format('%.3f', tat + interval), 'PX',\n"
    "             math.ceil(wait + interval) + 1000)\n"
    "end\n"
    "return math.ceil(wait)\n";

/* ---- keyed budgets (throttle_ask_rate): the process's fallback ---- */

typedef struct keyed {
    htable_node_t node;
    char         *rule;
    double        tat_ms;
} keyed_t;

static pthread_mutex_t keyed_lock = PTHREAD_MUTEX_INITIALIZER;
static htable_t        keyed_table;
static int             keyed_init;

/* Drops budgets whose next slot is a minute in the past: they would
 * answer "now" anyway. Called with the lock held, when the table grows. */
static void keyed_sweep(double now)
{
    htable_iter_t it;
    htable_iter_init(&it, &keyed_table);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        keyed_t *k = HTABLE_ENTRY(n, keyed_t, node);
        if (k->tat_ms + 60000.0 < now) {
            htable_remove(&keyed_table, &k->node);
            free(k->rule);
            free(k);
        }
    }
}

static int64_t keyed_take(const char *rule, double interval_ms, uint64_t now_ms, uint64_t max_wait_ms)
{
    double now = (double)now_ms;
    pthread_mutex_lock(&keyed_lock);
    if (!keyed_init) {
        htable_init(&keyed_table, HTABLE_STR, 64, NULL);
        keyed_init = 1;
    }
    htable_node_t *n = htable_find_str(&keyed_table, rule);
    keyed_t *k;
    if (n == NULL) {
        if (htable_count(&keyed_table) >= 4096)
            keyed_sweep(now);
        k = xcalloc(1, sizeof(*k));
        k->rule = xstrdup(rule);
        htable_insert_str(&keyed_table, &k->node, k->rule);
    } else {
        k = HTABLE_ENTRY(n, keyed_t, node);
    }
    double tat = k->tat_ms > now ? k->tat_ms : now;
    double wait = tat - now;
    if (wait <= (double)max_wait_ms)
        k->tat_ms = tat + interval_ms;
    pthread_mutex_unlock(&keyed_lock);
    return (int64_t)(wait + 0.999);
}

int throttle_parse_rate(const char *s, double *interval_ms)
{
    rule_t r;
    char buf[48];
    if (s == NULL || strlen(s) > 24)
        return -1;
    snprintf(buf, sizeof(buf), "x:%s", s);
    if (parse_rule(buf, strlen(buf), &r) < 0)
        return -1;
    *interval_ms = r.interval_ms;
    return 0;
}

static int throttle_ask_redis(throttle_ask_t *ask, double interval, throttle_answer_t *now);

static int throttle_local(throttle_ask_t *ask, throttle_answer_t *ans, int fallback)
{
    if (ask->interval_ms > 0)
        ans->wait_ms = keyed_take(ask->rule, ask->interval_ms, util_mono_ms(), ask->max_wait_ms);
    else
        ans->wait_ms = throttle_take(ask->t, ask->domain, util_mono_ms(), ask->max_wait_ms, NULL, 0);
    ans->rule = ask->rule;
    ans->local_fallback = fallback;
    return 1;
}

static void throttle_on_reply(void *arg, const redisReply *reply, const char *err)
{
    throttle_ask_t *ask = arg;
    throttle_answer_t ans;
    ask->op = 0;
    if (reply && reply->type == REDIS_REPLY_INTEGER) {
        ans.wait_ms = reply->integer;
        ans.rule = ask->rule;
        ans.local_fallback = 0;
    } else {
        metrics_inc(MET_RATE_LIMIT_REDIS_ERRORS, 1);
        log_debug("throttle", "redis_failed", "domain=%s rule=%s error=%s", LOG_Q(ask->domain), LOG_Q(ask->rule),
                  LOG_Q(err ? err : "unexpected reply"));
        throttle_local(ask, &ans, 1);
    }
    ask->cb(ask->arg, &ans);
}

int throttle_ask_start(throttle_ask_t *ask, throttle_t *t, rclient_t *rc, const char *domain,
                       uint64_t max_wait_ms, throttle_cb cb, void *arg, throttle_answer_t *now)
{
    double interval = 0;
    memset(ask, 0, sizeof(*ask));
    ask->t = t;
    ask->rc = rc;
    ask->domain = domain;
    ask->max_wait_ms = max_wait_ms;
    ask->cb = cb;
    ask->arg = arg;
    if (!throttle_rule(t, domain, &interval, ask->rule, sizeof(ask->rule))) {
        *now = (throttle_answer_t){ .wait_ms = -1, .rule = ask->rule };
        return 1;
    }
    return throttle_ask_redis(ask, interval, now);
}

int throttle_ask_rate(throttle_ask_t *ask, rclient_t *rc, const char *rule, double interval_ms,
                      uint64_t max_wait_ms, throttle_cb cb, void *arg, throttle_answer_t *now)
{
    memset(ask, 0, sizeof(*ask));
    ask->rc = rc;
    ask->domain = ask->rule;
    ask->max_wait_ms = max_wait_ms;
    ask->cb = cb;
    ask->arg = arg;
    ask->interval_ms = interval_ms > 0 ? interval_ms : 1;
    snprintf(ask->rule, sizeof(ask->rule), "%s", rule);
    return throttle_ask_redis(ask, ask->interval_ms, now);
}

/* The fleet's budget for ask->rule, or the local table's answer now. */
static int throttle_ask_redis(throttle_ask_t *ask, double interval, throttle_answer_t *now)
{
    rclient_t *rc = ask->rc;
    uint64_t max_wait_ms = ask->max_wait_ms;
    if (rc == NULL || !rclient_connected(rc))
        return throttle_local(ask, now, 0);
    char key[192], iv[32], mw[32];
    snprintf(key, sizeof(key), "mp:rl:%s", ask->rule);
    snprintf(iv, sizeof(iv), "%.3f", interval);
    snprintf(mw, sizeof(mw), "%llu", (unsigned long long)max_wait_ms);
    const char *argv[] = { "EVAL", throttle_redis_script, "1", key, iv, mw };
    ask->op = rclient_commandargv(rc, throttle_on_reply, ask, 6, argv, NULL);
    return 0;
}

void throttle_ask_cancel(throttle_ask_t *ask)
{
    if (ask->op && ask->rc)
        rclient_cancel(ask->rc, ask->op);
    ask->op = 0;
}

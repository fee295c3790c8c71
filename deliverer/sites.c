/*
 * SUMMARY
 *  deliverer/sites.c - per-site caps on running and waiting domain legs.
 * DESCRIPTION
 *  A site (sites.h) is remembered while a leg runs in it or waits for it,
 *  in a hash table keyed by its name. Each has a FIFO of waiting legs and
 *  a timer for the oldest one's max_wait_ms; a place given back puts the
 *  site on the pending list, and one zero-delay timer per table grants
 *  what it can from the pending sites only, so a callback never runs
 *  inside sites_enter() or sites_leave(), and waiters at other sites
 *  cost nothing.
 *
 *  The allow function is told what the worker would like (running +
 *  waiting, at most the limit) whenever that changes, and answers the
 *  worker's current share; a site freed tells it 0, so that a fleet-wide
 *  lease is given back.
 * DIAGNOSTICS
 *  Log line site_parked (info); counters in sites_get_stats().
 */
#include "deliverer/sites.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpsl.h>

#include "core/htable.h"
#include "core/log.h"
#include "core/util.h"

typedef struct site {
    htable_node_t node;
    char         *name;
    unsigned      limit;   /* 0 = none */
    int           strict;  /* an explicit limit: idle connections count too */
    unsigned      running;
    unsigned      nwait;
    unsigned      wanted;  /* last want told to the allow function */
    int           pending; /* on t->pending */
    int           pinned;  /* a callback runs with it in hand */
    TAILQ_HEAD(, site_slot) waits;
    TAILQ_ENTRY(site) plink;
    loop_timer_t  timer;   /* the oldest waiter's max_wait */
    sites_t      *t;
} site_t;

struct sites {
    loop_t        *loop;
    sites_config_t cfg;
    sites_allow_fn allow;
    void          *allow_arg;
    sites_idle_fn  idle;      /* idle connections kept for a key; NULL: none counted */
    sites_trim_fn  trim;
    void          *idle_arg;
    htable_t       table;
    TAILQ_HEAD(, site) pending;
    loop_timer_t   wake;
    size_t         running, waiting;
    uint64_t       parked;
    char           why[320];
};

/* ---- configuration ---- */

int sites_limits_parse(const char *s, sites_config_t *cfg, char *err, size_t errlen)
{
    cfg->limits = NULL;
    cfg->nlimits = 0;
    if (s == NULL)
        return 0;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == ',' || *p == '\n')
            p++;
        if (*p == '\0')
            return 0;
        const char *start = p;
        while (*p && *p != ' ' && *p != '\t' && *p != ',' && *p != '\n')
            p++;
        size_t len = (size_t)(p - start);
        const char *eq = memchr(start, '=', len);
        char *end = NULL;
        unsigned long n = 0;
        if (eq != NULL && eq > start && eq + 1 < p) {
            n = strtoul(eq + 1, &end, 10);
        }
        if (eq == NULL || eq == start || end != p || n == 0 || n > 1000000) {
            snprintf(err, errlen, "site limit \"%.*s\": expected SITE=CONNECTIONS (1 to 1000000)", (int)len, start);
            sites_config_free(cfg);
            return -1;
        }
        cfg->limits = xrealloc(cfg->limits, (cfg->nlimits + 1) * sizeof(*cfg->limits));
        site_limit_t *l = &cfg->limits[cfg->nlimits++];
        l->site = xstrndup(start, (size_t)(eq - start));
        for (char *c = l->site; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        l->connections = (unsigned)n;
    }
}

void sites_config_free(sites_config_t *cfg)
{
    for (size_t i = 0; i < cfg->nlimits; i++)
        free(cfg->limits[i].site);
    free(cfg->limits);
    cfg->limits = NULL;
    cfg->nlimits = 0;
}

void sites_name(const char *host, char *out, size_t n)
{
    char h[256];
    size_t len = strlen(host);
    while (len > 0 && host[len - 1] == '.')
        len--;
    if (len >= sizeof(h))
        len = sizeof(h) - 1;
    for (size_t i = 0; i < len; i++)
        h[i] = (char)tolower((unsigned char)host[i]);
    h[len] = '\0';
    unsigned char addr[16];
    const char *reg = NULL;
    if (inet_pton(AF_INET, h, addr) != 1 && inet_pton(AF_INET6, h, addr) != 1)
        reg = psl_registrable_domain(psl_builtin(), h);
    snprintf(out, n, "%s", reg ? reg : h);
}

/* ---- the table ---- */

static const site_limit_t *named_limit(const sites_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->nlimits; i++)
        if (strcmp(cfg->limits[i].site, name) == 0)
            return &cfg->limits[i];
    return NULL;
}

static unsigned limit_of(const sites_config_t *cfg, const char *name)
{
    const site_limit_t *l = named_limit(cfg, name);
    return l ? l->connections : cfg->max_connections;
}

int sites_limit_named(const sites_t *t, const char *site)
{
    return !t->cfg.disabled && named_limit(&t->cfg, site) != NULL;
}

unsigned sites_limit(const sites_t *t, const char *site)
{
    return t->cfg.disabled ? 0 : limit_of(&t->cfg, site);
}

static void site_expired(loop_t *loop, loop_timer_t *tm, void *arg);

static site_t *site_get(sites_t *t, const char *name)
{
    htable_node_t *n = htable_find_str(&t->table, name);
    if (n != NULL)
        return HTABLE_ENTRY(n, site_t, node);
    site_t *s = xcalloc(1, sizeof(*s));
    s->name = xstrdup(name);
    s->limit = t->cfg.disabled ? 0 : limit_of(&t->cfg, name);
    s->strict = sites_limit_named(t, name);
    s->t = t;
    TAILQ_INIT(&s->waits);
    loop_timer_init(&s->timer, site_expired, s);
    htable_insert_str(&t->table, &s->node, s->name);
    return s;
}

/* Idle pooled connections the worker keeps for the key: they are open at
 * the receiver, so they count against the limit like running legs. */
static unsigned idle_of(const sites_t *t, const site_t *s)
{
    return s->limit && s->strict && t->idle ? t->idle(t->idle_arg, s->name) : 0;
}

/* Tell the allow function what this worker would like now (extra: a leg
 * asking to enter, not counted yet); its answer is the worker's
 * allowance. */
static unsigned allowance_for(sites_t *t, site_t *s, unsigned extra)
{
    if (s->limit == 0)
        return (unsigned)-1;
    unsigned want = s->running + s->nwait + extra + idle_of(t, s);
    if (want > s->limit)
        want = s->limit;
    s->wanted = want;
    if (t->allow == NULL)
        return s->limit;
    return t->allow(t->allow_arg, s->name, s->limit, want);
}

static unsigned allowance(sites_t *t, site_t *s)
{
    return allowance_for(t, s, 0);
}

static void site_gc(sites_t *t, site_t *s)
{
    if (s->running || s->nwait || s->pinned || idle_of(t, s))
        return;
    if (s->limit && t->allow && s->wanted)
        t->allow(t->allow_arg, s->name, s->limit, 0); /* give the share back */
    if (s->pending)
        TAILQ_REMOVE(&t->pending, s, plink);
    loop_timer_cancel(t->loop, &s->timer);
    htable_remove(&t->table, &s->node);
    free(s->name);
    free(s);
}

static void arm_expiry(sites_t *t, site_t *s)
{
    site_slot_t *w = TAILQ_FIRST(&s->waits);
    if (w == NULL) {
        loop_timer_cancel(t->loop, &s->timer);
        return;
    }
    uint64_t now = loop_now_ms(t->loop);
    uint64_t at = w->since + t->cfg.max_wait_ms;
    loop_timer_set(t->loop, &s->timer, at > now ? at - now : 0);
}

static void mark_pending(sites_t *t, site_t *s)
{
    if ((s->nwait > 0 || idle_of(t, s) > 0) && !s->pending) {
        s->pending = 1;
        TAILQ_INSERT_TAIL(&t->pending, s, plink);
    }
    if (!TAILQ_EMPTY(&t->pending) && !loop_timer_active(&t->wake))
        loop_timer_set(t->loop, &t->wake, 0);
}

static void unlink_wait(sites_t *t, site_t *s, site_slot_t *w)
{
    TAILQ_REMOVE(&s->waits, w, link);
    s->nwait--;
    t->waiting--;
    w->state = 0;
}

static void count_park(sites_t *t, site_t *s, const char *how)
{
    t->parked++;
    snprintf(t->why, sizeof(t->why), "parked: site %s has %u of %u connections busy and %u messages waiting (%s)",
             s->name, s->running, s->limit, s->nwait, how);
    log_info("sites", "site_parked", "site=%s running=%u limit=%u waiting=%u cause=%s", LOG_Q(s->name), s->running,
             s->limit, s->nwait, how);
}

static void site_expired(loop_t *loop, loop_timer_t *tm, void *arg)
{
    site_t *s = arg;
    sites_t *t = s->t;
    uint64_t now = loop_update_time(loop);
    s->pinned++;
    site_slot_t *w;
    while ((w = TAILQ_FIRST(&s->waits)) != NULL && w->since + t->cfg.max_wait_ms <= now) {
        unlink_wait(t, s, w);
        w->site = NULL;
        count_park(t, s, "waited too long");
        w->cb(w->arg, SITE_PARK, t->why);
    }
    s->pinned--;
    arm_expiry(t, s);
    allowance(t, s); /* less is wanted now */
    site_gc(t, s);
}

/* Connections beyond the worker's allowance (its share shrank, or a leg
 * gave back its place and its session stayed idle) are closed: idle ones
 * first, down to what the running legs leave of the allowance. */
static void enforce(sites_t *t, site_t *s)
{
    if (s->limit == 0 || t->trim == NULL)
        return;
    unsigned idle = idle_of(t, s);
    if (idle == 0)
        return;
    unsigned allow = allowance(t, s);
    if (s->running + idle <= allow)
        return;
    t->trim(t->idle_arg, s->name, allow > s->running ? allow - s->running : 0);
    allowance(t, s); /* less is wanted now */
}

static void wake_fired(loop_t *loop, loop_timer_t *tm, void *arg)
{
    sites_t *t = arg;
    site_t *s;
    while ((s = TAILQ_FIRST(&t->pending)) != NULL) {
        TAILQ_REMOVE(&t->pending, s, plink);
        s->pending = 0;
        s->pinned++;
        site_slot_t *w;
        while ((w = TAILQ_FIRST(&s->waits)) != NULL && s->running < allowance(t, s)) {
            unlink_wait(t, s, w);
            w->state = SITE_GO;
            s->running++;
            t->running++;
            w->cb(w->arg, SITE_GO, NULL);
        }
        enforce(t, s);
        s->pinned--;
        arm_expiry(t, s);
        site_gc(t, s);
    }
}

unsigned sites_held(const sites_t *t, const char *key)
{
    htable_node_t *n = htable_find_str(&t->table, key);
    if (n == NULL)
        return 0;
    const site_t *s = HTABLE_ENTRY(n, site_t, node);
    return s->running + idle_of(t, s);
}

void sites_set_idle(sites_t *t, sites_idle_fn idle, sites_trim_fn trim, void *arg)
{
    t->idle = idle;
    t->trim = trim;
    t->idle_arg = arg;
}

void sites_tick(sites_t *t)
{
    if (t->idle == NULL)
        return;
    htable_iter_t it;
    htable_iter_init(&it, &t->table);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        site_t *s = HTABLE_ENTRY(n, site_t, node);
        if (s->pinned)
            continue;
        if (s->limit)
            allowance(t, s); /* the idle ones may have gone */
        enforce(t, s);
        site_gc(t, s);
    }
}

sites_t *sites_new(loop_t *loop, const sites_config_t *cfg, sites_allow_fn allow, void *allow_arg)
{
    sites_t *t = xcalloc(1, sizeof(*t));
    t->loop = loop;
    t->cfg = *cfg;
    t->cfg.limits = NULL; /* the caller's: looked up through t->cfg.nlimits below */
    t->cfg.nlimits = 0;
    for (size_t i = 0; i < cfg->nlimits; i++) {
        t->cfg.limits = xrealloc(t->cfg.limits, (i + 1) * sizeof(*t->cfg.limits));
        t->cfg.limits[i].site = xstrdup(cfg->limits[i].site);
        t->cfg.limits[i].connections = cfg->limits[i].connections;
        t->cfg.nlimits = i + 1;
    }
    t->allow = allow;
    t->allow_arg = allow_arg;
    htable_init(&t->table, HTABLE_STR, 16, NULL);
    TAILQ_INIT(&t->pending);
    loop_timer_init(&t->wake, wake_fired, t);
    return t;
}

void sites_free(sites_t *t)
{
    if (t == NULL)
        return;
    loop_timer_cancel(t->loop, &t->wake);
    htable_iter_t it;
    htable_iter_init(&it, &t->table);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        site_t *s = HTABLE_ENTRY(n, site_t, node);
        site_slot_t *w;
        while ((w = TAILQ_FIRST(&s->waits)) != NULL) {
            unlink_wait(t, s, w);
            w->site = NULL;
            w->cb(w->arg, SITE_PARK, "parked: the worker is stopping");
        }
        loop_timer_cancel(t->loop, &s->timer);
        htable_remove(&t->table, &s->node);
        free(s->name);
        free(s);
    }
    htable_fini(&t->table);
    sites_config_free(&t->cfg);
    free(t);
}

int sites_enter(sites_t *t, const char *site, site_slot_t *slot, sites_cb cb, void *arg, const char **why)
{
    return sites_enter_limit(t, site, SITES_LIMIT_CONFIG, 0, slot, cb, arg, why);
}

int sites_enter_limit(sites_t *t, const char *site, unsigned limit, int strict, site_slot_t *slot, sites_cb cb,
                      void *arg, const char **why)
{
    memset(slot, 0, sizeof(*slot));
    site_t *s = site_get(t, site);
    if (limit != SITES_LIMIT_CONFIG)
        s->strict = strict != 0;
    if (limit != SITES_LIMIT_CONFIG && limit != s->limit) {
        /* a shaping rule or action names this key's limit; a raised one
         * lets waiters in, a lowered one opens nothing new until the
         * running legs are below it */
        unsigned old = s->limit;
        s->limit = limit; /* the allow function hears it with the next want */
        if (old == 0 || (limit && limit > old) || limit == 0)
            mark_pending(t, s);
    }
    slot->site = s;
    slot->cb = cb;
    slot->arg = arg;
    if (s->limit == 0 || (s->nwait == 0 && s->running < allowance_for(t, s, 1))) {
        slot->state = SITE_GO;
        s->running++;
        t->running++;
        if (s->limit)
            allowance(t, s);
        return SITE_GO;
    }
    if (s->nwait >= t->cfg.max_waiting || t->cfg.max_wait_ms == 0) {
        count_park(t, s, "too many waiting");
        if (why)
            *why = t->why;
        slot->site = NULL;
        site_gc(t, s);
        return SITE_PARK;
    }
    slot->state = SITE_WAIT;
    slot->since = loop_now_ms(t->loop);
    TAILQ_INSERT_TAIL(&s->waits, slot, link);
    s->nwait++;
    t->waiting++;
    if (s->nwait == 1)
        arm_expiry(t, s);
    allowance(t, s); /* more is wanted */
    return SITE_WAIT;
}

void sites_leave(sites_t *t, site_slot_t *slot)
{
    site_t *s = slot->site;
    if (s == NULL || slot->state == 0)
        return;
    if (slot->state == SITE_GO) {
        s->running--;
        t->running--;
        mark_pending(t, s);
    } else {
        int head = TAILQ_FIRST(&s->waits) == slot;
        unlink_wait(t, s, slot);
        if (head)
            arm_expiry(t, s);
    }
    slot->state = 0;
    slot->site = NULL;
    if (s->limit)
        allowance(t, s);
    site_gc(t, s);
}

void sites_allowance_changed(sites_t *t, const char *site)
{
    htable_node_t *n = htable_find_str(&t->table, site);
    if (n != NULL)
        mark_pending(t, HTABLE_ENTRY(n, site_t, node));
}

void sites_get_stats(const sites_t *t, sites_stats_t *st)
{
    st->sites = htable_count(&t->table);
    st->running = t->running;
    st->waiting = t->waiting;
    st->parked = t->parked;
}

void sites_each(const sites_t *t, sites_each_fn fn, void *arg)
{
    htable_iter_t it;
    htable_iter_init(&it, &t->table);
    htable_node_t *n;
    while ((n = htable_iter_next(&it)) != NULL) {
        const site_t *s = HTABLE_ENTRY(n, site_t, node);
        fn(arg, s->name, s->running, s->nwait);
    }
}

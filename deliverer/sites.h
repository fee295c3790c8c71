/*
 * deliverer/sites.h - destination isolation: per site, a cap on the
 * deliveries a worker runs at once and on the ones waiting for them.
 *
 * A site is where mail for a domain really goes: the registrable domain
 * (public suffix list) of its best MX host, so every domain served by
 * *.google.com is one site, google.com. In relay mode the smarthost is
 * the one site.
 *
 * A domain leg enters its site before it talks SMTP and leaves it when
 * its attempt ends (sites_enter(), sites_leave()). A site runs at most
 * its allowance of legs at once: the site's connection limit
 * ([smtp] site_max_connections, or an entry of [smtp] site_limits), of
 * which this worker's share comes from the allow function (the fleet's
 * leases in Redis, or a share of the process). A leg beyond it waits in
 * the site's FIFO; one that finds max_waiting legs waiting already, or
 * that waited max_wait_ms, is parked instead: its recipients go back to
 * the delay queues without spending an attempt, and it holds nothing
 * while the site is busy. A slow, tarpitting or deferring site therefore
 * holds at most allowance + max_waiting of a worker's messages, and the
 * others go on.
 *
 * A leg in the site holds one SMTP connection at a time (deliver.c runs
 * one transaction at a time), so the legs counted are the connections in
 * use; idle pooled ones are not counted (the pool closes them after
 * pool_idle_ms).
 *
 * Thread-safety: none; one table per worker loop.
 */
#ifndef MP_DELIVERER_SITES_H
#define MP_DELIVERER_SITES_H

#include <stddef.h>
#include <stdint.h>

#include "core/list.h"
#include "core/loop.h"

typedef struct site_limit {
    char    *site;
    unsigned connections;
} site_limit_t;

typedef struct sites_config {
    int           disabled;        /* no caps, no parking: every leg goes at once */
    unsigned      max_connections; /* fleet-wide connections per site; 0 = no limit */
    unsigned      max_waiting;     /* legs waiting per site and worker before new ones are parked */
    unsigned      max_wait_ms;     /* a leg waits at most this long, then is parked */
    site_limit_t *limits;          /* per-site connection limits, overriding max_connections */
    size_t        nlimits;
} sites_config_t;

/* Builds cfg->limits from "site=N site=N ..." (blanks or commas between);
 * 0 or -1 with err filled. sites_config_free() releases it. */
int  sites_limits_parse(const char *s, sites_config_t *cfg, char *err, size_t errlen);
void sites_config_free(sites_config_t *cfg);

/* The site of an MX host (or relay host) name: its registrable domain,
 * lower case, without a trailing dot; the name itself when it has none
 * (a public suffix, a single label, an address literal). */
void sites_name(const char *host, char *out, size_t n);

/* This worker's share of a site's fleet-wide limit, given what it would
 * like (already at most limit); it may change later (sites_allowance_changed). */
typedef unsigned (*sites_allow_fn)(void *arg, const char *site, unsigned limit, unsigned want);

typedef struct sites sites_t;

enum { SITE_PARK = 0, SITE_GO = 1, SITE_WAIT = 2 };

/* Fires once for a waiting enter (never inside sites_enter()): SITE_GO,
 * the leg now holds its place; or SITE_PARK with why, it waited
 * max_wait_ms or the table is being freed (why valid during the call). */
typedef void (*sites_cb)(void *arg, int how, const char *why);

/* A leg's place, embedded in the leg. */
typedef struct site_slot {
    TAILQ_ENTRY(site_slot) link;
    struct site           *site;
    sites_cb               cb;
    void                  *arg;
    uint64_t               since;
    int                    state; /* 0 none, SITE_WAIT queued, SITE_GO holding */
} site_slot_t;

typedef struct sites_stats {
    size_t   sites;   /* known: something running or waiting */
    size_t   running; /* legs holding a place */
    size_t   waiting; /* legs in a FIFO */
    uint64_t parked;  /* legs parked since the start */
} sites_stats_t;

/* allow may be NULL: the whole limit is the worker's. */
sites_t *sites_new(loop_t *loop, const sites_config_t *cfg, sites_allow_fn allow, void *allow_arg);
/* Parks the waiters (SITE_PARK), then frees; holders must have left. */
void     sites_free(sites_t *t);

/* SITE_GO (slot holds a place now), SITE_WAIT (cb decides later), or
 * SITE_PARK (nothing held; park the leg). *why (optional) gets the reason
 * for a park, valid until the next call. */
int  sites_enter(sites_t *t, const char *site, site_slot_t *slot, sites_cb cb, void *arg, const char **why);
/* sites_enter() with the key's connection limit given (0 = none) instead
 * of looked up in the configuration (SITES_LIMIT_CONFIG): shaping rules
 * and actions name limits per destination and source. The limit given
 * last is the key's until it is forgotten (nothing running or waiting).
 * strict: an explicit limit (a shaping rule, an action, a site_limits
 * entry), under which idle connections count as well (below); the
 * default cap (site_max_connections) counts the running legs only. A
 * configured site_limits entry is strict by itself. */
#define SITES_LIMIT_CONFIG ((unsigned)-1)
int  sites_enter_limit(sites_t *t, const char *site, unsigned limit, int strict, site_slot_t *slot, sites_cb cb,
                       void *arg, const char **why);
/* 1 when [smtp] site_limits names site (and the caps are on). */
int  sites_limit_named(const sites_t *t, const char *site);
/* Gives back the place held, or withdraws the wait; harmless otherwise. */
void sites_leave(sites_t *t, site_slot_t *slot);
/* The allow function's answer for site may have changed: runs waiters
 * the new allowance lets in (from a zero-delay timer). */
void sites_allowance_changed(sites_t *t, const char *site);
/* Idle connections count, under a strict limit: the pool keeps a session open after its leg
 * gave back its place, and the receiver counts it. idle says how many
 * the worker keeps for a key; trim closes those beyond keep. With them a
 * key's want is running + waiting + idle, a key stays known while it has
 * idle connections, and whenever the worker's allowance is below running
 * + idle (a place given back, a share that shrank, sites_tick()) the idle
 * ones beyond it are closed, from the table's zero-delay timer (never
 * inside sites_enter() or sites_leave()). */
typedef unsigned (*sites_idle_fn)(void *arg, const char *key);
typedef void (*sites_trim_fn)(void *arg, const char *key, unsigned keep);
void sites_set_idle(sites_t *t, sites_idle_fn idle, sites_trim_fn trim, void *arg);
/* Every second: re-tells the allow function what each key wants (idle
 * connections close by themselves), closes what is beyond the allowance,
 * forgets keys with nothing left. */
void sites_tick(sites_t *t);
/* The connections the worker holds for key: running legs and idle ones. */
unsigned sites_held(const sites_t *t, const char *key);
/* The connection limit the configuration gives site (0 = none, or the caps are off). */
unsigned sites_limit(const sites_t *t, const char *site);
void sites_get_stats(const sites_t *t, sites_stats_t *st);
/* Every known key (destination[@source]) with its legs running and
 * waiting, in no particular order (the worker's status record). */
typedef void (*sites_each_fn)(void *arg, const char *key, unsigned running, unsigned waiting);
void sites_each(const sites_t *t, sites_each_fn fn, void *arg);

#endif

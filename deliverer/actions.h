/*
 * deliverer/actions.h - fleet-wide shaping actions (suspend, bounce, lower
 * the rate or the connection limit of a destination for a while), shared
 * through Redis so that every worker of every pod honours them within
 * about a second, until they expire.
 *
 * An action says what to do (kind), to which deliveries (a selector: one
 * of site, domain, source, pool, tenant, campaign, and its value; plus an
 * optional source qualification: "" = through any source, else only
 * deliveries through that source) and until when (expires_ms, Unix ms).
 * Automation rules create them when a reply matches (origin
 * "automation:<rule>", id derived from what it does, so a repeated
 * trigger extends the one action instead of adding another); operators
 * create them with `mailpump admin` (control/admin.h: ids of their own,
 * origin "admin:<who>", written with the same script).
 *
 * Data in Redis (fixed keys):
 *   mp:act     hash, field = action id, value = the action as one compact
 *              JSON object: {"id","kind","sel","value","source","rate",
 *              "rate_text","conn","created","expires","reason","origin"}
 *              (kind and sel by name, e.g. "connection_limit", "site";
 *              created and expires in Unix ms)
 *   mp:act@v   counter, incremented by every change of mp:act
 * Writes are one EVAL of ACTIONS_WRITE_SCRIPT carrying, in order, every
 * add and remove not yet written ("+" json, "-" id). The script drops the
 * fields whose expires has passed on Redis' clock (TIME), merges an add
 * with the field of the same id (expires = the later of both, created =
 * the earlier, everything else from the add, the newer trigger), deletes
 * for a remove, INCRs mp:act@v when anything changed and sets mp:act's
 * PEXPIREAT to the latest expiry, so the hash disappears with its last
 * action. The same merge runs locally in actions_add().
 *
 * Reads: every poll_ms (default 1000) one EVAL of ACTIONS_POLL_SCRIPT,
 * which returns the version and, only when it differs from the one this
 * table last read (and at least every 10 s anyway), the whole hash. So N
 * workers x M pods cost one small command per worker per second while
 * nothing changes. Every field is validated (a JSON object of the shape
 * above, known kind and selector, strings that fit, the field named by its
 * id, a positive rate or connection limit for those kinds); a corrupt one
 * is skipped and counted, never trusted.
 *
 * The view (what actions_find() answers from): the set Redis last gave,
 * with the adds and removes not yet written applied on top in their order
 * (a local add takes effect at once and stays until Redis has it), minus
 * what has expired by the wall clock (checked on every find, and by a
 * timer at the next expiry, at most poll_ms away). While Redis does not
 * answer (or before it first has), the view is the last set read plus the
 * local changes; the writes are sent again on every poll until they are
 * answered. stats.fallback = 1 while the polls fail; logged once per
 * transition (warn shaping/fallback, info shaping/redis_back); writes
 * that fail are logged apart (warn shaping/write_failed, info
 * shaping/written), once per transition too. Without Redis (redis NULL)
 * the view is the local adds only.
 *
 * actions_find() is an index lookup per field of the query (selector and
 * value), never a scan of every action. Site and domain values are kept
 * and matched in lower case; the other values and sources match exactly.
 *
 * Timing: a local add is in the local view at once and sent to Redis at
 * once (after the write in flight, if any); other workers see it at their
 * next poll, within poll_ms plus a round trip. An expiry takes effect in
 * actions_find() at once and in the callback within poll_ms.
 *
 * Callbacks: actions_changed_cb fires once per loop pass in which the
 * in-force set changed (an action new, extended or otherwise altered,
 * expired or removed, from a local call, a poll or the expiry timer),
 * from a zero-delay timer: never from inside actions_add() or
 * actions_remove(). It may call anything here, actions_free() included.
 *
 * Logs: info shaping/action for an action added locally that is new (or
 * changed other than by its expiry; a mere extension by a repeated
 * trigger is debug shaping/extended), info shaping/learned for an action
 * first seen in Redis, info shaping/removed for actions_remove(), warn
 * shaping/corrupt when the number of fields a read skipped changes.
 * Metrics: mailpump_shaping_actions_added_total,
 * mailpump_shaping_actions_learned_total,
 * mailpump_shaping_actions_corrupt_total, and the gauge
 * mailpump_shaping_actions_active (summed over the workers' tables).
 *
 * One table per worker thread, used only from that worker's loop.
 */
#ifndef MP_DELIVERER_ACTIONS_H
#define MP_DELIVERER_ACTIONS_H

#include <stddef.h>
#include <stdint.h>

#include "core/loop.h"
#include "core/rclient.h"

typedef enum { ACTION_SUSPEND = 1, ACTION_BOUNCE, ACTION_RATE, ACTION_CONNECTIONS } action_kind_t;
typedef enum { SEL_SITE = 1, SEL_DOMAIN, SEL_SOURCE, SEL_POOL, SEL_TENANT, SEL_CAMPAIGN } action_sel_t;

typedef struct action {
    char          id[96];        /* automation: derived "<kind>:<sel>:<value>[@source]" (actions_add fills it
                                  * when empty) so a repeated trigger extends the one action; admin: given */
    action_kind_t kind;
    action_sel_t  sel;
    char          value[256];    /* the site, domain, tenant, ... (lower case for site/domain) */
    char          source[65];    /* "" = any source; else only deliveries through that source */
    double        rate_per_s;    /* ACTION_RATE: > 0 */
    char          rate_text[32]; /* ACTION_RATE: as the rule wrote it, e.g. "30/m" (display only) */
    unsigned      connections;   /* ACTION_CONNECTIONS: >= 1 */
    uint64_t      created_ms, expires_ms; /* Unix ms */
    char          reason[256];   /* e.g. the reply that triggered it */
    char          origin[96];    /* "automation:<rule>" or "admin:<who>" */
} action_t;

typedef struct action_query {    /* what a delivery is; NULL fields match only selectors of other kinds */
    const char *domain, *site, *source, *pool, *tenant, *campaign;
} action_query_t;

typedef struct actions_config {
    uint64_t poll_ms;            /* 0 = 1000 */
} actions_config_t;

/* the in-force set changed (new, extended, expired, removed) */
typedef void (*actions_changed_cb)(void *arg);

typedef struct actions actions_t;

typedef struct actions_stats {
    uint64_t added;        /* actions_add() calls accepted (new actions and extensions) */
    uint64_t from_redis;   /* actions first learned from a Redis read */
    uint64_t expired;      /* actions dropped from the view because they expired */
    uint64_t corrupt;      /* fields skipped by reads (a field corrupt in every read counts each time) */
    uint64_t redis_errors; /* polls and writes that failed, timed out or got a reply of the wrong shape */
    size_t   active;       /* actions in the view */
    int      fallback;     /* 1 while Redis is configured and not answering (or has not yet) */
} actions_stats_t;

/* redis may be NULL (local only); it is borrowed and must outlive the
 * table. cfg may be NULL (defaults). Never NULL. */
actions_t *actions_new(loop_t *loop, rclient_t *redis, const actions_config_t *cfg, actions_changed_cb cb,
                       void *arg);
/* Cancels what is in flight (writes not yet answered are lost: they live
 * on only in the adding worker). No callback after this. NULL harmless. */
void actions_free(actions_t *t);

/* Takes effect locally at once (the next actions_find sees it), then is
 * written to Redis (async; retried on the next poll while Redis does not
 * answer). Fills created_ms when 0 and the id when empty; lower-cases a
 * site or domain value. Returns 0, or -1 on invalid input (kind or
 * selector unknown, empty value, a string that does not fit, an id with
 * control bytes, a rate not > 0, a connection limit of 0, expires_ms not
 * after now). */
int actions_add(actions_t *t, const action_t *a);
/* Removes the action with this id here at once and from Redis (async,
 * retried like an add). 0, or -1 for an empty or too long id. */
int actions_remove(actions_t *t, const char *id);

/* The in-force action of this kind that applies to q (its selector
 * matches one of q's fields, and its source is "" or equals q->source),
 * or NULL. For ACTION_RATE / ACTION_CONNECTIONS the most restrictive
 * (lowest; ties: the one expiring last); for SUSPEND / BOUNCE the one
 * expiring last. An index lookup per non-NULL field of q; expired actions
 * are never returned. The pointer is valid until control returns to the
 * loop or the next actions_add/actions_remove: copy what you keep. */
const action_t *actions_find(actions_t *t, action_kind_t kind, const action_query_t *q);
/* Actions in the view (some may have expired since the last check). */
size_t actions_count(const actions_t *t);
/* Every action in force, in no particular order. fn must not call into
 * the table. */
void actions_list(const actions_t *t, void (*fn)(void *arg, const action_t *a), void *arg);
void actions_get_stats(const actions_t *t, actions_stats_t *st);

/* Tests: the wall clock (Unix ms) the table uses; NULL restores util_wall_ms(). */
void actions_set_clock(actions_t *t, uint64_t (*now_ms)(void *), void *arg);

const char *action_kind_name(action_kind_t k); /* "suspend" "bounce" "rate" "connection_limit"; "?" else */
const char *action_sel_name(action_sel_t s);   /* "site" "domain" "source" "pool" "tenant" "campaign"; "?" else */
int action_kind_parse(const char *s);          /* the kind, or -1 unknown */
int action_sel_parse(const char *s);           /* the selector, or -1 unknown */

/* The validation and the stored form every writer shares (the workers'
 * tables and the operators' control/admin.c):
 * action_normalize: a clean copy of in (zeroed, every string terminated,
 * fields of other kinds cleared, site/domain lower-cased, id derived when
 * empty), or -1 when actions_add() would refuse it for anything but its
 * expiry (kind or selector unknown, empty value, a string that does not
 * fit, an id, value or source with control bytes or not UTF-8, a rate not
 * > 0, a connection limit of 0, expires_ms 0). No clock is read.
 * action_to_json: the compact JSON object stored in mp:act (malloc'd,
 * never NULL); a must be normalized.
 * action_from_json: the action stored under field (flen bytes) as the s
 * (len bytes) JSON, validated as a read validates it (the shape above,
 * the id equal to field, then action_normalize); 0, or -1 when anything
 * is off. Expiry is not checked. */
int   action_normalize(const action_t *in, action_t *out);
char *action_to_json(const action_t *a);
int   action_from_json(const char *field, size_t flen, const char *s, size_t len, action_t *out);

/* The scripts (see above); exposed for tests that drive them directly.
 * WRITE: KEYS mp:act mp:act@v, ARGV ("+" json | "-" id)...; returns
 * { version, fields changed }. POLL: KEYS mp:act mp:act@v, ARGV[1] the
 * version last read ("" for none); returns { version } when unchanged,
 * else { version, { field, value, ... } }. */
extern const char ACTIONS_WRITE_SCRIPT[];
extern const char ACTIONS_POLL_SCRIPT[];
#define ACTIONS_KEY         "mp:act"
#define ACTIONS_VERSION_KEY "mp:act@v"

#endif

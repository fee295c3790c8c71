/*
 * SUMMARY
 *  deliverer/actions.c - fleet-wide shaping actions kept in Redis (see
 *  actions.h for the data model, the scripts and the timing).
 * DESCRIPTION
 *  The view is two hash tables (core/htable.h) over the same entries: by
 *  id, and by "<sel>:<value>" (a bucket per selector value holding the
 *  actions of every kind and source that name it), so actions_find() is
 *  one bucket lookup per field of its query.
 *
 *  Local adds and removes are applied to the view at once and queued as
 *  ops; one write (an EVAL of every op queued, in order, at most
 *  ACTIONS_BATCH) is in flight at a time. An answered write pops its ops;
 *  a failed one leaves them for the next tick. An add queued behind
 *  others and not yet sent absorbs a later add of the same id (the same
 *  merge as the script's), so a trigger repeating a thousand times a
 *  second costs one op.
 *
 *  One loop timer per table polls (every poll_ms: first the write if ops
 *  wait and none is in flight, then the poll if none is in flight). A
 *  poll answered with the whole hash rebuilds the view: the valid fields
 *  not yet expired, then the queued ops on top in their order; the old
 *  view is compared with the new to decide whether the set changed and
 *  what was learned. Commands go out on one connection and Redis answers
 *  in order, so a poll answer never misses an op that has already been
 *  popped.
 *
 *  A second timer sweeps expired actions at the next expiry (at most
 *  poll_ms away, so a clock that jumps is caught up with); a third, at
 *  zero delay, runs actions_changed_cb once for whatever changed in the
 *  loop pass. The callback is the last thing that timer does, so it may
 *  free the table; no Redis reply handler calls out of the module.
 * DIAGNOSTICS
 *  info shaping/action (or debug shaping/extended), shaping/learned,
 *  shaping/removed; warn shaping/corrupt when the number of fields a read
 *  skipped changes; warn shaping/fallback and info shaping/redis_back once
 *  per transition of the reads, warn shaping/write_failed and info
 *  shaping/written once per transition of the writes. Counters mailpump_shaping_actions_added_total,
 *  _learned_total, _corrupt_total; gauge mailpump_shaping_actions_active.
 */
#include "deliverer/actions.h"

#include <ctype.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/htable.h"
#include "core/list.h"
#include "core/log.h"
#include "core/util.h"
#include "metrics/metrics.h"

#define ACTIONS_DEFAULT_POLL_MS 1000u
#define ACTIONS_FULL_READ_MS    10000u /* read the whole hash at least this often */
#define ACTIONS_BATCH           256u   /* ops per write */

typedef struct bucket bucket_t;

typedef struct entry {
    htable_node_t     by_id;  /* in view->ids, keyed by a.id */
    LIST_ENTRY(entry) link;   /* in bucket->entries */
    bucket_t         *bucket;
    action_t          a;
} entry_t;

struct bucket {
    htable_node_t node;       /* in view->index, keyed by key */
    char         *key;        /* "<sel>:<value>" */
    LIST_HEAD(, entry) entries;
};

typedef struct view {
    htable_t ids;
    htable_t index;
} view_t;

typedef struct op {
    TAILQ_ENTRY(op) link;
    int      remove;          /* 1: remove a.id; 0: add a */
    int      sent;            /* carried by the write in flight */
    action_t a;
} op_t;

struct actions {
    loop_t            *loop;
    rclient_t         *rc;
    uint64_t           poll_ms;
    actions_changed_cb cb;
    void              *arg;
    uint64_t         (*now_fn)(void *);
    void              *now_arg;
    view_t             view;
    TAILQ_HEAD(op_head, op) ops;
    size_t             nops;
    loop_timer_t       tick, expiry, notify;
    uint64_t           next_expiry;    /* wall ms the expiry timer aims at; 0 when idle */
    uint64_t           write_id, poll_id; /* commands in flight, 0 when none */
    char               version[32];    /* mp:act@v at the last full read; "" before one */
    uint64_t           last_full_ms;   /* loop time of the last full read */
    int                changed;        /* the set changed since the last callback */
    int                fallback, failing; /* reads */
    int                write_failing;
    size_t             last_corrupt;
    int64_t            gauge;          /* what this table adds to the active gauge */
    uint64_t           added, from_redis, expired, corrupt, redis_errors;
};

/* KEYS[1] mp:act, KEYS[2] mp:act@v; ARGV pairs "+" json | "-" id. See
 * actions.h. */
const char ACTIONS_WRITE_SCRIPT[] =
    "local key, vkey = KEYS[1], KEYS[2]\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local function dec(s)\n"
    "  if not s then return nil end\n"
    "  local ok, v = pcall(cjson.decode, s)\n"
    "  if ok and type(v) == 'table' and type(v.expires) == 'number' then return v end\n"
    "  return nil\n"
    "end\n"
    "local f = redis.call('HGETALL', key)\n"
    "for j = 1, #f, 2 do\n"
    "  local v = dec(f[j + 1])\n"
    "  if v and v.expires <= now then redis.call('HDEL', key, f[j]) end\n"
    "end\n"
    "local changed = 0\n"
    "for i = 1, #ARGV - 1, 2 do\n"
    "  local op, arg = ARGV[i], ARGV[i + 1]\n"
    "  if op == '-' then\n"
    "    changed = changed + redis.call('HDEL', key, arg)\n"
    "  elseif op == '+' then\n"
    "    local a = dec(arg)\n"
    "    if a and type(a.id) == 'string' and a.expires > now then\n"
    "      local old = redis.call('HGET', key, a.id)\n"
    "      local o = dec(old)\n"
    "      local s = arg\n"
    "      if o then\n"
    "        local merged = false\n"
    "        if o.expires > a.expires then a.expires = o.expires merged = true end\n"
    "        if type(o.created) == 'number' and type(a.created) == 'number' and o.created < a.created then\n"
    "          a.created = o.created merged = true\n"
    "        end\n"
    "        if merged then s = cjson.encode(a) end\n"
    "      end\n"
    "      if s ~= old then\n"
    "        redis.call('HSET', key, a.id, s)\n"
    "        changed = changed + 1\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "local maxe = 0\n"
    "f = redis.call('HGETALL', key)\n"
    "for j = 1, #f, 2 do\n"
    "  local v = dec(f[j + 1])\n"
    "  if v and v.expires > maxe then maxe = v.expires end\n"
    "end\n"
    "if maxe > now then redis.call('PEXPIREAT', key, string.format('%d', maxe)) end\n"
    "local v\n"
    "if changed > 0 then v = redis.call('INCR', vkey) else v = tonumber(redis.call('GET', vkey) or '0') end\n"
    "return { v, changed }\n";

/* KEYS[1] mp:act, KEYS[2] mp:act@v; ARGV[1] the version last read. */
const char ACTIONS_POLL_SCRIPT[] =
    "local v = redis.call('GET', KEYS[2]) or '0'\n"
    "if ARGV[1] == v then return { v } end\n"
    "return { v, redis.call('HGETALL', KEYS[1]) }\n";

/* ------------------------------------------------------------ names */

static const char *const kind_names[] = { NULL, "suspend", "bounce", "rate", "connection_limit" };
static const char *const sel_names[] = { NULL, "site", "domain", "source", "pool", "tenant", "campaign" };
#define NKINDS 4
#define NSELS  6

const char *action_kind_name(action_kind_t k)
{
    return k >= 1 && k <= NKINDS ? kind_names[k] : "?";
}

const char *action_sel_name(action_sel_t s)
{
    return s >= 1 && s <= NSELS ? sel_names[s] : "?";
}

int action_kind_parse(const char *s)
{
    for (int i = 1; s != NULL && i <= NKINDS; i++)
        if (strcmp(s, kind_names[i]) == 0)
            return i;
    return -1;
}

int action_sel_parse(const char *s)
{
    for (int i = 1; s != NULL && i <= NSELS; i++)
        if (strcmp(s, sel_names[i]) == 0)
            return i;
    return -1;
}

/* ------------------------------------------------------------ validation */

static uint64_t wall_now(const actions_t *t)
{
    return t->now_fn ? t->now_fn(t->now_arg) : util_wall_ms();
}

/* s is a terminated string within cap bytes. */
static int fits(const char *s, size_t cap)
{
    return memchr(s, '\0', cap) != NULL;
}

/* Well-formed UTF-8 with no control bytes: what an id, value or source may hold. */
static int clean_name(const char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f)
            return 0;
        size_t k = util_utf8_len((const unsigned char *)s + i, n - i);
        if (k == 0)
            return 0;
        i += k;
    }
    return 1;
}

/* Free text (reason, origin, rate_text): bytes that are not UTF-8 become '?'. */
static void clean_text(char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t k = util_utf8_len((const unsigned char *)s + i, n - i);
        if (k == 0) {
            s[i++] = '?';
            continue;
        }
        i += k;
    }
}

static uint64_t fnv1a(const char *a, const char *b)
{
    uint64_t h = 14695981039346656037ull;
    for (const char *p = a; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    h = (h ^ '@') * 1099511628211ull;
    for (const char *p = b; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    return h;
}

/* "<kind>:<sel>:<value>[@source]"; one that does not fit the id names the
 * value and source by their hash instead. */
static void derive_id(action_t *a)
{
    int n = snprintf(a->id, sizeof(a->id), "%s:%s:%s%s%s", action_kind_name(a->kind), action_sel_name(a->sel),
                     a->value, a->source[0] ? "@" : "", a->source);
    if (n < 0 || (size_t)n >= sizeof(a->id))
        snprintf(a->id, sizeof(a->id), "%s:%s:#%016llx", action_kind_name(a->kind), action_sel_name(a->sel),
                 (unsigned long long)fnv1a(a->value, a->source));
}

/* See actions.h. */
int action_normalize(const action_t *in, action_t *out)
{
    memset(out, 0, sizeof(*out));
    if (in->kind < 1 || in->kind > NKINDS || in->sel < 1 || in->sel > NSELS)
        return -1;
    if (!fits(in->id, sizeof(in->id)) || !fits(in->value, sizeof(in->value)) ||
        !fits(in->source, sizeof(in->source)) || !fits(in->rate_text, sizeof(in->rate_text)) ||
        !fits(in->reason, sizeof(in->reason)) || !fits(in->origin, sizeof(in->origin)))
        return -1;
    out->kind = in->kind;
    out->sel = in->sel;
    memcpy(out->value, in->value, strlen(in->value));
    memcpy(out->source, in->source, strlen(in->source));
    if (out->value[0] == '\0' || !clean_name(out->value) || !clean_name(out->source))
        return -1;
    if (out->sel == SEL_SITE || out->sel == SEL_DOMAIN)
        for (char *p = out->value; *p; p++)
            *p = (char)tolower((unsigned char)*p);
    if (in->kind == ACTION_RATE) {
        if (!isfinite(in->rate_per_s) || !(in->rate_per_s > 0))
            return -1;
        out->rate_per_s = in->rate_per_s;
        memcpy(out->rate_text, in->rate_text, strlen(in->rate_text));
        clean_text(out->rate_text);
    } else if (in->kind == ACTION_CONNECTIONS) {
        if (in->connections == 0)
            return -1;
        out->connections = in->connections;
    }
    out->created_ms = in->created_ms;
    out->expires_ms = in->expires_ms;
    if (out->expires_ms == 0)
        return -1;
    memcpy(out->reason, in->reason, strlen(in->reason));
    memcpy(out->origin, in->origin, strlen(in->origin));
    clean_text(out->reason);
    clean_text(out->origin);
    if (in->id[0] == '\0')
        derive_id(out);
    else
        memcpy(out->id, in->id, strlen(in->id));
    return clean_name(out->id) ? 0 : -1;
}

static int action_same(const action_t *a, const action_t *b)
{
    return strcmp(a->id, b->id) == 0 && a->kind == b->kind && a->sel == b->sel &&
           strcmp(a->value, b->value) == 0 && strcmp(a->source, b->source) == 0 &&
           a->rate_per_s == b->rate_per_s && strcmp(a->rate_text, b->rate_text) == 0 &&
           a->connections == b->connections && a->created_ms == b->created_ms &&
           a->expires_ms == b->expires_ms && strcmp(a->reason, b->reason) == 0 &&
           strcmp(a->origin, b->origin) == 0;
}

/* The script's merge: the newer (in) wins, except expires (the later) and
 * created (the earlier). */
static void merge(const action_t *old, const action_t *in, action_t *out)
{
    *out = *in;
    if (old->expires_ms > out->expires_ms)
        out->expires_ms = old->expires_ms;
    if (old->created_ms != 0 && old->created_ms < out->created_ms)
        out->created_ms = old->created_ms;
}

/* ------------------------------------------------------------ JSON */

char *action_to_json(const action_t *a)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(a->id));
    json_object_set_new(o, "kind", json_string(action_kind_name(a->kind)));
    json_object_set_new(o, "sel", json_string(action_sel_name(a->sel)));
    json_object_set_new(o, "value", json_string(a->value));
    json_object_set_new(o, "source", json_string(a->source));
    json_object_set_new(o, "rate", json_real(a->rate_per_s));
    json_object_set_new(o, "rate_text", json_string(a->rate_text));
    json_object_set_new(o, "conn", json_integer((json_int_t)a->connections));
    json_object_set_new(o, "created", json_integer((json_int_t)a->created_ms));
    json_object_set_new(o, "expires", json_integer((json_int_t)a->expires_ms));
    json_object_set_new(o, "reason", json_string(a->reason));
    json_object_set_new(o, "origin", json_string(a->origin));
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (s == NULL) /* only on OOM: the strings were cleaned to UTF-8 */
        abort();
    return s;
}

static int json_text(const json_t *o, const char *k, char *dst, size_t cap)
{
    const json_t *v = json_object_get(o, k);
    if (!json_is_string(v))
        return -1;
    size_t n = json_string_length(v);
    const char *s = json_string_value(v);
    if (n >= cap || memchr(s, '\0', n) != NULL)
        return -1;
    memcpy(dst, s, n);
    dst[n] = '\0';
    return 0;
}

/* A non-negative integer, written as one (jansson) or as an integral
 * real (what Lua's cjson may write back). */
static int json_uint(const json_t *o, const char *k, uint64_t max, uint64_t *out)
{
    const json_t *v = json_object_get(o, k);
    if (json_is_integer(v)) {
        json_int_t i = json_integer_value(v);
        if (i < 0 || (uint64_t)i > max)
            return -1;
        *out = (uint64_t)i;
        return 0;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (!(d >= 0) || d > (double)max || d != floor(d))
            return -1;
        *out = (uint64_t)d;
        return 0;
    }
    return -1;
}

/* See actions.h. */
int action_from_json(const char *field, size_t flen, const char *s, size_t len, action_t *out)
{
    json_error_t jerr;
    json_t *o = json_loadb(s, len, JSON_REJECT_DUPLICATES, &jerr);
    if (o == NULL)
        return -1;
    action_t a;
    memset(&a, 0, sizeof(a));
    char kind[24], sel[16];
    uint64_t conn = 0;
    int rc = -1;
    if (!json_is_object(o) || json_text(o, "id", a.id, sizeof(a.id)) < 0 ||
        json_text(o, "kind", kind, sizeof(kind)) < 0 || json_text(o, "sel", sel, sizeof(sel)) < 0 ||
        json_text(o, "value", a.value, sizeof(a.value)) < 0 ||
        json_text(o, "source", a.source, sizeof(a.source)) < 0 ||
        json_text(o, "rate_text", a.rate_text, sizeof(a.rate_text)) < 0 ||
        json_text(o, "reason", a.reason, sizeof(a.reason)) < 0 ||
        json_text(o, "origin", a.origin, sizeof(a.origin)) < 0 ||
        json_uint(o, "conn", 0xffffffffu, &conn) < 0 ||
        json_uint(o, "created", UINT64_MAX / 2, &a.created_ms) < 0 ||
        json_uint(o, "expires", UINT64_MAX / 2, &a.expires_ms) < 0 || !json_is_number(json_object_get(o, "rate")))
        goto out;
    int k = action_kind_parse(kind), se = action_sel_parse(sel);
    if (k < 0 || se < 0)
        goto out;
    a.kind = (action_kind_t)k;
    a.sel = (action_sel_t)se;
    a.connections = (unsigned)conn;
    a.rate_per_s = json_number_value(json_object_get(o, "rate"));
    if (strlen(a.id) != flen || memcmp(a.id, field, flen) != 0)
        goto out;
    rc = action_normalize(&a, out);
out:
    json_decref(o);
    return rc;
}

/* ------------------------------------------------------------ the view */

static void view_init(view_t *v)
{
    htable_init(&v->ids, HTABLE_STR, 16, NULL);
    htable_init(&v->index, HTABLE_STR, 16, NULL);
}

static void index_key(char *dst, size_t cap, action_sel_t sel, const char *value)
{
    snprintf(dst, cap, "%d:%s", (int)sel, value);
}

#define KEY_CAP (8 + sizeof(((action_t *)0)->value))

static entry_t *view_find(const view_t *v, const char *id)
{
    htable_node_t *n = htable_find_str(&v->ids, id);
    return n ? HTABLE_ENTRY(n, entry_t, by_id) : NULL;
}

static void view_link(view_t *v, entry_t *e)
{
    char key[KEY_CAP];
    index_key(key, sizeof(key), e->a.sel, e->a.value);
    htable_node_t *n = htable_find_str(&v->index, key);
    bucket_t *b;
    if (n != NULL) {
        b = HTABLE_ENTRY(n, bucket_t, node);
    } else {
        b = xcalloc(1, sizeof(*b));
        b->key = xstrdup(key);
        LIST_INIT(&b->entries);
        htable_insert_str(&v->index, &b->node, b->key);
    }
    e->bucket = b;
    LIST_INSERT_HEAD(&b->entries, e, link);
}

static void view_unlink(view_t *v, entry_t *e)
{
    bucket_t *b = e->bucket;
    LIST_REMOVE(e, link);
    e->bucket = NULL;
    if (LIST_EMPTY(&b->entries)) {
        htable_remove(&v->index, &b->node);
        free(b->key);
        free(b);
    }
}

static void view_remove(view_t *v, entry_t *e)
{
    view_unlink(v, e);
    htable_remove(&v->ids, &e->by_id);
    free(e);
}

enum { PUT_SAME = 0, PUT_NEW, PUT_CHANGED, PUT_EXTENDED };

/* Add a (normalized) or merge it into the entry of its id. */
static int view_put(view_t *v, const action_t *a)
{
    entry_t *e = view_find(v, a->id);
    if (e == NULL) {
        e = xcalloc(1, sizeof(*e));
        e->a = *a;
        htable_insert_str(&v->ids, &e->by_id, e->a.id);
        view_link(v, e);
        return PUT_NEW;
    }
    action_t m;
    merge(&e->a, a, &m);
    if (action_same(&e->a, &m))
        return PUT_SAME;
    action_t cmp = m;
    cmp.expires_ms = e->a.expires_ms;
    int how = action_same(&e->a, &cmp) ? PUT_EXTENDED : PUT_CHANGED;
    int moved = m.sel != e->a.sel || strcmp(m.value, e->a.value) != 0;
    if (moved)
        view_unlink(v, e);
    e->a = m; /* same id: the htable key stays valid */
    if (moved)
        view_link(v, e);
    return how;
}

static void view_fini(view_t *v)
{
    htable_node_t *n;
    size_t hint = 0;
    while ((n = htable_first(&v->ids, &hint)) != NULL)
        view_remove(v, HTABLE_ENTRY(n, entry_t, by_id));
    htable_fini(&v->ids);
    htable_fini(&v->index);
}

/* ------------------------------------------------------------ changes */

static void sync_gauge(actions_t *t)
{
    int64_t n = (int64_t)htable_count(&t->view.ids);
    if (n != t->gauge) {
        metrics_gauge_add(MET_SHAPING_ACTIONS_ACTIVE, n - t->gauge);
        t->gauge = n;
    }
}

static void mark_changed(actions_t *t)
{
    t->changed = 1;
    sync_gauge(t);
    if (!loop_timer_active(&t->notify))
        loop_timer_set(t->loop, &t->notify, 0);
}

static void on_notify(loop_t *loop, loop_timer_t *timer, void *arg)
{
    actions_t *t = arg;
    if (!t->changed)
        return;
    t->changed = 0;
    if (t->cb)
        t->cb(t->arg); /* last: it may free t */
}

/* Drop the actions expired by now; returns how many. */
static size_t sweep(actions_t *t, uint64_t now)
{
    size_t n = 0;
    htable_node_t *node;
    htable_iter_t it;
    htable_iter_init(&it, &t->view.ids);
    while ((node = htable_iter_next(&it)) != NULL) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, by_id);
        if (e->a.expires_ms <= now) {
            log_debug("shaping", "expired", "id=%s kind=%s", LOG_Q(e->a.id), action_kind_name(e->a.kind));
            view_remove(&t->view, e); /* the node just returned: safe */
            n++;
        }
    }
    t->expired += n;
    return n;
}

/* Aim the expiry timer at the earliest expiry in the view (at most poll_ms away). */
static void arm_expiry(actions_t *t)
{
    if (htable_count(&t->view.ids) == 0) {
        loop_timer_cancel(t->loop, &t->expiry);
        t->next_expiry = 0;
        return;
    }
    uint64_t next = UINT64_MAX, now = wall_now(t);
    htable_node_t *node;
    htable_iter_t it;
    htable_iter_init(&it, &t->view.ids);
    while ((node = htable_iter_next(&it)) != NULL) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, by_id);
        if (e->a.expires_ms < next)
            next = e->a.expires_ms;
    }
    uint64_t delay = next > now ? next - now : 0;
    if (delay > t->poll_ms)
        delay = t->poll_ms;
    t->next_expiry = next;
    loop_timer_set(t->loop, &t->expiry, delay);
}

static void on_expiry(loop_t *loop, loop_timer_t *timer, void *arg)
{
    actions_t *t = arg;
    if (sweep(t, wall_now(t)) > 0)
        mark_changed(t);
    arm_expiry(t);
}

/* ------------------------------------------------------------ Redis */

/* Reads decide the fallback; writes are logged apart, so a Redis that
 * answers reads and refuses writes (maxmemory) does not flap. */
static void read_result(actions_t *t, int ok, const char *err)
{
    if (ok) {
        if (t->failing)
            log_info("shaping", "redis_back", "actions=%zu", htable_count(&t->view.ids));
        t->failing = 0;
        t->fallback = 0;
        return;
    }
    t->redis_errors++;
    if (!t->failing)
        log_warn("shaping", "fallback", "error=%s actions=%zu", LOG_Q(err ? err : "unexpected reply"),
                 htable_count(&t->view.ids));
    t->failing = 1;
    t->fallback = 1;
}

static void write_result(actions_t *t, int ok, const char *err)
{
    if (ok) {
        if (t->write_failing)
            log_info("shaping", "written", "ops_left=%zu", t->nops);
        t->write_failing = 0;
        return;
    }
    t->redis_errors++;
    if (!t->write_failing)
        log_warn("shaping", "write_failed", "error=%s ops=%zu", LOG_Q(err ? err : "unexpected reply"), t->nops);
    t->write_failing = 1;
}

static void flush(actions_t *t);

static void on_write(void *arg, const redisReply *r, const char *err)
{
    actions_t *t = arg;
    t->write_id = 0;
    int ok = r != NULL && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
             r->element[0]->type == REDIS_REPLY_INTEGER && r->element[1]->type == REDIS_REPLY_INTEGER;
    op_t *o, *next;
    TAILQ_FOREACH_SAFE(o, &t->ops, link, next) {
        if (!o->sent)
            break;
        o->sent = 0;
        if (ok) {
            TAILQ_REMOVE(&t->ops, o, link);
            t->nops--;
            free(o);
        }
    }
    write_result(t, ok, err);
    if (ok && t->nops > 0)
        flush(t);
}

/* Send the queued ops (at most ACTIONS_BATCH) unless a write is in flight. */
static void flush(actions_t *t)
{
    if (t->rc == NULL || t->write_id != 0 || t->nops == 0)
        return;
    uint64_t now = wall_now(t);
    op_t *o, *next;
    TAILQ_FOREACH_SAFE(o, &t->ops, link, next) {
        if (!o->remove && o->a.expires_ms <= now) { /* nothing left to write */
            TAILQ_REMOVE(&t->ops, o, link);
            t->nops--;
            free(o);
        }
    }
    size_t n = t->nops < ACTIONS_BATCH ? t->nops : ACTIONS_BATCH;
    if (n == 0)
        return;
    const char **argv = xcalloc(5 + 2 * n, sizeof(char *));
    char **owned = xcalloc(n, sizeof(char *));
    size_t a = 0, k = 0;
    argv[a++] = "EVAL";
    argv[a++] = ACTIONS_WRITE_SCRIPT;
    argv[a++] = "2";
    argv[a++] = ACTIONS_KEY;
    argv[a++] = ACTIONS_VERSION_KEY;
    TAILQ_FOREACH(o, &t->ops, link) {
        if (k == n)
            break;
        o->sent = 1;
        if (o->remove) {
            argv[a++] = "-";
            argv[a++] = o->a.id;
            owned[k++] = NULL;
        } else {
            argv[a++] = "+";
            owned[k] = action_to_json(&o->a);
            argv[a++] = owned[k++];
        }
    }
    t->write_id = rclient_commandargv(t->rc, on_write, t, (int)a, argv, NULL);
    for (size_t i = 0; i < k; i++)
        free(owned[i]);
    free(owned);
    free(argv);
}

static void log_action(const char *event, const action_t *a, uint64_t now)
{
    log_info("shaping", event,
             "id=%s kind=%s selector=%s value=%s source=%s rate_per_s=%g rate=%s connections=%u duration_ms=%llu "
             "reason=%s "
             "origin=%s",
             LOG_Q(a->id), action_kind_name(a->kind), action_sel_name(a->sel), LOG_Q(a->value),
             LOG_Q(a->source), a->rate_per_s, LOG_Q(a->rate_text), a->connections,
             (unsigned long long)(a->expires_ms > now ? a->expires_ms - now : 0), LOG_Q(a->reason),
             LOG_Q(a->origin));
}

/* A full read: the valid fields not yet expired, then the queued ops. */
static void rebuild(actions_t *t, const redisReply *fields)
{
    uint64_t now = wall_now(t);
    view_t nv;
    view_init(&nv);
    size_t corrupt = 0;
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        const redisReply *f = fields->element[i], *v = fields->element[i + 1];
        action_t a;
        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
            action_from_json(f->str, f->len, v->str, v->len, &a) < 0) {
            corrupt++;
            continue;
        }
        if (a.expires_ms > now)
            view_put(&nv, &a);
    }
    op_t *o;
    TAILQ_FOREACH(o, &t->ops, link) {
        if (o->remove) {
            entry_t *e = view_find(&nv, o->a.id);
            if (e != NULL)
                view_remove(&nv, e);
        } else if (o->a.expires_ms > now) {
            view_put(&nv, &o->a);
        }
    }
    int changed = sweep(t, now) > 0 || htable_count(&nv.ids) != htable_count(&t->view.ids);
    htable_node_t *node;
    htable_iter_t it;
    htable_iter_init(&it, &nv.ids);
    while ((node = htable_iter_next(&it)) != NULL) {
        entry_t *e = HTABLE_ENTRY(node, entry_t, by_id);
        entry_t *old = view_find(&t->view, e->a.id);
        if (old == NULL) {
            t->from_redis++;
            metrics_inc(MET_SHAPING_ACTIONS_LEARNED, 1);
            log_action("learned", &e->a, now);
            changed = 1;
        } else if (!action_same(&old->a, &e->a)) {
            changed = 1;
        }
    }
    view_fini(&t->view);
    t->view = nv;
    if (corrupt > 0) {
        t->corrupt += corrupt;
        metrics_inc(MET_SHAPING_ACTIONS_CORRUPT, corrupt);
    }
    if (corrupt != t->last_corrupt)
        log_warn("shaping", "corrupt", "key=%s skipped=%zu", ACTIONS_KEY, corrupt);
    t->last_corrupt = corrupt;
    if (changed)
        mark_changed(t);
    arm_expiry(t);
}

static void on_poll(void *arg, const redisReply *r, const char *err)
{
    actions_t *t = arg;
    t->poll_id = 0;
    int ok = r != NULL && r->type == REDIS_REPLY_ARRAY && (r->elements == 1 || r->elements == 2) &&
             r->element[0]->type == REDIS_REPLY_STRING && r->element[0]->len < sizeof(t->version);
    const redisReply *fields = NULL;
    if (ok && r->elements == 2) {
        fields = r->element[1];
        ok = fields->type == REDIS_REPLY_ARRAY && fields->elements % 2 == 0;
    }
    read_result(t, ok, err);
    if (!ok || fields == NULL)
        return;
    memcpy(t->version, r->element[0]->str, r->element[0]->len);
    t->version[r->element[0]->len] = '\0';
    t->last_full_ms = loop_now_ms(t->loop);
    rebuild(t, fields);
}

static void poll_redis(actions_t *t)
{
    int full = t->version[0] == '\0' || loop_now_ms(t->loop) - t->last_full_ms >= ACTIONS_FULL_READ_MS;
    const char *argv[] = { "EVAL", ACTIONS_POLL_SCRIPT, "2", ACTIONS_KEY, ACTIONS_VERSION_KEY,
                           full ? "" : t->version };
    t->poll_id = rclient_commandargv(t->rc, on_poll, t, 6, argv, NULL);
}

static void on_tick(loop_t *loop, loop_timer_t *timer, void *arg)
{
    actions_t *t = arg;
    loop_timer_set(t->loop, &t->tick, t->poll_ms);
    flush(t);
    if (t->poll_id == 0)
        poll_redis(t);
}

/* ------------------------------------------------------------ API */

actions_t *actions_new(loop_t *loop, rclient_t *redis, const actions_config_t *cfg, actions_changed_cb cb,
                       void *arg)
{
    actions_t *t = xcalloc(1, sizeof(*t));
    t->loop = loop;
    t->rc = redis;
    t->poll_ms = cfg && cfg->poll_ms ? cfg->poll_ms : ACTIONS_DEFAULT_POLL_MS;
    t->cb = cb;
    t->arg = arg;
    view_init(&t->view);
    TAILQ_INIT(&t->ops);
    loop_timer_init(&t->tick, on_tick, t);
    loop_timer_init(&t->expiry, on_expiry, t);
    loop_timer_init(&t->notify, on_notify, t);
    if (redis != NULL) {
        t->fallback = 1; /* until the first answer */
        loop_timer_set(loop, &t->tick, 0);
    }
    return t;
}

void actions_free(actions_t *t)
{
    if (t == NULL)
        return;
    if (t->write_id)
        rclient_cancel(t->rc, t->write_id);
    if (t->poll_id)
        rclient_cancel(t->rc, t->poll_id);
    loop_timer_cancel(t->loop, &t->tick);
    loop_timer_cancel(t->loop, &t->expiry);
    loop_timer_cancel(t->loop, &t->notify);
    op_t *o;
    while ((o = TAILQ_FIRST(&t->ops)) != NULL) {
        TAILQ_REMOVE(&t->ops, o, link);
        free(o);
    }
    view_fini(&t->view);
    metrics_gauge_add(MET_SHAPING_ACTIONS_ACTIVE, -t->gauge);
    free(t);
}

/* Queue an add, folded into an unsent add of the same id when the last
 * op naming that id is one. */
static void queue_add(actions_t *t, const action_t *a)
{
    op_t *o;
    TAILQ_FOREACH_REVERSE(o, &t->ops, op_head, link) {
        if (o->sent)
            break;
        if (strcmp(o->a.id, a->id) != 0)
            continue;
        if (o->remove)
            break;
        action_t m;
        merge(&o->a, a, &m);
        o->a = m;
        return;
    }
    o = xcalloc(1, sizeof(*o));
    o->a = *a;
    TAILQ_INSERT_TAIL(&t->ops, o, link);
    t->nops++;
}

int actions_add(actions_t *t, const action_t *in)
{
    action_t a;
    uint64_t now = wall_now(t);
    if (action_normalize(in, &a) < 0 || a.expires_ms <= now)
        return -1;
    if (a.created_ms == 0)
        a.created_ms = now;
    t->added++;
    metrics_inc(MET_SHAPING_ACTIONS_ADDED, 1);
    int how = view_put(&t->view, &a);
    if (how == PUT_SAME)
        return 0; /* in the view already: Redis has it or a queued op will write it */
    if (how == PUT_EXTENDED)
        log_debug("shaping", "extended", "id=%s expires_in_ms=%llu", LOG_Q(a.id),
                  (unsigned long long)(a.expires_ms - now));
    else
        log_action("action", &a, now);
    mark_changed(t);
    if (!loop_timer_active(&t->expiry) || a.expires_ms < t->next_expiry)
        arm_expiry(t);
    if (t->rc != NULL) {
        queue_add(t, &a);
        flush(t);
    }
    return 0;
}

int actions_remove(actions_t *t, const char *id)
{
    if (id == NULL || id[0] == '\0' || strlen(id) >= sizeof(((action_t *)0)->id))
        return -1;
    entry_t *e = view_find(&t->view, id);
    log_info("shaping", "removed", "id=%s known=%d", LOG_Q(id), e != NULL);
    if (e != NULL) {
        view_remove(&t->view, e);
        mark_changed(t);
        arm_expiry(t);
    }
    if (t->rc == NULL)
        return 0;
    op_t *o, *next;
    TAILQ_FOREACH_SAFE(o, &t->ops, link, next) {
        if (!o->sent && !o->remove && strcmp(o->a.id, id) == 0) {
            TAILQ_REMOVE(&t->ops, o, link);
            t->nops--;
            free(o);
        }
    }
    o = xcalloc(1, sizeof(*o));
    o->remove = 1;
    memcpy(o->a.id, id, strlen(id));
    TAILQ_INSERT_TAIL(&t->ops, o, link);
    t->nops++;
    flush(t);
    return 0;
}

static const char *query_field(const action_query_t *q, int sel)
{
    switch (sel) {
    case SEL_SITE: return q->site;
    case SEL_DOMAIN: return q->domain;
    case SEL_SOURCE: return q->source;
    case SEL_POOL: return q->pool;
    case SEL_TENANT: return q->tenant;
    case SEL_CAMPAIGN: return q->campaign;
    }
    return NULL;
}

/* a is more to the point than best for kind. */
static int better(action_kind_t kind, const action_t *a, const action_t *best)
{
    if (best == NULL)
        return 1;
    if (kind == ACTION_RATE && a->rate_per_s != best->rate_per_s)
        return a->rate_per_s < best->rate_per_s;
    if (kind == ACTION_CONNECTIONS && a->connections != best->connections)
        return a->connections < best->connections;
    return a->expires_ms > best->expires_ms;
}

const action_t *actions_find(actions_t *t, action_kind_t kind, const action_query_t *q)
{
    if (q == NULL || htable_count(&t->view.ids) == 0)
        return NULL;
    uint64_t now = wall_now(t);
    const action_t *best = NULL;
    char value[sizeof(((action_t *)0)->value)], key[KEY_CAP];
    for (int sel = 1; sel <= NSELS; sel++) {
        const char *v = query_field(q, sel);
        if (v == NULL || v[0] == '\0')
            continue;
        size_t n = strlen(v);
        if (n >= sizeof(value))
            continue; /* longer than any value held */
        memcpy(value, v, n + 1);
        if (sel == SEL_SITE || sel == SEL_DOMAIN)
            for (char *p = value; *p; p++)
                *p = (char)tolower((unsigned char)*p);
        index_key(key, sizeof(key), (action_sel_t)sel, value);
        htable_node_t *node = htable_find_str(&t->view.index, key);
        if (node == NULL)
            continue;
        bucket_t *b = HTABLE_ENTRY(node, bucket_t, node);
        entry_t *e;
        LIST_FOREACH(e, &b->entries, link) {
            const action_t *a = &e->a;
            if (a->kind != kind || a->expires_ms <= now)
                continue;
            if (a->source[0] != '\0' && (q->source == NULL || strcmp(a->source, q->source) != 0))
                continue;
            if (better(kind, a, best))
                best = a;
        }
    }
    return best;
}

size_t actions_count(const actions_t *t)
{
    return htable_count(&t->view.ids);
}

void actions_list(const actions_t *t, void (*fn)(void *arg, const action_t *a), void *arg)
{
    uint64_t now = wall_now(t);
    htable_node_t *node;
    htable_iter_t it;
    htable_iter_init(&it, &t->view.ids);
    while ((node = htable_iter_next(&it)) != NULL) {
        const entry_t *e = HTABLE_ENTRY(node, entry_t, by_id);
        if (e->a.expires_ms > now)
            fn(arg, &e->a);
    }
}

void actions_get_stats(const actions_t *t, actions_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    st->added = t->added;
    st->from_redis = t->from_redis;
    st->expired = t->expired;
    st->corrupt = t->corrupt;
    st->redis_errors = t->redis_errors;
    st->active = htable_count(&t->view.ids);
    st->fallback = t->fallback;
}

void actions_set_clock(actions_t *t, uint64_t (*now_ms)(void *), void *arg)
{
    t->now_fn = now_ms;
    t->now_arg = arg;
}

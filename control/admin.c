/*
 * SUMMARY
 *  control/admin.c - operators' shaping actions in Redis (see admin.h).
 * DESCRIPTION
 *  Every write is one EVAL of ACTIONS_WRITE_SCRIPT, the script the
 *  workers' tables use, so an operator's add merges, expires and bumps
 *  mp:act@v exactly as theirs do, and the workers' next poll (within
 *  about a second) reads the change. Reads are HGET / HGETALL of mp:act,
 *  each field validated with action_from_json(), as a worker validates
 *  it. Nothing here is cached: every call reads Redis again.
 */
#include "control/admin.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/util.h"
#include "deliverer/throttle.h"

/* ------------------------------------------------------------ requests */

int ctl_parse_duration(const char *s, uint64_t *ms)
{
    if (s == NULL)
        return -1;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        n--;
    if (n == 0 || !isalpha((unsigned char)s[n - 1]))
        return -1; /* a bare number: seconds or milliseconds? */
    uint64_t v;
    if (config_parse_duration(s, &v) < 0 || v < 1000 || v > CTL_ACTION_MAX_MS)
        return -1;
    *ms = v;
    return 0;
}

static int bad(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int bad(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return CTL_EINVAL;
}

/* The string member k into dst (cap bytes): 0, 1 when absent, or -1 (not
 * a string, too long, a NUL inside). */
static int member_text(const json_t *req, const char *k, char *dst, size_t cap)
{
    const json_t *v = json_object_get(req, k);
    if (v == NULL || json_is_null(v))
        return 1;
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

static const char *const known_members[] = { "kind",   "selector", "value", "source",           "duration",
                                             "reason", "rate",     "id",    "connection_limit", NULL };

int ctl_action_from_request(const json_t *req, const char *who, uint64_t now_ms, action_t *out, char *err,
                            size_t errlen)
{
    action_t a;
    memset(&a, 0, sizeof(a));
    if (!json_is_object(req))
        return bad(err, errlen, "%s", "the request is not a JSON object");
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)req, k, v) {
        size_t i = 0;
        while (known_members[i] != NULL && strcmp(known_members[i], k) != 0)
            i++;
        if (known_members[i] == NULL)
            return bad(err, errlen, "unknown member \"%.64s\"", k);
    }
    if (who == NULL || who[0] == '\0')
        return bad(err, errlen, "%s", "who: empty (the operator the action is recorded for)");
    for (const char *p = who; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            return bad(err, errlen, "%s", "who: control characters");
    char kind[24], sel[16];
    if (member_text(req, "kind", kind, sizeof(kind)) != 0 || action_kind_parse(kind) < 0)
        return bad(err, errlen, "%s", "kind: expected suspend, bounce, rate or connection_limit");
    a.kind = (action_kind_t)action_kind_parse(kind);
    if (member_text(req, "selector", sel, sizeof(sel)) != 0 || action_sel_parse(sel) < 0)
        return bad(err, errlen, "%s", "selector: expected site, domain, source, pool, tenant or campaign");
    a.sel = (action_sel_t)action_sel_parse(sel);
    if (member_text(req, "value", a.value, sizeof(a.value)) != 0 || a.value[0] == '\0')
        return bad(err, errlen, "value: expected the %s to act on (1 to 255 bytes)", sel);
    if (member_text(req, "source", a.source, sizeof(a.source)) < 0)
        return bad(err, errlen, "%s", "source: expected a source name (at most 64 bytes)");
    if (member_text(req, "reason", a.reason, sizeof(a.reason)) != 0 || a.reason[0] == '\0')
        return bad(err, errlen, "%s", "reason: expected why (1 to 255 bytes): it goes into the events");
    if (member_text(req, "id", a.id, sizeof(a.id)) < 0)
        return bad(err, errlen, "%s", "id: expected a string of at most 95 bytes");

    uint64_t dur = 0;
    const json_t *d = json_object_get(req, "duration");
    if (json_is_string(d)) {
        if (ctl_parse_duration(json_string_value(d), &dur) < 0)
            return bad(err, errlen, "duration: expected 90s, 30m, 2h, 1d (1 s to 366 d), got \"%.64s\"",
                       json_string_value(d));
    } else if (json_is_integer(d)) {
        json_int_t s = json_integer_value(d);
        if (s < 1 || (uint64_t)s > CTL_ACTION_MAX_MS / 1000)
            return bad(err, errlen, "%s", "duration: expected 1 to 31622400 seconds");
        dur = (uint64_t)s * 1000;
    } else {
        return bad(err, errlen, "%s", "duration: expected \"30m\" or a number of seconds");
    }

    const json_t *rate = json_object_get(req, "rate");
    const json_t *conn = json_object_get(req, "connection_limit");
    if (a.kind == ACTION_RATE) {
        double interval_ms;
        if (member_text(req, "rate", a.rate_text, sizeof(a.rate_text)) != 0 ||
            throttle_parse_rate(a.rate_text, &interval_ms) < 0 || !(interval_ms > 0))
            return bad(err, errlen, "%s", "rate: expected N/s, N/m or N/h (N from 1 to 1000000)");
        a.rate_per_s = 1000.0 / interval_ms;
    } else if (rate != NULL && !json_is_null(rate)) {
        return bad(err, errlen, "rate: only for kind rate, not %s", kind);
    }
    if (a.kind == ACTION_CONNECTIONS) {
        if (!json_is_integer(conn) || json_integer_value(conn) < 1 || json_integer_value(conn) > 100000)
            return bad(err, errlen, "%s", "connection_limit: expected 1 to 100000 connections");
        a.connections = (unsigned)json_integer_value(conn);
    } else if (conn != NULL && !json_is_null(conn)) {
        return bad(err, errlen, "connection_limit: only for kind connection_limit, not %s", kind);
    }

    int n = snprintf(a.origin, sizeof(a.origin), "admin:%s", who);
    if (n < 0 || (size_t)n >= sizeof(a.origin))
        return bad(err, errlen, "%s", "who: too long (at most 89 bytes)");
    if (a.id[0] == '\0')
        snprintf(a.id, sizeof(a.id), "adm-%08x", (unsigned)(util_rand64() & 0xffffffffu));
    a.created_ms = now_ms;
    a.expires_ms = now_ms + dur;
    if (action_normalize(&a, out) < 0)
        return bad(err, errlen, "%s", "id, value or source: control characters or bytes that are not UTF-8");
    return CTL_OK;
}

json_t *ctl_action_json(const action_t *a, uint64_t now_ms)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(a->id));
    json_object_set_new(o, "kind", json_string(action_kind_name(a->kind)));
    json_object_set_new(o, "selector", json_string(action_sel_name(a->sel)));
    json_object_set_new(o, "value", json_string(a->value));
    json_object_set_new(o, "source", json_string(a->source));
    json_object_set_new(o, "rate", a->kind == ACTION_RATE ? json_string(a->rate_text) : json_null());
    json_object_set_new(o, "connection_limit",
                        a->kind == ACTION_CONNECTIONS ? json_integer((json_int_t)a->connections) : json_null());
    json_object_set_new(o, "created", json_integer((json_int_t)a->created_ms));
    json_object_set_new(o, "expires", json_integer((json_int_t)a->expires_ms));
    uint64_t left = a->expires_ms > now_ms ? a->expires_ms - now_ms : 0;
    json_object_set_new(o, "remaining_s", json_integer((json_int_t)((left + 999) / 1000)));
    json_object_set_new(o, "reason", json_string(a->reason));
    json_object_set_new(o, "origin", json_string(a->origin));
    return o;
}

/* ------------------------------------------------------------ Redis */

/* One EVAL of the write script with these ops ("+" json | "-" id pairs);
 * *changed = the fields it changed. */
static int write_ops(ctl_t *c, const char **ops, size_t nops, long long *changed, char *err, size_t errlen)
{
    const char **argv = xcalloc(5 + nops, sizeof(char *));
    size_t n = 0;
    argv[n++] = "EVAL";
    argv[n++] = ACTIONS_WRITE_SCRIPT;
    argv[n++] = "2";
    argv[n++] = ACTIONS_KEY;
    argv[n++] = ACTIONS_VERSION_KEY;
    for (size_t i = 0; i < nops; i++)
        argv[n++] = ops[i];
    redisReply *r = ctl_command_argv(c, err, errlen, (int)n, argv, NULL);
    free(argv);
    if (r == NULL)
        return CTL_EUNAVAIL;
    int ok = r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[1]->type == REDIS_REPLY_INTEGER;
    if (ok)
        *changed = r->element[1]->integer;
    else
        snprintf(err, errlen, "redis: unexpected answer to the actions script");
    freeReplyObject(r);
    return ok ? CTL_OK : CTL_EUNAVAIL;
}

/* The field id of mp:act: CTL_OK + *a (validated; *found 1), CTL_OK with
 * *found 0 when absent, -1 + *found 2 when present and corrupt, or
 * CTL_EUNAVAIL. */
static int read_one(ctl_t *c, const char *id, action_t *a, int *found, char *err, size_t errlen)
{
    *found = 0;
    redisReply *r = ctl_command(c, err, errlen, "HGET %s %s", ACTIONS_KEY, id);
    if (r == NULL)
        return CTL_EUNAVAIL;
    int rc = CTL_OK;
    if (r->type == REDIS_REPLY_STRING) {
        if (action_from_json(id, strlen(id), r->str, r->len, a) == 0)
            *found = 1;
        else
            *found = 2;
    } else if (r->type != REDIS_REPLY_NIL) {
        snprintf(err, errlen, "redis: unexpected answer to HGET %s", ACTIONS_KEY);
        rc = CTL_EUNAVAIL;
    }
    freeReplyObject(r);
    return rc;
}

/* Every valid field of mp:act not expired by now: *list (malloc'd), *n. */
static int read_all(ctl_t *c, uint64_t now, action_t **list, size_t *n, char *err, size_t errlen)
{
    *list = NULL;
    *n = 0;
    redisReply *r = ctl_command(c, err, errlen, "HGETALL %s", ACTIONS_KEY);
    if (r == NULL)
        return CTL_EUNAVAIL;
    if (r->type != REDIS_REPLY_ARRAY || r->elements % 2 != 0) {
        snprintf(err, errlen, "redis: unexpected answer to HGETALL %s", ACTIONS_KEY);
        freeReplyObject(r);
        return CTL_EUNAVAIL;
    }
    action_t *v = xcalloc(r->elements / 2 + 1, sizeof(*v));
    size_t k = 0;
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *f = r->element[i], *s = r->element[i + 1];
        if (f->type != REDIS_REPLY_STRING || s->type != REDIS_REPLY_STRING ||
            action_from_json(f->str, f->len, s->str, s->len, &v[k]) < 0)
            continue; /* skipped, as the workers skip it */
        if (v[k].expires_ms > now)
            k++;
    }
    freeReplyObject(r);
    *list = v;
    *n = k;
    return CTL_OK;
}

static int by_expiry(const void *pa, const void *pb)
{
    const action_t *a = pa, *b = pb;
    if (a->expires_ms != b->expires_ms)
        return a->expires_ms < b->expires_ms ? -1 : 1;
    return strcmp(a->id, b->id);
}

/* ------------------------------------------------------------ operations */

int ctl_action_add(ctl_t *c, const action_t *in, json_t **out, char *err, size_t errlen)
{
    if (out != NULL)
        *out = NULL;
    action_t a;
    uint64_t now = util_wall_ms();
    if (action_normalize(in, &a) < 0) {
        snprintf(err, errlen, "invalid action (kind, selector, value, rate, limit or a string)");
        return CTL_EINVAL;
    }
    if (a.created_ms == 0)
        a.created_ms = now;
    if (a.expires_ms <= now) {
        snprintf(err, errlen, "invalid action: it has expired already");
        return CTL_EINVAL;
    }
    action_t old;
    int found;
    int rc = read_one(c, a.id, &old, &found, err, errlen);
    if (rc != CTL_OK)
        return rc;
    if (found == 1 && old.expires_ms > now &&
        (old.kind != a.kind || old.sel != a.sel || strcmp(old.value, a.value) != 0 ||
         strcmp(old.source, a.source) != 0)) {
        snprintf(err, errlen, "action %s exists and is a %s of %s %s%s%s: resume it first or choose another id",
                 a.id, action_kind_name(old.kind), action_sel_name(old.sel), old.value, old.source[0] ? " via " : "",
                 old.source);
        return CTL_ECONFLICT;
    }
    char *json = action_to_json(&a);
    const char *ops[] = { "+", json };
    long long changed = 0;
    rc = write_ops(c, ops, 2, &changed, err, errlen);
    free(json);
    if (rc != CTL_OK)
        return rc;
    if (out == NULL)
        return CTL_OK;
    action_t stored;
    if (read_one(c, a.id, &stored, &found, err, errlen) == CTL_OK && found == 1)
        a = stored; /* after the script's merge */
    *out = ctl_action_json(&a, util_wall_ms());
    return CTL_OK;
}

int ctl_action_add_json(ctl_t *c, const json_t *req, const char *who, json_t **out, char *err, size_t errlen)
{
    if (out != NULL)
        *out = NULL;
    action_t a;
    int rc = ctl_action_from_request(req, who, util_wall_ms(), &a, err, errlen);
    if (rc != CTL_OK)
        return rc;
    return ctl_action_add(c, &a, out, err, errlen);
}

int ctl_action_remove(ctl_t *c, const char *id, json_t **out, char *err, size_t errlen)
{
    if (out != NULL)
        *out = NULL;
    if (id == NULL || id[0] == '\0' || strlen(id) >= sizeof(((action_t *)0)->id)) {
        snprintf(err, errlen, "invalid action id");
        return CTL_EINVAL;
    }
    action_t a;
    int found;
    uint64_t now = util_wall_ms();
    int rc = read_one(c, id, &a, &found, err, errlen);
    if (rc != CTL_OK)
        return rc;
    if (found == 0 || (found == 1 && a.expires_ms <= now)) {
        snprintf(err, errlen, "no action %s in force (mailpump admin list shows them)", id);
        return CTL_ENOTFOUND;
    }
    const char *ops[] = { "-", id };
    long long changed = 0;
    rc = write_ops(c, ops, 2, &changed, err, errlen);
    if (rc != CTL_OK)
        return rc;
    if (changed == 0) { /* expired or removed meanwhile */
        snprintf(err, errlen, "no action %s in force (mailpump admin list shows them)", id);
        return CTL_ENOTFOUND;
    }
    if (out != NULL) {
        if (found == 1) {
            *out = ctl_action_json(&a, now);
        } else {
            *out = json_object();
            json_object_set_new(*out, "id", json_string(id));
        }
    }
    return CTL_OK;
}

int ctl_action_resume(ctl_t *c, action_sel_t sel, const char *value, const char *source, json_t **out, char *err,
                      size_t errlen)
{
    if (out != NULL)
        *out = NULL;
    if (sel < SEL_SITE || sel > SEL_CAMPAIGN || value == NULL || value[0] == '\0') {
        snprintf(err, errlen, "resume: expected a selector and its value");
        return CTL_EINVAL;
    }
    char v[sizeof(((action_t *)0)->value)];
    if (strlen(value) >= sizeof(v)) {
        snprintf(err, errlen, "resume: the value is too long");
        return CTL_EINVAL;
    }
    memcpy(v, value, strlen(value) + 1);
    if (sel == SEL_SITE || sel == SEL_DOMAIN)
        for (char *p = v; *p; p++)
            *p = (char)tolower((unsigned char)*p);
    action_t *list;
    size_t n;
    uint64_t now = util_wall_ms();
    int rc = read_all(c, now, &list, &n, err, errlen);
    if (rc != CTL_OK)
        return rc;
    const char **ops = xcalloc(2 * n + 1, sizeof(char *));
    size_t nops = 0, k = 0;
    for (size_t i = 0; i < n; i++) {
        const action_t *a = &list[i];
        if (a->kind != ACTION_SUSPEND || a->sel != sel || strcmp(a->value, v) != 0 ||
            (source != NULL && strcmp(a->source, source) != 0))
            continue;
        list[k++] = *a;
        ops[nops++] = "-";
        ops[nops++] = list[k - 1].id;
    }
    if (k == 0) {
        snprintf(err, errlen, "no suspend in force for %s %s%s%s (mailpump admin list shows them)",
                 action_sel_name(sel), v, source && source[0] ? " via " : "", source ? source : "");
        rc = CTL_ENOTFOUND;
    } else {
        long long changed = 0;
        rc = write_ops(c, ops, nops, &changed, err, errlen);
    }
    if (rc == CTL_OK && out != NULL) {
        qsort(list, k, sizeof(*list), by_expiry);
        json_t *arr = json_array();
        for (size_t i = 0; i < k; i++)
            json_array_append_new(arr, ctl_action_json(&list[i], now));
        *out = json_object();
        json_object_set_new(*out, "removed", arr);
    }
    free(ops);
    free(list);
    return rc;
}

int ctl_actions_list(ctl_t *c, json_t **out, char *err, size_t errlen)
{
    *out = NULL;
    action_t *list;
    size_t n;
    uint64_t now = util_wall_ms();
    int rc = read_all(c, now, &list, &n, err, errlen);
    if (rc != CTL_OK)
        return rc;
    qsort(list, n, sizeof(*list), by_expiry);
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, ctl_action_json(&list[i], now));
    free(list);
    *out = arr;
    return CTL_OK;
}

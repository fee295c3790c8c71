/*
 * api/control.c - the control plane's HTTP endpoints (see control.h).
 *
 * Each handler reads its arguments from the path, the query or the JSON
 * body, runs one control/ operation on its thread's ctl_t and answers its
 * result as it is: the CLI prints the same objects. Failures map through
 * api_ctl_error(): CTL_EINVAL 400, CTL_ENOTFOUND 404, CTL_ECONFLICT 409,
 * CTL_EUNAVAIL 503. Admin actions are made in the name of the caller's
 * token (origin "admin:<token name>").
 */
#include "api/control.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control/admin.h"
#include "control/queue.h"
#include "control/suppress.h"
#include "control/trace.h"
#include "deliverer/actions.h"

#define ERRLEN 512

/* A query parameter as an unsigned number in [lo, hi]; dflt when absent.
 * -1 (answered 400) when present and not such a number. */
static int query_uint(api_call_t *c, const char *name, unsigned long lo, unsigned long hi, unsigned long dflt,
                      unsigned long *out)
{
    const char *v = api_query(c, name);
    if (v == NULL || v[0] == '\0') {
        *out = dflt;
        return 0;
    }
    char *end;
    errno = 0;
    unsigned long n = strtoul(v, &end, 10);
    if (errno != 0 || *end != '\0' || v[0] == '-' || n < lo || n > hi) {
        api_error(c, 400, "invalid", "%s must be a number from %lu to %lu", name, lo, hi);
        return -1;
    }
    *out = n;
    return 0;
}

/* The JSON body as an object; NULL (answered 400) when there is none or
 * it is not an object. */
static const json_t *body_object(api_call_t *c)
{
    const json_t *b = api_body(c);
    if (b == NULL || !json_is_object(b)) {
        api_error(c, 400, "invalid", "the request body must be a JSON object");
        return NULL;
    }
    return b;
}

/* An optional string member: 0 with *out (NULL when absent or null), -1
 * (answered 400) when it is something else. */
static int member_string(api_call_t *c, const json_t *o, const char *key, const char **out)
{
    const json_t *v = json_object_get(o, key);
    *out = NULL;
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_string(v)) {
        api_error(c, 400, "invalid", "\"%s\" must be a string", key);
        return -1;
    }
    *out = json_string_value(v);
    return 0;
}

/* The tenant a suppression request names: ?tenant= (or the body's
 * "tenant"); absent, empty or "global" for the global list. */
static const char *list_tenant(const char *t)
{
    if (t == NULL || t[0] == '\0' || strcmp(t, "global") == 0)
        return NULL;
    return t;
}

static void answer(api_call_t *c, int st, unsigned ok_status, json_t *out, const char *err)
{
    if (st != CTL_OK) {
        json_decref(out);
        api_ctl_error(c, st, err);
        return;
    }
    api_reply(c, ok_status, out);
}

/* ------------------------------------------------------------ actions */

static void h_actions_list(api_call_t *c, void *arg)
{
    char err[ERRLEN] = "";
    json_t *out = NULL;
    int st = ctl_actions_list(api_ctl(c), &out, err, sizeof(err));
    if (st == CTL_OK) {
        json_t *wrap = json_object();
        json_object_set_new(wrap, "actions", out);
        out = wrap;
    }
    answer(c, st, 200, out, err);
}

static void h_actions_add(api_call_t *c, void *arg)
{
    const json_t *req = body_object(c);
    if (req == NULL)
        return;
    char err[ERRLEN] = "";
    json_t *out = NULL;
    int st = ctl_action_add_json(api_ctl(c), req, api_who(c), &out, err, sizeof(err));
    answer(c, st, 201, out, err);
}

static void h_actions_remove(api_call_t *c, void *arg)
{
    char err[ERRLEN] = "";
    json_t *out = NULL;
    int st = ctl_action_remove(api_ctl(c), api_param(c, "id"), &out, err, sizeof(err));
    answer(c, st, 200, out, err);
}

static void h_actions_resume(api_call_t *c, void *arg)
{
    const json_t *req = body_object(c);
    if (req == NULL)
        return;
    const char *sel = NULL, *value = NULL, *source = NULL;
    if (member_string(c, req, "selector", &sel) < 0 || member_string(c, req, "value", &value) < 0 ||
        member_string(c, req, "source", &source) < 0)
        return;
    int s = sel != NULL ? action_sel_parse(sel) : -1;
    if (s < 0 || value == NULL || value[0] == '\0') {
        api_error(c, 400, "invalid",
                  "resume needs \"selector\" (site, domain, source, pool, tenant or campaign) and \"value\"");
        return;
    }
    char err[ERRLEN] = "";
    json_t *out = NULL;
    int st = ctl_action_resume(api_ctl(c), (action_sel_t)s, value, source && source[0] ? source : NULL, &out,
                               err, sizeof(err));
    answer(c, st, 200, out, err);
}

/* ------------------------------------------------------- suppressions */

static void h_sup_list(api_call_t *c, void *arg)
{
    unsigned long limit;
    if (query_uint(c, "limit", 1, 10000, 100, &limit) < 0)
        return;
    char err[ERRLEN] = "";
    json_t *out = NULL;
    int st = suppress_list(api_ctl(c), list_tenant(api_query(c, "tenant")), api_query(c, "cursor"),
                           (unsigned)limit, &out, err, sizeof(err));
    answer(c, st, 200, out, err);
}

static void h_sup_add(api_call_t *c, void *arg)
{
    const json_t *req = body_object(c);
    if (req == NULL)
        return;
    const char *tenant = NULL, *reason = NULL;
    if (member_string(c, req, "tenant", &tenant) < 0 || member_string(c, req, "reason", &reason) < 0)
        return;
    const json_t *addrs = json_object_get(req, "addresses");
    const json_t *one = json_object_get(req, "address");
    size_t n = json_is_array(addrs) ? json_array_size(addrs) : 0;
    if ((addrs != NULL && (!json_is_array(addrs) || n == 0)) || (one != NULL && !json_is_string(one)) ||
        (addrs == NULL) == (one == NULL)) {
        api_error(c, 400, "invalid", "give \"address\" (a string) or \"addresses\" (a non-empty array of strings)");
        return;
    }
    if (n > 100000) {
        api_error(c, 413, "too_large", "at most 100000 addresses per request, not %zu", n);
        return;
    }
    const char **list = calloc(n ? n : 1, sizeof(*list));
    if (list == NULL) {
        api_error(c, 500, "internal", "out of memory");
        return;
    }
    if (one != NULL) {
        list[0] = json_string_value(one);
        n = 1;
    }
    for (size_t i = 0; addrs != NULL && i < n; i++) {
        const json_t *a = json_array_get(addrs, i);
        if (!json_is_string(a)) {
            free(list);
            api_error(c, 400, "invalid", "addresses[%zu] is not a string", i);
            return;
        }
        list[i] = json_string_value(a);
    }
    char err[ERRLEN] = "";
    json_t *out = NULL;
    int st = suppress_add(api_ctl(c), list_tenant(tenant), list, n, reason, &out, err, sizeof(err));
    free(list);
    answer(c, st, 200, out, err);
}

static void h_sup_get(api_call_t *c, void *arg)
{
    char err[ERRLEN] = "";
    json_t *out = NULL;
    int st = suppress_get(api_ctl(c), list_tenant(api_query(c, "tenant")), api_param(c, "address"), &out, err,
                          sizeof(err));
    answer(c, st, 200, out, err);
}

static void h_sup_remove(api_call_t *c, void *arg)
{
    char err[ERRLEN] = "";
    json_t *out = NULL;
    const char *addr = api_param(c, "address");
    int st = suppress_remove(api_ctl(c), list_tenant(api_query(c, "tenant")), &addr, 1, &out, err, sizeof(err));
    if (st == CTL_OK && json_integer_value(json_object_get(out, "removed")) == 0) {
        const json_t *inv = json_object_get(out, "invalid");
        json_decref(out);
        if (json_array_size(inv) > 0)
            api_error(c, 400, "invalid", "not a valid address: %s", addr);
        else
            api_error(c, 404, "not_found", "%s is not on the list", addr);
        return;
    }
    answer(c, st, 200, out, err);
}

/* ----------------------------------------------------------- messages */

static void h_message(api_call_t *c, void *arg)
{
    char err[ERRLEN] = "";
    int st = CTL_OK;
    json_t *out = ctl_trace(api_ctl(c), api_param(c, "id"), &st, err, sizeof(err));
    answer(c, out ? CTL_OK : st, 200, out, err);
}

/* ------------------------------------------------------ queue and dead */

static void h_queue(api_call_t *c, void *arg)
{
    char err[ERRLEN] = "";
    int st = CTL_OK;
    json_t *out = ctl_queue_summary(api_ctl(c), &st, err, sizeof(err));
    answer(c, out ? CTL_OK : st, 200, out, err);
}

static void h_dead_list(api_call_t *c, void *arg)
{
    unsigned long limit;
    if (query_uint(c, "limit", 1, CTL_DEAD_MAX, 100, &limit) < 0)
        return;
    char err[ERRLEN] = "";
    int st = CTL_OK;
    json_t *out = ctl_dead_list(api_ctl(c), api_query(c, "reason"), limit, &st, err, sizeof(err));
    answer(c, out ? CTL_OK : st, 200, out, err);
}

static void h_dead_redrive(api_call_t *c, void *arg)
{
    const json_t *req = api_body(c);
    if (req != NULL && !json_is_object(req)) {
        api_error(c, 400, "invalid", "the request body must be a JSON object");
        return;
    }
    const char *reason = NULL;
    if (req != NULL && member_string(c, req, "reason", &reason) < 0)
        return;
    const json_t *lim = req ? json_object_get(req, "limit") : NULL;
    const json_t *dry = req ? json_object_get(req, "dry_run") : NULL;
    if ((lim != NULL && (!json_is_integer(lim) || json_integer_value(lim) < 1 ||
                         json_integer_value(lim) > CTL_DEAD_MAX)) ||
        (dry != NULL && !json_is_boolean(dry))) {
        api_error(c, 400, "invalid", "\"limit\" must be a number from 1 to %d and \"dry_run\" a boolean",
                  (int)CTL_DEAD_MAX);
        return;
    }
    char err[ERRLEN] = "";
    int st = CTL_OK;
    json_t *out = ctl_dead_redrive(api_ctl(c), reason, lim ? (size_t)json_integer_value(lim) : 0,
                                   dry != NULL && json_is_true(dry), &st, err, sizeof(err));
    if (out != NULL && json_integer_value(json_object_get(out, "failed")) > 0) {
        api_reply(c, 503, out); /* stopped at a publish that failed: what moved is in the body */
        return;
    }
    answer(c, out ? CTL_OK : st, 200, out, err);
}

int api_control_routes(api_server_t *s, char *err, size_t errlen)
{
    static const struct {
        const char    *method, *pattern;
        api_handler_fn fn;
    } routes[] = {
        { "GET", "/v1/actions", h_actions_list },
        { "POST", "/v1/actions", h_actions_add },
        { "POST", "/v1/actions/resume", h_actions_resume },
        { "DELETE", "/v1/actions/{id}", h_actions_remove },
        { "GET", "/v1/suppressions", h_sup_list },
        { "POST", "/v1/suppressions", h_sup_add },
        { "GET", "/v1/suppressions/{address}", h_sup_get },
        { "DELETE", "/v1/suppressions/{address}", h_sup_remove },
        { "GET", "/v1/messages/{id}", h_message },
        { "GET", "/v1/queue", h_queue },
        { "GET", "/v1/dead", h_dead_list },
        { "POST", "/v1/dead/redrive", h_dead_redrive },
    };
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
        if (api_route(s, routes[i].method, routes[i].pattern, routes[i].fn, NULL) < 0) {
            snprintf(err, errlen, "api: route %s %s refused", routes[i].method, routes[i].pattern);
            return -1;
        }
    return 0;
}

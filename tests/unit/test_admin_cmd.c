/*
 * Unit tests for control/admin and cli/admin_cmd without Redis: operator
 * durations; the CLI's argument parsing (each subcommand, the request it
 * builds, every usage error, the default who); the JSON request's
 * validation (every member, unknown members, the generated id, the
 * origin, the kinds' own members) and the action it gives being one a
 * worker accepts (action_to_json / action_from_json round trip); the
 * answer's JSON shape; the operations' errors when Redis is not
 * configured or refuses the connection. With the stack's Redis:
 * tests/integration/test_admin.py (the CLI end to end).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/admin_cmd.h"
#include "control/admin.h"
#include "control/ctl.h"
#include "core/config.h"
#include "core/util.h"
#include "deliverer/actions.h"
#include "deliverer/outcome.h"

#define NOW 1800000000000ull

/* ------------------------------------------------------------ durations */

static void test_durations(void **state)
{
    (void)state;
    uint64_t ms = 0;
    assert_int_equal(ctl_parse_duration("90s", &ms), 0);
    assert_int_equal(ms, 90000);
    assert_int_equal(ctl_parse_duration("30m", &ms), 0);
    assert_int_equal(ms, 1800000);
    assert_int_equal(ctl_parse_duration("2h", &ms), 0);
    assert_int_equal(ms, 7200000);
    assert_int_equal(ctl_parse_duration("1d", &ms), 0);
    assert_int_equal(ms, 86400000);
    assert_int_equal(ctl_parse_duration("1500ms", &ms), 0);
    assert_int_equal(ms, 1500);
    assert_int_equal(ctl_parse_duration("366d", &ms), 0);
    assert_int_equal(ms, CTL_ACTION_MAX_MS);
    ms = 7;
    const char *bad[] = { "90", "5000", "", "  ", "0s", "999ms", "367d", "m", "5x", "-5m", "5 parsecs", "1.5h", NULL };
    for (size_t i = 0; bad[i] != NULL; i++) {
        if (ctl_parse_duration(bad[i], &ms) != -1)
            fail_msg("duration \"%s\" accepted", bad[i]);
        assert_int_equal(ms, 7);
    }
    assert_int_equal(ctl_parse_duration(NULL, &ms), -1);
}

/* ------------------------------------------------------------ the CLI */

static int parse(admin_args_t *a, char *err, size_t errlen, ...)
{
    char *argv[40];
    int argc = 0;
    va_list ap;
    va_start(ap, errlen);
    const char *s;
    while ((s = va_arg(ap, const char *)) != NULL)
        argv[argc++] = (char *)s;
    va_end(ap);
    argv[argc] = NULL;
    err[0] = '\0';
    return admin_cmd_parse(argc, argv, a, err, errlen);
}

static char *dump(const json_t *o)
{
    return json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
}

static void assert_req(const admin_args_t *a, const char *want)
{
    char *s = dump(a->req);
    assert_string_equal(s, want);
    free(s);
}

static void test_cli_add(void **state)
{
    (void)state;
    admin_args_t a;
    char err[300];
    assert_int_equal(parse(&a, err, sizeof(err), "admin", "suspend", "--domain", "Example.COM", "--for", "30m",
                           "--reason", "provider outage", "--who", "alice@ops", NULL),
                     0);
    assert_int_equal(a.op, ADMIN_OP_ADD);
    assert_int_equal(a.help, 0);
    assert_string_equal(a.who, "alice@ops");
    assert_req(&a, "{\"duration\":\"30m\",\"kind\":\"suspend\",\"reason\":\"provider outage\",\"selector\":\"domain\","
                   "\"source\":\"\",\"value\":\"Example.COM\"}");
    admin_args_free(&a);

    assert_int_equal(parse(&a, err, sizeof(err), "admin", "bounce", "--tenant", "t1", "--via", "mta2", "--for", "2h",
                           "--reason", "stop", "--id", "inc-42", "--who", "bob", "--json", NULL),
                     0);
    assert_int_equal(a.json, 1);
    assert_req(&a, "{\"duration\":\"2h\",\"id\":\"inc-42\",\"kind\":\"bounce\",\"reason\":\"stop\",\"selector\":"
                   "\"tenant\",\"source\":\"mta2\",\"value\":\"t1\"}");
    admin_args_free(&a);

    assert_int_equal(parse(&a, err, sizeof(err), "admin", "rate", "--site", "gmail", "--rate", "30/m", "--for", "1d",
                           "--reason", "r", "--who", "w", NULL),
                     0);
    assert_req(&a, "{\"duration\":\"1d\",\"kind\":\"rate\",\"rate\":\"30/m\",\"reason\":\"r\",\"selector\":\"site\","
                   "\"source\":\"\",\"value\":\"gmail\"}");
    admin_args_free(&a);

    assert_int_equal(parse(&a, err, sizeof(err), "admin", "connections", "--pool", "bulk", "--limit", "5", "--for",
                           "90s", "--reason", "r", "--who", "w", NULL),
                     0);
    assert_req(&a, "{\"connection_limit\":5,\"duration\":\"90s\",\"kind\":\"connection_limit\",\"reason\":\"r\","
                   "\"selector\":\"pool\",\"source\":\"\",\"value\":\"bulk\"}");
    admin_args_free(&a);

    /* every selector flag names its selector */
    const char *flags[] = { "--site", "--domain", "--source", "--pool", "--tenant", "--campaign" };
    for (int i = 0; i < 6; i++) {
        assert_int_equal(parse(&a, err, sizeof(err), "admin", "suspend", flags[i], "v", "--for", "1m", "--reason",
                               "r", NULL),
                         0);
        assert_int_equal(a.sel, i + 1);
        assert_string_equal(json_string_value(json_object_get(a.req, "selector")),
                            action_sel_name((action_sel_t)(i + 1)));
        admin_args_free(&a);
    }
}

static void test_cli_default_who(void **state)
{
    (void)state;
    admin_args_t a;
    char err[300];
    setenv("USER", "carol", 1);
    assert_int_equal(parse(&a, err, sizeof(err), "admin", "suspend", "--campaign", "c9", "--for", "1m", "--reason",
                           "r", NULL),
                     0);
    char host[256] = "";
    gethostname(host, sizeof(host) - 1);
    char want[300];
    snprintf(want, sizeof(want), "carol@%s", host);
    assert_string_equal(a.who, want);
    admin_args_free(&a);
}

static void test_cli_resume_list(void **state)
{
    (void)state;
    admin_args_t a;
    char err[300];
    assert_int_equal(parse(&a, err, sizeof(err), "admin", "resume", "adm-1234abcd", NULL), 0);
    assert_int_equal(a.op, ADMIN_OP_RESUME);
    assert_string_equal(a.id, "adm-1234abcd");
    assert_int_equal(a.sel, 0);
    assert_null(a.req);
    admin_args_free(&a);

    assert_int_equal(parse(&a, err, sizeof(err), "admin", "resume", "--domain", "x.test", "--via", "mta1", NULL), 0);
    assert_null(a.id);
    assert_int_equal(a.sel, SEL_DOMAIN);
    assert_string_equal(a.value, "x.test");
    assert_string_equal(a.via, "mta1");
    admin_args_free(&a);

    assert_int_equal(parse(&a, err, sizeof(err), "admin", "resume", "--tenant", "t1", NULL), 0);
    assert_int_equal(a.sel, SEL_TENANT);
    assert_null(a.via);
    admin_args_free(&a);

    assert_int_equal(parse(&a, err, sizeof(err), "admin", "list", "--json", "--redis", "127.0.0.1:6390", NULL), 0);
    assert_int_equal(a.op, ADMIN_OP_LIST);
    assert_int_equal(a.json, 1);
    assert_string_equal(a.redis, "127.0.0.1:6390");
    admin_args_free(&a);

    assert_int_equal(parse(&a, err, sizeof(err), "admin", "list", NULL), 0);
    assert_int_equal(a.json, 0);
    admin_args_free(&a);

    const char *helps[][3] = { { "suspend", "--help", NULL }, { "resume", "-h", NULL }, { "list", "--help", NULL },
                               { "--help", NULL, NULL } };
    for (size_t i = 0; i < 4; i++) {
        char *argv[] = { "admin", (char *)helps[i][0], (char *)helps[i][1], NULL };
        assert_int_equal(admin_cmd_parse(helps[i][1] ? 3 : 2, argv, &a, err, sizeof(err)), 0);
        assert_int_equal(a.help, 1);
        admin_args_free(&a);
    }
}

static void test_cli_usage_errors(void **state)
{
    (void)state;
    static const struct {
        const char *argv[14];
        const char *msg;
    } cases[] = {
        { { "admin", NULL }, "expected suspend, bounce" },
        { { "admin", "pause", "--domain", "x", NULL }, "unknown subcommand \"pause\"" },
        { { "admin", "suspend", "--for", "1m", "--reason", "r", NULL }, "expected a selector" },
        { { "admin", "suspend", "--domain", "x", "--tenant", "t", "--for", "1m", "--reason", "r", NULL },
          "give one selector" },
        { { "admin", "suspend", "--domain", "x", "--reason", "r", NULL }, "--for DURATION is required" },
        { { "admin", "suspend", "--domain", "x", "--for", "90", "--reason", "r", NULL }, "--for: expected a duration" },
        { { "admin", "suspend", "--domain", "x", "--for", "soon", "--reason", "r", NULL }, "--for: expected" },
        { { "admin", "suspend", "--domain", "x", "--for", "1m", NULL }, "--reason TEXT is required" },
        { { "admin", "suspend", "--domain", "x", "--for", "1m", "--reason", "", NULL }, "--reason TEXT is required" },
        { { "admin", "suspend", "--domain", "x", "--for", "1m", "--reason", "r", "extra", NULL },
          "unexpected argument" },
        { { "admin", "suspend", "--domain", "x", "--for", "1m", "--reason", "r", "--rate", "3/s", NULL },
          "--rate is for rate only" },
        { { "admin", "rate", "--domain", "x", "--for", "1m", "--reason", "r", NULL }, "--rate N/s|N/m|N/h is required" },
        { { "admin", "connections", "--domain", "x", "--for", "1m", "--reason", "r", NULL }, "--limit N is required" },
        { { "admin", "connections", "--domain", "x", "--limit", "0", "--for", "1m", "--reason", "r", NULL },
          "--limit: expected 1 to 100000" },
        { { "admin", "connections", "--domain", "x", "--limit", "5x", "--for", "1m", "--reason", "r", NULL },
          "--limit: expected 1 to 100000" },
        { { "admin", "bounce", "--domain", "x", "--limit", "5", "--for", "1m", "--reason", "r", NULL },
          "--limit is for connections only" },
        { { "admin", "suspend", "--domain", "x", "--for", "1m", "--reason", "r", "--who", "", NULL }, "--who: empty" },
        { { "admin", "suspend", "--domain", "x", "--for", "1m", "--reason", "r", "--colour", "red", NULL },
          "unknown option or missing value: \"--colour\"" },
        { { "admin", "suspend", "--domain", NULL }, "unknown option or missing value: \"--domain\"" },
        { { "admin", "resume", NULL }, "expected an action id, or one selector" },
        { { "admin", "resume", "a", "b", NULL }, "expected an action id, or one selector" },
        { { "admin", "resume", "adm-1", "--domain", "x", NULL }, "expected an action id, or one selector" },
        { { "admin", "resume", "adm-1", "--via", "mta1", NULL }, "expected an action id, or one selector" },
        { { "admin", "resume", "--domain", "x", "--for", "1m", NULL }, "resume takes an id or a selector" },
        { { "admin", "list", "--domain", "x", NULL }, "list takes only --json and --redis" },
        { { "admin", "list", "extra", NULL }, "list takes only --json and --redis" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int argc = 0;
        char *argv[16];
        while (cases[i].argv[argc] != NULL) {
            argv[argc] = (char *)cases[i].argv[argc];
            argc++;
        }
        argv[argc] = NULL;
        admin_args_t a;
        char err[300] = "";
        if (admin_cmd_parse(argc, argv, &a, err, sizeof(err)) != -1)
            fail_msg("case %zu accepted", i);
        if (strstr(err, cases[i].msg) == NULL)
            fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, cases[i].msg);
        assert_null(a.req);
    }
}

/* ------------------------------------------------------------ requests */

static json_t *req_of(const char *text)
{
    json_error_t je;
    json_t *o = json_loads(text, 0, &je);
    if (o == NULL)
        fail_msg("bad test JSON: %s", je.text);
    return o;
}

static int from(const char *text, const char *who, action_t *a, char *err, size_t errlen)
{
    json_t *o = req_of(text);
    err[0] = '\0';
    int rc = ctl_action_from_request(o, who, NOW, a, err, errlen);
    json_decref(o);
    return rc;
}

static void test_request_valid(void **state)
{
    (void)state;
    action_t a;
    char err[300];
    assert_int_equal(from("{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"Example.COM\",\"source\":\"\","
                          "\"duration\":\"30m\",\"reason\":\"provider outage\"}",
                          "alice@ops", &a, err, sizeof(err)),
                     CTL_OK);
    assert_int_equal(a.kind, ACTION_SUSPEND);
    assert_int_equal(a.sel, SEL_DOMAIN);
    assert_string_equal(a.value, "example.com");
    assert_string_equal(a.source, "");
    assert_string_equal(a.reason, "provider outage");
    assert_string_equal(a.origin, "admin:alice@ops");
    assert_int_equal(a.created_ms, NOW);
    assert_int_equal(a.expires_ms, NOW + 1800000);
    assert_int_equal(strlen(a.id), 12);
    assert_memory_equal(a.id, "adm-", 4);
    for (int i = 4; i < 12; i++)
        assert_non_null(strchr("0123456789abcdef", a.id[i]));
    /* another request, another id */
    action_t b;
    assert_int_equal(from("{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"example.com\","
                          "\"duration\":60,\"reason\":\"r\"}",
                          "alice@ops", &b, err, sizeof(err)),
                     CTL_OK);
    assert_string_not_equal(a.id, b.id);
    assert_int_equal(b.expires_ms, NOW + 60000); /* a number is seconds */

    /* what a worker reads back is the same action */
    char *json = action_to_json(&a);
    action_t back;
    assert_int_equal(action_from_json(a.id, strlen(a.id), json, strlen(json), &back), 0);
    free(json);
    assert_memory_equal(&back, &a, sizeof(a));

    assert_int_equal(from("{\"kind\":\"rate\",\"selector\":\"site\",\"value\":\"gmail\",\"source\":\"mta1\","
                          "\"duration\":\"2h\",\"reason\":\"r\",\"rate\":\"30/m\",\"id\":\"inc-7\"}",
                          "w", &a, err, sizeof(err)),
                     CTL_OK);
    assert_string_equal(a.id, "inc-7");
    assert_int_equal(a.kind, ACTION_RATE);
    assert_string_equal(a.source, "mta1");
    assert_true(a.rate_per_s > 0.4999 && a.rate_per_s < 0.5001);
    assert_string_equal(a.rate_text, "30/m");

    assert_int_equal(from("{\"kind\":\"connection_limit\",\"selector\":\"pool\",\"value\":\"bulk\","
                          "\"duration\":\"1d\",\"reason\":\"r\",\"connection_limit\":5,\"rate\":null}",
                          "w", &a, err, sizeof(err)),
                     CTL_OK);
    assert_int_equal(a.kind, ACTION_CONNECTIONS);
    assert_int_equal(a.connections, 5);
    assert_int_equal(a.rate_per_s, 0);
}

static void test_request_invalid(void **state)
{
    (void)state;
    static const struct {
        const char *req, *msg;
    } cases[] = {
        { "[]", "not a JSON object" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\",\"colour\":1}",
          "unknown member \"colour\"" },
        { "{\"kind\":\"pause\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\"}", "kind:" },
        { "{\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\"}", "kind:" },
        { "{\"kind\":\"suspend\",\"selector\":\"mx\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\"}", "selector:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"\",\"duration\":60,\"reason\":\"r\"}", "value:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":7,\"duration\":60,\"reason\":\"r\"}", "value:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60}", "reason:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"\"}", "reason:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"reason\":\"r\"}", "duration:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":0,\"reason\":\"r\"}",
          "duration: expected 1 to" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":-5,\"reason\":\"r\"}",
          "duration: expected 1 to" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":\"90\",\"reason\":\"r\"}",
          "duration: expected 90s" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":1.5,\"reason\":\"r\"}",
          "duration:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\","
          "\"rate\":\"3/s\"}",
          "rate: only for kind rate" },
        { "{\"kind\":\"rate\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\"}", "rate:" },
        { "{\"kind\":\"rate\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\","
          "\"rate\":\"fast\"}",
          "rate: expected N/s" },
        { "{\"kind\":\"connection_limit\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\"}",
          "connection_limit: expected" },
        { "{\"kind\":\"connection_limit\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\","
          "\"connection_limit\":0}",
          "connection_limit: expected" },
        { "{\"kind\":\"bounce\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\","
          "\"connection_limit\":3}",
          "connection_limit: only for kind connection_limit" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\\u0001y\",\"duration\":60,\"reason\":\"r\"}",
          "control characters" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\","
          "\"id\":\"a\\nb\"}",
          "control characters" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\",\"id\":5}",
          "id:" },
        { "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\","
          "\"source\":\"0123456789012345678901234567890123456789012345678901234567890123456789\"}",
          "source:" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        action_t a;
        char err[300];
        int rc = from(cases[i].req, "w", &a, err, sizeof(err));
        if (rc != CTL_EINVAL)
            fail_msg("case %zu: %d", i, rc);
        if (strstr(err, cases[i].msg) == NULL)
            fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, cases[i].msg);
    }
    action_t a;
    char err[300];
    const char *ok = "{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\"}";
    assert_int_equal(from(ok, "", &a, err, sizeof(err)), CTL_EINVAL);
    assert_non_null(strstr(err, "who: empty"));
    assert_int_equal(from(ok, NULL, &a, err, sizeof(err)), CTL_EINVAL);
    assert_int_equal(from(ok, "al\nice", &a, err, sizeof(err)), CTL_EINVAL);
    assert_non_null(strstr(err, "who: control characters"));
    char who[100];
    memset(who, 'w', 89);
    who[89] = '\0';
    assert_int_equal(from(ok, who, &a, err, sizeof(err)), CTL_OK); /* "admin:" + 89 fits the origin */
    who[89] = 'w';
    who[90] = '\0';
    assert_int_equal(from(ok, who, &a, err, sizeof(err)), CTL_EINVAL);
    assert_non_null(strstr(err, "who: too long"));
}

static void test_action_json(void **state)
{
    (void)state;
    action_t a = { .kind = ACTION_RATE, .sel = SEL_SITE, .rate_per_s = 0.5, .created_ms = NOW,
                   .expires_ms = NOW + 90500 };
    snprintf(a.id, sizeof(a.id), "adm-00c0ffee");
    snprintf(a.value, sizeof(a.value), "gmail");
    snprintf(a.source, sizeof(a.source), "mta1");
    snprintf(a.rate_text, sizeof(a.rate_text), "30/m");
    snprintf(a.reason, sizeof(a.reason), "outage");
    snprintf(a.origin, sizeof(a.origin), "admin:alice@ops");
    json_t *o = ctl_action_json(&a, NOW);
    char *s = json_dumps(o, JSON_COMPACT); /* in the documented order */
    assert_string_equal(s, "{\"id\":\"adm-00c0ffee\",\"kind\":\"rate\",\"selector\":\"site\",\"value\":\"gmail\","
                           "\"source\":\"mta1\",\"rate\":\"30/m\",\"connection_limit\":null,\"created\":1800000000000,"
                           "\"expires\":1800000090500,\"remaining_s\":91,\"reason\":\"outage\","
                           "\"origin\":\"admin:alice@ops\"}");
    free(s);
    json_decref(o);
    a.kind = ACTION_CONNECTIONS;
    a.connections = 4;
    o = ctl_action_json(&a, NOW + 100000); /* expired: 0 left */
    assert_true(json_is_null(json_object_get(o, "rate")));
    assert_int_equal(json_integer_value(json_object_get(o, "connection_limit")), 4);
    assert_int_equal(json_integer_value(json_object_get(o, "remaining_s")), 0);
    json_decref(o);
    /* the reason tag an operator's bounce gives its recipients */
    assert_string_equal(outcome_reason_name(OUTCOME_R_ADMIN), "admin");
    assert_string_equal(outcome_reason_name(OUTCOME_R_SHAPING), "shaping");
}

/* ------------------------------------------------------------ no Redis */

static void test_redis_unavailable(void **state)
{
    (void)state;
    mp_config_t cfg;
    config_defaults(&cfg);
    free(cfg.redis_host);
    cfg.redis_host = xstrdup("");
    ctl_t *c = ctl_new(&cfg);
    char err[300] = "";
    json_t *out = (json_t *)1;
    assert_int_equal(ctl_actions_list(c, &out, err, sizeof(err)), CTL_EUNAVAIL);
    assert_null(out);
    assert_non_null(strstr(err, "not configured"));
    json_t *req = req_of("{\"kind\":\"suspend\",\"selector\":\"domain\",\"value\":\"x\",\"duration\":60,\"reason\":\"r\"}");
    assert_int_equal(ctl_action_add_json(c, req, "w", &out, err, sizeof(err)), CTL_EUNAVAIL);
    assert_null(out);
    /* an invalid request is refused before any I/O */
    json_object_set_new(req, "selector", json_string("mx"));
    assert_int_equal(ctl_action_add_json(c, req, "w", &out, err, sizeof(err)), CTL_EINVAL);
    json_decref(req);
    ctl_free(c);

    free(cfg.redis_host);
    cfg.redis_host = xstrdup("127.0.0.1");
    cfg.redis_port = 1; /* nothing listens there */
    c = ctl_new(&cfg);
    assert_int_equal(ctl_action_remove(c, "adm-1", &out, err, sizeof(err)), CTL_EUNAVAIL);
    assert_non_null(strstr(err, "redis 127.0.0.1:1: Connection refused"));
    assert_int_equal(ctl_action_resume(c, SEL_DOMAIN, "x", NULL, &out, err, sizeof(err)), CTL_EUNAVAIL);
    assert_int_equal(ctl_action_remove(c, "", &out, err, sizeof(err)), CTL_EINVAL);
    assert_int_equal(ctl_action_resume(c, (action_sel_t)9, "x", NULL, &out, err, sizeof(err)), CTL_EINVAL);
    ctl_free(c);
    config_free(&cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_durations),        cmocka_unit_test(test_cli_add),
        cmocka_unit_test(test_cli_default_who),  cmocka_unit_test(test_cli_resume_list),
        cmocka_unit_test(test_cli_usage_errors), cmocka_unit_test(test_request_valid),
        cmocka_unit_test(test_request_invalid),  cmocka_unit_test(test_action_json),
        cmocka_unit_test(test_redis_unavailable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

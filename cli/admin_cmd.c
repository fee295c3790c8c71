/*
 * SUMMARY
 *  cli/admin_cmd.c - `mailpump admin suspend|bounce|rate|connections`,
 *  `mailpump admin resume`, `mailpump admin list`.
 * DESCRIPTION
 *  The adds build the request POST /v1/actions takes (control/admin.h)
 *  from the flags and hand it to ctl_action_add_json(), so the CLI and the
 *  API accept and refuse the same things. resume takes an action id
 *  (ctl_action_remove: any action, automation ones too) or a selector
 *  (ctl_action_resume: every suspend of that selector and value, through
 *  --via only those qualified by that source). list prints a table, or
 *  with --json the array ctl_actions_list() returns.
 *
 *  Redis comes from the daemon's configuration ([redis] host, port,
 *  timeout_ms; --config or MAILPUMP_REDIS_*), or --redis.
 * DIAGNOSTICS
 *  Exit 0 done; 1 Redis failed, or nothing in force to resume; 2 usage or
 *  a request refused as invalid (an unknown selector, a bad duration...)
 *  or conflicting with an action of the same id.
 */
#include "cli/admin_cmd.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "control/admin.h"
#include "control/ctl.h"
#include "core/util.h"

void admin_cmd_usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump admin suspend|bounce SELECTOR [--via SOURCE] --for DURATION --reason TEXT\n"
            "                     [--id ID] [--who NAME] [--json]\n"
            "       mailpump admin rate SELECTOR --rate N/s|N/m|N/h --for DURATION --reason TEXT ...\n"
            "       mailpump admin connections SELECTOR --limit N --for DURATION --reason TEXT ...\n"
            "       mailpump admin resume ID | resume SELECTOR [--via SOURCE]   [--json]\n"
            "       mailpump admin list [--json]\n"
            "\n"
            "Fleet-wide shaping actions, by hand: every mailpumpd sharing this Redis\n"
            "honours one within about a second, until it expires or is resumed.\n"
            "  suspend      defer the deliveries it selects without spending attempts\n"
            "  bounce       end their recipients bounced (reason admin, naming who and why)\n"
            "  rate         send to them at most N per second, minute or hour\n"
            "  connections  open at most N connections for them\n"
            "  resume       remove one action by id, or every suspend of a selector\n"
            "  list         the actions in force (admin and automation), soonest to expire first\n"
            "\n"
            "SELECTOR is one of:\n"
            "  --domain D  --site S  --tenant T  --campaign C  --pool P  --source X\n"
            "\n"
            "Options:\n"
            "  --via SOURCE     only deliveries through this egress source\n"
            "  --for DURATION   how long: 90s, 30m, 2h, 1d (1 s to 366 d)\n"
            "  --reason TEXT    why (required; it goes into the recipients' events)\n"
            "  --rate N/U       the rate (rate)\n"
            "  --limit N        the connection limit (connections)\n"
            "  --id ID          the action's id (default adm-<random>); adding an id in force\n"
            "                   again extends it\n"
            "  --who NAME       who is acting (default $USER@hostname): origin admin:NAME\n"
            "  --redis H:P      Redis (default: [redis] host and port of --config)\n"
            "  --json           print JSON (the HTTP API's /v1/actions shapes)\n"
            "  -h, --help       this text\n"
            "\n"
            "Exit 0 done, 1 Redis failed or nothing in force to resume, 2 bad usage.\n");
}

enum {
    O_SEL = 1000, /* O_SEL + action_sel_t */
    O_VIA = 1100, O_FOR, O_REASON, O_RATE, O_LIMIT, O_ID, O_WHO, O_REDIS, O_JSON, O_HELP,
};

static void default_who(char *dst, size_t cap)
{
    const char *user = getenv("USER");
    if (user == NULL || user[0] == '\0')
        user = getenv("LOGNAME");
    if (user == NULL || user[0] == '\0')
        user = "unknown";
    char host[256] = "";
    if (gethostname(host, sizeof(host) - 1) < 0 || host[0] == '\0')
        snprintf(host, sizeof(host), "localhost");
    snprintf(dst, cap, "%s@%s", user, host);
}

static int usage_err(char *err, size_t errlen, const char *sub, const char *what)
{
    snprintf(err, errlen, "mailpump admin %s: %s (try mailpump admin %s --help)", sub, what, sub);
    return -1;
}

int admin_cmd_parse(int argc, char **argv, admin_args_t *a, char *err, size_t errlen)
{
    static const struct option opts[] = {
        { "site", required_argument, NULL, O_SEL + SEL_SITE },
        { "domain", required_argument, NULL, O_SEL + SEL_DOMAIN },
        { "source", required_argument, NULL, O_SEL + SEL_SOURCE },
        { "pool", required_argument, NULL, O_SEL + SEL_POOL },
        { "tenant", required_argument, NULL, O_SEL + SEL_TENANT },
        { "campaign", required_argument, NULL, O_SEL + SEL_CAMPAIGN },
        { "via", required_argument, NULL, O_VIA },       { "for", required_argument, NULL, O_FOR },
        { "reason", required_argument, NULL, O_REASON }, { "rate", required_argument, NULL, O_RATE },
        { "limit", required_argument, NULL, O_LIMIT },   { "id", required_argument, NULL, O_ID },
        { "who", required_argument, NULL, O_WHO },       { "redis", required_argument, NULL, O_REDIS },
        { "json", no_argument, NULL, O_JSON },           { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 },
    };
    memset(a, 0, sizeof(*a));
    if (argc < 2 || argv[1][0] == '-') {
        if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
            a->help = 1;
            a->sub = "";
            return 0;
        }
        snprintf(err, errlen, "mailpump admin: expected suspend, bounce, rate, connections, resume or list");
        return -1;
    }
    const char *sub = argv[1];
    a->sub = sub;
    const char *kind = NULL;
    if (strcmp(sub, "suspend") == 0 || strcmp(sub, "bounce") == 0 || strcmp(sub, "rate") == 0) {
        kind = sub;
        a->op = ADMIN_OP_ADD;
    } else if (strcmp(sub, "connections") == 0) {
        kind = "connection_limit";
        a->op = ADMIN_OP_ADD;
    } else if (strcmp(sub, "resume") == 0) {
        a->op = ADMIN_OP_RESUME;
    } else if (strcmp(sub, "list") == 0) {
        a->op = ADMIN_OP_LIST;
    } else {
        snprintf(err, errlen, "mailpump admin: unknown subcommand \"%s\" (try mailpump admin --help)", sub);
        return -1;
    }
    const char *dur = NULL, *reason = NULL, *rate = NULL, *limit = NULL, *id = NULL, *who = NULL;
    int c, nsel = 0;
    optind = 0; /* glibc: start over (the parser may have run before) */
    opterr = 0;
    while ((c = getopt_long(argc - 1, argv + 1, "h", opts, NULL)) != -1) {
        if (c >= O_SEL + SEL_SITE && c <= O_SEL + SEL_CAMPAIGN) {
            a->sel = c - O_SEL;
            a->value = optarg;
            nsel++;
            continue;
        }
        switch (c) {
        case O_VIA: a->via = optarg; break;
        case O_FOR: dur = optarg; break;
        case O_REASON: reason = optarg; break;
        case O_RATE: rate = optarg; break;
        case O_LIMIT: limit = optarg; break;
        case O_ID: id = optarg; break;
        case O_WHO: who = optarg; break;
        case O_REDIS: a->redis = optarg; break;
        case O_JSON: a->json = 1; break;
        case 'h':
        case O_HELP: a->help = 1; return 0;
        default: {
            char what[160];
            snprintf(what, sizeof(what), "unknown option or missing value: \"%s\"",
                     optind >= 1 && optind <= argc - 1 ? argv[optind] : "?");
            return usage_err(err, errlen, sub, what);
        }
        }
    }
    int npos = argc - 1 - optind;
    char **pos = argv + 1 + optind;
    if (nsel > 1)
        return usage_err(err, errlen, sub, "give one selector (--domain, --site, --tenant, ...)");
    if (a->op == ADMIN_OP_LIST) {
        if (npos > 0 || nsel > 0 || a->via || dur || reason || rate || limit || id || who)
            return usage_err(err, errlen, sub, "list takes only --json and --redis");
        return 0;
    }
    if (a->op == ADMIN_OP_RESUME) {
        if (dur || reason || rate || limit || id)
            return usage_err(err, errlen, sub, "resume takes an id or a selector (and --via)");
        if (npos == 1 && nsel == 0 && a->via == NULL) {
            a->id = pos[0];
            return 0;
        }
        if (npos == 0 && nsel == 1)
            return 0;
        return usage_err(err, errlen, sub, "expected an action id, or one selector such as --domain D");
    }
    /* an add */
    if (npos > 0)
        return usage_err(err, errlen, sub, "unexpected argument");
    if (nsel == 0)
        return usage_err(err, errlen, sub,
                         "expected a selector: --domain, --site, --tenant, --campaign, --pool or --source");
    if (dur == NULL)
        return usage_err(err, errlen, sub, "--for DURATION is required (90s, 30m, 2h, 1d)");
    uint64_t ms;
    if (ctl_parse_duration(dur, &ms) < 0)
        return usage_err(err, errlen, sub, "--for: expected a duration such as 90s, 30m, 2h, 1d (1 s to 366 d)");
    if (reason == NULL || reason[0] == '\0')
        return usage_err(err, errlen, sub, "--reason TEXT is required");
    if (strcmp(kind, "rate") == 0 ? rate == NULL : rate != NULL)
        return usage_err(err, errlen, sub, rate ? "--rate is for rate only" : "--rate N/s|N/m|N/h is required");
    long long n = 0;
    if (strcmp(kind, "connection_limit") == 0) {
        char *end;
        if (limit == NULL)
            return usage_err(err, errlen, sub, "--limit N is required");
        n = strtoll(limit, &end, 10);
        if (*limit == '\0' || *end != '\0' || n < 1 || n > 100000)
            return usage_err(err, errlen, sub, "--limit: expected 1 to 100000");
    } else if (limit != NULL) {
        return usage_err(err, errlen, sub, "--limit is for connections only");
    }
    if (who != NULL) {
        if (who[0] == '\0')
            return usage_err(err, errlen, sub, "--who: empty");
        snprintf(a->who, sizeof(a->who), "%s", who);
    } else {
        default_who(a->who, sizeof(a->who));
    }
    json_t *req = json_object();
    json_object_set_new(req, "kind", json_string(kind));
    json_object_set_new(req, "selector", json_string(action_sel_name((action_sel_t)a->sel)));
    json_object_set_new(req, "value", json_string(a->value));
    json_object_set_new(req, "source", json_string(a->via ? a->via : ""));
    json_object_set_new(req, "duration", json_string(dur));
    json_object_set_new(req, "reason", json_string(reason));
    if (rate)
        json_object_set_new(req, "rate", json_string(rate));
    if (limit)
        json_object_set_new(req, "connection_limit", json_integer(n));
    if (id)
        json_object_set_new(req, "id", json_string(id));
    a->req = req;
    return 0;
}

void admin_args_free(admin_args_t *a)
{
    json_decref(a->req);
    a->req = NULL;
}

/* "1d2h", "29m59s", "45s" */
static void fmt_left(long long s, char *dst, size_t cap)
{
    long long d = s / 86400, h = s % 86400 / 3600, m = s % 3600 / 60, sec = s % 60;
    if (d > 0)
        snprintf(dst, cap, "%lldd%lldh", d, h);
    else if (h > 0)
        snprintf(dst, cap, "%lldh%lldm", h, m);
    else if (m > 0)
        snprintf(dst, cap, "%lldm%llds", m, sec);
    else
        snprintf(dst, cap, "%llds", sec);
}

static const char *str(const json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

/* One action as a line (what it does to what, for how long, by whom). */
static void print_line(FILE *f, const char *verb, const json_t *o)
{
    char left[32];
    fmt_left(json_integer_value(json_object_get(o, "remaining_s")), left, sizeof(left));
    const char *kind = str(o, "kind");
    char extra[64] = "";
    if (strcmp(kind, "rate") == 0)
        snprintf(extra, sizeof(extra), " to %s", str(o, "rate"));
    else if (strcmp(kind, "connection_limit") == 0)
        snprintf(extra, sizeof(extra), " to %lld",
                 (long long)json_integer_value(json_object_get(o, "connection_limit")));
    fprintf(f, "%s %s: %s%s %s %s%s%s, %s left, %s: %s\n", verb, str(o, "id"), kind, extra, str(o, "selector"),
            str(o, "value"), str(o, "source")[0] ? " via " : "", str(o, "source"), left, str(o, "origin"),
            str(o, "reason"));
}

static void print_table(FILE *f, const json_t *arr)
{
    if (json_array_size(arr) == 0) {
        fprintf(f, "no actions in force\n");
        return;
    }
    fprintf(f, "%-28s %-16s %-9s %-28s %-12s %-10s %-24s %s\n", "ID", "KIND", "SELECTOR", "VALUE", "SOURCE", "LEFT",
            "ORIGIN", "REASON");
    size_t i;
    const json_t *o;
    json_array_foreach(arr, i, o) {
        char left[32], kind[64];
        fmt_left(json_integer_value(json_object_get(o, "remaining_s")), left, sizeof(left));
        if (strcmp(str(o, "kind"), "rate") == 0)
            snprintf(kind, sizeof(kind), "rate=%s", str(o, "rate"));
        else if (strcmp(str(o, "kind"), "connection_limit") == 0)
            snprintf(kind, sizeof(kind), "conn=%lld",
                     (long long)json_integer_value(json_object_get(o, "connection_limit")));
        else
            snprintf(kind, sizeof(kind), "%s", str(o, "kind"));
        fprintf(f, "%-28s %-16s %-9s %-28s %-12s %-10s %-24s %s\n", str(o, "id"), kind, str(o, "selector"),
                str(o, "value"), str(o, "source")[0] ? str(o, "source") : "-", left, str(o, "origin"),
                str(o, "reason"));
    }
}

static void print_json(const json_t *o)
{
    char *s = json_dumps(o, JSON_COMPACT);
    printf("%s\n", s ? s : "null");
    free(s);
}

static int exit_for(int st)
{
    return st == CTL_EINVAL || st == CTL_ECONFLICT ? 2 : 1;
}

int admin_cmd_main(const mp_config_t *cfg, int argc, char **argv)
{
    admin_args_t a;
    char err[600];
    if (admin_cmd_parse(argc, argv, &a, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    if (a.help) {
        admin_cmd_usage(stdout);
        return 0;
    }
    mp_config_t local = *cfg; /* shallow: only redis_host/port may point elsewhere */
    char host[256];
    if (a.redis != NULL) {
        const char *colon = strrchr(a.redis, ':');
        char *end;
        unsigned long port = colon ? strtoul(colon + 1, &end, 10) : 0;
        if (colon == NULL || colon == a.redis || (size_t)(colon - a.redis) >= sizeof(host) || *end != '\0' ||
            port == 0 || port > 65535) {
            fprintf(stderr, "mailpump admin: --redis expects HOST:PORT\n");
            admin_args_free(&a);
            return 2;
        }
        memcpy(host, a.redis, (size_t)(colon - a.redis));
        host[colon - a.redis] = '\0';
        local.redis_host = host;
        local.redis_port = (unsigned)port;
    }
    ctl_t *ctl = ctl_new(&local);
    json_t *out = NULL;
    int st, rc = 0;
    const char *sub = a.sub;
    switch (a.op) {
    case ADMIN_OP_ADD:
        st = ctl_action_add_json(ctl, a.req, a.who, &out, err, sizeof(err));
        break;
    case ADMIN_OP_RESUME:
        st = a.id ? ctl_action_remove(ctl, a.id, &out, err, sizeof(err))
                  : ctl_action_resume(ctl, (action_sel_t)a.sel, a.value, a.via, &out, err, sizeof(err));
        break;
    default:
        st = ctl_actions_list(ctl, &out, err, sizeof(err));
        break;
    }
    if (st != CTL_OK) {
        fprintf(stderr, "mailpump admin %s: %s\n", sub, err);
        rc = exit_for(st);
    } else if (a.json) {
        print_json(out);
    } else if (a.op == ADMIN_OP_ADD) {
        print_line(stdout, "added", out);
    } else if (a.op == ADMIN_OP_RESUME && a.id) {
        if (json_object_get(out, "kind") != NULL)
            print_line(stdout, "removed", out);
        else
            printf("removed %s\n", str(out, "id"));
    } else if (a.op == ADMIN_OP_RESUME) {
        size_t i;
        const json_t *o;
        json_array_foreach(json_object_get(out, "removed"), i, o) print_line(stdout, "removed", o);
    } else {
        print_table(stdout, out);
    }
    json_decref(out);
    ctl_free(ctl);
    admin_args_free(&a);
    return rc;
}

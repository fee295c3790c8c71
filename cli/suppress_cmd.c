/*
 * SUMMARY
 *  cli/suppress_cmd.c - `mailpump suppress add|remove|list|get|import|
 *  export`.
 * DESCRIPTION
 *  Every subcommand works on one list: --tenant T, or --global (the
 *  default). add and remove take addresses as arguments; list pages
 *  through the list (--cursor, --limit) and prints a table, or the
 *  operation's JSON with --json; get prints one entry; import reads lines
 *  "address[,reason]" from a file or standard input; export writes csv
 *  or jsonl to standard output or --output FILE. The operations
 *  themselves are control/suppress.c's, shared with the HTTP API.
 * DIAGNOSTICS
 *  Exit 2 for usage errors and invalid input (a bad tenant; an invalid
 *  address, reported and not stored), 1 when Redis failed or get found
 *  no entry, else 0.
 */
#include "cli/suppress_cmd.h"

#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "control/ctl.h"
#include "control/suppress.h"
#include "core/util.h"

void suppress_cmd_usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump [--config FILE] suppress add [--tenant T | --global] [--reason R] ADDR...\n"
            "       mailpump [--config FILE] suppress remove [--tenant T | --global] ADDR...\n"
            "       mailpump [--config FILE] suppress get [--tenant T | --global] [--json] ADDR\n"
            "       mailpump [--config FILE] suppress list [--tenant T | --global] [--json]\n"
            "                                [--cursor C] [--limit N]\n"
            "       mailpump [--config FILE] suppress import [--tenant T | --global] [--reason R] FILE|-\n"
            "       mailpump [--config FILE] suppress export [--tenant T | --global] [--format csv|jsonl]\n"
            "                                [--output FILE]\n"
            "\n"
            "Recipients on the global list or on their message's tenant's list are not\n"
            "sent; they get a `suppressed` event. Addresses are compared with the domain\n"
            "IDNA-normalised and the local part case-insensitively (docs/operations.md).\n"
            "import reads lines \"address[,reason]\" ('#' comments allowed).\n"
            "\n"
            "Options:\n"
            "  -t, --tenant T         the tenant's list\n"
            "  -g, --global           the global list (the default)\n"
            "  -R, --reason R         the entries' reason (add: default manual; import: the\n"
            "                         reason of lines without one, default import)\n"
            "  -j, --json             print the result as JSON (list, get)\n"
            "      --cursor C         list: continue from a previous page's next_cursor\n"
            "  -n, --limit N          list: about N entries per page (default 100, at most 10000)\n"
            "  -f, --format F         export: csv (default) or jsonl\n"
            "  -o, --output FILE      export: write to FILE instead of standard output\n"
            "  -r, --redis HOST:PORT  Redis (default: [redis] host/port)\n"
            "  -h, --help             this text\n"
            "\n"
            "Exit status: 0 done, 1 Redis failed or get found nothing, 2 usage error or\n"
            "invalid input (invalid addresses are reported and not stored).\n");
}

static int exit_for(ctl_status_t st)
{
    return st == CTL_EINVAL ? 2 : 1;
}

static void print_json(const json_t *o)
{
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
    printf("%s\n", s);
    free(s);
}

static const char *jstr(const json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

/* Invalid addresses of a result, to stderr; how many. */
static size_t report_invalid(const json_t *res)
{
    const json_t *inv = json_object_get(res, "invalid");
    size_t i;
    const json_t *v;
    json_array_foreach(inv, i, v) {
        if (json_is_string(v))
            fprintf(stderr, "mailpump: invalid address \"%s\": not stored\n", json_string_value(v));
        else
            fprintf(stderr, "mailpump: line %lld: invalid address \"%s\": skipped\n",
                    (long long)json_integer_value(json_object_get(v, "line")), jstr(v, "text"));
    }
    return json_array_size(inv);
}

static void print_entry_line(const json_t *e)
{
    const json_t *reply = json_object_get(e, "reply");
    char code[16] = "-";
    if (json_is_object(reply))
        snprintf(code, sizeof(code), "%lld", (long long)json_integer_value(json_object_get(reply, "code")));
    printf("%-40s %-20s %-6s %-7s %s%s\n", jstr(e, "address"), jstr(e, "added"), jstr(e, "origin"), code,
           jstr(e, "reason"), json_is_true(json_object_get(e, "expired")) ? " (expired)" : "");
}

int suppress_cmd_main(const mp_config_t *cfg, int argc, char **argv)
{
    static const struct option opts[] = {
        { "tenant", required_argument, NULL, 't' }, { "global", no_argument, NULL, 'g' },
        { "reason", required_argument, NULL, 'R' }, { "json", no_argument, NULL, 'j' },
        { "cursor", required_argument, NULL, 'C' }, { "limit", required_argument, NULL, 'n' },
        { "format", required_argument, NULL, 'f' }, { "output", required_argument, NULL, 'o' },
        { "redis", required_argument, NULL, 'r' },  { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        suppress_cmd_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    const char *tenant = NULL, *reason = NULL, *cursor = NULL, *format = "csv", *output = NULL, *redis = NULL;
    int json = 0, global = 0, opt;
    unsigned long limit = 100;
    optind = 0; /* glibc: reinitialise; parsing starts after the subcommand */
    argc--;
    argv++;
    while ((opt = getopt_long(argc, argv, "t:gR:jn:f:o:r:h", opts, NULL)) != -1) {
        switch (opt) {
        case 't': tenant = optarg; break;
        case 'g': global = 1; break;
        case 'R': reason = optarg; break;
        case 'j': json = 1; break;
        case 'C': cursor = optarg; break;
        case 'n': {
            char *end;
            limit = strtoul(optarg, &end, 10);
            if (*end != '\0' || limit == 0 || limit > 10000) {
                fprintf(stderr, "mailpump: --limit expects 1 to 10000\n");
                return 2;
            }
            break;
        }
        case 'f': format = optarg; break;
        case 'o': output = optarg; break;
        case 'r': redis = optarg; break;
        case 'h': suppress_cmd_usage(stdout); return 0;
        default: suppress_cmd_usage(stderr); return 2;
        }
    }
    if (tenant && global) {
        fprintf(stderr, "mailpump: --tenant and --global exclude each other\n");
        return 2;
    }
    int nargs = argc - optind;
    const char *const *args = (const char *const *)argv + optind;
    int is_add = strcmp(sub, "add") == 0, is_remove = strcmp(sub, "remove") == 0;
    int is_get = strcmp(sub, "get") == 0, is_list = strcmp(sub, "list") == 0;
    int is_import = strcmp(sub, "import") == 0, is_export = strcmp(sub, "export") == 0;
    if (!(is_add || is_remove || is_get || is_list || is_import || is_export)) {
        fprintf(stderr, "mailpump: unknown suppress command \"%s\" (try mailpump suppress --help)\n", sub);
        return 2;
    }
    if (((is_add || is_remove) && nargs < 1) || ((is_get || is_import) && nargs != 1) ||
        ((is_list || is_export) && nargs != 0)) {
        fprintf(stderr, "mailpump: wrong arguments for suppress %s (try mailpump suppress --help)\n", sub);
        return 2;
    }
    mp_config_t local = *cfg;
    char host[256];
    if (redis != NULL) {
        const char *colon = strrchr(redis, ':');
        char *end;
        unsigned long port = colon ? strtoul(colon + 1, &end, 10) : 0;
        if (colon == NULL || colon == redis || (size_t)(colon - redis) >= sizeof(host) || port == 0 ||
            port > 65535 || *end != '\0') {
            fprintf(stderr, "mailpump: --redis expects HOST:PORT\n");
            return 2;
        }
        memcpy(host, redis, (size_t)(colon - redis));
        host[colon - redis] = '\0';
        local.redis_host = host;
        local.redis_port = (unsigned)port;
    }
    FILE *in = NULL, *out = stdout;
    if (is_import) {
        in = strcmp(args[0], "-") == 0 ? stdin : fopen(args[0], "r");
        if (in == NULL) {
            fprintf(stderr, "mailpump: %s: %s\n", args[0], strerror(errno));
            return 2;
        }
    }
    if (is_export && output != NULL && (out = fopen(output, "w")) == NULL) {
        fprintf(stderr, "mailpump: %s: %s\n", output, strerror(errno));
        return 2;
    }
    ctl_t *c = ctl_new(&local);
    char err[512] = "";
    json_t *res = NULL;
    ctl_status_t st;
    int rc = 0;
    if (is_add)
        st = suppress_add(c, tenant, args, (size_t)nargs, reason, &res, err, sizeof(err));
    else if (is_remove)
        st = suppress_remove(c, tenant, args, (size_t)nargs, &res, err, sizeof(err));
    else if (is_get)
        st = suppress_get(c, tenant, args[0], &res, err, sizeof(err));
    else if (is_list)
        st = suppress_list(c, tenant, cursor, (unsigned)limit, &res, err, sizeof(err));
    else if (is_import)
        st = suppress_import(c, tenant, in, reason, &res, err, sizeof(err));
    else
        st = suppress_export(c, tenant, out, format, &res, err, sizeof(err));
    if (st != CTL_OK) {
        fprintf(stderr, "mailpump: suppress %s: %s\n", sub, err);
        rc = exit_for(st);
    } else if (json && (is_list || is_get)) {
        print_json(res);
    } else if (is_get) {
        print_entry_line(res);
        const json_t *reply = json_object_get(res, "reply");
        if (json_is_object(reply))
            printf("  reply: %lld %s %s\n", (long long)json_integer_value(json_object_get(reply, "code")),
                   jstr(reply, "enhanced"), jstr(reply, "text"));
        if (json_is_string(json_object_get(res, "message_id")))
            printf("  message: %s\n", jstr(res, "message_id"));
    } else if (is_list) {
        size_t i;
        const json_t *e;
        json_array_foreach(json_object_get(res, "entries"), i, e)
            print_entry_line(e);
        const char *next = json_string_value(json_object_get(res, "next_cursor"));
        fprintf(stderr, "%lld entries on the %s list%s%s\n",
                (long long)json_integer_value(json_object_get(res, "total")), jstr(res, "list"),
                next ? "; more: --cursor " : "", next ? next : "");
    } else if (is_add) {
        printf("%lld added to the %s list\n", (long long)json_integer_value(json_object_get(res, "added")),
               jstr(res, "list"));
        if (report_invalid(res) > 0)
            rc = 2;
    } else if (is_remove) {
        printf("%lld removed from the %s list\n", (long long)json_integer_value(json_object_get(res, "removed")),
               jstr(res, "list"));
        size_t i;
        const json_t *v;
        json_array_foreach(json_object_get(res, "not_found"), i, v)
            fprintf(stderr, "mailpump: %s was not on the list\n", json_string_value(v));
        if (report_invalid(res) > 0)
            rc = 2;
    } else if (is_import) {
        printf("%lld lines, %lld added, %lld invalid skipped (%s list)\n",
               (long long)json_integer_value(json_object_get(res, "lines")),
               (long long)json_integer_value(json_object_get(res, "added")),
               (long long)json_integer_value(json_object_get(res, "skipped_invalid")), jstr(res, "list"));
        report_invalid(res);
        if (json_integer_value(json_object_get(res, "skipped_invalid")) > 0)
            rc = 2;
    } else {
        fprintf(stderr, "%lld entries exported from the %s list\n",
                (long long)json_integer_value(json_object_get(res, "exported")), jstr(res, "list"));
    }
    json_decref(res);
    ctl_free(c);
    if (in != NULL && in != stdin)
        fclose(in);
    if (out != stdout && fclose(out) != 0 && rc == 0) {
        fprintf(stderr, "mailpump: %s: %s\n", output, strerror(errno));
        rc = 1;
    }
    return rc;
}

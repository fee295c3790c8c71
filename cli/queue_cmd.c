/*
 * SUMMARY
 *  cli/queue_cmd.c - `mailpump queue [--json]` and
 *  `mailpump dead list|redrive [--reason TEXT] [--limit N] ...`.
 * DESCRIPTION
 *  queue prints the depth of the outbound, delay and dead queues, the
 *  workers' status records (messages and bytes in flight, SMTP
 *  connections, oldest message held) and the busiest destinations with
 *  their last error; --json prints ctl_queue_summary()'s object.
 *
 *  dead list browses the dead-letter queue without taking anything from
 *  it; dead redrive moves the matching dead letters back to the outbound
 *  queue (docs/operations.md, "Dead letters: list and re-drive").
 * DIAGNOSTICS
 *  Exit 2 for usage errors, 1 when the broker or Redis failed or a
 *  redrive publish failed, else 0.
 */
#include "cli/queue_cmd.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "control/ctl.h"
#include "control/queue.h"

void queue_cmd_usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump [--config FILE] queue [--json]\n"
            "\n"
            "The queues' depths (outbound, each delay level, dead), each worker's\n"
            "messages in flight, and the destinations with legs waiting, parked or\n"
            "deferred in the last 15 minutes, with their last error.\n"
            "\n"
            "Options:\n"
            "      --json   print the summary as one JSON object\n"
            "  -h, --help   this text\n"
            "\n"
            "Depths come from the broker ([amqp]); workers and destinations from the\n"
            "workers' status records in Redis ([redis]), written every 2 s.\n");
}

void dead_cmd_usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump [--config FILE] dead list [--reason TEXT] [--limit N] [--json]\n"
            "       mailpump [--config FILE] dead redrive [--reason TEXT] [--limit N] [--dry-run]\n"
            "\n"
            "list: show the dead letters (id, reason, size, when, tenant, recipients)\n"
            "without taking them: each is read and given back, in its place, marked\n"
            "redelivered.\n"
            "redrive: republish the matching dead letters to the outbound queue (with\n"
            "publisher confirms) and remove each dead copy once its republish is\n"
            "confirmed; the others stay.\n"
            "\n"
            "Options:\n"
            "  -r, --reason TEXT  only dead letters whose reason contains TEXT (case-sensitive)\n"
            "  -n, --limit N      at most N (default and maximum 100000)\n"
            "      --json         print the result as JSON (list; redrive always does)\n"
            "      --dry-run      redrive: only say what would be moved\n"
            "  -h, --help         this text\n");
}

static json_int_t jint(json_t *o, const char *key)
{
    return json_integer_value(json_object_get(o, key));
}

static const char *jstr_or(json_t *o, const char *key, const char *dflt)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : dflt;
}

/* "-" for null, else the integer. */
static void fmt_num(char *out, size_t n, json_t *v)
{
    if (json_is_integer(v))
        snprintf(out, n, "%lld", (long long)json_integer_value(v));
    else
        snprintf(out, n, "-");
}

static void print_summary(json_t *s)
{
    json_t *qs = json_object_get(s, "queues"), *v;
    size_t i;
    printf("%-40s %-8s %8s %10s %9s %10s\n", "QUEUE", "KIND", "DELAY_S", "MESSAGES", "CONSUMERS", "HEAD_AGE_S");
    json_array_foreach(qs, i, v) {
        char d[24], m[24], c[24], h[24];
        fmt_num(d, sizeof(d), json_object_get(v, "delay_s"));
        fmt_num(m, sizeof(m), json_object_get(v, "messages"));
        fmt_num(c, sizeof(c), json_object_get(v, "consumers"));
        fmt_num(h, sizeof(h), json_object_get(v, "head_age_s")); /* "-" without the management API */
        printf("%-40s %-8s %8s %10s %9s %10s\n", jstr_or(v, "name", ""), jstr_or(v, "kind", ""), d, m, c, h);
    }
    const char *merr = jstr_or(s, "management_error", NULL);
    if (merr != NULL)
        printf("head ages unknown: %s\n", merr);
    printf("\n");
    const char *werr = jstr_or(s, "workers_error", NULL);
    if (werr != NULL)
        printf("workers: unknown (%s)\n", werr);
    json_t *ws = json_object_get(s, "workers");
    if (werr == NULL && json_array_size(ws) == 0)
        printf("workers: none reporting\n");
    if (json_array_size(ws) > 0) {
        printf("%-30s %8s %6s %8s %14s %6s %10s %8s\n", "HOST", "PID", "WORKER", "INFLIGHT", "INFLIGHT_BYTES",
               "SMTP", "OLDEST_S", "UPDATED");
        json_array_foreach(ws, i, v) {
            char o[24];
            fmt_num(o, sizeof(o), json_object_get(v, "oldest_inflight_s"));
            printf("%-30s %8lld %6lld %8lld %14lld %6lld %10s %7llds\n", jstr_or(v, "host", ""),
                   (long long)jint(v, "pid"), (long long)jint(v, "worker"), (long long)jint(v, "inflight"),
                   (long long)jint(v, "inflight_bytes"), (long long)jint(v, "smtp_connections"), o,
                   (long long)jint(v, "updated_s_ago"));
        }
    }
    json_t *ds = json_object_get(s, "destinations");
    if (json_array_size(ds) > 0) {
        printf("\n%-32s %8s %7s %9s  %s\n", "DESTINATION", "WAITING", "PARKED", "DEFERRED", "LAST ERROR");
        json_array_foreach(ds, i, v) {
            char age[32] = "";
            if (json_is_integer(json_object_get(v, "last_error_age_s")))
                snprintf(age, sizeof(age), " (%llds ago)", (long long)jint(v, "last_error_age_s"));
            printf("%-32s %8lld %7lld %9lld  %s%s\n", jstr_or(v, "destination", ""), (long long)jint(v, "waiting"),
                   (long long)jint(v, "parked"), (long long)jint(v, "deferred_recent"),
                   jstr_or(v, "last_error", "-"), age);
        }
    }
    char o[24];
    fmt_num(o, sizeof(o), json_object_get(s, "oldest_age_s"));
    printf("\noldest message: %s s (%s)\n", o, jstr_or(s, "oldest_age_covers", ""));
}

static void print_json(json_t *o)
{
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
    if (s != NULL)
        printf("%s\n", s);
    free(s);
}

int queue_cmd_main(const mp_config_t *cfg, int argc, char **argv)
{
    static const struct option opts[] = {
        { "json", no_argument, NULL, 'j' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int as_json = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'j': as_json = 1; break;
        case 'h': queue_cmd_usage(stdout); return 0;
        default: queue_cmd_usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        queue_cmd_usage(stderr);
        return 2;
    }
    ctl_t *ctl = ctl_new(cfg);
    char err[512] = "";
    int status = 0;
    json_t *s = ctl_queue_summary(ctl, &status, err, sizeof(err));
    ctl_free(ctl);
    if (s == NULL) {
        fprintf(stderr, "mailpump queue: %s\n", err);
        return status == CTL_EINVAL ? 2 : 1;
    }
    if (as_json)
        print_json(s);
    else
        print_summary(s);
    json_decref(s);
    return 0;
}

static void print_dead(json_t *l)
{
    json_t *ms = json_object_get(l, "messages"), *v;
    size_t i;
    printf("%-38s %-24s %8s %-10s %5s  %s\n", "ID", "DEAD_AT", "SIZE", "TENANT", "RCPTS", "REASON");
    json_array_foreach(ms, i, v) {
        char r[24];
        fmt_num(r, sizeof(r), json_object_get(v, "recipients"));
        printf("%-38s %-24s %8lld %-10s %5s  %s\n", jstr_or(v, "id", "-"), jstr_or(v, "dead_at", "-"),
               (long long)jint(v, "size"), jstr_or(v, "tenant", "-"), r, jstr_or(v, "reason", "-"));
    }
    printf("\n%zu shown of %lld in the dead queue\n", json_array_size(ms), (long long)jint(l, "total"));
}

int dead_cmd_main(const mp_config_t *cfg, int argc, char **argv)
{
    static const struct option opts[] = {
        { "reason", required_argument, NULL, 'r' },
        { "limit", required_argument, NULL, 'n' },
        { "json", no_argument, NULL, 'j' },
        { "dry-run", no_argument, NULL, 'd' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        dead_cmd_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    int list = strcmp(sub, "list") == 0, redrive = strcmp(sub, "redrive") == 0;
    if (!list && !redrive) {
        fprintf(stderr, "mailpump dead: unknown subcommand \"%s\"\n", sub);
        dead_cmd_usage(stderr);
        return 2;
    }
    const char *reason = NULL;
    size_t limit = 0;
    int as_json = 0, dry_run = 0, c;
    optind = 1;
    while ((c = getopt_long(argc - 1, argv + 1, "r:n:h", opts, NULL)) != -1) {
        switch (c) {
        case 'r': reason = optarg; break;
        case 'n': {
            char *end;
            unsigned long long n = strtoull(optarg, &end, 10);
            if (*optarg == '\0' || *end != '\0' || n == 0 || n > CTL_DEAD_MAX) {
                fprintf(stderr, "mailpump dead: --limit expects 1 to %d\n", CTL_DEAD_MAX);
                return 2;
            }
            limit = (size_t)n;
            break;
        }
        case 'j': as_json = 1; break;
        case 'd': dry_run = 1; break;
        case 'h': dead_cmd_usage(stdout); return 0;
        default: dead_cmd_usage(stderr); return 2;
        }
    }
    if (optind < argc - 1 || (list && dry_run)) {
        dead_cmd_usage(stderr);
        return 2;
    }
    ctl_t *ctl = ctl_new(cfg);
    char err[512] = "";
    int status = 0;
    json_t *r = list ? ctl_dead_list(ctl, reason, limit, &status, err, sizeof(err))
                     : ctl_dead_redrive(ctl, reason, limit, dry_run, &status, err, sizeof(err));
    ctl_free(ctl);
    if (r == NULL) {
        fprintf(stderr, "mailpump dead %s: %s\n", sub, err);
        return status == CTL_EINVAL ? 2 : 1;
    }
    int rc = 0;
    if (list && !as_json) {
        print_dead(r);
    } else {
        print_json(r);
    }
    if (redrive && jint(r, "failed") > 0) {
        fprintf(stderr, "mailpump dead redrive: %s\n", jstr_or(r, "error", "a republish failed"));
        rc = 1;
    }
    json_decref(r);
    return rc;
}

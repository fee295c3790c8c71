/*
 * SUMMARY
 *  mailpump - command-line client: enqueue mail, watch events.
 * DESCRIPTION
 *  Broker settings come from the daemon's configuration file (--config),
 *  the same MAILPUMP_AMQP_* environment variables, or flags, in that
 *  order of increasing precedence.
 * DIAGNOSTICS
 *  Exit 0 on success, 1 on a runtime failure, 2 on bad usage or input
 *  (trace: 3 when nothing is recorded for the id).
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/admin_cmd.h"
#include "cli/client.h"
#include "core/buf.h"
#include "cli/dns_cmd.h"
#include "cli/queue_cmd.h"
#include "cli/stress_cmd.h"
#include "cli/suppress_cmd.h"
#include "cli/trace_cmd.h"
#include "core/config.h"
#include "core/message.h"
#include "core/util.h"
#include "queue/msgjson.h"

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump [GLOBAL OPTIONS] COMMAND [OPTIONS]\n"
            "\n"
            "Commands:\n"
            "  enqueue   publish a message to the outbound queue and print its id\n"
            "  events    print delivery events (one JSON object per line)\n"
            "  dns       resolve MX as the engine would, or prewarm the Redis cache: mailpump dns --help\n"
            "  stress    publish N messages, follow them to their final events, report rates\n"
            "            and latencies: mailpump stress --help\n"
            "  trace     what happened to a message, where it is now: mailpump trace --help\n"
            "  admin     suspend, resume, bounce or slow deliveries by selector, list the actions\n"
            "            in force: mailpump admin --help\n"
            "  suppress  the suppression lists (add, remove, list, get, import, export): mailpump suppress --help\n"
            "  queue     queue depths, workers' messages in flight, busiest destinations: mailpump queue --help\n"
            "  dead      list or re-drive dead letters: mailpump dead --help\n"
            "  help      show help for a command: mailpump help enqueue\n"
            "  version   print the version (also: mailpump --version)\n"
            "\n"
            "Global options (before the command):\n"
            "  -c, --config FILE      read [amqp] settings from the daemon's config file\n"
            "      --amqp HOST:PORT   broker address (default 127.0.0.1:5672)\n"
            "      --user USER        broker user (default guest)\n"
            "      --password PASS    broker password (default guest)\n"
            "      --vhost VHOST      broker virtual host (default /)\n"
            "  -h, --help             this text\n"
            "  -V, --version          print the version and exit\n"
            "\n"
            "Exit status: 0 success, 1 runtime failure (broker or Redis unreachable or\n"
            "failing; dns resolve: a lookup failed; stress: a message missing or, without\n"
            "--allow-failures, failed; admin resume: nothing in force; suppress get: not\n"
            "listed), 2 bad usage, input or configuration, 3 trace: nothing is recorded\n"
            "for the id. Each command's help has the details.\n"
            "\n"
            "The environment variables MAILPUMP_AMQP_HOST, _PORT, _USER, _PASSWORD,\n"
            "_VHOST, _QUEUE and _EVENTS_EXCHANGE are honoured as by mailpumpd.\n");
}

static void usage_enqueue(FILE *f)
{
    fprintf(f,
            "Usage: mailpump enqueue --from ADDR --to ADDR [--to ADDR ...] [OPTIONS]\n"
            "       mailpump enqueue < message.json\n"
            "\n"
            "Publishes one message to the outbound queue, waits for the broker's\n"
            "confirm, and prints the message id. Without --from/--to the JSON message\n"
            "is read from standard input (format: docs/message-format.md).\n"
            "\n"
            "  --from ADDR          sender, \"addr@domain\" or \"Name <addr@domain>\"\n"
            "  --to ADDR            recipient (repeatable)\n"
            "  --cc ADDR            copy recipient (repeatable)\n"
            "  --bcc ADDR           blind copy recipient (repeatable)\n"
            "  --subject TEXT       subject (UTF-8)\n"
            "  --text TEXT          plain-text body\n"
            "  --html HTML          HTML body\n"
            "  --header 'N: V'      extra header (repeatable)\n"
            "  --id ID              message id (default: a new UUID)\n"
            "  --trace-id ID        trace id carried into events and logs\n"
            "  --tenant NAME        who the message is sent for (events, logs, metrics, pool choice)\n"
            "  --campaign NAME      its campaign (events, logs)\n"
            "  --pool NAME          the egress pool to send it from\n"
            "  --priority N         AMQP priority 0-10 (default 0)\n"
            "  --no-validate        publish stdin as is, even if the daemon would refuse it\n"
            "  --timeout MS         wait this long for the confirm (default 10000)\n");
}

static void usage_events(FILE *f)
{
    fprintf(f,
            "Usage: mailpump events [--key PATTERN] [--count N] [--timeout SEC]\n"
            "\n"
            "Subscribes to the events exchange and prints each event as one JSON line.\n"
            "Prints \"subscribed\" on standard error once events are being received.\n"
            "\n"
            "  --key PATTERN   routing-key pattern: an event name (delivered, deferred,\n"
            "                  bounced, suppressed, dead, appended, append_failed),\n"
            "                  or # for all (default #)\n"
            "  --count N       exit 0 after N events\n"
            "  --timeout SEC   exit 1 if no event arrives for SEC seconds (default: wait)\n");
}

/* The version string mailpumpd -V prints: CMake's project version. */
static void print_version(void)
{
    printf("mailpump %s\n", MAILPUMP_VERSION);
}

/* `mailpump help CMD`: every command, its own usage */
static const struct {
    const char *name;
    void (*usage)(FILE *f);
} helps[] = {
    { "enqueue", usage_enqueue },      { "events", usage_events },   { "dns", dns_cmd_usage },
    { "stress", stress_cmd_usage },    { "trace", trace_cmd_usage }, { "queue", queue_cmd_usage },
    { "dead", dead_cmd_usage },        { "admin", admin_cmd_usage }, { "suppress", suppress_cmd_usage },
    { "help", usage },
};

static int split_hostport(const char *s, mp_config_t *cfg)
{
    const char *colon = strrchr(s, ':');
    if (colon == NULL) {
        free(cfg->amqp_host);
        cfg->amqp_host = xstrdup(s);
        return 0;
    }
    char *end;
    unsigned long port = strtoul(colon + 1, &end, 10);
    if (*end || port == 0 || port > 65535)
        return -1;
    free(cfg->amqp_host);
    cfg->amqp_host = xstrndup(s, (size_t)(colon - s));
    cfg->amqp_port = (unsigned)port;
    return 0;
}

static mp_client_t *connect_from(const mp_config_t *cfg)
{
    mp_client_opts_t o = { cfg->amqp_host, cfg->amqp_port, cfg->amqp_user, cfg->amqp_password,
                           cfg->amqp_vhost, cfg->amqp_queue, cfg->amqp_events_exchange };
    char err[512];
    mp_client_t *c = mp_client_connect(&o, err, sizeof(err));
    if (c == NULL)
        fprintf(stderr, "mailpump: %s\n", err);
    return c;
}

static void add_addr(json_t *obj, const char *key, const char *v)
{
    json_t *arr = json_object_get(obj, key);
    if (arr == NULL) {
        arr = json_array();
        json_object_set_new(obj, key, arr);
    }
    json_array_append_new(arr, json_string(v));
}

static char *read_stdin(size_t *len)
{
    buf_t b = BUF_INIT;
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof(tmp), stdin)) > 0)
        buf_append(&b, tmp, n);
    return buf_steal(&b, len);
}

static int cmd_enqueue(mp_config_t *cfg, int argc, char **argv)
{
    static const struct option opts[] = {
        { "from", required_argument, NULL, 'f' }, { "to", required_argument, NULL, 't' },
        { "cc", required_argument, NULL, 'C' },   { "bcc", required_argument, NULL, 'B' },
        { "subject", required_argument, NULL, 's' }, { "text", required_argument, NULL, 'x' },
        { "html", required_argument, NULL, 'H' }, { "header", required_argument, NULL, 'e' },
        { "id", required_argument, NULL, 'i' },   { "trace-id", required_argument, NULL, 'r' },
        { "priority", required_argument, NULL, 'p' }, { "no-validate", no_argument, NULL, 'n' },
        { "timeout", required_argument, NULL, 'T' }, { "help", no_argument, NULL, 'h' },
        { "tenant", required_argument, NULL, 'N' }, { "campaign", required_argument, NULL, 'G' },
        { "pool", required_argument, NULL, 'L' },
        { NULL, 0, NULL, 0 },
    };
    json_t *m = json_object();
    json_t *headers = NULL;
    int priority = -1, validate = 1, have_fields = 0, c;
    unsigned timeout_ms = 10000;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'f': json_object_set_new(m, "from", json_string(optarg)); have_fields = 1; break;
        case 't': add_addr(m, "to", optarg); have_fields = 1; break;
        case 'C': add_addr(m, "cc", optarg); have_fields = 1; break;
        case 'B': add_addr(m, "bcc", optarg); have_fields = 1; break;
        case 's': json_object_set_new(m, "subject", json_string(optarg)); have_fields = 1; break;
        case 'x': json_object_set_new(m, "text", json_string(optarg)); have_fields = 1; break;
        case 'H': json_object_set_new(m, "html", json_string(optarg)); have_fields = 1; break;
        case 'e': {
            const char *colon = strchr(optarg, ':');
            if (colon == NULL) {
                fprintf(stderr, "mailpump enqueue: --header expects 'Name: value'\n");
                json_decref(m);
                return 2;
            }
            if (headers == NULL) {
                headers = json_object();
                json_object_set_new(m, "headers", headers);
            }
            char *name = xstrndup(optarg, (size_t)(colon - optarg));
            const char *v = colon + 1;
            while (*v == ' ')
                v++;
            json_object_set_new(headers, name, json_string(v));
            free(name);
            have_fields = 1;
            break;
        }
        case 'i': json_object_set_new(m, "id", json_string(optarg)); break;
        case 'r': json_object_set_new(m, "trace_id", json_string(optarg)); break;
        case 'N': json_object_set_new(m, "tenant", json_string(optarg)); break;
        case 'G': json_object_set_new(m, "campaign", json_string(optarg)); break;
        case 'L': json_object_set_new(m, "pool", json_string(optarg)); break;
        case 'p': priority = atoi(optarg);
            if (priority < 0 || priority > 10) {
                fprintf(stderr, "mailpump enqueue: --priority must be 0..10\n");
                json_decref(m);
                return 2;
            }
            break;
        case 'n': validate = 0; break;
        case 'T': timeout_ms = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'h': usage_enqueue(stdout); json_decref(m); return 0;
        default: usage_enqueue(stderr); json_decref(m); return 2;
        }
    }
    char *body;
    size_t len;
    if (!have_fields) {
        if (isatty(STDIN_FILENO)) {
            usage_enqueue(stderr);
            json_decref(m);
            return 2;
        }
        body = read_stdin(&len);
        json_error_t je;
        json_t *in = json_loadb(body, len, 0, &je);
        if (in && json_is_object(in)) {
            /* --id, --trace-id, --tenant, ... given on the command line win over the file's */
            const char *k;
            json_t *v;
            json_object_foreach(m, k, v) json_object_set(in, k, v);
            json_decref(m);
            m = in;
            free(body);
            body = NULL;
        } else {
            json_decref(in);
            if (validate) {
                fprintf(stderr, "mailpump enqueue: standard input is not a JSON object: %s\n",
                        je.text);
                free(body);
                json_decref(m);
                return 2;
            }
        }
    } else {
        body = NULL;
    }
    char id[64] = "";
    if (body == NULL) {
        json_t *jid = json_object_get(m, "id");
        if (jid == NULL) {
            util_uuid(id);
            json_object_set_new(m, "id", json_string(id));
        } else if (json_is_string(jid)) {
            snprintf(id, sizeof(id), "%s", json_string_value(jid));
        }
        body = json_dumps(m, JSON_COMPACT);
        len = strlen(body);
    }
    json_decref(m);
    if (validate) {
        message_t *msg = NULL;
        char err[512];
        if (msgjson_parse(body, len, &msg, err, sizeof(err)) != MSGJSON_OK) {
            fprintf(stderr, "mailpump enqueue: invalid message: %s\n", err);
            free(body);
            return 2;
        }
        message_free(msg);
    }
    mp_client_t *cl = connect_from(cfg);
    if (cl == NULL) {
        free(body);
        return 1;
    }
    char err[512];
    int rc = mp_client_enqueue(cl, body, len, priority, id[0] ? id : NULL, timeout_ms, err,
                               sizeof(err));
    mp_client_close(cl);
    free(body);
    if (rc < 0) {
        fprintf(stderr, "mailpump enqueue: %s\n", err);
        return 1;
    }
    printf("%s\n", id[0] ? id : "(no id)");
    return 0;
}

static int cmd_events(mp_config_t *cfg, int argc, char **argv)
{
    static const struct option opts[] = {
        { "key", required_argument, NULL, 'k' },   { "count", required_argument, NULL, 'n' },
        { "timeout", required_argument, NULL, 't' }, { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *pattern = "#";
    long count = -1;
    unsigned timeout_s = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'k': pattern = optarg; break;
        case 'n': count = atol(optarg); break;
        case 't': timeout_s = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'h': usage_events(stdout); return 0;
        default: usage_events(stderr); return 2;
        }
    }
    mp_client_t *cl = connect_from(cfg);
    if (cl == NULL)
        return 1;
    char err[512];
    if (mp_client_subscribe(cl, pattern, err, sizeof(err)) < 0) {
        fprintf(stderr, "mailpump events: %s\n", err);
        mp_client_close(cl);
        return 1;
    }
    fprintf(stderr, "subscribed\n");
    setvbuf(stdout, NULL, _IOLBF, 0);
    long got = 0;
    int rc = 0;
    while (count < 0 || got < count) {
        char *body = NULL;
        int r = mp_client_next_event(cl, timeout_s ? timeout_s * 1000 : 3600 * 1000, &body, NULL,
                                     err, sizeof(err));
        if (r < 0) {
            fprintf(stderr, "mailpump events: %s\n", err);
            rc = 1;
            break;
        }
        if (r == 0) {
            if (timeout_s) {
                fprintf(stderr, "mailpump events: timeout after %u s (%ld events)\n", timeout_s, got);
                rc = 1;
                break;
            }
            continue;
        }
        printf("%s\n", body);
        free(body);
        got++;
    }
    mp_client_close(cl);
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' }, { "amqp", required_argument, NULL, 'a' },
        { "user", required_argument, NULL, 'u' },   { "password", required_argument, NULL, 'P' },
        { "vhost", required_argument, NULL, 'v' },  { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    const char *config_path = NULL, *amqp = NULL, *user = NULL, *pass = NULL, *vhost = NULL;
    int c;
    /* '+': stop at the command name; its options are parsed by the command */
    while ((c = getopt_long(argc, argv, "+c:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_path = optarg; break;
        case 'a': amqp = optarg; break;
        case 'u': user = optarg; break;
        case 'P': pass = optarg; break;
        case 'v': vhost = optarg; break;
        case 'h': usage(stdout); return 0;
        case 'V': print_version(); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind];
    if (strcmp(cmd, "version") == 0) {
        print_version();
        return 0;
    }
    if (strcmp(cmd, "help") == 0) {
        const char *what = optind + 1 < argc ? argv[optind + 1] : NULL;
        if (what == NULL) {
            usage(stdout);
            return 0;
        }
        for (size_t i = 0; i < sizeof(helps) / sizeof(helps[0]); i++) {
            if (strcmp(what, helps[i].name) == 0) {
                helps[i].usage(stdout);
                return 0;
            }
        }
        fprintf(stderr, "mailpump: no help for \"%s\": not a command (try mailpump --help)\n",
                what);
        return 2;
    }
    mp_config_t cfg;
    char err[512];
    config_defaults(&cfg);
    if (config_load(&cfg, config_path, err, sizeof(err)) < 0) {
        fprintf(stderr, "mailpump: %s\n", err);
        config_free(&cfg);
        return 2;
    }
    if (amqp && split_hostport(amqp, &cfg) < 0) {
        fprintf(stderr, "mailpump: --amqp expects HOST:PORT\n");
        config_free(&cfg);
        return 2;
    }
    if (user) { free(cfg.amqp_user); cfg.amqp_user = xstrdup(user); }
    if (pass) { free(cfg.amqp_password); cfg.amqp_password = xstrdup(pass); }
    if (vhost) { free(cfg.amqp_vhost); cfg.amqp_vhost = xstrdup(vhost); }

    int rc;
    int sub_argc = argc - optind;
    char **sub_argv = argv + optind;
    if (strcmp(cmd, "enqueue") == 0) {
        rc = cmd_enqueue(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "events") == 0) {
        rc = cmd_events(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "dns") == 0) {
        rc = dns_cmd_main(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "stress") == 0) {
        rc = stress_cmd_main(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "trace") == 0) {
        rc = trace_cmd_main(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "admin") == 0) {
        rc = admin_cmd_main(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "suppress") == 0) {
        rc = suppress_cmd_main(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "queue") == 0) {
        rc = queue_cmd_main(&cfg, sub_argc, sub_argv);
    } else if (strcmp(cmd, "dead") == 0) {
        rc = dead_cmd_main(&cfg, sub_argc, sub_argv);
    } else {
        fprintf(stderr, "mailpump: unknown command \"%s\" (try mailpump --help)\n", cmd);
        rc = 2;
    }
    config_free(&cfg);
    return rc;
}

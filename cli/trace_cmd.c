/*
 * cli/trace_cmd.c - `mailpump trace ID [--json]` (see trace_cmd.h).
 *
 * The timeline prints one line per history record: its time, the
 * attempt, the recipient (or "-" for the attempt and message-level
 * records), the outcome, the reply, the MX and the egress source; then
 * one line saying where the message is now. --json prints ctl_trace()'s
 * object as it is (control/trace.h documents it).
 */
#include "cli/trace_cmd.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "control/ctl.h"
#include "control/trace.h"
#include "core/buf.h"

void trace_cmd_usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump [--config FILE] trace [--json] MESSAGE_ID\n"
            "\n"
            "What happened to a message: every attempt and what it did for each\n"
            "recipient (outcome, reply, MX, egress source), and where the message is\n"
            "now: done, queued for a retry (level, queue, due time), dead-lettered\n"
            "(reason), in flight (an attempt running now) or unknown.\n"
            "Read from Redis ([redis] host/port): the history mailpumpd writes\n"
            "([trace] enabled, kept [trace] ttl) and the delivery ledger.\n"
            "\n"
            "Options:\n"
            "      --json    print the result as one JSON object\n"
            "  -h, --help    this text\n"
            "\n"
            "Exit status: 0 found, 1 Redis could not answer, 2 bad usage,\n"
            "3 nothing recorded (an unknown id, or its history expired).\n");
}

static const char *s_or(const json_t *o, const char *key, const char *dflt)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s != NULL && s[0] ? s : dflt;
}

static void print_attempt(const json_t *rec)
{
    const json_t *retry = json_object_get(rec, "retry");
    const json_t *dead = json_object_get(rec, "dead");
    printf("%-24s #%-3lld %-32s %-10s", s_or(rec, "ts", "-"),
           (long long)json_integer_value(json_object_get(rec, "attempt")), "-", "attempt");
    printf(" started, %lld recipient(s)", (long long)json_integer_value(json_object_get(rec, "recipients")));
    if (retry != NULL)
        printf("; retry: level %lld, queue %s, in %lld ms, due %s",
               (long long)json_integer_value(json_object_get(retry, "level")), s_or(retry, "queue", "-"),
               (long long)json_integer_value(json_object_get(retry, "delay_ms")), s_or(retry, "due", "-"));
    if (json_object_get(rec, "omitted") != NULL)
        printf("; %lld event(s) not kept ([trace] max_records)",
               (long long)json_integer_value(json_object_get(rec, "omitted")));
    if (json_object_get(rec, "give_up") != NULL)
        printf("; not retried: %s", s_or(rec, "give_up", "-"));
    if (dead != NULL)
        printf("; dead-lettered to %s: %s", s_or(dead, "queue", "-"), s_or(dead, "reason", "-"));
    putchar('\n');
}

static void print_event(const json_t *rec)
{
    const char *event = s_or(rec, "event", "?");
    printf("%-24s #%-3lld %-32s %-10s", s_or(rec, "ts", "-"),
           (long long)json_integer_value(json_object_get(rec, "attempt")), s_or(rec, "recipient", "-"), event);
    const json_t *smtp = json_object_get(rec, "smtp");
    if (smtp != NULL)
        printf(" %lld %s%s%s", (long long)json_integer_value(json_object_get(smtp, "code")),
               s_or(smtp, "enhanced", ""), json_object_get(smtp, "enhanced") ? " " : "", s_or(smtp, "text", ""));
    const char *error = s_or(rec, "error", NULL);
    if (error != NULL)
        printf(" (%s)", error);
    if (json_object_get(rec, "reason") != NULL)
        printf(" reason=%s", s_or(rec, "reason", "-"));
    if (json_object_get(rec, "mx_host") != NULL)
        printf(" mx=%s[%s]", s_or(rec, "mx_host", "-"), s_or(rec, "mx_addr", "-"));
    if (json_object_get(rec, "source") != NULL)
        printf(" source=%s", s_or(rec, "source", "-"));
    const json_t *imap = json_object_get(rec, "imap");
    if (imap != NULL)
        printf(" imap=%s uid=%lld", s_or(imap, "mailbox", "-"),
               (long long)json_integer_value(json_object_get(imap, "uid")));
    putchar('\n');
}

static void print_where(const json_t *t)
{
    const char *state = s_or(t, "state", "unknown");
    const json_t *w = json_object_get(t, "where");
    printf("state: %s", state);
    if (strcmp(state, "done") == 0) {
        printf(" (every recipient final after %lld attempt(s), last at %s)",
               (long long)json_integer_value(json_object_get(w, "attempts")), s_or(w, "finished", "-"));
    } else if (strcmp(state, "queued") == 0) {
        printf(" (retry level %lld, queue %s, due %s%s, as attempt %lld; pending:",
               (long long)json_integer_value(json_object_get(w, "level")), s_or(w, "queue", "-"),
               s_or(w, "due", "-"), json_is_true(json_object_get(w, "overdue")) ? ", overdue" : "",
               (long long)json_integer_value(json_object_get(w, "attempt")));
        size_t i;
        json_t *p;
        json_array_foreach(json_object_get(w, "pending"), i, p)
            printf(" %s", json_string_value(p));
        printf(")");
    } else if (strcmp(state, "dead") == 0) {
        printf(" (dead-lettered to %s at attempt %lld: %s)", s_or(w, "queue", "-"),
               (long long)json_integer_value(json_object_get(w, "attempt")), s_or(w, "reason", "-"));
    } else if (strcmp(state, "in_flight") == 0) {
        printf(" (an attempt is running:");
        size_t i;
        json_t *r;
        json_array_foreach(json_object_get(w, "recipients"), i, r)
            printf(" %s=%s", s_or(r, "recipient", "-"), s_or(r, "ledger", "-"));
        printf(")");
    }
    putchar('\n');
}

static void print_trace(const json_t *t)
{
    printf("message %s", s_or(t, "id", "-"));
    if (json_object_get(t, "sender") != NULL)
        printf(" from %s", s_or(t, "sender", "-"));
    if (json_object_get(t, "tenant") != NULL)
        printf(" tenant=%s", s_or(t, "tenant", "-"));
    if (json_object_get(t, "campaign") != NULL)
        printf(" campaign=%s", s_or(t, "campaign", "-"));
    if (json_object_get(t, "expires_in_ms") != NULL)
        printf(" (history kept %lld s more)",
               (long long)json_integer_value(json_object_get(t, "expires_in_ms")) / 1000);
    putchar('\n');
    size_t i;
    json_t *rec;
    json_array_foreach(json_object_get(t, "history"), i, rec) {
        if (strcmp(s_or(rec, "event", ""), "attempt") == 0)
            print_attempt(rec);
        else
            print_event(rec);
    }
    print_where(t);
}

int trace_cmd_main(const mp_config_t *cfg, int argc, char **argv)
{
    static const struct option opts[] = {
        { "json", no_argument, NULL, 'j' }, { "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 },
    };
    int json = 0, opt;
    optind = 0; /* glibc: reinitialise */
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'j': json = 1; break;
        case 'h': trace_cmd_usage(stdout); return 0;
        default: trace_cmd_usage(stderr); return 2;
        }
    }
    if (argc - optind != 1 || argv[optind][0] == '\0') {
        trace_cmd_usage(stderr);
        return 2;
    }
    ctl_t *c = ctl_new(cfg);
    char err[512] = "";
    int status = CTL_OK;
    json_t *t = ctl_trace(c, argv[optind], &status, err, sizeof(err));
    ctl_free(c);
    if (t == NULL) {
        fprintf(stderr, "mailpump trace: %s\n", err);
        return status == CTL_ENOTFOUND ? TRACE_EXIT_NOT_FOUND : status == CTL_EINVAL ? 2 : 1;
    }
    if (json) {
        char *s = json_dumps(t, JSON_COMPACT);
        puts(s);
        free(s);
    } else {
        print_trace(t);
    }
    json_decref(t);
    return 0;
}

/*
 * SUMMARY
 *  tests/unit/test_metrics_ops.c - metrics/ops.c: the histograms, the
 *  recipients by outcome and reason, build_info, the process figures,
 *  and docs/operations.md's list of metrics against metrics_render().
 * DESCRIPTION
 *  Observations land in exact buckets (an upper bound is inclusive) and
 *  the /metrics lines are compared whole. /proc parsing is checked on
 *  fixed texts (a comm with spaces and parentheses) and the live figures
 *  against what the test changes (descriptors it opens, its own limit).
 *  The table in docs/operations.md ("Metrics") must name every family
 *  /metrics serves, with its type, and nothing it does not serve.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/buf.h"
#include "metrics/metrics.h"
#include "metrics/ops.h"

static char *render(void)
{
    buf_t b = BUF_INIT;
    metrics_render(&b);
    buf_putc(&b, '\0');
    size_t n;
    return buf_steal(&b, &n);
}

/* Whether the /metrics text has this exact line. */
static int has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p += n)
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return 1;
    return 0;
}

#define ASSERT_LINE(text, line)                                                   \
    do {                                                                          \
        if (!has_line((text), (line)))                                            \
            fail_msg("missing line: %s", (line));                                 \
    } while (0)

/* The value of the series whose line starts with prefix (name{labels}). */
static double series_value(const char *text, const char *prefix)
{
    size_t n = strlen(prefix);
    for (const char *p = text; (p = strstr(p, prefix)) != NULL; p += n)
        if ((p == text || p[-1] == '\n') && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    fail_msg("no series %s", prefix);
    return -1;
}

static void test_command_histogram(void **state)
{
    (void)state;
    metrics_smtp_command(MET_CMD_RCPT, 0);
    metrics_smtp_command(MET_CMD_RCPT, 1000);       /* on the bound: in it */
    metrics_smtp_command(MET_CMD_RCPT, 1001);       /* just past: the next */
    metrics_smtp_command(MET_CMD_RCPT, 700000000);  /* past the last: +Inf only */
    metrics_smtp_command(MET_CMD_DOT, 250000);
    metrics_smtp_command(MET_CMD_LAST, 1);          /* out of range: ignored */
    char *t = render();
    ASSERT_LINE(t, "# TYPE mailpump_smtp_command_seconds histogram");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_bucket{command=\"rcpt\",le=\"0.001\"} 2");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_bucket{command=\"rcpt\",le=\"0.0025\"} 3");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_bucket{command=\"rcpt\",le=\"600\"} 3");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_bucket{command=\"rcpt\",le=\"+Inf\"} 4");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_sum{command=\"rcpt\"} 700.002");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_count{command=\"rcpt\"} 4");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_bucket{command=\"dot\",le=\"0.1\"} 0");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_bucket{command=\"dot\",le=\"0.25\"} 1");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_count{command=\"dot\"} 1");
    ASSERT_LINE(t, "mailpump_smtp_command_seconds_count{command=\"mail\"} 0");
    static const char *const cmds[] = { "connect", "greeting", "ehlo", "starttls", "tls",
                                        "mail", "rcpt", "data", "dot", "quit" };
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        char line[128];
        snprintf(line, sizeof(line), "mailpump_smtp_command_seconds_count{command=\"%s\"}", cmds[i]);
        series_value(t, line);
    }
    free(t);
}

static void test_latency_start(void **state)
{
    (void)state;
    /* the AMQP timestamp, whole seconds */
    assert_int_equal(metrics_latency_us(1700000005500ull, 1700000000ull, 1700000003000ull), 5500000ull);
    /* the first consume within the timestamp's second: the finer clock */
    assert_int_equal(metrics_latency_us(1700000005500ull, 1700000000ull, 1700000000400ull), 5100000ull);
    /* no timestamp: the first consume */
    assert_int_equal(metrics_latency_us(1700000005500ull, 0, 1700000005000ull), 500000ull);
    /* a start in the future (another host's clock), or none */
    assert_int_equal(metrics_latency_us(1700000005500ull, 1700000009ull, 0), 0);
    assert_int_equal(metrics_latency_us(1700000005500ull, 0, 0), 0);
}

static void test_recipient_events(void **state)
{
    (void)state;
    metrics_reason_name(0, "delivered");
    metrics_reason_name(1, "no_such_user");
    metrics_reason_name(3, "greylisted");
    char *t = render();
    ASSERT_LINE(t, "# TYPE mailpump_recipients_total counter");
    ASSERT_LINE(t, "mailpump_recipients_total{outcome=\"delivered\",reason=\"delivered\"} 0"); /* always there */
    assert_null(strstr(t, "mailpump_recipients_total{outcome=\"bounced\""));                  /* once seen */
    free(t);

    metrics_recipient_event(MET_EV_DELIVERED, 0, 5000000, 2000000);
    metrics_recipient_event(MET_EV_DELIVERED, 0, 40000, 10000);
    metrics_recipient_event(MET_EV_BOUNCED, 1, 100000, 0);
    metrics_recipient_event(MET_EV_DEFERRED, 3, 999000000, 0); /* not final: no latency */
    metrics_recipient_event(MET_EV_SUPPRESSED, 20, 10000, 0);  /* a reason never named */
    metrics_recipient_event(MET_EV_DEAD, 99, 3600000000ull, 0);
    metrics_recipient_event(MET_EV_LAST, 0, 1, 1);             /* ignored */

    assert_int_equal(metrics_recipients(MET_EV_DELIVERED, 0), 2);
    assert_int_equal(metrics_recipients(MET_EV_BOUNCED, 1), 1);
    assert_int_equal(metrics_recipients(MET_EV_BOUNCED, 0), 0);
    assert_int_equal(metrics_recipients(MET_EV_DEFERRED, 3), 1);
    assert_int_equal(metrics_recipients(MET_EV_SUPPRESSED, 20), 1);
    assert_int_equal(metrics_recipients(MET_EV_SUPPRESSED, 25), 1); /* the same unknown series */

    t = render();
    ASSERT_LINE(t, "mailpump_recipients_total{outcome=\"delivered\",reason=\"delivered\"} 2");
    ASSERT_LINE(t, "mailpump_recipients_total{outcome=\"bounced\",reason=\"no_such_user\"} 1");
    ASSERT_LINE(t, "mailpump_recipients_total{outcome=\"deferred\",reason=\"greylisted\"} 1");
    ASSERT_LINE(t, "mailpump_recipients_total{outcome=\"suppressed\",reason=\"unknown\"} 1");
    ASSERT_LINE(t, "mailpump_recipients_total{outcome=\"dead\",reason=\"unknown\"} 1");
    assert_null(strstr(t, "mailpump_recipients_total{outcome=\"deferred\",reason=\"delivered\"}"));

    ASSERT_LINE(t, "# TYPE mailpump_delivery_latency_seconds histogram");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"delivered\",le=\"0.025\"} 0");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"delivered\",le=\"0.05\"} 1");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"delivered\",le=\"2.5\"} 1");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"delivered\",le=\"5\"} 2");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_sum{outcome=\"delivered\"} 5.04");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_count{outcome=\"delivered\"} 2");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"bounced\",le=\"0.1\"} 1");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_count{outcome=\"bounced\"} 1");
    /* suppressed and dead; the deferred one nowhere */
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"other\",le=\"0.01\"} 1");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"other\",le=\"1800\"} 1");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"other\",le=\"3600\"} 2");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_count{outcome=\"other\"} 2");
    ASSERT_LINE(t, "mailpump_delivery_latency_seconds_bucket{outcome=\"other\",le=\"172800\"} 2");

    /* age: delivered recipients only */
    ASSERT_LINE(t, "# TYPE mailpump_message_age_seconds histogram");
    ASSERT_LINE(t, "mailpump_message_age_seconds_bucket{le=\"0.01\"} 1");
    ASSERT_LINE(t, "mailpump_message_age_seconds_bucket{le=\"1\"} 1");
    ASSERT_LINE(t, "mailpump_message_age_seconds_bucket{le=\"2.5\"} 2");
    ASSERT_LINE(t, "mailpump_message_age_seconds_sum 2.01");
    ASSERT_LINE(t, "mailpump_message_age_seconds_count 2");
    free(t);
}

static void test_build_info(void **state)
{
    (void)state;
    char *t = render();
    ASSERT_LINE(t, "# TYPE mailpump_build_info gauge");
    char want[128];
    snprintf(want, sizeof(want), "mailpump_build_info{version=\"%s\"", MP_TEST_VERSION);
    const char *p = strstr(t, want);
    assert_non_null(p);
    const char *eol = strchr(p, '\n');
    assert_non_null(eol);
    assert_memory_equal(eol - 3, "} 1", 3);
    free(t);
}

static void test_parse_stat(void **state)
{
    (void)state;
    /* utime 250 stime 50 (ticks), starttime 1000, vsize, rss 300 pages */
    static const char stat[] =
        "4242 (mail pump) (x) S 1 4242 4242 0 -1 4194560 1200 0 3 0 250 50 7 8 20 0 5 0 1000 123456789 300 "
        "18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 17 1 0 0 0 0 0\n";
    metrics_proc_stat_t ps;
    assert_int_equal(metrics_proc_parse_stat(stat, 1700000000ull, 100, 4096, &ps), 0);
    assert_true(ps.cpu_seconds == 3.0);
    assert_true(ps.start_time_s == 1700000010.0);
    assert_int_equal(ps.virtual_bytes, 123456789ull);
    assert_int_equal(ps.resident_bytes, 300ull * 4096);
    assert_int_equal(metrics_proc_parse_stat("4242 no parenthesis 1 2 3", 0, 100, 4096, &ps), -1);
    assert_int_equal(metrics_proc_parse_stat("4242 (x) S 1 2 3", 0, 100, 4096, &ps), -1);
    assert_int_equal(metrics_proc_parse_stat(stat, 0, 0, 4096, &ps), -1);
    assert_int_equal(metrics_proc_parse_stat(NULL, 0, 100, 4096, &ps), -1);

    uint64_t bt = 0;
    assert_int_equal(metrics_proc_parse_btime("cpu  1 2 3\nintr 5\nbtime 1765000000\nprocesses 9\n", &bt), 0);
    assert_int_equal(bt, 1765000000ull);
    assert_int_equal(metrics_proc_parse_btime("cpu  1 2 3\nbtimex 5\n", &bt), -1);
}

static void test_process_live(void **state)
{
    (void)state;
    char *t = render();
    double fds0 = series_value(t, "process_open_fds");
    free(t);
    int extra[3];
    for (int i = 0; i < 3; i++)
        extra[i] = dup(2);
    t = render();
    assert_true(series_value(t, "process_open_fds") == fds0 + 3);
    struct rlimit rl;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
    assert_true(series_value(t, "process_max_fds") == (double)rl.rlim_cur);
    double start = series_value(t, "process_start_time_seconds"), now = (double)time(NULL);
    assert_true(start <= now + 1 && start > now - 3600);
    assert_true(series_value(t, "process_resident_memory_bytes") > 0);
    assert_true(series_value(t, "process_virtual_memory_bytes") >= series_value(t, "process_resident_memory_bytes"));
    assert_true(series_value(t, "process_cpu_seconds_total") >= 0);
    ASSERT_LINE(t, "# TYPE process_cpu_seconds_total counter");
    ASSERT_LINE(t, "# TYPE process_open_fds gauge");
    free(t);
    for (int i = 0; i < 3; i++)
        close(extra[i]);
}

/* ---- docs/operations.md against /metrics ---- */

#define MAX_FAMILIES 256
typedef struct {
    char name[128];
    char type[16];
} family_t;

/* The families of the /metrics text: its TYPE lines. */
static size_t served_families(family_t *f)
{
    char *t = render();
    size_t n = 0;
    for (char *l = strtok(t, "\n"); l; l = strtok(NULL, "\n"))
        if (strncmp(l, "# TYPE ", 7) == 0) {
            assert_true(n < MAX_FAMILIES);
            assert_int_equal(sscanf(l + 7, "%127s %15s", f[n].name, f[n].type), 2);
            n++;
        }
    free(t);
    return n;
}

/* The rows of the metrics table: "| `name{labels}` | type | meaning |". */
static size_t documented_families(family_t *f)
{
    FILE *fp = fopen(MP_SOURCE_DIR "/docs/operations.md", "r");
    assert_non_null(fp);
    char line[4096];
    size_t n = 0;
    int in_table = 0;
    while (fgets(line, sizeof(line), fp)) {
        if (strncmp(line, "| metric | type |", 17) == 0) {
            in_table = 1;
            continue;
        }
        if (!in_table || strncmp(line, "|---", 4) == 0)
            continue;
        if (strncmp(line, "| `", 3) != 0) {
            in_table = 0; /* the table ended */
            continue;
        }
        assert_true(n < MAX_FAMILIES);
        const char *name = line + 3;
        size_t len = strcspn(name, "{`");
        assert_true(len > 0 && len < sizeof(f[n].name));
        memcpy(f[n].name, name, len);
        f[n].name[len] = '\0';
        const char *type = strstr(name, "` | ");
        assert_non_null(type);
        type += 4;
        size_t tl = strcspn(type, " |");
        assert_true(tl < sizeof(f[n].type));
        memcpy(f[n].type, type, tl);
        f[n].type[tl] = '\0';
        n++;
    }
    fclose(fp);
    return n;
}

static const family_t *find_family(const family_t *f, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(f[i].name, name) == 0)
            return &f[i];
    return NULL;
}

static void test_docs_list_every_metric(void **state)
{
    (void)state;
    static family_t served[MAX_FAMILIES], documented[MAX_FAMILIES];
    size_t ns = served_families(served), nd = documented_families(documented);
    assert_true(ns > 80);
    int bad = 0;
    for (size_t i = 0; i < ns; i++) {
        const family_t *d = find_family(documented, nd, served[i].name);
        if (d == NULL) {
            print_error("served, not in docs/operations.md: %s (%s)\n", served[i].name, served[i].type);
            bad++;
        } else if (strcmp(d->type, served[i].type) != 0) {
            print_error("%s: served as %s, documented as %s\n", served[i].name, served[i].type, d->type);
            bad++;
        }
    }
    for (size_t i = 0; i < nd; i++) {
        if (find_family(served, ns, documented[i].name) == NULL) {
            print_error("in docs/operations.md, not served: %s\n", documented[i].name);
            bad++;
        }
        if (find_family(documented, i, documented[i].name) != NULL) {
            print_error("documented twice: %s\n", documented[i].name);
            bad++;
        }
    }
    assert_int_equal(bad, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_command_histogram),
        cmocka_unit_test(test_latency_start),
        cmocka_unit_test(test_recipient_events),
        cmocka_unit_test(test_build_info),
        cmocka_unit_test(test_parse_stat),
        cmocka_unit_test(test_process_live),
        cmocka_unit_test(test_docs_list_every_metric),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

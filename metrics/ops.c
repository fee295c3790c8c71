/*
 * SUMMARY
 *  metrics/ops.c - latency, age and SMTP command histograms, recipients
 *  by outcome and reason, build_info and the process_* figures.
 * DESCRIPTION
 *  The histograms are metrics_hist_t (metrics.h), observed with relaxed
 *  atomics; the labelled ones are one metrics_hist_t per label value,
 *  rendered under one HELP and TYPE. Bucket bounds suit internet mail:
 *  a delivery takes from milliseconds (a local relay) to days (retries
 *  until [retry] max_age), an SMTP command from a millisecond to the
 *  RFC 5321 timeouts (minutes).
 *
 *  The process_* families follow the Prometheus client libraries'
 *  conventions: /proc/self/stat for CPU, memory and start time,
 *  /proc/self/fd for the open descriptors, RLIMIT_NOFILE's soft limit
 *  for the maximum. Read at scrape time, never by a worker.
 */
#include "metrics/ops.h"

#include <dirent.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "metrics/metrics.h"

#ifndef MAILPUMP_VERSION
#define MAILPUMP_VERSION "unknown"
#endif

/* ---- histograms ---- */

/* 10 ms .. 2 days */
static const uint64_t latency_bounds_us[] = {
    10000ull,      25000ull,      50000ull,       100000ull,      250000ull,      500000ull,     1000000ull,
    2500000ull,    5000000ull,    10000000ull,    30000000ull,    60000000ull,    120000000ull,  300000000ull,
    600000000ull,  1800000000ull, 3600000000ull,  14400000000ull, 43200000000ull, 172800000000ull,
};
/* 1 ms .. 10 minutes */
static const uint64_t command_bounds_us[] = {
    1000ull,    2500ull,    5000ull,     10000ull,    25000ull,    50000ull,     100000ull,    250000ull,    500000ull,
    1000000ull, 2500000ull, 5000000ull, 10000000ull, 30000000ull, 60000000ull, 120000000ull, 300000000ull, 600000000ull,
};
_Static_assert(sizeof(latency_bounds_us) / sizeof(latency_bounds_us[0]) <= METRICS_HIST_BUCKETS, "latency buckets");
_Static_assert(sizeof(command_bounds_us) / sizeof(command_bounds_us[0]) <= METRICS_HIST_BUCKETS, "command buckets");

#define LATENCY_NAME "mailpump_delivery_latency_seconds"
#define AGE_NAME     "mailpump_message_age_seconds"
#define COMMAND_NAME "mailpump_smtp_command_seconds"

/* the outcome label of the latency: delivered, bounced, other */
enum { LAT_DELIVERED = 0, LAT_BOUNCED, LAT_OTHER, LAT_LAST };
static const char *const latency_labels[LAT_LAST] = { "delivered", "bounced", "other" };
static metrics_hist_t latency[LAT_LAST] = {
    METRICS_HIST_INIT(LATENCY_NAME, "", latency_bounds_us),
    METRICS_HIST_INIT(LATENCY_NAME, "", latency_bounds_us),
    METRICS_HIST_INIT(LATENCY_NAME, "", latency_bounds_us),
};
static metrics_hist_t age = METRICS_HIST_INIT(
    AGE_NAME, "Age of a message (since its first consume) when one of its recipients was delivered.",
    latency_bounds_us);

static const char *const command_labels[MET_CMD_LAST] = {
    [MET_CMD_CONNECT] = "connect", [MET_CMD_GREETING] = "greeting", [MET_CMD_EHLO] = "ehlo",
    [MET_CMD_STARTTLS] = "starttls", [MET_CMD_TLS] = "tls",        [MET_CMD_MAIL] = "mail",
    [MET_CMD_RCPT] = "rcpt",       [MET_CMD_DATA] = "data",         [MET_CMD_DOT] = "dot",
    [MET_CMD_QUIT] = "quit",
};
#define CMD_HIST METRICS_HIST_INIT(COMMAND_NAME, "", command_bounds_us)
static metrics_hist_t commands[MET_CMD_LAST] = { CMD_HIST, CMD_HIST, CMD_HIST, CMD_HIST, CMD_HIST,
                                                 CMD_HIST, CMD_HIST, CMD_HIST, CMD_HIST, CMD_HIST };

/* The series of one labelled histogram (no HELP or TYPE). */
static void hist_series(buf_t *out, const metrics_hist_t *h, const char *label, const char *value)
{
    uint64_t cum = 0;
    for (size_t i = 0; i <= h->nbounds; i++) {
        cum += atomic_load_explicit(&h->counts[i], memory_order_relaxed);
        if (i < h->nbounds)
            buf_printf(out, "%s_bucket{%s=\"%s\",le=\"%g\"} %llu\n", h->name, label, value,
                       (double)h->bounds_us[i] / 1e6, (unsigned long long)cum);
        else
            buf_printf(out, "%s_bucket{%s=\"%s\",le=\"+Inf\"} %llu\n", h->name, label, value,
                       (unsigned long long)cum);
    }
    buf_printf(out, "%s_sum{%s=\"%s\"} %g\n%s_count{%s=\"%s\"} %llu\n", h->name, label, value,
               (double)atomic_load_explicit(&h->sum_us, memory_order_relaxed) / 1e6, h->name, label, value,
               (unsigned long long)cum);
}

void metrics_smtp_command(metrics_smtp_cmd_t cmd, uint64_t us)
{
    if ((unsigned)cmd < MET_CMD_LAST)
        metrics_hist_observe(&commands[cmd], us);
}

uint64_t metrics_latency_us(uint64_t now_ms, uint64_t timestamp_s, uint64_t first_seen_ms)
{
    uint64_t start = timestamp_s ? timestamp_s * 1000 : first_seen_ms;
    if (timestamp_s && first_seen_ms >= start && first_seen_ms < start + 1000)
        start = first_seen_ms;
    return start != 0 && now_ms > start ? (now_ms - start) * 1000 : 0;
}

/* ---- recipients by outcome and reason ---- */

static const char *const event_names[MET_EV_LAST] = {
    [MET_EV_DELIVERED] = "delivered", [MET_EV_BOUNCED] = "bounced", [MET_EV_DEFERRED] = "deferred",
    [MET_EV_SUPPRESSED] = "suppressed", [MET_EV_DEAD] = "dead",
};
static const char *reason_names[METRICS_REASONS_MAX];
/* row METRICS_REASONS_MAX: "unknown" */
static _Atomic uint64_t recipients[MET_EV_LAST][METRICS_REASONS_MAX + 1];

void metrics_reason_name(int reason, const char *name)
{
    if (reason >= 0 && reason < METRICS_REASONS_MAX)
        reason_names[reason] = name;
}

static size_t reason_row(int reason)
{
    return reason >= 0 && reason < METRICS_REASONS_MAX && reason_names[reason] ? (size_t)reason
                                                                               : METRICS_REASONS_MAX;
}

void metrics_recipient_event(metrics_event_t ev, int reason, uint64_t latency_us, uint64_t age_us)
{
    if ((unsigned)ev >= MET_EV_LAST)
        return;
    atomic_fetch_add_explicit(&recipients[ev][reason_row(reason)], 1, memory_order_relaxed);
    if (ev == MET_EV_DEFERRED)
        return;
    metrics_hist_observe(&latency[ev == MET_EV_DELIVERED ? LAT_DELIVERED : ev == MET_EV_BOUNCED ? LAT_BOUNCED
                                                                                              : LAT_OTHER],
                         latency_us);
    if (ev == MET_EV_DELIVERED)
        metrics_hist_observe(&age, age_us);
}

uint64_t metrics_recipients(metrics_event_t ev, int reason)
{
    if ((unsigned)ev >= MET_EV_LAST)
        return 0;
    return atomic_load_explicit(&recipients[ev][reason_row(reason)], memory_order_relaxed);
}

/* The series seen so far, and delivered/delivered always (the family is
 * never empty, so a rate over it is defined from the start). */
static void render_recipients(buf_t *out)
{
    buf_puts(out, "# HELP mailpump_recipients_total Recipient events by outcome (the event name) and reason tag.\n"
                  "# TYPE mailpump_recipients_total counter\n");
    for (int e = 0; e < MET_EV_LAST; e++)
        for (size_t r = 0; r <= METRICS_REASONS_MAX; r++) {
            uint64_t v = atomic_load_explicit(&recipients[e][r], memory_order_relaxed);
            const char *name = r < METRICS_REASONS_MAX ? reason_names[r] : "unknown";
            int always = e == MET_EV_DELIVERED && r == 0 && name != NULL;
            if (name != NULL && (v > 0 || always))
                buf_printf(out, "mailpump_recipients_total{outcome=\"%s\",reason=\"%s\"} %llu\n", event_names[e],
                           name, (unsigned long long)v);
        }
}

/* ---- the process ---- */

int metrics_proc_parse_stat(const char *text, uint64_t btime, long ticks, long page_size,
                            metrics_proc_stat_t *out)
{
    /* "pid (comm) state ppid ...": comm may hold spaces and parentheses,
     * so the fields are counted from the last ')' */
    const char *p = text ? strrchr(text, ')') : NULL;
    if (p == NULL || ticks <= 0 || page_size <= 0)
        return -1;
    p++;
    unsigned long long utime = 0, stime = 0, start = 0, vsize = 0;
    long long rss = 0;
    /* field 3 (state) onwards: utime 14, stime 15, starttime 22, vsize 23, rss 24 */
    int n = sscanf(p, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d %llu %llu %lld",
                   &utime, &stime, &start, &vsize, &rss);
    if (n != 5)
        return -1;
    out->cpu_seconds = (double)(utime + stime) / (double)ticks;
    out->start_time_s = (double)btime + (double)start / (double)ticks;
    out->virtual_bytes = vsize;
    out->resident_bytes = rss > 0 ? (uint64_t)rss * (uint64_t)page_size : 0;
    return 0;
}

int metrics_proc_parse_btime(const char *text, uint64_t *btime)
{
    for (const char *l = text; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
        unsigned long long v;
        if (strncmp(l, "btime ", 6) == 0 && sscanf(l + 6, "%llu", &v) == 1) {
            *btime = v;
            return 0;
        }
    }
    return -1;
}

/* The whole of a small /proc file, NUL-terminated, into buf: 0 or -1. */
static int read_small(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, len - 1, f);
    fclose(f);
    buf[n] = '\0';
    return n > 0 ? 0 : -1;
}

static long count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    long n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    closedir(d);
    return n - 1; /* the one opendir() holds */
}

static void render_process(buf_t *out)
{
    static char text[8192]; /* only the HTTP thread renders */
    static uint64_t btime;
    metrics_proc_stat_t ps;
    if (btime == 0 && read_small("/proc/stat", text, sizeof(text)) == 0)
        metrics_proc_parse_btime(text, &btime);
    if (read_small("/proc/self/stat", text, sizeof(text)) == 0 &&
        metrics_proc_parse_stat(text, btime, sysconf(_SC_CLK_TCK), sysconf(_SC_PAGESIZE), &ps) == 0) {
        buf_printf(out, "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
                        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %.2f\n",
                   ps.cpu_seconds);
        buf_printf(out, "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
                        "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %llu\n",
                   (unsigned long long)ps.resident_bytes);
        buf_printf(out, "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
                        "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes %llu\n",
                   (unsigned long long)ps.virtual_bytes);
        buf_printf(out, "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
                        "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %.2f\n",
                   ps.start_time_s);
    }
    long fds = count_fds();
    if (fds >= 0)
        buf_printf(out, "# HELP process_open_fds Number of open file descriptors.\n"
                        "# TYPE process_open_fds gauge\nprocess_open_fds %ld\n", fds);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
        buf_printf(out, "# HELP process_max_fds Maximum number of open file descriptors.\n"
                        "# TYPE process_max_fds gauge\nprocess_max_fds %lld\n",
                   rl.rlim_cur == RLIM_INFINITY ? -1LL : (long long)rl.rlim_cur);
}

void metrics_ops_render(buf_t *out)
{
    buf_puts(out, "# HELP mailpump_build_info The running build: version, and the git commit it was configured at.\n"
                  "# TYPE mailpump_build_info gauge\n");
#ifdef MP_GIT_COMMIT
    buf_printf(out, "mailpump_build_info{version=\"%s\",commit=\"%s\"} 1\n", MAILPUMP_VERSION, MP_GIT_COMMIT);
#else
    buf_printf(out, "mailpump_build_info{version=\"%s\"} 1\n", MAILPUMP_VERSION);
#endif
    render_recipients(out);
    buf_printf(out, "# HELP %s Time from when a message was first enqueued (its AMQP timestamp, else its first "
                    "consume) to each recipient's final event, by outcome: delivered, bounced, other (dead, "
                    "suppressed).\n# TYPE %s histogram\n", LATENCY_NAME, LATENCY_NAME);
    for (int i = 0; i < LAT_LAST; i++)
        hist_series(out, &latency[i], "outcome", latency_labels[i]);
    metrics_hist_render(&age, out);
    buf_printf(out, "# HELP %s Time from an SMTP command sent (or the connection started) to its reply complete "
                    "(the TLS handshake done), by command.\n# TYPE %s histogram\n", COMMAND_NAME, COMMAND_NAME);
    for (int i = 0; i < MET_CMD_LAST; i++)
        hist_series(out, &commands[i], "command", command_labels[i]);
    render_process(out);
}

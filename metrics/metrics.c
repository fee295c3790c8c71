/*
 * SUMMARY
 *  metrics/metrics.c - lock-free counters, Prometheus text, HTTP endpoint.
 * DESCRIPTION
 *  Names follow Prometheus conventions: a mailpump_ prefix, _total on
 *  counters. The table below is the single place a metric is named and
 *  described; the labeled families (recipients by tenant, pool, source)
 *  are named in theirs, further down.
 */
#include "metrics/metrics.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "metrics/heartbeat.h"
#include "metrics/ops.h"

static _Atomic uint64_t counters[MET_COUNTER_LAST];
static _Atomic int64_t  gauges[MET_GAUGE_LAST];

static const struct {
    const char *name;
    const char *help;
} counter_info[MET_COUNTER_LAST] = {
    [MET_MESSAGES_CONSUMED] = { "mailpump_messages_consumed_total", "Messages received from the outbound queue." },
    [MET_MESSAGES_DONE] = { "mailpump_messages_done_total", "Messages finished and acknowledged." },
    [MET_MESSAGES_DEAD] = { "mailpump_messages_dead_total", "Messages published to the dead-letter queue." },
    [MET_RCPT_DELIVERED] = { "mailpump_recipients_delivered_total", "Recipients accepted by the receiving server." },
    [MET_RCPT_FAILED] = { "mailpump_recipients_failed_total", "Recipients that failed permanently." },
    [MET_RCPT_DEFERRED] = { "mailpump_recipients_deferred_total", "Recipients that failed transiently." },
    [MET_SMTP_SESSIONS] = { "mailpump_smtp_sessions_opened_total", "SMTP connections opened." },
    [MET_SMTP_SESSION_ERRORS] = { "mailpump_smtp_session_errors_total", "SMTP connections that ended in a network, TLS or timeout error." },
    [MET_DNS_QUERIES] = { "mailpump_dns_queries_total", "MX resolutions started." },
    [MET_DNS_L2_ERRORS] = { "mailpump_dns_redis_errors_total", "DNS cache: Redis commands that failed or returned a corrupt value (the lookup went on over DNS)." },
    [MET_IMAP_APPENDED] = { "mailpump_imap_appended_total", "Sent copies appended over IMAP." },
    [MET_IMAP_APPEND_FAILED] = { "mailpump_imap_append_failed_total", "IMAP appends that failed." },
    [MET_EVENTS_PUBLISHED] = { "mailpump_events_published_total", "Events confirmed by the broker." },
    [MET_PUBLISH_FAILED] = { "mailpump_publish_failed_total", "Publishes the broker did not confirm." },
    [MET_RETRIES_SCHEDULED] = { "mailpump_retries_scheduled_total", "Messages republished to a delay queue." },
    [MET_RCPT_SKIPPED_DONE] = { "mailpump_recipients_skipped_already_delivered_total", "Recipients of a redelivered message skipped because the ledger says they were delivered." },
    [MET_POSSIBLE_DUPLICATES] = { "mailpump_recipients_possible_duplicate_total", "Recipients delivered again after a redelivery found them mid-transaction." },
    [MET_LEDGER_UNAVAILABLE] = { "mailpump_ledger_unavailable_total", "Ledger (Redis) calls that failed: delivery went on at-least-once." },
    [MET_TLS_FULL_HANDSHAKES] = { "mailpump_tls_full_handshakes_total", "SMTP TLS handshakes without session resumption." },
    [MET_TLS_RESUMED_HANDSHAKES] = { "mailpump_tls_resumed_handshakes_total", "SMTP TLS handshakes that resumed a cached session." },
    [MET_SMTP_SESSIONS_REUSED] = { "mailpump_smtp_sessions_reused_total", "Deliveries that reused a pooled SMTP session." },
    [MET_SMTP_ROUTES_DOWN] = { "mailpump_smtp_routes_marked_down_total", "MX addresses marked down after failing to connect or greet (skipped for route_penalty, doubling)." },
    [MET_SMTP_ROUTE_SKIPS] = { "mailpump_smtp_route_skips_total", "MX candidates skipped because their address was marked down." },
    [MET_RATE_LIMIT_WAITS] = { "mailpump_rate_limit_waits_total", "Messages that waited in the worker for their slot under [smtp] rate_limits." },
    [MET_RATE_LIMIT_DEFERRED] = { "mailpump_rate_limit_deferred_total", "Messages (per domain) deferred to a retry queue because their rate_limits slot was further away than rate_limit_max_wait." },
    [MET_RATE_LIMIT_REDIS_ERRORS] = { "mailpump_rate_limit_redis_errors_total", "rate_limits budgets Redis could not give (timeout, error): the process's own table answered." },
    [MET_SMTP_DEST_CAPPED] = { "mailpump_smtp_dest_capped_total", "New connections turned away at the greeting (4xx) while others to the destination were open: it was capped at those (pool_refused_backoff) and the message waited for one." },
    [MET_MESSAGES_POISON] = { "mailpump_messages_poison_total", "Messages dead-lettered after too many attempts that crashed a worker or could not be finished." },
    [MET_IMAP_SESSIONS] = { "mailpump_imap_sessions_opened_total", "IMAP connections opened for Sent copies." },
    [MET_IMAP_SESSIONS_REUSED] = { "mailpump_imap_sessions_reused_total", "Sent copies appended on a pooled IMAP session (APPEND only)." },
    [MET_IMAP_ALREADY_STORED] = { "mailpump_imap_copies_found_total", "Retried Sent copies found already stored by an earlier attempt (Message-ID search), not appended again." },
    [MET_LEDGER_NOT_SENT] = { "mailpump_ledger_not_sent_total", "Transactions abandoned before their final dot because the ledger (Redis) could not record them; their recipients were deferred." },
    [MET_SMTP_TLS_FALLBACKS] = { "mailpump_smtp_tls_fallbacks_total", "Opportunistic TLS handshakes that failed and were retried in plaintext on the same address (never under required or verify)." },
    [MET_LOCAL_RESOURCE_ERRORS] = { "mailpump_local_resource_errors_total", "SMTP connections not made for want of local resources (descriptors, ports, memory): retried as back-pressure, never counted against the destination." },
    [MET_MESSAGES_TOO_LARGE] = { "mailpump_messages_too_large_total", "Messages whose announced body exceeded 2 x [message] max_size + 64 KiB: dead-lettered with only their head read." },
    [MET_CONSUMER_PAUSES] = { "mailpump_consumer_pauses_total", "Times a worker cancelled its consumer because its bodies in flight reached [message] inflight_memory." },
    [MET_DELIVERIES_REFUSED] = { "mailpump_deliveries_refused_total", "Deliveries that arrived while their worker was paused and did not fit its hard memory bound: nacked back to the queue unread." },
    [MET_IMAP_BATCHED] = { "mailpump_imap_multiappend_copies_total", "Sent copies stored together with other queued copies of the same account in one APPEND (MULTIAPPEND)." },
    [MET_SITE_PARKED] = { "mailpump_site_parked_total", "Domain legs parked to a delay queue without spending an attempt: their site had all its connections busy and [smtp] site_max_waiting legs waiting, or they waited site_max_wait." },
    [MET_SMTP_DEADLINES] = { "mailpump_smtp_deadlines_total", "SMTP sessions ended as a timeout by an absolute deadline while the server was still sending: a reply not complete within its command's timeout, or a transaction past [smtp] timeout_transaction_ms." },
    [MET_SMTP_REPLY_FLOODS] = { "mailpump_smtp_reply_floods_total", "SMTP sessions ended as a protocol error because a reply had more lines than [smtp] reply_lines_burst plus reply_lines_per_s per second waited." },
    [MET_LEASE_RENEWALS] = { "mailpump_lease_renewals_total", "Renewals of the workers' connection leases sent to Redis (one EVAL for all of a worker's sites)." },
    [MET_LEASE_RENEWALS_FAILED] = { "mailpump_lease_renewals_failed_total", "Connection-lease renewals that failed or timed out: the worker used the fallback share, ceil(limit / holders)." },
    [MET_SHAPING_ACTIONS_ADDED] = { "mailpump_shaping_actions_added_total", "Shaping actions (suspend, bounce, lower rate or connection limit) added or extended by this process's workers, e.g. by automation rules." },
    [MET_SHAPING_ACTIONS_LEARNED] = { "mailpump_shaping_actions_learned_total", "Shaping actions a worker first learned from Redis (mp:act), added by another worker or pod or before a restart." },
    [MET_SHAPING_ACTIONS_CORRUPT] = { "mailpump_shaping_actions_corrupt_total", "Fields of the shaping-actions hash (mp:act) skipped by a worker's read because they were not valid actions (counted on every read that met them)." },
    [MET_SHAPING_SUSPENDED] = { "mailpump_shaping_suspended_total", "Recipients deferred to a delay queue without spending an attempt because a shaping action suspends their destination (site or domain, and source)." },
    [MET_SHAPING_BOUNCED] = { "mailpump_shaping_bounced_total", "Recipients bounced by a shaping action (action = bounce), not by a server." },
    [MET_WARMUP_LIMITED] = { "mailpump_warmup_limited_total", "Times a domain leg found a source at its warm-up day's volume for the destination site (the leg took another source of its pool, or was parked)." },
    [MET_RCPT_SUPPRESSED] = { "mailpump_recipients_suppressed_total", "Recipients not sent because they are on a suppression list (global or their tenant's)." },
    [MET_SUP_UNAVAILABLE] = { "mailpump_suppression_unavailable_total", "Messages whose suppression check Redis could not answer: sent ([suppression] when_unavailable = send) or deferred." },
    [MET_SUP_AUTO_ADDED] = { "mailpump_suppression_auto_added_total", "Recipients added to a suppression list after a permanent bounce ([suppression] auto_reasons)." },
    [MET_SUP_AUTO_FAILED] = { "mailpump_suppression_auto_add_failed_total", "Automatic suppression list writes that Redis refused or did not answer." },
    [MET_TRACE_WRITES] = { "mailpump_trace_writes_total", "Message history writes sent to Redis ([trace]): one per attempt, whatever its recipients." },
    [MET_TRACE_WRITE_FAILURES] = { "mailpump_trace_write_failures_total", "Message history writes Redis did not take (down, slow, an error): those attempts are missing from `mailpump trace`." },
    [MET_API_REQUESTS] = { "mailpump_api_requests_total", "HTTP API requests answered." },
    [MET_API_CLIENT_ERRORS] = { "mailpump_api_client_errors_total", "HTTP API requests answered with a 4xx status." },
    [MET_API_SERVER_ERRORS] = { "mailpump_api_server_errors_total", "HTTP API requests answered with a 5xx status (e.g. the broker unavailable)." },
    [MET_API_AUTH_FAILURES] = { "mailpump_api_auth_failures_total", "HTTP API requests refused with 401: no bearer token, or not one of [api] tokens_file." },
    [MET_API_MESSAGES_SUBMITTED] = { "mailpump_api_messages_submitted_total", "Messages published by POST /v1/messages and confirmed by the broker." },
};

static const struct {
    const char *name;
    const char *help;
} gauge_info[MET_GAUGE_LAST] = {
    [MET_INFLIGHT] = { "mailpump_messages_inflight", "Messages consumed and not yet acknowledged." },
    [MET_WORKERS_READY] = { "mailpump_workers_ready", "Worker threads holding an open broker connection." },
    [MET_WORKERS_BLOCKED] = { "mailpump_workers_blocked",
                              "Worker threads whose publishes the broker blocks (memory or disk alarm); events wait in memory." },
    [MET_DNS_L1_ENTRIES] = { "mailpump_dns_l1_entries", "Answers held in the workers' in-memory DNS caches." },
    [MET_WORKERS] = { "mailpump_workers", "Configured worker threads." },
    [MET_INFLIGHT_BYTES] = { "mailpump_inflight_bytes", "Bytes the workers' messages in flight are charged against [message] inflight_memory (announced body x 3; a truncated one its head)." },
    [MET_SMTP_CONNECTIONS] = { "mailpump_smtp_connections", "SMTP connections open or being opened by the workers (in use and idle in the pools)." },
    [MET_SITE_RUNNING] = { "mailpump_site_running", "Domain legs holding a place in their destination site (one SMTP connection each at most)." },
    [MET_SITE_WAITING] = { "mailpump_site_waiting", "Domain legs waiting for a place in their destination site." },
    [MET_LEASE_FALLBACK] = { "mailpump_lease_fallback", "Worker lease tables using the fallback share of their sites' connection limits (Redis configured but not answering, or not yet)." },
    [MET_SHAPING_ACTIONS_ACTIVE] = { "mailpump_shaping_actions_active", "Shaping actions in force in the workers' views, summed over the worker threads (each holds the whole fleet's set: divide by mailpump_workers for the number of actions)." },
};

void metrics_inc(metric_counter_t c, uint64_t n)
{
    atomic_fetch_add_explicit(&counters[c], n, memory_order_relaxed);
}

void metrics_gauge_add(metric_gauge_t g, int64_t delta)
{
    atomic_fetch_add_explicit(&gauges[g], delta, memory_order_relaxed);
}

void metrics_gauge_set(metric_gauge_t g, int64_t v)
{
    atomic_store_explicit(&gauges[g], v, memory_order_relaxed);
}

uint64_t metrics_counter(metric_counter_t c)
{
    return atomic_load_explicit(&counters[c], memory_order_relaxed);
}

int64_t metrics_gauge(metric_gauge_t g)
{
    return atomic_load_explicit(&gauges[g], memory_order_relaxed);
}

/* ---- histograms and DNS lookups ---- */

void metrics_hist_observe(metrics_hist_t *h, uint64_t us)
{
    size_t i = 0;
    while (i < h->nbounds && us > h->bounds_us[i])
        i++;
    atomic_fetch_add_explicit(&h->counts[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_us, us, memory_order_relaxed);
}

void metrics_hist_render(const metrics_hist_t *h, buf_t *out)
{
    buf_printf(out, "# HELP %s %s\n# TYPE %s histogram\n", h->name, h->help, h->name);
    uint64_t cum = 0;
    for (size_t i = 0; i <= h->nbounds; i++) {
        cum += atomic_load_explicit(&h->counts[i], memory_order_relaxed);
        if (i < h->nbounds)
            buf_printf(out, "%s_bucket{le=\"%g\"} %llu\n", h->name, (double)h->bounds_us[i] / 1e6,
                       (unsigned long long)cum);
        else
            buf_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n", h->name, (unsigned long long)cum);
    }
    buf_printf(out, "%s_sum %g\n%s_count %llu\n", h->name,
               (double)atomic_load_explicit(&h->sum_us, memory_order_relaxed) / 1e6, h->name,
               (unsigned long long)cum);
}

static const char *const dns_layers[] = { "l1", "l2", "dns", "none" };
static const char *const dns_results[] = { "ok", "nxdomain", "nullmx", "noaddr", "tempfail",
                                           "timeout", "badname", "cancelled", "error" };
#define DNS_NLAYERS  (sizeof(dns_layers) / sizeof(dns_layers[0]))
#define DNS_NRESULTS (sizeof(dns_results) / sizeof(dns_results[0]))
static _Atomic uint64_t dns_lookups[DNS_NLAYERS][DNS_NRESULTS];
static const uint64_t dns_bounds_us[] = { 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                                          25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000 };
static metrics_hist_t dns_latency = METRICS_HIST_INIT(
    "mailpump_dns_lookup_seconds", "Time from an MX lookup request to its answer, any layer.", dns_bounds_us);

static size_t dns_label_index(const char *const *labels, size_t n, const char *s)
{
    for (size_t i = 0; s != NULL && i < n; i++)
        if (strcmp(labels[i], s) == 0)
            return i;
    return n - 1; /* "none" / "error" */
}

void metrics_dns_lookup(const char *layer, const char *result, uint64_t latency_us)
{
    size_t l = dns_label_index(dns_layers, DNS_NLAYERS, layer);
    size_t r = dns_label_index(dns_results, DNS_NRESULTS, result);
    atomic_fetch_add_explicit(&dns_lookups[l][r], 1, memory_order_relaxed);
    metrics_hist_observe(&dns_latency, latency_us);
}

uint64_t metrics_dns_lookups(const char *layer, const char *result)
{
    size_t l = dns_label_index(dns_layers, DNS_NLAYERS, layer);
    size_t r = dns_label_index(dns_results, DNS_NRESULTS, result);
    return atomic_load_explicit(&dns_lookups[l][r], memory_order_relaxed);
}

static void metrics_render_dns(buf_t *out)
{
    buf_puts(out, "# HELP mailpump_dns_lookups_total MX lookups completed, by answering layer and result.\n"
                  "# TYPE mailpump_dns_lookups_total counter\n");
    for (size_t l = 0; l < DNS_NLAYERS; l++)
        for (size_t r = 0; r < DNS_NRESULTS; r++) {
            uint64_t v = atomic_load_explicit(&dns_lookups[l][r], memory_order_relaxed);
            if (v > 0 || (r == 0 && l < 3)) /* the ok series always, the rest once seen */
                buf_printf(out, "mailpump_dns_lookups_total{layer=\"%s\",result=\"%s\"} %llu\n",
                           dns_layers[l], dns_results[r], (unsigned long long)v);
        }
    metrics_hist_render(&dns_latency, out);
}

/* ---- recipient outcomes by who sends ---- */

/* Per family: the registered names in the order they came (their counter
 * rows never move) and a sorted index over them for the lookup. Rows 0
 * and 1 are none and other; name i counts in row i + 2. Registration
 * (start-up) and rendering (the HTTP thread) hold the mutex; counting
 * reads the table without it, which is why it is fixed before the
 * workers start. */
typedef struct label_family {
    const char      *metric;
    const char      *label;
    const char      *help;
    char            *names[METRICS_LABELS_MAX];
    uint16_t         sorted[METRICS_LABELS_MAX]; /* indexes into names, by strcmp */
    _Atomic size_t   n;
    _Atomic uint64_t counts[METRICS_LABELS_MAX + 2][MET_OUT_LAST];
} label_family_t;

static label_family_t families[MET_FAM_LAST] = {
    [MET_FAM_TENANT] = { .metric = "mailpump_recipients_by_tenant_total", .label = "tenant",
                         .help = "Recipient outcomes by the message's tenant: the names of [metrics] tenants, other for "
                                 "any other tenant, none for a message without one." },
    [MET_FAM_POOL] = { .metric = "mailpump_recipients_by_pool_total", .label = "pool",
                       .help = "Recipient outcomes by the message's pool: the configured pools, other for any other "
                               "name, none for a message without one." },
    [MET_FAM_CAMPAIGN] = { .metric = "mailpump_recipients_by_campaign_total", .label = "campaign",
                           .help = "Recipient outcomes by the message's campaign: the names of [metrics] campaigns, "
                                   "other for any other campaign, none for a message without one." },
    [MET_FAM_SITE] = { .metric = "mailpump_recipients_by_site_total", .label = "site",
                       .help = "Recipient outcomes by destination site (the MX hosts' registrable domain, e.g. "
                               "google.com): the sites of [metrics] sites, other for any other, none for a message "
                               "dead-lettered as a whole. Outcome parked counts the legs parked for a busy site." },
    [MET_FAM_SOURCE] = { .metric = "mailpump_recipients_by_source_total", .label = "source",
                         .help = "Recipient outcomes by the egress source the delivery used: the configured sources, "
                                 "other for any other, none when no source was used." },
};
static pthread_mutex_t label_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const outcome_names[MET_OUT_LAST] = {
    [MET_OUT_DELIVERED] = "delivered", [MET_OUT_BOUNCED] = "bounced",       [MET_OUT_DEFERRED] = "deferred",
    [MET_OUT_DEAD] = "dead",           [MET_OUT_SUPPRESSED] = "suppressed", [MET_OUT_PARKED] = "parked",
};

const char *metrics_outcome_name(int outcome_index)
{
    return outcome_index >= 0 && outcome_index < MET_OUT_LAST ? outcome_names[outcome_index] : NULL;
}

/* The position in sorted of value, or where it would go (*found = 0). */
static size_t label_search(const label_family_t *lf, size_t n, const char *value, int *found)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(value, lf->names[lf->sorted[mid]]);
        if (c == 0) {
            *found = 1;
            return mid;
        }
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    *found = 0;
    return lo;
}

void metrics_label_add(metrics_family_t f, const char *value)
{
    if ((unsigned)f >= MET_FAM_LAST || value == NULL || value[0] == '\0' || strcmp(value, "none") == 0 ||
        strcmp(value, "other") == 0)
        return;
    label_family_t *lf = &families[f];
    pthread_mutex_lock(&label_lock);
    size_t n = atomic_load_explicit(&lf->n, memory_order_relaxed);
    int found;
    size_t at = label_search(lf, n, value, &found);
    if (!found && n < METRICS_LABELS_MAX) {
        lf->names[n] = xstrdup(value);
        memmove(&lf->sorted[at + 1], &lf->sorted[at], (n - at) * sizeof(lf->sorted[0]));
        lf->sorted[at] = (uint16_t)n;
        atomic_store_explicit(&lf->n, n + 1, memory_order_release);
    }
    pthread_mutex_unlock(&label_lock);
}

size_t metrics_label_add_list(metrics_family_t f, const char *list)
{
    size_t added = 0;
    if ((unsigned)f >= MET_FAM_LAST || list == NULL)
        return 0;
    char *copy = xstrdup(list), *save = NULL;
    for (char *t = strtok_r(copy, ", \t", &save); t; t = strtok_r(NULL, ", \t", &save)) {
        size_t before = atomic_load_explicit(&families[f].n, memory_order_relaxed);
        metrics_label_add(f, t);
        added += atomic_load_explicit(&families[f].n, memory_order_relaxed) > before;
    }
    free(copy);
    return added;
}

/* The counter row of value: 0 none, 1 other, else its name's. */
static size_t label_row(const label_family_t *lf, const char *value)
{
    if (value == NULL)
        return 0;
    size_t n = atomic_load_explicit(&lf->n, memory_order_acquire);
    int found;
    size_t at = label_search(lf, n, value, &found);
    return found ? (size_t)lf->sorted[at] + 2 : 1;
}

void metrics_count_labeled(metrics_family_t f, const char *value, int outcome_index)
{
    if ((unsigned)f >= MET_FAM_LAST || outcome_index < 0 || outcome_index >= MET_OUT_LAST)
        return;
    label_family_t *lf = &families[f];
    atomic_fetch_add_explicit(&lf->counts[label_row(lf, value)][outcome_index], 1, memory_order_relaxed);
}

uint64_t metrics_labeled(metrics_family_t f, const char *value, int outcome_index)
{
    if ((unsigned)f >= MET_FAM_LAST || outcome_index < 0 || outcome_index >= MET_OUT_LAST)
        return 0;
    const label_family_t *lf = &families[f];
    size_t row = value == NULL || strcmp(value, "none") == 0 ? 0
                 : strcmp(value, "other") == 0              ? 1
                                                            : label_row(lf, value);
    return atomic_load_explicit(&lf->counts[row][outcome_index], memory_order_relaxed);
}

/* A label value in the text exposition format: backslash, double quote
 * and line feed escaped. */
static void put_label_value(buf_t *out, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\')
            buf_puts(out, "\\\\");
        else if (*v == '"')
            buf_puts(out, "\\\"");
        else if (*v == '\n')
            buf_puts(out, "\\n");
        else
            buf_putc(out, *v);
    }
}

static void render_row(buf_t *out, const label_family_t *lf, const char *value, size_t row)
{
    for (int o = 0; o < MET_OUT_LAST; o++) {
        buf_printf(out, "%s{%s=\"", lf->metric, lf->label);
        put_label_value(out, value);
        buf_printf(out, "\",outcome=\"%s\"} %llu\n", outcome_names[o],
                   (unsigned long long)atomic_load_explicit(&lf->counts[row][o], memory_order_relaxed));
    }
}

/* Every series of every family, also those still 0: the set is fixed,
 * so a rate over any of them is defined from the start. Values in
 * sorted order between none and other. */
static void metrics_render_labeled(buf_t *out)
{
    pthread_mutex_lock(&label_lock);
    for (int f = 0; f < MET_FAM_LAST; f++) {
        const label_family_t *lf = &families[f];
        size_t n = atomic_load_explicit(&lf->n, memory_order_relaxed);
        buf_printf(out, "# HELP %s %s\n# TYPE %s counter\n", lf->metric, lf->help, lf->metric);
        render_row(out, lf, "none", 0);
        for (size_t i = 0; i < n; i++)
            render_row(out, lf, lf->names[lf->sorted[i]], (size_t)lf->sorted[i] + 2);
        render_row(out, lf, "other", 1);
    }
    pthread_mutex_unlock(&label_lock);
}

void metrics_render(buf_t *out)
{
    for (int i = 0; i < MET_COUNTER_LAST; i++)
        buf_printf(out, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", counter_info[i].name,
                   counter_info[i].help, counter_info[i].name, counter_info[i].name,
                   (unsigned long long)metrics_counter((metric_counter_t)i));
    for (int i = 0; i < MET_GAUGE_LAST; i++)
        buf_printf(out, "# HELP %s %s\n# TYPE %s gauge\n%s %lld\n", gauge_info[i].name,
                   gauge_info[i].help, gauge_info[i].name, gauge_info[i].name,
                   (long long)metrics_gauge((metric_gauge_t)i));
    metrics_render_dns(out);
    metrics_render_labeled(out);
    metrics_ops_render(out);
}

struct metrics_server {
    struct MHD_Daemon *mhd;
};

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *ctype,
                             buf_t *body)
{
    size_t len;
    char *data = buf_steal(body, &len);
    struct MHD_Response *r = MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type", ctype);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    buf_t b = BUF_INIT;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        buf_puts(&b, "method not allowed\n");
        return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", &b);
    }
    if (strcmp(url, "/metrics") == 0) {
        metrics_render(&b);
        return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4", &b);
    }
    if (strcmp(url, "/healthz") == 0) {
        /* 503 when a worker loop stopped stamping its heartbeat (metrics/heartbeat.h) */
        unsigned status = heartbeat_health(&b, util_mono_ms());
        return reply(c, status, "text/plain", &b);
    }
    if (strcmp(url, "/readyz") == 0) {
        int64_t ready = metrics_gauge(MET_WORKERS_READY), want = metrics_gauge(MET_WORKERS);
        int ok = want > 0 && ready == want;
        buf_printf(&b, "%s: %lld/%lld workers connected\n", ok ? "ready" : "not ready",
                   (long long)ready, (long long)want);
        return reply(c, ok ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", &b);
    }
    buf_puts(&b, "not found: try /metrics, /healthz or /readyz\n");
    return reply(c, MHD_HTTP_NOT_FOUND, "text/plain", &b);
}

int metrics_listen_parse(const char *listen, struct sockaddr_storage *ss, char *err, size_t errlen)
{
    char host[128];
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || (size_t)(colon - listen) >= sizeof(host)) {
        snprintf(err, errlen, "[metrics] listen: expected host:port, got \"%s\"", listen);
        return -1;
    }
    memcpy(host, listen, (size_t)(colon - listen));
    host[colon - listen] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port <= 0 || port > 65535) {
        snprintf(err, errlen, "[metrics] listen: bad port in \"%s\"", listen);
        return -1;
    }
    memset(ss, 0, sizeof(*ss));
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        host[hl - 1] = '\0';
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host + 1, &s6->sin6_addr) == 1)
            return 0;
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &s4->sin_addr) == 1)
            return 0;
    }
    snprintf(err, errlen, "[metrics] listen: \"%s\" is not a numeric address", host);
    return -1;
}

metrics_server_t *metrics_server_start(const char *listen, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    if (metrics_listen_parse(listen, &ss, err, errlen) < 0)
        return NULL;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    uint16_t port = (uint16_t)util_sockaddr_port((const struct sockaddr *)&ss);
    struct MHD_Daemon *d = MHD_start_daemon(flags, port, NULL, NULL, on_request, NULL,
                                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                                            MHD_OPTION_CONNECTION_LIMIT, 64u,
                                            MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    if (d == NULL) {
        snprintf(err, errlen, "[metrics] cannot listen on %s (address in use?)", listen);
        return NULL;
    }
    metrics_server_t *s = xcalloc(1, sizeof(*s));
    s->mhd = d;
    return s;
}

void metrics_server_stop(metrics_server_t *s)
{
    if (s == NULL)
        return;
    MHD_stop_daemon(s->mhd);
    free(s);
}

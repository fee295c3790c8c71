/*
 * metrics/metrics.h - process-wide counters and the HTTP endpoint.
 *
 * Counters are atomics indexed by an enum, shared by all worker threads
 * without locks (relaxed increments; the scrape reads a consistent-enough
 * snapshot). The HTTP endpoint serves /metrics (Prometheus text format
 * 0.0.4), /healthz (the process runs) and /readyz (every worker holds a
 * broker connection) from libmicrohttpd's own thread, off the hot path.
 */
#ifndef MP_METRICS_METRICS_H
#define MP_METRICS_METRICS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/buf.h"

typedef enum {
    MET_MESSAGES_CONSUMED = 0,
    MET_MESSAGES_DONE,
    MET_MESSAGES_DEAD,
    MET_RCPT_DELIVERED,
    MET_RCPT_FAILED,
    MET_RCPT_DEFERRED,
    MET_SMTP_SESSIONS,
    MET_SMTP_SESSION_ERRORS,
    MET_DNS_QUERIES,
    MET_DNS_L2_ERRORS,      /* DNS cache: Redis commands failed, corrupt values */
    MET_IMAP_APPENDED,
    MET_IMAP_APPEND_FAILED,
    MET_EVENTS_PUBLISHED,
    MET_PUBLISH_FAILED,
    /* message lifecycle: retries, ledger, poison */
    MET_RETRIES_SCHEDULED,
    MET_RCPT_SKIPPED_DONE,
    MET_POSSIBLE_DUPLICATES,
    MET_LEDGER_UNAVAILABLE,
    MET_MESSAGES_POISON,
    MET_TLS_FULL_HANDSHAKES,
    MET_TLS_RESUMED_HANDSHAKES,
    MET_SMTP_SESSIONS_REUSED,
    MET_SMTP_ROUTES_DOWN,   /* MX addresses marked down (or kept down) after a failure */
    MET_SMTP_ROUTE_SKIPS,   /* candidates skipped because their address was down */
    MET_SMTP_DEST_CAPPED,   /* new connections turned away at the greeting; destination capped */
    MET_RATE_LIMIT_WAITS,   /* messages that waited for their slot ([smtp] rate_limits) */
    MET_RATE_LIMIT_DEFERRED, /* domains of messages deferred: their slot was too far away */
    MET_RATE_LIMIT_REDIS_ERRORS, /* rate_limits asked of Redis, answered by the local table instead */
    MET_IMAP_SESSIONS,      /* IMAP connections opened */
    MET_IMAP_SESSIONS_REUSED, /* appends that ran on a pooled IMAP session */
    MET_IMAP_ALREADY_STORED, /* retried Sent copies found already stored */
    MET_IMAP_BATCHED,        /* Sent copies stored by a MULTIAPPEND with others */
    MET_LOCAL_RESOURCE_ERRORS, /* connections not made for want of descriptors, ports, memory */
    MET_SMTP_TLS_FALLBACKS,  /* opportunistic TLS handshakes that failed, retried in plaintext */
    MET_LEDGER_NOT_SENT,     /* transactions abandoned before the final dot: their mark could not be recorded */
    MET_MESSAGES_TOO_LARGE,  /* bodies announced above the largest allowed: dead-lettered unread */
    MET_CONSUMER_PAUSES,     /* consumers cancelled because their worker's inflight_memory was reached */
    MET_DELIVERIES_REFUSED,  /* deliveries nacked back unread: past the hard bound while paused */
    MET_SITE_PARKED,         /* domain legs parked: their site busy with others waiting */
    MET_SMTP_DEADLINES,      /* SMTP sessions ended by an absolute deadline (command or transaction) */
    MET_SMTP_REPLY_FLOODS,   /* SMTP sessions ended by the reply-line cap */
    MET_LEASE_RENEWALS,      /* connection-lease renewals sent to Redis (deliverer/lease.c) */
    MET_LEASE_RENEWALS_FAILED, /* of those, failed or timed out: the fallback share is in force */
    MET_SHAPING_ACTIONS_ADDED,   /* shaping actions added or extended by this process (deliverer/actions.c) */
    MET_SHAPING_ACTIONS_LEARNED, /* shaping actions first learned from Redis */
    MET_SHAPING_ACTIONS_CORRUPT, /* fields of mp:act skipped by reads: not valid actions */
    MET_SHAPING_SUSPENDED,       /* recipients deferred without an attempt: a shaping action suspends their destination */
    MET_SHAPING_BOUNCED,         /* recipients bounced by a shaping action */
    MET_WARMUP_LIMITED,      /* sources refused for a leg: at their warm-up day's volume (deliverer/warmup.c) */
    MET_RCPT_SUPPRESSED,     /* recipients not sent: on a suppression list (deliverer/suplist.h) */
    MET_SUP_UNAVAILABLE,     /* suppression checks Redis could not answer ([suppression] when_unavailable) */
    MET_SUP_AUTO_ADDED,      /* recipients added to a suppression list after a permanent bounce */
    MET_SUP_AUTO_FAILED,     /* of those, writes Redis refused or did not answer */
    MET_TRACE_WRITES,        /* message history writes sent to Redis, one per attempt (deliverer/history.c) */
    MET_TRACE_WRITE_FAILURES, /* of those, failed or timed out: that attempt is missing from the history */
    MET_API_REQUESTS,        /* HTTP API requests answered (api/http.h) */
    MET_API_CLIENT_ERRORS,   /* of those, answered 4xx */
    MET_API_SERVER_ERRORS,   /* of those, answered 5xx */
    MET_API_AUTH_FAILURES,   /* of those, refused for want of a valid bearer token */
    MET_API_MESSAGES_SUBMITTED, /* messages POST /v1/messages published and confirmed */
    MET_COUNTER_LAST
} metric_counter_t;

typedef enum {
    MET_INFLIGHT = 0,       /* messages consumed and not yet acked */
    MET_WORKERS_READY,      /* workers with an open broker connection */
    MET_DNS_L1_ENTRIES,     /* answers held in the workers' L1 DNS caches */
    MET_WORKERS,            /* configured workers */
    MET_WORKERS_BLOCKED,    /* workers whose publishes the broker blocks (resource alarm) */
    MET_INFLIGHT_BYTES,     /* what the workers' deliveries in flight are charged (budget.h) */
    MET_SMTP_CONNECTIONS,   /* SMTP connections open or opening (busy + idle in the pools) */
    MET_SITE_RUNNING,       /* domain legs holding a place in their site */
    MET_SITE_WAITING,       /* domain legs waiting for a place in their site */
    MET_LEASE_FALLBACK,     /* workers' lease tables on the fallback share (Redis not answering) */
    MET_SHAPING_ACTIONS_ACTIVE, /* shaping actions in the workers' views, summed over the workers */
    MET_GAUGE_LAST
} metric_gauge_t;

void metrics_inc(metric_counter_t c, uint64_t n);
void metrics_gauge_add(metric_gauge_t g, int64_t delta);
void metrics_gauge_set(metric_gauge_t g, int64_t v);
uint64_t metrics_counter(metric_counter_t c);
int64_t  metrics_gauge(metric_gauge_t g);
/* Append the Prometheus text exposition to out (with metrics/ops.h's families). */
void metrics_render(buf_t *out);

/* ---- histograms and DNS lookups ---- */

/* A fixed-bucket histogram of microsecond values, rendered in seconds
 * (Prometheus histogram: cumulative le buckets, _sum, _count). Lock-free
 * like the counters. Define one statically with METRICS_HIST_INIT and an
 * ascending array of upper bounds. */
#define METRICS_HIST_BUCKETS 20
typedef struct metrics_hist {
    const char      *name;
    const char      *help;
    const uint64_t  *bounds_us; /* ascending upper bounds, at most METRICS_HIST_BUCKETS */
    size_t           nbounds;
    _Atomic uint64_t counts[METRICS_HIST_BUCKETS + 1]; /* per bucket; the last is +Inf */
    _Atomic uint64_t sum_us;
} metrics_hist_t;
#define METRICS_HIST_INIT(name_, help_, bounds_) \
    { .name = (name_), .help = (help_), .bounds_us = (bounds_), .nbounds = sizeof(bounds_) / sizeof((bounds_)[0]) }
void metrics_hist_observe(metrics_hist_t *h, uint64_t us);
void metrics_hist_render(const metrics_hist_t *h, buf_t *out);

/* One DNS lookup completed: mailpump_dns_lookups_total{layer,result} and
 * the mailpump_dns_lookup_seconds histogram. layer is "l1", "l2", "dns"
 * or "none"; result one of dns_status_tag()'s tags (unknown ones count
 * as "error"). Pass dns_layer_name(ev->layer) and dns_status_tag(ev->status). */
void metrics_dns_lookup(const char *layer, const char *result, uint64_t latency_us);
uint64_t metrics_dns_lookups(const char *layer, const char *result);

/* ---- recipient outcomes by who sends (bounded label values) ---- */

/* Counter families with one label each besides outcome, whose values are
 * fixed at start-up: the names registered with metrics_label_add(),
 * "other" for any value not registered and "none" for no value. So what
 * a message says can never add a series: each family has at most
 * (METRICS_LABELS_MAX + 2) x MET_OUT_LAST of them. */
typedef enum {
    MET_FAM_TENANT = 0, /* mailpump_recipients_by_tenant_total{tenant,outcome}: [metrics] tenants */
    MET_FAM_POOL,       /* mailpump_recipients_by_pool_total{pool,outcome}: the configured pools */
    MET_FAM_SOURCE,     /* mailpump_recipients_by_source_total{source,outcome}: the configured sources */
    MET_FAM_CAMPAIGN,   /* mailpump_recipients_by_campaign_total{campaign,outcome}: [metrics] campaigns */
    MET_FAM_SITE,       /* mailpump_recipients_by_site_total{site,outcome}: [metrics] sites */
    MET_FAM_LAST
} metrics_family_t;

/* The outcome label: the event names (docs/message-format.md), with
 * parked (deferred because its site was busy) and suppressed (not sent:
 * a shaping action or suppression decided so) apart. */
typedef enum {
    MET_OUT_DELIVERED = 0,
    MET_OUT_BOUNCED,
    MET_OUT_DEFERRED,
    MET_OUT_DEAD,
    MET_OUT_SUPPRESSED,
    MET_OUT_PARKED,
    MET_OUT_LAST
} metrics_outcome_t;

#define METRICS_LABELS_MAX 1024 /* registered values per family */

/* Register a label value of family f. Only before the workers start (the
 * counting path reads the values without a lock); a value already there,
 * "none", "other", an empty one and any past METRICS_LABELS_MAX are
 * ignored (a message naming those counts as other). */
void metrics_label_add(metrics_family_t f, const char *value);
/* Every name of a comma- or blank-separated list, as metrics_label_add()
 * ([metrics] tenants). Returns how many were added. */
size_t metrics_label_add_list(metrics_family_t f, const char *list);
/* One recipient outcome (metrics_outcome_t) for value: NULL counts as
 * none, a value not registered as other. Lock-free: a binary search over
 * the registered values and a relaxed atomic add. */
void metrics_count_labeled(metrics_family_t f, const char *value, int outcome_index);
/* What metrics_count_labeled() counted for value (NULL: none; "other"
 * and "none" name those series). */
uint64_t metrics_labeled(metrics_family_t f, const char *value, int outcome_index);
/* "delivered", "bounced", ...; NULL out of range. */
const char *metrics_outcome_name(int outcome_index);

typedef struct metrics_server metrics_server_t;
/* Parse [metrics] listen, "host:port" with a numeric IPv4 host or an
 * [IPv6] one, into *ss: 0, or -1 with err. The one parse of the key:
 * metrics_server_start() uses it, and so does the start-up check that
 * --check-config runs. */
int metrics_listen_parse(const char *listen, struct sockaddr_storage *ss, char *err, size_t errlen);
/* listen as metrics_listen_parse() takes it. NULL + err on failure. */
metrics_server_t *metrics_server_start(const char *listen, char *err, size_t errlen);
void metrics_server_stop(metrics_server_t *s);

#endif

/*
 * cli/stress_cmd.h - `mailpump stress`: publish N messages at a target
 * rate with publisher confirms, follow each one through the events
 * exchange to its final outcome, and report counts, rates and latencies.
 *
 * The pure parts below (percentiles, the token bucket, run-tagged ids,
 * event classification, the per-run tally and its report) do no I/O, keep
 * no global state and are exposed for tests/unit/test_stress.c.
 */
#ifndef MP_CLI_STRESS_CMD_H
#define MP_CLI_STRESS_CMD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/config.h"

/* argv[0] is "stress". Returns the process exit status: 0 every published
 * message reached an expected outcome, 1 something is missing, was not
 * published, or (without --allow-failures) bounced, was dead-lettered or
 * its Sent copy failed, 2 usage error. */
int  stress_cmd_main(const mp_config_t *cfg, int argc, char **argv);
void stress_cmd_usage(FILE *f);

/* ---- percentiles ---- */

typedef struct stress_pcts {
    size_t   n;
    uint64_t p50, p90, p99, max;
} stress_pcts_t;

/* Nearest rank: the value at rank ceil(p * n / 100) of n > 0 sorted
 * values, p in 1..100. */
uint64_t stress_percentile(const uint64_t *sorted, size_t n, unsigned p);
/* Sorts v in place and fills out; every field 0 when n == 0. */
void     stress_pcts_compute(uint64_t *v, size_t n, stress_pcts_t *out);

/* ---- rolling latencies: the samples of the last window_ms ---- */

typedef struct stress_window {
    uint64_t  window_ms;
    size_t    cap;   /* samples kept at most; the oldest make room */
    size_t    head;  /* next slot */
    size_t    n;
    uint64_t *at_ms; /* cap: when the sample was taken */
    uint64_t *val;   /* cap */
    uint64_t *tmp;   /* cap: scratch for the percentiles */
} stress_window_t;

void stress_window_init(stress_window_t *w, uint64_t window_ms, size_t cap);
void stress_window_free(stress_window_t *w);
/* A sample taken at at_ms (non-decreasing from one call to the next). */
void stress_window_add(stress_window_t *w, uint64_t at_ms, uint64_t val);
/* The percentiles of the samples taken in (now_ms - window_ms, now_ms]. */
void stress_window_pcts(stress_window_t *w, uint64_t now_ms, stress_pcts_t *out);

/* ---- token bucket ---- */

typedef struct stress_bucket {
    uint64_t rate;    /* tokens per second; 0 = unlimited */
    uint64_t cap;     /* capacity, in millionths of a token */
    uint64_t level;   /* millionths of a token */
    uint64_t last_us;
} stress_bucket_t;

/* Starts full: max(burst, 1) tokens. */
void     stress_bucket_init(stress_bucket_t *b, uint64_t rate, uint64_t burst, uint64_t now_us);
/* Take one token at now_us (a monotonic clock). Returns 0 when one was
 * taken, else the microseconds until one is there (nothing is taken). */
uint64_t stress_bucket_take(stress_bucket_t *b, uint64_t now_us);

/* ---- run-tagged message ids: "stress-<runid>-<n>", n = 1..count ---- */

#define STRESS_RUNID_LEN 12

/* 12 random lower-case hex digits. */
void stress_runid_new(char out[STRESS_RUNID_LEN + 1]);
void stress_id_format(char *out, size_t outlen, const char *runid, size_t n);
/* The index (n - 1) of this run's message with that id, or -1: another
 * run's, other traffic, n outside 1..count, or not the canonical form
 * (leading zero, sign, anything after the digits). */
long stress_id_match(const char *id, const char *runid, size_t count);

/* --tenants N: the tenant of message n (1..count), "t<(n - 1) % N>". */
void stress_tenant_format(char *out, size_t outlen, size_t tenants, size_t n);

/* ---- events (deliverer/worker.c publishes them, queue/event.c encodes) ---- */

typedef enum {
    STRESS_EV_OTHER = 0,
    STRESS_EV_DELIVERED,     /* per recipient, final */
    STRESS_EV_BOUNCED,       /* per recipient, final (5xx, DNS, retries used up) */
    STRESS_EV_DEFERRED,      /* per recipient, a retry follows: not final */
    STRESS_EV_DEAD,          /* per message, final */
    STRESS_EV_APPENDED,      /* per message: the Sent copy */
    STRESS_EV_APPEND_FAILED, /* per message, final: no retry_in_ms */
    STRESS_EV_APPEND_RETRY,  /* append_failed with retry_in_ms: retried alone */
    STRESS_EV_SUPPRESSED,    /* per recipient, final: on a suppression list, not sent */
    STRESS_EV_LAST
} stress_ev_t;

stress_ev_t stress_event_kind(const char *event, int has_retry_in);
/* An event's "ts", "2026-11-23T17:00:00.123Z", in ms since the epoch;
 * 0 when it is not exactly that form. */
uint64_t    stress_parse_ts(const char *ts);

/* ---- the tally of one run ---- */

typedef struct stress_run stress_run_t;

/* rcpts: the envelope recipients every message of the run has (copied).
 * want_append: a message with a delivered recipient is complete only once
 * its Sent copy is reported (appended or append_failed). */
stress_run_t *stress_run_new(const char *runid, size_t count, const char *const *rcpts,
                             size_t nrcpts, int want_append);
void          stress_run_free(stress_run_t *r);
/* The broker confirmed message idx at wall-clock time confirm_us. */
void          stress_run_confirmed(stress_run_t *r, size_t idx, uint64_t confirm_us);
/* One event body. recv_ms (wall clock) stands in for a missing "ts".
 * Returns 1 when it is this run's event and was counted, 0 when ignored
 * (other traffic, an unknown recipient or event), -1 when not JSON. */
int           stress_run_event(stress_run_t *r, const char *body, size_t len, uint64_t recv_ms);
/* Confirmed messages still without their final outcome. */
size_t        stress_run_missing(const stress_run_t *r);

/* ---- live progress (stderr) ---- */

typedef struct stress_progress {
    double        elapsed_s;  /* since the first publish */
    size_t        count;      /* --count */
    size_t        published;  /* confirmed */
    size_t        delivered, bounced, deferred; /* recipients; deferred: every retry */
    size_t        in_flight;  /* published, not complete */
    double        rate;       /* final recipient events (delivered + bounced) per s, last interval */
    double        avg_rate;   /* the same since the first publish */
    stress_pcts_t recent;     /* ms, confirm to final event, the last STRESS_RECENT_MS */
} stress_progress_t;

#define STRESS_RECENT_MS 5000

/* The counts so far; rate, avg_rate and elapsed_s are the caller's. now_ms:
 * wall clock, for the rolling percentiles. */
void stress_run_progress(stress_run_t *r, uint64_t now_ms, stress_progress_t *out);
/* One line, no newline:
 * "stress 12.0s published 340/500 delivered 300 bounced 10 deferred 2
 *  in_flight 30 rate 45.0/s avg 28.3/s p50 120ms p99 480ms"
 * (p50 -, p99 - without a final event in the window). */
void stress_progress_format(char *out, size_t outlen, const stress_progress_t *p);

#define STRESS_SHOWN 20
#define STRESS_REASONS 32 /* distinct (event, reason, reply code) counted; the rest: "other" */
#define STRESS_MAX_CELLS 10000000u          /* messages x recipients followed by one run */
#define STRESS_INFLIGHT_BYTES (2u << 20)     /* unconfirmed message bodies at most (one always goes) */

typedef struct stress_reason {
    char   event[12];  /* "bounced" or "deferred" */
    char   reason[32]; /* the event's reason tag, "other" without one */
    char   code[24];   /* "550 5.1.1", "421", "-" without an SMTP reply */
    size_t n;
} stress_reason_t;

typedef struct stress_report {
    char          run_id[STRESS_RUNID_LEN + 1];
    size_t        count, nrcpts;
    int           want_append;
    size_t        published;   /* confirmed by the broker */
    size_t        unpublished; /* refused (nack), unconfirmed or never sent */
    size_t        delivered, bounced, dead, retried, appended, append_failed;
    size_t        suppressed;  /* recipients: not sent, not a failure of the run */
    size_t        duplicates;  /* a second final event for a recipient or message */
    size_t        missing;
    double        publish_s;       /* first publish to last confirm */
    double        publish_rate;    /* published / publish_s */
    double        deliver_s;       /* first publish to the last delivered event */
    double        delivered_per_s; /* delivered / deliver_s */
    stress_pcts_t lat_delivered;   /* ms, confirm to delivered event, per recipient */
    stress_pcts_t lat_appended;    /* ms, confirm to appended event, per message */
    int           timed_out;
    double        failure_rate;    /* (bounced + dead) / recipients of the published messages */
    size_t        nreasons;        /* bounced, then deferred; by reason, then reply code */
    stress_reason_t reasons[STRESS_REASONS];
    size_t        nshown;          /* the first missing messages */
    struct {
        char id[64];
        char what[96];
    } shown[STRESS_SHOWN];
} stress_report_t;

/* start_us: wall clock of the first publish; last_confirm_us: of the last
 * confirm (0: none). */
void  stress_run_report(const stress_run_t *r, uint64_t start_us, uint64_t last_confirm_us,
                        stress_report_t *out);
/* One compact JSON object (malloc'd). */
char *stress_report_json(const stress_report_t *rep);
void  stress_report_print(FILE *f, const stress_report_t *rep);

#endif

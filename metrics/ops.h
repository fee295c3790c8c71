/*
 * metrics/ops.h - the metrics an operator asks for first: delivery
 * latency, message age and SMTP command time histograms, recipients by
 * outcome and reason, build information and the process's own figures.
 *
 * Everything a worker calls is lock-free and allocation-free: a bucket
 * search over a fixed array and relaxed atomic adds. The process figures
 * are read from /proc/self when /metrics is scraped, on libmicrohttpd's
 * thread. metrics_render() (metrics.h) appends all of it; the list of
 * names is docs/operations.md, "Metrics".
 */
#ifndef MP_METRICS_OPS_H
#define MP_METRICS_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"

/* The event a recipient ended an attempt with: the outcome label of
 * mailpump_recipients_total (docs/message-format.md's event names). */
typedef enum {
    MET_EV_DELIVERED = 0,
    MET_EV_BOUNCED,
    MET_EV_DEFERRED,
    MET_EV_SUPPRESSED,
    MET_EV_DEAD,
    MET_EV_LAST
} metrics_event_t;

/* The command label of mailpump_smtp_command_seconds: connect (TCP),
 * greeting, ehlo (or HELO), starttls, tls (the handshake), mail, rcpt,
 * data, dot (the final dot's reply), quit. */
typedef enum {
    MET_CMD_CONNECT = 0,
    MET_CMD_GREETING,
    MET_CMD_EHLO,
    MET_CMD_STARTTLS,
    MET_CMD_TLS,
    MET_CMD_MAIL,
    MET_CMD_RCPT,
    MET_CMD_DATA,
    MET_CMD_DOT,
    MET_CMD_QUIT,
    MET_CMD_LAST
} metrics_smtp_cmd_t;

#define METRICS_REASONS_MAX 32 /* reason tags; any index past them counts as "unknown" */

/* Name reason index i (deliverer/outcome.h's outcome_reason_t) for the
 * reason label. Only before the workers start; name must outlive the
 * process (a string literal). A reason never named counts as "unknown". */
void metrics_reason_name(int reason, const char *name);

/* One recipient event, where it is published: mailpump_recipients_total
 * {outcome,reason}. Final events (all but deferred) also observe
 * mailpump_delivery_latency_seconds{outcome} with latency_us (from when
 * the message was first enqueued), and a delivered one
 * mailpump_message_age_seconds with age_us (from its first consume). */
void metrics_recipient_event(metrics_event_t ev, int reason, uint64_t latency_us, uint64_t age_us);
/* What metrics_recipient_event() counted (reason past the named ones:
 * the "unknown" series). */
uint64_t metrics_recipients(metrics_event_t ev, int reason);

/* One SMTP command, from sent to its reply complete. */
void metrics_smtp_command(metrics_smtp_cmd_t cmd, uint64_t us);

/* The delivery latency of a recipient's final event now (wall clock ms):
 * from the AMQP timestamp (Unix s) or, without one, the first consume;
 * the first consume when it falls within the timestamp's second (the
 * finer clock); 0 when the start is in the future. */
uint64_t metrics_latency_us(uint64_t now_ms, uint64_t timestamp_s, uint64_t first_seen_ms);

/* ---- the process, from /proc ---- */

typedef struct {
    double   cpu_seconds;     /* utime + stime */
    double   start_time_s;    /* Unix time the process started */
    uint64_t virtual_bytes;
    uint64_t resident_bytes;
} metrics_proc_stat_t;

/* Parse the text of /proc/self/stat, with btime (Unix s the system booted,
 * /proc/stat's btime), clock ticks per second and the page size: 0, or
 * -1 when the text is not one. */
int metrics_proc_parse_stat(const char *text, uint64_t btime, long ticks, long page_size,
                            metrics_proc_stat_t *out);
/* The btime line of /proc/stat's text: 0, or -1 when there is none. */
int metrics_proc_parse_btime(const char *text, uint64_t *btime);

/* Append the families above (the process ones read now). */
void metrics_ops_render(buf_t *out);

#endif

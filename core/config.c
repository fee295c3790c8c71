/*
 * SUMMARY
 *  core/config.c - INI configuration with MAILPUMP_<SECTION>_<KEY> overrides.
 * DESCRIPTION
 *  One table lists every key with its type, the field it sets, its
 *  default and its description; the file parser, the environment
 *  overlay, the dump and the reference (docs/configuration.md) all walk
 *  it, so a new key is one entry here plus the field in config.h.
 */
#include "core/config.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/message.h"
#include "core/util.h"

typedef enum { K_STR, K_UINT, K_ULONG, K_MS, K_ENUM, K_SIZE } key_type_t;

/* A name of an enumerated key and the value it stands for; a name whose
 * value an earlier name already has is an alias (accepted, not listed). */
typedef struct enum_name {
    const char *name;
    int         value;
} enum_name_t;

typedef struct key_def {
    const char        *section;
    const char        *key;
    key_type_t         type;
    size_t             offset;
    const char        *defval;
    int                secret;
    const enum_name_t *names; /* K_ENUM: the allowed names, { NULL } last */
    const char        *desc;  /* one line for the reference: what it does, units, what empty or 0 means */
} key_def_t;

/* K_ENUM fields are stored as int */
_Static_assert(sizeof(mp_smtp_tls_t) == sizeof(int), "enum stored as int");
_Static_assert(sizeof(mp_imap_tls_t) == sizeof(int), "enum stored as int");
_Static_assert(sizeof(mp_log_level_t) == sizeof(int), "enum stored as int");
_Static_assert(sizeof(mp_log_format_t) == sizeof(int), "enum stored as int");

static const enum_name_t smtp_tls_names[] = {
    { "none", MP_SMTP_TLS_NONE },
    { "opportunistic", MP_SMTP_TLS_OPPORTUNISTIC },
    { "required", MP_SMTP_TLS_REQUIRED },
    { "verify", MP_SMTP_TLS_VERIFY },
    { NULL, 0 },
};
static const enum_name_t imap_tls_names[] = {
    { "imaps", MP_IMAP_TLS_IMAPS },
    { "starttls", MP_IMAP_TLS_STARTTLS },
    { "none", MP_IMAP_TLS_NONE },
    { NULL, 0 },
};
static const enum_name_t log_level_names[] = {
    { "error", MP_LOG_LEVEL_ERROR },
    { "warn", MP_LOG_LEVEL_WARN },
    { "info", MP_LOG_LEVEL_INFO },
    { "debug", MP_LOG_LEVEL_DEBUG },
    { "warning", MP_LOG_LEVEL_WARN },
    { NULL, 0 },
};
static const enum_name_t log_format_names[] = {
    { "logfmt", MP_LOG_FORMAT_LOGFMT },
    { "json", MP_LOG_FORMAT_JSON },
    { NULL, 0 },
};

static const enum_name_t sup_unavailable_names[] = {
    { "send", MP_SUP_UNAVAILABLE_SEND },
    { "defer", MP_SUP_UNAVAILABLE_DEFER },
    { NULL, 0 },
};
_Static_assert(sizeof(mp_sup_unavailable_t) == sizeof(int), "enum stored as int");

#define F(field) offsetof(mp_config_t, field)

static const key_def_t keys[] = {
    { "worker", "count", K_UINT, F(worker_count), "0", 0, NULL,
      "worker threads; 0 = one per CPU" },
    { "worker", "shutdown_grace_ms", K_UINT, F(worker_shutdown_grace_ms), "30000", 0, NULL,
      "milliseconds the workers get after SIGTERM/SIGINT to finish in-flight messages; what is "
      "unfinished then returns to the queue" },
    { "amqp", "host", K_STR, F(amqp_host), "127.0.0.1", 0, NULL,
      "RabbitMQ host" },
    { "amqp", "port", K_UINT, F(amqp_port), "5672", 0, NULL,
      "RabbitMQ port" },
    { "amqp", "user", K_STR, F(amqp_user), "guest", 0, NULL,
      "RabbitMQ user" },
    { "amqp", "password", K_STR, F(amqp_password), "guest", 1, NULL,
      "RabbitMQ password (masked by --check-config)" },
    { "amqp", "vhost", K_STR, F(amqp_vhost), "/", 0, NULL,
      "RabbitMQ virtual host" },
    { "amqp", "prefetch", K_UINT, F(amqp_prefetch), "0", 0, NULL,
      "unacknowledged messages per worker (1-65535); 0 = auto: twice the worker's session budget "
      "(`[smtp] pool_max_total`), at most 65535. What a worker really holds is bounded by bytes "
      "(`[message] inflight_memory`) and by its destinations' caps (`site_*`)" },
    { "amqp", "heartbeat", K_UINT, F(amqp_heartbeat), "30", 0, NULL,
      "AMQP heartbeat, seconds" },
    { "amqp", "queue", K_STR, F(amqp_queue), "mail.outbound", 0, NULL,
      "consumed queue (declared durable, x-max-priority 10)" },
    { "amqp", "dead_queue", K_STR, F(amqp_dead_queue), "mail.dead", 0, NULL,
      "queue for malformed, oversized and poison messages" },
    { "amqp", "events_exchange", K_STR, F(amqp_events_exchange), "mail.events", 0, NULL,
      "topic exchange the per-recipient events are published to" },
    { "amqp", "management_url", K_STR, F(amqp_management_url), "", 0, NULL,
      "RabbitMQ's management API, `http://host:port` (plain HTTP; [amqp] user and password): "
      "`mailpump queue` and GET /v1/queue read each queue's head message's age from it. "
      "Empty: ages only of the messages the workers hold" },
    { "dns", "servers", K_STR, F(dns_servers), "", 0, NULL,
      "`host:port,...` resolvers for MX/A/AAAA; empty = the system's" },
    { "dns", "timeout_ms", K_UINT, F(dns_timeout_ms), "2000", 0, NULL,
      "milliseconds per DNS try (> 0)" },
    { "dns", "tries", K_UINT, F(dns_tries), "2", 0, NULL,
      "DNS tries per query (> 0)" },
    { "dns", "l1_entries", K_UINT, F(dns_l1_entries), "10000", 0, NULL,
      "per-worker in-memory answer cache (LRU entries, > 0)" },
    { "dns", "max_ttl_s", K_UINT, F(dns_max_ttl_s), "3600", 0, NULL,
      "seconds a positive answer is cached at most (memory and Redis)" },
    { "dns", "negative_ttl_s", K_UINT, F(dns_negative_ttl_s), "900", 0, NULL,
      "seconds an NXDOMAIN/no-address answer is cached at most: the SOA minimum (RFC 2308), 60 s "
      "without SOA" },
    { "dns", "l2", K_UINT, F(dns_l2), "1", 0, NULL,
      "1: share answers in Redis across workers and pods (`[redis] host` must be set); 0: memory only" },
    { "smtp", "port", K_UINT, F(smtp_port), "25", 0, NULL,
      "destination port (1-65535)" },
    { "smtp", "helo_name", K_STR, F(smtp_helo_name), "", 0, NULL,
      "EHLO name: a host name or an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`), RFC 5321 "
      "section 4.1.3; empty = this host's name" },
    { "smtp", "tls", K_ENUM, F(smtp_tls), "opportunistic", 0, smtp_tls_names,
      "default TLS policy: `none`, `opportunistic` (STARTTLS when offered, no verification), `required`"
      " (no STARTTLS = deferred), `verify` (chain against `ca_file` and the MX host name)" },
    { "smtp", "ca_file", K_STR, F(smtp_ca_file), "", 0, NULL,
      "CA bundle for `verify`; empty = the system's" },
    { "smtp", "max_mx", K_UINT, F(smtp_max_mx), "5", 0, NULL,
      "MX hosts tried per attempt (> 0)" },
    { "smtp", "timeout_scale", K_UINT, F(smtp_timeout_scale), "100", 0, NULL,
      "percent of the RFC 5321 section 4.5.3.2 timeouts (> 0)" },
    { "smtp", "tls_policy", K_STR, F(smtp_tls_policy), "", 0, NULL,
      "per destination domain, overrides `tls`: `bank.example:verify, legacy.example:none, "
      ".corp.example:required` (`.d` also matches subdomains; the first matching entry applies, these "
      "before those of `tls_policy_file`); empty = none" },
    { "smtp", "tls_policy_file", K_STR, F(smtp_tls_policy_file), "", 0, NULL,
      "file of more `tls_policy` entries, one `domain:policy` per line (blank lines and lines starting "
      "with `#` ignored), read at start-up and appended after the inline entries (the first match "
      "wins); errors name file:line; empty = none" },
    { "smtp", "rate_limits", K_STR, F(smtp_rate_limits), "", 0, NULL,
      "messages per second, minute or hour per recipient domain, evenly spaced, kept in Redis for the "
      "whole fleet (per process without Redis): `gmail.com:100/s, .yahoo.com:20/s, example.org:5000/h`;"
      " empty = no limits; `rate_limits_file` entries follow these (the first matching rule applies)" },
    { "smtp", "rate_limits_file", K_STR, F(smtp_rate_limits_file), "", 0, NULL,
      "file of more `rate_limits` rules, one `domain:N/s|m|h` per line (blank lines and lines starting "
      "with `#` ignored), read at start-up and appended after the inline rules (the first match wins); "
      "errors name file:line; empty = none" },
    { "smtp", "rate_limit_max_wait", K_MS, F(smtp_rate_limit_max_wait_ms), "10s", 0, NULL,
      "a message whose rate-limit slot is at most this far away waits for it; a later slot defers the "
      "domain's recipients (`rate_limited`) without spending an attempt" },
    { "smtp", "max_rcpts", K_UINT, F(smtp_max_rcpts), "100", 0, NULL,
      "recipients per transaction; more are split over transactions on one connection" },
    { "smtp", "pipelining", K_UINT, F(smtp_pipelining), "1", 0, NULL,
      "1: use PIPELINING when offered; 0: lock-step" },
    { "smtp", "pool", K_UINT, F(smtp_pool), "1", 0, NULL,
      "1: keep connections open for the next messages to the same destination; 0: one connection per "
      "message" },
    { "smtp", "pool_max_msgs", K_UINT, F(smtp_pool_max_msgs), "100", 0, NULL,
      "messages per pooled connection" },
    { "smtp", "pool_max_age_ms", K_UINT, F(smtp_pool_max_age_ms), "300000", 0, NULL,
      "milliseconds a pooled connection lives" },
    { "smtp", "pool_idle_ms", K_UINT, F(smtp_pool_idle_ms), "5000", 0, NULL,
      "milliseconds of idleness before a pooled connection is QUIT" },
    { "smtp", "pool_max_per_dest", K_UINT, F(smtp_pool_max_per_dest), "20", 0, NULL,
      "connections per destination (address, port, policy, MX name, EHLO name, AUTH user); more "
      "messages wait" },
    { "smtp", "pool_initial_per_dest", K_UINT, F(smtp_pool_initial_per_dest), "1", 0, NULL,
      "slow start: connections to a destination until one transaction completed there" },
    { "smtp", "pool_max_total", K_UINT, F(smtp_pool_max_total), "0", 0, NULL,
      "connections per worker (the session budget); idle ones of other destinations are closed to make "
      "room; 0 = auto: an eighth of the cgroup memory limit (else of RAM) per worker at 64 KiB a "
      "session, within the descriptors the process may open (its soft limit is raised to the hard one), "
      "100 to 10000" },
    { "smtp", "pool_refused_backoff", K_MS, F(smtp_pool_refused_backoff_ms), "60s", 0, NULL,
      "a destination that answers a new connection with a 4xx greeting while others are open is capped "
      "at those for this long; 0 disables" },
    { "smtp", "site_isolation", K_UINT, F(smtp_site_isolation), "1", 0, NULL,
      "1: cap each destination site (the registrable domain of its MX hosts, e.g. google.com for "
      "*.google.com) at its connection limit and its waiting messages, parking the rest; 0: no site caps" },
    { "smtp", "site_max_connections", K_UINT, F(smtp_site_max_connections), "100", 0, NULL,
      "connections to one site at once for the whole fleet (shared through Redis leases; without Redis "
      "a per-process share); 0 = no limit" },
    { "smtp", "site_limits", K_STR, F(smtp_site_limits), "", 0, NULL,
      "per-site connection limits overriding site_max_connections: `SITE=N ...`, e.g. "
      "`google.com=400 outlook.com=200`" },
    { "smtp", "site_max_waiting", K_UINT, F(smtp_site_max_waiting), "500", 0, NULL,
      "messages (domain legs) one worker lets wait for a busy site; more are parked to the delay "
      "queues without spending an attempt" },
    { "smtp", "site_max_wait", K_MS, F(smtp_site_max_wait_ms), "30s", 0, NULL,
      "a message waits this long for a place in its busy site, then is parked (no attempt spent)" },
    { "smtp", "site_lease_ttl", K_MS, F(smtp_site_lease_ttl_ms), "15s", 0, NULL,
      "a worker's claim on a site's connections (a lease in Redis) expires this long after its last "
      "renewal, so a killed pod's share returns to the others" },
    { "smtp", "site_lease_renew", K_MS, F(smtp_site_lease_renew_ms), "1s", 0, NULL,
      "how often each worker renews its leases (one EVAL for all its sites); a change of what a site "
      "may have reaches every worker within about two of these" },
    { "smtp", "tls_cache_size", K_UINT, F(smtp_tls_cache_size), "1024", 0, NULL,
      "TLS sessions kept per worker for resumption (0 = 1024)" },
    { "smtp", "route_penalty", K_MS, F(smtp_route_penalty_ms), "1s", 0, NULL,
      "an MX address whose connection failed at connect or greeting time is skipped by every worker for"
      " this long, doubling per failure in a row; 0 disables" },
    { "smtp", "route_penalty_max", K_MS, F(smtp_route_penalty_max_ms), "5m", 0, NULL,
      "the route penalty's doubling stops here" },
    { "smtp", "relay", K_STR, F(smtp_relay), "", 0, NULL,
      "`host[:port]`: smarthost mode, every message goes there instead of MX; empty = MX delivery" },
    { "smtp", "relay_user", K_STR, F(smtp_relay_user), "", 0, NULL,
      "AUTH PLAIN (or LOGIN) user for the relay, only sent inside TLS whose certificate and name are"
      " verified (`tls = verify`, see relay_auth_unverified); empty = no AUTH" },
    { "smtp", "relay_password", K_STR, F(smtp_relay_password), "", 1, NULL,
      "AUTH password for the relay (masked by --check-config)" },
    { "smtp", "relay_auth_unverified", K_UINT, F(smtp_relay_auth_unverified), "0", 0, NULL,
      "1 = send the relay password even when the relay's certificate is not verified (`tls` other than"
      " `verify`, or a `tls_policy` entry other than `verify`); 0 = refuse such a configuration at start-up" },
    { "smtp", "timeout_connect_ms", K_UINT, F(smtp_timeout_connect_ms), "0", 0, NULL,
      "milliseconds for the TCP connect; 0 = the scaled default (30 s)" },
    { "smtp", "timeout_greeting_ms", K_UINT, F(smtp_timeout_greeting_ms), "0", 0, NULL,
      "milliseconds for the whole greeting, from the connect (a deadline: bytes trickling in do not "
      "extend it); 0 = the scaled RFC value (300 s)" },
    { "smtp", "timeout_helo_ms", K_UINT, F(smtp_timeout_helo_ms), "0", 0, NULL,
      "milliseconds for the whole reply to EHLO/HELO and to each AUTH step (a deadline); 0 = the scaled "
      "RFC value (300 s)" },
    { "smtp", "timeout_starttls_ms", K_UINT, F(smtp_timeout_starttls_ms), "0", 0, NULL,
      "milliseconds for STARTTLS's reply and the TLS handshake together (a deadline); 0 = the scaled "
      "default (300 s)" },
    { "smtp", "timeout_mail_ms", K_UINT, F(smtp_timeout_mail_ms), "0", 0, NULL,
      "milliseconds for the whole reply to MAIL FROM (a deadline); 0 = the scaled RFC value (300 s)" },
    { "smtp", "timeout_rcpt_ms", K_UINT, F(smtp_timeout_rcpt_ms), "0", 0, NULL,
      "milliseconds for the whole reply to each RCPT TO (a deadline; pipelined, from the end of the "
      "reply before it); 0 = the scaled RFC value (300 s)" },
    { "smtp", "timeout_data_init_ms", K_UINT, F(smtp_timeout_data_init_ms), "0", 0, NULL,
      "milliseconds for DATA's 354 (a deadline); 0 = the scaled RFC value (120 s)" },
    { "smtp", "timeout_data_block_ms", K_UINT, F(smtp_timeout_data_block_ms), "0", 0, NULL,
      "milliseconds of inactivity while the body is written (each byte that moves restarts it; the "
      "transaction deadline bounds the whole); 0 = the scaled RFC value (180 s)" },
    { "smtp", "timeout_data_done_ms", K_UINT, F(smtp_timeout_data_done_ms), "0", 0, NULL,
      "milliseconds for the whole reply to the final dot, from the dot (a deadline); 0 = the scaled RFC "
      "value (600 s)" },
    { "smtp", "timeout_rset_ms", K_UINT, F(smtp_timeout_rset_ms), "0", 0, NULL,
      "milliseconds for the whole reply to RSET (a deadline); 0 = the scaled default (20 s)" },
    { "smtp", "timeout_quit_ms", K_UINT, F(smtp_timeout_quit_ms), "0", 0, NULL,
      "milliseconds waiting for QUIT's 221; 0 = the scaled default (10 s)" },
    { "smtp", "timeout_transaction_ms", K_UINT, F(smtp_timeout_transaction_ms), "0", 0, NULL,
      "milliseconds for a whole transaction, from MAIL FROM to its final reply, body included; past it "
      "the session ends as a timeout (`transaction deadline exceeded while ...`); 0 = the scaled "
      "default (1,800,000 = 30 min)" },
    { "smtp", "reply_lines_burst", K_UINT, F(smtp_reply_lines_burst), "100", 0, NULL,
      "lines one reply may have at once; with `reply_lines_per_s` more per second spent waiting for it;"
      " one more ends the session as a protocol error (`reply flood`), closed without QUIT; 0 = no cap" },
    { "smtp", "reply_lines_per_s", K_UINT, F(smtp_reply_lines_per_s), "10", 0, NULL,
      "lines a reply may grow by per second of waiting for it, beyond `reply_lines_burst`" },
    { "egress", "file", K_STR, F(egress_file), "", 0, NULL,
      "egress sources (local addresses to connect from, each with its EHLO name), weighted pools of "
      "them, tenant-to-pool mappings and the default pool, read at start-up (docs/egress-and-shaping.md);"
      " empty = no sources: connect from the host's default address" },
    { "shaping", "file", K_STR, F(shaping_file), "", 0, NULL,
      "traffic shaping per MX site or recipient domain (connection limits, rates, messages per "
      "connection, timeouts, TLS; optionally per source or pool) and automation rules on replies, read "
      "at start-up (docs/egress-and-shaping.md); empty = no rules" },
    { "imap", "host", K_STR, F(imap_host), "", 0, NULL,
      "IMAP server for Sent copies; empty disables appends (else `accounts_file` must be set)" },
    { "imap", "port", K_UINT, F(imap_port), "993", 0, NULL,
      "IMAP port (1-65535)" },
    { "imap", "tls", K_ENUM, F(imap_tls), "imaps", 0, imap_tls_names,
      "`imaps` (TLS from the first byte), `starttls` or `none` (plaintext: tests and trusted loopback "
      "only)" },
    { "imap", "ca_file", K_STR, F(imap_ca_file), "", 0, NULL,
      "CA bundle for the IMAP server (certificate and name are always verified); empty = the system's" },
    { "imap", "accounts_file", K_STR, F(imap_accounts_file), "", 0, NULL,
      "lines `sender-address login password`, fields separated by blanks; a field may be "
      "double-quoted (`\"pass word\"`, with `\\\"` and `\\\\` inside) and `#` inside a field is "
      "part of it; comments are lines starting with `#` and a `#` field after the three; a sender "
      "given twice is an error; mount it from a Secret" },
    { "imap", "timeout_ms", K_UINT, F(imap_timeout_ms), "30000", 0, NULL,
      "milliseconds per IMAP command" },
    { "imap", "pool", K_UINT, F(imap_pool), "1", 0, NULL,
      "1: per-worker sessions per account, reused for APPEND; 0: one IMAP session per Sent copy" },
    { "imap", "pool_max_appends", K_UINT, F(imap_pool_max_appends), "100", 0, NULL,
      "appends per pooled IMAP session" },
    { "imap", "pool_idle_ms", K_UINT, F(imap_pool_idle_ms), "10000", 0, NULL,
      "milliseconds of idleness before a pooled IMAP session is logged out" },
    { "imap", "pool_max_connections", K_UINT, F(imap_pool_max_connections), "2", 0, NULL,
      "IMAP connections per account and worker at once; further Sent copies queue for one (keep workers"
      " x this under the server's per-user limit)" },
    { "imap", "pool_max_batch", K_UINT, F(imap_pool_max_batch), "16", 0, NULL,
      "queued Sent copies of one account sent in one MULTIAPPEND (RFC 3502), at most 64 and 8 MB per "
      "APPEND; 1 = one copy per APPEND" },
    { "redis", "host", K_STR, F(redis_host), "", 0, NULL,
      "Redis for the delivery ledger, the shared DNS cache and rate limits; empty disables them" },
    { "redis", "port", K_UINT, F(redis_port), "6379", 0, NULL,
      "Redis port" },
    { "redis", "timeout_ms", K_UINT, F(redis_timeout_ms), "250", 0, NULL,
      "milliseconds per Redis command, from when it is written; a slower Redis counts as unavailable "
      "for that call. A burst of 10,000 ledger marks takes Redis about 50 ms (tests/bench/run ledger)" },
    { "redis", "mark_wait", K_MS, F(redis_mark_wait_ms), "2s", 0, NULL,
      "how long a transaction's final dot waits for its ledger \"sending\" mark, retrying while Redis "
      "cannot answer (the body is already on its way); then see `send_unrecorded`" },
    { "redis", "send_unrecorded", K_UINT, F(redis_send_unrecorded), "0", 0, NULL,
      "0: a transaction whose \"sending\" mark could not be recorded within `mark_wait` is abandoned "
      "before its final dot and its recipients deferred (`ledger_unavailable`), so no copy ever goes "
      "unrecorded; 1: the dot goes anyway (at-least-once: a worker killed in that window causes a "
      "duplicate nobody flags)" },
    { "suppression", "enabled", K_UINT, F(suppression_enabled), "1", 0, NULL,
      "1: recipients on the global suppression list or their message's tenant's are not sent (a "
      "`suppressed` event); needs `[redis] host`, else off. 0: no check, no automatic adds" },
    { "suppression", "auto_reasons", K_STR, F(suppression_auto_reasons), "no_such_user", 0, NULL,
      "reason tags (deliverer/outcome.c) of permanent bounces whose recipient is added to its tenant's "
      "list (the global one without a tenant), comma-separated; empty: nothing is added automatically" },
    { "suppression", "when_unavailable", K_ENUM, F(suppression_when_unavailable), "send", 0,
      sup_unavailable_names,
      "while Redis cannot answer the check: `send` (fail open, counted in "
      "`mailpump_suppression_unavailable_total`) or `defer` (deferred `suppression_unavailable`, no attempt spent)" },
    { "suppression", "auto_ttl", K_UINT, F(suppression_auto_ttl), "0", 0, NULL,
      "seconds an automatically added entry suppresses its recipient; 0: until an operator removes it" },
    { "trace", "enabled", K_UINT, F(trace_enabled), "1", 0, NULL,
      "1: record each message's history in Redis (`mp:h:<id>`, one write per attempt) for `mailpump trace`; "
      "0: none. Needs [redis] host" },
    { "trace", "ttl", K_MS, F(trace_ttl_ms), "7d", 0, NULL,
      "how long a message's history is kept after its last attempt (about 400 bytes of Redis memory per "
      "record, 0.9 KB for a message delivered to one recipient at once: "
      "docs/operations.md, \"Tracing a message\")" },
    { "trace", "max_records", K_UINT, F(trace_max_records), "1000", 0, NULL,
      "records kept per message, the newest (an attempt writes one record plus one per recipient and Sent "
      "copy, at most this many: its record counts the rest as `omitted`); at least 1" },
    { "metrics", "listen", K_STR, F(metrics_listen), "127.0.0.1:9464", 0, NULL,
      "`host:port` of the HTTP metrics endpoint; empty disables it" },
    { "metrics", "stuck_after", K_MS, F(metrics_stuck_after_ms), "30s", 0, NULL,
      "/healthz answers 503 (naming the worker) when a running worker's event loop has not stamped "
      "its once-a-second heartbeat for this long: a thread stuck in a callback or a blocking call; "
      "0 = off (200 while the HTTP thread answers)" },
    { "metrics", "tenants", K_STR, F(metrics_tenants), "", 0, NULL,
      "tenants counted by name in `mailpump_recipients_by_tenant_total`, comma- or blank-separated, at "
      "most 256 (each 1-64 letters, digits, `.`, `_`, `-`); any other tenant counts as `other`, a "
      "message without one as `none`" },
    { "metrics", "campaigns", K_STR, F(metrics_campaigns), "", 0, NULL,
      "campaigns counted by name in `mailpump_recipients_by_campaign_total`, comma- or blank-separated, "
      "at most 256; any other campaign counts as `other`, a message without one as `none`" },
    { "metrics", "sites", K_STR, F(metrics_sites), "google.com outlook.com yahoodns.net icloud.com", 0,
      NULL,
      "destination sites (an MX host's registrable domain: `google.com` for every `*.google.com` MX) counted "
      "by name in `mailpump_recipients_by_site_total`, comma- or blank-separated, at most 256; any other "
      "site counts as `other`" },
    { "api", "listen", K_STR, F(api_listen), "", 0, NULL,
      "`host:port` of the HTTP API (docs/http-api.md), like [metrics] listen; empty disables it" },
    { "api", "tokens_file", K_STR, F(api_tokens_file), "", 0, NULL,
      "file of bearer tokens, one a line: `NAME:TOKEN` or a bare `TOKEN` (at least 16 characters); "
      "required when `listen` is set; re-read when it changes" },
    { "api", "tls_cert", K_STR, F(api_tls_cert), "", 0, NULL,
      "PEM certificate (chain) the API serves HTTPS with; set both or neither of `tls_cert` and "
      "`tls_key`; empty: plain HTTP" },
    { "api", "tls_key", K_STR, F(api_tls_key), "", 0, NULL,
      "PEM private key of `tls_cert`" },
    { "api", "max_body", K_SIZE, F(api_max_body), "10MiB", 0, NULL,
      "bytes of a request body; a larger one is answered 413 without being buffered" },
    { "api", "timeout", K_MS, F(api_timeout_ms), "30s", 0, NULL,
      "inactivity after which an API connection is closed (whole seconds, at least 1 s)" },
    { "api", "max_connections", K_UINT, F(api_max_connections), "256", 0, NULL,
      "API connections open at once; more are refused" },
    { "api", "threads", K_UINT, F(api_threads), "4", 0, NULL,
      "threads serving API requests (each may block on Redis or the broker), 1 to 64" },
    { "api", "max_batch", K_UINT, F(api_max_batch), "1000", 0, NULL,
      "messages one `POST /v1/messages` may carry, 1 to 100000" },
    { "api", "publish_timeout", K_MS, F(api_publish_timeout_ms), "10s", 0, NULL,
      "how long `POST /v1/messages` waits for the broker to confirm its messages before it answers 503" },
    { "log", "level", K_ENUM, F(log_level), "info", 0, log_level_names,
      "least severe level logged (`warning` is also accepted for `warn`)" },
    { "log", "format", K_ENUM, F(log_format), "logfmt", 0, log_format_names,
      "`logfmt`, or `json` (one object per line)" },
    { "retry", "levels", K_STR, F(retry_levels), "30s,1m,2m,5m,10m,20m,40m,1h,2h,4h,8h,16h", 0, NULL,
      "ascending delays of the delay queues `<queue_prefix>.<level>`" },
    { "retry", "queue_prefix", K_STR, F(retry_queue_prefix), "mail.retry", 0, NULL,
      "name prefix of the delay queues" },
    { "retry", "poison_redeliveries", K_UINT, F(retry_poison_redeliveries), "5", 0, NULL,
      "attempts of a message that crashed a worker (by a signal, while its code ran) or could not be "
      "finished (a publish failed) before it is dead-lettered; kill -9 never counts; 0: never" },
    { "retry", "p0_base", K_MS, F(retry_base_ms[0]), "30s", 0, NULL,
      "first retry delay of priority class P0 (priority 8-10); doubles per attempt, +-15 % jitter" },
    { "retry", "p1_base", K_MS, F(retry_base_ms[1]), "1m", 0, NULL,
      "first retry delay of priority class P1 (priority 4-7); doubles per attempt, +-15 % jitter" },
    { "retry", "p2_base", K_MS, F(retry_base_ms[2]), "5m", 0, NULL,
      "first retry delay of priority class P2 (priority 0-3); doubles per attempt, +-15 % jitter" },
    { "retry", "p0_max_age", K_MS, F(retry_max_age_ms[0]), "5d", 0, NULL,
      "P0: after this the remaining recipients bounce" },
    { "retry", "p1_max_age", K_MS, F(retry_max_age_ms[1]), "3d", 0, NULL,
      "P1: after this the remaining recipients bounce" },
    { "retry", "p2_max_age", K_MS, F(retry_max_age_ms[2]), "1d", 0, NULL,
      "P2: after this the remaining recipients bounce" },
    { "retry", "p0_max_attempts", K_UINT, F(retry_max_attempts[0]), "40", 0, NULL,
      "P0: attempts before the remaining recipients bounce" },
    { "retry", "p1_max_attempts", K_UINT, F(retry_max_attempts[1]), "25", 0, NULL,
      "P1: attempts before the remaining recipients bounce" },
    { "retry", "p2_max_attempts", K_UINT, F(retry_max_attempts[2]), "12", 0, NULL,
      "P2: attempts before the remaining recipients bounce" },
    { "retry", "p0_fast_retries", K_UINT, F(retry_fast_retries[0]), "5", 0, NULL,
      "P0: immediate retries of a refused/reset connection or timeout within one attempt" },
    { "retry", "p1_fast_retries", K_UINT, F(retry_fast_retries[1]), "3", 0, NULL,
      "P1: immediate retries of a refused/reset connection or timeout within one attempt" },
    { "retry", "p2_fast_retries", K_UINT, F(retry_fast_retries[2]), "1", 0, NULL,
      "P2: immediate retries of a refused/reset connection or timeout within one attempt" },
    { "retry", "p0_fast_base", K_MS, F(retry_fast_base_ms[0]), "50ms", 0, NULL,
      "P0: fast retry delay base x 2^n, capped at 3 s, +-15 % jitter" },
    { "retry", "p1_fast_base", K_MS, F(retry_fast_base_ms[1]), "200ms", 0, NULL,
      "P1: fast retry delay base x 2^n, capped at 3 s, +-15 % jitter" },
    { "retry", "p2_fast_base", K_MS, F(retry_fast_base_ms[2]), "1s", 0, NULL,
      "P2: fast retry delay base x 2^n, capped at 3 s, +-15 % jitter" },
    { "message", "max_size", K_ULONG, F(message_max_size), "26214400", 0, NULL,
      "bytes; larger built messages are dead-lettered, and so is a body announced above 2 x max_size "
      "+ 64 KiB (JSON escaping and base64 can each double the content) without being read: only its "
      "first 64 KiB are kept for the dead letter" },
    { "message", "max_recipients", K_UINT, F(message_max_recipients), "10000", 0, NULL,
      "recipients (to + cc + bcc) one message may name, 1 to 100000; more are dead-lettered" },
    { "message", "inflight_memory", K_SIZE, F(message_inflight_memory), "auto", 0, NULL,
      "bytes of message bodies in flight per worker (each charged 3 x its announced size from its "
      "content header until its job ends); at this the worker pauses its consumer, below 3/4 of it "
      "resumes; auto (or 0) = a quarter of the cgroup memory limit (else of physical RAM) divided "
      "among the workers; at least 2 x max_size + 64 KiB" },
    { "dkim", "keys_file", K_STR, F(dkim_keys_file), "", 0, NULL,
      "lines `domain selector rsa-sha256|ed25519-sha256 key.pem`; empty = no signing" },
    { "dkim", "headers", K_STR, F(dkim_headers),
      "from:to:cc:subject:date:message-id:mime-version:content-type:content-transfer-encoding:"
      "reply-to:in-reply-to:references:list-id:list-unsubscribe:list-unsubscribe-post", 0, NULL,
      "colon-separated header fields to sign (must include `from`)" },
};
#define NKEYS (sizeof(keys) / sizeof(keys[0]))

static int enum_value(const enum_name_t *names, const char *v)
{
    for (const enum_name_t *n = names; n->name; n++)
        if (strcmp(v, n->name) == 0)
            return n->value;
    return -1;
}

/* The names of an enum key joined by sep, aliases left out. */
static void enum_list(const enum_name_t *names, const char *sep, char *out, size_t outlen)
{
    size_t len = 0;
    out[0] = '\0';
    for (const enum_name_t *n = names; n->name; n++) {
        int alias = 0;
        for (const enum_name_t *m = names; m < n; m++)
            if (m->value == n->value)
                alias = 1;
        if (alias)
            continue;
        int w = snprintf(out + len, outlen - len, "%s%s", len ? sep : "", n->name);
        if (w < 0 || (size_t)w >= outlen - len)
            return;
        len += (size_t)w;
    }
}

static int set_value(mp_config_t *cfg, const key_def_t *k, const char *v, char *err, size_t errlen)
{
    char *base = (char *)cfg + k->offset;
    if (k->type == K_ENUM) {
        int e = enum_value(k->names, v);
        if (e < 0) {
            char allowed[256];
            enum_list(k->names, ", ", allowed, sizeof(allowed));
            snprintf(err, errlen, "[%s] %s: \"%s\" is not one of %s", k->section, k->key, v, allowed);
            return -1;
        }
        *(int *)base = e;
        return 0;
    }
    if (k->type == K_STR) {
        char **p = (char **)base;
        free(*p);
        *p = xstrdup(v);
        return 0;
    }
    if (k->type == K_SIZE) {
        uint64_t n;
        if (config_parse_size(v, &n) < 0) {
            snprintf(err, errlen, "[%s] %s: expected a size like 512MiB, 2GiB, 65536 or auto; got \"%s\"",
                     k->section, k->key, v);
            return -1;
        }
        *(unsigned long *)base = (unsigned long)n;
        return 0;
    }
    if (k->type == K_MS) {
        uint64_t ms;
        if (config_parse_duration(v, &ms) < 0) {
            snprintf(err, errlen, "[%s] %s: expected a duration like 250ms, 30s, 5m, 2h, 1d; got \"%s\"",
                     k->section, k->key, v);
            return -1;
        }
        *(uint64_t *)base = ms;
        return 0;
    }
    char *end;
    errno = 0;
    while (isspace((unsigned char)*v))
        v++;
    if (*v == '-' || *v == '\0') {
        snprintf(err, errlen, "[%s] %s: expected a non-negative number, got \"%s\"", k->section,
                 k->key, v);
        return -1;
    }
    unsigned long n = strtoul(v, &end, 10);
    if (errno || *end != '\0' || (k->type == K_UINT && n > 0xffffffffUL)) {
        snprintf(err, errlen, "[%s] %s: expected a non-negative number, got \"%s\"", k->section,
                 k->key, v);
        return -1;
    }
    if (k->type == K_UINT)
        *(unsigned *)base = (unsigned)n;
    else
        *(unsigned long *)base = n;
    return 0;
}

typedef struct unit {
    const char *name;
    uint64_t    mult;
} unit_t;

/* A decimal number followed (after optional blanks) by one of units (""
 * among them for a bare number), compared case-insensitively when
 * nocase; 0 and *out, or -1. */
static int parse_scaled(const char *s, const unit_t *units, size_t nunits, int nocase, uint64_t *out)
{
    while (isspace((unsigned char)*s))
        s++;
    if (!isdigit((unsigned char)*s))
        return -1;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno)
        return -1;
    while (isspace((unsigned char)*end))
        end++;
    for (size_t i = 0; i < nunits; i++) {
        if ((nocase ? strcasecmp(end, units[i].name) : strcmp(end, units[i].name)) == 0) {
            if (n > UINT64_MAX / units[i].mult)
                return -1;
            *out = n * units[i].mult;
            return 0;
        }
    }
    return -1;
}

int config_parse_duration(const char *s, uint64_t *ms)
{
    static const unit_t units[] = {
        { "", 1 }, { "ms", 1 }, { "s", 1000 }, { "m", 60000 }, { "h", 3600000 }, { "d", 86400000 },
    };
    return parse_scaled(s, units, sizeof(units) / sizeof(units[0]), 0, ms);
}

int config_parse_size(const char *s, uint64_t *bytes)
{
    static const unit_t units[] = {
        { "", 1 }, { "b", 1 }, { "k", 1ULL << 10 }, { "kib", 1ULL << 10 }, { "m", 1ULL << 20 },
        { "mib", 1ULL << 20 }, { "g", 1ULL << 30 }, { "gib", 1ULL << 30 }, { "t", 1ULL << 40 },
        { "tib", 1ULL << 40 },
    };
    const char *t = s;
    while (isspace((unsigned char)*t))
        t++;
    if (strcasecmp(t, "auto") == 0) {
        *bytes = 0;
        return 0;
    }
    return parse_scaled(t, units, sizeof(units) / sizeof(units[0]), 1, bytes);
}

void config_format_size(uint64_t bytes, char *out, size_t outlen)
{
    static const struct { const char *unit; uint64_t mult; } units[] = {
        { "TiB", 1ULL << 40 }, { "GiB", 1ULL << 30 }, { "MiB", 1ULL << 20 }, { "KiB", 1ULL << 10 },
    };
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (bytes >= units[i].mult && bytes % units[i].mult == 0) {
            snprintf(out, outlen, "%llu %s", (unsigned long long)(bytes / units[i].mult), units[i].unit);
            return;
        }
    }
    snprintf(out, outlen, "%llu bytes", (unsigned long long)bytes);
}

void config_format_duration(uint64_t ms, char *out, size_t outlen)
{
    static const struct { const char *unit; uint64_t mult; } units[] = {
        { "d", 86400000 }, { "h", 3600000 }, { "m", 60000 }, { "s", 1000 },
    };
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (ms >= units[i].mult && ms % units[i].mult == 0) {
            snprintf(out, outlen, "%llu%s", (unsigned long long)(ms / units[i].mult), units[i].unit);
            return;
        }
    }
    snprintf(out, outlen, "%llums", (unsigned long long)ms);
}

static const key_def_t *find_key(const char *section, const char *key)
{
    for (size_t i = 0; i < NKEYS; i++)
        if (strcasecmp(keys[i].section, section) == 0 && strcasecmp(keys[i].key, key) == 0)
            return &keys[i];
    return NULL;
}

void config_defaults(mp_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    char err[64];
    for (size_t i = 0; i < NKEYS; i++)
        set_value(cfg, &keys[i], keys[i].defval, err, sizeof(err));
}

void config_free(mp_config_t *cfg)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (keys[i].type == K_STR) {
            char **p = (char **)((char *)cfg + keys[i].offset);
            free(*p);
            *p = NULL;
        }
    }
}

/* MAILPUMP_<SECTION>_<KEY> */
static void env_name(const key_def_t *k, char *name, size_t len)
{
    snprintf(name, len, "MAILPUMP_%s_%s", k->section, k->key);
    for (char *c = name; *c; c++)
        *c = (char)toupper((unsigned char)*c);
}

/* ---- the file ----
 *
 * Our own line reader rather than libinih: Debian's build of libinih reads
 * at most 200 bytes per line and parses the rest of a longer line as the
 * next line (a long tls_policy lost its tail, or became "unknown key"),
 * treats an indented line as a continuation that replaces the value before
 * it, and hands a key given twice to the caller as if it were new. How a
 * line is read depended on how the library was built; here it is one
 * page of code with no limits:
 *
 *  - lines of any length (getline); a UTF-8 byte order mark is skipped;
 *  - blank lines, and lines whose first non-blank character is ';' or '#',
 *    are comments;
 *  - "[section]", optionally followed by a comment;
 *  - "key = value" (or "key: value"; the first '=' or ':' separates), the
 *    value trimmed of surrounding blanks and taken as written: quotes are
 *    part of it, '#' is part of it, and so is a ';' that follows a
 *    non-blank character ("pa;ss" stays "pa;ss"). A ';' after a blank
 *    starts an inline comment ("port = 25 ; smtp" is 25), as libinih did.
 *    That cut would silently shorten a secret ("pa ;ss"), so on a secret
 *    key it is an error: comment on a line of its own, or set the secret
 *    through its environment variable, which is taken verbatim;
 *  - a key given twice is an error naming both lines;
 *  - an indented line after a key (libinih's continuation line) is an
 *    error: a value is one line, long maps have a <key>_file form.
 */
typedef struct parse_ctx {
    mp_config_t     *cfg;
    const char      *path;
    char            *err;
    size_t           errlen;
    int              lineno;
    char            *section;      /* the current [section], NULL before the first */
    const key_def_t *prev;         /* the last key of this section: an indented line follows it */
    int              line_of[NKEYS]; /* the line each key was set on, 0 = not in the file */
} parse_ctx_t;

static int parse_error(parse_ctx_t *pc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int parse_error(parse_ctx_t *pc, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(pc->err, pc->errlen, "%s:%d: %s", pc->path, pc->lineno, msg);
    return -1;
}


/* The first of chars in s, or the ';' of an inline comment (after a
 * blank), or the end of s: libinih's find_chars_or_comment(). */
static char *find_or_comment(char *s, const char *chars)
{
    int was_blank = 0;
    for (; *s; s++) {
        if ((chars && strchr(chars, *s)) || (was_blank && *s == ';'))
            break;
        was_blank = util_is_blank(*s);
    }
    return s;
}

static int parse_line(parse_ctx_t *pc, char *line)
{
    if (pc->lineno == 1 && strncmp(line, "\xef\xbb\xbf", 3) == 0)
        line += 3;
    int indented = line[0] == ' ' || line[0] == '\t';
    char *s = util_trim(line);
    if (*s == '\0' || *s == ';' || *s == '#')
        return 0;
    if (indented && pc->prev) {
        char file_key[96];
        snprintf(file_key, sizeof(file_key), "%s_file", pc->prev->key);
        return parse_error(pc, "continuation lines are not supported: put the whole value on one line%s%s "
                               "(this indented line follows [%s] %s; unindent it if it is a key of its own)",
                           find_key(pc->prev->section, file_key) ? ", or use " : "",
                           find_key(pc->prev->section, file_key) ? file_key : "", pc->prev->section,
                           pc->prev->key);
    }
    if (*s == '[') {
        char *end = strchr(s, ']');
        if (end == NULL)
            return parse_error(pc, "malformed section header \"%.64s\": no closing ]", s);
        char *rest = util_trim(end + 1);
        if (*rest && *rest != ';' && *rest != '#')
            return parse_error(pc, "unexpected \"%.64s\" after the section header", rest);
        *end = '\0';
        char *name = util_trim(s + 1);
        if (*name == '\0')
            return parse_error(pc, "empty section name");
        free(pc->section);
        pc->section = xstrdup(name);
        pc->prev = NULL;
        return 0;
    }
    char *delim = find_or_comment(s, "=:");
    if (*delim != '=' && *delim != ':')
        return parse_error(pc, "syntax error: expected \"key = value\", \"[section]\" or a comment, got \"%.64s\"",
                           s);
    char sep = *delim;
    *delim = '\0';
    char *name = util_trim(s), *value = delim + 1;
    char *comment = find_or_comment(value, NULL);
    int has_comment = *comment == ';';
    *comment = '\0';
    value = util_trim(value);
    if (*name == '\0')
        return parse_error(pc, "syntax error: no key name before the '%c'", sep);
    if (pc->section == NULL)
        return parse_error(pc, "key \"%s\" outside a [section] (is a section header malformed?)", name);
    const key_def_t *k = find_key(pc->section, name);
    if (k == NULL)
        return parse_error(pc, "unknown key [%s] %s", pc->section, name);
    size_t idx = (size_t)(k - keys);
    if (pc->line_of[idx])
        return parse_error(pc, "[%s] %s is given twice, on lines %d and %d", k->section, k->key,
                           pc->line_of[idx], pc->lineno);
    if (has_comment && k->secret) {
        char env[128];
        env_name(k, env, sizeof(env));
        return parse_error(pc, "[%s] %s: a blank followed by ';' starts an inline comment, which would cut "
                               "this secret short; put the comment on a line of its own, or set %s "
                               "(taken verbatim)", k->section, k->key, env);
    }
    char msg[512];
    if (set_value(pc->cfg, k, value, msg, sizeof(msg)) < 0)
        return parse_error(pc, "%s", msg);
    pc->line_of[idx] = pc->lineno;
    pc->prev = k;
    return 0;
}

static int file_line(void *arg, char *line, size_t len)
{
    parse_ctx_t *pc = arg;
    pc->lineno++;
    if (strlen(line) != len)
        return parse_error(pc, "NUL byte in the line (not a text file?)");
    return parse_line(pc, line);
}

static int parse_file(mp_config_t *cfg, const char *path, char *err, size_t errlen)
{
    parse_ctx_t pc = { .cfg = cfg, .path = path, .err = err, .errlen = errlen };
    int rc = util_file_lines(path, file_line, &pc, err, errlen) == 0 ? 0 : -1;
    free(pc.section);
    return rc;
}

int config_load(mp_config_t *cfg, const char *path, char *err, size_t errlen)
{
    if (path && parse_file(cfg, path, err, errlen) < 0)
        return -1;
    for (size_t i = 0; i < NKEYS; i++) {
        char name[128];
        env_name(&keys[i], name, sizeof(name));
        const char *v = getenv(name);
        if (v == NULL)
            continue;
        if (set_value(cfg, &keys[i], v, err, errlen) < 0) {
            char tmp[512];
            snprintf(tmp, sizeof(tmp), "%s: %s", name, err);
            snprintf(err, errlen, "%s", tmp);
            return -1;
        }
    }
    return 0;
}

/* [metrics] tenants: label values fixed at start-up, so a list of valid
 * tenant names, each once, neither "none" nor "other" (those series are
 * the metric's own), at most METRICS_TENANTS_MAX. */
#define METRICS_TENANTS_MAX 256
static int check_names(const char *list, int kind, const char *key, char *err, size_t errlen)
{
    char *copy = xstrdup(list), *save = NULL;
    const char *names[METRICS_TENANTS_MAX];
    size_t n = 0;
    int rc = 0;
    char q[96];
    for (char *t = strtok_r(copy, ", \t", &save); t && rc == 0; t = strtok_r(NULL, ", \t", &save)) {
        if (!message_valid_ident((message_ident_t)kind, t)) {
            snprintf(err, errlen, "[metrics] %s: \"%s\" is not a %s name (%s)", key, util_quote_text(t, q, sizeof(q)),
                     kind == MESSAGE_TENANT ? "tenant" : "campaign",
                     kind == MESSAGE_TENANT ? "1-64 letters, digits, '.', '_', '-'"
                                            : "1-128 letters, digits, '.', '_', '-', ':', '/', '@', '+', '='");
            rc = -1;
        } else if (strcmp(t, "none") == 0 || strcmp(t, "other") == 0) {
            snprintf(err, errlen, "[metrics] %s: \"%s\" is reserved (the series of %s not listed "
                                  "and of messages without one)", key, t, key);
            rc = -1;
        } else if (n == METRICS_TENANTS_MAX) {
            snprintf(err, errlen, "[metrics] %s: more than %d names", key, METRICS_TENANTS_MAX);
            rc = -1;
        } else {
            for (size_t i = 0; i < n && rc == 0; i++) {
                if (strcmp(names[i], t) == 0) {
                    snprintf(err, errlen, "[metrics] %s: \"%s\" is listed twice", key, t);
                    rc = -1;
                }
            }
            names[n++] = t;
        }
    }
    free(copy);
    return rc;
}

int config_validate(const mp_config_t *cfg, char *err, size_t errlen)
{
    if (cfg->amqp_port == 0 || cfg->amqp_port > 65535 || cfg->smtp_port == 0 ||
        cfg->smtp_port > 65535 || cfg->imap_port == 0 || cfg->imap_port > 65535) {
        snprintf(err, errlen, "ports must be between 1 and 65535");
        return -1;
    }
    if (cfg->message_max_recipients == 0 || cfg->message_max_recipients > 100000) {
        /* a retry carries a bit per recipient in one AMQP header frame */
        snprintf(err, errlen, "[message] max_recipients must be between 1 and 100000");
        return -1;
    }
    if (cfg->suppression_enabled > 1) {
        snprintf(err, errlen, "[suppression] enabled must be 0 or 1");
        return -1;
    }
    if (cfg->redis_send_unrecorded > 1) {
        snprintf(err, errlen, "[redis] send_unrecorded must be 0 or 1");
        return -1;
    }
    if (cfg->trace_enabled > 1 || cfg->trace_max_records == 0 || cfg->trace_ttl_ms == 0) {
        snprintf(err, errlen, "[trace] enabled must be 0 or 1, ttl and max_records above 0");
        return -1;
    }
    if (cfg->redis_mark_wait_ms > 60000) {
        /* the server's own timeout for the rest of the data is minutes (RFC 5321 §4.5.3.2.6) */
        snprintf(err, errlen, "[redis] mark_wait must be at most 60s");
        return -1;
    }
    if (cfg->amqp_prefetch > 65535) {
        snprintf(err, errlen, "[amqp] prefetch must be between 1 and 65535, or 0 (auto)");
        return -1;
    }
    if (cfg->worker_count > 256) {
        snprintf(err, errlen, "[worker] count must be at most 256");
        return -1;
    }
    if (cfg->dns_l1_entries == 0 || cfg->dns_max_ttl_s == 0 || cfg->dns_negative_ttl_s == 0 ||
        cfg->dns_l2 > 1) {
        snprintf(err, errlen, "[dns] l1_entries, max_ttl_s, negative_ttl_s must be > 0 and l2 0 or 1");
        return -1;
    }
    if (cfg->smtp_max_mx == 0 || cfg->dns_tries == 0 || cfg->dns_timeout_ms == 0 ||
        cfg->smtp_timeout_scale == 0) {
        snprintf(err, errlen, "[smtp] max_mx, timeout_scale and [dns] tries, timeout_ms must be > 0");
        return -1;
    }
    for (int c = 0; c < 3; c++) {
        if (cfg->retry_max_attempts[c] == 0 || cfg->retry_base_ms[c] == 0 ||
            cfg->retry_max_age_ms[c] == 0) {
            snprintf(err, errlen, "[retry] p%d_max_attempts, p%d_base and p%d_max_age must be > 0",
                     c, c, c);
            return -1;
        }
    }
    {
        /* every level a duration, ascending, within RabbitMQ's TTL range */
        char *copy = xstrdup(cfg->retry_levels), *save = NULL;
        uint64_t prev = 0;
        int n = 0, bad = 0;
        for (char *t = strtok_r(copy, ", ", &save); t; t = strtok_r(NULL, ", ", &save)) {
            uint64_t ms;
            if (config_parse_duration(t, &ms) < 0 || ms == 0 || ms <= prev || ms > 0x7fffffffu) {
                bad = 1;
                break;
            }
            prev = ms;
            n++;
        }
        free(copy);
        if (bad || n == 0) {
            snprintf(err, errlen, "[retry] levels: expected ascending durations like "
                                  "\"30s,1m,5m,1h\", got \"%s\"", cfg->retry_levels);
            return -1;
        }
    }
    if (check_names(cfg->metrics_tenants, MESSAGE_TENANT, "tenants", err, errlen) < 0 ||
        check_names(cfg->metrics_campaigns, MESSAGE_CAMPAIGN, "campaigns", err, errlen) < 0)
        return -1;
    if (cfg->imap_host[0] && !cfg->imap_accounts_file[0]) {
        snprintf(err, errlen, "[imap] host is set but accounts_file is empty");
        return -1;
    }
    return 0;
}

void config_dump(const mp_config_t *cfg, void *stream)
{
    FILE *f = stream;
    const char *section = "";
    for (size_t i = 0; i < NKEYS; i++) {
        const key_def_t *k = &keys[i];
        if (strcmp(section, k->section) != 0) {
            fprintf(f, "%s[%s]\n", i ? "\n" : "", k->section);
            section = k->section;
        }
        const char *base = (const char *)cfg + k->offset;
        switch (k->type) {
        case K_STR:
            fprintf(f, "%s = %s\n", k->key, k->secret ? "********" : *(char *const *)base);
            break;
        case K_UINT:
            fprintf(f, "%s = %u\n", k->key, *(const unsigned *)base);
            break;
        case K_ULONG:
            fprintf(f, "%s = %lu\n", k->key, *(const unsigned long *)base);
            break;
        case K_MS: {
            char d[32];
            config_format_duration(*(const uint64_t *)base, d, sizeof(d));
            fprintf(f, "%s = %s\n", k->key, d);
            break;
        }
        case K_ENUM:
            fprintf(f, "%s = %s\n", k->key, config_enum_name(k->section, k->key, *(const int *)base));
            break;
        case K_SIZE: {
            unsigned long n = *(const unsigned long *)base;
            if (n == 0)
                fprintf(f, "%s = auto\n", k->key);
            else
                fprintf(f, "%s = %lu\n", k->key, n);
            break;
        }
        }
    }
}

/* The enumerated key [section] key, or NULL. */
static const key_def_t *find_enum(const char *section, const char *key)
{
    const key_def_t *k = find_key(section, key);
    return k && k->type == K_ENUM ? k : NULL;
}

int config_enum_parse(const char *section, const char *key, const char *s)
{
    const key_def_t *k = find_enum(section, key);
    return k && s ? enum_value(k->names, s) : -1;
}

const char *config_enum_name(const char *section, const char *key, int value)
{
    const key_def_t *k = find_enum(section, key);
    for (const enum_name_t *n = k ? k->names : NULL; n && n->name; n++)
        if (n->value == value)
            return n->name;
    return "?";
}

void config_enum_list(const char *section, const char *key, const char *sep, char *out, size_t outlen)
{
    const key_def_t *k = find_enum(section, key);
    if (k)
        enum_list(k->names, sep, out, outlen);
    else if (outlen)
        out[0] = '\0';
}

/* s for a Markdown table cell: '|' escaped */
static void put_cell(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '|')
            fputc('\\', f);
        fputc(*s, f);
    }
}

/* s as roff text: backslashes escaped, a leading '.' or '\'' guarded, and
 * `code` spans of the Markdown descriptions set in bold */
static void put_roff(FILE *f, const char *s)
{
    int code = 0;
    if (*s == '.' || *s == '\'')
        fputs("\\&", f);
    for (; *s; s++) {
        if (*s == '\\')
            fputs("\\e", f);
        else if (*s == '-')
            fputs("\\-", f);
        else if (*s == '`') {
            fputs(code ? "\\fR" : "\\fB", f);
            code = !code;
        } else
            fputc(*s, f);
    }
    if (code)
        fputs("\\fR", f);
}

void config_print_reference_man(void *stream, const char *version)
{
    FILE *f = stream;
    fprintf(f,
            ".\\\" Generated from the key table in core/config.c by\n"
            ".\\\" `mailpumpd --print-config-reference --format man`; do not edit.\n"
            ".TH MAILPUMPD.INI 5 \"\" \"mailpump %s\" \"File Formats\"\n"
            ".nh\n"
            ".ad l\n"
            ".SH NAME\n"
            "mailpumpd.ini \\- configuration file of the mailpumpd delivery engine\n"
            ".SH SYNOPSIS\n"
            ".B /etc/mailpump/mailpumpd.ini\n"
            ".SH DESCRIPTION\n"
            "An INI file (\\fBmailpumpd \\-\\-config\\fR \\fIFILE\\fR) of \\fB[section]\\fR headers\n"
            "and \\fBkey = value\\fR lines (\\fBkey: value\\fR too), each value on one line\n"
            "and taken as written.\n"
            "A line whose first non-blank character is \\fB;\\fR or \\fB#\\fR is a comment,\n"
            "and so is the rest of a line from a \\fB;\\fR after a blank, except on a secret,\n"
            "where that is an error.\n"
            "A key given twice, an indented continuation line, and unknown sections or keys are errors.\n"
            ".PP\n"
            "Every key can be overridden by its environment variable\n"
            "\\fBMAILPUMP_\\fR\\fISECTION\\fR\\fB_\\fR\\fIKEY\\fR, which wins over the file.\n"
            "\\fBmailpumpd \\-\\-check\\-config\\fR runs every check start-up runs and prints\n"
            "the effective values with secrets masked.\n"
            ".PP\n"
            "Types: \\fIinteger\\fR is a non-negative decimal number;\n"
            "\\fIduration\\fR is \\fB250ms\\fR, \\fB30s\\fR, \\fB5m\\fR, \\fB2h\\fR, \\fB1d\\fR\n"
            "or a bare number of milliseconds;\n"
            "\\fIsize\\fR is a number of bytes with an optional unit \\fBKiB\\fR, \\fBMiB\\fR, \\fBGiB\\fR\n"
            "(powers of 1024), or \\fBauto\\fR;\n"
            "\\fIone of\\fR takes exactly one of the names listed;\n"
            "a \\fIsecret\\fR string is masked by \\fB\\-\\-check\\-config\\fR.\n"
            ".SH KEYS\n",
            version);
    const char *section = "";
    for (size_t i = 0; i < NKEYS; i++) {
        const key_def_t *k = &keys[i];
        if (strcmp(section, k->section) != 0) {
            fprintf(f, ".SS [%s]\n", k->section);
            section = k->section;
        }
        char env[128];
        env_name(k, env, sizeof(env));
        fprintf(f, ".TP\n.B %s\n", k->key);
        switch (k->type) {
        case K_STR: fputs(k->secret ? "\\fIsecret string\\fR" : "\\fIstring\\fR", f); break;
        case K_UINT:
        case K_ULONG: fputs("\\fIinteger\\fR", f); break;
        case K_MS: fputs("\\fIduration\\fR", f); break;
        case K_SIZE: fputs("\\fIsize\\fR", f); break;
        case K_ENUM: {
            char names[256];
            enum_list(k->names, ", ", names, sizeof(names));
            fputs("\\fIone of\\fR ", f);
            put_roff(f, names);
            break;
        }
        }
        fputs(", default ", f);
        if (k->defval[0]) {
            fputs("\\fB", f);
            for (const char *d = k->defval; *d; d++) {
                if (*d == '\\')
                    fputs("\\e", f);
                else if (*d == '-')
                    fputs("\\-", f);
                else if (*d == ':' || *d == ',')
                    fprintf(f, "%c\\:", *d); /* a place to break a long list */
                else
                    fputc(*d, f);
            }
            fputs("\\fR", f);
        } else {
            fputs("empty", f);
        }
        fprintf(f, ", environment \\fB\\%%%s\\fR.\n.br\n", env);
        put_roff(f, k->desc);
        fputc('\n', f);
    }
    fputs(".SH FILES\n"
          ".TP\n"
          ".I /etc/mailpump/mailpumpd.ini\n"
          "the file the packaged systemd unit passes to \\fBmailpumpd \\-\\-config\\fR\n"
          ".SH SEE ALSO\n"
          ".BR mailpumpd (8),\n"
          ".BR mailpump (1)\n", f);
}

void config_print_reference(void *stream)
{
    FILE *f = stream;
    fputs("# mailpumpd configuration reference\n"
          "\n"
          "_Generated from the key table in core/config.c by `mailpumpd --print-config-reference`; "
          "do not edit, regenerate with `mailpumpd --print-config-reference > docs/configuration.md`._\n"
          "\n"
          "An INI file (`mailpumpd --config FILE`) of `[section]` headers and `key = value` lines "
          "(`key: value` too), each value on one line of any length and taken as written (quotes, `#` "
          "and a `;` directly after a character are part of it); a line whose first non-blank character "
          "is `;` or `#` is a comment, and so is the rest of a line from a `;` after a blank, except on "
          "a secret, where that is an error. A key given twice and an indented line after a key (a "
          "continuation line elsewhere) are errors. "
          "Every key can be overridden by its environment variable `MAILPUMP_<SECTION>_<KEY>`, "
          "which wins over the file. Unknown sections or keys are errors. "
          "`mailpumpd --check-config` runs every check start-up runs before it starts a worker and prints "
          "the effective values with secrets masked.\n"
          "\n"
          "Types: *integer* is a non-negative decimal number; *duration* is `250ms`, `30s`, `5m`, "
          "`2h`, `1d` or a bare number of milliseconds; *size* is a number of bytes with an optional "
          "unit `KiB`, `MiB`, `GiB` (`K`, `M`, `G` too; powers of 1024), or `auto`; *one of* takes exactly one of the names "
          "listed; a *secret* string is masked by `--check-config`.\n", f);
    const char *section = "";
    for (size_t i = 0; i < NKEYS; i++) {
        const key_def_t *k = &keys[i];
        if (strcmp(section, k->section) != 0) {
            fprintf(f, "\n## [%s]\n\n| key | type | default | environment | description |\n"
                       "|---|---|---|---|---|\n", k->section);
            section = k->section;
        }
        char env[128];
        env_name(k, env, sizeof(env));
        fprintf(f, "| `%s` | ", k->key);
        switch (k->type) {
        case K_STR: fputs(k->secret ? "secret string" : "string", f); break;
        case K_UINT:
        case K_ULONG: fputs("integer", f); break;
        case K_MS: fputs("duration", f); break;
        case K_SIZE: fputs("size", f); break;
        case K_ENUM: {
            char names[256];
            enum_list(k->names, "`, `", names, sizeof(names));
            fprintf(f, "one of `%s`", names);
            break;
        }
        }
        fputs(" | ", f);
        if (k->defval[0]) {
            fputc('`', f);
            put_cell(f, k->defval);
            fputc('`', f);
        } else {
            fputs("(empty)", f);
        }
        fprintf(f, " | `%s` | ", env);
        put_cell(f, k->desc);
        fputs(" |\n", f);
    }
}

/*
 * core/config.h - daemon configuration: INI file, then environment.
 *
 * Every key is [section] key = value in the file and can be overridden by
 * the environment variable MAILPUMP_<SECTION>_<KEY> (upper case), which is
 * how Kubernetes manifests set them. Unknown sections or keys are errors,
 * so a typo is caught by `mailpumpd --check-config` instead of ignored.
 */
#ifndef MP_CORE_CONFIG_H
#define MP_CORE_CONFIG_H

#include <stddef.h>
#include <stdint.h>

/* The enumerated keys, parsed once by config_load() (K_ENUM in config.c);
 * each value's name is in config.c's table, in this order. */
typedef enum {
    MP_SMTP_TLS_NONE = 0,      /* "none" */
    MP_SMTP_TLS_OPPORTUNISTIC, /* "opportunistic" */
    MP_SMTP_TLS_REQUIRED,      /* "required" */
    MP_SMTP_TLS_VERIFY,        /* "verify" */
} mp_smtp_tls_t;

typedef enum {
    MP_IMAP_TLS_IMAPS = 0, /* "imaps" */
    MP_IMAP_TLS_STARTTLS,  /* "starttls" */
    MP_IMAP_TLS_NONE,      /* "none" */
} mp_imap_tls_t;

typedef enum {
    MP_LOG_LEVEL_ERROR = 0, /* "error" */
    MP_LOG_LEVEL_WARN,      /* "warn" (or "warning") */
    MP_LOG_LEVEL_INFO,      /* "info" */
    MP_LOG_LEVEL_DEBUG,     /* "debug" */
} mp_log_level_t;

typedef enum {
    MP_LOG_FORMAT_LOGFMT = 0, /* "logfmt" */
    MP_LOG_FORMAT_JSON,       /* "json" */
} mp_log_format_t;

/* [suppression] when_unavailable */
typedef enum {
    MP_SUP_UNAVAILABLE_SEND = 0, /* fail open */
    MP_SUP_UNAVAILABLE_DEFER,    /* deferred, no attempt spent */
} mp_sup_unavailable_t;

typedef struct mp_config {
    /* [worker] */
    unsigned worker_count;        /* 0 = number of CPUs */
    unsigned worker_shutdown_grace_ms; /* SIGTERM: time to finish in-flight work */
    /* [amqp] */
    char    *amqp_host;
    unsigned amqp_port;
    char    *amqp_user;
    char    *amqp_password;
    char    *amqp_vhost;
    unsigned amqp_prefetch;
    unsigned amqp_heartbeat;      /* seconds */
    char    *amqp_queue;
    char    *amqp_dead_queue;
    char    *amqp_events_exchange;
    char    *amqp_management_url; /* http://host:port of the management API; empty: not used */
    /* [dns] */
    char    *dns_servers;         /* "host:port,..." or empty for the system's */
    unsigned dns_timeout_ms;
    unsigned dns_tries;
    unsigned dns_l1_entries;      /* per-worker in-memory cache (L1) entries */
    unsigned dns_max_ttl_s;       /* cap on how long a positive answer is cached */
    unsigned dns_negative_ttl_s;  /* cap on how long a negative answer is cached (RFC 2308) */
    unsigned dns_l2;              /* 1: share answers in Redis ([redis] host must be set) */
    /* [smtp] */
    unsigned smtp_port;
    char    *smtp_helo_name;      /* empty = host name */
    mp_smtp_tls_t smtp_tls;       /* default TLS policy */
    char    *smtp_ca_file;
    unsigned smtp_max_mx;
    unsigned smtp_timeout_scale;  /* percent of the RFC 5321 timeouts */
    char    *smtp_tls_policy;     /* per domain: "example.com:verify,.example.org:required" */
    char    *smtp_tls_policy_file; /* more tls_policy entries, one per line, after the inline ones */
    char    *smtp_rate_limits;    /* per domain: "gmail.com:100/s,.yahoo.com:20/m" (per process) */
    char    *smtp_rate_limits_file; /* more rate_limits entries, one per line, after the inline ones */
    uint64_t smtp_rate_limit_max_wait_ms; /* a message waits this long for its slot, else it is deferred */
    unsigned smtp_max_rcpts;      /* recipients per transaction */
    unsigned smtp_pipelining;     /* 0 = lock-step even when offered */
    unsigned smtp_pool;           /* 0 = one connection per message */
    unsigned smtp_pool_max_msgs;  /* transactions per pooled connection */
    unsigned smtp_pool_max_age_ms;
    unsigned smtp_pool_idle_ms;
    unsigned smtp_pool_max_per_dest;
    unsigned smtp_pool_initial_per_dest;
    unsigned smtp_pool_max_total; /* per worker; 0 = auto (env.h) */
    unsigned smtp_site_isolation;
    unsigned smtp_site_max_connections; /* fleet-wide per site; 0 = none */
    char    *smtp_site_limits;
    unsigned smtp_site_max_waiting;
    uint64_t smtp_site_max_wait_ms;
    uint64_t smtp_site_lease_ttl_ms;
    uint64_t smtp_site_lease_renew_ms;
    uint64_t smtp_pool_refused_backoff_ms; /* a destination that refused a new connection (4xx
                                            * greeting) while others were open is capped at
                                            * those this long; 0 = never */
    unsigned smtp_tls_cache_size; /* TLS sessions kept per worker for resumption */
    uint64_t smtp_route_penalty_ms;     /* an MX address that failed to connect or greet is
                                         * skipped this long (doubling per failure); 0 = never */
    uint64_t smtp_route_penalty_max_ms; /* the doubling stops here */
    char    *smtp_relay;          /* "host[:port]": smarthost mode; empty = MX delivery */
    char    *smtp_relay_user;     /* AUTH PLAIN/LOGIN over TLS; empty = no AUTH */
    char    *smtp_relay_password;
    unsigned smtp_relay_auth_unverified; /* 1: AUTH also to a relay whose certificate is not verified */
    /* per-state timeouts (smtp_timeouts_t in deliverer/session.h), 0 = the scaled RFC default */
    unsigned smtp_timeout_connect_ms;
    unsigned smtp_timeout_greeting_ms;
    unsigned smtp_timeout_helo_ms;
    unsigned smtp_timeout_starttls_ms;
    unsigned smtp_timeout_mail_ms;
    unsigned smtp_timeout_rcpt_ms;
    unsigned smtp_timeout_data_init_ms;
    unsigned smtp_timeout_data_block_ms;
    unsigned smtp_timeout_data_done_ms;
    unsigned smtp_timeout_rset_ms;
    unsigned smtp_timeout_quit_ms;
    unsigned smtp_timeout_transaction_ms; /* MAIL FROM to the final reply; 0 = the scaled default */
    unsigned smtp_reply_lines_burst;      /* lines a reply may have at once; 0 = no cap */
    unsigned smtp_reply_lines_per_s;      /* and more per second waited for it */
    /* [egress] */
    char    *egress_file;         /* sources, pools, tenants (deliverer/policy.h); empty = none */
    /* [shaping] */
    char    *shaping_file;        /* per-site/domain shaping and automation rules; empty = none */
    /* [imap] */
    char    *imap_host;
    unsigned imap_port;
    mp_imap_tls_t imap_tls;
    char    *imap_ca_file;
    char    *imap_accounts_file;
    unsigned imap_timeout_ms;
    unsigned imap_pool;           /* 0 = one IMAP session per Sent copy */
    unsigned imap_pool_max_appends; /* appends per pooled session */
    unsigned imap_pool_idle_ms;   /* idle time before LOGOUT */
    unsigned imap_pool_max_connections; /* per account and worker; more appends queue */
    unsigned imap_pool_max_batch;       /* queued appends sent in one MULTIAPPEND; 1 = never */
    /* [redis] (shared by the DNS L2 cache and the delivery ledger) */
    char    *redis_host;          /* empty disables Redis */
    unsigned redis_port;
    unsigned redis_timeout_ms;
    unsigned redis_mark_wait_ms;    /* the final dot waits this long for its "sending" mark */
    unsigned redis_send_unrecorded; /* 1: send the dot when the mark cannot be recorded */
    /* [suppression] (deliverer/suplist.h) */
    unsigned suppression_enabled;       /* needs [redis] host */
    char    *suppression_auto_reasons;  /* reason tags added automatically; empty: none */
    mp_sup_unavailable_t suppression_when_unavailable;
    unsigned suppression_auto_ttl;      /* seconds an automatic entry lasts; 0: for ever */
    /* [trace] (deliverer/history.h) */
    unsigned trace_enabled;       /* 1: write each message's history (needs [redis] host) */
    uint64_t trace_ttl_ms;        /* lifetime of a history after its last write */
    unsigned trace_max_records;   /* records kept per message */
    /* [metrics] */
    char    *metrics_listen;      /* host:port, empty disables */
    uint64_t metrics_stuck_after_ms; /* /healthz: a worker heartbeat older than this is stuck; 0 = off */
    char    *metrics_tenants;     /* tenant label values, comma/blank separated (metrics_label_add_list) */
    char    *metrics_campaigns;   /* campaign label values, the same way */
    char    *metrics_sites;       /* destination site label values, the same way */
    /* [api] (api/http.h) */
    char    *api_listen;          /* host:port of the HTTP API, empty disables */
    char    *api_tokens_file;     /* bearer tokens, NAME:TOKEN or TOKEN per line */
    char    *api_tls_cert;        /* PEM; both or neither of cert and key */
    char    *api_tls_key;
    unsigned long api_max_body;   /* bytes of a request body */
    uint64_t api_timeout_ms;      /* inactivity per connection */
    unsigned api_max_connections;
    unsigned api_threads;         /* MHD thread pool */
    unsigned api_max_batch;       /* messages per POST /v1/messages */
    uint64_t api_publish_timeout_ms; /* wait for the broker's confirms */
    /* [log] */
    mp_log_level_t  log_level;
    mp_log_format_t log_format;
    /* [retry] */
    char    *retry_levels;        /* delay queues, e.g. "30s,1m,5m,1h" */
    char    *retry_queue_prefix;  /* delay queue: <prefix>.<level> */
    unsigned retry_poison_redeliveries; /* redeliveries without finishing -> dead */
    /* per priority class: [0] P0 (priority 8-10), [1] P1 (4-7), [2] P2 (0-3) */
    uint64_t retry_base_ms[3];    /* first retry delay; doubles per attempt */
    uint64_t retry_max_age_ms[3]; /* then the remaining recipients bounce */
    unsigned retry_max_attempts[3];
    unsigned retry_fast_retries[3];  /* network errors retried within an attempt */
    uint64_t retry_fast_base_ms[3];  /* base x 2^n, capped at 3 s, +-15 % jitter */
    /* [message] */
    unsigned long message_max_size;
    unsigned message_max_recipients; /* to + cc + bcc per message */
    unsigned long message_inflight_memory; /* bytes per worker; 0 = auto (deliverer/budget.h) */
    /* [dkim] */
    char    *dkim_keys_file;      /* "domain selector algorithm key.pem" lines; empty = no signing */
    char    *dkim_headers;        /* colon-separated signed header fields */
} mp_config_t;

/* Fill defaults. */
void config_defaults(mp_config_t *cfg);
/* Load path (may be NULL: defaults + environment only), then apply the
 * environment. Returns 0, or -1 with a reason in err ("file:line: ..."). */
int  config_load(mp_config_t *cfg, const char *path, char *err, size_t errlen);
/* Check values that parse but make no sense. Returns 0 or -1 + err. */
int  config_validate(const mp_config_t *cfg, char *err, size_t errlen);
/* Parse a duration: "250ms", "30s", "5m", "2h", "1d", or bare milliseconds.
 * Returns 0 and sets *ms, or -1. */
int  config_parse_duration(const char *s, uint64_t *ms);
/* Parse a size: bytes with an optional unit (K/KiB, M/MiB, G/GiB, T/TiB,
 * powers of 1024, any case), or "auto" (0). Returns 0 and sets *bytes, or -1. */
int  config_parse_size(const char *s, uint64_t *bytes);
/* Format bytes with the largest exact binary unit ("25 MiB"), else "N bytes". */
void config_format_size(uint64_t bytes, char *out, size_t outlen);
/* Format ms with the largest exact unit ("90s", "5m", "250ms"). */
void config_format_duration(uint64_t ms, char *out, size_t outlen);
/* Print the effective configuration (passwords masked) as INI. */
void config_dump(const mp_config_t *cfg, void *FILE_stream);
/* Print the reference of every key (section, key, type, default,
 * environment variable, description) as Markdown: docs/configuration.md. */
void config_print_reference(void *FILE_stream);
/* The same reference as the roff man page mailpumpd.ini(5); version goes
 * into its header. */
void config_print_reference_man(void *FILE_stream, const char *version);
/* The value the enumerated key [section] key gives the name s (exact
 * spelling, aliases included), or -1 when unknown (or not an enum key). */
int  config_enum_parse(const char *section, const char *key, const char *s);
/* The name of value for that key; "?" when out of range. */
const char *config_enum_name(const char *section, const char *key, int value);
/* The key's names joined by sep ("none|opportunistic|..."), aliases left out. */
void config_enum_list(const char *section, const char *key, const char *sep, char *out, size_t outlen);
void config_free(mp_config_t *cfg);

#endif

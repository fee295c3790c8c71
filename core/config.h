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
    /* [dns] */
    char    *dns_servers;         /* "host:port,..." or empty for the system's */
    unsigned dns_timeout_ms;
    unsigned dns_tries;
    /* [smtp] */
    unsigned smtp_port;
    char    *smtp_helo_name;      /* empty = host name */
    char    *smtp_tls;            /* none | opportunistic | required | verify */
    char    *smtp_ca_file;
    unsigned smtp_max_mx;
    unsigned smtp_timeout_scale;  /* percent of the RFC 5321 timeouts */
    /* [imap] */
    char    *imap_host;
    unsigned imap_port;
    char    *imap_tls;            /* imaps | starttls | none */
    char    *imap_ca_file;
    char    *imap_accounts_file;
    unsigned imap_timeout_ms;
    /* [metrics] */
    char    *metrics_listen;      /* host:port, empty disables */
    /* [log] */
    char    *log_level;
    char    *log_format;          /* logfmt | json */
    /* [retry] */
    unsigned retry_delay_ms;      /* wait before retrying transient recipients */
    unsigned retry_max_attempts;  /* attempts before they fail for good */
    char    *retry_queue_prefix;  /* delay queue: <prefix>.<seconds>s */
    /* [message] */
    unsigned long message_max_size;
} mp_config_t;

/* Fill defaults. */
void config_defaults(mp_config_t *cfg);
/* Load path (may be NULL: defaults + environment only), then apply the
 * environment. Returns 0, or -1 with a reason in err ("file:line: ..."). */
int  config_load(mp_config_t *cfg, const char *path, char *err, size_t errlen);
/* Check values that parse but make no sense. Returns 0 or -1 + err. */
int  config_validate(const mp_config_t *cfg, char *err, size_t errlen);
/* Print the effective configuration (passwords masked) as INI. */
void config_dump(const mp_config_t *cfg, void *FILE_stream);
void config_free(mp_config_t *cfg);

#endif

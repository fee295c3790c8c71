/*
 * cli/client.h - a small blocking client for applications and the CLI:
 * enqueue a message with publisher confirms, and watch events.
 *
 * Blocking on purpose: it runs in tools and application threads, never in
 * a worker loop. Declares the same topology as the daemon (idempotent),
 * so enqueueing works before any worker has started.
 */
#ifndef MP_CLI_CLIENT_H
#define MP_CLI_CLIENT_H

#include <stddef.h>

typedef struct mp_client_opts {
    const char *host;
    unsigned    port;
    const char *user;
    const char *password;
    const char *vhost;
    const char *queue;           /* mail.outbound */
    const char *events_exchange; /* mail.events */
} mp_client_opts_t;

typedef struct mp_client mp_client_t;

/* NULL + err on failure. */
mp_client_t *mp_client_connect(const mp_client_opts_t *o, char *err, size_t errlen);
/* Publish a message body (persistent, priority 0..10, or -1 for none) and
 * wait up to timeout_ms for the broker's confirm. 0 = confirmed. */
int  mp_client_enqueue(mp_client_t *c, const char *body, size_t len, int priority,
                       const char *message_id, unsigned timeout_ms, char *err, size_t errlen);
/* Bind a private auto-delete queue to the events exchange with a routing
 * pattern ("#" for all). Events published after this call are received. */
int  mp_client_subscribe(mp_client_t *c, const char *pattern, char *err, size_t errlen);
/* Next event body (malloc'd, NUL-terminated). 1 = got one, 0 = timeout,
 * -1 = error (err says why). */
int  mp_client_next_event(mp_client_t *c, unsigned timeout_ms, char **body, size_t *len,
                          char *err, size_t errlen);
void mp_client_close(mp_client_t *c);

#endif

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
#include <stdint.h>

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

/* ---- pipelined publishing with events on the same channel (stress) ----
 * mp_client_publish() sends one message like mp_client_enqueue() but does
 * not wait: *seq is the delivery tag the broker's confirm will carry (1, 2,
 * ... per connection). The confirm, and the events of a subscription on
 * this connection, arrive through mp_client_pump(). Do not mix with
 * mp_client_enqueue() or mp_client_next_event() on one connection: each
 * skips the frames the other expects. */
int  mp_client_publish(mp_client_t *c, const char *body, size_t len, int priority,
                       const char *message_id, uint64_t *seq, char *err, size_t errlen);
/* ok = 1 for basic.ack, 0 for basic.nack; multiple = 1: every tag <= seq. */
typedef void (*mp_client_confirm_cb)(void *arg, uint64_t seq, int multiple, int ok);
/* body is len bytes, not NUL-terminated, valid during the call only. */
typedef void (*mp_client_event_cb)(void *arg, const char *body, size_t len);
/* Wait up to timeout_ms (0: only what is already there) for the next
 * confirm or event and hand it to its callback. 1 = one was handled,
 * 0 = timeout, -1 = error: the connection or channel is gone, or a message
 * was returned as unroutable (err says which). */
int  mp_client_pump(mp_client_t *c, unsigned timeout_ms, mp_client_confirm_cb on_confirm,
                    mp_client_event_cb on_event, void *arg, char *err, size_t errlen);

/* Bind a private auto-delete queue to the events exchange with a routing
 * pattern ("#" for all). Events published after this call are received. */
int  mp_client_subscribe(mp_client_t *c, const char *pattern, char *err, size_t errlen);
/* Next event body (malloc'd, NUL-terminated). 1 = got one, 0 = timeout,
 * -1 = error (err says why). */
int  mp_client_next_event(mp_client_t *c, unsigned timeout_ms, char **body, size_t *len,
                          char *err, size_t errlen);
/* The broker's reason while it blocks this connection's publishes (a
 * memory or disk alarm: connection.blocked seen by enqueue or pump), else
 * NULL. Publishing then only fills buffers until the alarm clears. */
const char *mp_client_blocked(const mp_client_t *c);
/* Close (waiting at most 1 s for each of the broker's two closing replies) and free. */
void mp_client_close(mp_client_t *c);

#endif

/*
 * queue/mq.h - one AMQP connection per worker, driven by the worker's loop.
 *
 * librabbitmq is synchronous. Set-up RPCs (login, channel, confirm.select,
 * topology, basic.qos) run in mq_open() before the loop takes over; after
 * that the socket is watched for EPOLLIN and frames are read with a zero
 * timeout, so the loop never blocks on the broker. A periodic timer calls
 * into the library so heartbeats keep flowing while the queue is idle.
 *
 * Publishes use publisher confirms: every mq_publish() gets exactly one
 * mq_confirm_cb call, ok=1 on basic.ack, ok=0 on basic.nack or when the
 * connection is lost. Deliveries are handed over whole (method + header +
 * body assembled here) and the receiver owns them.
 *
 * Memory: at a delivery's content header, before a body byte is kept,
 * the owner is asked whether to take it (mq_on_admit); a refused one is
 * nacked back to the queue and its body read past. A body announced
 * above cfg->max_body is not buffered either: only its first
 * cfg->head_bytes are kept and the delivery is handed over marked
 * truncated. mq_pause()/mq_resume() cancel and re-create the consumer
 * without waiting (their -ok replies are handled as frames).
 */
#ifndef MP_QUEUE_MQ_H
#define MP_QUEUE_MQ_H

#include <stddef.h>
#include <stdint.h>

#include "core/loop.h"

typedef enum {
    MQ_OK = 0,
    MQ_ECONNECT = -1,  /* TCP connect or login failed */
    MQ_EPROTO = -2,    /* broker refused an operation (channel/connection closed) */
    MQ_ECLOSED = -3,   /* the connection is gone */
} mq_status_t;

const char *mq_strerror(int status);

typedef struct mq_config {
    const char *host;
    unsigned    port;
    const char *user;
    const char *password;
    const char *vhost;
    unsigned    heartbeat;       /* seconds, 0 disables */
    unsigned    prefetch;
    const char *queue;           /* mail.outbound */
    const char *dead_queue;      /* mail.dead */
    const char *events_exchange; /* mail.events */
    size_t      max_body;        /* bodies announced larger: only the head is kept; 0 = any */
    size_t      head_bytes;      /* kept of such a body */
} mq_config_t;

typedef struct mq_delivery {
    uint64_t tag;
    char    *body;        /* NUL-terminated copy, len bytes */
    size_t   len;
    int      priority;    /* 0 when the property is absent */
    int      redelivered;
    char    *message_id;  /* AMQP message-id property or NULL */
    char   **hkeys;       /* string-valued headers (others are skipped) */
    char   **hvals;
    size_t   nheaders;
    size_t   announced;   /* body size the content header announced */
    int      truncated;   /* announced > max_body: body holds only its first len bytes */
    uint64_t timestamp_s; /* the AMQP timestamp property (Unix s), 0 when absent */
} mq_delivery_t;

void mq_delivery_free(mq_delivery_t *d);
/* Value of a string header, or NULL. */
const char *mq_delivery_header(const mq_delivery_t *d, const char *key);

typedef struct mq mq_t;

/* ---- shared by the daemon's set-up and the blocking client library ---- */
struct amqp_connection_state_t_;
/* Check the reply of the last synchronous RPC on conn: 0 when it succeeded,
 * else -1 with "what: reason" (the broker's reply code and text) in err. */
int mq_rpc_check(struct amqp_connection_state_t_ *conn, const char *what, char *err, size_t errlen);
/* Declare the outbound queue (durable, x-max-priority 10) and the events
 * exchange (durable topic) on channel. Blocking. 0 or -1 + err. */
int mq_declare_outbound(struct amqp_connection_state_t_ *conn, int channel, const char *queue,
                        const char *events_exchange, char *err, size_t errlen);

/* Receives ownership of d. */
typedef void (*mq_delivery_cb)(void *arg, mq_delivery_t *d);
/* The connection died (broker gone, channel closed). Fires once, from a
 * loop timer, never inside an mq_* call: from the moment of the loss
 * mq_publish/mq_ack/mq_nack fail at once, and the unconfirmed publishes
 * are failed (ok=0) just before this call. The owner frees mq later. */
typedef void (*mq_lost_cb)(void *arg, const char *why);
/* Fires exactly once per publish. */
typedef void (*mq_confirm_cb)(void *arg, int ok);

typedef struct mq_header {
    const char *key;
    const char *value;
} mq_header_t;

typedef struct mq_publish_opts {
    const char        *content_type; /* default application/json */
    const char        *message_id;
    int                priority;     /* -1: unset */
    int                persistent;   /* delivery_mode 2 */
    const mq_header_t *headers;
    size_t             nheaders;
    int                mandatory;    /* no queue takes it: the broker returns it and the
                                      * confirm callback gets ok=0 */
    uint64_t           timestamp_s;  /* the AMQP timestamp (Unix seconds: when the message was
                                      * first enqueued); 0: now */
} mq_publish_opts_t;

/* Connect, log in, open channel 1 with confirms, declare the topology
 * (queue durable with x-max-priority 10, dead queue, topic exchange).
 * Blocking: call before the loop runs. NULL + err on failure. */
mq_t *mq_open(loop_t *loop, const mq_config_t *cfg, char *err, size_t errlen);
/* Start consuming cfg->queue with basic.qos prefetch. Returns 0 or -1+err. */
int   mq_consume(mq_t *mq, mq_delivery_cb on_delivery, mq_lost_cb on_lost, void *arg,
                 char *err, size_t errlen);
/* Ask the broker to stop delivering (basic.cancel, not waited for), for
 * good: a later mq_resume() does nothing. */
void  mq_cancel(mq_t *mq);
/* Asked at each delivery's content header (announced body size, and
 * whether only its head will be kept), before any body byte is kept:
 * return 1 to take it (it is handed over by mq_delivery_cb, unless the
 * connection is lost first: mq_lost_cb follows then), 0 to refuse it
 * (nacked with requeue, its body read past, never handed over). */
typedef int (*mq_admit_cb)(void *arg, size_t announced, int truncated);
void  mq_on_admit(mq_t *mq, mq_admit_cb cb, void *arg);
/* Stop taking new deliveries for now: basic.cancel, not waited for. The
 * deliveries already held stay unacked on the channel; those already on
 * the wire still arrive (and are admitted or refused). */
void  mq_pause(mq_t *mq);
/* Consume again after mq_pause(): basic.consume, not waited for. A
 * pause or resume given while the previous one is still unanswered
 * takes effect when its -ok arrives. */
void  mq_resume(mq_t *mq);
/* Declare a durable delay queue: messages expire after ttl_ms and are
 * dead-lettered back to cfg->queue. Blocking RPC: call only from set-up
 * (mq_open's caller), before the loop runs. 0 or -1 + err. */
int   mq_declare_delay_queue(mq_t *mq, const char *name, unsigned ttl_ms, char *err, size_t errlen);
/* Publish with confirm. Returns 0 (cb will fire) or -1 (cb will not fire). */
int   mq_publish(mq_t *mq, const char *exchange, const char *routing_key, const void *body,
                 size_t len, const mq_publish_opts_t *opts, mq_confirm_cb cb, void *arg);
int   mq_ack(mq_t *mq, uint64_t tag);
int   mq_nack(mq_t *mq, uint64_t tag, int requeue);
/* Publishes not yet confirmed (sent, or held while blocked). */
size_t mq_unconfirmed(const mq_t *mq);
/* The broker blocked (1, with its reason, e.g. "low on memory") or
 * unblocked (0) this connection's publishes: a resource alarm. While
 * blocked, mq_publish() holds copies and sends them on connection.unblocked.
 * Also called with 0 when the connection is lost or freed while blocked. */
typedef void (*mq_blocked_cb)(void *arg, int blocked, const char *reason);
void   mq_on_blocked(mq_t *mq, mq_blocked_cb cb, void *arg);
int    mq_is_open(const mq_t *mq);
/* Close (channel and connection, best effort) and free. Pending confirm
 * callbacks fire with ok=0. */
void  mq_free(mq_t *mq);

#endif

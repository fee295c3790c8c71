/*
 * SUMMARY
 *  queue/mq.c - AMQP 0-9-1 connection, consumer and confirmed publisher
 *  inside one worker's event loop (librabbitmq 0.11).
 * DESCRIPTION
 *  After the blocking set-up, the only calls into librabbitmq that read are
 *  amqp_simple_wait_frame_noblock() with a zero timeout, made when the
 *  socket is readable or the library already holds buffered frames. A
 *  delivery arrives as three kinds of frames (basic.deliver, a content
 *  header, body fragments) which are assembled here without ever waiting
 *  for the next one: amqp_consume_message() would block inside the library
 *  for the remainder of a large message.
 *
 *  Confirms: after confirm.select the broker numbers our publishes 1, 2, ...
 *  and answers basic.ack / basic.nack, possibly with multiple=1 covering
 *  every earlier sequence number. Pending confirms are kept in publish
 *  order, so "multiple" resolves a prefix.
 *
 *  Publishing writes through librabbitmq's blocking send. Event bodies are
 *  small and the broker is near; a large backlog would show as latency in
 *  the loop, which is the seam for a buffered writer later.
 *
 *  Resource alarms: the broker stops reading from a publishing connection
 *  while its memory or disk alarm is in effect, so a send would fill the
 *  socket buffer and then block the loop. The connection.blocked
 *  capability makes the broker say so (connection.blocked with a reason,
 *  later connection.unblocked); meanwhile publishes are copied and held
 *  here, in order, and sent when it unblocks. Their confirm callbacks fire
 *  as usual, later; ok=0 if the connection is lost first.
 *
 *  Writes are batched per loop iteration. The first publish, ack or nack
 *  of an iteration corks the socket (TCP_CORK) and arms a zero-delay
 *  timer that runs at the end of it: a librabbitmq publish is three
 *  send()s and an ack one more, and without the cork each of them is its
 *  own loopback segment that wakes the broker. Acks wait for that timer
 *  too: the unsettled deliveries are kept in tag order, and acks that
 *  settle a prefix of them go out as one basic.ack with multiple=1; the
 *  others are sent one by one, so no ack ever waits for a slower message.
 *  Nacks are sent at once (corked). Blocking RPCs flush first, so they
 *  never wait on data held back.
 *
 *  Memory: at each content header the owner admits the delivery or not
 *  (mq_on_admit) before its body is allocated; a refused delivery is
 *  nacked with requeue at once and its body frames are read past, like
 *  the content of a basic.return. A body announced above cfg.max_body
 *  gets a buffer of cfg.head_bytes: the rest is read and dropped, and the
 *  delivery is handed over truncated. The library's channel pool is
 *  recycled after every frame (each handler copies what it keeps), so
 *  reading a large body holds one frame, not the body.
 *
 *  Pausing: RabbitMQ applies a changed basic.qos only to consumers made
 *  after it, so the owner's budget pauses by cancelling the consumer and
 *  resumes by consuming again. Neither waits: cancel-ok and consume-ok
 *  arrive as frames, and a pause or resume asked while the other is in
 *  flight is sent when its -ok comes (cons and want_consume below).
 * DIAGNOSTICS
 *  Set-up failures return NULL with the broker's reply text. A lost
 *  connection is reported once through mq_lost_cb.
 */
#include "queue/mq.h"

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>

#include "core/list.h"
#include "core/log.h"
#include "core/util.h"

#define MQ_CHANNEL 1

typedef struct pending_confirm {
    uint64_t      seq;
    mq_confirm_cb cb;
    void         *arg;
    int           returned; /* basic.return came for it: its ack is a failure */
} pending_confirm_t;

typedef enum { RX_METHOD = 0, RX_HEADER, RX_BODY } rx_state_t;

/* The consumer: made by mq_consume(), cancelled and made again by
 * mq_pause()/mq_resume() without waiting. */
typedef enum {
    CONS_NONE = 0,   /* mq_consume() not called yet */
    CONS_ACTIVE,     /* consuming (consumer_tag) */
    CONS_CANCELLING, /* basic.cancel sent, cancel-ok awaited */
    CONS_IDLE,       /* no consumer */
    CONS_STARTING,   /* basic.consume sent, consume-ok awaited */
} cons_state_t;

/* A publish held while the broker blocks us: everything copied. */
typedef struct held_publish {
    STAILQ_ENTRY(held_publish) next;
    char                *exchange, *routing_key, *body, *content_type, *message_id;
    size_t               len;
    int                  priority, persistent, mandatory;
    uint64_t             timestamp_s; /* when it was held, unless given */
    mq_header_t         *headers;
    size_t               nheaders;
    mq_confirm_cb        cb;
    void                *arg;
} held_publish_t;

struct mq {
    loop_t                  *loop;
    amqp_connection_state_t  conn;
    int                      fd;
    int                      open;
    int                      registered;
    mq_config_t              cfg; /* strings borrowed from the caller */
    mq_delivery_cb           on_delivery;
    mq_lost_cb               on_lost;
    void                    *arg;
    char                    *consumer_tag;
    int                      cancelled;    /* mq_cancel(): no consumer any more, for good */
    cons_state_t             cons;
    int                      want_consume; /* mq_resume() last, not mq_pause() */
    mq_admit_cb              on_admit;
    void                    *admit_arg;
    uint64_t                 next_seq;
    pending_confirm_t       *pend;
    size_t                   npend, pend_cap, pend_head;
    /* delivery being assembled */
    rx_state_t               rx;
    mq_delivery_t           *cur;
    size_t                   cur_size;  /* announced */
    size_t                   cur_recv;  /* body bytes read so far */
    size_t                   cur_keep;  /* of them kept in cur->body */
    int                      cur_skip; /* basic.return content, a refused delivery: discard */
    loop_timer_t             hb_timer;
    loop_timer_t             drain_timer;
    unsigned                 drain_handed; /* deliveries handed over by this drain() */
    loop_timer_t             lost_timer;
    char                     lost_why[300];
    int                      in_drain;
    int                      corked;      /* TCP_CORK is set on the socket */
    int                      flush_armed; /* flush_timer runs at the end of this iteration */
    loop_timer_t             flush_timer;
    /* deliveries not yet settled on the wire, in tag order (at most the
     * prefetch window); ack_wanted marks those mq_ack() has settled */
    struct unsettled { uint64_t tag; int ack_wanted; } *uns;
    size_t                   nuns, uns_cap;
    /* connection.blocked: publishes held until connection.unblocked */
    int                      blocked;
    STAILQ_HEAD(, held_publish) held; /* FIFO: sent in the order given */
    size_t                   nheld;
    mq_blocked_cb            on_blocked;
    void                    *blocked_arg;
};

static void copy_bytes(char **dst, amqp_bytes_t b)
{
    *dst = xstrndup(b.bytes ? (const char *)b.bytes : "", b.len);
}

const char *mq_strerror(int status)
{
    switch (status) {
    case MQ_OK: return "ok";
    case MQ_ECONNECT: return "cannot connect to the broker";
    case MQ_EPROTO: return "the broker refused the operation";
    case MQ_ECLOSED: return "the broker connection is closed";
    default: return "unknown AMQP error";
    }
}

void mq_delivery_free(mq_delivery_t *d)
{
    if (d == NULL)
        return;
    free(d->body);
    free(d->message_id);
    for (size_t i = 0; i < d->nheaders; i++) {
        free(d->hkeys[i]);
        free(d->hvals[i]);
    }
    free(d->hkeys);
    free(d->hvals);
    free(d);
}

const char *mq_delivery_header(const mq_delivery_t *d, const char *key)
{
    for (size_t i = 0; i < d->nheaders; i++)
        if (strcmp(d->hkeys[i], key) == 0)
            return d->hvals[i];
    return NULL;
}

static void copy_headers(mq_delivery_t *d, const amqp_table_t *t)
{
    for (int i = 0; i < t->num_entries; i++) {
        const amqp_table_entry_t *e = &t->entries[i];
        char num[32];
        amqp_bytes_t v;
        switch (e->value.kind) {
        case AMQP_FIELD_KIND_UTF8:
        case AMQP_FIELD_KIND_BYTES:
            v = e->value.value.bytes;
            break;
        case AMQP_FIELD_KIND_I32:
            snprintf(num, sizeof(num), "%d", e->value.value.i32);
            v = amqp_cstring_bytes(num);
            break;
        case AMQP_FIELD_KIND_I64:
            snprintf(num, sizeof(num), "%lld", (long long)e->value.value.i64);
            v = amqp_cstring_bytes(num);
            break;
        default:
            continue; /* x-death tables and other structured values */
        }
        d->hkeys = xrealloc(d->hkeys, (d->nheaders + 1) * sizeof(char *));
        d->hvals = xrealloc(d->hvals, (d->nheaders + 1) * sizeof(char *));
        copy_bytes(&d->hkeys[d->nheaders], e->key);
        copy_bytes(&d->hvals[d->nheaders], v);
        d->nheaders++;
    }
}

static void reply_text(amqp_rpc_reply_t r, const char *what, char *err, size_t errlen)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        snprintf(err, errlen, "%s: ok", what);
        break;
    case AMQP_RESPONSE_NONE:
        snprintf(err, errlen, "%s: missing RPC reply", what);
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(err, errlen, "%s: %s", what, amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            snprintf(err, errlen, "%s: connection closed by broker: %u %.*s", what, m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            snprintf(err, errlen, "%s: channel closed by broker: %u %.*s", what, m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
        } else {
            snprintf(err, errlen, "%s: unexpected broker method 0x%08x", what, r.reply.id);
        }
        break;
    }
}

int mq_rpc_check(amqp_connection_state_t conn, const char *what, char *err, size_t errlen)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(conn);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    reply_text(r, what, err, errlen);
    return -1;
}

static int rpc_ok(mq_t *mq, const char *what, char *err, size_t errlen)
{
    return mq_rpc_check(mq->conn, what, err, errlen);
}

int mq_declare_outbound(amqp_connection_state_t conn, int channel, const char *queue,
                        const char *events_exchange, char *err, size_t errlen)
{
    amqp_table_entry_t prio;
    prio.key = amqp_cstring_bytes("x-max-priority");
    prio.value.kind = AMQP_FIELD_KIND_I32;
    prio.value.value.i32 = 10;
    amqp_table_t qargs = { 1, &prio };
    amqp_queue_declare(conn, (amqp_channel_t)channel, amqp_cstring_bytes(queue), 0, 1, 0, 0, qargs);
    if (mq_rpc_check(conn, "declare queue", err, errlen) < 0)
        return -1;
    amqp_exchange_declare(conn, (amqp_channel_t)channel, amqp_cstring_bytes(events_exchange),
                          amqp_cstring_bytes("topic"), 0, 1, 0, 0, amqp_empty_table);
    return mq_rpc_check(conn, "declare events exchange", err, errlen);
}

/* ---- write batching ---- */

static void connection_lost(mq_t *mq, const char *why);

static void uncork(mq_t *mq)
{
    if (!mq->corked)
        return;
    mq->corked = 0;
    int off = 0;
    /* pushes whatever the kernel held back; a failure here surfaces on
     * the next send or read */
    (void)setsockopt(mq->fd, IPPROTO_TCP, TCP_CORK, &off, sizeof(off));
}

/* Hold writes back until the end of this loop iteration. */
static void batch_begin(mq_t *mq)
{
    if (mq->flush_armed)
        return;
    mq->flush_armed = 1;
    loop_timer_set(mq->loop, &mq->flush_timer, 0);
    int on = 1;
    if (!mq->corked && mq->fd >= 0 &&
        setsockopt(mq->fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on)) == 0)
        mq->corked = 1; /* else (not TCP) writes just go out one by one */
}

/* Index of tag in mq->uns, or -1. */
static long uns_find(const mq_t *mq, uint64_t tag)
{
    size_t lo = 0, hi = mq->nuns;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (mq->uns[mid].tag < tag)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < mq->nuns && mq->uns[lo].tag == tag ? (long)lo : -1;
}

static void uns_remove(mq_t *mq, size_t i, size_t n)
{
    memmove(mq->uns + i, mq->uns + i + n, (mq->nuns - i - n) * sizeof(*mq->uns));
    mq->nuns -= n;
}

static int send_ack(mq_t *mq, uint64_t tag, int multiple)
{
    if (amqp_basic_ack(mq->conn, MQ_CHANNEL, tag, multiple) != AMQP_STATUS_OK) {
        connection_lost(mq, "basic.ack: send failed");
        return -1;
    }
    return 0;
}

/* Send the acks mq_ack() collected: the settled prefix as one. */
static void flush_acks(mq_t *mq)
{
    size_t k = 0;
    while (k < mq->nuns && mq->uns[k].ack_wanted)
        k++;
    if (k > 0) {
        if (send_ack(mq, mq->uns[k - 1].tag, k > 1) < 0)
            return;
        uns_remove(mq, 0, k);
    }
    for (size_t i = 0; i < mq->nuns && mq->open;) {
        if (!mq->uns[i].ack_wanted) {
            i++;
            continue;
        }
        if (send_ack(mq, mq->uns[i].tag, 0) < 0)
            return;
        uns_remove(mq, i, 1);
    }
}

/* End of the batch: acks out, cork off. */
static void flush(mq_t *mq)
{
    mq->flush_armed = 0;
    loop_timer_cancel(mq->loop, &mq->flush_timer);
    if (mq->open)
        flush_acks(mq);
    uncork(mq);
}

static void on_flush_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    flush(arg);
}

/* ---- confirms ---- */

static void pend_push(mq_t *mq, uint64_t seq, mq_confirm_cb cb, void *arg)
{
    if (mq->pend_head + mq->npend == mq->pend_cap) {
        if (mq->pend_head > 0) {
            memmove(mq->pend, mq->pend + mq->pend_head, mq->npend * sizeof(*mq->pend));
            mq->pend_head = 0;
        }
        if (mq->npend == mq->pend_cap) {
            mq->pend_cap = mq->pend_cap ? mq->pend_cap * 2 : 64;
            mq->pend = xrealloc(mq->pend, mq->pend_cap * sizeof(*mq->pend));
        }
    }
    mq->pend[mq->pend_head + mq->npend++] = (pending_confirm_t){ seq, cb, arg, 0 };
}

/* Resolve seq (or every seq <= tag when multiple). Callbacks may publish,
 * which appends to the array: walk by index and re-read the base. */
static void resolve_confirms(mq_t *mq, uint64_t tag, int multiple, int ok)
{
    if (multiple) {
        while (mq->npend > 0 && mq->pend[mq->pend_head].seq <= tag) {
            pending_confirm_t p = mq->pend[mq->pend_head];
            mq->pend_head++;
            mq->npend--;
            p.cb(p.arg, ok && !p.returned);
        }
        return;
    }
    for (size_t i = 0; i < mq->npend; i++) {
        pending_confirm_t *pc = &mq->pend[mq->pend_head + i];
        if (pc->seq != tag)
            continue;
        pending_confirm_t p = *pc;
        memmove(pc, pc + 1, (mq->npend - i - 1) * sizeof(*pc));
        mq->npend--;
        p.cb(p.arg, ok && !p.returned);
        return;
    }
}

/* A mandatory publish no queue took: the broker's ack that follows is a
 * failure for its sender. */
static void mark_returned(mq_t *mq, uint64_t seq)
{
    for (size_t i = 0; i < mq->npend; i++)
        if (mq->pend[mq->pend_head + i].seq == seq)
            mq->pend[mq->pend_head + i].returned = 1;
}

static void fail_all_confirms(mq_t *mq)
{
    while (mq->npend > 0) {
        pending_confirm_t p = mq->pend[mq->pend_head];
        mq->pend_head++;
        mq->npend--;
        p.cb(p.arg, 0);
    }
}

/* ---- publishes held while the broker blocks us ---- */

static void held_free(held_publish_t *h)
{
    free(h->exchange);
    free(h->routing_key);
    free(h->body);
    free(h->content_type);
    free(h->message_id);
    for (size_t i = 0; i < h->nheaders; i++) {
        free((char *)h->headers[i].key);
        free((char *)h->headers[i].value);
    }
    free(h->headers);
    free(h);
}

static void hold_publish(mq_t *mq, const char *exchange, const char *routing_key, const void *body,
                         size_t len, const mq_publish_opts_t *opts, mq_confirm_cb cb, void *arg)
{
    held_publish_t *h = xcalloc(1, sizeof(*h));
    h->exchange = xstrdup(exchange);
    h->routing_key = xstrdup(routing_key);
    h->body = xmalloc(len ? len : 1);
    if (len)
        memcpy(h->body, body, len);
    h->len = len;
    h->priority = -1;
    h->persistent = 1;
    h->timestamp_s = opts && opts->timestamp_s ? opts->timestamp_s : util_wall_ms() / 1000;
    if (opts) {
        h->content_type = opts->content_type ? xstrdup(opts->content_type) : NULL;
        h->message_id = opts->message_id ? xstrdup(opts->message_id) : NULL;
        h->priority = opts->priority;
        h->persistent = opts->persistent;
        h->mandatory = opts->mandatory;
        if (opts->nheaders > 0) {
            h->headers = xcalloc(opts->nheaders, sizeof(*h->headers));
            for (size_t i = 0; i < opts->nheaders; i++) {
                h->headers[i].key = xstrdup(opts->headers[i].key);
                h->headers[i].value = xstrdup(opts->headers[i].value);
            }
            h->nheaders = opts->nheaders;
        }
    }
    h->cb = cb;
    h->arg = arg;
    STAILQ_INSERT_TAIL(&mq->held, h, next);
    mq->nheld++;
}

static held_publish_t *held_pop(mq_t *mq)
{
    held_publish_t *h = STAILQ_FIRST(&mq->held);
    STAILQ_REMOVE_HEAD(&mq->held, next);
    mq->nheld--;
    return h;
}

/* Every held publish fails (ok=0), in order. */
static void fail_held(mq_t *mq)
{
    while (!STAILQ_EMPTY(&mq->held)) {
        held_publish_t *h = held_pop(mq);
        mq_confirm_cb cb = h->cb;
        void *arg = h->arg;
        held_free(h);
        cb(arg, 0);
    }
}

static int send_publish(mq_t *mq, const char *exchange, const char *routing_key, const void *body,
                        size_t len, const mq_publish_opts_t *opts, mq_confirm_cb cb, void *arg);

/* Unblocked: send what was held, in order. A send that fails leaves that
 * one and the rest to the lost connection's timer. */
static void release_held(mq_t *mq)
{
    while (!STAILQ_EMPTY(&mq->held)) {
        held_publish_t *h = STAILQ_FIRST(&mq->held);
        mq_publish_opts_t o = { h->content_type, h->message_id, h->priority, h->persistent,
                                h->headers, h->nheaders, h->mandatory, h->timestamp_s };
        if (send_publish(mq, h->exchange, h->routing_key, h->body, h->len, &o, h->cb, h->arg) < 0)
            return; /* the connection is lost: this one and the rest fail with it */
        held_free(held_pop(mq));
    }
}

static void set_blocked(mq_t *mq, int blocked, const char *reason)
{
    if (mq->blocked == blocked)
        return;
    mq->blocked = blocked;
    if (mq->on_blocked)
        mq->on_blocked(mq->blocked_arg, blocked, reason);
}

/* ---- connection loss ---- */

static void on_lost_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    mq_t *mq = arg;
    fail_all_confirms(mq);
    fail_held(mq);
    if (mq->on_lost)
        mq->on_lost(mq->arg, mq->lost_why);
}

/* The connection is unusable from here on (mq_publish, mq_ack ... fail at
 * once), but the confirm callbacks and on_lost run from a timer: a loss
 * found inside mq_publish() or mq_ack() must not free the caller's job
 * while the caller is still using it. */
static void connection_lost(mq_t *mq, const char *why)
{
    if (!mq->open)
        return;
    mq->open = 0;
    log_error("amqp", "connection_lost", "reason=%s", LOG_Q(why));
    snprintf(mq->lost_why, sizeof(mq->lost_why), "%s", why);
    if (mq->registered) {
        loop_fd_del(mq->loop, mq->fd);
        mq->registered = 0;
    }
    loop_timer_cancel(mq->loop, &mq->hb_timer);
    loop_timer_cancel(mq->loop, &mq->drain_timer);
    loop_timer_cancel(mq->loop, &mq->flush_timer);
    mq->flush_armed = 0;
    mq->corked = 0;
    mq->nuns = 0; /* the broker requeues them */
    mq_delivery_free(mq->cur);
    mq->cur = NULL;
    set_blocked(mq, 0, why);
    loop_timer_set(mq->loop, &mq->lost_timer, 0);
}

/* ---- frame handling ---- */

static void finish_delivery(mq_t *mq)
{
    mq_delivery_t *d = mq->cur;
    mq->cur = NULL;
    mq->rx = RX_METHOD;
    if (mq->cur_skip) {
        mq_delivery_free(d);
        return;
    }
    mq->drain_handed++;
    if (mq->on_delivery)
        mq->on_delivery(mq->arg, d);
    else
        mq_delivery_free(d);
}

/* basic.cancel of the current consumer; cancel-ok comes as a frame. */
static void send_cancel(mq_t *mq)
{
    amqp_basic_cancel_t req;
    memset(&req, 0, sizeof(req));
    req.consumer_tag = amqp_cstring_bytes(mq->consumer_tag ? mq->consumer_tag : "");
    req.nowait = 0;
    mq->cons = CONS_CANCELLING;
    int r = amqp_send_method(mq->conn, MQ_CHANNEL, AMQP_BASIC_CANCEL_METHOD, &req);
    if (r != AMQP_STATUS_OK)
        connection_lost(mq, "basic.cancel: send failed");
}

/* basic.consume of cfg.queue (the broker names the consumer); consume-ok
 * comes as a frame. The channel's basic.qos still holds. */
static void send_consume(mq_t *mq)
{
    amqp_basic_consume_t req;
    memset(&req, 0, sizeof(req));
    req.queue = amqp_cstring_bytes(mq->cfg.queue);
    req.consumer_tag = amqp_empty_bytes;
    req.arguments = amqp_empty_table;
    mq->cons = CONS_STARTING;
    int r = amqp_send_method(mq->conn, MQ_CHANNEL, AMQP_BASIC_CONSUME_METHOD, &req);
    if (r != AMQP_STATUS_OK)
        connection_lost(mq, "basic.consume: send failed");
}

static void handle_method(mq_t *mq, amqp_frame_t *f)
{
    amqp_method_t *m = &f->payload.method;
    switch (m->id) {
    case AMQP_BASIC_DELIVER_METHOD: {
        amqp_basic_deliver_t *dv = m->decoded;
        mq->cur = xcalloc(1, sizeof(mq_delivery_t));
        mq->cur->tag = dv->delivery_tag;
        mq->cur->redelivered = dv->redelivered;
        if (mq->nuns == mq->uns_cap) {
            mq->uns_cap = mq->uns_cap ? mq->uns_cap * 2 : 64;
            mq->uns = xrealloc(mq->uns, mq->uns_cap * sizeof(*mq->uns));
        }
        /* tags grow on a channel: the array stays sorted */
        mq->uns[mq->nuns++] = (struct unsettled){ dv->delivery_tag, 0 };
        mq->cur_skip = 0;
        mq->rx = RX_HEADER;
        break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        /* an unroutable mandatory publish: its content follows, and its
         * correlation id names the publish (see send_publish) */
        amqp_basic_return_t *r = m->decoded;
        char ex[256], rk[256], text[256];
        snprintf(ex, sizeof(ex), "%.*s", (int)r->exchange.len, (const char *)r->exchange.bytes);
        snprintf(rk, sizeof(rk), "%.*s", (int)r->routing_key.len, (const char *)r->routing_key.bytes);
        snprintf(text, sizeof(text), "%.*s", (int)r->reply_text.len, (const char *)r->reply_text.bytes);
        log_error("amqp", "publish_returned", "exchange=\"%s\" routing_key=\"%s\" code=%u reason=\"%s\"", ex, rk,
                  (unsigned)r->reply_code, text);
        mq->cur = xcalloc(1, sizeof(mq_delivery_t));
        mq->cur_skip = 1;
        mq->rx = RX_HEADER;
        break;
    }
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *a = m->decoded;
        resolve_confirms(mq, a->delivery_tag, a->multiple, 1);
        break;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *n = m->decoded;
        log_warn("amqp", "publish_nacked", "seq=%llu multiple=%d",
                 (unsigned long long)n->delivery_tag, n->multiple);
        resolve_confirms(mq, n->delivery_tag, n->multiple, 0);
        break;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD: {
        amqp_connection_blocked_t *b = m->decoded;
        char raw[128], why[160];
        snprintf(raw, sizeof(raw), "%.*s", (int)b->reason.len, (const char *)b->reason.bytes);
        util_quote_text(raw, why, sizeof(why));
        log_warn("amqp", "broker_blocked", "reason=%s unconfirmed=%zu", LOG_Q(why), mq->npend);
        set_blocked(mq, 1, why);
        break;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD:
        log_info("amqp", "broker_unblocked", "held=%zu", mq->nheld);
        set_blocked(mq, 0, NULL);
        release_held(mq);
        break;
    case AMQP_BASIC_CANCEL_OK_METHOD:
        mq->cons = CONS_IDLE;
        free(mq->consumer_tag);
        mq->consumer_tag = NULL;
        if (mq->cancelled)
            log_info("amqp", "consumer_cancelled", "queue=%s", LOG_Q(mq->cfg.queue));
        else if (mq->want_consume)
            send_consume(mq); /* resumed while the cancel was in flight */
        break;
    case AMQP_BASIC_CONSUME_OK_METHOD: {
        amqp_basic_consume_ok_t *ok = m->decoded;
        free(mq->consumer_tag);
        copy_bytes(&mq->consumer_tag, ok->consumer_tag);
        mq->cons = CONS_ACTIVE;
        if (mq->cancelled || !mq->want_consume)
            send_cancel(mq); /* paused or drained while the consume was in flight */
        break;
    }
    case AMQP_BASIC_CANCEL_METHOD:
        /* the broker cancelled us (queue deleted, node failover) */
        log_error("amqp", "consumer_cancelled_by_broker", "queue=%s", LOG_Q(mq->cfg.queue));
        mq->cancelled = 1;
        connection_lost(mq, "consumer cancelled by the broker");
        break;
    case AMQP_CHANNEL_CLOSE_METHOD: {
        amqp_channel_close_t *c = m->decoded;
        char why[300];
        snprintf(why, sizeof(why), "channel closed by broker: %u %.*s", c->reply_code,
                 (int)c->reply_text.len, (char *)c->reply_text.bytes);
        amqp_channel_close_ok_t ok = { 0 };
        amqp_send_method(mq->conn, MQ_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        connection_lost(mq, why);
        break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        amqp_connection_close_t *c = m->decoded;
        char why[300];
        snprintf(why, sizeof(why), "connection closed by broker: %u %.*s", c->reply_code,
                 (int)c->reply_text.len, (char *)c->reply_text.bytes);
        amqp_connection_close_ok_t ok = { 0 };
        amqp_send_method(mq->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        connection_lost(mq, why);
        break;
    }
    default:
        log_debug("amqp", "unexpected_method", "id=0x%08x", m->id);
        break;
    }
}

static void handle_frame(mq_t *mq, amqp_frame_t *f)
{
    switch (f->frame_type) {
    case AMQP_FRAME_METHOD:
        if (mq->rx != RX_METHOD) {
            connection_lost(mq, "protocol error: method frame inside message content");
            return;
        }
        handle_method(mq, f);
        return;
    case AMQP_FRAME_HEADER: {
        if (mq->rx != RX_HEADER) {
            connection_lost(mq, "protocol error: unexpected content header");
            return;
        }
        amqp_basic_properties_t *p = f->payload.properties.decoded;
        mq->cur_size = (size_t)f->payload.properties.body_size;
        if (p) {
            if (p->_flags & AMQP_BASIC_PRIORITY_FLAG)
                mq->cur->priority = p->priority;
            if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
                copy_bytes(&mq->cur->message_id, p->message_id);
            if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG)
                mq->cur->timestamp_s = p->timestamp;
            if (p->_flags & AMQP_BASIC_HEADERS_FLAG)
                copy_headers(mq->cur, &p->headers);
            if (mq->cur_skip && (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG)) {
                char seq[24];
                snprintf(seq, sizeof(seq), "%.*s", (int)p->correlation_id.len, (const char *)p->correlation_id.bytes);
                mark_returned(mq, strtoull(seq, NULL, 10));
            }
        }
        mq->cur->announced = mq->cur_size;
        mq->cur_keep = mq->cur_size;
        if (!mq->cur_skip && mq->cfg.max_body && mq->cur_size > mq->cfg.max_body) {
            mq->cur->truncated = 1;
            mq->cur_keep = mq->cfg.head_bytes < mq->cur_size ? mq->cfg.head_bytes : mq->cur_size;
        }
        if (!mq->cur_skip && mq->on_admit && !mq->on_admit(mq->admit_arg, mq->cur_size, mq->cur->truncated)) {
            /* back to the queue, its body never buffered */
            log_info("amqp", "delivery_refused", "tag=%llu bytes=%zu action=requeue",
                     (unsigned long long)mq->cur->tag, mq->cur_size);
            mq->cur_skip = 1;
            if (mq_nack(mq, mq->cur->tag, 1) < 0)
                return; /* lost: mq->cur is gone */
        }
        if (mq->cur_skip)
            mq->cur_keep = 0;
        mq->cur_recv = 0;
        mq->cur->body = xmalloc(mq->cur_keep + 1);
        mq->cur->body[0] = '\0';
        mq->cur->len = 0;
        if (mq->cur_size == 0)
            finish_delivery(mq);
        else
            mq->rx = RX_BODY;
        return;
    }
    case AMQP_FRAME_BODY: {
        if (mq->rx != RX_BODY) {
            connection_lost(mq, "protocol error: unexpected content body");
            return;
        }
        amqp_bytes_t b = f->payload.body_fragment;
        if (mq->cur_recv + b.len > mq->cur_size) {
            connection_lost(mq, "protocol error: body larger than announced");
            return;
        }
        if (mq->cur->len < mq->cur_keep) {
            size_t n = mq->cur_keep - mq->cur->len < b.len ? mq->cur_keep - mq->cur->len : b.len;
            memcpy(mq->cur->body + mq->cur->len, b.bytes, n);
            mq->cur->len += n;
            mq->cur->body[mq->cur->len] = '\0';
        }
        mq->cur_recv += b.len;
        if (mq->cur_recv == mq->cur_size)
            finish_delivery(mq);
        return;
    }
    default:
        return;
    }
}

/* Deliveries handed over per drain(): each costs a JSON parse and a MIME
 * build, so a broker window of thousands would otherwise keep the loop
 * from every other socket and timer (Redis answers read only after their
 * timeouts fired, SMTP replies late) for seconds. */
#define MQ_DRAIN_DELIVERIES 32

/* Read and handle the complete frames available without blocking, up to
 * MQ_DRAIN_DELIVERIES deliveries; the rest on the next pass of the loop. */
static void drain(mq_t *mq)
{
    if (mq->in_drain)
        return; /* a callback published: the outer pass picks up the rest */
    mq->in_drain = 1;
    mq->drain_handed = 0;
    while (mq->open) {
        if (mq->drain_handed >= MQ_DRAIN_DELIVERIES) {
            /* what the library already read is not the socket's any more:
             * epoll would not report it */
            if (amqp_frames_enqueued(mq->conn) || amqp_data_in_buffer(mq->conn))
                loop_timer_set(mq->loop, &mq->drain_timer, 0);
            break;
        }
        amqp_frame_t f;
        struct timeval tv = { 0, 0 };
        int r = amqp_simple_wait_frame_noblock(mq->conn, &f, &tv);
        if (r == AMQP_STATUS_TIMEOUT)
            break;
        if (r != AMQP_STATUS_OK) {
            char why[200];
            snprintf(why, sizeof(why), "read: %s", amqp_error_string2(r));
            connection_lost(mq, why);
            break;
        }
        if (f.channel != MQ_CHANNEL && f.channel != 0)
            continue;
        handle_frame(mq, &f);
        /* every handler copied what it keeps: recycle the frame's memory
         * (a large body's frames must not pile up in the library's pool) */
        if (mq->open && !amqp_frames_enqueued(mq->conn))
            amqp_maybe_release_buffers(mq->conn);
    }
    mq->in_drain = 0;
}

static void on_readable(loop_t *loop, int fd, unsigned events, void *arg)
{
    drain(arg);
}

static void on_drain_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    drain(arg);
}

static void on_heartbeat(loop_t *loop, loop_timer_t *t, void *arg)
{
    mq_t *mq = arg;
    if (!mq->open)
        return;
    amqp_frame_t hb;
    memset(&hb, 0, sizeof(hb));
    hb.frame_type = AMQP_FRAME_HEARTBEAT;
    hb.channel = 0;
    int r = amqp_send_frame(mq->conn, &hb);
    if (r != AMQP_STATUS_OK) {
        char why[200];
        snprintf(why, sizeof(why), "heartbeat: %s", amqp_error_string2(r));
        connection_lost(mq, why);
        return;
    }
    drain(mq);
    if (mq->open)
        loop_timer_set(loop, &mq->hb_timer, mq->cfg.heartbeat * 1000u / 2);
}

/* ---- set-up ---- */

mq_t *mq_open(loop_t *loop, const mq_config_t *cfg, char *err, size_t errlen)
{
    mq_t *mq = xcalloc(1, sizeof(*mq));
    mq->loop = loop;
    mq->cfg = *cfg;
    mq->fd = -1;
    mq->next_seq = 1;
    STAILQ_INIT(&mq->held);
    loop_timer_init(&mq->hb_timer, on_heartbeat, mq);
    loop_timer_init(&mq->drain_timer, on_drain_timer, mq);
    loop_timer_init(&mq->lost_timer, on_lost_timer, mq);
    loop_timer_init(&mq->flush_timer, on_flush_timer, mq);
    mq->conn = amqp_new_connection();
    /* a broker that accepts the connection and then hangs must not hold
     * this worker's thread (and SIGTERM) forever in the set-up RPCs */
    struct timeval rpc_tv = { 10, 0 };
    amqp_set_handshake_timeout(mq->conn, &rpc_tv);
    amqp_set_rpc_timeout(mq->conn, &rpc_tv);
    amqp_socket_t *sock = amqp_tcp_socket_new(mq->conn);
    if (sock == NULL) {
        snprintf(err, errlen, "cannot create AMQP socket");
        goto fail;
    }
    struct timeval tv = { 10, 0 };
    int r = amqp_socket_open_noblock(sock, cfg->host, (int)cfg->port, &tv);
    if (r != AMQP_STATUS_OK) {
        snprintf(err, errlen, "connect to %s:%u: %s", cfg->host, cfg->port, amqp_error_string2(r));
        goto fail;
    }
    /* Without consumer_cancel_notify the broker ends our consumer silently
     * when the queue is deleted or its node fails: the worker would stay
     * connected and never receive again. With it, a basic.cancel arrives
     * and is handled as a lost connection (reconnect, redeclare). And
     * connection.blocked: the broker says when a resource alarm stops it
     * reading our publishes (they are held here meanwhile). The library
     * merges these into its default capabilities. */
    amqp_table_entry_t cap[2] = {
        { .key = amqp_cstring_bytes("consumer_cancel_notify"),
          .value = { .kind = AMQP_FIELD_KIND_BOOLEAN, .value = { .boolean = 1 } } },
        { .key = amqp_cstring_bytes("connection.blocked"),
          .value = { .kind = AMQP_FIELD_KIND_BOOLEAN, .value = { .boolean = 1 } } },
    };
    amqp_table_entry_t prop = { .key = amqp_cstring_bytes("capabilities"),
                                .value = { .kind = AMQP_FIELD_KIND_TABLE,
                                           .value = { .table = { 2, cap } } } };
    amqp_table_t props = { 1, &prop };
    amqp_rpc_reply_t lr = amqp_login_with_properties(mq->conn, cfg->vhost, 0, 131072,
                                                     (int)cfg->heartbeat, &props,
                                                     AMQP_SASL_METHOD_PLAIN, cfg->user,
                                                     cfg->password);
    if (lr.reply_type != AMQP_RESPONSE_NORMAL) {
        reply_text(lr, "login", err, errlen);
        goto fail;
    }
    amqp_channel_open(mq->conn, MQ_CHANNEL);
    if (rpc_ok(mq, "channel.open", err, errlen) < 0)
        goto fail;
    amqp_confirm_select(mq->conn, MQ_CHANNEL);
    if (rpc_ok(mq, "confirm.select", err, errlen) < 0)
        goto fail;

    if (mq_declare_outbound(mq->conn, MQ_CHANNEL, cfg->queue, cfg->events_exchange, err,
                            errlen) < 0)
        goto fail;
    amqp_queue_declare(mq->conn, MQ_CHANNEL, amqp_cstring_bytes(cfg->dead_queue), 0, 1, 0, 0,
                       amqp_empty_table);
    if (rpc_ok(mq, "declare dead-letter queue", err, errlen) < 0)
        goto fail;

    mq->fd = amqp_get_sockfd(mq->conn);
    if (loop_fd_add(loop, mq->fd, LOOP_READ, on_readable, mq) < 0) {
        snprintf(err, errlen, "cannot watch the AMQP socket");
        goto fail;
    }
    mq->registered = 1;
    mq->open = 1;
    if (cfg->heartbeat > 0)
        loop_timer_set(loop, &mq->hb_timer, cfg->heartbeat * 1000u / 2);
    /* set-up RPCs may have left frames buffered inside the library */
    loop_timer_set(loop, &mq->drain_timer, 0);
    return mq;
fail:
    amqp_connection_close(mq->conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(mq->conn);
    free(mq);
    return NULL;
}

int mq_consume(mq_t *mq, mq_delivery_cb on_delivery, mq_lost_cb on_lost, void *arg, char *err,
               size_t errlen)
{
    mq->on_delivery = on_delivery;
    mq->on_lost = on_lost;
    mq->arg = arg;
    amqp_basic_qos(mq->conn, MQ_CHANNEL, 0, (uint16_t)mq->cfg.prefetch, 0);
    if (rpc_ok(mq, "basic.qos", err, errlen) < 0)
        return -1;
    amqp_basic_consume_ok_t *ok = amqp_basic_consume(mq->conn, MQ_CHANNEL,
                                                     amqp_cstring_bytes(mq->cfg.queue),
                                                     amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    if (ok == NULL || rpc_ok(mq, "basic.consume", err, errlen) < 0) {
        if (ok == NULL && err[0] == '\0')
            snprintf(err, errlen, "basic.consume failed");
        return -1;
    }
    copy_bytes(&mq->consumer_tag, ok->consumer_tag);
    mq->cons = CONS_ACTIVE;
    mq->want_consume = 1;
    loop_timer_set(mq->loop, &mq->drain_timer, 0);
    return 0;
}

void mq_cancel(mq_t *mq)
{
    if (!mq->open || mq->cancelled)
        return;
    mq->cancelled = 1;
    mq->want_consume = 0;
    if (mq->cons == CONS_ACTIVE)
        send_cancel(mq); /* CONS_STARTING: at its consume-ok */
}

void mq_on_admit(mq_t *mq, mq_admit_cb cb, void *arg)
{
    mq->on_admit = cb;
    mq->admit_arg = arg;
}

void mq_pause(mq_t *mq)
{
    if (!mq->open)
        return;
    mq->want_consume = 0;
    if (mq->cons == CONS_ACTIVE)
        send_cancel(mq); /* CONS_STARTING: at its consume-ok */
}

void mq_resume(mq_t *mq)
{
    if (!mq->open || mq->cancelled)
        return;
    mq->want_consume = 1;
    if (mq->cons == CONS_IDLE)
        send_consume(mq); /* CONS_CANCELLING: at its cancel-ok */
}

int mq_declare_delay_queue(mq_t *mq, const char *name, unsigned ttl_ms, char *err, size_t errlen)
{
    amqp_table_entry_t a[3];
    a[0].key = amqp_cstring_bytes("x-message-ttl");
    a[0].value.kind = AMQP_FIELD_KIND_I32;
    a[0].value.value.i32 = (int32_t)ttl_ms;
    a[1].key = amqp_cstring_bytes("x-dead-letter-exchange");
    a[1].value.kind = AMQP_FIELD_KIND_UTF8;
    a[1].value.value.bytes = amqp_cstring_bytes("");
    a[2].key = amqp_cstring_bytes("x-dead-letter-routing-key");
    a[2].value.kind = AMQP_FIELD_KIND_UTF8;
    a[2].value.value.bytes = amqp_cstring_bytes(mq->cfg.queue);
    amqp_table_t args = { 3, a };
    flush(mq); /* an RPC: the request must leave now */
    amqp_queue_declare(mq->conn, MQ_CHANNEL, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
    return rpc_ok(mq, "declare delay queue", err, errlen);
}

int mq_publish(mq_t *mq, const char *exchange, const char *routing_key, const void *body,
               size_t len, const mq_publish_opts_t *opts, mq_confirm_cb cb, void *arg)
{
    if (!mq->open)
        return -1;
    if (mq->blocked || !STAILQ_EMPTY(&mq->held)) { /* after the held ones, never before */
        hold_publish(mq, exchange, routing_key, body, len, opts, cb, arg);
        return 0;
    }
    return send_publish(mq, exchange, routing_key, body, len, opts, cb, arg);
}

static int send_publish(mq_t *mq, const char *exchange, const char *routing_key, const void *body,
                        size_t len, const mq_publish_opts_t *opts, mq_confirm_cb cb, void *arg)
{
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof(p));
    p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.content_type = amqp_cstring_bytes(opts && opts->content_type ? opts->content_type
                                                                   : "application/json");
    p.delivery_mode = (opts == NULL || opts->persistent) ? 2 : 1;
    if (opts && opts->message_id) {
        p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        p.message_id = amqp_cstring_bytes(opts->message_id);
    }
    if (opts && opts->priority >= 0) {
        p._flags |= AMQP_BASIC_PRIORITY_FLAG;
        p.priority = (uint8_t)opts->priority;
    }
    /* when it was first enqueued: the broker reports the head message's
     * as its queue's age (docs/operations.md, "Queue summary") */
    p._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    p.timestamp = opts && opts->timestamp_s ? opts->timestamp_s : util_wall_ms() / 1000;
    amqp_table_entry_t entries[16];
    if (opts && opts->nheaders > 0) {
        size_t n = opts->nheaders > 16 ? 16 : opts->nheaders;
        for (size_t i = 0; i < n; i++) {
            entries[i].key = amqp_cstring_bytes(opts->headers[i].key);
            entries[i].value.kind = AMQP_FIELD_KIND_UTF8;
            entries[i].value.value.bytes = amqp_cstring_bytes(opts->headers[i].value);
        }
        p._flags |= AMQP_BASIC_HEADERS_FLAG;
        p.headers.num_entries = (int)n;
        p.headers.entries = entries;
    }
    /* mandatory: a publish no queue takes comes back (basic.return) before
     * its ack, carrying our sequence number as its correlation id */
    char seq[24];
    int mandatory = opts && opts->mandatory;
    if (mandatory) {
        snprintf(seq, sizeof(seq), "%llu", (unsigned long long)mq->next_seq);
        p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        p.correlation_id = amqp_cstring_bytes(seq);
    }
    amqp_bytes_t b = { len, (void *)body };
    batch_begin(mq);
    int r = amqp_basic_publish(mq->conn, MQ_CHANNEL, amqp_cstring_bytes(exchange),
                               amqp_cstring_bytes(routing_key), mandatory, 0, &p, b);
    if (r != AMQP_STATUS_OK) {
        char why[200];
        snprintf(why, sizeof(why), "publish: %s", amqp_error_string2(r));
        connection_lost(mq, why);
        return -1;
    }
    pend_push(mq, mq->next_seq++, cb, arg);
    /* the confirm may already sit in the library's buffer */
    if (amqp_frames_enqueued(mq->conn) || amqp_data_in_buffer(mq->conn))
        loop_timer_set(mq->loop, &mq->drain_timer, 0);
    return 0;
}

int mq_ack(mq_t *mq, uint64_t tag)
{
    if (!mq->open)
        return -1;
    batch_begin(mq);
    long i = uns_find(mq, tag);
    if (i < 0) /* not a delivery of this connection: the broker decides */
        return send_ack(mq, tag, 0);
    mq->uns[i].ack_wanted = 1; /* sent by flush() */
    return 0;
}

int mq_nack(mq_t *mq, uint64_t tag, int requeue)
{
    if (!mq->open)
        return -1;
    batch_begin(mq);
    long i = uns_find(mq, tag);
    if (i >= 0)
        uns_remove(mq, (size_t)i, 1);
    int r = amqp_basic_nack(mq->conn, MQ_CHANNEL, tag, 0, requeue);
    if (r != AMQP_STATUS_OK) {
        connection_lost(mq, "basic.nack: send failed");
        return -1;
    }
    return 0;
}

size_t mq_unconfirmed(const mq_t *mq)
{
    return mq->npend + mq->nheld;
}

void mq_on_blocked(mq_t *mq, mq_blocked_cb cb, void *arg)
{
    mq->on_blocked = cb;
    mq->blocked_arg = arg;
}

int mq_is_open(const mq_t *mq)
{
    return mq->open;
}

void mq_free(mq_t *mq)
{
    if (mq == NULL)
        return;
    flush(mq); /* collected acks first (a failure arms timers cancelled below) */
    if (mq->registered)
        loop_fd_del(mq->loop, mq->fd);
    loop_timer_cancel(mq->loop, &mq->hb_timer);
    loop_timer_cancel(mq->loop, &mq->drain_timer);
    loop_timer_cancel(mq->loop, &mq->lost_timer);
    if (mq->open) {
        mq->open = 0;
        /* A broker that no longer answers (frozen, partitioned) would hold
         * each closing RPC until the heartbeat gives up, 2 x heartbeat:
         * longer than any shutdown grace period. */
        struct timeval close_tv = { 1, 0 };
        amqp_set_rpc_timeout(mq->conn, &close_tv);
        amqp_channel_close(mq->conn, MQ_CHANNEL, AMQP_REPLY_SUCCESS);
        amqp_connection_close(mq->conn, AMQP_REPLY_SUCCESS);
    }
    set_blocked(mq, 0, "closed");
    fail_all_confirms(mq);
    fail_held(mq);
    mq_delivery_free(mq->cur);
    amqp_destroy_connection(mq->conn);
    free(mq->consumer_tag);
    free(mq->pend);
    free(mq->uns);
    free(mq);
}

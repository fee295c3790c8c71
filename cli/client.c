/*
 * SUMMARY
 *  cli/client.c - blocking enqueue-with-confirm and event subscription.
 * DESCRIPTION
 *  Uses librabbitmq's blocking calls. A confirm is awaited frame by frame
 *  so an unrelated frame (a basic.return, a delivery on a subscription
 *  opened on the same connection) is skipped instead of mistaken for it.
 */
#include "cli/client.h"

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "core/util.h"
#include "queue/mq.h"

#define CH 1

struct mp_client {
    amqp_connection_state_t conn;
    mp_client_opts_t        o;
    uint64_t                next_seq;
    char                   *sub_queue;
    int                     blocked;            /* connection.blocked, not yet unblocked */
    char                    blocked_reason[128];
};

/* connection.blocked / unblocked (a resource alarm on the broker). 1 when
 * f was one of them. */
static int note_blocked(mp_client_t *c, const amqp_frame_t *f)
{
    if (f->payload.method.id == AMQP_CONNECTION_BLOCKED_METHOD) {
        const amqp_connection_blocked_t *b = f->payload.method.decoded;
        c->blocked = 1;
        char raw[96];
        snprintf(raw, sizeof(raw), "%.*s", (int)b->reason.len, (const char *)b->reason.bytes);
        util_quote_text(raw, c->blocked_reason, sizeof(c->blocked_reason));
        return 1;
    }
    if (f->payload.method.id == AMQP_CONNECTION_UNBLOCKED_METHOD) {
        c->blocked = 0;
        return 1;
    }
    return 0;
}

const char *mp_client_blocked(const mp_client_t *c)
{
    return c->blocked ? c->blocked_reason : NULL;
}

static int rpc_check(mp_client_t *c, const char *what, char *err, size_t errlen)
{
    return mq_rpc_check(c->conn, what, err, errlen);
}

mp_client_t *mp_client_connect(const mp_client_opts_t *o, char *err, size_t errlen)
{
    mp_client_t *c = xcalloc(1, sizeof(*c));
    c->o = *o;
    c->next_seq = 1;
    c->conn = amqp_new_connection();
    amqp_socket_t *s = amqp_tcp_socket_new(c->conn);
    struct timeval tv = { 10, 0 };
    int r = s ? amqp_socket_open_noblock(s, o->host, (int)o->port, &tv) : AMQP_STATUS_NO_MEMORY;
    if (r != AMQP_STATUS_OK) {
        snprintf(err, errlen, "cannot connect to RabbitMQ at %s:%u: %s", o->host, o->port,
                 amqp_error_string2(r));
        goto fail;
    }
    /* the broker says when a resource alarm stops it reading our publishes */
    amqp_table_entry_t cap = { .key = amqp_cstring_bytes("connection.blocked"),
                               .value = { .kind = AMQP_FIELD_KIND_BOOLEAN,
                                          .value = { .boolean = 1 } } };
    amqp_table_entry_t prop = { .key = amqp_cstring_bytes("capabilities"),
                                .value = { .kind = AMQP_FIELD_KIND_TABLE,
                                           .value = { .table = { 1, &cap } } } };
    amqp_table_t props = { 1, &prop };
    amqp_rpc_reply_t lr = amqp_login_with_properties(c->conn, o->vhost, 0, 131072, 0, &props,
                                                     AMQP_SASL_METHOD_PLAIN, o->user, o->password);
    if (lr.reply_type != AMQP_RESPONSE_NORMAL) {
        snprintf(err, errlen, "login to RabbitMQ as %s failed (check user, password, vhost)",
                 o->user);
        goto fail;
    }
    amqp_channel_open(c->conn, CH);
    if (rpc_check(c, "channel.open", err, errlen) < 0)
        goto fail;
    amqp_confirm_select(c->conn, CH);
    if (rpc_check(c, "confirm.select", err, errlen) < 0)
        goto fail;
    if (mq_declare_outbound(c->conn, CH, o->queue, o->events_exchange, err, errlen) < 0)
        goto fail;
    return c;
fail:
    amqp_destroy_connection(c->conn);
    free(c);
    return NULL;
}

/* Publish persistent and mandatory to the outbound queue; the delivery tag
 * its confirm will carry in *seq. */
static int client_publish(mp_client_t *c, const char *body, size_t len, int priority,
                          const char *message_id, uint64_t *seq, char *err, size_t errlen)
{
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof(p));
    p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.content_type = amqp_cstring_bytes("application/json");
    p.delivery_mode = 2;
    if (priority >= 0) {
        p._flags |= AMQP_BASIC_PRIORITY_FLAG;
        p.priority = (uint8_t)priority;
    }
    if (message_id) {
        p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        p.message_id = amqp_cstring_bytes(message_id);
    }
    p._flags |= AMQP_BASIC_TIMESTAMP_FLAG; /* when it was enqueued: the queue summary's ages */
    p.timestamp = (uint64_t)time(NULL);
    amqp_bytes_t b = { len, (void *)body };
    int r = amqp_basic_publish(c->conn, CH, amqp_empty_bytes, amqp_cstring_bytes(c->o.queue), 1,
                               0, &p, b);
    if (r != AMQP_STATUS_OK) {
        snprintf(err, errlen, "publish: %s", amqp_error_string2(r));
        return -1;
    }
    *seq = c->next_seq++;
    return 0;
}

int mp_client_enqueue(mp_client_t *c, const char *body, size_t len, int priority,
                      const char *message_id, unsigned timeout_ms, char *err, size_t errlen)
{
    uint64_t seq;
    if (client_publish(c, body, len, priority, message_id, &seq, err, errlen) < 0)
        return -1;
    int r;
    uint64_t deadline = util_mono_ms() + timeout_ms;
    for (;;) {
        uint64_t now = util_mono_ms();
        if (now >= deadline) {
            if (c->blocked)
                snprintf(err, errlen,
                         "no confirm from the broker within %u ms: it blocks publishers (%s)",
                         timeout_ms, c->blocked_reason);
            else
                snprintf(err, errlen, "no confirm from the broker within %u ms", timeout_ms);
            return -1;
        }
        uint64_t left = deadline - now;
        struct timeval tv = { (time_t)(left / 1000), (suseconds_t)((left % 1000) * 1000) };
        amqp_frame_t f;
        r = amqp_simple_wait_frame_noblock(c->conn, &f, &tv);
        if (r == AMQP_STATUS_TIMEOUT)
            continue;
        if (r != AMQP_STATUS_OK) {
            snprintf(err, errlen, "waiting for confirm: %s", amqp_error_string2(r));
            return -1;
        }
        if (f.frame_type != AMQP_FRAME_METHOD || note_blocked(c, &f))
            continue;
        if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            if (a->delivery_tag == seq || (a->multiple && a->delivery_tag >= seq))
                return 0;
        } else if (f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
            amqp_basic_nack_t *n = f.payload.method.decoded;
            if (n->delivery_tag == seq || (n->multiple && n->delivery_tag >= seq)) {
                snprintf(err, errlen, "the broker refused the message (nack)");
                return -1;
            }
        } else if (f.payload.method.id == AMQP_BASIC_RETURN_METHOD) {
            amqp_basic_return_t *rt = f.payload.method.decoded;
            snprintf(err, errlen, "the broker returned the message: %u %.*s", rt->reply_code,
                     (int)rt->reply_text.len, (char *)rt->reply_text.bytes);
            return -1;
        } else if (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
                   f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD) {
            snprintf(err, errlen, "the broker closed the channel while publishing");
            return -1;
        }
    }
}

int mp_client_publish(mp_client_t *c, const char *body, size_t len, int priority,
                      const char *message_id, uint64_t *seq, char *err, size_t errlen)
{
    return client_publish(c, body, len, priority, message_id, seq, err, errlen);
}

int mp_client_pump(mp_client_t *c, unsigned timeout_ms, mp_client_confirm_cb on_confirm,
                   mp_client_event_cb on_event, void *arg, char *err, size_t errlen)
{
    uint64_t deadline = util_mono_ms() + timeout_ms;
    for (;;) {
        uint64_t now = util_mono_ms();
        uint64_t left = now >= deadline ? 0 : deadline - now;
        struct timeval tv = { (time_t)(left / 1000), (suseconds_t)((left % 1000) * 1000) };
        amqp_frame_t f;
        /* the decoded frames of the previous call are no longer referenced */
        amqp_maybe_release_buffers(c->conn);
        int r = amqp_simple_wait_frame_noblock(c->conn, &f, &tv);
        if (r == AMQP_STATUS_TIMEOUT)
            return 0;
        if (r != AMQP_STATUS_OK) {
            snprintf(err, errlen, "connection to the broker: %s", amqp_error_string2(r));
            return -1;
        }
        if (f.frame_type != AMQP_FRAME_METHOD) {
            if (left == 0)
                return 0;
            continue; /* heartbeats; content frames are read with their method */
        }
        switch (f.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            on_confirm(arg, a->delivery_tag, a->multiple, 1);
            return 1;
        }
        case AMQP_BASIC_NACK_METHOD: {
            amqp_basic_nack_t *n = f.payload.method.decoded;
            on_confirm(arg, n->delivery_tag, n->multiple, 0);
            return 1;
        }
        case AMQP_BASIC_DELIVER_METHOD: {
            amqp_message_t m;
            amqp_rpc_reply_t rr = amqp_read_message(c->conn, f.channel, &m, 0);
            if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                snprintf(err, errlen, "receiving an event: %s",
                         rr.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
                             ? amqp_error_string2(rr.library_error)
                             : "broker error");
                return -1;
            }
            on_event(arg, m.body.bytes, m.body.len);
            amqp_destroy_message(&m);
            return 1;
        }
        case AMQP_BASIC_RETURN_METHOD: {
            /* mandatory publish to a queue that is gone: the confirm that
             * follows would make an unrouted message look published */
            amqp_basic_return_t *rt = f.payload.method.decoded;
            snprintf(err, errlen, "the broker returned a message: %u %.*s", rt->reply_code,
                     (int)rt->reply_text.len, (char *)rt->reply_text.bytes);
            return -1;
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
            amqp_channel_close_t *cc = f.payload.method.decoded;
            snprintf(err, errlen, "the broker closed the channel: %u %.*s", cc->reply_code,
                     (int)cc->reply_text.len, (char *)cc->reply_text.bytes);
            return -1;
        }
        case AMQP_CONNECTION_CLOSE_METHOD: {
            amqp_connection_close_t *cc = f.payload.method.decoded;
            snprintf(err, errlen, "the broker closed the connection: %u %.*s", cc->reply_code,
                     (int)cc->reply_text.len, (char *)cc->reply_text.bytes);
            return -1;
        }
        default:
            note_blocked(c, &f);
            if (left == 0)
                return 0;
            continue;
        }
    }
}

int mp_client_subscribe(mp_client_t *c, const char *pattern, char *err, size_t errlen)
{
    amqp_queue_declare_ok_t *q = amqp_queue_declare(c->conn, CH, amqp_empty_bytes, 0, 0, 1, 1,
                                                    amqp_empty_table);
    if (q == NULL || rpc_check(c, "declare subscription queue", err, errlen) < 0)
        return -1;
    c->sub_queue = xstrndup(q->queue.bytes, q->queue.len);
    amqp_queue_bind(c->conn, CH, amqp_cstring_bytes(c->sub_queue),
                    amqp_cstring_bytes(c->o.events_exchange), amqp_cstring_bytes(pattern),
                    amqp_empty_table);
    if (rpc_check(c, "bind subscription queue", err, errlen) < 0)
        return -1;
    amqp_basic_consume(c->conn, CH, amqp_cstring_bytes(c->sub_queue), amqp_empty_bytes, 0, 1, 1,
                       amqp_empty_table);
    return rpc_check(c, "consume subscription queue", err, errlen);
}

int mp_client_next_event(mp_client_t *c, unsigned timeout_ms, char **body, size_t *len,
                         char *err, size_t errlen)
{
    uint64_t deadline = util_mono_ms() + timeout_ms;
    amqp_envelope_t env;
    amqp_rpc_reply_t r;
    for (;;) {
        uint64_t now = util_mono_ms();
        uint64_t left = now >= deadline ? 0 : deadline - now;
        struct timeval tv = { (time_t)(left / 1000), (suseconds_t)((left % 1000) * 1000) };
        amqp_maybe_release_buffers(c->conn);
        r = amqp_consume_message(c->conn, &env, &tv, 0);
        if (r.reply_type != AMQP_RESPONSE_LIBRARY_EXCEPTION ||
            r.library_error != AMQP_STATUS_UNEXPECTED_STATE)
            break;
        /* a method frame that is not a delivery waits in the library */
        amqp_frame_t f;
        if (amqp_simple_wait_frame(c->conn, &f) != AMQP_STATUS_OK ||
            f.frame_type != AMQP_FRAME_METHOD || !note_blocked(c, &f)) {
            snprintf(err, errlen, "receiving events: unexpected frame from the broker");
            return -1;
        }
        /* a resource alarm on the broker: not an event, keep waiting */
    }
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT)
        return 0;
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        snprintf(err, errlen, "receiving events: %s",
                 r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
                     ? amqp_error_string2(r.library_error)
                     : "broker error");
        return -1;
    }
    *body = xstrndup(env.message.body.bytes, env.message.body.len);
    if (len)
        *len = env.message.body.len;
    amqp_destroy_envelope(&env);
    return 1;
}

void mp_client_close(mp_client_t *c)
{
    if (c == NULL)
        return;
    /* a broker that stopped reading (blocked by an alarm, or hung) never
     * answers the closing RPCs: do not wait for it */
    struct timeval tv = { 1, 0 };
    amqp_set_rpc_timeout(c->conn, &tv);
    amqp_channel_close(c->conn, CH, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c->conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c->conn);
    free(c->sub_queue);
    free(c);
}

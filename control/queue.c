/*
 * control/queue.c - the queue summary and the dead letters (see queue.h,
 * docs/operations.md "Queue summary", "Dead letters: list and re-drive").
 *
 * Depths come from passive queue.declare, so no management plugin is
 * needed; a queue that does not exist closes the channel (404), which is
 * answered and replaced by a new one. Workers and destinations come from
 * the workers' status records (deliverer/qstat.h), merged here with
 * qstat_merge().
 *
 * The dead queue is read with basic.get, never consumed: a browse leaves
 * everything unacknowledged and closes its channel; a redrive acks a
 * dead copy only after the broker confirmed its republished body, one
 * message at a time, and closes its channel to give back the rest.
 */
#include "control/queue.h"

#include <amqp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

#include "core/buf.h"
#include "core/util.h"
#include "deliverer/qstat.h"
#include "deliverer/retry.h"
#include "queue/mq.h"

#define H_REASON   "x-mailpump-reason"
#define H_DEAD_AT  "x-mailpump-dead-at-ms"
#define H_TRUNC    "x-mailpump-truncated"
#define H_REDRIVEN "x-mailpump-redriven"
#define H_DEATH    "x-death"
#define CONFIRM_WAIT_S 10
#define MAX_DESTINATIONS 100

static void broker_err(ctl_t *c, const char *why, char *err, size_t errlen)
{
    const mp_config_t *cfg = ctl_config(c);
    snprintf(err, errlen, "amqp %s:%u: %s", cfg->amqp_host, cfg->amqp_port, why);
}

/* After an RPC failed: the channel is gone either way. */
static void rpc_failed(ctl_t *c, int ch, const char *what, char *err, size_t errlen)
{
    char why[300];
    amqp_connection_state_t conn = ctl_amqp(c, why, sizeof(why));
    if (conn != NULL && mq_rpc_check(conn, what, why, sizeof(why)) < 0) {
        broker_err(c, why, err, errlen);
        ctl_amqp_channel_closed(c, ch);
    } else {
        broker_err(c, what, err, errlen);
        ctl_amqp_reset(c);
    }
}

/* ---- queue depths ---- */

/* 1 with the counts, 0 when the queue does not exist (*ch replaced), -1 + err. */
static int queue_depth(ctl_t *c, int *ch, const char *name, uint64_t *messages, uint64_t *consumers,
                       char *err, size_t errlen)
{
    amqp_connection_state_t conn = ctl_amqp(c, err, errlen);
    if (conn == NULL)
        return -1;
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(conn, (amqp_channel_t)*ch, amqp_cstring_bytes(name), 1, 0,
                                                     0, 0, amqp_empty_table);
    if (ok != NULL) {
        *messages = ok->message_count;
        *consumers = ok->consumer_count;
        return 1;
    }
    amqp_rpc_reply_t r = amqp_get_rpc_reply(conn);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
        ((amqp_channel_close_t *)r.reply.decoded)->reply_code == AMQP_NOT_FOUND) {
        ctl_amqp_channel_closed(c, *ch);
        *ch = ctl_amqp_channel(c, err, errlen);
        return *ch < 0 ? -1 : 0;
    }
    rpc_failed(c, *ch, "queue.declare (passive)", err, errlen);
    return -1;
}

static json_t *queue_row(const char *name, const char *kind, json_t *level, json_t *delay)
{
    json_t *q = json_object();
    json_object_set_new(q, "name", json_string(name));
    json_object_set_new(q, "kind", json_string(kind));
    json_object_set_new(q, "level", level);
    json_object_set_new(q, "delay_s", delay);
    return q;
}

static int add_depth(ctl_t *c, int *ch, json_t *q, char *err, size_t errlen)
{
    uint64_t m = 0, n = 0;
    int r = queue_depth(c, ch, json_string_value(json_object_get(q, "name")), &m, &n, err, errlen);
    if (r < 0)
        return -1;
    json_object_set_new(q, "messages", r ? json_integer((json_int_t)m) : json_null());
    json_object_set_new(q, "consumers", r ? json_integer((json_int_t)n) : json_null());
    return 0;
}

static json_t *summary_queues(ctl_t *c, char *err, size_t errlen)
{
    const mp_config_t *cfg = ctl_config(c);
    json_t *qs = json_array();
    json_array_append_new(qs, queue_row(cfg->amqp_queue, "outbound", json_null(), json_null()));
    retry_levels_t lv = { 0 };
    if (retry_levels_parse(cfg->retry_levels, &lv) == 0) {
        for (size_t i = 0; i < lv.n; i++) {
            char name[256];
            retry_queue_name(cfg->retry_queue_prefix, &lv, i, name, sizeof(name));
            json_array_append_new(qs, queue_row(name, "retry", json_integer((json_int_t)i),
                                                json_integer((json_int_t)(lv.ms[i] / 1000))));
        }
        retry_levels_free(&lv);
    }
    json_array_append_new(qs, queue_row(cfg->amqp_dead_queue, "dead", json_null(), json_null()));
    int ch = ctl_amqp_channel(c, err, errlen);
    if (ch < 0) {
        json_decref(qs);
        return NULL;
    }
    for (size_t i = 0; i < json_array_size(qs); i++)
        if (add_depth(c, &ch, json_array_get(qs, i), err, errlen) < 0) {
            json_decref(qs);
            return NULL;
        }
    ctl_amqp_close_channel(c, ch);
    return qs;
}

/* ---- the head messages' ages (the management API) ---- */

static void pct_encode(buf_t *b, const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' ||
            ch == '.' || ch == '_' || ch == '~')
            buf_append(b, s, 1);
        else
            buf_printf(b, "%%%02X", ch);
    }
}

/* Each queue row's "head_age_s": now minus its head message's AMQP
 * timestamp, as the management API reports it (null: empty, a message
 * without a timestamp, or no such queue). The oldest of them in *oldest_ms
 * (Unix ms of that timestamp, 0 for none). 0, or -1 + err (the rows keep
 * null). Skipped (0, nothing set) without [amqp] management_url. */
static int summary_heads(ctl_t *c, json_t *qs, uint64_t now, uint64_t *oldest_ms, char *err, size_t errlen)
{
    const mp_config_t *cfg = ctl_config(c);
    *oldest_ms = 0;
    if (cfg->amqp_management_url == NULL || cfg->amqp_management_url[0] == '\0')
        return 0;
    int rc = 0;
    for (size_t i = 0; i < json_array_size(qs); i++) {
        json_t *q = json_array_get(qs, i);
        json_object_set_new(q, "head_age_s", json_null());
        if (rc < 0)
            continue;
        buf_t path = BUF_INIT;
        buf_printf(&path, "/api/queues/");
        pct_encode(&path, cfg->amqp_vhost);
        buf_printf(&path, "/");
        pct_encode(&path, json_string_value(json_object_get(q, "name")));
        buf_printf(&path, "?columns=head_message_timestamp");
        char *ps = buf_steal(&path, NULL);
        json_t *doc = NULL;
        int st = ctl_mgmt_get(c, ps, &doc, err, errlen);
        free(ps);
        if (st == CTL_ENOTFOUND)
            continue;
        if (st != CTL_OK) {
            rc = -1; /* the first failure says why; the other rows stay null */
            continue;
        }
        json_t *ts = json_object_get(doc, "head_message_timestamp");
        if (json_is_integer(ts) && json_integer_value(ts) > 0) {
            uint64_t ms = (uint64_t)json_integer_value(ts) * 1000;
            json_object_set_new(q, "head_age_s", json_integer(now > ms ? (json_int_t)((now - ms) / 1000) : 0));
            if (*oldest_ms == 0 || ms < *oldest_ms)
                *oldest_ms = ms;
        }
        json_decref(doc);
    }
    return rc;
}

/* ---- workers and destinations ---- */

static int record_cmp(const void *pa, const void *pb)
{
    const qstat_record_t *a = pa, *b = pb;
    int d = strcmp(a->host, b->host);
    if (d != 0)
        return d;
    if (a->pid != b->pid)
        return a->pid < b->pid ? -1 : 1;
    return a->worker - b->worker;
}

/* The records of the workers consuming [amqp] queue; *n of them. NULL + err. */
static qstat_record_t *read_records(ctl_t *c, size_t *n, char *err, size_t errlen)
{
    const char *queue = ctl_config(c)->amqp_queue;
    size_t cap = 16;
    qstat_record_t *recs = xcalloc(cap, sizeof(*recs));
    *n = 0;
    char cursor[32] = "0";
    do {
        redisReply *r = ctl_command(c, err, errlen, "SCAN %s MATCH %s* COUNT 1000", cursor, QSTAT_KEY_PREFIX);
        if (r == NULL) {
            free(recs);
            return NULL;
        }
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING) {
            snprintf(err, errlen, "redis: unexpected SCAN reply");
            freeReplyObject(r);
            free(recs);
            return NULL;
        }
        util_copy_text(cursor, sizeof(cursor), r->element[0]->str);
        redisReply *keys = r->element[1];
        for (size_t i = 0; i < keys->elements; i++) {
            redisReply *k = keys->element[i];
            if (k->type != REDIS_REPLY_STRING)
                continue;
            const char *argv[2] = { "GET", k->str };
            size_t lens[2] = { 3, k->len };
            redisReply *v = ctl_command_argv(c, err, errlen, 2, argv, lens);
            if (v == NULL) {
                freeReplyObject(r);
                free(recs);
                return NULL;
            }
            if (v->type == REDIS_REPLY_STRING) { /* else it expired since the SCAN */
                if (*n == cap) {
                    cap *= 2;
                    recs = xrealloc(recs, cap * sizeof(*recs));
                }
                if (qstat_decode(v->str, v->len, &recs[*n]) == 0 && strcmp(recs[*n].queue, queue) == 0)
                    (*n)++;
            }
            freeReplyObject(v);
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    if (*n > 1)
        qsort(recs, *n, sizeof(*recs), record_cmp);
    return recs;
}

static json_t *age_s(uint64_t now, uint64_t then)
{
    if (then == 0)
        return json_null();
    return json_integer(now > then ? (json_int_t)((now - then) / 1000) : 0);
}

static void summary_workers(ctl_t *c, json_t *out)
{
    char err[512] = "";
    size_t n = 0;
    json_t *workers = json_array(), *dests = json_array();
    json_object_set_new(out, "workers", workers);
    json_object_set_new(out, "destinations", dests);
    qstat_record_t *recs = read_records(c, &n, err, sizeof(err));
    if (recs == NULL) {
        json_object_set_new(out, "workers_error", json_string(err));
        json_object_set_new(out, "oldest_age_s", json_null());
        return;
    }
    uint64_t now = util_wall_ms(), oldest = 0;
    qstat_row_t *rows = xcalloc(MAX_DESTINATIONS, sizeof(*rows));
    size_t nrows = 0;
    for (size_t i = 0; i < n; i++) {
        const qstat_record_t *r = &recs[i];
        json_t *w = json_object();
        json_object_set_new(w, "host", json_string(r->host));
        json_object_set_new(w, "pid", json_integer(r->pid));
        json_object_set_new(w, "worker", json_integer(r->worker));
        json_object_set_new(w, "inflight", json_integer((json_int_t)r->inflight));
        json_object_set_new(w, "inflight_bytes", json_integer((json_int_t)r->inflight_bytes));
        json_object_set_new(w, "smtp_connections", json_integer((json_int_t)r->smtp_connections));
        json_object_set_new(w, "oldest_inflight_s", age_s(now, r->oldest_first_seen_ms));
        json_object_set_new(w, "updated_s_ago", age_s(now, r->updated_ms));
        json_array_append_new(workers, w);
        if (r->oldest_first_seen_ms != 0 && (oldest == 0 || r->oldest_first_seen_ms < oldest))
            oldest = r->oldest_first_seen_ms;
        nrows = qstat_merge(rows, nrows, MAX_DESTINATIONS, r->rows, r->nrows);
    }
    for (size_t i = 0; i < nrows; i++) {
        json_t *d = json_object();
        json_object_set_new(d, "destination", json_string(rows[i].dest));
        json_object_set_new(d, "waiting", json_integer((json_int_t)rows[i].waiting));
        json_object_set_new(d, "parked", json_integer((json_int_t)rows[i].parked));
        json_object_set_new(d, "deferred_recent", json_integer((json_int_t)rows[i].deferred));
        json_object_set_new(d, "last_error", rows[i].last_error[0] ? json_string(rows[i].last_error) : json_null());
        json_object_set_new(d, "last_error_age_s",
                            rows[i].last_error[0] ? age_s(now, rows[i].last_error_ms) : json_null());
        json_array_append_new(dests, d);
    }
    json_object_set_new(out, "oldest_age_s", age_s(now, oldest));
    free(rows);
    free(recs);
}

json_t *ctl_queue_summary(ctl_t *c, int *status, char *err, size_t errlen)
{
    json_t *qs = summary_queues(c, err, errlen);
    if (qs == NULL) {
        *status = CTL_EUNAVAIL;
        return NULL;
    }
    json_t *out = json_object();
    json_object_set_new(out, "queues", qs);
    summary_workers(c, out);
    uint64_t now = util_wall_ms(), head_ms = 0;
    char merr[512] = "";
    int heads = ctl_config(c)->amqp_management_url && ctl_config(c)->amqp_management_url[0];
    if (summary_heads(c, qs, now, &head_ms, merr, sizeof(merr)) < 0)
        json_object_set_new(out, "management_error", json_string(merr));
    json_t *held = json_object_get(out, "oldest_age_s");
    if (head_ms != 0) {
        json_int_t h = now > head_ms ? (json_int_t)((now - head_ms) / 1000) : 0;
        if (!json_is_integer(held) || json_integer_value(held) < h)
            json_object_set_new(out, "oldest_age_s", json_integer(h));
    }
    json_object_set_new(out, "oldest_age_covers",
                        json_string(heads ? "the messages at the head of each queue, by their AMQP timestamp "
                                            "(when first enqueued; for the priority queue the head of its "
                                            "highest non-empty priority), and the messages the workers hold, "
                                            "by the first-seen time of their retry envelope"
                                          : "messages held by the workers, by the first-seen time of their "
                                            "retry envelope (first consume, counting earlier attempts); "
                                            "messages waiting in the queues are not covered: set [amqp] "
                                            "management_url"));
    *status = CTL_OK;
    return out;
}

/* ---- reading the dead queue ---- */

typedef struct dead_msg {
    uint64_t       tag;
    amqp_message_t m;
} dead_msg_t;

/* 1 with a message (destroy it with amqp_destroy_message), 0 when the
 * queue is empty, -1 + err (the connection or channel is gone). */
static int dead_get(ctl_t *c, int ch, dead_msg_t *d, char *err, size_t errlen)
{
    amqp_connection_state_t conn = ctl_amqp(c, err, errlen);
    if (conn == NULL)
        return -1;
    amqp_maybe_release_buffers(conn);
    amqp_bytes_t q = amqp_cstring_bytes(ctl_config(c)->amqp_dead_queue);
    amqp_rpc_reply_t r = amqp_basic_get(conn, (amqp_channel_t)ch, q, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        rpc_failed(c, ch, "basic.get", err, errlen);
        return -1;
    }
    if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD)
        return 0;
    d->tag = ((amqp_basic_get_ok_t *)r.reply.decoded)->delivery_tag;
    r = amqp_read_message(conn, (amqp_channel_t)ch, &d->m, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        rpc_failed(c, ch, "basic.get (content)", err, errlen);
        return -1;
    }
    return 1;
}

static const amqp_table_t *msg_headers(const amqp_message_t *m)
{
    return (m->properties._flags & AMQP_BASIC_HEADERS_FLAG) ? &m->properties.headers : NULL;
}

/* A string header as a malloc'd C string, or NULL. */
static char *header_str(const amqp_message_t *m, const char *key)
{
    const amqp_table_t *h = msg_headers(m);
    size_t kl = strlen(key);
    for (int i = 0; h != NULL && i < h->num_entries; i++) {
        const amqp_table_entry_t *e = &h->entries[i];
        if (e->key.len != kl || memcmp(e->key.bytes, key, kl) != 0)
            continue;
        if (e->value.kind == AMQP_FIELD_KIND_UTF8 || e->value.kind == AMQP_FIELD_KIND_BYTES)
            return xstrndup(e->value.value.bytes.bytes, e->value.value.bytes.len);
        return NULL;
    }
    return NULL;
}

static int reason_matches(const char *reason, const char *substr)
{
    if (substr == NULL || substr[0] == '\0')
        return 1;
    return reason != NULL && strstr(reason, substr) != NULL;
}

/* The message's id: its message-id property, else the body's "id". */
static json_t *msg_id(const amqp_message_t *m, json_t *body)
{
    if (m->properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG)
        return json_stringn(m->properties.message_id.bytes, m->properties.message_id.len);
    json_t *id = json_object_get(body, "id");
    return json_is_string(id) ? json_incref(id) : json_null();
}

static json_t *iso_time(const char *ms_text)
{
    if (ms_text == NULL)
        return json_null();
    char *end;
    unsigned long long ms = strtoull(ms_text, &end, 10);
    if (end == ms_text || *end != '\0')
        return json_string(ms_text);
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    char buf[40], out[48];
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, sizeof(out), "%s.%03lluZ", buf, ms % 1000);
    return json_string(out);
}

static json_t *dead_entry(const amqp_message_t *m, const char *reason)
{
    json_t *body = json_loadb(m->body.bytes, m->body.len, 0, NULL);
    json_t *e = json_object();
    json_object_set_new(e, "id", msg_id(m, body));
    json_t *jr = reason ? json_string(reason) : NULL;
    json_object_set_new(e, "reason", jr ? jr : json_null());
    json_object_set_new(e, "size", json_integer((json_int_t)m->body.len));
    char *at = header_str(m, H_DEAD_AT);
    json_object_set_new(e, "dead_at", iso_time(at));
    free(at);
    json_t *tenant = json_object_get(body, "tenant");
    json_object_set_new(e, "tenant", json_is_string(tenant) ? json_incref(tenant) : json_null());
    if (json_is_object(body)) {
        size_t n = 0;
        const char *lists[] = { "to", "cc", "bcc" };
        for (size_t i = 0; i < 3; i++) {
            json_t *l = json_object_get(body, lists[i]);
            n += json_is_array(l) ? json_array_size(l) : json_is_string(l) ? 1 : 0;
        }
        json_object_set_new(e, "recipients", json_integer((json_int_t)n));
    } else {
        json_object_set_new(e, "recipients", json_null());
    }
    json_decref(body);
    return e;
}

/* 1 with the dead queue's ready messages, 0 when it does not exist
 * (*total 0; nothing to read), -1 + err. */
static int dead_total(ctl_t *c, int *ch, uint64_t *total, char *err, size_t errlen)
{
    uint64_t consumers;
    int r = queue_depth(c, ch, ctl_config(c)->amqp_dead_queue, total, &consumers, err, errlen);
    if (r == 0)
        *total = 0;
    return r;
}

/* What a dead-letter browse or redrive starts with: limit made
 * 1..CTL_DEAD_MAX, *status CTL_EUNAVAIL until the caller succeeds, a
 * channel and the dead queue's ready count. dead_total()'s answer (1, 0
 * when the dead queue does not exist), or -1 + err. */
static int dead_open(ctl_t *c, size_t *limit, int *status, int *ch, uint64_t *total, char *err, size_t errlen)
{
    if (*limit == 0 || *limit > CTL_DEAD_MAX)
        *limit = CTL_DEAD_MAX;
    *status = CTL_EUNAVAIL;
    *ch = ctl_amqp_channel(c, err, errlen);
    return *ch < 0 ? -1 : dead_total(c, ch, total, err, errlen);
}

json_t *ctl_dead_list(ctl_t *c, const char *reason_substr, size_t limit, int *status, char *err,
                      size_t errlen)
{
    uint64_t total = 0;
    int ch = -1, exists = dead_open(c, &limit, status, &ch, &total, err, errlen);
    if (exists < 0)
        return NULL;
    json_t *msgs = json_array();
    size_t scanned = 0;
    while (exists && json_array_size(msgs) < limit && scanned < CTL_DEAD_MAX) {
        dead_msg_t d;
        int r = dead_get(c, ch, &d, err, errlen);
        if (r < 0) {
            json_decref(msgs);
            return NULL;
        }
        if (r == 0)
            break;
        scanned++;
        char *reason = header_str(&d.m, H_REASON);
        if (reason_matches(reason, reason_substr))
            json_array_append_new(msgs, dead_entry(&d.m, reason));
        free(reason);
        amqp_destroy_message(&d.m);
    }
    ctl_amqp_close_channel(c, ch); /* every message read goes back, unacked */
    json_t *out = json_object();
    json_object_set_new(out, "messages", msgs);
    json_object_set_new(out, "total", json_integer((json_int_t)total));
    json_object_set_new(out, "scanned", json_integer((json_int_t)scanned));
    *status = CTL_OK;
    return out;
}

/* ---- redrive ---- */

/* Wait for the confirm of publish seq on ch: 0 acked, -1 nacked or
 * returned (the channel lives on), -2 the channel or connection is gone;
 * err says why. */
static int wait_confirm(ctl_t *c, int ch, uint64_t seq, char *err, size_t errlen)
{
    amqp_connection_state_t conn = ctl_amqp(c, err, errlen);
    if (conn == NULL)
        return -2;
    int returned = 0;
    for (;;) {
        amqp_frame_t f;
        struct timeval tv = { CONFIRM_WAIT_S, 0 };
        int rc = amqp_simple_wait_frame_noblock(conn, &f, &tv);
        if (rc == AMQP_STATUS_TIMEOUT) {
            broker_err(c, "no publisher confirm within 10 s", err, errlen);
            ctl_amqp_reset(c);
            return -2;
        }
        if (rc != AMQP_STATUS_OK) {
            broker_err(c, amqp_error_string2(rc), err, errlen);
            ctl_amqp_reset(c);
            return -2;
        }
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue;
        switch (f.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            if (a->delivery_tag == seq || (a->multiple && a->delivery_tag >= seq))
                return returned ? -1 : 0;
            break;
        }
        case AMQP_BASIC_NACK_METHOD:
            broker_err(c, "the broker nacked the republished message", err, errlen);
            return -1;
        case AMQP_BASIC_RETURN_METHOD: {
            amqp_basic_return_t *rt = f.payload.method.decoded;
            char why[300];
            snprintf(why, sizeof(why), "the republished message was returned: %u %.*s", rt->reply_code,
                     (int)rt->reply_text.len, (char *)rt->reply_text.bytes);
            broker_err(c, why, err, errlen);
            returned = 1;
            amqp_message_t m;
            if (amqp_read_message(conn, f.channel, &m, 0).reply_type != AMQP_RESPONSE_NORMAL) {
                ctl_amqp_reset(c);
                return -2;
            }
            amqp_destroy_message(&m);
            break;
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
            amqp_channel_close_t *m = f.payload.method.decoded;
            char why[300];
            snprintf(why, sizeof(why), "channel closed by broker: %u %.*s", m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
            broker_err(c, why, err, errlen);
            amqp_channel_close_ok_t ok = { 0 };
            amqp_send_method(conn, f.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
            return -2;
        }
        case AMQP_CONNECTION_CLOSE_METHOD:
            broker_err(c, "connection closed by broker", err, errlen);
            ctl_amqp_reset(c);
            return -2;
        default:
            break;
        }
    }
}

/* Republish d's body to the outbound queue: 0 confirmed, -1/-2 as wait_confirm(). */
static int republish(ctl_t *c, int ch, const dead_msg_t *d, uint64_t seq, char *err, size_t errlen)
{
    amqp_connection_state_t conn = ctl_amqp(c, err, errlen);
    if (conn == NULL)
        return -2;
    const amqp_basic_properties_t *in = &d->m.properties;
    const amqp_table_t *h = msg_headers(&d->m);
    size_t n = h ? (size_t)h->num_entries : 0;
    amqp_table_entry_t *e = xcalloc(n + 1, sizeof(*e));
    size_t k = 0;
    unsigned long redriven = 0;
    for (size_t i = 0; i < n; i++) {
        const amqp_table_entry_t *x = &h->entries[i];
        if ((x->key.len == strlen(H_REDRIVEN) && memcmp(x->key.bytes, H_REDRIVEN, x->key.len) == 0)) {
            char *v = header_str(&d->m, H_REDRIVEN);
            redriven = v ? strtoul(v, NULL, 10) : 0;
            free(v);
            continue;
        }
        if ((x->key.len == strlen(H_REASON) && memcmp(x->key.bytes, H_REASON, x->key.len) == 0) ||
            (x->key.len == strlen(H_DEATH) && memcmp(x->key.bytes, H_DEATH, x->key.len) == 0))
            continue;
        e[k++] = *x;
    }
    char count[24];
    snprintf(count, sizeof(count), "%lu", redriven + 1);
    e[k].key = amqp_cstring_bytes(H_REDRIVEN);
    e[k].value.kind = AMQP_FIELD_KIND_UTF8;
    e[k].value.value.bytes = amqp_cstring_bytes(count);
    k++;
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof(p));
    p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG;
    p.content_type = amqp_cstring_bytes("application/json");
    p.delivery_mode = 2;
    p.headers.num_entries = (int)k;
    p.headers.entries = e;
    if (in->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        p.message_id = in->message_id;
    }
    if (in->_flags & AMQP_BASIC_PRIORITY_FLAG) {
        p._flags |= AMQP_BASIC_PRIORITY_FLAG;
        p.priority = in->priority;
    }
    int rc = amqp_basic_publish(conn, (amqp_channel_t)ch, amqp_empty_bytes,
                                amqp_cstring_bytes(ctl_config(c)->amqp_queue), 1, 0, &p, d->m.body);
    free(e);
    if (rc != AMQP_STATUS_OK) {
        broker_err(c, amqp_error_string2(rc), err, errlen);
        ctl_amqp_reset(c);
        return -2;
    }
    return wait_confirm(c, ch, seq, err, errlen);
}

json_t *ctl_dead_redrive(ctl_t *c, const char *reason_substr, size_t limit, int dry_run, int *status,
                         char *err, size_t errlen)
{
    uint64_t total = 0;
    int ch = -1, exists = dead_open(c, &limit, status, &ch, &total, err, errlen);
    if (exists < 0)
        return NULL;
    amqp_connection_state_t conn = ctl_amqp(c, err, errlen);
    if (!dry_run) {
        amqp_confirm_select(conn, (amqp_channel_t)ch);
        if (mq_rpc_check(conn, "confirm.select", err, errlen) < 0) {
            rpc_failed(c, ch, "confirm.select", err, errlen);
            return NULL;
        }
    }
    json_t *ids = json_array();
    size_t redriven = 0, skipped = 0, failed = 0, scanned = 0;
    uint64_t seq = 0;
    char why[512] = "";
    int channel_gone = 0;
    /* only the dead letters there when it starts: one re-driven to a
     * cause not yet fixed comes back to the queue's tail at once, and
     * must not be taken again (and again) by this same call */
    while (exists && redriven < limit && scanned < total && scanned < CTL_DEAD_MAX) {
        dead_msg_t d;
        int r = dead_get(c, ch, &d, why, sizeof(why));
        if (r < 0) {
            if (scanned == 0) { /* nothing done yet: the broker is unavailable */
                json_decref(ids);
                snprintf(err, errlen, "%s", why);
                return NULL;
            }
            failed++; /* what was read and not acked goes back */
            channel_gone = 1;
            break;
        }
        if (r == 0)
            break;
        scanned++;
        char *reason = header_str(&d.m, H_REASON);
        char *trunc = header_str(&d.m, H_TRUNC);
        int match = reason_matches(reason, reason_substr) && !(trunc && strcmp(trunc, "1") == 0);
        free(reason);
        free(trunc);
        if (!match) {
            skipped++; /* left unacked: back in place when the channel closes */
            amqp_destroy_message(&d.m);
            continue;
        }
        json_t *body = json_loadb(d.m.body.bytes, d.m.body.len, 0, NULL);
        json_t *id = msg_id(&d.m, body);
        json_decref(body);
        if (dry_run) {
            redriven++;
            json_array_append_new(ids, id);
            amqp_destroy_message(&d.m);
            continue;
        }
        int pr = republish(c, ch, &d, ++seq, why, sizeof(why));
        if (pr == 0 && amqp_basic_ack(conn, (amqp_channel_t)ch, d.tag, 0) != AMQP_STATUS_OK) {
            /* confirmed but the dead copy's ack could not be sent: both
             * exist now, and the dead copy comes back */
            snprintf(why, sizeof(why), "republished, but the ack of the dead copy failed");
            ctl_amqp_reset(c);
            pr = -2;
        }
        amqp_destroy_message(&d.m);
        if (pr == 0) {
            redriven++;
            json_array_append_new(ids, id);
            continue;
        }
        json_decref(id);
        failed++;
        channel_gone = pr == -2;
        break;
    }
    if (!channel_gone)
        ctl_amqp_close_channel(c, ch);
    json_t *out = json_object();
    json_object_set_new(out, "redriven", json_integer((json_int_t)redriven));
    json_object_set_new(out, "skipped", json_integer((json_int_t)skipped));
    json_object_set_new(out, "failed", json_integer((json_int_t)failed));
    json_object_set_new(out, "ids", ids);
    json_object_set_new(out, "dry_run", json_boolean(dry_run));
    if (failed)
        json_object_set_new(out, "error", json_string(why));
    *status = CTL_OK;
    return out;
}

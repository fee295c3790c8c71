/*
 * api/submit.c - POST /v1/messages and its publisher thread (see submit.h).
 *
 * A handler validates the whole request first (msgjson_parse, the
 * worker's own parser), then queues one batch to the publisher under
 * sub->lock and wakes its loop. The publisher sends every message of
 * every queued batch without waiting, so confirms of many requests are
 * outstanding at once on the one channel; each confirm marks its message
 * and the last one of a batch signals the waiting handler. A batch is
 * shared by the handler and the publisher (refs): whoever lets go last
 * frees it, so a handler that timed out leaves the late confirms a batch
 * to write into.
 */
#include "api/submit.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/log.h"
#include "core/loop.h"
#include "core/message.h"
#include "core/util.h"
#include "metrics/metrics.h"
#include "queue/mq.h"
#include "queue/msgjson.h"

#define CHECK_MS        200    /* how often the publisher looks at its connection */
#define BACKOFF_MIN_MS  200
#define BACKOFF_MAX_MS  10000

typedef struct batch batch_t;

typedef struct pub {
    batch_t *b;
    size_t   i;
} pub_t;

struct batch {
    batch_t        *next;
    api_submit_t   *sub;
    size_t          n;
    char          **bodies;
    char          **ids;
    int             priority; /* -1: none */
    int            *state;    /* 0 waiting, 1 confirmed, -1 failed */
    pub_t          *pubs;
    size_t          pending;  /* messages not yet confirmed or failed */
    int             refs;
    pthread_cond_t  cond;
    char            reason[256]; /* the first failure */
};

struct api_submit {
    const mp_config_t *cfg;
    pthread_t          thread;
    int                started;
    loop_t            *loop;
    /* shared with the handler threads */
    pthread_mutex_t    lock;
    batch_t           *head, *tail;
    int                stopping;
    int                up;         /* open and not blocked */
    char               down[320];  /* why not, while !up */
    /* the publisher thread's own */
    mq_t              *mq;
    int                blocked;
    loop_timer_t       check_timer;
    loop_timer_t       reconnect_timer;
    unsigned           backoff_ms;
};

/* Not inlined: gcc would then see the free() under callers that hold a
 * reference of their own and warn of a use after it (fail_batch). */
static __attribute__((noinline)) void batch_unref_locked(batch_t *b)
{
    if (--b->refs > 0)
        return;
    for (size_t i = 0; i < b->n; i++) {
        free(b->bodies[i]);
        free(b->ids[i]);
    }
    free(b->bodies);
    free(b->ids);
    free(b->state);
    free(b->pubs);
    pthread_cond_destroy(&b->cond);
    free(b);
}

/* Under sub->lock. */
static void mark_locked(batch_t *b, size_t i, int ok, const char *why)
{
    if (b->state[i] != 0)
        return;
    b->state[i] = ok ? 1 : -1;
    if (!ok && b->reason[0] == '\0')
        snprintf(b->reason, sizeof(b->reason), "%.*s", (int)sizeof(b->reason) - 1, why);
    if (--b->pending == 0) {
        pthread_cond_broadcast(&b->cond);
        batch_unref_locked(b); /* the publisher's reference */
    }
}

static void set_state(api_submit_t *sub, int up, const char *why)
{
    pthread_mutex_lock(&sub->lock);
    int was = sub->up;
    sub->up = up;
    if (!up)
        snprintf(sub->down, sizeof(sub->down), "%s", why);
    pthread_mutex_unlock(&sub->lock);
    if (was != up) {
        if (up)
            log_info("api", "publisher_up", "amqp=%s:%u", sub->cfg->amqp_host, sub->cfg->amqp_port);
        else
            log_warn("api", "publisher_down", "reason=%s", LOG_Q(why));
    }
}

static void on_confirm(void *arg, int ok)
{
    pub_t *p = arg;
    api_submit_t *sub = p->b->sub;
    pthread_mutex_lock(&sub->lock);
    mark_locked(p->b, p->i, ok, "the broker did not take the message (nack, unroutable or connection lost)");
    pthread_mutex_unlock(&sub->lock);
}

static void fail_batch(api_submit_t *sub, batch_t *b, size_t from, const char *why)
{
    pthread_mutex_lock(&sub->lock);
    b->refs++; /* the last mark may drop the publisher's reference: b must outlive the loop */
    for (size_t i = from; i < b->n; i++)
        mark_locked(b, i, 0, why);
    batch_unref_locked(b);
    pthread_mutex_unlock(&sub->lock);
}

static void publish_batch(api_submit_t *sub, batch_t *b)
{
    if (sub->mq != NULL && !mq_is_open(sub->mq))
        set_state(sub, 0, "connection to the broker lost"); /* before on_check sees it */
    if (sub->mq == NULL || !mq_is_open(sub->mq) || sub->blocked) {
        char why[400];
        pthread_mutex_lock(&sub->lock);
        snprintf(why, sizeof(why), "broker unavailable: %s", sub->down[0] ? sub->down : "not connected");
        pthread_mutex_unlock(&sub->lock);
        fail_batch(sub, b, 0, why);
        return;
    }
    const mp_config_t *cfg = sub->cfg;
    for (size_t i = 0; i < b->n; i++) {
        mq_publish_opts_t o = {
            .content_type = "application/json", .message_id = b->ids[i],
            .priority = b->priority, .persistent = 1, .mandatory = 1,
        };
        if (mq_publish(sub->mq, "", cfg->amqp_queue, b->bodies[i], strlen(b->bodies[i]), &o,
                       on_confirm, &b->pubs[i]) < 0) {
            fail_batch(sub, b, i, "broker unavailable: publish failed (connection lost)");
            return;
        }
    }
}

static void on_wakeup(loop_t *loop, void *arg)
{
    api_submit_t *sub = arg;
    pthread_mutex_lock(&sub->lock);
    batch_t *b = sub->head;
    sub->head = sub->tail = NULL;
    int stopping = sub->stopping;
    pthread_mutex_unlock(&sub->lock);
    while (b != NULL) {
        batch_t *next = b->next;
        b->next = NULL;
        if (stopping)
            fail_batch(sub, b, 0, "the server is stopping");
        else
            publish_batch(sub, b);
        b = next;
    }
    if (stopping)
        loop_stop(loop);
}

static void on_blocked(void *arg, int blocked, const char *reason)
{
    api_submit_t *sub = arg;
    sub->blocked = blocked;
    if (blocked) {
        char why[300];
        snprintf(why, sizeof(why), "the broker blocks publishing: %s", reason ? reason : "?");
        set_state(sub, 0, why);
    } else if (sub->mq != NULL && mq_is_open(sub->mq)) {
        set_state(sub, 1, "");
    }
}

static void try_connect(api_submit_t *sub)
{
    const mp_config_t *cfg = sub->cfg;
    mq_config_t mc = {
        .host = cfg->amqp_host, .port = cfg->amqp_port, .user = cfg->amqp_user,
        .password = cfg->amqp_password, .vhost = cfg->amqp_vhost,
        .heartbeat = cfg->amqp_heartbeat, .queue = cfg->amqp_queue,
        .dead_queue = cfg->amqp_dead_queue, .events_exchange = cfg->amqp_events_exchange,
    };
    char err[256] = "";
    sub->mq = mq_open(sub->loop, &mc, err, sizeof(err));
    if (sub->mq == NULL) {
        char why[300];
        snprintf(why, sizeof(why), "%s", err[0] ? err : "connect failed");
        set_state(sub, 0, why);
        loop_timer_set(sub->loop, &sub->reconnect_timer, sub->backoff_ms);
        sub->backoff_ms = sub->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : sub->backoff_ms * 2;
        return;
    }
    sub->blocked = 0;
    mq_on_blocked(sub->mq, on_blocked, sub);
    sub->backoff_ms = BACKOFF_MIN_MS;
    set_state(sub, 1, "");
}

static void on_reconnect(loop_t *loop, loop_timer_t *t, void *arg)
{
    try_connect(arg);
}

static void on_check(loop_t *loop, loop_timer_t *t, void *arg)
{
    api_submit_t *sub = arg;
    if (sub->mq != NULL && !mq_is_open(sub->mq)) {
        mq_t *mq = sub->mq;
        sub->mq = NULL;
        set_state(sub, 0, "connection to the broker lost");
        mq_free(mq); /* its unconfirmed publishes fail */
        loop_timer_set(loop, &sub->reconnect_timer, sub->backoff_ms);
    }
    loop_timer_set(loop, &sub->check_timer, CHECK_MS);
}

static void *publisher_main(void *arg)
{
    api_submit_t *sub = arg;
    pthread_setname_np(pthread_self(), "mp-api-pub");
    try_connect(sub);
    loop_timer_set(sub->loop, &sub->check_timer, CHECK_MS);
    loop_run(sub->loop);
    loop_timer_cancel(sub->loop, &sub->check_timer);
    loop_timer_cancel(sub->loop, &sub->reconnect_timer);
    on_wakeup(sub->loop, sub); /* fail what came in since the last wakeup */
    mq_free(sub->mq);
    sub->mq = NULL;
    return NULL;
}

api_submit_t *api_submit_start(const mp_config_t *cfg, char *err, size_t errlen)
{
    api_submit_t *sub = xcalloc(1, sizeof(*sub));
    sub->cfg = cfg;
    sub->backoff_ms = BACKOFF_MIN_MS;
    snprintf(sub->down, sizeof(sub->down), "not connected yet");
    pthread_mutex_init(&sub->lock, NULL);
    sub->loop = loop_new();
    if (sub->loop == NULL) {
        snprintf(err, errlen, "loop_new: %s", strerror(errno));
        api_submit_stop(sub);
        return NULL;
    }
    loop_set_wakeup(sub->loop, on_wakeup, sub);
    loop_timer_init(&sub->check_timer, on_check, sub);
    loop_timer_init(&sub->reconnect_timer, on_reconnect, sub);
    int rc = pthread_create(&sub->thread, NULL, publisher_main, sub);
    if (rc != 0) {
        snprintf(err, errlen, "pthread_create: %s", strerror(rc));
        api_submit_stop(sub);
        return NULL;
    }
    sub->started = 1;
    return sub;
}

int api_submit_ready(api_submit_t *sub)
{
    pthread_mutex_lock(&sub->lock);
    int up = sub->up;
    pthread_mutex_unlock(&sub->lock);
    return up;
}

void api_submit_stop(api_submit_t *sub)
{
    if (sub == NULL)
        return;
    if (sub->started) {
        pthread_mutex_lock(&sub->lock);
        sub->stopping = 1;
        pthread_mutex_unlock(&sub->lock);
        loop_wakeup(sub->loop);
        pthread_join(sub->thread, NULL);
    }
    if (sub->loop != NULL)
        loop_free(sub->loop);
    pthread_mutex_destroy(&sub->lock);
    free(sub);
}

/* ---- the handler ---- */

static int request_priority(api_call_t *c, int *prio)
{
    const char *q = api_query(c, "priority");
    const char *h = api_header(c, "X-Mailpump-Priority");
    const char *v = q ? q : h;
    *prio = -1;
    if (v == NULL)
        return 0;
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (end == v || *end != '\0' || errno != 0 || n < 0 || n > 10) {
        api_error(c, 400, "invalid", "%s must be an integer 0..10 (got \"%.40s\")",
                  q ? "?priority" : "X-Mailpump-Priority", v);
        return -1;
    }
    *prio = (int)n;
    return 0;
}

static json_t *id_list(const batch_t *b, int want)
{
    json_t *a = json_array();
    for (size_t i = 0; i < b->n; i++)
        if ((want == 1) == (b->state[i] == 1))
            json_array_append_new(a, json_string(b->ids[i]));
    return a;
}

static void handle_submit(api_call_t *c, void *arg)
{
    api_submit_t *sub = arg;
    const mp_config_t *cfg = sub->cfg;
    const json_t *body = api_body(c);
    if (body == NULL || !(json_is_object(body) || json_is_array(body))) {
        api_error(c, 400, "invalid", "the body must be a message object or an array of them");
        return;
    }
    int prio;
    if (request_priority(c, &prio) < 0)
        return;
    size_t n = json_is_array(body) ? json_array_size(body) : 1;
    if (n == 0) {
        api_error(c, 400, "invalid", "no messages: the array is empty");
        return;
    }
    if (n > cfg->api_max_batch) {
        api_error(c, 413, "too_many_messages", "%zu messages: at most %u per request ([api] max_batch)",
                  n, cfg->api_max_batch);
        return;
    }
    batch_t *b = xcalloc(1, sizeof(*b));
    b->sub = sub;
    b->n = n;
    b->priority = prio;
    b->bodies = xcalloc(n, sizeof(char *));
    b->ids = xcalloc(n, sizeof(char *));
    b->state = xcalloc(n, sizeof(int));
    b->pubs = xcalloc(n, sizeof(pub_t));
    b->pending = n;
    b->refs = 2;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cond, &ca);
    pthread_condattr_destroy(&ca);
    json_t *bad = json_array();
    for (size_t i = 0; i < n; i++) {
        const json_t *m = json_is_array(body) ? json_array_get(body, i) : body;
        b->pubs[i].b = b;
        b->pubs[i].i = i;
        char err[512];
        if (!json_is_object(m)) {
            json_array_append_new(bad, json_pack("{s:I, s:s}", "index", (json_int_t)i, "reason",
                                                 "not a JSON object"));
            continue;
        }
        json_t *copy = json_copy((json_t *)m);
        json_t *jid = json_object_get(copy, "id");
        if (jid == NULL || json_is_null(jid)) {
            char id[37];
            util_uuid(id);
            json_object_set_new(copy, "id", json_string(id));
        }
        b->bodies[i] = json_dumps(copy, JSON_COMPACT);
        json_decref(copy);
        message_t *msg = NULL;
        if (msgjson_parse(b->bodies[i], strlen(b->bodies[i]), &msg, err, sizeof(err)) != MSGJSON_OK) {
            json_t *r = json_string(err);
            json_array_append_new(bad, json_pack("{s:I, s:o}", "index", (json_int_t)i, "reason",
                                                 r ? r : json_string("invalid")));
            continue;
        }
        b->ids[i] = xstrdup(msg->id);
        message_free(msg);
    }
    if (json_array_size(bad) > 0) {
        size_t nbad = json_array_size(bad);
        json_t *first = json_array_get(bad, 0);
        api_error_with(c, 422, "invalid_message", json_pack("{s:o}", "messages", bad),
                       "%zu of %zu messages invalid, none published; the first (index %lld): %s", nbad, n,
                       (long long)json_integer_value(json_object_get(first, "index")),
                       json_string_value(json_object_get(first, "reason")));
        b->refs = 1;
        pthread_mutex_lock(&sub->lock);
        batch_unref_locked(b);
        pthread_mutex_unlock(&sub->lock);
        return;
    }
    json_decref(bad);

    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    uint64_t ns = (uint64_t)deadline.tv_nsec + (cfg->api_publish_timeout_ms % 1000) * 1000000u;
    deadline.tv_sec += (time_t)(cfg->api_publish_timeout_ms / 1000 + ns / 1000000000u);
    deadline.tv_nsec = (long)(ns % 1000000000u);

    pthread_mutex_lock(&sub->lock);
    if (!sub->up || sub->stopping) {
        char why[400];
        snprintf(why, sizeof(why), "broker unavailable: %s", sub->stopping ? "the server is stopping" : sub->down);
        json_t *extra = json_pack("{s:[], s:o}", "confirmed", "unconfirmed", id_list(b, 0));
        b->refs = 1;
        batch_unref_locked(b);
        pthread_mutex_unlock(&sub->lock);
        api_error_with(c, 503, "unavailable", extra, "%s", why);
        return;
    }
    if (sub->tail)
        sub->tail->next = b;
    else
        sub->head = b;
    sub->tail = b;
    pthread_mutex_unlock(&sub->lock);
    loop_wakeup(sub->loop);

    pthread_mutex_lock(&sub->lock);
    int timedout = 0;
    while (b->pending > 0 && !timedout)
        timedout = pthread_cond_timedwait(&b->cond, &sub->lock, &deadline) == ETIMEDOUT;
    size_t failed = 0;
    for (size_t i = 0; i < n; i++)
        failed += b->state[i] != 1;
    if (failed == 0) {
        json_t *ids = id_list(b, 1);
        batch_unref_locked(b);
        pthread_mutex_unlock(&sub->lock);
        metrics_inc(MET_API_MESSAGES_SUBMITTED, n);
        api_reply(c, 202, json_pack("{s:o}", "ids", ids));
        return;
    }
    json_t *extra = json_pack("{s:o, s:o}", "confirmed", id_list(b, 1), "unconfirmed", id_list(b, 0));
    char why[400];
    if (b->reason[0])
        snprintf(why, sizeof(why), "%s", b->reason);
    else
        snprintf(why, sizeof(why), "the broker did not confirm within [api] publish_timeout (%llu ms)",
                 (unsigned long long)cfg->api_publish_timeout_ms);
    metrics_inc(MET_API_MESSAGES_SUBMITTED, n - failed);
    batch_unref_locked(b);
    pthread_mutex_unlock(&sub->lock);
    api_error_with(c, 503, "unavailable", extra, "%zu of %zu messages not confirmed: %s", failed, n, why);
}

int api_submit_route(api_server_t *s, api_submit_t *sub)
{
    return api_route(s, "POST", "/v1/messages", handle_submit, sub);
}

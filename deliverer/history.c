/*
 * deliverer/history.c - a message's history in Redis (see history.h).
 */
#include "deliverer/history.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "core/buf.h"
#include "core/util.h"
#include "metrics/metrics.h"

/* RPUSH in slices (Lua's unpack has a stack limit), then the lifetime
 * and the bound: KEYS[1] the list, ARGV[1] ttl ms, ARGV[2] max records,
 * ARGV[3..] the records. */
static const char HISTORY_SCRIPT[] =
    "local n = #ARGV\n"
    "for i = 3, n, 256 do\n"
    "  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 255, n)))\n"
    "end\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[1])\n"
    "redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)\n"
    "return n - 2\n";

void history_format_ts(uint64_t ms, char *out, size_t len)
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char when[40];
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, len, "%s.%03uZ", when, (unsigned)(ms % 1000));
}

static void set_ts(json_t *o, const char *key, uint64_t ms)
{
    char ts[64];
    history_format_ts(ms, ts, sizeof(ts));
    json_object_set_new(o, key, json_string(ts));
}

/* Not valid UTF-8 (a reason quoting bad input): its bytes outside
 * printable ASCII become '?', as in the events. */
static void set_str(json_t *o, const char *key, const char *v)
{
    if (v == NULL || v[0] == '\0')
        return;
    json_t *s = json_string(v);
    if (s == NULL) {
        char *copy = xstrdup(v);
        for (char *c = copy; *c; c++)
            if ((unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f)
                *c = '?';
        s = json_string(copy);
        free(copy);
    }
    json_object_set_new(o, key, s);
}

char *history_attempt_json(const history_attempt_t *a)
{
    uint64_t finished = a->finished_ms ? a->finished_ms : util_wall_ms();
    json_t *o = json_object();
    json_object_set_new(o, "event", json_string("attempt"));
    set_str(o, "message_id", a->message_id);
    json_object_set_new(o, "attempt", json_integer(a->attempt));
    set_ts(o, "ts", a->started_ms);
    json_object_set_new(o, "started_ms", json_integer((json_int_t)a->started_ms));
    json_object_set_new(o, "finished_ms", json_integer((json_int_t)finished));
    json_object_set_new(o, "recipients", json_integer((json_int_t)a->recipients));
    if (a->omitted > 0)
        json_object_set_new(o, "omitted", json_integer((json_int_t)a->omitted));
    if (a->retrying) {
        json_t *r = json_object();
        json_object_set_new(r, "level", json_integer((json_int_t)a->retry_level));
        set_str(r, "queue", a->retry_queue);
        json_object_set_new(r, "delay_ms", json_integer((json_int_t)a->retry_delay_ms));
        set_ts(r, "due", finished + a->retry_delay_ms);
        json_object_set_new(r, "due_ms", json_integer((json_int_t)(finished + a->retry_delay_ms)));
        json_object_set_new(r, "attempt", json_integer(a->retry_attempt));
        json_object_set_new(o, "retry", r);
    }
    set_str(o, "give_up", a->give_up);
    if (a->dead_reason != NULL && a->dead_reason[0] != '\0') {
        json_t *d = json_object();
        set_str(d, "reason", a->dead_reason);
        set_str(d, "queue", a->dead_queue);
        json_object_set_new(o, "dead", d);
    }
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (s == NULL)
        abort(); /* only on OOM: core policy */
    return s;
}

char *history_key(const char *msg_id)
{
    buf_t b = BUF_INIT;
    buf_printf(&b, "mp:h:%s", msg_id);
    return buf_steal(&b, NULL);
}

static void history_on_reply(void *arg, const redisReply *reply, const char *err)
{
    (void)arg;
    (void)err;
    if (reply == NULL || reply->type == REDIS_REPLY_ERROR)
        metrics_inc(MET_TRACE_WRITE_FAILURES, 1);
}

int history_write(rclient_t *rc, const char *msg_id, const char *const *recs, size_t n, uint64_t ttl_ms,
                  unsigned max_records)
{
    if (rc == NULL || n == 0 || msg_id == NULL || msg_id[0] == '\0')
        return 0;
    char *key = history_key(msg_id);
    char ttl[32], max[32];
    snprintf(ttl, sizeof(ttl), "%llu", (unsigned long long)(ttl_ms ? ttl_ms : 1));
    snprintf(max, sizeof(max), "%u", max_records ? max_records : 1);
    size_t argc = 6 + n;
    const char **argv = xcalloc(argc, sizeof(char *));
    size_t *lens = xcalloc(argc, sizeof(size_t));
    argv[0] = "EVAL";
    argv[1] = HISTORY_SCRIPT;
    argv[2] = "1";
    argv[3] = key;
    argv[4] = ttl;
    argv[5] = max;
    for (size_t i = 0; i < n; i++)
        argv[6 + i] = recs[i];
    for (size_t i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    rclient_commandargv(rc, history_on_reply, NULL, (int)argc, argv, lens);
    metrics_inc(MET_TRACE_WRITES, 1);
    free(lens);
    free(argv);
    free(key);
    return 1;
}

/*
 * control/trace.c - a message's history and where it is now (see
 * trace.h). Reads: LRANGE and PTTL of mp:h:<id>, then MGET of the
 * ledger's records of the recipients the history names; with no
 * history, a SCAN for mp:r:<id>:* (the whole keyspace, once) finds a
 * first attempt still running.
 */
#include "control/trace.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "core/util.h"

/* Ledger records read back without a history, at most. */
#define TRACE_SCAN_MAX 10000

static const char *str_of(const json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

static void copy_field(json_t *to, const char *to_key, const json_t *from, const char *key)
{
    json_t *v = json_object_get(from, key);
    if (v != NULL && !json_is_null(v))
        json_object_set(to, to_key, v);
}

/* A recipient's outcome from its event's name. */
static const char *rcpt_outcome(const char *event, const char *reason)
{
    if (strcmp(event, "delivered") == 0)
        return "delivered";
    if (strcmp(event, "deferred") == 0)
        return "deferred";
    if (strcmp(event, "dead") == 0)
        return "dead";
    if (strcmp(event, "bounced") == 0)
        return reason != NULL && strcmp(reason, "suppressed") == 0 ? "suppressed" : "bounced";
    return "unknown";
}

static int outcome_final(const char *o)
{
    return strcmp(o, "delivered") == 0 || strcmp(o, "bounced") == 0 || strcmp(o, "suppressed") == 0 ||
           strcmp(o, "dead") == 0;
}

static int ledger_in_flight(const char *v)
{
    return v != NULL && (strcmp(v, "sending") == 0 || strncmp(v, "retry:", 6) == 0);
}

static char *lower(const char *s)
{
    char *out = xstrdup(s);
    for (char *c = out; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    return out;
}

/* The recipient's entry (its index in rcpts kept in index). */
static json_t *rcpt_entry(json_t *rcpts, json_t *index, const char *addr)
{
    json_t *at = json_object_get(index, addr);
    if (at != NULL)
        return json_array_get(rcpts, (size_t)json_integer_value(at));
    json_t *r = json_object();
    json_object_set_new(r, "recipient", json_string(addr));
    json_object_set_new(r, "outcome", json_string("unknown"));
    json_object_set_new(r, "attempts", json_integer(0));
    json_object_set_new(index, addr, json_integer((json_int_t)json_array_size(rcpts)));
    json_array_append_new(rcpts, r);
    return r;
}

static void rcpt_event(json_t *r, const json_t *rec, const char *event)
{
    const char *reason = str_of(rec, "reason");
    json_int_t attempt = json_integer_value(json_object_get(rec, "attempt"));
    json_object_set_new(r, "outcome", json_string(rcpt_outcome(event, reason)));
    if (reason != NULL)
        json_object_set_new(r, "reason", json_string(reason));
    else
        json_object_del(r, "reason");
    json_t *prev = json_object_get(r, "last");
    if (prev == NULL || json_integer_value(json_object_get(prev, "attempt")) != attempt)
        json_object_set_new(r, "attempts", json_integer(json_integer_value(json_object_get(r, "attempts")) + 1));
    json_t *last = json_object();
    json_object_set_new(last, "attempt", json_integer(attempt));
    const json_t *smtp = json_object_get(rec, "smtp");
    if (smtp != NULL) {
        copy_field(last, "code", smtp, "code");
        copy_field(last, "enhanced", smtp, "enhanced");
        copy_field(last, "text", smtp, "text");
    }
    if (json_object_get(last, "text") == NULL || json_string_length(json_object_get(last, "text")) == 0)
        copy_field(last, "text", rec, "error"); /* no server answered: the local reason */
    copy_field(last, "mx_host", rec, "mx_host");
    copy_field(last, "mx_addr", rec, "mx_addr");
    copy_field(last, "source", rec, "source");
    copy_field(last, "ts", rec, "ts");
    json_object_set_new(r, "last", last);
}

json_t *trace_summarize(const char *id, const json_t *records, const json_t *ledger, uint64_t now_ms)
{
    json_t *out = json_object();
    json_t *rcpts = json_array(), *index = json_object();
    const json_t *last_attempt = NULL, *sent = NULL;
    const char *last_ts = NULL;
    json_int_t attempts = 0;
    json_object_set_new(out, "id", json_string(id));
    size_t i;
    const json_t *rec;
    json_array_foreach(records, i, rec) {
        const char *event = str_of(rec, "event");
        if (event == NULL)
            continue;
        if (str_of(rec, "ts") != NULL)
            last_ts = str_of(rec, "ts");
        if (strcmp(event, "attempt") == 0) {
            last_attempt = rec;
            attempts++;
            continue;
        }
        if (json_object_get(out, "tenant") == NULL)
            copy_field(out, "tenant", rec, "tenant");
        if (json_object_get(out, "campaign") == NULL)
            copy_field(out, "campaign", rec, "campaign");
        if (json_object_get(out, "sender") == NULL)
            copy_field(out, "sender", rec, "from");
        const char *addr = str_of(rec, "recipient");
        if (addr != NULL)
            rcpt_event(rcpt_entry(rcpts, index, addr), rec, event);
        else if (strcmp(event, "appended") == 0 || strcmp(event, "append_failed") == 0)
            sent = rec;
    }
    /* the ledger's values, and recipients only it knows */
    json_t *flying = json_array();
    if (ledger != NULL) {
        const char *addr;
        json_t *v;
        json_object_foreach((json_t *)ledger, addr, v) {
            const char *val = json_string_value(v);
            if (val == NULL)
                continue;
            json_t *r = NULL;
            json_array_foreach(rcpts, i, rec) {
                char *low = lower(str_of(rec, "recipient"));
                int same = strcmp(low, addr) == 0;
                free(low);
                if (same) {
                    r = (json_t *)rec;
                    break;
                }
            }
            if (r == NULL)
                r = rcpt_entry(rcpts, index, addr);
            json_object_set(r, "ledger", v);
            if (ledger_in_flight(val)) {
                json_t *f = json_object();
                json_object_set(f, "recipient", json_object_get(r, "recipient"));
                json_object_set(f, "ledger", v);
                json_array_append_new(flying, f);
            }
        }
    }
    json_t *where = json_object();
    const char *state = "unknown";
    const json_t *dead = last_attempt ? json_object_get(last_attempt, "dead") : NULL;
    const json_t *retry = last_attempt ? json_object_get(last_attempt, "retry") : NULL;
    if (dead != NULL) {
        state = "dead";
        copy_field(where, "reason", dead, "reason");
        copy_field(where, "queue", dead, "queue");
        copy_field(where, "attempt", last_attempt, "attempt");
        copy_field(where, "ts", last_attempt, "ts");
    } else if (json_array_size(flying) > 0) {
        state = "in_flight";
        json_object_set(where, "recipients", flying);
    } else if (retry != NULL) {
        state = "queued";
        copy_field(where, "level", retry, "level");
        copy_field(where, "queue", retry, "queue");
        copy_field(where, "delay_ms", retry, "delay_ms");
        copy_field(where, "due", retry, "due");
        copy_field(where, "due_ms", retry, "due_ms");
        copy_field(where, "attempt", retry, "attempt");
        json_t *pending = json_array();
        json_array_foreach(rcpts, i, rec)
            if (strcmp(str_of(rec, "outcome"), "deferred") == 0)
                json_array_append(pending, json_object_get(rec, "recipient"));
        json_object_set_new(where, "pending", pending);
        json_int_t due = json_integer_value(json_object_get(retry, "due_ms"));
        json_object_set_new(where, "overdue", json_boolean(due > 0 && (uint64_t)due < now_ms));
    } else if (last_attempt != NULL) {
        int final = json_array_size(rcpts) > 0 || sent != NULL;
        json_array_foreach(rcpts, i, rec)
            final = final && outcome_final(str_of(rec, "outcome"));
        if (final) {
            state = "done";
            json_object_set_new(where, "attempts", json_integer(attempts));
            if (last_ts != NULL)
                json_object_set_new(where, "finished", json_string(last_ts));
        }
    }
    json_decref(flying);
    json_object_set_new(out, "state", json_string(state));
    json_object_set_new(out, "where", where);
    json_object_set_new(out, "attempts", json_integer(attempts));
    json_object_set_new(out, "recipients", rcpts);
    if (sent != NULL) {
        json_t *s = json_object();
        json_object_set_new(s, "appended", json_boolean(strcmp(str_of(sent, "event"), "appended") == 0));
        const json_t *imap = json_object_get(sent, "imap");
        if (imap != NULL) {
            copy_field(s, "mailbox", imap, "mailbox");
            copy_field(s, "uid", imap, "uid");
            copy_field(s, "uidvalidity", imap, "uidvalidity");
        }
        copy_field(s, "error", sent, "error");
        copy_field(s, "ts", sent, "ts");
        json_object_set_new(out, "sent_copy", s);
    }
    json_object_set_new(out, "history", json_deep_copy(records));
    json_decref(index);
    return out;
}

/* A SCAN pattern matching id literally. */
static char *glob_escape(const char *id)
{
    buf_t b = BUF_INIT;
    for (const char *c = id; *c; c++) {
        if (strchr("*?[]\\", *c) != NULL)
            buf_putc(&b, '\\');
        buf_putc(&b, *c);
    }
    buf_putc(&b, '\0');
    return buf_steal(&b, NULL);
}

/* keys[i] -> their values, into ledger (recipient -> value). */
static int ledger_read(ctl_t *c, const char *id, char **rcpts, size_t n, json_t *ledger, char *err, size_t errlen)
{
    if (n == 0)
        return 0;
    const char **argv = xcalloc(n + 1, sizeof(char *));
    char **keys = xcalloc(n, sizeof(char *));
    argv[0] = "MGET";
    for (size_t i = 0; i < n; i++) {
        buf_t b = BUF_INIT;
        buf_printf(&b, "mp:r:%s:%s", id, rcpts[i]);
        keys[i] = buf_steal(&b, NULL);
        argv[i + 1] = keys[i];
    }
    redisReply *rep = ctl_command_argv(c, err, errlen, (int)n + 1, argv, NULL);
    int rc = rep == NULL ? -1 : 0;
    if (rep != NULL && rep->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i < rep->elements && i < n; i++)
            if (rep->element[i]->type == REDIS_REPLY_STRING)
                json_object_set_new(ledger, rcpts[i], json_stringn(rep->element[i]->str, rep->element[i]->len));
    freeReplyObject(rep);
    for (size_t i = 0; i < n; i++)
        free(keys[i]);
    free(keys);
    free(argv);
    return rc;
}

/* The recipients of id's ledger records found by SCAN (lower case). */
static int ledger_scan(ctl_t *c, const char *id, char ***out, size_t *nout, char *err, size_t errlen)
{
    char *esc = glob_escape(id);
    buf_t pat = BUF_INIT;
    buf_printf(&pat, "mp:r:%s:*", esc);
    free(esc);
    char *pattern = buf_steal(&pat, NULL);
    size_t prefix = strlen("mp:r:") + strlen(id) + 1;
    char cursor[32] = "0";
    char **rcpts = NULL;
    size_t n = 0;
    int rc = 0;
    do {
        redisReply *rep = ctl_command(c, err, errlen, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        if (rep == NULL) {
            rc = -1;
            break;
        }
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2) {
            snprintf(err, errlen, "redis: unexpected SCAN reply");
            freeReplyObject(rep);
            rc = -1;
            break;
        }
        snprintf(cursor, sizeof(cursor), "%s", rep->element[0]->str);
        const redisReply *keys = rep->element[1];
        for (size_t i = 0; i < keys->elements && n < TRACE_SCAN_MAX; i++) {
            if (keys->element[i]->len <= prefix)
                continue;
            rcpts = xrealloc(rcpts, (n + 1) * sizeof(char *));
            rcpts[n++] = xstrdup(keys->element[i]->str + prefix);
        }
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") != 0 && n < TRACE_SCAN_MAX);
    free(pattern);
    *out = rcpts;
    *nout = n;
    return rc;
}

static void free_strv(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

json_t *ctl_trace(ctl_t *c, const char *id, int *status, char *err, size_t errlen)
{
    *status = CTL_OK;
    if (id == NULL || id[0] == '\0') {
        snprintf(err, errlen, "a message id is needed");
        *status = CTL_EINVAL;
        return NULL;
    }
    buf_t k = BUF_INIT;
    buf_printf(&k, "mp:h:%s", id);
    char *key = buf_steal(&k, NULL);
    json_t *records = json_array();
    json_t *ledger = json_object();
    json_t *out = NULL;
    long long pttl = -2;
    char **rcpts = NULL;
    size_t nrcpts = 0;
    redisReply *rep = ctl_command(c, err, errlen, "LRANGE %s 0 -1", key);
    if (rep == NULL)
        goto unavailable;
    for (size_t i = 0; rep->type == REDIS_REPLY_ARRAY && i < rep->elements; i++) {
        json_t *r = json_loadb(rep->element[i]->str, rep->element[i]->len, 0, NULL);
        if (!json_is_object(r)) { /* not ours: kept visible, never parsed */
            json_decref(r);
            r = json_pack("{s:s,s:s%}", "event", "unreadable", "raw", rep->element[i]->str, rep->element[i]->len);
        }
        json_array_append_new(records, r);
    }
    freeReplyObject(rep);
    rep = ctl_command(c, err, errlen, "PTTL %s", key);
    if (rep == NULL)
        goto unavailable;
    pttl = rep->integer;
    freeReplyObject(rep);
    if (json_array_size(records) > 0) {
        json_t *index = json_object();
        size_t i;
        json_t *rec;
        json_array_foreach(records, i, rec) {
            const char *addr = str_of(rec, "recipient");
            if (addr == NULL)
                continue;
            char *low = lower(addr);
            if (json_object_get(index, low) == NULL) {
                json_object_set_new(index, low, json_true());
                rcpts = xrealloc(rcpts, (nrcpts + 1) * sizeof(char *));
                rcpts[nrcpts++] = low;
            } else {
                free(low);
            }
        }
        json_decref(index);
    } else if (ledger_scan(c, id, &rcpts, &nrcpts, err, errlen) < 0) {
        goto unavailable;
    }
    if (ledger_read(c, id, rcpts, nrcpts, ledger, err, errlen) < 0)
        goto unavailable;
    if (json_array_size(records) == 0 && json_object_size(ledger) == 0) {
        snprintf(err, errlen, "nothing recorded for message %s: the id is unknown or its history expired "
                 "([trace] ttl); the two cannot be told apart", id);
        *status = CTL_ENOTFOUND;
        goto out;
    }
    out = trace_summarize(id, records, ledger, util_wall_ms());
    if (pttl >= 0)
        json_object_set_new(out, "expires_in_ms", json_integer(pttl));
    goto out;
unavailable:
    *status = CTL_EUNAVAIL;
out:
    free_strv(rcpts, nrcpts);
    json_decref(records);
    json_decref(ledger);
    free(key);
    return out;
}

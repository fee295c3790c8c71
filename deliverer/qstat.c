/*
 * deliverer/qstat.c - a worker's status record and its destination
 * tables (see qstat.h).
 *
 * The record's JSON, written by the workers and read by control/queue.c:
 *   {"queue","host","pid","worker","inflight","inflight_bytes","smtp_connections",
 *    "oldest_first_seen_ms","updated_ms",
 *    "dests":[{"d","w","p","f","e","et"}]}
 * d destination, w waiting, p parked, f deferred, e last error, et its
 * wall-clock ms. Strings that are not UTF-8 have their other bytes
 * replaced by '?'.
 */
#include "deliverer/qstat.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"

static void copy_str(char *dst, size_t n, const char *src)
{
    util_copy_text(dst, n, src != NULL ? src : "");
}

static qstat_dest_t *find_or_add(qstat_table_t *t, const char *dest)
{
    for (size_t i = 0; i < t->n; i++)
        if (strcmp(t->d[i].name, dest) == 0)
            return &t->d[i];
    qstat_dest_t *d;
    if (t->n < QSTAT_DESTS) {
        d = &t->d[t->n++];
    } else {
        d = &t->d[0];
        for (size_t i = 1; i < t->n; i++)
            if (t->d[i].last_ms < d->last_ms)
                d = &t->d[i];
    }
    memset(d, 0, sizeof(*d));
    copy_str(d->name, sizeof(d->name), dest);
    return d;
}

void qstat_note(qstat_table_t *t, const char *dest, int parked, const char *error, uint64_t now_ms)
{
    if (dest == NULL || dest[0] == '\0')
        return;
    qstat_dest_t *d = find_or_add(t, dest);
    uint64_t minute = now_ms / 60000;
    size_t b = (size_t)(minute % QSTAT_BUCKETS);
    if (d->minute[b] != minute) {
        d->minute[b] = minute;
        d->deferred[b] = 0;
        d->parked[b] = 0;
    }
    if (parked) {
        d->parked[b]++;
    } else {
        d->deferred[b]++;
        if (error != NULL && error[0] != '\0') {
            copy_str(d->last_error, sizeof(d->last_error), error);
            d->last_error_ms = now_ms;
        }
    }
    d->last_ms = now_ms;
}

uint64_t qstat_recent(const qstat_dest_t *d, int parked, uint64_t now_ms)
{
    uint64_t minute = now_ms / 60000, sum = 0;
    for (size_t b = 0; b < QSTAT_BUCKETS; b++)
        if (d->minute[b] + QSTAT_BUCKETS > minute && d->minute[b] <= minute)
            sum += parked ? d->parked[b] : d->deferred[b];
    return sum;
}

void qstat_expire(qstat_table_t *t, uint64_t now_ms)
{
    size_t k = 0;
    for (size_t i = 0; i < t->n; i++) {
        if (qstat_recent(&t->d[i], 0, now_ms) + qstat_recent(&t->d[i], 1, now_ms) == 0)
            continue;
        if (k != i)
            t->d[k] = t->d[i];
        k++;
    }
    t->n = k;
}

size_t qstat_table_rows(const qstat_table_t *t, qstat_row_t *out, size_t cap, uint64_t now_ms)
{
    size_t n = 0;
    for (size_t i = 0; i < t->n && n < cap; i++) {
        const qstat_dest_t *d = &t->d[i];
        uint64_t f = qstat_recent(d, 0, now_ms), p = qstat_recent(d, 1, now_ms);
        if (f + p == 0)
            continue;
        qstat_row_t *r = &out[n++];
        memset(r, 0, sizeof(*r));
        copy_str(r->dest, sizeof(r->dest), d->name);
        r->deferred = f;
        r->parked = p;
        if (d->last_error_ms + QSTAT_WINDOW_MS > now_ms) {
            copy_str(r->last_error, sizeof(r->last_error), d->last_error);
            r->last_error_ms = d->last_error_ms;
        }
    }
    return n;
}

size_t qstat_merge(qstat_row_t *acc, size_t n, size_t cap, const qstat_row_t *in, size_t nin)
{
    for (size_t i = 0; i < nin; i++) {
        const qstat_row_t *r = &in[i];
        size_t k;
        for (k = 0; k < n; k++)
            if (strcmp(acc[k].dest, r->dest) == 0)
                break;
        if (k == n) {
            if (n == cap)
                continue;
            acc[n++] = *r;
            continue;
        }
        qstat_row_t *a = &acc[k];
        a->waiting += r->waiting;
        a->parked += r->parked;
        a->deferred += r->deferred;
        if (r->last_error_ms > a->last_error_ms) {
            copy_str(a->last_error, sizeof(a->last_error), r->last_error);
            a->last_error_ms = r->last_error_ms;
        }
    }
    qstat_sort(acc, n);
    return n;
}

static int row_cmp(const void *pa, const void *pb)
{
    const qstat_row_t *a = pa, *b = pb;
    if (a->waiting != b->waiting)
        return a->waiting > b->waiting ? -1 : 1;
    if (a->deferred != b->deferred)
        return a->deferred > b->deferred ? -1 : 1;
    if (a->parked != b->parked)
        return a->parked > b->parked ? -1 : 1;
    return strcmp(a->dest, b->dest);
}

void qstat_sort(qstat_row_t *rows, size_t n)
{
    if (n > 1)
        qsort(rows, n, sizeof(*rows), row_cmp);
}

/* ---- the JSON ---- */

/* A JSON string of s, its bytes outside UTF-8 replaced by '?'. */
static json_t *jstr(const char *s)
{
    json_t *j = json_string(s);
    if (j != NULL)
        return j;
    char *c = xstrdup(s);
    for (char *p = c; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    j = json_string(c);
    free(c);
    return j;
}

char *qstat_encode(const qstat_record_t *r)
{
    json_t *o = json_object();
    json_object_set_new(o, "queue", jstr(r->queue));
    json_object_set_new(o, "host", jstr(r->host));
    json_object_set_new(o, "pid", json_integer(r->pid));
    json_object_set_new(o, "worker", json_integer(r->worker));
    json_object_set_new(o, "inflight", json_integer((json_int_t)r->inflight));
    json_object_set_new(o, "inflight_bytes", json_integer((json_int_t)r->inflight_bytes));
    json_object_set_new(o, "smtp_connections", json_integer((json_int_t)r->smtp_connections));
    json_object_set_new(o, "oldest_first_seen_ms", json_integer((json_int_t)r->oldest_first_seen_ms));
    json_object_set_new(o, "updated_ms", json_integer((json_int_t)r->updated_ms));
    json_t *a = json_array();
    for (size_t i = 0; i < r->nrows && i < QSTAT_TOP; i++) {
        const qstat_row_t *w = &r->rows[i];
        json_t *d = json_object();
        json_object_set_new(d, "d", jstr(w->dest));
        json_object_set_new(d, "w", json_integer((json_int_t)w->waiting));
        json_object_set_new(d, "p", json_integer((json_int_t)w->parked));
        json_object_set_new(d, "f", json_integer((json_int_t)w->deferred));
        json_object_set_new(d, "e", jstr(w->last_error));
        json_object_set_new(d, "et", json_integer((json_int_t)w->last_error_ms));
        json_array_append_new(a, d);
    }
    json_object_set_new(o, "dests", a);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (s == NULL)
        abort(); /* out of memory, as the x* allocators */
    return s;
}

static int get_u64(json_t *o, const char *key, uint64_t *out)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

static int get_str(json_t *o, const char *key, char *out, size_t n)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v))
        return -1;
    copy_str(out, n, json_string_value(v));
    return 0;
}

int qstat_decode(const char *s, size_t len, qstat_record_t *out)
{
    memset(out, 0, sizeof(*out));
    json_t *o = json_loadb(s, len, 0, NULL);
    if (!json_is_object(o)) {
        json_decref(o);
        return -1;
    }
    uint64_t pid = 0, worker = 0;
    int rc = 0;
    if (get_str(o, "queue", out->queue, sizeof(out->queue)) < 0 ||
        get_str(o, "host", out->host, sizeof(out->host)) < 0 || get_u64(o, "pid", &pid) < 0 ||
        get_u64(o, "worker", &worker) < 0 || get_u64(o, "inflight", &out->inflight) < 0 ||
        get_u64(o, "inflight_bytes", &out->inflight_bytes) < 0 ||
        get_u64(o, "smtp_connections", &out->smtp_connections) < 0 ||
        get_u64(o, "oldest_first_seen_ms", &out->oldest_first_seen_ms) < 0 ||
        get_u64(o, "updated_ms", &out->updated_ms) < 0)
        rc = -1;
    out->pid = (long)pid;
    out->worker = (int)worker;
    json_t *a = json_object_get(o, "dests");
    if (rc == 0 && !json_is_array(a))
        rc = -1;
    for (size_t i = 0; rc == 0 && i < json_array_size(a) && out->nrows < QSTAT_TOP; i++) {
        json_t *d = json_array_get(a, i);
        qstat_row_t *w = &out->rows[out->nrows];
        if (!json_is_object(d) || get_str(d, "d", w->dest, sizeof(w->dest)) < 0 ||
            get_u64(d, "w", &w->waiting) < 0 || get_u64(d, "p", &w->parked) < 0 ||
            get_u64(d, "f", &w->deferred) < 0 ||
            get_str(d, "e", w->last_error, sizeof(w->last_error)) < 0 ||
            get_u64(d, "et", &w->last_error_ms) < 0) {
            rc = -1;
            break;
        }
        out->nrows++;
    }
    json_decref(o);
    return rc;
}

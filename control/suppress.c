/*
 * control/suppress.c - suppression list operations (see suppress.h).
 *
 * Each list is one hash (deliverer/suplist.h); add and remove are one
 * HSET or HDEL of every valid address, get one HGET, list one HSCAN.
 * Import batches 1,000 entries per HSET and keeps 8 of them in flight on
 * the connection (hiredis pipelining) before it reads their replies, so
 * 10,000 lines take two round trips; export walks HSCAN 1,000 at a time.
 */
#include "control/suppress.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/buf.h"
#include "core/message.h"
#include "core/util.h"
#include "deliverer/suplist.h"

#define IMPORT_BATCH 1000
#define IMPORT_PIPELINE 8
#define IMPORT_INVALID_SHOWN 100

/* The list's key (heap) and name, or CTL_EINVAL for a bad tenant. */
static ctl_status_t list_key(const char *tenant, char **key, char *err, size_t errlen)
{
    if (tenant != NULL && !message_valid_ident(MESSAGE_TENANT, tenant)) {
        snprintf(err, errlen, "invalid tenant \"%.64s\" (1-64 letters, digits, '.', '_', '-')", tenant);
        return CTL_EINVAL;
    }
    *key = suplist_key(tenant);
    return CTL_OK;
}

static const char *list_name(const char *tenant)
{
    return tenant ? tenant : "global";
}

static json_t *time_json(uint64_t s)
{
    time_t t = (time_t)s;
    struct tm tm;
    gmtime_r(&t, &tm);
    char at[40];
    strftime(at, sizeof(at), "%Y-%m-%dT%H:%M:%SZ", &tm);
    return json_string(at);
}

static const char *origin_name(char o)
{
    switch (o) {
    case SUPLIST_AUTO: return "auto";
    case SUPLIST_IMPORT: return "import";
    default: return "manual";
    }
}

/* A JSON string of bytes that may not be UTF-8 (replaced by '?'). */
static json_t *str_json(const char *s)
{
    json_t *j = json_string(s);
    if (j != NULL)
        return j;
    buf_t b = BUF_INIT;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++)
        buf_putc(&b, *c >= 0x20 && *c < 0x7f ? (char)*c : '?');
    j = json_string(buf_head(&b) ? buf_head(&b) : "");
    buf_free(&b);
    return j;
}

/* The entry object of field/value (suppress.h); a value that is not an
 * entry gives {"address", "list", "corrupt": true}. */
static json_t *entry_json(const char *tenant, const char *field, const char *v, size_t vlen)
{
    json_t *o = json_object();
    json_object_set_new(o, "address", str_json(field));
    json_object_set_new(o, "list", json_string(list_name(tenant)));
    suplist_entry_t e;
    if (suplist_decode(v, vlen, &e) < 0) {
        json_object_set_new(o, "corrupt", json_true());
        return o;
    }
    json_object_set_new(o, "reason", str_json(e.reason));
    json_object_set_new(o, "added", time_json(e.added_s));
    json_object_set_new(o, "expires", e.expires_s ? time_json(e.expires_s) : json_null());
    json_object_set_new(o, "expired", json_boolean(suplist_expired(&e, (uint64_t)time(NULL))));
    json_object_set_new(o, "origin", json_string(origin_name(e.origin)));
    if (e.code > 0) {
        json_t *r = json_object();
        json_object_set_new(r, "code", json_integer(e.code));
        json_object_set_new(r, "enhanced", e.enh[0] ? str_json(e.enh) : json_null());
        json_object_set_new(r, "text", str_json(e.text));
        json_object_set_new(o, "reply", r);
    } else {
        json_object_set_new(o, "reply", json_null());
    }
    json_object_set_new(o, "message_id", e.message_id[0] ? str_json(e.message_id) : json_null());
    return o;
}

static char *entry_value(const char *reason, char origin)
{
    suplist_entry_t e = { .added_s = (uint64_t)time(NULL), .origin = origin };
    snprintf(e.reason, sizeof(e.reason), "%s", reason);
    return suplist_encode(&e);
}

ctl_status_t suppress_add(ctl_t *c, const char *tenant, const char *const *addrs, size_t n,
                          const char *reason, json_t **out, char *err, size_t errlen)
{
    char *key;
    ctl_status_t st = list_key(tenant, &key, err, errlen);
    if (st < 0)
        return st;
    char *val = entry_value(reason && reason[0] ? reason : "manual", SUPLIST_MANUAL);
    const char **argv = xcalloc(2 + 2 * n, sizeof(char *));
    char **fields = xcalloc(n ? n : 1, sizeof(char *));
    json_t *invalid = json_array();
    size_t a = 0, nf = 0;
    argv[a++] = "HSET";
    argv[a++] = key;
    for (size_t i = 0; i < n; i++) {
        char f[SUPLIST_ADDR_MAX];
        if (suplist_normalize(addrs[i], f) < 0) {
            json_array_append_new(invalid, str_json(addrs[i]));
            continue;
        }
        fields[nf] = xstrdup(f);
        argv[a++] = fields[nf++];
        argv[a++] = val;
    }
    st = CTL_OK;
    long long added = 0;
    if (nf == 0) {
        snprintf(err, errlen, "no valid address given");
        st = CTL_EINVAL;
    } else {
        redisReply *r = ctl_command_argv(c, err, errlen, (int)a, argv, NULL);
        if (r == NULL)
            st = CTL_EUNAVAIL;
        else
            freeReplyObject(r);
        added = (long long)nf;
    }
    if (st == CTL_OK) {
        *out = json_object();
        json_object_set_new(*out, "list", json_string(list_name(tenant)));
        json_object_set_new(*out, "added", json_integer(added));
        json_object_set_new(*out, "invalid", invalid);
    } else {
        json_decref(invalid);
    }
    for (size_t i = 0; i < nf; i++)
        free(fields[i]);
    free(fields);
    free(argv);
    free(val);
    free(key);
    return st;
}

ctl_status_t suppress_remove(ctl_t *c, const char *tenant, const char *const *addrs, size_t n,
                             json_t **out, char *err, size_t errlen)
{
    char *key;
    ctl_status_t st = list_key(tenant, &key, err, errlen);
    if (st < 0)
        return st;
    json_t *invalid = json_array(), *not_found = json_array();
    long long removed = 0;
    for (size_t i = 0; i < n && st == CTL_OK; i++) {
        char f[SUPLIST_ADDR_MAX];
        if (suplist_normalize(addrs[i], f) < 0) {
            json_array_append_new(invalid, str_json(addrs[i]));
            continue;
        }
        redisReply *r = ctl_command(c, err, errlen, "HDEL %s %s", key, f);
        if (r == NULL) {
            st = CTL_EUNAVAIL;
            break;
        }
        if (r->type == REDIS_REPLY_INTEGER && r->integer > 0)
            removed++;
        else
            json_array_append_new(not_found, str_json(addrs[i]));
        freeReplyObject(r);
    }
    free(key);
    if (st != CTL_OK) {
        json_decref(invalid);
        json_decref(not_found);
        return st;
    }
    *out = json_object();
    json_object_set_new(*out, "list", json_string(list_name(tenant)));
    json_object_set_new(*out, "removed", json_integer(removed));
    json_object_set_new(*out, "not_found", not_found);
    json_object_set_new(*out, "invalid", invalid);
    return CTL_OK;
}

ctl_status_t suppress_get(ctl_t *c, const char *tenant, const char *addr, json_t **out, char *err,
                          size_t errlen)
{
    char *key;
    ctl_status_t st = list_key(tenant, &key, err, errlen);
    if (st < 0)
        return st;
    char f[SUPLIST_ADDR_MAX];
    if (suplist_normalize(addr, f) < 0) {
        snprintf(err, errlen, "invalid address \"%.256s\"", addr);
        free(key);
        return CTL_EINVAL;
    }
    redisReply *r = ctl_command(c, err, errlen, "HGET %s %s", key, f);
    free(key);
    if (r == NULL)
        return CTL_EUNAVAIL;
    if (r->type != REDIS_REPLY_STRING) {
        freeReplyObject(r);
        snprintf(err, errlen, "%s is not on the %s suppression list", f, list_name(tenant));
        return CTL_ENOTFOUND;
    }
    *out = entry_json(tenant, f, r->str, r->len);
    freeReplyObject(r);
    return CTL_OK;
}

/* One HSCAN page: entries appended to arr (or written by each), the next
 * cursor into next ("0" at the end). */
typedef void (*scan_each_fn)(void *arg, const char *field, const char *v, size_t vlen);

static ctl_status_t scan_page(ctl_t *c, const char *key, const char *cursor, unsigned count, scan_each_fn each,
                              void *arg, char next[32], char *err, size_t errlen)
{
    redisReply *r = ctl_command(c, err, errlen, "HSCAN %s %s COUNT %u", key, cursor, count);
    if (r == NULL)
        return CTL_EUNAVAIL;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
        r->element[1]->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(r);
        snprintf(err, errlen, "redis: unexpected HSCAN reply");
        return CTL_EUNAVAIL;
    }
    snprintf(next, 32, "%s", r->element[0]->str);
    const redisReply *kv = r->element[1];
    for (size_t i = 0; i + 1 < kv->elements; i += 2)
        each(arg, kv->element[i]->str, kv->element[i + 1]->str, kv->element[i + 1]->len);
    freeReplyObject(r);
    return CTL_OK;
}

typedef struct list_acc {
    const char *tenant;
    json_t     *entries;
} list_acc_t;

static void list_each(void *arg, const char *field, const char *v, size_t vlen)
{
    list_acc_t *a = arg;
    json_array_append_new(a->entries, entry_json(a->tenant, field, v, vlen));
}

ctl_status_t suppress_list(ctl_t *c, const char *tenant, const char *cursor, unsigned limit, json_t **out,
                           char *err, size_t errlen)
{
    if (limit == 0 || limit > 10000) {
        snprintf(err, errlen, "limit must be between 1 and 10000");
        return CTL_EINVAL;
    }
    if (cursor != NULL && (cursor[0] == '\0' || strspn(cursor, "0123456789") != strlen(cursor) ||
                           strlen(cursor) > 20)) {
        snprintf(err, errlen, "invalid cursor \"%.32s\"", cursor);
        return CTL_EINVAL;
    }
    char *key;
    ctl_status_t st = list_key(tenant, &key, err, errlen);
    if (st < 0)
        return st;
    redisReply *len = ctl_command(c, err, errlen, "HLEN %s", key);
    if (len == NULL) {
        free(key);
        return CTL_EUNAVAIL;
    }
    long long total = len->type == REDIS_REPLY_INTEGER ? len->integer : 0;
    freeReplyObject(len);
    list_acc_t acc = { .tenant = tenant, .entries = json_array() };
    char next[32];
    st = scan_page(c, key, cursor ? cursor : "0", limit, list_each, &acc, next, err, errlen);
    free(key);
    if (st != CTL_OK) {
        json_decref(acc.entries);
        return st;
    }
    *out = json_object();
    json_object_set_new(*out, "list", json_string(list_name(tenant)));
    json_object_set_new(*out, "total", json_integer(total));
    json_object_set_new(*out, "entries", acc.entries);
    json_object_set_new(*out, "next_cursor", strcmp(next, "0") == 0 ? json_null() : json_string(next));
    return CTL_OK;
}

/* ---- import ---- */

typedef struct import {
    ctl_t        *c;
    redisContext *r;
    const char   *key;
    const char  **argv;    /* HSET key f v ... of the batch being filled */
    size_t       *lens;
    char        **owned;   /* its strings, freed once appended */
    size_t        argc, nowned;
    size_t        pending; /* HSETs appended, replies not read */
    long long     added;
    int           failed;
    char         *err;
    size_t        errlen;
} import_t;

static void import_read(import_t *im)
{
    while (im->pending > 0) {
        void *rep = NULL;
        im->pending--;
        if (redisGetReply(im->r, &rep) != REDIS_OK || rep == NULL) {
            if (!im->failed)
                snprintf(im->err, im->errlen, "redis: %s", im->r->errstr[0] ? im->r->errstr : "no reply");
            im->failed = 1;
            im->pending = 0;
            ctl_redis_reset(im->c);
            return;
        }
        redisReply *rr = rep;
        if (rr->type == REDIS_REPLY_ERROR && !im->failed) {
            snprintf(im->err, im->errlen, "redis: %.*s", (int)rr->len, rr->str);
            im->failed = 1;
        }
        freeReplyObject(rr);
    }
}

static void import_flush(import_t *im)
{
    if (im->argc > 2 && !im->failed) {
        redisAppendCommandArgv(im->r, (int)im->argc, im->argv, im->lens);
        im->pending++;
        im->added += (long long)(im->argc - 2) / 2;
    }
    for (size_t i = 0; i < im->nowned; i++)
        free(im->owned[i]);
    im->nowned = 0;
    im->argc = 2;
    if (im->pending >= IMPORT_PIPELINE)
        import_read(im);
}

static void import_put(import_t *im, char *field, char *val)
{
    im->owned[im->nowned++] = field;
    im->owned[im->nowned++] = val;
    im->argv[im->argc] = field;
    im->lens[im->argc++] = strlen(field);
    im->argv[im->argc] = val;
    im->lens[im->argc++] = strlen(val);
    if (im->argc >= 2 + 2 * IMPORT_BATCH)
        import_flush(im);
}

ctl_status_t suppress_import(ctl_t *c, const char *tenant, FILE *in, const char *dflt_reason, json_t **out,
                             char *err, size_t errlen)
{
    char *key;
    ctl_status_t st = list_key(tenant, &key, err, errlen);
    if (st < 0)
        return st;
    redisContext *r = ctl_redis(c, err, errlen);
    if (r == NULL) {
        free(key);
        return CTL_EUNAVAIL;
    }
    import_t im = { .c = c, .r = r, .key = key, .argc = 2, .err = err, .errlen = errlen };
    im.argv = xcalloc(2 + 2 * IMPORT_BATCH, sizeof(char *));
    im.lens = xcalloc(2 + 2 * IMPORT_BATCH, sizeof(size_t));
    im.owned = xcalloc(2 * IMPORT_BATCH, sizeof(char *));
    im.argv[0] = "HSET";
    im.lens[0] = 4;
    im.argv[1] = key;
    im.lens[1] = strlen(key);
    json_t *invalid = json_array();
    long long lines = 0, skipped = 0, lineno = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    while (!im.failed && (got = getline(&line, &cap, in)) >= 0) {
        lineno++;
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r'))
            line[--got] = '\0';
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0' || *p == '#')
            continue;
        lines++;
        char *comma = strchr(p, ',');
        const char *reason = dflt_reason && dflt_reason[0] ? dflt_reason : "import";
        if (comma != NULL) {
            *comma = '\0';
            char *rs = comma + 1;
            while (*rs == ' ' || *rs == '\t')
                rs++;
            if (*rs)
                reason = rs;
        }
        size_t al = strlen(p);
        while (al > 0 && (p[al - 1] == ' ' || p[al - 1] == '\t'))
            p[--al] = '\0';
        char f[SUPLIST_ADDR_MAX];
        if (suplist_normalize(p, f) < 0) {
            skipped++;
            if (json_array_size(invalid) < IMPORT_INVALID_SHOWN) {
                json_t *o = json_object();
                json_object_set_new(o, "line", json_integer(lineno));
                json_object_set_new(o, "text", str_json(p));
                json_array_append_new(invalid, o);
            }
            continue;
        }
        import_put(&im, xstrdup(f), entry_value(reason, SUPLIST_IMPORT));
    }
    free(line);
    import_flush(&im);
    import_read(&im);
    free(im.argv);
    free(im.lens);
    free(im.owned);
    free(key);
    if (im.failed) {
        json_decref(invalid);
        return CTL_EUNAVAIL;
    }
    *out = json_object();
    json_object_set_new(*out, "list", json_string(list_name(tenant)));
    json_object_set_new(*out, "lines", json_integer(lines));
    json_object_set_new(*out, "added", json_integer(im.added));
    json_object_set_new(*out, "skipped_invalid", json_integer(skipped));
    json_object_set_new(*out, "invalid", invalid);
    return CTL_OK;
}

/* ---- export ---- */

typedef struct export {
    const char *tenant;
    FILE       *f;
    int         jsonl;
    long long   n;
} export_t;

/* A CSV field, quoted when it holds a comma, a quote or a line break. */
static void csv_field(FILE *f, const char *s, int last)
{
    if (strpbrk(s, ",\"\r\n") == NULL) {
        fputs(s, f);
    } else {
        fputc('"', f);
        for (; *s; s++) {
            if (*s == '"')
                fputc('"', f);
            fputc(*s, f);
        }
        fputc('"', f);
    }
    fputc(last ? '\n' : ',', f);
}

static void export_each(void *arg, const char *field, const char *v, size_t vlen)
{
    export_t *x = arg;
    x->n++;
    if (x->jsonl) {
        json_t *o = entry_json(x->tenant, field, v, vlen);
        char *s = json_dumps(o, JSON_COMPACT);
        fprintf(x->f, "%s\n", s);
        free(s);
        json_decref(o);
        return;
    }
    suplist_entry_t e;
    if (suplist_decode(v, vlen, &e) < 0)
        memset(&e, 0, sizeof(e));
    char added[40] = "", code[8] = "";
    if (e.added_s) {
        time_t t = (time_t)e.added_s;
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(added, sizeof(added), "%Y-%m-%dT%H:%M:%SZ", &tm);
    }
    if (e.code)
        snprintf(code, sizeof(code), "%d", e.code);
    csv_field(x->f, field, 0);
    csv_field(x->f, e.reason, 0);
    csv_field(x->f, added, 0);
    csv_field(x->f, e.added_s ? origin_name(e.origin) : "", 0);
    csv_field(x->f, code, 0);
    csv_field(x->f, e.enh, 0);
    csv_field(x->f, e.text, 0);
    csv_field(x->f, e.message_id, 1);
}

ctl_status_t suppress_export(ctl_t *c, const char *tenant, FILE *f, const char *format, json_t **out,
                             char *err, size_t errlen)
{
    int jsonl;
    if (format == NULL || strcmp(format, "csv") == 0) {
        jsonl = 0;
    } else if (strcmp(format, "jsonl") == 0) {
        jsonl = 1;
    } else {
        snprintf(err, errlen, "format must be csv or jsonl, not \"%.32s\"", format);
        return CTL_EINVAL;
    }
    char *key;
    ctl_status_t st = list_key(tenant, &key, err, errlen);
    if (st < 0)
        return st;
    export_t x = { .tenant = tenant, .f = f, .jsonl = jsonl };
    if (!jsonl)
        fputs("address,reason,added,origin,code,enhanced,text,message_id\n", f);
    char cursor[32] = "0";
    do {
        char next[32];
        st = scan_page(c, key, cursor, 1000, export_each, &x, next, err, errlen);
        memcpy(cursor, next, sizeof(cursor));
    } while (st == CTL_OK && strcmp(cursor, "0") != 0);
    free(key);
    if (st != CTL_OK)
        return st;
    *out = json_object();
    json_object_set_new(*out, "list", json_string(list_name(tenant)));
    json_object_set_new(*out, "exported", json_integer(x.n));
    return CTL_OK;
}

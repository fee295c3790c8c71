/*
 * SUMMARY
 *  deliverer/ledger.c - delivery records in Redis (see ledger.h).
 * DESCRIPTION
 *  One Redis round trip per call: MGET for a lookup (an EVAL that also
 *  reads the suppression hashes for ledger_lookup_sup), GET for the poison
 *  count, INCR + PEXPIRE to add to it; the call completes when the last
 *  reply is in. Marks are written in batches: every ledger_mark() of one loop
 *  iteration (the "sending" marks of every transaction that got its 354
 *  in that pass, the "done" of every one that got its reply) joins one
 *  EVAL of a script that sets or deletes each key in order, sent from a
 *  zero-delay timer at the end of the iteration (or at once when the
 *  batch is full); every call in it completes with that one reply. A
 *  call is an entry in a table found by id (core/htable.h), so cancelling
 *  one (its job was dropped) simply forgets it and late replies are
 *  ignored. Calls made without a client wait on a list of their own for
 *  the zero-delay timer that fails them, so that they never complete
 *  inside the call that made them.
 *  Recipients are keyed in lower case: the domain part is
 *  case-insensitive and local parts differing only in case are, in
 *  practice, one mailbox.
 */
#include "deliverer/ledger.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "core/htable.h"
#include "core/list.h"
#include "core/loop.h"
#include "core/util.h"

typedef enum { OP_LOOKUP, OP_MARK, OP_COUNT, OP_CLAIM } op_kind_t;

typedef struct op {
    uint64_t        id;
    op_kind_t       kind;
    ledger_t       *l;
    size_t          n;         /* recipients */
    size_t          replies_left;
    int             ok;
    long long       count;
    char           *holder;    /* OP_CLAIM: the value that holds the key */
    int             replace;   /* OP_CLAIM: ours overwrites; the old value is not the holder */
    ledger_state_t *states;
    char          **hops;      /* OP_LOOKUP: the retry token of a handed-off record */
    size_t          nsup;      /* OP_LOOKUP: suppression hashes asked (ledger_lookup_sup) */
    char          **sup;       /* ... their values, nsup x n */
    union {
        ledger_lookup_cb lookup;
        ledger_lookup_sup_cb lookup_sup;
        ledger_done_cb   done;
        ledger_count_cb  count;
        ledger_claim_cb  claim;
    } cb;
    void           *arg;
    int             cancelled;
    htable_node_t   node;      /* in l->ops, keyed by id */
    int             failing;   /* on l->failing */
    LIST_ENTRY(op)  fail;
} op_t;

/* Keys and values of the marks waiting for the end of the iteration. */
typedef struct batch {
    char    **keys;
    char    **vals;  /* "" deletes */
    size_t    nkeys, cap;
    uint64_t *ops;   /* the calls it completes */
    size_t    nops, opcap;
} batch_t;

struct ledger {
    loop_t      *loop;
    rclient_t   *rc;
    uint64_t     ttl_ms;
    uint64_t     next_id;
    htable_t     ops;        /* id -> live call */
    LIST_HEAD(, op) failing; /* calls made without a client, newest first */
    loop_timer_t fail_timer; /* completes the failing ones */
    batch_t      batch;
    loop_timer_t flush_timer;
    uint64_t     batches;    /* EVALs sent (tests and debugging) */
};

/* Keys per EVAL: a batch this full goes at once. */
#define LEDGER_BATCH_MAX 512

/* KEYS[i] gets ARGV[i + 1] with ARGV[1] as its TTL, or is deleted when
 * that value is empty; in order, so a key given twice ends as the last. */
static const char MARK_SCRIPT[] =
    "local ttl = ARGV[1] "
    "for i, k in ipairs(KEYS) do "
    "local v = ARGV[i + 1] "
    "if v == '' then redis.call('DEL', k) else redis.call('SET', k, v, 'PX', ttl) end "
    "end "
    "return #KEYS";

static void op_complete(op_t *op)
{
    ledger_t *l = op->l;
    htable_remove(&l->ops, &op->node);
    if (op->failing)
        LIST_REMOVE(op, fail);
    if (!op->cancelled) {
        switch (op->kind) {
        case OP_LOOKUP:
            if (!op->ok) {
                memset(op->states, 0, op->n * sizeof(ledger_state_t));
                for (size_t i = 0; i < op->n; i++) {
                    free(op->hops[i]);
                    op->hops[i] = NULL;
                }
                for (size_t i = 0; i < op->nsup * op->n; i++) {
                    free(op->sup[i]);
                    op->sup[i] = NULL;
                }
            }
            if (op->sup != NULL)
                op->cb.lookup_sup(op->arg, op->ok, op->states, (const char *const *)op->hops,
                                  (const char *const *)op->sup);
            else
                op->cb.lookup(op->arg, op->ok, op->states, (const char *const *)op->hops);
            break;
        case OP_MARK:
            op->cb.done(op->arg, op->ok);
            break;
        case OP_COUNT:
            op->cb.count(op->arg, op->ok, op->count);
            break;
        case OP_CLAIM:
            op->cb.claim(op->arg, op->ok, op->ok ? op->holder : NULL);
            break;
        }
    }
    free(op->holder);
    free(op->states);
    for (size_t i = 0; op->hops && i < op->n; i++)
        free(op->hops[i]);
    free(op->hops);
    for (size_t i = 0; i < op->nsup * op->n; i++)
        free(op->sup[i]);
    free(op->sup);
    free(op);
}

static op_t *op_new(ledger_t *l, op_kind_t kind, size_t n, void *arg)
{
    op_t *op = xcalloc(1, sizeof(*op));
    op->id = ++l->next_id;
    op->kind = kind;
    op->l = l;
    op->n = n;
    op->ok = 1;
    op->arg = arg;
    if (kind == OP_LOOKUP) {
        op->states = xcalloc(n ? n : 1, sizeof(ledger_state_t));
        op->hops = xcalloc(n ? n : 1, sizeof(char *));
    }
    htable_insert_u64(&l->ops, &op->node, op->id);
    return op;
}

/* Find a live op by id (it may have completed or been cancelled). */
static op_t *op_find(ledger_t *l, uint64_t id)
{
    htable_node_t *n = htable_find_u64(&l->ops, id);
    return n ? HTABLE_ENTRY(n, op_t, node) : NULL;
}

typedef struct reply_ref {
    ledger_t *l;
    uint64_t  id;
} reply_ref_t;

static void on_reply(void *arg, const redisReply *r, const char *err)
{
    reply_ref_t *ref = arg;
    op_t *op = op_find(ref->l, ref->id);
    free(ref);
    if (op == NULL)
        return;
    if (r == NULL || r->type == REDIS_REPLY_ERROR) {
        op->ok = 0;
    } else if (op->kind == OP_LOOKUP && r->type == REDIS_REPLY_ARRAY) {
        for (size_t i = op->n; i < r->elements && i < op->n * (1 + op->nsup); i++) {
            const redisReply *e = r->element[i];
            if (e->type == REDIS_REPLY_STRING)
                op->sup[i - op->n] = xstrdup(e->str);
        }
        for (size_t i = 0; i < r->elements && i < op->n; i++) {
            const redisReply *e = r->element[i];
            if (e->type == REDIS_REPLY_STRING && strcmp(e->str, "done") == 0)
                op->states[i] = LEDGER_DONE;
            else if (e->type == REDIS_REPLY_STRING && strcmp(e->str, "done-dup") == 0)
                op->states[i] = LEDGER_DONE_FLAGGED;
            else if (e->type == REDIS_REPLY_STRING && strcmp(e->str, "sending") == 0)
                op->states[i] = LEDGER_SENDING;
            else if (e->type == REDIS_REPLY_STRING && strncmp(e->str, "retry:", 6) == 0) {
                op->states[i] = LEDGER_HANDING;
                op->hops[i] = xstrdup(e->str + 6);
            } else if (e->type == REDIS_REPLY_STRING && strncmp(e->str, "retried:", 8) == 0) {
                op->states[i] = LEDGER_HANDED;
                op->hops[i] = xstrdup(e->str + 8);
            }
        }
    } else if (op->kind == OP_CLAIM) {
        /* SET ... GET: nil when the key was free (ours now), else the earlier value */
        if (r->type == REDIS_REPLY_STRING && !op->replace) {
            free(op->holder);
            op->holder = xstrdup(r->str);
        } else if (r->type != REDIS_REPLY_NIL && r->type != REDIS_REPLY_STRING) {
            op->ok = 0;
        }
    } else if (op->kind == OP_COUNT && r->type == REDIS_REPLY_INTEGER && op->count == 0) {
        op->count = r->integer; /* INCR answers first (>= 1); PEXPIRE's 1 is not a count */
    } else if (op->kind == OP_COUNT && r->type == REDIS_REPLY_STRING) {
        op->count = strtoll(r->str, NULL, 10); /* GET; nil leaves 0 */
    }
    if (--op->replies_left == 0)
        op_complete(op);
}

static void send_argv(ledger_t *l, op_t *op, int argc, const char **argv, const size_t *lens)
{
    reply_ref_t *ref = xmalloc(sizeof(*ref));
    ref->l = l;
    ref->id = op->id;
    op->replies_left++;
    rclient_commandargv(l->rc, on_reply, ref, argc, argv, lens);
}

static char *rcpt_key(const char *msg_id, const char *rcpt)
{
    buf_t b = BUF_INIT;
    buf_printf(&b, "mp:r:%s:", msg_id);
    for (const char *c = rcpt; *c; c++)
        buf_putc(&b, (char)tolower((unsigned char)*c));
    return buf_steal(&b, NULL);
}

static void on_fail_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    ledger_t *l = arg;
    /* calls made without a client complete with ok=0, never synchronously;
     * ones their callbacks make go in at the head, behind this walk, and
     * wait for the timer's next run */
    op_t *op = LIST_FIRST(&l->failing), *next;
    for (; op != NULL; op = next) {
        next = LIST_NEXT(op, fail);
        op->ok = 0;
        op_complete(op);
    }
}

static uint64_t no_client(ledger_t *l, op_t *op)
{
    op->ok = 0;
    op->failing = 1;
    LIST_INSERT_HEAD(&l->failing, op, fail);
    loop_timer_set(l->loop, &l->fail_timer, 0);
    return op->id;
}

typedef struct batch_ref {
    ledger_t *l;
    uint64_t *ops;
    size_t    nops;
} batch_ref_t;

static void on_batch_reply(void *arg, const redisReply *r, const char *err)
{
    batch_ref_t *ref = arg;
    int ok = r != NULL && r->type == REDIS_REPLY_INTEGER;
    for (size_t i = 0; i < ref->nops; i++) {
        op_t *op = op_find(ref->l, ref->ops[i]);
        if (op == NULL)
            continue;
        op->ok = ok;
        op_complete(op);
    }
    free(ref->ops);
    free(ref);
}

static void batch_flush(ledger_t *l)
{
    batch_t *b = &l->batch;
    loop_timer_cancel(l->loop, &l->flush_timer);
    if (b->nops == 0)
        return;
    char nkeys[24], ttl[32];
    snprintf(nkeys, sizeof(nkeys), "%zu", b->nkeys);
    snprintf(ttl, sizeof(ttl), "%llu", (unsigned long long)l->ttl_ms);
    size_t argc = 4 + 2 * b->nkeys;
    const char **argv = xcalloc(argc, sizeof(char *));
    size_t *lens = xcalloc(argc, sizeof(size_t));
    size_t a = 0;
    argv[a++] = "EVAL";
    argv[a++] = MARK_SCRIPT;
    argv[a++] = nkeys;
    for (size_t i = 0; i < b->nkeys; i++)
        argv[a++] = b->keys[i];
    argv[a++] = ttl;
    for (size_t i = 0; i < b->nkeys; i++)
        argv[a++] = b->vals[i];
    for (size_t i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    batch_ref_t *ref = xmalloc(sizeof(*ref));
    ref->l = l;
    ref->ops = b->ops;
    ref->nops = b->nops;
    l->batches++;
    rclient_commandargv(l->rc, on_batch_reply, ref, (int)argc, argv, lens);
    free(argv);
    free(lens);
    for (size_t i = 0; i < b->nkeys; i++) {
        free(b->keys[i]);
        free(b->vals[i]);
    }
    b->nkeys = 0;
    b->ops = NULL;
    b->nops = b->opcap = 0;
}

static void on_flush_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    batch_flush(arg);
}

static void batch_add_key(ledger_t *l, char *key, const char *val)
{
    batch_t *b = &l->batch;
    if (b->nkeys == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 64;
        b->keys = xrealloc(b->keys, b->cap * sizeof(char *));
        b->vals = xrealloc(b->vals, b->cap * sizeof(char *));
    }
    b->keys[b->nkeys] = key;
    b->vals[b->nkeys++] = xstrdup(val);
}

static void batch_add_op(ledger_t *l, uint64_t id)
{
    batch_t *b = &l->batch;
    if (b->nops == b->opcap) {
        b->opcap = b->opcap ? b->opcap * 2 : 16;
        b->ops = xrealloc(b->ops, b->opcap * sizeof(uint64_t));
    }
    b->ops[b->nops++] = id;
    if (b->nkeys >= LEDGER_BATCH_MAX)
        batch_flush(l);
    else
        loop_timer_set(l->loop, &l->flush_timer, 0);
}

uint64_t ledger_batches(const ledger_t *l)
{
    return l->batches;
}

ledger_t *ledger_new(loop_t *loop, rclient_t *rc, uint64_t ttl_ms)
{
    ledger_t *l = xcalloc(1, sizeof(*l));
    l->loop = loop;
    l->rc = rc;
    l->ttl_ms = ttl_ms ? ttl_ms : 86400000;
    htable_init(&l->ops, HTABLE_U64, 16, NULL); /* xcalloc: cannot fail */
    LIST_INIT(&l->failing);
    loop_timer_init(&l->fail_timer, on_fail_timer, l);
    loop_timer_init(&l->flush_timer, on_flush_timer, l);
    return l;
}

void ledger_free(ledger_t *l)
{
    if (l == NULL)
        return;
    loop_timer_cancel(l->loop, &l->fail_timer);
    /* the client is gone already (ledger.h): marks still waiting for
     * their batch are not sent, and their calls fail below like every
     * other; callbacks may make further calls: they complete here too */
    htable_node_t *n;
    size_t hint = 0;
    while ((n = htable_first(&l->ops, &hint)) != NULL) {
        op_t *op = HTABLE_ENTRY(n, op_t, node);
        op->ok = 0;
        op_complete(op);
    }
    loop_timer_cancel(l->loop, &l->flush_timer);
    htable_fini(&l->ops);
    for (size_t i = 0; i < l->batch.nkeys; i++) {
        free(l->batch.keys[i]);
        free(l->batch.vals[i]);
    }
    free(l->batch.keys);
    free(l->batch.vals);
    free(l->batch.ops);
    free(l);
}

/* The ledger's records (KEYS[1..n]) then, for each further key (a
 * suppression hash), the field ARGV[i + 1] of every recipient i ("": not
 * asked): n x (1 + hashes) values, false (nil) for none. */
static const char LOOKUP_SUP_SCRIPT[] =
    "local n = tonumber(ARGV[1]) "
    "local out = {} "
    "for i = 1, n do out[i] = redis.call('GET', KEYS[i]) end "
    "for k = n + 1, #KEYS do "
    "for i = 1, n do "
    "local f = ARGV[i + 1] "
    "if f == '' then out[#out + 1] = false else out[#out + 1] = redis.call('HGET', KEYS[k], f) end "
    "end "
    "end "
    "return out";

uint64_t ledger_lookup_sup(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                           const char *const *keys, size_t nkeys, const char *const *fields,
                           ledger_lookup_sup_cb cb, void *arg)
{
    op_t *op = op_new(l, OP_LOOKUP, n, arg);
    op->cb.lookup_sup = cb;
    op->nsup = nkeys;
    op->sup = xcalloc(n * nkeys > 0 ? n * nkeys : 1, sizeof(char *));
    if (l->rc == NULL || n == 0)
        return no_client(l, op);
    size_t argc = 3 + n + nkeys + 1 + n;
    const char **argv = xcalloc(argc, sizeof(char *));
    size_t *lens = xcalloc(argc, sizeof(size_t));
    char nk[24], nn[24];
    snprintf(nk, sizeof(nk), "%zu", n + nkeys);
    snprintf(nn, sizeof(nn), "%zu", n);
    size_t a = 0;
    argv[a++] = "EVAL";
    argv[a++] = LOOKUP_SUP_SCRIPT;
    argv[a++] = nk;
    for (size_t i = 0; i < n; i++)
        argv[a++] = rcpt_key(msg_id, rcpts[i]);
    for (size_t k = 0; k < nkeys; k++)
        argv[a++] = keys[k];
    argv[a++] = nn;
    for (size_t i = 0; i < n; i++)
        argv[a++] = fields[i] ? fields[i] : "";
    for (size_t i = 0; i < a; i++)
        lens[i] = strlen(argv[i]);
    send_argv(l, op, (int)a, argv, lens);
    for (size_t i = 0; i < n; i++)
        free((char *)argv[3 + i]);
    free(argv);
    free(lens);
    return op->id;
}

uint64_t ledger_lookup(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                       ledger_lookup_cb cb, void *arg)
{
    op_t *op = op_new(l, OP_LOOKUP, n, arg);
    op->cb.lookup = cb;
    if (l->rc == NULL || n == 0)
        return no_client(l, op);
    const char **argv = xcalloc(n + 1, sizeof(char *));
    size_t *lens = xcalloc(n + 1, sizeof(size_t));
    argv[0] = "MGET";
    lens[0] = 4;
    for (size_t i = 0; i < n; i++) {
        argv[i + 1] = rcpt_key(msg_id, rcpts[i]);
        lens[i + 1] = strlen(argv[i + 1]);
    }
    send_argv(l, op, (int)n + 1, argv, lens);
    for (size_t i = 0; i < n; i++)
        free((char *)argv[i + 1]);
    free(argv);
    free(lens);
    return op->id;
}

/* n recipients' records set to v ("" deletes), in the iteration's batch. */
static uint64_t mark_value(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n, const char *v,
                           ledger_done_cb cb, void *arg)
{
    op_t *op = op_new(l, OP_MARK, n, arg);
    op->cb.done = cb;
    if (l->rc == NULL || n == 0)
        return no_client(l, op);
    for (size_t i = 0; i < n; i++)
        batch_add_key(l, rcpt_key(msg_id, rcpts[i]), v);
    uint64_t id = op->id;
    batch_add_op(l, id); /* may flush: op is not touched after this */
    return id;
}

uint64_t ledger_mark(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                     ledger_state_t state, ledger_done_cb cb, void *arg)
{
    const char *v = state == LEDGER_NONE            ? ""
                    : state == LEDGER_DONE          ? "done"
                    : state == LEDGER_DONE_FLAGGED ? "done-dup"
                                                    : "sending";
    return mark_value(l, msg_id, rcpts, n, v, cb, arg);
}

uint64_t ledger_mark_handoff(ledger_t *l, const char *msg_id, const char *const *rcpts, size_t n,
                             ledger_state_t state, const char *hop, ledger_done_cb cb, void *arg)
{
    buf_t v = BUF_INIT;
    buf_printf(&v, "%s:%s", state == LEDGER_HANDED ? "retried" : "retry", hop);
    uint64_t id = mark_value(l, msg_id, rcpts, n, buf_head(&v), cb, arg);
    buf_free(&v);
    return id;
}

/* The poison count's key: mp:d:<id> (core/crash.c counts into it too). */
static void poison_key(buf_t *key, const char *msg_id)
{
    buf_printf(key, "mp:d:%s", msg_id);
}

uint64_t ledger_poison_count(ledger_t *l, const char *msg_id, ledger_count_cb cb, void *arg)
{
    op_t *op = op_new(l, OP_COUNT, 0, arg);
    op->cb.count = cb;
    if (l->rc == NULL)
        return no_client(l, op);
    buf_t key = BUF_INIT;
    poison_key(&key, msg_id);
    const char *get[] = { "GET", buf_head(&key) };
    size_t get_l[] = { 3, buf_size(&key) };
    send_argv(l, op, 2, get, get_l);
    buf_free(&key);
    return op->id;
}

uint64_t ledger_poison_charge(ledger_t *l, const char *msg_id, ledger_count_cb cb, void *arg)
{
    op_t *op = op_new(l, OP_COUNT, 0, arg);
    op->cb.count = cb;
    if (l->rc == NULL)
        return no_client(l, op);
    buf_t key = BUF_INIT;
    poison_key(&key, msg_id);
    char ttl[32];
    snprintf(ttl, sizeof(ttl), "%llu", (unsigned long long)l->ttl_ms);
    const char *incr[] = { "INCR", buf_head(&key) };
    size_t incr_l[] = { 4, buf_size(&key) };
    const char *exp[] = { "PEXPIRE", buf_head(&key), ttl };
    size_t exp_l[] = { 7, buf_size(&key), strlen(ttl) };
    /* the INCR reply carries the count; PEXPIRE only has to succeed */
    send_argv(l, op, 2, incr, incr_l);
    reply_ref_t *ref = xmalloc(sizeof(*ref));
    ref->l = l;
    ref->id = op->id;
    op->replies_left++;
    rclient_commandargv(l->rc, on_reply, ref, 3, exp, exp_l);
    buf_free(&key);
    return op->id;
}

uint64_t ledger_claim(ledger_t *l, char ns, const char *name, const char *value, int replace, ledger_claim_cb cb,
                      void *arg)
{
    op_t *op = op_new(l, OP_CLAIM, 0, arg);
    op->cb.claim = cb;
    op->holder = xstrdup(value);
    op->replace = replace;
    if (l->rc == NULL)
        return no_client(l, op);
    buf_t key = BUF_INIT;
    buf_printf(&key, "mp:%c:%s", ns, name);
    char ttl[32];
    snprintf(ttl, sizeof(ttl), "%llu", (unsigned long long)l->ttl_ms);
    const char *argv[] = { "SET", buf_head(&key), value, "PX", ttl, "GET", "NX" };
    size_t lens[] = { 3, buf_size(&key), strlen(value), 2, strlen(ttl), 3, 2 };
    send_argv(l, op, replace ? 6 : 7, argv, lens);
    buf_free(&key);
    return op->id;
}

void ledger_cancel(ledger_t *l, uint64_t id)
{
    op_t *op = op_find(l, id);
    if (op)
        op->cancelled = 1;
}

/*
 * SUMMARY
 *  core/rclient.c - hiredis async client driven by our epoll loop.
 * DESCRIPTION
 *  The adapter (rc_ev_*) plugs redisAsyncContext into the loop the way
 *  hiredis' adapters/ae.h does: hiredis calls addRead/delRead/addWrite/
 *  delWrite/cleanup whenever it wants interest changed; the hooks are
 *  idempotent and keep one loop registration whose mask is the union.
 *
 *  hiredis 0.14 has no connect or command timeouts and no scheduleTimer,
 *  so:
 *   - a connect timer frees a context that did not connect in time;
 *   - every command owns a loop timer (embedded in its rc_cmd_t); it fires
 *     "timeout", and the late reply, which still arrives in order, finds
 *     no id and is dropped. The time runs again from the moment hiredis
 *     has written the command out: a command queued during a long pass of
 *     the loop (a burst of deliveries) is judged by how long Redis takes,
 *     not by how long the loop was busy before it could send it;
 *   - the same timer, armed at zero, delivers failures that must not run
 *     inside rclient_command() or inside hiredis' teardown ("not
 *     connected", "connection lost").
 *  hiredis is told only the command id (privdata is the id, not a
 *  pointer); replies find their command in the pending table (a
 *  core/htable.h table keyed by id), so a late reply for a command that
 *  timed out or was cancelled finds nothing instead of freed memory.
 *
 *  States: CONNECTING (first attempt: commands are queued in hiredis and
 *  written once connected), UP, DOWN (waiting for the reconnect timer,
 *  and reconnect attempts: commands fail at once). Backoff doubles from
 *  RC_BACKOFF_MIN_MS to reconnect_max_ms and resets once connected.
 *
 *  Re-entrancy: user callbacks run from hiredis' reply callback (inside
 *  redisAsyncHandleRead) or from our timers. Every entry from the loop
 *  counts `depth`; rclient_free() with depth > 0 only sets free_pending
 *  and the outermost entry releases after the stack unwound, so hiredis
 *  never sees its context freed inside its own callback.
 * DIAGNOSTICS
 *  Connection failures are logged at warn once per outage (then debug),
 *  the recovery at info. Commands report errors through the callback.
 */
#include "core/rclient.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <hiredis/async.h>

#include "core/crash.h"
#include "core/htable.h"
#include "core/log.h"
#include "core/util.h"

#define RC_DEFAULT_TIMEOUT_MS   50u
#define RC_DEFAULT_CONNECT_MS   500u
#define RC_DEFAULT_RECONNECT_MS 5000u
#define RC_BACKOFF_MIN_MS       100u
#define RC_BUCKETS_MIN          64u /* initial size of the pending table */

typedef enum { RC_CONNECTING = 0, RC_UP, RC_DOWN } rc_state_t;

typedef struct rc_cmd {
    uint64_t       id;
    htable_node_t  node;  /* in c->pending, keyed by id */
    rclient_t     *c;
    rclient_cb     cb;
    void          *arg;
    loop_timer_t   timer; /* command timeout, or zero delay for a failure */
    const char    *err;   /* what the timer reports */
} rc_cmd_t;

struct rclient {
    loop_t            *loop;
    char              *host;
    int                port;
    unsigned           timeout_ms, connect_timeout_ms, reconnect_max_ms;
    redisAsyncContext *ac;
    rc_state_t         state;
    int                ever_up;
    unsigned           backoff_ms;
    loop_timer_t       reconnect_timer;
    loop_timer_t       connect_timer;
    /* adapter state for ac */
    int                fd, reading, writing, registered;
    htable_t           pending; /* id -> command */
    uint64_t           next_id;
    uint64_t           unflushed_id; /* commands from this id on may not be written out yet */
    uint64_t           errors;
    unsigned           depth;
    int                free_pending, freeing;
};

static void rc_release(rclient_t *c);
static void rc_connect(rclient_t *c);

/* ---- pending table ---- */

static rc_cmd_t *rc_find(rclient_t *c, uint64_t id)
{
    htable_node_t *n = htable_find_u64(&c->pending, id);
    return n ? HTABLE_ENTRY(n, rc_cmd_t, node) : NULL;
}

/* Unlink and return the command, or NULL when it is gone. */
static rc_cmd_t *rc_take(rclient_t *c, uint64_t id)
{
    rc_cmd_t *cmd = rc_find(c, id);
    if (cmd == NULL)
        return NULL;
    htable_remove(&c->pending, &cmd->node);
    loop_timer_cancel(c->loop, &cmd->timer);
    return cmd;
}

/* Complete a command taken from the table: the one place a callback runs. */
static void rc_finish(rclient_t *c, rc_cmd_t *cmd, const redisReply *reply, const char *err)
{
    c->depth++;
    if (cmd->cb != NULL)
        cmd->cb(cmd->arg, reply, err);
    crash_blame_clear(); /* the next reply may be another message's */
    c->depth--;
    free(cmd);
}

/* The outermost entry from the loop ends with this. */
static void rc_leave(rclient_t *c)
{
    if (c->depth == 0 && c->free_pending)
        rc_release(c);
}

/* ---- the adapter: hiredis interest -> loop registration ---- */

/* hiredis' output buffer is empty: every command queued so far is on the
 * wire, so their timeouts run from now. Zero-delay failure timers are
 * left alone. */
static void rc_flushed(rclient_t *c)
{
    for (uint64_t id = c->unflushed_id; id < c->next_id; id++) {
        rc_cmd_t *cmd = rc_find(c, id);
        if (cmd != NULL && strcmp(cmd->err, "timeout") == 0)
            loop_timer_set(c->loop, &cmd->timer, c->timeout_ms);
    }
    c->unflushed_id = c->next_id;
}

static void rc_on_fd(loop_t *loop, int fd, unsigned events, void *arg)
{
    rclient_t *c = arg;
    redisAsyncContext *ac = c->ac;
    c->depth++;
    if (ac != NULL && (events & (LOOP_READ | LOOP_ERROR)) && c->reading)
        redisAsyncHandleRead(ac);
    /* the read may have torn the context down (c->ac is then NULL) */
    if (ac != NULL && c->ac == ac && (events & (LOOP_WRITE | LOOP_ERROR)) && c->writing) {
        redisAsyncHandleWrite(ac);
        if (c->ac == ac && !c->writing && c->state == RC_UP)
            rc_flushed(c);
    }
    c->depth--;
    rc_leave(c);
}

static void rc_ev_update(rclient_t *c)
{
    unsigned mask = (c->reading ? LOOP_READ : 0u) | (c->writing ? LOOP_WRITE : 0u);
    if (mask == 0) {
        if (c->registered)
            loop_fd_del(c->loop, c->fd);
        c->registered = 0;
    } else if (c->registered) {
        if (loop_fd_mod(c->loop, c->fd, mask) < 0)
            log_warn("redis", "watch_failed", "fd=%d errno=%d", c->fd, errno);
    } else if (loop_fd_add(c->loop, c->fd, mask, rc_on_fd, c) == 0) {
        c->registered = 1;
    } else {
        log_warn("redis", "watch_failed", "fd=%d errno=%d", c->fd, errno);
    }
}

static void rc_ev_add_read(void *p)   { rclient_t *c = p; if (!c->reading) { c->reading = 1; rc_ev_update(c); } }
static void rc_ev_del_read(void *p)   { rclient_t *c = p; if (c->reading) { c->reading = 0; rc_ev_update(c); } }
static void rc_ev_add_write(void *p)  { rclient_t *c = p; if (!c->writing) { c->writing = 1; rc_ev_update(c); } }
static void rc_ev_del_write(void *p)  { rclient_t *c = p; if (c->writing) { c->writing = 0; rc_ev_update(c); } }

static void rc_ev_cleanup(void *p)
{
    rclient_t *c = p;
    c->reading = c->writing = 0;
    rc_ev_update(c);
}

static void rc_attach(rclient_t *c, redisAsyncContext *ac)
{
    c->fd = ac->c.fd;
    c->reading = c->writing = c->registered = 0;
    ac->data = c;
    ac->ev.data = c;
    ac->ev.addRead = rc_ev_add_read;
    ac->ev.delRead = rc_ev_del_read;
    ac->ev.addWrite = rc_ev_add_write;
    ac->ev.delWrite = rc_ev_del_write;
    ac->ev.cleanup = rc_ev_cleanup;
}

/* ---- connection life cycle ---- */

static void rc_schedule_reconnect(rclient_t *c, const char *why)
{
    c->state = RC_DOWN;
    c->errors++;
    loop_timer_cancel(c->loop, &c->connect_timer);
    if (c->freeing)
        return;
    if (c->backoff_ms == 0)
        log_warn("redis", "down", "addr=%s:%d reason=%s", c->host, c->port, LOG_Q(why));
    else
        log_debug("redis", "retry_failed", "addr=%s:%d reason=%s", c->host, c->port, LOG_Q(why));
    c->backoff_ms = c->backoff_ms == 0 ? RC_BACKOFF_MIN_MS
                  : (c->backoff_ms * 2 > c->reconnect_max_ms ? c->reconnect_max_ms : c->backoff_ms * 2);
    loop_timer_set(c->loop, &c->reconnect_timer, c->backoff_ms);
}

static void rc_on_connect(const redisAsyncContext *ac, int status)
{
    rclient_t *c = ac->data;
    if (status != REDIS_OK) {
        /* hiredis frees the context once this returns */
        c->ac = NULL;
        rc_schedule_reconnect(c, ac->errstr ? ac->errstr : "connect failed");
        return;
    }
    loop_timer_cancel(c->loop, &c->connect_timer);
    if (c->backoff_ms != 0)
        log_info("redis", "up", "addr=%s:%d", c->host, c->port);
    c->state = RC_UP;
    c->ever_up = 1;
    c->backoff_ms = 0;
}

static void rc_on_disconnect(const redisAsyncContext *ac, int status)
{
    rclient_t *c = ac->data;
    if (c->ac != ac)
        return; /* our own redisAsyncFree() of a context we already let go */
    c->ac = NULL;
    rc_schedule_reconnect(c, ac->errstr && ac->err ? ac->errstr : "connection closed");
}

static void rc_on_connect_timeout(loop_t *loop, loop_timer_t *t, void *arg)
{
    rclient_t *c = arg;
    redisAsyncContext *ac = c->ac;
    if (ac == NULL || c->state != RC_CONNECTING)
        return;
    c->depth++;
    c->ac = NULL; /* let go first: the callbacks below see a stranger */
    redisAsyncFree(ac);
    rc_schedule_reconnect(c, "connect timeout");
    c->depth--;
    rc_leave(c);
}

static void rc_on_reconnect(loop_t *loop, loop_timer_t *t, void *arg)
{
    rc_connect(arg);
}

static void rc_connect(rclient_t *c)
{
    c->state = RC_CONNECTING;
    redisAsyncContext *ac = redisAsyncConnect(c->host, c->port);
    if (ac == NULL) {
        rc_schedule_reconnect(c, "out of memory");
        return;
    }
    if (ac->err) {
        char why[128];
        snprintf(why, sizeof(why), "%s", ac->errstr);
        redisAsyncFree(ac);
        rc_schedule_reconnect(c, why);
        return;
    }
    c->ac = ac;
    rc_attach(c, ac);
    /* hiredis notices the end of connect(2) on the first write event;
     * setting the connect callback asks for it, so the hooks must be in
     * place first. An idle client thus learns it is connected and then
     * watches for EOF. */
    redisAsyncSetConnectCallback(ac, rc_on_connect);
    redisAsyncSetDisconnectCallback(ac, rc_on_disconnect);
    loop_timer_set(c->loop, &c->connect_timer, c->connect_timeout_ms);
}

/* ---- commands ---- */

static void rc_on_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    rc_cmd_t *cmd = arg;
    rclient_t *c = cmd->c;
    if (strcmp(cmd->err, "timeout") == 0 && c->ac != NULL && c->reading && !c->free_pending) {
        /* The loop may have been busy past the timeout while the answer
         * waited in the socket: read what is there before calling Redis
         * slow. */
        uint64_t id = cmd->id;
        c->depth++;
        redisAsyncHandleRead(c->ac);
        c->depth--;
        cmd = rc_find(c, id);
        if (cmd == NULL || strcmp(cmd->err, "timeout") != 0 || loop_timer_active(&cmd->timer)) {
            rc_leave(c); /* answered, or failed another way (reported by its own timer) */
            return;
        }
    }
    const char *err = cmd->err;
    rc_take(c, cmd->id);
    c->errors++;
    c->depth++;
    rc_finish(c, cmd, NULL, err);
    c->depth--;
    rc_leave(c);
}

static void rc_on_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    rclient_t *c = ac->data;
    redisReply *reply = r;
    uint64_t id = (uint64_t)(uintptr_t)privdata;
    if (c->free_pending || c->freeing)
        return; /* the release reports "shutting down" to whatever is left */
    rc_cmd_t *pending = rc_find(c, id);
    if (pending == NULL)
        return; /* timed out or cancelled: a late reply */
    if (reply == NULL) {
        /* hiredis is tearing the context down: report from the loop,
         * not from inside redisAsyncFree(). */
        pending->err = "connection lost";
        loop_timer_set(c->loop, &pending->timer, 0);
        return;
    }
    rc_cmd_t *cmd = rc_take(c, id);
    if (reply->type == REDIS_REPLY_ERROR)
        rc_finish(c, cmd, NULL, reply->str);
    else
        rc_finish(c, cmd, reply, NULL);
}

static rc_cmd_t *rc_cmd_new(rclient_t *c, rclient_cb cb, void *arg)
{
    rc_cmd_t *cmd = xcalloc(1, sizeof(*cmd));
    cmd->id = c->next_id++;
    cmd->c = c;
    cmd->cb = cb;
    cmd->arg = arg;
    cmd->err = "timeout";
    loop_timer_init(&cmd->timer, rc_on_timer, cmd);
    htable_insert_u64(&c->pending, &cmd->node, cmd->id);
    return cmd;
}

/* After hiredis accepted (status REDIS_OK) or refused the command. */
static uint64_t rc_cmd_sent(rclient_t *c, rc_cmd_t *cmd, int status)
{
    if (status == REDIS_OK) {
        loop_timer_set(c->loop, &cmd->timer, c->timeout_ms);
    } else {
        cmd->err = "not connected";
        loop_timer_set(c->loop, &cmd->timer, 0);
    }
    return cmd->id;
}

/* May the command be handed to hiredis? Otherwise it fails at once. */
static int rc_can_send(const rclient_t *c)
{
    if (c->ac == NULL || c->free_pending || c->freeing)
        return 0;
    return c->state == RC_UP || (c->state == RC_CONNECTING && !c->ever_up);
}

static rc_cmd_t *rc_cmd_refuse(rclient_t *c, rc_cmd_t *cmd)
{
    cmd->err = (c->free_pending || c->freeing) ? "shutting down" : "not connected";
    loop_timer_set(c->loop, &cmd->timer, 0);
    return cmd;
}

uint64_t rclient_command(rclient_t *c, rclient_cb cb, void *arg, const char *fmt, ...)
{
    rc_cmd_t *cmd = rc_cmd_new(c, cb, arg);
    if (!rc_can_send(c))
        return rc_cmd_refuse(c, cmd)->id;
    va_list ap;
    va_start(ap, fmt);
    int st = redisvAsyncCommand(c->ac, rc_on_reply, (void *)(uintptr_t)cmd->id, fmt, ap);
    va_end(ap);
    return rc_cmd_sent(c, cmd, st);
}

uint64_t rclient_commandargv(rclient_t *c, rclient_cb cb, void *arg, int argc,
                             const char **argv, const size_t *argvlen)
{
    rc_cmd_t *cmd = rc_cmd_new(c, cb, arg);
    if (!rc_can_send(c))
        return rc_cmd_refuse(c, cmd)->id;
    int st = redisAsyncCommandArgv(c->ac, rc_on_reply, (void *)(uintptr_t)cmd->id, argc, argv, argvlen);
    return rc_cmd_sent(c, cmd, st);
}

void rclient_cancel(rclient_t *c, uint64_t id)
{
    if (c == NULL)
        return;
    rc_cmd_t *cmd = rc_take(c, id);
    free(cmd); /* hiredis' reply, if any, finds no id and is dropped */
}

int rclient_connected(const rclient_t *c)
{
    return c != NULL && c->state == RC_UP && c->ac != NULL && !c->free_pending && !c->freeing;
}

uint64_t rclient_errors(const rclient_t *c)
{
    return c != NULL ? c->errors : 0;
}

/* ---- life ---- */

/* Resolve a host name once, at start-up, to a numeric address: hiredis'
 * connect would call getaddrinfo() on every reconnect, inside the loop. */
static char *rc_numeric_host(const char *host)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    char buf[NI_MAXHOST];
    if (getaddrinfo(host, NULL, &hints, &res) == 0 && res != NULL &&
        getnameinfo(res->ai_addr, res->ai_addrlen, buf, sizeof(buf), NULL, 0, NI_NUMERICHOST) == 0) {
        freeaddrinfo(res);
        return xstrdup(buf);
    }
    if (res != NULL)
        freeaddrinfo(res);
    return xstrdup(host); /* connect fails and reconnects; the log names it */
}

rclient_t *rclient_new(loop_t *loop, const rclient_config_t *cfg)
{
    rclient_t *c = xcalloc(1, sizeof(*c));
    c->loop = loop;
    c->host = rc_numeric_host(cfg && cfg->host && cfg->host[0] ? cfg->host : "127.0.0.1");
    c->port = cfg && cfg->port ? (int)cfg->port : 6379;
    c->timeout_ms = cfg && cfg->timeout_ms ? cfg->timeout_ms : RC_DEFAULT_TIMEOUT_MS;
    c->connect_timeout_ms = cfg && cfg->connect_timeout_ms ? cfg->connect_timeout_ms : RC_DEFAULT_CONNECT_MS;
    c->reconnect_max_ms = cfg && cfg->reconnect_max_ms ? cfg->reconnect_max_ms : RC_DEFAULT_RECONNECT_MS;
    if (c->reconnect_max_ms < RC_BACKOFF_MIN_MS)
        c->reconnect_max_ms = RC_BACKOFF_MIN_MS;
    htable_init(&c->pending, HTABLE_U64, RC_BUCKETS_MIN, NULL); /* xcalloc: cannot fail */
    c->next_id = 1;
    c->unflushed_id = 1;
    c->fd = -1;
    loop_timer_init(&c->reconnect_timer, rc_on_reconnect, c);
    loop_timer_init(&c->connect_timer, rc_on_connect_timeout, c);
    rc_connect(c);
    return c;
}

/* The real teardown, with no hiredis or user callback on the stack. */
static void rc_release(rclient_t *c)
{
    c->freeing = 1;
    c->free_pending = 0;
    loop_timer_cancel(c->loop, &c->reconnect_timer);
    loop_timer_cancel(c->loop, &c->connect_timer);
    if (c->ac != NULL) {
        redisAsyncContext *ac = c->ac;
        c->ac = NULL;
        redisAsyncFree(ac); /* its reply callbacks see freeing; cleanup unregisters the fd */
    }
    /* Callbacks may start commands (they fail with "shutting down" here
     * too) or cancel others. */
    c->depth++;
    htable_node_t *n;
    size_t hint = 0;
    while ((n = htable_first(&c->pending, &hint)) != NULL) {
        rc_cmd_t *cmd = rc_take(c, HTABLE_ENTRY(n, rc_cmd_t, node)->id);
        rc_finish(c, cmd, NULL, "shutting down");
    }
    htable_fini(&c->pending);
    free(c->host);
    free(c);
}

void rclient_flush(rclient_t *c)
{
    if (c == NULL || c->freeing || c->ac == NULL || c->state != RC_UP || !c->writing)
        return;
    rc_on_fd(c->loop, c->fd, LOOP_WRITE, c);
}

void rclient_free(rclient_t *c)
{
    if (c == NULL || c->freeing)
        return;
    if (c->depth > 0) {
        c->free_pending = 1;
        return;
    }
    rc_release(c);
}

/*
 * core/rclient.h - a Redis client inside a worker's loop (hiredis async).
 *
 * Shared by the DNS L2 cache and the delivery idempotency records. It never
 * blocks the loop: connecting, commands and reconnecting are asynchronous;
 * a command that gets no reply within timeout_ms completes with an error
 * (the late reply, if any, is dropped); while Redis is down commands fail
 * at once (from a zero-delay timer, never inside rclient_command) and the
 * client reconnects in the background with backoff (100 ms doubling to
 * reconnect_max_ms). Commands given during the very first connection
 * attempt are queued and sent once connected (still bounded by
 * timeout_ms); callers that must not wait at all check rclient_connected().
 *
 * hiredis 0.14 (Debian 12) has no scheduleTimer hook, so command timeouts
 * are our own loop timers, and replies find their command through a 64-bit
 * id, never a raw pointer: a reply can arrive after its command timed out
 * or was cancelled and freed.
 */
#ifndef MP_CORE_RCLIENT_H
#define MP_CORE_RCLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <hiredis/hiredis.h>

#include "core/loop.h"

typedef struct rclient rclient_t;

typedef struct rclient_config {
    const char *host;            /* numeric address or name resolved once at start-up */
    unsigned    port;
    unsigned    timeout_ms;      /* per command; default 50 */
    unsigned    connect_timeout_ms; /* default 500 */
    unsigned    reconnect_max_ms;   /* backoff cap; default 5000 */
} rclient_config_t;

/* reply is NULL on failure, with a reason in err ("not connected",
 * "timeout", "connection lost", "shutting down", or Redis' own error text
 * for an error reply). reply is valid only during the call. */
typedef void (*rclient_cb)(void *arg, const redisReply *reply, const char *err);

/* Starts connecting in the background. Never NULL (aborts on OOM). */
rclient_t *rclient_new(loop_t *loop, const rclient_config_t *cfg);
/* Send a command (printf-style, as redisAsyncCommand). The callback fires
 * exactly once, never synchronously. Returns the command id (non-zero). */
uint64_t rclient_command(rclient_t *c, rclient_cb cb, void *arg, const char *fmt, ...);
/* Same with an argument vector (binary-safe values). */
uint64_t rclient_commandargv(rclient_t *c, rclient_cb cb, void *arg, int argc,
                             const char **argv, const size_t *argvlen);
/* The callback of this command will not fire. Harmless for finished ids. */
void rclient_cancel(rclient_t *c, uint64_t id);
/* 1 while a connection is established. */
int  rclient_connected(const rclient_t *c);
/* Counters for metrics: commands failed (timeout, down, lost) plus failed
 * connection attempts and lost connections. Error replies are not counted. */
uint64_t rclient_errors(const rclient_t *c);
/* Write what is buffered, now (non-blocking, best effort): commands given
 * just before rclient_free() leave with it instead of being dropped. */
void rclient_flush(rclient_t *c);
/* Pending callbacks fire with NULL/"shutting down"; no fd or timer remains
 * in the loop afterwards. Safe to call from inside an rclient_cb (the
 * release is deferred until it returns). */
void rclient_free(rclient_t *c);

#endif

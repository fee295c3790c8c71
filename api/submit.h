/*
 * api/submit.h - POST /v1/messages: validate messages as the worker
 * does (queue/msgjson.h) and publish them with publisher confirms
 * (docs/http-api.md).
 *
 * One publisher thread owns one AMQP connection on a loop of its own;
 * the MHD handler threads hand it whole batches and wait (at most
 * [api] publish_timeout) on a condition variable for the broker's
 * confirms, so the requests of every handler thread pipeline into the
 * one connection. While the connection is down (reconnected with
 * back-off) or the broker blocks it, submissions fail at once with 503.
 *
 * Request: one message object, or an array of at most [api] max_batch;
 * a message without "id" gets a UUID. Priority 0..10 for the request's
 * messages: ?priority=N or the X-Mailpump-Priority header.
 * Answers:
 *   202 {"ids": ["...", ...]}               every message confirmed
 *   422 {"error": {..., "messages": [{"index": 0, "reason": "..."}]}}
 *                                           invalid ones; nothing published
 *   503 {"error": {..., "confirmed": [ids], "unconfirmed": [ids]}}
 *                                           broker down, nack, unroutable, timeout
 *   400 not a message or an array of them, a bad priority;
 *   413 more than max_batch messages.
 */
#ifndef MP_API_SUBMIT_H
#define MP_API_SUBMIT_H

#include <stddef.h>

#include "api/http.h"
#include "core/config.h"

typedef struct api_submit api_submit_t;

/* Start the publisher thread; it connects to [amqp] in the background
 * (a broker down at start-up is retried, not an error). cfg is borrowed.
 * NULL + err when the thread cannot start. */
api_submit_t *api_submit_start(const mp_config_t *cfg, char *err, size_t errlen);
/* Route POST /v1/messages of s to sub. 0 or -1. */
int  api_submit_route(api_server_t *s, api_submit_t *sub);
/* 1 while the publisher holds an open, unblocked connection. */
int  api_submit_ready(api_submit_t *sub);
/* Stop the thread (unconfirmed publishes fail) and free. Call after
 * api_server_free(): no handler may be waiting. NULL is fine. */
void api_submit_stop(api_submit_t *sub);

#endif

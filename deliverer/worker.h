/*
 * deliverer/worker.h - one worker thread: its loop, broker connection,
 * resolver and sessions, and the life of every message it consumes.
 *
 * Workers share only the read-only worker_env_t (env.h) and the atomic
 * metrics.
 * worker_stop() is the one call made from another thread.
 */
#ifndef MP_DELIVERER_WORKER_H
#define MP_DELIVERER_WORKER_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>

#include "deliverer/env.h"

typedef struct worker worker_t;

/* Start a worker thread. Returns NULL on thread creation failure. */
worker_t *worker_start(const worker_env_t *env, int index);
/* Thread-safe: stop consuming, finish in-flight messages within the
 * grace period, then let the thread end. */
void worker_stop(worker_t *w);
/* Wait for the thread and free it. Returns the worker's exit status
 * (0 = clean). */
int  worker_join(worker_t *w);

#endif

/*
 * deliverer/routes.h - route penalties: MX addresses whose fresh
 * connection failed at connect or greeting time, skipped for a while
 * (Postfix's dead-host memory). One table serves every worker thread of a
 * process, so a dead address costs one failed connect per penalty, not
 * one per worker.
 *
 * Keys are "address|port". A failure marks the key down for the penalty,
 * doubled per failure in a row up to the maximum; routes_ok() forgets it,
 * and so does the table once its penalty has been over for the maximum.
 * Thread-safe: a mutex guards the table, and while nothing is marked
 * (the normal state) every call returns after one atomic load.
 */
#ifndef MP_DELIVERER_ROUTES_H
#define MP_DELIVERER_ROUTES_H

#include <stddef.h>
#include <stdint.h>

#define ROUTES_MAX     256 /* remembered addresses; the one that frees up soonest makes room */
#define ROUTES_WHY_LEN 360

typedef struct routes routes_t;

typedef struct route_state {
    int      cause;             /* the caller's kind of that failure (deliver: smtp_status_t) */
    unsigned failures;          /* in a row */
    uint64_t until_ms;          /* skipped until then (monotonic ms, loop_now_ms) */
    char     why[ROUTES_WHY_LEN]; /* the failure that marked it */
} route_state_t;

/* penalty_ms 0: disabled (every call is a no-op); max_ms 0 means 300000.
 * Never returns NULL (core aborts on OOM). */
routes_t *routes_new(unsigned penalty_ms, unsigned max_ms);
void routes_free(routes_t *r);

/* 1 with *st filled when key is down at now, else 0. */
int routes_down(routes_t *r, const char *key, uint64_t now, route_state_t *st);
/* Mark key down after a failure at now; its kind (cause) and wording
 * (why) are kept, so an attempt that finds every address down reports
 * what made them down, not merely that they are. Returns the penalty in
 * ms and sets *failures to the count in a row (0 and untouched when
 * disabled). */
uint64_t routes_failed(routes_t *r, const char *key, uint64_t now, int cause, const char *why,
                       unsigned *failures);
/* Forget key; returns how many failures in a row it had (0: not marked). */
unsigned routes_ok(routes_t *r, const char *key);

#endif

/*
 * deliverer/pool.h - per-worker cache of open SMTP sessions, keyed by
 * destination.
 *
 * A destination key names everything that makes two connections
 * interchangeable: MX address, port, TLS policy, MX host name (SNI and
 * verified name), EHLO name, AUTH identity and the egress source, when
 * the request names one (deliver.c builds it). A
 * finished transaction gives its session back; the next message for the
 * same key reuses it instead of connecting, greeting, EHLO-ing and
 * negotiating TLS again.
 *
 * Limits (smtp_pool_limits_t): messages per session, session age, idle
 * time, connections per destination and per worker. A destination or the
 * worker at its limit makes the caller wait (FIFO) for a slot; when the
 * worker is full, idle sessions of other destinations are evicted first.
 * Evicted and expired sessions say QUIT before they close. An idle session
 * the server closed (EOF, a 421, bytes nobody asked for) is dropped the
 * moment it is noticed, and again checked with a MSG_PEEK probe when it
 * is handed out, so a dead connection never costs a delivery attempt.
 *
 * A destination is remembered only while something holds it: a busy or
 * idle session, a waiter, or a refused_backoff cap in force. Once nothing
 * does it is freed (its slow start begins again next time), so a worker
 * that meets many destinations over its life keeps only the live ones.
 *
 * Site tags: a session released with smtp_pool_release_tagged() carries
 * the caller's site tag while it is idle (the pool keeps its own copy);
 * smtp_pool_idle_tagged() counts a tag's idle sessions and
 * smtp_pool_trim_tag() QUITs those beyond a number, so a domain leg whose
 * share of a site's connection limit shrank closes what it no longer may
 * keep open. The tag is not part of the key: a reused session leaves its
 * tag when it is handed out and takes the one it is next released with.
 * Untagged sessions (tag NULL, every other release) are counted nowhere.
 *
 * Ownership: a session handed out (or connected after SMTP_POOL_CONNECT)
 * belongs to the caller until smtp_pool_release(); idle ones belong to the
 * pool. The caller's slot counts from acquire to release.
 *
 * Thread-safety: none; one pool per worker loop.
 */
#ifndef MP_DELIVERER_POOL_H
#define MP_DELIVERER_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "core/list.h"
#include "core/loop.h"
#include "deliverer/session.h"

typedef struct smtp_pool_limits {
    unsigned max_msgs_per_session; /* transactions per connection; 0 means 100 */
    unsigned max_age_ms;           /* connection lifetime; 0 means 300000 */
    unsigned max_idle_ms;          /* idle time before QUIT; 0 means 5000 */
    unsigned max_per_dest;         /* connections (busy + idle) per key; 0 means 20 */
    unsigned initial_per_dest;     /* connections per key until one transaction has
                                    * completed there (slow start: the first TLS session
                                    * is cached before the others resume it, and a dead
                                    * destination costs one connect at a time); 0 means
                                    * max_per_dest */
    unsigned max_total;            /* connections per worker; 0 means 1000 */
    unsigned refused_backoff_ms;   /* smtp_pool_refused(): how long a destination stays
                                    * capped at the connections it had open; 0 means 60000 */
    int      no_refused_backoff;   /* smtp_pool_refused() learns nothing */
    int      disabled;             /* never keep a session: every acquire connects */
} smtp_pool_limits_t;

typedef struct smtp_pool_stats {
    uint64_t connects;   /* SMTP_POOL_CONNECT grants */
    uint64_t reuses;     /* idle sessions handed out */
    uint64_t idle_lost;  /* idle sessions found closed by the server */
    uint64_t evicted;    /* QUIT for limits, age, idle time, or room for another key */
    uint64_t refused;    /* smtp_pool_refused() capped a destination */
    size_t   idle;       /* currently idle */
    size_t   busy;       /* currently handed out / connecting */
    size_t   waiting;    /* callers waiting for a slot */
    size_t   dests;      /* destinations known: with a session, a waiter or a cap in force */
} smtp_pool_stats_t;

typedef struct smtp_pool smtp_pool_t;

enum { SMTP_POOL_REUSE = 1, SMTP_POOL_CONNECT = 2, SMTP_POOL_WAIT = 3 };

/* Fires exactly once for a waiting acquire (never from inside acquire or
 * release): how = SMTP_POOL_REUSE with s, or SMTP_POOL_CONNECT with NULL;
 * on smtp_pool_free() with how = 0 and NULL. */
typedef void (*smtp_pool_cb)(void *arg, int how, smtp_session_t *s);

/* A waiting caller, embedded in its owner (no allocation). */
typedef struct smtp_pool_wait {
    TAILQ_ENTRY(smtp_pool_wait) link; /* in its destination's FIFO while queued */
    struct pdest          *dest;
    smtp_pool_cb           cb;
    void                  *arg;
    int                    queued;
} smtp_pool_wait_t;

smtp_pool_t *smtp_pool_new(loop_t *loop, const smtp_pool_limits_t *lim);
/* QUITs (best effort, without waiting) and frees idle sessions, fails
 * waiters with how = 0. Busy sessions are their owners'. NULL harmless. */
void smtp_pool_free(smtp_pool_t *p);

/*
 * Ask for a connection to key. Returns SMTP_POOL_REUSE and sets *s (an
 * IDLE session, now the caller's: run smtp_session_next() on it),
 * SMTP_POOL_CONNECT (open a new one), or SMTP_POOL_WAIT (w is queued; its
 * callback decides later; w must stay valid until then or
 * smtp_pool_cancel()).
 */
int  smtp_pool_acquire(smtp_pool_t *p, const char *key, smtp_session_t **s, smtp_pool_wait_t *w,
                       smtp_pool_cb cb, void *arg) __attribute__((warn_unused_result));
/* Withdraw a waiting acquire; harmless when w is not queued. */
void smtp_pool_cancel(smtp_pool_t *p, smtp_pool_wait_t *w);
/*
 * End of the caller's use of its slot for key. s may be NULL (the
 * connection failed or was freed by the caller). A session whose last
 * result said reusable and that is within its limits becomes idle; any
 * other is QUIT (if still in sync) and freed by the pool. Takes ownership
 * of s. Returns 1 if the session was kept idle, 0 if closed.
 */
int  smtp_pool_release(smtp_pool_t *p, const char *key, smtp_session_t *s);
/* The same with the destination's own limit of transactions per
 * connection (a shaping rule's max_msgs_per_conn): a session that has
 * carried max_msgs is QUIT, not kept; 0 is the pool's
 * max_msgs_per_session, which also applies when it is lower. */
int  smtp_pool_release_max(smtp_pool_t *p, const char *key, smtp_session_t *s, unsigned max_msgs);
/* The same, and a session kept idle carries site tag tag (copied; NULL:
 * untagged, as smtp_pool_release_max()). */
int  smtp_pool_release_tagged(smtp_pool_t *p, const char *key, smtp_session_t *s, unsigned max_msgs,
                              const char *tag);
/* Idle sessions of tag (0 for NULL or unknown). A table lookup. */
size_t smtp_pool_idle_tagged(const smtp_pool_t *p, const char *tag);
/* QUIT and close the idle sessions of tag beyond keep, the longest idle
 * first, as an eviction does (counted in evicted); busy sessions and other
 * tags' are never touched, and only tag's idle sessions are visited.
 * Returns how many were closed. */
size_t smtp_pool_trim_tag(smtp_pool_t *p, const char *tag, size_t keep);
/*
 * The caller's new connection to key (its slot still held) was refused
 * for now at the greeting (a 4xx such as "421 too many connections") while
 * the worker has other connections open there: the server limits
 * connections per client. Caps key at those others for refused_backoff_ms
 * (slots beyond wait, FIFO) and returns 1: acquire again and wait for one
 * of them. 0 when no other is open (nothing learned; try elsewhere or
 * later) or the feedback is off.
 */
int  smtp_pool_refused(smtp_pool_t *p, const char *key);
void smtp_pool_get_stats(const smtp_pool_t *p, smtp_pool_stats_t *st);
int  smtp_pool_disabled(const smtp_pool_t *p);

#endif

/*
 * SUMMARY
 *  deliverer/routes.c - the route penalty table shared by the workers.
 * DESCRIPTION
 *  A small array under a mutex; `count` mirrors the number of entries in
 *  an atomic so the usual case, nothing marked, takes no lock (the hot
 *  path shares nothing but atomics, so workers do not contend on it:
 *  docs/architecture.md). An entry stays after its penalty ran out,
 *  keeping the failure count for the doubling, until a session to it gets
 *  past the greeting, or until it has been free for max_ms (an address
 *  nobody tries again), so the table empties again.
 */
#include "deliverer/routes.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"

typedef struct route {
    char          key[72];
    route_state_t st;
} route_t;

struct routes {
    pthread_mutex_t mu;
    unsigned        penalty_ms, max_ms;
    route_t        *tab;   /* ROUTES_MAX entries, allocated on first use */
    size_t          n;
    atomic_size_t   count; /* == n, readable without the lock */
};

routes_t *routes_new(unsigned penalty_ms, unsigned max_ms)
{
    routes_t *r = xcalloc(1, sizeof(*r));
    pthread_mutex_init(&r->mu, NULL);
    r->penalty_ms = penalty_ms;
    r->max_ms = max_ms ? max_ms : 300000;
    atomic_init(&r->count, 0);
    return r;
}

void routes_free(routes_t *r)
{
    if (r == NULL)
        return;
    pthread_mutex_destroy(&r->mu);
    free(r->tab);
    free(r);
}

static route_t *find(routes_t *r, const char *key)
{
    for (size_t i = 0; i < r->n; i++)
        if (strcmp(r->tab[i].key, key) == 0)
            return &r->tab[i];
    return NULL;
}

/* Forget entries whose penalty ran out more than max_ms ago. */
static void prune(routes_t *r, uint64_t now)
{
    for (size_t i = 0; i < r->n;) {
        if (r->tab[i].st.until_ms + r->max_ms <= now)
            r->tab[i] = r->tab[--r->n];
        else
            i++;
    }
    atomic_store_explicit(&r->count, r->n, memory_order_release);
}

int routes_down(routes_t *r, const char *key, uint64_t now, route_state_t *st)
{
    if (r == NULL || r->penalty_ms == 0 || atomic_load_explicit(&r->count, memory_order_acquire) == 0)
        return 0;
    pthread_mutex_lock(&r->mu);
    prune(r, now);
    route_t *e = find(r, key);
    int down = e != NULL && e->st.until_ms > now;
    if (down)
        *st = e->st;
    pthread_mutex_unlock(&r->mu);
    return down;
}

uint64_t routes_failed(routes_t *r, const char *key, uint64_t now, int cause, const char *why,
                       unsigned *failures)
{
    if (r == NULL || r->penalty_ms == 0)
        return 0;
    pthread_mutex_lock(&r->mu);
    route_t *e = find(r, key);
    if (e == NULL) {
        if (r->tab == NULL)
            r->tab = xcalloc(ROUTES_MAX, sizeof(*r->tab));
        if (r->n == ROUTES_MAX) {
            size_t old = 0; /* full: the entry that frees up soonest makes room */
            for (size_t i = 1; i < r->n; i++)
                if (r->tab[i].st.until_ms < r->tab[old].st.until_ms)
                    old = i;
            e = &r->tab[old];
        } else {
            e = &r->tab[r->n++];
            atomic_store_explicit(&r->count, r->n, memory_order_release);
        }
        memset(e, 0, sizeof(*e));
        snprintf(e->key, sizeof(e->key), "%s", key);
    }
    uint64_t pen = r->penalty_ms;
    for (unsigned i = 0; i < e->st.failures && pen < r->max_ms; i++)
        pen *= 2;
    if (pen > r->max_ms)
        pen = r->max_ms;
    e->st.failures++;
    e->st.until_ms = now + pen;
    e->st.cause = cause;
    snprintf(e->st.why, sizeof(e->st.why), "%s", why);
    *failures = e->st.failures;
    pthread_mutex_unlock(&r->mu);
    return pen;
}

unsigned routes_ok(routes_t *r, const char *key)
{
    if (r == NULL || atomic_load_explicit(&r->count, memory_order_acquire) == 0)
        return 0;
    pthread_mutex_lock(&r->mu);
    unsigned had = 0;
    route_t *e = find(r, key);
    if (e != NULL) {
        had = e->st.failures;
        *e = r->tab[--r->n];
        atomic_store_explicit(&r->count, r->n, memory_order_release);
    }
    pthread_mutex_unlock(&r->mu);
    return had;
}

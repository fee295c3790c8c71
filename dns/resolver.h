/*
 * dns/resolver.h - MX resolution (MX, then A/AAAA of each MX host) with
 * c-ares, driven by the worker's epoll loop.
 *
 * One resolver per worker thread, used only from the thread that runs its
 * loop (like the loop itself, it is not thread-safe).
 *
 * Ownership: the resolver owns everything it hands out. A result passed to
 * a callback, with its host names and address arrays, is valid only during
 * that call; copy what must outlive it.
 *
 * Re-entrancy: from inside a dns_mx_cb the caller may start new queries,
 * cancel queries and even free the resolver (the release then happens once
 * the callback has returned, hiredis style).
 */
#ifndef MP_DNS_RESOLVER_H
#define MP_DNS_RESOLVER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/loop.h"

typedef enum {
    DNS_OK = 0,
    DNS_ENOMEM = -1,
    DNS_NXDOMAIN = -2,   /* domain does not exist: permanent */
    DNS_NULLMX = -3,     /* RFC 7505 null MX: permanent */
    DNS_NOADDR = -4,     /* MX hosts exist but none has an address (or implicit MX without A/AAAA): permanent-ish */
    DNS_TEMPFAIL = -5,   /* SERVFAIL, refused, network error: transient */
    DNS_TIMEOUT = -6,    /* transient */
    DNS_EBADNAME = -7,   /* not a valid domain name */
    DNS_ECANCELLED = -8, /* resolver freed with the query outstanding */
} dns_status_t;

/* Static English text for a dns_status_t; "unknown dns status" otherwise. */
const char *dns_strerror(int status);
/* 1 when retrying later cannot change the answer (NXDOMAIN, NULLMX,
 * NOADDR, EBADNAME), else 0. DNS_OK is not permanent (returns 0). */
int dns_status_is_permanent(int status);

typedef struct dns_mx_host {
    char                    *name;   /* MX target host name (or the domain itself for implicit MX) */
    unsigned                 pref;
    struct sockaddr_storage *addrs;  /* IPv4 (and IPv6 when the host has AAAA) with port 0 */
    size_t                   naddrs;
} dns_mx_host_t;

typedef struct dns_mx_result {
    int            status;    /* dns_status_t */
    int            implicit;  /* 1 when no MX existed and the domain's own address is used */
    dns_mx_host_t *hosts;     /* sorted by preference, shuffled within equal preference */
    size_t         nhosts;
} dns_mx_result_t;

typedef struct dns_resolver dns_resolver_t;
typedef void (*dns_mx_cb)(void *arg, const dns_mx_result_t *res); /* res valid only during the call */

typedef struct dns_config {
    const char *servers;    /* "host:port,host:port" or NULL/"" for the system's */
    unsigned    timeout_ms; /* per try, default 2000 */
    unsigned    tries;      /* default 2 */
} dns_config_t;

/* Returns NULL and fills err on failure. cfg may be NULL (all defaults).
 * The loop must outlive the resolver. */
dns_resolver_t *dns_resolver_new(loop_t *loop, const dns_config_t *cfg, char *err, size_t errlen);
/* Resolve MX for domain, then A and AAAA of each MX host (skipping hosts with no address; DNS_NOADDR if none has one).
 * The callback fires exactly once, never synchronously from inside dns_mx_query (defer it with a zero timer if needed).
 * Returns a non-zero query id. (Only if not even the few bytes that remember
 * the callback can be allocated does it return 0; the callback then never fires.)
 * hosts is non-empty exactly when status is DNS_OK. Within a host, IPv4
 * addresses come before IPv6 ones. */
uint64_t dns_mx_query(dns_resolver_t *r, const char *domain, dns_mx_cb cb, void *arg);
/* The callback of this query will not fire. Harmless for unknown/finished ids. */
void dns_cancel(dns_resolver_t *r, uint64_t id);
/* Outstanding callbacks fire with DNS_ECANCELLED; then everything is released and no fd/timer remains in the loop.
 * Called from inside a dns_mx_cb, the release is deferred until that callback returns. NULL is harmless. */
void dns_resolver_free(dns_resolver_t *r);

#endif

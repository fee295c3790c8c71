/*
 * dns/resolver.h - MX resolution (MX, then A/AAAA of each MX host) with
 * c-ares, driven by the worker's epoll loop, behind two caches:
 *   L1  per resolver (per worker thread): bounded LRU in memory;
 *   L2  Redis (optional, through the worker's rclient): shared by every
 *       worker and pod.
 * A lookup tries L1, then L2, then DNS; a DNS answer fills both caches,
 * an L2 answer fills L1. Concurrent lookups of one name share one
 * resolution (single flight). Redis down or slow costs at most the
 * rclient command timeout, then DNS answers.
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
    DNS_EBADVALUE = -9,  /* internal: a cached value that does not parse (never reported to a callback) */
    DNS_EEXPIRED = -10,  /* internal: a cached value past its lifetime (never reported to a callback) */
} dns_status_t;

/* Which layer produced an answer. */
typedef enum {
    DNS_LAYER_L1 = 0, /* this worker's memory */
    DNS_LAYER_L2,     /* Redis */
    DNS_LAYER_DNS,    /* a DNS server, through c-ares */
    DNS_LAYER_NONE,   /* no lookup was made (invalid name, cancelled, out of memory) */
    DNS_LAYER_LAST
} dns_layer_t;

/* "l1", "l2", "dns", "none". */
const char *dns_layer_name(int layer);

/* Static English text for a dns_status_t; "unknown dns status" otherwise. */
const char *dns_strerror(int status);
/* A short tag for logs and metric labels: "ok", "nxdomain", "nullmx",
 * "noaddr", "tempfail", "timeout", "badname", "cancelled", "error". */
const char *dns_status_tag(int status);
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
    int            layer;     /* dns_layer_t that answered */
    unsigned       ttl_s;     /* how long this answer stays cached from now; 0: not cached */
    const char    *name;      /* the normalised (A-label, lower-case) domain looked up; NULL for a bad name */
} dns_mx_result_t;

typedef struct dns_resolver dns_resolver_t;
typedef void (*dns_mx_cb)(void *arg, const dns_mx_result_t *res); /* res valid only during the call */

/* What the resolver reports for metrics (see dns_config_t.on_event). */
typedef enum {
    DNS_EV_LOOKUP = 0, /* a lookup completed: layer, status, latency_us */
    DNS_EV_L1_SIZE,    /* the L1 entry count changed by l1_delta */
    DNS_EV_L2_ERROR,   /* a Redis command failed or returned a corrupt value */
} dns_event_kind_t;

typedef struct dns_event {
    int      kind;       /* dns_event_kind_t */
    int      layer;      /* DNS_EV_LOOKUP */
    int      status;     /* DNS_EV_LOOKUP */
    uint64_t latency_us; /* DNS_EV_LOOKUP: from dns_mx_query() to the callback */
    long     l1_delta;   /* DNS_EV_L1_SIZE */
} dns_event_t;
typedef void (*dns_event_cb)(void *arg, const dns_event_t *ev);

struct rclient;

typedef struct dns_config {
    const char *servers;    /* "host:port,host:port" or NULL/"" for the system's */
    unsigned    timeout_ms; /* per try, default 2000 */
    unsigned    tries;      /* default 2 */
    /* Caches. Zero means the default. */
    unsigned    l1_entries;     /* L1 capacity, default 10000 */
    unsigned    max_ttl_s;      /* cap on a positive answer's lifetime (L1 and L2), default 3600 */
    unsigned    negative_ttl_s; /* cap on a negative answer's (SOA minimum, RFC 2308), default 900 */
    struct rclient *redis;      /* L2; NULL: no L2. Not owned; must outlive the resolver */
    const char *l2_prefix;      /* Redis key prefix, default "mp:dns:1:" */
    dns_event_cb on_event;      /* optional, for metrics; called on the loop's thread */
    void       *event_arg;
} dns_config_t;

/* Counters of one resolver (for the CLI, benchmarks and tests). */
typedef struct dns_stats {
    uint64_t lookups[DNS_LAYER_LAST]; /* completed lookups by answering layer */
    uint64_t coalesced;    /* lookups that joined one already under way */
    uint64_t wire_queries; /* queries handed to c-ares (MX, A, AAAA) */
    uint64_t additional;   /* address lookups saved by the additional section */
    uint64_t l2_gets, l2_hits, l2_sets, l2_errors;
    size_t   l2_inflight;  /* Redis commands not answered yet (wait for 0 before exiting) */
    uint64_t l1_evictions;
    size_t   l1_size;
} dns_stats_t;

/* Returns NULL and fills err on failure. cfg may be NULL (all defaults:
 * system servers, L1 only). cfg is copied (l2_prefix too); cfg->redis is
 * borrowed and must be freed after the resolver. The loop must outlive
 * the resolver. */
dns_resolver_t *dns_resolver_new(loop_t *loop, const dns_config_t *cfg, char *err, size_t errlen);
/* Resolve MX for domain, then A and AAAA of each MX host (skipping hosts with no address; DNS_NOADDR if none has one).
 * domain may hold U-labels (UTF-8): it is normalised (A-labels, lower case, no final dot) first; res->name says how.
 * Answered from L1, L2 or DNS, in that order (res->layer, res->ttl_s).
 * The callback fires exactly once, never synchronously from inside dns_mx_query (defer it with a zero timer if needed).
 * Returns a non-zero query id. (Only if not even the few bytes that remember
 * the callback can be allocated does it return 0; the callback then never fires.)
 * hosts is non-empty exactly when status is DNS_OK. Within a host, IPv4
 * addresses come before IPv6 ones. */
uint64_t dns_mx_query(dns_resolver_t *r, const char *domain, dns_mx_cb cb, void *arg);
/* The callback of this query will not fire. Harmless for unknown/finished ids.
 * A resolution already under way still completes and fills the caches. */
void dns_cancel(dns_resolver_t *r, uint64_t id);
/* A copy of the resolver's counters. */
void dns_resolver_stats(const dns_resolver_t *r, dns_stats_t *out);
/* Test hook: move this resolver's clock (L1 expiry and L2 ages) ahead. */
void dns_resolver_test_advance(dns_resolver_t *r, uint64_t ms);
/* Outstanding callbacks fire with DNS_ECANCELLED; then everything is released and no fd/timer remains in the loop.
 * Called from inside a dns_mx_cb, the release is deferred until that callback returns. NULL is harmless. */
void dns_resolver_free(dns_resolver_t *r);

#endif

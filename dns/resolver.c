/*
 * SUMMARY
 *  dns/resolver.c - MX, then A/AAAA, with c-ares inside the worker's loop,
 *  behind an L1 LRU, an optional Redis L2, and single flight.
 * DESCRIPTION
 *  Two kinds of object:
 *   - an ask (dns_ask_t) is one dns_mx_query() call: its callback, its id
 *     (what dns_cancel() takes) and, once answered, a reference on the
 *     record that answers it;
 *   - a flight (dns_query_t) is one resolution of one normalised name.
 *     Every ask for a name not in L1 joins the flight for that name, or
 *     starts one (single flight). A flight asks L2 first (when a Redis
 *     client is configured and connected), then DNS; the answer becomes a
 *     dns_record_t that fills L1 (and L2 when it came from DNS), and every
 *     ask waiting on the flight gets a reference to it.
 *  An L1 hit never starts a flight: the ask is answered on the next loop
 *  pass (callbacks never run inside dns_mx_query()).
 *
 *  c-ares 1.18 has no event thread and no ares_process_fds, so the
 *  channel is driven by the worker's own loop, like every other library
 *  with sockets (one thread per worker, no thread of its own:
 *  docs/architecture.md):
 *   - ARES_OPT_SOCK_STATE_CB adds, modifies and removes c-ares' sockets in
 *     the loop;
 *   - a readiness event calls ares_process_fd() for that socket;
 *   - one loop timer, kept due no later than ares_timeout() says, calls
 *     ares_process_fd(ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD) so that
 *     timeouts and retries run even when no socket is readable.
 *
 *  The DNS stage of a flight: the MX lookup (answers parsed by dns/msg.c
 *  for TTLs, CNAME chains, the SOA of negative answers and the additional
 *  section), a new MX lookup of the canonical name when a CNAME points to
 *  a name whose MX the answer does not carry (at most DNS_MAX_CNAME
 *  hops), then one A and one AAAA lookup per MX host (or for the domain
 *  itself when it has no MX: the implicit MX of RFC 5321 §5.1) unless the
 *  additional section already holds that host's addresses of that family.
 *  A flight completes when its count of outstanding lookups drops to
 *  zero; it is then queued on the done list.
 *
 *  At most DNS_MAX_INFLIGHT lookups are in c-ares at once; the others wait
 *  in two FIFOs, address lookups (which finish queries under way) ahead
 *  of MX lookups (which start new ones).
 *
 *  Lifetimes: a positive answer lives min(its smallest TTL, max_ttl_s);
 *  NXDOMAIN and NOADDR live min(SOA TTL, SOA MINIMUM) (RFC 2308 §5),
 *  or DNS_NEG_TTL_NO_SOA when the server sent no SOA, capped by
 *  negative_ttl_s; a null MX lives as its MX record does. SERVFAIL,
 *  timeouts and the like are never cached. L2 keeps the same lifetime
 *  (Redis EX), and an L2 answer enters L1 with what remains of it.
 *
 *  Ids and names are looked up in core/htable.h tables (flights by id,
 *  asks by id, flights by name); ask, done and wait lists are sys/queue.h.
 *
 *  Ownership and re-entrancy (a library callback can fire after the
 *  object it was about is gone, so it carries an id, never a pointer):
 *   - Every c-ares lookup carries a small dns_req_t naming its flight by
 *     64-bit id, never by pointer; every Redis command a dns_l2op_t. The
 *     reply looks the id up; the resolver's release cancels its Redis
 *     commands (rclient_cancel: their callbacks never fire) before it
 *     frees anything.
 *   - c-ares and rclient callbacks only record results and start further
 *     lookups. User callbacks run only from dns_dispatch(), which is
 *     reached from the loop (fd event, c-ares timer, or the zero "defer"
 *     timer), never from inside c-ares, rclient or dns_mx_query(). So a
 *     user callback may start or cancel queries or free the resolver.
 *   - dns_resolver_free() from inside a user callback only sets
 *     free_pending; dns_dispatch() releases once the callback returned.
 * DIAGNOSTICS
 *  dns_resolver_new() fills err. Query outcomes go to the callback as a
 *  dns_status_t; a socket the loop refuses to watch is logged (its lookups
 *  then end by timeout); Redis failures are counted (l2_errors) and logged
 *  at debug, and the lookup goes on over DNS.
 */
#include "dns/resolver.h"

#include <ares.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/htable.h"
#include "core/list.h"
#include "core/log.h"
#include "core/rclient.h"
#include "core/util.h"
#include "dns/cache.h"
#include "dns/idn.h"
#include "dns/msg.h"
#include "dns/mx.h"
#include "dns/record.h"

#define DNS_DEFAULT_TIMEOUT_MS 2000u
#define DNS_DEFAULT_TRIES      2u
#define DNS_DEFAULT_L1         10000u
#define DNS_DEFAULT_MAX_TTL    3600u
#define DNS_DEFAULT_NEG_TTL    900u
#define DNS_DEFAULT_L2_PREFIX  "mp:dns:1:"
/* Lifetime of a negative answer that came without an SOA (dnsmasq's
 * local zones send none). RFC 2308 §5 says not to cache those at all,
 * which is meant for resolvers that answer others; a delivery engine
 * retrying the same typo domain a thousand times a second is better off
 * remembering it briefly. Capped by negative_ttl_s like the rest. */
#define DNS_NEG_TTL_NO_SOA     60u
#define DNS_BUCKETS_MIN        64u /* initial size of the id and name tables */
/* Lookups handed to c-ares at once, per resolver. A burst of a few
 * hundred UDP queries overflows the socket buffers of a local resolver
 * (dnsmasq drops them: UdpRcvbufErrors), and every dropped one costs a
 * full timeout; beyond this the rest wait in FIFOs. */
#define DNS_MAX_INFLIGHT       128u

/* ---- objects ---- */

/* Address lookups of one host; parallel to dns_query_t.hosts. */
typedef struct dns_qhost {
    struct in_addr       *v4;
    size_t                n4;
    struct ares_in6_addr *v6;
    size_t                n6;
    int                   st4, st6;   /* dns_status_t of the A and AAAA lookups */
    uint32_t              ttl4, ttl6; /* smallest TTL of the addresses kept */
    long                  neg4, neg6; /* negative TTL of an empty answer, -1: none */
} dns_qhost_t;

typedef struct dns_ask dns_ask_t;

/* One resolution of one name (a flight). */
typedef TAILQ_HEAD(dns_ask_list, dns_ask) dns_ask_list_t;

typedef struct dns_query {
    uint64_t          id;
    htable_node_t     node;          /* in r->flights, keyed by id */
    htable_node_t     nnode;         /* in r->names, keyed by key (single flight) */
    TAILQ_ENTRY(dns_query) done;     /* r->done, when on_done */
    int               on_done;
    dns_ask_list_t    asks;          /* waiting asks */
    char             *key;           /* normalised name: cache key */
    char             *domain;        /* name of the MX lookup (moves along a CNAME chain) */
    int               status;        /* first error that decides the outcome */
    int               addr_stage;    /* MX stage done, address lookups started */
    int               implicit;
    int               cname_hops;
    int               layer;         /* DNS_LAYER_L2 or DNS_LAYER_DNS */
    size_t            pending;       /* outstanding lookups (c-ares, Redis), plus holds */
    uint32_t          ttl;           /* smallest positive TTL met */
    long              neg_ttl;       /* smallest negative TTL met, -1: none */
    dns_record_t     *rec;           /* an L2 answer */
    struct dns_l2op  *l2get;         /* the outstanding L2 read */
    dns_mx_host_t    *hosts;
    size_t            nhosts;
    dns_qhost_t      *qh;
} dns_query_t;

/* One dns_mx_query() call. */
struct dns_ask {
    uint64_t       id;
    htable_node_t  node;       /* in r->asks, keyed by id */
    TAILQ_ENTRY(dns_ask) link; /* on its flight's list, or on the done list */
    uint64_t       qid;        /* flight waited on; 0 once answered */
    dns_record_t  *rec;        /* the answer once answered; NULL: status only */
    int            status;
    int            layer;
    unsigned       ttl_s;
    dns_mx_cb      cb;
    void          *arg;
    uint64_t       t0_us;
    int            has_name;
    char           name[];     /* normalised name */
};

/* The argument of one c-ares lookup. */
typedef struct dns_req {
    dns_resolver_t *r;
    uint64_t        qid;
    size_t          host; /* index into hosts; unused for MX */
    int             type; /* T_MX, T_A or T_AAAA */
    STAILQ_ENTRY(dns_req) next; /* while waiting in a dns_fifo_t */
} dns_req_t;

/* The argument of one Redis command. */
typedef struct dns_l2op {
    dns_resolver_t  *r;
    uint64_t         qid;  /* flight for a GET; 0 for a SET */
    uint64_t         rcid; /* rclient command id */
    LIST_ENTRY(dns_l2op) link; /* r->l2ops */
} dns_l2op_t;

typedef STAILQ_HEAD(dns_fifo, dns_req) dns_fifo_t;

struct dns_resolver {
    loop_t        *loop;
    ares_channel   ch;
    loop_timer_t   ares_timer;  /* ares_timeout() cap */
    loop_timer_t   defer_timer; /* zero delay: run callbacks outside dns_mx_query */
    htable_t       flights;     /* id -> flight (c-ares and Redis replies find them here) */
    htable_t       names;       /* name -> flight (single flight) */
    htable_t       asks;        /* id -> ask (dns_cancel) */
    TAILQ_HEAD(, dns_query) done; /* completed flights */
    dns_ask_list_t adone;       /* answered asks */
    dns_fifo_t     wait_addr;   /* lookups not yet handed to c-ares: */
    dns_fifo_t     wait_mx;     /*  address ones go first */
    size_t         inflight;    /* lookups handed to c-ares, not yet answered */
    int            pumping;
    uint64_t       next_id;
    unsigned       timeout_ms;  /* per try, as given to c-ares */
    unsigned       dispatching; /* depth of user callbacks on the stack */
    int            free_pending;
    int            freeing;
    /* caches */
    dns_cache_t   *l1;
    unsigned       max_ttl_s, neg_ttl_s;
    rclient_t     *redis;
    char          *l2_prefix;
    LIST_HEAD(, dns_l2op) l2ops; /* outstanding Redis commands */
    dns_event_cb   on_event;
    void          *event_arg;
    uint64_t       skew_ms;     /* test clock offset */
    uint64_t       seed;        /* per-answer shuffle of equal preferences */
    dns_stats_t    st;
};

static void dns_on_mx_reply(void *arg, int status, int timeouts, unsigned char *abuf, int alen);
static void dns_on_addr_reply(void *arg, int status, int timeouts, unsigned char *abuf, int alen);
static void dns_arm_ares_timer(dns_resolver_t *r, int exact);

const char *dns_layer_name(int layer)
{
    switch (layer) {
    case DNS_LAYER_L1:  return "l1";
    case DNS_LAYER_L2:  return "l2";
    case DNS_LAYER_DNS: return "dns";
    }
    return "none";
}

static uint64_t dns_now_ms(dns_resolver_t *r)
{
    return loop_now_ms(r->loop) + r->skew_ms;
}

static uint64_t dns_now_s(dns_resolver_t *r)
{
    return (util_wall_ms() + r->skew_ms) / 1000u;
}

static uint64_t dns_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void dns_emit(dns_resolver_t *r, const dns_event_t *ev)
{
    if (r->on_event != NULL)
        r->on_event(r->event_arg, ev);
}

static void dns_l2_error(dns_resolver_t *r, const char *what, const char *err)
{
    r->st.l2_errors++;
    log_debug("dns", "l2_error", "op=%s reason=%s", what, LOG_Q(err));
    dns_event_t ev = { .kind = DNS_EV_L2_ERROR };
    dns_emit(r, &ev);
}

/* L1 operations that may change its size report the change. */
static void dns_l1_size_changed(dns_resolver_t *r, size_t before)
{
    size_t after = dns_cache_size(r->l1);
    if (after != before) {
        dns_event_t ev = { .kind = DNS_EV_L1_SIZE, .l1_delta = (long)after - (long)before };
        dns_emit(r, &ev);
    }
}

/* ---- name table (single flight) ---- */

static dns_query_t *dns_names_find(const dns_resolver_t *r, const char *key)
{
    htable_node_t *n = htable_find_str(&r->names, key);
    return n ? HTABLE_ENTRY(n, dns_query_t, nnode) : NULL;
}

static void dns_arm_defer(dns_resolver_t *r)
{
    if (!loop_timer_active(&r->defer_timer))
        loop_timer_set(r->loop, &r->defer_timer, 0);
}

/* Answer an ask: it moves to the done list, dispatched from the loop. */
static void dns_ask_answer(dns_resolver_t *r, dns_ask_t *a, dns_record_t *rec, int status, int layer,
                           unsigned ttl_s)
{
    a->qid = 0;
    a->rec = rec != NULL ? dns_record_ref(rec) : NULL;
    a->status = rec != NULL ? rec->status : status;
    a->layer = layer;
    a->ttl_s = ttl_s;
    TAILQ_INSERT_TAIL(&r->adone, a, link);
    dns_arm_defer(r);
}

static void dns_ask_free(dns_ask_t *a)
{
    dns_record_unref(a->rec);
    free(a);
}

/* ---- done list of flights ---- */

static void dns_done_append(dns_resolver_t *r, dns_query_t *q)
{
    q->on_done = 1;
    TAILQ_INSERT_TAIL(&r->done, q, done);
}

static void dns_done_unlink(dns_resolver_t *r, dns_query_t *q)
{
    if (!q->on_done)
        return;
    TAILQ_REMOVE(&r->done, q, done);
    q->on_done = 0;
}

/* ---- flights ---- */

static void dns_query_drop_hosts(dns_query_t *q)
{
    for (size_t i = 0; i < q->nhosts; i++) {
        free(q->hosts[i].name);
        free(q->hosts[i].addrs);
        if (q->qh != NULL) {
            free(q->qh[i].v4);
            free(q->qh[i].v6);
        }
    }
    free(q->hosts);
    free(q->qh);
    q->hosts = NULL;
    q->qh = NULL;
    q->nhosts = 0;
}

static void dns_query_free(dns_query_t *q)
{
    dns_query_drop_hosts(q);
    dns_record_unref(q->rec);
    free(q->key);
    free(q->domain);
    free(q);
}

static int dns_is_transient(int status)
{
    return status == DNS_TEMPFAIL || status == DNS_TIMEOUT || status == DNS_ENOMEM;
}

static void dns_sockaddr_v4(struct sockaddr_storage *ss, const struct in_addr *a)
{
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    memset(ss, 0, sizeof(*ss));
    sin->sin_family = AF_INET;
    sin->sin_addr = *a;
}

static void dns_sockaddr_v6(struct sockaddr_storage *ss, const struct ares_in6_addr *a)
{
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    memset(ss, 0, sizeof(*ss));
    sin6->sin6_family = AF_INET6;
    memcpy(&sin6->sin6_addr, a, sizeof(sin6->sin6_addr));
}

static void dns_min_ttl(uint32_t *ttl, uint32_t v)
{
    if (v < *ttl)
        *ttl = v;
}

static void dns_min_neg(long *neg, long v)
{
    if (v >= 0 && (*neg < 0 || v < *neg))
        *neg = v;
}

/* All address lookups are in: keep the hosts that have an address, in
 * their sorted order, and decide the status when none has one. */
static int dns_query_collect(dns_query_t *q)
{
    size_t kept = 0;
    int transient = DNS_OK, nxdomain = 0;
    long neg = -1;
    uint32_t ttl = UINT32_MAX;
    for (size_t i = 0; i < q->nhosts; i++) {
        dns_qhost_t *h = &q->qh[i];
        size_t n = h->n4 + h->n6;
        if (n > 0)
            q->hosts[i].addrs = dns_calloc(n, sizeof(struct sockaddr_storage));
        if (n == 0 || q->hosts[i].addrs == NULL) {
            /* ENOMEM first, then the lookup of the most preferred host */
            int st = n > 0 ? DNS_ENOMEM : dns_is_transient(h->st4) ? h->st4 : h->st6;
            if (dns_is_transient(st) && (transient == DNS_OK || st == DNS_ENOMEM))
                transient = st;
            if (h->st4 == DNS_NXDOMAIN || h->st6 == DNS_NXDOMAIN)
                nxdomain = 1;
            dns_min_neg(&neg, h->neg4);
            dns_min_neg(&neg, h->neg6);
            free(q->hosts[i].name);
            q->hosts[i].name = NULL;
            continue;
        }
        dns_mx_host_t *out = &q->hosts[i];
        for (size_t j = 0; j < h->n4; j++)
            dns_sockaddr_v4(&out->addrs[out->naddrs++], &h->v4[j]);
        for (size_t j = 0; j < h->n6; j++)
            dns_sockaddr_v6(&out->addrs[out->naddrs++], &h->v6[j]);
        if (h->n4)
            dns_min_ttl(&ttl, h->ttl4);
        if (h->n6)
            dns_min_ttl(&ttl, h->ttl6);
        q->hosts[kept++] = *out;
    }
    for (size_t i = 0; i < q->nhosts; i++) {
        free(q->qh[i].v4);
        free(q->qh[i].v6);
    }
    free(q->qh);
    q->qh = NULL;
    q->nhosts = kept;
    if (kept > 0) {
        dns_min_ttl(&q->ttl, ttl);
        return DNS_OK;
    }
    if (transient != DNS_OK)
        return transient;
    dns_min_neg(&q->neg_ttl, neg);
    /* Implicit MX: the MX lookup said the name exists with no MX, yet its
     * address lookup says it does not exist (it was just removed). */
    if (q->implicit && nxdomain)
        return DNS_NXDOMAIN;
    return DNS_NOADDR;
}

/* Drop one outstanding lookup (or hold); at zero the flight is complete
 * and waits on the done list for dns_dispatch(). */
static void dns_query_release(dns_resolver_t *r, dns_query_t *q)
{
    if (--q->pending > 0)
        return;
    if (q->status == DNS_OK && q->addr_stage)
        q->status = dns_query_collect(q);
    if (q->status != DNS_OK)
        dns_query_drop_hosts(q); /* hosts are reported only on success */
    dns_done_append(r, q);
    dns_arm_defer(r);
}

static dns_req_t *dns_fifo_pop(dns_fifo_t *f)
{
    dns_req_t *req = STAILQ_FIRST(f);
    if (req != NULL)
        STAILQ_REMOVE_HEAD(f, next);
    return req;
}

static void dns_fifo_clear(dns_fifo_t *f)
{
    dns_req_t *req;
    while ((req = dns_fifo_pop(f)) != NULL)
        free(req);
}

static dns_query_t *dns_flight_find(const dns_resolver_t *r, uint64_t id)
{
    htable_node_t *n = htable_find_u64(&r->flights, id);
    return n ? HTABLE_ENTRY(n, dns_query_t, node) : NULL;
}

/* Hand waiting lookups to c-ares while fewer than DNS_MAX_INFLIGHT are
 * out. Address lookups first: they finish queries already under way,
 * where a new MX lookup only starts one more. */
static void dns_pump(dns_resolver_t *r)
{
    /* ares_query() may call back synchronously, and the callback pumps
     * again: the outer loop carries on instead. */
    if (r->pumping || r->freeing)
        return;
    r->pumping = 1;
    while (r->inflight < DNS_MAX_INFLIGHT) {
        dns_req_t *req = dns_fifo_pop(&r->wait_addr);
        if (req == NULL && (req = dns_fifo_pop(&r->wait_mx)) == NULL)
            break;
        dns_query_t *q = dns_flight_find(r, req->qid);
        if (q == NULL) { /* gone while waiting */
            free(req);
            continue;
        }
        const char *name = req->type == T_MX ? q->domain : q->hosts[req->host].name;
        r->inflight++;
        r->st.wire_queries++;
        ares_query(r->ch, name, C_IN, req->type,
                   req->type == T_MX ? dns_on_mx_reply : dns_on_addr_reply, req);
    }
    r->pumping = 0;
}

/* Queue one lookup for q (the name is q->domain for T_MX, else the
 * host's). On failure to even queue it, record the status as that
 * lookup's answer. */
static void dns_lookup(dns_resolver_t *r, dns_query_t *q, int type, size_t host)
{
    dns_req_t *req = dns_malloc(sizeof(*req));
    if (req == NULL) {
        if (type == T_MX)
            q->status = DNS_ENOMEM;
        else if (type == T_A)
            q->qh[host].st4 = DNS_ENOMEM;
        else
            q->qh[host].st6 = DNS_ENOMEM;
        return;
    }
    req->r = r;
    req->qid = q->id;
    req->host = host;
    req->type = type;
    q->pending++;
    STAILQ_INSERT_TAIL(type == T_MX ? &r->wait_mx : &r->wait_addr, req, next);
    /* c-ares may call back synchronously (bad name, out of memory): the
     * callers hold a reference, so q cannot complete in the middle of a
     * loop over its hosts. */
    dns_pump(r);
}

/* Take the addresses of family type for host name from the answer or
 * additional section of m. Returns how many (0: none there). */
static size_t dns_take_extra(dns_qhost_t *h, int type, const char *name, const dns_msg_t *m)
{
    size_t n = 0;
    uint32_t ttl = UINT32_MAX;
    for (size_t i = 0; i < m->nrr; i++) {
        const dns_rr_t *rr = &m->rr[i];
        if (rr->type == type && rr->section != DNS_SEC_AUTHORITY && strcasecmp(rr->name, name) == 0)
            n++;
    }
    if (n == 0)
        return 0;
    if (n > DNS_MAX_ADDRS)
        n = DNS_MAX_ADDRS;
    void *arr = type == T_A ? dns_calloc(n, sizeof(struct in_addr)) : dns_calloc(n, sizeof(struct ares_in6_addr));
    if (arr == NULL)
        return 0; /* look it up instead */
    size_t k = 0;
    for (size_t i = 0; i < m->nrr && k < n; i++) {
        const dns_rr_t *rr = &m->rr[i];
        if (rr->type != type || rr->section == DNS_SEC_AUTHORITY || strcasecmp(rr->name, name) != 0)
            continue;
        memcpy((unsigned char *)arr + k * (type == T_A ? 4u : 16u), rr->addr, type == T_A ? 4u : 16u);
        dns_min_ttl(&ttl, rr->ttl);
        k++;
    }
    if (type == T_A) {
        h->v4 = arr;
        h->n4 = k;
        h->ttl4 = ttl;
        h->st4 = DNS_OK;
    } else {
        h->v6 = arr;
        h->n6 = k;
        h->ttl6 = ttl;
        h->st6 = DNS_OK;
    }
    return k;
}

static void dns_start_addrs(dns_resolver_t *r, dns_query_t *q, const dns_msg_t *m)
{
    q->qh = dns_calloc(q->nhosts, sizeof(*q->qh));
    if (q->qh == NULL) {
        q->status = DNS_ENOMEM;
        return;
    }
    q->addr_stage = 1;
    for (size_t i = 0; i < q->nhosts; i++) {
        dns_qhost_t *h = &q->qh[i];
        h->st4 = h->st6 = DNS_OK;
        h->neg4 = h->neg6 = -1;
        /* A family present in the additional section is taken as is; a
         * family absent from it proves nothing and is looked up. */
        if (m != NULL && dns_take_extra(h, T_A, q->hosts[i].name, m) > 0)
            r->st.additional++;
        else
            dns_lookup(r, q, T_A, i);
        if (m != NULL && dns_take_extra(h, T_AAAA, q->hosts[i].name, m) > 0)
            r->st.additional++;
        else
            dns_lookup(r, q, T_AAAA, i);
    }
}

/* No MX record: the domain itself is the only host (RFC 5321 §5.1); after
 * a CNAME chain, its canonical name. */
static void dns_use_implicit(dns_resolver_t *r, dns_query_t *q)
{
    q->implicit = 1;
    q->hosts = dns_calloc(1, sizeof(*q->hosts));
    if (q->hosts == NULL || (q->hosts[0].name = dns_strndup(q->domain, strlen(q->domain))) == NULL) {
        free(q->hosts);
        q->hosts = NULL;
        q->status = DNS_ENOMEM;
        return;
    }
    q->nhosts = 1;
    dns_start_addrs(r, q, NULL);
}

static int dns_is_root(const char *host)
{
    return host[0] == '\0' || (host[0] == '.' && host[1] == '\0');
}

/* Turn the MX RRset of owner in m into q->hosts: null MX check, sort,
 * de-duplicate, cap. */
static int dns_take_mx(dns_query_t *q, const dns_msg_t *m, const char *owner, size_t n)
{
    dns_mx_host_t *all = dns_calloc(n, sizeof(*all));
    if (all == NULL)
        return DNS_ENOMEM;
    size_t i = 0;
    for (size_t k = 0; k < m->nrr && i < n; k++) {
        const dns_rr_t *rr = &m->rr[k];
        if (rr->section != DNS_SEC_ANSWER || rr->type != T_MX || strcasecmp(rr->name, owner) != 0)
            continue;
        /* RFC 7505: "0 ." says the domain accepts no mail. It must stand
         * alone; if a zone lists other MX besides, the explicit refusal
         * still wins (§4.1: clients MUST NOT deliver). */
        if (rr->pref == 0 && dns_is_root(rr->target)) {
            free(all);
            return DNS_NULLMX;
        }
        all[i].name = rr->target; /* borrowed until the copy below */
        all[i].pref = rr->pref;
        i++;
    }
    n = i;
    dns_sort_mx(all, n, util_rand64());

    q->hosts = dns_calloc(n < DNS_MAX_HOSTS ? n : DNS_MAX_HOSTS, sizeof(*q->hosts));
    if (q->hosts == NULL) {
        free(all);
        return DNS_ENOMEM;
    }
    int status = DNS_OK;
    for (i = 0; i < n && q->nhosts < DNS_MAX_HOSTS; i++) {
        /* a root target with a non-zero preference cannot be resolved */
        if (dns_is_root(all[i].name))
            continue;
        /* The same host twice: keep its most preferred (first) entry. */
        int dup = 0;
        for (size_t k = 0; k < q->nhosts && !dup; k++)
            dup = strcasecmp(q->hosts[k].name, all[i].name) == 0;
        if (dup)
            continue;
        char *name = dns_strndup(all[i].name, strlen(all[i].name));
        if (name == NULL) {
            status = DNS_ENOMEM;
            break;
        }
        q->hosts[q->nhosts].name = name;
        q->hosts[q->nhosts].pref = all[i].pref;
        q->nhosts++;
    }
    free(all);
    if (status == DNS_OK && q->nhosts == 0)
        status = DNS_NOADDR;
    return status;
}

/* ---- c-ares callbacks: record, start lookups, never call the user ---- */

static dns_query_t *dns_req_owner(void *arg, int status, dns_resolver_t **rp, dns_req_t *copy)
{
    dns_req_t *req = arg;
    *copy = *req;
    *rp = req->r;
    free(req);
    /* ares_destroy() inside dns_resolver_release(): queries are being
     * cancelled there; there is nothing to record. */
    if (status == ARES_EDESTRUCTION)
        return NULL;
    copy->r->inflight--;
    return dns_flight_find(copy->r, copy->qid);
}

/* Parse abuf when c-ares handed over a message worth reading. Returns
 * DNS_OK with *m filled, 1 when there is nothing to parse, or an error. */
static int dns_parse_reply(int status, const unsigned char *abuf, int alen, dns_msg_t *m)
{
    memset(m, 0, sizeof(*m));
    if ((status != ARES_SUCCESS && status != ARES_ENODATA && status != ARES_ENOTFOUND) || abuf == NULL ||
        alen <= 0)
        return 1;
    return dns_msg_parse(abuf, alen, m);
}

static void dns_mx_answer(dns_resolver_t *r, dns_query_t *q, int status, const dns_msg_t *m)
{
    if (status == ARES_ENOTFOUND) {
        q->status = DNS_NXDOMAIN;
        dns_min_neg(&q->neg_ttl, dns_msg_negative_ttl(m));
        return;
    }
    uint32_t ttl = UINT32_MAX;
    int hops = q->cname_hops;
    const char *canon = dns_msg_chase(m, q->domain, &ttl, &hops);
    if (hops > DNS_MAX_CNAME) {
        q->status = DNS_TEMPFAIL; /* a loop, or a chain nobody should follow */
        return;
    }
    size_t n = 0;
    for (size_t i = 0; i < m->nrr; i++) {
        const dns_rr_t *rr = &m->rr[i];
        if (rr->section == DNS_SEC_ANSWER && rr->type == T_MX && strcasecmp(rr->name, canon) == 0) {
            n++;
            dns_min_ttl(&ttl, rr->ttl);
        }
    }
    dns_min_ttl(&q->ttl, ttl);
    if (n > 0) {
        q->status = dns_take_mx(q, m, canon, n);
        if (q->status == DNS_OK)
            dns_start_addrs(r, q, m);
        return;
    }
    if (strcasecmp(canon, q->domain) != 0) {
        /* A CNAME whose target's MX the server did not add: ask for them. */
        char *next = dns_strndup(canon, strlen(canon));
        if (next == NULL) {
            q->status = DNS_ENOMEM;
            return;
        }
        free(q->domain);
        q->domain = next;
        q->cname_hops = hops;
        dns_lookup(r, q, T_MX, 0);
        return;
    }
    /* NOERROR without MX (NODATA): implicit MX. The answer that there is
     * no MX has the negative lifetime. */
    dns_min_neg(&q->neg_ttl, dns_msg_negative_ttl(m));
    if (dns_msg_negative_ttl(m) < 0)
        dns_min_neg(&q->neg_ttl, DNS_NEG_TTL_NO_SOA);
    dns_use_implicit(r, q);
}

static void dns_on_mx_reply(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    dns_resolver_t *r;
    dns_req_t req;
    dns_query_t *q = dns_req_owner(arg, status, &r, &req);
    if (q == NULL) {
        dns_pump(r); /* its slot is free for a waiting lookup */
        return;
    }
    dns_msg_t m;
    int pst = dns_parse_reply(status, abuf, alen, &m);
    if (pst == DNS_OK)
        dns_mx_answer(r, q, status, &m);
    else if (pst != 1)
        q->status = pst;
    else
        q->status = dns_status_from_ares(status);
    dns_msg_free(&m);

    log_debug("dns", "mx_reply", "id=%016" PRIx64 " domain=%s ares=%s hosts=%zu implicit=%d",
              q->id, LOG_Q(q->domain), LOG_Q(ares_strerror(status)), q->nhosts, q->implicit);
    dns_query_release(r, q); /* the MX lookup's reference */
    dns_pump(r);
}

/* Record the answer of an A or AAAA lookup in the host's lookup state. */
static void dns_addr_answer(dns_qhost_t *h, const char *host, int type, int status, const dns_msg_t *m)
{
    int *st = type == T_A ? &h->st4 : &h->st6;
    long *neg = type == T_A ? &h->neg4 : &h->neg6;
    if (status == ARES_ENOTFOUND || status == ARES_ENODATA) {
        *st = status == ARES_ENOTFOUND ? DNS_NXDOMAIN : DNS_NOADDR;
        *neg = dns_msg_negative_ttl(m);
        return;
    }
    uint32_t ttl = UINT32_MAX;
    int hops = 0;
    const char *canon = dns_msg_chase(m, host, &ttl, &hops);
    if (hops > DNS_MAX_CNAME) {
        *st = DNS_TEMPFAIL;
        return;
    }
    /* dns_take_extra() reads the answer section too: the same code takes
     * the addresses of the canonical name. */
    uint32_t chain = ttl;
    if (dns_take_extra(h, type, canon, m) == 0) {
        *st = DNS_NOADDR;
        *neg = dns_msg_negative_ttl(m);
        return;
    }
    dns_min_ttl(type == T_A ? &h->ttl4 : &h->ttl6, chain);
}

static void dns_on_addr_reply(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    dns_resolver_t *r;
    dns_req_t req;
    dns_query_t *q = dns_req_owner(arg, status, &r, &req);
    if (q == NULL) {
        dns_pump(r); /* its slot is free for a waiting lookup */
        return;
    }

    dns_qhost_t *h = &q->qh[req.host];
    dns_msg_t m;
    int pst = dns_parse_reply(status, abuf, alen, &m);
    if (pst == DNS_OK)
        dns_addr_answer(h, q->hosts[req.host].name, req.type, status, &m);
    else if (req.type == T_A)
        h->st4 = pst != 1 ? pst : dns_status_from_ares(status);
    else
        h->st6 = pst != 1 ? pst : dns_status_from_ares(status);
    dns_msg_free(&m);
    log_debug("dns", "addr_reply", "id=%016" PRIx64 " host=%s type=%s status=%s",
              q->id, LOG_Q(q->hosts[req.host].name), req.type == T_A ? "A" : "AAAA",
              LOG_Q(dns_strerror(req.type == T_A ? h->st4 : h->st6)));
    dns_query_release(r, q);
    dns_pump(r);
}

/* ---- L2 (Redis) ---- */

static dns_l2op_t *dns_l2op_new(dns_resolver_t *r, uint64_t qid)
{
    dns_l2op_t *op = dns_calloc(1, sizeof(*op));
    if (op == NULL)
        return NULL;
    op->r = r;
    op->qid = qid;
    LIST_INSERT_HEAD(&r->l2ops, op, link);
    return op;
}

static void dns_on_l2_set(void *arg, const redisReply *reply, const char *err)
{
    dns_l2op_t *op = arg;
    dns_resolver_t *r = op->r;
    LIST_REMOVE(op, link);
    free(op);
    if (reply == NULL)
        dns_l2_error(r, "set", err);
}

static void dns_on_l2_get(void *arg, const redisReply *reply, const char *err)
{
    dns_l2op_t *op = arg;
    dns_resolver_t *r = op->r;
    uint64_t qid = op->qid;
    LIST_REMOVE(op, link);
    free(op);
    dns_query_t *q = dns_flight_find(r, qid);
    if (q == NULL)
        return;
    q->l2get = NULL;
    if (reply == NULL) {
        dns_l2_error(r, "get", err);
    } else if (reply->type == REDIS_REPLY_STRING) {
        dns_record_t *rec = NULL;
        int st = dns_record_decode((const unsigned char *)reply->str, reply->len, dns_now_s(r), &rec);
        if (st == DNS_OK) {
            r->st.l2_hits++;
            q->rec = rec;
            q->status = rec->status;
            q->layer = DNS_LAYER_L2;
        } else if (st == DNS_EBADVALUE) {
            dns_l2_error(r, "decode", "corrupt value");
        }
    } else if (reply->type != REDIS_REPLY_NIL) {
        dns_l2_error(r, "get", "unexpected reply type");
    }
    if (q->rec == NULL) /* miss: DNS answers (and its answer overwrites a bad value) */
        dns_lookup(r, q, T_MX, 0);
    dns_query_release(r, q); /* the L2 read's hold */
    if (r->inflight > 0)
        dns_arm_ares_timer(r, 0);
}

static int dns_l2_key(const dns_resolver_t *r, const char *name, char *out, size_t outlen)
{
    int n = snprintf(out, outlen, "%s%s", r->l2_prefix, name);
    return n > 0 && (size_t)n < outlen ? n : -1;
}

/* Start the L2 read of flight q. 0 when started. */
static int dns_l2_get(dns_resolver_t *r, dns_query_t *q)
{
    char key[DNS_NAME_MAX + 64];
    int klen = dns_l2_key(r, q->key, key, sizeof(key));
    if (klen < 0)
        return -1;
    dns_l2op_t *op = dns_l2op_new(r, q->id);
    if (op == NULL)
        return -1;
    const char *argv[2] = { "GET", key };
    const size_t lens[2] = { 3, (size_t)klen };
    q->pending++;
    q->l2get = op;
    r->st.l2_gets++;
    op->rcid = rclient_commandargv(r->redis, dns_on_l2_get, op, 2, argv, lens);
    return 0;
}

/* Store an answer from DNS in L2 for ttl_s seconds (fire and forget). */
static void dns_l2_set(dns_resolver_t *r, const char *name, const dns_record_t *rec, unsigned ttl_s)
{
    unsigned char val[4096];
    size_t vlen = dns_record_encode(rec, dns_now_s(r), val, sizeof(val));
    char key[DNS_NAME_MAX + 64], ttl[16];
    int klen = dns_l2_key(r, name, key, sizeof(key));
    if (vlen == 0 || klen < 0)
        return; /* too big for one value: L1 only */
    dns_l2op_t *op = dns_l2op_new(r, 0);
    if (op == NULL)
        return;
    int tlen = snprintf(ttl, sizeof(ttl), "%u", ttl_s);
    const char *argv[5] = { "SET", key, (const char *)val, "EX", ttl };
    const size_t lens[5] = { 3, (size_t)klen, vlen, 2, (size_t)tlen };
    r->st.l2_sets++;
    op->rcid = rclient_commandargv(r->redis, dns_on_l2_set, op, 5, argv, lens);
}

/* ---- loop glue ---- */

/* Keep the c-ares timer due no later than c-ares' next deadline.
 * ares_timeout() walks every outstanding lookup (O(n) in 1.18), so it is
 * not asked after every event: a lookup sent since the timer was armed
 * expires no sooner than timeout_ms from now (c-ares only doubles that
 * per round), so a timer already due before then still covers it. Firing
 * early costs one empty pass and an exact re-arm. Exact when asked, and
 * when no lookup of ours is left, so that an idle loop goes empty. */
static void dns_arm_ares_timer(dns_resolver_t *r, int exact)
{
    if (!exact && r->inflight > 0 && loop_timer_active(&r->ares_timer) &&
        r->ares_timer.when <= loop_now_ms(r->loop) + r->timeout_ms)
        return;
    struct timeval tv, *tvp = ares_timeout(r->ch, NULL, &tv);
    if (tvp == NULL) {
        /* nothing outstanding in c-ares: leave the loop free to end */
        loop_timer_cancel(r->loop, &r->ares_timer);
        return;
    }
    /* Round up: firing early finds nothing expired and would spin. */
    uint64_t ms = (uint64_t)tvp->tv_sec * 1000u + ((uint64_t)tvp->tv_usec + 999u) / 1000u;
    loop_timer_set(r->loop, &r->ares_timer, ms);
}

static void dns_resolver_release(dns_resolver_t *r);

static unsigned dns_cap_ttl(const dns_resolver_t *r, int status, uint32_t ttl, long neg)
{
    uint64_t t;
    switch (status) {
    case DNS_OK:
    case DNS_NULLMX:
        t = ttl == UINT32_MAX ? 0 : ttl; /* no TTL seen: do not cache */
        return (unsigned)(t < r->max_ttl_s ? t : r->max_ttl_s);
    case DNS_NXDOMAIN:
    case DNS_NOADDR:
        t = neg >= 0 ? (uint64_t)neg : DNS_NEG_TTL_NO_SOA;
        if (status == DNS_NOADDR && ttl < t)
            t = ttl; /* no longer than the MX records that led there */
        return (unsigned)(t < r->neg_ttl_s ? t : r->neg_ttl_s);
    }
    return 0;
}

/* A flight is complete: build (or take) its record, fill the caches, and
 * answer every ask waiting on it. */
static void dns_flight_finish(dns_resolver_t *r, dns_query_t *q)
{
    htable_remove(&r->flights, &q->node);
    htable_remove(&r->names, &q->nnode);
    dns_record_t *rec = q->rec;
    q->rec = NULL;
    unsigned ttl_s = 0;
    int status = q->status;
    if (rec != NULL) { /* from L2: its remaining lifetime, under our caps */
        ttl_s = dns_cap_ttl(r, rec->status, rec->ttl_s, rec->ttl_s);
    } else {
        /* An implicit MX rests on the negative answer "no MX" too. */
        if (status == DNS_OK && q->implicit && q->neg_ttl >= 0)
            dns_min_ttl(&q->ttl, (uint32_t)q->neg_ttl);
        ttl_s = dns_status_cacheable(status) ? dns_cap_ttl(r, status, q->ttl, q->neg_ttl) : 0;
        if (status == DNS_OK || dns_status_cacheable(status)) {
            rec = dns_record_new(status, q->implicit, ttl_s, q->hosts, q->nhosts);
            if (rec == NULL)
                status = DNS_ENOMEM;
        }
    }
    if (rec != NULL && ttl_s > 0) {
        size_t before = dns_cache_size(r->l1);
        if (dns_cache_put(r->l1, q->key, rec, dns_now_ms(r) + (uint64_t)ttl_s * 1000u) == DNS_OK)
            dns_l1_size_changed(r, before);
        if (q->layer == DNS_LAYER_DNS && r->redis != NULL && rclient_connected(r->redis))
            dns_l2_set(r, q->key, rec, ttl_s);
    }
    log_debug("dns", "resolved", "id=%016" PRIx64 " domain=%s layer=%s status=%s ttl=%u",
              q->id, LOG_Q(q->key), dns_layer_name(q->layer), LOG_Q(dns_strerror(status)), ttl_s);
    dns_ask_t *a;
    while ((a = TAILQ_FIRST(&q->asks)) != NULL) {
        TAILQ_REMOVE(&q->asks, a, link);
        dns_ask_answer(r, a, rec, status, q->layer, ttl_s);
    }
    dns_record_unref(rec);
    dns_query_free(q);
}

/* Run the callback of one answered ask and free it. */
static void dns_ask_deliver(dns_resolver_t *r, dns_ask_t *a)
{
    htable_remove(&r->asks, &a->node); /* a dns_cancel() of this id is now harmless */
    dns_mx_host_t hosts[DNS_MAX_HOSTS];
    dns_mx_result_t res = { .status = a->status, .layer = a->layer, .ttl_s = a->ttl_s,
                            .name = a->has_name ? a->name : NULL };
    if (a->rec != NULL)
        res.implicit = a->rec->implicit;
    if (a->rec != NULL && a->rec->status == DNS_OK) {
        /* Cached hosts are stored sorted; every answer gets its own
         * shuffle among equal preferences so that they share the load. */
        res.nhosts = a->rec->nhosts;
        memcpy(hosts, a->rec->hosts, res.nhosts * sizeof(*hosts));
        r->seed += 0x9e3779b97f4a7c15ull;
        dns_sort_mx(hosts, res.nhosts, r->seed);
        res.hosts = hosts;
    }
    if (a->layer < DNS_LAYER_LAST)
        r->st.lookups[a->layer]++;
    if (r->on_event != NULL) {
        dns_event_t ev = { .kind = DNS_EV_LOOKUP, .layer = a->layer, .status = a->status,
                           .latency_us = dns_mono_us() - a->t0_us };
        dns_emit(r, &ev);
    }
    a->cb(a->arg, &res);
    dns_ask_free(a);
}

/* Run the callbacks of completed queries. Must be the last thing its
 * caller does: r may be released on the way out. */
static void dns_dispatch(dns_resolver_t *r)
{
    r->dispatching++;
    while (!r->free_pending) {
        if (!TAILQ_EMPTY(&r->done)) {
            dns_query_t *q = TAILQ_FIRST(&r->done);
            dns_done_unlink(r, q);
            dns_flight_finish(r, q);
        } else if (!TAILQ_EMPTY(&r->adone)) {
            dns_ask_t *a = TAILQ_FIRST(&r->adone);
            TAILQ_REMOVE(&r->adone, a, link);
            dns_ask_deliver(r, a);
        } else {
            break;
        }
    }
    r->dispatching--;
    if (r->dispatching == 0 && r->free_pending) {
        dns_resolver_release(r);
        return;
    }
    if (TAILQ_EMPTY(&r->done) && TAILQ_EMPTY(&r->adone))
        loop_timer_cancel(r->loop, &r->defer_timer);
    if (r->inflight == 0 && !r->freeing)
        dns_arm_ares_timer(r, 1);
}

static void dns_on_fd(loop_t *loop, int fd, unsigned events, void *arg)
{
    dns_resolver_t *r = arg;
    /* An error is handed over as readable: c-ares learns it from recv()
     * and moves on to the next server or try. */
    ares_socket_t rfd = (events & (LOOP_READ | LOOP_ERROR)) ? fd : ARES_SOCKET_BAD;
    ares_socket_t wfd = (events & LOOP_WRITE) ? fd : ARES_SOCKET_BAD;
    ares_process_fd(r->ch, rfd, wfd);
    dns_arm_ares_timer(r, 0);
    dns_dispatch(r);
}

static void dns_on_ares_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    dns_resolver_t *r = arg;
    ares_process_fd(r->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    dns_arm_ares_timer(r, 1);
    dns_dispatch(r);
}

static void dns_on_defer(loop_t *loop, loop_timer_t *t, void *arg)
{
    dns_resolver_t *r = arg;
    dns_dispatch(r);
}

static void dns_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    dns_resolver_t *r = data;
    unsigned mask = (readable ? LOOP_READ : 0u) | (writable ? LOOP_WRITE : 0u);
    if (mask == 0) {
        loop_fd_del(r->loop, fd); /* c-ares closes it next */
        return;
    }
    /* c-ares does not say whether the socket is new: mod fails for an
     * unknown fd, and then it is one. */
    if (loop_fd_mod(r->loop, fd, mask) == 0)
        return;
    if (loop_fd_add(r->loop, fd, mask, dns_on_fd, r) < 0)
        log_warn("dns", "watch_failed", "fd=%d errno=%d", fd, errno);
}

/* ---- public API ---- */

static pthread_once_t dns_lib_once = PTHREAD_ONCE_INIT;
static int dns_lib_status = ARES_SUCCESS;

/* ares_library_init() is not thread-safe in 1.18 and workers create their
 * resolvers concurrently. It is never undone: it holds nothing on this
 * platform and the process lives as long as any resolver could. */
static void dns_lib_init(void)
{
    dns_lib_status = ares_library_init(ARES_LIB_INIT_ALL);
}


static void dns_resolver_destroy(dns_resolver_t *r)
{
    if (r->ch != NULL)
        ares_destroy(r->ch);
    dns_cache_free(r->l1);
    htable_fini(&r->flights);
    htable_fini(&r->asks);
    htable_fini(&r->names);
    free(r->l2_prefix);
    free(r);
}

dns_resolver_t *dns_resolver_new(loop_t *loop, const dns_config_t *cfg, char *err, size_t errlen)
{
    pthread_once(&dns_lib_once, dns_lib_init);
    if (dns_lib_status != ARES_SUCCESS) {
        util_seterr(err, errlen, "dns: ares_library_init: %s", ares_strerror(dns_lib_status));
        return NULL;
    }
    dns_resolver_t *r = dns_calloc(1, sizeof(*r));
    if (r == NULL) {
        util_seterr(err, errlen, "dns: out of memory");
        return NULL;
    }
    r->loop = loop;
    r->next_id = 1;
    TAILQ_INIT(&r->done);
    TAILQ_INIT(&r->adone);
    STAILQ_INIT(&r->wait_addr);
    STAILQ_INIT(&r->wait_mx);
    LIST_INIT(&r->l2ops);
    r->max_ttl_s = cfg && cfg->max_ttl_s ? cfg->max_ttl_s : DNS_DEFAULT_MAX_TTL;
    r->neg_ttl_s = cfg && cfg->negative_ttl_s ? cfg->negative_ttl_s : DNS_DEFAULT_NEG_TTL;
    r->redis = cfg ? cfg->redis : NULL;
    r->on_event = cfg ? cfg->on_event : NULL;
    r->event_arg = cfg ? cfg->event_arg : NULL;
    r->seed = util_rand64();
    const char *prefix = cfg && cfg->l2_prefix ? cfg->l2_prefix : DNS_DEFAULT_L2_PREFIX;
    unsigned l1 = cfg && cfg->l1_entries ? cfg->l1_entries : DNS_DEFAULT_L1;
    /* dns_calloc: an allocation failure is reported, not an abort */
    if (htable_init(&r->flights, HTABLE_U64, DNS_BUCKETS_MIN, dns_calloc) != 0 ||
        htable_init(&r->asks, HTABLE_U64, DNS_BUCKETS_MIN, dns_calloc) != 0 ||
        htable_init(&r->names, HTABLE_STR, DNS_BUCKETS_MIN, dns_calloc) != 0 ||
        (r->l2_prefix = dns_strndup(prefix, strlen(prefix))) == NULL ||
        (r->l1 = dns_cache_new(l1)) == NULL) {
        dns_resolver_destroy(r);
        util_seterr(err, errlen, "dns: out of memory");
        return NULL;
    }
    loop_timer_init(&r->ares_timer, dns_on_ares_timer, r);
    loop_timer_init(&r->defer_timer, dns_on_defer, r);

    struct ares_options o;
    memset(&o, 0, sizeof(o));
    /* NOSEARCH: mail domains are absolute; a search list would turn a
     * typo into a lookup inside our own domain. NOALIASES: no
     * HOSTALIASES file from the environment. lookups "b": DNS only,
     * never /etc/hosts. */
    o.flags = ARES_FLAG_NOSEARCH | ARES_FLAG_NOALIASES;
    r->timeout_ms = cfg && cfg->timeout_ms ? cfg->timeout_ms : DNS_DEFAULT_TIMEOUT_MS;
    o.timeout = (int)r->timeout_ms;
    o.tries = (int)(cfg && cfg->tries ? cfg->tries : DNS_DEFAULT_TRIES);
    o.lookups = (char *)"b";
    o.sock_state_cb = dns_sock_state;
    o.sock_state_cb_data = r;
    int mask = ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_LOOKUPS |
               ARES_OPT_SOCK_STATE_CB;
    int st = ares_init_options(&r->ch, &o, mask);
    if (st != ARES_SUCCESS) {
        util_seterr(err, errlen, "dns: ares_init_options: %s", ares_strerror(st));
        r->ch = NULL;
        dns_resolver_destroy(r);
        return NULL;
    }
    if (cfg && cfg->servers && cfg->servers[0] != '\0') {
        st = ares_set_servers_ports_csv(r->ch, cfg->servers);
        if (st != ARES_SUCCESS) {
            util_seterr(err, errlen, "dns: servers \"%s\": %s (want ip:port,ip:port)",
                       cfg->servers, ares_strerror(st));
            dns_resolver_destroy(r);
            return NULL;
        }
    }
    return r;
}

/* A new flight for key, with its first ask. NULL on OOM. */
static dns_query_t *dns_flight_new(dns_resolver_t *r, const char *key)
{
    dns_query_t *q = dns_calloc(1, sizeof(*q));
    if (q == NULL)
        return NULL;
    size_t len = strlen(key);
    if ((q->key = dns_strndup(key, len)) == NULL || (q->domain = dns_strndup(key, len)) == NULL) {
        free(q->key);
        free(q);
        return NULL;
    }
    q->id = r->next_id++;
    q->ttl = UINT32_MAX;
    q->neg_ttl = -1;
    q->layer = DNS_LAYER_DNS;
    TAILQ_INIT(&q->asks);
    htable_insert_u64(&r->flights, &q->node, q->id);
    htable_insert_str(&r->names, &q->nnode, q->key);
    return q;
}

uint64_t dns_mx_query(dns_resolver_t *r, const char *domain, dns_mx_cb cb, void *arg)
{
    char key[DNS_NAME_MAX];
    int nst = (r->freeing || r->free_pending) ? DNS_ECANCELLED : dns_name_normalize(domain, key);
    size_t klen = nst == DNS_OK ? strlen(key) : 0;
    dns_ask_t *a = dns_malloc(sizeof(*a) + klen + 1);
    if (a == NULL)
        return 0;
    memset(a, 0, sizeof(*a));
    a->id = r->next_id++;
    a->cb = cb;
    a->arg = arg;
    a->t0_us = r->on_event != NULL ? dns_mono_us() : 0;
    a->has_name = nst == DNS_OK;
    memcpy(a->name, key, klen);
    a->name[klen] = '\0';
    htable_insert_u64(&r->asks, &a->node, a->id);
    if (nst != DNS_OK) {
        dns_ask_answer(r, a, NULL, nst, DNS_LAYER_NONE, 0);
        return a->id;
    }

    /* L1 */
    uint64_t now = dns_now_ms(r), expires = 0;
    size_t before = dns_cache_size(r->l1);
    dns_record_t *rec = dns_cache_get(r->l1, key, now, &expires);
    dns_l1_size_changed(r, before); /* an expired entry may have gone */
    if (rec != NULL) {
        dns_ask_answer(r, a, rec, rec->status, DNS_LAYER_L1, (unsigned)((expires - now + 999u) / 1000u));
        return a->id;
    }

    /* single flight */
    dns_query_t *q = dns_names_find(r, key);
    if (q != NULL) {
        r->st.coalesced++;
        a->qid = q->id;
        TAILQ_INSERT_TAIL(&q->asks, a, link);
        return a->id;
    }
    if ((q = dns_flight_new(r, key)) == NULL) {
        dns_ask_answer(r, a, NULL, DNS_ENOMEM, DNS_LAYER_NONE, 0);
        return a->id;
    }
    a->qid = q->id;
    TAILQ_INSERT_TAIL(&q->asks, a, link);

    /* Our own hold: whatever c-ares or rclient report synchronously
     * below, the flight completes no earlier than the release at the
     * end, and even then only onto the done list, which the loop drains. */
    q->pending = 1;
    if (r->redis == NULL || !rclient_connected(r->redis) || dns_l2_get(r, q) != 0)
        dns_lookup(r, q, T_MX, 0);
    dns_query_release(r, q);
    if (!r->freeing)
        dns_arm_ares_timer(r, 0);
    return a->id;
}

void dns_cancel(dns_resolver_t *r, uint64_t id)
{
    htable_node_t *n = r != NULL ? htable_find_u64(&r->asks, id) : NULL;
    if (n == NULL)
        return;
    dns_ask_t *a = HTABLE_ENTRY(n, dns_ask_t, node);
    htable_remove(&r->asks, &a->node);
    if (a->qid != 0) {
        /* The flight goes on: its answer still fills the caches. */
        dns_query_t *q = dns_flight_find(r, a->qid);
        if (q != NULL)
            TAILQ_REMOVE(&q->asks, a, link);
    } else {
        TAILQ_REMOVE(&r->adone, a, link);
    }
    dns_ask_free(a);
    if (TAILQ_EMPTY(&r->done) && TAILQ_EMPTY(&r->adone))
        loop_timer_cancel(r->loop, &r->defer_timer);
}

void dns_resolver_stats(const dns_resolver_t *r, dns_stats_t *out)
{
    *out = r->st;
    out->l1_size = dns_cache_size(r->l1);
    out->l1_evictions = dns_cache_evictions(r->l1);
    out->l2_inflight = 0;
    const dns_l2op_t *op;
    LIST_FOREACH(op, &r->l2ops, link)
        out->l2_inflight++;
}

void dns_resolver_test_advance(dns_resolver_t *r, uint64_t ms)
{
    r->skew_ms += ms;
}

/* The real teardown, outside any callback. */
static void dns_resolver_release(dns_resolver_t *r)
{
    r->freeing = 1;
    r->free_pending = 0;
    loop_timer_cancel(r->loop, &r->ares_timer);
    loop_timer_cancel(r->loop, &r->defer_timer);
    /* Redis commands: their callbacks must not fire into freed memory. */
    dns_l2op_t *op;
    while ((op = LIST_FIRST(&r->l2ops)) != NULL) {
        LIST_REMOVE(op, link);
        rclient_cancel(r->redis, op->rcid);
        free(op);
    }
    /* Fires every outstanding lookup with ARES_EDESTRUCTION (each frees
     * its dns_req_t) and reports each socket closed, which removes it
     * from the loop. */
    ares_destroy(r->ch);
    r->ch = NULL;
    dns_fifo_clear(&r->wait_addr);
    dns_fifo_clear(&r->wait_mx);

    /* Flights go; their asks join the answered ones, and every ask gets
     * DNS_ECANCELLED. Callbacks may start (they get ECANCELLED too) or
     * cancel queries. */
    while (!TAILQ_EMPTY(&r->done))
        dns_done_unlink(r, TAILQ_FIRST(&r->done));
    htable_iter_t it;
    htable_iter_init(&it, &r->flights);
    for (htable_node_t *n; (n = htable_iter_next(&it)) != NULL;) {
        dns_query_t *q = HTABLE_ENTRY(n, dns_query_t, node);
        htable_remove(&r->flights, &q->node);
        htable_remove(&r->names, &q->nnode);
        dns_ask_t *a;
        while ((a = TAILQ_FIRST(&q->asks)) != NULL) {
            TAILQ_REMOVE(&q->asks, a, link);
            a->qid = 0;
            TAILQ_INSERT_TAIL(&r->adone, a, link);
        }
        dns_query_free(q); /* no callback: the iterator stays valid */
    }
    r->dispatching++;
    dns_ask_t *a;
    while ((a = TAILQ_FIRST(&r->adone)) != NULL) {
        TAILQ_REMOVE(&r->adone, a, link);
        htable_remove(&r->asks, &a->node);
        dns_mx_result_t res = { .status = DNS_ECANCELLED, .layer = DNS_LAYER_NONE };
        a->cb(a->arg, &res);
        dns_ask_free(a);
    }
    loop_timer_cancel(r->loop, &r->defer_timer); /* armed by queries started above */
    size_t l1 = dns_cache_size(r->l1);
    if (l1 > 0) {
        dns_event_t ev = { .kind = DNS_EV_L1_SIZE, .l1_delta = -(long)l1 };
        dns_emit(r, &ev);
    }
    dns_resolver_destroy(r);
}

void dns_resolver_free(dns_resolver_t *r)
{
    if (r == NULL || r->freeing)
        return;
    if (r->dispatching > 0) {
        r->free_pending = 1;
        return;
    }
    dns_resolver_release(r);
}

/*
 * SUMMARY
 *  dns/resolver.c - MX, then A/AAAA, with c-ares inside the worker's loop.
 * DESCRIPTION
 *  One c-ares channel per resolver (per worker thread). c-ares 1.18 has no
 *  event thread and no ares_process_fds, so the channel is driven the way
 *  STYLE §8 describes:
 *   - ARES_OPT_SOCK_STATE_CB adds, modifies and removes c-ares' sockets in
 *     the loop;
 *   - a readiness event calls ares_process_fd() for that socket;
 *   - one loop timer, kept due no later than ares_timeout() says, calls
 *     ares_process_fd(ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD) so that
 *     timeouts and retries run even when no socket is readable.
 *
 *  A query walks two stages: the MX lookup, then one A and one AAAA lookup
 *  per MX host (or for the domain itself when it has no MX: the implicit
 *  MX of RFC 5321 §5.1). It completes when its count of outstanding
 *  lookups drops to zero; it is then queued on the done list.
 *
 *  At most DNS_MAX_INFLIGHT lookups are in c-ares at once; the others wait
 *  in two FIFOs, address lookups (which finish queries under way) ahead
 *  of MX lookups (which start new ones).
 *
 *  Ownership and re-entrancy (STYLE §4):
 *   - Every c-ares lookup carries a small dns_req_t naming its query by
 *     64-bit id, never by pointer. The reply looks the id up in the wait
 *     table; a cancelled query is simply gone and the reply is dropped.
 *   - c-ares callbacks only record results and start further lookups.
 *     User callbacks run only from dns_dispatch(), which is reached from
 *     the loop (fd event, c-ares timer, or the zero "defer" timer), never
 *     from inside c-ares nor from dns_mx_query(). So a user callback may
 *     start or cancel queries or free the resolver, and the channel is
 *     never destroyed inside a c-ares callback.
 *   - dns_resolver_free() from inside a user callback only sets
 *     free_pending; dns_dispatch() releases once the callback returned.
 * DIAGNOSTICS
 *  dns_resolver_new() fills err. Query outcomes go to the callback as a
 *  dns_status_t; a socket the loop refuses to watch is logged (its lookups
 *  then end by timeout).
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

#include "core/log.h"
#include "core/util.h"
#include "dns/mx.h"

#define DNS_DEFAULT_TIMEOUT_MS 2000u
#define DNS_DEFAULT_TRIES      2u
#define DNS_BUCKETS_MIN        64u
/* Lookups handed to c-ares at once, per resolver. A burst of a few
 * hundred UDP queries overflows the socket buffers of a local resolver
 * (dnsmasq drops them: UdpRcvbufErrors), and every dropped one costs a
 * full timeout; beyond this the rest wait in FIFOs. */
#define DNS_MAX_INFLIGHT       128u

/* Address lookups of one host; parallel to dns_query_t.hosts. */
typedef struct dns_qhost {
    struct in_addr       *v4;
    size_t                n4;
    struct ares_in6_addr *v6;
    size_t                n6;
    int                   st4, st6; /* dns_status_t of the A and AAAA lookups */
} dns_qhost_t;

typedef struct dns_query {
    uint64_t          id;
    struct dns_query *hnext;        /* wait table chain */
    struct dns_query *dprev, *dnext; /* done list, when on_done */
    int               on_done;
    dns_mx_cb         cb;
    void             *arg;
    char             *domain;       /* without the final dot */
    int               status;       /* first error that decides the outcome */
    int               addr_stage;   /* MX stage done, address lookups started */
    int               implicit;
    size_t            pending;      /* outstanding c-ares lookups, plus holds */
    dns_mx_host_t    *hosts;
    size_t            nhosts;
    dns_qhost_t      *qh;
} dns_query_t;

/* The argument of one c-ares lookup. */
typedef struct dns_req {
    dns_resolver_t *r;
    uint64_t        qid;
    size_t          host; /* index into hosts; unused for MX */
    int             type; /* T_MX, T_A or T_AAAA */
    struct dns_req *next; /* while waiting in a dns_fifo_t */
} dns_req_t;

typedef struct dns_fifo {
    dns_req_t *head, *tail;
} dns_fifo_t;

struct dns_resolver {
    loop_t        *loop;
    ares_channel   ch;
    loop_timer_t   ares_timer;  /* ares_timeout() cap */
    loop_timer_t   defer_timer; /* zero delay: run callbacks outside dns_mx_query */
    dns_query_t  **buckets;     /* wait table: id -> query */
    size_t         nbuckets;    /* power of two */
    size_t         nqueries;
    dns_query_t   *done_head, *done_tail;
    dns_fifo_t     wait_addr;   /* lookups not yet handed to c-ares: */
    dns_fifo_t     wait_mx;     /*  address ones go first */
    size_t         inflight;    /* lookups handed to c-ares, not yet answered */
    int            pumping;
    uint64_t       next_id;
    unsigned       timeout_ms;  /* per try, as given to c-ares */
    unsigned       dispatching; /* depth of user callbacks on the stack */
    int            free_pending;
    int            freeing;
};

static void dns_on_mx_reply(void *arg, int status, int timeouts, unsigned char *abuf, int alen);
static void dns_on_addr_reply(void *arg, int status, int timeouts, unsigned char *abuf, int alen);

/* ---- wait table ---- */

static size_t dns_bucket(const dns_resolver_t *r, uint64_t id)
{
    /* ids are sequential, so the low bits already spread well */
    return (size_t)(id & (r->nbuckets - 1));
}

static dns_query_t *dns_table_find(const dns_resolver_t *r, uint64_t id)
{
    for (dns_query_t *q = r->buckets[dns_bucket(r, id)]; q != NULL; q = q->hnext)
        if (q->id == id)
            return q;
    return NULL;
}

static void dns_table_grow(dns_resolver_t *r)
{
    size_t n = r->nbuckets * 2;
    dns_query_t **b = dns_calloc(n, sizeof(*b));
    if (b == NULL)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < r->nbuckets; i++) {
        dns_query_t *q = r->buckets[i];
        while (q != NULL) {
            dns_query_t *next = q->hnext;
            size_t k = (size_t)(q->id & (n - 1));
            q->hnext = b[k];
            b[k] = q;
            q = next;
        }
    }
    free(r->buckets);
    r->buckets = b;
    r->nbuckets = n;
}

static void dns_table_insert(dns_resolver_t *r, dns_query_t *q)
{
    if (r->nqueries >= r->nbuckets * 2)
        dns_table_grow(r);
    size_t k = dns_bucket(r, q->id);
    q->hnext = r->buckets[k];
    r->buckets[k] = q;
    r->nqueries++;
}

static void dns_table_remove(dns_resolver_t *r, dns_query_t *q)
{
    dns_query_t **pp = &r->buckets[dns_bucket(r, q->id)];
    while (*pp != NULL && *pp != q)
        pp = &(*pp)->hnext;
    if (*pp == q) {
        *pp = q->hnext;
        q->hnext = NULL;
        r->nqueries--;
    }
}

/* ---- done list ---- */

static void dns_done_append(dns_resolver_t *r, dns_query_t *q)
{
    q->on_done = 1;
    q->dnext = NULL;
    q->dprev = r->done_tail;
    if (r->done_tail != NULL)
        r->done_tail->dnext = q;
    else
        r->done_head = q;
    r->done_tail = q;
}

static void dns_done_unlink(dns_resolver_t *r, dns_query_t *q)
{
    if (!q->on_done)
        return;
    if (q->dprev != NULL)
        q->dprev->dnext = q->dnext;
    else
        r->done_head = q->dnext;
    if (q->dnext != NULL)
        q->dnext->dprev = q->dprev;
    else
        r->done_tail = q->dprev;
    q->dprev = q->dnext = NULL;
    q->on_done = 0;
}

/* ---- queries ---- */

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

/* All address lookups are in: keep the hosts that have an address, in
 * their sorted order, and decide the status when none has one. */
static int dns_query_collect(dns_query_t *q)
{
    size_t kept = 0;
    int transient = DNS_OK, nxdomain = 0;
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
            free(q->hosts[i].name);
            q->hosts[i].name = NULL;
            continue;
        }
        dns_mx_host_t *out = &q->hosts[i];
        for (size_t j = 0; j < h->n4; j++)
            dns_sockaddr_v4(&out->addrs[out->naddrs++], &h->v4[j]);
        for (size_t j = 0; j < h->n6; j++)
            dns_sockaddr_v6(&out->addrs[out->naddrs++], &h->v6[j]);
        q->hosts[kept++] = *out;
    }
    for (size_t i = 0; i < q->nhosts; i++) {
        free(q->qh[i].v4);
        free(q->qh[i].v6);
    }
    free(q->qh);
    q->qh = NULL;
    q->nhosts = kept;
    if (kept > 0)
        return DNS_OK;
    if (transient != DNS_OK)
        return transient;
    /* Implicit MX: the MX lookup said the name exists with no MX, yet its
     * address lookup says it does not exist (it was just removed). */
    if (q->implicit && nxdomain)
        return DNS_NXDOMAIN;
    return DNS_NOADDR;
}

/* Drop one outstanding lookup (or hold); at zero the query is complete
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
    if (!loop_timer_active(&r->defer_timer))
        loop_timer_set(r->loop, &r->defer_timer, 0);
}

static void dns_fifo_push(dns_fifo_t *f, dns_req_t *req)
{
    req->next = NULL;
    if (f->tail != NULL)
        f->tail->next = req;
    else
        f->head = req;
    f->tail = req;
}

static dns_req_t *dns_fifo_pop(dns_fifo_t *f)
{
    dns_req_t *req = f->head;
    if (req != NULL) {
        f->head = req->next;
        if (f->head == NULL)
            f->tail = NULL;
    }
    return req;
}

static void dns_fifo_clear(dns_fifo_t *f)
{
    dns_req_t *req;
    while ((req = dns_fifo_pop(f)) != NULL)
        free(req);
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
        dns_query_t *q = dns_table_find(r, req->qid);
        if (q == NULL) { /* cancelled while waiting */
            free(req);
            continue;
        }
        const char *name = req->type == T_MX ? q->domain : q->hosts[req->host].name;
        r->inflight++;
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
    dns_fifo_push(type == T_MX ? &r->wait_mx : &r->wait_addr, req);
    /* c-ares may call back synchronously (bad name, out of memory): the
     * callers hold a reference, so q cannot complete in the middle of a
     * loop over its hosts. */
    dns_pump(r);
}

static void dns_start_addrs(dns_resolver_t *r, dns_query_t *q)
{
    q->qh = dns_calloc(q->nhosts, sizeof(*q->qh));
    if (q->qh == NULL) {
        q->status = DNS_ENOMEM;
        return;
    }
    q->addr_stage = 1;
    for (size_t i = 0; i < q->nhosts; i++) {
        q->qh[i].st4 = q->qh[i].st6 = DNS_OK;
        dns_lookup(r, q, T_A, i);
        dns_lookup(r, q, T_AAAA, i);
    }
}

/* No MX record: the domain itself is the only host (RFC 5321 §5.1). */
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
    dns_start_addrs(r, q);
}

static int dns_is_root(const char *host)
{
    return host[0] == '\0' || (host[0] == '.' && host[1] == '\0');
}

/* Turn the MX RRset into q->hosts: null MX check, sort, de-duplicate, cap. */
static int dns_take_mx(dns_query_t *q, const struct ares_mx_reply *mx)
{
    size_t n = 0;
    for (const struct ares_mx_reply *m = mx; m != NULL; m = m->next) {
        /* RFC 7505: "0 ." says the domain accepts no mail. It must stand
         * alone; if a zone lists other MX besides, the explicit refusal
         * still wins (§4.1: clients MUST NOT deliver). */
        if (m->priority == 0 && dns_is_root(m->host))
            return DNS_NULLMX;
        n++;
    }
    dns_mx_host_t *all = dns_calloc(n, sizeof(*all));
    if (all == NULL)
        return DNS_ENOMEM;
    size_t i = 0;
    for (const struct ares_mx_reply *m = mx; m != NULL; m = m->next, i++) {
        all[i].name = m->host; /* borrowed until the copy below */
        all[i].pref = m->priority;
    }
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
    return dns_table_find(copy->r, copy->qid); /* NULL: cancelled meanwhile */
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

    if (status == ARES_SUCCESS) {
        struct ares_mx_reply *mx = NULL;
        status = ares_parse_mx_reply(abuf, alen, &mx);
        if (status == ARES_SUCCESS) {
            q->status = dns_take_mx(q, mx);
            if (q->status == DNS_OK)
                dns_start_addrs(r, q);
        }
        if (mx != NULL)
            ares_free_data(mx);
    }
    if (status == ARES_ENODATA)
        dns_use_implicit(r, q); /* NOERROR without MX, or only a CNAME */
    else if (status != ARES_SUCCESS)
        q->status = dns_status_from_ares(status);

    log_debug("dns", "mx_reply", "id=%016" PRIx64 " domain=%s ares=%s hosts=%zu implicit=%d",
              q->id, q->domain, ares_strerror(status), q->nhosts, q->implicit);
    dns_query_release(r, q); /* the MX lookup's reference */
    dns_pump(r);
}

/* Copy the addresses of an A/AAAA answer into the host's lookup state. */
static int dns_take_addrs(dns_qhost_t *h, int type, const unsigned char *abuf, int alen)
{
    int n = DNS_MAX_ADDRS, st;
    if (type == T_A) {
        struct ares_addrttl ttl[DNS_MAX_ADDRS];
        st = ares_parse_a_reply(abuf, alen, NULL, ttl, &n);
        if (st != ARES_SUCCESS)
            return dns_status_from_ares(st);
        if (n == 0)
            return DNS_NOADDR;
        h->v4 = dns_calloc((size_t)n, sizeof(*h->v4));
        if (h->v4 == NULL)
            return DNS_ENOMEM;
        for (int i = 0; i < n; i++)
            h->v4[i] = ttl[i].ipaddr;
        h->n4 = (size_t)n;
    } else {
        struct ares_addr6ttl ttl[DNS_MAX_ADDRS];
        st = ares_parse_aaaa_reply(abuf, alen, NULL, ttl, &n);
        if (st != ARES_SUCCESS)
            return dns_status_from_ares(st);
        if (n == 0)
            return DNS_NOADDR;
        h->v6 = dns_calloc((size_t)n, sizeof(*h->v6));
        if (h->v6 == NULL)
            return DNS_ENOMEM;
        for (int i = 0; i < n; i++)
            h->v6[i] = ttl[i].ip6addr;
        h->n6 = (size_t)n;
    }
    return DNS_OK;
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
    int st = status == ARES_SUCCESS ? dns_take_addrs(h, req.type, abuf, alen)
                                    : dns_status_from_ares(status);
    if (req.type == T_A)
        h->st4 = st;
    else
        h->st6 = st;
    log_debug("dns", "addr_reply", "id=%016" PRIx64 " host=%s type=%s status=%s",
              q->id, q->hosts[req.host].name, req.type == T_A ? "A" : "AAAA", dns_strerror(st));
    dns_query_release(r, q);
    dns_pump(r);
}

/* ---- loop glue ---- */

/* Keep the c-ares timer due no later than c-ares' next deadline.
 * ares_timeout() walks every outstanding lookup (O(n) in 1.18), so it is
 * not asked after every event: a lookup sent since the timer was armed
 * expires no sooner than timeout_ms from now (c-ares only doubles that
 * per round), so a timer already due before then still covers it. Firing
 * early costs one empty pass and an exact re-arm. Exact when asked, and
 * when no query of ours is left, so that an idle loop goes empty. */
static void dns_arm_ares_timer(dns_resolver_t *r, int exact)
{
    if (!exact && r->nqueries > 0 && loop_timer_active(&r->ares_timer) &&
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

/* Run the callbacks of completed queries. Must be the last thing its
 * caller does: r may be released on the way out. */
static void dns_dispatch(dns_resolver_t *r)
{
    r->dispatching++;
    while (r->done_head != NULL && !r->free_pending) {
        dns_query_t *q = r->done_head;
        dns_done_unlink(r, q);
        dns_table_remove(r, q); /* a dns_cancel() of this id is now harmless */
        dns_mx_result_t res = { .status = q->status, .implicit = q->implicit,
                                .hosts = q->nhosts ? q->hosts : NULL, .nhosts = q->nhosts };
        log_debug("dns", "mx_done", "id=%016" PRIx64 " domain=%s status=%s hosts=%zu implicit=%d",
                  q->id, q->domain ? q->domain : "-", dns_strerror(q->status), q->nhosts, q->implicit);
        q->cb(q->arg, &res);
        dns_query_free(q);
    }
    r->dispatching--;
    if (r->dispatching == 0 && r->free_pending) {
        dns_resolver_release(r);
        return;
    }
    if (r->done_head == NULL)
        loop_timer_cancel(r->loop, &r->defer_timer);
    if (r->nqueries == 0 && !r->freeing)
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
    dns_dispatch(arg);
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

static void dns_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void dns_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

dns_resolver_t *dns_resolver_new(loop_t *loop, const dns_config_t *cfg, char *err, size_t errlen)
{
    pthread_once(&dns_lib_once, dns_lib_init);
    if (dns_lib_status != ARES_SUCCESS) {
        dns_seterr(err, errlen, "dns: ares_library_init: %s", ares_strerror(dns_lib_status));
        return NULL;
    }
    dns_resolver_t *r = dns_calloc(1, sizeof(*r));
    if (r == NULL || (r->buckets = dns_calloc(DNS_BUCKETS_MIN, sizeof(*r->buckets))) == NULL) {
        free(r);
        dns_seterr(err, errlen, "dns: out of memory");
        return NULL;
    }
    r->loop = loop;
    r->nbuckets = DNS_BUCKETS_MIN;
    r->next_id = 1;
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
        dns_seterr(err, errlen, "dns: ares_init_options: %s", ares_strerror(st));
        free(r->buckets);
        free(r);
        return NULL;
    }
    if (cfg && cfg->servers && cfg->servers[0] != '\0') {
        st = ares_set_servers_ports_csv(r->ch, cfg->servers);
        if (st != ARES_SUCCESS) {
            dns_seterr(err, errlen, "dns: servers \"%s\": %s (want ip:port,ip:port)",
                       cfg->servers, ares_strerror(st));
            ares_destroy(r->ch);
            free(r->buckets);
            free(r);
            return NULL;
        }
    }
    return r;
}

uint64_t dns_mx_query(dns_resolver_t *r, const char *domain, dns_mx_cb cb, void *arg)
{
    dns_query_t *q = dns_calloc(1, sizeof(*q));
    if (q == NULL)
        return 0;
    q->id = r->next_id++;
    q->cb = cb;
    q->arg = arg;
    dns_table_insert(r, q);

    /* Our own hold: whatever c-ares reports synchronously below, the
     * query completes no earlier than the release at the end, and even
     * then only onto the done list, which the loop drains. */
    q->pending = 1;
    size_t len = dns_name_check(domain);
    if (r->freeing || r->free_pending)
        q->status = DNS_ECANCELLED;
    else if (len == 0)
        q->status = DNS_EBADNAME;
    else if ((q->domain = dns_strndup(domain, len)) == NULL)
        q->status = DNS_ENOMEM;
    else
        dns_lookup(r, q, T_MX, 0);
    dns_query_release(r, q);
    if (!r->freeing)
        dns_arm_ares_timer(r, 0);
    return q->id;
}

void dns_cancel(dns_resolver_t *r, uint64_t id)
{
    dns_query_t *q = r != NULL ? dns_table_find(r, id) : NULL;
    if (q == NULL)
        return;
    /* Its c-ares lookups stay in flight; their replies no longer find
     * the id and are dropped. */
    dns_done_unlink(r, q);
    dns_table_remove(r, q);
    dns_query_free(q);
    if (r->done_head == NULL)
        loop_timer_cancel(r->loop, &r->defer_timer);
    if (r->nqueries == 0 && !r->freeing)
        dns_arm_ares_timer(r, 1);
}

/* The real teardown, outside any callback. */
static void dns_resolver_release(dns_resolver_t *r)
{
    r->freeing = 1;
    r->free_pending = 0;
    loop_timer_cancel(r->loop, &r->ares_timer);
    loop_timer_cancel(r->loop, &r->defer_timer);
    /* Fires every outstanding lookup with ARES_EDESTRUCTION (each frees
     * its dns_req_t) and reports each socket closed, which removes it
     * from the loop. */
    ares_destroy(r->ch);
    r->ch = NULL;
    dns_fifo_clear(&r->wait_addr);
    dns_fifo_clear(&r->wait_mx);

    /* Callbacks may start (they get ECANCELLED too) or cancel queries. */
    r->dispatching++;
    while (r->nqueries > 0) {
        for (size_t i = 0; i < r->nbuckets; i++) {
            dns_query_t *q;
            while ((q = r->buckets[i]) != NULL) {
                dns_done_unlink(r, q);
                dns_table_remove(r, q);
                dns_mx_result_t res = { .status = DNS_ECANCELLED };
                q->cb(q->arg, &res);
                dns_query_free(q);
            }
        }
    }
    loop_timer_cancel(r->loop, &r->defer_timer); /* armed by queries started above */
    free(r->buckets);
    free(r);
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

/*
 * tests/support/fakedns.h - an in-process fake DNS server for unit tests.
 *
 * A UDP socket on 127.0.0.1 with an ephemeral port, served from the test's
 * own loop (as c-ares' own test suite does), answering from a zone the test
 * gives as a table. Every outcome is deterministic: records, NXDOMAIN for
 * names the zone does not hold, an rcode or silence for chosen names, CNAME
 * chains chased or not, A/AAAA records in the additional section, and an
 * SOA in negative answers (RFC 2308) when the test asks for one.
 *
 * Answers echo the question's id, name and RD bit, with QR, AA and RA set.
 * Records owned by the question's name are written with a pointer to the
 * question (so they carry its spelling); any other owner name in full.
 *
 * Not thread-safe: everything runs in the thread of the loop it serves.
 * The fakedns_t belongs to the caller (usually inside a test fixture); the
 * zone table is borrowed and must outlive the server (a static table).
 */
#ifndef MP_TESTS_FAKEDNS_H
#define MP_TESTS_FAKEDNS_H

#include <stddef.h>
#include <stdint.h>

#include "core/loop.h"

/* rcode of a type-0 row that makes the server never answer the name */
#define FAKEDNS_DROP (-1)

/* fakedns_rr_t.flags */
#define FAKEDNS_CHASE      0x1u /* CNAME: the answer goes on with the target's records */
#define FAKEDNS_ADDITIONAL 0x2u /* MX: the answer carries the target's A and AAAA as additional */

/* One row of a zone. Names match case-insensitively; a name exists when
 * any row has it (a TXT row just makes it exist: other types get NODATA).
 * A CNAME without FAKEDNS_CHASE ends the answer: the resolver has to ask
 * again for the target. Chains are chased for at most four hops. */
typedef struct fakedns_rr {
    const char *name;
    int         type;  /* T_MX, T_A, T_AAAA, T_CNAME, T_TXT; 0: every query for name gets rcode */
    int         rcode; /* type 0 only: ns_r_nxdomain, ns_r_servfail, ..., or FAKEDNS_DROP */
    unsigned    ttl;   /* seconds */
    unsigned    pref;  /* MX only */
    const char *data;  /* MX or CNAME target ("" is the root), address text, TXT text (NULL: empty) */
    unsigned    flags; /* FAKEDNS_CHASE, FAKEDNS_ADDITIONAL */
} fakedns_rr_t;

typedef struct fakedns {
    /* The SOA (owner "test", MINIMUM soa_min) in the authority section of
     * NXDOMAIN and NODATA answers when soa_ttl >= 0. Tests may change both
     * at any time; fakedns_init() sets soa_ttl to -1 (no SOA). */
    int soa_ttl, soa_min;

    /* Read-only for the test. */
    uint16_t port;     /* the UDP port on 127.0.0.1 */
    char     addr[32]; /* "127.0.0.1:port", for dns_config_t.servers */
    unsigned nqueries; /* datagrams received, answered or not */
    unsigned nmx, na;  /* questions for MX and for A records */

    /* Private. */
    const fakedns_rr_t *zone;
    size_t              nzone;
    loop_t             *loop;
    int                 fd;
} fakedns_t;

/* Set d up to answer from zone (nzone rows), without a socket: enough for
 * fakedns_answer(). Returns 0, or -1 when a row is malformed (say, an
 * address that does not parse); the row is named on stderr. */
int fakedns_init(fakedns_t *d, const fakedns_rr_t *zone, size_t nzone);

/* fakedns_init(), then bind 127.0.0.1 on an ephemeral UDP port and serve
 * it from loop; d->port and d->addr say where. Returns 0, or -1 (errno
 * set) with nothing left open. Pair with fakedns_stop(). */
int fakedns_start(fakedns_t *d, loop_t *loop, const fakedns_rr_t *zone, size_t nzone);

/* Unregister the socket from the loop and close it. Harmless twice. */
void fakedns_stop(fakedns_t *d);

/* The answer to the query q (qlen bytes), written to a (asize bytes).
 * Counts nmx and na (not nqueries: that counts datagrams). Returns its
 * length, or 0 when there is none to send (a FAKEDNS_DROP name, or a query
 * too short to read). An answer larger than asize is a broken test: it
 * aborts. */
size_t fakedns_answer(fakedns_t *d, const unsigned char *q, size_t qlen, unsigned char *a, size_t asize);

/* Write a query for (name, type), id 0x1234, RD clear, to q (qsize bytes).
 * Returns its length, or 0 when the name is malformed or q too small. */
size_t fakedns_query(unsigned char *q, size_t qsize, const char *name, int type);

#endif

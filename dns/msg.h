/*
 * dns/msg.h - the parts of a DNS answer the resolver needs beyond what
 * c-ares' ares_parse_*_reply() give: TTLs of MX records, CNAME chains,
 * the SOA of a negative answer (RFC 2308) and the additional section.
 *
 * A parser that does no I/O (so tests and fuzzers feed it bytes directly):
 * it turns the message into a flat array of records; the helpers below
 * answer questions about it.
 */
#ifndef MP_DNS_MSG_H
#define MP_DNS_MSG_H

#include <stddef.h>
#include <stdint.h>

enum { DNS_SEC_ANSWER = 1, DNS_SEC_AUTHORITY, DNS_SEC_ADDITIONAL };

/* Longest CNAME chain followed, inside one answer and across queries. */
#define DNS_MAX_CNAME 8

typedef struct dns_rr {
    int           section;
    int           type;      /* T_MX, T_CNAME, T_A, T_AAAA, T_SOA; others are skipped */
    uint32_t      ttl;
    char         *name;      /* owner, as received (compare case-insensitively) */
    char         *target;    /* MX exchange or CNAME target */
    unsigned      pref;      /* MX */
    unsigned char addr[16];  /* A (4 octets) or AAAA (16) */
    uint32_t      soa_minimum;
} dns_rr_t;

typedef struct dns_msg {
    int       rcode;
    size_t    nrr;
    dns_rr_t *rr;
} dns_msg_t;

/* Parse abuf. DNS_OK, DNS_TEMPFAIL for a malformed message, DNS_ENOMEM.
 * On any return dns_msg_free() is safe. */
int  dns_msg_parse(const unsigned char *abuf, int alen, dns_msg_t *m);
void dns_msg_free(dns_msg_t *m);

/* Follow CNAMEs in the answer section starting at name. Returns the
 * canonical name (name itself, or a string owned by m), lowers *ttl to
 * the smallest CNAME TTL on the way and counts hops in *hops (stops at
 * DNS_MAX_CNAME, then *hops > DNS_MAX_CNAME). */
const char *dns_msg_chase(const dns_msg_t *m, const char *name, uint32_t *ttl, int *hops);

/* RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) from
 * the SOA in the authority section; -1 when there is none. */
long dns_msg_negative_ttl(const dns_msg_t *m);

#endif

/*
 * dns/idn.h - internationalised names: U-labels to A-labels before any
 * lookup, and addresses whose local part needs SMTPUTF8.
 *
 * Pure functions, no I/O. libidn2 implements IDNA2008 with the UTS #46
 * non-transitional mapping (what browsers and mail clients do), so
 * "Bücher.Example" and "bücher.example" give the same key.
 */
#ifndef MP_DNS_IDN_H
#define MP_DNS_IDN_H

#include <stddef.h>

/* Room for any normalised name (253 octets) and its NUL. */
#define DNS_NAME_MAX 254

/* Normalise a mail domain for lookup and for cache keys: U-labels are
 * converted to A-labels ("xn--..."), ASCII is lower-cased, one final dot
 * is dropped, and the result must pass dns_name_check(). out must hold
 * DNS_NAME_MAX bytes. Returns DNS_OK, DNS_EBADNAME (empty, invalid or
 * not convertible) or DNS_ENOMEM. All-ASCII input never calls libidn2. */
int dns_name_normalize(const char *name, char out[DNS_NAME_MAX]);

/* 1 when the local part of addr (everything before its last '@') holds a
 * non-ASCII octet, so the message can only go to a server that offers
 * SMTPUTF8 (RFC 6531); 0 otherwise (a non-ASCII domain alone does not
 * need it: its A-label form is used). NULL gives 0. */
int dns_addr_needs_smtputf8(const char *addr);

/* 1 when the domain of addr (after its last '@') holds a non-ASCII
 * octet, i.e. it must be converted before lookup. */
int dns_addr_domain_is_utf8(const char *addr);

#endif

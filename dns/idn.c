/*
 * SUMMARY
 *  dns/idn.c - domain normalisation (IDNA2008 via libidn2) and SMTPUTF8
 *  detection.
 * DESCRIPTION
 *  The common case, an ASCII name, is lower-cased in place without
 *  calling libidn2: this runs on every lookup, including L1 hits.
 *  A name with any octet >= 0x80 goes through idn2_to_ascii_8z() with
 *  IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL (UTS #46 mapping: upper case and
 *  compatibility forms fold, "ß" stays "ß").
 * DIAGNOSTICS
 *  DNS_EBADNAME for anything libidn2 rejects (invalid UTF-8, disallowed
 *  code points, a label over 63 octets after conversion).
 */
#include "dns/idn.h"

#include <idn2.h>
#include <string.h>

#include "dns/mx.h"
#include "dns/resolver.h"

static int dns_has_8bit(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 1;
    return 0;
}

int dns_name_normalize(const char *name, char out[DNS_NAME_MAX])
{
    if (name == NULL)
        return DNS_EBADNAME;
    size_t len = strlen(name);
    if (len > 0 && name[len - 1] == '.')
        len--;
    if (len == 0)
        return DNS_EBADNAME;
    if (!dns_has_8bit(name, len)) {
        if (len >= DNS_NAME_MAX)
            return DNS_EBADNAME;
        for (size_t i = 0; i < len; i++) {
            char c = name[i];
            out[i] = (c >= 'A' && c <= 'Z') ? (char)(c + ('a' - 'A')) : c;
        }
        out[len] = '\0';
        return dns_name_check(out) == len ? DNS_OK : DNS_EBADNAME;
    }
    /* libidn2 wants a NUL-terminated string without the final dot */
    char in[1024];
    if (len >= sizeof(in))
        return DNS_EBADNAME;
    memcpy(in, name, len);
    in[len] = '\0';
    char *a = NULL;
    int rc = idn2_to_ascii_8z(in, &a, IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL);
    if (rc == IDN2_MALLOC)
        return DNS_ENOMEM;
    if (rc != IDN2_OK || a == NULL) {
        idn2_free(a);
        return DNS_EBADNAME;
    }
    size_t alen = strlen(a);
    int st = DNS_EBADNAME;
    if (alen < DNS_NAME_MAX) {
        for (size_t i = 0; i <= alen; i++) {
            char c = a[i];
            out[i] = (c >= 'A' && c <= 'Z') ? (char)(c + ('a' - 'A')) : c;
        }
        if (dns_name_check(out) == alen)
            st = DNS_OK;
    }
    idn2_free(a);
    return st;
}

int dns_addr_needs_smtputf8(const char *addr)
{
    if (addr == NULL)
        return 0;
    const char *at = strrchr(addr, '@');
    size_t n = at != NULL ? (size_t)(at - addr) : strlen(addr);
    return dns_has_8bit(addr, n);
}

int dns_addr_domain_is_utf8(const char *addr)
{
    if (addr == NULL)
        return 0;
    const char *at = strrchr(addr, '@');
    if (at == NULL)
        return 0;
    return dns_has_8bit(at + 1, strlen(at + 1));
}

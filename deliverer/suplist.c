/*
 * deliverer/suplist.c - suppression list layout, normalisation and codec
 * (see suplist.h).
 */
#include "deliverer/suplist.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "core/util.h"
#include "dns/idn.h"
#include "dns/resolver.h"
#include "queue/msgjson.h"

char *suplist_key(const char *tenant)
{
    buf_t b = BUF_INIT;
    if (tenant == NULL || tenant[0] == '\0')
        buf_puts(&b, SUPLIST_GLOBAL_KEY);
    else
        buf_printf(&b, "%s%s", SUPLIST_TENANT_PREFIX, tenant);
    return buf_steal(&b, NULL);
}

int suplist_normalize(const char *addr, char out[SUPLIST_ADDR_MAX])
{
    if (!msgjson_valid_address(addr))
        return -1;
    const char *at = strrchr(addr, '@');
    size_t ll = (size_t)(at - addr);
    char dom[DNS_NAME_MAX];
    if (dns_name_normalize(at + 1, dom) != DNS_OK)
        return -1;
    size_t dl = strlen(dom);
    if (ll + 1 + dl + 1 > SUPLIST_ADDR_MAX)
        return -1;
    for (size_t i = 0; i < ll; i++) {
        unsigned char c = (unsigned char)addr[i];
        out[i] = (char)(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
    }
    out[ll] = '@';
    memcpy(out + ll + 1, dom, dl + 1);
    return 0;
}

/* s up to max bytes, '|' (unless last) and control characters replaced. */
static void put_field(buf_t *b, const char *s, size_t max, int last)
{
    size_t n = s ? strlen(s) : 0;
    if (n > max)
        n = max;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        buf_putc(b, c < 0x20 || c == 0x7f ? ' ' : c == '|' && !last ? '/' : (char)c);
    }
    if (!last)
        buf_putc(b, '|');
}

char *suplist_encode(const suplist_entry_t *e)
{
    buf_t b = BUF_INIT;
    buf_printf(&b, "1|%llu|%llu|%c|%d|", (unsigned long long)e->added_s, (unsigned long long)e->expires_s,
               e->origin ? e->origin : SUPLIST_MANUAL, e->code);
    put_field(&b, e->enh, sizeof(e->enh) - 1, 0);
    put_field(&b, e->message_id, sizeof(e->message_id) - 1, 0);
    put_field(&b, e->reason, SUPLIST_REASON_MAX, 0);
    put_field(&b, e->text, SUPLIST_TEXT_MAX, 1);
    return buf_steal(&b, NULL);
}

/* The next '|'-separated field of [*p, end) into out (cut to outlen-1). */
static int take_field(const char **p, const char *end, char *out, size_t outlen, int last)
{
    const char *s = *p;
    const char *bar = last ? end : memchr(s, '|', (size_t)(end - s));
    if (bar == NULL)
        return -1;
    size_t n = (size_t)(bar - s);
    if (out != NULL) {
        if (n > outlen - 1)
            n = outlen - 1;
        memcpy(out, s, n);
        out[n] = '\0';
    }
    *p = last ? end : bar + 1;
    return 0;
}

static int take_num(const char **p, const char *end, unsigned long long *v)
{
    char tmp[24];
    if (take_field(p, end, tmp, sizeof(tmp), 0) < 0 || tmp[0] == '\0')
        return -1;
    char *e;
    *v = strtoull(tmp, &e, 10);
    return *e == '\0' ? 0 : -1;
}

int suplist_decode(const char *v, size_t len, suplist_entry_t *e)
{
    memset(e, 0, sizeof(*e));
    const char *p = v, *end = v + len;
    char ver[4], origin[4];
    unsigned long long added, expires, code;
    if (take_field(&p, end, ver, sizeof(ver), 0) < 0 || strcmp(ver, "1") != 0)
        return -1;
    if (take_num(&p, end, &added) < 0 || take_num(&p, end, &expires) < 0)
        return -1;
    if (take_field(&p, end, origin, sizeof(origin), 0) < 0 || strlen(origin) != 1)
        return -1;
    if (take_num(&p, end, &code) < 0 || code > 999)
        return -1;
    if (take_field(&p, end, e->enh, sizeof(e->enh), 0) < 0 ||
        take_field(&p, end, e->message_id, sizeof(e->message_id), 0) < 0 ||
        take_field(&p, end, e->reason, sizeof(e->reason), 0) < 0 ||
        take_field(&p, end, e->text, sizeof(e->text), 1) < 0)
        return -1;
    e->added_s = added;
    e->expires_s = expires;
    e->origin = origin[0];
    e->code = (int)code;
    return 0;
}

int suplist_expired(const suplist_entry_t *e, uint64_t now_s)
{
    return e->expires_s != 0 && now_s >= e->expires_s;
}

int suplist_reason_in(const char *list, const char *reason)
{
    if (list == NULL || reason == NULL || reason[0] == '\0')
        return 0;
    size_t rl = strlen(reason);
    const char *p = list;
    while (*p) {
        while (*p == ',' || *p == ' ' || *p == '\t')
            p++;
        size_t n = strcspn(p, ", \t");
        if (n == rl && strncmp(p, reason, n) == 0)
            return 1;
        p += n;
    }
    return 0;
}

/*
 * SUMMARY
 *  core/message.c - lifetime of the shared message model.
 */
#include "core/message.h"

#include <stdlib.h>
#include <string.h>

#include "core/util.h"

message_t *message_new(void)
{
    return xcalloc(1, sizeof(message_t));
}

static void free_addrs(mp_address_t *a, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(a[i].addr);
        free(a[i].name);
    }
    free(a);
}

void message_free(message_t *m)
{
    if (m == NULL)
        return;
    free(m->id);
    free(m->trace_id);
    free(m->tenant);
    free(m->campaign);
    free(m->pool);
    free(m->from.addr);
    free(m->from.name);
    free_addrs(m->to, m->nto);
    free_addrs(m->cc, m->ncc);
    free_addrs(m->bcc, m->nbcc);
    message_drop_content(m);
    free(m);
}

void message_drop_content(message_t *m)
{
    free(m->subject);
    free(m->text);
    free(m->html);
    for (size_t i = 0; i < m->nheaders; i++) {
        free(m->headers[i].name);
        free(m->headers[i].value);
    }
    free(m->headers);
    for (size_t i = 0; i < m->nattachments; i++) {
        free(m->attachments[i].filename);
        free(m->attachments[i].content_type);
        free(m->attachments[i].content_id);
        free(m->attachments[i].data);
    }
    free(m->attachments);
    free(m->raw);
    m->subject = m->text = m->html = m->raw = NULL;
    m->raw_len = 0;
    m->headers = NULL;
    m->nheaders = 0;
    m->attachments = NULL;
    m->nattachments = 0;
}

const char *message_addr_domain(const char *addr)
{
    const char *at = strrchr(addr, '@');
    return at ? at + 1 : addr + strlen(addr);
}

int message_valid_ident(message_ident_t kind, const char *s)
{
    size_t max = kind == MESSAGE_CAMPAIGN ? MESSAGE_CAMPAIGN_MAX
                 : kind == MESSAGE_POOL   ? MESSAGE_POOL_MAX
                                          : MESSAGE_TENANT_MAX;
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++, n++) {
        unsigned char c = *p;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
            c == '_' || c == '-')
            continue;
        if (kind == MESSAGE_CAMPAIGN && (c == ':' || c == '/' || c == '@' || c == '+' || c == '='))
            continue;
        return 0;
    }
    return n >= 1 && n <= max;
}

/*
 * SUMMARY
 *  deliverer/envelope.c - the x-mailpump-* headers of retries and dead
 *  letters.
 * DESCRIPTION
 *  Values are decimal strings ("1"/"0" for flags): AMQP tables can carry
 *  integers, but strings are what every client library and the broker's
 *  management UI show unchanged.
 */
#include "deliverer/envelope.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define H_PENDING       "x-mailpump-pending"
#define H_ATTEMPT       "x-mailpump-attempt"
#define H_FIRST_SEEN    "x-mailpump-first-seen-ms"
#define H_APPENDED      "x-mailpump-appended"
#define H_APPEND_NEEDED "x-mailpump-append-needed"
#define H_APPEND_ONLY   "x-mailpump-append-only"
#define H_DEAD_REASON   "x-mailpump-reason"
#define H_DEAD_AT       "x-mailpump-dead-at-ms"

static int flag(const mq_delivery_t *dv, const char *key)
{
    const char *h = mq_delivery_header(dv, key);
    return h && strcmp(h, "1") == 0;
}

void envelope_read(const mq_delivery_t *dv, uint64_t now_wall_ms, envelope_t *out)
{
    const char *h = mq_delivery_header(dv, H_ATTEMPT);
    int attempt = h ? atoi(h) : 0;
    out->attempt = attempt > 0 ? (unsigned)attempt : 1;
    h = mq_delivery_header(dv, H_FIRST_SEEN);
    out->first_seen_ms = h ? strtoull(h, NULL, 10) : 0;
    if (out->first_seen_ms == 0 || out->first_seen_ms > now_wall_ms)
        out->first_seen_ms = now_wall_ms;
    out->pending = mq_delivery_header(dv, H_PENDING);
    out->appended = flag(dv, H_APPENDED);
    out->append_needed = flag(dv, H_APPEND_NEEDED);
    out->append_only = flag(dv, H_APPEND_ONLY);
}

int envelope_is_pending(const envelope_t *e, const char *addr)
{
    if (e->pending == NULL)
        return 1;
    size_t alen = strlen(addr);
    for (const char *p = e->pending; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == alen && strncasecmp(p, addr, len) == 0)
            return 1;
        p += len + (end ? 1 : 0);
    }
    return 0;
}

void envelope_write(const envelope_t *e, envelope_headers_t *out)
{
    snprintf(out->attempt, sizeof(out->attempt), "%u", e->attempt);
    snprintf(out->first_seen, sizeof(out->first_seen), "%llu", (unsigned long long)e->first_seen_ms);
    const mq_header_t h[ENVELOPE_MAX_HEADERS] = {
        { H_PENDING, e->pending ? e->pending : "" },
        { H_ATTEMPT, out->attempt },
        { H_FIRST_SEEN, out->first_seen },
        { H_APPENDED, e->appended ? "1" : "0" },
        { H_APPEND_NEEDED, e->append_needed ? "1" : "0" },
        { H_APPEND_ONLY, e->append_only ? "1" : "0" },
    };
    memcpy(out->hdr, h, sizeof(h));
    out->n = ENVELOPE_MAX_HEADERS;
}

void envelope_dead_write(const char *reason, uint64_t now_wall_ms, envelope_dead_t *out)
{
    snprintf(out->when, sizeof(out->when), "%llu", (unsigned long long)now_wall_ms);
    out->hdr[0] = (mq_header_t){ H_DEAD_REASON, reason };
    out->hdr[1] = (mq_header_t){ H_DEAD_AT, out->when };
    out->n = 2;
}

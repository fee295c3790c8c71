/*
 * SUMMARY
 *  deliverer/envelope.c - the x-mailpump-* headers of retries and dead
 *  letters.
 * DESCRIPTION
 *  Values are strings ("1"/"0" for flags, base64 for the pending set):
 *  AMQP tables can carry integers and bytes, but strings are what every
 *  client library and the broker's management UI show unchanged.
 */
#include "deliverer/envelope.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/base64.h"
#include "core/util.h"

#define H_ID            "x-mailpump-id"
#define H_COPY          "x-mailpump-copy"
#define H_HOP           "x-mailpump-hop"
#define H_PENDING_SET   "x-mailpump-pending-set"
#define H_PENDING_LIST  "x-mailpump-pending" /* written by earlier versions */
#define H_ATTEMPT       "x-mailpump-attempt"
#define H_FIRST_SEEN    "x-mailpump-first-seen-ms"
#define H_APPENDED      "x-mailpump-appended"
#define H_APPEND_NEEDED "x-mailpump-append-needed"
#define H_APPEND_ONLY   "x-mailpump-append-only"
#define H_DEAD_REASON   "x-mailpump-reason"
#define H_DEAD_AT       "x-mailpump-dead-at-ms"
#define H_DEAD_TRUNC    "x-mailpump-truncated"
#define H_DEAD_SIZE     "x-mailpump-original-size"

static int flag(const mq_delivery_t *dv, const char *key)
{
    const char *h = mq_delivery_header(dv, key);
    return h && strcmp(h, "1") == 0;
}

void envelope_read(const mq_delivery_t *dv, uint64_t now_wall_ms, envelope_t *out)
{
    memset(out, 0, sizeof(*out));
    const char *h = mq_delivery_header(dv, H_ATTEMPT);
    int attempt = h ? atoi(h) : 0;
    out->attempt = attempt > 0 ? (unsigned)attempt : 1;
    h = mq_delivery_header(dv, H_FIRST_SEEN);
    out->first_seen_ms = h ? strtoull(h, NULL, 10) : 0;
    if (out->first_seen_ms == 0 || out->first_seen_ms > now_wall_ms)
        out->first_seen_ms = now_wall_ms;
    h = mq_delivery_header(dv, H_ID);
    out->id = h && h[0] ? h : NULL;
    h = mq_delivery_header(dv, H_COPY);
    out->copy = h && h[0] ? h : NULL;
    h = mq_delivery_header(dv, H_HOP);
    out->hop = h && h[0] ? h : NULL;
    h = mq_delivery_header(dv, H_PENDING_SET);
    if (h) {
        size_t n = strlen(h), len = 0, bad = 0;
        out->pending_set = xcalloc(1, base64_decoded_max(n) + 1);
        if (base64_decode(out->pending_set, &len, h, n, &bad) < 0)
            len = 0; /* garbled: nobody is pending, and the job says so */
        out->pending_nbits = len * 8;
    } else {
        out->pending_list = mq_delivery_header(dv, H_PENDING_LIST);
    }
    out->appended = flag(dv, H_APPENDED);
    out->append_needed = flag(dv, H_APPEND_NEEDED);
    out->append_only = flag(dv, H_APPEND_ONLY);
}

void envelope_free(envelope_t *e)
{
    free(e->pending_set);
    e->pending_set = NULL;
    e->pending_nbits = 0;
}

int envelope_is_pending(const envelope_t *e, size_t i, const char *addr)
{
    if (e->pending_set)
        return i < e->pending_nbits && (e->pending_set[i / 8] >> (i % 8)) & 1;
    if (e->pending_list == NULL)
        return 1;
    size_t alen = strlen(addr);
    for (const char *p = e->pending_list; *p;) {
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
    buf_init(&out->pending);
    size_t n = 0;
    if (e->pending_set) {
        base64_encode(&out->pending, e->pending_set, envelope_set_bytes(e->pending_nbits));
        buf_putc(&out->pending, '\0');
        out->hdr[n++] = (mq_header_t){ H_PENDING_SET, buf_head(&out->pending) };
    }
    out->hdr[n++] = (mq_header_t){ H_ATTEMPT, out->attempt };
    out->hdr[n++] = (mq_header_t){ H_FIRST_SEEN, out->first_seen };
    out->hdr[n++] = (mq_header_t){ H_APPENDED, e->appended ? "1" : "0" };
    out->hdr[n++] = (mq_header_t){ H_APPEND_NEEDED, e->append_needed ? "1" : "0" };
    out->hdr[n++] = (mq_header_t){ H_APPEND_ONLY, e->append_only ? "1" : "0" };
    if (e->id)
        out->hdr[n++] = (mq_header_t){ H_ID, e->id };
    if (e->copy)
        out->hdr[n++] = (mq_header_t){ H_COPY, e->copy };
    if (e->hop)
        out->hdr[n++] = (mq_header_t){ H_HOP, e->hop };
    out->n = n;
}

void envelope_headers_free(envelope_headers_t *h)
{
    buf_free(&h->pending);
}

void envelope_dead_write(const char *reason, uint64_t now_wall_ms, envelope_dead_t *out)
{
    snprintf(out->when, sizeof(out->when), "%llu", (unsigned long long)now_wall_ms);
    out->hdr[0] = (mq_header_t){ H_DEAD_REASON, reason };
    out->hdr[1] = (mq_header_t){ H_DEAD_AT, out->when };
    out->n = 2;
}

void envelope_dead_truncated(envelope_dead_t *out, uint64_t announced)
{
    snprintf(out->size, sizeof(out->size), "%llu", (unsigned long long)announced);
    out->hdr[out->n++] = (mq_header_t){ H_DEAD_TRUNC, "1" };
    out->hdr[out->n++] = (mq_header_t){ H_DEAD_SIZE, out->size };
}

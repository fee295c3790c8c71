/*
 * SUMMARY
 *  queue/event.c - JSON serialisation of delivery events (jansson).
 * DESCRIPTION
 *  Absent values are omitted rather than sent as null so consumers can
 *  tell "not applicable" from "empty". Strings that are not valid UTF-8
 *  (a hostile server's reply text) are made safe byte by byte first:
 *  jansson refuses invalid UTF-8 and an event must never be lost to it.
 */
#include "queue/event.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/buf.h"
#include "core/util.h"

static void set_str(json_t *o, const char *key, const char *v)
{
    if (v == NULL)
        return;
    json_t *s = json_string(v);
    if (s == NULL) {
        /* invalid UTF-8: keep printable ASCII, replace the rest */
        buf_t b = BUF_INIT;
        for (const unsigned char *c = (const unsigned char *)v; *c; c++)
            buf_putc(&b, (*c >= 0x20 && *c < 0x7f) ? (char)*c : '?');
        s = json_string(buf_head(&b));
        buf_free(&b);
    }
    json_object_set_new(o, key, s);
}

char *mq_event_to_json(const mq_event_t *ev)
{
    json_t *o = json_object();
    set_str(o, "event", ev->event);
    set_str(o, "message_id", ev->message_id);
    set_str(o, "trace_id", ev->trace_id);
    set_str(o, "tenant", ev->tenant);
    set_str(o, "campaign", ev->campaign);
    set_str(o, "pool", ev->pool);
    set_str(o, "from", ev->sender);
    set_str(o, "recipient", ev->recipient);
    set_str(o, "outcome", ev->outcome);
    set_str(o, "reason", ev->reason);
    if (ev->smtp_code > 0) {
        json_t *smtp = json_object();
        json_object_set_new(smtp, "code", json_integer(ev->smtp_code));
        if (ev->smtp_enhanced && ev->smtp_enhanced[0])
            set_str(smtp, "enhanced", ev->smtp_enhanced);
        set_str(smtp, "text", ev->smtp_text ? ev->smtp_text : "");
        json_object_set_new(o, "smtp", smtp);
    }
    if (ev->mx_host && ev->mx_host[0])
        set_str(o, "mx_host", ev->mx_host);
    if (ev->mx_addr && ev->mx_addr[0])
        set_str(o, "mx_addr", ev->mx_addr);
    if (ev->source && ev->source[0])
        set_str(o, "source", ev->source);
    if (ev->source_addr && ev->source_addr[0])
        set_str(o, "source_addr", ev->source_addr);
    if (ev->shaping && ev->shaping[0])
        set_str(o, "shaping", ev->shaping);
    if (ev->tls_version) {
        json_t *tls = json_object();
        set_str(tls, "version", ev->tls_version);
        set_str(tls, "cipher", ev->tls_cipher);
        json_object_set_new(o, "tls", tls);
    }
    json_object_set_new(o, "attempt", json_integer(ev->attempt));
    if (ev->imap_appended) {
        json_t *imap = json_object();
        set_str(imap, "mailbox", ev->imap_mailbox);
        json_object_set_new(imap, "uidvalidity", json_integer(ev->imap_uidvalidity));
        json_object_set_new(imap, "uid", json_integer(ev->imap_uid));
        json_object_set_new(o, "imap", imap);
    }
    set_str(o, "error", ev->error);
    if (ev->retry_in_ms)
        json_object_set_new(o, "retry_in_ms", json_integer((json_int_t)ev->retry_in_ms));
    json_object_set_new(o, "age_ms", json_integer((json_int_t)ev->age_ms));
    if (ev->possible_duplicate)
        json_object_set_new(o, "possible_duplicate", json_true());
    if (ev->already_delivered)
        json_object_set_new(o, "already_delivered", json_true());
    struct tm tm;
    if (ev->suppression_list) {
        json_t *sup = json_object();
        set_str(sup, "list", ev->suppression_list);
        set_str(sup, "reason", ev->suppression_reason ? ev->suppression_reason : "");
        time_t added = (time_t)ev->suppression_added_s;
        gmtime_r(&added, &tm);
        char at[40];
        strftime(at, sizeof(at), "%Y-%m-%dT%H:%M:%SZ", &tm);
        set_str(sup, "added", at);
        json_object_set_new(o, "suppression", sup);
    }
    uint64_t ts = ev->ts_ms ? ev->ts_ms : util_wall_ms();
    time_t secs = (time_t)(ts / 1000);
    gmtime_r(&secs, &tm);
    char when[40];
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    char full[64];
    snprintf(full, sizeof(full), "%s.%03uZ", when, (unsigned)(ts % 1000));
    set_str(o, "ts", full);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (s == NULL)
        abort(); /* only on OOM: core policy */
    return s;
}

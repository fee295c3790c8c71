/*
 * queue/event.h - the JSON events published to the mail.events exchange.
 *
 * One event per recipient (delivered, deferred, bounced) and one per
 * message for the Sent-folder copy (appended, append_failed) or for a
 * dead-lettered message (dead). The routing key is the event name.
 * docs/message-format.md documents every field.
 */
#ifndef MP_QUEUE_EVENT_H
#define MP_QUEUE_EVENT_H

#include <stdint.h>

typedef struct mq_event {
    const char *event;        /* routing key: delivered, deferred, bounced, appended, ... */
    const char *message_id;
    const char *trace_id;     /* NULL: omitted */
    const char *tenant;       /* the message's sender fields; NULL: omitted */
    const char *campaign;
    const char *pool;
    const char *sender;
    const char *recipient;    /* NULL for message-level events */
    const char *outcome;      /* delivered / transient / permanent, NULL: omitted */
    const char *reason;       /* classifier tag, NULL: omitted */
    int         smtp_code;    /* 0: omitted */
    const char *smtp_enhanced;/* "" or NULL: omitted */
    const char *smtp_text;
    const char *mx_host;
    const char *mx_addr;
    const char *source;       /* the egress source the delivery went out from; NULL or "": omitted */
    const char *source_addr;  /* its local address */
    const char *shaping;      /* a shaping rule or action that decided the outcome, e.g.
                               * "suspend:automation:yahoo-deferral"; NULL or "": omitted */
    const char *tls_version;
    const char *tls_cipher;
    unsigned    attempt;
    int         imap_appended;/* 1: uidvalidity/uid/mailbox present */
    uint32_t    imap_uidvalidity;
    uint32_t    imap_uid;
    const char *imap_mailbox;
    const char *error;        /* free-form reason for failures */
    uint64_t    retry_in_ms;  /* deferred: delay before the next attempt; 0 omitted */
    uint64_t    age_ms;       /* since the message was first consumed */
    int         possible_duplicate; /* delivered again after a redelivery found it mid-send */
    int         already_delivered;  /* an earlier attempt delivered it (ledger): not sent again */
    const char *suppression_list;   /* suppressed: "global" or the tenant; NULL: omitted */
    const char *suppression_reason; /* ... the entry's reason */
    uint64_t    suppression_added_s; /* ... when it was added (Unix time) */
    uint64_t    ts_ms;        /* wall clock; 0 = now */
} mq_event_t;

/* Serialise as one compact JSON object. Returns a malloc'd string. */
char *mq_event_to_json(const mq_event_t *ev);

#endif

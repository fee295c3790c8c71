/*
 * core/message.h - the message model every module shares.
 *
 * Built by queue/msgjson.c from the JSON body on mail.outbound, read by
 * mime/ (to build the RFC 5322 bytes) and deliverer/ (the envelope).
 * All strings are NUL-terminated UTF-8 owned by the message;
 * message_free() releases everything.
 */
#ifndef MP_CORE_MESSAGE_H
#define MP_CORE_MESSAGE_H

#include <stddef.h>

typedef struct mp_address {
    char *addr; /* "local@domain", validated, never NULL */
    char *name; /* display name or NULL */
} mp_address_t;

typedef struct mp_header {
    char *name;  /* validated field name (RFC 5322 ftext) */
    char *value; /* unfolded value, no CR or LF */
} mp_header_t;

/* One attachment (JSON "attachments"). data holds the decoded bytes. */
typedef struct mp_attachment {
    char          *filename;     /* UTF-8, no control characters, never NULL */
    char          *content_type; /* "type/subtype[; params]", printable ASCII */
    char          *content_id;   /* without angle brackets, or NULL */
    int            is_inline;    /* 1: part of multipart/related */
    unsigned char *data;         /* decoded content (may be NULL when len 0) */
    size_t         len;
} mp_attachment_t;

typedef struct message {
    char         *id;       /* mailpump message id: given or a generated UUID */
    int           id_generated; /* the JSON had no "id": id is a UUID made by this parse */
    char         *trace_id; /* NULL if absent */
    /* Who sends it (docs/message-format.md): the platform's customer, its
     * campaign and the egress pool asked for; NULL if absent. Validated
     * to a small ASCII alphabet, so they are safe in log lines, metric
     * labels and Redis keys. */
    char         *tenant;
    char         *campaign;
    char         *pool;
    mp_address_t  from;
    mp_address_t *to;  size_t nto;
    mp_address_t *cc;  size_t ncc;
    mp_address_t *bcc; size_t nbcc;
    char         *subject; /* NULL if absent */
    char         *text;    /* NULL if absent */
    char         *html;    /* NULL if absent */
    mp_header_t  *headers; size_t nheaders;
    int           priority; /* AMQP priority 0..10, set by the consumer */
    mp_attachment_t *attachments; size_t nattachments;
    /* A complete RFC 5322 message given by the application (JSON "raw"),
     * decoded from base64; when set, mime/ sends it instead of building
     * one (subject, text, html, headers, attachments are then absent). */
    char         *raw;     /* NULL if absent; raw_len bytes, NUL-terminated */
    size_t        raw_len;
} message_t;

message_t *message_new(void);
void       message_free(message_t *m);
/* Release what only the builder reads (subject, bodies, headers,
 * attachments, raw), keeping the envelope, id, trace id, tenant,
 * campaign and pool: a message in flight holds its built bytes, not a
 * second, decoded copy. */
void       message_drop_content(message_t *m);

/* The sender fields (tenant, campaign, pool): what each may hold. */
typedef enum {
    MESSAGE_TENANT = 0, /* 1-64 of ASCII letters, digits, '.', '_', '-' */
    MESSAGE_CAMPAIGN,   /* 1-128 of those and ':', '/', '@', '+', '=' */
    MESSAGE_POOL,       /* as a tenant */
} message_ident_t;

#define MESSAGE_TENANT_MAX   64
#define MESSAGE_CAMPAIGN_MAX 128
#define MESSAGE_POOL_MAX     64

/* 1 when s (NUL-terminated) is a valid value of that field, else 0. The
 * parser, the CLI and the configuration ([metrics] tenants) share it. */
int message_valid_ident(message_ident_t kind, const char *s);

/* Domain part of an address (pointer into addr, after the last '@'). */
const char *message_addr_domain(const char *addr);

#endif

/*
 * deliverer/suplist.h - suppression lists: the Redis layout, address
 * normalisation and the entry codec, shared by the worker (the check at
 * LOOKUP and the automatic add after a bounce) and the control plane
 * (control/suppress.h). Pure functions, no I/O.
 *
 * One Redis hash per list: mp:sup:g (global) and mp:sup:t:<tenant>;
 * field = the normalised address, value = the encoded entry (below).
 * docs/operations.md#suppression-lists gives the measured memory.
 */
#ifndef MP_DELIVERER_SUPLIST_H
#define MP_DELIVERER_SUPLIST_H

#include <stddef.h>
#include <stdint.h>

#define SUPLIST_GLOBAL_KEY "mp:sup:g"
#define SUPLIST_TENANT_PREFIX "mp:sup:t:"
/* Room for a normalised address and its NUL. */
#define SUPLIST_ADDR_MAX 512
/* Longest reason and reply text kept in an entry (longer ones are cut). */
#define SUPLIST_REASON_MAX 64
#define SUPLIST_TEXT_MAX 200

typedef enum {
    SUPLIST_MANUAL = 'm', /* mailpump suppress add */
    SUPLIST_AUTO = 'a',   /* a permanent bounce ([suppression] auto_reasons) */
    SUPLIST_IMPORT = 'i', /* mailpump suppress import */
} suplist_origin_t;

typedef struct suplist_entry {
    char     reason[SUPLIST_REASON_MAX + 1];
    uint64_t added_s;   /* Unix time */
    uint64_t expires_s; /* 0: never */
    char     origin;    /* suplist_origin_t */
    int      code;      /* the reply that caused it (auto), else 0 */
    char     enh[16];
    char     message_id[129];
    char     text[SUPLIST_TEXT_MAX + 1];
} suplist_entry_t;

/* The hash of tenant's list; NULL or "" is the global list. Heap. */
char *suplist_key(const char *tenant);

/* addr (validated as a message's recipients are, queue/msgjson.h) into
 * its list field: the domain IDNA-normalised and lower-cased as the
 * engine looks it up (dns/idn.h), the local part's ASCII letters
 * lower-cased (compared case-insensitively; other octets as they are).
 * 0, or -1 when addr is not a valid address. */
int suplist_normalize(const char *addr, char out[SUPLIST_ADDR_MAX]);

/* "1|added|expires|origin|code|enh|message_id|reason|text": '|' in the
 * fields but the last becomes '/', control characters a blank. Heap. */
char *suplist_encode(const suplist_entry_t *e);
/* 0, or -1 when v is not an entry. */
int   suplist_decode(const char *v, size_t len, suplist_entry_t *e);
/* 1 when e has expired at now_s. */
int   suplist_expired(const suplist_entry_t *e, uint64_t now_s);

/* 1 when reason is one of the comma- or blank-separated list's tags. */
int suplist_reason_in(const char *list, const char *reason);

#endif

/*
 * imap/parser.h - the one IMAP server-response parser (RFC 3501 §7, RFC
 * 9051). Pure: it does no I/O and keeps no state between calls.
 *
 * The caller hands it the unparsed input; it either recognises one whole
 * response at the start (tagged, untagged or continuation, including the
 * literals {n} of an untagged response such as a LIST name spread over
 * several lines) and says how many bytes that was, or asks for more.
 *
 * Only what an APPEND session needs is decoded: status and text, response
 * codes (CAPABILITY, APPENDUID and UIDVALIDITY with their arguments, the
 * name of any other), CAPABILITY data, LIST/LSUB/XLIST data, SEARCH data
 * (count and highest number). Other untagged data (EXISTS, FLAGS, FETCH
 * ...) is framed and reported by keyword only.
 *
 * Everything decoded is copied into imap_resp_t: it does not point into
 * the input, which the caller may consume right away.
 */
#ifndef MP_IMAP_PARSER_H
#define MP_IMAP_PARSER_H

#include <stddef.h>
#include <stdint.h>

/* Limits that keep a hostile server from making us buffer without end. */
#define IMAP_MAX_LINE    65536u              /* one line, literals excluded */
#define IMAP_MAX_LITERAL (1024u * 1024u)     /* one literal in a response */
#define IMAP_MAX_RESP    (4u * 1024u * 1024u) /* one response, all lines and literals */

typedef enum {
    IMAP_PARSE_DONE = 1,   /* one response parsed; *used bytes belong to it */
    IMAP_PARSE_MORE = 0,   /* incomplete: call again with more bytes */
    IMAP_PARSE_ERROR = -1, /* malformed or over a limit; resp->error says why */
} imap_parse_status_t;

typedef enum {
    IMAP_RESP_TAGGED = 0,
    IMAP_RESP_UNTAGGED,
    IMAP_RESP_CONTINUATION,
    IMAP_RESP_KIND_LAST
} imap_resp_kind_t;

typedef enum {
    IMAP_COND_NONE = 0, /* untagged data (CAPABILITY, LIST, EXISTS ...) or continuation */
    IMAP_COND_OK,
    IMAP_COND_NO,
    IMAP_COND_BAD,
    IMAP_COND_PREAUTH,  /* untagged greeting only */
    IMAP_COND_BYE,      /* untagged only */
    IMAP_COND_LAST
} imap_cond_t;

/* Capabilities that change what the client sends. IMAP4rev2 implies the
 * extensions it absorbed (UIDPLUS, SPECIAL-USE, LIST-EXTENDED, LITERAL-). */
enum {
    IMAP_CAP_IMAP4REV1     = 1u << 0,
    IMAP_CAP_IMAP4REV2     = 1u << 1,
    IMAP_CAP_STARTTLS      = 1u << 2,
    IMAP_CAP_LOGINDISABLED = 1u << 3,
    IMAP_CAP_AUTH_PLAIN    = 1u << 4,
    IMAP_CAP_SASL_IR       = 1u << 5,
    IMAP_CAP_LITERAL_PLUS  = 1u << 6,
    IMAP_CAP_LITERAL_MINUS = 1u << 7,
    IMAP_CAP_UIDPLUS       = 1u << 8,
    IMAP_CAP_SPECIAL_USE   = 1u << 9,
    IMAP_CAP_LIST_EXTENDED = 1u << 10,
    IMAP_CAP_MULTIAPPEND   = 1u << 11,
};

/* Mailbox attributes from LIST (RFC 3501, RFC 5258, RFC 6154). */
enum {
    IMAP_MBX_NOSELECT      = 1u << 0,
    IMAP_MBX_NONEXISTENT   = 1u << 1,
    IMAP_MBX_NOINFERIORS   = 1u << 2,
    IMAP_MBX_HASCHILDREN   = 1u << 3,
    IMAP_MBX_HASNOCHILDREN = 1u << 4,
    IMAP_MBX_MARKED        = 1u << 5,
    IMAP_MBX_UNMARKED      = 1u << 6,
    IMAP_MBX_SUBSCRIBED    = 1u << 7,
    IMAP_MBX_REMOTE        = 1u << 8,
    IMAP_MBX_ALL           = 1u << 9,
    IMAP_MBX_ARCHIVE       = 1u << 10,
    IMAP_MBX_DRAFTS        = 1u << 11,
    IMAP_MBX_FLAGGED       = 1u << 12,
    IMAP_MBX_JUNK          = 1u << 13,
    IMAP_MBX_SENT          = 1u << 14,
    IMAP_MBX_TRASH         = 1u << 15,
};

#define IMAP_MAX_UIDS 64 /* APPENDUID uids understood (a MULTIAPPEND batch at most) */

typedef struct imap_resp {
    imap_resp_kind_t kind;
    char        tag[64];      /* tagged: the tag */
    imap_cond_t cond;         /* tagged OK/NO/BAD; untagged OK/NO/BAD/PREAUTH/BYE */
    char        keyword[32];  /* untagged: "OK", "CAPABILITY", "LIST", "EXISTS" ... upper case */
    uint32_t    number;       /* untagged "* <number> KEYWORD" (EXISTS, EXPUNGE, FETCH ...) */
    int         has_number;

    /* resp-text-code: "[CODE args]" of a status response */
    char        code[32];     /* upper case; "" when there is none */
    int         has_appenduid;/* code is APPENDUID with a valid "nz-number SP uid-set" */
    int         has_uidvalidity; /* code is UIDVALIDITY with a valid nz-number (SELECT/EXAMINE) */
    uint32_t    uidvalidity;  /* APPENDUID or UIDVALIDITY */
    uint32_t    uid;          /* APPENDUID: the first (the only one for a single message) */
    uint32_t    uids[IMAP_MAX_UIDS]; /* APPENDUID: every uid, in the order the messages went */
    uint32_t    nuids;

    /* "* SEARCH n n ..." (UID SEARCH gives UIDs) */
    uint32_t    search_count; /* numbers listed */
    uint32_t    search_max;   /* the highest, 0 when none */

    /* capabilities, from "[CAPABILITY ...]" or "* CAPABILITY ..." */
    int         has_caps;
    unsigned    caps;         /* IMAP_CAP_* */

    /* "* LIST (attributes) delimiter name" */
    unsigned    mbx_flags;    /* IMAP_MBX_* */
    char        mbx_delim;    /* '\0' for NIL */
    char        mbx_name[1024];
    size_t      mbx_name_len;
    int         mbx_name_truncated; /* longer than the buffer: do not use */

    /* human-readable text (status responses, continuation); control
     * characters replaced by '?' */
    char        text[512];

    const char *error;        /* static reason when IMAP_PARSE_ERROR */
} imap_resp_t;

/* Parse the response at the start of p[0..len). On IMAP_PARSE_DONE fills
 * *resp and sets *used to the bytes it spans (lines and literals). On
 * MORE and ERROR *used is 0; resp->error says why on ERROR. */
int imap_resp_parse(const char *p, size_t len, imap_resp_t *resp, size_t *used);

/* "tagged" / "untagged" / "continuation"; "OK", "NO" ... for traces. */
const char *imap_resp_kind_name(imap_resp_kind_t kind);
const char *imap_cond_name(imap_cond_t cond);

/* IMAP_CAP_* bits of one capability name (case-insensitive), 0 if not one
 * we act on. */
unsigned imap_cap_from_name(const char *name, size_t len);

#endif

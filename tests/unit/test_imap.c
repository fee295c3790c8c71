/*
 * SUMMARY
 *  tests/unit/test_imap.c - the IMAP response parser and the APPEND
 *  session against a scripted fake server.
 * DESCRIPTION
 *  Parser: one table of inputs and what must come out (tagged, untagged,
 *  continuation, response codes, LIST names as atoms, quoted strings and
 *  literals, partial input, garbage), plus a check that every proper
 *  prefix of a complete response asks for more bytes.
 *
 *  Session: a fake IMAP server listens on 127.0.0.1 port 0 inside the
 *  test's own loop and plays a script of (exact client bytes expected,
 *  server bytes to answer) steps, in plaintext (IMAP_TLS_NONE). The
 *  client never runs ahead of a reply, so any byte beyond the current
 *  expectation is a failure; a step may hold its answer back for a while
 *  to prove the client waits (for the "+" before a literal). Every test
 *  ends with no fd and no timer left in the loop.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/stream.h"
#include "core/tls.h"
#include "imap/imap.h"
#include "imap/parser.h"
#include "tests/support/logcapture.h"

/* ================================================================ parser */

typedef struct parse_case {
    const char      *name;
    const char      *input;
    size_t           input_len; /* 0: strlen(input) */
    int              rc;
    size_t           used;      /* for DONE; 0: the whole input */
    imap_resp_kind_t kind;
    const char      *tag;       /* NULL: not checked */
    imap_cond_t      cond;
    const char      *keyword;   /* NULL: not checked */
    uint32_t         number;
    const char      *code;      /* NULL: must be "" */
    int              has_appenduid;
    uint32_t         uidvalidity, uid;
    const char      *uids;      /* APPENDUID uid-set expanded, "3 4 5"; NULL: not checked */
    uint32_t         nuids;     /* APPENDUID uids counted; 0: not checked */
    int              has_caps;
    unsigned         caps;
    unsigned         mbx_flags;
    char             delim;
    const char      *mbx_name;  /* NULL: not checked */
    size_t           mbx_name_len; /* 0: strlen(mbx_name) */
    const char      *text;      /* NULL: not checked */
} parse_case_t;

#define DOVECOT_GREETING_CAPS                                                                           \
    "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN] " \
    "Dovecot (Debian) ready.\r\n"

static const parse_case_t parse_cases[] = {
    /* tagged */
    { .name = "tagged OK", .input = "A1 OK LOGIN completed\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A1", .cond = IMAP_COND_OK, .text = "LOGIN completed" },
    { .name = "tagged NO with code", .input = "A3 NO [OVERQUOTA] Quota exceeded\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A3", .cond = IMAP_COND_NO,
      .code = "OVERQUOTA", .text = "Quota exceeded" },
    { .name = "tagged BAD", .input = "A2 BAD Error in IMAP command LGIN: Unknown command.\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A2", .cond = IMAP_COND_BAD,
      .text = "Error in IMAP command LGIN: Unknown command." },
    { .name = "status is case-insensitive", .input = "a7 ok done\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "a7", .cond = IMAP_COND_OK, .text = "done" },
    { .name = "tagged OK without text", .input = "A1 OK\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A1", .cond = IMAP_COND_OK, .text = "" },
    { .name = "bare LF", .input = "A9 OK done\n", .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED,
      .tag = "A9", .cond = IMAP_COND_OK, .text = "done" },
    { .name = "control characters in text", .input = "A1 NO bad\x01thing\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A1", .cond = IMAP_COND_NO, .text = "bad?thing" },
    { .name = "text ending in {5} is not a literal", .input = "A1 NO too big {5}\r\nA2 OK\r\n",
      .rc = IMAP_PARSE_DONE, .used = 19, .kind = IMAP_RESP_TAGGED, .tag = "A1", .cond = IMAP_COND_NO,
      .text = "too big {5}" },
    { .name = "two responses: only the first", .input = "A1 OK a\r\nA2 OK b\r\n", .rc = IMAP_PARSE_DONE,
      .used = 9, .kind = IMAP_RESP_TAGGED, .tag = "A1", .cond = IMAP_COND_OK, .text = "a" },

    /* APPENDUID */
    { .name = "APPENDUID", .input = "A4 OK [APPENDUID 38505 3955] APPEND completed\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK,
      .code = "APPENDUID", .has_appenduid = 1, .uidvalidity = 38505, .uid = 3955,
      .text = "APPEND completed" },
    { .name = "APPENDUID 32-bit max", .input = "A4 OK [appenduid 4294967295 1] ok\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK,
      .code = "APPENDUID", .has_appenduid = 1, .uidvalidity = 4294967295u, .uid = 1, .text = "ok" },
    { .name = "APPENDUID over 32 bits", .input = "A4 OK [APPENDUID 4294967296 1] ok\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK,
      .code = "APPENDUID", .text = "ok" },
    { .name = "APPENDUID uid-set", .input = "A4 OK [APPENDUID 7 3:5] ok\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID", .has_appenduid = 1,
      .uidvalidity = 7, .uid = 3, .uids = "3 4 5", .text = "ok" },
    { .name = "APPENDUID uid-set list", .input = "A4 OK [APPENDUID 7 9,2:1,12] ok\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID", .has_appenduid = 1,
      .uidvalidity = 7, .uid = 9, .uids = "9 1 2 12", .text = "ok" },
    { .name = "APPENDUID uid-set too long", .input = "A4 OK [APPENDUID 7 1:65] ok\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID", .text = "ok" },
    { .name = "APPENDUID uid-set 64", .input = "A4 OK [APPENDUID 7 4294967232:4294967295] ok\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID",
      .has_appenduid = 1, .uidvalidity = 7, .uid = 4294967232u, .nuids = 64, .text = "ok" },
    { .name = "APPENDUID uid-set dangling comma", .input = "A4 OK [APPENDUID 7 3,] ok\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID",
      .text = "ok" },
    { .name = "APPENDUID uid-set zero", .input = "A4 OK [APPENDUID 7 0:3] ok\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID", .text = "ok" },
    { .name = "APPENDUID zero uidvalidity", .input = "A4 OK [APPENDUID 0 5] ok\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID", .text = "ok" },
    { .name = "APPENDUID missing uid", .input = "A4 OK [APPENDUID 7] ok\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_TAGGED, .tag = "A4", .cond = IMAP_COND_OK, .code = "APPENDUID", .text = "ok" },

    /* capabilities */
    { .name = "greeting with CAPABILITY code", .input = DOVECOT_GREETING_CAPS, .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_UNTAGGED, .cond = IMAP_COND_OK, .keyword = "OK", .code = "CAPABILITY",
      .has_caps = 1,
      .caps = IMAP_CAP_IMAP4REV1 | IMAP_CAP_SASL_IR | IMAP_CAP_LITERAL_PLUS | IMAP_CAP_AUTH_PLAIN,
      .text = "Dovecot (Debian) ready." },
    { .name = "untagged CAPABILITY",
      .input = "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED UIDPLUS special-use LIST-EXTENDED literal-\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED, .keyword = "CAPABILITY", .has_caps = 1,
      .caps = IMAP_CAP_IMAP4REV1 | IMAP_CAP_STARTTLS | IMAP_CAP_LOGINDISABLED | IMAP_CAP_UIDPLUS |
              IMAP_CAP_SPECIAL_USE | IMAP_CAP_LIST_EXTENDED | IMAP_CAP_LITERAL_MINUS },
    { .name = "IMAP4rev2 implies", .input = "* CAPABILITY IMAP4rev2\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_UNTAGGED, .keyword = "CAPABILITY", .has_caps = 1,
      .caps = IMAP_CAP_IMAP4REV2 | IMAP_CAP_UIDPLUS | IMAP_CAP_SPECIAL_USE | IMAP_CAP_LIST_EXTENDED |
              IMAP_CAP_LITERAL_MINUS },
    { .name = "login OK with CAPABILITY code",
      .input = "A2 OK [CAPABILITY IMAP4rev1 UIDPLUS SPECIAL-USE LITERAL+] Logged in\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_TAGGED, .tag = "A2", .cond = IMAP_COND_OK,
      .code = "CAPABILITY", .has_caps = 1,
      .caps = IMAP_CAP_IMAP4REV1 | IMAP_CAP_UIDPLUS | IMAP_CAP_SPECIAL_USE | IMAP_CAP_LITERAL_PLUS,
      .text = "Logged in" },

    /* LIST */
    { .name = "LIST atom name", .input = "* LIST (\\HasNoChildren \\Sent) \"/\" Sent\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST",
      .mbx_flags = IMAP_MBX_HASNOCHILDREN | IMAP_MBX_SENT, .delim = '/', .mbx_name = "Sent" },
    { .name = "LIST quoted name with escapes",
      .input = "* LIST (\\Sent) \".\" \"Sent \\\"Items\\\" \\\\ x\"\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST", .mbx_flags = IMAP_MBX_SENT, .delim = '.',
      .mbx_name = "Sent \"Items\" \\ x" },
    { .name = "LIST literal name", .input = "* LIST (\\Sent) \"/\" {8}\r\nGesendet\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST", .mbx_flags = IMAP_MBX_SENT,
      .delim = '/', .mbx_name = "Gesendet" },
    { .name = "LIST literal with CRLF inside", .input = "* LIST () \"/\" {6}\r\na\r\nbc!\r\nA1 OK\r\n",
      .rc = IMAP_PARSE_DONE, .used = 27, .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST", .delim = '/',
      .mbx_name = "a\r\nbc!" },
    { .name = "LIST NIL delimiter, empty name", .input = "* LIST (\\Noselect) NIL \"\"\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST",
      .mbx_flags = IMAP_MBX_NOSELECT, .delim = '\0', .mbx_name = "" },
    { .name = "LIST backslash delimiter", .input = "* LIST () \"\\\\\" INBOX\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST", .delim = '\\', .mbx_name = "INBOX" },
    { .name = "LIST extended data and unknown flags",
      .input = "* LIST (\\Sent $Custom \\X-Foo \\Subscribed) \"/\" \"Sent\" (\"CHILDINFO\" (\"SUBSCRIBED\"))\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST",
      .mbx_flags = IMAP_MBX_SENT | IMAP_MBX_SUBSCRIBED, .delim = '/', .mbx_name = "Sent" },
    { .name = "LIST flags case-insensitive", .input = "* list (\\SENT \\noselect \\Drafts) \"/\" x]y\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST",
      .mbx_flags = IMAP_MBX_SENT | IMAP_MBX_NOSELECT | IMAP_MBX_DRAFTS, .delim = '/', .mbx_name = "x]y" },
    { .name = "LIST UTF-8 atom", .input = "* LIST (\\Sent) \"/\" \"Gel&APY-scht\"\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_UNTAGGED, .keyword = "LIST", .mbx_flags = IMAP_MBX_SENT, .delim = '/',
      .mbx_name = "Gel&APY-scht" },

    /* continuation */
    { .name = "continuation", .input = "+ Ready for literal data\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_CONTINUATION, .text = "Ready for literal data" },
    { .name = "bare continuation", .input = "+\r\n", .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_CONTINUATION,
      .text = "" },
    { .name = "continuation with empty text", .input = "+ \r\nA1 OK\r\n", .rc = IMAP_PARSE_DONE, .used = 4,
      .kind = IMAP_RESP_CONTINUATION, .text = "" },

    /* other untagged */
    { .name = "EXISTS", .input = "* 3 EXISTS\r\n", .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED,
      .keyword = "EXISTS", .number = 3 },
    { .name = "FETCH with a literal", .input = "* 12 FETCH (BODY[] {5}\r\nhello)\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_UNTAGGED, .keyword = "FETCH", .number = 12 },
    { .name = "BYE", .input = "* BYE Logging out\r\n", .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED,
      .keyword = "BYE", .cond = IMAP_COND_BYE, .text = "Logging out" },
    { .name = "PREAUTH", .input = "* PREAUTH [CAPABILITY IMAP4rev1 UIDPLUS] hi\r\n", .rc = IMAP_PARSE_DONE,
      .kind = IMAP_RESP_UNTAGGED, .keyword = "PREAUTH", .cond = IMAP_COND_PREAUTH, .code = "CAPABILITY",
      .has_caps = 1, .caps = IMAP_CAP_IMAP4REV1 | IMAP_CAP_UIDPLUS, .text = "hi" },
    { .name = "untagged OK text ending in {3} is not a literal", .input = "* OK [ALERT] odd {3}\r\nabc\r\n",
      .rc = IMAP_PARSE_DONE, .used = 22, .kind = IMAP_RESP_UNTAGGED, .keyword = "OK", .cond = IMAP_COND_OK,
      .code = "ALERT", .text = "odd {3}" },
    { .name = "FLAGS", .input = "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n",
      .rc = IMAP_PARSE_DONE, .kind = IMAP_RESP_UNTAGGED, .keyword = "FLAGS" },

    /* partial input */
    { .name = "empty input", .input = "", .rc = IMAP_PARSE_MORE },
    { .name = "partial line", .input = "A1 OK don", .rc = IMAP_PARSE_MORE },
    { .name = "CR without LF", .input = "A1 OK done\r", .rc = IMAP_PARSE_MORE },
    { .name = "literal announced, not arrived", .input = "* LIST (\\Sent) \"/\" {8}\r\n", .rc = IMAP_PARSE_MORE },
    { .name = "literal partly arrived", .input = "* LIST (\\Sent) \"/\" {8}\r\nGese", .rc = IMAP_PARSE_MORE },
    { .name = "literal arrived, line not ended", .input = "* LIST (\\Sent) \"/\" {8}\r\nGesendet", .rc = IMAP_PARSE_MORE },

    /* garbage */
    { .name = "empty line", .input = "\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "unknown tagged status", .input = "A1 MAYBE later\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "tagged BYE", .input = "A1 BYE x\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "no status", .input = "hello\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "star without keyword", .input = "* \r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "star without space", .input = "*OK\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "bad tag", .input = "(foo) OK\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "unterminated response code", .input = "A1 OK [APPENDUID 1 2\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "LIST without closing paren", .input = "* LIST (\\Sent \"/\" Sent\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "LIST unterminated quoted name", .input = "* LIST (\\Sent) \"/\" \"Sent\r\n",
      .rc = IMAP_PARSE_ERROR },
    { .name = "LIST bad delimiter", .input = "* LIST () \"//\" Sent\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "LIST missing name", .input = "* LIST () \"/\"\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "LIST literal too long", .input = "* LIST () \"/\" {99999999}\r\n", .rc = IMAP_PARSE_ERROR },
    { .name = "TLS record", .input = "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", .input_len = 13, .rc = IMAP_PARSE_ERROR },
    { .name = "NUL in tag", .input = "A\0 OK x\r\n", .input_len = 9, .rc = IMAP_PARSE_ERROR },
};

static void check_case(const parse_case_t *c)
{
    size_t len = c->input_len ? c->input_len : strlen(c->input);
    imap_resp_t r;
    size_t used = 12345;
    int rc = imap_resp_parse(c->input, len, &r, &used);
    if (rc != c->rc)
        fail_msg("case '%s': rc %d, expected %d (error: %s)", c->name, rc, c->rc, r.error ? r.error : "-");
    if (rc != IMAP_PARSE_DONE) {
        assert_int_equal(used, 0);
        if (rc == IMAP_PARSE_ERROR && r.error == NULL)
            fail_msg("case '%s': error without a reason", c->name);
        return;
    }
    size_t want_used = c->used ? c->used : len;
    if (used != want_used)
        fail_msg("case '%s': used %zu, expected %zu", c->name, used, want_used);
    if (r.kind != c->kind)
        fail_msg("case '%s': kind %s, expected %s", c->name, imap_resp_kind_name(r.kind),
                 imap_resp_kind_name(c->kind));
    if (c->tag && strcmp(r.tag, c->tag) != 0)
        fail_msg("case '%s': tag '%s', expected '%s'", c->name, r.tag, c->tag);
    if (r.cond != c->cond)
        fail_msg("case '%s': cond %s, expected %s", c->name, imap_cond_name(r.cond), imap_cond_name(c->cond));
    if (c->keyword && strcmp(r.keyword, c->keyword) != 0)
        fail_msg("case '%s': keyword '%s', expected '%s'", c->name, r.keyword, c->keyword);
    if (r.number != c->number)
        fail_msg("case '%s': number %u, expected %u", c->name, r.number, c->number);
    if (strcmp(r.code, c->code ? c->code : "") != 0)
        fail_msg("case '%s': code '%s', expected '%s'", c->name, r.code, c->code ? c->code : "");
    if (r.has_appenduid != c->has_appenduid || r.uidvalidity != c->uidvalidity || r.uid != c->uid)
        fail_msg("case '%s': appenduid %d %u %u, expected %d %u %u", c->name, r.has_appenduid, r.uidvalidity,
                 r.uid, c->has_appenduid, c->uidvalidity, c->uid);
    if (c->nuids && r.nuids != c->nuids)
        fail_msg("case '%s': %u uids, expected %u", c->name, r.nuids, c->nuids);
    if (c->uids) {
        char got[256] = "";
        for (uint32_t i = 0; i < r.nuids; i++)
            snprintf(got + strlen(got), sizeof(got) - strlen(got), "%s%u", i ? " " : "", r.uids[i]);
        if (strcmp(got, c->uids) != 0)
            fail_msg("case '%s': uids '%s', expected '%s'", c->name, got, c->uids);
    }
    if (r.has_caps != c->has_caps || r.caps != c->caps)
        fail_msg("case '%s': caps %d %#x, expected %d %#x", c->name, r.has_caps, r.caps, c->has_caps, c->caps);
    if (r.mbx_flags != c->mbx_flags)
        fail_msg("case '%s': mailbox flags %#x, expected %#x", c->name, r.mbx_flags, c->mbx_flags);
    if (r.mbx_delim != c->delim)
        fail_msg("case '%s': delimiter '%c', expected '%c'", c->name, r.mbx_delim, c->delim);
    if (c->mbx_name) {
        size_t nl = c->mbx_name_len ? c->mbx_name_len : strlen(c->mbx_name);
        if (r.mbx_name_len != nl || memcmp(r.mbx_name, c->mbx_name, nl) != 0 || r.mbx_name_truncated)
            fail_msg("case '%s': mailbox '%s', expected '%s'", c->name, r.mbx_name, c->mbx_name);
    }
    if (c->text && strcmp(r.text, c->text) != 0)
        fail_msg("case '%s': text '%s', expected '%s'", c->name, r.text, c->text);
}

static void test_parser_table(void **state)
{
    for (size_t i = 0; i < sizeof(parse_cases) / sizeof(parse_cases[0]); i++)
        check_case(&parse_cases[i]);
}

/* Bytes arrive in any split: every proper prefix of a response is "more". */
static void test_parser_prefixes(void **state)
{
    for (size_t i = 0; i < sizeof(parse_cases) / sizeof(parse_cases[0]); i++) {
        const parse_case_t *c = &parse_cases[i];
        if (c->rc != IMAP_PARSE_DONE)
            continue;
        size_t len = c->input_len ? c->input_len : strlen(c->input);
        size_t want = c->used ? c->used : len;
        for (size_t k = 0; k < want; k++) {
            imap_resp_t r;
            size_t used = 0;
            int rc = imap_resp_parse(c->input, k, &r, &used);
            if (rc != IMAP_PARSE_MORE)
                fail_msg("case '%s': prefix of %zu bytes gave %d, expected MORE", c->name, k, rc);
        }
    }
}

static void test_parser_limits(void **state)
{
    size_t n = IMAP_MAX_LINE + 10;
    char *big = malloc(n + 2);
    assert_non_null(big);
    memset(big, 'A', n);
    imap_resp_t r;
    size_t used = 0;
    /* an endless line is refused before its end arrives */
    assert_int_equal(imap_resp_parse(big, n, &r, &used), IMAP_PARSE_ERROR);
    assert_non_null(r.error);
    /* a line just under the limit is fine */
    memcpy(big, "A1 OK ", 6);
    big[IMAP_MAX_LINE - 2] = '\r';
    big[IMAP_MAX_LINE - 1] = '\n';
    assert_int_equal(imap_resp_parse(big, IMAP_MAX_LINE, &r, &used), IMAP_PARSE_DONE);
    assert_int_equal(used, IMAP_MAX_LINE);
    free(big);

    /* a mailbox name longer than the buffer is reported as truncated */
    buf_t b = BUF_INIT;
    buf_printf(&b, "* LIST (\\Sent) \"/\" {%zu}\r\n", sizeof(r.mbx_name) + 5);
    for (size_t i = 0; i < sizeof(r.mbx_name) + 5; i++)
        buf_putc(&b, 'x');
    buf_puts(&b, "\r\n");
    assert_int_equal(imap_resp_parse(b.data, b.len, &r, &used), IMAP_PARSE_DONE);
    assert_int_equal(used, b.len);
    assert_true(r.mbx_name_truncated);
    buf_free(&b);
}

/* UIDVALIDITY (EXAMINE) and SEARCH data: what the Message-ID check reads. */
static void test_parser_search_uidvalidity(void **state)
{
    imap_resp_t r;
    size_t used = 0;
    const char *ok = "* OK [UIDVALIDITY 1700000001] UIDs valid\r\n";
    assert_int_equal(imap_resp_parse(ok, strlen(ok), &r, &used), IMAP_PARSE_DONE);
    assert_true(r.has_uidvalidity);
    assert_int_equal(r.uidvalidity, 1700000001u);
    const char *zero = "* OK [UIDVALIDITY 0] bad\r\n";
    assert_int_equal(imap_resp_parse(zero, strlen(zero), &r, &used), IMAP_PARSE_DONE);
    assert_false(r.has_uidvalidity);
    const char *srch = "* SEARCH 3 19 7\r\n";
    assert_int_equal(imap_resp_parse(srch, strlen(srch), &r, &used), IMAP_PARSE_DONE);
    assert_string_equal(r.keyword, "SEARCH");
    assert_int_equal(r.search_count, 3);
    assert_int_equal(r.search_max, 19);
    const char *none = "* SEARCH\r\n";
    assert_int_equal(imap_resp_parse(none, strlen(none), &r, &used), IMAP_PARSE_DONE);
    assert_int_equal(r.search_count, 0);
    assert_int_equal(r.search_max, 0);
    const char *bad = "* SEARCH 3 x\r\n";
    assert_int_equal(imap_resp_parse(bad, strlen(bad), &r, &used), IMAP_PARSE_ERROR);
    for (size_t k = 0; k < strlen(srch); k++) /* every prefix asks for more */
        assert_int_equal(imap_resp_parse(srch, k, &r, &used), IMAP_PARSE_MORE);
}

static void test_strerror(void **state)
{
    const int all[] = { IMAP_OK, IMAP_ENETWORK, IMAP_ETIMEOUT, IMAP_ETLS, IMAP_EAUTH,
                        IMAP_ENOSENT, IMAP_EPROTO, IMAP_EREFUSED, IMAP_ENOUIDPLUS, IMAP_EBUSY };
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        assert_non_null(imap_strerror(all[i]));
        assert_string_not_equal(imap_strerror(all[i]), "unknown imap status");
    }
    assert_string_equal(imap_strerror(-99), "unknown imap status");
}

/* ================================================================ fake server */

typedef struct step {
    const char *expect;   /* exact bytes the client must send; NULL: none (greeting) */
    const char *reply;    /* what the server answers; NULL: nothing */
    unsigned    delay_ms; /* hold the reply back; the client must stay silent */
    int         close;    /* server closes after the reply (FAKE_RESET: abortive close, RST) */
} step_t;

#define FAKE_RESET    2
#define FAKE_MAX_CONN 4

typedef struct script {
    const step_t *steps;
    size_t        nsteps;
} script_t;

struct fake;

/* One accepted connection and the script it plays. */
typedef struct fconn {
    struct fake  *f;
    int           index;
    stream_t     *conn;
    const step_t *steps;
    size_t        nsteps;
    size_t        cur;
    buf_t         pending;    /* client bytes not yet matched */
    buf_t         transcript; /* everything the client sent */
    loop_timer_t  delay;
    int           closing;
} fconn_t;

/* The server: the n-th accepted connection plays the n-th script; one
 * more connection than scripts is a failure. */
typedef struct fake {
    loop_t  *loop;
    int      lfd;
    uint16_t port;
    script_t scripts[FAKE_MAX_CONN];
    size_t   nscripts;
    size_t   accepted;
    fconn_t  c[FAKE_MAX_CONN];
    char     failure[2048];
} fake_t;

static void fake_failf(fake_t *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fake_failf(fake_t *f, const char *fmt, ...)
{
    if (f->failure[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->failure, sizeof(f->failure), fmt, ap);
    va_end(ap);
}

static void fake_close(fconn_t *fc)
{
    if (fc->conn) {
        stream_free(fc->conn);
        fc->conn = NULL;
    }
    loop_timer_cancel(fc->f->loop, &fc->delay);
}

/* Close with RST: the client's next read or write fails with a reset. */
static void fake_reset(fconn_t *fc)
{
    if (fc->conn) {
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        setsockopt(stream_fd(fc->conn), SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    fake_close(fc);
}

static void fake_send_reply(fconn_t *fc)
{
    const step_t *st = &fc->steps[fc->cur++];
    if (st->reply)
        stream_puts(fc->conn, st->reply);
    if (st->close == FAKE_RESET)
        fake_reset(fc);
    else if (st->close) {
        if (stream_pending_out(fc->conn) == 0)
            fake_close(fc);
        else
            fc->closing = 1; /* on DRAINED */
    }
}

static void fake_advance(fconn_t *fc)
{
    fake_t *f = fc->f;
    while (fc->conn && !fc->closing && !loop_timer_active(&fc->delay) && fc->cur < fc->nsteps && !f->failure[0]) {
        const step_t *st = &fc->steps[fc->cur];
        if (st->expect) {
            size_t n = strlen(st->expect);
            size_t have = buf_size(&fc->pending);
            size_t cmp = have < n ? have : n;
            if (memcmp(buf_head(&fc->pending), st->expect, cmp) != 0) {
                fake_failf(f, "conn %d step %zu: client sent\n[%.*s]\nexpected\n[%s]", fc->index, fc->cur, (int)have,
                           buf_head(&fc->pending), st->expect);
                fake_close(fc);
                return;
            }
            if (have < n)
                return; /* wait for the rest */
            buf_consume(&fc->pending, n);
            if (buf_size(&fc->pending) > 0) {
                fake_failf(f, "conn %d step %zu: client ran ahead of the reply: [%s]", fc->index, fc->cur,
                           buf_head(&fc->pending));
                fake_close(fc);
                return;
            }
        }
        if (st->delay_ms) {
            loop_timer_set(f->loop, &fc->delay, st->delay_ms);
            return;
        }
        fake_send_reply(fc);
    }
}

static void fake_delay_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    fconn_t *fc = arg;
    if (buf_size(&fc->pending) > 0) {
        fake_failf(fc->f, "conn %d step %zu: client did not wait for the reply: [%s]", fc->index, fc->cur,
                   buf_head(&fc->pending));
        fake_close(fc);
        return;
    }
    fake_send_reply(fc);
    fake_advance(fc);
}

static void fake_on_conn(stream_t *s, stream_event_t ev, void *arg)
{
    fconn_t *fc = arg;
    fake_t *f = fc->f;
    switch (ev) {
    case STREAM_EV_DATA: {
        buf_t *in = stream_input(s);
        buf_append(&fc->pending, buf_head(in), buf_size(in));
        buf_append(&fc->transcript, buf_head(in), buf_size(in));
        buf_consume(in, buf_size(in));
        if (fc->cur >= fc->nsteps || fc->closing) {
            fake_failf(f, "conn %d: client sent bytes after the script ended: [%s]", fc->index,
                       buf_head(&fc->pending));
            fake_close(fc);
            return;
        }
        fake_advance(fc);
        return;
    }
    case STREAM_EV_DRAINED:
        if (fc->closing)
            fake_close(fc);
        return;
    case STREAM_EV_CLOSED:
    case STREAM_EV_ERROR:
    case STREAM_EV_TIMEOUT:
        for (size_t i = fc->cur; i < fc->nsteps; i++)
            if (fc->steps[i].expect) {
                fake_failf(f, "conn %d: client closed at step %zu, still expected [%s] (%s)", fc->index, fc->cur,
                           fc->steps[i].expect, stream_error(s));
                break;
            }
        fake_close(fc);
        return;
    default:
        return;
    }
}

static void fake_on_accept(loop_t *loop, int fd, unsigned events, void *arg)
{
    fake_t *f = arg;
    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c < 0)
        return;
    if (f->accepted >= f->nscripts) {
        fake_failf(f, "client connected %zu times, expected %zu", f->accepted + 1, f->nscripts);
        close(c);
        return;
    }
    fconn_t *fc = &f->c[f->accepted++];
    fc->conn = stream_new(loop, fake_on_conn, fc);
    if (stream_attach(fc->conn, c) < 0) {
        fake_failf(f, "stream_attach: %s", stream_error(fc->conn));
        fake_close(fc);
        return;
    }
    fake_advance(fc); /* the greeting */
}

static void fake_start_multi(fake_t *f, loop_t *loop, const script_t *scripts, size_t nscripts)
{
    memset(f, 0, sizeof(*f));
    assert_true(nscripts <= FAKE_MAX_CONN);
    f->loop = loop;
    f->nscripts = nscripts;
    for (size_t i = 0; i < FAKE_MAX_CONN; i++) {
        fconn_t *fc = &f->c[i];
        fc->f = f;
        fc->index = (int)i;
        if (i < nscripts) {
            f->scripts[i] = scripts[i];
            fc->steps = scripts[i].steps;
            fc->nsteps = scripts[i].nsteps;
        }
        buf_init(&fc->pending);
        buf_init(&fc->transcript);
        loop_timer_init(&fc->delay, fake_delay_fired, fc);
    }
    f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(f->lfd >= 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = 0 };
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(listen(f->lfd, 8), 0);
    socklen_t sl = sizeof(sin);
    assert_int_equal(getsockname(f->lfd, (struct sockaddr *)&sin, &sl), 0);
    f->port = ntohs(sin.sin_port);
    assert_int_equal(loop_fd_add(loop, f->lfd, LOOP_READ, fake_on_accept, f), 0);
}

static void fake_start(fake_t *f, loop_t *loop, const step_t *steps, size_t nsteps)
{
    script_t sc = { steps, nsteps };
    fake_start_multi(f, loop, &sc, 1);
}

static void fake_stop(fake_t *f)
{
    for (size_t i = 0; i < FAKE_MAX_CONN; i++) {
        fake_close(&f->c[i]);
        buf_free(&f->c[i].pending);
        buf_free(&f->c[i].transcript);
    }
    loop_fd_del(f->loop, f->lfd);
    close(f->lfd);
}

/* Every script played to its end, nothing unmatched, no failure. */
static void fake_check(fake_t *f)
{
    if (f->failure[0])
        fail_msg("fake server: %s", f->failure);
    if (f->accepted != f->nscripts)
        fail_msg("client connected %zu times, expected %zu", f->accepted, f->nscripts);
    for (size_t i = 0; i < f->nscripts; i++) {
        fconn_t *fc = &f->c[i];
        if (fc->cur != fc->nsteps)
            fail_msg("conn %zu: script stopped at step %zu of %zu; transcript:\n%s", i, fc->cur, fc->nsteps,
                     buf_head(&fc->transcript));
        if (buf_size(&fc->pending) != 0)
            fail_msg("conn %zu: unmatched client bytes: [%s]", i, buf_head(&fc->pending));
    }
}

/* ================================================================ client runs */

typedef struct outcome {
    int                  calls;
    imap_append_result_t res;
} outcome_t;

static void on_done(void *arg, const imap_append_result_t *res)
{
    outcome_t *o = arg;
    o->calls++;
    o->res = *res;
}

static const char MSG[] = "From: alice@test.example\r\n"
                          "To: bob@test.example\r\n"
                          "Subject: hello\r\n"
                          "Message-ID: <unit-1@test.example>\r\n"
                          "\r\n"
                          "Hello Bob.\r\n"
                          ".leading dot stays\r\n";

typedef struct run_opts {
    imap_tls_t  tls;
    SSL_CTX    *ssl_ctx;
    const char *user;
    const char *password;
    unsigned    timeout_ms;
    int         cancel_after_ms; /* > 0: cancel the append then */
    const char *check_msgid;     /* acct.check_message_id */
    const char *log_id, *trace_id; /* acct.log_id, acct.trace_id */
} run_opts_t;

static void run_loop_until(loop_t *loop, int (*done)(void *), void *arg, unsigned max_ms)
{
    uint64_t start = loop_update_time(loop);
    while (!done(arg)) {
        if (loop_update_time(loop) - start > max_ms)
            fail_msg("loop did not settle within %u ms", max_ms);
        loop_run_once(loop, 50);
    }
}

typedef struct run_state {
    outcome_t *o;
    fake_t    *f;
} run_state_t;

static int run_finished(void *arg)
{
    run_state_t *rs = arg;
    return rs->o->calls > 0 && rs->f->c[0].conn == NULL && !loop_timer_active(&rs->f->c[0].delay);
}

/* Run one append against the script; returns the outcome. Asserts the
 * whole script was played, the callback fired exactly once (and not
 * synchronously) and the loop ended empty. */
static outcome_t run_script(const step_t *steps, size_t nsteps, const run_opts_t *opt)
{
    loop_t *loop = loop_new();
    assert_non_null(loop);
    fake_t f;
    fake_start(&f, loop, steps, nsteps);

    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(f.port) };
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    imap_account_t acct = {
        .addr = (struct sockaddr *)&sin,
        .addrlen = sizeof(sin),
        .host = "127.0.0.1",
        .tls = opt && opt->ssl_ctx ? opt->tls : IMAP_TLS_NONE, /* plaintext unless a test brings TLS */
        .ssl_ctx = opt ? opt->ssl_ctx : NULL,
        .user = opt && opt->user ? opt->user : "alice@test.example",
        .password = opt && opt->password ? opt->password : "secret",
        .timeout_ms = opt && opt->timeout_ms ? opt->timeout_ms : 5000,
        .check_message_id = opt ? opt->check_msgid : NULL,
        .log_id = opt ? opt->log_id : NULL,
        .trace_id = opt ? opt->trace_id : NULL,
    };
    outcome_t o;
    memset(&o, 0, sizeof(o));
    imap_append_t *a = imap_append_start(loop, &acct, MSG, strlen(MSG), on_done, &o);
    assert_non_null(a);
    assert_int_equal(o.calls, 0); /* never synchronous */

    run_state_t rs = { &o, &f };
    if (opt && opt->cancel_after_ms > 0) {
        uint64_t start = loop_update_time(loop);
        while (loop_update_time(loop) - start < (uint64_t)opt->cancel_after_ms)
            loop_run_once(loop, 10);
        assert_int_equal(o.calls, 0);
        imap_append_free(a);
        uint64_t s2 = loop_update_time(loop);
        while (f.c[0].conn != NULL && loop_update_time(loop) - s2 < 5000)
            loop_run_once(loop, 50);
        for (int i = 0; i < 5; i++)
            loop_run_once(loop, 10);
        assert_int_equal(o.calls, 0);
        if (f.failure[0])
            fail_msg("fake server: %s", f.failure);
    } else {
        run_loop_until(loop, run_finished, &rs, 10000);
        /* a few more turns: nothing else may fire */
        for (int i = 0; i < 3; i++)
            loop_run_once(loop, 10);
        assert_int_equal(o.calls, 1);
        fake_check(&f);
        imap_append_free(a);
    }
    fake_stop(&f);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
    loop_free(loop);
    return o;
}

#define NSTEPS(s) (sizeof(s) / sizeof((s)[0]))

/* "A3 APPEND "Sent" (\Seen) {N+}\r\n" followed, if with_data, by the message and CRLF */
static const char *append_cmd(char *buf, size_t n, const char *tag, const char *quoted_mbx, int plus,
                              int with_data)
{
    snprintf(buf, n, "%s APPEND %s (\\Seen) {%zu%s}\r\n%s%s", tag, quoted_mbx, strlen(MSG), plus ? "+" : "",
             with_data ? MSG : "", with_data ? "\r\n" : "");
    return buf;
}

static char *msg_crlf(void)
{
    static char buf[sizeof(MSG) + 2];
    snprintf(buf, sizeof(buf), "%s\r\n", MSG);
    return buf;
}

static void test_append_literal_plus(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"pa\\\"ss\\\\word\"\r\n",
          "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE LIST-EXTENDED] Logged in\r\n", 0, 0 },
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n",
          "* LIST (\\Sent \\HasNoChildren) \"/\" Sent\r\nA2 OK List completed (0.001 + 0.000 secs).\r\n", 0, 0 },
        /* LITERAL+: the message follows the command at once, no "+" */
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 1, 1),
          "A3 OK [APPENDUID 1700000000 42] Append completed (0.004 + 0.000 secs).\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "* BYE Logging out\r\nA4 OK Logout completed (0.001 + 0.000 secs).\r\n", 0, 1 },
    };
    run_opts_t opt = { .tls = IMAP_TLS_NONE, .password = "pa\"ss\\word" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_OK);
    assert_int_equal(o.res.uidvalidity, 1700000000u);
    assert_int_equal(o.res.uid, 42);
    assert_string_equal(o.res.mailbox, "Sent");
}

/* Every line of an append carries its message's msg= and trace=, quoted;
 * the server's texts are quoted too. */
static void test_append_log_lines(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n",
          "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE LIST-EXTENDED] Logged in\r\n", 0, 0 },
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n", "* LIST (\\Sent) \"/\" Sent\r\nA2 OK done\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 1, 1), "A3 NO [OVERQUOTA] \"full\" uid=9\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "* BYE Logging out\r\nA4 OK Logout completed\r\n", 0, 1 },
    };
    run_opts_t opt = { .tls = IMAP_TLS_NONE, .log_id = "m 1=x", .trace_id = "t \"2\"" };
    static char got[65536];
    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_DEBUG, LOG_FMT_LOGFMT), 0);
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    const char *dbg = getenv("MP_TEST_DEBUG");
    logcapture_end(&lc, got, sizeof(got), dbg && *dbg ? LOG_DEBUG : LOG_INFO);
    assert_int_equal(o.res.status, IMAP_EREFUSED);
    size_t lines = 0;
    for (char *l = strtok(got, "\n"); l; l = strtok(NULL, "\n")) {
        if (!strstr(l, " mod=imap "))
            continue;
        lines++;
        if (!strstr(l, "event=") || !strstr(l, " msg=\"m 1=x\" trace=\"t \\\"2\\\"\" "))
            fail_msg("no message fields: %s", l);
        if (strstr(l, "event=append_failed"))
            assert_non_null(strstr(l, " user=\"alice@test.example\" host=\"127.0.0.1\" mailbox=\"Sent\" "
                                      "status=\"APPEND refused\" error=\"APPEND to Sent: NO [OVERQUOTA] "
                                      "\\\"full\\\" uid=9\""));
    }
    assert_true(lines > 10);
}

static void test_append_sync_literal(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK IMAP4rev1 server ready\r\n", 0, 0 },
        { "A1 CAPABILITY\r\n", "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nA1 OK done\r\n", 0, 0 },
        { "A2 LOGIN \"alice@test.example\" \"secret\"\r\n", "A2 OK Logged in\r\n", 0, 0 },
        /* no capabilities with the login reply: ask again */
        { "A3 CAPABILITY\r\n", "* CAPABILITY IMAP4rev1 UIDPLUS SPECIAL-USE\r\nA3 OK done\r\n", 0, 0 },
        /* SPECIAL-USE without LIST-EXTENDED: plain LIST carries the attributes */
        { "A4 LIST \"\" \"*\"\r\n",
          "* LIST (\\HasNoChildren) \"/\" INBOX\r\n* LIST (\\Sent) \"/\" \"Sent Messages\"\r\nA4 OK done\r\n", 0, 0 },
        /* no LITERAL+: the client must wait for "+" (held back 150 ms) */
        { append_cmd(app, sizeof(app), "A5", "\"Sent Messages\"", 0, 0), "+ Ready for literal data\r\n", 150, 0 },
        { msg_crlf(), "A5 OK [APPENDUID 3 7] done\r\n", 0, 0 },
        { "A6 LOGOUT\r\n", "* BYE bye\r\nA6 OK done\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_OK);
    assert_int_equal(o.res.uidvalidity, 3);
    assert_int_equal(o.res.uid, 7);
    assert_string_equal(o.res.mailbox, "Sent Messages");
}

static void test_append_gesendet(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n",
          "* CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE LIST-EXTENDED\r\nA1 OK Logged in\r\n", 0, 0 },
        /* a decoy named Sent, a \Noselect one with \Sent, then the real one as a literal */
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n",
          "* LIST (\\HasNoChildren) \".\" Sent\r\n"
          "* LIST (\\Sent \\Noselect) \".\" Archiv\r\n"
          "* LIST (\\Drafts) \".\" Entw&APw-rfe\r\n"
          "* LIST (\\Sent \\HasNoChildren) \".\" {8}\r\nGesendet\r\n"
          "A2 OK LIST completed\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A3", "\"Gesendet\"", 1, 1), "A3 OK [APPENDUID 9 1] ok\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "* BYE\r\nA4 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_OK);
    assert_string_equal(o.res.mailbox, "Gesendet");
    assert_int_equal(o.res.uidvalidity, 9);
    assert_int_equal(o.res.uid, 1);
}

static void test_append_refused(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n",
          "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE LIST-EXTENDED] Logged in\r\n", 0, 0 },
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n", "* LIST (\\Sent) \"/\" Sent\r\nA2 OK done\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 1, 1),
          "A3 NO [OVERQUOTA] Quota exceeded (mailbox for user is full)\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "* BYE\r\nA4 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_EREFUSED);
    assert_non_null(strstr(o.res.error, "NO [OVERQUOTA] Quota exceeded (mailbox for user is full)"));
    assert_string_equal(o.res.mailbox, "Sent");
}

/* Without LITERAL+ the server may refuse instead of sending "+": the
 * literal must then never be sent. */
static void test_append_refused_before_literal(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n",
          "A1 OK [CAPABILITY IMAP4rev1 UIDPLUS SPECIAL-USE LIST-EXTENDED] ok\r\n", 0, 0 },
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n", "* LIST (\\Sent) \"/\" Sent\r\nA2 OK done\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 0, 0), "A3 NO [TOOBIG] Message too large\r\n", 100, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_EREFUSED);
    assert_non_null(strstr(o.res.error, "Message too large"));
}

static void test_login_refused(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"wrong\"\r\n", "A1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
          0, 0 },
        { "A2 LOGOUT\r\n", "* BYE\r\nA2 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .password = "wrong" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_EAUTH);
    assert_non_null(strstr(o.res.error, "Authentication failed."));
    assert_string_equal(o.res.mailbox, "");
}

/* RFC 5530 [LIMIT] on LOGIN (Dovecot past mail_max_userip_connections)
 * is "not now", a retryable IMAP_EBUSY, never bad credentials. */
static void test_login_busy(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"wrong\"\r\n",
          "A1 NO [LIMIT] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)\r\n",
          0, 0 },
        { "A2 LOGOUT\r\n", "* BYE\r\nA2 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .password = "wrong" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_EBUSY);
    assert_non_null(strstr(o.res.error, "mail_max_userip_connections"));
}

static void test_no_appenduid(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n",
          "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ SPECIAL-USE LIST-EXTENDED] ok\r\n", 0, 0 },
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n", "* LIST (\\Sent) \"/\" Sent\r\nA2 OK done\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 1, 1), "A3 OK Append completed\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_ENOUIDPLUS);
    assert_string_equal(o.res.mailbox, "Sent");
    assert_non_null(strstr(o.res.error, "APPENDUID"));
    assert_int_equal(o.res.uid, 0);
}

/* No SPECIAL-USE: fall back to a mailbox literally named "Sent". */
static void test_fallback_named_sent(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n", "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS] ok\r\n",
          0, 0 },
        { "A2 LIST \"\" \"*\"\r\n",
          "* LIST (\\HasChildren) \".\" INBOX\r\n* LIST () \".\" Sent-old\r\n* LIST () \".\" Sent\r\nA2 OK done\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 5 6] ok\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_OK);
    assert_string_equal(o.res.mailbox, "Sent");
    assert_int_equal(o.res.uid, 6);
}

/* SPECIAL-USE and no \Sent: a folder named Sent is not used. */
static void test_no_sent_mailbox(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n",
          "A1 OK [CAPABILITY IMAP4rev1 UIDPLUS SPECIAL-USE LIST-EXTENDED] ok\r\n", 0, 0 },
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n", "* LIST (\\Trash) \"/\" Trash\r\nA2 OK done\r\n", 0, 0 },
        { "A3 LOGOUT\r\n", "A3 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_ENOSENT);
}

/* LOGINDISABLED with AUTH=PLAIN and SASL-IR: AUTHENTICATE with an initial response. */
static void test_authenticate_plain_sasl_ir(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=PLAIN SASL-IR] hi\r\n", 0, 0 },
        { "A1 AUTHENTICATE PLAIN AGFsaWNlQHRlc3QuZXhhbXBsZQBzZWNyZXQ=\r\n",
          "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE LIST-EXTENDED] ok\r\n", 0, 0 },
        { "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n", "* LIST (\\Sent) \"/\" Sent\r\nA2 OK done\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 1 2] ok\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_OK);
}

/* ... and without SASL-IR: wait for "+" before the response. */
static void test_authenticate_plain_continuation(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=PLAIN] hi\r\n", 0, 0 },
        { "A1 AUTHENTICATE PLAIN\r\n", "+ \r\n", 100, 0 },
        { "AGFsaWNlQHRlc3QuZXhhbXBsZQBzZWNyZXQ=\r\n", "A1 NO [AUTHENTICATIONFAILED] nope\r\n", 0, 0 },
        { "A2 LOGOUT\r\n", "A2 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_EAUTH);
    assert_non_null(strstr(o.res.error, "nope"));
}

/* Non-ASCII password: a literal (non-synchronising with LITERAL+). */
static void test_login_literal(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" {9+}\r\np\xc3\xa4ssword\r\n", "A1 NO bad\r\n", 0, 0 },
        { "A2 LOGOUT\r\n", "A2 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .password = "p\xc3\xa4ssword" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_EAUTH);
}

/* ... and synchronising without it. */
static void test_login_sync_literal(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1] hi\r\n", 0, 0 },
        { "A1 LOGIN {5}\r\n", "+ go\r\n", 100, 0 },
        { "al\tce \"secret\"\r\n", "A1 NO bad\r\n", 0, 0 },
        { "A2 LOGOUT\r\n", "A2 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .user = "al\tce" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_EAUTH);
}

/* PREAUTH greeting (IMAP_TLS_NONE): no login at all. */
static void test_preauth(void **state)
{
    char app[1024];
    const step_t steps[] = {
        { NULL, "* PREAUTH [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE] welcome\r\n", 0, 0 },
        { "A1 LIST \"\" \"*\"\r\n", "* LIST (\\Sent) \"/\" Sent\r\nA1 OK done\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A2", "\"Sent\"", 1, 1), "A2 OK [APPENDUID 1 1] ok\r\n", 0, 0 },
        { "A3 LOGOUT\r\n", "A3 OK\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_OK);
}

/* STARTTLS required but not offered: credentials never leave in clear. */
static void test_starttls_missing(void **state)
{
    char err[256];
    SSL_CTX *ctx = tls_client_ctx_new(NULL, 0, err, sizeof(err));
    assert_non_null(ctx);
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] hi\r\n", 0, 0 },
        { "A1 LOGOUT\r\n", "A1 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .tls = IMAP_TLS_STARTTLS, .ssl_ctx = ctx };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    SSL_CTX_free(ctx);
    assert_int_equal(o.res.status, IMAP_ETLS);
    assert_non_null(strstr(o.res.error, "STARTTLS"));
}

/* A server that pipelines plaintext behind its STARTTLS OK is an
 * injection attempt: no handshake, no credentials. */
static void test_starttls_injection(void **state)
{
    char err[256];
    SSL_CTX *ctx = tls_client_ctx_new(NULL, 0, err, sizeof(err));
    assert_non_null(ctx);
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n", 0, 0 },
        { "A1 STARTTLS\r\n", "A1 OK Begin TLS negotiation now.\r\n* OK injected\r\n", 0, 0 },
    };
    run_opts_t opt = { .tls = IMAP_TLS_STARTTLS, .ssl_ctx = ctx };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    SSL_CTX_free(ctx);
    assert_int_equal(o.res.status, IMAP_ETLS);
}

static void test_timeout(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n", NULL, 0, 0 }, /* and then silence */
    };
    run_opts_t opt = { .timeout_ms = 200 };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_ETIMEOUT);
    assert_non_null(strstr(o.res.error, "login"));
}

static void test_garbage(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n", "220 smtp.example ESMTP\r\n", 0, 0 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_EPROTO);
}

static void test_greeting_bye(void **state)
{
    const step_t steps[] = {
        { NULL, "* BYE Too many connections\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_ENETWORK);
    assert_non_null(strstr(o.res.error, "Too many connections"));
}

static void test_server_closes(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n", "* BYE shutting down\r\n", 0, 1 },
    };
    outcome_t o = run_script(steps, NSTEPS(steps), NULL);
    assert_int_equal(o.res.status, IMAP_ENETWORK);
    assert_non_null(strstr(o.res.error, "shutting down"));
}

static void test_cancel(void **state)
{
    const step_t steps[] = {
        { NULL, "* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n", 0, 0 },
        { "A1 LOGIN \"alice@test.example\" \"secret\"\r\n", NULL, 0, 0 },
    };
    run_opts_t opt = { .cancel_after_ms = 100 };
    run_script(steps, NSTEPS(steps), &opt);
}

static void test_connect_refused(void **state)
{
    loop_t *loop = loop_new();
    /* a port nobody listens on: bind, note it, close */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = 0 };
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    socklen_t sl = sizeof(sin);
    getsockname(fd, (struct sockaddr *)&sin, &sl);
    close(fd);

    imap_account_t acct = { .addr = (struct sockaddr *)&sin, .addrlen = sizeof(sin), .host = "127.0.0.1",
                            .tls = IMAP_TLS_NONE, .user = "u", .password = "p", .timeout_ms = 2000 };
    outcome_t o;
    memset(&o, 0, sizeof(o));
    imap_append_t *a = imap_append_start(loop, &acct, MSG, strlen(MSG), on_done, &o);
    assert_non_null(a);
    assert_int_equal(o.calls, 0);
    loop_run(loop);
    assert_int_equal(o.calls, 1);
    assert_int_equal(o.res.status, IMAP_ENETWORK);
    imap_append_free(a);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
    loop_free(loop);
}

static void test_bad_arguments(void **state)
{
    loop_t *loop = loop_new();
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(1) };
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct {
        imap_account_t acct;
        int            status;
    } cases[] = {
        { { .addr = NULL, .user = "u", .password = "p", .tls = IMAP_TLS_NONE }, IMAP_EPROTO },
        { { .addr = (struct sockaddr *)&sin, .addrlen = sizeof(sin), .user = "u", .password = "p",
            .tls = IMAP_TLS_IMAPS, .ssl_ctx = NULL }, IMAP_ETLS },
        { { .addr = (struct sockaddr *)&sin, .addrlen = sizeof(sin), .user = NULL, .password = "p",
            .tls = IMAP_TLS_NONE }, IMAP_EAUTH },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        outcome_t o;
        memset(&o, 0, sizeof(o));
        imap_append_t *h = imap_append_start(loop, &cases[i].acct, MSG, strlen(MSG), on_done, &o);
        assert_non_null(h);
        assert_int_equal(o.calls, 0);
        loop_run(loop);
        assert_int_equal(o.calls, 1);
        assert_int_equal(o.res.status, cases[i].status);
        imap_append_free(h);
    }
    assert_null(imap_append_start(loop, &cases[0].acct, MSG, strlen(MSG), NULL, NULL));
    assert_null(imap_append_start(NULL, &cases[0].acct, MSG, strlen(MSG), on_done, NULL));
    /* cancelling before the deferred failure fires: no callback */
    outcome_t o;
    memset(&o, 0, sizeof(o));
    imap_append_t *a = imap_append_start(loop, &cases[0].acct, MSG, strlen(MSG), on_done, &o);
    imap_append_free(a);
    imap_append_free(NULL);
    loop_run(loop);
    assert_int_equal(o.calls, 0);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
    loop_free(loop);
}

/* ================================================================ pool */

#define P_GREETING "* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready\r\n"
#define P_LOGIN(user) "A1 LOGIN \"" user "\" \"secret\"\r\n"
#define P_LOGIN_OK    "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE LIST-EXTENDED] Logged in\r\n"
#define P_LIST        "A2 LIST (SPECIAL-USE) \"\" \"*\"\r\n"
#define P_LIST_OK     "* LIST (\\Sent \\HasNoChildren) \"/\" Sent\r\nA2 OK List completed\r\n"
/* the opening of a fresh pooled session: greeting, LOGIN, LIST */
#define P_OPEN(user) { NULL, P_GREETING, 0, 0 }, { P_LOGIN(user), P_LOGIN_OK, 0, 0 }, { P_LIST, P_LIST_OK, 0, 0 }

typedef struct penv {
    loop_t            *loop;
    fake_t             f;
    imap_pool_t       *pool;
    struct sockaddr_in sin;
} penv_t;

static void penv_start(penv_t *e, const script_t *sc, size_t n, const imap_pool_limits_t *lim)
{
    memset(e, 0, sizeof(*e));
    e->loop = loop_new();
    assert_non_null(e->loop);
    fake_start_multi(&e->f, e->loop, sc, n);
    e->sin.sin_family = AF_INET;
    e->sin.sin_port = htons(e->f.port);
    e->sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    e->pool = imap_pool_new(e->loop, lim);
    assert_non_null(e->pool);
}

static imap_account_t penv_acct(penv_t *e, const char *user)
{
    imap_account_t a = { .addr = (struct sockaddr *)&e->sin, .addrlen = sizeof(e->sin), .host = "127.0.0.1",
                         .tls = IMAP_TLS_NONE, .user = user, .password = "secret", .timeout_ms = 5000,
                         .pool = e->pool };
    return a;
}

static void penv_run_ms(penv_t *e, unsigned ms)
{
    uint64_t start = loop_update_time(e->loop);
    while (loop_update_time(e->loop) - start < ms)
        loop_run_once(e->loop, 10);
}

static void penv_wait_calls(penv_t *e, const outcome_t *o, int n)
{
    uint64_t start = loop_update_time(e->loop);
    while (o->calls < n) {
        if (loop_update_time(e->loop) - start > 5000)
            fail_msg("callback did not fire within 5 s");
        loop_run_once(e->loop, 50);
    }
    for (int i = 0; i < 3; i++)
        loop_run_once(e->loop, 5);
    assert_int_equal(o->calls, n); /* exactly once */
    if (e->f.failure[0])
        fail_msg("fake server: %s", e->f.failure);
}

static void penv_wait_closed(penv_t *e, int conn)
{
    uint64_t start = loop_update_time(e->loop);
    while (e->f.c[conn].conn != NULL) {
        if (loop_update_time(e->loop) - start > 5000)
            fail_msg("connection %d still open after 5 s", conn);
        loop_run_once(e->loop, 20);
    }
}

static outcome_t penv_append(penv_t *e, const char *user)
{
    imap_account_t acct = penv_acct(e, user);
    outcome_t o;
    memset(&o, 0, sizeof(o));
    imap_append_t *a = imap_append_start(e->loop, &acct, MSG, strlen(MSG), on_done, &o);
    assert_non_null(a);
    assert_int_equal(o.calls, 0); /* never synchronous, reused or not */
    penv_wait_calls(e, &o, 1);
    imap_append_free(a);
    return o;
}

static imap_pool_stats_t penv_stats(penv_t *e)
{
    imap_pool_stats_t st;
    imap_pool_get_stats(e->pool, &st);
    return st;
}

/* Free the pool (LOGOUT to what is idle), let the server see it, check
 * every script ran to its end and the loop ends empty. */
static void penv_end(penv_t *e)
{
    imap_pool_free(e->pool);
    for (size_t i = 0; i < e->f.accepted; i++)
        penv_wait_closed(e, (int)i);
    fake_check(&e->f);
    fake_stop(&e->f);
    assert_int_equal(loop_fd_count(e->loop), 0);
    assert_int_equal(loop_timer_count(e->loop), 0);
    loop_free(e->loop);
}

static void assert_transcript(fake_t *f, int conn, const char *want)
{
    buf_t *t = &f->c[conn].transcript;
    if (buf_size(t) != strlen(want) || memcmp(buf_head(t), want, strlen(want)) != 0)
        fail_msg("conn %d transcript:\n[%.*s]\nexpected\n[%s]", conn, (int)buf_size(t), buf_head(t), want);
}

/* Two appends to one account: one connection; the second sends APPEND only. */
static void test_pool_reuse(void **state)
{
    char app3[1024], app4[1024], want[4096];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(app3, sizeof(app3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(app4, sizeof(app4), "A4", "\"Sent\"", 1, 1), "A4 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { "A5 LOGOUT\r\n", "* BYE\r\nA5 OK\r\n", 0, 1 }, /* from imap_pool_free() */
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    penv_t e;
    penv_start(&e, sc, 1, NULL);

    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    assert_int_equal(o1.res.uid, 1);
    assert_int_equal(o1.res.connections, 1);
    assert_int_equal(o1.res.reused, 0);
    /* parked, not logged out */
    snprintf(want, sizeof(want), "%s%s%s", P_LOGIN("alice@test.example"), P_LIST, app3);
    assert_transcript(&e.f, 0, want);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.opened, 1);
    assert_int_equal(st.parked, 1);
    assert_int_equal(st.idle, 1);

    outcome_t o2 = penv_append(&e, "alice@test.example");
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(o2.res.uidvalidity, 77);
    assert_int_equal(o2.res.uid, 2);
    assert_string_equal(o2.res.mailbox, "Sent");
    assert_int_equal(o2.res.connections, 0);
    assert_int_equal(o2.res.reused, 1);
    /* the exact conversation: the reused session said APPEND and nothing else */
    snprintf(want, sizeof(want), "%s%s%s%s", P_LOGIN("alice@test.example"), P_LIST, app3, app4);
    assert_transcript(&e.f, 0, want);
    st = penv_stats(&e);
    assert_int_equal(st.opened, 1);
    assert_int_equal(st.reused, 1);
    assert_int_equal(st.idle, 1);
    assert_int_equal(e.f.accepted, 1);
    penv_end(&e);
}

/* Different accounts never share a connection. */
static void test_pool_accounts(void **state)
{
    char a3[1024], a4[1024], b3[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), "A4 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { "A5 LOGOUT\r\n", "A5 OK\r\n", 0, 1 },
    };
    const step_t c1[] = {
        P_OPEN("bob@test.example"),
        { append_cmd(b3, sizeof(b3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 88 1] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    penv_t e;
    penv_start(&e, sc, 2, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    outcome_t o2 = penv_append(&e, "bob@test.example");
    outcome_t o3 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(o2.res.uidvalidity, 88);
    assert_int_equal(o2.res.reused, 0);
    assert_int_equal(o3.res.status, IMAP_OK);
    assert_int_equal(o3.res.uid, 2);
    assert_int_equal(o3.res.reused, 1);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.opened, 2);
    assert_int_equal(st.reused, 1);
    assert_int_equal(st.idle, 2);
    penv_end(&e);
}

/* Idle past idle_ms: the pool says LOGOUT and leaves nothing in the loop. */
static void test_pool_idle_timeout(void **state)
{
    char app[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(app, sizeof(app), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "* BYE Logging out\r\nA4 OK Logout completed\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    imap_pool_limits_t lim = { .idle_ms = 200 };
    penv_t e;
    penv_start(&e, sc, 1, &lim);
    outcome_t o = penv_append(&e, "alice@test.example");
    assert_int_equal(o.res.status, IMAP_OK);
    penv_run_ms(&e, 80);
    assert_int_equal(e.f.c[0].cur, 4); /* still idle: no LOGOUT yet */
    assert_int_equal(penv_stats(&e).idle, 1);
    penv_wait_closed(&e, 0);
    penv_run_ms(&e, 30);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.expired, 1);
    assert_int_equal(st.idle, 0);
    /* the pool holds nothing any more: only the fake's listener is left */
    assert_int_equal(loop_timer_count(e.loop), 0);
    assert_int_equal(loop_fd_count(e.loop), 1);
    assert_int_equal(o.calls, 1);
    penv_end(&e);
}

/* The server says BYE and closes an idle session: it is dropped when
 * noticed, and the next append logs in afresh without an error. */
static void test_pool_server_closes_idle(void **state)
{
    char a0[1024], a1[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a0, sizeof(a0), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { NULL, "* BYE Disconnected for inactivity.\r\n", 50, 1 },
    };
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a1, sizeof(a1), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    penv_t e;
    penv_start(&e, sc, 2, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    penv_wait_closed(&e, 0);
    penv_run_ms(&e, 50);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.lost, 1);
    assert_int_equal(st.idle, 0);
    outcome_t o2 = penv_append(&e, "alice@test.example");
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(o2.res.uid, 2);
    assert_int_equal(o2.res.reused, 0);
    assert_int_equal(o2.res.connections, 1);
    penv_end(&e);
}

/* A silent EOF on an idle session (no BYE): noticed by the watch, the
 * session is dropped at once and holds no fd or timer any more. */
static void test_pool_idle_eof_noticed(void **state)
{
    char a0[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a0, sizeof(a0), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { NULL, NULL, 50, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    penv_t e;
    penv_start(&e, sc, 1, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    assert_int_equal(penv_stats(&e).idle, 1);
    penv_wait_closed(&e, 0);
    penv_run_ms(&e, 50);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.lost, 1);
    assert_int_equal(st.idle, 0);
    assert_int_equal(loop_fd_count(e.loop), 1); /* the fake's listener only */
    assert_int_equal(loop_timer_count(e.loop), 0);
    penv_end(&e);
}

/* The server closed while nobody ran the loop: the probe before reuse
 * finds it, and the append goes to a fresh connection. */
static void test_pool_probe_before_reuse(void **state)
{
    char a0[1024], a1[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a0, sizeof(a0), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
    };
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a1, sizeof(a1), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    penv_t e;
    penv_start(&e, sc, 2, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    fake_close(&e.f.c[0]); /* FIN is queued at the client before it runs again */
    outcome_t o2 = penv_append(&e, "alice@test.example");
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(o2.res.reused, 0);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.lost, 1);
    assert_int_equal(st.reused, 0);
    assert_int_equal(st.opened, 2);
    penv_end(&e);
}

/* APPEND refused: LOGOUT as without a pool, and never reused. */
static void test_pool_append_no(void **state)
{
    char a0[1024], a1[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a0, sizeof(a0), "A3", "\"Sent\"", 1, 1), "A3 NO [OVERQUOTA] Quota exceeded\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "* BYE\r\nA4 OK\r\n", 0, 1 },
    };
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a1, sizeof(a1), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    penv_t e;
    penv_start(&e, sc, 2, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_EREFUSED);
    penv_wait_closed(&e, 0);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.parked, 0);
    assert_int_equal(st.idle, 0);
    outcome_t o2 = penv_append(&e, "alice@test.example");
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(o2.res.reused, 0);
    assert_int_equal(penv_stats(&e).reused, 0);
    penv_end(&e);
}

/* max_appends = 2: the second append's session says LOGOUT; the third
 * append opens a new connection. */
static void test_pool_max_appends(void **state)
{
    char a3[1024], a4[1024], b3[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), "A4 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { "A5 LOGOUT\r\n", "* BYE\r\nA5 OK\r\n", 0, 1 },
    };
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(b3, sizeof(b3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 3] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    imap_pool_limits_t lim = { .max_appends = 2 };
    penv_t e;
    penv_start(&e, sc, 2, &lim);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    outcome_t o2 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(o2.res.reused, 1);
    penv_wait_closed(&e, 0); /* logged out right after the second */
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.retired, 1);
    assert_int_equal(st.idle, 0);
    outcome_t o3 = penv_append(&e, "alice@test.example");
    assert_int_equal(o3.res.status, IMAP_OK);
    assert_int_equal(o3.res.uid, 3);
    assert_int_equal(o3.res.reused, 0);
    assert_int_equal(penv_stats(&e).opened, 2);
    penv_end(&e);
}

/* Cancel a pooled append in flight on a reused session: no callback, the
 * connection is closed (not parked), the next append connects afresh. */
static void test_pool_cancel(void **state)
{
    char a3[1024], a4[1024], b3[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), NULL, 0, 0 }, /* and no answer */
    };
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(b3, sizeof(b3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 3] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    penv_t e;
    penv_start(&e, sc, 2, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);

    imap_account_t acct = penv_acct(&e, "alice@test.example");
    outcome_t o2;
    memset(&o2, 0, sizeof(o2));
    imap_append_t *a = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o2);
    assert_non_null(a);
    penv_run_ms(&e, 100);
    assert_int_equal(e.f.c[0].cur, 5); /* the APPEND arrived */
    imap_append_free(a);
    penv_wait_closed(&e, 0);
    penv_run_ms(&e, 30);
    assert_int_equal(o2.calls, 0);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.reused, 1);
    assert_int_equal(st.idle, 0);

    outcome_t o3 = penv_append(&e, "alice@test.example");
    assert_int_equal(o3.res.status, IMAP_OK);
    assert_int_equal(o3.res.reused, 0);
    assert_int_equal(o2.calls, 0);
    penv_end(&e);
}

/* Two appends at once for one account: two connections. With one idle
 * session allowed per account, the second to finish says LOGOUT (its
 * reply never comes); pool_free then LOGOUTs the idle one, drops the one
 * still logging out, and no callback fires again. */
static void test_pool_concurrent_and_free(void **state)
{
    char a3[1024];
    const step_t c[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", NULL, 0, 0 }, /* at retirement or at pool_free; no reply */
    };
    const script_t sc[] = { { c, NSTEPS(c) }, { c, NSTEPS(c) } };
    imap_pool_limits_t lim = { .max_idle_per_account = 1 };
    penv_t e;
    penv_start(&e, sc, 2, &lim);
    imap_account_t acct = penv_acct(&e, "alice@test.example");
    outcome_t o1, o2;
    memset(&o1, 0, sizeof(o1));
    memset(&o2, 0, sizeof(o2));
    imap_append_t *h1 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o1);
    imap_append_t *h2 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o2);
    assert_non_null(h1);
    assert_non_null(h2);
    penv_wait_calls(&e, &o1, 1);
    penv_wait_calls(&e, &o2, 1);
    imap_append_free(h1);
    imap_append_free(h2);
    penv_run_ms(&e, 50);
    assert_int_equal(o1.res.status, IMAP_OK);
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(e.f.accepted, 2);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.opened, 2);
    assert_int_equal(st.parked, 1);
    assert_int_equal(st.retired, 1);
    assert_int_equal(st.idle, 1);
    penv_end(&e); /* loop empty, scripts done (both LOGOUTs seen) */
    assert_int_equal(o1.calls, 1);
    assert_int_equal(o2.calls, 1);
}

/* One connection allowed per account: three appends at once share it,
 * in the order they were started; the two that queued reuse it. */
static void test_pool_cap_queues(void **state)
{
    char a3[1024], a4[1024], a5[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), "A4 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { append_cmd(a5, sizeof(a5), "A5", "\"Sent\"", 1, 1), "A5 OK [APPENDUID 77 3] done\r\n", 0, 0 },
        { "A6 LOGOUT\r\n", "A6 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    imap_pool_limits_t lim = { .max_conns_per_account = 1 };
    penv_t e;
    penv_start(&e, sc, 1, &lim);
    imap_account_t acct = penv_acct(&e, "alice@test.example");
    outcome_t o[3];
    imap_append_t *h[3];
    memset(o, 0, sizeof(o));
    for (int i = 0; i < 3; i++)
        assert_non_null(h[i] = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o[i]));
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.waiting, 2);
    for (int i = 0; i < 3; i++)
        penv_wait_calls(&e, &o[i], 1);
    for (int i = 0; i < 3; i++)
        imap_append_free(h[i]);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(o[i].res.status, IMAP_OK);
        assert_int_equal(o[i].res.uid, (unsigned)i + 1); /* first come, first served */
        assert_int_equal(o[i].res.reused, i > 0);
        assert_int_equal(o[i].res.connections, i == 0 ? 1u : 0u);
    }
    st = penv_stats(&e);
    assert_int_equal(st.opened, 1);
    assert_int_equal(st.waited, 2);
    assert_int_equal(st.reused, 2);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(e.f.accepted, 1);
    penv_end(&e);
}

/* The one connection is slow: a queued append with a short timeout gives
 * up with IMAP_ETIMEOUT, a cancelled one is never called back, and the
 * first completes. */
static void test_pool_wait_timeout_and_cancel(void **state)
{
    char a3[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 600, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    imap_pool_limits_t lim = { .max_conns_per_account = 1 };
    penv_t e;
    penv_start(&e, sc, 1, &lim);
    imap_account_t acct = penv_acct(&e, "alice@test.example");
    imap_account_t hasty = acct;
    hasty.timeout_ms = 150; /* not part of the key: same account */
    outcome_t o1, o2, o3;
    memset(&o1, 0, sizeof(o1));
    memset(&o2, 0, sizeof(o2));
    memset(&o3, 0, sizeof(o3));
    imap_append_t *h1 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o1);
    imap_append_t *h2 = imap_append_start(e.loop, &hasty, MSG, strlen(MSG), on_done, &o2);
    assert_non_null(h1);
    assert_non_null(h2);
    imap_append_t *h3 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o3);
    assert_non_null(h3);
    assert_int_equal(penv_stats(&e).waiting, 2);
    imap_append_free(h3);
    assert_int_equal(penv_stats(&e).waiting, 1);
    penv_wait_calls(&e, &o2, 1);
    assert_int_equal(o2.res.status, IMAP_ETIMEOUT);
    assert_non_null(strstr(o2.res.error, "no IMAP session of the account came free within 150 ms"));
    assert_int_equal(o1.calls, 0); /* still waiting for its reply */
    penv_wait_calls(&e, &o1, 1);
    assert_int_equal(o1.res.status, IMAP_OK);
    penv_run_ms(&e, 30);
    assert_int_equal(o3.calls, 0);
    imap_append_free(h1);
    imap_append_free(h2);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.waited, 2);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(st.idle, 1);
    penv_end(&e);
}

/* A queued append handed a parked session, cancelled while its APPEND is
 * out: that session is closed, the caller hears nothing, and the slot it
 * held goes to the next append (a fresh connection). */
static void test_pool_cancel_served_waiter(void **state)
{
    char a3[1024], a4[1024], b3[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 100, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), NULL, 0, 0 }, /* and no answer */
    };
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(b3, sizeof(b3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 3] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    imap_pool_limits_t lim = { .max_conns_per_account = 1 };
    penv_t e;
    penv_start(&e, sc, 2, &lim);
    imap_account_t acct = penv_acct(&e, "alice@test.example");
    outcome_t o1, o2;
    memset(&o1, 0, sizeof(o1));
    memset(&o2, 0, sizeof(o2));
    imap_append_t *h1 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o1);
    assert_non_null(h1);
    imap_append_t *h2 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o2);
    assert_non_null(h2);
    penv_wait_calls(&e, &o1, 1);
    imap_append_free(h1);
    assert_int_equal(o1.res.status, IMAP_OK);
    penv_run_ms(&e, 100);
    assert_int_equal(e.f.c[0].cur, 5); /* the queued append's APPEND arrived on the parked session */
    imap_append_free(h2);
    penv_wait_closed(&e, 0);
    outcome_t o3 = penv_append(&e, "alice@test.example");
    assert_int_equal(o3.res.status, IMAP_OK);
    assert_int_equal(o3.res.uid, 3);
    assert_int_equal(o3.res.reused, 0);
    assert_int_equal(o2.calls, 0);
    assert_int_equal(e.f.accepted, 2);
    penv_end(&e);
}

#define CHECK_EXAMINE "A3 EXAMINE \"Sent\"\r\n"
#define CHECK_EXAMINE_OK "* 2 EXISTS\r\n* OK [UIDVALIDITY 77] UIDs valid\r\nA3 OK [READ-ONLY] Examine completed\r\n"
#define CHECK_SEARCH "A4 UID SEARCH HEADER Message-ID \"<m1@test.example>\"\r\n"

/* check_message_id finds the copy an earlier attempt stored: its UID is
 * reported, nothing is appended. */
static void test_check_found(void **state)
{
    const step_t steps[] = {
        P_OPEN("alice@test.example"),
        { CHECK_EXAMINE, CHECK_EXAMINE_OK, 0, 0 },
        { CHECK_SEARCH, "* SEARCH 2 5\r\nA4 OK Search completed\r\n", 0, 0 },
        { "A5 CLOSE\r\n", "A5 OK Close completed\r\n", 0, 0 },
        { "A6 LOGOUT\r\n", "* BYE\r\nA6 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .check_msgid = "<m1@test.example>" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_OK);
    assert_int_equal(o.res.already_stored, 1);
    assert_int_equal(o.res.uidvalidity, 77);
    assert_int_equal(o.res.uid, 5); /* the newest of the two */
    assert_string_equal(o.res.mailbox, "Sent");
}

/* Not there: the same conversation, then the APPEND. */
static void test_check_absent_appends(void **state)
{
    char app[1024];
    const step_t steps[] = {
        P_OPEN("alice@test.example"),
        { CHECK_EXAMINE, CHECK_EXAMINE_OK, 0, 0 },
        { CHECK_SEARCH, "* SEARCH\r\nA4 OK Search completed\r\n", 0, 0 },
        { "A5 CLOSE\r\n", "A5 OK Close completed\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A6", "\"Sent\"", 1, 1), "A6 OK [APPENDUID 77 3] done\r\n", 0, 0 },
        { "A7 LOGOUT\r\n", "* BYE\r\nA7 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .check_msgid = "<m1@test.example>" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_OK);
    assert_int_equal(o.res.already_stored, 0);
    assert_int_equal(o.res.uid, 3);
}

/* A server that refuses the search: the copy is stored anyway (the check
 * is a precaution, never a reason to lose the Sent copy). */
static void test_check_refused_still_appends(void **state)
{
    char app[1024];
    const step_t steps[] = {
        P_OPEN("alice@test.example"),
        { CHECK_EXAMINE, "A3 NO [NOPERM] not allowed\r\n", 0, 0 },
        { append_cmd(app, sizeof(app), "A4", "\"Sent\"", 1, 1), "A4 OK [APPENDUID 77 4] done\r\n", 0, 0 },
        { "A5 LOGOUT\r\n", "* BYE\r\nA5 OK\r\n", 0, 1 },
    };
    run_opts_t opt = { .check_msgid = "<m1@test.example>" };
    outcome_t o = run_script(steps, NSTEPS(steps), &opt);
    assert_int_equal(o.res.status, IMAP_OK);
    assert_int_equal(o.res.already_stored, 0);
    assert_int_equal(o.res.uid, 4);
}

/* Pooled: the check runs on a reused session too (tags go on), and the
 * session is parked again after a copy was found. */
static void test_pool_check_on_reused(void **state)
{
    char a3[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { "A4 EXAMINE \"Sent\"\r\n", "* OK [UIDVALIDITY 77] ok\r\nA4 OK [READ-ONLY] done\r\n", 0, 0 },
        { "A5 UID SEARCH HEADER Message-ID \"<m1@test.example>\"\r\n", "* SEARCH 1\r\nA5 OK done\r\n", 0, 0 },
        { "A6 CLOSE\r\n", "A6 OK done\r\n", 0, 0 },
        { "A7 LOGOUT\r\n", "A7 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    penv_t e;
    penv_start(&e, sc, 1, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    imap_account_t acct = penv_acct(&e, "alice@test.example");
    acct.check_message_id = "<m1@test.example>";
    outcome_t o2;
    memset(&o2, 0, sizeof(o2));
    imap_append_t *h2 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o2);
    assert_non_null(h2);
    penv_wait_calls(&e, &o2, 1);
    imap_append_free(h2);
    assert_int_equal(o2.res.status, IMAP_OK);
    assert_int_equal(o2.res.already_stored, 1);
    assert_int_equal(o2.res.uid, 1);
    assert_int_equal(o2.res.reused, 1);
    assert_int_equal(penv_stats(&e).idle, 1);
    penv_end(&e);
}

/* A reused session reset by the server before any answer to APPEND: the
 * server's socket was gone, so the append moves to a fresh connection
 * once and the caller sees only the success. */
static void test_pool_retry_after_reset(void **state)
{
    char a3[1024], a4[1024], b3[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), NULL, 0, FAKE_RESET },
    };
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(b3, sizeof(b3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 9] done\r\n", 0, 0 },
        { "A4 LOGOUT\r\n", "A4 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, NSTEPS(c1) } };
    penv_t e;
    penv_start(&e, sc, 2, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    outcome_t o2 = penv_append(&e, "alice@test.example");
    if (o2.res.status != IMAP_OK)
        fail_msg("retry did not hide the dead session: %s", o2.res.error);
    assert_int_equal(o2.res.uid, 9);
    assert_int_equal(o2.res.reused, 1);
    assert_int_equal(o2.res.connections, 1);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.retried, 1);
    assert_int_equal(st.opened, 2);
    penv_end(&e);
}

/* A clean close after the whole APPEND reached the server: it may have
 * stored the message, so the failure is reported and nothing is retried. */
static void test_pool_no_retry_after_eof(void **state)
{
    char a3[1024], a4[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), NULL, 20, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    penv_t e;
    penv_start(&e, sc, 1, NULL);
    outcome_t o1 = penv_append(&e, "alice@test.example");
    assert_int_equal(o1.res.status, IMAP_OK);
    outcome_t o2 = penv_append(&e, "alice@test.example");
    assert_int_equal(o2.res.status, IMAP_ENETWORK);
    assert_int_equal(o2.res.reused, 1);
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.retried, 0);
    assert_int_equal(st.opened, 1);
    penv_end(&e);
}

/* The same clean close when the Message-ID is known: the append moves to
 * a fresh connection (script c1) that looks for the copy first. Returns
 * the second append's outcome; *st the pool's counters before the end. */
static outcome_t eof_after_append(const step_t *c1, size_t n1, imap_pool_stats_t *st)
{
    char a3[1024], a4[1024];
    const step_t c0[] = {
        P_OPEN("alice@test.example"),
        { append_cmd(a3, sizeof(a3), "A3", "\"Sent\"", 1, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { append_cmd(a4, sizeof(a4), "A4", "\"Sent\"", 1, 1), NULL, 20, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) }, { c1, n1 } };
    penv_t e;
    penv_start(&e, sc, 2, NULL);
    imap_account_t acct = penv_acct(&e, "alice@test.example");
    acct.message_id = "<m1@test.example>";
    outcome_t o1, o2;
    memset(&o1, 0, sizeof(o1));
    memset(&o2, 0, sizeof(o2));
    imap_append_t *h1 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o1);
    assert_non_null(h1);
    penv_wait_calls(&e, &o1, 1);
    imap_append_free(h1);
    assert_int_equal(o1.res.status, IMAP_OK);
    assert_int_equal(o1.res.already_stored, 0); /* no search on a first try */
    imap_append_t *h2 = imap_append_start(e.loop, &acct, MSG, strlen(MSG), on_done, &o2);
    assert_non_null(h2);
    penv_wait_calls(&e, &o2, 1);
    imap_append_free(h2);
    if (o2.res.status != IMAP_OK)
        fail_msg("ambiguous close reported: %s", o2.res.error);
    *st = penv_stats(&e);
    penv_end(&e);
    return o2;
}

/* The server had stored it: its UID is reported, nothing appended twice. */
static void test_pool_eof_retry_finds_copy(void **state)
{
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { CHECK_EXAMINE, CHECK_EXAMINE_OK, 0, 0 },
        { CHECK_SEARCH, "* SEARCH 2\r\nA4 OK Search completed\r\n", 0, 0 },
        { "A5 CLOSE\r\n", "A5 OK Close completed\r\n", 0, 0 },
        { "A6 LOGOUT\r\n", "A6 OK\r\n", 0, 1 },
    };
    imap_pool_stats_t st;
    outcome_t o = eof_after_append(c1, NSTEPS(c1), &st);
    assert_int_equal(o.res.already_stored, 1);
    assert_int_equal(o.res.uid, 2);
    assert_int_equal(o.res.reused, 1);
    assert_int_equal(o.res.connections, 1);
    assert_int_equal(st.retried, 1);
    assert_int_equal(st.opened, 2);
    assert_int_equal(st.idle, 1); /* the fresh session is parked */
}

/* The server had not stored it: the fresh connection appends it. */
static void test_pool_eof_retry_appends(void **state)
{
    char b6[1024];
    const step_t c1[] = {
        P_OPEN("alice@test.example"),
        { CHECK_EXAMINE, CHECK_EXAMINE_OK, 0, 0 },
        { CHECK_SEARCH, "* SEARCH\r\nA4 OK Search completed\r\n", 0, 0 },
        { "A5 CLOSE\r\n", "A5 OK Close completed\r\n", 0, 0 },
        { append_cmd(b6, sizeof(b6), "A6", "\"Sent\"", 1, 1), "A6 OK [APPENDUID 77 2] done\r\n", 0, 0 },
        { "A7 LOGOUT\r\n", "A7 OK\r\n", 0, 1 },
    };
    imap_pool_stats_t st;
    outcome_t o = eof_after_append(c1, NSTEPS(c1), &st);
    assert_int_equal(o.res.already_stored, 0);
    assert_int_equal(o.res.uid, 2);
    assert_int_equal(st.retried, 1);
}

/* ------------------------------------------------------------ MULTIAPPEND */

#define P_LOGIN_OK_MA                                                                                    \
    "A1 OK [CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS SPECIAL-USE LIST-EXTENDED MULTIAPPEND] Logged in\r\n"
#define P_OPEN_MA(user)                                                                                  \
    { NULL, P_GREETING, 0, 0 }, { P_LOGIN(user), P_LOGIN_OK_MA, 0, 0 }, { P_LIST, P_LIST_OK, 0, 0 }

static const char *const BODIES[] = {
    "From: alice@test.example\r\nSubject: one\r\n\r\nfirst\r\n",
    "From: alice@test.example\r\nSubject: two\r\n\r\nsecond\r\n",
    "From: alice@test.example\r\nSubject: three\r\n\r\nthird\r\n",
    "From: alice@test.example\r\nSubject: four\r\n\r\nfourth\r\n",
};

/* "<tag> APPEND "Sent" (\Seen) {n+}<CRLF><body> ..." for the bodies listed. */
static const char *multi_cmd(char *buf, size_t n, const char *tag, const int *which, size_t k)
{
    size_t used = (size_t)snprintf(buf, n, "%s APPEND \"Sent\"", tag);
    for (size_t i = 0; i < k; i++)
        used += (size_t)snprintf(buf + used, n - used, " (\\Seen) {%zu+}\r\n%s", strlen(BODIES[which[i]]),
                                 BODIES[which[i]]);
    snprintf(buf + used, n - used, "\r\n");
    return buf;
}

/* Four appends start while the account's one connection opens. The
 * second and fourth wait and then go in one APPEND (MULTIAPPEND), in
 * arrival order, each with its uid from the APPENDUID set; the third must
 * look for an earlier copy first, so it is not batched and runs alone
 * afterwards. */
static void test_pool_multiappend(void **state)
{
    char a3[1024], a4[2048], a8[1024];
    const int first[] = { 0 }, pair[] = { 1, 3 }, third[] = { 2 };
    const step_t c0[] = {
        P_OPEN_MA("alice@test.example"),
        { multi_cmd(a3, sizeof(a3), "A3", first, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { multi_cmd(a4, sizeof(a4), "A4", pair, 2), "A4 OK [APPENDUID 77 2:3] done\r\n", 0, 0 },
        { "A5 EXAMINE \"Sent\"\r\n", "* OK [UIDVALIDITY 77] ok\r\nA5 OK [READ-ONLY] done\r\n", 0, 0 },
        { "A6 UID SEARCH HEADER Message-ID \"<m3@test.example>\"\r\n", "* SEARCH\r\nA6 OK done\r\n", 0, 0 },
        { "A7 CLOSE\r\n", "A7 OK done\r\n", 0, 0 },
        { multi_cmd(a8, sizeof(a8), "A8", third, 1), "A8 OK [APPENDUID 77 4] done\r\n", 0, 0 },
        { "A9 LOGOUT\r\n", "A9 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    imap_pool_limits_t lim = { .max_conns_per_account = 1 };
    penv_t e;
    penv_start(&e, sc, 1, &lim);
    outcome_t o[4];
    imap_append_t *h[4];
    memset(o, 0, sizeof(o));
    for (int i = 0; i < 4; i++) {
        imap_account_t acct = penv_acct(&e, "alice@test.example");
        if (i == 2)
            acct.check_message_id = "<m3@test.example>";
        assert_non_null(h[i] = imap_append_start(e.loop, &acct, BODIES[i], strlen(BODIES[i]), on_done, &o[i]));
    }
    for (int i = 0; i < 4; i++)
        penv_wait_calls(&e, &o[i], 1);
    for (int i = 0; i < 4; i++)
        imap_append_free(h[i]);
    const unsigned uid[] = { 1, 2, 4, 3 }, batched[] = { 0, 2, 0, 2 };
    for (int i = 0; i < 4; i++) {
        if (o[i].res.status != IMAP_OK)
            fail_msg("append %d: %s", i, o[i].res.error);
        assert_int_equal(o[i].res.uid, uid[i]);
        assert_int_equal(o[i].res.uidvalidity, 77);
        assert_int_equal(o[i].res.batched, batched[i]);
        assert_int_equal(o[i].res.reused, i > 0);
        assert_string_equal(o[i].res.mailbox, "Sent");
    }
    imap_pool_stats_t st = penv_stats(&e);
    assert_int_equal(st.batches, 1);
    assert_int_equal(st.batched, 2);
    assert_int_equal(st.opened, 1);
    penv_end(&e);
}

/* A batch the server refuses, or answers with one uid for two messages:
 * every copy in it gets that failure (their owners retry them, looking for
 * an earlier copy first), and the session is logged out. */
static void test_pool_multiappend_failures(void **state)
{
    const char *answer[] = { "A4 NO [OVERQUOTA] Quota exceeded\r\n", "A4 OK [APPENDUID 77 2] done\r\n" };
    const int want[] = { IMAP_EREFUSED, IMAP_EPROTO };
    for (int k = 0; k < 2; k++) {
        char a3[1024], a4[2048];
        const int first[] = { 0 }, pair[] = { 1, 2 };
        const step_t c0[] = {
            P_OPEN_MA("alice@test.example"),
            { multi_cmd(a3, sizeof(a3), "A3", first, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
            { multi_cmd(a4, sizeof(a4), "A4", pair, 2), answer[k], 0, 0 },
            { "A5 LOGOUT\r\n", "A5 OK\r\n", 0, 1 },
        };
        const script_t sc[] = { { c0, NSTEPS(c0) } };
        imap_pool_limits_t lim = { .max_conns_per_account = 1 };
        penv_t e;
        penv_start(&e, sc, 1, &lim);
        imap_account_t acct = penv_acct(&e, "alice@test.example");
        outcome_t o[3];
        imap_append_t *h[3];
        memset(o, 0, sizeof(o));
        for (int i = 0; i < 3; i++)
            assert_non_null(h[i] = imap_append_start(e.loop, &acct, BODIES[i], strlen(BODIES[i]), on_done, &o[i]));
        for (int i = 0; i < 3; i++)
            penv_wait_calls(&e, &o[i], 1);
        for (int i = 0; i < 3; i++)
            imap_append_free(h[i]);
        assert_int_equal(o[0].res.status, IMAP_OK);
        for (int i = 1; i < 3; i++) {
            assert_int_equal(o[i].res.status, want[k]);
            assert_int_equal(o[i].res.uid, 0);
            assert_int_equal(o[i].res.batched, 2);
        }
        if (k == 0)
            assert_non_null(strstr(o[1].res.error, "Quota exceeded"));
        else
            assert_non_null(strstr(o[1].res.error, "APPENDUID lists 1 uid"));
        penv_end(&e);
    }
}

/* Copies of a batch are cancelled (their owners are going away). Once the
 * whole batch has been written out, a cancelled copy is only forgotten:
 * the others get their answer. While the batch still waits to send (here:
 * a synchronizing literal waits for "+"), the connection is closed at once,
 * the cancelled copy is never called back, and the other fails right away
 * instead of waiting for an answer that will not come. */
static void test_pool_multiappend_cancel(void **state)
{
    for (int sent = 1; sent >= 0; sent--) {
        char a3[1024], a4[2048], s3[128], s4[128], b3[256];
        const int first[] = { 0 }, pair[] = { 1, 2 };
        snprintf(s3, sizeof(s3), "A3 APPEND \"Sent\" (\\Seen) {%zu}\r\n", strlen(BODIES[0]));
        snprintf(b3, sizeof(b3), "%s\r\n", BODIES[0]);
        snprintf(s4, sizeof(s4), "A4 APPEND \"Sent\" (\\Seen) {%zu}\r\n", strlen(BODIES[1]));
        const step_t c_sent[] = {
            P_OPEN_MA("alice@test.example"),
            { multi_cmd(a3, sizeof(a3), "A3", first, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
            { multi_cmd(a4, sizeof(a4), "A4", pair, 2), "A4 OK [APPENDUID 77 2:3] done\r\n", 300, 0 },
            { "A5 LOGOUT\r\n", "A5 OK\r\n", 0, 1 },
        };
        /* no LITERAL+: every literal waits for "+" */
        const step_t c_waiting[] = {
            { NULL, P_GREETING, 0, 0 },
            { P_LOGIN("alice@test.example"),
              "A1 OK [CAPABILITY IMAP4rev1 UIDPLUS SPECIAL-USE LIST-EXTENDED MULTIAPPEND] Logged in\r\n", 0, 0 },
            { P_LIST, P_LIST_OK, 0, 0 },
            { s3, "+ go\r\n", 0, 0 },
            { b3, "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
            { s4, NULL, 0, 0 }, /* and no "+" */
        };
        const script_t sc[] = { { sent ? c_sent : c_waiting, sent ? NSTEPS(c_sent) : NSTEPS(c_waiting) } };
        imap_pool_limits_t lim = { .max_conns_per_account = 1 };
        penv_t e;
        penv_start(&e, sc, 1, &lim);
        imap_account_t acct = penv_acct(&e, "alice@test.example");
        outcome_t o[3];
        memset(o, 0, sizeof(o));
        imap_append_t *h[3];
        for (int i = 0; i < 3; i++)
            assert_non_null(h[i] = imap_append_start(e.loop, &acct, BODIES[i], strlen(BODIES[i]), on_done, &o[i]));
        penv_wait_calls(&e, &o[0], 1);
        assert_int_equal(o[0].res.status, IMAP_OK);
        penv_run_ms(&e, 100); /* the batch is sent (or waits for "+") */
        assert_int_equal(penv_stats(&e).batches, 1);
        uint64_t t0 = loop_update_time(e.loop);
        imap_append_free(h[1]);
        penv_wait_calls(&e, &o[2], 1);
        if (sent) {
            assert_int_equal(o[2].res.status, IMAP_OK);
            assert_int_equal(o[2].res.uid, 3);
        } else {
            assert_true(loop_update_time(e.loop) - t0 < 1000);
            assert_int_equal(o[2].res.status, IMAP_ENETWORK);
        }
        penv_run_ms(&e, 50);
        assert_int_equal(o[1].calls, 0);
        imap_append_free(h[0]);
        imap_append_free(h[2]);
        penv_end(&e);
    }
}

/* Each caller frees its own handle from inside its callback: the first
 * (alone, on the fresh connection, which is parked after its callback) and
 * the two that went together in one MULTIAPPEND. The result stays valid
 * for the rest of the call; the handles are gone afterwards (ASan). */
typedef struct self_free {
    outcome_t      o;
    imap_append_t *h;
} self_free_t;

static void on_done_free(void *arg, const imap_append_result_t *res)
{
    self_free_t *sf = arg;
    on_done(&sf->o, res);
    imap_append_free(sf->h);
    assert_int_equal(res->uid, sf->o.res.uid); /* still valid after the free */
}

static void test_free_in_callback(void **state)
{
    char a3[1024], a4[2048];
    const int first[] = { 0 }, pair[] = { 1, 2 };
    const step_t c0[] = {
        P_OPEN_MA("alice@test.example"),
        { multi_cmd(a3, sizeof(a3), "A3", first, 1), "A3 OK [APPENDUID 77 1] done\r\n", 0, 0 },
        { multi_cmd(a4, sizeof(a4), "A4", pair, 2), "A4 OK [APPENDUID 77 2:3] done\r\n", 0, 0 },
        { "A5 LOGOUT\r\n", "A5 OK\r\n", 0, 1 },
    };
    const script_t sc[] = { { c0, NSTEPS(c0) } };
    imap_pool_limits_t lim = { .max_conns_per_account = 1 };
    penv_t e;
    penv_start(&e, sc, 1, &lim);
    imap_account_t acct = penv_acct(&e, "alice@test.example");
    self_free_t sf[3];
    memset(sf, 0, sizeof(sf));
    for (int i = 0; i < 3; i++)
        assert_non_null(sf[i].h =
                            imap_append_start(e.loop, &acct, BODIES[i], strlen(BODIES[i]), on_done_free, &sf[i]));
    for (int i = 0; i < 3; i++)
        penv_wait_calls(&e, &sf[i].o, 1);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(sf[i].o.res.status, IMAP_OK);
        assert_int_equal(sf[i].o.res.uid, (unsigned)i + 1);
    }
    assert_int_equal(penv_stats(&e).batches, 1);
    assert_int_equal(penv_stats(&e).idle, 1);
    penv_end(&e);
}

int main(void)
{
    const char *dbg = getenv("MP_TEST_DEBUG");
    log_setup(dbg && *dbg ? LOG_DEBUG : LOG_INFO, LOG_FMT_LOGFMT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parser_table),
        cmocka_unit_test(test_parser_prefixes),
        cmocka_unit_test(test_parser_limits),
        cmocka_unit_test(test_parser_search_uidvalidity),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_append_literal_plus),
        cmocka_unit_test(test_append_log_lines),
        cmocka_unit_test(test_append_sync_literal),
        cmocka_unit_test(test_append_gesendet),
        cmocka_unit_test(test_append_refused),
        cmocka_unit_test(test_append_refused_before_literal),
        cmocka_unit_test(test_login_refused),
        cmocka_unit_test(test_login_busy),
        cmocka_unit_test(test_no_appenduid),
        cmocka_unit_test(test_fallback_named_sent),
        cmocka_unit_test(test_no_sent_mailbox),
        cmocka_unit_test(test_authenticate_plain_sasl_ir),
        cmocka_unit_test(test_authenticate_plain_continuation),
        cmocka_unit_test(test_login_literal),
        cmocka_unit_test(test_login_sync_literal),
        cmocka_unit_test(test_preauth),
        cmocka_unit_test(test_starttls_missing),
        cmocka_unit_test(test_starttls_injection),
        cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_greeting_bye),
        cmocka_unit_test(test_server_closes),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_connect_refused),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_pool_reuse),
        cmocka_unit_test(test_pool_accounts),
        cmocka_unit_test(test_pool_idle_timeout),
        cmocka_unit_test(test_pool_server_closes_idle),
        cmocka_unit_test(test_pool_idle_eof_noticed),
        cmocka_unit_test(test_pool_probe_before_reuse),
        cmocka_unit_test(test_pool_append_no),
        cmocka_unit_test(test_pool_max_appends),
        cmocka_unit_test(test_pool_cancel),
        cmocka_unit_test(test_pool_concurrent_and_free),
        cmocka_unit_test(test_pool_retry_after_reset),
        cmocka_unit_test(test_pool_cap_queues),
        cmocka_unit_test(test_pool_wait_timeout_and_cancel),
        cmocka_unit_test(test_pool_cancel_served_waiter),
        cmocka_unit_test(test_check_found),
        cmocka_unit_test(test_check_absent_appends),
        cmocka_unit_test(test_check_refused_still_appends),
        cmocka_unit_test(test_pool_check_on_reused),
        cmocka_unit_test(test_pool_no_retry_after_eof),
        cmocka_unit_test(test_pool_eof_retry_finds_copy),
        cmocka_unit_test(test_pool_eof_retry_appends),
        cmocka_unit_test(test_pool_multiappend),
        cmocka_unit_test(test_pool_multiappend_failures),
        cmocka_unit_test(test_pool_multiappend_cancel),
        cmocka_unit_test(test_free_in_callback),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * SUMMARY
 *  tests/unit/test_msgjson.c - queue/msgjson: JSON body to message_t.
 * DESCRIPTION
 *  Good inputs in every accepted form, checked field by field; malformed
 *  inputs table-driven with the expected status and a piece of the
 *  reason (the reason is what an operator reads in mail.dead); and the
 *  address validator on its own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/buf.h"
#include "core/message.h"
#include "queue/msgjson.h"

static message_t *parse_ok(const char *json)
{
    message_t *m = (message_t *)0x1;
    char err[256] = "";
    int rc = msgjson_parse(json, strlen(json), &m, err, sizeof(err));
    if (rc != MSGJSON_OK)
        fail_msg("parse failed (%d): %s\ninput: %s", rc, err, json);
    assert_non_null(m);
    return m;
}

static void assert_addr(const mp_address_t *a, const char *addr, const char *name)
{
    assert_string_equal(a->addr, addr);
    if (name == NULL)
        assert_null(a->name);
    else
        assert_string_equal(a->name, name);
}

static int is_uuid4(const char *s)
{
    if (strlen(s) != 36)
        return 0;
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return 0;
        } else if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) {
            return 0;
        }
    }
    return s[14] == '4';
}

/* ---- good inputs ---------------------------------------------------------- */

static void test_minimal_defaults(void **state)
{
    (void)state;
    message_t *m = parse_ok("{\"from\":\"alice@test.example\",\"to\":\"bob@test.example\"}");
    assert_addr(&m->from, "alice@test.example", NULL);
    assert_int_equal(m->nto, 1);
    assert_addr(&m->to[0], "bob@test.example", NULL);
    assert_int_equal(m->ncc, 0);
    assert_int_equal(m->nbcc, 0);
    assert_null(m->cc);
    assert_null(m->bcc);
    assert_null(m->subject);
    assert_null(m->text);
    assert_null(m->html);
    assert_null(m->trace_id);
    assert_null(m->tenant);
    assert_null(m->campaign);
    assert_null(m->pool);
    assert_int_equal(m->nheaders, 0);
    assert_int_equal(m->priority, 0);
    assert_non_null(m->id);
    assert_true(is_uuid4(m->id));

    /* a fresh id per message */
    message_t *m2 = parse_ok("{\"from\":\"alice@test.example\",\"to\":[\"bob@test.example\"],"
                             "\"id\":null}");
    assert_true(is_uuid4(m2->id));
    assert_string_not_equal(m->id, m2->id);
    message_free(m2);
    message_free(m);
}

static void test_address_forms(void **state)
{
    (void)state;
    message_t *m = parse_ok(
        "{\"from\":\"Alice Smith <alice@test.example>\","
        " \"to\":[\"bob@test.example\","
        "        \"  \\\"Smith, Carol \\\\\\\"CJ\\\\\\\"\\\" <carol@test.example> \","
        "        {\"address\":\"dan@test.example\",\"name\":\"Dan D\"},"
        "        {\"address\":\"eve@test.example\"},"
        "        {\"address\":\"fay@test.example\",\"name\":null},"
        "        \"Jörg <joerg@bücher.example>\"],"
        " \"cc\":[{\"address\":\"\\\"quoted.local\\\"@test.example\",\"name\":\"Q\"}],"
        " \"bcc\":\"hidden@test.example\"}");
    assert_addr(&m->from, "alice@test.example", "Alice Smith");
    assert_int_equal(m->nto, 6);
    assert_addr(&m->to[0], "bob@test.example", NULL);
    assert_addr(&m->to[1], "carol@test.example", "Smith, Carol \"CJ\"");
    assert_addr(&m->to[2], "dan@test.example", "Dan D");
    assert_addr(&m->to[3], "eve@test.example", NULL);
    assert_addr(&m->to[4], "fay@test.example", NULL);
    assert_addr(&m->to[5], "joerg@bücher.example", "Jörg");
    assert_int_equal(m->ncc, 1);
    assert_addr(&m->cc[0], "\"quoted.local\"@test.example", "Q");
    assert_int_equal(m->nbcc, 1);
    assert_addr(&m->bcc[0], "hidden@test.example", NULL);
    message_free(m);

    m = parse_ok("{\"from\":{\"address\":\"alice@test.example\",\"name\":\"Alice\"},"
                 "\"to\":[\"b@test.example\"],\"cc\":[],\"bcc\":null}");
    assert_addr(&m->from, "alice@test.example", "Alice");
    assert_int_equal(m->ncc, 0);
    assert_int_equal(m->nbcc, 0);
    message_free(m);
}

static void test_all_fields(void **state)
{
    (void)state;
    message_t *m = parse_ok(
        "{\"id\":\"order-42.confirm_1\",\"trace_id\":\"4bf92f3577b34da6\","
        " \"from\":\"alice@test.example\",\"to\":[\"bob@test.example\"],"
        " \"subject\":\"Grüße ✓\",\"text\":\"line1\\r\\nline2\\n\",\"html\":\"<p>x</p>\","
        " \"headers\":{\"X-Campaign\":\"spring\",\"Reply-To\":\"help@test.example\","
        "              \"X-Empty\":\"\"},"
        " \"priority\":9,\"unknown\":{\"nested\":[1,2,3]},\"another\":null}");
    assert_string_equal(m->id, "order-42.confirm_1");
    assert_string_equal(m->trace_id, "4bf92f3577b34da6");
    assert_string_equal(m->subject, "Grüße ✓");
    assert_string_equal(m->text, "line1\r\nline2\n"); /* bodies kept as given */
    assert_string_equal(m->html, "<p>x</p>");
    assert_int_equal(m->nheaders, 3);
    /* the order of the JSON object is kept */
    assert_string_equal(m->headers[0].name, "X-Campaign");
    assert_string_equal(m->headers[0].value, "spring");
    assert_string_equal(m->headers[1].name, "Reply-To");
    assert_string_equal(m->headers[1].value, "help@test.example");
    assert_string_equal(m->headers[2].name, "X-Empty");
    assert_string_equal(m->headers[2].value, "");
    assert_int_equal(m->priority, 0); /* an AMQP property, not the body's */
    message_free(m);
}

/* The body is a byte range, not a C string. */
static void test_length_bounded(void **state)
{
    (void)state;
    static const char body[] = "{\"from\":\"a@test.example\",\"to\":\"b@test.example\"}GARBAGE";
    message_t *m = NULL;
    char err[128];
    assert_int_equal(msgjson_parse(body, sizeof(body) - 1 - 7, &m, err, sizeof(err)), MSGJSON_OK);
    assert_addr(&m->to[0], "b@test.example", NULL);
    message_free(m);
    assert_int_equal(msgjson_parse(body, sizeof(body) - 1, &m, err, sizeof(err)), MSGJSON_EJSON);
    assert_null(m);
    /* no error buffer at all is fine */
    assert_int_equal(msgjson_parse(body, sizeof(body) - 1, &m, NULL, 0), MSGJSON_EJSON);
}

/* ---- malformed inputs, table-driven ---------------------------------------- */

#define FROM "\"from\":\"a@test.example\""
#define TO "\"to\":[\"b@test.example\"]"

static const struct bad_case {
    const char *json;
    int         status;
    const char *reason; /* substring of the error */
} bad_cases[] = {
    { "not json", MSGJSON_EJSON, "invalid JSON at line 1 column 3: '[' or '{' expected" },
    { "", MSGJSON_EJSON, "invalid JSON at line" },
    { "{\"from\":", MSGJSON_EJSON, "invalid JSON at line 1 column 8" },
    { "{} trailing", MSGJSON_EJSON, "invalid JSON" },
    { "\"just a string\"", MSGJSON_EJSON, "invalid JSON" },
    { "{\"from\":\"a@test.example\",\"from\":\"c@test.example\"," TO "}", MSGJSON_EJSON,
      "duplicate" },
    { "{" FROM "," TO ",\"subject\":\"a\\u0000b\"}", MSGJSON_EJSON, "invalid JSON" },
    { "{" FROM "," TO ",\"subject\":\"\xff\xfe\"}", MSGJSON_EJSON, "invalid JSON" },
    { "[1,2]", MSGJSON_EINVAL, "must be a JSON object, not an array" },
    { "[{" FROM "," TO "}]", MSGJSON_EINVAL, "must be a JSON object" },
    { "{" TO "}", MSGJSON_EINVAL, "missing field \"from\"" },
    { "{\"from\":null," TO "}", MSGJSON_EINVAL, "missing field \"from\"" },
    { "{" FROM "}", MSGJSON_EINVAL, "missing field \"to\"" },
    { "{" FROM ",\"to\":[]}", MSGJSON_EINVAL, "\"to\" must not be empty" },
    { "{" FROM ",\"to\":42}", MSGJSON_EINVAL, "\"to\" must be an array or a string" },
    { "{" FROM ",\"to\":{\"address\":\"b@test.example\"}}", MSGJSON_EINVAL,
      "\"to\" must be an array or a string" },
    { "{" FROM ",\"to\":[true]}", MSGJSON_EINVAL, "\"to\"[0] must be a string or an object" },
    { "{" FROM ",\"to\":[\"ok@test.example\",\"bob@\"]}", MSGJSON_EINVAL,
      "invalid address in \"to\"[1]: \"bob@\"" },
    { "{" FROM ",\"to\":\"@x\"}", MSGJSON_EINVAL, "invalid address in \"to\": \"@x\"" },
    { "{" FROM ",\"to\":[\"a b@c\"]}", MSGJSON_EINVAL, "invalid address in \"to\"[0]: \"a b@c\"" },
    { "{" FROM ",\"to\":[\"<a@b>\"]}", MSGJSON_EINVAL, "invalid address in \"to\"[0]: \"<a@b>\"" },
    { "{" FROM ",\"to\":[\"a@b\\r\\nRcpt: x\"]}", MSGJSON_EINVAL,
      "invalid address in \"to\"[0]: \"a@b\\r\\nRcpt: x\"" },
    { "{" FROM ",\"to\":[\"Bob <bob@>\"]}", MSGJSON_EINVAL, "invalid address in \"to\"[0]: \"bob@\"" },
    { "{" FROM ",\"to\":[\"Bob <b@test.example\"]}", MSGJSON_EINVAL, "invalid address in \"to\"[0]" },
    { "{" FROM ",\"to\":[{\"address\":\"a..b@test.example\"}]}", MSGJSON_EINVAL,
      "invalid address in \"to\"[0]" },
    { "{" FROM "," TO ",\"cc\":[\"x@-bad.example\"]}", MSGJSON_EINVAL,
      "invalid address in \"cc\"[0]: \"x@-bad.example\"" },
    { "{" FROM "," TO ",\"cc\":7}", MSGJSON_EINVAL, "\"cc\" must be an array or a string" },
    { "{" FROM "," TO ",\"bcc\":[\"x@bad..example\"]}", MSGJSON_EINVAL,
      "invalid address in \"bcc\"[0]" },
    { "{\"from\":\"nobody\"," TO "}", MSGJSON_EINVAL, "invalid address in \"from\": \"nobody\"" },
    { "{\"from\":[\"a@test.example\"]," TO "}", MSGJSON_EINVAL,
      "\"from\" must be a string or an object" },
    { "{\"from\":{\"name\":\"A\"}," TO "}", MSGJSON_EINVAL, "missing field \"address\" in \"from\"" },
    { "{\"from\":{\"address\":5}," TO "}", MSGJSON_EINVAL, "\"from\".address must be a string" },
    { "{\"from\":{\"address\":\"a@test.example\",\"name\":5}," TO "}", MSGJSON_EINVAL,
      "\"from\".name must be a string" },
    { "{\"from\":{\"address\":\"a@test.example\",\"name\":\"A\\r\\nBcc: x\"}," TO "}",
      MSGJSON_EINVAL, "invalid display name in \"from\"" },
    { "{\"from\":\"Evil\\nBcc: x <a@test.example>\"," TO "}", MSGJSON_EINVAL,
      "invalid display name in \"from\"" },
    { "{" FROM "," TO ",\"subject\":5}", MSGJSON_EINVAL, "\"subject\" must be a string" },
    { "{" FROM "," TO ",\"subject\":[\"x\"]}", MSGJSON_EINVAL, "\"subject\" must be a string" },
    { "{" FROM "," TO ",\"subject\":\"hi\\r\\nBcc: x\"}", MSGJSON_EINVAL,
      "\"subject\" must not contain CR or LF" },
    { "{" FROM "," TO ",\"text\":false}", MSGJSON_EINVAL, "\"text\" must be a string" },
    { "{" FROM "," TO ",\"html\":{}}", MSGJSON_EINVAL, "\"html\" must be a string" },
    { "{" FROM "," TO ",\"headers\":[]}", MSGJSON_EINVAL, "\"headers\" must be an object" },
    { "{" FROM "," TO ",\"headers\":{\"X-A\":1}}", MSGJSON_EINVAL,
      "header \"X-A\" must have a string value" },
    { "{" FROM "," TO ",\"headers\":{\"X-A\":\"a\\r\\nBcc: x\"}}", MSGJSON_EINVAL,
      "value of header \"X-A\" contains CR or LF" },
    { "{" FROM "," TO ",\"headers\":{\"X-A\":\"ok\",\"X-B\":\"a\\nb\"}}", MSGJSON_EINVAL,
      "value of header \"X-B\" contains CR or LF" },
    { "{" FROM "," TO ",\"headers\":{\"X-A\":\"a\\rb\"}}", MSGJSON_EINVAL, "contains CR or LF" },
    { "{" FROM "," TO ",\"headers\":{\"Bad Name\":\"v\"}}", MSGJSON_EINVAL,
      "invalid header name \"Bad Name\"" },
    { "{" FROM "," TO ",\"headers\":{\"X:Y\":\"v\"}}", MSGJSON_EINVAL, "invalid header name" },
    { "{" FROM "," TO ",\"headers\":{\"\":\"v\"}}", MSGJSON_EINVAL, "invalid header name" },
    { "{" FROM "," TO ",\"headers\":{\"X-\\r\\nBcc\":\"v\"}}", MSGJSON_EINVAL,
      "invalid header name \"X-\\r\\nBcc\"" },
    { "{" FROM "," TO ",\"id\":\"has space\"}", MSGJSON_EINVAL, "invalid \"id\": \"has space\"" },
    { "{" FROM "," TO ",\"id\":\"\"}", MSGJSON_EINVAL, "invalid \"id\"" },
    { "{" FROM "," TO ",\"id\":\"<x@y>\"}", MSGJSON_EINVAL, "invalid \"id\"" },
    { "{" FROM "," TO ",\"id\":\"caf\xc3\xa9\"}", MSGJSON_EINVAL, "invalid \"id\"" },
    { "{" FROM "," TO ",\"id\":5}", MSGJSON_EINVAL, "\"id\" must be a string" },
    { "{" FROM "," TO ",\"trace_id\":5}", MSGJSON_EINVAL, "\"trace_id\" must be a string" },
    { "{" FROM "," TO ",\"trace_id\":\"t\\n1\"}", MSGJSON_EINVAL,
      "\"trace_id\" must not contain CR or LF" },
};

static void test_malformed_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
        const struct bad_case *c = &bad_cases[i];
        message_t *m = (message_t *)0x1;
        char err[256] = "";
        int rc = msgjson_parse(c->json, strlen(c->json), &m, err, sizeof(err));
        if (rc != c->status || m != NULL || strstr(err, c->reason) == NULL)
            fail_msg("case %zu: %s\n  got %d \"%s\"\n  want %d \"%s\"", i, c->json, rc, err,
                     c->status, c->reason);
    }
}

/* tenant, campaign, pool: kept as given, null is absent, and they stay
 * with the envelope once the content is dropped. */
static void test_sender_fields(void **state)
{
    (void)state;
    message_t *m = parse_ok("{" "\"from\":\"a@test.example\",\"to\":\"b@test.example\","
                            "\"tenant\":\"acme-Corp_1.eu\",\"campaign\":\"spring:2026/news@x+y=z\","
                            "\"pool\":\"marketing\",\"subject\":\"s\"}");
    assert_string_equal(m->tenant, "acme-Corp_1.eu");
    assert_string_equal(m->campaign, "spring:2026/news@x+y=z");
    assert_string_equal(m->pool, "marketing");
    message_drop_content(m);
    assert_null(m->subject);
    assert_string_equal(m->tenant, "acme-Corp_1.eu");
    assert_string_equal(m->campaign, "spring:2026/news@x+y=z");
    assert_string_equal(m->pool, "marketing");
    message_free(m);

    m = parse_ok("{\"from\":\"a@test.example\",\"to\":\"b@test.example\",\"tenant\":null,"
                 "\"campaign\":null,\"pool\":\"p\"}");
    assert_null(m->tenant);
    assert_null(m->campaign);
    assert_string_equal(m->pool, "p");
    message_free(m);

    /* the longest values allowed */
    char json[512], t64[65], c128[129];
    memset(t64, 'T', 64);
    t64[64] = '\0';
    memset(c128, 'c', 128);
    c128[128] = '\0';
    snprintf(json, sizeof(json),
             "{\"from\":\"a@test.example\",\"to\":\"b@test.example\",\"tenant\":\"%s\","
             "\"campaign\":\"%s\",\"pool\":\"%s\"}", t64, c128, t64);
    m = parse_ok(json);
    assert_string_equal(m->tenant, t64);
    assert_string_equal(m->campaign, c128);
    assert_string_equal(m->pool, t64);
    message_free(m);
}

static const struct bad_case bad_sender[] = {
    { "{" FROM "," TO ",\"tenant\":5}", MSGJSON_EINVAL, "\"tenant\" must be a string" },
    { "{" FROM "," TO ",\"tenant\":[\"a\"]}", MSGJSON_EINVAL, "\"tenant\" must be a string" },
    { "{" FROM "," TO ",\"campaign\":true}", MSGJSON_EINVAL, "\"campaign\" must be a string" },
    { "{" FROM "," TO ",\"pool\":{}}", MSGJSON_EINVAL, "\"pool\" must be a string" },
    { "{" FROM "," TO ",\"tenant\":\"\"}", MSGJSON_EINVAL,
      "invalid \"tenant\": must be 1-64 characters of letters, digits, '.', '_', '-' (got \"\")" },
    { "{" FROM "," TO ",\"tenant\":\"a b\"}", MSGJSON_EINVAL,
      "invalid \"tenant\": must be 1-64 characters of letters, digits, '.', '_', '-' (got \"a b\")" },
    { "{" FROM "," TO ",\"tenant\":\"a:b\"}", MSGJSON_EINVAL, "invalid \"tenant\"" },
    { "{" FROM "," TO ",\"tenant\":\"a\\r\\nb\"}", MSGJSON_EINVAL,
      "invalid \"tenant\": must be 1-64 characters of letters, digits, '.', '_', '-' (got \"a\\r\\nb\")" },
    { "{" FROM "," TO ",\"tenant\":\"caf\xc3\xa9\"}", MSGJSON_EINVAL, "invalid \"tenant\"" },
    { "{" FROM "," TO ",\"tenant\":\"a\\u0000b\"}", MSGJSON_EJSON, "invalid JSON" },
    { "{" FROM "," TO ",\"tenant\":\"a\",\"tenant\":\"b\"}", MSGJSON_EJSON, "duplicate" },
    { "{" FROM "," TO ",\"tenant\":\"" "TTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTT" "\"}",
      MSGJSON_EINVAL, "invalid \"tenant\": must be 1-64 characters" },
    { "{" FROM "," TO ",\"pool\":\"" "PPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP" "\"}",
      MSGJSON_EINVAL, "invalid \"pool\": must be 1-64 characters of letters, digits, '.', '_', '-'" },
    { "{" FROM "," TO ",\"pool\":\"a/b\"}", MSGJSON_EINVAL, "invalid \"pool\"" },
    { "{" FROM "," TO ",\"pool\":\"\"}", MSGJSON_EINVAL, "invalid \"pool\"" },
    { "{" FROM "," TO ",\"campaign\":\"\"}", MSGJSON_EINVAL,
      "invalid \"campaign\": must be 1-128 characters of letters, digits, '.', '_', '-', ':', '/', '@', "
      "'+', '=' (got \"\")" },
    { "{" FROM "," TO ",\"campaign\":\"a b\"}", MSGJSON_EINVAL, "invalid \"campaign\"" },
    { "{" FROM "," TO ",\"campaign\":\"a\\nb\"}", MSGJSON_EINVAL, "invalid \"campaign\"" },
    { "{" FROM "," TO ",\"campaign\":\"a%b\"}", MSGJSON_EINVAL, "invalid \"campaign\"" },
    { "{" FROM "," TO ",\"campaign\":\"a\\\"b\"}", MSGJSON_EINVAL, "invalid \"campaign\"" },
};

static void test_sender_fields_refused(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_sender) / sizeof(bad_sender[0]); i++) {
        const struct bad_case *c = &bad_sender[i];
        message_t *m = (message_t *)0x1;
        char err[256] = "";
        int rc = msgjson_parse(c->json, strlen(c->json), &m, err, sizeof(err));
        if (rc != c->status || m != NULL || strstr(err, c->reason) == NULL)
            fail_msg("case %zu: %s\n  got %d \"%s\"\n  want %d \"%s\"", i, c->json, rc, err,
                     c->status, c->reason);
    }
    /* one past the longest campaign */
    char json[512], c129[130];
    memset(c129, 'c', 129);
    c129[129] = '\0';
    snprintf(json, sizeof(json), "{" FROM "," TO ",\"campaign\":\"%s\"}", c129);
    message_t *m = NULL;
    char err[256] = "";
    assert_int_equal(msgjson_parse(json, strlen(json), &m, err, sizeof(err)), MSGJSON_EINVAL);
    assert_null(m);
    assert_non_null(strstr(err, "invalid \"campaign\": must be 1-128 characters"));
}

static void test_valid_ident(void **state)
{
    (void)state;
    assert_true(message_valid_ident(MESSAGE_TENANT, "acme"));
    assert_true(message_valid_ident(MESSAGE_TENANT, "A.b_c-9"));
    assert_false(message_valid_ident(MESSAGE_TENANT, ""));
    assert_false(message_valid_ident(MESSAGE_TENANT, "a:b"));
    assert_false(message_valid_ident(MESSAGE_TENANT, "a=b"));
    assert_false(message_valid_ident(MESSAGE_POOL, "a@b"));
    assert_true(message_valid_ident(MESSAGE_CAMPAIGN, "a:b/c@d+e=f"));
    assert_false(message_valid_ident(MESSAGE_CAMPAIGN, "a\"b"));
    assert_false(message_valid_ident(MESSAGE_CAMPAIGN, "a,b"));
    assert_false(message_valid_ident(MESSAGE_CAMPAIGN, "a\tb"));
    assert_false(message_valid_ident(MESSAGE_CAMPAIGN, "\x7f"));
}

/* ---- attachments and raw ------------------------------------------------------- */

static void test_attachments(void **state)
{
    (void)state;
    message_t *m = parse_ok(
        "{" FROM "," TO ",\"html\":\"<img src=cid:l>\",\"attachments\":["
        " {\"filename\":\"Grüße.pdf\",\"content_type\":\"application/pdf\","
        "  \"content_base64\":\"JVBERi0xLjQK\"},"
        " {\"filename\":\"logo.png\",\"content_type\":\"image/png; x-opt=\\\"a b\\\"\","
        "  \"content_base64\":\"AAEC\\r\\n/w==\\n\",\"content_id\":\"<l@x>\",\"inline\":true},"
        " {\"filename\":\"empty\",\"content_base64\":\"\",\"inline\":false,\"content_id\":null}]}");
    assert_int_equal(m->nattachments, 3);
    mp_attachment_t *a = m->attachments;
    assert_string_equal(a[0].filename, "Grüße.pdf");
    assert_string_equal(a[0].content_type, "application/pdf");
    assert_int_equal(a[0].len, 9);
    assert_memory_equal(a[0].data, "%PDF-1.4\n", 9);
    assert_null(a[0].content_id);
    assert_int_equal(a[0].is_inline, 0);
    assert_string_equal(a[1].content_type, "image/png; x-opt=\"a b\"");
    assert_int_equal(a[1].len, 4); /* line breaks between characters are fine */
    assert_memory_equal(a[1].data, "\x00\x01\x02\xff", 4);
    assert_string_equal(a[1].content_id, "l@x"); /* brackets dropped */
    assert_int_equal(a[1].is_inline, 1);
    assert_string_equal(a[2].content_type, "application/octet-stream"); /* default */
    assert_int_equal(a[2].len, 0);
    assert_null(m->raw);

    /* once built, a message in flight keeps only its envelope */
    message_drop_content(m);
    assert_null(m->attachments);
    assert_int_equal(m->nattachments, 0);
    assert_null(m->html);
    assert_null(m->text);
    assert_null(m->subject);
    assert_int_equal(m->nheaders, 0);
    assert_string_equal(m->from.addr, "a@test.example");
    assert_int_equal(m->nto, 1);
    assert_string_equal(m->to[0].addr, "b@test.example");
    message_drop_content(m); /* twice is harmless */
    message_free(m);
}

static void test_raw(void **state)
{
    (void)state;
    /* "From: a@b\r\n\r\nhi\r\n" */
    message_t *m = parse_ok("{" FROM "," TO ",\"cc\":\"c@test.example\","
                            "\"raw\":\"RnJvbTogYUBiDQoNCmhpDQo=\"}");
    assert_int_equal(m->raw_len, 17);
    assert_string_equal(m->raw, "From: a@b\r\n\r\nhi\r\n");
    assert_int_equal(m->ncc, 1);
    message_free(m);
}

static const struct bad_case bad_parts[] = {
    { "{" FROM "," TO ",\"attachments\":{}}", MSGJSON_EINVAL, "\"attachments\" must be an array" },
    { "{" FROM "," TO ",\"attachments\":[5]}", MSGJSON_EINVAL,
      "\"attachments\"[0] must be an object" },
    { "{" FROM "," TO ",\"attachments\":[{\"content_base64\":\"\"}]}", MSGJSON_EINVAL,
      "missing field \"filename\" in \"attachments\"[0]" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":7,\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "\"attachments\"[0].filename must be a string" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"\",\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "\"attachments\"[0].filename must be 1..255 octets, not 0" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\\r\\nBcc: x\",\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL,
      "\"attachments\"[0].filename contains a control character (CR, LF, ...): \"a\\r\\nBcc: x\"" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\\tb\",\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "filename contains a control character" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_type\":\"text/plain\\r\\nX: y\","
      "\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "invalid \"attachments\"[0].content_type: \"text/plain\\r\\nX: y\"" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_type\":\"text\","
      "\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "invalid \"attachments\"[0].content_type" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_type\":\"text/plain; x\","
      "\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "invalid \"attachments\"[0].content_type" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_type\":\"text/plain; a=\\\"b\","
      "\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "invalid \"attachments\"[0].content_type" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_type\":\"multipart/mixed\","
      "\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "not multipart" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_type\":5,"
      "\"content_base64\":\"\"}]}",
      MSGJSON_EINVAL, "\"attachments\"[0].content_type must be a string" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\"}]}", MSGJSON_EINVAL,
      "missing field \"content_base64\" in \"attachments\"[0]" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":[]}]}",
      MSGJSON_EINVAL, "\"attachments\"[0].content_base64 must be a string" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"QUJD\"},"
      "{\"filename\":\"b\",\"content_base64\":\"QU*D\"}]}",
      MSGJSON_EINVAL, "\"attachments\"[1].content_base64 is not valid base64 (at offset 2)" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"QUJ\"}]}",
      MSGJSON_EINVAL, "is not valid base64 (at offset 3)" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"QQ==QUJD\"}]}",
      MSGJSON_EINVAL, "is not valid base64 (at offset 4)" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"Q===\"}]}",
      MSGJSON_EINVAL, "is not valid base64 (at offset 1)" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"QR==\"}]}",
      MSGJSON_EINVAL, "is not valid base64" }, /* non-zero padding bits */
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"QUJD-_\"}]}",
      MSGJSON_EINVAL, "is not valid base64 (at offset 4)" }, /* base64url is not base64 */
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"\","
      "\"content_id\":\"a b@c\"}]}",
      MSGJSON_EINVAL, "invalid \"attachments\"[0].content_id: \"a b@c\"" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"\","
      "\"content_id\":\"<>\"}]}",
      MSGJSON_EINVAL, "invalid \"attachments\"[0].content_id" },
    { "{" FROM "," TO ",\"attachments\":[{\"filename\":\"a\",\"content_base64\":\"\","
      "\"inline\":\"yes\"}]}",
      MSGJSON_EINVAL, "\"attachments\"[0].inline must be a boolean" },
    { "{" FROM "," TO ",\"raw\":5}", MSGJSON_EINVAL, "\"raw\" must be a string (base64)" },
    { "{" FROM "," TO ",\"raw\":\"\"}", MSGJSON_EINVAL, "\"raw\" is empty" },
    { "{" FROM "," TO ",\"raw\":\"Zm9v!\"}", MSGJSON_EINVAL,
      "\"raw\" is not valid base64 (at offset 4)" },
    { "{" FROM "," TO ",\"raw\":\"QQBC\"}", MSGJSON_EINVAL, "\"raw\" contains a NUL byte at offset 1" },
    { "{" FROM "," TO ",\"raw\":\"QUJD\",\"text\":\"x\"}", MSGJSON_EINVAL,
      "\"raw\" cannot be combined with \"text\"" },
    { "{" FROM "," TO ",\"raw\":\"QUJD\",\"subject\":\"x\"}", MSGJSON_EINVAL,
      "\"raw\" cannot be combined with \"subject\"" },
    { "{" FROM "," TO ",\"raw\":\"QUJD\",\"attachments\":[]}", MSGJSON_EINVAL,
      "\"raw\" cannot be combined with \"attachments\"" },
    { "{" FROM "," TO ",\"raw\":\"QUJD\",\"headers\":{}}", MSGJSON_EINVAL,
      "\"raw\" cannot be combined with \"headers\"" },
};

static void test_malformed_parts(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_parts) / sizeof(bad_parts[0]); i++) {
        const struct bad_case *c = &bad_parts[i];
        message_t *m = (message_t *)0x1;
        char err[256] = "";
        int rc = msgjson_parse(c->json, strlen(c->json), &m, err, sizeof(err));
        if (rc != c->status || m != NULL || strstr(err, c->reason) == NULL)
            fail_msg("case %zu: %s\n  got %d \"%s\"\n  want %d \"%s\"", i, c->json, rc, err,
                     c->status, c->reason);
    }
}

/* Every byte value survives base64 in JSON, in every padding variant. */
static void test_base64_roundtrip(void **state)
{
    (void)state;
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t n = 0; n < 300; n += (n < 10 ? 1 : 37)) {
        unsigned char d[300];
        char json[1024], b64[512];
        size_t o = 0;
        for (size_t i = 0; i < n; i++)
            d[i] = (unsigned char)(255 - i * 13);
        for (size_t i = 0; i < n; i += 3) {
            unsigned v = (unsigned)d[i] << 16 | (i + 1 < n ? (unsigned)d[i + 1] << 8 : 0) |
                         (i + 2 < n ? d[i + 2] : 0);
            b64[o++] = tab[v >> 18];
            b64[o++] = tab[(v >> 12) & 63];
            b64[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
            b64[o++] = i + 2 < n ? tab[v & 63] : '=';
        }
        b64[o] = '\0';
        snprintf(json, sizeof(json),
                 "{" FROM "," TO ",\"attachments\":[{\"filename\":\"f\",\"content_base64\":\"%s\"}]}",
                 b64);
        message_t *m = parse_ok(json);
        assert_int_equal(m->attachments[0].len, n);
        if (n)
            assert_memory_equal(m->attachments[0].data, d, n);
        message_free(m);
    }
}

static void test_id_length(void **state)
{
    (void)state;
    char json[512], id[202];
    memset(id, 'x', 200);
    id[200] = '\0';
    snprintf(json, sizeof(json), "{" FROM "," TO ",\"id\":\"%s\"}", id);
    message_t *m = parse_ok(json);
    assert_string_equal(m->id, id);
    message_free(m);
    strcat(id, "x");
    snprintf(json, sizeof(json), "{" FROM "," TO ",\"id\":\"%s\"}", id);
    char err[256];
    assert_int_equal(msgjson_parse(json, strlen(json), &m, err, sizeof(err)), MSGJSON_EINVAL);
    assert_null(m);
    assert_non_null(strstr(err, "invalid \"id\""));
}

/* ---- the address validator ---------------------------------------------------- */

static void test_valid_address(void **state)
{
    (void)state;
    static const char *const good[] = {
        "a@b",
        "alice@test.example",
        "first.last+tag@sub.test.example",
        "o'brien@test.example",
        "x!#$%&'*+-/=?^_`{|}~@test.example",
        "\"john..doe\"@test.example",
        "\"a\\\"b\"@test.example",
        "user@b\xc3\xbc" "cher.example",
        "\xce\xb4\xce\xbf\xce\xba@\xcf\x80\xce\xb1.example",
        "x@123.example",
        "x@xn--bcher-kva.example",
    };
    static const char *const bad[] = {
        "", "ab", "bob@", "@x", "a b@c", "<a@b>", "a@b>", "a@b\r\nRcpt: x", "a@b\n",
        "a\t@b", "a..b@x", ".a@x", "a.@x", "a@x..y", "a@.x", "a@x.", "a@-x", "a@x-",
        "a@x_y", "a@[1.2.3.4]", "\"a\"b\"@x", "\"\"@x", "a@b@c", "a(b)@x", "a,b@x",
        "\xff@x", "a@\xc3", "a@\xed\xa0\x80x", /* surrogate */
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        if (!msgjson_valid_address(good[i]))
            fail_msg("should be valid: %s", good[i]);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (msgjson_valid_address(bad[i]))
            fail_msg("should be invalid: %s", bad[i]);
    assert_false(msgjson_valid_address(NULL));
}

static void test_valid_address_lengths(void **state)
{
    (void)state;
    char a[300];
    /* local part: 64 ok, 65 not */
    memset(a, 'l', 64);
    strcpy(a + 64, "@x.example");
    assert_true(msgjson_valid_address(a));
    memset(a, 'l', 65);
    strcpy(a + 65, "@x.example");
    assert_false(msgjson_valid_address(a));
    /* label: 63 ok, 64 not */
    a[0] = 'u';
    a[1] = '@';
    memset(a + 2, 'd', 63);
    strcpy(a + 65, ".example");
    assert_true(msgjson_valid_address(a));
    memset(a + 2, 'd', 64);
    strcpy(a + 66, ".example");
    assert_false(msgjson_valid_address(a));
    /* total: 254 ok, 255 not (64 + 1 + 63.63.61 / 62) */
    memset(a, 'l', 64);
    a[64] = '@';
    memset(a + 65, 'a', 63);
    a[128] = '.';
    memset(a + 129, 'b', 63);
    a[192] = '.';
    memset(a + 193, 'c', 61);
    a[254] = '\0';
    assert_int_equal(strlen(a), 254);
    assert_true(msgjson_valid_address(a));
    a[254] = 'c';
    a[255] = '\0';
    assert_false(msgjson_valid_address(a));
}

/* What the parser refuses anywhere in the body, also inside fields the
 * message model ignores, with jansson's position and text. */
static const struct bad_case bad_anywhere[] = {
    { "{" FROM "," TO ",\"x\":{\"k\":1,\"k\":2}}", MSGJSON_EJSON,
      "invalid JSON at line 1 column 63: duplicate object key" },
    { "{" FROM "," TO ",\"x\":[\"a\\u0000\"]}", MSGJSON_EJSON,
      "invalid JSON at line 1 column 63: \\u0000 is not allowed without JSON_ALLOW_NUL" },
    { "{" FROM "," TO ",\"x\\u0000\":1}", MSGJSON_EJSON,
      "invalid JSON at line 1 column 58: NUL byte in object key not supported" },
    { "{" FROM "," TO ",\"x\":\"\\udc00\"}", MSGJSON_EJSON, "column 61: invalid Unicode '\\uDC00'" },
    { "{" FROM "," TO ",\"x\":\"\\ud800x\"}", MSGJSON_EJSON, "invalid JSON at line 1" },
    { "{" FROM "," TO ",\"x\":\"\xc0\xaf\"}", MSGJSON_EJSON, "unable to decode byte 0xc0" },
    { "{" FROM "," TO ",\"x\":18446744073709551615}", MSGJSON_EJSON, "too big integer" },
    { "{" FROM "," TO ",\"x\":1e999}", MSGJSON_EJSON, "real number overflow" },
    { "{" FROM "," TO ",\"x\":[1,]}", MSGJSON_EJSON, "invalid JSON at line 1" },
    { "{" FROM "," TO ",\"x\":01}", MSGJSON_EJSON, "invalid JSON at line 1" },
    { "\xef\xbb\xbf{" FROM "," TO "}", MSGJSON_EJSON, "invalid JSON at line 1" },
};

static void test_refused_anywhere(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_anywhere) / sizeof(bad_anywhere[0]); i++) {
        const struct bad_case *c = &bad_anywhere[i];
        message_t *m = (message_t *)0x1;
        char err[256] = "";
        int rc = msgjson_parse(c->json, strlen(c->json), &m, err, sizeof(err));
        if (rc != c->status || m != NULL || strstr(err, c->reason) == NULL)
            fail_msg("case %zu: %s\n  got %d \"%s\"\n  want %d \"%s\"", i, c->json, rc, err,
                     c->status, c->reason);
    }
}

/* Nesting: jansson's bound (2048 levels) holds; one more is refused. */
static void test_depth(void **state)
{
    (void)state;
    for (int depth = 2047; depth <= 2049; depth++) {
        buf_t b = BUF_INIT;
        buf_puts(&b, "{" FROM "," TO ",\"x\":");
        for (int i = 0; i < depth - 1; i++)
            buf_putc(&b, '[');
        for (int i = 0; i < depth - 1; i++)
            buf_putc(&b, ']');
        buf_putc(&b, '}');
        message_t *m = NULL;
        char err[256] = "";
        int rc = msgjson_parse(buf_head(&b), buf_size(&b), &m, err, sizeof(err));
        if (depth <= 2048) {
            if (rc != MSGJSON_OK)
                fail_msg("depth %d: %s", depth, err);
        } else if (rc != MSGJSON_EJSON || strstr(err, "maximum parsing depth reached") == NULL) {
            fail_msg("depth %d: got %d \"%s\"", depth, rc, err);
        }
        message_free(m);
        buf_free(&b);
    }
}

/* A body past what a thread's parser keeps (256 KiB) takes a parser of
 * its own: parsed alike, refused alike, and the next small body still
 * parses on the thread's parser. */
static void test_large_body(void **state)
{
    (void)state;
    for (int dup = 0; dup <= 1; dup++) {
        buf_t b = BUF_INIT;
        buf_puts(&b, "{" FROM "," TO ",\"text\":\"");
        while (buf_size(&b) < 300 * 1024)
            buf_puts(&b, "caf\xc3\xa9 line\\n");
        buf_puts(&b, dup ? "\",\"to\":\"c@test.example\"}" : "\"}");
        message_t *m = NULL;
        char err[256] = "";
        int rc = msgjson_parse(buf_head(&b), buf_size(&b), &m, err, sizeof(err));
        if (dup) {
            assert_int_equal(rc, MSGJSON_EJSON);
            assert_null(m);
            assert_non_null(strstr(err, "duplicate object key"));
        } else {
            assert_int_equal(rc, MSGJSON_OK);
            assert_true(strlen(m->text) > 250 * 1024);
            assert_memory_equal(m->text, "caf\xc3\xa9 line\n", 10);
            message_free(m);
        }
        buf_free(&b);
    }
    message_t *m = parse_ok("{" FROM "," TO ",\"subject\":\"small\"}");
    assert_string_equal(m->subject, "small");
    message_free(m);
}

static void test_strerror(void **state)
{
    (void)state;
    assert_string_equal(msgjson_strerror(MSGJSON_OK), "success");
    assert_string_equal(msgjson_strerror(MSGJSON_EJSON), "invalid JSON");
    assert_string_equal(msgjson_strerror(MSGJSON_EINVAL), "invalid message");
    assert_string_equal(msgjson_strerror(MSGJSON_ENOMEM), "out of memory");
    assert_non_null(msgjson_strerror(12345));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_minimal_defaults),
        cmocka_unit_test(test_address_forms),
        cmocka_unit_test(test_all_fields),
        cmocka_unit_test(test_length_bounded),
        cmocka_unit_test(test_sender_fields),
        cmocka_unit_test(test_sender_fields_refused),
        cmocka_unit_test(test_valid_ident),
        cmocka_unit_test(test_malformed_table),
        cmocka_unit_test(test_id_length),
        cmocka_unit_test(test_valid_address),
        cmocka_unit_test(test_valid_address_lengths),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_refused_anywhere),
        cmocka_unit_test(test_depth),
        cmocka_unit_test(test_large_body),
        cmocka_unit_test(test_attachments),
        cmocka_unit_test(test_raw),
        cmocka_unit_test(test_malformed_parts),
        cmocka_unit_test(test_base64_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

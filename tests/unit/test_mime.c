/*
 * SUMMARY
 *  tests/unit/test_mime.c - mime/build: RFC 5322 builder and dot-stuffing.
 * DESCRIPTION
 *  Exact bytes for a fixed message; RFC 2047 and quoted-printable output
 *  decoded again here (by independent decoders) and compared with the
 *  input; the refusal cases (header injection, structural overrides); and
 *  the SMTP wire invariants of mime_dotstuff() over a few thousand random
 *  inputs from a fixed seed, so a failure is reproducible.
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
#include "core/util.h"
#include "mime/build.h"

#define NOW 1700000000 /* Tue, 14 Nov 2023 22:13:20 +0000 */

/* ---- fixtures ---------------------------------------------------------- */

static void set_addr(mp_address_t *a, const char *addr, const char *name)
{
    a->addr = xstrdup(addr);
    a->name = name ? xstrdup(name) : NULL;
}

static message_t *base_message(void)
{
    message_t *m = message_new();
    m->id = xstrdup("0f8e2a4c-6d1b-4c3e-9a57-1b2c3d4e5f60");
    set_addr(&m->from, "alice@test.example", "Alice Smith");
    m->to = xcalloc(1, sizeof(*m->to));
    m->nto = 1;
    set_addr(&m->to[0], "bob@test.example", NULL);
    return m;
}

static void add_header(message_t *m, const char *name, const char *value)
{
    m->headers = xrealloc(m->headers, (m->nheaders + 1) * sizeof(*m->headers));
    m->headers[m->nheaders].name = xstrdup(name);
    m->headers[m->nheaders].value = xstrdup(value);
    m->nheaders++;
}

static int build(const message_t *m, buf_t *out, char *err, size_t errlen)
{
    mime_opts_t o = { .now = NOW, .max_size = 0 };
    return mime_build(m, &o, out, err, errlen);
}

/* ---- independent decoders ------------------------------------------------ */

static int b64val(char c)
{
    const char *tab = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const char *p = c ? strchr(tab, c) : NULL;
    return p ? (int)(p - tab) : -1;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static void b64_decode(const char *s, size_t n, buf_t *out)
{
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n && s[i] != '='; i++) {
        int v = b64val(s[i]);
        assert_true(v >= 0);
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf_putc(out, (char)((acc >> bits) & 0xff));
        }
    }
}

static void q_decode(const char *s, size_t n, buf_t *out)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '_') {
            buf_putc(out, ' ');
        } else if (s[i] == '=') {
            assert_true(i + 2 < n);
            int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
            assert_true(h >= 0 && l >= 0);
            buf_putc(out, (char)(h * 16 + l));
            i += 2;
        } else {
            buf_putc(out, s[i]);
        }
    }
}

/* Well-formed UTF-8 check, used on each encoded-word on its own: a word
 * that ends inside a character would fail it. */
static int utf8_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t need;
        if (s[i] < 0x80)
            need = 0;
        else if (s[i] >= 0xc2 && s[i] <= 0xdf)
            need = 1;
        else if (s[i] >= 0xe0 && s[i] <= 0xef)
            need = 2;
        else if (s[i] >= 0xf0 && s[i] <= 0xf4)
            need = 3;
        else
            return 0;
        if (i + need >= n)
            return 0;
        for (size_t k = 1; k <= need; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
        i += need + 1;
    }
    return 1;
}

/* Decode one unfolded header value that may hold RFC 2047 words: blanks
 * between two adjacent encoded-words disappear (RFC 2047 6.2), other text
 * is kept. Checks each word is at most 75 characters and whole UTF-8. */
static char *decode_2047(const char *v)
{
    buf_t out = BUF_INIT, pend = BUF_INIT;
    int prev_ew = 0;
    const char *p = v;
    while (*p) {
        const char *ws = p;
        while (*p == ' ' || *p == '\t')
            p++;
        buf_reset(&pend);
        buf_append(&pend, ws, (size_t)(p - ws));
        if (strncmp(p, "=?", 2) == 0) {
            const char *q1 = strchr(p + 2, '?');
            assert_non_null(q1);
            const char *q2 = strchr(q1 + 1, '?');
            assert_non_null(q2);
            const char *end = strstr(q2 + 1, "?=");
            assert_non_null(end);
            assert_true(end + 2 - p <= 75);
            assert_true(strncasecmp(p + 2, "utf-8?", 6) == 0);
            buf_t word = BUF_INIT;
            if (q1[1] == 'B' || q1[1] == 'b')
                b64_decode(q2 + 1, (size_t)(end - q2 - 1), &word);
            else
                q_decode(q2 + 1, (size_t)(end - q2 - 1), &word);
            assert_true(utf8_ok((const unsigned char *)buf_head(&word), buf_size(&word)));
            if (!prev_ew)
                buf_append(&out, buf_head(&pend), buf_size(&pend));
            buf_append(&out, buf_head(&word), buf_size(&word));
            buf_free(&word);
            p = end + 2;
            prev_ew = 1;
        } else {
            buf_append(&out, buf_head(&pend), buf_size(&pend));
            while (*p && *p != ' ' && *p != '\t')
                buf_putc(&out, *p++);
            prev_ew = 0;
        }
    }
    buf_free(&pend);
    /* buf_steal() of a never-allocated buffer: make sure it holds a NUL */
    buf_append(&out, "", 0);
    return buf_steal(&out, NULL);
}

/* Quoted-printable decoding (RFC 2045 6.7) with a check of rule 5. */
static char *qp_decode(const char *s, size_t n)
{
    buf_t out = BUF_INIT;
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\r') {
            assert_true(i + 1 < n && s[i + 1] == '\n');
            assert_true(col <= 76);
            col = 0;
            buf_append(&out, "\r\n", 2);
            i++;
            continue;
        }
        col++;
        if (s[i] == '=') {
            if (i + 2 < n && s[i + 1] == '\r' && s[i + 2] == '\n') {
                assert_true(col <= 76);
                col = 0;
                i += 2;
                continue;
            }
            assert_true(i + 2 < n);
            int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
            assert_true(h >= 0 && l >= 0);
            buf_putc(&out, (char)(h * 16 + l));
            i += 2;
            col += 2;
        } else {
            assert_true(s[i] != ' ' || (i + 1 < n && s[i + 1] != '\r'));
            buf_putc(&out, s[i]);
        }
    }
    assert_true(col <= 76);
    buf_append(&out, "", 0);
    return buf_steal(&out, NULL);
}

/* Unfolded value of the first header named name in the header block. */
static char *header_value(const char *msg, const char *name)
{
    const char *end = strstr(msg, "\r\n\r\n");
    assert_non_null(end);
    size_t nl = strlen(name);
    for (const char *p = msg; p < end;) {
        const char *eol = strstr(p, "\r\n");
        if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            buf_t v = BUF_INIT;
            const char *q = p + nl + 1;
            for (;;) {
                buf_append(&v, q, (size_t)(eol - q));
                if (eol[2] != ' ' && eol[2] != '\t')
                    break;
                q = eol + 2;
                eol = strstr(q, "\r\n");
            }
            /* the blank after the colon is syntax, not value */
            buf_append(&v, "", 0);
            char *s = buf_steal(&v, NULL);
            if (s[0] == ' ')
                memmove(s, s + 1, strlen(s));
            return s;
        }
        p = eol + 2;
    }
    return NULL;
}

static void assert_lines_max(const char *s, size_t n, size_t max)
{
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\r') {
            assert_true(i + 1 < n && s[i + 1] == '\n');
            assert_true(col <= max);
            col = 0;
            i++;
        } else {
            assert_true(s[i] != '\n');
            col++;
        }
    }
    assert_int_equal(col, 0); /* ends with CRLF */
}

static size_t header_block_len(const char *msg)
{
    const char *end = strstr(msg, "\r\n\r\n");
    assert_non_null(end);
    return (size_t)(end - msg) + 2;
}

/* ---- exact bytes ------------------------------------------------------------ */

static void test_text_only_exact(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->cc = xcalloc(1, sizeof(*m->cc));
    m->ncc = 1;
    set_addr(&m->cc[0], "carol@test.example", "Carol \"CJ\" Jones");
    m->bcc = xcalloc(1, sizeof(*m->bcc));
    m->nbcc = 1;
    set_addr(&m->bcc[0], "dave@test.example", "Dave");
    m->subject = xstrdup("Hello");
    m->text = xstrdup("Hi Bob,\n\nsee you.\n");
    m->trace_id = xstrdup("trace-42");
    add_header(m, "X-Campaign", "spring");
    add_header(m, "Reply-To", "help@test.example");

    static const char expect[] =
        "From: \"Alice Smith\" <alice@test.example>\r\n"
        "To: bob@test.example\r\n"
        "Cc: \"Carol \\\"CJ\\\" Jones\" <carol@test.example>\r\n"
        "Subject: Hello\r\n"
        "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        "Message-ID: <0f8e2a4c-6d1b-4c3e-9a57-1b2c3d4e5f60@test.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "X-Campaign: spring\r\n"
        "Reply-To: help@test.example\r\n"
        "X-Mailpump-Trace-Id: trace-42\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "Hi Bob,\r\n"
        "\r\n"
        "see you.\r\n";

    buf_t out = BUF_INIT;
    char err[256];
    assert_int_equal(build(m, &out, err, sizeof(err)), MIME_OK);
    assert_string_equal(buf_head(&out), expect);
    assert_int_equal(buf_size(&out), sizeof(expect) - 1);
    /* Bcc never appears, neither as a header nor as an address */
    assert_null(strstr(buf_head(&out), "Bcc"));
    assert_null(strstr(buf_head(&out), "dave@"));
    buf_free(&out);
    message_free(m);
}

static void test_appends_to_existing(void **state)
{
    (void)state;
    message_t *m = base_message();
    buf_t out = BUF_INIT;
    buf_puts(&out, "PREFIX");
    buf_consume(&out, 3); /* a read cursor must not confuse the builder */
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    assert_int_equal(strncmp(buf_head(&out), "FIXFrom: ", 9), 0);
    buf_free(&out);
    message_free(m);
}

static void test_minimal_and_empty_body(void **state)
{
    (void)state;
    message_t *m = base_message();
    free(m->from.name);
    m->from.name = NULL;
    m->text = xstrdup(""); /* empty counts as absent */
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    assert_string_equal(buf_head(&out),
                        "From: alice@test.example\r\n"
                        "To: bob@test.example\r\n"
                        "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
                        "Message-ID: <0f8e2a4c-6d1b-4c3e-9a57-1b2c3d4e5f60@test.example>\r\n"
                        "MIME-Version: 1.0\r\n"
                        "Content-Type: text/plain; charset=utf-8\r\n"
                        "Content-Transfer-Encoding: 7bit\r\n"
                        "\r\n");
    buf_free(&out);
    message_free(m);
}

static void test_html_only(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->html = xstrdup("<p>Hi</p>");
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_non_null(strstr(s, "\r\nContent-Type: text/html; charset=utf-8\r\n"
                              "Content-Transfer-Encoding: 7bit\r\n\r\n<p>Hi</p>\r\n"));
    assert_null(strstr(s, "multipart"));
    buf_free(&out);
    message_free(m);
}

static void test_line_endings_normalised(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("a\rb\nc\r\nd\n\n\re");
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *body = strstr(buf_head(&out), "\r\n\r\n") + 4;
    assert_string_equal(body, "a\r\nb\r\nc\r\nd\r\n\r\n\r\ne\r\n");
    buf_free(&out);
    message_free(m);
}

/* ---- RFC 2047 -------------------------------------------------------------- */

static void check_subject(const char *subject)
{
    message_t *m = base_message();
    m->subject = xstrdup(subject);
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_lines_max(s, header_block_len(s), 78);
    char *raw = header_value(s, "Subject");
    assert_non_null(raw);
    for (const char *p = raw; *p; p++) /* only ASCII in the header */
        assert_true((unsigned char)*p < 0x80);
    char *dec = decode_2047(raw);
    assert_string_equal(dec, subject);
    free(dec);
    free(raw);
    buf_free(&out);
    message_free(m);
}

static void test_subject_rfc2047(void **state)
{
    (void)state;
    check_subject("Grüße aus Köln ✓");
    /* and the exact header for it, as the python email package decodes it */
    message_t *m = base_message();
    m->subject = xstrdup("Grüße aus Köln ✓");
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    assert_non_null(strstr(buf_head(&out), "\r\nSubject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4g4pyT?=\r\n"));
    buf_free(&out);
    message_free(m);
}

static void test_subject_long_folded(void **state)
{
    (void)state;
    buf_t b = BUF_INIT;
    for (int i = 0; i < 12; i++)
        buf_puts(&b, "Grüße aus Köln ✓ — 東京からこんにちは 🎉 ");
    check_subject(buf_head(&b));
    buf_reset(&b);
    /* mostly ASCII: Q encoding, still folded and whole */
    for (int i = 0; i < 20; i++)
        buf_puts(&b, "Invoice number 12345 for café ");
    check_subject(buf_head(&b));
    buf_free(&b);
}

static void test_subject_ascii_folding(void **state)
{
    (void)state;
    buf_t b = BUF_INIT;
    for (int i = 0; i < 30; i++)
        buf_printf(&b, "word%d  ", i);
    buf_puts(&b, "end");
    message_t *m = base_message();
    m->subject = xstrdup(buf_head(&b));
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_lines_max(s, header_block_len(s), 78);
    char *v = header_value(s, "Subject");
    assert_string_equal(v, buf_head(&b)); /* plain text, unfolds exactly */
    assert_null(strstr(s, "=?"));
    free(v);
    buf_free(&out);
    message_free(m);
    buf_free(&b);
}

/* A word too long to fold would break the 998-octet limit: it is encoded. */
static void test_header_998_limit(void **state)
{
    (void)state;
    char *word = xmalloc(2501);
    memset(word, 'x', 2500);
    word[2500] = '\0';
    message_t *m = base_message();
    m->subject = xstrdup(word);
    add_header(m, "X-Long", word);
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_lines_max(s, header_block_len(s), 78);
    char *raw = header_value(s, "X-Long");
    char *dec = decode_2047(raw);
    assert_string_equal(dec, word);
    free(dec);
    free(raw);
    buf_free(&out);
    message_free(m);
    free(word);
}

static void test_display_names(void **state)
{
    (void)state;
    message_t *m = base_message();
    free(m->from.name);
    m->from.name = xstrdup("Jörg Müller, Köln");
    m->to = xrealloc(m->to, 3 * sizeof(*m->to));
    m->nto = 3;
    set_addr(&m->to[1], "carol@test.example", "Smith, Carol");
    set_addr(&m->to[2], "dan@test.example", "Dan");
    add_header(m, "X-Note", "café crème");
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_lines_max(s, header_block_len(s), 78);

    char *from = header_value(s, "From");
    assert_true(strncmp(from, "=?UTF-8?", 8) == 0);
    assert_non_null(strstr(from, " <alice@test.example>"));
    char *dec = decode_2047(from);
    assert_string_equal(dec, "Jörg Müller, Köln <alice@test.example>");
    free(dec);
    free(from);

    char *to = header_value(s, "To");
    assert_string_equal(to, "bob@test.example, \"Smith, Carol\" <carol@test.example>, "
                            "\"Dan\" <dan@test.example>");
    free(to);

    char *note = header_value(s, "X-Note");
    dec = decode_2047(note);
    assert_string_equal(dec, "café crème");
    free(dec);
    free(note);
    buf_free(&out);
    message_free(m);
}

static void test_encode_header_value_api(void **state)
{
    (void)state;
    buf_t out = BUF_INIT;
    assert_int_equal(mime_encode_header_value(&out, "X-A", "plain value"), MIME_OK);
    assert_string_equal(buf_head(&out), "X-A: plain value\r\n");
    buf_reset(&out);
    assert_int_equal(mime_encode_header_value(&out, "X-A", "é"), MIME_OK);
    assert_string_equal(buf_head(&out), "X-A: =?UTF-8?B?w6k=?=\r\n");
    buf_reset(&out);
    /* text that looks like an encoded-word is encoded so it stays literal */
    assert_int_equal(mime_encode_header_value(&out, "X-A", "=?utf-8?q?x?="), MIME_OK);
    assert_null(strstr(buf_head(&out), "=?utf-8?q?x?=")); /* not copied as is */
    buf_puts(&out, "\r\n");
    char *raw = header_value(buf_head(&out), "X-A");
    char *dec = decode_2047(raw);
    assert_string_equal(dec, "=?utf-8?q?x?=");
    free(dec);
    free(raw);
    buf_reset(&out);
    assert_int_equal(mime_encode_header_value(&out, "X-A", ""), MIME_OK);
    assert_string_equal(buf_head(&out), "X-A:\r\n");
    buf_reset(&out);
    assert_int_equal(mime_encode_header_value(&out, "X-A", "a\r\nBcc: x"), MIME_EINVAL);
    assert_int_equal(mime_encode_header_value(&out, "X-A", "a\nb"), MIME_EINVAL);
    assert_int_equal(mime_encode_header_value(&out, "X A", "v"), MIME_EINVAL);
    assert_int_equal(mime_encode_header_value(&out, "X:A", "v"), MIME_EINVAL);
    assert_int_equal(mime_encode_header_value(&out, "", "v"), MIME_EINVAL);
    assert_int_equal(buf_size(&out), 0);
    buf_free(&out);
}

/* ---- bodies ------------------------------------------------------------------- */

static void test_multipart_alternative(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("Hello text\n");
    m->html = xstrdup("<p>Héllo html</p>");
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_lines_max(s, buf_size(&out), 998);
    char *ct = header_value(s, "Content-Type");
    assert_true(strncmp(ct, "multipart/alternative;", 22) == 0);
    const char *bq = strstr(ct, "boundary=\"");
    assert_non_null(bq);
    char boundary[80];
    size_t bl = strcspn(bq + 10, "\"");
    assert_true(bl > 0 && bl <= 70);
    memcpy(boundary, bq + 10, bl);
    boundary[bl] = '\0';
    free(ct);
    assert_null(header_value(s, "Content-Transfer-Encoding")); /* none at top level */

    buf_t expect = BUF_INIT;
    buf_printf(&expect,
               "\r\n\r\n--%s\r\n"
               "Content-Type: text/plain; charset=utf-8\r\n"
               "Content-Transfer-Encoding: 7bit\r\n\r\n"
               "Hello text\r\n"
               "\r\n--%s\r\n"
               "Content-Type: text/html; charset=utf-8\r\n"
               "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
               "<p>H=C3=A9llo html</p>"
               "\r\n--%s--\r\n",
               boundary, boundary, boundary);
    const char *body = strstr(s, "\r\n\r\n");
    assert_string_equal(body, buf_head(&expect));
    buf_free(&expect);
    buf_free(&out);
    message_free(m);
}

/* The boundary must not occur in content: content full of lookalikes of
 * our boundary prefix never produces a body the parser would split wrong. */
static void test_multipart_boundary_unique(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("--=_mp_\n--=_mp_0000000000000000\n");
    m->html = xstrdup("--=_mp_");
    for (int i = 0; i < 50; i++) {
        buf_t out = BUF_INIT;
        assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
        char *ct = header_value(buf_head(&out), "Content-Type");
        const char *b = strstr(ct, "boundary=\"") + 10;
        char boundary[80];
        size_t bl = strcspn(b, "\"");
        memcpy(boundary, b, bl);
        boundary[bl] = '\0';
        /* exactly: opening, middle and closing delimiter */
        size_t count = 0;
        for (const char *p = buf_head(&out); (p = strstr(p, boundary)) != NULL; p += bl)
            count++;
        assert_int_equal(count, 4); /* the parameter plus three delimiters */
        free(ct);
        buf_free(&out);
    }
    message_free(m);
}

static void test_qp_long_line(void **state)
{
    (void)state;
    buf_t text = BUF_INIT;
    for (int i = 0; i < 1200; i++)
        buf_putc(&text, (char)('a' + i % 26));
    buf_puts(&text, " \nshort line\t\nlast = one ");
    message_t *m = base_message();
    m->text = xstrdup(buf_head(&text));
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_non_null(strstr(s, "\r\nContent-Transfer-Encoding: quoted-printable\r\n"));
    const char *body = strstr(s, "\r\n\r\n") + 4;
    assert_lines_max(body, strlen(body), 76);
    char *dec = qp_decode(body, strlen(body));
    buf_t expect = BUF_INIT;
    for (int i = 0; i < 1200; i++)
        buf_putc(&expect, (char)('a' + i % 26));
    buf_puts(&expect, " \r\nshort line\t\r\nlast = one \r\n");
    assert_string_equal(dec, buf_head(&expect));
    /* trailing blanks are encoded (rule 3) */
    assert_non_null(strstr(body, "=20\r\nshort line=09\r\nlast =3D one=20\r\n"));
    free(dec);
    buf_free(&expect);
    buf_free(&out);
    buf_free(&text);
    message_free(m);
}

static void test_qp_non_ascii(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("Grüße aus Köln ✓\n.\nEnde");
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *body = strstr(buf_head(&out), "\r\n\r\n") + 4;
    assert_string_equal(body, "Gr=C3=BC=C3=9Fe aus K=C3=B6ln =E2=9C=93\r\n.\r\nEnde\r\n");
    char *dec = qp_decode(body, strlen(body));
    assert_string_equal(dec, "Grüße aus Köln ✓\r\n.\r\nEnde\r\n");
    free(dec);
    buf_free(&out);
    message_free(m);
}

/* ---- refusals ----------------------------------------------------------------- */

static void expect_einval(message_t *m, const char *needle)
{
    buf_t out = BUF_INIT;
    buf_puts(&out, "keep");
    char err[256];
    assert_int_equal(build(m, &out, err, sizeof(err)), MIME_EINVAL);
    assert_string_equal(buf_head(&out), "keep"); /* restored on error */
    if (strstr(err, needle) == NULL)
        fail_msg("error \"%s\" lacks \"%s\"", err, needle);
    buf_free(&out);
}

static void test_header_injection_refused(void **state)
{
    (void)state;
    message_t *m = base_message();
    add_header(m, "X-Evil", "x\r\nBcc: victim@test.example");
    expect_einval(m, "contains CR or LF");
    message_free(m);

    m = base_message();
    add_header(m, "X-Evil", "x\nBcc: victim@test.example");
    expect_einval(m, "X-Evil");
    message_free(m);

    m = base_message();
    m->subject = xstrdup("hi\r\n\r\nbody");
    expect_einval(m, "subject");
    message_free(m);

    m = base_message();
    free(m->from.name);
    m->from.name = xstrdup("Alice\rX: y");
    expect_einval(m, "display name");
    message_free(m);

    m = base_message();
    m->trace_id = xstrdup("t\n1");
    expect_einval(m, "trace id");
    message_free(m);

    m = base_message();
    free(m->to[0].addr);
    m->to[0].addr = xstrdup("bob@test.example\r\nRCPT TO:<x@y>");
    expect_einval(m, "invalid address in to[0]");
    message_free(m);

    m = base_message();
    free(m->id);
    m->id = xstrdup("a b");
    expect_einval(m, "message id");
    message_free(m);
}

static void test_bad_header_name_refused(void **state)
{
    (void)state;
    static const char *const names[] = { "Bad Name", "X:Y", "", "X-\xc3\xa9",
                                         "X-123456789012345678901234567890123456789012345678901234567890123456789012345" };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        message_t *m = base_message();
        add_header(m, names[i], "v");
        expect_einval(m, "invalid header name");
        message_free(m);
    }
}

static void test_structural_override_refused(void **state)
{
    (void)state;
    static const char *const names[] = {
        "From", "to", "CC", "Bcc", "subject", "Date", "message-id", "Mime-Version",
        "content-type", "Content-Transfer-Encoding", "X-Mailpump-Trace-Id",
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        message_t *m = base_message();
        add_header(m, "X-Fine", "ok");
        add_header(m, names[i], "x");
        expect_einval(m, "cannot be overridden");
        message_free(m);
    }
}

static void test_too_big(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("0123456789");
    buf_t out = BUF_INIT;
    mime_opts_t o = { .now = NOW, .max_size = 100 };
    char err[128];
    assert_int_equal(mime_build(m, &o, &out, err, sizeof(err)), MIME_ETOOBIG);
    assert_int_equal(buf_size(&out), 0);
    assert_non_null(strstr(err, "limit is 100"));
    o.max_size = 100000;
    assert_int_equal(mime_build(m, &o, &out, err, sizeof(err)), MIME_OK);
    buf_free(&out);
    message_free(m);
}

static void test_strerror(void **state)
{
    (void)state;
    assert_string_equal(mime_strerror(MIME_OK), "success");
    assert_string_equal(mime_strerror(MIME_ETOOBIG), "message too big");
    assert_non_null(mime_strerror(-99));
}

/* ---- dot-stuffing -------------------------------------------------------------- */

static void check_stuff(const char *in, size_t len, const char *expect, size_t elen)
{
    buf_t out = BUF_INIT;
    mime_dotstuff(in, len, &out);
    assert_int_equal(buf_size(&out), elen);
    assert_memory_equal(buf_head(&out), expect, elen);
    buf_free(&out);
}

/* literals, so embedded NULs count */
#define STUFF(in, expect) check_stuff(in, sizeof(in) - 1, expect, sizeof(expect) - 1)

static void test_dotstuff_cases(void **state)
{
    (void)state;
    STUFF("a\r\n.\r\nb\r\n", "a\r\n..\r\nb\r\n.\r\n");
    STUFF(".\r\n", "..\r\n.\r\n");
    STUFF("..x\r\n", "...x\r\n.\r\n");
    STUFF(".leading", "..leading\r\n.\r\n");
    STUFF("a.\r\nb. .\r\n", "a.\r\nb. .\r\n.\r\n"); /* only line-initial dots */
    STUFF("bare\nlf\n.x", "bare\r\nlf\r\n..x\r\n.\r\n");
    STUFF("bare\rcr\r.x\r", "bare\r\ncr\r\n..x\r\n.\r\n");
    STUFF("\r\r\n\n", "\r\n\r\n\r\n.\r\n");
    STUFF("x\r\n", "x\r\n.\r\n"); /* terminator appended exactly once */
    STUFF("x", "x\r\n.\r\n");
    STUFF("x\r\n\r\n", "x\r\n\r\n.\r\n");
    STUFF("", ".\r\n");
    STUFF("a\0.b\r\n.\0", "a\0.b\r\n..\0\r\n.\r\n");
}

static uint64_t rng_next(uint64_t *s)
{
    /* xorshift64*: a fixed sequence, so a failing input can be replayed */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static void random_input(uint64_t *rng, buf_t *in)
{
    static const char *const pieces[] = { ".", "..", "\r", "\n", "\r\n", "\0", "a", "b c",
                                          "é", "✓", "🎉", "\xff", "\r\n.\r\n", "\n.\n" };
    static const size_t plen[] = { 1, 2, 1, 1, 2, 1, 1, 3, 2, 3, 4, 1, 5, 3 };
    size_t n = rng_next(rng) % 40;
    for (size_t i = 0; i < n; i++) {
        uint64_t r = rng_next(rng);
        if (r % 5 == 0) {
            buf_putc(in, (char)(r >> 8));
        } else {
            size_t k = (r >> 8) % (sizeof(pieces) / sizeof(pieces[0]));
            buf_append(in, pieces[k], plen[k]);
        }
    }
}

/* Text for header and body fields: words, runs of blanks, long words,
 * UTF-8, "=?" lookalikes, and the occasional line break. */
static void random_text(uint64_t *rng, buf_t *b, size_t maxpieces)
{
    static const char *const pieces[] = { "word", " ", "  ", "\t", "é", "✓", "東京", "🎉",
                                          "=?", "?=", "_", "\"", "\\", ",", ".", "\r",
                                          "\n", "\r\n", "=", "\x7f", "\x01" };
    size_t n = rng_next(rng) % (maxpieces + 1);
    for (size_t i = 0; i < n; i++) {
        uint64_t r = rng_next(rng);
        size_t k = (r >> 8) % (sizeof(pieces) / sizeof(pieces[0]));
        /* line breaks rarely, so most messages get through */
        if ((k >= 15 && k <= 17) && r % 16)
            k = 0;
        if (r % 97 == 0) {
            for (int j = 0; j < 1100; j++) /* one word longer than 998 */
                buf_putc(b, (char)('a' + j % 26));
        }
        buf_puts(b, pieces[k]);
    }
}

static void test_dotstuff_random_invariants(void **state)
{
    (void)state;
    uint64_t rng = 0x9e3779b97f4a7c15ULL;
    buf_t in = BUF_INIT, out = BUF_INIT, norm = BUF_INIT, unstuffed = BUF_INIT;
    for (int iter = 0; iter < 5000; iter++) {
        buf_reset(&in);
        buf_reset(&out);
        buf_reset(&norm);
        buf_reset(&unstuffed);
        random_input(&rng, &in);
        const char *ip = buf_head(&in);
        size_t il = buf_size(&in);
        mime_dotstuff(ip, il, &out);
        const char *o = buf_head(&out);
        size_t ol = buf_size(&out);

        if (il == 0) {
            assert_int_equal(ol, 3);
            assert_memory_equal(o, ".\r\n", 3);
            continue;
        }
        assert_true(ol >= 5);
        assert_memory_equal(o + ol - 5, "\r\n.\r\n", 5);
        for (size_t i = 0; i < ol; i++) {
            if (o[i] == '\r')
                assert_true(i + 1 < ol && o[i + 1] == '\n');
            if (o[i] == '\n')
                assert_true(i > 0 && o[i - 1] == '\r');
        }
        /* every line but the terminator: a leading "." is always doubled */
        size_t ls = 0;
        for (size_t i = 0; i + 1 < ol; i++) {
            if (o[i] != '\r')
                continue;
            size_t llen = i - ls;
            int last = i + 2 == ol;
            if (!last && llen >= 1 && o[ls] == '.')
                assert_true(llen >= 2 && o[ls + 1] == '.');
            if (last)
                assert_true(llen == 1 && o[ls] == '.');
            /* undo the stuffing to compare with the normalised input */
            if (!last) {
                size_t skip = (llen >= 1 && o[ls] == '.') ? 1 : 0;
                buf_append(&unstuffed, o + ls + skip, llen - skip);
                buf_append(&unstuffed, "\r\n", 2);
            }
            ls = i + 2;
            i++;
        }
        for (size_t i = 0; i < il; i++) {
            if (ip[i] == '\r' || ip[i] == '\n') {
                if (ip[i] == '\r' && i + 1 < il && ip[i + 1] == '\n')
                    i++;
                buf_append(&norm, "\r\n", 2);
            } else {
                buf_putc(&norm, ip[i]);
            }
        }
        if (buf_size(&norm) < 2 || memcmp(buf_head(&norm) + buf_size(&norm) - 2, "\r\n", 2))
            buf_append(&norm, "\r\n", 2);
        assert_int_equal(buf_size(&unstuffed), buf_size(&norm));
        assert_memory_equal(buf_head(&unstuffed), buf_head(&norm), buf_size(&norm));
    }
    buf_free(&in);
    buf_free(&out);
    buf_free(&norm);
    buf_free(&unstuffed);
}

static void test_long_recipient_list_folded(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->nto = 40;
    m->to = xrealloc(m->to, m->nto * sizeof(*m->to));
    for (size_t i = 1; i < m->nto; i++) {
        char a[64], n[64];
        snprintf(a, sizeof(a), "user%zu@test.example", i);
        snprintf(n, sizeof(n), i % 3 ? "User %zu" : "Üser %zu", i);
        set_addr(&m->to[i], a, n);
    }
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    assert_lines_max(s, header_block_len(s), 78);
    char *to = header_value(s, "To");
    char *dec = decode_2047(to);
    static const char head[] = "bob@test.example, \"User 1\" <user1@test.example>, ";
    assert_memory_equal(dec, head, sizeof(head) - 1);
    assert_non_null(strstr(dec, ", Üser 39 <user39@test.example>"));
    free(dec);
    free(to);
    buf_free(&out);
    message_free(m);
}

/* Random caller strings either build into a message that keeps the wire
 * invariants, or are refused because a header string holds CR or LF. */
static void test_build_random_invariants(void **state)
{
    (void)state;
    uint64_t rng = 0x2545f4914f6cdd1dULL;
    for (int iter = 0; iter < 1500; iter++) {
        buf_t sb = BUF_INIT, nb = BUF_INIT, hb = BUF_INIT, tb = BUF_INIT, xb = BUF_INIT;
        random_text(&rng, &sb, 60);
        random_text(&rng, &nb, 20);
        random_text(&rng, &hb, 40);
        random_text(&rng, &tb, 400);
        random_text(&rng, &xb, 400);
        message_t *m = base_message();
        /* strings stop at an embedded NUL, like any C string in the model */
        m->subject = xstrdup(buf_head(&sb));
        free(m->from.name);
        m->from.name = xstrdup(buf_head(&nb));
        add_header(m, "X-Random", buf_head(&hb));
        m->text = xstrdup(buf_head(&tb));
        if (iter % 2)
            m->html = xstrdup(buf_head(&xb));
        int crlf = strpbrk(m->subject, "\r\n") || strpbrk(m->from.name, "\r\n") ||
                   strpbrk(m->headers[0].value, "\r\n");
        buf_t out = BUF_INIT;
        char err[256];
        int rc = build(m, &out, err, sizeof(err));
        if (crlf) {
            assert_int_equal(rc, MIME_EINVAL);
            assert_int_equal(buf_size(&out), 0);
        } else {
            assert_int_equal(rc, MIME_OK);
            const char *o = buf_head(&out);
            size_t hl = header_block_len(o);
            assert_lines_max(o, buf_size(&out), 998);
            for (size_t i = 0; i < hl; i++) /* headers are pure ASCII */
                assert_true((unsigned char)o[i] < 0x80 && o[i] != '\0');
            char *subj = header_value(o, "Subject");
            char *dec = decode_2047(subj);
            assert_string_equal(dec, m->subject);
            free(dec);
            free(subj);
        }
        buf_free(&out);
        message_free(m);
        buf_free(&sb);
        buf_free(&nb);
        buf_free(&hb);
        buf_free(&tb);
        buf_free(&xb);
    }
}

/* The whole path: a built message survives stuffing and unstuffing. */
static void test_build_then_stuff(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup(".\n..\nfine\n.");
    m->html = xstrdup(".<b>x</b>\n.");
    buf_t msg = BUF_INIT, wire = BUF_INIT;
    assert_int_equal(build(m, &msg, NULL, 0), MIME_OK);
    mime_dotstuff(buf_head(&msg), buf_size(&msg), &wire);
    const char *w = buf_head(&wire);
    assert_non_null(strstr(w, "\r\n..\r\n...\r\nfine\r\n..\r\n"));
    /* the content ends in CRLF, so only ".\r\n" is added */
    assert_int_equal(buf_size(&wire), buf_size(&msg) + 5 + 3);
    buf_free(&msg);
    buf_free(&wire);
    message_free(m);
}

/* A single word too long to share a line with "Subject: " (found by the
 * fuzzer): the field must still keep every line within 998 octets. */
static void test_unfoldable_word_after_field_name(void **state)
{
    for (size_t len = 985; len <= 1000; len++) {
        message_t *m = base_message();
        m->subject = xmalloc(len + 1);
        memset(m->subject, 'G', len);
        m->subject[len] = '\0';
        buf_t out = BUF_INIT;
        char err[256];
        assert_int_equal(build(m, &out, err, sizeof(err)), MIME_OK);
        size_t col = 0, longest = 0;
        for (const char *c = buf_head(&out); *c; c++) {
            if (*c == '\r') {
                longest = col > longest ? col : longest;
                col = 0;
                c++;
            } else {
                col++;
            }
        }
        if (longest > 998)
            fail_msg("subject of %zu octets gives a %zu-octet line", len, longest);
        buf_free(&out);
        message_free(m);
    }
}

/* mime_header_find: first field of the name, any case, unfolded and
 * trimmed; never past the header section; too small a buffer refused. */
static void test_header_find(void **state)
{
    const char m[] = "From: a@b.example\r\n"
                     "message-id:\r\n  <x.1@b.example>  \r\n"
                     "Message-ID: <second@b.example>\r\n"
                     "Subject: one\r\n\ttwo\r\n"
                     "\r\n"
                     "X-In-Body: no\r\n";
    char out[64];
    assert_int_equal(mime_header_find(m, sizeof(m) - 1, "Message-ID", out, sizeof(out)), MIME_OK);
    assert_string_equal(out, "<x.1@b.example>");
    assert_int_equal(mime_header_find(m, sizeof(m) - 1, "subject", out, sizeof(out)), MIME_OK);
    assert_string_equal(out, "one\ttwo");
    assert_int_equal(mime_header_find(m, sizeof(m) - 1, "X-In-Body", out, sizeof(out)), MIME_EINVAL);
    assert_int_equal(mime_header_find(m, sizeof(m) - 1, "From", out, 5), MIME_EINVAL);
    assert_int_equal(mime_header_find(m, sizeof(m) - 1, "Fro", out, sizeof(out)), MIME_EINVAL);
    assert_int_equal(mime_header_find("Subject:  \r\n\r\n", 14, "Subject", out, sizeof(out)), MIME_EINVAL);
    /* LF-only input and a field on the last line without its newline */
    assert_int_equal(mime_header_find("A: 1\nB: 2", 9, "B", out, sizeof(out)), MIME_OK);
    assert_string_equal(out, "2");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_only_exact),
        cmocka_unit_test(test_appends_to_existing),
        cmocka_unit_test(test_minimal_and_empty_body),
        cmocka_unit_test(test_html_only),
        cmocka_unit_test(test_line_endings_normalised),
        cmocka_unit_test(test_subject_rfc2047),
        cmocka_unit_test(test_subject_long_folded),
        cmocka_unit_test(test_subject_ascii_folding),
        cmocka_unit_test(test_header_998_limit),
        cmocka_unit_test(test_display_names),
        cmocka_unit_test(test_encode_header_value_api),
        cmocka_unit_test(test_multipart_alternative),
        cmocka_unit_test(test_multipart_boundary_unique),
        cmocka_unit_test(test_qp_long_line),
        cmocka_unit_test(test_qp_non_ascii),
        cmocka_unit_test(test_header_injection_refused),
        cmocka_unit_test(test_bad_header_name_refused),
        cmocka_unit_test(test_structural_override_refused),
        cmocka_unit_test(test_too_big),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_dotstuff_cases),
        cmocka_unit_test(test_dotstuff_random_invariants),
        cmocka_unit_test(test_long_recipient_list_folded),
        cmocka_unit_test(test_build_random_invariants),
        cmocka_unit_test(test_build_then_stuff),
        cmocka_unit_test(test_unfoldable_word_after_field_name),
        cmocka_unit_test(test_header_find),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

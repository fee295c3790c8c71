/*
 * SUMMARY
 *  tests/unit/test_mime_parts.c - mime/build: attachments, nested
 *  multipart, transfer encodings, raw messages, size limit.
 * DESCRIPTION
 *  Exact bytes for each construct (random boundaries are replaced by
 *  B1, B2, B3 in order of first appearance before comparing), base64 and
 *  RFC 2231 output decoded again by decoders written here, the refusals
 *  with their reasons, and a seeded random loop over attachments and raw
 *  messages that checks the wire invariants: pure 7-bit ASCII without NUL,
 *  CRLF only, lines within 998 octets (76 in encoded parts, 78 in part
 *  headers), each boundary used exactly as the structure requires.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>

#include "core/buf.h"
#include "core/message.h"
#include "core/util.h"
#include "mime/build.h"

#define NOW 1700000000

static void set_addr(mp_address_t *a, const char *addr, const char *name)
{
    a->addr = xstrdup(addr);
    a->name = name ? xstrdup(name) : NULL;
}

static message_t *base_message(void)
{
    message_t *m = message_new();
    m->id = xstrdup("id-1");
    set_addr(&m->from, "alice@test.example", NULL);
    m->to = xcalloc(1, sizeof(*m->to));
    m->nto = 1;
    set_addr(&m->to[0], "bob@test.example", NULL);
    return m;
}

static mp_attachment_t *add_att(message_t *m, const char *fname, const char *ctype,
                                const void *data, size_t len)
{
    m->attachments = xrealloc(m->attachments, (m->nattachments + 1) * sizeof(*m->attachments));
    mp_attachment_t *a = &m->attachments[m->nattachments++];
    memset(a, 0, sizeof(*a));
    a->filename = xstrdup(fname);
    a->content_type = xstrdup(ctype);
    a->data = xmalloc(len + 1);
    memcpy(a->data, data, len);
    a->len = len;
    return a;
}

static void set_raw(message_t *m, const char *raw, size_t len)
{
    m->raw = xmalloc(len + 1);
    memcpy(m->raw, raw, len);
    m->raw[len] = '\0';
    m->raw_len = len;
}

static int build(const message_t *m, buf_t *out, char *err, size_t errlen)
{
    mime_opts_t o = { .now = NOW, .max_size = 0 };
    return mime_build(m, &o, out, err, errlen);
}

/* Replace every "=_mp_" + 32 hex digits by B1, B2, ... in order of first
 * appearance, so expected bytes can be written down. */
static char *normalise_boundaries(const char *s)
{
    char seen[8][40];
    size_t nseen = 0;
    buf_t o = BUF_INIT;
    while (*s) {
        if (strncmp(s, "=_mp_", 5) == 0 && strspn(s + 5, "0123456789abcdef") >= 32) {
            size_t k = 0;
            while (k < nseen && strncmp(seen[k], s, 37) != 0)
                k++;
            if (k == nseen) {
                assert_true(nseen < 8);
                memcpy(seen[nseen], s, 37);
                seen[nseen][37] = '\0';
                nseen++;
            }
            buf_printf(&o, "B%zu", k + 1);
            s += 37;
        } else {
            buf_putc(&o, *s++);
        }
    }
    buf_append(&o, "", 0);
    return buf_steal(&o, NULL);
}

static const char *body_of(const char *msg)
{
    const char *b = strstr(msg, "\r\n\r\n");
    assert_non_null(b);
    return b + 4;
}

static void expect_body(const message_t *m, const char *expect_headers_tail,
                        const char *expect_body)
{
    buf_t out = BUF_INIT;
    char err[256] = "";
    int rc = build(m, &out, err, sizeof(err));
    if (rc != MIME_OK)
        fail_msg("build: %s", err);
    char *n = normalise_boundaries(buf_head(&out));
    if (expect_headers_tail && strstr(n, expect_headers_tail) == NULL)
        fail_msg("headers lack:\n%s\ngot:\n%s", expect_headers_tail, n);
    if (strcmp(body_of(n), expect_body) != 0)
        fail_msg("body:\n%s\nwant:\n%s", body_of(n), expect_body);
    free(n);
    buf_free(&out);
}

/* ---- exact bytes ------------------------------------------------------------ */

static void test_text_and_attachment_exact(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("See attached.\n");
    static const unsigned char bin[] = { 0x00, 0x01, 0xfe, 0xff, 'a', '\n' };
    add_att(m, "data.bin", "application/octet-stream", bin, sizeof(bin));
    expect_body(m,
                "MIME-Version: 1.0\r\n"
                "Content-Type: multipart/mixed;\r\n boundary=\"B1\"\r\n\r\n",
                "--B1\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 7bit\r\n"
                "\r\n"
                "See attached.\r\n"
                "\r\n--B1\r\n"
                "Content-Type: application/octet-stream;\r\n"
                " name=\"data.bin\"\r\n"
                "Content-Transfer-Encoding: base64\r\n"
                "Content-Disposition: attachment;\r\n"
                " filename=\"data.bin\"\r\n"
                "\r\n"
                "AAH+/2EK\r\n"
                "\r\n--B1--\r\n");
    message_free(m);
}

static void test_related_alternative_mixed_exact(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("Hi");
    m->html = xstrdup("<img src=\"cid:logo@x\">");
    mp_attachment_t *a = add_att(m, "logo.gif", "image/gif", "GIF89a", 6);
    a->is_inline = 1;
    a->content_id = xstrdup("logo@x");
    add_att(m, "notes.txt", "text/plain; charset=us-ascii", "line 1\nline 2", 13);
    expect_body(m, "Content-Type: multipart/mixed;\r\n boundary=\"B1\"\r\n\r\n",
                "--B1\r\n"
                "Content-Type: multipart/related;\r\n"
                " type=\"multipart/alternative\";\r\n"
                " boundary=\"B2\"\r\n"
                "\r\n"
                "--B2\r\n"
                "Content-Type: multipart/alternative;\r\n"
                " boundary=\"B3\"\r\n"
                "\r\n"
                "--B3\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 7bit\r\n"
                "\r\n"
                "Hi\r\n"
                "--B3\r\n"
                "Content-Type: text/html; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 7bit\r\n"
                "\r\n"
                "<img src=\"cid:logo@x\">\r\n"
                "--B3--\r\n"
                "\r\n--B2\r\n"
                "Content-Type: image/gif;\r\n"
                " name=\"logo.gif\"\r\n"
                "Content-Transfer-Encoding: 7bit\r\n"
                "Content-ID: <logo@x>\r\n"
                "Content-Disposition: inline;\r\n"
                " filename=\"logo.gif\"\r\n"
                "\r\n"
                "GIF89a\r\n"
                "--B2--\r\n"
                "\r\n--B1\r\n"
                "Content-Type: text/plain; charset=us-ascii;\r\n"
                " name=\"notes.txt\"\r\n"
                "Content-Transfer-Encoding: 7bit\r\n"
                "Content-Disposition: attachment;\r\n"
                " filename=\"notes.txt\"\r\n"
                "\r\n"
                "line 1\r\nline 2\r\n"
                "--B1--\r\n");
    message_free(m);
}

/* html + inline only: related at the top, no mixed */
static void test_related_only(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->html = xstrdup("<p>x</p>");
    mp_attachment_t *a = add_att(m, "a.png", "image/png", "\x89PNG", 4);
    a->is_inline = 1;
    expect_body(m, "Content-Type: multipart/related;\r\n type=\"text/html\";\r\n boundary=\"B1\"\r\n\r\n",
                "--B1\r\n"
                "Content-Type: text/html; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 7bit\r\n"
                "\r\n"
                "<p>x</p>\r\n"
                "--B1\r\n"
                "Content-Type: image/png;\r\n"
                " name=\"a.png\"\r\n"
                "Content-Transfer-Encoding: base64\r\n"
                "Content-Disposition: inline;\r\n"
                " filename=\"a.png\"\r\n"
                "\r\n"
                "iVBORw==\r\n"
                "\r\n--B1--\r\n");
    message_free(m);
}

/* inline without an HTML body has nothing to refer to it: mixed, inline */
static void test_inline_without_html(void **state)
{
    (void)state;
    message_t *m = base_message();
    m->text = xstrdup("t");
    mp_attachment_t *a = add_att(m, "a.png", "image/png", "\x89PNG", 4);
    a->is_inline = 1;
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    assert_non_null(strstr(buf_head(&out), "Content-Type: multipart/mixed;"));
    assert_null(strstr(buf_head(&out), "multipart/related"));
    assert_non_null(strstr(buf_head(&out), "Content-Disposition: inline;\r\n filename=\"a.png\""));
    buf_free(&out);
    message_free(m);
}

/* ---- encodings ------------------------------------------------------------------ */

static int b64val(char c)
{
    const char *tab = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const char *p = c ? strchr(tab, c) : NULL;
    return p ? (int)(p - tab) : -1;
}

/* Decode base64 body lines; checks line length 76 and CRLF endings. */
static void b64_body_decode(const char *s, size_t n, buf_t *out)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\r') {
            assert_true(i + 1 < n && s[i + 1] == '\n');
            assert_true(col <= 76 && col % 4 == 0);
            col = 0;
            i++;
            continue;
        }
        col++;
        if (s[i] == '=')
            continue;
        int v = b64val(s[i]);
        assert_true(v >= 0);
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf_putc(out, (char)((acc >> bits) & 0xff));
        }
    }
    assert_int_equal(col, 0);
}

static void test_base64_sizes(void **state)
{
    (void)state;
    static const size_t sizes[] = { 1, 2, 3, 4, 56, 57, 58, 113, 114, 115, 1000, 65536 };
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        size_t n = sizes[k];
        unsigned char *d = xmalloc(n);
        for (size_t i = 0; i < n; i++)
            d[i] = (unsigned char)(i * 7 + k);
        message_t *m = base_message();
        add_att(m, "x", "application/octet-stream", d, n);
        buf_t out = BUF_INIT, dec = BUF_INIT;
        assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
        const char *p = strstr(buf_head(&out), "filename=\"x\"\r\n\r\n");
        assert_non_null(p);
        p += 16;
        const char *e = strstr(p, "\r\n--=_mp_");
        assert_non_null(e);
        b64_body_decode(p, (size_t)(e - p), &dec);
        assert_int_equal(buf_size(&dec), n);
        assert_memory_equal(buf_head(&dec), d, n);
        /* 4 characters per 3 octets plus CRLF per 57 octets, exactly */
        assert_int_equal((size_t)(e - p), 4 * ((n + 2) / 3) + 2 * ((n + 56) / 57));
        free(d);
        buf_free(&dec);
        buf_free(&out);
        message_free(m);
    }
}

static const char *cte_of(const char *ctype, const void *data, size_t len)
{
    static char cte[32];
    message_t *m = base_message();
    add_att(m, "f", ctype, data, len);
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *p = strstr(buf_head(&out), "name=\"f\"\r\nContent-Transfer-Encoding: ");
    assert_non_null(p);
    p += strlen("name=\"f\"\r\nContent-Transfer-Encoding: ");
    size_t n = strcspn(p, "\r");
    snprintf(cte, sizeof(cte), "%.*s", (int)n, p);
    buf_free(&out);
    message_free(m);
    return cte;
}

static void test_transfer_encoding_choice(void **state)
{
    (void)state;
    char longline[1200];
    memset(longline, 'a', sizeof(longline));
    assert_string_equal(cte_of("text/plain", "plain\nlines\n", 12), "7bit");
    assert_string_equal(cte_of("text/plain", "a much longer line of mostly ascii text \xc3\xbc", 42),
                        "quoted-printable");
    assert_string_equal(cte_of("text/plain", "\xc3\xbc\xc3\xbc\xc3\xbc", 6), "base64");
    assert_string_equal(cte_of("text/plain", "nul\0here", 8), "base64");
    assert_string_equal(cte_of("TEXT/HTML", longline, sizeof(longline)), "quoted-printable");
    /* non-text: verbatim only when nothing would change */
    assert_string_equal(cte_of("application/json", "{\"a\":1}\r\n", 9), "7bit");
    assert_string_equal(cte_of("application/json", "{\"a\":1}\n", 8), "base64");
    assert_string_equal(cte_of("application/json", "a\rb", 3), "base64");
    assert_string_equal(cte_of("application/octet-stream", longline, sizeof(longline)), "base64");
    assert_string_equal(cte_of("message/rfc822", "From: a@b\r\n\r\nx\r\n", 16), "7bit");
}

static void test_qp_attachment_decodes(void **state)
{
    (void)state;
    message_t *m = base_message();
    add_att(m, "f.txt", "text/plain; charset=utf-8", "caf\xc3\xa9 = ok \nnext", 16);
    /* no text or html: the attachment is the only part */
    expect_body(m, NULL,
                "--B1\r\n"
                "Content-Type: text/plain; charset=utf-8;\r\n"
                " name=\"f.txt\"\r\n"
                "Content-Transfer-Encoding: quoted-printable\r\n"
                "Content-Disposition: attachment;\r\n"
                " filename=\"f.txt\"\r\n"
                "\r\n"
                "caf=C3=A9 =3D ok=20\r\nnext\r\n"
                "--B1--\r\n");
    message_free(m);
}

/* Undo RFC 2231 for one parameter: either attr="v", attr*=utf-8''v or
 * attr*0*=utf-8''v0; attr*1*=v1 ... */
static char *param_value(const char *headers, const char *attr)
{
    buf_t v = BUF_INIT;
    char key[64];
    snprintf(key, sizeof(key), " %s=\"", attr);
    const char *p = strstr(headers, key);
    if (p) {
        p += strlen(key);
        buf_append(&v, p, strcspn(p, "\""));
        buf_append(&v, "", 0);
        return buf_steal(&v, NULL);
    }
    for (int idx = -1; idx < 100; idx++) {
        if (idx < 0)
            snprintf(key, sizeof(key), " %s*=", attr);
        else
            snprintf(key, sizeof(key), " %s*%d*=", attr, idx);
        p = strstr(headers, key);
        if (p == NULL) {
            if (idx < 0)
                continue;
            break;
        }
        p += strlen(key);
        if (strncmp(p, "utf-8''", 7) == 0)
            p += 7;
        else
            assert_true(idx > 0);
        size_t n = strcspn(p, ";\r");
        for (size_t i = 0; i < n; i++) {
            if (p[i] == '%') {
                unsigned x;
                assert_int_equal(sscanf(p + i + 1, "%2x", &x), 1);
                buf_putc(&v, (char)x);
                i += 2;
            } else {
                buf_putc(&v, p[i]);
            }
        }
        if (idx < 0)
            break;
    }
    buf_append(&v, "", 0);
    return buf_steal(&v, NULL);
}

static void check_filename(const char *fname, const char *expect_fragment)
{
    message_t *m = base_message();
    add_att(m, fname, "application/pdf", "%PDF", 4);
    buf_t out = BUF_INIT;
    assert_int_equal(build(m, &out, NULL, 0), MIME_OK);
    const char *s = buf_head(&out);
    const char *part = strstr(s, "Content-Type: application/pdf");
    assert_non_null(part);
    const char *end = strstr(part, "\r\n\r\n");
    /* every part header line within 78 */
    size_t col = 0;
    for (const char *p = part; p < end + 2; p++) {
        if (*p == '\r') {
            assert_true(col <= 78);
            col = 0;
            p++;
        } else {
            assert_true((unsigned char)*p < 0x80);
            col++;
        }
    }
    char *hdr = strndup(part, (size_t)(end - part) + 2);
    char *name = param_value(hdr, "name");
    char *disp = strstr(hdr, "Content-Disposition:");
    assert_non_null(disp);
    char *fn = param_value(disp, "filename");
    assert_string_equal(fn, fname);
    assert_string_equal(name, fname);
    if (expect_fragment && strstr(hdr, expect_fragment) == NULL)
        fail_msg("part headers lack \"%s\":\n%s", expect_fragment, hdr);
    free(fn);
    free(name);
    free(hdr);
    buf_free(&out);
    message_free(m);
}

static void test_filename_encodings(void **state)
{
    (void)state;
    check_filename("report.pdf", " filename=\"report.pdf\"");
    check_filename("Bericht Grüße.pdf", " filename*=utf-8''Bericht%20Gr%C3%BC%C3%9Fe.pdf");
    check_filename("quote\" and \\.pdf", " filename*=utf-8''quote%22%20and%20%5C.pdf");
    check_filename("=?utf-8?q?x?=.pdf", " filename*=utf-8''");
    check_filename("日本語のファイル名がとても長い場合の報告書（最終版）二〇二五年度第三四半期.pdf",
                   " filename*0*=utf-8''");
    char longname[256];
    memset(longname, 'n', 251);
    memcpy(longname + 251, ".pdf", 5);
    check_filename(longname, " filename*3*=");
}

/* ---- raw messages ------------------------------------------------------------------ */

static void expect_raw(const char *raw, size_t len, int rc, const char *out_or_reason)
{
    message_t *m = base_message();
    set_raw(m, raw, len);
    buf_t out = BUF_INIT;
    buf_puts(&out, "keep");
    char err[256] = "";
    int got = build(m, &out, err, sizeof(err));
    if (got != rc)
        fail_msg("raw \"%s\": rc %d (%s), want %d", raw, got, err, rc);
    if (rc == MIME_OK)
        assert_string_equal(buf_head(&out) + 4, out_or_reason);
    else if (strstr(err, out_or_reason) == NULL || strcmp(buf_head(&out), "keep") != 0)
        fail_msg("raw \"%s\": reason \"%s\", want \"%s\"", raw, err, out_or_reason);
    buf_free(&out);
    message_free(m);
}

#define RAW(s, rc, x) expect_raw(s, sizeof(s) - 1, rc, x)

static void test_raw_messages(void **state)
{
    (void)state;
    RAW("From: a@b\r\nSubject: x\r\n\r\nbody\r\n", MIME_OK,
        "From: a@b\r\nSubject: x\r\n\r\nbody\r\n");
    RAW("From: a@b\nSubject: x\n folded\n\n.dot\rbare\n", MIME_OK,
        "From: a@b\r\nSubject: x\r\n folded\r\n\r\n.dot\r\nbare\r\n");
    RAW("from:a@b\r\n\r\nno final break", MIME_OK, "from:a@b\r\n\r\nno final break\r\n");
    RAW("From: a@b", MIME_OK, "From: a@b\r\n"); /* headers only */
    RAW("From: a@b\r\n\r\n\xc3\xa9 8-bit body\r\n", MIME_OK, "From: a@b\r\n\r\n\xc3\xa9 8-bit body\r\n");
    RAW("Subject: x\r\n\r\nb\r\n", MIME_EINVAL, "no From header field");
    RAW("\r\nbody\r\n", MIME_EINVAL, "no header section");
    RAW(" From: a@b\r\n\r\n", MIME_EINVAL, "starts with a continuation line");
    RAW("From: a@b\r\nnot a header\r\n\r\n", MIME_EINVAL, "header line 2 is not a header field");
    RAW("From: a@b\r\n: empty name\r\n\r\n", MIME_EINVAL, "header line 2 is not a header field");
    RAW("From: a@b\r\n\r\nx\0y\r\n", MIME_EINVAL, "NUL");
    buf_t big = BUF_INIT;
    buf_puts(&big, "From: a@b\r\n\r\nok\r\n");
    for (int i = 0; i < 999; i++)
        buf_putc(&big, 'x');
    buf_puts(&big, "\r\n");
    expect_raw(buf_head(&big), buf_size(&big), MIME_EINVAL, "raw message line 4 is 999 octets");
    /* exactly 998 is fine */
    buf_reset(&big);
    buf_puts(&big, "From: a@b\r\n\r\n");
    for (int i = 0; i < 998; i++)
        buf_putc(&big, 'x');
    buf_puts(&big, "\r\n");
    expect_raw(buf_head(&big), buf_size(&big), MIME_OK, buf_head(&big));
    buf_free(&big);
}

/* ---- refusals and the size limit -------------------------------------------------- */

static void expect_refused(message_t *m, const char *reason)
{
    buf_t out = BUF_INIT;
    char err[256] = "";
    assert_int_equal(build(m, &out, err, sizeof(err)), MIME_EINVAL);
    if (strstr(err, reason) == NULL)
        fail_msg("reason \"%s\" lacks \"%s\"", err, reason);
    assert_int_equal(buf_size(&out), 0);
    buf_free(&out);
    message_free(m);
}

static void test_attachment_refusals(void **state)
{
    (void)state;
    message_t *m = base_message();
    add_att(m, "a\r\nBcc: x", "text/plain", "x", 1);
    expect_refused(m, "attachment 0: control character in file name \"a\\r\\nBcc: x\"");
    m = base_message();
    add_att(m, "a", "text/plain\r\nX: y", "x", 1);
    expect_refused(m, "attachment 0: invalid content type");
    m = base_message();
    add_att(m, "a", "noslash", "x", 1);
    expect_refused(m, "invalid content type \"noslash\"");
    m = base_message();
    add_att(m, "ok", "text/plain", "x", 1);
    add_att(m, "a", "Multipart/mixed; boundary=x", "x", 1);
    expect_refused(m, "attachment 1: a multipart content type cannot be attached");
    m = base_message();
    add_att(m, "a", "message/rfc822", "From: a@b\n\n\xff", 13);
    expect_refused(m, "message/* content must be 7-bit");
    m = base_message();
    mp_attachment_t *a = add_att(m, "a", "image/png", "x", 1);
    a->content_id = xstrdup("a b@c");
    expect_refused(m, "invalid content id");
    m = base_message();
    add_att(m, "", "image/png", "x", 1);
    expect_refused(m, "file name must be 1..255 octets");
}

static void test_too_big_attachment(void **state)
{
    (void)state;
    message_t *m = base_message();
    size_t n = 1 << 20;
    unsigned char *d = xcalloc(1, n);
    add_att(m, "big.bin", "application/octet-stream", d, n);
    free(d);
    buf_t out = BUF_INIT;
    buf_puts(&out, "keep");
    char err[256];
    mime_opts_t o = { .now = NOW, .max_size = 1000000 };
    /* refused before encoding: the decoded size alone is over the limit */
    assert_int_equal(mime_build(m, &o, &out, err, sizeof(err)), MIME_ETOOBIG);
    assert_non_null(strstr(err, "limit is 1000000"));
    assert_string_equal(buf_head(&out), "keep");
    /* over the limit only once encoded (4/3 of 1 MiB is ~1.4 MB) */
    o.max_size = 1100000;
    assert_int_equal(mime_build(m, &o, &out, err, sizeof(err)), MIME_ETOOBIG);
    assert_non_null(strstr(err, "limit is 1100000"));
    assert_string_equal(buf_head(&out), "keep");
    o.max_size = 1500000;
    assert_int_equal(mime_build(m, &o, &out, err, sizeof(err)), MIME_OK);
    buf_free(&out);
    message_free(m);
    /* raw too */
    m = base_message();
    set_raw(m, "From: a@b\r\n\r\n0123456789\r\n", 25);
    o.max_size = 20;
    assert_int_equal(mime_build(m, &o, &out, err, sizeof(err)), MIME_ETOOBIG);
    assert_int_equal(buf_size(&out), 0);
    buf_free(&out);
    message_free(m);
}

/* Allocation failure is reported, not fatal: an attachment claiming 64 TiB
 * makes the up-front reservation fail before a byte of it is read.
 * (AddressSanitizer aborts on such a request instead of returning NULL.) */
static void test_enomem_reported(void **state)
{
    (void)state;
#ifndef __SANITIZE_ADDRESS__
    message_t *m = base_message();
    mp_attachment_t *a = add_att(m, "huge.bin", "application/octet-stream", "x", 1);
    a->len = (size_t)1 << 46;
    buf_t out = BUF_INIT;
    buf_puts(&out, "keep");
    char err[256] = "";
    assert_int_equal(build(m, &out, err, sizeof(err)), MIME_ENOMEM);
    assert_string_equal(err, "out of memory");
    assert_string_equal(buf_head(&out), "keep");
    a->len = 1;
    buf_free(&out);
    message_free(m);
#endif
}

/* ---- random loop ---------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static void random_bytes(uint64_t *rng, buf_t *b, size_t max)
{
    static const char *const pieces[] = { "word", " ", "\t", "é", "✓", "🎉", "=?", "=_mp_",
                                          "--", ".", "\r", "\n", "\r\n", "\r\n.\r\n", "=",
                                          "\"", "\\", "%", ";", "'" };
    size_t n = rng_next(rng) % (max + 1);
    for (size_t i = 0; i < n; i++) {
        uint64_t r = rng_next(rng);
        if (r % 7 == 0) {
            buf_putc(b, (char)(r >> 16)); /* any byte, NUL included */
        } else if (r % 211 == 0) {
            for (int j = 0; j < 1100; j++)
                buf_putc(b, 'L');
        } else {
            buf_puts(b, pieces[(r >> 8) % (sizeof(pieces) / sizeof(pieces[0]))]);
        }
    }
}

static void check_wire(const char *o, size_t n)
{
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)o[i];
        assert_true(c != 0 && c < 0x80); /* nothing but 7-bit on the wire */
        if (c == '\r') {
            assert_true(i + 1 < n && o[i + 1] == '\n');
            assert_true(col <= 998);
            col = 0;
            i++;
        } else {
            assert_true(c != '\n');
            col++;
        }
    }
    assert_int_equal(col, 0);
}

/* Every boundary declared must open, separate and close exactly as many
 * parts as its multipart holds; nothing else may look like one. */
static void check_boundaries(const char *o)
{
    const char *p = o;
    while ((p = strstr(p, "boundary=\"")) != NULL) {
        p += 10;
        char b[64], delim[80], close[80];
        size_t bl = strcspn(p, "\"");
        assert_true(bl < sizeof(b));
        memcpy(b, p, bl);
        b[bl] = '\0';
        snprintf(delim, sizeof(delim), "\r\n--%s\r\n", b);
        snprintf(close, sizeof(close), "\r\n--%s--\r\n", b);
        size_t count = 0, closes = 0;
        for (const char *q = o; (q = strstr(q, b)) != NULL; q += bl)
            count++;
        for (const char *q = o; (q = strstr(q, delim)) != NULL; q += 1)
            ;
        for (const char *q = o; (q = strstr(q, close)) != NULL; q += 1)
            closes++;
        assert_int_equal(closes, 1);
        /* parameter + first delimiter + separators + close delimiter:
         * all occurrences are structural */
        size_t structural = 1 + closes;
        for (const char *q = o; (q = strstr(q, delim)) != NULL; q += 1)
            structural++;
        assert_int_equal(count, structural);
    }
}

static void test_random_attachments_and_raw(void **state)
{
    (void)state;
    uint64_t rng = 0x853c49e6748fea9bULL;
    static const char *const types[] = { "text/plain", "text/html; charset=utf-8",
                                         "application/octet-stream", "image/png",
                                         "application/json" };
    for (int iter = 0; iter < 600; iter++) {
        message_t *m = base_message();
        buf_t t = BUF_INIT, out = BUF_INIT;
        int raw = iter % 5 == 4;
        if (raw) {
            buf_puts(&t, iter % 2 ? "From: a@b\n" : "Subject: s\r\nFrom: a@b\r\n");
            if (rng_next(&rng) % 2)
                buf_puts(&t, "\r\n");
            random_bytes(&rng, &t, 200);
            set_raw(m, buf_head(&t), buf_size(&t));
        } else {
            random_bytes(&rng, &t, 100);
            if (rng_next(&rng) % 2)
                m->text = xstrdup(buf_head(&t)); /* stops at a NUL */
            buf_reset(&t);
            random_bytes(&rng, &t, 100);
            if (rng_next(&rng) % 2)
                m->html = xstrdup(buf_head(&t));
            size_t na = rng_next(&rng) % 4;
            for (size_t i = 0; i < na; i++) {
                buf_t f = BUF_INIT;
                random_bytes(&rng, &f, 8);
                buf_puts(&f, "x.bin");
                /* control bytes in names are refused upstream: strip */
                char *fn = xstrdup(buf_head(&f));
                char *w = fn;
                for (char *q = fn; *q; q++)
                    if ((unsigned char)*q >= 0x20 && *q != 0x7f)
                        *w++ = *q;
                *w = '\0';
                buf_reset(&t);
                random_bytes(&rng, &t, 300);
                mp_attachment_t *a = add_att(m, fn[0] && strlen(fn) <= 255 ? fn : "f",
                                             types[rng_next(&rng) % 5], buf_head(&t),
                                             buf_size(&t));
                a->is_inline = rng_next(&rng) % 2;
                if (a->is_inline)
                    a->content_id = xstrdup("cid@x");
                free(fn);
                buf_free(&f);
            }
        }
        char err[256];
        int rc = build(m, &out, err, sizeof(err));
        if (raw) {
            /* only line length or NUL may refuse a raw message here */
            if (rc != MIME_OK)
                assert_true(strstr(err, "octets long") || strstr(err, "NUL") ||
                            strstr(err, "not a header field") || strstr(err, "continuation"));
            else {
                size_t n = buf_size(&out);
                const char *o = buf_head(&out);
                assert_true(n >= 2 && memcmp(o + n - 2, "\r\n", 2) == 0);
                for (size_t i = 0; i < n; i++) {
                    if (o[i] == '\r')
                        assert_true(o[i + 1] == '\n');
                    if (o[i] == '\n')
                        assert_true(i > 0 && o[i - 1] == '\r');
                }
            }
        } else {
            if (rc != MIME_OK)
                fail_msg("iteration %d: %s", iter, err);
            check_wire(buf_head(&out), buf_size(&out));
            check_boundaries(buf_head(&out));
            /* dot-stuffing keeps its contract on what we built */
            buf_t w = BUF_INIT;
            mime_dotstuff(buf_head(&out), buf_size(&out), &w);
            assert_int_equal(memcmp(buf_head(&w) + buf_size(&w) - 5, "\r\n.\r\n", 5), 0);
            buf_free(&w);
        }
        buf_free(&t);
        buf_free(&out);
        message_free(m);
    }
}

/* The iovec framing equals mime_dotstuff() on every CRLF-only input and
 * refuses bare line endings. */
static void test_wire_segments(void **state)
{
    (void)state;
    static const char *const pieces[] = { ".", "..", "\r\n", "a", "b c", "\r\n.\r\n", "é",
                                          ".x\r\n", "\r\n\r\n" };
    uint64_t rng = 0x1234567887654321ULL;
    buf_t in = BUF_INIT, a = BUF_INIT, b = BUF_INIT;
    for (int iter = 0; iter < 3000; iter++) {
        buf_reset(&in);
        buf_reset(&a);
        buf_reset(&b);
        size_t n = rng_next(&rng) % 12;
        for (size_t i = 0; i < n; i++)
            buf_puts(&in, pieces[rng_next(&rng) % (sizeof(pieces) / sizeof(pieces[0]))]);
        mime_seg_t *v = NULL;
        size_t nv = 0;
        assert_int_equal(mime_wire_segments(buf_head(&in), buf_size(&in), &v, &nv), MIME_OK);
        for (size_t i = 0; i < nv; i++) {
            assert_true(v[i].n > 0);
            buf_append(&a, v[i].p, v[i].n);
        }
        free(v);
        mime_dotstuff(buf_head(&in), buf_size(&in), &b);
        assert_int_equal(buf_size(&a), buf_size(&b));
        assert_memory_equal(buf_head(&a), buf_head(&b), buf_size(&b));
    }
    /* segments point into the message: no copy of the content */
    static const char msg[] = "From: a@b\r\n\r\n.x\r\n";
    mime_seg_t *v;
    size_t nv;
    assert_int_equal(mime_wire_segments(msg, sizeof(msg) - 1, &v, &nv), MIME_OK);
    assert_int_equal(nv, 4);
    assert_ptr_equal(v[0].p, msg);
    assert_int_equal(v[0].n, 13);
    assert_string_equal(v[1].p, ".");
    assert_ptr_equal(v[2].p, msg + 13);
    assert_string_equal(v[3].p, ".\r\n");
    free(v);
    assert_int_equal(mime_wire_segments("a\nb\r\n", 5, &v, &nv), MIME_EINVAL);
    assert_int_equal(mime_wire_segments("a\rb\r\n", 5, &v, &nv), MIME_EINVAL);
    assert_int_equal(mime_wire_segments("a\r", 2, &v, &nv), MIME_EINVAL);
    buf_free(&in);
    buf_free(&a);
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_and_attachment_exact),
        cmocka_unit_test(test_related_alternative_mixed_exact),
        cmocka_unit_test(test_related_only),
        cmocka_unit_test(test_inline_without_html),
        cmocka_unit_test(test_base64_sizes),
        cmocka_unit_test(test_transfer_encoding_choice),
        cmocka_unit_test(test_qp_attachment_decodes),
        cmocka_unit_test(test_filename_encodings),
        cmocka_unit_test(test_raw_messages),
        cmocka_unit_test(test_attachment_refusals),
        cmocka_unit_test(test_too_big_attachment),
        cmocka_unit_test(test_enomem_reported),
        cmocka_unit_test(test_random_attachments_and_raw),
        cmocka_unit_test(test_wire_segments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * tests/unit/test_reply.c - the SMTP reply parser (deliverer/reply.c),
 * table-driven: valid replies, every prefix of them, garbage, and replies
 * buffered back to back.
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
#include "deliverer/reply.h"

typedef struct valid_case {
    const char *name;
    const char *in;
    int         code;
    const char *enh;
    const char *text;
    int         nlines;
} valid_case_t;

static const valid_case_t valid_cases[] = {
    { "single line", "250 OK\r\n", 250, "", "OK", 1 },
    { "greeting", "220 mx.example ESMTP ready\r\n", 220, "", "mx.example ESMTP ready", 1 },
    { "multi-line EHLO", "250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n", 250, "",
      "mx.example PIPELINING SIZE 10240000 8BITMIME", 4 },
    { "enhanced code", "550 5.1.1 <b@y>: Recipient address rejected\r\n", 550, "5.1.1",
      "<b@y>: Recipient address rejected", 1 },
    { "enhanced code repeated on every line", "550-5.7.1 first line\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n",
      550, "5.7.1", "first line second third", 3 },
    { "different enhanced code later is text", "550-5.1.1 a\r\n550 5.7.1 b\r\n", 550, "5.1.1", "a 5.7.1 b", 2 },
    { "enhanced code only", "250 2.0.0\r\n", 250, "2.0.0", "", 1 },
    { "three-digit subject and detail", "550 5.123.456 x\r\n", 550, "5.123.456", "x", 1 },
    { "5.1.10", "550 5.1.10 null MX\r\n", 550, "5.1.10", "null MX", 1 },
    { "no enhanced code: class mismatch", "550 4.1.1 x\r\n", 550, "", "4.1.1 x", 1 },
    { "no enhanced code: glued text", "250 2.0.0ok\r\n", 250, "", "2.0.0ok", 1 },
    { "no enhanced code: four digits", "250 2.0.1234 x\r\n", 250, "", "2.0.1234 x", 1 },
    { "no enhanced code: two parts", "450 4.2 x\r\n", 450, "", "4.2 x", 1 },
    { "LF-only", "451 4.7.1 greylisted, try later\n", 451, "4.7.1", "greylisted, try later", 1 },
    { "LF-only multi-line", "250-a\n250 b\n", 250, "", "a b", 2 },
    { "mixed endings", "250-a\r\n250 b\n", 250, "", "a b", 2 },
    { "354", "354 End data with <CR><LF>.<CR><LF>\r\n", 354, "", "End data with <CR><LF>.<CR><LF>", 1 },
    { "bare code", "250\r\n", 250, "", "", 1 },
    { "bare code ends multi-line", "250-a\r\n250\r\n", 250, "", "a", 2 },
    { "empty continuation", "250-\r\n250 ok\r\n", 250, "", "ok", 2 },
    { "control bytes sanitised", "250 a\tb\x01" "c\r\n", 250, "", "a b?c", 1 },
    { "421", "421 4.7.0 mx.example Error: too many connections\r\n", 421, "4.7.0",
      "mx.example Error: too many connections", 1 },
};

static void test_valid(void **state)
{
    for (size_t i = 0; i < sizeof(valid_cases) / sizeof(valid_cases[0]); i++) {
        const valid_case_t *c = &valid_cases[i];
        smtp_reply_t r;
        size_t used = 12345;
        size_t len = strlen(c->in);
        print_message("case: %s\n", c->name);
        assert_int_equal(smtp_reply_parse(c->in, len, &used, &r), SMTP_REPLY_OK);
        assert_int_equal(used, len);
        assert_int_equal(r.code, c->code);
        assert_string_equal(r.enh, c->enh);
        assert_string_equal(r.text, c->text);
        assert_int_equal(r.nlines, c->nlines);
    }
}

/* Every strict prefix of a valid reply needs more bytes. */
static void test_every_prefix_is_again(void **state)
{
    for (size_t i = 0; i < sizeof(valid_cases) / sizeof(valid_cases[0]); i++) {
        const valid_case_t *c = &valid_cases[i];
        size_t len = strlen(c->in);
        for (size_t n = 0; n < len; n++) {
            /* a heap copy of exactly n bytes: valgrind sees any overread */
            char *p = malloc(n ? n : 1);
            memcpy(p, c->in, n);
            smtp_reply_t r;
            size_t used = 777;
            int rc = smtp_reply_parse(p, n, &used, &r);
            if (rc != SMTP_REPLY_AGAIN)
                fail_msg("case %s: prefix of %zu bytes gave %d, expected AGAIN", c->name, n, rc);
            assert_int_equal(used, 777); /* untouched */
            free(p);
        }
    }
}

typedef struct garbage_case {
    const char *name;
    const char *in;
    size_t      len; /* 0: strlen */
} garbage_case_t;

static const garbage_case_t garbage_cases[] = {
    { "letters", "hello world\r\n", 0 },
    { "letters without LF are garbage at once", "EHLO", 0 },
    { "two-digit code", "25 ok\r\n", 0 },
    { "two-digit bare code", "25\r\n", 0 },
    { "no separator", "250ok\r\n", 0 },
    { "bad separator", "250_ok\r\n", 0 },
    { "1xx", "150 ok\r\n", 0 },
    { "6xx", "650 ok\r\n", 0 },
    { "0xx", "050 ok\r\n", 0 },
    { "mismatched codes", "250-a\r\n251 b\r\n", 0 },
    { "mismatched codes seen before the end of line", "250-a\r\n3", 0 },
    { "mismatched codes, first digit", "250-a\r\n550 b\r\n", 0 },
    { "garbage continuation", "250-a\r\nxyz\r\n", 0 },
    { "empty line", "\r\n", 0 },
    { "empty line LF", "\n", 0 },
    { "NUL byte", "250 a\0b\r\n", 9 },
    { "space first", " 250 ok\r\n", 0 },
};

static void test_garbage(void **state)
{
    for (size_t i = 0; i < sizeof(garbage_cases) / sizeof(garbage_cases[0]); i++) {
        const garbage_case_t *c = &garbage_cases[i];
        smtp_reply_t r;
        size_t used = 0;
        print_message("case: %s\n", c->name);
        assert_int_equal(smtp_reply_parse(c->in, c->len ? c->len : strlen(c->in), &used, &r),
                         SMTP_REPLY_EPROTO);
    }
}

static void test_line_length_limit(void **state)
{
    buf_t b = BUF_INIT;
    smtp_reply_t r;
    size_t used = 0;

    /* exactly SMTP_REPLY_MAX_LINE octets of content is fine */
    buf_puts(&b, "250 ");
    for (size_t i = 4; i < SMTP_REPLY_MAX_LINE; i++)
        buf_putc(&b, 'x');
    buf_puts(&b, "\r\n");
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_OK);
    assert_int_equal(used, buf_size(&b));
    assert_int_equal(strlen(r.text), sizeof(r.text) - 1); /* truncated */

    /* one more is garbage, with or without the line end buffered */
    buf_reset(&b);
    buf_puts(&b, "250 ");
    for (size_t i = 4; i < SMTP_REPLY_MAX_LINE + 1; i++)
        buf_putc(&b, 'x');
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_AGAIN);
    buf_putc(&b, 'x');
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_EPROTO);
    buf_reset(&b);
    buf_puts(&b, "250 ");
    for (size_t i = 4; i < SMTP_REPLY_MAX_LINE + 1; i++)
        buf_putc(&b, 'x');
    buf_puts(&b, "\r\n");
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_EPROTO);

    /* an overlong continuation line, too */
    buf_reset(&b);
    buf_puts(&b, "250-a\r\n250-");
    for (size_t i = 0; i < 3000; i++)
        buf_putc(&b, 'y');
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_EPROTO);
    buf_free(&b);
}

static void test_line_count_limit(void **state)
{
    buf_t b = BUF_INIT;
    smtp_reply_t r;
    size_t used = 0;

    for (int i = 0; i < 99; i++)
        buf_printf(&b, "250-line %d\r\n", i);
    buf_puts(&b, "250 last\r\n");
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_OK);
    assert_int_equal(r.nlines, 100);
    assert_int_equal(used, buf_size(&b));
    buf_free(&b);
}

typedef struct ehlo_count {
    int    n;
    size_t bytes;
} ehlo_count_t;

static void count_line(void *arg, int index, const char *text, size_t len)
{
    ehlo_count_t *c = arg;
    assert_int_equal(index, c->n);
    c->n++;
    c->bytes += len;
}

/* Lines are not counted: 5,000 EHLO lines (145 KB) are one reply; only
 * SMTP_REPLY_MAX_BYTES for the whole reply is, as soon as that much is
 * buffered without its end. */
static void test_reply_byte_budget(void **state)
{
    buf_t b = BUF_INIT;
    smtp_reply_t r;
    size_t used = 0;
    ehlo_count_t cnt = { 0, 0 };

    buf_puts(&b, "250-mx.example\r\n");
    for (int i = 1; i < 4999; i++)
        buf_printf(&b, "250-X-EXTENSION-%05d ARG=1\r\n", i);
    buf_puts(&b, "250 8BITMIME\r\n");
    assert_true(buf_size(&b) > 140000);
    assert_int_equal(smtp_reply_parse_lines(buf_head(&b), buf_size(&b), &used, &r, count_line, &cnt),
                     SMTP_REPLY_OK);
    assert_int_equal(used, buf_size(&b));
    assert_int_equal(r.nlines, 5000);
    assert_int_equal(cnt.n, 5000);
    assert_int_equal(r.code, 250);
    assert_int_equal(strlen(r.text), sizeof(r.text) - 1); /* joined text truncated */

    /* exactly the budget is one reply */
    buf_reset(&b);
    while (buf_size(&b) + 2 * 1000 < SMTP_REPLY_MAX_BYTES) {
        buf_puts(&b, "250-");
        for (int i = 0; i < 994; i++)
            buf_putc(&b, 'a');
        buf_puts(&b, "\r\n");
    }
    size_t last = SMTP_REPLY_MAX_BYTES - buf_size(&b) - 6;
    buf_puts(&b, "250 ");
    for (size_t i = 0; i < last; i++)
        buf_putc(&b, 'z');
    buf_puts(&b, "\r\n");
    assert_int_equal(buf_size(&b), SMTP_REPLY_MAX_BYTES);
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_OK);
    assert_int_equal(used, SMTP_REPLY_MAX_BYTES);

    /* one octet more is garbage, complete or not */
    buf_reset(&b);
    while (buf_size(&b) <= SMTP_REPLY_MAX_BYTES) {
        buf_puts(&b, "250-");
        for (int i = 0; i < 994; i++)
            buf_putc(&b, 'a');
        buf_puts(&b, "\r\n");
    }
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_EPROTO);
    assert_int_equal(smtp_reply_parse(buf_head(&b), SMTP_REPLY_MAX_BYTES, &used, &r), SMTP_REPLY_AGAIN);
    assert_int_equal(smtp_reply_parse(buf_head(&b), SMTP_REPLY_MAX_BYTES + 1, &used, &r), SMTP_REPLY_EPROTO);
    buf_puts(&b, "250 end\r\n");
    assert_int_equal(smtp_reply_parse(buf_head(&b), buf_size(&b), &used, &r), SMTP_REPLY_EPROTO);
    buf_free(&b);
}

static void test_back_to_back(void **state)
{
    const char *in = "250-mx\r\n250 PIPELINING\r\n354 go ahead\n550 5.1.1 no\r\n25";
    size_t len = strlen(in), off = 0, used = 0;
    smtp_reply_t r;

    assert_int_equal(smtp_reply_parse(in + off, len - off, &used, &r), SMTP_REPLY_OK);
    assert_int_equal(used, strlen("250-mx\r\n250 PIPELINING\r\n"));
    assert_int_equal(r.code, 250);
    assert_string_equal(r.text, "mx PIPELINING");
    off += used;

    assert_int_equal(smtp_reply_parse(in + off, len - off, &used, &r), SMTP_REPLY_OK);
    assert_int_equal(used, strlen("354 go ahead\n"));
    assert_int_equal(r.code, 354);
    off += used;

    assert_int_equal(smtp_reply_parse(in + off, len - off, &used, &r), SMTP_REPLY_OK);
    assert_int_equal(used, strlen("550 5.1.1 no\r\n"));
    assert_int_equal(r.code, 550);
    assert_string_equal(r.enh, "5.1.1");
    assert_string_equal(r.text, "no");
    off += used;

    used = 99;
    assert_int_equal(smtp_reply_parse(in + off, len - off, &used, &r), SMTP_REPLY_AGAIN);
    assert_int_equal(used, 99);
}

typedef struct lines_seen {
    int  n;
    char line[8][64];
} lines_seen_t;

static void on_line(void *arg, int index, const char *text, size_t len)
{
    lines_seen_t *ls = arg;
    assert_int_equal(index, ls->n);
    assert_true(len < sizeof(ls->line[0]));
    memcpy(ls->line[ls->n], text, len);
    ls->line[ls->n][len] = '\0';
    ls->n++;
}

static void test_line_callback(void **state)
{
    const char *in = "250-mx.example hello\r\n250-SIZE 1000\r\n250-2.0.0 kept\r\n250 STARTTLS\r\n";
    lines_seen_t ls = { 0 };
    smtp_reply_t r;
    size_t used = 0;

    /* never called for an incomplete reply */
    assert_int_equal(smtp_reply_parse_lines(in, strlen(in) - 3, &used, &r, on_line, &ls), SMTP_REPLY_AGAIN);
    assert_int_equal(ls.n, 0);

    assert_int_equal(smtp_reply_parse_lines(in, strlen(in), &used, &r, on_line, &ls), SMTP_REPLY_OK);
    assert_int_equal(ls.n, 4);
    assert_string_equal(ls.line[0], "mx.example hello");
    assert_string_equal(ls.line[1], "SIZE 1000");
    assert_string_equal(ls.line[2], "2.0.0 kept"); /* raw: enhanced code kept */
    assert_string_equal(ls.line[3], "STARTTLS");

    ls.n = 0;
    assert_int_equal(smtp_reply_parse_lines("250-a\r\nxx\r\n", 11, &used, &r, on_line, &ls), SMTP_REPLY_EPROTO);
    assert_int_equal(ls.n, 0);
}

/* Fed a few bytes at a time with smtp_reply_parse_resume(), every reply
 * gives what it gives in one piece, garbage is still garbage, and two
 * buffered replies come out one after the other. */
static void test_resume_in_chunks(void **state)
{
    buf_t big = BUF_INIT;
    buf_puts(&big, "250-mx.example\r\n");
    for (int i = 1; i < 4999; i++)
        buf_printf(&big, "250-X-EXTENSION-%05d ARG=1\r\n", i);
    buf_puts(&big, "250 8BITMIME\r\n354 go\r\n");
    size_t nvalid = sizeof(valid_cases) / sizeof(valid_cases[0]);
    for (size_t step = 1; step <= 7; step += 3) {
        for (size_t i = 0; i <= nvalid; i++) {
            const char *in = i < nvalid ? valid_cases[i].in : buf_head(&big);
            size_t len = i < nvalid ? strlen(in) : buf_size(&big);
            smtp_reply_t whole, r;
            size_t wused = 0, used = 0, off = 0, n = 0;
            smtp_reply_cursor_t checked = { 0, 0 };
            assert_int_equal(smtp_reply_parse(in, len, &wused, &whole), SMTP_REPLY_OK);
            int rc = SMTP_REPLY_AGAIN;
            while (rc == SMTP_REPLY_AGAIN) {
                n = n + step < len - off ? n + step : len - off;
                rc = smtp_reply_parse_resume(in + off, n, &checked, &used, &r, NULL, NULL);
            }
            assert_int_equal(rc, SMTP_REPLY_OK);
            assert_int_equal(checked.checked, 0);
            assert_int_equal(checked.lines, 0);
            assert_int_equal(used, wused);
            assert_int_equal(r.code, whole.code);
            assert_int_equal(r.nlines, whole.nlines);
            assert_string_equal(r.enh, whole.enh);
            assert_string_equal(r.text, whole.text);
            if (i == nvalid) { /* the 354 behind it */
                off += used;
                assert_int_equal(smtp_reply_parse_resume(in + off, len - off, &checked, &used, &r, NULL, NULL),
                                 SMTP_REPLY_OK);
                assert_int_equal(r.code, 354);
            }
        }
        for (size_t i = 0; i < sizeof(garbage_cases) / sizeof(garbage_cases[0]); i++) {
            const garbage_case_t *c = &garbage_cases[i];
            size_t len = c->len ? c->len : strlen(c->in), used = 0, n = 0;
            smtp_reply_cursor_t checked = { 0, 0 };
            smtp_reply_t r;
            int rc = SMTP_REPLY_AGAIN;
            while (rc == SMTP_REPLY_AGAIN && n < len) {
                n = n + step < len ? n + step : len;
                rc = smtp_reply_parse_resume(c->in, n, &checked, &used, &r, NULL, NULL);
            }
            assert_int_equal(rc, SMTP_REPLY_EPROTO);
        }
    }
    buf_free(&big);
}

/* While a reply grows, the cursor counts its complete lines (what the
 * session's reply-line cap reads), a line still without its LF not yet;
 * the complete reply resets it and says nlines. */
static void test_resume_counts_lines(void **state)
{
    (void)state;
    const char *in = "250-a\r\n250-b\r\n250-c\r\n250 d\r\n";
    smtp_reply_cursor_t cur = { 0, 0 };
    smtp_reply_t r;
    size_t used = 0;
    /* every line is 7 bytes; the last one ends the reply at 28 */
    for (size_t n = 1; n < 28; n++) {
        assert_int_equal(smtp_reply_parse_resume(in, n, &cur, &used, &r, NULL, NULL), SMTP_REPLY_AGAIN);
        assert_int_equal(cur.lines, n / 7);
        assert_int_equal(cur.checked, n / 7 * 7);
    }
    assert_int_equal(smtp_reply_parse_resume(in, strlen(in), &cur, &used, &r, NULL, NULL), SMTP_REPLY_OK);
    assert_int_equal(r.nlines, 4);
    assert_int_equal(used, strlen(in));
    assert_int_equal(cur.lines, 0);
    assert_int_equal(cur.checked, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_every_prefix_is_again),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_line_length_limit),
        cmocka_unit_test(test_line_count_limit),
        cmocka_unit_test(test_reply_byte_budget),
        cmocka_unit_test(test_resume_in_chunks),
        cmocka_unit_test(test_resume_counts_lines),
        cmocka_unit_test(test_back_to_back),
        cmocka_unit_test(test_line_callback),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * SUMMARY
 *  tests/fuzz/fuzz_smtp_reply.c - libFuzzer: the SMTP reply parser on
 *  whatever a hostile server sends.
 * DESCRIPTION
 *  Walks the input reply by reply as the session does. Checks the
 *  contract of smtp_reply_parse(): OK consumes at least one byte and never
 *  more than given, gives a code 200..599 and at least one line, its text
 *  is terminated and holds no control character; AGAIN leaves *consumed
 *  untouched; the per-line variant agrees with the plain one and calls
 *  back once per line. Seeds: tests/fuzz/corpus/smtp_reply.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "deliverer/reply.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void count_line(void *arg, int index, const char *text, size_t len)
{
    int *n = arg;
    if (index != *n)
        abort(); /* in order, from 0 */
    (void)text;
    (void)len;
    (*n)++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;
    size_t off = 0;
    smtp_reply_t r, r2;
    while (off < size) {
        size_t used = 7777;
        int rc = smtp_reply_parse(p + off, size - off, &used, &r);
        if (rc == SMTP_REPLY_AGAIN) {
            if (used != 7777)
                abort();
            break;
        }
        if (rc == SMTP_REPLY_EPROTO)
            break;
        if (rc != SMTP_REPLY_OK || used == 0 || used > size - off)
            abort();
        if (r.code < 200 || r.code > 599 || r.nlines < 1 || (size_t)r.nlines * 4 > used || used > SMTP_REPLY_MAX_BYTES)
            abort();
        if (memchr(r.text, '\0', sizeof(r.text)) == NULL || memchr(r.enh, '\0', sizeof(r.enh)) == NULL)
            abort();
        for (const char *t = r.text; *t; t++)
            if ((unsigned char)*t < 0x20 || *t == 0x7f)
                abort();
        int lines = 0;
        size_t used2 = 0;
        if (smtp_reply_parse_lines(p + off, size - off, &used2, &r2, count_line, &lines) != SMTP_REPLY_OK ||
            used2 != used || r2.code != r.code || lines != r.nlines || strcmp(r2.text, r.text) != 0)
            abort();
        off += used;
    }
    return 0;
}

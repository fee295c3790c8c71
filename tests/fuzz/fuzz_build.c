/*
 * SUMMARY
 *  tests/fuzz/fuzz_build.c - libFuzzer: the builder on unvalidated models.
 * DESCRIPTION
 *  mime_build() must be safe on its own, whatever produced the model: the
 *  input is cut at 0xfe bytes into subject, display name, text, html, a
 *  header value, a raw message and up to four attachments (file name,
 *  content type, content), with the first byte choosing raw mode and
 *  inline flags. Success must give a message that keeps the wire
 *  invariants; failure must leave the buffer as it was.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/message.h"
#include "core/util.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char *take(const uint8_t **p, const uint8_t *end, size_t *len)
{
    const uint8_t *s = *p;
    const uint8_t *e = memchr(s, 0xfe, (size_t)(end - s));
    if (e == NULL)
        e = end;
    *len = (size_t)(e - s);
    char *r = xmalloc(*len + 1);
    memcpy(r, s, *len);
    r[*len] = '\0';
    *p = e < end ? e + 1 : end;
    return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t flags = data[0];
    const uint8_t *p = data + 1, *end = data + size;
    size_t len;
    message_t *m = message_new();
    m->id = xstrdup("fuzz-1");
    m->from.addr = xstrdup("a@fuzz.example");
    m->to = xcalloc(1, sizeof(*m->to));
    m->nto = 1;
    m->to[0].addr = xstrdup("b@fuzz.example");
    m->subject = take(&p, end, &len);
    m->from.name = take(&p, end, &len);
    m->text = take(&p, end, &len);
    m->html = take(&p, end, &len);
    m->headers = xcalloc(1, sizeof(*m->headers));
    m->nheaders = 1;
    m->headers[0].name = xstrdup("X-Fuzz");
    m->headers[0].value = take(&p, end, &len);
    char *raw = take(&p, end, &len);
    if (flags & 1) {
        m->raw = raw;
        m->raw_len = len;
    } else {
        free(raw);
    }
    size_t na = (flags >> 1) & 3;
    m->attachments = xcalloc(na ? na : 1, sizeof(*m->attachments));
    for (size_t i = 0; i < na; i++) {
        mp_attachment_t *a = &m->attachments[m->nattachments++];
        a->filename = take(&p, end, &len);
        a->content_type = take(&p, end, &len);
        a->data = (unsigned char *)take(&p, end, &a->len);
        a->is_inline = (flags >> (3 + i)) & 1;
        if (flags & 0x80)
            a->content_id = xstrdup("cid@fuzz");
    }
    buf_t out = BUF_INIT;
    buf_puts(&out, "keep");
    char err[256];
    mime_opts_t o = { .now = 1700000000, .max_size = 1 << 22 };
    int rc = mime_build(m, &o, &out, err, sizeof(err));
    if (rc == MIME_OK) {
        fuzz_check_message(buf_head(&out) + 4, buf_size(&out) - 4, m->raw == NULL);
        fuzz_check_wire(buf_head(&out) + 4, buf_size(&out) - 4);
    } else if (buf_size(&out) != 4 || memcmp(buf_head(&out), "keep", 4) != 0) {
        abort();
    }
    buf_free(&out);
    message_free(m);
    return 0;
}

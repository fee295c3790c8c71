/*
 * SUMMARY
 *  tests/fuzz/fuzz_msgjson.c - libFuzzer: JSON body -> message -> bytes.
 * DESCRIPTION
 *  The worker's whole parsing path on arbitrary input: msgjson_parse(),
 *  then mime_build() and mime_dotstuff() on whatever it accepts, checking
 *  the wire invariants (fuzz_common.h), and that tenant, campaign and
 *  pool are only ever accepted within their alphabet. Seeds:
 *  tests/fuzz/corpus/msgjson.
 */
#include <stddef.h>
#include <stdint.h>

#include "core/message.h"
#include "fuzz_common.h"
#include "queue/msgjson.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    message_t *m = NULL;
    char err[512];
    if (msgjson_parse((const char *)data, size, &m, err, sizeof(err)) != MSGJSON_OK) {
        if (m != NULL || err[0] == '\0')
            abort(); /* every refusal has a reason and no result */
        return 0;
    }
    /* the sender fields end up in log lines and metric labels as they are */
    if ((m->tenant && !message_valid_ident(MESSAGE_TENANT, m->tenant)) ||
        (m->campaign && !message_valid_ident(MESSAGE_CAMPAIGN, m->campaign)) ||
        (m->pool && !message_valid_ident(MESSAGE_POOL, m->pool)))
        abort();
    buf_t out = BUF_INIT;
    mime_opts_t o = { .now = 1700000000, .max_size = 1 << 22 };
    int rc = mime_build(m, &o, &out, err, sizeof(err));
    if (rc == MIME_OK) {
        fuzz_check_message(buf_head(&out), buf_size(&out), m->raw == NULL);
        fuzz_check_wire(buf_head(&out), buf_size(&out));
    } else if (buf_size(&out) != 0 || err[0] == '\0') {
        abort();
    }
    buf_free(&out);
    message_free(m);
    return 0;
}

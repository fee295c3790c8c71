/*
 * SUMMARY
 *  tests/fuzz/fuzz_imap_resp.c - libFuzzer: the IMAP response parser on
 *  whatever a hostile server sends.
 * DESCRIPTION
 *  Walks the input as the session does: parse one response, consume what
 *  it used, go on; stops at MORE or ERROR. Checks the contract of
 *  imap_resp_parse(): DONE uses at least one byte and never more than
 *  given, MORE and ERROR use none, ERROR always says why, every string is
 *  terminated, SEARCH data is consistent, and the same bytes parse the
 *  same way again (no hidden state). Seeds: tests/fuzz/corpus/imap_resp.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "imap/parser.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_terminated(const char *s, size_t cap)
{
    if (memchr(s, '\0', cap) == NULL)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;
    size_t off = 0;
    static imap_resp_t r, again; /* large: keep them off the stack */
    while (off < size) {
        size_t used = 7777;
        int rc = imap_resp_parse(p + off, size - off, &r, &used);
        if (rc == IMAP_PARSE_MORE || rc == IMAP_PARSE_ERROR) {
            if (used != 0)
                abort();
            if (rc == IMAP_PARSE_ERROR && r.error == NULL)
                abort();
            break;
        }
        if (rc != IMAP_PARSE_DONE || used == 0 || used > size - off)
            abort();
        check_terminated(r.tag, sizeof(r.tag));
        check_terminated(r.keyword, sizeof(r.keyword));
        check_terminated(r.code, sizeof(r.code));
        check_terminated(r.text, sizeof(r.text));
        if (r.search_count == 0 && r.search_max != 0)
            abort();
        if (r.search_count > 0 && r.search_max == 0)
            abort();
        if (r.has_uidvalidity && r.uidvalidity == 0)
            abort();
        size_t used2 = 0;
        if (imap_resp_parse(p + off, used, &again, &used2) != IMAP_PARSE_DONE || used2 != used ||
            again.kind != r.kind || again.cond != r.cond || again.search_max != r.search_max)
            abort(); /* exactly its own bytes suffice, and give the same answer */
        off += used;
    }
    return 0;
}

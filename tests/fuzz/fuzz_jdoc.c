/*
 * SUMMARY
 *  tests/fuzz/fuzz_jdoc.c - libFuzzer: simdjson + jdoc_check against jansson.
 * DESCRIPTION
 *  msgjson_parse() takes a body when jdoc_parse_simd() and jdoc_check()
 *  take it, and was taking it when jansson (JSON_REJECT_DUPLICATES, an
 *  object or array at the root) did. This harness aborts where the new
 *  parser takes a body jansson refuses: it must never be looser. A body
 *  only the new parser refuses is allowed (it gets jansson's reason or
 *  its own). Seeds: tests/fuzz/corpus/jdoc.
 */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "queue/jdoc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    jdoc_t d;
    char err[256];
    int rc = jdoc_parse_simd(&d, (const char *)data, size);
    int ours = rc == 0 && jdoc_check(&d, err, sizeof(err)) == 0;
    jdoc_free(&d);
    if (!ours)
        return 0;
    json_error_t e;
    json_t *root = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &e);
    int theirs = root != NULL && (json_is_object(root) || json_is_array(root));
    json_decref(root);
    if (!theirs)
        abort(); /* taken by simdjson, refused by jansson */
    return 0;
}

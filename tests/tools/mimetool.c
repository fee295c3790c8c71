/*
 * SUMMARY
 *  tests/tools/mimetool.c - build (and optionally DKIM-sign) one message.
 * DESCRIPTION
 *  Reads a mail.outbound JSON body on stdin, runs it through the same
 *  path as the worker (msgjson_parse, mime_build, dkim_sign) and writes
 *  the message bytes to stdout, for independent parsers and verifiers
 *  (tests/integration/test_mime_verify.py).
 *
 *    mimetool [--now EPOCH] [--max-size N] [--dkim KEYS_FILE]
 *             [--dkim-headers LIST] [--wire]
 *
 *  --wire writes the SMTP DATA payload (dot-stuffed, terminated) instead.
 * DIAGNOSTICS
 *  Exit 0 on success; 2 for a JSON/message error, 3 for a build error,
 *  4 for a DKIM error, 64 for usage; the reason goes to stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/buf.h"
#include "core/message.h"
#include "mime/build.h"
#include "mime/dkim.h"
#include "queue/msgjson.h"

int main(int argc, char **argv)
{
    const char *keys = NULL, *hdrs = NULL;
    time_t now = 0;
    size_t max_size = 0;
    int wire = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--now") == 0 && i + 1 < argc)
            now = (time_t)strtoll(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--max-size") == 0 && i + 1 < argc)
            max_size = (size_t)strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--dkim") == 0 && i + 1 < argc)
            keys = argv[++i];
        else if (strcmp(argv[i], "--dkim-headers") == 0 && i + 1 < argc)
            hdrs = argv[++i];
        else if (strcmp(argv[i], "--wire") == 0)
            wire = 1;
        else {
            fprintf(stderr, "usage: mimetool [--now EPOCH] [--max-size N] [--dkim KEYS_FILE] "
                            "[--dkim-headers LIST] [--wire] < message.json\n");
            return 64;
        }
    }
    buf_t in = BUF_INIT, out = BUF_INIT;
    char chunk[65536], err[512];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), stdin)) > 0)
        buf_append(&in, chunk, n);
    message_t *m = NULL;
    int rc = msgjson_parse(buf_head(&in), buf_size(&in), &m, err, sizeof(err));
    buf_free(&in);
    if (rc != MSGJSON_OK) {
        fprintf(stderr, "mimetool: %s\n", err);
        return 2;
    }
    mime_opts_t mo = { .now = now, .max_size = max_size };
    rc = mime_build(m, &mo, &out, err, sizeof(err));
    if (rc != MIME_OK) {
        fprintf(stderr, "mimetool: %s: %s\n", mime_strerror(rc), err);
        message_free(m);
        return 3;
    }
    if (keys) {
        dkim_signer_t *s = dkim_load(keys, hdrs, err, sizeof(err));
        if (s == NULL) {
            fprintf(stderr, "mimetool: %s\n", err);
            message_free(m);
            buf_free(&out);
            return 4;
        }
        rc = dkim_sign(s, message_addr_domain(m->from.addr), &out, now, err, sizeof(err));
        dkim_free(s);
        if (rc != DKIM_OK) {
            fprintf(stderr, "mimetool: %s: %s\n", dkim_strerror(rc), err);
            message_free(m);
            buf_free(&out);
            return 4;
        }
    }
    if (wire) {
        buf_t w = BUF_INIT;
        mime_dotstuff(buf_head(&out), buf_size(&out), &w);
        fwrite(buf_head(&w), 1, buf_size(&w), stdout);
        buf_free(&w);
    } else {
        fwrite(buf_head(&out), 1, buf_size(&out), stdout);
    }
    buf_free(&out);
    message_free(m);
    return fflush(stdout) == 0 ? 0 : 1;
}

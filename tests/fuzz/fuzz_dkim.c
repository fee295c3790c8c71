/*
 * SUMMARY
 *  tests/fuzz/fuzz_dkim.c - libFuzzer: DKIM canonicalisation and signing.
 * DESCRIPTION
 *  The input is a message: both canonicalisations run over it (relaxed
 *  body output must have no blank before a CRLF, no blank runs, no empty
 *  line at the end), and dkim_sign() with an Ed25519 key (written to a
 *  temporary file at start-up) must either refuse with a reason and the
 *  message untouched, or prepend well-formed fields and keep the message.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>

#include "core/buf.h"
#include "mime/dkim.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static dkim_signer_t *signer;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    static const unsigned char seed[32] = { 1, 2, 3, 4, 5, 6, 7, 8 };
    char path[] = "/tmp/fuzz_dkim_key.XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        abort();
    FILE *f = fdopen(fd, "w");
    EVP_PKEY *k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, 32);
    if (f == NULL || k == NULL || PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) != 1)
        abort();
    fclose(f);
    EVP_PKEY_free(k);
    char keys[256], err[256];
    snprintf(keys, sizeof(keys), "fuzz.example sel ed25519-sha256 %s\n", path);
    signer = dkim_load_mem(keys, strlen(keys), "fuzz", NULL, "from:to:subject:x-a", err,
                           sizeof(err));
    unlink(path);
    if (signer == NULL)
        abort();
    return 0;
}

static void check_body_canon(const char *s, size_t n)
{
    if (n == 0)
        return;
    if (n < 2 || s[n - 2] != '\r' || s[n - 1] != '\n')
        abort();
    if (n >= 4 && memcmp(s + n - 4, "\r\n\r\n", 4) == 0)
        abort(); /* trailing empty lines are removed */
    for (size_t i = 0; i + 1 < n; i++) {
        if (s[i] == '\t')
            abort();
        if (s[i] == ' ' && (s[i + 1] == ' ' || s[i + 1] == '\r'))
            abort();
        if ((s[i] == '\r') != (s[i + 1] == '\n'))
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    buf_t c = BUF_INIT;
    size_t boff = dkim_body_offset(s, size);
    if (boff > size)
        abort();
    dkim_canon_body(s + boff, size - boff, &c);
    check_body_canon(buf_head(&c), buf_size(&c));
    buf_reset(&c);
    dkim_canon_header(s, boff, 1, &c);
    if (memchr(buf_head(&c), '\n', buf_size(&c)) != buf_head(&c) + buf_size(&c) - 1)
        abort(); /* unfolded: the only LF is the final one */

    buf_t msg = BUF_INIT;
    buf_append(&msg, s, size);
    char err[256] = "";
    int rc = dkim_sign(signer, "fuzz.example", &msg, 1700000000, err, sizeof(err));
    if (rc == DKIM_OK) {
        size_t n = buf_size(&msg);
        if (n < size || memcmp(buf_head(&msg) + n - size, s, size) != 0 ||
            strncmp(buf_head(&msg), "DKIM-Signature: v=1; a=ed25519-sha256;", 38) != 0)
            abort();
    } else if (err[0] == '\0' || buf_size(&msg) != size || memcmp(buf_head(&msg), s, size)) {
        abort();
    }
    buf_free(&msg);
    buf_free(&c);
    return 0;
}

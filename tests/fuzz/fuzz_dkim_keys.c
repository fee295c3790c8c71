/*
 * SUMMARY
 *  tests/fuzz/fuzz_dkim_keys.c - libFuzzer: the DKIM keys-file parser.
 * DESCRIPTION
 *  dkim_load_mem() on arbitrary text, with a real Ed25519 key "k.pem" and
 *  an RSA-2048 key "r.pem" in the base directory (written at start-up) so
 *  lines that name them can load. The first line of input up to a 0xfe
 *  byte is the signed-headers list. A signer that loads must sign a
 *  small message for every domain the text names, or say it has no key.
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

static char dir[] = "/tmp/fuzz_dkim_keys.XXXXXX";

static void write_key(EVP_PKEY *k, const char *name)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (f == NULL || k == NULL || PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) != 1)
        abort();
    fclose(f);
    EVP_PKEY_free(k);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    static const unsigned char seed[32] = { 9 };
    if (mkdtemp(dir) == NULL)
        abort();
    write_key(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, 32), "k.pem");
    write_key(EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048), "r.pem");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    const char *cut = memchr(s, 0xfe, size);
    char *headers = NULL;
    if (cut) {
        headers = strndup(s, (size_t)(cut - s));
        size -= (size_t)(cut - s) + 1;
        s = cut + 1;
    }
    char err[512] = "";
    dkim_signer_t *k = dkim_load_mem(s, size, "fuzz", dir, headers, err, sizeof(err));
    if (k == NULL) {
        if (err[0] == '\0')
            abort();
    } else {
        static const char msg[] = "From: a@b.example\r\nX-A: 1\r\n\r\nbody\r\n";
        buf_t sig = BUF_INIT;
        int rc = dkim_signature(k, "b.example", msg, sizeof(msg) - 1, 1, &sig, err, sizeof(err));
        if (rc != DKIM_OK && rc != DKIM_ENOKEY)
            abort();
        buf_free(&sig);
        dkim_free(k);
    }
    free(headers);
    return 0;
}

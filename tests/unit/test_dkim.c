/*
 * SUMMARY
 *  tests/unit/test_dkim.c - mime/dkim: canonicalisation and signatures.
 * DESCRIPTION
 *  The RFC 6376 3.4.5 canonicalisation example byte for byte, more edge
 *  cases of both algorithms, the relaxed body hash of the RFC 6376 /
 *  RFC 8463 example message (2jUSOH9N..., as published in RFC 8463 A.3),
 *  an exact Ed25519 signature (Ed25519 is deterministic; the key is the
 *  RFC 8032 7.1 test key that RFC 8463 uses), RSA and Ed25519 signatures
 *  checked with OpenSSL's verify, and the keys-file loader's refusals.
 *  Independent verification (python3-dkim) is in
 *  tests/integration/test_mime_verify.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "core/buf.h"
#include "mime/dkim.h"

static char tmpdir[256];

/* RFC 8032 7.1 TEST 1 secret key (RFC 8463 A.2 "brisbane") */
static const unsigned char rfc8032_seed[32] = {
    0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
    0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
};

static EVP_PKEY *ed_key, *rsa_key;

static void write_key(EVP_PKEY *k, const char *name)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL), 1);
    fclose(f);
}

static void write_file(const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_dkim.XXXXXX");
    if (mkdtemp(tmpdir) == NULL)
        return -1;
    ed_key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, rfc8032_seed, 32);
    rsa_key = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    EVP_PKEY *small = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)512);
    if (!ed_key || !rsa_key || !small)
        return -1;
    write_key(ed_key, "ed.pem");
    write_key(rsa_key, "rsa.pem");
    write_key(small, "rsa512.pem");
    EVP_PKEY_free(small);
    write_file("notakey.pem", "hello\n");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    static const char *const files[] = { "ed.pem", "rsa.pem", "rsa512.pem", "notakey.pem",
                                         "keys.txt" };
    char path[512];
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", tmpdir, files[i]);
        unlink(path);
    }
    rmdir(tmpdir);
    EVP_PKEY_free(ed_key);
    EVP_PKEY_free(rsa_key);
    return 0;
}

static dkim_signer_t *load(const char *keys, const char *headers, char *err, size_t errlen)
{
    return dkim_load_mem(keys, strlen(keys), "keys.txt", tmpdir, headers, err, errlen);
}

/* ---- canonicalisation ------------------------------------------------------- */

/* RFC 6376 3.4.5, with <SP>/<HTAB> spelled out */
static const char rfc_example[] = "A: X\r\n"
                                  "B : Y\t\r\n"
                                  "\tZ  \r\n"
                                  "\r\n"
                                  " C \r\n"
                                  "D \t E\r\n"
                                  "\r\n"
                                  "\r\n";

static void test_rfc6376_example(void **state)
{
    (void)state;
    buf_t out = BUF_INIT;
    dkim_canon_header("A: X", 4, 1, &out);
    dkim_canon_header("B : Y\t\r\n\tZ  ", 12, 1, &out);
    assert_string_equal(buf_head(&out), "a:X\r\nb:Y Z\r\n");
    buf_reset(&out);
    size_t boff = dkim_body_offset(rfc_example, sizeof(rfc_example) - 1);
    assert_int_equal(boff, 22);
    dkim_canon_body(rfc_example + boff, sizeof(rfc_example) - 1 - boff, &out);
    assert_string_equal(buf_head(&out), " C\r\nD E\r\n");
    buf_free(&out);
}

static void check_body(const char *in, const char *expect)
{
    buf_t out = BUF_INIT;
    dkim_canon_body(in, strlen(in), &out);
    buf_append(&out, "", 0);
    if (strcmp(buf_head(&out), expect) != 0)
        fail_msg("body \"%s\": got \"%s\" want \"%s\"", in, buf_head(&out), expect);
    buf_free(&out);
}

static void test_body_cases(void **state)
{
    (void)state;
    check_body("", "");
    check_body("\r\n", "");
    check_body("\r\n\r\n\r\n", "");
    check_body(" \t \r\n\r\n", "");
    check_body("abc", "abc\r\n");
    check_body("a  b\t\tc  \r\n\r\nd\r\n\r\n", "a b c\r\n\r\nd\r\n");
    check_body("\r\n\r\nx\r\n", "\r\n\r\nx\r\n");
    check_body("a\nb\rc\r\n", "a\r\nb\r\nc\r\n"); /* bare CR, LF end lines, as on the wire */
    check_body("..dot\r\n", "..dot\r\n");
    check_body("\t lead\r\n", " lead\r\n");
}

static void test_header_cases(void **state)
{
    (void)state;
    static const struct {
        const char *in, *out;
    } cases[] = {
        { "Subject: Hello", "subject:Hello" },
        { "SUBJECT:Hello", "subject:Hello" },
        { "Subject \t:  a  \t b \t", "subject:a b" },
        { "Subject: a\r\n b\r\n\tc", "subject:a b c" },
        { "Subject:", "subject:" },
        { "Subject: \r\n ", "subject:" },
        { "X-A: =?UTF-8?B?w6k=?=", "x-a:=?UTF-8?B?w6k=?=" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        buf_t out = BUF_INIT;
        dkim_canon_header(cases[i].in, strlen(cases[i].in), 0, &out);
        buf_append(&out, "", 0);
        if (strcmp(buf_head(&out), cases[i].out) != 0)
            fail_msg("header \"%s\": got \"%s\"", cases[i].in, buf_head(&out));
        buf_free(&out);
    }
}

static void test_body_offset(void **state)
{
    (void)state;
    assert_int_equal(dkim_body_offset("A: b\r\n\r\nx", 9), 8);
    assert_int_equal(dkim_body_offset("A: b\r\n", 6), 6); /* no body */
    assert_int_equal(dkim_body_offset("A: b\n\nx", 7), 6);
    assert_int_equal(dkim_body_offset("", 0), 0);
}

/* ---- signatures -------------------------------------------------------------- */

static const char rfc_msg[] = "From: Joe SixPack <joe@football.example.com>\r\n"
                              "To: Suzie Q <suzie@shopping.example.net>\r\n"
                              "Subject: Is dinner ready?\r\n"
                              "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
                              "Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
                              "\r\n"
                              "Hi.\r\n"
                              "\r\n"
                              "We lost the game.  Are you hungry yet?\r\n"
                              "\r\n"
                              "Joe.\r\n"
                              "\r\n";

/* Checked once with python3-dkim against the RFC 8463 A.2 public key
 * 11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo= (and it fails there when
 * "Joe." becomes "Jim."). */
static const char ed_expect[] =
    "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    "\td=football.example.com; s=brisbane; t=1528637909; h=from:from:to:subject:\r\n"
    "\tdate:message-id; bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=; b=\r\n"
    "\tvN2NNEfK15VgbHaLjoKjG/9fYxD0eXnQVAvPD1OAuTUzeOu8StmCds5zgQLN7zVs+HMBtsIVo0B\r\n"
    "\tXDnMicHpyBQ==\r\n";

static void test_ed25519_exact(void **state)
{
    (void)state;
    char err[256];
    dkim_signer_t *s = load("football.example.com brisbane ed25519-sha256 ed.pem\n", NULL, err,
                            sizeof(err));
    if (s == NULL)
        fail_msg("load: %s", err);
    buf_t sig = BUF_INIT;
    assert_int_equal(dkim_signature(s, "football.example.com", rfc_msg, sizeof(rfc_msg) - 1,
                                    1528637909, &sig, err, sizeof(err)),
                     DKIM_OK);
    if (strcmp(buf_head(&sig), ed_expect) != 0)
        fail_msg("got:\n%s", buf_head(&sig));
    buf_free(&sig);
    dkim_free(s);
}

/* Recompute the header hash input the way RFC 6376 3.7 describes, from the
 * finished field, and check the b= value with OpenSSL's verify. */
static int verify_sig(EVP_PKEY *pub, int ed, const char *field,
                      const char *const *signed_fields, size_t nsigned)
{
    buf_t input = BUF_INIT, stripped = BUF_INIT, b64 = BUF_INIT;
    for (size_t i = 0; i < nsigned; i++)
        dkim_canon_header(signed_fields[i], strlen(signed_fields[i]), 1, &input);
    const char *b = field;
    while ((b = strstr(b + 1, "b=")) != NULL && b[-1] != ' ' && b[-1] != '\t')
        ;
    assert_non_null(b);
    buf_append(&stripped, field, (size_t)(b - field) + 2);
    for (const char *p = b + 2; *p; p++)
        if (*p != '\r' && *p != '\n' && *p != '\t' && *p != ' ')
            buf_putc(&b64, *p);
    dkim_canon_header(buf_head(&stripped), buf_size(&stripped), 0, &input);
    unsigned char sig[1024];
    int sl = EVP_DecodeBlock(sig, (const unsigned char *)buf_head(&b64), (int)buf_size(&b64));
    assert_true(sl > 0);
    size_t pad = 0;
    while (pad < 2 && buf_size(&b64) > pad && buf_head(&b64)[buf_size(&b64) - 1 - pad] == '=')
        pad++;
    sl -= (int)pad;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok;
    if (ed) {
        unsigned char d[32];
        unsigned dl;
        EVP_Digest(buf_head(&input), buf_size(&input), d, &dl, EVP_sha256(), NULL);
        ok = EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, pub) == 1 &&
             EVP_DigestVerify(ctx, sig, (size_t)sl, d, 32) == 1;
    } else {
        ok = EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, pub) == 1 &&
             EVP_DigestVerify(ctx, sig, (size_t)sl, (const unsigned char *)buf_head(&input),
                              buf_size(&input)) == 1;
    }
    EVP_MD_CTX_free(ctx);
    buf_free(&input);
    buf_free(&stripped);
    buf_free(&b64);
    return ok;
}

static void test_sign_both_and_verify(void **state)
{
    (void)state;
    char err[256];
    dkim_signer_t *s = load("# comment\n\n"
                            "football.example.com  rsa1 rsa-sha256 rsa.pem   # trailing\n"
                            "football.example.com\ted1\tED25519-SHA256\ted.pem\n"
                            "other.example sel rsa-sha256 rsa.pem\n",
                            "From:Subject: To", err, sizeof(err));
    if (s == NULL)
        fail_msg("load: %s", err);
    assert_int_equal(dkim_nkeys(s), 3);
    buf_t msg = BUF_INIT;
    buf_append(&msg, rfc_msg, sizeof(rfc_msg) - 1);
    /* a sub-domain is signed by its parent's keys */
    assert_int_equal(dkim_sign(s, "News.Football.example.com", &msg, 1528637909, err,
                               sizeof(err)),
                     DKIM_OK);
    const char *m = buf_head(&msg);
    assert_true(strncmp(m, "DKIM-Signature: v=1; a=rsa-sha256;", 34) == 0);
    const char *second = strstr(m + 1, "DKIM-Signature: v=1; a=ed25519-sha256;");
    assert_non_null(second);
    const char *orig = strstr(m, "From: Joe");
    assert_string_equal(orig, rfc_msg); /* the message itself is unchanged */
    assert_non_null(strstr(m, "h=from:from:subject:to;"));
    static const char *const fields[] = {
        "From: Joe SixPack <joe@football.example.com>",
        "Subject: Is dinner ready?",
        "To: Suzie Q <suzie@shopping.example.net>",
    };
    char *f1 = strndup(m, (size_t)(second - m) - 2);
    char *f2 = strndup(second, (size_t)(orig - second) - 2);
    assert_true(verify_sig(rsa_key, 0, f1, fields, 3));
    assert_true(verify_sig(ed_key, 1, f2, fields, 3));
    /* a changed header no longer verifies, whitespace changes still do */
    static const char *const changed[] = {
        "From: Joe SixPack <joe@football.example.com>",
        "Subject: Is dinner ready!",
        "To: Suzie Q <suzie@shopping.example.net>",
    };
    static const char *const refolded[] = {
        "FROM:Joe SixPack\r\n <joe@football.example.com>",
        "Subject: Is  dinner\tready?  ",
        "To: Suzie Q <suzie@shopping.example.net>",
    };
    assert_false(verify_sig(rsa_key, 0, f1, changed, 3));
    assert_false(verify_sig(ed_key, 1, f2, changed, 3));
    assert_true(verify_sig(rsa_key, 0, f1, refolded, 3));
    assert_true(verify_sig(ed_key, 1, f2, refolded, 3));
    free(f1);
    free(f2);

    /* no key: untouched, DKIM_ENOKEY */
    size_t before = buf_size(&msg);
    assert_int_equal(dkim_sign(s, "example.org", &msg, 1, err, sizeof(err)), DKIM_ENOKEY);
    assert_non_null(strstr(err, "example.org"));
    assert_int_equal(buf_size(&msg), before);
    /* "xample.com" is not a parent of "example.com" */
    assert_int_equal(dkim_sign(s, "xother.example", &msg, 1, err, sizeof(err)), DKIM_ENOKEY);
    buf_free(&msg);

    /* a message without a header section cannot be signed */
    buf_t bad = BUF_INIT;
    buf_puts(&bad, "\r\nbody\r\n");
    assert_int_equal(dkim_sign(s, "other.example", &bad, 1, err, sizeof(err)), DKIM_EINVAL);
    assert_string_equal(buf_head(&bad), "\r\nbody\r\n");
    buf_free(&bad);
    dkim_free(s);
}

/* The header selection follows RFC 6376 5.4.2: two Received-like fields
 * signed twice are taken bottom-up; a signature over a changed header
 * would not verify. */
static void test_repeated_headers_bottom_up(void **state)
{
    (void)state;
    char err[256];
    dkim_signer_t *s = load("ex.example s ed25519-sha256 ed.pem\n", "from:x-a", err, sizeof(err));
    assert_non_null(s);
    static const char msg[] = "X-A: first\r\nFrom: a@ex.example\r\nX-A: second\r\n\r\nbody\r\n";
    buf_t sig = BUF_INIT;
    assert_int_equal(dkim_signature(s, "ex.example", msg, sizeof(msg) - 1, 1, &sig, err,
                                    sizeof(err)),
                     DKIM_OK);
    assert_non_null(strstr(buf_head(&sig), "h=from:from:x-a:x-a;"));
    static const char *const fields[] = { "From: a@ex.example", "X-A: second", "X-A: first" };
    assert_true(verify_sig(ed_key, 1, buf_head(&sig), fields, 3));
    static const char *const topdown[] = { "From: a@ex.example", "X-A: first", "X-A: second" };
    assert_false(verify_sig(ed_key, 1, buf_head(&sig), topdown, 3));
    buf_free(&sig);
    dkim_free(s);
}

static void test_lines_folded(void **state)
{
    (void)state;
    char err[256];
    dkim_signer_t *s = load("football.example.com rsa1 rsa-sha256 rsa.pem\n", NULL, err,
                            sizeof(err));
    assert_non_null(s);
    buf_t sig = BUF_INIT;
    assert_int_equal(dkim_signature(s, "football.example.com", rfc_msg, sizeof(rfc_msg) - 1, 1,
                                    &sig, err, sizeof(err)),
                     DKIM_OK);
    const char *p = buf_head(&sig);
    size_t col = 0;
    for (; *p; p++) {
        if (*p == '\r') {
            assert_true(p[1] == '\n');
            assert_true(col <= 78);
            col = 0;
            p++;
            continue;
        }
        assert_true(*p != '\n');
        col++;
    }
    assert_int_equal(col, 0);
    buf_free(&sig);
    dkim_free(s);
}

static void test_load_errors(void **state)
{
    (void)state;
    static const struct {
        const char *keys, *headers, *reason;
    } cases[] = {
        { "", NULL, "no keys" },
        { "# only a comment\n", NULL, "no keys" },
        { "ex.example s rsa-sha256\n", NULL, "keys.txt:1: expected \"domain selector" },
        { "ex.example s rsa-sha256 rsa.pem extra\n", NULL, "got 5 fields" },
        { "\nex.example s rsa-sha1 rsa.pem\n", NULL, "keys.txt:2: unknown algorithm \"rsa-sha1\"" },
        { "-bad.example s rsa-sha256 rsa.pem\n", NULL, "invalid domain" },
        { "ex.example s_x rsa-sha256 rsa.pem\n", NULL, "invalid selector" },
        { "ex.example s rsa-sha256 missing.pem\n", NULL, "cannot open key" },
        { "ex.example s rsa-sha256 notakey.pem\n", NULL, "is not a PEM private key" },
        { "ex.example s rsa-sha256 ed.pem\n", NULL, "is not an RSA key" },
        { "ex.example s ed25519-sha256 rsa.pem\n", NULL, "is not an Ed25519 key" },
        { "ex.example s rsa-sha256 rsa512.pem\n", NULL, "has 512 bits" },
        { "ex.example s rsa-sha256 rsa.pem\n", "to:subject", "must include \"from\"" },
        { "ex.example s rsa-sha256 rsa.pem\n", "from::to", "empty or overlong" },
        { "ex.example s rsa-sha256 rsa.pem\n", "from:dkim-signature", "cannot be signed" },
        { "ex.example s rsa-sha256 rsa.pem\n", "from:x y", "invalid field name" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[256] = "";
        dkim_signer_t *s = load(cases[i].keys, cases[i].headers, err, sizeof(err));
        if (s != NULL || strstr(err, cases[i].reason) == NULL)
            fail_msg("case %zu: got %p \"%s\", want \"%s\"", i, (void *)s, err, cases[i].reason);
    }
    char err[256];
    assert_null(dkim_load("/nonexistent/keys.txt", NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "/nonexistent/keys.txt"));
    /* the file loader resolves key paths relative to the keys file */
    write_file("keys.txt", "ex.example s ed25519-sha256 ed.pem\n");
    char path[512];
    snprintf(path, sizeof(path), "%s/keys.txt", tmpdir);
    dkim_signer_t *s = dkim_load(path, NULL, err, sizeof(err));
    if (s == NULL)
        fail_msg("%s", err);
    dkim_free(s);
    assert_string_equal(dkim_strerror(DKIM_ENOKEY), "no DKIM key for the sender domain");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc6376_example),
        cmocka_unit_test(test_body_cases),
        cmocka_unit_test(test_header_cases),
        cmocka_unit_test(test_body_offset),
        cmocka_unit_test(test_ed25519_exact),
        cmocka_unit_test(test_sign_both_and_verify),
        cmocka_unit_test(test_repeated_headers_bottom_up),
        cmocka_unit_test(test_lines_folded),
        cmocka_unit_test(test_load_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

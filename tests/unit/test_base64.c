/*
 * Unit tests for core/base64: the encoder against RFC 4648 vectors and
 * every length around a slice, and the strict decoder's acceptance rules
 * and error offsets (queue/msgjson.c reports them to applications).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "core/base64.h"
#include "core/buf.h"

static void test_encode_vectors(void **state)
{
    static const char *const in[] = { "", "f", "fo", "foo", "foob", "fooba", "foobar" };
    static const char *const want[] = { "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy" };
    for (size_t i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        buf_t b = BUF_INIT;
        buf_puts(&b, "AUTH ");
        base64_encode(&b, in[i], strlen(in[i]));
        assert_int_equal(buf_size(&b), 5 + base64_encoded_len(strlen(in[i])));
        assert_string_equal(buf_head(&b) + 5, want[i]); /* NUL-terminated */
        buf_free(&b);
        char dst[16];
        assert_int_equal(base64_encode_to(dst, in[i], strlen(in[i])), strlen(want[i]));
        assert_string_equal(dst, want[i]);
    }
}

/* Every byte value, every length mod 3, decoded back exactly. */
static void test_roundtrip(void **state)
{
    unsigned char raw[259];
    for (size_t i = 0; i < sizeof(raw); i++)
        raw[i] = (unsigned char)(i * 7 + 3);
    for (size_t n = 0; n <= sizeof(raw); n++) {
        buf_t b = BUF_INIT;
        base64_encode(&b, raw, n);
        unsigned char out[sizeof(raw) + 8];
        size_t len = 0, bad = 99;
        assert_true(base64_decoded_max(buf_size(&b)) <= sizeof(out));
        assert_int_equal(base64_decode(out, &len, buf_head(&b), buf_size(&b), &bad), 0);
        assert_int_equal(len, n);
        assert_memory_equal(out, raw, n);
        buf_free(&b);
    }
}

static void test_decode_rules(void **state)
{
    static const struct {
        const char *in;
        int         rc;
        size_t      bad; /* when rc < 0 */
        const char *out; /* when rc == 0 */
    } cases[] = {
        { "", 0, 0, "" },
        { "QUJD", 0, 0, "ABC" },
        { "AAEC\r\n/w==\n", 0, 0, "\x00\x01\x02\xff" },
        { " Q U\tJ D ", 0, 0, "ABC" },
        { "QQ==  \r\n", 0, 0, "A" },
        { "QUI=", 0, 0, "AB" },
        { "QU*D", -1, 2, NULL },
        { "QUJ", -1, 3, NULL },        /* ends inside a quantum */
        { "QQ==QUJD", -1, 4, NULL },   /* text after the padding */
        { "Q===", -1, 1, NULL },       /* '=' too early */
        { "=QUJ", -1, 0, NULL },
        { "QR==", -1, 3, NULL },       /* non-zero bits a decoder would drop */
        { "QUJ=", -1, 3, NULL },
        { "QUJD-_", -1, 4, NULL },     /* base64url is not base64 */
        { "QQ=A", -1, 3, NULL },       /* "ab=c" */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t n = strlen(cases[i].in), len = 0, bad = 12345;
        unsigned char out[32];
        int rc = base64_decode(out, &len, cases[i].in, n, &bad);
        if (rc != cases[i].rc || (rc < 0 && bad != cases[i].bad))
            fail_msg("\"%s\": rc %d bad %zu, want %d %zu", cases[i].in, rc, bad, cases[i].rc, cases[i].bad);
        if (rc == 0) {
            /* the vectors with NUL bytes have their length from the encoding */
            size_t want = strcmp(cases[i].in, "AAEC\r\n/w==\n") == 0 ? 4 : strlen(cases[i].out);
            assert_int_equal(len, want);
            assert_memory_equal(out, cases[i].out, want);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_vectors),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_decode_rules),
    };
    return cmocka_run_group_tests_name("base64", tests, NULL, NULL);
}

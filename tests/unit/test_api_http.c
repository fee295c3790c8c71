/*
 * tests/unit/test_api_http.c - api/http: the tokens file parser (names,
 * comments, the last colon, short and malformed tokens, an empty file),
 * the constant-time match (every token found, near misses refused), the
 * Authorization header, percent-decoding and the router's patterns.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/http.h"

#define T1 "0123456789abcdef"             /* exactly API_TOKEN_MIN */
#define T2 "another-secret-token-XYZ"
#define T3 "third.token/with+odd=chars~"

static api_tokens_t *parse(const char *text, char *err, size_t errlen)
{
    err[0] = '\0';
    return api_tokens_parse(text, strlen(text), err, errlen);
}

static void test_tokens_parse(void **state)
{
    (void)state;
    char err[256];
    const char *text = "# operators\n"
                       "\n"
                       "   admin:ops-alice:" T1 "  \n"
                       "\t# indented comment\n"
                       T2 "\r\n"
                       "ci:" T3;                /* no final newline */
    api_tokens_t *t = parse(text, err, sizeof(err));
    assert_non_null(t);
    assert_int_equal(api_tokens_count(t), 3);
    assert_string_equal(api_tokens_match(t, T1, strlen(T1)), "admin:ops-alice");
    assert_string_equal(api_tokens_match(t, T2, strlen(T2)), "token5");
    assert_string_equal(api_tokens_match(t, T3, strlen(T3)), "ci");
    api_tokens_free(t);
}

static void test_tokens_rejected(void **state)
{
    (void)state;
    char err[256];
    assert_null(parse("", err, sizeof(err)));
    assert_string_equal(err, "no tokens");
    assert_null(parse("# only\n\n   \n", err, sizeof(err)));
    assert_string_equal(err, "no tokens");
    assert_null(parse(T1 "\nname:0123456789abcde\n", err, sizeof(err)));
    assert_string_equal(err, "line 2: token shorter than 16 characters");
    assert_null(parse("name:" T1 " more\n", err, sizeof(err)));
    assert_string_equal(err, "line 1: the token holds a space or a control character");
    assert_null(parse(":" T1 "\n", err, sizeof(err)));
    assert_string_equal(err, "line 1: the name before the last ':' must be 1 to 64 characters");
    assert_null(parse("my name:" T1 "\n", err, sizeof(err)));
    assert_string_equal(err, "line 1: the name holds a space or a control character");
    assert_null(parse(T1 ":\n", err, sizeof(err)));
    assert_string_equal(err, "line 1: token shorter than 16 characters");
}

static void test_tokens_match(void **state)
{
    (void)state;
    char err[256];
    api_tokens_t *t = parse("a:" T1 "\nb:" T2 "\n", err, sizeof(err));
    assert_non_null(t);
    assert_string_equal(api_tokens_match(t, T2, strlen(T2)), "b");
    assert_string_equal(api_tokens_match(t, T1, strlen(T1)), "a");
    /* prefixes, extensions, one character off, case, the empty token */
    assert_null(api_tokens_match(t, T1, strlen(T1) - 1));
    assert_null(api_tokens_match(t, T1 "0", strlen(T1) + 1));
    assert_null(api_tokens_match(t, "0123456789abcdeF", 16));
    assert_null(api_tokens_match(t, "", 0));
    assert_null(api_tokens_match(t, "a:" T1, strlen(T1) + 2));
    /* a token given twice: the last entry that matches names it, the
     * loop runs over all (no early exit) */
    api_tokens_free(t);
    t = parse("first:" T1 "\nsecond:" T1 "\n", err, sizeof(err));
    assert_string_equal(api_tokens_match(t, T1, strlen(T1)), "second");
    api_tokens_free(t);
}

static void test_tokens_load(void **state)
{
    (void)state;
    char path[] = "/tmp/mp-test-api-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fprintf(f, "ops:%s\n", T2);
    fclose(f);
    char err[256];
    int world = -1;
    api_tokens_t *t = api_tokens_load(path, &world, err, sizeof(err));
    assert_non_null(t);
    assert_int_equal(world, 0); /* mkstemp: 0600 */
    api_tokens_free(t);
    chmod(path, 0644);
    t = api_tokens_load(path, &world, err, sizeof(err));
    assert_non_null(t);
    assert_int_equal(world, 1);
    api_tokens_free(t);
    unlink(path);
    assert_null(api_tokens_load(path, &world, err, sizeof(err)));
    assert_non_null(strstr(err, "No such file"));
}

static void test_bearer(void **state)
{
    (void)state;
    size_t len = 0;
    const char *t = api_bearer("Bearer abc.def", &len);
    assert_non_null(t);
    assert_int_equal(len, 7);
    assert_memory_equal(t, "abc.def", 7);
    t = api_bearer("bearer   xyz  ", &len);
    assert_non_null(t);
    assert_int_equal(len, 3);
    assert_null(api_bearer(NULL, &len));
    assert_null(api_bearer("Basic abc", &len));
    assert_null(api_bearer("Bearer", &len));
    assert_null(api_bearer("Bearer ", &len));
    assert_null(api_bearer("Bearerabc", &len));
    assert_null(api_bearer("Bearer a b", &len));
}

static void test_url_decode(void **state)
{
    (void)state;
    char a[] = "a%20b%2Fc+d%7e";
    assert_int_equal(api_url_decode(a), 8);
    assert_string_equal(a, "a b/c+d~");
    char b[] = "x%2";
    assert_int_equal(api_url_decode(b), -1);
    char c[] = "x%zz";
    assert_int_equal(api_url_decode(c), -1);
    char d[] = "a%00b";
    assert_int_equal(api_url_decode(d), 3);
}

static void test_pattern_valid(void **state)
{
    (void)state;
    assert_true(api_pattern_valid("/v1/messages"));
    assert_true(api_pattern_valid("/v1/actions/{id}"));
    assert_true(api_pattern_valid("/v1/{a}/x/{b}"));
    assert_true(api_pattern_valid("/"));
    assert_false(api_pattern_valid(NULL));
    assert_false(api_pattern_valid("v1/messages"));
    assert_false(api_pattern_valid("/v1//x"));
    assert_false(api_pattern_valid("/v1/{}"));
    assert_false(api_pattern_valid("/v1/x{id}"));
    assert_false(api_pattern_valid("/v1/{id}x"));
    assert_false(api_pattern_valid("/v1/{i{d}"));
    assert_true(api_pattern_valid("/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}"));
    assert_false(api_pattern_valid("/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}"));
}

static void test_match(void **state)
{
    (void)state;
    api_params_t p;
    assert_int_equal(api_match("/v1/messages", "/v1/messages", &p), 1);
    assert_int_equal(p.n, 0);
    assert_int_equal(api_match("/v1/messages", "/v1/messages?priority=3", &p), 1);
    assert_int_equal(api_match("/v1/messages", "/v1/messages/", &p), 0);
    assert_int_equal(api_match("/v1/messages", "/v1/message", &p), 0);
    assert_int_equal(api_match("/v1/messages", "/v1/messagesx", &p), 0);
    assert_int_equal(api_match("/v1/messages", "/v1", &p), 0);
    assert_int_equal(api_match("/v1/messages", "/V1/messages", &p), 0);

    assert_int_equal(api_match("/v1/actions/{id}", "/v1/actions/a%20b%3A1", &p), 1);
    assert_int_equal(p.n, 1);
    assert_int_equal(p.namelen[0], 2);
    assert_memory_equal(p.name[0], "id", 2);
    assert_string_equal(p.value[0], "a b:1");
    api_params_clear(&p);
    assert_int_equal(p.n, 0);
    /* an empty segment, one more segment, an escaped slash or NUL, a bad escape */
    assert_int_equal(api_match("/v1/actions/{id}", "/v1/actions/", &p), 0);
    assert_int_equal(api_match("/v1/actions/{id}", "/v1/actions", &p), 0);
    assert_int_equal(api_match("/v1/actions/{id}", "/v1/actions/x/y", &p), 0);
    assert_int_equal(api_match("/v1/actions/{id}", "/v1/actions/x%2Fy", &p), 0);
    assert_int_equal(api_match("/v1/actions/{id}", "/v1/actions/x%00y", &p), 0);
    assert_int_equal(api_match("/v1/actions/{id}", "/v1/actions/x%zz", &p), 0);

    assert_int_equal(api_match("/v1/{kind}/x/{id}", "/v1/sup/x/42?a=b", &p), 1);
    assert_int_equal(p.n, 2);
    assert_memory_equal(p.name[0], "kind", 4);
    assert_string_equal(p.value[0], "sup");
    assert_memory_equal(p.name[1], "id", 2);
    assert_string_equal(p.value[1], "42");
    api_params_clear(&p);
    /* a second parameter fails after the first matched: nothing is left */
    assert_int_equal(api_match("/v1/{kind}/x/{id}", "/v1/sup/y/42", &p), 0);
    assert_int_equal(p.n, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokens_parse),  cmocka_unit_test(test_tokens_rejected),
        cmocka_unit_test(test_tokens_match),  cmocka_unit_test(test_tokens_load),
        cmocka_unit_test(test_bearer),        cmocka_unit_test(test_url_decode),
        cmocka_unit_test(test_pattern_valid), cmocka_unit_test(test_match),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

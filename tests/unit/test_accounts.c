/*
 * Unit tests for deliverer/accounts: the IMAP accounts file format
 * (comments, quoted fields, '#' inside passwords) and its errors.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "deliverer/accounts.h"

static char path[64];

static void write_file(const char *text, size_t len)
{
    snprintf(path, sizeof(path), "/tmp/mp-accounts-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
}

/* accounts_load() of text: 0, or -1 with err after "path:". */
static int load(accounts_t *a, const char *text, char *err, size_t errlen)
{
    write_file(text, strlen(text));
    char e[512] = "";
    int r = accounts_load(a, path, e, sizeof(e));
    size_t n = strlen(path);
    snprintf(err, errlen, "%s", strncmp(e, path, n) == 0 && e[n] == ':' ? e + n + 1 : e);
    unlink(path);
    return r;
}

static void expect(const accounts_t *a, const char *addr, const char *login, const char *pass)
{
    const account_t *ac = accounts_find(a, addr);
    if (ac == NULL)
        fail_msg("%s: no account", addr);
    assert_string_equal(ac->login, login);
    assert_string_equal(ac->password, pass);
}

/* The files the local stack and the Kubernetes example write read as before. */
static void test_existing_files(void **state)
{
    accounts_t a;
    char err[512];
    if (load(&a,
             "# <sender address> <imap login> <password>\n"
             "alice@test.example alice@test.example Passw0rd-1\n"
             "    # sender-address            imap-login                 password\n"
             "noreply@example.com         noreply@example.com        CHANGE-ME-imap-password\n"
             "\n"
             "billing@example.com\tbilling@example.com\tCHANGE-ME-imap-password-2\r\n"
             "carol@example.com carol p4ss # her IMAP password\n",
             err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(a.n, 4);
    expect(&a, "alice@test.example", "alice@test.example", "Passw0rd-1");
    expect(&a, "NOREPLY@example.com", "noreply@example.com", "CHANGE-ME-imap-password");
    expect(&a, "billing@example.com", "billing@example.com", "CHANGE-ME-imap-password-2");
    expect(&a, "carol@example.com", "carol", "p4ss");
    assert_null(accounts_find(&a, "dave@example.com"));
    accounts_free(&a);
}

/* '#' inside a field is data; quotes carry blanks, '"' and '\'. */
static void test_any_password(void **state)
{
    accounts_t a;
    char err[512];
    if (load(&a,
             "a@example.com a s3cret#42\n"
             "b@example.com b #starts-with-hash\n"
             "c@example.com c \"pass word\"\n"
             "d@example.com \"d login\" \"q\\\"uo\\\\te#;\"   # comment\n"
             "e@example.com e back\\slash\"mid\n"
             "\"f@example.com\" f \"#\"\n",
             err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(a.n, 6);
    expect(&a, "a@example.com", "a", "s3cret#42");
    expect(&a, "b@example.com", "b", "#starts-with-hash");
    expect(&a, "c@example.com", "c", "pass word");
    expect(&a, "d@example.com", "d login", "q\"uo\\te#;");
    expect(&a, "e@example.com", "e", "back\\slash\"mid");
    expect(&a, "f@example.com", "f", "#");
    accounts_free(&a);

    /* a line of any length */
    char *text = malloc(10000), *p = text;
    p += sprintf(p, "long@example.com long ");
    for (int i = 0; i < 5000; i++)
        *p++ = (char)('a' + i % 26);
    strcpy(p, "\nnext@example.com next n\n");
    assert_int_equal(load(&a, text, err, sizeof(err)), 0);
    assert_int_equal(strlen(accounts_find(&a, "long@example.com")->password), 5000);
    expect(&a, "next@example.com", "next", "n");
    accounts_free(&a);
    free(text);
}

static void test_errors(void **state)
{
    static const struct { const char *text, *want; } cases[] = {
        { "a@example.com a\n", "1: expected \"address login password\"" },
        { "# c\na@example.com a p extra\n", "2: expected \"address login password\"" },
        { "a@example.com a \"open\n", "1: unterminated quoted field (a closing \" is missing)" },
        { "a@example.com a \"x\\n\"\n", "1: unknown escape in a quoted field (only \\\" and \\\\)" },
        { "a@example.com a \"x\"y\n", "1: text after a closing quote (a blank must separate the fields)" },
        { "a@example.com a \"\"\n", "1: empty field" },
        { "a@example.com a p\nb@example.com b p\nA@example.com c q\n",
          "3: sender A@example.com is given twice, on lines 1 and 3" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        accounts_t a;
        char err[512];
        assert_int_equal(load(&a, cases[i].text, err, sizeof(err)), -1);
        assert_string_equal(err, cases[i].want);
        assert_int_equal(a.n, 0);
        assert_null(a.list);
    }
    accounts_t a;
    char err[512];
    write_file("a@example.com a p\0x\n", 20);
    assert_int_equal(accounts_load(&a, path, err, sizeof(err)), -1);
    unlink(path);
    assert_non_null(strstr(err, ":1: NUL byte in the line"));
    assert_int_equal(accounts_load(&a, "/nonexistent/accounts", err, sizeof(err)), -1);
    assert_string_equal(err, "/nonexistent/accounts: No such file or directory");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_existing_files),
        cmocka_unit_test(test_any_password),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests_name("accounts", tests, NULL, NULL);
}

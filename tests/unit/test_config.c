/*
 * Unit tests for core/config: file parsing, environment overrides,
 * validation errors, and the masked dump.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/config.h"
#include "deliverer/deliver.h"
#include "deliverer/env.h"
#include "deliverer/throttle.h"

static char path[64];

/* A new temporary file (named after tmpl) holding text; its name in out. */
static void write_temp(char *out, size_t outlen, const char *tmpl, const char *text)
{
    snprintf(out, outlen, "%s", tmpl);
    int fd = mkstemp(out);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

static void write_file(const char *text)
{
    write_temp(path, sizeof(path), "/tmp/mp-config-XXXXXX", text);
}

static int teardown(void **state)
{
    unlink(path);
    unsetenv("MAILPUMP_AMQP_PORT");
    unsetenv("MAILPUMP_SMTP_TLS");
    unsetenv("MAILPUMP_WORKER_COUNT");
    return 0;
}

static void test_defaults(void **state)
{
    mp_config_t c;
    char err[256];
    config_defaults(&c);
    assert_int_equal(config_load(&c, NULL, err, sizeof(err)), 0);
    assert_int_equal(config_validate(&c, err, sizeof(err)), 0);
    assert_string_equal(c.amqp_queue, "mail.outbound");
    assert_string_equal(c.amqp_dead_queue, "mail.dead");
    assert_string_equal(c.amqp_events_exchange, "mail.events");
    assert_int_equal(c.amqp_port, 5672);
    assert_int_equal(c.worker_count, 0);
    assert_int_equal(c.smtp_tls, MP_SMTP_TLS_OPPORTUNISTIC);
    assert_int_equal(c.imap_tls, MP_IMAP_TLS_IMAPS);
    assert_int_equal(c.log_level, MP_LOG_LEVEL_INFO);
    assert_int_equal(c.log_format, MP_LOG_FORMAT_LOGFMT);
    assert_int_equal(c.smtp_timeout_connect_ms, 0);
    assert_int_equal(c.smtp_timeout_quit_ms, 0);
    assert_int_equal(c.smtp_port, 25);
    assert_int_equal(c.message_max_size, 26214400UL);
    config_free(&c);
}

static void test_file_then_environment(void **state)
{
    write_file("; comment\n[amqp]\nhost = broker.internal\nport = 5673\n"
               "[smtp]\ntls = verify\nport = 2525\n[worker]\ncount = 3\n");
    setenv("MAILPUMP_AMQP_PORT", "6000", 1);
    setenv("MAILPUMP_WORKER_COUNT", "7", 1);
    mp_config_t c;
    char err[256];
    config_defaults(&c);
    assert_int_equal(config_load(&c, path, err, sizeof(err)), 0);
    assert_string_equal(c.amqp_host, "broker.internal"); /* file */
    assert_int_equal(c.amqp_port, 6000);                 /* environment wins */
    assert_int_equal(c.worker_count, 7);
    assert_int_equal(c.smtp_tls, MP_SMTP_TLS_VERIFY);
    assert_int_equal(c.smtp_port, 2525);
    config_free(&c);
}

static void test_errors_name_the_problem(void **state)
{
    static const struct {
        const char *file;
        const char *env_key, *env_val;
        int         load_fails; /* else validation fails */
        const char *needle;
    } cases[] = {
        { "[amqp]\nhots = x\n", NULL, NULL, 1, "unknown key [amqp] hots" },
        { "[nope]\nkey = 1\n", NULL, NULL, 1, "unknown key [nope] key" },
        { "[amqp]\nport = many\n", NULL, NULL, 1, "[amqp] port: expected a non-negative number" },
        { "[amqp]\nport = -5\n", NULL, NULL, 1, "expected a non-negative number" },
        { "[amqp]\nport = 70000\n", NULL, NULL, 0, "ports must be between 1 and 65535" },
        { "[smtp]\ntls = maybe\n", NULL, NULL, 1,
          ":2: [smtp] tls: \"maybe\" is not one of none, opportunistic, required, verify" },
        { "", "MAILPUMP_SMTP_TLS", "sometimes", 1,
          "MAILPUMP_SMTP_TLS: [smtp] tls: \"sometimes\" is not one of none, opportunistic, required, verify" },
        { "[imap]\ntls = ssl\n", NULL, NULL, 1, "[imap] tls: \"ssl\" is not one of imaps, starttls, none" },
        { "[log]\nformat = xml\n", NULL, NULL, 1, "[log] format: \"xml\" is not one of logfmt, json" },
        { "[log]\nlevel = trace\n", NULL, NULL, 1,
          "[log] level: \"trace\" is not one of error, warn, info, debug" },
        { "[log]\nlevel = INFO\n", NULL, NULL, 1, "[log] level: \"INFO\" is not one of" },
        { "", "MAILPUMP_AMQP_PORT", "x1", 1, "MAILPUMP_AMQP_PORT" },
        { "[imap]\nhost = 127.0.0.1\n", NULL, NULL, 0, "accounts_file is empty" },
        { "[amqp]\nprefetch = 70000\n", NULL, NULL, 0, "prefetch" },
        { "[amqp\nport = 1\n", NULL, NULL, 1, ":1: malformed section header \"[amqp\": no closing ]" },
        { "port = 1\n[amqp]\n", NULL, NULL, 1, ":1: key \"port\" outside a [section]" },
        { "[amqp]\nport\n", NULL, NULL, 1,
          ":2: syntax error: expected \"key = value\", \"[section]\" or a comment, got \"port\"" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        write_file(cases[i].file);
        if (cases[i].env_key)
            setenv(cases[i].env_key, cases[i].env_val, 1);
        mp_config_t c;
        char err[512] = "";
        config_defaults(&c);
        int lr = config_load(&c, path, err, sizeof(err));
        int vr = lr == 0 ? config_validate(&c, err, sizeof(err)) : 0;
        if (cases[i].load_fails) {
            assert_int_equal(lr, -1);
        } else {
            assert_int_equal(lr, 0);
            assert_int_equal(vr, -1);
        }
        if (strstr(err, cases[i].needle) == NULL)
            fail_msg("case %zu: \"%s\" not in \"%s\"", i, cases[i].needle, err);
        config_free(&c);
        if (cases[i].env_key)
            unsetenv(cases[i].env_key);
        unlink(path);
    }
}

/* The enumerated keys are parsed by config_load into enum values: from
 * the file, from the environment, aliases included. */
static void test_enum_keys(void **state)
{
    static const struct {
        const char *file;
        int         smtp_tls, imap_tls, level, format;
    } cases[] = {
        { "[smtp]\ntls = none\n[imap]\ntls = starttls\n[log]\nlevel = error\nformat = json\n",
          MP_SMTP_TLS_NONE, MP_IMAP_TLS_STARTTLS, MP_LOG_LEVEL_ERROR, MP_LOG_FORMAT_JSON },
        { "[smtp]\ntls = required\n[imap]\ntls = none\n[log]\nlevel = warn\nformat = logfmt\n",
          MP_SMTP_TLS_REQUIRED, MP_IMAP_TLS_NONE, MP_LOG_LEVEL_WARN, MP_LOG_FORMAT_LOGFMT },
        { "[smtp]\ntls = verify\n[imap]\ntls = imaps\n[log]\nlevel = warning\n",
          MP_SMTP_TLS_VERIFY, MP_IMAP_TLS_IMAPS, MP_LOG_LEVEL_WARN, MP_LOG_FORMAT_LOGFMT },
        { "[smtp]\ntls = opportunistic\n[log]\nlevel = debug\n",
          MP_SMTP_TLS_OPPORTUNISTIC, MP_IMAP_TLS_IMAPS, MP_LOG_LEVEL_DEBUG, MP_LOG_FORMAT_LOGFMT },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        write_file(cases[i].file);
        mp_config_t c;
        char err[256] = "";
        config_defaults(&c);
        if (config_load(&c, path, err, sizeof(err)) != 0)
            fail_msg("case %zu: %s", i, err);
        assert_int_equal(c.smtp_tls, cases[i].smtp_tls);
        assert_int_equal(c.imap_tls, cases[i].imap_tls);
        assert_int_equal(c.log_level, cases[i].level);
        assert_int_equal(c.log_format, cases[i].format);
        assert_int_equal(config_validate(&c, err, sizeof(err)), 0);
        config_free(&c);
        unlink(path);
    }
    /* the environment overrides the file's value */
    write_file("[smtp]\ntls = none\n");
    setenv("MAILPUMP_SMTP_TLS", "verify", 1);
    mp_config_t c;
    char err[256];
    config_defaults(&c);
    assert_int_equal(config_load(&c, path, err, sizeof(err)), 0);
    assert_int_equal(c.smtp_tls, MP_SMTP_TLS_VERIFY);
    config_free(&c);

    /* names and values, one table */
    assert_int_equal(config_enum_parse("smtp", "tls", "required"), MP_SMTP_TLS_REQUIRED);
    assert_int_equal(config_enum_parse("imap", "tls", "none"), MP_IMAP_TLS_NONE);
    assert_int_equal(config_enum_parse("log", "level", "warning"), MP_LOG_LEVEL_WARN);
    assert_int_equal(config_enum_parse("smtp", "tls", "imaps"), -1);
    assert_int_equal(config_enum_parse("smtp", "tls", NULL), -1);
    assert_int_equal(config_enum_parse("smtp", "port", "25"), -1); /* not an enum key */
    assert_string_equal(config_enum_name("smtp", "tls", MP_SMTP_TLS_VERIFY), "verify");
    assert_string_equal(config_enum_name("log", "level", MP_LOG_LEVEL_WARN), "warn");
    assert_string_equal(config_enum_name("log", "format", MP_LOG_FORMAT_JSON), "json");
    assert_string_equal(config_enum_name("imap", "tls", 7), "?");
    char list[128];
    config_enum_list("smtp", "tls", "|", list, sizeof(list));
    assert_string_equal(list, "none|opportunistic|required|verify");
    config_enum_list("log", "level", ", ", list, sizeof(list));
    assert_string_equal(list, "error, warn, info, debug");
    config_enum_list("amqp", "host", ", ", list, sizeof(list));
    assert_string_equal(list, "");
}

/* Parse text as the configuration file: 0 or -1 with err. */
static int load_text(mp_config_t *c, const char *text, char *err, size_t errlen)
{
    write_file(text);
    config_defaults(c);
    int r = config_load(c, path, err, errlen);
    unlink(path);
    return r;
}

/* The error after the "path:" prefix, or "" when err is not "path:...". */
static const char *after_path(const char *err)
{
    size_t n = strlen(path);
    return strncmp(err, path, n) == 0 && err[n] == ':' ? err + n + 1 : "";
}

/* A line of any length is read whole: no 200-byte limit (libinih's). */
static void test_long_lines(void **state)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    fputs("[smtp]\ntls_policy = ", f);
    for (int i = 0; i < 400; i++)
        fprintf(f, "%sdomain-%03d.example:verify", i ? ", " : "", i);
    fputs("\nport = 2525\n", f);
    fprintf(f, "helo_name = %0300d\n", 0); /* a long value for a short key */
    fclose(f);
    mp_config_t c;
    char err[512] = "";
    if (load_text(&c, text, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(strlen(c.smtp_tls_policy), 400 * 27 - 2);
    assert_true(strncmp(c.smtp_tls_policy, "domain-000.example:verify, domain-001", 37) == 0);
    const char *tail = c.smtp_tls_policy + strlen(c.smtp_tls_policy) - 25;
    assert_string_equal(tail, "domain-399.example:verify");
    assert_int_equal(c.smtp_port, 2525);
    assert_int_equal(strlen(c.smtp_helo_name), 300);
    config_free(&c);
    free(text);

    /* a long unknown key is named whole, not cut into "unknown key ... ple" */
    char line[600];
    snprintf(line, sizeof(line), "[smtp]\n%0250d = 1\n", 7);
    assert_int_equal(load_text(&c, line, err, sizeof(err)), -1);
    assert_non_null(strstr(err, ":2: unknown key [smtp] 0000000"));
    assert_non_null(strstr(err, "0007"));
    config_free(&c);
}

/* A key given twice is an error naming both lines, case-insensitively. */
static void test_duplicate_key(void **state)
{
    mp_config_t c;
    char err[512] = "";
    assert_int_equal(load_text(&c, "[smtp]\ntls = none\n; x\n\ntls = verify\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err), "5: [smtp] tls is given twice, on lines 2 and 5");
    config_free(&c);
    /* also across two [smtp] sections, and spelled in another case */
    assert_int_equal(load_text(&c, "[smtp]\nport = 25\n[amqp]\nhost = x\n[SMTP]\nPort = 26\n", err, sizeof(err)),
                     -1);
    assert_string_equal(after_path(err), "6: [smtp] port is given twice, on lines 2 and 6");
    config_free(&c);
    /* a section given twice is fine, and the environment still wins over the file */
    setenv("MAILPUMP_SMTP_PORT", "27", 1);
    assert_int_equal(load_text(&c, "[smtp]\nport = 25\n[amqp]\nhost = x\n[smtp]\ntls = none\n", err, sizeof(err)),
                     0);
    unsetenv("MAILPUMP_SMTP_PORT");
    assert_int_equal(c.smtp_port, 27);
    assert_int_equal(c.smtp_tls, MP_SMTP_TLS_NONE);
    config_free(&c);
}

/* An indented line after a key (libinih's continuation) is an error. */
static void test_continuation_line(void **state)
{
    mp_config_t c;
    char err[512] = "";
    assert_int_equal(load_text(&c, "[smtp]\ntls_policy = a.example:verify,\n  b.example:none\n", err, sizeof(err)),
                     -1);
    assert_string_equal(after_path(err),
                        "3: continuation lines are not supported: put the whole value on one line, or use "
                        "tls_policy_file (this indented line follows [smtp] tls_policy; unindent it if it is a "
                        "key of its own)");
    config_free(&c);
    /* a key with no _file form is told only to use one line; a blank line does not end the value */
    assert_int_equal(load_text(&c, "[amqp]\nhost = x\n\n\tport = 1\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err),
                        "4: continuation lines are not supported: put the whole value on one line (this indented "
                        "line follows [amqp] host; unindent it if it is a key of its own)");
    config_free(&c);
    /* indentation where no value precedes, and indented comments, read as before */
    if (load_text(&c, "  [amqp]\n  host = x\n  ; comment\n  # comment\n\n[smtp]\n\tport = 26\n", err,
                  sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_string_equal(c.amqp_host, "x");
    assert_int_equal(c.smtp_port, 26);
    config_free(&c);
}

/* Values are taken as written: only a ';' after a blank starts a comment,
 * and that is refused on a secret rather than cutting it. */
static void test_values_and_comments(void **state)
{
    mp_config_t c;
    char err[512] = "";
    if (load_text(&c,
                  "\xef\xbb\xbf; comment\n# comment\n[amqp]\npassword = pa;ss#wo\"rd\"\r\nhost = broker ; inline\n"
                  "user: \"quoted\"\nvhost =\n[smtp] ; the SMTP side\nca_file = /x;\nrelay_password =;x\n"
                  "helo_name = a=b:c\n",
                  err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_string_equal(c.amqp_password, "pa;ss#wo\"rd\"");
    assert_string_equal(c.amqp_host, "broker");
    assert_string_equal(c.amqp_user, "\"quoted\"");
    assert_string_equal(c.amqp_vhost, "");
    assert_string_equal(c.smtp_ca_file, "/x;");
    assert_string_equal(c.smtp_relay_password, ";x");
    assert_string_equal(c.smtp_helo_name, "a=b:c");
    config_free(&c);
    assert_int_equal(load_text(&c, "[smtp]\nport = 25x\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err), "2: [smtp] port: expected a non-negative number, got \"25x\"");
    config_free(&c);
    assert_int_equal(load_text(&c, "[amqp]\npassword = pa ;ss\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err),
                        "2: [amqp] password: a blank followed by ';' starts an inline comment, which would cut "
                        "this secret short; put the comment on a line of its own, or set MAILPUMP_AMQP_PASSWORD "
                        "(taken verbatim)");
    config_free(&c);
    assert_int_equal(load_text(&c, "[amqp] x\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err), "1: unexpected \"x\" after the section header");
    config_free(&c);
    assert_int_equal(load_text(&c, "[ ]\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err), "1: empty section name");
    config_free(&c);
    assert_int_equal(load_text(&c, "[amqp]\n= 1\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err), "2: syntax error: no key name before the '='");
    config_free(&c);
    assert_int_equal(load_text(&c, "[amqp]\n : 1\n", err, sizeof(err)), -1);
    assert_string_equal(after_path(err), "2: syntax error: no key name before the ':'");
    config_free(&c);
    char nul[] = "[amqp]\nhost = a\0b\n";
    write_file("");
    FILE *f = fopen(path, "w");
    fwrite(nul, 1, sizeof(nul) - 1, f);
    fclose(f);
    config_defaults(&c);
    assert_int_equal(config_load(&c, path, err, sizeof(err)), -1);
    assert_string_equal(after_path(err), "2: NUL byte in the line (not a text file?)");
    config_free(&c);
}

static char map_path[64];

/* map_path holds text */
static void write_map(const char *text)
{
    write_temp(map_path, sizeof(map_path), "/tmp/mp-map-XXXXXX", text);
}

/* deliver_config_build() of [smtp] tls_policy + tls_policy_file: 0, or -1 with err. */
static int build_tls_policy(const char *inline_map, const char *file, char *map, size_t maplen, char *err,
                            size_t errlen)
{
    mp_config_t c;
    config_defaults(&c);
    free(c.smtp_tls_policy);
    c.smtp_tls_policy = strdup(inline_map);
    free(c.smtp_tls_policy_file);
    c.smtp_tls_policy_file = strdup(file);
    deliver_config_t d;
    deliver_config_store_t st;
    int r = deliver_config_build(&d, &c, NULL, NULL, &st, err, errlen);
    if (r == 0)
        snprintf(map, maplen, "%s", d.tls_policy_map ? d.tls_policy_map : "(none)");
    deliver_config_store_free(&st);
    config_free(&c);
    return r;
}

/* [smtp] tls_policy_file: one entry per line after the inline entries,
 * so an inline entry wins; errors name file:line. */
static void test_tls_policy_file(void **state)
{
    char map[512], err[512] = "";
    write_map("# bank domains\n\nbank.example:verify\r\n  .corp.example : required  \n   # indented comment\n"
              "a.example:none\n");
    if (build_tls_policy("a.example:verify, b.example:none", map_path, map, sizeof(map), err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_string_equal(map, "a.example:verify, b.example:none, bank.example:verify, .corp.example : required, "
                             "a.example:none");
    deliver_tls_map_t m;
    assert_int_equal(deliver_tls_map_parse(map, &m, err, sizeof(err)), 0);
    assert_int_equal(m.n, 5);
    assert_int_equal(deliver_tls_map_lookup(&m, SMTP_TLS_OPPORTUNISTIC, "a.example"), SMTP_TLS_VERIFY);
    assert_int_equal(deliver_tls_map_lookup(&m, SMTP_TLS_OPPORTUNISTIC, "mx.corp.example"), SMTP_TLS_REQUIRED);
    assert_int_equal(deliver_tls_map_lookup(&m, SMTP_TLS_OPPORTUNISTIC, "bank.example"), SMTP_TLS_VERIFY);
    deliver_tls_map_free(&m);
    /* only the file */
    assert_int_equal(build_tls_policy("", map_path, map, sizeof(map), err, sizeof(err)), 0);
    assert_string_equal(map, "bank.example:verify, .corp.example : required, a.example:none");
    unlink(map_path);
    /* an empty file, or none */
    write_map("# nothing yet\n");
    assert_int_equal(build_tls_policy("", map_path, map, sizeof(map), err, sizeof(err)), 0);
    assert_string_equal(map, "(none)");
    unlink(map_path);

    static const struct { const char *file; const char *want; } bad[] = {
        { "a.example:verify\n\nb.example:sometimes\n",
          ":3: \"b.example:sometimes\" is not domain:none|opportunistic|required|verify" },
        { "a.example:verify, b.example:none\n", ":1: \"a.example:verify, b.example:none\": one entry per line, "
                                                 "without ','" },
        { "a.example:verify # the bank\n",
          ":1: \"a.example:verify # the bank\" is not domain:none|opportunistic|required|verify" },
        { "a.example\n", ":1: \"a.example\" is not domain:none|opportunistic|required|verify" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        write_map(bad[i].file);
        assert_int_equal(build_tls_policy("", map_path, map, sizeof(map), err, sizeof(err)), -1);
        char want[512];
        snprintf(want, sizeof(want), "[smtp] tls_policy_file: %s%s", map_path, bad[i].want);
        assert_string_equal(err, want);
        unlink(map_path);
    }
    assert_int_equal(build_tls_policy("", "/nonexistent/tls", map, sizeof(map), err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] tls_policy_file: /nonexistent/tls: No such file or directory");
    /* the inline key's own error is unchanged */
    assert_int_equal(build_tls_policy("a.example:maybe", "", map, sizeof(map), err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] tls_policy: \"a.example:maybe\" is not domain:none|opportunistic|required|verify");
}

/* [smtp] rate_limits_file: the same form for the rate limits. */
static void test_rate_limits_file(void **state)
{
    char err[512] = "", rule[96];
    double iv = 0;
    throttle_t *t = NULL;
    write_map("# providers\ngmail.com:50/s\n.yahoo.com:20/m\nexample.org:10/h\n");
    if (throttle_load("gmail.com:100/s", map_path, &t, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(throttle_rule(t, "gmail.com", &iv, rule, sizeof(rule)), 1);
    assert_string_equal(rule, "gmail.com:100/s"); /* the inline rule comes first */
    assert_true(iv > 9.99 && iv < 10.01);
    assert_int_equal(throttle_rule(t, "mx.yahoo.com", &iv, rule, sizeof(rule)), 1);
    assert_string_equal(rule, ".yahoo.com:20/m");
    assert_int_equal(throttle_rule(t, "example.org", &iv, rule, sizeof(rule)), 1);
    assert_string_equal(rule, "example.org:10/h");
    assert_int_equal(throttle_rule(t, "example.net", &iv, rule, sizeof(rule)), 0);
    throttle_free(t);
    unlink(map_path);

    write_map("gmail.com:50/s\n# x\nyahoo.com:20/d\n");
    assert_int_equal(throttle_load("", map_path, &t, err, sizeof(err)), -1);
    char want[512];
    snprintf(want, sizeof(want), "[smtp] rate_limits_file: %s:3: \"yahoo.com:20/d\" is not domain:N/s, "
             "domain:N/m or domain:N/h (N from 1 to 1000000; .domain also matches subdomains)", map_path);
    assert_string_equal(err, want);
    assert_null(t);
    unlink(map_path);
    assert_int_equal(throttle_load("", "/nonexistent/rates", &t, err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] rate_limits_file: /nonexistent/rates: No such file or directory");
    /* neither: no limits */
    assert_int_equal(throttle_load("", "", &t, err, sizeof(err)), 0);
    assert_null(t);
}

/* env_build() (the start-up checks --check-config runs) of the defaults
 * with [section] key = value set: 0, or -1 with err. */
static int check_with(const char *section, const char *key, const char *value, char *err, size_t errlen)
{
    char text[512];
    snprintf(text, sizeof(text), "[%s]\n%s = %s\n", section, key, value);
    mp_config_t c;
    if (load_text(&c, text, err, errlen) != 0)
        fail_msg("%s", err);
    worker_env_t env;
    int r = env_build(&c, &env, err, errlen);
    env_free(&env);
    config_free(&c);
    return r;
}

/* [metrics] listen: start-up's own parse, before any worker runs. */
static void test_check_metrics_listen(void **state)
{
    static const struct { const char *listen, *want; } cases[] = {
        { "0.0.0.0:9464", NULL },
        { "127.0.0.1:19466", NULL },
        { "[::]:9464", NULL },
        { "19466", "[metrics] listen: expected host:port, got \"19466\"" },
        { "localhost:9464", "[metrics] listen: \"localhost\" is not a numeric address" },
        { "0.0.0.0:0", "[metrics] listen: bad port in \"0.0.0.0:0\"" },
        { "0.0.0.0:http", "[metrics] listen: bad port in \"0.0.0.0:http\"" },
        { "[::1:9464", "[metrics] listen: \"[::1\" is not a numeric address" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[512] = "";
        int r = check_with("metrics", "listen", cases[i].listen, err, sizeof(err));
        if (cases[i].want == NULL && r != 0)
            fail_msg("%s: %s", cases[i].listen, err);
        if (cases[i].want) {
            assert_int_equal(r, -1);
            assert_string_equal(err, cases[i].want);
        }
    }
}

/* [smtp] helo_name: a host name or an address literal (RFC 5321 4.1.3). */
static void test_check_helo_name(void **state)
{
    static const char *good[] = {
        "mail-out.example.com", "localhost", "MX1.Example.ORG", "[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]",
    };
    static const char *bad[] = {
        "'not a name'", "not a name", "mail_out.example.com", "mail.example.com.", "192.0.2.1", "[192.0.2.256]",
        "[2001:db8::1]", "-mx.example.com", "mx..example.com", "[]", "mx.example.com:25",
    };
    char err[512] = "";
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        if (check_with("smtp", "helo_name", good[i], err, sizeof(err)) != 0)
            fail_msg("%s: %s", good[i], err);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (check_with("smtp", "helo_name", bad[i], err, sizeof(err)) != -1)
            fail_msg("%s accepted", bad[i]);
        char want[512];
        snprintf(want, sizeof(want), "[smtp] helo_name: \"%s\" is neither a host name nor an address literal "
                 "like [192.0.2.1] or [IPv6:2001:db8::1] (RFC 5321 section 4.1.3)", bad[i]);
        assert_string_equal(err, want);
    }
}

/* The start-up checks include the map files and config_validate(). */
static void test_check_runs_every_check(void **state)
{
    char err[512] = "";
    assert_int_equal(check_with("smtp", "rate_limits_file", "/nonexistent/rates", err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] rate_limits_file: /nonexistent/rates: No such file or directory");
    assert_int_equal(check_with("smtp", "tls_policy_file", "/nonexistent/tls", err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] tls_policy_file: /nonexistent/tls: No such file or directory");
    assert_int_equal(check_with("amqp", "prefetch", "65536", err, sizeof(err)), -1);
    assert_string_equal(err, "[amqp] prefetch must be between 1 and 65535, or 0 (auto)");
    assert_int_equal(check_with("smtp", "site_limits", "google.com=many", err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] site_limits: site limit \"google.com=many\": expected SITE=CONNECTIONS "
                             "(1 to 1000000)");
    assert_int_equal(check_with("smtp", "rate_limits", "gmail.com:100/d", err, sizeof(err)), -1);
    assert_true(strncmp(err, "[smtp] rate_limits: \"gmail.com:100/d\" is not", 43) == 0);
    assert_int_equal(check_with("log", "level", "info", err, sizeof(err)), 0);
}

/* [metrics] tenants: label values fixed at start-up, checked there. */
static void test_check_metrics_tenants(void **state)
{
    (void)state;
    char err[512] = "";
    assert_int_equal(check_with("metrics", "tenants", "acme, beta-1 c.d_e", err, sizeof(err)), 0);
    assert_int_equal(check_with("metrics", "tenants", "", err, sizeof(err)), 0);
    assert_int_equal(check_with("metrics", "tenants", "acme,a:b", err, sizeof(err)), -1);
    assert_string_equal(err, "[metrics] tenants: \"a:b\" is not a tenant name (1-64 letters, digits, '.', '_', '-')");
    assert_int_equal(check_with("metrics", "tenants", "acme other", err, sizeof(err)), -1);
    assert_string_equal(err, "[metrics] tenants: \"other\" is reserved (the series of tenants not listed and of "
                             "messages without one)");
    assert_int_equal(check_with("metrics", "tenants", "none", err, sizeof(err)), -1);
    assert_int_equal(check_with("metrics", "tenants", "acme,b,acme", err, sizeof(err)), -1);
    assert_string_equal(err, "[metrics] tenants: \"acme\" is listed twice");
    /* 256 names, and one more (through the environment: longer than the file check_with writes) */
    char list[4096];
    size_t o = 0;
    for (int i = 0; i < 256; i++)
        o += (size_t)snprintf(list + o, sizeof(list) - o, "t%d,", i);
    setenv("MAILPUMP_METRICS_TENANTS", list, 1);
    assert_int_equal(check_with("log", "level", "info", err, sizeof(err)), 0);
    snprintf(list + o, sizeof(list) - o, "t256");
    setenv("MAILPUMP_METRICS_TENANTS", list, 1);
    assert_int_equal(check_with("log", "level", "info", err, sizeof(err)), -1);
    unsetenv("MAILPUMP_METRICS_TENANTS");
    assert_string_equal(err, "[metrics] tenants: more than 256 names");
    /* campaigns: their own alphabet */
    assert_int_equal(check_with("metrics", "campaigns", "spring-2026 news:weekly a/b+c=d", err, sizeof(err)), 0);
    assert_int_equal(check_with("metrics", "campaigns", "ok bad;name", err, sizeof(err)), -1);
    assert_string_equal(err, "[metrics] campaigns: \"bad;name\" is not a campaign name (1-128 letters, digits, "
                             "'.', '_', '-', ':', '/', '@', '+', '=')");
    assert_int_equal(check_with("metrics", "campaigns", "none", err, sizeof(err)), -1);
    assert_string_equal(err, "[metrics] campaigns: \"none\" is reserved (the series of campaigns not listed and "
                             "of messages without one)");
}

static void test_missing_file(void **state)
{
    mp_config_t c;
    char err[256];
    config_defaults(&c);
    assert_int_equal(config_load(&c, "/nonexistent/mailpumpd.ini", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "/nonexistent/mailpumpd.ini"));
    config_free(&c);
}

static void test_dump_masks_secrets(void **state)
{
    write_file("[amqp]\npassword = hunter2\n");
    mp_config_t c;
    char err[256];
    config_defaults(&c);
    assert_int_equal(config_load(&c, path, err, sizeof(err)), 0);
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    config_dump(&c, f);
    fclose(f);
    assert_null(strstr(out, "hunter2"));
    assert_non_null(strstr(out, "password = ********"));
    assert_non_null(strstr(out, "[amqp]\nhost = 127.0.0.1\n"));
    /* enumerated keys by name, timeouts by their keys */
    assert_non_null(strstr(out, "\ntls = opportunistic\n"));
    assert_non_null(strstr(out, "\ntls = imaps\n"));
    assert_non_null(strstr(out, "[log]\nlevel = info\nformat = logfmt\n"));
    assert_non_null(strstr(out, "\ntimeout_data_block_ms = 0\n"));
    free(out);
    config_free(&c);
}

/* The reference lists every key of the dump under its section, with its
 * environment variable and a description. */
static void test_reference(void **state)
{
    mp_config_t c;
    config_defaults(&c);
    char *dump = NULL, *ref = NULL;
    size_t dlen = 0, rlen = 0;
    FILE *f = open_memstream(&dump, &dlen);
    config_dump(&c, f);
    fclose(f);
    f = open_memstream(&ref, &rlen);
    config_print_reference(f);
    fclose(f);
    char section[32] = "", *save = NULL;
    const char *sec_at = ref;
    int n = 0;
    for (char *line = strtok_r(dump, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char key[64], want[256];
        if (sscanf(line, "[%31[a-z]]", section) == 1) {
            snprintf(want, sizeof(want), "\n## [%s]\n", section);
            sec_at = strstr(ref, want);
            if (sec_at == NULL)
                fail_msg("no section %s in the reference", want);
            continue;
        }
        if (sscanf(line, "%63[a-z0-9_] =", key) != 1)
            continue;
        char env[128];
        snprintf(env, sizeof(env), "MAILPUMP_%s_%s", section, key);
        for (char *p = env; *p; p++)
            *p = (char)toupper((unsigned char)*p);
        snprintf(want, sizeof(want), "\n| `%s` | ", key);
        const char *row = strstr(sec_at, want);
        const char *next = strstr(sec_at + 1, "\n## [");
        if (row == NULL || (next && row > next))
            fail_msg("[%s] %s: no row in its section", section, key);
        const char *end = strchr(row + 1, '\n');
        snprintf(want, sizeof(want), " | `%s` | ", env);
        const char *e = strstr(row, want);
        if (e == NULL || e > end)
            fail_msg("[%s] %s: no %s", section, key, env);
        if (end - (e + strlen(want)) < 8 + 2) /* " |" after a description of some length */
            fail_msg("[%s] %s: no description", section, key);
        n++;
    }
    assert_true(n > 90);
    assert_non_null(strstr(ref, "| `tls` | one of `none`, `opportunistic`, `required`, `verify` | `opportunistic` |"));
    assert_non_null(strstr(ref, "| `level` | one of `error`, `warn`, `info`, `debug` | `info` |"));
    assert_non_null(strstr(ref, "| `rate_limit_max_wait` | duration | `10s` |"));
    assert_non_null(strstr(ref, "| `password` | secret string | `guest` |"));
    assert_non_null(strstr(ref, "| `helo_name` | string | (empty) |"));
    assert_non_null(strstr(ref, "rsa-sha256\\|ed25519-sha256")); /* '|' escaped in a cell */
    free(dump);
    free(ref);
    config_free(&c);
}

/* The man page mailpumpd.ini(5) lists every key of the dump as a .TP/.B
 * entry under its .SS [section], with its type, default and environment
 * variable, and escapes roff's special characters. */
static void test_reference_man(void **state)
{
    mp_config_t c;
    config_defaults(&c);
    char *dump = NULL, *man = NULL;
    size_t dlen = 0, mlen = 0;
    FILE *f = open_memstream(&dump, &dlen);
    config_dump(&c, f);
    fclose(f);
    f = open_memstream(&man, &mlen);
    config_print_reference_man(f, "9.8.7");
    fclose(f);
    assert_non_null(strstr(man, "\n.TH MAILPUMPD.INI 5 \"\" \"mailpump 9.8.7\" \"File Formats\"\n"));
    char section[32] = "", *save = NULL;
    const char *sec_at = man;
    int n = 0;
    for (char *line = strtok_r(dump, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char key[64], want[256];
        if (sscanf(line, "[%31[a-z]]", section) == 1) {
            snprintf(want, sizeof(want), "\n.SS [%s]\n", section);
            sec_at = strstr(man, want);
            if (sec_at == NULL)
                fail_msg("no %s in the man page", want);
            continue;
        }
        if (sscanf(line, "%63[a-z0-9_] =", key) != 1)
            continue;
        char env[128];
        snprintf(env, sizeof(env), "MAILPUMP_%s_%s", section, key);
        for (char *p = env; *p; p++)
            *p = (char)toupper((unsigned char)*p);
        snprintf(want, sizeof(want), "\n.TP\n.B %s\n", key);
        const char *entry = strstr(sec_at, want);
        const char *next = strstr(sec_at + 1, "\n.SS [");
        if (entry == NULL || (next && entry > next))
            fail_msg("[%s] %s: no entry in its section", section, key);
        const char *end = strstr(entry + strlen(want), "\n.TP\n");
        snprintf(want, sizeof(want), ", environment \\fB\\%%%s\\fR.\n.br\n", env);
        const char *e = strstr(entry, want);
        if (e == NULL || (end && e > end))
            fail_msg("[%s] %s: no %s", section, key, env);
        n++;
    }
    assert_true(n > 90);
    assert_non_null(strstr(man, "\n.B tls\n\\fIone of\\fR none, opportunistic, required, verify, "
                                "default \\fBopportunistic\\fR,"));
    assert_non_null(strstr(man, "\n.B password\n\\fIsecret string\\fR, default \\fBguest\\fR,"));
    assert_non_null(strstr(man, "\n.B helo_name\n\\fIstring\\fR, default empty,"));
    assert_non_null(strstr(man, "\\fBdomain selector rsa\\-sha256|ed25519\\-sha256 key.pem\\fR"));
    assert_non_null(strstr(man, "default \\fBfrom:\\:to:\\:cc:\\:")); /* break points in a long list */
    assert_null(strstr(strstr(man, "\n.TH "), "`")); /* every code span converted */
    free(dump);
    free(man);
    config_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_defaults, teardown),
        cmocka_unit_test_teardown(test_file_then_environment, teardown),
        cmocka_unit_test_teardown(test_errors_name_the_problem, teardown),
        cmocka_unit_test_teardown(test_enum_keys, teardown),
        cmocka_unit_test_teardown(test_long_lines, teardown),
        cmocka_unit_test_teardown(test_duplicate_key, teardown),
        cmocka_unit_test_teardown(test_continuation_line, teardown),
        cmocka_unit_test_teardown(test_values_and_comments, teardown),
        cmocka_unit_test(test_tls_policy_file),
        cmocka_unit_test(test_rate_limits_file),
        cmocka_unit_test_teardown(test_check_metrics_listen, teardown),
        cmocka_unit_test_teardown(test_check_helo_name, teardown),
        cmocka_unit_test_teardown(test_check_runs_every_check, teardown),
        cmocka_unit_test(test_check_metrics_tenants),
        cmocka_unit_test_teardown(test_missing_file, teardown),
        cmocka_unit_test_teardown(test_dump_masks_secrets, teardown),
        cmocka_unit_test(test_reference),
        cmocka_unit_test(test_reference_man),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}

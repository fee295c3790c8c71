/*
 * Unit tests for core/log: quoted values (LOG_Q, LOG_MSG), the exact
 * logfmt and JSON lines for hostile values (spaces, '=', quotes,
 * backslashes, newlines, control bytes, UTF-8 and bytes that are not),
 * lines cut short, and, through python3's json module, that every JSON
 * line is one object with one member per key.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"
#include "tests/support/logcapture.h"

#define TS "2026-12-07T12:00:00.000Z"

/* Every byte a hostile server, DNS answer or publisher could send. */
#define EVIL "a b=c \"q\" x\\y\nlevel=error\r\tz\x01\x1b\x7f é中"
#define EVIL_Q "\"a b=c \\\"q\\\" x\\\\y\\nlevel=error\\r\\tz\\x01\\x1b\\x7f é中\""
#define EVIL_J "\"a b=c \\\"q\\\" x\\\\y\\nlevel=error\\r\\tz\\u0001\\u001b\\u007f é中\""

static void test_quote(void **state)
{
    (void)state;
    assert_string_equal(LOG_Q("mx1.example.com"), "\"mx1.example.com\"");
    assert_string_equal(LOG_Q(""), "\"\"");
    assert_string_equal(LOG_Q(NULL), "-");
    assert_string_equal(LOG_Q(EVIL), EVIL_Q);
    /* too long: cut inside the quotes, which still close */
    char big[1000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    const char *q = LOG_Q(big);
    size_t n = strlen(q);
    assert_true(n < LOG_QUOTE_MAX);
    assert_int_equal(q[0], '"');
    assert_string_equal(q + n - 4, "...\"");
    assert_string_equal(LOG_MSG("m-1", "t 1"), "msg=\"m-1\" trace=\"t 1\"");
    assert_string_equal(LOG_MSG("m-1", NULL), "msg=\"m-1\"");
    assert_string_equal(LOG_MSG(NULL, NULL), "msg=-");
}

static void test_logfmt_exact(void **state)
{
    (void)state;
    char line[8192], pairs[2048];
    snprintf(pairs, sizeof(pairs), "%s session=00000000000000ab mx=%s code=%d reply=%s", LOG_MSG("m 1", EVIL),
             LOG_Q("evil host=x"), 250, LOG_Q(EVIL));
    size_t n = log_render(line, sizeof(line), LOG_FMT_LOGFMT, LOG_INFO, TS, "smtp", "session", pairs);
    const char *want = "ts=" TS " level=info mod=smtp event=session msg=\"m 1\" trace=" EVIL_Q
                       " session=00000000000000ab mx=\"evil host=x\" code=250 reply=" EVIL_Q "\n";
    assert_string_equal(line, want);
    assert_int_equal(n, strlen(want));
    /* one line: no byte below 0x20 but the final newline */
    for (size_t i = 0; i + 1 < n; i++)
        assert_true((unsigned char)line[i] >= 0x20 && line[i] != 0x7f);
    /* no pairs */
    log_render(line, sizeof(line), LOG_FMT_LOGFMT, LOG_WARN, TS, "main", "exit", "");
    assert_string_equal(line, "ts=" TS " level=warn mod=main event=exit\n");
}

static void test_json_exact(void **state)
{
    (void)state;
    char line[8192], pairs[2048];
    snprintf(pairs, sizeof(pairs), "%s session=00000000000000ab mx=%s code=%d neg=-5 big=1234567890123456 "
             "zero=0 lead=007 none=- reply=%s",
             LOG_MSG("m 1", EVIL), LOG_Q("evil host=x"), 250, LOG_Q(EVIL));
    log_render(line, sizeof(line), LOG_FMT_JSON, LOG_ERROR, TS, "smtp", "session", pairs);
    assert_string_equal(line, "{\"ts\":\"" TS "\",\"level\":\"error\",\"mod\":\"smtp\",\"event\":\"session\","
                              "\"msg\":\"m 1\",\"trace\":" EVIL_J ",\"session\":\"00000000000000ab\","
                              "\"mx\":\"evil host=x\",\"code\":250,\"neg\":-5,\"big\":\"1234567890123456\","
                              "\"zero\":0,\"lead\":\"007\",\"none\":\"-\",\"reply\":" EVIL_J "}\n");
}

/* What no call site should write still gives one valid object. */
static void test_json_odd_input(void **state)
{
    (void)state;
    char line[8192];
    /* a repeated key (also of a fixed one), a word without '=', raw
     * bytes that are not UTF-8 in a bare value, an escape we never write */
    log_render(line, sizeof(line), LOG_FMT_JSON, LOG_INFO, TS, "m", "e",
               "a=1 a=2 level=x word k=\xff\xc3(z q=\"\\u\\x4\"");
    assert_string_equal(line, "{\"ts\":\"" TS "\",\"level\":\"info\",\"mod\":\"m\",\"event\":\"e\","
                              "\"a\":1,\"a_2\":2,\"level_2\":\"x\",\"word\":true,"
                              "\"k\":\"\\ufffd\\ufffd(z\",\"q\":\"ux4\"}\n");
}

static void test_truncated(void **state)
{
    (void)state;
    char line[300], pairs[2048];
    char big[200];
    memset(big, 'y', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    snprintf(pairs, sizeof(pairs), "a=1 b=%s c=%s", LOG_Q(big), LOG_Q(big));
    log_render(line, sizeof(line), LOG_FMT_LOGFMT, LOG_INFO, TS, "m", "e", pairs);
    char want[400];
    snprintf(want, sizeof(want), "ts=" TS " level=info mod=m event=e a=1 b=\"%s\" truncated=1\n", big);
    assert_string_equal(line, want);
    char jline[320]; /* the JSON head is longer */
    log_render(jline, sizeof(jline), LOG_FMT_JSON, LOG_INFO, TS, "m", "e", pairs);
    snprintf(want, sizeof(want), "{\"ts\":\"" TS "\",\"level\":\"info\",\"mod\":\"m\",\"event\":\"e\","
             "\"a\":1,\"b\":\"%s\",\"truncated\":1}\n", big);
    assert_string_equal(jline, want);
    /* a quoted value cut before its closing quote */
    log_render(line, sizeof(line), LOG_FMT_JSON, LOG_INFO, TS, "m", "e", "a=1 b=\"open x=2");
    assert_string_equal(line, "{\"ts\":\"" TS "\",\"level\":\"info\",\"mod\":\"m\",\"event\":\"e\","
                              "\"a\":1,\"truncated\":1}\n");
}

/* The message fields with the sender's: tenant, campaign and pool after
 * msg and trace, only when set, quoted, and keys of their own in JSON. */
static void test_msgctx(void **state)
{
    (void)state;
    log_msgctx_t c = { .id = "m-1", .trace = "t-1", .tenant = "acme", .campaign = "spring:2026/news@x+y=z",
                       .pool = "bulk" };
    assert_string_equal(LOG_MSGCTX(&c),
                        "msg=\"m-1\" trace=\"t-1\" tenant=\"acme\" campaign=\"spring:2026/news@x+y=z\" pool=\"bulk\"");
    c.trace = NULL;
    c.campaign = NULL;
    assert_string_equal(LOG_MSGCTX(&c), "msg=\"m-1\" tenant=\"acme\" pool=\"bulk\"");
    /* only id and trace: what LOG_MSG writes */
    log_msgctx_t plain = { .id = "m-1", .trace = "t 1" };
    assert_string_equal(LOG_MSGCTX(&plain), LOG_MSG("m-1", "t 1"));
    plain.trace = NULL;
    assert_string_equal(LOG_MSGCTX(&plain), "msg=\"m-1\"");
    assert_string_equal(LOG_MSGCTX(NULL), "msg=-");
    assert_string_equal(LOG_MSGCTX(&(log_msgctx_t){ .tenant = "x" }), "msg=- tenant=\"x\"");
    /* values the parser would refuse are still quoted (no field, no line) */
    log_msgctx_t evil = { .id = "m", .tenant = EVIL, .campaign = EVIL, .pool = EVIL };
    assert_string_equal(LOG_MSGCTX(&evil), "msg=\"m\" tenant=" EVIL_Q " campaign=" EVIL_Q " pool=" EVIL_Q);
    /* the longest of everything fits whole */
    char big[1000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    log_msgctx_t full = { big, big, big, big, big };
    const char *r = LOG_MSGCTX(&full);
    assert_non_null(strstr(r, " pool=\"xxx"));
    assert_string_equal(r + strlen(r) - 4, "...\"");
    /* a buffer too small leaves whole pairs out */
    char small[40];
    assert_string_equal(log_msgctx(&c, small, sizeof(small)), "msg=\"m-1\" tenant=\"acme\" pool=\"bulk\"");
    char tiny[30];
    assert_string_equal(log_msgctx(&c, tiny, sizeof(tiny)), "msg=\"m-1\" tenant=\"acme\"");

    char line[8192], pairs[2048];
    c = (log_msgctx_t){ .id = "m-1", .trace = "t-1", .tenant = "acme", .campaign = "c:1", .pool = "bulk" };
    snprintf(pairs, sizeof(pairs), "%s rcpt=%s code=%d", LOG_MSGCTX(&c), LOG_Q("b@test.example"), 250);
    log_render(line, sizeof(line), LOG_FMT_LOGFMT, LOG_INFO, TS, "job", "delivered", pairs);
    assert_string_equal(line, "ts=" TS " level=info mod=job event=delivered msg=\"m-1\" trace=\"t-1\" "
                              "tenant=\"acme\" campaign=\"c:1\" pool=\"bulk\" rcpt=\"b@test.example\" code=250\n");
    log_render(line, sizeof(line), LOG_FMT_JSON, LOG_INFO, TS, "job", "delivered", pairs);
    assert_string_equal(line, "{\"ts\":\"" TS "\",\"level\":\"info\",\"mod\":\"job\",\"event\":\"delivered\","
                              "\"msg\":\"m-1\",\"trace\":\"t-1\",\"tenant\":\"acme\",\"campaign\":\"c:1\","
                              "\"pool\":\"bulk\",\"rcpt\":\"b@test.example\",\"code\":250}\n");
    /* a numeric tenant stays a string in JSON: it is quoted */
    c.tenant = "42";
    snprintf(pairs, sizeof(pairs), "%s", LOG_MSGCTX(&c));
    log_render(line, sizeof(line), LOG_FMT_JSON, LOG_INFO, TS, "job", "e", pairs);
    assert_non_null(strstr(line, ",\"tenant\":\"42\","));
}

/* log_msg itself on stderr, both formats; the ts varies, the rest not. */
static char *capture(enum log_format f, const char *v)
{
    static char got[8192];
    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_DEBUG, f), 0);
    log_warn("dns", "mx_reply", "%s domain=%s hosts=%d", LOG_MSG("id-1", v), LOG_Q(v), 2);
    /* the pairs buffer overflows: the cut pair is dropped */
    char huge[6000];
    memset(huge, 'h', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    log_debug("dns", "big", "a=1 b=%s", huge);
    return logcapture_end(&lc, got, sizeof(got), LOG_INFO);
}

static void test_log_msg(void **state)
{
    (void)state;
    char *got = capture(LOG_FMT_LOGFMT, EVIL);
    char *nl = strchr(got, '\n');
    assert_non_null(nl);
    *nl = '\0';
    assert_non_null(strstr(got, "ts="));
    assert_string_equal(strstr(got, " level="),
                        " level=warn mod=dns event=mx_reply msg=\"id-1\" trace=" EVIL_Q " domain=" EVIL_Q
                        " hosts=2");
    assert_string_equal(strstr(nl + 1, " level="), " level=debug mod=dns event=big a=1 truncated=1\n");
    got = capture(LOG_FMT_JSON, EVIL);
    nl = strchr(got, '\n');
    *nl = '\0';
    assert_string_equal(strstr(got, ",\"level\""),
                        ",\"level\":\"warn\",\"mod\":\"dns\",\"event\":\"mx_reply\",\"msg\":\"id-1\","
                        "\"trace\":" EVIL_J ",\"domain\":" EVIL_J ",\"hosts\":2}");
    assert_string_equal(strstr(nl + 1, ",\"level\""),
                        ",\"level\":\"debug\",\"mod\":\"dns\",\"event\":\"big\",\"a\":1,\"truncated\":1}\n");
}

/* Every JSON line, read by python3's json module: one object, one member
 * per key (object_pairs_hook sees duplicates), keys as expected. */
static void test_json_parses(void **state)
{
    (void)state;
    if (system("python3 -c '' >/dev/null 2>&1") != 0) {
        skip();
        return;
    }
    char path[] = "/tmp/test_log_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    const char *vals[] = { EVIL, "", "\xff\xfe bad utf-8 \xc3", "=", "\"", "\\", "a=b c=d", "é中\xf0\x9f\x98\x80" };
    char line[8192], pairs[4096];
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        snprintf(pairs, sizeof(pairs), "%s mx=%s code=%zu text=%s", LOG_MSG(vals[i], vals[i]), LOG_Q(vals[i]), i,
                 LOG_Q(vals[i]));
        log_render(line, sizeof(line), LOG_FMT_JSON, LOG_INFO, TS, "smtp", "session", pairs);
        fputs(line, f);
    }
    fclose(f);
    char cmd[1024];
    snprintf(cmd, sizeof(cmd),
             "python3 -c 'import json,sys\n"
             "def once(ps):\n"
             "    ks=[k for k,_ in ps]\n"
             "    assert len(ks)==len(set(ks)), ks\n"
             "    return dict(ps)\n"
             "n=0\n"
             "for l in open(sys.argv[1],\"rb\"):\n"
             "    o=json.loads(l.decode(\"utf-8\"), object_pairs_hook=once)\n"
             "    assert list(o)==[\"ts\",\"level\",\"mod\",\"event\",\"msg\",\"trace\",\"mx\",\"code\",\"text\"], o\n"
             "    assert o[\"code\"]==n and o[\"msg\"]==o[\"mx\"]==o[\"text\"]==o[\"trace\"], o\n"
             "    n+=1\n"
             "assert n==8\n"
             "assert json.loads(open(sys.argv[1]).readline())[\"mx\"]==%s\n"
             "' %s",
             "\"a b=c \\\"q\\\" x\\\\y\\nlevel=error\\r\\tz\\x01\\x1b\\x7f \\u00e9\\u4e2d\"", path);
    int rc = system(cmd);
    unlink(path);
    assert_int_equal(rc, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quote),
        cmocka_unit_test(test_logfmt_exact),
        cmocka_unit_test(test_json_exact),
        cmocka_unit_test(test_json_odd_input),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_log_msg),
        cmocka_unit_test(test_msgctx),
        cmocka_unit_test(test_json_parses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

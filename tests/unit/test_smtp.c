/*
 * tests/unit/test_smtp.c - the SMTP client (deliverer/session.c,
 * deliverer/deliver.c, deliverer/outcome.c) against scripted fake SMTP
 * servers (tests/support/fakesmtp.h) running in the same loop (curl
 * ftpserver.pl / test913 style): each server listens on 127.0.0.1, port 0,
 * answers per a script, and records every byte it receives (decrypted
 * after STARTTLS), so the tests assert the exact transcript.
 *
 * The STARTTLS cases generate a throwaway CA, a second untrusted CA and
 * server certificates at run time with the openssl CLI in a temp dir.
 * Every test ends with the loop empty: no fd, no timer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/config.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/stream.h"
#include "core/tls.h"
#include "core/util.h"
#include "deliverer/deliver.h"
#include "deliverer/routes.h"
#include "deliverer/outcome.h"
#include "deliverer/session.h"
#include "metrics/metrics.h"
#include "mime/build.h"
#include "tests/support/fakesmtp.h"
#include "tests/support/logcapture.h"

/* ------------------------------------------------------------------ */
/* harness                                                             */

#define HELO_NAME "mailpump.test"
#define FROM      "a@x"
#define MSG_SIZE  38
/* already dot-stuffed, as mime_dotstuff() produces it */
#define PAYLOAD "Subject: test\r\n\r\nhello\r\n..leading dot\r\n.\r\n"

#define EHLO_TLS "250-fake.test\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250 8BITMIME\r\n"

typedef struct rcpt_copy {
    char      rcpt[64];
    outcome_t outcome;
    char      reason[32];
    int       code;
    char      enh[16];
    char      text[512];
    int       maybe_sent;
} rcpt_copy_t;

typedef struct capture {
    int         fired;
    size_t      nrcpts;
    rcpt_copy_t r[16];
    char        mx_host[256];
    char        mx_addr[64];
    char        tls_version[32];
    int         tls;
    unsigned    attempts;
    unsigned    connections, reused, transactions, tls_full, tls_resumed;
    smtp_features_t features;
    char        source_name[65];
    char        source_addr[64];
    int         tls_policy;
} capture_t;

typedef struct tls_fixture {
    char     dir[64];
    char     ca[128];
    SSL_CTX *verify_ctx;   /* trusts the good CA */
    SSL_CTX *noverify_ctx;
    SSL_CTX *server_ctx;   /* mx.test.local signed by the good CA */
    SSL_CTX *evil_ctx;     /* mx.test.local signed by an untrusted CA */
} tls_fixture_t;

static tls_fixture_t fx;

typedef struct tctx {
    loop_t         *loop;
    smtp_timeouts_t to;
} tctx_t;

static void on_result(void *arg, const deliver_result_t *res)
{
    capture_t *c = arg;
    assert_int_equal(c->fired, 0); /* exactly once */
    c->fired++;
    c->nrcpts = res->nrcpts;
    for (size_t i = 0; i < res->nrcpts && i < 16; i++) {
        const deliver_rcpt_result_t *r = &res->rcpts[i];
        snprintf(c->r[i].rcpt, sizeof(c->r[i].rcpt), "%s", r->rcpt);
        c->r[i].outcome = r->outcome;
        snprintf(c->r[i].reason, sizeof(c->r[i].reason), "%s", outcome_reason_name(r->reason));
        c->r[i].code = r->code;
        memcpy(c->r[i].enh, r->enh, sizeof(c->r[i].enh));
        memcpy(c->r[i].text, r->text, sizeof(c->r[i].text));
        c->r[i].maybe_sent = r->maybe_sent;
    }
    snprintf(c->mx_host, sizeof(c->mx_host), "%s", res->mx_host);
    snprintf(c->mx_addr, sizeof(c->mx_addr), "%s", res->mx_addr);
    c->tls = res->tls_version != NULL;
    snprintf(c->tls_version, sizeof(c->tls_version), "%s", res->tls_version ? res->tls_version : "");
    c->attempts = res->attempts_made;
    c->connections = res->connections;
    c->reused = res->reused;
    c->transactions = res->transactions;
    c->tls_full = res->tls_full;
    c->tls_resumed = res->tls_resumed;
    c->features = res->features;
    snprintf(c->source_name, sizeof(c->source_name), "%s", res->source_name);
    snprintf(c->source_addr, sizeof(c->source_addr), "%s", res->source_addr);
    c->tls_policy = (int)res->tls_policy;
}

static deliver_candidate_t cand(const char *host, unsigned short port)
{
    deliver_candidate_t c;
    memset(&c, 0, sizeof(c));
    snprintf(c.host, sizeof(c.host), "%s", host);
    struct sockaddr_in *sin = (struct sockaddr_in *)&c.addr;
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c.addrlen = sizeof(*sin);
    return c;
}

static void run_until(loop_t *loop, const int *flag)
{
    for (int i = 0; i < 100000 && !*flag; i++)
        assert_true(loop_run_once(loop, 50) >= 0);
    assert_true(*flag);
}

/* Free the servers, let the loop settle, and insist it is empty. */
static void drain_and_check(loop_t *loop, fake_server_t **srv, size_t n)
{
    for (size_t i = 0; i < n; i++)
        fake_server_free(srv[i]);
    for (int i = 0; i < 100 && (loop_fd_count(loop) || loop_timer_count(loop)); i++)
        loop_run_once(loop, 10);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
}

static deliver_config_t config(tctx_t *t, smtp_tls_policy_t tls)
{
    deliver_config_t cfg = {
        .port = 25,
        .helo_name = HELO_NAME,
        .tls = tls,
        .tls_verify_ctx = fx.verify_ctx,
        .tls_noverify_ctx = fx.noverify_ctx,
        .max_mx = 5,
        .timeouts = &t->to,
    };
    return cfg;
}

static void deliver_req_and_wait(tctx_t *t, const deliver_config_t *cfg, const deliver_request_t *req,
                                 capture_t *cap)
{
    memset(cap, 0, sizeof(*cap));
    deliver_t *d = deliver_start(t->loop, cfg, req, on_result, cap);
    assert_non_null(d);
    assert_int_equal(cap->fired, 0);
    run_until(t->loop, &cap->fired);
}

static void deliver_and_wait(tctx_t *t, const deliver_config_t *cfg, const char *const *rcpts, size_t nrcpts,
                             const deliver_candidate_t *cands, size_t ncands, capture_t *cap)
{
    deliver_request_t req = {
        .mail_from = FROM,
        .rcpts = rcpts,
        .nrcpts = nrcpts,
        .data = PAYLOAD,
        .len = strlen(PAYLOAD),
        .message_size = MSG_SIZE,
        .candidates = cands,
        .ncandidates = ncands,
        .log_id = "test-msg-1",
    };
    memset(cap, 0, sizeof(*cap));
    deliver_t *d = deliver_start(t->loop, cfg, &req, on_result, cap);
    assert_non_null(d);
    assert_int_equal(cap->fired, 0); /* never synchronously */
    run_until(t->loop, &cap->fired);
}

static void assert_rcpt(const capture_t *c, size_t i, const char *rcpt, outcome_t o, const char *reason, int code,
                        const char *enh)
{
    assert_true(i < c->nrcpts);
    assert_string_equal(c->r[i].rcpt, rcpt);
    assert_string_equal(outcome_name(c->r[i].outcome), outcome_name(o));
    assert_string_equal(c->r[i].reason, reason);
    assert_int_equal(c->r[i].code, code);
    assert_string_equal(c->r[i].enh, enh);
}

static int setup(void **state)
{
    tctx_t *t = calloc(1, sizeof(*t));
    t->loop = loop_new();
    if (t->loop == NULL)
        return -1;
    /* generous for valgrind; the timeout tests shorten what they need */
    smtp_timeouts_default(&t->to, 100);
    unsigned *p = (unsigned *)&t->to;
    for (size_t i = 0; i < offsetof(smtp_timeouts_t, reply_lines_burst) / sizeof(unsigned); i++)
        p[i] = 5000;
    *state = t;
    return 0;
}

static int teardown(void **state)
{
    tctx_t *t = *state;
    loop_free(t->loop);
    free(t);
    return 0;
}

/* ------------------------------------------------------------------ */
/* scripts                                                             */

#define TRANSCRIPT_OK(rcpts)                                                                    \
    "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n" rcpts "DATA\r\n" PAYLOAD "QUIT\r\n"

/* ------------------------------------------------------------------ */
/* tests                                                               */

static void test_all_delivered(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);

    assert_string_equal(fake_server_transcript(fs), TRANSCRIPT_OK("RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\n"));
    assert_int_equal(cap.nrcpts, 2);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(cap.r[0].text, "Ok: queued as ABC123");
    assert_string_equal(cap.mx_host, "mx1.fake.test");
    assert_string_equal(cap.mx_addr, "127.0.0.1");
    assert_int_equal(cap.tls, 0);
    assert_int_equal(cap.attempts, 1);
    drain_and_check(t->loop, &fs, 1);
}

static void test_per_recipient_results(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<b@y>", "550 5.1.1 <b@y>: Recipient address rejected: User unknown\r\n", ACT_REPLY },
        { "RCPT TO:<d@y>", "452 4.2.2 <d@y>: mailbox full\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = {
        .greeting = "220-fake.test ESMTP\r\n220 multi-line greeting\r\n",
        .rules = rules,
        .eod_reply = "250-2.0.0 Ok:\r\n250 2.0.0 queued as XYZ\r\n",
    };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y", "d@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 3, c, 1, &cap);

    assert_string_equal(fake_server_transcript(fs),
                        TRANSCRIPT_OK("RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nRCPT TO:<d@y>\r\n"));
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_string_equal(cap.r[0].text, "<b@y>: Recipient address rejected: User unknown");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(cap.r[1].text, "Ok: queued as XYZ");
    assert_rcpt(&cap, 2, "d@y", OUTCOME_TRANSIENT, "mailbox_full", 452, "4.2.2");
    assert_string_equal(cap.r[2].text, "<d@y>: mailbox full");
    drain_and_check(t->loop, &fs, 1);
}

static void test_all_rcpt_rejected(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<b@y>", "550 5.1.1 no such user\r\n", ACT_REPLY },
        { "RCPT TO:<c@y>", "554 5.7.1 <c@y>: Relay access denied\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "RSET", "250 2.0.0 Ok\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);

    /* pipelined: DATA went out with the RCPTs and got 554; the accepted
     * MAIL leaves a transaction open, so RSET before QUIT */
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                        "RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\nRSET\r\nQUIT\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_PERMANENT, "policy", 554, "5.7.1");
    assert_int_equal(cap.attempts, 1);
    drain_and_check(t->loop, &fs, 1);
}

/* $MP_TEST_LOG names the level (default warn). */
static enum log_level test_log_level(void)
{
    const char *lvl = getenv("MP_TEST_LOG");
    int l = lvl ? log_level_from_name(lvl) : -1;
    return l < 0 ? LOG_WARN : (enum log_level)l;
}

/* The session line with hostile outside values: an MX name, a message
 * id, a trace id and a server text with spaces, '=', quotes and
 * backslashes; in JSON every one of them is one member, nothing forged. */
static char *capture_session_log(tctx_t *t, enum log_format f)
{
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "RSET", "250 2.0.0 Ok\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules,
                                 .eod_reply = "550 5.7.1 \"x\" code=250 result=ok \\ bye\r\n" };
    static char got[16384];
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("evil mx=1 \"q\"", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    deliver_request_t req = {
        .mail_from = FROM, .rcpts = rcpts, .nrcpts = 1, .data = PAYLOAD, .len = strlen(PAYLOAD),
        .message_size = MSG_SIZE, .candidates = c, .ncandidates = 1,
        .log_id = "m 1=x", .trace_id = "t \"2\"",
    };
    capture_t cap;
    logcapture_t lc;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, f), 0);
    deliver_req_and_wait(t, &cfg, &req, &cap);
    drain_and_check(t->loop, &fs, 1);
    logcapture_end(&lc, got, sizeof(got), test_log_level());
    assert_int_equal(cap.r[0].code, 550);
    char *line = strstr(got, f == LOG_FMT_JSON ? "\"event\":\"session\"" : "event=session");
    assert_non_null(line);
    *strchr(line, '\n') = '\0';
    return line;
}

static void test_log_hostile_values(void **state)
{
    tctx_t *t = *state;
    const char *l = capture_session_log(t, LOG_FMT_LOGFMT);
    assert_non_null(strstr(l, " msg=\"m 1=x\" trace=\"t \\\"2\\\"\" session="));
    assert_non_null(strstr(l, " mx=\"evil mx=1 \\\"q\\\"\" addr=127.0.0.1 "));
    assert_non_null(strstr(l, " code=550 enh=5.7.1 reply=\"\\\"x\\\" code=250 result=ok \\\\ bye\" error="));
    l = capture_session_log(t, LOG_FMT_JSON);
    assert_non_null(strstr(l, ",\"msg\":\"m 1=x\",\"trace\":\"t \\\"2\\\"\",\"session\":"));
    assert_non_null(strstr(l, ",\"mx\":\"evil mx=1 \\\"q\\\"\",\"addr\":\"127.0.0.1\","));
    assert_non_null(strstr(l, ",\"code\":550,\"enh\":\"5.7.1\",\"reply\":\"\\\"x\\\" code=250 result=ok \\\\ bye\","));
    /* one member each: the server's text added none */
    const char *r = strstr(l, "\"result\":");
    assert_non_null(r);
    assert_null(strstr(r + 1, "\"result\":"));
    assert_null(strstr(l, "\"code_2\"") );
}

static void test_mail_from_rejected(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "553 5.7.1 <a@x>: Sender address rejected: not owned by user\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *s1 = fake_server_new(t->loop, &sc);
    fake_server_t *s2 = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 2, &cap);

    /* a completed dialogue: the server's answer stands, no failover */
    /* pipelined: the RCPT and DATA replies (503) are read and ignored; no
     * transaction was opened, so no RSET */
    assert_string_equal(fake_server_transcript(s1),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                        "RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\nQUIT\r\n");
    assert_int_equal(s2->naccepted, 0);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "policy", 553, "5.7.1");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_PERMANENT, "policy", 553, "5.7.1");
    assert_int_equal(cap.attempts, 1);
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

static void test_greeting_421_next_candidate(void **state)
{
    tctx_t *t = *state;
    static const script_t busy = {
        .greeting = "421 4.3.2 fake.test Service not available, closing channel\r\n",
        .greeting_act = ACT_CLOSE,
        .rules = fakesmtp_rules_ok,
    };
    fake_server_t *s1 = fake_server_new(t->loop, &busy);
    fake_server_t *s2 = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 2, &cap);

    assert_int_equal(s1->naccepted, 1);
    assert_string_equal(fake_server_transcript(s1), ""); /* no QUIT after 421 */
    assert_string_equal(fake_server_transcript(s2), TRANSCRIPT_OK("RCPT TO:<b@y>\r\n"));
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(cap.mx_host, "mx2.fake.test");
    assert_int_equal(cap.attempts, 2);
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

static void test_greeting_554_everywhere(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t refuse = { .greeting = "554 5.7.1 no service for you\r\n", .rules = rules };
    fake_server_t *s1 = fake_server_new(t->loop, &refuse);
    fake_server_t *s2 = fake_server_new(t->loop, &refuse);
    deliver_candidate_t c[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 2, &cap);

    assert_string_equal(fake_server_transcript(s1), "QUIT\r\n");
    assert_string_equal(fake_server_transcript(s2), "QUIT\r\n");
    /* refused at the session level by every MX: try again later */
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "policy", 554, "5.7.1");
    assert_int_equal(cap.attempts, 2);
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

static void test_connect_refused_next_candidate(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    unsigned short dead = fakesmtp_closed_port();
    deliver_candidate_t c[] = { cand("dead.fake.test", dead), cand("mx2.fake.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 2, &cap);
    assert_string_equal(fake_server_transcript(fs), TRANSCRIPT_OK("RCPT TO:<b@y>\r\n"));
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(cap.mx_host, "mx2.fake.test");
    assert_int_equal(cap.attempts, 2);

    /* the refused one alone: transient, network */
    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "network", 0, "");
    assert_non_null(strstr(cap.r[0].text, "refused"));
    assert_string_equal(cap.mx_host, "dead.fake.test");
    assert_int_equal(cap.attempts, 1);
    drain_and_check(t->loop, &fs, 1);
}

static void test_ehlo_502_helo_fallback(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", "502 5.5.2 Error: command not recognized\r\n", ACT_REPLY },
        { "HELO", "250 fake.test\r\n", ACT_REPLY },
        { "MAIL FROM:", "250 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "250 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 old.fake.test SMTP\r\n", .rules = rules, .eod_reply = "250 Ok\r\n" };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("old.fake.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_OPPORTUNISTIC);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    /* no SIZE= without EHLO; opportunistic TLS quietly stays plaintext */
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\nHELO " HELO_NAME "\r\nMAIL FROM:<" FROM ">\r\n"
                        "RCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD "QUIT\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "");
    assert_int_equal(cap.tls, 0);
    drain_and_check(t->loop, &fs, 1);
}

static void test_timeout_greeting(void **state)
{
    tctx_t *t = *state;
    static const script_t silent = { .greeting = NULL, .rules = fakesmtp_rules_ok };
    fake_server_t *fs = fake_server_new(t->loop, &silent);
    deliver_candidate_t c[] = { cand("slow.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    t->to.greeting_ms = 200;
    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs), "");
    for (size_t i = 0; i < 2; i++) {
        assert_rcpt(&cap, i, rcpts[i], OUTCOME_TRANSIENT, "timeout", 0, "");
        assert_string_equal(cap.r[i].text, "timeout while receiving the initial server greeting");
    }
    drain_and_check(t->loop, &fs, 1);
}

static void test_timeout_end_of_data_no_failover(void **state)
{
    tctx_t *t = *state;
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                 .eod_act = ACT_SILENT };
    fake_server_t *s1 = fake_server_new(t->loop, &sc);
    fake_server_t *s2 = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    t->to.data_done_ms = 300;
    deliver_and_wait(t, &cfg, rcpts, 1, c, 2, &cap);
    assert_string_equal(fake_server_transcript(s1),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                        "RCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD);
    /* the server may have the message: no second copy elsewhere */
    assert_int_equal(s2->naccepted, 0);
    assert_int_equal(cap.attempts, 1);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(cap.r[0].text,
                        "timeout while sending end of data -- message may be sent more than once");
    assert_int_equal(cap.r[0].maybe_sent, 1); /* the owner must flag a later copy */
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

static void test_close_mid_data(void **state)
{
    tctx_t *t = *state;
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                 .eod_act = ACT_CLOSE };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "network", 0, "");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_TRANSIENT, "network", 0, "");
    assert_non_null(strstr(cap.r[0].text, "end of data"));
    drain_and_check(t->loop, &fs, 1);
}

/* 421 in the middle of RCPT: the recipient already refused keeps its
 * answer, only the open one goes to the next MX. */
static void test_421_mid_rcpt_failover_keeps_answers(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<b@y>", "550 5.1.1 no such user\r\n", ACT_REPLY },
        { "RCPT TO:<c@y>", "421 4.7.0 fake.test Error: too many connections, rate limited\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *s1 = fake_server_new(t->loop, &sc);
    fake_server_t *s2 = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 2, &cap);
    assert_string_equal(fake_server_transcript(s1),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                        "RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\n");
    assert_string_equal(fake_server_transcript(s2), TRANSCRIPT_OK("RCPT TO:<c@y>\r\n"));
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.attempts, 2);

    /* and with only the first MX: the open recipient is rate limited */
    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_TRANSIENT, "rate_limited", 421, "4.7.0");

    /* and when the next MX cannot even be reached, the first one's words
     * stand: rate limited, not "network" */
    deliver_candidate_t c2[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", fakesmtp_closed_port()) };
    deliver_and_wait(t, &cfg, rcpts, 2, c2, 2, &cap);
    assert_int_equal(cap.attempts, 2);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_TRANSIENT, "rate_limited", 421, "4.7.0");
    assert_string_equal(cap.r[1].text, "fake.test Error: too many connections, rate limited");
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

static void test_size_limit_checked_before_mail(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", "250-fake.test\r\n250 SIZE 10\r\n", ACT_REPLY },
        { "QUIT", "221 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\nQUIT\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "message_too_big", 552, "5.3.4");
    drain_and_check(t->loop, &fs, 1);
}

static void test_garbage_reply_is_protocol_error(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", "250 fake.test\r\n", ACT_REPLY },
        { "MAIL FROM:", "hello there\r\n", ACT_REPLY },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "protocol", 0, "");
    assert_non_null(strstr(cap.r[0].text, "malformed reply while sending MAIL FROM"));
    drain_and_check(t->loop, &fs, 1);
}

static void test_injection_refused(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y>\r\nRCPT TO:<evil@z", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs), TRANSCRIPT_OK("RCPT TO:<c@y>\r\n"));
    assert_int_equal(cap.r[0].outcome, OUTCOME_PERMANENT);
    assert_int_equal(cap.r[0].code, 0);
    assert_rcpt(&cap, 1, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    drain_and_check(t->loop, &fs, 1);
}

static void test_no_candidates(void **state)
{
    tctx_t *t = *state;
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, NULL, 0, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "dns", 0, "");
    assert_int_equal(cap.attempts, 0);
    drain_and_check(t->loop, NULL, 0);
}

static void never_called(void *arg, const deliver_result_t *res)
{
    fail_msg("callback fired after deliver_cancel");
}

static void test_cancel(void **state)
{
    tctx_t *t = *state;
    static const script_t silent = { .greeting = NULL, .rules = fakesmtp_rules_ok };
    fake_server_t *s1 = fake_server_new(t->loop, &silent);
    fake_server_t *s2 = fake_server_new(t->loop, &silent);
    deliver_candidate_t c1[] = { cand("mx1.fake.test", s1->port) };
    deliver_candidate_t c2[] = { cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    deliver_request_t req = {
        .mail_from = FROM, .rcpts = rcpts, .nrcpts = 1, .data = PAYLOAD, .len = strlen(PAYLOAD),
        .candidates = c1, .ncandidates = 1,
    };

    /* cancelled at once */
    deliver_cancel(deliver_start(t->loop, &cfg, &req, never_called, NULL));
    /* cancelled while connected, waiting for the greeting */
    req.candidates = c2;
    deliver_t *d = deliver_start(t->loop, &cfg, &req, never_called, NULL);
    run_until(t->loop, &s2->naccepted);
    for (int i = 0; i < 5; i++)
        loop_run_once(t->loop, 10);
    deliver_cancel(d);
    deliver_cancel(NULL);
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

/* ---- STARTTLS ------------------------------------------------------ */

static const rule_t rules_tls[] = {
    { "EHLO", EHLO_TLS, ACT_REPLY },
    { "STARTTLS", "220 2.0.0 Ready to start TLS\r\n", ACT_STARTTLS },
    { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
    { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
    { "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n", ACT_REPLY },
    { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
    { NULL, NULL, 0 },
};

#define TRANSCRIPT_TLS(rcpts)                                                                  \
    "EHLO " HELO_NAME "\r\nSTARTTLS\r\nEHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n" rcpts \
    "DATA\r\n" PAYLOAD "QUIT\r\n"

static void test_starttls_verify_ok(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = rules_tls, .tls = fx.server_ctx };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx.test.local", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_VERIFY);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs), TRANSCRIPT_TLS("RCPT TO:<b@y>\r\n"));
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls, 1);
    assert_true(strncmp(cap.tls_version, "TLSv1.", 6) == 0);
    drain_and_check(t->loop, &fs, 1);
}

static void test_starttls_opportunistic_untrusted_ok(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = rules_tls, .tls = fx.evil_ctx };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("whatever.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_OPPORTUNISTIC);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs), TRANSCRIPT_TLS("RCPT TO:<b@y>\r\n"));
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls, 1);
    drain_and_check(t->loop, &fs, 1);
}

/* STARTTLS offered and accepted, but the handshake fails (a server with
 * no certificate). Opportunistic: the same address once more in
 * plaintext, delivered there, counted; required: tls, no plaintext. */
static void test_starttls_handshake_failure_falls_back_to_plaintext(void **state)
{
    tctx_t *t = *state;
    SSL_CTX *broken = SSL_CTX_new(TLS_server_method()); /* no certificate: every handshake fails */
    assert_non_null(broken);
    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = rules_tls, .tls = broken };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx.test.local", fs->port) };
    const char *rcpts[] = { "b@y" };
    capture_t cap;
    uint64_t before = metrics_counter(MET_SMTP_TLS_FALLBACKS);

    deliver_config_t cfg = config(t, SMTP_TLS_OPPORTUNISTIC);
    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls, 0);
    assert_int_equal(cap.connections, 2);
    assert_int_equal(metrics_counter(MET_SMTP_TLS_FALLBACKS) - before, 1);
    assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\nSTARTTLS\r\n"
                                                    "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                                                    "RCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD "QUIT\r\n");

    buf_reset(&fs->transcript);
    cfg = config(t, SMTP_TLS_REQUIRED);
    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_int_equal(cap.connections, 1);
    assert_int_equal(metrics_counter(MET_SMTP_TLS_FALLBACKS) - before, 1);
    assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\nSTARTTLS\r\n");
    drain_and_check(t->loop, &fs, 1);
    SSL_CTX_free(broken);
}

static void test_starttls_verify_wrong_name_next_candidate(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = rules_tls, .tls = fx.server_ctx };
    fake_server_t *s1 = fake_server_new(t->loop, &sc);
    fake_server_t *s2 = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("wrong.test.local", s1->port), cand("mx.test.local", s2->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_VERIFY);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_string_equal(fake_server_transcript(s1), "EHLO " HELO_NAME "\r\nSTARTTLS\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_non_null(strstr(cap.r[0].text, "certificate verification failed"));
    assert_int_equal(cap.tls, 0);

    deliver_and_wait(t, &cfg, rcpts, 1, c, 2, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(fake_server_transcript(s2), TRANSCRIPT_TLS("RCPT TO:<b@y>\r\n"));
    assert_string_equal(cap.mx_host, "mx.test.local");
    assert_int_equal(cap.attempts, 2);
    assert_int_equal(cap.tls, 1);
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

static void test_starttls_verify_untrusted_ca(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = rules_tls, .tls = fx.evil_ctx };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx.test.local", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_VERIFY);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\nSTARTTLS\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_non_null(strstr(cap.r[0].text, "certificate verification failed"));
    drain_and_check(t->loop, &fs, 1);
}

static void test_tls_required_not_offered(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    capture_t cap;

    for (int policy = SMTP_TLS_REQUIRED; policy <= SMTP_TLS_VERIFY; policy++) {
        deliver_config_t cfg = config(t, (smtp_tls_policy_t)policy);
        buf_reset(&fs->transcript);
        deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
        assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\nQUIT\r\n");
        assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
        assert_string_equal(cap.r[0].text, "TLS required but the server does not offer STARTTLS");
        for (int i = 0; i < 20 && fake_server_busy(fs); i++)
            loop_run_once(t->loop, 10);
    }
    drain_and_check(t->loop, &fs, 1);
}

/* Bytes pipelined behind "220" were never protected by TLS: refuse. */
static void test_starttls_injection(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_TLS, ACT_REPLY },
        { "STARTTLS", "220 2.0.0 Ready\r\n250 2.1.0 injected\r\n", ACT_REPLY },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx.test.local", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_REQUIRED);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_non_null(strstr(cap.r[0].text, "pipelined"));
    drain_and_check(t->loop, &fs, 1);
}

/* ---- engine: pipelining, splitting, pool, resumption, AUTH ---------- */

typedef struct creq {
    const char *const *rcpts;
    size_t             nrcpts;
    const char        *domain;
    unsigned           need;
} creq_t;

/* With request.site_tag = site_tag (NULL: untagged). */
static deliver_t *ctx_start_tagged(deliver_ctx_t *ctx, const creq_t *q, const char *site_tag,
                                   const deliver_candidate_t *cands, size_t ncands, capture_t *cap)
{
    deliver_request_t req = {
        .mail_from = FROM,
        .rcpts = q->rcpts,
        .nrcpts = q->nrcpts,
        .data = PAYLOAD,
        .len = strlen(PAYLOAD),
        .message_size = MSG_SIZE,
        .candidates = cands,
        .ncandidates = ncands,
        .log_id = "test-msg-ctx",
        .domain = q->domain,
        .need = q->need,
        .site_tag = site_tag,
    };
    memset(cap, 0, sizeof(*cap));
    deliver_t *d = deliver_ctx_start(ctx, &req, on_result, cap);
    assert_non_null(d);
    assert_int_equal(cap->fired, 0);
    return d;
}

static deliver_t *ctx_start(deliver_ctx_t *ctx, const creq_t *q, const deliver_candidate_t *cands,
                            size_t ncands, capture_t *cap)
{
    return ctx_start_tagged(ctx, q, NULL, cands, ncands, cap);
}

static void ctx_deliver(deliver_ctx_t *ctx, loop_t *loop, const creq_t *q, const deliver_candidate_t *cands,
                        size_t ncands, capture_t *cap)
{
    ctx_start(ctx, q, cands, ncands, cap);
    run_until(loop, &cap->fired);
}

static void ctx_deliver_tagged(deliver_ctx_t *ctx, loop_t *loop, const creq_t *q, const char *site_tag,
                               const deliver_candidate_t *cands, size_t ncands, capture_t *cap)
{
    ctx_start_tagged(ctx, q, site_tag, cands, ncands, cap);
    run_until(loop, &cap->fired);
}

static void spin(loop_t *loop, int n)
{
    for (int i = 0; i < n; i++)
        loop_run_once(loop, 10);
}

/* Run the loop for about ms milliseconds. */
static void spin_ms(loop_t *loop, unsigned ms)
{
    uint64_t until = util_mono_ms() + ms;
    while (util_mono_ms() < until)
        loop_run_once(loop, 10);
}

/* The server holds every MAIL/RCPT reply until DATA arrives: only a
 * client that really sends MAIL, RCPTs and DATA without waiting gets
 * through. Exact transcript, one transaction. */
static void test_pipelining_batch(void **state)
{
    tctx_t *t = *state;
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                 .hold_until_data = 1,
                                 .eod_reply = "250 2.0.0 Ok: queued as P1\r\n" };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y", "d@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    t->to.mail_ms = 1000; /* a lock-step client would time out waiting for MAIL's reply */
    deliver_and_wait(t, &cfg, rcpts, 3, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs),
                        TRANSCRIPT_OK("RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nRCPT TO:<d@y>\r\n"));
    for (size_t i = 0; i < 3; i++)
        assert_rcpt(&cap, i, rcpts[i], OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.transactions, 1);
    /* the EHLO keywords reach the caller */
    assert_int_equal(cap.features.flags, SMTP_FEAT_PIPELINING | SMTP_FEAT_SIZE | SMTP_FEAT_8BITMIME |
                                             SMTP_FEAT_ENHANCEDSTATUSCODES);
    assert_int_equal(cap.features.size_max, 10240000);
    drain_and_check(t->loop, &fs, 1);
}

/* Without PIPELINING in EHLO the same exchange is lock-step: RCPTs all
 * refused means no DATA at all, then RSET. */
static void test_lockstep_without_pipelining(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", "250-fake.test\r\n250 SIZE 1000\r\n", ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "550 5.1.1 no such user\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "RSET", "250 2.0.0 Ok\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                        "RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nRSET\r\nQUIT\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");

    /* PIPELINING offered but switched off by configuration: lock-step too */
    static const script_t held = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                   .hold_until_data = 1 };
    fake_server_t *s2 = fake_server_new(t->loop, &held);
    deliver_candidate_t c2[] = { cand("mx1.fake.test", s2->port) };
    cfg.no_pipelining = 1;
    t->to.mail_ms = 300;
    deliver_and_wait(t, &cfg, rcpts, 1, c2, 1, &cap);
    assert_string_equal(fake_server_transcript(s2), "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(cap.r[0].text, "timeout while sending MAIL FROM");
    fake_server_t *all[] = { fs, s2 };
    drain_and_check(t->loop, all, 2);
}

/* More recipients than max_rcpts: split over transactions on the same
 * connection, each recipient with its own answer. */
static void test_split_transactions(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<r2@y>", "550 5.1.1 <r2@y>: User unknown\r\n", ACT_REPLY },
        { "RCPT TO:<r4@y>", "452 4.2.2 <r4@y>: Mailbox full\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "r1@y", "r2@y", "r3@y", "r4@y", "r5@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    cfg.max_rcpts = 2;
    deliver_and_wait(t, &cfg, rcpts, 5, c, 1, &cap);
#define ENV "MAIL FROM:<" FROM "> SIZE=38\r\n"
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\n"
                        ENV "RCPT TO:<r1@y>\r\nRCPT TO:<r2@y>\r\nDATA\r\n" PAYLOAD
                        ENV "RCPT TO:<r3@y>\r\nRCPT TO:<r4@y>\r\nDATA\r\n" PAYLOAD
                        ENV "RCPT TO:<r5@y>\r\nDATA\r\n" PAYLOAD "QUIT\r\n");
#undef ENV
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(fs->nmessages, 3);
    assert_int_equal(cap.transactions, 3);
    assert_int_equal(cap.attempts, 1);
    assert_rcpt(&cap, 0, "r1@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap, 1, "r2@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 2, "r3@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap, 3, "r4@y", OUTCOME_TRANSIENT, "mailbox_full", 452, "4.2.2");
    assert_rcpt(&cap, 4, "r5@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    drain_and_check(t->loop, &fs, 1);
}

/* "452 4.5.3 too many recipients" is no verdict: those recipients go in
 * the next transaction. */
static void test_452_too_many_recipients_next_txn(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<c@y>", "452 4.5.3 Error: too many recipients\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const rule_t rules2[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "452 4.5.3 Error: too many recipients\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "RSET", "250 2.0.0 Ok\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    static const script_t sc2 = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules2 };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    fake_server_t *s2 = fake_server_new(t->loop, &sc2);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    deliver_candidate_t c2[] = { cand("mx1.fake.test", s2->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    /* c@y is refused "too many" in the first transaction only (the rule
     * matches by address, so it gets it again: no progress the second
     * time, its own 452 stands) */
    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"
                        PAYLOAD "QUIT\r\n" /* one-shot: no pool, a new connection */
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<c@y>\r\nDATA\r\n"
                        "RSET\r\nQUIT\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_TRANSIENT, "rate_limited", 452, "4.5.3");
    assert_int_equal(cap.transactions, 2);

    /* nobody accepted, all "too many": one transaction, no loop */
    deliver_and_wait(t, &cfg, rcpts, 2, c2, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "rate_limited", 452, "4.5.3");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_TRANSIENT, "rate_limited", 452, "4.5.3");
    assert_int_equal(cap.transactions, 1);
    fake_server_t *all[] = { fs, s2 };
    drain_and_check(t->loop, all, 2);
}

static deliver_ctx_t *pool_ctx(tctx_t *t, smtp_tls_policy_t tls, const smtp_pool_limits_t *lim)
{
    deliver_config_t cfg = config(t, tls);
    if (lim)
        cfg.pool = *lim;
    return deliver_ctx_new(t->loop, &cfg);
}

/* Two messages to one destination: one connection, no RSET between
 * completed transactions, the second says reused. */
static void test_pool_reuse(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" }, *r2[] = { "c@y" };
    creq_t q1 = { r1, 1, "y", 0 }, q2 = { r2, 1, "y", 0 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;

    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.connections, 1);
    assert_int_equal(cap.reused, 0);
    spin(t->loop, 3);
    ctx_deliver(ctx, t->loop, &q2, c, 1, &cap);
    assert_rcpt(&cap, 0, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.connections, 0);
    assert_int_equal(cap.reused, 1);
    assert_int_equal(cap.attempts, 1);
    assert_int_equal(fs->naccepted, 1);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<c@y>\r\nDATA\r\n" PAYLOAD);
    deliver_stats_t st;
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.connects, 1);
    assert_int_equal(st.pool.reuses, 1);
    assert_int_equal(st.pool.idle, 1);
    /* freeing the context says QUIT to what is idle */
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    assert_string_equal(fake_server_transcript(fs) + strlen(fake_server_transcript(fs)) - 6, "QUIT\r\n");
    drain_and_check(t->loop, &fs, 1);
}

/* Two messages with site tag "s@a" leave one idle session tagged "s@a";
 * trimming the tag to 0 says QUIT to it and closes it. An untagged
 * message's session is counted under no tag and no trim touches it; a
 * reused session takes the tag of the request that used it last. */
static void test_pool_site_tag_trim(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" }, *r2[] = { "c@y" };
    creq_t q1 = { r1, 1, "y", 0 }, q2 = { r2, 1, "y", 0 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;
    deliver_stats_t st;

    ctx_deliver_tagged(ctx, t->loop, &q1, "s@a", c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    ctx_deliver_tagged(ctx, t->loop, &q2, "s@a", c, 1, &cap);
    assert_rcpt(&cap, 0, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.reused, 1);
    assert_int_equal(deliver_ctx_idle_tagged(ctx, "s@a"), 1);
    assert_int_equal(deliver_ctx_idle_tagged(ctx, "s@b"), 0);
    assert_int_equal(deliver_ctx_idle_tagged(ctx, NULL), 0);
    assert_int_equal(deliver_ctx_trim(ctx, "s@a", 1), 0); /* within its share */
    assert_int_equal(deliver_ctx_trim(ctx, "s@a", 0), 1);
    assert_int_equal(deliver_ctx_idle_tagged(ctx, "s@a"), 0);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, 0);
    assert_int_equal(st.pool.evicted, 1);
    for (int i = 0; i < 100 && fake_server_busy(fs); i++)
        spin(t->loop, 1);
    assert_false(fake_server_busy(fs)); /* QUIT answered, closed */
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<c@y>\r\nDATA\r\n" PAYLOAD
                        "QUIT\r\n");

    /* untagged: idle, but no tag's */
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_int_equal(cap.connections, 1);
    assert_int_equal(deliver_ctx_idle_tagged(ctx, "s@a"), 0);
    assert_int_equal(deliver_ctx_trim(ctx, "s@a", 0), 0);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, 1);
    /* reused by a request of site "s@b": now that site's */
    ctx_deliver_tagged(ctx, t->loop, &q2, "s@b", c, 1, &cap);
    assert_int_equal(cap.reused, 1);
    assert_int_equal(deliver_ctx_idle_tagged(ctx, "s@b"), 1);
    assert_int_equal(deliver_ctx_trim(ctx, "s@a", 0), 0);
    assert_int_equal(deliver_ctx_idle_tagged(ctx, "s@b"), 1);
    assert_int_equal(fs->naccepted, 2);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* A transaction left open (every RCPT refused) is RSET before the
 * connection goes back to the pool; the next message needs no RSET. */
static void test_pool_rset_only_when_needed(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<bad@y>", "550 5.1.1 no such user\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "RSET", "250 2.0.0 Ok\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "bad@y" }, *r2[] = { "c@y" };
    creq_t q1 = { r1, 1, NULL, 0 }, q2 = { r2, 1, NULL, 0 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;

    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "bad@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    ctx_deliver(ctx, t->loop, &q2, c, 1, &cap);
    assert_rcpt(&cap, 0, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.reused, 1);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<bad@y>\r\nDATA\r\nRSET\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<c@y>\r\nDATA\r\n" PAYLOAD);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* The server hangs up on the idle connection: noticed, discarded, the
 * next message connects afresh and that costs nothing. */
static void test_pool_idle_close_detected(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;
    deliver_stats_t st;

    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    spin(t->loop, 3);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, 1);
    for (size_t i = 0; i < FAKE_MAX_CONNS; i++) /* the server's idle timeout */
        if (fs->conns[i].st)
            fake_conn_close(&fs->conns[i]);
    spin(t->loop, 5);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, 0);
    assert_int_equal(st.pool.idle_lost, 1);
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.attempts, 1);
    assert_int_equal(cap.connections, 1);
    assert_int_equal(cap.reused, 0);
    assert_int_equal(fs->naccepted, 2);

    /* "421 idle timeout" then close: same */
    static const script_t bye = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok };
    fake_server_t *s2 = fake_server_new(t->loop, &bye);
    deliver_candidate_t c2[] = { cand("mx2.fake.test", s2->port) };
    ctx_deliver(ctx, t->loop, &q1, c2, 1, &cap);
    spin(t->loop, 3);
    for (size_t i = 0; i < FAKE_MAX_CONNS; i++)
        if (s2->conns[i].st)
            stream_puts(s2->conns[i].st, "421 4.4.2 fake.test Error: timeout exceeded\r\n");
    spin(t->loop, 5);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle_lost, 2);

    /* a server that hangs up right after the end-of-data reply: never
     * pooled at all */
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                 .eod_then_close = 1 };
    fake_server_t *s3 = fake_server_new(t->loop, &sc);
    deliver_candidate_t c3[] = { cand("mx3.fake.test", s3->port) };
    deliver_ctx_stats(ctx, &st);
    size_t idle_before = st.pool.idle;
    ctx_deliver(ctx, t->loop, &q1, c3, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    spin(t->loop, 5);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, idle_before);
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { fs, s2, s3 };
    drain_and_check(t->loop, all, 3);
}

/* The pooled connection dies only when used (the close was not seen while
 * idle): the message goes over a fresh connection to the same MX, and the
 * attempt count says one. */
static void test_pool_dead_on_reuse_retried(void **state)
{
    tctx_t *t = *state;
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                 .close_on_reuse = 1 };
    static const script_t other = { .greeting = "554 5.7.1 not me\r\n", .rules = fakesmtp_rules_ok };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    fake_server_t *s2 = fake_server_new(t->loop, &other);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port), cand("mx2.fake.test", s2->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;

    ctx_deliver(ctx, t->loop, &q1, c, 2, &cap);
    assert_int_equal(cap.connections, 1);
    ctx_deliver(ctx, t->loop, &q1, c, 2, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(cap.mx_host, "mx1.fake.test");
    assert_int_equal(cap.attempts, 1);
    assert_int_equal(cap.connections, 1);
    assert_int_equal(fs->naccepted, 2);
    assert_int_equal(s2->naccepted, 0);
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { fs, s2 };
    drain_and_check(t->loop, all, 2);
}

/* Limits: messages per session (then QUIT and a new connection), idle
 * time (QUIT when it runs out). */
static void test_pool_limits_msgs_and_idle(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    smtp_pool_limits_t lim = { .max_msgs_per_session = 2, .max_idle_ms = 200 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, &lim);
    capture_t cap;
    deliver_stats_t st;

    for (int i = 0; i < 3; i++) {
        ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
        assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
        assert_int_equal(cap.connections, i == 2 ? 1 : (i == 0));
    }
    spin(t->loop, 5);
    assert_int_equal(fs->naccepted, 2);
    /* the first connection said QUIT after its second message */
    assert_non_null(strstr(fake_server_transcript(fs), PAYLOAD "QUIT\r\nEHLO "));
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, 1);
    for (int i = 0; i < 60 && st.pool.idle; i++) {
        spin(t->loop, 1);
        deliver_ctx_stats(ctx, &st);
    }
    assert_int_equal(st.pool.idle, 0);
    assert_int_equal(st.pool.evicted, 2);
    assert_int_equal(st.pool.dests, 0); /* nothing holds the destination: forgotten */
    spin(t->loop, 5);
    assert_false(fake_server_busy(fs)); /* QUIT answered, both closed */
    assert_int_equal(loop_timer_count(t->loop), 0); /* no sweep timer without idle sessions */
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

static void count_grant(void *arg, int how, smtp_session_t *s)
{
    (*(int *)arg)++;
}

/* The pool forgets a destination as soon as nothing holds it (no busy or
 * idle session, no waiter, no cap in force), so a worker that meets a
 * thousand destinations does not keep a thousand entries. */
static void test_pool_frees_unused_destinations(void **state)
{
    tctx_t *t = *state;
    smtp_pool_limits_t lim = { .max_per_dest = 1, .max_idle_ms = 20, .refused_backoff_ms = 60 };
    smtp_pool_t *p = smtp_pool_new(t->loop, &lim);
    smtp_pool_stats_t st;
    smtp_session_t *s = NULL;
    smtp_pool_wait_t w;
    char key[32];

    /* connections that failed (released without a session) */
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof(key), "192.0.2.%d|25|0|mx|h|", i);
        assert_int_equal(smtp_pool_acquire(p, key, &s, &w, count_grant, NULL), SMTP_POOL_CONNECT);
        smtp_pool_get_stats(p, &st);
        assert_int_equal(st.dests, 1);
        assert_int_equal(smtp_pool_release(p, key, NULL), 0);
        smtp_pool_get_stats(p, &st);
        assert_int_equal(st.dests, 0);
    }

    /* a waiter holds its destination; cancelled, the busy slot still does */
    int granted = 0;
    assert_int_equal(smtp_pool_acquire(p, "b", &s, &w, count_grant, &granted), SMTP_POOL_CONNECT);
    assert_int_equal(smtp_pool_acquire(p, "b", &s, &w, count_grant, &granted), SMTP_POOL_WAIT);
    smtp_pool_release(p, "b", NULL);
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.dests, 1); /* the waiter's */
    smtp_pool_cancel(p, &w);
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.dests, 0);
    spin(t->loop, 2);
    assert_int_equal(granted, 0);

    /* a cap in force holds it until it runs out; the sweep frees it then */
    lim.max_per_dest = 4;
    smtp_pool_free(p);
    p = smtp_pool_new(t->loop, &lim);
    assert_int_equal(smtp_pool_acquire(p, "c", &s, &w, count_grant, NULL), SMTP_POOL_CONNECT);
    assert_int_equal(smtp_pool_acquire(p, "c", &s, &w, count_grant, NULL), SMTP_POOL_CONNECT);
    assert_int_equal(smtp_pool_refused(p, "c"), 1);
    smtp_pool_release(p, "c", NULL);
    smtp_pool_release(p, "c", NULL);
    smtp_pool_get_stats(p, &st);
    assert_int_equal(st.dests, 1);
    assert_int_equal(st.busy, 0);
    for (int i = 0; i < 100 && st.dests; i++) {
        spin(t->loop, 1);
        smtp_pool_get_stats(p, &st);
    }
    assert_int_equal(st.dests, 0);
    spin(t->loop, 5);
    assert_int_equal(loop_timer_count(t->loop), 0); /* no sweep once nothing is capped */
    smtp_pool_free(p);
}

/* Worker limit: a full worker evicts another destination's idle session
 * (QUIT) to connect; age limit: a connection past max_age is not kept. */
static void test_pool_worker_limit_and_age(void **state)
{
    tctx_t *t = *state;
    fake_server_t *a = fake_server_new(t->loop, &fakesmtp_script_ok);
    fake_server_t *b = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t ca[] = { cand("mxa.fake.test", a->port) };
    deliver_candidate_t cb[] = { cand("mxb.fake.test", b->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    smtp_pool_limits_t lim = { .max_total = 1, .max_idle_ms = 60000 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, &lim);
    capture_t cap;
    deliver_stats_t st;

    ctx_deliver(ctx, t->loop, &q1, ca, 1, &cap);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, 1);
    /* no waiting for a's idle time to run out (60 s): evicted at once */
    deliver_t *d = ctx_start(ctx, &q1, cb, 1, &cap);
    for (int i = 0; i < 200 && !cap.fired; i++)
        loop_run_once(t->loop, 10);
    if (!cap.fired) {
        deliver_cancel(d);
        fail_msg("the second destination waited for the first one's idle session");
    }
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    spin(t->loop, 5);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.evicted, 1);
    assert_int_equal(st.pool.idle, 1); /* b's */
    assert_string_equal(fake_server_transcript(a) + strlen(fake_server_transcript(a)) - 6, "QUIT\r\n");
    assert_null(strstr(fake_server_transcript(b), "QUIT"));
    deliver_ctx_free(ctx);
    spin(t->loop, 5);

    /* idle time generous, age short: the sweep retires it for its age */
    smtp_pool_limits_t old = { .max_age_ms = 100, .max_idle_ms = 60000 };
    ctx = pool_ctx(t, SMTP_TLS_NONE, &old);
    buf_reset(&a->transcript);
    ctx_deliver(ctx, t->loop, &q1, ca, 1, &cap);
    deliver_ctx_stats(ctx, &st);
    for (int i = 0; i < 100 && st.pool.idle; i++) {
        spin(t->loop, 1);
        deliver_ctx_stats(ctx, &st);
    }
    assert_int_equal(st.pool.idle, 0);
    assert_int_equal(st.pool.evicted, 1);
    spin(t->loop, 5);
    assert_string_equal(fake_server_transcript(a), TRANSCRIPT_OK("RCPT TO:<b@y>\r\n"));
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { a, b };
    drain_and_check(t->loop, all, 2);
}

/* One connection per destination: the second message waits for the
 * first's connection and reuses it. */
static void test_pool_per_destination_limit(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" }, *r2[] = { "c@y" };
    creq_t q1 = { r1, 1, NULL, 0 }, q2 = { r2, 1, NULL, 0 };
    smtp_pool_limits_t lim = { .max_per_dest = 1 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, &lim);
    capture_t cap1, cap2;

    ctx_start(ctx, &q1, c, 1, &cap1);
    ctx_start(ctx, &q2, c, 1, &cap2);
    run_until(t->loop, &cap1.fired);
    run_until(t->loop, &cap2.fired);
    assert_rcpt(&cap1, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap2, 0, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(fs->maxconc, 1);
    assert_int_equal(cap2.reused, 1);

    /* without the limit two connections open at once */
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    ctx_start(ctx, &q1, c, 1, &cap1);
    ctx_start(ctx, &q2, c, 1, &cap2);
    run_until(t->loop, &cap1.fired);
    run_until(t->loop, &cap2.fired);
    assert_int_equal(fs->naccepted, 3);
    assert_int_equal(fs->maxconc, 2);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* Slow start: a fresh destination gets one connection until a transaction
 * completed there; then the others open at once. */
static void test_pool_slow_start(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" }, *r2[] = { "c@y" }, *r3[] = { "d@y" }, *r4[] = { "e@y" };
    creq_t q1 = { r1, 1, NULL, 0 }, q2 = { r2, 1, NULL, 0 }, q3 = { r3, 1, NULL, 0 },
           q4 = { r4, 1, NULL, 0 };
    smtp_pool_limits_t lim = { .max_per_dest = 3, .initial_per_dest = 1 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, &lim);
    capture_t cap1, cap2, cap3, cap4;

    ctx_start(ctx, &q1, c, 1, &cap1);
    ctx_start(ctx, &q2, c, 1, &cap2);
    ctx_start(ctx, &q3, c, 1, &cap3);
    run_until(t->loop, &cap1.fired);
    /* until the first transaction completed, one connection only (the
     * second may already be accepted by the time cap1 fires) */
    assert_int_equal(fs->naccepted_idle, 1);
    run_until(t->loop, &cap2.fired);
    run_until(t->loop, &cap3.fired);
    /* then the rest in parallel: the first session reused, one more opened */
    assert_int_equal(fs->naccepted, 2);
    assert_int_equal(fs->maxconc, 2);
    /* once proven, a new burst may use the full limit */
    ctx_start(ctx, &q1, c, 1, &cap1);
    ctx_start(ctx, &q2, c, 1, &cap2);
    ctx_start(ctx, &q3, c, 1, &cap3);
    ctx_start(ctx, &q4, c, 1, &cap4);
    run_until(t->loop, &cap1.fired);
    run_until(t->loop, &cap2.fired);
    run_until(t->loop, &cap3.fired);
    run_until(t->loop, &cap4.fired);
    assert_int_equal(fs->maxconc, 3);
    assert_rcpt(&cap4, 0, "e@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* A server that takes two connections per client and answers a third with
 * "421 too many connections": the pool caps the destination at the two it
 * has open, and the refused messages wait for them instead of failing. */
static void test_pool_refused_caps_destination(void **state)
{
    tctx_t *t = *state;
    static const script_t limited = {
        .greeting = "220 fake.test ESMTP\r\n",
        .rules = fakesmtp_rules_ok,
        .eod_reply = "250 2.0.0 Ok: queued as ABC123\r\n",
        .max_conns = 2,
    };
    fake_server_t *fs = fake_server_new(t->loop, &limited);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r[6][1] = { { "b@y" }, { "c@y" }, { "d@y" }, { "e@y" }, { "f@y" }, { "g@y" } };
    creq_t q[6];
    capture_t cap[6];
    smtp_pool_limits_t lim = { .max_per_dest = 4, .refused_backoff_ms = 3000, .max_idle_ms = 20000 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, &lim);
    for (int i = 0; i < 6; i++) {
        q[i] = (creq_t){ r[i], 1, NULL, 0 };
        ctx_start(ctx, &q[i], c, 1, &cap[i]);
    }
    for (int i = 0; i < 6; i++) {
        run_until(t->loop, &cap[i].fired);
        assert_rcpt(&cap[i], 0, r[i][0], OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    }
    /* four connections opened at once, two turned away; their messages
     * then waited for the two that work */
    assert_int_equal(fs->nrefused, 2);
    assert_int_equal(fs->maxconc, 2);
    assert_int_equal(fs->nmessages, 6);
    deliver_stats_t st;
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.refused, 2);
    /* capped: a new burst opens no third connection */
    for (int i = 0; i < 6; i++)
        ctx_start(ctx, &q[i], c, 1, &cap[i]);
    for (int i = 0; i < 6; i++) {
        run_until(t->loop, &cap[i].fired);
        assert_rcpt(&cap[i], 0, r[i][0], OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    }
    assert_int_equal(fs->nrefused, 2);
    assert_int_equal(fs->naccepted, 4);
    /* the cap lapses: the next burst tries more connections again */
    spin_ms(t->loop, 3100);
    for (int i = 0; i < 6; i++)
        ctx_start(ctx, &q[i], c, 1, &cap[i]);
    for (int i = 0; i < 6; i++) {
        run_until(t->loop, &cap[i].fired);
        assert_rcpt(&cap[i], 0, r[i][0], OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    }
    assert_int_equal(fs->nrefused, 4);
    assert_int_equal(fs->naccepted, 6);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* Route penalties: an address that refused a connection is skipped by the
 * next attempts (the other MX at once), an attempt with only down
 * addresses ends without connecting, the penalty doubles per failure in a
 * row, and a session that gets past the greeting clears it. */
static void test_route_penalty(void **state)
{
    tctx_t *t = *state;
    unsigned short dead = fakesmtp_closed_port();
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t both[] = { cand("mx1.fake.test", dead), cand("mx2.fake.test", fs->port) };
    const char *r1[] = { "b@y" }, *r2[] = { "c@y" }, *r3[] = { "d@y" };
    creq_t q1 = { r1, 1, NULL, 0 }, q2 = { r2, 1, NULL, 0 }, q3 = { r3, 1, NULL, 0 };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    cfg.route_penalty_ms = 200;
    cfg.route_penalty_max_ms = 2000;
    cfg.pool.initial_per_dest = 1;
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    capture_t cap, cap2, cap3;
    uint64_t skips = metrics_counter(MET_SMTP_ROUTE_SKIPS);

    /* mx1 refuses: mx2 takes it, mx1 is now down */
    ctx_deliver(ctx, t->loop, &q1, both, 2, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.attempts, 2);
    /* the next message goes straight to mx2 */
    ctx_deliver(ctx, t->loop, &q2, both, 2, &cap);
    assert_rcpt(&cap, 0, "c@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.attempts, 1);
    assert_string_equal(cap.mx_host, "mx2.fake.test");
    assert_int_equal(metrics_counter(MET_SMTP_ROUTE_SKIPS) - skips, 1);
    /* only mx1: no connection at all, the reason says why */
    ctx_deliver(ctx, t->loop, &q1, both, 1, &cap);
    assert_int_equal(cap.attempts, 0);
    assert_string_equal(outcome_name(cap.r[0].outcome), "transient");
    assert_string_equal(cap.r[0].reason, "network");
    assert_non_null(strstr(cap.r[0].text, "every MX address is down after recent failures (next try in 1 s): "
                                          "mx1.fake.test [127.0.0.1|"));
    assert_non_null(strstr(cap.r[0].text, "Connection refused"));

    /* 200 ms on, mx1 is tried again: refused, now down for 400 ms. Three
     * messages at once: slow start lets one connect, the two that waited
     * for its slot find mx1 down and give up without connecting. */
    spin_ms(t->loop, 250);
    ctx_start(ctx, &q1, both, 1, &cap);
    ctx_start(ctx, &q2, both, 1, &cap2);
    ctx_start(ctx, &q3, both, 1, &cap3);
    run_until(t->loop, &cap.fired);
    run_until(t->loop, &cap2.fired);
    run_until(t->loop, &cap3.fired);
    assert_int_equal(cap.attempts, 1);
    assert_non_null(strstr(cap.r[0].text, "Connection refused"));
    assert_null(strstr(cap.r[0].text, "every MX address"));
    assert_int_equal(cap2.attempts, 0);
    assert_string_equal(cap2.r[0].reason, "network");
    assert_non_null(strstr(cap2.r[0].text, "Connection refused"));
    assert_int_equal(cap3.attempts, 0);
    spin_ms(t->loop, 250); /* 250 < 400: still down */
    ctx_deliver(ctx, t->loop, &q1, both, 1, &cap);
    assert_int_equal(cap.attempts, 0);

    /* mx1 comes back: after the penalty it is used, and that clears it */
    fake_server_t *back = fake_server_on(t->loop, &fakesmtp_script_ok, dead);
    spin_ms(t->loop, 200);
    ctx_deliver(ctx, t->loop, &q1, both, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(cap.mx_host, "mx1.fake.test");
    /* down again: the success cleared the count, so this first failure in
     * a row costs 200 ms (not 800), and 300 ms on mx1 is tried again */
    fake_server_free(back); /* the pooled session to it is noticed closed */
    spin(t->loop, 5);
    ctx_deliver(ctx, t->loop, &q1, both, 1, &cap); /* refused: down for 200 ms */
    assert_int_equal(cap.attempts, 1);
    assert_non_null(strstr(cap.r[0].text, "Connection refused"));
    spin_ms(t->loop, 300);
    ctx_deliver(ctx, t->loop, &q1, both, 1, &cap);
    assert_int_equal(cap.attempts, 1);
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { fs };
    drain_and_check(t->loop, all, 1);
}

/* Two contexts (two workers) with one table: what one learns about a dead
 * address, the other skips without connecting. */
static void test_route_penalty_shared(void **state)
{
    tctx_t *t = *state;
    unsigned short dead = fakesmtp_closed_port();
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t both[] = { cand("mx1.fake.test", dead), cand("mx2.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    cfg.route_penalty_ms = 5000;
    cfg.routes = routes_new(cfg.route_penalty_ms, 0);
    deliver_ctx_t *a = deliver_ctx_new(t->loop, &cfg);
    deliver_ctx_t *b = deliver_ctx_new(t->loop, &cfg);
    capture_t cap;
    ctx_deliver(a, t->loop, &q1, both, 2, &cap); /* mx1 refuses, mx2 delivers */
    assert_int_equal(cap.attempts, 2);
    ctx_deliver(b, t->loop, &q1, both, 1, &cap); /* the other worker: mx1 only */
    assert_int_equal(cap.attempts, 0);
    assert_string_equal(cap.r[0].reason, "network");
    assert_non_null(strstr(cap.r[0].text, "every MX address is down"));
    deliver_ctx_free(a);
    deliver_ctx_free(b);
    routes_free(cfg.routes);
    fake_server_t *all[] = { fs };
    drain_and_check(t->loop, all, 1);
}

/* A second connection to a destination resumes the TLS session. */
static void test_tls_resumption(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = rules_tls, .tls = fx.server_ctx };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx.test.local", fs->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    smtp_pool_limits_t lim = { .disabled = 1 }; /* a new connection every time */
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_VERIFY, &lim);
    capture_t cap;
    deliver_stats_t st;

    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls_full, 1);
    assert_int_equal(cap.tls_resumed, 0);
    for (int i = 0; i < 2; i++) {
        spin(t->loop, 3);
        ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
        assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
        assert_int_equal(cap.tls, 1);
        assert_int_equal(cap.tls_full, 0);
        assert_int_equal(cap.tls_resumed, 1);
    }
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.tls_full, 1);
    assert_int_equal(st.tls_resumed, 2);
    assert_int_equal(st.tls_cached, 1);
    assert_int_equal(fs->naccepted, 3);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* Per-domain TLS policy overrides the default. */
static void test_tls_policy_per_domain(void **state)
{
    tctx_t *t = *state;
    deliver_config_t cfg = config(t, SMTP_TLS_VERIFY);
    cfg.tls_policy_map = "legacy.test:none, .corp.test:required,bank.test : verify,bad.test:bogus";
    /* parsed once: the valid entries in order, blanks trimmed, the bad one
     * named in err and left out */
    deliver_tls_map_t m;
    char err[256] = "";
    assert_int_equal(deliver_tls_map_parse(cfg.tls_policy_map, &m, err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] tls_policy: \"bad.test:bogus\" is not domain:none|opportunistic|required|verify");
    assert_int_equal(m.n, 3);
    assert_int_equal(m.rules[0].plen, strlen("legacy.test"));
    assert_memory_equal(m.rules[0].pattern, "legacy.test", m.rules[0].plen);
    assert_int_equal(m.rules[0].policy, SMTP_TLS_NONE);
    assert_int_equal(m.rules[1].plen, strlen(".corp.test"));
    assert_memory_equal(m.rules[1].pattern, ".corp.test", m.rules[1].plen);
    assert_int_equal(m.rules[1].policy, SMTP_TLS_REQUIRED);
    assert_int_equal(m.rules[2].plen, strlen("bank.test"));
    assert_memory_equal(m.rules[2].pattern, "bank.test", m.rules[2].plen);
    assert_int_equal(m.rules[2].policy, SMTP_TLS_VERIFY);
    assert_ptr_not_equal(m.text, cfg.tls_policy_map); /* its own copy */
    smtp_tls_policy_t dflt = SMTP_TLS_VERIFY;
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "legacy.test"), SMTP_TLS_NONE);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "LEGACY.test"), SMTP_TLS_NONE);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "x.legacy.test"), SMTP_TLS_VERIFY);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "corp.test"), SMTP_TLS_REQUIRED);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "a.b.corp.test"), SMTP_TLS_REQUIRED);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "xcorp.test"), SMTP_TLS_VERIFY);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "bank.test"), SMTP_TLS_VERIFY);
    assert_int_equal(deliver_tls_map_lookup(&m, SMTP_TLS_OPPORTUNISTIC, "bad.test"), SMTP_TLS_OPPORTUNISTIC);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, NULL), SMTP_TLS_VERIFY);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, ""), SMTP_TLS_VERIFY);
    deliver_tls_map_free(&m);
    assert_null(m.rules);
    /* the first matching entry wins; empty and NULL maps have none */
    assert_int_equal(deliver_tls_map_parse(" .t:none , a.t : verify ,", &m, err, sizeof(err)), 0);
    assert_int_equal(m.n, 2);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "a.t"), SMTP_TLS_NONE);
    deliver_tls_map_free(&m);
    assert_int_equal(deliver_tls_map_parse("", &m, err, sizeof(err)), 0);
    assert_int_equal(m.n, 0);
    assert_int_equal(deliver_tls_map_lookup(&m, dflt, "a.t"), SMTP_TLS_VERIFY);
    deliver_tls_map_free(&m);
    assert_int_equal(deliver_tls_map_parse(NULL, &m, err, sizeof(err)), 0);
    assert_int_equal(m.n, 0);
    deliver_tls_map_free(&m);
    assert_int_equal(deliver_tls_map_parse("nocolon, :none, x.t:", &m, err, sizeof(err)), -1);
    assert_string_equal(err, "[smtp] tls_policy: \"nocolon\" is not domain:none|opportunistic|required|verify");
    assert_int_equal(m.n, 0);
    deliver_tls_map_free(&m);
    assert_int_equal(deliver_tls_policy_parse("opportunistic"), SMTP_TLS_OPPORTUNISTIC);
    assert_int_equal(deliver_tls_policy_parse("none"), SMTP_TLS_NONE);
    assert_int_equal(deliver_tls_policy_parse("required"), SMTP_TLS_REQUIRED);
    assert_int_equal(deliver_tls_policy_parse("verify"), SMTP_TLS_VERIFY);
    assert_int_equal(deliver_tls_policy_parse("x"), -1);
    assert_int_equal(deliver_tls_policy_parse("Verify"), -1);
    assert_int_equal(deliver_tls_policy_parse(NULL), -1);

    /* end to end: a plaintext-only server is fine for legacy.test under a
     * verify default, and refused for another domain */
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@legacy.test" };
    creq_t q1 = { r1, 1, "legacy.test", 0 }, q2 = { r1, 1, "other.test", 0 };
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    capture_t cap;
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@legacy.test", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls, 0);
    ctx_deliver(ctx, t->loop, &q2, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@legacy.test", OUTCOME_TRANSIENT, "tls", 0, "");
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

static const rule_t rules_auth[] = {
    { "EHLO", "250-fake.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 AUTH LOGIN PLAIN\r\n", ACT_REPLY },
    { "STARTTLS", "220 2.0.0 Ready to start TLS\r\n", ACT_STARTTLS },
    { "AUTH PLAIN AHVzZXIAcGFzcw==", "235 2.7.0 Authentication successful\r\n", ACT_REPLY },
    { "AUTH PLAIN", "535 5.7.8 Error: authentication failed\r\n", ACT_REPLY },
    { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
    { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
    { "DATA", "354 go ahead\r\n", ACT_REPLY },
    { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
    { NULL, NULL, 0 },
};

static const rule_t rules_auth_login[] = {
    { "EHLO", "250-fake.test\r\n250-STARTTLS\r\n250 AUTH=LOGIN\r\n", ACT_REPLY },
    { "STARTTLS", "220 2.0.0 Ready to start TLS\r\n", ACT_STARTTLS },
    { "AUTH LOGIN", "334 VXNlcm5hbWU6\r\n", ACT_REPLY },
    { "dXNlcg==", "334 UGFzc3dvcmQ6\r\n", ACT_REPLY },
    { "cGFzcw==", "235 2.7.0 Authentication successful\r\n", ACT_REPLY },
    { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
    { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
    { "DATA", "354 go ahead\r\n", ACT_REPLY },
    { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
    { NULL, NULL, 0 },
};

/* Relay mode: the smarthost replaces the MX list; AUTH only inside TLS. */
static void test_relay_auth(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 relay.test ESMTP\r\n", .rules = rules_auth, .tls = fx.server_ctx };
    script_t sl = { .greeting = "220 relay.test ESMTP\r\n", .rules = rules_auth_login, .tls = fx.server_ctx };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    fake_server_t *fl = fake_server_new(t->loop, &sl);
    fake_server_t *mx = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t relay = cand("mx.test.local", fs->port);
    deliver_candidate_t relay_login = cand("mx.test.local", fl->port);
    deliver_candidate_t c[] = { cand("mx1.fake.test", mx->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, "y", 0 };
    capture_t cap;

    deliver_config_t cfg = config(t, SMTP_TLS_VERIFY);
    cfg.relay = &relay;
    cfg.nrelay = 1;
    cfg.auth_user = "user";
    cfg.auth_pass = "pass";
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\nSTARTTLS\r\nEHLO " HELO_NAME "\r\n"
                        "AUTH PLAIN AHVzZXIAcGFzcw==\r\nMAIL FROM:<" FROM ">\r\n"
                        "RCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD);
    assert_int_equal(mx->naccepted, 0);
    deliver_ctx_free(ctx);

    /* wrong password: the relay refused us, not the recipient */
    cfg.auth_pass = "wrong";
    ctx = deliver_ctx_new(t->loop, &cfg);
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "policy", 535, "5.7.8");
    deliver_ctx_free(ctx);

    /* LOGIN when PLAIN is not offered */
    cfg.auth_pass = "pass";
    cfg.relay = &relay_login;
    ctx = deliver_ctx_new(t->loop, &cfg);
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(fake_server_transcript(fl),
                        "EHLO " HELO_NAME "\r\nSTARTTLS\r\nEHLO " HELO_NAME "\r\n"
                        "AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\nMAIL FROM:<" FROM ">\r\n"
                        "RCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD);
    deliver_ctx_free(ctx);

    /* never in the clear: policy none means no AUTH at all */
    buf_reset(&fs->transcript);
    cfg.relay = &relay;
    cfg.tls = SMTP_TLS_NONE;
    ctx = deliver_ctx_new(t->loop, &cfg);
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_null(strstr(fake_server_transcript(fs), "AUTH"));
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { fs, fl, mx };
    drain_and_check(t->loop, all, 3);
}

/* 8BITMIME / SMTPUTF8: declared when offered, refused locally when not. */
static void test_need_8bitmime_smtputf8(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok); /* 8BITMIME, no SMTPUTF8 */
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    creq_t q8 = { r1, 1, NULL, SMTP_NEED_8BITMIME }, qu = { r1, 1, NULL, SMTP_NEED_SMTPUTF8 };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    cfg.pool.disabled = 1;
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    capture_t cap;

    ctx_deliver(ctx, t->loop, &q8, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_non_null(strstr(fake_server_transcript(fs), "MAIL FROM:<" FROM "> SIZE=38 BODY=8BITMIME\r\n"));
    spin(t->loop, 5);
    buf_reset(&fs->transcript);
    ctx_deliver(ctx, t->loop, &qu, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "policy", 553, "5.6.7");
    assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\nQUIT\r\n");
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* Pipelined batch, MAIL refused: the RCPT and DATA replies are read and
 * ignored, nothing else is sent, no RSET, and a pooled session stays in
 * sync for the next message. */
static void test_pipelined_mail_refused_keeps_sync(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:<>", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "MAIL FROM:", "553 5.7.1 <a@x>: Sender address rejected\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y", "c@y" };
    creq_t q1 = { r1, 2, NULL, 0 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;

    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "policy", 553, "5.7.1");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_PERMANENT, "policy", 553, "5.7.1");
    deliver_request_t req = { .mail_from = "", .rcpts = r1, .nrcpts = 1, .data = PAYLOAD, .len = strlen(PAYLOAD),
                              .message_size = MSG_SIZE, .candidates = c, .ncandidates = 1 };
    memset(&cap, 0, sizeof(cap));
    deliver_ctx_start(ctx, &req, on_result, &cap);
    run_until(t->loop, &cap.fired);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.reused, 1);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"
                        "MAIL FROM:<> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* RCPT timeout inside a pipelined batch: per-state timeout wording. */
static void test_pipelined_rcpt_timeout(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<c@y>", NULL, ACT_SILENT },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", NULL, ACT_SILENT },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    t->to.rcpt_ms = 200;
    deliver_and_wait(t, &cfg, rcpts, 2, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(cap.r[0].text, "timeout while sending RCPT TO");
    drain_and_check(t->loop, &fs, 1);
}

/* ------------------------------------------------------------------ */
/* hostile receivers                                                   */

typedef struct sess_capture {
    int          fired;
    int          status;
    smtp_state_t state;
    char         error[256];
    uint64_t     bytes_in;
} sess_capture_t;

static void on_sess(void *arg, smtp_session_t *s, const smtp_session_result_t *res)
{
    sess_capture_t *c = arg;
    c->fired++;
    c->status = res->status;
    c->state = res->state;
    snprintf(c->error, sizeof(c->error), "%s", res->error);
    c->bytes_in = res->bytes_in;
    smtp_session_free(s);
}

/* One bare session (no deliver, no pool) to 127.0.0.1:port. */
static void session_run(tctx_t *t, unsigned short port, sess_capture_t *cap)
{
    static const char *rcpts[] = { "b@y" };
    deliver_candidate_t c = cand("mx1.fake.test", port);
    smtp_session_params_t p = {
        .helo_name = HELO_NAME,
        .tls = SMTP_TLS_NONE,
        .timeouts = t->to,
        .mx_host = c.host,
        .addr = (const struct sockaddr *)&c.addr,
        .addrlen = c.addrlen,
        .mail_from = FROM,
        .rcpts = rcpts,
        .nrcpts = 1,
        .data = PAYLOAD,
        .len = strlen(PAYLOAD),
        .message_size = MSG_SIZE,
    };
    memset(cap, 0, sizeof(*cap));
    smtp_session_start(t->loop, &p, on_sess, cap);
    run_until(t->loop, &cap->fired);
}

#define HOSTILE_SIZE (20u * 1024 * 1024)
#define READ_CHUNK   16384u /* core/stream.c: what one read takes at most */

/* A 20 MB greeting, once as one line without an end and once as valid
 * "220-" lines: the parser sees the bytes as they arrive and gives up
 * at the line limit or at the reply budget, so the engine reads at most
 * the budget plus one chunk. It is a protocol error (no QUIT: nothing is
 * in sync), and it does not mark the address down as unreachable. */
static void test_hostile_greeting_budget(void **state)
{
    tctx_t *t = *state;
    char *noeol = malloc(HOSTILE_SIZE + 1);
    char *lines = malloc(HOSTILE_SIZE + 16);
    assert_non_null(noeol);
    assert_non_null(lines);
    memcpy(noeol, "220 ", 4);
    memset(noeol + 4, 'x', HOSTILE_SIZE - 4);
    noeol[HOSTILE_SIZE] = '\0';
    size_t n = 0;
    while (n + 1000 < HOSTILE_SIZE) {
        memcpy(lines + n, "220-", 4);
        memset(lines + n + 4, 'x', 994);
        memcpy(lines + n + 998, "\r\n", 2);
        n += 1000;
    }
    strcpy(lines + n, "220 end\r\n");
    script_t s1 = { .greeting = noeol, .rules = fakesmtp_rules_ok };
    script_t s2 = { .greeting = lines, .rules = fakesmtp_rules_ok };
    fake_server_t *f1 = fake_server_new(t->loop, &s1);
    fake_server_t *f2 = fake_server_new(t->loop, &s2);
    sess_capture_t sc;

    session_run(t, f1->port, &sc);
    assert_int_equal(sc.status, SMTP_EPROTO);
    assert_int_equal(sc.state, SMTP_STATE_GREETING);
    assert_non_null(strstr(sc.error, "malformed reply while receiving the initial server greeting: \"220 xxx"));
    assert_true(sc.bytes_in > SMTP_REPLY_MAX_LINE);
    assert_true(sc.bytes_in <= SMTP_REPLY_MAX_BYTES + READ_CHUNK);

    /* the byte budget alone: the reply-line cap off */
    t->to.reply_lines_burst = 0;
    session_run(t, f2->port, &sc);
    assert_int_equal(sc.status, SMTP_EPROTO);
    assert_int_equal(sc.state, SMTP_STATE_GREETING);
    assert_non_null(strstr(sc.error, "malformed reply while receiving the initial server greeting"));
    assert_true(sc.bytes_in > SMTP_REPLY_MAX_BYTES);
    assert_true(sc.bytes_in <= SMTP_REPLY_MAX_BYTES + READ_CHUNK);

    /* with the default cap (100 lines at once) the same lines end far
     * sooner, as a flood: the budget is what a slow trickle of long lines
     * meets, the cap what many lines meet */
    t->to.reply_lines_burst = SMTP_REPLY_LINES_BURST;
    session_run(t, f2->port, &sc);
    assert_int_equal(sc.status, SMTP_EPROTO);
    assert_int_equal(sc.state, SMTP_STATE_GREETING);
    assert_int_equal(strncmp(sc.error, "reply flood: ", 13), 0);
    assert_non_null(strstr(sc.error, " ms while receiving the initial server greeting"));
    assert_true(sc.bytes_in > 100 * 1000);
    assert_true(sc.bytes_in <= 101 * 1000 + READ_CHUNK);

    /* through an attempt with route penalties on: transient "protocol"
     * (here the flood, the default cap being on), and the next message
     * connects again (the server answered: it is no unreachable address) */
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    cfg.route_penalty_ms = 5000;
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    deliver_candidate_t c[] = { cand("mx1.fake.test", f2->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    capture_t cap;
    uint64_t downs = metrics_counter(MET_SMTP_ROUTES_DOWN);
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "protocol", 0, "");
    assert_int_equal(strncmp(cap.r[0].text, "reply flood: ", 13), 0);
    assert_int_equal(cap.attempts, 1);
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "protocol", 0, "");
    assert_int_equal(cap.attempts, 1);
    assert_int_equal(cap.connections, 1);
    assert_int_equal(metrics_counter(MET_SMTP_ROUTES_DOWN) - downs, 0);
    assert_string_equal(fake_server_transcript(f1), "");
    assert_string_equal(fake_server_transcript(f2), "");
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { f1, f2 };
    drain_and_check(t->loop, all, 2);
    free(noeol);
    free(lines);
}

/* ------------------------------------------------------------------ */
/* deadlines and the reply-line cap                                    */

/* One bare session with the given recipients and payload; how long it
 * took (ms) in *elapsed. */
static void session_run_msg(tctx_t *t, unsigned short port, const char *const *rcpts, size_t n, const char *data,
                            size_t len, sess_capture_t *cap, uint64_t *elapsed)
{
    deliver_candidate_t c = cand("mx1.fake.test", port);
    smtp_session_params_t p = {
        .helo_name = HELO_NAME,
        .tls = SMTP_TLS_NONE,
        .timeouts = t->to,
        .mx_host = c.host,
        .addr = (const struct sockaddr *)&c.addr,
        .addrlen = c.addrlen,
        .mail_from = FROM,
        .rcpts = rcpts,
        .nrcpts = n,
        .data = data,
        .len = len,
    };
    memset(cap, 0, sizeof(*cap));
    uint64_t t0 = util_mono_ms();
    smtp_session_start(t->loop, &p, on_sess, cap);
    run_until(t->loop, &cap->fired);
    *elapsed = util_mono_ms() - t0;
}

static void session_run_timed(tctx_t *t, unsigned short port, sess_capture_t *cap, uint64_t *elapsed)
{
    static const char *rcpts[] = { "b@y" };
    session_run_msg(t, port, rcpts, 1, PAYLOAD, strlen(PAYLOAD), cap, elapsed);
}

/* A greeting dripped one byte every 50 ms never lets the inactivity
 * timer fire; the greeting's deadline (300 ms from the connect) ends it,
 * a timeout like any other, counted and logged as a deadline. */
static void test_deadline_drip_greeting(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok, .drip_ms = 50 };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    sess_capture_t cap;
    uint64_t ms, deadlines = metrics_counter(MET_SMTP_DEADLINES);
    static char got[8192];
    logcapture_t lc;

    t->to.greeting_ms = 300;
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    session_run_timed(t, fs->port, &cap, &ms);
    logcapture_end(&lc, got, sizeof(got), test_log_level());
    assert_int_equal(cap.status, SMTP_ETIMEOUT);
    assert_int_equal(cap.state, SMTP_STATE_GREETING);
    assert_string_equal(cap.error, "timeout while receiving the initial server greeting");
    assert_true(ms >= 295);
    assert_true(ms < 400); /* not at the end of the 21 bytes (1 s), nor later */
    assert_true(cap.bytes_in >= 5 && cap.bytes_in <= 7); /* bytes at 0, 50, ... 300 ms */
    assert_int_equal(metrics_counter(MET_SMTP_DEADLINES) - deadlines, 1);
    char *line = strstr(got, "event=deadline");
    assert_non_null(line);
    *strchr(line, '\n') = '\0';
    assert_non_null(strstr(line, " kind=command state=GREETING elapsed_ms="));
    assert_non_null(strstr(line, " limit_ms=300 "));
    assert_string_equal(fake_server_transcript(fs), ""); /* no QUIT after a timeout */
    drain_and_check(t->loop, &fs, 1);
}

/* Slow but complete within its deadline: 21 bytes 10 ms apart (200 ms)
 * against 300 ms, and the message goes. A silent server still ends at
 * its timeout, and that is inactivity, not a deadline: not counted. */
static void test_deadline_slow_greeting_ok(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok, .drip_ms = 10,
                    .eod_reply = "250 2.0.0 Ok: queued\r\n" };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    fake_server_t *mute = fake_server_new(t->loop, &fakesmtp_script_silent);
    sess_capture_t cap;
    uint64_t ms, deadlines = metrics_counter(MET_SMTP_DEADLINES);

    t->to.greeting_ms = 300;
    session_run_timed(t, fs->port, &cap, &ms);
    assert_int_equal(cap.status, SMTP_OK);
    assert_string_equal(cap.error, "");
    assert_true(ms >= 190);
    assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=42\r\n"
                        "RCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD "QUIT\r\n");

    t->to.greeting_ms = 100;
    session_run_timed(t, mute->port, &cap, &ms);
    assert_int_equal(cap.status, SMTP_ETIMEOUT);
    assert_string_equal(cap.error, "timeout while receiving the initial server greeting");
    assert_true(ms >= 95 && ms < 200);
    assert_int_equal(metrics_counter(MET_SMTP_DEADLINES) - deadlines, 0);
    fake_server_t *all[] = { fs, mute };
    drain_and_check(t->loop, all, 2);
}

/* PIPELINING: every reply comes 100 ms after the one before, well inside
 * its own 200 ms (each reply's wait starts when the one before it
 * completed, so the batch as a whole may take far longer than one
 * deadline); the transaction deadline (350 ms from MAIL) is what ends it,
 * while the third RCPT reply is awaited. Without one the same server
 * delivers. */
static void test_deadline_transaction_pipelined(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok, .reply_delay_ms = 100,
                    .eod_reply = "250 2.0.0 Ok: queued\r\n" };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    static const char *rcpts[] = { "r1@y", "r2@y", "r3@y", "r4@y", "r5@y" };
    sess_capture_t cap;
    uint64_t ms, deadlines = metrics_counter(MET_SMTP_DEADLINES);

    t->to.mail_ms = t->to.rcpt_ms = t->to.data_init_ms = t->to.data_done_ms = 200;
    t->to.transaction_ms = 0;
    session_run_msg(t, fs->port, rcpts, 5, PAYLOAD, strlen(PAYLOAD), &cap, &ms);
    assert_int_equal(cap.status, SMTP_OK);
    assert_true(ms >= 900); /* EHLO, MAIL, 5 x RCPT, DATA, end of data: 100 ms each */
    assert_int_equal(metrics_counter(MET_SMTP_DEADLINES) - deadlines, 0);

    /* MAIL goes at ~100 ms (after EHLO); replies at 200, 300, 400 (RCPT 2), ... */
    t->to.transaction_ms = 350;
    session_run_msg(t, fs->port, rcpts, 5, PAYLOAD, strlen(PAYLOAD), &cap, &ms);
    assert_int_equal(cap.status, SMTP_ETIMEOUT);
    assert_int_equal(cap.state, SMTP_STATE_RCPT);
    assert_string_equal(cap.error, "transaction deadline exceeded while sending RCPT TO");
    assert_true(ms >= 445);
    assert_true(ms < 550);
    assert_int_equal(metrics_counter(MET_SMTP_DEADLINES) - deadlines, 1);

    /* through deliver: classified like any timeout */
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t dc;
    deliver_and_wait(t, &cfg, rcpts, 5, c, 1, &dc);
    assert_rcpt(&dc, 0, "r1@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(dc.r[0].text, "transaction deadline exceeded while sending RCPT TO");
    drain_and_check(t->loop, &fs, 1);
}

/* Continuation lines at 120 ms apart against a bucket of 2 lines plus 5
 * per second waited: lines 1-3 fit (the third at 240 ms has earned one),
 * the fourth at 360 ms finds still 3 allowed: a flood, a protocol error,
 * counted. */
static void test_reply_flood_rate(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .rules = fakesmtp_rules_ok, .flood_line = "220-still greeting\r\n", .flood_lines = 1,
                    .flood_ms = 120 };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    sess_capture_t cap;
    uint64_t ms, floods = metrics_counter(MET_SMTP_REPLY_FLOODS);
    unsigned lines = 0, took = 0;

    t->to.reply_lines_burst = 2;
    t->to.reply_lines_per_s = 5;
    session_run_timed(t, fs->port, &cap, &ms);
    assert_int_equal(cap.status, SMTP_EPROTO);
    assert_int_equal(cap.state, SMTP_STATE_GREETING);
    assert_int_equal(sscanf(cap.error, "reply flood: %u lines in %u ms while", &lines, &took), 2);
    assert_int_equal(lines, 4);
    assert_true(took >= 355 && took < 400);
    assert_non_null(strstr(cap.error, " ms while receiving the initial server greeting"));
    assert_int_equal(cap.bytes_in, 4 * strlen("220-still greeting\r\n"));
    assert_int_equal(metrics_counter(MET_SMTP_REPLY_FLOODS) - floods, 1);
    drain_and_check(t->loop, &fs, 1);
}

/* 200 EHLO continuation lines at once, then more every second: past the
 * default burst of 100 at once, the session ends at the first read, and
 * says no QUIT (the server is still talking). */
static void test_reply_flood_burst(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok, .flood_on = "EHLO",
                    .flood_line = "250-X\r\n", .flood_lines = 200, .flood_ms = 1000 };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    sess_capture_t cap;
    uint64_t ms, floods = metrics_counter(MET_SMTP_REPLY_FLOODS);
    unsigned lines = 0, took = 0;

    assert_int_equal(t->to.reply_lines_burst, SMTP_REPLY_LINES_BURST);
    session_run_timed(t, fs->port, &cap, &ms);
    assert_int_equal(cap.status, SMTP_EPROTO);
    assert_int_equal(cap.state, SMTP_STATE_EHLO);
    assert_int_equal(sscanf(cap.error, "reply flood: %u lines in %u ms while", &lines, &took), 2);
    assert_int_equal(lines, 200);
    assert_true(took < 100);
    assert_non_null(strstr(cap.error, " ms while sending EHLO"));
    assert_true(ms < 500);
    assert_string_equal(fake_server_transcript(fs), "EHLO " HELO_NAME "\r\n");
    assert_int_equal(metrics_counter(MET_SMTP_REPLY_FLOODS) - floods, 1);
    drain_and_check(t->loop, &fs, 1);
}

/* A body of 20 MB, five times what the client's socket buffer takes at
 * most (tcp_wmem 4 MB), to a server with a 64 KB receive buffer that
 * reads FAKE_TRICKLE_BYTES (512 KB) every 20 ms: the body takes more than
 * twice the data block timeout (250 ms; the client's writes move every
 * few ticks, when a third of its socket buffer is free) but keeps moving,
 * so it goes (inactivity, not a deadline). The same body to a server that
 * stops reading ends at the inactivity timeout, not counted as a
 * deadline; and a transaction deadline bounds the slow one. The EHLO
 * offers no SIZE. (Margins are wide: ASan and a busy machine slow the
 * fake server down.) */
static void test_deadline_body_inactivity(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", "250-fake.test\r\n250 PIPELINING\r\n", ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    script_t slow = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules,
                      .eod_reply = "250 2.0.0 Ok: queued\r\n", .body_trickle_ms = 20, .rcvbuf = 65536 };
    script_t stall = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules, .body_stall = 1,
                       .rcvbuf = 65536 };
    fake_server_t *f1 = fake_server_new(t->loop, &slow);
    fake_server_t *f2 = fake_server_new(t->loop, &stall);
    static const char *rcpts[] = { "b@y" };
    buf_t body = BUF_INIT;
    buf_puts(&body, "Subject: big\r\n\r\n");
    while (buf_size(&body) < 20u * 1024 * 1024)
        buf_puts(&body, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n");
    buf_puts(&body, ".\r\n");
    sess_capture_t cap;
    uint64_t ms, deadlines = metrics_counter(MET_SMTP_DEADLINES);

    t->to.data_block_ms = 250;
    t->to.transaction_ms = 0;
    session_run_msg(t, f1->port, rcpts, 1, buf_head(&body), buf_size(&body), &cap, &ms);
    assert_int_equal(cap.status, SMTP_OK);
    assert_true(ms > 500); /* the body alone took longer than 2 data block timeouts */
    assert_int_equal(f1->nmessages, 1);
    assert_int_equal(f1->body_bytes, buf_size(&body));

    session_run_msg(t, f2->port, rcpts, 1, buf_head(&body), buf_size(&body), &cap, &ms);
    assert_int_equal(cap.status, SMTP_ETIMEOUT);
    assert_int_equal(cap.state, SMTP_STATE_BODY);
    assert_string_equal(cap.error, "timeout while sending message body");
    assert_true(ms >= 250 && ms < 600);
    assert_int_equal(metrics_counter(MET_SMTP_DEADLINES) - deadlines, 0);

    t->to.transaction_ms = 300;
    session_run_msg(t, f1->port, rcpts, 1, buf_head(&body), buf_size(&body), &cap, &ms);
    assert_int_equal(cap.status, SMTP_ETIMEOUT);
    assert_int_equal(cap.state, SMTP_STATE_BODY);
    assert_string_equal(cap.error, "transaction deadline exceeded while sending message body");
    assert_true(ms >= 300 && ms < 450);
    assert_int_equal(metrics_counter(MET_SMTP_DEADLINES) - deadlines, 1);
    assert_int_equal(f1->nmessages, 1);
    buf_free(&body);
    fake_server_t *all[] = { f1, f2 };
    drain_and_check(t->loop, all, 2);
}

/* Out of descriptors: the connection is not made for want of ours, not
 * the server's fault: SMTP_ELOCAL, counted, transient network with the
 * local reason, and the address is not marked down. */
static void test_local_descriptors_exhausted(void **state)
{
    tctx_t *t = *state;
    script_t sc0 = { .greeting = "220 fake ESMTP\r\n", .rules = fakesmtp_rules_ok };
    fake_server_t *f = fake_server_new(t->loop, &sc0);
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    cfg.route_penalty_ms = 5000;
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    deliver_candidate_t c[] = { cand("mx1.fake.test", f->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    capture_t cap;
    uint64_t downs = metrics_counter(MET_SMTP_ROUTES_DOWN);
    uint64_t local = metrics_counter(MET_LOCAL_RESOURCE_ERRORS);
    /* no descriptor left for a socket: the limit at the next free one */
    int probe = dup(0);
    assert_true(probe >= 0);
    struct rlimit old, low;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = (rlim_t)probe;
    close(probe);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
    ctx_start(ctx, &q1, c, 1, &cap);
    run_until(t->loop, &cap.fired);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "network", 0, "");
    assert_non_null(strstr(cap.r[0].text, "Too many open files"));
    assert_int_equal(metrics_counter(MET_LOCAL_RESOURCE_ERRORS) - local, 1);
    assert_int_equal(metrics_counter(MET_SMTP_ROUTES_DOWN) - downs, 0);
    /* with descriptors again, the same address is tried at once */
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { f };
    drain_and_check(t->loop, all, 1);
}

/* EHLO with 5,000 extension lines (145 KB), among them "SIZE -1" and a
 * 21-digit SIZE: one reply within the byte budget, and within a line cap
 * raised to take it ([smtp] reply_lines_burst; the default 100 would call
 * it a flood); the absurd SIZEs are ignored (no limit, no SIZE=
 * parameter), PIPELINING is still seen, and the message goes. */
static void test_ehlo_5000_lines(void **state)
{
    tctx_t *t = *state;
    buf_t ehlo = BUF_INIT;
    buf_puts(&ehlo, "250-fake.test hello\r\n250-PIPELINING\r\n250-SIZE -1\r\n250-SIZE 123456789012345678901\r\n");
    for (int i = 4; i < 4999; i++)
        buf_printf(&ehlo, "250-X-VENDOR-%04d ARGUMENT=1\r\n", i);
    buf_puts(&ehlo, "250 8BITMIME\r\n");
    assert_true(buf_size(&ehlo) >= 145000);
    rule_t rules[] = {
        { "EHLO", buf_head(&ehlo), ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    /* replies held until DATA: only a pipelining client gets through */
    script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules, .hold_until_data = 1 };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    capture_t cap;

    t->to.mail_ms = 1000;
    t->to.reply_lines_burst = 5000;
    deliver_and_wait(t, &cfg, rcpts, 1, c, 1, &cap);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM ">\r\nRCPT TO:<b@y>\r\nDATA\r\n"
                        PAYLOAD "QUIT\r\n");
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.features.flags, SMTP_FEAT_PIPELINING | SMTP_FEAT_8BITMIME);
    assert_int_equal(cap.features.size_max, 0);
    drain_and_check(t->loop, &fs, 1);
    buf_free(&ehlo);
}

/* A server that answers fewer replies than pipelined commands: its 354
 * to DATA arrives where the RCPT reply belongs. The session drops the
 * connection at once (no QUIT, no body, no wait for the DATA timeout) as
 * a protocol error and never reuses it; lock-step, a 250 where DATA needs
 * 354 is the same. */
static void test_out_of_step_replies(void **state)
{
    tctx_t *t = *state;
    static const rule_t short_rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_SILENT }, /* taken, but never answered */
        { "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const rule_t go_ahead_rules[] = {
        { "EHLO", "250-fake.test\r\n250 8BITMIME\r\n", ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "250 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t s1 = { .greeting = "220 fake.test ESMTP\r\n", .rules = short_rules };
    static const script_t s2 = { .greeting = "220 fake.test ESMTP\r\n", .rules = go_ahead_rules };
    fake_server_t *f1 = fake_server_new(t->loop, &s1);
    fake_server_t *f2 = fake_server_new(t->loop, &s2);
    deliver_candidate_t c1[] = { cand("mx1.fake.test", f1->port) };
    deliver_candidate_t c2[] = { cand("mx2.fake.test", f2->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;

    for (int i = 0; i < 2; i++) {
        uint64_t t0 = util_mono_ms();
        ctx_deliver(ctx, t->loop, &q1, c1, 1, &cap);
        assert_true(util_mono_ms() - t0 < 2000); /* DATA's timeout is 5 s here */
        assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "protocol", 0, "");
        assert_string_equal(cap.r[0].text, "out-of-step reply to RCPT TO: 354 End data with <CR><LF>.<CR><LF>");
        assert_int_equal(cap.reused, 0); /* the second message gets a new connection */
        assert_int_equal(cap.connections, 1);
    }
    assert_int_equal(f1->naccepted, 2);
    assert_string_equal(fake_server_transcript(f1),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n"
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n");

    ctx_deliver(ctx, t->loop, &q1, c2, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "protocol", 0, "");
    assert_string_equal(cap.r[0].text, "out-of-step reply to DATA: 250 go ahead");
    assert_string_equal(fake_server_transcript(f2),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM ">\r\nRCPT TO:<b@y>\r\nDATA\r\n");
    deliver_ctx_free(ctx);
    fake_server_t *all[] = { f1, f2 };
    drain_and_check(t->loop, all, 2);
}

/* An address down after a greeting timeout: the attempt that finds every
 * address down says what made it down (a timeout, how long it waited),
 * tagged "timeout", not just that it is down. */
static void test_route_penalty_keeps_cause(void **state)
{
    tctx_t *t = *state;
    static const script_t silent = { .greeting = NULL, .rules = fakesmtp_rules_ok };
    fake_server_t *fs = fake_server_new(t->loop, &silent);
    deliver_candidate_t c[] = { cand("slow.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    creq_t q1 = { r1, 1, NULL, 0 };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    cfg.route_penalty_ms = 5000;
    t->to.greeting_ms = 200;
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    capture_t cap;
    char want[256];

    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(cap.r[0].text, "timeout while receiving the initial server greeting");
    ctx_deliver(ctx, t->loop, &q1, c, 1, &cap);
    assert_int_equal(cap.attempts, 0);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    snprintf(want, sizeof(want),
             "every MX address is down after recent failures (next try in 5 s): slow.fake.test [127.0.0.1|%u]: "
             "timeout while receiving the initial server greeting (after 0.2 s)",
             (unsigned)fs->port);
    assert_string_equal(cap.r[0].text, want);
    assert_int_equal(fs->naccepted, 1);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

static void test_tls_session_cache(void **state)
{
    tls_session_cache_t *c = tls_session_cache_new(2);
    SSL_CTX *ctx = fx.noverify_ctx;
    SSL *ssl = SSL_new(ctx);
    assert_null(tls_session_cache_get(c, "a"));
    /* a fresh SSL_SESSION has no ticket/id: not resumable, dropped on get */
    tls_session_cache_put(c, "a", SSL_SESSION_new());
    assert_int_equal(tls_session_cache_count(c), 1);
    assert_null(tls_session_cache_get(c, "a"));
    assert_int_equal(tls_session_cache_count(c), 0);
    tls_session_cache_put(c, "a", SSL_SESSION_new());
    tls_session_cache_put(c, "b", SSL_SESSION_new());
    tls_session_cache_put(c, "c", SSL_SESSION_new()); /* bounded: "a" goes */
    assert_int_equal(tls_session_cache_count(c), 2);
    tls_session_cache_put(c, "b", NULL);
    assert_int_equal(tls_session_cache_count(c), 1);
    SSL_free(ssl);
    tls_session_cache_free(c);
}


static void set_str(char **field, const char *v)
{
    free(*field);
    *field = strdup(v);
}

/* [smtp] keys -> deliver_config_t, in one function */
static void test_config_build(void **state)
{
    mp_config_t mc;
    deliver_config_t d;
    deliver_config_store_t st;
    char err[256];
    SSL_CTX *v = (SSL_CTX *)&mc, *nv = (SSL_CTX *)&d; /* not used: only passed on */

    config_defaults(&mc);
    mc.smtp_timeout_rcpt_ms = 1234;
    mc.smtp_timeout_quit_ms = 77;
    mc.smtp_timeout_scale = 10;
    mc.smtp_pool = 0;
    mc.smtp_pipelining = 0;
    mc.smtp_port = 2525;
    mc.smtp_max_mx = 3;
    mc.smtp_tls = MP_SMTP_TLS_REQUIRED;
    set_str(&mc.smtp_helo_name, "mx.sender.test");
    set_str(&mc.smtp_tls_policy, "a.test:verify, .b.test:none");
    set_str(&mc.smtp_relay, "127.0.0.1:2526");
    set_str(&mc.smtp_relay_user, "u");
    mc.smtp_relay_auth_unverified = 1; /* the cases below are about the translation */
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), 0);
    assert_int_equal(d.port, 2525);
    assert_string_equal(d.helo_name, "mx.sender.test");
    assert_int_equal(d.tls, SMTP_TLS_REQUIRED);
    assert_ptr_equal(d.tls_verify_ctx, v);
    assert_ptr_equal(d.tls_noverify_ctx, nv);
    assert_int_equal(d.max_mx, 3);
    assert_int_equal(d.timeout_scale_pct, 10);
    assert_ptr_equal(d.timeouts, &st.timeouts);
    assert_int_equal(st.timeouts.rcpt_ms, 1234);
    assert_int_equal(st.timeouts.quit_ms, 77);
    assert_int_equal(st.timeouts.mail_ms, 30000);      /* 300 s scaled to 10 % */
    assert_int_equal(st.timeouts.data_done_ms, 60000); /* 600 s */
    assert_int_equal(st.timeouts.connect_ms, 3000);
    assert_int_equal(st.timeouts.transaction_ms, 180000); /* 30 min scaled to 10 % */
    assert_int_equal(st.timeouts.reply_lines_burst, 100); /* lines are not scaled */
    assert_int_equal(st.timeouts.reply_lines_per_s, 10);
    assert_int_equal(d.max_rcpts, 100);
    assert_true(d.pool.disabled);
    assert_true(d.no_pipelining);
    assert_int_equal(d.pool.max_idle_ms, 5000);
    assert_int_equal(d.route_penalty_ms, 1000);
    assert_int_equal(d.route_penalty_max_ms, 300000);
    assert_non_null(d.routes);
    assert_ptr_equal(d.routes, st.routes);
    assert_string_equal(d.tls_policy_map, "a.test:verify, .b.test:none");
    assert_int_equal(d.nrelay, 1);
    assert_ptr_equal(d.relay, st.relay);
    assert_int_equal(ntohs(((struct sockaddr_in *)&st.relay[0].addr)->sin_port), 2526);
    assert_string_equal(st.relay[0].host, "127.0.0.1");
    assert_string_equal(d.auth_user, "u");
    deliver_config_store_free(&st);

    /* each named timeout key overrides its own state only */
    mc.smtp_timeout_rcpt_ms = 0;
    mc.smtp_timeout_quit_ms = 0;
    mc.smtp_timeout_scale = 100;
    mc.smtp_timeout_connect_ms = 1;
    mc.smtp_timeout_greeting_ms = 2;
    mc.smtp_timeout_helo_ms = 3;
    mc.smtp_timeout_starttls_ms = 4;
    mc.smtp_timeout_mail_ms = 5;
    mc.smtp_timeout_data_init_ms = 7;
    mc.smtp_timeout_data_block_ms = 8;
    mc.smtp_timeout_data_done_ms = 9;
    mc.smtp_timeout_rset_ms = 10;
    mc.smtp_timeout_transaction_ms = 11;
    mc.smtp_reply_lines_burst = 12;
    mc.smtp_reply_lines_per_s = 0;
    set_str(&mc.smtp_relay, "");
    set_str(&mc.smtp_helo_name, "");
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), 0);
    smtp_timeouts_t want = { .connect_ms = 1, .greeting_ms = 2, .helo_ms = 3, .starttls_ms = 4,
                             .mail_ms = 5, .rcpt_ms = 300000, .data_init_ms = 7, .data_block_ms = 8,
                             .data_done_ms = 9, .rset_ms = 10, .quit_ms = 10000, .transaction_ms = 11,
                             .reply_lines_burst = 12, .reply_lines_per_s = 0 };
    assert_memory_equal(&st.timeouts, &want, sizeof(want));
    assert_int_equal(d.nrelay, 0);
    assert_null(d.relay);
    assert_true(d.helo_name[0] != '\0'); /* this host's name */
    deliver_config_store_free(&st);

    mc.smtp_tls = MP_SMTP_TLS_NONE; /* AUTH would go in the clear */
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "relay_user"));
    deliver_config_store_free(&st);
    mc.smtp_tls = MP_SMTP_TLS_VERIFY;
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), 0);
    assert_int_equal(d.tls, SMTP_TLS_VERIFY);
    deliver_config_store_free(&st);
    mc.smtp_tls = MP_SMTP_TLS_OPPORTUNISTIC;
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), 0);
    assert_int_equal(d.tls, SMTP_TLS_OPPORTUNISTIC);
    deliver_config_store_free(&st);
    set_str(&mc.smtp_tls_policy, "a.test:sometimes");
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "a.test:sometimes"));
    deliver_config_store_free(&st);

    /* the relay password goes only to a verified relay unless opted out */
    mc.smtp_relay_auth_unverified = 0;
    static const char refused[] = "[smtp] relay_user needs tls = verify (and no tls_policy entry other than "
                                  "verify): the password goes only to a relay whose certificate and name are "
                                  "checked; set relay_auth_unverified = 1 to send it without that check";
    set_str(&mc.smtp_tls_policy, "");
    const mp_smtp_tls_t weak[] = { MP_SMTP_TLS_OPPORTUNISTIC, MP_SMTP_TLS_REQUIRED };
    for (size_t i = 0; i < 2; i++) {
        mc.smtp_tls = weak[i];
        assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), -1);
        assert_string_equal(err, refused);
        deliver_config_store_free(&st);
    }
    mc.smtp_tls = MP_SMTP_TLS_VERIFY;
    set_str(&mc.smtp_tls_policy, "a.test:verify, .b.test:required");
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), -1);
    assert_string_equal(err, refused);
    deliver_config_store_free(&st);
    set_str(&mc.smtp_tls_policy, "a.test:verify");
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), 0);
    assert_string_equal(d.auth_user, "u");
    deliver_config_store_free(&st);
    /* an entry from tls_policy_file counts as much as an inline one */
    char pf[] = "/tmp/mp-test-tlspolicy-XXXXXX";
    int pfd = mkstemp(pf);
    assert_true(pfd >= 0);
    static const char lines[] = "# more entries\nlegacy.test:opportunistic\n";
    assert_int_equal(write(pfd, lines, sizeof(lines) - 1), (ssize_t)(sizeof(lines) - 1));
    close(pfd);
    set_str(&mc.smtp_tls_policy_file, pf);
    assert_int_equal(deliver_config_build(&d, &mc, v, nv, &st, err, sizeof(err)), -1);
    assert_string_equal(err, refused);
    deliver_config_store_free(&st);
    unlink(pf);
    set_str(&mc.smtp_tls_policy_file, "");
    config_free(&mc);
}

/* ---- pure pieces ---------------------------------------------------- */

static void test_features(void **state)
{
    static const char *lines[] = {
        "PIPELINING", "size 35882577", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING",
        "STARTTLS", "AUTH PLAIN LOGIN", "AUTH=LOGIN", "DSN", "VRFY", "ETRN",
    };
    smtp_features_t f;
    memset(&f, 0, sizeof(f));
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++)
        smtp_features_parse_line(&f, lines[i], strlen(lines[i]));
    assert_int_equal(f.flags, SMTP_FEAT_PIPELINING | SMTP_FEAT_SIZE | SMTP_FEAT_8BITMIME | SMTP_FEAT_SMTPUTF8 |
                                  SMTP_FEAT_ENHANCEDSTATUSCODES | SMTP_FEAT_CHUNKING | SMTP_FEAT_STARTTLS |
                                  SMTP_FEAT_AUTH);
    assert_int_equal(f.size_max, 35882577);
    assert_string_equal(f.auth, "PLAIN LOGIN LOGIN");

    memset(&f, 0, sizeof(f));
    smtp_features_parse_line(&f, "SIZE", 4);
    smtp_features_parse_line(&f, "STARTTLSX", 9);
    smtp_features_parse_line(&f, "PIPELININGfoo", 10); /* len cuts it to "PIPELINING" */
    assert_int_equal(f.flags, SMTP_FEAT_SIZE | SMTP_FEAT_PIPELINING);
    assert_int_equal(f.size_max, 0);

    /* a SIZE that is negative, not a number or does not fit is ignored */
    static const char *absurd[] = { "SIZE -1", "SIZE 123456789012345678901", "SIZE 12abc", "SIZE 1e9",
                                    "SIZE 18446744073709551616" };
    for (size_t i = 0; i < sizeof(absurd) / sizeof(absurd[0]); i++) {
        memset(&f, 0, sizeof(f));
        smtp_features_parse_line(&f, absurd[i], strlen(absurd[i]));
        assert_int_equal(f.flags, 0);
        assert_int_equal(f.size_max, 0);
    }
    /* and does not undo a sane one before it */
    memset(&f, 0, sizeof(f));
    smtp_features_parse_line(&f, "SIZE 10240000", 13);
    smtp_features_parse_line(&f, "SIZE -1", 7);
    assert_int_equal(f.flags, SMTP_FEAT_SIZE);
    assert_int_equal(f.size_max, 10240000);
    smtp_features_parse_line(&f, "SIZE 18446744073709551615", 25);
    assert_int_equal(f.size_max, SIZE_MAX);
}

static void test_strstate_and_timeouts(void **state)
{
    assert_string_equal(smtp_strstate(SMTP_STATE_CONNECT), "CONNECT");
    assert_string_equal(smtp_strstate(SMTP_STATE_EHLO_TLS), "EHLO_TLS");
    assert_string_equal(smtp_strstate(SMTP_STATE_DONE), "DONE");
    assert_string_equal(smtp_strstate(SMTP_STATE_LAST), "?");
    assert_string_equal(smtp_strerror(SMTP_ETLS), "TLS failure");
    assert_string_equal(smtp_strerror(-99), "unknown smtp status");

    smtp_timeouts_t to;
    smtp_timeouts_default(&to, 0);
    assert_int_equal(to.connect_ms, 30000);
    assert_int_equal(to.greeting_ms, 300000);
    assert_int_equal(to.mail_ms, 300000);
    assert_int_equal(to.rcpt_ms, 300000);
    assert_int_equal(to.data_init_ms, 120000);
    assert_int_equal(to.data_block_ms, 180000);
    assert_int_equal(to.data_done_ms, 600000);
    assert_int_equal(to.transaction_ms, 1800000);
    assert_int_equal(to.reply_lines_burst, 100);
    assert_int_equal(to.reply_lines_per_s, 10);
    smtp_timeouts_default(&to, 1);
    assert_int_equal(to.connect_ms, 300);
    assert_int_equal(to.data_done_ms, 6000);
    assert_int_equal(to.transaction_ms, 18000);
    assert_int_equal(to.reply_lines_burst, 100);
    assert_int_equal(to.reply_lines_per_s, 10);
}

typedef struct classify_case {
    int         code;
    const char *enh;
    const char *text;
    outcome_t   outcome;
    const char *tag;
} classify_case_t;

static void test_outcome_table(void **state)
{
    static const classify_case_t cases[] = {
        { 250, "2.0.0", "Ok: queued", OUTCOME_DELIVERED, "delivered" },
        { 251, "", "will forward", OUTCOME_DELIVERED, "delivered" },
        { 550, "5.1.1", "User unknown", OUTCOME_PERMANENT, "no_such_user" },
        { 550, "5.1.10", "null MX", OUTCOME_PERMANENT, "no_such_user" },
        { 552, "5.2.2", "Mailbox full", OUTCOME_PERMANENT, "mailbox_full" },
        { 452, "4.2.2", "Mailbox full", OUTCOME_TRANSIENT, "mailbox_full" },
        { 451, "4.7.1", "Greylisted, see http://postgrey", OUTCOME_TRANSIENT, "greylisted" },
        { 450, "4.2.0", "Recipient address rejected: Greylisted", OUTCOME_TRANSIENT, "greylisted" },
        { 450, "4.7.1", "Client host rejected", OUTCOME_TRANSIENT, "policy" },
        { 554, "5.7.1", "Relay access denied", OUTCOME_PERMANENT, "policy" },
        { 552, "5.3.4", "Message size exceeds fixed limit", OUTCOME_PERMANENT, "message_too_big" },
        { 554, "5.7.0", "Message rejected as spam", OUTCOME_PERMANENT, "spam" },
        { 550, "5.7.1", "SPAM detected", OUTCOME_PERMANENT, "spam" },
        { 421, "4.7.0", "Too many connections, rate limited", OUTCOME_TRANSIENT, "rate_limited" },
        { 421, "", "Rate limit exceeded", OUTCOME_TRANSIENT, "rate_limited" },
        { 451, "4.7.0", "Throttled, slow down", OUTCOME_TRANSIENT, "rate_limited" },
        { 421, "4.3.2", "Service shutting down", OUTCOME_TRANSIENT, "other" },
        { 450, "4.2.0", "try again later", OUTCOME_TRANSIENT, "other" },
        { 554, "", "Transaction failed", OUTCOME_PERMANENT, "other" },
        { 550, NULL, NULL, OUTCOME_PERMANENT, "other" },
        { 354, "", "go ahead", OUTCOME_TRANSIENT, "protocol" },
        { 0, "", "", OUTCOME_TRANSIENT, "protocol" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        outcome_reason_t tag = OUTCOME_R_LAST;
        outcome_t o = outcome_classify(cases[i].code, cases[i].enh, cases[i].text, &tag);
        print_message("case %d %s %s\n", cases[i].code, cases[i].enh ? cases[i].enh : "-",
                      cases[i].text ? cases[i].text : "-");
        assert_string_equal(outcome_name(o), outcome_name(cases[i].outcome));
        assert_string_equal(outcome_reason_name(tag), cases[i].tag);
    }
    static const char *kinds[] = { "network", "timeout", "tls", "dns", "protocol" };
    for (int k = 0; k < OUTCOME_ERR_LAST; k++) {
        outcome_reason_t tag = OUTCOME_R_LAST;
        assert_int_equal(outcome_for_error(k, &tag), OUTCOME_TRANSIENT);
        assert_string_equal(outcome_reason_name(tag), kinds[k]);
    }
    assert_string_equal(outcome_name(OUTCOME_DELIVERED), "delivered");
    assert_string_equal(outcome_name(OUTCOME_TRANSIENT), "transient");
    assert_string_equal(outcome_name(OUTCOME_PERMANENT), "permanent");
}

static void test_candidates_from_mx(void **state)
{
    struct sockaddr_storage a[3];
    memset(a, 0, sizeof(a));
    for (int i = 0; i < 3; i++) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&a[i];
        sin->sin_family = AF_INET;
        sin->sin_addr.s_addr = htonl(0x7f000002u + (unsigned)i);
    }
    dns_mx_host_t hosts[] = {
        { "mx1.example", 10, &a[0], 2 },
        { "mx2.example", 20, &a[2], 1 },
    };
    dns_mx_result_t mx = { .status = DNS_OK, .hosts = hosts, .nhosts = 2 };
    size_t n = 0;
    deliver_candidate_t *c = deliver_candidates_from_mx(&mx, 0, &n);
    assert_int_equal(n, 3);
    assert_string_equal(c[0].host, "mx1.example");
    assert_string_equal(c[1].host, "mx1.example");
    assert_string_equal(c[2].host, "mx2.example");
    assert_int_equal(c[2].pref, 20);
    assert_int_equal(c[1].addrlen, sizeof(struct sockaddr_in));
    assert_memory_equal(&c[1].addr, &a[1], sizeof(struct sockaddr_in));
    free(c);

    c = deliver_candidates_from_mx(&mx, 1, &n);
    assert_int_equal(n, 2);
    free(c);

    mx.status = DNS_TEMPFAIL;
    assert_null(deliver_candidates_from_mx(&mx, 5, &n));
    assert_int_equal(n, 0);
}

/* ------------------------------------------------------------------ */
/* the payload: sent from the caller's memory                          */

/* A message of about 1 MB with many lines that start with a dot, sent as
 * mime_wire_segments() frames it (pointers into the message, never a
 * copy): the server reads exactly the dot-stuffed bytes, and SIZE= is the
 * message's size. Plaintext and STARTTLS. */
static void body_segments(tctx_t *t, int tls)
{
    buf_t msg = BUF_INIT, stuffed = BUF_INIT;
    buf_puts(&msg, "Subject: segments\r\n\r\n");
    for (unsigned i = 0; buf_size(&msg) < (1u << 20); i++)
        buf_printf(&msg, i % 3 == 0 ? ".line %u starts with a dot\r\n" : "line %u of the body text\r\n", i);
    mime_seg_t *segs = NULL;
    size_t nsegs = 0;
    assert_int_equal(mime_wire_segments(buf_head(&msg), buf_size(&msg), &segs, &nsegs), MIME_OK);
    assert_true(nsegs > 10000);
    mime_dotstuff(buf_head(&msg), buf_size(&msg), &stuffed);

    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = tls ? rules_tls : fakesmtp_rules_ok,
                    .tls = fx.server_ctx };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx.test.local", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, tls ? SMTP_TLS_VERIFY : SMTP_TLS_NONE);
    deliver_request_t req = { .mail_from = FROM, .rcpts = rcpts, .nrcpts = 1, .segs = segs, .nsegs = nsegs,
                              .candidates = c, .ncandidates = 1 };
    capture_t cap;
    deliver_req_and_wait(t, &cfg, &req, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls, tls);

    buf_t want = BUF_INIT;
    buf_printf(&want, "EHLO " HELO_NAME "\r\n%sMAIL FROM:<" FROM "> SIZE=%zu\r\nRCPT TO:<b@y>\r\nDATA\r\n",
               tls ? "STARTTLS\r\nEHLO " HELO_NAME "\r\n" : "", buf_size(&stuffed));
    buf_append(&want, buf_head(&stuffed), buf_size(&stuffed));
    buf_puts(&want, "QUIT\r\n");
    assert_int_equal(buf_size(&fs->transcript), buf_size(&want));
    assert_memory_equal(buf_head(&fs->transcript), buf_head(&want), buf_size(&want));
    drain_and_check(t->loop, &fs, 1);
    buf_free(&want);
    buf_free(&stuffed);
    buf_free(&msg);
    free(segs);
}

static void test_body_segments_plain(void **state)
{
    body_segments(*state, 0);
}

static void test_body_segments_starttls(void **state)
{
    body_segments(*state, 1);
}

/* The server answers (552) before it has read the body. The rest of the
 * body cannot be followed by commands (they would be read as body), so
 * the connection is closed at once, and nothing of the caller's payload
 * is read after the result: overwritten then, it never shows up on the
 * wire. */
static void test_early_reply_closes(void **state)
{
    tctx_t *t = *state;
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                 .early_reply = "552 5.3.4 Message size exceeds fixed limit\r\n" };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    size_t n = 8u << 20;
    char *payload = malloc(n);
    assert_non_null(payload);
    memset(payload, 'a', n);
    memcpy(payload + n - 5, "\r\n.\r\n", 5);
    deliver_request_t req = { .mail_from = FROM, .rcpts = rcpts, .nrcpts = 1, .data = payload, .len = n,
                              .candidates = c, .ncandidates = 1 };
    capture_t cap;
    memset(&cap, 0, sizeof(cap));
    /* a client that said QUIT after the partial body would wait for a
     * 221 that cannot come (the server reads it as body): 30 s here */
    t->to.quit_ms = t->to.data_block_ms = t->to.data_done_ms = 30000;
    deliver_t *d = deliver_start(t->loop, &cfg, &req, on_result, &cap);
    assert_non_null(d);
    uint64_t until = util_mono_ms() + 10000;
    while (!cap.fired && util_mono_ms() < until)
        loop_run_once(t->loop, 50);
    assert_int_equal(cap.fired, 1); /* at once, not after a QUIT timeout */
    assert_rcpt(&cap, 0, "b@y", OUTCOME_PERMANENT, "message_too_big", 552, "5.3.4");
    assert_int_equal(fs->early_replied, 1);

    memset(payload, 'X', n); /* the owner reuses its memory */
    fake_conn_t *fc = &fs->conns[0];
    assert_non_null(fc->st);
    stream_pause_read(fc->st, 0);
    for (int i = 0; i < 200 && fc->st != NULL; i++)
        loop_run_once(t->loop, 10);
    assert_null(fc->st); /* the client hung up */
    assert_null(memchr(buf_head(&fs->transcript), 'X', buf_size(&fs->transcript)));
    assert_null(strstr(buf_head(&fs->transcript), "QUIT"));
    drain_and_check(t->loop, &fs, 1);
    free(payload);
}

/* ------------------------------------------------------------------ */
/* throwaway PKI                                                       */

/* ---- hold before the body (request.before_body) -------------------- */

#define HOLD_MAX 4

typedef struct hold_rec {
    int        calls;
    deliver_t *d;
    uint64_t   hold[HOLD_MAX];
    size_t     n[HOLD_MAX];
    char       acc[HOLD_MAX][4][16];
    int        resume_inside; /* resume from inside the hook */
    int        abort_inside;  /* abandon the transaction from inside the hook */
    const char *const *rcpts; /* the request's, to name the positions the hook gets */
    int        txns;          /* after_txn calls */
    size_t     txn_idx[4];    /* the last one's recipients and states */
    deliver_txn_state_t txn_st[4];
    size_t     txn_n;
} hold_rec_t;

static void on_hold(void *arg, deliver_t *d, uint64_t hold, const size_t *accepted, size_t n)
{
    hold_rec_t *h = arg;
    assert_true(h->calls < HOLD_MAX);
    assert_true(n >= 1 && n <= 4);
    assert_true(hold != 0);
    h->d = d;
    h->hold[h->calls] = hold;
    h->n[h->calls] = n;
    for (size_t i = 0; i < n; i++)
        snprintf(h->acc[h->calls][i], sizeof(h->acc[h->calls][i]), "%s", h->rcpts[accepted[i]]);
    h->calls++;
    if (h->resume_inside)
        deliver_resume(d, hold);
    if (h->abort_inside)
        deliver_abort(d, hold, "given up by the owner");
}

static void on_txn(void *arg, deliver_t *d, const size_t *accepted, const deliver_txn_state_t *st, size_t n)
{
    hold_rec_t *h = arg;
    assert_true(n >= 1 && n <= 4);
    h->txns++;
    h->txn_n = n;
    for (size_t i = 0; i < n; i++) {
        h->txn_idx[i] = accepted[i];
        h->txn_st[i] = st[i];
    }
}

/* Like run_until(), but fails within ms instead of spinning on. */
static void run_until_within(loop_t *loop, const int *flag, unsigned ms)
{
    uint64_t until = util_mono_ms() + ms;
    while (!*flag && util_mono_ms() < until)
        assert_true(loop_run_once(loop, 10) >= 0);
    assert_true(*flag);
}

/* The payload without its final ".\r\n": what a held transaction sends. */
#define PAYLOAD_HELD "Subject: test\r\n\r\nhello\r\n..leading dot\r\n"

/* A held transaction: its body arrived, all but the final dot (the
 * transcript ends with it), so the server has no message from it. */
static void assert_dot_held(loop_t *loop, fake_server_t *fs)
{
    size_t want = strlen(PAYLOAD_HELD), have = 0;
    for (uint64_t until = util_mono_ms() + 2000; util_mono_ms() < until;) {
        have = 0;
        for (size_t i = 0; i < FAKE_MAX_CONNS; i++)
            have += buf_size(&fs->conns[i].body);
        if (have >= want)
            break;
        assert_true(loop_run_once(loop, 10) >= 0);
    }
    spin(loop, 3);
    have = 0;
    for (size_t i = 0; i < FAKE_MAX_CONNS; i++)
        have += buf_size(&fs->conns[i].body);
    assert_int_equal(have, want);
    const char *tr = fake_server_transcript(fs);
    size_t n = strlen(tr);
    assert_true(n >= want + 6);
    assert_string_equal(tr + n - want - 6, "DATA\r\n" PAYLOAD_HELD);
}

static deliver_request_t hold_req(const char *const *rcpts, size_t n, const deliver_candidate_t *c, size_t nc,
                                  hold_rec_t *h)
{
    deliver_request_t req = {
        .mail_from = FROM,
        .rcpts = rcpts,
        .nrcpts = n,
        .data = PAYLOAD,
        .len = strlen(PAYLOAD),
        .message_size = MSG_SIZE,
        .candidates = c,
        .ncandidates = nc,
        .log_id = "test-msg-hold",
        .before_body = h ? on_hold : NULL,
        .after_txn = h ? on_txn : NULL,
        .before_body_arg = h,
    };
    if (h)
        h->rcpts = rcpts;
    return req;
}

/* Pipelined envelope as before (the server holds MAIL/RCPT replies until
 * DATA); after the 354 the hook gets exactly the accepted recipients and
 * the body waits for deliver_resume(); a stale hold id does nothing.
 * Then the same exchange without a hook: the very same transcript. */
static void test_hold_before_body(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<c@y>", "550 5.1.1 <c@y>: User unknown\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules, .hold_until_data = 1,
                                 .eod_reply = "250 2.0.0 Ok: queued as H1\r\n" };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    fake_server_t *plain = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    deliver_candidate_t c2[] = { cand("mx1.fake.test", plain->port) };
    const char *rcpts[] = { "b@y", "c@y", "d@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    hold_rec_t h = { 0 };
    capture_t cap = { 0 };

    t->to.mail_ms = 1000; /* a lock-step client would time out: pipelining stays */
    deliver_request_t req = hold_req(rcpts, 3, c, 1, &h);
    deliver_t *d = deliver_start(t->loop, &cfg, &req, on_result, &cap);
    run_until_within(t->loop, &h.calls, 5000);
    assert_ptr_equal(h.d, d);
    assert_int_equal(h.calls, 1);
    assert_int_equal(h.n[0], 2);
    assert_string_equal(h.acc[0][0], "b@y");
    assert_string_equal(h.acc[0][1], "d@y");
    spin_ms(t->loop, 200);
    assert_int_equal(cap.fired, 0);
    assert_int_equal(h.calls, 1);
    assert_dot_held(t->loop, fs);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                        "RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nRCPT TO:<d@y>\r\nDATA\r\n" PAYLOAD_HELD);
    deliver_resume(d, h.hold[0] + 1); /* not this transaction's hold */
    spin_ms(t->loop, 50);
    assert_dot_held(t->loop, fs);
    assert_int_equal(fs->nmessages, 0);
    deliver_resume(d, h.hold[0]);
    run_until(t->loop, &cap.fired);
    assert_int_equal(h.calls, 1);
    const char *want = TRANSCRIPT_OK("RCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nRCPT TO:<d@y>\r\n");
    assert_string_equal(fake_server_transcript(fs), want);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap, 1, "c@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 2, "d@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(fs->nmessages, 1);

    /* no hook: the body follows the 354, byte for byte the same exchange */
    req = hold_req(rcpts, 3, c2, 1, NULL);
    deliver_req_and_wait(t, &cfg, &req, &cap);
    assert_string_equal(fake_server_transcript(plain), want);
    assert_rcpt(&cap, 1, "c@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    fake_server_t *all[] = { fs, plain };
    drain_and_check(t->loop, all, 2);
}

/* Split recipients: one hold per transaction on the same connection, each
 * with its own accepted recipients, each body only after its resume.
 * Pipelined with later resumes, then lock-step resuming from inside the
 * hook (no wait at all). */
static void test_hold_per_transaction(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules[] = {
        { "EHLO", EHLO_PLAIN, ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<r2@y>", "550 5.1.1 <r2@y>: User unknown\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules };
    const char *rcpts[] = { "r1@y", "r2@y", "r3@y", "r4@y", "r5@y" };
#define ENV "MAIL FROM:<" FROM "> SIZE=38\r\n"
    const char *want = "EHLO " HELO_NAME "\r\n"
                       ENV "RCPT TO:<r1@y>\r\nRCPT TO:<r2@y>\r\nDATA\r\n" PAYLOAD
                       ENV "RCPT TO:<r3@y>\r\nRCPT TO:<r4@y>\r\nDATA\r\n" PAYLOAD
                       ENV "RCPT TO:<r5@y>\r\nDATA\r\n" PAYLOAD "QUIT\r\n";
#undef ENV
    for (int inside = 0; inside < 2; inside++) {
        fake_server_t *fs = fake_server_new(t->loop, &sc);
        deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
        deliver_config_t cfg = config(t, SMTP_TLS_NONE);
        hold_rec_t h = { .resume_inside = inside };
        capture_t cap = { 0 };
        cfg.max_rcpts = 2;
        cfg.no_pipelining = inside;
        deliver_request_t req = hold_req(rcpts, 5, c, 1, &h);
        deliver_t *d = deliver_start(t->loop, &cfg, &req, on_result, &cap);
        int resumed = 0;
        for (uint64_t until = util_mono_ms() + 5000; !cap.fired && util_mono_ms() < until;) {
            assert_true(loop_run_once(t->loop, 10) >= 0);
            if (!inside && h.calls > resumed) {
                /* held: this transaction's body has not started */
                assert_int_equal(fs->nmessages, resumed);
                assert_dot_held(t->loop, fs);
                assert_int_equal(fs->nmessages, resumed);
                deliver_resume(d, h.hold[resumed]);
                resumed++;
            }
        }
        assert_true(cap.fired);
        assert_string_equal(fake_server_transcript(fs), want);
        assert_int_equal(h.calls, 3);
        assert_int_equal(cap.transactions, 3);
        assert_int_equal(h.n[0], 1);
        assert_string_equal(h.acc[0][0], "r1@y");
        assert_int_equal(h.n[1], 2);
        assert_string_equal(h.acc[1][0], "r3@y");
        assert_string_equal(h.acc[1][1], "r4@y");
        assert_int_equal(h.n[2], 1);
        assert_string_equal(h.acc[2][0], "r5@y");
        assert_true(h.hold[0] != h.hold[1] && h.hold[1] != h.hold[2]);
        assert_rcpt(&cap, 0, "r1@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
        assert_rcpt(&cap, 1, "r2@y", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
        for (size_t i = 2; i < 5; i++)
            assert_rcpt(&cap, i, rcpts[i], OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
        drain_and_check(t->loop, &fs, 1);
    }
}

/* A held session still obeys its timeout: never resumed, it times out
 * without a byte of the body, and the attempt fails over to the next MX,
 * whose transaction holds (and is resumed) on its own. The late resume of
 * the first hold does nothing. */
static void test_hold_timeout_fails_over(void **state)
{
    tctx_t *t = *state;
    fake_server_t *s1 = fake_server_new(t->loop, &fakesmtp_script_ok);
    fake_server_t *s2 = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    hold_rec_t h = { 0 };
    capture_t cap = { 0 };

    t->to.data_block_ms = 300;
    deliver_request_t req = hold_req(rcpts, 1, c, 2, &h);
    deliver_t *d = deliver_start(t->loop, &cfg, &req, on_result, &cap);
    run_until_within(t->loop, &h.calls, 5000);
    assert_dot_held(t->loop, s1);
    int two = 0;
    for (uint64_t until = util_mono_ms() + 5000; !two && util_mono_ms() < until;) {
        assert_true(loop_run_once(t->loop, 10) >= 0);
        two = h.calls == 2;
    }
    assert_true(two);
    assert_int_equal(cap.fired, 0);
    assert_string_equal(fake_server_transcript(s1),
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n"
                        "RCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD_HELD);
    assert_int_equal(s1->nmessages, 0);
    assert_int_equal(h.n[1], 1);
    assert_string_equal(h.acc[1][0], "b@y");
    deliver_resume(d, h.hold[0]); /* the first hold is over */
    assert_dot_held(t->loop, s2);
    deliver_resume(d, h.hold[1]);
    run_until(t->loop, &cap.fired);
    assert_string_equal(fake_server_transcript(s2), TRANSCRIPT_OK("RCPT TO:<b@y>\r\n"));
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.r[0].maybe_sent, 0); /* the held transaction never sent its dot */
    assert_string_equal(cap.mx_host, "mx2.fake.test");
    assert_int_equal(cap.attempts, 2);
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

/* Abandoned while held (from inside the hook, then later): the body went
 * but never its dot, so the server has no message; the attempt ends
 * there (the second MX is never tried), the recipient transient with the
 * owner's words, after_txn saying not sent. */
static void test_hold_abort(void **state)
{
    tctx_t *t = *state;
    fake_server_t *s1 = fake_server_new(t->loop, &fakesmtp_script_ok);
    fake_server_t *s2 = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", s1->port), cand("mx2.fake.test", s2->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    for (int inside = 1; inside >= 0; inside--) {
        hold_rec_t h = { .abort_inside = inside };
        capture_t cap = { 0 };
        deliver_request_t req = hold_req(rcpts, 2, c, 2, &h);
        deliver_t *d = deliver_start(t->loop, &cfg, &req, on_result, &cap);
        run_until_within(t->loop, &h.calls, 5000);
        if (!inside) {
            assert_dot_held(t->loop, s1);
            deliver_abort(d, h.hold[0] + 1, "stale"); /* not this hold: nothing */
            spin(t->loop, 3);
            assert_int_equal(cap.fired, 0);
            deliver_abort(d, h.hold[0], "given up by the owner");
        }
        run_until(t->loop, &cap.fired);
        assert_int_equal(s1->nmessages, 0);
        assert_int_equal(s2->naccepted, 0);
        assert_int_equal(cap.attempts, 1);
        for (size_t i = 0; i < 2; i++) {
            assert_string_equal(outcome_name(cap.r[i].outcome), outcome_name(OUTCOME_TRANSIENT));
            assert_int_equal(cap.r[i].code, 0);
            assert_string_equal(cap.r[i].text, "given up by the owner");
            assert_int_equal(cap.r[i].maybe_sent, 0);
        }
        assert_int_equal(h.txns, 1);
        assert_int_equal(h.txn_n, 2);
        assert_int_equal(h.txn_idx[0], 0);
        assert_int_equal(h.txn_idx[1], 1);
        assert_int_equal(h.txn_st[0], DELIVER_TXN_NOT_SENT);
        assert_int_equal(h.txn_st[1], DELIVER_TXN_NOT_SENT);
    }
    const char *tr = fake_server_transcript(s1);
    assert_string_equal(tr + strlen(tr) - strlen("DATA\r\n" PAYLOAD_HELD), "DATA\r\n" PAYLOAD_HELD);
    fake_server_t *all[] = { s1, s2 };
    drain_and_check(t->loop, all, 2);
}

/* after_txn of a delivered transaction and of one cut after its dot. */
static void test_hold_after_txn_states(void **state)
{
    tctx_t *t = *state;
    static const script_t cut = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok, .eod_close = 1 };
    fake_server_t *ok = fake_server_new(t->loop, &fakesmtp_script_ok);
    fake_server_t *cs = fake_server_new(t->loop, &cut);
    deliver_candidate_t c1[] = { cand("mx1.fake.test", ok->port) };
    deliver_candidate_t c2[] = { cand("mx1.fake.test", cs->port) };
    const char *rcpts[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    hold_rec_t h = { .resume_inside = 1 };
    capture_t cap = { 0 };
    deliver_request_t req = hold_req(rcpts, 1, c1, 1, &h);
    deliver_req_and_wait(t, &cfg, &req, &cap);
    assert_int_equal(h.txns, 1);
    assert_int_equal(h.txn_st[0], DELIVER_TXN_DELIVERED);
    hold_rec_t h2 = { .resume_inside = 1 };
    capture_t cap2 = { 0 };
    req = hold_req(rcpts, 1, c2, 1, &h2);
    deliver_req_and_wait(t, &cfg, &req, &cap2);
    assert_int_equal(h2.txns, 1);
    assert_int_equal(h2.txn_st[0], DELIVER_TXN_MAYBE_SENT);
    assert_int_equal(cap2.r[0].maybe_sent, 1);
    fake_server_t *all[] = { ok, cs };
    drain_and_check(t->loop, all, 2);
}

/* Cancelled while held: no callback, no final dot, nothing left in the loop
 * (and nothing leaked, under ASan): one-shot, then on a pooled context. */
static void test_hold_cancel(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *rcpts[] = { "b@y", "c@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    hold_rec_t h = { 0 };

    deliver_request_t req = hold_req(rcpts, 2, c, 1, &h);
    deliver_t *d = deliver_start(t->loop, &cfg, &req, never_called, NULL);
    run_until_within(t->loop, &h.calls, 5000);
    assert_dot_held(t->loop, fs);
    deliver_cancel(d);
    spin(t->loop, 5);
    assert_int_equal(fs->nmessages, 0);

    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    hold_rec_t h2 = { .rcpts = rcpts };
    req.before_body_arg = &h2;
    d = deliver_ctx_start(ctx, &req, never_called, NULL);
    run_until_within(t->loop, &h2.calls, 5000);
    deliver_cancel(d);
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    assert_int_equal(fs->nmessages, 0);
    assert_int_equal(fs->naccepted, 2);
    drain_and_check(t->loop, &fs, 1);
}

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    if (rc != 0)
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
    return rc;
}

static int make_ca(const char *dir, const char *name)
{
    return sh("cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
              "-keyout %s.key -out %s.crt -days 2 -subj '/CN=mailpump test %s' "
              "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign "
              ">/dev/null 2>&1",
              dir, name, name, name);
}

static int make_cert(const char *dir, const char *name, const char *ca, const char *dns)
{
    return sh("cd %s && printf 'subjectAltName=DNS:%s\\nbasicConstraints=CA:FALSE\\n"
              "extendedKeyUsage=serverAuth\\n' > %s.ext && "
              "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s.key "
              "-out %s.csr -subj '/CN=%s' >/dev/null 2>&1 && "
              "openssl x509 -req -in %s.csr -CA %s.crt -CAkey %s.key -CAcreateserial -out %s.crt "
              "-days 2 -extfile %s.ext >/dev/null 2>&1",
              dir, dns, name, name, name, dns, name, ca, ca, name, name);
}

static int group_setup(void **state)
{
    char err[256], path[192], key[192];
    signal(SIGPIPE, SIG_IGN); /* as mailpumpd: a TLS write to a closed peer is an error, not a signal */
    log_setup(test_log_level(), LOG_FMT_LOGFMT);

    snprintf(fx.dir, sizeof(fx.dir), "/tmp/mp_test_smtp.XXXXXX");
    if (mkdtemp(fx.dir) == NULL)
        return -1;
    if (make_ca(fx.dir, "ca") || make_ca(fx.dir, "evilca") || make_cert(fx.dir, "server", "ca", "mx.test.local") ||
        make_cert(fx.dir, "evil", "evilca", "mx.test.local"))
        return -1;
    snprintf(fx.ca, sizeof(fx.ca), "%s/ca.crt", fx.dir);
    fx.verify_ctx = tls_client_ctx_new(fx.ca, 1, err, sizeof(err));
    fx.noverify_ctx = tls_client_ctx_new(fx.ca, 0, err, sizeof(err));
    snprintf(path, sizeof(path), "%s/server.crt", fx.dir);
    snprintf(key, sizeof(key), "%s/server.key", fx.dir);
    fx.server_ctx = tls_server_ctx_new(path, key, err, sizeof(err));
    snprintf(path, sizeof(path), "%s/evil.crt", fx.dir);
    snprintf(key, sizeof(key), "%s/evil.key", fx.dir);
    fx.evil_ctx = tls_server_ctx_new(path, key, err, sizeof(err));
    if (!fx.verify_ctx || !fx.noverify_ctx || !fx.server_ctx || !fx.evil_ctx) {
        fprintf(stderr, "TLS setup: %s\n", err);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    SSL_CTX_free(fx.verify_ctx);
    SSL_CTX_free(fx.noverify_ctx);
    SSL_CTX_free(fx.server_ctx);
    SSL_CTX_free(fx.evil_ctx);
    if (fx.dir[0])
        sh("rm -rf '%s'", fx.dir);
    return 0;
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)


/* ---- egress sources and per-request shaping ------------------------ */

typedef struct src_fixture {
    struct sockaddr_in sin;
    deliver_source_t   src;
} src_fixture_t;

static void source_init(src_fixture_t *f, const char *name, const char *ip, const char *helo)
{
    memset(f, 0, sizeof(*f));
    f->sin.sin_family = AF_INET;
    assert_int_equal(inet_pton(AF_INET, ip, &f->sin.sin_addr), 1);
    f->src.name = name;
    f->src.addr = (const struct sockaddr *)&f->sin;
    f->src.addrlen = sizeof(f->sin);
    f->src.addr_text = ip;
    f->src.helo = helo;
}

/* A request with every shaping field spelled out. */
typedef struct sreq {
    const deliver_source_t *source;
    int                     tls_override;
    unsigned                max_msgs, connect_ms, command_ms;
    const char             *domain;
} sreq_t;

static void src_deliver(deliver_ctx_t *ctx, loop_t *loop, const sreq_t *q, const char *const *rcpts, size_t nrcpts,
                        const deliver_candidate_t *cands, size_t ncands, capture_t *cap)
{
    deliver_request_t req = {
        .mail_from = FROM,
        .rcpts = rcpts,
        .nrcpts = nrcpts,
        .data = PAYLOAD,
        .len = strlen(PAYLOAD),
        .message_size = MSG_SIZE,
        .candidates = cands,
        .ncandidates = ncands,
        .log_id = "test-msg-src",
        .domain = q->domain,
        .source = q->source,
        .tls_override = q->tls_override,
        .max_msgs_per_conn = q->max_msgs,
        .connect_timeout_ms = q->connect_ms,
        .command_timeout_ms = q->command_ms,
    };
    memset(cap, 0, sizeof(*cap));
    deliver_t *d = deliver_ctx_start(ctx, &req, on_result, cap);
    assert_non_null(d);
    assert_int_equal(cap->fired, 0);
    run_until(loop, &cap->fired);
}

/* A source binds its address (the server sees 127.0.0.2) and says EHLO
 * with its own name; the result names it. Sessions are pooled per
 * source: the default address and another source each open their own
 * connection, and the first source's idle one is reused by its next
 * message. */
static void test_source_bind_helo_and_pool(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    src_fixture_t m1, m2;
    source_init(&m1, "mta1", "127.0.0.2", "mta1.example.net");
    source_init(&m2, "mta2", "127.0.0.3", NULL);
    sreq_t q1 = { .source = &m1.src }, q0 = { 0 }, q2 = { .source = &m2.src };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;

    src_deliver(ctx, t->loop, &q1, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(fs->last_peer, "127.0.0.2");
    assert_string_equal(cap.source_name, "mta1");
    assert_string_equal(cap.source_addr, "127.0.0.2");
    assert_int_equal(cap.connections, 1);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO mta1.example.net\r\nMAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD);

    /* the host's default address: not mta1's session */
    spin(t->loop, 3);
    src_deliver(ctx, t->loop, &q0, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.connections, 1);
    assert_int_equal(cap.reused, 0);
    assert_string_equal(fs->last_peer, "127.0.0.1");
    assert_string_equal(cap.source_name, "");
    assert_string_equal(cap.source_addr, "");
    assert_int_equal(fs->naccepted, 2);

    /* mta1 again: its idle session, same EHLO, no new connection */
    spin(t->loop, 3);
    src_deliver(ctx, t->loop, &q1, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.connections, 0);
    assert_int_equal(cap.reused, 1);
    assert_int_equal(fs->naccepted, 2);

    /* mta2: its own connection, the config's EHLO name (no helo of its own) */
    spin(t->loop, 3);
    size_t before = strlen(fake_server_transcript(fs));
    src_deliver(ctx, t->loop, &q2, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.connections, 1);
    assert_string_equal(fs->last_peer, "127.0.0.3");
    assert_string_equal(cap.source_name, "mta2");
    assert_string_equal(fake_server_transcript(fs) + before,
                        "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD);
    deliver_stats_t st;
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.connects, 3);
    assert_int_equal(st.pool.reuses, 1);
    assert_int_equal(st.pool.idle, 3);
    assert_int_equal(st.pool.dests, 3);
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    drain_and_check(t->loop, &fs, 1);
}

static deliver_candidate_t cand6(const char *host, unsigned short port)
{
    deliver_candidate_t c;
    memset(&c, 0, sizeof(c));
    snprintf(c.host, sizeof(c.host), "%s", host);
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&c.addr;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    sin6->sin6_addr = in6addr_loopback;
    c.addrlen = sizeof(*sin6);
    return c;
}

/* An IPv4 source skips IPv6 candidates (never tried, no attempt spent);
 * with nothing of its family left the attempt ends at once, transient,
 * reason dns, saying why. */
static void test_source_family_mismatch(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    unsigned short closed6 = fakesmtp_closed_port();
    deliver_candidate_t mixed[] = { cand6("mx6.fake.test", closed6), cand("mx1.fake.test", fs->port) };
    deliver_candidate_t only6[] = { cand6("mx6.fake.test", closed6), cand6("mx6b.fake.test", closed6) };
    const char *r1[] = { "b@y" };
    src_fixture_t m1;
    source_init(&m1, "mta1", "127.0.0.2", NULL);
    sreq_t q1 = { .source = &m1.src };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    capture_t cap;

    src_deliver(ctx, t->loop, &q1, r1, 1, mixed, 2, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.attempts, 1);
    assert_string_equal(cap.mx_host, "mx1.fake.test");
    assert_string_equal(fs->last_peer, "127.0.0.2");

    src_deliver(ctx, t->loop, &q1, r1, 1, only6, 2, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "dns", 0, "");
    assert_string_equal(cap.r[0].text,
                        "no MX address of family IPv4 for source mta1 (IPv4 127.0.0.2): 2 IPv6 addresses skipped");
    assert_int_equal(cap.attempts, 0);
    assert_int_equal(cap.connections, 0);
    assert_int_equal(fs->naccepted, 1);
    /* an IPv6 source and IPv4 candidates: the same, the other way round */
    struct sockaddr_in6 s6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    deliver_source_t v6 = { .name = "mta6", .addr = (const struct sockaddr *)&s6, .addrlen = sizeof(s6),
                            .addr_text = "::1" };
    sreq_t q6 = { .source = &v6 };
    deliver_candidate_t only4[] = { cand("mx1.fake.test", fs->port) };
    src_deliver(ctx, t->loop, &q6, r1, 1, only4, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "dns", 0, "");
    assert_string_equal(cap.r[0].text,
                        "no MX address of family IPv6 for source mta6 (IPv6 ::1): 1 IPv4 address skipped");
    assert_int_equal(fs->naccepted, 1);
    /* without a source the IPv6 candidates are tried as before */
    sreq_t q0 = { 0 };
    src_deliver(ctx, t->loop, &q0, r1, 1, only6, 2, &cap);
    assert_int_equal(cap.attempts, 2);
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    drain_and_check(t->loop, &fs, 1);
}

/* A source address not on this host cannot be bound: no packet goes
 * out, the recipients are transient (network) with the words of the
 * bind, it counts as a local resource error, and the MX is not marked
 * down: the next message without a source goes at once. */
static void test_source_bind_failure(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_config_t cfg = config(t, SMTP_TLS_NONE);
    cfg.route_penalty_ms = 5000;
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    src_fixture_t bad;
    source_init(&bad, "far", "192.0.2.1", NULL);
    sreq_t qb = { .source = &bad.src }, q0 = { 0 };
    capture_t cap;
    uint64_t downs = metrics_counter(MET_SMTP_ROUTES_DOWN);
    uint64_t local = metrics_counter(MET_LOCAL_RESOURCE_ERRORS);

    src_deliver(ctx, t->loop, &qb, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "network", 0, "");
    assert_string_equal(cap.r[0].text, "source address 192.0.2.1 cannot be bound: Cannot assign requested address");
    assert_string_equal(cap.source_name, "far");
    assert_string_equal(cap.source_addr, "192.0.2.1");
    assert_int_equal(fs->naccepted, 0);
    assert_int_equal(metrics_counter(MET_LOCAL_RESOURCE_ERRORS) - local, 1);
    assert_int_equal(metrics_counter(MET_SMTP_ROUTES_DOWN) - downs, 0);

    src_deliver(ctx, t->loop, &q0, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.attempts, 1);
    assert_int_equal(fs->naccepted, 1);
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    drain_and_check(t->loop, &fs, 1);
}

static void test_egress_check_bind(void **state)
{
    (void)state;
    src_fixture_t ok, bad;
    source_init(&ok, "lo2", "127.0.0.2", NULL);
    source_init(&bad, "far", "192.0.2.1", NULL);
    char err[256] = "";
    assert_int_equal(egress_check_bind(ok.src.addr, ok.src.addrlen, err, sizeof(err)), 0);
    assert_string_equal(err, "");
    ok.sin.sin_port = htons(25); /* the port is ignored: 0 is bound */
    assert_int_equal(egress_check_bind(ok.src.addr, ok.src.addrlen, err, sizeof(err)), 0);
    assert_int_equal(egress_check_bind(bad.src.addr, bad.src.addrlen, err, sizeof(err)), -1);
    assert_string_equal(err, "source address 192.0.2.1 cannot be bound: Cannot assign requested address");
}

/* TLS sessions are cached per source: the second connection of mta1
 * resumes, mta2's first does a full handshake. */
static void test_source_tls_cache_key(void **state)
{
    tctx_t *t = *state;
    script_t sc = { .greeting = "220 mx.test.local ESMTP\r\n", .rules = rules_tls, .tls = fx.server_ctx };
    fake_server_t *fs = fake_server_new(t->loop, &sc);
    deliver_candidate_t c[] = { cand("mx.test.local", fs->port) };
    const char *r1[] = { "b@y" };
    src_fixture_t m1, m2;
    source_init(&m1, "mta1", "127.0.0.2", NULL);
    source_init(&m2, "mta2", "127.0.0.3", NULL);
    sreq_t q1 = { .source = &m1.src }, q2 = { .source = &m2.src };
    smtp_pool_limits_t lim = { .disabled = 1 };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_VERIFY, &lim);
    capture_t cap;

    src_deliver(ctx, t->loop, &q1, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls_full, 1);
    spin(t->loop, 3);
    src_deliver(ctx, t->loop, &q1, r1, 1, c, 1, &cap);
    assert_int_equal(cap.tls_full, 0);
    assert_int_equal(cap.tls_resumed, 1);
    spin(t->loop, 3);
    src_deliver(ctx, t->loop, &q2, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls_full, 1);
    assert_int_equal(cap.tls_resumed, 0);
    deliver_stats_t st;
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.tls_cached, 2);
    deliver_ctx_free(ctx);
    drain_and_check(t->loop, &fs, 1);
}

/* tls_override replaces both the per-domain map and the default: a
 * plaintext-only server is refused under an override to required even
 * for a domain the map says none, and reached under an override to none
 * where the default requires TLS. */
static void test_tls_override(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    deliver_config_t cfg = config(t, SMTP_TLS_REQUIRED);
    cfg.tls_policy_map = "plain.test:none";
    deliver_ctx_t *ctx = deliver_ctx_new(t->loop, &cfg);
    capture_t cap;

    sreq_t dflt = { .domain = "y" };
    src_deliver(ctx, t->loop, &dflt, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_int_equal(cap.tls_policy, SMTP_TLS_REQUIRED);

    sreq_t none = { .domain = "y", .tls_override = DELIVER_TLS_OVERRIDE(SMTP_TLS_NONE) };
    src_deliver(ctx, t->loop, &none, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls_policy, SMTP_TLS_NONE);

    sreq_t mapped = { .domain = "plain.test" };
    src_deliver(ctx, t->loop, &mapped, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(cap.tls_policy, SMTP_TLS_NONE);

    sreq_t req = { .domain = "plain.test", .tls_override = DELIVER_TLS_OVERRIDE(SMTP_TLS_REQUIRED) };
    src_deliver(ctx, t->loop, &req, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_int_equal(cap.tls_policy, SMTP_TLS_REQUIRED);
    /* -1 is "no override" too */
    sreq_t minus = { .domain = "plain.test", .tls_override = -1 };
    src_deliver(ctx, t->loop, &minus, r1, 1, c, 1, &cap);
    assert_int_equal(cap.tls_policy, SMTP_TLS_NONE);
    assert_int_equal(DELIVER_TLS_OVERRIDDEN(0), -1);
    assert_int_equal(DELIVER_TLS_OVERRIDDEN(-1), -1);
    assert_int_equal(DELIVER_TLS_OVERRIDDEN(DELIVER_TLS_OVERRIDE(SMTP_TLS_VERIFY)), SMTP_TLS_VERIFY);
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    drain_and_check(t->loop, &fs, 1);
}

/* max_msgs_per_conn 2 under a pool that allows 100: the connection says
 * QUIT after its second message, the third opens a new one. */
static void test_max_msgs_per_conn(void **state)
{
    tctx_t *t = *state;
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    deliver_candidate_t c[] = { cand("mx1.fake.test", fs->port) };
    const char *r1[] = { "b@y" };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    sreq_t q = { .max_msgs = 2 };
    capture_t cap;
    deliver_stats_t st;

    for (int i = 0; i < 3; i++) {
        src_deliver(ctx, t->loop, &q, r1, 1, c, 1, &cap);
        assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
        assert_int_equal(cap.connections, i == 1 ? 0 : 1);
        assert_int_equal(cap.reused, i == 1);
        spin(t->loop, 3);
    }
    assert_int_equal(fs->naccepted, 2);
    assert_string_equal(fake_server_transcript(fs),
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD "QUIT\r\n"
                        "EHLO " HELO_NAME "\r\n"
                        "MAIL FROM:<" FROM "> SIZE=38\r\nRCPT TO:<b@y>\r\nDATA\r\n" PAYLOAD);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.evicted, 1);
    assert_int_equal(st.pool.idle, 1);
    /* without the knob the pool's 100 holds: the idle one is reused */
    sreq_t q0 = { 0 };
    src_deliver(ctx, t->loop, &q0, r1, 1, c, 1, &cap);
    assert_int_equal(cap.reused, 1);
    spin(t->loop, 3);
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.idle, 1);
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    drain_and_check(t->loop, &fs, 1);
}

/* command_timeout_ms replaces the context's reply deadlines (5 s here):
 * a silent greeting ends in about 150 ms; on a pooled connection too (a
 * MAIL never answered); the end of data keeps data_done_ms. */
static void test_command_timeout_override(void **state)
{
    tctx_t *t = *state;
    static const rule_t rules_mail_silent[] = {
        { "MAIL FROM:", "", ACT_SILENT },
        { "RCPT TO:", "", ACT_SILENT },
        { "DATA", "", ACT_SILENT },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc_mail_silent = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules_mail_silent };
    static const script_t sc_eod_silent = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                            .eod_act = ACT_SILENT };
    fake_server_t *silent = fake_server_new(t->loop, &fakesmtp_script_silent);
    fake_server_t *fs = fake_server_new(t->loop, &fakesmtp_script_ok);
    fake_server_t *eod = fake_server_new(t->loop, &sc_eod_silent);
    deliver_candidate_t cs[] = { cand("mx1.fake.test", silent->port) };
    deliver_candidate_t c[] = { cand("mx2.fake.test", fs->port) };
    deliver_candidate_t ce[] = { cand("mx3.fake.test", eod->port) };
    const char *r1[] = { "b@y" };
    t->to.data_done_ms = 700;
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    sreq_t q = { .command_ms = 150 };
    capture_t cap;

    uint64_t t0 = util_mono_ms();
    src_deliver(ctx, t->loop, &q, r1, 1, cs, 1, &cap);
    uint64_t took = util_mono_ms() - t0;
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(cap.r[0].text, "timeout while receiving the initial server greeting");
    assert_true(took >= 140 && took < 2000);

    /* a pooled connection, then its server stops answering MAIL */
    sreq_t q0 = { 0 };
    src_deliver(ctx, t->loop, &q0, r1, 1, c, 1, &cap);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    spin(t->loop, 3);
    fs->sc = &sc_mail_silent;
    t0 = util_mono_ms();
    src_deliver(ctx, t->loop, &q, r1, 1, c, 1, &cap);
    took = util_mono_ms() - t0;
    assert_int_equal(cap.reused, 1);
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(cap.r[0].text, "timeout while sending MAIL FROM");
    assert_true(took >= 140 && took < 2000);

    /* no reply to the final dot: data_done_ms (700), not 150 */
    t0 = util_mono_ms();
    src_deliver(ctx, t->loop, &q, r1, 1, ce, 1, &cap);
    took = util_mono_ms() - t0;
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_true(cap.r[0].maybe_sent);
    assert_true(took >= 650 && took < 3000);
    deliver_ctx_free(ctx);
    spin(t->loop, 5);
    fake_server_t *all[] = { silent, fs, eod };
    drain_and_check(t->loop, all, 3);
}

/* connect_timeout_ms replaces the context's connect timeout (5 s here):
 * a listener whose backlog is full drops the SYN, the connect hangs and
 * ends after about 200 ms. */
static void test_connect_timeout_override(void **state)
{
    tctx_t *t = *state;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(lfd >= 0);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    assert_int_equal(bind(lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(listen(lfd, 0), 0);
    socklen_t sl = sizeof(sin);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sin, &sl), 0);
    /* fill the accept queue (never accepted): later SYNs are dropped */
    int fill[4];
    for (int i = 0; i < 4; i++) {
        fill[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        assert_true(fill[i] >= 0);
        (void)connect(fill[i], (struct sockaddr *)&sin, sizeof(sin));
    }
    spin_ms(t->loop, 50);
    deliver_candidate_t c[] = { cand("mx1.fake.test", ntohs(sin.sin_port)) };
    const char *r1[] = { "b@y" };
    deliver_ctx_t *ctx = pool_ctx(t, SMTP_TLS_NONE, NULL);
    sreq_t q = { .connect_ms = 200 };
    capture_t cap;
    uint64_t t0 = util_mono_ms();
    src_deliver(ctx, t->loop, &q, r1, 1, c, 1, &cap);
    uint64_t took = util_mono_ms() - t0;
    assert_rcpt(&cap, 0, "b@y", OUTCOME_TRANSIENT, "timeout", 0, "");
    assert_string_equal(cap.r[0].text, "timeout while connecting");
    assert_true(took >= 190 && took < 3000);
    deliver_ctx_free(ctx);
    for (int i = 0; i < 4; i++)
        close(fill[i]);
    close(lfd);
    drain_and_check(t->loop, NULL, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_features),
        cmocka_unit_test(test_strstate_and_timeouts),
        cmocka_unit_test(test_outcome_table),
        cmocka_unit_test(test_candidates_from_mx),
        T(test_all_delivered),
        T(test_body_segments_plain),
        T(test_body_segments_starttls),
        T(test_early_reply_closes),
        T(test_deadline_drip_greeting),
        T(test_deadline_slow_greeting_ok),
        T(test_deadline_transaction_pipelined),
        T(test_reply_flood_rate),
        T(test_reply_flood_burst),
        T(test_deadline_body_inactivity),
        T(test_per_recipient_results),
        T(test_all_rcpt_rejected),
        T(test_log_hostile_values),
        T(test_mail_from_rejected),
        T(test_greeting_421_next_candidate),
        T(test_greeting_554_everywhere),
        T(test_connect_refused_next_candidate),
        T(test_ehlo_502_helo_fallback),
        T(test_timeout_greeting),
        T(test_timeout_end_of_data_no_failover),
        T(test_close_mid_data),
        T(test_421_mid_rcpt_failover_keeps_answers),
        T(test_size_limit_checked_before_mail),
        T(test_garbage_reply_is_protocol_error),
        T(test_injection_refused),
        T(test_no_candidates),
        T(test_cancel),
        T(test_starttls_verify_ok),
        T(test_starttls_opportunistic_untrusted_ok),
        T(test_starttls_handshake_failure_falls_back_to_plaintext),
        T(test_starttls_verify_wrong_name_next_candidate),
        T(test_starttls_verify_untrusted_ca),
        T(test_tls_required_not_offered),
        T(test_starttls_injection),
        T(test_pipelining_batch),
        T(test_lockstep_without_pipelining),
        T(test_split_transactions),
        T(test_452_too_many_recipients_next_txn),
        T(test_pool_reuse),
        T(test_pool_site_tag_trim),
        T(test_pool_rset_only_when_needed),
        T(test_pool_idle_close_detected),
        T(test_pool_dead_on_reuse_retried),
        T(test_pool_limits_msgs_and_idle),
        T(test_pool_frees_unused_destinations),
        T(test_pool_per_destination_limit),
        T(test_pool_slow_start),
        T(test_pool_refused_caps_destination),
        T(test_route_penalty),
        T(test_route_penalty_shared),
        T(test_pool_worker_limit_and_age),
        T(test_tls_resumption),
        T(test_tls_policy_per_domain),
        T(test_relay_auth),
        T(test_need_8bitmime_smtputf8),
        T(test_pipelined_mail_refused_keeps_sync),
        T(test_pipelined_rcpt_timeout),
        T(test_hostile_greeting_budget),
        T(test_local_descriptors_exhausted),
        T(test_ehlo_5000_lines),
        T(test_out_of_step_replies),
        T(test_route_penalty_keeps_cause),
        T(test_hold_before_body),
        T(test_hold_per_transaction),
        T(test_hold_timeout_fails_over),
        T(test_hold_cancel),
        T(test_hold_abort),
        T(test_hold_after_txn_states),
        T(test_source_bind_helo_and_pool),
        T(test_source_family_mismatch),
        T(test_source_bind_failure),
        cmocka_unit_test(test_egress_check_bind),
        T(test_source_tls_cache_key),
        T(test_tls_override),
        T(test_max_msgs_per_conn),
        T(test_command_timeout_override),
        T(test_connect_timeout_override),
        cmocka_unit_test(test_tls_session_cache),
        cmocka_unit_test(test_config_build),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

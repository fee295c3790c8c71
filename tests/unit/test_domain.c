/*
 * tests/unit/test_domain.c - one domain leg of a message
 * (deliverer/domain.c): MX lookup, rate limit, SMTP delivery, fast
 * retries, the report.
 *
 * The peers are fakes running in the test's own loop: scripted SMTP
 * servers on 127.0.0.1 (tests/support/fakesmtp.h, as in test_smtp.c; a
 * listener that accepts and closes at once counts connection attempts),
 * the mock DNS server of tests/support/fakedns.h for the MX cases (relay
 * mode, where the smarthost replaces the MX list, drives the rest), and
 * the process's own rate-limit table (throttle.h, no Redis). Most tests
 * run without a ledger (svc.ledger = NULL: no marks, no hold before the
 * dot); the ledger tests give the leg a real one (ledger.c over rclient)
 * backed by the fake Redis of tests/support/fakeredis.h.
 *
 * Every test ends with the loop empty: no fd, no timer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/stream.h"
#include "core/util.h"
#include "deliverer/actions.h"
#include "deliverer/deliver.h"
#include "deliverer/domain.h"
#include "deliverer/policy.h"
#include "metrics/metrics.h"
#include "deliverer/ledger.h"
#include "deliverer/outcome.h"
#include "deliverer/session.h"
#include "deliverer/throttle.h"
#include "dns/resolver.h"
#include "tests/support/fakedns.h"
#include "tests/support/fakeredis.h"
#include "tests/support/fakesmtp.h"

/* ------------------------------------------------------------------ */
/* scripts                                                             */

#define HELO_NAME "mailpump.test"
#define FROM      "a@x"
#define MSG_SIZE  38
#define PAYLOAD   "Subject: test\r\n\r\nhello\r\n..leading dot\r\n.\r\n" /* dot-stuffed */
#define PAYLOAD_HELD "Subject: test\r\n\r\nhello\r\n..leading dot\r\n" /* all but the final dot */

#define TRANSCRIPT_OK(rcpts) \
    "EHLO " HELO_NAME "\r\nMAIL FROM:<" FROM "> SIZE=38\r\n" rcpts "DATA\r\n" PAYLOAD "QUIT\r\n"

/* ------------------------------------------------------------------ */
/* the mock DNS zone                                                   */

static const fakedns_rr_t zone[] = {
    { "mx.test", T_MX, 0, 60, 10, "mx1.mx.test", 0 },
    { "mx1.mx.test", T_A, 0, 60, 0, "127.0.0.1", 0 },
    { "nx.test", 0, ns_r_nxdomain, 0, 0, NULL, 0 },
    { "fail.test", 0, ns_r_servfail, 0, 0, NULL, 0 },
    { "drop.test", 0, FAKEDNS_DROP, 0, 0, NULL, 0 },
    { "null.test", T_MX, 0, 60, 0, "", 0 },
};

/* ------------------------------------------------------------------ */
/* harness                                                             */

typedef struct fx {
    loop_t           *loop;
    smtp_timeouts_t   to;
    fakedns_t         mock;
    int               mock_on;
    dns_resolver_t   *dns;
    deliver_candidate_t relay;
    deliver_config_t  dcfg;
    deliver_ctx_t    *dctx;
    throttle_t       *throttle;
    domain_services_t svc;
    fake_server_t    *srv[4];
    size_t            nsrv;
    fakeredis_t      *redis;
    rclient_t        *rc;
    ledger_t         *ledger;
    sites_t          *sites;
    actions_t        *actions;
    policy_t         *policy;
} fx_t;

/* What one leg reported, and what it asked of the gate. */
typedef struct dcap {
    int                  in_start;   /* domain_start() is on the stack */
    int                  fired;
    int                  fired_in_start;
    int                  free_in_cb; /* domain_free(leg) from inside done */
    domain_leg_t        *leg;
    uint64_t             done_ms;
    size_t               nrcpts;
    domain_rcpt_result_t r[8];     /* source, source_addr and shaping: copied below */
    char                 shaping[8][256];
    char                 source[8][72];
    char                 mx_host[256];
    char                 mx_addr[64];
    char                 tls_version[32];
    uint64_t             throttle_wait_ms;
    /* gate */
    int                  gate_calls;
    int                  gate_allow;    /* calls answered 1; the rest 0 (-1: every call 1) */
    const char          *gate_why;
    uint64_t             gate_ms[8];    /* when each call came */
    int                  gate_srv_accepted[8]; /* srv->naccepted at each call */
    fake_server_t       *srv;           /* counted at gate calls; may be NULL */
    const script_t      *switch_to;     /* at the second gate call, srv->sc becomes this */
    /* cut */
    int                  ncuts;
    size_t               cut_k[8];      /* the recipients, in call order */
    int                  cut_gate_calls[8]; /* gate_calls when each came */
} dcap_t;

static void on_done(void *arg, const domain_result_t *res)
{
    dcap_t *c = arg;
    if (c->in_start)
        c->fired_in_start++;
    assert_int_equal(c->in_start, 0); /* never inside domain_start() */
    assert_int_equal(c->fired, 0);    /* exactly once */
    c->fired++;
    c->done_ms = util_mono_ms();
    c->nrcpts = res->nrcpts;
    assert_true(res->nrcpts <= 8);
    for (size_t i = 0; i < res->nrcpts; i++) {
        c->r[i] = res->rcpts[i];
        snprintf(c->shaping[i], sizeof(c->shaping[i]), "%s", res->rcpts[i].shaping ? res->rcpts[i].shaping : "");
        snprintf(c->source[i], sizeof(c->source[i]), "%s", res->rcpts[i].source ? res->rcpts[i].source : "");
        c->r[i].shaping = c->r[i].source = c->r[i].source_addr = NULL; /* the leg's, gone with it */
    }
    assert_non_null(res->mx_host);
    assert_non_null(res->mx_addr);
    assert_non_null(res->tls_version);
    assert_non_null(res->tls_cipher);
    snprintf(c->mx_host, sizeof(c->mx_host), "%s", res->mx_host);
    snprintf(c->mx_addr, sizeof(c->mx_addr), "%s", res->mx_addr);
    snprintf(c->tls_version, sizeof(c->tls_version), "%s", res->tls_version);
    c->throttle_wait_ms = res->throttle_wait_ms;
    if (c->free_in_cb) {
        domain_leg_t *leg = c->leg;
        c->leg = NULL;
        domain_free(leg);
    }
}

static int on_gate(void *arg, const char **why)
{
    dcap_t *c = arg;
    if (c->gate_calls < 8) {
        c->gate_ms[c->gate_calls] = util_mono_ms();
        c->gate_srv_accepted[c->gate_calls] = c->srv ? c->srv->naccepted : 0;
    }
    c->gate_calls++;
    if (c->gate_calls == 2 && c->switch_to && c->srv)
        c->srv->sc = c->switch_to;
    if (c->gate_allow < 0 || c->gate_calls <= c->gate_allow)
        return 1;
    *why = c->gate_why;
    return 0;
}

static void on_cut(void *arg, size_t k)
{
    dcap_t *c = arg;
    assert_int_equal(c->fired, 0); /* with the attempt, before the report */
    assert_true(c->ncuts < 8);
    c->cut_k[c->ncuts] = k;
    c->cut_gate_calls[c->ncuts] = c->gate_calls;
    c->ncuts++;
}

static int setup(void **state)
{
    fx_t *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    f->loop = loop_new();
    if (f->loop == NULL)
        return -1;
    smtp_timeouts_default(&f->to, 100);
    unsigned *p = (unsigned *)&f->to;
    for (size_t i = 0; i < sizeof(f->to) / sizeof(unsigned); i++)
        p[i] = 5000; /* generous; the tests that need a timeout never wait for one */
    *state = f;
    return 0;
}

/* Everything the test made is freed here; then the loop must be empty. */
static int teardown(void **state)
{
    fx_t *f = *state;
    sites_free(f->sites);
    actions_free(f->actions);
    policy_free(f->policy);
    if (f->dctx)
        deliver_ctx_free(f->dctx);
    rclient_free(f->rc); /* before the ledger (ledger.h) */
    ledger_free(f->ledger);
    fakeredis_free(f->redis);
    for (size_t i = 0; i < f->nsrv; i++)
        fake_server_free(f->srv[i]);
    if (f->dns)
        dns_resolver_free(f->dns);
    if (f->mock_on)
        fakedns_stop(&f->mock);
    throttle_free(f->throttle);
    for (int i = 0; i < 200 && (loop_fd_count(f->loop) || loop_timer_count(f->loop)); i++)
        loop_run_once(f->loop, 10);
    size_t fds = loop_fd_count(f->loop), timers = loop_timer_count(f->loop);
    loop_free(f->loop);
    free(f);
    if (fds || timers) {
        fprintf(stderr, "loop not empty at teardown: %zu fds, %zu timers\n", fds, timers);
        return -1;
    }
    return 0;
}

static fake_server_t *server(fx_t *f, const script_t *sc)
{
    assert_true(f->nsrv < 4);
    fake_server_t *fs = fake_server_new(f->loop, sc);
    f->srv[f->nsrv++] = fs;
    return fs;
}

static void base_config(fx_t *f)
{
    memset(&f->dcfg, 0, sizeof(f->dcfg));
    f->dcfg.port = 25;
    f->dcfg.helo_name = HELO_NAME;
    f->dcfg.tls = SMTP_TLS_NONE;
    f->dcfg.max_mx = 5;
    f->dcfg.timeouts = &f->to;
    f->dcfg.pool.disabled = 1; /* QUIT after each message: exact transcripts, nothing idle */
}

static void make_services(fx_t *f, uint64_t max_wait_ms)
{
    f->dctx = deliver_ctx_new(f->loop, &f->dcfg);
    assert_non_null(f->dctx);
    f->svc = (domain_services_t){
        .loop = f->loop,
        .dns = f->dns,
        .dctx = f->dctx,
        .ledger = NULL,
        .redis = NULL,
        .throttle = f->throttle,
        .dcfg = &f->dcfg,
        .rate_limit_max_wait_ms = max_wait_ms,
    };
}

/* A ledger on the fake Redis for the legs of this test: marks, the held
 * dot, the records of each transaction. */
static void with_ledger(fx_t *f, uint64_t mark_wait_ms, int send_unrecorded)
{
    f->redis = fakeredis_new(f->loop);
    rclient_config_t rcfg = { .host = "127.0.0.1", .port = f->redis->port, .timeout_ms = 100,
                              .connect_timeout_ms = 300, .reconnect_max_ms = 200 };
    f->rc = rclient_new(f->loop, &rcfg);
    for (uint64_t until = util_mono_ms() + 2000; !rclient_connected(f->rc) && util_mono_ms() < until;)
        loop_run_once(f->loop, 10);
    assert_true(rclient_connected(f->rc));
    f->ledger = ledger_new(f->loop, f->rc, 60000);
    f->svc.ledger = f->ledger;
    f->svc.mark_wait_ms = mark_wait_ms;
    f->svc.send_unrecorded = send_unrecorded;
}

/* The ledger record of recipient rcpt of the test message, or NULL. */
static const char *record(const fx_t *f, const char *rcpt)
{
    char key[256];
    snprintf(key, sizeof(key), "mp:r:test-msg-1:%s", rcpt);
    return fakeredis_get(f->redis, key);
}

/* Relay mode: every leg goes to 127.0.0.1:port as "relay.test". */
static void relay_env(fx_t *f, unsigned short port, const char *rate_limits, uint64_t max_wait_ms)
{
    base_config(f);
    memset(&f->relay, 0, sizeof(f->relay));
    snprintf(f->relay.host, sizeof(f->relay.host), "relay.test");
    struct sockaddr_in *sin = (struct sockaddr_in *)&f->relay.addr;
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    f->relay.addrlen = sizeof(*sin);
    f->dcfg.relay = &f->relay;
    f->dcfg.nrelay = 1;
    if (rate_limits) {
        char err[256] = "";
        if (throttle_new(rate_limits, &f->throttle, err, sizeof(err)) != 0)
            fail_msg("rate_limits \"%s\": %s", rate_limits, err);
        assert_non_null(f->throttle);
    }
    make_services(f, max_wait_ms);
}

/* MX mode against the mock DNS: MX candidates get port (their port is 0). */
static void mx_env(fx_t *f, unsigned short port)
{
    char err[256] = "";
    assert_int_equal(fakedns_start(&f->mock, f->loop, zone, sizeof(zone) / sizeof(zone[0])), 0);
    f->mock_on = 1;
    dns_config_t dc = { .servers = f->mock.addr, .timeout_ms = 200, .tries = 1 };
    f->dns = dns_resolver_new(f->loop, &dc, err, sizeof(err));
    if (f->dns == NULL)
        fail_msg("dns_resolver_new: %s", err);
    base_config(f);
    f->dcfg.port = port;
    make_services(f, 0);
}

typedef struct leg_args {
    const char        *domain;
    const char *const *rcpts;
    size_t             nrcpts;
    unsigned           fast_retries;
    uint64_t           fast_base_ms;
    int                gate;        /* 1: on_gate */
} leg_args_t;

static domain_request_t request(const leg_args_t *a, dcap_t *cap)
{
    domain_request_t rq = {
        .name = a->domain,
        .msg_id = "test-msg-1",
        .mail_from = FROM,
        .rcpts = a->rcpts,
        .nrcpts = a->nrcpts,
        .data = PAYLOAD,
        .len = strlen(PAYLOAD),
        .message_size = MSG_SIZE,
        .fast_retries = a->fast_retries,
        .fast_base_ms = a->fast_base_ms,
        .gate = a->gate ? on_gate : NULL,
        .cut = on_cut,
        .done = on_done,
        .arg = cap,
    };
    return rq;
}

/* Start a leg (rq must outlive it: the caller's). */
static domain_leg_t *start(fx_t *f, const domain_request_t *rq, dcap_t *cap)
{
    cap->in_start = 1;
    domain_leg_t *leg = domain_start(&f->svc, rq);
    cap->in_start = 0;
    assert_non_null(leg);
    cap->leg = leg;
    assert_int_equal(cap->fired, 0);
    assert_int_equal(cap->fired_in_start, 0);
    return leg;
}

static void run_until(loop_t *loop, const int *flag)
{
    uint64_t end = util_mono_ms() + 20000;
    while (!*flag && util_mono_ms() < end)
        assert_true(loop_run_once(loop, 50) >= 0);
    assert_true(*flag);
}

static void spin_ms(loop_t *loop, unsigned ms)
{
    uint64_t until = util_mono_ms() + ms;
    while (util_mono_ms() < until)
        loop_run_once(loop, 10);
}

/* Let the leg finish and release it (unless done freed it). */
static void finish_leg(fx_t *f, dcap_t *cap)
{
    run_until(f->loop, &cap->fired);
    spin_ms(f->loop, 30); /* a second report would trip on_done */
    assert_int_equal(cap->fired, 1);
    domain_free(cap->leg);
    cap->leg = NULL;
}

static void assert_rcpt(const dcap_t *c, size_t i, outcome_t o, outcome_reason_t reason, int code,
                        const char *enh)
{
    assert_true(i < c->nrcpts);
    assert_string_equal(outcome_name(c->r[i].outcome), outcome_name(o));
    assert_string_equal(outcome_reason_name(c->r[i].reason), outcome_reason_name(reason));
    assert_int_equal(c->r[i].code, code);
    assert_string_equal(c->r[i].enh, enh);
}

/* ------------------------------------------------------------------ */
/* 1. success                                                          */

static void test_delivered_relay(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test", "d@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 3, .fast_retries = 2, .fast_base_ms = 10,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = -1, .srv = fs };
    domain_request_t rq = request(&a, &cap);

    domain_leg_t *leg = start(f, &rq, &cap);
    run_until(f->loop, &cap.fired);
    assert_int_equal(domain_smtp_started(leg), 1);
    spin_ms(f->loop, 30);
    assert_int_equal(cap.fired, 1);

    assert_int_equal(cap.nrcpts, 3);
    for (size_t i = 0; i < 3; i++) {
        assert_rcpt(&cap, i, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
        assert_string_equal(cap.r[i].text, "Ok: queued as ABC123");
    }
    assert_string_equal(cap.mx_host, "relay.test");
    assert_string_equal(cap.mx_addr, "127.0.0.1");
    assert_string_equal(cap.tls_version, "");
    assert_int_equal(cap.throttle_wait_ms, 0);
    assert_int_equal(cap.gate_calls, 1);
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(fs->nmessages, 1);
    assert_string_equal(fake_server_transcript(fs),
                        TRANSCRIPT_OK("RCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nRCPT TO:<d@y.test>\r\n"));
    domain_free(leg);
}

/* The same through the MX lookup: the mock DNS names mx1.mx.test. */
static void test_delivered_mx(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    mx_env(f, fs->port);
    const char *rcpts[] = { "b@mx.test" };
    leg_args_t a = { .domain = "mx.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    domain_leg_t *leg = start(f, &rq, &cap);
    assert_int_equal(domain_smtp_started(leg), 0); /* the MX query comes first */
    run_until(f->loop, &cap.fired);
    assert_int_equal(domain_smtp_started(leg), 1);
    assert_int_equal(f->mock.nmx, 1);
    assert_int_equal(cap.nrcpts, 1);
    assert_rcpt(&cap, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_string_equal(cap.r[0].text, "Ok: queued as ABC123");
    assert_string_equal(cap.mx_host, "mx1.mx.test");
    assert_string_equal(cap.mx_addr, "127.0.0.1");
    assert_int_equal(cap.throttle_wait_ms, 0);
    assert_string_equal(fake_server_transcript(fs), TRANSCRIPT_OK("RCPT TO:<b@mx.test>\r\n"));
    finish_leg(f, &cap);
}

/* ------------------------------------------------------------------ */
/* 2. per-recipient outcomes, in request order                         */

static const rule_t rules_one_unknown[] = {
    { "EHLO", EHLO_PLAIN, ACT_REPLY },
    { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
    { "RCPT TO:<b@y.test>", "550 5.1.1 <b@y.test>: Recipient address rejected: User unknown\r\n", ACT_REPLY },
    { "RCPT TO:<d@y.test>", "452 4.2.2 <d@y.test>: Mailbox full\r\n", ACT_REPLY },
    { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
    { "DATA", "354 go ahead\r\n", ACT_REPLY },
    { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
    { NULL, NULL, 0 },
};
static const script_t script_one_unknown = {
    .greeting = "220 fake.test ESMTP\r\n",
    .rules = rules_one_unknown,
    .eod_reply = "250 2.0.0 Ok: queued as XYZ\r\n",
};

static void test_per_recipient(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &script_one_unknown);
    relay_env(f, fs->port, NULL, 0);

    /* refused first, accepted second */
    const char *r1[] = { "b@y.test", "c@y.test" };
    leg_args_t a1 = { .domain = "y.test", .rcpts = r1, .nrcpts = 2, .fast_retries = 2, .fast_base_ms = 10 };
    dcap_t c1 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a1, &c1);
    start(f, &q1, &c1);
    finish_leg(f, &c1);
    assert_int_equal(c1.nrcpts, 2);
    assert_rcpt(&c1, 0, OUTCOME_PERMANENT, OUTCOME_R_NO_SUCH_USER, 550, "5.1.1");
    assert_string_equal(c1.r[0].text, "<b@y.test>: Recipient address rejected: User unknown");
    assert_rcpt(&c1, 1, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_string_equal(c1.r[1].text, "Ok: queued as XYZ");
    assert_int_equal(fs->naccepted, 1); /* a server's verdict: no fast retry */

    /* the other order, and a transient refusal last */
    const char *r2[] = { "c@y.test", "b@y.test", "d@y.test" };
    leg_args_t a2 = { .domain = "y.test", .rcpts = r2, .nrcpts = 3, .fast_retries = 2, .fast_base_ms = 10 };
    dcap_t c2 = { .gate_allow = -1 };
    domain_request_t q2 = request(&a2, &c2);
    start(f, &q2, &c2);
    finish_leg(f, &c2);
    assert_int_equal(c2.nrcpts, 3);
    assert_rcpt(&c2, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_rcpt(&c2, 1, OUTCOME_PERMANENT, OUTCOME_R_NO_SUCH_USER, 550, "5.1.1");
    assert_rcpt(&c2, 2, OUTCOME_TRANSIENT, OUTCOME_R_MAILBOX_FULL, 452, "4.2.2");
    assert_string_equal(c2.r[2].text, "<d@y.test>: Mailbox full");
    assert_int_equal(fs->naccepted, 2);
    assert_int_equal(fs->nmessages, 2);
}

/* ------------------------------------------------------------------ */
/* 3. fast retries                                                     */

static void assert_all_network(const dcap_t *c, size_t n)
{
    assert_int_equal(c->nrcpts, n);
    for (size_t i = 0; i < n; i++) {
        assert_rcpt(c, i, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, 0, "");
        assert_true(c->r[i].text[0] != '\0'); /* says what went wrong */
    }
}

/* A closed port: 1 + fast_retries attempts, each asked of the gate, with
 * the backoff between them; then transient, network, code 0. */
static void test_fast_retry_closed_port(void **state)
{
    fx_t *f = *state;
    relay_env(f, fakesmtp_closed_port(), NULL, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2, .fast_retries = 2, .fast_base_ms = 20,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    uint64_t t0 = util_mono_ms();
    domain_leg_t *leg = start(f, &rq, &cap);
    run_until(f->loop, &cap.fired);
    assert_int_equal(cap.gate_calls, 3);
    assert_all_network(&cap, 2);
    assert_int_equal(domain_smtp_started(leg), 1);
    assert_int_equal(cap.throttle_wait_ms, 0);
    /* the pauses: 20 ms then 40 ms, each jittered to at least 85 % */
    assert_true(cap.gate_ms[1] - cap.gate_ms[0] >= 17);
    assert_true(cap.gate_ms[2] - cap.gate_ms[1] >= 34);
    assert_true(cap.done_ms - t0 >= 51);
    finish_leg(f, &cap);

    /* no fast retries: one attempt */
    leg_args_t a0 = a;
    a0.fast_retries = 0;
    dcap_t c0 = { .gate_allow = -1 };
    domain_request_t q0 = request(&a0, &c0);
    start(f, &q0, &c0);
    finish_leg(f, &c0);
    assert_int_equal(c0.gate_calls, 1);
    assert_all_network(&c0, 2);
}

/* Counted by the server: a listener that accepts and hangs up at once. */
static void test_fast_retry_counts_connections(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_hangup);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1, .fast_retries = 2, .fast_base_ms = 5 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_int_equal(fs->naccepted, 3);
    assert_all_network(&cap, 1);
    assert_int_equal(cap.ncuts, 0); /* never past a final dot */

    leg_args_t a0 = a;
    a0.fast_retries = 0;
    dcap_t c0 = { .gate_allow = -1 };
    domain_request_t q0 = request(&a0, &c0);
    start(f, &q0, &c0);
    finish_leg(f, &c0);
    assert_int_equal(fs->naccepted, 4); /* exactly one more */
    assert_all_network(&c0, 1);
}

/* The first connection is hung up, the fast retry delivers: the report is
 * the second attempt's. */
static void test_fast_retry_then_delivered(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_hangup);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2, .fast_retries = 3, .fast_base_ms = 5,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = -1, .srv = fs, .switch_to = &fakesmtp_script_ok };
    domain_request_t rq = request(&a, &cap);

    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_int_equal(cap.gate_calls, 2);
    assert_int_equal(fs->naccepted, 2);
    assert_int_equal(cap.gate_srv_accepted[1], 1); /* the retry came after the first connection */
    assert_rcpt(&cap, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_rcpt(&cap, 1, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_string_equal(cap.r[0].text, "Ok: queued as ABC123");
    assert_string_equal(cap.mx_host, "relay.test");
    assert_string_equal(cap.mx_addr, "127.0.0.1");
    assert_string_equal(fake_server_transcript(fs), TRANSCRIPT_OK("RCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n"));
}

/* A server that answered (421 at the greeting) decided something: no fast
 * retry, its words kept. Even when its enhanced code reads as a network
 * problem (4.4.2: reason network, but with a code). */
static void test_no_fast_retry_after_reply(void **state)
{
    fx_t *f = *state;
    static const script_t busy = { .greeting = "421 4.3.2 fake.test busy, try later\r\n", .greeting_act = ACT_CLOSE };
    static const script_t dropped = { .greeting = "421 4.4.2 fake.test connection dropped\r\n",
                                      .greeting_act = ACT_CLOSE };
    fake_server_t *fs = server(f, &busy);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1, .fast_retries = 2, .fast_base_ms = 5,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(cap.gate_calls, 1);
    assert_string_equal(outcome_name(cap.r[0].outcome), outcome_name(OUTCOME_TRANSIENT));
    assert_int_not_equal(cap.r[0].reason, OUTCOME_R_NETWORK);
    assert_int_equal(cap.r[0].code, 421);
    assert_string_equal(cap.r[0].enh, "4.3.2");
    assert_string_equal(cap.r[0].text, "fake.test busy, try later");

    fs->sc = &dropped;
    dcap_t c2 = { .gate_allow = -1 };
    domain_request_t q2 = request(&a, &c2);
    start(f, &q2, &c2);
    finish_leg(f, &c2);
    assert_int_equal(fs->naccepted, 2); /* one more connection, no retry */
    assert_int_equal(c2.gate_calls, 1);
    assert_rcpt(&c2, 0, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, 421, "4.4.2");
    assert_string_equal(c2.r[0].text, "fake.test connection dropped");
}

/* The server takes the body and hangs up before its reply: every
 * recipient is reported cut (maybe delivered) as soon as that attempt
 * returns, before the fast retry; the retry's own result is the report. */
static void test_cut_after_dot(void **state)
{
    fx_t *f = *state;
    static const script_t cut = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok, .eod_close = 1 };
    fake_server_t *fs = server(f, &cut);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test" };

    /* no fast retry: cut, then transient, no server answer */
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2, .gate = 1 };
    dcap_t c1 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a, &c1);
    start(f, &q1, &c1);
    finish_leg(f, &c1);
    assert_int_equal(fs->nmessages, 1);
    assert_int_equal(c1.ncuts, 2);
    assert_int_equal(c1.cut_k[0], 0);
    assert_int_equal(c1.cut_k[1], 1);
    for (size_t i = 0; i < 2; i++) {
        assert_string_equal(outcome_name(c1.r[i].outcome), outcome_name(OUTCOME_TRANSIENT));
        assert_int_equal(c1.r[i].code, 0);
    }

    /* a fast retry that delivers: the cuts came with the first attempt */
    leg_args_t a2 = a;
    a2.fast_retries = 2;
    a2.fast_base_ms = 5;
    dcap_t c2 = { .gate_allow = -1, .srv = fs, .switch_to = &fakesmtp_script_ok };
    domain_request_t q2 = request(&a2, &c2);
    start(f, &q2, &c2);
    finish_leg(f, &c2);
    assert_int_equal(c2.gate_calls, 2);
    assert_int_equal(c2.ncuts, 2);
    assert_int_equal(c2.cut_k[0], 0);
    assert_int_equal(c2.cut_k[1], 1);
    assert_int_equal(c2.cut_gate_calls[0], 1); /* before the retry was asked for */
    assert_int_equal(c2.cut_gate_calls[1], 1);
    assert_int_equal(fs->nmessages, 3);
    assert_rcpt(&c2, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_rcpt(&c2, 1, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
}

/* ------------------------------------------------------------------ */
/* 4. the gate                                                         */

static void test_gate_refuses(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2, .fast_retries = 2, .fast_base_ms = 5,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = 0, .gate_why = "broker connection lost" };
    domain_request_t rq = request(&a, &cap);

    domain_leg_t *leg = start(f, &rq, &cap); /* relay mode: the gate is asked inside domain_start */
    run_until(f->loop, &cap.fired);
    spin_ms(f->loop, 50);
    assert_int_equal(cap.fired, 1);
    assert_int_equal(cap.gate_calls, 1);
    assert_int_equal(domain_smtp_started(leg), 0);
    assert_int_equal(fs->naccepted, 0); /* no SMTP connection */
    assert_int_equal(cap.nrcpts, 2);
    for (size_t i = 0; i < 2; i++) {
        assert_rcpt(&cap, i, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, 0, "");
        assert_string_equal(cap.r[i].text, "broker connection lost");
    }
    assert_string_equal(cap.mx_host, "");
    assert_int_equal(cap.throttle_wait_ms, 0);
    domain_free(leg);
}

/* Asked again before the fast retry: a no then ends the leg with its text,
 * without a second connection. */
static void test_gate_before_fast_retry(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_hangup);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1, .fast_retries = 2, .fast_base_ms = 5,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = 1, .gate_why = "broker connection lost", .srv = fs };
    domain_request_t rq = request(&a, &cap);

    domain_leg_t *leg = start(f, &rq, &cap);
    run_until(f->loop, &cap.fired);
    spin_ms(f->loop, 50);
    assert_int_equal(cap.gate_calls, 2);
    assert_int_equal(cap.gate_srv_accepted[1], 1);
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(domain_smtp_started(leg), 1);
    assert_rcpt(&cap, 0, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, 0, "");
    assert_string_equal(cap.r[0].text, "broker connection lost");
    domain_free(leg);
}

/* ------------------------------------------------------------------ */
/* 5. rate limits                                                      */

#define SLOW_PREFIX "local rate limit slow.test:1/h: next free slot in"

static void test_rate_limit_deferred(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, "slow.test:1/h", 50);
    const char *rcpts[] = { "b@slow.test", "c@slow.test" };
    leg_args_t a = { .domain = "slow.test", .rcpts = rcpts, .nrcpts = 2, .fast_retries = 2, .fast_base_ms = 5,
                     .gate = 1 };

    dcap_t c1 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a, &c1);
    start(f, &q1, &c1);
    finish_leg(f, &c1);
    assert_rcpt(&c1, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_rcpt(&c1, 1, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_int_equal(c1.throttle_wait_ms, 0);

    dcap_t c2 = { .gate_allow = -1 };
    domain_request_t q2 = request(&a, &c2);
    domain_leg_t *leg2 = start(f, &q2, &c2);
    run_until(f->loop, &c2.fired);
    spin_ms(f->loop, 30);
    assert_int_equal(c2.fired, 1);
    assert_int_equal(c2.nrcpts, 2);
    for (size_t i = 0; i < 2; i++) {
        assert_rcpt(&c2, i, OUTCOME_TRANSIENT, OUTCOME_R_RATE_LIMITED, 0, "");
        if (strncmp(c2.r[i].text, SLOW_PREFIX, strlen(SLOW_PREFIX)) != 0)
            fail_msg("text \"%s\"", c2.r[i].text);
    }
    assert_string_equal(c2.r[0].text, SLOW_PREFIX " 3600 s");
    assert_true(c2.throttle_wait_ms > 3600000 - 60000 && c2.throttle_wait_ms <= 3600000);
    assert_int_equal(c2.gate_calls, 0); /* no SMTP attempt */
    assert_int_equal(domain_smtp_started(leg2), 0);
    assert_int_equal(fs->naccepted, 1);
    assert_string_equal(c2.mx_host, "");
    domain_free(leg2);

    /* another domain is not limited */
    const char *r3[] = { "b@y.test" };
    leg_args_t a3 = { .domain = "y.test", .rcpts = r3, .nrcpts = 1 };
    dcap_t c3 = { .gate_allow = -1 };
    domain_request_t q3 = request(&a3, &c3);
    start(f, &q3, &c3);
    finish_leg(f, &c3);
    assert_rcpt(&c3, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_int_equal(c3.throttle_wait_ms, 0);
}

/* 20/s: two legs at once; the second waits its 50 ms slot, then delivers. */
static void test_rate_limit_waits(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, "fast.test:20/s", 1000);
    const char *rcpts[] = { "b@fast.test" };
    leg_args_t a = { .domain = "fast.test", .rcpts = rcpts, .nrcpts = 1, .gate = 1 };
    dcap_t c1 = { .gate_allow = -1 }, c2 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a, &c1), q2 = request(&a, &c2);

    uint64_t t0 = util_mono_ms();
    start(f, &q1, &c1);
    start(f, &q2, &c2);
    assert_int_equal(c1.gate_calls, 1); /* the first slot is free: SMTP at once */
    assert_int_equal(c2.gate_calls, 0); /* the second waits for its slot */
    run_until(f->loop, &c1.fired);
    run_until(f->loop, &c2.fired);
    assert_int_equal(c2.gate_calls, 1);
    assert_true(c2.gate_ms[0] - t0 >= 50);
    assert_true(c2.done_ms - t0 >= 50);
    assert_rcpt(&c1, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_rcpt(&c2, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_int_equal(c1.throttle_wait_ms, 0);
    assert_int_equal(c2.throttle_wait_ms, 0);
    assert_int_equal(fs->nmessages, 2);
    finish_leg(f, &c1);
    finish_leg(f, &c2);

    /* a third leg right after: the next slot is 50 ms after the second's */
    dcap_t c3 = { .gate_allow = -1 };
    domain_request_t q3 = request(&a, &c3);
    uint64_t second = c2.gate_ms[0];
    start(f, &q3, &c3);
    finish_leg(f, &c3);
    assert_int_equal(c3.gate_calls, 1);
    assert_true(c3.gate_ms[0] - t0 >= 100); /* slots at t0, t0 + 50, t0 + 100 */
    assert_true(c3.gate_ms[0] >= second);
    assert_rcpt(&c3, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
}

/* Each fast retry takes a slot of its own: under 1/h the retry finds none
 * and the leg ends rate-limited. */
static void test_fast_retry_takes_slot(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_hangup);
    relay_env(f, fs->port, "slow.test:1/h", 50);
    const char *rcpts[] = { "b@slow.test" };
    leg_args_t a = { .domain = "slow.test", .rcpts = rcpts, .nrcpts = 1, .fast_retries = 2, .fast_base_ms = 5,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(cap.gate_calls, 1);
    assert_rcpt(&cap, 0, OUTCOME_TRANSIENT, OUTCOME_R_RATE_LIMITED, 0, "");
    assert_string_equal(cap.r[0].text, SLOW_PREFIX " 3600 s");
    assert_true(cap.throttle_wait_ms > 3600000 - 60000 && cap.throttle_wait_ms <= 3600000);
}

/* ------------------------------------------------------------------ */
/* 6. DNS                                                              */

static void dns_case(fx_t *f, const char *domain, outcome_t o, int status)
{
    const char *rcpts[] = { "b@x.test", "c@x.test" };
    leg_args_t a = { .domain = domain, .rcpts = rcpts, .nrcpts = 2, .fast_retries = 2, .fast_base_ms = 5,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);
    char want[320];
    snprintf(want, sizeof(want), "%s: %s", domain, dns_strerror(status));

    domain_leg_t *leg = start(f, &rq, &cap);
    run_until(f->loop, &cap.fired);
    assert_int_equal(domain_smtp_started(leg), 0);
    assert_int_equal(cap.gate_calls, 0);
    assert_int_equal(cap.nrcpts, 2);
    for (size_t i = 0; i < 2; i++) {
        assert_rcpt(&cap, i, o, OUTCOME_R_DNS, 0, "");
        assert_string_equal(cap.r[i].text, want);
    }
    assert_string_equal(cap.mx_host, "");
    assert_string_equal(cap.mx_addr, "");
    assert_int_equal(cap.throttle_wait_ms, 0);
    finish_leg(f, &cap);
}

static void test_dns_failures(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    mx_env(f, fs->port);
    dns_case(f, "nx.test", OUTCOME_PERMANENT, DNS_NXDOMAIN);
    dns_case(f, "null.test", OUTCOME_PERMANENT, DNS_NULLMX);
    dns_case(f, "fail.test", OUTCOME_TRANSIENT, DNS_TEMPFAIL);
    dns_case(f, "drop.test", OUTCOME_TRANSIENT, DNS_TIMEOUT);
    assert_int_equal(fs->naccepted, 0);
}

/* ------------------------------------------------------------------ */
/* 7. domain_free                                                      */

/* While the MX query is in flight: nothing fires, even once it times out. */
static void test_free_during_dns(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    mx_env(f, fs->port);
    const char *rcpts[] = { "b@drop.test" };
    leg_args_t a = { .domain = "drop.test", .rcpts = rcpts, .nrcpts = 1, .gate = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    domain_leg_t *leg = start(f, &rq, &cap);
    spin_ms(f->loop, 50);
    assert_true(f->mock.nqueries >= 1); /* the query is out */
    domain_free(leg);
    spin_ms(f->loop, 400); /* past the resolver's 200 ms timeout */
    assert_int_equal(cap.fired, 0);
    assert_int_equal(cap.gate_calls, 0);

    /* and the same freed before the loop ever ran */
    const char *r2[] = { "b@mx.test" };
    leg_args_t a2 = { .domain = "mx.test", .rcpts = r2, .nrcpts = 1, .gate = 1 };
    dcap_t c2 = { .gate_allow = -1 };
    domain_request_t q2 = request(&a2, &c2);
    domain_free(start(f, &q2, &c2));
    spin_ms(f->loop, 100);
    assert_int_equal(c2.fired, 0);
    assert_int_equal(c2.gate_calls, 0);
    assert_int_equal(fs->naccepted, 0);
}

/* While the SMTP session runs: the connection is dropped, nothing fires. */
static void test_free_during_smtp(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_silent);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1, .fast_retries = 2, .fast_base_ms = 5 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    domain_leg_t *leg = start(f, &rq, &cap);
    for (int i = 0; i < 200 && fs->naccepted == 0; i++)
        loop_run_once(f->loop, 10);
    assert_int_equal(fs->naccepted, 1);
    assert_true(fake_server_busy(fs));
    domain_free(leg);
    for (int i = 0; i < 200 && fake_server_busy(fs); i++)
        loop_run_once(f->loop, 10);
    assert_false(fake_server_busy(fs)); /* the client hung up */
    spin_ms(f->loop, 50);
    assert_int_equal(cap.fired, 0);
    assert_int_equal(fs->naccepted, 1); /* no fast retry either */
    /* nothing of the leg is left in the loop: only the listener */
    assert_int_equal(loop_fd_count(f->loop), 1);
    assert_int_equal(loop_timer_count(f->loop), 0);
}

/* While the timer runs to a rate-limit slot. */
static void test_free_during_slot_wait(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, "wait.test:4/s", 2000);
    const char *rcpts[] = { "b@wait.test" };
    leg_args_t a = { .domain = "wait.test", .rcpts = rcpts, .nrcpts = 1, .gate = 1 };
    dcap_t c1 = { .gate_allow = -1 }, c2 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a, &c1), q2 = request(&a, &c2);

    start(f, &q1, &c1);
    finish_leg(f, &c1);
    for (int i = 0; i < 100 && (loop_fd_count(f->loop) > 1 || loop_timer_count(f->loop)); i++)
        loop_run_once(f->loop, 10);
    assert_int_equal(loop_timer_count(f->loop), 0);

    domain_leg_t *leg = start(f, &q2, &c2); /* its slot is ~250 ms away */
    assert_int_equal(c2.gate_calls, 0);
    assert_int_equal(loop_timer_count(f->loop), 1);
    domain_free(leg);
    assert_int_equal(loop_timer_count(f->loop), 0);
    spin_ms(f->loop, 400);
    assert_int_equal(c2.fired, 0);
    assert_int_equal(c2.gate_calls, 0);
    assert_int_equal(fs->naccepted, 1);
}

/* While the timer runs to a fast retry. */
static void test_free_during_fast_wait(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_hangup);
    relay_env(f, fs->port, NULL, 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1, .fast_retries = 2, .fast_base_ms = 300,
                     .gate = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);

    domain_leg_t *leg = start(f, &rq, &cap);
    /* the first attempt fails; the leg then only has its timer */
    uint64_t end = util_mono_ms() + 2000;
    while (util_mono_ms() < end && !(fs->naccepted == 1 && loop_fd_count(f->loop) == 1 &&
                                     loop_timer_count(f->loop) == 1))
        loop_run_once(f->loop, 5);
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(loop_fd_count(f->loop), 1); /* the listener */
    assert_int_equal(loop_timer_count(f->loop), 1);
    assert_int_equal(cap.gate_calls, 1);
    assert_int_equal(cap.fired, 0);
    domain_free(leg);
    assert_int_equal(loop_timer_count(f->loop), 0);
    spin_ms(f->loop, 500);
    assert_int_equal(cap.fired, 0);
    assert_int_equal(cap.gate_calls, 1);
    assert_int_equal(fs->naccepted, 1);
}

/* While the zero-delay report is pending (the gate said no inside
 * domain_start): freed before the loop runs, nothing fires. */
static void test_free_before_report(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, "slow.test:1/h", 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1, .gate = 1 };
    dcap_t cap = { .gate_allow = 0, .gate_why = "no broker" };
    domain_request_t rq = request(&a, &cap);
    domain_free(start(f, &rq, &cap));
    assert_int_equal(cap.gate_calls, 1);
    assert_int_equal(loop_timer_count(f->loop), 0);

    /* a rate-limit deferral likewise */
    const char *r2[] = { "b@slow.test" };
    leg_args_t a2 = { .domain = "slow.test", .rcpts = r2, .nrcpts = 1, .gate = 1 };
    dcap_t c1 = { .gate_allow = -1 }, c2 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a2, &c1), q2 = request(&a2, &c2);
    start(f, &q1, &c1);
    finish_leg(f, &c1);
    domain_free(start(f, &q2, &c2));
    spin_ms(f->loop, 50);
    assert_int_equal(cap.fired, 0);
    assert_int_equal(c2.fired, 0);
    assert_int_equal(c2.gate_calls, 0);
    assert_int_equal(fs->naccepted, 1);
}

/* domain_free() from inside done, for each way a leg reports: after SMTP
 * (inside deliver's callback), from the report timer (gate, DNS, rate
 * limit), after fast retries. ASan has the last word. */
static void test_free_inside_done(void **state)
{
    fx_t *f = *state;
    fake_server_t *ok = server(f, &fakesmtp_script_ok);
    fake_server_t *hang = server(f, &fakesmtp_script_hangup);
    mx_env(f, ok->port);
    const char *rcpts[] = { "b@mx.test", "c@mx.test" };

    /* delivered over MX */
    leg_args_t a = { .domain = "mx.test", .rcpts = rcpts, .nrcpts = 2, .gate = 1 };
    dcap_t c1 = { .gate_allow = -1, .free_in_cb = 1 };
    domain_request_t q1 = request(&a, &c1);
    start(f, &q1, &c1);
    run_until(f->loop, &c1.fired);
    assert_null(c1.leg);
    assert_rcpt(&c1, 1, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");

    /* DNS failure */
    leg_args_t an = { .domain = "nx.test", .rcpts = rcpts, .nrcpts = 2, .gate = 1 };
    dcap_t c2 = { .gate_allow = -1, .free_in_cb = 1 };
    domain_request_t q2 = request(&an, &c2);
    start(f, &q2, &c2);
    run_until(f->loop, &c2.fired);
    assert_null(c2.leg);
    assert_rcpt(&c2, 0, OUTCOME_PERMANENT, OUTCOME_R_DNS, 0, "");

    /* gate refusal */
    dcap_t c3 = { .gate_allow = 0, .gate_why = "no broker", .free_in_cb = 1 };
    domain_request_t q3 = request(&a, &c3);
    start(f, &q3, &c3);
    run_until(f->loop, &c3.fired);
    assert_null(c3.leg);
    assert_string_equal(c3.r[0].text, "no broker");

    /* after fast retries, in relay mode */
    deliver_ctx_free(f->dctx);
    f->dctx = NULL;
    relay_env(f, hang->port, NULL, 0);
    leg_args_t ar = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2, .fast_retries = 1, .fast_base_ms = 5 };
    dcap_t c4 = { .gate_allow = -1, .free_in_cb = 1 };
    domain_request_t q4 = request(&ar, &c4);
    start(f, &q4, &c4);
    run_until(f->loop, &c4.fired);
    assert_null(c4.leg);
    assert_int_equal(hang->naccepted, 2);
    assert_rcpt(&c4, 1, OUTCOME_TRANSIENT, OUTCOME_R_NETWORK, 0, "");
    spin_ms(f->loop, 50);
    assert_int_equal(c1.fired + c2.fired + c3.fired + c4.fired, 4);
}


/* ------------------------------------------------------------------ */
/* 8. the ledger, per transaction                                      */

/* Each transaction is recorded as it ends: "sending" before the dot (the
 * dot waits for it: with Redis mute it never goes, while the body does),
 * then "done" for the 2xx, nothing for a refused recipient. */
static void test_ledger_marks_before_dot_done_after(void **state)
{
    fx_t *f = *state;
    static const rule_t rules[] = {
        { "EHLO", "250-fake.test\r\n250 PIPELINING\r\n", ACT_REPLY },
        { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
        { "RCPT TO:<c@", "550 5.1.1 no such user\r\n", ACT_REPLY },
        { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
        { "DATA", "354 go ahead\r\n", ACT_REPLY },
        { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
        { NULL, NULL, 0 },
    };
    static const script_t sc = { .greeting = "220 fake.test ESMTP\r\n", .rules = rules,
                                 .eod_reply = "250 2.0.0 Ok: queued\r\n" };
    fake_server_t *fs = server(f, &sc);
    relay_env(f, fs->port, NULL, 0);
    with_ledger(f, 5000, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test", "d@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 3 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);
    f->redis->mute = 1;
    start(f, &rq, &cap);
    /* the body arrives, the dot does not: the mark is unanswered */
    for (uint64_t until = util_mono_ms() + 3000; util_mono_ms() < until;) {
        loop_run_once(f->loop, 10);
        const char *tr = fake_server_transcript(fs);
        size_t n = strlen(tr), h = strlen(PAYLOAD_HELD);
        if (n >= h && strcmp(tr + n - h, PAYLOAD_HELD) == 0)
            break;
    }
    spin_ms(f->loop, 150);
    const char *tr = fake_server_transcript(fs);
    assert_true(strlen(tr) >= strlen(PAYLOAD_HELD));
    assert_string_equal(tr + strlen(tr) - strlen(PAYLOAD_HELD), PAYLOAD_HELD);
    assert_int_equal(fs->nmessages, 0);
    assert_int_equal(cap.fired, 0);
    assert_non_null(strstr(buf_head(&f->redis->log), "EVAL <script> 2 mp:r:test-msg-1:b@y.test "
                                                      "mp:r:test-msg-1:d@y.test 60000 sending sending\n"));
    fakeredis_unmute(f->redis); /* the retried mark is answered, the dot goes */
    finish_leg(f, &cap);
    assert_int_equal(fs->nmessages, 1);
    assert_rcpt(&cap, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_rcpt(&cap, 1, OUTCOME_PERMANENT, OUTCOME_R_NO_SUCH_USER, 550, "5.1.1");
    assert_rcpt(&cap, 2, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    /* recorded before the leg reported */
    assert_string_equal(record(f, "b@y.test"), "done");
    assert_null(record(f, "c@y.test"));
    assert_string_equal(record(f, "d@y.test"), "done");
}

/* A recipient the job flagged is recorded "done-dup" when delivered; a
 * refusal after the dot leaves no record for the others, the flagged
 * one's mark stays (an earlier copy may be at the server). */
static void test_ledger_flagged_and_refused(void **state)
{
    fx_t *f = *state;
    static const script_t refuse = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok,
                                     .eod_reply = "554 5.7.1 rejected as spam\r\n" };
    fake_server_t *ok = server(f, &fakesmtp_script_ok);
    fake_server_t *no = server(f, &refuse);
    relay_env(f, ok->port, NULL, 0);
    with_ledger(f, 5000, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test" };
    static const unsigned char flagged[] = { 1, 0 };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2 };
    dcap_t c1 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a, &c1);
    q1.flagged = flagged;
    start(f, &q1, &c1);
    finish_leg(f, &c1);
    assert_string_equal(record(f, "b@y.test"), "done-dup");
    assert_string_equal(record(f, "c@y.test"), "done");

    /* the same two refused after the dot, to another message */
    deliver_ctx_free(f->dctx);
    f->dctx = NULL;
    ledger_t *l = f->ledger;
    rclient_t *rc = f->rc;
    fakeredis_t *redis = f->redis;
    relay_env(f, no->port, NULL, 0);
    f->svc.ledger = l;
    f->svc.mark_wait_ms = 5000;
    fakeredis_set(redis, "mp:r:test-msg-1:b@y.test", "sending"); /* left by an earlier attempt */
    fakeredis_set(redis, "mp:r:test-msg-1:c@y.test", "done");
    dcap_t c2 = { .gate_allow = -1 };
    domain_request_t q2 = request(&a, &c2);
    q2.flagged = flagged;
    start(f, &q2, &c2);
    finish_leg(f, &c2);
    assert_rcpt(&c2, 0, OUTCOME_PERMANENT, OUTCOME_R_SPAM, 554, "5.7.1");
    assert_string_equal(record(f, "b@y.test"), "sending");
    assert_null(record(f, "c@y.test"));
    assert_ptr_equal(f->rc, rc);
}

/* Cut after the dot: the marks stay; the fast retry that delivers records
 * "done-dup" (that copy may be the second). */
static void test_ledger_cut_then_retry(void **state)
{
    fx_t *f = *state;
    static const script_t cut = { .greeting = "220 fake.test ESMTP\r\n", .rules = fakesmtp_rules_ok, .eod_close = 1 };
    fake_server_t *fs = server(f, &cut);
    relay_env(f, fs->port, NULL, 0);
    with_ledger(f, 5000, 0);
    const char *rcpts[] = { "b@y.test", "c@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2, .gate = 1 };
    dcap_t c1 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a, &c1);
    start(f, &q1, &c1);
    finish_leg(f, &c1);
    assert_int_equal(fs->nmessages, 1);
    assert_string_equal(record(f, "b@y.test"), "sending");
    assert_string_equal(record(f, "c@y.test"), "sending");

    leg_args_t a2 = a;
    a2.fast_retries = 2;
    a2.fast_base_ms = 5;
    dcap_t c2 = { .gate_allow = -1, .srv = fs, .switch_to = &fakesmtp_script_ok };
    domain_request_t q2 = request(&a2, &c2);
    start(f, &q2, &c2);
    finish_leg(f, &c2);
    assert_int_equal(fs->nmessages, 3);
    assert_rcpt(&c2, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_string_equal(record(f, "b@y.test"), "done-dup");
    assert_string_equal(record(f, "c@y.test"), "done-dup");
}

/* Redis keeps failing: the mark is tried until mark_wait is spent, then
 * the transaction is abandoned before its dot (the server got the body,
 * never the dot: no message), the recipients deferred ledger_unavailable,
 * no fast retry. With send_unrecorded the dot goes anyway. */
static void test_ledger_down_not_sent(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    with_ledger(f, 400, 0);
    f->redis->fail_next = 1000;
    const char *rcpts[] = { "b@y.test", "c@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2, .fast_retries = 2, .fast_base_ms = 5,
                     .gate = 1 };
    dcap_t c1 = { .gate_allow = -1 };
    domain_request_t q1 = request(&a, &c1);
    uint64_t t0 = util_mono_ms();
    start(f, &q1, &c1);
    finish_leg(f, &c1);
    uint64_t took = c1.done_ms - t0;
    assert_true(took >= 380 && took < 3000);
    assert_int_equal(fs->nmessages, 0);
    assert_int_equal(c1.gate_calls, 1);
    const char *tr = fake_server_transcript(fs);
    assert_string_equal(tr + strlen(tr) - strlen("DATA\r\n" PAYLOAD_HELD), "DATA\r\n" PAYLOAD_HELD);
    for (size_t i = 0; i < 2; i++) {
        assert_rcpt(&c1, i, OUTCOME_TRANSIENT, OUTCOME_R_LEDGER, 0, "");
        assert_non_null(strstr(c1.r[i].text, "not sent"));
    }
    size_t evals = 0;
    for (const char *p = buf_head(&f->redis->log); (p = strstr(p, " sending sending\n")) != NULL; p++)
        evals++;
    assert_true(evals >= 3); /* tried again while mark_wait lasted */
    assert_null(record(f, "b@y.test"));

    f->svc.send_unrecorded = 1;
    dcap_t c2 = { .gate_allow = -1 };
    domain_request_t q2 = request(&a, &c2);
    start(f, &q2, &c2);
    finish_leg(f, &c2);
    assert_int_equal(fs->nmessages, 1);
    assert_rcpt(&c2, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
}

/* A Redis that fails a moment and comes back within mark_wait: the dot
 * goes after the retried mark, and the record follows. */
static void test_ledger_mark_retried(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    with_ledger(f, 3000, 0);
    f->redis->fail_next = 2;
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t c = { .gate_allow = -1 };
    domain_request_t q = request(&a, &c);
    start(f, &q, &c);
    finish_leg(f, &c);
    assert_int_equal(fs->nmessages, 1);
    assert_rcpt(&c, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_string_equal(record(f, "b@y.test"), "done");
    assert_string_equal(buf_head(&f->redis->log),
                        "EVAL <script> 1 mp:r:test-msg-1:b@y.test 60000 sending\n"
                        "EVAL <script> 1 mp:r:test-msg-1:b@y.test 60000 sending\n"
                        "EVAL <script> 1 mp:r:test-msg-1:b@y.test 60000 sending\n"
                        "EVAL <script> 1 mp:r:test-msg-1:b@y.test 60000 done\n");
}

/* Freed while its dot waits for the mark: nothing fires, nothing leaks,
 * the loop ends empty (teardown). */
static void test_ledger_free_while_held(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    with_ledger(f, 5000, 0);
    f->redis->mute = 1;
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t c = { .gate_allow = -1 };
    domain_request_t q = request(&a, &c);
    domain_leg_t *leg = start(f, &q, &c);
    spin_ms(f->loop, 300);
    assert_int_equal(fs->nmessages, 0);
    domain_free(leg);
    c.leg = NULL;
    fakeredis_unmute(f->redis);
    spin_ms(f->loop, 300);
    assert_int_equal(c.fired, 0);
    assert_int_equal(fs->nmessages, 0);
}

static int group_setup(void **state)
{
    const char *lvl = getenv("MP_TEST_LOG");
    signal(SIGPIPE, SIG_IGN);
    log_setup(lvl ? (enum log_level)log_level_from_name(lvl) : LOG_WARN, LOG_FMT_LOGFMT);
    return 0;
}

/* A "done" Redis refuses is sent again until it is recorded: the copy is
 * not left to be flagged as a duplicate by a redelivery. */
static void test_ledger_done_retried(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    with_ledger(f, 5000, 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&a, &cap);
    uint64_t unavailable = metrics_counter(MET_LEDGER_UNAVAILABLE);
    f->redis->mute = 1;
    start(f, &rq, &cap);
    for (uint64_t until = util_mono_ms() + 3000; util_mono_ms() < until;) {
        loop_run_once(f->loop, 10);
        const char *tr = fake_server_transcript(fs);
        size_t n = strlen(tr), h = strlen(PAYLOAD_HELD);
        if (n >= h && strcmp(tr + n - h, PAYLOAD_HELD) == 0)
            break;
    }
    f->redis->fail_only = "60000 done";
    f->redis->fail_next = 2; /* the "done" and its first retry */
    fakeredis_unmute(f->redis);
    finish_leg(f, &cap);
    assert_rcpt(&cap, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_string_equal(record(f, "b@y.test"), "done");
    assert_int_equal(metrics_counter(MET_LEDGER_UNAVAILABLE), unavailable);
    const char *log = buf_head(&f->redis->log);
    size_t dones = 0;
    for (const char *p = log; (p = strstr(p, "60000 done\n")) != NULL; p++)
        dones++;
    if (dones != 3)
        fprintf(stderr, "redis log:\n%s", log);
    assert_int_equal(dones, 3);
}

/* ------------------------------------------------------------------ */
/* sites: one connection at a time, one waiting, the rest parked        */

static void test_site_waits_and_parks(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    sites_config_t sc = { .max_connections = 1, .max_waiting = 1, .max_wait_ms = 10000 };
    f->sites = sites_new(f->loop, &sc, NULL, NULL);
    f->svc.sites = f->sites;
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t cap[3];
    domain_request_t rq[3];
    for (int i = 0; i < 3; i++) {
        memset(&cap[i], 0, sizeof(cap[i]));
        cap[i].gate_allow = -1;
        cap[i].srv = fs;
        rq[i] = request(&a, &cap[i]);
        start(f, &rq[i], &cap[i]);
    }
    sites_stats_t st;
    sites_get_stats(f->sites, &st);
    assert_int_equal(st.running, 1);
    assert_int_equal(st.waiting, 1);
    assert_int_equal(st.parked, 1);
    /* the third is parked at once, reported from the loop, no server asked */
    run_until(f->loop, &cap[2].fired);
    assert_int_equal(domain_smtp_started(cap[2].leg), 0);
    assert_rcpt(&cap[2], 0, OUTCOME_TRANSIENT, OUTCOME_R_PARKED, 0, "");
    assert_string_equal(cap[2].r[0].text, "parked: site relay.test has 1 of 1 connections busy and 1 messages "
                                          "waiting (too many waiting)");
    /* the first is delivered, then the second on the place it gave back */
    finish_leg(f, &cap[0]);
    assert_rcpt(&cap[0], 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    finish_leg(f, &cap[1]);
    assert_rcpt(&cap[1], 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_true(cap[1].done_ms >= cap[0].done_ms);
    domain_free(cap[2].leg);
    sites_get_stats(f->sites, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.sites, 0);
    assert_int_equal(fs->naccepted, 2);
}

/* A leg freed while it waits for its site gives its place in the FIFO
 * back, and the next waiter runs. */
static void test_site_free_while_waiting(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    sites_config_t sc = { .max_connections = 1, .max_waiting = 5, .max_wait_ms = 10000 };
    f->sites = sites_new(f->loop, &sc, NULL, NULL);
    f->svc.sites = f->sites;
    const char *rcpts[] = { "b@y.test" };
    leg_args_t a = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t cap[3];
    domain_request_t rq[3];
    for (int i = 0; i < 3; i++) {
        memset(&cap[i], 0, sizeof(cap[i]));
        cap[i].gate_allow = -1;
        cap[i].srv = fs;
        rq[i] = request(&a, &cap[i]);
        start(f, &rq[i], &cap[i]);
    }
    domain_free(cap[1].leg);
    cap[1].leg = NULL;
    finish_leg(f, &cap[0]);
    finish_leg(f, &cap[2]);
    assert_rcpt(&cap[2], 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_int_equal(cap[1].fired, 0);
    sites_stats_t st;
    sites_get_stats(f->sites, &st);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(st.sites, 0);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

/* ------------------------------------------------------------------ */
/* shaping actions and automation                                      */

/* The worker's actions table (no Redis: its own view only) and, with
 * shaping text, a policy of that shaping file. */
static void with_shaping(fx_t *f, const char *shaping)
{
    f->actions = actions_new(f->loop, NULL, &(actions_config_t){ 0 }, NULL, NULL);
    f->svc.actions = f->actions;
    if (shaping) {
        char path[] = "/tmp/mp-test-shaping-XXXXXX";
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, shaping, strlen(shaping)), (ssize_t)strlen(shaping));
        close(fd);
        char err[256] = "";
        f->policy = policy_load(NULL, path, err, sizeof(err));
        unlink(path);
        if (f->policy == NULL)
            fail_msg("shaping: %s", err);
        f->svc.policy = f->policy;
    }
}

/* A suspension in force: the leg asks no server, its recipients are
 * deferred "suspended" no sooner than its end, and say which action. */
static void test_action_suspends(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    with_shaping(f, NULL);
    action_t a = { .kind = ACTION_SUSPEND, .sel = SEL_SITE, .expires_ms = util_wall_ms() + 60000 };
    snprintf(a.value, sizeof(a.value), "relay.test");
    snprintf(a.reason, sizeof(a.reason), "421 4.7.0 [TS01] deferred");
    snprintf(a.origin, sizeof(a.origin), "automation:ts01");
    assert_int_equal(actions_add(f->actions, &a), 0);
    const char *rcpts[] = { "b@y.test", "c@y.test" };
    leg_args_t la = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 2 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&la, &cap);
    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_int_equal(fs->naccepted, 0);
    for (size_t i = 0; i < 2; i++) {
        assert_rcpt(&cap, i, OUTCOME_TRANSIENT, OUTCOME_R_SUSPENDED, 0, "");
        assert_non_null(strstr(cap.r[i].text, "suspended by shaping action suspend:site:relay.test for 60 s more "
                                             "(automation:ts01): 421 4.7.0 [TS01] deferred"));
        assert_string_equal(cap.shaping[i], "suspend:automation:ts01");
        assert_string_equal(cap.source[i], "");
    }
    assert_true(cap.throttle_wait_ms > 59000 && cap.throttle_wait_ms <= 60000);
}

/* An operator's bounce in force ends the recipients permanent, reason
 * admin naming who and why, and a selector of another kind (a tenant)
 * matches through the request. */
static void test_action_bounces_by_tenant(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    with_shaping(f, NULL);
    action_t a = { .kind = ACTION_BOUNCE, .sel = SEL_TENANT, .expires_ms = util_wall_ms() + 60000 };
    snprintf(a.value, sizeof(a.value), "acme");
    snprintf(a.reason, sizeof(a.reason), "abuse report");
    snprintf(a.origin, sizeof(a.origin), "admin:ops");
    assert_int_equal(actions_add(f->actions, &a), 0);
    const char *rcpts[] = { "b@y.test" };
    leg_args_t la = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&la, &cap);
    rq.tenant = "other-tenant"; /* not this one */
    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_rcpt(&cap, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_string_equal(cap.shaping[0], "");
    dcap_t cap2 = { .gate_allow = -1 };
    rq = request(&la, &cap2);
    rq.tenant = "acme";
    start(f, &rq, &cap2);
    finish_leg(f, &cap2);
    assert_int_equal(fs->naccepted, 1); /* the first leg's only */
    assert_rcpt(&cap2, 0, OUTCOME_PERMANENT, OUTCOME_R_ADMIN, 0, "");
    assert_string_equal(cap2.r[0].text, "bounced by admin:ops: abuse report (action bounce:tenant:acme)");
    assert_string_equal(cap2.shaping[0], "bounce:admin:ops");
}

/* An operator's suspend holds the leg whichever selector names it (site,
 * domain, tenant, campaign; pool and source: tests/integration/
 * test_admin.py): no server asked, no attempt spent, the text says who
 * and why, and the retry comes back within a minute to look (a resume
 * usually ends it) however long the action lasts. */
static void test_admin_suspend_every_selector(void **state)
{
    fx_t *f = *state;
    fake_server_t *fs = server(f, &fakesmtp_script_ok);
    relay_env(f, fs->port, NULL, 0);
    with_shaping(f, NULL);
    static const struct {
        action_sel_t sel;
        const char  *value;
    } cases[] = { { SEL_SITE, "Relay.Test" }, { SEL_DOMAIN, "y.test" }, { SEL_TENANT, "acme" },
                  { SEL_CAMPAIGN, "spring" } };
    const char *rcpts[] = { "b@y.test" };
    leg_args_t la = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    for (size_t i = 0; i < 4; i++) {
        action_t a = { .kind = ACTION_SUSPEND, .sel = cases[i].sel, .expires_ms = util_wall_ms() + 600000 };
        snprintf(a.id, sizeof(a.id), "adm-%zu", i);
        snprintf(a.value, sizeof(a.value), "%s", cases[i].value);
        snprintf(a.reason, sizeof(a.reason), "provider outage");
        snprintf(a.origin, sizeof(a.origin), "admin:alice@ops");
        assert_int_equal(actions_add(f->actions, &a), 0);
        dcap_t cap = { .gate_allow = -1 };
        domain_request_t rq = request(&la, &cap);
        rq.tenant = "acme";
        rq.campaign = "spring";
        start(f, &rq, &cap);
        finish_leg(f, &cap);
        assert_int_equal(fs->naccepted, 0);
        assert_rcpt(&cap, 0, OUTCOME_TRANSIENT, OUTCOME_R_SUSPENDED, 0, "");
        char want[200];
        snprintf(want, sizeof(want), "suspended by admin:alice@ops for 600 s more: provider outage (action adm-%zu)",
                 i);
        assert_string_equal(cap.r[0].text, want);
        assert_string_equal(cap.shaping[0], "suspend:admin:alice@ops");
        assert_int_equal(cap.throttle_wait_ms, 60000);
        assert_int_equal(actions_remove(f->actions, a.id), 0);
    }
    /* resumed: the same leg is delivered */
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&la, &cap);
    rq.tenant = "acme";
    rq.campaign = "spring";
    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_rcpt(&cap, 0, OUTCOME_DELIVERED, OUTCOME_R_DELIVERED, 250, "2.0.0");
    assert_int_equal(fs->naccepted, 1);
}

/* A reply an automation rule matches takes its action for the site, at
 * once: the next leg there is held without a connection. A reply the
 * rule does not match takes nothing. */
static void test_automation_triggers(void **state)
{
    fx_t *f = *state;
    static const script_t busy = { .greeting = "421 4.7.0 [TS01] Messages from 127.0.0.1 temporarily deferred\r\n",
                                   .greeting_act = ACT_CLOSE };
    fake_server_t *fs = server(f, &busy);
    relay_env(f, fs->port, NULL, 0);
    with_shaping(f, "[automation other]\ncode = 5\naction = bounce\nduration = 1h\n\n"
                    "[automation ts]\nsite = relay.test\ncode = 421\nmatch = \\[TS0[1-3]\\]\n"
                    "action = suspend\nduration = 90s\n");
    const char *rcpts[] = { "b@y.test" };
    leg_args_t la = { .domain = "y.test", .rcpts = rcpts, .nrcpts = 1 };
    dcap_t cap = { .gate_allow = -1 };
    domain_request_t rq = request(&la, &cap);
    start(f, &rq, &cap);
    finish_leg(f, &cap);
    assert_int_equal(fs->naccepted, 1);
    assert_int_equal(cap.r[0].code, 421);
    assert_string_equal(cap.shaping[0], "triggered:suspend:automation:ts");
    action_query_t q = { .domain = "y.test", .site = "relay.test" };
    const action_t *a = actions_find(f->actions, ACTION_SUSPEND, &q);
    assert_non_null(a);
    assert_string_equal(a->id, "suspend:site:relay.test");
    assert_string_equal(a->origin, "automation:ts");
    assert_string_equal(a->source, "");
    assert_non_null(strstr(a->reason, "421 4.7.0 [TS01] Messages from"));
    uint64_t left = a->expires_ms - util_wall_ms();
    assert_true(left > 85000 && left <= 90000);
    assert_null(actions_find(f->actions, ACTION_BOUNCE, &q));

    dcap_t cap2 = { .gate_allow = -1 };
    rq = request(&la, &cap2);
    start(f, &rq, &cap2);
    finish_leg(f, &cap2);
    assert_int_equal(fs->naccepted, 1); /* no second connection */
    assert_rcpt(&cap2, 0, OUTCOME_TRANSIENT, OUTCOME_R_SUSPENDED, 0, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_delivered_relay),
        T(test_delivered_mx),
        T(test_per_recipient),
        T(test_fast_retry_closed_port),
        T(test_fast_retry_counts_connections),
        T(test_fast_retry_then_delivered),
        T(test_no_fast_retry_after_reply),
        T(test_cut_after_dot),
        T(test_gate_refuses),
        T(test_gate_before_fast_retry),
        T(test_rate_limit_deferred),
        T(test_rate_limit_waits),
        T(test_fast_retry_takes_slot),
        T(test_dns_failures),
        T(test_free_during_dns),
        T(test_free_during_smtp),
        T(test_free_during_slot_wait),
        T(test_free_during_fast_wait),
        T(test_free_before_report),
        T(test_free_inside_done),
        T(test_ledger_marks_before_dot_done_after),
        T(test_ledger_flagged_and_refused),
        T(test_ledger_cut_then_retry),
        T(test_ledger_down_not_sent),
        T(test_ledger_mark_retried),
        T(test_ledger_free_while_held),
        T(test_ledger_done_retried),
        T(test_site_waits_and_parks),
        T(test_site_free_while_waiting),
        T(test_action_suspends),
        T(test_action_bounces_by_tenant),
        T(test_admin_suspend_every_selector),
        T(test_automation_triggers),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}

/*
 * tests/integration/itest_smtp.c - deliver.c / session.c against the real
 * Postfix receivers of the local stack (deploy/local/stack up).
 *
 * Reads ${MP_STACK_DIR:-/tmp/mpstack}/env (KEY=value lines). Never skips:
 * without the env file or a listening receiver every test fails with a
 * message saying how to start the stack.
 *
 * The receivers offer STARTTLS with a certificate for mx1/mx2.test.example
 * signed by MP_CA_FILE; reject@test.example gets 550 5.1.1, and
 * tempfail@test.example 450 4.2.0; anything else @test.example lands in
 * the Maildir MP_MX1_MAILDIR (MP_MX2_MAILDIR for mx2).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/tls.h"
#include "core/util.h"
#include "tests/support/stackenv.h"
#include "deliverer/deliver.h"

#define STACK_HINT "start the local stack first: deploy/local/stack up"

static struct {
    char     dir[256];
    char     mx1[64], mx2[64];
    unsigned port;
    char     ca_file[512];
    char     mx1_maildir[512], mx2_maildir[512];
    SSL_CTX *verify_ctx, *noverify_ctx;
} env;

/* A blocking probe, before any loop exists: is anything listening? */
static int probe(const char *ip, unsigned port)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, ip, &sin.sin_addr) != 1)
        return -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    int rc = connect(fd, (struct sockaddr *)&sin, sizeof(sin));
    if (rc == 0) {
        /* wait for the first bytes of the greeting */
        struct pollfd p = { .fd = fd, .events = POLLIN };
        char b[4];
        rc = (poll(&p, 1, 5000) == 1 && read(fd, b, sizeof(b)) > 0) ? 0 : -1;
    }
    close(fd);
    return rc;
}

static int group_setup(void **state)
{
    const char *dir = getenv("MP_STACK_DIR");
    char path[512], port[16] = "", err[256];
    const char *lvl = getenv("MP_TEST_LOG");
    log_setup(lvl ? (enum log_level)log_level_from_name(lvl) : LOG_INFO, LOG_FMT_LOGFMT);

    snprintf(env.dir, sizeof(env.dir), "%s", dir && *dir ? dir : "/tmp/mpstack");
    snprintf(path, sizeof(path), "%s", stackenv_path());
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "\n*** itest_smtp: cannot read %s (%s): %s ***\n\n", path, strerror(errno), STACK_HINT);
        return -1;
    }
    stackenv_get("MP_MX1", env.mx1, sizeof(env.mx1));
    stackenv_get("MP_MX2", env.mx2, sizeof(env.mx2));
    stackenv_get("MP_SMTP_PORT", port, sizeof(port));
    stackenv_get("MP_CA_FILE", env.ca_file, sizeof(env.ca_file));
    stackenv_get("MP_MX1_MAILDIR", env.mx1_maildir, sizeof(env.mx1_maildir));
    stackenv_get("MP_MX2_MAILDIR", env.mx2_maildir, sizeof(env.mx2_maildir));
    env.port = (unsigned)atoi(port);
    if (!env.mx1[0] || !env.mx2[0] || !env.port || !env.ca_file[0] || !env.mx1_maildir[0] || !env.mx2_maildir[0]) {
        fprintf(stderr, "\n*** itest_smtp: %s lacks MP_MX1/MP_MX2/MP_SMTP_PORT/MP_CA_FILE/MP_MX*_MAILDIR: %s ***\n\n",
                path, STACK_HINT);
        return -1;
    }
    if (probe(env.mx1, env.port) < 0 || probe(env.mx2, env.port) < 0) {
        fprintf(stderr, "\n*** itest_smtp: no SMTP receiver answers on %s:%u / %s:%u: %s ***\n\n", env.mx1,
                env.port, env.mx2, env.port, STACK_HINT);
        return -1;
    }
    env.verify_ctx = tls_client_ctx_new(env.ca_file, 1, err, sizeof(err));
    env.noverify_ctx = tls_client_ctx_new(NULL, 0, err, sizeof(err));
    if (!env.verify_ctx || !env.noverify_ctx) {
        fprintf(stderr, "\n*** itest_smtp: TLS setup with %s failed: %s ***\n\n", env.ca_file, err);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    SSL_CTX_free(env.verify_ctx);
    SSL_CTX_free(env.noverify_ctx);
    return 0;
}

/* ------------------------------------------------------------------ */

typedef struct rcpt_copy {
    char      rcpt[64];
    outcome_t outcome;
    char      reason[32];
    int       code;
    char      enh[16];
    char      text[512];
} rcpt_copy_t;

typedef struct capture {
    int         fired;
    size_t      nrcpts;
    rcpt_copy_t r[8];
    char        mx_host[256];
    char        tls_version[32];
    unsigned    attempts;
} capture_t;

static deliver_result_t last_result; /* counters of the last result (pointers not valid) */

static void on_result(void *arg, const deliver_result_t *res)
{
    last_result = *res;
    capture_t *c = arg;
    assert_int_equal(c->fired, 0);
    c->fired = 1;
    c->nrcpts = res->nrcpts;
    for (size_t i = 0; i < res->nrcpts && i < 8; i++) {
        const deliver_rcpt_result_t *r = &res->rcpts[i];
        snprintf(c->r[i].rcpt, sizeof(c->r[i].rcpt), "%s", r->rcpt);
        c->r[i].outcome = r->outcome;
        snprintf(c->r[i].reason, sizeof(c->r[i].reason), "%s", outcome_reason_name(r->reason));
        c->r[i].code = r->code;
        memcpy(c->r[i].enh, r->enh, sizeof(c->r[i].enh));
        memcpy(c->r[i].text, r->text, sizeof(c->r[i].text));
        print_message("  %s: %s/%s %d %s %s\n", r->rcpt, outcome_name(r->outcome), outcome_reason_name(r->reason), r->code, r->enh,
                      r->text);
    }
    snprintf(c->mx_host, sizeof(c->mx_host), "%s", res->mx_host);
    snprintf(c->tls_version, sizeof(c->tls_version), "%s", res->tls_version ? res->tls_version : "");
    c->attempts = res->attempts_made;
}

static deliver_candidate_t cand(const char *host, const char *ip, unsigned port)
{
    deliver_candidate_t c;
    memset(&c, 0, sizeof(c));
    snprintf(c.host, sizeof(c.host), "%s", host);
    struct sockaddr_in *sin = (struct sockaddr_in *)&c.addr;
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    assert_int_equal(inet_pton(AF_INET, ip, &sin->sin_addr), 1);
    c.addrlen = sizeof(*sin);
    return c;
}

/* A small message with a unique token, already dot-stuffed (no line
 * starts with a dot) and terminated. */
static void make_payload(buf_t *out, const char *token, const char *to)
{
    char date[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
    buf_printf(out,
               "From: <itest@mailpump.test>\r\n"
               "To: <%s>\r\n"
               "Subject: itest_smtp %s\r\n"
               "Date: %s\r\n"
               "Message-ID: <%s@mailpump.test>\r\n"
               "MIME-Version: 1.0\r\n"
               "Content-Type: text/plain; charset=us-ascii\r\n"
               "\r\n"
               "token=%s\r\n"
               ".\r\n",
               to, token, date, token, token);
}

static int file_contains(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    char line[2048];
    int found = 0;
    if (f == NULL)
        return 0;
    while (!found && fgets(line, sizeof(line), f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* Postfix delivers after it answered 250: poll the Maildir for the token. */
static int maildir_has(const char *maildir, const char *token, int timeout_ms)
{
    static const char *const subdirs[] = { "new", "cur" };
    for (int waited = 0; waited <= timeout_ms; waited += 100) {
        for (size_t s = 0; s < 2; s++) {
            char dpath[1024];
            snprintf(dpath, sizeof(dpath), "%s/%s", maildir, subdirs[s]);
            DIR *d = opendir(dpath);
            if (d == NULL)
                continue;
            struct dirent *e;
            int found = 0;
            while (!found && (e = readdir(d)) != NULL) {
                if (e->d_name[0] == '.')
                    continue;
                char fpath[2048];
                snprintf(fpath, sizeof(fpath), "%s/%s", dpath, e->d_name);
                found = file_contains(fpath, token);
            }
            closedir(d);
            if (found)
                return 1;
        }
        usleep(100 * 1000);
    }
    return 0;
}

static void run_delivery(loop_t *loop, smtp_tls_policy_t tls, const char *const *rcpts, size_t nrcpts,
                         const deliver_candidate_t *cands, size_t ncands, const buf_t *payload, capture_t *cap)
{
    deliver_config_t cfg = {
        .helo_name = "mailpump.test",
        .tls = tls,
        .tls_verify_ctx = env.verify_ctx,
        .tls_noverify_ctx = env.noverify_ctx,
        .max_mx = 5,
        .timeout_scale_pct = 10, /* connect 3 s, commands 30 s */
    };
    deliver_request_t req = {
        .mail_from = "itest@mailpump.test",
        .rcpts = rcpts,
        .nrcpts = nrcpts,
        .data = buf_head(payload),
        .len = buf_size(payload),
        .candidates = cands,
        .ncandidates = ncands,
        .log_id = "itest_smtp",
    };
    memset(cap, 0, sizeof(*cap));
    assert_non_null(deliver_start(loop, &cfg, &req, on_result, cap));
    for (int i = 0; i < 2000 && !cap->fired; i++)
        assert_true(loop_run_once(loop, 100) >= 0);
    if (!cap->fired)
        fail_msg("no result within 200 s from %s: %s", cands[0].host, STACK_HINT);
    for (int i = 0; i < 100 && (loop_fd_count(loop) || loop_timer_count(loop)); i++)
        loop_run_once(loop, 10);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
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

/* Verified STARTTLS; one transaction with an accepted, a rejected and a
 * deferred recipient; the accepted one shows up in the Maildir. */
static void test_verify_mixed_recipients(void **state)
{
    loop_t *loop = loop_new();
    char token[37];
    buf_t payload = BUF_INIT;
    capture_t cap;
    util_uuid(token);
    make_payload(&payload, token, "alice@test.example");
    deliver_candidate_t c[] = { cand("mx1.test.example", env.mx1, env.port) };
    const char *rcpts[] = { "alice@test.example", "reject@test.example", "tempfail@test.example" };

    run_delivery(loop, SMTP_TLS_VERIFY, rcpts, 3, c, 1, &payload, &cap);

    if (cap.r[0].outcome != OUTCOME_DELIVERED)
        fail_msg("alice not delivered: %d %s %s (%s)", cap.r[0].code, cap.r[0].enh, cap.r[0].text, STACK_HINT);
    assert_rcpt(&cap, 0, "alice@test.example", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap, 1, "reject@test.example", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_non_null(strstr(cap.r[1].text, "no such user"));
    assert_rcpt(&cap, 2, "tempfail@test.example", OUTCOME_TRANSIENT, "other", 450, "4.2.0");
    assert_non_null(strstr(cap.r[2].text, "try again later"));
    assert_string_equal(cap.mx_host, "mx1.test.example");
    assert_true(strncmp(cap.tls_version, "TLSv1.", 6) == 0);
    assert_int_equal(cap.attempts, 1);
    if (!maildir_has(env.mx1_maildir, token, 20000))
        fail_msg("token %s not found in %s/new within 20 s", token, env.mx1_maildir);

    buf_free(&payload);
    loop_free(loop);
}

/* Nothing listens on the first candidate: the second MX takes it. */
static void test_failover_to_mx2(void **state)
{
    loop_t *loop = loop_new();
    char token[37];
    buf_t payload = BUF_INIT;
    capture_t cap;
    util_uuid(token);
    make_payload(&payload, token, "bob@test.example");
    /* 127.0.0.1 on the SMTP port: the stack binds mx1/mx2 addresses only */
    deliver_candidate_t c[] = { cand("mx0.test.example", "127.0.0.1", env.port),
                                cand("mx2.test.example", env.mx2, env.port) };
    const char *rcpts[] = { "bob@test.example" };

    if (probe("127.0.0.1", env.port) == 0)
        fail_msg("something answers on 127.0.0.1:%u; the failover test needs it closed", env.port);
    run_delivery(loop, SMTP_TLS_VERIFY, rcpts, 1, c, 2, &payload, &cap);

    assert_rcpt(&cap, 0, "bob@test.example", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_string_equal(cap.mx_host, "mx2.test.example");
    assert_int_equal(cap.attempts, 2);
    assert_true(cap.tls_version[0] != '\0');
    if (!maildir_has(env.mx2_maildir, token, 20000))
        fail_msg("token %s not found in %s/new within 20 s", token, env.mx2_maildir);

    buf_free(&payload);
    loop_free(loop);
}

/* The certificate names mx1/mx2.test.example: any other name must fail. */
static void test_verify_wrong_name(void **state)
{
    loop_t *loop = loop_new();
    buf_t payload = BUF_INIT;
    capture_t cap;
    make_payload(&payload, "never-delivered", "alice@test.example");
    deliver_candidate_t c[] = { cand("wrong.test.example", env.mx1, env.port) };
    const char *rcpts[] = { "alice@test.example" };

    run_delivery(loop, SMTP_TLS_VERIFY, rcpts, 1, c, 1, &payload, &cap);
    assert_rcpt(&cap, 0, "alice@test.example", OUTCOME_TRANSIENT, "tls", 0, "");
    assert_non_null(strstr(cap.r[0].text, "certificate verification failed"));

    buf_free(&payload);
    loop_free(loop);
}

/* ---- the engine on a per-worker context ---------------------------- */

static deliver_ctx_t *ctx_new(loop_t *loop, smtp_tls_policy_t tls, unsigned max_rcpts, int nopool)
{
    deliver_config_t cfg = {
        .helo_name = "mailpump.test",
        .tls = tls,
        .tls_verify_ctx = env.verify_ctx,
        .tls_noverify_ctx = env.noverify_ctx,
        .max_mx = 5,
        .timeout_scale_pct = 10,
        .max_rcpts = max_rcpts,
        .pool = { .disabled = nopool },
    };
    return deliver_ctx_new(loop, &cfg);
}

static void ctx_run(loop_t *loop, deliver_ctx_t *ctx, const char *const *rcpts, size_t nrcpts,
                    const deliver_candidate_t *cands, size_t ncands, const buf_t *payload, capture_t *cap,
                    deliver_result_t *copy)
{
    deliver_request_t req = {
        .mail_from = "itest@mailpump.test",
        .rcpts = rcpts,
        .nrcpts = nrcpts,
        .data = buf_head(payload),
        .len = buf_size(payload),
        .candidates = cands,
        .ncandidates = ncands,
        .log_id = "itest_smtp_ctx",
        .domain = "test.example",
    };
    memset(cap, 0, sizeof(*cap));
    assert_non_null(deliver_ctx_start(ctx, &req, on_result, cap));
    for (int i = 0; i < 2000 && !cap->fired; i++)
        assert_true(loop_run_once(loop, 100) >= 0);
    if (!cap->fired)
        fail_msg("no result within 200 s from %s: %s", cands[0].host, STACK_HINT);
    *copy = last_result;
}

static void ctx_close(loop_t *loop, deliver_ctx_t *ctx)
{
    deliver_ctx_free(ctx);
    for (int i = 0; i < 200 && (loop_fd_count(loop) || loop_timer_count(loop)); i++)
        loop_run_once(loop, 10);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
}

/* Postfix, pooled: two recipients with one per transaction go over one
 * connection as two transactions; the next message reuses it. */
static void test_pool_split_and_reuse(void **state)
{
    loop_t *loop = loop_new();
    char t1[37], t2[37];
    buf_t p1 = BUF_INIT, p2 = BUF_INIT;
    capture_t cap;
    deliver_result_t r;
    util_uuid(t1);
    util_uuid(t2);
    make_payload(&p1, t1, "alice@test.example");
    make_payload(&p2, t2, "bob@test.example");
    deliver_candidate_t c[] = { cand("mx1.test.example", env.mx1, env.port) };
    const char *rc1[] = { "alice@test.example", "reject@test.example", "bob@test.example" };
    const char *rc2[] = { "bob@test.example" };
    deliver_ctx_t *ctx = ctx_new(loop, SMTP_TLS_VERIFY, 2, 0);

    ctx_run(loop, ctx, rc1, 3, c, 1, &p1, &cap, &r);
    assert_rcpt(&cap, 0, "alice@test.example", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_rcpt(&cap, 1, "reject@test.example", OUTCOME_PERMANENT, "no_such_user", 550, "5.1.1");
    assert_rcpt(&cap, 2, "bob@test.example", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(r.transactions, 2);
    assert_int_equal(r.connections, 1);
    ctx_run(loop, ctx, rc2, 1, c, 1, &p2, &cap, &r);
    assert_rcpt(&cap, 0, "bob@test.example", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
    assert_int_equal(r.connections, 0);
    assert_int_equal(r.reused, 1);
    deliver_stats_t st;
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.pool.connects, 1);
    assert_int_equal(st.pool.reuses, 1);
    assert_int_equal(st.tls_full, 1);
    if (!maildir_has(env.mx1_maildir, t1, 20000) || !maildir_has(env.mx1_maildir, t2, 20000))
        fail_msg("tokens %s / %s not found in %s", t1, t2, env.mx1_maildir);
    ctx_close(loop, ctx);
    buf_free(&p1);
    buf_free(&p2);
    loop_free(loop);
}

/* Postfix issues TLS session tickets: new connections resume. */
static void test_tls_resumption(void **state)
{
    loop_t *loop = loop_new();
    buf_t p = BUF_INIT;
    capture_t cap;
    deliver_result_t r;
    make_payload(&p, "resumption", "alice@test.example");
    deliver_candidate_t c[] = { cand("mx2.test.example", env.mx2, env.port) };
    const char *rc[] = { "alice@test.example" };
    deliver_ctx_t *ctx = ctx_new(loop, SMTP_TLS_VERIFY, 0, 1);

    for (int i = 0; i < 3; i++) {
        ctx_run(loop, ctx, rc, 1, c, 1, &p, &cap, &r);
        assert_rcpt(&cap, 0, "alice@test.example", OUTCOME_DELIVERED, "delivered", 250, "2.0.0");
        assert_int_equal(r.connections, 1);
        print_message("  handshake %d: full=%u resumed=%u %s\n", i, r.tls_full, r.tls_resumed, cap.tls_version);
    }
    deliver_stats_t st;
    deliver_ctx_stats(ctx, &st);
    assert_int_equal(st.tls_full, 1);
    assert_int_equal(st.tls_resumed, 2);
    ctx_close(loop, ctx);
    buf_free(&p);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_verify_mixed_recipients),
        cmocka_unit_test(test_failover_to_mx2),
        cmocka_unit_test(test_verify_wrong_name),
        cmocka_unit_test(test_pool_split_and_reuse),
        cmocka_unit_test(test_tls_resumption),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

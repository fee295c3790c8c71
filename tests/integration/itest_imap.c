/*
 * SUMMARY
 *  tests/integration/itest_imap.c - APPEND to the real Dovecot of the
 *  local stack (deploy/local/stack up).
 * DESCRIPTION
 *  Reads ${MP_STACK_DIR:-/tmp/mpstack}/env. If it is missing or Dovecot
 *  does not answer, every test fails and says to run the stack: an
 *  integration test that skips proves nothing.
 *
 *  What is stored is checked independently of our client: Python's
 *  imaplib (over verified TLS) EXAMINEs the mailbox, compares
 *  UIDVALIDITY, UID FETCHes the message and compares it byte for byte
 *  and checks it carries \Seen.
 *
 *  The wrong CA is generated here (a fresh self-signed EC certificate
 *  that never signed anything) so verification has to fail for the
 *  reason under test, not for a missing file.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "core/log.h"
#include "core/loop.h"
#include "core/tls.h"
#include "core/util.h"
#include "tests/support/stackenv.h"
#include "imap/imap.h"
#include "mime/build.h"

#define STACK_HINT "run `deploy/local/stack up` first (as root), then re-run this test"

static struct {
    char     env_path[512];
    char     host[64];
    unsigned imaps_port;
    unsigned imap_port;
    char     ca_file[512];
    char     user[2][128];
    char     password[128];
    SSL_CTX *verify_ctx; /* trusts the stack's CA, verifies peers */
    int      ready;
} E;

/* ---------------------------------------------------------------- stack */

/* Connect and read the greeting: Dovecot answers "* OK". */
static int imap_answers(const char *host, unsigned port, int want_greeting, char *why, size_t whylen)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        snprintf(why, whylen, "MP_IMAP_HOST %s is not an IPv4 address", host);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, whylen, "socket: %s", strerror(errno));
        return -1;
    }
    int rc = connect(fd, (struct sockaddr *)&sin, sizeof(sin));
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    if (rc < 0 && errno == EINPROGRESS && poll(&p, 1, 3000) == 1) {
        int soerr = 0;
        socklen_t sl = sizeof(soerr);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        rc = soerr ? -1 : 0;
        errno = soerr ? soerr : ETIMEDOUT;
    } else if (rc < 0 && errno == EINPROGRESS) {
        errno = ETIMEDOUT;
    }
    if (rc < 0) {
        snprintf(why, whylen, "connect %s:%u: %s", host, port, strerror(errno));
        close(fd);
        return -1;
    }
    if (want_greeting) {
        char buf[256] = "";
        p.events = POLLIN;
        ssize_t n = poll(&p, 1, 3000) == 1 ? recv(fd, buf, sizeof(buf) - 1, 0) : -1;
        if (n < 4 || strncmp(buf, "* OK", 4) != 0) {
            snprintf(why, whylen, "%s:%u connected but sent no IMAP greeting", host, port);
            close(fd);
            return -1;
        }
    }
    close(fd);
    return 0;
}

static int stack_setup(void **state)
{
    snprintf(E.env_path, sizeof(E.env_path), "%s", stackenv_path());
    char port[32] = "", users[256] = "", why[512] = "";
    if (access(E.env_path, R_OK) != 0) {
        fprintf(stderr, "\nFATAL: %s is missing: the local stack is not up.\n       %s\n\n", E.env_path, STACK_HINT);
        return -1;
    }
    if (stackenv_get("MP_IMAP_HOST", E.host, sizeof(E.host)) < 0 ||
        stackenv_get("MP_CA_FILE", E.ca_file, sizeof(E.ca_file)) < 0 ||
        stackenv_get("MP_IMAP_PASSWORD", E.password, sizeof(E.password)) < 0 ||
        stackenv_get("MP_IMAP_USERS", users, sizeof(users)) < 0) {
        fprintf(stderr, "\nFATAL: %s lacks MP_IMAP_HOST/MP_CA_FILE/MP_IMAP_PASSWORD/MP_IMAP_USERS.\n       %s\n\n",
                E.env_path, STACK_HINT);
        return -1;
    }
    E.imaps_port = stackenv_get("MP_IMAPS_PORT", port, sizeof(port)) == 0 ? (unsigned)atoi(port) : 9993;
    E.imap_port = stackenv_get("MP_IMAP_PORT", port, sizeof(port)) == 0 ? (unsigned)atoi(port) : 1143;
    if (sscanf(users, "%127s %127s", E.user[0], E.user[1]) != 2) {
        fprintf(stderr, "\nFATAL: MP_IMAP_USERS in %s should name two users.\n       %s\n\n", E.env_path, STACK_HINT);
        return -1;
    }
    if (imap_answers(E.host, E.imaps_port, 0, why, sizeof(why)) < 0 ||
        imap_answers(E.host, E.imap_port, 1, why, sizeof(why)) < 0) {
        fprintf(stderr, "\nFATAL: Dovecot does not answer (%s).\n       %s\n\n", why, STACK_HINT);
        return -1;
    }
    char err[256];
    E.verify_ctx = tls_client_ctx_new(E.ca_file, 1, err, sizeof(err));
    if (E.verify_ctx == NULL) {
        fprintf(stderr, "\nFATAL: %s\n       %s\n\n", err, STACK_HINT);
        return -1;
    }
    E.ready = 1;
    return 0;
}

static int stack_teardown(void **state)
{
    if (E.verify_ctx)
        SSL_CTX_free(E.verify_ctx);
    return 0;
}

/* ---------------------------------------------------------------- helpers */

typedef struct outcome {
    int                  calls;
    imap_append_result_t res;
} outcome_t;

static void on_done(void *arg, const imap_append_result_t *res)
{
    outcome_t *o = arg;
    o->calls++;
    o->res = *res;
}

typedef struct job {
    const char *host;  /* SNI and name check */
    unsigned    port;
    imap_tls_t  tls;
    SSL_CTX    *ctx;
    int         verify_host;
    const char *user;
    const char *password;
} job_t;

static void account_for(const job_t *j, imap_account_t *acct, struct sockaddr_in *sin)
{
    memset(sin, 0, sizeof(*sin));
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)j->port);
    assert_int_equal(inet_pton(AF_INET, E.host, &sin->sin_addr), 1);
    memset(acct, 0, sizeof(*acct));
    acct->addr = (struct sockaddr *)sin;
    acct->addrlen = sizeof(*sin);
    acct->host = j->host;
    acct->tls = j->tls;
    acct->ssl_ctx = j->ctx;
    acct->verify_host = j->verify_host;
    acct->user = j->user;
    acct->password = j->password;
    acct->timeout_ms = 10000;
}

static outcome_t run_append_checked(const job_t *j, const char *msg, const char *check_msgid);

static outcome_t run_append(const job_t *j, const char *msg)
{
    return run_append_checked(j, msg, NULL);
}

/* One append on its own loop; check_msgid as acct.check_message_id. */
static outcome_t run_append_checked(const job_t *j, const char *msg, const char *check_msgid)
{
    if (!E.ready)
        fail_msg("local stack not ready: " STACK_HINT);
    loop_t *loop = loop_new();
    assert_non_null(loop);
    struct sockaddr_in sin;
    imap_account_t acct;
    account_for(j, &acct, &sin);
    acct.check_message_id = check_msgid;
    outcome_t o;
    memset(&o, 0, sizeof(o));
    imap_append_t *a = imap_append_start(loop, &acct, msg, strlen(msg), on_done, &o);
    assert_non_null(a);
    assert_int_equal(o.calls, 0);
    loop_run(loop); /* returns when nothing is registered any more */
    assert_int_equal(o.calls, 1);
    imap_append_free(a);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
    loop_free(loop);
    return o;
}

static char *make_message(const char *from, const char *tag)
{
    char uuid[37];
    util_uuid(uuid);
    char *m = NULL;
    int n = asprintf(&m,
                     "From: %s\r\n"
                     "To: someone@test.example\r\n"
                     "Subject: itest_imap %s %s\r\n"
                     "Date: Mon, 23 Nov 2026 16:49:37 +0000\r\n"
                     "Message-ID: <%s@itest.test.example>\r\n"
                     "MIME-Version: 1.0\r\n"
                     "Content-Type: text/plain; charset=utf-8\r\n"
                     "\r\n"
                     "Sent copy written by itest_imap (%s).\r\n"
                     ".a line starting with a dot is not stuffed\r\n"
                     "\r\n"
                     "-- \r\n"
                     "mailpump\r\n",
                     from, tag, uuid, uuid, tag);
    assert_true(n > 0);
    return m;
}

static const char VERIFY_PY[] =
    "import imaplib, ssl, sys\n"
    "host, port, ca, user, pw, mbox, uidv, uid, path = sys.argv[1:]\n"
    "want = open(path, 'rb').read()\n"
    "ctx = ssl.create_default_context(cafile=ca)\n"
    "m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)\n"
    "m.login(user, pw)\n"
    "q = '\"' + mbox.replace('\\\\', '\\\\\\\\').replace('\"', '\\\\\"') + '\"'\n"
    "typ, _ = m.select(q, readonly=True)\n"
    "assert typ == 'OK', 'EXAMINE failed'\n"
    "got_uidv = m.response('UIDVALIDITY')[1][0].decode()\n"
    "if got_uidv != uidv:\n"
    "    sys.exit('UIDVALIDITY is %s, client reported %s' % (got_uidv, uidv))\n"
    "typ, data = m.uid('FETCH', uid, '(FLAGS BODY.PEEK[])')\n"
    "if typ != 'OK' or not data or not isinstance(data[0], tuple):\n"
    "    sys.exit('UID %s not found in %s: %r' % (uid, mbox, data))\n"
    "meta, body = data[0]\n"
    "if body != want:\n"
    "    sys.exit('stored bytes differ:\\n%r\\nexpected\\n%r' % (body, want))\n"
    "if b'\\\\Seen' not in meta:\n"
    "    sys.exit('no \\\\Seen flag: %r' % meta)\n"
    "m.logout()\n";

/* Run argv (an independent checker) and return its wait status. */
static int run_wait(char *const argv[])
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execv(argv[0], argv);
        _exit(127);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return st;
}

/* Fetch the message back with Python's imaplib and compare. */
static void verify_stored(const char *user, const imap_append_result_t *res, const char *msg)
{
    char path[] = "/tmp/itest_imap_msg_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t len = strlen(msg);
    assert_int_equal(write(fd, msg, len), (ssize_t)len);
    close(fd);

    char port[16], uidv[16], uid[16];
    snprintf(port, sizeof(port), "%u", E.imaps_port);
    snprintf(uidv, sizeof(uidv), "%u", res->uidvalidity);
    snprintf(uid, sizeof(uid), "%u", res->uid);
    char *const argv[] = { "/usr/bin/python3", "-c", (char *)VERIFY_PY, E.host, port, E.ca_file, (char *)user,
                           E.password, (char *)res->mailbox, uidv, uid, path, NULL };
    int st = run_wait(argv);
    unlink(path);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail_msg("independent check (python imaplib) failed for %s uid %u (exit %d)", res->mailbox, res->uid,
                 WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

/* How many messages in the user's Sent carry this Message-ID (Python's
 * imaplib, independent of our client); -1 when the check itself failed. */
static int count_with_message_id(const char *user, const char *mid)
{
    static const char COUNT_PY[] =
        "import imaplib, ssl, sys\n"
        "host, port, ca, user, pw, mid = sys.argv[1:7]\n"
        "ctx = ssl.create_default_context(cafile=ca)\n"
        "ctx.check_hostname = False\n"
        "im = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)\n"
        "im.login(user, pw)\n"
        "im.select('Sent', readonly=True)\n"
        "typ, data = im.uid('SEARCH', 'HEADER', 'Message-ID', '\"' + mid + '\"')\n"
        "im.logout()\n"
        "sys.exit(len(data[0].split()) if typ == 'OK' else 100)\n";
    char port[16];
    snprintf(port, sizeof(port), "%u", E.imaps_port);
    char *const argv[] = { "/usr/bin/python3", "-c", (char *)COUNT_PY, E.host, port, E.ca_file, (char *)user,
                           E.password, (char *)mid, NULL };
    int st = run_wait(argv);
    return WIFEXITED(st) && WEXITSTATUS(st) < 100 ? WEXITSTATUS(st) : -1;
}

static void expect_ok(const outcome_t *o)
{
    if (o->res.status != IMAP_OK)
        fail_msg("append failed: %s: %s", imap_strerror(o->res.status), o->res.error);
    assert_true(o->res.uidvalidity > 0);
    assert_true(o->res.uid > 0);
    assert_string_equal(o->res.mailbox, "Sent"); /* the stack's \Sent mailbox */
}

/* A self-signed CA certificate that signed nothing, as a PEM file. */
static void make_wrong_ca(char *path, size_t pathsz)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    assert_non_null(key);
    X509 *x = X509_new();
    assert_non_null(x);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), (long)(util_rand64() & 0x7fffffff));
    X509_gmtime_adj(X509_getm_notBefore(x), -60);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"mailpump wrong test CA", -1, -1, 0);
    X509_set_issuer_name(x, name);
    X509_set_pubkey(x, key);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, NULL, NID_basic_constraints, "critical,CA:TRUE");
    assert_non_null(ext);
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    assert_true(X509_sign(x, key, EVP_sha256()) > 0);

    snprintf(path, pathsz, "/tmp/itest_imap_wrong_ca_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *fp = fdopen(fd, "w");
    assert_non_null(fp);
    assert_int_equal(PEM_write_X509(fp, x), 1);
    fclose(fp);
    X509_free(x);
    EVP_PKEY_free(key);
}

/* ---------------------------------------------------------------- tests */

static void test_imaps_append_verified(void **state)
{
    /* SNI and the certificate name check on imap.test.example */
    job_t j = { "imap.test.example", E.imaps_port, IMAP_TLS_IMAPS, E.verify_ctx, 1, E.user[0], E.password };
    char *msg = make_message(E.user[0], "imaps");
    outcome_t o = run_append(&j, msg);
    expect_ok(&o);
    verify_stored(E.user[0], &o.res, msg);
    free(msg);
}

static void test_two_appends_increase(void **state)
{
    job_t j = { "127.0.0.1", E.imaps_port, IMAP_TLS_IMAPS, E.verify_ctx, 1, E.user[1], E.password };
    char *m1 = make_message(E.user[1], "first");
    char *m2 = make_message(E.user[1], "second");
    outcome_t o1 = run_append(&j, m1);
    outcome_t o2 = run_append(&j, m2);
    expect_ok(&o1);
    expect_ok(&o2);
    assert_int_equal(o1.res.uidvalidity, o2.res.uidvalidity);
    if (!(o2.res.uid > o1.res.uid))
        fail_msg("UIDs did not increase: %u then %u", o1.res.uid, o2.res.uid);
    verify_stored(E.user[1], &o1.res, m1);
    verify_stored(E.user[1], &o2.res, m2);
    free(m1);
    free(m2);
}

static void test_starttls(void **state)
{
    job_t j = { "localhost", E.imap_port, IMAP_TLS_STARTTLS, E.verify_ctx, 1, E.user[0], E.password };
    char *msg = make_message(E.user[0], "starttls");
    outcome_t o = run_append(&j, msg);
    expect_ok(&o);
    verify_stored(E.user[0], &o.res, msg);
    free(msg);
}

/* Several sessions at once in one loop: all stored, all UIDs distinct. */
static void test_concurrent(void **state)
{
    enum { N = 6 };
    if (!E.ready)
        fail_msg("local stack not ready: " STACK_HINT);
    loop_t *loop = loop_new();
    struct sockaddr_in sin[N];
    imap_account_t acct[N];
    outcome_t o[N];
    imap_append_t *h[N];
    char *msg[N];
    for (int i = 0; i < N; i++) {
        job_t j = { "127.0.0.1", i % 2 ? E.imap_port : E.imaps_port, i % 2 ? IMAP_TLS_STARTTLS : IMAP_TLS_IMAPS,
                    E.verify_ctx, 1, E.user[0], E.password };
        account_for(&j, &acct[i], &sin[i]);
        msg[i] = make_message(E.user[0], "concurrent");
        memset(&o[i], 0, sizeof(o[i]));
        assert_non_null(h[i] = imap_append_start(loop, &acct[i], msg[i], strlen(msg[i]), on_done, &o[i]));
    }
    loop_run(loop);
    for (int i = 0; i < N; i++)
        imap_append_free(h[i]);
    assert_int_equal(loop_fd_count(loop), 0);
    assert_int_equal(loop_timer_count(loop), 0);
    loop_free(loop);
    for (int i = 0; i < N; i++) {
        assert_int_equal(o[i].calls, 1);
        expect_ok(&o[i]);
        for (int k = 0; k < i; k++)
            if (o[k].res.uid == o[i].res.uid)
                fail_msg("two appends got the same UID %u", o[i].res.uid);
    }
    verify_stored(E.user[0], &o[N - 1].res, msg[N - 1]);
    for (int i = 0; i < N; i++)
        free(msg[i]);
}

/* Dovecot's log: its size now, and how many logins of user it recorded
 * after offset (imap-login writes one line per connection that logs in). */
static void dovecot_log_path(char *path, size_t n)
{
    char dir[400];
    if (stackenv_get("MP_STACK_DIR", dir, sizeof(dir)) < 0)
        snprintf(dir, sizeof(dir), "/tmp/mpstack");
    snprintf(path, n, "%s/dovecot/dovecot.log", dir);
}

static long dovecot_log_size(void)
{
    char path[512];
    dovecot_log_path(path, sizeof(path));
    FILE *fp = fopen(path, "r");
    if (fp == NULL)
        fail_msg("cannot read %s: %s (" STACK_HINT ")", path, strerror(errno));
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fclose(fp);
    return n;
}

static int dovecot_logins_since(long offset, const char *user)
{
    char path[512], needle[256], line[4096];
    dovecot_log_path(path, sizeof(path));
    snprintf(needle, sizeof(needle), "Login: user=<%s>", user);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    fseek(fp, offset, SEEK_SET);
    int n = 0;
    while (fgets(line, sizeof(line), fp))
        if (strstr(line, "imap-login:") && strstr(line, needle))
            n++;
    fclose(fp);
    return n;
}

/* A loop, a pool with lim (NULL: defaults) and the second user's IMAPS
 * account on it: the set-up of the pooled tests. */
typedef struct pooled {
    loop_t            *loop;
    imap_pool_t       *pool;
    struct sockaddr_in sin;
    imap_account_t     acct;
} pooled_t;

static void pooled_start(pooled_t *p, const imap_pool_limits_t *lim)
{
    if (!E.ready)
        fail_msg("local stack not ready: " STACK_HINT);
    p->loop = loop_new();
    assert_non_null(p->loop);
    p->pool = imap_pool_new(p->loop, lim);
    job_t j = { "imap.test.example", E.imaps_port, IMAP_TLS_IMAPS, E.verify_ctx, 1, E.user[1], E.password };
    account_for(&j, &p->acct, &p->sin);
    p->acct.pool = p->pool;
}

/* LOGOUT and close every pooled session; the loop must then be empty at
 * once, or after at most settle passes (cancelled appends' leftovers). */
static void pooled_end(pooled_t *p, int settle)
{
    imap_pool_free(p->pool);
    for (int i = 0; i < settle && (loop_fd_count(p->loop) || loop_timer_count(p->loop)); i++)
        loop_run_once(p->loop, 20);
    assert_int_equal(loop_fd_count(p->loop), 0);
    assert_int_equal(loop_timer_count(p->loop), 0);
    loop_free(p->loop);
}

/* Five appends through a pool to one account: one connection (our stats
 * and Dovecot's own login count agree), five distinct increasing UIDs,
 * the stored bytes compared by an independent client. */
static void test_pool_five_appends(void **state)
{
    enum { N = 5 };
    long log_at = dovecot_log_size();
    pooled_t p;
    pooled_start(&p, NULL);
    loop_t *loop = p.loop;
    outcome_t o[N];
    char *msg[N];
    for (int i = 0; i < N; i++) {
        msg[i] = make_message(E.user[1], "pooled");
        memset(&o[i], 0, sizeof(o[i]));
        imap_append_t *h = imap_append_start(loop, &p.acct, msg[i], strlen(msg[i]), on_done, &o[i]);
        assert_non_null(h);
        assert_int_equal(o[i].calls, 0);
        /* until the callback: the parked session keeps an fd and a timer, so
         * loop_run() would not return by itself */
        for (int k = 0; o[i].calls == 0 && k < 2000; k++)
            loop_run_once(loop, 50);
        assert_int_equal(o[i].calls, 1);
        imap_append_free(h);
        expect_ok(&o[i]);
        assert_int_equal(o[i].res.reused, i > 0);
        assert_int_equal(o[i].res.connections, i == 0 ? 1u : 0u);
        for (int k = 0; k < i; k++) {
            assert_int_equal(o[k].res.uidvalidity, o[i].res.uidvalidity);
            if (!(o[i].res.uid > o[k].res.uid))
                fail_msg("UID %u after %u: not distinct and increasing", o[i].res.uid, o[k].res.uid);
        }
    }
    imap_pool_stats_t st;
    imap_pool_get_stats(p.pool, &st);
    assert_int_equal(st.opened, 1);
    assert_int_equal(st.reused, N - 1);
    assert_int_equal(st.idle, 1);
    pooled_end(&p, 0);
    int logins = dovecot_logins_since(log_at, E.user[1]);
    if (logins != 1)
        fail_msg("Dovecot logged %d logins of %s for %d pooled appends, expected 1", logins, E.user[1], N);
    verify_stored(E.user[1], &o[0].res, msg[0]);
    verify_stored(E.user[1], &o[N - 1].res, msg[N - 1]);
    for (int i = 0; i < N; i++)
        free(msg[i]);
}

/* A burst of copies for one account with one connection allowed: the
 * first goes alone, the rest wait and go in one APPEND (MULTIAPPEND, which
 * Dovecot offers after login). Every copy reports its own UID, and Python's
 * imaplib finds exactly that copy's bytes under it. */
static void test_pool_multiappend(void **state)
{
    enum { N = 12 };
    imap_pool_limits_t lim = { .max_conns_per_account = 1 };
    pooled_t p;
    pooled_start(&p, &lim);
    loop_t *loop = p.loop;
    outcome_t o[N];
    imap_append_t *h[N];
    char *msg[N];
    for (int i = 0; i < N; i++) {
        char tag[32];
        snprintf(tag, sizeof(tag), "batch-%d", i);
        msg[i] = make_message(E.user[1], tag);
        memset(&o[i], 0, sizeof(o[i]));
        assert_non_null(h[i] = imap_append_start(loop, &p.acct, msg[i], strlen(msg[i]), on_done, &o[i]));
    }
    for (int i = 0; i < N; i++)
        for (int k = 0; o[i].calls == 0 && k < 2000; k++)
            loop_run_once(loop, 50);
    for (int i = 0; i < N; i++)
        imap_append_free(h[i]);
    for (int i = 0; i < N; i++) {
        assert_int_equal(o[i].calls, 1);
        expect_ok(&o[i]);
        for (int k = 0; k < i; k++)
            if (o[k].res.uid == o[i].res.uid)
                fail_msg("copies %d and %d both report UID %u", k, i, o[i].res.uid);
    }
    assert_int_equal(o[0].res.batched, 0);
    assert_int_equal(o[1].res.batched, N - 1);
    imap_pool_stats_t st;
    imap_pool_get_stats(p.pool, &st);
    assert_int_equal(st.opened, 1);
    assert_int_equal(st.batches, 1);
    assert_int_equal(st.batched, N - 1);
    pooled_end(&p, 0);
    for (int i = 0; i < N; i++) {
        verify_stored(E.user[1], &o[i].res, msg[i]);
        free(msg[i]);
    }
}

/* A retry after an uncertain outcome: with check_message_id, Dovecot's
 * Sent folder is searched first; the copy stored before is found (same
 * UID, nothing appended), a message not stored yet is appended. The count
 * of copies is checked with Python's imaplib. */
static void test_check_message_id(void **state)
{
    job_t j = { "imap.test.example", E.imaps_port, IMAP_TLS_IMAPS, E.verify_ctx, 1, E.user[0], E.password };
    char *msg = make_message(E.user[0], "checked");
    char mid[256];
    assert_int_equal(mime_header_find(msg, strlen(msg), "Message-ID", mid, sizeof(mid)), MIME_OK);
    outcome_t o1 = run_append(&j, msg);
    expect_ok(&o1);
    assert_int_equal(o1.res.already_stored, 0);
    outcome_t o2 = run_append_checked(&j, msg, mid);
    expect_ok(&o2);
    assert_int_equal(o2.res.already_stored, 1);
    assert_int_equal(o2.res.uidvalidity, o1.res.uidvalidity);
    assert_int_equal(o2.res.uid, o1.res.uid);
    assert_int_equal(count_with_message_id(E.user[0], mid), 1);

    char *other = make_message(E.user[0], "checked, new");
    char mid2[256];
    assert_int_equal(mime_header_find(other, strlen(other), "Message-ID", mid2, sizeof(mid2)), MIME_OK);
    outcome_t o3 = run_append_checked(&j, other, mid2);
    expect_ok(&o3);
    assert_int_equal(o3.res.already_stored, 0);
    assert_true(o3.res.uid > o1.res.uid);
    verify_stored(E.user[0], &o3.res, other);
    assert_int_equal(count_with_message_id(E.user[0], mid2), 1);
    free(msg);
    free(other);
}

/* The pool under churn against the real Dovecot: 60 appends for one
 * account with at most 2 connections, started in waves while earlier ones
 * are in flight, a quarter of them cancelled at random points (queued,
 * served by a parked session, or on their own connection). Every append
 * not cancelled is called back exactly once with a stored copy; no
 * cancelled one ever is; the loop ends empty (tests/run also runs this
 * under ASan+UBSan). */
static void test_pool_churn(void **state)
{
    enum { N = 60 };
    imap_pool_limits_t lim = { .max_conns_per_account = 2, .max_appends = 7 };
    pooled_t p;
    pooled_start(&p, &lim);
    loop_t *loop = p.loop;
    char *msg = make_message(E.user[1], "churn");
    outcome_t o[N];
    imap_append_t *h[N];
    int cancelled[N];
    memset(o, 0, sizeof(o));
    memset(cancelled, 0, sizeof(cancelled));
    uint64_t seed = util_rand64();
    unsigned started = 0;
    for (int round = 0; round < 4000; round++) {
        /* start a few more */
        for (int k = 0; k < 3 && started < N; k++, started++) {
            h[started] = imap_append_start(loop, &p.acct, msg, strlen(msg), on_done, &o[started]);
            assert_non_null(h[started]);
        }
        /* cancel one still pending, now and then */
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        if ((seed >> 33) % 4 == 0 && started > 0) {
            unsigned i = (unsigned)((seed >> 40) % started);
            if (!cancelled[i] && o[i].calls == 0) {
                imap_append_free(h[i]);
                cancelled[i] = 1;
            }
        }
        loop_run_once(loop, 5);
        int open = 0;
        for (unsigned i = 0; i < started; i++)
            open += !cancelled[i] && o[i].calls == 0;
        if (started == N && open == 0)
            break;
    }
    int ok = 0, ncancelled = 0, siblings = 0;
    for (int i = 0; i < N; i++) {
        if (cancelled[i]) {
            ncancelled++;
            assert_int_equal(o[i].calls, 0);
            continue;
        }
        if (o[i].calls != 1)
            fail_msg("append %d: %d callbacks", i, o[i].calls);
        if (o[i].res.status == IMAP_ENETWORK && o[i].res.batched > 1 &&
            strstr(o[i].res.error, "closed before the server answered")) {
            siblings++; /* shared a MULTIAPPEND with a cancelled copy: its owner retries it */
            continue;
        }
        if (o[i].res.status != IMAP_OK)
            fail_msg("append %d: %s: %s", i, imap_strerror(o[i].res.status), o[i].res.error);
        ok++;
    }
    imap_pool_stats_t st;
    imap_pool_get_stats(p.pool, &st);
    print_message("churn: %d stored, %d cancelled, %d failed with a cancelled batch, %" PRIu64
                  " connections, %" PRIu64 " waited, %" PRIu64 " reused, %" PRIu64 " batches\n", ok, ncancelled,
                  siblings, st.opened, st.waited, st.reused, st.batches);
    assert_true(st.waited > 0); /* the cap was reached */
    assert_int_equal(st.waiting, 0);
    for (unsigned i = 0; i < started; i++)
        if (!cancelled[i])
            imap_append_free(h[i]);
    pooled_end(&p, 50);
    free(msg);
}

static void test_wrong_password(void **state)
{
    job_t j = { "127.0.0.1", E.imaps_port, IMAP_TLS_IMAPS, E.verify_ctx, 1, E.user[0], "not-the-password" };
    char *msg = make_message(E.user[0], "wrong password");
    outcome_t o = run_append(&j, msg);
    free(msg);
    if (o.res.status != IMAP_EAUTH)
        fail_msg("expected IMAP_EAUTH, got %s: %s", imap_strerror(o.res.status), o.res.error);
}

static void test_wrong_ca(void **state)
{
    char path[64], err[256];
    make_wrong_ca(path, sizeof(path));
    SSL_CTX *ctx = tls_client_ctx_new(path, 1, err, sizeof(err));
    unlink(path);
    if (ctx == NULL)
        fail_msg("cannot build the wrong-CA context: %s", err);
    char *msg = make_message(E.user[0], "wrong ca");
    job_t j = { "imap.test.example", E.imaps_port, IMAP_TLS_IMAPS, ctx, 1, E.user[0], E.password };
    outcome_t o = run_append(&j, msg);
    if (o.res.status != IMAP_ETLS)
        fail_msg("imaps: expected IMAP_ETLS, got %s: %s", imap_strerror(o.res.status), o.res.error);
    assert_non_null(strstr(o.res.error, "certificate"));
    /* the same after STARTTLS */
    job_t j2 = { "imap.test.example", E.imap_port, IMAP_TLS_STARTTLS, ctx, 1, E.user[0], E.password };
    o = run_append(&j2, msg);
    if (o.res.status != IMAP_ETLS)
        fail_msg("starttls: expected IMAP_ETLS, got %s: %s", imap_strerror(o.res.status), o.res.error);
    SSL_CTX_free(ctx);
    free(msg);
}

static void test_wrong_host_name(void **state)
{
    job_t j = { "wrong.example", E.imaps_port, IMAP_TLS_IMAPS, E.verify_ctx, 1, E.user[0], E.password };
    char *msg = make_message(E.user[0], "wrong name");
    outcome_t o = run_append(&j, msg);
    free(msg);
    if (o.res.status != IMAP_ETLS)
        fail_msg("expected IMAP_ETLS, got %s: %s", imap_strerror(o.res.status), o.res.error);
}

int main(void)
{
    const char *dbg = getenv("MP_TEST_DEBUG");
    log_setup(dbg && *dbg ? LOG_DEBUG : LOG_INFO, LOG_FMT_LOGFMT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_imaps_append_verified),
        cmocka_unit_test(test_two_appends_increase),
        cmocka_unit_test(test_starttls),
        cmocka_unit_test(test_concurrent),
        cmocka_unit_test(test_pool_five_appends),
        cmocka_unit_test(test_pool_multiappend),
        cmocka_unit_test(test_check_message_id),
        cmocka_unit_test(test_pool_churn),
        cmocka_unit_test(test_wrong_password),
        cmocka_unit_test(test_wrong_ca),
        cmocka_unit_test(test_wrong_host_name),
    };
    return cmocka_run_group_tests(tests, stack_setup, stack_teardown);
}

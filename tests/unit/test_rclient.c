/*
 * Unit tests for core/rclient against a scripted fake RESP server that
 * runs in the same loop. The fake understands a few commands:
 *   PING -> +PONG, ECHO x -> $x, ERR -> -ERR boom, SLOW -> +LATE after
 *   200 ms (later replies wait behind it, as a real server's would),
 *   CLOSE -> the server closes the connection, anything else -> +OK.
 * Every test ends with the loop empty.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"

#define assert_loop_empty(l)                      \
    do {                                          \
        assert_int_equal(loop_fd_count(l), 0);    \
        assert_int_equal(loop_timer_count(l), 0); \
    } while (0)

/* ---- fake RESP server ---- */

#define FAKE_MAXCONN 4

typedef struct fake_conn {
    int    fd;
    char   in[4096];
    size_t nin;
    char   held[4096]; /* replies queued behind a SLOW one */
    size_t nheld;
    int    holding;
    loop_timer_t slow;
    struct fake *f;
} fake_conn_t;

typedef struct fake {
    loop_t     *loop;
    int         lfd;
    unsigned    port;
    int         accepted;
    int         commands;
    fake_conn_t conns[FAKE_MAXCONN];
} fake_t;

static void fake_close_conn(fake_conn_t *fc)
{
    if (fc->fd < 0)
        return;
    loop_fd_del(fc->f->loop, fc->fd);
    loop_timer_cancel(fc->f->loop, &fc->slow);
    close(fc->fd);
    fc->fd = -1;
}

static void fake_send(fake_conn_t *fc, const char *s, size_t n)
{
    if (fc->holding) {
        assert_true(fc->nheld + n <= sizeof(fc->held));
        memcpy(fc->held + fc->nheld, s, n);
        fc->nheld += n;
        return;
    }
    ssize_t w = write(fc->fd, s, n);
    assert_int_equal(w, (ssize_t)n);
}

static void fake_on_slow(loop_t *loop, loop_timer_t *t, void *arg)
{
    fake_conn_t *fc = arg;
    fc->holding = 0;
    fake_send(fc, "+LATE\r\n", 7);
    fake_send(fc, fc->held, fc->nheld);
    fc->nheld = 0;
}

/* Parse one RESP multibulk command from fc->in; 1 when one was handled. */
static int fake_one(fake_conn_t *fc)
{
    char *p = fc->in, *end = fc->in + fc->nin;
    char *nl = memchr(p, '\n', (size_t)(end - p));
    if (nl == NULL)
        return 0;
    assert_int_equal(p[0], '*');
    int argc = atoi(p + 1);
    p = nl + 1;
    char args[4][256];
    size_t lens[4] = { 0 };
    for (int i = 0; i < argc; i++) {
        nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL)
            return 0;
        assert_int_equal(p[0], '$');
        size_t len = (size_t)atoi(p + 1);
        p = nl + 1;
        if ((size_t)(end - p) < len + 2)
            return 0;
        if (i < 4) {
            assert_true(len < sizeof(args[i]));
            memcpy(args[i], p, len);
            args[i][len] = '\0';
            lens[i] = len;
        }
        p += len + 2;
    }
    size_t used = (size_t)(p - fc->in);
    memmove(fc->in, p, fc->nin - used);
    fc->nin -= used;
    fc->f->commands++;

    char out[600];
    if (strcmp(args[0], "PING") == 0) {
        fake_send(fc, "+PONG\r\n", 7);
    } else if (strcmp(args[0], "ECHO") == 0) {
        int n = snprintf(out, sizeof(out), "$%zu\r\n", lens[1]);
        memcpy(out + n, args[1], lens[1]);
        memcpy(out + n + lens[1], "\r\n", 2);
        fake_send(fc, out, (size_t)n + lens[1] + 2);
    } else if (strcmp(args[0], "ERR") == 0) {
        fake_send(fc, "-ERR boom\r\n", 11);
    } else if (strcmp(args[0], "SLOW") == 0) {
        fc->holding = 1;
        loop_timer_set(fc->f->loop, &fc->slow, 200);
    } else if (strcmp(args[0], "CLOSE") == 0) {
        fake_close_conn(fc);
        return 0;
    } else {
        fake_send(fc, "+OK\r\n", 5);
    }
    return 1;
}

static void fake_on_conn(loop_t *loop, int fd, unsigned events, void *arg)
{
    fake_conn_t *fc = arg;
    ssize_t n = read(fd, fc->in + fc->nin, sizeof(fc->in) - fc->nin);
    if (n <= 0) {
        fake_close_conn(fc);
        return;
    }
    fc->nin += (size_t)n;
    while (fc->fd >= 0 && fake_one(fc))
        ;
}

static void fake_on_accept(loop_t *loop, int fd, unsigned events, void *arg)
{
    fake_t *f = arg;
    int cfd = accept(fd, NULL, NULL);
    if (cfd < 0)
        return;
    for (int i = 0; i < FAKE_MAXCONN; i++) {
        fake_conn_t *fc = &f->conns[i];
        if (fc->fd < 0) {
            memset(fc, 0, sizeof(*fc));
            fc->fd = cfd;
            fc->f = f;
            loop_timer_init(&fc->slow, fake_on_slow, fc);
            f->accepted++;
            assert_int_equal(loop_fd_add(loop, cfd, LOOP_READ, fake_on_conn, fc), 0);
            return;
        }
    }
    close(cfd);
}

/* Listen on port (0: any free one). */
static void fake_listen(fake_t *f, unsigned port)
{
    f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(f->lfd >= 0);
    int one = 1;
    setsockopt(f->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(f->lfd, 16), 0);
    socklen_t al = sizeof(a);
    getsockname(f->lfd, (struct sockaddr *)&a, &al);
    f->port = ntohs(a.sin_port);
    assert_int_equal(loop_fd_add(f->loop, f->lfd, LOOP_READ, fake_on_accept, f), 0);
}

static void fake_start(fake_t *f, loop_t *loop)
{
    memset(f, 0, sizeof(*f));
    f->loop = loop;
    for (int i = 0; i < FAKE_MAXCONN; i++)
        f->conns[i].fd = -1;
    fake_listen(f, 0);
}

/* Close the listener and every connection. */
static void fake_stop(fake_t *f)
{
    for (int i = 0; i < FAKE_MAXCONN; i++)
        fake_close_conn(&f->conns[i]);
    if (f->lfd >= 0) {
        loop_fd_del(f->loop, f->lfd);
        close(f->lfd);
        f->lfd = -1;
    }
}

/* ---- callback recorder ---- */

typedef struct rec {
    int  calls;
    int  type;      /* reply type, or -1 for NULL */
    char str[128];  /* reply string or err */
    int  in_command; /* set while rclient_command runs: must stay 0 in cb */
    uint64_t at_ms;
    rclient_t *free_me; /* free the client from inside the callback */
} rec_t;

static int g_in_command;

static void rec_cb(void *arg, const redisReply *reply, const char *err)
{
    rec_t *r = arg;
    r->calls++;
    r->in_command = g_in_command;
    r->at_ms = util_mono_ms();
    if (reply != NULL) {
        r->type = reply->type;
        size_t n = reply->len < sizeof(r->str) - 1 ? reply->len : sizeof(r->str) - 1;
        if (n > 0)
            memcpy(r->str, reply->str, n); /* binary-safe */
        r->str[n] = '\0';
    } else {
        r->type = -1;
        snprintf(r->str, sizeof(r->str), "%s", err ? err : "(null)");
    }
    if (r->free_me != NULL) {
        rclient_t *c = r->free_me;
        r->free_me = NULL;
        rclient_free(c);
    }
}

static uint64_t send_cmd(rclient_t *c, rec_t *r, const char *cmd)
{
    g_in_command = 1;
    uint64_t id = rclient_command(c, rec_cb, r, "%s", cmd);
    g_in_command = 0;
    assert_true(id != 0);
    return id;
}

/* Run the loop until *flag is non-zero or ms elapse. */
static void run_until(loop_t *l, const int *flag, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (!*flag && util_mono_ms() < end)
        loop_run_once(l, 10);
}

static void run_for(loop_t *l, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (util_mono_ms() < end)
        loop_run_once(l, 10);
}

static int wait_connected(loop_t *l, rclient_t *c, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (!rclient_connected(c) && util_mono_ms() < end)
        loop_run_once(l, 10);
    return rclient_connected(c);
}

static rclient_t *client_for(loop_t *l, unsigned port, unsigned timeout_ms)
{
    rclient_config_t cfg = { .host = "127.0.0.1", .port = port, .timeout_ms = timeout_ms,
                             .connect_timeout_ms = 300, .reconnect_max_ms = 200 };
    return rclient_new(l, &cfg);
}

/* ---- tests ---- */

static void test_replies_and_error_reply(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 1000);

    /* queued while the first connect is under way */
    rec_t ping = { 0 }, echo = { 0 }, err = { 0 };
    send_cmd(c, &ping, "PING");
    const char *argv[2] = { "ECHO", "a\0b" };
    const size_t lens[2] = { 4, 3 };
    g_in_command = 1;
    assert_true(rclient_commandargv(c, rec_cb, &echo, 2, argv, lens) != 0);
    g_in_command = 0;
    send_cmd(c, &err, "ERR");
    assert_int_equal(ping.calls + echo.calls + err.calls, 0); /* never synchronous */
    run_until(l, &err.calls, 2000);

    assert_int_equal(ping.calls, 1);
    assert_int_equal(ping.type, REDIS_REPLY_STATUS);
    assert_string_equal(ping.str, "PONG");
    assert_int_equal(echo.calls, 1);
    assert_int_equal(echo.type, REDIS_REPLY_STRING);
    assert_memory_equal(echo.str, "a\0b", 3);
    assert_int_equal(err.calls, 1);
    assert_int_equal(err.type, -1);
    assert_string_equal(err.str, "ERR boom");
    assert_int_equal(ping.in_command + echo.in_command + err.in_command, 0);
    assert_true(rclient_connected(c));
    assert_int_equal(rclient_errors(c), 0);

    rclient_free(c);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_timeout_then_late_reply_dropped(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 50);
    assert_true(wait_connected(l, c, 1000));

    rec_t slow = { 0 }, ping = { 0 };
    uint64_t t0 = util_mono_ms();
    send_cmd(c, &slow, "SLOW");
    send_cmd(c, &ping, "PING"); /* answered behind SLOW, after 200 ms */
    run_until(l, &slow.calls, 1000);
    assert_int_equal(slow.calls, 1);
    assert_string_equal(slow.str, "timeout");
    assert_true(slow.at_ms - t0 >= 45 && slow.at_ms - t0 < 150);
    run_until(l, &ping.calls, 1000);
    assert_string_equal(ping.str, "timeout");

    /* the late +LATE and +PONG arrive and are dropped; the next command
     * gets its own reply, not a stale one */
    run_for(l, 300);
    rec_t echo = { 0 };
    const char *argv[2] = { "ECHO", "fresh" };
    const size_t lens[2] = { 4, 5 };
    rclient_commandargv(c, rec_cb, &echo, 2, argv, lens);
    run_until(l, &echo.calls, 1000);
    assert_int_equal(echo.type, REDIS_REPLY_STRING);
    assert_string_equal(echo.str, "fresh");
    assert_int_equal(slow.calls, 1);
    assert_int_equal(ping.calls, 1);
    assert_int_equal(rclient_errors(c), 2);
    assert_true(rclient_connected(c));

    rclient_free(c);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

/* A command queued while the loop is busy for longer than the timeout
 * (a burst of work in one callback) is timed from when it is written
 * out, so Redis answering at once is not reported as a timeout. */
static void test_timeout_counts_from_the_write(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 50);
    assert_true(wait_connected(l, c, 1000));
    rec_t ping = { 0 };
    send_cmd(c, &ping, "PING");
    usleep(120 * 1000); /* the loop is busy elsewhere: nothing written yet */
    run_until(l, &ping.calls, 1000);
    assert_int_equal(ping.type, REDIS_REPLY_STATUS);
    assert_string_equal(ping.str, "PONG");
    assert_int_equal(rclient_errors(c), 0);
    rclient_free(c);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void busy_once(loop_t *loop, int fd, unsigned events, void *arg)
{
    int *ran = arg;
    char b[8];
    if (read(fd, b, sizeof(b)) > 0 && (*ran)++ == 0)
        usleep(300 * 1000); /* one long callback: every timer below comes due during it */
}

/* An answer that reached the socket while the loop was busy is read when
 * the command's timer fires, not reported as a timeout: the timer is due
 * only because the loop was late, not Redis. */
static void test_timeout_reads_the_socket_first(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 250);
    assert_true(wait_connected(l, c, 1000));
    rec_t slow = { 0 };
    send_cmd(c, &slow, "SLOW"); /* the fake answers from a 200 ms timer */
    run_for(l, 20);             /* written and read by the fake */
    int p[2], ran = 0;
    assert_int_equal(pipe(p), 0);
    assert_int_equal(loop_fd_add(l, p[0], LOOP_READ, busy_once, &ran), 0);
    assert_int_equal(write(p[1], "x", 1), 1);
    /* one pass: the busy callback, then the fake's timer (the answer goes
     * into the socket), then the command's timer in the same pass */
    loop_run_once(l, 100);
    assert_int_equal(ran, 1);
    assert_int_equal(slow.calls, 1);
    assert_int_equal(slow.type, REDIS_REPLY_STATUS);
    assert_string_equal(slow.str, "LATE");
    assert_int_equal(rclient_errors(c), 0);
    loop_fd_del(l, p[0]);
    close(p[0]);
    close(p[1]);
    rclient_free(c);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_server_closes_then_reconnect(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 1000);
    assert_true(wait_connected(l, c, 1000));

    rec_t close_r = { 0 }, ping = { 0 };
    send_cmd(c, &close_r, "CLOSE");
    run_until(l, &close_r.calls, 1000);
    assert_int_equal(close_r.calls, 1);
    assert_string_equal(close_r.str, "connection lost");
    assert_false(rclient_connected(c));

    /* down: fail fast (from the loop, never inside rclient_command) */
    uint64_t t0 = util_mono_ms();
    send_cmd(c, &ping, "PING");
    assert_int_equal(ping.calls, 0);
    run_until(l, &ping.calls, 1000);
    assert_string_equal(ping.str, "not connected");
    assert_true(util_mono_ms() - t0 < 50);
    assert_int_equal(ping.in_command, 0);

    /* the server is still listening: reconnect in the background */
    assert_true(wait_connected(l, c, 2000));
    assert_int_equal(f.accepted, 2);
    rec_t again = { 0 };
    send_cmd(c, &again, "PING");
    run_until(l, &again.calls, 1000);
    assert_string_equal(again.str, "PONG");

    rclient_free(c);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_server_down_and_back(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    unsigned port = f.port;
    rclient_t *c = client_for(l, port, 1000);
    assert_true(wait_connected(l, c, 1000));

    rec_t slow = { 0 };
    send_cmd(c, &slow, "SLOW");
    run_for(l, 20);
    fake_stop(&f); /* listener and connection gone */
    run_until(l, &slow.calls, 1000);
    assert_string_equal(slow.str, "connection lost");

    /* while down, several reconnect attempts fail; commands fail fast */
    for (int i = 0; i < 5; i++) {
        rec_t r = { 0 };
        uint64_t t0 = util_mono_ms();
        send_cmd(c, &r, "PING");
        run_until(l, &r.calls, 1000);
        assert_string_equal(r.str, "not connected");
        assert_true(util_mono_ms() - t0 < 50);
        run_for(l, 60);
    }
    assert_false(rclient_connected(c));

    /* back on the same port: the client finds it (backoff capped at 200 ms) */
    fake_listen(&f, port);
    assert_true(wait_connected(l, c, 2000));
    rec_t ping = { 0 };
    send_cmd(c, &ping, "PING");
    run_until(l, &ping.calls, 1000);
    assert_string_equal(ping.str, "PONG");
    assert_true(rclient_errors(c) >= 6);

    rclient_free(c);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_free_with_pending_each_once(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 1000);
    assert_true(wait_connected(l, c, 1000));

    rec_t r[4];
    memset(r, 0, sizeof(r));
    send_cmd(c, &r[0], "SLOW");
    send_cmd(c, &r[1], "PING");
    send_cmd(c, &r[2], "PING");
    uint64_t cancelled = send_cmd(c, &r[3], "PING");
    rclient_cancel(c, cancelled);
    run_for(l, 30);
    rclient_free(c);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_string_equal(r[i].str, "shutting down");
    }
    assert_int_equal(r[3].calls, 0);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_free_inside_callback(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 1000);
    assert_true(wait_connected(l, c, 1000));

    /* two replies in one read: the first callback frees the client; the
     * second command must still complete exactly once */
    rec_t a = { 0 }, b = { 0 }, d = { 0 };
    a.free_me = c;
    send_cmd(c, &a, "PING");
    send_cmd(c, &b, "PING");
    send_cmd(c, &d, "SLOW");
    run_until(l, &d.calls, 1000);
    run_for(l, 250); /* the fake's SLOW reply reaches a closed socket */
    assert_int_equal(a.calls, 1);
    assert_string_equal(a.str, "PONG");
    assert_int_equal(b.calls, 1);
    assert_int_equal(d.calls, 1);
    assert_string_equal(d.str, "shutting down");
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_free_inside_timeout_callback(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 40);
    assert_true(wait_connected(l, c, 1000));
    rec_t a = { 0 }, b = { 0 };
    a.free_me = c;
    send_cmd(c, &a, "SLOW");
    send_cmd(c, &b, "PING");
    run_until(l, &b.calls, 1000);
    assert_int_equal(a.calls, 1);
    assert_string_equal(a.str, "timeout");
    assert_int_equal(b.calls, 1);
    /* b's own timer may have come first in the same pass; either way once */
    assert_true(strcmp(b.str, "shutting down") == 0 || strcmp(b.str, "timeout") == 0);
    run_for(l, 250);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_nothing_listening(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    unsigned port = f.port;
    fake_stop(&f); /* a port nobody listens on */
    rclient_t *c = client_for(l, port, 1000);
    rec_t r = { 0 };
    send_cmd(c, &r, "PING");
    run_until(l, &r.calls, 1000);
    assert_int_equal(r.calls, 1);
    assert_true(strcmp(r.str, "connection lost") == 0 || strcmp(r.str, "not connected") == 0);
    assert_false(rclient_connected(c));
    rec_t r2 = { 0 };
    send_cmd(c, &r2, "PING");
    run_until(l, &r2.calls, 1000);
    assert_string_equal(r2.str, "not connected");
    rclient_free(c);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_many_pipelined(void **state)
{
    loop_t *l = loop_new();
    fake_t f;
    fake_start(&f, l);
    rclient_t *c = client_for(l, f.port, 2000);
    assert_true(wait_connected(l, c, 1000));
    enum { N = 500 };
    static rec_t r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++)
        send_cmd(c, &r[i], "PING");
    run_until(l, &r[N - 1].calls, 3000);
    for (int i = 0; i < N; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_string_equal(r[i].str, "PONG");
    }
    assert_int_equal(f.commands, N);
    rclient_free(c);
    fake_stop(&f);
    assert_loop_empty(l);
    loop_free(l);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_replies_and_error_reply),
        cmocka_unit_test(test_timeout_then_late_reply_dropped),
        cmocka_unit_test(test_timeout_counts_from_the_write),
        cmocka_unit_test(test_timeout_reads_the_socket_first),
        cmocka_unit_test(test_server_closes_then_reconnect),
        cmocka_unit_test(test_server_down_and_back),
        cmocka_unit_test(test_free_with_pending_each_once),
        cmocka_unit_test(test_free_inside_callback),
        cmocka_unit_test(test_free_inside_timeout_callback),
        cmocka_unit_test(test_nothing_listening),
        cmocka_unit_test(test_many_pipelined),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

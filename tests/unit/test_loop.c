/*
 * Unit tests for core/loop (timers, fds, wakeup) and core/stream over
 * socketpairs. Every test ends with the loop empty.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "core/loop.h"
#include "core/stream.h"
#include "core/util.h"

#define assert_loop_empty(l)                          \
    do {                                              \
        assert_int_equal(loop_fd_count(l), 0);        \
        assert_int_equal(loop_timer_count(l), 0);     \
    } while (0)

typedef struct order {
    int fired[16];
    int n;
} order_t;

typedef struct tctx {
    loop_timer_t t;
    order_t     *o;
    int          id;
} tctx_t;

static void record(loop_t *loop, loop_timer_t *t, void *arg)
{
    tctx_t *c = arg;
    c->o->fired[c->o->n++] = c->id;
}

static void test_timers_fire_in_deadline_order(void **state)
{
    loop_t *l = loop_new();
    order_t o = { { 0 }, 0 };
    tctx_t c[5];
    const unsigned delays[5] = { 40, 10, 30, 0, 20 };
    for (int i = 0; i < 5; i++) {
        c[i].o = &o;
        c[i].id = i;
        loop_timer_init(&c[i].t, record, &c[i]);
        loop_timer_set(l, &c[i].t, delays[i]);
    }
    assert_int_equal(loop_timer_count(l), 5);
    uint64_t start = util_mono_ms();
    assert_int_equal(loop_run(l), 0);
    uint64_t took = util_mono_ms() - start;
    assert_int_equal(o.n, 5);
    const int want[5] = { 3, 1, 4, 2, 0 };
    for (int i = 0; i < 5; i++)
        assert_int_equal(o.fired[i], want[i]);
    assert_true(took >= 40);
    for (int i = 0; i < 5; i++)
        assert_false(loop_timer_active(&c[i].t));
    assert_loop_empty(l);
    loop_free(l);
}

static void test_timer_cancel_and_rearm(void **state)
{
    loop_t *l = loop_new();
    order_t o = { { 0 }, 0 };
    tctx_t a = { .o = &o, .id = 1 }, b = { .o = &o, .id = 2 }, c = { .o = &o, .id = 3 };
    loop_timer_init(&a.t, record, &a);
    loop_timer_init(&b.t, record, &b);
    loop_timer_init(&c.t, record, &c);
    loop_timer_set(l, &a.t, 5);
    loop_timer_set(l, &b.t, 10);
    loop_timer_set(l, &c.t, 15);
    loop_timer_cancel(l, &b.t);
    loop_timer_cancel(l, &b.t); /* twice is harmless */
    loop_timer_set(l, &a.t, 30); /* re-arm moves it after c */
    assert_int_equal(loop_timer_count(l), 2);
    loop_run(l);
    assert_int_equal(o.n, 2);
    assert_int_equal(o.fired[0], 3);
    assert_int_equal(o.fired[1], 1);
    assert_loop_empty(l);
    loop_free(l);
}

/* A callback that re-arms itself a fixed number of times. */
typedef struct rearm {
    loop_timer_t t;
    int          left;
    int          runs;
} rearm_t;

static void rearm_cb(loop_t *loop, loop_timer_t *t, void *arg)
{
    rearm_t *r = arg;
    r->runs++;
    if (--r->left > 0)
        loop_timer_set(loop, t, 0);
}

static void test_timer_rearm_from_callback(void **state)
{
    loop_t *l = loop_new();
    rearm_t r = { .left = 100 };
    loop_timer_init(&r.t, rearm_cb, &r);
    loop_timer_set(l, &r.t, 0);
    loop_run(l);
    assert_int_equal(r.runs, 100);
    assert_loop_empty(l);
    loop_free(l);
}

typedef struct heapt {
    loop_timer_t t;
    int          fired;
    uint64_t     when;
} heapt_t;

static uint64_t last_when;
static int      order_ok;

static void heap_cb(loop_t *loop, loop_timer_t *t, void *arg)
{
    heapt_t *h = arg;
    h->fired++;
    if (h->when < last_when)
        order_ok = 0;
    last_when = h->when;
}

static void test_many_timers_heap(void **state)
{
    enum { N = 600 };
    static heapt_t h[N];
    loop_t *l = loop_new();
    last_when = 0;
    order_ok = 1;
    for (int k = 0; k < N; k++) {
        int i = (k * 7919) % N; /* scrambled arming order */
        loop_timer_init(&h[i].t, heap_cb, &h[i]);
        h[i].fired = 0;
        loop_timer_set(l, &h[i].t, (uint64_t)((i * 37) % 50));
        h[i].when = h[i].t.when;
    }
    for (int i = 0; i < N; i += 3)
        loop_timer_cancel(l, &h[i].t);
    assert_int_equal(loop_timer_count(l), N - N / 3);
    loop_run(l);
    assert_true(order_ok);
    for (int i = 0; i < N; i++)
        assert_int_equal(h[i].fired, i % 3 == 0 ? 0 : 1);
    assert_loop_empty(l);
    loop_free(l);
}

/* ---- fds ---- */

typedef struct fdctx {
    int  reads;
    char got[64];
} fdctx_t;

static void on_fd_read(loop_t *loop, int fd, unsigned ev, void *arg)
{
    fdctx_t *c = arg;
    assert_true(ev & LOOP_READ);
    ssize_t n = read(fd, c->got, sizeof(c->got) - 1);
    assert_true(n > 0);
    c->got[n] = '\0';
    c->reads++;
    loop_fd_del(loop, fd);
}

static void test_fd_readable(void **state)
{
    loop_t *l = loop_new();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    fdctx_t c = { 0 };
    assert_int_equal(loop_fd_add(l, sv[0], LOOP_READ, on_fd_read, &c), 0);
    assert_int_equal(loop_fd_add(l, sv[0], LOOP_READ, on_fd_read, &c), -1); /* twice */
    assert_int_equal(write(sv[1], "ping", 4), 4);
    loop_run(l);
    assert_int_equal(c.reads, 1);
    assert_string_equal(c.got, "ping");
    assert_loop_empty(l);
    close(sv[0]);
    close(sv[1]);
    loop_free(l);
}

/* ---- wakeup from another thread ---- */

static void on_wake(loop_t *loop, void *arg)
{
    (*(int *)arg)++;
    loop_stop(loop);
}

static void *waker(void *arg)
{
    usleep(20000);
    loop_wakeup(arg);
    return NULL;
}

static void test_wakeup_from_thread(void **state)
{
    loop_t *l = loop_new();
    int woke = 0;
    loop_set_wakeup(l, on_wake, &woke);
    /* a long timer keeps the loop alive until the wakeup stops it */
    loop_timer_t t;
    loop_timer_init(&t, record, NULL);
    loop_timer_set(l, &t, 10000);
    pthread_t th;
    pthread_create(&th, NULL, waker, l);
    uint64_t start = util_mono_ms();
    loop_run(l);
    pthread_join(th, NULL);
    assert_int_equal(woke, 1);
    assert_true(util_mono_ms() - start < 5000);
    loop_timer_cancel(l, &t);
    assert_loop_empty(l);
    loop_free(l);
}

/* ---- stream over a socketpair ---- */

typedef struct sctx {
    int    events[STREAM_EV_LAST];
    char   data[256];
    int    free_on_data;
    stream_t *s;
} sctx_t;

static void on_stream(stream_t *s, stream_event_t ev, void *arg)
{
    sctx_t *c = arg;
    c->events[ev]++;
    if (ev == STREAM_EV_DATA) {
        buf_t *in = stream_input(s);
        strncat(c->data, buf_head(in), sizeof(c->data) - strlen(c->data) - 1);
        buf_consume(in, buf_size(in));
        if (c->free_on_data) {
            stream_free(s); /* inside the callback: released after it returns */
            c->s = NULL;
        }
    } else if (ev == STREAM_EV_CLOSED || ev == STREAM_EV_TIMEOUT || ev == STREAM_EV_ERROR) {
        stream_free(s);
        c->s = NULL;
    }
}

static void test_stream_data_then_eof(void **state)
{
    loop_t *l = loop_new();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    sctx_t c = { 0 };
    c.s = stream_new(l, on_stream, &c);
    assert_int_equal(stream_attach(c.s, sv[0]), 0);
    stream_puts(c.s, "HELLO\r\n");
    char got[16] = "";
    assert_int_equal(read(sv[1], got, 7), 7);
    assert_memory_equal(got, "HELLO\r\n", 7);
    assert_int_equal(write(sv[1], "250 ok\r\n", 8), 8);
    close(sv[1]);
    loop_run(l);
    assert_string_equal(c.data, "250 ok\r\n");
    assert_int_equal(c.events[STREAM_EV_DATA], 1);
    assert_int_equal(c.events[STREAM_EV_CLOSED], 1);
    assert_int_equal(c.events[STREAM_EV_ERROR], 0);
    assert_null(c.s);
    assert_loop_empty(l);
    loop_free(l);
}

static void test_stream_free_inside_callback(void **state)
{
    loop_t *l = loop_new();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    sctx_t c = { 0 };
    c.free_on_data = 1;
    c.s = stream_new(l, on_stream, &c);
    assert_int_equal(stream_attach(c.s, sv[0]), 0);
    assert_int_equal(write(sv[1], "x", 1), 1);
    loop_run(l);
    assert_int_equal(c.events[STREAM_EV_DATA], 1);
    assert_int_equal(c.events[STREAM_EV_CLOSED], 0);
    assert_loop_empty(l);
    close(sv[1]);
    loop_free(l);
}

static void test_stream_timeout(void **state)
{
    loop_t *l = loop_new();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    sctx_t c = { 0 };
    c.s = stream_new(l, on_stream, &c);
    assert_int_equal(stream_attach(c.s, sv[0]), 0);
    stream_set_timeout(c.s, 30);
    uint64_t start = util_mono_ms();
    loop_run(l);
    uint64_t took = util_mono_ms() - start;
    assert_int_equal(c.events[STREAM_EV_TIMEOUT], 1);
    assert_true(took >= 30);
    assert_loop_empty(l);
    close(sv[1]);
    loop_free(l);
}

static void test_stream_connect_refused(void **state)
{
    loop_t *l = loop_new();
    /* bind a port, then close it: nothing listens there any more */
    int probe = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET };
    sa.sin_addr.s_addr = htonl(0x7f000001);
    assert_int_equal(bind(probe, (struct sockaddr *)&sa, sizeof(sa)), 0);
    socklen_t sl = sizeof(sa);
    getsockname(probe, (struct sockaddr *)&sa, &sl);
    close(probe);
    sctx_t c = { 0 };
    c.s = stream_new(l, on_stream, &c);
    assert_int_equal(stream_connect(c.s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    /* the failure is reported from the loop, never from stream_connect */
    assert_int_equal(c.events[STREAM_EV_ERROR], 0);
    loop_run(l);
    assert_int_equal(c.events[STREAM_EV_ERROR], 1);
    assert_int_equal(c.events[STREAM_EV_CONNECTED], 0);
    assert_loop_empty(l);
    loop_free(l);
}

/* A reply that arrives while a callback keeps the loop busy past a
 * timer's deadline is read before that timer fires: the timeout is not
 * declared with the answer already in the socket. */
typedef struct busy {
    int      order[4];
    int      n;
    int      wake_peer;  /* written during the slow callback */
} busy_t;

static void on_slow(loop_t *loop, int fd, unsigned events, void *arg)
{
    busy_t *b = arg;
    char c;
    assert_int_equal(read(fd, &c, 1), 1);
    b->order[b->n++] = 1;
    assert_int_equal(write(b->wake_peer, "r", 1), 1); /* the reply arrives... */
    usleep(40 * 1000);                                /* ...while we are busy */
}

static void on_reply_ready(loop_t *loop, int fd, unsigned events, void *arg)
{
    busy_t *b = arg;
    char c;
    assert_int_equal(read(fd, &c, 1), 1);
    b->order[b->n++] = 2;
}

static void on_deadline(loop_t *loop, loop_timer_t *t, void *arg)
{
    busy_t *b = arg;
    b->order[b->n++] = 3;
}

static void test_ready_io_before_due_timer(void **state)
{
    loop_t *l = loop_new();
    int slow[2], reply[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, slow), 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, reply), 0);
    busy_t b = { .wake_peer = reply[1] };
    assert_int_equal(loop_fd_add(l, slow[0], LOOP_READ, on_slow, &b), 0);
    assert_int_equal(loop_fd_add(l, reply[0], LOOP_READ, on_reply_ready, &b), 0);
    loop_timer_t deadline;
    loop_timer_init(&deadline, on_deadline, &b);
    loop_timer_set(l, &deadline, 10);
    assert_int_equal(write(slow[1], "s", 1), 1);
    for (int i = 0; i < 10 && b.n < 3; i++)
        loop_run_once(l, 100);
    assert_int_equal(b.n, 3);
    assert_int_equal(b.order[0], 1);
    assert_int_equal(b.order[1], 2); /* the reply, although the deadline passed during on_slow */
    assert_int_equal(b.order[2], 3);
    loop_fd_del(l, slow[0]);
    loop_fd_del(l, reply[0]);
    for (int i = 0; i < 2; i++) {
        close(slow[i]);
        close(reply[i]);
    }
    assert_loop_empty(l);
    loop_free(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_timers_fire_in_deadline_order),
        cmocka_unit_test(test_timer_cancel_and_rearm),
        cmocka_unit_test(test_timer_rearm_from_callback),
        cmocka_unit_test(test_many_timers_heap),
        cmocka_unit_test(test_fd_readable),
        cmocka_unit_test(test_wakeup_from_thread),
        cmocka_unit_test(test_stream_data_then_eof),
        cmocka_unit_test(test_stream_free_inside_callback),
        cmocka_unit_test(test_stream_timeout),
        cmocka_unit_test(test_stream_connect_refused),
        cmocka_unit_test(test_ready_io_before_due_timer),
    };
    return cmocka_run_group_tests_name("loop", tests, NULL, NULL);
}

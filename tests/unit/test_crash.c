/*
 * SUMMARY
 *  tests/unit/test_crash.c - a crash is counted against the blamed message.
 * DESCRIPTION
 *  Each case forks a child that connects the crash reporter to a fake
 *  Redis listening here on 127.0.0.1 (it reads RESP and answers ":1" per
 *  command), sets (or clears) a blame and crashes; the parent checks the
 *  exact bytes the handler sent, the line on the child's stderr, and that
 *  the child died by its signal. A signal sent by another process is not
 *  counted. The loop clears a blame before and after every callback.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "core/crash.h"
#include "core/loop.h"

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

enum { CRASH_RAISE_SEGV, CRASH_ABORT, CRASH_FAULT, CRASH_OVERFLOW, CRASH_KILLED };

typedef struct fake {
    int  lfd;
    int  port;
    char got[4096];
    size_t ngot;
    char err[4096];
    size_t nerr;
    int  status;
} fake_t;

static int listen_loopback(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(fd, 4), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

/* Complete RESP arrays of bulk strings at the head of b[0..n). */
static size_t resp_commands(const char *b, size_t n)
{
    size_t cmds = 0, at = 0;
    for (;;) {
        if (at >= n || b[at] != '*')
            return cmds;
        char *end;
        long argc = strtol(b + at + 1, &end, 10);
        const char *nl = memchr(b + at, '\n', n - at);
        if (nl == NULL)
            return cmds;
        at = (size_t)(nl - b) + 1;
        for (long i = 0; i < argc; i++) {
            if (at >= n || b[at] != '$')
                return cmds;
            long len = strtol(b + at + 1, &end, 10);
            nl = memchr(b + at, '\n', n - at);
            if (nl == NULL)
                return cmds;
            at = (size_t)(nl - b) + 1 + (size_t)len + 2;
            if (at > n)
                return cmds;
        }
        cmds++;
    }
}

static int fail_child(const char *why)
{
    ssize_t w = write(STDERR_FILENO, why, strlen(why));
    (void)w;
    _exit(99);
}

static volatile int deeper = 1; /* always: the compiler cannot know */

static int recurse(int depth)
{
    volatile char pad[1024];
    pad[0] = (char)depth;
    return deeper ? recurse(depth + 1) + pad[0] : 0;
}

static void child(int port, const char *blame, int clear, int how)
{
    /* cmocka's own handlers would be the ones chained to */
    static const int sigs[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT };
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        signal(sigs[i], SIG_DFL);
    if (crash_install() != 0)
        fail_child("install\n");
    if (crash_thread_init() != 0)
        fail_child("altstack\n");
    if (crash_reporter_connect("127.0.0.1", (unsigned)port, 60000, 1000) != 0)
        fail_child("connect\n");
    crash_blame_set(blame);
    if (clear)
        crash_blame_clear();
    switch (how) {
    case CRASH_RAISE_SEGV: raise(SIGSEGV); break;
    case CRASH_ABORT: abort();
    case CRASH_FAULT: {
        /* a page nobody may touch: a real fault (a null pointer would be
         * the sanitizers' to report) */
        volatile int *p = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        *p = 1;
        break;
    }
    case CRASH_OVERFLOW: recurse(0); break;
    case CRASH_KILLED:
        for (;;)
            pause(); /* the parent sends SIGSEGV with kill(2) */
    }
    _exit(0);
}

/* Run one child; the fake Redis answers until it hangs up. */
static void run(fake_t *f, const char *blame, int clear, int how)
{
    memset(f, 0, sizeof(*f));
    f->lfd = listen_loopback(&f->port);
    int errp[2];
    assert_int_equal(pipe(errp), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(errp[0]);
        dup2(errp[1], STDERR_FILENO);
        child(f->port, blame, clear, how);
    }
    close(errp[1]);
    struct pollfd lp = { .fd = f->lfd, .events = POLLIN };
    assert_int_equal(poll(&lp, 1, 10000), 1);
    int c = accept(f->lfd, NULL, NULL);
    assert_true(c >= 0);
    if (how == CRASH_KILLED) {
        usleep(100 * 1000); /* the child is past its blame */
        kill(pid, SIGSEGV);
    }
    size_t answered = 0;
    for (;;) {
        struct pollfd p[2] = { { .fd = c, .events = POLLIN }, { .fd = errp[0], .events = POLLIN } };
        int r = poll(p, 2, 10000);
        assert_true(r > 0);
        if (p[1].revents) {
            ssize_t n = read(errp[0], f->err + f->nerr, sizeof(f->err) - 1 - f->nerr);
            if (n > 0)
                f->nerr += (size_t)n;
        }
        if (p[0].revents) {
            ssize_t n = read(c, f->got + f->ngot, sizeof(f->got) - 1 - f->ngot);
            if (n <= 0)
                break; /* the child is gone */
            f->ngot += (size_t)n;
            for (size_t cmds = resp_commands(f->got, f->ngot); answered < cmds; answered++)
                assert_int_equal(write(c, ":1\r\n", 4), 4);
        }
    }
    close(c);
    ssize_t n;
    while ((n = read(errp[0], f->err + f->nerr, sizeof(f->err) - 1 - f->nerr)) > 0)
        f->nerr += (size_t)n;
    close(errp[0]);
    f->got[f->ngot] = '\0';
    f->err[f->nerr] = '\0';
    assert_int_equal(waitpid(pid, &f->status, 0), pid);
    close(f->lfd);
}

static const char want_42[] = "*2\r\n$4\r\nINCR\r\n$11\r\nmp:d:msg-42\r\n"
                              "*3\r\n$7\r\nPEXPIRE\r\n$11\r\nmp:d:msg-42\r\n$5\r\n60000\r\n";

/* ASan catches a real fault (and a raised SIGSEGV) itself, after ours has
 * reported, and exits instead of dying by the signal */
static void assert_died_by(const fake_t *f, int sig, int asan_takes_it)
{
    if (UNDER_ASAN && asan_takes_it) {
        assert_true(WIFSIGNALED(f->status) || (WIFEXITED(f->status) && WEXITSTATUS(f->status) != 0));
        return;
    }
    if (!WIFSIGNALED(f->status))
        fail_msg("child exited %d, stderr: %s", WEXITSTATUS(f->status), f->err);
    assert_int_equal(WTERMSIG(f->status), sig);
}

static void test_segv_counts_the_blamed_message(void **state)
{
    fake_t f;
    run(&f, "msg-42", 0, CRASH_RAISE_SEGV);
    assert_int_equal(f.ngot, sizeof(want_42) - 1);
    assert_memory_equal(f.got, want_42, sizeof(want_42) - 1);
    assert_non_null(strstr(f.err, "crash: signal 11 while handling message msg-42\n"));
    assert_died_by(&f, SIGSEGV, 1);
}

static void test_abort_counts_the_blamed_message(void **state)
{
    fake_t f;
    run(&f, "msg-42", 0, CRASH_ABORT);
    assert_string_equal(f.got, want_42);
    assert_non_null(strstr(f.err, "crash: signal 6 while handling message msg-42\n"));
    assert_died_by(&f, SIGABRT, 0);
}

static void test_fault_and_stack_overflow_are_caught(void **state)
{
    fake_t f;
    run(&f, "ovf-1", 0, CRASH_FAULT);
    if (f.ngot == 0)
        print_message("child stderr: %s\n", f.err);
    assert_string_equal(f.got, "*2\r\n$4\r\nINCR\r\n$10\r\nmp:d:ovf-1\r\n"
                               "*3\r\n$7\r\nPEXPIRE\r\n$10\r\nmp:d:ovf-1\r\n$5\r\n60000\r\n");
    assert_died_by(&f, SIGSEGV, 1);
    if (UNDER_ASAN)
        return; /* ASan's own overflow check comes first */
    run(&f, "ovf-2", 0, CRASH_OVERFLOW);
    assert_non_null(strstr(f.got, "mp:d:ovf-2\r\n"));
    assert_non_null(strstr(f.err, "crash: signal 11 while handling message ovf-2\n"));
    assert_died_by(&f, SIGSEGV, 0);
}

static void test_no_blame_sends_nothing(void **state)
{
    fake_t f;
    run(&f, NULL, 0, CRASH_RAISE_SEGV);
    assert_int_equal(f.ngot, 0);
    assert_null(strstr(f.err, "crash:"));
    assert_died_by(&f, SIGSEGV, 1);
    run(&f, "msg-cleared", 1, CRASH_ABORT);
    assert_int_equal(f.ngot, 0);
    assert_null(strstr(f.err, "crash:"));
    assert_died_by(&f, SIGABRT, 0);
    /* an id too long for the slot is not blamed (never a truncated one) */
    char longid[CRASH_ID_MAX + 2];
    memset(longid, 'x', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    run(&f, longid, 0, CRASH_ABORT);
    assert_int_equal(f.ngot, 0);
    assert_died_by(&f, SIGABRT, 0);
    /* kill -SEGV from another process is not the message's doing */
    run(&f, "msg-killed", 0, CRASH_KILLED);
    assert_int_equal(f.ngot, 0);
    assert_null(strstr(f.err, "crash:"));
    assert_died_by(&f, SIGSEGV, 1);
}

/* ---- the loop clears a blame before every callback ---- */

static char seen[2][64];

static void set_blame(loop_t *loop, loop_timer_t *t, void *arg)
{
    snprintf(seen[0], sizeof(seen[0]), "[%s]", crash_blame());
    crash_blame_set("stale-1");
}

static void look_blame(loop_t *loop, loop_timer_t *t, void *arg)
{
    snprintf(seen[1], sizeof(seen[1]), "[%s]", crash_blame());
    crash_blame_set("stale-2");
}

static void test_loop_clears_the_blame(void **state)
{
    loop_t *loop = loop_new();
    loop_timer_t a, b;
    loop_timer_init(&a, set_blame, NULL);
    loop_timer_init(&b, look_blame, NULL);
    crash_blame_set("before");
    loop_timer_set(loop, &a, 0);
    loop_timer_set(loop, &b, 1);
    loop_run(loop);
    assert_string_equal(seen[0], "[]");
    assert_string_equal(seen[1], "[]");
    assert_string_equal(crash_blame(), ""); /* nor into the loop's own code */
    crash_blame_set("x");
    assert_string_equal(crash_blame(), "x");
    crash_blame_clear();
    assert_string_equal(crash_blame(), "");
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_segv_counts_the_blamed_message),
        cmocka_unit_test(test_abort_counts_the_blamed_message),
        cmocka_unit_test(test_fault_and_stack_overflow_are_caught),
        cmocka_unit_test(test_no_blame_sends_nothing),
        cmocka_unit_test(test_loop_clears_the_blame),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

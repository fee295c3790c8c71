/*
 * SUMMARY
 *  core/crash.c - count a crash against the message that caused it (see
 *  crash.h).
 * DESCRIPTION
 *  The blame is a thread-local buffer. The handler builds the RESP of
 *  INCR and PEXPIRE by hand on its own stack (the TTL is formatted at
 *  connect time), writes it with send() on the reporter's blocking
 *  socket, and reads with poll() and read() until both replies (one line
 *  each) are in or the wait is over. One report per process: a second
 *  thread crashing meanwhile only chains. The previous handlers are kept
 *  per signal and called as they were installed (SA_SIGINFO or not); a
 *  default action is restored and the signal raised again, so the process
 *  dies by it (a fault re-executes and a raise()d signal is pending when
 *  the handler returns).
 * DIAGNOSTICS
 *  The handler writes one line to stderr; the reporter's (re)connects log
 *  at info, its failures at warn (once until it connects again).
 */
#include "core/crash.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

static __thread char blame[CRASH_ID_MAX + 1];
static __thread void *altstack;

static const int crash_signals[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT };
#define NSIGNALS (sizeof(crash_signals) / sizeof(crash_signals[0]))
static struct sigaction previous[NSIGNALS];
static atomic_int installed;
static atomic_int reporting; /* a handler is reporting: the fd is not closed under it */

/* the reporter: set up by the main thread, read by handlers */
static atomic_int rep_fd = -1;
static char rep_ttl[24];        /* PEXPIRE's argument, formatted once */
static struct sockaddr_storage rep_addr;
static socklen_t rep_addrlen;
static char rep_name[300];       /* host:port, for the log */
static unsigned rep_timeout_ms = 500;
static int rep_warned;

#define ALTSTACK_SIZE (64 * 1024)

void crash_blame_set(const char *msg_id)
{
    size_t n = msg_id ? strlen(msg_id) : 0;
    if (n == 0 || n > CRASH_ID_MAX) {
        blame[0] = '\0';
        return;
    }
    memcpy(blame, msg_id, n + 1);
}

void crash_blame_clear(void)
{
    blame[0] = '\0';
}

const char *crash_blame(void)
{
    return blame;
}

/* ---- the handler: async-signal-safe from here to crash_handler ---- */

static size_t put(char *dst, size_t at, const char *s, size_t n)
{
    memcpy(dst + at, s, n);
    return at + n;
}

static size_t put_str(char *dst, size_t at, const char *s)
{
    return put(dst, at, s, strlen(s));
}

static size_t put_uint(char *dst, size_t at, unsigned long v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        dst[at++] = tmp[--n];
    return at;
}

/* $<len>\r\n<s>\r\n */
static size_t put_bulk(char *dst, size_t at, const char *s, size_t n)
{
    at = put(dst, at, "$", 1);
    at = put_uint(dst, at, n);
    at = put(dst, at, "\r\n", 2);
    at = put(dst, at, s, n);
    return put(dst, at, "\r\n", 2);
}

static size_t put_key(char *dst, size_t at, const char *id, size_t n)
{
    at = put(dst, at, "$", 1);
    at = put_uint(dst, at, n + 5);
    at = put(dst, at, "\r\nmp:d:", 7);
    at = put(dst, at, id, n);
    return put(dst, at, "\r\n", 2);
}

static int send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Both replies (one line each: ":n" or "-ERR ..."), or the wait is over.
 * 0 when both came. */
static int await_replies(int fd, int want)
{
    long end = mono_ms() + CRASH_REPLY_WAIT_MS;
    char b[256];
    while (want > 0) {
        long left = end - mono_ms();
        if (left <= 0)
            return -1;
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        ssize_t n = read(fd, b, sizeof(b));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        for (ssize_t i = 0; i < n; i++)
            want -= b[i] == '\n';
    }
    return 0;
}

static void say(const char *s)
{
    ssize_t w = write(STDERR_FILENO, s, strlen(s));
    (void)w;
}

static void report(int sig, const char *id)
{
    size_t n = strlen(id);
    int counted = 0;
    int fd = atomic_load(&rep_fd);
    if (fd >= 0) {
        char cmd[3 * CRASH_ID_MAX + 128];
        size_t at = 0;
        at = put_str(cmd, at, "*2\r\n");
        at = put_bulk(cmd, at, "INCR", 4);
        at = put_key(cmd, at, id, n);
        at = put_str(cmd, at, "*3\r\n");
        at = put_bulk(cmd, at, "PEXPIRE", 7);
        at = put_key(cmd, at, id, n);
        at = put_bulk(cmd, at, rep_ttl, strlen(rep_ttl));
        counted = send_all(fd, cmd, at) == 0 && await_replies(fd, 2) == 0;
    }
    char line[CRASH_ID_MAX + 128];
    size_t at = 0;
    at = put_str(line, at, "crash: signal ");
    at = put_uint(line, at, (unsigned long)sig);
    at = put_str(line, at, " while handling message ");
    at = put(line, at, id, n);
    if (!counted)
        at = put_str(line, at, " (not counted: no answer from Redis)");
    at = put(line, at, "\n", 1);
    line[at] = '\0';
    say(line);
}

static void crash_handler(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    /* a signal another process sent with kill(2) is no fault of the
     * message (an operator's kill -SEGV); raise() and abort() are ours */
    int sent = si != NULL && si->si_code == SI_USER && si->si_pid != getpid();
    if (blame[0] && !sent && atomic_exchange(&reporting, 1) == 0)
        report(sig, blame);
    blame[0] = '\0'; /* a chained handler's own fault is not counted twice */
    const struct sigaction *old = NULL;
    for (size_t i = 0; i < NSIGNALS; i++)
        if (crash_signals[i] == sig)
            old = &previous[i];
    errno = saved;
    if (old && (old->sa_flags & SA_SIGINFO) && old->sa_sigaction) {
        old->sa_sigaction(sig, si, uc);
        return;
    }
    if (old && old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
        old->sa_handler(sig);
        return;
    }
    /* the default action: a fault comes back when the handler returns, a
     * raised signal is pending until then */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig);
}

/* ---- set-up ---- */

int crash_install(void)
{
    if (atomic_exchange(&installed, 1))
        return 0;
    for (size_t i = 0; i < NSIGNALS; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = crash_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(crash_signals[i], &sa, &previous[i]) != 0)
            return -1;
    }
    return 0;
}

int crash_thread_init(void)
{
    if (altstack)
        return 0;
    stack_t ss;
    memset(&ss, 0, sizeof(ss));
    ss.ss_sp = malloc(ALTSTACK_SIZE);
    if (ss.ss_sp == NULL)
        return -1;
    ss.ss_size = ALTSTACK_SIZE;
    if (sigaltstack(&ss, NULL) != 0) {
        free(ss.ss_sp);
        return -1;
    }
    altstack = ss.ss_sp;
    return 0;
}

void crash_thread_fini(void)
{
    if (altstack == NULL)
        return;
    stack_t ss;
    memset(&ss, 0, sizeof(ss));
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, NULL);
    free(altstack);
    altstack = NULL;
}

static int rep_open(void)
{
    int fd = socket(rep_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    int r = connect(fd, (const struct sockaddr *)&rep_addr, rep_addrlen);
    if (r != 0 && errno == EINPROGRESS) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        int err = 0;
        socklen_t len = sizeof(err);
        if (poll(&p, 1, (int)rep_timeout_ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 &&
            err == 0)
            r = 0;
        else
            errno = err ? err : ETIMEDOUT;
    }
    if (r != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    /* blocking from here on: the handler writes a few hundred bytes to an
     * empty buffer, and bounds its wait for the replies with poll() */
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct timeval tv = { .tv_sec = 0, .tv_usec = CRASH_REPLY_WAIT_MS * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    return fd;
}

static void rep_set(int fd)
{
    int old = atomic_exchange(&rep_fd, fd);
    if (old >= 0 && !atomic_load(&reporting))
        close(old); /* a crash being reported keeps its descriptor: the process is ending */
}

static int rep_connect_now(void)
{
    int fd = rep_open();
    if (fd < 0) {
        if (!rep_warned)
            log_warn("crash", "reporter_down", "addr=%s reason=%s", rep_name, LOG_Q(strerror(errno)));
        rep_warned = 1;
        return -1;
    }
    rep_set(fd);
    rep_warned = 0;
    log_info("crash", "reporter_up", "addr=%s", rep_name);
    return 0;
}

int crash_reporter_connect(const char *host, unsigned port, uint64_t ttl_ms, unsigned timeout_ms)
{
    snprintf(rep_ttl, sizeof(rep_ttl), "%llu", (unsigned long long)(ttl_ms ? ttl_ms : 86400000));
    snprintf(rep_name, sizeof(rep_name), "%s:%u", host, port);
    rep_timeout_ms = timeout_ms ? timeout_ms : 500;
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    char service[16];
    snprintf(service, sizeof(service), "%u", port);
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0 || res == NULL || res->ai_addrlen > sizeof(rep_addr)) {
        log_warn("crash", "reporter_down", "addr=%s reason=%s", rep_name, LOG_Q(rc ? gai_strerror(rc) : "no address"));
        rep_warned = 1;
        if (res)
            freeaddrinfo(res);
        rep_addrlen = 0;
        return -1;
    }
    memcpy(&rep_addr, res->ai_addr, res->ai_addrlen);
    rep_addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return rep_connect_now();
}

int crash_reporter_check(void)
{
    if (rep_addrlen == 0)
        return 0;
    int fd = atomic_load(&rep_fd);
    if (fd >= 0) {
        /* nothing is ever due on this connection between crashes: readable
         * means closed (0), failed, or stray bytes (dropped) */
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, 0) == 0)
            return 1;
        char b[256];
        ssize_t n = recv(fd, b, sizeof(b), MSG_DONTWAIT);
        if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR)))
            return 1;
        log_info("crash", "reporter_lost", "addr=%s", rep_name);
        rep_set(-1);
    }
    return rep_connect_now() == 0;
}

int crash_reporter_connected(void)
{
    return atomic_load(&rep_fd) >= 0;
}

void crash_reporter_close(void)
{
    rep_set(-1);
    rep_addrlen = 0;
}

/*
 * SUMMARY
 *  core/stream.c - non-blocking TCP stream with optional TLS, as events.
 * DESCRIPTION
 *  The only file that sees EAGAIN and SSL_ERROR_WANT_*. Those conditions
 *  change the epoll interest and nothing else (nginx ngx_event_openssl):
 *  a TLS read that wants a write resumes when the socket is writable, and
 *  a write that wants a read resumes when it is readable. SSL_read is
 *  repeated until it wants more input, which also drains SSL_pending():
 *  epoll cannot see bytes already decrypted inside OpenSSL.
 *
 *  Writes are attempted at once from stream_write() for latency; what
 *  the socket does not take waits for EPOLLOUT. Failures found outside
 *  an fd callback are reported through a zero-delay timer so an owner
 *  never receives an event from inside its own stream_write() call.
 *
 *  The output is a queue of segments: bytes the stream owns (copied into
 *  one buffer, consecutive writes coalesced) and bytes it only references
 *  (stream_write_ref(): a message body goes out of the memory it was
 *  built in, never copied here). Plaintext sends the queue with one
 *  sendmsg() of up to STREAM_IOV_MAX segments. TLS writes a segment of a
 *  record or more straight from its memory; a shorter one with more
 *  behind it (a 10 KB message and its terminating ".\r\n", the "." of a
 *  dot-stuffed line between two pieces of a body) is first gathered with
 *  what follows into one record-sized buffer, so records stay full and
 *  few: at most one record's worth is ever copied at a time. An
 *  SSL_write that must be retried is retried with the same bytes and at
 *  least the same length (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER and
 *  SSL_MODE_ENABLE_PARTIAL_WRITE are set on every SSL object).
 *
 *  The inactivity timer is lazy: progress only records a timestamp and
 *  the timer re-arms itself for the remainder when it fires early.
 * DIAGNOSTICS
 *  stream_error() holds the reason for STREAM_EV_ERROR / TIMEOUT.
 */
#include "core/stream.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <arpa/inet.h>

#include "core/tls.h"
#include "core/util.h"

#define STREAM_READ_CHUNK 16384
#define STREAM_MAX_INPUT  (8u * 1024 * 1024) /* default unparsed input cap: hostile peers */
#define STREAM_IOV_MAX    64     /* segments per sendmsg() */
#define STREAM_TLS_WRITE  65536  /* bytes per SSL_write() (4 records) */
#define STREAM_GATHER_MAX 16384  /* TLS: one full record; a shorter segment with more behind it
                                  * is gathered with what follows */

/* One piece of the output queue: n bytes of the caller's memory at ref,
 * or (ref == NULL) the next n owned bytes at the head of s->out. */
typedef struct out_seg {
    const char *ref;
    size_t      n;
} out_seg_t;

typedef enum {
    ST_NEW = 0,
    ST_CONNECTING,
    ST_OPEN,
    ST_HANDSHAKE,
    ST_DEAD, /* closed, errored or timed out: waiting for stream_free */
} st_state_t;

struct stream {
    loop_t      *loop;
    int          fd;
    st_state_t   state;
    stream_cb    cb;
    void        *arg;
    buf_t        in;
    buf_t        out;           /* owned output bytes, in queue order */
    out_seg_t   *segs;          /* the output queue: segs[seg_head .. seg_end) */
    size_t       seg_head;
    size_t       seg_end;
    size_t       seg_cap;
    buf_t        gather;        /* TLS: small segments gathered into one record */
    size_t       out_total;     /* bytes queued and not yet written (segs + gather) */
    size_t       out_refs;      /* of which caller memory (stream_write_ref) */
    int          corked;
    SSL         *ssl;
    SSL_SESSION *new_sess;      /* newest session/ticket the server issued (owned) */
    int          read_wants_write;
    int          write_wants_read;
    int          hs_wants_write;
    int          paused;
    int          was_blocked;   /* output waited for EPOLLOUT: report DRAINED */
    unsigned     interest;
    unsigned     timeout_ms;
    size_t       max_input;     /* unparsed input cap (stream_set_max_input) */
    uint64_t     bytes_in;      /* bytes received since the stream was made */
    uint64_t     last_io;
    loop_timer_t io_timer;
    loop_timer_t defer_timer;
    int          deferred_ev;   /* -1 none */
    int          in_cb;
    int          freed;
    char         err[256];
    int          sys_errno; /* errno of the system call that failed, 0 if none did */
    int          bind_failed; /* the source address could not be bound (stream_connect_from) */
};

static const char *event_names[STREAM_EV_LAST] = {
    "connected", "tls_ready", "data", "drained", "timeout", "closed", "error",
};

const char *stream_event_name(stream_event_t ev)
{
    return ev < STREAM_EV_LAST ? event_names[ev] : "?";
}

static void stream_release(stream_t *s)
{
    buf_free(&s->in);
    buf_free(&s->out);
    buf_free(&s->gather);
    free(s->segs);
    free(s);
}

/* Deliver an event. Returns -1 if the owner freed the stream. */
static int emit(stream_t *s, stream_event_t ev)
{
    s->in_cb++;
    s->cb(s, ev, s->arg);
    s->in_cb--;
    if (s->freed) {
        if (s->in_cb == 0)
            stream_release(s);
        return -1;
    }
    return 0;
}

static void update_interest(stream_t *s);

static void teardown_io(stream_t *s)
{
    loop_timer_cancel(s->loop, &s->io_timer);
    if (s->fd >= 0) {
        loop_fd_del(s->loop, s->fd);
        s->interest = 0;
    }
}

/* Enter the dead state and report ev. */
static int fail(stream_t *s, stream_event_t ev, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(stream_t *s, stream_event_t ev, const char *fmt, ...)
{
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->err, sizeof(s->err), fmt, ap);
        va_end(ap);
    }
    s->state = ST_DEAD;
    teardown_io(s);
    return emit(s, ev);
}

static void defer_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    stream_t *s = arg;
    int ev = s->deferred_ev;
    s->deferred_ev = -1;
    if (ev < 0)
        return;
    if (ev == STREAM_EV_ERROR || ev == STREAM_EV_CLOSED || ev == STREAM_EV_TIMEOUT)
        fail(s, (stream_event_t)ev, NULL);
    else
        emit(s, (stream_event_t)ev);
}

static void defer_event(stream_t *s, stream_event_t ev)
{
    /* an error outranks anything queued before it */
    if (s->deferred_ev < 0 || ev == STREAM_EV_ERROR)
        s->deferred_ev = (int)ev;
    loop_timer_set(s->loop, &s->defer_timer, 0);
}

static void touch(stream_t *s)
{
    s->last_io = loop_now_ms(s->loop);
}

static void io_timer_fired(loop_t *loop, loop_timer_t *t, void *arg)
{
    stream_t *s = arg;
    if (s->state == ST_DEAD || s->timeout_ms == 0)
        return;
    uint64_t now = loop_update_time(loop);
    uint64_t due = s->last_io + s->timeout_ms;
    if (now < due) {
        loop_timer_set(loop, &s->io_timer, due - now);
        return;
    }
    fail(s, STREAM_EV_TIMEOUT, "no I/O for %u ms", s->timeout_ms);
}

void stream_set_timeout(stream_t *s, unsigned ms)
{
    s->timeout_ms = ms;
    touch(s);
    if (ms == 0 || s->state == ST_DEAD)
        loop_timer_cancel(s->loop, &s->io_timer);
    else
        loop_timer_set(s->loop, &s->io_timer, ms);
}

static const char *ssl_reason(stream_t *s, int ret, int sslerr, char *buf, size_t len)
{
    if (sslerr == SSL_ERROR_SYSCALL) {
        if (ERR_peek_last_error() != 0)
            return tls_error_string(buf, len);
        if (ret != 0 && errno != 0)
            s->sys_errno = errno;
        snprintf(buf, len, "%s", ret == 0 || errno == 0 ? "connection closed by peer" : strerror(errno));
        return buf;
    }
    if (s->ssl) {
        long vr = SSL_get_verify_result(s->ssl);
        if (vr != X509_V_OK) {
            snprintf(buf, len, "certificate verification failed: %s",
                     X509_verify_cert_error_string(vr));
            ERR_clear_error();
            return buf;
        }
    }
    return tls_error_string(buf, len);
}

/* Read what is available. Returns -1 if the stream was freed or died.
 * Reads land in a per-thread scratch buffer and only the bytes received
 * are appended to s->in: reserving a full chunk in every stream's own
 * buffer would pin 32 KiB of heap (16 KiB rounded up) per connection for
 * replies of a hundred bytes, which is what a pool of a thousand mostly
 * idle sessions must not pay.
 *
 * Every chunk read is handed to the owner at once (STREAM_EV_DATA), so
 * its parser sees the bytes as they arrive and can give up on a reply
 * that is already too big, instead of the stream reading the socket
 * empty first. What the owner leaves unparsed is capped by max_input:
 * past it the stream fails before reading another chunk, so a peer gets
 * at most the cap plus one chunk into memory. */
static int do_read(stream_t *s)
{
    static __thread char scratch[STREAM_READ_CHUNK];
    int eof = 0;
    s->read_wants_write = 0;
    while (!s->paused) {
        if (buf_size(&s->in) > s->max_input)
            return fail(s, STREAM_EV_ERROR, "peer sent more than %zu unparsed bytes",
                        s->max_input) < 0 ? -1 : -1;
        char *p = scratch;
        ssize_t n;
        if (s->ssl) {
            ERR_clear_error();
            int r = SSL_read(s->ssl, p, STREAM_READ_CHUNK);
            if (r > 0) {
                n = r;
            } else {
                int e = SSL_get_error(s->ssl, r);
                if (e == SSL_ERROR_WANT_READ)
                    break;
                if (e == SSL_ERROR_WANT_WRITE) {
                    s->read_wants_write = 1;
                    break;
                }
                if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && r == 0 &&
                                                   ERR_peek_last_error() == 0)) {
                    eof = 1;
                    break;
                }
                char why[200];
                ssl_reason(s, r, e, why, sizeof(why));
                return fail(s, STREAM_EV_ERROR, "TLS read: %s", why) < 0 ? -1 : -1;
            }
        } else {
            n = recv(s->fd, p, STREAM_READ_CHUNK, 0);
            if (n == 0) {
                eof = 1;
                break;
            }
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                if (errno == EINTR)
                    continue;
                int e = errno;
                s->sys_errno = e;
                return fail(s, STREAM_EV_ERROR, "read: %s", strerror(e)) < 0 ? -1 : -1;
            }
        }
        buf_append(&s->in, p, (size_t)n);
        s->bytes_in += (uint64_t)n;
        touch(s);
        if (emit(s, STREAM_EV_DATA) < 0 || s->state == ST_DEAD)
            return -1;
        if (s->state != ST_OPEN)
            return 0; /* the owner started TLS: what follows is the handshake's */
    }
    if (eof) {
        fail(s, STREAM_EV_CLOSED, "connection closed by peer");
        return -1;
    }
    return 0;
}

/* ---- the output queue ---- */

static void out_push(stream_t *s, const char *ref, size_t n)
{
    s->out_total += n;
    if (ref)
        s->out_refs += n;
    if (s->seg_end > s->seg_head) {
        out_seg_t *last = &s->segs[s->seg_end - 1];
        if (ref == NULL ? last->ref == NULL : last->ref != NULL && last->ref + last->n == ref) {
            last->n += n;
            return;
        }
    }
    if (s->seg_end == s->seg_cap) {
        if (s->seg_head > 0) {
            memmove(s->segs, s->segs + s->seg_head, (s->seg_end - s->seg_head) * sizeof(*s->segs));
            s->seg_end -= s->seg_head;
            s->seg_head = 0;
        }
        if (s->seg_end == s->seg_cap) {
            s->seg_cap = s->seg_cap ? s->seg_cap * 2 : 8;
            s->segs = xrealloc(s->segs, s->seg_cap * sizeof(*s->segs));
        }
    }
    s->segs[s->seg_end].ref = ref;
    s->segs[s->seg_end].n = n;
    s->seg_end++;
}

/* Take n bytes off the front of the segment queue (not s->gather). */
static void out_pop(stream_t *s, size_t n)
{
    while (n > 0) {
        out_seg_t *g = &s->segs[s->seg_head];
        size_t k = n < g->n ? n : g->n;
        if (g->ref) {
            g->ref += k;
            s->out_refs -= k;
        } else {
            buf_consume(&s->out, k);
        }
        g->n -= k;
        n -= k;
        if (g->n == 0)
            s->seg_head++;
    }
    if (s->seg_head == s->seg_end)
        s->seg_head = s->seg_end = 0;
}

static const char *seg_bytes(const stream_t *s, const out_seg_t *g, size_t owned_before)
{
    return g->ref ? g->ref : buf_head(&s->out) + owned_before;
}

/* Plaintext: one sendmsg() of the queue's first segments. Returns bytes
 * written, 0 when the socket is full, -1 on a failure. */
static ssize_t write_plain(stream_t *s)
{
    struct iovec iov[STREAM_IOV_MAX];
    int cnt = 0;
    size_t owned = 0;
    for (size_t i = s->seg_head; i < s->seg_end && cnt < STREAM_IOV_MAX; i++) {
        const out_seg_t *g = &s->segs[i];
        iov[cnt].iov_base = (void *)seg_bytes(s, g, owned);
        iov[cnt].iov_len = g->n;
        cnt++;
        if (g->ref == NULL)
            owned += g->n;
    }
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)cnt };
    for (;;) {
        ssize_t n = sendmsg(s->fd, &mh, MSG_NOSIGNAL);
        if (n >= 0) {
            out_pop(s, (size_t)n);
            s->out_total -= (size_t)n;
            return n;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        s->sys_errno = errno;
        snprintf(s->err, sizeof(s->err), "write: %s", strerror(errno));
        return -1;
    }
}

/* TLS: gather small segments from the front of the queue into s->gather,
 * up to one record. */
static void gather_front(stream_t *s)
{
    while (s->seg_head < s->seg_end && buf_size(&s->gather) < STREAM_GATHER_MAX) {
        const out_seg_t *g = &s->segs[s->seg_head];
        size_t room = STREAM_GATHER_MAX - buf_size(&s->gather);
        size_t k = g->n < room ? g->n : room;
        buf_append(&s->gather, seg_bytes(s, g, 0), k);
        out_pop(s, k);
    }
}

/* TLS: one SSL_write. Returns bytes written, 0 when it must wait, -1 on a
 * failure. A retried SSL_write always starts with the same bytes and is
 * never shorter: gathered bytes are written before anything else, a
 * segment at the front only grows (owned bytes coalesce), and a write
 * from the front segment that had to wait becomes a gathered write only
 * by gaining bytes after it. */
static ssize_t write_tls(stream_t *s)
{
    const char *p;
    size_t len;
    int gathered = 0;
    if (buf_size(&s->gather) == 0 && s->seg_end - s->seg_head > 1 &&
        s->segs[s->seg_head].n < STREAM_GATHER_MAX)
        gather_front(s);
    if (buf_size(&s->gather) > 0) {
        p = buf_head(&s->gather);
        len = buf_size(&s->gather);
        gathered = 1;
    } else {
        const out_seg_t *g = &s->segs[s->seg_head];
        p = seg_bytes(s, g, 0);
        len = g->n < STREAM_TLS_WRITE ? g->n : STREAM_TLS_WRITE;
    }
    ERR_clear_error();
    int r = SSL_write(s->ssl, p, (int)len);
    if (r > 0) {
        if (gathered)
            buf_consume(&s->gather, (size_t)r);
        else
            out_pop(s, (size_t)r);
        s->out_total -= (size_t)r;
        return r;
    }
    int e = SSL_get_error(s->ssl, r);
    if (e == SSL_ERROR_WANT_WRITE)
        return 0;
    if (e == SSL_ERROR_WANT_READ) {
        s->write_wants_read = 1;
        return 0;
    }
    char why[200];
    snprintf(s->err, sizeof(s->err), "TLS write: %s", ssl_reason(s, r, e, why, sizeof(why)));
    return -1;
}

/* Write what the socket takes. Returns 0 ok, -1 on a failure (recorded in
 * s->err, the caller reports it). */
static int do_write(stream_t *s)
{
    s->write_wants_read = 0;
    while (s->out_total > 0) {
        ssize_t n = s->ssl ? write_tls(s) : write_plain(s);
        if (n < 0)
            return -1;
        if (n == 0) {
            s->was_blocked = 1;
            return 0;
        }
        touch(s);
    }
    return 0;
}

static void update_interest(stream_t *s)
{
    if (s->fd < 0 || s->state == ST_DEAD || s->freed)
        return;
    unsigned want = 0;
    switch (s->state) {
    case ST_CONNECTING:
        want = LOOP_WRITE;
        break;
    case ST_HANDSHAKE:
        want = s->hs_wants_write ? LOOP_WRITE : LOOP_READ;
        break;
    case ST_OPEN:
        if (!s->paused || s->write_wants_read)
            want |= LOOP_READ;
        if ((s->out_total > 0 && !s->write_wants_read) || s->read_wants_write)
            want |= LOOP_WRITE;
        break;
    default:
        break;
    }
    if (want != s->interest) {
        loop_fd_mod(s->loop, s->fd, want);
        s->interest = want;
    }
}

static int do_handshake(stream_t *s)
{
    ERR_clear_error();
    int r = SSL_do_handshake(s->ssl);
    if (r == 1) {
        s->state = ST_OPEN;
        touch(s);
        if (emit(s, STREAM_EV_TLS_READY) < 0 || s->state == ST_DEAD)
            return -1;
        /* output queued during the handshake goes now */
        if (s->out_total > 0 && do_write(s) < 0)
            return fail(s, STREAM_EV_ERROR, NULL) < 0 ? -1 : -1;
        update_interest(s);
        return 0;
    }
    int e = SSL_get_error(s->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        s->hs_wants_write = 0;
    } else if (e == SSL_ERROR_WANT_WRITE) {
        s->hs_wants_write = 1;
    } else {
        char why[200];
        ssl_reason(s, r, e, why, sizeof(why));
        fail(s, STREAM_EV_ERROR, "TLS handshake: %s", why);
        return -1;
    }
    touch(s);
    update_interest(s);
    return 0;
}

static void on_fd(loop_t *loop, int fd, unsigned events, void *arg)
{
    stream_t *s = arg;
    switch (s->state) {
    case ST_CONNECTING: {
        int soerr = 0;
        socklen_t sl = sizeof(soerr);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
            soerr = errno;
        if (soerr != 0) {
            s->sys_errno = soerr;
            fail(s, STREAM_EV_ERROR, "connect: %s", strerror(soerr));
            return;
        }
        s->state = ST_OPEN;
        touch(s);
        if (emit(s, STREAM_EV_CONNECTED) < 0)
            return;
        if (s->state == ST_OPEN && s->out_total > 0 && do_write(s) < 0) {
            fail(s, STREAM_EV_ERROR, NULL);
            return;
        }
        update_interest(s);
        return;
    }
    case ST_HANDSHAKE:
        do_handshake(s);
        return;
    case ST_OPEN:
        break;
    default:
        return;
    }

    if ((events & LOOP_READ) || ((events & LOOP_WRITE) && s->read_wants_write)) {
        if (do_read(s) < 0)
            return;
        if (s->state != ST_OPEN)
            return;
    }
    if (((events & LOOP_WRITE) || ((events & LOOP_READ) && s->write_wants_read)) &&
        s->out_total > 0) {
        if (do_write(s) < 0) {
            fail(s, STREAM_EV_ERROR, NULL);
            return;
        }
        if (s->out_total == 0 && s->was_blocked) {
            s->was_blocked = 0;
            if (emit(s, STREAM_EV_DRAINED) < 0)
                return;
        }
    }
    if (events & LOOP_ERROR && s->state == ST_OPEN && !(events & (LOOP_READ | LOOP_WRITE))) {
        fail(s, STREAM_EV_ERROR, "socket error");
        return;
    }
    update_interest(s);
}

stream_t *stream_new(loop_t *loop, stream_cb cb, void *arg)
{
    stream_t *s = xcalloc(1, sizeof(*s));
    s->loop = loop;
    s->fd = -1;
    s->cb = cb;
    s->arg = arg;
    s->deferred_ev = -1;
    s->max_input = STREAM_MAX_INPUT;
    buf_init(&s->in);
    buf_init(&s->out);
    buf_init(&s->gather);
    loop_timer_init(&s->io_timer, io_timer_fired, s);
    loop_timer_init(&s->defer_timer, defer_fired, s);
    return s;
}

void stream_set_callback(stream_t *s, stream_cb cb, void *arg)
{
    s->cb = cb;
    s->arg = arg;
}

static int setup_fd(stream_t *s, int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    s->fd = fd;
    if (loop_fd_add(s->loop, fd, 0, on_fd, s) < 0) {
        snprintf(s->err, sizeof(s->err), "epoll: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* Numeric host of a socket address ("192.0.2.1", "2001:db8::1"). */
static const char *addr_host(const struct sockaddr *sa, char *buf, size_t len)
{
    const void *a = NULL;
    if (sa->sa_family == AF_INET)
        a = &((const struct sockaddr_in *)sa)->sin_addr;
    else if (sa->sa_family == AF_INET6)
        a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (a == NULL || inet_ntop(sa->sa_family, a, buf, (socklen_t)len) == NULL)
        snprintf(buf, len, "?");
    return buf;
}

int stream_bind_source(int fd, const struct sockaddr *src, socklen_t srclen, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    char host[64];
    if (srclen == 0 || srclen > sizeof(ss)) {
        snprintf(err, errlen, "source address cannot be bound: bad address length %u", (unsigned)srclen);
        errno = EINVAL;
        return -1;
    }
    memcpy(&ss, src, srclen);
    if (ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&ss)->sin_port = 0;
    else if (ss.ss_family == AF_INET6)
        ((struct sockaddr_in6 *)&ss)->sin6_port = 0;
    /* the port is chosen at connect() time, per destination (4-tuple),
     * instead of at bind() from the one ephemeral range of the address */
    int one = 1;
    if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)
        (void)setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&ss, srclen) < 0) {
        int e = errno;
        snprintf(err, errlen, "source address %s cannot be bound: %s", addr_host(src, host, sizeof(host)),
                 strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

int stream_connect(stream_t *s, const struct sockaddr *sa, socklen_t salen)
{
    return stream_connect_from(s, NULL, 0, sa, salen);
}

int stream_bind_failed(const stream_t *s)
{
    return s->bind_failed;
}

int stream_connect_from(stream_t *s, const struct sockaddr *src, socklen_t srclen, const struct sockaddr *sa,
                        socklen_t salen)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        s->sys_errno = errno;
        snprintf(s->err, sizeof(s->err), "socket: %s", strerror(errno));
        return -1;
    }
    if (src && stream_bind_source(fd, src, srclen, s->err, sizeof(s->err)) < 0) {
        s->sys_errno = errno;
        s->bind_failed = 1;
        close(fd);
        return -1;
    }
    if (setup_fd(s, fd) < 0) {
        close(fd);
        s->fd = -1;
        return -1;
    }
    touch(s);
    if (s->timeout_ms)
        loop_timer_set(s->loop, &s->io_timer, s->timeout_ms);
    if (connect(fd, sa, salen) == 0) {
        s->state = ST_OPEN;
        update_interest(s);
        defer_event(s, STREAM_EV_CONNECTED);
        return 0;
    }
    if (errno == EINPROGRESS) {
        s->state = ST_CONNECTING;
        update_interest(s);
        return 0;
    }
    s->sys_errno = errno;
    snprintf(s->err, sizeof(s->err), "connect: %s", strerror(errno));
    s->state = ST_OPEN; /* so the deferred error tears down the fd */
    defer_event(s, STREAM_EV_ERROR);
    return 0;
}

int stream_attach(stream_t *s, int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    if (setup_fd(s, fd) < 0) {
        close(fd);
        s->fd = -1;
        return -1;
    }
    s->state = ST_OPEN;
    touch(s);
    update_interest(s);
    return 0;
}

static int is_ip_literal(const char *h)
{
    unsigned char tmp[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, h, tmp) == 1 || inet_pton(AF_INET6, h, tmp) == 1;
}

static void on_tls_session(void *arg, SSL_SESSION *sess)
{
    stream_t *s = arg;
    SSL_SESSION_free(s->new_sess);
    s->new_sess = sess;
}

static int start_tls(stream_t *s, SSL_CTX *ctx, int client, const char *sni, const char *verify_host,
                     SSL_SESSION *resume)
{
    if (s->state != ST_OPEN || s->ssl) {
        snprintf(s->err, sizeof(s->err), "TLS: stream not in plaintext open state");
        return -1;
    }
    if (buf_size(&s->in) > 0) {
        /* bytes that arrived before the handshake were never protected:
         * a STARTTLS command-injection attempt (CVE-2011-0411 class) */
        snprintf(s->err, sizeof(s->err), "TLS: %zu plaintext bytes pipelined before the handshake",
                 buf_size(&s->in));
        return -1;
    }
    s->ssl = SSL_new(ctx);
    if (s->ssl == NULL) {
        char e[200];
        snprintf(s->err, sizeof(s->err), "TLS: %s", tls_error_string(e, sizeof(e)));
        return -1;
    }
    SSL_set_fd(s->ssl, s->fd);
    /* write_tls() relies on both (see the top of this file) */
    SSL_set_mode(s->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (client) {
        if (sni && *sni && !is_ip_literal(sni))
            SSL_set_tlsext_host_name(s->ssl, sni);
        if (verify_host && *verify_host) {
            if (is_ip_literal(verify_host))
                X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(s->ssl), verify_host);
            else
                SSL_set1_host(s->ssl, verify_host);
        }
        tls_set_session_sink(s->ssl, on_tls_session, s);
        /* Offer a copy: OpenSSL marks a TLS 1.3 session used for
         * resumption as spent, and servers that issue no new ticket on
         * resumption (Postfix) would then cost every other connection a
         * full handshake. Reusing a ticket is what Postfix's own client
         * cache does; its only cost is linkability, irrelevant between
         * MTAs. A failed set only costs a full handshake. */
        if (resume) {
            SSL_SESSION *copy = SSL_SESSION_dup(resume);
            if (copy == NULL || SSL_set_session(s->ssl, copy) != 1)
                ERR_clear_error();
            SSL_SESSION_free(copy);
        }
        SSL_set_connect_state(s->ssl);
        s->hs_wants_write = 1;
    } else {
        SSL_set_accept_state(s->ssl);
        s->hs_wants_write = 0;
    }
    s->state = ST_HANDSHAKE;
    touch(s);
    update_interest(s);
    return 0;
}

int stream_tls_client(stream_t *s, SSL_CTX *ctx, const char *sni, const char *verify_host)
{
    return start_tls(s, ctx, 1, sni, verify_host, NULL);
}

int stream_tls_client_resume(stream_t *s, SSL_CTX *ctx, const char *sni, const char *verify_host,
                             SSL_SESSION *resume)
{
    return start_tls(s, ctx, 1, sni, verify_host, resume);
}

int stream_tls_server(stream_t *s, SSL_CTX *ctx)
{
    return start_tls(s, ctx, 0, NULL, NULL, NULL);
}

SSL_SESSION *stream_tls_take_session(stream_t *s)
{
    SSL_SESSION *r = s->new_sess;
    s->new_sess = NULL;
    return r;
}

void stream_trim(stream_t *s)
{
    if (buf_size(&s->in) == 0)
        buf_free(&s->in);
    if (s->out_total == 0) {
        buf_free(&s->out);
        buf_free(&s->gather);
        free(s->segs);
        s->segs = NULL;
        s->seg_head = s->seg_end = s->seg_cap = 0;
    }
}

SSL_SESSION *stream_tls_get1_session(const stream_t *s)
{
    return s->ssl ? SSL_get1_session(s->ssl) : NULL;
}

int stream_tls_resumed(const stream_t *s)
{
    return s->ssl != NULL && SSL_session_reused(s->ssl);
}

int stream_peek_closed(const stream_t *s)
{
    if (s->state != ST_OPEN || s->fd < 0)
        return 1;
    if (buf_size(&s->in) > 0)
        return 1;
    char c;
    ssize_t n = recv(s->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0 || n > 0)
        return 1; /* EOF, or bytes nobody asked for (a 421, a close_notify) */
    return !(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR);
}

/* Send what was queued now, unless corked or not yet open. */
static void write_now(stream_t *s)
{
    if (s->corked || s->state != ST_OPEN || s->write_wants_read)
        return;
    if (do_write(s) < 0) {
        defer_event(s, STREAM_EV_ERROR);
        return;
    }
    update_interest(s);
}

void stream_write(stream_t *s, const void *p, size_t n)
{
    if (s->state == ST_DEAD || s->freed || n == 0)
        return;
    buf_append(&s->out, p, n);
    out_push(s, NULL, n);
    write_now(s);
}

void stream_write_ref(stream_t *s, const void *p, size_t n)
{
    if (s->state == ST_DEAD || s->freed || n == 0)
        return;
    out_push(s, p, n);
    write_now(s);
}

void stream_cork(stream_t *s, int on)
{
    s->corked = on;
    if (!on && s->out_total > 0 && !s->freed && s->state != ST_DEAD)
        write_now(s);
}

void stream_puts(stream_t *s, const char *str)
{
    stream_write(s, str, strlen(str));
}

void stream_printf(stream_t *s, const char *fmt, ...)
{
    buf_t tmp = BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(&tmp, fmt, ap);
    va_end(ap);
    stream_write(s, buf_head(&tmp), buf_size(&tmp));
    buf_free(&tmp);
}

size_t stream_pending_out(const stream_t *s)
{
    return s->out_total;
}

size_t stream_pending_refs(const stream_t *s)
{
    return s->out_refs;
}

buf_t *stream_input(stream_t *s)
{
    return &s->in;
}

void stream_set_max_input(stream_t *s, size_t max)
{
    s->max_input = max ? max : STREAM_MAX_INPUT;
}

uint64_t stream_bytes_in(const stream_t *s)
{
    return s->bytes_in;
}

void stream_pause_read(stream_t *s, int paused)
{
    s->paused = paused;
    update_interest(s);
}

void stream_free(stream_t *s)
{
    if (s == NULL || s->freed)
        return;
    s->freed = 1;
    loop_timer_cancel(s->loop, &s->io_timer);
    loop_timer_cancel(s->loop, &s->defer_timer);
    if (s->fd >= 0)
        loop_fd_del(s->loop, s->fd);
    if (s->ssl) {
        if (s->state == ST_OPEN) {
            /* best effort close_notify; a peer that wants ours waits no longer */
            ERR_clear_error();
            SSL_shutdown(s->ssl);
            ERR_clear_error();
        }
        tls_set_session_sink(s->ssl, NULL, NULL);
        SSL_free(s->ssl);
        s->ssl = NULL;
    }
    SSL_SESSION_free(s->new_sess);
    s->new_sess = NULL;
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
    if (s->in_cb == 0)
        stream_release(s);
}

int stream_fd(const stream_t *s)
{
    return s->fd;
}

int stream_is_tls(const stream_t *s)
{
    return s->ssl != NULL && s->state == ST_OPEN;
}

const char *stream_error(const stream_t *s)
{
    return s->err[0] ? s->err : "no error";
}

int stream_errno(const stream_t *s)
{
    return s->sys_errno;
}

const char *stream_tls_version(const stream_t *s)
{
    return s->ssl ? SSL_get_version(s->ssl) : NULL;
}

const char *stream_tls_cipher(const stream_t *s)
{
    return s->ssl ? SSL_get_cipher_name(s->ssl) : NULL;
}

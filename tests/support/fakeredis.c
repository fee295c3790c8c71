/*
 * tests/support/fakeredis.c - see fakeredis.h.
 */
#include "tests/support/fakeredis.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/util.h"

#define MAX_ARGS 4096

typedef struct conn_ref {
    fakeredis_t *f;
    int          i;
} conn_ref_t;

static conn_ref_t refs[FAKEREDIS_CONNS]; /* one fake per test at a time */
static buf_t      *cur_out;                 /* where the command being run answers */

static long find(const fakeredis_t *f, const char *key)
{
    for (size_t i = 0; i < f->nkeys; i++)
        if (strcmp(f->keys[i], key) == 0)
            return (long)i;
    return -1;
}

const char *fakeredis_get(const fakeredis_t *f, const char *key)
{
    long i = find(f, key);
    return i < 0 ? NULL : f->vals[i];
}

void fakeredis_set(fakeredis_t *f, const char *key, const char *val)
{
    long i = find(f, key);
    if (i >= 0) {
        free(f->vals[i]);
        f->vals[i] = xstrdup(val);
        return;
    }
    if (f->nkeys == f->cap) {
        f->cap = f->cap ? f->cap * 2 : 16;
        f->keys = xrealloc(f->keys, f->cap * sizeof(char *));
        f->vals = xrealloc(f->vals, f->cap * sizeof(char *));
    }
    f->keys[f->nkeys] = xstrdup(key);
    f->vals[f->nkeys++] = xstrdup(val);
}

static int del(fakeredis_t *f, const char *key)
{
    long i = find(f, key);
    if (i < 0)
        return 0;
    free(f->keys[i]);
    free(f->vals[i]);
    f->keys[i] = f->keys[f->nkeys - 1];
    f->vals[i] = f->vals[f->nkeys - 1];
    f->nkeys--;
    return 1;
}

static void send_str(int fd, const char *s)
{
    (void)fd;
    buf_puts(cur_out, s);
}

/* Write what a connection's commands answered, unless muted. */
static void flush_out(fakeredis_t *f, int i)
{
    if (f->mute || f->fds[i] < 0 || buf_size(&f->out[i]) == 0)
        return;
    size_t n = buf_size(&f->out[i]);
    if (write(f->fds[i], buf_head(&f->out[i]), n) != (ssize_t)n)
        abort();
    buf_reset(&f->out[i]);
}

void fakeredis_unmute(fakeredis_t *f)
{
    f->mute = 0;
    for (int i = 0; i < FAKEREDIS_CONNS; i++)
        flush_out(f, i);
}

static void send_bulk(int fd, const char *v)
{
    char hdr[32];
    if (v == NULL) {
        send_str(fd, "$-1\r\n");
        return;
    }
    snprintf(hdr, sizeof(hdr), "$%zu\r\n", strlen(v));
    send_str(fd, hdr);
    send_str(fd, v);
    send_str(fd, "\r\n");
}

static void send_int(int fd, long long v)
{
    char out[32];
    snprintf(out, sizeof(out), ":%lld\r\n", v);
    send_str(fd, out);
}

static void run(fakeredis_t *f, int fd, int argc, char **argv)
{
    f->ncommands++;
    size_t line = buf_size(&f->log);
    for (int i = 0; i < argc; i++) {
        if (i)
            buf_putc(&f->log, ' ');
        buf_puts(&f->log, i == 1 && strcasecmp(argv[0], "EVAL") == 0 ? "<script>" : argv[i]);
    }
    buf_putc(&f->log, '\n');
    int match = f->fail_only == NULL;
    if (!match) {
        char *l = xstrndup(buf_head(&f->log) + line, buf_size(&f->log) - line);
        match = strstr(l, f->fail_only) != NULL;
        free(l);
    }
    if (f->fail_next > 0 && match) {
        f->fail_next--;
        send_str(fd, "-ERR injected failure\r\n");
        return;
    }
    const char *cmd = argv[0];
    if (strcasecmp(cmd, "PING") == 0) {
        send_str(fd, "+PONG\r\n");
    } else if (strcasecmp(cmd, "GET") == 0 && argc == 2) {
        send_bulk(fd, fakeredis_get(f, argv[1]));
    } else if (strcasecmp(cmd, "MGET") == 0) {
        char hdr[32];
        snprintf(hdr, sizeof(hdr), "*%d\r\n", argc - 1);
        send_str(fd, hdr);
        for (int i = 1; i < argc; i++)
            send_bulk(fd, fakeredis_get(f, argv[i]));
    } else if (strcasecmp(cmd, "SET") == 0 && argc >= 3) {
        int nx = 0, get = 0;
        for (int i = 3; i < argc; i++) {
            nx |= strcasecmp(argv[i], "NX") == 0;
            get |= strcasecmp(argv[i], "GET") == 0;
        }
        const char *old = fakeredis_get(f, argv[1]);
        char *was = old ? xstrdup(old) : NULL;
        if (!(nx && was))
            fakeredis_set(f, argv[1], argv[2]);
        if (get)
            send_bulk(fd, was);
        else if (nx && was)
            send_str(fd, "$-1\r\n");
        else
            send_str(fd, "+OK\r\n");
        free(was);
    } else if (strcasecmp(cmd, "DEL") == 0) {
        long long n = 0;
        for (int i = 1; i < argc; i++)
            n += del(f, argv[i]);
        send_int(fd, n);
    } else if (strcasecmp(cmd, "INCR") == 0 && argc == 2) {
        const char *v = fakeredis_get(f, argv[1]);
        long long n = (v ? atoll(v) : 0) + 1;
        char s[32];
        snprintf(s, sizeof(s), "%lld", n);
        fakeredis_set(f, argv[1], s);
        send_int(fd, n);
    } else if (strcasecmp(cmd, "PEXPIRE") == 0) {
        send_int(fd, 1);
    } else if (strcasecmp(cmd, "EVAL") == 0 && f->eval_hook != NULL) {
        f->nevals++;
        f->eval_hook(f->eval_arg, argc, argv, cur_out);
    } else if (strcasecmp(cmd, "EVAL") == 0 && argc >= 3) {
        /* the ledger's mark batch: KEYS[i] = ARGV[i + 1], "" deletes */
        int nk = atoi(argv[2]);
        if (nk < 0 || 3 + 2 * nk + 1 != argc) {
            send_str(fd, "-ERR fakeredis: not a mark batch\r\n");
            return;
        }
        for (int i = 0; i < nk; i++) {
            const char *k = argv[3 + i], *v = argv[3 + nk + 1 + i];
            if (v[0] == '\0')
                del(f, k);
            else
                fakeredis_set(f, k, v);
        }
        f->nevals++;
        send_int(fd, nk);
    } else {
        send_str(fd, "+OK\r\n");
    }
}

/* One RESP command from the front of b: 1 when one was run. */
static int one(fakeredis_t *f, int fd, buf_t *b)
{
    char *p = buf_head(b), *end = p + buf_size(b);
    char *nl = memchr(p, '\n', (size_t)(end - p));
    if (nl == NULL || p[0] != '*')
        return 0;
    int argc = atoi(p + 1);
    if (argc <= 0 || argc > MAX_ARGS)
        abort();
    p = nl + 1;
    char **argv = xcalloc((size_t)argc, sizeof(char *));
    int got = 0;
    for (; got < argc; got++) {
        nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL || p[0] != '$')
            break;
        size_t len = (size_t)atol(p + 1);
        p = nl + 1;
        if ((size_t)(end - p) < len + 2)
            break;
        argv[got] = xmalloc(len + 1);
        memcpy(argv[got], p, len);
        argv[got][len] = '\0';
        p += len + 2;
    }
    int done = got == argc;
    if (done) {
        buf_consume(b, (size_t)(p - buf_head(b)));
        run(f, fd, argc, argv);
    }
    for (int i = 0; i < got; i++)
        free(argv[i]);
    free(argv);
    return done;
}

static void close_conn(fakeredis_t *f, int i)
{
    if (f->fds[i] < 0)
        return;
    loop_fd_del(f->loop, f->fds[i]);
    close(f->fds[i]);
    f->fds[i] = -1;
    buf_free(&f->in[i]);
    buf_free(&f->out[i]);
}

static void on_conn(loop_t *loop, int fd, unsigned events, void *arg)
{
    conn_ref_t *r = arg;
    fakeredis_t *f = r->f;
    char tmp[65536];
    ssize_t n = read(fd, tmp, sizeof(tmp));
    if (n <= 0) {
        close_conn(f, r->i);
        return;
    }
    buf_append(&f->in[r->i], tmp, (size_t)n);
    cur_out = &f->out[r->i];
    while (f->fds[r->i] >= 0 && one(f, fd, &f->in[r->i]))
        ;
    flush_out(f, r->i);
}

static void on_accept(loop_t *loop, int fd, unsigned events, void *arg)
{
    fakeredis_t *f = arg;
    int cfd = accept(fd, NULL, NULL);
    if (cfd < 0)
        return;
    for (int i = 0; i < FAKEREDIS_CONNS; i++) {
        if (f->fds[i] >= 0)
            continue;
        f->fds[i] = cfd;
        buf_init(&f->in[i]);
        buf_init(&f->out[i]);
        refs[i] = (conn_ref_t){ f, i };
        if (loop_fd_add(loop, cfd, LOOP_READ, on_conn, &refs[i]) < 0)
            abort();
        return;
    }
    close(cfd);
}

fakeredis_t *fakeredis_new(loop_t *loop)
{
    fakeredis_t *f = xcalloc(1, sizeof(*f));
    f->loop = loop;
    for (int i = 0; i < FAKEREDIS_CONNS; i++)
        f->fds[i] = -1;
    buf_init(&f->log);
    f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one_ = 1;
    setsockopt(f->lfd, SOL_SOCKET, SO_REUSEADDR, &one_, sizeof(one_));
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    if (f->lfd < 0 || bind(f->lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(f->lfd, 16) < 0 ||
        getsockname(f->lfd, (struct sockaddr *)&a, &al) < 0 ||
        loop_fd_add(loop, f->lfd, LOOP_READ, on_accept, f) < 0)
        abort();
    f->port = ntohs(a.sin_port);
    return f;
}

void fakeredis_drop(fakeredis_t *f)
{
    for (int i = 0; i < FAKEREDIS_CONNS; i++)
        close_conn(f, i);
}

void fakeredis_free(fakeredis_t *f)
{
    if (f == NULL)
        return;
    fakeredis_drop(f);
    loop_fd_del(f->loop, f->lfd);
    close(f->lfd);
    for (size_t i = 0; i < f->nkeys; i++) {
        free(f->keys[i]);
        free(f->vals[i]);
    }
    free(f->keys);
    free(f->vals);
    buf_free(&f->log);
    free(f);
}

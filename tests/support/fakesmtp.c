/*
 * tests/support/fakesmtp.c - the scripted fake SMTP server of
 * tests/support/fakesmtp.h.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "tests/support/fakesmtp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

const rule_t fakesmtp_rules_ok[] = {
    { "EHLO", EHLO_PLAIN, ACT_REPLY },
    { "MAIL FROM:", "250 2.1.0 Ok\r\n", ACT_REPLY },
    { "RCPT TO:", "250 2.1.5 Ok\r\n", ACT_REPLY },
    { "DATA", "354 End data with <CR><LF>.<CR><LF>\r\n", ACT_REPLY },
    { "RSET", "250 2.0.0 Ok\r\n", ACT_REPLY },
    { "QUIT", "221 2.0.0 Bye\r\n", ACT_CLOSE },
    { NULL, NULL, 0 },
};

const script_t fakesmtp_script_ok = {
    .greeting = "220 fake.test ESMTP\r\n",
    .rules = fakesmtp_rules_ok,
    .eod_reply = "250 2.0.0 Ok: queued as ABC123\r\n",
};

const script_t fakesmtp_script_hangup = { .greeting = NULL, .greeting_act = ACT_CLOSE };

const script_t fakesmtp_script_silent = { .greeting = NULL, .rules = fakesmtp_rules_ok };

void fake_conn_close(fake_conn_t *c)
{
    loop_timer_cancel(c->fs->loop, &c->tick);
    stream_free(c->st); /* safe inside its callback */
    c->st = NULL;
    c->in_data = 0;
    c->nunits = 0;
    c->dripping = c->flooding = 0;
    buf_free(&c->body);
    buf_free(&c->held);
    buf_free(&c->outq);
}

static void flood_once(fake_conn_t *c)
{
    const script_t *sc = c->fs->sc;
    for (unsigned i = 0; i < sc->flood_lines; i++)
        stream_puts(c->st, sc->flood_line);
}

/* The pacing timer: the next byte of a dripping greeting, the next
 * delayed reply, the next burst of a flood, or the end of a body pause. */
static void conn_tick(loop_t *loop, loop_timer_t *t, void *arg)
{
    (void)t;
    fake_conn_t *c = arg;
    const script_t *sc = c->fs->sc;
    if (c->st == NULL)
        return;
    if (c->flooding) {
        flood_once(c);
        loop_timer_set(loop, &c->tick, sc->flood_ms);
        return;
    }
    if (c->in_data && (sc->body_trickle_ms || sc->body_stall)) {
        stream_pause_read(c->st, 0); /* one more chunk */
        return;
    }
    if (c->nunits == 0)
        return;
    size_t n = c->dripping ? 1 : c->units[0];
    stream_write(c->st, buf_head(&c->outq), n);
    buf_consume(&c->outq, n);
    c->units[0] -= n;
    if (c->units[0] == 0) {
        memmove(c->units, c->units + 1, (c->nunits - 1) * sizeof(c->units[0]));
        c->nunits--;
        c->dripping = 0;
    }
    if (c->nunits > 0)
        loop_timer_set(loop, &c->tick, c->dripping ? sc->drip_ms : sc->reply_delay_ms);
}

/* Write a reply now, or queue it behind the paced ones. */
static void conn_write(fake_conn_t *c, const char *reply)
{
    const script_t *sc = c->fs->sc;
    if (!sc->reply_delay_ms && c->nunits == 0) {
        stream_puts(c->st, reply);
        return;
    }
    assert_true(c->nunits < sizeof(c->units) / sizeof(c->units[0]));
    buf_puts(&c->outq, reply);
    c->units[c->nunits++] = strlen(reply);
    if (!loop_timer_active(&c->tick))
        loop_timer_set(c->fs->loop, &c->tick, sc->reply_delay_ms);
}

/* Reply, or hold the reply back until DATA (hold_until_data). */
static void conn_reply(fake_conn_t *c, const char *line, const char *reply)
{
    if (c->fs->sc->hold_until_data &&
        (strncmp(line, "MAIL", 4) == 0 || strncmp(line, "RCPT", 4) == 0 || strcmp(line, "DATA") == 0)) {
        buf_puts(&c->held, reply);
        if (strcmp(line, "DATA") != 0)
            return;
        stream_write(c->st, buf_head(&c->held), buf_size(&c->held));
        buf_reset(&c->held);
        return;
    }
    conn_write(c, reply);
}

static int body_complete(const buf_t *b)
{
    size_t n = buf_size(b);
    const char *p = buf_head(b);
    return (n == 3 && memcmp(p, ".\r\n", 3) == 0) || (n >= 5 && memcmp(p + n - 5, "\r\n.\r\n", 5) == 0);
}

static const rule_t *find_rule(const script_t *sc, const char *line)
{
    for (const rule_t *r = sc->rules; r && r->prefix; r++)
        if (strncmp(line, r->prefix, strlen(r->prefix)) == 0)
            return r;
    return NULL;
}

static void conn_process(fake_conn_t *c)
{
    fake_server_t *fs = c->fs;
    buf_t *in = stream_input(c->st);
    while (buf_size(in) > 0) {
        if (c->in_data) {
            c->trickled += buf_size(in);
            if (fs->sc->body_stall || fs->sc->body_trickle_ms) {
                /* big bodies: counted, and only their end kept (copying
                 * megabytes would stall the loop the client shares) */
                fs->body_bytes += buf_size(in);
                buf_append(&c->body, buf_head(in), buf_size(in));
                if (buf_size(&c->body) > 5)
                    buf_consume(&c->body, buf_size(&c->body) - 5);
                buf_compact(&c->body);
            } else {
                buf_append(&fs->transcript, buf_head(in), buf_size(in));
                buf_append(&c->body, buf_head(in), buf_size(in));
            }
            buf_consume(in, buf_size(in));
            if (fs->sc->body_stall || (fs->sc->body_trickle_ms && c->trickled >= FAKE_TRICKLE_BYTES)) {
                c->trickled = 0;
                stream_pause_read(c->st, 1);
                if (fs->sc->body_trickle_ms && !body_complete(&c->body))
                    loop_timer_set(fs->loop, &c->tick, fs->sc->body_trickle_ms);
                if (fs->sc->body_stall)
                    return;
            }
            if (fs->sc->early_reply && !fs->early_replied) {
                fs->early_replied = 1;
                stream_puts(c->st, fs->sc->early_reply);
                stream_pause_read(c->st, 1);
                return;
            }
            if (fs->sc->eod_act == ACT_CLOSE) {
                fake_conn_close(c);
                return;
            }
            if (!body_complete(&c->body))
                return;
            c->in_data = 0;
            c->mail_ok = c->rcpt_ok = 0;
            fs->nmessages++;
            c->nmsgs++;
            buf_reset(&c->body);
            if (fs->sc->eod_close) {
                fake_conn_close(c);
                return;
            }
            if (fs->sc->eod_act == ACT_SILENT)
                return;
            stream_pause_read(c->st, 0);
            conn_write(c, fs->sc->eod_reply ? fs->sc->eod_reply : "250 2.0.0 Ok: queued\r\n");
            if (fs->sc->eod_then_close) {
                fake_conn_close(c);
                return;
            }
            continue;
        }
        size_t ll = buf_line_len(in);
        if (ll == 0)
            return;
        char line[1024];
        size_t cl = ll;
        while (cl > 0 && (buf_head(in)[cl - 1] == '\n' || buf_head(in)[cl - 1] == '\r'))
            cl--;
        if (cl >= sizeof(line))
            cl = sizeof(line) - 1;
        memcpy(line, buf_head(in), cl);
        line[cl] = '\0';
        buf_append(&fs->transcript, buf_head(in), ll);
        buf_consume(in, ll);

        if (fs->sc->flood_on && strncmp(line, fs->sc->flood_on, strlen(fs->sc->flood_on)) == 0) {
            c->flooding = 1;
            flood_once(c);
            loop_timer_set(fs->loop, &c->tick, fs->sc->flood_ms);
            continue;
        }
        const rule_t *r = find_rule(fs->sc, line);
        if (fs->sc->close_on_reuse && c->nmsgs > 0 && strncmp(line, "MAIL FROM:", 10) == 0) {
            fake_conn_close(c);
            return;
        }
        if (strncmp(line, "RCPT TO:", 8) == 0 && !c->mail_ok && r && r->act == ACT_REPLY) {
            conn_reply(c, line, "503 5.5.1 Error: need MAIL command\r\n");
            continue;
        }
        if (strcmp(line, "DATA") == 0 && r && r->act == ACT_REPLY && (!c->mail_ok || !c->rcpt_ok)) {
            conn_reply(c, line, c->mail_ok ? "554 5.5.1 Error: no valid recipients\r\n"
                                           : "503 5.5.1 Error: need RCPT command\r\n");
            continue;
        }
        if (r && r->reply && r->reply[0] == '2' && strncmp(line, "MAIL FROM:", 10) == 0)
            c->mail_ok = 1;
        if (r && r->reply && r->reply[0] == '2' && strncmp(line, "RCPT TO:", 8) == 0)
            c->rcpt_ok++;
        if (strcmp(line, "RSET") == 0)
            c->mail_ok = c->rcpt_ok = 0;
        if (r == NULL) {
            stream_puts(c->st, "502 5.5.2 Error: command not recognized\r\n");
            continue;
        }
        if (strcmp(line, "DATA") == 0 && r->reply && strncmp(r->reply, "354", 3) == 0)
            c->in_data = 1;
        switch (r->act) {
        case ACT_REPLY:
            conn_reply(c, line, r->reply);
            break;
        case ACT_SILENT:
            break;
        case ACT_CLOSE:
            if (r->reply)
                stream_puts(c->st, r->reply);
            fake_conn_close(c);
            return;
        case ACT_STARTTLS:
            stream_puts(c->st, r->reply);
            if (stream_tls_server(c->st, fs->sc->tls) < 0)
                fake_conn_close(c);
            return; /* the rest is TLS */
        }
    }
}

static void conn_cb(stream_t *s, stream_event_t ev, void *arg)
{
    fake_conn_t *c = arg;
    switch (ev) {
    case STREAM_EV_DATA:
        conn_process(c);
        break;
    case STREAM_EV_CLOSED:
    case STREAM_EV_ERROR:
    case STREAM_EV_TIMEOUT:
        fake_conn_close(c);
        break;
    default:
        break;
    }
}

static void srv_accept(loop_t *loop, int fd, unsigned events, void *arg)
{
    fake_server_t *fs = arg;
    fake_conn_t *c = NULL;
    struct sockaddr_in peer;
    socklen_t plen = sizeof(peer);
    int cfd = accept4(fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd >= 0 && peer.sin_family == AF_INET)
        inet_ntop(AF_INET, &peer.sin_addr, fs->last_peer, sizeof(fs->last_peer));
    if (cfd < 0)
        return;
    fs->naccepted++;
    if (fs->sc->rcvbuf)
        assert_int_equal(setsockopt(cfd, SOL_SOCKET, SO_RCVBUF, &fs->sc->rcvbuf, sizeof(fs->sc->rcvbuf)), 0);
    if (fs->nmessages == 0)
        fs->naccepted_idle++;
    if (fs->sc->greeting == NULL && fs->sc->greeting_act == ACT_CLOSE) {
        close(cfd); /* accept and hang up at once: a connection attempt, counted */
        return;
    }
    for (size_t i = 0; i < FAKE_MAX_CONNS && c == NULL; i++)
        if (fs->conns[i].st == NULL)
            c = &fs->conns[i];
    assert_non_null(c);
    c->fs = fs;
    c->nmsgs = 0;
    buf_init(&c->held);
    c->in_data = 0;
    c->mail_ok = c->rcpt_ok = 0;
    buf_init(&c->body);
    buf_init(&c->outq);
    c->nunits = 0;
    c->dripping = c->flooding = 0;
    c->trickled = 0;
    loop_timer_init(&c->tick, conn_tick, c);
    c->st = stream_new(loop, conn_cb, c);
    assert_int_equal(stream_attach(c->st, cfd), 0);
    int open = 0;
    for (size_t i = 0; i < FAKE_MAX_CONNS; i++)
        open += fs->conns[i].st != NULL;
    if (fs->sc->max_conns && open > fs->sc->max_conns) {
        fs->nrefused++;
        stream_puts(c->st, "421 4.7.0 fake.test Error: too many connections\r\n");
        fake_conn_close(c);
        return;
    }
    if (open > fs->maxconc)
        fs->maxconc = open;
    if (fs->sc->flood_line && fs->sc->flood_on == NULL) {
        c->flooding = 1;
        flood_once(c);
        loop_timer_set(loop, &c->tick, fs->sc->flood_ms);
    } else if (fs->sc->greeting && fs->sc->drip_ms) {
        buf_puts(&c->outq, fs->sc->greeting);
        c->units[c->nunits++] = strlen(fs->sc->greeting);
        c->dripping = 1;
        conn_tick(loop, &c->tick, c);
    } else if (fs->sc->greeting) {
        stream_puts(c->st, fs->sc->greeting);
    }
    if (fs->sc->greeting_act == ACT_CLOSE)
        fake_conn_close(c);
}

int fake_server_busy(const fake_server_t *fs)
{
    for (size_t i = 0; i < FAKE_MAX_CONNS; i++)
        if (fs->conns[i].st)
            return 1;
    return 0;
}

fake_server_t *fake_server_on(loop_t *loop, const script_t *sc, unsigned short port)
{
    fake_server_t *fs = calloc(1, sizeof(*fs));
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                               .sin_port = htons(port) };
    socklen_t sl = sizeof(sin);
    assert_non_null(fs);
    fs->loop = loop;
    fs->sc = sc;
    buf_init(&fs->transcript);
    fs->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(fs->lfd >= 0);
    assert_int_equal(bind(fs->lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(listen(fs->lfd, 8), 0);
    assert_int_equal(getsockname(fs->lfd, (struct sockaddr *)&sin, &sl), 0);
    fs->port = ntohs(sin.sin_port);
    assert_int_equal(loop_fd_add(loop, fs->lfd, LOOP_READ, srv_accept, fs), 0);
    return fs;
}

fake_server_t *fake_server_new(loop_t *loop, const script_t *sc)
{
    return fake_server_on(loop, sc, 0);
}

void fake_server_free(fake_server_t *fs)
{
    if (fs == NULL)
        return;
    for (size_t i = 0; i < FAKE_MAX_CONNS; i++)
        if (fs->conns[i].st)
            fake_conn_close(&fs->conns[i]);
    loop_fd_del(fs->loop, fs->lfd);
    close(fs->lfd);
    buf_free(&fs->transcript);
    free(fs);
}

const char *fake_server_transcript(fake_server_t *fs)
{
    return buf_head(&fs->transcript);
}

unsigned short fakesmtp_closed_port(void)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof(sin);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &sl), 0);
    close(fd);
    return ntohs(sin.sin_port);
}

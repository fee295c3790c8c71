/*
 * tests/support/fakesmtp.h - a scripted fake SMTP server for unit tests.
 *
 * A TCP listener on 127.0.0.1 (an ephemeral port, or a chosen one),
 * served from the test's own loop (curl ftpserver.pl / test913 style). It
 * answers each command line with the reply of the first rule of its script
 * whose prefix the line starts with ("502 5.5.2" when none matches), takes
 * the body after a "354" reply to DATA up to the end-of-data line and
 * answers that too, and records every byte it receives from any of its
 * connections (decrypted after STARTTLS) so tests can assert the exact
 * transcript. Like Postfix it answers RCPT before an accepted MAIL with
 * "503 5.5.1" and DATA without an accepted RCPT with "554 5.5.1" (or 503
 * without MAIL) when the script would just have replied. Options of the
 * script make it stay silent, hang up (at the greeting, at a command, at
 * the body, after the end of data), hold replies back until DATA, start TLS,
 * or turn connections beyond a limit away; counters say what it saw. Slow
 * and hostile pacing: drip the greeting one byte every drip_ms, release
 * each reply reply_delay_ms after the one before, flood endless lines at
 * a rate, or take the body slowly (a chunk every body_trickle_ms) or not
 * at all (body_stall), through a small receive buffer.
 *
 * Not thread-safe: everything runs in the thread of the loop it serves.
 * Scripts and rules are borrowed and must outlive the server (static
 * tables); a test may switch fs->sc between connections. Failures to set
 * up (socket, bind, a fifth connection at once) fail the running cmocka
 * test.
 */
#ifndef MP_TESTS_FAKESMTP_H
#define MP_TESTS_FAKESMTP_H

#include <openssl/ssl.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/stream.h"

typedef enum {
    ACT_REPLY = 0, /* write the reply */
    ACT_CLOSE,     /* write the reply (if any), then close */
    ACT_SILENT,    /* say nothing */
    ACT_STARTTLS,  /* write the reply, then start the server TLS handshake */
} act_t;

typedef struct rule {
    const char *prefix; /* first matching command prefix wins */
    const char *reply;  /* written verbatim (CRLFs included) */
    act_t       act;
} rule_t;

typedef struct script {
    const char   *greeting;     /* NULL: silent */
    act_t         greeting_act; /* ACT_CLOSE: close right after it; without a greeting, hang
                                 * up at once (a connection attempt, counted in naccepted) */
    const rule_t *rules;        /* ends with prefix NULL */
    const char   *eod_reply;    /* reply to the end of data */
    act_t         eod_act;      /* ACT_CLOSE: close at the first body bytes, no reply */
    int           eod_close;    /* take the whole body, then hang up without a reply */
    SSL_CTX      *tls;          /* for ACT_STARTTLS */
    int           hold_until_data; /* answer MAIL/RCPT only once DATA arrived: a lock-step
                                    * client would wait forever (proves PIPELINING) */
    int           eod_then_close;  /* after the end-of-data reply, hang up (idle close) */
    int           close_on_reuse;  /* a MAIL on a connection that already took a message:
                                    * close without a word (a server that dropped it idle) */
    const char   *early_reply;     /* at the first body bytes: this reply, then read no more
                                    * until the test resumes reading */
    int           max_conns;       /* a connection beyond this many open ones gets "421 too
                                    * many connections" and is closed (0: no limit) */
    /* pacing (all times in ms of the serving loop) */
    unsigned      drip_ms;         /* the greeting goes out one byte every drip_ms, the first
                                    * at once */
    unsigned      reply_delay_ms;  /* every reply to a command (and the end-of-data reply) is
                                    * written whole, this long after the previous one was
                                    * written or after it was due, whichever is later; an
                                    * ACT_CLOSE reply is dropped with the connection */
    const char   *flood_on;        /* a command with this prefix is answered with an endless
                                    * flood: flood_lines copies of flood_line at once and
                                    * again every flood_ms; NULL with flood_line set: the
                                    * flood starts at the connect, instead of the greeting */
    const char   *flood_line;      /* e.g. "250-x\r\n" */
    unsigned      flood_lines;
    unsigned      flood_ms;
    unsigned      body_trickle_ms; /* after each FAKE_TRICKLE_BYTES of body read, read nothing
                                    * for this long */
    int           body_stall;      /* at the first body bytes, read nothing more */
                                   /* with either, body bytes are counted in body_bytes and
                                    * left out of the transcript */
    int           rcvbuf;          /* SO_RCVBUF of each connection (set once accepted); 0 the
                                    * system's */
} script_t;

#define FAKE_MAX_CONNS 4
#define FAKE_TRICKLE_BYTES (512u * 1024)

struct fake_server;

typedef struct fake_conn {
    struct fake_server *fs;
    stream_t           *st; /* NULL: slot free */
    int                 in_data;
    int                 mail_ok; /* like Postfix: RCPT needs MAIL, DATA needs an accepted RCPT */
    int                 rcpt_ok;
    int                 nmsgs;   /* messages taken on this connection */
    buf_t               held;    /* replies held back (hold_until_data) */
    buf_t               body;
    buf_t               outq;    /* paced output not written yet (drip_ms, reply_delay_ms) */
    size_t              units[64]; /* its replies' lengths, in order */
    size_t              nunits;
    int                 dripping; /* outq is the greeting, one byte at a time */
    int                 flooding;
    size_t              trickled; /* body bytes read since the last pause (body_trickle_ms) */
    loop_timer_t        tick;    /* paces outq, the flood, the body trickle */
} fake_conn_t;

typedef struct fake_server {
    loop_t         *loop;
    int             lfd;
    unsigned short  port;
    const script_t *sc;         /* tests may switch it between connections */
    fake_conn_t     conns[FAKE_MAX_CONNS];
    buf_t           transcript; /* every byte received, all connections */
    int             naccepted;
    int             nmessages;  /* messages taken to the end of data */
    int             maxconc;    /* most connections open at once */
    int             naccepted_idle; /* accepted before any end-of-data reply */
    int             nrefused;       /* turned away by max_conns */
    int             early_replied;
    size_t          body_bytes;     /* body bytes taken under body_trickle_ms / body_stall */
    char            last_peer[64];  /* the client address of the newest connection ("" none) */
} fake_server_t;

/* The reply of fakesmtp_rules_ok to EHLO: PIPELINING, SIZE, 8BITMIME,
 * ENHANCEDSTATUSCODES. */
#define EHLO_PLAIN "250-fake.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"

/* EHLO, MAIL, RCPT, DATA, RSET accepted; QUIT answered, then closed. */
extern const rule_t fakesmtp_rules_ok[];
/* "220 fake.test ESMTP", fakesmtp_rules_ok, "250 2.0.0 Ok: queued as ABC123" */
extern const script_t fakesmtp_script_ok;
/* accepts, then hangs up before a word: a network failure */
extern const script_t fakesmtp_script_hangup;
/* accepts and never speaks */
extern const script_t fakesmtp_script_silent;

/* A fake server following sc on 127.0.0.1:port (0: an ephemeral one);
 * fs->port says which. Pair with fake_server_free(). */
fake_server_t *fake_server_on(loop_t *loop, const script_t *sc, unsigned short port);
/* fake_server_on(loop, sc, 0) */
fake_server_t *fake_server_new(loop_t *loop, const script_t *sc);
/* Close its connections and the listener, free it. NULL is harmless. */
void fake_server_free(fake_server_t *fs);
/* Close one of its connections now (as an idle timeout would); the slot
 * is free again. Also what the server does itself when it hangs up. */
void fake_conn_close(fake_conn_t *c);
/* 1 while a connection is open. */
int fake_server_busy(const fake_server_t *fs);
/* NUL-terminated view of what the server received ("" before anything). */
const char *fake_server_transcript(fake_server_t *fs);

/* A port on 127.0.0.1 on which nothing listens. */
unsigned short fakesmtp_closed_port(void);

#endif

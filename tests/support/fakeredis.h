/*
 * tests/support/fakeredis.h - a Redis stand-in for unit tests, served
 * from the test's own loop on 127.0.0.1.
 *
 * It keeps string keys in memory and answers the commands mailpump's
 * ledger sends: GET, MGET, SET (PX, NX, GET), DEL, INCR, PEXPIRE (a
 * no-op: nothing expires), PING, and EVAL of the ledger's mark batch
 * (KEYS set to ARGV[i + 1], ARGV[1] being the TTL, an empty value
 * deleting the key, in order). Anything else gets +OK. TTLs are ignored.
 *
 * Faults: fail_next answers that many commands with an error reply;
 * mute holds every answer back (a Redis too slow for the client's
 * timeout) until fakeredis_unmute() sends them, in order, as a real
 * server would.
 * Every command is logged, one line each, its words joined by blanks
 * (the EVAL script replaced by "<script>").
 * eval_hook, when set, answers every EVAL instead (a test's own model of
 * a script): it gets the command's words and appends a whole RESP answer
 * to out.
 */
#ifndef MP_TESTS_FAKEREDIS_H
#define MP_TESTS_FAKEREDIS_H

#include <stddef.h>

#include "core/buf.h"
#include "core/loop.h"

#define FAKEREDIS_CONNS 8

typedef void (*fakeredis_eval_fn)(void *arg, int argc, char **argv, buf_t *out);

typedef struct fakeredis {
    loop_t  *loop;
    int      lfd;
    unsigned port;
    int      fds[FAKEREDIS_CONNS];
    buf_t    in[FAKEREDIS_CONNS];
    buf_t    out[FAKEREDIS_CONNS];  /* answers held while muted */
    char   **keys;
    char   **vals;
    size_t   nkeys, cap;
    unsigned fail_next; /* answer this many commands with -ERR */
    const char *fail_only; /* non-NULL: fail_next counts only commands whose log line has this */
    int      mute;      /* run commands, hold their answers */
    size_t   ncommands;
    size_t   nevals;    /* EVALs answered */
    buf_t    log;       /* "SET mp:r:m:a@b sending PX 1000\n" ... */
    fakeredis_eval_fn eval_hook;
    void    *eval_arg;
} fakeredis_t;

fakeredis_t *fakeredis_new(loop_t *loop);
/* Close the listener and every connection; no fd stays in the loop. */
void         fakeredis_free(fakeredis_t *f);
/* The value of key, or NULL. */
const char  *fakeredis_get(const fakeredis_t *f, const char *key);
void         fakeredis_set(fakeredis_t *f, const char *key, const char *val);
/* Close the connections (the listener stays): the client sees a lost
 * connection and reconnects. */
void         fakeredis_drop(fakeredis_t *f);
/* Send the answers held while muted and stop holding. */
void         fakeredis_unmute(fakeredis_t *f);

#endif

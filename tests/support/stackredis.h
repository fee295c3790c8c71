/*
 * tests/support/stackredis.h - the local stack's Redis for C integration
 * tests.
 *
 * A reply record and its callback, running a loop until a reply came,
 * connecting to the stack's Redis (failing the test, with the hint to
 * start the stack, when it does not connect within 2 s), one command
 * waited for, and the stack's Redis address from its env file
 * (tests/support/stackenv.h). A test that expects an error reply or a
 * failure sends with rclient_command() and sr_rec_cb, and reads ok, type
 * and err itself; sr_command() is for the commands that must succeed.
 */
#ifndef MP_TESTS_STACKREDIS_H
#define MP_TESTS_STACKREDIS_H

#include <stddef.h>

#include "core/loop.h"
#include "core/rclient.h"

#define SR_STACK_HINT "run `deploy/local/stack up` first"

/* Enough for one lease renewal of 1,000 sites (the holders' count, then a grant and a flag per site). */
#define SR_REC_ELEMENTS 2100

/* What sr_rec_cb saw of the last reply (zero it before reusing it). */
typedef struct sr_rec {
    int       calls;                /* callbacks so far */
    int       ok;                   /* 1 for a reply, 0 for a failure */
    int       type;                 /* REDIS_REPLY_*, -1 for a failure */
    long long integer;              /* an integer reply */
    long long v[SR_REC_ELEMENTS];   /* an integer reply as v[0] (n 1), or an
                                     * array's elements: its integers, -1 for
                                     * any other element */
    size_t    n;
    size_t    len;                  /* a string or status reply's length */
    char      str[4096];            /* ... and its bytes, NUL-terminated, cut
                                     * to fit (binary-safe up to len) */
    char      err[256];             /* a failure's reason (rclient_cb's err) */
} sr_rec_t;

/* An rclient_cb filling the sr_rec_t at arg. */
void sr_rec_cb(void *arg, const redisReply *r, const char *err);
/* Run the loop until *flag is non-zero or ms have passed. */
void sr_run_until(loop_t *l, const int *flag, unsigned ms);
/* Run the loop for ms. */
void sr_run_for(loop_t *l, unsigned ms);
/* A client of host:port with a command timeout of timeout_ms, connected:
 * fails the test (cmocka fail_msg, naming the stack) when it does not
 * connect within 2 s. */
rclient_t *sr_connect(loop_t *l, const char *host, unsigned port, unsigned timeout_ms);
/* Send one command (strlen'd arguments) and wait up to wait_ms for it;
 * fails the test when it got no answer or a failure (an error reply
 * included), naming argv[0] and the reason. The reply is in out. */
void sr_command(loop_t *l, rclient_t *c, sr_rec_t *out, int argc, const char **argv, unsigned wait_ms);
/* MP_REDIS_HOST and MP_REDIS_PORT from the stack's env file: 0, or -1
 * after printing which file is missing them and the hint to start the
 * stack. */
int sr_stack_redis(char *host, size_t hostlen, unsigned *port);

#endif

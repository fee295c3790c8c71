/*
 * SUMMARY
 *  tests/support/stackredis.c - the local stack's Redis for C integration
 *  tests (tests/support/stackredis.h).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "tests/support/stackredis.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "tests/support/stackenv.h"

void sr_rec_cb(void *arg, const redisReply *r, const char *err)
{
    sr_rec_t *x = arg;
    x->calls++;
    x->ok = r != NULL;
    if (r == NULL) {
        x->type = -1;
        snprintf(x->err, sizeof(x->err), "%s", err);
        return;
    }
    x->type = r->type;
    if (r->type == REDIS_REPLY_INTEGER) {
        x->integer = r->integer;
        x->v[0] = r->integer;
        x->n = 1;
    }
    if (r->str != NULL) {
        size_t k = r->len < sizeof(x->str) ? r->len : sizeof(x->str) - 1;
        memcpy(x->str, r->str, k);
        x->str[k] = '\0';
        x->len = r->len;
    }
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements && i < SR_REC_ELEMENTS; i++) {
        x->v[i] = r->element[i]->type == REDIS_REPLY_INTEGER ? r->element[i]->integer : -1;
        x->n = i + 1;
    }
}

void sr_run_until(loop_t *l, const int *flag, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (!*flag && util_mono_ms() < end)
        loop_run_once(l, 10);
}

void sr_run_for(loop_t *l, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (util_mono_ms() < end)
        loop_run_once(l, 10);
}

rclient_t *sr_connect(loop_t *l, const char *host, unsigned port, unsigned timeout_ms)
{
    rclient_config_t cfg = { .host = host, .port = port, .timeout_ms = timeout_ms };
    rclient_t *c = rclient_new(l, &cfg);
    uint64_t end = util_mono_ms() + 2000;
    while (!rclient_connected(c) && util_mono_ms() < end)
        loop_run_once(l, 10);
    if (!rclient_connected(c))
        fail_msg("no Redis at %s:%u: " SR_STACK_HINT, host, port);
    return c;
}

void sr_command(loop_t *l, rclient_t *c, sr_rec_t *out, int argc, const char **argv, unsigned wait_ms)
{
    memset(out, 0, sizeof(*out));
    rclient_commandargv(c, sr_rec_cb, out, argc, argv, NULL);
    sr_run_until(l, &out->calls, wait_ms);
    assert_int_equal(out->calls, 1);
    if (!out->ok)
        fail_msg("%s: %s", argv[0], out->err);
}

int sr_stack_redis(char *host, size_t hostlen, unsigned *port)
{
    char p[16];
    if (stackenv_get("MP_REDIS_HOST", host, hostlen) < 0 || stackenv_get("MP_REDIS_PORT", p, sizeof(p)) < 0) {
        fprintf(stderr, "missing %s: " SR_STACK_HINT "\n", stackenv_path());
        return -1;
    }
    *port = (unsigned)atoi(p);
    return 0;
}

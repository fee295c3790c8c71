/*
 * control/ctl.c - the control plane's connections (see ctl.h).
 */
#include "control/ctl.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "core/util.h"

struct ctl {
    const mp_config_t *cfg;
    redisContext      *redis;
};

ctl_t *ctl_new(const mp_config_t *cfg)
{
    ctl_t *c = xcalloc(1, sizeof(*c));
    c->cfg = cfg;
    return c;
}

void ctl_free(ctl_t *c)
{
    if (c == NULL)
        return;
    ctl_redis_reset(c);
    free(c);
}

const mp_config_t *ctl_config(const ctl_t *c)
{
    return c->cfg;
}

void ctl_redis_reset(ctl_t *c)
{
    if (c->redis != NULL)
        redisFree(c->redis);
    c->redis = NULL;
}

redisContext *ctl_redis(ctl_t *c, char *err, size_t errlen)
{
    if (c->redis != NULL)
        return c->redis;
    const mp_config_t *cfg = c->cfg;
    if (cfg->redis_host == NULL || cfg->redis_host[0] == '\0') {
        snprintf(err, errlen, "redis: not configured ([redis] host is empty)");
        return NULL;
    }
    unsigned ms = cfg->redis_timeout_ms < 1000 ? 1000 : cfg->redis_timeout_ms;
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
    redisContext *r = redisConnectWithTimeout(cfg->redis_host, (int)cfg->redis_port, tv);
    if (r == NULL || r->err) {
        snprintf(err, errlen, "redis %s:%u: %s", cfg->redis_host, cfg->redis_port,
                 r != NULL ? r->errstr : "out of memory");
        if (r != NULL)
            redisFree(r);
        return NULL;
    }
    redisSetTimeout(r, tv);
    c->redis = r;
    return r;
}

static redisReply *checked(ctl_t *c, redisReply *rep, char *err, size_t errlen)
{
    if (rep == NULL) {
        snprintf(err, errlen, "redis %s:%u: %s", c->cfg->redis_host, c->cfg->redis_port,
                 c->redis != NULL && c->redis->err ? c->redis->errstr : "no reply");
        ctl_redis_reset(c);
        return NULL;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        snprintf(err, errlen, "redis: %.*s", (int)rep->len, rep->str);
        freeReplyObject(rep);
        return NULL;
    }
    return rep;
}

redisReply *ctl_command(ctl_t *c, char *err, size_t errlen, const char *fmt, ...)
{
    redisContext *r = ctl_redis(c, err, errlen);
    if (r == NULL)
        return NULL;
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(r, fmt, ap);
    va_end(ap);
    return checked(c, rep, err, errlen);
}

redisReply *ctl_command_argv(ctl_t *c, char *err, size_t errlen, int argc, const char **argv,
                             const size_t *lens)
{
    redisContext *r = ctl_redis(c, err, errlen);
    if (r == NULL)
        return NULL;
    redisReply *rep = redisCommandArgv(r, argc, argv, lens);
    return checked(c, rep, err, errlen);
}

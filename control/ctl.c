/*
 * control/ctl.c - the control plane's connections (see ctl.h).
 */
#include "control/ctl.h"

#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include "core/base64.h"
#include "core/buf.h"
#include "core/util.h"
#include "queue/mq.h"

struct ctl {
    const mp_config_t      *cfg;
    redisContext           *redis;
    amqp_connection_state_t amqp;
    int                     next_channel;
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
    if (c->amqp != NULL) {
        amqp_connection_close(c->amqp, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(c->amqp);
    }
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

/* ---- the broker ---- */

void ctl_amqp_reset(ctl_t *c)
{
    if (c->amqp != NULL)
        amqp_destroy_connection(c->amqp);
    c->amqp = NULL;
}

amqp_connection_state_t ctl_amqp(ctl_t *c, char *err, size_t errlen)
{
    if (c->amqp != NULL)
        return c->amqp;
    const mp_config_t *cfg = c->cfg;
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *s = amqp_tcp_socket_new(conn);
    struct timeval tv = { 10, 0 };
    int r = s ? amqp_socket_open_noblock(s, cfg->amqp_host, (int)cfg->amqp_port, &tv) : AMQP_STATUS_NO_MEMORY;
    if (r != AMQP_STATUS_OK) {
        snprintf(err, errlen, "amqp %s:%u: %s", cfg->amqp_host, cfg->amqp_port, amqp_error_string2(r));
        amqp_destroy_connection(conn);
        return NULL;
    }
    amqp_rpc_reply_t lr = amqp_login(conn, cfg->amqp_vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN,
                                     cfg->amqp_user, cfg->amqp_password);
    if (lr.reply_type != AMQP_RESPONSE_NORMAL) {
        snprintf(err, errlen, "amqp %s:%u: login as %s to vhost %s failed", cfg->amqp_host, cfg->amqp_port,
                 cfg->amqp_user, cfg->amqp_vhost);
        amqp_destroy_connection(conn);
        return NULL;
    }
    c->amqp = conn;
    c->next_channel = 1;
    return conn;
}

int ctl_amqp_channel(ctl_t *c, char *err, size_t errlen)
{
    amqp_connection_state_t conn = ctl_amqp(c, err, errlen);
    if (conn == NULL)
        return -1;
    int ch = c->next_channel;
    c->next_channel = c->next_channel >= 60000 ? 1 : c->next_channel + 1;
    amqp_channel_open(conn, (amqp_channel_t)ch);
    char why[256];
    if (mq_rpc_check(conn, "channel.open", why, sizeof(why)) < 0) {
        snprintf(err, errlen, "amqp %s:%u: %s", c->cfg->amqp_host, c->cfg->amqp_port, why);
        ctl_amqp_reset(c);
        return -1;
    }
    return ch;
}

void ctl_amqp_close_channel(ctl_t *c, int channel)
{
    if (c->amqp == NULL)
        return;
    amqp_rpc_reply_t r = amqp_channel_close(c->amqp, (amqp_channel_t)channel, AMQP_REPLY_SUCCESS);
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION ||
        (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CONNECTION_CLOSE_METHOD))
        ctl_amqp_reset(c);
}

void ctl_amqp_channel_closed(ctl_t *c, int channel)
{
    if (c->amqp == NULL)
        return;
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c->amqp);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_ok_t ok = { 0 };
        if (amqp_send_method(c->amqp, (amqp_channel_t)channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) !=
            AMQP_STATUS_OK)
            ctl_amqp_reset(c);
        return;
    }
    ctl_amqp_reset(c); /* the connection itself is gone or confused */
}

/* ---- RabbitMQ's management API ---- */

/* "http://host:port" (an [IPv6] host allowed, a trailing '/' too) into
 * host and port. 0, or -1. */
static int mgmt_url(const char *url, char *host, size_t hostlen, char *port, size_t portlen)
{
    if (strncmp(url, "http://", 7) != 0)
        return -1;
    const char *h = url + 7, *end = h + strcspn(h, "/");
    if (end[0] == '/' && end[1] != '\0')
        return -1; /* no path: the API is at the root */
    const char *colon;
    size_t hl;
    if (h[0] == '[') {
        const char *rb = memchr(h, ']', (size_t)(end - h));
        if (rb == NULL || rb[1] != ':')
            return -1;
        h++;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = memchr(h, ':', (size_t)(end - h));
        if (colon == NULL)
            return -1;
        hl = (size_t)(colon - h);
    }
    size_t pl = (size_t)(end - colon - 1);
    if (hl == 0 || hl >= hostlen || pl == 0 || pl >= portlen || strspn(colon + 1, "0123456789") < pl)
        return -1;
    memcpy(host, h, hl);
    host[hl] = '\0';
    memcpy(port, colon + 1, pl);
    port[pl] = '\0';
    return 0;
}

#define MGMT_MAX_REPLY (4u << 20)

int ctl_mgmt_get(ctl_t *c, const char *path, json_t **out, char *err, size_t errlen)
{
    const mp_config_t *cfg = c->cfg;
    const char *url = cfg->amqp_management_url ? cfg->amqp_management_url : "";
    char host[256], port[8];
    *out = NULL;
    if (url[0] == '\0' || mgmt_url(url, host, sizeof(host), port, sizeof(port)) < 0) {
        snprintf(err, errlen, "[amqp] management_url %s: expected http://host:port",
                 url[0] ? url : "is empty");
        return CTL_EINVAL;
    }
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai = NULL;
    int gr = getaddrinfo(host, port, &hints, &ai);
    if (gr != 0) {
        snprintf(err, errlen, "management API %s: %s", url, gai_strerror(gr));
        return CTL_EUNAVAIL;
    }
    int fd = -1;
    struct timeval tv = { .tv_sec = 3 };
    for (struct addrinfo *a = ai; a != NULL && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)); /* connect() honours it too */
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        if (connect(fd, a->ai_addr, a->ai_addrlen) < 0) {
            snprintf(err, errlen, "management API %s: %s", url, strerror(errno));
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    if (fd < 0)
        return CTL_EUNAVAIL;
    buf_t cred = BUF_INIT, req = BUF_INIT, rep = BUF_INIT;
    buf_printf(&cred, "%s:%s", cfg->amqp_user, cfg->amqp_password);
    buf_printf(&req, "GET %s HTTP/1.0\r\nHost: %s:%s\r\nAccept: application/json\r\nAuthorization: Basic ", path,
               host, port);
    base64_encode(&req, cred.data, cred.len);
    buf_printf(&req, "\r\n\r\n");
    int st = CTL_EUNAVAIL;
    size_t off = 0;
    while (off < req.len) {
        ssize_t w = send(fd, req.data + off, req.len - off, MSG_NOSIGNAL);
        if (w <= 0) {
            snprintf(err, errlen, "management API %s: send: %s", url, w < 0 ? strerror(errno) : "closed");
            goto done;
        }
        off += (size_t)w;
    }
    char chunk[16384];
    for (;;) {
        ssize_t r = recv(fd, chunk, sizeof(chunk), 0);
        if (r == 0)
            break;
        if (r < 0 || rep.len + (size_t)r > MGMT_MAX_REPLY) {
            snprintf(err, errlen, "management API %s: %s", url, r < 0 ? strerror(errno) : "reply too large");
            goto done;
        }
        buf_append(&rep, chunk, (size_t)r);
    }
    buf_append(&rep, "", 1); /* NUL-terminated */
    int code = 0;
    const char *body = rep.len > 0 ? strstr(rep.data, "\r\n\r\n") : NULL;
    if (body == NULL || sscanf(rep.data, "HTTP/1.%*d %d", &code) != 1) {
        snprintf(err, errlen, "management API %s: not an HTTP reply", url);
        goto done;
    }
    body += 4;
    if (code == 404) {
        snprintf(err, errlen, "management API %s: %s: not found", url, path);
        st = CTL_ENOTFOUND;
        goto done;
    }
    if (code != 200) {
        snprintf(err, errlen, "management API %s: %s: HTTP %d", url, path, code);
        goto done;
    }
    json_error_t je;
    *out = json_loads(body, 0, &je);
    if (*out == NULL) {
        snprintf(err, errlen, "management API %s: %s: %s", url, path, je.text);
        goto done;
    }
    st = CTL_OK;
done:
    close(fd);
    buf_free(&cred);
    buf_free(&req);
    buf_free(&rep);
    return st;
}

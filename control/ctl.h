/*
 * control/ctl.h - the operator's control plane, blocking: what the
 * `mailpump` admin commands and mailpumpd's HTTP API (api/) both call, so
 * each operation exists once and both front ends show the same thing.
 *
 * A ctl_t holds the configuration (borrowed) and its own connections,
 * opened on first use: a synchronous hiredis context to [redis] and, for
 * the queue operations, an AMQP connection. Never used from a worker
 * loop: the CLI runs it in its main thread, the API in its own request
 * threads, one ctl_t per thread (not thread-safe).
 *
 * Results are jansson objects (the caller owns them), so the CLI prints
 * them as tables or JSON and the API returns them as they are.
 * Errors: a negative ctl_status_t (or NULL) with a reason in the caller's
 * err buffer that says what failed, e.g. "redis 127.0.0.1:6390:
 * Connection refused".
 */
#ifndef MP_CONTROL_CTL_H
#define MP_CONTROL_CTL_H

#include <stddef.h>

#include <hiredis/hiredis.h>
#include <jansson.h>

#include "core/config.h"

typedef struct ctl ctl_t;

/* What an operation's failure was, for the front ends: the CLI exits 2
 * for CTL_EINVAL and 1 otherwise; the API answers 400, 404, 409, 503. */
typedef enum {
    CTL_OK = 0,
    CTL_EINVAL = -1,    /* the request is wrong (a bad selector, address, duration...) */
    CTL_ENOTFOUND = -2, /* what it names does not exist */
    CTL_ECONFLICT = -3, /* it conflicts with what exists */
    CTL_EUNAVAIL = -4,  /* Redis or the broker could not answer */
} ctl_status_t;

/* No I/O. cfg is borrowed and must outlive the ctl. */
ctl_t *ctl_new(const mp_config_t *cfg);
void   ctl_free(ctl_t *c);
const mp_config_t *ctl_config(const ctl_t *c);

/* The Redis connection, connected on first use (timeouts: [redis]
 * timeout_ms, at least 1 s: an operator's command may wait longer than a
 * worker's). NULL + err when [redis] host is empty or Redis cannot be
 * reached. After a command fails with an I/O error, call ctl_redis_reset()
 * so the next use reconnects. */
redisContext *ctl_redis(ctl_t *c, char *err, size_t errlen);
void          ctl_redis_reset(ctl_t *c);

/* One command through ctl_redis(), printf-style like redisCommand(). NULL
 * + err (the connection is reset) on an I/O error; a Redis error reply is
 * also NULL + err ("redis: ERR ..."). The caller frees the reply. */
redisReply *ctl_command(ctl_t *c, char *err, size_t errlen, const char *fmt, ...);
/* The same with an argument vector (binary-safe; lens may be NULL). */
redisReply *ctl_command_argv(ctl_t *c, char *err, size_t errlen, int argc, const char **argv,
                             const size_t *lens);

/* ---- the broker ----
 * One AMQP connection, connected on first use with [amqp] host, port,
 * user, password, vhost (no heartbeat: it is used in bursts of blocking
 * calls). Each operation takes a channel of its own and closes it, so
 * what it leaves unacknowledged goes back to its queue. */
struct amqp_connection_state_t_;
/* NULL + err ("amqp 127.0.0.1:5672: ...") when the broker cannot be reached. */
struct amqp_connection_state_t_ *ctl_amqp(ctl_t *c, char *err, size_t errlen);
/* After an I/O error or a connection.close: the next use reconnects. */
void ctl_amqp_reset(ctl_t *c);
/* A new channel on ctl_amqp() (opened, waited for): its number, or -1 + err. */
int  ctl_amqp_channel(ctl_t *c, char *err, size_t errlen);
/* Close a channel of ctl_amqp_channel(), best effort; its unacknowledged
 * deliveries are requeued by the broker. */
void ctl_amqp_close_channel(ctl_t *c, int channel);
/* The broker closed channel (a server exception seen by the caller):
 * answer close-ok so its number may be used again. */
void ctl_amqp_channel_closed(ctl_t *c, int channel);

/* GET path ("/api/queues/%2F/mail.outbound") from RabbitMQ's management
 * API ([amqp] management_url, plain HTTP, Basic authentication with [amqp]
 * user and password; 3 s timeouts), its JSON body in *out. CTL_OK;
 * CTL_ENOTFOUND for a 404; CTL_EINVAL when management_url is empty or not
 * http://host:port; CTL_EUNAVAIL for any other failure, with err. */
int ctl_mgmt_get(ctl_t *c, const char *path, json_t **out, char *err, size_t errlen);

#endif

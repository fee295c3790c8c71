/*
 * deliverer/throttle.h - message-rate limits per destination domain
 * ([smtp] rate_limits), the traffic shaping large mailbox providers ask
 * of a sender: "gmail.com:100/s, .yahoo.com:20/s, example.org:5000/h".
 *
 * A rule names a recipient domain ("example.org") or a domain and its
 * subdomains (".example.org"), matched like [smtp] tls_policy (first match
 * wins, case-insensitive), and allows rate messages per second, minute or
 * hour, evenly spaced (GCRA with no burst: one message every period/rate).
 * Every domain a rule matches shares that rule's budget.
 *
 * One table serves every worker thread of a process; a mutex guards it, and
 * a domain no rule names costs one scan of the rules without the lock.
 * With Redis the workers keep each rule's budget there instead
 * (THROTTLE_REDIS_SCRIPT), one for the whole fleet; this table is the
 * fallback while Redis cannot answer.
 */
#ifndef MP_DELIVERER_THROTTLE_H
#define MP_DELIVERER_THROTTLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct throttle throttle_t;

/* Parse spec. 0 with *out set (NULL when spec is empty or NULL: no
 * limits), or -1 with err naming the bad entry. */
int  throttle_new(const char *spec, throttle_t **out, char *err, size_t errlen);
/* throttle_new() of spec's rules followed by those of path, one per line
 * ([smtp] rate_limits_file; NULL or "": none; deliver_map_load()), read
 * now. -1 with err naming the bad entry, a file one as path:line. */
int  throttle_load(const char *spec, const char *path, throttle_t **out, char *err, size_t errlen);
void throttle_free(throttle_t *t);

/*
 * One message for domain at now (monotonic ms). Returns -1 when no rule
 * limits the domain. Otherwise the wait in ms before it may be sent: a
 * wait up to max_wait_ms reserves its slot (send then, 0 = now); a longer
 * one reserves nothing and says when the next slot is free (defer the
 * message). rule (may be NULL) gets the rule's text, "gmail.com:100/s".
 */
int64_t throttle_take(throttle_t *t, const char *domain, uint64_t now_ms, uint64_t max_wait_ms, char *rule,
                      size_t rulelen);

/* 1 when a rule limits domain, with its message spacing (ms) and text;
 * 0 otherwise. */
int throttle_rule(const throttle_t *t, const char *domain, double *interval_ms, char *rule, size_t rulelen);

/* ------------------------------------------------- the fleet's budget */

/* What an ask answers: wait_ms as throttle_take() (-1: no rule limits the
 * domain), the rule's text ("" when none), and whether Redis was asked
 * and failed, so the process's own table answered instead. */
typedef struct throttle_answer {
    int64_t     wait_ms;
    const char *rule;   /* valid during the callback (or until the ask is reused) */
    int         local_fallback;
} throttle_answer_t;

typedef void (*throttle_cb)(void *arg, const throttle_answer_t *ans);

/* One ask, owned by the caller (embed it); its fields are private. */
typedef struct throttle_ask {
    throttle_t  *t;
    struct rclient *rc;
    uint64_t     op;       /* the Redis command in flight, 0 if none */
    const char  *domain;   /* borrowed until the answer */
    uint64_t     max_wait_ms;
    char         rule[160];
    double       interval_ms; /* a keyed ask (throttle_ask_rate): its spacing; 0 otherwise */
    throttle_cb  cb;
    void        *arg;
} throttle_ask_t;

/*
 * One message for domain, under the budget of the whole fleet: with rc
 * connected the rule's budget lives in Redis (a GCRA script on Redis'
 * clock, key mp:rl:<rule text>), so every process that shares the Redis
 * shares it; without rc, while it is not connected, or when the command
 * fails, the process's table answers (throttle_take). Returns 1 when the
 * answer is ready now (no rule, or the local table): *now holds it and
 * cb will not fire. Returns 0 when Redis was asked: cb fires exactly
 * once, never synchronously, unless throttle_ask_cancel() comes first.
 * Redis failures count in mailpump_rate_limit_redis_errors_total.
 */
int  throttle_ask_start(throttle_ask_t *ask, throttle_t *t, struct rclient *rc, const char *domain,
                        uint64_t max_wait_ms, throttle_cb cb, void *arg, throttle_answer_t *now);
/*
 * As throttle_ask_start(), under an explicit rate instead of a rule of t:
 * the shaping rules' and actions' limits, per destination and source.
 * rule names the budget and is its text in logs and answers, e.g.
 * "google.com@mta1:300/m" (Redis key mp:rl:<rule>); interval_ms is the
 * spacing (period / rate, > 0). The process's fallback for these budgets
 * is a table of its own (keyed by rule, entries idle for a minute are
 * forgotten), so t is not needed.
 */
int  throttle_ask_rate(throttle_ask_t *ask, struct rclient *rc, const char *rule, double interval_ms,
                       uint64_t max_wait_ms, throttle_cb cb, void *arg, throttle_answer_t *now);
/* "N/s", "N/m" or "N/h" (N 1..1000000) as a spacing in ms; -1 if not one. */
int  throttle_parse_rate(const char *s, double *interval_ms);
/* The callback will not fire. Harmless when nothing is in flight. */
void throttle_ask_cancel(throttle_ask_t *ask);

#endif

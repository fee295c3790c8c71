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

/* 1 when a rule limits domain, with its message spacing (ms) and text (for
 * a budget kept elsewhere: the fleet's, in Redis); 0 otherwise. */
int throttle_rule(const throttle_t *t, const char *domain, double *interval_ms, char *rule, size_t rulelen);

/* The budget of a rule for a whole fleet, kept in Redis: EVAL this with
 * one key ("mp:rl:" + rule text) and ARGV interval_ms, max_wait_ms. It
 * answers the wait in ms like throttle_take(), on Redis' clock. */
extern const char THROTTLE_REDIS_SCRIPT[];

#endif

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
 * One table serves every worker thread of a process: the limit is per
 * mailpumpd process (per pod), not per fleet. A mutex guards it; a domain
 * no rule names costs one scan of the rules without the lock.
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

#endif

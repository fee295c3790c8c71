/*
 * deliverer/budget.h - the memory a worker gives to message bodies in
 * flight, as pure functions and one counter per worker.
 *
 * A delivery is charged from its content header (its announced size,
 * before any body byte is buffered) until its job is freed: what the
 * body, the parsed JSON and the built message take together, estimated
 * as the announced size x BUDGET_CHARGE_FACTOR (measured, see
 * docs/operations.md, "Memory"). A body announced larger than any JSON
 * body that could still build into a message within [message] max_size
 * is not buffered at all: only its first BUDGET_HEAD_BYTES are kept, for
 * the dead letter (docs/message-format.md, "Size limits").
 *
 * The worker pauses its consumer when its charge reaches the limit and
 * resumes below 3/4 of it. Deliveries already on the wire when it paused
 * are taken while they fit the hard bound (the limit plus one largest
 * message), else refused (nacked back, their body never buffered); a
 * delivery is always taken when the worker holds nothing else, so every
 * message within max_size can be delivered whatever the limit.
 *
 * Nothing here does I/O except budget_memory(), which reads the cgroup
 * files and sysconf once at start-up.
 */
#ifndef MP_DELIVERER_BUDGET_H
#define MP_DELIVERER_BUDGET_H

#include <stddef.h>
#include <stdint.h>

#define BUDGET_HEAD_BYTES    (64u * 1024u) /* kept of a body refused by its size */
#define BUDGET_JSON_SLACK    (64u * 1024u) /* headers, addresses, JSON structure */
#define BUDGET_CHARGE_FACTOR 3u            /* body + parsed JSON + built message: measured peak */

/* The largest JSON body that can still build into a message of at most
 * max_size bytes: JSON string escaping and base64 can each inflate the
 * content, so 2 x max_size + BUDGET_JSON_SLACK. */
uint64_t budget_max_body(uint64_t max_size);
/* What a delivery announced at announced bytes is charged; truncated:
 * only its head is kept (and nothing is parsed or built). */
uint64_t budget_charge(uint64_t announced, int truncated);

/* The contents of a cgroup memory limit file (v2 memory.max or v1
 * memory.limit_in_bytes): 1 and *bytes for a limit, 0 for none ("max",
 * v1's "unlimited" page-rounded 2^63, empty or garbled). */
int      budget_parse_limit(const char *text, uint64_t *bytes);
/* The memory this process may use: the smaller of the cgroup limit
 * (v2 text first, else v1; either may be NULL) and phys (physical RAM). */
uint64_t budget_memory_from(const char *v2_text, const char *v1_text, uint64_t phys);
/* The same from /sys/fs/cgroup and sysconf(). Blocking: start-up only. */
uint64_t budget_memory(void);
/* The automatic per-worker limit: a quarter of memory divided among the
 * workers, never below floor (the largest allowed body). */
uint64_t budget_auto(uint64_t memory, unsigned workers, uint64_t floor);

/* The automatic per-worker session budget ([smtp] pool_max_total 0): an
 * eighth of memory divided among the workers at BUDGET_SESSION_BYTES a
 * session, within the descriptors (nofile less BUDGET_FD_RESERVE, divided
 * among the workers), clamped to 100..10000. */
#define BUDGET_SESSION_BYTES (64u * 1024u)
#define BUDGET_FD_RESERVE    256u
unsigned budget_sessions(uint64_t memory, unsigned workers, uint64_t nofile);
/* The automatic prefetch ([amqp] prefetch 0): twice the sessions, 64..65535. */
unsigned budget_prefetch(unsigned sessions);

typedef struct budget {
    uint64_t limit;  /* pause the consumer at this charge */
    uint64_t hard;   /* limit + the charge of one largest message: never charged beyond */
    uint64_t charge; /* what the deliveries held are charged */
    size_t   held;   /* deliveries charged */
    int      paused; /* budget_update() said BUDGET_PAUSE last */
} budget_t;

/* largest: the charge of the largest allowed body (budget_charge of
 * budget_max_body(max_size)). */
void budget_init(budget_t *b, uint64_t limit, uint64_t largest);

/* Charge a delivery c: 1 when it is taken (charged), 0 when refused
 * (something is held and it would pass the hard bound). */
int  budget_take(budget_t *b, uint64_t c);
/* A taken delivery's job was freed (or its delivery lost). */
void budget_release(budget_t *b, uint64_t c);

typedef enum { BUDGET_STEADY = 0, BUDGET_PAUSE, BUDGET_RESUME } budget_action_t;
/* After a take or a release: whether the consumer should now pause
 * (charge reached the limit) or resume (charge below 3/4 of it). */
budget_action_t budget_update(budget_t *b);
/* The resume threshold: 3/4 of the limit. */
uint64_t budget_resume_below(const budget_t *b);

#endif

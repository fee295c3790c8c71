/*
 * core/loop.h - one epoll event loop per worker thread.
 *
 * A loop owns: file descriptor handlers (readable/writable interest),
 * one-shot timers kept in a min-heap, and a before-sleep hook. It is
 * not thread-safe: every call except loop_wakeup() must come from the
 * thread that runs the loop.
 *
 * Timers are embedded in their owner (nginx style): the loop never
 * allocates or frees a loop_timer_t, it only links it into the heap.
 */
#ifndef MP_CORE_LOOP_H
#define MP_CORE_LOOP_H

#include <stddef.h>
#include <stdint.h>

typedef struct loop loop_t;

/* Interest / event mask bits. */
#define LOOP_READ  0x1u
#define LOOP_WRITE 0x2u
#define LOOP_ERROR 0x4u /* reported only: EPOLLERR or EPOLLHUP */

typedef void (*loop_fd_cb)(loop_t *loop, int fd, unsigned events, void *arg);

struct loop_timer;
typedef void (*loop_timer_cb)(loop_t *loop, struct loop_timer *t, void *arg);

typedef struct loop_timer {
    uint64_t      when;  /* absolute, loop_now_ms() clock */
    size_t        index; /* position in the heap; SIZE_MAX when inactive */
    loop_timer_cb cb;
    void         *arg;
} loop_timer_t;

typedef void (*loop_hook_cb)(loop_t *loop, void *arg);

/* Returns NULL only if epoll/eventfd cannot be created (errno set). */
loop_t *loop_new(void);
/* Frees the loop. Registered fds are not closed; timers are unlinked. */
void loop_free(loop_t *loop);

/* Register fd with interest mask (LOOP_READ|LOOP_WRITE). Returns 0 or -1. */
int  loop_fd_add(loop_t *loop, int fd, unsigned mask, loop_fd_cb cb, void *arg);
/* Change the interest mask of a registered fd. Returns 0 or -1. */
int  loop_fd_mod(loop_t *loop, int fd, unsigned mask);
/* Unregister fd (does not close it). Safe inside any callback. */
void loop_fd_del(loop_t *loop, int fd);

/* Initialise a timer before first use (marks it inactive). */
void loop_timer_init(loop_timer_t *t, loop_timer_cb cb, void *arg);
/* Arm (or re-arm) a one-shot timer to fire after ms milliseconds. */
void loop_timer_set(loop_t *loop, loop_timer_t *t, uint64_t ms);
/* Disarm; harmless on an inactive timer. */
void loop_timer_cancel(loop_t *loop, loop_timer_t *t);
static inline int loop_timer_active(const loop_timer_t *t) { return t->index != (size_t)-1; }

/* Monotonic milliseconds, cached once per iteration. */
uint64_t loop_now_ms(loop_t *loop);
/* Refresh and return the cached clock. */
uint64_t loop_update_time(loop_t *loop);

/* Called before every epoll_wait. One hook per loop. */
void loop_set_before_sleep(loop_t *loop, loop_hook_cb cb, void *arg);

/* Run one iteration: wait at most max_wait_ms (-1: until the next timer),
 * dispatch events and due timers. Returns number of callbacks run, or -1. */
int  loop_run_once(loop_t *loop, int max_wait_ms);
/* Run until loop_stop(), or until nothing (no fd, no timer) is registered.
 * Returns 0. */
int  loop_run(loop_t *loop);
/* Ask loop_run() to return after the current iteration. */
void loop_stop(loop_t *loop);

/* Thread-safe: wake the loop from another thread; the wakeup callback set
 * with loop_set_wakeup() then runs inside the loop's thread. */
void loop_wakeup(loop_t *loop);
void loop_set_wakeup(loop_t *loop, loop_hook_cb cb, void *arg);

/* Number of registered fds (excluding the internal wakeup fd) and armed timers.
 * Tests assert both are zero when everything has been torn down. */
size_t loop_fd_count(const loop_t *loop);
size_t loop_timer_count(const loop_t *loop);

#endif

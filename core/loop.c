/*
 * SUMMARY
 *  core/loop.c - epoll event loop with a timer min-heap.
 * DESCRIPTION
 *  File descriptor handlers live in a table indexed by fd. Timers are
 *  owned by their callers and linked into a binary min-heap by pointer;
 *  each timer remembers its heap index so cancel is O(log n).
 *  An eventfd lets other threads wake the loop (shutdown requests).
 *  The thread's crash blame (core/crash.h) is cleared before and after
 *  every callback, so a message's blame never outlives the callback that
 *  set it, into another one's or into the loop's own code.
 * DIAGNOSTICS
 *  Functions return -1 with errno set when the kernel refuses.
 */
#include "core/loop.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/crash.h"
#include "core/util.h"

#define LOOP_MAX_EVENTS 256

typedef struct fd_slot {
    loop_fd_cb cb;
    void      *arg;
    unsigned   mask;
    int        used;
} fd_slot_t;

struct loop {
    int            epfd;
    int            wakefd;
    fd_slot_t     *fds;
    size_t         nfds_cap;
    size_t         nfds;   /* registered, excluding wakefd */
    loop_timer_t **heap;
    size_t         nheap;
    size_t         heap_cap;
    uint64_t       now;
    int            stop;
    loop_hook_cb   before_sleep;
    void          *before_sleep_arg;
    loop_hook_cb   wakeup_cb;
    void          *wakeup_arg;
};

uint64_t loop_now_ms(loop_t *loop)
{
    return loop->now;
}

uint64_t loop_update_time(loop_t *loop)
{
    loop->now = util_mono_ms();
    return loop->now;
}

static void wake_read(loop_t *loop, int fd, unsigned events, void *arg)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) > 0)
        ;
    if (loop->wakeup_cb)
        loop->wakeup_cb(loop, loop->wakeup_arg);
}

loop_t *loop_new(void)
{
    loop_t *loop = xcalloc(1, sizeof(*loop));
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (loop->epfd < 0) {
        free(loop);
        return NULL;
    }
    loop->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (loop->wakefd < 0) {
        int e = errno;
        close(loop->epfd);
        free(loop);
        errno = e;
        return NULL;
    }
    loop->now = util_mono_ms();
    if (loop_fd_add(loop, loop->wakefd, LOOP_READ, wake_read, NULL) < 0) {
        int e = errno;
        loop_free(loop);
        errno = e;
        return NULL;
    }
    loop->nfds--; /* the wakeup fd is not counted */
    return loop;
}

void loop_free(loop_t *loop)
{
    if (loop == NULL)
        return;
    for (size_t i = 0; i < loop->nheap; i++)
        loop->heap[i]->index = (size_t)-1;
    free(loop->heap);
    free(loop->fds);
    if (loop->wakefd >= 0)
        close(loop->wakefd);
    close(loop->epfd);
    free(loop);
}

static uint32_t to_epoll(unsigned mask)
{
    uint32_t ev = 0;
    if (mask & LOOP_READ)
        ev |= EPOLLIN | EPOLLRDHUP;
    if (mask & LOOP_WRITE)
        ev |= EPOLLOUT;
    return ev;
}

int loop_fd_add(loop_t *loop, int fd, unsigned mask, loop_fd_cb cb, void *arg)
{
    if (fd < 0) {
        errno = EBADF;
        return -1;
    }
    if ((size_t)fd >= loop->nfds_cap) {
        size_t cap = loop->nfds_cap ? loop->nfds_cap : 64;
        while (cap <= (size_t)fd)
            cap *= 2;
        loop->fds = xrealloc(loop->fds, cap * sizeof(fd_slot_t));
        memset(loop->fds + loop->nfds_cap, 0, (cap - loop->nfds_cap) * sizeof(fd_slot_t));
        loop->nfds_cap = cap;
    }
    fd_slot_t *s = &loop->fds[fd];
    if (s->used) {
        errno = EEXIST;
        return -1;
    }
    struct epoll_event ev = { .events = to_epoll(mask), .data.fd = fd };
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return -1;
    s->cb = cb;
    s->arg = arg;
    s->mask = mask;
    s->used = 1;
    loop->nfds++;
    return 0;
}

int loop_fd_mod(loop_t *loop, int fd, unsigned mask)
{
    if (fd < 0 || (size_t)fd >= loop->nfds_cap || !loop->fds[fd].used) {
        errno = ENOENT;
        return -1;
    }
    if (loop->fds[fd].mask == mask)
        return 0;
    struct epoll_event ev = { .events = to_epoll(mask), .data.fd = fd };
    if (epoll_ctl(loop->epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
        return -1;
    loop->fds[fd].mask = mask;
    return 0;
}

void loop_fd_del(loop_t *loop, int fd)
{
    if (fd < 0 || (size_t)fd >= loop->nfds_cap || !loop->fds[fd].used)
        return;
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, fd, NULL);
    memset(&loop->fds[fd], 0, sizeof(fd_slot_t));
    loop->nfds--;
}

/* ---- timers: binary min-heap on `when` ---- */

static void heap_swap(loop_t *loop, size_t a, size_t b)
{
    loop_timer_t *t = loop->heap[a];
    loop->heap[a] = loop->heap[b];
    loop->heap[b] = t;
    loop->heap[a]->index = a;
    loop->heap[b]->index = b;
}

static void heap_up(loop_t *loop, size_t i)
{
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (loop->heap[p]->when <= loop->heap[i]->when)
            break;
        heap_swap(loop, p, i);
        i = p;
    }
}

static void heap_down(loop_t *loop, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < loop->nheap && loop->heap[l]->when < loop->heap[m]->when)
            m = l;
        if (r < loop->nheap && loop->heap[r]->when < loop->heap[m]->when)
            m = r;
        if (m == i)
            break;
        heap_swap(loop, i, m);
        i = m;
    }
}

void loop_timer_init(loop_timer_t *t, loop_timer_cb cb, void *arg)
{
    t->when = 0;
    t->index = (size_t)-1;
    t->cb = cb;
    t->arg = arg;
}

void loop_timer_cancel(loop_t *loop, loop_timer_t *t)
{
    size_t i = t->index;
    if (i == (size_t)-1)
        return;
    size_t last = loop->nheap - 1;
    if (i != last) {
        heap_swap(loop, i, last);
        loop->nheap--;
        heap_down(loop, i);
        heap_up(loop, i);
    } else {
        loop->nheap--;
    }
    t->index = (size_t)-1;
}

void loop_timer_set(loop_t *loop, loop_timer_t *t, uint64_t ms)
{
    loop_timer_cancel(loop, t);
    if (loop->nheap == loop->heap_cap) {
        loop->heap_cap = loop->heap_cap ? loop->heap_cap * 2 : 64;
        loop->heap = xrealloc(loop->heap, loop->heap_cap * sizeof(*loop->heap));
    }
    t->when = util_mono_ms() + ms;
    t->index = loop->nheap;
    loop->heap[loop->nheap++] = t;
    heap_up(loop, t->index);
}

static int run_timers(loop_t *loop)
{
    int n = 0;
    uint64_t now = loop_update_time(loop);
    /* A callback may arm a new timer that is already due; bound the pass
     * to timers due at entry so a zero-delay re-arm cannot spin forever. */
    while (loop->nheap > 0 && loop->heap[0]->when <= now) {
        loop_timer_t *t = loop->heap[0];
        loop_timer_cancel(loop, t);
        crash_blame_clear();
        t->cb(loop, t, t->arg);
        crash_blame_clear();
        n++;
    }
    return n;
}

void loop_set_before_sleep(loop_t *loop, loop_hook_cb cb, void *arg)
{
    loop->before_sleep = cb;
    loop->before_sleep_arg = arg;
}

void loop_set_wakeup(loop_t *loop, loop_hook_cb cb, void *arg)
{
    loop->wakeup_cb = cb;
    loop->wakeup_arg = arg;
}

void loop_wakeup(loop_t *loop)
{
    uint64_t one = 1;
    ssize_t w = write(loop->wakefd, &one, sizeof(one));
    (void)w;
}

/* Run the callbacks of n ready events; returns how many ran. */
static int dispatch(loop_t *loop, const struct epoll_event *evs, int n)
{
    int ran = 0;
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        /* an earlier callback in this batch may have removed this fd */
        if ((size_t)fd >= loop->nfds_cap || !loop->fds[fd].used)
            continue;
        fd_slot_t *s = &loop->fds[fd];
        unsigned events = 0;
        if (evs[i].events & (EPOLLIN | EPOLLRDHUP))
            events |= LOOP_READ;
        if (evs[i].events & EPOLLOUT)
            events |= LOOP_WRITE;
        if (evs[i].events & (EPOLLERR | EPOLLHUP))
            events |= LOOP_ERROR | (s->mask & (LOOP_READ | LOOP_WRITE));
        events &= s->mask | LOOP_ERROR;
        if (events == 0)
            continue;
        crash_blame_clear(); /* the callback sets its own, if it runs a message's code */
        s->cb(loop, fd, events, s->arg);
        crash_blame_clear(); /* and the loop's own code is no message's */
        ran++;
    }
    return ran;
}

int loop_run_once(loop_t *loop, int max_wait_ms)
{
    if (loop->before_sleep) {
        crash_blame_clear();
        loop->before_sleep(loop, loop->before_sleep_arg);
    }

    int timeout = max_wait_ms;
    loop_update_time(loop);
    if (loop->nheap > 0) {
        uint64_t when = loop->heap[0]->when;
        int t = when <= loop->now ? 0 : (int)(when - loop->now > 86400000u ? 86400000u : when - loop->now);
        if (timeout < 0 || t < timeout)
            timeout = t;
    }

    struct epoll_event evs[LOOP_MAX_EVENTS];
    int n = epoll_wait(loop->epfd, evs, LOOP_MAX_EVENTS, timeout);
    if (n < 0) {
        if (errno != EINTR)
            return -1;
        n = 0;
    }
    loop_update_time(loop);
    int ran = dispatch(loop, evs, n);
    if (n > 0 && loop->nheap > 0 && loop->heap[0]->when <= loop_update_time(loop)) {
        /* The callbacks above took long enough for a timer to come due.
         * What became readable meanwhile (a reply already in the socket)
         * is handled before that timer says "timeout": one more look,
         * without waiting. */
        n = epoll_wait(loop->epfd, evs, LOOP_MAX_EVENTS, 0);
        if (n > 0) {
            loop_update_time(loop);
            ran += dispatch(loop, evs, n);
        }
    }
    ran += run_timers(loop);
    return ran;
}

int loop_run(loop_t *loop)
{
    loop->stop = 0;
    while (!loop->stop && (loop->nfds > 0 || loop->nheap > 0)) {
        if (loop_run_once(loop, -1) < 0)
            return -1;
    }
    return 0;
}

void loop_stop(loop_t *loop)
{
    loop->stop = 1;
}

size_t loop_fd_count(const loop_t *loop)
{
    return loop->nfds;
}

size_t loop_timer_count(const loop_t *loop)
{
    return loop->nheap;
}

/*
 * core/crash.h - blame a crash on the message whose code was running.
 *
 * Each thread has a blame slot: the id of the message whose code it is
 * running, or nothing. The loop clears it before every fd and timer
 * callback; a message's callbacks set it on entry (crash_blame_set is a
 * copy into a thread-local buffer: no allocation, no lock).
 *
 * crash_install() catches SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGABRT.
 * When the crashing thread has a blame, the handler counts the crash
 * against that message over a dedicated blocking connection to Redis,
 * made beforehand (crash_reporter_connect): INCR mp:d:<id> and PEXPIRE,
 * waiting up to CRASH_REPLY_WAIT_MS for the replies; then it writes
 * "crash: signal N while handling message <id>" to stderr and chains to
 * the handler installed before (ASan's, say) or dies by the default
 * action. A signal another process sent (kill -SEGV) is not counted. It uses only async-signal-safe calls. SIGKILL cannot be caught:
 * kill -9, the OOM killer and an eviction never count against a message.
 *
 * The connection is refreshed off the hot path (crash_reporter_check,
 * from the daemon's main thread): a closed one is made again. The
 * handler reads the descriptor from an atomic.
 */
#ifndef MP_CORE_CRASH_H
#define MP_CORE_CRASH_H

#include <stdint.h>

#define CRASH_ID_MAX        200 /* longest id a blame holds; a longer one is not blamed */
#define CRASH_REPLY_WAIT_MS 200

/* Blame crashes of this thread on msg_id from now on (NULL, "" or an id
 * longer than CRASH_ID_MAX: no blame). Async-signal-safe. */
void crash_blame_set(const char *msg_id);
void crash_blame_clear(void);
/* The current blame ("" when none); for tests. */
const char *crash_blame(void);

/* Install the handlers (once per process; later calls do nothing).
 * 0, or -1 with errno. */
int crash_install(void);
/* An alternate signal stack for the calling thread, so that a stack
 * overflow is caught too; crash_thread_fini() before the thread ends. */
int  crash_thread_init(void);
void crash_thread_fini(void);

/* Connect the reporter to Redis at host:port (a name is resolved here,
 * once); the count keys get ttl_ms. Blocks up to timeout_ms. 0 when
 * connected, -1 when not (crash_reporter_check tries again). */
int  crash_reporter_connect(const char *host, unsigned port, uint64_t ttl_ms, unsigned timeout_ms);
/* Reconnect a connection Redis closed (or one never made). Returns 1 when
 * a connection is up afterwards. Not from a signal handler. */
int  crash_reporter_check(void);
/* 1 while the reporter has a connection. */
int  crash_reporter_connected(void);
void crash_reporter_close(void);

#endif

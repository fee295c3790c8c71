/*
 * deliverer/qstat.h - a worker's status record for `mailpump queue`
 * (docs/operations.md, "Queue summary"), and the destination tables in it.
 *
 * Each worker keeps a small bounded table of the destinations (sites) it
 * deferred or parked recipients for, counted in one-minute buckets over
 * the last 15 minutes, with the last error text. Every 2 s it merges
 * that table with its sites' waiting legs, keeps the top QSTAT_TOP rows
 * and writes the record as JSON to Redis (mp:st:<host>:<pid>:<worker>,
 * expiring after 10 s). The control plane reads every record back and
 * merges their rows with the same function, qstat_merge().
 *
 * Pure: no I/O, the caller passes the clock (wall ms).
 */
#ifndef MP_DELIVERER_QSTAT_H
#define MP_DELIVERER_QSTAT_H

#include <stddef.h>
#include <stdint.h>

#define QSTAT_DESTS     64                 /* destinations a worker's table holds */
#define QSTAT_TOP       10                 /* rows a record carries */
#define QSTAT_BUCKETS   15                 /* one a minute */
#define QSTAT_WINDOW_MS (QSTAT_BUCKETS * 60000ULL)
#define QSTAT_KEY_PREFIX "mp:st:"
#define QSTAT_PERIOD_MS 2000               /* how often a worker writes its record */
#define QSTAT_TTL_MS    10000              /* how long a record outlives its last write */

typedef struct qstat_dest {
    char     name[128];
    uint32_t deferred[QSTAT_BUCKETS];
    uint32_t parked[QSTAT_BUCKETS];
    uint64_t minute[QSTAT_BUCKETS]; /* the minute (wall ms / 60000) each bucket counts */
    char     last_error[256];
    uint64_t last_error_ms;         /* wall clock; 0: none */
    uint64_t last_ms;               /* last noted */
} qstat_dest_t;

typedef struct qstat_table {
    qstat_dest_t d[QSTAT_DESTS];
    size_t       n;
} qstat_table_t;

/* One destination's row: in a record, and merged over the workers. */
typedef struct qstat_row {
    char     dest[128];
    uint64_t waiting;       /* legs waiting in the site's FIFO now */
    uint64_t parked;        /* recipients parked in the last 15 minutes */
    uint64_t deferred;      /* recipients deferred in the last 15 minutes */
    char     last_error[256];
    uint64_t last_error_ms; /* wall clock; 0: none */
} qstat_row_t;

typedef struct qstat_record {
    char        queue[256];        /* the [amqp] queue the worker consumes */
    char        host[256];
    long        pid;
    int         worker;
    uint64_t    inflight;          /* messages held */
    uint64_t    inflight_bytes;    /* their charge against [message] inflight_memory */
    uint64_t    smtp_connections;  /* busy + idle */
    uint64_t    oldest_first_seen_ms; /* wall clock; 0: holds none */
    uint64_t    updated_ms;        /* wall clock of the write */
    qstat_row_t rows[QSTAT_TOP];
    size_t      nrows;
} qstat_record_t;

/* A recipient deferred (parked = 0; error: the reply or local reason,
 * may be NULL) or parked (parked = 1) for dest. A full table forgets the
 * destination noted least recently. */
void qstat_note(qstat_table_t *t, const char *dest, int parked, const char *error, uint64_t now_ms);
/* The counts of the last 15 minutes. */
uint64_t qstat_recent(const qstat_dest_t *d, int parked, uint64_t now_ms);
/* Forget destinations with nothing left in the window. */
void qstat_expire(qstat_table_t *t, uint64_t now_ms);
/* Rows of the table (at most cap), unsorted. */
size_t qstat_table_rows(const qstat_table_t *t, qstat_row_t *out, size_t cap, uint64_t now_ms);

/* Add in[] into acc[] (n used, cap room): a row of a destination acc
 * has is summed into it (the latest last error kept), else appended
 * while there is room. Returns the new count. Then sorted: waiting
 * descending, then deferred, then parked, then name. */
size_t qstat_merge(qstat_row_t *acc, size_t n, size_t cap, const qstat_row_t *in, size_t nin);
void   qstat_sort(qstat_row_t *rows, size_t n);

/* The record as JSON (malloc'd, NUL-terminated). */
char *qstat_encode(const qstat_record_t *r);
/* 0, or -1 when s is not a record (missing or mistyped fields). */
int   qstat_decode(const char *s, size_t len, qstat_record_t *out);

#endif

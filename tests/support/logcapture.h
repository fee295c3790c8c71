/*
 * tests/support/logcapture.h - what the code under test logs, for unit
 * tests that check log lines: stderr goes to a temporary file between
 * logcapture_begin() and logcapture_end(), which hands back its text.
 */
#ifndef MP_TESTS_LOGCAPTURE_H
#define MP_TESTS_LOGCAPTURE_H

#include <stddef.h>

#include "core/log.h"

typedef struct logcapture {
    void *tmp;   /* FILE * */
    int   saved; /* the real stderr */
} logcapture_t;

/* Start capturing, with log_setup(level, format). 0, or -1. */
int logcapture_begin(logcapture_t *lc, enum log_level level, enum log_format format);
/* Stop: stderr back, the captured text (NUL-terminated, cut to fit) in
 * out; then log_setup(level, LOG_FMT_LOGFMT). Returns out. */
char *logcapture_end(logcapture_t *lc, char *out, size_t cap, enum log_level level);

#endif

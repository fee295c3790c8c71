/*
 * tests/support/logcapture.c - stderr into a temporary file and back.
 */
#include "logcapture.h"

#include <stdio.h>
#include <unistd.h>

int logcapture_begin(logcapture_t *lc, enum log_level level, enum log_format format)
{
    FILE *tmp = tmpfile();
    if (tmp == NULL)
        return -1;
    lc->tmp = tmp;
    lc->saved = dup(STDERR_FILENO);
    dup2(fileno(tmp), STDERR_FILENO);
    log_setup(level, format);
    return 0;
}

char *logcapture_end(logcapture_t *lc, char *out, size_t cap, enum log_level level)
{
    FILE *tmp = lc->tmp;
    log_setup(level, LOG_FMT_LOGFMT);
    dup2(lc->saved, STDERR_FILENO);
    close(lc->saved);
    rewind(tmp);
    size_t n = fread(out, 1, cap - 1, tmp);
    out[n] = '\0';
    fclose(tmp);
    return out;
}

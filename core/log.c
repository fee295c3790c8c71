/*
 * SUMMARY
 *  core/log.c - structured log lines (logfmt or JSON) on stderr.
 * DESCRIPTION
 *  Each line is formatted into a local buffer and written with one
 *  write(2), so lines from different worker threads never interleave.
 *  Level and format are set once at start-up, before threads exist.
 */
#include "core/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static enum log_level  g_level = LOG_INFO;
static enum log_format g_format = LOG_FMT_LOGFMT;

static const char *level_names[] = { "error", "warn", "info", "debug" };

void log_setup(enum log_level level, enum log_format format)
{
    g_level = level;
    g_format = format;
}

int log_level_from_name(const char *name)
{
    for (int i = 0; i <= LOG_DEBUG; i++)
        if (strcasecmp(name, level_names[i]) == 0)
            return i;
    if (strcasecmp(name, "warning") == 0)
        return LOG_WARN;
    return -1;
}

int log_enabled(enum log_level level)
{
    return level <= g_level;
}

/* Append s to p (bounded), escaping for a JSON string. */
static size_t json_escape(char *p, size_t room, const char *s)
{
    size_t n = 0;
    for (; *s && n + 7 < room; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            p[n++] = '\\';
            p[n++] = (char)c;
        } else if (c < 0x20) {
            n += (size_t)snprintf(p + n, room - n, "\\u%04x", c);
        } else {
            p[n++] = (char)c;
        }
    }
    p[n] = '\0';
    return n;
}

void log_msg(enum log_level level, const char *mod, const char *event, const char *fmt, ...)
{
    if (!log_enabled(level))
        return;
    char detail[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    /* a log line never spans lines: fold control characters */
    for (char *c = detail; *c; c++)
        if (*c == '\r' || *c == '\n')
            *c = ' ';

    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char ts[64];
    snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (long)(tv.tv_usec / 1000));

    char line[4096 + 512];
    size_t n;
    if (g_format == LOG_FMT_JSON) {
        char esc[4096];
        json_escape(esc, sizeof(esc), detail);
        n = (size_t)snprintf(line, sizeof(line),
                             "{\"ts\":\"%s\",\"level\":\"%s\",\"mod\":\"%s\",\"event\":\"%s\","
                             "\"detail\":\"%s\"}\n",
                             ts, level_names[level], mod, event, esc);
    } else {
        n = (size_t)snprintf(line, sizeof(line), "ts=%s level=%s mod=%s event=%s%s%s\n", ts,
                             level_names[level], mod, event, detail[0] ? " " : "", detail);
    }
    if (n >= sizeof(line)) {
        n = sizeof(line) - 1;
        line[n - 1] = '\n';
    }
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}

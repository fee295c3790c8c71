/*
 * core/log.h - one structured line per event.
 *
 * log_msg(LOG_INFO, "smtp", "delivered", "msg=%s rcpt=%s code=%d", ...)
 * prints, in logfmt:
 *   ts=2026-11-23T16:49:37.123Z level=info mod=smtp event=delivered msg=... rcpt=...
 * or, with format json, {"ts":..,"level":..,"mod":..,"event":..,"detail":"msg=..."}.
 * The fields string is free-form key=value pairs. Thread-safe (one write(2)
 * per line to stderr).
 */
#ifndef MP_CORE_LOG_H
#define MP_CORE_LOG_H

enum log_level { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };
enum log_format { LOG_FMT_LOGFMT = 0, LOG_FMT_JSON };

void log_setup(enum log_level level, enum log_format format);
int  log_level_from_name(const char *name); /* -1 if unknown */
int  log_enabled(enum log_level level);
void log_msg(enum log_level level, const char *mod, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define log_error(mod, ev, ...) log_msg(LOG_ERROR, mod, ev, __VA_ARGS__)
#define log_warn(mod, ev, ...)  log_msg(LOG_WARN, mod, ev, __VA_ARGS__)
#define log_info(mod, ev, ...)  log_msg(LOG_INFO, mod, ev, __VA_ARGS__)
#define log_debug(mod, ev, ...) do { if (log_enabled(LOG_DEBUG)) log_msg(LOG_DEBUG, mod, ev, __VA_ARGS__); } while (0)

#endif

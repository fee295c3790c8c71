/*
 * core/log.h - one structured line per event.
 *
 * log_msg(LOG_INFO, "smtp", "delivered", "%s rcpt=%s code=%d", LOG_MSG(id, trace), LOG_Q(rcpt), code)
 * prints, in logfmt:
 *   ts=2026-11-23T16:49:37.123Z level=info mod=smtp event=delivered msg="..." trace="..." rcpt="..." code=250
 * or, with format json, one object with one member per key:
 *   {"ts":"...","level":"info","mod":"smtp","event":"delivered","msg":"...","trace":"...","rcpt":"...","code":250}
 * LOG_MSGCTX(ctx) in place of LOG_MSG adds the message's tenant, campaign
 * and pool when it has them: msg="..." trace="..." tenant="..." ...
 *
 * The fields string is space-separated key=value pairs. A bare value is
 * only ever something the program made itself (a number, a static token,
 * an id of ours); every value that can hold outside data (names from DNS,
 * server texts, addresses, ids and names from the published message,
 * error strings) goes through LOG_Q(), which writes it inside double
 * quotes with quotes, backslashes and control bytes escaped, so no value
 * can add a field or a line. docs/operations.md describes the format.
 * Thread-safe (one write(2) per line to stderr).
 */
#ifndef MP_CORE_LOG_H
#define MP_CORE_LOG_H

#include <stddef.h>

enum log_level { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };
enum log_format { LOG_FMT_LOGFMT = 0, LOG_FMT_JSON };

void log_setup(enum log_level level, enum log_format format);
int  log_level_from_name(const char *name); /* -1 if unknown */
int  log_enabled(enum log_level level);
void log_msg(enum log_level level, const char *mod, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Room for one quoted value; longer text is cut short with "..." inside
 * the quotes. */
#define LOG_QUOTE_MAX 320

/* s as a quoted log value into dst: "..." with \" \\ \r \n \t and \xNN
 * (other control bytes, DEL) escaped, cut short with "..." to fit n
 * (n >= 16). NULL gives the bare "-" (no value). Returns dst. */
const char *log_quote(const char *s, char *dst, size_t n);
/* The fields that tie a line to its message: msg="<msg_id>" and, when
 * trace_id is not NULL, trace="<trace_id>"; msg=- without a message id.
 * Returns dst; n >= 2 * LOG_QUOTE_MAX + 16 never cuts. */
const char *log_msgref(const char *msg_id, const char *trace_id, char *dst, size_t n);

/* Everything that ties a line to its message. The job owns one for its
 * message; what works for the message (domain legs, SMTP attempts, the
 * IMAP append) borrows a pointer to it. NULL members are left out. */
typedef struct log_msgctx {
    const char *id;       /* the message id, or NULL: msg=- */
    const char *trace;    /* its trace id */
    const char *tenant;   /* the sender fields (docs/message-format.md) */
    const char *campaign;
    const char *pool;
} log_msgctx_t;

/* msg="<id>" trace="<trace>" tenant="<tenant>" campaign="<campaign>"
 * pool="<pool>", each but msg only when set, quoted as LOG_Q does; with
 * only id and trace exactly what log_msgref() writes, and msg=- for a
 * NULL ctx. Returns dst; n >= LOG_MSGCTX_MAX never cuts. */
#define LOG_MSGCTX_MAX (5 * LOG_QUOTE_MAX + 48)
const char *log_msgctx(const log_msgctx_t *ctx, char *dst, size_t n);

/* For a %s argument of a log_* call: the buffer lives until the end of
 * the statement. */
#define LOG_Q(s)             log_quote((s), (char[LOG_QUOTE_MAX]){ 0 }, LOG_QUOTE_MAX)
#define LOG_MSG(msg, trace)  log_msgref((msg), (trace), (char[2 * LOG_QUOTE_MAX + 16]){ 0 }, 2 * LOG_QUOTE_MAX + 16)
#define LOG_MSGCTX(ctx)      log_msgctx((ctx), (char[LOG_MSGCTX_MAX]){ 0 }, LOG_MSGCTX_MAX)

/* One whole line (with its '\n') for the given timestamp and fields, as
 * log_msg() writes it; what log_msg() and the tests share. Returns the
 * length (< cap; cap >= 256). */
size_t log_render(char *line, size_t cap, enum log_format format, enum log_level level, const char *ts,
                  const char *mod, const char *event, const char *pairs);

#define log_error(mod, ev, ...) log_msg(LOG_ERROR, mod, ev, __VA_ARGS__)
#define log_warn(mod, ev, ...)  log_msg(LOG_WARN, mod, ev, __VA_ARGS__)
#define log_info(mod, ev, ...)  log_msg(LOG_INFO, mod, ev, __VA_ARGS__)
#define log_debug(mod, ev, ...) do { if (log_enabled(LOG_DEBUG)) log_msg(LOG_DEBUG, mod, ev, __VA_ARGS__); } while (0)

#endif

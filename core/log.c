/*
 * SUMMARY
 *  core/log.c - structured log lines (logfmt or JSON) on stderr.
 * DESCRIPTION
 *  Each line is formatted into a local buffer and written with one
 *  write(2), so lines from different worker threads never interleave.
 *  Level and format are set once at start-up, before threads exist.
 *  The fields a call site formats are read back as logfmt pairs (a bare
 *  value runs to the next space, a quoted one to its closing quote) and
 *  written again one by one: as they are in logfmt, one JSON member each
 *  in JSON. A line that does not fit loses its last pairs whole and ends
 *  in truncated=1.
 */
#include "core/log.h"

#include "core/util.h"

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

const char *log_quote(const char *s, char *dst, size_t n)
{
    if (!s) {
        snprintf(dst, n, "-");
        return dst;
    }
    dst[0] = '"';
    util_quote_text(s, dst + 1, n - 2);
    size_t len = strlen(dst);
    dst[len] = '"';
    dst[len + 1] = '\0';
    return dst;
}

const char *log_msgref(const char *msg_id, const char *trace_id, char *dst, size_t n)
{
    log_msgctx_t c = { .id = msg_id, .trace = trace_id };
    return log_msgctx(&c, dst, n);
}

const char *log_msgctx(const log_msgctx_t *ctx, char *dst, size_t n)
{
    static const log_msgctx_t none = { 0 };
    char q[LOG_QUOTE_MAX];
    if (ctx == NULL)
        ctx = &none;
    const struct { const char *key, *v; } f[] = {
        { "trace", ctx->trace }, { "tenant", ctx->tenant }, { "campaign", ctx->campaign }, { "pool", ctx->pool },
    };
    int len = snprintf(dst, n, "msg=%s", log_quote(ctx->id, q, sizeof(q)));
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
        if (f[i].v == NULL || len < 0 || (size_t)len >= n)
            continue;
        int k = snprintf(dst + len, n - (size_t)len, " %s=%s", f[i].key, log_quote(f[i].v, q, sizeof(q)));
        if (k < 0 || (size_t)k >= n - (size_t)len) {
            dst[len] = '\0'; /* no room for the whole pair: leave it out */
            break;
        }
        len += k;
    }
    return dst;
}

/* ---- reading the pairs back ---- */

typedef struct pair {
    const char *start, *end; /* the whole token */
    const char *key;
    size_t      klen;
    const char *val; /* NULL: a word without '=' */
    size_t      vlen;
    int         quoted;
    int         complete; /* 0: a quoted value without its closing quote */
} pair_t;

static int next_pair(const char **pp, pair_t *t)
{
    const char *p = *pp;
    while (*p == ' ')
        p++;
    if (!*p)
        return 0;
    memset(t, 0, sizeof(*t));
    t->start = t->key = p;
    t->complete = 1;
    while (*p && *p != ' ' && *p != '=')
        p++;
    t->klen = (size_t)(p - t->key);
    if (*p == '=' && t->klen > 0) {
        p++;
        if (*p == '"') {
            t->quoted = 1;
            t->val = ++p;
            while (*p && *p != '"')
                p += (*p == '\\' && p[1]) ? 2 : 1;
            t->vlen = (size_t)(p - t->val);
            if (*p == '"')
                p++;
            else
                t->complete = 0;
        } else {
            t->val = p;
            while (*p && *p != ' ')
                p++;
            t->vlen = (size_t)(p - t->val);
        }
    } else {
        while (*p && *p != ' ')
            p++;
        t->klen = (size_t)(p - t->key);
    }
    t->end = p;
    *pp = p;
    return 1;
}

/* ---- writing ---- */

typedef struct out {
    char  *b;
    size_t cap, n; /* n < cap always; b[n] is not kept terminated */
    int    full;
} out_t;

static void put(out_t *o, const char *s, size_t len)
{
    if (o->full || len >= o->cap - o->n) {
        o->full = 1;
        return;
    }
    memcpy(o->b + o->n, s, len);
    o->n += len;
}

static void puts_(out_t *o, const char *s)
{
    put(o, s, strlen(s));
}

/* s[0..len) as a JSON string (RFC 8259): quotes, backslashes and control
 * bytes escaped, bytes that are not UTF-8 as U+FFFD. */
static void put_json_string(out_t *o, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    put(o, "\"", 1);
    for (size_t i = 0; i < len;) {
        unsigned char c = u[i];
        if (c >= 0x80) {
            size_t k = util_utf8_len(u + i, len - i);
            if (k) {
                put(o, s + i, k);
                i += k;
            } else {
                puts_(o, "\\ufffd");
                i++;
            }
            continue;
        }
        char esc[7] = { '\\', 0, 0, 0, 0, 0, 0 };
        size_t elen = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            if (c < 0x20 || c == 0x7f) {
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = hex[c >> 4];
                esc[5] = hex[c & 15];
                elen = 6;
            } else {
                esc[0] = (char)c;
                elen = 1;
            }
        }
        put(o, esc, elen);
        i++;
    }
    put(o, "\"", 1);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A quoted logfmt value without its escapes, into dst (>= len + 1). */
static size_t unescape(const char *v, size_t len, char *dst)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (v[i] != '\\' || i + 1 == len) {
            dst[n++] = v[i];
            continue;
        }
        char e = v[++i];
        int h1, h2;
        if (e == 'n')
            dst[n++] = '\n';
        else if (e == 'r')
            dst[n++] = '\r';
        else if (e == 't')
            dst[n++] = '\t';
        else if (e == 'x' && i + 2 < len && (h1 = hexval(v[i + 1])) >= 0 && (h2 = hexval(v[i + 2])) >= 0) {
            dst[n++] = (char)(h1 << 4 | h2);
            i += 2;
        } else
            dst[n++] = e; /* \" \\ and anything else: the character itself */
    }
    return n;
}

/* A bare decimal integer of at most 15 digits (exact in a double) is a
 * JSON number; anything else is a string. */
static int is_json_int(const char *v, size_t len)
{
    size_t i = (len > 0 && v[0] == '-') ? 1 : 0;
    size_t digits = len - i;
    if (digits == 0 || digits > 15 || (v[i] == '0' && digits > 1))
        return 0;
    for (; i < len; i++)
        if (v[i] < '0' || v[i] > '9')
            return 0;
    return 1;
}

#define MAX_KEYS 64

typedef struct keyset {
    const char *k[MAX_KEYS];
    size_t      len[MAX_KEYS];
    size_t      n;
} keyset_t;

/* How many times key was seen before; remembers it. */
static unsigned key_seen(keyset_t *ks, const char *k, size_t len)
{
    unsigned seen = 0;
    for (size_t i = 0; i < ks->n; i++)
        if (ks->len[i] == len && memcmp(ks->k[i], k, len) == 0)
            seen++;
    if (ks->n < MAX_KEYS) {
        ks->k[ks->n] = k;
        ks->len[ks->n++] = len;
    }
    return seen;
}

/* Room kept for the end of a line: ,"truncated":1}\n or " truncated=1\n". */
#define TAIL_ROOM 24

static void json_member(out_t *o, keyset_t *ks, const char *k, size_t klen, const char *v, size_t vlen,
                        int quoted)
{
    unsigned seen = key_seen(ks, k, klen);
    put(o, ",", 1);
    if (seen) { /* a repeated key: key_2, key_3, ... */
        char name[160];
        int m = snprintf(name, sizeof(name), "%.*s_%u", (int)(klen > 140 ? 140 : klen), k, seen + 1);
        put_json_string(o, name, (size_t)m);
    } else {
        put_json_string(o, k, klen);
    }
    put(o, ":", 1);
    if (!v)
        puts_(o, "true");
    else if (!quoted && is_json_int(v, vlen))
        put(o, v, vlen);
    else if (!quoted)
        put_json_string(o, v, vlen);
    else {
        char tmp[4096];
        if (vlen >= sizeof(tmp))
            vlen = sizeof(tmp) - 1;
        put_json_string(o, tmp, unescape(v, vlen, tmp));
    }
}

size_t log_render(char *line, size_t cap, enum log_format format, enum log_level level, const char *ts,
                  const char *mod, const char *event, const char *pairs)
{
    out_t o = { line, cap - TAIL_ROOM, 0, 0 };
    keyset_t ks = { .n = 0 };
    const char *lvl = level_names[level <= LOG_DEBUG ? level : LOG_DEBUG];
    if (format == LOG_FMT_JSON) {
        static const char *const fixed[] = { "ts", "level", "mod", "event" };
        const char *vals[] = { ts, lvl, mod, event };
        put(&o, "{", 1);
        for (int i = 0; i < 4; i++) {
            if (i)
                put(&o, ",", 1);
            key_seen(&ks, fixed[i], strlen(fixed[i]));
            put_json_string(&o, fixed[i], strlen(fixed[i]));
            put(&o, ":", 1);
            put_json_string(&o, vals[i], strlen(vals[i]));
        }
    } else {
        puts_(&o, "ts=");
        puts_(&o, ts);
        puts_(&o, " level=");
        puts_(&o, lvl);
        puts_(&o, " mod=");
        puts_(&o, mod);
        puts_(&o, " event=");
        puts_(&o, event);
    }
    int truncated = 0;
    const char *p = pairs;
    pair_t t;
    while (!o.full && next_pair(&p, &t)) {
        size_t mark = o.n;
        if (!t.complete) {
            truncated = 1;
            break;
        }
        if (format == LOG_FMT_JSON)
            json_member(&o, &ks, t.key, t.klen, t.val, t.vlen, t.quoted);
        else {
            put(&o, " ", 1);
            put(&o, t.start, (size_t)(t.end - t.start));
        }
        if (o.full) { /* this pair does not fit: leave it out whole */
            o.n = mark;
            truncated = 1;
        }
    }
    o.cap += TAIL_ROOM;
    o.full = 0;
    if (format == LOG_FMT_JSON)
        puts_(&o, truncated ? ",\"truncated\":1}\n" : "}\n");
    else
        puts_(&o, truncated ? " truncated=1\n" : "\n");
    line[o.n] = '\0';
    return o.n;
}

void log_msg(enum log_level level, const char *mod, const char *event, const char *fmt, ...)
{
    if (!log_enabled(level))
        return;
    char pairs[4096];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(pairs, sizeof(pairs), fmt, ap);
    va_end(ap);
    if (len >= (int)sizeof(pairs)) {
        /* drop the pair that was cut (log_render drops a quoted value cut
         * at a space of its own) and say so */
        char *sp = strrchr(pairs, ' ');
        snprintf(sp && sp - pairs < (long)sizeof(pairs) - 16 ? sp : pairs + sizeof(pairs) - 16, 16,
                 " truncated=1");
    }
    /* a log line never spans lines: fold what a bare value let through */
    for (char *c = pairs; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = ' ';

    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char ts[64];
    snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (long)(tv.tv_usec / 1000));

    char line[8192];
    size_t n = log_render(line, sizeof(line), g_format, level, ts, mod, event, pairs);
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}

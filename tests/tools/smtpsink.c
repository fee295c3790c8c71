/*
 * SUMMARY
 *  tests/tools/smtpsink.c - a fast, fault-injecting SMTP receiver for
 *  integration tests and benchmarks.
 * DESCRIPTION
 *  Runs on the project's own loop and streams (core/loop.h, core/stream.h):
 *  one loop per thread, each thread with its own SO_REUSEPORT listener per
 *  --listen address, so the kernel spreads connections over threads and
 *  nothing is shared on the hot path except relaxed atomic counters.
 *
 *  Every complete command in the input buffer is handled in order and
 *  its reply appended to one per-thread scratch buffer that is written
 *  once when the input is exhausted: a pipelining client gets all its
 *  replies in one segment, in order (RFC 2920). DATA content is scanned
 *  line by line with dot-unstuffing; BDAT chunks are counted raw.
 *
 *  Faults are rules consulted per command (see usage()): a rule may
 *  replace the reply, hang up after it (421), drop the connection
 *  without a reply, hold the reply for a fixed or random while, trickle
 *  it out one byte at a time (a tarpit), or make it multi-line. A rule
 *  may fire only its first N times (#N) or only on every Nth connection
 *  (%N, counted in accept order). A held or dripping reply stops input
 *  processing of that connection until it is sent, so ordering is
 *  preserved. --reply-from makes a reply rule that fires only for clients
 *  connecting from one address (a receiver deferring one sending IP).
 *
 *  A connection costs a small struct plus the stream's buffers, and an idle
 *  one gives its read buffer back (about 16 KiB per idle TLS connection,
 *  mostly OpenSSL's); message bytes are kept only when --maildir asks.
 * DIAGNOSTICS
 *  Counters go to --stats-file (JSON, rewritten atomically every second,
 *  on SIGUSR1 and at exit) and to stderr at exit. --log writes one line
 *  per command received: "<conn-id> <command>"; lines of "<conn-id> +..."
 *  are events (connect, tls, data, close); "<conn-id> PEER <ip>:<port>"
 *  follows each +connect. --maildir files carry the client's address in
 *  X-Smtpsink-Peer after the envelope headers.
 *  Exit status: 0 after SIGTERM/SIGINT, 2 on a usage or set-up error.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/stream.h"
#include "core/tls.h"
#include "core/util.h"

#define SINK_MAX_LISTEN    16
#define SINK_MAX_THREADS   64
#define SINK_CMD_LINE_MAX  4096  /* RFC 5321 allows 512; be lenient, not unbounded */
#define SINK_DATA_LINE_MAX 65536 /* longer "lines" are consumed in pieces */
#define SINK_ADDR_MAX      320

/* ---- verbs ------------------------------------------------------------ */

typedef enum {
    V_CONNECT = 0, V_EHLO, V_HELO, V_MAIL, V_RCPT, V_DATA, V_DOT, V_BDAT, V_RSET,
    V_NOOP, V_QUIT, V_STARTTLS, V_AUTH, V_VRFY, V_OTHER, V_LAST
} sink_verb_t;

static const char *verb_names[V_LAST] = {
    "CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "DOT", "BDAT", "RSET",
    "NOOP", "QUIT", "STARTTLS", "AUTH", "VRFY", "OTHER",
};

static int verb_from_name(const char *name, size_t n)
{
    for (int v = 0; v < V_LAST; v++)
        if (strlen(verb_names[v]) == n && util_strncasecmp(name, verb_names[v], n) == 0)
            return v;
    return -1;
}

/* ---- fault rules -------------------------------------------------------- */

typedef enum { R_REPLY = 0, R_RCPT, R_DROP, R_DELAY, R_MULTILINE, R_DRIP } sink_rule_kind_t;

typedef struct sink_rule {
    sink_rule_kind_t kind;
    sink_verb_t      verb;      /* R_RCPT: V_RCPT */
    char            *pattern;   /* R_RCPT: fnmatch pattern on the address */
    int              code;      /* R_REPLY, R_RCPT */
    char            *enh;       /* "4.2.0" or NULL */
    char            *text;      /* reply text (without code / enhanced code) */
    unsigned         delay_ms;  /* R_DELAY: at least; R_DRIP: between two bytes */
    unsigned         delay_max; /* R_DELAY: at most (drawn uniformly per reply) */
    unsigned long    limit;     /* fires at most this often; 0 = always */
    unsigned long    every;     /* only on connections whose number is a multiple; 0 = all */
    atomic_ulong     fired;
    char            *spec;      /* as given, for stats */
    int              peer_af;   /* --reply-from: only for clients from this address; 0 = any */
    unsigned char    peer[16];
} sink_rule_t;

/* ---- configuration (read-only once the threads run) -------------------- */

typedef struct sink_listen {
    struct sockaddr_storage sa;
    socklen_t               salen;
    char                    text[80];
} sink_listen_t;

typedef struct sink_conf {
    sink_listen_t listen[SINK_MAX_LISTEN];
    int           nlisten;
    int           threads;
    const char   *hostname;
    const char   *cert, *key;
    SSL_CTX      *tls;
    int           pipelining, starttls, enhanced, eightbit, smtputf8, chunking, auth;
    unsigned long size_limit;  /* 0: SIZE not advertised, no limit */
    char         *auth_user, *auth_pass;
    unsigned      greeting_delay_ms;
    char         *banner;      /* full greeting line, e.g. "554 go away" */
    unsigned      timeout_ms;
    sink_rule_t  *rules;
    size_t        nrules;
    const char   *stats_file;
    const char   *maildir;
    FILE         *log;
    int           quiet;
} sink_conf_t;

/* ---- counters (shared by all threads, relaxed atomics) ----------------- */

typedef struct sink_stats {
    atomic_ullong connections, connections_open, open_peak, tls_handshakes, tls_resumed, tls_failed;
    atomic_ullong messages, recipients_accepted, recipients_rejected, bytes, commands;
    atomic_ullong bare_lf_lines, long_lines, starttls_injection;
} sink_stats_t;

static sink_stats_t g_stats;
static atomic_ullong g_conn_ids;
static atomic_ullong g_msg_ids;

#define STAT_ADD(f, n) atomic_fetch_add_explicit(&g_stats.f, (n), memory_order_relaxed)
#define STAT_SUB(f, n) atomic_fetch_sub_explicit(&g_stats.f, (n), memory_order_relaxed)
#define STAT_GET(f)    atomic_load_explicit(&g_stats.f, memory_order_relaxed)

/* ---- per thread / per connection ---------------------------------------- */

typedef enum {
    C_GREETING = 0, /* greeting held back (--greeting-delay) */
    C_CMD,
    C_NOSERVICE,    /* greeted with 5xx: only QUIT is served */
    C_DATA,
    C_BDAT,
    C_AUTH_PLAIN,
    C_AUTH_LOGIN_USER,
    C_AUTH_LOGIN_PASS,
    C_TLS,          /* handshake running */
    C_CLOSING,      /* waiting for the output to drain, then close */
    C_LAST
} sink_cstate_t;

typedef enum { AFTER_NONE = 0, AFTER_CLOSE, AFTER_STARTTLS } sink_after_t;

typedef struct sink_worker sink_worker_t;

typedef struct sink_conn {
    struct sink_conn *prev, *next;
    sink_worker_t    *w;
    stream_t         *s;
    uint64_t          id;
    sink_cstate_t     state;
    sink_after_t      after;      /* what to do once the pending reply is out */
    loop_timer_t      timer;      /* greeting or reply delay */
    buf_t             held;       /* a delayed or dripping reply */
    int               holding;
    unsigned          drip_ms;    /* held: sent one byte every drip_ms (0: at once) */
    size_t            drip_off;   /* held: bytes already dripped */
    int               helo;       /* 0 none, 1 HELO, 2 EHLO */
    int               in_mail;
    int               authed;
    int               mid_line;   /* DATA: the last piece ended inside a line */
    int               bdat_last;
    int               bdat_failed;
    unsigned          nrcpt_ok;
    unsigned long     bdat_left;
    unsigned long     msg_bytes;
    unsigned long     msg_bare_lf;
    char              mail_from[SINK_ADDR_MAX];
    char             *auth_login_user;
    int               peer_af;    /* the client's address (AF_INET, AF_INET6; 0 unknown) */
    unsigned char     peer[16];
    char              peer_text[INET6_ADDRSTRLEN];
    buf_t             msg;        /* content, only with --maildir */
    buf_t             rcpts;      /* accepted recipients "addr\n", only with --maildir */
} sink_conn_t;

struct sink_worker {
    int              index;
    loop_t          *loop;
    pthread_t        thread;
    int              lfd[SINK_MAX_LISTEN];
    int              nlfd;
    sink_conn_t     *conns;
    buf_t            out;        /* replies of the connection being served */
    const sink_conf_t *conf;
    atomic_int       stop;
};

static sink_conf_t   g_conf;
static sink_worker_t g_workers[SINK_MAX_THREADS];

static void conn_free(sink_conn_t *c);
static int  conn_process(sink_conn_t *c);

/* ---- small helpers ------------------------------------------------------ */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("smtpsink: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static void tlog(const sink_conn_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tlog(const sink_conn_t *c, const char *fmt, ...)
{
    if (g_conf.log == NULL)
        return;
    char line[1200];
    int n = snprintf(line, sizeof(line), "%llu ", (unsigned long long)c->id);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    /* one fputs per line: stdio locks the FILE, so threads do not interleave */
    strcat(line, "\n");
    fputs(line, g_conf.log);
}

static int ieq_prefix(const char *s, const char *prefix)
{
    return util_strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* ---- rules ---------------------------------------------------------------- */

/* "450 4.2.0 try later" -> code, enhanced code, text. 0 or -1. */
static int parse_reply_spec(const char *spec, int *code, char **enh, char **text)
{
    while (*spec == ' ')
        spec++;
    if (!isdigit((unsigned char)spec[0]) || !isdigit((unsigned char)spec[1]) ||
        !isdigit((unsigned char)spec[2]) || (spec[3] != '\0' && spec[3] != ' '))
        return -1;
    *code = (spec[0] - '0') * 100 + (spec[1] - '0') * 10 + (spec[2] - '0');
    if (*code < 200 || *code > 599)
        return -1;
    const char *p = spec + 3;
    while (*p == ' ')
        p++;
    *enh = NULL;
    /* an enhanced code is class.subject.detail with the class of the reply */
    const char *q = p;
    if ((*q == '2' || *q == '4' || *q == '5') && q[1] == '.') {
        size_t n = strspn(q, "0123456789.");
        if (n >= 5 && (q[n] == ' ' || q[n] == '\0')) {
            *enh = xstrndup(q, n);
            p = q + n;
            while (*p == ' ')
                p++;
        }
    }
    if (*enh == NULL)
        *enh = xstrdup(*code >= 500 ? "5.0.0" : *code >= 400 ? "4.0.0" : "2.0.0");
    *text = xstrdup(*p ? p : "fault injected by smtpsink");
    return 0;
}

/* KIND:TARGET[#N][%N][=VALUE] */
static void rule_add(sink_conf_t *conf, const char *spec)
{
    sink_rule_t r;
    memset(&r, 0, sizeof(r));
    const char *colon = strchr(spec, ':');
    if (colon == NULL)
        die("rule \"%s\": expected KIND:TARGET[=VALUE]", spec);
    size_t klen = (size_t)(colon - spec);
    const char *target = colon + 1;
    const char *eq = strchr(target, '=');
    size_t tlen = eq ? (size_t)(eq - target) : strlen(target);
    const char *value = eq ? eq + 1 : NULL;
    char *t = xstrndup(target, tlen);
    /* #N and %N suffixes, in either order */
    for (;;) {
        char *hash = strrchr(t, '#'), *pct = strrchr(t, '%');
        char *suf = hash > pct ? hash : pct;
        if (suf == NULL)
            break;
        char *end;
        unsigned long n = strtoul(suf + 1, &end, 10);
        if (*end || n == 0 || suf[1] == '\0' || !isdigit((unsigned char)suf[1]))
            die("rule \"%s\": bad %cN (a number from 1)", spec, *suf);
        if (*suf == '#') {
            if (r.limit)
                die("rule \"%s\": two #N", spec);
            r.limit = n;
        } else {
            if (r.every)
                die("rule \"%s\": two %%N", spec);
            r.every = n;
        }
        *suf = '\0';
    }
    int verb = -1;
    if (klen == 4 && util_strncasecmp(spec, "rcpt", 4) == 0) {
        r.kind = R_RCPT;
        r.verb = V_RCPT;
        if (*t == '\0')
            die("rule \"%s\": empty recipient pattern", spec);
        r.pattern = xstrdup(t);
    } else {
        if (klen == 3 && util_strncasecmp(spec, "cmd", 3) == 0)
            r.kind = R_REPLY;
        else if (klen == 4 && util_strncasecmp(spec, "drop", 4) == 0)
            r.kind = R_DROP;
        else if (klen == 5 && util_strncasecmp(spec, "delay", 5) == 0)
            r.kind = R_DELAY;
        else if (klen == 9 && util_strncasecmp(spec, "multiline", 9) == 0)
            r.kind = R_MULTILINE;
        else if (klen == 4 && util_strncasecmp(spec, "drip", 4) == 0)
            r.kind = R_DRIP;
        else
            die("rule \"%s\": unknown kind (cmd, rcpt, drop, delay, drip, multiline)", spec);
        verb = verb_from_name(t, strlen(t));
        if (verb < 0 || verb == V_OTHER)
            die("rule \"%s\": unknown command \"%s\"", spec, t);
        r.verb = (sink_verb_t)verb;
    }
    free(t);
    switch (r.kind) {
    case R_REPLY:
    case R_RCPT:
        if (value == NULL || parse_reply_spec(value, &r.code, &r.enh, &r.text) < 0)
            die("rule \"%s\": expected =CODE [X.Y.Z] [text] with CODE 200..599", spec);
        break;
    case R_DELAY: {
        char *end = NULL;
        if (value && isdigit((unsigned char)*value)) {
            r.delay_ms = r.delay_max = (unsigned)strtoul(value, &end, 10);
            if (*end == '-' && isdigit((unsigned char)end[1]))
                r.delay_max = (unsigned)strtoul(end + 1, &end, 10);
        }
        if (end == NULL || *end || r.delay_max < r.delay_ms)
            die("rule \"%s\": expected =MILLISECONDS or =MIN-MAX (MIN <= MAX)", spec);
        break;
    }
    case R_DRIP: {
        char *end = NULL;
        if (value && isdigit((unsigned char)*value))
            r.delay_ms = (unsigned)strtoul(value, &end, 10);
        if (end == NULL || *end || r.delay_ms == 0)
            die("rule \"%s\": expected =MILLISECONDS between two bytes (from 1)", spec);
        break;
    }
    default:
        if (value)
            die("rule \"%s\": takes no value", spec);
    }
    r.spec = xstrdup(spec);
    conf->rules = xrealloc(conf->rules, (conf->nrules + 1) * sizeof(*conf->rules));
    memcpy(&conf->rules[conf->nrules], &r, sizeof(r));
    atomic_init(&conf->rules[conf->nrules].fired, 0);
    conf->nrules++;
}

/* --reply-from IP:STAGE:CODE [X.Y.Z] TEXT ([IPv6]:STAGE:...): the reply a
 * client connecting from IP gets at STAGE, a cmd: rule of its own. */
static void reply_from_add(sink_conf_t *conf, const char *spec)
{
    static const struct {
        const char *name;
        sink_verb_t verb;
    } stages[] = { { "greeting", V_CONNECT }, { "mail", V_MAIL }, { "rcpt", V_RCPT }, { "data", V_DATA },
                   { "dot", V_DOT } };
    sink_rule_t r;
    memset(&r, 0, sizeof(r));
    char ip[INET6_ADDRSTRLEN + 2];
    const char *p = spec, *end;
    if (*p == '[') {
        end = strchr(p, ']');
        if (end == NULL || end[1] != ':')
            die("--reply-from \"%s\": expected [IPv6]:STAGE:CODE TEXT", spec);
        p++;
    } else {
        end = strchr(p, ':');
        if (end == NULL)
            die("--reply-from \"%s\": expected IP:STAGE:CODE TEXT", spec);
    }
    if ((size_t)(end - p) >= sizeof(ip))
        die("--reply-from \"%s\": bad address", spec);
    memcpy(ip, p, (size_t)(end - p));
    ip[end - p] = '\0';
    if (inet_pton(AF_INET, ip, r.peer) == 1)
        r.peer_af = AF_INET;
    else if (inet_pton(AF_INET6, ip, r.peer) == 1)
        r.peer_af = AF_INET6;
    else
        die("--reply-from \"%s\": \"%s\" is not an IP address", spec, ip);
    const char *stage = end + (*end == ']' ? 2 : 1);
    const char *colon = strchr(stage, ':');
    size_t slen = colon ? (size_t)(colon - stage) : 0;
    int found = 0;
    for (size_t i = 0; colon && i < sizeof(stages) / sizeof(stages[0]); i++) {
        if (strlen(stages[i].name) == slen && util_strncasecmp(stage, stages[i].name, slen) == 0) {
            r.verb = stages[i].verb;
            found = 1;
        }
    }
    if (!found)
        die("--reply-from \"%s\": STAGE is one of greeting, mail, rcpt, data, dot", spec);
    if (parse_reply_spec(colon + 1, &r.code, &r.enh, &r.text) < 0)
        die("--reply-from \"%s\": expected CODE [X.Y.Z] [text] with CODE 200..599 after the stage", spec);
    r.kind = R_REPLY;
    size_t n = strlen(spec) + sizeof("reply-from:");
    r.spec = xcalloc(1, n);
    snprintf(r.spec, n, "reply-from:%s", spec);
    conf->rules = xrealloc(conf->rules, (conf->nrules + 1) * sizeof(*conf->rules));
    memcpy(&conf->rules[conf->nrules], &r, sizeof(r));
    atomic_init(&conf->rules[conf->nrules].fired, 0);
    conf->nrules++;
}

static void rules_load(sink_conf_t *conf, const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        die("cannot open rule file %s: %s", path, strerror(errno));
    char line[2048];
    while (fgets(line, sizeof(line), f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        p[strcspn(p, "\r\n")] = '\0';
        if (*p == '\0' || *p == '#')
            continue;
        rule_add(conf, p);
    }
    fclose(f);
}

/* Claim one firing of r (respects the #N limit). */
static int rule_take(sink_rule_t *r)
{
    unsigned long n = atomic_fetch_add_explicit(&r->fired, 1, memory_order_relaxed);
    if (r->limit && n >= r->limit) {
        atomic_fetch_sub_explicit(&r->fired, 1, memory_order_relaxed);
        return 0;
    }
    return 1;
}

/* First rule of kind for verb (and, for R_RCPT, matching addr) that may
 * fire on connection c. */
static sink_rule_t *rule_find(const sink_conn_t *c, sink_rule_kind_t kind, sink_verb_t verb,
                              const char *addr)
{
    for (size_t i = 0; i < g_conf.nrules; i++) {
        sink_rule_t *r = &g_conf.rules[i];
        if (r->kind != kind || r->verb != verb)
            continue;
        if (r->every && c->id % r->every != 0)
            continue;
        if (r->peer_af && (r->peer_af != c->peer_af ||
                           memcmp(r->peer, c->peer, r->peer_af == AF_INET ? 4 : 16) != 0))
            continue;
        if (kind == R_RCPT && fnmatch(r->pattern, addr, FNM_CASEFOLD) != 0)
            continue;
        if (!rule_take(r))
            continue;
        return r;
    }
    return NULL;
}

/* ---- replies ---------------------------------------------------------------- */

/* A uniform draw in [lo, hi] from the thread's own generator (xorshift64*). */
static unsigned draw(unsigned lo, unsigned hi)
{
    static __thread uint64_t x;
    if (x == 0)
        x = (util_mono_ms() << 20) ^ (uint64_t)pthread_self() ^ 0x9e3779b97f4a7c15ULL;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    uint64_t v = x * 0x2545f4914f6cdd1dULL;
    return lo + (unsigned)((v >> 11) % ((uint64_t)hi - lo + 1));
}

/* Where the reply to verb goes: the output, or c->held when a delay or
 * drip rule fires (hold_start() then sends it). */
static buf_t *hold_begin(sink_conn_t *c, sink_verb_t verb, unsigned *delay)
{
    *delay = 0;
    if (g_conf.nrules == 0)
        return &c->w->out;
    sink_rule_t *d = rule_find(c, R_DELAY, verb, NULL);
    sink_rule_t *dr = rule_find(c, R_DRIP, verb, NULL);
    if (d)
        *delay = d->delay_ms == d->delay_max ? d->delay_ms : draw(d->delay_ms, d->delay_max);
    c->drip_ms = dr ? dr->delay_ms : 0;
    c->drip_off = 0;
    return *delay > 0 || c->drip_ms ? &c->held : &c->w->out;
}

static void hold_start(sink_conn_t *c, unsigned delay)
{
    if (delay == 0 && c->drip_ms == 0)
        return;
    c->holding = 1;
    /* a drip starts with its first byte at once (after any delay) */
    loop_timer_set(c->w->loop, &c->timer, delay);
}

/* Append a reply for verb: "code enh text" (enh may be NULL). The
 * multiline rule turns it into three lines; a delay or drip rule holds it. */
static void reply(sink_conn_t *c, sink_verb_t verb, int code, const char *enh, const char *text)
{
    int ml = g_conf.nrules && rule_find(c, R_MULTILINE, verb, NULL) != NULL;
    unsigned delay;
    buf_t *b = hold_begin(c, verb, &delay);
    const char *e = g_conf.enhanced ? enh : NULL;
    if (ml) {
        buf_printf(b, "%d-%s%s%s\r\n", code, e ? e : "", e ? " " : "", text);
        buf_printf(b, "%d-%s%s(smtpsink multi-line reply, line 2)\r\n", code, e ? e : "", e ? " " : "");
        buf_printf(b, "%d %s%s(smtpsink multi-line reply, end)\r\n", code, e ? e : "", e ? " " : "");
    } else {
        buf_printf(b, "%d %s%s%s\r\n", code, e ? e : "", e ? " " : "", text);
    }
    hold_start(c, delay);
}

static void reply_rule(sink_conn_t *c, sink_verb_t verb, const sink_rule_t *r)
{
    reply(c, verb, r->code, r->enh, r->text);
    if (r->code == 421)
        c->after = AFTER_CLOSE;
}

/* The EHLO reply: one keyword per line. */
static void reply_ehlo(sink_conn_t *c, const char *arg)
{
    const char *kw[12];
    char sizebuf[40];
    int n = 0;
    if (g_conf.pipelining)
        kw[n++] = "PIPELINING";
    if (g_conf.size_limit) {
        snprintf(sizebuf, sizeof(sizebuf), "SIZE %lu", g_conf.size_limit);
        kw[n++] = sizebuf;
    }
    if (g_conf.tls && g_conf.starttls && !stream_is_tls(c->s))
        kw[n++] = "STARTTLS";
    if (g_conf.auth)
        kw[n++] = "AUTH PLAIN LOGIN";
    if (g_conf.enhanced)
        kw[n++] = "ENHANCEDSTATUSCODES";
    if (g_conf.eightbit)
        kw[n++] = "8BITMIME";
    if (g_conf.smtputf8)
        kw[n++] = "SMTPUTF8";
    if (g_conf.chunking)
        kw[n++] = "CHUNKING";
    unsigned delay;
    buf_t *b = hold_begin(c, V_EHLO, &delay);
    int ml = g_conf.nrules && rule_find(c, R_MULTILINE, V_EHLO, NULL) != NULL;
    buf_printf(b, "250%c%s greets %.64s\r\n", n || ml ? '-' : ' ', g_conf.hostname, arg);
    if (ml)
        buf_printf(b, "250%c(smtpsink multi-line reply)\r\n", n ? '-' : ' ');
    for (int i = 0; i < n; i++)
        buf_printf(b, "250%c%s\r\n", i + 1 < n ? '-' : ' ', kw[i]);
    hold_start(c, delay);
}

static void flush(sink_conn_t *c)
{
    buf_t *b = &c->w->out;
    if (buf_size(b) > 0) {
        stream_write(c->s, buf_head(b), buf_size(b));
        buf_reset(b);
    }
}

/* ---- transactions -------------------------------------------------------- */

static void txn_reset(sink_conn_t *c)
{
    c->in_mail = 0;
    c->nrcpt_ok = 0;
    c->mail_from[0] = '\0';
    c->msg_bytes = 0;
    c->msg_bare_lf = 0;
    c->bdat_failed = 0;
    if (g_conf.maildir) {
        buf_free(&c->msg);
        buf_free(&c->rcpts);
    }
}

static void maildir_store(sink_conn_t *c, unsigned long long qid)
{
    char tmp[4096], fin[4096];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int n = snprintf(tmp, sizeof(tmp), "%s/tmp/%lld.M%ldP%dQ%llu.smtpsink", g_conf.maildir,
                     (long long)ts.tv_sec, ts.tv_nsec / 1000, (int)getpid(), qid);
    snprintf(fin, sizeof(fin), "%s/new/%s", g_conf.maildir, tmp + strlen(g_conf.maildir) + 5);
    if (n <= 0 || (size_t)n >= sizeof(tmp))
        return;
    buf_t h = BUF_INIT;
    buf_printf(&h, "X-Sink-Mail-From: <%s>\r\n", c->mail_from);
    const char *p = buf_head(&c->rcpts);
    while (*p) {
        const char *nl = strchr(p, '\n');
        buf_printf(&h, "X-Sink-Rcpt-To: <%.*s>\r\n", (int)(nl - p), p);
        p = nl + 1;
    }
    buf_printf(&h, "X-Sink-Connection: %llu%s\r\n", (unsigned long long)c->id,
               stream_is_tls(c->s) ? " tls" : "");
    buf_printf(&h, "X-Smtpsink-Peer: %s\r\n", c->peer_text[0] ? c->peer_text : "unknown");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "smtpsink: maildir %s: %s\n", tmp, strerror(errno));
        buf_free(&h);
        return;
    }
    int ok = write(fd, buf_head(&h), buf_size(&h)) == (ssize_t)buf_size(&h) &&
             write(fd, buf_head(&c->msg), buf_size(&c->msg)) == (ssize_t)buf_size(&c->msg);
    close(fd);
    buf_free(&h);
    if (!ok || rename(tmp, fin) < 0) {
        fprintf(stderr, "smtpsink: maildir %s: %s\n", fin, strerror(errno));
        unlink(tmp);
    }
}

/* End of content (final dot, BDAT LAST): the message's final reply. */
static void message_end(sink_conn_t *c)
{
    STAT_ADD(bytes, c->msg_bytes);
    tlog(c, "+data %lu bytes bare_lf=%lu", c->msg_bytes, c->msg_bare_lf);
    sink_rule_t *r;
    if (g_conf.nrules && rule_find(c, R_DROP, V_DOT, NULL)) {
        c->after = AFTER_CLOSE;
        txn_reset(c);
        return;
    }
    if (g_conf.nrules && (r = rule_find(c, R_REPLY, V_DOT, NULL)) != NULL) {
        reply_rule(c, V_DOT, r);
        if (r->code >= 200 && r->code < 300)
            STAT_ADD(messages, 1);
    } else if (c->bdat_failed) {
        reply(c, V_DOT, 554, "5.5.0", "Error: earlier BDAT chunk failed");
    } else if (g_conf.size_limit && c->msg_bytes > g_conf.size_limit) {
        reply(c, V_DOT, 552, "5.3.4", "Error: message file too big");
    } else {
        unsigned long long qid = atomic_fetch_add_explicit(&g_msg_ids, 1, memory_order_relaxed) + 1;
        STAT_ADD(messages, 1);
        if (g_conf.maildir)
            maildir_store(c, qid);
        char text[64];
        snprintf(text, sizeof(text), "Ok: queued as S%010llX", qid);
        reply(c, V_DOT, 250, "2.0.0", text);
    }
    txn_reset(c);
}

/* DATA content: dot-unstuff line by line until the lone dot.
 * Returns 1 when the end was seen, 0 when more input is needed. */
static int data_feed(sink_conn_t *c)
{
    buf_t *in = stream_input(c->s);
    for (;;) {
        char *p = buf_head(in);
        size_t n = buf_size(in);
        if (n == 0)
            return 0;
        char *nl = memchr(p, '\n', n);
        size_t ll;
        if (nl == NULL) {
            if (n < SINK_DATA_LINE_MAX)
                return 0;
            /* an over-long line: take it in pieces, keep the last byte (a CR?) */
            ll = n - 1;
            STAT_ADD(long_lines, 1);
        } else {
            ll = (size_t)(nl - p) + 1;
        }
        int at_start = !c->mid_line;
        if (nl && at_start && p[0] == '.' && (ll == 2 || (ll == 3 && p[1] == '\r'))) {
            if (ll == 2)
                c->msg_bare_lf++;
            buf_consume(in, ll);
            return 1;
        }
        const char *q = p;
        size_t ql = ll;
        if (at_start && p[0] == '.') {
            q++;
            ql--;
        }
        if (nl) {
            if (ll < 2 || p[ll - 2] != '\r') {
                c->msg_bare_lf++;
                STAT_ADD(bare_lf_lines, 1);
            }
            if (!c->mid_line && ll > 1000)
                STAT_ADD(long_lines, 1);
            c->mid_line = 0;
        } else {
            c->mid_line = 1;
        }
        c->msg_bytes += ql;
        if (g_conf.maildir)
            buf_append(&c->msg, q, ql);
        buf_consume(in, ll);
    }
}

/* BDAT chunk bytes. Returns 1 when the chunk is complete. */
static int bdat_feed(sink_conn_t *c)
{
    buf_t *in = stream_input(c->s);
    size_t n = buf_size(in);
    if (n > c->bdat_left)
        n = c->bdat_left;
    c->msg_bytes += n;
    if (g_conf.maildir && !c->bdat_failed)
        buf_append(&c->msg, buf_head(in), n);
    buf_consume(in, n);
    c->bdat_left -= n;
    return c->bdat_left == 0;
}

/* ---- commands ------------------------------------------------------------------ */

/* "FROM:<addr> params" -> addr (without brackets) and params. 0 or -1. */
static int parse_path(const char *arg, const char *kw, char *addr, size_t addrlen, const char **params)
{
    if (!ieq_prefix(arg, kw))
        return -1;
    const char *p = arg + strlen(kw);
    while (*p == ' ')
        p++;
    const char *end;
    if (*p == '<') {
        end = strchr(p, '>');
        if (end == NULL)
            return -1;
        p++;
    } else {
        end = p + strcspn(p, " ");
    }
    size_t n = (size_t)(end - p);
    if (n >= addrlen)
        return -1;
    memcpy(addr, p, n);
    addr[n] = '\0';
    p = *end == '>' ? end + 1 : end;
    while (*p == ' ')
        p++;
    *params = p;
    return 0;
}

/* MAIL parameters: SIZE, BODY, SMTPUTF8, AUTH, RET, ENVID. */
static int check_mail_params(sink_conn_t *c, const char *params)
{
    char tmp[1024];
    snprintf(tmp, sizeof(tmp), "%s", params);
    char *save = NULL;
    for (char *t = strtok_r(tmp, " ", &save); t; t = strtok_r(NULL, " ", &save)) {
        if (ieq_prefix(t, "SIZE=")) {
            unsigned long sz = strtoul(t + 5, NULL, 10);
            if (g_conf.size_limit && sz > g_conf.size_limit) {
                reply(c, V_MAIL, 552, "5.3.4", "Message size exceeds fixed limit");
                return -1;
            }
        } else if (ieq_prefix(t, "BODY=")) {
            if (!g_conf.eightbit && util_strncasecmp(t + 5, "7BIT", 5) != 0) {
                reply(c, V_MAIL, 555, "5.5.4", "Unsupported option: BODY");
                return -1;
            }
        } else if (util_strncasecmp(t, "SMTPUTF8", 9) == 0) {
            if (!g_conf.smtputf8) {
                reply(c, V_MAIL, 555, "5.5.4", "Unsupported option: SMTPUTF8");
                return -1;
            }
        } else if (!ieq_prefix(t, "AUTH=") && !ieq_prefix(t, "RET=") && !ieq_prefix(t, "ENVID=")) {
            reply(c, V_MAIL, 555, "5.5.4", "Unsupported option");
            return -1;
        }
    }
    return 0;
}

static int b64_decode(const char *in, unsigned char *out, size_t outlen)
{
    size_t n = strlen(in);
    if (n == 0 || n % 4 != 0 || (n / 4) * 3 > outlen)
        return -1;
    int len = EVP_DecodeBlock(out, (const unsigned char *)in, (int)n);
    if (len < 0)
        return -1;
    if (in[n - 1] == '=')
        len--;
    if (in[n - 2] == '=')
        len--;
    return len;
}

static void auth_check(sink_conn_t *c, const char *user, size_t ulen, const char *pass, size_t plen)
{
    c->state = C_CMD;
    if (g_conf.auth_user && strlen(g_conf.auth_user) == ulen && memcmp(g_conf.auth_user, user, ulen) == 0 &&
        strlen(g_conf.auth_pass) == plen && memcmp(g_conf.auth_pass, pass, plen) == 0) {
        c->authed = 1;
        tlog(c, "+auth ok user=%.*s", (int)ulen, user);
        reply(c, V_AUTH, 235, "2.7.0", "Authentication successful");
    } else {
        tlog(c, "+auth failed user=%.*s", (int)ulen, user);
        reply(c, V_AUTH, 535, "5.7.8", "Error: authentication failed");
    }
}

static void auth_plain(sink_conn_t *c, const char *b64)
{
    unsigned char raw[1024];
    int n = b64_decode(b64, raw, sizeof(raw) - 1);
    if (n < 0) {
        c->state = C_CMD;
        reply(c, V_AUTH, 501, "5.5.2", "Error: invalid base64 data");
        return;
    }
    /* authzid NUL authcid NUL passwd */
    unsigned char *z1 = memchr(raw, '\0', (size_t)n);
    unsigned char *z2 = z1 ? memchr(z1 + 1, '\0', (size_t)(raw + n - z1 - 1)) : NULL;
    if (z2 == NULL) {
        c->state = C_CMD;
        reply(c, V_AUTH, 501, "5.5.2", "Error: malformed PLAIN response");
        return;
    }
    auth_check(c, (const char *)z1 + 1, (size_t)(z2 - z1 - 1), (const char *)z2 + 1,
               (size_t)(raw + n - z2 - 1));
}

static void auth_continue(sink_conn_t *c, const char *line)
{
    if (strcmp(line, "*") == 0) {
        c->state = C_CMD;
        free(c->auth_login_user);
        c->auth_login_user = NULL;
        reply(c, V_AUTH, 501, "5.7.0", "Authentication aborted");
        return;
    }
    if (c->state == C_AUTH_PLAIN) {
        auth_plain(c, line);
        return;
    }
    unsigned char raw[512];
    int n = b64_decode(line, raw, sizeof(raw) - 1);
    if (n < 0) {
        c->state = C_CMD;
        free(c->auth_login_user);
        c->auth_login_user = NULL;
        reply(c, V_AUTH, 501, "5.5.2", "Error: invalid base64 data");
        return;
    }
    raw[n] = '\0';
    if (c->state == C_AUTH_LOGIN_USER) {
        c->auth_login_user = xstrndup((const char *)raw, (size_t)n);
        c->state = C_AUTH_LOGIN_PASS;
        buf_puts(&c->w->out, "334 UGFzc3dvcmQ6\r\n");
        return;
    }
    auth_check(c, c->auth_login_user, strlen(c->auth_login_user), (const char *)raw, (size_t)n);
    free(c->auth_login_user);
    c->auth_login_user = NULL;
}

static void cmd_auth(sink_conn_t *c, const char *arg)
{
    if (!g_conf.auth) {
        reply(c, V_AUTH, 502, "5.5.1", "Error: authentication not enabled");
        return;
    }
    if (c->authed) {
        reply(c, V_AUTH, 503, "5.5.1", "Error: already authenticated");
        return;
    }
    if (c->in_mail) {
        reply(c, V_AUTH, 503, "5.5.1", "Error: MAIL transaction in progress");
        return;
    }
    const char *sp = strchr(arg, ' ');
    size_t mlen = sp ? (size_t)(sp - arg) : strlen(arg);
    const char *initial = sp ? sp + 1 : NULL;
    if (mlen == 5 && util_strncasecmp(arg, "PLAIN", 5) == 0) {
        if (initial && *initial && strcmp(initial, "=") != 0) {
            auth_plain(c, initial);
        } else {
            c->state = C_AUTH_PLAIN;
            buf_puts(&c->w->out, "334 \r\n");
        }
    } else if (mlen == 5 && util_strncasecmp(arg, "LOGIN", 5) == 0) {
        if (initial && *initial) {
            c->state = C_AUTH_LOGIN_USER;
            auth_continue(c, initial);
        } else {
            c->state = C_AUTH_LOGIN_USER;
            buf_puts(&c->w->out, "334 VXNlcm5hbWU6\r\n");
        }
    } else {
        reply(c, V_AUTH, 504, "5.5.4", "Error: unsupported authentication mechanism");
    }
}

static void cmd_rcpt(sink_conn_t *c, const char *arg)
{
    char addr[SINK_ADDR_MAX];
    const char *params;
    if (!c->in_mail) {
        reply(c, V_RCPT, 503, "5.5.1", "Error: need MAIL command");
        STAT_ADD(recipients_rejected, 1);
        return;
    }
    if (parse_path(arg, "TO:", addr, sizeof(addr), &params) < 0 || addr[0] == '\0') {
        reply(c, V_RCPT, 501, "5.1.3", "Bad recipient address syntax");
        STAT_ADD(recipients_rejected, 1);
        return;
    }
    sink_rule_t *r = NULL;
    if (g_conf.nrules && ((r = rule_find(c, R_RCPT, V_RCPT, addr)) != NULL ||
                          (r = rule_find(c, R_REPLY, V_RCPT, NULL)) != NULL)) {
        reply_rule(c, V_RCPT, r);
        if (r->code >= 200 && r->code < 300)
            goto accepted;
        STAT_ADD(recipients_rejected, 1);
        return;
    }
    reply(c, V_RCPT, 250, "2.1.5", "Ok");
accepted:
    STAT_ADD(recipients_accepted, 1);
    c->nrcpt_ok++;
    if (g_conf.maildir) {
        buf_puts(&c->rcpts, addr);
        buf_putc(&c->rcpts, '\n');
    }
}

static void cmd_bdat(sink_conn_t *c, const char *arg)
{
    char *end;
    unsigned long n = strtoul(arg, &end, 10);
    while (*end == ' ')
        end++;
    int last = util_strncasecmp(end, "LAST", 5) == 0;
    if (end == arg || (*end && !last)) {
        reply(c, V_BDAT, 501, "5.5.4", "Error: syntax BDAT size [LAST]");
        return;
    }
    /* the chunk follows whatever we answer: it must be read in any case */
    c->bdat_left = n;
    c->bdat_last = last;
    c->state = C_BDAT;
    if (!g_conf.chunking) {
        c->bdat_failed = 2;
    } else if (!c->in_mail || c->nrcpt_ok == 0) {
        c->bdat_failed = c->in_mail ? 3 : 2;
    }
}

/* The reply to a complete BDAT chunk. */
static void bdat_done(sink_conn_t *c)
{
    c->state = C_CMD;
    if (c->bdat_failed == 2) {
        reply(c, V_BDAT, 503, "5.5.1",
              g_conf.chunking ? "Error: need MAIL command" : "Error: command not recognized");
        c->bdat_failed = 0;
        return;
    }
    if (c->bdat_failed == 3) {
        reply(c, V_BDAT, 554, "5.5.1", "Error: no valid recipients");
        if (c->bdat_last)
            txn_reset(c);
        return;
    }
    if (c->bdat_last) {
        message_end(c);
        return;
    }
    sink_rule_t *r;
    if (g_conf.nrules && (r = rule_find(c, R_REPLY, V_BDAT, NULL)) != NULL) {
        reply_rule(c, V_BDAT, r);
        if (r->code >= 300)
            c->bdat_failed = 1;
        return;
    }
    char text[64];
    snprintf(text, sizeof(text), "Ok: %lu octets received", c->msg_bytes);
    reply(c, V_BDAT, 250, "2.0.0", text);
}

/* One command line (CRLF stripped). */
static void command(sink_conn_t *c, char *line)
{
    STAT_ADD(commands, 1);
    if (c->state == C_AUTH_PLAIN || c->state == C_AUTH_LOGIN_USER || c->state == C_AUTH_LOGIN_PASS) {
        tlog(c, "****");
        auth_continue(c, line);
        return;
    }
    size_t vlen = strcspn(line, " ");
    const char *arg = line + vlen;
    while (*arg == ' ')
        arg++;
    int v = verb_from_name(line, vlen);
    if (v < 0 || v == V_CONNECT || v == V_DOT)
        v = V_OTHER;
    if (g_conf.log) {
        if (v == V_AUTH && strchr(arg, ' '))
            tlog(c, "%.*s %.*s ****", (int)vlen, line, (int)strcspn(arg, " "), arg);
        else
            tlog(c, "%s", line);
    }
    if (c->state == C_NOSERVICE) {
        if (v == V_QUIT) {
            reply(c, V_QUIT, 221, "2.0.0", "Bye");
            c->after = AFTER_CLOSE;
        } else {
            reply(c, (sink_verb_t)v, 503, "5.5.1", "Error: no service");
        }
        return;
    }
    sink_rule_t *r;
    if (g_conf.nrules) {
        if (rule_find(c, R_DROP, (sink_verb_t)v, NULL)) {
            tlog(c, "+drop %s", verb_names[v]);
            c->after = AFTER_CLOSE;
            return;
        }
        /* RCPT's reply rules are per address: cmd_rcpt looks them up */
        if (v != V_RCPT && v != V_BDAT && (r = rule_find(c, R_REPLY, (sink_verb_t)v, NULL)) != NULL) {
            reply_rule(c, (sink_verb_t)v, r);
            if (v == V_QUIT)
                c->after = AFTER_CLOSE;
            return;
        }
    }
    switch ((sink_verb_t)v) {
    case V_EHLO:
    case V_HELO:
        if (*arg == '\0') {
            reply(c, (sink_verb_t)v, 501, "5.5.4", "Syntax: EHLO hostname");
            return;
        }
        txn_reset(c);
        c->helo = v == V_EHLO ? 2 : 1;
        if (v == V_EHLO)
            reply_ehlo(c, arg);
        else
            reply(c, V_HELO, 250, NULL, g_conf.hostname);
        return;
    case V_MAIL: {
        const char *params;
        if (!c->helo) {
            reply(c, V_MAIL, 503, "5.5.1", "Error: send HELO/EHLO first");
            return;
        }
        if (c->in_mail) {
            reply(c, V_MAIL, 503, "5.5.1", "Error: nested MAIL command");
            return;
        }
        if (parse_path(arg, "FROM:", c->mail_from, sizeof(c->mail_from), &params) < 0) {
            c->mail_from[0] = '\0';
            reply(c, V_MAIL, 501, "5.1.7", "Bad sender address syntax");
            return;
        }
        if (check_mail_params(c, params) < 0)
            return;
        c->in_mail = 1;
        reply(c, V_MAIL, 250, "2.1.0", "Ok");
        return;
    }
    case V_RCPT:
        cmd_rcpt(c, arg);
        return;
    case V_DATA:
        if (!c->in_mail) {
            reply(c, V_DATA, 503, "5.5.1", "Error: need RCPT command");
            return;
        }
        if (c->nrcpt_ok == 0) {
            reply(c, V_DATA, 554, "5.5.1", "Error: no valid recipients");
            return;
        }
        c->state = C_DATA;
        c->mid_line = 0;
        reply(c, V_DATA, 354, NULL, "End data with <CR><LF>.<CR><LF>");
        return;
    case V_BDAT:
        cmd_bdat(c, arg);
        return;
    case V_RSET:
        txn_reset(c);
        reply(c, V_RSET, 250, "2.0.0", "Ok");
        return;
    case V_NOOP:
        reply(c, V_NOOP, 250, "2.0.0", "Ok");
        return;
    case V_VRFY:
        reply(c, V_VRFY, 252, "2.0.0", "Cannot VRFY user");
        return;
    case V_QUIT:
        reply(c, V_QUIT, 221, "2.0.0", "Bye");
        c->after = AFTER_CLOSE;
        return;
    case V_STARTTLS:
        if (g_conf.tls == NULL || !g_conf.starttls) {
            reply(c, V_STARTTLS, 502, "5.5.1", "Error: command not implemented");
        } else if (stream_is_tls(c->s)) {
            reply(c, V_STARTTLS, 554, "5.5.1", "Error: TLS already active");
        } else if (*arg) {
            reply(c, V_STARTTLS, 501, "5.5.4", "Syntax: STARTTLS");
        } else {
            reply(c, V_STARTTLS, 220, "2.0.0", "Ready to start TLS");
            c->after = AFTER_STARTTLS;
        }
        return;
    case V_AUTH:
        cmd_auth(c, arg);
        return;
    default:
        reply(c, V_OTHER, 502, "5.5.2", "Error: command not recognized");
        return;
    }
}

/* ---- connection I/O ----------------------------------------------------------------- */

static void start_tls(sink_conn_t *c)
{
    buf_t *in = stream_input(c->s);
    if (buf_size(in) > 0) {
        /* commands pipelined after STARTTLS were never protected: discard
         * them, as Postfix does (CVE-2011-0411) */
        tlog(c, "+starttls discarded %zu plaintext bytes", buf_size(in));
        STAT_ADD(starttls_injection, 1);
        buf_consume(in, buf_size(in));
    }
    txn_reset(c);
    c->helo = 0;
    c->state = C_TLS;
    if (stream_tls_server(c->s, g_conf.tls) < 0) {
        STAT_ADD(tls_failed, 1);
        tlog(c, "+tls failed %s", stream_error(c->s));
        conn_free(c);
    }
}

/* Carry out c->after once the replies are out. Returns -1 if c is gone. */
static int do_after(sink_conn_t *c)
{
    sink_after_t a = c->after;
    if (a == AFTER_NONE || c->holding)
        return 0; /* a held reply goes first: conn_timer comes back here */
    if (a == AFTER_CLOSE) {
        if (stream_pending_out(c->s) == 0) {
            conn_free(c);
            return -1;
        }
        c->state = C_CLOSING;
        stream_pause_read(c->s, 1);
        return -1;
    }
    /* AFTER_STARTTLS: the 220 must be on the wire before the handshake */
    if (stream_pending_out(c->s) > 0)
        return -1; /* DRAINED resumes */
    c->after = AFTER_NONE;
    start_tls(c);
    return -1;
}

/* Handle every complete command / content in the input, in order, then
 * write all replies at once. Returns -1 if c was freed. */
static int conn_process(sink_conn_t *c)
{
    buf_t *in = stream_input(c->s);
    while (!c->holding && c->after == AFTER_NONE) {
        if (c->state == C_DATA) {
            if (!data_feed(c))
                break;
            c->state = C_CMD;
            message_end(c);
            continue;
        }
        if (c->state == C_BDAT) {
            if (!bdat_feed(c))
                break;
            bdat_done(c);
            continue;
        }
        if (c->state != C_CMD && c->state != C_NOSERVICE && c->state != C_AUTH_PLAIN &&
            c->state != C_AUTH_LOGIN_USER && c->state != C_AUTH_LOGIN_PASS)
            break;
        size_t ll = buf_line_len(in);
        if (ll == 0) {
            if (buf_size(in) > SINK_CMD_LINE_MAX) {
                buf_consume(in, buf_size(in));
                reply(c, V_OTHER, 500, "5.5.0", "Error: line too long");
                c->after = AFTER_CLOSE;
            }
            break;
        }
        char *line = buf_head(in);
        size_t n = ll - 1;
        if (n > 0 && line[n - 1] == '\r')
            n--;
        if (ll > SINK_CMD_LINE_MAX) {
            buf_consume(in, ll);
            reply(c, V_OTHER, 500, "5.5.0", "Error: line too long");
            continue;
        }
        char cmd[SINK_CMD_LINE_MAX + 1];
        memcpy(cmd, line, n);
        cmd[n] = '\0';
        buf_consume(in, ll);
        command(c, cmd);
    }
    /* between commands a connection may idle for minutes: give back the
     * stream's 32 KiB read buffer (the next read allocates it again) */
    if (buf_size(in) == 0 && c->state == C_CMD)
        buf_free(in);
    flush(c);
    return do_after(c);
}

static void conn_free(sink_conn_t *c)
{
    sink_worker_t *w = c->w;
    tlog(c, "+close");
    loop_timer_cancel(w->loop, &c->timer);
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    stream_free(c->s); /* safe inside the stream's own callback */
    buf_free(&c->held);
    buf_free(&c->msg);
    buf_free(&c->rcpts);
    free(c->auth_login_user);
    free(c);
    STAT_SUB(connections_open, 1);
}

static void send_greeting(sink_conn_t *c)
{
    sink_rule_t *r;
    if (g_conf.nrules && rule_find(c, R_DROP, V_CONNECT, NULL)) {
        tlog(c, "+drop CONNECT");
        conn_free(c);
        return;
    }
    c->state = C_CMD;
    if (g_conf.nrules && (r = rule_find(c, R_REPLY, V_CONNECT, NULL)) != NULL) {
        reply_rule(c, V_CONNECT, r);
        if (r->code >= 400)
            c->state = C_NOSERVICE;
    } else if (g_conf.banner) {
        buf_printf(&c->w->out, "%s\r\n", g_conf.banner);
        int code = atoi(g_conf.banner);
        if (code == 421)
            c->after = AFTER_CLOSE;
        else if (code >= 400)
            c->state = C_NOSERVICE;
    } else {
        char text[300];
        snprintf(text, sizeof(text), "%s ESMTP smtpsink", g_conf.hostname);
        reply(c, V_CONNECT, 220, NULL, text);
    }
    conn_process(c);
}

static void conn_timer(loop_t *loop, loop_timer_t *t, void *arg)
{
    (void)loop;
    (void)t;
    sink_conn_t *c = arg;
    if (c->state == C_GREETING) {
        send_greeting(c);
        return;
    }
    if (c->holding) {
        if (c->drip_ms && c->drip_off + 1 < buf_size(&c->held)) {
            stream_write(c->s, buf_head(&c->held) + c->drip_off, 1);
            c->drip_off++;
            loop_timer_set(c->w->loop, &c->timer, c->drip_ms);
            return;
        }
        c->holding = 0;
        stream_write(c->s, buf_head(&c->held) + c->drip_off, buf_size(&c->held) - c->drip_off);
        buf_free(&c->held);
        c->drip_ms = 0;
        c->drip_off = 0;
        conn_process(c);
    }
}

static void conn_on_event(stream_t *s, stream_event_t ev, void *arg)
{
    (void)s;
    sink_conn_t *c = arg;
    switch (ev) {
    case STREAM_EV_DATA:
        if (c->state == C_GREETING || c->state == C_CLOSING || c->state == C_TLS)
            return;
        conn_process(c);
        return;
    case STREAM_EV_TLS_READY: {
        int resumed = stream_tls_resumed(c->s);
        STAT_ADD(tls_handshakes, 1);
        if (resumed)
            STAT_ADD(tls_resumed, 1);
        tlog(c, "+tls %s %s resumed=%d", stream_tls_version(c->s), stream_tls_cipher(c->s), resumed);
        c->state = C_CMD;
        conn_process(c);
        return;
    }
    case STREAM_EV_DRAINED:
        if (c->state == C_CLOSING) {
            conn_free(c);
        } else if (c->after == AFTER_STARTTLS) {
            do_after(c);
        }
        return;
    case STREAM_EV_ERROR:
        if (c->state == C_TLS)
            STAT_ADD(tls_failed, 1);
        tlog(c, "+error %s", stream_error(c->s));
        conn_free(c);
        return;
    case STREAM_EV_TIMEOUT:
    case STREAM_EV_CLOSED:
    default:
        tlog(c, "+%s", stream_event_name(ev));
        conn_free(c);
        return;
    }
}

static void on_accept(loop_t *loop, int lfd, unsigned events, void *arg)
{
    (void)events;
    sink_worker_t *w = arg;
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
                fprintf(stderr, "smtpsink: accept: %s\n", strerror(errno));
            return;
        }
        sink_conn_t *c = xcalloc(1, sizeof(*c));
        c->w = w;
        c->id = atomic_fetch_add_explicit(&g_conn_ids, 1, memory_order_relaxed) + 1;
        c->state = C_GREETING;
        loop_timer_init(&c->timer, conn_timer, c);
        c->s = stream_new(loop, conn_on_event, c);
        if (stream_attach(c->s, fd) < 0) {
            stream_free(c->s);
            free(c);
            continue;
        }
        c->next = w->conns;
        if (w->conns)
            w->conns->prev = c;
        w->conns = c;
        STAT_ADD(connections, 1);
        unsigned long long open = STAT_ADD(connections_open, 1) + 1;
        unsigned long long peak = STAT_GET(open_peak);
        while (open > peak && !atomic_compare_exchange_weak_explicit(&g_stats.open_peak, &peak, open,
                                                                      memory_order_relaxed,
                                                                      memory_order_relaxed))
            ;
        int port = 0;
        if (ss.ss_family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
            c->peer_af = AF_INET;
            memcpy(c->peer, &sin->sin_addr, 4);
            port = ntohs(sin->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
            c->peer_af = AF_INET6;
            memcpy(c->peer, &sin6->sin6_addr, 16);
            port = ntohs(sin6->sin6_port);
        }
        if (c->peer_af == 0 || inet_ntop(c->peer_af, c->peer, c->peer_text, sizeof(c->peer_text)) == NULL)
            c->peer_text[0] = '\0';
        if (g_conf.log) {
            const char *host = c->peer_text[0] ? c->peer_text : "?";
            tlog(c, "+connect %s:%d thread=%d", host, port, w->index);
            /* the address that sent: "PEER 127.0.0.2:40312", "PEER [::1]:40312" */
            tlog(c, c->peer_af == AF_INET6 ? "PEER [%s]:%d" : "PEER %s:%d", host, port);
        }
        if (g_conf.timeout_ms)
            stream_set_timeout(c->s, g_conf.timeout_ms);
        /* delay:CONNECT is applied by reply() like any other delay rule */
        if (g_conf.greeting_delay_ms)
            loop_timer_set(loop, &c->timer, g_conf.greeting_delay_ms);
        else
            send_greeting(c);
    }
}

/* ---- stats --------------------------------------------------------------------------- */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void stats_print(FILE *f)
{
    unsigned long long hs = STAT_GET(tls_handshakes), res = STAT_GET(tls_resumed);
    fprintf(f,
            "{\"connections\":%llu,\"connections_open\":%llu,\"open\":%llu,\"open_peak\":%llu,"
            "\"tls_handshakes\":%llu,"
            "\"tls_resumed\":%llu,\"tls_full\":%llu,\"tls_failed\":%llu,\"messages\":%llu,"
            "\"recipients_accepted\":%llu,\"recipients_rejected\":%llu,\"bytes\":%llu,"
            "\"commands\":%llu,\"bare_lf_lines\":%llu,\"long_lines\":%llu,"
            "\"starttls_injection\":%llu,\"rules\":[",
            STAT_GET(connections), STAT_GET(connections_open), STAT_GET(connections_open),
            STAT_GET(open_peak), hs, res, hs - res, STAT_GET(tls_failed),
            STAT_GET(messages), STAT_GET(recipients_accepted), STAT_GET(recipients_rejected),
            STAT_GET(bytes), STAT_GET(commands), STAT_GET(bare_lf_lines), STAT_GET(long_lines),
            STAT_GET(starttls_injection));
    for (size_t i = 0; i < g_conf.nrules; i++) {
        fprintf(f, "%s{\"rule\":", i ? "," : "");
        json_str(f, g_conf.rules[i].spec);
        fprintf(f, ",\"fired\":%lu}", atomic_load(&g_conf.rules[i].fired));
    }
    fputs("]}\n", f);
}

static void stats_write(void)
{
    if (g_conf.stats_file == NULL)
        return;
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp%d", g_conf.stats_file, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (f == NULL) {
        fprintf(stderr, "smtpsink: %s: %s\n", tmp, strerror(errno));
        return;
    }
    stats_print(f);
    if (fclose(f) != 0 || rename(tmp, g_conf.stats_file) != 0) {
        fprintf(stderr, "smtpsink: %s: %s\n", g_conf.stats_file, strerror(errno));
        unlink(tmp);
    }
}

/* ---- threads, signals, set-up ------------------------------------------------------- */

static void worker_shutdown(loop_t *loop, void *arg)
{
    sink_worker_t *w = arg;
    if (!atomic_load(&w->stop))
        return;
    for (int i = 0; i < w->nlfd; i++) {
        loop_fd_del(loop, w->lfd[i]);
        close(w->lfd[i]);
    }
    w->nlfd = 0;
    while (w->conns)
        conn_free(w->conns);
    loop_stop(loop);
}

static void *worker_main(void *arg)
{
    sink_worker_t *w = arg;
    loop_run(w->loop);
    return NULL;
}

static int listen_on(const sink_listen_t *l, int reuseport)
{
    int fd = socket(l->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&l->sa, l->salen) < 0)
        die("bind %s: %s", l->text, strerror(errno));
    if (listen(fd, 4096) < 0)
        die("listen %s: %s", l->text, strerror(errno));
    return fd;
}

static void parse_listen(sink_conf_t *conf, const char *spec)
{
    if (conf->nlisten >= SINK_MAX_LISTEN)
        die("too many --listen");
    char host[256];
    const char *port;
    if (spec[0] == '[') {
        const char *rb = strchr(spec, ']');
        if (rb == NULL || rb[1] != ':')
            die("--listen %s: expected [ADDR]:PORT", spec);
        snprintf(host, sizeof(host), "%.*s", (int)(rb - spec - 1), spec + 1);
        port = rb + 2;
    } else {
        const char *colon = strrchr(spec, ':');
        if (colon == NULL)
            die("--listen %s: expected ADDR:PORT", spec);
        snprintf(host, sizeof(host), "%.*s", (int)(colon - spec), spec);
        port = colon + 1;
    }
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof(hints));
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        die("--listen %s: %s", spec, gai_strerror(rc));
    sink_listen_t *l = &conf->listen[conf->nlisten++];
    memcpy(&l->sa, res->ai_addr, res->ai_addrlen);
    l->salen = res->ai_addrlen;
    snprintf(l->text, sizeof(l->text), "%s", spec);
    freeaddrinfo(res);
}

static void usage(FILE *f)
{
    fputs(
        "usage: smtpsink --listen ADDR:PORT [options]\n"
        "\n"
        "A fast SMTP receiver that can be told to misbehave. Test tool: it accepts\n"
        "any sender and recipient unless a rule says otherwise.\n"
        "\n"
        "listening\n"
        "  --listen ADDR:PORT     listen there (repeatable; [::1]:PORT for IPv6; port 0 = any)\n"
        "  --threads N            N threads, each with its own loop and SO_REUSEPORT listener (1)\n"
        "  --hostname NAME        name in the greeting and EHLO reply (smtpsink.test)\n"
        "  --timeout MS           close a connection idle this long (300000; 0 = never)\n"
        "TLS\n"
        "  --cert FILE --key FILE certificate chain and key: offer STARTTLS. To present a\n"
        "                         certificate that fails verification, pass one with another\n"
        "                         name or from another CA.\n"
        "capabilities (EHLO keywords)\n"
        "  --no-pipelining --no-starttls --no-enhanced --no-8bitmime\n"
        "  --size N               advertise SIZE N and refuse larger messages (552 5.3.4)\n"
        "  --smtputf8 --chunking  advertise SMTPUTF8 / CHUNKING (BDAT)\n"
        "  --auth                 advertise AUTH PLAIN LOGIN\n"
        "  --auth-user U:P        the one accepted login (implies --auth)\n"
        "faults\n"
        "  --greeting-delay MS    wait before the greeting\n"
        "  --banner \"554 go away\" greeting line; 421 hangs up, other 4xx/5xx serve only QUIT\n"
        "  --rule RULE            (repeatable) and --rules FILE (one rule per line, # comments):\n"
        "    rcpt:PATTERN=CODE [X.Y.Z] TEXT  reply to RCPT TO:<addr> when addr matches the\n"
        "                           case-insensitive glob PATTERN (rcpt:*@full.example=552 ...)\n"
        "    cmd:VERB=CODE [X.Y.Z] TEXT      reply to VERB instead; code 421 hangs up after it\n"
        "    drop:VERB                       close the connection instead of replying\n"
        "    delay:VERB=MS                   hold the reply to VERB for MS milliseconds\n"
        "    delay:VERB=MIN-MAX              ... for a time drawn uniformly in [MIN,MAX] ms, per reply\n"
        "    drip:VERB=MS                    tarpit: send the reply to VERB one byte every MS ms\n"
        "                                    (after any delay; with multiline:VERB it is longer)\n"
        "    multiline:VERB                  answer VERB with a multi-line reply\n"
        "  VERB: CONNECT (the greeting), EHLO, HELO, MAIL, RCPT, DATA, DOT (end of data,\n"
        "  also \"dot\"; includes BDAT LAST), BDAT, RSET, NOOP, QUIT, STARTTLS, AUTH, VRFY.\n"
        "  A #N after the target fires the rule only N times (cmd:MAIL#1=421 4.3.2 bye).\n"
        "  A %N after the target fires it only on every Nth connection (the Nth, 2Nth, ...\n"
        "  accepted): cmd:CONNECT%2=421 4.7.0 try later refuses every second connection.\n"
        "  Both may be given (cmd:CONNECT%2#10=421 ...: the first 10 of those).\n"
        "  The first matching rule of each kind wins.\n"
        "  --reply-from IP:STAGE:CODE [X.Y.Z] TEXT\n"
        "                         (repeatable) clients connecting from IP ([IPv6]:STAGE:... for\n"
        "                         IPv6) get this reply at STAGE: greeting, mail, rcpt, data (the\n"
        "                         DATA command) or dot (end of data); 421 closes the connection\n"
        "                         after it. Another address is served as usual. Like a cmd: rule,\n"
        "                         given in order with the --rule ones (the first that matches wins):\n"
        "                         --reply-from \"127.0.0.2:mail:421 4.7.0 [TS01] Messages from\n"
        "                         127.0.0.2 temporarily deferred\"\n"
        "counting and keeping\n"
        "  --stats-file FILE      JSON counters, rewritten every second, on SIGUSR1 and at exit:\n"
        "                         connections, open (now; also connections_open), open_peak,\n"
        "                         tls_handshakes (all), tls_resumed, tls_full, messages,\n"
        "                         recipients_accepted/rejected, bytes, bare_lf_lines, rules[].fired ...\n"
        "  --maildir DIR          keep each accepted message in DIR/new, the envelope prepended as\n"
        "                         X-Sink-Mail-From / X-Sink-Rcpt-To headers, then\n"
        "                         X-Sink-Connection: <conn-id> [tls] and X-Smtpsink-Peer: <client ip>\n"
        "  --log FILE             transcript: one line per command, \"<conn-id> <command>\"\n"
        "                         (AUTH secrets masked); \"<conn-id> +event ...\" for connect, tls,\n"
        "                         data, drop, close; at each accept also \"<conn-id> PEER <ip>:<port>\"\n"
        "                         ([ip]:port for IPv6)\n"
        "  --quiet                no start-up / exit lines on stdout\n"
        "\n"
        "Prints \"smtpsink: ready ADDR:PORT ...\" on stdout once listening. SIGTERM/SIGINT close\n"
        "every connection, print the counters and exit 0.\n",
        f);
}

enum {
    O_LISTEN = 256, O_THREADS, O_HOSTNAME, O_TIMEOUT, O_CERT, O_KEY, O_NOPIPE, O_NOTLS, O_NOENH,
    O_NO8BIT, O_SIZE, O_UTF8, O_CHUNKING, O_AUTH, O_AUTHUSER, O_GDELAY, O_BANNER, O_RULE, O_RULES, O_REPLYFROM,
    O_STATS, O_MAILDIR, O_LOG, O_QUIET, O_HELP
};

static void parse_args(sink_conf_t *conf, int argc, char **argv)
{
    static const struct option opts[] = {
        { "listen", 1, NULL, O_LISTEN }, { "threads", 1, NULL, O_THREADS },
        { "hostname", 1, NULL, O_HOSTNAME }, { "timeout", 1, NULL, O_TIMEOUT },
        { "cert", 1, NULL, O_CERT }, { "key", 1, NULL, O_KEY },
        { "no-pipelining", 0, NULL, O_NOPIPE }, { "no-starttls", 0, NULL, O_NOTLS },
        { "no-enhanced", 0, NULL, O_NOENH }, { "no-8bitmime", 0, NULL, O_NO8BIT },
        { "size", 1, NULL, O_SIZE }, { "smtputf8", 0, NULL, O_UTF8 },
        { "chunking", 0, NULL, O_CHUNKING }, { "auth", 0, NULL, O_AUTH },
        { "auth-user", 1, NULL, O_AUTHUSER }, { "greeting-delay", 1, NULL, O_GDELAY },
        { "banner", 1, NULL, O_BANNER }, { "rule", 1, NULL, O_RULE }, { "rules", 1, NULL, O_RULES },
        { "reply-from", 1, NULL, O_REPLYFROM },
        { "stats-file", 1, NULL, O_STATS }, { "maildir", 1, NULL, O_MAILDIR },
        { "log", 1, NULL, O_LOG }, { "quiet", 0, NULL, O_QUIET }, { "help", 0, NULL, O_HELP },
        { NULL, 0, NULL, 0 },
    };
    conf->threads = 1;
    conf->hostname = "smtpsink.test";
    conf->timeout_ms = 300000;
    conf->pipelining = conf->starttls = conf->enhanced = conf->eightbit = 1;
    int o;
    char *end;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case O_LISTEN: parse_listen(conf, optarg); break;
        case O_THREADS:
            conf->threads = (int)strtol(optarg, &end, 10);
            if (*end || conf->threads < 1 || conf->threads > SINK_MAX_THREADS)
                die("--threads: 1..%d", SINK_MAX_THREADS);
            break;
        case O_HOSTNAME: conf->hostname = optarg; break;
        case O_TIMEOUT: conf->timeout_ms = (unsigned)strtoul(optarg, NULL, 10); break;
        case O_CERT: conf->cert = optarg; break;
        case O_KEY: conf->key = optarg; break;
        case O_NOPIPE: conf->pipelining = 0; break;
        case O_NOTLS: conf->starttls = 0; break;
        case O_NOENH: conf->enhanced = 0; break;
        case O_NO8BIT: conf->eightbit = 0; break;
        case O_SIZE:
            conf->size_limit = strtoul(optarg, &end, 10);
            if (*end)
                die("--size: a number of octets");
            break;
        case O_UTF8: conf->smtputf8 = 1; break;
        case O_CHUNKING: conf->chunking = 1; break;
        case O_AUTH: conf->auth = 1; break;
        case O_AUTHUSER: {
            const char *colon = strchr(optarg, ':');
            if (colon == NULL)
                die("--auth-user: expected USER:PASSWORD");
            conf->auth_user = xstrndup(optarg, (size_t)(colon - optarg));
            conf->auth_pass = xstrdup(colon + 1);
            conf->auth = 1;
            break;
        }
        case O_GDELAY: conf->greeting_delay_ms = (unsigned)strtoul(optarg, NULL, 10); break;
        case O_BANNER:
            if (strlen(optarg) < 3 || !isdigit((unsigned char)optarg[0]) || strpbrk(optarg, "\r\n"))
                die("--banner: expected \"CODE text\"");
            conf->banner = optarg;
            break;
        case O_RULE: rule_add(conf, optarg); break;
        case O_RULES: rules_load(conf, optarg); break;
        case O_REPLYFROM: reply_from_add(conf, optarg); break;
        case O_STATS: conf->stats_file = optarg; break;
        case O_MAILDIR: conf->maildir = optarg; break;
        case O_LOG:
            conf->log = strcmp(optarg, "-") == 0 ? stderr : fopen(optarg, "a");
            if (conf->log == NULL)
                die("--log %s: %s", optarg, strerror(errno));
            setvbuf(conf->log, NULL, _IOLBF, 0);
            break;
        case O_QUIET: conf->quiet = 1; break;
        case O_HELP:
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc)
        die("unexpected argument \"%s\" (see --help)", argv[optind]);
    if (conf->nlisten == 0)
        die("--listen ADDR:PORT is required (see --help)");
    if (conf->key && !conf->cert)
        die("--key without --cert");
    if (conf->cert) {
        char err[512];
        conf->tls = tls_server_ctx_new(conf->cert, conf->key ? conf->key : conf->cert, err, sizeof(err));
        if (conf->tls == NULL)
            die("%s", err);
        /* resumption: OpenSSL's server session cache and tickets are on by
         * default; an id context makes cached sessions usable across SSLs */
        SSL_CTX_set_session_id_context(conf->tls, (const unsigned char *)"smtpsink", 8);
    }
    if (conf->maildir) {
        const char *subs[] = { "", "/tmp", "/new", "/cur" };
        for (size_t i = 0; i < 4; i++) {
            char p[4096];
            snprintf(p, sizeof(p), "%s%s", conf->maildir, subs[i]);
            if (mkdir(p, 0755) < 0 && errno != EEXIST)
                die("mkdir %s: %s", p, strerror(errno));
        }
    }
}

typedef struct sink_main {
    loop_t      *loop;
    int          sfd;
    loop_timer_t stats_timer;
} sink_main_t;

static void stats_tick(loop_t *loop, loop_timer_t *t, void *arg)
{
    (void)arg;
    stats_write();
    loop_timer_set(loop, t, 1000);
}

static void on_signal(loop_t *loop, int fd, unsigned events, void *arg)
{
    (void)events;
    sink_main_t *m = arg;
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
        if (si.ssi_signo == SIGUSR1) {
            stats_write();
            continue;
        }
        /* SIGTERM / SIGINT: every worker closes its listeners and connections */
        loop_fd_del(loop, fd);
        loop_timer_cancel(loop, &m->stats_timer);
        for (int i = 0; i < g_conf.threads; i++) {
            atomic_store(&g_workers[i].stop, 1);
            loop_wakeup(g_workers[i].loop);
        }
        return;
    }
}

int main(int argc, char **argv)
{
    parse_args(&g_conf, argc, argv);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* inherited by the threads */
    signal(SIGPIPE, SIG_IGN);

    int reuseport = g_conf.threads > 1;
    for (int i = 0; i < g_conf.threads; i++) {
        sink_worker_t *w = &g_workers[i];
        w->index = i;
        w->conf = &g_conf;
        w->loop = loop_new();
        if (w->loop == NULL)
            die("loop_new: %s", strerror(errno));
        loop_set_wakeup(w->loop, worker_shutdown, w);
        for (int j = 0; j < g_conf.nlisten; j++) {
            sink_listen_t *l = &g_conf.listen[j];
            int fd = listen_on(l, reuseport);
            if (i == 0 && reuseport) {
                /* port 0: the other threads must bind the port the first one got */
                struct sockaddr_storage got;
                socklen_t gl = sizeof(got);
                getsockname(fd, (struct sockaddr *)&got, &gl);
                memcpy(&l->sa, &got, gl);
                l->salen = gl;
            }
            w->lfd[w->nlfd++] = fd;
            loop_fd_add(w->loop, fd, LOOP_READ, on_accept, w);
        }
    }

    sink_main_t m;
    memset(&m, 0, sizeof(m));
    m.loop = g_workers[0].loop;
    m.sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (m.sfd < 0)
        die("signalfd: %s", strerror(errno));
    loop_fd_add(m.loop, m.sfd, LOOP_READ, on_signal, &m);
    loop_timer_init(&m.stats_timer, stats_tick, &m);
    if (g_conf.stats_file) {
        stats_write();
        loop_timer_set(m.loop, &m.stats_timer, 1000);
    }

    if (!g_conf.quiet) {
        printf("smtpsink: ready");
        for (int j = 0; j < g_conf.nlisten; j++) {
            struct sockaddr_storage got;
            socklen_t gl = sizeof(got);
            char host[INET6_ADDRSTRLEN] = "?";
            int port = 0;
            getsockname(g_workers[0].lfd[j], (struct sockaddr *)&got, &gl);
            if (got.ss_family == AF_INET) {
                inet_ntop(AF_INET, &((struct sockaddr_in *)&got)->sin_addr, host, sizeof(host));
                port = ntohs(((struct sockaddr_in *)&got)->sin_port);
                printf(" %s:%d", host, port);
            } else {
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&got)->sin6_addr, host, sizeof(host));
                port = ntohs(((struct sockaddr_in6 *)&got)->sin6_port);
                printf(" [%s]:%d", host, port);
            }
        }
        printf(" threads=%d tls=%s\n", g_conf.threads, g_conf.tls ? "yes" : "no");
        fflush(stdout);
    }

    for (int i = 1; i < g_conf.threads; i++)
        if (pthread_create(&g_workers[i].thread, NULL, worker_main, &g_workers[i]) != 0)
            die("pthread_create: %s", strerror(errno));
    loop_run(m.loop);
    for (int i = 1; i < g_conf.threads; i++)
        pthread_join(g_workers[i].thread, NULL);

    close(m.sfd);
    stats_write();
    if (!g_conf.quiet) {
        printf("smtpsink: exit ");
        stats_print(stdout);
        fflush(stdout);
    }
    for (int i = 0; i < g_conf.threads; i++) {
        buf_free(&g_workers[i].out);
        loop_free(g_workers[i].loop);
    }
    if (g_conf.tls)
        SSL_CTX_free(g_conf.tls);
    for (size_t i = 0; i < g_conf.nrules; i++) {
        free(g_conf.rules[i].pattern);
        free(g_conf.rules[i].enh);
        free(g_conf.rules[i].text);
        free(g_conf.rules[i].spec);
    }
    free(g_conf.rules);
    free(g_conf.auth_user);
    free(g_conf.auth_pass);
    if (g_conf.log && g_conf.log != stderr)
        fclose(g_conf.log);
    return 0;
}

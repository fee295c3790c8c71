/*
 * SUMMARY
 *  cli/stress_cmd.c - `mailpump stress`: load the whole path (broker,
 *  workers, DNS, SMTP, IMAP, events) and measure it from the outside.
 * DESCRIPTION
 *  One connection, one channel. The events exchange is subscribed first,
 *  so no event of the run can be missed; then --count messages are
 *  published persistent with publisher confirms, paced by a token bucket
 *  (--rate) and at most --window unconfirmed at a time. Confirms and
 *  events arrive on the same channel and are read by one loop
 *  (mp_client_pump), so reading events never waits behind a confirm or
 *  the other way round.
 *
 *  Every message id is "stress-<runid>-<n>"; events of other runs and
 *  other traffic on the exchange are skipped without being parsed. A
 *  message is complete when it was dead-lettered, or every recipient has
 *  its final event (delivered or bounced; deferred only counts a retry)
 *  and, with --append and at least one recipient delivered, its Sent copy
 *  is reported (appended, or append_failed without retry_in_ms). The run
 *  ends when every confirmed message is complete or at --timeout.
 *
 *  Latencies run from the wall-clock time the confirm was read to the
 *  event's own "ts" (the worker's clock, ms), so a busy reader does not
 *  inflate them. The worker publishes a message's delivered events after
 *  its Sent copy is stored, so both latencies include the APPEND.
 * DIAGNOSTICS
 *  Exit 0 when every message was published and complete with expected
 *  outcomes; 1 when any is missing or unpublished, the connection failed,
 *  or (unless --allow-failures) a recipient bounced, a message was
 *  dead-lettered or a Sent copy failed; 2 on bad usage.
 */
#include "cli/stress_cmd.h"

#include <getopt.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "cli/client.h"
#include "core/buf.h"
#include "core/message.h"
#include "core/util.h"
#include "queue/msgjson.h"

/* ---- percentiles ---- */

uint64_t stress_percentile(const uint64_t *sorted, size_t n, unsigned p)
{
    size_t rank = (size_t)(((unsigned long long)p * n + 99) / 100);
    if (rank == 0)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

void stress_pcts_compute(uint64_t *v, size_t n, stress_pcts_t *out)
{
    memset(out, 0, sizeof(*out));
    if (n == 0)
        return;
    qsort(v, n, sizeof(*v), u64_cmp);
    out->n = n;
    out->p50 = stress_percentile(v, n, 50);
    out->p90 = stress_percentile(v, n, 90);
    out->p99 = stress_percentile(v, n, 99);
    out->max = v[n - 1];
}

/* ---- rolling latencies ---- */

void stress_window_init(stress_window_t *w, uint64_t window_ms, size_t cap)
{
    memset(w, 0, sizeof(*w));
    w->window_ms = window_ms;
    w->cap = cap ? cap : 1;
    w->at_ms = xcalloc(w->cap, sizeof(*w->at_ms));
    w->val = xcalloc(w->cap, sizeof(*w->val));
    w->tmp = xcalloc(w->cap, sizeof(*w->tmp));
}

void stress_window_free(stress_window_t *w)
{
    free(w->at_ms);
    free(w->val);
    free(w->tmp);
    memset(w, 0, sizeof(*w));
}

void stress_window_add(stress_window_t *w, uint64_t at_ms, uint64_t val)
{
    w->at_ms[w->head] = at_ms;
    w->val[w->head] = val;
    w->head = (w->head + 1) % w->cap;
    if (w->n < w->cap)
        w->n++;
}

void stress_window_pcts(stress_window_t *w, uint64_t now_ms, stress_pcts_t *out)
{
    /* drop the oldest that left the window; samples are added in time order */
    while (w->n > 0) {
        size_t oldest = (w->head + w->cap - w->n) % w->cap;
        if (w->at_ms[oldest] + w->window_ms > now_ms)
            break;
        w->n--;
    }
    size_t k = 0;
    for (size_t i = 0; i < w->n; i++) {
        size_t slot = (w->head + w->cap - w->n + i) % w->cap;
        if (w->at_ms[slot] <= now_ms)
            w->tmp[k++] = w->val[slot];
    }
    stress_pcts_compute(w->tmp, k, out);
}

/* ---- token bucket ---- */

#define TOKEN 1000000ULL /* millionths */

void stress_bucket_init(stress_bucket_t *b, uint64_t rate, uint64_t burst, uint64_t now_us)
{
    b->rate = rate;
    b->cap = (burst ? burst : 1) * TOKEN;
    b->level = b->cap;
    b->last_us = now_us;
}

uint64_t stress_bucket_take(stress_bucket_t *b, uint64_t now_us)
{
    if (b->rate == 0)
        return 0;
    uint64_t elapsed = now_us > b->last_us ? now_us - b->last_us : 0;
    b->last_us = now_us > b->last_us ? now_us : b->last_us;
    /* rate tokens/s = rate millionths/us; compare before multiplying so a
     * long pause cannot overflow */
    if (elapsed >= (b->cap - b->level) / b->rate + 1)
        b->level = b->cap;
    else
        b->level += elapsed * b->rate;
    if (b->level > b->cap)
        b->level = b->cap;
    if (b->level >= TOKEN) {
        b->level -= TOKEN;
        return 0;
    }
    return (TOKEN - b->level + b->rate - 1) / b->rate;
}

/* ---- run-tagged ids ---- */

void stress_runid_new(char out[STRESS_RUNID_LEN + 1])
{
    snprintf(out, STRESS_RUNID_LEN + 1, "%012llx",
             (unsigned long long)(util_rand64() & 0xffffffffffffULL));
}

void stress_id_format(char *out, size_t outlen, const char *runid, size_t n)
{
    snprintf(out, outlen, "stress-%s-%zu", runid, n);
}

long stress_id_match(const char *id, const char *runid, size_t count)
{
    static const char prefix[] = "stress-";
    size_t rl = strlen(runid);
    if (strncmp(id, prefix, sizeof(prefix) - 1) != 0)
        return -1;
    id += sizeof(prefix) - 1;
    if (strncmp(id, runid, rl) != 0 || id[rl] != '-')
        return -1;
    id += rl + 1;
    if (*id < '1' || *id > '9')
        return -1;
    unsigned long long n = 0;
    for (size_t i = 0; id[i]; i++) {
        if (id[i] < '0' || id[i] > '9' || i >= 18)
            return -1;
        n = n * 10 + (unsigned)(id[i] - '0');
    }
    if (n > count)
        return -1;
    return (long)(n - 1);
}

/* ---- events ---- */

stress_ev_t stress_event_kind(const char *event, int has_retry_in)
{
    static const struct {
        const char *name;
        stress_ev_t kind;
    } names[] = {
        { "delivered", STRESS_EV_DELIVERED }, { "bounced", STRESS_EV_BOUNCED },
        { "deferred", STRESS_EV_DEFERRED },   { "dead", STRESS_EV_DEAD },
        { "appended", STRESS_EV_APPENDED },   { "append_failed", STRESS_EV_APPEND_FAILED },
        { "suppressed", STRESS_EV_SUPPRESSED },
    };
    if (event == NULL)
        return STRESS_EV_OTHER;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(event, names[i].name) != 0)
            continue;
        if (names[i].kind == STRESS_EV_APPEND_FAILED && has_retry_in)
            return STRESS_EV_APPEND_RETRY;
        return names[i].kind;
    }
    return STRESS_EV_OTHER;
}

uint64_t stress_parse_ts(const char *ts)
{
    /* exactly what queue/event.c writes: YYYY-MM-DDTHH:MM:SS.mmmZ */
    static const char shape[] = "dddd-dd-ddTdd:dd:dd.dddZ";
    if (ts == NULL || strlen(ts) != sizeof(shape) - 1)
        return 0;
    for (size_t i = 0; shape[i]; i++) {
        if (shape[i] == 'd' ? (ts[i] < '0' || ts[i] > '9') : ts[i] != shape[i])
            return 0;
    }
    int v[7];
    static const int off[7] = { 0, 5, 8, 11, 14, 17, 20 };
    static const int len[7] = { 4, 2, 2, 2, 2, 2, 3 };
    for (int i = 0; i < 7; i++) {
        v[i] = 0;
        for (int k = 0; k < len[i]; k++)
            v[i] = v[i] * 10 + (ts[off[i] + k] - '0');
    }
    if (v[1] < 1 || v[1] > 12 || v[2] < 1 || v[2] > 31 || v[3] > 23 || v[4] > 59 || v[5] > 60)
        return 0;
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    tm.tm_year = v[0] - 1900;
    tm.tm_mon = v[1] - 1;
    tm.tm_mday = v[2];
    tm.tm_hour = v[3];
    tm.tm_min = v[4];
    tm.tm_sec = v[5];
    time_t t = timegm(&tm);
    if (t < 0)
        return 0;
    return (uint64_t)t * 1000 + (uint64_t)v[6];
}

/* ---- the tally ---- */

enum { R_PENDING = 0, R_DELIVERED, R_BOUNCED, R_SUPPRESSED };
enum { A_PENDING = 0, A_APPENDED, A_FAILED };

typedef struct stress_msg {
    uint64_t confirm_us; /* 0: not confirmed */
    uint64_t append_ms;  /* ts of the appended event */
    uint32_t ndone;      /* recipients with a final event */
    uint32_t ndelivered;
    uint8_t  dead;
    uint8_t  append;     /* A_* */
    uint8_t  settled;    /* counted in r->ncomplete */
} stress_msg_t;

typedef struct rcpt_ix {
    char  *addr;
    size_t idx; /* position in the message's recipient list */
} rcpt_ix_t;

struct stress_run {
    char          runid[STRESS_RUNID_LEN + 1];
    char          tag[STRESS_RUNID_LEN + 9]; /* "stress-<runid>-" */
    size_t        count;
    size_t        nrcpts;
    int           want_append;
    rcpt_ix_t    *rcpts;   /* sorted by address, case-insensitively */
    stress_msg_t *msgs;    /* count */
    uint8_t      *rstate;  /* count * nrcpts, R_* */
    uint64_t     *rts;     /* count * nrcpts, ts of the delivered event */
    size_t        nconfirmed;
    size_t        ncomplete; /* confirmed and complete */
    size_t        delivered, bounced, dead, retried, appended, append_failed, duplicates;
    size_t        deferred, suppressed;
    uint64_t      last_delivered_ms;
    stress_window_t recent;  /* confirm to final recipient event, ms */
    size_t          nreasons;
    stress_reason_t reasons[STRESS_REASONS];
};

static int rcpt_ix_cmp(const void *a, const void *b)
{
    return strcasecmp(((const rcpt_ix_t *)a)->addr, ((const rcpt_ix_t *)b)->addr);
}

stress_run_t *stress_run_new(const char *runid, size_t count, const char *const *rcpts,
                             size_t nrcpts, int want_append)
{
    stress_run_t *r = xcalloc(1, sizeof(*r));
    snprintf(r->runid, sizeof(r->runid), "%s", runid);
    snprintf(r->tag, sizeof(r->tag), "stress-%s-", r->runid);
    r->count = count;
    r->nrcpts = nrcpts;
    r->want_append = want_append;
    r->rcpts = xcalloc(nrcpts ? nrcpts : 1, sizeof(*r->rcpts));
    for (size_t i = 0; i < nrcpts; i++) {
        r->rcpts[i].addr = xstrdup(rcpts[i]);
        r->rcpts[i].idx = i;
    }
    qsort(r->rcpts, nrcpts, sizeof(*r->rcpts), rcpt_ix_cmp);
    r->msgs = xcalloc(count ? count : 1, sizeof(*r->msgs));
    size_t cells = count * nrcpts;
    r->rstate = xcalloc(cells ? cells : 1, 1);
    r->rts = xcalloc(cells ? cells : 1, sizeof(*r->rts));
    stress_window_init(&r->recent, STRESS_RECENT_MS, 65536);
    return r;
}

void stress_run_free(stress_run_t *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->nrcpts; i++)
        free(r->rcpts[i].addr);
    free(r->rcpts);
    free(r->msgs);
    free(r->rstate);
    free(r->rts);
    stress_window_free(&r->recent);
    free(r);
}

static int msg_complete(const stress_run_t *r, const stress_msg_t *m)
{
    if (m->dead)
        return 1;
    if (m->ndone < r->nrcpts)
        return 0;
    return !r->want_append || m->ndelivered == 0 || m->append != A_PENDING;
}

/* Count a message once it is both confirmed and complete, whichever of
 * the two came last (an event can beat its confirm). */
static void msg_settle(stress_run_t *r, stress_msg_t *m)
{
    if (!m->settled && m->confirm_us && msg_complete(r, m)) {
        m->settled = 1;
        r->ncomplete++;
    }
}

void stress_run_confirmed(stress_run_t *r, size_t idx, uint64_t confirm_us)
{
    if (idx >= r->count)
        return;
    stress_msg_t *m = &r->msgs[idx];
    if (m->confirm_us)
        return;
    m->confirm_us = confirm_us ? confirm_us : 1;
    r->nconfirmed++;
    msg_settle(r, m);
}

size_t stress_run_missing(const stress_run_t *r)
{
    return r->nconfirmed - r->ncomplete;
}

static long rcpt_find(const stress_run_t *r, const char *addr)
{
    rcpt_ix_t key = { (char *)addr, 0 };
    const rcpt_ix_t *hit = bsearch(&key, r->rcpts, r->nrcpts, sizeof(*r->rcpts), rcpt_ix_cmp);
    return hit ? (long)hit->idx : -1;
}

static const char *jstr(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* confirm (us) to event (ms), rounded to the nearest ms; an event stamped
 * before the confirm was read counts as 0 */
static uint64_t latency_ms(uint64_t confirm_us, uint64_t event_ms)
{
    uint64_t ev_us = event_ms * 1000;
    return ev_us > confirm_us ? (ev_us - confirm_us + 500) / 1000 : 0;
}

/* Count a bounce or a deferral under its reason tag and reply code. */
static void count_reason(stress_run_t *r, const char *event, json_t *o)
{
    const char *reason = jstr(o, "reason");
    char code[24] = "-";
    json_t *smtp = json_object_get(o, "smtp");
    json_t *jc = json_object_get(smtp, "code");
    if (json_is_integer(jc)) {
        const char *enh = jstr(smtp, "enhanced");
        if (enh && *enh)
            snprintf(code, sizeof(code), "%d %.16s", (int)json_integer_value(jc), enh);
        else
            snprintf(code, sizeof(code), "%d", (int)json_integer_value(jc));
    }
    if (reason == NULL || *reason == '\0' || strlen(reason) >= sizeof(r->reasons[0].reason))
        reason = "other";
    for (size_t i = 0; i < r->nreasons; i++) {
        stress_reason_t *e = &r->reasons[i];
        if (strcmp(e->event, event) == 0 && strcmp(e->reason, reason) == 0 &&
            strcmp(e->code, code) == 0) {
            e->n++;
            return;
        }
    }
    if (r->nreasons == STRESS_REASONS) {
        /* the last slot gathers what no longer fits */
        stress_reason_t *e = &r->reasons[STRESS_REASONS - 1];
        snprintf(e->reason, sizeof(e->reason), "other");
        snprintf(e->code, sizeof(e->code), "-");
        e->n++;
        return;
    }
    stress_reason_t *e = &r->reasons[r->nreasons++];
    snprintf(e->event, sizeof(e->event), "%s", event);
    snprintf(e->reason, sizeof(e->reason), "%s", reason);
    snprintf(e->code, sizeof(e->code), "%s", code);
    e->n = 1;
}

int stress_run_event(stress_run_t *r, const char *body, size_t len, uint64_t recv_ms)
{
    /* the exchange may carry far more than this run: skip without parsing */
    if (memmem(body, len, r->tag, strlen(r->tag)) == NULL)
        return 0;
    json_error_t je;
    json_t *o = json_loadb(body, len, 0, &je);
    if (!json_is_object(o)) {
        json_decref(o);
        return -1;
    }
    int rc = 0;
    const char *id = jstr(o, "message_id");
    long idx = id ? stress_id_match(id, r->runid, r->count) : -1;
    if (idx < 0)
        goto out;
    json_t *retry = json_object_get(o, "retry_in_ms");
    int has_retry = json_is_integer(retry) && json_integer_value(retry) > 0;
    stress_ev_t kind = stress_event_kind(jstr(o, "event"), has_retry);
    uint64_t ts = stress_parse_ts(jstr(o, "ts"));
    if (ts == 0)
        ts = recv_ms;
    stress_msg_t *m = &r->msgs[idx];
    switch (kind) {
    case STRESS_EV_DELIVERED:
    case STRESS_EV_BOUNCED:
    case STRESS_EV_SUPPRESSED: {
        const char *rcpt = jstr(o, "recipient");
        long ri = rcpt ? rcpt_find(r, rcpt) : -1;
        if (ri < 0)
            goto out;
        size_t cell = (size_t)idx * r->nrcpts + (size_t)ri;
        rc = 1;
        if (r->rstate[cell] != R_PENDING) {
            r->duplicates++;
            goto out;
        }
        m->ndone++;
        if (m->confirm_us)
            stress_window_add(&r->recent, recv_ms, latency_ms(m->confirm_us, ts));
        if (kind == STRESS_EV_DELIVERED) {
            r->rstate[cell] = R_DELIVERED;
            r->rts[cell] = ts;
            m->ndelivered++;
            r->delivered++;
            if (ts > r->last_delivered_ms)
                r->last_delivered_ms = ts;
        } else if (kind == STRESS_EV_SUPPRESSED) {
            r->rstate[cell] = R_SUPPRESSED;
            r->suppressed++;
        } else {
            r->rstate[cell] = R_BOUNCED;
            r->bounced++;
            count_reason(r, "bounced", o);
        }
        break;
    }
    case STRESS_EV_DEFERRED:
        r->deferred++;
        count_reason(r, "deferred", o);
        /* fall through */
    case STRESS_EV_APPEND_RETRY:
        r->retried++;
        rc = 1;
        break;
    case STRESS_EV_DEAD:
        rc = 1;
        if (m->dead) {
            r->duplicates++;
            goto out;
        }
        m->dead = 1;
        r->dead++;
        break;
    case STRESS_EV_APPENDED:
    case STRESS_EV_APPEND_FAILED:
        rc = 1;
        if (m->append != A_PENDING) {
            r->duplicates++;
            goto out;
        }
        if (kind == STRESS_EV_APPENDED) {
            m->append = A_APPENDED;
            m->append_ms = ts;
            r->appended++;
        } else {
            m->append = A_FAILED;
            r->append_failed++;
        }
        break;
    default:
        goto out;
    }
    msg_settle(r, m);
out:
    json_decref(o);
    return rc;
}

void stress_run_progress(stress_run_t *r, uint64_t now_ms, stress_progress_t *out)
{
    memset(out, 0, sizeof(*out));
    out->count = r->count;
    out->published = r->nconfirmed;
    out->delivered = r->delivered;
    out->bounced = r->bounced;
    out->deferred = r->deferred;
    out->in_flight = r->nconfirmed - r->ncomplete;
    stress_window_pcts(&r->recent, now_ms, &out->recent);
}

void stress_progress_format(char *out, size_t outlen, const stress_progress_t *p)
{
    char p50[24] = "-", p99[24] = "-";
    if (p->recent.n) {
        snprintf(p50, sizeof(p50), "%llums", (unsigned long long)p->recent.p50);
        snprintf(p99, sizeof(p99), "%llums", (unsigned long long)p->recent.p99);
    }
    snprintf(out, outlen,
             "stress %.1fs published %zu/%zu delivered %zu bounced %zu deferred %zu "
             "in_flight %zu rate %.1f/s avg %.1f/s p50 %s p99 %s",
             p->elapsed_s, p->published, p->count, p->delivered, p->bounced, p->deferred,
             p->in_flight, p->rate, p->avg_rate, p50, p99);
}

static int reason_cmp(const void *a, const void *b)
{
    const stress_reason_t *x = a, *y = b;
    int c = strcmp(x->event, y->event); /* "bounced" before "deferred" */
    if (c == 0)
        c = strcmp(x->reason, y->reason);
    if (c == 0)
        c = strcmp(x->code, y->code);
    return c;
}

static void describe_missing(const stress_run_t *r, const stress_msg_t *m, char *out, size_t len)
{
    size_t left = r->nrcpts - m->ndone;
    int sent_copy = r->want_append && m->ndelivered > 0 && m->append == A_PENDING;
    if (left && sent_copy)
        snprintf(out, len, "%zu of %zu recipients, the Sent copy", left, r->nrcpts);
    else if (left)
        snprintf(out, len, "%zu of %zu recipients", left, r->nrcpts);
    else
        snprintf(out, len, "the Sent copy");
}

void stress_run_report(const stress_run_t *r, uint64_t start_us, uint64_t last_confirm_us,
                       stress_report_t *out)
{
    memset(out, 0, sizeof(*out));
    snprintf(out->run_id, sizeof(out->run_id), "%s", r->runid);
    out->count = r->count;
    out->nrcpts = r->nrcpts;
    out->want_append = r->want_append;
    out->delivered = r->delivered;
    out->bounced = r->bounced;
    out->dead = r->dead;
    out->retried = r->retried;
    out->appended = r->appended;
    out->append_failed = r->append_failed;
    out->suppressed = r->suppressed;
    out->duplicates = r->duplicates;
    size_t ndel = 0, napp = 0;
    uint64_t *del = xcalloc(r->delivered + 1, sizeof(*del));
    uint64_t *app = xcalloc(r->appended + 1, sizeof(*app));
    for (size_t i = 0; i < r->count; i++) {
        const stress_msg_t *m = &r->msgs[i];
        if (m->confirm_us == 0)
            continue;
        out->published++;
        if (!msg_complete(r, m)) {
            out->missing++;
            if (out->nshown < STRESS_SHOWN) {
                stress_id_format(out->shown[out->nshown].id, sizeof(out->shown[0].id), r->runid,
                                 i + 1);
                describe_missing(r, m, out->shown[out->nshown].what, sizeof(out->shown[0].what));
                out->nshown++;
            }
        }
        for (size_t k = 0; k < r->nrcpts; k++) {
            size_t cell = i * r->nrcpts + k;
            if (r->rstate[cell] == R_DELIVERED && ndel < r->delivered)
                del[ndel++] = latency_ms(m->confirm_us, r->rts[cell]);
        }
        if (m->append == A_APPENDED && napp < r->appended)
            app[napp++] = latency_ms(m->confirm_us, m->append_ms);
    }
    out->unpublished = r->count - out->published;
    if (out->published) {
        double total = (double)out->published * (double)(r->nrcpts ? r->nrcpts : 1);
        out->failure_rate = (double)(r->bounced + r->dead) / total;
        if (out->failure_rate > 1)
            out->failure_rate = 1;
    }
    out->nreasons = r->nreasons;
    memcpy(out->reasons, r->reasons, r->nreasons * sizeof(r->reasons[0]));
    qsort(out->reasons, out->nreasons, sizeof(out->reasons[0]), reason_cmp);
    stress_pcts_compute(del, ndel, &out->lat_delivered);
    stress_pcts_compute(app, napp, &out->lat_appended);
    free(del);
    free(app);
    if (out->published && last_confirm_us > start_us) {
        out->publish_s = (double)(last_confirm_us - start_us) / 1e6;
        out->publish_rate = (double)out->published / out->publish_s;
    }
    if (r->delivered && r->last_delivered_ms * 1000 > start_us) {
        out->deliver_s = (double)(r->last_delivered_ms * 1000 - start_us) / 1e6;
        out->delivered_per_s = (double)r->delivered / out->deliver_s;
    }
}

/* non-negative v rounded to 1/scale (no libm for one rounding) */
static json_t *jreal(double v, double scale)
{
    return json_real((double)(long long)(v * scale + 0.5) / scale);
}

static json_t *jpcts(const stress_pcts_t *p)
{
    json_t *o = json_object();
    json_object_set_new(o, "count", json_integer((json_int_t)p->n));
    const char *keys[] = { "p50", "p90", "p99", "max" };
    const uint64_t vals[] = { p->p50, p->p90, p->p99, p->max };
    for (size_t i = 0; i < 4; i++)
        json_object_set_new(o, keys[i], p->n ? json_integer((json_int_t)vals[i]) : json_null());
    return o;
}

char *stress_report_json(const stress_report_t *rep)
{
    json_t *o = json_object();
    json_object_set_new(o, "run_id", json_string(rep->run_id));
    json_object_set_new(o, "count", json_integer((json_int_t)rep->count));
    json_object_set_new(o, "recipients_per_message", json_integer((json_int_t)rep->nrcpts));
    json_object_set_new(o, "append", json_boolean(rep->want_append));
    const struct {
        const char *key;
        size_t      v;
    } counts[] = {
        { "published", rep->published },   { "unpublished", rep->unpublished },
        { "delivered", rep->delivered },   { "bounced", rep->bounced },
        { "dead", rep->dead },             { "retried", rep->retried },
        { "appended", rep->appended },     { "append_failed", rep->append_failed },
        { "suppressed", rep->suppressed },
        { "duplicates", rep->duplicates }, { "missing", rep->missing },
    };
    for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++)
        json_object_set_new(o, counts[i].key, json_integer((json_int_t)counts[i].v));
    json_object_set_new(o, "publish_s", jreal(rep->publish_s, 1000));
    json_object_set_new(o, "publish_rate", jreal(rep->publish_rate, 10));
    json_object_set_new(o, "deliver_s", jreal(rep->deliver_s, 1000));
    json_object_set_new(o, "delivered_per_s", jreal(rep->delivered_per_s, 10));
    json_t *lat = json_object();
    json_object_set_new(lat, "delivered", jpcts(&rep->lat_delivered));
    json_object_set_new(lat, "appended", jpcts(&rep->lat_appended));
    json_object_set_new(o, "latency_ms", lat);
    json_object_set_new(o, "timed_out", json_boolean(rep->timed_out));
    json_object_set_new(o, "failure_rate", jreal(rep->failure_rate, 10000));
    /* {"bounced":[{"reason":"no_such_user","count":12,"codes":{"550 5.1.1":12}}],
     *  "deferred":[...]}; rep->reasons is sorted by event, reason, code */
    json_t *bd = json_object();
    json_object_set_new(bd, "bounced", json_array());
    json_object_set_new(bd, "deferred", json_array());
    json_t *cur = NULL;
    for (size_t i = 0; i < rep->nreasons; i++) {
        const stress_reason_t *e = &rep->reasons[i];
        json_t *arr = json_object_get(bd, e->event);
        if (arr == NULL)
            continue;
        if (i == 0 || strcmp(e->event, rep->reasons[i - 1].event) != 0 ||
            strcmp(e->reason, rep->reasons[i - 1].reason) != 0) {
            cur = json_object();
            json_object_set_new(cur, "reason", json_string(e->reason));
            json_object_set_new(cur, "count", json_integer(0));
            json_object_set_new(cur, "codes", json_object());
            json_array_append_new(arr, cur);
        }
        json_t *jn = json_object_get(cur, "count");
        json_integer_set(jn, json_integer_value(jn) + (json_int_t)e->n);
        json_object_set_new(json_object_get(cur, "codes"), e->code, json_integer((json_int_t)e->n));
    }
    json_object_set_new(o, "breakdown", bd);
    json_t *shown = json_array();
    for (size_t i = 0; i < rep->nshown; i++) {
        json_t *s = json_object();
        json_object_set_new(s, "id", json_string(rep->shown[i].id));
        json_object_set_new(s, "waiting_for", json_string(rep->shown[i].what));
        json_array_append_new(shown, s);
    }
    json_object_set_new(o, "missing_first", shown);
    char *s = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(15));
    json_decref(o);
    if (s == NULL)
        abort(); /* only on OOM: core policy */
    return s;
}

static void print_pcts(FILE *f, const char *name, const stress_pcts_t *p)
{
    if (p->n == 0)
        fprintf(f, "  %-14s %8s %8s %8s %8s\n", name, "-", "-", "-", "-");
    else
        fprintf(f, "  %-14s %8llu %8llu %8llu %8llu\n", name, (unsigned long long)p->p50,
                (unsigned long long)p->p90, (unsigned long long)p->p99,
                (unsigned long long)p->max);
}

/* "bounced: no_such_user 12 (550 5.1.1: 12)", one line per event and
 * reason; rep->reasons is sorted by event, reason, code */
static void print_reasons(FILE *f, const stress_report_t *rep)
{
    for (size_t i = 0; i < rep->nreasons;) {
        const stress_reason_t *e = &rep->reasons[i];
        size_t k = i, total = 0;
        while (k < rep->nreasons && strcmp(rep->reasons[k].event, e->event) == 0 &&
               strcmp(rep->reasons[k].reason, e->reason) == 0)
            total += rep->reasons[k++].n;
        fprintf(f, "%s: %s %zu (", e->event, e->reason, total);
        for (size_t j = i; j < k; j++)
            fprintf(f, "%s%s: %zu", j > i ? ", " : "", rep->reasons[j].code, rep->reasons[j].n);
        fprintf(f, ")\n");
        i = k;
    }
}

void stress_report_print(FILE *f, const stress_report_t *rep)
{
    fprintf(f, "mailpump stress: run %s, %zu messages x %zu recipient%s%s\n", rep->run_id,
            rep->count, rep->nrcpts, rep->nrcpts == 1 ? "" : "s",
            rep->want_append ? ", Sent copies awaited" : "");
    fprintf(f, "published      %8zu of %zu in %.3f s (%.1f msg/s)\n", rep->published, rep->count,
            rep->publish_s, rep->publish_rate);
    fprintf(f, "delivered      %8zu recipients (%.1f/s over %.3f s)\n", rep->delivered,
            rep->delivered_per_s, rep->deliver_s);
    fprintf(f, "bounced        %8zu\n", rep->bounced);
    fprintf(f, "dead           %8zu\n", rep->dead);
    fprintf(f, "retried        %8zu\n", rep->retried);
    fprintf(f, "appended       %8zu\n", rep->appended);
    fprintf(f, "append_failed  %8zu\n", rep->append_failed);
    if (rep->suppressed)
        fprintf(f, "suppressed     %8zu\n", rep->suppressed);
    if (rep->duplicates)
        fprintf(f, "duplicates     %8zu\n", rep->duplicates);
    fprintf(f, "missing        %8zu%s\n", rep->missing, rep->timed_out ? " (timed out)" : "");
    if (rep->unpublished)
        fprintf(f, "unpublished    %8zu (refused, unconfirmed or not sent)\n", rep->unpublished);
    fprintf(f, "latency ms           p50      p90      p99      max\n");
    print_pcts(f, "delivered", &rep->lat_delivered);
    print_pcts(f, "appended", &rep->lat_appended);
    fprintf(f, "failure rate   %7.2f%% (bounced + dead / recipients published)\n",
            rep->failure_rate * 100);
    print_reasons(f, rep);
    for (size_t i = 0; i < rep->nshown; i++)
        fprintf(f, "missing %s: waiting for %s\n", rep->shown[i].id, rep->shown[i].what);
    if (rep->missing > rep->nshown)
        fprintf(f, "missing ... and %zu more\n", rep->missing - rep->nshown);
}

/* ---- the command ---- */

void stress_cmd_usage(FILE *f)
{
    fprintf(f,
            "Usage: mailpump [GLOBAL OPTIONS] stress --from ADDR (--to ADDR... | --to-domain DOMAIN)\n"
            "                [OPTIONS]\n"
            "\n"
            "Subscribes to the events exchange, publishes --count messages with publisher\n"
            "confirms, waits until each reached its final events (delivered, bounced,\n"
            "suppressed or dead; deferred counts as a retry) and, with --append, its Sent copy\n"
            "(appended or append_failed), then prints a report. Message ids are\n"
            "stress-<runid>-<n>; other traffic on the exchange is ignored.\n"
            "\n"
            "  -n, --count N          messages to publish (default 100)\n"
            "  -r, --rate R           publish at most R messages/s (default 0: as fast as\n"
            "                         confirms allow)\n"
            "  -w, --window N         unconfirmed publishes in flight (default 64; 1 waits\n"
            "                         for each confirm), and at most 2 MB of their bodies\n"
            "      --from ADDR        sender\n"
            "      --to ADDR          recipient of every message (repeatable)\n"
            "      --to-domain DOMAIN recipients user1..userK@DOMAIN\n"
            "  -k, --recipients K     K for --to-domain (default 1)\n"
            "  -s, --size BYTES       text body padded to about BYTES (default 1024)\n"
            "      --subject TEXT     subject (default \"mailpump stress\")\n"
            "  -p, --priority N       AMQP priority 0-10 (default: none)\n"
            "      --tenant NAME      the messages' tenant\n"
            "      --tenants N        spread the messages over the tenants t0..tN-1, in turn\n"
            "                         (instead of --tenant)\n"
            "      --campaign NAME    the messages' campaign\n"
            "      --pool NAME        the messages' egress pool\n"
            "  -a, --append           the sender has an IMAP account: wait for Sent copies\n"
            "  -t, --timeout SEC      give up SEC seconds after the first publish\n"
            "                         (default 120) and report what is missing\n"
            "      --allow-failures   bounced, dead and failed Sent copies do not fail the run\n"
            "      --json             print the report as one JSON object\n"
            "      --progress-interval SEC\n"
            "                         without a terminal on stderr, a progress line every\n"
            "                         SEC seconds there (default 5; 0: none); on a\n"
            "                         terminal a status line redrawn every second (0: none)\n"
            "  -h, --help             this text\n"
            "\n"
            "Report: published (confirmed), publish rate, delivered and bounced\n"
            "(recipients), dead, retried, appended, append_failed, missing (published\n"
            "messages without their final outcome), delivered/s from the first publish\n"
            "to the last delivered event, and p50/p90/p99/max latency in ms from the\n"
            "confirm to the delivered and appended events (the events' own ts), the\n"
            "failure rate (bounced + dead over the recipients published), and bounces\n"
            "and deferrals by reason and reply code:\n"
            "  bounced: no_such_user 12 (550 5.1.1: 12)\n"
            "Progress lines (standard error):\n"
            "  stress 12.0s published 340/500 delivered 300 bounced 10 deferred 2\n"
            "  in_flight 30 rate 45.0/s avg 28.3/s p50 120ms p99 480ms\n"
            "(one line; rate: delivered + bounced per second since the previous line,\n"
            "avg: since the first publish, p50/p99: ms from confirm to the final\n"
            "event over the last 5 s).\n"
            "Exit 0 when everything reached an expected outcome, 1 when anything is\n"
            "missing or unpublished or (without --allow-failures) bounced, dead or\n"
            "not appended, 2 on bad usage.\n");
}

typedef struct stress_opts {
    size_t        count;
    unsigned long rate;
    size_t        window;
    const char   *from;
    const char  **to;
    size_t        nto;
    const char   *to_domain;
    size_t        recipients;
    size_t        size;
    const char   *subject;
    int           priority;
    const char   *tenant;
    size_t        tenants;   /* > 0: message n has tenant t<(n - 1) % tenants> */
    const char   *campaign;
    const char   *pool;
    int           append;
    unsigned      timeout_s;
    int           allow_failures;
    int           json;
    unsigned      progress_s; /* without a terminal: a line every progress_s; 0 = off */
    int           tty;        /* stderr is a terminal: one status line, redrawn every second */
} stress_opts_t;

/* Unsigned decimal in [lo, hi]; -1 otherwise. */
static int parse_num(const char *s, unsigned long long lo, unsigned long long hi,
                     unsigned long long *out)
{
    char *end;
    if (s[0] < '0' || s[0] > '9')
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

/* Pipeline state of the publishing loop (the confirm callback's arg). */
typedef struct stress_ctx {
    stress_run_t *run;
    uint8_t      *pstate; /* per message: P_* */
    uint64_t      first_seq;
    size_t        nsent;
    size_t        low;    /* no index below it awaits a confirm */
    size_t        outstanding;
    uint64_t      last_confirm_us;
    uint64_t      next_progress_ms; /* monotonic; 0 = no progress output */
    uint64_t      prev_progress_ms;
    size_t        prev_finals;      /* delivered + bounced at the previous line */
    int           status_shown;     /* a terminal status line is on screen */
} stress_ctx_t;

enum { P_UNSENT = 0, P_SENT, P_CONFIRMED, P_REFUSED };

static uint64_t clock_us(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static void on_confirm(void *arg, uint64_t seq, int multiple, int ok)
{
    stress_ctx_t *c = arg;
    if (c->nsent == 0 || seq < c->first_seq || seq - c->first_seq >= c->nsent)
        return;
    uint64_t now = clock_us(CLOCK_REALTIME);
    size_t hi = (size_t)(seq - c->first_seq);
    for (size_t i = multiple ? c->low : hi; i <= hi; i++) {
        if (c->pstate[i] != P_SENT)
            continue;
        c->outstanding--;
        c->pstate[i] = ok ? P_CONFIRMED : P_REFUSED;
        if (ok)
            stress_run_confirmed(c->run, i, now);
    }
    while (c->low < c->nsent && c->pstate[c->low] != P_SENT)
        c->low++;
    c->last_confirm_us = now;
}

static void on_event(void *arg, const char *body, size_t len)
{
    stress_ctx_t *c = arg;
    stress_run_event(c->run, body, len, clock_us(CLOCK_REALTIME) / 1000);
}

/* The live status: on a terminal one line redrawn in place, else a plain
 * line every --progress-interval seconds. */
static void progress(stress_ctx_t *c, const stress_opts_t *o, uint64_t start_us, uint64_t now_mono)
{
    uint64_t now_us = clock_us(CLOCK_REALTIME);
    stress_progress_t p;
    stress_run_progress(c->run, now_us / 1000, &p);
    p.elapsed_s = now_us > start_us ? (double)(now_us - start_us) / 1e6 : 0;
    size_t finals = p.delivered + p.bounced;
    uint64_t dt = now_mono - c->prev_progress_ms;
    p.rate = dt ? (double)(finals - c->prev_finals) * 1000.0 / (double)dt : 0;
    p.avg_rate = p.elapsed_s > 0 ? (double)finals / p.elapsed_s : 0;
    c->prev_finals = finals;
    c->prev_progress_ms = now_mono;
    char line[512];
    stress_progress_format(line, sizeof(line), &p);
    if (o->tty) {
        fprintf(stderr, "\r%s\033[K", line);
        c->status_shown = 1;
    } else {
        fprintf(stderr, "%s\n", line);
    }
    fflush(stderr);
    c->next_progress_ms = now_mono + (o->tty ? 1000 : (uint64_t)o->progress_s * 1000);
}

/* Erase the terminal status line before anything else goes to stderr. */
static void progress_clear(stress_ctx_t *c)
{
    if (c->status_shown) {
        fprintf(stderr, "\r\033[K");
        fflush(stderr);
        c->status_shown = 0;
    }
}

/* The message every publish sends, its id replaced each time. */
static json_t *build_template(const stress_opts_t *o, const char *runid)
{
    json_t *m = json_object();
    json_object_set_new(m, "from", json_string(o->from));
    json_t *to = json_array();
    for (size_t i = 0; i < o->nto; i++)
        json_array_append_new(to, json_string(o->to[i]));
    for (size_t i = 1; o->to_domain && i <= o->recipients; i++) {
        char addr[320];
        snprintf(addr, sizeof(addr), "user%zu@%s", i, o->to_domain);
        json_array_append_new(to, json_string(addr));
    }
    json_object_set_new(m, "to", to);
    json_object_set_new(m, "subject", json_string(o->subject));
    buf_t text = BUF_INIT;
    char line[128];
    snprintf(line, sizeof(line), "mailpump stress run %s\n", runid);
    buf_puts(&text, line);
    /* 72 printable characters a line: 7bit, far below 998 octets */
    for (size_t n = 0; buf_size(&text) < o->size; n++) {
        snprintf(line, sizeof(line), "%06zu ", n);
        buf_puts(&text, line);
        for (size_t k = 7; k < 72; k++)
            buf_putc(&text, (char)('a' + (n + k) % 26));
        buf_putc(&text, '\n');
    }
    json_object_set_new(m, "text", json_stringn(buf_head(&text), buf_size(&text)));
    buf_free(&text);
    json_t *hdrs = json_object();
    json_object_set_new(hdrs, "X-Mailpump-Stress", json_string(runid));
    json_object_set_new(m, "headers", hdrs);
    char trace[64];
    snprintf(trace, sizeof(trace), "stress-%s", runid);
    json_object_set_new(m, "trace_id", json_string(trace));
    if (o->tenant)
        json_object_set_new(m, "tenant", json_string(o->tenant));
    if (o->campaign)
        json_object_set_new(m, "campaign", json_string(o->campaign));
    if (o->pool)
        json_object_set_new(m, "pool", json_string(o->pool));
    return m;
}

void stress_tenant_format(char *out, size_t outlen, size_t tenants, size_t n)
{
    snprintf(out, outlen, "t%zu", (n - 1) % tenants);
}

/* Message n (1..count) of the run; with tenants > 0 its tenant is
 * stress_tenant_format()'s. */
static char *message_body(json_t *tmpl, const char *runid, size_t n, size_t tenants)
{
    char id[64];
    stress_id_format(id, sizeof(id), runid, n);
    json_object_set_new(tmpl, "id", json_string(id));
    if (tenants > 0) {
        char t[32];
        stress_tenant_format(t, sizeof(t), tenants, n);
        json_object_set_new(tmpl, "tenant", json_string(t));
    }
    char *s = json_dumps(tmpl, JSON_COMPACT);
    if (s == NULL)
        abort(); /* only on OOM: core policy */
    return s;
}

/* Publish and follow. Returns 0, or -1 with err when the connection failed
 * (what was counted until then is still reported). */
static int stress_loop(mp_client_t *cl, const stress_opts_t *o, const char *runid, json_t *tmpl,
                       stress_ctx_t *c, uint64_t *start_us, int *timed_out, char *err,
                       size_t errlen)
{
    stress_bucket_t bucket;
    /* a burst of 20 ms worth keeps the average rate when the loop wakes late */
    stress_bucket_init(&bucket, o->rate, o->rate / 50, clock_us(CLOCK_MONOTONIC));
    uint64_t deadline = util_mono_ms() + (uint64_t)o->timeout_s * 1000;
    *start_us = clock_us(CLOCK_REALTIME);
    int was_blocked = 0;
    if (o->progress_s) {
        c->prev_progress_ms = util_mono_ms();
        c->next_progress_ms = c->prev_progress_ms + (o->tty ? 1000 : (uint64_t)o->progress_s * 1000);
    }
    for (;;) {
        uint64_t now = util_mono_ms();
        if (c->next_progress_ms && now >= c->next_progress_ms)
            progress(c, o, *start_us, now);
        if (now >= deadline) {
            *timed_out = 1;
            return 0;
        }
        if (c->nsent == o->count && c->outstanding == 0 && stress_run_missing(c->run) == 0)
            return 0;
        uint64_t wait = deadline - now < 200 ? deadline - now : 200;
        if (c->next_progress_ms && c->next_progress_ms - now < wait)
            wait = c->next_progress_ms - now;
        /* a broker resource alarm: publishing would only fill buffers (and
         * then block this loop past --timeout); wait for it to clear */
        const char *blocked = mp_client_blocked(cl);
        if ((blocked != NULL) != was_blocked) {
            was_blocked = blocked != NULL;
            progress_clear(c);
            if (blocked)
                fprintf(stderr, "mailpump stress: the broker blocks publishers (%s); waiting\n",
                        blocked);
            else
                fprintf(stderr, "mailpump stress: the broker accepts publishers again\n");
        }
        /* the unconfirmed bodies stay within STRESS_INFLIGHT_BYTES too: a
         * broker that stops reading (an alarm) must not get more than the
         * socket buffers hold, or the blocking send would outlast --timeout */
        int room = c->outstanding < o->window &&
                   (c->outstanding == 0 || (c->outstanding + 1) * (o->size + 1024) <= STRESS_INFLIGHT_BYTES);
        if (!blocked && c->nsent < o->count && room) {
            uint64_t us = stress_bucket_take(&bucket, clock_us(CLOCK_MONOTONIC));
            if (us == 0) {
                char *body = message_body(tmpl, runid, c->nsent + 1, o->tenants);
                const char *id = json_string_value(json_object_get(tmpl, "id"));
                uint64_t seq;
                int r = mp_client_publish(cl, body, strlen(body), o->priority, id, &seq, err,
                                          errlen);
                free(body);
                if (r < 0)
                    return -1;
                if (c->nsent == 0)
                    c->first_seq = seq;
                c->pstate[c->nsent++] = P_SENT;
                c->outstanding++;
                /* take what already arrived, without waiting */
                for (int k = 0; k < 64; k++) {
                    r = mp_client_pump(cl, 0, on_confirm, on_event, c, err, errlen);
                    if (r < 0)
                        return -1;
                    if (r == 0)
                        break;
                }
                continue;
            }
            uint64_t ms = (us + 999) / 1000;
            if (ms < wait)
                wait = ms;
        }
        if (mp_client_pump(cl, (unsigned)wait, on_confirm, on_event, c, err, errlen) < 0)
            return -1;
    }
}

int stress_cmd_main(const mp_config_t *cfg, int argc, char **argv)
{
    enum { O_FROM = 256, O_TO, O_TO_DOMAIN, O_SUBJECT, O_ALLOW, O_JSON, O_TENANT, O_TENANTS, O_CAMPAIGN, O_POOL,
           O_PROGRESS };
    static const struct option opts[] = {
        { "count", required_argument, NULL, 'n' },
        { "rate", required_argument, NULL, 'r' },
        { "window", required_argument, NULL, 'w' },
        { "from", required_argument, NULL, O_FROM },
        { "to", required_argument, NULL, O_TO },
        { "to-domain", required_argument, NULL, O_TO_DOMAIN },
        { "recipients", required_argument, NULL, 'k' },
        { "size", required_argument, NULL, 's' },
        { "subject", required_argument, NULL, O_SUBJECT },
        { "priority", required_argument, NULL, 'p' },
        { "append", no_argument, NULL, 'a' },
        { "timeout", required_argument, NULL, 't' },
        { "allow-failures", no_argument, NULL, O_ALLOW },
        { "json", no_argument, NULL, O_JSON },
        { "tenant", required_argument, NULL, O_TENANT },
        { "tenants", required_argument, NULL, O_TENANTS },
        { "campaign", required_argument, NULL, O_CAMPAIGN },
        { "pool", required_argument, NULL, O_POOL },
        { "progress-interval", required_argument, NULL, O_PROGRESS },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    stress_opts_t o = { .count = 100, .window = 64, .recipients = 1, .size = 1024,
                        .subject = "mailpump stress", .priority = -1, .timeout_s = 120,
                        .progress_s = 5, .tty = isatty(STDERR_FILENO) };
    o.to = xcalloc((size_t)argc + 1, sizeof(*o.to));
    int rc = 2, c, recipients_set = 0;
    unsigned long long v = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, "n:r:w:k:s:p:at:h", opts, NULL)) != -1) {
        const char *bad = NULL;
        switch (c) {
        case 'n':
            if (parse_num(optarg, 1, 10000000, &v) < 0)
                bad = "--count expects 1..10000000";
            o.count = (size_t)v;
            break;
        case 'r':
            if (parse_num(optarg, 0, 1000000, &v) < 0)
                bad = "--rate expects 0..1000000 messages per second";
            o.rate = (unsigned long)v;
            break;
        case 'w':
            if (parse_num(optarg, 1, 65536, &v) < 0)
                bad = "--window expects 1..65536";
            o.window = (size_t)v;
            break;
        case 'k':
            if (parse_num(optarg, 1, 1000, &v) < 0)
                bad = "--recipients expects 1..1000";
            o.recipients = (size_t)v;
            recipients_set = 1;
            break;
        case 's':
            if (parse_num(optarg, 0, 64UL << 20, &v) < 0)
                bad = "--size expects 0..67108864 bytes";
            o.size = (size_t)v;
            break;
        case 'p':
            if (parse_num(optarg, 0, 10, &v) < 0)
                bad = "--priority expects 0..10";
            o.priority = (int)v;
            break;
        case 't':
            if (parse_num(optarg, 1, 86400, &v) < 0)
                bad = "--timeout expects 1..86400 seconds";
            o.timeout_s = (unsigned)v;
            break;
        case O_FROM: o.from = optarg; break;
        case O_TO: o.to[o.nto++] = optarg; break;
        case O_TO_DOMAIN: o.to_domain = optarg; break;
        case O_SUBJECT: o.subject = optarg; break;
        case O_TENANT: o.tenant = optarg; break;
        case O_TENANTS:
            if (parse_num(optarg, 1, 100000, &v) < 0)
                bad = "--tenants expects 1..100000";
            o.tenants = (size_t)v;
            break;
        case O_CAMPAIGN: o.campaign = optarg; break;
        case O_POOL: o.pool = optarg; break;
        case O_PROGRESS:
            if (parse_num(optarg, 0, 86400, &v) < 0)
                bad = "--progress-interval expects 0..86400 seconds";
            o.progress_s = (unsigned)v;
            break;
        case 'a': o.append = 1; break;
        case O_ALLOW: o.allow_failures = 1; break;
        case O_JSON: o.json = 1; break;
        case 'h': stress_cmd_usage(stdout); free(o.to); return 0;
        default: stress_cmd_usage(stderr); free(o.to); return 2;
        }
        if (bad) {
            fprintf(stderr, "mailpump stress: %s\n", bad);
            free(o.to);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "mailpump stress: unexpected argument \"%s\"\n", argv[optind]);
        free(o.to);
        return 2;
    }
    if (o.from == NULL || (o.nto == 0 && o.to_domain == NULL)) {
        fprintf(stderr, "mailpump stress: --from and --to or --to-domain are required "
                        "(mailpump stress --help)\n");
        free(o.to);
        return 2;
    }
    if (o.tenant && o.tenants) {
        fprintf(stderr, "mailpump stress: --tenant and --tenants exclude each other\n");
        free(o.to);
        return 2;
    }
    if (recipients_set && o.to_domain == NULL) {
        fprintf(stderr, "mailpump stress: --recipients goes with --to-domain\n");
        free(o.to);
        return 2;
    }

    char runid[STRESS_RUNID_LEN + 1];
    stress_runid_new(runid);
    json_t *tmpl = build_template(&o, runid);
    stress_run_t *run = NULL;
    mp_client_t *cl = NULL;
    stress_ctx_t ctx = { 0 };
    message_t *msg = NULL;
    char err[512];

    /* refuse what the daemon would dead-letter, and learn the recipients
     * as it will report them (deduplicated like the worker does) */
    char *first = message_body(tmpl, runid, 1, o.tenants);
    int pr = msgjson_parse(first, strlen(first), &msg, err, sizeof(err));
    free(first);
    if (pr != MSGJSON_OK) {
        fprintf(stderr, "mailpump stress: invalid message: %s\n", err);
        goto done;
    }
    if (cfg->message_max_size && o.size > cfg->message_max_size) {
        fprintf(stderr, "mailpump stress: --size %zu exceeds [message] max_size %lu\n", o.size,
                cfg->message_max_size);
        goto done;
    }
    const char **rcpts = xcalloc(msg->nto, sizeof(*rcpts));
    size_t nr = 0;
    for (size_t i = 0; i < msg->nto; i++) {
        int dup = 0;
        for (size_t k = 0; k < nr && !dup; k++)
            dup = strcasecmp(rcpts[k], msg->to[i].addr) == 0;
        if (!dup)
            rcpts[nr++] = msg->to[i].addr;
    }
    if (o.count * nr > STRESS_MAX_CELLS) {
        free(rcpts);
        fprintf(stderr, "mailpump stress: --count x recipients is %zu; at most %u are followed\n",
                o.count * nr, STRESS_MAX_CELLS);
        goto done;
    }
    run = stress_run_new(runid, o.count, rcpts, nr, o.append);
    free(rcpts);

    rc = 1;
    mp_client_opts_t co = { cfg->amqp_host, cfg->amqp_port, cfg->amqp_user, cfg->amqp_password,
                            cfg->amqp_vhost, cfg->amqp_queue, cfg->amqp_events_exchange };
    cl = mp_client_connect(&co, err, sizeof(err));
    if (cl == NULL) {
        fprintf(stderr, "mailpump stress: %s\n", err);
        goto done;
    }
    /* subscribed before the first publish: no event of this run is missed */
    if (mp_client_subscribe(cl, "#", err, sizeof(err)) < 0) {
        fprintf(stderr, "mailpump stress: %s\n", err);
        goto done;
    }
    ctx.run = run;
    ctx.pstate = xcalloc(o.count, 1);
    uint64_t start_us = 0;
    int timed_out = 0;
    int lr = stress_loop(cl, &o, runid, tmpl, &ctx, &start_us, &timed_out, err, sizeof(err));
    progress_clear(&ctx);
    if (lr < 0)
        fprintf(stderr, "mailpump stress: %s\n", err);
    stress_report_t rep;
    stress_run_report(run, start_us, ctx.last_confirm_us, &rep);
    rep.timed_out = timed_out;
    if (o.json) {
        char *s = stress_report_json(&rep);
        printf("%s\n", s);
        free(s);
    } else {
        stress_report_print(stdout, &rep);
    }
    const char *blocked = mp_client_blocked(cl);
    if (timed_out)
        fprintf(stderr, "mailpump stress: timeout after %u s: %zu message%s missing%s%s%s\n",
                o.timeout_s, rep.missing, rep.missing == 1 ? "" : "s",
                blocked ? " (the broker blocks publishers: " : "", blocked ? blocked : "", blocked ? ")" : "");
    int failures = rep.bounced || rep.dead || rep.append_failed;
    rc = lr < 0 || rep.missing || rep.unpublished || (failures && !o.allow_failures) ? 1 : 0;
done:
    mp_client_close(cl);
    stress_run_free(run);
    message_free(msg);
    json_decref(tmpl);
    free(ctx.pstate);
    free(o.to);
    return rc;
}

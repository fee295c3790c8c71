/*
 * Unit tests for deliverer/warmup: without Redis, exactly ceil(limit /
 * local_workers) per source, site and day, then refusals (counted, one
 * log line per key and day); a new UTC day starts over (and the day
 * before warmup_start has day 1's limit), past the list and without a
 * warm-up always allowed, nothing kept. Against tests/support/fakeredis.h
 * with a model of the script: the flush (one EVAL, its keys, counts and
 * TTL), the fleet's total deciding once answered, a key with nothing to
 * flush re-read, a failed flush (fallback, its counts sent again, one
 * warn, one info), and a day change while a flush is in flight.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/policy.h"
#include "deliverer/warmup.h"
#include "metrics/metrics.h"
#include "tests/support/fakeredis.h"
#include "tests/support/logcapture.h"

#define DAY_MS 86400000ull
#define DAY1   20788 /* 2026-12-01 */
#define NOON   (DAY1 * DAY_MS + 12 * 3600000ull)

static const uint32_t RAMP[3] = { 100, 250, 1000 };
static const egress_source_t FRESH = { .name = "fresh1", .warmup = RAMP, .nwarmup = 3, .warmup_start_day = DAY1 };
static const egress_source_t OLD = { .name = "old" };

/* How many of up to max tries are allowed (each allowed one counted). */
static unsigned take(warmup_t *w, const egress_source_t *s, const char *site, uint64_t now, unsigned max)
{
    unsigned n = 0;
    while (n < max && warmup_allows(w, s, site, now)) {
        warmup_count(w, s, site, now);
        n++;
    }
    return n;
}

static size_t occurrences(const char *hay, const char *needle)
{
    size_t n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* ------------------------------------------------------------ no Redis */

static void test_local_share(void **state)
{
    (void)state;
    loop_t *l = loop_new();
    warmup_t *w = warmup_new(l, NULL, 3);
    uint64_t limited = metrics_counter(MET_WARMUP_LIMITED);
    logcapture_t lc;
    char logs[8192];
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    /* ceil(100 / 3) = 34, then refused (and again) */
    assert_int_equal(take(w, &FRESH, "google.com", NOON, 1000), 34);
    assert_int_equal(warmup_allows(w, &FRESH, "google.com", NOON), 0);
    assert_int_equal(warmup_allows(w, &FRESH, "google.com", NOON + 3600000), 0);
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    assert_int_equal(metrics_counter(MET_WARMUP_LIMITED) - limited, 3);
    assert_int_equal(occurrences(logs, "event=limit_reached"), 1);
    assert_non_null(strstr(logs, "level=info mod=warmup event=limit_reached source=\"fresh1\" site=\"google.com\" "
                                 "limit=100 day=20261201 counted=34"));
    /* per site, and per source */
    assert_int_equal(take(w, &FRESH, "outlook.com", NOON, 1000), 34);
    warmup_stats_t st;
    warmup_get_stats(w, &st);
    assert_int_equal(st.keys, 2);
    assert_int_equal(st.flushes, 0);
    assert_int_equal(st.redis_errors, 0);
    assert_int_equal(st.fallback, 0);
    warmup_free(w);

    /* 0 workers count as 1; one worker: the whole limit */
    w = warmup_new(l, NULL, 0);
    assert_int_equal(take(w, &FRESH, "google.com", NOON, 1000), 100);
    warmup_free(w);
    w = warmup_new(l, NULL, 7);
    assert_int_equal(take(w, &FRESH, "google.com", NOON, 1000), 15); /* ceil(100 / 7) */
    warmup_free(w);
    assert_int_equal(loop_timer_count(l), 0);
    loop_free(l);
}

static void test_new_day_starts_over(void **state)
{
    (void)state;
    loop_t *l = loop_new();
    warmup_t *w = warmup_new(l, NULL, 3);
    logcapture_t lc;
    char logs[8192];
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    /* the day before warmup_start: day 1's limit, its own count */
    assert_int_equal(take(w, &FRESH, "google.com", NOON - DAY_MS, 1000), 34);
    /* day 1, from its first millisecond */
    assert_int_equal(take(w, &FRESH, "google.com", DAY1 * DAY_MS, 1000), 34);
    assert_int_equal(warmup_allows(w, &FRESH, "google.com", DAY1 * DAY_MS + DAY_MS - 1), 0);
    /* day 2: 250, ceil(250 / 3) = 84 */
    assert_int_equal(take(w, &FRESH, "google.com", (DAY1 + 1) * DAY_MS, 1000), 84);
    assert_int_equal(warmup_allows(w, &FRESH, "google.com", (DAY1 + 1) * DAY_MS + 1), 0);
    /* day 3: 1000, 334 */
    assert_int_equal(take(w, &FRESH, "google.com", NOON + 2 * DAY_MS, 1000), 334);
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    /* one line per key and day */
    assert_int_equal(occurrences(logs, "event=limit_reached"), 4);
    assert_int_equal(occurrences(logs, "day=20261130"), 1);
    assert_int_equal(occurrences(logs, "limit=100 day=20261201 counted=34"), 1);
    assert_int_equal(occurrences(logs, "limit=250 day=20261202 counted=84"), 1);
    assert_int_equal(occurrences(logs, "limit=1000 day=20261203 counted=334"), 1);
    warmup_stats_t st;
    warmup_get_stats(w, &st);
    assert_int_equal(st.keys, 1); /* one entry, rolled from day to day */
    /* past the list: no limit, nothing counted or kept */
    assert_int_equal(take(w, &FRESH, "google.com", NOON + 3 * DAY_MS, 5000), 5000);
    assert_int_equal(take(w, &FRESH, "yahoodns.net", NOON + 100 * DAY_MS, 5000), 5000);
    warmup_get_stats(w, &st);
    assert_int_equal(st.keys, 1);
    warmup_free(w);
    loop_free(l);
}

static void test_no_limit_always_allows(void **state)
{
    (void)state;
    loop_t *l = loop_new();
    warmup_t *w = warmup_new(l, NULL, 4);
    uint64_t limited = metrics_counter(MET_WARMUP_LIMITED);
    assert_int_equal(take(w, &OLD, "google.com", NOON, 20000), 20000);
    assert_int_equal(take(w, NULL, "google.com", NOON, 100), 100);
    warmup_stats_t st;
    warmup_get_stats(w, &st);
    assert_int_equal(st.keys, 0);
    assert_int_equal(metrics_counter(MET_WARMUP_LIMITED), limited);
    warmup_free(w);
    loop_free(l);
}

/* ------------------------------------------------------------ with Redis */

/* The script's model: INCRBY (count > 0) or GET (0), totals in order. */
typedef struct model {
    fakeredis_t *f;
    size_t       evals;
    size_t       nkeys;
    char         keys[8][96];
    char         counts[8][24];
    char         ttl[24];
} model_t;

static void model_eval(void *arg, int argc, char **argv, buf_t *out)
{
    model_t *m = arg;
    int nk = atoi(argv[2]);
    assert_int_equal(argc, 4 + 2 * nk);
    assert_string_equal(argv[1], WARMUP_REDIS_SCRIPT);
    m->evals++;
    m->nkeys = (size_t)nk;
    snprintf(m->ttl, sizeof(m->ttl), "%s", argv[3 + nk]);
    buf_printf(out, "*%d\r\n", nk);
    for (int i = 0; i < nk; i++) {
        const char *key = argv[3 + i], *count = argv[4 + nk + i];
        if (i < 8) {
            snprintf(m->keys[i], sizeof(m->keys[i]), "%s", key);
            snprintf(m->counts[i], sizeof(m->counts[i]), "%s", count);
        }
        const char *cur = fakeredis_get(m->f, key);
        long long v = (cur ? atoll(cur) : 0) + atoll(count);
        if (atoll(count) > 0) {
            char val[24];
            snprintf(val, sizeof(val), "%lld", v);
            fakeredis_set(m->f, key, val);
        }
        buf_printf(out, ":%lld\r\n", v);
    }
}

typedef struct fix {
    loop_t      *l;
    fakeredis_t *f;
    rclient_t   *c;
    warmup_t    *w;
    model_t      m;
} fix_t;

static fix_t *fix_new(unsigned workers)
{
    fix_t *x = xcalloc(1, sizeof(*x));
    x->l = loop_new();
    x->f = fakeredis_new(x->l);
    x->m.f = x->f;
    x->f->eval_hook = model_eval;
    x->f->eval_arg = &x->m;
    rclient_config_t rc = { .host = "127.0.0.1", .port = x->f->port, .timeout_ms = 300 };
    x->c = rclient_new(x->l, &rc);
    x->w = warmup_new(x->l, x->c, workers);
    return x;
}

static void fix_free(fix_t *x)
{
    warmup_free(x->w);
    rclient_free(x->c);
    fakeredis_free(x->f);
    assert_int_equal(loop_fd_count(x->l), 0);
    assert_int_equal(loop_timer_count(x->l), 0);
    loop_free(x->l);
    free(x);
}

/* Run until n more EVALs were answered (at most ms), and their replies read. */
static void run_evals(fix_t *x, size_t n, unsigned ms)
{
    size_t goal = x->f->nevals + n;
    uint64_t end = util_mono_ms() + ms;
    while (x->f->nevals < goal && util_mono_ms() < end)
        loop_run_once(x->l, 5);
    assert_int_equal(x->f->nevals, goal);
    for (int i = 0; i < 4; i++)
        loop_run_once(x->l, 5);
}

static void run_for(fix_t *x, unsigned ms)
{
    uint64_t end = util_mono_ms() + ms;
    while (util_mono_ms() < end)
        loop_run_once(x->l, 5);
}

#define GKEY "mp:wu:fresh1:google.com:20261201"
#define OKEY "mp:wu:fresh1:outlook.com:20261201"

static void test_fleet_total_decides(void **state)
{
    (void)state;
    fix_t *x = fix_new(2);
    warmup_stats_t st;
    /* before the first answer: ceil(100 / 2) of its own */
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 10), 10);
    warmup_get_stats(x->w, &st);
    assert_int_equal(st.fallback, 1);
    assert_int_equal(st.flushes, 0);
    run_evals(x, 1, 2000);
    assert_int_equal(x->m.nkeys, 1);
    assert_string_equal(x->m.keys[0], GKEY);
    assert_string_equal(x->m.counts[0], "10");
    assert_string_equal(x->m.ttl, "172800");
    assert_string_equal(fakeredis_get(x->f, GKEY), "10");
    warmup_get_stats(x->w, &st);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.flushes, 1);
    assert_int_equal(st.keys, 1);

    /* the others send 85 meanwhile: this worker still knows 10 */
    fakeredis_set(x->f, GKEY, "95");
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 3), 3);
    run_evals(x, 1, 2000);
    assert_string_equal(x->m.counts[0], "3");
    assert_string_equal(fakeredis_get(x->f, GKEY), "98");
    /* now it knows 98: two more, then refused (the fleet decides, not the share of 50) */
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 10), 2);
    assert_int_equal(warmup_allows(x->w, &FRESH, "google.com", NOON), 0);
    run_evals(x, 1, 2000);
    assert_string_equal(fakeredis_get(x->f, GKEY), "100");

    /* a key with nothing to flush: read at once when new, then every 3 s */
    assert_int_equal(warmup_allows(x->w, &FRESH, "outlook.com", NOON), 1);
    size_t before = x->m.evals;
    run_evals(x, 1, 600); /* brought forward: well within a second */
    assert_int_equal(x->m.evals, before + 1);
    assert_int_equal(x->m.nkeys, 1); /* google.com has nothing to flush and was read 1 s ago */
    assert_string_equal(x->m.keys[0], OKEY);
    assert_string_equal(x->m.counts[0], "0");
    assert_null(fakeredis_get(x->f, OKEY)); /* a GET creates nothing */
    fakeredis_set(x->f, OKEY, "100");       /* the others used it all */
    assert_int_equal(warmup_allows(x->w, &FRESH, "outlook.com", NOON), 1); /* not known yet */
    run_for(x, 3600);
    assert_int_equal(warmup_allows(x->w, &FRESH, "outlook.com", NOON), 0);
    warmup_get_stats(x->w, &st);
    assert_int_equal(st.redis_errors, 0);
    assert_int_equal(st.keys, 2);
    /* at most one EVAL a second */
    assert_true(x->m.evals <= 9);
    fix_free(x);
}

static void test_failed_flush_falls_back_and_resends(void **state)
{
    (void)state;
    fix_t *x = fix_new(4);
    logcapture_t lc;
    char logs[8192];
    assert_int_equal(logcapture_begin(&lc, LOG_INFO, LOG_FMT_LOGFMT), 0);
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 5), 5);
    run_evals(x, 1, 2000);
    assert_string_equal(fakeredis_get(x->f, GKEY), "5");
    /* the next flush fails: fallback, the counts go again with the one after */
    x->f->fail_next = 1;
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 7), 7);
    uint64_t end = util_mono_ms() + 2000;
    warmup_stats_t st;
    do {
        loop_run_once(x->l, 5);
        warmup_get_stats(x->w, &st);
    } while (st.redis_errors == 0 && util_mono_ms() < end);
    assert_int_equal(st.redis_errors, 1);
    assert_int_equal(st.fallback, 1);
    assert_string_equal(fakeredis_get(x->f, GKEY), "5");
    /* in fallback: its own count (12) against ceil(100 / 4) = 25, and the
     * last known total plus what is unflushed (5 + 7) against 100 */
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 100), 13);
    run_evals(x, 1, 2000);
    assert_string_equal(x->m.counts[0], "20");
    assert_string_equal(fakeredis_get(x->f, GKEY), "25");
    warmup_get_stats(x->w, &st);
    assert_int_equal(st.fallback, 0);
    assert_int_equal(st.redis_errors, 1);
    /* answering again: the fleet's 25 of 100 decides, not the share */
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 100), 75);
    logcapture_end(&lc, logs, sizeof(logs), LOG_INFO);
    assert_int_equal(occurrences(logs, "event=fallback"), 1);
    assert_non_null(strstr(logs, "level=warn mod=warmup event=fallback error=\"ERR"));
    assert_int_equal(occurrences(logs, "level=info mod=warmup event=redis_back keys=1"), 1);
    fix_free(x);
}

static void test_day_change_during_flush(void **state)
{
    (void)state;
    fix_t *x = fix_new(2);
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 1), 1);
    run_evals(x, 1, 2000); /* answered: known */
    assert_int_equal(take(x->w, &FRESH, "google.com", NOON, 6), 6);
    x->f->mute = 1;
    run_evals(x, 1, 2000); /* the flush of 6 ran, its answer held */
    assert_string_equal(fakeredis_get(x->f, GKEY), "7");
    /* midnight: the entry starts over on day 2's key */
    uint64_t d2 = (DAY1 + 1) * DAY_MS;
    assert_int_equal(warmup_allows(x->w, &FRESH, "google.com", d2), 1);
    fakeredis_unmute(x->f);
    for (int i = 0; i < 10; i++)
        loop_run_once(x->l, 5);
    /* day 1's answer (7) was not taken for day 2: not known, the local
     * share ceil(250 / 2) = 125 applies */
    assert_int_equal(take(x->w, &FRESH, "google.com", d2, 1000), 125);
    run_evals(x, 1, 2000);
    assert_string_equal(x->m.keys[0], "mp:wu:fresh1:google.com:20261202");
    assert_string_equal(x->m.counts[0], "125");
    assert_string_equal(fakeredis_get(x->f, "mp:wu:fresh1:google.com:20261202"), "125");
    assert_string_equal(fakeredis_get(x->f, GKEY), "7");
    /* known now: the fleet's 125 of 250 */
    assert_int_equal(take(x->w, &FRESH, "google.com", d2, 1000), 125);
    fix_free(x);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_local_share),
        cmocka_unit_test(test_new_day_starts_over),
        cmocka_unit_test(test_no_limit_always_allows),
        cmocka_unit_test(test_fleet_total_decides),
        cmocka_unit_test(test_failed_flush_falls_back_and_resends),
        cmocka_unit_test(test_day_change_during_flush),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for cli/stress_cmd: nearest-rank percentiles, the token
 * bucket, run-tagged ids, event classification and timestamps, and the
 * tally of a run fed with event bodies as the worker publishes them.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/stress_cmd.h"

static void test_percentiles(void **state)
{
    uint64_t v[100];
    for (size_t i = 0; i < 100; i++)
        v[i] = (uint64_t)((i * 37) % 100) + 1; /* 1..100, shuffled */
    stress_pcts_t p;
    stress_pcts_compute(v, 100, &p);
    assert_int_equal(p.n, 100);
    assert_int_equal(p.p50, 50);
    assert_int_equal(p.p90, 90);
    assert_int_equal(p.p99, 99);
    assert_int_equal(p.max, 100);
    for (size_t i = 0; i < 100; i++)
        assert_int_equal(v[i], i + 1); /* sorted in place */

    uint64_t ten[] = { 100, 90, 80, 70, 60, 50, 40, 30, 20, 10 };
    stress_pcts_compute(ten, 10, &p);
    assert_int_equal(p.p50, 50);  /* rank 5 */
    assert_int_equal(p.p90, 90);  /* rank 9 */
    assert_int_equal(p.p99, 100); /* rank ceil(9.9) = 10 */
    assert_int_equal(p.max, 100);

    uint64_t three[] = { 5, 1, 3 };
    stress_pcts_compute(three, 3, &p);
    assert_int_equal(p.p50, 3); /* rank 2 */
    assert_int_equal(p.p90, 5); /* rank ceil(2.7) = 3 */
    assert_int_equal(p.p99, 5);
    assert_int_equal(p.max, 5);

    uint64_t one[] = { 42 };
    stress_pcts_compute(one, 1, &p);
    assert_int_equal(p.p50, 42);
    assert_int_equal(p.p99, 42);
    assert_int_equal(p.max, 42);

    uint64_t dup[] = { 7, 7, 7, 1 };
    stress_pcts_compute(dup, 4, &p);
    assert_int_equal(p.p50, 7); /* rank 2 of 1,7,7,7 */
    assert_int_equal(stress_percentile(dup, 4, 25), 1);
    assert_int_equal(stress_percentile(dup, 4, 1), 1);
    assert_int_equal(stress_percentile(dup, 4, 100), 7);

    stress_pcts_compute(NULL, 0, &p);
    assert_int_equal(p.n, 0);
    assert_int_equal(p.p50, 0);
    assert_int_equal(p.max, 0);
}

static void test_bucket_paces(void **state)
{
    stress_bucket_t b;
    stress_bucket_init(&b, 10, 1, 0);
    assert_int_equal(stress_bucket_take(&b, 0), 0);          /* starts full */
    assert_int_equal(stress_bucket_take(&b, 0), 100000);     /* 1/10 s */
    assert_int_equal(stress_bucket_take(&b, 50000), 50000);  /* half a token there */
    assert_int_equal(stress_bucket_take(&b, 100000), 0);
    assert_int_equal(stress_bucket_take(&b, 100000), 100000);
    /* a long pause fills it only to the capacity */
    assert_int_equal(stress_bucket_take(&b, 60000000), 0);
    assert_int_equal(stress_bucket_take(&b, 60000000), 100000);

    /* a rate that does not divide a second: waits round up */
    stress_bucket_init(&b, 3, 1, 1000);
    assert_int_equal(stress_bucket_take(&b, 1000), 0);
    assert_int_equal(stress_bucket_take(&b, 1000), 333334);
    assert_int_equal(stress_bucket_take(&b, 1000 + 333333), 1); /* 999999 millionths */
    assert_int_equal(stress_bucket_take(&b, 1000 + 333334), 0);
    assert_int_equal(b.level, 0); /* 1000002 millionths, capped at one token, one taken */

    /* burst: five at once, then one every 10 ms */
    stress_bucket_init(&b, 100, 5, 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(stress_bucket_take(&b, 0), 0);
    assert_int_equal(stress_bucket_take(&b, 0), 10000);
    assert_int_equal(stress_bucket_take(&b, 10000), 0);
    /* a clock that goes backwards adds nothing */
    assert_int_equal(stress_bucket_take(&b, 5000), 10000);

    /* burst 0 means 1 */
    stress_bucket_init(&b, 1000, 0, 0);
    assert_int_equal(stress_bucket_take(&b, 0), 0);
    assert_int_equal(stress_bucket_take(&b, 0), 1000);

    /* 0 = unlimited */
    stress_bucket_init(&b, 0, 0, 0);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(stress_bucket_take(&b, 0), 0);

    /* the highest rate after a pause of years does not overflow */
    stress_bucket_init(&b, 1000000, 20000, 0);
    assert_int_equal(stress_bucket_take(&b, 0), 0);
    assert_int_equal(stress_bucket_take(&b, UINT64_MAX / 2), 0);
    assert_int_equal(b.level, 20000 * 1000000ULL - 1000000);
}

/* --tenants N spreads the run over t0..tN-1; bad sender fields are
 * refused before any connection is made (exit status 2). */
static void test_tenants(void **state)
{
    (void)state;
    char t[32];
    stress_tenant_format(t, sizeof(t), 3, 1);
    assert_string_equal(t, "t0");
    stress_tenant_format(t, sizeof(t), 3, 3);
    assert_string_equal(t, "t2");
    stress_tenant_format(t, sizeof(t), 3, 4);
    assert_string_equal(t, "t0");
    stress_tenant_format(t, sizeof(t), 1, 1000);
    assert_string_equal(t, "t0");

    mp_config_t cfg;
    config_defaults(&cfg);
    free(cfg.amqp_host);
    cfg.amqp_host = strdup("127.0.0.1");
    cfg.amqp_port = 1; /* nothing listens: a run that got past its checks would fail with 1 */
    const char *bad[][12] = {
        { "stress", "--from", "a@test.example", "--to", "b@test.example", "--tenant", "a b" },
        { "stress", "--from", "a@test.example", "--to", "b@test.example", "--campaign", "a\"b" },
        { "stress", "--from", "a@test.example", "--to", "b@test.example", "--pool", "" },
        { "stress", "--from", "a@test.example", "--to", "b@test.example", "--tenant", "x", "--tenants", "2" },
        { "stress", "--from", "a@test.example", "--to", "b@test.example", "--tenants", "0" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int argc = 0;
        while (bad[i][argc])
            argc++;
        assert_int_equal(stress_cmd_main(&cfg, argc, (char **)bad[i]), 2);
    }
    const char *good[] = { "stress", "--from", "a@test.example", "--to", "b@test.example", "--tenants", "4",
                           "--campaign", "c:1", "--pool", "bulk", "-n", "1", "-t", "1", NULL };
    assert_int_equal(stress_cmd_main(&cfg, 15, (char **)good), 1); /* valid: it tried to connect */
    config_free(&cfg);
}

static void test_run_ids(void **state)
{
    char runid[STRESS_RUNID_LEN + 1];
    stress_runid_new(runid);
    assert_int_equal(strlen(runid), STRESS_RUNID_LEN);
    assert_int_equal(strspn(runid, "0123456789abcdef"), STRESS_RUNID_LEN);

    char id[64];
    stress_id_format(id, sizeof(id), "0123456789ab", 17);
    assert_string_equal(id, "stress-0123456789ab-17");
    assert_int_equal(stress_id_match(id, "0123456789ab", 200), 16);
    assert_int_equal(stress_id_match("stress-0123456789ab-1", "0123456789ab", 1), 0);
    assert_int_equal(stress_id_match("stress-0123456789ab-200", "0123456789ab", 200), 199);
    const char *others[] = {
        "stress-0123456789ab-201",  /* beyond count */
        "stress-0123456789ab-0",    /* n starts at 1 */
        "stress-0123456789ab-017",  /* not canonical */
        "stress-0123456789ab-+17",
        "stress-0123456789ab-17x",
        "stress-0123456789ab-",
        "stress-0123456789ab",
        "stress-0123456789abc-17",  /* a longer run id */
        "stress-0123456789a-17",
        "stress-ffffffffffff-17",   /* another run */
        "Stress-0123456789ab-17",
        "7b0c3a1e-2f8e-4d7a-9a51-0c6f5e2b8d11",
        "stress-0123456789ab-99999999999999999999999",
        "",
    };
    for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++)
        if (stress_id_match(others[i], "0123456789ab", 200) != -1)
            fail_msg("\"%s\" matched", others[i]);
}

static void test_event_kinds_and_ts(void **state)
{
    assert_int_equal(stress_event_kind("delivered", 0), STRESS_EV_DELIVERED);
    assert_int_equal(stress_event_kind("bounced", 0), STRESS_EV_BOUNCED);
    assert_int_equal(stress_event_kind("deferred", 1), STRESS_EV_DEFERRED);
    assert_int_equal(stress_event_kind("dead", 0), STRESS_EV_DEAD);
    assert_int_equal(stress_event_kind("appended", 0), STRESS_EV_APPENDED);
    assert_int_equal(stress_event_kind("append_failed", 0), STRESS_EV_APPEND_FAILED);
    assert_int_equal(stress_event_kind("append_failed", 1), STRESS_EV_APPEND_RETRY);
    assert_int_equal(stress_event_kind("suppressed", 0), STRESS_EV_SUPPRESSED);
    assert_int_equal(stress_event_kind("failed", 0), STRESS_EV_OTHER);
    assert_int_equal(stress_event_kind("Delivered", 0), STRESS_EV_OTHER);
    assert_int_equal(stress_event_kind(NULL, 0), STRESS_EV_OTHER);

    assert_int_equal(stress_parse_ts("2026-11-23T17:00:00.123Z"), 1795453200123ULL);
    assert_int_equal(stress_parse_ts("2000-02-29T23:59:59.999Z"), 951868799999ULL);
    assert_int_equal(stress_parse_ts("1970-01-01T00:00:01.234Z"), 1234);
    const char *bad[] = { "2026-11-23T17:00:00Z", "2026-11-23 17:00:00.123Z",
                          "2026-11-23T17:00:00.123", "2026-13-23T17:00:00.123Z",
                          "2026-11-23T24:00:00.123Z", "2026-11-23T17:00:00.123Z ",
                          "2026-1a-23T17:00:00.123Z", "", NULL };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(stress_parse_ts(bad[i]), 0);
}

#define RUN "00000000abcd"
#define TS0 "2026-11-23T17:00:00.123Z"
#define TS0_MS 1795453200123ULL

static int feed(stress_run_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int feed(stress_run_t *r, const char *fmt, ...)
{
    char body[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof(body), fmt, ap);
    va_end(ap);
    return stress_run_event(r, body, strlen(body), 77);
}

static void test_tally(void **state)
{
    const char *rcpts[] = { "User1@test.example", "user2@test.example" };
    stress_run_t *r = stress_run_new(RUN, 4, rcpts, 2, 1);
    const uint64_t c0 = TS0_MS * 1000 - 250000; /* confirmed 250 ms before TS0 */

    assert_int_equal(stress_run_missing(r), 0);
    stress_run_confirmed(r, 0, c0);
    assert_int_equal(stress_run_missing(r), 1);

    /* other traffic and other runs are ignored; a broken body is reported */
    assert_int_equal(feed(r, "{\"event\":\"delivered\",\"message_id\":\"x-1\","
                             "\"recipient\":\"user2@test.example\"}"), 0);
    assert_int_equal(feed(r, "{\"event\":\"delivered\",\"message_id\":\"stress-ffffffffffff-1\","
                             "\"recipient\":\"user2@test.example\",\"note\":\"stress-" RUN "-\"}"),
                     0);
    assert_int_equal(feed(r, "not json stress-" RUN "-1"), -1);
    /* an unknown recipient or event name counts for nothing */
    assert_int_equal(feed(r, "{\"event\":\"delivered\",\"message_id\":\"stress-" RUN "-1\","
                             "\"recipient\":\"user3@test.example\"}"), 0);
    assert_int_equal(feed(r, "{\"event\":\"failed\",\"message_id\":\"stress-" RUN "-1\","
                             "\"recipient\":\"user1@test.example\"}"), 0);

    /* message 1: one delivered (recipient matched case-insensitively), one
     * bounced, a Sent copy retried, then stored */
    assert_int_equal(feed(r, "{\"event\":\"delivered\",\"message_id\":\"stress-" RUN "-1\","
                             "\"recipient\":\"user1@TEST.example\",\"ts\":\"" TS0 "\"}"), 1);
    assert_int_equal(feed(r, "{\"event\":\"bounced\",\"message_id\":\"stress-" RUN "-1\","
                             "\"recipient\":\"user2@test.example\",\"ts\":\"" TS0 "\"}"), 1);
    assert_int_equal(stress_run_missing(r), 1); /* the Sent copy */
    assert_int_equal(feed(r, "{\"event\":\"append_failed\",\"message_id\":\"stress-" RUN "-1\","
                             "\"retry_in_ms\":300,\"ts\":\"" TS0 "\"}"), 1);
    assert_int_equal(stress_run_missing(r), 1);
    assert_int_equal(feed(r, "{\"event\":\"appended\",\"message_id\":\"stress-" RUN "-1\","
                             "\"ts\":\"2026-11-23T17:00:00.173Z\"}"), 1);
    assert_int_equal(stress_run_missing(r), 0);
    /* the same recipient reported again: a duplicate, not a second count */
    assert_int_equal(feed(r, "{\"event\":\"delivered\",\"message_id\":\"stress-" RUN "-1\","
                             "\"recipient\":\"user1@test.example\",\"ts\":\"" TS0 "\"}"), 1);

    /* message 2: dead-lettered before its confirm was read */
    assert_int_equal(feed(r, "{\"event\":\"dead\",\"message_id\":\"stress-" RUN "-2\"}"), 1);
    assert_int_equal(stress_run_missing(r), 0);
    stress_run_confirmed(r, 1, c0 + 1000);
    assert_int_equal(stress_run_missing(r), 0);

    /* message 3: both recipients deferred (no Sent copy is due while none
     * is delivered), then both bounce: complete without an append */
    stress_run_confirmed(r, 2, c0);
    assert_int_equal(feed(r, "{\"event\":\"deferred\",\"message_id\":\"stress-" RUN "-3\","
                             "\"recipient\":\"user1@test.example\",\"retry_in_ms\":300}"), 1);
    assert_int_equal(feed(r, "{\"event\":\"deferred\",\"message_id\":\"stress-" RUN "-3\","
                             "\"recipient\":\"user2@test.example\",\"retry_in_ms\":300}"), 1);
    assert_int_equal(stress_run_missing(r), 1);
    assert_int_equal(feed(r, "{\"event\":\"bounced\",\"message_id\":\"stress-" RUN "-3\","
                             "\"recipient\":\"user1@test.example\"}"), 1);
    assert_int_equal(feed(r, "{\"event\":\"bounced\",\"message_id\":\"stress-" RUN "-3\","
                             "\"recipient\":\"user2@test.example\"}"), 1);
    assert_int_equal(stress_run_missing(r), 0);

    /* message 4: never confirmed, one recipient delivered (no ts: the
     * receive time stands in) */
    assert_int_equal(feed(r, "{\"event\":\"delivered\",\"message_id\":\"stress-" RUN "-4\","
                             "\"recipient\":\"user2@test.example\"}"), 1);

    stress_report_t rep;
    stress_run_report(r, c0 - 1000000, c0 + 1000, &rep);
    assert_string_equal(rep.run_id, RUN);
    assert_int_equal(rep.count, 4);
    assert_int_equal(rep.nrcpts, 2);
    assert_int_equal(rep.published, 3);
    assert_int_equal(rep.unpublished, 1);
    assert_int_equal(rep.delivered, 2);
    assert_int_equal(rep.bounced, 3);
    assert_int_equal(rep.dead, 1);
    assert_int_equal(rep.retried, 3);
    assert_int_equal(rep.appended, 1);
    assert_int_equal(rep.append_failed, 0);
    assert_int_equal(rep.duplicates, 1);
    assert_int_equal(rep.missing, 0);
    assert_int_equal(rep.nshown, 0);
    /* latencies only for confirmed messages: 250 ms and 300 ms */
    assert_int_equal(rep.lat_delivered.n, 1);
    assert_int_equal(rep.lat_delivered.p50, 250);
    assert_int_equal(rep.lat_delivered.max, 250);
    assert_int_equal(rep.lat_appended.n, 1);
    assert_int_equal(rep.lat_appended.p99, 300);
    /* 3 confirmed within 1.001 s of the start */
    assert_true(rep.publish_s > 1.0009 && rep.publish_s < 1.0011);
    /* the last delivered event (ts TS0) is 1.25 s after the start */
    assert_true(rep.deliver_s > 1.2499 && rep.deliver_s < 1.2501);
    assert_true(rep.delivered_per_s > 1.5999 && rep.delivered_per_s < 1.6001);

    char *js = stress_report_json(&rep);
    json_error_t je;
    json_t *o = json_loads(js, 0, &je);
    free(js);
    assert_non_null(o);
    assert_int_equal(json_integer_value(json_object_get(o, "published")), 3);
    assert_int_equal(json_integer_value(json_object_get(o, "missing")), 0);
    assert_int_equal(json_integer_value(json_object_get(o, "bounced")), 3);
    assert_true(json_real_value(json_object_get(o, "delivered_per_s")) == 1.6);
    json_t *lat = json_object_get(json_object_get(o, "latency_ms"), "appended");
    assert_int_equal(json_integer_value(json_object_get(lat, "p50")), 300);
    assert_int_equal(json_array_size(json_object_get(o, "missing_first")), 0);
    json_decref(o);
    stress_run_free(r);
}

static void test_missing_reported(void **state)
{
    const char *rcpts[] = { "a@test.example" };
    stress_run_t *r = stress_run_new(RUN, 30, rcpts, 1, 1);
    for (size_t i = 0; i < 30; i++)
        stress_run_confirmed(r, i, 1000000);
    /* message 5 delivered, its Sent copy still due; the rest silent */
    assert_int_equal(feed(r, "{\"event\":\"delivered\",\"message_id\":\"stress-" RUN "-5\","
                             "\"recipient\":\"a@test.example\",\"ts\":\"" TS0 "\"}"), 1);
    assert_int_equal(stress_run_missing(r), 30);
    stress_report_t rep;
    stress_run_report(r, 1000000, 1000000, &rep);
    assert_int_equal(rep.published, 30);
    assert_int_equal(rep.missing, 30);
    assert_int_equal(rep.nshown, STRESS_SHOWN);
    assert_string_equal(rep.shown[0].id, "stress-" RUN "-1");
    assert_string_equal(rep.shown[0].what, "1 of 1 recipients");
    assert_string_equal(rep.shown[4].id, "stress-" RUN "-5");
    assert_string_equal(rep.shown[4].what, "the Sent copy");
    assert_int_equal(rep.lat_appended.n, 0);
    assert_int_equal(rep.publish_rate, 0); /* no time between start and last confirm */
    char *js = stress_report_json(&rep);
    json_t *o = json_loads(js, 0, NULL);
    free(js);
    json_t *lat = json_object_get(json_object_get(o, "latency_ms"), "appended");
    assert_true(json_is_null(json_object_get(lat, "p50")));
    assert_int_equal(json_array_size(json_object_get(o, "missing_first")), STRESS_SHOWN);
    json_decref(o);

    /* without --append a delivered recipient completes the message */
    stress_run_t *r2 = stress_run_new(RUN, 1, rcpts, 1, 0);
    stress_run_confirmed(r2, 0, 1);
    assert_int_equal(feed(r2, "{\"event\":\"delivered\",\"message_id\":\"stress-" RUN "-1\","
                              "\"recipient\":\"a@test.example\"}"), 1);
    assert_int_equal(stress_run_missing(r2), 0);
    stress_run_free(r2);
    stress_run_free(r);
}

static void test_window(void **state)
{
    stress_window_t w;
    stress_window_init(&w, 1000, 8);
    stress_pcts_t p;
    stress_window_pcts(&w, 5000, &p);
    assert_int_equal(p.n, 0);
    assert_int_equal(p.p50, 0);
    /* samples at 1000..1400 ms, values 10..50 */
    for (uint64_t i = 0; i < 5; i++)
        stress_window_add(&w, 1000 + i * 100, 10 * (i + 1));
    stress_window_pcts(&w, 1400, &p);
    assert_int_equal(p.n, 5);
    assert_int_equal(p.p50, 30);
    assert_int_equal(p.p99, 50);
    /* at 2000 the sample taken at 1000 is out: (1000, 2000] */
    stress_window_pcts(&w, 2000, &p);
    assert_int_equal(p.n, 4);
    assert_int_equal(p.p50, 30); /* rank 2 of 20,30,40,50 */
    assert_int_equal(p.p99, 50);
    /* the window slides: only 1400 (50) remains at 2350 */
    stress_window_pcts(&w, 2350, &p);
    assert_int_equal(p.n, 1);
    assert_int_equal(p.p50, 50);
    /* full: the oldest make room; 10 samples kept in 8 slots */
    for (uint64_t i = 0; i < 10; i++)
        stress_window_add(&w, 3000, 100 + i);
    stress_window_pcts(&w, 3000, &p);
    assert_int_equal(p.n, 8);
    assert_int_equal(p.max, 109);
    assert_int_equal(p.p50, 105); /* 102..109, rank 4 */
    stress_window_pcts(&w, 10000, &p);
    assert_int_equal(p.n, 0);
    stress_window_free(&w);
}

static void test_progress_line(void **state)
{
    stress_progress_t p = { .elapsed_s = 12.04, .count = 500, .published = 340,
                            .delivered = 300, .bounced = 10, .deferred = 2, .in_flight = 30,
                            .rate = 45.04, .avg_rate = 28.25 };
    char line[256];
    stress_progress_format(line, sizeof(line), &p);
    assert_string_equal(line, "stress 12.0s published 340/500 delivered 300 bounced 10 "
                              "deferred 2 in_flight 30 rate 45.0/s avg 28.2/s p50 - p99 -");
    p.recent.n = 3;
    p.recent.p50 = 120;
    p.recent.p99 = 480;
    stress_progress_format(line, sizeof(line), &p);
    assert_string_equal(line, "stress 12.0s published 340/500 delivered 300 bounced 10 "
                              "deferred 2 in_flight 30 rate 45.0/s avg 28.2/s p50 120ms p99 480ms");
}

/* The run's progress counts, its rolling latencies, the failure rate and
 * the breakdown by reason and reply code, in text and JSON. */
static void test_progress_and_breakdown(void **state)
{
    const char *rcpts[] = { "a@test.example" };
    stress_run_t *r = stress_run_new(RUN, 5, rcpts, 1, 0);
    const uint64_t c0 = TS0_MS * 1000 - 100000; /* confirmed 100 ms before TS0 */
    for (size_t i = 0; i < 5; i++)
        stress_run_confirmed(r, i, c0);
    const uint64_t now = 1000; /* feed() receives at 77 ms */
#define EV(n, what, extra) \
    feed(r, "{\"event\":\"" what "\",\"message_id\":\"stress-" RUN "-" #n "\"," \
            "\"recipient\":\"a@test.example\",\"ts\":\"" TS0 "\"" extra "}")
    assert_int_equal(EV(1, "delivered", ""), 1);
    assert_int_equal(EV(2, "bounced", ",\"reason\":\"no_such_user\","
                                      "\"smtp\":{\"code\":550,\"enhanced\":\"5.1.1\",\"text\":\"x\"}"), 1);
    assert_int_equal(EV(3, "bounced", ",\"reason\":\"no_such_user\","
                                      "\"smtp\":{\"code\":550,\"enhanced\":\"5.1.1\",\"text\":\"x\"}"), 1);
    assert_int_equal(EV(4, "deferred", ",\"reason\":\"greylisted\",\"retry_in_ms\":100,"
                                       "\"smtp\":{\"code\":450,\"text\":\"later\"}"), 1);
    assert_int_equal(EV(4, "deferred", ",\"reason\":\"greylisted\",\"retry_in_ms\":100,"
                                       "\"smtp\":{\"code\":451,\"enhanced\":\"4.7.1\"}"), 1);
    assert_int_equal(EV(4, "deferred", ",\"reason\":\"dns\",\"retry_in_ms\":100"), 1);
    assert_int_equal(EV(4, "bounced", ",\"error\":\"retries used up\""), 1);
#undef EV

    stress_progress_t p;
    stress_run_progress(r, 1000, &p);
    assert_int_equal(p.in_flight, 1); /* message 5 */
    /* a suppressed recipient is final, not a bounce */
    assert_int_equal(feed(r, "{\"event\":\"suppressed\",\"message_id\":\"stress-" RUN "-5\","
                             "\"recipient\":\"a@test.example\",\"reason\":\"suppressed\","
                             "\"ts\":\"" TS0 "\"}"), 1);

    stress_run_progress(r, now, &p);
    assert_int_equal(p.count, 5);
    assert_int_equal(p.published, 5);
    assert_int_equal(p.delivered, 1);
    assert_int_equal(p.bounced, 3);
    assert_int_equal(p.deferred, 3);
    assert_int_equal(p.in_flight, 0);
    /* feed() stamps the receive time: the samples are recent; 4 final
     * events, each 100 ms after its confirm (deferred ones are not final) */
    assert_int_equal(p.recent.n, 5);
    assert_int_equal(p.recent.p50, 100);
    assert_int_equal(p.recent.p99, 100);
    stress_run_progress(r, 77 + STRESS_RECENT_MS, &p); /* they left the window */
    assert_int_equal(p.recent.n, 0);
    assert_int_equal(p.delivered, 1);

    stress_report_t rep;
    stress_run_report(r, c0, c0 + 1000, &rep);
    assert_true(rep.failure_rate > 0.5999 && rep.failure_rate < 0.6001); /* 3 of 5 */
    assert_int_equal(rep.nreasons, 5);
    assert_int_equal(rep.suppressed, 1);
    assert_int_equal(rep.bounced, 3);
    assert_int_equal(rep.missing, 0);

    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    stress_report_print(f, &rep);
    fclose(f);
    assert_non_null(strstr(buf, "\nsuppressed            1\n"));
    assert_non_null(strstr(buf, "failure rate     60.00% (bounced + dead / recipients published)\n"));
    assert_non_null(strstr(buf, "\nbounced: no_such_user 2 (550 5.1.1: 2)\n"
                                "bounced: other 1 (-: 1)\n"
                                "deferred: dns 1 (-: 1)\n"
                                "deferred: greylisted 2 (450: 1, 451 4.7.1: 1)\n"));
    free(buf);

    char *js = stress_report_json(&rep);
    json_error_t je;
    json_t *o = json_loads(js, 0, &je);
    free(js);
    assert_non_null(o);
    assert_true(json_real_value(json_object_get(o, "failure_rate")) == 0.6);
    assert_int_equal(json_integer_value(json_object_get(o, "suppressed")), 1);
    char *bd = json_dumps(json_object_get(o, "breakdown"), JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(bd, "{\"bounced\":[{\"codes\":{\"550 5.1.1\":2},\"count\":2,\"reason\":\"no_such_user\"},"
                            "{\"codes\":{\"-\":1},\"count\":1,\"reason\":\"other\"}],"
                            "\"deferred\":[{\"codes\":{\"-\":1},\"count\":1,\"reason\":\"dns\"},"
                            "{\"codes\":{\"450\":1,\"451 4.7.1\":1},\"count\":2,\"reason\":\"greylisted\"}]}");
    free(bd);
    json_decref(o);
    stress_run_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_percentiles),
        cmocka_unit_test(test_bucket_paces),
        cmocka_unit_test(test_run_ids),
        cmocka_unit_test(test_tenants),
        cmocka_unit_test(test_event_kinds_and_ts),
        cmocka_unit_test(test_tally),
        cmocka_unit_test(test_missing_reported),
        cmocka_unit_test(test_window),
        cmocka_unit_test(test_progress_line),
        cmocka_unit_test(test_progress_and_breakdown),
    };
    return cmocka_run_group_tests_name("stress", tests, NULL, NULL);
}

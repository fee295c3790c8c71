/*
 * SUMMARY
 *  tests/unit/test_history.c - a message's history: the attempt record
 *  (deliverer/history.h) and where a message is now, derived from its
 *  records and the ledger (control/trace.h trace_summarize).
 * DESCRIPTION
 *  The records are built by the engine's own codecs (mq_event_to_json,
 *  history_attempt_json) and read back as ctl_trace() reads them, so the
 *  round trip is what is tested: an attempt that delivered one
 *  recipient, bounced one (5.1.1) and deferred one is "queued" at its
 *  retry level; the retry that delivers the third makes it "done" with
 *  two attempts for that recipient; a "sending" ledger mark makes it
 *  "in_flight"; a dead letter "dead" with its reason.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "control/trace.h"
#include "deliverer/history.h"
#include "queue/event.h"

#define T0 1795453200123ull /* 2026-11-23T17:00:00.123Z */

static void push(json_t *recs, char *json)
{
    json_error_t e;
    json_t *o = json_loads(json, 0, &e);
    if (o == NULL)
        fail_msg("bad JSON %s: %s", json, e.text);
    json_array_append_new(recs, o);
    free(json);
}

static void push_event(json_t *recs, const char *event, const char *rcpt, int code, const char *enh,
                       const char *text, const char *reason, unsigned attempt, uint64_t ts)
{
    mq_event_t ev = {
        .event = event, .message_id = "m-1", .tenant = "acme", .campaign = "spring",
        .sender = "alice@test.example", .recipient = rcpt, .reason = reason, .smtp_code = code,
        .smtp_enhanced = enh, .smtp_text = text, .mx_host = "mx1.test.example", .mx_addr = "127.0.0.2",
        .source = "s1", .attempt = attempt, .ts_ms = ts,
    };
    push(recs, mq_event_to_json(&ev));
}

static void push_attempt(json_t *recs, unsigned attempt, uint64_t start, int retrying)
{
    history_attempt_t a = {
        .message_id = "m-1", .attempt = attempt, .started_ms = start, .finished_ms = start + 500,
        .recipients = 3, .retrying = retrying, .retry_level = 2, .retry_queue = "mail.retry.5m",
        .retry_delay_ms = 300000, .retry_attempt = attempt + 1,
    };
    push(recs, history_attempt_json(&a));
}

/* Attempt 1: a delivered, b bounced 5.1.1, c deferred with a retry. */
static json_t *first_attempt(void)
{
    json_t *recs = json_array();
    push_attempt(recs, 1, T0, 1);
    push_event(recs, "delivered", "a@test.example", 250, "2.0.0", "ok", NULL, 1, T0 + 100);
    push_event(recs, "bounced", "b@test.example", 550, "5.1.1", "no such user", "unknown_user", 1, T0 + 110);
    push_event(recs, "deferred", "c@test.example", 451, "4.2.0", "try later", "temporary", 1, T0 + 120);
    return recs;
}

static const json_t *rcpt(const json_t *t, size_t i)
{
    return json_array_get(json_object_get(t, "recipients"), i);
}

static const char *s(const json_t *o, const char *key)
{
    const char *v = json_string_value(json_object_get(o, key));
    return v ? v : "(none)";
}

static long long n(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    assert_non_null(v);
    return (long long)json_integer_value(v);
}

static void test_attempt_record(void **state)
{
    (void)state;
    history_attempt_t a = {
        .message_id = "m-1", .attempt = 3, .started_ms = T0, .finished_ms = T0 + 1000, .recipients = 2,
        .retrying = 1, .retry_level = 1, .retry_queue = "mail.retry.1m", .retry_delay_ms = 60000,
        .retry_attempt = 4, .give_up = "",
    };
    char *got = history_attempt_json(&a);
    assert_string_equal(got, "{\"event\":\"attempt\",\"message_id\":\"m-1\",\"attempt\":3,"
                             "\"ts\":\"2026-11-23T17:00:00.123Z\",\"started_ms\":1795453200123,"
                             "\"finished_ms\":1795453201123,\"recipients\":2,\"retry\":{\"level\":1,"
                             "\"queue\":\"mail.retry.1m\",\"delay_ms\":60000,\"due\":\"2026-11-23T17:01:01.123Z\","
                             "\"due_ms\":1795453261123,\"attempt\":4}}");
    free(got);
    history_attempt_t d = { .message_id = "m-2", .attempt = 1, .started_ms = T0, .finished_ms = T0, .omitted = 5,
                            .dead_reason = "invalid JSON: \xff", .dead_queue = "mail.dead" };
    got = history_attempt_json(&d);
    assert_string_equal(got, "{\"event\":\"attempt\",\"message_id\":\"m-2\",\"attempt\":1,"
                             "\"ts\":\"2026-11-23T17:00:00.123Z\",\"started_ms\":1795453200123,"
                             "\"finished_ms\":1795453200123,\"recipients\":0,\"omitted\":5,"
                             "\"dead\":{\"reason\":\"invalid JSON: ?\",\"queue\":\"mail.dead\"}}");
    free(got);
    char *key = history_key("m-1");
    assert_string_equal(key, "mp:h:m-1");
    free(key);
}

static void test_queued_after_a_deferral(void **state)
{
    (void)state;
    json_t *recs = first_attempt();
    json_t *ledger = json_pack("{s:s,s:s}", "a@test.example", "done", "c@test.example", "retried:h1");
    json_t *t = trace_summarize("m-1", recs, ledger, T0 + 1000);
    assert_string_equal(s(t, "state"), "queued");
    const json_t *w = json_object_get(t, "where");
    assert_int_equal(n(w, "level"), 2);
    assert_string_equal(s(w, "queue"), "mail.retry.5m");
    assert_int_equal(n(w, "delay_ms"), 300000);
    assert_int_equal(n(w, "due_ms"), T0 + 500 + 300000);
    assert_int_equal(n(w, "attempt"), 2);
    assert_false(json_is_true(json_object_get(w, "overdue")));
    assert_int_equal(json_array_size(json_object_get(w, "pending")), 1);
    assert_string_equal(json_string_value(json_array_get(json_object_get(w, "pending"), 0)), "c@test.example");
    assert_string_equal(s(t, "tenant"), "acme");
    assert_string_equal(s(t, "campaign"), "spring");
    assert_string_equal(s(t, "sender"), "alice@test.example");
    assert_int_equal(n(t, "attempts"), 1);
    assert_int_equal(json_array_size(json_object_get(t, "recipients")), 3);
    assert_string_equal(s(rcpt(t, 0), "outcome"), "delivered");
    assert_string_equal(s(rcpt(t, 0), "ledger"), "done");
    assert_string_equal(s(rcpt(t, 1), "outcome"), "bounced");
    assert_string_equal(s(rcpt(t, 1), "reason"), "unknown_user");
    const json_t *last = json_object_get(rcpt(t, 1), "last");
    assert_int_equal(n(last, "code"), 550);
    assert_string_equal(s(last, "enhanced"), "5.1.1");
    assert_string_equal(s(last, "text"), "no such user");
    assert_string_equal(s(last, "mx_host"), "mx1.test.example");
    assert_string_equal(s(last, "mx_addr"), "127.0.0.2");
    assert_string_equal(s(last, "source"), "s1");
    assert_string_equal(s(last, "ts"), "2026-11-23T17:00:00.233Z");
    assert_int_equal(n(last, "attempt"), 1);
    assert_string_equal(s(rcpt(t, 2), "outcome"), "deferred");
    assert_int_equal(n(rcpt(t, 2), "attempts"), 1);
    assert_int_equal(json_array_size(json_object_get(t, "history")), 4);
    json_decref(t);
    /* its delay is over and nothing newer is recorded: overdue */
    t = trace_summarize("m-1", recs, ledger, T0 + 500 + 300001);
    assert_string_equal(s(t, "state"), "queued");
    assert_true(json_is_true(json_object_get(json_object_get(t, "where"), "overdue")));
    json_decref(t);
    json_decref(ledger);
    json_decref(recs);
}

static void test_done_after_the_retry(void **state)
{
    (void)state;
    json_t *recs = first_attempt();
    push_attempt(recs, 2, T0 + 400000, 0);
    push_event(recs, "delivered", "c@test.example", 250, "2.0.0", "ok", NULL, 2, T0 + 400100);
    json_t *t = trace_summarize("m-1", recs, NULL, T0 + 500000);
    assert_string_equal(s(t, "state"), "done");
    const json_t *w = json_object_get(t, "where");
    assert_int_equal(n(w, "attempts"), 2);
    assert_string_equal(s(w, "finished"), "2026-11-23T17:06:40.223Z");
    assert_int_equal(n(t, "attempts"), 2);
    assert_string_equal(s(rcpt(t, 2), "outcome"), "delivered");
    assert_int_equal(n(rcpt(t, 2), "attempts"), 2);
    assert_int_equal(n(json_object_get(rcpt(t, 2), "last"), "attempt"), 2);
    assert_int_equal(n(rcpt(t, 0), "attempts"), 1);
    json_decref(t);
    json_decref(recs);
}

static void test_in_flight_from_the_ledger(void **state)
{
    (void)state;
    json_t *recs = first_attempt();
    json_t *ledger = json_pack("{s:s}", "c@test.example", "sending");
    json_t *t = trace_summarize("m-1", recs, ledger, T0 + 400000);
    assert_string_equal(s(t, "state"), "in_flight");
    const json_t *f = json_array_get(json_object_get(json_object_get(t, "where"), "recipients"), 0);
    assert_string_equal(s(f, "recipient"), "c@test.example");
    assert_string_equal(s(f, "ledger"), "sending");
    json_decref(t);
    json_decref(ledger);
    /* a first attempt still running: no history, only the ledger */
    json_t *none = json_array();
    ledger = json_pack("{s:s,s:s}", "x@test.example", "retry:h2", "y@test.example", "done");
    t = trace_summarize("m-3", none, ledger, T0);
    assert_string_equal(s(t, "state"), "in_flight");
    assert_int_equal(json_array_size(json_object_get(json_object_get(t, "where"), "recipients")), 1);
    assert_int_equal(json_array_size(json_object_get(t, "recipients")), 2);
    assert_string_equal(s(rcpt(t, 1), "outcome"), "unknown");
    json_decref(t);
    json_decref(ledger);
    /* the ledger alone with nothing running settles nothing */
    ledger = json_pack("{s:s}", "y@test.example", "done");
    t = trace_summarize("m-3", none, ledger, T0);
    assert_string_equal(s(t, "state"), "unknown");
    json_decref(t);
    json_decref(ledger);
    json_decref(none);
    json_decref(recs);
}

static void test_dead_and_suppressed(void **state)
{
    (void)state;
    json_t *recs = json_array();
    history_attempt_t a = { .message_id = "m-4", .attempt = 1, .started_ms = T0, .finished_ms = T0,
                            .dead_reason = "invalid message: no recipients", .dead_queue = "mail.dead" };
    push(recs, history_attempt_json(&a));
    mq_event_t ev = { .event = "dead", .message_id = "m-4", .error = "invalid message: no recipients",
                      .attempt = 1, .ts_ms = T0 };
    push(recs, mq_event_to_json(&ev));
    json_t *t = trace_summarize("m-4", recs, NULL, T0);
    assert_string_equal(s(t, "state"), "dead");
    const json_t *w = json_object_get(t, "where");
    assert_string_equal(s(w, "reason"), "invalid message: no recipients");
    assert_string_equal(s(w, "queue"), "mail.dead");
    assert_int_equal(n(w, "attempt"), 1);
    assert_int_equal(json_array_size(json_object_get(t, "recipients")), 0);
    json_decref(t);
    json_decref(recs);

    recs = json_array();
    push_attempt(recs, 1, T0, 0);
    push_event(recs, "bounced", "s@test.example", 0, NULL, NULL, "suppressed", 1, T0);
    push_event(recs, "delivered", "a@test.example", 250, "2.0.0", "ok", NULL, 1, T0);
    t = trace_summarize("m-5", recs, NULL, T0);
    assert_string_equal(s(t, "state"), "done");
    assert_string_equal(s(rcpt(t, 0), "outcome"), "suppressed");
    json_decref(t);
    /* a recipient left deferred without a retry planned is not done */
    push_event(recs, "deferred", "d@test.example", 451, "4.2.0", "later", NULL, 1, T0);
    t = trace_summarize("m-5", recs, NULL, T0);
    assert_string_equal(s(t, "state"), "unknown");
    json_decref(t);
    json_decref(recs);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attempt_record),
        cmocka_unit_test(test_queued_after_a_deferral),
        cmocka_unit_test(test_done_after_the_retry),
        cmocka_unit_test(test_in_flight_from_the_ledger),
        cmocka_unit_test(test_dead_and_suppressed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

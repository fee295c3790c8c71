/*
 * SUMMARY
 *  tests/unit/test_event.c - queue/event: the JSON of a delivery event.
 * DESCRIPTION
 *  Whole events compared byte for byte, so the fields, their order and
 *  what is omitted are all checked: an event as it always was, the same
 *  event with the sender fields (tenant, campaign, pool) and the egress
 *  fields (source, source_addr, shaping), and message-level events.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "queue/event.h"

#define TS 1795453200123ull /* 2026-11-23T17:00:00.123Z */

static void assert_event(const mq_event_t *ev, const char *want)
{
    char *got = mq_event_to_json(ev);
    if (strcmp(got, want) != 0)
        fail_msg("got  %s\nwant %s", got, want);
    free(got);
}

static mq_event_t delivered_event(void)
{
    mq_event_t ev = {
        .event = "delivered",
        .message_id = "m-1",
        .trace_id = "req-42",
        .sender = "alice@test.example",
        .recipient = "bob@test.example",
        .outcome = "delivered",
        .reason = "delivered",
        .smtp_code = 250,
        .smtp_enhanced = "2.0.0",
        .smtp_text = "Ok",
        .mx_host = "mx1.test.example",
        .mx_addr = "127.0.0.2",
        .tls_version = "TLSv1.3",
        .tls_cipher = "TLS_AES_256_GCM_SHA384",
        .attempt = 1,
        .age_ms = 118,
        .ts_ms = TS,
    };
    return ev;
}

/* Without the new fields an event is exactly what it was before them. */
static void test_event_without_sender_fields(void **state)
{
    (void)state;
    mq_event_t ev = delivered_event();
    assert_event(&ev, "{\"event\":\"delivered\",\"message_id\":\"m-1\",\"trace_id\":\"req-42\","
                      "\"from\":\"alice@test.example\",\"recipient\":\"bob@test.example\","
                      "\"outcome\":\"delivered\",\"reason\":\"delivered\","
                      "\"smtp\":{\"code\":250,\"enhanced\":\"2.0.0\",\"text\":\"Ok\"},"
                      "\"mx_host\":\"mx1.test.example\",\"mx_addr\":\"127.0.0.2\","
                      "\"tls\":{\"version\":\"TLSv1.3\",\"cipher\":\"TLS_AES_256_GCM_SHA384\"},"
                      "\"attempt\":1,\"age_ms\":118,\"ts\":\"2026-11-23T17:00:00.123Z\"}");
    /* empty egress strings count as absent too */
    ev.source = "";
    ev.source_addr = "";
    ev.shaping = "";
    char *got = mq_event_to_json(&ev);
    assert_null(strstr(got, "source"));
    assert_null(strstr(got, "shaping"));
    free(got);
}

static void test_event_with_sender_fields(void **state)
{
    (void)state;
    mq_event_t ev = delivered_event();
    ev.tenant = "acme";
    ev.campaign = "spring:2026/news";
    ev.pool = "marketing";
    ev.source = "mta1";
    ev.source_addr = "192.0.2.10";
    ev.shaping = "suspend:automation:yahoo-deferral";
    assert_event(&ev, "{\"event\":\"delivered\",\"message_id\":\"m-1\",\"trace_id\":\"req-42\","
                      "\"tenant\":\"acme\",\"campaign\":\"spring:2026/news\",\"pool\":\"marketing\","
                      "\"from\":\"alice@test.example\",\"recipient\":\"bob@test.example\","
                      "\"outcome\":\"delivered\",\"reason\":\"delivered\","
                      "\"smtp\":{\"code\":250,\"enhanced\":\"2.0.0\",\"text\":\"Ok\"},"
                      "\"mx_host\":\"mx1.test.example\",\"mx_addr\":\"127.0.0.2\","
                      "\"source\":\"mta1\",\"source_addr\":\"192.0.2.10\","
                      "\"shaping\":\"suspend:automation:yahoo-deferral\","
                      "\"tls\":{\"version\":\"TLSv1.3\",\"cipher\":\"TLS_AES_256_GCM_SHA384\"},"
                      "\"attempt\":1,\"age_ms\":118,\"ts\":\"2026-11-23T17:00:00.123Z\"}");
}

/* A suppressed recipient: the list, the entry's reason and when it was
 * added (Unix seconds, printed UTC). */
static void test_event_suppressed(void **state)
{
    (void)state;
    mq_event_t ev = {
        .event = "suppressed",
        .message_id = "m-1",
        .tenant = "acme",
        .sender = "alice@test.example",
        .recipient = "bob@test.example",
        .outcome = "permanent",
        .reason = "suppressed",
        .error = "on the tenant's suppression list: no_such_user",
        .attempt = 1,
        .age_ms = 3,
        .suppression_list = "acme",
        .suppression_reason = "no_such_user",
        .suppression_added_s = 1795453200,
        .ts_ms = TS,
    };
    assert_event(&ev, "{\"event\":\"suppressed\",\"message_id\":\"m-1\",\"tenant\":\"acme\","
                      "\"from\":\"alice@test.example\",\"recipient\":\"bob@test.example\","
                      "\"outcome\":\"permanent\",\"reason\":\"suppressed\",\"attempt\":1,"
                      "\"error\":\"on the tenant's suppression list: no_such_user\",\"age_ms\":3,"
                      "\"suppression\":{\"list\":\"acme\",\"reason\":\"no_such_user\","
                      "\"added\":\"2026-11-23T17:00:00Z\"},\"ts\":\"2026-11-23T17:00:00.123Z\"}");
}

/* Each field on its own: present alone, the others omitted. */
static void test_event_fields_one_by_one(void **state)
{
    (void)state;
    static const char *const keys[] = { "tenant", "campaign", "pool", "source", "source_addr", "shaping" };
    for (size_t k = 0; k < 6; k++) {
        mq_event_t ev = { .event = "deferred", .message_id = "m-2", .sender = "a@test.example",
                          .recipient = "b@test.example", .outcome = "transient", .reason = "parked",
                          .attempt = 2, .retry_in_ms = 30000, .age_ms = 5, .ts_ms = TS };
        const char **slot[] = { &ev.tenant, &ev.campaign, &ev.pool, &ev.source, &ev.source_addr, &ev.shaping };
        *slot[k] = "v-1";
        char want[512];
        snprintf(want, sizeof(want),
                 "{\"event\":\"deferred\",\"message_id\":\"m-2\",%s%s%s\"from\":\"a@test.example\","
                 "\"recipient\":\"b@test.example\",\"outcome\":\"transient\",\"reason\":\"parked\",%s%s%s"
                 "\"attempt\":2,\"retry_in_ms\":30000,\"age_ms\":5,\"ts\":\"2026-11-23T17:00:00.123Z\"}",
                 k == 0 ? "\"tenant\":\"v-1\"," : "", k == 1 ? "\"campaign\":\"v-1\"," : "",
                 k == 2 ? "\"pool\":\"v-1\"," : "", k == 3 ? "\"source\":\"v-1\"," : "",
                 k == 4 ? "\"source_addr\":\"v-1\"," : "", k == 5 ? "\"shaping\":\"v-1\"," : "");
        char *got = mq_event_to_json(&ev);
        if (strcmp(got, want) != 0)
            fail_msg("%s:\ngot  %s\nwant %s", keys[k], got, want);
        free(got);
    }
}

/* A dead event of a message that has the sender fields (job.c sets them
 * whenever the body parsed). */
static void test_event_dead(void **state)
{
    (void)state;
    mq_event_t ev = { .event = "dead", .message_id = "m-3", .tenant = "acme", .pool = "bulk",
                      .error = "too many recipients", .attempt = 1, .ts_ms = TS };
    assert_event(&ev, "{\"event\":\"dead\",\"message_id\":\"m-3\",\"tenant\":\"acme\",\"pool\":\"bulk\","
                      "\"attempt\":1,\"error\":\"too many recipients\",\"age_ms\":0,"
                      "\"ts\":\"2026-11-23T17:00:00.123Z\"}");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_event_without_sender_fields),
        cmocka_unit_test(test_event_with_sender_fields),
        cmocka_unit_test(test_event_fields_one_by_one),
        cmocka_unit_test(test_event_dead),
        cmocka_unit_test(test_event_suppressed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

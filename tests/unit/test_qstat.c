/*
 * Unit tests for deliverer/qstat: the worker's decaying destination
 * table, the merging and sorting of destination rows, and the status
 * record's JSON both ways.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deliverer/qstat.h"

#define T0 (1700000040000ULL) /* on a minute boundary */

static void test_table_counts_and_decays(void **state)
{
    (void)state;
    static qstat_table_t t;
    memset(&t, 0, sizeof(t));
    qstat_note(&t, "example.com", 0, "451 4.7.1 try later", T0);
    qstat_note(&t, "example.com", 0, NULL, T0 + 1000);
    qstat_note(&t, "example.com", 1, NULL, T0 + 2000);
    qstat_note(&t, "other.net", 1, NULL, T0 + 61000);
    assert_int_equal(t.n, 2);
    assert_int_equal(qstat_recent(&t.d[0], 0, T0 + 2000), 2);
    assert_int_equal(qstat_recent(&t.d[0], 1, T0 + 2000), 1);
    assert_string_equal(t.d[0].last_error, "451 4.7.1 try later"); /* NULL keeps the last one */
    assert_int_equal(t.d[0].last_error_ms, T0);

    qstat_row_t rows[8];
    size_t n = qstat_table_rows(&t, rows, 8, T0 + 61000);
    assert_int_equal(n, 2);
    assert_string_equal(rows[0].dest, "example.com");
    assert_int_equal(rows[0].deferred, 2);
    assert_int_equal(rows[0].parked, 1);
    assert_int_equal(rows[0].waiting, 0);
    assert_string_equal(rows[0].last_error, "451 4.7.1 try later");

    /* 15 minutes later the first minute's counts are gone, the error too */
    uint64_t later = T0 + QSTAT_WINDOW_MS + 1000;
    assert_int_equal(qstat_recent(&t.d[0], 0, later), 0);
    n = qstat_table_rows(&t, rows, 8, later);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].dest, "other.net");
    assert_int_equal(rows[0].parked, 1);
    assert_string_equal(rows[0].last_error, "");
    qstat_expire(&t, later);
    assert_int_equal(t.n, 1);
    assert_string_equal(t.d[0].name, "other.net");

    /* a bucket reused a window later starts from zero */
    qstat_note(&t, "other.net", 1, NULL, T0 + 61000 + QSTAT_WINDOW_MS);
    assert_int_equal(qstat_recent(&t.d[0], 1, T0 + 61000 + QSTAT_WINDOW_MS), 1);
}

static void test_table_bounded(void **state)
{
    (void)state;
    static qstat_table_t t;
    memset(&t, 0, sizeof(t));
    char name[32];
    for (int i = 0; i < QSTAT_DESTS; i++) {
        snprintf(name, sizeof(name), "d%d.example", i);
        qstat_note(&t, name, 0, "x", T0 + (uint64_t)i);
    }
    assert_int_equal(t.n, QSTAT_DESTS);
    qstat_note(&t, "d0.example", 0, "x", T0 + 100); /* d1 is now the least recent */
    qstat_note(&t, "new.example", 0, "y", T0 + 200);
    assert_int_equal(t.n, QSTAT_DESTS);
    int have_d1 = 0, have_new = 0, have_d0 = 0;
    for (size_t i = 0; i < t.n; i++) {
        have_d0 += strcmp(t.d[i].name, "d0.example") == 0;
        have_d1 += strcmp(t.d[i].name, "d1.example") == 0;
        if (strcmp(t.d[i].name, "new.example") == 0) {
            have_new++;
            assert_int_equal(qstat_recent(&t.d[i], 0, T0 + 200), 1);
        }
    }
    assert_int_equal(have_d0, 1);
    assert_int_equal(have_d1, 0);
    assert_int_equal(have_new, 1);
}

static qstat_row_t row(const char *d, uint64_t w, uint64_t p, uint64_t f, const char *e, uint64_t et)
{
    qstat_row_t r;
    memset(&r, 0, sizeof(r));
    snprintf(r.dest, sizeof(r.dest), "%s", d);
    r.waiting = w;
    r.parked = p;
    r.deferred = f;
    snprintf(r.last_error, sizeof(r.last_error), "%s", e);
    r.last_error_ms = et;
    return r;
}

static void test_merge_and_sort(void **state)
{
    (void)state;
    qstat_row_t acc[4];
    qstat_row_t a[] = { row("a.example", 1, 0, 5, "451 a-old", 10), row("b.example", 3, 0, 0, "", 0) };
    qstat_row_t b[] = { row("a.example", 4, 2, 1, "421 a-new", 20), row("c.example", 0, 0, 9, "452 c", 5),
                        row("d.example", 0, 1, 9, "", 0), row("e.example", 0, 0, 0, "", 0) };
    size_t n = qstat_merge(acc, 0, 4, a, 2);
    assert_int_equal(n, 2);
    assert_string_equal(acc[0].dest, "b.example"); /* waiting 3 before 1 */
    n = qstat_merge(acc, n, 4, b, 4);
    assert_int_equal(n, 4); /* e.example found no room */
    assert_string_equal(acc[0].dest, "a.example");
    assert_int_equal(acc[0].waiting, 5);
    assert_int_equal(acc[0].parked, 2);
    assert_int_equal(acc[0].deferred, 6);
    assert_string_equal(acc[0].last_error, "421 a-new"); /* the latest */
    assert_int_equal(acc[0].last_error_ms, 20);
    assert_string_equal(acc[1].dest, "b.example");
    /* equal waiting and deferred: more parked first */
    assert_string_equal(acc[2].dest, "d.example");
    assert_string_equal(acc[3].dest, "c.example");
    assert_string_equal(acc[3].last_error, "452 c");

    /* an older error does not replace a newer one */
    qstat_row_t old[] = { row("a.example", 0, 0, 0, "550 older", 15) };
    n = qstat_merge(acc, n, 4, old, 1);
    assert_string_equal(acc[0].last_error, "421 a-new");
}

static void test_codec_round_trip(void **state)
{
    (void)state;
    qstat_record_t r, back;
    memset(&r, 0, sizeof(r));
    snprintf(r.queue, sizeof(r.queue), "mail.outbound");
    snprintf(r.host, sizeof(r.host), "pod-1");
    r.pid = 4242;
    r.worker = 3;
    r.inflight = 17;
    r.inflight_bytes = 123456;
    r.smtp_connections = 9;
    r.oldest_first_seen_ms = T0 - 5000;
    r.updated_ms = T0;
    r.rows[0] = row("a.example", 2, 1, 3, "451 4.7.1 \"greylisted\"", T0 - 100);
    r.rows[1] = row("b.example", 0, 0, 1, "bad \xff byte", T0 - 200);
    r.nrows = 2;
    char *s = qstat_encode(&r);
    assert_non_null(strstr(s, "\"inflight\":17"));
    assert_int_equal(qstat_decode(s, strlen(s), &back), 0);
    free(s);
    assert_string_equal(back.queue, "mail.outbound");
    assert_string_equal(back.host, "pod-1");
    assert_int_equal(back.pid, 4242);
    assert_int_equal(back.worker, 3);
    assert_int_equal(back.inflight, 17);
    assert_int_equal(back.inflight_bytes, 123456);
    assert_int_equal(back.smtp_connections, 9);
    assert_int_equal(back.oldest_first_seen_ms, T0 - 5000);
    assert_int_equal(back.updated_ms, T0);
    assert_int_equal(back.nrows, 2);
    assert_string_equal(back.rows[0].dest, "a.example");
    assert_int_equal(back.rows[0].waiting, 2);
    assert_int_equal(back.rows[0].parked, 1);
    assert_int_equal(back.rows[0].deferred, 3);
    assert_string_equal(back.rows[0].last_error, "451 4.7.1 \"greylisted\"");
    assert_int_equal(back.rows[0].last_error_ms, T0 - 100);
    assert_string_equal(back.rows[1].last_error, "bad ? byte"); /* not UTF-8: replaced */
}

static void test_decode_rejects(void **state)
{
    (void)state;
    qstat_record_t r;
    const char *bad[] = {
        "",
        "[]",
        "{\"host\":\"h\"}",
        "{\"queue\":\"q\",\"host\":\"h\",\"pid\":1,\"worker\":0,\"inflight\":-1,\"inflight_bytes\":0,"
        "\"smtp_connections\":0,"
        "\"oldest_first_seen_ms\":0,\"updated_ms\":0,\"dests\":[]}",
        "{\"queue\":\"q\",\"host\":\"h\",\"pid\":1,\"worker\":0,\"inflight\":1,\"inflight_bytes\":0,"
        "\"smtp_connections\":0,"
        "\"oldest_first_seen_ms\":0,\"updated_ms\":0,\"dests\":[{\"d\":\"x\"}]}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(qstat_decode(bad[i], strlen(bad[i]), &r), -1);
    const char *ok = "{\"queue\":\"q\",\"host\":\"h\",\"pid\":1,\"worker\":0,\"inflight\":1,\"inflight_bytes\":0,"
                     "\"smtp_connections\":0,\"oldest_first_seen_ms\":0,\"updated_ms\":0,\"dests\":[]}";
    assert_int_equal(qstat_decode(ok, strlen(ok), &r), 0);
    assert_int_equal(r.nrows, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table_counts_and_decays),
        cmocka_unit_test(test_table_bounded),
        cmocka_unit_test(test_merge_and_sort),
        cmocka_unit_test(test_codec_round_trip),
        cmocka_unit_test(test_decode_rejects),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

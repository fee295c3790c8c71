/*
 * SUMMARY
 *  tests/unit/test_metrics.c - metrics/: the labeled families of
 *  recipient outcomes (by tenant, pool, source) and their exposition.
 * DESCRIPTION
 *  Registered values, "other" for anything else and "none" for no value;
 *  the /metrics text of a family compared whole (HELP, TYPE, every
 *  series, label values escaped); the bound on registered values; and
 *  counting from several threads at once. The families are process-wide,
 *  so each test uses a family of its own or values of its own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include <cmocka.h>

#include "core/buf.h"
#include "metrics/metrics.h"

/* The lines of one family in the /metrics text, from its HELP to the
 * next HELP. */
static char *family_text(const char *metric)
{
    buf_t b = BUF_INIT;
    metrics_render(&b);
    char head[128];
    snprintf(head, sizeof(head), "# HELP %s ", metric);
    const char *all = buf_head(&b);
    const char *start = strstr(all, head);
    assert_non_null(start);
    const char *end = strstr(start + 1, "# HELP ");
    size_t n = end ? (size_t)(end - start) : strlen(start);
    char *s = malloc(n + 1);
    memcpy(s, start, n);
    s[n] = '\0';
    buf_free(&b);
    return s;
}

static void test_outcome_names(void **state)
{
    (void)state;
    static const char *const want[] = { "delivered", "bounced", "deferred", "dead", "suppressed", "parked" };
    assert_int_equal(MET_OUT_LAST, 6);
    for (int i = 0; i < MET_OUT_LAST; i++)
        assert_string_equal(metrics_outcome_name(i), want[i]);
    assert_null(metrics_outcome_name(-1));
    assert_null(metrics_outcome_name(MET_OUT_LAST));
}

/* The tenant family: registered names, other and none, rendered in a
 * fixed order (none, the names sorted, other), zeros included. */
static void test_tenant_family(void **state)
{
    (void)state;
    assert_int_equal(metrics_label_add_list(MET_FAM_TENANT, "zeta, acme beta,,acme none other"), 3);
    metrics_label_add(MET_FAM_TENANT, "acme"); /* again: nothing new */
    metrics_label_add(MET_FAM_TENANT, "");
    metrics_count_labeled(MET_FAM_TENANT, "acme", MET_OUT_DELIVERED);
    metrics_count_labeled(MET_FAM_TENANT, "acme", MET_OUT_DELIVERED);
    metrics_count_labeled(MET_FAM_TENANT, "beta", MET_OUT_PARKED);
    metrics_count_labeled(MET_FAM_TENANT, "zeta", MET_OUT_DEAD);
    metrics_count_labeled(MET_FAM_TENANT, "unknown-1", MET_OUT_BOUNCED); /* not registered: other */
    metrics_count_labeled(MET_FAM_TENANT, "unknown-2", MET_OUT_BOUNCED);
    metrics_count_labeled(MET_FAM_TENANT, "other", MET_OUT_BOUNCED);     /* a tenant named "other": other */
    metrics_count_labeled(MET_FAM_TENANT, "none", MET_OUT_DEFERRED);     /* one named "none": other too */
    metrics_count_labeled(MET_FAM_TENANT, NULL, MET_OUT_SUPPRESSED);
    metrics_count_labeled(MET_FAM_TENANT, "acme", -1);                   /* out of range: nothing */
    metrics_count_labeled(MET_FAM_TENANT, "acme", MET_OUT_LAST);
    assert_int_equal(metrics_labeled(MET_FAM_TENANT, "acme", MET_OUT_DELIVERED), 2);
    assert_int_equal(metrics_labeled(MET_FAM_TENANT, "other", MET_OUT_BOUNCED), 3);
    assert_int_equal(metrics_labeled(MET_FAM_TENANT, "unknown-1", MET_OUT_BOUNCED), 3);
    assert_int_equal(metrics_labeled(MET_FAM_TENANT, NULL, MET_OUT_SUPPRESSED), 1);
    assert_int_equal(metrics_labeled(MET_FAM_TENANT, "none", MET_OUT_SUPPRESSED), 1);
    char *got = family_text("mailpump_recipients_by_tenant_total");
    const char *want =
        "# HELP mailpump_recipients_by_tenant_total Recipient outcomes by the message's tenant: the names of "
        "[metrics] tenants, other for any other tenant, none for a message without one.\n"
        "# TYPE mailpump_recipients_by_tenant_total counter\n"
        "mailpump_recipients_by_tenant_total{tenant=\"none\",outcome=\"delivered\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"none\",outcome=\"bounced\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"none\",outcome=\"deferred\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"none\",outcome=\"dead\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"none\",outcome=\"suppressed\"} 1\n"
        "mailpump_recipients_by_tenant_total{tenant=\"none\",outcome=\"parked\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"acme\",outcome=\"delivered\"} 2\n"
        "mailpump_recipients_by_tenant_total{tenant=\"acme\",outcome=\"bounced\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"acme\",outcome=\"deferred\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"acme\",outcome=\"dead\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"acme\",outcome=\"suppressed\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"acme\",outcome=\"parked\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"beta\",outcome=\"delivered\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"beta\",outcome=\"bounced\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"beta\",outcome=\"deferred\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"beta\",outcome=\"dead\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"beta\",outcome=\"suppressed\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"beta\",outcome=\"parked\"} 1\n"
        "mailpump_recipients_by_tenant_total{tenant=\"zeta\",outcome=\"delivered\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"zeta\",outcome=\"bounced\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"zeta\",outcome=\"deferred\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"zeta\",outcome=\"dead\"} 1\n"
        "mailpump_recipients_by_tenant_total{tenant=\"zeta\",outcome=\"suppressed\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"zeta\",outcome=\"parked\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"other\",outcome=\"delivered\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"other\",outcome=\"bounced\"} 3\n"
        "mailpump_recipients_by_tenant_total{tenant=\"other\",outcome=\"deferred\"} 1\n"
        "mailpump_recipients_by_tenant_total{tenant=\"other\",outcome=\"dead\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"other\",outcome=\"suppressed\"} 0\n"
        "mailpump_recipients_by_tenant_total{tenant=\"other\",outcome=\"parked\"} 0\n";
    if (strcmp(got, want) != 0)
        fail_msg("got:\n%s\nwant:\n%s", got, want);
    free(got);
}

/* Label values are escaped per the text format (\\, \", \n); a family
 * with nothing registered has just none and other. */
static void test_escaping_and_empty(void **state)
{
    (void)state;
    char *got = family_text("mailpump_recipients_by_pool_total");
    assert_non_null(strstr(got, "# TYPE mailpump_recipients_by_pool_total counter\n"
                                "mailpump_recipients_by_pool_total{pool=\"none\",outcome=\"delivered\"} 0\n"));
    assert_non_null(strstr(got, "mailpump_recipients_by_pool_total{pool=\"none\",outcome=\"parked\"} 0\n"
                                "mailpump_recipients_by_pool_total{pool=\"other\",outcome=\"delivered\"} 0\n"));
    size_t lines = 0;
    for (const char *p = got; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 2 + 2 * MET_OUT_LAST);
    free(got);

    metrics_label_add(MET_FAM_SOURCE, "a\"b\\c\nd");
    metrics_count_labeled(MET_FAM_SOURCE, "a\"b\\c\nd", MET_OUT_DELIVERED);
    got = family_text("mailpump_recipients_by_source_total");
    assert_non_null(strstr(got, "mailpump_recipients_by_source_total{source=\"a\\\"b\\\\c\\nd\",outcome=\"delivered\"} 1\n"));
    for (const char *p = strchr(got, '\n'); p && p[1]; p = strchr(p + 1, '\n'))
        assert_true(p[1] == '#' || strncmp(p + 1, "mailpump_recipients_by_source_total{", 36) == 0);
    free(got);
}

/* At most METRICS_LABELS_MAX values: what comes later counts as other. */
static void test_bounded(void **state)
{
    (void)state;
    char name[32];
    for (int i = 0; i < METRICS_LABELS_MAX + 10; i++) {
        snprintf(name, sizeof(name), "p%05d", i);
        metrics_label_add(MET_FAM_POOL, name);
    }
    snprintf(name, sizeof(name), "p%05d", METRICS_LABELS_MAX - 1);
    metrics_count_labeled(MET_FAM_POOL, name, MET_OUT_DEFERRED);
    assert_int_equal(metrics_labeled(MET_FAM_POOL, name, MET_OUT_DEFERRED), 1);
    assert_int_equal(metrics_labeled(MET_FAM_POOL, "other", MET_OUT_DEFERRED), 0);
    snprintf(name, sizeof(name), "p%05d", METRICS_LABELS_MAX);
    metrics_count_labeled(MET_FAM_POOL, name, MET_OUT_DEFERRED);
    assert_int_equal(metrics_labeled(MET_FAM_POOL, "other", MET_OUT_DEFERRED), 1);
    char *got = family_text("mailpump_recipients_by_pool_total");
    size_t lines = 0;
    for (const char *p = got; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 2 + (METRICS_LABELS_MAX + 2) * MET_OUT_LAST);
    assert_null(strstr(got, name));
    free(got);
}

/* Counting from several threads loses nothing. */
#define THREADS 4
#define PER_THREAD 100000

static void *count_many(void *arg)
{
    (void)arg;
    for (int i = 0; i < PER_THREAD; i++) {
        metrics_count_labeled(MET_FAM_SOURCE, "mta1", MET_OUT_DELIVERED);
        metrics_count_labeled(MET_FAM_SOURCE, "mta-unknown", MET_OUT_BOUNCED);
    }
    return NULL;
}

static void test_threads(void **state)
{
    (void)state;
    metrics_label_add(MET_FAM_SOURCE, "mta1");
    uint64_t other0 = metrics_labeled(MET_FAM_SOURCE, "other", MET_OUT_BOUNCED);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, count_many, NULL), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(metrics_labeled(MET_FAM_SOURCE, "mta1", MET_OUT_DELIVERED), THREADS * PER_THREAD);
    assert_int_equal(metrics_labeled(MET_FAM_SOURCE, "other", MET_OUT_BOUNCED) - other0, THREADS * PER_THREAD);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_outcome_names),
        cmocka_unit_test(test_tenant_family),
        cmocka_unit_test(test_escaping_and_empty),
        cmocka_unit_test(test_bounded),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

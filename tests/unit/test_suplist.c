/*
 * Unit tests for deliverer/suplist (suppression list keys, address
 * normalisation, the entry codec, auto_reasons) and for the suppression
 * half of ledger_lookup_sup() (deliverer/ledger.h): the command it sends
 * and how the reply is split, against tests/support/fakeredis.h with a
 * model of the lookup script.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/rclient.h"
#include "core/util.h"
#include "deliverer/ledger.h"
#include "deliverer/suplist.h"
#include "tests/support/fakeredis.h"

static void test_keys(void **state)
{
    char *k = suplist_key(NULL);
    assert_string_equal(k, "mp:sup:g");
    free(k);
    k = suplist_key("");
    assert_string_equal(k, "mp:sup:g");
    free(k);
    k = suplist_key("acme");
    assert_string_equal(k, "mp:sup:t:acme");
    free(k);
}

static void test_normalize(void **state)
{
    static const struct {
        const char *in, *out;
    } ok[] = {
        { "bob@example.com", "bob@example.com" },
        { "Bob.Smith@EXAMPLE.Com", "bob.smith@example.com" },
        { "x@B\xc3\xbc" "cher.Example", "x@xn--bcher-kva.example" }, /* IDNA, as dns/idn.h */
        { "x@xn--bcher-kva.example", "x@xn--bcher-kva.example" },
        { "J\xc3\x96rg@example.com", "j\xc3\x96rg@example.com" }, /* non-ASCII local octets kept */
        { "\"A@B\"@Example.com", "\"a@b\"@example.com" },        /* the last '@' splits */
        { "a+tag@example.com", "a+tag@example.com" },
    };
    char out[SUPLIST_ADDR_MAX];
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        if (suplist_normalize(ok[i].in, out) != 0)
            fail_msg("%s refused", ok[i].in);
        assert_string_equal(out, ok[i].out);
    }
    static const char *bad[] = { "", "bob", "bob@", "@example.com", "a b@example.com", "a@exa mple.com",
                                 "a@-x.com", "a..b@example.com", "<a@example.com>", "a@x_y.com" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(suplist_normalize(bad[i], out), -1);
    assert_int_equal(suplist_normalize(NULL, out), -1);
}

static void test_codec_round_trip(void **state)
{
    suplist_entry_t e = { .added_s = 1796694228, .expires_s = 1796780628, .origin = SUPLIST_AUTO, .code = 550 };
    strcpy(e.reason, "no_such_user");
    strcpy(e.enh, "5.1.1");
    strcpy(e.message_id, "m-1");
    strcpy(e.text, "5.1.1 <bob@x>: Recipient address rejected | unknown");
    char *v = suplist_encode(&e);
    assert_string_equal(v, "1|1796694228|1796780628|a|550|5.1.1|m-1|no_such_user|"
                           "5.1.1 <bob@x>: Recipient address rejected | unknown");
    suplist_entry_t d;
    assert_int_equal(suplist_decode(v, strlen(v), &d), 0);
    assert_int_equal(d.added_s, e.added_s);
    assert_int_equal(d.expires_s, e.expires_s);
    assert_int_equal(d.origin, 'a');
    assert_int_equal(d.code, 550);
    assert_string_equal(d.enh, "5.1.1");
    assert_string_equal(d.message_id, "m-1");
    assert_string_equal(d.reason, "no_such_user");
    assert_string_equal(d.text, e.text); /* '|' kept in the last field */
    free(v);

    /* a manual entry is small: what the memory figures in the docs use */
    suplist_entry_t m = { .added_s = 1796694228, .origin = SUPLIST_MANUAL };
    strcpy(m.reason, "manual");
    v = suplist_encode(&m);
    assert_string_equal(v, "1|1796694228|0|m|0|||manual|");
    assert_int_equal(suplist_decode(v, strlen(v), &d), 0);
    assert_string_equal(d.reason, "manual");
    assert_string_equal(d.text, "");
    assert_int_equal(d.expires_s, 0);
    free(v);
}

static void test_codec_sanitises_and_cuts(void **state)
{
    suplist_entry_t e = { .added_s = 5, .origin = SUPLIST_IMPORT };
    strcpy(e.reason, "a|b\nc");
    strcpy(e.message_id, "id|x");
    memset(e.text, 'x', SUPLIST_TEXT_MAX);
    e.text[SUPLIST_TEXT_MAX] = '\0';
    char *v = suplist_encode(&e);
    suplist_entry_t d;
    assert_int_equal(suplist_decode(v, strlen(v), &d), 0);
    assert_string_equal(d.reason, "a/b c");
    assert_string_equal(d.message_id, "id/x");
    assert_int_equal(strlen(d.text), SUPLIST_TEXT_MAX);
    assert_int_equal(d.origin, 'i');
    free(v);
}

static void test_decode_rejects(void **state)
{
    static const char *bad[] = { "", "x", "2|1|0|m|0|||r|", "1|1|0|m|0|||r", "1|x|0|m|0|||r|",
                                 "1|1|0|mm|0|||r|", "1|1|0|m|1000|||r|", "1||0|m|0|||r|", "1|1|0|m|0||" };
    suplist_entry_t d;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(suplist_decode(bad[i], strlen(bad[i]), &d), -1);
}

static void test_expired(void **state)
{
    suplist_entry_t e = { .added_s = 100, .expires_s = 0 };
    assert_false(suplist_expired(&e, 1u << 31));
    e.expires_s = 200;
    assert_false(suplist_expired(&e, 199));
    assert_true(suplist_expired(&e, 200));
}

static void test_reason_in(void **state)
{
    assert_true(suplist_reason_in("no_such_user", "no_such_user"));
    assert_true(suplist_reason_in("spam, no_such_user", "no_such_user"));
    assert_true(suplist_reason_in("policy no_such_user,spam", "spam"));
    assert_false(suplist_reason_in("no_such_user", "no_such"));
    assert_false(suplist_reason_in("no_such_user_x", "no_such_user"));
    assert_false(suplist_reason_in("", "no_such_user"));
    assert_false(suplist_reason_in(NULL, "no_such_user"));
    assert_false(suplist_reason_in("spam", ""));
}

/* ---- ledger_lookup_sup against the fake ---- */

typedef struct model {
    const char *hkey[4], *hfield[4], *hval[4]; /* the hashes' entries */
    size_t      nh;
    char        argv_seen[2048];
} model_t;

static void put_bulk(buf_t *out, const char *s)
{
    if (s == NULL)
        buf_puts(out, "$-1\r\n");
    else
        buf_printf(out, "$%zu\r\n%s\r\n", strlen(s), s);
}

/* EVAL script numkeys KEYS... n fields...: the lookup script's answer. */
static void model_eval(void *arg, int argc, char **argv, buf_t *out)
{
    model_t *m = arg;
    m->argv_seen[0] = '\0';
    for (int i = 2; i < argc; i++) {
        strcat(m->argv_seen, argv[i]);
        strcat(m->argv_seen, i + 1 < argc ? " " : "");
    }
    int nkeys = atoi(argv[2]);
    int n = atoi(argv[3 + nkeys]);
    buf_printf(out, "*%d\r\n", n * (nkeys - n + 1));
    for (int i = 0; i < n; i++)
        put_bulk(out, NULL); /* no ledger records */
    for (int k = n; k < nkeys; k++) {
        for (int i = 0; i < n; i++) {
            const char *field = argv[4 + nkeys + i], *v = NULL;
            for (size_t h = 0; h < m->nh; h++)
                if (field[0] && strcmp(m->hkey[h], argv[3 + k]) == 0 && strcmp(m->hfield[h], field) == 0)
                    v = m->hval[h];
            put_bulk(out, v);
        }
    }
}

typedef struct got {
    int  calls, ok;
    char sup[6][64];
} got_t;

static void on_sup(void *arg, int ok, const ledger_state_t *states, const char *const *hops, const char *const *sup)
{
    got_t *g = arg;
    g->calls++;
    g->ok = ok;
    for (int i = 0; i < 6; i++)
        snprintf(g->sup[i], sizeof(g->sup[i]), "%s", sup[i] ? sup[i] : "-");
    for (int i = 0; i < 3; i++)
        assert_int_equal(states[i], LEDGER_NONE);
}

static void test_lookup_sup_one_command(void **state)
{
    loop_t *loop = loop_new();
    fakeredis_t *f = fakeredis_new(loop);
    model_t m = { .hkey = { "mp:sup:g", "mp:sup:t:acme", "mp:sup:t:other" },
                  .hfield = { "c@x.example", "a@x.example", "b@x.example" },
                  .hval = { "G", "T", "O" }, .nh = 3 };
    f->eval_hook = model_eval;
    f->eval_arg = &m;
    rclient_config_t rc = { .host = "127.0.0.1", .port = f->port, .timeout_ms = 500 };
    rclient_t *c = rclient_new(loop, &rc);
    ledger_t *l = ledger_new(loop, c, 1000);
    const char *rcpts[] = { "A@x.example", "b@x.example", "c@x.example" };
    const char *fields[] = { "a@x.example", "b@x.example", "c@x.example" };
    const char *keys[] = { "mp:sup:g", "mp:sup:t:acme" };
    got_t g = { 0 };
    size_t before = f->ncommands;
    ledger_lookup_sup(l, "m1", rcpts, 3, keys, 2, fields, on_sup, &g);
    for (int i = 0; i < 50 && g.calls == 0; i++)
        loop_run_once(loop, 10);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.ok, 1);
    assert_int_equal(f->ncommands - before, 1); /* ledger and both lists: one command */
    assert_string_equal(m.argv_seen, "5 mp:r:m1:a@x.example mp:r:m1:b@x.example mp:r:m1:c@x.example "
                                     "mp:sup:g mp:sup:t:acme 3 a@x.example b@x.example c@x.example");
    /* global list first, then the tenant's: b is on another tenant's list only */
    assert_string_equal(g.sup[0], "-");
    assert_string_equal(g.sup[1], "-");
    assert_string_equal(g.sup[2], "G");
    assert_string_equal(g.sup[3], "T");
    assert_string_equal(g.sup[4], "-");
    assert_string_equal(g.sup[5], "-");

    /* Redis refuses: ok=0, nothing found */
    f->fail_next = 1;
    memset(&g, 0, sizeof(g));
    ledger_lookup_sup(l, "m1", rcpts, 3, keys, 2, fields, on_sup, &g);
    for (int i = 0; i < 50 && g.calls == 0; i++)
        loop_run_once(loop, 10);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.ok, 0);
    for (int i = 0; i < 6; i++)
        assert_string_equal(g.sup[i], "-");

    rclient_free(c);
    ledger_free(l);
    fakeredis_free(f);
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_normalize),
        cmocka_unit_test(test_codec_round_trip),
        cmocka_unit_test(test_codec_sanitises_and_cuts),
        cmocka_unit_test(test_decode_rejects),
        cmocka_unit_test(test_expired),
        cmocka_unit_test(test_reason_in),
        cmocka_unit_test(test_lookup_sup_one_command),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for deliverer/policy: the egress and shaping files (syntax,
 * every validation rule and its file:line message), pool selection, the
 * merge order of shaping sections, automation matching, and the example
 * files in deploy/ (which must stay valid).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/config.h"
#include "deliverer/policy.h"

#ifndef MP_SOURCE_DIR
#error "MP_SOURCE_DIR must name the source tree (tests/CMakeLists.txt)"
#endif

static char egress_path[64], shaping_path[64];

static void write_temp(char *out, size_t outlen, const char *tmpl, const char *text)
{
    snprintf(out, outlen, "%s", tmpl);
    int fd = mkstemp(out);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

static int teardown(void **state)
{
    (void)state;
    if (egress_path[0])
        unlink(egress_path);
    if (shaping_path[0])
        unlink(shaping_path);
    egress_path[0] = shaping_path[0] = '\0';
    return 0;
}

/* Load the texts (NULL: no file of that kind). */
static policy_t *load(const char *egress, const char *shaping, char *err, size_t errlen)
{
    teardown(NULL);
    if (egress)
        write_temp(egress_path, sizeof(egress_path), "/tmp/mp-egress-XXXXXX", egress);
    if (shaping)
        write_temp(shaping_path, sizeof(shaping_path), "/tmp/mp-shaping-XXXXXX", shaping);
    err[0] = '\0';
    return policy_load(egress ? egress_path : NULL, shaping ? shaping_path : NULL, err, errlen);
}

static policy_t *load_ok(const char *egress, const char *shaping)
{
    char err[1024];
    policy_t *p = load(egress, shaping, err, sizeof(err));
    if (p == NULL)
        fail_msg("unexpected error: %s", err);
    return p;
}

/* The load fails with exactly "<the file's path>:<want>". */
static void expect_error(const char *egress, const char *shaping, int in_shaping, const char *want)
{
    char err[1024], full[1200];
    policy_t *p = load(egress, shaping, err, sizeof(err));
    if (p != NULL) {
        policy_free(p);
        fail_msg("loaded, expected the error %s", want);
    }
    snprintf(full, sizeof(full), "%s:%s", in_shaping ? shaping_path : egress_path, want);
    if (strcmp(err, full) != 0)
        fail_msg("error\n  got:  %s\n  want: %s", err, full);
}

static const char *EGRESS =
    "# sources\n"
    "[source mta1]\n"
    "address = 127.0.0.2          # IPv4\n"
    "ehlo = mta1.example.com\n"
    "\n"
    "[source mta2]\n"
    "address = 127.0.0.3\n"
    "\n"
    "[source mta3]\n"
    "address = 2001:DB8:0:0::25   ; IPv6, written long\n"
    "ehlo = [IPv6:2001:db8::25]\n"
    "\n"
    "[pool marketing]\n"
    "sources = mta1:3 mta2:1\n"
    "\n"
    "[pool transactional]\n"
    "sources = mta3\n"
    "\n"
    "[tenant acme]\n"
    "pool = marketing\n"
    "\n"
    "[default]\n"
    "pool = transactional\n";

static void test_egress_sources_and_pools(void **state)
{
    (void)state;
    policy_t *p = load_ok(EGRESS, NULL);
    assert_int_equal(policy_nsources(p), 3);
    const egress_source_t *s = policy_source(p, 0);
    assert_string_equal(s->name, "mta1");
    assert_string_equal(s->addr_text, "127.0.0.2");
    assert_string_equal(s->ehlo, "mta1.example.com");
    assert_int_equal(s->addr.ss_family, AF_INET);
    assert_int_equal(s->addrlen, sizeof(struct sockaddr_in));
    const struct sockaddr_in *a4 = (const struct sockaddr_in *)&s->addr;
    assert_int_equal(ntohl(a4->sin_addr.s_addr), 0x7f000002);
    assert_int_equal(a4->sin_port, 0);
    assert_null(policy_source(p, 1)->ehlo);
    assert_null(policy_source(p, 3));

    /* IPv6: canonical text, the family and length of a sockaddr_in6 */
    s = policy_source_find(p, "mta3");
    assert_non_null(s);
    assert_string_equal(s->addr_text, "2001:db8::25");
    assert_int_equal(s->addr.ss_family, AF_INET6);
    assert_int_equal(s->addrlen, sizeof(struct sockaddr_in6));
    const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)&s->addr;
    assert_int_equal(a6->sin6_addr.s6_addr[15], 0x25);
    assert_int_equal(a6->sin6_addr.s6_addr[0], 0x20);
    assert_int_equal(a6->sin6_port, 0);
    assert_string_equal(s->ehlo, "[IPv6:2001:db8::25]");
    assert_null(policy_source_find(p, "MTA3")); /* names are exact */
    assert_null(policy_source_find(p, "nope"));
    assert_null(policy_source_find(p, NULL));

    assert_int_equal(policy_npools(p), 2);
    const egress_pool_t *po = policy_pool_find(p, "marketing");
    assert_ptr_equal(po, policy_pool(p, 0));
    assert_string_equal(po->name, "marketing");
    assert_int_equal(po->n, 2);
    assert_ptr_equal(po->sources[0], policy_source_find(p, "mta1"));
    assert_ptr_equal(po->sources[1], policy_source_find(p, "mta2"));
    assert_int_equal(po->weights[0], 3);
    assert_int_equal(po->weights[1], 1);
    po = policy_pool(p, 1);
    assert_string_equal(po->name, "transactional");
    assert_int_equal(po->n, 1);
    assert_ptr_equal(po->sources[0], policy_source_find(p, "mta3"));
    assert_int_equal(po->weights[0], 1);
    assert_null(policy_pool(p, 2));
    assert_int_equal(policy_has_shaping(p), 0);

    char sum[256];
    policy_summary(p, sum, sizeof(sum));
    assert_string_equal(sum, "egress: 3 sources, 2 pools, 1 tenant mapping, default pool transactional; "
                             "shaping: 0 rules, 0 automations");
    policy_free(p);
}

static void test_forward_references_and_bracketed_ipv6(void **state)
{
    (void)state;
    /* a pool and a tenant may name what comes later; [v6] is accepted */
    policy_t *p = load_ok("[tenant t]\npool = p\n[pool p]\nsources = b a:1000\n"
                          "  [source a]\n  address = [::1]\n[source b]\naddress = 10.1.2.3\n",
                          NULL);
    const egress_pool_t *po = policy_pool_find(p, "p");
    assert_ptr_equal(policy_pool_for(p, NULL, "t", NULL), po);
    assert_string_equal(po->sources[0]->name, "b");
    assert_string_equal(po->sources[1]->name, "a");
    assert_int_equal(po->weights[1], 1000);
    assert_string_equal(po->sources[1]->addr_text, "::1");
    policy_free(p);
}

static void test_pool_for_precedence(void **state)
{
    (void)state;
    policy_t *p = load_ok(EGRESS, NULL);
    const egress_pool_t *mk = policy_pool_find(p, "marketing"), *tr = policy_pool_find(p, "transactional");
    int unknown = 7;
    /* the message's own pool wins over its tenant's */
    assert_ptr_equal(policy_pool_for(p, "transactional", "acme", &unknown), tr);
    assert_int_equal(unknown, 0);
    /* a pool no section defines: NULL and unknown, never a fallback */
    unknown = 7;
    assert_null(policy_pool_for(p, "nosuch", "acme", &unknown));
    assert_int_equal(unknown, 1);
    assert_null(policy_pool_for(p, "nosuch", NULL, NULL)); /* unknown may be NULL */
    /* the tenant's mapping */
    assert_ptr_equal(policy_pool_for(p, NULL, "acme", &unknown), mk);
    assert_int_equal(unknown, 0);
    assert_ptr_equal(policy_pool_for(p, "", "acme", &unknown), mk);
    /* an unmapped tenant, or none: [default] */
    assert_ptr_equal(policy_pool_for(p, NULL, "globex", &unknown), tr);
    assert_int_equal(unknown, 0);
    assert_ptr_equal(policy_pool_for(p, NULL, NULL, &unknown), tr);
    assert_ptr_equal(policy_pool_for(p, "", "", &unknown), tr);
    policy_free(p);

    /* without [default]: NULL, the host's default address */
    p = load_ok("[source a]\naddress = 127.0.0.9\n[pool p]\nsources = a\n[tenant t]\npool = p\n", NULL);
    unknown = 7;
    assert_null(policy_pool_for(p, NULL, "other", &unknown));
    assert_int_equal(unknown, 0);
    assert_ptr_equal(policy_pool_for(p, NULL, "t", &unknown), policy_pool_find(p, "p"));
    policy_free(p);

    /* no files at all: an empty policy; and NULL is one too */
    p = load_ok(NULL, NULL);
    assert_int_equal(policy_nsources(p), 0);
    assert_int_equal(policy_npools(p), 0);
    assert_null(policy_pool_for(p, NULL, "t", &unknown));
    assert_int_equal(unknown, 0);
    assert_null(policy_pool_for(p, "x", NULL, &unknown));
    assert_int_equal(unknown, 1);
    assert_int_equal(policy_has_shaping(p), 0);
    char sum[256];
    policy_summary(p, sum, sizeof(sum));
    assert_string_equal(sum, "egress: 0 sources, 0 pools, 0 tenant mappings; shaping: 0 rules, 0 automations");
    policy_free(p);
    char err[64];
    p = policy_load("", "", err, sizeof(err));
    assert_non_null(p);
    policy_free(p);
    assert_null(policy_pool_for(NULL, NULL, NULL, &unknown));
    assert_int_equal(policy_nsources(NULL), 0);
    assert_null(policy_source_find(NULL, "a"));
    shaping_params_t sp;
    policy_shaping(NULL, "a.com", "a.com", NULL, NULL, &sp);
    assert_int_equal(sp.tls, -1);
    assert_null(policy_match_reply(NULL, "a.com", "a.com", NULL, 421, "4.7.0", "x"));
}

static void test_egress_errors(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        const char *want; /* after "path:" */
    } cases[] = {
        { "[source a]\naddress = 127.0.0.1\n[bogus x]\n",
          "3: unknown section type [bogus] in an egress file (expected [source NAME], [pool NAME], "
          "[tenant NAME] or [default])" },
        { "[site google.com]\nrate = 1/s\n",
          "1: unknown section type [site] in an egress file (expected [source NAME], [pool NAME], "
          "[tenant NAME] or [default])" },
        { "[source a]\naddress = 127.0.0.1\nport = 25\n",
          "3: unknown key \"port\" in [source a] (expected address, ehlo, warmup, warmup_start)" },
        { "[source a]\naddress = 127.0.0.1\n\n[source a]\naddress = 127.0.0.2\n",
          "4: duplicate section [source a]" },
        { "[source a]\naddress = 127.0.0.1\naddress = 127.0.0.2\n",
          "3: [source a] address is given twice, on lines 2 and 3" },
        { "[source a]\nehlo = a.example\n[source b]\naddress = 127.0.0.1\n",
          "1: [source a] has no address (an IPv4 or IPv6 literal is required)" },
        { "[source a]\nehlo = a.example\n", "1: [source a] has no address (an IPv4 or IPv6 literal is required)" },
        { "[source a]\naddress = mta.example.com\n",
          "2: [source a] address: \"mta.example.com\" is not an IPv4 or IPv6 address literal" },
        { "[source a]\naddress = 127.0.0.256\n",
          "2: [source a] address: \"127.0.0.256\" is not an IPv4 or IPv6 address literal" },
        { "[source a]\naddress = 127.0.0.1\nehlo = bad name\n",
          "3: [source a] ehlo: \"bad name\" is not a host name or an address literal" },
        { "[source a]\naddress =\n", "2: [source a] address: empty value" },
        { "[source a b]\n", "1: unexpected \"b\" in the section header [source a]" },
        { "[source]\n", "1: [source] needs a name: [source NAME]" },
        { "[source a/b]\n", "1: bad source name \"a/b\" (letters, digits, '.', '_', '-'; at most 64)" },
        { "[source "
          "a12345678901234567890123456789012345678901234567890123456789012345]\n",
          "1: bad source name \"a12345678901234567890123456789012345678901234567890123456789012345\" "
          "(letters, digits, '.', '_', '-'; at most 64)" },
        { "[source a\naddress = 127.0.0.1\n", "1: malformed section header \"[source a\": no closing ]" },
        { "[source a] x\n", "1: unexpected \"x\" after the section header" },
        { "[]\n", "1: empty section header" },
        { "address = 127.0.0.1\n", "1: key \"address\" outside a [section]" },
        { "[source a]\naddress 127.0.0.1\n",
          "2: syntax error: expected \"key = value\", \"[section]\" or a comment, got \"address 127.0.0.1\"" },
        { "[source a]\n= 1\n", "2: syntax error: no key name before the '='" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a b\n",
          "4: [pool p] sources: unknown source \"b\" (no [source b])" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a:0\n",
          "4: [pool p] sources: weight \"0\" of a is not a number from 1 to 1000" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a:1001\n",
          "4: [pool p] sources: weight \"1001\" of a is not a number from 1 to 1000" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a:x\n",
          "4: [pool p] sources: weight \"x\" of a is not a number from 1 to 1000" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a a:2\n",
          "4: [pool p] sources: a is listed twice" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = # none\n", "4: [pool p] sources: empty value" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\n",
          "3: [pool p] has no sources (at least one is required)" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a\n[pool p]\nsources = a\n",
          "5: duplicate section [pool p]" },
        { "[tenant t]\npool = nope\n", "2: [tenant t] pool: unknown pool \"nope\" (no [pool nope])" },
        { "[tenant t]\n", "1: [tenant t] has no pool" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a\n[tenant t]\npool = p\n[tenant t]\npool = p\n",
          "7: duplicate section [tenant t]" },
        { "[default]\npool = nope\n", "2: [default] pool: unknown pool \"nope\" (no [pool nope])" },
        { "[default]\n", "1: [default] has no pool" },
        { "[default x]\n", "1: unexpected \"x\" in the section header [default]" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a\n[default]\npool = p\n\n[default]\n",
          "8: duplicate section [default] (first on line 5)" },
        { "[source a]\naddress = 127.0.0.1\n[pool p]\nsources = a\n[default]\npool = p\nsource = a\n",
          "7: unknown key \"source\" in [default] (expected pool)" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        expect_error(cases[i].text, NULL, 0, cases[i].want);
}

static void test_comments_and_syntax(void **state)
{
    (void)state;
    /* '#' and ';' comment at the start and after a blank; inside a word
     * they are part of it; a BOM and CRLF are fine; keys may be indented */
    char err[512];
    policy_t *q = load("[source a]\naddress = 127.0.0.1;x\n", NULL, err, sizeof(err));
    assert_null(q);
    assert_non_null(strstr(err, ":2: [source a] address: \"127.0.0.1;x\" is not an IPv4"));

    policy_t *p = load_ok("\xef\xbb\xbf; egress\r\n"
                          "   # indented comment\r\n"
                          "[source a]   # the first\r\n"
                          "   address = 127.0.0.1 ;comment\r\n"
                          "   ehlo = a.example\t# comment\r\n",
                          "[automation a]\nmatch = x#y;z  # the regex is x#y;z\naction = suspend\n"
                          "duration = 1h ; an hour\n");
    assert_string_equal(policy_source(p, 0)->addr_text, "127.0.0.1");
    assert_string_equal(policy_source(p, 0)->ehlo, "a.example");
    const automation_rule_t *r = policy_match_reply(p, NULL, NULL, NULL, 421, NULL, "see x#y;z");
    assert_non_null(r);
    assert_int_equal(r->duration_ms, 3600000);
    assert_null(policy_match_reply(p, NULL, NULL, NULL, 421, NULL, "see x"));
    policy_free(p);

    /* a NUL byte (written by hand: the helper writes C strings) */
    static const char nul[] = "[source a]\naddress = 1.2.3.4\nx\0y\n";
    teardown(NULL);
    snprintf(egress_path, sizeof(egress_path), "/tmp/mp-egress-XXXXXX");
    int fd = mkstemp(egress_path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, nul, sizeof(nul) - 1), (ssize_t)(sizeof(nul) - 1));
    close(fd);
    assert_null(policy_load(egress_path, NULL, err, sizeof(err)));
    char want[128];
    snprintf(want, sizeof(want), "%s:3: NUL byte in the line (not a text file?)", egress_path);
    assert_string_equal(err, want);
}

static void test_missing_file(void **state)
{
    (void)state;
    char err[256];
    assert_null(policy_load("/nonexistent/egress.ini", NULL, err, sizeof(err)));
    assert_string_equal(err, "/nonexistent/egress.ini: No such file or directory");
    assert_null(policy_load(NULL, "/nonexistent/shaping.ini", err, sizeof(err)));
    assert_string_equal(err, "/nonexistent/shaping.ini: No such file or directory");
}

static const char *SHAPING =
    "[site google.com]            # MX site\n"
    "connection_limit = 50\n"
    "rate = 300/m\n"
    "max_messages_per_connection = 100\n"
    "connect_timeout = 30s\n"
    "command_timeout = 5m\n"
    "tls = required\n"
    "\n"
    "[site google.com source=mta1]\n"
    "rate = 100/m\n"
    "\n"
    "[site Google.COM pool=marketing]\n"
    "rate = 200/m\n"
    "connection_limit = 20\n"
    "\n"
    "[domain example.org]\n"
    "connection_limit = 5\n"
    "\n"
    "[domain example.org pool=marketing]\n"
    "max_messages_per_connection = 7\n"
    "\n"
    "[domain example.org source=mta1]\n"
    "tls = verify\n"
    "rate = 10/h\n"
    "\n"
    "[site yahoodns.net]\n"
    "rate = 2/s\n";

static void test_shaping_merge_order(void **state)
{
    (void)state;
    policy_t *p = load_ok(EGRESS, SHAPING);
    assert_int_equal(policy_has_shaping(p), 1);
    shaping_params_t sp;

    /* the site alone */
    policy_shaping(p, "gmail.com", "google.com", NULL, NULL, &sp);
    assert_int_equal(sp.connection_limit, 50);
    assert_true(sp.rate_per_s == 5.0);
    assert_string_equal(sp.rate_text, "300/m");
    assert_int_equal(sp.max_msgs_per_connection, 100);
    assert_int_equal(sp.connect_timeout_ms, 30000);
    assert_int_equal(sp.command_timeout_ms, 300000);
    assert_int_equal(sp.tls, MP_SMTP_TLS_REQUIRED);
    assert_string_equal(sp.rule, "site:google.com");

    /* site, site+pool, site+source: source beats pool beats site */
    policy_shaping(p, "gmail.com", "google.com", "marketing", "mta1", &sp);
    assert_int_equal(sp.connection_limit, 20);    /* from the pool section */
    assert_string_equal(sp.rate_text, "100/m");   /* source over pool */
    assert_true(sp.rate_per_s * 60 > 99.999 && sp.rate_per_s * 60 < 100.001);
    assert_int_equal(sp.max_msgs_per_connection, 100); /* kept from the site */
    assert_string_equal(sp.rule, "site:google.com,site:google.com/pool=marketing,site:google.com/source=mta1");

    /* another source, another pool: only the site */
    policy_shaping(p, "gmail.com", "google.com", "transactional", "mta3", &sp);
    assert_string_equal(sp.rule, "site:google.com");
    assert_string_equal(sp.rate_text, "300/m");

    /* domain sections over every site section, in the same order */
    policy_shaping(p, "EXAMPLE.org.", "google.com", "marketing", "mta1", &sp);
    assert_string_equal(sp.rule, "site:google.com,site:google.com/pool=marketing,site:google.com/source=mta1,"
                                 "domain:example.org,domain:example.org/pool=marketing,"
                                 "domain:example.org/source=mta1");
    assert_int_equal(sp.connection_limit, 5);
    assert_int_equal(sp.max_msgs_per_connection, 7);
    assert_int_equal(sp.tls, MP_SMTP_TLS_VERIFY);
    assert_string_equal(sp.rate_text, "10/h");
    assert_true(sp.rate_per_s * 3600 > 9.999 && sp.rate_per_s * 3600 < 10.001);
    assert_int_equal(sp.connect_timeout_ms, 30000);

    /* the domain alone, in a site with no section */
    policy_shaping(p, "example.org", "example-mx.net", NULL, "mta1", &sp);
    assert_string_equal(sp.rule, "domain:example.org,domain:example.org/source=mta1");
    assert_int_equal(sp.connection_limit, 5);
    assert_int_equal(sp.max_msgs_per_connection, 0);
    assert_int_equal(sp.connect_timeout_ms, 0);
    assert_int_equal(sp.command_timeout_ms, 0);

    /* nothing matches: all unset */
    policy_shaping(p, "other.example", "other.example", "marketing", "mta1", &sp);
    assert_string_equal(sp.rule, "");
    assert_int_equal(sp.connection_limit, 0);
    assert_true(sp.rate_per_s == 0);
    assert_string_equal(sp.rate_text, "");
    assert_int_equal(sp.tls, -1);
    policy_shaping(p, NULL, NULL, NULL, NULL, &sp);
    assert_string_equal(sp.rule, "");

    /* a site name compares case-insensitively */
    policy_shaping(p, NULL, "YahooDNS.net", NULL, NULL, &sp);
    assert_string_equal(sp.rule, "site:yahoodns.net");
    assert_true(sp.rate_per_s == 2.0);

    char sum[256];
    policy_summary(p, sum, sizeof(sum));
    assert_string_equal(sum, "egress: 3 sources, 2 pools, 1 tenant mapping, default pool transactional; "
                             "shaping: 7 rules, 0 automations");
    policy_free(p);

    /* without an egress file qualifiers are taken as written */
    p = load_ok(NULL, "[site a.example source=x]\nrate = 1/s\n[domain b.example pool=y]\nrate = 2/s\n");
    policy_shaping(p, "b.example", "a.example", "y", "x", &sp);
    assert_string_equal(sp.rule, "site:a.example/source=x,domain:b.example/pool=y");
    assert_true(sp.rate_per_s == 2.0);
    policy_free(p);
}

static const char *AUTOMATION =
    "[automation yahoo-deferral]\n"
    "site = yahoodns.net\n"
    "code = 421\n"
    "enhanced = 4.7.0\n"
    "match = \\[TS0[1-3]\\]         # optional regex\n"
    "action = suspend\n"
    "duration = 1h\n"
    "\n"
    "[automation mta1-any-5xx]\n"
    "source = mta1\n"
    "code = 5\n"
    "action = bounce\n"
    "duration = 10m\n"
    "\n"
    "[automation example-rate]\n"
    "domain = Example.org\n"
    "enhanced = 4.7.28\n"
    "action = rate=10/m\n"
    "duration = 30m\n"
    "\n"
    "[automation any-4xx-volume]\n"
    "code = 4xx\n"
    "match = too many (connections|messages)\n"
    "action = connection_limit=2\n"
    "duration = 7d\n"
    "\n"
    "[automation yahoo-later]\n"
    "site = yahoodns.net\n"
    "code = 4\n"
    "action = rate=1/s\n"
    "duration = 5m\n";

static void test_automation_matching(void **state)
{
    (void)state;
    policy_t *p = load_ok(EGRESS, AUTOMATION);
    assert_int_equal(policy_has_shaping(p), 1);
    const automation_rule_t *r;

    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", "mta2", 421, "4.7.0",
                           "[ts02] Messages from 192.0.2.1 temporarily deferred");
    assert_non_null(r);
    assert_string_equal(r->name, "yahoo-deferral");
    assert_string_equal(r->site, "yahoodns.net");
    assert_null(r->domain);
    assert_null(r->source);
    assert_int_equal(r->code, 421);
    assert_string_equal(r->enhanced, "4.7.0");
    assert_int_equal(r->action, POLICY_ACT_SUSPEND);
    assert_int_equal(r->duration_ms, 3600000);

    /* the regex fails ([TS04]): the next rule for the site, in file order,
     * after any-4xx-volume which needs its text */
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", "mta2", 421, "4.7.0", "[TS04] deferred");
    assert_string_equal(r->name, "yahoo-later");
    assert_int_equal(r->action, POLICY_ACT_RATE);
    assert_true(r->rate_per_s == 1.0);
    assert_string_equal(r->rate_text, "1/s");
    /* an exact code: 451 is not 421 */
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", NULL, 451, "4.7.0", "[TS01]");
    assert_string_equal(r->name, "yahoo-later");
    /* the enhanced code is exact */
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", NULL, 421, "4.7.1", "[TS01]");
    assert_string_equal(r->name, "yahoo-later");
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", NULL, 421, NULL, "[TS01]");
    assert_string_equal(r->name, "yahoo-later");
    /* no text: a rule with a regex does not match */
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", NULL, 421, "4.7.0", NULL);
    assert_string_equal(r->name, "yahoo-later");
    /* site names compare case-insensitively */
    r = policy_match_reply(p, "yahoo.com", "YAHOODNS.NET", NULL, 421, "4.7.0", "[TS03]");
    assert_string_equal(r->name, "yahoo-deferral");

    /* a class: any 5xx through mta1, at any destination; not through mta2 */
    r = policy_match_reply(p, "a.example", "a.example", "mta1", 550, "5.7.1", "blocked");
    assert_string_equal(r->name, "mta1-any-5xx");
    assert_string_equal(r->source, "mta1");
    assert_int_equal(r->code, 5);
    assert_int_equal(r->action, POLICY_ACT_BOUNCE);
    assert_null(policy_match_reply(p, "a.example", "a.example", "mta2", 550, "5.7.1", "blocked"));
    assert_null(policy_match_reply(p, "a.example", "a.example", NULL, 550, "5.7.1", "blocked"));
    assert_null(policy_match_reply(p, "a.example", "a.example", "mta1", 421, "4.7.1", "blocked"));

    /* a domain rule, enhanced code alone */
    r = policy_match_reply(p, "EXAMPLE.ORG", "google.com", NULL, 421, "4.7.28", "slow down");
    assert_string_equal(r->name, "example-rate");
    assert_string_equal(r->domain, "example.org");
    assert_int_equal(r->code, 0);
    assert_int_equal(r->action, POLICY_ACT_RATE);
    assert_string_equal(r->rate_text, "10/m");
    assert_true(r->rate_per_s * 60 > 9.999 && r->rate_per_s * 60 < 10.001);
    assert_null(policy_match_reply(p, "example.net", "google.com", NULL, 421, "4.7.28", "slow down"));

    /* a rule for any destination, by class and regex (case-insensitive) */
    r = policy_match_reply(p, "x.example", "x.example", NULL, 452, NULL, "Too Many Connections from you");
    assert_string_equal(r->name, "any-4xx-volume");
    assert_int_equal(r->code, 4);
    assert_int_equal(r->action, POLICY_ACT_CONNECTIONS);
    assert_int_equal(r->connections, 2);
    assert_int_equal(r->duration_ms, 7ull * 86400000);
    assert_null(policy_match_reply(p, "x.example", "x.example", NULL, 552, NULL, "too many messages"));
    assert_null(policy_match_reply(p, "x.example", "x.example", NULL, 452, NULL, "mailbox full"));
    /* file order across the lists: the any-destination rule comes before
     * the site's yahoo-later */
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", NULL, 421, NULL, "too many messages");
    assert_string_equal(r->name, "any-4xx-volume");

    char sum[256];
    policy_summary(p, sum, sizeof(sum));
    assert_string_equal(sum, "egress: 3 sources, 2 pools, 1 tenant mapping, default pool transactional; "
                             "shaping: 0 rules, 5 automations");
    policy_free(p);

    /* automation rules alone make a policy with shaping */
    p = load_ok(NULL, "[automation a]\nmatch = x\naction = suspend\nduration = 1s\n");
    assert_int_equal(policy_has_shaping(p), 1);
    r = policy_match_reply(p, NULL, NULL, NULL, 250, NULL, "xyz");
    assert_string_equal(r->name, "a");
    policy_free(p);
}

static void test_shaping_errors(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        const char *want;
    } cases[] = {
        { "[site google.com]\nrate = 1/s\n[pool p]\n",
          "3: unknown section type [pool] in a shaping file (expected [site NAME], [domain NAME] or "
          "[automation NAME])" },
        { "[site google.com]\nrate = 1/s\nburst = 3\n",
          "3: unknown key \"burst\" in [site google.com] (expected connection_limit, rate, "
          "max_messages_per_connection, connect_timeout, command_timeout, tls)" },
        { "[site google.com]\nrate = 1/s\n[site GOOGLE.com.]\nrate = 2/s\n", "3: duplicate section [site GOOGLE.com.]" },
        { "[site google.com source=mta1]\nrate = 1/s\n[site google.com source=mta1]\nrate = 2/s\n",
          "3: duplicate section [site google.com source=mta1]" },
        { "[domain a.example]\nrate = 1/s\nrate = 2/s\n", "3: [domain a.example] rate is given twice, on lines 2 and 3" },
        { "[site google.com]\n",
          "1: [site google.com] sets nothing (expected at least one of connection_limit, rate, "
          "max_messages_per_connection, connect_timeout, command_timeout, tls)" },
        { "[site google.com]\nrate = 300/d\n",
          "2: [site google.com] rate: expected N/s, N/m or N/h (N from 1 to 1000000), got \"300/d\"" },
        { "[site google.com]\nrate = 0/s\n",
          "2: [site google.com] rate: expected N/s, N/m or N/h (N from 1 to 1000000), got \"0/s\"" },
        { "[site google.com]\nrate = 300\n",
          "2: [site google.com] rate: expected N/s, N/m or N/h (N from 1 to 1000000), got \"300\"" },
        { "[site google.com]\nconnection_limit = 0\n",
          "2: [site google.com] connection_limit: expected a number from 1 to 1000000, got \"0\"" },
        { "[site google.com]\nconnection_limit = -1\n",
          "2: [site google.com] connection_limit: expected a number from 1 to 1000000, got \"-1\"" },
        { "[site google.com]\nmax_messages_per_connection = many\n",
          "2: [site google.com] max_messages_per_connection: expected a number from 1 to 1000000, got \"many\"" },
        { "[site google.com]\nconnect_timeout = 0\n",
          "2: [site google.com] connect_timeout: expected a duration from 1ms to 1h like 30s or 5m, got \"0\"" },
        { "[site google.com]\ncommand_timeout = 2h\n",
          "2: [site google.com] command_timeout: expected a duration from 1ms to 1h like 30s or 5m, got \"2h\"" },
        { "[site google.com]\ntls = always\n",
          "2: [site google.com] tls: \"always\" is not one of none, opportunistic, required, verify" },
        { "[site google.com bogus=1]\n",
          "1: unexpected \"bogus=1\" in the section header: a qualifier is source=NAME or pool=NAME" },
        { "[site google.com source=a pool=b]\n",
          "1: unexpected \"pool=b\" in the section header [site google.com] (one qualifier at most: "
          "source=NAME or pool=NAME)" },
        { "[site google.com source=]\n",
          "1: bad source name \"\" (letters, digits, '.', '_', '-'; at most 64)" },
        { "[site goo/gle.com]\n", "1: bad site name \"goo/gle.com\" (a domain name: letters, digits, '.', '-')" },
        { "[domain .example.org]\n",
          "1: bad domain name \".example.org\" (a domain name: letters, digits, '.', '-')" },
        { "[site]\n", "1: [site] needs a name: [site NAME]" },
        { "[automation a]\naction = suspend\nduration = 1h\n",
          "1: [automation a] matches every reply: set at least one of code, enhanced, match" },
        { "[automation a]\ncode = 421\nduration = 1h\n",
          "1: [automation a] has no action (suspend, bounce, rate=N/unit, connection_limit=N)" },
        { "[automation a]\ncode = 421\naction = suspend\n",
          "1: [automation a] has no duration (required, at most 7d)" },
        { "[automation a]\ncode = 421\naction = suspend\nduration = 8d\n",
          "4: [automation a] duration: expected a duration from 1ms to 7d like 30m or 1h, got \"8d\"" },
        { "[automation a]\ncode = 421\naction = suspend\nduration = 0s\n",
          "4: [automation a] duration: expected a duration from 1ms to 7d like 30m or 1h, got \"0s\"" },
        { "[automation a]\ncode = 421\naction = pause\nduration = 1h\n",
          "3: [automation a] action: \"pause\" is not suspend, bounce, rate=N/unit or connection_limit=N" },
        { "[automation a]\ncode = 421\naction = rate=5/w\n",
          "3: [automation a] action: rate=5/w: expected rate=N/s, rate=N/m or rate=N/h (N from 1 to 1000000)" },
        { "[automation a]\ncode = 421\naction = connection_limit=0\n",
          "3: [automation a] action: connection_limit=0: expected a number from 1 to 1000000" },
        { "[automation a]\ncode = 250\n",
          "2: [automation a] code: expected a reply code from 400 to 599, or a class 4 or 5 (4xx, 5xx), got \"250\"" },
        { "[automation a]\ncode = 4x\n",
          "2: [automation a] code: expected a reply code from 400 to 599, or a class 4 or 5 (4xx, 5xx), got \"4x\"" },
        { "[automation a]\nenhanced = 4.7\n",
          "2: [automation a] enhanced: expected an enhanced status code like 4.7.0, got \"4.7\"" },
        { "[automation a]\nenhanced = 3.1.1\n",
          "2: [automation a] enhanced: expected an enhanced status code like 4.7.0, got \"3.1.1\"" },
        { "[automation a]\nmatch = [TS0(1\n", NULL /* regerror text varies: checked below */ },
        { "[automation a]\nsite = a.example\ndomain = b.example\n",
          "3: [automation a]: site and domain exclude each other (a rule names one destination or none)" },
        { "[automation a]\ncode = 421\naction = suspend\nduration = 1h\n[automation a]\n",
          "5: duplicate section [automation a]" },
        { "[automation a]\ncode = 421\nwhen = now\n",
          "3: unknown key \"when\" in [automation a] (expected site, domain, source, code, enhanced, match, "
          "action, duration)" },
        { "[automation]\n", "1: [automation] needs a name: [automation NAME]" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (cases[i].want)
            expect_error(NULL, cases[i].text, 1, cases[i].want);

    /* a regex that does not compile: named, with the reason */
    char err[1024];
    assert_null(load(NULL, "[automation a]\nmatch = [TS0(1\n", err, sizeof(err)));
    char want[256];
    snprintf(want, sizeof(want), "%s:2: [automation a] match: regex \"[TS0(1\" does not compile: ", shaping_path);
    assert_int_equal(strncmp(err, want, strlen(want)), 0);
    assert_true(strlen(err) > strlen(want));
    assert_null(load(NULL, "[automation a]\nmatch = (a\naction = suspend\nduration = 1h\n", err, sizeof(err)));
    assert_non_null(strstr(err, ":2: [automation a] match: regex \"(a\" does not compile: "));
}

static void test_qualifiers_checked_against_egress(void **state)
{
    (void)state;
    expect_error(EGRESS, "[site google.com source=mta9]\nrate = 1/s\n", 1,
                 "1: unknown source \"mta9\" (no [source mta9] in the egress file)");
    expect_error(EGRESS, "\n[domain a.example pool=bulk]\nrate = 1/s\n", 1,
                 "2: unknown pool \"bulk\" (no [pool bulk] in the egress file)");
    /* a source name is not a pool name */
    expect_error(EGRESS, "[site google.com pool=mta1]\nrate = 1/s\n", 1,
                 "1: unknown pool \"mta1\" (no [pool mta1] in the egress file)");
    expect_error(EGRESS, "[automation a]\ncode = 4\nsource = mta9\n", 1,
                 "3: [automation a] source: unknown source \"mta9\" (no [source mta9] in the egress file)");
    /* an error in the egress file is reported before the shaping file is read */
    expect_error("[source a]\n", "[bogus]\n", 0, "1: [source a] has no address (an IPv4 or IPv6 literal is required)");
    /* without an egress file, the same names are accepted */
    policy_t *p = load_ok(NULL, "[site google.com source=mta9]\nrate = 1/s\n"
                                "[automation a]\ncode = 4\nsource = mta9\naction = bounce\nduration = 1m\n");
    assert_string_equal(policy_match_reply(p, "g.com", "google.com", "mta9", 421, NULL, NULL)->name, "a");
    policy_free(p);
}

/* ------------------------------------------------------------ warm-up */

#define DAY_MS 86400000ull

static void test_warmup_parse_and_limit(void **state)
{
    (void)state;
    policy_t *p = load_ok("[source fresh1]\n"
                          "address = 127.0.0.30\n"
                          "warmup = 500 1000, 2000 5000 10000 20000 50000   # per site per day\n"
                          "warmup_start = 2026-12-01\n"
                          "[source old]\n"
                          "address = 127.0.0.31\n"
                          "[source leap]\n"
                          "address = 127.0.0.32\n"
                          "warmup = 7 3 100000000\n" /* non-decreasing is not required */
                          "WarmUp_Start = 2028-02-29\n",
                          NULL);
    const egress_source_t *s = policy_source_find(p, "fresh1");
    assert_non_null(s);
    assert_int_equal(s->nwarmup, 7);
    static const uint32_t want[7] = { 500, 1000, 2000, 5000, 10000, 20000, 50000 };
    for (size_t i = 0; i < 7; i++)
        assert_int_equal(s->warmup[i], want[i]);
    /* 2026-12-01 is day 20788 since 1970-01-01 */
    assert_int_equal(s->warmup_start_day, 20788);
    assert_int_equal(policy_day_yyyymmdd(20788), 20261201);
    assert_int_equal(policy_day_yyyymmdd(0), 19700101);
    assert_int_equal(policy_day_yyyymmdd(20787), 20261130);
    uint64_t d1 = 20788ull * DAY_MS; /* 2026-12-01T00:00:00Z */
    assert_int_equal(policy_day_of(d1), 20788);
    assert_int_equal(policy_day_of(d1 - 1), 20787);
    /* day 0 (before the start) and long before: day 1's */
    assert_int_equal(policy_warmup_limit(s, d1 - 1), 500);
    assert_int_equal(policy_warmup_limit(s, d1 - 40 * DAY_MS), 500);
    /* day 1, from its first to its last millisecond */
    assert_int_equal(policy_warmup_limit(s, d1), 500);
    assert_int_equal(policy_warmup_limit(s, d1 + DAY_MS - 1), 500);
    assert_int_equal(policy_warmup_limit(s, d1 + DAY_MS), 1000); /* day 2 */
    assert_int_equal(policy_warmup_limit(s, d1 + 2 * DAY_MS + 12 * 3600000ull), 2000); /* day 3, noon */
    assert_int_equal(policy_warmup_limit(s, d1 + 6 * DAY_MS + DAY_MS - 1), 50000);    /* day 7, the last */
    /* past the list: no limit */
    assert_int_equal(policy_warmup_limit(s, d1 + 7 * DAY_MS), 0);
    assert_int_equal(policy_warmup_limit(s, d1 + 400 * DAY_MS), 0);

    const egress_source_t *old = policy_source_find(p, "old");
    assert_int_equal(old->nwarmup, 0);
    assert_null(old->warmup);
    assert_int_equal(policy_warmup_limit(old, d1), 0);
    assert_int_equal(policy_warmup_limit(NULL, d1), 0);

    const egress_source_t *lp = policy_source_find(p, "leap");
    assert_int_equal(policy_day_yyyymmdd(lp->warmup_start_day), 20280229);
    uint64_t l1 = (uint64_t)lp->warmup_start_day * DAY_MS;
    assert_int_equal(policy_warmup_limit(lp, l1), 7);
    assert_int_equal(policy_warmup_limit(lp, l1 + DAY_MS), 3);
    assert_int_equal(policy_warmup_limit(lp, l1 + 2 * DAY_MS), 100000000);
    assert_int_equal(policy_warmup_limit(lp, l1 + 3 * DAY_MS), 0);
    policy_free(p);

    /* exactly 365 days is allowed */
    char text[4096];
    int n = snprintf(text, sizeof(text), "[source a]\naddress = 127.0.0.1\nwarmup_start = 2026-01-01\nwarmup =");
    for (int i = 0; i < 365; i++)
        n += snprintf(text + n, sizeof(text) - (size_t)n, " %d", i + 1);
    snprintf(text + n, sizeof(text) - (size_t)n, "\n");
    p = load_ok(text, NULL);
    s = policy_source_find(p, "a");
    assert_int_equal(s->nwarmup, 365);
    assert_int_equal(s->warmup[364], 365);
    uint64_t a1 = (uint64_t)s->warmup_start_day * DAY_MS;
    assert_int_equal(policy_day_yyyymmdd(s->warmup_start_day), 20260101);
    assert_int_equal(policy_warmup_limit(s, a1 + 2 * DAY_MS), 3);
    assert_int_equal(policy_warmup_limit(s, a1 + 364 * DAY_MS), 365);
    assert_int_equal(policy_warmup_limit(s, a1 + 365 * DAY_MS), 0);
    policy_free(p);

    /* 366 is not */
    n = snprintf(text, sizeof(text), "[source a]\naddress = 127.0.0.1\nwarmup_start = 2026-01-01\nwarmup =");
    for (int i = 0; i < 366; i++)
        n += snprintf(text + n, sizeof(text) - (size_t)n, " 5");
    snprintf(text + n, sizeof(text) - (size_t)n, "\n");
    expect_error(text, NULL, 0, "4: [source a] warmup: more than 365 days");
}

static void test_warmup_errors(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        const char *want; /* after "path:" */
    } cases[] = {
        { "[source a]\naddress = 127.0.0.1\nwarmup = 500 1000\n",
          "1: [source a] has warmup but no warmup_start (its day 1, YYYY-MM-DD)" },
        { "[source a]\naddress = 127.0.0.1\nwarmup_start = 2026-12-01\n[source b]\naddress = 127.0.0.2\n",
          "1: [source a] has warmup_start but no warmup (the messages per site for each day)" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 500 0 1000\nwarmup_start = 2026-12-01\n",
          "3: [source a] warmup: day 2: \"0\" is not a number of messages from 1 to 100000000" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 100000001\nwarmup_start = 2026-12-01\n",
          "3: [source a] warmup: day 1: \"100000001\" is not a number of messages from 1 to 100000000" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 500 1k\nwarmup_start = 2026-12-01\n",
          "3: [source a] warmup: day 2: \"1k\" is not a number of messages from 1 to 100000000" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 500 -3\nwarmup_start = 2026-12-01\n",
          "3: [source a] warmup: day 2: \"-3\" is not a number of messages from 1 to 100000000" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = , ,\nwarmup_start = 2026-12-01\n",
          "3: [source a] warmup: expected the messages per site for each day (N N ...)" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = # later\n", "3: [source a] warmup: empty value" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup = 6\n",
          "4: [source a] warmup is given twice, on lines 3 and 4" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026-02-30\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2026-02-30\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2027-02-29\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2027-02-29\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2100-02-29\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2100-02-29\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026-13-01\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2026-13-01\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026-00-10\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2026-00-10\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026-12-00\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2026-12-00\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026-12-1\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2026-12-1\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026/12/01\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2026/12/01\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 1969-12-31\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"1969-12-31\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026-12-01T00:00\n",
          "4: [source a] warmup_start: expected a date YYYY-MM-DD (UTC) like 2026-12-01, got \"2026-12-01T00:00\"" },
        { "[source a]\naddress = 127.0.0.1\nwarmup = 5\nwarmup_start = 2026-12-01\nwarmup_start = 2026-12-02\n",
          "5: [source a] warmup_start is given twice, on lines 4 and 5" },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        expect_error(cases[i].text, NULL, 0, cases[i].want);
}

static void test_example_files(void **state)
{
    (void)state;
    char err[1024];
    policy_t *p = policy_load(MP_SOURCE_DIR "/deploy/egress.example.ini", MP_SOURCE_DIR "/deploy/shaping.example.ini",
                              err, sizeof(err));
    if (p == NULL)
        fail_msg("the example files do not load: %s", err);
    assert_true(policy_nsources(p) >= 2);
    assert_true(policy_npools(p) >= 2);
    assert_int_equal(policy_has_shaping(p), 1);
    assert_non_null(policy_pool_for(p, NULL, NULL, NULL)); /* it has a [default] */
    shaping_params_t sp;
    policy_shaping(p, "gmail.com", "google.com", NULL, NULL, &sp);
    assert_string_equal(sp.rule, "site:google.com");
    assert_true(sp.connection_limit > 0);
    /* the well-known deferrals are recognised */
    const automation_rule_t *r;
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", NULL, 421, "4.7.0",
                           "[TS03] All messages from 192.0.2.1 will be permanently deferred");
    assert_non_null(r);
    assert_int_equal(r->action, POLICY_ACT_SUSPEND);
    r = policy_match_reply(p, "yahoo.com", "yahoodns.net", NULL, 421, "4.7.0",
                           "[TS01] Messages from 192.0.2.1 temporarily deferred due to user complaints");
    assert_non_null(r);
    assert_int_equal(r->action, POLICY_ACT_SUSPEND);
    r = policy_match_reply(p, "hotmail.com", "outlook.com", NULL, 451, "4.7.650",
                           "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.");
    assert_non_null(r);
    assert_int_equal(r->action, POLICY_ACT_RATE);
    r = policy_match_reply(p, "hotmail.com", "outlook.com", NULL, 550, "5.7.1",
                           "Unfortunately, messages from [192.0.2.1] weren't sent. ... (S3150)");
    assert_non_null(r);
    assert_int_equal(r->action, POLICY_ACT_SUSPEND);
    r = policy_match_reply(p, "gmail.com", "google.com", NULL, 421, "4.7.28",
                           "Our system has detected an unusual rate of unsolicited mail");
    assert_non_null(r);
    assert_int_equal(r->action, POLICY_ACT_RATE);
    r = policy_match_reply(p, "gmail.com", "google.com", NULL, 421, "4.7.0",
                           "Our system has detected an unusual rate of unsolicited mail originating from your IP");
    assert_non_null(r);
    assert_int_equal(r->action, POLICY_ACT_SUSPEND);
    /* an ordinary greylisting deferral is nobody's rule */
    assert_null(policy_match_reply(p, "gmail.com", "google.com", NULL, 450, "4.2.1", "try again later"));
    policy_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_egress_sources_and_pools, teardown),
        cmocka_unit_test_teardown(test_forward_references_and_bracketed_ipv6, teardown),
        cmocka_unit_test_teardown(test_pool_for_precedence, teardown),
        cmocka_unit_test_teardown(test_egress_errors, teardown),
        cmocka_unit_test_teardown(test_comments_and_syntax, teardown),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test_teardown(test_shaping_merge_order, teardown),
        cmocka_unit_test_teardown(test_automation_matching, teardown),
        cmocka_unit_test_teardown(test_shaping_errors, teardown),
        cmocka_unit_test_teardown(test_qualifiers_checked_against_egress, teardown),
        cmocka_unit_test_teardown(test_warmup_parse_and_limit, teardown),
        cmocka_unit_test_teardown(test_warmup_errors, teardown),
        cmocka_unit_test(test_example_files),
    };
    return cmocka_run_group_tests_name("policy", tests, NULL, NULL);
}

/*
 * tests/unit/test_outcome.c - the classifier (deliverer/outcome.c) against
 * a table of real-world replies: Gmail, Outlook/Exchange Online, Yahoo,
 * Postfix, Exim, Sendmail, Mimecast, Proofpoint, postgrey, Amazon SES
 * wordings as they appear in bounce logs. Each row: code, enhanced code,
 * text -> outcome and reason tag. A failing row prints itself.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "deliverer/outcome.h"

#define D OUTCOME_DELIVERED
#define T OUTCOME_TRANSIENT
#define P OUTCOME_PERMANENT

typedef struct ocase {
    int         code;
    const char *enh;
    const char *text;
    outcome_t   outcome;
    const char *tag;
} ocase_t;

static const ocase_t cases[] = {
    /* delivered */
    { 250, "2.0.0", "OK 1700000000 a1si123456qkb.100 - gsmtp", D, "delivered" },
    { 250, "2.6.0", "<abc@x> [InternalId=123, Hostname=AM0PR01MB] Queued mail for delivery", D, "delivered" },
    { 250, "", "ok dirdel", D, "delivered" },
    { 250, "2.0.0", "Ok: queued as 4Xk2", D, "delivered" },
    { 251, "2.1.5", "User not local; will forward", D, "delivered" },
    /* Gmail */
    { 550, "5.1.1", "The email account that you tried to reach does not exist. Please try double-checking "
                    "the recipient's email address for typos or unnecessary spaces.", P, "no_such_user" },
    { 550, "5.2.1", "The email account that you tried to reach is disabled.", P, "no_such_user" },
    { 452, "4.2.2", "The email account that you tried to reach is over quota. Please direct the recipient to "
                    "https://support.google.com/mail/?p=OverQuotaTemp", T, "mailbox_full" },
    { 552, "5.2.2", "The email account that you tried to reach is over quota and inactive.", P, "mailbox_full" },
    { 450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that prevents additional "
                    "messages from being delivered.", T, "rate_limited" },
    { 421, "4.7.0", "[192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from "
                    "your IP address. To protect our users from spam, mail sent from your IP address has been "
                    "temporarily rate limited.", T, "rate_limited" },
    { 421, "4.7.28", "Gmail has detected an unusual rate of mail originating from your DKIM domain", T,
      "rate_limited" },
    { 550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. To reduce the amount "
                    "of spam sent to Gmail, this message has been blocked.", P, "spam" },
    { 550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. Gmail requires all "
                     "senders to authenticate with either SPF or DKIM.", P, "policy" },
    { 552, "5.7.0", "This message was blocked because its content presents a potential security issue.", P,
      "spam" },
    { 552, "5.3.4", "Your message exceeded Google's message size limits.", P, "message_too_big" },
    { 550, "5.4.5", "Daily user sending quota exceeded.", T, "rate_limited" },
    { 421, "4.7.0", "TLS required for RCPT domain, closing connection.", T, "tls" },
    { 454, "4.7.0", "Too many login attempts, please try again later.", T, "rate_limited" },
    /* Outlook / Exchange Online / Hotmail */
    { 550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302).", P, "protocol" },
    { 550, "", "Requested action not taken: mailbox unavailable", P, "no_such_user" },
    { 550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)", P, "no_such_user" },
    { 550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet "
                    "service provider since part of their network is on our block list (S3150).", P, "policy" },
    { 451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77714)", T, "rate_limited" },
    { 451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.", T,
      "rate_limited" },
    { 550, "5.7.708", "Service unavailable. Access denied, traffic not accepted from this IP.", P, "policy" },
    { 550, "5.7.606", "Access denied, banned sending IP [192.0.2.1].", P, "policy" },
    { 554, "5.2.2", "mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException", P, "mailbox_full" },
    { 550, "5.7.509", "Access denied, sending domain example.com does not pass DMARC verification", P,
      "policy" },
    { 452, "4.3.1", "Insufficient system resources", T, "other" },
    { 550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", P,
      "no_such_user" },
    /* Yahoo / AOL */
    { 554, "", "delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0] - "
               "mta1.mail.bf1.yahoo.com", P, "no_such_user" },
    { 552, "", "1 Requested mail action aborted, mailbox not found", P, "no_such_user" },
    { 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
                    "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", T,
      "rate_limited" },
    { 421, "4.7.1", "[TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT "
                    "succeed.", T, "policy" },
    { 553, "5.7.1", "[BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's "
                    "list", P, "policy" },
    { 554, "5.7.9", "Message not accepted for policy reasons.", P, "policy" },
    { 451, "", "Message temporarily deferred - [160]", T, "rate_limited" },
    /* Postfix */
    { 550, "5.1.1", "<bob@test.example>: Recipient address rejected: User unknown in virtual mailbox table",
      P, "no_such_user" },
    { 550, "5.1.1", "<bob@test.example>: Recipient address rejected: User unknown in local recipient table",
      P, "no_such_user" },
    { 554, "5.7.1", "<bob@test.example>: Relay access denied", P, "policy" },
    { 450, "4.1.8", "<a@nonexistent.example>: Sender address rejected: Domain not found", T, "other" },
    { 450, "4.7.1", "Client host rejected: cannot find your hostname, [192.0.2.1]", T, "policy" },
    { 554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", P,
      "policy" },
    { 552, "5.3.4", "Message size exceeds fixed limit", P, "message_too_big" },
    { 452, "4.3.1", "Insufficient system storage", T, "other" },
    { 451, "4.3.0", "Error: queue file write error", T, "other" },
    { 421, "4.3.2", "Service shutting down, closing transmission channel", T, "other" },
    { 554, "5.5.1", "Error: no valid recipients", P, "protocol" },
    { 503, "5.5.1", "Error: need RCPT command", P, "protocol" },
    { 502, "5.5.2", "Error: command not recognized", P, "protocol" },
    { 452, "4.5.3", "Error: too many recipients", T, "rate_limited" },
    { 550, "5.7.0", "Must issue a STARTTLS command first", P, "tls" },
    { 530, "5.7.0", "Must issue a STARTTLS command first", P, "tls" },
    { 450, "4.2.0", "<tempfail@test.example>: Recipient address rejected: try again later", T, "other" },
    /* postgrey and other greylisting */
    { 450, "4.2.0", "<b@y>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/y.html",
      T, "greylisted" },
    { 451, "4.7.1", "Greylisting in action, please come back later", T, "greylisted" },
    { 451, "", "Greylisted, please try again in 180 seconds", T, "greylisted" },
    { 550, "5.7.1", "Greylisted, try again in 5 minutes", T, "greylisted" },
    /* Exim */
    { 550, "", "Unrouteable address", P, "no_such_user" },
    { 550, "5.1.1", "<b@y>: Recipient address rejected: User unknown", P, "no_such_user" },
    { 550, "", "No Such User Here", P, "no_such_user" },
    { 552, "", "Message size exceeds maximum permitted", P, "message_too_big" },
    { 451, "", "Temporary local problem - please try later", T, "other" },
    { 550, "", "Verification failed for <a@x>", P, "other" },
    { 550, "", "Administrative prohibition", P, "other" },
    { 421, "", "Too many concurrent SMTP connections; please try again later.", T, "rate_limited" },
    { 550, "", "rejected because 192.0.2.1 is in a black list at zen.spamhaus.org", P, "spam" },
    /* Sendmail */
    { 550, "5.1.1", "<b@y>... User unknown", P, "no_such_user" },
    { 553, "5.1.3", "<b@>... Domain name required for recipient address", P, "no_such_user" },
    { 452, "4.4.5", "Insufficient disk space; try again later", T, "rate_limited" },
    { 550, "5.2.1", "<b@y>... Mailbox disabled for this recipient", P, "no_such_user" },
    { 554, "5.0.0", "Service unavailable", P, "other" },
    /* Mimecast / Proofpoint / Barracuda / SES */
    { 550, "", "Rejected by header based Anti-Spoofing policy: b@y", P, "policy" },
    { 554, "", "Email rejected due to security policies", P, "policy" },
    { 451, "", "Internal resource temporarily unavailable - https://community.mimecast.com", T, "other" },
    { 550, "", "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550", P, "no_such_user" },
    { 554, "5.7.1", "Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1", P, "policy" },
    { 550, "", "permanent failure for one or more recipients (b@y:blocked)", P, "policy" },
    { 554, "5.7.1", "Message rejected: Email address is not verified.", P, "policy" },
    { 550, "5.7.1", "Message rejected due to virus content", P, "spam" },
    { 554, "5.7.1", "The message was rejected because it contains prohibited virus or spam content", P, "spam" },
    /* other providers / RFC examples */
    { 550, "5.1.2", "Host unknown (Name server: example.invalid: host not found)", P, "dns" },
    { 554, "5.4.4", "Unable to route: no mail hosts for domain", P, "dns" },
    { 550, "5.4.4", "Unrouteable address", P, "dns" },
    { 452, "4.2.2", "Mailbox full", T, "mailbox_full" },
    { 552, "", "Requested mail action aborted: exceeded storage allocation", P, "mailbox_full" },
    { 552, "", "Mailbox size limit exceeded", P, "mailbox_full" },
    { 522, "5.7.1", "Quota exceeded for this user", P, "policy" },
    { 422, "", "Recipient mailbox is full", T, "mailbox_full" },
    { 552, "", "Too many recipients", T, "rate_limited" },
    { 550, "5.7.23", "The message was rejected because of Sender Policy Framework violation", P, "policy" },
    { 550, "5.7.25", "The IP address sending this message does not have a PTR record setup", P, "policy" },
    { 535, "5.7.8", "Error: authentication failed: authentication failure", P, "policy" },
    { 454, "4.7.0", "TLS not available due to local problem", T, "tls" },
    { 554, "5.7.5", "Cryptographic failure", P, "tls" },
    { 451, "4.4.1", "No answer from host", T, "network" },
    { 451, "4.4.2", "Connection dropped", T, "network" },
    { 550, "5.4.7", "Delivery time expired", P, "timeout" },
    { 550, "5.6.0", "Message content rejected", P, "policy" },
    { 554, "5.6.7", "Non-ASCII addresses require SMTPUTF8", P, "policy" },
    { 550, NULL, NULL, P, "other" },
    { 451, NULL, NULL, T, "other" },
    /* not a final answer */
    { 354, "", "go ahead", T, "protocol" },
    { 0, "", "", T, "protocol" },
    { 999, "", "", T, "protocol" },
    { 199, "", "", T, "protocol" },
};

static void test_real_world_table(void **state)
{
    size_t bad = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const ocase_t *c = &cases[i];
        outcome_reason_t tag = OUTCOME_R_LAST;
        outcome_t o = outcome_classify(c->code, c->enh, c->text, &tag);
        if (o != c->outcome || strcmp(outcome_reason_name(tag), c->tag) != 0) {
            print_error("row %zu: %d %s \"%s\": got %s/%s, want %s/%s\n", i, c->code, c->enh ? c->enh : "-",
                        c->text ? c->text : "-", outcome_name(o), outcome_reason_name(tag), outcome_name(c->outcome), c->tag);
            bad++;
        }
    }
    assert_int_equal(bad, 0);
}

/* Every tag the table can produce is reachable: a row deleted from the
 * rule table makes at least one case above fail, and each tag named in
 * docs/message-format.md appears in the cases. */
static void test_every_tag_covered(void **state)
{
    static const char *tags[] = { "delivered", "no_such_user", "mailbox_full", "rate_limited", "greylisted",
                                  "policy", "spam", "message_too_big", "dns", "tls", "network", "timeout",
                                  "protocol", "other" };
    for (size_t t = 0; t < sizeof(tags) / sizeof(tags[0]); t++) {
        int seen = 0;
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
            seen |= strcmp(cases[i].tag, tags[t]) == 0;
        if (!seen)
            print_error("tag %s not covered\n", tags[t]);
        assert_true(seen);
    }
}

static void test_errors(void **state)
{
    static const char *kinds[] = { "network", "timeout", "tls", "dns", "protocol" };
    for (int k = 0; k < OUTCOME_ERR_LAST; k++) {
        outcome_reason_t tag = OUTCOME_R_LAST;
        assert_int_equal(outcome_for_error(k, &tag), OUTCOME_TRANSIENT);
        assert_string_equal(outcome_reason_name(tag), kinds[k]);
    }
    outcome_reason_t tag = OUTCOME_R_LAST;
    assert_int_equal(outcome_for_error(99, &tag), OUTCOME_TRANSIENT);
    assert_string_equal(outcome_reason_name(tag), "protocol");
    assert_int_equal(outcome_classify(550, "5.1.1", "x", NULL), OUTCOME_PERMANENT); /* NULL tag pointer ok */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_real_world_table),
        cmocka_unit_test(test_every_tag_covered),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

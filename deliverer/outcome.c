/*
 * SUMMARY
 *  deliverer/outcome.c - per-recipient classification of SMTP answers.
 * DESCRIPTION
 *  The reply code decides delivered / transient / permanent: a server
 *  that says 4xx wants us back, whatever its enhanced code claims. The one
 *  exception is a row marked force 'T': a 5xx whose words say "later"
 *  (greylisting, a daily sending quota, RFC 5321's "552 too many
 *  recipients") is transient. The reason tag comes from the same
 *  first-match table over (code class, exact code, enhanced code pattern,
 *  words in the text). More specific rows come first: "5.7.1 ... spam" is
 *  spam, not policy; "4.7.1 greylisted" is greylisting, not policy.
 * DIAGNOSTICS
 *  None: unknown inputs classify as "other" (or "protocol" for a code
 *  outside 2xx..5xx).
 */
#include "deliverer/outcome.h"

#include <stddef.h>
#include <string.h>

#include "core/util.h"

typedef struct outcome_rule {
    char        cls;  /* first digit of the reply code: '4', '5', or 0 for both */
    int         code; /* exact reply code, 0 for any */
    const char *enh;  /* pattern: 'x' matches any class digit, a trailing ".x" any detail; NULL any */
    const char *text; /* '|'-separated words, case-insensitive; NULL any */
    outcome_reason_t tag;
    char        force; /* 'T': transient whatever the code says (a code that lies); 0: by code */
} outcome_rule_t;

/*
 * First match wins, so the order is the policy:
 *   1. texts that overrule the code (greylisting or a daily sending quota
 *      answered with 5xx, RFC 5321 §4.5.3.1.10 "552 too many recipients");
 *   2. texts that refine a class: rate limits before spam (Gmail's "unusual
 *      rate of unsolicited mail" is a throttle), blocklists before spam;
 *   3. RFC 3463 enhanced codes, most specific first;
 *   4. text-only fallbacks for servers without enhanced codes (Yahoo,
 *      Exim defaults, old Exchange).
 * Real provider wordings are added as rows and as cases in
 * tests/unit/test_outcome.c, never as code.
 */
static const outcome_rule_t rules[] = {
    /* 1. the code lies */
    { '5', 0,   NULL,    "greylist|graylist|grey-list|gray-list",           OUTCOME_R_GREYLISTED, 'T' },
    { '5', 0,   NULL,    "sending quota|sending limit|daily user sending|too many messages sent|"
                         "rate limit exceeded|temporarily deferred|temporarily rate",
                                                                               OUTCOME_R_RATE_LIMITED, 'T' },
    { '5', 0,   NULL,    "try again later|please try later|temporary failure|temporarily unavailable",
                                                                               OUTCOME_R_OTHER, 'T' },
    { '5', 552, NULL,    "too many recipients",                              OUTCOME_R_RATE_LIMITED, 'T' },
    /* 2. text refines the class */
    { '4', 0,   NULL,    "greylist|graylist|grey-list|gray-list",           OUTCOME_R_GREYLISTED, 0 },
    { '4', 0,   NULL,    "rate limit|rate limited|connection limit|too many connections|too many messages|"
                         "too many concurrent|throttl|slow down|unexpected volume|server busy|"
                         "receiving mail at a rate|unusual rate|temporarily deferred|rate of|too many login",
                                                                               OUTCOME_R_RATE_LIMITED, 0 },
    { 0,   0,   NULL,    "starttls|must issue a starttls|tls required|encryption required|"
                         "tls not available|requires tls",                   OUTCOME_R_TLS, 0 },
    { 0,   0,   "x.7.x", "blocked using|blocklist|blacklist|block list|dnsbl|spamhaus|spamcop|barracuda|"
                         "banned sending ip|reputation",                    OUTCOME_R_POLICY, 0 },
    { 0,   0,   NULL,    "spam|junk|unsolicited|bulk mail|phish|virus|malware|malicious|suspicious content|"
                         "content presents a potential",                    OUTCOME_R_SPAM, 0 },
    /* 3. enhanced status codes (RFC 3463) */
    { 0,   0,   "x.1.1",  NULL,                                           OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   "x.1.0",  "user|mailbox|recipient|address",               OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   "x.1.2",  NULL,                                           OUTCOME_R_DNS, 0 },
    { 0,   0,   "x.1.3",  NULL,                                           OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   "x.1.6",  NULL,                                           OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   "x.1.10", NULL,                                           OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   "x.2.1",  NULL,                                           OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   "x.2.2",  NULL,                                           OUTCOME_R_MAILBOX_FULL, 0 },
    { 0,   0,   "x.2.3",  NULL,                                           OUTCOME_R_MESSAGE_TOO_BIG, 0 },
    { 0,   0,   "x.3.4",  NULL,                                           OUTCOME_R_MESSAGE_TOO_BIG, 0 },
    { 0,   0,   "x.4.4",  NULL,                                           OUTCOME_R_DNS, 0 },
    { 0,   0,   "x.4.3",  NULL,                                           OUTCOME_R_DNS, 0 },
    /* Exchange Online's directory-based edge blocking: "5.4.1 Recipient
     * address rejected: Access denied" means the mailbox does not exist */
    { 0,   0,   "x.4.1",  "recipient address rejected",                   OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   "x.4.1",  NULL,                                           OUTCOME_R_NETWORK, 0 },
    { 0,   0,   "x.4.2",  NULL,                                           OUTCOME_R_NETWORK, 0 },
    { 0,   0,   "x.4.7",  NULL,                                           OUTCOME_R_TIMEOUT, 0 },
    { 0,   0,   "x.4.5",  NULL,                                           OUTCOME_R_RATE_LIMITED, 0 },
    { 0,   0,   "x.5.3",  NULL,                                           OUTCOME_R_RATE_LIMITED, 0 },
    { 0,   0,   "x.5.x",  NULL,                                           OUTCOME_R_PROTOCOL, 0 },
    { 0,   0,   "x.7.5",  NULL,                                           OUTCOME_R_TLS, 0 },
    { 0,   0,   "x.7.10", NULL,                                           OUTCOME_R_TLS, 0 },
    { 0,   0,   "x.7.11", NULL,                                           OUTCOME_R_TLS, 0 },
    { 0,   0,   "x.7.x",  NULL,                                           OUTCOME_R_POLICY, 0 },
    { 0,   0,   "x.6.x",  NULL,                                           OUTCOME_R_POLICY, 0 },
    /* 4. no enhanced code: the words */
    { 0,   0,   NULL,    "user unknown|unknown user|no such user|no such recipient|no such mailbox|"
                         "mailbox unavailable|mailbox not found|recipient not found|invalid recipient|"
                         "unknown recipient|does not exist|doesn't exist|not exist|no mailbox|"
                         "doesn't have a|address rejected: user|account has been disabled|"
                         "account is disabled|user not found|unrouteable address|invalid mailbox",
                                                                               OUTCOME_R_NO_SUCH_USER, 0 },
    { 0,   0,   NULL,    "mailbox full|mailbox is full|over quota|quota exceeded|exceeded storage|"
                         "insufficient storage|out of storage|storage allocation|mailbox size limit",
                                                                               OUTCOME_R_MAILBOX_FULL, 0 },
    { 0,   0,   NULL,    "too large|too big|size exceeds|exceeds size|size limit|exceeds the maximum|"
                         "message length exceeds",                          OUTCOME_R_MESSAGE_TOO_BIG, 0 },
    { 0,   0,   NULL,    "relay access denied|relaying denied|not permitted to relay|relay not permitted|"
                         "access denied|rejected by policy|policy|policies|anti-spoofing|blocked|denied|dmarc|spf|dkim",
                                                                               OUTCOME_R_POLICY, 0 },
    { 0,   0,   NULL,    "command not recognized|syntax error|bad sequence|unrecognized command|"
                         "command unrecognized",                            OUTCOME_R_PROTOCOL, 0 },
};

static const char *const outcome_names[] = { "delivered", "transient", "permanent" };

static const outcome_reason_t error_reasons[OUTCOME_ERR_LAST] = {
    [OUTCOME_ERR_NETWORK] = OUTCOME_R_NETWORK,
    [OUTCOME_ERR_TIMEOUT] = OUTCOME_R_TIMEOUT,
    [OUTCOME_ERR_TLS] = OUTCOME_R_TLS,
    [OUTCOME_ERR_DNS] = OUTCOME_R_DNS,
    [OUTCOME_ERR_PROTOCOL] = OUTCOME_R_PROTOCOL,
};

static const char *const reason_names[OUTCOME_R_LAST] = {
    [OUTCOME_R_DELIVERED] = "delivered",
    [OUTCOME_R_NO_SUCH_USER] = "no_such_user",
    [OUTCOME_R_MAILBOX_FULL] = "mailbox_full",
    [OUTCOME_R_GREYLISTED] = "greylisted",
    [OUTCOME_R_POLICY] = "policy",
    [OUTCOME_R_MESSAGE_TOO_BIG] = "message_too_big",
    [OUTCOME_R_SPAM] = "spam",
    [OUTCOME_R_RATE_LIMITED] = "rate_limited",
    [OUTCOME_R_OTHER] = "other",
    [OUTCOME_R_NETWORK] = "network",
    [OUTCOME_R_TIMEOUT] = "timeout",
    [OUTCOME_R_TLS] = "tls",
    [OUTCOME_R_DNS] = "dns",
    [OUTCOME_R_PROTOCOL] = "protocol",
    [OUTCOME_R_ALREADY_DELIVERED] = "already_delivered",
    [OUTCOME_R_LEDGER] = "ledger_unavailable",
    [OUTCOME_R_PARKED] = "parked",
    [OUTCOME_R_SUSPENDED] = "suspended",
    [OUTCOME_R_SHAPING] = "shaping",
    [OUTCOME_R_ADMIN] = "admin",
};

const char *outcome_reason_name(outcome_reason_t r)
{
    return (unsigned)r < OUTCOME_R_LAST ? reason_names[r] : "other";
}

const char *outcome_name(outcome_t o)
{
    return (unsigned)o < sizeof(outcome_names) / sizeof(outcome_names[0]) ? outcome_names[o] : "unknown";
}

static int enh_match(const char *pat, const char *enh)
{
    /* "x.7.x" -> class any, subject 7, detail any; "x.1.1" exact subject/detail */
    if (enh == NULL || enh[0] == '\0')
        return 0;
    const char *p = pat, *e = enh;
    while (*p) {
        if (*p == 'x') {
            if (*e < '0' || *e > '9')
                return 0;
            while (*e >= '0' && *e <= '9')
                e++;
            p++;
        } else if (*p == *e) {
            p++;
            e++;
        } else {
            return 0;
        }
    }
    return *e == '\0';
}

static int text_match(const char *words, const char *text)
{
    if (text == NULL)
        return 0;
    size_t tl = strlen(text);
    const char *w = words;
    while (*w) {
        const char *end = strchr(w, '|');
        size_t wl = end ? (size_t)(end - w) : strlen(w);
        for (size_t i = 0; wl > 0 && i + wl <= tl; i++)
            if (util_strncasecmp(text + i, w, wl) == 0)
                return 1;
        if (!end)
            break;
        w = end + 1;
    }
    return 0;
}

outcome_t outcome_classify(int code, const char *enh, const char *text, outcome_reason_t *reason_tag)
{
    outcome_reason_t tag = OUTCOME_R_OTHER;
    outcome_t o;
    int cls = code / 100;

    if (code < 200 || code > 599 || cls == 3) {
        if (reason_tag)
            *reason_tag = OUTCOME_R_PROTOCOL;
        return OUTCOME_TRANSIENT;
    }
    if (cls == 2) {
        if (reason_tag)
            *reason_tag = OUTCOME_R_DELIVERED;
        return OUTCOME_DELIVERED;
    }
    o = cls == 4 ? OUTCOME_TRANSIENT : OUTCOME_PERMANENT;
    for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++) {
        const outcome_rule_t *r = &rules[i];
        if (r->cls && r->cls - '0' != cls)
            continue;
        if (r->code && r->code != code)
            continue;
        if (r->enh && !enh_match(r->enh, enh))
            continue;
        if (r->text && !text_match(r->text, text))
            continue;
        tag = r->tag;
        if (r->force == 'T')
            o = OUTCOME_TRANSIENT;
        break;
    }
    if (reason_tag)
        *reason_tag = tag;
    return o;
}

outcome_t outcome_for_error(int kind, outcome_reason_t *reason_tag)
{
    if (reason_tag)
        *reason_tag = (kind >= 0 && kind < OUTCOME_ERR_LAST) ? error_reasons[kind] : OUTCOME_R_PROTOCOL;
    return OUTCOME_TRANSIENT;
}

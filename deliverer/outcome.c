/*
 * SUMMARY
 *  deliverer/outcome.c - per-recipient classification of SMTP answers.
 * DESCRIPTION
 *  The reply code alone decides delivered / transient / permanent: a
 *  server that says 4xx wants us back, whatever its enhanced code claims.
 *  The reason tag comes from a first-match table over (code class, exact
 *  code, enhanced code pattern, words in the text). More specific rows
 *  come first: "5.7.1 ... spam" is spam, not policy; "4.7.1 greylisted"
 *  is greylisting, not policy. This is the walking-skeleton table; real
 *  provider wordings get added as rows, not as code.
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
    const char *tag;
} outcome_rule_t;

static const outcome_rule_t rules[] = {
    /* text-qualified rows first: they refine what the codes alone say */
    { '4', 0,   NULL,    "greylist|graylist",                            "greylisted" },
    { '4', 421, NULL,    "rate|too many|throttl|slow down",              "rate_limited" },
    { '4', 0,   "4.7.0", "rate|too many|throttl|slow down",              "rate_limited" },
    { 0,   0,   "x.7.x", "spam|junk|bulk",                               "spam" },
    { 0,   0,   "x.1.1",  NULL,                                          "no_such_user" },
    { 0,   0,   "x.1.10", NULL,                                          "no_such_user" },
    { 0,   0,   "x.2.2",  NULL,                                          "mailbox_full" },
    { 0,   0,   "x.3.4",  NULL,                                          "message_too_big" },
    { 0,   0,   "x.7.1",  NULL,                                          "policy" },
};

static const char *const outcome_names[] = { "delivered", "transient", "permanent" };

static const char *const error_tags[OUTCOME_ERR_LAST] = {
    [OUTCOME_ERR_NETWORK] = "network",
    [OUTCOME_ERR_TIMEOUT] = "timeout",
    [OUTCOME_ERR_TLS] = "tls",
    [OUTCOME_ERR_DNS] = "dns",
    [OUTCOME_ERR_PROTOCOL] = "protocol",
};

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

outcome_t outcome_classify(int code, const char *enh, const char *text, const char **reason_tag)
{
    const char *tag = "other";
    outcome_t o;
    int cls = code / 100;

    if (code < 200 || code > 599 || cls == 3) {
        if (reason_tag)
            *reason_tag = error_tags[OUTCOME_ERR_PROTOCOL];
        return OUTCOME_TRANSIENT;
    }
    if (cls == 2) {
        if (reason_tag)
            *reason_tag = "delivered";
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
        break;
    }
    if (reason_tag)
        *reason_tag = tag;
    return o;
}

outcome_t outcome_for_error(int kind, const char **reason_tag)
{
    if (reason_tag)
        *reason_tag = (kind >= 0 && kind < OUTCOME_ERR_LAST) ? error_tags[kind]
                                                              : error_tags[OUTCOME_ERR_PROTOCOL];
    return OUTCOME_TRANSIENT;
}

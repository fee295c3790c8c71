/*
 * SUMMARY
 *  deliverer/retry.c - retry levels, backoff with jitter, server delays.
 * DESCRIPTION
 *  Delay queues are a fixed ladder because RabbitMQ expires messages only
 *  at the head of a queue: one TTL per queue keeps every message behind
 *  others of the same delay, so none waits behind a longer one. The
 *  computed backoff is rounded up to the next level.
 */
#include "deliverer/retry.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/config.h"
#include "core/util.h"

int retry_levels_parse(const char *spec, retry_levels_t *out)
{
    memset(out, 0, sizeof(*out));
    char *copy = xstrdup(spec), *save = NULL;
    uint64_t prev = 0;
    for (char *t = strtok_r(copy, ", ", &save); t; t = strtok_r(NULL, ", ", &save)) {
        uint64_t ms;
        if (config_parse_duration(t, &ms) < 0 || ms == 0 || ms <= prev) {
            free(copy);
            retry_levels_free(out);
            return -1;
        }
        out->ms = xrealloc(out->ms, (out->n + 1) * sizeof(uint64_t));
        out->names = xrealloc(out->names, (out->n + 1) * sizeof(char *));
        char name[32];
        config_format_duration(ms, name, sizeof(name));
        out->ms[out->n] = ms;
        out->names[out->n] = xstrdup(name);
        out->n++;
        prev = ms;
    }
    free(copy);
    if (out->n == 0)
        return -1;
    return 0;
}

void retry_levels_free(retry_levels_t *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->names[i]);
    free(l->names);
    free(l->ms);
    memset(l, 0, sizeof(*l));
}

int retry_policy_init(retry_policy_t *p, const mp_config_t *cfg, char *err, size_t errlen)
{
    memset(p, 0, sizeof(*p));
    if (retry_levels_parse(cfg->retry_levels, &p->levels) < 0) {
        snprintf(err, errlen, "[retry] levels: cannot parse \"%s\"", cfg->retry_levels);
        return -1;
    }
    for (int c = 0; c < RETRY_CLASSES; c++) {
        p->cls[c] = (retry_class_policy_t){
            .base_ms = cfg->retry_base_ms[c],
            .max_age_ms = cfg->retry_max_age_ms[c],
            .max_attempts = cfg->retry_max_attempts[c],
            .fast_retries = cfg->retry_fast_retries[c],
            .fast_base_ms = cfg->retry_fast_base_ms[c],
        };
        if (p->cls[c].max_age_ms > p->max_age_ms)
            p->max_age_ms = p->cls[c].max_age_ms;
    }
    p->queue_prefix = cfg->retry_queue_prefix;
    p->poison_redeliveries = cfg->retry_poison_redeliveries;
    return 0;
}

void retry_policy_free(retry_policy_t *p)
{
    retry_levels_free(&p->levels);
}

void retry_queue_name(const char *prefix, const retry_levels_t *l, size_t i, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s.%s", prefix, l->names[i]);
}

int retry_class(int priority)
{
    if (priority >= 8)
        return 0;
    if (priority >= 4)
        return 1;
    return 2;
}

static uint64_t jitter(uint64_t ms, double rnd)
{
    if (rnd < 0)
        rnd = 0;
    if (rnd >= 1)
        rnd = 0.999999;
    return (uint64_t)((double)ms * (0.85 + 0.30 * rnd));
}

uint64_t retry_backoff_ms(uint64_t base_ms, unsigned attempt, double rnd)
{
    unsigned shift = attempt > 1 ? attempt - 1 : 0;
    uint64_t ms = base_ms;
    for (unsigned i = 0; i < shift && ms < (UINT64_MAX >> 2); i++)
        ms *= 2;
    return jitter(ms, rnd);
}

size_t retry_pick_level(const retry_levels_t *l, uint64_t want_ms, uint64_t server_ms)
{
    uint64_t want = want_ms > server_ms ? want_ms : server_ms;
    for (size_t i = 0; i < l->n; i++)
        if (l->ms[i] >= want)
            return i;
    return l->n - 1;
}

uint64_t retry_fast_delay_ms(uint64_t base_ms, unsigned n, double rnd)
{
    uint64_t ms = base_ms;
    for (unsigned i = 0; i < n && ms < 3000; i++)
        ms *= 2;
    if (ms > 3000)
        ms = 3000;
    return jitter(ms, rnd);
}

uint64_t retry_server_delay_ms(const char *text)
{
    static const struct { const char *word; uint64_t mult; } units[] = {
        { "s", 1000 }, { "sec", 1000 }, { "secs", 1000 }, { "second", 1000 }, { "seconds", 1000 },
        { "m", 60000 }, { "min", 60000 }, { "mins", 60000 }, { "minute", 60000 },
        { "minutes", 60000 }, { "h", 3600000 }, { "hr", 3600000 }, { "hrs", 3600000 },
        { "hour", 3600000 }, { "hours", 3600000 },
    };
    if (text == NULL)
        return 0;
    /* only a number introduced by "in", "after" or "wait" counts, so a
     * "4.2.0" code or a queue id never reads as a delay */
    static const char *const intro[] = { "in ", "after ", "wait " };
    for (const char *p = text; *p; p++) {
        if (p > text && isalpha((unsigned char)p[-1]))
            continue;
        const char *num = NULL;
        for (size_t k = 0; k < sizeof(intro) / sizeof(intro[0]) && num == NULL; k++)
            if (strncasecmp(p, intro[k], strlen(intro[k])) == 0)
                num = p + strlen(intro[k]);
        if (num == NULL || !isdigit((unsigned char)*num))
            continue;
        char *end;
        unsigned long n = strtoul(num, &end, 10);
        while (*end == ' ')
            end++;
        size_t wl = 0;
        while (isalpha((unsigned char)end[wl]))
            wl++;
        for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++)
            if (strlen(units[i].word) == wl && strncasecmp(end, units[i].word, wl) == 0)
                return (uint64_t)n * units[i].mult;
    }
    return 0;
}

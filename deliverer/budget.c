/*
 * SUMMARY
 *  deliverer/budget.c - derived size limits, the automatic memory limit
 *  and the per-worker charge of bodies in flight.
 * DESCRIPTION
 *  The thresholds: pause at the limit, resume below 3/4 of it (a gap, so
 *  that one job ending does not resume a consumer the next delivery
 *  pauses again), refuse past limit + one largest message, and take
 *  anything when nothing is held. See budget.h and docs/operations.md,
 *  "Memory".
 */
#include "deliverer/budget.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

uint64_t budget_max_body(uint64_t max_size)
{
    return 2 * max_size + BUDGET_JSON_SLACK;
}

uint64_t budget_charge(uint64_t announced, int truncated)
{
    if (truncated)
        return announced < BUDGET_HEAD_BYTES ? announced : BUDGET_HEAD_BYTES;
    return announced * BUDGET_CHARGE_FACTOR;
}

int budget_parse_limit(const char *text, uint64_t *bytes)
{
    if (text == NULL)
        return 0;
    while (isspace((unsigned char)*text))
        text++;
    if (!isdigit((unsigned char)*text))
        return 0; /* "max", empty */
    char *end;
    errno = 0;
    unsigned long long n = strtoull(text, &end, 10);
    while (isspace((unsigned char)*end))
        end++;
    if (errno || *end != '\0' || n == 0)
        return 0;
    /* v1 says "no limit" with LONG_MAX rounded down to a page */
    if (n >= (1ULL << 62))
        return 0;
    *bytes = n;
    return 1;
}

uint64_t budget_memory_from(const char *v2_text, const char *v1_text, uint64_t phys)
{
    uint64_t lim;
    if (budget_parse_limit(v2_text, &lim) || budget_parse_limit(v1_text, &lim))
        return phys && phys < lim ? phys : lim;
    return phys;
}

/* A small file's first line, or NULL. */
static char *read_small(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return NULL;
    char *r = fgets(buf, (int)len, f);
    fclose(f);
    return r;
}

uint64_t budget_memory(void)
{
    char v2[64], v1[64];
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t phys = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    return budget_memory_from(read_small("/sys/fs/cgroup/memory.max", v2, sizeof(v2)),
                              read_small("/sys/fs/cgroup/memory/memory.limit_in_bytes", v1, sizeof(v1)),
                              phys);
}

uint64_t budget_auto(uint64_t memory, unsigned workers, uint64_t floor)
{
    uint64_t b = memory / 4 / (workers ? workers : 1);
    return b < floor ? floor : b;
}

unsigned budget_sessions(uint64_t memory, unsigned workers, uint64_t nofile)
{
    if (workers == 0)
        workers = 1;
    uint64_t by_mem = memory / 8 / workers / BUDGET_SESSION_BYTES;
    uint64_t by_fd = nofile > BUDGET_FD_RESERVE ? (nofile - BUDGET_FD_RESERVE) / workers : 0;
    uint64_t n = by_mem < by_fd ? by_mem : by_fd;
    if (n > 10000)
        n = 10000;
    if (n < 100)
        n = 100;
    return (unsigned)n;
}

unsigned budget_prefetch(unsigned sessions)
{
    uint64_t n = 2ull * sessions;
    if (n > 65535)
        n = 65535;
    if (n < 64)
        n = 64;
    return (unsigned)n;
}

void budget_init(budget_t *b, uint64_t limit, uint64_t largest)
{
    memset(b, 0, sizeof(*b));
    b->limit = limit;
    b->hard = limit + largest;
}

int budget_take(budget_t *b, uint64_t c)
{
    if (b->held > 0 && b->charge + c > b->hard)
        return 0;
    b->charge += c;
    b->held++;
    return 1;
}

void budget_release(budget_t *b, uint64_t c)
{
    b->charge = c > b->charge ? 0 : b->charge - c;
    if (b->held > 0)
        b->held--;
}

uint64_t budget_resume_below(const budget_t *b)
{
    return b->limit / 4 * 3;
}

budget_action_t budget_update(budget_t *b)
{
    if (!b->paused && b->charge >= b->limit) {
        b->paused = 1;
        return BUDGET_PAUSE;
    }
    if (b->paused && b->charge < budget_resume_below(b)) {
        b->paused = 0;
        return BUDGET_RESUME;
    }
    return BUDGET_STEADY;
}

/*
 * SUMMARY
 *  queue/jdoc.c - the parsed JSON document msgjson reads: nodes, lookup,
 *  and the checks every parser gets alike.
 * DESCRIPTION
 *  See queue/jdoc.h. jdoc_check() is one pass over the nodes: strings
 *  (keys included) scanned 8 octets at a time while they are ASCII without
 *  NUL, the rest through util_utf8_len(); objects of up to 16 members
 *  compared pairwise, larger ones sorted, so a body with many keys cannot
 *  make the duplicate check quadratic.
 * DIAGNOSTICS
 *  Reasons name the key or the string's offset; msgjson_parse reports
 *  jansson's text instead where jansson refuses the body too.
 */
#include "queue/jdoc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"

size_t jdoc_add(jdoc_t *d, size_t n)
{
    if (d->nnodes + n > d->cap) {
        size_t cap = d->cap ? d->cap : 64;
        while (cap < d->nnodes + n)
            cap *= 2;
        d->nodes = xrealloc(d->nodes, cap * sizeof(*d->nodes));
        d->cap = cap;
    }
    size_t at = d->nnodes;
    memset(&d->nodes[at], 0, n * sizeof(*d->nodes));
    d->nnodes += n;
    return at;
}

const jd_node_t *jdoc_get(const jdoc_t *d, const jd_node_t *obj, const char *key)
{
    if (obj->type != JD_OBJECT)
        return NULL;
    size_t kl = strlen(key);
    for (size_t i = 0; i < obj->n; i++) {
        const jd_node_t *k = jdoc_member(d, obj, i);
        if (k->n == kl && memcmp(k->u.s, key, kl) == 0)
            return k + 1;
    }
    return NULL;
}

/* Offset of the first NUL or ill-formed UTF-8 sequence, or n. */
static size_t jdoc_bad_text(const unsigned char *s, size_t n)
{
    const uint64_t lo = 0x0101010101010101ull, hi = 0x8080808080808080ull;
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            /* no octet >= 0x80 and none zero */
            if (((w | ((w - lo) & ~w)) & hi) == 0) {
                i += 8;
                continue;
            }
        }
        if (s[i] == 0)
            return i;
        size_t k = s[i] < 0x80 ? 1 : util_utf8_len(s + i, n - i);
        if (k == 0)
            return i;
        i += k;
    }
    return n;
}

static int jdoc_key_cmp(const void *a, const void *b)
{
    const jd_node_t *x = *(const jd_node_t *const *)a, *y = *(const jd_node_t *const *)b;
    if (x->n != y->n)
        return x->n < y->n ? -1 : 1;
    return memcmp(x->u.s, y->u.s, x->n);
}

static const jd_node_t *jdoc_duplicate(const jdoc_t *d, const jd_node_t *obj)
{
    size_t n = obj->n;
    if (n <= 16) {
        for (size_t i = 1; i < n; i++) {
            const jd_node_t *a = jdoc_member(d, obj, i);
            for (size_t j = 0; j < i; j++) {
                const jd_node_t *b = jdoc_member(d, obj, j);
                if (a->n == b->n && memcmp(a->u.s, b->u.s, a->n) == 0)
                    return a;
            }
        }
        return NULL;
    }
    const jd_node_t **keys = xmalloc(n * sizeof(*keys));
    for (size_t i = 0; i < n; i++)
        keys[i] = jdoc_member(d, obj, i);
    qsort(keys, n, sizeof(*keys), jdoc_key_cmp);
    const jd_node_t *dup = NULL;
    for (size_t i = 1; i < n && dup == NULL; i++)
        if (jdoc_key_cmp(&keys[i - 1], &keys[i]) == 0)
            dup = keys[i];
    free(keys);
    return dup;
}

int jdoc_check(const jdoc_t *d, char *err, size_t errlen)
{
    char tmp[96];
    for (size_t i = 0; i < d->nnodes; i++) {
        const jd_node_t *v = &d->nodes[i];
        if (v->type == JD_STRING) {
            size_t bad = jdoc_bad_text((const unsigned char *)v->u.s, v->n);
            if (bad < v->n) {
                util_seterr(err, errlen, "%s at octet %zu of a string",
                            v->u.s[bad] == 0 ? "\\u0000 is not allowed"
                                             : "invalid UTF-8",
                            bad);
                return -1;
            }
        } else if (v->type == JD_OBJECT && v->n > 1) {
            const jd_node_t *dup = jdoc_duplicate(d, v);
            if (dup != NULL) {
                util_seterr(err, errlen, "duplicate object key \"%s\"",
                            util_quote_text(dup->u.s, tmp, sizeof(tmp)));
                return -1;
            }
        }
    }
    return 0;
}

void jdoc_free(jdoc_t *d)
{
    if (d->release != NULL && d->owner != NULL)
        d->release(d->owner);
    free(d->nodes);
    free(d->strs);
    memset(d, 0, sizeof(*d));
}

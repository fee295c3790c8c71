/*
 * SUMMARY
 *  tests/bench/bench_json.c - JSON parsers compared on message bodies.
 * DESCRIPTION
 *  bench_json prints, as "BENCH json <parser>_<size>_<metric> <value> <unit>",
 *  for bodies of about 2 KB, 10 KB and 100 KB in the message format
 *  (docs/message-format.md: several recipients in every form, headers,
 *  text and html with escapes and non-ASCII text, base64 attachments
 *  wrapped at 76 columns) and each parser:
 *    jansson    json_loadb(JSON_REJECT_DUPLICATES), the tree copied into a
 *               jdoc_t (queue/jdoc.h)
 *    yajl       yajl's callbacks building the jdoc_t
 *    jsmn       jsmn's tokens (JSMN_STRICT), strings, escapes and numbers
 *               decoded and checked here
 *    simdjson   jdoc_parse_simd(), what msgjson_parse() uses
 *  each then jdoc_check() (duplicate keys, NUL, UTF-8) and
 *  msgjson_from_doc() to the message model, freed each round:
 *    _ns_per_byte, _mb_per_s   the whole path msgjson -> message_t
 *    _parse_ns_per_byte        the parser alone (its own tree or tokens,
 *                              freed), for reference
 *  and msgjson_<size>_ns_per_byte: msgjson_parse() itself. A table of the
 *  same figures follows on lines starting with "#".
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <yajl/yajl_parse.h>

#define JSMN_STATIC
#define JSMN_STRICT
#include <jsmn.h>

#include "core/buf.h"
#include "core/message.h"
#include "core/util.h"
#include "queue/jdoc.h"
#include "queue/msgjson.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- bodies ------------------------------------------------------------------- */

static void put_b64(buf_t *b, size_t n, unsigned seed)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint64_t x = 0x9e3779b97f4a7c15ULL ^ seed;
    size_t col = 0;
    for (size_t i = 0; i < n; i += 3) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf_putc(b, tab[x & 63]);
        buf_putc(b, tab[(x >> 6) & 63]);
        buf_putc(b, tab[(x >> 12) & 63]);
        buf_putc(b, tab[(x >> 18) & 63]);
        if ((col += 4) == 76) {
            buf_puts(b, "\\r\\n");
            col = 0;
        }
    }
}

static void put_text(buf_t *b, size_t n, int html)
{
    static const char *const lines[] = {
        "Guten Tag Herr M\xc3\xbcller, Ihre Bestellung \\\"Fr\xc3\xbchling\\\" ist unterwegs.",
        "Le caf\xc3\xa9 cr\xc3\xa8me co\xc3\xbbte 3,50 \xe2\x82\xac \xe2\x80\x94 merci\\u00a0!",
        "Order #42 shipped: tracking https://track.test.example/x?id=7&ref=mail\\ttab",
        "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86\xe3\x82\xad\xe3\x82\xb9\xe3\x83\x88 and plain ASCII text to fill the line up.",
    };
    size_t start = buf_size(b), i = 0;
    while (buf_size(b) - start < n) {
        if (html)
            buf_puts(b, "<p style=\\\"margin:0\\\">");
        buf_puts(b, lines[i++ % 4]);
        buf_puts(b, html ? "</p>\\n" : "\\r\\n");
    }
}

/* about size octets of JSON body */
static char *make_body(size_t size, size_t *len)
{
    buf_t b = BUF_INIT;
    size_t text = size / 4, att = size / 3;
    buf_puts(&b, "{\"id\":\"bench-order-42.confirm\",\"trace_id\":\"4bf92f3577b34da6\","
                 "\"from\":{\"address\":\"shop@test.example\",\"name\":\"Caf\xc3\xa9 Shop\"},"
                 "\"to\":[\"Bob Example <bob@test.example>\",\"carol@test.example\","
                 "{\"address\":\"d\xc3\xa9sir\xc3\xa9" "e@test.example\",\"name\":\"D\xc3\xa9sir\xc3\xa9" "e\"}],"
                 "\"cc\":[\"\\\"Ops, Team\\\" <ops@test.example>\",\"audit@test.example\"],"
                 "\"bcc\":\"archive@test.example\","
                 "\"subject\":\"Ihre Bestellung \xe2\x80\x94 Gr\xc3\xbc\xc3\x9f" "e \xe2\x9c\x93\","
                 "\"headers\":{\"X-Campaign\":\"spring-2026\",\"Reply-To\":\"help@test.example\","
                 "\"List-Unsubscribe\":\"<https://test.example/u?x=1>\"},\"text\":\"");
    put_text(&b, text, 0);
    buf_puts(&b, "\",\"html\":\"<html><body>");
    put_text(&b, text, 1);
    buf_puts(&b, "</body></html>\",\"attachments\":[{\"filename\":\"Rechnung-M\xc3\xbcller.pdf\","
                 "\"content_type\":\"application/pdf\",\"content_base64\":\"");
    put_b64(&b, att * 3 / 4 * 2 / 3, 1);
    buf_puts(&b, "\"},{\"filename\":\"logo.png\",\"content_type\":\"image/png\",\"inline\":true,"
                 "\"content_id\":\"logo@test.example\",\"content_base64\":\"");
    put_b64(&b, att * 3 / 4 / 3, 2);
    buf_puts(&b, "\"}]}");
    return buf_steal(&b, len);
}

/* ---- jansson ------------------------------------------------------------------ */

static void from_jansson(jdoc_t *d, size_t at, json_t *v)
{
    jd_node_t *n = &d->nodes[at];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t k = json_object_size(v), first = jdoc_add(d, 2 * k), i = 0;
        n = &d->nodes[at];
        n->type = JD_OBJECT, n->n = (uint32_t)k, n->u.first = first;
        const char *key;
        size_t kl;
        json_t *val;
        json_object_keylen_foreach(v, key, kl, val) {
            jd_node_t *kn = &d->nodes[first + 2 * i];
            kn->type = JD_STRING, kn->n = (uint32_t)kl, kn->u.s = key;
            from_jansson(d, first + 2 * i + 1, val);
            i++;
        }
        break;
    }
    case JSON_ARRAY: {
        size_t k = json_array_size(v), first = jdoc_add(d, k);
        n = &d->nodes[at];
        n->type = JD_ARRAY, n->n = (uint32_t)k, n->u.first = first;
        for (size_t i = 0; i < k; i++)
            from_jansson(d, first + i, json_array_get(v, i));
        break;
    }
    case JSON_STRING:
        n->type = JD_STRING, n->n = (uint32_t)json_string_length(v), n->u.s = json_string_value(v);
        break;
    case JSON_TRUE:
        n->type = JD_TRUE;
        break;
    case JSON_FALSE:
        n->type = JD_FALSE;
        break;
    case JSON_NULL:
        n->type = JD_NULL;
        break;
    default:
        n->type = JD_NUMBER;
    }
}

static void release_jansson(void *p)
{
    json_decref(p);
}

static int parse_jansson(jdoc_t *d, const char *s, size_t len)
{
    memset(d, 0, sizeof(*d));
    json_error_t e;
    json_t *root = json_loadb(s, len, JSON_REJECT_DUPLICATES, &e);
    if (root == NULL)
        return -1;
    d->owner = root, d->release = release_jansson;
    jdoc_add(d, 1);
    from_jansson(d, 0, root);
    return 0;
}

static int parse_only_jansson(const char *s, size_t len)
{
    json_error_t e;
    json_t *root = json_loadb(s, len, JSON_REJECT_DUPLICATES, &e);
    json_decref(root);
    return root ? 0 : -1;
}

/* ---- yajl: callbacks collect children on a stack, each container's moved
 * into the document (contiguous) when it closes --------------------------- */

typedef struct yb {
    jdoc_t    *d;
    jd_node_t *stk;
    size_t     nstk, capstk;
    size_t     open[JDOC_MAX_DEPTH + 1];
    size_t     depth;
    size_t     so; /* used octets of d->strs */
} yb_t;

static void yb_push(yb_t *y, jd_node_t n)
{
    if (y->nstk == y->capstk) {
        y->capstk = y->capstk ? 2 * y->capstk : 256;
        y->stk = xrealloc(y->stk, y->capstk * sizeof(*y->stk));
    }
    y->stk[y->nstk++] = n;
}

static int yb_scalar(void *ctx, uint32_t type)
{
    jd_node_t n = { .type = type };
    yb_push(ctx, n);
    return 1;
}
static int yb_null(void *ctx) { return yb_scalar(ctx, JD_NULL); }
static int yb_bool(void *ctx, int b) { return yb_scalar(ctx, b ? JD_TRUE : JD_FALSE); }
static int yb_number(void *ctx, const char *s, size_t l) { return yb_scalar(ctx, JD_NUMBER); }
static int yb_string(void *ctx, const unsigned char *s, size_t l)
{
    yb_t *y = ctx;
    char *o = y->d->strs + y->so;
    memcpy(o, s, l);
    o[l] = '\0';
    y->so += l + 1;
    jd_node_t n = { .type = JD_STRING, .n = (uint32_t)l, .u.s = o };
    yb_push(y, n);
    return 1;
}
static int yb_open(yb_t *y)
{
    if (y->depth == JDOC_MAX_DEPTH)
        return 0;
    y->open[y->depth++] = y->nstk;
    return 1;
}
static int yb_close(yb_t *y, uint32_t type)
{
    size_t start = y->open[--y->depth], k = y->nstk - start;
    size_t first = jdoc_add(y->d, k);
    memcpy(&y->d->nodes[first], &y->stk[start], k * sizeof(jd_node_t));
    y->nstk = start;
    jd_node_t n = { .type = type, .n = (uint32_t)(type == JD_OBJECT ? k / 2 : k),
                    .u.first = first };
    yb_push(y, n);
    return 1;
}
static int yb_start_map(void *ctx) { return yb_open(ctx); }
static int yb_end_map(void *ctx) { return yb_close(ctx, JD_OBJECT); }
static int yb_start_array(void *ctx) { return yb_open(ctx); }
static int yb_end_array(void *ctx) { return yb_close(ctx, JD_ARRAY); }

static const yajl_callbacks yb_callbacks = {
    yb_null, yb_bool, NULL, NULL, yb_number, yb_string, yb_start_map, yb_string,
    yb_end_map, yb_start_array, yb_end_array,
};

static int parse_yajl(jdoc_t *d, const char *s, size_t len)
{
    memset(d, 0, sizeof(*d));
    d->strs = xmalloc(len + 1);
    yb_t *y = xcalloc(1, sizeof(*y));
    y->d = d;
    jdoc_add(d, 1); /* the root, placed at the end */
    yajl_handle h = yajl_alloc(&yb_callbacks, NULL, y);
    int rc = yajl_parse(h, (const unsigned char *)s, len) == yajl_status_ok &&
                     yajl_complete_parse(h) == yajl_status_ok && y->nstk == 1 &&
                     (y->stk[0].type == JD_OBJECT || y->stk[0].type == JD_ARRAY)
                 ? 0
                 : -1;
    if (rc == 0)
        d->nodes[0] = y->stk[0];
    yajl_free(h);
    free(y->stk);
    free(y);
    return rc;
}

static int parse_only_yajl(const char *s, size_t len)
{
    yajl_handle h = yajl_alloc(NULL, NULL, NULL);
    int rc = yajl_parse(h, (const unsigned char *)s, len) == yajl_status_ok &&
                     yajl_complete_parse(h) == yajl_status_ok
                 ? 0
                 : -1;
    yajl_free(h);
    return rc;
}

/* ---- jsmn: tokens only; strings decoded, numbers and literals checked here -- */

static int hex4(const char *s, unsigned *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        *v <<= 4;
        if (c >= '0' && c <= '9')
            *v |= (unsigned)(c - '0');
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
            *v |= (unsigned)((c | 0x20) - 'a' + 10);
        else
            return -1;
    }
    return 0;
}

static char *put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        *o++ = (char)cp;
    } else if (cp < 0x800) {
        *o++ = (char)(0xc0 | cp >> 6);
        *o++ = (char)(0x80 | (cp & 63));
    } else if (cp < 0x10000) {
        *o++ = (char)(0xe0 | cp >> 12);
        *o++ = (char)(0x80 | ((cp >> 6) & 63));
        *o++ = (char)(0x80 | (cp & 63));
    } else {
        *o++ = (char)(0xf0 | cp >> 18);
        *o++ = (char)(0x80 | ((cp >> 12) & 63));
        *o++ = (char)(0x80 | ((cp >> 6) & 63));
        *o++ = (char)(0x80 | (cp & 63));
    }
    return o;
}

/* s[0..n) between the quotes into o (NUL-terminated); length or -1 */
static long jsmn_unescape(const char *s, size_t n, char *o)
{
    char *o0 = o;
    size_t i = 0;
    while (i < n) {
        const char *bs = memchr(s + i, '\\', n - i);
        size_t run = bs ? (size_t)(bs - (s + i)) : n - i;
        for (size_t k = 0; k < run; k++)
            if ((unsigned char)s[i + k] < 0x20)
                return -1;
        memcpy(o, s + i, run);
        o += run, i += run;
        if (i == n)
            break;
        if (++i == n)
            return -1;
        char c = s[i++];
        switch (c) {
        case '"': case '\\': case '/': *o++ = c; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (i + 4 > n || hex4(s + i, &cp) != 0)
                return -1;
            i += 4;
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (i + 6 > n || s[i] != '\\' || s[i + 1] != 'u' || hex4(s + i + 2, &lo) != 0 ||
                    lo < 0xdc00 || lo > 0xdfff)
                    return -1;
                i += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                return -1;
            }
            o = put_utf8(o, cp);
            break;
        }
        default:
            return -1;
        }
    }
    *o = '\0';
    return o - o0;
}

static int jsmn_number_ok(const char *s, size_t n)
{
    size_t i = 0;
    if (i < n && s[i] == '-')
        i++;
    if (i < n && s[i] == '0')
        i++;
    else if (i < n && s[i] >= '1' && s[i] <= '9')
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    else
        return 0;
    if (i < n && s[i] == '.') {
        size_t j = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == j)
            return 0;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        size_t j = i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == j)
            return 0;
    }
    return i == n;
}

typedef struct jb {
    jdoc_t          *d;
    const char      *js;
    const jsmntok_t *t;
    int              nt, next;
    size_t           so;
} jb_t;

static int jb_value(jb_t *b, size_t at, int depth)
{
    if (b->next >= b->nt || depth > JDOC_MAX_DEPTH)
        return -1;
    const jsmntok_t *t = &b->t[b->next++];
    const char *s = b->js + t->start;
    size_t n = (size_t)(t->end - t->start);
    switch (t->type) {
    case JSMN_OBJECT:
    case JSMN_ARRAY: {
        int obj = t->type == JSMN_OBJECT;
        size_t k = (size_t)t->size, first = jdoc_add(b->d, obj ? 2 * k : k);
        jd_node_t *v = &b->d->nodes[at];
        v->type = obj ? JD_OBJECT : JD_ARRAY, v->n = (uint32_t)k, v->u.first = first;
        for (size_t i = 0; i < k; i++) {
            if (obj) {
                if (b->next >= b->nt || b->t[b->next].type != JSMN_STRING ||
                    b->t[b->next].size != 1)
                    return -1;
                if (jb_value(b, first + 2 * i, depth + 1) != 0 ||
                    jb_value(b, first + 2 * i + 1, depth + 1) != 0)
                    return -1;
            } else if (jb_value(b, first + i, depth + 1) != 0) {
                return -1;
            }
        }
        return 0;
    }
    case JSMN_STRING: {
        char *o = b->d->strs + b->so;
        long l = jsmn_unescape(s, n, o);
        if (l < 0)
            return -1;
        b->so += (size_t)l + 1;
        jd_node_t *v = &b->d->nodes[at];
        v->type = JD_STRING, v->n = (uint32_t)l, v->u.s = o;
        return 0;
    }
    default: {
        jd_node_t *v = &b->d->nodes[at];
        if (n == 4 && memcmp(s, "true", 4) == 0)
            v->type = JD_TRUE;
        else if (n == 5 && memcmp(s, "false", 5) == 0)
            v->type = JD_FALSE;
        else if (n == 4 && memcmp(s, "null", 4) == 0)
            v->type = JD_NULL;
        else if (jsmn_number_ok(s, n))
            v->type = JD_NUMBER;
        else
            return -1;
        return 0;
    }
    }
}

static jsmntok_t *jsmn_tokens(const char *s, size_t len, int *nt)
{
    jsmn_parser p;
    jsmn_init(&p);
    int n = jsmn_parse(&p, s, len, NULL, 0);
    if (n <= 0)
        return NULL;
    jsmntok_t *t = xmalloc((size_t)n * sizeof(*t));
    jsmn_init(&p);
    if (jsmn_parse(&p, s, len, t, (unsigned)n) != n) {
        free(t);
        return NULL;
    }
    *nt = n;
    return t;
}

static int parse_jsmn(jdoc_t *d, const char *s, size_t len)
{
    memset(d, 0, sizeof(*d));
    int nt = 0;
    jsmntok_t *t = jsmn_tokens(s, len, &nt);
    if (t == NULL || (t[0].type != JSMN_OBJECT && t[0].type != JSMN_ARRAY)) {
        free(t);
        return -1;
    }
    d->strs = xmalloc(len + 1);
    jb_t b = { d, s, t, nt, 0, 0 };
    jdoc_add(d, 1);
    int rc = jb_value(&b, 0, 1) == 0 && b.next == nt ? 0 : -1;
    free(t);
    return rc;
}

static int parse_only_jsmn(const char *s, size_t len)
{
    int nt = 0;
    jsmntok_t *t = jsmn_tokens(s, len, &nt);
    free(t);
    return t ? 0 : -1;
}

/* ---- simdjson ----------------------------------------------------------------- */

static int parse_only_simd(const char *s, size_t len)
{
    jdoc_t d;
    int rc = jdoc_parse_simd(&d, s, len);
    jdoc_free(&d);
    return rc;
}

/* ---- the runs ------------------------------------------------------------------- */

typedef struct parser {
    const char *name;
    int (*parse)(jdoc_t *d, const char *s, size_t len);
    int (*parse_only)(const char *s, size_t len);
} parser_t;

static const parser_t parsers[] = {
    { "jansson", parse_jansson, parse_only_jansson },
    { "yajl", parse_yajl, parse_only_yajl },
    { "jsmn", parse_jsmn, parse_only_jsmn },
    { "simdjson", jdoc_parse_simd, parse_only_simd },
};
#define NPARSERS (sizeof(parsers) / sizeof(parsers[0]))

static int full_path(const parser_t *p, const char *s, size_t len)
{
    jdoc_t d;
    message_t *m = NULL;
    char err[256];
    int rc = p->parse(&d, s, len);
    if (rc == 0 && (rc = jdoc_check(&d, err, sizeof(err))) == 0 &&
        (rc = msgjson_from_doc(&d, &m, err, sizeof(err))) != MSGJSON_OK)
        fprintf(stderr, "bench_json: %s: %s\n", p->name, err);
    jdoc_free(&d);
    message_free(m);
    return rc;
}

/* ns per octet of run(i) over about secs seconds */
#define TIMED(secs, len, expr)                                                      \
    ({                                                                              \
        size_t it_ = 0;                                                             \
        double t0_ = now_s(), t_;                                                   \
        do {                                                                        \
            for (int k_ = 0; k_ < 16; k_++, it_++)                                  \
                if ((expr) != 0) {                                                  \
                    fprintf(stderr, "bench_json: refused a valid body\n");          \
                    exit(1);                                                        \
                }                                                                   \
        } while ((t_ = now_s() - t0_) < (secs));                                    \
        t_ * 1e9 / ((double)it_ * (double)(len));                                   \
    })

int main(int argc, char **argv)
{
    static const struct { const char *name; size_t size; } sizes[] = {
        { "2k", 2048 }, { "10k", 10240 }, { "100k", 102400 },
    };
    double secs = argc > 1 ? atof(argv[1]) : 0.4;
    double full[3][NPARSERS], only[3][NPARSERS], api[3];
    for (size_t si = 0; si < 3; si++) {
        size_t len;
        char *body = make_body(sizes[si].size, &len);
        for (size_t pi = 0; pi < NPARSERS; pi++) {
            const parser_t *p = &parsers[pi];
            full[si][pi] = TIMED(secs, len, full_path(p, body, len));
            only[si][pi] = TIMED(secs, len, p->parse_only(body, len));
            printf("BENCH json %s_%s_ns_per_byte %.2f ns\n", p->name, sizes[si].name,
                   full[si][pi]);
            printf("BENCH json %s_%s_mb_per_s %.0f MB/s\n", p->name, sizes[si].name,
                   1e3 / full[si][pi] * 1e6 / (1024.0 * 1024.0));
            printf("BENCH json %s_%s_parse_ns_per_byte %.2f ns\n", p->name, sizes[si].name,
                   only[si][pi]);
        }
        api[si] = TIMED(secs, len, ({
                            message_t *m = NULL;
                            char err[256];
                            int r_ = msgjson_parse(body, len, &m, err, sizeof(err));
                            message_free(m);
                            r_;
                        }));
        printf("BENCH json msgjson_%s_ns_per_byte %.2f ns\n", sizes[si].name, api[si]);
        printf("# body %s: %zu octets\n", sizes[si].name, len);
        free(body);
    }
    printf("# %-9s %-5s %12s %9s %18s\n", "parser", "body", "ns/byte", "MB/s", "parse-only ns/B");
    for (size_t pi = 0; pi < NPARSERS; pi++)
        for (size_t si = 0; si < 3; si++)
            printf("# %-9s %-5s %12.2f %9.0f %18.2f\n", parsers[pi].name, sizes[si].name,
                   full[si][pi], 1e3 / full[si][pi] * 1e6 / (1024.0 * 1024.0), only[si][pi]);
    printf("# msgjson_parse(): %.2f / %.2f / %.2f ns/byte (2k / 10k / 100k)\n", api[0], api[1],
           api[2]);
    return 0;
}

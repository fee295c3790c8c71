/*
 * queue/jdoc.h - a parsed JSON document as msgjson reads it (internal).
 *
 * A JSON parser (a "backend") fills a jdoc_t: one array of nodes, each
 * container's children contiguous (an object's as key, value pairs), every
 * string NUL-terminated with its length. msgjson reads the message model
 * from it, so the same field rules apply whichever parser ran.
 *
 * jdoc_check() applies what JSON itself leaves open and the message
 * format refuses, identically for every backend: a duplicate key in any
 * object, a NUL (\u0000) in any string or key, and strings that are not
 * well-formed UTF-8 (what an escape could produce: lone surrogates).
 *
 * The backend msgjson_parse() uses is jdoc_parse_simd() (simdjson,
 * queue/jdoc_simd.cc); it runs jansson only on a refused body, for the
 * position and text of the error. tests/bench/bench_json.c fills jdoc_t
 * from jansson, yajl and jsmn too, to compare them on the same path.
 */
#ifndef MP_QUEUE_JDOC_H
#define MP_QUEUE_JDOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { JD_NULL, JD_FALSE, JD_TRUE, JD_NUMBER, JD_STRING, JD_ARRAY, JD_OBJECT } jd_type_t;

/* Deepest nesting accepted: jansson's own bound. */
#define JDOC_MAX_DEPTH 2048

typedef struct jd_node {
    uint32_t type; /* jd_type_t */
    uint32_t n;    /* string: octets; array: elements; object: members */
    union {
        const char *s;     /* string: NUL-terminated, n octets before the NUL */
        size_t      first; /* container: index of its first child in nodes */
    } u;
} jd_node_t;

typedef struct jdoc {
    jd_node_t *nodes; /* nodes[0] is the root */
    size_t     nnodes, cap;
    char      *strs;  /* backends that decode strings keep them here */
    void      *owner; /* what the strings point into, or NULL */
    void     (*release)(void *owner); /* jdoc_free() calls it on owner */
} jdoc_t;

/* Append n zeroed nodes; returns the index of the first (aborts on OOM). */
size_t jdoc_add(jdoc_t *d, size_t n);
void   jdoc_free(jdoc_t *d);

/* 0, or -1 with a reason in err ("duplicate object key \"to\"", ...). */
int jdoc_check(const jdoc_t *d, char *err, size_t errlen);

static inline const jd_node_t *jdoc_root(const jdoc_t *d) { return &d->nodes[0]; }
static inline const jd_node_t *jdoc_at(const jdoc_t *d, const jd_node_t *v, size_t i)
{
    return &d->nodes[v->u.first + i];
}
/* i-th member of an object: its key node, then the value (jdoc_member + 1) */
static inline const jd_node_t *jdoc_member(const jdoc_t *d, const jd_node_t *v, size_t i)
{
    return &d->nodes[v->u.first + 2 * i];
}
/* Member named key (NUL-terminated) of an object, or NULL. */
const jd_node_t *jdoc_get(const jdoc_t *d, const jd_node_t *obj, const char *key);

/*
 * simdjson: 0 on success; -1 when the body is refused (not JSON, or a
 * case above), -2 on out of memory. The document points into a parser
 * kept per thread: valid until the next jdoc_parse_simd() on this thread
 * or jdoc_free(). No reason text: the caller asks jansson for it.
 */
int jdoc_parse_simd(jdoc_t *d, const char *body, size_t len);

/*
 * The message model from a checked document (jdoc_check() passed): what
 * msgjson_parse() does after parsing, with its results and reasons
 * (queue/msgjson.h). For tests/bench/bench_json.c's other backends.
 */
struct message;
int msgjson_from_doc(const jdoc_t *d, struct message **out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif

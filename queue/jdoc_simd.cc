/*
 * SUMMARY
 *  queue/jdoc_simd.cc - simdjson backend of queue/jdoc.h (C ABI).
 * DESCRIPTION
 *  simdjson's DOM parser validates the whole body (grammar and UTF-8) with
 *  SIMD instructions, then this file copies its tape into a jdoc_t whose
 *  strings point into the parser's string buffer. Each thread keeps one
 *  parser and one padded input buffer (simdjson reads up to
 *  SIMDJSON_PADDING octets past the end) for bodies up to
 *  JDOC_SIMD_KEEP; a larger body gets a parser of its own, released by
 *  jdoc_free(), so a thread does not keep a large one's memory.
 *
 *  Refused as jansson refuses them: a root that is not an object or array,
 *  integers past the int64 range, nesting past JDOC_MAX_DEPTH, and what
 *  jdoc_check() refuses.
 * DIAGNOSTICS
 *  None of its own: -1 tells msgjson_parse to ask jansson for the reason.
 */
#include "queue/jdoc.h"

#include <simdjson.h>

#include <cstdlib>
#include <cstring>
#include <memory>

using namespace simdjson;

/* The parser's buffers grow with the structure of the largest body it
 * parsed (index and tape: up to about 12 octets per input octet, touched
 * only as far as used), and a thread keeps them: bounded here. */
static constexpr size_t JDOC_SIMD_KEEP = 256 * 1024;

namespace {

struct thread_parser {
    dom::parser parser;
    char       *buf = nullptr;
    size_t      cap = 0;
    bool        ready = false;
    ~thread_parser() { std::free(buf); }
};

thread_local thread_parser tp;

int build(jdoc_t *d, size_t at, dom::element e)
{
    jd_node_t *v = &d->nodes[at];
    switch (e.type()) {
    case dom::element_type::ARRAY: {
        dom::array a;
        if (e.get_array().get(a))
            return -1;
        size_t n = a.size();
        if (n >= 0xFFFFFF) { /* size() saturates: count them */
            n = 0;
            for (dom::element c : a) {
                (void)c;
                n++;
            }
        }
        size_t first = jdoc_add(d, n);
        v = &d->nodes[at];
        v->type = JD_ARRAY;
        v->n = (uint32_t)n;
        v->u.first = first;
        size_t i = 0;
        for (dom::element c : a)
            if (build(d, first + i++, c) != 0)
                return -1;
        return 0;
    }
    case dom::element_type::OBJECT: {
        dom::object o;
        if (e.get_object().get(o))
            return -1;
        size_t n = o.size();
        if (n >= 0xFFFFFF) {
            n = 0;
            for (dom::key_value_pair kv : o) {
                (void)kv;
                n++;
            }
        }
        size_t first = jdoc_add(d, 2 * n);
        v = &d->nodes[at];
        v->type = JD_OBJECT;
        v->n = (uint32_t)n;
        v->u.first = first;
        size_t i = 0;
        for (dom::key_value_pair kv : o) {
            jd_node_t *k = &d->nodes[first + 2 * i];
            k->type = JD_STRING;
            k->n = (uint32_t)kv.key.size();
            k->u.s = kv.key.data(); /* the DOM's strings end in a NUL */
            if (build(d, first + 2 * i + 1, kv.value) != 0)
                return -1;
            i++;
        }
        return 0;
    }
    case dom::element_type::STRING: {
        std::string_view s;
        if (e.get_string().get(s) || s.size() > UINT32_MAX)
            return -1;
        v->type = JD_STRING;
        v->n = (uint32_t)s.size();
        v->u.s = s.data();
        return 0;
    }
    case dom::element_type::INT64:
    case dom::element_type::DOUBLE:
        v->type = JD_NUMBER;
        return 0;
    case dom::element_type::UINT64: /* jansson: "too big integer" */
        return -1;
    case dom::element_type::BOOL: {
        bool b = false;
        if (e.get_bool().get(b))
            return -1;
        v->type = b ? JD_TRUE : JD_FALSE;
        return 0;
    }
    case dom::element_type::NULL_VALUE:
        v->type = JD_NULL;
        return 0;
    }
    return -1;
}

void release_parser(void *p)
{
    delete static_cast<dom::parser *>(p);
}

} // namespace

extern "C" int jdoc_parse_simd(jdoc_t *d, const char *body, size_t len)
{
    std::memset(d, 0, sizeof(*d));
    dom::parser *p = &tp.parser;
    if (len > JDOC_SIMD_KEEP) {
        p = new (std::nothrow) dom::parser();
        if (p == nullptr)
            return -2;
        d->owner = p;
        d->release = release_parser;
        if (p->allocate(len, JDOC_MAX_DEPTH))
            return -2;
    } else if (!tp.ready) {
        if (tp.parser.allocate(64 * 1024, JDOC_MAX_DEPTH))
            return -2;
        tp.ready = true;
    }
    /* a padded copy: simdjson may read past len (never uses those bytes) */
    if (tp.cap < len + SIMDJSON_PADDING) {
        size_t cap = len + SIMDJSON_PADDING;
        if (cap < 64 * 1024 && len <= JDOC_SIMD_KEEP)
            cap = 64 * 1024;
        char *nb = static_cast<char *>(std::realloc(len > JDOC_SIMD_KEEP ? nullptr : tp.buf, cap));
        if (nb == nullptr)
            return -2;
        if (len > JDOC_SIMD_KEEP) {
            std::memcpy(nb, body, len);
            std::memset(nb + len, 0, SIMDJSON_PADDING);
            dom::element root;
            error_code ec = p->parse(nb, len, false).get(root);
            int rc = ec == MEMALLOC ? -2 : ec ? -1 : 0;
            if (rc == 0 && !root.is_object() && !root.is_array())
                rc = -1;
            if (rc == 0) {
                jdoc_add(d, 1);
                rc = build(d, 0, root);
            }
            std::free(nb); /* the DOM keeps its own copy of the strings */
            return rc;
        }
        tp.buf = nb;
        tp.cap = cap;
    }
    std::memcpy(tp.buf, body, len);
    std::memset(tp.buf + len, 0, SIMDJSON_PADDING);
    dom::element root;
    error_code ec = p->parse(tp.buf, len, false).get(root);
    if (ec == MEMALLOC)
        return -2;
    if (ec || (!root.is_object() && !root.is_array()))
        return -1;
    jdoc_add(d, 1);
    return build(d, 0, root);
}

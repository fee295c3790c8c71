/*
 * SUMMARY
 *  deliverer/accounts.c - the sender -> IMAP account map.
 * DESCRIPTION
 *  The file (accounts.h has its format) is read with getline, so a line
 *  may be of any length. A '#' is a comment only at the start of a line
 *  or as the start of a fourth field, never inside a field: a password
 *  may contain it. A field in double quotes may hold blanks, '"' (as \")
 *  and '\' (as \\); outside quotes every byte is literal, so the files
 *  written before quoting existed read the same.
 *
 *  A handful to a few thousand senders: a linear scan costs less than the
 *  TLS handshake of the append it precedes.
 */
#include "deliverer/accounts.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/util.h"

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* The next field at *p, unquoted in place (the field ends up
 * NUL-terminated inside the line), *p moved past it: 1 with *field set,
 * 0 at the end of the line, -1 with why set. */
static int next_field(char **p, char **field, const char **why)
{
    char *s = *p;
    while (is_blank(*s))
        s++;
    if (*s == '\0')
        return 0;
    if (*s != '"') {
        *field = s;
        while (*s && !is_blank(*s))
            s++;
        if (*s)
            *s++ = '\0';
        *p = s;
        return 1;
    }
    char *out = ++s;
    *field = out;
    for (;;) {
        if (*s == '\0' || *s == '\n' || *s == '\r') {
            *why = "unterminated quoted field (a closing \" is missing)";
            return -1;
        }
        if (*s == '"')
            break;
        if (*s == '\\') {
            if (s[1] != '"' && s[1] != '\\') {
                *why = "unknown escape in a quoted field (only \\\" and \\\\)";
                return -1;
            }
            s++;
        }
        *out++ = *s++;
    }
    s++; /* the closing quote */
    if (*s && !is_blank(*s)) {
        *why = "text after a closing quote (a blank must separate the fields)";
        return -1;
    }
    *out = '\0';
    *p = *s ? s + 1 : s;
    return 1;
}

/* Parse one line into f[0..2]: 1, 0 for a comment or blank line, -1 with why. */
static int parse_line(char *line, char *f[3], const char **why)
{
    char *p = line;
    while (is_blank(*p))
        p++;
    if (*p == '\0' || *p == '#')
        return 0;
    int n = 0, r;
    char *extra;
    while (n < 3 && (r = next_field(&p, &f[n], why)) == 1)
        n++;
    if (n == 3 && (r = next_field(&p, &extra, why)) == 1 && extra[0] == '#')
        r = 0; /* a comment after the fields */
    else if (n == 3 && r == 1)
        r = 2; /* a fourth field */
    if (r < 0)
        return -1;
    if (n < 3 || r == 2) {
        *why = "expected \"address login password\"";
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        if (f[i][0] == '\0') {
            *why = "empty field";
            return -1;
        }
    }
    return 1;
}

int accounts_load(accounts_t *a, const char *path, char *err, size_t errlen)
{
    memset(a, 0, sizeof(*a));
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    int lineno = 0, rc = 0, *lines = NULL;
    ssize_t len;
    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        char *field[3];
        const char *why = NULL;
        int r = -1;
        if (strlen(line) != (size_t)len)
            why = "NUL byte in the line";
        else
            r = parse_line(line, field, &why);
        if (r < 0) {
            snprintf(err, errlen, "%s:%d: %s", path, lineno, why);
            rc = -1;
            break;
        }
        if (r == 0)
            continue;
        for (size_t i = 0; i < a->n; i++) {
            if (strcasecmp(a->list[i].address, field[0]) == 0) {
                snprintf(err, errlen, "%s:%d: sender %s is given twice, on lines %d and %d", path, lineno,
                         field[0], lines[i], lineno);
                rc = -1;
                break;
            }
        }
        if (rc < 0)
            break;
        a->list = xrealloc(a->list, (a->n + 1) * sizeof(account_t));
        lines = xrealloc(lines, (a->n + 1) * sizeof(int));
        a->list[a->n].address = xstrdup(field[0]);
        a->list[a->n].login = xstrdup(field[1]);
        a->list[a->n].password = xstrdup(field[2]);
        lines[a->n] = lineno;
        a->n++;
    }
    if (rc == 0 && ferror(f)) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        rc = -1;
    }
    if (line)
        memset(line, 0, cap); /* it held passwords */
    free(line);
    free(lines);
    fclose(f);
    if (rc < 0)
        accounts_free(a);
    return rc;
}

const account_t *accounts_find(const accounts_t *a, const char *address)
{
    for (size_t i = 0; i < a->n; i++)
        if (strcasecmp(a->list[i].address, address) == 0)
            return &a->list[i];
    return NULL;
}

void accounts_free(accounts_t *a)
{
    for (size_t i = 0; i < a->n; i++) {
        free(a->list[i].address);
        free(a->list[i].login);
        free(a->list[i].password);
    }
    free(a->list);
    memset(a, 0, sizeof(*a));
}

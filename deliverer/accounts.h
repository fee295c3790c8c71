/*
 * deliverer/accounts.h - which sender addresses have an IMAP account.
 *
 * The accounts file maps a sender address to the IMAP login that owns its
 * Sent folder: one line per sender, "address login password", the three
 * fields separated by blanks (spaces or tabs). A field may be written in
 * double quotes, "like this", to hold blanks, '#' or quotes, with \"
 * for '"' and \\ for '\' inside (no other escapes); an unquoted field is
 * taken byte for byte, '#' and '\' included. Blank lines and lines whose
 * first non-blank character is '#' are comments, and so is a fourth field
 * that starts with '#' (a comment after the fields); a '#' inside a field
 * is part of it. Any line length; a sender given twice is an error.
 *
 *   # sender            login               password
 *   noreply@example.com noreply@example.com s3cret#42
 *   billing@example.com billing             "pass word with \"quotes\""
 *
 * Kubernetes mounts it from a Secret. Loaded once at start-up, read-only
 * afterwards, so worker threads share it without locks.
 */
#ifndef MP_DELIVERER_ACCOUNTS_H
#define MP_DELIVERER_ACCOUNTS_H

#include <stddef.h>

typedef struct account {
    char *address;
    char *login;
    char *password;
} account_t;

typedef struct accounts {
    account_t *list;
    size_t     n;
} accounts_t;

/* Returns 0, or -1 with "file:line: reason" in err. */
int  accounts_load(accounts_t *a, const char *path, char *err, size_t errlen);
/* Case-insensitive lookup of a sender address; NULL if unmapped. */
const account_t *accounts_find(const accounts_t *a, const char *address);
void accounts_free(accounts_t *a);

#endif

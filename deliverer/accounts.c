/*
 * SUMMARY
 *  deliverer/accounts.c - the sender -> IMAP account map.
 * DESCRIPTION
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

int accounts_load(accounts_t *a, const char *path, char *err, size_t errlen)
{
    memset(a, 0, sizeof(*a));
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char line[2048];
    int lineno = 0;
    while (fgets(line, sizeof(line), f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *save = NULL;
        char *addr = strtok_r(line, " \t\r\n", &save);
        if (addr == NULL)
            continue;
        char *login = strtok_r(NULL, " \t\r\n", &save);
        char *pass = strtok_r(NULL, " \t\r\n", &save);
        if (login == NULL || pass == NULL || strtok_r(NULL, " \t\r\n", &save) != NULL) {
            snprintf(err, errlen, "%s:%d: expected \"address login password\"", path, lineno);
            fclose(f);
            accounts_free(a);
            return -1;
        }
        a->list = xrealloc(a->list, (a->n + 1) * sizeof(account_t));
        a->list[a->n].address = xstrdup(addr);
        a->list[a->n].login = xstrdup(login);
        a->list[a->n].password = xstrdup(pass);
        a->n++;
    }
    fclose(f);
    return 0;
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

/*
 * SUMMARY
 *  tests/support/stackenv.c - read the local stack's env file.
 */
#include "tests/support/stackenv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *stackenv_path(void)
{
    static char path[512];
    const char *dir = getenv("MP_STACK_DIR");
    snprintf(path, sizeof(path), "%s/env", dir && *dir ? dir : "/tmp/mpstack");
    return path;
}

int stackenv_get(const char *key, char *out, size_t outlen)
{
    FILE *f = fopen(stackenv_path(), "r");
    if (f == NULL)
        return -1;
    char line[1024];
    size_t klen = strlen(key);
    int found = -1;
    while (found < 0 && fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, key, klen) != 0 || line[klen] != '=')
            continue;
        char *v = line + klen + 1;
        v[strcspn(v, "\r\n")] = '\0';
        size_t vlen = strlen(v);
        if (vlen >= 2 && (v[0] == '"' || v[0] == '\'') && v[vlen - 1] == v[0]) {
            v[vlen - 1] = '\0';
            v++;
            vlen -= 2;
        }
        if (vlen >= outlen)
            break;
        memcpy(out, v, vlen + 1);
        found = 0;
    }
    fclose(f);
    return found;
}

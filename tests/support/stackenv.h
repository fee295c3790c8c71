/*
 * tests/support/stackenv.h - the local stack's addresses for C tests.
 *
 * Reads ${MP_STACK_DIR:-/tmp/mpstack}/env (KEY=value lines written by
 * deploy/local/stack up). Integration tests call stackenv_get() and fail
 * loudly when the stack is not up; they never skip.
 */
#ifndef MP_TESTS_STACKENV_H
#define MP_TESTS_STACKENV_H

#include <stddef.h>

/* Path of the env file. */
const char *stackenv_path(void);
/* Copy the value of key (quotes stripped) into out. 0, or -1 when the
 * file or the key is missing or the value does not fit. */
int stackenv_get(const char *key, char *out, size_t outlen);

#endif

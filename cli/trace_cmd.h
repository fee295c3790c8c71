/*
 * cli/trace_cmd.h - `mailpump trace ID`: what happened to a message, from
 * its history and the ledger (control/trace.h), as a timeline or JSON.
 */
#ifndef MP_CLI_TRACE_CMD_H
#define MP_CLI_TRACE_CMD_H

#include <stdio.h>

#include "core/config.h"

/* Exit status of `mailpump trace` when nothing is recorded for the id. */
#define TRACE_EXIT_NOT_FOUND 3

/* argv[0] is "trace". Returns the process exit status: 0 found, 1 Redis
 * could not answer, 2 usage, 3 nothing recorded (unknown or expired). */
int trace_cmd_main(const mp_config_t *cfg, int argc, char **argv);
void trace_cmd_usage(FILE *f);

#endif

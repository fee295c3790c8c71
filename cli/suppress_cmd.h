/*
 * cli/suppress_cmd.h - `mailpump suppress`: the suppression lists
 * (control/suppress.h) from the command line.
 */
#ifndef MP_CLI_SUPPRESS_CMD_H
#define MP_CLI_SUPPRESS_CMD_H

#include <stdio.h>

#include "core/config.h"

/* argv[0] is "suppress". Returns the process exit status: 0 done, 1
 * Redis failed (or get found nothing), 2 usage or invalid input (a bad
 * tenant, an invalid address). */
int  suppress_cmd_main(const mp_config_t *cfg, int argc, char **argv);
void suppress_cmd_usage(FILE *f);

#endif

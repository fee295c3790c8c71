/*
 * cli/queue_cmd.h - `mailpump queue` (what is queued where, what the
 * workers hold, the busiest destinations) and `mailpump dead list|redrive`
 * (the dead-letter queue), on control/queue.h.
 */
#ifndef MP_CLI_QUEUE_CMD_H
#define MP_CLI_QUEUE_CMD_H

#include <stdio.h>

#include "core/config.h"

/* argv[0] is "queue" / "dead". Exit status: 0 done, 1 the broker or
 * Redis failed (or a redrive publish failed), 2 usage. */
int  queue_cmd_main(const mp_config_t *cfg, int argc, char **argv);
void queue_cmd_usage(FILE *f);
int  dead_cmd_main(const mp_config_t *cfg, int argc, char **argv);
void dead_cmd_usage(FILE *f);

#endif

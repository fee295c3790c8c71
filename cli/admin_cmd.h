/*
 * cli/admin_cmd.h - `mailpump admin suspend|bounce|rate|connections|
 * resume|list`: operators' shaping actions (control/admin.h), written to
 * the Redis every mailpumpd polls, so they take effect on every worker of
 * every pod within about a second. See docs/operations.md, "Suspending,
 * resuming and bouncing".
 */
#ifndef MP_CLI_ADMIN_CMD_H
#define MP_CLI_ADMIN_CMD_H

#include <stdio.h>

#include <jansson.h>

#include "core/config.h"

typedef enum { ADMIN_OP_ADD = 1, ADMIN_OP_RESUME, ADMIN_OP_LIST } admin_op_t;

/* A command line, parsed (no I/O). */
typedef struct admin_args {
    admin_op_t  op;
    int         help;      /* --help: print the usage of the subcommand, exit 0 */
    const char *sub;       /* "suspend", "bounce", "rate", "connections", "resume", "list" */
    json_t     *req;       /* ADMIN_OP_ADD: the request for ctl_action_add_json() (owned) */
    char        who[128];  /* --who, else $USER@hostname */
    const char *id;        /* ADMIN_OP_RESUME by id */
    int         sel;       /* ADMIN_OP_RESUME by selector: action_sel_t, 0 when by id */
    const char *value;
    const char *via;       /* --via SOURCE, NULL when not given */
    const char *redis;     /* --redis HOST:PORT, NULL for [redis] host/port */
    int         json;      /* --json */
} admin_args_t;

/* argv[0] is "admin", argv[1] the subcommand. 0, or -1 + err (a usage
 * error: exit 2). Strings point into argv. Free with admin_args_free(). */
int  admin_cmd_parse(int argc, char **argv, admin_args_t *a, char *err, size_t errlen);
void admin_args_free(admin_args_t *a);

/* Exit status: 0 done, 1 runtime failure (Redis, nothing to resume), 2
 * usage or a request the control plane refuses. */
int  admin_cmd_main(const mp_config_t *cfg, int argc, char **argv);
void admin_cmd_usage(FILE *f);

#endif

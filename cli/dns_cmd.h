/*
 * cli/dns_cmd.h - `mailpump dns resolve|prewarm`.
 *
 * Both build the same resolver the daemon's workers build (c-ares with
 * the L1 cache and, when [redis] host is set and [dns] l2 = 1, the Redis
 * L2) from the daemon's configuration, so what they print is what a
 * worker would use.
 */
#ifndef MP_CLI_DNS_CMD_H
#define MP_CLI_DNS_CMD_H

#include <stdio.h>

#include "core/config.h"

/* argv[0] is "dns". Returns the process exit status: 0 all resolved,
 * 1 some lookup failed (resolve) or Redis could not be used (prewarm),
 * 2 usage or configuration error. */
int dns_cmd_main(const mp_config_t *cfg, int argc, char **argv);
void dns_cmd_usage(FILE *f);

#endif

#!/usr/bin/env bash
# Ledger marks: latency of bursts of 1,000-20,000 concurrent transactions on one Redis connection
#
# Run as: tests/bench/run ledger
# Each burst: N transactions write "sending" then "done" for one recipient,
# all started in one loop iteration, 3 rounds, against the stack's Redis
# (keys under a random prefix, expiring after 60 s), once with the default
# [redis] timeout_ms (250) and once with the old 50 ms. Prints
# "BENCH ledger <n>_<timeout>_<metric> <value> <unit>".
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MAILPUMP_BUILD_DIR:-$root/build-bench}
bin=$build/tests/bench_ledger
[ -x "$bin" ] || { echo "ledger.sh: $bin not built (cmake -DMAILPUMP_BENCH=ON)" >&2; exit 2; }
# shellcheck disable=SC1090
. "${MP_STACK_DIR:-/tmp/mpstack}/env"
for timeout in 250 50; do
  for n in 1000 10000 20000; do
    "$bin" "$MP_REDIS_HOST" "$MP_REDIS_PORT" "$n" 3 "$timeout" |
      sed -n "s/^BENCH ledger \([a-z0-9_]*\) /BENCH ledger ${n}_${timeout}ms_\1 /p"
  done
done

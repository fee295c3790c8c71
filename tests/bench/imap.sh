#!/usr/bin/env bash
# IMAP Sent copies: appends/s into Dovecot, one session per copy, pooled, pooled with MULTIAPPEND
#
# Each run uses one loop (a worker thread's share) with IMAP_BENCH_CONCURRENCY
# appends in flight (default 8), IMAP_BENCH_COUNT copies (default 2000) of
# IMAP_BENCH_SIZE bytes (default 10240) over verified IMAPS to the stack's
# Dovecot, the first user's Sent mailbox: without the pool, pooled with one
# copy per APPEND ([imap] pool_max_batch = 1), and pooled with queued copies
# sharing an APPEND (MULTIAPPEND, the default). Printed side by side, with
# the ratios, so the figures come from the same machine state.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${MAILPUMP_BUILD_DIR:-$PWD/build-bench}
bin=$build/tests/bench_imap
[ -x "$bin" ] || { echo "imap.sh: $bin not built (cmake -DMAILPUMP_BENCH=ON)" >&2; exit 2; }
n=${IMAP_BENCH_COUNT:-2000}
c=${IMAP_BENCH_CONCURRENCY:-8}
s=${IMAP_BENCH_SIZE:-10240}
nopool=$("$bin" --count "$n" --concurrency "$c" --size "$s" --pool 0)
echo "$nopool"
nobatch=$("$bin" --count "$n" --concurrency "$c" --size "$s" --pool 1 --batch 1)
echo "$nobatch"
pool=$("$bin" --count "$n" --concurrency "$c" --size "$s" --pool 1)
echo "$pool"
a=$(awk '/appends_per_s_nopool/ {print $4}' <<<"$nopool")
m=$(awk '/appends_per_s_pool_nobatch/ {print $4}' <<<"$nobatch")
b=$(awk '/appends_per_s_pool / {print $4}' <<<"$pool")
awk -v a="$a" -v m="$m" -v b="$b" 'BEGIN {
    if (a > 0) printf "BENCH imap pool_speedup %.2f x\n", m / a
    if (m > 0) printf "BENCH imap multiappend_speedup %.2f x\n", b / m
}'

#!/usr/bin/env bash
# MIME build throughput (10 KB text, 10 MB attachment), DKIM signatures/s, peak memory for 25 MB
#
# Needs no services. Run through tests/bench/run mime, which builds
# build-bench/ (Release, -DMAILPUMP_BENCH=ON) and sets MAILPUMP_BUILD_DIR.
set -euo pipefail
bin=${MAILPUMP_BUILD_DIR:-build-bench}/tests/bench_mime
[ -x "$bin" ] || { echo "mime.sh: $bin not built (use tests/bench/run mime)" >&2; exit 1; }
"$bin"
"$bin" rss
"$bin" rss-worker
"$bin" rss-worker-copy

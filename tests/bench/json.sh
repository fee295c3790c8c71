#!/usr/bin/env bash
# JSON parsers on message bodies (jansson, yajl, jsmn, simdjson): ns/byte to message_t
#
# Needs no services. Run through tests/bench/run json, which builds
# build-bench/ (Release, -DMAILPUMP_BENCH=ON) and sets MAILPUMP_BUILD_DIR.
# Optional argument: seconds per measurement (default 0.4).
set -euo pipefail
bin=${MAILPUMP_BUILD_DIR:-build-bench}/tests/bench_json
[ -x "$bin" ] || { echo "json.sh: $bin not built (use tests/bench/run json)" >&2; exit 1; }
"$bin" "$@"

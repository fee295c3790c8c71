#!/usr/bin/env bash
# DNS caches: L1 hits/s, L2 hit latency at 10k lookups/s, 10,000 cold domains
#
# Runs a private dnsmasq (127.0.0.154, a free port) serving a generated
# zone of 10,000 domains; the stack's dnsmasq and Redis are left as they
# are (Redis is only read and written under a random key prefix whose keys
# expire). The private dnsmasq is stopped by its pid on exit.
#
# The zone: each domain has an A record and, through dnsmasq's localmx and
# mx-target, an MX record naming one shared host (as when many domains are
# hosted by one provider). A cold lookup is still three queries: MX, then A
# and AAAA of the host. Not 10,000 mx-host lines: dnsmasq scans that list
# for every query, which caps it near 2,500 queries/s with its CPU at 100 %
# (DNS_BENCH_DISTINCT_MX=1 measures that zone anyway).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${MAILPUMP_BUILD_DIR:-$PWD/build-bench}
bin=$build/tests/bench_dns
[ -x "$bin" ] || { echo "dns.sh: $bin not built (cmake -DMAILPUMP_BENCH=ON)" >&2; exit 2; }
env_file=${MP_STACK_DIR:-/tmp/mpstack}/env
# shellcheck disable=SC1090
. "$env_file"

n=${DNS_BENCH_DOMAINS:-10000}
addr=127.0.0.154
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.154", 0)); print(s.getsockname()[1])')
work=$(mktemp -d /tmp/mp-bench-dns.XXXXXX)
dnsmasq_pid=
cleanup() {
  if [ -n "$dnsmasq_pid" ]; then kill "$dnsmasq_pid" 2>/dev/null || true; wait "$dnsmasq_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

python3 - "$n" "$work" "${DNS_BENCH_DISTINCT_MX:-0}" <<'PY'
import sys
n, work, distinct = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
with open(f"{work}/zone.conf", "w") as z, open(f"{work}/domains.txt", "w") as d:
    if not distinct:
        z.write("localmx\nmx-target=mx.bench.test\nhost-record=mx.bench.test,127.2.0.1\n")
    for i in range(n):
        name = f"d{i:05d}.bench.test"
        if distinct:
            z.write(f"mx-host={name},mx.{name},10\n")
            z.write(f"host-record=mx.{name},127.2.{i // 250}.{i % 250 + 1}\n")
        else:
            z.write(f"host-record={name},127.3.{i // 250}.{i % 250 + 1}\n")
        d.write(name + "\n")
PY
cat >"$work/dnsmasq.conf" <<CONF
port=$port
listen-address=$addr
bind-interfaces
no-resolv
no-hosts
no-poll
no-negcache
user=root
local-ttl=600
local=/#/
conf-file=$work/zone.conf
CONF
dnsmasq --keep-in-foreground --conf-file="$work/dnsmasq.conf" --log-facility="$work/dnsmasq.log" &
dnsmasq_pid=$!
for _ in $(seq 100); do
  dig +short +time=1 +tries=1 -p "$port" @"$addr" d00000.bench.test MX 2>/dev/null | grep -q mx && break
  sleep 0.05
done

servers="$addr:$port"
"$bin" cold --servers "$servers" --domains "$work/domains.txt" --concurrency 512
"$bin" l1 --servers "$servers" --name d00000.bench.test --seconds 2
"$bin" l2 --servers "$servers" --redis "$MP_REDIS_HOST:$MP_REDIS_PORT" --domains "$work/domains.txt" \
  --names 1000 --rate 10000 --seconds 3
# reference: one Redis GET round trip from redis-benchmark (one client)
if command -v redis-benchmark >/dev/null; then
  redis-benchmark -h "$MP_REDIS_HOST" -p "$MP_REDIS_PORT" -t get -n 20000 -c 1 -q 2>/dev/null \
    | tr '\r' '\n' | sed -n 's/.*GET:.*p50=\([0-9.]*\) msec.*/BENCH dns ref_redis_get_p50_ms \1 ms/p' | tail -1
fi

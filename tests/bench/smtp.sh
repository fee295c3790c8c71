#!/usr/bin/env bash
# SMTP engine: mailpumpd -> smtpsink over STARTTLS (pool on/off), smtp-source ceiling
#
# Run as: tests/bench/run smtp [--count N] [options]   (see --help)
#
# For each of two runs ("pool": MAILPUMP_SMTP_POOL=1, "nopool":
# MAILPUMP_SMTP_POOL=0) on private AMQP names:
#   1. a tap on the run's events exchange (bench_publish events);
#   2. N messages of 10 KB preloaded into the run's queue (bench_publish
#      publish, confirms, 2,000 in flight);
#   3. a fresh smtpsink with STARTTLS on 127.0.0.2 and 127.0.0.3 (the
#      test.example MX hosts) using the stack's certificate;
#   4. mailpumpd with SMTP_PORT = the sink's port, TLS verify against the
#      stack's CA, no IMAP appends; throughput is measured from its first
#      "message_received" log line to the ts of the last event;
#   5. then a latency phase: messages published at a steady rate (by default
#      half the throughput just measured) while the daemon runs; enqueue time travels in the trace_id, so
#      latency = event ts - enqueue time (p50, p99).
# Handshakes and messages per connection come from smtpsink's counters,
# worker peak RSS from /proc/<pid>/status VmHWM. idle_tls_session_kib holds
# --idle-sessions pooled TLS sessions open and divides the RSS growth by
# their number (n/a when the engine keeps none). ceiling_per_s is Postfix's
# smtp-source -> smtp-sink, plaintext on loopback, one message per session.
#
# Everything started here is stopped by the EXIT trap; private queues and
# exchanges are deleted; the whole run is bounded by --max-seconds.
set -euo pipefail

count=20000
size=10240
lat_count=2000
lat_rate=      # default: half the throughput just measured (at most 1000/s)
idle_sessions=1000
max_seconds=1500
runs="pool nopool"
dkim=1         # 0: no DKIM signing (the stack config signs test.example)
tls=verify     # [smtp] tls of the daemon: verify (STARTTLS) or none (plaintext)
ceiling=1
keep=0

usage() {
    cat <<EOF
usage: tests/bench/run smtp [options]
  --count N           messages preloaded per run (default $count, 10 KB each)
  --size BYTES        body size (default $size)
  --latency-count N   messages in the latency phase (default $lat_count)
  --latency-rate R    their publish rate, msg/s (default: half the measured throughput, <= 1000)
  --idle-sessions N   pooled TLS sessions held for idle_tls_session_kib (default $idle_sessions; 0 skips)
  --runs "pool nopool" which runs (default both)
  --tls verify|none   the daemon's [smtp] tls: STARTTLS with verification (default) or plaintext
  --no-dkim           do not sign (MAILPUMP_DKIM_KEYS_FILE empty): the engine's own CPU without RSA
  --no-ceiling        skip the smtp-source -> smtp-sink reference
  --max-seconds S     hard bound on the whole benchmark (default $max_seconds)
  --keep              keep the work directory (logs, events, sink stats)
Prints "BENCH smtp <metric> <value> <unit>" lines; nopool_ prefix for the run without pooling.
The pool switch is MAILPUMP_SMTP_POOL=1|0 (config key [smtp] pool).
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
    --count) count=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --latency-count) lat_count=$2; shift 2 ;;
    --latency-rate) lat_rate=$2; shift 2 ;;
    --idle-sessions) idle_sessions=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --tls) tls=$2; shift 2 ;;
    --no-dkim) dkim=0; shift ;;
    --no-ceiling) ceiling=0; shift ;;
    --max-seconds) max_seconds=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "smtp.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MAILPUMP_BUILD_DIR:-$root/build-bench}
stack_dir=${MP_STACK_DIR:-/tmp/mpstack}
SINK=$build/tests/smtpsink
PUB=$build/tests/bench_publish
DAEMON=$build/mailpumpd
PY=/usr/bin/python3
for f in "$SINK" "$PUB" "$DAEMON"; do
    [ -x "$f" ] || { echo "smtp.sh: $f is missing (build with -DMAILPUMP_BENCH=ON)" >&2; exit 2; }
done
[ -r "$stack_dir/env" ] || { echo "smtp.sh: $stack_dir/env missing: the stack is not up" >&2; exit 2; }
# shellcheck disable=SC1091
. "$stack_dir/env"
CA=$MP_CA_FILE
CERT=$stack_dir/ca/server.crt
KEY=$stack_dir/ca/server.key

nodkim=()
[ "$dkim" = 1 ] || nodkim=(MAILPUMP_DKIM_KEYS_FILE=)
rid="$$x$(date +%s)"   # message ids must never repeat: the engine's ledger remembers them
tag="bench.smtp.$rid"
work=$(mktemp -d /tmp/mpbench-smtp.XXXXXX)
pids=()
log() { echo "smtp.sh: $*" >&2; }

. "$(dirname "$0")/common.bash"
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# hard bound on the whole run
start_time_bound smtp.sh

# figures from a run's events, daemon log and sink counters
cat >"$work/analyse.py" <<'EOF'
import json, math, sys
from datetime import datetime, timezone
mode, work, name, mp, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
def ms(ts):
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp() * 1000
tp, lat, other = [], [], {}
for line in open(f"{work}/{name}.events"):
    e = json.loads(line)
    mid = e.get("message_id", "")
    if e.get("event") != "delivered" or e.get("reason") != "delivered":
        other[e.get("event"), e.get("reason")] = other.get((e.get("event"), e.get("reason")), 0) + 1
        continue
    if f"-{name}-tp-" in mid:
        tp.append(ms(e["ts"]))
    elif f"-{name}-lat-" in mid:
        lat.append(ms(e["ts"]) - int(e["trace_id"].rsplit(":", 1)[1]))
if other:
    print(f"smtp.sh: run {name}: events other than delivered: {other}", file=sys.stderr)
first = None
for line in open(f"{work}/{name}.daemon.log"):
    if "event=message_received" in line:
        first = ms(line.split()[0][3:])
        break
def out(metric, value, unit):
    print(f"BENCH smtp {mp}{metric} {value} {unit}")
rate = None
if first is not None and tp and max(tp) > first:
    rate = len(tp) * 1000 / (max(tp) - first)
if mode == "rate":  # for the latency phase: half the measured throughput
    print(max(10, min(1000, int(rate / 2))) if rate else 100)
    sys.exit(0)
hwm, daemon_cpu_ms, sink_cpu_ms = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
out("delivered_per_s", round(rate) if rate else "n/a", "msg/s")
if len(tp) < count:
    print(f"smtp.sh: run {name}: only {len(tp)} of {count} messages delivered", file=sys.stderr)
def pct(v, p):  # nearest rank
    v = sorted(v)
    return v[min(len(v), max(1, math.ceil(p / 100 * len(v)))) - 1]
out("latency_p50_ms", round(pct(lat, 50)) if lat else "n/a", "ms")
out("latency_p99_ms", round(pct(lat, 99)) if lat else "n/a", "ms")
st = json.load(open(f"{work}/{name}.sink.tp.json"))
m = st["messages"]
out("full_handshakes_per_1000", round(st["tls_full"] * 1000 / m, 1) if m else "n/a", "handshakes")
out("resumed_handshakes_per_1000", round(st["tls_resumed"] * 1000 / m, 1) if m else "n/a", "handshakes")
out("msgs_per_connection", round(m / st["connections"], 1) if st["connections"] else "n/a", "msg")
out("worker_peak_rss_kib", hwm, "KiB")
# CPU per message over the throughput phase: the receiver must cost far less than the engine
out("daemon_cpu_ms_per_msg", round(daemon_cpu_ms / m, 3) if m else "n/a", "ms")
out("sink_cpu_ms_per_msg", round(sink_cpu_ms / m, 3) if m else "n/a", "ms")
EOF

lines() { [ -f "$1" ] && wc -l <"$1" || echo 0; }
has_lines() { [ "$(lines "$1")" -ge "$2" ]; }
file_has() { grep -q "$2" "$1" 2>/dev/null; }

cpu_ms() { # user + system CPU of a process so far
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print int(($12 + $13) * 1000 / hz) }' "/proc/$1/stat"
}
proc_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# deadline for a phase of n messages: assume at least 50 msg/s
phase_seconds() { echo $((60 + $1 / 50)); }

amqp=(--host "$MP_AMQP_HOST" --port "$MP_AMQP_PORT" --user "$MP_AMQP_USER" --password "$MP_AMQP_PASSWORD"
      --vhost "${MP_AMQP_VHOST:-/}")

start_sink() { # name extra-args...: starts smtpsink on 127.0.0.2/.3; sets sink_pid sink_port
    local name=$1
    shift
    sink_port=$(free_port 127.0.0.2 127.0.0.3)
    "$SINK" --listen "127.0.0.2:$sink_port" --listen "127.0.0.3:$sink_port" --cert "$CERT" --key "$KEY" \
        --hostname mx1.test.example --stats-file "$work/$name.sink.json" "$@" \
        >"$work/$name.sink.out" 2>&1 &
    sink_pid=$!
    pids+=("$sink_pid")
    wait_for 10 "smtpsink to listen" file_has "$work/$name.sink.out" "smtpsink: ready"
}

start_daemon() { # name pool extra-env...: sets daemon_pid, q, dq, ex
    local name=$1 pool=$2
    shift 2
    local mport
    mport=$(free_port 127.0.0.1)
    env MAILPUMP_AMQP_QUEUE="$q" MAILPUMP_AMQP_DEAD_QUEUE="$dq" MAILPUMP_AMQP_EVENTS_EXCHANGE="$ex" \
        MAILPUMP_RETRY_QUEUE_PREFIX="$tag.$name.retry" MAILPUMP_METRICS_LISTEN="127.0.0.1:$mport" \
        MAILPUMP_SMTP_PORT="$sink_port" MAILPUMP_SMTP_TLS="$tls" MAILPUMP_SMTP_CA_FILE="$CA" \
        MAILPUMP_IMAP_HOST= MAILPUMP_LOG_LEVEL=info MAILPUMP_LOG_FORMAT=logfmt \
        MAILPUMP_SMTP_POOL="$pool" ${nodkim[@]+"${nodkim[@]}"} "$@" \
        "$DAEMON" --config "$MP_MAILPUMPD_CONFIG" >"$work/$name.daemon.log" 2>&1 &
    daemon_pid=$!
    pids+=("$daemon_pid")
    daemon_metrics=$mport
}

ready() { $PY -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$1/readyz',timeout=2).status!=200)" 2>/dev/null; }
alive() { kill -0 "$1" 2>/dev/null || { log "$2 exited early (see $work)"; tail -5 "$work/$2.log" >&2 2>/dev/null; return 1; }; }

start_tap() { # name: events of exchange $ex into $work/name.events
    "$PUB" events "${amqp[@]}" --queue "$q" --exchange "$ex" --out "$work/$1.events" \
        --max-seconds "$max_seconds" >"$work/$1.tap.out" 2>&1 &
    tap_pid=$!
    pids+=("$tap_pid")
    wait_for 20 "event tap" file_has "$work/$1.tap.out" subscribed
}

wait_events() { # name n deadline-seconds: until n events arrived (and the daemon lives)
    local f="$work/$1.events" n=$2 t=$3 i
    for ((i = 0; i < t * 10; i++)); do
        has_lines "$f" "$n" && return 0
        kill -0 "$daemon_pid" 2>/dev/null || { log "mailpumpd died during run $1"; tail -20 "$work/$1.daemon.log" >&2; return 1; }
        sleep 0.1
    done
    log "run $1: only $(lines "$f") of $n events after ${t}s"
    return 1
}

run_engine() { # name pool(1|0) prefix-for-metrics
    local name=$1 pool=$2 mp=$3
    q="$tag.$name.outbound"; dq="$tag.$name.dead"; ex="$tag.$name.events"
    log "run $name (MAILPUMP_SMTP_POOL=$pool): preloading $count messages"
    start_tap "$name"
    "$PUB" publish "${amqp[@]}" --queue "$q" --dead-queue "$dq" --exchange "$ex" --count "$count" \
        --size "$size" --prefix "$rid-$name-tp" --to "sink@test.example" >"$work/$name.publish.out"
    log "  $(cat "$work/$name.publish.out")"
    start_sink "$name" --threads 1
    start_daemon "$name" "$pool"
    wait_events "$name" "$count" "$(phase_seconds "$count")"
    local hwm dcpu scpu
    hwm=$(proc_kib "$daemon_pid" VmHWM)
    dcpu=$(cpu_ms "$daemon_pid")
    scpu=$(cpu_ms "$sink_pid")
    sink_stats "$sink_pid" "$work/$name.sink.json"
    cp "$work/$name.sink.json" "$work/$name.sink.tp.json"
    local rate=$lat_rate
    [ -n "$rate" ] || rate=$($PY "$work/analyse.py" rate "$work" "$name" "$mp" "$count")
    log "  throughput phase done; latency phase: $lat_count messages at $rate msg/s"
    if [ "$lat_count" -gt 0 ]; then
        "$PUB" publish "${amqp[@]}" --queue "$q" --dead-queue "$dq" --exchange "$ex" --count "$lat_count" \
            --size "$size" --prefix "$rid-$name-lat" --rate "$rate" --to "sink@test.example" >>"$work/$name.publish.out"
        wait_events "$name" $((count + lat_count)) "$(phase_seconds "$lat_count")"
    fi
    stop_pid "$daemon_pid" 60
    stop_pid "$sink_pid" 10
    stop_pid "$tap_pid" 10
    $PY "$work/analyse.py" report "$work" "$name" "$mp" "$count" "$hwm" "$dcpu" "$scpu"
}

idle_sessions_run() { # pooled TLS sessions held idle: RSS growth per session
    local name=idle
    if [ "$idle_sessions" -le 0 ]; then
        return 0
    fi
    q="$tag.$name.outbound"; dq="$tag.$name.dead"; ex="$tag.$name.events"
    log "idle sessions: $idle_sessions messages held 3000 ms at the final dot, then idle in the pool"
    start_tap "$name"
    # each message needs its own session while the sink holds the dot; once
    # answered, the sessions go back to the pool and stay idle
    start_sink "$name" --threads 1 --rule "delay:DOT#$idle_sessions=3000"
    # one worker, room for every message at once, a pool that keeps them
    start_daemon "$name" 1 MAILPUMP_WORKER_COUNT=1 MAILPUMP_AMQP_PREFETCH="$idle_sessions" \
        MAILPUMP_SMTP_POOL_MAX_PER_DEST="$idle_sessions" MAILPUMP_SMTP_POOL_MAX_TOTAL="$idle_sessions" \
        MAILPUMP_SMTP_POOL_IDLE_MS=120000
    wait_for 30 "mailpumpd ready" ready "$daemon_metrics"
    sleep 1
    local before after open
    before=$(proc_kib "$daemon_pid" VmRSS)
    "$PUB" publish "${amqp[@]}" --queue "$q" --dead-queue "$dq" --exchange "$ex" --count "$idle_sessions" \
        --size 200 --prefix "$rid-$name" --to "sink@test.example" >"$work/$name.publish.out"
    wait_events "$name" "$idle_sessions" "$(phase_seconds "$idle_sessions")"
    # the burst is over: let the worker settle (it trims its heap half a
    # second after its last message), so the figure is what the idle
    # sessions hold rather than the burst's high-water mark
    sleep 2
    after=$(proc_kib "$daemon_pid" VmRSS)
    sink_stats "$sink_pid" "$work/$name.sink.json"
    open=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['connections_open'])" "$work/$name.sink.json")
    stop_pid "$daemon_pid" 60
    stop_pid "$sink_pid" 10
    stop_pid "$tap_pid" 10
    if [ "$open" -ge $((idle_sessions * 9 / 10)) ]; then
        echo "BENCH smtp idle_tls_session_kib $(((after - before) / open)) KiB"
        log "  $open idle sessions: VmRSS $before -> $after KiB"
    else
        echo "BENCH smtp idle_tls_session_kib n/a KiB"
        log "  idle_tls_session_kib n/a: the engine kept $open of $idle_sessions sessions open after delivering (no pool yet?)"
    fi
    echo "BENCH smtp nopool_idle_tls_session_kib n/a KiB"
}

ceiling_run() {
    if [ "$ceiling" = 0 ]; then
        return 0
    fi
    local port t0 t1 pid rate
    port=$(free_port 127.0.0.9)
    /usr/sbin/smtp-sink -u nobody "127.0.0.9:$port" 1000 >"$work/smtp-sink.out" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_for 10 "smtp-sink" $PY -c "import socket; socket.create_connection(('127.0.0.9', $port), 1).close()"
    log "ceiling: smtp-source -s 20 -m $count -l $size -> smtp-sink 127.0.0.9:$port"
    t0=$(date +%s.%N)
    timeout "$(phase_seconds "$count")" /usr/sbin/smtp-source -s 20 -m "$count" -l "$size" "127.0.0.9:$port" \
        >"$work/smtp-source.out" 2>&1
    t1=$(date +%s.%N)
    stop_pid "$pid" 10
    rate=$($PY -c "print(round($count / ($t1 - $t0)))")
    echo "BENCH smtp ceiling_per_s $rate msg/s"
    echo "BENCH smtp nopool_ceiling_per_s $rate msg/s"
}

for r in $runs; do
    case "$r" in
    pool) run_engine pool 1 "" ;;
    nopool) run_engine nopool 0 nopool_ ;;
    *) log "unknown run $r"; exit 2 ;;
    esac
done
idle_sessions_run
ceiling_run

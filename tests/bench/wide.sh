#!/usr/bin/env bash
# Delivery at internet latency to 1,200 domains (50-500 ms replies, a tarpit, a flaky MX), default settings
#
# Run as: tests/bench/run wide [--count N] [options]   (see --help)
#
# Models what decides throughput on the internet rather than on loopback:
# every receiver takes 50-500 ms per reply (drawn uniformly per reply on the
# greeting, EHLO, RCPT and the final dot), one destination is a tarpit that
# sends its greeting one byte every 3 s, one refuses every second connection
# with 421. The receivers are smtpsink processes on the addresses of the
# stack's "wide" zone (deploy/local/README.md), all on one port, which
# mailpumpd is pointed at with MAILPUMP_SMTP_PORT:
#   ordinary  127.0.3.1-4  STARTTLS (stack certificate), w0000-w0999.example
#                          (one site each) and p000-p199.example (MX
#                          mx1/mx2.bigmx.example: one site, bigmx.example)
#   tarpit    127.0.3.9    tarpit.example: drip:CONNECT=3000
#   flaky     127.0.3.10   flaky.example: cmd:CONNECT%2=421 4.7.0 try later
# Recipients of the N messages (10 KB): 5 % tarpit.example, 2 % flaky.example,
# 5 % over the p-domains (the bigmx site, --bigmx-pct), the rest over the w-domains,
# shuffled; they are published (bench_publish --to-file) while mailpumpd
# runs with its DEFAULT settings: only the stack (broker, DNS, Redis), the
# sink port, private queue names, TLS back to the default (opportunistic:
# the stack's mailpumpd.ini says verify) and no DKIM (the default; --dkim
# signs with the stack's keys) are set.
#
# Three runs, each on fresh sinks and a fresh daemon:
#   A  (no prefix)   defaults, with the tarpit messages
#   B  (notarpit_)   defaults, the same messages without the tarpit ones
#   C  (caps_off_)   like A with per-destination caps off:
#                    MAILPUMP_SMTP_SITE_ISOLATION=0; run only when mailpumpd
#                    knows [smtp] site_isolation (otherwise caps_off_* n/a;
#                    an unknown MAILPUMP_* variable is silently ignored, so
#                    the run would only repeat A), or with --force-caps-off
# A run ends when every non-tarpit message has a final event for its
# recipient (delivered, bounced, or deferred to a retry), or at
# --run-seconds. Figures per run:
#   delivered_per_s      delivered events of non-tarpit domains / time from
#                        the first to the last of them
#   delivered_per_s_peak10s  the same in the best 10 s
#   sink_cpu_ms_per_msg  the receivers' CPU per message they took (harness cost)
#   finished             non-tarpit messages with a final event (of the total)
#   peak_sessions        sum of the sinks' open_peak
#   peak_sessions_daemon the largest value of the daemon's open-sessions
#                        gauge (a /metrics gauge whose name has smtp and
#                        session or connection), n/a when it has none
#   daemon_rss_mib       VmHWM; daemon_cpu_ms_per_msg CPU / delivered
#   ledger_unavailable   mailpump_ledger_unavailable_total at the end
#   deferred_<reason>, bounced_<reason>  event counts by reason (all domains,
#                        up to the end of the run: the sinks are stopped first)
#   tarpit_delivered     delivered to tarpit.example within the run
# and tarpit_ratio = delivered_per_s(A) / delivered_per_s(B).
#
# Everything started here is stopped by the EXIT trap; private queues and
# exchanges are deleted; the whole benchmark is bounded by --max-seconds.
set -euo pipefail

count=30000
size=10240
run_seconds=170
max_seconds=720
runs="A B C"
threads=2
force_caps_off=0
dkim=0
bigmx_pct=5
keep=0
extra_env=()

usage() {
    cat <<EOF
usage: tests/bench/run wide [options]
  --count N           messages of runs A and C (default $count; B gets the same minus the 5 % tarpit ones)
  --size BYTES        body size (default $size)
  --runs "A B C"      which runs (default all three)
  --run-seconds S     bound per run (default $run_seconds)
  --max-seconds S     hard bound on the whole benchmark (default $max_seconds)
  --sink-threads N    threads of the ordinary receivers' smtpsink (default $threads)
  --force-caps-off    run C even if mailpumpd does not know [smtp] site_isolation
  --bigmx-pct P       share of the messages to the one big site, bigmx.example (default $bigmx_pct;
                      with the default site_max_connections of 100 it takes about 150 msg/s)
  --dkim              sign with the stack's DKIM keys (default: no DKIM, as in mailpumpd's defaults;
                      an RSA-2048 signature costs more CPU than the rest of the message)
  --env KEY=VALUE     extra environment for every mailpumpd (repeatable), e.g.
                      --env MAILPUMP_AMQP_PREFETCH=5000 for a tuned run
  --keep              keep the work directory (logs, events, sink stats)
Prints "BENCH wide <metric> <value> <unit>" lines; prefixes notarpit_ (run B), caps_off_ (run C).
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
    --count) count=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --run-seconds) run_seconds=$2; shift 2 ;;
    --max-seconds) max_seconds=$2; shift 2 ;;
    --sink-threads) threads=$2; shift 2 ;;
    --force-caps-off) force_caps_off=1; shift ;;
    --env) extra_env+=("$2"); shift 2 ;;
    --keep) keep=1; shift ;;
    --dkim) dkim=1; shift ;;
    --bigmx-pct) bigmx_pct=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "wide.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
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
    [ -x "$f" ] || { echo "wide.sh: $f is missing (build with -DMAILPUMP_BENCH=ON)" >&2; exit 2; }
done
[ -r "$stack_dir/env" ] || { echo "wide.sh: $stack_dir/env missing: the stack is not up" >&2; exit 2; }
# shellcheck disable=SC1091
. "$stack_dir/env"
CERT=$stack_dir/ca/server.crt
KEY=$stack_dir/ca/server.key
RECEIVERS=(127.0.3.1 127.0.3.2 127.0.3.3 127.0.3.4)
TARPIT=127.0.3.9
FLAKY=127.0.3.10
# 50-500 ms per reply on the greeting, EHLO, RCPT and the final dot
LATENCY=(--rule "delay:CONNECT=50-500" --rule "delay:EHLO=50-500" --rule "delay:RCPT=50-500"
         --rule "delay:DOT=50-500")

dig +time=1 +tries=1 +short "@${MP_DNS_SERVER%:*}" -p "${MP_DNS_SERVER#*:}" mx.w0999.example A 2>/dev/null \
    | grep -qx 127.0.3.4 || { echo "wide.sh: the stack's zone has no wide part: run deploy/local/stack up" >&2; exit 2; }

# every session is a descriptor on both ends (daemon, sinks): raise the limit
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge 65536 ] || ulimit -n 65536 2>/dev/null || true

rid="$$x$(date +%s)"   # message ids must never repeat: the engine's ledger remembers them
tag="bench.wide.$rid"
work=$(mktemp -d /tmp/mpbench-wide.XXXXXX)
pids=()
log() { echo "wide.sh: $*" >&2; }

# forget pid: off the list the EXIT trap stops (a reaped pid may be reused)
forget() {
    local i
    for i in "${!pids[@]}"; do
        [ "${pids[i]}" = "$1" ] && unset 'pids[i]'
    done
    pids=("${pids[@]}")
}

. "$(dirname "$0")/common.bash"
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# hard bound on the whole run
start_time_bound wide.sh

# the recipient lists: A (and C) with the tarpit, B without
$PY - "$count" "$work" "$bigmx_pct" <<'EOF'
import random, sys
n, work = int(sys.argv[1]), sys.argv[2]
bigmx_share = float(sys.argv[3]) / 100
rng = random.Random(20261207)
kinds = ["tarpit"] * round(n * 0.05) + ["flaky"] * round(n * 0.02) + ["bigmx"] * round(n * bigmx_share)
kinds += ["w"] * (n - len(kinds))
rng.shuffle(kinds)
rcpts = []
for i, k in enumerate(kinds):
    dom = {"tarpit": "tarpit.example", "flaky": "flaky.example",
           "bigmx": f"p{rng.randrange(200):03d}.example", "w": f"w{rng.randrange(1000):04d}.example"}[k]
    rcpts.append(f"u{i}@{dom}")
open(f"{work}/rcpts.A", "w").write("\n".join(rcpts) + "\n")
open(f"{work}/rcpts.B", "w").write("\n".join(r for r in rcpts if not r.endswith("@tarpit.example")) + "\n")
EOF

# watches a run: events, the daemon's /metrics, the sinks' stats; exits when
# every non-tarpit message has its final event, at the bound, or when the
# daemon dies. Writes the run's summary (JSON) for the report.
cat >"$work/watch.py" <<'EOF'
import json, os, re, sys, time, urllib.request
events, metrics_port, daemon_pid, expect, bound, out = sys.argv[1:7]
expect, bound = int(expect), float(bound)
FINAL = {"delivered", "bounced", "deferred"}
done, seen = set(), {}
gauge_re = re.compile(r"^# TYPE (mailpump_\S*(?:smtp\S*(?:session|connection)|(?:session|connection)\S*smtp)\S*) gauge$")
gauge_max, gauge_name, ledger = None, None, None
def scrape():
    global gauge_max, gauge_name, ledger
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return
    names = set()
    for line in text.splitlines():
        m = gauge_re.match(line)
        if m:
            names.add(m.group(1))
    for name in sorted(names):
        total = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                    if l.startswith(name + " ") or l.startswith(name + "{"))
        if gauge_name is None:
            gauge_name = name
        if name == gauge_name:
            gauge_max = total if gauge_max is None else max(gauge_max, total)
    for line in text.splitlines():
        if line.startswith("mailpump_ledger_unavailable_total"):
            ledger = int(float(line.rsplit(" ", 1)[1]))
t0 = time.monotonic()
pos, buf, reason = 0, b"", "bound"
last_scrape = 0
while True:
    try:
        with open(events, "rb") as f:
            f.seek(pos)
            data = f.read()
            pos += len(data)
    except FileNotFoundError:
        data = b""
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        rcpt = e.get("recipient", "")
        if e.get("event") in FINAL and not rcpt.endswith("@tarpit.example"):
            done.add(e.get("message_id"))
    now = time.monotonic()
    if now - last_scrape >= 1:
        scrape()
        last_scrape = now
    if len(done) >= expect:
        reason = "all final"
        break
    if now - t0 >= bound:
        break
    try:
        os.kill(int(daemon_pid), 0)
    except OSError:
        reason = "daemon died"
        break
    time.sleep(0.2)
scrape()
json.dump({"end_ms": time.time() * 1000, "finished": len(done), "expect": expect, "reason": reason, "seconds": round(time.monotonic() - t0, 1),
           "gauge": gauge_name, "gauge_max": gauge_max, "ledger_unavailable": ledger}, open(out, "w"))
print(f"wide.sh: {reason} after {time.monotonic() - t0:.0f}s: {len(done)} of {expect} non-tarpit messages final",
      file=sys.stderr)
EOF

# the figures of one run
cat >"$work/report.py" <<'EOF'
import collections, json, sys
from datetime import datetime, timezone
work, name, mp, hwm_kib, cpu_ms, sink_cpu_ms = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                               int(sys.argv[5]), int(sys.argv[6]))
def ms(ts):
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp() * 1000
def out(metric, value, unit):
    print(f"BENCH wide {mp}{metric} {value} {unit}", flush=True)
w = json.load(open(f"{work}/{name}.watch.json"))
ts, delivered_all, tarpit_delivered = [], 0, 0
by = collections.Counter()
for line in open(f"{work}/{name}.events"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    ev, rcpt = e.get("event"), e.get("recipient", "")
    if ev == "delivered":
        delivered_all += 1
        if rcpt.endswith("@tarpit.example"):
            tarpit_delivered += 1
        else:
            ts.append(ms(e["ts"]))
    elif ev in ("deferred", "bounced", "dead") and ms(e["ts"]) <= w["end_ms"]:
        # only within the run: stopping the sinks at its end defers what was in flight
        by[ev, e.get("reason") or "none"] += 1
rate = len(ts) * 1000 / (max(ts) - min(ts)) if len(ts) > 1 and max(ts) > min(ts) else None
out("delivered_per_s", round(rate) if rate else "n/a", "msg/s")
out("delivered", len(ts), "msg")
# the best 10 s: what the engine reached before the biggest destination's tail
buckets = collections.Counter(int(t // 10000) for t in ts)
out("delivered_per_s_peak10s", round(max(buckets.values()) / 10) if buckets else "n/a", "msg/s")
out("finished", w["finished"], f"of_{w['expect']}")
out("run_seconds", w["seconds"], "s")
peak = sink_msgs = 0
for kind in ("ordinary", "tarpit", "flaky"):
    st = json.load(open(f"{work}/{name}.sink.{kind}.json"))
    peak += st["open_peak"]
    sink_msgs += st["messages"]
    out(f"peak_sessions_{kind}", st["open_peak"], "sessions")
out("peak_sessions", peak, "sessions")
out("peak_sessions_daemon", round(w["gauge_max"]) if w["gauge_max"] is not None else "n/a", "sessions")
if w["gauge"]:
    print(f"wide.sh: run {name}: daemon sessions gauge {w['gauge']}", file=sys.stderr)
out("daemon_rss_mib", round(hwm_kib / 1024, 1), "MiB")
out("daemon_cpu_ms_per_msg", round(cpu_ms / delivered_all, 3) if delivered_all else "n/a", "ms")
# the receivers must cost far less than the engine, or they are what is measured
out("sink_cpu_ms_per_msg", round(sink_cpu_ms / sink_msgs, 3) if sink_msgs else "n/a", "ms")
out("ledger_unavailable", w["ledger_unavailable"] if w["ledger_unavailable"] is not None else "n/a", "calls")
out("tarpit_delivered", tarpit_delivered, "msg")
for (ev, reason), n in sorted(by.items()):
    out(f"{ev}_{reason}", n, "events")
if rate:
    open(f"{work}/{name}.rate", "w").write(f"{rate}\n")
EOF

file_has() { grep -q "$2" "$1" 2>/dev/null; }
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print int(($12 + $13) * 1000 / hz) }' "/proc/$1/stat"; }
proc_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
ready() { $PY -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$1/readyz',timeout=2).status!=200)" 2>/dev/null; }

amqp=(--host "$MP_AMQP_HOST" --port "$MP_AMQP_PORT" --user "$MP_AMQP_USER" --password "$MP_AMQP_PASSWORD"
      --vhost "${MP_AMQP_VHOST:-/}")

declare -A sink_pid
start_sinks() { # run: the three receivers on one free port; sets port
    local name=$1 kind a
    port=$(free_port "${RECEIVERS[@]}" "$TARPIT" "$FLAKY")
    local listen=()
    for a in "${RECEIVERS[@]}"; do listen+=(--listen "$a:$port"); done
    "$SINK" "${listen[@]}" --threads "$threads" --cert "$CERT" --key "$KEY" --hostname mx.wide.example \
        "${LATENCY[@]}" --stats-file "$work/$name.sink.ordinary.json" >"$work/$name.sink.ordinary.out" 2>&1 &
    sink_pid[ordinary]=$!
    # the tarpit: its greeting one byte every 3 s (multi-line, so it lasts ~5 min)
    "$SINK" --listen "$TARPIT:$port" --cert "$CERT" --key "$KEY" --hostname mx.tarpit.example \
        --rule "drip:CONNECT=3000" --rule "multiline:CONNECT" "${LATENCY[@]}" \
        --stats-file "$work/$name.sink.tarpit.json" >"$work/$name.sink.tarpit.out" 2>&1 &
    sink_pid[tarpit]=$!
    "$SINK" --listen "$FLAKY:$port" --cert "$CERT" --key "$KEY" --hostname mx.flaky.example \
        --rule "cmd:CONNECT%2=421 4.7.0 try later" "${LATENCY[@]}" \
        --stats-file "$work/$name.sink.flaky.json" >"$work/$name.sink.flaky.out" 2>&1 &
    sink_pid[flaky]=$!
    pids+=("${sink_pid[ordinary]}" "${sink_pid[tarpit]}" "${sink_pid[flaky]}")
    for kind in ordinary tarpit flaky; do
        wait_for 10 "smtpsink $kind" file_has "$work/$name.sink.$kind.out" "smtpsink: ready"
    done
}

caps_off_supported() {
    # not grep -q: it would stop reading, and pipefail would count the SIGPIPE
    "$DAEMON" --print-config-reference 2>/dev/null | grep site_isolation >/dev/null
}

dkim_env=()
[ "$dkim" = 1 ] || dkim_env=(MAILPUMP_DKIM_KEYS_FILE=)

run_engine() { # name rcpt-list prefix extra-env...
    local name=$1 list=$2 mp=$3
    shift 3
    local q="$tag.$name.outbound" dq="$tag.$name.dead" ex="$tag.$name.events" n mport
    n=$(wc -l <"$work/rcpts.$list")
    local expect=$n
    [ "$list" = A ] && expect=$((n - $(grep -c '@tarpit.example$' "$work/rcpts.A")))
    log "run $name: $n messages ($expect not to the tarpit), bound ${run_seconds}s"
    "$PUB" events "${amqp[@]}" --queue "$q" --exchange "$ex" --out "$work/$name.events" \
        --max-seconds "$max_seconds" >"$work/$name.tap.out" 2>&1 &
    local tap=$!
    pids+=("$tap")
    wait_for 20 "event tap" file_has "$work/$name.tap.out" subscribed
    start_sinks "$name"
    mport=$(free_port 127.0.0.1)
    env MAILPUMP_AMQP_QUEUE="$q" MAILPUMP_AMQP_DEAD_QUEUE="$dq" MAILPUMP_AMQP_EVENTS_EXCHANGE="$ex" \
        MAILPUMP_RETRY_QUEUE_PREFIX="$tag.$name.retry" MAILPUMP_METRICS_LISTEN="127.0.0.1:$mport" \
        MAILPUMP_SMTP_PORT="$port" MAILPUMP_SMTP_TLS=opportunistic MAILPUMP_SMTP_CA_FILE= \
        MAILPUMP_IMAP_HOST= MAILPUMP_LOG_LEVEL=info MAILPUMP_LOG_FORMAT=logfmt \
        "${dkim_env[@]}" \
        "${extra_env[@]}" "$@" \
        "$DAEMON" --config "$MP_MAILPUMPD_CONFIG" >"$work/$name.daemon.log" 2>&1 &
    local daemon=$!
    pids+=("$daemon")
    wait_for 30 "mailpumpd ready" ready "$mport" || { tail -20 "$work/$name.daemon.log" >&2; return 1; }
    # published while the daemon delivers
    "$PUB" publish "${amqp[@]}" --queue "$q" --dead-queue "$dq" --exchange "$ex" --count "$n" \
        --size "$size" --prefix "$rid-$name" --to-file "$work/rcpts.$list" >"$work/$name.publish.out" 2>&1 &
    local pub=$!
    pids+=("$pub")
    $PY "$work/watch.py" "$work/$name.events" "$mport" "$daemon" "$expect" "$run_seconds" "$work/$name.watch.json"
    local hwm dcpu kind scpu=0
    hwm=$(proc_kib "$daemon" VmHWM 2>/dev/null || echo 0)
    dcpu=$(cpu_ms "$daemon" 2>/dev/null || echo 0)
    for kind in ordinary tarpit flaky; do
        scpu=$((scpu + $(cpu_ms "${sink_pid[$kind]}" 2>/dev/null || echo 0)))
    done
    for kind in ordinary tarpit flaky; do
        sink_stats "${sink_pid[$kind]}" "$work/$name.sink.$kind.json"
    done
    log "  publisher: $(cat "$work/$name.publish.out" 2>/dev/null)"
    stop_pid "$pub" 10
    # the sinks first: their sessions end at once, so the daemon stops without
    # waiting out the tarpit
    for kind in ordinary tarpit flaky; do stop_pid "${sink_pid[$kind]}" 10; done
    stop_pid "$daemon" 60
    sleep 1
    stop_pid "$tap" 10
    $PY "$work/report.py" "$work" "$name" "$mp" "$hwm" "$dcpu" "$scpu"
}

caps_off_na() {
    local m
    for m in delivered_per_s peak_sessions peak_sessions_daemon daemon_rss_mib daemon_cpu_ms_per_msg \
        ledger_unavailable; do
        echo "BENCH wide caps_off_$m n/a -"
    done
}

for r in $runs; do
    case "$r" in
    A) run_engine A A "" ;;
    B) run_engine B B notarpit_ ;;
    C)
        if [ "$force_caps_off" = 1 ] || caps_off_supported; then
            run_engine C A caps_off_ MAILPUMP_SMTP_SITE_ISOLATION=0
        else
            log "run C skipped: mailpumpd has no [smtp] site_isolation (--force-caps-off runs it anyway)"
            caps_off_na
        fi
        ;;
    *) log "unknown run $r"; exit 2 ;;
    esac
done
if [ -s "$work/A.rate" ] && [ -s "$work/B.rate" ]; then
    echo "BENCH wide tarpit_ratio $($PY -c "print(round($(cat "$work/A.rate") / $(cat "$work/B.rate"), 2))") x"
else
    echo "BENCH wide tarpit_ratio n/a x"
fi

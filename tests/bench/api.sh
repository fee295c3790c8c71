#!/usr/bin/env bash
# HTTP API: POST /v1/messages (batches of 1 and of 100) against direct AMQP publishing
#
# Run as: tests/bench/run api [--count N] [options]   (see --help)
#
# In one run, on private AMQP names ($tag.*), all deleted at the end:
#   1. direct: bench_publish publishes N messages into $tag.direct (no
#      consumer) with publisher confirms, 2,000 in flight: the ceiling;
#   2. mailpumpd with [api] listen on a free loopback port and a tokens
#      file; its one worker (prefetch 1) takes one message and stalls on a
#      receiver that accepts connections and never greets, so the rest of
#      $tag.outbound stays in the queue, like a queue nobody consumes;
#   3. api_1: N1 messages (default N / 4) as single-message requests and
#      api_100: N messages in batches of 100, each from --clients
#      concurrent keep-alive clients (Python http.client threads); every
#      request must answer 202;
#   4. the queue's depth is checked against what was confirmed.
# Prints "BENCH api <metric> <value> <unit>": msgs/s of each and the
# ratios api_1/direct and api_100/direct. The client is Python: at batches
# of 1 its own CPU (on the same cores) is part of the figure.
set -euo pipefail

count=20000
count1=
clients=8
size=1024
max_seconds=120
keep=0

usage() {
    cat <<EOF
usage: tests/bench/run api [options]
  --count N         messages of the direct and the batch-of-100 runs (default $count)
  --count1 N        messages of the batch-of-1 run (default count / 4)
  --clients N       concurrent HTTP clients (default $clients)
  --size BYTES      text body size (default $size)
  --max-seconds S   hard bound on the whole benchmark (default $max_seconds)
  --keep            keep the work directory (logs)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
    --count) count=$2; shift 2 ;;
    --count1) count1=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --max-seconds) max_seconds=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "api.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ -n "$count1" ] || count1=$((count / 4))

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MAILPUMP_BUILD_DIR:-$root/build-bench}
stack_dir=${MP_STACK_DIR:-/tmp/mpstack}
PUB=$build/tests/bench_publish
DAEMON=$build/mailpumpd
PY=/usr/bin/python3
for f in "$PUB" "$DAEMON"; do
    [ -x "$f" ] || { echo "api.sh: $f is missing (build with -DMAILPUMP_BENCH=ON)" >&2; exit 2; }
done
[ -r "$stack_dir/env" ] || { echo "api.sh: $stack_dir/env missing: the stack is not up" >&2; exit 2; }
# shellcheck disable=SC1091
. "$stack_dir/env"

rid="$$x$(date +%s)"
tag="bench.api.$rid"
work=$(mktemp -d /tmp/mpbench-api.XXXXXX)
pids=()
log() { echo "api.sh: $*" >&2; }

. "$(dirname "$0")/common.bash"
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
start_time_bound api.sh

amqp=(--host "$MP_AMQP_HOST" --port "$MP_AMQP_PORT" --user "$MP_AMQP_USER" --password "$MP_AMQP_PASSWORD")

# 1. direct AMQP
out=$("$PUB" publish "${amqp[@]}" --queue "$tag.direct" --dead-queue "$tag.dead" --exchange "$tag.events" \
      --count "$count" --size "$size" --prefix "$tag-direct" --window 2000)
direct=$(sed -n 's/.*(\([0-9.]*\) msg\/s).*/\1/p' <<<"$out")
[ -n "$direct" ] || { log "bench_publish: $out"; exit 1; }

# 2. the daemon and a receiver that never greets
bport=$(free_port 127.0.0.2 127.0.0.3)
$PY - "$bport" >"$work/blackhole.log" 2>&1 <<'EOF' &
import socket, sys, time
socks = []
for a in ("127.0.0.2", "127.0.0.3"):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a, int(sys.argv[1]))); s.listen(64); socks.append(s)
time.sleep(3600)
EOF
pids+=($!)
api_port=$(free_port 127.0.0.1)
metrics_port=$(free_port 127.0.0.1)
token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf 'bench:%s\n' "$token" >"$work/tokens"
chmod 600 "$work/tokens"
env MAILPUMP_AMQP_HOST="$MP_AMQP_HOST" MAILPUMP_AMQP_PORT="$MP_AMQP_PORT" \
    MAILPUMP_AMQP_QUEUE="$tag.outbound" MAILPUMP_AMQP_DEAD_QUEUE="$tag.dead" \
    MAILPUMP_AMQP_EVENTS_EXCHANGE="$tag.events" MAILPUMP_RETRY_QUEUE_PREFIX="$tag.retry" \
    MAILPUMP_AMQP_PREFETCH=1 MAILPUMP_WORKER_COUNT=1 MAILPUMP_SMTP_PORT="$bport" \
    MAILPUMP_METRICS_LISTEN="127.0.0.1:$metrics_port" \
    MAILPUMP_API_LISTEN="127.0.0.1:$api_port" MAILPUMP_API_TOKENS_FILE="$work/tokens" \
    MAILPUMP_API_THREADS=4 MAILPUMP_LOG_LEVEL=warn \
    "$DAEMON" --config "$MP_MAILPUMPD_CONFIG" >"$work/mailpumpd.log" 2>&1 &
pids+=($!)
wait_for 30 "mailpumpd's API" $PY -c "import socket; socket.create_connection(('127.0.0.1', $api_port), 1)" 2>/dev/null \
    || { tail -20 "$work/mailpumpd.log" >&2; exit 1; }
sleep 1 # the publisher's connection

# 3. POST /v1/messages
cat >"$work/client.py" <<'EOF'
import http.client, json, sys, threading, time
port, token, batch, count, clients, size, prefix = sys.argv[1:8]
port, batch, count, clients, size = int(port), int(batch), int(count), int(clients), int(size)
text = "x" * size
reqs = count // batch
lock = threading.Lock()
state = {"next": 0, "bad": 0, "ok": 0}
def body(r):
    ms = [{"id": f"{prefix}-{r}-{i}", "from": "bench@test.example", "to": ["rcpt@test.example"],
           "subject": "bench", "text": text} for i in range(batch)]
    return json.dumps(ms if batch > 1 else ms[0])
def run():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    while True:
        with lock:
            r = state["next"]; state["next"] += 1
        if r >= reqs:
            break
        c.request("POST", "/v1/messages", body=body(r), headers=h)
        resp = c.getresponse(); data = resp.read()
        with lock:
            if resp.status == 202:
                state["ok"] += batch
            else:
                state["bad"] += 1
                if state["bad"] < 3:
                    print(resp.status, data[:300], file=sys.stderr)
    c.close()
t0 = time.time()
ts = [threading.Thread(target=run) for _ in range(clients)]
for t in ts: t.start()
for t in ts: t.join()
dt = time.time() - t0
print(f"{state['ok']} {state['bad']} {state['ok'] / dt:.0f}")
EOF
read -r ok1 bad1 api1 < <($PY "$work/client.py" "$api_port" "$token" 1 "$count1" "$clients" "$size" "$tag-b1")
read -r ok100 bad100 api100 < <($PY "$work/client.py" "$api_port" "$token" 100 "$count" "$clients" "$size" "$tag-b100")
if [ "$bad1" != 0 ] || [ "$bad100" != 0 ]; then
    log "requests not answered 202: $bad1 (batches of 1), $bad100 (batches of 100)"
    exit 1
fi

# 4. the queue holds what was confirmed (ready + the one unacked the stalled worker holds)
depth=$($PY - "$tag.outbound" <<'EOF'
import base64, json, os, sys, time, urllib.parse, urllib.request
env = dict(l.strip().split("=", 1) for l in open(os.environ.get("MP_STACK_DIR", "/tmp/mpstack") + "/env")
           if "=" in l and not l.startswith("#"))
auth = "Basic " + base64.b64encode(f"{env['MP_AMQP_USER']}:{env['MP_AMQP_PASSWORD']}".encode()).decode()
url = f"http://127.0.0.1:{env['MP_AMQP_MGMT_PORT']}/api/queues/%2F/" + urllib.parse.quote(sys.argv[1], safe="")
for _ in range(50):  # the management API's figures lag a few seconds
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": auth}), timeout=10) as r:
        q = json.loads(r.read())
    n = q.get("messages", 0)
    if n >= 1:
        break
    time.sleep(0.2)
print(n)
EOF
)
log "queue $tag.outbound holds $depth of $((ok1 + ok100)) confirmed"
[ "$depth" = $((ok1 + ok100)) ] || { log "the queue does not hold every confirmed message"; exit 1; }

ratio1=$($PY -c "print(f'{$api1 / $direct:.2f}')")
ratio100=$($PY -c "print(f'{$api100 / $direct:.2f}')")
echo "BENCH api direct_amqp $direct msg/s"
echo "BENCH api api_batch1 $api1 msg/s"
echo "BENCH api api_batch100 $api100 msg/s"
echo "BENCH api ratio_batch1_direct $ratio1 x"
echo "BENCH api ratio_batch100_direct $ratio100 x"
echo "BENCH api queue_depth $depth msgs"

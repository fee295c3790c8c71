# tests/bench/common.bash - what the engine benchmarks (smtp.sh, wide.sh) share:
# the private topology's removal, the EXIT trap, the hard time bound, free
# ports, polling, the receivers' counters, stopping a process. Sourced
# after the script has set PY, tag, work, keep, pids (an array),
# max_seconds and log() (and, if it keeps a list of live pids, forget()).

stop_pid() { # pid [seconds]: TERM, wait, then KILL; then forget pid, if the script has forget()
    local pid=$1 t=${2:-30} i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < t * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
    if declare -F forget >/dev/null; then forget "$pid"; fi
}

delete_topology() { # every queue and exchange named $tag.*
    $PY - "$tag" <<'EOF' || log "could not delete the private queues of $tag"
import base64, json, os, sys, urllib.parse, urllib.request
tag = sys.argv[1]
env = dict(l.strip().split("=", 1) for l in open(os.environ.get("MP_STACK_DIR", "/tmp/mpstack") + "/env")
           if "=" in l and not l.startswith("#"))
base = f"http://127.0.0.1:{env['MP_AMQP_MGMT_PORT']}/api"
auth = "Basic " + base64.b64encode(f"{env['MP_AMQP_USER']}:{env['MP_AMQP_PASSWORD']}".encode()).decode()
vh = urllib.parse.quote(env.get("MP_AMQP_VHOST", "/").strip('"'), safe="")
def call(method, path):
    req = urllib.request.Request(base + path, method=method, headers={"Authorization": auth})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")
for kind in ("queues", "exchanges"):
    for item in call("GET", f"/{kind}/{vh}?columns=name"):
        if item["name"].startswith(tag + "."):
            call("DELETE", f"/{kind}/{vh}/" + urllib.parse.quote(item["name"], safe=""))
EOF
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[i]}" 10
    done
    delete_topology
    if [ "$keep" = 1 ] || [ "$rc" != 0 ]; then
        log "work directory kept: $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}

free_port() { # a TCP port free on every address given
    $PY - "$@" <<'EOF'
import socket, sys
addrs = sys.argv[1:]
for _ in range(200):
    s0 = socket.socket(); s0.bind((addrs[0], 0)); port = s0.getsockname()[1]
    socks, ok = [s0], True
    for a in addrs[1:]:
        s = socket.socket()
        try:
            s.bind((a, port)); socks.append(s)
        except OSError:
            ok = False
    for s in socks:
        s.close()
    if ok:
        print(port); sys.exit(0)
sys.exit("no free port")
EOF
}

wait_for() { # seconds description command...: poll until the command succeeds
    local t=$1 what=$2 i
    shift 2
    for ((i = 0; i < t * 10; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    log "timed out after ${t}s waiting for $what"
    return 1
}

sink_stats() { # pid file: fresh counters via SIGUSR1
    rm -f "$2"
    kill -USR1 "$1"
    wait_for 10 "smtpsink stats" test -s "$2"
}

# start_time_bound NAME: a watchdog that ends the benchmark (TERM to $$)
# after max_seconds; its pid goes on pids and into watchdog
start_time_bound() {
    (
        trap 'kill "$sp" 2>/dev/null; exit 0' TERM
        sleep "$max_seconds" &
        sp=$!
        wait "$sp"
        echo "$1: time limit of ${max_seconds}s reached" >&2
        kill -TERM $$
    ) &
    watchdog=$!
    pids+=("$watchdog")
}

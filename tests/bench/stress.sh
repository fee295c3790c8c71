#!/usr/bin/env bash
# The whole path with mailpump stress: msg/s and latency percentiles, with and without Sent copies
#
# One mailpumpd (2 workers, the stack's config, private queues) against the
# stack's Postfix receivers and Dovecot; `mailpump stress --json` drives it.
# Runs, side by side in one session:
#   burst      STRESS_COUNT (default 2000) messages from a sender without an
#              IMAP account, as fast as confirms allow: delivered/s
#   burst_sent the same from a sender with an IMAP account (--append): each
#              message also gets its Sent copy
#   paced_sent STRESS_PACED (default 300) messages with Sent copies at
#              STRESS_RATE/s (default 30): the latency of one message
#   burst_sent_nobatch  burst_sent again on a daemon that sends one Sent
#              copy per APPEND ([imap] pool_max_batch = 1), for the
#              MULTIAPPEND ratio
# Prints "BENCH stress <run>_<metric> <value> <unit>" plus the daemon's CPU
# per message and peak RSS, and the ratio burst_sent / burst.
set -euo pipefail
cd "$(dirname "$0")/../.."
export MAILPUMP_SOURCE_DIR=$PWD
export MAILPUMP_BUILD_DIR=${MAILPUMP_BUILD_DIR:-$PWD/build-bench}
[ -x "$MAILPUMP_BUILD_DIR/mailpump" ] || { echo "stress.sh: $MAILPUMP_BUILD_DIR/mailpump not built" >&2; exit 2; }
exec /usr/bin/python3 - "${STRESS_COUNT:-2000}" "${STRESS_PACED:-300}" "${STRESS_RATE:-30}" <<'PY'
import json, os, subprocess, sys
sys.path.insert(0, os.path.join(os.environ["MAILPUMP_SOURCE_DIR"], "tests", "integration"))
import mpstack

count, paced, rate = (int(a) for a in sys.argv[1:4])
env = mpstack.stack_env()
d = mpstack.Daemon(env, workers=2)
d.start()

def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    cpu_ms = (int(fields[11]) + int(fields[12])) * 1000 / hz
    with open(f"/proc/{pid}/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    return cpu_ms, hwm

def run(name, *args):
    cpu0, _ = proc_stat(d.proc.pid)
    r = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpump"), "stress", "--json", "--timeout", "600", *args],
                       env=dict(d.proc_env), capture_output=True, text=True, timeout=700)
    cpu1, hwm = proc_stat(d.proc.pid)
    try:
        rep = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        sys.exit(f"stress.sh: run {name} gave no report (exit {r.returncode}): {r.stderr}")
    if r.returncode != 0:
        print(f"stress.sh: run {name}: exit {r.returncode}, missing {rep['missing']}", file=sys.stderr)
    lat = rep["latency_ms"]["appended" if "--append" in args else "delivered"]
    n = rep["delivered"]
    out = {"delivered_per_s": (rep["delivered_per_s"], "msg/s"),
           "latency_p50_ms": (lat["p50"], "ms"), "latency_p90_ms": (lat["p90"], "ms"),
           "latency_p99_ms": (lat["p99"], "ms"), "latency_max_ms": (lat["max"], "ms"),
           "missing": (rep["missing"], "msg"),
           "daemon_cpu_ms_per_msg": (round((cpu1 - cpu0) / n, 3) if n else 0, "ms"),
           "daemon_peak_rss_kib": (hwm, "KiB")}
    for k, (v, unit) in out.items():
        print(f"BENCH stress {name}_{k} {v} {unit}", flush=True)
    return rep

sent_args = ("--count", str(count), "--from", "alice@test.example", "--to-domain", "test.example",
             "--size", "10240", "--append")
try:
    b = run("burst", "--count", str(count), "--from", "carol@test.example", "--to-domain", "test.example",
            "--size", "10240")
    s = run("burst_sent", *sent_args)
    run("paced_sent", "--count", str(paced), "--rate", str(rate), "--from", "alice@test.example",
        "--to-domain", "test.example", "--size", "10240", "--append")
    if b["delivered_per_s"]:
        print(f"BENCH stress sent_copy_cost_ratio {s['delivered_per_s'] / b['delivered_per_s']:.2f} x")
finally:
    d.stop()

# the same burst with one Sent copy per APPEND ([imap] pool_max_batch = 1)
d = mpstack.Daemon(env, workers=2, extra_env={"MAILPUMP_IMAP_POOL_MAX_BATCH": "1"})
d.start()
try:
    n = run("burst_sent_nobatch", *sent_args)
    if n["delivered_per_s"]:
        print(f"BENCH stress multiappend_speedup {s['delivered_per_s'] / n['delivered_per_s']:.2f} x")
finally:
    d.stop()
PY

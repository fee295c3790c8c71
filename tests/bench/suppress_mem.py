#!/usr/bin/python3
"""Memory per suppression list entry (docs/operations.md#suppression-lists).

Fills throwaway hashes under mp:supbench:<random> on the stack's Redis
(MP_REDIS_HOST/PORT, default 127.0.0.1:6390) with 100,000 and 1,000,000
entries in the lists' layout (one hash, field = address, value = an encoded
entry: a manual one and an automatic one with a 550 reply), and for
comparison in buckets of about 250 entries (listpack), reports the
used_memory delta and MEMORY USAGE per entry, and deletes every key (DEL,
synchronous, so the next measurement starts from a settled heap).
"""
import os
import subprocess, uuid, zlib, sys
P = ["redis-cli", "-h", os.environ.get("MP_REDIS_HOST", "127.0.0.1"), "-p", os.environ.get("MP_REDIS_PORT", "6390")]
def cli(*a):
    return subprocess.run(P + list(a), capture_output=True, text=True, check=True).stdout.strip()
def used():
    for l in cli("info", "memory").splitlines():
        if l.startswith("used_memory:"):
            return int(l.split(":")[1])
def resp(*a):
    out = [f"*{len(a)}\r\n"]
    for x in a:
        b = x.encode()
        out.append(f"${len(b)}\r\n{x}\r\n")
    return "".join(out)
MANUAL = "1|1796694228|0|m|0|||manual|"
AUTO = "1|1796694228|0|a|550|5.1.1|8d0c7a52-3b41-4f7e-9c55-1f2e3d4c5b6a|no_such_user|5.1.1 <user@example.com>: Recipient address rejected: User unknown"
def settle():
    import time
    while True:
        lf = [l for l in cli("info", "memory").splitlines() if l.startswith("lazyfree_pending_objects:")]
        if not lf or lf[0].endswith(":0"):
            return
        time.sleep(0.1)
def run(n, value, buckets):
    settle()
    prefix = "mp:supbench:" + uuid.uuid4().hex[:8]
    before = used()
    cmds = []
    per = 1000
    def addr(i): return f"user{i:07d}@domain{i % 5000}.example"
    if buckets == 0:
        for s in range(0, n, per):
            args = ["HSET", prefix]
            for i in range(s, min(n, s + per)):
                args += [addr(i), value]
            cmds.append(resp(*args))
    else:
        for i in range(n):
            a = addr(i)
            cmds.append(resp("HSET", f"{prefix}:{zlib.crc32(a.encode()) % buckets}", a, value))
    subprocess.run(P + ["--pipe"], input="".join(cmds), capture_output=True, text=True, check=True)
    after = used()
    mu = None
    if buckets == 0:
        mu = int(cli("memory", "usage", prefix, "samples", "0"))
        enc = cli("object", "encoding", prefix)
    else:
        enc = cli("object", "encoding", f"{prefix}:0")
        mu = sum(int(cli("memory", "usage", f"{prefix}:{b}", "samples", "0")) for b in range(buckets))
    # delete
    if buckets == 0:
        cli("del", prefix)
    else:
        for s in range(0, buckets, 500):
            cli("del", *[f"{prefix}:{b}" for b in range(s, min(buckets, s + 500))])
    print(f"n={n} value={len(value)}B buckets={buckets} enc={enc} used_memory_delta={after-before} "
          f"per_entry={(after-before)/n:.1f} memory_usage={mu} per_entry_mu={(mu/n if mu else 0):.1f}", flush=True)
for n in (100000, 1000000):
    run(n, MANUAL, 0)
    run(n, AUTO, 0)
    run(n, MANUAL, n // 250)
print("leftover keys:", subprocess.run(P + ["--scan", "--pattern", "mp:supbench:*"], capture_output=True, text=True).stdout.strip() or "none")

"""Egress sources and pools, shaping rules and automation, on real services.

mailpumpd processes (private queues, the local stack's RabbitMQ and Redis)
relay to smtpsink receivers on their own loopback addresses; the sources
are other loopback addresses (127.0.0.21-127.0.0.26), and the receivers
record the peer address of every connection (maildir header
X-Smtpsink-Peer and the transcript), so each test proves which address
sent each message:

- a weighted pool splits 1,000 messages 3:1 within +-1.5 %, every event
  names the source that the receiver saw, each source says its own EHLO
  name, a message's pool and its tenant's pool choose, an unknown pool is
  dead-lettered;
- a source address that cannot be bound stops start-up and
  --check-config;
- a receiver answering "421 4.7.0 [TS01] ..." to one source triggers a
  suspend action that a second and a third mailpumpd honour through Redis
  (parked without an attempt when the pool has no other source, routed to
  the other source when it has), and that lapses on time;
- a fleet-wide connection limit holds for two processes of two workers.

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
from mpstack import redis_cli  # noqa: E402

SENDER = "bob@test.example"
PEER_RE = re.compile(rb"^X-Smtpsink-Peer: *([0-9a-fA-F.:]+)", re.M)
PEERLINE_RE = re.compile(r"^(\S+) PEER \[?([0-9a-fA-F.:]+?)\]?:\d+$")
MSGID_RE = re.compile(rb"^Message-ID: *<([^@>]+)@", re.M | re.I)


class Egress(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        redis_cli(cls.env, "PING")
        cls.dir = tempfile.mkdtemp(prefix="mp-egress-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def setUp(self):
        # actions and leases live under fixed keys: start and end clean
        redis_cli(self.env, "DEL", "mp:act", "mp:act@v")
        self.addCleanup(redis_cli, self.env, "DEL", "mp:act", "mp:act@v")

    # ---- helpers -------------------------------------------------------------

    def write(self, name, text):
        path = os.path.join(self.dir, f"{uuid.uuid4().hex[:6]}-{name}")
        with open(path, "w") as f:
            f.write(text)
        return path

    def sink(self, addr, extra=()):
        log = os.path.join(self.dir, f"sink-{uuid.uuid4().hex[:6]}.log")
        s = mpstack.Sink(addr=addr, extra=["--log", log, *extra])
        self.addCleanup(s.stop)
        return s

    def daemon(self, sink, egress=None, shaping=None, workers=1, **env):
        extra = {"MAILPUMP_SMTP_RELAY": f"{sink_addr(sink)}:{sink.port}", "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_LEVELS": "2s,1m"}
        if egress:
            extra["MAILPUMP_EGRESS_FILE"] = egress
        if shaping:
            extra["MAILPUMP_SHAPING_FILE"] = shaping
        extra.update({k: str(v) for k, v in env.items()})
        return mpstack.started_daemon(self, self.env, workers=workers, extra_env=extra)

    def publish(self, d, n, tag, rcpt="r{i}@relay.test", **fields):
        """n messages of one recipient each; returns their ids."""
        conn, ch = mpstack.amqp_channel(self.env)
        ids = []
        try:
            ch.confirm_delivery()
            for i in range(n):
                mid = f"{tag}-{i}-{uuid.uuid4().hex[:6]}"
                msg = {"id": mid, "from": SENDER, "to": [rcpt.format(i=i)], "subject": tag, "text": "hello",
                       **fields}
                ch.basic_publish(exchange="", routing_key=d.queue, body=json.dumps(msg).encode(),
                                 properties=pika.BasicProperties(delivery_mode=2, priority=5))
                ids.append(mid)
        finally:
            conn.close()
        return ids

    def peers(self, sink):
        """message id -> the address that sent it, from the receiver's maildir."""
        out = {}
        for m in sink.messages():
            p, i = PEER_RE.search(m), MSGID_RE.search(m)
            self.assertIsNotNone(p, m[:400])
            self.assertIsNotNone(i, m[:400])
            out[i.group(1).decode()] = p.group(1).decode()
        return out

    def connections_from(self, sink, addr):
        """(time, conn-id) of the receiver's connections from addr, in order."""
        return [cid for cid, peer in self.conn_peers(sink).items() if peer == addr]

    def conn_peers(self, sink):
        """conn-id -> the client address, from the transcript's PEER lines."""
        out = {}
        for line in sink.transcript():
            m = PEERLINE_RE.match(line)
            if m:
                out[m.group(1)] = m.group(2)
        return out

    # ---- 1. sources, pools, tenants ---------------------------------------------

    def test_weighted_pool_split_and_choice(self):
        sink = self.sink("127.0.0.50")
        egress = self.write("egress.ini", """
[source a]
address = 127.0.0.21
ehlo = a.mta.test

[source b]
address = 127.0.0.22
ehlo = b.mta.test

[pool bulk]
sources = a:3 b:1

[pool only-b]
sources = b

[tenant acme]
pool = only-b

[default]
pool = bulk
""")
        d, tap = self.daemon(sink, egress=egress, workers=2)
        ids = self.publish(d, 1000, "split")
        evs = tap.wait(lambda e: e["event"] == "delivered" and e["message_id"].startswith("split-"), 1000,
                       timeout=180)
        peers = self.peers(sink)
        sent = [peers[i] for i in ids]
        from_a = sent.count("127.0.0.21")
        from_b = sent.count("127.0.0.22")
        self.assertEqual(from_a + from_b, 1000, sorted(set(sent)))
        # smooth weighted round robin per worker: 3:1 within +-1.5 %
        self.assertTrue(735 <= from_a <= 765, (from_a, from_b))
        print(f"\n  weighted 3:1 over 1,000 messages: a {from_a}, b {from_b}", file=sys.stderr)
        for e in evs:
            self.assertIn(e["source"], ("a", "b"), e)
            self.assertEqual(e["source_addr"], {"a": "127.0.0.21", "b": "127.0.0.22"}[e["source"]], e)
            self.assertEqual(e["source_addr"], peers[e["message_id"]], e)
        # each source says its own name
        ehlo = {}
        conn_peer = self.conn_peers(sink)
        for line in sink.transcript():
            cid, _, rest = line.partition(" ")
            if rest.upper().startswith("EHLO ") and cid in conn_peer:
                ehlo.setdefault(conn_peer[cid], set()).add(rest.split(" ", 1)[1].strip())
        self.assertEqual(ehlo, {"127.0.0.21": {"a.mta.test"}, "127.0.0.22": {"b.mta.test"}})

        # the message's pool, then its tenant's, choose; an unknown pool is dead-lettered
        [p1] = self.publish(d, 1, "bypool", pool="only-b")
        [p2] = self.publish(d, 1, "bytenant", tenant="acme")
        [p3] = self.publish(d, 1, "unknown", pool="nope")
        got = tap.wait(lambda e: e["message_id"] in (p1, p2) and e["event"] == "delivered", 2, timeout=30)
        for e in got:
            self.assertEqual(e["source"], "b", e)
        dead = tap.wait(lambda e: e["message_id"] == p3 and e["event"] == "dead", 1, timeout=30)
        self.assertIn('unknown pool "nope"', dead[0]["error"])
        peers = self.peers(sink)
        self.assertEqual(peers[p1], "127.0.0.22")
        self.assertEqual(peers[p2], "127.0.0.22")
        self.assertNotIn(p3, peers)
        self.assertEqual(got[0].get("tenant") or got[1].get("tenant"), "acme")

    def test_unbindable_source_stops_start_up(self):
        egress = self.write("egress.ini", "[source far]\naddress = 192.0.2.1\n\n[pool p]\nsources = far\n")
        env = dict(os.environ, MAILPUMP_EGRESS_FILE=egress)
        r = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpumpd"), "--config",
                            self.env["MP_MAILPUMPD_CONFIG"], "--check-config"], env=env,
                           capture_output=True, text=True, timeout=30)
        self.assertNotEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("192.0.2.1", r.stderr)
        self.assertIn("cannot be bound", r.stderr)
        bad = self.write("egress.ini", "[source a]\naddress = 127.0.0.21\n\n[pool p]\nsources = a nobody\n")
        r = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpumpd"), "--config",
                            self.env["MP_MAILPUMPD_CONFIG"], "--check-config"],
                           env=dict(os.environ, MAILPUMP_EGRESS_FILE=bad), capture_output=True, text=True,
                           timeout=30)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("nobody", r.stderr)

    def test_warmup_volume_then_other_source_then_parked(self):
        sink = self.sink("127.0.0.53")
        today = time.strftime("%Y-%m-%d", time.gmtime())
        fresh = f"fresh{uuid.uuid4().hex[:6]}"  # its day's count in Redis is its own
        egress = self.write("egress.ini", f"""
[source {fresh}]
address = 127.0.0.25
warmup = 5 50
warmup_start = {today}

[source old]
address = 127.0.0.26

[pool both]
sources = {fresh}:3 old:1

[pool fresh-only]
sources = {fresh}

[default]
pool = fresh-only
""")
        self.addCleanup(lambda: [redis_cli(self.env, "DEL", k) for k in
                                 redis_cli(self.env, "KEYS", f"mp:wu:{fresh}:*").split()])
        d, tap = self.daemon(sink, egress=egress, workers=1)
        ids = self.publish(d, 8, "warm")
        got = tap.wait(lambda e: e["message_id"] in ids and e["event"] in ("delivered", "deferred"), 8,
                       timeout=60)
        delivered = [e for e in got if e["event"] == "delivered"]
        parked = [e for e in got if e["event"] == "deferred"]
        self.assertEqual(len(delivered), 5, got)  # day 1: 5 messages to the site
        for e in parked:
            self.assertEqual(e["reason"], "parked", e)
            self.assertIn("warm-up volume", e["error"], e)
        peers = self.peers(sink)
        self.assertEqual(sorted(set(peers[e["message_id"]] for e in delivered)), ["127.0.0.25"])
        # a pool with another source sends the rest through it
        ids = self.publish(d, 6, "warm2", pool="both")
        got = tap.wait(lambda e: e["message_id"] in ids and e["event"] == "delivered", 6, timeout=60)
        peers = self.peers(sink)
        self.assertEqual(sorted(set(peers[i] for i in ids)), ["127.0.0.26"])
        self.assertGreaterEqual(d.metric("mailpump_warmup_limited_total"), 3 + 6)

    # ---- 2. automation: a suspend shared by every process -----------------------

    def test_ts01_suspend_shared_and_lapses(self):
        sink = self.sink("127.0.0.51", extra=[
            "--reply-from", "127.0.0.23:mail:421 4.7.0 [TS01] Messages from 127.0.0.23 temporarily deferred"])
        egress_a = self.write("egress-a.ini", "[source a]\naddress = 127.0.0.23\n\n[pool p]\nsources = a\n\n"
                                              "[default]\npool = p\n")
        egress_ab = self.write("egress-ab.ini", "[source a]\naddress = 127.0.0.23\n\n[source b]\n"
                                                "address = 127.0.0.24\n\n[pool p]\nsources = a b\n\n"
                                                "[default]\npool = p\n")
        duration_s = 8
        shaping = self.write("shaping.ini", f"""
[automation yahoo-ts01]
site = 127.0.0.51
code = 421
match = \\[TS0[1-3]\\]
action = suspend
duration = {duration_s}s
""")
        d1, tap1 = self.daemon(sink, egress=egress_a, shaping=shaping)
        d2, tap2 = self.daemon(sink, egress=egress_a, shaping=shaping)
        d3, tap3 = self.daemon(sink, egress=egress_ab, shaping=shaping)

        # the trigger: d1's first message is deferred by the receiver
        [t1] = self.publish(d1, 1, "trigger")
        ev = tap1.wait(lambda e: e["message_id"] == t1 and e["event"] == "deferred", 1, timeout=30)[0]
        triggered = time.time()
        self.assertEqual(ev["smtp"]["code"], 421, ev)
        self.assertIn("[TS01]", ev["smtp"]["text"])
        self.assertEqual(ev["source"], "a")
        self.assertIn("mp:act", redis_cli(self.env, "KEYS", "mp:act"))
        conns_a = len(self.connections_from(sink, "127.0.0.23"))
        self.assertGreaterEqual(conns_a, 1)

        # within a second, another process parks a's messages without an attempt
        time.sleep(1.2)
        ids2 = self.publish(d2, 5, "parked")
        evs = tap2.wait(lambda e: e["message_id"] in ids2 and e["event"] == "deferred", 5, timeout=20)
        for e in evs:
            self.assertEqual(e["reason"], "suspended", e)
            self.assertNotIn("smtp", e)
            self.assertIn("yahoo-ts01", e.get("shaping", ""), e)
            self.assertEqual(e["attempt"], 1, e)
        # and a third, whose pool has another source, sends through that one
        ids3 = self.publish(d3, 6, "around")
        evs = tap3.wait(lambda e: e["message_id"] in ids3 and e["event"] == "delivered", 6, timeout=30)
        for e in evs:
            self.assertEqual(e["source"], "b", e)
        self.assertEqual(len(self.connections_from(sink, "127.0.0.23")), conns_a,
                         "a connection from the suspended source")
        self.assertLess(time.time() - triggered, duration_s - 1, "the test ran past the suspension")

        # the suspension lapses: after it, a is used again (and deferred again)
        time.sleep(max(0.0, triggered + duration_s + 1.5 - time.time()))
        ids4 = self.publish(d2, 1, "after")
        ev = tap2.wait(lambda e: e["message_id"] in ids4 and e["event"] == "deferred", 1, timeout=20)[0]
        self.assertEqual(ev["smtp"]["code"], 421, ev)
        self.assertGreater(len(self.connections_from(sink, "127.0.0.23")), conns_a)
        for d in (d1, d2, d3):
            self.assertGreaterEqual(d.metric("mailpump_shaping_actions_active"), 0)

    def test_bounce_and_rate_actions(self):
        sink = self.sink("127.0.0.54", extra=["--rule", "rcpt:blocked*@*=550 5.7.1 [BL21] listed",
                                              "--rule", "cmd:MAIL#1=451 4.7.1 [RL7] slow down"])
        shaping = self.write("shaping.ini", """
[automation listed]
code = 5
match = \\[BL21\\]
action = bounce
duration = 6s

[automation slow]
enhanced = 4.7.1
match = \\[RL7\\]
action = rate=2/s
duration = 30s
""")
        d, tap = self.daemon(sink, shaping=shaping)
        # the first MAIL is deferred [RL7]: the rate drops to 2/s
        [t] = self.publish(d, 1, "slowtrigger")
        ev = tap.wait(lambda e: e["message_id"] == t and e["event"] == "deferred", 1, timeout=30)[0]
        self.assertEqual(ev.get("shaping"), "triggered:rate:automation:slow", ev)
        ids = self.publish(d, 6, "slowed")
        evs = tap.wait(lambda e: e["message_id"] in ids and e["event"] == "delivered", 6, timeout=60)
        ts = sorted(e["ts"] for e in evs)
        span = (parse_ts(ts[-1]) - parse_ts(ts[0]))
        self.assertGreaterEqual(span, 2.2, ts)  # 6 messages 0.5 s apart
        for e in evs:
            self.assertEqual(e.get("shaping"), "rate:automation:slow", e)

        # a 5xx [BL21] bounces the site's messages for 6 s, none sent
        [b] = self.publish(d, 1, "bltrigger", rcpt="blocked{i}@relay.test")
        ev = tap.wait(lambda e: e["message_id"] == b and e["event"] == "bounced", 1, timeout=30)[0]
        triggered = time.time()
        self.assertEqual(ev["smtp"]["code"], 550, ev)
        self.assertEqual(ev.get("shaping"), "triggered:bounce:automation:listed", ev)
        before = len(sink.messages())
        ids = self.publish(d, 3, "bounced")
        evs = tap.wait(lambda e: e["message_id"] in ids and e["event"] == "bounced", 3, timeout=30)
        for e in evs:
            self.assertEqual(e["reason"], "shaping", e)
            self.assertNotIn("smtp", e)
            self.assertIn("bounce:site:127.0.0.54", e["error"], e)
            self.assertEqual(e.get("shaping"), "bounce:automation:listed", e)
        self.assertEqual(len(sink.messages()), before)
        self.assertLess(time.time() - triggered, 5)
        # it lapses: the next message is delivered
        time.sleep(max(0.0, triggered + 6.5 - time.time()))
        [a] = self.publish(d, 1, "afterbl")
        tap.wait(lambda e: e["message_id"] == a and e["event"] == "delivered", 1, timeout=30)

    # ---- 3. a fleet-wide connection limit ---------------------------------------

    def test_connection_limit_two_processes(self):
        sink = self.sink("127.0.0.52", extra=["--rule", "delay:DOT=200"])
        shaping = self.write("shaping.ini", "[site 127.0.0.52]\nconnection_limit = 3\n")
        d1, tap1 = self.daemon(sink, shaping=shaping, workers=2)
        d2, tap2 = self.daemon(sink, shaping=shaping, workers=2)
        time.sleep(2.5)  # two lease renewals: every worker has heard of the others
        ids1 = self.publish(d1, 60, "cl1")
        ids2 = self.publish(d2, 60, "cl2")
        tap1.wait(lambda e: e["message_id"] in ids1 and e["event"] == "delivered", 60, timeout=120)
        tap2.wait(lambda e: e["message_id"] in ids2 and e["event"] == "delivered", 60, timeout=120)
        st = sink.read_stats()
        print(f"\n  connection limit 3, 2 processes x 2 workers: receiver's open_peak {st['open_peak']}",
              file=sys.stderr)
        self.assertLessEqual(st["open_peak"], 3, st)
        self.assertGreaterEqual(st["open_peak"], 2, st)  # both processes used their shares


def parse_ts(ts):
    """An event's ts (UTC, milliseconds) as Unix seconds."""
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def sink_addr(sink):
    args = list(sink.proc.args)
    return args[args.index("--listen") + 1].rsplit(":", 1)[0]


if __name__ == "__main__":
    unittest.main(verbosity=2)

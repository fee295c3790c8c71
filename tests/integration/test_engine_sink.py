"""The delivery engine against the fault-injecting receiver tests/tools/smtpsink.

The SMTP engine's rules, proven end to end: mailpumpd (private queues, one
worker) delivers to an smtpsink that stands in for the MX hosts of the
local stack's DNS zone (test.example MX 10 mx1 = 127.0.0.2, MX 20 mx2 =
127.0.0.3; failover.test.example MX 10 down = 127.0.0.4, MX 20 mx2). The
engine connects to every MX on MAILPUMP_SMTP_PORT, which is the sink's
port. Each test asserts the events and the sink's transcript (--log) and
counters (--stats-file): pipelined transcript, split transactions, each
failure class, pool reuse and idle-close detection, TLS session
resumption, MX failover, relay with AUTH.

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import base64
import datetime
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

CA_DIR = os.path.join(mpstack.STACK_DIR, "ca")
CA_FILE = os.path.join(CA_DIR, "ca.crt")
CERT = os.path.join(CA_DIR, "server.crt")  # SANs mx1/mx2.test.example, 127.0.0.2/3
KEY = os.path.join(CA_DIR, "server.key")
SENDER = "bob@test.example"


def commands(lines, conn=None):
    """The commands of a transcript (not the "+event" and "PEER" lines), of
    one connection or of all."""
    out = []
    for line in lines:
        cid, _, rest = line.partition(" ")
        if rest.startswith(("+", "PEER ")) or (conn is not None and cid != str(conn)):
            continue
        out.append(rest)
    return out


def conn_ids(lines):
    """The engine's connections. The sink's first connection is
    mpstack.Sink's readiness probe (connect, close, no command): checked
    and left out."""
    ids = [line.split(" ", 1)[0] for line in lines if " +connect " in line]
    assert ids and ids[0] == "1" and commands(lines, "1") == [], lines
    return ids[1:]


def engine_stats(sink):
    """The sink's counters, the readiness probe's connection taken off."""
    st = sink.read_stats()
    st["connections"] -= 1
    return st


def verbs(cmds):
    return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in cmds]


class EngineSink(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        for p in (CA_FILE, CERT, KEY):
            if not os.path.exists(p):
                raise RuntimeError(f"{p} is missing: the local stack is not up")

    # ---- helpers -------------------------------------------------------------

    def sink(self, addr="127.0.0.2", rules=(), extra=(), tls=False):
        """An smtpsink with a transcript; stopped at cleanup."""
        d = tempfile.mkdtemp(prefix="mp-es-")
        self.addCleanup(shutil.rmtree, d, True)
        args = ["--log", os.path.join(d, "transcript.log")]
        if tls:
            args += ["--cert", CERT, "--key", KEY]
        s = mpstack.Sink(addr=addr, rules=list(rules), extra=args + list(extra))
        self.addCleanup(s.stop)
        return s

    def daemon(self, port, workers=1, **env):
        """mailpumpd, one worker unless told, no IMAP, delivering to port;
        returns it started together with an event tap declared before any
        enqueue."""
        extra = {"MAILPUMP_SMTP_PORT": str(port), "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_LEVELS": "1m"}
        extra.update({k: str(v) for k, v in env.items()})
        return mpstack.started_daemon(self, self.env, workers=workers, extra_env=extra)

    def stop_daemon(self, d):
        if d.proc is not None and d.proc.poll() is None:
            self.assertEqual(d.stop(), 0, d.log()[-3000:])

    def enqueue(self, d, rcpts, text="hello", **kw):
        args = ["enqueue", "--from", SENDER, "--text", text, "--subject", "engine-sink"]
        for r in rcpts:
            args += ["--to", r]
        for k, v in kw.items():
            args += [f"--{k}", str(v)]
        r = d.cli(*args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def wait_final(self, tap, mid, n, timeout=20):
        """The n per-recipient events of message mid."""
        return tap.wait(lambda e: e.get("message_id") == mid and "recipient" in e, n, timeout)

    def delivered_spread(self, tap, mids):
        """Seconds between the first and the last delivered event of mids
        (the events' own ts), waiting for each."""
        delivered = []
        for mid in mids:
            delivered += tap.wait(lambda e, m=mid: e.get("message_id") == m and e.get("event") == "delivered",
                                  1, timeout=60)
        stamps = sorted(datetime.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
                        for e in delivered)
        return stamps[-1] - stamps[0]

    def wait_closed(self, sink, n, timeout=10):
        """Until the transcript shows n closed connections (the
        readiness probe's included)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            t = sink.transcript()
            if sum(1 for line in t if line.endswith(" +close")) >= n:
                return t
            time.sleep(0.05)
        self.fail(f"expected {n} closed connections: {sink.transcript()}")

    # ---- 1. pipelining -------------------------------------------------------

    def test_pipelined_envelope_in_one_group(self):
        # MAIL refused once: a lock-step client would stop there; the
        # transcript still shows the RCPTs and DATA after it, so they were
        # written before MAIL's reply was read (RFC 2920). The retry then
        # reuses the same connection.
        sink = self.sink(rules=["cmd:MAIL#1=451 4.3.0 try again later"])
        d, tap = self.daemon(sink.port, MAILPUMP_RETRY_LEVELS="300ms",
                             MAILPUMP_RETRY_P0_BASE="300ms", MAILPUMP_RETRY_P1_BASE="300ms",
                             MAILPUMP_RETRY_P2_BASE="300ms")
        rcpts = ["p1@test.example", "p2@test.example", "p3@test.example"]
        mid = self.enqueue(d, rcpts)
        evs = self.wait_final(tap, mid, 6)
        by = sorted((e["attempt"], e["event"], e["recipient"]) for e in evs)
        self.assertEqual(by, [(1, "deferred", r) for r in rcpts] + [(2, "delivered", r) for r in rcpts])
        for e in evs:
            if e["event"] == "deferred":
                self.assertEqual(e["smtp"]["code"], 451)
                self.assertEqual(e["smtp"]["enhanced"], "4.3.0")
            self.assertEqual(e["mx_host"], "mx1.test.example")
        self.stop_daemon(d)  # QUITs the pooled session
        t = self.wait_closed(sink, 2)
        self.assertEqual(conn_ids(t), ["2"], t)
        envelope = [f"MAIL FROM:<{SENDER}>"] + [f"RCPT TO:<{r}>" for r in rcpts] + ["DATA"]
        self.assertEqual(commands(t), ["EHLO mailpump.test.example"] + envelope + envelope + ["QUIT"])
        self.assertEqual(sum(1 for line in t if " +data " in line), 1, t)
        st = engine_stats(sink)
        self.assertEqual((st["connections"], st["messages"], st["recipients_accepted"]), (1, 1, 3))
        self.assertEqual(st["rules"][0]["fired"], 1)
        self.assertEqual(len(sink.messages()), 1)

    # ---- 2. split transactions -----------------------------------------------

    def test_split_transactions_on_one_connection(self):
        sink = self.sink()
        d, tap = self.daemon(sink.port, MAILPUMP_SMTP_MAX_RCPTS=2)
        rcpts = [f"s{i}@test.example" for i in range(1, 6)]
        mid = self.enqueue(d, rcpts)
        evs = self.wait_final(tap, mid, 5)
        self.assertEqual(sorted((e["event"], e["recipient"], e["attempt"]) for e in evs),
                         [("delivered", r, 1) for r in rcpts])
        t = sink.transcript()
        self.assertEqual(conn_ids(t), ["2"], t)
        v = verbs(commands(t))
        self.assertEqual(v, ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "RCPT", "DATA",
                             "MAIL", "RCPT", "DATA"], t)
        got = []
        for m in sink.messages():
            got.append(sorted(x.decode() for x in re.findall(rb"X-Sink-Rcpt-To: <([^>]+)>", m)))
        self.assertEqual(sorted(got), [rcpts[0:2], rcpts[2:4], rcpts[4:5]])
        st = engine_stats(sink)
        self.assertEqual((st["connections"], st["messages"], st["recipients_accepted"]), (1, 3, 5))

    # ---- 3. failure classes --------------------------------------------------

    def test_each_failure_class(self):
        sink = self.sink(rules=[
            "rcpt:nouser@test.example=550 5.1.1 no such user",
            "rcpt:full@test.example=552 5.2.2 mailbox full",
            "rcpt:grey@test.example=450 4.7.1 greylisted, try again later",
            "rcpt:rate@test.example=421 4.7.0 rate limit exceeded",
            "rcpt:spam@test.example=554 5.7.1 message rejected as spam",
            "rcpt:big@test.example=552 5.3.4 message too big",
        ], extra=["--size", "4000"])
        # max_mx 1: the 421 is the attempt's last word (no second MX listens)
        d, tap = self.daemon(sink.port, MAILPUMP_SMTP_MAX_MX=1,
                             MAILPUMP_RETRY_P0_FAST_RETRIES=0, MAILPUMP_RETRY_P1_FAST_RETRIES=0,
                             MAILPUMP_RETRY_P2_FAST_RETRIES=0)
        mixed = ["ok@test.example", "nouser@test.example", "full@test.example",
                 "grey@test.example", "spam@test.example", "big@test.example"]
        m1 = self.enqueue(d, mixed)
        m2 = self.enqueue(d, ["rate@test.example"])  # 421 hangs up: its own message
        m3 = self.enqueue(d, ["x@nxdomain.test.example"])
        m4 = self.enqueue(d, ["x@down.test.example"])  # implicit MX 127.0.0.4: refused
        # larger than the server's SIZE: refused locally, never sent
        m5 = self.enqueue(d, ["huge@test.example"], text="y" * 6000)
        evs = self.wait_final(tap, m1, 6) + self.wait_final(tap, m2, 1) + \
            self.wait_final(tap, m3, 1) + self.wait_final(tap, m4, 1) + self.wait_final(tap, m5, 1)
        got = {e["recipient"]: (e["event"], e["reason"]) for e in evs}
        self.assertEqual(got, {
            "ok@test.example": ("delivered", "delivered"),
            "nouser@test.example": ("bounced", "no_such_user"),
            "full@test.example": ("bounced", "mailbox_full"),
            "grey@test.example": ("deferred", "greylisted"),
            "spam@test.example": ("bounced", "spam"),
            "big@test.example": ("bounced", "message_too_big"),
            "rate@test.example": ("deferred", "rate_limited"),
            "x@nxdomain.test.example": ("bounced", "dns"),
            "x@down.test.example": ("deferred", "network"),
            "huge@test.example": ("bounced", "message_too_big"),
        })
        codes = {e["recipient"]: (e["smtp"]["code"], e["smtp"]["enhanced"]) for e in evs if "smtp" in e}
        self.assertEqual(codes["nouser@test.example"], (550, "5.1.1"))
        self.assertEqual(codes["full@test.example"], (552, "5.2.2"))
        self.assertEqual(codes["grey@test.example"], (450, "4.7.1"))
        self.assertEqual(codes["rate@test.example"], (421, "4.7.0"))
        self.assertEqual(codes["spam@test.example"], (554, "5.7.1"))
        self.assertEqual(codes["big@test.example"], (552, "5.3.4"))
        self.assertEqual(codes["huge@test.example"], (552, "5.3.4"))
        for e in evs:
            self.assertEqual(e["attempt"], 1, e)
            if e["event"] == "deferred":
                self.assertGreater(e["retry_in_ms"], 0, e)
        # no server answered for DNS and network failures
        self.assertNotIn("x@nxdomain.test.example", codes)
        self.assertNotIn("x@down.test.example", codes)
        msgs = sink.messages()
        self.assertEqual(len(msgs), 1)
        self.assertEqual(re.findall(rb"X-Sink-Rcpt-To: <([^>]+)>", msgs[0]), [b"ok@test.example"])
        self.assertFalse([c for c in commands(sink.transcript()) if "huge@" in c])

    def test_connection_dropped_mid_transaction_is_network(self):
        sink = self.sink(rules=["drop:RCPT"])
        d, tap = self.daemon(sink.port, MAILPUMP_SMTP_MAX_MX=1,
                             MAILPUMP_RETRY_P0_FAST_RETRIES=0, MAILPUMP_RETRY_P1_FAST_RETRIES=0,
                             MAILPUMP_RETRY_P2_FAST_RETRIES=0)
        mid = self.enqueue(d, ["d1@test.example", "d2@test.example"])
        evs = self.wait_final(tap, mid, 2)
        self.assertEqual(sorted((e["recipient"], e["event"], e["reason"], e["attempt"]) for e in evs),
                         [("d1@test.example", "deferred", "network", 1),
                          ("d2@test.example", "deferred", "network", 1)])
        for e in evs:
            self.assertNotIn("smtp", e)  # the recipients got no answer
            self.assertEqual(e["mx_host"], "mx1.test.example")
        t = self.wait_closed(sink, 2)
        self.assertEqual(conn_ids(t), ["2"], t)
        self.assertEqual(verbs(commands(t)), ["EHLO", "MAIL", "RCPT"], t)
        self.assertIn("2 +drop RCPT", t)
        self.assertEqual(engine_stats(sink)["messages"], 0)

    # ---- 4. pool reuse, idle close ---------------------------------------------

    def test_pool_reuse_and_server_idle_close(self):
        # the sink closes connections idle for 1.5 s; the engine would keep
        # them 5 s (pool_idle_ms default)
        sink = self.sink(extra=["--timeout", "1500"])
        d, tap = self.daemon(sink.port)
        m1 = self.enqueue(d, ["r1@test.example"])
        e1 = self.wait_final(tap, m1, 1)[0]
        m2 = self.enqueue(d, ["r2@test.example"])
        e2 = self.wait_final(tap, m2, 1)[0]
        self.assertEqual(engine_stats(sink)["connections"], 1)
        t = self.wait_closed(sink, 2, timeout=5)  # the sink's idle timeout
        self.assertEqual(commands(t), ["EHLO mailpump.test.example",
                                       f"MAIL FROM:<{SENDER}>", "RCPT TO:<r1@test.example>", "DATA",
                                       f"MAIL FROM:<{SENDER}>", "RCPT TO:<r2@test.example>", "DATA"], t)
        time.sleep(0.3)
        m3 = self.enqueue(d, ["r3@test.example"])
        e3 = self.wait_final(tap, m3, 1)[0]
        for e in (e1, e2, e3):
            self.assertEqual((e["event"], e["attempt"]), ("delivered", 1), e)
        tap.drain(0.3)
        self.assertEqual([e for e in tap.events if e["event"] != "delivered"], [])
        st = engine_stats(sink)
        self.assertEqual((st["connections"], st["messages"]), (2, 3))
        t = sink.transcript()
        self.assertEqual(conn_ids(t), ["2", "3"], t)
        self.assertEqual(commands(t, 3), ["EHLO mailpump.test.example", f"MAIL FROM:<{SENDER}>",
                                          "RCPT TO:<r3@test.example>", "DATA"], t)

    # ---- 5. TLS session resumption -------------------------------------------

    def test_starttls_sessions_resumed(self):
        sink = self.sink(tls=True)
        d, tap = self.daemon(sink.port, MAILPUMP_SMTP_TLS="verify", MAILPUMP_SMTP_CA_FILE=CA_FILE,
                             MAILPUMP_SMTP_POOL=0)
        evs = []
        for i in range(3):
            mid = self.enqueue(d, [f"t{i}@test.example"])
            evs += self.wait_final(tap, mid, 1)
        for e in evs:
            self.assertEqual((e["event"], e["attempt"]), ("delivered", 1), e)
            self.assertEqual(e["tls"]["version"], "TLSv1.3", e)
            self.assertTrue(e["tls"]["cipher"], e)
        t = self.wait_closed(sink, 4)
        self.assertEqual(conn_ids(t), ["2", "3", "4"], t)
        for c in ("2", "3", "4"):
            self.assertEqual(verbs(commands(t, c)), ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT",
                                                     "DATA", "QUIT"], t)
        resumed = [line.split(" ", 1)[0] + ":" + line.rsplit("=", 1)[1]
                   for line in t if " +tls " in line]
        self.assertEqual(resumed, ["2:0", "3:1", "4:1"], t)
        st = engine_stats(sink)
        self.assertEqual((st["tls_handshakes"], st["tls_full"], st["tls_resumed"]), (3, 1, 2))

    # ---- 6. MX failover --------------------------------------------------------

    def test_failover_to_second_mx(self):
        sink = self.sink(addr="127.0.0.3")
        d, tap = self.daemon(sink.port)
        mid = self.enqueue(d, ["f@failover.test.example"])
        e = self.wait_final(tap, mid, 1)[0]
        self.assertEqual((e["event"], e["attempt"]), ("delivered", 1), e)
        self.assertEqual((e["mx_host"], e["mx_addr"]), ("mx2.test.example", "127.0.0.3"))
        tap.drain(0.2)
        self.assertEqual([x["event"] for x in tap.events], ["delivered"])
        self.assertEqual(len(sink.messages()), 1)

    def test_dead_mx_learned_once_by_every_worker(self):
        """Two workers share the route penalty table: the dead first MX is
        marked down once, and the messages either worker takes afterwards
        skip it without connecting."""
        sink = self.sink(addr="127.0.0.3")
        d, tap = self.daemon(sink.port, workers=2, MAILPUMP_SMTP_ROUTE_PENALTY="60s")
        for i in range(6):  # one at a time: the workers take turns
            mid = self.enqueue(d, [f"w{i}@failover.test.example"])
            e = self.wait_final(tap, mid, 1)[0]
            self.assertEqual((e["event"], e["mx_addr"]), ("delivered", "127.0.0.3"), e)
        self.assertEqual(d.metric("mailpump_smtp_routes_marked_down_total"), 1)
        self.assertEqual(d.metric("mailpump_smtp_route_skips_total"), 5)
        workers = set(re.findall(r"worker=(\d+)", " ".join(
            line for line in d.log().splitlines() if "event=message_received" in line)))
        self.assertEqual(len(workers), 2, "both workers took messages")

    def test_dead_first_mx_costs_one_connect(self):
        """failover.test.example's first MX (down.test.example) refuses: the
        first message finds out and goes to mx2, the next four skip the
        dead address without connecting (route penalty)."""
        sink = self.sink(addr="127.0.0.3")
        d, tap = self.daemon(sink.port, MAILPUMP_SMTP_ROUTE_PENALTY="60s")
        mids = [self.enqueue(d, [f"r{i}@failover.test.example"]) for i in range(5)]
        for mid in mids:
            e = self.wait_final(tap, mid, 1)[0]
            self.assertEqual((e["event"], e["mx_addr"]), ("delivered", "127.0.0.3"), e)
        self.assertEqual(d.metric("mailpump_smtp_routes_marked_down_total"), 1)
        self.assertEqual(d.metric("mailpump_smtp_route_skips_total"), 4)
        downs = [line for line in d.log().splitlines() if "event=route_down" in line]
        self.assertEqual(len(downs), 1, downs)
        self.assertIn('mx="down.test.example" addr=127.0.0.4|', downs[0])
        self.assertIn("Connection refused", downs[0])

    def test_rate_limit_spaces_messages_and_defers_the_rest(self):
        """[smtp] rate_limits test.example:4/s across 2 workers: 12 messages
        enqueued at once are sent 250 ms apart (the last at least 2.75 s
        after the first). Those whose slot is more than rate_limit_max_wait
        (1 s) away are deferred with the rule and the wait, come back from
        the retry queue no sooner, and are delivered."""
        sink = self.sink()
        d, tap = self.daemon(sink.port, workers=2, MAILPUMP_SMTP_RATE_LIMITS="test.example:4/s",
                             MAILPUMP_SMTP_RATE_LIMIT_MAX_WAIT="1s", MAILPUMP_RETRY_LEVELS="300ms,1s,2s,4s",
                             MAILPUMP_RETRY_P0_BASE="300ms", MAILPUMP_RETRY_P1_BASE="300ms",
                             MAILPUMP_RETRY_P2_BASE="300ms")
        mids = [self.enqueue(d, [f"rl{i}@test.example"]) for i in range(12)]
        spread = self.delivered_spread(tap, mids)
        # 2.75 s when spaced exactly (the events' clock adds jitter); 0.3 s unlimited
        self.assertGreaterEqual(spread, 11 * 0.25 * 0.8, f"12 messages within {spread:.2f} s")
        deferred = [e for e in tap.events if e.get("event") == "deferred"]
        self.assertGreater(len(deferred), 0, "none waited long enough to be deferred")
        for e in deferred:
            self.assertEqual(e["reason"], "rate_limited", e)
            self.assertIn("local rate limit test.example:4/s: next free slot in ", e["error"])
        # waiting for a slot spends no attempt (it asked no server)
        attempts = sorted({e["attempt"] for e in tap.events
                           if e.get("event") in ("delivered", "deferred") and e["message_id"] in mids})
        self.assertEqual(attempts, [1])
        self.assertGreater(d.metric("mailpump_rate_limit_waits_total"), 0)
        self.assertEqual(d.metric("mailpump_rate_limit_deferred_total"), len(deferred))
        self.assertEqual(len(sink.messages()), 12)
        # another domain is not limited
        mid = self.enqueue(d, ["free@nomx.test.example"])
        self.assertEqual(self.wait_final(tap, mid, 1)[0]["event"], "delivered")
        print(f"\nrate limit 4/s: 12 delivered over {spread:.2f} s, {len(deferred)} deferrals",
              file=sys.stderr)

    def test_rate_limit_is_one_budget_for_the_fleet(self):
        """Two mailpumpd processes on the same queues share a rule's budget
        through Redis: 12 messages under test.example:5/s take at least
        2.2 s in all, where two separate budgets would let them through in
        about half that. (The process's own table is the fallback while
        Redis cannot answer.)"""
        sink = self.sink()
        env = dict(MAILPUMP_SMTP_RATE_LIMITS="test.example:5/s", MAILPUMP_SMTP_RATE_LIMIT_MAX_WAIT="10s")
        d, tap = self.daemon(sink.port, **env)
        extra = {"MAILPUMP_SMTP_PORT": str(sink.port), "MAILPUMP_SMTP_TLS": "none", "MAILPUMP_IMAP_HOST": "",
                 "MAILPUMP_RETRY_LEVELS": "1m", **env}
        d2 = mpstack.Daemon(self.env, workers=1, extra_env=extra, queues_of=d)
        d2.start()
        self.addCleanup(self.stop_daemon, d2)
        mids = [self.enqueue(d, [f"fl{i}@test.example"]) for i in range(12)]
        spread = self.delivered_spread(tap, mids)
        # 2.2 s when spaced exactly; 1.0 s with two budgets of 6 each
        self.assertGreaterEqual(spread, 11 * 0.2 * 0.8, f"12 messages within {spread:.2f} s")
        taken = [len(re.findall(r"event=message_received", x.log())) for x in (d, d2)]
        self.assertTrue(all(n > 0 for n in taken), f"both processes took messages: {taken}")
        self.assertEqual(d.metric("mailpump_rate_limit_redis_errors_total"), 0)
        self.assertEqual(d2.metric("mailpump_rate_limit_redis_errors_total"), 0)
        print(f"\nrate limit 5/s over two processes {taken}: 12 delivered over {spread:.2f} s",
              file=sys.stderr)

    def test_rate_limit_without_redis_answers_uses_the_process_budget(self):
        """A Redis that accepts connections and never answers: every budget
        request times out, the process's own table answers instead
        (mailpump_rate_limit_redis_errors_total), and the messages are still
        spaced by the rule."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        self.addCleanup(silent.close)
        held = []

        def accept_and_hold():
            while True:
                try:
                    c, _ = silent.accept()
                except OSError:
                    return
                held.append(c)  # read nothing, answer nothing

        threading.Thread(target=accept_and_hold, daemon=True).start()
        self.addCleanup(lambda: [c.close() for c in held])
        sink = self.sink()
        # the ledger's marks time out too: by default their copies would be
        # deferred (test_lifecycle.RedisOutage); this test is about the
        # rate budget, so the copies go unrecorded
        d, tap = self.daemon(sink.port, MAILPUMP_SMTP_RATE_LIMITS="test.example:6/s",
                             MAILPUMP_SMTP_RATE_LIMIT_MAX_WAIT="10s",
                             MAILPUMP_REDIS_HOST="127.0.0.1", MAILPUMP_REDIS_PORT=silent.getsockname()[1],
                             MAILPUMP_REDIS_SEND_UNRECORDED="1")
        mids = [self.enqueue(d, [f"nr{i}@test.example"]) for i in range(6)]
        self.assertGreaterEqual(self.delivered_spread(tap, mids), 5 / 6 * 0.8)
        # each request that reached the silent Redis timed out and fell back
        self.assertGreater(d.metric("mailpump_rate_limit_redis_errors_total"), 0)

    # ---- 7. relay with AUTH ----------------------------------------------------

    def test_relay_auth_after_starttls(self):
        sink = self.sink(tls=True, extra=["--auth-user", "relayuser:s3cret-pw"])
        relay = f"127.0.0.2:{sink.port}"
        good, good_tap = self.daemon(sink.port, MAILPUMP_SMTP_RELAY=relay, MAILPUMP_SMTP_TLS="verify",
                                     MAILPUMP_SMTP_CA_FILE=CA_FILE,
                                     MAILPUMP_SMTP_RELAY_USER="relayuser",
                                     MAILPUMP_SMTP_RELAY_PASSWORD="s3cret-pw")
        bad, bad_tap = self.daemon(sink.port, MAILPUMP_SMTP_RELAY=relay, MAILPUMP_SMTP_TLS="verify",
                                   MAILPUMP_SMTP_CA_FILE=CA_FILE,
                                   MAILPUMP_SMTP_RELAY_USER="relayuser",
                                   MAILPUMP_SMTP_RELAY_PASSWORD="wrong-pw")
        # a domain with no DNS at all: relay mode never looks up MX
        m1 = self.enqueue(good, ["someone@nxdomain.test.example"])
        e = self.wait_final(good_tap, m1, 1)[0]
        self.assertEqual((e["event"], e["attempt"]), ("delivered", 1), e)
        self.assertEqual(e["tls"]["version"], "TLSv1.3", e)
        self.stop_daemon(good)
        t = self.wait_closed(sink, 2)
        self.assertEqual(commands(t, 2), ["EHLO mailpump.test.example", "STARTTLS",
                                          "EHLO mailpump.test.example", "AUTH PLAIN ****",
                                          f"MAIL FROM:<{SENDER}>",
                                          "RCPT TO:<someone@nxdomain.test.example>", "DATA", "QUIT"], t)
        self.assertIn("2 +auth ok user=relayuser", t)
        m2 = self.enqueue(bad, ["other@nxdomain.test.example"])
        e = self.wait_final(bad_tap, m2, 1)[0]
        self.assertEqual((e["event"], e["reason"], e["attempt"]), ("deferred", "policy", 1), e)
        self.assertEqual(e["smtp"]["code"], 535, e)
        t = self.wait_closed(sink, 3)
        self.assertIn("3 +auth failed user=relayuser", t)
        self.assertEqual(commands(t, 3), ["EHLO mailpump.test.example", "STARTTLS",
                                          "EHLO mailpump.test.example", "AUTH PLAIN ****", "QUIT"], t)
        secrets = ["s3cret-pw", "wrong-pw"]
        for pw in list(secrets):  # AUTH PLAIN / LOGIN encodings of them
            secrets.append(base64.b64encode(f"\0relayuser\0{pw}".encode()).decode())
            secrets.append(base64.b64encode(pw.encode()).decode())
        for line in t:
            for x in secrets:
                self.assertNotIn(x, line)
        st = engine_stats(sink)
        self.assertEqual((st["connections"], st["messages"]), (2, 1))


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""A message's history and `mailpump trace ID` against the real stack.

mailpumpd (private queues, one worker, the stack's Redis) delivers to a
tests/tools/smtpsink standing in for the test.example MX hosts, which
bounces bad-* recipients (550 5.1.1) and defers later-* ones once (451):

- the trace shows each recipient's outcome with the reply, the MX and
  the attempt, exactly as its event said; the deferred recipient leaves
  the message "queued" at its retry level; after the retry delivers it
  the message is "done" and that recipient has two attempts;
- the history is one write per attempt (mailpump_trace_writes_total),
  whatever the recipients, its list has a lifetime ([trace] ttl: PTTL)
  and keeps at most [trace] max_records records (an attempt its first
  ones, the list its newest);
- a recipient whose final dot the server has not answered yet leaves a
  first attempt "in_flight" (the ledger's "sending", no history yet);
- a dead-lettered message (bad input) is "dead" with its reason;
- an unknown id is not found (exit 3); [trace] enabled = 0 writes none.

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import json
import os
import subprocess
import sys
import time
import unittest

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

SENDER = "bob@test.example"
SINK_RULES = ["rcpt:bad-*@test.example=550 5.1.1 no such user",
              "rcpt:later-*@test.example#1=451 4.2.0 try later"]


class Trace(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()

    def sink(self, rules=()):
        s = mpstack.Sink(addr="127.0.0.2", rules=list(rules))
        self.addCleanup(s.stop)
        return s

    def daemon(self, sink, **env):
        extra = {"MAILPUMP_SMTP_PORT": str(sink.port), "MAILPUMP_SMTP_TLS": "none", "MAILPUMP_IMAP_HOST": ""}
        extra.update({k: str(v) for k, v in env.items()})
        return mpstack.started_daemon(self, self.env, workers=1, extra_env=extra)

    def publish(self, d, msg, message_id=None):
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
            ch.confirm_delivery()
            body = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
            ch.basic_publish("", d.queue, body, pika.BasicProperties(delivery_mode=2, message_id=message_id))
        finally:
            conn.close()

    def redis(self, *args):
        r = subprocess.run(["redis-cli", "-h", self.env["MP_REDIS_HOST"], "-p", str(self.env["MP_REDIS_PORT"]),
                            *args], capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def trace(self, d, mid, *opts):
        return d.cli("-c", self.env["MP_MAILPUMPD_CONFIG"], "trace", *opts, mid)

    def trace_json(self, d, mid):
        r = self.trace(d, mid, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def trace_until(self, d, mid, pred, timeout=20):
        """The trace once pred(trace) holds: the history is written after
        the events, unawaited."""
        deadline = time.time() + timeout
        t = None
        while time.time() < deadline:
            r = self.trace(d, mid, "--json")
            if r.returncode == 0:
                t = json.loads(r.stdout)
                if pred(t):
                    return t
            time.sleep(0.1)
        self.fail(f"trace of {mid} never matched: {json.dumps(t, indent=1)}")

    def assert_matches_event(self, entry, ev):
        last = entry["last"]
        self.assertEqual(last["attempt"], ev["attempt"])
        self.assertEqual(last["code"], ev["smtp"]["code"])
        self.assertEqual(last["enhanced"], ev["smtp"]["enhanced"])
        self.assertEqual(last["text"], ev["smtp"]["text"])
        self.assertEqual(last["mx_host"], ev["mx_host"])
        self.assertEqual(last["mx_addr"], "127.0.0.2")
        self.assertEqual(last["ts"], ev["ts"])

    def test_delivered_bounced_deferred_then_done(self):
        sink = self.sink(SINK_RULES)
        d, tap = self.daemon(sink, MAILPUMP_RETRY_LEVELS="4s", MAILPUMP_RETRY_P0_BASE="4s",
                             MAILPUMP_RETRY_P1_BASE="4s", MAILPUMP_RETRY_P2_BASE="4s", MAILPUMP_TRACE_TTL="1h")
        tag = os.urandom(4).hex()
        mid = f"trace-{tag}"
        self.addCleanup(self.redis, "DEL", f"mp:h:{mid}")
        ok, bad, later = (f"ok-{tag}@test.example", f"bad-{tag}@test.example", f"later-{tag}@test.example")
        writes0 = d.metric("mailpump_trace_writes_total")
        self.publish(d, {"id": mid, "from": SENDER, "to": [ok, bad, later], "subject": "trace", "text": tag,
                         "tenant": "acme", "campaign": "spring"})
        evs = tap.wait(lambda e: e.get("message_id") == mid and "recipient" in e, 3, 30)
        by = {e["recipient"]: e for e in evs}
        self.assertEqual({r: e["event"] for r, e in by.items()},
                         {ok: "delivered", bad: "bounced", later: "deferred"})

        t = self.trace_until(d, mid, lambda t: t["state"] == "queued")
        self.assertEqual(t["id"], mid)
        self.assertEqual((t["tenant"], t["campaign"], t["sender"]), ("acme", "spring", SENDER))
        w = t["where"]
        queue = d.retry_queues()[0]
        self.assertEqual((w["level"], w["queue"], w["delay_ms"], w["attempt"], w["pending"]),
                         (0, queue, 4000, 2, [later]), w)
        self.assertGreater(w["due_ms"], int(time.time() * 1000) - 4000)
        rc = {r["recipient"]: r for r in t["recipients"]}
        self.assertEqual({r: e["outcome"] for r, e in rc.items()},
                         {ok: "delivered", bad: "bounced", later: "deferred"})
        for r in (ok, bad, later):
            self.assert_matches_event(rc[r], by[r])
            self.assertEqual(rc[r]["attempts"], 1)
        self.assertEqual(rc[bad]["last"]["enhanced"], "5.1.1")
        self.assertEqual(rc[later]["last"]["code"], 451)
        self.assertEqual(rc[ok]["ledger"], "done")
        self.assertTrue(rc[later]["ledger"].startswith("retried:"), rc[later])
        # the history holds the events as they were published, after the attempt record
        hist = t["history"]
        self.assertEqual([h["event"] for h in hist], ["attempt", "delivered", "bounced", "deferred"])
        published = {e["recipient"]: {k: v for k, v in e.items() if k != "_routing_key"} for e in evs}
        for h in hist[1:]:
            self.assertEqual(h, published[h["recipient"]])
        self.assertEqual(hist[0]["retry"]["queue"], queue)
        self.assertEqual(hist[0]["recipients"], 3)
        # bounded lifetime: [trace] ttl = 1h
        pttl = int(self.redis("PTTL", f"mp:h:{mid}"))
        self.assertTrue(0 < pttl <= 3600000, pttl)
        self.assertTrue(0 < t["expires_in_ms"] <= 3600000, t)
        print(f"history of 3 recipients, 1 attempt: MEMORY USAGE "
              f"{self.redis('MEMORY', 'USAGE', f'mp:h:{mid}')} bytes", file=sys.stderr)

        # the retry delivers the deferred recipient: done, two attempts for it
        tap.wait(lambda e: e.get("message_id") == mid and e.get("recipient") == later
                 and e["event"] == "delivered", 1, 30)
        t = self.trace_until(d, mid, lambda t: t["state"] == "done")
        rc = {r["recipient"]: r for r in t["recipients"]}
        self.assertEqual(rc[later]["outcome"], "delivered")
        self.assertEqual(rc[later]["attempts"], 2)
        self.assertEqual(rc[later]["last"]["attempt"], 2)
        self.assertEqual(rc[later]["last"]["code"], 250)
        self.assertEqual(rc[ok]["attempts"], 1)
        self.assertEqual(t["attempts"], 2)
        self.assertEqual(t["where"]["attempts"], 2)
        self.assertEqual([h["event"] for h in t["history"]],
                         ["attempt", "delivered", "bounced", "deferred", "attempt", "delivered"])
        # one Redis write per attempt, not per recipient
        self.assertEqual(d.metric("mailpump_trace_writes_total") - writes0, 2)
        self.assertEqual(d.metric("mailpump_trace_write_failures_total"), 0)
        self.assertEqual(int(self.redis("LLEN", f"mp:h:{mid}")), 6)

        # the timeline: one line per record, then where it is now
        r = self.trace(d, mid)
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertTrue(lines[0].startswith(f"message {mid} from {SENDER}"), lines)
        self.assertEqual(len(lines), 1 + 6 + 1, lines)
        self.assertRegex(lines[3], rf"#1 +{bad} +bounced +550 5\.1\.1 no such user .*mx=\S+\[127\.0\.0\.2\]")
        self.assertRegex(lines[1], rf"#1 .*attempt +started, 3 recipient\(s\); retry: level 0, queue {queue}")
        self.assertRegex(lines[6], rf"#2 +{later} +delivered +250 ")
        self.assertTrue(lines[-1].startswith("state: done (every recipient final after 2 attempt(s)"), lines)

    def test_dead_letter_and_unknown_id(self):
        sink = self.sink()
        d, tap = self.daemon(sink)
        tag = os.urandom(4).hex()
        mid = f"trace-dead-{tag}"
        self.addCleanup(self.redis, "DEL", f"mp:h:{mid}")
        self.publish(d, {"id": mid, "from": SENDER, "to": ["bob@"], "subject": "bad"}, message_id=mid)
        ev = tap.wait(lambda e: e["event"] == "dead" and e.get("message_id") == mid, 1, 30)[0]
        t = self.trace_until(d, mid, lambda t: t["state"] == "dead")
        self.assertEqual(t["where"]["reason"], ev["error"])
        self.assertIn("bob@", t["where"]["reason"])
        self.assertEqual(t["where"]["queue"], d.dead_queue)
        self.assertEqual([h["event"] for h in t["history"]], ["attempt", "dead"])
        r = self.trace(d, mid)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.splitlines()[-1].startswith(f"state: dead (dead-lettered to {d.dead_queue}"),
                        r.stdout)
        # an id nothing was recorded for
        r = self.trace(d, f"trace-never-{tag}")
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        self.assertIn("unknown or its history expired", r.stderr)
        self.assertEqual(r.stdout, "")
        r = self.trace(d, f"trace-never-{tag}", "--json")
        self.assertEqual(r.returncode, 3)
        # bad usage
        self.assertEqual(d.cli("trace").returncode, 2)
        self.assertEqual(d.cli("trace", "a", "b").returncode, 2)

    def test_in_flight_while_the_server_holds_its_reply(self):
        # the server holds its reply to the final dot: the ledger shows the
        # recipient "sending" and the first attempt has no history yet
        sink = self.sink(["delay:DOT=3000"])
        d, tap = self.daemon(sink)
        tag = os.urandom(4).hex()
        mid = f"trace-fly-{tag}"
        self.addCleanup(self.redis, "DEL", f"mp:h:{mid}")
        rcpt = f"Fly-{tag}@test.example"
        self.publish(d, {"id": mid, "from": SENDER, "to": [rcpt], "subject": "fly", "text": tag})
        t = self.trace_until(d, mid, lambda t: t["state"] == "in_flight", 10)
        self.assertEqual(t["where"]["recipients"], [{"recipient": rcpt.lower(), "ledger": "sending"}])
        self.assertEqual(t["history"], [])
        self.assertEqual(t["attempts"], 0)
        r = self.trace(d, mid)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.splitlines()[-1], f"state: in_flight (an attempt is running: {rcpt.lower()}=sending)")
        tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "delivered", 1, 30)
        t = self.trace_until(d, mid, lambda t: t["state"] == "done")
        self.assertEqual([(r["recipient"], r["outcome"], r["ledger"]) for r in t["recipients"]],
                         [(rcpt, "delivered", "done")])

    def test_records_bounded_and_disabled(self):
        sink = self.sink()
        d, tap = self.daemon(sink, MAILPUMP_TRACE_MAX_RECORDS="3")
        tag = os.urandom(4).hex()
        mid = f"trace-max-{tag}"
        self.addCleanup(self.redis, "DEL", f"mp:h:{mid}")
        rcpts = [f"r{i}-{tag}@test.example" for i in range(4)]
        self.publish(d, {"id": mid, "from": SENDER, "to": rcpts, "subject": "max", "text": tag})
        tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "delivered", 4, 30)
        t = self.trace_until(d, mid, lambda t: len(t["history"]) > 0)
        # the attempt record and its first 2 events; the other 2 counted
        self.assertEqual(int(self.redis("LLEN", f"mp:h:{mid}")), 3)
        first = [e["recipient"] for e in tap.events if e.get("message_id") == mid][:2]
        self.assertEqual([h.get("recipient") for h in t["history"]], [None] + first)
        self.assertEqual((t["history"][0]["recipients"], t["history"][0]["omitted"]), (4, 2))
        self.assertEqual(t["state"], "done")
        self.assertEqual(d.metric("mailpump_trace_writes_total"), 1)
        # a second attempt's records push the oldest out: LTRIM keeps the newest 3
        self.publish(d, {"id": mid, "from": SENDER, "to": rcpts, "subject": "max", "text": tag})
        tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "delivered", 8, 30)
        started = t["history"][0]["started_ms"]
        t = self.trace_until(d, mid, lambda t: t["history"][0].get("started_ms", started) != started)
        self.assertEqual(int(self.redis("LLEN", f"mp:h:{mid}")), 3)
        self.assertEqual([h["event"] for h in t["history"]], ["attempt", "delivered", "delivered"])
        self.assertTrue(all(h.get("already_delivered") for h in t["history"][1:]), t["history"])
        self.assertEqual(d.metric("mailpump_trace_writes_total"), 2)

        d2, tap2 = self.daemon(sink, MAILPUMP_TRACE_ENABLED="0")
        mid2 = f"trace-off-{tag}"
        self.addCleanup(self.redis, "DEL", f"mp:h:{mid2}")
        self.publish(d2, {"id": mid2, "from": SENDER, "to": rcpts[:1], "subject": "off", "text": tag})
        tap2.wait(lambda e: e.get("message_id") == mid2 and e["event"] == "delivered", 1, 30)
        time.sleep(0.3)
        self.assertEqual(self.redis("EXISTS", f"mp:h:{mid2}"), "0")
        self.assertEqual(d2.metric("mailpump_trace_writes_total"), 0)


if __name__ == "__main__":
    unittest.main()

"""Who sends a message, on the real local stack: tenant, campaign and pool
from the message into its events, its log lines (logfmt and JSON) and the
recipients-by-tenant/pool/source metrics; a bad value dead-letters the
message with its reason.

Events are read with pika from a private queue, the log from the daemon's
own file, the metrics over HTTP (docs/message-format.md, docs/operations.md).
"""
import json
import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

SENDER = ("--tenant", "acme", "--campaign", "spring:2026/news@x+y=z", "--pool", "bulk")


def metric_series(body, family):
    """{(label, outcome): value} of one labeled family in /metrics."""
    out = {}
    rx = re.compile(r'^' + family + r'\{\w+="([^"]*)",outcome="(\w+)"\} (\d+)$')
    for line in body.splitlines():
        m = rx.match(line)
        if m:
            out[(m.group(1), m.group(2))] = int(m.group(3))
    return out


class Ident(unittest.TestCase):
    log_format = "logfmt"

    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        cls.daemon = mpstack.Daemon(cls.env, workers=1, extra_env={"MAILPUMP_LOG_FORMAT": cls.log_format})
        cls.tap = mpstack.EventTap(cls.env, cls.daemon.exchange)
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls):
        rc = cls.daemon.stop()
        cls.tap.close()
        if rc != 0:
            raise AssertionError(f"mailpumpd exit status {rc} after SIGTERM:\n{cls.daemon.log()}")

    def enqueue(self, *args):
        r = self.daemon.cli("enqueue", *args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def events_for(self, msg_id, count, kinds=None, timeout=60):
        return self.tap.wait(lambda e: e.get("message_id") == msg_id and
                             (kinds is None or e["event"] in kinds), count, timeout)

    def log_lines(self, msg_id):
        return [line for line in self.daemon.log().splitlines() if msg_id in line]


class IdentLogfmt(Ident):
    def test_fields_in_events_logs_and_metrics(self):
        _, before = self.daemon.http("/metrics")
        with_id = self.enqueue("--from", "alice@test.example", "--to", "bob@test.example",
                               "--subject", "ident", "--text", "hi", "--trace-id", "tr-ident-1", *SENDER)
        plain_id = self.enqueue("--from", "bob@test.example", "--to", "dave@test.example",
                                "--subject", "plain", "--text", "hi")
        evs = self.events_for(with_id, 2, kinds={"delivered", "appended"})
        for e in evs:
            self.assertEqual(e["tenant"], "acme", e)
            self.assertEqual(e["campaign"], "spring:2026/news@x+y=z", e)
            self.assertEqual(e["pool"], "bulk", e)
            self.assertEqual(e["trace_id"], "tr-ident-1", e)
            # nothing in the stack configures sources or shaping
            for k in ("source", "source_addr", "shaping"):
                self.assertNotIn(k, e)
        # the existing fields keep their order around the new ones
        d = next(e for e in evs if e["event"] == "delivered")
        keys = [k for k in d if not k.startswith("_")]
        self.assertEqual(keys[:8], ["event", "message_id", "trace_id", "tenant", "campaign", "pool", "from",
                                    "recipient"])
        plain = self.events_for(plain_id, 1, kinds={"delivered"})[0]
        for k in ("tenant", "campaign", "pool", "source", "source_addr", "shaping"):
            self.assertNotIn(k, plain)

        # every job line of the message carries them, quoted, after msg and trace
        deadline = time.time() + 10
        while time.time() < deadline and not any("event=message_done" in l for l in self.log_lines(with_id)):
            time.sleep(0.1)
        lines = [l for l in self.log_lines(with_id) if "mod=job" in l]
        self.assertTrue(any("event=message_received" in l for l in lines), lines)
        self.assertTrue(any("event=delivered" in l for l in lines), lines)
        for l in lines:
            self.assertIn(f'msg="{with_id}" trace="tr-ident-1" tenant="acme" '
                          'campaign="spring:2026/news@x+y=z" pool="bulk" ', l)
        for l in self.log_lines(plain_id):
            self.assertNotIn("tenant=", l)

        # one recipient each: the tenant's series grew by one (none for the
        # plain message), and so did pool and source
        _, after = self.daemon.http("/metrics")
        for fam, label in (("mailpump_recipients_by_tenant_total", "tenant"),
                           ("mailpump_recipients_by_pool_total", "pool"),
                           ("mailpump_recipients_by_source_total", "source")):
            self.assertIn(f"# TYPE {fam} counter", after)
            b, a = metric_series(before, fam), metric_series(after, fam)
            self.assertEqual(set(a), set(b))  # no series appears: the set is fixed
            grew = {k: a[k] - b.get(k, 0) for k in a if a[k] != b.get(k, 0)}
            self.assertEqual(sum(grew.values()), 2, (fam, grew))
            self.assertTrue(all(k[1] == "delivered" for k in grew), (fam, grew))
            if label != "source":
                self.assertEqual(grew.get(("none", "delivered")), 1, (fam, grew))
            else:
                self.assertEqual(grew.get(("none", "delivered")), 2, (fam, grew))

    def test_bad_value_is_dead_lettered(self):
        body = json.dumps({"from": "a@test.example", "to": ["b@test.example"], "id": "ident-bad-1",
                           "tenant": "acme corp"})
        r = self.daemon.cli("enqueue", "--no-validate", stdin=body)
        self.assertEqual(r.returncode, 0, r.stderr)
        dead = self.events_for("ident-bad-1", 1, kinds={"dead"})[0]
        self.assertEqual(dead["error"], 'invalid "tenant": must be 1-64 characters of letters, digits, '
                                        "'.', '_', '-' (got \"acme corp\")")
        self.assertNotIn("tenant", dead)
        # the CLI refuses it before publishing
        r = self.daemon.cli("enqueue", "--from", "a@test.example", "--to", "b@test.example", "--pool", "a/b")
        self.assertEqual(r.returncode, 2)
        self.assertIn('invalid "pool"', r.stderr)


class IdentJson(Ident):
    log_format = "json"

    def test_json_log_keys(self):
        msg_id = self.enqueue("--from", "bob@test.example", "--to", "dave@test.example",
                              "--subject", "json", "--text", "hi", *SENDER)
        self.events_for(msg_id, 1, kinds={"delivered"})
        deadline = time.time() + 10
        objs = []
        while time.time() < deadline:
            objs = [json.loads(l) for l in self.log_lines(msg_id)]
            if any(o["event"] == "message_done" for o in objs):
                break
            time.sleep(0.1)
        jobs = [o for o in objs if o["mod"] == "job"]
        self.assertTrue(any(o["event"] == "delivered" for o in jobs), objs)
        for o in jobs:
            keys = list(o)
            at = keys.index("msg")
            self.assertEqual(keys[at:at + 4], ["msg", "tenant", "campaign", "pool"], o)
            self.assertEqual((o["tenant"], o["campaign"], o["pool"]),
                             ("acme", "spring:2026/news@x+y=z", "bulk"), o)


if __name__ == "__main__":
    unittest.main(verbosity=2)

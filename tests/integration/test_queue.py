"""`mailpump queue` and `mailpump dead list|redrive` on the real local stack
(docs/operations.md, "Queue summary", "Dead letters: list and re-drive").

Each test has its own queues (mpstack.Daemon names them); the daemons
relay to receivers on their own loopback addresses, so each destination
(the relay's site: its address) is the test's own:
- messages published with no daemon running show as the outbound depth,
  exactly;
- a receiver that holds its replies (slowsink.py) with one connection
  per site shows a worker of this daemon with messages in flight and the
  destination with legs waiting;
- a receiver answering 451 shows the destination deferred, with its
  last error;
- three bad messages dead-lettered by a daemon are listed with their
  reasons and stay in the dead queue, in order; a redrive by reason moves
  exactly the matching one to the outbound queue (body, id, headers);
  with the outbound queue gone (unroutable) or the broker unreachable the
  redrive fails and the dead copies stay.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SENDER = "bob@test.example"


class Queue(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()

    def cli(self, d, *args):
        return d.cli("--config", self.env["MP_MAILPUMPD_CONFIG"], *args)

    def summary(self, d):
        r = self.cli(d, "queue", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def publish(self, d, bodies, queue=None, **props):
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.confirm_delivery()
            for b in bodies:
                ch.basic_publish(exchange="", routing_key=queue or d.queue,
                                 body=b if isinstance(b, bytes) else json.dumps(b).encode(),
                                 properties=pika.BasicProperties(delivery_mode=2, **props))
        finally:
            conn.close()

    def depth(self, queue):
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            return ch.queue_declare(queue, passive=True).method.message_count
        finally:
            conn.close()

    def message(self, tag, i, rcpt):
        return {"id": f"{tag}-{i}-{uuid.uuid4().hex[:6]}", "from": SENDER, "to": [rcpt],
                "subject": tag, "text": "hello"}

    def relay_daemon(self, addr, port, **more):
        extra = {"MAILPUMP_SMTP_RELAY": f"{addr}:{port}", "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_LEVELS": "1m,5m"}
        extra.update({k: str(v) for k, v in more.items()})
        d, tap = mpstack.started_daemon(self, self.env, workers=1, extra_env=extra)
        return d

    def poll(self, d, pred, timeout=20):
        deadline = time.time() + timeout
        s = None
        while time.time() < deadline:
            s = self.summary(d)
            got = pred(s)
            if got:
                return s, got
            time.sleep(0.3)
        self.fail(f"not seen within {timeout} s: {json.dumps(s, indent=1)}")

    # ---- depths ----

    def test_depth_without_daemon(self):
        d = mpstack.Daemon(self.env, workers=1)
        self.addCleanup(d.delete_topology)
        conn, ch = mpstack.amqp_channel(self.env)
        ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
        conn.close()
        self.publish(d, [self.message("depth", i, "r@relay.test") for i in range(7)], priority=3)
        s = self.summary(d)
        kinds = {q["name"]: q for q in s["queues"]}
        self.assertEqual(kinds[d.queue]["kind"], "outbound")
        self.assertEqual(kinds[d.queue]["messages"], 7)
        self.assertEqual(kinds[d.queue]["consumers"], 0)
        self.assertIsNone(kinds[d.queue]["level"])
        # not declared (no daemon ran): null, not 0
        self.assertEqual(kinds[d.dead_queue]["kind"], "dead")
        self.assertIsNone(kinds[d.dead_queue]["messages"])
        retry = [q for q in s["queues"] if q["kind"] == "retry"]
        self.assertEqual([q["name"] for q in retry], d.retry_queues())
        self.assertEqual([q["level"] for q in retry], list(range(len(retry))))
        self.assertEqual(retry[0]["delay_s"], 30)
        # no worker of this queue reports
        self.assertEqual(s["workers"], [])
        self.assertIsNone(s["oldest_age_s"])
        self.assertIn("first-seen", s["oldest_age_covers"])
        # no dead queue yet: nothing to list or move
        self.assertEqual(self.dead_list(d), {"messages": [], "total": 0, "scanned": 0})
        r = self.cli(d, "dead", "redrive")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["redriven"], 0)
        # Redis unreachable: the depths still, and why the workers are missing
        env = dict(d.proc_env, MAILPUMP_REDIS_PORT=str(mpstack.free_port()))
        r = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpump"), "--config",
                            self.env["MP_MAILPUMPD_CONFIG"], "queue", "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        s = json.loads(r.stdout)
        self.assertEqual(next(q for q in s["queues"] if q["name"] == d.queue)["messages"], 7)
        self.assertEqual(s["workers"], [])
        self.assertIn("redis 127.0.0.1:", s["workers_error"])
        # the table names the queue with its depth
        r = self.cli(d, "queue")
        self.assertEqual(r.returncode, 0, r.stderr)
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(d.queue + " "))
        self.assertEqual(line.split()[1:], ["outbound", "-", "7", "0", "-"])  # no timestamp: no head age

    def test_head_ages_from_the_management_api(self):
        """The stack's config names the management API: each queue's head
        message's age by its AMQP timestamp, kept through a dead letter."""
        d = mpstack.Daemon(self.env, workers=1)
        self.addCleanup(d.delete_topology)
        conn, ch = mpstack.amqp_channel(self.env)
        ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
        ch.queue_declare(d.dead_queue, durable=True)
        conn.close()
        now = int(time.time())
        self.publish(d, [self.message("age", 0, "r@relay.test")], priority=3, timestamp=now - 300)
        self.publish(d, [self.message("age", 1, "r@relay.test")], priority=3, timestamp=now - 120)
        self.publish(d, [b"{not json"], queue=d.dead_queue, timestamp=now - 200)

        def heads(s):
            q = {q["name"]: q for q in s["queues"]}
            return q[d.queue]["head_age_s"] is not None and q[d.dead_queue]["head_age_s"] is not None

        s, _ = self.poll(d, heads, timeout=20)  # the broker's statistics are 5 s old at most
        q = {q["name"]: q for q in s["queues"]}
        self.assertTrue(300 <= q[d.queue]["head_age_s"] < 330, q[d.queue])  # the head, the older one
        self.assertTrue(200 <= q[d.dead_queue]["head_age_s"] < 230, q[d.dead_queue])
        self.assertTrue(300 <= s["oldest_age_s"] < 330, s)
        self.assertIn("head of each queue", s["oldest_age_covers"])
        self.assertNotIn("management_error", s)
        # the management API unreachable: the depths still, the ages unknown and why
        env = dict(d.proc_env, MAILPUMP_AMQP_MANAGEMENT_URL=f"http://127.0.0.1:{mpstack.free_port()}")
        r = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpump"), "--config",
                            self.env["MP_MAILPUMPD_CONFIG"], "queue", "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        s = json.loads(r.stdout)
        q = {q["name"]: q for q in s["queues"]}
        self.assertEqual(q[d.queue]["messages"], 2)
        self.assertIsNone(q[d.queue]["head_age_s"])
        self.assertIn("Connection refused", s["management_error"])

    def test_a_dead_letter_keeps_its_timestamp(self):
        """mailpumpd's own publishes carry the AMQP timestamp: a dead
        letter the one its message was enqueued with."""
        d = mpstack.Daemon(self.env, workers=1)
        d.start()
        self.addCleanup(d.stop)
        then = int(time.time()) - 500
        self.publish(d, [{"id": f"ts-{uuid.uuid4().hex[:6]}", "from": SENDER, "to": ["not an address"],
                          "text": "x"}], timestamp=then)
        deadline = time.time() + 20
        while self.depth(d.dead_queue) < 1 and time.time() < deadline:
            time.sleep(0.2)
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            method, props, body = ch.basic_get(d.dead_queue, auto_ack=False)
            self.assertIsNotNone(method, "nothing dead-lettered")
            self.assertEqual(props.timestamp, then)
        finally:
            conn.close()

    # ---- workers and destinations ----

    def test_inflight_and_waiting(self):
        addr = "127.0.0.71"
        port = mpstack.free_port()
        dumpdir = tempfile.mkdtemp(prefix="mp-qsink-")
        self.addCleanup(shutil.rmtree, dumpdir, True)
        sink = subprocess.Popen(["/usr/bin/python3", os.path.join(HERE, "slowsink.py"), addr, str(port),
                                 dumpdir, "20"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

        def stop_sink():
            sink.kill()
            sink.wait()
            sink.stdout.close()
            sink.stdin.close()
        self.addCleanup(stop_sink)
        self.assertEqual(sink.stdout.readline().strip(), "ready")
        d = self.relay_daemon(addr, port, MAILPUMP_SMTP_SITE_MAX_CONNECTIONS=1,
                              MAILPUMP_SMTP_SITE_MAX_WAIT="60s", MAILPUMP_WORKER_SHUTDOWN_GRACE_MS=1000)
        self.publish(d, [self.message("slow", i, f"r{i}@relay.test") for i in range(3)], priority=5)

        def seen(s):
            mine = [w for w in s["workers"] if w["pid"] == d.proc.pid]
            dest = [x for x in s["destinations"] if x["destination"] == addr]
            if mine and mine[0]["inflight"] == 3 and dest and dest[0]["waiting"] == 2:
                return mine[0], dest[0]
            return None
        s, (w, dest) = self.poll(d, seen)
        self.assertEqual(w["worker"], 0)
        self.assertGreater(w["inflight_bytes"], 0)
        self.assertEqual(w["smtp_connections"], 1)
        self.assertIsNotNone(w["oldest_inflight_s"])
        self.assertLessEqual(w["oldest_inflight_s"], 20)
        self.assertLessEqual(w["updated_s_ago"], 3)
        self.assertEqual(dest["parked"], 0)
        self.assertEqual(dest["deferred_recent"], 0)
        self.assertIsNotNone(s["oldest_age_s"])
        # the outbound queue holds nothing: the worker has them all
        q = next(x for x in s["queues"] if x["name"] == d.queue)
        self.assertEqual(q["messages"], 0)
        self.assertEqual(q["consumers"], 1)
        r = self.cli(d, "queue")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, rf"\n{addr.replace('.', '[.]')} +2 +0 +0 ")
        # stopped, its record is gone at once (not after 10 s)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(30)
        t0 = time.time()
        self.poll(d, lambda s: not [x for x in s["workers"] if x["pid"] == d.proc.pid], timeout=9)
        self.assertLess(time.time() - t0, 2)

    def test_deferred_with_last_error(self):
        addr = "127.0.0.72"
        sink = mpstack.Sink(addr=addr, rules=["rcpt:*@*=451 4.7.1 [QT1] greylisted, come back later"])
        self.addCleanup(sink.stop)
        d = self.relay_daemon(addr, sink.port)
        self.publish(d, [self.message("defer", i, f"r{i}@relay.test") for i in range(2)], priority=5)

        def seen(s):
            dest = [x for x in s["destinations"] if x["destination"] == addr]
            retried = sum(x["messages"] or 0 for x in s["queues"] if x["kind"] == "retry")
            return dest[0] if dest and dest[0]["deferred_recent"] == 2 and retried == 2 else None
        s, dest = self.poll(d, seen)
        self.assertIn("451 4.7.1", dest["last_error"])
        self.assertIn("[QT1] greylisted", dest["last_error"])
        self.assertLessEqual(dest["last_error_age_s"], 15)
        self.assertEqual(dest["waiting"], 0)
        # the messages wait in the delay queues now
        self.assertEqual(next(x for x in s["queues"] if x["name"] == d.queue)["messages"], 0)
        r = self.cli(d, "queue")
        self.assertIn("[QT1] greylisted", r.stdout)

    # ---- dead letters ----

    def dead_daemon(self):
        d = mpstack.Daemon(self.env, workers=1, extra_env={"MAILPUMP_IMAP_HOST": "",
                                                          "MAILPUMP_RETRY_LEVELS": "1m"})
        d.start()
        self.addCleanup(d.delete_topology)
        self.addCleanup(lambda: d.proc.poll() is None and (d.proc.kill(), d.proc.wait()))
        bad = [
            b"{not json",
            {"id": f"badaddr-{uuid.uuid4().hex[:6]}", "from": SENDER, "to": ["no-at-sign"],
             "subject": "x", "text": "x"},
            {"id": f"nofrom-{uuid.uuid4().hex[:6]}", "to": ["a@relay.test"], "subject": "x", "text": "x",
             "tenant": "acme"},
        ]
        for b in bad:
            self.publish(d, [b], message_id=(b["id"] if isinstance(b, dict) else None), priority=7)
        deadline = time.time() + 20
        while time.time() < deadline and self.depth(d.dead_queue) < 3:
            time.sleep(0.2)
        self.assertEqual(self.depth(d.dead_queue), 3)
        # stopped, so that nothing consumes what a redrive puts back
        d.proc.send_signal(signal.SIGTERM)
        self.assertEqual(d.proc.wait(30), 0)
        return d, bad

    def dead_list(self, d, *args):
        r = self.cli(d, "dead", "list", "--json", *args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)

    def test_dead_list_and_redrive(self):
        d, bad = self.dead_daemon()
        listed = self.dead_list(d)
        self.assertEqual(listed["total"], 3)
        msgs = listed["messages"]
        self.assertEqual(len(msgs), 3)
        reasons = [m["reason"] for m in msgs]
        self.assertEqual(len(set(reasons)), 3, reasons)
        self.assertTrue(all(reasons), msgs)
        # in the order they died, with their ids, sizes and recipients
        self.assertIsNone(msgs[0]["id"])
        self.assertEqual(msgs[0]["size"], len(bad[0]))
        self.assertIsNone(msgs[0]["recipients"])
        self.assertEqual(msgs[1]["id"], bad[1]["id"])
        self.assertEqual(msgs[1]["recipients"], 1)
        self.assertEqual(msgs[2]["id"], bad[2]["id"])
        self.assertEqual(msgs[2]["tenant"], "acme")
        self.assertRegex(msgs[2]["dead_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        # nothing was taken, nothing reordered
        self.assertEqual(self.depth(d.dead_queue), 3)
        self.assertEqual([m["id"] for m in self.dead_list(d)["messages"]], [m["id"] for m in msgs])
        # a filter and a limit
        only = self.dead_list(d, "--reason", reasons[1])
        self.assertEqual([m["id"] for m in only["messages"]], [bad[1]["id"]])
        self.assertEqual(len(self.dead_list(d, "--limit", "2")["messages"]), 2)
        r = self.cli(d, "dead", "list")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(bad[2]["id"], r.stdout)
        self.assertIn("3 shown of 3", r.stdout)

        # a dry run moves nothing
        r = self.cli(d, "dead", "redrive", "--reason", reasons[1], "--dry-run")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"redriven": 1, "skipped": 2, "failed": 0,
                                                "ids": [bad[1]["id"]], "dry_run": True})
        self.assertEqual(self.depth(d.dead_queue), 3)
        self.assertEqual(self.depth(d.queue), 0)

        r = self.cli(d, "dead", "redrive", "--reason", reasons[1])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"redriven": 1, "skipped": 2, "failed": 0,
                                                "ids": [bad[1]["id"]], "dry_run": False})
        self.assertEqual(self.depth(d.dead_queue), 2)
        self.assertEqual(self.depth(d.queue), 1)
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            method, props, body = ch.basic_get(d.queue, auto_ack=True)
        finally:
            conn.close()
        self.assertEqual(json.loads(body), bad[1])
        self.assertEqual(props.message_id, bad[1]["id"])
        self.assertEqual(props.priority, 7)
        self.assertEqual(props.delivery_mode, 2)
        self.assertEqual(props.headers.get("x-mailpump-redriven"), "1")
        self.assertNotIn("x-mailpump-reason", props.headers)
        self.assertNotIn("x-death", props.headers)
        left = self.dead_list(d)["messages"]
        self.assertEqual([m["id"] for m in left], [None, bad[2]["id"]])
        self.assertEqual([m["reason"] for m in left], [reasons[0], reasons[2]])

    def test_redrive_failures_keep_the_dead_copy(self):
        d, bad = self.dead_daemon()
        # the outbound queue gone: the republish is returned, nothing acked
        conn, ch = mpstack.amqp_channel(self.env)
        ch.queue_delete(d.queue)
        conn.close()
        r = self.cli(d, "dead", "redrive")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual((out["redriven"], out["failed"]), (0, 1), out)
        self.assertIn("returned", out["error"])
        self.assertIn("returned", r.stderr)
        self.assertEqual(self.depth(d.dead_queue), 3)
        self.assertEqual([m["id"] for m in self.dead_list(d)["messages"]],
                         [None, bad[1]["id"], bad[2]["id"]])
        # the broker unreachable: a runtime failure, nothing touched
        r = d.cli("--config", self.env["MP_MAILPUMPD_CONFIG"], "--amqp", f"127.0.0.1:{mpstack.free_port()}",
                  "dead", "redrive")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("amqp 127.0.0.1:", r.stderr)
        self.assertEqual(self.depth(d.dead_queue), 3)

    def test_usage(self):
        d = mpstack.Daemon(self.env, workers=1)
        for args, rc in ((("dead",), 2), (("dead", "purge"), 2), (("dead", "list", "--limit", "0"), 2),
                         (("dead", "list", "--dry-run"), 2), (("queue", "extra"), 2),
                         (("queue", "--help"), 0), (("dead", "--help"), 0)):
            r = self.cli(d, *args)
            self.assertEqual(r.returncode, rc, (args, r.stdout, r.stderr))
        self.assertIn("mailpump [--config FILE] queue", self.cli(d, "queue", "--help").stdout)
        self.assertIn("dead redrive", self.cli(d, "help", "dead").stdout)


if __name__ == "__main__":
    unittest.main()

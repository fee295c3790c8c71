"""The worker's memory for message bodies in flight (docs/operations.md,
"Memory"): a body announced far above the largest allowed is
dead-lettered without being read (its head kept, the size in headers)
while the daemon's RSS stays far below it, and a small
[message] inflight_memory pauses and resumes the consumer under a slow
receiver without losing or duplicating a message.

Each test runs its own mailpumpd on the shared stack with private queue
names (mpstack.Daemon) and its own smtpsink on a private port.
"""
import json
import os
import re
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
import pika  # noqa: E402

MiB = 1024 * 1024
SENDER = "bob@test.example"


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def message_ids(raw_messages):
    out = []
    for raw in raw_messages:
        m = re.search(rb"^Message-ID: <([^@>]+)@", raw, re.M | re.I)
        out.append(m.group(1).decode() if m else None)
    return out


class Memory(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()

    def sink(self, rules=()):
        s = mpstack.Sink(addr="127.0.0.2", rules=list(rules))
        self.addCleanup(s.stop)
        return s

    def daemon(self, port, **env):
        extra = {"MAILPUMP_SMTP_PORT": str(port), "MAILPUMP_SMTP_TLS": "none", "MAILPUMP_IMAP_HOST": ""}
        extra.update({k: str(v) for k, v in env.items()})
        return mpstack.started_daemon(self, self.env, extra_env=extra)

    def publish(self, d, bodies, message_ids=None):
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
            ch.confirm_delivery()
            for i, body in enumerate(bodies):
                mid = message_ids[i] if message_ids else None
                ch.basic_publish("", d.queue, body, pika.BasicProperties(delivery_mode=2, message_id=mid))
        finally:
            conn.close()

    def dead_letters(self, d, n, timeout=30):
        conn, ch = mpstack.amqp_channel(self.env)
        out = []
        try:
            deadline = time.time() + timeout
            while len(out) < n and time.time() < deadline:
                method, props, body = ch.basic_get(d.dead_queue, auto_ack=True)
                if method is None:
                    time.sleep(0.05)
                    continue
                out.append((props, body))
        finally:
            conn.close()
        return out

    def test_body_far_above_the_limit_is_dead_lettered_unread(self):
        sink = self.sink()
        d, tap = self.daemon(sink.port, MAILPUMP_MESSAGE_MAX_SIZE=str(1 * MiB))
        tag = os.urandom(4).hex()
        small = [f"mem-small-{tag}-{i}" for i in range(4)]
        big_id = f"mem-big-{tag}"

        def msg(mid, text):
            return json.dumps({"id": mid, "from": SENDER, "to": ["pia@test.example"],
                               "subject": "memory", "text": text}).encode()
        big = msg(big_id, "x" * (30 * MiB))
        # the AMQP message-id names it in the dead event: its JSON is not read
        self.publish(d, [msg(small[0], "before"), msg(small[1], "before"), big,
                         msg(small[2], "after"), msg(small[3], "after")],
                     message_ids=[None, None, big_id, None, None])

        ev = tap.wait(lambda e: e["event"] == "dead" and e.get("message_id") == big_id, 1)[0]
        most = 2 * MiB + 64 * 1024
        self.assertEqual(ev["error"], f"too large: {len(big)} bytes announced, at most {most} "
                                      f"([message] max_size 1 MiB)")
        # the others, before and after it, are delivered
        tap.wait(lambda e: e["event"] == "delivered" and e.get("message_id") in small, 4)
        [(props, body)] = self.dead_letters(d, 1)
        self.assertEqual(props.headers["x-mailpump-truncated"], "1")
        self.assertEqual(props.headers["x-mailpump-original-size"], str(len(big)))
        self.assertIn("too large", props.headers["x-mailpump-reason"])
        self.assertEqual(props.message_id, big_id)
        self.assertEqual(len(body), 64 * 1024)
        self.assertEqual(body, big[:64 * 1024])  # the head identifies it
        self.assertIn(big_id.encode(), body)
        self.assertEqual(d.metric("mailpump_messages_too_large_total"), 1)
        self.assertEqual(d.metric("mailpump_inflight_bytes"), 0)
        # the body was never held: the peak RSS stays far below its 30 MiB
        hwm = vm_hwm_kib(d.proc.pid)
        print(f"VmHWM {hwm} KiB for a {len(big)} byte body", file=sys.stderr)
        self.assertLess(hwm * 1024, len(big) // 2, f"VmHWM {hwm} KiB")
        self.assertNotIn("connection_lost", d.log())

    def test_budget_pauses_and_resumes_the_consumer(self):
        n = 40
        # each reply to the final dot waits: the jobs pile up in the worker
        sink = self.sink(rules=["delay:DOT=250"])
        d, tap = self.daemon(sink.port, MAILPUMP_MESSAGE_MAX_SIZE=str(64 * 1024),
                             MAILPUMP_MESSAGE_INFLIGHT_MEMORY="1MiB")
        limit = 1 * MiB
        hard = limit + 3 * (2 * 64 * 1024 + 64 * 1024)  # + the charge of one largest body
        samples = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    samples.append(d.metric("mailpump_inflight_bytes"))
                except (OSError, KeyError):
                    pass
                time.sleep(0.02)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        tag = os.urandom(4).hex()
        ids = [f"mem-budget-{tag}-{i}" for i in range(n)]
        bodies = [json.dumps({"id": mid, "from": SENDER, "to": ["quinn@test.example"],
                              "subject": "budget", "text": ("y" * 70 + "\n") * 560}).encode()
                  for mid in ids]
        self.publish(d, bodies)
        try:
            evs = tap.wait(lambda e: e["event"] in ("delivered", "failed", "bounced", "dead")
                           and e.get("message_id") in ids, n, timeout=120)
        finally:
            done.set()
            t.join()
        self.assertEqual({e["event"] for e in evs}, {"delivered"})
        tap.drain()
        got = [e for e in tap.events if e.get("message_id") in ids and e["event"] == "delivered"]
        self.assertEqual(sorted(e["message_id"] for e in got), sorted(ids))  # each once
        deadline = time.time() + 10
        while len(sink.messages()) < n and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(sorted(message_ids(sink.messages())), sorted(ids))
        log = d.log()
        self.assertIn("consumer_paused", log)
        self.assertIn("consumer_resumed", log)
        self.assertGreaterEqual(d.metric("mailpump_consumer_pauses_total"), 1)
        self.assertTrue(samples)
        print(f"inflight_bytes max {max(samples):.0f} of hard bound {hard}, "
              f"pauses {d.metric('mailpump_consumer_pauses_total'):.0f}, "
              f"refused {d.metric('mailpump_deliveries_refused_total'):.0f}", file=sys.stderr)
        self.assertLessEqual(max(samples), hard)
        self.assertGreater(max(samples), 0)
        self.assertEqual(d.metric("mailpump_inflight_bytes"), 0)
        self.assertNotIn("connection_lost", log)


if __name__ == "__main__":
    unittest.main()

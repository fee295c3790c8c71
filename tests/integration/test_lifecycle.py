"""Message lifecycle on the real stack: the Redis ledger (skip what was
delivered, flag possible duplicates), poison and oversized messages, Redis
going away mid-run, and kill -9 of mailpumpd in the middle of a batch or
before a transaction reached DATA.

Receivers: Postfix (mx1) and Postfix's smtp-sink started here on a private
port, with a slow reply to the final dot so that many messages are in
flight when the daemon dies, and a dump file per received message so that
copies can be counted by Message-ID.
"""
import glob
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
import pika  # noqa: E402


def redis_cli(port, *args):
    r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


class Ledger(unittest.TestCase):
    def setUp(self):
        self.env = mpstack.stack_env()
        self.rport = self.env["MP_REDIS_PORT"]

    def test_redelivery_skips_done_and_flags_sending(self):
        d = mpstack.Daemon(self.env, workers=1)
        tap = mpstack.EventTap(self.env, d.exchange)
        msg_id = "ledger-" + os.urandom(6).hex()
        # as if an earlier attempt died: kate was delivered, liam was mid-send
        redis_cli(self.rport, "SET", f"mp:r:{msg_id}:kate@test.example", "done", "PX", "600000")
        redis_cli(self.rport, "SET", f"mp:r:{msg_id}:liam@test.example", "sending", "PX", "600000")
        try:
            d.start()
            r = d.cli("enqueue", "--id", msg_id, "--from", "bob@test.example",
                      "--to", "kate@test.example", "--to", "Liam@test.example",
                      "--to", "mia@test.example", "--text", "ledger")
            self.assertEqual(r.returncode, 0, r.stderr)
            evs = {e["recipient"].lower(): e for e in
                   tap.wait(lambda e: e.get("message_id") == msg_id and "recipient" in e, 3)}
            self.assertEqual(evs["kate@test.example"]["event"], "delivered")
            self.assertTrue(evs["kate@test.example"].get("already_delivered"))
            self.assertEqual(evs["kate@test.example"]["reason"], "already_delivered")
            self.assertTrue(evs["liam@test.example"].get("possible_duplicate"))
            self.assertEqual(evs["liam@test.example"]["smtp"]["code"], 250)
            self.assertNotIn("possible_duplicate", evs["mia@test.example"])
            self.assertNotIn("already_delivered", evs["mia@test.example"])
            # kate was not sent again; liam and mia were
            got = set()
            deadline = time.time() + 20
            while time.time() < deadline and len(got) < 2:
                got = set()
                for sub in ("new", "cur"):
                    dd = os.path.join(self.env["MP_MX1_MAILDIR"], sub)
                    for name in os.listdir(dd):
                        with open(os.path.join(dd, name), "rb") as f:
                            data = f.read()
                        if msg_id.encode() in data:
                            m = re.search(rb"Delivered-To: (\S+)", data)
                            got.add(m.group(1).decode().lower())
                time.sleep(0.1)
            self.assertEqual(got, {"liam@test.example", "mia@test.example"})
            # liam's copy was flagged: its record keeps the flag (done-dup)
            # until a redelivery has reported it
            for rcpt, state in (("kate", "done"), ("liam", "done-dup"), ("mia", "done")):
                self.assertEqual(redis_cli(self.rport, "GET", f"mp:r:{msg_id}:{rcpt}@test.example"),
                                 state)
            self.assertEqual(d.metric("mailpump_recipients_skipped_already_delivered_total"), 1)
            self.assertEqual(d.metric("mailpump_recipients_possible_duplicate_total"), 1)
        finally:
            self.assertEqual(d.stop(), 0)
            tap.close()

    def test_poison_message_goes_to_dead_letter(self):
        d = mpstack.Daemon(self.env, workers=1, extra_env={"MAILPUMP_RETRY_POISON_REDELIVERIES": "3"})
        tap = mpstack.EventTap(self.env, d.exchange)
        msg_id = "poison-" + os.urandom(6).hex()
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
            ch.confirm_delivery()
            body = json.dumps({"id": msg_id, "from": "bob@test.example",
                               "to": ["nora@test.example"], "text": "poison"})
            ch.basic_publish("", d.queue, body, pika.BasicProperties(delivery_mode=2))
            # an earlier consumer took it and died: it comes back redelivered
            method, _, _ = ch.basic_get(d.queue, auto_ack=False)
            self.assertIsNotNone(method)
            ch.basic_nack(method.delivery_tag, requeue=True)
            # three earlier attempts crashed a worker or could not be finished
            redis_cli(self.rport, "SET", f"mp:d:{msg_id}", "3", "PX", "600000")
            d.start()
            ev = tap.wait(lambda e: e["event"] == "dead" and e.get("message_id") == msg_id, 1)[0]
            self.assertIn("poison: 3 attempts of this message crashed a worker or could not be finished "
                          "(limit 3)", ev["error"])
            self.assertEqual(ev["recipient"], "nora@test.example")
            # the check only reads the count
            self.assertEqual(redis_cli(self.rport, "GET", f"mp:d:{msg_id}"), "3")
            deadline = time.time() + 10
            method = None
            while method is None and time.time() < deadline:
                method, props, got = ch.basic_get(d.dead_queue, auto_ack=True)
                time.sleep(0.05)
            self.assertIsNotNone(method)
            self.assertIn("poison", props.headers["x-mailpump-reason"])
            self.assertEqual(json.loads(got)["id"], msg_id)
            self.assertEqual(d.metric("mailpump_messages_poison_total"), 1)
        finally:
            conn.close()
            self.assertEqual(d.stop(), 0)
            tap.close()

    def poison_with_done(self, msg_id, rcpts, done):
        """Publish msg_id to rcpts, redelivered, its poison count at the
        limit (3) and the ledger showing done delivered; returns the
        daemon, the tap and the channel (the caller closes them)."""
        d = mpstack.Daemon(self.env, workers=1, extra_env={"MAILPUMP_RETRY_POISON_REDELIVERIES": "3"})
        tap = mpstack.EventTap(self.env, d.exchange)
        conn, ch = mpstack.amqp_channel(self.env)
        ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
        ch.confirm_delivery()
        ch.basic_publish("", d.queue, json.dumps({"id": msg_id, "from": "bob@test.example", "to": rcpts,
                                                  "text": "poison, partly delivered"}),
                         pika.BasicProperties(delivery_mode=2))
        method, _, _ = ch.basic_get(d.queue, auto_ack=False)
        self.assertIsNotNone(method)
        ch.basic_nack(method.delivery_tag, requeue=True)
        for rcpt in done:
            redis_cli(self.rport, "SET", f"mp:r:{msg_id}:{rcpt}", "done", "PX", "600000")
        redis_cli(self.rport, "SET", f"mp:d:{msg_id}", "3", "PX", "600000")
        d.start()
        return d, tap, conn, ch

    def test_poisoned_message_reports_its_delivered_recipients(self):
        # the ledger shows olive delivered: she gets her delivered event,
        # only pete is dead-lettered
        msg_id = "poisondone-" + os.urandom(6).hex()
        d, tap, conn, ch = self.poison_with_done(msg_id, ["olive@test.example", "pete@test.example"],
                                                 ["olive@test.example"])
        try:
            evs = tap.wait(lambda e: e.get("message_id") == msg_id, 2)
            by = {e["event"]: e for e in evs}
            self.assertEqual(set(by), {"delivered", "dead"}, evs)
            self.assertEqual(by["delivered"]["recipient"], "olive@test.example")
            self.assertTrue(by["delivered"].get("already_delivered"))
            self.assertEqual(by["dead"]["recipient"], "pete@test.example")
            self.assertIn("poison: 3 attempts", by["dead"]["error"])
            evs = [e for e in tap.drain() if e.get("message_id") == msg_id]
            self.assertEqual(sorted(e["event"] for e in evs), ["dead", "delivered"], evs)
            method = None
            deadline = time.time() + 10
            while method is None and time.time() < deadline:
                method, props, got = ch.basic_get(d.dead_queue, auto_ack=True)
                time.sleep(0.05)
            self.assertIsNotNone(method)
            self.assertEqual(json.loads(got)["id"], msg_id)
            self.assertEqual(d.metric("mailpump_messages_poison_total"), 1)
        finally:
            conn.close()
            self.assertEqual(d.stop(), 0)
            tap.close()

    def test_poison_count_at_the_limit_with_every_recipient_done_is_acked(self):
        msg_id = "poisonall-" + os.urandom(6).hex()
        d, tap, conn, ch = self.poison_with_done(msg_id, ["quentin@test.example"], ["quentin@test.example"])
        try:
            ev = tap.wait(lambda e: e.get("message_id") == msg_id, 1)[0]
            self.assertEqual(ev["event"], "delivered")
            self.assertTrue(ev.get("already_delivered"))
            evs = [e for e in tap.drain(quiet=0.5) if e.get("message_id") == msg_id]
            self.assertEqual([e["event"] for e in evs if e["event"] != "appended"], ["delivered"], evs)
            self.assertEqual(d.metric("mailpump_messages_poison_total"), 0)
            self.assertEqual(d.metric("mailpump_messages_done_total"), 1)
            method, _, _ = ch.basic_get(d.dead_queue, auto_ack=True)
            self.assertIsNone(method)
        finally:
            conn.close()
            self.assertEqual(d.stop(), 0)
            tap.close()

    def test_oversized_message_goes_to_dead_letter(self):
        d = mpstack.Daemon(self.env, workers=1, extra_env={"MAILPUMP_MESSAGE_MAX_SIZE": "4000"})
        tap = mpstack.EventTap(self.env, d.exchange)
        try:
            d.start()
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "olga@test.example",
                      "--text", "x" * 6000)
            self.assertEqual(r.returncode, 0, r.stderr)
            msg_id = r.stdout.strip()
            ev = tap.wait(lambda e: e["event"] == "dead" and e.get("message_id") == msg_id, 1)[0]
            self.assertRegex(ev["error"], r"(?i)larger|size|too big")
            # the worker goes on
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "olga@test.example",
                      "--text", "small")
            ok = r.stdout.strip()
            tap.wait(lambda e: e["event"] == "delivered" and e.get("message_id") == ok, 1)
        finally:
            self.assertEqual(d.stop(), 0)
            tap.close()


class Retries(unittest.TestCase):
    def test_greylisted_recipient_delivered_on_a_later_attempt(self):
        env = mpstack.stack_env()
        # greylists grey@ once, asking for 2 seconds; everything else is accepted
        sink = mpstack.Sink(rules=["rcpt:grey@test.example#1=450 4.7.1 greylisted, "
                                   "try again in 2 seconds",
                                   "rcpt:hard@test.example=550 5.1.1 no such user"])
        d = mpstack.Daemon(env, workers=1, extra_env={
            "MAILPUMP_SMTP_PORT": str(sink.port), "MAILPUMP_SMTP_TLS": "none",
            "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_LEVELS": "500ms,1s,3s,10s",
            "MAILPUMP_RETRY_P1_BASE": "500ms"})
        tap = mpstack.EventTap(env, d.exchange)
        try:
            d.start()
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "grey@test.example",
                      "--to", "ok@test.example", "--to", "hard@test.example",
                      "--priority", "5", "--text", "greylisting")
            self.assertEqual(r.returncode, 0, r.stderr)
            mid = r.stdout.strip()
            evs = tap.wait(lambda e: e.get("message_id") == mid and "recipient" in e, 4)
            grey = sorted((e for e in evs if e["recipient"] == "grey@test.example"),
                          key=lambda e: e["attempt"])
            self.assertEqual([(e["event"], e["attempt"]) for e in grey],
                             [("deferred", 1), ("delivered", 2)])
            self.assertEqual(grey[0]["reason"], "greylisted")
            # the server asked for 2 s: the 3 s level, not the 500 ms backoff
            self.assertEqual(grey[0]["retry_in_ms"], 3000)
            self.assertGreaterEqual(grey[1]["age_ms"], 3000)
            self.assertLess(grey[0]["age_ms"], 3000)
            others = {e["recipient"]: e for e in evs if e["recipient"] != "grey@test.example"}
            self.assertEqual(others["ok@test.example"]["event"], "delivered")
            self.assertEqual(others["ok@test.example"]["attempt"], 1)
            self.assertEqual(others["hard@test.example"]["event"], "bounced")
            self.assertEqual(others["hard@test.example"]["reason"], "no_such_user")
            # only the pending recipient went out again: ok on attempt 1, grey on attempt 2
            rcpts = []
            for m in sink.messages():
                rcpts += re.findall(rb"X-Sink-Rcpt-To: <?([^>\r\n]+)", m)
            self.assertEqual(sorted(x.decode() for x in rcpts),
                             ["grey@test.example", "ok@test.example"])
        finally:
            self.assertEqual(d.stop(), 0)
            tap.close()
            sink.stop()


def count_copies(needle):
    """Messages holding needle in the stack's receivers' maildirs."""
    n = 0
    for mx in ("mx1", "mx2"):
        for sub in ("new", "cur"):
            d = os.path.join("/tmp/mpstack", mx, "inbox", sub)
            for name in os.listdir(d) if os.path.isdir(d) else ():
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        n += needle.encode() in f.read()
                except FileNotFoundError:
                    pass
    return n


class RedisOutage(unittest.TestCase):
    """A private Redis, stopped mid-run and started again."""

    def start_redis(self, port, workdir):
        subprocess.run(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--dir", workdir,
                        "--pidfile", os.path.join(workdir, "redis.pid"),
                        "--logfile", os.path.join(workdir, "redis.log")], check=True, timeout=10)
        deadline = time.time() + 10
        while time.time() < deadline and redis_cli(port, "PING") != "PONG":
            time.sleep(0.05)
        self.assertEqual(redis_cli(port, "PING"), "PONG")

    def stop_redis(self, port):
        redis_cli(port, "SHUTDOWN", "NOSAVE")
        deadline = time.time() + 10
        while time.time() < deadline and redis_cli(port, "PING") == "PONG":
            time.sleep(0.05)

    def outage_daemon(self, **extra):
        env = mpstack.stack_env()
        port = mpstack.free_port()
        workdir = tempfile.mkdtemp(prefix="mp-redis-")
        self.start_redis(port, workdir)
        d = mpstack.Daemon(env, workers=1, extra_env={"MAILPUMP_REDIS_PORT": str(port),
                                                       "MAILPUMP_REDIS_MARK_WAIT": "300ms",
                                                       "MAILPUMP_RETRY_LEVELS": "1s,2s", **extra})
        tap = mpstack.EventTap(env, d.exchange)
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        self.addCleanup(self.stop_redis, port)
        return d, tap, port, workdir

    def send(self, d, tag):
        r = d.cli("enqueue", "--from", "bob@test.example", "--to", f"{tag}@test.example", "--text", tag)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def test_no_copy_goes_unrecorded_while_redis_is_down(self):
        # default: a copy whose "sending" mark Redis cannot record is not
        # sent (deferred, ledger_unavailable) and goes once Redis is back
        d, tap, port, workdir = self.outage_daemon()
        try:
            d.start()
            first = self.send(d, "before")
            tap.wait(lambda e: e["event"] == "delivered" and e.get("message_id") == first, 1)
            self.assertEqual(redis_cli(port, "GET", f"mp:r:{first}:before@test.example"), "done")
            self.stop_redis(port)
            tag = "during-" + os.urandom(4).hex()
            mid = self.send(d, tag)
            ev = tap.wait(lambda e: e.get("message_id") == mid, 1, timeout=30)[0]
            self.assertEqual(ev["event"], "deferred", ev)
            self.assertEqual(ev["reason"], "ledger_unavailable", ev)
            self.assertIn("not sent", ev.get("error", ""), ev)
            self.assertEqual(count_copies(tag), 0)
            self.assertGreaterEqual(d.metric("mailpump_ledger_not_sent_total"), 1)
            self.start_redis(port, workdir)
            ev = tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "delivered", 1, timeout=60)[0]
            self.assertFalse(ev.get("possible_duplicate"), ev)
            self.assertEqual(redis_cli(port, "GET", f"mp:r:{mid}:{tag}@test.example"), "done")
            self.assertEqual(count_copies(tag), 1)
        finally:
            self.assertEqual(d.stop(), 0)
            tap.close()

    def test_send_unrecorded_delivers_through_the_outage(self):
        d, tap, port, workdir = self.outage_daemon(MAILPUMP_REDIS_SEND_UNRECORDED="1")
        try:
            d.start()
            self.stop_redis(port)
            mid = self.send(d, "unrecorded")
            ev = tap.wait(lambda e: e.get("message_id") == mid, 1, timeout=30)[0]
            self.assertEqual(ev["event"], "delivered", ev)  # at-least-once, as configured
            self.assertGreaterEqual(d.metric("mailpump_ledger_unavailable_total"), 1)
            self.assertEqual(d.metric("mailpump_ledger_not_sent_total"), 0)
            self.start_redis(port, workdir)
            deadline = time.time() + 15
            last = None
            while time.time() < deadline:
                last = self.send(d, "after")
                tap.wait(lambda e: e["event"] == "delivered" and e.get("message_id") == last, 1)
                if redis_cli(port, "GET", f"mp:r:{last}:after@test.example") == "done":
                    break
                time.sleep(0.5)
            self.assertEqual(redis_cli(port, "GET", f"mp:r:{last}:after@test.example"), "done")
        finally:
            self.assertEqual(d.stop(), 0)
            tap.close()


def start_slowsink(test, delay, *extra):
    """slowsink.py on 127.0.0.2:<free port> storing into a fresh dump
    directory; returns (port, dumpdir, process) once it is ready."""
    port = mpstack.free_port()
    dumpdir = tempfile.mkdtemp(prefix="mp-sink-")
    os.chmod(dumpdir, 0o777)
    sink = subprocess.Popen(["/usr/bin/python3",
                             os.path.join(os.path.dirname(os.path.abspath(__file__)), "slowsink.py"),
                             "127.0.0.2", str(port), dumpdir, delay, *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    test.assertEqual(sink.stdout.readline().strip(), "ready")
    return port, dumpdir, sink


def cleanup_kill_run(d, d2, tap, sink, dumpdir):
    """End what a kill -9 test started: both daemons, the event tap, the
    sink (stdin closed: it exits) and its dump directory."""
    for daemon in (d, d2):
        if daemon is not None and daemon.proc and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
    d.delete_topology()
    tap.close()
    sink.stdin.close()
    try:
        sink.wait(10)
    except subprocess.TimeoutExpired:
        sink.kill()
        sink.wait()
    sink.stdout.close()
    shutil.rmtree(dumpdir, ignore_errors=True)


class KillNine(unittest.TestCase):
    COUNT = 1000

    def test_kill9_mid_batch_loses_nothing_and_flags_duplicates(self):
        env = mpstack.stack_env()
        # stores each message at the final dot, answers 1 s later
        port, dumpdir, sink = start_slowsink(self, "1.0")
        # short retry levels: a connection the sink's listen backlog refuses
        # under the burst is retried within seconds, not minutes
        extra = {"MAILPUMP_SMTP_PORT": str(port), "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_IMAP_HOST": "", "MAILPUMP_AMQP_PREFETCH": "150",
                 "MAILPUMP_RETRY_LEVELS": "500ms,1s,2s", "MAILPUMP_RETRY_P2_BASE": "500ms",
                 "MAILPUMP_RETRY_P2_MAX_ATTEMPTS": "50",
                 # 5 % of the RFC 5321 timeouts: a connection stuck in the
                 # sink's accept queue costs 15 s of greeting wait, not 5 min
                 "MAILPUMP_SMTP_TIMEOUT_SCALE": "5"}
        d = mpstack.Daemon(env, workers=2, extra_env=extra)
        d2 = None
        tap = mpstack.EventTap(env, d.exchange)
        try:
            conn, ch = mpstack.amqp_channel(env)
            ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
            ch.confirm_delivery()
            ids = [f"k9-{i:05d}-{os.urandom(3).hex()}" for i in range(self.COUNT)]
            for mid in ids:
                ch.basic_publish("", d.queue, json.dumps({
                    "id": mid, "from": "bob@test.example", "to": ["pat@test.example"],
                    "text": "kill -9"}), pika.BasicProperties(delivery_mode=2))
            conn.close()
            d.start()
            # wait until some are delivered and many are in flight, then kill -9
            deadline = time.time() + 60
            while time.time() < deadline:
                delivered = {e["message_id"] for e in tap.events if e["event"] == "delivered"}
                if len(delivered) >= 100 and d.metric("mailpump_messages_inflight") >= 100:
                    break
                tap.drain(quiet=0.05)
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            killed_at = len({e["message_id"] for e in tap.events if e["event"] == "delivered"})
            d2 = mpstack.Daemon(env, workers=2, extra_env=extra)
            d2.queue, d2.dead_queue, d2.exchange = d.queue, d.dead_queue, d.exchange
            d2.proc_env.update({"MAILPUMP_AMQP_QUEUE": d.queue,
                                "MAILPUMP_AMQP_DEAD_QUEUE": d.dead_queue,
                                "MAILPUMP_AMQP_EVENTS_EXCHANGE": d.exchange,
                                "MAILPUMP_RETRY_QUEUE_PREFIX":
                                    d.proc_env["MAILPUMP_RETRY_QUEUE_PREFIX"]})
            d2.start()
            want = set(ids)
            try:
                tap.wait(lambda e: e["event"] == "delivered" and e["message_id"] in want,
                         self.COUNT, timeout=180)
            except AssertionError:
                got = {e["message_id"] for e in tap.events if e["event"] == "delivered"}
                lost = sorted(want - got)
                self.fail(f"{len(lost)} not delivered, e.g. {lost[:5]}; logs {d.log_path} "
                          f"{d2.log_path}")
            # wait for stragglers (a message delivered twice has two events)
            tap.drain(quiet=1.5)
            delivered = {}
            for e in tap.events:
                if e["event"] == "delivered":
                    delivered.setdefault(e["message_id"], []).append(e)
            self.assertEqual(set(delivered), want, "every message delivered")
            self.assertEqual(d2.stop(), 0)
            copies = {}
            for path in glob.glob(os.path.join(dumpdir, "*")):
                with open(path, "rb") as f:
                    m = re.search(rb"Message-ID: <(k9-[^@>]+)@", f.read(), re.I)
                if m:
                    copies[m.group(1).decode()] = copies.get(m.group(1).decode(), 0) + 1
            missing = want - set(copies)
            self.assertEqual(missing, set(), "the receiver got every message")
            twice = {mid for mid, n in copies.items() if n >= 2}
            flagged = {mid for mid, evs in delivered.items()
                       if any(e.get("possible_duplicate") for e in evs)}
            self.assertLessEqual(twice, flagged,
                                 f"received twice but not flagged: {sorted(twice - flagged)[:5]}")
            skipped = sum(1 for evs in delivered.values()
                          for e in evs if e.get("already_delivered"))
            print(f"\nkill -9 after {killed_at} delivered events: {len(twice)} received twice, "
                  f"{len(flagged)} flagged possible_duplicate, {skipped} skipped as already "
                  f"delivered, {self.COUNT} of {self.COUNT} delivered", file=sys.stderr)
        finally:
            cleanup_kill_run(d, d2, tap, sink, dumpdir)

    def test_kill9_before_data_flags_nothing(self):
        """Killed while the receiver sits on its RCPT reply: no DATA, so the
        message cannot have been delivered. The ledger holds no "sending"
        mark for it and the redelivery is not a possible duplicate."""
        env = mpstack.stack_env()
        rport = env["MP_REDIS_PORT"]
        port, dumpdir, sink = start_slowsink(self, "0", "--stall-first-rcpt", "120")
        extra = {"MAILPUMP_SMTP_PORT": str(port), "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_IMAP_HOST": ""}
        d = mpstack.Daemon(env, workers=1, extra_env=extra)
        d2 = None
        tap = mpstack.EventTap(env, d.exchange)
        msg_id = "k9rcpt-" + os.urandom(6).hex()
        key = f"mp:r:{msg_id}:quinn@test.example"
        try:
            d.start()
            r = d.cli("enqueue", "--id", msg_id, "--from", "bob@test.example",
                      "--to", "quinn@test.example", "--text", "killed before DATA")
            self.assertEqual(r.returncode, 0, r.stderr)
            ready, _, _ = select.select([sink.stdout], [], [], 30)
            self.assertTrue(ready, "the receiver never got the RCPT")
            self.assertEqual(sink.stdout.readline().strip(), "rcpt-stalled")
            time.sleep(0.3)  # the ledger lookup is long done; a mark would be in Redis
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            # nothing in the ledger: the transaction never got to its final dot
            self.assertEqual(redis_cli(rport, "GET", key), "")
            d2 = mpstack.Daemon(env, workers=1, extra_env=extra, queues_of=d)
            d2.start()
            ev = tap.wait(lambda e: e["event"] == "delivered" and e.get("message_id") == msg_id, 1)[0]
            self.assertNotIn("possible_duplicate", ev)
            self.assertNotIn("already_delivered", ev)
            self.assertEqual(ev["attempt"], 1)
            self.assertEqual(redis_cli(rport, "GET", key), "done")
            self.assertEqual(d2.metric("mailpump_recipients_possible_duplicate_total"), 0)
            copies = 0
            for path in glob.glob(os.path.join(dumpdir, "*")):
                with open(path, "rb") as f:
                    copies += msg_id.encode() in f.read()
            self.assertEqual(copies, 1)
            self.assertEqual(d2.stop(), 0)
        finally:
            cleanup_kill_run(d, d2, tap, sink, dumpdir)


class CrashLoop(unittest.TestCase):
    def test_kill9_loop_does_not_make_a_message_poison(self):
        """A message in flight (its receiver sits on the DATA reply) while
        the daemon is killed with SIGKILL more times than the poison limit:
        SIGKILL is no fault of the message, so it is not dead-lettered and
        ends delivered, once."""
        env = mpstack.stack_env()
        rport = env["MP_REDIS_PORT"]
        sink = mpstack.Sink(addr="127.0.0.2", rules=["delay:DATA=2500"])
        extra = {"MAILPUMP_SMTP_PORT": str(sink.port), "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_POISON_REDELIVERIES": "2"}
        d = mpstack.Daemon(env, workers=1, extra_env=extra)
        tap = mpstack.EventTap(env, d.exchange)
        msg_id = "crashloop-" + os.urandom(6).hex()
        daemons = [d]
        try:
            d.start()
            r = d.cli("enqueue", "--id", msg_id, "--from", "bob@test.example",
                      "--to", "rosa@test.example", "--text", "in flight while killed")
            self.assertEqual(r.returncode, 0, r.stderr)
            for kill in range(3):  # more than the limit
                deadline = time.time() + 20
                def received():
                    return any("event=message_received" in line and f'msg="{msg_id}"' in line
                               for line in daemons[-1].log().splitlines())
                while not received() and time.time() < deadline:
                    time.sleep(0.05)
                self.assertTrue(received(), daemons[-1].log())
                time.sleep(0.7)  # at the receiver, waiting for its DATA reply
                daemons[-1].proc.send_signal(signal.SIGKILL)
                daemons[-1].proc.wait(10)
                daemons.append(mpstack.Daemon(env, workers=1, extra_env=extra, queues_of=d))
                daemons[-1].start()
            evs = tap.wait(lambda e: e.get("message_id") == msg_id and e["event"] in ("delivered", "dead"), 1,
                           timeout=60)
            self.assertEqual(evs[0]["event"], "delivered", evs)
            self.assertEqual(redis_cli(rport, "GET", f"mp:d:{msg_id}"), "")
            self.assertEqual(daemons[-1].metric("mailpump_messages_poison_total"), 0)
            self.assertEqual(sum(msg_id.encode() in m for m in sink.messages()), 1)
            self.assertEqual(daemons[-1].stop(), 0)
        finally:
            for daemon in daemons:
                if daemon.proc and daemon.proc.poll() is None:
                    daemon.proc.kill()
                    daemon.proc.wait(10)
            d.delete_topology()
            tap.close()
            sink.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)

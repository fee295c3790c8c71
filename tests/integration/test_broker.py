"""The broker going away and mailpumpd going away, mid-run.

- BrokerRestart: a private RabbitMQ node (privbroker.py; the shared stack's
  broker is never touched) is stopped and started again on the same data
  directory while mailpumpd delivers a batch, once cleanly (rabbitmqctl
  stop) and once killed with SIGKILL. mailpumpd must keep running,
  reconnect by itself and deliver every message; after the kill it also
  gets SIGTERM while the broker is away and must exit 0 on time.
- FrozenBroker: the private broker stops answering (SIGSTOP); SIGTERM still
  ends mailpumpd within the grace period.
- ResourceAlarm: the private broker's memory alarm blocks publishers while
  mailpumpd consumes a preloaded batch; the workers deliver it, hold their
  events until the alarm clears, then publish them: nothing lost or doubled.
- Redeclare: the consumed queue and a delay queue are deleted under a
  running daemon (shared stack, private names); the broker cancels the
  consumer, the worker reconnects and declares them again.
- GracefulShutdown: SIGTERM in the middle of a batch on the shared stack
  (private queue names). mailpumpd exits 0 within [worker]
  shutdown_grace_ms; a second daemon on the same queues delivers the rest.
  Once with in-flight work shorter than the grace period (nothing is cut:
  every message is delivered exactly once), once with a receiver slower
  than the grace period (the cut messages stay unacknowledged and come
  back).

The receiver is slowsink.py on 127.0.0.2 (mx1.test.example, so the stack's
DNS finds it) at a free port: it stores each message when its final dot
arrives and answers later, so copies are counted by Message-ID. A copy
received twice must be explained by a `possible_duplicate` event (the
RFC 1047 window: the connection died while the reply to the dot was in
flight).
"""
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
import privbroker  # noqa: E402
import pika  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class SlowSink:
    """slowsink.py on 127.0.0.2:<free port>, storing into dumpdir."""

    def __init__(self, dumpdir, delay):
        self.port = mpstack.free_port()
        self.proc = subprocess.Popen(["/usr/bin/python3", os.path.join(HERE, "slowsink.py"),
                                      "127.0.0.2", str(self.port), dumpdir, str(delay)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"slowsink did not start: {line!r}")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def receiver_copies(dumpdir, prefix):
    """Message-ID -> number of copies the sink stored."""
    copies = {}
    for path in glob.glob(os.path.join(dumpdir, "*")):
        try:
            with open(path, "rb") as f:
                m = re.search(rb"Message-ID: <(" + prefix.encode() + rb"[^@>]+)@", f.read(), re.I)
        except FileNotFoundError:
            continue
        if m:
            mid = m.group(1).decode()
            copies[mid] = copies.get(mid, 0) + 1
    return copies


class DurableTap:
    """Events from a durable queue bound to the events exchange, read over a
    connection that is re-opened whenever the broker goes away: events
    confirmed before a broker restart are still there after it."""

    def __init__(self, env, exchange, queue):
        self.env, self.exchange, self.queue = env, exchange, queue
        self.conn = self.ch = None
        self.events = []
        self._open()
        self.ch.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
        self.ch.queue_declare(queue=queue, durable=True)
        self.ch.queue_bind(queue=queue, exchange=exchange, routing_key="#")
        self.reconnects = 0

    def _open(self):
        self.conn, self.ch = mpstack.amqp_channel(self.env)

    def _get(self):
        """One event or None; None also while the broker is away."""
        try:
            if self.conn is None or self.conn.is_closed:
                self._open()
                self.reconnects += 1
            method, _, body = self.ch.basic_get(self.queue, auto_ack=False)
            if method is None:
                return None
            ev = json.loads(body)
            ev["_routing_key"] = method.routing_key
            self.events.append(ev)
            # acked after it is recorded: a loss in between means a second
            # copy, never a missing event (counts use distinct ids)
            self.ch.basic_ack(method.delivery_tag)
            return ev
        except (pika.exceptions.AMQPError, OSError):
            self.close()
            time.sleep(0.2)
            return None

    def poll(self, seconds):
        end = time.time() + seconds
        while time.time() < end:
            if self._get() is None:
                time.sleep(0.05)

    def delivered_ids(self):
        return {e["message_id"] for e in self.events if e["event"] == "delivered"}

    def wait_delivered(self, want, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if want <= self.delivered_ids():
                return
            if self._get() is None:
                time.sleep(0.05)
        missing = sorted(want - self.delivered_ids())
        raise AssertionError(f"{len(missing)} of {len(want)} messages have no delivered event "
                             f"after {timeout}s, e.g. {missing[:5]}")

    def drain(self, quiet=1.0):
        last = time.time()
        while time.time() - last < quiet:
            if self._get() is None:
                time.sleep(0.05)
            else:
                last = time.time()

    def close(self):
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:
            pass
        self.conn = self.ch = None


def publish_batch(env, queue, ids, text):
    """Persistent messages on a durable priority queue, with confirms."""
    conn, ch = mpstack.amqp_channel(env)
    try:
        ch.queue_declare(queue, durable=True, arguments={"x-max-priority": 10})
        ch.confirm_delivery()
        for mid in ids:
            ch.basic_publish("", queue, json.dumps({
                "id": mid, "from": "bob@test.example", "to": ["pat@test.example"],
                "text": text}), pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()


def check_copies(test, ids, copies, events):
    """Every message reached the receiver; a second copy is explained by a
    possible_duplicate event. Returns (twice, flagged, skipped)."""
    missing = set(ids) - set(copies)
    test.assertEqual(missing, set(), f"the receiver lacks {len(missing)} messages")
    flagged = {e["message_id"] for e in events
               if e["event"] == "delivered" and e.get("possible_duplicate")}
    skipped = {e["message_id"] for e in events
               if e["event"] == "delivered" and e.get("already_delivered")}
    twice = {mid for mid, n in copies.items() if n >= 2}
    test.assertLessEqual(twice, flagged,
                         f"received twice without a possible_duplicate event: "
                         f"{sorted(twice - flagged)[:5]}")
    return twice, flagged, skipped


def sink_env(port, **more):
    """Daemon settings for a slowsink receiver: plaintext, no Sent copy,
    short retry levels (a connection refused under the burst is retried
    within seconds) and scaled SMTP timeouts."""
    env = {"MAILPUMP_SMTP_PORT": str(port), "MAILPUMP_SMTP_TLS": "none",
           "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_LEVELS": "500ms,1s,2s",
           "MAILPUMP_RETRY_P2_BASE": "500ms", "MAILPUMP_RETRY_P2_MAX_ATTEMPTS": "50",
           "MAILPUMP_SMTP_TIMEOUT_SCALE": "5"}
    env.update(more)
    return env


def stop_all(d, tap, sink, broker, dumpdir):
    """A test's cleanup: the daemon killed if still running, then the tap,
    the receiver, the private broker and the receiver's directory (None
    for what was never made)."""
    if d is not None and d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()
    if tap is not None:
        tap.close()
    if sink is not None:
        sink.close()
    broker.close()
    shutil.rmtree(dumpdir, ignore_errors=True)


def wait_ready(d, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if d.http("/readyz")[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


class BrokerRestart(unittest.TestCase):
    COUNT = 500

    def test_broker_restart_mid_run_loses_nothing(self):
        """rabbitmqctl stop, then start on the same data directory."""
        self.run_restart("br", lambda b: b.restart())

    def test_broker_killed_mid_run_loses_nothing(self):
        """The broker is killed (SIGKILL): connections drop without a
        connection.close, publishes and acks can fail on a dead socket."""
        def crash(b):
            b.kill_node()
            b.start()
        self.run_restart("bk", crash, stop_without_broker=True)

    def run_restart(self, prefix, restart, stop_without_broker=False):
        """A batch through a private broker, restart(broker) mid-run. With
        stop_without_broker the broker is killed again at the end and the
        daemon gets SIGTERM while it is away."""
        base = mpstack.stack_env()
        broker = privbroker.PrivateBroker()
        dumpdir = tempfile.mkdtemp(prefix="mp-sink-")
        os.chmod(dumpdir, 0o777)
        sink = d = tap = None
        try:
            broker.start()
            env = broker.stack_env(base)
            sink = SlowSink(dumpdir, 0.3)
            d = mpstack.Daemon(env, workers=2, extra_env=sink_env(
                sink.port, MAILPUMP_AMQP_PREFETCH="20", MAILPUMP_AMQP_HEARTBEAT="5",
                MAILPUMP_WORKER_SHUTDOWN_GRACE_MS="5000"))
            tap = DurableTap(env, d.exchange, d.queue + ".tap")
            ids = [f"{prefix}-{i:05d}-{os.urandom(3).hex()}" for i in range(self.COUNT)]
            publish_batch(env, d.queue, ids, "broker restart")
            d.start()
            # restart once some are delivered and more are in flight
            deadline = time.time() + 60
            while len(receiver_copies(dumpdir, prefix)) < self.COUNT // 5:
                self.assertLess(time.time(), deadline, "deliveries did not start")
                tap.poll(0.1)
            at_restart = len(receiver_copies(dumpdir, prefix))
            inflight = d.metric("mailpump_messages_inflight")
            t0 = time.time()
            restart(broker)
            down_s = time.time() - t0
            self.assertIsNone(d.proc.poll(), "mailpumpd exited when the broker went away")
            self.assertTrue(wait_ready(d, 90), "/readyz not 200 within 90 s of the restart")
            ready_s = time.time() - t0
            tap.wait_delivered(set(ids), timeout=120)
            tap.drain(quiet=1.5)
            self.assertIsNone(d.proc.poll(), "mailpumpd exited")
            log = d.log()
            self.assertIn("connection_lost", log)
            self.assertGreaterEqual(log.count("event=consuming"), 4,
                                    "every worker logs consuming again")
            copies = receiver_copies(dumpdir, prefix)
            twice, flagged, skipped = check_copies(self, ids, copies, tap.events)
            dead = [e for e in tap.events if e["event"] == "dead"]
            self.assertEqual(dead, [], "nothing dead-lettered")
            if stop_without_broker:
                broker.kill_node()
                deadline = time.time() + 10
                while d.log().count("event=connection_lost") < 4 and time.time() < deadline:
                    time.sleep(0.1)
                t1 = time.time()
                d.proc.send_signal(signal.SIGTERM)
                self.assertEqual(d.proc.wait(5 + 10), 0, "exit status, broker away")
                self.assertLess(time.time() - t1, 5 + 2, "SIGTERM while the broker is away")
            else:
                self.assertEqual(d.stop(), 0)
            name = self.id().rsplit(".", 1)[-1]
            print(f"\n{name}: restart after {at_restart} received ({inflight:.0f} in flight), "
                  f"broker down {down_s:.1f} s, ready again after {ready_s:.1f} s: "
                  f"{self.COUNT} of {self.COUNT} delivered, {len(twice)} received twice, "
                  f"{len(flagged)} flagged possible_duplicate, {len(skipped)} skipped as "
                  f"already delivered, tap reconnects {tap.reconnects}", file=sys.stderr)
        finally:
            stop_all(d, tap, sink, broker, dumpdir)  # the private queues go with the broker


class FrozenBroker(unittest.TestCase):

    def test_sigterm_with_a_frozen_broker_exits_within_grace(self):
        """The broker stops answering (SIGSTOP: the TCP connections stay
        up). SIGTERM must still end mailpumpd within the grace period:
        closing the connection may not wait for the heartbeat to give up
        (2 x 30 s)."""
        broker = privbroker.PrivateBroker()
        d = None
        try:
            broker.start()
            env = broker.stack_env(mpstack.stack_env())
            grace_ms = 3000
            d = mpstack.Daemon(env, workers=2, extra_env={
                "MAILPUMP_IMAP_HOST": "", "MAILPUMP_WORKER_SHUTDOWN_GRACE_MS": str(grace_ms)})
            d.start()
            broker.freeze()
            t0 = time.time()
            d.proc.send_signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(grace_ms / 1000 + 10)
            except subprocess.TimeoutExpired:
                self.fail(f"mailpumpd still running {grace_ms / 1000 + 10:.0f} s after SIGTERM "
                          f"with the broker frozen; log {d.log_path}")
            exit_s = time.time() - t0
            self.assertEqual(rc, 0)
            self.assertLess(exit_s, grace_ms / 1000 + 2.0)
            print(f"\nSIGTERM with the broker frozen: exit 0 after {exit_s:.2f} s "
                  f"(grace {grace_ms} ms)", file=sys.stderr)
        finally:
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            broker.close()  # thaws it first


class ResourceAlarm(unittest.TestCase):

    @contextlib.contextmanager
    def blocked_batch(self, prefix, count, prefetch, **daemon_env):
        """A private broker, a receiver, mailpumpd with 2 workers and a tap;
        count messages preloaded, the memory alarm raised, the daemon
        started: yields once every message reached the receiver and both
        workers are blocked. Everything is stopped afterwards."""
        broker = privbroker.PrivateBroker()
        dumpdir = tempfile.mkdtemp(prefix="mp-sink-")
        os.chmod(dumpdir, 0o777)
        sink = d = tap = None
        try:
            broker.start()
            env = broker.stack_env(mpstack.stack_env())
            sink = SlowSink(dumpdir, 0.0)
            d = mpstack.Daemon(env, workers=2, extra_env=sink_env(
                sink.port, MAILPUMP_AMQP_PREFETCH=str(prefetch), **daemon_env))
            tap = DurableTap(env, d.exchange, d.queue + ".tap")
            ids = [f"{prefix}-{i:05d}-{os.urandom(3).hex()}" for i in range(count)]
            publish_batch(env, d.queue, ids, "resource alarm")
            broker.ctl("set_vm_memory_high_watermark", "absolute", "1MB")
            d.start()
            deadline = time.time() + 60
            while len(receiver_copies(dumpdir, prefix)) < count:
                self.assertLess(time.time(), deadline, "not every message reached the receiver "
                                "while publishing was blocked")
                time.sleep(0.1)
            deadline = time.time() + 10
            while d.metric("mailpump_workers_blocked") < 2 and time.time() < deadline:
                time.sleep(0.1)
            self.assertEqual(d.metric("mailpump_workers_blocked"), 2, "both workers blocked")
            self.assertIn("event=broker_blocked", d.log())
            yield types.SimpleNamespace(broker=broker, d=d, tap=tap, ids=ids,
                                        copies=lambda: receiver_copies(dumpdir, prefix))
        finally:
            stop_all(d, tap, sink, broker, dumpdir)

    def assert_each_once(self, run):
        copies = run.copies()
        self.assertEqual(sorted(copies), sorted(run.ids))
        self.assertEqual(max(copies.values()), 1, "a message received twice")

    def test_memory_alarm_holds_events_and_loses_nothing(self):
        """The private broker's memory alarm is raised before mailpumpd
        starts on a preloaded queue: the broker keeps delivering but stops
        reading publishing connections and says so (connection.blocked).
        The workers deliver every message over SMTP, hold their events
        (nothing acked, mailpump_workers_blocked = 2), and once the alarm
        clears publish them: every message delivered once, every event
        there."""
        count = 60
        with self.blocked_batch("ra", count, prefetch=50) as run:
            d, tap = run.d, run.tap
            tap.poll(1.0)
            held = count - len(tap.delivered_ids())
            # a worker's first publish may have been read before the broker
            # blocked it; everything after is held and nothing is acked
            self.assertGreaterEqual(held, count - 2)
            self.assertEqual(d.metric("mailpump_messages_inflight"), count)
            self.assertIsNone(d.proc.poll())
            t0 = time.time()
            run.broker.ctl("set_vm_memory_high_watermark", "0.4")
            tap.wait_delivered(set(run.ids), timeout=60)
            after_s = time.time() - t0
            tap.drain(quiet=1.0)
            # the broker blocks a connection at its first publish during the
            # alarm (that one waits in the broker, with any sent before the
            # notice arrived); the rest waited in the workers instead of
            # filling the socket (58 of 60 here; without the hold, none)
            held_local = sum(int(n) for n in re.findall(r"event=broker_unblocked held=(\d+)", d.log()))
            self.assertGreaterEqual(held_local, count // 2, "events held by the workers")
            self.assertEqual(d.metric("mailpump_workers_blocked"), 0)
            deadline = time.time() + 10
            while d.metric("mailpump_messages_inflight") > 0 and time.time() < deadline:
                time.sleep(0.1)
            self.assertEqual(d.metric("mailpump_messages_inflight"), 0, "every message acked")
            self.assert_each_once(run)
            delivered = [e for e in tap.events if e["event"] == "delivered"]
            self.assertEqual(len(delivered), count, "one delivered event per message")
            self.assertEqual(d.stop(), 0)
            print(f"\nmemory alarm: {count} delivered while blocked, {held} events missing "
                  f"at the tap, {held_local} held by the workers, "
                  f"all published {after_s:.1f} s after the alarm cleared", file=sys.stderr)

    def test_broker_killed_while_events_are_held(self):
        """The broker dies (SIGKILL) while the workers hold their events for
        an alarm: the held publishes fail with the connection, nothing is
        acked, and after the restart the redelivered messages are found in
        the ledger: every message reaches the receiver exactly once and has
        its delivered event."""
        count = 30
        # prefetch 20: both workers get messages, so both publish and block
        with self.blocked_batch("rk", count, prefetch=20, MAILPUMP_AMQP_HEARTBEAT="5") as run:
            d, tap = run.d, run.tap
            run.broker.kill_node()
            run.broker.start()  # the alarm threshold is not kept across a restart
            self.assertTrue(wait_ready(d, 90), "/readyz not 200 within 90 s of the restart")
            tap.wait_delivered(set(run.ids), timeout=90)
            tap.drain(quiet=1.0)
            self.assertEqual(d.metric("mailpump_workers_blocked"), 0)
            self.assert_each_once(run)
            again = {e["message_id"] for e in tap.events
                     if e["event"] == "delivered" and e.get("already_delivered")}
            # the held events died with the broker: every message came back
            # and was found in the ledger, not sent again
            self.assertEqual(again, set(run.ids))
            self.assertIsNone(d.proc.poll(), "mailpumpd exited")
            self.assertEqual(d.stop(), 0)
            print(f"\nbroker killed while {count} events were held: all delivered once, "
                  f"{len(again)} redelivered messages found in the ledger", file=sys.stderr)

    def test_cli_reports_the_alarm_within_its_timeout(self):
        """With the alarm raised and no daemon, `mailpump enqueue` and
        `mailpump stress` end within their timeouts and say why; stress
        stops publishing once blocked (1 MB bodies would otherwise fill the
        socket and block it past --timeout)."""
        broker = privbroker.PrivateBroker()
        try:
            broker.start()
            d = mpstack.Daemon(broker.stack_env(mpstack.stack_env()))  # its queue names only
            broker.ctl("set_vm_memory_high_watermark", "absolute", "1MB")
            t0 = time.time()
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "pat@test.example",
                      "--subject", "alarm", "--text", "x", "--timeout", "2000")
            enqueue_s = time.time() - t0
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn("it blocks publishers (", r.stderr)
            self.assertLess(enqueue_s, 2 + 3)
            t0 = time.time()
            r = d.cli("stress", "--from", "bob@test.example", "--to", "pat@test.example",
                      "--count", "40", "--size", "1000000", "--timeout", "3")
            stress_s = time.time() - t0
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn("the broker blocks publishers (", r.stderr)
            self.assertIn("timeout after 3 s", r.stderr)
            self.assertLess(stress_s, 3 + 4)
            print(f"\nalarm: enqueue failed after {enqueue_s:.1f} s, stress after "
                  f"{stress_s:.1f} s, both naming the alarm", file=sys.stderr)
        finally:
            broker.close()


class Redeclare(unittest.TestCase):

    def test_deleted_queues_are_redeclared_on_reconnect(self):
        """The consumed queue and a delay queue are deleted under the
        daemon: the broker cancels the consumer, the worker reconnects,
        declares the topology again and goes on delivering."""
        env = mpstack.stack_env()
        d = mpstack.Daemon(env, workers=1, extra_env={"MAILPUMP_IMAP_HOST": ""})
        tap = mpstack.EventTap(env, d.exchange)
        conn = None
        try:
            d.start()
            conn, ch = mpstack.amqp_channel(env)
            retry_q = d.retry_queues()[0]
            ch.queue_delete(retry_q)
            ch.queue_delete(d.queue)
            deadline = time.time() + 30
            while d.log().count("event=consuming") < 2:
                self.assertLess(time.time(), deadline, "no reconnect after the queue was deleted")
                time.sleep(0.1)
            self.assertIn("consumer_cancelled_by_broker", d.log())
            self.assertTrue(wait_ready(d, 10))
            ch.queue_declare(d.queue, passive=True)
            ch.queue_declare(retry_q, passive=True)
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "rita@test.example",
                      "--text", "after the redeclare")
            self.assertEqual(r.returncode, 0, r.stderr)
            mid = r.stdout.strip()
            tap.wait(lambda e: e["event"] == "delivered" and e.get("message_id") == mid, 1)
        finally:
            if conn is not None:
                conn.close()
            self.assertEqual(d.stop(), 0)
            tap.close()


class GracefulShutdown(unittest.TestCase):

    def run_sigterm(self, prefix, count, delay, grace_ms, prefetch, trigger):
        """Start a batch against a sink answering after `delay` s, SIGTERM
        when trigger(daemon, received) holds, take the time to exit; then
        a second daemon with a fast sink on the same queues delivers the
        rest. Returns (d, d2, ids, copies, tap events, exit seconds)."""
        env = mpstack.stack_env()
        dumpdir = tempfile.mkdtemp(prefix="mp-sink-")
        os.chmod(dumpdir, 0o777)
        slow = fast = d = d2 = tap = None
        try:
            slow = SlowSink(dumpdir, delay)
            fast = SlowSink(dumpdir, 0)
            d = mpstack.Daemon(env, workers=2, extra_env=sink_env(
                slow.port, MAILPUMP_AMQP_PREFETCH=str(prefetch),
                MAILPUMP_WORKER_SHUTDOWN_GRACE_MS=str(grace_ms)))
            tap = mpstack.EventTap(env, d.exchange)
            ids = [f"{prefix}-{i:05d}-{os.urandom(3).hex()}" for i in range(count)]
            publish_batch(env, d.queue, ids, "sigterm")
            d.start()
            deadline = time.time() + 60
            while not trigger(d, len(receiver_copies(dumpdir, prefix))):
                self.assertLess(time.time(), deadline, "the batch did not get going")
                tap.drain(quiet=0.05)
            inflight = d.metric("mailpump_messages_inflight")
            t0 = time.time()
            d.proc.send_signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(grace_ms / 1000 + 10)
            except subprocess.TimeoutExpired:
                self.fail(f"mailpumpd still running {grace_ms / 1000 + 10:.0f} s after SIGTERM "
                          f"(grace {grace_ms} ms); log {d.log_path}")
            exit_s = time.time() - t0
            self.assertEqual(rc, 0, f"exit status after SIGTERM; log {d.log_path}")
            received_at_exit = len(receiver_copies(dumpdir, prefix))
            d2 = mpstack.Daemon(env, workers=2, queues_of=d,
                                extra_env=sink_env(fast.port, MAILPUMP_AMQP_PREFETCH="50"))
            d2.start()
            want = set(ids)
            try:
                tap.wait(lambda e: e["event"] == "delivered" and e["message_id"] in want,
                         count, timeout=120)
            except AssertionError:
                got = {e["message_id"] for e in tap.events if e["event"] == "delivered"}
                self.fail(f"{len(want - got)} not delivered, e.g. {sorted(want - got)[:5]}; "
                          f"logs {d.log_path} {d2.log_path}")
            tap.drain(quiet=1.5)
            self.assertEqual(d2.stop(), 0)
            copies = receiver_copies(dumpdir, prefix)
            return dict(d=d, d2=d2, ids=ids, copies=copies, events=list(tap.events),
                        exit_s=exit_s, inflight=inflight, received_at_exit=received_at_exit)
        finally:
            for dd in (d, d2):
                if dd is not None and dd.proc is not None and dd.proc.poll() is None:
                    dd.proc.kill()
                    dd.proc.wait()
            if d is not None:
                d.delete_topology()
            if tap is not None:
                tap.close()
            for s in (slow, fast):
                if s is not None:
                    s.close()
            shutil.rmtree(dumpdir, ignore_errors=True)

    def test_sigterm_drains_in_flight_within_grace(self):
        """In-flight work shorter than the grace period: the drain finishes
        every message it holds, so nothing is cut and nothing is sent
        twice."""
        grace_ms = 5000
        r = self.run_sigterm("st", 1000, 0.5, grace_ms, prefetch=20,
                             trigger=lambda d, received: received >= 200
                             and d.metric("mailpump_messages_inflight") >= 20)
        self.assertLessEqual(r["exit_s"], grace_ms / 1000 + 2.0, "exit within the grace period")
        log = r["d"].log()
        self.assertIn("draining", log)
        self.assertNotIn("grace_expired", log, "in-flight work fits in the grace period")
        # exactly once: one delivered event and one received copy per message
        per_id = {}
        for e in r["events"]:
            if e["event"] == "delivered":
                per_id[e["message_id"]] = per_id.get(e["message_id"], 0) + 1
        self.assertEqual(set(per_id), set(r["ids"]))
        self.assertEqual({m: n for m, n in per_id.items() if n != 1}, {},
                         "one delivered event per message")
        self.assertEqual({m: n for m, n in r["copies"].items() if n != 1}, {},
                         "one received copy per message")
        self.assertEqual(set(r["copies"]), set(r["ids"]))
        flagged = [e for e in r["events"] if e.get("possible_duplicate")
                   or e.get("already_delivered")]
        self.assertEqual(flagged, [])
        print(f"\nSIGTERM with {r['inflight']:.0f} in flight after {r['received_at_exit']} "
              f"received at exit: exit 0 after {r['exit_s']:.2f} s (grace {grace_ms} ms); "
              f"1000 of 1000 delivered exactly once", file=sys.stderr)

    def test_sigterm_with_work_longer_than_grace(self):
        """The receiver answers the final dot after 6 s, the grace period is
        2 s: the daemon still exits 0 on time; what it held goes back to the
        queue and the second daemon delivers it."""
        grace_ms = 2000
        r = self.run_sigterm("sg", 300, 6.0, grace_ms, prefetch=50,
                             trigger=lambda d, received: received >= 40
                             and d.metric("mailpump_messages_inflight") >= 80)
        self.assertLessEqual(r["exit_s"], grace_ms / 1000 + 2.0, "exit within the grace period")
        self.assertGreaterEqual(r["exit_s"], grace_ms / 1000 - 0.2,
                                "the daemon waited for the grace period")
        cut = sum(int(n) for n in re.findall(r"event=grace_expired .*?unfinished=(\d+)",
                                             r["d"].log()))
        self.assertGreater(cut, 0, "the grace period ended with work unfinished")
        twice, flagged, skipped = check_copies(self, r["ids"], r["copies"], r["events"])
        print(f"\nSIGTERM with {r['inflight']:.0f} in flight, receiver slower than the grace: "
              f"exit 0 after {r['exit_s']:.2f} s (grace {grace_ms} ms), "
              f"{cut} left unacked, {r['received_at_exit']} received at exit; "
              f"300 of 300 delivered, {len(twice)} received twice, {len(flagged)} flagged possible_duplicate, "
              f"{len(skipped)} skipped as already delivered", file=sys.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

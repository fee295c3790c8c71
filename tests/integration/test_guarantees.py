"""Delivery guarantees end to end: a message's identity, its retry
envelope, and the ledger's flags.

mailpumpd (private queues, one worker, the stack's Redis) delivers to a
tests/tools/smtpsink standing in for the test.example MX hosts:

- a message published without "id" is given one id, once: every event,
  the retry and every copy on the receiver carry it; two identical
  id-less publishes stay two messages; a redelivered id-less message takes
  the id its first delivery gave it (kept in Redis under the body's
  digest);
- an id reused for a different body is dead-lettered, not skipped;
- a retry names its pending recipients unambiguously, whatever the
  address (a quoted local part with a comma);
- a message naming more than [message] max_recipients is dead-lettered;
- a possible duplicate stays flagged in the ledger ("done-dup") until a
  redelivery has reported it.

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import base64
import hashlib
import imaplib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

SENDER = "bob@test.example"
FAST_RETRY = {"MAILPUMP_RETRY_LEVELS": "300ms", "MAILPUMP_RETRY_P0_BASE": "300ms",
              "MAILPUMP_RETRY_P1_BASE": "300ms", "MAILPUMP_RETRY_P2_BASE": "300ms"}


def message_ids(raw_messages):
    """The Message-ID header of each raw message the receiver kept."""
    out = []
    for raw in raw_messages:
        m = re.search(rb"^Message-ID: <([^@>]+)@", raw, re.M | re.I)
        out.append(m.group(1).decode() if m else None)
    return out


class Identity(unittest.TestCase):
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
        d = mpstack.Daemon(self.env, workers=1, extra_env=extra)
        tap = mpstack.EventTap(self.env, d.exchange)
        self.addCleanup(tap.close)
        return d, tap

    def start(self, d):
        try:
            d.start()
        except Exception:
            d.stop()
            raise
        self.addCleanup(self.stop, d)

    def stop(self, d):
        if d.proc is not None and d.proc.poll() is None:
            self.assertEqual(d.stop(), 0, d.log()[-3000:])

    def publish(self, d, msg, requeue_once=False):
        """Publish msg (a dict) straight to the daemon's queue, as an
        application would. requeue_once: take it back once and requeue
        it, so the daemon sees it redelivered (a worker that died)."""
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
            ch.confirm_delivery()
            body = json.dumps(msg).encode()
            ch.basic_publish("", d.queue, body, pika.BasicProperties(delivery_mode=2))
            if requeue_once:
                method, _, _ = ch.basic_get(d.queue, auto_ack=False)
                self.assertIsNotNone(method)
                ch.basic_nack(method.delivery_tag, requeue=True)
            return body
        finally:
            conn.close()

    def redis(self, *args):
        r = subprocess.run(["redis-cli", "-h", self.env["MP_REDIS_HOST"], "-p", str(self.env["MP_REDIS_PORT"]),
                            *args], capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def final_events(self, tap, pred, n, timeout=30):
        return tap.wait(lambda e: "recipient" in e and e["event"] != "deferred" and pred(e), n, timeout)

    # ---- a message without id -------------------------------------------------

    def test_message_without_id_gets_one_id_for_its_whole_life(self):
        # the first RCPT is refused once: that recipient is retried alone,
        # and its copy must carry the id its co-recipient's copy carries
        sink = self.sink(rules=["cmd:RCPT#1=451 4.2.0 try later"])
        d, tap = self.daemon(sink.port, **FAST_RETRY)
        self.start(d)
        tag = os.urandom(4).hex()
        rcpts = [f"a-{tag}@test.example", f"b-{tag}@test.example"]
        self.publish(d, {"from": SENDER, "to": rcpts, "subject": "no id", "text": tag})
        evs = self.final_events(tap, lambda e: e["recipient"] in rcpts, 2)
        ids = {e["message_id"] for e in evs}
        self.assertEqual(len(ids), 1, evs)
        mid = ids.pop()
        self.assertRegex(mid, r"^[0-9a-f-]{36}$")
        deferred = [e for e in tap.drain() if e.get("event") == "deferred"]
        self.assertEqual([e["message_id"] for e in deferred], [mid], deferred)
        self.assertEqual(sorted(e["attempt"] for e in evs), [1, 2], evs)
        # both copies on the receiver carry the same Message-ID
        self.assertEqual(message_ids(sink.messages()), [mid, mid])
        self.assertEqual(d.log().count("event=id_assigned"), 1, d.log()[-3000:])

    def test_two_identical_publishes_without_id_are_two_messages(self):
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        self.start(d)
        rcpt = f"twice-{os.urandom(4).hex()}@test.example"
        msg = {"from": SENDER, "to": [rcpt], "subject": "same", "text": "same body"}
        self.publish(d, msg)
        self.publish(d, msg)
        evs = self.final_events(tap, lambda e: e["recipient"] == rcpt, 2)
        self.assertEqual([e["event"] for e in evs], ["delivered", "delivered"], evs)
        self.assertNotIn("already_delivered", [e.get("reason") for e in evs])
        self.assertEqual(len({e["message_id"] for e in evs}), 2, evs)
        self.assertEqual(len(sink.messages()), 2)

    def test_redelivered_message_without_id_takes_the_id_it_was_given(self):
        # the window between the confirm of the republish and the ack of
        # the original: the original comes back redelivered, and its first
        # delivery left its id under the body's digest
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        rcpt = f"redeliv-{os.urandom(4).hex()}@test.example"
        msg = {"from": SENDER, "to": [rcpt], "subject": "redelivered", "text": rcpt}
        given = "given-" + os.urandom(4).hex()
        body = json.dumps(msg).encode()
        self.redis("SET", "mp:a:" + hashlib.sha256(body).hexdigest(), given, "EX", "600")
        self.publish(d, msg, requeue_once=True)
        self.start(d)
        ev = self.final_events(tap, lambda e: e["recipient"] == rcpt, 1)[0]
        self.assertEqual(ev["message_id"], given)
        self.assertEqual(message_ids(sink.messages()), [given])

    def test_second_republish_of_an_idless_message_is_dropped(self):
        # a worker died after its republish was confirmed and before the
        # original's ack: the redelivered original was republished again
        # with the same id. Two copies are queued; only the first to claim
        # the id is delivered, the other is acked without a word.
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        rcpt = f"copies-{os.urandom(4).hex()}@test.example"
        given = "given-" + os.urandom(4).hex()
        body = json.dumps({"from": SENDER, "to": [rcpt], "subject": "copies", "text": rcpt}).encode()
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
            ch.confirm_delivery()
            for copy in ("copy-a", "copy-b"):
                ch.basic_publish("", d.queue, body, pika.BasicProperties(
                    delivery_mode=2, headers={"x-mailpump-id": given, "x-mailpump-copy": copy}))
        finally:
            conn.close()
        self.start(d)
        ev = self.final_events(tap, lambda e: e["recipient"] == rcpt, 1)[0]
        self.assertEqual((ev["message_id"], ev["event"]), (given, "delivered"), ev)
        deadline = time.time() + 10
        while "event=copy_dropped" not in d.log() and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(d.log().count("event=copy_dropped"), 1, d.log()[-3000:])
        tap.drain()
        self.assertEqual(len([e for e in tap.events if e.get("recipient") == rcpt]), 1, tap.events)
        self.assertEqual(len(sink.messages()), 1)

    def test_first_delivery_without_id_ignores_an_identical_earlier_body(self):
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        rcpt = f"fresh-{os.urandom(4).hex()}@test.example"
        msg = {"from": SENDER, "to": [rcpt], "subject": "fresh", "text": rcpt}
        body = json.dumps(msg).encode()
        self.redis("SET", "mp:a:" + hashlib.sha256(body).hexdigest(), "someone-else", "EX", "600")
        self.publish(d, msg)
        self.start(d)
        ev = self.final_events(tap, lambda e: e["recipient"] == rcpt, 1)[0]
        self.assertNotEqual(ev["message_id"], "someone-else")
        self.assertEqual(ev["event"], "delivered")

    # ---- an id reused -----------------------------------------------------------

    def test_id_reused_for_another_message_is_dead_lettered(self):
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        self.start(d)
        mid = "reused-" + os.urandom(4).hex()
        rcpt = f"{mid}@test.example"
        self.publish(d, {"id": mid, "from": SENDER, "to": [rcpt], "subject": "first", "text": "one"})
        first = self.final_events(tap, lambda e: e["message_id"] == mid, 1)[0]
        self.assertEqual(first["event"], "delivered")
        # the same bytes again (a publisher's own resend) are the same message
        self.publish(d, {"id": mid, "from": SENDER, "to": [rcpt], "subject": "first", "text": "one"})
        again = self.final_events(tap, lambda e: e["message_id"] == mid and e is not first, 1)[0]
        self.assertEqual(again["reason"], "already_delivered")
        # other bytes under the same id: dead, not "already delivered"
        self.publish(d, {"id": mid, "from": SENDER, "to": [rcpt], "subject": "second", "text": "two"})
        dead = tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "dead", 1)[0]
        self.assertIn(f'id reused: message id "{mid}" was given to a different message', dead["error"])
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            method, props, body = ch.basic_get(d.dead_queue, auto_ack=True)
            self.assertIsNotNone(method)
            self.assertIn(b'"second"', body)
            self.assertIn("id reused", props.headers["x-mailpump-reason"])
        finally:
            conn.close()
        self.assertEqual(len(sink.messages()), 1)

    # ---- the retry envelope ---------------------------------------------------

    def test_quoted_local_part_with_a_comma_is_retried(self):
        sink = self.sink(rules=["cmd:RCPT#2=451 4.2.0 try later"])
        d, tap = self.daemon(sink.port, **FAST_RETRY)
        self.start(d)
        tag = os.urandom(4).hex()
        odd = f'"x,{tag}"@test.example'
        plain = f"plain-{tag}@test.example"
        mid = "comma-" + tag
        self.publish(d, {"id": mid, "from": SENDER, "to": [odd, plain], "subject": "comma", "text": tag})
        evs = self.final_events(tap, lambda e: e["message_id"] == mid, 2)
        self.assertEqual(sorted((e["recipient"], e["event"], e["attempt"]) for e in evs),
                         sorted([(odd, "delivered", 2), (plain, "delivered", 2)]), evs)
        self.assertEqual(len(sink.messages()), 1)  # one transaction, both recipients

    def test_too_many_recipients_is_dead_lettered(self):
        sink = self.sink()
        d, tap = self.daemon(sink.port, MAILPUMP_MESSAGE_MAX_RECIPIENTS=3)
        self.start(d)
        mid = "many-" + os.urandom(4).hex()
        self.publish(d, {"id": mid, "from": SENDER, "to": [f"r{i}@test.example" for i in range(4)],
                         "subject": "many", "text": "x", "trace_id": "trace-" + mid})
        dead = tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "dead", 1)[0]
        self.assertEqual(dead["trace_id"], "trace-" + mid)  # dead events carry the trace too
        self.assertEqual(dead["error"], "too many recipients: 4 (at most 3 per message, "
                                        "[message] max_recipients)")
        self.assertEqual(sink.messages(), [])


    # ---- the ledger's flags ----------------------------------------------------

    def test_flagged_delivery_is_recorded_flagged(self):
        # an earlier attempt left "sending": this delivery may be a second
        # copy, and the record must say so until its event is out
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        mid = "flag-" + os.urandom(4).hex()
        rcpt = f"{mid}@test.example"
        key = f"mp:r:{mid}:{rcpt}"
        self.redis("SET", key, "sending", "EX", "600")
        self.start(d)
        self.publish(d, {"id": mid, "from": SENDER, "to": [rcpt], "subject": "flag", "text": "x"})
        ev = self.final_events(tap, lambda e: e["message_id"] == mid, 1)[0]
        self.assertEqual(ev["event"], "delivered")
        self.assertTrue(ev.get("possible_duplicate"), ev)
        self.assertEqual(self.redis("GET", key), "done-dup")

    def test_redelivery_reports_a_recorded_flag(self):
        # the attempt that delivered the flagged copy died before its event
        # was confirmed: the redelivery skips the recipient and still says
        # the copy may have been a second one
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        mid = "flagged-" + os.urandom(4).hex()
        rcpt = f"{mid}@test.example"
        self.redis("SET", f"mp:r:{mid}:{rcpt}", "done-dup", "EX", "600")
        self.publish(d, {"id": mid, "from": SENDER, "to": [rcpt], "subject": "flagged", "text": "x"},
                     requeue_once=True)
        self.start(d)
        ev = self.final_events(tap, lambda e: e["message_id"] == mid, 1)[0]
        self.assertEqual((ev["event"], ev.get("reason")), ("delivered", "already_delivered"), ev)
        self.assertTrue(ev.get("already_delivered"), ev)
        self.assertTrue(ev.get("possible_duplicate"), ev)
        self.assertEqual(sink.messages(), [])


    # ---- a retry and the attempt that made it, both alive ----------------------

    def test_redelivered_attempt_leaves_a_handed_recipient_to_its_retry(self):
        # the attempt deferred b, queued its retry (confirmed: "retried"),
        # and died before its ack: its redelivery delivers a (whose copy it
        # had not recorded) but must leave b to the retry, which carries it
        log = os.path.join(tempfile.mkdtemp(prefix="mp-handed-"), "transcript")
        sink = mpstack.Sink(addr="127.0.0.2", extra=["--log", log])
        self.addCleanup(sink.stop)
        d, tap = self.daemon(sink.port)
        mid = "handed-" + os.urandom(4).hex()
        a, b = f"a-{mid}@test.example", f"b-{mid}@test.example"
        self.redis("SET", f"mp:r:{mid}:{b}", "retried:hop-x", "EX", "600")
        self.publish(d, {"id": mid, "from": SENDER, "to": [a, b], "subject": "handed", "text": "x"},
                     requeue_once=True)
        self.start(d)
        ev = self.final_events(tap, lambda e: e["message_id"] == mid, 1)[0]
        self.assertEqual((ev["recipient"], ev["event"]), (a, "delivered"), ev)
        time.sleep(1.0)
        self.assertEqual([e for e in tap.drain() if e.get("recipient") == b], [])
        self.assertEqual(len(sink.messages()), 1)
        rcpts = [line.split(" ", 1)[1] for line in sink.transcript() if " RCPT TO:" in line]
        self.assertEqual(rcpts, [f"RCPT TO:<{a}>"])
        self.assertIn("event=handed_off", d.log())

    def test_retry_goes_on_with_its_own_token_and_an_unconfirmed_handoff_is_flagged(self):
        # "retry:<hop>" (being handed, not known to be queued) makes the
        # redelivered attempt deliver it flagged; the retry carrying that
        # very hop delivers as its own
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        mid = "handing-" + os.urandom(4).hex()
        b = f"b-{mid}@test.example"
        self.redis("SET", f"mp:r:{mid}:{b}", "retry:hop-y", "EX", "600")
        self.publish(d, {"id": mid, "from": SENDER, "to": [b], "subject": "handing", "text": "x"},
                     requeue_once=True)
        self.start(d)
        ev = self.final_events(tap, lambda e: e["message_id"] == mid, 1)[0]
        self.assertEqual(ev["event"], "delivered", ev)
        self.assertTrue(ev.get("possible_duplicate"), ev)
        mid2 = "own-" + os.urandom(4).hex()
        c = f"c-{mid2}@test.example"
        self.redis("SET", f"mp:r:{mid2}:{c}", "retried:hop-z", "EX", "600")
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.confirm_delivery()
            body = json.dumps({"id": mid2, "from": SENDER, "to": [c], "subject": "own", "text": "x"})
            ch.basic_publish("", d.queue, body, pika.BasicProperties(
                delivery_mode=2, headers={"x-mailpump-attempt": "2", "x-mailpump-hop": "hop-z"}))
        finally:
            conn.close()
        ev = self.final_events(tap, lambda e: e["message_id"] == mid2, 1)[0]
        self.assertEqual(ev["event"], "delivered", ev)
        self.assertFalse(ev.get("possible_duplicate"), ev)
        self.assertFalse(ev.get("already_delivered"), ev)
        self.assertEqual(self.redis("GET", f"mp:r:{mid2}:{c}"), "done")

    def test_deferred_recipient_is_recorded_handed_to_its_retry(self):
        sink = self.sink(rules=["cmd:RCPT#1=451 4.2.0 try later"])
        d, tap = self.daemon(sink.port, MAILPUMP_RETRY_LEVELS="1m")
        self.start(d)
        mid = "handoff-" + os.urandom(4).hex()
        b = f"b-{mid}@test.example"
        self.publish(d, {"id": mid, "from": SENDER, "to": [b], "subject": "later", "text": "x"})
        ev = tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "deferred", 1)[0]
        deadline = time.time() + 5
        while time.time() < deadline and not self.redis("GET", f"mp:r:{mid}:{b}").startswith("retried:"):
            time.sleep(0.05)
        self.assertRegex(self.redis("GET", f"mp:r:{mid}:{b}"), r"^retried:[0-9a-f-]{36}$", ev)


    # ---- the Sent copy ----------------------------------------------------------

    def test_retry_that_still_owes_the_sent_copy_looks_for_it_first(self):
        # the earlier attempt's APPEND timed out, but the server stored it;
        # this retry (a recipient still pending, the copy still owed) must
        # find that copy instead of storing a second one
        sink = self.sink()
        d = mpstack.Daemon(self.env, workers=1, extra_env={"MAILPUMP_SMTP_PORT": str(sink.port),
                                                            "MAILPUMP_SMTP_TLS": "none"})
        tap = mpstack.EventTap(self.env, d.exchange)
        self.addCleanup(tap.close)
        mid = "owed-" + os.urandom(4).hex()
        im = imaplib.IMAP4_SSL(self.env["MP_IMAP_HOST"], int(self.env["MP_IMAPS_PORT"]),
                               ssl_context=mpstack.imap_ssl_context(self.env))
        self.addCleanup(im.logout)
        im.login("alice@test.example", "password")
        earlier = (f"From: alice@test.example\r\nTo: kim@test.example\r\n"
                   f"Message-ID: <{mid}@test.example>\r\nSubject: owed\r\n\r\nearlier copy\r\n").encode()
        typ, data = im.append("Sent", "(\\Seen)", None, earlier)
        self.assertEqual(typ, "OK", data)
        uid0 = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
        self.start(d)
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.confirm_delivery()
            body = json.dumps({"id": mid, "from": "alice@test.example", "to": ["kim@test.example"],
                               "subject": "owed", "text": "sent once"})
            pending = base64.b64encode(bytes([1])).decode()  # recipient 0 still pending
            ch.basic_publish("", d.queue, body, pika.BasicProperties(delivery_mode=2, headers={
                "x-mailpump-attempt": "2", "x-mailpump-pending-set": pending,
                "x-mailpump-append-needed": "1"}))
        finally:
            conn.close()
        ev = tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "appended", 1)[0]
        self.assertEqual(ev["imap"]["uid"], uid0)
        im.select("Sent", readonly=True)
        typ, data = im.uid("SEARCH", "HEADER", "Message-ID", f"<{mid}@test.example>")
        self.assertEqual(data[0].split(), [str(uid0).encode()])


    # ---- publishes no queue takes -------------------------------------------------

    def test_retry_to_a_deleted_delay_queue_is_not_lost(self):
        # the retry level was deleted behind the daemon's back: the broker
        # confirms a publish no queue took unless it is mandatory; returned,
        # it fails, the message goes back unacked, and after the poison
        # limit it ends in the dead-letter queue instead of vanishing
        sink = self.sink(rules=["cmd:RCPT=451 4.2.0 try later"])
        d, tap = self.daemon(sink.port, MAILPUMP_RETRY_LEVELS="1m", MAILPUMP_RETRY_POISON_REDELIVERIES=2)
        self.start(d)
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.queue_delete(d.retry_queues()[0])
        finally:
            conn.close()
        mid = "returned-" + os.urandom(4).hex()
        self.publish(d, {"id": mid, "from": SENDER, "to": [f"{mid}@test.example"], "subject": "r", "text": "x"})
        dead = tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "dead", 1, timeout=60)[0]
        self.assertIn("poison", dead["error"])
        self.assertIn("event=publish_returned", d.log())
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            method, _, body = ch.basic_get(d.dead_queue, auto_ack=True)
            self.assertIsNotNone(method)
            self.assertIn(mid.encode(), body)
        finally:
            conn.close()


    # ---- 8-bit raw messages ---------------------------------------------------------

    def raw_8bit(self, d, mid):
        raw = (f"From: {SENDER}\r\nTo: {mid}@test.example\r\nSubject: 8bit\r\n"
               "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               "Content-Transfer-Encoding: 8bit\r\n\r\nGr\u00fc\u00dfe aus K\u00f6ln\r\n").encode()
        self.publish(d, {"id": mid, "from": SENDER, "to": [f"{mid}@test.example"],
                         "raw": base64.b64encode(raw).decode()})

    def test_raw_8bit_message_declares_8bitmime(self):
        log = os.path.join(tempfile.mkdtemp(prefix="mp-8bit-"), "t.log")
        self.addCleanup(shutil.rmtree, os.path.dirname(log), True)
        s = mpstack.Sink(addr="127.0.0.2", extra=["--log", log])
        self.addCleanup(s.stop)
        d, tap = self.daemon(s.port)
        self.start(d)
        mid = "eight-" + os.urandom(4).hex()
        self.raw_8bit(d, mid)
        ev = self.final_events(tap, lambda e: e["message_id"] == mid, 1)[0]
        self.assertEqual(ev["event"], "delivered", ev)
        with open(log) as f:
            mails = [line for line in f if "MAIL FROM:" in line]
        self.assertEqual(len(mails), 1, mails)
        self.assertIn("BODY=8BITMIME", mails[0])

    def test_raw_8bit_message_to_a_7bit_server_is_refused_clearly(self):
        s = mpstack.Sink(addr="127.0.0.2", extra=["--no-8bitmime"])
        self.addCleanup(s.stop)
        d, tap = self.daemon(s.port)
        self.start(d)
        mid = "seven-" + os.urandom(4).hex()
        self.raw_8bit(d, mid)
        ev = self.final_events(tap, lambda e: e["message_id"] == mid, 1)[0]
        self.assertEqual(ev["event"], "bounced", ev)
        self.assertIn("needs 8BITMIME", ev["smtp"]["text"])
        self.assertEqual(s.messages(), [])


    # ---- local resources --------------------------------------------------------------

    def test_descriptor_limit_raised_to_the_hard_limit(self):
        sink = self.sink()
        d, tap = self.daemon(sink.port)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            self.start(d)  # inherits the low soft limit
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with open(f"/proc/{d.proc.pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max open files"))
        got_soft, got_hard = line.split()[3:5]
        self.assertEqual(got_soft, got_hard, line)
        self.assertIn(f"event=fd_limit soft={got_hard} hard={got_hard} was=256", d.log())


if __name__ == "__main__":
    unittest.main(verbosity=2)

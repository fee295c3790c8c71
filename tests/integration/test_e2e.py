"""End to end on the real local stack: RabbitMQ -> mailpumpd -> Postfix
(STARTTLS) -> Dovecot Sent folder, with events and dead letters.

Independent checks: the received message is parsed by Python's email
package, the Sent copy is fetched back with imaplib, events and the dead
letter queue are read with pika.
"""
import base64
import email
import email.policy
import imaplib
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest

import dkim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402


class EndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        cls.daemon = mpstack.Daemon(cls.env, workers=2, extra_env={
            "MAILPUMP_RETRY_LEVELS": "300ms,600ms", "MAILPUMP_RETRY_P2_BASE": "300ms",
            "MAILPUMP_RETRY_P2_MAX_ATTEMPTS": "3",
            "MAILPUMP_DNS_TIMEOUT_MS": "300", "MAILPUMP_DNS_TRIES": "1"})
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
        msg_id = r.stdout.strip()
        self.assertRegex(msg_id, r"^[0-9a-f-]{36}$")
        return msg_id

    def events_for(self, msg_id, count, kinds=None, timeout=60):
        return self.tap.wait(lambda e: e.get("message_id") == msg_id and
                             (kinds is None or e["event"] in kinds), count, timeout)

    def test_delivered_over_tls_and_appended_to_sent(self):
        subject = "Grüße aus Köln ✓ — ünïcödé subject"
        text = "Hello Bob,\n.a line starting with a dot\n..two dots\nbye\n"
        msg_id = self.enqueue("--from", "Alice Example <alice@test.example>",
                              "--to", "alice@test.example", "--to", "bob@test.example",
                              "--subject", subject, "--text", text,
                              "--header", "X-Campaign: itest", "--trace-id", "trace-e2e-1")
        evs = self.events_for(msg_id, 3, kinds={"delivered", "appended"})
        delivered = sorted((e for e in evs if e["event"] == "delivered"),
                           key=lambda e: e["recipient"])
        self.assertEqual([e["recipient"] for e in delivered],
                         ["alice@test.example", "bob@test.example"])
        appended = [e for e in evs if e["event"] == "appended"]
        self.assertEqual(len(appended), 1)
        for e in delivered:
            self.assertEqual(e["_routing_key"], "delivered")
            self.assertEqual(e["outcome"], "delivered")
            self.assertEqual(e["smtp"]["code"], 250)
            self.assertEqual(e["mx_host"], "mx1.test.example")
            self.assertEqual(e["mx_addr"], "127.0.0.2")
            self.assertTrue(e["tls"]["version"].startswith("TLSv1."), e)
            self.assertEqual(e["trace_id"], "trace-e2e-1")
            self.assertEqual(e["attempt"], 1)
            self.assertEqual(e["imap"]["uid"], appended[0]["imap"]["uid"])
            self.assertGreater(e["imap"]["uid"], 0)
            self.assertGreater(e["imap"]["uidvalidity"], 0)

        # the receiver's copies: one per recipient, over TLS, headers right
        files = []
        deadline = time.time() + 30
        while time.time() < deadline and len(files) < 2:
            files = []
            for sub in ("new", "cur"):
                d = os.path.join(self.env["MP_MX1_MAILDIR"], sub)
                for name in os.listdir(d) if os.path.isdir(d) else []:
                    with open(os.path.join(d, name), "rb") as f:
                        data = f.read()
                    if msg_id.encode() in data:
                        files.append(data)
            time.sleep(0.1)
        self.assertEqual(len(files), 2)
        delivered_to = set()
        for data in files:
            m = email.message_from_bytes(data, policy=email.policy.default)
            delivered_to.add(str(m["Delivered-To"]))
            self.assertEqual(str(m["Subject"]), subject)
            self.assertIn("alice@test.example", str(m["From"]))
            self.assertIn("Alice Example", str(m["From"]))
            self.assertEqual(m["Message-ID"], f"<{msg_id}@test.example>")
            self.assertEqual(str(m["X-Campaign"]), "itest")
            self.assertIsNotNone(m["Date"])
            self.assertEqual(m["MIME-Version"], "1.0")
            received = " ".join(str(h) for h in m.get_all("Received"))
            self.assertRegex(received, r"using TLSv1\.[23]")
            body = m.get_body(preferencelist=("plain",)).get_content()
            self.assertEqual(body.replace("\r\n", "\n"), text)
            # raw bytes: CRLF only, dots unstuffed by the receiver
            self.assertNotIn(b"\n..a line", data)
            # signed with both stack keys; both verify against the zone
            sigs = m.get_all("DKIM-Signature")
            self.assertEqual(len(sigs), 2, sigs)
            crlf = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            d = dkim.DKIM(crlf)
            for i in range(2):
                self.assertTrue(d.verify(idx=i, dnsfunc=mpstack.zone_dnsfunc(self.env)),
                                f"DKIM signature {i} does not verify: {sigs[i]}")
        self.assertEqual(delivered_to, {"alice@test.example", "bob@test.example"})

        # the Sent copy, fetched back under the UID the event reported
        uid = appended[0]["imap"]["uid"]
        im = imaplib.IMAP4_SSL(self.env["MP_IMAP_HOST"], int(self.env["MP_IMAPS_PORT"]),
                               ssl_context=mpstack.imap_ssl_context(self.env))
        try:
            im.login("alice@test.example", self.env["MP_IMAP_PASSWORD"])
            typ, data = im.status(appended[0]["imap"]["mailbox"], "(UIDVALIDITY)")
            self.assertEqual(typ, "OK")
            self.assertIn(f"UIDVALIDITY {appended[0]['imap']['uidvalidity']}".encode(), data[0])
            im.select(appended[0]["imap"]["mailbox"], readonly=True)
            typ, data = im.uid("FETCH", str(uid), "(FLAGS BODY.PEEK[])")
            self.assertEqual(typ, "OK")
            self.assertIsInstance(data[0], tuple, data)
            sent = email.message_from_bytes(data[0][1], policy=email.policy.default)
            self.assertEqual(sent["Message-ID"], f"<{msg_id}@test.example>")
            self.assertEqual(str(sent["Subject"]), subject)
            self.assertIn(b"\\Seen", data[0][0])
        finally:
            im.logout()

    def test_large_message_same_bytes_delivered_and_appended(self):
        """A 6 MB message with dot lines and a binary attachment: what
        Postfix stored and what Dovecot's Sent folder returns are the same
        message, byte for byte (both are sent from the one built copy)."""
        attachment = os.urandom(6 << 20)
        text = "".join(f"{'.' if i % 3 == 0 else ''}line {i} of a large message\n"
                       for i in range(20000))
        msg_id = "e2e-large-" + os.urandom(4).hex()
        body = json.dumps({
            "id": msg_id, "from": "alice@test.example", "to": ["bob@test.example"],
            "subject": "large", "text": text,
            "attachments": [{"filename": "blob.bin", "content_type": "application/octet-stream",
                             "content_base64": base64.b64encode(attachment).decode()}]})
        r = self.daemon.cli("enqueue", stdin=body)
        self.assertEqual(r.returncode, 0, r.stderr)
        evs = self.events_for(msg_id, 2, kinds={"delivered", "appended", "failed", "deferred"},
                              timeout=120)
        kinds = sorted(e["event"] for e in evs)
        self.assertEqual(kinds, ["appended", "delivered"], evs)
        appended = [e for e in evs if e["event"] == "appended"][0]

        stored = None
        deadline = time.time() + 30
        while time.time() < deadline and stored is None:
            for sub in ("new", "cur"):
                d = os.path.join(self.env["MP_MX1_MAILDIR"], sub)
                for name in os.listdir(d) if os.path.isdir(d) else []:
                    with open(os.path.join(d, name), "rb") as f:
                        data = f.read()
                    if f"<{msg_id}@test.example>".encode() in data:
                        stored = data
            time.sleep(0.1)
        self.assertIsNotNone(stored)
        m = email.message_from_bytes(stored, policy=email.policy.default)
        parts = list(m.iter_attachments())
        self.assertEqual(len(parts), 1)
        self.assertEqual(parts[0].get_content(), attachment)
        self.assertEqual(m.get_body(preferencelist=("plain",)).get_content().replace("\r\n", "\n"),
                         text)

        im = imaplib.IMAP4_SSL(self.env["MP_IMAP_HOST"], int(self.env["MP_IMAPS_PORT"]),
                               ssl_context=mpstack.imap_ssl_context(self.env))
        try:
            im.login("alice@test.example", self.env["MP_IMAP_PASSWORD"])
            im.select(appended["imap"]["mailbox"], readonly=True)
            typ, data = im.uid("FETCH", str(appended["imap"]["uid"]), "(BODY.PEEK[])")
            self.assertEqual(typ, "OK")
            sent = data[0][1]
        finally:
            im.logout()
        # Postfix stores LF line ends and puts its trace fields on top
        # (Return-Path, X-Original-To, Delivered-To, Received); the rest is
        # the message
        sent_lf = sent.replace(b"\r\n", b"\n")
        self.assertGreater(len(sent_lf), 6 << 20)
        self.assertTrue(stored.endswith(sent_lf), "the delivered and the Sent copy differ")
        trace = stored[:len(stored) - len(sent_lf)].decode()
        names = [line.split(":", 1)[0] for line in trace.splitlines() if line[:1] not in (" ", "\t")]
        self.assertEqual(names, ["Return-Path", "X-Original-To", "Delivered-To", "Received"], trace)

    def test_rejected_recipient_fails_with_5xx(self):
        msg_id = self.enqueue("--from", "bob@test.example", "--to", "reject@test.example",
                              "--to", "carol@test.example", "--subject", "partly rejected",
                              "--text", "hi")
        evs = self.events_for(msg_id, 2, kinds={"delivered", "bounced"})
        by_rcpt = {e["recipient"]: e for e in evs}
        failed = by_rcpt["reject@test.example"]
        self.assertEqual(failed["event"], "bounced")
        self.assertEqual(failed["_routing_key"], "bounced")
        self.assertEqual(failed["outcome"], "permanent")
        self.assertEqual(failed["smtp"]["code"], 550)
        self.assertEqual(failed["smtp"]["enhanced"], "5.1.1")
        self.assertIn("no such user", failed["smtp"]["text"])
        self.assertEqual(failed["reason"], "no_such_user")
        self.assertNotIn("imap", failed)
        self.assertEqual(by_rcpt["carol@test.example"]["event"], "delivered")

    def test_malformed_messages_are_dead_lettered(self):
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.confirm_delivery()
            bad = [
                (b"{this is not json", "invalid JSON"),
                (json.dumps({"to": ["x@test.example"], "id": "no-from-1"}).encode(), "from"),
                (json.dumps({"from": "a@test.example", "to": ["bob@"], "id": "bad-rcpt-1"}).encode(),
                 "bob@"),
                (json.dumps({"from": "a@test.example", "to": ["b@test.example"], "id": "crlf-1",
                             "headers": {"X-Evil": "a\r\nBcc: victim@test.example"}}).encode(),
                 "X-Evil"),
            ]
            for body, _ in bad:
                ch.basic_publish("", self.daemon.queue, body,
                                 pika.BasicProperties(delivery_mode=2))
            dead = self.tap.wait(lambda e: e["event"] == "dead", len(bad))
            self.assertTrue(any("JSON" in e["error"] for e in dead), dead)
            got = {}
            deadline = time.time() + 30
            while len(got) < len(bad) and time.time() < deadline:
                method, props, body = ch.basic_get(self.daemon.dead_queue, auto_ack=True)
                if method is None:
                    time.sleep(0.1)
                    continue
                got[body] = props.headers["x-mailpump-reason"]
            self.assertEqual(len(got), len(bad))
            for body, needle in bad:
                self.assertIn(body, got)
                self.assertIn(needle, got[body])
        finally:
            conn.close()
        # the worker survived: a good message still goes through
        msg_id = self.enqueue("--from", "bob@test.example", "--to", "dave@test.example",
                              "--subject", "after the bad ones", "--text", "still here")
        self.events_for(msg_id, 1, kinds={"delivered"})

    def test_transient_recipient_retried_until_attempts_run_out(self):
        msg_id = self.enqueue("--from", "bob@test.example", "--to", "tempfail@test.example",
                              "--to", "henry@test.example", "--subject", "tempfail",
                              "--text", "retry me")
        evs = self.events_for(msg_id, 4, kinds={"delivered", "deferred", "bounced"}, timeout=60)
        henry = [e for e in evs if e["recipient"] == "henry@test.example"]
        temp = sorted((e for e in evs if e["recipient"] == "tempfail@test.example"),
                      key=lambda e: e["attempt"])
        # the accepted recipient is delivered once, on the first attempt only
        self.assertEqual([(e["event"], e["attempt"]) for e in henry], [("delivered", 1)])
        self.assertEqual([(e["event"], e["attempt"]) for e in temp],
                         [("deferred", 1), ("deferred", 2), ("bounced", 3)])
        for e in temp:
            self.assertEqual(e["smtp"]["code"], 450)
            self.assertEqual(e["smtp"]["enhanced"], "4.2.0")
        self.assertEqual(temp[0]["outcome"], "transient")
        self.assertIn("retries exhausted after 3 attempts", temp[2]["error"])
        # the Sent copy was stored once, on the attempt that delivered henry
        appended = [e for e in self.tap.events
                    if e.get("message_id") == msg_id and e["event"] == "appended"]
        self.assertEqual(len(appended), 1)
        self.assertEqual(appended[0]["attempt"], 1)
        _, data = mpstack.find_in_maildir(self.env["MP_MX1_MAILDIR"], msg_id)
        self.assertIsNotNone(data)
        copies = 0
        for sub in ("new", "cur"):
            d = os.path.join(self.env["MP_MX1_MAILDIR"], sub)
            for name in os.listdir(d):
                with open(os.path.join(d, name), "rb") as f:
                    copies += msg_id.encode() in f.read()
        self.assertEqual(copies, 1)

    def test_dns_outcomes_and_failover(self):
        cases = {
            "ann@nxdomain.test.example": ("bounced", "dns", "mx_host", None),
            "ann@nullmx.test.example": ("bounced", "dns", "mx_host", None),
            "ann@failover.test.example": ("delivered", "delivered", "mx_host", "mx2.test.example"),
            # implicit MX: the domain's own A record; its name is not in the
            # receiver's certificate, so the verify policy refuses it
            "ann@nomx.test.example": ("deferred", "tls", "mx_host", "nomx.test.example"),
        }
        ids = {}
        for rcpt in cases:
            ids[rcpt] = self.enqueue("--from", "bob@test.example", "--to", rcpt,
                                     "--subject", "dns", "--text", rcpt)
        for rcpt, (event, reason, _, mx) in cases.items():
            ev = self.events_for(ids[rcpt], 1, kinds={"delivered", "bounced", "deferred"})[0]
            self.assertEqual((ev["event"], ev["reason"]), (event, reason), ev)
            if mx:
                self.assertEqual(ev["mx_host"], mx)
                self.assertIn(ev["mx_addr"], ("127.0.0.2", "127.0.0.3"))
            else:
                self.assertNotIn("smtp", ev)
        # a resolver that never answers is transient: deferred, then retried
        tid = self.enqueue("--from", "bob@test.example", "--to", "ann@timeout.test.example",
                           "--text", "slow dns")
        ev = self.events_for(tid, 1, kinds={"deferred"})[0]
        self.assertEqual(ev["outcome"], "transient")
        self.assertEqual(ev["reason"], "dns")

    def test_sent_copies_share_pooled_imap_sessions(self):
        """[imap] pool = 1 (the default): a worker keeps its logged-in
        session to the sender's mailbox and the next Sent copy is one
        APPEND on it. Six messages in turn from one sender open at most one
        IMAP connection per worker (2); the others reuse one."""
        opened0 = self.daemon.metric("mailpump_imap_sessions_opened_total")
        reused0 = self.daemon.metric("mailpump_imap_sessions_reused_total")
        uids = []
        for i in range(6):
            msg_id = self.enqueue("--from", "bob@test.example", "--to", "erin@test.example",
                                  "--text", f"pooled sent copy {i}")
            ev = self.events_for(msg_id, 1, kinds={"appended"})[0]
            uids.append(ev["imap"]["uid"])
        self.assertEqual(len(set(uids)), 6, uids)
        opened = self.daemon.metric("mailpump_imap_sessions_opened_total") - opened0
        reused = self.daemon.metric("mailpump_imap_sessions_reused_total") - reused0
        self.assertLessEqual(opened, 2, f"opened {opened} IMAP connections for 6 copies")
        self.assertEqual(opened + reused, 6, (opened, reused))

    def test_metrics_and_health(self):
        msg_id = self.enqueue("--from", "bob@test.example", "--to", "erin@test.example",
                              "--text", "metrics")
        self.events_for(msg_id, 1, kinds={"delivered"})
        status, body = self.daemon.http("/healthz")
        self.assertEqual(status, 200)
        status, body = self.daemon.http("/metrics")
        self.assertEqual(status, 200)
        self.assertIn("# TYPE mailpump_messages_consumed_total counter", body)
        self.assertGreaterEqual(self.daemon.metric("mailpump_messages_consumed_total"), 1)
        self.assertGreaterEqual(self.daemon.metric("mailpump_recipients_delivered_total"), 1)
        self.assertGreaterEqual(self.daemon.metric("mailpump_smtp_sessions_opened_total"), 1)
        self.assertEqual(self.daemon.metric("mailpump_workers_ready"), 2)
        status, _ = self.daemon.http("/nope")
        self.assertEqual(status, 404)


class Priority(unittest.TestCase):
    def test_priority_property_is_honoured(self):
        env = mpstack.stack_env()
        d = mpstack.Daemon(env, workers=1, extra_env={"MAILPUMP_AMQP_PREFETCH": "1"})
        tap = mpstack.EventTap(env, d.exchange)
        try:
            ids = []
            for i in range(4):
                r = d.cli("enqueue", "--from", "bob@test.example", "--to", "frank@test.example",
                          "--text", f"low {i}", "--priority", "0")
                self.assertEqual(r.returncode, 0, r.stderr)
                ids.append(r.stdout.strip())
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "frank@test.example",
                      "--text", "urgent", "--priority", "9")
            self.assertEqual(r.returncode, 0, r.stderr)
            urgent = r.stdout.strip()
            d.start()
            evs = tap.wait(lambda e: e["event"] == "delivered", 5)
            self.assertEqual(evs[0]["message_id"], urgent)
            self.assertEqual({e["message_id"] for e in evs[1:]}, set(ids))
        finally:
            rc = d.stop()
            tap.close()
        self.assertEqual(rc, 0)


class GracefulShutdown(unittest.TestCase):
    """SIGTERM with a message in flight: it is finished and acked, nothing
    new is consumed, and the daemon exits 0."""

    def test_sigterm_finishes_inflight_and_stops_consuming(self):
        env = mpstack.stack_env()
        port = mpstack.free_port()
        # a plaintext receiver that waits 2 s before answering DATA
        sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", "-w", "2",
                                 f"127.0.0.2:{port}", "100"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        d = mpstack.Daemon(env, workers=1, extra_env={
            "MAILPUMP_SMTP_PORT": str(port), "MAILPUMP_SMTP_TLS": "none",
            "MAILPUMP_IMAP_HOST": ""})
        tap = mpstack.EventTap(env, d.exchange)
        try:
            d.start()
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "slow@test.example",
                      "--text", "in flight at SIGTERM")
            self.assertEqual(r.returncode, 0, r.stderr)
            inflight = r.stdout.strip()
            deadline = time.time() + 10
            while time.time() < deadline and d.metric("mailpump_messages_inflight") < 1:
                time.sleep(0.05)
            self.assertEqual(d.metric("mailpump_messages_inflight"), 1)
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            r = d.cli("enqueue", "--from", "bob@test.example", "--to", "later@test.example",
                      "--text", "after SIGTERM")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(d.proc.wait(30), 0, d.log())
            evs = tap.wait(lambda e: e["event"] == "delivered", 1)
            self.assertEqual(evs[0]["message_id"], inflight)
            self.assertEqual(evs[0]["smtp"]["code"], 250)
            self.assertNotIn("tls", evs[0])
            conn, ch = mpstack.amqp_channel(env)
            try:
                q = ch.queue_declare(d.queue, passive=True)
                self.assertEqual(q.method.message_count, 1)  # the later one waits
            finally:
                conn.close()
            self.assertIn("event=draining", d.log())
        finally:
            d.stop()
            tap.close()
            sink.terminate()
            sink.wait(10)


class NetworkJitter(unittest.TestCase):
    def test_refused_connections_get_fast_retries_then_defer(self):
        env = mpstack.stack_env()
        closed = mpstack.free_port()  # nothing listens there on any 127.x address
        d = mpstack.Daemon(env, workers=1, extra_env={
            "MAILPUMP_SMTP_PORT": str(closed), "MAILPUMP_IMAP_HOST": "",
            "MAILPUMP_RETRY_P2_FAST_RETRIES": "2", "MAILPUMP_RETRY_P2_FAST_BASE": "50ms",
            "MAILPUMP_RETRY_P0_FAST_RETRIES": "4", "MAILPUMP_RETRY_P0_FAST_BASE": "20ms",
            "MAILPUMP_RETRY_LEVELS": "1h"})
        tap = mpstack.EventTap(env, d.exchange)
        try:
            d.start()
            ids = {}
            for prio in ("0", "9"):
                r = d.cli("enqueue", "--from", "bob@test.example", "--to", "ivy@test.example",
                          "--text", "refused", "--priority", prio)
                self.assertEqual(r.returncode, 0, r.stderr)
                ids[prio] = r.stdout.strip()
            for prio, fast in (("0", 2), ("9", 4)):
                ev = tap.wait(lambda e: e.get("message_id") == ids[prio], 1)[0]
                self.assertEqual(ev["event"], "deferred")
                self.assertEqual(ev["reason"], "network")
                self.assertEqual(ev["retry_in_ms"], 3600000)
                self.assertNotIn("smtp", ev)
                tries = [l for l in d.log().splitlines()
                         if "event=fast_retry" in l and ids[prio] in l]
                self.assertEqual(len(tries), fast, "\n".join(tries))
        finally:
            self.assertEqual(d.stop(), 0)
            tap.close()


class ImapFailure(unittest.TestCase):
    def test_append_is_retried_alone_never_resending_smtp(self):
        env = mpstack.stack_env()
        d = mpstack.Daemon(env, workers=1, extra_env={
            "MAILPUMP_IMAP_PORT": str(mpstack.free_port()),  # nothing listens: append fails
            "MAILPUMP_RETRY_LEVELS": "200ms,400ms", "MAILPUMP_RETRY_P2_BASE": "200ms",
            "MAILPUMP_RETRY_P2_MAX_ATTEMPTS": "3"})
        tap = mpstack.EventTap(env, d.exchange)
        try:
            d.start()
            r = d.cli("enqueue", "--from", "alice@test.example", "--to", "jack@test.example",
                      "--subject", "imap down", "--text", "sent once")
            self.assertEqual(r.returncode, 0, r.stderr)
            msg_id = r.stdout.strip()
            evs = tap.wait(lambda e: e.get("message_id") == msg_id and
                           e["event"] == "append_failed", 3)
            evs.sort(key=lambda e: e["attempt"])
            self.assertEqual([e["attempt"] for e in evs], [1, 2, 3])
            self.assertIn("retry_in_ms", evs[0])
            self.assertIn("retry_in_ms", evs[1])
            self.assertNotIn("retry_in_ms", evs[2])  # attempts used up
            delivered = [e for e in tap.events
                         if e.get("message_id") == msg_id and e["event"] == "delivered"]
            self.assertEqual(len(delivered), 1)
            # the receiver got exactly one copy
            copies = 0
            for sub in ("new", "cur"):
                dd = os.path.join(env["MP_MX1_MAILDIR"], sub)
                for name in os.listdir(dd):
                    with open(os.path.join(dd, name), "rb") as f:
                        copies += msg_id.encode() in f.read()
            self.assertEqual(copies, 1)
        finally:
            self.assertEqual(d.stop(), 0)
            tap.close()


class SentCopyRetry(unittest.TestCase):
    def test_copy_stored_by_an_earlier_attempt_is_found_not_appended_again(self):
        """An earlier worker stored the Sent copy and died before its ack:
        the message comes back redelivered, the worker searches the Sent
        folder for its Message-ID first and reports the copy that is there
        (same UID) instead of storing a second one."""
        env = mpstack.stack_env()
        d = mpstack.Daemon(env, workers=1)
        tap = mpstack.EventTap(env, d.exchange)
        msg_id = "sentcopy-" + os.urandom(6).hex()
        im = imaplib.IMAP4_SSL(env["MP_IMAP_HOST"], int(env["MP_IMAPS_PORT"]),
                               ssl_context=mpstack.imap_ssl_context(env))
        conn, ch = mpstack.amqp_channel(env)
        try:
            im.login("alice@test.example", env["MP_IMAP_PASSWORD"])
            earlier = (f"From: alice@test.example\r\nTo: kim@test.example\r\n"
                       f"Message-ID: <{msg_id}@test.example>\r\nSubject: stored before\r\n\r\n"
                       f"the earlier attempt's copy\r\n").encode()
            typ, data = im.append("Sent", "(\\Seen)", None, earlier)
            self.assertEqual(typ, "OK", data)
            uid0 = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))

            ch.queue_declare(d.queue, durable=True, arguments={"x-max-priority": 10})
            ch.confirm_delivery()
            ch.basic_publish("", d.queue, json.dumps({
                "id": msg_id, "from": "alice@test.example", "to": ["kim@test.example"],
                "subject": "stored before", "text": "sent once"}), pika.BasicProperties(delivery_mode=2))
            method, _, _ = ch.basic_get(d.queue, auto_ack=False)  # the worker that died
            self.assertIsNotNone(method)
            ch.basic_nack(method.delivery_tag, requeue=True)
            d.start()
            ev = tap.wait(lambda e: e.get("message_id") == msg_id and e["event"] == "appended", 1)[0]
            self.assertEqual(ev["imap"]["uid"], uid0)
            self.assertEqual(d.metric("mailpump_imap_copies_found_total"), 1)
            im.select("Sent", readonly=True)
            typ, data = im.uid("SEARCH", "HEADER", "Message-ID", f"<{msg_id}@test.example>")
            self.assertEqual(typ, "OK")
            self.assertEqual(data[0].split(), [str(uid0).encode()])
        finally:
            conn.close()
            im.logout()
            self.assertEqual(d.stop(), 0)
            tap.close()


class Cli(unittest.TestCase):
    def run_cli(self, *args, stdin=None):
        return subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpump"), *args],
                              input=stdin, capture_output=True, text=True, timeout=30)

    def test_help(self):
        r = self.run_cli("--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("enqueue", r.stdout)
        r = self.run_cli("help", "enqueue")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--priority", r.stdout)
        r = self.run_cli("enqueue", "--help")
        self.assertIn("--from", r.stdout)
        r = self.run_cli("bogus")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown command", r.stderr)

    def test_invalid_message_refused_before_publishing(self):
        r = self.run_cli("--amqp", "127.0.0.1:1", "enqueue", "--from", "alice@test.example",
                         "--to", "bob@")
        self.assertEqual(r.returncode, 2)
        self.assertIn("invalid message", r.stderr)
        self.assertIn("bob@", r.stderr)
        r = self.run_cli("--amqp", "127.0.0.1:1", "enqueue", stdin="{nope")
        self.assertEqual(r.returncode, 2)
        self.assertIn("not a JSON object", r.stderr)

    def test_json_on_stdin(self):
        env = mpstack.stack_env()
        q = "itest.cli." + os.urandom(4).hex()
        body = json.dumps({"from": "alice@test.example", "to": ["bob@test.example"],
                           "id": "cli-stdin-1", "subject": "from stdin"})
        r = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpump"),
                            "--amqp", f"{env['MP_AMQP_HOST']}:{env['MP_AMQP_PORT']}",
                            "enqueue", "--priority", "7"], input=body,
                           env=dict(os.environ, MAILPUMP_AMQP_QUEUE=q),
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "cli-stdin-1")
        conn, ch = mpstack.amqp_channel(env)
        try:
            method, props, got = ch.basic_get(q, auto_ack=True)
            self.assertIsNotNone(method)
            self.assertEqual(json.loads(got)["subject"], "from stdin")
            self.assertEqual(props.priority, 7)
            self.assertEqual(props.delivery_mode, 2)
            ch.queue_delete(q)
        finally:
            conn.close()

    def test_broker_down_is_a_clear_error(self):
        r = self.run_cli("--amqp", "127.0.0.1:1", "enqueue", "--from", "alice@test.example",
                         "--to", "bob@test.example")
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot connect to RabbitMQ at 127.0.0.1:1", r.stderr)


class Configuration(unittest.TestCase):
    def test_check_config(self):
        env = mpstack.stack_env()
        exe = os.path.join(mpstack.BUILD_DIR, "mailpumpd")
        r = subprocess.run([exe, "--config", env["MP_MAILPUMPD_CONFIG"], "--check-config"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("[amqp]", r.stdout)
        self.assertIn("password = ********", r.stdout)
        self.assertNotIn("password = guest", r.stdout)
        r = subprocess.run([exe, "--config", env["MP_MAILPUMPD_CONFIG"], "--check-config"],
                           env=dict(os.environ, MAILPUMP_AMQP_PREFETCH="7"),
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("prefetch = 7", r.stdout)
        r = subprocess.run([exe, "--config", env["MP_MAILPUMPD_CONFIG"], "--check-config"],
                           env=dict(os.environ, MAILPUMP_SMTP_TLS="sometimes"),
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertIn("[smtp] tls", r.stderr)
        r = subprocess.run([exe, "--config", "/nonexistent.ini"], capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertIn("/nonexistent.ini", r.stderr)


import pika  # noqa: E402

if __name__ == "__main__":
    unittest.main(verbosity=2)

"""The IMAP side under a fault: Dovecot stopped and started again in the
middle of a burst of Sent copies, against the real stack.

Pooled sessions die with their server, appends in flight fail or are cut
after their APPEND went out, and the worker retries the Sent copies on
their own (never the SMTP side). What must hold afterwards: every message
delivered once and its Sent copy stored exactly once -- a retried copy
that the server had already stored is found by its Message-ID, not
appended a second time. Checked with Python's imaplib, per Message-ID.
"""
import imaplib
import json
import os
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
import privbroker  # noqa: E402
import pika  # noqa: E402

N = 150
SENDER = "alice@test.example"


def dovecot_pid():
    with open(os.path.join(mpstack.STACK_DIR, "dovecot", "run", "master.pid")) as f:
        return int(f.read().split()[0])


def stack_up():
    r = subprocess.run([os.path.join(mpstack.SOURCE_DIR, "deploy", "local", "stack"), "up"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"stack up failed: {r.stdout}{r.stderr}")


class DovecotRestart(unittest.TestCase):
    def test_sent_copies_stored_once_across_a_dovecot_restart(self):
        env = mpstack.stack_env()
        retry = {}
        for p in ("P0", "P1", "P2"):
            retry.update({f"MAILPUMP_RETRY_{p}_BASE": "500ms", f"MAILPUMP_RETRY_{p}_MAX_ATTEMPTS": "30",
                          f"MAILPUMP_RETRY_{p}_FAST_RETRIES": "0"})
        d = mpstack.Daemon(env, workers=2, extra_env={"MAILPUMP_RETRY_LEVELS": "500ms,1s,2s", **retry})
        tap = mpstack.EventTap(env, d.exchange)
        run = os.urandom(4).hex()
        ids = [f"dovecot-restart-{run}-{i}" for i in range(N)]
        try:
            d.start()
            conn, ch = mpstack.amqp_channel(env)
            try:
                ch.confirm_delivery()
                for mid in ids:
                    ch.basic_publish("", d.queue, json.dumps({
                        "id": mid, "from": SENDER, "to": [f"{mid}@test.example"],
                        "subject": "restart", "text": "one Sent copy, whatever happens\n" * 50}),
                        pika.BasicProperties(delivery_mode=2))
            finally:
                conn.close()
            tap.wait(lambda e: e["event"] == "appended" and e.get("message_id") in ids, 3, 120)
            # Dovecot dies: its imap processes first (SIGKILL: sessions cut
            # mid-command), then the master
            pid = dovecot_pid()
            for child in privbroker.process_tree(pid)[1:]:  # Dovecot's imap and login processes
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            time.sleep(1.0)
            stack_up()  # starts what is down: Dovecot
            appended = tap.wait(lambda e: e["event"] == "appended" and e.get("message_id") in ids, N, 180)
            tap.drain()
            per_msg = {}
            for e in tap.events:
                if e.get("message_id") in ids and e["event"] == "appended":
                    per_msg.setdefault(e["message_id"], []).append(e)
            self.assertEqual(sorted(per_msg), sorted(ids))
            twice = {m: len(v) for m, v in per_msg.items() if len(v) != 1}
            self.assertEqual(twice, {}, "a message reported appended more than once")
            delivered = [e for e in tap.events if e.get("message_id") in ids and e["event"] == "delivered"]
            self.assertEqual(len(delivered), N)
            failed = [e for e in tap.events if e.get("message_id") in ids and e["event"] == "append_failed"]
            self.assertTrue(all("retry_in_ms" in e for e in failed), failed)

            im = imaplib.IMAP4_SSL(env["MP_IMAP_HOST"], int(env["MP_IMAPS_PORT"]),
                                   ssl_context=mpstack.imap_ssl_context(env))
            try:
                im.login(SENDER, env["MP_IMAP_PASSWORD"])
                im.select("Sent", readonly=True)
                copies = {}
                for mid in ids:
                    typ, data = im.uid("SEARCH", "HEADER", "Message-ID", f"<{mid}@test.example>")
                    self.assertEqual(typ, "OK")
                    copies[mid] = data[0].split()
            finally:
                im.logout()
            wrong = {m: c for m, c in copies.items() if len(c) != 1}
            self.assertEqual(wrong, {}, "Sent copies missing or stored twice")
            for e in appended:  # the UID each event reported is the stored copy
                self.assertEqual(copies[e["message_id"]], [str(e["imap"]["uid"]).encode()])
            print(f"\nDovecot restarted mid-burst: {N} delivered, {N} Sent copies stored once; "
                  f"{len(failed)} append attempts failed and were retried, "
                  f"{int(d.metric('mailpump_imap_copies_found_total'))} found already stored",
                  file=sys.stderr)
        finally:
            try:
                stack_up()  # never leave the stack without Dovecot
            finally:
                self.assertEqual(d.stop(), 0)
                tap.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)

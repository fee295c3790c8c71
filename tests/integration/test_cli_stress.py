"""`mailpump stress` against the real local stack: RabbitMQ -> mailpumpd
(private queues) -> Postfix (STARTTLS) -> Dovecot Sent folder, events back.

The report is checked against what the receivers hold, independently: the
Postfix maildirs are scanned for this run's Message-IDs, and the Sent
folder is searched over IMAP for the run's X-Mailpump-Stress header.
"""
import imaplib
import json
import os
import re
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

SENDER = "alice@test.example"  # has an IMAP account in the stack (Sent copies)


def run_stress(daemon, *args, timeout=300):
    """mailpump stress on the daemon's private queues and exchange."""
    env = dict(daemon.proc_env)
    t0 = time.time()
    r = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpump"), "stress", *args], env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t0


def report(r):
    lines = r.stdout.strip().splitlines()
    if len(lines) != 1:
        raise AssertionError(f"expected one JSON line, got: {r.stdout!r} {r.stderr!r}")
    return json.loads(lines[0])


def maildir_copies(env, runid, want, timeout=60):
    """{n: copies} of this run's messages in both receivers' maildirs,
    waiting until `want` copies are there (Postfix delivers to the maildir
    after it answered 250)."""
    pat = re.compile(rb"^Message-ID:\s*<stress-" + runid.encode() + rb"-(\d+)@",
                     re.IGNORECASE | re.MULTILINE)
    deadline = time.time() + timeout
    while True:
        copies = {}
        for base in (env["MP_MX1_MAILDIR"], env["MP_MX2_MAILDIR"]):
            for sub in ("new", "cur"):
                d = os.path.join(base, sub)
                for name in os.listdir(d) if os.path.isdir(d) else []:
                    try:
                        with open(os.path.join(d, name), "rb") as f:
                            head = f.read(16384)
                    except FileNotFoundError:
                        continue
                    m = pat.search(head)
                    if m:
                        n = int(m.group(1))
                        copies[n] = copies.get(n, 0) + 1
        if sum(copies.values()) >= want or time.time() > deadline:
            return copies
        time.sleep(0.2)


def sent_copies(env, runid):
    """Messages of this run in the sender's Sent folder."""
    im = imaplib.IMAP4_SSL(env["MP_IMAP_HOST"], int(env["MP_IMAPS_PORT"]),
                           ssl_context=mpstack.imap_ssl_context(env))
    try:
        im.login(SENDER, env["MP_IMAP_PASSWORD"])
        typ, _ = im.select("Sent", readonly=True)
        assert typ == "OK"
        typ, data = im.uid("SEARCH", "HEADER", "X-Mailpump-Stress", runid)
        assert typ == "OK", data
        return len(data[0].split())
    finally:
        im.logout()


class Stress(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        # default prefetch (64): a burst of Sent copies from one sender
        # stays within Dovecot's 10 connections per user and IP because
        # each worker opens at most [imap] pool_max_connections (2)
        cls.daemon = mpstack.Daemon(cls.env, workers=2)
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls):
        rc = cls.daemon.stop()
        if rc != 0:
            raise AssertionError(f"mailpumpd exit status {rc} after SIGTERM:\n{cls.daemon.log()}")

    def test_200_delivered_and_appended(self):
        r, wall = run_stress(self.daemon, "--count", "200", "--from", SENDER,
                             "--to-domain", "test.example", "--append", "--size", "2048",
                             "--timeout", "240", "--json")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        rep = report(r)
        print(f"\nstress 200 x test.example with --append: {wall:.1f} s wall\n{r.stdout}",
              file=sys.stderr)
        self.assertRegex(rep["run_id"], r"^[0-9a-f]{12}$")
        for key, want in (("count", 200), ("published", 200), ("unpublished", 0),
                          ("delivered", 200), ("bounced", 0), ("dead", 0),
                          ("appended", 200), ("append_failed", 0), ("missing", 0),
                          ("recipients_per_message", 1)):
            self.assertEqual(rep[key], want, key)
        self.assertFalse(rep["timed_out"])
        self.assertEqual(rep["missing_first"], [])
        self.assertGreater(rep["publish_rate"], 0)
        self.assertGreater(rep["delivered_per_s"], 0)
        self.assertGreater(rep["deliver_s"], 0)
        for kind in ("delivered", "appended"):
            lat = rep["latency_ms"][kind]
            self.assertEqual(lat["count"], 200, kind)
            for p in ("p50", "p90", "p99", "max"):
                self.assertIsInstance(lat[p], int, (kind, p))
            self.assertLessEqual(0, lat["p50"])
            self.assertLessEqual(lat["p50"], lat["p90"])
            self.assertLessEqual(lat["p90"], lat["p99"])
            self.assertLessEqual(lat["p99"], lat["max"])
            # bounded by the run itself
            self.assertLessEqual(lat["max"], wall * 1000 + 1000)

        # the receivers got exactly one copy of each of this run's messages
        copies = maildir_copies(self.env, rep["run_id"], 200)
        self.assertEqual(sorted(copies), list(range(1, 201)))
        self.assertEqual(set(copies.values()), {1})
        # and the Sent folder holds each once
        self.assertEqual(sent_copies(self.env, rep["run_id"]), 200)

    def test_bounces_fail_the_run_unless_allowed(self):
        # reject@ answers 550 5.1.1 (the e2e 5xx case); user1@ is delivered,
        # so each message still gets its Sent copy
        args = ["--count", "20", "--from", SENDER, "--to", "reject@test.example",
                "--to-domain", "test.example", "--append", "--rate", "50", "--window", "1",
                "--timeout", "120", "--json"]
        r, _ = run_stress(self.daemon, *args)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        rep = report(r)
        self.assertEqual(rep["recipients_per_message"], 2)
        self.assertEqual(rep["published"], 20)
        self.assertEqual(rep["bounced"], 20)
        self.assertEqual(rep["delivered"], 20)
        self.assertEqual(rep["appended"], 20)
        self.assertEqual(rep["missing"], 0)
        self.assertEqual(rep["latency_ms"]["delivered"]["count"], 20)

        r, _ = run_stress(self.daemon, *args, "--allow-failures")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        rep = report(r)
        self.assertEqual(rep["bounced"], 20)
        self.assertEqual(rep["missing"], 0)

    def test_human_report(self):
        r, _ = run_stress(self.daemon, "--count", "5", "--from", "carol@test.example",
                          "--to", "dave@test.example", "--timeout", "60")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"published\s+5 of 5 in [0-9.]+ s \([0-9.]+ msg/s\)")
        self.assertRegex(r.stdout, r"delivered\s+5 recipients")
        self.assertRegex(r.stdout, r"missing\s+0\n")
        self.assertRegex(r.stdout, r"latency ms\s+p50\s+p90\s+p99\s+max")


class NoDaemon(unittest.TestCase):
    def test_timeout_reports_everything_missing(self):
        env = mpstack.stack_env()
        d = mpstack.Daemon(env)  # its queues, but never started
        try:
            r, wall = run_stress(d, "--count", "10", "--from", SENDER, "--to-domain",
                                 "test.example", "--append", "--timeout", "2", "--json",
                                 timeout=30)
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            rep = report(r)
            self.assertEqual(rep["published"], 10)
            self.assertEqual(rep["missing"], 10)
            self.assertEqual(rep["delivered"], 0)
            self.assertTrue(rep["timed_out"])
            self.assertEqual(len(rep["missing_first"]), 10)
            self.assertEqual(rep["missing_first"][0]["id"], f"stress-{rep['run_id']}-1")
            self.assertEqual(rep["latency_ms"]["delivered"]["p50"], None)
            self.assertIn("timeout after 2 s: 10 messages missing", r.stderr)
            self.assertLess(wall, 8)
        finally:
            d.stop()


class Usage(unittest.TestCase):
    def run_cli(self, *args):
        return subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpump"), *args],
                              capture_output=True, text=True, timeout=30)

    def test_help_and_bad_usage(self):
        r = self.run_cli("stress", "--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--to-domain", r.stdout)
        r = self.run_cli("help", "stress")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--allow-failures", r.stdout)
        r = self.run_cli("--help")
        self.assertIn("stress", r.stdout)
        for args, needle in ((["--to", "b@test.example"], "--from"),
                             (["--from", "a@test.example"], "--to"),
                             (["--from", "a@test.example", "--to", "b@", "--count", "1"],
                              "invalid message"),
                             (["--from", "a@test.example", "--to", "b@test.example",
                               "--count", "0"], "--count"),
                             (["--from", "a@test.example", "--to", "b@test.example",
                               "--rate", "-1"], "--rate"),
                             (["--from", "a@test.example", "--to", "b@test.example",
                               "--recipients", "3"], "--to-domain")):
            # a broker that does not exist: usage errors come first
            r = self.run_cli("--amqp", "127.0.0.1:1", "stress", *args)
            self.assertEqual(r.returncode, 2, (args, r.stderr))
            self.assertIn(needle, r.stderr)
        r = self.run_cli("--amqp", "127.0.0.1:1", "stress", "--from", "a@test.example",
                         "--to", "b@test.example", "--count", "1")
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot connect to RabbitMQ at 127.0.0.1:1", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

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

    def test_progress_lines_and_breakdown(self):
        # 400 messages at 100/s to user1@ (delivered) and reject@ (550 5.1.1):
        # without a terminal, a progress line on stderr every second
        r, wall = run_stress(self.daemon, "--count", "400", "--rate", "100", "--from", SENDER,
                             "--to", "reject@test.example", "--to-domain", "test.example",
                             "--progress-interval", "1", "--allow-failures", "--timeout", "120",
                             "--json")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        rep = report(r)  # stdout: still exactly one JSON line
        line_re = re.compile(
            r"^stress (\d+\.\d)s published (\d+)/400 delivered (\d+) bounced (\d+) "
            r"deferred (\d+) in_flight (\d+) rate (\d+\.\d)/s avg (\d+\.\d)/s "
            r"p50 (-|\d+ms) p99 (-|\d+ms)$")
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("stress ")]
        self.assertNotIn("\r", r.stderr)
        # publishing alone takes 4 s at 100/s
        self.assertGreaterEqual(len(lines), 3, r.stderr)
        prev = None
        for ln in lines:
            m = line_re.match(ln)
            self.assertIsNotNone(m, ln)
            el, pub, dlv, bnc, dfr, infl = (float(m.group(1)), *map(int, m.group(2, 3, 4, 5, 6)))
            self.assertLessEqual(infl, pub, ln)
            self.assertLessEqual(dlv, 400, ln)
            self.assertLessEqual(bnc, 400, ln)
            if m.group(9) != "-":
                self.assertLessEqual(int(m.group(9)[:-2]), int(m.group(10)[:-2]), ln)
            if prev:
                for a, b in zip(prev, (el, pub, dlv, bnc, dfr)):
                    self.assertLessEqual(a, b, (prev, ln))  # monotonic
            prev = (el, pub, dlv, bnc, dfr)
        self.assertLess(int(line_re.match(lines[0]).group(2)), 400, lines[0])
        self.assertEqual(rep["published"], 400)
        self.assertEqual(rep["delivered"], 400)
        self.assertEqual(rep["bounced"], 400)
        self.assertEqual(rep["missing"], 0)
        self.assertEqual(rep["failure_rate"], 0.5)  # 400 of 800 recipients
        self.assertEqual(rep["breakdown"]["bounced"],
                         [{"reason": "no_such_user", "count": 400, "codes": {"550 5.1.1": 400}}])
        self.assertEqual(rep["breakdown"]["deferred"], [])
        print(f"\nstress 400 x 2 with progress: {wall:.1f} s wall, {len(lines)} lines, "
              f"last: {lines[-1]}", file=sys.stderr)

    def test_human_report_breakdown(self):
        r, _ = run_stress(self.daemon, "--count", "4", "--from", "carol@test.example",
                          "--to", "reject@test.example", "--to", "dave@test.example",
                          "--allow-failures", "--progress-interval", "0", "--timeout", "60")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("\nfailure rate     50.00% (bounced + dead / recipients published)\n"
                      "bounced: no_such_user 4 (550 5.1.1: 4)\n", r.stdout)
        self.assertNotIn("deferred:", r.stdout)
        self.assertNotRegex(r.stderr, r"(?m)^stress ")

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

    COMMANDS = {  # command: a line only its own usage has
        "enqueue": "Usage: mailpump enqueue --from ADDR --to ADDR",
        "events": "Usage: mailpump events [--key PATTERN]",
        "dns": "dns resolve [OPTIONS] DOMAIN...",
        "stress": "stress --from ADDR (--to ADDR... | --to-domain DOMAIN)",
        "trace": "trace [--json] MESSAGE_ID",
        "queue": "Usage: mailpump [--config FILE] queue [--json]",
        "dead": "dead list [--reason TEXT]",
        "admin": "Usage: mailpump admin suspend|bounce SELECTOR",
        "suppress": "suppress add [--tenant T | --global]",
    }

    def test_help_for_every_command(self):
        general = self.run_cli("--help")
        self.assertEqual(general.returncode, 0)
        self.assertIn("Usage: mailpump [GLOBAL OPTIONS] COMMAND", general.stdout)
        self.assertIn("Exit status: 0 success, 1 runtime failure", general.stdout)
        self.assertEqual(self.run_cli("help").stdout, general.stdout)
        for cmd, needle in self.COMMANDS.items():
            self.assertIn(f"\n  {cmd} ", general.stdout, cmd)
            r = self.run_cli("help", cmd)
            self.assertEqual(r.returncode, 0, cmd)
            self.assertIn(needle, r.stdout, cmd)
            self.assertNotIn("Commands:", r.stdout, cmd)
            for other, n2 in self.COMMANDS.items():
                if other != cmd and n2 not in needle:
                    self.assertNotIn(n2, r.stdout, (cmd, other))
            # the same text as the command's own --help
            own = self.run_cli("--amqp", "127.0.0.1:1", cmd, "--help")
            self.assertEqual(own.returncode, 0, (cmd, own.stderr))
            self.assertEqual(own.stdout, r.stdout, cmd)
        r = self.run_cli("help", "nosuch")
        self.assertEqual(r.returncode, 2)
        self.assertIn('no help for "nosuch"', r.stderr)

    def test_events_keys_are_the_documented_events(self):
        with open(os.path.join(mpstack.SOURCE_DIR, "docs", "message-format.md")) as f:
            doc = f.read()
        table = doc[doc.index("| event | when |"):]
        table = table[:table.index("\n\n")]
        documented = set(re.findall(r"`([a-z_]+)`", "\n".join(
            ln.split("|")[1] for ln in table.splitlines()[2:])))
        self.assertEqual(documented, {"delivered", "deferred", "bounced", "suppressed", "dead",
                                      "appended", "append_failed"})
        text = self.run_cli("help", "events").stdout
        keys = text[text.index("  --key PATTERN "):text.index("  --count N")]
        offered = set(re.findall(r"[a-z_]{4,}", keys.split(":", 1)[1])) - {
            "name", "event", "all", "default"}
        self.assertEqual(offered, documented, keys)

    def test_version(self):
        d = self.run_cli("--version")
        self.assertEqual(d.returncode, 0)
        self.assertRegex(d.stdout, r"^mailpump \d+\.\d+\.\d+\n$")
        self.assertEqual(self.run_cli("version").stdout, d.stdout)
        self.assertEqual(self.run_cli("-V").stdout, d.stdout)
        daemon = subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpumpd"), "-V"],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(daemon.stdout.split()[1], d.stdout.split()[1])
        with open(os.path.join(mpstack.SOURCE_DIR, "CMakeLists.txt")) as f:
            m = re.search(r"project\(mailpump VERSION (\S+)", f.read())
        self.assertEqual(d.stdout, f"mailpump {m.group(1)}\n")

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

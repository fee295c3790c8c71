"""Integration test of the fault-injecting SMTP receiver tests/tools/smtpsink.

Each test starts its own smtpsink on a free loopback port (127.0.0.1, which
the stack's certificate covers), drives it with smtplib or a raw socket and
asserts the replies, the transcript (--log), the kept messages (--maildir)
and the counters (--stats-file). Fails loudly when the binary is missing.
"""
import base64
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

SINK = os.path.join(mpstack.BUILD_DIR, "tests", "smtpsink")
HOST = "127.0.0.1"


def stack_ca():
    """CA, certificate and key of the local stack (deploy/local/stack up)."""
    d = os.path.join(mpstack.STACK_DIR, "ca")
    files = {n: os.path.join(d, n) for n in ("ca.crt", "server.crt", "server.key")}
    for p in files.values():
        if not os.path.exists(p):
            raise RuntimeError(f"{p} is missing: the local stack is not up (deploy/local/stack up)")
    return files


class Sink:
    def __init__(self, *args, tls=True):
        self.dir = tempfile.mkdtemp(prefix="smtpsink-test.")
        self.port = mpstack.free_port()
        self.stats_path = os.path.join(self.dir, "stats.json")
        self.log_path = os.path.join(self.dir, "transcript.log")
        self.maildir = os.path.join(self.dir, "maildir")
        cmd = [SINK, "--listen", f"{HOST}:{self.port}", "--stats-file", self.stats_path,
               "--log", self.log_path, "--maildir", self.maildir, "--timeout", "20000"]
        if tls:
            ca = stack_ca()
            cmd += ["--cert", ca["server.crt"], "--key", ca["server.key"]]
        cmd += list(args)
        self.out_path = os.path.join(self.dir, "stdout")
        self.out = open(self.out_path, "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpsink exited with {self.proc.returncode}: {self.output()}")
            if "smtpsink: ready" in self.output():
                return
            time.sleep(0.02)
        raise RuntimeError("smtpsink not ready after 10 s: " + self.output())

    def output(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def smtp(self, **kw):
        return smtplib.SMTP(HOST, self.port, timeout=10, **kw)

    def raw(self):
        s = socket.create_connection((HOST, self.port), timeout=10)
        return s

    def stats(self):
        """Counters as of now: SIGUSR1 makes the sink rewrite the file."""
        os.unlink(self.stats_path)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                with open(self.stats_path) as f:
                    return json.load(f)
            except FileNotFoundError:
                time.sleep(0.02)
        raise AssertionError("stats file not rewritten after SIGUSR1")

    def settle(self, open_conns=0, timeout=5):
        """Wait until the sink has seen every connection close."""
        deadline = time.time() + timeout
        while True:
            st = self.stats()
            if st["connections_open"] == open_conns or time.time() > deadline:
                return st
            time.sleep(0.05)

    def transcript(self):
        with open(self.log_path) as f:
            return [line.rstrip("\n") for line in f]

    def messages(self):
        d = os.path.join(self.maildir, "new")
        out = []
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                out.append(f.read())
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.out.close()
        return self.proc.returncode

    def cleanup(self):
        """Stop; a non-zero exit (a sanitizer report, a crash) fails the test."""
        try:
            rc = self.stop()
            if rc != 0:
                raise AssertionError(f"smtpsink exited with {rc}: {self.output()[-3000:]}")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


_pending = {}


def read_replies(sock, count, timeout=10):
    """Read count complete SMTP replies from a raw socket; a multi-line
    reply comes back as its lines joined with "\n". Bytes read beyond the
    last reply are kept for the next call on the same socket."""
    sock.settimeout(timeout)
    data = _pending.pop(sock, b"")
    replies, cur = [], []
    while len(replies) < count:
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed after {replies!r}, pending {data!r}")
            data += chunk
        line, data = data.split(b"\r\n", 1)
        cur.append(line.decode())
        if len(line) < 4 or line[3:4] != b"-":
            replies.append("\n".join(cur))
            cur = []
    if data:
        _pending[sock] = data
    return replies


def tls_context():
    return ssl.create_default_context(cafile=stack_ca()["ca.crt"])


class SmtpSinkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.access(SINK, os.X_OK):
            raise RuntimeError(f"{SINK} is missing: build the smtpsink target "
                               f"(MAILPUMP_BUILD_DIR={mpstack.BUILD_DIR})")

    def sink(self, *args, **kw):
        s = Sink(*args, **kw)
        self.addCleanup(s.cleanup)
        return s

    # ---- basics ------------------------------------------------------------

    def test_help_and_usage_errors(self):
        r = subprocess.run([SINK, "--help"], capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 0)
        for word in ("--listen", "--rule", "rcpt:PATTERN", "drop:VERB", "delay:VERB",
                     "delay:VERB=MIN-MAX", "drip:VERB=MS", "CONNECT%2", "open_peak",
                     "multiline:VERB", "--stats-file", "--maildir", "--log", "--chunking",
                     "--reply-from", "X-Smtpsink-Peer", "PEER <ip>:<port>"):
            self.assertIn(word, r.stdout)
        r = subprocess.run([SINK, "--listen", "127.0.0.1:1", "--rule", "bogus"],
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 2)
        self.assertIn("rule", r.stderr)

    def test_starttls_with_stack_ca_and_keeping(self):
        sink = self.sink()
        with sink.smtp() as c:
            code, _ = c.ehlo("client.test")
            self.assertEqual(code, 250)
            for kw in ("pipelining", "starttls", "enhancedstatuscodes", "8bitmime"):
                self.assertTrue(c.has_extn(kw), kw)
            c.starttls(context=tls_context())
            c.ehlo("client.test")
            self.assertFalse(c.has_extn("starttls"))
            body = "Subject: hi\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n"
            refused = c.sendmail("alice@test.example", ["bob@test.example", "carol@test.example"], body)
            self.assertEqual(refused, {})
        st = sink.settle()
        self.assertEqual(st["connections"], 1)
        self.assertEqual(st["tls_handshakes"], 1)
        self.assertEqual(st["tls_full"], 1)
        self.assertEqual(st["tls_resumed"], 0)
        self.assertEqual(st["messages"], 1)
        self.assertEqual(st["recipients_accepted"], 2)
        self.assertEqual(st["recipients_rejected"], 0)
        self.assertEqual(st["bare_lf_lines"], 0)
        msgs = sink.messages()
        self.assertEqual(len(msgs), 1)
        m = msgs[0]
        self.assertTrue(m.startswith(b"X-Sink-Mail-From: <alice@test.example>\r\n"
                                     b"X-Sink-Rcpt-To: <bob@test.example>\r\n"
                                     b"X-Sink-Rcpt-To: <carol@test.example>\r\n"), m)
        # dot-unstuffed: exactly what the client meant
        self.assertIn(b"\r\nline one\r\n.leading dot\r\n..two dots\r\n", m)
        self.assertEqual(st["bytes"], len(body))
        t = sink.transcript()
        cmds = [line.split(" ", 1)[1] for line in t
                if not line.split(" ", 1)[1].startswith(("+", "PEER "))]
        self.assertEqual(cmds, ["ehlo client.test", "STARTTLS", "ehlo client.test",
                                "mail FROM:<alice@test.example>",
                                "rcpt TO:<bob@test.example>", "rcpt TO:<carol@test.example>",
                                "data", "QUIT"])
        self.assertTrue(any("+tls TLSv1.3" in line and "resumed=0" in line for line in t), t)
        self.assertTrue(all(line.startswith("1 ") for line in t), t)

    def test_tls_session_resumption_counted(self):
        sink = self.sink()
        ctx = tls_context()
        with sink.smtp() as c:
            c.starttls(context=ctx)
            c.ehlo("client.test")  # TLS 1.3 tickets arrive with the first reply
            c.noop()
            session = c.sock.session
            self.assertFalse(c.sock.session_reused)
        # a second connection offering the session: plain socket + STARTTLS by hand
        raw = sink.raw()
        self.assertTrue(read_replies(raw, 1)[0].startswith("220 "))
        raw.sendall(b"EHLO client.test\r\n")
        read_replies(raw, 1)
        raw.sendall(b"STARTTLS\r\n")
        self.assertTrue(read_replies(raw, 1)[0].startswith("220 2.0.0"))
        tls = ctx.wrap_socket(raw, server_hostname=HOST, session=session)
        self.assertTrue(tls.session_reused)
        tls.sendall(b"QUIT\r\n")
        self.assertTrue(read_replies(tls, 1)[0].startswith("221 "))
        tls.close()
        st = sink.settle()
        self.assertEqual(st["tls_handshakes"], 2)
        self.assertEqual(st["tls_resumed"], 1)
        self.assertEqual(st["tls_full"], 1)
        self.assertTrue(any("resumed=1" in line for line in sink.transcript()))

    def test_certificate_that_fails_verification(self):
        d = tempfile.mkdtemp(prefix="smtpsink-badcert.")
        self.addCleanup(shutil.rmtree, d, True)
        cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=wrong.example", "-addext", "subjectAltName=DNS:wrong.example",
                        "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
        sink = self.sink("--cert", cert, "--key", key, tls=False)
        with sink.smtp() as c:
            c.ehlo("client.test")
            with self.assertRaises(ssl.SSLCertVerificationError):
                c.starttls(context=tls_context())
        st = sink.settle()
        self.assertEqual(st["tls_handshakes"], 0)
        self.assertEqual(st["tls_failed"], 1)

    def test_pipelined_commands_answered_in_order(self):
        sink = self.sink("--rule", "rcpt:tempfail@x.example=450 4.2.0 try later",
                         "--rule", "rcpt:*@full.example=552 5.2.2 mailbox full", tls=False)
        s = sink.raw()
        self.assertTrue(read_replies(s, 1)[0].startswith("220 "))
        s.sendall(b"EHLO c\r\n")
        self.assertIn("PIPELINING", read_replies(s, 1)[0])
        # two transactions, every command in one write (content too: the
        # sink must cope with a client that runs ahead of the 354)
        s.sendall(b"MAIL FROM:<a@test.example>\r\nRCPT TO:<ok@test.example>\r\n"
                  b"RCPT TO:<tempfail@x.example>\r\nRCPT TO:<bob@full.example>\r\nDATA\r\n"
                  b"Subject: 1\r\n\r\nbody\r\n.\r\n"
                  b"MAIL FROM:<b@test.example>\r\nRCPT TO:<tempfail@x.example>\r\nDATA\r\n"
                  b"RSET\r\nNOOP\r\nQUIT\r\n")
        got = read_replies(s, 11)
        self.assertEqual([r[:3] for r in got],
                         ["250", "250", "450", "552", "354", "250", "250", "450", "554", "250", "250"])
        self.assertEqual(got[2], "450 4.2.0 try later")
        self.assertEqual(got[3], "552 5.2.2 mailbox full")
        self.assertEqual(got[8], "554 5.5.1 Error: no valid recipients")
        self.assertTrue(read_replies(s, 1)[0].startswith("221 "))
        s.close()
        st = sink.settle()
        self.assertEqual(st["messages"], 1)
        self.assertEqual(st["recipients_accepted"], 1)
        self.assertEqual(st["recipients_rejected"], 3)
        fired = {r["rule"]: r["fired"] for r in st["rules"]}
        self.assertEqual(fired, {"rcpt:tempfail@x.example=450 4.2.0 try later": 2,
                                 "rcpt:*@full.example=552 5.2.2 mailbox full": 1})

    def test_starttls_injection_discarded(self):
        sink = self.sink()
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\n")
        read_replies(s, 1)
        s.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
        self.assertTrue(read_replies(s, 1)[0].startswith("220 "))
        tls = tls_context().wrap_socket(s, server_hostname=HOST)
        tls.sendall(b"MAIL FROM:<a@b>\r\n")
        # no EHLO inside TLS yet and the injected MAIL was dropped
        self.assertEqual(read_replies(tls, 1)[0], "503 5.5.1 Error: send HELO/EHLO first")
        tls.close()
        st = sink.settle()
        self.assertEqual(st["starttls_injection"], 1)

    # ---- fault rules --------------------------------------------------------

    def test_cmd_mail_421_hangs_up(self):
        sink = self.sink("--rule", "cmd:MAIL=421 4.3.2 shutting down", tls=False)
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
        got = read_replies(s, 2)
        self.assertEqual(got[1], "421 4.3.2 shutting down")
        s.settimeout(5)
        self.assertEqual(s.recv(100), b"")  # closed, RCPT never answered
        s.close()
        st = sink.settle()
        self.assertEqual(st["rules"][0]["fired"], 1)
        self.assertEqual(st["recipients_accepted"] + st["recipients_rejected"], 0)

    def test_cmd_data_and_dot_rules(self):
        sink = self.sink("--rule", "cmd:DATA#1=554 5.7.1 spam", "--rule", "cmd:dot=451 4.3.0 try again",
                         tls=False)
        with sink.smtp() as c:
            with self.assertRaises(smtplib.SMTPDataError) as e:
                c.sendmail("a@test.example", ["b@test.example"], "Subject: x\r\n\r\nx\r\n")
            self.assertEqual(e.exception.smtp_code, 554)
            self.assertEqual(e.exception.smtp_error, b"5.7.1 spam")
            c.rset()
            # #1: DATA is accepted the second time; the dot rule answers 451
            with self.assertRaises(smtplib.SMTPDataError) as e:
                c.sendmail("a@test.example", ["b@test.example"], "Subject: x\r\n\r\nx\r\n")
            self.assertEqual(e.exception.smtp_code, 451)
            self.assertEqual(e.exception.smtp_error, b"4.3.0 try again")
        st = sink.settle()
        self.assertEqual(st["messages"], 0)
        self.assertEqual({r["rule"]: r["fired"] for r in st["rules"]},
                         {"cmd:DATA#1=554 5.7.1 spam": 1, "cmd:dot=451 4.3.0 try again": 1})
        self.assertEqual(sink.messages(), [])

    def test_cmd_ehlo_502_helo_fallback(self):
        sink = self.sink("--rule", "cmd:EHLO=502", tls=False)
        with sink.smtp() as c:
            code, msg = c.ehlo("client.test")
            self.assertEqual(code, 502)
            code, msg = c.helo("client.test")
            self.assertEqual(code, 250)
            self.assertEqual(c.sendmail("a@test.example", ["b@test.example"], "x\r\n"), {})
        self.assertEqual(sink.settle()["messages"], 1)
        cmds = [line.split(" ", 1)[1] for line in sink.transcript()]
        self.assertIn("ehlo client.test", cmds)
        self.assertIn("helo client.test", cmds)

    def test_reply_from_one_peer_and_peer_recorded(self):
        deferred = "421 4.7.0 [TS01] Messages from 127.0.0.2 temporarily deferred"
        sink = self.sink("--reply-from", "127.0.0.2:mail:" + deferred,
                         "--reply-from", "127.0.0.3:greeting:554 5.7.1 not from you", tls=False)
        # 127.0.0.2: 421 to MAIL, then the connection is closed
        c = smtplib.SMTP(HOST, sink.port, timeout=10, source_address=("127.0.0.2", 0))
        c.ehlo("client.test")
        code, msg = c.docmd("MAIL FROM:<a@test.example>")
        self.assertEqual((code, msg.decode()), (421, deferred[4:]))
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            c.docmd("NOOP")
        c.close()
        # 127.0.0.3: refused at the greeting
        with self.assertRaises(smtplib.SMTPConnectError) as cm:
            smtplib.SMTP(HOST, sink.port, timeout=10, source_address=("127.0.0.3", 0))
        self.assertEqual(cm.exception.smtp_code, 554)
        # any other address: served as usual, its address kept
        with smtplib.SMTP(HOST, sink.port, timeout=10, source_address=("127.0.0.4", 0)) as c:
            self.assertEqual(c.sendmail("a@test.example", ["b@test.example"], "x\r\n"), {})
        st = sink.settle()
        self.assertEqual(st["messages"], 1)
        self.assertEqual([r["fired"] for r in st["rules"]], [1, 1])
        msgs = sink.messages()
        self.assertEqual(len(msgs), 1)
        self.assertTrue(msgs[0].startswith(b"X-Sink-Mail-From: <a@test.example>\r\n"
                                           b"X-Sink-Rcpt-To: <b@test.example>\r\n"
                                           b"X-Sink-Connection: 3\r\n"
                                           b"X-Smtpsink-Peer: 127.0.0.4\r\n"), msgs[0])
        t = sink.transcript()
        peers = [line.split(" ") for line in t if line.split(" ", 1)[1].startswith("PEER ")]
        self.assertEqual([(p[0], p[2].rsplit(":", 1)[0]) for p in peers],
                         [("1", "127.0.0.2"), ("2", "127.0.0.3"), ("3", "127.0.0.4")])
        # right after the +connect line of its connection, with the same port
        for i, line in enumerate(t):
            if " PEER " in line:
                self.assertEqual(t[i - 1].split(" ")[1:3], ["+connect", line.split(" ")[2]])
        r = subprocess.run([SINK, "--listen", "127.0.0.1:1", "--reply-from", "127.0.0.2:helo:421 x"],
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 2)
        self.assertIn("STAGE", r.stderr)

    def test_drop_rcpt_closes_without_reply(self):
        sink = self.sink("--rule", "drop:RCPT", tls=False)
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        got = read_replies(s, 2)
        self.assertEqual(got[1], "250 2.1.0 Ok")
        s.settimeout(5)
        self.assertEqual(s.recv(100), b"")
        s.close()
        st = sink.settle()
        self.assertEqual(st["rules"][0]["fired"], 1)
        self.assertIn("1 +drop RCPT", sink.transcript())

    def test_delay_data_keeps_order(self):
        sink = self.sink("--rule", "delay:DATA=600", tls=False)
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
        read_replies(s, 3)
        t0 = time.monotonic()
        s.sendall(b"DATA\r\nx\r\n.\r\nNOOP\r\n")
        got = read_replies(s, 3)
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 0.55)
        self.assertLess(elapsed, 5)
        self.assertEqual([r[:3] for r in got], ["354", "250", "250"])
        s.close()

    def test_delay_range_drawn_per_reply(self):
        sink = self.sink("--rule", "delay:NOOP=100-300", tls=False)
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\n")
        read_replies(s, 1)
        took = []
        for _ in range(20):
            t0 = time.monotonic()
            s.sendall(b"NOOP\r\n")
            self.assertEqual(read_replies(s, 1), ["250 2.0.0 Ok"])
            took.append(time.monotonic() - t0)
        s.close()
        # every reply held within [100, 300] ms (+ scheduling slack) ...
        self.assertGreaterEqual(min(took), 0.095, took)
        self.assertLess(max(took), 0.3 + 0.25, took)
        # ... and drawn anew each time: 20 uniform draws over 200 ms do not
        # all fall within 60 ms of each other (chance below 1e-9)
        self.assertGreater(max(took) - min(took), 0.06, took)
        st = sink.settle()
        self.assertEqual(st["rules"], [{"rule": "delay:NOOP=100-300", "fired": 20}])

    def test_delay_fixed_and_range_syntax_errors(self):
        for bad in ("delay:EHLO=300-100", "delay:EHLO=100-", "delay:EHLO=-5", "delay:EHLO=1-2-3",
                    "drip:CONNECT=0", "drip:CONNECT", "drip:CONNECT=x", "cmd:CONNECT%0=421",
                    "cmd:CONNECT%=421", "cmd:CONNECT%2%3=421", "cmd:CONNECT%x=421", "drop:MAIL#2#3"):
            r = subprocess.run([SINK, "--listen", "127.0.0.1:1", "--rule", bad],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 2, bad)
            self.assertIn("rule", r.stderr, bad)

    def test_drip_greeting_one_byte_at_a_time(self):
        sink = self.sink("--rule", "drip:CONNECT=60", "--hostname", "tarpit.test", tls=False)
        greeting = b"220 tarpit.test ESMTP smtpsink\r\n"
        t0 = time.monotonic()
        s = sink.raw()
        got, arrivals = b"", []
        while not got.endswith(b"\r\n"):
            chunk = s.recv(100)
            self.assertTrue(chunk, got)
            got += chunk
            arrivals.append((time.monotonic() - t0, len(chunk)))
        self.assertEqual(got, greeting)
        n = len(greeting)
        # the first byte at once, then one every 60 ms: n - 1 gaps
        self.assertLess(arrivals[0][0], 0.5, arrivals[:3])
        span = arrivals[-1][0] - arrivals[0][0]
        self.assertGreaterEqual(span, (n - 1) * 0.060 * 0.95, arrivals)
        self.assertLess(span, (n - 1) * 0.060 + 1.5, arrivals)
        # one byte per segment (TCP_NODELAY): a reader this fast sees most of them apart
        self.assertGreaterEqual(len(arrivals), n * 3 // 4, arrivals)
        # only the greeting drips: EHLO is answered at once
        t1 = time.monotonic()
        s.sendall(b"EHLO c\r\n")
        self.assertTrue(read_replies(s, 1)[0].startswith("250-tarpit.test"))
        self.assertLess(time.monotonic() - t1, 0.5)
        s.close()
        st = sink.settle()
        self.assertEqual(st["rules"], [{"rule": "drip:CONNECT=60", "fired": 1}])

    def test_drip_after_delay_and_multiline(self):
        sink = self.sink("--rule", "delay:DOT=400", "--rule", "drip:DOT=20", "--rule", "multiline:DOT",
                         tls=False)
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        read_replies(s, 4)
        t0 = time.monotonic()
        s.sendall(b"x\r\n.\r\nNOOP\r\n")
        s.settimeout(10)
        first = s.recv(100)
        t_first = time.monotonic() - t0
        self.assertEqual(len(first), 1)
        self.assertGreaterEqual(t_first, 0.38)
        self.assertLess(t_first, 1.5)
        _pending[s] = first
        got = read_replies(s, 2)
        elapsed = time.monotonic() - t0
        dot = got[0].split("\n")
        self.assertEqual(len(dot), 3, got)  # the long multi-line reply was dripped
        n = len(got[0]) + 2 * len(dot)      # its octets with the CRLFs
        self.assertGreaterEqual(elapsed, 0.4 + (n - 1) * 0.020 * 0.95)
        self.assertLess(elapsed, 0.4 + (n - 1) * 0.020 + 2.0)
        self.assertEqual(got[1], "250 2.0.0 Ok")  # NOOP waited for the dripped reply
        s.close()

    def test_every_second_connection_refused(self):
        sink = self.sink("--rule", "cmd:CONNECT%2=421 4.7.0 try later", tls=False)
        greetings = []
        for _ in range(10):
            s = sink.raw()
            greetings.append(read_replies(s, 1)[0])
            if greetings[-1].startswith("421"):
                s.settimeout(5)
                self.assertEqual(s.recv(100), b"")  # hung up after the 421
            else:
                s.sendall(b"QUIT\r\n")
                self.assertTrue(read_replies(s, 1)[0].startswith("221 "))
            s.close()
            sink.settle()  # strictly one after the other: accept order = loop order
        want = ["220 smtpsink.test ESMTP smtpsink", "421 4.7.0 try later"] * 5
        self.assertEqual(greetings, want)
        st = sink.settle()
        self.assertEqual(st["connections"], 10)
        self.assertEqual(st["rules"], [{"rule": "cmd:CONNECT%2=421 4.7.0 try later", "fired": 5}])

    def test_every_nth_connection_with_limit_and_other_verbs(self):
        # %3 on MAIL: every MAIL of connections 3, 6, ...; #2 stops it after two firings
        sink = self.sink("--rule", "cmd:MAIL%3#2=451 4.3.0 not now", tls=False)
        codes = []
        for _ in range(9):
            s = sink.raw()
            read_replies(s, 1)
            s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRSET\r\nMAIL FROM:<a@b>\r\nQUIT\r\n")
            got = read_replies(s, 5)
            codes.append((got[1][:3], got[3][:3]))
            s.close()
            sink.settle()
        self.assertEqual(codes, [("250", "250"), ("250", "250"), ("451", "451"),
                                 ("250", "250"), ("250", "250"), ("250", "250"),
                                 ("250", "250"), ("250", "250"), ("250", "250")])
        self.assertEqual(sink.settle()["rules"][0]["fired"], 2)

    def test_open_and_open_peak(self):
        sink = self.sink(tls=False)
        socks = []
        for _ in range(3):
            s = sink.raw()
            read_replies(s, 1)
            socks.append(s)
        st = sink.stats()
        self.assertEqual((st["open"], st["open_peak"], st["connections_open"]), (3, 3, 3))
        socks.pop().close()
        st = sink.settle(open_conns=2)
        self.assertEqual((st["open"], st["open_peak"]), (2, 3))
        s = sink.raw()
        read_replies(s, 1)
        socks.append(s)
        st = sink.stats()
        self.assertEqual((st["open"], st["open_peak"]), (3, 3))
        for s in socks:
            s.close()
        st = sink.settle()
        self.assertEqual((st["open"], st["open_peak"], st["connections"]), (0, 3, 4))

    def test_multiline_replies(self):
        sink = self.sink("--rule", "multiline:dot", "--rule", "multiline:EHLO", "--no-enhanced",
                         tls=False)
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n")
        got = read_replies(s, 5)
        ehlo = got[0].split("\n")
        self.assertEqual(ehlo[1], "250-(smtpsink multi-line reply)")
        self.assertNotIn("ENHANCEDSTATUSCODES", got[0])
        self.assertEqual(got[2], "250 Ok")  # no enhanced code with --no-enhanced
        dot = got[4].split("\n")
        self.assertEqual(len(dot), 3)
        self.assertTrue(dot[0].startswith("250-Ok: queued as "), dot)
        self.assertTrue(dot[1].startswith("250-") and dot[2].startswith("250 "), dot)
        s.close()

    def test_greeting_delay_and_banner(self):
        sink = self.sink("--greeting-delay", "500", tls=False)
        t0 = time.monotonic()
        s = sink.raw()
        self.assertTrue(read_replies(s, 1)[0].startswith("220 "))
        self.assertGreaterEqual(time.monotonic() - t0, 0.45)
        s.close()
        sink2 = self.sink("--banner", "554 5.3.2 go away", tls=False)
        s = sink2.raw()
        self.assertEqual(read_replies(s, 1)[0], "554 5.3.2 go away")
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nQUIT\r\n")
        self.assertEqual([r[:3] for r in read_replies(s, 3)], ["503", "503", "221"])
        s.close()
        sink3 = self.sink("--rule", "drop:CONNECT", tls=False)
        s = sink3.raw()
        s.settimeout(5)
        self.assertEqual(s.recv(100), b"")
        s.close()

    def test_rule_file(self):
        sink_dir = tempfile.mkdtemp(prefix="smtpsink-rules.")
        self.addCleanup(shutil.rmtree, sink_dir, True)
        path = os.path.join(sink_dir, "rules")
        with open(path, "w") as f:
            f.write("# greylist the first attempt, then accept\n"
                    "rcpt:grey@test.example#1=450 4.7.1 greylisted, try again\n"
                    "\n"
                    "rcpt:GONE@*=550 5.1.1 no such user\n")
        sink = self.sink("--rules", path, tls=False)
        with sink.smtp() as c:
            refused = c.sendmail("a@test.example", ["grey@test.example", "gone@test.example",
                                                    "ok@test.example"], "x\r\n")
            self.assertEqual(refused, {"grey@test.example": (450, b"4.7.1 greylisted, try again"),
                                       "gone@test.example": (550, b"5.1.1 no such user")})
            refused = c.sendmail("a@test.example", ["grey@test.example"], "x\r\n")
            self.assertEqual(refused, {})
        st = sink.settle()
        self.assertEqual(st["messages"], 2)
        self.assertEqual(st["recipients_accepted"], 2)
        self.assertEqual(st["recipients_rejected"], 2)

    # ---- capabilities -------------------------------------------------------

    def test_capability_switches(self):
        sink = self.sink("--no-pipelining", "--no-starttls", "--no-enhanced", "--no-8bitmime",
                         "--size", "1000", "--smtputf8", "--chunking")
        with sink.smtp() as c:
            c.ehlo("client.test")
            for kw in ("pipelining", "starttls", "enhancedstatuscodes", "8bitmime"):
                self.assertFalse(c.has_extn(kw), kw)
            for kw in ("smtputf8", "chunking"):
                self.assertTrue(c.has_extn(kw), kw)
            self.assertEqual(c.esmtp_features["size"], "1000")
            code, msg = c.mail("a@test.example", ["SIZE=5000"])
            self.assertEqual((code, msg), (552, b"Message size exceeds fixed limit"))
            code, _ = c.mail("a@test.example", ["SMTPUTF8"])
            self.assertEqual(code, 250)
            c.rcpt("b@test.example")
            code, msg = c.data("x" * 2000 + "\r\n")
            self.assertEqual(code, 552)
        self.assertEqual(sink.settle()["messages"], 0)

    def test_bdat(self):
        sink = self.sink("--chunking", tls=False)
        s = sink.raw()
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
                  b"BDAT 7\r\nline 1\nBDAT 9 LAST\r\n.line 2\r\nQUIT\r\n")
        got = read_replies(s, 6)
        self.assertEqual([r[:3] for r in got], ["250", "250", "250", "250", "250", "221"])
        self.assertIn("queued as", got[4])
        s.close()
        st = sink.settle()
        self.assertEqual(st["messages"], 1)
        self.assertEqual(st["bytes"], 16)
        self.assertTrue(sink.messages()[0].endswith(b"\r\nline 1\n.line 2\r\n"))

    def test_auth_plain_and_login(self):
        sink = self.sink("--auth-user", "user@test.example:s3cret")
        with sink.smtp() as c:
            c.starttls(context=tls_context())
            c.ehlo("client.test")
            self.assertIn("PLAIN", c.esmtp_features["auth"])
            c.user, c.password = "user@test.example", "wrong"
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                c.auth("PLAIN", c.auth_plain)
            c.user, c.password = "user@test.example", "s3cret"
            code, _ = c.auth("PLAIN", c.auth_plain)
            self.assertEqual(code, 235)
        with sink.smtp() as c:
            c.ehlo("client.test")
            c.user, c.password = "user@test.example", "s3cret"
            code, _ = c.auth("LOGIN", c.auth_login, initial_response_ok=False)
            self.assertEqual(code, 235)
        sink.settle()
        t = "\n".join(sink.transcript())
        self.assertNotIn("s3cret", t)
        self.assertNotIn(base64.b64encode(b"\0user@test.example\0s3cret").decode(), t)
        self.assertIn("+auth failed user=user@test.example", t)
        self.assertEqual(t.count("+auth ok user=user@test.example"), 2)

    def test_sigterm_closes_connections_and_prints_counters(self):
        sink = self.sink(tls=False)
        s = sink.raw()
        read_replies(s, 1)
        self.assertEqual(sink.stop(), 0)
        s.settimeout(5)
        self.assertEqual(s.recv(100), b"")
        s.close()
        out = sink.output()
        self.assertIn("smtpsink: exit {", out)
        final = json.loads(out.split("smtpsink: exit ", 1)[1])
        self.assertEqual(final["connections"], 1)
        self.assertEqual(final["connections_open"], 0)

    def test_threads_share_the_port(self):
        sink = self.sink("--threads", "2", tls=False)
        for _ in range(6):
            with sink.smtp() as c:
                self.assertEqual(c.sendmail("a@test.example", ["b@test.example"], "x\r\n"), {})
        st = sink.settle()
        self.assertEqual((st["connections"], st["messages"]), (6, 6))


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""/metrics of a mailpumpd on the real local stack against
docs/operations.md ("Metrics"): every family served is in the table with
its type, every one in the table is served. One message (a delivered and
a bounced recipient) then shows in the operator metrics: recipients by
outcome and reason, delivery latency, age at delivery, SMTP time per
command, build_info and the process figures.
"""
import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

SOURCE_DIR = os.environ.get("MAILPUMP_SOURCE_DIR",
                            os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def documented():
    """{name: type} of the table in docs/operations.md."""
    out, in_table = {}, False
    with open(os.path.join(SOURCE_DIR, "docs", "operations.md")) as f:
        for line in f:
            if line.startswith("| metric | type |"):
                in_table = True
                continue
            if not in_table or line.startswith("|---"):
                continue
            m = re.match(r"\| `([a-z0-9_]+)(?:\{[a-z0-9_,]*\})?` \| (counter|gauge|histogram) \|", line)
            if not m:
                in_table = False
                continue
            out[m.group(1)] = m.group(2)
    return out


def served(body):
    return {m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", body, re.M)}


def value(body, series):
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    raise KeyError(series)


def project_version():
    with open(os.path.join(SOURCE_DIR, "CMakeLists.txt")) as f:
        return re.search(r"project\(mailpump VERSION ([0-9.]+)", f.read()).group(1)


class MetricsDoc(unittest.TestCase):
    def test_docs_match_and_a_delivery_shows(self):
        env = mpstack.stack_env()
        d, tap = mpstack.started_daemon(self, env, workers=1,
                                        extra_env={"MAILPUMP_METRICS_SITES": "test.example google.com"})
        started = time.time()
        _, before = d.http("/metrics")
        docs = documented()
        self.assertGreater(len(docs), 80)
        self.assertEqual(served(before), docs)  # names and types, both ways

        r = d.cli("enqueue", "--from", "bob@test.example", "--to", "reject@test.example",
                  "--to", "carol@test.example", "--subject", "metrics", "--text", "hi")
        self.assertEqual(r.returncode, 0, r.stderr)
        msg_id = r.stdout.strip()
        evs = tap.wait(lambda e: e.get("message_id") == msg_id and e["event"] in ("delivered", "bounced"), 2)
        self.assertEqual(sorted(e["event"] for e in evs), ["bounced", "delivered"])
        # the session's QUIT and the ack come after the events: let them
        deadline = time.time() + 10
        while time.time() < deadline and d.metric("mailpump_messages_done_total") < 1:
            time.sleep(0.1)
        _, after = d.http("/metrics")
        self.assertEqual(served(after), docs)

        self.assertEqual(value(after, 'mailpump_recipients_total{outcome="delivered",reason="delivered"}'), 1)
        self.assertEqual(value(after, 'mailpump_recipients_total{outcome="bounced",reason="no_such_user"}'), 1)
        # by destination site: the configured one by name (both recipients' MX is mx1.test.example)
        self.assertEqual(value(after, 'mailpump_recipients_by_site_total{site="test.example",outcome="delivered"}'), 1)
        self.assertEqual(value(after, 'mailpump_recipients_by_site_total{site="test.example",outcome="bounced"}'), 1)
        self.assertEqual(value(after, 'mailpump_recipients_by_site_total{site="google.com",outcome="delivered"}'), 0)
        self.assertEqual(value(after, 'mailpump_recipients_by_site_total{site="other",outcome="delivered"}'), 0)
        rcpt_series = re.findall(r'^mailpump_recipients_total\{.*\} (\S+)$', after, re.M)
        self.assertEqual(sum(float(v) for v in rcpt_series), 2)
        # the old counters still count, bounced as failed
        self.assertEqual(d.metric("mailpump_recipients_delivered_total"), 1)
        self.assertEqual(d.metric("mailpump_recipients_failed_total"), 1)

        for outcome in ("delivered", "bounced"):
            self.assertEqual(value(after, f'mailpump_delivery_latency_seconds_count{{outcome="{outcome}"}}'), 1)
            s = value(after, f'mailpump_delivery_latency_seconds_sum{{outcome="{outcome}"}}')
            self.assertGreater(s, 0)
            self.assertLess(s, 30)
            self.assertEqual(value(after, f'mailpump_delivery_latency_seconds_bucket{{outcome="{outcome}",le="30"}}'), 1)
        self.assertEqual(value(after, 'mailpump_delivery_latency_seconds_count{outcome="other"}'), 0)
        self.assertEqual(value(after, "mailpump_message_age_seconds_count"), 1)
        self.assertLess(value(after, "mailpump_message_age_seconds_sum"), 30)

        def cmd(c):
            return value(after, f'mailpump_smtp_command_seconds_count{{command="{c}"}}')
        for c in ("connect", "greeting", "mail", "data", "dot"):
            self.assertEqual(cmd(c), 1, c)
        self.assertEqual(cmd("rcpt"), 2)
        self.assertEqual(cmd("starttls"), 1)  # the stack's MX offers STARTTLS
        self.assertEqual(cmd("tls"), 1)
        self.assertEqual(cmd("ehlo"), 2)      # before and after STARTTLS
        for c in ("connect", "greeting", "ehlo", "rcpt", "dot"):
            self.assertLess(value(after, f'mailpump_smtp_command_seconds_sum{{command="{c}"}}'), 10, c)

        m = re.search(r'^mailpump_build_info\{version="([^"]*)"(?:,commit="([0-9a-f]+)")?\} 1$', after, re.M)
        self.assertIsNotNone(m, after[:2000])
        self.assertEqual(m.group(1), project_version())

        pid = d.proc.pid
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        self.assertLess(abs(value(after, "process_open_fds") - fds), 8)  # a scrape's own socket may come and go
        with open(f"/proc/{pid}/limits") as f:
            soft = re.search(r"^Max open files\s+(\d+)", f.read(), re.M).group(1)
        self.assertEqual(value(after, "process_max_fds"), float(soft))
        self.assertLessEqual(value(after, "process_start_time_seconds"), started + 1)
        self.assertGreater(value(after, "process_start_time_seconds"), started - 60)
        self.assertGreater(value(after, "process_resident_memory_bytes"), 1 << 20)
        self.assertGreater(value(after, "process_virtual_memory_bytes"),
                           value(after, "process_resident_memory_bytes"))
        self.assertGreaterEqual(value(after, "process_cpu_seconds_total"), 0)


if __name__ == "__main__":
    unittest.main()

"""Suppression lists on the real local stack (docs/operations.md#suppression-lists):
a recipient on its tenant's list or on the global one gets a `suppressed`
event and never reaches the sink while the message's other recipients are
delivered; a 550 5.1.1 (no_such_user) bounce adds its recipient to the
tenant's list with the reply, and the next message to it is suppressed;
`mailpump suppress remove` makes it deliverable again; import and export
round-trip 10,000 entries; with Redis unreachable the message is sent
(fail open, counted), or deferred with when_unavailable = defer.

Every test works on lists of its own: a tenant named after a fresh uuid,
or addresses made unique on the global list (removed afterwards), so the
stack's other users never see these entries.
"""
import csv
import io
import json
import os
import subprocess
import sys
import time
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402


# mpstack's daemons run without suppression (the lists are in the shared
# Redis); these run with it, at its defaults
SUPPRESSION_ON = {"MAILPUMP_SUPPRESSION_ENABLED": "1", "MAILPUMP_SUPPRESSION_AUTO_REASONS": "no_such_user"}


def redis_cli(env, *args):
    r = subprocess.run(["redis-cli", "-h", env["MP_REDIS_HOST"], "-p", str(env["MP_REDIS_PORT"]), *args],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(r.stderr)
    return r.stdout.strip()


def maildirs(env):
    return [env["MP_MX1_MAILDIR"], env["MP_MX2_MAILDIR"]]


def delivered_to(env, subject):
    """Delivered-To addresses of the sinks' stored copies with this subject."""
    out = []
    for md in maildirs(env):
        for sub in ("new", "cur"):
            d = os.path.join(md, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                if subject.encode() not in data:
                    continue
                for line in data.decode(errors="replace").splitlines():
                    if line.lower().startswith("delivered-to:"):
                        out.append(line.split(":", 1)[1].strip().lower())
                    if line == "":
                        break
    return out


def wait_delivered_to(env, subject, addr, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = delivered_to(env, subject)
        if addr in got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{addr} never received {subject!r}: {delivered_to(env, subject)}")


class Suppress(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()

    def setUp(self):
        self.daemon, self.tap = mpstack.started_daemon(self, self.env, workers=1, extra_env=SUPPRESSION_ON)
        self.tenant = "sup-" + uuid.uuid4().hex[:12]
        self.other = "sup-" + uuid.uuid4().hex[:12]
        self.tag = uuid.uuid4().hex[:10]
        self.global_fields = []
        self.addCleanup(self.cleanup_redis)

    def cleanup_redis(self):
        redis_cli(self.env, "DEL", f"mp:sup:t:{self.tenant}", f"mp:sup:t:{self.other}")
        for f in self.global_fields:
            redis_cli(self.env, "HDEL", "mp:sup:g", f)

    def sup(self, *args, stdin=None):
        return self.daemon.cli("--config", self.env["MP_MAILPUMPD_CONFIG"], "suppress", *args, stdin=stdin)

    def enqueue(self, *args):
        r = self.daemon.cli("enqueue", *args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def final_events(self, msg_id, count):
        evs = self.tap.wait(lambda e: e.get("message_id") == msg_id and
                            e["event"] in ("delivered", "bounced", "suppressed", "deferred"), count)
        return {e["recipient"]: e for e in evs}

    def test_tenant_and_global_lists(self):
        s_addr = f"s-{self.tag}@test.example"
        g_addr = f"g-{self.tag}@test.example"
        ok_addr = f"ok-{self.tag}@test.example"
        # added in another case than it is sent with: compared case-insensitively
        r = self.sup("add", "--tenant", self.tenant, "--reason", "complaint", s_addr.upper().replace("TEST.EXAMPLE", "Test.Example"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 added", r.stdout)
        self.global_fields.append(g_addr)
        r = self.sup("add", "--global", g_addr)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.sup("get", "--tenant", self.tenant, "--json", s_addr)
        self.assertEqual(r.returncode, 0, r.stderr)
        entry = json.loads(r.stdout)
        self.assertEqual(entry["address"], s_addr)
        self.assertEqual(entry["reason"], "complaint")
        self.assertEqual(entry["origin"], "manual")
        self.assertEqual(entry["list"], self.tenant)
        self.assertIsNone(entry["reply"])

        before = self.daemon.metric("mailpump_recipients_suppressed_total")
        subj = f"sup tenant {self.tag}"
        msg_id = self.enqueue("--from", "bob@test.example", "--to", s_addr, "--to", g_addr, "--to", ok_addr,
                              "--tenant", self.tenant, "--subject", subj, "--text", "hi")
        by = self.final_events(msg_id, 3)
        self.assertEqual(by[ok_addr]["event"], "delivered")
        s = by[s_addr]
        self.assertEqual(s["event"], "suppressed")
        self.assertEqual(s["_routing_key"], "suppressed")
        self.assertEqual(s["reason"], "suppressed")
        self.assertEqual(s["tenant"], self.tenant)
        self.assertEqual(s["suppression"]["list"], self.tenant)
        self.assertEqual(s["suppression"]["reason"], "complaint")
        self.assertEqual(s["suppression"]["added"], entry["added"])
        self.assertNotIn("already_delivered", s)
        self.assertNotIn("smtp", s)
        g = by[g_addr]
        self.assertEqual(g["event"], "suppressed")
        self.assertEqual(g["suppression"]["list"], "global")
        self.assertEqual(g["suppression"]["reason"], "manual")
        got = wait_delivered_to(self.env, subj, ok_addr)
        time.sleep(0.5)
        got = delivered_to(self.env, subj)
        self.assertEqual(got, [ok_addr])  # the suppressed ones never reached the sink
        self.assertEqual(self.daemon.metric("mailpump_recipients_suppressed_total") - before, 2)
        _, body = self.daemon.http("/metrics")
        self.assertIn('outcome="suppressed"', body)

        # the tenant list is the tenant's: for another tenant only the global list counts
        subj2 = f"sup other {self.tag}"
        msg2 = self.enqueue("--from", "bob@test.example", "--to", s_addr, "--to", g_addr,
                            "--tenant", self.other, "--subject", subj2, "--text", "hi")
        by = self.final_events(msg2, 2)
        self.assertEqual(by[s_addr]["event"], "delivered")
        self.assertEqual(by[g_addr]["event"], "suppressed")
        wait_delivered_to(self.env, subj2, s_addr)

        # no tenant: the global list only
        msg3 = self.enqueue("--from", "bob@test.example", "--to", s_addr, "--to", g_addr,
                            "--subject", f"sup none {self.tag}", "--text", "hi")
        by = self.final_events(msg3, 2)
        self.assertEqual(by[s_addr]["event"], "delivered")
        self.assertEqual(by[g_addr]["event"], "suppressed")

        # removed: delivered again
        r = self.sup("remove", "--tenant", self.tenant, s_addr)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 removed", r.stdout)
        r = self.sup("get", "--tenant", self.tenant, s_addr)
        self.assertEqual(r.returncode, 1)
        self.assertIn("not on the", r.stderr)
        subj4 = f"sup removed {self.tag}"
        msg4 = self.enqueue("--from", "bob@test.example", "--to", s_addr, "--tenant", self.tenant,
                            "--subject", subj4, "--text", "hi")
        self.assertEqual(self.final_events(msg4, 1)[s_addr]["event"], "delivered")
        wait_delivered_to(self.env, subj4, s_addr)

    def test_permanent_bounce_adds_to_the_tenants_list(self):
        addr = "reject@test.example"  # the sinks answer 550 5.1.1 no such user
        msg_id = self.enqueue("--from", "bob@test.example", "--to", addr, "--tenant", self.tenant,
                              "--subject", f"sup bounce {self.tag}", "--text", "hi")
        ev = self.final_events(msg_id, 1)[addr]
        self.assertEqual(ev["event"], "bounced")
        self.assertEqual(ev["reason"], "no_such_user")
        deadline = time.time() + 10
        while time.time() < deadline:
            r = self.sup("get", "--tenant", self.tenant, "--json", addr)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        self.assertEqual(r.returncode, 0, r.stderr)
        entry = json.loads(r.stdout)
        self.assertEqual(entry["origin"], "auto")
        self.assertEqual(entry["reason"], "no_such_user")
        self.assertEqual(entry["reply"]["code"], 550)
        self.assertEqual(entry["reply"]["enhanced"], "5.1.1")
        self.assertIn("no such user", entry["reply"]["text"])
        self.assertEqual(entry["message_id"], msg_id)
        self.assertIsNone(entry["expires"])
        self.assertEqual(self.daemon.metric("mailpump_suppression_auto_added_total"), 1)
        # the global list was not touched
        self.assertEqual(redis_cli(self.env, "HEXISTS", "mp:sup:g", addr), "0")

        msg2 = self.enqueue("--from", "bob@test.example", "--to", addr, "--to", f"ok-{self.tag}@test.example",
                            "--tenant", self.tenant, "--subject", f"sup bounce 2 {self.tag}", "--text", "hi")
        by = self.final_events(msg2, 2)
        self.assertEqual(by[addr]["event"], "suppressed")
        self.assertEqual(by[addr]["suppression"]["reason"], "no_such_user")
        self.assertEqual(by[f"ok-{self.tag}@test.example"]["event"], "delivered")
        # not sent: the sink saw one RCPT for it (the first message), not two
        self.assertEqual(self.daemon.metric("mailpump_suppression_auto_added_total"), 1)

        r = self.sup("list", "--tenant", self.tenant, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        page = json.loads(r.stdout)
        self.assertEqual(page["total"], 1)
        self.assertIsNone(page["next_cursor"])
        self.assertEqual([e["address"] for e in page["entries"]], [addr])

    def test_import_export_round_trip(self):
        lines = [f"user{i}-{self.tag}@Imp.Example,reason{i % 7}" for i in range(10000)]
        lines[5:5] = ["# a comment", "", "not-an-address", "x@bad_domain.example"]
        r = self.sup("import", "--tenant", self.tenant, "-", stdin="\n".join(lines) + "\n")
        self.assertEqual(r.returncode, 2, r.stderr)  # invalid lines reported
        self.assertIn("10002 lines, 10000 added, 2 invalid skipped", r.stdout)
        self.assertIn("line 8: invalid address \"not-an-address\"", r.stderr)
        self.assertEqual(redis_cli(self.env, "HLEN", f"mp:sup:t:{self.tenant}"), "10000")

        r = self.sup("export", "--tenant", self.tenant)
        self.assertEqual(r.returncode, 0, r.stderr)
        rows = list(csv.DictReader(io.StringIO(r.stdout)))
        self.assertEqual(len(rows), 10000)
        got = {row["address"]: row["reason"] for row in rows}
        want = {f"user{i}-{self.tag}@imp.example": f"reason{i % 7}" for i in range(10000)}
        self.assertEqual(got, want)
        self.assertEqual({row["origin"] for row in rows}, {"import"})

        # the export imports into another list as it is
        body = "\n".join(f"{row['address']},{row['reason']}" for row in rows)
        r = self.sup("import", "--tenant", self.other, "-", stdin=body)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.sup("export", "--tenant", self.other, "--format", "jsonl")
        self.assertEqual(r.returncode, 0, r.stderr)
        ents = [json.loads(line) for line in r.stdout.splitlines()]
        self.assertEqual({e["address"]: e["reason"] for e in ents}, want)
        self.assertEqual({e["list"] for e in ents}, {self.other})

        # a page of the list, then the next from its cursor, no entry twice
        seen, cursor = set(), None
        for _ in range(200):
            args = ["list", "--tenant", self.tenant, "--json", "--limit", "1000"]
            if cursor:
                args += ["--cursor", cursor]
            r = self.sup(*args)
            self.assertEqual(r.returncode, 0, r.stderr)
            page = json.loads(r.stdout)
            seen.update(e["address"] for e in page["entries"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(seen, set(want))

    def test_usage_errors(self):
        r = self.sup("add", "--tenant", "bad tenant!", "a@test.example")
        self.assertEqual(r.returncode, 2)
        self.assertIn("invalid tenant", r.stderr)
        r = self.sup("add", "--tenant", self.tenant, "bob@")
        self.assertEqual(r.returncode, 2)
        self.assertIn("no valid address", r.stderr)
        self.assertEqual(redis_cli(self.env, "EXISTS", f"mp:sup:t:{self.tenant}"), "0")
        r = self.sup("frobnicate")
        self.assertEqual(r.returncode, 2)
        r = self.sup("get", "--tenant", self.tenant, "--global", "a@test.example")
        self.assertEqual(r.returncode, 2)
        r = self.sup("--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("suppress import", r.stdout)


class SuppressUnavailable(unittest.TestCase):
    """A daemon whose [redis] port has nothing listening."""

    def run_with(self, when):
        env = mpstack.stack_env()
        extra = dict(SUPPRESSION_ON, MAILPUMP_REDIS_PORT=str(mpstack.free_port()),
                     MAILPUMP_REDIS_SEND_UNRECORDED="1", MAILPUMP_SUPPRESSION_WHEN_UNAVAILABLE=when)
        d, tap = mpstack.started_daemon(self, env, workers=1, extra_env=extra)
        tag = uuid.uuid4().hex[:10]
        addr = f"u-{tag}@test.example"
        subj = f"sup unavailable {tag}"
        r = d.cli("enqueue", "--from", "bob@test.example", "--to", addr, "--subject", subj, "--text", "hi")
        self.assertEqual(r.returncode, 0, r.stderr)
        msg_id = r.stdout.strip()
        ev = tap.wait(lambda e: e.get("message_id") == msg_id and e["event"] in ("delivered", "deferred"), 1)[0]
        self.assertGreaterEqual(d.metric("mailpump_suppression_unavailable_total"), 1)
        return env, d, ev, addr, subj

    def test_fail_open(self):
        env, d, ev, addr, subj = self.run_with("send")
        self.assertEqual(ev["event"], "delivered")
        wait_delivered_to(env, subj, addr)
        log = d.log()
        self.assertEqual(log.count("suppression_unavailable"), 1, log)  # once per transition

    def test_defer(self):
        env, d, ev, addr, subj = self.run_with("defer")
        self.assertEqual(ev["event"], "deferred")
        self.assertEqual(ev["reason"], "suppression_unavailable")
        self.assertEqual(ev["attempt"], 1)
        time.sleep(0.5)
        self.assertEqual(delivered_to(env, subj), [])


if __name__ == "__main__":
    unittest.main()

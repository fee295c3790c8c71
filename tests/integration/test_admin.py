"""Operators' actions (`mailpump admin`) on real services.

mailpumpd processes (private queues, the local stack's RabbitMQ and Redis)
relay to an smtpsink receiver on its own loopback address; `mailpump
admin` writes to the same Redis (mp:act) and every process honours it at
its next poll:

- a suspend by domain is honoured by two processes within about a second
  (deferred, reason suspended, no server asked, no attempt spent, who and
  why in the event), and after `mailpump admin resume ID` the messages are
  delivered on their next attempt;
- a bounce by tenant ends that tenant's recipients bounced, reason admin,
  the event naming who and why, while other tenants are delivered;
- suspends by campaign, pool and source hold their messages; `admin list`
  shows every action with its remaining time, sorted by expiry; resume by
  selector removes every suspend it names;
- resume of an unknown id, and any command while Redis is down, exit 1
  with a clear message; bad usage exits 2.

Actions share the fixed key mp:act with every process on the stack: each
test names its own values (domains, tenants, ...) and removes only the
actions it created.

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
from mpstack import redis_cli  # noqa: E402

SENDER = "bob@test.example"
WHO = "alice@ops"
MSGID_RE = re.compile(rb"^Message-ID: *<([^@>]+)@", re.M | re.I)


class Admin(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        redis_cli(cls.env, "PING")
        cls.dir = tempfile.mkdtemp(prefix="mp-admin-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def setUp(self):
        self.tag = uuid.uuid4().hex[:8]

    # ---- helpers -------------------------------------------------------------

    def admin(self, *args, redis=None):
        """`mailpump --config <stack> admin ARGS`: (exit status, stdout, stderr)."""
        cmd = [os.path.join(mpstack.BUILD_DIR, "mailpump"), "--config", self.env["MP_MAILPUMPD_CONFIG"],
               "admin", *args]
        if redis:
            cmd += ["--redis", redis]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPUMP_")}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        return r.returncode, r.stdout, r.stderr

    def add(self, *args):
        """An add that must succeed; returns its JSON and removes it at cleanup."""
        rc, out, err = self.admin(*args, "--who", WHO, "--json")
        self.assertEqual(rc, 0, err)
        a = json.loads(out)
        self.addCleanup(redis_cli, self.env, "HDEL", "mp:act", a["id"])
        return a

    def write(self, name, text):
        path = os.path.join(self.dir, f"{uuid.uuid4().hex[:6]}-{name}")
        with open(path, "w") as f:
            f.write(text)
        return path

    def sink(self, addr):
        s = mpstack.Sink(addr=addr)
        self.addCleanup(s.stop)
        return s

    def daemon(self, sink, addr, egress=None):
        extra = {"MAILPUMP_SMTP_RELAY": f"{addr}:{sink.port}", "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_LEVELS": "1s,3s"}
        if egress:
            extra["MAILPUMP_EGRESS_FILE"] = egress
        return mpstack.started_daemon(self, self.env, workers=1, extra_env=extra)

    def publish(self, d, n, tag, rcpt, **fields):
        """n messages of one recipient each; returns their ids."""
        conn, ch = mpstack.amqp_channel(self.env)
        ids = []
        try:
            ch.confirm_delivery()
            for i in range(n):
                mid = f"{tag}-{i}-{uuid.uuid4().hex[:6]}"
                msg = {"id": mid, "from": SENDER, "to": [rcpt.format(i=i)], "subject": tag, "text": "hello",
                       **fields}
                ch.basic_publish(exchange="", routing_key=d.queue, body=json.dumps(msg).encode(),
                                 properties=pika.BasicProperties(delivery_mode=2, priority=5))
                ids.append(mid)
        finally:
            conn.close()
        return ids

    def sent_ids(self, sink):
        """Ids of the messages the receiver kept."""
        return {m.group(1).decode() for m in (MSGID_RE.search(b) for b in sink.messages()) if m}

    def assert_suspended(self, e, action_id, reason_text):
        self.assertEqual(e["event"], "deferred", e)
        self.assertEqual(e["reason"], "suspended", e)
        self.assertNotIn("smtp", e)
        self.assertEqual(e["attempt"], 1, e)  # no attempt spent
        self.assertEqual(e.get("shaping"), f"suspend:admin:{WHO}", e)
        self.assertIn(f"suspended by admin:{WHO} for ", e["error"], e)
        self.assertIn(f": {reason_text} (action {action_id})", e["error"], e)

    # ---- 1. a suspend two processes honour, then a resume ---------------------

    def test_suspend_domain_two_daemons_then_resume(self):
        sink = self.sink("127.0.0.71")
        d1, tap1 = self.daemon(sink, "127.0.0.71")
        d2, tap2 = self.daemon(sink, "127.0.0.71")
        dom = f"adm-{self.tag}.test"
        a = self.add("suspend", "--domain", dom.upper(), "--for", "10m", "--reason", "provider outage")
        added = time.time()
        self.assertEqual(a["kind"], "suspend")
        self.assertEqual(a["selector"], "domain")
        self.assertEqual(a["value"], dom)  # domains in lower case
        self.assertEqual(a["origin"], f"admin:{WHO}")
        self.assertTrue(a["id"].startswith("adm-"), a)
        self.assertTrue(598 <= a["remaining_s"] <= 600, a)

        # within about a second (the workers poll every 800 ms) both hold the domain
        time.sleep(1.0)
        ids1 = self.publish(d1, 3, "s1", f"r{{i}}@{dom}")
        ids2 = self.publish(d2, 3, "s2", f"r{{i}}@{dom.upper()}")
        other = self.publish(d1, 1, "free", f"r{{i}}@other-{self.tag}.test")
        evs1 = tap1.wait(lambda e: e["message_id"] in ids1 and e["event"] == "deferred", 3, timeout=20)
        evs2 = tap2.wait(lambda e: e["message_id"] in ids2 and e["event"] == "deferred", 3, timeout=20)
        for e in evs1 + evs2:
            self.assert_suspended(e, a["id"], "provider outage")
        tap1.wait(lambda e: e["message_id"] in other and e["event"] == "delivered", 1, timeout=20)
        self.assertLess(time.time() - added, 8)
        self.assertEqual(self.sent_ids(sink) & set(ids1 + ids2), set())

        # resumed: the next attempt delivers them (an admin suspend re-checks within a minute;
        # here the longest retry level, 3 s)
        rc, out, err = self.admin("resume", a["id"])
        self.assertEqual(rc, 0, err)
        self.assertIn(f"removed {a['id']}: suspend domain {dom}", out)
        resumed = time.time()
        got1 = tap1.wait(lambda e: e["message_id"] in ids1 and e["event"] == "delivered", 3, timeout=30)
        got2 = tap2.wait(lambda e: e["message_id"] in ids2 and e["event"] == "delivered", 3, timeout=30)
        self.assertLess(time.time() - resumed, 15)
        for e in got1 + got2:
            self.assertNotIn("shaping", e)
        self.assertEqual(self.sent_ids(sink) & set(ids1 + ids2), set(ids1 + ids2))
        # gone from Redis and from the list
        self.assertEqual(redis_cli(self.env, "HEXISTS", "mp:act", a["id"]).strip(), "0")
        rc, out, err = self.admin("list", "--json")
        self.assertEqual(rc, 0, err)
        self.assertNotIn(a["id"], [x["id"] for x in json.loads(out)])

    # ---- 2. a bounce by tenant ------------------------------------------------

    def test_bounce_tenant(self):
        sink = self.sink("127.0.0.72")
        d, tap = self.daemon(sink, "127.0.0.72")
        t1, t2 = f"t1-{self.tag}", f"t2-{self.tag}"
        why = "provider outage, customer asked to stop"
        a = self.add("bounce", "--tenant", t1, "--for", "30m", "--reason", why)
        time.sleep(1.0)
        bounced = self.publish(d, 3, "b", f"r{{i}}@bt-{self.tag}.test", tenant=t1)
        kept = self.publish(d, 2, "k", f"r{{i}}@bt-{self.tag}.test", tenant=t2)
        evs = tap.wait(lambda e: e["message_id"] in bounced and e["event"] == "bounced", 3, timeout=20)
        for e in evs:
            self.assertEqual(e["reason"], "admin", e)
            self.assertNotIn("smtp", e)
            self.assertEqual(e["error"], f"bounced by admin:{WHO}: {why} (action {a['id']})", e)
            self.assertEqual(e.get("shaping"), f"bounce:admin:{WHO}", e)
        tap.wait(lambda e: e["message_id"] in kept and e["event"] == "delivered", 2, timeout=20)
        sent = self.sent_ids(sink)
        self.assertEqual(sent & set(bounced), set())
        self.assertEqual(sent & set(kept), set(kept))
        rc, out, err = self.admin("resume", "--tenant", t1)
        self.assertEqual(rc, 1, out)  # resume by selector removes suspends only
        self.assertIn(f"no suspend in force for tenant {t1}", err)
        rc, out, err = self.admin("resume", a["id"])
        self.assertEqual(rc, 0, err)

    # ---- 3. campaign, pool and source; list; resume by selector -----------------

    def test_campaign_pool_source_and_list(self):
        sink = self.sink("127.0.0.73")
        src, pool = f"s{self.tag}", f"p{self.tag}"
        egress = self.write("egress.ini", f"[source {src}]\naddress = 127.0.0.27\n\n[pool {pool}]\n"
                                          f"sources = {src}\n\n[default]\npool = {pool}\n")
        d, tap = self.daemon(sink, "127.0.0.73", egress=egress)
        camp = f"c-{self.tag}"
        rcpt = f"r{{i}}@cps-{self.tag}.test"
        ac = self.add("suspend", "--campaign", camp, "--for", "5m", "--reason", "wrong list")
        time.sleep(1.0)
        [m1] = self.publish(d, 1, "camp", rcpt, campaign=camp)
        [m2] = self.publish(d, 1, "nocamp", rcpt, campaign=f"other-{self.tag}")
        e = tap.wait(lambda e: e["message_id"] == m1 and e["event"] == "deferred", 1, timeout=20)[0]
        self.assert_suspended(e, ac["id"], "wrong list")
        tap.wait(lambda e: e["message_id"] == m2 and e["event"] == "delivered", 1, timeout=20)

        ap = self.add("suspend", "--pool", pool, "--for", "2h", "--reason", "pool paused")
        time.sleep(1.0)
        [m3] = self.publish(d, 1, "pool", rcpt)
        e = tap.wait(lambda e: e["message_id"] == m3 and e["event"] == "deferred", 1, timeout=20)[0]
        self.assert_suspended(e, ap["id"], "pool paused")
        rc, out, err = self.admin("resume", "--pool", pool)
        self.assertEqual(rc, 0, err)
        self.assertIn(f"removed {ap['id']}: suspend pool {pool}", out)

        asrc = self.add("suspend", "--source", src, "--for", "1d", "--reason", "ip listed", "--id",
                        f"inc-{self.tag}")
        self.assertEqual(asrc["id"], f"inc-{self.tag}")
        arate = self.add("rate", "--domain", f"rate-{self.tag}.test", "--rate", "30/m", "--for", "90s",
                         "--reason", "slow down")
        aconn = self.add("connections", "--site", f"site-{self.tag}", "--via", src, "--limit", "3", "--for",
                         "45m", "--reason", "few")
        time.sleep(1.0)
        [m4] = self.publish(d, 1, "src", rcpt)
        e = tap.wait(lambda e: e["message_id"] == m4 and e["event"] == "deferred", 1, timeout=20)[0]
        self.assert_suspended(e, asrc["id"], "ip listed")

        # list: every action, soonest to expire first, with the remaining time
        rc, out, err = self.admin("list", "--json")
        self.assertEqual(rc, 0, err)
        mine = {ac["id"], asrc["id"], arate["id"], aconn["id"]}
        got = [x for x in json.loads(out) if x["id"] in mine]
        self.assertEqual([x["id"] for x in got], [arate["id"], ac["id"], aconn["id"], asrc["id"]])
        exp = [x["expires"] for x in json.loads(out)]
        self.assertEqual(exp, sorted(exp))
        by = {x["id"]: x for x in got}
        self.assertTrue(80 <= by[arate["id"]]["remaining_s"] <= 90, by[arate["id"]])
        self.assertEqual(by[arate["id"]]["rate"], "30/m")
        self.assertEqual(by[arate["id"]]["connection_limit"], None)
        self.assertEqual(by[aconn["id"]]["connection_limit"], 3)
        self.assertEqual(by[aconn["id"]]["source"], src)
        self.assertTrue(86300 <= by[asrc["id"]]["remaining_s"] <= 86400, by[asrc["id"]])
        self.assertEqual(sorted(by[asrc["id"]]),
                         sorted(["id", "kind", "selector", "value", "source", "rate", "connection_limit", "created",
                                 "expires", "remaining_s", "reason", "origin"]))
        rc, out, err = self.admin("list")
        self.assertEqual(rc, 0, err)
        lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
        self.assertIn("LEFT", out.splitlines()[0])
        self.assertRegex(lines[arate["id"]], r"rate=30/m +domain +rate-\S+ +- +1m[0-9]+s +admin:alice@ops +slow down")
        self.assertRegex(lines[asrc["id"]], r"suspend +source +s\S+ +- +(23h59m|1d0h) +admin:alice@ops +ip listed")

        # resume by campaign; by source; the held messages go on their next attempt
        rc, out, err = self.admin("resume", "--campaign", camp)
        self.assertEqual(rc, 0, err)
        rc, out, err = self.admin("resume", "--source", src)
        self.assertEqual(rc, 0, err)
        tap.wait(lambda e: e["message_id"] in (m1, m3, m4) and e["event"] == "delivered", 3, timeout=30)
        rc, out, err = self.admin("list", "--json")
        left = {x["id"] for x in json.loads(out)}
        self.assertEqual(left & mine, {arate["id"], aconn["id"]})

    # ---- 4. errors ------------------------------------------------------------

    def test_errors(self):
        rc, out, err = self.admin("resume", f"adm-nope-{self.tag}")
        self.assertEqual(rc, 1)
        self.assertEqual(err.strip(), f"mailpump admin resume: no action adm-nope-{self.tag} in force "
                                      f"(mailpump admin list shows them)")
        rc, out, err = self.admin("resume", "--domain", f"none-{self.tag}.test")
        self.assertEqual(rc, 1)
        self.assertIn(f"no suspend in force for domain none-{self.tag}.test", err)
        # the same id for another action: refused
        a = self.add("suspend", "--domain", f"dup-{self.tag}.test", "--for", "1m", "--reason", "r", "--id",
                     f"dup-{self.tag}")
        rc, out, err = self.admin("bounce", "--domain", f"dup-{self.tag}.test", "--for", "1m", "--reason", "r",
                                  "--id", a["id"])
        self.assertEqual(rc, 2)
        self.assertIn(f"action {a['id']} exists and is a suspend of domain dup-{self.tag}.test", err)
        # the same again: extended, still one action
        again = self.add("suspend", "--domain", f"dup-{self.tag}.test", "--for", "1h", "--reason", "longer",
                         "--id", a["id"])
        self.assertTrue(3590 <= again["remaining_s"] <= 3600, again)
        self.assertEqual(again["reason"], "longer")
        self.assertEqual(again["created"], a["created"])
        # usage
        rc, out, err = self.admin("suspend", "--mx", "x", "--for", "1m", "--reason", "r")
        self.assertEqual(rc, 2)
        self.assertIn("unknown option", err)
        rc, out, err = self.admin("suspend", "--domain", "x.test", "--for", "ever", "--reason", "r")
        self.assertEqual(rc, 2)
        self.assertIn("--for: expected a duration", err)
        # Redis down
        port = mpstack.free_port()
        for args in (("list",), ("suspend", "--domain", "x.test", "--for", "1m", "--reason", "r"),
                     ("resume", "adm-1")):
            rc, out, err = self.admin(*args, redis=f"127.0.0.1:{port}")
            self.assertEqual(rc, 1, args)
            self.assertEqual(err.strip(), f"mailpump admin {args[0]}: redis 127.0.0.1:{port}: Connection refused")


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""The control plane's HTTP endpoints (api/control.c, docs/http-api.md) on
the real stack: two mailpumpd processes sharing one queue, the first
serving [api] with a tokens file, a smtpsink receiving their mail.

- every control endpoint refuses a request without a valid token (401);
- actions: POST /v1/actions suspends a tenant, both daemons hold its
  messages (deferred, reason suspended, no attempt spent, origin
  admin:<token name>); GET lists it; DELETE releases it and the messages
  are delivered; a second DELETE is 404; a bad selector is 400; a bounce
  by campaign ends its messages bounced with reason admin naming the
  token's name and the reason; POST /v1/actions/resume removes a tenant's
  suspends;
- suppressions: POST adds addresses to a tenant's list (invalid ones
  reported), GET reads one entry and pages the list, a message to a
  suppressed recipient is not sent (suppressed event) while the other
  recipient is, DELETE removes it (then 404), the next message is sent;
- GET /v1/messages/{id}: a delivered message's history (state done, the
  reply and MX of its recipient); an unknown id is 404;
- GET /v1/queue: the depth of the daemons' queue, their workers;
- dead letters: GET /v1/dead lists a dead-lettered message with its
  reason, POST /v1/dead/redrive with dry_run moves nothing, without it
  moves it back (the daemon dead-letters it again: a second dead event).

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import unittest
import urllib.parse
import uuid

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
from mpstack import redis_cli  # noqa: E402

TOKEN = "control-plane-token-0123456789"
WHO = "ops-carol"
SINK_ADDR = "127.0.0.74"
SENDER = "bob@test.example"


class ApiControl(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        redis_cli(cls.env, "PING")
        cls.dir = tempfile.mkdtemp(prefix="mp-apictl-")
        tokens = os.path.join(cls.dir, "tokens")
        with open(tokens, "w") as f:
            f.write(f"{WHO}:{TOKEN}\n")
        os.chmod(tokens, 0o600)
        cls.sink = mpstack.Sink(addr=SINK_ADDR)
        cls.port = mpstack.free_port()
        common = {"MAILPUMP_SMTP_RELAY": f"{SINK_ADDR}:{cls.sink.port}", "MAILPUMP_SMTP_TLS": "none",
                  "MAILPUMP_IMAP_HOST": "", "MAILPUMP_RETRY_LEVELS": "1s,3s",
                  "MAILPUMP_SUPPRESSION_ENABLED": "1", "MAILPUMP_SUPPRESSION_AUTO_REASONS": ""}
        api = dict(common, MAILPUMP_API_LISTEN=f"127.0.0.1:{cls.port}", MAILPUMP_API_TOKENS_FILE=tokens,
                   MAILPUMP_API_THREADS="2")
        cls.d1 = mpstack.Daemon(cls.env, workers=1, extra_env=api)
        cls.d2 = mpstack.Daemon(cls.env, workers=1, extra_env=common, queues_of=cls.d1)
        cls.tap = mpstack.EventTap(cls.env, cls.d1.exchange)
        try:
            cls.d1.start()
            cls.d2.start()
        except Exception:
            cls.d2.stop()
            cls.d1.stop()
            cls.tap.close()
            cls.sink.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        rc2 = cls.d2.stop()
        rc1 = cls.d1.stop()
        cls.tap.close()
        cls.sink.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)
        if rc1 != 0 or rc2 != 0:
            raise AssertionError(f"mailpumpd exit status {rc1}/{rc2} after SIGTERM:\n{cls.d1.log()[-3000:]}")

    def setUp(self):
        self.tag = uuid.uuid4().hex[:8]

    # ---- helpers ------------------------------------------------------------

    def request(self, method, path, body=None, token=TOKEN):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        raw = r.read()
        c.close()
        return r.status, json.loads(raw) if raw else None

    def ok(self, method, path, body=None, status=200):
        st, doc = self.request(method, path, body)
        self.assertEqual(st, status, doc)
        return doc

    def error(self, method, path, body, status, code):
        st, doc = self.request(method, path, body)
        self.assertEqual(st, status, doc)
        self.assertEqual(doc["error"]["status"], status, doc)
        self.assertEqual(doc["error"]["code"], code, doc)
        self.assertTrue(doc["error"]["reason"], doc)
        return doc

    def publish(self, n, tag, rcpts, **fields):
        """n messages to rcpts (a list of addresses, {i} replaced); their ids."""
        conn, ch = mpstack.amqp_channel(self.env)
        ids = []
        try:
            ch.confirm_delivery()
            for i in range(n):
                mid = f"{tag}-{i}-{uuid.uuid4().hex[:6]}"
                msg = {"id": mid, "from": SENDER, "to": [r.format(i=i) for r in rcpts], "subject": tag,
                       "text": "hello", **fields}
                ch.basic_publish(exchange="", routing_key=self.d1.queue, body=json.dumps(msg).encode(),
                                 properties=pika.BasicProperties(delivery_mode=2))
                ids.append(mid)
        finally:
            conn.close()
        return ids

    def action(self, body):
        a = self.ok("POST", "/v1/actions", body, status=201)
        self.addCleanup(redis_cli, self.env, "HDEL", "mp:act", a["id"])
        return a

    # ---- authentication -------------------------------------------------------

    def test_every_endpoint_needs_a_token(self):
        routes = [("GET", "/v1/actions", None), ("POST", "/v1/actions", {}), ("DELETE", "/v1/actions/x", None),
                  ("POST", "/v1/actions/resume", {}), ("GET", "/v1/suppressions", None),
                  ("POST", "/v1/suppressions", {}), ("GET", "/v1/suppressions/a@b.example", None),
                  ("DELETE", "/v1/suppressions/a@b.example", None), ("GET", "/v1/messages/x", None),
                  ("GET", "/v1/queue", None), ("GET", "/v1/dead", None), ("POST", "/v1/dead/redrive", {})]
        for method, path, body in routes:
            for token in (None, "not-the-token-0123456789"):
                st, doc = self.request(method, path, body, token=token)
                self.assertEqual(st, 401, (method, path, doc))
                self.assertEqual(doc["error"]["code"], "unauthorized")
        # nothing was done in their name
        self.assertNotIn(WHO, redis_cli(self.env, "HGETALL", "mp:act"))

    # ---- actions --------------------------------------------------------------

    def test_suspend_by_tenant_two_daemons_then_delete(self):
        tenant = f"t-{self.tag}"
        a = self.action({"kind": "suspend", "selector": "tenant", "value": tenant, "duration": "10m",
                         "reason": "customer paused"})
        self.assertEqual((a["kind"], a["selector"], a["value"]), ("suspend", "tenant", tenant))
        self.assertEqual(a["origin"], f"admin:{WHO}")
        listed = self.ok("GET", "/v1/actions")["actions"]
        self.assertIn(a["id"], [x["id"] for x in listed])
        time.sleep(1.0)  # the workers poll every 800 ms
        held = self.publish(6, "held", [f"r{{i}}@susp-{self.tag}.test"], tenant=tenant)
        free = self.publish(1, "free", [f"r{{i}}@susp-{self.tag}.test"], tenant=f"other-{self.tag}")
        evs = self.tap.wait(lambda e: e.get("message_id") in held and e["event"] == "deferred", 6, timeout=20)
        for e in evs:
            self.assertEqual(e["reason"], "suspended", e)
            self.assertEqual(e["attempt"], 1, e)  # no attempt spent
            self.assertEqual(e.get("shaping"), f"suspend:admin:{WHO}", e)
            self.assertIn("customer paused", e["error"], e)
        self.tap.wait(lambda e: e.get("message_id") in free and e["event"] == "delivered", 1, timeout=20)
        # both daemons held some: the broker hands the shared queue's messages round robin
        for d in (self.d1, self.d2):
            self.assertGreater(d.metric("mailpump_shaping_suspended_total"), 0, d.log()[-2000:])
        removed = self.ok("DELETE", f"/v1/actions/{urllib.parse.quote(a['id'])}")
        self.assertEqual(removed["id"], a["id"])
        self.error("DELETE", f"/v1/actions/{urllib.parse.quote(a['id'])}", None, 404, "not_found")
        self.tap.wait(lambda e: e.get("message_id") in held and e["event"] == "delivered", 6, timeout=30)
        self.assertNotIn(a["id"], [x["id"] for x in self.ok("GET", "/v1/actions")["actions"]])

    def test_bad_action_requests(self):
        self.error("POST", "/v1/actions", {"kind": "suspend", "selector": "planet", "value": "x",
                                            "duration": "1m", "reason": "r"}, 400, "invalid")
        self.error("POST", "/v1/actions", {"kind": "suspend", "selector": "tenant", "value": "x",
                                            "duration": "forever", "reason": "r"}, 400, "invalid")
        self.error("POST", "/v1/actions", [1, 2], 400, "invalid")
        self.error("POST", "/v1/actions/resume", {"selector": "tenant"}, 400, "invalid")
        self.error("POST", "/v1/actions/resume", {"selector": "tenant", "value": f"none-{self.tag}"},
                   404, "not_found")

    def test_bounce_by_campaign_and_resume_by_selector(self):
        camp = f"c-{self.tag}"
        why = "sent to the wrong list"
        b = self.action({"kind": "bounce", "selector": "campaign", "value": camp, "duration": "5m",
                         "reason": why})
        tenant = f"t-{self.tag}"
        s = self.action({"kind": "suspend", "selector": "tenant", "value": tenant, "duration": "5m",
                         "reason": "hold"})
        time.sleep(1.0)
        bounced = self.publish(2, "b", [f"r{{i}}@bc-{self.tag}.test"], campaign=camp)
        evs = self.tap.wait(lambda e: e.get("message_id") in bounced and e["event"] == "bounced", 2, timeout=20)
        for e in evs:
            self.assertEqual(e["reason"], "admin", e)
            self.assertEqual(e["error"], f"bounced by admin:{WHO}: {why} (action {b['id']})", e)
        got = self.ok("POST", "/v1/actions/resume", {"selector": "tenant", "value": tenant})
        self.assertEqual([x["id"] for x in got["removed"]], [s["id"]])
        self.ok("DELETE", f"/v1/actions/{urllib.parse.quote(b['id'])}")

    # ---- suppressions -----------------------------------------------------------

    def test_suppressions(self):
        tenant = f"t-{self.tag}"
        dom = f"sup-{self.tag}.test"
        blocked, other = f"blocked@{dom}", f"other@{dom}"
        q = f"?tenant={tenant}"
        self.addCleanup(redis_cli, self.env, "DEL", f"mp:sup:t:{tenant}")
        got = self.ok("POST", "/v1/suppressions", {"tenant": tenant, "addresses": [blocked.upper(), "not-an-address"],
                                                   "reason": "complained"})
        self.assertEqual(got["added"], 1, got)
        self.assertEqual(got["invalid"], ["not-an-address"], got)
        entry = self.ok("GET", f"/v1/suppressions/{urllib.parse.quote(blocked)}{q}")
        self.assertEqual((entry["address"], entry["list"], entry["reason"]), (blocked, tenant, "complained"))
        self.error("GET", f"/v1/suppressions/{urllib.parse.quote(blocked)}", None, 404, "not_found")  # global
        page = self.ok("GET", f"/v1/suppressions{q}&limit=10")
        self.assertEqual([e["address"] for e in page["entries"]], [blocked])
        self.assertEqual(page["total"], 1)
        self.error("GET", f"/v1/suppressions{q}&limit=zero", None, 400, "invalid")
        self.error("POST", "/v1/suppressions", {"tenant": tenant}, 400, "invalid")
        self.error("POST", "/v1/suppressions", {"tenant": tenant, "addresses": ["nope"]}, 400, "invalid")

        [m1] = self.publish(1, "sup", [blocked, other], tenant=tenant)
        evs = self.tap.wait(lambda e: e.get("message_id") == m1 and e["event"] in ("suppressed", "delivered"), 2,
                            timeout=20)
        by = {e["recipient"]: e for e in evs}
        self.assertEqual(by[blocked]["event"], "suppressed", by)
        self.assertEqual(by[other]["event"], "delivered", by)

        gone = self.ok("DELETE", f"/v1/suppressions/{urllib.parse.quote(blocked)}{q}")
        self.assertEqual(gone["removed"], 1, gone)
        self.error("DELETE", f"/v1/suppressions/{urllib.parse.quote(blocked)}{q}", None, 404, "not_found")
        [m2] = self.publish(1, "unsup", [blocked], tenant=tenant)
        self.tap.wait(lambda e: e.get("message_id") == m2 and e["event"] == "delivered", 1, timeout=20)

    # ---- what happened to message X -----------------------------------------

    def test_message_history(self):
        [mid] = self.publish(1, "tr", [f"r@tr-{self.tag}.test"])
        ev = self.tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "delivered", 1, timeout=20)[0]
        deadline = time.time() + 10
        while True:  # the history is written after the events, without waiting
            st, doc = self.request("GET", f"/v1/messages/{mid}")
            if st == 200 or time.time() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(st, 200, doc)
        self.assertEqual(doc["id"], mid)
        self.assertEqual(doc["state"], "done", doc)
        [r] = doc["recipients"]
        self.assertEqual((r["recipient"], r["outcome"]), (f"r@tr-{self.tag}.test", "delivered"))
        self.assertEqual(r["last"]["code"], ev["smtp"]["code"])
        self.assertEqual(r["last"]["mx_addr"], ev["mx_addr"])
        self.error("GET", f"/v1/messages/unknown-{self.tag}", None, 404, "not_found")

    # ---- queue summary and dead letters ---------------------------------------

    def test_queue_summary(self):
        doc = self.ok("GET", "/v1/queue")
        names = {q["name"]: q for q in doc["queues"]}
        self.assertIn(self.d1.queue, names, doc)
        self.assertEqual(names[self.d1.queue]["kind"], "outbound")
        self.assertEqual(names[self.d1.queue]["consumers"], 2, doc)  # one worker in each daemon
        self.assertIn(self.d1.dead_queue, names, doc)
        pids = {w["pid"] for w in doc["workers"]}
        deadline = time.time() + 5
        while pids != {self.d1.proc.pid, self.d2.proc.pid} and time.time() < deadline:
            time.sleep(0.5)  # status records are written every 2 s
            pids = {w["pid"] for w in self.ok("GET", "/v1/queue")["workers"]}
        self.assertEqual(pids, {self.d1.proc.pid, self.d2.proc.pid})

    def test_dead_list_and_redrive(self):
        mid = f"dead-{self.tag}"
        conn, ch = mpstack.amqp_channel(self.env)
        try:
            ch.confirm_delivery()
            body = {"id": mid, "from": SENDER, "to": ["not an address"], "subject": "x", "text": "x"}
            ch.basic_publish(exchange="", routing_key=self.d1.queue, body=json.dumps(body).encode(),
                             properties=pika.BasicProperties(delivery_mode=2))
        finally:
            conn.close()
        self.tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "dead", 1, timeout=20)
        listed = self.ok("GET", "/v1/dead?limit=100")
        mine = [m for m in listed["messages"] if m["id"] == mid]
        self.assertEqual(len(mine), 1, listed)
        reason = mine[0]["reason"]
        self.assertTrue(reason, mine)
        self.error("GET", "/v1/dead?limit=-1", None, 400, "invalid")
        self.error("POST", "/v1/dead/redrive", {"limit": "all"}, 400, "invalid")

        dry = self.ok("POST", "/v1/dead/redrive", {"reason": reason, "dry_run": True})
        self.assertEqual((dry["redriven"], dry["ids"], dry["dry_run"]), (1, [mid], True), dry)
        self.assertEqual([m["id"] for m in self.ok("GET", "/v1/dead")["messages"]].count(mid), 1)

        moved = self.ok("POST", "/v1/dead/redrive", {"reason": reason})
        self.assertEqual((moved["redriven"], moved["ids"], moved["failed"]), (1, [mid], 0), moved)
        # back in the outbound queue, consumed again, dead-lettered again (it is still invalid)
        self.tap.wait(lambda e: e.get("message_id") == mid and e["event"] == "dead", 2, timeout=20)


if __name__ == "__main__":
    unittest.main(verbosity=2)

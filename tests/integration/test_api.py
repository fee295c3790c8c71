"""mailpumpd's HTTP API ([api], docs/http-api.md) on the real stack.

One mailpumpd with [api] listen on a free loopback port and a tokens file
serves most tests (private queues, the stack's RabbitMQ, delivery to the
stack's sinks); others start their own:

- authentication: no header, another scheme, a wrong token -> 401 with
  WWW-Authenticate: Bearer and the JSON error; the right token passes; a
  rewritten tokens file takes effect without a restart;
- the server's refusals: 413 (by Content-Length, and counted in a
  chunked body), 400 malformed JSON, 415 not application/json, 404, 405
  with Allow; a client that stalls after part of its headers is cut off
  after [api] timeout;
- POST /v1/messages: one message and a batch -> 202 with their ids (given
  or generated), then delivered (the events name those ids); a batch with
  an invalid message -> 422 naming its index, and none of the batch is
  published; a broker nobody listens on -> 503 "broker unavailable";
  a private broker frozen -> 503 after [api] publish_timeout with the ids
  unconfirmed; stopped -> 503 at once; started again -> 202 (the
  publisher reconnected);
- TLS with a self-signed certificate: HTTPS works, plaintext does not;
- --check-config refuses [api] listen without a tokens file.

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
import privbroker  # noqa: E402

TOKEN = "s3cr3t-token-for-ops-alice-0001"
TOKEN2 = "another-token-0123456789"
MAX_BODY = 65536


def message(mid=None, to="alice@test.example"):
    m = {"from": "bob@test.example", "to": [to], "subject": "api test", "text": "hello from the API"}
    if mid is not None:
        m["id"] = mid
    return m


def api_env(port, tokens_file, **extra):
    e = {
        "MAILPUMP_API_LISTEN": f"127.0.0.1:{port}",
        "MAILPUMP_API_TOKENS_FILE": tokens_file,
        "MAILPUMP_API_MAX_BODY": str(MAX_BODY),
        "MAILPUMP_API_TIMEOUT": "2s",
        "MAILPUMP_API_THREADS": "2",
        "MAILPUMP_API_MAX_BATCH": "50",
    }
    e.update(extra)
    return e


class Api(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        cls.dir = tempfile.mkdtemp(prefix="mp-api-")
        cls.tokens = os.path.join(cls.dir, "tokens")
        with open(cls.tokens, "w") as f:
            f.write(f"# operators\n\nadmin:ops-alice:{TOKEN}\n")
        os.chmod(cls.tokens, 0o600)
        cls.port = mpstack.free_port()
        cls.daemon = mpstack.Daemon(cls.env, workers=1, extra_env=api_env(cls.port, cls.tokens))
        cls.tap = mpstack.EventTap(cls.env, cls.daemon.exchange)
        try:
            cls.daemon.start()
        except Exception:
            cls.daemon.stop()
            cls.tap.close()
            raise

    @classmethod
    def tearDownClass(cls):
        rc = cls.daemon.stop()
        cls.tap.close()
        shutil.rmtree(cls.dir, ignore_errors=True)
        if rc != 0:
            raise AssertionError(f"mailpumpd exit status {rc} after SIGTERM:\n{cls.daemon.log()[-3000:]}")

    def request(self, method, path, body=None, token=TOKEN, headers=None, port=None, raw=False,
                content_type="application/json"):
        c = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        h = dict(headers or {})
        if token is not None:
            h.setdefault("Authorization", f"Bearer {token}")
        if body is not None:
            if not raw:
                body = json.dumps(body).encode()
            if content_type is not None:
                h.setdefault("Content-Type", content_type)
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        doc = json.loads(data) if data else None
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), doc

    def assertError(self, got, status, code):
        st, hdrs, doc = got
        self.assertEqual(st, status, doc)
        self.assertEqual(hdrs.get("content-type"), "application/json")
        self.assertEqual(doc["error"]["status"], status)
        self.assertEqual(doc["error"]["code"], code)
        self.assertIsInstance(doc["error"]["reason"], str)
        return doc

    # ---- authentication ----

    def test_authentication(self):
        for token, headers in ((None, {}), (None, {"Authorization": f"Basic {TOKEN}"}),
                               ("wrong-token-0123456789", {}), (TOKEN[:-1], {}),
                               (None, {"Authorization": f"Bearer {TOKEN} x"})):
            got = self.request("POST", "/v1/messages", [message()], token=token, headers=headers)
            self.assertError(got, 401, "unauthorized")
            self.assertEqual(got[1].get("www-authenticate"), "Bearer")
        # unknown paths under /v1 are not told apart before authentication
        self.assertError(self.request("GET", "/v1/nothing-here", token=None), 401, "unauthorized")
        mid = str(uuid.uuid4())
        st, _, doc = self.request("POST", "/v1/messages", message(mid))
        self.assertEqual(st, 202, doc)
        self.assertEqual(doc, {"ids": [mid]})
        self.assertGreaterEqual(self.daemon.metric("mailpump_api_auth_failures_total"), 6)
        self.assertNotIn(TOKEN, self.daemon.log())

    def test_token_file_rotation(self):
        self.assertEqual(self.request("GET", "/v1/messages")[0], 405)
        self.assertEqual(self.request("GET", "/v1/messages", token=TOKEN2)[0], 401)
        try:
            with open(self.tokens, "w") as f:
                f.write(f"{TOKEN2}\n")
            st = os.stat(self.tokens)
            os.utime(self.tokens, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
            deadline = time.time() + 5
            while time.time() < deadline and self.request("GET", "/v1/messages", token=TOKEN2)[0] != 405:
                time.sleep(0.2)
            self.assertEqual(self.request("GET", "/v1/messages", token=TOKEN2)[0], 405)
            self.assertEqual(self.request("GET", "/v1/messages")[0], 401)
        finally:
            with open(self.tokens, "w") as f:
                f.write(f"admin:ops-alice:{TOKEN}\n")
            st = os.stat(self.tokens)
            os.utime(self.tokens, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
            deadline = time.time() + 5
            while time.time() < deadline and self.request("GET", "/v1/messages")[0] != 405:
                time.sleep(0.2)
        self.assertEqual(self.request("GET", "/v1/messages")[0], 405)

    # ---- the server's refusals ----

    def test_too_large_by_content_length(self):
        # answered from the headers: the body is never sent
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            s.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data)
        body = b'{"x":"' + b"a" * MAX_BODY + b'"}'
        self.assertError(self.request("POST", "/v1/messages", body, raw=True), 413, "too_large")
        # exactly max_body passes the size check (and is then not a message)
        body = b'{"x":"' + b"a" * (MAX_BODY - 8) + b'"}'
        self.assertEqual(len(body), MAX_BODY)
        doc = self.assertError(self.request("POST", "/v1/messages", body, raw=True), 422, "invalid_message")
        self.assertEqual(doc["error"]["messages"][0]["index"], 0)

    def test_too_large_chunked(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

        def chunks():
            yield b"["
            for _ in range(MAX_BODY // 1000 + 2):
                yield b'"' + b"a" * 1000 + b'",'
            yield b'"a"]'
        c.request("POST", "/v1/messages", body=chunks(), encode_chunked=True,
                  headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
                           "Transfer-Encoding": "chunked"})
        r = c.getresponse()
        doc = json.loads(r.read())
        c.close()
        self.assertEqual(r.status, 413, doc)
        self.assertEqual(doc["error"]["code"], "too_large")

    def test_malformed_json(self):
        doc = self.assertError(self.request("POST", "/v1/messages", b'{"from": ', raw=True), 400,
                               "malformed_json")
        self.assertIn("line 1", doc["error"]["reason"])

    def test_wrong_content_type(self):
        self.assertError(self.request("POST", "/v1/messages", b"{}", raw=True, content_type="text/plain"),
                         415, "unsupported_media_type")
        self.assertError(self.request("POST", "/v1/messages", b"{}", raw=True, content_type=None),
                         415, "unsupported_media_type")
        # parameters are fine
        mid = str(uuid.uuid4())
        st, _, doc = self.request("POST", "/v1/messages", message(mid),
                                  content_type="application/json; charset=utf-8")
        self.assertEqual((st, doc), (202, {"ids": [mid]}))

    def test_unknown_path_and_wrong_method(self):
        self.assertError(self.request("GET", "/v1/nothing-here"), 404, "not_found")
        self.assertError(self.request("POST", "/v1/messages/some-id/extra", [message()]), 404, "not_found")
        st, hdrs, _ = self.request("POST", "/v1/messages/some-id", [message()])  # GET only: the history
        self.assertEqual((st, hdrs.get("allow")), (405, "GET"))
        self.assertError(self.request("GET", "/elsewhere", token=None), 404, "not_found")
        got = self.assertError(self.request("DELETE", "/v1/messages"), 405, "method_not_allowed")
        self.assertIn("DELETE", got["error"]["reason"])
        st, hdrs, _ = self.request("GET", "/v1/messages")
        self.assertEqual((st, hdrs.get("allow")), (405, "POST"))

    def test_slow_client_is_cut_off(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
            t0 = time.time()
            data = s.recv(4096)  # blocks until the server closes
            took = time.time() - t0
        finally:
            s.close()
        self.assertEqual(data, b"")
        self.assertGreaterEqual(took, 1.5)
        self.assertLess(took, 6)

    # ---- POST /v1/messages ----

    def delivered(self, ids, timeout=60):
        want = set(ids)
        evs = self.tap.wait(lambda e: e.get("message_id") in want and e["event"] == "delivered",
                            len(want), timeout)
        return evs

    def test_submit_single_and_batch_delivered(self):
        mid = str(uuid.uuid4())
        st, _, doc = self.request("POST", "/v1/messages", message(mid))
        self.assertEqual((st, doc), (202, {"ids": [mid]}))
        batch = [message(), message(to="bob@test.example"), message(f"given-{uuid.uuid4().hex}")]
        st, _, doc = self.request("POST", "/v1/messages?priority=7", batch)
        self.assertEqual(st, 202, doc)
        ids = doc["ids"]
        self.assertEqual(len(ids), 3)
        self.assertRegex(ids[0], r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
        self.assertRegex(ids[1], r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
        self.assertNotEqual(ids[0], ids[1])
        self.assertEqual(ids[2], batch[2]["id"])
        evs = self.delivered([mid] + ids)
        by_id = {e["message_id"]: e["recipient"] for e in evs}
        self.assertEqual(by_id, {mid: "alice@test.example", ids[0]: "alice@test.example",
                                 ids[1]: "bob@test.example", ids[2]: "alice@test.example"})

    def test_concurrent_requests(self):
        """Requests of several clients at once share the one publisher
        connection: each gets its own ids back, and every one is delivered."""
        import threading
        results, lock = [], threading.Lock()

        def client(n):
            batch = [message(f"conc-{n}-{i}-{uuid.uuid4().hex[:8]}") for i in range(3)]
            got = self.request("POST", "/v1/messages", batch)
            with lock:
                results.append(([m["id"] for m in batch], got))
        threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(results), 10)
        for ids, (st, _, doc) in results:
            self.assertEqual((st, doc), (202, {"ids": ids}))
        self.delivered([i for ids, _ in results for i in ids])

    def test_bad_priority(self):
        self.assertError(self.request("POST", "/v1/messages?priority=11", message()), 400, "invalid")
        self.assertError(self.request("POST", "/v1/messages", message(),
                                      headers={"X-Mailpump-Priority": "x"}), 400, "invalid")

    def test_invalid_message_in_batch(self):
        ok1, ok2 = str(uuid.uuid4()), str(uuid.uuid4())
        bad = message()
        del bad["to"]
        before = self.daemon.metric("mailpump_api_messages_submitted_total")
        doc = self.assertError(self.request("POST", "/v1/messages", [message(ok1), bad, message(ok2), 5]),
                               422, "invalid_message")
        self.assertEqual(self.daemon.metric("mailpump_api_messages_submitted_total"), before)
        msgs = doc["error"]["messages"]
        self.assertEqual([m["index"] for m in msgs], [1, 3])
        self.assertIn('"to"', msgs[0]["reason"])
        self.assertEqual(msgs[1]["reason"], "not a JSON object")
        # nothing of that batch was published: a later message is consumed
        # and delivered alone
        probe = str(uuid.uuid4())
        self.assertEqual(self.request("POST", "/v1/messages", message(probe))[0], 202)
        self.delivered([probe])
        self.tap.drain()
        self.assertFalse([e for e in self.tap.events if e.get("message_id") in (ok1, ok2)])
        self.assertEqual(self.daemon.metric("mailpump_api_messages_submitted_total"), before + 1)

    def test_empty_and_oversized_batch(self):
        self.assertError(self.request("POST", "/v1/messages", []), 400, "invalid")
        self.assertError(self.request("POST", "/v1/messages", "a string"), 400, "invalid")
        self.assertError(self.request("POST", "/v1/messages", [message()] * 51), 413, "too_many_messages")


class ApiOwnDaemon(unittest.TestCase):
    """Daemons of their own: a broker nobody listens on, TLS, a bad config."""

    @classmethod
    def setUpClass(cls):
        cls.env = mpstack.stack_env()
        cls.dir = tempfile.mkdtemp(prefix="mp-api2-")
        cls.tokens = os.path.join(cls.dir, "tokens")
        with open(cls.tokens, "w") as f:
            f.write(f"{TOKEN}\n")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def start_raw(self, extra):
        """mailpumpd without waiting for /readyz (its broker may be away)."""
        env = dict(os.environ)
        env.update({"MAILPUMP_AMQP_HOST": self.env["MP_AMQP_HOST"],
                    "MAILPUMP_AMQP_PORT": self.env["MP_AMQP_PORT"],
                    "MAILPUMP_AMQP_QUEUE": f"itest.{uuid.uuid4().hex[:8]}.outbound",
                    "MAILPUMP_METRICS_LISTEN": f"127.0.0.1:{mpstack.free_port()}",
                    "MAILPUMP_WORKER_COUNT": "1"})
        env.update(extra)
        log = open(os.path.join(self.dir, f"mailpumpd-{uuid.uuid4().hex[:6]}.log"), "w+")
        proc = subprocess.Popen([os.path.join(mpstack.BUILD_DIR, "mailpumpd"), "--config",
                                 self.env["MP_MAILPUMPD_CONFIG"]], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
        mpstack._STARTED.append(proc)

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            text = log.read()
            log.close()
            self.assertEqual(proc.returncode, 0, text[-3000:])
        self.addCleanup(stop)
        return proc, log

    def wait_port(self, proc, log, port):
        deadline = time.time() + 20
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"mailpumpd exited {proc.returncode}: {log.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the API does not listen")

    def test_broker_unavailable(self):
        port = mpstack.free_port()
        dead = mpstack.free_port()
        proc, log = self.start_raw(dict(api_env(port, self.tokens), MAILPUMP_AMQP_PORT=str(dead)))
        self.wait_port(proc, log, port)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.time()
        c.request("POST", "/v1/messages", body=json.dumps([message(), message()]),
                  headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        r = c.getresponse()
        doc = json.loads(r.read())
        c.close()
        self.assertEqual(r.status, 503, doc)
        self.assertEqual(doc["error"]["code"], "unavailable")
        self.assertTrue(doc["error"]["reason"].startswith("broker unavailable: "), doc)
        self.assertIn(str(dead), doc["error"]["reason"])
        self.assertEqual(doc["error"]["confirmed"], [])
        self.assertEqual(len(doc["error"]["unconfirmed"]), 2)
        self.assertLess(time.time() - t0, 2, "fails fast, without waiting for publish_timeout")

    def test_tls(self):
        cert, key = os.path.join(self.dir, "api.crt"), os.path.join(self.dir, "api.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        port = mpstack.free_port()
        proc, log = self.start_raw(api_env(port, self.tokens, MAILPUMP_API_TLS_CERT=cert,
                                           MAILPUMP_API_TLS_KEY=key))
        self.wait_port(proc, log, port)
        ctx = ssl.create_default_context(cafile=cert)
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
        c.request("GET", "/v1/messages", headers={"Authorization": f"Bearer {TOKEN}"})
        r = c.getresponse()
        doc = json.loads(r.read())
        c.close()
        self.assertEqual(r.status, 405, doc)
        self.assertEqual(r.getheader("Allow"), "POST")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with self.assertRaises((http.client.HTTPException, OSError)):
            c.request("GET", "/v1/messages", headers={"Authorization": f"Bearer {TOKEN}"})
            c.getresponse().read()
        c.close()

    def run_check(self, extra):
        env = dict(os.environ)
        env.update(extra)
        return subprocess.run([os.path.join(mpstack.BUILD_DIR, "mailpumpd"), "--config",
                               self.env["MP_MAILPUMPD_CONFIG"], "--check-config"], env=env,
                              capture_output=True, text=True, timeout=30)

    def test_check_config(self):
        r = self.run_check({"MAILPUMP_API_LISTEN": "127.0.0.1:1"})
        self.assertEqual(r.returncode, 2, r.stdout)
        self.assertIn("[api] tokens_file: required", r.stderr)
        short = os.path.join(self.dir, "short")
        with open(short, "w") as f:
            f.write("name:short\n")
        r = self.run_check({"MAILPUMP_API_LISTEN": "127.0.0.1:1", "MAILPUMP_API_TOKENS_FILE": short})
        self.assertEqual(r.returncode, 2)
        self.assertIn("line 1: token shorter than 16 characters", r.stderr)
        r = self.run_check({"MAILPUMP_API_LISTEN": "localhost:1", "MAILPUMP_API_TOKENS_FILE": self.tokens})
        self.assertEqual(r.returncode, 2)
        self.assertIn("[api] listen:", r.stderr)
        r = self.run_check({"MAILPUMP_API_LISTEN": "127.0.0.1:1", "MAILPUMP_API_TOKENS_FILE": self.tokens,
                            "MAILPUMP_API_TLS_CERT": self.tokens})
        self.assertEqual(r.returncode, 2)
        self.assertIn("both or neither", r.stderr)
        # a certificate with another's key
        keys = []
        for n in ("a", "b"):
            cert, key = os.path.join(self.dir, f"{n}.crt"), os.path.join(self.dir, f"{n}.key")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                            "-out", cert, "-days", "2", "-subj", "/CN=x"], check=True, capture_output=True)
            keys.append((cert, key))
        r = self.run_check({"MAILPUMP_API_LISTEN": "127.0.0.1:1", "MAILPUMP_API_TOKENS_FILE": self.tokens,
                            "MAILPUMP_API_TLS_CERT": keys[0][0], "MAILPUMP_API_TLS_KEY": keys[1][1]})
        self.assertEqual(r.returncode, 2)
        self.assertIn(f"[api] tls_key: {keys[1][1]} is not the key of {keys[0][0]}", r.stderr)
        r = self.run_check({"MAILPUMP_API_LISTEN": "127.0.0.1:1", "MAILPUMP_API_TOKENS_FILE": self.tokens,
                            "MAILPUMP_API_TLS_CERT": keys[0][0], "MAILPUMP_API_TLS_KEY": keys[0][1]})
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.run_check({"MAILPUMP_API_LISTEN": "127.0.0.1:1", "MAILPUMP_API_TOKENS_FILE": self.tokens})
        self.assertEqual(r.returncode, 0, r.stderr)


class ApiBroker(unittest.TestCase):
    """POST /v1/messages while a private broker freezes, stops and returns."""

    def post(self, port, msgs):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/v1/messages", body=json.dumps(msgs),
                  headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        r = c.getresponse()
        doc = json.loads(r.read())
        c.close()
        return r.status, doc

    def test_frozen_stopped_and_back(self):
        tmp = tempfile.mkdtemp(prefix="mp-api3-")
        self.addCleanup(shutil.rmtree, tmp, True)
        tokens = os.path.join(tmp, "tokens")
        with open(tokens, "w") as f:
            f.write(f"{TOKEN}\n")
        broker = privbroker.PrivateBroker()
        self.addCleanup(broker.close)
        broker.start()
        env = broker.stack_env(mpstack.stack_env())
        port = mpstack.free_port()
        d = mpstack.Daemon(env, workers=1, extra_env=api_env(
            port, tokens, MAILPUMP_API_PUBLISH_TIMEOUT="1s", MAILPUMP_IMAP_HOST="",
            MAILPUMP_AMQP_HEARTBEAT="5", MAILPUMP_WORKER_SHUTDOWN_GRACE_MS="3000"))
        try:
            d.start()
        except Exception:
            d.stop()
            raise

        def stop():
            if d.proc.poll() is None:
                broker.thaw()
                self.assertEqual(d.stop(), 0, d.log()[-3000:])
        self.addCleanup(stop)
        st, doc = self.post(port, [message()])
        self.assertEqual(st, 202, doc)

        # frozen: the publishes go out, no confirm comes back
        broker.freeze()
        ids = [str(uuid.uuid4()), str(uuid.uuid4())]
        t0 = time.time()
        st, doc = self.post(port, [message(ids[0]), message(ids[1])])
        took = time.time() - t0
        broker.thaw()
        self.assertEqual(st, 503, doc)
        self.assertEqual(doc["error"]["code"], "unavailable")
        self.assertIn("did not confirm within [api] publish_timeout (1000 ms)", doc["error"]["reason"])
        self.assertEqual(doc["error"]["confirmed"], [])
        self.assertEqual(sorted(doc["error"]["unconfirmed"]), sorted(ids))
        self.assertGreaterEqual(took, 0.9)
        self.assertLess(took, 5)

        # stopped: 503 at once once the loss is seen
        broker.stop_app()
        deadline = time.time() + 20
        while True:
            t0 = time.time()
            st, doc = self.post(port, [message()])
            took = time.time() - t0
            if st == 503 and doc["error"]["reason"].startswith("broker unavailable: "):
                break
            self.assertLess(time.time(), deadline, (st, doc))
            time.sleep(0.2)
        self.assertLess(took, 0.9, "fails fast, without waiting for publish_timeout")
        self.assertEqual(len(doc["error"]["unconfirmed"]), 1)

        # back: the publisher reconnects
        broker.start_app()
        deadline = time.time() + 40
        while True:
            mid = str(uuid.uuid4())
            st, doc = self.post(port, [message(mid)])
            if st == 202:
                break
            self.assertLess(time.time(), deadline, (st, doc))
            time.sleep(0.5)
        self.assertEqual(doc, {"ids": [mid]})


if __name__ == "__main__":
    unittest.main()

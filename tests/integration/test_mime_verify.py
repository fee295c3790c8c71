"""Independent verification of mime/ and mime/dkim.

tests/tools/mimetool builds messages from JSON exactly as the worker does
(msgjson_parse -> mime_build -> dkim_sign). Python's email package parses
each one back and the decoded parts are compared with the input. DKIM
signatures (RSA-2048 and Ed25519) are made with the local stack's keys
file ($MP_DKIM_KEYS_FILE, written by deploy/local/stack up) and verified
by python3-dkim against the public keys the stack's DNS server
($MP_DNS_SERVER, dnsmasq) serves as TXT records, queried over UDP with
dnspython. Messages are random but seeded, so a failure is reproducible
(the seed and the JSON are printed).

Needs the build directory (MAILPUMP_BUILD_DIR) and the local stack: fails
when the zone does not serve the keys. opendkim-testmsg is not a second
verifier here: it has no resolver option and uses glibc's resolver, which
only reads /etc/resolv.conf and only talks to port 53.
"""
import base64
import email
import email.policy
import json
import os
import random
import subprocess
import sys
import unittest

import dkim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

BUILD = os.environ.get("MAILPUMP_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build")
TOOL = os.path.join(BUILD, "tests", "mimetool")
NOW = 1700000000
SEED = int(os.environ.get("MIME_VERIFY_SEED", "20251123"))

WORDS = ["hello", "Grüße", "✓", "日本語", "🎉", "=?utf-8?q?x?=", "--=_mp_", ".", "..",
         "a\tb", "trailing ", "=", "_", "\"q\"", "\\", "%41", "'", ";", "café"]


def norm_nl(s):
    return s.replace("\r\n", "\n").replace("\r", "\n")


def rand_text(r, maxwords=60):
    out = []
    for _ in range(r.randrange(maxwords + 1)):
        k = r.random()
        if k < 0.08:
            out.append("\n")
        elif k < 0.10:
            out.append("\n." + r.choice(WORDS))
        elif k < 0.11:
            out.append("x" * r.randrange(990, 1300))  # longer than a line may be
        elif k < 0.12:
            out.append("\r\n")
        else:
            out.append(r.choice(WORDS))
        out.append(" " if r.random() < 0.7 else "")
    return "".join(out)


def rand_filename(r):
    parts = ["report", "Grüße", "日本語のファイル", " ", "a\"b", "it's", "x;y", "50%",
             "=?", "*", "\\", "long" * r.randrange(1, 30), "ß"]
    name = "".join(r.choice(parts) for _ in range(r.randrange(1, 5))).strip() or "f"
    name = name.encode("utf-8")[:240].decode("utf-8", "ignore").strip() or "f"
    return name + r.choice([".pdf", ".txt", ".bin", ".png", ""])


def rand_attachment(r, i):
    kind = r.randrange(5)
    if kind == 0:
        ctype, data = "application/octet-stream", bytes(r.randrange(256) for _ in range(r.randrange(0, 3000)))
    elif kind == 1:
        ctype, data = "text/plain; charset=utf-8", rand_text(r, 200).encode()
    elif kind == 2:
        ctype, data = "text/plain; charset=us-ascii", b"plain ascii line\r\n" * r.randrange(1, 20)
    elif kind == 3:
        ctype, data = "image/png", b"\x89PNG\r\n\x1a\n" + os.urandom(r.randrange(0, 5000))
    else:
        ctype, data = "application/json", json.dumps({"k": rand_text(r, 5)}).encode() + b"\r\n"
    att = {"filename": rand_filename(r), "content_type": ctype,
           "content_base64": base64.b64encode(data).decode()}
    if r.random() < 0.4:
        att["inline"] = True
        att["content_id"] = "part%d.%d@mailpump.test" % (i, r.randrange(1000))
    return att, data


def rand_message(r, n):
    m = {"id": "verify-%d" % n,
         "from": r.choice(["Alice <alice@test.example>", {"address": "alice@test.example",
                                                          "name": "Jörg Müller, Köln"}]),
         "to": ["bob@test.example", {"address": "carol@test.example", "name": "Carol \"C\" Q"}],
         "subject": rand_text(r, 12).replace("\r", "").replace("\n", "")}
    if r.random() < 0.8:
        m["text"] = rand_text(r)
    if r.random() < 0.5:
        m["html"] = "<p>" + rand_text(r) + "</p>"
    atts = [rand_attachment(r, i) for i in range(r.choice([0, 0, 1, 2, 4]))]
    if atts:
        m["attachments"] = [a for a, _ in atts]
    return m, [d for _, d in atts]


class MimeVerify(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.access(TOOL, os.X_OK):
            raise AssertionError("%s not built" % TOOL)
        env = mpstack.stack_env()
        cls.keys = env.get("MP_DKIM_KEYS_FILE", "")
        if not os.path.isfile(cls.keys):
            raise AssertionError("no DKIM keys file %r in the stack's env: run "
                                 "deploy/local/stack up" % cls.keys)
        host, port = env["MP_DNS_SERVER"].rsplit(":", 1)
        cls.dns_server = (host, int(port))
        cls.dns_queries = 0
        # domain selector algorithm key-file, paths relative to the keys file
        cls.stack_keys = []
        with open(cls.keys) as f:
            for line in f:
                fields = line.split()
                if fields and not fields[0].startswith("#"):
                    domain, sel, alg, pem = fields
                    pem = os.path.join(os.path.dirname(cls.keys), pem)
                    cls.stack_keys.append((domain, sel, alg, pem))
        if sorted(k[2] for k in cls.stack_keys) != ["ed25519-sha256", "rsa-sha256"]:
            raise AssertionError("%s: want one rsa-sha256 and one ed25519-sha256 key, got %r"
                                 % (cls.keys, cls.stack_keys))
        for domain, sel, alg, pem in cls.stack_keys:
            name = "%s._domainkey.%s." % (sel, domain)
            if not cls.query_txt(name.encode()):
                raise AssertionError("DNS server %s:%d serves no TXT record for %s (key %s "
                                     "of %s): run deploy/local/stack up"
                                     % (host, int(port), name, pem, cls.keys))

    @classmethod
    def query_txt(cls, name, timeout=5):
        """The stack zone's TXT record at name, counted (mpstack.zone_txt)."""
        cls.dns_queries += 1
        return mpstack.zone_txt(cls.dns_server, name, timeout)

    def dnsfunc(self, name, timeout=5):
        if not name.endswith(b"."):
            name += b"."
        return self.query_txt(name, timeout)

    def run_tool(self, msg, *args, expect_rc=0):
        p = subprocess.run([TOOL, "--now", str(NOW), *args], input=json.dumps(msg).encode(),
                           capture_output=True)
        self.assertEqual(p.returncode, expect_rc,
                         "mimetool exit %d: %s\ninput: %s" % (p.returncode, p.stderr.decode(),
                                                              json.dumps(msg)[:2000]))
        return p.stdout if expect_rc == 0 else p.stderr.decode()

    def check_wire_rules(self, raw):
        self.assertTrue(raw.endswith(b"\r\n"))
        for ln in raw.split(b"\r\n"):
            self.assertNotIn(b"\r", ln)
            self.assertNotIn(b"\n", ln)
            self.assertLessEqual(len(ln), 998)
        raw.decode("ascii")  # built messages are 7-bit throughout

    def check_parsed(self, msg, datas, raw):
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        for part in parsed.walk():
            self.assertEqual(part.defects, [], part.get_content_type())
        # leading blanks of an unstructured value are not kept by parsers
        self.assertEqual(str(parsed["Subject"]).lstrip(" \t"), msg["subject"].lstrip(" \t"))
        self.assertIsNone(parsed["Bcc"])
        self.assertEqual([a.addr_spec for a in parsed["To"].addresses],
                         ["bob@test.example", "carol@test.example"])
        self.assertEqual(parsed["To"].addresses[1].display_name, "Carol \"C\" Q")
        frm = msg["from"]
        if isinstance(frm, dict):
            self.assertEqual(parsed["From"].addresses[0].display_name, frm["name"])
        self.assertEqual(parsed["Message-ID"], "<%s@test.example>" % msg["id"])

        leaves = [p for p in parsed.walk() if not p.is_multipart()]
        atts = [p for p in leaves if p.get_content_disposition() in ("attachment", "inline")]
        bodies = [p for p in leaves if p.get_content_disposition() is None]
        want_atts = msg.get("attachments", [])
        self.assertEqual(len(atts), len(want_atts))
        # order: related (inline, with html) first, then mixed, each in input order
        has_html = bool(msg.get("html"))
        related = [(a, d) for a, d in zip(want_atts, datas) if a.get("inline") and has_html]
        mixed = [(a, d) for a, d in zip(want_atts, datas) if not (a.get("inline") and has_html)]
        for part, (a, data) in zip(atts, related + mixed):
            self.assertEqual(part.get_filename(), a["filename"])
            self.assertEqual(part.get_content_type(), a["content_type"].split(";")[0].lower())
            got = part.get_payload(decode=True)
            if a["content_type"].startswith("text/"):
                # text travels in canonical form: line breaks become CRLF
                self.assertEqual(norm_nl(got.decode()).rstrip("\n"),
                                 norm_nl(data.decode()).rstrip("\n"))
            else:
                self.assertEqual(got, data)
            if a.get("content_id"):
                self.assertEqual(part["Content-ID"], "<%s>" % a["content_id"])
            self.assertEqual(part.get_content_disposition(),
                             "inline" if a.get("inline") else "attachment")

        text, html = msg.get("text") or "", msg.get("html") or ""
        want_bodies = []
        if text:
            want_bodies.append(("text/plain", text))
        if html:
            want_bodies.append(("text/html", html))
        if not want_bodies and not want_atts:
            want_bodies.append(("text/plain", ""))
        self.assertEqual([p.get_content_type() for p in bodies], [t for t, _ in want_bodies])
        for part, (_, want) in zip(bodies, want_bodies):
            self.assertEqual(norm_nl(part.get_content()).rstrip("\n"), norm_nl(want).rstrip("\n"))

        # structure: mixed > related > alternative, only as needed
        types = [p.get_content_type() for p in parsed.walk() if p.is_multipart()]
        if mixed:
            self.assertEqual(types[0], "multipart/mixed")
        if related:
            self.assertIn("multipart/related", types)
        if text and html:
            self.assertIn("multipart/alternative", types)

    def test_random_messages_parse_back(self):
        r = random.Random(SEED)
        for n in range(150):
            msg, datas = rand_message(r, n)
            raw = self.run_tool(msg)
            with self.subTest(n=n, seed=SEED):
                self.check_wire_rules(raw)
                self.check_parsed(msg, datas, raw)

    def verify_all(self, raw, expect=True):
        d = dkim.DKIM(raw)
        sigs = [ln for ln in raw.split(b"\r\n") if ln.lower().startswith(b"dkim-signature:")]
        self.assertEqual(len(sigs), 2)
        algs = set()
        for i in range(len(sigs)):
            queries = self.dns_queries
            try:
                ok = d.verify(idx=i, dnsfunc=self.dnsfunc)
            except dkim.ValidationError:  # e.g. "body hash mismatch"
                ok = False
            self.assertEqual(ok, expect,
                             raw[:3000].decode("ascii", "replace"))
            if expect:
                # the key came from the zone, not from anywhere else
                self.assertEqual(self.dns_queries, queries + 1)
            algs.add(sigs[i].split(b"a=")[1].split(b";")[0])
        self.assertEqual(algs, {b"rsa-sha256", b"ed25519-sha256"})

    def test_zone_serves_the_stack_keys(self):
        # the published p= is the public half of the key mimetool signs with
        # (RFC 6376 3.6.1; RFC 8463 4: Ed25519 p= is the bare 32-byte key)
        for domain, sel, alg, pem in self.stack_keys:
            with self.subTest(selector=sel):
                der = subprocess.run(["openssl", "pkey", "-in", pem, "-pubout", "-outform", "DER"],
                                     check=True, capture_output=True).stdout
                k, p = (b"rsa", der) if alg == "rsa-sha256" else (b"ed25519", der[-32:])
                want = b"v=DKIM1; k=" + k + b"; p=" + base64.b64encode(p)
                got = self.query_txt(("%s._domainkey.%s." % (sel, domain)).encode())
                self.assertEqual(got, want, "the zone does not publish the key of %s" % pem)

    def test_dkim_signatures_verify(self):
        r = random.Random(SEED + 1)
        for n in range(40):
            msg, datas = rand_message(r, n)
            # what goes on the wire (dot-stuffed), unstuffed as a receiver
            # does (RFC 5321 4.5.2), must verify and parse back
            wire = self.run_tool(msg, "--dkim", self.keys, "--wire")
            with self.subTest(n=n, seed=SEED):
                self.assertTrue(wire.endswith(b"\r\n.\r\n"))
                lines = wire[:-3].split(b"\r\n")
                raw = b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)
                self.check_wire_rules(raw)
                self.verify_all(raw)
                self.check_parsed(msg, datas, raw)

    def test_dkim_detects_tampering(self):
        msg = {"from": "alice@test.example", "to": "bob@test.example", "subject": "Pay",
               "text": "Pay 10 EUR to   Bob.  \n\n\n"}
        raw = self.run_tool(msg, "--dkim", self.keys)
        self.verify_all(raw)
        # relaxed canonicalisation: whitespace changes in transit are fine
        self.verify_all(raw.replace(b"Subject: Pay", b"subject:    Pay").replace(
            b"to   Bob.", b"to Bob.\t"))
        self.verify_all(raw.replace(b"10 EUR", b"90 EUR"), expect=False)
        self.verify_all(raw.replace(b"Subject: Pay", b"Subject: Pay now"), expect=False)
        # a second From added above the signed one breaks it (oversigning)
        self.verify_all(b"From: mallory@evil.example\r\n" + raw, expect=False)

    def test_dkim_subdomain_and_unknown_domain(self):
        msg = {"from": "news@mail.test.example", "to": "bob@test.example", "text": "x"}
        raw = self.run_tool(msg, "--dkim", self.keys)
        self.assertIn(b"d=test.example;", raw)
        self.verify_all(raw)
        err = self.run_tool({"from": "a@other.example", "to": "b@test.example"},
                            "--dkim", self.keys, expect_rc=4)
        self.assertIn("no DKIM key for domain \"other.example\"", err)

    def test_raw_message(self):
        original = ("From: App <app@test.example>\nTo: bob@test.example\n"
                    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nMIME-Version: 1.0\n"
                    "Content-Type: text/plain; charset=utf-8\n\n.line with dot\nbare\rcr\n")
        msg = {"from": "app@test.example", "to": ["bob@test.example"],
               "raw": base64.b64encode(original.encode()).decode()}
        raw = self.run_tool(msg, "--dkim", self.keys)
        self.verify_all(raw)
        body = raw.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(body, b".line with dot\r\nbare\r\ncr\r\n")
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        self.assertEqual(str(parsed["Subject"]), "Grüße")
        # refused with a reason: a line over 998 octets, no From
        long = "From: a@test.example\n\n" + "x" * 999 + "\n"
        err = self.run_tool({"from": "a@test.example", "to": "b@test.example",
                             "raw": base64.b64encode(long.encode()).decode()}, expect_rc=3)
        self.assertIn("raw message line 3 is 999 octets long", err)
        err = self.run_tool({"from": "a@test.example", "to": "b@test.example",
                             "raw": base64.b64encode(b"Subject: x\n\nb\n").decode()}, expect_rc=3)
        self.assertIn("no From header field", err)

    def test_refusals(self):
        base = {"from": "a@test.example", "to": "b@test.example"}
        err = self.run_tool(dict(base, attachments=[{"filename": "a\r\nBcc: x@y",
                                                     "content_base64": ""}]), expect_rc=2)
        self.assertIn("filename contains a control character", err)
        err = self.run_tool(dict(base, attachments=[{"filename": "a",
                                                     "content_base64": "not base64!"}]),
                            expect_rc=2)
        self.assertIn("is not valid base64", err)
        big = {"filename": "big.bin", "content_base64": base64.b64encode(b"\0" * 300000).decode()}
        err = self.run_tool(dict(base, attachments=[big]), "--max-size", "200000", expect_rc=3)
        self.assertIn("limit is 200000", err)


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""kill -9 under load, checked by an independent parse.

mailpumpd (2 workers, the stack's Redis ledger and Dovecot Sent copies for
alice@test.example) delivers 1,000+ messages to a tests/tools/smtpsink
standing in for the test.example MX hosts. The messages are published
(confirmed) over 15 s while it delivers, and it is killed with SIGKILL at
random moments at least 5 times, each time restarted on the same queues.
Half of the messages have no "id", some recipients have quoted local
parts with commas, and a few recipients are deferred once by the sink so
that retries are in flight when the daemon dies. The sink holds its reply
to the final dot for a while, so kills land in the window between the dot
and the reply (the one that makes possible duplicates).

What must hold afterwards, judged from what the receivers hold (the
sink's maildir and alice's Sent folder, parsed with Python's email and
imaplib modules, messages identified by a token of ours in their text,
never by mailpump's ids or logs):

1. every (token, recipient) arrived at least once;
2. every (token, recipient) that arrived more than once is flagged:
   one of its final events says possible_duplicate;
3. every recipient has a final event (delivered/bounced), none ends with
   only deferred, none bounced (the sink accepts everyone in the end);
4. the Sent folder holds each message exactly once;
and one message, one id: the copies of a token carry one Message-ID.

Needs the local stack (deploy/local/stack up); fails loudly without it.
"""
import collections
import email
import email.policy
import hashlib
import imaplib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402
from mpstack import redis_cli  # noqa: E402
import pika  # noqa: E402

SENDER = "alice@test.example"
COUNT = 1000
MIN_KILLS = 5
MAX_KILLS = 8
DEFERRED_RCPTS = 40     # distinct defer-* recipients; the sink defers 40 RCPTs once each
# the sink stores at the dot and answers this much later (MP_CHAOS_DOT_DELAY_MS
# overrides it, for measuring the part of the duplicates the engine decides)
DOT_DELAY_MS = int(os.environ.get("MP_CHAOS_DOT_DELAY_MS", "300"))
FINISH_TIMEOUT = 150    # seconds for the last daemon to finish after the last kill
PUBLISH_SECONDS = 15    # the messages are published over this long, while the kills go on


def pump(tap, seconds):
    """Read events into tap.events for `seconds`, however many arrive
    (EventTap.drain returns only after a quiet spell)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        method, _, body = tap.ch.basic_get(tap.queue, auto_ack=True)
        if method is None:
            time.sleep(0.02)
            continue
        ev = json.loads(body)
        ev["_routing_key"] = method.routing_key
        tap.events.append(ev)


def maildir_ts(name):
    """Wall-clock time of a sink maildir file from its name (sec.Musec...)."""
    m = re.match(r"(\d+)\.M(\d+)P", name)
    return int(m.group(1)) + int(m.group(2)) / 1e6 if m else 0.0


def text_of(msg):
    """Decoded text of every non-multipart part of an email.message."""
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload is not None:
            out.append(payload.decode("utf-8", "replace"))
    return "\n".join(out)


def message_id_of(msg):
    """The id inside <id@test.example> of a Message-ID header, or None."""
    v = msg.get("Message-ID")
    if v is None:
        return None
    m = re.fullmatch(r"\s*<([^@>]+)@([^>]+)>\s*", str(v))
    return m.group(1) if m else None


class Chaos(unittest.TestCase):
    def test_kill9_under_load_loses_nothing_flags_every_duplicate(self):
        t0 = time.time()
        env = mpstack.stack_env()
        tag = os.urandom(4).hex()
        rng = random.Random()
        seed = rng.randrange(1 << 30)
        rng.seed(seed)
        tok_re = re.compile(r"chaos-%s-\d{5}-[0-9a-f]{6}" % tag)

        sink = mpstack.Sink(addr="127.0.0.2", rules=[
            f"rcpt:defer-*-{tag}@test.example#{DEFERRED_RCPTS}=451 4.2.0 later",
            *([f"delay:DOT={DOT_DELAY_MS}"] if DOT_DELAY_MS else [])])
        fast = {}
        for p in ("P0", "P1", "P2"):
            fast.update({f"MAILPUMP_RETRY_{p}_BASE": "300ms", f"MAILPUMP_RETRY_{p}_MAX_ATTEMPTS": "50",
                         f"MAILPUMP_RETRY_{p}_FAST_BASE": "100ms"})
        extra = {"MAILPUMP_SMTP_PORT": str(sink.port), "MAILPUMP_SMTP_TLS": "none",
                 "MAILPUMP_RETRY_LEVELS": "300ms,1s",
                 "MAILPUMP_AMQP_PREFETCH": "100", **fast}
        daemons = [mpstack.Daemon(env, workers=2, extra_env=extra)]
        try:
            tap = mpstack.EventTap(env, daemons[0].exchange)
        except Exception:
            sink.stop()
            raise
        passed = False
        sent_uids = []
        bodies = []
        try:
            # ---- the messages ---------------------------------------------------
            plan = {}  # token -> {"id": id or None, "rcpts": [...]}
            for i in range(COUNT):
                token = f"chaos-{tag}-{i:05d}-{rng.randrange(1 << 24):06x}"
                rcpts = set()
                for _ in range(rng.randint(1, 3)):
                    kind = rng.random()
                    if kind < 0.08:
                        rcpts.add(f"defer-{rng.randrange(DEFERRED_RCPTS)}-{tag}@test.example")
                    elif kind < 0.30:
                        rcpts.add(f'"x,y-{rng.randrange(60)}-{tag}"@test.example')
                    else:
                        rcpts.add(f"r{rng.randrange(200)}-{tag}@test.example")
                plan[token] = {"id": f"chaos-{tag}-{i:05d}" if i % 2 else None,
                               "rcpts": sorted(rcpts)}
            messages = []
            for token, p in plan.items():
                msg = {"from": SENDER, "to": p["rcpts"], "subject": f"chaos {token}",
                       "text": f"chaos test message\ntoken: {token}\n"}
                if p["id"]:
                    msg["id"] = p["id"]
                messages.append(json.dumps(msg).encode())
            bodies.extend(messages)
            published = []
            publish_error = []

            def publish():
                """Publish every message, confirmed, spread over PUBLISH_SECONDS
                while the daemon delivers and is killed."""
                try:
                    conn, ch = mpstack.amqp_channel(env)
                    try:
                        ch.confirm_delivery()
                        start = time.time()
                        for i, body in enumerate(messages):
                            lag = start + PUBLISH_SECONDS * i / len(messages) - time.time()
                            if lag > 0:
                                time.sleep(lag)
                            ch.basic_publish("", daemons[0].queue, body,
                                             pika.BasicProperties(delivery_mode=2), mandatory=True)
                            published.append(time.time())
                    finally:
                        conn.close()
                except Exception as exc:  # reported by the main thread
                    publish_error.append(repr(exc))

            conn, ch = mpstack.amqp_channel(env)
            try:
                ch.queue_declare(daemons[0].queue, durable=True, arguments={"x-max-priority": 10})
            finally:
                conn.close()
            pairs = {(t, r.lower()) for t, p in plan.items() for r in p["rcpts"]}
            print(f"\nchaos {tag} (seed {seed}): published {COUNT} messages "
                  f"({sum(1 for p in plan.values() if not p['id'])} without id), "
                  f"{len(pairs)} (message, recipient) pairs", file=sys.stderr)

            # ---- kill -9 at random moments, restart on the same queues -----------
            daemons[0].start()
            publisher = threading.Thread(target=publish, daemon=True)
            publisher.start()
            kill_times = []
            kills_target = rng.randint(MIN_KILLS, MAX_KILLS)

            def work_left(d):
                if d.metric("mailpump_messages_inflight") > 0:
                    return True
                c2, ch2 = mpstack.amqp_channel(env)
                try:
                    for q in [d.queue, *d.retry_queues()]:
                        if ch2.queue_declare(q, passive=True).method.message_count:
                            return True
                finally:
                    c2.close()
                return False

            while len(kill_times) < kills_target:
                d = daemons[-1]
                pump(tap, rng.uniform(0.3, 2.5))
                if not publisher.is_alive() and not work_left(d):
                    break
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait(10)
                kill_times.append(time.time())
                nd = mpstack.Daemon(env, workers=2, extra_env=extra, queues_of=d)
                daemons.append(nd)
                nd.start()
            self.assertGreaterEqual(len(kill_times), MIN_KILLS,
                                    f"the work was done after {len(kill_times)} kills: make it longer")

            # ---- let the last one finish (bounded), stop it cleanly ---------------
            publisher.join(60)
            self.assertFalse(publisher.is_alive(), "the publisher is stuck")
            self.assertEqual(publish_error, [], "publishing failed")
            self.assertEqual(len(published), COUNT)
            d = daemons[-1]
            deadline = time.time() + FINISH_TIMEOUT
            idle_since = None
            while time.time() < deadline:
                pump(tap, 0.2)
                if work_left(d):
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.time()
                elif time.time() - idle_since > 2.0:
                    break
            finished = idle_since is not None and time.time() - idle_since > 2.0
            tap.drain(quiet=1.0)
            counters = {m: d.metric(m) for m in ("mailpump_recipients_possible_duplicate_total",
                                                  "mailpump_recipients_skipped_already_delivered_total",
                                                  "mailpump_imap_copies_found_total")}
            rc = d.stop()
            tap.drain(quiet=0.5)
            self.assertTrue(finished, f"work left after {FINISH_TIMEOUT} s; logs: "
                                      f"{[x.log_path for x in daemons]}")
            self.assertEqual(rc, 0, d.log()[-3000:])
            dead = [e for e in tap.events if e["event"] == "dead"]
            self.assertEqual(dead, [], "dead-lettered messages")

            # ---- the independent parse: the sink's maildir -------------------------
            copies = collections.defaultdict(list)  # (token, rcpt) -> [arrival time]
            token_mids = collections.defaultdict(set)
            strays = []
            newdir = os.path.join(sink.maildir, "new")
            for name in sorted(os.listdir(newdir)):
                with open(os.path.join(newdir, name), "rb") as f:
                    msg = email.message_from_bytes(f.read(), policy=email.policy.compat32)
                toks = set(tok_re.findall(text_of(msg)))
                if len(toks) != 1 or next(iter(toks)) not in plan:
                    strays.append((name, sorted(toks)))
                    continue
                token = toks.pop()
                token_mids[token].add(message_id_of(msg))
                for v in msg.get_all("X-Sink-Rcpt-To", []):
                    rcpt = str(v).strip()
                    if rcpt.startswith("<") and rcpt.endswith(">"):
                        rcpt = rcpt[1:-1]
                    copies[(token, rcpt.lower())].append(maildir_ts(name))
            self.assertEqual(strays, [], "received messages without exactly one token of ours")
            unexpected = sorted(set(copies) - pairs)
            self.assertEqual(unexpected, [], "copies for recipients a message does not name")

            # ---- the Sent folder ---------------------------------------------------
            im = imaplib.IMAP4_SSL(env["MP_IMAP_HOST"], int(env["MP_IMAPS_PORT"]),
                                   ssl_context=mpstack.imap_ssl_context(env))
            sent = collections.Counter()
            sent_mids = collections.defaultdict(set)
            try:
                im.login(SENDER, env["MP_IMAP_PASSWORD"])
                typ, data = im.select("Sent", readonly=True)
                self.assertEqual(typ, "OK", data)
                typ, data = im.uid("SEARCH", "BODY", f"chaos-{tag}-")
                self.assertEqual(typ, "OK", data)
                sent_uids = data[0].split()
                for i in range(0, len(sent_uids), 200):
                    chunk = b",".join(sent_uids[i:i + 200]).decode()
                    typ, data = im.uid("FETCH", chunk, "(BODY.PEEK[])")
                    self.assertEqual(typ, "OK", data)
                    for item in data:
                        if not isinstance(item, tuple):
                            continue
                        msg = email.message_from_bytes(item[1], policy=email.policy.compat32)
                        toks = set(tok_re.findall(text_of(msg)))
                        for t in toks:
                            sent[t] += 1
                            sent_mids[t].add(message_id_of(msg))
            finally:
                im.logout()

            # ---- the events --------------------------------------------------------
            by_key = collections.defaultdict(list)  # (message_id, rcpt) -> [event]
            for e in tap.events:
                if "recipient" in e:
                    by_key[(e["message_id"], e["recipient"].lower())].append(e)

            # one message, one id
            split_ids = {t: sorted(m) for t, m in token_mids.items() if len(m) != 1}
            for t, m in sent_mids.items():
                if t in token_mids and not m <= token_mids[t]:
                    split_ids[t] = sorted(token_mids[t] | m)

            # 1. nothing missing
            missing = sorted(pairs - set(copies))
            # 2. every duplicate flagged
            dups = {k: v for k, v in copies.items() if len(v) > 1}
            unflagged = []
            flagged_dups = 0
            for (token, rcpt) in dups:
                evs = [e for mid in token_mids[token] for e in by_key.get((mid, rcpt), [])
                       if e["event"] in ("delivered", "bounced")]
                if any(e.get("possible_duplicate") for e in evs):
                    flagged_dups += 1
                else:
                    unflagged.append(((token, rcpt), len(dups[(token, rcpt)]), sorted(token_mids[token]),
                                      [(e["event"], e["attempt"], e.get("reason"),
                                        e.get("already_delivered"), e.get("possible_duplicate"))
                                       for mid in sorted(token_mids[token])
                                       for e in by_key.get((mid, rcpt), [])]))
            # 3. a final event for every recipient
            no_final, only_deferred, bounced = [], [], []
            multi_delivered = 0
            already = 0
            flagged_no_dup = 0
            for (token, rcpt) in sorted(pairs):
                evs = [e for mid in token_mids.get(token, ()) for e in by_key.get((mid, rcpt), [])]
                finals = [e for e in evs if e["event"] in ("delivered", "bounced")]
                if not finals:
                    (only_deferred if evs else no_final).append((token, rcpt, sorted(token_mids.get(token, ()))))
                bounced += [(token, rcpt, e.get("error") or e.get("smtp")) for e in finals
                            if e["event"] == "bounced"]
                delivered = [e for e in finals if e["event"] == "delivered"]
                if len(delivered) > 1:
                    multi_delivered += 1
                already += sum(1 for e in delivered if e.get("already_delivered"))
                if any(e.get("possible_duplicate") for e in finals) and len(copies.get((token, rcpt), ())) < 2:
                    flagged_no_dup += 1
            # 4. the Sent folder: each message once
            sent_missing = sorted(t for t in plan if sent[t] == 0)
            sent_twice = {t: n for t, n in sent.items() if n > 1}
            appended_events = sum(1 for e in tap.events if e["event"] == "appended")
            append_failed = sum(1 for e in tap.events if e["event"] == "append_failed")
            deferred_events = sum(1 for e in tap.events if e["event"] == "deferred")

            # ---- the figures -------------------------------------------------------
            per_kill = collections.Counter()
            for k, times in dups.items():
                second = sorted(times)[1]
                before = [i for i, kt in enumerate(kill_times) if kt <= second]
                per_kill[before[-1] + 1 if before else 0] += 1
            total_copies = sum(len(v) for v in copies.values())
            print(f"chaos {tag}: {COUNT} messages, {len(pairs)} pairs, {len(kill_times)} kills at "
                  f"{[round(k - t0, 1) for k in kill_times]} s; {total_copies} copies received, "
                  f"{len(pairs) - len(missing)} of {len(pairs)} pairs arrived", file=sys.stderr)
            print(f"chaos {tag}: duplicates {len(dups)} (extra copies "
                  f"{sum(len(v) - 1 for v in dups.values())}); per kill "
                  f"{[per_kill.get(i + 1, 0) for i in range(len(kill_times))]}"
                  f"{' + %d before any kill' % per_kill[0] if per_kill.get(0) else ''}; "
                  f"flagged {flagged_dups}, unflagged {len(unflagged)}; flagged without a second copy "
                  f"{flagged_no_dup}", file=sys.stderr)
            print(f"chaos {tag}: recipients with more than one delivered event {multi_delivered}; "
                  f"already_delivered events {already}; deferred events {deferred_events}; bounced "
                  f"{len(bounced)}; no final event {len(no_final)}, only deferred {len(only_deferred)}",
                  file=sys.stderr)
            print(f"chaos {tag}: Sent copies {sum(sent.values())} for {len(sent)} of {COUNT} messages, "
                  f"stored twice {len(sent_twice)}, missing {len(sent_missing)}; appended events "
                  f"{appended_events}, append_failed {append_failed}; tokens with more than one "
                  f"Message-ID {len(split_ids)}; daemon counters (last run) {counters}; run time "
                  f"{time.time() - t0:.1f} s", file=sys.stderr)

            # every guarantee is checked; all that fail are reported together
            def idless(token):
                return "without id" if plan[token]["id"] is None else "with id"
            problems = []
            if missing:
                problems.append(f"1. {len(missing)} (token, recipient) pairs never arrived: {missing[:10]}")
            if unflagged:
                problems.append(f"2. {len(unflagged)} pairs received more than once without a "
                                f"possible_duplicate event ((token, rcpt), copies, ids, "
                                f"its events as (event, attempt, reason, already_delivered, "
                                f"possible_duplicate)): "
                                + "; ".join(f"{u} [{idless(u[0][0])}]" for u in unflagged[:10]))
            if no_final:
                problems.append(f"3. {len(no_final)} pairs without any event: {no_final[:10]}")
            if only_deferred:
                problems.append(f"3. {len(only_deferred)} pairs that end deferred: {only_deferred[:10]}")
            if bounced:
                problems.append(f"3. {len(bounced)} bounced recipients (the sink accepts everyone): "
                                f"{bounced[:10]}")
            if sent_twice:
                problems.append(f"4. {len(sent_twice)} messages stored more than once in the Sent folder "
                                f"(token: copies, ids): " + "; ".join(
                                    f"{t}: {n}, {sorted(sent_mids[t])} [{idless(t)}]"
                                    for t, n in sorted(sent_twice.items())[:10]))
            if sent_missing:
                problems.append(f"4. {len(sent_missing)} messages without a Sent copy: {sent_missing[:10]}")
            if split_ids:
                problems.append(f"one id: {len(split_ids)} messages whose copies carry more than one "
                                f"Message-ID: {sorted(split_ids.items())[:10]}")
            if problems:
                keep = tempfile.mkdtemp(prefix=f"mp-chaos-{tag}-")
                shutil.move(sink.maildir, os.path.join(keep, "sink-maildir"))
                problems.append(f"evidence: the sink's maildir in {keep}; daemon logs in order "
                                f"{[x.log_path for x in daemons]}")
            for line in problems:
                print(f"chaos {tag}: FAILED {line}", file=sys.stderr)
            self.assertEqual(problems, [], "\n".join(problems))
            passed = True
        finally:
            for d in daemons:
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait(10)
            try:
                daemons[0].delete_topology()
            except Exception as exc:  # the last daemon's stop() already deleted it
                print(f"chaos {tag}: delete topology: {exc}", file=sys.stderr)
            tap.close()
            sink.stop()
            self.cleanup_sent(env, tag)
            self.cleanup_redis(env, tag, bodies, tap.events)
            if passed:
                for d in daemons:
                    try:
                        os.unlink(d.log_path)
                    except OSError:
                        pass
            else:
                print(f"chaos {tag}: logs kept: {[d.log_path for d in daemons]}", file=sys.stderr)

    def cleanup_sent(self, env, tag):
        """Remove this run's copies from alice's Sent folder."""
        im = imaplib.IMAP4_SSL(env["MP_IMAP_HOST"], int(env["MP_IMAPS_PORT"]),
                               ssl_context=mpstack.imap_ssl_context(env))
        try:
            im.login(SENDER, env["MP_IMAP_PASSWORD"])
            im.select("Sent")
            typ, data = im.uid("SEARCH", "BODY", f"chaos-{tag}-")
            uids = data[0].split() if typ == "OK" else []
            for i in range(0, len(uids), 500):
                chunk = b",".join(uids[i:i + 500]).decode()
                im.uid("STORE", chunk, "+FLAGS.SILENT", r"(\Deleted)")
                im.uid("EXPUNGE", chunk)
        finally:
            im.logout()

    def cleanup_redis(self, env, tag, bodies, events):
        """Delete this run's ledger records, redelivery counts and id claims."""
        names = {e["message_id"] for e in events if e.get("message_id")}
        names |= {hashlib.sha256(b).hexdigest() for b in bodies}
        keys = [k for k in redis_cli(env, "--scan", "--pattern", "mp:*").split()
                if k.count(":") >= 2 and k.split(":", 3)[2] in names and not k.startswith("mp:dns:")]
        if not keys:
            return
        script = "".join('DEL "%s"\n' % k.replace("\\", "\\\\").replace('"', '\\"') for k in keys)
        redis_cli(env, stdin=script)


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""Helpers shared by the Python integration tests: the local stack's
addresses, a mailpumpd process with its own queues, and event capture.

Every test talks to the real services started by `deploy/local/stack up`.
When the stack is not up the helpers raise, so the test fails loudly.
"""
import atexit
import http.client
import json
import os
import random
import re
import signal
import socket
import ssl
import shutil
import subprocess
import tempfile
import time
import uuid

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pika

SOURCE_DIR = os.environ.get("MAILPUMP_SOURCE_DIR",
                            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BUILD_DIR = os.environ.get("MAILPUMP_BUILD_DIR", os.path.join(SOURCE_DIR, "build"))
STACK_DIR = os.environ.get("MP_STACK_DIR", "/tmp/mpstack")


def stack_env():
    path = os.path.join(STACK_DIR, "env")
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: the local stack is not up "
                           f"(run deploy/local/stack up)")
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            k, v = line.split("=", 1)
            env[k] = v.strip('"')
    return env


# Every process a test starts through these helpers; whatever a failing
# test leaves running is killed when the test program exits.
_STARTED = []


@atexit.register
def _kill_leftovers():
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def parse_duration(text):
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)?\s*", text)
    n, unit = int(m.group(1)), m.group(2) or "ms"
    return n * {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}[unit]


def format_duration(ms):
    for unit, mult in (("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms >= mult and ms % mult == 0:
            return f"{ms // mult}{unit}"
    return f"{ms}ms"


_handed_out = set()


def free_port():
    """A loopback port nothing listens on, for a server a test starts.

    Chosen below the kernel's ephemeral range (32768 and up by default): a
    port the kernel handed out for bind(0) is just as likely to be taken
    next by an outgoing connection (a daemon's Redis client, say) before the
    server binds it, and the server then fails with "address in use". Ports
    below that range are only ever taken by listeners, which this checks."""
    lo, hi = 20000, 32000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph = int(f.read().split()[0])
        hi = min(hi, eph - 1)
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(lo, hi)
        if port in _handed_out or port == 25673:  # the stack's broker distribution port
            continue
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port between %d and %d" % (lo, hi))


def redis_cli(env, *args, stdin=None, timeout=60):
    """redis-cli against the stack's Redis: its output; a failure fails the test."""
    r = subprocess.run(["redis-cli", "-h", env["MP_REDIS_HOST"], "-p", str(env["MP_REDIS_PORT"]), *args],
                       input=stdin, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"redis-cli {args}: {r.stderr}")
    return r.stdout


def amqp_channel(env):
    params = pika.ConnectionParameters(
        host=env["MP_AMQP_HOST"], port=int(env["MP_AMQP_PORT"]),
        credentials=pika.PlainCredentials(env["MP_AMQP_USER"], env["MP_AMQP_PASSWORD"]),
        blocked_connection_timeout=10, socket_timeout=10)
    conn = pika.BlockingConnection(params)
    return conn, conn.channel()


class Daemon:
    """mailpumpd on the stack's config with private queue names, so tests
    never see each other's messages."""

    def __init__(self, env, workers=2, extra_env=None, queues_of=None):
        """env: stack_env() or a copy with other MP_AMQP_* (a private
        broker). queues_of: another Daemon whose queues, exchange and retry
        levels this one takes over (a restart after kill or SIGTERM)."""
        self.env = env
        tag = uuid.uuid4().hex[:8]
        self.queue = f"itest.{tag}.outbound"
        self.dead_queue = f"itest.{tag}.dead"
        self.exchange = f"itest.{tag}.events"
        retry_prefix = f"itest.{tag}.retry"
        if queues_of is not None:
            self.queue, self.dead_queue = queues_of.queue, queues_of.dead_queue
            self.exchange = queues_of.exchange
            retry_prefix = queues_of.proc_env["MAILPUMP_RETRY_QUEUE_PREFIX"]
        self.metrics_port = free_port()
        self.log_path = os.path.join(STACK_DIR, f"mailpumpd-{tag}.log")
        self.proc_env = dict(os.environ)
        self.proc_env.update({
            "MAILPUMP_AMQP_HOST": env["MP_AMQP_HOST"],
            "MAILPUMP_AMQP_PORT": str(env["MP_AMQP_PORT"]),
            "MAILPUMP_AMQP_QUEUE": self.queue,
            "MAILPUMP_AMQP_DEAD_QUEUE": self.dead_queue,
            "MAILPUMP_AMQP_EVENTS_EXCHANGE": self.exchange,
            "MAILPUMP_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "MAILPUMP_WORKER_COUNT": str(workers),
            "MAILPUMP_RETRY_QUEUE_PREFIX": retry_prefix,
            # the suppression lists live in the shared Redis: a bounce to
            # reject@ would put it on the global list for every later test;
            # test_suppress.py turns them on with lists of its own
            "MAILPUMP_SUPPRESSION_ENABLED": "0",
        })
        if queues_of is not None and "MAILPUMP_RETRY_LEVELS" in queues_of.proc_env:
            self.proc_env["MAILPUMP_RETRY_LEVELS"] = queues_of.proc_env["MAILPUMP_RETRY_LEVELS"]
        if extra_env:
            self.proc_env.update(extra_env)
        self.proc = None
        self.events = []

    def start(self):
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [os.path.join(BUILD_DIR, "mailpumpd"), "--config", self.env["MP_MAILPUMPD_CONFIG"]],
            env=self.proc_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        _STARTED.append(self.proc)
        log.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailpumpd exited with {self.proc.returncode}: {self.log()}")
            try:
                status, _ = self.http("/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("mailpumpd not ready after 30 s: " + self.log())

    def http(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        return r.status, body

    def metric(self, name):
        _, body = self.http("/metrics")
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def retry_queues(self):
        """Names of the delay queues the daemon declares ([retry] levels)."""
        levels = self.proc_env.get("MAILPUMP_RETRY_LEVELS",
                                   "30s,1m,2m,5m,10m,20m,40m,1h,2h,4h,8h,16h")
        prefix = self.proc_env["MAILPUMP_RETRY_QUEUE_PREFIX"]
        return [f"{prefix}.{format_duration(parse_duration(t))}" for t in levels.split(",")]

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout=30):
        """SIGTERM, wait, then delete this daemon's private queues."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else None
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        finally:
            self.delete_topology()

    def delete_topology(self):
        conn, ch = amqp_channel(self.env)
        try:
            ch.queue_delete(self.queue)
            ch.queue_delete(self.dead_queue)
            for q in self.retry_queues():
                ch.queue_delete(q)
            ch.exchange_delete(self.exchange)
        finally:
            conn.close()

    def cli(self, *args, stdin=None):
        env = dict(self.proc_env)
        env.update({
            "MAILPUMP_AMQP_HOST": self.env["MP_AMQP_HOST"],
            "MAILPUMP_AMQP_PORT": self.env["MP_AMQP_PORT"],
        })
        return subprocess.run([os.path.join(BUILD_DIR, "mailpump"), *args], env=env,
                              input=stdin, capture_output=True, text=True, timeout=60)


def started_daemon(test, env, workers=1, extra_env=None):
    """A Daemon started for unittest case `test`, with an EventTap on its
    events exchange declared before it runs (no event can be missed).
    At cleanup the tap closes and the daemon is stopped, and must exit 0
    (its log's tail is the failure message)."""
    d = Daemon(env, workers=workers, extra_env=extra_env)
    tap = EventTap(env, d.exchange)
    test.addCleanup(tap.close)
    try:
        d.start()
    except Exception:
        d.stop()
        raise

    def stop():
        if d.proc is not None and d.proc.poll() is None:
            test.assertEqual(d.stop(), 0, d.log()[-3000:])
    test.addCleanup(stop)
    return d, tap


class EventTap:
    """A private queue bound to the events exchange, declared before any
    message is enqueued so no event can be missed."""

    def __init__(self, env, exchange):
        self.conn, self.ch = amqp_channel(env)
        self.ch.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
        q = self.ch.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.queue = q.method.queue
        self.ch.queue_bind(queue=self.queue, exchange=exchange, routing_key="#")
        self.events = []

    def wait(self, pred, count, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = [e for e in self.events if pred(e)]
            if len(got) >= count:
                return got
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            ev = json.loads(body)
            ev["_routing_key"] = method.routing_key
            self.events.append(ev)
        got = [e for e in self.events if pred(e)]
        raise AssertionError(f"expected {count} events, got {len(got)} within {timeout}s: "
                             f"{json.dumps(self.events, indent=1)}")

    def drain(self, quiet=0.3):
        """Read every event available until none arrives for `quiet` s."""
        last = time.time()
        while time.time() - last < quiet:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                time.sleep(0.02)
                continue
            ev = json.loads(body)
            ev["_routing_key"] = method.routing_key
            self.events.append(ev)
            last = time.time()
        return self.events

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


def find_in_maildir(maildir, needle, timeout=30):
    """Path of the first message file under maildir/new containing needle."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for sub in ("new", "cur"):
            d = os.path.join(maildir, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                p = os.path.join(d, name)
                try:
                    with open(p, "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                if needle.encode() in data:
                    return p, data
        time.sleep(0.1)
    return None, None


def zone_txt(server, name, timeout=5):
    """The TXT record at name (bytes) as the stack's DNS server (host, port)
    serves it, its character-strings joined (RFC 6376 3.6.2.2); None when
    the name or the record does not exist. Anything else (timeout,
    SERVFAIL, a non-authoritative answer, several records) raises."""
    qname = dns.name.from_text(name.decode("ascii"))
    q = dns.message.make_query(qname, dns.rdatatype.TXT)
    host, port = server
    r, _ = dns.query.udp_with_fallback(q, host, port=port, timeout=timeout)
    if r.rcode() == dns.rcode.NXDOMAIN:
        return None
    if r.rcode() != dns.rcode.NOERROR:
        raise AssertionError("%s:%d answered %s for %s TXT"
                             % (host, port, dns.rcode.to_text(r.rcode()), qname))
    if not r.flags & dns.flags.AA:
        raise AssertionError("%s:%d is not authoritative for %s" % (host, port, qname))
    rrset = r.get_rrset(r.answer, qname, dns.rdataclass.IN, dns.rdatatype.TXT)
    if rrset is None:
        return None
    if len(rrset) != 1:
        raise AssertionError("%s: %d TXT records, want one: %s" % (qname, len(rrset), rrset))
    return b"".join(list(rrset)[0].strings)


def zone_dnsfunc(env):
    """A python3-dkim dnsfunc answering from the stack's zone."""
    host, port = env["MP_DNS_SERVER"].rsplit(":", 1)

    def dnsfunc(name, timeout=5):
        return zone_txt((host, int(port)), name if name.endswith(b".") else name + b".", timeout)
    return dnsfunc


def imap_ssl_context(env):
    ctx = ssl.create_default_context(cafile=env["MP_CA_FILE"])
    return ctx


class Sink:
    """tests/tools/smtpsink on a loopback address, with fault rules."""

    def __init__(self, addr="127.0.0.2", rules=(), extra=()):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mp-sink-")
        self.stats = os.path.join(self.dir, "stats.json")
        self.maildir = os.path.join(self.dir, "mail")
        args = [os.path.join(BUILD_DIR, "tests", "smtpsink"), "--listen", f"{addr}:{self.port}",
                "--stats-file", self.stats, "--maildir", self.maildir, "--quiet", *extra]
        for r in rules:
            args += ["--rule", r]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _STARTED.append(self.proc)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpsink exited with {self.proc.returncode}")
            try:
                socket.create_connection((addr, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtpsink did not start listening")

    def messages(self):
        """Bytes of every kept message."""
        out = []
        d = os.path.join(self.maildir, "new")
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            with open(os.path.join(d, name), "rb") as f:
                out.append(f.read())
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- transcript and counters (used by test_engine_sink.py) --------------

    def transcript(self):
        """Lines of the --log FILE transcript, when the sink was started
        with extra=["--log", FILE]."""
        args = list(self.proc.args)
        path = args[args.index("--log") + 1]
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [line.rstrip("\n") for line in f]

    def read_stats(self, timeout=5):
        """The counters as of now: SIGUSR1 makes the sink rewrite the file."""
        try:
            os.unlink(self.stats)
        except FileNotFoundError:
            pass
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with open(self.stats) as f:
                    return json.load(f)
            except (FileNotFoundError, ValueError):
                time.sleep(0.02)
        raise AssertionError("smtpsink did not rewrite its stats file after SIGUSR1")

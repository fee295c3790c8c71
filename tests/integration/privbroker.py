"""A private RabbitMQ node for tests that must stop or restart the broker
without touching the shared stack's one.

It is started the way deploy/local/stack starts the shared node (see
deploy/local/README.md): /usr/lib/rabbitmq/bin/rabbitmq-server run
directly, with every path under a temporary directory, a unique node name,
and the AMQP listener, the Erlang distribution port and epmd on free
loopback ports. No plugins, so it boots in a few seconds.

    with PrivateBroker() as b:      # started, awaited
        env = b.stack_env(mpstack.stack_env())   # MP_AMQP_* point here
        b.restart()                 # full stop + start, same data dir
        b.stop_app(); b.start_app() # or only the rabbit application
        b.kill_node(); b.start()    # a crash, then the same data dir again
        b.freeze(); b.thaw()        # SIGSTOP/SIGCONT: a broker that hangs
    # stopped (rabbitmqctl stop, then by pid), epmd killed, dir removed

Durable queues and persistent messages survive restart(): the Mnesia
directory is kept. Every failure to start raises RuntimeError with the
tail of the broker's logs, so a test fails loudly instead of skipping.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import mpstack

RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"




def _alive(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_tree(root):
    """root and all its descendants, root first."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _tcp_open(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class PrivateBroker:
    """One RabbitMQ node in its own temporary directory, on loopback."""

    user = "guest"
    password = "guest"
    host = "127.0.0.1"

    def __init__(self, start_timeout=60):
        self.dir = tempfile.mkdtemp(prefix="mprmq-")
        os.chmod(self.dir, 0o755)
        self.nodename = f"mptest{uuid.uuid4().hex[:8]}@localhost"
        self.port = mpstack.free_port()
        self.dist_port = mpstack.free_port()
        self.epmd_port = mpstack.free_port()
        self.start_timeout = start_timeout
        self.pid_file = os.path.join(self.dir, "rabbitmq.pid")
        self.startup_log = os.path.join(self.dir, "startup.log")
        self.proc = None  # the rabbitmq-server wrapper (exec's erl)
        self._pids = set()  # everything it ever ran, for cleanup by pid
        self._frozen = None  # beam pid while SIGSTOPped
        self._write_config()

    # ---- environment

    def env(self):
        """The environment rabbitmq-server and rabbitmqctl need (HOME holds
        the Erlang cookie)."""
        env = dict(os.environ)
        env.update({
            "HOME": self.dir,
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(self.dir, "advanced.config"),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
            "RABBITMQ_PID_FILE": self.pid_file,
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def stack_env(self, base):
        """A copy of a stack env dict (mpstack.stack_env()) whose MP_AMQP_*
        keys point at this broker, for mpstack.amqp_channel and Daemon."""
        env = dict(base)
        env.update({"MP_AMQP_HOST": self.host, "MP_AMQP_PORT": str(self.port),
                    "MP_AMQP_USER": self.user, "MP_AMQP_PASSWORD": self.password,
                    "MP_AMQP_VHOST": "/"})
        return env

    def _write_config(self):
        os.makedirs(os.path.join(self.dir, "mnesia"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "log"), exist_ok=True)
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
                    "distribution.listener.interface = 127.0.0.1\n"
                    f"distribution.listener.port_range.min = {self.dist_port}\n"
                    f"distribution.listener.port_range.max = {self.dist_port}\n"
                    "loopback_users.guest = true\n"
                    "disk_free_limit.absolute = 50MB\n"
                    "log.console = false\n"
                    "log.file.level = info\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")

    def ctl(self, *args, timeout=60, check=True):
        """rabbitmqctl against this node."""
        r = subprocess.run([os.path.join(RABBITMQ_BIN, "rabbitmqctl"), *args], env=self.env(),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stdout}{r.stderr}\n{self.log_tail()}")
        return r

    def log_tail(self, lines=30):
        out = []
        for path in (self.startup_log,
                     os.path.join(self.dir, "log", f"{self.nodename}.log")):
            try:
                with open(path, errors="replace") as f:
                    tail = f.read().splitlines()[-lines:]
                out.append(f"--- {path} ---\n" + "\n".join(tail))
            except OSError:
                pass
        return "\n".join(out)

    def beam_pid(self):
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and _alive(pid) and _comm(pid) == "beam.smp" else None

    # ---- life cycle

    def start(self):
        """Boot the node and wait until it accepts AMQP connections."""
        for port in (self.port, self.dist_port):
            if _tcp_open(port, 0.2):
                raise RuntimeError(f"port {port} is already in use")
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        log = open(self.startup_log, "a")
        self.proc = subprocess.Popen([os.path.join(RABBITMQ_BIN, "rabbitmq-server")],
                                     env=self.env(), cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._pids.add(self.proc.pid)
        deadline = time.time() + self.start_timeout
        while self.beam_pid() is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode} "
                                   f"during boot\n{self.log_tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"rabbitmq-server wrote no pid file in "
                                   f"{self.start_timeout}s\n{self.log_tail()}")
            time.sleep(0.1)
        self._pids.update(process_tree(self.proc.pid))
        left = max(5, int(deadline - time.time()))
        self.ctl("await_startup", "--timeout", str(left), timeout=left + 30)
        while not _tcp_open(self.port):
            if time.time() > deadline:
                raise RuntimeError(f"AMQP port {self.port} not open\n{self.log_tail()}")
            time.sleep(0.1)
        self._pids.update(process_tree(self.proc.pid))
        return self

    def stop_app(self):
        """Stop the rabbit application (clients are disconnected, the
        listener closes); the Erlang node keeps running."""
        self.ctl("stop_app")
        deadline = time.time() + 30
        while _tcp_open(self.port, 0.2):
            if time.time() > deadline:
                raise RuntimeError("AMQP port still open after stop_app")
            time.sleep(0.1)

    def start_app(self):
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60", timeout=90)
        deadline = time.time() + 30
        while not _tcp_open(self.port):
            if time.time() > deadline:
                raise RuntimeError(f"AMQP port {self.port} not open after start_app\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def stop_node(self, timeout=30):
        """Stop the node (keeping its data) and wait until every process it
        ran is gone; SIGKILL by pid whatever outlives the timeout."""
        if self.proc is None:
            return
        self.thaw()
        if self.proc.poll() is None and self.beam_pid():
            self._pids.update(process_tree(self.proc.pid))
            r = self.ctl("stop", self.pid_file, timeout=timeout + 30, check=False)
            if r.returncode != 0 and self.beam_pid():
                os.kill(self.beam_pid(), signal.SIGTERM)
        elif self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(_alive(p) for p in self._pids
                                             if _comm(p) != "epmd"):
            time.sleep(0.1)
        for pid in self._pids:
            if _alive(pid) and _comm(pid) in ("beam.smp", "erl_child_setup", "inet_gethost",
                                              "rabbitmq-server", "sh", "erl"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self):
        """A full node restart on the same data directory."""
        self.stop_node()
        self.start()

    def kill_node(self):
        """SIGKILL the broker (a crash: clients see their connections
        drop without a connection.close); start() brings it back."""
        beam = self.beam_pid()
        if beam is None:
            raise RuntimeError("the broker is not running")
        os.kill(beam, signal.SIGKILL)
        self.stop_node(timeout=10)  # reaps the wrapper and any helper left

    def freeze(self):
        """SIGSTOP the broker: connections stay up, nothing is answered
        (a hung or partitioned broker). thaw() resumes it."""
        self._frozen = self.beam_pid()
        if self._frozen is None:
            raise RuntimeError("the broker is not running")
        os.kill(self._frozen, signal.SIGSTOP)

    def thaw(self):
        pid, self._frozen = self._frozen, None
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGCONT)

    def _epmd_pids(self):
        """The epmd processes serving our port (epmd daemonises itself, so
        it is no descendant of ours; recognise it by its environment)."""
        pids = []
        want = f"ERL_EPMD_PORT={self.epmd_port}".encode()
        for name in os.listdir("/proc"):
            if not name.isdigit() or _comm(int(name)) != "epmd":
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if want in f.read().split(b"\0"):
                        pids.append(int(name))
            except OSError:
                continue
        return pids

    def close(self):
        """Stop everything this broker started and remove its directory."""
        try:
            self.stop_node()
        finally:
            env = self.env()
            subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
            deadline = time.time() + 5
            while self._epmd_pids() and time.time() < deadline:
                time.sleep(0.1)
            for pid in self._epmd_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()
        return False

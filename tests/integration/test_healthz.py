"""Liveness on the real local stack: /healthz sees a stuck worker loop.

A healthy daemon answers 200 with every worker's heartbeat age (each loop
stamps once a second). Then one worker thread alone is stopped - ptrace
(PTRACE_SEIZE + PTRACE_INTERRUPT on its thread id, found by its name
mp-worker-N) halts that thread while the HTTP thread and the other worker
go on, which SIGSTOP (the whole process) could not - and /healthz must
turn 503 naming that worker once its heartbeat is older than [metrics]
stuck_after, and 200 again once the thread is released. /readyz stays 200
throughout: the broker connection is still open (docs/operations.md).
"""
import ctypes
import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpstack  # noqa: E402

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long


def ptrace(req, tid):
    if libc.ptrace(req, tid, None, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "ptrace(%#x, %d): %s" % (req, tid, os.strerror(e)))


def thread_id(pid, name):
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
            if f.read().strip() == name:
                return int(tid)
    raise AssertionError("no thread %s in mailpumpd %d" % (name, pid))


def ages(body):
    m = re.search(r"^heartbeat age ms:((?: \d+| -)*)$", body, re.M)
    assert m, body
    return [None if a == "-" else int(a) for a in m.group(1).split()]


class HealthzTest(unittest.TestCase):
    def setUp(self):
        self.env = mpstack.stack_env()
        self.d, _ = mpstack.started_daemon(self, self.env, workers=2,
                                           extra_env={"MAILPUMP_METRICS_STUCK_AFTER": "3s"})

    def wait_health(self, status, timeout):
        deadline = time.time() + timeout
        while True:
            st, body = self.d.http("/healthz")
            if st == status or time.time() > deadline:
                return st, body
            time.sleep(0.2)

    def test_healthy_then_stuck_then_healthy(self):
        # healthy, over more than stuck_after: the loops keep stamping
        for _ in range(8):
            st, body = self.d.http("/healthz")
            self.assertEqual(st, 200, body)
            self.assertTrue(body.startswith("ok: 2 workers\n"), body)
            a = ages(body)
            self.assertEqual(len(a), 2, body)
            for age in a:
                self.assertIsNotNone(age, body)
                self.assertLess(age, 2500, body)
            time.sleep(0.5)

        tid = thread_id(self.d.proc.pid, "mp-worker-1")
        ptrace(PTRACE_SEIZE, tid)
        try:
            ptrace(PTRACE_INTERRUPT, tid)
            os.waitpid(tid, WALL)
            t0 = time.time()
            st, body = self.wait_health(503, 10)
            self.assertEqual(st, 503, body)
            self.assertGreaterEqual(time.time() - t0, 1.5, "503 before the heartbeat was old")
            m = re.match(r"stuck: worker 1 heartbeat age (\d+) ms > 3000 ms\n", body)
            self.assertIsNotNone(m, body)
            self.assertGreater(int(m.group(1)), 3000)
            a = ages(body)
            self.assertLess(a[0], 2500, body)    # worker 0 still comes round
            self.assertGreater(a[1], 3000, body)
            # readiness does not see it: the stuck worker's connection is open
            self.assertEqual(self.d.http("/readyz")[0], 200)
        finally:
            ptrace(PTRACE_DETACH, tid)
        st, body = self.wait_health(200, 5)
        self.assertEqual(st, 200, body)
        self.assertTrue(all(x is not None and x < 2500 for x in ages(body)), body)


if __name__ == "__main__":
    unittest.main()

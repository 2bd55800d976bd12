#!/usr/bin/env python3
"""Processes: status of the coordinator and workers, a killed worker, concurrency inside one
worker, and the stop signals."""

import http.client
import os
import signal
import socket
import sys
import threading
import unittest

from kptest import KeypoolTestCase, fake_secret, wait_for

MODEL = "z-ai/glm-4.5"


class Call(threading.Thread):
    """A chat request in its own thread; .result is (status, headers, body) or the exception."""

    def __init__(self, kp, headers=None, on_done=None):
        super().__init__(daemon=True)
        self.kp, self.headers, self.on_done = kp, headers, on_done
        self.result = None
        self.done = threading.Event()

    def run(self):
        try:
            self.result = self.kp.chat(MODEL, headers=self.headers)
        except (OSError, http.client.HTTPException) as e:
            self.result = e
        finally:
            self.done.set()
            if self.on_done:
                self.on_done(self)


class WorkersTest(KeypoolTestCase):

    def start(self, workers, n_keys=3):
        self.sim = self.start_sim()
        self.secrets = [fake_secret() for _ in range(n_keys)]
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": "GLM45", "model": MODEL, "keys": self.secrets}],
            settings={"workers": workers})

    def workers(self):
        return self.kp.status()["workers"]

    def in_flight(self):
        return sum(k["in_flight"] for k in self.kp.keys().values())

    def test_status_names_the_coordinator_and_its_workers(self):
        self.start(workers=2)
        st = self.kp.status()
        self.assertEqual(st["version"], "0.1.0")
        self.assertEqual(st["pid"], self.kp.pid)
        self.assertIsInstance(st["uptime_s"], (int, float))
        self.assertEqual((len(st["pools"]), st["keys"]), (1, 3))
        wait_for(lambda: len(self.workers()) == 2, what="two workers in /status")
        ws = self.workers()
        pids = {w["pid"] for w in ws}
        self.assertEqual(len(pids), 2)
        self.assertNotIn(self.kp.pid, pids)
        for w in ws:
            self.assertTrue(os.path.exists(f"/proc/{w['pid']}"), w)
            self.assertIn("requests", w)
        for _ in range(4):
            self.assertEqual(self.kp.chat(MODEL)[0], 200)
        wait_for(lambda: sum(w["requests"] for w in self.workers()) >= 4,
                 what="the workers' request counts to include the 4 proxied requests")

    def test_killed_worker_is_replaced_and_the_other_keeps_serving(self):
        self.start(workers=2)
        wait_for(lambda: len(self.workers()) == 2, what="two workers in /status")
        calls = [Call(self.kp, {"X-Sim-Delay-Ms": "3000"}) for _ in range(6)]
        for c in calls:
            c.start()
        wait_for(lambda: self.in_flight() == 6 and len(self.sim.log()) == 6,
                 what="6 slow requests in flight upstream")
        before = self.workers()
        busy = sorted(before, key=lambda w: w["in_flight"], reverse=True)
        victim = busy[0]
        survivors_in_flight = sum(w["in_flight"] for w in before if w is not victim)
        self.assertGreater(victim["in_flight"], 0, before)

        print(f"killing worker {victim['pid']} with {victim['in_flight']} requests in flight; "
              f"{survivors_in_flight} on the other", file=sys.stderr)
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced():
            ws = self.workers()
            pids = {w["pid"] for w in ws}
            return (len(ws) == 2 and victim["pid"] not in pids
                    and pids - {w["pid"] for w in before}) and ws
        after = wait_for(replaced, what=f"a replacement for killed worker {victim['pid']}")
        self.assertEqual({w["slot"] for w in after}, {w["slot"] for w in before},
                         "the replacement takes the dead worker's slot")

        for c in calls:
            c.join(30)
            self.assertTrue(c.done.is_set(), "a request never finished")
        ok = [c for c in calls if isinstance(c.result, tuple) and c.result[0] == 200]
        other = [c.result for c in calls if c not in ok]
        for r in other:
            self.assertIsInstance(r, (OSError, http.client.HTTPException),
                                  f"only the killed worker's clients may fail, and only by "
                                  f"losing the connection: {r!r}")
        self.assertGreaterEqual(len(ok), survivors_in_flight,
                                "requests on the surviving worker must complete")
        self.assertLessEqual(len(other), victim["in_flight"])

        wait_for(lambda: self.in_flight() == 0,
                 what="every key's in_flight back to 0 (the dead worker's leases released)")
        wait_for(lambda: all(w["in_flight"] == 0 for w in self.workers()),
                 what="every worker's in_flight back to 0")
        for _ in range(4):
            status, _, body = self.kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        for k in self.kp.keys().values():
            self.assertEqual(k["state"], "ready", k)

    def test_slow_request_does_not_hold_up_a_fast_one_in_the_same_worker(self):
        self.start(workers=1, n_keys=2)
        slow = Call(self.kp, {"X-Sim-Delay-Ms": "4000"})
        slow.start()
        wait_for(lambda: self.sim.log() and self.in_flight() == 1,
                 what="the slow request to be in flight upstream")
        status, _, body = self.kp.chat(MODEL)
        fast_done_while_slow_pending = not slow.done.is_set()
        self.assertEqual(status, 200, body)
        self.assertTrue(fast_done_while_slow_pending,
                        "the fast request finished only after the slow one")
        slow.join(30)
        self.assertIsInstance(slow.result, tuple, slow.result)
        self.assertEqual(slow.result[0], 200)

    def test_sigterm_lets_in_flight_requests_finish_and_exits_0(self):
        self.start(workers=2)
        slow = Call(self.kp, {"X-Sim-Delay-Ms": "2000"})
        slow.start()
        wait_for(lambda: self.sim.log() and self.in_flight() == 1,
                 what="the slow request to be in flight upstream")
        self.kp.send_signal(signal.SIGTERM)
        slow.join(30)
        self.assertIsInstance(slow.result, tuple,
                              f"the in-flight request was cut off: {slow.result!r}")
        self.assertEqual(slow.result[0], 200, slow.result)
        self.assertEqual(self.kp.wait_exit(), 0)
        self.assertFalse(os.path.exists(self.kp.socket_path) and self._connectable(),
                         "the socket still accepts connections after exit")

    def test_sigint_exits_0(self):
        self.start(workers=2)
        self.assertEqual(self.kp.chat(MODEL)[0], 200)
        pids = [w["pid"] for w in self.workers()]
        self.kp.send_signal(signal.SIGINT)
        self.assertEqual(self.kp.wait_exit(), 0)
        for pid in pids:
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid),
                     what=f"worker {pid} to be gone after SIGINT")

    def _connectable(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.kp.socket_path)
            return True
        except OSError:
            return False
        finally:
            s.close()


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


if __name__ == "__main__":
    unittest.main(verbosity=2)

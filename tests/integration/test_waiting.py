#!/usr/bin/env python3
"""Waiting instead of failing: requests wait for a cooling key, per-key concurrency and rpm."""

import json
import time
import unittest

from kptest import KeypoolTestCase, fake_secret, in_threads, key_id

MODEL = "m/wait"


class WaitingTest(KeypoolTestCase):

    def start(self, keys, settings=None, **pool):
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings=settings, pools=[
            dict({"name": "W", "model": MODEL, "keys": list(keys)}, **pool)])

    def chat(self, headers=None, **kw):
        return self.kp.chat(MODEL, headers=headers, **kw)

    def in_threads(self, n, fn, spacing=0.0):
        return in_threads(n, fn, spacing)

    def test_a_request_waits_for_the_first_key_to_recover(self):
        a, b = fake_secret(), fake_secret()
        self.start([a, b])
        self.sim.set_rules({s: {"status": 429, "retry_after": "2", "count": 1} for s in (a, b)})
        sent = time.time()
        status, h, body = self.chat()
        self.assertEqual(status, 200, body)
        self.assertEqual(h.get("x-keypool-attempts"), "3")
        log = self.sim.log()
        self.assertEqual([e["status"] for e in log], [429, 429, 200])
        self.assertGreaterEqual(log[-1]["time"] - sent, 1.5,
                                "the request may reach a key only once it has recovered")
        self.assertEqual(log[-1]["key_id"], h.get("x-keypool-key"))

    def test_a_recovery_beyond_max_wait_answers_503_at_once(self):
        a, b = fake_secret(), fake_secret()
        self.start([a, b], settings={"max_wait": 30})
        self.sim.set_rules({s: {"status": 429, "retry_after": "60"} for s in (a, b)})
        status, h, body = self.chat()
        self.assertEqual(status, 503, body)
        self.assertOpenAIError(body, code="no_key_available")
        self.assertTrue(55 <= int(h.get("retry-after", "0")) <= 60, h)
        # Answered while both keys still rest: it did not wait for them.
        for s in (a, b):
            self.assertEqual(self.kp.key(s)["state"], "cooling")
        self.assertEqual(len(self.sim.log()), 2)

    def test_max_wait_header_zero_answers_at_once(self):
        a = fake_secret()
        self.start([a])
        self.sim.set_rules({a: {"status": 429, "retry_after": "4", "count": 1}})
        status, h, body = self.chat(headers={"X-Keypool-Max-Wait": "0"})
        self.assertEqual(status, 503, body)
        self.assertOpenAIError(body, code="no_key_available")
        self.assertTrue(1 <= int(h.get("retry-after", "0")) <= 4, h)
        self.assertEqual(self.kp.key(a)["state"], "cooling", "answered before the recovery")
        # The same wait is fine without the header (default max_wait 30 s).
        status, h, body = self.chat()
        self.assertEqual(status, 200, body)
        self.assertEqual([e["status"] for e in self.sim.log()], [429, 200])

    def test_waiting_requests_are_all_served_when_a_key_recovers_without_burning_cpu(self):
        a = fake_secret()
        self.start([a], settings={"workers": 2})
        self.sim.set_rules({a: {"status": 429, "retry_after": "3", "count": 1}})
        status, _, body = self.chat(headers={"X-Keypool-Max-Wait": "0"})
        self.assertEqual(status, 503, body)
        limited = self.sim.log()[0]
        cpu_before, wall_before = self.kp.cpu_seconds(), time.monotonic()
        results = self.in_threads(4, lambda i: self.chat(), spacing=0.2)
        wall = time.monotonic() - wall_before
        cpu = self.kp.cpu_seconds() - cpu_before
        for r in results:
            self.assertNotIsInstance(r, Exception)
            self.assertEqual(r[0], 200, r[2])
        served = self.sim.finished_log()[1:]
        self.assertEqual(len(served), 4)
        for e in served:
            self.assertGreaterEqual(e["time"] - limited["time"], 0.8 * 3,
                                    "served only after the key's Retry-After")
        # A polling loop would spin a core for the whole wait; sleeping costs next to nothing.
        self.assertLess(cpu, 0.5 * wall, f"the daemon used {cpu:.2f}s of CPU in {wall:.2f}s "
                                         "while requests waited")

    def test_max_concurrent_holds_across_workers(self):
        a, b = fake_secret(), fake_secret()
        self.start([a, b], settings={"workers": 2}, max_concurrent=1)
        for s in (a, b):
            self.assertEqual(self.kp.key(s)["max_concurrent"], 1)
        delay_ms = 800
        results = self.in_threads(6, lambda i: self.chat(headers={"X-Sim-Delay-Ms": str(delay_ms)}))
        for r in results:
            self.assertNotIsInstance(r, Exception)
            self.assertEqual(r[0], 200, r[2])
        log = self.sim.finished_log()
        self.assertEqual(len(log), 6)
        for s in (a, b):
            spans = sorted((e["time"], e["end_time"]) for e in log if e["key_id"] == key_id(s))
            self.assertTrue(spans, f"key {key_id(s)} served nothing")
            for (_, end), (start, _) in zip(spans, spans[1:]):
                self.assertGreaterEqual(start, end - 0.05,
                                        f"two requests overlapped on key {key_id(s)}: {spans}")
        span = max(e["end_time"] for e in log) - min(e["time"] for e in log)
        self.assertGreaterEqual(span, 0.8 * 3 * delay_ms / 1000,
                                "six requests through two single slots take three rounds")
        workers = self.kp.status()["workers"]
        self.assertEqual(len(workers), 2)
        for k in self.kp.keys().values():
            self.assertEqual(k["in_flight"], 0, k)

    def test_rpm_spaces_requests_once_the_burst_is_spent(self):
        a = fake_secret()
        rpm = 30                # a burst of 30, then one every 2 s
        interval = 60 / rpm
        self.start([a], settings={"workers": 2}, rpm=rpm)
        self.assertEqual(self.kp.key(a)["rpm"], rpm)
        for i in range(rpm):
            status, h, body = self.chat()
            self.assertEqual((status, h.get("x-keypool-attempts")), (200, "1"), body)
        status, h, body = self.chat(headers={"X-Keypool-Max-Wait": "0"})
        self.assertEqual(status, 503, body)
        self.assertOpenAIError(body, code="no_key_available")
        self.assertTrue(1 <= int(h.get("retry-after", "0")) <= interval, h)
        for _ in range(2):
            status, _, body = self.chat()
            self.assertEqual(status, 200, body)
        log = self.sim.log()
        self.assertEqual(len(log), rpm + 2, "the refused request never went upstream")
        first = log[0]["time"]
        self.assertGreaterEqual(log[rpm]["time"] - first, 0.8 * interval)
        self.assertGreaterEqual(log[rpm + 1]["time"] - first, 0.8 * 2 * interval)
        self.assertEqual(self.kp.key(a)["rate_limited"], 0, "keypool's own pacing is no 429")

    def test_key_level_limits_override_the_pool(self):
        a, b = fake_secret(), fake_secret()
        self.start([{"key": a, "max_concurrent": 3, "rpm": 100}, b], max_concurrent=1, rpm=50)
        self.assertEqual((self.kp.key(a)["max_concurrent"], self.kp.key(a)["rpm"]), (3, 100))
        self.assertEqual((self.kp.key(b)["max_concurrent"], self.kp.key(b)["rpm"]), (1, 50))
        self.assertEqual(self.chat()[0], 200)


if __name__ == "__main__":
    unittest.main(verbosity=2)

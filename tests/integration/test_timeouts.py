#!/usr/bin/env python3
"""Timeouts that match LLM calls, and answers judged right at the edges.

Each pool's connect, first-byte, idle and request timeouts end a silent upstream honestly (504 in
OpenAI's error shape, or a visibly cut stream) and never hold a caller for longer than
request_timeout; X-Keypool-*-Timeout headers shorten them and never go upstream. Answers that break
HTTP (closed mid-head, short body, status 999, a flood of headers) are transient failures, never a
success; Retry-After 0, a past date or a negative figure cool a key for the one-second floor; and a
request makes at most retry.max_attempts upstream attempts.
"""

import http.client
import json
import time
import unittest

from kptest import KeypoolTestCase, fake_secret, key_id

MODEL = "m/edges"


class EdgesTest(KeypoolTestCase):

    def start(self, keys, pool=None, settings=None):
        self.sim = self.start_sim()
        cfg = {"recovery_time": 120, "transient_threshold": 1000,
               "retry": {"backoff_initial_ms": 100, "backoff_max_ms": 200, "max_attempts": 3}}
        cfg.update(settings or {})
        p = {"name": "E", "model": MODEL, "keys": list(keys)}
        p.update(pool or {})
        self.kp = self.start_keypool(self.sim, settings=cfg, pools=[p])

    def error(self, body):
        err = json.loads(body)["error"]
        self.assertIn("message", err)
        return err

    # --- timeouts ---------------------------------------------------------------------------

    def test_a_silent_upstream_is_504_within_request_timeout(self):
        self.start([fake_secret(), fake_secret()],
                   pool={"first_byte_timeout": 1, "request_timeout": 2})
        t0 = time.monotonic()
        status, h, body = self.kp.chat(MODEL, headers={"X-Sim-Delay-Ms": "10000"})
        took = time.monotonic() - t0
        self.assertEqual(status, 504, body)
        self.assertLess(took, 4.5, "request_timeout bounds every attempt, backoff and wait")
        self.assertGreaterEqual(took, 1.5)
        err = self.error(body)
        self.assertIn(err["code"], ("request_timeout", "upstream_timeout"))
        # one first-byte timeout, a short backoff, and the second attempt cut by request_timeout
        self.assertLessEqual(len(self.sim.log()), 2)

    def test_first_byte_timeout_is_retried_then_504_naming_it(self):
        self.start([fake_secret()], pool={"first_byte_timeout": 1, "request_timeout": 30})
        t0 = time.monotonic()
        status, h, body = self.kp.chat(MODEL, headers={"X-Sim-Delay-Ms": "5000"})
        self.assertEqual(status, 504, body)
        self.assertLess(time.monotonic() - t0, 10)
        err = self.error(body)
        self.assertEqual(err["code"], "upstream_timeout")
        self.assertIn("first_byte_timeout", err["message"])
        self.assertEqual(h.get("x-keypool-attempts"), "3")

    def test_the_timeout_header_shortens_and_never_lengthens_nor_goes_upstream(self):
        self.start([fake_secret()], pool={"request_timeout": 20})
        t0 = time.monotonic()
        status, h, body = self.kp.chat(MODEL, headers={"X-Sim-Delay-Ms": "5000",
                                                       "X-Keypool-Timeout": "1.5"})
        self.assertEqual(status, 504, body)
        self.assertLess(time.monotonic() - t0, 4)
        self.assertEqual(self.error(body)["code"], "request_timeout")
        entry = self.sim.log()[0]
        sent = {k.lower() for k in entry.get("headers", {})}
        self.assertFalse([k for k in sent if k.startswith("x-keypool-")], sent)
        # A longer value than the pool's is ignored, not obeyed; an answer in time is a success.
        status, h, body = self.kp.chat(MODEL, headers={"X-Keypool-Timeout": "99999"})
        self.assertEqual(status, 200, body)
        status, h, body = self.kp.chat(MODEL, headers={"X-Sim-Delay-Ms": "3000",
                                                       "X-Keypool-First-Byte-Timeout": "1",
                                                       "X-Keypool-Timeout": "2.5"})
        self.assertEqual(status, 504, body)

    def test_idle_silence_after_bytes_cuts_the_stream_and_blames_no_key(self):
        a = fake_secret()
        self.start([a], pool={"idle_timeout": 1, "request_timeout": 30})
        conn = self.kp.conn()
        self.addCleanup(conn.close)
        resp = conn.start("POST", "/v1/chat/completions",
                          {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                           "stream": True},
                          {"X-Sim-Chunks": "4", "X-Sim-Chunk-Delay-Ms": "3000"})
        self.assertEqual(resp.status, 200)
        t0 = time.monotonic()
        with self.assertRaises((http.client.IncompleteRead, ConnectionError)):
            resp.read()
        self.assertLess(time.monotonic() - t0, 6)
        self.assertEqual(self.kp.key(a)["state"], "ready")
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)

    def test_waiting_for_a_key_is_bounded_by_request_timeout(self):
        a = fake_secret()
        self.start([a], pool={"request_timeout": 10, "max_concurrent": 1},
                   settings={"max_wait": 30})
        slow = self.kp.conn(timeout=20)
        self.addCleanup(slow.close)
        # Sent, not waited for: it holds the pool's one slot for 2.5 s.
        slow.http.request("POST", "/v1/chat/completions",
                          body=json.dumps({"model": MODEL, "messages": []}).encode(),
                          headers={"Content-Type": "application/json", "X-Sim-Delay-Ms": "2500"})
        time.sleep(0.5)
        t0 = time.monotonic()
        status, h, body = self.kp.chat(MODEL, headers={"X-Keypool-Timeout": "1"})
        self.assertIn(status, (503, 504), body)
        self.assertLess(time.monotonic() - t0, 1.9)
        self.assertEqual(slow.http.getresponse().status, 200)

    # --- answers at the edges ---------------------------------------------------------------

    def raw(self, text):
        return {"X-Sim-Raw": json.dumps(text)}

    def test_broken_answers_are_transient_then_502(self):
        cases = {
            "closed mid-head": "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: b",
            "short body": "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100\r\n\r\n",
            "short error body": "HTTP/1.1 503 No\r\nContent-Type: application/json\r\n"
                                "Content-Length: 100\r\n\r\n{\"error\":",
            "status 999": "HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\n{}",
            "headers beyond the limit": "HTTP/1.1 200 OK\r\n"
                                        + "".join(f"X-H{i}: v\r\n" for i in range(200))
                                        + "Content-Length: 2\r\n\r\n{}",
        }
        a = fake_secret()
        self.start([a])
        for what, text in cases.items():
            with self.subTest(what=what):
                self.sim.reset()
                status, h, body = self.kp.chat(MODEL, headers=self.raw(text))
                self.assertEqual(status, 502, (what, body))
                self.assertEqual(self.error(body)["code"], "upstream_bad_answer")
                self.assertEqual(len(self.sim.log()), 3, "retried as transient, max_attempts in all")

    def test_a_short_body_after_bytes_reached_the_client_is_cut(self):
        self.start([fake_secret()])
        text = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n{\"id\":")
        conn = self.kp.conn()
        self.addCleanup(conn.close)
        # The head may or may not have left keypool before the cut: either way the answer
        # ends visibly broken, never as a complete 200.
        with self.assertRaises((http.client.IncompleteRead, http.client.RemoteDisconnected,
                                ValueError, ConnectionError)):
            resp = conn.start("POST", "/v1/chat/completions",
                              {"model": MODEL, "messages": []}, self.raw(text))
            self.assertEqual(resp.status, 200)
            resp.read()

    def test_zero_past_and_negative_retry_after_cool_for_the_floor(self):
        for value in ("0", "Sun, 06 Nov 1994 08:49:37 GMT", "-5"):
            with self.subTest(value=value):
                a, b = fake_secret(), fake_secret()
                self.start([a, b])
                self.sim.set_rules({a: {"status": 429, "retry_after": value, "count": 1}})
                status, h, body = self.kp.chat(MODEL)
                self.assertEqual(status, 200, body)
                ka = self.kp.key(a)
                self.assertEqual(ka["state"], "cooling", ka)
                time.sleep(1.6)
                self.assertEqual(self.kp.key(a)["state"], "ready")

    def test_attempts_are_bounded_by_max_attempts_whatever_the_mix(self):
        keys = [fake_secret() for _ in range(6)]
        self.start(keys)
        rules = {}
        for i, k in enumerate(keys):
            rules[k] = {"status": 429 if i % 2 else 503, "retry_after": "1", "count": 100}
        self.sim.set_rules(rules)
        status, h, body = self.kp.chat(MODEL)
        self.assertIn(status, (429, 503), body)
        self.assertEqual(len(self.sim.log()), 3)
        self.assertEqual(h.get("x-keypool-attempts"), "3")


if __name__ == "__main__":
    unittest.main()

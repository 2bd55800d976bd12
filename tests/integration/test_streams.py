#!/usr/bin/env python3
"""Streams: relayed as they arrive and byte for byte, error events judged, disconnects, usage."""

import json
import socket
import unittest

from kptest import DEADLINE, KeypoolTestCase, fake_secret, key_id, sse_events, wait_for

MODEL = "m/stream"
RECOVERY = 120


class StreamTest(KeypoolTestCase):

    def start(self, keys, settings=None):
        self.sim = self.start_sim()
        cfg = {"recovery_time": RECOVERY,
               "retry": {"backoff_initial_ms": 200, "backoff_max_ms": 400, "max_attempts": 5}}
        cfg.update(settings or {})
        self.kp = self.start_keypool(self.sim, settings=cfg, pools=[
            {"name": "S", "model": MODEL, "keys": list(keys)}])

    def body(self):
        return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}

    def read_event(self, resp):
        """Reads from a streaming answer until one whole SSE event has arrived; the bytes."""
        got = b""
        while b"\n\n" not in got:
            chunk = resp.read1(65536)
            if not chunk:
                self.fail(f"the stream ended before its first event: {got!r}")
            got += chunk
        return got

    def direct(self, headers):
        """The same stream fetched straight from the simulator with a key outside the pool."""
        status, h, body = self.sim.direct("POST", "/chat/completions", fake_secret(),
                                          body=self.body(), headers=headers)
        self.assertEqual(status, 200, body)
        return body

    def test_first_event_is_relayed_before_the_upstream_finishes(self):
        a = fake_secret()
        self.start([a])
        conn = self.kp.conn()
        self.addCleanup(conn.close)
        resp = conn.start("POST", "/v1/chat/completions", self.body(),
                          {"X-Sim-Chunks": "3", "X-Sim-Chunk-Delay-Ms": "1500"})
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.getheader("Content-Type", "").startswith("text/event-stream"))
        first = self.read_event(resp)
        self.assertIn(b"tok0", first)
        (entry,) = self.sim.log()
        self.assertEqual(entry["status"], 200)
        self.assertNotIn("end_time", entry,
                         "the first event must reach the client while the upstream still sends")
        rest = resp.read()
        events = sse_events(first + rest)
        self.assertEqual(len(events), 5, events)
        self.assertEqual(events[-1], b"[DONE]")
        self.sim.finished_log()

    def test_a_long_stream_is_relayed_byte_for_byte(self):
        a = fake_secret()
        self.start([a])
        hdrs = {"X-Sim-Chunks": "200", "X-Sim-Id": "gen-sim-fixed"}
        status, h, body = self.kp.chat(MODEL, stream=True, headers=hdrs)
        self.assertEqual(status, 200, body)
        self.assertEqual(body, self.direct(hdrs))
        self.assertEqual(len(sse_events(body)), 202)

    def test_an_error_event_first_is_retried_on_another_key(self):
        for style, code in (("openrouter", 429), ("anthropic", 429), ("anthropic", 529)):
            with self.subTest(style=style, code=code):
                a, b = fake_secret(), fake_secret()
                self.start([a, b])
                self.sim.set_rules({a: {"stream_error": code, "stream_error_style": style,
                                        "count": 1}})
                status, h, body = self.kp.chat(MODEL, stream=True, headers={"X-Sim-Chunks": "3"})
                self.assertEqual(status, 200, body)
                self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")),
                                 (key_id(b), "2"))
                self.assertNotIn(b"error", body, "the client sees nothing of the failed attempt")
                events = sse_events(body)
                self.assertEqual((len(events), events[-1]), (5, b"[DONE]"), events)
                log = self.sim.finished_log()
                self.assertEqual([e["key_id"] for e in log], [key_id(a), key_id(b)])
                k = self.kp.key(a)
                if code == 429:
                    self.assertEqual((k["state"], k["reason"], k["rate_limited"]),
                                     ("cooling", "rate_limited", 1), k)
                    self.assertGreaterEqual(k["cooldown_remaining_s"], RECOVERY - 15, k)
                else:
                    # Anthropic's overloaded_error: transient, not the key's fault.
                    self.assertEqual((k["state"], k["consecutive_failures"], k["rate_limited"]),
                                     ("ready", 1, 0), k)
                    self.assertGreaterEqual(log[1]["time"] - log[0]["time"], 0.8 * 0.2,
                                            "a transient failure is retried after a backoff")

    def test_a_later_error_event_is_relayed_and_still_counts_against_the_key(self):
        a, b = fake_secret(), fake_secret()
        self.start([a, b])
        hdrs = {"X-Sim-Chunks": "3", "X-Sim-Stream-Error": "429", "X-Sim-Id": "gen-sim-fixed"}
        status, h, body = self.kp.chat(MODEL, stream=True, headers=hdrs)
        self.assertEqual(status, 200, body)
        self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")), (key_id(a), "1"))
        self.assertEqual(body, self.direct(hdrs), "the stream ends as the upstream ended it")
        self.assertEqual(json.loads(sse_events(body)[-1])["error"]["code"], 429)
        self.assertEqual(len(self.sim.requests_with(a)), 1)
        k = wait_for(lambda: (lambda k: k if k["state"] == "cooling" else None)(self.kp.key(a)),
                     what="the key to cool after the error event")
        self.assertEqual((k["reason"], k["rate_limited"]), ("rate_limited", 1), k)
        for _ in range(2):
            status, h, body = self.kp.chat(MODEL)
            self.assertEqual((status, h.get("x-keypool-key")), (200, key_id(b)), body)

    def test_a_client_disconnecting_mid_stream_aborts_the_upstream_transfer(self):
        a = fake_secret()
        self.start([a])
        conn = self.kp.conn()
        self.addCleanup(conn.close)
        # 100 events 200 ms apart: 20 s if nobody stopped it.
        resp = conn.start("POST", "/v1/chat/completions", self.body(),
                          {"X-Sim-Chunks": "100", "X-Sim-Chunk-Delay-Ms": "200"})
        self.assertEqual(resp.status, 200)
        self.read_event(resp)
        self.assertEqual(self.kp.key(a)["in_flight"], 1)
        conn.http.sock.shutdown(socket.SHUT_RDWR)
        resp.close()
        conn.close()
        wait_for(lambda: (lambda e: e if e.get("aborted") else None)(self.sim.log()[0]),
                         timeout=DEADLINE, what="the simulator to see the upstream transfer "
                                                "aborted (it would run for 20 s)")
        wait_for(lambda: self.kp.key(a)["in_flight"] == 0, what="in_flight back to 0")
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["rate_limited"], k["consecutive_failures"]),
                         ("ready", 0, 0), "a client leaving is not the key's fault")
        status, _, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)

    def test_token_usage_is_counted_per_key(self):
        a = fake_secret()
        self.start([a])
        status, _, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        k = self.kp.key(a)
        self.assertEqual((k["tokens_in"], k["tokens_out"]), (10, 5), k)
        status, _, body = self.kp.chat(MODEL, stream=True, headers={"X-Sim-Chunks": "7"})
        self.assertEqual(status, 200, body)
        k = wait_for(lambda: (lambda k: k if k["tokens_out"] != 5 else None)(self.kp.key(a)),
                     what="the stream's usage to be counted")
        self.assertEqual((k["tokens_in"], k["tokens_out"]), (20, 12), k)


if __name__ == "__main__":
    unittest.main(verbosity=2)

#!/usr/bin/env python3
"""Rotation: rate limits cool a key, auth and quota failures disable it, the request moves on."""

import json
import unittest

from kptest import KeypoolTestCase, fake_secret, key_id, sse_events, wait_for

MODEL = "z-ai/glm-4.5"
RECOVERY = 300


class RotationTest(KeypoolTestCase):

    def start(self, *keys, sim_args=(), **settings):
        self.sim = self.start_sim(*sim_args)
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": "GLM45", "model": MODEL, "keys": list(keys)}],
            settings={"recovery_time": RECOVERY, **settings})

    def chat_ok(self, **kw):
        status, h, body = self.kp.chat(MODEL, **kw)
        self.assertEqual(status, 200, body)
        return h

    def sent_with(self, secret):
        return len(self.sim.requests_with(secret))

    def assert_cooling(self, secret, low, high):
        k = self.kp.key(secret)
        self.assertEqual((k["state"], k["reason"]), ("cooling", "rate_limited"), k)
        self.assertGreaterEqual(k["cooldown_remaining_s"], low, k)
        self.assertLessEqual(k["cooldown_remaining_s"], high, k)
        self.assertEqual(k["rate_limited"], 1, k)
        return k

    def test_429_with_retry_after_moves_the_request_and_cools_the_key(self):
        a, b, c = fake_secret(), fake_secret(), fake_secret()
        self.start(a, b, c)
        self.sim.set_rules({a: {"status": 429, "retry_after": "30"}})

        h = self.chat_ok()
        self.assertEqual(h.get("x-keypool-key"), key_id(b), "the next key must serve it")
        self.assertEqual(h.get("x-keypool-attempts"), "2")
        self.assertEqual(self.sent_with(a), 1, "exactly one request may reach the limited key")

        for _ in range(10):
            h = self.chat_ok()
            self.assertNotEqual(h.get("x-keypool-key"), key_id(a))
            self.assertEqual(h.get("x-keypool-attempts"), "1")
        self.assertEqual(self.sent_with(a), 1, "a cooling key must get no requests")
        self.assertEqual(self.sent_with(b) + self.sent_with(c), 11)

        k = self.assert_cooling(a, 25, 30)
        self.assertEqual((k["requests"], k["last_status"]), (1, 429))
        for other in (b, c):
            self.assertEqual(self.kp.key(other)["state"], "ready")
        self.assertEqual(self.kp.health()[0], 200, "the pool still has ready keys")

    def test_cooled_key_is_used_again_after_its_retry_after(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.sim.set_rules({a: {"status": 429, "retry_after": "2", "count": 1}})

        h = self.chat_ok()
        self.assertEqual(h.get("x-keypool-key"), key_id(b))
        self.assertEqual(self.kp.key(a)["state"], "cooling")
        wait_for(lambda: self.kp.key(a)["state"] == "ready",
                 what="the key to be ready once its 2 s Retry-After has passed")
        self.assertEqual(self.kp.key(a)["cooldown_remaining_s"], 0)
        served = [self.chat_ok().get("x-keypool-key") for _ in range(2)]
        self.assertIn(key_id(a), served, "the recovered key must serve again")
        self.assertEqual(self.sent_with(a), 2)

    def test_429_without_a_hint_cools_for_recovery_time(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.sim.set_rules({a: {"status": 429}})
        h = self.chat_ok()
        self.assertEqual(h.get("x-keypool-key"), key_id(b))
        self.assert_cooling(a, RECOVERY - 10, RECOVERY)

    def test_rate_limit_words_in_a_503_body_rotate(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.sim.set_rules({a: {"status": 503, "body": "Rate limit exceeded, slow down"}})
        h = self.chat_ok()
        self.assertEqual(h.get("x-keypool-key"), key_id(b))
        self.assertEqual(h.get("x-keypool-attempts"), "2")
        self.assert_cooling(a, RECOVERY - 10, RECOVERY)
        self.chat_ok()
        self.assertEqual(self.sent_with(a), 1)

    def test_401_disables_the_key_for_auth(self):
        a, b = fake_secret("invalid-"), fake_secret()
        self.start(a, b)
        h = self.chat_ok()
        self.assertEqual(h.get("x-keypool-key"), key_id(b))
        self.assertEqual(h.get("x-keypool-attempts"), "2")
        # Disabled once keypool's own probe is refused too (the simulator refuses the key anywhere).
        wait_for(lambda: self.kp.key(a)["state"] == "disabled", what="the probe to confirm the 401")
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"], k["last_status"]), ("disabled", "auth", 401))
        for _ in range(3):
            self.assertEqual(self.chat_ok().get("x-keypool-key"), key_id(b))
        self.assertEqual([e["method"] for e in self.sim.requests_with(a)], ["POST", "GET"],
                         "a disabled key gets no requests after its confirming probe")

    def test_403_disables_the_key_for_auth(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.sim.set_rules({a: {"status": 403, "body": "Key is forbidden", "models_status": 403}})
        self.assertEqual(self.chat_ok().get("x-keypool-key"), key_id(b))
        wait_for(lambda: self.kp.key(a)["state"] == "disabled", what="the probe to confirm the 403")
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"]), ("disabled", "auth"))

    def test_402_disables_the_key_for_quota(self):
        a, b = fake_secret("nocredit-"), fake_secret()
        self.start(a, b)
        h = self.chat_ok()
        self.assertEqual(h.get("x-keypool-key"), key_id(b))
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"], k["last_status"]), ("disabled", "quota", 402))
        self.chat_ok()
        self.assertEqual(self.sent_with(a), 1)

    def test_simulator_limit_rotates_on_the_request_over_the_limit(self):
        a, b = fake_secret("limit2-"), fake_secret()
        self.start(a, b, sim_args=("--window", "600"))
        self.assertIn("-limit2-", a)
        for _ in range(12):
            if self.sent_with(a) >= 3:
                break
            self.chat_ok()
        statuses = [e["status"] for e in self.sim.requests_with(a)]
        self.assertEqual(statuses, [200, 200, 429],
                         "the limited key must get its 2 requests, then exactly one 429")
        last = self.sim.log()[-1]
        self.assertEqual(last["key_id"], key_id(b), "the limited request must move to b")
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"], k["rate_limited"]),
                         ("cooling", "rate_limited", 1))
        self.assertGreater(k["cooldown_remaining_s"], 0)
        self.assertLessEqual(k["cooldown_remaining_s"], 600)
        for _ in range(4):
            self.assertEqual(self.chat_ok().get("x-keypool-key"), key_id(b))
        self.assertEqual(self.sent_with(a), 3)

    def test_stream_request_rotates_before_the_first_byte(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.sim.set_rules({a: {"status": 429, "retry_after": "60"}})
        status, h, body = self.kp.chat(MODEL, stream=True, headers={"X-Sim-Chunks": "3"})
        self.assertEqual(status, 200, body)
        self.assertEqual(h.get("x-keypool-key"), key_id(b))
        events = sse_events(body)
        self.assertEqual(len(events), 5, events)
        self.assertEqual(events[-1], b"[DONE]")
        self.assertEqual(self.sent_with(a), 1)

    def test_upstream_5xx_is_returned_and_does_not_rotate_when_no_retry_is_allowed(self):
        # Transient errors are not the key's fault: with retries off (test_policy covers them)
        # the answer goes back as it is and the key stays as it was.
        a, b = fake_secret(), fake_secret()
        self.start(a, b, retry={"max_attempts": 1})
        self.sim.set_rules({a: {"status": 503, "count": 1}})
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 503, body)
        self.assertEqual(h.get("x-keypool-key"), key_id(a))
        self.assertEqual(h.get("x-keypool-attempts"), "1")
        self.assertEqual(json.loads(body)["error"]["code"], 503, "the simulator's own body")
        self.assertEqual(self.sent_with(b), 0)
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"], k["rate_limited"]), ("ready", None, 0))

    def test_all_keys_cooling_answers_503_with_retry_after(self):
        # Both recoveries lie beyond max_wait, so the answer is immediate (test_waiting covers
        # the waiting within it).
        a, b = fake_secret(), fake_secret()
        self.start(a, b, max_wait=10)
        self.sim.set_rules({a: {"status": 429, "retry_after": "40"},
                            b: {"status": 429, "retry_after": "20"}})
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 503, body)
        self.assertTrue(h.get("content-type", "").startswith("application/json"), h)
        self.assertOpenAIError(body, code="no_key_available")
        self.assertEqual(json.loads(body)["error"]["type"], "keypool_error")
        self.assertIn("retry-after", h, "a cooling pool must say when to come back")
        self.assertTrue(15 <= int(h["retry-after"]) <= 20, h["retry-after"])
        self.assertEqual((self.sent_with(a), self.sent_with(b)), (1, 1))

        status, h, body = self.kp.chat("GLM45")
        self.assertEqual(status, 503, body)
        self.assertEqual((self.sent_with(a), self.sent_with(b)), (1, 1),
                         "no request may reach a cooling key")
        status, doc = self.kp.health()
        self.assertEqual(status, 503)
        self.assertEqual(doc["status"], "degraded")
        self.assertEqual(doc["pools"][0]["ready"], 0)

    def test_all_keys_disabled_answers_503_without_retry_after(self):
        a, b = fake_secret("invalid-"), fake_secret("nocredit-")
        self.start(a, b)
        # b's 402 disables it at once, a's 401 once keypool's own probe is refused too.
        self.kp.chat(MODEL)
        wait_for(lambda: self.kp.key(a)["state"] == "disabled", what="the probe to confirm a's 401")
        before = len(self.sim.log())
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 503, body)
        self.assertOpenAIError(body, code="no_key_available")
        self.assertNotIn("retry-after", h, "no key will ever recover by itself")
        reasons = {k["id"]: (k["state"], k["reason"]) for k in self.kp.keys().values()}
        self.assertEqual(reasons, {key_id(a): ("disabled", "auth"),
                                   key_id(b): ("disabled", "quota")})
        self.assertEqual(self.kp.health()[0], 503)
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 503, body)
        self.assertEqual(len(self.sim.log()), before, "disabled keys must get no requests")


if __name__ == "__main__":
    unittest.main(verbosity=2)

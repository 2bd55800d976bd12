#!/usr/bin/env python3
"""Admin actions on the socket: disable, enable and probe a key, export and import the state;
allowed to root (the tests' uid), refused with 403 to another uid, which may still read."""

import json
import unittest

from kptest import (KeypoolTestCase, assert_api_error, fake_secret, find_leaks, key_id,
                    make_socket_public, masked, parse_rfc3339, request_as_user, wait_for)

MODEL = "z-ai/glm-4.5"
STABLE = ("id", "state", "reason", "requests", "successes", "rate_limited", "failures",
          "consecutive_failures", "last_status", "last_class", "tokens_in", "tokens_out")


class AdminTest(KeypoolTestCase):

    def start(self, *keys, settings=None, pools=None):
        self.sim = self.start_sim()
        self.kp = self.start_keypool(
            self.sim, pools=pools or [{"name": "main", "model": MODEL, "keys": list(keys)}],
            settings={"recovery_time": 900, **(settings or {})})
        return self.kp

    def post(self, path, body=None):
        status, h, payload = self.kp.request("POST", path, body)
        return status, h, payload

    def post_json(self, path, body=None, expect=200):
        status, h, payload = self.post(path, body)
        self.assertEqual(status, expect, payload[:500])
        self.assertTrue(h.get("content-type", "").startswith("application/json"), h)
        return json.loads(payload)

    def snapshot(self):
        """What must not change when an action is refused: every key's state and counters."""
        return {(p["name"], k["id"]): {f: k[f] for f in STABLE}
                for p in self.kp.key_status()["pools"] for k in p["keys"]}

    def chat_ok(self):
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        return h.get("x-keypool-key")

    # --- disable, enable, probe ---

    def test_disable_takes_the_key_out_until_enable(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        A = key_id(a)
        doc = self.post_json(f"/api/keys/{A}/disable")
        k = doc["key"]
        self.assertEqual((k["id"], k["state"], k["reason"]), (A, "disabled", "operator"), k)
        self.assertEqual(self.kp.key(a)["state"], "disabled")
        self.assertEqual(self.kp.key(a)["reason"], "operator")
        for _ in range(4):
            self.assertEqual(self.chat_ok(), key_id(b))
        self.assertEqual(self.sim.requests_with(a), [], "a disabled key gets no requests")
        wait_for(lambda: [e for e in self.kp.get_json(f"/api/history?key={A}")["events"]
                          if e["event"] == "disable" and e["from"] == A],
                 what="a disable event for the key in /api/history")

        doc = self.post_json(f"/api/keys/{A}/enable")
        self.assertEqual((doc["key"]["id"], doc["key"]["state"], doc["key"]["reason"]),
                         (A, "ready", None), doc)
        self.assertEqual(self.kp.key(a)["state"], "ready")
        served = [self.chat_ok() for _ in range(2)]
        self.assertIn(A, served, "an enabled key serves again")
        wait_for(lambda: [e for e in self.kp.get_json(f"/api/history?key={A}")["events"]
                          if e["event"] == "enable"],
                 what="an enable event for the key in /api/history")

    def test_enable_clears_a_cooldown_and_an_auth_disable(self):
        a, b, c = fake_secret(), fake_secret("invalid-"), fake_secret()
        self.start(a, b, c)
        self.sim.set_rules({a: {"status": 429, "retry_after": "600"}})
        for _ in range(3):
            self.chat_ok()
        self.assertEqual(self.kp.key(a)["state"], "cooling")
        self.assertEqual(self.kp.key(b)["state"], "disabled")
        self.sim.set_rules({a: None})
        for s in (a, b):
            doc = self.post_json(f"/api/keys/{key_id(s)}/enable")
            self.assertEqual(doc["key"]["state"], "ready", doc)
            self.assertEqual(self.kp.key(s)["cooldown_remaining_s"], 0)

    def test_probe_is_scheduled_at_once_and_restores_a_key_that_works_again(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        # A caller's 401 disables the key once keypool's own probe is refused too.
        self.sim.set_rules({a: {"status": 401, "count": 1, "models_status": 401}})
        self.assertEqual(self.chat_ok(), key_id(b))
        wait_for(lambda: self.kp.key(a)["reason"] == "auth", what="the confirming probe to disable the key")
        self.sim.set_rules({a: None})
        before = len(self.sim.requests_with(a))
        doc = self.post_json(f"/api/keys/{key_id(a)}/probe", expect=202)
        self.assertIs(doc.get("probing"), True, doc)
        wait_for(lambda: len(self.sim.requests_with(a)) > before,
                 what="the probe to reach the simulator with the key")
        wait_for(lambda: self.kp.key(a)["state"] == "ready",
                 what="the key to be ready after a successful probe")

    def test_probe_of_a_key_that_still_fails_leaves_it_disabled(self):
        a, b = fake_secret("invalid-"), fake_secret()
        self.start(a, b)
        self.chat_ok()
        wait_for(lambda: self.kp.key(a)["state"] == "disabled", what="the confirming probe to disable the key")
        before = len(self.sim.requests_with(a))
        self.post_json(f"/api/keys/{key_id(a)}/probe", expect=202)
        wait_for(lambda: len(self.sim.requests_with(a)) > before,
                 what="the probe to reach the simulator with the key")
        self.sim.finished_log()
        wait_for(lambda: self.kp.key(a)["last_status"] == 401, what="the probe's 401 recorded")
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"]), ("disabled", "auth"), k)

    def test_unknown_key_is_404_and_get_on_an_admin_path_is_405(self):
        a = fake_secret()
        self.start(a)
        before = self.snapshot()
        for action in ("disable", "enable", "probe"):
            status, _, body = self.post(f"/api/keys/kp-0000000000/{action}")
            self.assertEqual(status, 404, body)
            assert_api_error(self, body)
        status, _, body = self.post(f"/api/keys/{key_id(a)}/explode")
        self.assertEqual(status, 404, body)
        for path in (f"/api/keys/{key_id(a)}/disable", f"/api/keys/{key_id(a)}/enable",
                     f"/api/keys/{key_id(a)}/probe", "/api/state/export", "/api/state/import"):
            status, h, body = self.kp.request("GET", path)
            self.assertEqual(status, 405, f"GET {path}: {body[:200]!r}")
            assert_api_error(self, body)
            self.assertIn("POST", h.get("allow", ""), f"405 must say what is allowed: {h}")
        self.assertEqual(self.snapshot(), before)

    def test_an_id_in_several_pools_is_acted_on_everywhere(self):
        shared, x, y = fake_secret(), fake_secret(), fake_secret()
        self.start(pools=[{"name": "one", "model": "m/one", "keys": [shared, x]},
                          {"name": "two", "model": "m/two", "keys": [shared, y]}])
        self.post_json(f"/api/keys/{key_id(shared)}/disable")
        self.assertEqual([self.kp.key_in(p, shared)["state"] for p in ("one", "two")],
                         ["disabled", "disabled"])
        self.post_json(f"/api/keys/{key_id(shared)}/enable")
        self.assertEqual([self.kp.key_in(p, shared)["state"] for p in ("one", "two")],
                         ["ready", "ready"])

    # --- export, import ---

    def check_document(self, doc, kp):
        self.assertEqual((doc.get("format"), doc.get("version")), ("keypool-state", 1), doc)
        parse_rfc3339(doc["saved_at"])
        self.assertIsInstance(doc["keys"], list)
        self.assertIsInstance(doc["history"], list)
        text = json.dumps(doc)
        self.assertEqual(find_leaks(kp.secrets, text, "the state document"), [])
        for s in kp.secrets:
            self.assertNotIn(masked(s), text, "the state document needs no masked form")
        for k in doc["keys"]:
            for f in ("pool", "id", "state", "reason", "cooldown_until", "requests",
                      "successes", "rate_limited", "failures", "consecutive_failures",
                      "tokens_in", "tokens_out", "last_status", "last_class", "last_used"):
                self.assertIn(f, k, k)
        return {(k["pool"], k["id"]): k for k in doc["keys"]}

    def test_export_gives_the_state_document_and_import_takes_it_back(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start(a, b)
        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        self.chat_ok()
        self.chat_ok()
        doc = self.post_json("/api/state/export")
        keys = self.check_document(doc, kp)
        self.assertEqual(set(keys), {("main", key_id(a)), ("main", key_id(b))})
        ka = keys[("main", key_id(a))]
        self.assertEqual((ka["state"], ka["reason"], ka["rate_limited"]),
                         ("cooling", "rate_limited", 1), ka)
        self.assertGreater(parse_rfc3339(ka["cooldown_until"]), parse_rfc3339(doc["saved_at"]))
        self.assertEqual(keys[("main", key_id(b))]["successes"], 2)
        self.assertTrue([e for e in doc["history"] if e["event"] == "rotate"], doc["history"])

        before = self.snapshot()
        rep = self.post_json("/api/state/import", doc)
        self.assertEqual((rep.get("imported"), rep.get("ignored")), (2, 0), rep)
        self.assertEqual(self.snapshot(), before, "importing the current state changes nothing")
        self.assertGreater(self.kp.key(a)["cooldown_remaining_s"], 250)

    def test_import_moves_state_into_another_daemon(self):
        a, b = fake_secret(), fake_secret()
        first = self.start(a, b)
        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        self.chat_ok()
        doc = self.post_json("/api/state/export")
        stranger = {"pool": "main", "id": "kp-0123456789", "state": "disabled",
                    "reason": "operator", "cooldown_until": None, "requests": 0,
                    "successes": 0, "rate_limited": 0, "failures": 0,
                    "consecutive_failures": 0, "tokens_in": 0, "tokens_out": 0,
                    "last_status": None, "last_class": None, "last_used": None}
        doc["keys"].append(stranger)

        second = self.start_keypool(self.sim, pools=[{"name": "main", "model": MODEL,
                                                      "keys": [a, b]}])
        self.assertEqual(second.key(a)["state"], "ready")
        status, _, body = second.request("POST", "/api/state/import", doc)
        self.assertEqual(status, 200, body)
        rep = json.loads(body)
        self.assertEqual((rep["imported"], rep["ignored"]), (2, 1), rep)
        k = second.key(a)
        self.assertEqual((k["state"], k["reason"], k["rate_limited"]),
                         ("cooling", "rate_limited", 1), k)
        self.assertTrue(abs(k["cooldown_remaining_s"] - first.key(a)["cooldown_remaining_s"])
                        <= 3, k)
        self.assertEqual(second.key(b)["successes"], 1)

    def test_garbage_import_is_400_and_changes_nothing(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start(a, b)
        self.post_json(f"/api/keys/{key_id(a)}/disable")
        self.chat_ok()
        good = self.post_json("/api/state/export")
        before = self.snapshot()
        history = kp.get_json("/api/history")["events"]
        wrong_version = dict(good, version=99)
        for what, body in (("not JSON", b"this is not a state document {"),
                           ("a foreign document", {"hello": 1}),
                           ("a JSON array", [1, 2, 3]),
                           ("another version", wrong_version),
                           ("keys that is not a list", dict(good, keys="all of them")),
                           ("an empty body", b"")):
            with self.subTest(what):
                status, _, payload = self.kp.request(
                    "POST", "/api/state/import", body,
                    headers={"Content-Type": "application/json"})
                self.assertEqual(status, 400, payload[:300])
                assert_api_error(self, payload)
                self.assertEqual(self.snapshot(), before)
                self.assertEqual(kp.get_json("/api/history")["events"], history)

    # --- another uid ---

    def test_another_uid_may_read_but_not_act(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start(a, b, settings={"socket_mode": "0666"})
        make_socket_public(kp)
        self.chat_ok()
        before = self.snapshot()
        A = key_id(a)

        status, body = request_as_user(kp, "GET", "/api/key-status")
        self.assertEqual(status, 200, body[:300])
        self.assertEqual({k["id"] for p in json.loads(body)["pools"] for k in p["keys"]},
                         {A, key_id(b)})
        for path in ("/health", "/status", "/metrics", "/api/history"):
            status, body = request_as_user(kp, "GET", path)
            self.assertEqual(status, 200, f"GET {path} as nobody: {body[:200]!r}")

        for path, body in ((f"/api/keys/{A}/disable", None), (f"/api/keys/{A}/enable", None),
                           (f"/api/keys/{A}/probe", None), ("/api/state/export", None),
                           ("/api/state/import", self.post_json("/api/state/export"))):
            with self.subTest(path):
                n = len(self.sim.log())
                status, payload = request_as_user(kp, "POST", path, body)
                self.assertEqual(status, 403, payload[:300])
                assert_api_error(self, payload, code="forbidden")
                self.assertNotIn("keypool-state", payload.decode(), "no export for a stranger")
                self.assertEqual(self.snapshot(), before)
                self.assertEqual(len(self.sim.log()), n, "a refused probe sends nothing")


if __name__ == "__main__":
    unittest.main(verbosity=2)

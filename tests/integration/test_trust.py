#!/usr/bin/env python3
"""Trust (issue #10): a key never reaches anyone but its provider, and nothing a caller writes
changes a key's health.

Keys here have the shapes pattern-only redaction missed (letters and dots, letters only, 40
lowercase letters); the simulator echoes the header that carried the key in its error bodies, as
providers quoting a failed request do. Callers send a hostile model name that an unknown-model
answer quotes back, and choose a path on which a key answers 403."""

import json
import os
import random
import string
import subprocess
import tempfile
import unittest

from kptest import (KEYPOOLD, KeypoolTestCase, fake_secret, find_leaks, key_id, make_socket_public,
                    render_config, request_as_user, wait_for)

MODEL = "z-ai/glm-4.5"
HOSTILE_MODEL = "rate limit exceeded, retry in 3600s"


def _letters(n, alphabet=string.ascii_letters):
    return "".join(random.choice(alphabet) for _ in range(n))


def dotted_key():
    """An obviously fake key of letters and dots only."""
    return "fake.dotted." + ".".join(_letters(6) for _ in range(5))


def letters_key():
    """An obviously fake key of letters only."""
    return "FakeLettersOnly" + _letters(25)


def lower40_key():
    """An obviously fake key of 40 lowercase letters."""
    return "fake" + _letters(36, string.ascii_lowercase)


class TrustTest(KeypoolTestCase):

    def start(self, pools, **settings):
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, pools=pools,
                                     settings={"recovery_time": 900, **settings})
        return self.kp

    def texts_kept(self):
        """Everything keypool shows about its keys, as (where, text)."""
        out = []
        for path in ("/api/key-status", "/status", "/metrics", "/api/history"):
            status, _, body = self.kp.request("GET", path)
            out.append((path, body.decode(errors="replace")))
        out.append(("keypoold's stderr", self.kp.stderr()))
        return out

    def assert_nowhere(self, secrets):
        for where, text in self.texts_kept():
            for s in secrets:
                self.assertNotIn(s, text, f"secret {key_id(s)} in {where}")
            self.assertEqual(find_leaks(secrets, text, where), [])

    # --- a key never reaches anyone but its provider -------------------------------------------

    def test_keys_echoed_in_429_500_and_401_bodies_appear_nowhere(self):
        dotted, letters, lower = dotted_key(), letters_key(), lower40_key()
        good1, good2 = fake_secret(), fake_secret()
        kp = self.start([
            {"name": "p429", "model": "m/429", "keys": [dotted, good1]},
            {"name": "p500", "model": "m/500", "keys": [letters]},
            {"name": "p401", "model": "m/401", "keys": [lower, good2]},
        ], retry={"max_attempts": 2})
        self.sim.set_rules({
            dotted: {"status": 429, "retry_after": "60", "body": "Too many requests", "echo_auth": True},
            letters: {"status": 500, "body": "Internal error", "echo_auth": True},
            lower: {"status": 401, "body": "Invalid key", "echo_auth": True, "models_status": 401},
        })

        status, h, body = kp.chat("m/429")
        self.assertEqual((status, h.get("x-keypool-key")), (200, key_id(good1)), body)
        status, h, body = kp.chat("m/500")
        self.assertEqual(status, 500, body)
        text = body.decode()
        self.assertNotIn(letters, text, "the relayed error answer carries the key")
        self.assertIn("[redacted]", text)
        self.assertEqual(json.loads(body)["error"]["code"], 500, "still the upstream's JSON answer")
        status, h, body = kp.chat("m/401")
        self.assertEqual((status, h.get("x-keypool-key")), (200, key_id(good2)), body)
        wait_for(lambda: kp.key(lower)["state"] == "disabled", what="the probe to confirm the 401")

        for s in (dotted, letters, lower):
            k = kp.key(s)
            self.assertIn("[redacted]", k["last_error"] or "", k)
        self.assert_nowhere([dotted, letters, lower])

    def test_masked_form_of_a_24_character_key_is_its_id(self):
        short = "fake" + _letters(20, string.ascii_lowercase)
        kp = self.start([{"name": "p", "model": MODEL, "keys": [short]}])
        k = kp.key(short)
        self.assertEqual(k["masked"], key_id(short))

    def test_masked_form_hides_three_quarters_and_24_characters(self):
        keys = [fake_secret(), dotted_key(), letters_key(), lower40_key()]
        kp = self.start([{"name": "p", "model": MODEL, "keys": keys}])
        for s in keys:
            m = kp.key(s)["masked"]
            if m == key_id(s):
                continue
            prefix, _, tail = m.partition("...")
            self.assertTrue(s.startswith(prefix) and s.endswith(tail), m)
            rest = len(s) - len(prefix)
            self.assertLessEqual(len(tail), 4, m)
            self.assertLessEqual(len(tail) * 4, rest, m)
            self.assertGreaterEqual(rest - len(tail), 24, m)

    def test_check_config_warns_about_a_weak_key_without_showing_it(self):
        weak = "sk-or-v1-fakeshort"
        d = tempfile.mkdtemp(prefix="kptrust-")
        path = os.path.join(d, "keypool.conf")
        with open(path, "w") as f:
            f.write(render_config({
                "socket": os.path.join(d, "keypool.sock"),
                "providers": [{"name": "sim", "base_url": "http://127.0.0.1:9/api/v1"}],
                "pools": [{"name": "p", "provider": "sim", "model": MODEL,
                           "keys": [weak, fake_secret()]}],
            }))
        r = subprocess.run([KEYPOOLD, "--check-config", "-c", path], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stderr, rf"warning: pool 'p' key 1 \({key_id(weak)}\) is weak")
        self.assertEqual(r.stderr.count("is weak"), 1, r.stderr)
        self.assertNotIn(weak, r.stderr + r.stdout)

    # --- nothing a caller writes changes a key's health ----------------------------------------

    def test_hostile_model_quoted_by_a_caller_error_cools_no_key(self):
        a = fake_secret()
        kp = self.start([{"name": "p", "model": MODEL, "keys": [a]}])
        for status in (404, 400, 422, 413):
            code, _, body = kp.chat(HOSTILE_MODEL, headers={
                "X-Keypool-Pool": "p", "X-Sim-Unknown-Model": str(status), "X-Sim-Retry-After": "3600"})
            self.assertEqual(code, status, body)
            self.assertIn(HOSTILE_MODEL, body.decode(), "the upstream's answer reaches the caller")
            k = kp.key(a)
            self.assertEqual((k["state"], k["rate_limited"]), ("ready", 0), f"after a {status}: {k}")
        self.assertEqual(kp.chat(MODEL)[0], 200)

    def test_403_on_a_caller_chosen_path_moves_on_and_leaves_the_key_in_service(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start([{"name": "p", "model": MODEL, "keys": [a, b]}], socket_mode="0666")
        make_socket_public(kp)
        self.sim.set_rules({a: {"status": 403, "body": "this key has no scope for that endpoint",
                                "count": 1, "models_status": 200}})

        status, body = request_as_user(kp, "POST", "/v1/embeddings",
                                       {"model": MODEL, "input": "hello"})
        self.assertEqual(status, 200, body)
        wait_for(lambda: any(e["path"].endswith("/models") and e.get("key_id") == key_id(a)
                             and e.get("end_time") for e in self.sim.log()),
                 what="the confirmation probe of the refused key")
        k = kp.key(a)
        self.assertEqual(k["state"], "ready", k)
        served = {kp.chat(MODEL)[1].get("x-keypool-key") for _ in range(4)}
        self.assertIn(key_id(a), served, "the key refused on the caller's path still serves")

    def test_401_disables_the_key_only_once_the_probe_confirms_it(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start([{"name": "p", "model": MODEL, "keys": [a, b]}])
        self.sim.set_rules({a: {"status": 401, "models_status": 401}})
        status, h, body = kp.chat(MODEL)
        self.assertEqual((status, h.get("x-keypool-key")), (200, key_id(b)), body)
        wait_for(lambda: kp.key(a)["state"] == "disabled", what="the probe's 401 to disable the key")
        self.assertEqual(kp.key(a)["reason"], "auth")

    def test_a_refusal_in_a_single_key_pool_goes_back_to_the_caller(self):
        a = fake_secret()
        kp = self.start([{"name": "p", "model": MODEL, "keys": [a]}])
        self.sim.set_rules({a: {"status": 403, "body": "no scope", "models_status": 200,
                                "echo_auth": True}})
        status, h, body = kp.chat(MODEL)
        self.assertEqual((status, h.get("x-keypool-attempts")), (403, "1"), body)
        self.assertNotIn(a, body.decode())
        self.assertEqual(kp.key(a)["state"], "ready")


if __name__ == "__main__":
    unittest.main()

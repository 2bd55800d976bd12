#!/usr/bin/env python3
"""The optional TCP listener: the same API as the socket on http_listen, bearer tokens
(client_tokens, stored as SHA-256) on every TCP request when configured, admin over TCP only with
a token, and no address beyond loopback unless http_allow_remote."""

import hashlib
import json
import secrets
import subprocess
import unittest

from kptest import (KEYPOOLD, Keypool, KeypoolTestCase, assert_api_error, fake_secret,
                    find_leaks, free_tcp_port, key_id, tcp_request, wait_for)

MODEL = "z-ai/glm-4.5"


def client_token():
    """An obviously fake client token."""
    return "test-client-token-" + secrets.token_hex(16)


class TcpTest(KeypoolTestCase):

    def start(self, *keys, tokens=(), **settings):
        self.sim = self.start_sim()
        self.port = free_tcp_port()
        s = {"http_listen": f"127.0.0.1:{self.port}", "recovery_time": 900}
        if tokens:
            s["client_tokens"] = [hashlib.sha256(t.encode()).hexdigest() for t in tokens]
        s.update(settings)
        self.kp = self.start_keypool(self.sim, pools=[{"name": "main", "model": MODEL,
                                                       "keys": list(keys)}],
                                     settings=s)
        # Tokens are secrets too: the leak checks look for them everywhere.
        self.kp.secrets += list(tokens)
        wait_for(lambda: self.tcp("GET", "/health")[0] in (200, 401, 503),
                 what="the TCP listener to answer", ignore=(OSError,))
        return self.kp

    def tcp(self, method, path, body=None, token=None, headers=None):
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = "Bearer " + token
        return tcp_request(self.kp, self.port, method, path, body, h)

    def chat_body(self):
        return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}

    def test_the_api_and_the_proxy_are_served_over_tcp(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        status, h, body = self.tcp("GET", "/health")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["status"], "ok")
        status, _, body = self.tcp("GET", "/api/key-status")
        self.assertEqual(status, 200, body)
        self.assertEqual({k["id"] for p in json.loads(body)["pools"] for k in p["keys"]},
                         {key_id(a), key_id(b)})
        for path in ("/status", "/api/history", "/metrics"):
            status, _, body = self.tcp("GET", path)
            self.assertEqual(status, 200, f"GET {path} over TCP: {body[:200]!r}")
        self.assertEqual(json.loads(self.tcp("GET", "/status")[2])["pid"], self.kp.pid)

        status, h, body = self.tcp("POST", "/v1/chat/completions", self.chat_body())
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"],
                         "Hello from the keypool simulator.")
        self.assertIn(h.get("x-keypool-key"), (key_id(a), key_id(b)))
        self.assertEqual([e["key_id"] for e in self.sim.log()], [h["x-keypool-key"]])

    def test_client_tokens_are_required_on_tcp_and_never_forwarded(self):
        a = fake_secret()
        good, other = client_token(), client_token()
        self.start(a, tokens=[good])
        for what, token in (("no token", None), ("a wrong token", other),
                            ("the hash instead of the token",
                             hashlib.sha256(good.encode()).hexdigest())):
            with self.subTest(what):
                for method, path, body in (("GET", "/health", None),
                                           ("GET", "/api/key-status", None),
                                           ("POST", "/v1/chat/completions", self.chat_body())):
                    status, _, payload = self.tcp(method, path, body, token=token)
                    self.assertEqual(status, 401, f"{method} {path} with {what}: {payload[:200]!r}")
                    assert_api_error(self, payload)
        self.assertEqual(self.sim.log(), [], "a refused request never reaches the provider")
        status, _, body = self.tcp("GET", "/api/key-status", headers={"Authorization": "Basic xx"})
        self.assertEqual(status, 401, body)

        status, _, body = self.tcp("GET", "/health", token=good)
        self.assertEqual(status, 200, body)
        status, _, body = self.tcp("GET", "/api/key-status", token=good)
        self.assertEqual(status, 200, body)
        status, h, body = self.tcp("POST", "/v1/chat/completions", self.chat_body(), token=good)
        self.assertEqual(status, 200, body)
        log = self.sim.log()
        self.assertEqual([e["key_id"] for e in log], [key_id(a)],
                         "upstream sees the pool's key, not the client's token")
        self.assertNotEqual(log[0]["key_id"], key_id(good))
        self.assertEqual(log[0]["auth_headers"], ["authorization"], log[0])
        self.assertEqual(find_leaks([good], json.dumps(log), "the simulator's log"), [])

        # The socket is not the TCP listener: no token there.
        status, _, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)

    def test_admin_over_tcp_needs_a_token(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        for path in (f"/api/keys/{key_id(a)}/disable", "/api/state/export"):
            status, _, body = self.tcp("POST", path)
            self.assertIn(status, (401, 403), f"POST {path} over TCP without tokens: {body!r}")
            assert_api_error(self, body)
        self.assertEqual(self.kp.key(a)["state"], "ready", "a refused disable changes nothing")

    def test_admin_over_tcp_with_an_admin_token_is_allowed(self):
        a, b = fake_secret(), fake_secret()
        good = client_token()
        self.start(a, b, tokens=[good],
                   admin_tokens=[hashlib.sha256(good.encode()).hexdigest()])
        status, _, body = self.tcp("POST", f"/api/keys/{key_id(a)}/disable")
        self.assertEqual(status, 401, body)
        self.assertEqual(self.kp.key(a)["state"], "ready")
        status, _, body = self.tcp("POST", f"/api/keys/{key_id(a)}/disable", token=good)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["key"]["state"], "disabled")
        self.assertEqual((self.kp.key(a)["state"], self.kp.key(a)["reason"]),
                         ("disabled", "operator"))
        status, _, body = self.tcp("POST", "/api/state/export", token=good)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["format"], "keypool-state")

    def test_a_non_loopback_address_needs_http_allow_remote(self):
        a = fake_secret()
        sim = self.start_sim()
        for listen in ("0.0.0.0:8002", "[::]:8002"):
            with self.subTest(listen):
                kp = Keypool(sim, pools=[{"name": "main", "model": MODEL, "keys": [a]}],
                             settings={"http_listen": listen}, start=False)
                self.addCleanup(kp.cleanup)
                r = subprocess.run([KEYPOOLD, "--check-config", "-c", kp.config_path],
                                   capture_output=True, text=True, timeout=30)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn("http_listen", r.stderr + r.stdout,
                              "the refusal names the setting")
                self.assertEqual(find_leaks([a], r.stdout + r.stderr, "--check-config"), [])
        kp = Keypool(sim, pools=[{"name": "main", "model": MODEL, "keys": [a]}],
                     settings={"http_listen": "0.0.0.0:8002", "http_allow_remote": True},
                     start=False)
        self.addCleanup(kp.cleanup)
        r = subprocess.run([KEYPOOLD, "--check-config", "-c", kp.config_path],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

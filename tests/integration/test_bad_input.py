#!/usr/bin/env python3
"""Bad input costs nothing: each bad request gets its 4xx (or a closed connection), no key's
health changes, nothing reaches the upstream, and the daemon goes on serving."""

import json
import socket
import unittest

from kptest import (DEADLINE, KeypoolTestCase, fake_secret, parse_raw_response,
                    raw_response_complete, wait_for)

MODEL = "z-ai/glm-4.5"
MAX_BODY = 1048576


def chat_body(**extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    body.update(extra)
    return json.dumps(body).encode()


def post(path, body, extra_headers=b""):
    return (b"POST %s HTTP/1.1\r\nHost: keypool\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (path, extra_headers, len(body), body))


class BadInputTest(KeypoolTestCase):

    workers = 1

    def setUp(self):
        self.sim = self.start_sim()
        self.secrets = [fake_secret(), fake_secret()]
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": "GLM45", "model": MODEL, "keys": self.secrets}],
            settings={"workers": self.workers, "max_body": MAX_BODY, "client_timeout": 1})

    def tearDown(self):
        self.assert_nothing_was_spent()

    def assert_nothing_was_spent(self):
        """Every key untouched, the upstream unbothered, and the daemon still serving."""
        for k in self.kp.keys().values():
            self.assertEqual((k["state"], k["reason"], k["requests"], k["failures"],
                              k["rate_limited"], k["in_flight"]),
                             ("ready", None, 0, 0, 0, 0), f"bad input changed key {k}")
        self.assertEqual(self.sim.log(), [], "bad input must not reach the upstream")
        status, doc = self.kp.health()
        self.assertEqual((status, doc["status"]), (200, "ok"))
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.sim.log()), 1)

    def raw_status(self, data):
        """Sends raw bytes; returns the answer's (status, headers, body) or None if closed."""
        got, closed = self.kp.raw(data)
        if not got:
            self.assertTrue(closed, f"no answer and no close within {DEADLINE:g}s")
            return None
        resp = parse_raw_response(got)
        self.assertIsNotNone(resp, f"not an HTTP response: {got[:300]!r}")
        return resp

    # --- malformed HTTP ---

    def check_malformed(self, data):
        resp = self.raw_status(data)
        if resp is not None:
            status, h, body = resp
            self.assertEqual(status, 400, f"malformed HTTP {data[:60]!r} got {status}")
            self.assertOpenAIError(body)

    def test_garbage_request_line_gets_400_or_a_closed_connection(self):
        self.check_malformed(b"HELLO THERE\r\n\r\n")

    def test_binary_garbage_gets_400_or_a_closed_connection(self):
        self.check_malformed(b"\x00\x01\x02\xff\xfe not http at all \r\n\r\n")

    def test_bad_content_length_gets_400_or_a_closed_connection(self):
        self.check_malformed(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n"
                             b"Content-Length: twelve\r\n\r\n{}")

    def test_header_without_colon_gets_400_or_a_closed_connection(self):
        self.check_malformed(b"GET /health HTTP/1.1\r\nHost: k\r\nthis is no header\r\n\r\n")

    # --- bad requests that parse ---

    def test_body_that_is_not_json_gets_400(self):
        status, _, body = self.kp.request("POST", "/v1/chat/completions", b"this is {not json",
                                          {"Content-Type": "application/json"})
        self.assertEqual(status, 400, body)
        self.assertOpenAIError(body)

    def test_json_that_is_not_an_object_gets_400(self):
        status, _, body = self.kp.request("POST", "/v1/chat/completions", [1, 2, 3])
        self.assertEqual(status, 400, body)
        self.assertOpenAIError(body)

    def test_body_without_model_gets_400(self):
        status, _, body = self.kp.request("POST", "/v1/chat/completions",
                                          {"messages": [{"role": "user", "content": "Hi"}]})
        self.assertEqual(status, 400, body)
        self.assertOpenAIError(body)

    def test_empty_body_gets_400(self):
        status, _, body = self.kp.request("POST", "/v1/chat/completions", b"")
        self.assertEqual(status, 400, body)
        self.assertOpenAIError(body)

    def test_unknown_model_gets_404(self):
        status, _, body = self.kp.chat("no-such/model-9000")
        self.assertEqual(status, 404, body)
        self.assertOpenAIError(body)

    def test_unknown_pool_header_gets_404(self):
        status, _, body = self.kp.chat(MODEL, headers={"X-Keypool-Pool": "NOSUCHPOOL"})
        self.assertEqual(status, 404, body)
        self.assertOpenAIError(body)

    def test_unknown_path_gets_404(self):
        for method, path in (("GET", "/nope"), ("POST", "/api/nope"), ("GET", "/v2/models")):
            status, _, body = self.kp.request(method, path)
            self.assertEqual(status, 404, f"{method} {path}: {body!r}")
            self.assertOpenAIError(body)

    def test_wrong_method_on_a_known_path_gets_405(self):
        status, _, body = self.kp.request("POST", "/health", b"{}")
        self.assertEqual(status, 405, body)
        self.assertOpenAIError(body)

    def test_body_over_max_body_gets_413(self):
        filler = "x" * (2 * MAX_BODY)
        resp = self.raw_status(post(b"/v1/chat/completions",
                                    chat_body(padding=filler)))
        self.assertIsNotNone(resp, "a body over max_body must get 413, not just a close")
        status, _, body = resp
        self.assertEqual(status, 413, body[:300])
        self.assertOpenAIError(body)

    def test_headers_over_16k_get_431(self):
        big = b"X-Big: " + b"a" * 20000 + b"\r\n"
        resp = self.raw_status(post(b"/v1/chat/completions", chat_body(), big))
        self.assertIsNotNone(resp, "headers over max_header must get 431, not just a close")
        status, _, body = resp
        self.assertEqual(status, 431, body[:300])
        self.assertOpenAIError(body)

    def test_many_small_headers_over_16k_get_431(self):
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
        resp = self.raw_status(post(b"/v1/chat/completions", chat_body(), many))
        self.assertIsNotNone(resp)
        self.assertEqual(resp[0], 431, resp[2][:300])

    # --- silent clients ---

    def assert_dropped(self, data, what):
        got, closed = self.kp.raw(data, stop_when_complete=False)
        self.assertTrue(closed, f"{what}: still open after {DEADLINE:g}s (client_timeout = 1)")
        if got:
            resp = parse_raw_response(got)
            self.assertIsNotNone(resp, f"{what}: not HTTP: {got[:200]!r}")
            self.assertEqual(resp[0], 408, f"{what}: only a 408 may precede the close")

    def test_silent_client_is_disconnected(self):
        self.assert_dropped(b"", "a client that sends nothing")

    def test_client_silent_in_the_middle_of_its_headers_is_disconnected(self):
        self.assert_dropped(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n",
                            "a client that stops inside its headers")

    def test_client_silent_in_the_middle_of_its_body_is_disconnected(self):
        self.assert_dropped(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n"
                            b"Content-Length: 100\r\n\r\n{\"model\":",
                            "a client that stops inside its body")

    def test_idle_keep_alive_connection_is_closed(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(self.kp.socket_path)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: k\r\n\r\n")
            data = b""
            while not raw_response_complete(data):
                chunk = s.recv(65536)
                self.assertTrue(chunk, "closed before the answer")
                data += chunk
            self.assertEqual(parse_raw_response(data)[0], 200)
            # Now say nothing: the server must hang up (EOF), well within the deadline.
            rest = s.recv(65536)
            while rest:
                rest = s.recv(65536)
        except socket.timeout:
            self.fail(f"an idle keep-alive connection was still open after {DEADLINE:g}s")
        finally:
            s.close()


class AllBadInputsInARowTest(KeypoolTestCase):
    """Every bad input above, one after another against one two-worker daemon."""

    def test_all_bad_inputs_in_a_row_cost_nothing(self):
        sim = self.start_sim()
        kp = self.start_keypool(sim, pools=[
            {"name": "GLM45", "model": MODEL, "keys": [fake_secret(), fake_secret()]},
            {"name": "KIMI", "model": "moonshotai/kimi-k2", "keys": [fake_secret()]}],
            settings={"workers": 2, "max_body": MAX_BODY, "client_timeout": 1})
        for data in (b"HELLO THERE\r\n\r\n", b"\x00\x01\xff\r\n\r\n",
                     b"POST /v1/x HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
                     post(b"/v1/chat/completions", b"not json"),
                     post(b"/v1/chat/completions", b'{"messages":[]}'),
                     post(b"/v1/chat/completions", b'{"model":"no/such"}'),
                     post(b"/v1/chat/completions", chat_body(), b"X-Keypool-Pool: NOPE\r\n"),
                     post(b"/nowhere", b"{}"),
                     post(b"/v1/chat/completions", chat_body(padding="y" * 2 * MAX_BODY)),
                     post(b"/v1/chat/completions", chat_body(),
                          b"X-Big: " + b"b" * 20000 + b"\r\n"),
                     b"", b"POST /v1/chat/completions HTTP/1.1\r\n"):
            got, closed = kp.raw(data)
            if got:
                resp = parse_raw_response(got)
                self.assertIsNotNone(resp, f"{data[:40]!r}: not HTTP: {got[:200]!r}")
                self.assertIn(resp[0], (400, 404, 408, 413, 431), f"{data[:40]!r}")
            else:
                self.assertTrue(closed, f"{data[:40]!r}: neither answered nor closed")
        for k in kp.keys().values():
            self.assertEqual((k["state"], k["requests"], k["failures"], k["rate_limited"]),
                             ("ready", 0, 0, 0), k)
        self.assertEqual(sim.log(), [])
        self.assertEqual(kp.health()[0], 200)
        for model in (MODEL, "KIMI"):
            status, _, body = kp.chat(model)
            self.assertEqual(status, 200, body)
        wait_for(lambda: len(sim.log()) == 2, what="both good requests to reach the upstream")


if __name__ == "__main__":
    unittest.main(verbosity=2)

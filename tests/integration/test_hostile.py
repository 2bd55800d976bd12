#!/usr/bin/env python3
"""The HTTP front treats callers as hostile: a target that cannot be sent as written, a header
that could slip past the fields keypool drops, a client that trickles, a flood of connections
past the descriptor limit, bodies past the worker's budget, HEAD, half-closed pipelines, and
admin actions over TCP only with an admin token."""

import hashlib
import json
import os
import re
import resource
import secrets
import socket
import time
import unittest

from kptest import (KeypoolTestCase, assert_api_error, fake_secret, free_tcp_port,
                    key_id, parse_raw_response, tcp_request, wait_for)

MODEL = "z-ai/glm-4.5"


def chat_body():
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}).encode()


def post(target, body=None, extra=b""):
    body = chat_body() if body is None else body
    return (b"POST %s HTTP/1.1\r\nHost: keypool\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (target, extra, len(body), body))


class HostileTest(KeypoolTestCase):

    def start(self, **settings):
        self.sim = self.start_sim()
        self.secret = fake_secret()
        s = {"workers": 1}
        s.update(settings)
        self.kp = self.start_keypool(self.sim, pools=[{"name": "main", "model": MODEL,
                                                       "keys": [self.secret]}], settings=s)
        return self.kp

    def assert_bad_request(self, data, what):
        got, closed = self.kp.raw(data)
        parsed = parse_raw_response(got)
        self.assertIsNotNone(parsed, f"no answer to {what}: {got!r}")
        status, h, body = parsed
        self.assertEqual(status, 400, f"{what}: {body!r}")
        self.assertIn("application/json", h.get("content-type", ""))
        self.assertOpenAIError(body)

    def assert_key_untouched(self):
        self.assertEqual(self.sim.log(), [], "nothing may reach the upstream")
        self.assertEqual(self.kp.key(self.secret)["requests"], 0, "no key may be chosen")

    # --- targets -------------------------------------------------------------------------------

    def test_targets_that_cannot_be_sent_as_written_are_400_before_any_key_is_chosen(self):
        self.start()
        targets = [
            b"/v1/../../x", b"/v1/./chat/completions", b"/v1/chat/..", b"/v1/%2e%2e/x",
            b"/v1/%2E%2e/x", b"/v1/%2e/x", b"/v1/.%2E/x", b"/v1/a%2fb", b"/v1/a%2F..%2Fb",
            b"/v1/chat\x01completions", b"/v1/chat\x7f", b"/v1/chat\tcompletions",
            b"/v1/%zz", b"/v1/%4", b"/v1/chat#frag", b"v1/chat/completions",
        ]
        for t in targets:
            with self.subTest(target=t):
                self.assert_bad_request(post(t), f"POST {t!r}")
        # A space inside the target splits the request line: still the caller's fault.
        self.assert_bad_request(b"POST /v1/a b/c HTTP/1.1\r\nHost: k\r\nContent-Length: 0\r\n\r\n",
                                "a space in the target")
        self.assert_key_untouched()
        # What is fine stays fine.
        status, _, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)

    # --- header fields -------------------------------------------------------------------------

    def test_header_fields_that_break_rfc9112_are_400_and_never_forwarded(self):
        self.start()
        cases = [
            ("whitespace before the colon", post(b"/v1/chat/completions",
                                                 extra=b"Authorization : Bearer sk-fake-caller\r\n")),
            ("a tab before the colon", post(b"/v1/chat/completions",
                                            extra=b"Authorization\t: Bearer sk-fake-caller\r\n")),
            ("obs-fold", post(b"/v1/chat/completions",
                              extra=b"X-Note: a\r\n Authorization: Bearer sk-fake-caller\r\n")),
            ("obs-fold with a tab", post(b"/v1/chat/completions",
                                         extra=b"X-Note: a\r\n\tmore\r\n")),
            ("no Host on HTTP/1.1", b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ]
        for what, data in cases:
            with self.subTest(what):
                self.assert_bad_request(data, what)
        self.assert_key_untouched()
        # HTTP/1.0 needs no Host.
        got, _ = self.kp.raw(b"GET /health HTTP/1.0\r\n\r\n")
        self.assertEqual(parse_raw_response(got)[0], 200, got)

    # --- slow clients --------------------------------------------------------------------------

    def trickle(self, head, data, seconds):
        """Sends head, then data a byte at a time for up to `seconds`; returns (answer, closed)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.kp.socket_path)
        s.settimeout(0.2)
        got = b""
        try:
            s.sendall(head)
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                try:
                    s.send(data[i % len(data):i % len(data) + 1])
                except OSError:
                    break
                i += 1
                try:
                    chunk = s.recv(65536)
                    if chunk == b"":
                        return got, True
                    got += chunk
                except socket.timeout:
                    pass
                except OSError:
                    return got, True
            # Whatever is left after the server stopped reading.
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return got, True
                    got += chunk
            except OSError:
                return got, bool(got)
        finally:
            s.close()

    def test_a_head_that_trickles_is_answered_408_and_closed(self):
        self.start(header_timeout=2, client_timeout=60)
        got, closed = self.trickle(b"GET /health HTTP/1.1\r\n", b"X-Slow: aaaaaaaa\r\n", 8)
        self.assertTrue(closed, "a trickling head must be cut off at header_timeout")
        parsed = parse_raw_response(got)
        self.assertIsNotNone(parsed, f"no 408 before the close: {got!r}")
        self.assertEqual(parsed[0], 408, got)
        self.assertOpenAIError(parsed[2])

    def test_a_body_that_trickles_is_answered_408_and_closed(self):
        self.start(header_timeout=2, body_min_rate=1024, client_timeout=60)
        body = chat_body() + b" " * 100000
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        got, closed = self.trickle(head, b" ", 10)
        self.assertTrue(closed, "a body below body_min_rate must be cut off")
        parsed = parse_raw_response(got)
        self.assertIsNotNone(parsed, f"no 408 before the close: {got!r}")
        self.assertEqual(parsed[0], 408, got)
        self.assert_key_untouched()

    def test_hundreds_of_trickling_connections_do_not_keep_a_request_waiting(self):
        self.start(header_timeout=5, client_timeout=60)
        socks = []
        try:
            for _ in range(300):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.kp.socket_path)
                s.setblocking(False)
                s.send(b"GET /health HTTP/1.1\r\n")
                socks.append(s)
            for s in socks:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            t0 = time.monotonic()
            status, _, body = self.kp.chat(MODEL)
            self.assertEqual(status, 200, body)
            self.assertLess(time.monotonic() - t0, 5, "a normal request waited on the tricklers")
        finally:
            for s in socks:
                s.close()

    # --- descriptor exhaustion -----------------------------------------------------------------

    def test_a_connection_flood_past_the_descriptor_limit_neither_spins_nor_floods_the_log(self):
        kp = self.start(client_timeout=60)
        workers = [p for p in kp.process_ids() if p != kp.pid]
        self.assertTrue(workers, "no worker found")
        for pid in workers:
            # A new descriptor takes the lowest free number, which must stay below the limit:
            # room for a few dozen beyond what the worker holds already.
            top = max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (top + 32, top + 32))
        log_before = len(kp.stderr().splitlines())
        cpu_before = kp.cpu_seconds()
        socks = []
        try:
            end = time.monotonic() + 3
            while time.monotonic() < end and len(socks) < 400:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(kp.socket_path)
                except BlockingIOError:
                    s.close()
                    time.sleep(0.01)
                    continue
                socks.append(s)
            time.sleep(2)
            lines = kp.stderr().splitlines()[log_before:]
            self.assertLess(len(lines), 60, "the log must be rate limited:\n"
                            + "\n".join(lines[:20]))
            self.assertLess(kp.cpu_seconds() - cpu_before, 3.0, "the worker spun on accept")
        finally:
            for s in socks:
                s.close()
        status, doc = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(kp.health()),
                               timeout=10, what="/health once the flood is over",
                               ignore=(OSError,))
        self.assertEqual(doc["status"], "ok")

    # --- body budget ---------------------------------------------------------------------------

    def test_bodies_beyond_the_workers_budget_get_503_with_retry_after(self):
        self.start(body_budget=65536, max_body=1048576, client_timeout=60)
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.connect(self.kp.socket_path)
        try:
            holder.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
                           + b"{" + b" " * 30000)
            time.sleep(0.3)
            body = chat_body() + b" " * 20000
            got, _ = self.kp.raw(post(b"/v1/chat/completions", body))
            parsed = parse_raw_response(got)
            self.assertIsNotNone(parsed, f"no answer: {got!r}")
            status, h, rbody = parsed
            self.assertEqual(status, 503, rbody)
            self.assertIn("retry-after", h)
            self.assertOpenAIError(rbody)
        finally:
            holder.close()
        # The budget comes back when the holder goes.
        wait_for(lambda: self.kp.chat(MODEL)[0] == 200, timeout=10,
                 what="a request to be served once the budget is free")

    # --- HEAD and half-close -------------------------------------------------------------------

    def test_head_answers_carry_no_body(self):
        self.start()
        got, _ = self.kp.raw(b"HEAD /health HTTP/1.1\r\nHost: k\r\n\r\n"
                             b"GET /health HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n",
                             stop_when_complete=False)
        first_end = got.index(b"\r\n\r\n") + 4
        self.assertTrue(got.startswith(b"HTTP/1.1 200"), got)
        self.assertTrue(got[first_end:].startswith(b"HTTP/1.1 200"),
                        f"HEAD's answer carried a body: {got!r}")

    def test_pipelined_requests_before_a_half_close_are_all_answered(self):
        self.start()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.kp.socket_path)
        self.assert_half_closed_pipeline_answered(s)

    def test_pipelined_requests_before_a_half_close_over_tcp_are_all_answered(self):
        port = free_tcp_port()
        self.start(http_listen=f"127.0.0.1:{port}")
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.assert_half_closed_pipeline_answered(s)

    def assert_half_closed_pipeline_answered(self, s):
        s.sendall(b"GET /health HTTP/1.1\r\nHost: k\r\n\r\n" * 3
                  + post(b"/v1/chat/completions")
                  + b"GET /status HTTP/1.1\r\nHost: k\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        finally:
            s.close()
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", got)
        self.assertEqual(statuses, [b"200"] * 5, got[-2000:])

    # --- admin tokens over TCP -----------------------------------------------------------------

    def test_a_plain_token_cannot_disable_a_key_over_tcp_and_an_admin_token_can(self):
        plain = "test-plain-token-" + secrets.token_hex(16)
        admin = "test-admin-token-" + secrets.token_hex(16)
        port = free_tcp_port()
        self.start(http_listen=f"127.0.0.1:{port}",
                   client_tokens=[hashlib.sha256(plain.encode()).hexdigest()],
                   admin_tokens=[hashlib.sha256(admin.encode()).hexdigest()])
        self.kp.secrets += [plain, admin]
        path = f"/api/keys/{key_id(self.secret)}/disable"

        def tcp(token=None, method="POST", p=path):
            h = {"Authorization": "Bearer " + token} if token else {}
            return tcp_request(self.kp, port, method, p, None, h)

        wait_for(lambda: tcp(method="GET", p="/health")[0] == 401, ignore=(OSError,),
                 what="the TCP listener")
        status, _, body = tcp()
        self.assertEqual(status, 401, body)
        err = assert_api_error(self, body)
        self.assertNotIn("…", err["message"])
        self.assertIn("Authorization", err["message"])
        status, _, body = tcp("not-a-configured-token")
        self.assertEqual(status, 401, body)
        self.assertNotIn("…", assert_api_error(self, body)["message"])
        # The plain token uses the API …
        self.assertEqual(tcp(plain, "GET", "/health")[0], 200)
        # … but does not steer keys.
        status, _, body = tcp(plain)
        self.assertEqual(status, 403, body)
        self.assertEqual(self.kp.key(self.secret)["state"], "ready")
        status, _, body = tcp(admin)
        self.assertEqual(status, 200, body)
        self.assertEqual(self.kp.key(self.secret)["state"], "disabled")


if __name__ == "__main__":
    unittest.main()

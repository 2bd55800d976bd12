#!/usr/bin/env python3
"""Proxying: routing, what is forwarded upstream and what comes back, keep-alive, streams."""

import json
import re
import select
import socket
import unittest

from kptest import (DEADLINE, SIM_REPLY, KeypoolTestCase, dechunk, fake_secret, key_id, masked,
                    parse_raw_response, raw_response_complete, sse_events, wait_for)

GLM = ("GLM45", "z-ai/glm-4.5")
KIMI = ("KIMI", "moonshotai/kimi-k2")


class ProxyTest(KeypoolTestCase):

    def setUp(self):
        self.sim = self.start_sim()
        self.glm = [fake_secret(), fake_secret()]
        self.kimi = [fake_secret()]
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": GLM[0], "model": GLM[1], "keys": self.glm},
            {"name": KIMI[0], "model": KIMI[1], "keys": self.kimi},
        ])

    def only_request(self):
        log = self.sim.log()
        self.assertEqual(len(log), 1, f"the simulator saw {len(log)} requests, expected 1")
        return log[0]

    def test_model_id_routes_to_that_pools_primary_key(self):
        status, h, body = self.kp.chat(KIMI[1])
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], SIM_REPLY)
        self.assertEqual(h.get("x-keypool-pool"), "KIMI")
        self.assertEqual(h.get("x-keypool-key"), key_id(self.kimi[0]))
        self.assertEqual(h.get("x-keypool-attempts"), "1")
        seen = self.only_request()
        self.assertEqual(seen["key_id"], key_id(self.kimi[0]))
        self.assertEqual(seen["path"], "/api/v1/chat/completions")
        self.assertEqual(seen["model"], KIMI[1])

    def test_pool_name_routes_and_upstream_gets_the_model_id(self):
        status, h, body = self.kp.chat("GLM45", temperature=0.25, max_tokens=7)
        self.assertEqual(status, 200, body)
        self.assertEqual(h.get("x-keypool-pool"), "GLM45")
        seen = self.only_request()
        self.assertEqual(seen["model"], GLM[1], "the pool name must be replaced by the model id")
        self.assertEqual(seen["body"], {"model": GLM[1],
                                        "messages": [{"role": "user", "content": "Hi"}],
                                        "temperature": 0.25, "max_tokens": 7},
                         "the rest of the body must pass unchanged")
        self.assertEqual(seen["key_id"], h.get("x-keypool-key"))

    def test_answer_names_the_key_the_upstream_saw(self):
        for model in (GLM[1], KIMI[1], GLM[1]):
            status, h, body = self.kp.chat(model)
            self.assertEqual(status, 200, body)
            self.assertEqual(self.sim.log()[-1]["key_id"], h.get("x-keypool-key"))
            self.assertEqual(h.get("x-keypool-attempts"), "1")

    def test_pool_header_selects_the_pool_when_the_body_has_no_model(self):
        status, h, body = self.kp.request(
            "POST", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}]}, {"X-Keypool-Pool": "KIMI"})
        self.assertEqual(status, 200, body)
        self.assertEqual(h.get("x-keypool-pool"), "KIMI")
        self.assertEqual(self.only_request()["key_id"], key_id(self.kimi[0]))

    def test_pool_header_wins_over_the_body_model(self):
        status, h, body = self.kp.chat(GLM[1], headers={"X-Keypool-Pool": "KIMI"})
        self.assertEqual(status, 200, body)
        self.assertEqual(h.get("x-keypool-pool"), "KIMI")
        seen = self.only_request()
        self.assertEqual(seen["key_id"], key_id(self.kimi[0]))
        self.assertNotIn("x-keypool-pool", seen["headers"], "X-Keypool-* must not go upstream")

    def test_client_authorization_is_not_forwarded(self):
        client_secret = fake_secret("client-")
        self.kp.secrets.append(client_secret)
        status, h, body = self.kp.chat(GLM[1],
                                       headers={"Authorization": "Bearer " + client_secret})
        self.assertEqual(status, 200, body)
        seen = self.only_request()
        self.assertEqual(seen["key_id"], key_id(self.glm[0]),
                         "upstream must see the pool's key, not the client's")
        self.assertNotEqual(seen["key_id"], key_id(client_secret))
        self.assertNotIn(client_secret, json.dumps(seen))

    def test_hop_by_hop_headers_are_dropped_and_custom_headers_forwarded(self):
        status, _, body = self.kp.chat(GLM[1], headers={
            "X-Custom-Trace": "trace-7f3a",
            "User-Agent": "kptest/1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic ZmFrZTpmYWtl",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "X-Keypool-Key": "kp-0000000000",
            "Expect": "100-continue",
        })
        self.assertEqual(status, 200, body)
        fwd = self.only_request()["headers"]
        self.assertEqual(fwd.get("x-custom-trace"), "trace-7f3a")
        for name in ("keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
                     "upgrade", "x-keypool-key", "transfer-encoding", "expect"):
            self.assertNotIn(name, fwd, f"{name} must not be forwarded upstream")
        self.assertEqual(fwd.get("host"), self.sim.host,
                         "Host must be the upstream's, not the client's")
        self.assertEqual(fwd.get("content-type"), "application/json")

    def test_query_string_is_kept(self):
        status, _, body = self.kp.request(
            "POST", "/v1/chat/completions?trace=1&x=y",
            {"model": GLM[1], "messages": []})
        self.assertEqual(status, 200, body)
        self.assertEqual(self.only_request()["path"], "/api/v1/chat/completions?trace=1&x=y")

    def test_upstream_caller_error_comes_back_unchanged(self):
        upstream_body = '{"error":{"code":400,"message":"temperature must be <= 2"}}'
        status, h, body = self.kp.chat(GLM[1], headers={"X-Sim-Status": "400",
                                                        "X-Sim-Body": upstream_body})
        d_status, d_h, d_body = self.sim.direct(
            "POST", "/chat/completions", self.glm[1],
            {"model": GLM[1], "messages": []},
            {"X-Sim-Status": "400", "X-Sim-Body": upstream_body})
        self.assertEqual(d_status, 400)
        self.assertEqual(status, d_status)
        self.assertEqual(h.get("content-type"), d_h.get("content-type"))
        self.assertEqual(body, d_body)
        self.assertEqual(h.get("x-keypool-attempts"), "1")
        self.assertEqual(len(self.sim.requests_with(self.glm[0])), 1,
                         "a caller error must not be retried with another key")
        k = self.kp.key(self.glm[0])
        self.assertEqual((k["state"], k["reason"], k["rate_limited"]), ("ready", None, 0))

    def test_upstream_404_for_an_unknown_path_comes_back_unchanged(self):
        status, h, body = self.kp.request("POST", "/v1/no/such/endpoint", {"model": GLM[1]})
        self.assertEqual(status, 404, body)
        self.assertEqual(json.loads(body)["error"]["code"], 404, "the simulator's own body")
        self.assertEqual(h.get("x-keypool-pool"), "GLM45")
        self.assertEqual(self.only_request()["path"], "/api/v1/no/such/endpoint")

    def test_large_body_is_forwarded_intact(self):
        padding = "p" * (3 * 1024 * 1024)
        status, _, body = self.kp.chat("GLM45", padding=padding)
        self.assertEqual(status, 200, body[:300])
        seen = self.only_request()
        self.assertEqual(seen["model"], GLM[1])
        self.assertEqual(len(seen["body"]["padding"]), len(padding))

    def test_large_body_goes_upstream_without_expect_100_continue(self):
        # libcurl adds "Expect: 100-continue" to large POST bodies by itself unless the
        # request sets an empty Expect header: the upstream would get an Expect the client
        # never sent, and every large request an extra round trip (or a 1 s stall).
        status, _, body = self.kp.chat(GLM[1], padding="q" * (2 * 1024 * 1024))
        self.assertEqual(status, 200, body[:300])
        self.assertNotIn("expect", self.only_request()["headers"])

    def test_client_expecting_100_continue_is_told_to_go_on(self):
        payload = json.dumps({"model": GLM[1], "messages": []}).encode()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(self.kp.socket_path)
        try:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n"
                      b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(payload))
            try:
                interim = s.recv(65536)
            except socket.timeout:
                self.fail(f"no 100 Continue within {DEADLINE:g}s: curl would stall on every "
                          "large body")
            self.assertTrue(interim.startswith(b"HTTP/1.1 100 "), interim[:200])
            data = interim.partition(b"\r\n\r\n")[2]
            s.sendall(payload)
            while not raw_response_complete(data):
                chunk = s.recv(65536)
                self.assertTrue(chunk, "closed before the answer")
                data += chunk
            self.assertEqual(parse_raw_response(data)[0], 200, data[:300])
        finally:
            s.close()

    def test_keep_alive_serves_several_requests_on_one_connection(self):
        c = self.kp.conn()
        try:
            for i in range(3):
                status, h, body = self.kp.chat(GLM[1], conn=c)
                self.assertEqual(status, 200, body)
                self.assertNotEqual(h.get("connection", "").lower(), "close")
            status, _, _ = c.request("GET", "/health")
            self.assertEqual(status, 200)
            status, _, _ = c.request("GET", "/api/key-status")
            self.assertEqual(status, 200)
            status, _, body = self.kp.chat("KIMI", conn=c)
            self.assertEqual(status, 200, body)
            self.assertEqual(c.connects, 1, "every request must have used the first connection")
        finally:
            c.close()
        self.assertEqual(len(self.sim.log()), 4)

    def test_pipelined_requests_are_answered_in_order(self):
        chat = json.dumps({"model": "KIMI", "messages": []}).encode()
        data = (b"GET /health HTTP/1.1\r\nHost: k\r\n\r\n"
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                b"GET /nope HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n"
                % (len(chat), chat))
        got, closed = self.kp.raw(data, stop_when_complete=False)
        self.assertTrue(closed, "Connection: close must end the connection")
        statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", got)]
        self.assertEqual(statuses, [200, 200, 404], got[:600])
        self.assertIn(SIM_REPLY.encode(), got)
        self.assertEqual(self.only_request()["key_id"], key_id(self.kimi[0]))

    def test_requests_sent_while_one_is_served_wait_their_turn_even_past_the_read_ahead(self):
        # The first request is slow upstream; everything after it reaches keypoold while it is
        # being served: more than the 64 KiB a connection reads ahead, so reading stops and
        # starts again. Every request is answered, in order.
        chat = json.dumps({"model": "KIMI", "messages": []}).encode()
        health = b"GET /health HTTP/1.1\r\nHost: k\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n"
        n_health = 200                  # about 200 KiB behind the slow request
        data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\nContent-Type: "
                b"application/json\r\nX-Sim-Delay-Ms: 300\r\nContent-Length: %d\r\n\r\n%s"
                % (len(chat), chat)
                + health * n_health
                + b"GET /nope HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
        got, closed = self.kp.raw(data, stop_when_complete=False)
        self.assertTrue(closed, "Connection: close must end the connection")
        statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", got)]
        self.assertEqual(statuses, [200] + [200] * n_health + [404], got[:600])
        self.assertIn(SIM_REPLY.encode(), got)
        self.assertEqual(len(self.sim.log()), 1)

    def test_a_chunked_request_with_a_trailer_and_padded_header_values_is_forwarded(self):
        chat = json.dumps({"model": "KIMI", "messages": []}).encode()
        half = len(chat) // 2
        data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n"
                b"Content-Type:   application/json  \r\nX-Sim-Id:\t padded-id \t\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
                % (half, chat[:half], len(chat) - half, chat[half:]))
        got, closed = self.kp.raw(data, stop_when_complete=False)
        self.assertTrue(got.startswith(b"HTTP/1.1 200 "), got[:300])
        self.assertIn(b"padded-id", got, "the trimmed X-Sim-Id value reached the upstream")
        seen = self.only_request()
        self.assertEqual(seen["key_id"], key_id(self.kimi[0]))
        self.assertEqual(seen["raw_body"], chat.decode().replace('"KIMI"', '"%s"' % KIMI[1]))

    def test_sse_stream_is_relayed_byte_exact(self):
        steer = {"X-Sim-Chunks": "5", "X-Sim-Chunk-Delay-Ms": "20"}
        status, h, body = self.kp.chat(GLM[1], headers=steer, stream=True)
        self.assertEqual(status, 200, body)
        self.assertTrue(h.get("content-type", "").startswith("text/event-stream"), h)
        self.assertEqual(h.get("x-keypool-pool"), "GLM45")
        events = sse_events(body)
        self.assertEqual(len(events), 7, f"5 chunks + final + [DONE], got {events!r}")
        self.assertEqual(events[-1], b"[DONE]")
        for i, ev in enumerate(events[:5]):
            self.assertEqual(json.loads(ev)["choices"][0]["delta"]["content"], f"tok{i} ")
        self.assertEqual(json.loads(events[5])["choices"][0]["finish_reason"], "stop")

        # The same stream straight from the simulator, with the generation id it would have
        # given the proxied request, must be the same bytes.
        seq = self.only_request()["seq"]
        _, _, direct = self.sim.direct("POST", "/chat/completions", self.glm[0],
                                       {"model": GLM[1], "stream": True,
                                        "messages": [{"role": "user", "content": "Hi"}]},
                                       steer)
        direct_seq = self.sim.log()[-1]["seq"]
        expected = direct.replace(b'"gen-sim-%d"' % direct_seq, b'"gen-sim-%d"' % seq)
        self.assertEqual(body, expected)

    def test_sse_events_reach_the_client_as_they_are_produced(self):
        # The upstream pauses 1.5 s between events. A proxy that buffers delivers everything at
        # once; one that relays has nothing more to read right after the first event.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.kp.socket_path)
        try:
            payload = json.dumps({"model": GLM[1], "stream": True, "messages": []}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: keypool\r\n"
                      b"Content-Type: application/json\r\nX-Sim-Chunks: 2\r\n"
                      b"X-Sim-Chunk-Delay-Ms: 1500\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(payload), payload))
            data = b""

            def body_so_far():
                return dechunk(data.partition(b"\r\n\r\n")[2])

            while b"\n\n" not in body_so_far()[0]:
                chunk = s.recv(65536)
                self.assertTrue(chunk, f"connection closed before the first event: {data!r}")
                data += chunk
            self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:200])
            first = body_so_far()[0]
            self.assertEqual(len(sse_events(first)), 1,
                             f"the first read already held later events: {first!r}")
            ready, _, _ = select.select([s], [], [], 0)
            self.assertFalse(ready, "the rest of the stream was there at once: buffered")
            # And the rest does arrive.
            while not body_so_far()[1]:
                chunk = s.recv(65536)
                self.assertTrue(chunk, "connection closed before the stream ended")
                data += chunk
            events = sse_events(dechunk(data.partition(b"\r\n\r\n")[2])[0])
            self.assertEqual(len(events), 4, events)
        finally:
            s.close()

    def test_upstream_connection_is_reused(self):
        for _ in range(4):
            status, _, body = self.kp.chat(GLM[1])
            self.assertEqual(status, 200, body)
        ports = {e["peer_port"] for e in self.sim.log()}
        self.assertEqual(len(ports), 1,
                         f"4 sequential requests through one worker used {len(ports)} "
                         "upstream connections")

    def test_primary_key_goes_first_then_least_recently_used(self):
        served = []
        for _ in range(4):
            status, h, body = self.kp.chat(GLM[1])
            self.assertEqual(status, 200, body)
            served.append(h.get("x-keypool-key"))
        a, b = key_id(self.glm[0]), key_id(self.glm[1])
        self.assertEqual(served[0], a, "a fresh daemon must use the primary key first")
        self.assertEqual(served, [a, b, a, b], "keys must be used least recently first")
        self.assertEqual([e["key_id"] for e in self.sim.log()], served)

    def test_key_status_counts_a_served_request(self):
        status, _, body = self.kp.chat(KIMI[1])
        self.assertEqual(status, 200, body)
        ks = self.kp.key_status()
        pools = {p["name"]: p for p in ks["pools"]}
        self.assertEqual(set(pools), {"GLM45", "KIMI"})
        self.assertEqual(pools["KIMI"]["model"], KIMI[1])
        k = pools["KIMI"]["keys"][0]
        self.assertEqual(k["id"], key_id(self.kimi[0]))
        expected = {"state": "ready", "reason": None, "cooldown_remaining_s": 0, "requests": 1,
                    "successes": 1, "rate_limited": 0, "failures": 0, "last_status": 200}
        self.assertEqual({f: k.get(f) for f in expected}, expected)
        self.assertEqual(k["masked"], masked(self.kimi[0]))
        idle = pools["GLM45"]["keys"][0]
        self.assertEqual((idle["requests"], idle["last_status"]), (0, None))
        wait_for(lambda: self.kp.keys()[key_id(self.kimi[0])]["in_flight"] == 0,
                 what="the served key's in_flight to drop back to 0")

    def test_health_reports_every_pool(self):
        status, doc = self.kp.health()
        self.assertEqual(status, 200)
        self.assertEqual(doc["status"], "ok")
        pools = {p["name"]: p for p in doc["pools"]}
        self.assertEqual({n: (p["ready"], p["keys"]) for n, p in pools.items()},
                         {"GLM45": (2, 2), "KIMI": (1, 1)})


class KeyLengthTest(KeypoolTestCase):
    """A request's header block is sized for its pool's longest key, not for any key at all."""

    def test_a_retry_on_a_much_longer_key_sends_all_of_it(self):
        sim = self.start_sim()
        short = fake_secret("invalid-")                 # refused: the retry takes the long one
        long = fake_secret() + "f" * 3900               # near CONFIG_SECRET_MAX (4,096)
        kp = self.start_keypool(sim, pools=[{"name": GLM[0], "model": GLM[1], "keys": [short, long]}])
        for stream in (False, True):
            before = len(sim.log())
            status, h, body = kp.chat(GLM[1], stream=stream)
            self.assertEqual(status, 200, body)
            self.assertEqual(h.get("x-keypool-key"), key_id(long))
            # The refused short key's confirmation probe may reach the upstream after the
            # answered request: look for the long key among this request's arrivals.
            seen = [e["key_id"] for e in sim.log()[before:]]
            self.assertIn(key_id(long), seen, "the upstream must have seen the whole long key")


class UpstreamFailureTest(KeypoolTestCase):
    """When the upstream cannot answer: 502 or 504 in the OpenAI shape, and no key is blamed.
    Retries are off here (one attempt); test_policy covers transient retries and the threshold."""

    def start(self, base_url=None, **settings):
        settings.setdefault("retry", {"max_attempts": 1})
        self.sim = self.start_sim()
        self.keys = [fake_secret(), fake_secret()]
        providers = [{"name": "sim", "base_url": base_url}] if base_url else None
        self.kp = self.start_keypool(self.sim, providers=providers, settings=settings, pools=[
            {"name": GLM[0], "model": GLM[1], "keys": self.keys}])

    def assert_keys_unharmed(self):
        for k in self.kp.keys().values():
            self.assertEqual((k["state"], k["reason"], k["rate_limited"]), ("ready", None, 0), k)
        wait_for(lambda: all(k["in_flight"] == 0 for k in self.kp.keys().values()),
                 what="in_flight back to 0")
        self.assertEqual(self.kp.health()[0], 200)

    def test_connection_dropped_before_an_answer_gives_502(self):
        self.start()
        status, _, body = self.kp.chat(GLM[1], headers={"X-Sim-Drop": "1"})
        self.assertEqual(status, 502, body)
        self.assertOpenAIError(body)
        self.assert_keys_unharmed()
        self.assertEqual(self.kp.chat(GLM[1])[0], 200)

    def test_unreachable_upstream_gives_502(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()               # nothing listens there now
        self.start(base_url=f"http://127.0.0.1:{port}/api/v1")
        status, _, body = self.kp.chat(GLM[1])
        self.assertEqual(status, 502, body)
        self.assertOpenAIError(body)
        self.assert_keys_unharmed()

    def test_upstream_slower_than_upstream_timeout_gives_504(self):
        self.start(upstream_timeout=1)
        status, _, body = self.kp.chat(GLM[1], headers={"X-Sim-Delay-Ms": "4000"})
        self.assertEqual(status, 504, body)
        self.assertOpenAIError(body)
        self.assert_keys_unharmed()


if __name__ == "__main__":
    unittest.main(verbosity=2)

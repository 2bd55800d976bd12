#!/usr/bin/env python3
"""HTTPS upstreams: nginx with a private CA in front of the simulator, over HTTP/1.1 and HTTP/2.

Trust (ca_file, tls_verify), certificate failures that blame no key, TLS session resumption,
HTTP/2 multiplexing and HTTP/1.1 keep-alive, cold bursts on fresh workers, and the loop-lag
histogram in /metrics.
"""

import asyncio
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest

from kptest import (KEYPOOLD, SIM_REPLY, KeypoolTestCase, fake_secret, render_config, start_https_upstream,
                    tls_tools_missing, wait_for)

MODEL = "z-ai/glm-4.5"


async def _one(path, body, headers, timeout):
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20), timeout)
    try:
        data = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((f"POST /v1/chat/completions HTTP/1.1\r\nHost: keypool\r\nConnection: close\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{head}\r\n")
                     .encode() + data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    m = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    return (int(m.group(1)) if m else 0), answer


def burst(kp, n, headers=None, timeout=120.0, stream=False):
    """n concurrent chat requests, each on its own connection: [(status, raw answer)]."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}

    async def run():
        results = await asyncio.gather(*(_one(kp.socket_path, body, headers or {}, timeout)
                                         for _ in range(n)), return_exceptions=True)
        return [(0, repr(r).encode()) if isinstance(r, BaseException) else r for r in results]
    return asyncio.run(run())


class ConnectProxy:
    """A forward proxy for HTTPS on an ephemeral loopback port: CONNECT host:port, then bytes
    both ways. targets lists every CONNECT it was asked for."""

    def __init__(self):
        self.targets = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client):
        try:
            self._relay(client)
        except OSError:
            pass    # either side went away: the tunnel ends

    def _relay(self, client):
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            m = re.match(rb"CONNECT ([^ :]+):(\d+) ", head)
            if not m:
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(f"{m.group(1).decode()}:{m.group(2).decode()}")
            with socket.create_connection((m.group(1).decode(), int(m.group(2)))) as up:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                socks = [client, up]
                while True:
                    ready, _, _ = select.select(socks, [], [], 30)
                    if not ready:
                        return
                    for r in ready:
                        data = r.recv(65536)
                        if not data:
                            return
                        (up if r is client else client).sendall(data)

    def close(self):
        self.server.close()


class HTTPSTestCase(KeypoolTestCase):

    def setUp(self):
        missing = tls_tools_missing()
        if missing:
            self.skipTest(missing)
        self.sim = self.start_sim()
        self.keys = [fake_secret(), fake_secret()]

    def https_keypool(self, up, settings=None, env=None, **provider):
        prov = {"name": "tls", "base_url": up.base_url}
        prov.update(provider)
        return self.start_keypool(pools=[{"name": "GLM", "model": MODEL, "keys": self.keys,
                                          "provider": "tls"}],
                                  providers=[prov], settings=settings, env=env)

    def start_proxy(self):
        proxy = ConnectProxy()
        self.addCleanup(proxy.close)
        return proxy

    def assert_keys_ready(self, kp):
        for k in self.keys:
            self.assertEqual(kp.key(k)["state"], "ready", f"key {kp.key(k)} must not be blamed")


class TrustTest(HTTPSTestCase):

    def test_ca_file_naming_the_private_ca_serves_over_https(self):
        up = start_https_upstream(self, self.sim)
        kp = self.https_keypool(up, ca_file=up.ca.cert)
        status, _, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], SIM_REPLY)
        # nginx logs a request once its answer is sent: the log may trail the answer a moment.
        entries = wait_for(up.access, what="nginx to log the request")
        self.assertEqual(entries[-1]["protocol"], "HTTP/2.0", "HTTP/2 is offered and nginx takes it")

    def check_certificate_problem_blames_no_key(self, up, **provider):
        kp = self.https_keypool(up, **provider)
        for _ in range(6):      # more than transient_threshold (3) in a row
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 502, body)
            self.assertOpenAIError(body)
            self.assertIn("TLS", json.loads(body)["error"]["message"])
        self.assert_keys_ready(kp)
        status, _, body = kp.request("GET", "/health")
        self.assertEqual(status, 200, body)
        logged = [ln for ln in kp.stderr().splitlines() if "TLS failure" in ln]
        self.assertEqual(len(logged), 1, "curl's text is logged once per interval, not per request:\n"
                         + "\n".join(logged))
        self.assertEqual(self.sim.log(), [], "nothing may reach the upstream past a bad certificate")
        return logged[0]

    def test_without_ca_file_the_private_ca_is_not_trusted(self):
        up = start_https_upstream(self, self.sim)
        self.check_certificate_problem_blames_no_key(up)

    def test_certificate_for_another_name_gets_502_and_blames_no_key(self):
        up = start_https_upstream(self, self.sim, cert_names=("wrong.example",))
        line = self.check_certificate_problem_blames_no_key(up, ca_file=up.ca.cert)
        self.assertRegex(line, r"(?i)certificate|subject|name", "curl's full text is logged")

    def test_certificate_from_an_unknown_ca_gets_502_and_blames_no_key(self):
        up = start_https_upstream(self, self.sim, untrusted=True)
        self.check_certificate_problem_blames_no_key(up, ca_file=up.ca.cert)

    def test_expired_certificate_gets_502_and_blames_no_key(self):
        up = start_https_upstream(self, self.sim, expired=True)
        line = self.check_certificate_problem_blames_no_key(up, ca_file=up.ca.cert)
        self.assertRegex(line, r"(?i)expired|certificate")

    def test_tls_verify_false_serves_and_warns_at_start(self):
        up = start_https_upstream(self, self.sim, cert_names=("wrong.example",))
        kp = self.https_keypool(up, tls_verify=False)
        status, _, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        self.assertRegex(kp.stderr(), r"tls_verify = false", "an unverified upstream is announced")


class TransportSettingsTest(KeypoolTestCase):

    def check_config(self, **provider):
        d = tempfile.mkdtemp(prefix="kptls-")
        self.addCleanup(shutil.rmtree, d, True)
        prov = {"name": "tls", "base_url": "https://127.0.0.1:9/v1"}
        prov.update(provider)
        path = os.path.join(d, "keypool.conf")
        with open(path, "w") as f:
            f.write(render_config({"socket": os.path.join(d, "keypool.sock"), "providers": [prov],
                                   "pools": [{"name": "P", "provider": "tls", "model": "m/p",
                                              "keys": [fake_secret()]}]}))
        return subprocess.run([KEYPOOLD, "--check-config", "-c", path], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)

    def test_every_transport_setting_is_accepted(self):
        r = self.check_config(ca_file="/etc/ssl/certs/ca-certificates.crt", ca_path="/etc/ssl/certs",
                              proxy="http://127.0.0.1:3128", http2=False, tls_verify=True)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_a_ca_file_that_cannot_be_read_is_a_config_error_naming_it(self):
        r = self.check_config(ca_file="/nonexistent/ca.pem")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("ca_file '/nonexistent/ca.pem' is not a readable file", r.stderr)

    def test_ca_path_must_be_a_directory(self):
        r = self.check_config(ca_path="/etc/ssl/certs/ca-certificates.crt")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("is not a readable directory", r.stderr)

    def test_http2_must_be_a_boolean(self):
        r = self.check_config(http2="yes")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("http2 must be true or false", r.stderr)


class EgressTest(HTTPSTestCase):

    def served_through(self, env_proxy=None, no_proxy=None, **provider):
        """Serves one request with a fresh CONNECT proxy; the CONNECT targets it saw."""
        up = start_https_upstream(self, self.sim)
        proxy = self.start_proxy()
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "all_proxy")}
        if env_proxy:
            env["https_proxy"] = proxy.url
        if no_proxy:
            env["no_proxy"] = no_proxy
        if provider.get("proxy") == "PROXY":
            provider["proxy"] = proxy.url
        kp = self.https_keypool(up, ca_file=up.ca.cert, env=env, **provider)
        status, _, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        return proxy.targets, f"127.0.0.1:{up.port}"

    def test_proxy_setting_carries_the_upstream_connection(self):
        targets, upstream = self.served_through(proxy="PROXY")
        self.assertEqual(targets, [upstream])

    def test_https_proxy_environment_is_honoured_without_a_proxy_setting(self):
        targets, upstream = self.served_through(env_proxy=True)
        self.assertEqual(targets, [upstream])

    def test_no_proxy_environment_bypasses_the_proxy(self):
        targets, _ = self.served_through(env_proxy=True, no_proxy="127.0.0.1")
        self.assertEqual(targets, [])


class ConnectionTest(HTTPSTestCase):

    def test_new_connections_resume_their_tls_session(self):
        # nginx closes every connection after one request (over HTTP/1.1, with a proper TLS
        # close), so each request is a new handshake; the concurrent ones run on separate curl
        # handles, which resume only through the worker's shared session cache.
        up = start_https_upstream(self, self.sim, keepalive_requests=1)
        kp = self.https_keypool(up, ca_file=up.ca.cert, http2=False)
        status, _, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        results = burst(kp, 8, {"X-Sim-Delay-Ms": "200"})
        self.assertEqual([s for s, _ in results], [200] * 8)
        for _ in range(3):
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        log = wait_for(lambda: (lambda a: a if len(a) >= 12 else None)(up.access()), what="12 access log lines")
        self.assertEqual(len({e["connection"] for e in log}), 12, f"one connection per request: {log}")
        self.assertEqual([e["reused"] for e in log[1:]], [True] * 11,
                         f"every connection after the first resumes the TLS session: {log}")

    def test_new_connections_do_not_rebuild_the_ca_store(self):
        # A ca_file as large as the system bundle: parsing it takes tens of ms, which must
        # happen once per worker, not once per connection.
        up = start_https_upstream(self, self.sim, keepalive_requests=1)
        bundle = os.path.join(up.dir, "bundle.pem")
        with open(bundle, "w") as out, open(up.ca.cert) as ca:
            with open("/etc/ssl/certs/ca-certificates.crt") as system:
                out.write(system.read())
            out.write(ca.read())
        kp = self.https_keypool(up, ca_file=bundle, http2=False)
        for _ in range(20):
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        text = kp.request("GET", "/metrics")[2].decode()
        buckets = dict(re.findall(r'^keypool_loop_lag_seconds_bucket\{le="([^"]+)"\} (\d+)$', text, re.M))
        slow = int(buckets["+Inf"]) - int(buckets["0.025"])
        self.assertLessEqual(slow, 5, f"{slow} loop steps over 25 ms for 20 new TLS connections:\n{text}")

    def test_http1_keeps_its_connection_alive(self):
        up = start_https_upstream(self, self.sim)
        kp = self.https_keypool(up, ca_file=up.ca.cert, http2=False)
        for _ in range(10):
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        log = wait_for(lambda: (lambda a: a if len(a) >= 10 else None)(up.access()),
                       what="10 access log lines")
        self.assertEqual({e["protocol"] for e in log}, {"HTTP/1.1"})
        self.assertEqual(len({e["connection"] for e in log}), 1, f"10 requests, one connection: {log}")

    def test_http1_request_bodies_larger_than_the_upload_buffer_arrive_whole(self):
        # Over TLS with HTTP/1.1 curl sends the request through an upload buffer sized to the
        # request (curlmem_upload_buffer, 16 to 64 KiB): bodies around and past its bounds go out
        # in pieces, and must arrive as sent, on the connection the small ones use.
        up = start_https_upstream(self, self.sim, http2=False)
        kp = self.https_keypool(up, ca_file=up.ca.cert)
        sizes = [100, 12_000, 16_000, 30_000, 59_000, 70_000, 200_000]
        for n in sizes:
            context = "".join(chr(ord("a") + i % 26) for i in range(n))
            status, _, body = kp.chat(MODEL, context=context)
            self.assertEqual(status, 200, body[:300])
            got = self.sim.log()[-1]["body"].get("context", "")
            self.assertEqual((len(got), got == context), (n, True), f"a {n}-byte context arrived as {len(got)} bytes")
        log = wait_for(lambda: (lambda a: a if len(a) >= len(sizes) else None)(up.access()),
                       what=f"{len(sizes)} access log lines")
        self.assertEqual({e["protocol"] for e in log}, {"HTTP/1.1"})
        self.assertEqual(len({e["connection"] for e in log}), 1, f"{len(sizes)} requests, one connection: {log}")

    def test_http2_multiplexes_concurrent_requests_on_few_connections(self):
        up = start_https_upstream(self, self.sim)
        kp = self.https_keypool(up, ca_file=up.ca.cert)
        results = burst(kp, 50, {"X-Sim-Delay-Ms": "300"})
        self.assertEqual([s for s, _ in results], [200] * 50, [a[:300] for s, a in results if s != 200][:3])
        log = wait_for(lambda: (lambda a: a if len(a) >= 50 else None)(up.access()),
                       what="50 access log lines")
        self.assertEqual({e["protocol"] for e in log}, {"HTTP/2.0"})
        conns = {e["connection"] for e in log}
        self.assertLessEqual(len(conns), 3, f"50 concurrent streams on {len(conns)} connections")

    def test_a_burst_beyond_one_connections_streams_opens_a_few_connections(self):
        # 300 at once on a fresh worker: curl 7.88 puts 100 streams on the first connection and,
        # without a per-host limit, opened one connection per transfer beyond them (about 200).
        up = start_https_upstream(self, self.sim)
        kp = self.https_keypool(up, settings={"workers": 1}, ca_file=up.ca.cert)
        results = burst(kp, 300, {"X-Sim-Delay-Ms": "500"})
        bad = [a[:300] for s, a in results if s != 200]
        self.assertEqual(bad, [], f"{len(bad)} of 300 failed")
        log = wait_for(lambda: (lambda a: a if len(a) >= 300 else None)(up.access()),
                       what="300 access log lines")
        self.assertEqual({e["protocol"] for e in log}, {"HTTP/2.0"})
        conns = {e["connection"] for e in log}
        self.assertLessEqual(len(conns), 12, f"300 concurrent streams on {len(conns)} connections")

    def test_an_upstream_refusing_http2_gets_a_burst_all_at_once(self):
        # The provider asks for HTTP/2 (the default) but the server speaks HTTP/1.1 only: each
        # transfer needs its own connection, and the per-host limit, which assumes sharing until
        # it sees otherwise, must not hold the burst back once it does.
        up = start_https_upstream(self, self.sim, http2=False)
        kp = self.https_keypool(up, settings={"workers": 1}, ca_file=up.ca.cert)
        results = burst(kp, 100, {"X-Sim-Delay-Ms": "5000"})
        bad = [a[:300] for s, a in results if s != 200]
        self.assertEqual(bad, [], f"{len(bad)} of 100 failed")
        # Held back, the rest would reach the upstream only when the first one ended.
        log = self.sim.finished_log()
        last_in, first_out = max(e["time"] for e in log), min(e["end_time"] for e in log)
        self.assertLess(last_in, first_out, f"the last of {len(log)} requests reached the upstream "
                        f"{last_in - first_out:.2f} s after the first one ended")

    def test_cold_bursts_over_http2_on_fresh_workers_all_succeed(self):
        up = start_https_upstream(self, self.sim)
        for i in range(10):
            kp = self.https_keypool(up, settings={"workers": 2}, ca_file=up.ca.cert)
            results = burst(kp, 40)
            bad = [a[:400] for s, a in results if s != 200]
            self.assertEqual(bad, [], f"cold burst {i + 1}: {len(bad)} of 40 failed")
            kp.stop()

    def test_cold_burst_of_1000_with_connections_closed_every_100_requests(self):
        up = start_https_upstream(self, self.sim, keepalive_requests=100)
        kp = self.https_keypool(up, settings={"workers": 2, "worker_timeout": 5}, ca_file=up.ca.cert)
        pids = kp.process_ids()
        started = time.monotonic()
        results = burst(kp, 1000, timeout=180)
        took = time.monotonic() - started
        bad = [a[:300] for s, a in results if s != 200]
        self.assertEqual(len(bad), 0, f"{len(bad)} of 1000 failed in {took:.1f}s, e.g. {bad[:3]}")
        self.assertEqual(kp.process_ids(), pids, "no worker may be replaced (killed as wedged)")
        self.assertNotIn("wedged", kp.stderr())


class EarlyAnswerTest(HTTPSTestCase):

    def test_an_early_answer_to_a_long_request_over_http2_is_understood(self):
        # A long context (200 KB) that the provider refuses before reading it: libcurl 7.88
        # fails such an HTTP/2 stream ("framing layer") or leaves it hanging, so keypool sends
        # long bodies over HTTP/1.1, and the 429 is judged as the provider meant it.
        up = start_https_upstream(self, self.sim)
        prov = {"name": "tls", "base_url": f"https://127.0.0.1:{up.port}/early/v1", "ca_file": up.ca.cert}
        kp = self.start_keypool(pools=[{"name": "GLM", "model": MODEL, "keys": self.keys[:1],
                                        "provider": "tls"}], providers=[prov],
                                settings={"upstream_timeout": 20})
        status, _, body = kp.chat(MODEL, headers={"X-Keypool-Max-Wait": "0"},
                                  context="x" * 200_000)
        self.assertNotEqual(status, 502, body[:300])
        self.assertIn(status, (429, 503), body[:300])
        self.assertNotIn(b"framing", body)
        key = kp.key(self.keys[0])
        self.assertEqual((key["state"], key["last_status"]), ("cooling", 429), key)

    def test_an_answer_given_before_a_long_request_is_read_is_relayed(self):
        up = start_https_upstream(self, self.sim)
        prov = {"name": "tls", "base_url": f"https://127.0.0.1:{up.port}/early200/v1", "ca_file": up.ca.cert}
        kp = self.start_keypool(pools=[{"name": "GLM", "model": MODEL, "keys": self.keys,
                                        "provider": "tls"}], providers=[prov],
                                settings={"upstream_timeout": 20})
        for _ in range(3):
            status, _, body = kp.chat(MODEL, context="x" * 200_000)
            self.assertEqual(status, 200, body[:300])
            self.assertIn(b"early", body)


class LoopLagTest(HTTPSTestCase):

    def test_loop_lag_is_a_histogram_in_metrics(self):
        up = start_https_upstream(self, self.sim, keepalive_requests=1)
        kp = self.https_keypool(up, ca_file=up.ca.cert)
        for _ in range(5):
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        status, _, body = kp.request("GET", "/metrics")
        self.assertEqual(status, 200)
        text = body.decode()
        self.assertIn("# TYPE keypool_loop_lag_seconds histogram", text)
        buckets = [(m.group(1), float(m.group(2))) for m in
                   re.finditer(r'^keypool_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)]
        self.assertGreater(len(buckets), 3, text)
        self.assertEqual(buckets[-1][0], "+Inf")
        counts = [c for _, c in buckets]
        self.assertEqual(counts, sorted(counts), "buckets are cumulative")
        count = float(re.search(r"^keypool_loop_lag_seconds_count (\S+)$", text, re.M).group(1))
        self.assertEqual(count, counts[-1])
        self.assertGreater(count, 0)
        self.assertRegex(text, r"(?m)^keypool_loop_lag_seconds_sum \S+$")


if __name__ == "__main__":
    unittest.main(verbosity=2)

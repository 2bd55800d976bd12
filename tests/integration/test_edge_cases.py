#!/usr/bin/env python3
"""Edge cases a code review found: a client leaving while its held SSE event is relayed, a
Max-Wait 0 request behind a waiting one, waiters on a full key that goes to rest, half-closed
clients, bytes that are not UTF-8 in what error messages quote, and a pool name in the body
replaced without touching anything else.

Each test failed against the daemon before the fixes (a worker crash, a wait until the deadline,
a closed connection or an altered body) and passes now.
"""

import json
import os
import signal
import socket
import threading
import time
import unittest

from kptest import (DEADLINE, SIM_REPLY, KeypoolTestCase, fake_secret, key_id,
                    parse_raw_response, raw_response_complete, wait_for)

MODEL = "sim/edge-model"
POOL = "edgepool"


class EdgeCaseTest(KeypoolTestCase):

    def start(self, keys=None, settings=None, **pool):
        self.secret = fake_secret()
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings=settings, pools=[
            dict({"name": POOL, "model": MODEL, "keys": keys or [self.secret]}, **pool)])

    # --- helpers ---

    def worker_pids(self):
        return [w["pid"] for w in self.kp.status()["workers"]]

    def started_worker_pids(self, n):
        """The pids of the n workers once every one has started (pid 0 until then)."""
        return wait_for(lambda: (lambda p: p if len(p) == n and all(p) else None)(
            self.worker_pids()), what=f"{n} started workers in /status")

    def only_worker(self):
        return self.started_worker_pids(1)[0]

    def sigstop(self, pid):
        """Stops pid; SIGCONT is sent at teardown whatever happens (and at once by resume)."""
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.resume, pid)

    @staticmethod
    def resume(pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass

    def assert_no_worker_died(self):
        err = self.kp.stderr()
        self.assertNotIn("AddressSanitizer", err, "a sanitizer report on keypoold's stderr")
        self.assertNotIn("runtime error:", err, "a sanitizer report on keypoold's stderr")
        self.assertNotIn("worker_exit", err, "a worker exited while the daemon was running")

    def in_thread(self, fn):
        """Runs fn in a thread; the returned function joins it and gives fn's result (or raises
        what it raised)."""
        out = {}

        def run():
            try:
                out["result"] = fn()
            except BaseException as e:      # re-raised in the test's thread
                out["error"] = e
        t = threading.Thread(target=run, daemon=True)
        t.start()

        def join(timeout=60, what="a request"):
            t.join(timeout)
            if t.is_alive():
                raise AssertionError(f"{what} did not finish")
            if isinstance(out.get("error"), OSError):
                # Lost connections are what a worker crash looks like from here.
                raise AssertionError(f"{what} failed: {out['error']!r}")
            if "error" in out:
                raise out["error"]
            return out["result"]
        return join

    def sim_entry(self, sim_id):
        """The simulator's log entry of the request sent with X-Sim-Id: sim_id, or None."""
        for e in self.sim.log():
            if e["headers"].get("x-sim-id") == sim_id:
                return e
        return None

    def chat_request_bytes(self, body=None, headers=None):
        body = body if body is not None else json.dumps(
            {"model": POOL, "messages": [{"role": "user", "content": "Hi"}]}).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: keypool\r\n"
        head += b"Content-Type: application/json\r\n"
        for name, value in (headers or {}).items():
            head += name.encode() + b": " + (value if isinstance(value, bytes)
                                             else value.encode()) + b"\r\n"
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def half_closed_exchange(self, data, deadline=DEADLINE):
        """Sends data on a new connection, shuts down the sending side and reads until the
        server closes. Returns (bytes received, closed by the server?)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(deadline)
        got = b""
        closed = False
        try:
            s.connect(self.kp.socket_path)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                got += chunk
        finally:
            s.close()
        if got:
            self.kp.seen.append(("a half-closed exchange", got.decode(errors="replace")))
        return got, closed

    # --- 1. a client leaves while on_done relays the held first SSE event ---

    def test_client_leaving_while_the_held_first_event_is_relayed_does_not_crash_the_worker(self):
        self.start()
        wpid = self.only_worker()
        # One SSE event without its blank line: keypool holds it until the upstream is done and
        # relays it from on_done, the moment the client is found gone.
        unterminated = json.dumps('data: {"x":1}\n')
        trials = 4
        for trial in range(trials):
            sim_id = f"edge-held-{trial}"
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.kp.socket_path)
                s.sendall(self.chat_request_bytes(headers={
                    "X-Sim-Id": sim_id, "X-Sim-Delay-Ms": "600",
                    "X-Sim-Stream-Raw": unterminated}))
                wait_for(lambda: self.sim_entry(sim_id), what=f"trial {trial} to reach the "
                         "simulator")
                # The worker sleeps through the whole answer and the client's departure, and
                # wakes to find both at once.
                self.sigstop(wpid)
                try:
                    wait_for(lambda: "end_time" in (self.sim_entry(sim_id) or {}),
                             what=f"the simulator to send trial {trial}'s answer")
                    time.sleep(0.05)
                    s.close()
                    time.sleep(0.05)
                finally:
                    self.resume(wpid)
            finally:
                s.close()
            # Served after whatever the worker had pending: by then it has been through it.
            status, _, body = self.kp.request("GET", "/health")
            self.assertIn(status, (200, 503), body)
            self.assertEqual(self.worker_pids(), [wpid],
                             f"the worker was replaced after trial {trial}")
        status, h, body = self.kp.chat(POOL)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], SIM_REPLY)
        self.assertEqual(self.worker_pids(), [wpid])
        self.assert_no_worker_died()

    # --- 2. Max-Wait 0 behind a request already waiting in the same worker ---

    def test_max_wait_zero_behind_a_waiting_request_answers_503_and_the_worker_survives(self):
        self.start(settings={"workers": 1, "max_wait": 30}, max_concurrent=1)
        wpid = self.only_worker()
        holder = self.in_thread(lambda: self.kp.chat(POOL, headers={
            "X-Sim-Id": "edge-holder", "X-Sim-Delay-Ms": "2000"}))
        wait_for(lambda: self.sim_entry("edge-holder"), what="the holder to reach the simulator")
        waiter = self.in_thread(lambda: self.kp.chat(POOL, headers={"X-Sim-Id": "edge-waiter"}))
        wait_for(lambda: sum(w.get("waiting", 0) for w in self.kp.status()["workers"]) >= 1,
                 what="the second request to wait for the busy key")

        status, h, body = self.kp.chat(POOL, headers={"X-Keypool-Max-Wait": "0",
                                                      "X-Sim-Id": "edge-impatient"})
        self.assertEqual(status, 503, body)
        self.assertOpenAIError(body, code="no_key_available")
        self.assertNotIn("end_time", self.sim_entry("edge-holder"),
                         "Max-Wait 0 is answered at once, not once the holder is done")

        h_status, _, h_body = holder(what="the request holding the key")
        self.assertEqual(h_status, 200, h_body)
        w_status, _, w_body = waiter(what="the waiting request")
        self.assertEqual(w_status, 200, w_body)
        log = self.sim.finished_log()
        ids = [e["headers"].get("x-sim-id") for e in log]
        self.assertEqual(ids, ["edge-holder", "edge-waiter"], "the 503 never went upstream")
        self.assertGreaterEqual(log[1]["time"], log[0]["end_time"] - 0.05,
                                "the waiter is served once the holder is done")
        self.assertEqual(self.worker_pids(), [wpid])
        self.assert_no_worker_died()

    # --- 3. waiters on a full key that goes to rest ---

    def check_waiter_wakes_when_a_full_key_rests(self, workers):
        self.start(settings={"workers": workers, "max_wait": 30}, max_concurrent=1)
        pids = self.started_worker_pids(workers)
        empty_bucket = json.dumps({"x-ratelimit-remaining-requests": "0",
                                   "x-ratelimit-reset-requests": "1s"})
        holder = self.in_thread(lambda: self.kp.chat(POOL, headers={
            "X-Sim-Id": "edge-last", "X-Sim-Delay-Ms": "800", "X-Sim-Headers": empty_bucket}))
        wait_for(lambda: self.sim_entry("edge-last"), what="the first request to reach the "
                 "simulator")
        # The client outwaits max_wait, so that a waiter woken only by its deadline shows as
        # late rather than as a client timeout.
        waiter = self.in_thread(lambda: self.kp.request(
            "POST", "/v1/chat/completions", {"model": POOL, "messages": []},
            {"X-Sim-Id": "edge-next"}, timeout=45))
        wait_for(lambda: sum(w.get("waiting", 0) for w in self.kp.status()["workers"]) >= 1,
                 what="the second request to wait for the full key")

        a_status, _, a_body = holder(what="the request that empties the bucket")
        self.assertEqual(a_status, 200, a_body)
        b_status, _, b_body = waiter(what="the waiting request")
        self.assertEqual(b_status, 200, b_body)
        log = self.sim.finished_log()
        self.assertEqual([e["headers"].get("x-sim-id") for e in log], ["edge-last", "edge-next"])
        first, second = log
        self.assertLess(second["time"] - first["time"], 10,
                        "the waiter is served soon after the 1 s reset, not at its 30 s deadline")
        self.assertGreaterEqual(second["time"], first["end_time"] + 0.5,
                                "the waiter respects the rest the empty bucket asked for")
        self.assertEqual(self.worker_pids(), pids)

    def test_a_waiter_on_a_full_key_is_served_after_the_key_rests_one_worker(self):
        self.check_waiter_wakes_when_a_full_key_rests(1)

    def test_a_waiter_on_a_full_key_is_served_after_the_key_rests_two_workers(self):
        self.check_waiter_wakes_when_a_full_key_rests(2)

    # --- 4. half-closed clients ---

    def test_a_client_that_half_closes_after_its_request_gets_the_answer(self):
        self.start()
        # Proxied (answered later, from the upstream) and local (answered at once).
        cases = [
            ("a chat", self.chat_request_bytes(headers={"X-Sim-Delay-Ms": "300"})),
            ("GET /health", b"GET /health HTTP/1.1\r\nHost: keypool\r\n\r\n"),
        ]
        for what, request in cases:
            with self.subTest(what):
                got, closed = self.half_closed_exchange(request)
                parsed = parse_raw_response(got)
                self.assertIsNotNone(parsed, f"no answer to {what} after a half-close: {got!r}")
                status, _, body = parsed
                self.assertEqual(status, 200, body)
                self.assertTrue(raw_response_complete(got), f"a cut answer: {got!r}")
                self.assertTrue(closed, "the server closes once it has answered")
                if what == "a chat":
                    self.assertEqual(json.loads(body)["choices"][0]["message"]["content"],
                                     SIM_REPLY)
        self.assertEqual(len(self.sim.log()), 1)

    # --- 5. bytes that are not UTF-8 in what an error message quotes ---

    def test_error_messages_quoting_bytes_that_are_not_utf8_are_still_json(self):
        self.start()
        cut_model = "a" + "\u00e9" * 60      # keypool quotes 100 bytes: the cut splits an é
        cases = [
            ("a request line with \\xff", b"GET /\xff HTTP/1.1\r\nHost: keypool\r\n\r\n", None),
            ("a model name cut mid-character",
             self.chat_request_bytes(body=json.dumps({"model": cut_model, "messages": []},
                                                     ensure_ascii=False).encode()),
             "model_not_found"),
            ("an even model name", self.chat_request_bytes(body=json.dumps(
                {"model": "\u00e9" * 60, "messages": []}, ensure_ascii=False).encode()),
             "model_not_found"),
            ("a pool header with \\xff", self.chat_request_bytes(
                headers={"X-Keypool-Pool": b"no-such-pool-\xff\xfe"}), None),
        ]
        for what, request, code in cases:
            with self.subTest(what):
                got, closed = self.kp.raw(request)
                parsed = parse_raw_response(got)
                self.assertIsNotNone(parsed, f"no answer to {what} (closed: {closed}): {got!r}")
                status, h, body = parsed
                self.assertEqual(status, 404, body)
                self.assertIn("application/json", h.get("content-type", ""))
                self.assertOpenAIError(body, code=code)
        self.assertEqual(self.sim.log(), [], "none of them went upstream")
        # The connection-level trouble left the daemon as it was.
        status, _, body = self.kp.chat(POOL)
        self.assertEqual(status, 200, body)

    # --- 6. a pool name in the body is replaced in place ---

    def test_a_pool_name_as_model_is_replaced_and_nothing_else_changes(self):
        self.start()
        # Spacing, key order, number spelling, escapes and nested "model" members are the
        # client's: only the top-level model value changes.
        templates = [
            ('{\n  "messages": [\n    {"role": "user", "content": "say {\\"model\\": \\"%(pool)s\\"}'
             ' caf\\u00e9 \u00e9"},\n    {"role": "user", "content": [{"type": "text", "model": '
             '"%(pool)s"}]}\n  ],\n  "metadata": {"model": "%(pool)s", "n": 1.50},\n'
             '  "model" :  "%(model)s",\n  "temperature": 0.7,\n  "max_tokens": 1e2,\n'
             '  "stop": ["\\n"]\n}\n'),
            '{ "model":"%(model)s" , "temperature":0.7,"top_p" : 0.90 }',
        ]
        for i, template in enumerate(templates):
            with self.subTest(body=i):
                sent = template % {"pool": POOL, "model": POOL}
                expected = template % {"pool": POOL, "model": MODEL}
                json.loads(sent)             # the test's own body is valid JSON
                self.sim.reset()
                status, h, body = self.kp.request(
                    "POST", "/v1/chat/completions", body=sent.encode(),
                    headers={"Content-Type": "application/json"})
                self.assertEqual(status, 200, body)
                log = self.sim.log()
                self.assertEqual(len(log), 1)
                self.assertIn("raw_body", log[0], "the simulator logs raw bodies")
                self.assertEqual(log[0]["raw_body"], expected)
                self.assertEqual(log[0]["model"], MODEL)
                self.assertEqual(log[0]["key_id"], key_id(self.secret))


    def test_a_missing_or_non_string_model_is_set_and_nothing_else_changes(self):
        # X-Keypool-Pool names the pool; the body's own model is absent, null or a number: the
        # pool's model id goes in (first, or where the value stood), the rest byte for byte.
        self.start()
        cases = [
            (' {\n "messages": [], "n": 1.50}', ' {"model":"%s",\n "messages": [], "n": 1.50}'),
            ('{}', '{"model":"%s"}'),
            ('{ }', '{"model":"%s" }'),
            ('{"model": null, "x": [1, {"model": 2}]}', '{"model": "%s", "x": [1, {"model": 2}]}'),
            ('{"model": 7 ,"y":"\\u00e9"}', '{"model": "%s" ,"y":"\\u00e9"}'),
        ]
        for sent, expected in cases:
            with self.subTest(body=sent):
                self.sim.reset()
                status, _, body = self.kp.request(
                    "POST", "/v1/chat/completions", body=sent.encode(),
                    headers={"Content-Type": "application/json", "X-Keypool-Pool": POOL})
                self.assertEqual(status, 200, body)
                log = self.sim.log()
                self.assertEqual(len(log), 1)
                self.assertEqual(log[0]["raw_body"], expected % MODEL)
                json.loads(log[0]["raw_body"])

    # --- 7. idle upstream connections stay in the worker's epoll set ---

    @staticmethod
    def cpu_ticks(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])        # utime + stime

    def test_an_upstream_closing_an_idle_connection_neither_spins_the_worker_nor_breaks_the_next_request(self):
        self.start(settings={"workers": 1})
        worker = self.only_worker()
        status, _, body = self.kp.chat(POOL)
        self.assertEqual(status, 200, body)
        # The upstream goes away: the connection curl keeps for the next request is closed
        # under it, and its socket (still watched while idle) becomes readable for good.
        port = self.sim.port
        self.sim.stop()
        before = self.cpu_ticks(worker)
        # A measuring window, not a wait for anything: a worker looping on that socket burns
        # the whole of it (100 ticks per second); an idle one almost none.
        time.sleep(1.0)
        used = self.cpu_ticks(worker) - before
        self.assertLess(used, 15, f"the worker used {used} ticks of CPU in 1 s while idle")
        # The upstream comes back on the same port: the next request gets a new connection.
        self.sim = self.start_sim("--port", str(port))
        status, _, body = self.kp.chat(POOL)
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.sim.log()), 1)
        self.assertEqual(self.worker_pids(), [worker])


    # --- 8. a socket curl closes while still connecting ---

    @staticmethod
    def sockets_to_port(port, state):
        """Local TCP sockets (any process) talking to 127.0.0.1:port in a /proc/net/tcp state."""
        want = "0100007F:%04X" % port
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        return [r for r in rows if r[2] == want and r[3] == state]

    @staticmethod
    def loopback_host_name():
        """A name other than localhost (which curl resolves by itself) that /etc/hosts maps to
        127.0.0.1, so that curl has to ask its resolver thread; None when there is none."""
        try:
            with open("/etc/hosts") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            fields = line.split("#", 1)[0].split()
            if len(fields) >= 2 and fields[0] == "127.0.0.1":
                for name in fields[1:]:
                    if name != "localhost" and not name.endswith(".localhost"):
                        return name
        return None

    def test_a_client_leaving_while_the_upstream_connect_hangs_does_not_break_the_worker(self):
        # curl 7.88 closes a socket that is still connecting without telling the close callback;
        # the number then comes back as the resolver's socketpair for a host name. The worker
        # must keep serving (it once answered 500 "could not start the upstream transfer" to
        # everything after, and never finished a graceful stop).
        host = self.loopback_host_name()
        if host is None:
            self.skipTest("no name but localhost maps to 127.0.0.1 in /etc/hosts")
        hole = socket.socket()
        self.addCleanup(hole.close)
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        hole_port = hole.getsockname()[1]
        fillers = []
        for _ in range(4):              # a full accept queue: further connects hang in SYN_SENT
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", hole_port))
            fillers.append(c)
            self.addCleanup(c.close)
        self.secret = fake_secret()
        other = fake_secret()
        self.sim = self.start_sim()
        self.kp = self.start_keypool(
            self.sim, settings={"workers": 1, "connect_timeout": 30},
            providers=[{"name": "hole", "base_url": f"http://127.0.0.1:{hole_port}/v1"},
                       {"name": "named", "base_url": f"http://{host}:{self.sim.port}/api/v1"}],
            pools=[{"name": "holepool", "model": "m/hole", "keys": [other], "provider": "hole"},
                   {"name": POOL, "model": MODEL, "keys": [self.secret], "provider": "named"}])
        worker = self.only_worker()
        before = len(self.sockets_to_port(hole_port, "02"))

        client = socket.socket(socket.AF_UNIX)
        client.connect(self.kp.socket_path)
        body = json.dumps({"model": "m/hole", "messages": []}).encode()
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\nContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: len(self.sockets_to_port(hole_port, "02")) > before,
                 what="the worker's connect to the unanswering upstream")
        client.close()
        wait_for(lambda: len(self.sockets_to_port(hole_port, "02")) == before,
                 what="curl to drop the connect of the request whose client left")

        for _ in range(3):
            status, _, body = self.kp.chat(POOL)
            self.assertEqual(status, 200, body)
        self.assertEqual(self.worker_pids(), [worker])
        self.kp.stop()
        self.assertEqual(self.kp.returncode, 0, self.kp.stderr()[-2000:])


if __name__ == "__main__":
    unittest.main(verbosity=2)

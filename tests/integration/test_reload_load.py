#!/usr/bin/env python3
"""Reloads and stops under keep-alive load drop nothing: clients on keep-alive connections send
plain requests and one-second streams without pause while the daemon gets SIGHUP every second;
not one request fails and not one stream is cut. A worker stopped (SIGSTOP) and killed as wedged
loses only the requests it held: the others are served. SIGTERM under the same load lets every
request already sent finish.

The clients are http.client as it is: a connection the server closes while the client sends is a
failure here (http.client does not retry), so keypool must never close a connection whose next
request is on its way, and must answer every request it has read."""

import http.client
import json
import os
import signal
import subprocess
import threading
import time
import unittest

from kptest import (DEADLINE, SystemdTestCase, UnixHTTPConnection, daemon_env, fake_secret,
                    process_gone, proc_start_time, sse_events, wait_for)

MODEL = "z-ai/glm-4.5"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
STREAM_BODY = dict(BODY, stream=True)
# Five events 200 ms apart: a one-second stream.
STREAM_HEADERS = {"X-Sim-Chunks": "5", "X-Sim-Chunk-Delay-Ms": "200"}


class Load:
    """Client threads, each on one keep-alive connection of its own, sending without pause.

    Every outcome is counted: ok, failed (an exception or a status other than 200) and cut (a
    stream that did not end with its [DONE] event). held_by(pid) says which requests were in
    flight on a connection that pid had accepted, for the SIGSTOP test."""

    def __init__(self, kp, plain=4, streams=2, timeout=30, stop_on_error=False):
        self.kp = kp
        self.stop_on_error = stop_on_error      # a client ends at its first error
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.streams_ok = 0
        self.failures = []
        self.cut = []
        self.timeout = timeout
        self.conns = []
        self.threads = [threading.Thread(target=self.client, args=(False,), daemon=True)
                        for _ in range(plain)]
        self.threads += [threading.Thread(target=self.client, args=(True,), daemon=True)
                         for _ in range(streams)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 10)

    def served(self):
        with self.lock:
            return self.ok + self.streams_ok

    def client(self, stream):
        conn = UnixHTTPConnection(self.kp.socket_path, self.timeout)
        with self.lock:
            self.conns.append(conn)
        body = json.dumps(STREAM_BODY if stream else BODY).encode()
        headers = {"Content-Type": "application/json", **(STREAM_HEADERS if stream else {})}
        try:
            while not self.stop.is_set():
                resp = None
                try:
                    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    with self.lock:
                        # A stream is cut once its head has come; before that the request failed.
                        (self.cut if stream and resp is not None else self.failures).append(
                            f"{'stream' if stream else 'request'}: {e!r}")
                    conn.close()
                    if self.stop_on_error:
                        return
                    continue
                if resp.status != 200:
                    with self.lock:
                        self.failures.append(f"{resp.status} {payload[:200]!r}")
                    continue
                if stream and (sse_events(payload)[-1:] != [b"[DONE]"]):
                    with self.lock:
                        self.cut.append(f"stream without [DONE]: {payload[-200:]!r}")
                    continue
                with self.lock:
                    if stream:
                        self.streams_ok += 1
                    else:
                        self.ok += 1
        finally:
            conn.close()


class ReloadLoadTest(SystemdTestCase):

    def start(self, workers=2, **settings):
        self.sim = self.start_sim()
        self.secrets = [fake_secret() for _ in range(3)]
        self.settings = {"workers": workers, **settings}
        self.kp = self.start_daemon(self.sim, pools=self.pools(), settings=self.settings,
                                    env=daemon_env())
        return self.kp

    def pools(self):
        return [{"name": "P1", "model": MODEL, "keys": list(self.secrets)}]

    def load(self, **kw):
        load = Load(self.kp, **kw).start()
        self.addCleanup(load.finish)
        wait_for(lambda: (load.streams_ok >= 1 or not kw.get("streams", 2)) and load.ok >= 10,
                 timeout=30,
                 what="requests and streams to flow")
        return load

    def test_sighup_every_second_under_keep_alive_load_drops_nothing(self):
        kp = self.start()
        load = self.load()
        generations = {w["generation"] for w in kp.workers()}
        for _ in range(8):
            kp.send_signal(signal.SIGHUP)
            time.sleep(1)
            generations |= {w["generation"] for w in kp.workers()}
        before = load.served()
        wait_for(lambda: load.served() >= before + 5, timeout=30,
                 what="requests to flow after the reloads")
        load.finish()
        summary = (f"{load.ok} requests and {load.streams_ok} streams served, "
                   f"{len(load.failures)} failed, {len(load.cut)} streams cut, "
                   f"generations seen {sorted(generations)}")
        print(summary)
        self.assertEqual(load.failures, [], summary)
        self.assertEqual(load.cut, [], summary)
        # A SIGHUP while the previous generation still drains is refused (one-second streams
        # keep it a while): at least two of the eight must have gone through.
        self.assertGreaterEqual(len(generations), 3, "too few reloads went through: " + summary)

    def test_sigterm_under_keep_alive_load_answers_every_request_it_read(self):
        kp = self.start()
        load = self.load(stop_on_error=True)
        kp.send_signal(signal.SIGTERM)
        self.assertEqual(kp.wait_exit(30), 0)
        load.finish()
        # Each client ends at its first error. Once the listener is gone a new connection finds
        # nobody (refused, or no socket): that is the stop, not a drop. What must not happen is
        # a request sent on a connection keypool had accepted that gets no answer, or a cut
        # stream.
        self.assertEqual(load.cut, [], f"{len(load.cut)} streams cut by SIGTERM")
        dropped = [f for f in load.failures
                   if "ConnectionRefused" not in f and "FileNotFound" not in f]
        self.assertEqual(dropped, [], f"requests dropped by SIGTERM ({load.ok} served, "
                                      f"{load.streams_ok} streams)")

    def test_a_wedged_worker_loses_only_the_requests_it_held(self):
        kp = self.start(workers=2, worker_timeout=2)
        load = self.load(plain=4, streams=0, timeout=5)
        victim = kp.workers()[0]["pid"]
        start_time = proc_start_time(victim)
        failed_before = len(load.failures)
        os.kill(victim, signal.SIGSTOP)
        try:
            # What it held at the stop: the clients' connections it had accepted (each one's
            # request in hand, or the next one sent on it).
            held = held_connections(victim, load.conns)
            wait_for(lambda: process_gone(victim, start_time), timeout=30,
                     what=f"the coordinator to kill the stopped worker {victim}")
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        wait_for(lambda: len(kp.workers()) == 2 and victim not in
                 {w["pid"] for w in kp.workers()}, timeout=DEADLINE,
                 what="a replacement worker")
        before = load.served()
        wait_for(lambda: load.served() >= before + 20, timeout=30,
                 what="requests to flow after the replacement")
        load.finish()
        lost = len(load.failures) - failed_before
        print(f"the stopped worker held {held} connections; {lost} requests failed, "
              f"{load.served()} served")
        self.assertGreater(held, 0, "the stopped worker held no connection: nothing was tested")
        self.assertEqual(lost, held, f"failures: {load.failures}")
        self.assertTrue(kp.stderr_events("worker_exit"), "no event=worker_exit line")
        # The killed worker's leases went back with it: no key stays counted as busy.
        wait_for(lambda: all(k["in_flight"] == 0 for k in kp.keys().values()),
                 what="every key's in_flight to be 0 again")


def held_connections(pid, conns):
    """How many of conns (UnixHTTPConnections) have their server end in process pid, as ss(8)
    shows it: a line per socket, "u_str ESTAB 0 0 <path> <inode> <peer path> <peer inode> users:"."""
    inodes = set()
    for c in conns:
        try:
            inodes.add(str(os.fstat(c.sock.fileno()).st_ino))
        except (AttributeError, OSError, ValueError):
            pass            # between two connections
    out = subprocess.run(["ss", "-xpn"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, timeout=10).stdout
    held = 0
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[7] in inodes and f"pid={pid}," in line:
            held += 1
    return held

if __name__ == "__main__":
    unittest.main(verbosity=2)

#!/usr/bin/env python3
"""Cluster: several keypoold hosts share key health and budgets through one Redis.

Each test starts its own redis-server on a UNIX socket in a private directory, two or three
keypoold instances (each with its own socket and table) against one simulator, and stops them all
at the end. Timing bounds are generous (the machine is shared); the propagation latency measured
is printed for the record.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from datetime import datetime

from kptest import KeypoolTestCase, fake_secret, key_id, wait_for

MODEL = "z-ai/glm-4.5"
REDIS_SERVER = shutil.which("redis-server")


class Redis:
    """redis-server on a private UNIX socket, no persistence; restartable on the same socket."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kpredis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.proc = None
        self.start()

    def start(self):
        with open(os.path.join(self.dir, "redis.stderr"), "ab") as err:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: os.path.exists(self.socket), what="redis-server to listen")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@unittest.skipUnless(REDIS_SERVER, "redis-server is not installed (Debian: redis-server)")
class ClusterTest(KeypoolTestCase):

    def setUp(self):
        self.redis = Redis()
        self.addCleanup(self.redis.cleanup)
        self.prefix = f"kpt{os.getpid()}:"

    def start_nodes(self, keys, names=("alpha", "beta"), **pool):
        self.sim = self.start_sim()
        nodes = []
        for name in names:
            nodes.append(self.start_keypool(self.sim, pools=[
                {"name": "GLM45", "model": MODEL, "keys": list(keys), **pool}],
                settings={"recovery_time": 300, "max_wait": 2,
                          "cluster": {"redis": "unix:" + self.redis.socket, "node": name,
                                      "prefix": self.prefix}}))
        for kp in nodes:
            wait_for(lambda: kp.get_json("/api/cluster")["live_nodes"] == len(names),
                     what=f"every node to see the {len(names)} live nodes")
        return nodes

    def state_on(self, kp, secret):
        return kp.key(secret)["state"]

    def post(self, kp, path):
        status, _, body = kp.request("POST", path)
        self.assertEqual(status, 200, body)

    def cluster_pid(self, kp):
        """The cluster process: the coordinator's child that is not a worker."""
        workers = {w["pid"] for w in kp.status()["workers"]}
        kids = subprocess.run(["pgrep", "-P", str(kp.proc.pid)], capture_output=True,
                              text=True).stdout.split()
        others = [int(p) for p in kids if int(p) not in workers]
        return others[0] if len(others) == 1 else None

    # --- what is shared ---

    def test_cooldown_seen_on_one_node_is_skipped_on_the_other(self):
        a, b = fake_secret(), fake_secret()
        one, two = self.start_nodes([a, b])
        self.sim.set_rules({key_id(a): {"status": 429, "retry_after": "120", "count": 1}})
        status, h, body = one.chat(MODEL)
        self.assertEqual(status, 200, body)
        self.assertEqual(h.get("x-keypool-key"), key_id(b))
        wait_for(lambda: self.state_on(two, a) == "cooling", timeout=10,
                 what="the cooldown to reach the other node")
        k = two.key(a)
        self.assertEqual(k["reason"], "rate_limited", k)
        self.assertGreater(k["cooldown_remaining_s"], 100, k)
        before = len(self.sim.requests_with(a))
        for _ in range(4):
            status, h, body = two.chat(MODEL)
            self.assertEqual((status, h.get("x-keypool-key")), (200, key_id(b)), body)
        self.assertEqual(len(self.sim.requests_with(a)), before, "the cooled key got no request")
        events = [e for e in two.get_json(f"/api/history?key={key_id(a)}")["events"]
                  if e["event"] == "cooldown"]
        self.assertEqual([e["node"] for e in events], ["alpha"], events)
        mine = [e for e in one.get_json(f"/api/history?key={key_id(a)}")["events"]
                if e["event"] == "cooldown"]
        self.assertEqual([e["node"] for e in mine], ["alpha"], mine)

    def test_disable_and_enable_propagate_and_latency_is_measured(self):
        a, b = fake_secret(), fake_secret()
        one, two = self.start_nodes([a, b])
        A = key_id(a)
        lat = []
        # Under load: both nodes serve a steady stream of requests meanwhile.
        stop = threading.Event()
        served = []

        def load(kp):
            while not stop.is_set():
                served.append(kp.chat(MODEL)[0])
        threads = [threading.Thread(target=load, args=(kp,)) for kp in (one, two)]
        for t in threads:
            t.start()
        self.addCleanup(lambda: (stop.set(), [t.join() for t in threads]))
        for i in range(40):
            src, dst = (one, two) if i % 2 == 0 else (two, one)
            for action, want in (("disable", "disabled"), ("enable", "ready")):
                t0 = time.monotonic()
                self.post(src, f"/api/keys/{A}/{action}")
                wait_for(lambda: self.state_on(dst, a) == want, timeout=10, interval=0.001,
                         what=f"{action} to reach the other node")
                lat.append(time.monotonic() - t0)
        stop.set()
        for t in threads:
            t.join()
        self.assertEqual(self.state_on(one, a), "ready")
        self.assertEqual(self.state_on(two, a), "ready")
        self.assertEqual([s for s in served if s != 200], [], "the load was served throughout")
        lat.sort()
        p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
        sys.stderr.write(f"\npropagation (POST on one node until GET on the other sees it), "
                         f"{len(lat)} samples under load ({len(served)} requests): p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                         f"max {lat[-1] * 1000:.1f} ms\n")
        self.assertLess(p99, 2.0, "generous bound on a shared machine")
        d = [e for e in two.get_json(f"/api/history?key={A}")["events"] if e["event"] == "disable"]
        self.assertEqual({e["node"] for e in d}, {"alpha", "beta"}, d)

    def test_rpm_holds_across_two_nodes_hammering_one_key(self):
        # The simulator allows 10 requests a minute on this key; each node may use its share.
        k = fake_secret("-limit10-")
        one, two = self.start_nodes([k], rpm=10)
        results = []

        def hammer(kp):
            for _ in range(12):
                status, _, _ = kp.chat(MODEL)
                results.append(status)
        threads = [threading.Thread(target=hammer, args=(kp,)) for kp in (one, two) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log = self.sim.finished_log()
        limited = [e for e in log if e.get("status") == 429]
        served = [e for e in log if e.get("status") == 200]
        self.assertEqual(limited, [], "no node went past its share: the upstream never said 429")
        self.assertLessEqual(len(served), 10)
        self.assertEqual(results.count(200), len(served))

    def hammer(self, nodes, per_node, requests, headers=None):
        """per_node threads on each node send requests chats each; returns {node index: statuses}."""
        results = {i: [] for i in range(len(nodes))}

        def run(i, kp):
            for _ in range(requests):
                results[i].append(kp.chat(MODEL, headers=headers)[0])
        threads = [threading.Thread(target=run, args=(i, kp)) for i, kp in enumerate(nodes)
                   for _ in range(per_node)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def test_rpm_smaller_than_the_nodes_is_not_over_admitted(self):
        # rpm = 1 on two nodes: a static share would let each node have 1 (2 in all). The
        # simulator allows 1 a minute on this key and answers 429 beyond.
        k = fake_secret("-limit1-")
        one, two = self.start_nodes([k], rpm=1)
        results = self.hammer((one, two), 2, 2)
        log = self.sim.finished_log()
        served = [e for e in log if e.get("status") == 200]
        self.assertEqual([e for e in log if e.get("status") == 429], [],
                         "over-admission: the upstream said 429")
        self.assertEqual(len(served), 1, "one request in the minute, cluster-wide")
        self.assertEqual(sum(r.count(200) for r in results.values()), 1, results)

    def test_max_concurrent_one_holds_across_two_nodes_hammering(self):
        k = fake_secret()
        one, two = self.start_nodes([k], max_concurrent=1)
        # Each request stays 150 ms at the upstream: overlaps would show in its log.
        results = self.hammer((one, two), 2, 6, headers={"X-Sim-Delay-Ms": "150"})
        spans = sorted((e["time"], e["end_time"]) for e in self.sim.finished_log()
                       if e.get("status") == 200)
        overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 0.002]
        self.assertGreater(len(spans), 4, results)
        self.assertEqual(overlaps, [], f"over-admission: requests on the key overlapped "
                         f"({len(overlaps)} of {len(spans)})")
        self.assertTrue(all(200 in r for r in results.values()),
                        f"both nodes got the slot in turn: {results}")

    def test_an_idle_nodes_rpm_budget_is_used_by_the_busy_one(self):
        # rpm = 6: a static share is 3 a node; with the other node idle, this one may use all 6.
        k = fake_secret("-limit6-")
        one, two = self.start_nodes([k], rpm=6)
        results = self.hammer((one,), 1, 8)[0]
        self.assertEqual([e for e in self.sim.finished_log() if e.get("status") == 429], [],
                         "over-admission: the upstream said 429")
        self.assertGreater(results.count(200), 3, f"more than the static share: {results}")
        self.assertLessEqual(results.count(200), 6, results)
        self.assertEqual(two.key(k)["requests"], 0)

    def test_a_dead_nodes_concurrency_slot_comes_back_after_its_heartbeat(self):
        k = fake_secret()
        one, two = self.start_nodes([k], max_concurrent=1)
        # Node one holds the only slot with a request that stays at the upstream, then dies.
        held = threading.Thread(target=lambda: one.chat(MODEL, headers={"X-Sim-Delay-Ms": "20000"}))
        held.start()
        wait_for(lambda: len(self.sim.requests_with(k)) == 1, what="node one's request upstream")
        time.sleep(0.1)
        killed = time.monotonic()
        kids = subprocess.run(["pgrep", "-P", str(one.proc.pid)], capture_output=True,
                              text=True).stdout.split()
        one.proc.kill()
        for pid in kids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        one.wait_exit()
        status, _, _ = two.chat(MODEL)
        self.assertNotEqual(status, 200, "the dead node's slot is still counted before its "
                            "heartbeat expires (max_wait 2 s < 5 s)")
        while True:
            status, _, _ = two.chat(MODEL)
            if status == 200 or time.monotonic() - killed > 20:
                break
        waited = time.monotonic() - killed
        self.assertEqual(status, 200, "the slot came back")
        sys.stderr.write(f"\nthe dead node's slot came back after {waited:.1f} s\n")
        self.assertLess(waited, 15)
        held.join(timeout=30)

    def test_cooldown_propagation_under_load_is_timed(self):
        a, b, c = fake_secret(), fake_secret(), fake_secret()
        one, two = self.start_nodes([a, b, c])
        A = key_id(a)
        stop = threading.Event()
        served = []

        def load(kp):
            while not stop.is_set():
                served.append(kp.chat(MODEL)[0])
        threads = [threading.Thread(target=load, args=(kp,)) for kp in (one, two) for _ in range(2)]
        for t in threads:
            t.start()
        self.addCleanup(lambda: (stop.set(), [t.join() for t in threads]))

        def when(e):
            return datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()

        def cooldowns(kp):
            return [e for e in kp.get_json(f"/api/history?key={A}")["events"]
                    if e["event"] == "cooldown"]
        lat = []
        for i in range(20):
            seen = (len(cooldowns(one)), len(cooldowns(two)))
            # Whichever node's request meets the 429 first is the source.
            self.sim.set_rules({A: {"status": 429, "retry_after": "120", "count": 1}})
            wait_for(lambda: len(cooldowns(one)) > seen[0] and len(cooldowns(two)) > seen[1],
                     timeout=10, interval=0.01, what="the cooldown on both nodes")
            evs = [max(cooldowns(kp), key=when) for kp in (one, two)]
            src = "alpha" if evs[0]["node"] == "alpha" else "beta"
            self.assertEqual(evs[0]["node"], evs[1]["node"], evs)
            at = {kp: when(e) for kp, e in zip(("alpha", "beta"), evs)}
            lat.append(at["beta" if src == "alpha" else "alpha"] - at[src])
            self.post(one, f"/api/keys/{A}/enable")
            wait_for(lambda: self.state_on(two, a) == "ready" and self.state_on(one, a) == "ready",
                     timeout=10, what="the enable on both nodes")
        stop.set()
        for t in threads:
            t.join()
        lat.sort()
        p50, p99 = lat[len(lat) // 2], lat[-1]
        sys.stderr.write(f"\ncooldown propagation (seen on one node until applied on the other), "
                         f"{len(lat)} samples under load ({len(served)} requests): "
                         f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms\n")
        self.assertLess(p99, 2.0, "generous bound on a shared machine")

    def test_usage_is_summed_across_nodes_and_nodes_are_listed(self):
        a = fake_secret()
        one, two = self.start_nodes([a])
        for kp, n in ((one, 3), (two, 2)):
            for _ in range(n):
                self.assertEqual(kp.chat(MODEL)[0], 200)

        def summed():
            doc = one.get_json("/api/key-status?scope=cluster")
            return doc["pools"][0]["keys"][0]["requests"] == 5
        wait_for(summed, timeout=10, what="the cluster-wide request count")
        self.assertEqual(one.key(a)["requests"], 3, "the node's own view stays its own")
        doc = two.get_json("/api/cluster")
        self.assertEqual(doc["state"], "ok")
        self.assertEqual(sorted(n["name"] for n in doc["nodes"]), ["alpha", "beta"])
        wait_for(lambda: {n["name"]: n["requests"] for n in two.get_json("/api/cluster")["nodes"]}
                 == {"alpha": 3, "beta": 2}, timeout=10, what="each node's report")
        ctl = os.environ.get("KEYPOOLCTL")
        if ctl:
            out = subprocess.run([ctl, "-s", one.socket_path, "--json", "keys", "--cluster"],
                                 capture_output=True, text=True, timeout=30)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(json.loads(out.stdout)["pools"][0]["keys"][0]["requests"], 5)

    # --- when Redis is away ---

    def test_redis_killed_and_restarted_mid_load_fails_no_request(self):
        a, b = fake_secret(), fake_secret()
        one, two = self.start_nodes([a, b])
        stop = threading.Event()
        results = []

        def load(kp):
            while not stop.is_set():
                status, _, _ = kp.chat(MODEL)
                results.append(status)
        threads = [threading.Thread(target=load, args=(kp,)) for kp in (one, two)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        self.redis.kill()
        for kp in (one, two):
            wait_for(lambda: kp.status().get("cluster") == "degraded", timeout=10,
                     what="the node to say it is degraded")
            status, _, body = kp.request("GET", "/health")
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["cluster"], "degraded")
        # Events seen while Redis is away go out when it is back.
        self.post(one, f"/api/keys/{key_id(a)}/disable")
        time.sleep(0.5)
        self.redis.start()
        for kp in (one, two):
            wait_for(lambda: kp.status().get("cluster") == "ok", timeout=15,
                     what="the node to reconnect")
        wait_for(lambda: self.state_on(two, a) == "disabled", timeout=10,
                 what="the disable made while Redis was away to reach the other node")
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        self.assertGreater(len(results), 10)
        self.assertEqual([s for s in results if s != 200], [], "no request failed")
        self.assertIn("degraded", one.stderr())

    def test_redis_answering_garbage_is_treated_as_down(self):
        path = os.path.join(self.redis.dir, "liar.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(16)
        srv.settimeout(0.2)
        done = threading.Event()
        accepted = []

        def liar():
            while not done.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                accepted.append(conn)
                try:
                    conn.recv(65536)
                    conn.sendall(b"*zz\r\n\x00\xff garbage\r\n")
                except OSError:
                    pass
        t = threading.Thread(target=liar)
        t.start()
        self.addCleanup(lambda: (done.set(), t.join(), srv.close(), [c.close() for c in accepted]))
        a = fake_secret()
        self.sim = self.start_sim()
        kp = self.start_keypool(self.sim, pools=[{"name": "GLM45", "model": MODEL, "keys": [a]}],
                                settings={"cluster": {"redis": "unix:" + path, "node": "solo"}})
        wait_for(lambda: len(accepted) >= 2, what="the node to try the liar")
        self.assertEqual(kp.status()["cluster"], "degraded")
        self.assertEqual(kp.get_json("/api/cluster")["state"], "degraded")
        for _ in range(3):
            self.assertEqual(kp.chat(MODEL)[0], 200)
        wait_for(lambda: len(accepted) >= 4, timeout=15, what="the node to retry with backoff")
        self.assertIn("degraded", kp.stderr())

    def test_killed_cluster_process_is_respawned_and_catches_up(self):
        a, b = fake_secret(), fake_secret()
        one, two = self.start_nodes([a, b])
        pid = self.cluster_pid(one)
        self.assertIsNotNone(pid)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: self.cluster_pid(one) not in (None, pid), timeout=10,
                 what="a new cluster process")
        self.post(one, f"/api/keys/{key_id(a)}/disable")
        wait_for(lambda: self.state_on(two, a) == "disabled", timeout=10,
                 what="the respawned cluster process to publish")
        self.post(two, f"/api/keys/{key_id(a)}/enable")
        wait_for(lambda: self.state_on(one, a) == "ready", timeout=10,
                 what="the respawned cluster process to apply")
        self.assertEqual(one.chat(MODEL)[0], 200)


if __name__ == "__main__":
    unittest.main()

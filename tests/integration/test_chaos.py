#!/usr/bin/env python3
"""Chaos: steady load while workers are killed, stopped and reloaded and the upstream misbehaves.

Bounded (CHAOS_SECONDS of load, 30 by default) and seeded: the seed is printed, and
KEYPOOL_CHAOS_SEED=N replays the same schedule of faults and the same mix of requests (the
timing between them still depends on the machine).

Load: client threads sending plain and streamed requests over the socket, each with a unique
X-Chaos-Id header (the simulator logs it). Per request, at random: a clean answer, a trickled
stream, an upstream that resets the connection mid-answer or stalls (upstream_timeout ends it),
a 429 or 5xx, or a client that hangs up mid-stream. Meanwhile, on a seeded schedule: a worker
SIGKILLed, a worker SIGSTOPped and SIGCONTed (killed as wedged instead if the stop outlasts
worker_timeout), a worker SIGSTOPped and left for the coordinator to kill as wedged
(worker_timeout), a SIGHUP reload.

Asserts: every request got a complete answer, an error answer or a visibly cut one within its
deadline (an answer lost without a byte only when a worker was signalled while it ran); no
request was sent upstream after the first byte of its answer reached the client; at rest,
in_flight is 0, the coordinator's descriptors are back to their baseline and every live
worker's are those of a fresh worker (upstream keep-alive connections aside), no child of the
coordinator is a zombie, and `keypoolctl check` finds the table consistent.
"""

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import unittest

from kptest import KEYPOOLD, KeypoolTestCase, fake_secret, proc_state, wait_for

MODEL = "m/chaos"
SECONDS = float(os.environ.get("CHAOS_SECONDS", "30"))
CLIENTS = 6
WORKERS = 2
# A request's deadline: three upstream attempts of at most upstream_timeout each, the backoff
# between them, and a wedged worker's worker_timeout, with room for a sanitizer build.
# worker_timeout is the least allowed, 2 s, which a stop-cont may outlast: its stop of up to
# 1.2 s can follow a heartbeat up to 1.25 s old (one a second, plus sd-event's 250 ms of timer
# slack), and the coordinator then kills the stopped worker as wedged, as it should. act()
# counts what that worker drops against the stop.
UPSTREAM_TIMEOUT = 4
WORKER_TIMEOUT = 2
REQUEST_DEADLINE = 45.0
KEYPOOLCTL = os.environ.get("KEYPOOLCTL") or os.path.join(os.path.dirname(KEYPOOLD), "keypoolctl")

# (name, weight, streamed, X-Sim-* headers); "hangup" is the client leaving mid-stream.
KINDS = [
    ("plain", 30, False, {}),
    ("stream", 20, True, {}),
    ("trickle", 8, True, {"X-Sim-Chunks": "10", "X-Sim-Chunk-Delay-Ms": "100"}),
    ("reset", 8, True, {"X-Sim-Reset-After": "2"}),
    ("reset-plain", 4, False, {"X-Sim-Reset-After": "0"}),
    ("stall", 4, True, {"X-Sim-Stall-After": "1"}),
    ("stall-plain", 2, False, {"X-Sim-Stall-After": "0"}),
    ("429", 3, False, {"X-Sim-Status": "429", "X-Sim-Retry-After": "1"}),
    ("5xx", 6, False, {"X-Sim-Status": "502"}),
    ("503", 3, True, {"X-Sim-Status": "503"}),
    ("hangup", 8, True, {"X-Sim-Chunks": "20", "X-Sim-Chunk-Delay-Ms": "50"}),
]
# Kinds whose answer the upstream itself cuts: a cut answer is what the client should see.
UPSTREAM_CUTS = {"reset", "reset-plain", "stall", "stall-plain"}


def fd_targets(pid):
    """readlink of every descriptor of pid."""
    out = []
    d = f"/proc/{pid}/fd"
    for fd in os.listdir(d):
        try:
            out.append(os.readlink(f"{d}/{fd}"))
        except OSError:
            pass
    return out


def tcp_inodes_to(port):
    """Inodes of the TCP sockets whose remote end is 127.0.0.1:port (upstream connections)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[2].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            pass
    return inodes


def fd_count(pid, upstream_port):
    """(descriptors other than upstream connections and pidfds, upstream connections, pidfds)
    of pid. A worker must hold no pidfd: those are the coordinator's, one per child."""
    upstream = tcp_inodes_to(upstream_port)
    own = pooled = pidfds = 0
    for t in fd_targets(pid):
        if t.startswith("socket:[") and t[8:-1] in upstream:
            pooled += 1
        elif t == "anon_inode:[pidfd]":
            pidfds += 1
        else:
            own += 1
    return own, pooled, pidfds


class Outcome:
    def __init__(self, rid, kind, stream):
        self.rid, self.kind, self.stream = rid, kind, stream
        self.start = time.time()
        self.first_byte = None      # when the status line arrived (time.time())
        self.end = None
        self.status = None
        self.result = None          # complete, error, cut, dropped, hung-up, late


class ChaosTest(KeypoolTestCase):

    def setUp(self):
        super().setUp()
        env = os.environ.get("KEYPOOL_CHAOS_SEED")
        self.seed = int(env) if env else random.SystemRandom().randrange(1 << 31)
        sys.stderr.write(f"\nchaos seed: {self.seed} (KEYPOOL_CHAOS_SEED={self.seed} replays it)\n")
        self.actions = []           # (kind, start, end) of every signal sent to a worker
        self.stopped = set()        # pids SIGSTOPped and not known to be continued or gone
        self.chaos_failure = None   # the traceback that ended the schedule early
        self.lock = threading.Lock()
        self.addCleanup(self.continue_stopped)

    def continue_stopped(self):
        for pid in list(self.stopped):
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass

    # --- the daemon's processes ---

    def worker_pids(self):
        return self.kp.process_ids()[1:]

    def live_workers(self):
        return [p for p in self.worker_pids() if proc_state(p) not in (None, "Z", "X")]

    def zombies(self):
        return [p for p in self.worker_pids() if proc_state(p) == "Z"]

    def in_flight(self):
        return sum(k["in_flight"] for k in self.kp.keys().values())

    # --- load ---

    def one(self, rng, n):
        kind, _, stream, headers = rng.choices(KINDS, [k[1] for k in KINDS])[0]
        rid = f"chaos-{self.seed}-{n}"
        o = Outcome(rid, kind, stream)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        if stream:
            body["stream"] = True
        c = http.client.HTTPConnection("localhost", timeout=REQUEST_DEADLINE)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(REQUEST_DEADLINE)
        try:
            s.connect(self.kp.socket_path)
            c.sock = s
            c.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                      {"Content-Type": "application/json", "X-Chaos-Id": rid, **headers})
            r = c.getresponse()
            o.first_byte = time.time()
            o.status = r.status
            if kind == "hangup" and r.status == 200:
                r.read(120)
                o.result = "hung-up"
                return o
            data = r.read()
            o.result = self.judge(o, data)
        except TimeoutError:
            o.result = "late"
        except http.client.IncompleteRead:
            o.result = "cut"
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            o.result = "cut" if o.first_byte else "dropped"
        except (OSError, http.client.HTTPException) as e:
            o.result = f"broken ({e!r})"
        finally:
            o.end = time.time()
            c.close()
        return o

    def judge(self, o, data):
        if o.status >= 400:
            try:
                return "error" if "error" in json.loads(data) else "garbled error"
            except ValueError:
                return "garbled error"
        if o.status != 200:
            return f"unexpected status {o.status}"
        if o.stream:
            # Whole: ends with [DONE]. An error event at the end is a visibly cut stream.
            if data.rstrip().endswith(b"data: [DONE]"):
                return "complete"
            return "cut"
        try:
            return "complete" if json.loads(data).get("choices") else "garbled"
        except ValueError:
            return "garbled"

    def load(self, i, stop, out):
        rng = random.Random(self.seed * 100 + i)
        n = 0
        while not stop.is_set():
            out.append(self.one(rng, i * 100000 + n))
            n += 1

    # --- chaos ---

    def act(self, kind, rng):
        t0 = time.time()
        if kind == "reload":
            self.kp.send_signal(signal.SIGHUP)
            with self.lock:
                self.actions.append((kind, t0, t0))
            return
        pids = [p for p in self.live_workers() if p not in self.stopped]
        if not pids:
            return
        pid = rng.choice(sorted(pids))
        # Put down before the signal and closed after it, whatever becomes of the worker
        # meanwhile: the requests it drops are this signal's doing.
        action = [kind, t0, float("inf")]
        with self.lock:
            self.actions.append(action)
        try:
            if kind == "kill":
                os.kill(pid, signal.SIGKILL)
                return
            self.stopped.add(pid)
            os.kill(pid, signal.SIGSTOP)
            if kind == "stop-cont":
                time.sleep(rng.uniform(0.3, 1.2))
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    # Its heartbeat grew worker_timeout old while it was stopped, and the
                    # coordinator killed it as wedged, as it should.
                    pass
                cont = time.monotonic()
                # Until it writes a heartbeat again the coordinator may still find it wedged
                # and kill it, with what it took since SIGCONT: the stop lasts until then.
                wait_for(lambda: self.beat_since_or_gone(pid, cont), timeout=WORKER_TIMEOUT + 20,
                         what=f"stopped worker {pid} to beat again after SIGCONT, or be gone",
                         ignore=(OSError, http.client.HTTPException))
            else:
                # Left stopped: the coordinator kills it when its heartbeat is worker_timeout old.
                wait_for(lambda: proc_state(pid) in (None, "Z", "X"), timeout=WORKER_TIMEOUT + 20,
                         what=f"the coordinator to kill stopped worker {pid} as wedged")
            self.stopped.discard(pid)
        finally:
            action[2] = time.time()

    def beat_since_or_gone(self, pid, since):
        """Whether worker pid is gone or has written a heartbeat since the time.monotonic()
        value since (both clocks are CLOCK_MONOTONIC)."""
        asked = time.monotonic()
        if proc_state(pid) in (None, "Z", "X"):
            return True
        for w in self.kp.status()["workers"]:
            if w["pid"] == pid:
                return w["heartbeat_age_ms"] <= (asked - since) * 1000
        return True     # reaped: the coordinator freed its slot

    def chaos(self, stop):
        try:
            self.run_schedule(stop)
        except BaseException:
            self.chaos_failure = traceback.format_exc()
            raise

    def run_schedule(self, stop):
        rng = random.Random(self.seed)
        plan = ["kill", "kill", "stop-cont", "stop-cont", "stop-leave", "reload", "reload", "kill"]
        rng.shuffle(plan)
        gap = SECONDS / (len(plan) + 1)
        t0 = time.monotonic()
        for i, kind in enumerate(plan):
            when = t0 + gap * (i + 1) + rng.uniform(-gap / 3, gap / 3)
            while time.monotonic() < when and not stop.is_set():
                time.sleep(0.05)
            self.act(kind, rng)

    def signalled_during(self, o):
        """Whether a worker was signalled (killed or stopped) while o ran."""
        return any(k != "reload" and a <= o.end and b >= o.start for k, a, b in self.actions)

    # --- the tests ---

    def test_a_stop_cont_whose_worker_is_killed_as_wedged_counts_as_a_signal(self):
        """Seed 87935635 in CI: a stop-cont's worker outlasted worker_timeout while stopped and
        was killed by the coordinator, SIGCONT found no such process, and the stop was never
        counted, so the requests the worker had taken were lost with no signal to blame."""
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings={
            "workers": WORKERS, "worker_timeout": WORKER_TIMEOUT},
            pools=[{"name": "C", "model": MODEL, "keys": [fake_secret()]}])
        wait_for(lambda: len(self.live_workers()) == WORKERS, what="the workers")
        victim = []

        class StoppedUntilKilled:
            """The schedule's choices, but the stop lasts until the coordinator has killed and
            reaped the worker."""
            def choice(_, pids):
                victim.append(pids[0])
                return pids[0]

            def uniform(_, low, high):
                wait_for(lambda: proc_state(victim[0]) is None, timeout=WORKER_TIMEOUT + 20,
                         what=f"the coordinator to kill and reap stopped worker {victim[0]}")
                return 0

        before = time.time()
        self.act("stop-cont", StoppedUntilKilled())
        after = time.time()

        self.assertEqual(len(self.actions), 1, f"the stop is counted: {self.actions}")
        kind, start, end = self.actions[0]
        self.assertEqual(kind, "stop-cont")
        self.assertTrue(before <= start and end <= after, (before, start, end, after))
        dropped = Outcome("dropped", "plain", False)
        dropped.start, dropped.end = before, after
        self.assertTrue(self.signalled_during(dropped), "a request lost with the worker is put "
                        "down to the stop")
        self.assertEqual(self.stopped, set())

    def test_chaos(self):
        keys = [fake_secret() for _ in range(4)]
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings={
            "workers": WORKERS, "worker_timeout": WORKER_TIMEOUT,
            "upstream_timeout": UPSTREAM_TIMEOUT, "recovery_time": 1, "client_timeout": 10,
            "retry": {"backoff_initial_ms": 50, "backoff_max_ms": 200, "max_attempts": 3}},
            pools=[{"name": "C", "model": MODEL, "keys": keys}])
        port = self.sim.port
        wait_for(lambda: len(self.live_workers()) == WORKERS, what="the workers")
        # Baselines: the coordinator and a fresh worker, before any request.
        fresh = {fd_count(p, port)[0] for p in self.live_workers()}
        self.assertEqual(len(fresh), 1, f"the two fresh workers differ in descriptors: {fresh}")
        worker_base = fresh.pop()
        coord_base = fd_count(self.kp.pid, port)[0]

        stop = threading.Event()
        outcomes = [[] for _ in range(CLIENTS)]
        clients = [threading.Thread(target=self.load, args=(i, stop, outcomes[i]), daemon=True)
                   for i in range(CLIENTS)]
        for t in clients:
            t.start()
        chaos = threading.Thread(target=self.chaos, args=(stop,), daemon=True)
        chaos.start()
        time.sleep(SECONDS)
        chaos.join(60)
        stop.set()
        for t in clients:
            t.join(REQUEST_DEADLINE + 10)
        self.assertFalse(any(t.is_alive() for t in clients), "a client thread never finished")
        self.continue_stopped()
        self.assertIsNone(self.chaos_failure, "the schedule of faults broke off")
        done = [o for out in outcomes for o in out]

        counts = {}
        for o in done:
            counts[(o.kind, o.result)] = counts.get((o.kind, o.result), 0) + 1
        sys.stderr.write(f"chaos: {len(done)} requests; signals {[a[0] for a in self.actions]}\n")
        for (kind, result), n in sorted(counts.items()):
            sys.stderr.write(f"  {kind:12} {result:10} {n}\n")

        # Every request: complete, error, or visibly cut, within its deadline; lost without a
        # byte only to a signalled worker.
        bad = []
        for o in done:
            ok = {"complete", "error", "hung-up"}
            if o.kind in UPSTREAM_CUTS or self.signalled_during(o):
                ok.add("cut")
            if o.kind in UPSTREAM_CUTS:
                # keypool closes the client's connection without a byte when the upstream
                # resets after its headers but before the answer was forwarded (proxy.c): the
                # client sees a failure, not a silent truncation. A 502 would be better.
                ok.add("dropped")
            if self.signalled_during(o):
                ok.add("dropped")
            if o.result not in ok:
                bad.append(f"{o.rid} ({o.kind}, status {o.status}): {o.result} after "
                           f"{o.end - o.start:.1f}s")
            elif o.end - o.start > REQUEST_DEADLINE:
                bad.append(f"{o.rid} ({o.kind}) took {o.end - o.start:.1f}s")
        self.assertEqual(bad, [], f"seed {self.seed}: requests without a proper answer")
        self.assertGreater(counts.get(("plain", "complete"), 0), 0)
        self.assertGreater(counts.get(("stream", "complete"), 0), 0)

        # No request sent upstream again once its answer had begun.
        log = self.sim.finished_log(timeout=30)
        sends = {}
        for e in log:
            rid = e["headers"].get("x-chaos-id")
            if rid:
                sends.setdefault(rid, []).append(e)
        again = []
        for o in done:
            if o.first_byte is None:
                continue
            late = [e for e in sends.get(o.rid, []) if e["time"] > o.first_byte]
            if late:
                again.append(f"{o.rid} ({o.kind}): {len(late)} upstream send(s) after its "
                             "answer began")
        self.assertEqual(again, [], f"seed {self.seed}")
        retried = sum(1 for v in sends.values() if len(v) > 1)
        sys.stderr.write(f"chaos: {len(sends)} ids seen upstream, {retried} sent more than once "
                         "(all before their answer began)\n")

        # At rest.
        wait_for(lambda: self.in_flight() == 0, timeout=30, what="in_flight to return to 0")
        wait_for(lambda: len(self.live_workers()) == WORKERS, timeout=30,
                 what="the workers, all live")
        wait_for(lambda: fd_count(self.kp.pid, port)[0] == coord_base, timeout=30,
                 what=f"the coordinator's descriptors to return to {coord_base}")

        def workers_at_base():
            got = {p: fd_count(p, port) for p in self.live_workers()}
            return got if all(own == worker_base for own, _, _ in got.values()) else None
        got = wait_for(workers_at_base, timeout=30,
                       what=f"every worker's descriptors to be a fresh worker's ({worker_base})")
        for pid, (_, pooled, pidfds) in got.items():
            self.assertLessEqual(pooled, 2 * CLIENTS, f"worker {pid} keeps {pooled} upstream "
                                 "connections")
            # The coordinator's pidfds of its children stay the coordinator's: a worker closes
            # those it inherits at fork.
            self.assertEqual(pidfds, 0, f"worker {pid} holds {pidfds} pidfds")
        wait_for(lambda: not self.zombies(), timeout=10, what="no zombie child")
        r = subprocess.run([KEYPOOLCTL, "-s", self.kp.socket_path, "check", "--json"],
                           capture_output=True, text=True, timeout=30)
        doc = json.loads(r.stdout)
        self.assertEqual((doc["ok"], doc["in_flight"], doc["leases"], doc["problems"]),
                         (True, 0, 0, []), r.stdout)
        self.assertEqual(r.returncode, 0)


if __name__ == "__main__":
    unittest.main()

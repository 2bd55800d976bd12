#!/usr/bin/env python3
"""The service manager's view of keypoold: sd_notify (READY, MAINPID, STATUS, RELOADING,
STOPPING, WATCHDOG and its gating on worker heartbeats) through a NOTIFY_SOCKET the test binds,
and the listening socket (socket activation through systemd-socket-activate, a stale socket
file, a second daemon on a live socket)."""

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import shutil
import threading
import time
import unittest

from kptest import (DEADLINE, KEYPOOLD, SystemdTestCase, daemon_env, fake_secret, find_program,
                    key_id, process_gone, proc_start_time, wait_for)

MODEL = "z-ai/glm-4.5"
OTHER_MODEL = "openai/gpt-4o-mini"

SOCKET_ACTIVATE = find_program("/usr/bin/systemd-socket-activate",
                               "/lib/systemd/systemd-socket-activate",
                               "systemd-socket-activate")


def status_requests(line):
    """The request count in a STATUS line ("…; 1532 requests"), or None."""
    m = re.search(r"(\d+) requests?\b", line)
    return int(m.group(1)) if m else None


class NotifyTest(SystemdTestCase):

    def start(self, secrets=None, pools=None, settings=None, wait_up=True, abstract=False,
              **env):
        """A daemon whose NOTIFY_SOCKET is a fresh socket of ours; returns (keypool, socket)."""
        if not hasattr(self, "sim"):
            self.sim = self.start_sim()
        ns = self.notify_socket(abstract)
        if pools is None:
            pools = [{"name": "GLM45", "model": MODEL,
                      "keys": secrets or [fake_secret(), fake_secret()]}]
        cfg = {"workers": 2}
        cfg.update(settings or {})
        kp = self.start_daemon(self.sim, pools=pools, settings=cfg, wait_up=wait_up,
                               env=daemon_env(NOTIFY_SOCKET=ns.env_value, **env))
        self.addCleanup(self.check_notify_senders, kp, ns, "WATCHDOG_USEC" in env)
        return kp, ns

    def check_notify_senders(self, kp, ns, watchdog):
        """Runs after the daemon stopped: systemd (NotifyAccess=main) drops datagrams that do
        not come from the main pid, and pings without WATCHDOG_USEC mean nothing."""
        others = {m.pid for m in ns.messages()} - {kp.pid}
        self.assertFalse(others, f"notify datagrams came from pids {sorted(others)}, not only "
                                 f"from the main process {kp.pid}")
        if not watchdog:
            self.assertFalse(ns.with_field("WATCHDOG"), "WATCHDOG=1 without WATCHDOG_USEC")

    def wait_ready(self, ns, after=0):
        return ns.wait_field("READY", "1", after=after, what="READY=1")

    def wait_generation_only(self, kp, generation, old_pids=()):
        """Waits until every worker in /status has generation and the old pids are gone."""
        def only():
            ws = kp.workers()
            return (ws and all(w["generation"] == generation for w in ws)
                    and all(process_gone(p, s) for p, s in old_pids)) and ws
        return wait_for(only, what=f"only generation-{generation} workers")

    # --- READY, MAINPID, STATUS ---

    def test_ready_and_mainpid_arrive_only_once_the_socket_serves(self):
        kp, ns = self.start(wait_up=False)
        i, _ = self.wait_ready(ns)
        # The very first request after READY=1, on a fresh connection, must be served.
        try:
            status, h, body = kp.chat(MODEL)
        except OSError as e:
            self.fail(f"READY=1 was sent before the socket accepted: {e!r}")
        self.assertEqual(status, 200, body)

        _, m = ns.wait_field("MAINPID", what="MAINPID=")
        self.assertEqual(int(m.fields["MAINPID"]), kp.status()["pid"])
        self.assertEqual(int(m.fields["MAINPID"]), kp.pid)
        self.assertEqual(len(ns.with_field("READY")), 1, "READY=1 once, at start")
        _, st = ns.wait_field("STATUS", what="a STATUS= line")
        self.assertRegex(st.fields["STATUS"], r"\b1 pools?\b")
        self.assertRegex(st.fields["STATUS"], r"\b2/2 keys ready\b")

    def test_ready_through_an_abstract_notify_socket(self):
        kp, ns = self.start(wait_up=False, abstract=True)
        self.wait_ready(ns)
        self.assertEqual(kp.chat(MODEL)[0], 200)

    def test_status_line_reports_pools_and_keys_and_shows_a_cooling_key(self):
        a, b, c = fake_secret(), fake_secret(), fake_secret()
        kp, ns = self.start(pools=[{"name": "GLM45", "model": MODEL, "keys": [a, b]},
                                   {"name": "MINI", "model": OTHER_MODEL, "keys": [c]}])
        ns.wait(lambda m: re.search(r"\b2 pools\b", m.fields.get("STATUS", ""))
                and re.search(r"\b3/3 keys ready\b", m.fields["STATUS"]),
                what='STATUS with "2 pools" and "3/3 keys ready"')

        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        mark = ns.mark()
        status, h, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        self.assertEqual(h["x-keypool-key"], key_id(b))
        self.assertEqual(kp.key(a)["state"], "cooling")
        _, m = ns.wait(lambda m: re.search(r"\b2/3 keys ready\b", m.fields.get("STATUS", ""))
                       and re.search(r"\b1 cooling\b", m.fields["STATUS"]),
                       after=mark, what='STATUS with "2/3 keys ready" and "1 cooling"')
        self.assertRegex(m.fields["STATUS"], r"\b2 pools\b")

    def test_status_is_refreshed_at_most_once_a_second_under_a_burst(self):
        kp, ns = self.start(secrets=[fake_secret() for _ in range(3)])
        self.wait_ready(ns)
        mark = ns.mark()
        t0 = time.monotonic()
        sent = []
        errors = []

        def client():
            # A burst of activity that changes the status line (its request count) all the time.
            while time.monotonic() - t0 < 3.0:
                try:
                    status, _, body = kp.chat(MODEL)
                    sent.append(status)
                except (OSError, http.client.HTTPException) as e:
                    errors.append(e)
                    return
        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertFalse(errors, errors[:3])
        self.assertGreater(len(sent), 20, "the burst was too small to mean anything")
        self.assertEqual(set(sent), {200})

        # The last change must still be reported, coalesced or not.
        i, last = ns.wait(lambda m: (status_requests(m.fields.get("STATUS", "")) or 0)
                          >= len(sent), after=mark,
                          what=f"a STATUS line counting the {len(sent)} requests")
        elapsed = last.time - t0
        statuses = [m for m in ns.with_field("STATUS", after=mark) if m.time <= last.time]
        n = len(statuses)
        print(f"{n} STATUS datagrams over {elapsed:.1f}s of burst ({len(sent)} requests)",
              file=sys.stderr)
        self.assertLessEqual(n, elapsed + 2,
                             f"{n} STATUS datagrams in {elapsed:.1f}s: more than one a second "
                             f"({[m.fields['STATUS'] for m in statuses]})")
        self.assertGreaterEqual(n, 2, "the status line was not refreshed during the burst")

    # --- reload and stop ---

    def test_sighup_sends_reloading_then_ready_once_the_new_generation_serves(self):
        kp, ns = self.start()
        self.wait_ready(ns)
        old = [(w["pid"], proc_start_time(w["pid"])) for w in kp.workers()]
        mark = ns.mark()
        kp.send_signal(signal.SIGHUP)
        i, _ = ns.wait_field("RELOADING", "1", after=mark, what="RELOADING=1 after SIGHUP")
        self.assertFalse([m for m in ns.messages(mark)[:i - mark] if "READY" in m.fields],
                         "READY=1 came before RELOADING=1")
        j, m = ns.wait_field("READY", "1", after=i + 1, what="READY=1 after RELOADING=1")
        self.assertEqual(kp.chat(MODEL)[0], 200, "READY=1 came before the new generation serves")
        self.assertTrue(any(w["generation"] == 2 for w in kp.workers()),
                        "READY=1 after a reload, but no generation-2 worker")
        self.wait_generation_only(kp, 2, old)
        for x in ns.with_field("MAINPID", after=mark):
            self.assertEqual(int(x.fields["MAINPID"]), kp.pid)

    def test_every_stop_signal_sends_stopping(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            with self.subTest(signal=sig.name):
                kp, ns = self.start()
                self.wait_ready(ns)
                mark = ns.mark()
                kp.send_signal(sig)
                ns.wait_field("STOPPING", "1", after=mark, what=f"STOPPING=1 after {sig.name}")
                self.assertEqual(kp.wait_exit(), 0)

    # --- the watchdog ---

    def test_watchdog_is_pinged_while_the_workers_are_healthy(self):
        kp, ns = self.start(WATCHDOG_USEC=1000000)
        i, _ = self.wait_ready(ns)
        ns.wait_count("WATCHDOG", "1", 4, after=i, what="4 WATCHDOG=1 pings after READY=1")
        self.assertEqual(kp.chat(MODEL)[0], 200)
        mark = ns.mark()
        ns.wait_count("WATCHDOG", "1", 2, after=mark, what="the pings to keep coming")

    def test_stopped_worker_is_killed_and_replaced_and_the_pings_go_on(self):
        kp, ns = self.start(settings={"worker_timeout": 2}, WATCHDOG_USEC=1000000)
        i, _ = self.wait_ready(ns)
        ns.wait_count("WATCHDOG", "1", 3, after=i, what="the pings to start")
        workers = wait_for(lambda: len(kp.workers()) == 2 and kp.workers(),
                           what="two workers in /status")
        victim = workers[0]
        start = self.sigstop(victim["pid"])

        def replaced():
            ws = kp.workers()
            pids = {w["pid"] for w in ws}
            return (len(ws) == 2 and victim["pid"] not in pids
                    and process_gone(victim["pid"], start)) and ws
        after = wait_for(replaced, timeout=DEADLINE + 5,
                         what=f"stopped worker {victim['pid']} to be killed and replaced")
        self.assertIn(victim["slot"], {w["slot"] for w in after})
        self.assertTrue([x for x in kp.stderr_events("worker_exit")
                         if f"worker={victim['pid']}" in x],
                        "no event=worker_exit for the killed worker")
        # One wedged worker that the coordinator fixes by itself must not get the service
        # restarted: the pings go on.
        mark = ns.mark()
        ns.wait_count("WATCHDOG", "1", 3, after=mark, what="the pings after the replacement")
        self.assertEqual(kp.chat(MODEL)[0], 200)

    def test_pings_stop_while_workers_cannot_be_kept_alive_and_resume_after(self):
        kp, ns = self.start(settings={"workers": 1}, WATCHDOG_USEC=1000000)
        i, _ = self.wait_ready(ns)
        ns.wait_count("WATCHDOG", "1", 3, after=i, what="the pings to start")
        stop = threading.Event()
        killed = set()

        def killer():
            # Every worker dies as soon as it shows up: a crash loop.
            while not stop.is_set():
                for pid in set(kp.process_ids()) - {kp.pid}:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
                    except OSError:
                        pass
                stop.wait(0.01)
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        self.addCleanup(stop.set)

        def silent_for(seconds):
            pings = ns.with_field("WATCHDOG", "1")
            return time.monotonic() - pings[-1].time >= seconds
        try:
            wait_for(lambda: silent_for(2.0), timeout=DEADLINE + 10,
                     what="the pings to stop while every worker dies at once")
        finally:
            stop.set()
            t.join(5)
        self.assertGreaterEqual(len(killed), 2, "the crash loop never happened")
        mark = ns.mark()
        ns.wait_count("WATCHDOG", "1", 2, after=mark, timeout=DEADLINE + 15,
                      what="the pings to resume once a worker stays alive")
        self.assertEqual(kp.chat(MODEL)[0], 200)


class SocketTest(SystemdTestCase):

    def setUp(self):
        self.sim = self.start_sim()
        self.secrets = [fake_secret(), fake_secret()]
        self.dir = tempfile.mkdtemp(prefix="kpsock-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def pools(self):
        return [{"name": "GLM45", "model": MODEL, "keys": self.secrets}]

    def activated(self, listen, names):
        """A daemon behind systemd-socket-activate listening on listen (paths, in fd order)
        with --fdname=names; the daemon's own `socket` setting points at a path nobody uses."""
        if SOCKET_ACTIVATE is None:
            self.skipTest("systemd-socket-activate is not installed (Debian package systemd)")
        own = os.path.join(self.dir, "own.sock")
        wrapper = [SOCKET_ACTIVATE]
        for path in listen:
            wrapper += ["-l", path]
        wrapper += ["--fdname=" + ":".join(names)]
        served = listen[names.index("keypool")] if "keypool" in names else listen[0]
        kp = self.start_daemon(self.sim, pools=self.pools(), socket_path=served,
                               settings={"socket": own, "workers": 2}, wrapper=wrapper,
                               wait_up=False, env=daemon_env())
        wait_for(lambda: all(os.path.exists(p) for p in listen),
                 what="systemd-socket-activate to listen")
        return kp, own

    def test_socket_activation_serves_the_passed_socket_and_creates_none(self):
        path = os.path.join(self.dir, "activated.sock")
        kp, own = self.activated([path], ["keypool"])
        self.assertNotEqual(os.path.realpath(f"/proc/{kp.pid}/exe"),
                            os.path.realpath(KEYPOOLD),
                            "keypoold must start only on the first connection")
        kp.wait_serving()       # the first connection activates it
        self.assertEqual(os.path.realpath(f"/proc/{kp.pid}/exe"), os.path.realpath(KEYPOOLD))
        self.assertEqual(kp.status()["pid"], kp.pid)
        for _ in range(3):
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        self.assertFalse(os.path.exists(own), "keypoold created its configured socket anyway")
        self.assertEqual(kp.stop(), 0)
        self.assertFalse(os.path.exists(own), "keypoold created its configured socket anyway")
        self.assertTrue(os.path.exists(path),
                        "keypoold removed the socket file it did not create")

    def test_socket_activation_picks_the_socket_named_keypool(self):
        other = os.path.join(self.dir, "other.sock")
        path = os.path.join(self.dir, "activated.sock")
        kp, own = self.activated([other, path], ["other", "keypool"])
        kp.wait_serving()
        self.assertEqual(kp.status()["pid"], kp.pid)
        self.assertEqual(kp.chat(MODEL)[0], 200)
        self.assertFalse(os.path.exists(own))

    def test_stale_socket_file_is_replaced(self):
        path = os.path.join(self.dir, "keypool.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()               # the file stays; nobody answers on it
        self.assertTrue(os.path.exists(path))
        kp = self.start_daemon(self.sim, pools=self.pools(), socket_path=path, env=daemon_env())
        status, _, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        self.assertEqual(kp.stop(), 0)
        self.assertFalse(os.path.exists(path), "the socket file outlived keypoold")

    def test_second_daemon_on_a_live_socket_refuses_to_start(self):
        path = os.path.join(self.dir, "keypool.sock")
        kp = self.start_daemon(self.sim, pools=self.pools(), socket_path=path, env=daemon_env())
        inode = os.stat(path).st_ino
        second = subprocess.run([KEYPOOLD, "-c", kp.config_path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=daemon_env(), timeout=DEADLINE)
        err = second.stderr.decode(errors="replace")
        kp.seen.append(("the second keypoold's stderr", err + second.stdout.decode()))
        self.assertEqual(second.returncode, 1, err)
        self.assertIn("another server answers", err)
        self.assertEqual(os.stat(path).st_ino, inode, "the second daemon replaced the socket")
        status, _, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)


if __name__ == "__main__":
    unittest.main(verbosity=2)

#!/usr/bin/env python3
"""keypoold's events as structured journal entries, read back with journalctl from a real
systemd-journald (the one running, or one this file starts and stops), and the same events as
readable lines on stderr when there is no journal.

Exits 77 (skipped) only when journald cannot run here; the stderr tests still run then and a
failure among them still fails the file.
"""

import json
import os
import secrets as _secrets
import signal
import socket
import subprocess
import sys
import time
import unittest

from kptest import (DEADLINE, SystemdTestCase, daemon_env, fake_secret, find_leaks, find_program,
                    key_id, process_gone, proc_start_time, wait_for, SRCDIR)

MODEL = "z-ai/glm-4.5"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNALD = find_program("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
JOURNALCTL = find_program("journalctl")
CATALOG = os.path.join(SRCDIR, "systemd", "keypool.catalog")
ROTATE_ID = "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a18"


def journald_alive():
    """Whether something receives on the journal's native socket (a file left by a journald
    that is gone refuses the connection)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(JOURNAL_SOCKET)
        return True
    except OSError:
        return False
    finally:
        s.close()


def journal_problem():
    """Why no journal can be had here, or None."""
    if JOURNALCTL is None:
        return "journalctl is not installed"
    if journald_alive():
        return None
    if JOURNALD is None:
        return "no journald runs and systemd-journald is not installed"
    if os.geteuid() != 0:
        return "no journald runs, and starting one needs root"
    return None


# The module-level check: decided before any test runs.
JOURNAL_PROBLEM = journal_problem()


class Journald:
    """The journald the tests read from: the running one, or one started here (and stopped by
    whoever started it)."""

    proc = None
    problem = JOURNAL_PROBLEM

    @classmethod
    def ensure(cls):
        if cls.problem or journald_alive():
            return
        err = open(os.devnull, "wb")
        cls.proc = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL, stdout=err,
                                    stderr=subprocess.STDOUT)
        end = time.monotonic() + DEADLINE
        while not journald_alive():
            if cls.proc.poll() is not None or time.monotonic() > end:
                rc = cls.proc.poll()
                cls.stop()
                cls.problem = (f"systemd-journald could not be started here "
                               f"(exit status {rc})" if rc is not None
                               else "systemd-journald did not open its socket")
                return
            time.sleep(0.05)

    @classmethod
    def stop(cls):
        if cls.proc is None:
            return
        if cls.proc.poll() is None:
            cls.proc.terminate()
            try:
                cls.proc.wait(10)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
                cls.proc.wait()
        cls.proc = None


def journal(*matches, since_us=0):
    """The entries (dicts) journalctl shows for matches, newer than since_us (realtime µs)."""
    r = subprocess.run([JOURNALCTL, "--no-pager", "-o", "json", *matches],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if r.returncode not in (0, 1):
        raise AssertionError(f"journalctl {' '.join(matches)} failed: {r.stderr.decode()}")
    out = []
    for line in r.stdout.decode(errors="replace").splitlines():
        line = line.strip()
        if line:
            e = json.loads(line)
            if int(e.get("__REALTIME_TIMESTAMP", 0)) >= since_us:
                out.append(e)
    return out


def wait_entries(predicate, *matches, since_us=0, what="journal entries"):
    """Polls journalctl until predicate(entries) holds (journald may take a moment)."""
    return wait_for(lambda: predicate(journal(*matches, since_us=since_us))
                    and journal(*matches, since_us=since_us),
                    what=what, interval=0.2)


def field(entry, name):
    v = entry.get(name)
    if isinstance(v, list):             # repeated fields come as arrays
        return v[0]
    return v


class JournalTest(SystemdTestCase):

    @classmethod
    def setUpClass(cls):
        Journald.ensure()
        if Journald.problem:
            raise unittest.SkipTest(Journald.problem)

    @classmethod
    def tearDownClass(cls):
        Journald.stop()

    def start(self, args=("--log-target=journal",), **env):
        self.sim = self.start_sim()
        self.a, self.b = fake_secret(), fake_secret()
        self.pool = "P_" + _secrets.token_hex(6)
        self.since = time.time_ns() // 1000 - 1_000_000
        self.kp = self.start_daemon(
            self.sim, pools=[{"name": self.pool, "model": MODEL, "keys": [self.a, self.b]}],
            settings={"workers": 2}, args=args, env=daemon_env(**env))
        return self.kp

    def rotate_and_kill_a_worker(self):
        kp = self.kp
        self.sim.set_rules({self.a: {"status": 429, "retry_after": "300"}})
        status, h, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        self.assertEqual(kp.key(self.a)["state"], "cooling")
        workers = wait_for(lambda: len(kp.workers()) == 2 and kp.workers(),
                           what="two workers")
        self.victim = workers[0]["pid"]
        start = proc_start_time(self.victim)
        os.kill(self.victim, signal.SIGKILL)
        wait_for(lambda: process_gone(self.victim, start)
                 and self.victim not in {w["pid"] for w in kp.workers()}
                 and len(kp.workers()) == 2, what="the killed worker to be replaced")

    def pool_entries(self, event, what):
        return wait_entries(lambda es: es, "SYSLOG_IDENTIFIER=keypoold",
                            f"KEYPOOL_POOL={self.pool}",
                            f"KEYPOOL_EVENT={event}", since_us=self.since, what=what)

    def coordinator_entries(self, event, what):
        return wait_entries(lambda es: es, "SYSLOG_IDENTIFIER=keypoold", f"_PID={self.kp.pid}",
                            f"KEYPOOL_EVENT={event}", since_us=self.since, what=what)

    def test_events_are_structured_journal_entries(self):
        kp = self.start()
        self.rotate_and_kill_a_worker()
        kid = key_id(self.a)

        rotate = self.pool_entries("rotate", "the rotate entry in the journal")
        e = rotate[0]
        self.assertEqual(field(e, "KEYPOOL_KEY"), kid, e)
        self.assertEqual(field(e, "KEYPOOL_STATUS"), "429", e)
        self.assertEqual(field(e, "MESSAGE_ID"), ROTATE_ID, e)
        self.assertRegex(field(e, "PRIORITY") or "", r"^[0-7]$", e)
        self.assertTrue(field(e, "MESSAGE"), e)

        cooldown = self.pool_entries("cooldown", "the cooldown entry in the journal")
        e = cooldown[0]
        self.assertEqual(field(e, "KEYPOOL_KEY"), kid, e)
        self.assertEqual(field(e, "KEYPOOL_RETRY_AFTER"), "300", e)
        self.assertEqual(field(e, "KEYPOOL_STATUS"), "429", e)
        self.assertRegex(field(e, "MESSAGE_ID") or "", r"^[0-9a-f]{32}$", e)
        self.assertNotEqual(field(e, "MESSAGE_ID"), ROTATE_ID, "one MESSAGE_ID per kind")

        exits = wait_entries(
            lambda es: [x for x in es if field(x, "KEYPOOL_WORKER") == str(self.victim)],
            "SYSLOG_IDENTIFIER=keypoold", "KEYPOOL_EVENT=worker_exit", f"_PID={kp.pid}",
            since_us=self.since, what=f"a worker_exit entry for worker {self.victim}")
        for event in ("startup", "ready", "worker_spawn"):
            self.coordinator_entries(event, f"the {event} entry")

        # Every entry of this daemon and its workers: a MESSAGE_ID from the catalog, and no secret.
        pids = {kp.pid, self.victim} | {w["pid"] for w in kp.workers()} | set(kp.seen_workers)
        entries = journal("SYSLOG_IDENTIFIER=keypoold", *[f"_PID={p}" for p in sorted(pids)],
                          since_us=self.since)
        self.assertGreaterEqual(len(entries), 6)
        text = json.dumps(entries)
        self.assertEqual(find_leaks(kp.secrets, text, "the journal"), [])
        catalog = open(CATALOG).read() if os.path.exists(CATALOG) else ""
        events = [x for x in entries if field(x, "KEYPOOL_EVENT")]
        ids = {}
        for x in events:
            self.assertIn(field(x, "KEYPOOL_EVENT"), (
                "startup", "ready", "reload", "reload_failed", "shutdown", "worker_spawn",
                "worker_exit", "rotate", "cooldown", "recover", "disable", "enable", "probe",
                "config_error", "retry", "upstream_error"), x)
            self.assertRegex(field(x, "MESSAGE_ID") or "", r"^[0-9a-f]{32}$", x)
            self.assertRegex(field(x, "PRIORITY") or "", r"^[0-7]$", x)
            self.assertTrue(field(x, "MESSAGE"), x)
            ids.setdefault(field(x, "KEYPOOL_EVENT"), set()).add(field(x, "MESSAGE_ID"))
        for event, mids in ids.items():
            self.assertEqual(len(mids), 1, f"{event} has several MESSAGE_IDs: {mids}")
            mid = next(iter(mids))
            self.assertRegex(catalog, rf"(?m)^-- {mid}\s*$",
                             f"MESSAGE_ID {mid} ({event}) is not documented in {CATALOG}")
        self.assertEqual(len(set().union(*ids.values())), len(ids), f"kinds share ids: {ids}")
        self.assertNotIn("event=rotate", kp.stderr(),
                         "with --log-target=journal the events go to the journal only")

    def test_auto_target_uses_the_journal_when_stderr_is_the_journal_stream(self):
        # The harness's stderr file stands in for the journal's stream: JOURNAL_STREAM names
        # it. First a JOURNAL_STREAM that is not stderr (lines), then the one that is (entries).
        kp = self.start(args=(), JOURNAL_STREAM="0:0")
        kp.stop()
        self.assertEqual(kp.stderr().count("event=startup"), 1, "no startup line on stderr")
        st = os.stat(kp.stderr_path)
        self.since = time.time_ns() // 1000 - 1_000_000
        kp.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        kp.start()
        self.rotate_and_kill_a_worker()
        self.pool_entries("rotate", "the rotate entry in the journal (auto target)")
        self.coordinator_entries("startup", "the startup entry (auto target)")
        self.assertEqual(kp.stderr().count("event=startup"), 1,
                         "with JOURNAL_STREAM naming stderr, events must go to the journal")


class StderrTest(SystemdTestCase):
    """No journal target and no JOURNAL_STREAM: the same events as readable lines on stderr."""

    def test_events_are_readable_lines_on_stderr_without_a_journal(self):
        sim = self.start_sim()
        a, b = fake_secret(), fake_secret()
        kp = self.start_daemon(sim, pools=[{"name": "GLM45", "model": MODEL, "keys": [a, b]}],
                               settings={"workers": 2}, env=daemon_env())
        sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        self.assertEqual(kp.chat(MODEL)[0], 200)
        victim = kp.workers()[0]["pid"]
        start = proc_start_time(victim)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: process_gone(victim, start) and kp.stderr_events("worker_exit"),
                 what="the worker_exit line")
        kid = key_id(a)
        rotate = wait_for(lambda: kp.stderr_events("rotate"), what="an event=rotate line")
        self.assertRegex(rotate[0], rf"^keypoold\[\d+\]: \w+: event=rotate pool=GLM45 "
                                    rf"key={kid} status=429\b")
        cooldown = kp.stderr_events("cooldown")
        self.assertTrue(cooldown)
        self.assertIn("retry_after=300", cooldown[0])
        self.assertTrue([x for x in kp.stderr_events("worker_exit") if f"worker={victim}" in x])
        for event in ("startup", "ready", "worker_spawn"):
            self.assertTrue(kp.stderr_events(event), f"no event={event} line")
        self.assertNotIn("MESSAGE_ID=", kp.stderr())


def main():
    if JOURNAL_PROBLEM:
        print(f"test_journal: the journal tests are skipped: {JOURNAL_PROBLEM}", file=sys.stderr)
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(StderrTest)
    else:
        suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    if not result.wasSuccessful():
        return 1
    if Journald.problem:
        if not JOURNAL_PROBLEM:
            print(f"test_journal: the journal tests are skipped: {Journald.problem}",
                  file=sys.stderr)
        return 77
    return 0


if __name__ == "__main__":
    sys.exit(main())

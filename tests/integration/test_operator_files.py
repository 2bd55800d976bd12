#!/usr/bin/env python3
"""Careless operators cannot wedge or trick the daemon through its files: a key file replaced by a
FIFO fails a reload with a clear line while the old config serves and SIGTERM still stops it;
--check-config on a FIFO config or env file answers at once; a planted state.json.tmp symlink
is never written through, by the daemon or by keypoolctl export; imported state is held to
max_cooldown."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from kptest import (KEYPOOLD, DaemonKeypool, SystemdTestCase, fake_secret, key_id,
                    render_config, wait_for)

MODEL = "z-ai/glm-4.5"
KEYPOOLCTL = os.environ.get("KEYPOOLCTL", os.path.join(os.path.dirname(KEYPOOLD), "keypoolctl"))


def check_config(path, timeout=10):
    """keypoold --check-config -c path; fails the test if it does not answer within timeout."""
    return subprocess.run([KEYPOOLD, "--check-config", "-c", path], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class OperatorFilesTest(SystemdTestCase):

    def start(self, pools, secrets=(), settings=None, before_start=None):
        self.sim = self.start_sim()
        kp = DaemonKeypool(self.sim, pools=pools, secrets=secrets,
                           settings={"workers": 1, **(settings or {})}, start=False)
        self.addCleanup(self._finish_daemon, kp)
        if before_start:
            before_start(kp)
        kp.start()
        self.kp = kp
        return kp

    def tmpdir(self):
        d = tempfile.mkdtemp(prefix="kpfiles-")
        self.addCleanup(shutil.rmtree, d, True)
        return d

    # --- files that are not regular files ------------------------------------------------------

    def test_a_key_file_replaced_by_a_fifo_fails_the_reload_and_sigterm_still_stops_it(self):
        a, b = fake_secret(), fake_secret()
        key_file = None

        def write_key(kp):
            nonlocal key_file
            key_file = os.path.join(kp.dir, "key-b")
            with open(key_file, "w") as f:
                f.write(b + "\n")
        kp = self.start([{"name": "P", "model": MODEL, "keys": [a, "file:key-b"]}], secrets=[b],
                        before_start=write_key)
        self.assertEqual(set(kp.keys()), {key_id(a), key_id(b)})
        pids = {w["pid"] for w in kp.workers()}

        os.unlink(key_file)
        os.mkfifo(key_file, 0o600)
        errs = len(kp.stderr_events("reload_failed"))
        kp.send_signal(signal.SIGHUP)
        wait_for(lambda: kp.stderr_events("reload_failed")[errs:], timeout=15,
                 what="an event=reload_failed line after SIGHUP (not a coordinator stuck in open)")
        lines = [x for x in kp.stderr().splitlines() if "not a regular file (a FIFO)" in x]
        self.assertTrue(lines and key_file in lines[0],
                        f"no line names {key_file} as a FIFO:\n{kp.stderr()}")

        for _ in range(3):
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        self.assertEqual({w["pid"] for w in kp.workers()}, pids, "the workers were replaced")
        self.assertEqual(set(kp.keys()), {key_id(a), key_id(b)})

        start = time.monotonic()
        kp.stop(timeout=10)
        self.assertLess(time.monotonic() - start, 10, "SIGTERM took too long")

    def test_check_config_on_a_fifo_config_or_env_file_fails_at_once(self):
        d = self.tmpdir()
        conf = os.path.join(d, "keypool.conf")
        os.mkfifo(conf, 0o600)
        r = check_config(conf)
        self.assertNotEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"{conf}: not a regular file (a FIFO)", r.stdout + r.stderr)

        os.unlink(conf)
        env = os.path.join(d, "orche.env")
        os.mkfifo(env, 0o600)
        with open(conf, "w") as f:
            f.write(render_config({
                "socket": os.path.join(d, "keypool.sock"),
                "providers": [{"name": "sim", "base_url": "http://127.0.0.1:9/v1"}],
                "env_file": "orche.env"}))
        r = check_config(conf)
        self.assertNotEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("orche.env: not a regular file (a FIFO)", r.stdout + r.stderr)

    def test_a_fifo_as_state_file_is_reported_and_the_daemon_starts_fresh(self):
        a = fake_secret()

        def plant(kp):
            os.mkfifo(kp.state_file, 0o600)
        kp = self.start([{"name": "P", "model": MODEL, "keys": [a]}], before_start=plant)
        self.assertEqual(kp.chat(MODEL)[0], 200)
        lines = [x for x in kp.stderr().splitlines() if "not a regular file (a FIFO)" in x]
        self.assertTrue(lines and kp.state_file in lines[0],
                        f"no line names {kp.state_file} as a FIFO:\n{kp.stderr()}")

    # --- writing state --------------------------------------------------------------------------

    def test_a_planted_temporary_symlink_is_never_written_through(self):
        a = fake_secret()
        kp = self.start([{"name": "P", "model": MODEL, "keys": [a]}])
        self.assertIsNotNone(kp.state_file, "the harness gives the daemon a state_file")
        victim = os.path.join(kp.dir, "victim")
        with open(victim, "w") as f:
            f.write("the victim's own content\n")
        for name in ("state.json.tmp", "export.json.tmp"):
            os.symlink(victim, os.path.join(kp.dir, name))
        self.assertEqual(kp.chat(MODEL)[0], 200)

        export = os.path.join(kp.dir, "export.json")
        r = subprocess.run([KEYPOOLCTL, "-s", kp.socket_path, "export", export],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        kp.stop()

        with open(victim) as f:
            self.assertEqual(f.read(), "the victim's own content\n", "written through a symlink")
        for path in (kp.state_file, export):
            self.assertFalse(os.path.islink(path), path)
            with open(path) as f:
                self.assertEqual(json.load(f)["format"], "keypool-state", path)
        left = sorted(n for n in os.listdir(kp.dir) if ".tmp" in n)
        self.assertEqual(left, ["export.json.tmp", "state.json.tmp"], "a temporary file was left")

    # --- reading state --------------------------------------------------------------------------

    def test_a_state_file_rest_longer_than_max_cooldown_is_cut_to_it(self):
        a, b = fake_secret(), fake_secret()

        def plant(kp):
            doc = {"format": "keypool-state", "version": 1, "keys": [
                {"pool": "P", "id": key_id(a), "state": "cooling", "reason": "rate_limited",
                 "cooldown_until": "2999-01-01T00:00:00Z"},
                {"pool": "P", "id": key_id(b), "state": "ready", "requests": -5}]}
            with open(kp.state_file, "w") as f:
                json.dump(doc, f)
        kp = self.start([{"name": "P", "model": MODEL, "keys": [a, b]}],
                        settings={"max_cooldown": 600}, before_start=plant)
        k = kp.key(a)
        self.assertEqual(k["state"], "cooling", k)
        self.assertLessEqual(k["cooldown_remaining_s"], 600, k)
        self.assertEqual(kp.key(b)["requests"], 0)
        warn = [x for x in kp.stderr().splitlines() if "refused" in x and "max_cooldown" in x]
        self.assertTrue(warn, f"no warning about the refused and cut keys:\n{kp.stderr()}")
        self.assertIn('"requests" is not a whole number', warn[0])


if __name__ == "__main__":
    unittest.main()

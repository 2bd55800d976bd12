#!/usr/bin/env python3
"""Secrets stay out of core dumps: a core of a worker that has served requests (gcore, as root),
and one of the coordinator, hold none of the keys — keys read from files and keys written
literally in keypool.conf alike — and the daemon's processes are not dumpable (no other user can
attach to them or read their memory)."""

import mmap
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import kptest
from kptest import KeypoolTestCase, fake_secret, wait_for


def is_asan(path):
    with open(path, "rb") as f:
        return b"__asan_init" in f.read()


# The core of an ASan build is a sparse file of some 6.6 TB (the sanitizer's reserved ranges)
# with 3 GB of data: too much to search. scripts/test also builds the plain daemon
# (KEYPOOLD_PLAIN), and this test runs that one when it can.
KEYPOOLD = kptest.KEYPOOLD
_plain = os.environ.get("KEYPOOLD_PLAIN")
if is_asan(KEYPOOLD) and _plain and os.access(_plain, os.X_OK) and not is_asan(_plain):
    KEYPOOLD = kptest.KEYPOOLD = _plain

MODEL = "m/core"
# gcore of a sanitizer build walks its shadow mappings too (they are not dumped, but are large):
# generous, and the test says so when it is not enough rather than hanging the suite.
GCORE_TIMEOUT = 120


def core_of(pid, directory):
    """The path of a core of pid taken with gcore (gdb), which leaves the process running."""
    prefix = os.path.join(directory, "core")
    p = subprocess.run(["gcore", "-o", prefix, str(pid)], capture_output=True, text=True,
                       timeout=GCORE_TIMEOUT)
    path = f"{prefix}.{pid}"
    if p.returncode != 0 or not os.path.exists(path):
        raise AssertionError(f"gcore {pid} failed ({p.returncode}): {p.stderr[-2000:]}")
    return path


class CoreDumpTest(KeypoolTestCase):

    def setUp(self):
        super().setUp()
        if not shutil.which("gcore"):
            self.skipTest("gcore (gdb) is not installed: scripts/deps installs it")
        if os.geteuid() != 0:
            self.skipTest("gcore of another process needs root here")
        if is_asan(KEYPOOLD):
            self.skipTest("keypoold is an ASan build (its core is too large to search) and no "
                          "plain build is at $KEYPOOLD_PLAIN (scripts/test makes one)")
        self.tmp = tempfile.mkdtemp(prefix="kpcore-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def start(self):
        """One worker, a pool of file: keys and a pool of literal keys; returns the worker."""
        self.file_secrets = [fake_secret() for _ in range(2)]
        self.literal_secrets = [fake_secret() for _ in range(2)]
        self.secrets = self.file_secrets + self.literal_secrets
        refs = []
        for i, s in enumerate(self.file_secrets):
            path = os.path.join(self.tmp, f"key{i}")
            with open(path, "w") as f:
                f.write(s + "\n")
            refs.append(f"file:{path}")
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings={"workers": 1},
                                     secrets=self.file_secrets, pools=[
                                         {"name": "F", "model": MODEL + "f", "keys": refs},
                                         {"name": "L", "model": MODEL + "l",
                                          "keys": self.literal_secrets}])
        wait_for(lambda: len(self.kp.status()["workers"]) == 1, what="one worker")
        return self.kp.status()["workers"][0]["pid"]

    def serve(self):
        """Requests on every key, plain and streamed, and a probe of each literal key."""
        for model in (MODEL + "f", MODEL + "l"):
            for stream in (False, True, False, True):
                status, _, body = self.kp.chat(model, stream=stream)
                self.assertEqual(status, 200, body)
        for s in self.literal_secrets:
            from kptest import key_id
            status, _, body = self.kp.request("POST", f"/api/keys/{key_id(s)}/probe")
            self.assertIn(status, (200, 202), body)
        wait_for(lambda: sum(1 for e in self.sim.log() if e["path"].endswith("/models")) >= 2,
                 what="the probes to reach the upstream")
        time.sleep(0.2)     # the probes' transfers end just after the upstream logs them

    def copies_in(self, path):
        """How many times each key appears in the core at path (which is then removed)."""
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            counts = []
            for s in self.secrets:
                n, i = 0, m.find(s.encode())
                while i >= 0:
                    n, i = n + 1, m.find(s.encode(), i + 1)
                counts.append(n)
        os.unlink(path)
        return counts

    def test_serving_leaves_no_copy_of_a_key_in_a_workers_heap(self):
        # libcurl copies the key's header into its header list and request buffer and frees
        # them; with curlmem's allocator they are wiped. Whatever copies the load of the
        # configuration left (see below), serving must add none.
        pid = self.start()
        before = self.copies_in(core_of(pid, self.tmp))
        self.serve()
        after = self.copies_in(core_of(pid, self.tmp))
        self.assertTrue(all(a <= b for a, b in zip(after, before)),
                        f"copies of each key in the worker's core: {before} before serving, "
                        f"{after} after")

    def assertNoSecretIn(self, path, what):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            found = [("file" if s in self.file_secrets else "literal") + f" key {i}"
                     for i, s in enumerate(self.secrets) if m.find(s.encode()) >= 0]
        os.unlink(path)
        self.assertEqual(found, [], f"keys are in {what}")

    # Loading keypool.conf leaves copies of keys in freed heap keypool cannot wipe (libconfig's
    # scanner copies the text and frees it unwiped): the coordinator marks its heap
    # MADV_DONTDUMP after every load, before it forks, so neither core holds them.
    def test_a_workers_core_holds_no_key(self):
        pid = self.start()
        self.assertNoSecretIn(core_of(pid, self.tmp), "the worker's core before any request")
        self.serve()
        self.assertNoSecretIn(core_of(pid, self.tmp), "the worker's core after requests")

    def test_the_coordinators_core_holds_no_key(self):
        self.start()
        self.serve()
        self.assertNoSecretIn(core_of(self.kp.pid, self.tmp), "the coordinator's core")

    def test_workers_and_coordinator_are_not_dumpable(self):
        pid = self.start()
        for p in (pid, self.kp.pid):
            # Not dumpable: the kernel makes /proc/PID/mem and friends root's, whatever the
            # process's user, and writes no core for it on a crash (fs.suid_dumpable 0).
            self.assertEqual(os.stat(f"/proc/{p}/mem").st_uid, 0)
            self.assertEqual(os.stat(f"/proc/{p}/environ").st_uid, 0)


if __name__ == "__main__":
    unittest.main()

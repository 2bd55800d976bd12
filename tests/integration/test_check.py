#!/usr/bin/env python3
"""The table's consistency check (keypoolctl check, GET /api/check) on a running daemon under a
little load and at rest, and waiting in arrival order across workers."""

import json
import os
import subprocess
import threading
import time
import unittest

from kptest import KEYPOOLD, KeypoolTestCase, fake_secret, in_threads, wait_for

MODEL = "m/check"


def _keypoolctl():
    if os.environ.get("KEYPOOLCTL"):
        return os.environ["KEYPOOLCTL"]
    return os.path.join(os.path.dirname(KEYPOOLD), "keypoolctl")


KEYPOOLCTL = _keypoolctl()


class CheckTest(KeypoolTestCase):

    def ctl(self, *args):
        return subprocess.run([KEYPOOLCTL, "-s", self.kp.socket_path, *args],
                              capture_output=True, text=True, timeout=30)

    def in_flight(self):
        return sum(k["in_flight"] for k in self.kp.keys().values())

    def test_the_table_checks_out_under_load_and_at_rest(self):
        secrets = [fake_secret() for _ in range(3)]
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings={"workers": 2}, pools=[
            {"name": "C", "model": MODEL, "keys": [secrets[0], {"key": secrets[1], "max_concurrent": 2},
                                                  secrets[2]]}])
        # One key rate limited once, so a rest, a rotation and a recovery are in the table too.
        self.sim.set_rules({secrets[0]: {"status": 429, "retry_after": "1", "count": 1}})
        checks = []

        def load(i):
            return self.kp.chat(MODEL, headers={"X-Sim-Delay-Ms": "200"}, n=i)[0]

        def check_while_loaded():
            for _ in range(5):
                checks.append(self.ctl("check", "--json"))
                time.sleep(0.1)
        checker = threading.Thread(target=check_while_loaded)
        checker.start()
        statuses = in_threads(12, load, spacing=0.03)
        checker.join(60)
        self.assertEqual(statuses, [200] * 12)
        for r in checks:
            doc = json.loads(r.stdout)
            self.assertTrue(doc["ok"], f"check under load found problems: {doc['problems']}")
            self.assertEqual(r.returncode, 0)

        wait_for(lambda: self.in_flight() == 0, what="in_flight to return to 0 at rest")
        r = self.ctl("check")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertTrue(r.stdout.startswith("ok"), r.stdout)
        doc = json.loads(self.ctl("check", "--json").stdout)
        self.assertEqual((doc["ok"], doc["in_flight"], doc["leases"], doc["problems"]),
                         (True, 0, 0, []))
        self.assertEqual(sum(doc["keys_by_state"].values()), 3)

    def test_check_is_for_admins_only(self):
        from kptest import request_as_user, make_socket_public
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings={"socket_mode": "0666"}, pools=[
            {"name": "C", "model": MODEL, "keys": [fake_secret()]}])
        make_socket_public(self.kp)
        status, _ = request_as_user(self.kp, "GET", "/api/check")
        self.assertEqual(status, 403)


class FifoAcrossWorkersTest(KeypoolTestCase):

    def test_a_freed_key_goes_to_waiters_in_arrival_order_whichever_worker_holds_them(self):
        secret = fake_secret()
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, settings={"workers": 3}, pools=[
            {"name": "F", "model": MODEL, "keys": [{"key": secret, "max_concurrent": 1}]}])
        wait_for(lambda: len(self.kp.status()["workers"]) == 3, what="three workers")
        n = 8

        def send(i):
            # The first holds the only key long enough for all the others to queue behind it.
            delay = "1500" if i == 0 else "150"
            return self.kp.chat(MODEL, headers={"X-Sim-Delay-Ms": delay}, n=i)[0]
        statuses = in_threads(n, send, spacing=0.12)
        self.assertEqual(statuses, [200] * n)
        order = [e["body"]["n"] for e in self.sim.log()]
        self.assertEqual(order, list(range(n)),
                         "each request reached the key in the order it came, across workers")


if __name__ == "__main__":
    unittest.main()

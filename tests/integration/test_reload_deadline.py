#!/usr/bin/env python3
"""A reload whose new generation never serves: after its deadline the new workers are killed,
the old generation keeps serving with the old configuration, and the failure is logged and shown
in STATUS=."""

import signal
import unittest

from kptest import SystemdTestCase, daemon_env, fake_secret, key_id, process_gone, wait_for

MODEL = "m/deadline"


class ReloadDeadlineTest(SystemdTestCase):

    def test_a_new_generation_that_never_serves_is_given_up_and_the_old_one_keeps_serving(self):
        ns = self.notify_socket()
        a, b = fake_secret(), fake_secret()
        self.sim = self.start_sim()
        settings = {"workers": 2, "worker_timeout": 2}
        # Generation 2's workers are stopped as soon as they are forked: they never accept.
        kp = self.start_daemon(self.sim, pools=[{"name": "D", "model": MODEL, "keys": [a]}],
                               settings=settings,
                               env=daemon_env(NOTIFY_SOCKET=ns.env_value,
                                              KEYPOOL_TEST_STALL_GENERATION="2"))
        ns.wait_field("READY", "1")
        old = {w["pid"] for w in kp.workers()}
        mark = ns.mark()

        kp.rewrite_config([{"name": "D", "model": MODEL, "keys": [a, b]}], settings)
        kp.send_signal(signal.SIGHUP)
        # While the new generation hangs, the old one serves.
        status, _, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)

        line = wait_for(lambda: [x for x in kp.stderr_events("reload_failed")
                                 if "did not serve" in x], timeout=30,
                        what="a reload_failed line saying the new generation did not serve")
        self.assertIn("generation 2", line[0])
        ns.wait(lambda m: "reload failed" in m.fields.get("STATUS", ""), after=mark,
                what='STATUS= saying "reload failed"')
        ns.wait_field("READY", "1", after=mark, what="READY=1 after the failed reload")

        def only_the_old_generation():
            ws = kp.workers()
            return {w["pid"] for w in ws} == old and {w["generation"] for w in ws} == {1}
        wait_for(only_the_old_generation, what="only generation 1's workers, the same processes")
        for _ in range(3):
            status, _, body = kp.chat(MODEL)
            self.assertEqual(status, 200, body)
        self.assertEqual(set(kp.keys()), {key_id(a)}, "the old configuration's keys")
        self.assertTrue(kp.running())

        # Not stuck: the next reload (whose generation, 3, is not stalled) goes through.
        kp.send_signal(signal.SIGHUP)
        wait_for(lambda: {w["generation"] for w in kp.workers()} == {3} and
                 all(process_gone(p) for p in old), what="generation 3 alone, generation 1 gone")
        self.assertEqual(set(kp.keys()), {key_id(a), key_id(b)})


if __name__ == "__main__":
    unittest.main()

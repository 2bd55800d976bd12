#!/usr/bin/env python3
"""Persistent state: cooldowns, counters and history survive a restart through state_file; the
file is written while running and at shutdown, never holds a secret, and a corrupt, foreign or
missing file never stops keypoold from starting."""

import glob
import json
import os
import re
import time
import unittest

from kptest import (Keypool, KeypoolTestCase, fake_secret, find_leaks, key_id, masked,
                    parse_rfc3339, wait_for)

MODEL = "z-ai/glm-4.5"
COUNTERS = ("requests", "successes", "rate_limited", "failures", "tokens_in", "tokens_out",
            "last_status", "last_class")


def read_json(path):
    with open(path, "rb") as f:
        return json.loads(f.read())


class StateTest(KeypoolTestCase):

    def start(self, *keys, pool="main", **settings):
        self.sim = getattr(self, "sim", None) or self.start_sim()
        kp = self.start_keypool(self.sim, pools=[{"name": pool, "model": MODEL,
                                                  "keys": list(keys)}],
                                settings={"recovery_time": 900, **settings})
        if "state_file" not in settings:
            self.assertTrue(kp.state_file and kp.state_file.startswith(kp.dir + os.sep),
                            f"the harness gives every daemon its own state_file: {kp.state_file}")
        return kp

    def chat_ok(self, kp):
        status, h, body = kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        return h.get("x-keypool-key")

    def check_state_document(self, doc, kp, where):
        self.assertIsInstance(doc, dict, where)
        self.assertEqual((doc.get("format"), doc.get("version")), ("keypool-state", 1), where)
        parse_rfc3339(doc["saved_at"])
        self.assertIsInstance(doc["keys"], list, where)
        self.assertIsInstance(doc["history"], list, where)
        return {(k["pool"], k["id"]): k for k in doc["keys"]}

    def check_no_secret(self, kp, text, where):
        self.assertEqual(find_leaks(kp.secrets, text, where), [])
        for s in kp.secrets:
            self.assertNotIn(masked(s), text, f"{where} needs no masked form")

    def state_text(self, kp):
        with open(kp.state_file, "rb") as f:
            return f.read().decode()

    def history(self, kp):
        return [(e["time"], e["pool"], e["event"], e["from"], e["to"], e["status"])
                for e in kp.get_json("/api/history")["events"]]

    # --- across a restart ---

    def test_cooldown_counters_and_history_survive_a_restart(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start(a, b)
        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        for _ in range(3):
            self.chat_ok(kp)
        before = {s: kp.key(s) for s in (a, b)}
        self.assertEqual(before[a]["state"], "cooling")
        until = parse_rfc3339(before[a]["cooldown_until"])
        history = self.history(kp)
        self.assertTrue([e for e in history if e[2] == "rotate"], history)

        kp.stop()
        stopped = time.time()
        text = self.state_text(kp)
        self.check_no_secret(kp, text, "the state file")
        keys = self.check_state_document(json.loads(text), kp, "the state file")
        self.assertEqual(set(keys), {("main", key_id(a)), ("main", key_id(b))})
        saved = keys[("main", key_id(a))]
        self.assertEqual(saved["state"], "cooling", saved)
        self.assertTrue(abs(parse_rfc3339(saved["cooldown_until"]) - until) <= 1.5, saved)

        kp.start()
        after = {s: kp.key(s) for s in (a, b)}
        k = after[a]
        self.assertEqual((k["state"], k["reason"]), ("cooling", "rate_limited"), k)
        self.assertTrue(abs(parse_rfc3339(k["cooldown_until"]) - until) <= 1.5,
                        "the deadline is the same wall-clock time")
        rest = until - time.time()
        self.assertTrue(rest - 3 <= k["cooldown_remaining_s"] <= rest + 2,
                        f"{k['cooldown_remaining_s']} s left, expected about {rest:.1f}")
        self.assertLess(time.time() - stopped, 60, "the restart itself must not take long")
        for s in (a, b):
            for f in COUNTERS:
                self.assertEqual(after[s][f], before[s][f], f"{key_id(s)}.{f} after a restart")
        self.assertEqual(self.history(kp)[:len(history)], history, "history is kept")
        self.assertEqual(kp.status()["generation"], 1)

        n = len(self.sim.requests_with(a))
        for _ in range(3):
            self.assertEqual(self.chat_ok(kp), key_id(b))
        self.assertEqual(len(self.sim.requests_with(a)), n, "a restored cooldown is honoured")

    def test_disabled_keys_stay_disabled_and_a_cooldown_that_ended_meanwhile_is_over(self):
        a, b, c = fake_secret(), fake_secret(), fake_secret()
        kp = self.start(a, b, c)
        status, _, body = kp.request("POST", f"/api/keys/{key_id(c)}/disable")
        self.assertEqual(status, 200, body)
        self.sim.set_rules({a: {"status": 429, "retry_after": "2"}})
        self.chat_ok(kp)
        until = parse_rfc3339(kp.key(a)["cooldown_until"])
        kp.stop()
        # cooldown_until has whole seconds: the deadline itself may be up to 1 s later.
        wait_for(lambda: time.time() > until + 1.5, what="a's cooldown to end while stopped")
        self.sim.set_rules({a: None})
        kp.start()
        self.assertEqual(kp.key(a)["state"], "ready")
        self.assertEqual(kp.key(a)["rate_limited"], 1)
        k = kp.key(c)
        self.assertEqual((k["state"], k["reason"]), ("disabled", "operator"), k)

    def test_keys_are_matched_by_id_when_the_pool_was_renamed(self):
        a, b = fake_secret(), fake_secret()
        first = self.start(a, b, pool="before")
        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        self.chat_ok(first)
        first.stop()
        second = self.start(a, b, pool="after", state_file=first.state_file)
        k = second.key_in("after", a)
        self.assertEqual((k["state"], k["rate_limited"]), ("cooling", 1), k)
        self.assertGreater(k["cooldown_remaining_s"], 250)

    # --- writing ---

    def test_state_file_is_written_every_state_interval_while_running(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start(a, b, state_interval=1)
        doc = wait_for(lambda: os.path.exists(kp.state_file) and read_json(kp.state_file),
                       what="the state file to appear while keypoold runs",
                       ignore=(ValueError, OSError))
        keys = self.check_state_document(doc, kp, "the state file")
        self.assertEqual(keys[("main", key_id(a))]["state"], "ready")

        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        self.chat_ok(kp)

        def updated():
            d = read_json(kp.state_file)
            k = {(x["pool"], x["id"]): x for x in d["keys"]}[("main", key_id(a))]
            return d if k["state"] == "cooling" else None
        doc = wait_for(updated, what="the state file to show a cooling",
                       ignore=(ValueError, OSError, KeyError))
        self.check_state_document(doc, kp, "the state file")
        self.check_no_secret(kp, self.state_text(kp), "the state file")
        kp.stop()
        self.assertFalse(glob.glob(kp.state_file + ".*"), "no temporary file is left behind")
        self.check_state_document(read_json(kp.state_file), kp, "the state file at shutdown")

    def test_exported_document_has_the_format_of_the_state_file(self):
        a, b = fake_secret(), fake_secret()
        kp = self.start(a, b)
        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        self.chat_ok(kp)
        status, _, body = kp.request("POST", "/api/state/export")
        self.assertEqual(status, 200, body)
        self.check_no_secret(kp, body.decode(), "the export")
        exported = json.loads(body)
        kp.stop()
        saved = read_json(kp.state_file)
        ek = self.check_state_document(exported, kp, "the export")
        sk = self.check_state_document(saved, kp, "the state file")
        self.assertEqual(sorted(exported), sorted(saved), "the same top-level members")
        self.assertEqual(sorted(ek), sorted(sk), "the same keys")
        for name in ek:
            self.assertEqual(sorted(ek[name]), sorted(sk[name]), "the same key members")
            for f in ("state", "reason", "requests", "rate_limited", "successes"):
                self.assertEqual(ek[name][f], sk[name][f], f"{name} {f}")
        self.assertEqual([e["event"] for e in exported["history"]],
                         [e["event"] for e in saved["history"]])

    def test_empty_state_file_setting_disables_persistence(self):
        a = fake_secret()
        kp = self.start(a, state_file="")
        self.chat_ok(kp)
        kp.stop()
        left = [f for f in os.listdir(kp.dir) if f.endswith(".json") or "state" in f]
        self.assertEqual(left, [], "nothing is written with state_file = \"\"")

    # --- bad files ---

    def check_bad_file_is_moved_aside(self, content):
        a, b = fake_secret(), fake_secret()
        sim = self.sim = self.start_sim()
        # Started by hand, once the bad file is in place.
        kp = Keypool(sim, pools=[{"name": "main", "model": MODEL, "keys": [a, b]}],
                     settings={"recovery_time": 900}, start=False)
        self.addCleanup(self._finish_keypool, kp)
        with open(kp.state_file, "wb") as f:
            f.write(content)
        started = time.time()
        kp.start()
        self.assertEqual({k["state"] for k in kp.keys().values()}, {"ready"})
        self.assertEqual(self.chat_ok(kp) in (key_id(a), key_id(b)), True)
        aside = glob.glob(kp.state_file + ".corrupt-*")
        self.assertEqual(len(aside), 1, f"the bad file is moved aside once: {os.listdir(kp.dir)}")
        m = re.fullmatch(re.escape(kp.state_file) + r"\.corrupt-(\d+)", aside[0])
        self.assertTrue(m, aside[0])
        self.assertTrue(started - 5 <= int(m.group(1)) <= time.time() + 5,
                        "the suffix is the unix time")
        with open(aside[0], "rb") as f:
            self.assertEqual(f.read(), content, "the bad file is kept as it was")
        said = [line for line in kp.stderr().splitlines() if kp.state_file in line]
        self.assertTrue(said, "keypoold must say that the state file was not usable")
        self.assertTrue([line for line in said if aside[0] in line],
                        f"the log names where the file went: {said}")
        return kp

    def test_corrupt_state_file_is_moved_aside_and_keypoold_starts(self):
        self.check_bad_file_is_moved_aside(b"\x00garbage{{{ not json at all")

    def test_truncated_state_file_is_moved_aside(self):
        self.check_bad_file_is_moved_aside(b'{"format":"keypool-state","version":1,"keys":[{"po')

    def test_foreign_json_document_is_moved_aside(self):
        self.check_bad_file_is_moved_aside(b'{"hello": 1}\n')

    def test_state_of_another_version_is_moved_aside(self):
        self.check_bad_file_is_moved_aside(
            b'{"format":"keypool-state","version":99,"saved_at":"2026-01-01T00:00:00Z",'
            b'"keys":[],"history":[]}')

    def test_missing_state_file_is_a_normal_start(self):
        a = fake_secret()
        kp = self.start(a)
        self.assertFalse(os.path.exists(kp.state_file))
        self.assertEqual(kp.key(a)["state"], "ready")
        noise = [line for line in kp.stderr().splitlines()
                 if re.search(r"corrupt|not usable|moved aside|cannot read", line, re.I)]
        self.assertEqual(noise, [], "a missing state file is normal: no warning")
        kp.stop()
        self.assertTrue(os.path.exists(kp.state_file), "the state is saved at shutdown")
        self.check_state_document(read_json(kp.state_file), kp, "the state file")


if __name__ == "__main__":
    unittest.main(verbosity=2)

#!/usr/bin/env python3
"""The monitoring endpoints after a scripted scenario: /status, /api/key-status, /api/history.

The scenario (kptest.StatusScenario): in pool alpha key a is rate limited (429, Retry-After 120)
and the request rotates to b; in pool beta key c is refused (401) and disabled, key d is rate
limited for 2 s and recovers, and one request ends in a 502 that is returned as it is.
"""

import json
import os
import re
import time
import unittest

from kptest import (SRCDIR, KeypoolTestCase, StatusScenario, assert_api_error, fake_secret,
                    find_leaks, key_id, parse_rfc3339, wait_for)

KEY_FIELDS = ("id", "masked", "state", "reason", "reason_text", "cooldown_remaining_s",
              "cooldown_until", "requests", "successes", "rate_limited", "failures",
              "consecutive_failures", "last_used", "last_used_s_ago", "last_status", "last_class",
              "last_error", "tokens_in", "tokens_out", "in_flight", "max_concurrent", "rpm",
              "limits")
LIMIT_FIELDS = ("remaining_requests", "remaining_tokens", "reset_requests", "reset_tokens")
WORKER_FIELDS = ("pid", "slot", "generation", "stage", "heartbeat_age_ms", "requests",
                 "in_flight")
TOTAL_FIELDS = ("keys", "ready", "cooling", "disabled", "requests", "successes", "rate_limited",
                "failures", "tokens_in", "tokens_out")
EVENT_FIELDS = ("time", "pool", "event", "from", "to", "status", "reason", "cooldown_s")
EVENT_KINDS = ("rotate", "cooldown", "recover", "disable", "enable", "probe")
MS_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}(Z|[+-]\d{2}:\d{2})$")


def package_version():
    with open(os.path.join(SRCDIR, "configure.ac")) as f:
        m = re.search(r"AC_INIT\(\[[^\]]*\],\s*\[([^\]]+)\]", f.read())
    return m.group(1)


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class StatusApiTest(KeypoolTestCase):

    def scenario(self, **settings):
        self.sc = StatusScenario(self, settings).run()
        self.kp, self.sim = self.sc.kp, self.sc.sim
        return self.sc

    def history(self, query=""):
        doc = self.kp.get_json("/api/history" + query)
        self.assertIsInstance(doc.get("events"), list, doc)
        return doc["events"]

    def wait_event(self, pred, what):
        return wait_for(lambda: [e for e in self.history() if pred(e)], what=what)

    # --- /status ---

    def test_status_reports_the_daemon_its_workers_totals_and_pools(self):
        sc = self.scenario()
        st = self.kp.status()
        self.assertEqual(st["version"], package_version())
        self.assertTrue(is_count(st["uptime_s"]), st)
        self.assertLessEqual(st["uptime_s"], time.time() - sc.started + 2)
        self.assertEqual(st["generation"], 1, "a daemon that never reloaded is at generation 1")
        self.assertEqual(st["pid"], self.kp.pid)

        workers = st["workers"]
        self.assertEqual(len(workers), sc.settings["workers"], workers)
        for w in workers:
            for f in WORKER_FIELDS:
                self.assertIn(f, w, w)
            self.assertIn(w["pid"], self.kp.process_ids(), f"{w} is not a child of keypoold")
            self.assertNotEqual(w["pid"], self.kp.pid)
            self.assertEqual((w["generation"], w["stage"]), (1, "serving"), w)
            self.assertTrue(is_count(w["heartbeat_age_ms"]), w)
            self.assertLess(w["heartbeat_age_ms"], 30000, w)
            self.assertTrue(is_count(w["requests"]) and is_count(w["in_flight"]), w)
        self.assertEqual(len({w["pid"] for w in workers}), len(workers))
        self.assertEqual(st["requests"], sum(w["requests"] for w in workers), st)
        self.assertGreaterEqual(st["requests"], len(sc.answers),
                                "the workers served at least the scenario's proxied requests")
        self.assertTrue(is_count(st["in_flight"]), st)
        self.assertEqual(st["keys"], 5)

        # keypool's own probes (GET …/models, one confirming c's 401) are not proxied attempts.
        log = [e for e in self.sim.finished_log() if e["method"] == "POST"]
        t = st["totals"]
        for f in TOTAL_FIELDS:
            self.assertTrue(is_count(t.get(f)), f"totals.{f}: {t}")
        ok = sum(1 for e in log if e["status"] == 200)
        self.assertEqual((t["keys"], t["ready"], t["cooling"], t["disabled"]), (5, 3, 1, 1), t)
        self.assertEqual(t["requests"], len(log), f"every upstream attempt counts: {t}")
        self.assertEqual(t["successes"], ok, t)
        self.assertEqual(t["rate_limited"], 2, t)
        self.assertEqual(t["failures"], 2, f"the 401 and the 502: {t}")
        self.assertEqual((t["tokens_in"], t["tokens_out"]), (10 * ok, 5 * ok),
                         "the simulator reports 10 prompt and 5 completion tokens per answer")

        pools = {p["name"]: p for p in st["pools"]}
        self.assertEqual(sorted(pools), ["alpha", "beta"])
        want = {"alpha": (sc.ALPHA, 2, 1, 1, 0), "beta": (sc.BETA, 3, 2, 0, 1)}
        for name, (model, keys, ready, cooling, disabled) in want.items():
            p = pools[name]
            self.assertEqual((p["model"], p["keys"], p["ready"], p["cooling"], p["disabled"]),
                             (model, keys, ready, cooling, disabled), p)
            self.assertIs(p["account_limit_suspected"], False, p)

    # --- /api/key-status ---

    def test_key_status_describes_every_key_in_full(self):
        sc = self.scenario()
        doc = self.kp.key_status()
        now = time.time()
        self.assertEqual([p["name"] for p in doc["pools"]], ["alpha", "beta"])
        for p in doc["pools"]:
            self.assertIn("model", p)
            self.assertIs(p["account_limit_suspected"], False, p)
            for k in p["keys"]:
                for f in KEY_FIELDS:
                    self.assertIn(f, k, f"{k['id']} lacks {f}")
                self.assertEqual(sorted(k["limits"]), sorted(LIMIT_FIELDS), k["limits"])
                for f in ("requests", "successes", "rate_limited", "failures",
                          "consecutive_failures", "tokens_in", "tokens_out", "in_flight",
                          "cooldown_remaining_s"):
                    self.assertTrue(is_count(k[f]), f"{k['id']}.{f} = {k[f]!r}")
                self.assertEqual(k["in_flight"], 0, "nothing is in flight")
                if k["requests"]:
                    used = parse_rfc3339(k["last_used"])
                    self.assertTrue(sc.started - 2 <= used <= now + 2, k)
                    self.assertTrue(is_count(k["last_used_s_ago"]), k)
                    self.assertLessEqual(k["last_used_s_ago"], now - sc.started + 2, k)
                else:
                    self.assertIsNone(k["last_used"], k)
                for text in (k["reason_text"], k["last_error"]):
                    if text is not None:
                        self.assertEqual(find_leaks(self.kp.secrets, text, k["id"]), [])
                        self.assertNotIn("sk-or-", text)
                        self.assertNotIn("Bearer", text)
        keys = {k["id"]: k for p in doc["pools"] for k in p["keys"]}

        a = keys[key_id(sc.a)]
        self.assertEqual((a["state"], a["reason"], a["last_status"], a["last_class"]),
                         ("cooling", "rate_limited", 429, "rate_limited"), a)
        self.assertIsInstance(a["reason_text"], str)
        self.assertTrue(a["reason_text"].strip(), a)
        until = parse_rfc3339(a["cooldown_until"])
        self.assertGreaterEqual(until, sc.rotated_before + 120 - 2, a)
        self.assertLessEqual(until, sc.rotated_after + 120 + 2, a)
        self.assertTrue(abs((until - now) - a["cooldown_remaining_s"]) <= 2, a)
        self.assertIsInstance(a["last_error"], str, "a 429 leaves a short message")
        self.assertTrue(a["last_error"].strip() and len(a["last_error"]) <= 200, a)
        self.assertEqual((a["requests"], a["rate_limited"], a["successes"]), (1, 1, 0), a)
        self.assertEqual((a["tokens_in"], a["tokens_out"]), (0, 0), a)
        self.assertEqual(a["limits"], dict.fromkeys(LIMIT_FIELDS), "a never reported figures")

        b = keys[key_id(sc.b)]
        self.assertEqual((b["state"], b["reason"], b["reason_text"], b["cooldown_until"]),
                         ("ready", None, None, None), b)
        self.assertEqual((b["last_status"], b["last_class"], b["consecutive_failures"]),
                         (200, "ok", 0), b)
        self.assertEqual((b["tokens_in"], b["tokens_out"]),
                         (10 * b["successes"], 5 * b["successes"]), b)
        self.assertGreaterEqual(b["successes"], 2)
        lim = b["limits"]
        self.assertEqual((lim["remaining_requests"], lim["remaining_tokens"]), (42, 9000), lim)
        reset = parse_rfc3339(lim["reset_requests"])
        self.assertTrue(sc.figures_at + 360 - 3 <= reset <= now + 360 + 2, lim)
        parse_rfc3339(lim["reset_tokens"])

        c = keys[key_id(sc.c)]
        self.assertEqual((c["state"], c["reason"], c["last_status"], c["last_class"]),
                         ("disabled", "auth", 401, "auth"), c)
        self.assertTrue(isinstance(c["reason_text"], str) and c["reason_text"].strip(), c)
        self.assertIsNone(c["cooldown_until"], c)
        self.assertTrue(isinstance(c["last_error"], str) and c["last_error"].strip(), c)
        self.assertEqual((c["requests"], c["failures"]), (1, 1), c)

        d = keys[key_id(sc.d)]
        self.assertEqual((d["state"], d["reason"], d["reason_text"], d["cooldown_until"],
                          d["cooldown_remaining_s"], d["rate_limited"]),
                         ("ready", None, None, None, 0, 1), d)

        t = keys[sc.transient_key]
        self.assertEqual((t["state"], t["last_status"], t["last_class"]),
                         ("ready", 502, "transient"), t)
        self.assertEqual(t["consecutive_failures"], 1, t)
        self.assertTrue(isinstance(t["last_error"], str) and t["last_error"].strip(), t)

    def test_key_status_pool_filter_and_unknown_pool(self):
        sc = self.scenario()
        doc = self.kp.get_json("/api/key-status?pool=beta")
        self.assertEqual([p["name"] for p in doc["pools"]], ["beta"])
        self.assertEqual([k["id"] for k in doc["pools"][0]["keys"]],
                         [key_id(s) for s in (sc.c, sc.d, sc.e)])
        status, _, body = self.kp.request("GET", "/api/key-status?pool=no-such-pool")
        self.assertEqual(status, 404, body)
        assert_api_error(self, body)

    # --- /api/history ---

    def test_history_lists_the_scenario_in_order_with_filters(self):
        # The scenario without its last step: nothing is sent to beta after d recovers, so its
        # recover event must come from the recovery itself, not from the next request.
        sc = StatusScenario(self)
        self.kp, self.sim = sc.kp, sc.sim
        sc.rotate()
        sc.figures()
        sc.disable()
        sc.recover()
        A, B, C, D = (key_id(s) for s in (sc.a, sc.b, sc.c, sc.d))
        self.wait_event(lambda e: e["event"] == "recover" and e["from"] == D,
                        "a recover event for key d once its 2 s are over (with no more traffic)")
        events = self.history()
        for e in events:
            for f in EVENT_FIELDS:
                self.assertIn(f, e, e)
            self.assertIn(e["event"], EVENT_KINDS, e)
            self.assertRegex(e["time"], MS_TIME)
            self.assertIn(e["pool"], ("alpha", "beta"), e)
        times = [parse_rfc3339(e["time"]) for e in events]
        self.assertEqual(times, sorted(times), "oldest first")
        self.assertTrue(all(sc.started - 2 <= t <= time.time() + 2 for t in times), events)

        def index(pred, what):
            found = [i for i, e in enumerate(events) if pred(e)]
            self.assertTrue(found, f"no {what} in {json.dumps(events, indent=1)}")
            return found[0]

        rot = index(lambda e: e["event"] == "rotate" and e["from"] == A, "rotate from a")
        self.assertEqual((events[rot]["pool"], events[rot]["to"], events[rot]["status"]),
                         ("alpha", B, 429), events[rot])
        self.assertIn(events[rot]["reason"], ("rate_limited", None), events[rot])
        cool = index(lambda e: e["event"] == "cooldown" and e["from"] == A, "cooldown of a")
        ca = events[cool]
        self.assertEqual((ca["pool"], ca["reason"]), ("alpha", "rate_limited"), ca)
        self.assertTrue(115 <= ca["cooldown_s"] <= 121, ca)
        dis = index(lambda e: e["event"] == "disable" and e["from"] == C, "disable of c")
        self.assertEqual((events[dis]["pool"], events[dis]["reason"], events[dis]["status"]),
                         ("beta", "auth", 401), events[dis])
        cd = index(lambda e: e["event"] == "cooldown" and e["from"] == D, "cooldown of d")
        self.assertTrue(1 <= events[cd]["cooldown_s"] <= 3, events[cd])
        rec = index(lambda e: e["event"] == "recover" and e["from"] == D, "recover of d")
        self.assertEqual(events[rec]["pool"], "beta")
        late = parse_rfc3339(events[rec]["time"]) - parse_rfc3339(events[cd]["time"])
        rest = events[cd]["cooldown_s"]
        self.assertTrue(1 <= late <= rest + 3, f"d recovered {late:.3f} s after it cooled for "
                        f"{rest} s: the event's time is the time of the recovery")
        self.assertLess(max(rot, cool), dis, "a's events come before c's")
        self.assertLess(dis, cd, "c's disable comes before d's cooldown")
        self.assertLess(cd, rec, "d cools before it recovers")
        self.assertFalse([e for e in events if e["event"] in ("cooldown", "disable", "recover")
                          and e["from"] in (B, key_id(sc.e))],
                         "b and e never changed state")

        alpha = self.history("?pool=alpha")
        self.assertTrue(alpha)
        self.assertEqual(alpha, [e for e in events if e["pool"] == "alpha"])
        self.assertEqual(self.history("?pool=beta"), [e for e in events if e["pool"] == "beta"])
        about_a = self.history("?key=" + A)
        self.assertEqual(about_a, [e for e in events if A in (e["from"], e["to"])])
        self.assertGreaterEqual(len(about_a), 2)
        about_d = self.history(f"?pool=beta&key={D}")
        self.assertEqual(about_d, [e for e in events if D in (e["from"], e["to"])])
        self.assertEqual(self.history("?limit=2"), events[-2:], "limit keeps the newest")
        self.assertEqual(self.history("?limit=1&pool=alpha"), alpha[-1:])
        self.assertEqual(self.history("?key=kp-0000000000"), [])

    def test_history_refuses_a_limit_that_is_not_a_positive_number(self):
        sim = self.start_sim()
        self.kp = self.start_keypool(sim, pools=[{"name": "solo", "model": "m/solo",
                                                  "keys": [fake_secret()]}])
        for limit in ("0", "-1", "abc", "1x", ""):
            with self.subTest(limit=limit):
                status, _, body = self.kp.request("GET", "/api/history?limit=" + limit)
                self.assertEqual(status, 400, body)
                assert_api_error(self, body)
        self.assertEqual(self.history("?limit=5"), [])

    def test_history_keeps_only_its_capacity_of_newest_events(self):
        # 41 keys, 40 of them rate limited: two requests make 40 rotations between them, each
        # from a different key (a request that runs out of attempts may end with the last 429).
        secrets = [fake_secret() for _ in range(41)]
        sim = self.start_sim()
        kp = self.start_keypool(sim, pools=[{"name": "wide", "model": "wide/model",
                                             "keys": secrets}],
                                settings={"history_size": 16, "recovery_time": 900,
                                          "retry": {"max_attempts": 32}})
        sim.set_rules({s: {"status": 429, "retry_after": "600"} for s in secrets[:40]})
        for _ in range(4):
            if len([e for e in sim.log() if e["status"] == 429]) >= 40:
                break
            status, _, body = kp.chat("wide/model")
            self.assertIn(status, (200, 429), body)
        hits = [e["key_id"] for e in sim.log() if e["status"] == 429]
        self.assertEqual(len(hits), 40, "every limited key was tried once")
        self.assertEqual(len(set(hits)), 40)

        events = kp.get_json("/api/history")["events"]
        self.assertEqual(len(events), 16, "history_size = 16 keeps 16 events")
        self.assertEqual(kp.get_json("/api/history?limit=1000")["events"], events,
                         "a limit beyond the capacity gives the capacity")
        concerned = {e["from"] for e in events} | {e["to"] for e in events}
        concerned.discard(None)
        newest = set(hits[-16:])
        self.assertTrue(concerned - {key_id(secrets[40])} <= newest,
                        f"only the newest events are kept: {events}")
        self.assertIn(hits[-1], concerned, "the last rotation is kept")
        self.assertFalse(concerned & set(hits[:24]), "the oldest events are gone")
        times = [parse_rfc3339(e["time"]) for e in events]
        self.assertEqual(times, sorted(times))


if __name__ == "__main__":
    unittest.main(verbosity=2)

#!/usr/bin/env python3
"""Rotation policy: every provider hint, every answer class, auth styles, probes, retries."""

import email.utils
import json
import math
import time
import unittest
from datetime import datetime, timezone

from kptest import KeypoolTestCase, fake_secret, key_id, wait_for

RECOVERY = 150
MAX_COOLDOWN = 200
BACKOFF_MS = 500

# What the simulator answers for X-Sim-Status: 503 with no X-Sim-Body.
SIM_503_BODY = b'{"error":{"code":503,"message":"No available provider"}}'


def rfc3339(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PolicyTest(KeypoolTestCase):

    # --- plumbing ---

    def start(self, pools, settings=None, providers=None):
        """pools: {name: [keys]} (model "m/<name>") or a list of harness pool dicts."""
        self.sim = self.start_sim()
        if isinstance(pools, dict):
            pools = [{"name": n, "model": "m/" + n.lower(), "keys": list(k)}
                     for n, k in pools.items()]
        cfg = {"recovery_time": RECOVERY, "max_cooldown": MAX_COOLDOWN,
               "transient_threshold": 3, "transient_cooldown": 30,
               "retry": {"backoff_initial_ms": BACKOFF_MS, "backoff_max_ms": 2000,
                         "max_attempts": 5}}
        cfg.update(settings or {})
        if providers is not None:
            providers = [dict(p, base_url=p.get("base_url", self.sim.base_url))
                         for p in providers]
        self.kp = self.start_keypool(self.sim, pools=pools, settings=cfg, providers=providers)

    def chat(self, pool, headers=None, **kw):
        return self.kp.chat("m/" + pool.lower(), headers=headers, **kw)

    def chat_ok(self, pool, headers=None, **kw):
        status, h, body = self.chat(pool, headers, **kw)
        self.assertEqual(status, 200, body)
        return h

    def sent_with(self, secret):
        return len(self.sim.requests_with(secret))

    def assert_ready_and_untouched(self, secret):
        k = self.kp.key(secret)
        self.assertEqual((k["state"], k["reason"], k["rate_limited"], k["consecutive_failures"]),
                         ("ready", None, 0, 0), k)
        return k

    def assert_cooling(self, k, low, high, reason="rate_limited"):
        self.assertEqual((k["state"], k["reason"]), ("cooling", reason), k)
        self.assertGreaterEqual(k["cooldown_remaining_s"], low, k)
        self.assertLessEqual(k["cooldown_remaining_s"], high, k)

    def stderr_lines(self, event, secret=None):
        lines = [ln for ln in self.kp.stderr().splitlines() if f"event={event}" in ln]
        if secret is not None:
            lines = [ln for ln in lines if f"key={key_id(secret)}" in ln]
        return lines

    # --- hints ---

    def test_every_retry_hint_sets_the_cooldown(self):
        now = time.time()
        gemini = {"error": {
            "code": 429, "status": "RESOURCE_EXHAUSTED",
            "message": "Resource has been exhausted (e.g. check quota).",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                 "violations": [{"quotaMetric": "generativelanguage.googleapis.com/"
                                                "generate_content_free_tier_requests",
                                 "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "95s"}]}}
        anthropic = {"type": "error", "error": {"type": "rate_limit_error",
                                                "message": "Number of requests has exceeded "
                                                           "your per-minute rate limit"}}
        # name: (rule for the hinted key, the cooldown it must give)
        hints = {
            "RetryAfterSeconds": ({"retry_after": "45"}, 45),
            "RetryAfterHttpDate": ({"retry_after": email.utils.formatdate(now + 120, usegmt=True)},
                                   120),
            "RetryAfterMs": ({"headers": {"retry-after-ms": "75000"}}, 75),
            "AzureRetryAfterMs": ({"headers": {"x-ms-retry-after-ms": "65000"}}, 65),
            "GeminiRetryInfo": ({"body": json.dumps(gemini)}, 95),
            "RetryInText": ({"body": "Rate limit exceeded. Please retry in 50s."}, 50),
            "ResetEpochMs": ({"headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                                          "X-RateLimit-Reset": str(int((now + 80) * 1000))}}, 80),
            "ResetRequestsGo": ({"headers": {"x-ratelimit-remaining-requests": "0",
                                             "x-ratelimit-reset-requests": "1m30s",
                                             "x-ratelimit-remaining-tokens": "4000",
                                             "x-ratelimit-reset-tokens": "5s"}}, 90),
            "ResetTokensGo": ({"headers": {"x-ratelimit-remaining-tokens": "0",
                                           "x-ratelimit-reset-tokens": "2m5.5s",
                                           "x-ratelimit-remaining-requests": "10",
                                           "x-ratelimit-reset-requests": "7.66s"}}, 125.5),
            "AnthropicReset": ({"body": json.dumps(anthropic),
                                "headers": {"anthropic-ratelimit-requests-remaining": "0",
                                            "anthropic-ratelimit-requests-reset":
                                                rfc3339(now + 100)}}, 100),
            "RetryAfterFirst": ({"retry_after": "40",
                                 "headers": {"X-RateLimit-Remaining": "0",
                                             "X-RateLimit-Reset": str(int((now + 170) * 1000))}},
                                40),
            "HugeHintCapped": ({"retry_after": "999999"}, MAX_COOLDOWN),
            "NoHint": ({}, RECOVERY),
        }
        secrets = {name: (fake_secret(), fake_secret()) for name in hints}
        self.start({name: s for name, s in secrets.items()})
        self.sim.set_rules({secrets[name][0]: dict(rule, status=429)
                            for name, (rule, _) in hints.items()})

        for name in hints:
            hinted, other = secrets[name]
            with self.subTest(hint=name):
                h = self.chat_ok(name)
                self.assertEqual(h.get("x-keypool-key"), key_id(other))
                self.assertEqual(h.get("x-keypool-attempts"), "2")
        for name, (_, seconds) in hints.items():
            hinted, other = secrets[name]
            with self.subTest(hint=name):
                k = self.kp.key(hinted)
                # Generous below (a slow machine), exact above (never longer than asked).
                self.assert_cooling(k, seconds - 15, math.ceil(seconds))
                self.assertEqual((k["rate_limited"], k["last_status"]), (1, 429), k)
                self.assertEqual(self.kp.key(other)["state"], "ready")
                self.assertEqual(self.sent_with(hinted), 1)

    def test_a_success_with_nothing_remaining_cools_the_key_before_any_429(self):
        now = time.time()
        cases = {
            "OpenAI": ({"x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": "20s",
                        "x-ratelimit-remaining-tokens": "9000",
                        "x-ratelimit-reset-tokens": "1s"}, 20),
            "OpenRouter": ({"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": str(int((now + 25) * 1000))}, 25),
            "Anthropic": ({"anthropic-ratelimit-tokens-remaining": "0",
                           "anthropic-ratelimit-tokens-reset": rfc3339(now + 30)}, 30),
        }
        secrets = {name: (fake_secret(), fake_secret()) for name in cases}
        self.start(secrets)
        self.sim.set_rules({secrets[n][0]: {"status": 200, "headers": hdrs, "count": 1}
                            for n, (hdrs, _) in cases.items()})
        for name, (_, seconds) in cases.items():
            first, second = secrets[name]
            with self.subTest(provider=name):
                h = self.chat_ok(name)
                self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")),
                                 (key_id(first), "1"), "the last allowed request is served")
                self.assert_cooling(self.kp.key(first), seconds - 12, seconds)
                # Keys take turns (least recently used first): three in a row on the second
                # key means the first is resting.
                for _ in range(3):
                    h = self.chat_ok(name)
                    self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")),
                                     (key_id(second), "1"), "the next requests go elsewhere")
                self.assertEqual(self.sent_with(first), 1)
        self.assertEqual([e["status"] for e in self.sim.log()], [200] * 12,
                         "no request may have met a 429")

    def test_openai_insufficient_quota_429_disables_the_key_for_quota(self):
        a, b = fake_secret(), fake_secret()
        self.start({"P": [a, b]})
        body = {"error": {"message": "You exceeded your current quota, please check your plan "
                                     "and billing details.",
                          "type": "insufficient_quota", "param": None,
                          "code": "insufficient_quota"}}
        self.sim.set_rules({a: {"status": 429, "body": json.dumps(body)}})
        h = self.chat_ok("P")
        self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")), (key_id(b), "2"))
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"], k["last_status"]), ("disabled", "quota", 429), k)
        self.chat_ok("P")
        self.assertEqual(self.sent_with(a), 1)

    # --- providers as they are ---

    def test_auth_styles_and_static_headers(self):
        anth, goog, bear = fake_secret(), fake_secret(), fake_secret()
        providers = [
            {"name": "anthropic", "auth": "x-api-key",
             "headers": ["anthropic-version: 2023-06-01"]},
            {"name": "gemini", "auth": "x-goog-api-key"},
            {"name": "openrouter", "auth": "bearer",
             "headers": ["HTTP-Referer: https://keypool.test/", "X-Title: keypool tests"]},
        ]
        self.start([{"name": "A", "model": "m/a", "keys": [anth], "provider": "anthropic"},
                    {"name": "G", "model": "m/g", "keys": [goog], "provider": "gemini"},
                    {"name": "O", "model": "m/o", "keys": [bear], "provider": "openrouter"}],
                   providers=providers)
        # What an SDK pointed at keypool sends: its own (dummy) bearer token and a title.
        client = {"Authorization": "Bearer sk-keypool-client-fake-dummy", "X-Title": "client"}
        for pool, secret, header in (("A", anth, "x-api-key"), ("G", goog, "x-goog-api-key"),
                                     ("O", bear, "authorization")):
            with self.subTest(pool=pool):
                for hdrs in (None, client):
                    self.sim.reset()
                    h = self.chat_ok(pool, headers=hdrs)
                    self.assertEqual(h.get("x-keypool-key"), key_id(secret))
                    (e,) = self.sim.log()
                    self.assertEqual(e["key_id"], key_id(secret), "the pool's key must arrive")
                    self.assertEqual(e["auth_header"], header)
                    self.assertEqual(e["auth_headers"], [header],
                                     "the key travels in exactly one header, no other "
                                     "credential header goes upstream")
                    self.assertNotIn(secret, e["path"], "a key never travels in a URL")
                    self.assertNotIn("key=", e["path"])
        self.sim.reset()
        self.chat_ok("A")
        self.assertEqual(self.sim.log()[0]["headers"].get("anthropic-version"), "2023-06-01")
        self.sim.reset()
        self.chat_ok("O", headers={"X-Title": "from the client", "X-Other": "kept"})
        hdrs = self.sim.log()[0]["headers"]
        self.assertEqual(hdrs.get("http-referer"), "https://keypool.test/")
        self.assertEqual(hdrs.get("x-title"), "keypool tests",
                         "a provider header overrides the client's header of the same name")
        self.assertEqual(hdrs.get("x-other"), "kept")

    # --- probes ---

    def test_quota_key_is_probed_and_enabled_and_auth_key_is_not(self):
        quota, auth, still_quota, spare = (fake_secret() for _ in range(4))
        self.start({"P": [quota, auth, still_quota, spare]}, settings={"probe_interval": 10})
        self.sim.set_rules({
            quota: {"status": 402, "count": 1, "models_status": 200},
            auth: {"status": 401, "count": 1, "models_status": 401},
            still_quota: {"status": 402, "models_status": 402},
        })
        h = self.chat_ok("P")
        self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")),
                         (key_id(spare), "4"))
        # A caller's 401 disables its key once keypool's own probe is refused too.
        wait_for(lambda: self.kp.key(auth)["state"] == "disabled", what="the 401 to be confirmed")
        for s, reason in ((quota, "quota"), (auth, "auth"), (still_quota, "quota")):
            k = self.kp.key(s)
            self.assertEqual((k["state"], k["reason"]), ("disabled", reason), k)

        # probe_interval 10 s (the smallest allowed) plus the worker's 2 s check.
        wait_for(lambda: self.kp.key(quota)["state"] == "ready", timeout=25,
                 what="the quota key to be enabled again by a successful probe")
        probes = [e for e in self.sim.requests_with(quota) if e["method"] == "GET"]
        self.assertTrue(probes, "the key must have been probed upstream")
        self.assertTrue(probes[0]["path"].endswith("/models"), probes[0])
        self.assertEqual((probes[0]["status"], probes[0]["auth_header"]), (200, "authorization"))
        self.assertTrue(self.stderr_lines("probe", quota), "no event=probe line for the key")
        self.assertTrue(self.stderr_lines("enable", quota), "no event=enable line for the key")

        # The failed probe leaves its key disabled; the auth key is never probed.
        wait_for(lambda: [e for e in self.sim.requests_with(still_quota) if e["method"] == "GET"],
                 timeout=15, what="the other quota key to be probed")
        time.sleep(3)       # more than the worker's 2 s check: a due auth probe would be sent
        k = self.kp.key(still_quota)
        self.assertEqual((k["state"], k["reason"]), ("disabled", "quota"), k)
        k = self.kp.key(auth)
        self.assertEqual((k["state"], k["reason"]), ("disabled", "auth"), k)
        self.assertEqual([e["method"] for e in self.sim.requests_with(auth)], ["POST", "GET"],
                         "an auth key is probed once to confirm, and never again without probe_auth")
        self.assertFalse(self.stderr_lines("enable", auth))

        # The enabled key serves again (its 402 is used up).
        served = {self.chat_ok("P").get("x-keypool-key") for _ in range(2)}
        self.assertEqual(served, {key_id(quota), key_id(spare)})

    def test_auth_key_is_probed_and_enabled_with_probe_auth(self):
        auth, spare = fake_secret(), fake_secret()
        self.start({"P": [auth, spare]}, settings={"probe_interval": 10, "probe_auth": True})
        self.sim.set_rules({auth: {"status": 401, "count": 1, "models_status": 401}})
        self.assertEqual(self.chat_ok("P").get("x-keypool-key"), key_id(spare))
        wait_for(lambda: self.kp.key(auth)["reason"] == "auth", what="the 401 to be confirmed by a probe")
        self.sim.set_rules({auth: {"models_status": 200}})
        wait_for(lambda: self.kp.key(auth)["state"] == "ready", timeout=25,
                 what="the auth key to be enabled again by a probe (probe_auth = true)")
        self.assertTrue(self.stderr_lines("enable", auth))
        served = {self.chat_ok("P").get("x-keypool-key") for _ in range(2)}
        self.assertEqual(served, {key_id(auth), key_id(spare)})

    # --- transient ---

    def test_one_503_is_retried_on_the_next_key_after_a_backoff(self):
        a, b = fake_secret(), fake_secret()
        self.start({"P": [a, b]})
        self.sim.set_rules({a: {"status": 503, "count": 1}})
        h = self.chat_ok("P")
        self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")), (key_id(b), "2"))
        first, retry = self.sim.finished_log()
        self.assertEqual((first["key_id"], first["status"]), (key_id(a), 503))
        self.assertEqual((retry["key_id"], retry["status"]), (key_id(b), 200))
        self.assertGreaterEqual(retry["time"] - first["time"], 0.8 * BACKOFF_MS / 1000,
                                "the retry must come after the backoff")
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"], k["consecutive_failures"], k["rate_limited"]),
                         ("ready", None, 1, 0), k)
        self.assertEqual(self.kp.key(b)["consecutive_failures"], 0)

    def test_a_dropped_connection_is_transient(self):
        a, b = fake_secret(), fake_secret()
        self.start({"P": [a, b]})
        self.sim.set_rules({a: {"drop": True, "count": 1}})
        h = self.chat_ok("P")
        self.assertEqual((h.get("x-keypool-key"), h.get("x-keypool-attempts")), (key_id(b), "2"))
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["consecutive_failures"], k["rate_limited"]),
                         ("ready", 1, 0), k)

    def test_transient_failures_in_a_row_cool_the_key(self):
        a = fake_secret()
        self.start({"P": [a]}, settings={"retry": {"backoff_initial_ms": 100,
                                                   "backoff_max_ms": 200, "max_attempts": 3}})
        self.sim.set_rules({a: {"status": 503, "count": 3}})
        status, h, body = self.chat("P", headers={"X-Keypool-Max-Wait": "0"})
        self.assertEqual(status, 503, body)
        self.assertEqual(body, SIM_503_BODY, "the last upstream answer is returned as is")
        self.assertEqual(self.sent_with(a), 3)
        self.assert_cooling(self.kp.key(a), 20, 30, reason="transient")
        status, h, body = self.chat("P", headers={"X-Keypool-Max-Wait": "0"})
        self.assertEqual(status, 503, body)
        self.assertOpenAIError(body, code="no_key_available")
        self.assertEqual(self.sent_with(a), 3, "a cooling key gets no requests")

    def test_a_success_resets_the_run_of_transient_failures(self):
        a = fake_secret()
        self.start({"P": [a]}, settings={"retry": {"backoff_initial_ms": 100,
                                                   "backoff_max_ms": 200, "max_attempts": 2}})
        for round_ in range(2):
            self.sim.set_rules({a: {"status": 503, "count": 2}})
            status, h, body = self.chat("P")
            self.assertEqual((status, body), (503, SIM_503_BODY))
            self.assertEqual(h.get("x-keypool-attempts"), "2")
            k = self.kp.key(a)
            self.assertEqual((k["state"], k["consecutive_failures"]), ("ready", 2), k)
            if round_ == 0:
                self.chat_ok("P")
                self.assertEqual(self.kp.key(a)["consecutive_failures"], 0)
        self.assertEqual(self.sent_with(a), 5, "4 failures in all, never 3 in a row: not benched")
        self.assertEqual(self.chat_ok("P").get("x-keypool-key"), key_id(a))

    def test_max_attempts_bounds_the_retries_and_returns_the_last_answer(self):
        a, b = fake_secret(), fake_secret()
        self.start({"P": [a, b]}, settings={
            "transient_threshold": 10,
            "retry": {"backoff_initial_ms": 100, "backoff_max_ms": 200, "max_attempts": 3}})
        status, h, body = self.chat("P", headers={"X-Sim-Status": "503"})
        self.assertEqual((status, body), (503, SIM_503_BODY))
        self.assertEqual(h.get("x-keypool-attempts"), "3")
        used = [e["key_id"] for e in self.sim.log()]
        self.assertEqual(len(used), 3, "exactly max_attempts upstream requests")
        for prev, nxt in zip(used, used[1:]):
            self.assertNotEqual(prev, nxt, f"a retry must avoid the key that just failed: {used}")
        for s in (a, b):
            self.assertEqual(self.kp.key(s)["state"], "ready")

    def test_unreachable_upstream_is_retried_then_answered_with_502(self):
        a, b = fake_secret(), fake_secret()
        self.sim = self.start_sim()
        closed = self.start_sim()
        dead_url = closed.base_url
        closed.stop()           # nothing listens on its port any more
        self.kp = self.start_keypool(self.sim, pools=[{"name": "P", "model": "m/p", "keys": [a, b]}],
                                     providers=[{"name": "sim", "base_url": dead_url}],
                                     settings={"retry": {"backoff_initial_ms": 100,
                                                         "backoff_max_ms": 200,
                                                         "max_attempts": 2}})
        status, h, body = self.kp.chat("m/p")
        self.assertIn(status, (502, 504), body)
        self.assertOpenAIError(body)
        tried = [ln for ln in self.kp.stderr().splitlines() if "event=upstream_error" in ln]
        self.assertEqual(len(tried), 2, "max_attempts connection attempts, no more")
        self.assertEqual({key_id(a), key_id(b)},
                         {k for ln in tried for k in (key_id(a), key_id(b)) if f"key={k}" in ln},
                         "the retry goes to the other key")
        for s in (a, b):
            self.assertEqual(self.kp.key(s)["state"], "ready", "an outage is not the key's fault")

    # --- caller errors, phrases ---

    def test_caller_errors_are_returned_as_is_and_blame_nobody(self):
        a, b = fake_secret(), fake_secret()
        self.start({"P": [a, b]})
        for code in (400, 404, 413, 422):
            with self.subTest(status=code):
                self.sim.reset()
                body = json.dumps({"error": {"code": code, "message": f"bad field ({code})"}})
                # Whichever key serves gets the error (keys take turns).
                self.sim.set_rules({s: {"status": code, "body": body} for s in (a, b)})
                status, h, got = self.chat("P")
                self.assertEqual((status, got), (code, body.encode()))
                self.assertEqual(h.get("x-keypool-attempts"), "1")
                self.assertEqual(len(self.sim.log()), 1, "a caller error is never retried")
                self.assertEqual(self.sim.log()[0]["key_id"], h.get("x-keypool-key"))
                for s in (a, b):
                    self.assert_ready_and_untouched(s)

    def test_configured_rate_limit_phrases_replace_the_built_in_list(self):
        for phrases in (None, ["slow down"]):
            with self.subTest(rate_limit_phrases=phrases):
                a, b = fake_secret(), fake_secret()
                self.start({"P": [a, b]},
                           settings={"rate_limit_phrases": phrases} if phrases else None)
                # Words count only where providers put them (a 5xx here), never in a caller's 400.
                self.sim.set_rules({a: {"status": 503, "body": "slow down, pal", "count": 1}})
                status, h, body = self.chat("P")
                if phrases:
                    self.assertEqual(status, 200, body)
                    self.assertEqual(h.get("x-keypool-key"), key_id(b))
                    self.assert_cooling(self.kp.key(a), RECOVERY - 15, RECOVERY)
                    # The built-in words no longer count in a 400.
                    self.sim.set_rules({b: {"status": 400, "body": "Rate limit exceeded",
                                            "count": 1}})
                    status, h, body = self.chat("P")
                    self.assertEqual((status, h.get("x-keypool-attempts")), (400, "1"), body)
                    self.assert_ready_and_untouched(b)
                else:
                    self.assertEqual((status, h.get("x-keypool-attempts")), (200, "2"), body)
                    k = self.kp.key(a)
                    self.assertEqual((k["state"], k["rate_limited"]), ("ready", 0), k)

    # --- account-wide limits, scope ---

    def test_all_keys_limited_at_once_suggests_an_account_limit(self):
        a, b, c, d = (fake_secret() for _ in range(4))
        self.start({"ALL": [a, b], "ONE": [c, d]})
        self.sim.set_rules({a: {"status": 429, "retry_after": "60"},
                            b: {"status": 429, "retry_after": "60"},
                            c: {"status": 429, "retry_after": "60"}})
        status, h, body = self.chat("ALL")
        self.assertEqual(status, 503, body)
        self.assertTrue(55 <= int(h.get("retry-after", "0")) <= 60, h)
        self.chat_ok("ONE")
        self.assertIs(self.kp.pool("ALL")["account_limit_suspected"], True)
        self.assertIs(self.kp.pool("ONE")["account_limit_suspected"], False)
        for s in (a, b):
            self.assert_cooling(self.kp.key(s), 45, 60)
        self.assertIn("account- or IP-wide limit is suspected", self.kp.stderr())

    def test_cooldown_scope(self):
        for scope in ("key", "pool"):
            with self.subTest(cooldown_scope=scope):
                shared, one, two = fake_secret(), fake_secret(), fake_secret()
                self.start({"P1": [shared, one], "P2": [shared, two]},
                           settings={"cooldown_scope": scope})
                self.sim.set_rules({shared: {"status": 429, "retry_after": "90", "count": 1}})
                self.assertEqual(self.chat_ok("P1").get("x-keypool-key"), key_id(one))
                self.assert_cooling(self.kp.key_in("P1", shared), 75, 90)
                k = self.kp.key_in("P2", shared)
                if scope == "key":
                    self.assert_cooling(k, 75, 90)
                    self.assertEqual(self.chat_ok("P2").get("x-keypool-key"), key_id(two))
                    self.assertEqual(self.sent_with(shared), 1)
                else:
                    self.assertEqual(k["state"], "ready", k)
                    self.assertEqual(self.chat_ok("P2").get("x-keypool-key"), key_id(shared))
                    self.assertEqual(self.sent_with(shared), 2)


if __name__ == "__main__":
    unittest.main(verbosity=2)

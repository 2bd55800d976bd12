#!/usr/bin/env python3
"""keypoolctl against the real daemon: each command's tables after a scripted rotation, disable
and enable; --json as the daemon said it; exit statuses 0/1/2/3; admin refused to another uid;
export/import of the state; watch frames until SIGINT; colour only on a terminal."""

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import unittest

from kptest import (KEYPOOLD, KeypoolTestCase, fake_secret, find_leaks, find_program, key_id,
                    make_socket_public, masked, wait_for)

MODEL = "z-ai/glm-4.5"
POOL = "GLM45"


def _keypoolctl():
    if os.environ.get("KEYPOOLCTL"):
        return os.environ["KEYPOOLCTL"]
    # Built next to the daemon (make check exports KEYPOOLCTL; this is for runs by hand).
    for d in (os.path.dirname(KEYPOOLD), os.path.dirname(os.path.realpath(KEYPOOLD))):
        path = os.path.join(d, "keypoolctl")
        if os.path.isfile(path):
            return path
    return os.path.join(os.path.dirname(KEYPOOLD), "keypoolctl")


KEYPOOLCTL = _keypoolctl()

# Variables that change keypoolctl's output: each test sets the ones it means.
CTL_ENV_DROP = ("NO_COLOR", "KEYPOOL_SOCKET", "TERM")


def ctl_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CTL_ENV_DROP}
    env.update(extra)
    return env


def table(text):
    """The first table in text as a list of dicts (header -> cell): cells are separated by runs
    of blanks, and no cell of keypoolctl's tables contains one ("-" stands for nothing)."""
    lines = [line for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith(("POOL ", "TIME ")):
            header = line.split()
            rows = []
            for row in lines[i + 1:]:
                cells = row.split()
                if len(cells) != len(header):
                    break
                rows.append(dict(zip(header, cells)))
            return rows
    raise AssertionError(f"no table in:\n{text}")


def rows_by_key(text):
    return {r["KEY"]: r for r in table(text)}


class KeypoolctlTest(KeypoolTestCase):

    def setUp(self):
        if not (os.path.isfile(KEYPOOLCTL) and os.access(KEYPOOLCTL, os.X_OK)):
            self.fail(f"keypoolctl is not built: {KEYPOOLCTL} (set KEYPOOLCTL)")
        self.kp = None
        self.tmp = tempfile.mkdtemp(prefix="kpctl-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def start(self, *keys, settings=None):
        self.sim = self.start_sim()
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": POOL, "model": MODEL, "keys": list(keys)}],
            settings={"recovery_time": 900, **(settings or {})})
        return self.kp

    def ctl(self, *args, socket=None, user=None, env=None, timeout=30):
        """Runs keypoolctl -s <the daemon's socket> args; its output joins the leak checks."""
        cmd = [KEYPOOLCTL, "-s", socket or self.kp.socket_path, *args]
        if user is not None:
            setpriv = find_program("/usr/bin/setpriv", "setpriv")
            if setpriv is None or os.geteuid() != 0:
                raise unittest.SkipTest("running keypoolctl as another user needs root and setpriv")
            cmd = [setpriv, f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env=ctl_env(**(env or {})), cwd="/")
        if self.kp is not None:
            self.kp.seen.append((f"the output of keypoolctl {' '.join(args)}",
                                 r.stdout + "\n" + r.stderr))
        self.assertNotRegex(r.stderr, r"runtime error|Sanitizer",
                            f"keypoolctl {' '.join(args)} tripped a sanitizer")
        return r

    def ok(self, *args, **kw):
        r = self.ctl(*args, **kw)
        self.assertEqual(r.returncode, 0, f"keypoolctl {' '.join(args)} failed:\n{r.stderr}")
        self.assertNotIn("\033", r.stdout, "no escape codes when stdout is not a terminal")
        return r.stdout

    def refused(self, *args, **kw):
        r = self.ctl(*args, **kw)
        self.assertEqual(r.returncode, 1, f"keypoolctl {' '.join(args)}: expected exit 1, "
                                          f"got {r.returncode}\n{r.stdout}\n{r.stderr}")
        self.assertTrue(r.stderr.startswith("keypoolctl: "), r.stderr)
        return r

    def chat_ok(self):
        status, h, body = self.kp.chat(MODEL)
        self.assertEqual(status, 200, body)
        return h.get("x-keypool-key")

    def rotate(self, a, b):
        """a answers 429 (Retry-After 300): the request moves to b and a cools."""
        self.sim.set_rules({a: {"status": 429, "retry_after": "300"}})
        for _ in range(4):
            self.chat_ok()
            if self.sim.requests_with(a):
                break
        self.assertEqual(self.kp.key(a)["state"], "cooling")

    # --- the tables after a scenario -------------------------------------------------------

    def test_keys_history_disable_and_enable_follow_a_rotation(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        A, B = key_id(a), key_id(b)
        self.rotate(a, b)

        rows = rows_by_key(self.ok("keys"))
        self.assertEqual(set(rows), {A, B})
        ra, rb = rows[A], rows[B]
        self.assertEqual((ra["POOL"], ra["MASKED"], ra["STATE"], ra["REASON"]),
                         (POOL, masked(a), "cooling", "rate_limited"), ra)
        self.assertRegex(ra["COOLDOWN"], r"^[45]m\d\ds$", "about 300 s left, as 4m5Xs or 5m00s")
        self.assertEqual((ra["REQUESTS"], ra["OK"], ra["LIMITED"], ra["FAILED"], ra["LAST"]),
                         ("1", "0", "1", "0", "429"), ra)
        self.assertEqual((rb["STATE"], rb["REASON"], rb["COOLDOWN"], rb["LIMITED"], rb["LAST"]),
                         ("ready", "-", "-", "0", "200"), rb)
        self.assertEqual(rb["REQUESTS"], rb["OK"])
        def steady(rows):
            return {k: {c: v for c, v in r.items() if c != "COOLDOWN"} for k, r in rows.items()}
        self.assertEqual(steady(rows_by_key(self.ok("keys", POOL))), steady(rows),
                         "keys POOL shows the same rows")

        out = self.ok("disable", B)
        self.assertIn(B, out)
        self.assertIn("disabled", out)
        self.assertIn("operator", out)
        rb = rows_by_key(self.ok("keys"))[B]
        self.assertEqual((rb["STATE"], rb["REASON"]), ("disabled", "operator"), rb)

        out = self.ok("enable", B)
        self.assertIn(B, out)
        self.assertIn("ready", out)
        rb = rows_by_key(self.ok("keys"))[B]
        self.assertEqual((rb["STATE"], rb["REASON"]), ("ready", "-"), rb)

        events = table(self.ok("history"))
        rotates = [e for e in events if e["EVENT"] == "rotate"]
        self.assertTrue(rotates, f"no rotate event in {events}")
        self.assertEqual((rotates[0]["POOL"], rotates[0]["KEY"], rotates[0]["TO"],
                          rotates[0]["STATUS"]), (POOL, A, B, "429"), rotates[0])
        kinds = [e["EVENT"] for e in events if e["KEY"] == B]
        self.assertIn("disable", kinds)
        self.assertIn("enable", kinds)
        self.assertLess(kinds.index("disable"), kinds.index("enable"), "oldest first")

        last = table(self.ok("history", "-n", "1", "--key", B))
        self.assertEqual([(e["EVENT"], e["KEY"]) for e in last], [("enable", B)],
                         "-n 1 --key shows that key's latest event only")
        by_pool = table(self.ok("history", "--pool", POOL))
        self.assertEqual(len(by_pool), len(events))

    def test_status_and_health_describe_the_daemon_and_its_pools(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.rotate(a, b)

        out = self.ok("status")
        self.assertIn(f"keypoold 0.1.0, pid {self.kp.pid}, up ", out)
        self.assertIn("keys 2: 1 ready, 1 cooling, 0 disabled", out)
        self.assertRegex(out, r"(?m)^\s*\d+\s+\d+\s+\d+\s+serving\s", "a serving worker row")
        self.assertRegex(out, rf"(?m)^{POOL}\s+{re.escape(MODEL)}\s+2\s+1\s+1\s+0\b", "the pool row")

        out = self.ok("health")
        self.assertEqual(out.splitlines()[0], "ok")
        self.assertEqual(table(out), [{"POOL": POOL, "READY": "1", "KEYS": "2"}])

        self.ok("disable", key_id(b))
        r = self.refused("health")
        self.assertEqual(r.stdout.splitlines()[0], "degraded",
                         "a degraded daemon's answer is still shown")
        self.assertIn("degraded", r.stderr)
        self.assertEqual(table(r.stdout)[0]["READY"], "0")

    def test_probe_is_scheduled(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        out = self.ok("probe", key_id(a))
        self.assertIn(f"probe of {key_id(a)} is scheduled", out)

    # --- --json ----------------------------------------------------------------------------

    def test_json_prints_the_daemons_documents(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.rotate(a, b)
        # Fields that move between two reads a moment apart (clocks, and the requests the
        # readers themselves make). Wall-clock times are the monotonic ones turned into the
        # wall clock at each read, so two reads may straddle a second.
        moving = {"uptime_s", "heartbeat_age_ms", "last_used_s_ago", "cooldown_remaining_s",
                  "requests", "in_flight", "waiting", "last_used", "cooldown_until"}

        def steady(doc, in_status=False):
            if isinstance(doc, dict):
                return {k: steady(v, in_status) for k, v in doc.items()
                        if not (k in moving and (in_status or k != "requests"))}
            if isinstance(doc, list):
                return [steady(v, in_status) for v in doc]
            return doc

        for args, path in ((["keys"], "/api/key-status"), (["keys", POOL], f"/api/key-status?pool={POOL}"),
                           (["history"], "/api/history"), (["health"], "/health"),
                           (["status"], "/status")):
            got = json.loads(self.ok("--json", *args))
            want = self.kp.get_json(path)
            in_status = path == "/status"
            self.assertEqual(steady(got, in_status), steady(want, in_status),
                             f"keypoolctl --json {' '.join(args)} differs from GET {path}")
        # Options may follow the command, as people type them.
        self.assertIn("pools", json.loads(self.ok("keys", "--json")))

        doc = json.loads(self.ok("--json", "disable", key_id(a)))
        self.assertEqual((doc["key"]["id"], doc["key"]["state"]), (key_id(a), "disabled"))
        self.assertIs(json.loads(self.ok("--json", "probe", key_id(b)))["probing"], True)

    # --- exit statuses ---------------------------------------------------------------------

    def test_refusals_exit_1_with_the_daemons_message(self):
        a = fake_secret()
        self.start(a)
        unknown = "kp-0000000000"
        status, _, body = self.kp.request("POST", f"/api/keys/{unknown}/disable")
        self.assertEqual(status, 404, body)
        message = json.loads(body)["error"]["message"]
        for action in ("disable", "enable", "probe"):
            r = self.refused(action, unknown)
            self.assertIn(f"{action} {unknown}: ", r.stderr, "says what was refused")
            self.assertIn("HTTP 404", r.stderr)
            self.assertEqual(r.stdout, "")
        r = self.refused("disable", unknown)
        self.assertIn(message, r.stderr, "the daemon's own words are shown")
        r = self.refused("keys", "no-such-pool")
        self.assertIn("404", r.stderr)
        r = self.refused("--json", "keys", "no-such-pool")
        self.assertEqual(r.stdout, "")

    def test_usage_errors_exit_2_with_the_usage(self):
        a = fake_secret()
        self.start(a)
        for args in ([], ["frobnicate"], ["--frobnicate", "keys"], ["-x", "status"],
                     ["disable"], ["enable"], ["probe"], ["export"], ["import"],
                     ["disable", "kp-0000000000", "extra"], ["status", "extra"],
                     ["history", "-n", "0"], ["history", "-n", "many"], ["history", "-n"],
                     ["watch", "--interval", "0"], ["watch", "--interval", "soon"],
                     ["keys", "--interval", "2"], ["status", "--pool", POOL]):
            r = self.ctl(*args)
            self.assertEqual(r.returncode, 2, f"keypoolctl {args}: {r.stderr}")
            self.assertIn("Usage: keypoolctl", r.stderr, args)
            self.assertEqual(r.stdout, "", args)
        self.assertEqual(self.kp.key(a)["state"], "ready")

    def test_help_and_version(self):
        r = subprocess.run([KEYPOOLCTL, "--help"], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0)
        self.assertIn("Usage: keypoolctl", r.stdout)
        for command in ("status", "health", "keys", "history", "disable", "enable", "probe",
                        "export", "import", "watch"):
            self.assertRegex(r.stdout, rf"(?m)^  {command}\b", f"--help lists {command}")
        r = subprocess.run([KEYPOOLCTL, "--version"], capture_output=True, text=True, timeout=30)
        self.assertEqual((r.returncode, r.stdout), (0, "keypoolctl 0.1.0\n"))

    def test_unreachable_daemon_exits_3(self):
        missing = os.path.join(self.tmp, "nobody-listens.sock")
        for args in (["status"], ["keys"], ["disable", "kp-0000000000"], ["watch"]):
            r = self.ctl(*args, socket=missing)
            self.assertEqual(r.returncode, 3, f"{args}: {r.stderr}")
            self.assertIn(f"keypoold is not reachable on {missing}: No such file or directory",
                          r.stderr)
            self.assertEqual(r.stdout, "")
        # A socket file nobody accepts on (a daemon that died): refused, still 3.
        dead = os.path.join(self.tmp, "dead.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(dead)
        s.close()
        r = self.ctl("health", socket=dead)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn("Connection refused", r.stderr)

    def test_socket_comes_from_keypool_socket_when_not_given(self):
        a = fake_secret()
        self.start(a)
        r = subprocess.run([KEYPOOLCTL, "keys"], capture_output=True, text=True, timeout=30,
                           env=ctl_env(KEYPOOL_SOCKET=self.kp.socket_path))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(key_id(a), r.stdout)
        self.kp.seen.append(("keypoolctl keys via KEYPOOL_SOCKET", r.stdout + r.stderr))
        # -s wins over the environment.
        r = subprocess.run([KEYPOOLCTL, "-s", os.path.join(self.tmp, "x.sock"), "keys"],
                           capture_output=True, text=True, timeout=30,
                           env=ctl_env(KEYPOOL_SOCKET=self.kp.socket_path))
        self.assertEqual(r.returncode, 3, r.stderr)

    def test_admin_refused_to_another_uid_who_may_still_read(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b, settings={"socket_mode": "0666"})
        make_socket_public(self.kp)
        A = key_id(a)

        rows = rows_by_key(self.ok("keys", user="nobody"))
        self.assertEqual(rows[A]["STATE"], "ready", "anyone who can connect may read")
        for args in (["disable", A], ["enable", A], ["probe", A],
                     ["export", os.path.join("/tmp", "kpctl-nobody-never.json")]):
            r = self.refused(*args, user="nobody")
            self.assertIn("forbidden", r.stderr, args)
            self.assertIn("403", r.stderr, args)
        self.assertFalse(os.path.exists("/tmp/kpctl-nobody-never.json"))
        self.assertEqual(self.kp.key(a)["state"], "ready", "a refused disable changes nothing")

    # --- export and import -----------------------------------------------------------------

    def test_export_writes_the_state_atomically_without_secrets_and_import_takes_it(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.rotate(a, b)
        path = os.path.join(self.tmp, "state.json")
        with open(path, "w") as f:
            f.write("an older export")
        os.chmod(path, 0o644)

        out = self.ok("export", path)
        self.assertRegex(out, rf"exported 2 keys and \d+ events? to {re.escape(path)}")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.tmp), ["state.json"], "no temporary file left behind")
        with open(path) as f:
            text = f.read()
        self.assertEqual(find_leaks(self.kp.secrets, text, "the export"), [])
        doc = json.loads(text)
        self.assertEqual((doc["format"], doc["version"]), ("keypool-state", 1))
        exported = {k["id"]: k for k in doc["keys"]}
        self.assertEqual(exported[key_id(a)]["state"], "cooling")

        out = self.ok("export", "-")
        self.assertEqual(json.loads(out)["format"], "keypool-state", "export - writes to stdout")

        # A fresh daemon with the same keys takes the export: a is cooling there too.
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": POOL, "model": MODEL, "keys": [a, b]}], settings={"recovery_time": 900})
        self.assertEqual(self.kp.key(a)["state"], "ready")
        out = self.ok("import", path)
        m = re.fullmatch(r"imported (\d+), ignored (\d+)\n", out)
        self.assertIsNotNone(m, out)
        self.assertEqual(int(m.group(1)), 2, out)
        k = self.kp.key(a)
        self.assertEqual((k["state"], k["reason"]), ("cooling", "rate_limited"), k)
        doc = json.loads(self.ok("--json", "import", path))
        self.assertEqual(doc["imported"], 2)

    def test_import_of_a_bad_file_fails(self):
        a = fake_secret()
        self.start(a)
        bad = os.path.join(self.tmp, "bad.json")
        with open(bad, "w") as f:
            f.write("{not json")
        r = self.refused("import", bad)
        self.assertIn("is not JSON", r.stderr)
        r = self.refused("import", os.path.join(self.tmp, "missing.json"))
        self.assertIn("No such file or directory", r.stderr)
        foreign = os.path.join(self.tmp, "foreign.json")
        with open(foreign, "w") as f:
            json.dump({"format": "something-else", "keys": []}, f)
        r = self.refused("import", foreign)
        self.assertIn("400", r.stderr, "the daemon refuses a foreign document")
        self.assertEqual(self.kp.key(a)["state"], "ready")

    # --- watch -----------------------------------------------------------------------------

    def watch(self, *args, seconds=2.5, sig=signal.SIGINT, stdout=subprocess.PIPE, env=None):
        p = subprocess.Popen([KEYPOOLCTL, "-s", self.kp.socket_path, "watch", *args],
                             stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             env=ctl_env(**(env or {})))
        time.sleep(seconds)
        p.send_signal(sig)
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            self.fail(f"keypoolctl watch did not stop within 10 s of {sig.name}")
        return p.returncode, out, err

    def test_watch_prints_a_frame_per_second_until_interrupted(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.rotate(a, b)
        rc, out, err = self.watch()
        out, err = out.decode(), err.decode()
        self.kp.seen.append(("the output of keypoolctl watch", out + err))
        self.assertEqual(rc, 0, f"watch must exit 0 on SIGINT: {err}")
        self.assertNotIn("\033", out, "no clear or colour codes when stdout is not a terminal")
        frames = out.split(f"keypool on {self.kp.socket_path}, every 1s, ")[1:]
        self.assertGreaterEqual(len(frames), 2, f"at least two frames in 2.5 s:\n{out}")
        for frame in frames:
            rows = rows_by_key(frame)
            self.assertEqual(rows[key_id(a)]["STATE"], "cooling", frame)
            self.assertEqual(rows[key_id(b)]["STATE"], "ready", frame)

        rc, out, _ = self.watch("--interval", "0.5", seconds=2.2, sig=signal.SIGTERM)
        self.assertEqual(rc, 0, "SIGTERM ends watch cleanly too")
        self.assertGreaterEqual(out.decode().count("every 0.5s"), 3, out)

        rc, out, _ = self.watch("--json", seconds=1.5)
        self.assertEqual(rc, 0)
        docs = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        self.assertGreaterEqual(len(docs), 2, "watch --json prints one document per line")
        self.assertIn(key_id(a), [k["id"] for k in docs[0]["pools"][0]["keys"]])

    # --- colour ----------------------------------------------------------------------------

    def on_terminal(self, *args, env=None, seconds=None):
        """Runs keypoolctl with stdout on a pseudo-terminal: (exit status, output)."""
        master, slave = pty.openpty()
        p = subprocess.Popen([KEYPOOLCTL, "-s", self.kp.socket_path, *args], stdout=slave,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             env=ctl_env(**(env or {"TERM": "xterm"})))
        os.close(slave)
        out = bytearray()
        end = time.monotonic() + (seconds if seconds is not None else 30)
        try:
            while time.monotonic() < end:
                r, _, _ = select.select([master], [], [], 0.1)
                if r:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:
                        break           # EIO: the child closed the terminal
                    if not chunk:
                        break
                    out += chunk
                elif p.poll() is not None:
                    break
            if seconds is not None:
                p.send_signal(signal.SIGINT)
            p.wait(10)
            while select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            os.close(master)
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stderr.close()
        text = out.decode(errors="replace")
        self.kp.seen.append((f"keypoolctl {' '.join(args)} on a terminal", text))
        return p.returncode, text

    def test_states_are_coloured_on_a_terminal_unless_no_color(self):
        a, b = fake_secret(), fake_secret()
        self.start(a, b)
        self.rotate(a, b)
        self.ok("disable", key_id(b))
        rc, out = self.on_terminal("keys")
        self.assertEqual(rc, 0)
        self.assertIn("\033[33mcooling\033[0m", out)
        self.assertIn("\033[31mdisabled\033[0m", out)
        self.ok("enable", key_id(b))
        rc, out = self.on_terminal("keys")
        self.assertIn("\033[32mready\033[0m", out)

        rc, out = self.on_terminal("keys", env={"TERM": "xterm", "NO_COLOR": "1"})
        self.assertEqual(rc, 0)
        self.assertNotIn("\033", out)
        self.assertIn("cooling", out)

        rc, out = self.on_terminal("watch", seconds=1.5)
        self.assertEqual(rc, 0, "watch on a terminal exits 0 on SIGINT")
        self.assertIn("\033[H\033[2J", out, "a live view clears the screen for each frame")
        self.assertIn("\033[33mcooling\033[0m", out)


if __name__ == "__main__":
    unittest.main(verbosity=2)

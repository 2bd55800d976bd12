#!/usr/bin/env python3
"""The command line: --version, --help, --check-config and its diagnostics, bad options,
missing files, and where the socket is made."""

import os
import re
import shutil
import stat
import subprocess
import tempfile
import unittest

from kptest import KEYPOOLD, KeypoolTestCase, fake_secret, find_leaks, render_config


def run(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([KEYPOOLD, *args], capture_output=True, text=True, timeout=30,
                          env=e, stdin=subprocess.DEVNULL)


class CliTest(KeypoolTestCase):

    def setUp(self):
        if not os.access(KEYPOOLD, os.X_OK):
            self.fail(f"keypoold is not built: {KEYPOOLD}")
        self.dir = tempfile.mkdtemp(prefix="kpcli-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, text, name="keypool.conf"):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def valid_config(self, **pool_overrides):
        pool = {"name": "GLM45", "provider": "sim", "model": "z-ai/glm-4.5",
                "keys": [fake_secret(), fake_secret()]}
        pool.update(pool_overrides)
        return render_config({
            "socket": os.path.join(self.dir, "keypool.sock"),
            "workers": 2,
            "recovery_time": 900,
            "providers": [{"name": "sim", "base_url": "http://127.0.0.1:9/api/v1"}],
            "pools": [pool],
        })

    def assert_problem_on_line(self, stderr, path, line):
        name = re.escape(os.path.basename(path))
        self.assertRegex(stderr, rf"(?m){name}:{line}: \S",
                         f"no problem reported for line {line}")

    def test_version(self):
        r = run("--version")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("keypoold 0.1.0", r.stdout)

    def test_help(self):
        r = run("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--check-config", r.stdout)
        self.assertIn("-c", r.stdout)

    def test_unknown_option_exits_2_with_usage_on_stderr(self):
        r = run("--no-such-option")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--check-config", r.stderr, "usage goes to stderr")
        self.assertEqual(r.stdout, "")

    def test_check_config_accepts_a_valid_config(self):
        path = self.write(self.valid_config())
        r = run("--check-config", "-c", path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "keypool.sock")),
                         "--check-config must not start serving")

    def test_check_config_reports_every_problem_with_its_line(self):
        key = fake_secret()
        text = "\n".join([
            f'socket = "{self.dir}/keypool.sock";',                                   # 1
            'workers = "two";',                                                        # 2
            "recovery_time = 900;",                                                    # 3
            'providers = ( { name = "sim"; base_url = "http://127.0.0.1:9/api/v1"; } );',  # 4
            "pools = (",                                                               # 5
            f'  {{ name = "A"; provider = "sim"; model = "m/a"; keys = [ "{key}" ]; }},',  # 6
            f'  {{ name = "B"; provider = "nosuch"; model = "m/b"; keys = [ "{key}x" ]; }},',  # 7
            '  { name = "C"; provider = "sim"; model = "m/c"; keys = [ ]; }',         # 8
            ");", ""])
        path = self.write(text)
        r = run("--check-config", "-c", path)
        self.assertEqual(r.returncode, 1, r.stderr)
        for line in (2, 7, 8):
            self.assert_problem_on_line(r.stderr, path, line)
        self.assertEqual(find_leaks([key, key + "x"], r.stdout + r.stderr, "output"), [])

    def test_check_config_reports_a_syntax_error_with_its_line(self):
        text = self.valid_config().replace("workers = 2;", "workers = = 2;")
        line = text.splitlines().index("workers = = 2;") + 1
        path = self.write(text)
        r = run("--check-config", "-c", path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assert_problem_on_line(r.stderr, path, line)

    def test_unset_env_key_names_the_pool_and_the_key_position(self):
        path = self.write(self.valid_config(
            name="KIMI", keys=[fake_secret(), "env:KEYPOOL_TEST_UNSET_VAR_X"]))
        env = {k: v for k, v in os.environ.items() if k != "KEYPOOL_TEST_UNSET_VAR_X"}
        r = subprocess.run([KEYPOOLD, "--check-config", "-c", path], capture_output=True,
                           text=True, timeout=30, env=env)
        self.assertEqual(r.returncode, 1, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if "KIMI" in ln]
        self.assertTrue(lines, f"no message names pool KIMI: {r.stderr!r}")
        # The position: the second key (2 counting from one, 1 from zero).
        self.assertTrue(any(re.search(r"\b[12]\b", ln.split(": ", 1)[-1]) for ln in lines),
                        f"no message gives the key's position: {lines!r}")

    def test_env_key_that_is_set_is_accepted(self):
        path = self.write(self.valid_config(keys=[fake_secret(), "env:KEYPOOL_TEST_KEY_Y"]))
        r = run("--check-config", "-c", path, env={"KEYPOOL_TEST_KEY_Y": fake_secret()})
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_missing_key_file_names_the_pool(self):
        path = self.write(self.valid_config(
            name="QWEN3", keys=[f"file:{self.dir}/no-such-key-file"]))
        r = run("--check-config", "-c", path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("QWEN3", r.stderr)

    def test_a_secret_near_an_error_is_never_printed(self):
        secrets = [fake_secret(), fake_secret(), fake_secret(), fake_secret()]
        text = "\n".join([
            f'socket = "{self.dir}/keypool.sock";',
            'providers = ( { name = "sim"; base_url = "http://127.0.0.1:9/api/v1"; } );',
            "pools = (",
            f'  {{ name = "A"; provider = "nosuch"; model = "m/a"; keys = [ "{secrets[0]}" ]; }},',
            f'  {{ name = "B"; provider = "sim"; keys = [ "{secrets[1]}", "{secrets[1]}" ]; }},',
            f'  {{ name = "A"; provider = "sim"; model = 42; keys = [ "{secrets[2]}" ]; }}',
            ");", ""])
        path = self.write(text)
        r = run("--check-config", "-c", path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertTrue(r.stderr.strip(), "problems must be reported")
        self.assertEqual(find_leaks(secrets, r.stdout + r.stderr, "--check-config output"), [])

        # A syntax error on the very line that holds a secret.
        text = self.valid_config(keys=[secrets[3]]).replace(
            f'"{secrets[3]}"', f'"{secrets[3]}" = "{secrets[3]}"')
        path = self.write(text, "syntax.conf")
        r = run("--check-config", "-c", path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(find_leaks(secrets, r.stdout + r.stderr, "--check-config output"), [])

        # And the daemon itself, refusing to start on it.
        r = run("-c", path)
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(find_leaks(secrets, r.stdout + r.stderr, "keypoold output"), [])

    def test_missing_config_file_fails_with_a_clear_message(self):
        path = os.path.join(self.dir, "does-not-exist.conf")
        for args in (("-c", path), ("--check-config", "-c", path)):
            r = run(*args)
            self.assertNotEqual(r.returncode, 0, args)
            self.assertIn("does-not-exist.conf", r.stderr, f"{args}: {r.stderr!r}")

    def test_daemon_refuses_to_start_on_an_invalid_config(self):
        path = self.write(self.valid_config(provider="nosuch"))
        r = run("-c", path)
        self.assertNotEqual(r.returncode, 0)
        self.assertRegex(r.stderr, r"keypool\.conf:\d+: ")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "keypool.sock")))

    def test_socket_is_made_with_mode_0660_in_a_new_directory(self):
        sim = self.start_sim()
        sock = os.path.join(self.dir, "run", "keypool", "keypool.sock")
        kp = self.start_keypool(sim, pools=[
            {"name": "GLM45", "model": "z-ai/glm-4.5", "keys": [fake_secret()]}],
            socket_path=sock)
        st = os.stat(sock)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660, oct(st.st_mode))
        self.assertEqual(kp.chat("GLM45")[0], 200)


if __name__ == "__main__":
    unittest.main(verbosity=2)

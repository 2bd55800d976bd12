"""test_completion.py — the bash completion of keypoolctl against a running daemon.

Sources completion/keypoolctl in a bare bash (no bash-completion helpers, and with them when the
package is installed), sets COMP_WORDS/COMP_CWORD as bash would, calls the completion function
and checks what it offers: the commands, the daemon's pool names and key ids.
"""

import os
import shutil
import subprocess
import unittest

from kptest import KeypoolTestCase, SRCDIR, fake_secret, key_id

KEYPOOLCTL = os.environ.get("KEYPOOLCTL") or os.path.join(os.path.dirname(
    os.environ.get("KEYPOOLD", os.path.join(SRCDIR, "keypoold"))), "keypoolctl")
SCRIPT = os.path.abspath(os.path.join(SRCDIR, "completion", "keypoolctl"))
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"


class CompletionTest(KeypoolTestCase):

    @classmethod
    def setUpClass(cls):
        if not shutil.which("bash"):
            raise unittest.SkipTest("bash is not installed")

    def setUp(self):
        self.sim = self.start_sim()
        self.a, self.b, self.c = fake_secret(), fake_secret(), fake_secret()
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": "GLM45", "model": "z-ai/glm-4.5", "keys": [self.a, self.b]},
            {"name": "KIMI", "model": "moonshotai/kimi-k2", "keys": [self.c]}])

    def complete(self, line, helpers=False):
        """What the completion offers for line (the word under the cursor is its last one, ''
        when line ends with a space)."""
        words = line.split(" ")
        prelude = f". {BASH_COMPLETION}\n" if helpers else ""
        script = prelude + f""". "$SCRIPT"
COMP_WORDS=({' '.join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}
_keypoolctl keypoolctl "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
        env = dict(os.environ, SCRIPT=SCRIPT,
                   PATH=os.path.dirname(os.path.abspath(KEYPOOLCTL)) + ":" + os.environ["PATH"])
        r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                           text=True, env=env, timeout=60, cwd=self.kp.dir)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotRegex(r.stderr, r"Sanitizer|runtime error")
        return sorted(w for w in r.stdout.split("\n") if w)

    def test_commands(self):
        got = self.complete("keypoolctl ")
        for cmd in ("status", "health", "keys", "history", "disable", "enable", "probe",
                    "export", "import", "watch", "names"):
            self.assertIn(cmd, got)
        self.assertEqual(self.complete("keypoolctl st"), ["status"])
        self.assertEqual(self.complete(f"keypoolctl -s {self.kp.socket_path} he"), ["health"])

    def test_pool_names_from_the_daemon(self):
        s = self.kp.socket_path
        self.assertEqual(self.complete(f"keypoolctl -s {s} keys "), ["GLM45", "KIMI"])
        self.assertEqual(self.complete(f"keypoolctl -s {s} keys G"), ["GLM45"])
        self.assertEqual(self.complete(f"keypoolctl -s {s} history --pool K"), ["KIMI"])

    def test_key_ids_from_the_daemon(self):
        s = self.kp.socket_path
        ids = sorted(key_id(k) for k in (self.a, self.b, self.c))
        self.assertEqual(self.complete(f"keypoolctl -s {s} disable "), ids)
        self.assertEqual(self.complete(f"keypoolctl --socket {s} probe {key_id(self.c)[:6]}"),
                         [i for i in ids if i.startswith(key_id(self.c)[:6])])
        self.assertEqual(self.complete(f"keypoolctl -s {s} history --key "), ids)
        self.assertEqual(self.complete(f"keypoolctl -s {s} names keys KI"), ["KIMI"])

    def test_keypool_socket_variable_is_honoured(self):
        os.environ["KEYPOOL_SOCKET"] = self.kp.socket_path
        self.addCleanup(os.environ.pop, "KEYPOOL_SOCKET")
        self.assertEqual(self.complete("keypoolctl enable "),
                         sorted(key_id(k) for k in (self.a, self.b, self.c)))

    def test_options(self):
        got = self.complete("keypoolctl history --")
        for opt in ("--pool", "--key", "--limit", "--json", "--socket"):
            self.assertIn(opt, got)

    @unittest.skipUnless(os.path.isfile(BASH_COMPLETION), "bash-completion is not installed")
    def test_with_bash_completion_helpers(self):
        s = self.kp.socket_path
        self.assertEqual(self.complete(f"keypoolctl -s {s} keys ", helpers=True), ["GLM45", "KIMI"])
        self.assertEqual(self.complete(f"keypoolctl -s {s} enable ", helpers=True),
                         sorted(key_id(k) for k in (self.a, self.b, self.c)))


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""test_clients.py — the client examples in examples/ against a running daemon and the simulator.

- Python: examples/httpx_python.py makes the openai SDK's requests (POST /v1/chat/completions,
  plain and streamed, SSE read line by line) with httpx over the UNIX socket. It runs under a
  Python that has httpx (this one, else Debian's /usr/bin/python3 with python3-httpx);
  examples/openai_python.py runs too where that Python also has the openai package.
- Node: examples/node/openai_node.mjs with the openai and undici packages from npm, installed
  into a cached directory; skipped (with the reason) when node or the npm registry is not there.
- The curl and keypoolctl one-liners of examples/shell.sh.
"""

import os
import shutil
import subprocess
import tempfile
import unittest

from kptest import SIM_REPLY, KeypoolTestCase, SRCDIR, fake_secret, key_id

EXAMPLES = os.path.abspath(os.path.join(SRCDIR, "examples"))
BUILDDIR = os.path.abspath(os.environ.get("KEYPOOL_BUILDDIR") or SRCDIR)
KEYPOOLCTL = os.environ.get("KEYPOOLCTL") or os.path.join(BUILDDIR, "keypoolctl")
MODEL = "z-ai/glm-4.5"


def python_with(*modules):
    """A python3 that can import every module, or None."""
    for py in (shutil.which("python3"), "/usr/bin/python3"):
        if py and os.path.exists(py) and subprocess.run(
                [py, "-c", "import " + ", ".join(modules)], capture_output=True).returncode == 0:
            return py
    return None


def npm_packages():
    """A node_modules directory with openai and undici (installed once, then reused), or the
    reason there is none."""
    if not (shutil.which("node") and shutil.which("npm")):
        return None, "node and npm are not installed"
    cache = os.environ.get("KEYPOOL_NPM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keypool-tests", "node-openai")
    os.makedirs(cache, exist_ok=True)
    modules = os.path.join(cache, "node_modules")
    if not (os.path.isdir(os.path.join(modules, "openai"))
            and os.path.isdir(os.path.join(modules, "undici"))):
        shutil.copy(os.path.join(EXAMPLES, "node", "package.json"), cache)
        try:
            r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"],
                               cwd=cache, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return None, "npm install openai undici timed out"
        if r.returncode != 0:
            return None, "npm install openai undici failed: " + (r.stderr.strip()[-300:] or "?")
    return modules, None


class ClientsTest(KeypoolTestCase):

    def setUp(self):
        self.sim = self.start_sim()
        self.secret = fake_secret()
        self.kp = self.start_keypool(self.sim, pools=[
            {"name": "GLM45", "model": MODEL, "keys": [self.secret]}])
        self.env = dict(os.environ, KEYPOOL_SOCKET=self.kp.socket_path, KEYPOOL_MODEL=MODEL)

    def run_example(self, cmd, cwd=None, env=None):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                           env=env or self.env, cwd=cwd or self.kp.dir, stdin=subprocess.DEVNULL)
        self.kp.seen.append((" ".join(cmd), r.stdout + r.stderr))
        self.assertEqual(r.returncode, 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def test_python_httpx_plain_and_streamed(self):
        py = python_with("httpx")
        if py is None:
            self.fail("no python3 with httpx: apt-get install python3-httpx (scripts/deps)")
        out = self.run_example([py, os.path.join(EXAMPLES, "httpx_python.py")])
        self.assertIn("plain: " + SIM_REPLY, out)
        self.assertIn(f"served by key {key_id(self.secret)} of pool GLM45", out)
        stream_line = [line for line in out.splitlines() if line.startswith("stream: ")]
        self.assertEqual(len(stream_line), 1, out)
        self.assertTrue(stream_line[0][len("stream: "):].strip(), f"no streamed text:\n{out}")
        self.assertEqual(len(self.sim.requests_with(self.secret)), 2, "one request upstream each")

    def test_python_openai_sdk(self):
        py = python_with("httpx", "openai")
        if py is None:
            self.skipTest("the openai package is not installed (PyPI is not reachable here); "
                          "httpx_python.py makes its requests instead")
        out = self.run_example([py, os.path.join(EXAMPLES, "openai_python.py")])
        self.assertIn(SIM_REPLY, out)

    def test_node_openai_sdk(self):
        modules, why = npm_packages()
        if modules is None:
            self.skipTest(why)
        work = tempfile.mkdtemp(prefix="kpnode-")
        self.addCleanup(shutil.rmtree, work, True)
        # The example resolves its imports from the node_modules next to it.
        shutil.copy(os.path.join(EXAMPLES, "node", "openai_node.mjs"), work)
        os.symlink(modules, os.path.join(work, "node_modules"))
        out = self.run_example(["node", os.path.join(work, "openai_node.mjs")], cwd=work)
        lines = out.strip().splitlines()
        self.assertEqual(lines[0], SIM_REPLY, out)
        self.assertTrue(len(lines) >= 2 and lines[1].strip(), f"no streamed text:\n{out}")

    def test_curl_and_keypoolctl_one_liners(self):
        if not shutil.which("curl"):
            self.fail("curl is not installed (scripts/deps)")
        env = dict(self.env, PATH=os.path.dirname(os.path.abspath(KEYPOOLCTL)) + ":" + os.environ["PATH"])
        out = self.run_example(["sh", os.path.join(EXAMPLES, "shell.sh")], env=env)
        self.assertIn(SIM_REPLY, out)
        self.assertIn("data: [DONE]", out)
        self.assertIn(key_id(self.secret), out)
        self.assertIn("GLM45", out)


if __name__ == "__main__":
    unittest.main(verbosity=2)

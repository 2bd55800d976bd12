"""kptest.py — the harness the integration tests share: the real keypoold against upstream_sim.py.

Owns the plumbing and nothing else: starting the simulator and reading its port, writing a
keypool config into a fresh directory and starting `$KEYPOOLD -c` on it, talking HTTP/1.1 over
the daemon's UNIX socket (whole requests, keep-alive connections, raw bytes for malformed
input), and the checks every test gets for free at teardown: the daemon stops cleanly on SIGTERM
with exit 0, and none of the test's fake secrets appears in its stderr/stdout or in any response
it gave (every response seen through the harness is recorded; /status, /api/key-status and
/health are fetched once more before the stop).

Standard library only; Python 3.11 (Debian 12's python3).

Environment (set by `make check`): KEYPOOLD (the built daemon), KEYPOOL_SRCDIR (the repository
root), PYTHONPATH=<repo>/tests. Run by hand: KEYPOOLD=./keypoold python3 -u tests/integration/X.py
"""

import hashlib
import http.client
import json
import os
import queue
import re
import secrets as _secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SRCDIR = os.environ.get("KEYPOOL_SRCDIR") or os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))
KEYPOOLD = os.environ.get("KEYPOOLD") or os.path.join(SRCDIR, "keypoold")
SIMULATOR = os.path.join(SRCDIR, "tests", "upstream_sim.py")

# How long a condition may take before a test gives up. Generous: sanitizer builds on a loaded
# CI machine are slow, and a deadline is never a statement about speed.
DEADLINE = 10.0
REQUEST_TIMEOUT = 30.0

SIM_REPLY = "Hello from the keypool simulator."


# --- names -------------------------------------------------------------------------------------

def key_id(secret):
    """keypool's name for a key: "kp-" + the first 10 hex digits of SHA-256(secret)."""
    return "kp-" + hashlib.sha256(secret.encode()).hexdigest()[:10]


def masked(secret):
    """keypool's masked form: first 15 chars, "...", last 3 (or "..." + last 3 if short)."""
    if len(secret) >= 24:
        return secret[:15] + "..." + secret[-3:]
    return "..." + secret[-3:]


def fake_secret(tag=""):
    """An obviously fake OpenRouter-looking key, unique per call.

    tag goes right after "sk-or-v1-fake-" and steers the simulator: "invalid-" (401),
    "nocredit-" (402), "limit2-" (becomes "-limit2-": 2 requests per window). The rest is random
    hex so that no two keys share a 12-character window past the masked prefix.
    """
    prefix = "sk-or-v1-fake-" + tag
    return prefix + _secrets.token_hex(32)[: max(24, 73 - len(prefix))]


def leaked_fragments(secret):
    """Pieces of secret whose presence anywhere means a leak.

    The masked form legitimately shows the first 15 and the last 3 characters; any 12
    consecutive characters from the hidden part in between are as good as the secret.
    """
    hidden = secret[15:-3] if len(secret) >= 24 else secret
    if len(hidden) < 12:
        return [secret]
    return [hidden[i:i + 12] for i in range(len(hidden) - 11)]


def find_leaks(secrets, text, where):
    """Descriptions of every secret (by id, never the secret) that text shows."""
    found = []
    for s in secrets:
        for frag in leaked_fragments(s):
            if frag in text:
                found.append(f"a fragment of secret {key_id(s)} appears in {where}")
                break
    return found


# --- waiting -----------------------------------------------------------------------------------

def wait_for(predicate, timeout=DEADLINE, what="a condition", interval=0.05,
             ignore=()):
    """Polls predicate until it returns something truthy and returns that.

    Raises AssertionError naming what was awaited and the last value seen. Exceptions of the
    types in ignore count as "not yet".
    """
    end = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except ignore as e:
            last = e
        if time.monotonic() >= end:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


# --- HTTP over the UNIX socket -----------------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a UNIX stream socket; counts how many times it had to connect."""

    def __init__(self, path, timeout=REQUEST_TIMEOUT):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path
        self.connects = 0

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s
        self.connects += 1


def encode_body(body, headers):
    if body is None:
        return None
    if isinstance(body, (dict, list)):
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        return json.dumps(body).encode()
    if isinstance(body, str):
        return body.encode()
    return body


class KPConnection:
    """One client connection to keypoold, kept alive across requests."""

    def __init__(self, keypool, timeout=REQUEST_TIMEOUT):
        self.kp = keypool
        self.http = UnixHTTPConnection(keypool.socket_path, timeout)

    @property
    def connects(self):
        return self.http.connects

    def request(self, method, path, body=None, headers=None):
        """Sends one request, reads the whole answer: (status, headers lowercased, body)."""
        hdrs = dict(headers or {})
        data = encode_body(body, hdrs)
        self.http.request(method, path, body=data, headers=hdrs)
        resp = self.http.getresponse()
        payload = resp.read()
        h = {}
        for name, value in resp.getheaders():
            name = name.lower()
            h[name] = h[name] + ", " + value if name in h else value
        self.kp.record(method, path, resp.status, h, payload)
        return resp.status, h, payload

    def start(self, method, path, body=None, headers=None):
        """Sends one request and returns the HTTPResponse unread (for streams)."""
        hdrs = dict(headers or {})
        data = encode_body(body, hdrs)
        self.http.request(method, path, body=data, headers=hdrs)
        return self.http.getresponse()

    def close(self):
        self.http.close()


def parse_raw_response(data):
    """(status, headers lowercased, body) of the first response in raw bytes, or None."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not m:
        return None
    h = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        h[name.strip().lower()] = value.strip()
    if "content-length" in h:
        rest = rest[:int(h["content-length"])]
    elif "chunked" in h.get("transfer-encoding", "").lower():
        rest = dechunk(rest)[0]
    return int(m.group(1)), h, rest


def raw_response_complete(data):
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if m:
        return len(rest) >= int(m.group(1))
    if re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        return dechunk(rest)[1]
    return False        # close-delimited: complete at EOF


def dechunk(data):
    """Decodes chunked transfer coding: (body so far, True if the last chunk was seen)."""
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out), False
        size = int(data[pos:eol].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out), True
        start = eol + 2
        if len(data) < start + size + 2:
            out += data[start:start + size]
            return bytes(out), False
        out += data[start:start + size]
        pos = start + size + 2


def sse_events(body):
    """The data payloads of an SSE body, in order (bytes)."""
    events = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                events.append(line[6:])
    return events


# --- the simulator -----------------------------------------------------------------------------

class Simulator:
    """upstream_sim.py in a subprocess on an ephemeral loopback port."""

    def __init__(self, *args, workdir=None):
        if not os.path.exists(SIMULATOR):
            raise AssertionError(f"the upstream simulator is missing: {SIMULATOR}")
        self._own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="kpsim-")
        self.stderr_path = os.path.join(self.dir, "sim.stderr")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", SIMULATOR, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL)
        lines = queue.Queue()

        def drain():
            for line in self.proc.stdout:
                lines.put(line.decode(errors="replace").strip())
            lines.put(None)
        threading.Thread(target=drain, daemon=True).start()

        self.port = None
        end = time.monotonic() + DEADLINE
        while self.port is None:
            try:
                line = lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError("the simulator did not print LISTENING within "
                                     f"{DEADLINE:g}s")
            if line is None:
                self.stop()
                raise AssertionError("the simulator exited before listening:\n" + self.stderr())
            m = re.match(r"LISTENING (\d+)$", line)
            if m:
                self.port = int(m.group(1))
        self.base_url = f"http://127.0.0.1:{self.port}/api/v1"
        self.host = f"127.0.0.1:{self.port}"

    def stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _call(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            hdrs = dict(headers or {})
            data = encode_body(body, hdrs)
            c.request(method, path, body=data, headers=hdrs)
            r = c.getresponse()
            payload = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, payload
        finally:
            c.close()

    def _control(self, method, path, body=None):
        status, _, payload = self._call(method, path, body)
        if status != 200:
            raise AssertionError(f"simulator {method} {path} answered {status}: {payload!r}")
        return json.loads(payload)

    def log(self):
        """Every request the simulator received (control calls excluded), in arrival order."""
        return self._control("GET", "/_sim/log")["requests"]

    def requests_with(self, secret_or_id):
        kid = secret_or_id if secret_or_id.startswith("kp-") else key_id(secret_or_id)
        return [e for e in self.log() if e["key_id"] == kid]

    def reset(self):
        self._control("POST", "/_sim/reset")

    def set_rules(self, rules):
        """rules: {secret or key id: rule or None}; see upstream_sim.py validate_rules."""
        body = {}
        for k, rule in rules.items():
            body[k if k.startswith("kp-") else key_id(k)] = rule
        self._control("POST", "/_sim/keys", body)

    def direct(self, method, path, secret=None, body=None, headers=None):
        """A request straight to the simulator (path below /api/v1), bypassing keypool."""
        hdrs = dict(headers or {})
        if secret is not None:
            hdrs["Authorization"] = "Bearer " + secret
        return self._call(method, "/api/v1" + path, body, hdrs)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the daemon --------------------------------------------------------------------------------

def libconfig_value(v, indent="  "):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        inner = " ".join(f"{k} = {libconfig_value(x, indent)};" for k, x in v.items())
        return "{ " + inner + " }"
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, dict) for x in v) and v:
            return "(\n" + ",\n".join(indent + libconfig_value(x, indent) for x in v) + "\n)"
        return "[ " + ", ".join(libconfig_value(x, indent) for x in v) + " ]"
    raise TypeError(f"cannot write {v!r} as libconfig")


def render_config(settings):
    """A libconfig file from an ordered dict of top-level settings."""
    return "".join(f"{k} = {libconfig_value(v)};\n" for k, v in settings.items())


class Keypool:
    """keypoold on a generated config in a fresh directory, reachable over its UNIX socket.

    pools: [{"name", "model", "keys": [...], "provider" (default "sim")}]; keys are secrets (or
    env:/file:/cred: references, listed in secrets= so the leak checks know them).
    settings: extra top-level settings (workers, recovery_time, client_timeout, ...).
    """

    def __init__(self, sim=None, pools=(), settings=None, providers=None, env_file=None,
                 secrets=(), socket_path=None, config_text=None, env=None, start=True):
        if not os.path.isfile(KEYPOOLD) or not os.access(KEYPOOLD, os.X_OK):
            raise AssertionError(f"keypoold is not built: {KEYPOOLD} (set KEYPOOLD)")
        self.dir = tempfile.mkdtemp(prefix="kptest-")
        self.socket_path = socket_path or os.path.join(self.dir, "keypool.sock")
        self.config_path = os.path.join(self.dir, "keypool.conf")
        self.stderr_path = os.path.join(self.dir, "keypoold.stderr")
        self.stdout_path = os.path.join(self.dir, "keypoold.stdout")
        self.secrets = list(secrets)
        self.seen = []                  # (what, text) of every response seen
        self.proc = None
        self.returncode = None
        self.env = dict(os.environ if env is None else env)

        if env_file is not None:
            with open(os.path.join(self.dir, "orche.env"), "w") as f:
                f.write(env_file)
        if config_text is None:
            cfg = {"socket": self.socket_path, "workers": 1}
            cfg.update(settings or {})
            if providers is None and sim is not None:
                providers = [{"name": "sim", "base_url": sim.base_url}]
            if providers:
                cfg["providers"] = providers
            plist = []
            for p in pools:
                p = dict(p)
                p.setdefault("provider", "sim")
                keys = p["keys"]
                self.secrets += [k for k in keys if not re.match(r"(env|file|cred):", k)]
                plist.append({"name": p["name"], "provider": p["provider"],
                              "model": p["model"], "keys": list(keys)})
            if plist:
                cfg["pools"] = plist
            if env_file is not None:
                cfg["env_file"] = "orche.env"
            config_text = render_config(cfg)
        with open(self.config_path, "w") as f:
            f.write(config_text)
        if start:
            self.start()

    # --- life cycle ---

    def start(self):
        self._err = open(self.stderr_path, "ab")
        self._out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen([KEYPOOLD, "-c", self.config_path], stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err, env=self.env)
        self.returncode = None

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"keypoold exited with status {self.proc.returncode} while starting:\n"
                    + self.stderr())
            try:
                status, _, _ = self.request("GET", "/health", timeout=2)
            except OSError:
                return False
            return status in (200, 503)
        wait_for(up, what="keypoold to answer GET /health on its socket",
                 ignore=(http.client.HTTPException,))

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=15.0):
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"keypoold did not exit within {timeout:g}s; killed it")
        finally:
            self._err.close()
            self._out.close()
        return self.returncode

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Stops the daemon with sig and asserts that it exits 0."""
        if self.proc is None or self.returncode is not None:
            return self.returncode
        self.proc.send_signal(sig)
        rc = self.wait_exit(timeout)
        if rc != 0:
            raise AssertionError(f"keypoold exited with status {rc} after "
                                 f"{signal.Signals(sig).name} (expected 0)")
        return rc

    def stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stdout(self):
        try:
            with open(self.stdout_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- talking to it ---

    def record(self, method, path, status, headers, body):
        text = body.decode(errors="replace")
        hdrs = "\n".join(f"{k}: {v}" for k, v in headers.items())
        self.seen.append((f"the answer to {method} {path} ({status})", hdrs + "\n" + text))

    def conn(self, timeout=REQUEST_TIMEOUT):
        """A keep-alive connection (KPConnection); close it when done."""
        return KPConnection(self, timeout)

    def request(self, method, path, body=None, headers=None, timeout=REQUEST_TIMEOUT):
        """One request on a fresh connection: (status, headers lowercased, body bytes)."""
        c = KPConnection(self, timeout)
        try:
            return c.request(method, path, body, headers)
        finally:
            c.close()

    def get_json(self, path):
        status, _, body = self.request("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path} answered {status}: {body[:500]!r}")
        return json.loads(body)

    def chat(self, model="z-ai/glm-4.5", headers=None, stream=False, conn=None, **extra):
        """POST /v1/chat/completions with a small conversation."""
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        if model is None:
            del body["model"]
        if stream:
            body["stream"] = True
        body.update(extra)
        if conn is not None:
            return conn.request("POST", "/v1/chat/completions", body, headers)
        return self.request("POST", "/v1/chat/completions", body, headers)

    def status(self):
        return self.get_json("/status")

    def key_status(self):
        return self.get_json("/api/key-status")

    def health(self):
        status, _, body = self.request("GET", "/health")
        return status, json.loads(body)

    def keys(self):
        """{key id: key-status entry} over all pools."""
        return {k["id"]: k for p in self.key_status()["pools"] for k in p["keys"]}

    def key(self, secret):
        kid = key_id(secret)
        ks = self.keys()
        if kid not in ks:
            raise AssertionError(f"key {kid} is not in /api/key-status (have {sorted(ks)})")
        return ks[kid]

    def raw(self, data, deadline=DEADLINE, stop_when_complete=True):
        """Writes raw bytes on a new connection and reads until the server closes it, a whole
        response has arrived (stop_when_complete), or deadline passes.

        Returns (bytes received, closed by the server?). Keeps reading while writing, so a
        server that answers early (413, 431) and stops reading does not block us.
        """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.socket_path)
        s.setblocking(False)
        out = memoryview(data)
        got = bytearray()
        closed = False
        end = time.monotonic() + deadline
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                r, w, _ = select.select([s], [s] if out else [], [], left)
                if r:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        closed = True
                        break
                    except BlockingIOError:
                        chunk = None
                    if chunk == b"":
                        closed = True
                        break
                    if chunk:
                        got += chunk
                        if stop_when_complete and raw_response_complete(got):
                            break
                if w and out:
                    try:
                        n = s.send(out[:65536])
                        out = out[n:]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        out = out[:0]   # the server stopped reading; its answer may be queued
        finally:
            s.close()
        if got:
            self.seen.append(("a raw answer", bytes(got).decode(errors="replace")))
        return bytes(got), closed

    # --- the leak check ---

    def leaks(self):
        found = []
        found += find_leaks(self.secrets, self.stderr(), "keypoold's stderr")
        found += find_leaks(self.secrets, self.stdout(), "keypoold's stdout")
        for what, text in self.seen:
            found += find_leaks(self.secrets, text, what)
        return found


# --- the test case base ------------------------------------------------------------------------

class KeypoolTestCase(unittest.TestCase):
    """A TestCase whose keypools and simulators are torn down and checked after each test."""

    maxDiff = None

    def start_sim(self, *args):
        sim = Simulator(*args)
        self.addCleanup(self._finish_sim, sim)
        return sim

    def _finish_sim(self, sim):
        if self._test_failed():
            err = sim.stderr()
            if err.strip():
                sys.stderr.write(f"\n----- simulator stderr ({self.id()}) -----\n{err[-5000:]}")
        sim.stop()

    def start_keypool(self, *args, **kwargs):
        kp = Keypool(*args, start=False, **kwargs)
        self.addCleanup(self._finish_keypool, kp)
        kp.start()
        return kp

    def _test_failed(self):
        # Inside a cleanup, unittest's own success flag reads True again; the result object
        # already holds every failure and error reported for this test (3.11 reports at once).
        result = getattr(getattr(self, "_outcome", None), "result", None)
        if result is None:
            return True
        return any(getattr(t, "test_case", t) is self
                   for t, _ in list(result.failures) + list(result.errors))

    def _finish_keypool(self, kp):
        """Stops kp (exit 0 on SIGTERM), checks for leaked secrets, dumps stderr on failure."""
        problems = []
        try:
            if kp.running():
                # The monitoring answers are where a leak would show: look at them once more.
                for path in ("/status", "/api/key-status", "/health"):
                    try:
                        kp.request("GET", path, timeout=5)
                    except (OSError, http.client.HTTPException) as e:
                        problems.append(f"GET {path} failed at teardown: {e!r}")
            if kp.proc is not None:
                try:
                    kp.stop()
                except AssertionError as e:
                    problems.append(str(e))
            problems += kp.leaks()
            if problems or self._test_failed():
                sys.stderr.write(f"\n----- keypoold stderr ({self.id()}) -----\n")
                sys.stderr.write(self._scrub(kp, kp.stderr()[-20000:]))
                sys.stderr.write("----- end of keypoold stderr -----\n")
        finally:
            kp.cleanup()
        if problems:
            raise AssertionError("; ".join(problems))

    @staticmethod
    def _scrub(kp, text):
        # The dump itself must not become the leak.
        for s in kp.secrets:
            text = text.replace(s, "<secret " + key_id(s) + ">")
        return text

    # --- assertions shared by the files ---

    def assertOpenAIError(self, body, status=None, code=None):
        """body is keypool's own error: {"error":{"message":str,"type":...,"code":...}}."""
        try:
            doc = json.loads(body)
        except ValueError:
            self.fail(f"error body is not JSON: {body[:300]!r}")
        self.assertIsInstance(doc, dict, body)
        err = doc.get("error")
        self.assertIsInstance(err, dict, f"no error object in {body[:300]!r}")
        self.assertIsInstance(err.get("message"), str, body)
        self.assertTrue(err["message"], "empty error message")
        self.assertIn(err.get("type"), ("keypool_error", "invalid_request_error"), body)
        self.assertIn("code", err, body)
        if code is not None:
            self.assertEqual(err["code"], code, body)
        return err

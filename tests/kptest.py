"""kptest.py — the harness the integration tests share: the real keypoold against upstream_sim.py.

Owns the plumbing and nothing else: starting the simulator and reading its port, writing a
keypool config into a fresh directory and starting `$KEYPOOLD -c` on it, talking HTTP/1.1 over
the daemon's UNIX socket (whole requests, keep-alive connections, raw bytes for malformed
input), and the checks every test gets for free at teardown: the daemon stops cleanly on SIGTERM
with exit 0, and none of the test's fake secrets appears in its stderr/stdout, its state file or
any response it gave (every response seen through the harness is recorded; /status,
/api/key-status and /health are fetched once more before the stop).

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


# The provider prefixes keypool shows in a masked key (keyid.c), longest first where one starts
# another.
PROVIDER_PREFIXES = ("sk-ant-api03-", "sk-ant-", "sk-or-v1-", "sk-proj-", "sk-svcacct-", "sk-",
                     "AIza", "gsk_", "xai-", "pplx-", "nvapi-", "hf_", "r8_")


def _mask_parts(secret):
    """(prefix shown, number of last characters shown), or None when only the id is shown."""
    prefix = next((p for p in PROVIDER_PREFIXES if secret.startswith(p)), "")
    rest = len(secret) - len(prefix)
    shown = min(4, rest // 4)
    if rest < 24 + shown:
        shown = rest - 24 if rest > 24 else 0
    return (prefix, shown) if shown > 0 else None


def masked(secret):
    """keypool's masked form: a known provider prefix, "...", at most 4 last characters (never
    more than a quarter of the rest, always 24 or more hidden); else the key's id."""
    parts = _mask_parts(secret)
    if parts is None:
        return key_id(secret)
    prefix, shown = parts
    return prefix + "..." + secret[len(secret) - shown:]


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

    The masked form legitimately shows a provider prefix and a few last characters; any 12
    consecutive characters from the hidden part in between are as good as the secret.
    """
    parts = _mask_parts(secret)
    hidden = secret[len(parts[0]):len(secret) - parts[1]] if parts else secret
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

def terminate(proc, timeout):
    """Stops proc with SIGTERM, or SIGKILL when it is still there after timeout seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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

    def finished_log(self, timeout=DEADLINE):
        """log() once every entry has its end_time: the simulator records it just after the
        last byte went out, so a client can hold the answer a moment before the log shows it."""
        return wait_for(lambda: (lambda log: log if all("end_time" in e for e in log) else None)(
            self.log()), timeout, what="every simulator request to be over")

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
        terminate(self.proc, 5)
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
        # A libconfig array holds scalars only: any group inside makes it a list.
        if any(isinstance(x, dict) for x in v):
            return "(\n" + ",\n".join(indent + libconfig_value(x, indent) for x in v) + "\n)"
        return "[ " + ", ".join(libconfig_value(x, indent) for x in v) + " ]"
    raise TypeError(f"cannot write {v!r} as libconfig")


def render_config(settings):
    """A libconfig file from an ordered dict of top-level settings."""
    return "".join(f"{k} = {libconfig_value(v)};\n" for k, v in settings.items())


class Keypool:
    """keypoold on a generated config in a fresh directory, reachable over its UNIX socket.

    pools: [{"name", "model", "keys": [...], "provider" (default "sim"), any other pool setting
    such as "max_concurrent" or "rpm"}]; keys are secrets (or env:/file:/cred: references,
    listed in secrets= so the leak checks know them) or key groups {"key": secret, "rpm": N, ...}.
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
            if daemon_has_state_file():
                # Never the default /var/lib/keypool/state.json: each test keeps its own.
                cfg["state_file"] = os.path.join(self.dir, "state.json")
            cfg.update(settings or {})
            self.state_file = cfg.get("state_file")
            if providers is None and sim is not None:
                providers = [{"name": "sim", "base_url": sim.base_url}]
            if providers:
                cfg["providers"] = providers
            plist = []
            for p in pools:
                p = dict(p)
                p.setdefault("provider", "sim")
                keys = p["keys"]
                for k in keys:
                    k = k["key"] if isinstance(k, dict) else k
                    if not re.match(r"(env|file|cred):", k):
                        self.secrets.append(k)
                entry = {"name": p["name"], "provider": p["provider"],
                         "model": p["model"], "keys": list(keys)}
                entry.update({k: v for k, v in p.items() if k not in entry})
                plist.append(entry)
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

    def pool(self, name):
        """The pool object of /api/key-status named name (its keys included)."""
        pools = self.key_status()["pools"]
        for p in pools:
            if p["name"] == name:
                return p
        raise AssertionError(f"pool {name} is not in /api/key-status "
                             f"(have {[p['name'] for p in pools]})")

    def key_in(self, pool, secret):
        """secret's key-status entry in one pool (a secret may be in several)."""
        kid = key_id(secret)
        p = self.pool(pool)
        for k in p["keys"]:
            if k["id"] == kid:
                return k
        raise AssertionError(f"key {kid} is not in pool {pool}")

    def process_ids(self):
        """The daemon's pid and its children's (the workers)."""
        pids = [self.pid]
        try:
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{task}/children") as f:
                    pids += [int(x) for x in f.read().split()]
        except OSError:
            pass
        return pids

    def cpu_seconds(self):
        """CPU time (user + system) used so far by the daemon and its workers."""
        total = 0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.process_ids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])      # utime, stime
        return total / tick

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
        state = getattr(self, "state_file", None)
        if state and os.path.isfile(state):
            with open(state, "rb") as f:
                found += find_leaks(self.secrets, f.read().decode(errors="replace"),
                                    "the state file")
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


# === issue 4: systemd and journald helpers ======================================================
# (sd_notify socket, daemons started with extra env/args/wrapper, config rewrites for reloads,
# stopped-worker bookkeeping). Everything below only adds to what is above.

import collections as _collections
import struct as _struct

NotifyMessage = _collections.namedtuple("NotifyMessage", "time pid fields raw")
NotifyMessage.__doc__ = """One sd_notify datagram: arrival time (time.monotonic()), the sender's pid
(from SCM_CREDENTIALS), its KEY=VALUE lines as a dict, and the raw text."""


class NotifySocket:
    """The service manager's side of sd_notify: an AF_UNIX datagram socket that collects every
    datagram sent to it, with the sender's pid.

    Pass .env_value as NOTIFY_SOCKET. abstract=True binds an abstract name ("@…" in the env).
    Waiting is on a condition variable, so a test wakes as soon as the datagram arrives.
    """

    def __init__(self, directory, abstract=False, name="notify.sock"):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            tag = "keypool-test-notify-" + _secrets.token_hex(8)
            self.sock.bind("\0" + tag)
            self.env_value = "@" + tag
            self.path = None
        else:
            self.path = os.path.join(directory, name)
            self.sock.bind(self.path)
            self.env_value = self.path
        self.sock.settimeout(0.1)
        self._msgs = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        creds = socket.CMSG_SPACE(_struct.calcsize("3i"))
        while not self._stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, creds)
            except socket.timeout:
                continue
            except OSError:
                break
            now = time.monotonic()
            pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _struct.unpack("3i", cdata[:_struct.calcsize("3i")])[0]
            text = data.decode(errors="replace")
            fields = {}
            for line in text.split("\n"):
                if "=" in line:
                    k, _, v = line.partition("=")
                    fields[k] = v
            with self._cond:
                self._msgs.append(NotifyMessage(now, pid, fields, text))
                self._cond.notify_all()

    def messages(self, after=0):
        """Every datagram so far (from index after on)."""
        with self._cond:
            return list(self._msgs[after:])

    def mark(self):
        """The index the next datagram will get: pass it as after= to wait for later ones."""
        with self._cond:
            return len(self._msgs)

    def wait(self, predicate, after=0, timeout=DEADLINE, what="a notify datagram"):
        """The (index, message) of the first datagram at index >= after that satisfies
        predicate(message); waits for it up to timeout."""
        end = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self._msgs):
                    if predicate(self._msgs[i]):
                        return i, self._msgs[i]
                    i += 1
                left = end - time.monotonic()
                if left <= 0:
                    seen = [m.raw for m in self._msgs[after:]][-15:]
                    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                         f"datagrams since: {seen!r}")
                self._cond.wait(left)

    def wait_field(self, name, value=None, after=0, timeout=DEADLINE, what=None):
        """Like wait(), for a datagram carrying name (= value, when given)."""
        def match(m):
            return name in m.fields and (value is None or m.fields[name] == value)
        return self.wait(match, after, timeout,
                         what or f"{name}={value if value is not None else '…'}")

    def wait_count(self, name, value, count, after=0, timeout=DEADLINE, what=None):
        """Waits until count datagrams at index >= after carry name=value; returns them."""
        def enough():
            found = [m for m in self.messages(after) if m.fields.get(name) == value]
            return found if len(found) >= count else None
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = enough()
                if found:
                    return found
                left = end - time.monotonic()
                if left <= 0:
                    what = what or f"{count} x {name}={value}"
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what}; datagrams since: "
                        f"{[m.raw for m in self._msgs[after:]][-15:]!r}")
                self._cond.wait(left)

    def with_field(self, name, value=None, after=0):
        return [m for m in self.messages(after)
                if name in m.fields and (value is None or m.fields[name] == value)]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def proc_start_time(pid):
    """The start time of pid (clock ticks since boot), to tell it from a later reuse of the pid;
    None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_state(pid):
    """The one-letter state of pid ("R", "S", "T", "Z", …), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def process_gone(pid, start_time=None):
    """True when pid no longer runs: absent, a zombie, or reused by another process."""
    state = proc_state(pid)
    if state is None or state in ("Z", "X"):
        return True
    return start_time is not None and proc_start_time(pid) != start_time


# Variables through which a service manager talks to a daemon: a test sets the ones it means.
SERVICE_MANAGER_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                       "LISTEN_PID", "LISTEN_FDNAMES", "JOURNAL_STREAM", "INVOCATION_ID")


def daemon_env(**extra):
    """os.environ without the service-manager variables (the tests may themselves run under
    systemd), plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_MANAGER_ENV}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def find_program(*candidates):
    """The first of candidates (absolute paths or names on PATH) that exists, else None."""
    for c in candidates:
        path = c if os.path.isabs(c) else shutil.which(c)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class DaemonKeypool(Keypool):
    """A Keypool whose command line can carry extra arguments (args=, e.g.
    ["--log-target=journal"]) and a wrapper command in front (wrapper=, e.g.
    ["systemd-socket-activate", "-l", PATH]); env= as for Keypool (NOTIFY_SOCKET, WATCHDOG_USEC).

    wait_up=False returns from start() right after the fork (the test waits for READY=1 itself).
    Every worker seen through status() is remembered (pid, start time) so teardown can check
    that none outlives the daemon.
    """

    def __init__(self, *a, args=(), wrapper=(), wait_up=True, **kw):
        self.args = list(args)
        self.wrapper = list(wrapper)
        self.wait_up = wait_up
        self.seen_workers = {}
        self.sim = a[0] if a else kw.get("sim")
        super().__init__(*a, **kw)

    def command(self):
        return [*self.wrapper, KEYPOOLD, "-c", self.config_path, *self.args]

    def start(self):
        self._err = open(self.stderr_path, "ab")
        self._out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err, env=self.env)
        self.returncode = None
        if self.wait_up:
            self.wait_serving()

    def wait_serving(self, timeout=DEADLINE):
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
        wait_for(up, timeout=timeout, what="keypoold to answer GET /health on its socket",
                 ignore=(http.client.HTTPException,))

    def status(self):
        st = super().status()
        for w in st.get("workers", []):
            pid = w.get("pid")
            if pid and pid not in self.seen_workers:
                self.seen_workers[pid] = proc_start_time(pid)
        return st

    def workers(self):
        return self.status()["workers"]

    def rewrite_config(self, pools=(), settings=None, config_text=None):
        """Replaces the config file (for a reload): the same socket, the same simulator.
        New secrets join the leak checks. Returns the new text."""
        if config_text is None:
            s = {"socket": self.socket_path}
            if getattr(self, "state_file", None) is not None:
                s["state_file"] = self.state_file       # not the temporary config's directory
            s.update(settings or {})
            tmp = Keypool(self.sim, pools=pools, settings=s, socket_path=self.socket_path,
                          start=False)
            try:
                with open(tmp.config_path) as f:
                    config_text = f.read()
                self.secrets += [x for x in tmp.secrets if x not in self.secrets]
            finally:
                tmp.cleanup()
        with open(self.config_path + ".new", "w") as f:
            f.write(config_text)
        os.replace(self.config_path + ".new", self.config_path)
        return config_text

    def stderr_events(self, event):
        """The stderr lines of one event kind (" event=KIND ")."""
        return [line for line in self.stderr().splitlines() if f" event={event} " in line + " "]


class SystemdTestCase(KeypoolTestCase):
    """KeypoolTestCase plus the issue-4 tools: start_daemon() (DaemonKeypool), notify_socket(),
    sigstop() with guaranteed SIGCONT, and a teardown check that no worker outlives its daemon."""

    def start_daemon(self, *args, **kwargs):
        kp = DaemonKeypool(*args, start=False, **kwargs)
        self.addCleanup(self._finish_daemon, kp)
        kp.start()
        return kp

    def _finish_daemon(self, kp):
        problems = []
        try:
            self._finish_keypool(kp)
        except AssertionError as e:
            problems.append(str(e))
        for pid, start in kp.seen_workers.items():
            if not process_gone(pid, start):
                # Give the kernel its moment to finish a dying process before calling it a leak.
                try:
                    wait_for(lambda: process_gone(pid, start), timeout=5,
                             what=f"worker {pid} to go")
                except AssertionError:
                    problems.append(f"worker {pid} outlived keypoold")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        if problems:
            raise AssertionError("; ".join(problems))

    def notify_socket(self, abstract=False):
        d = tempfile.mkdtemp(prefix="kpnotify-")
        ns = NotifySocket(d, abstract=abstract)

        def done():
            ns.close()
            shutil.rmtree(d, ignore_errors=True)
        self.addCleanup(done)
        return ns

    def sigstop(self, pid):
        """SIGSTOPs pid; teardown SIGCONTs it (and SIGKILLs it if it is still there, stopped,
        once its daemon is gone)."""
        start = proc_start_time(pid)
        os.kill(pid, signal.SIGSTOP)

        def cont():
            if not process_gone(pid, start):
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
        self.addCleanup(cont)
        return start


# === issue 5: status API, metrics, admin, state and TCP helpers ================================
# (state_file default for every Keypool, RFC 3339 parsing, HTTP over TCP, requests as another
# uid, the scripted scenario the status and metrics tests share). Everything below only adds to
# what is above.

import calendar as _calendar

_STATE_FILE_SUPPORT = None


def daemon_has_state_file():
    """True when $KEYPOOLD knows the state_file setting (issue 5): then every Keypool config gets
    state_file = <its temp dir>/state.json, so no test ever touches /var/lib/keypool. Older
    daemons reject unknown settings, so the setting is only written when the binary has it."""
    global _STATE_FILE_SUPPORT
    if _STATE_FILE_SUPPORT is None:
        try:
            with open(KEYPOOLD, "rb") as f:
                _STATE_FILE_SUPPORT = b"state_file" in f.read()
        except OSError:
            _STATE_FILE_SUPPORT = False
    return _STATE_FILE_SUPPORT



def parse_rfc3339(text):
    """Seconds since the epoch (float) of an RFC 3339 timestamp such as "2026-11-28T10:20:00Z",
    "2026-11-28T10:20:00.123Z" or "…+01:00"; ValueError for anything else."""
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?"
                     r"([Zz]|[+-]\d{2}:\d{2})", text if isinstance(text, str) else "")
    if not m:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    y, mo, d, hh, mi, ss = (int(m.group(i)) for i in range(1, 7))
    t = _calendar.timegm((y, mo, d, hh, mi, ss, 0, 0, 0)) + float(m.group(7) or 0)
    tz = m.group(8)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        t -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return t


def in_threads(n, fn, spacing=0.0):
    """Runs fn(i) for i in range(n) in threads started spacing s apart; their results (an
    exception raised by fn(i) is its result)."""
    results = [None] * n

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:          # reported by the caller
            results[i] = e
    threads = []
    for i in range(n):
        t = threading.Thread(target=run, args=(i,))
        t.start()
        threads.append(t)
        if spacing:
            time.sleep(spacing)
    for t in threads:
        t.join(60)
    return results


def free_tcp_port():
    """A loopback TCP port that was free a moment ago (for http_listen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_request(kp, port, method, path, body=None, headers=None, host="127.0.0.1",
                timeout=REQUEST_TIMEOUT):
    """One request to kp's TCP listener: (status, headers lowercased, body bytes); recorded for
    kp's leak check like every answer on the socket."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = encode_body(body, hdrs)
        c.request(method, path, body=data, headers=hdrs)
        r = c.getresponse()
        payload = r.read()
        h = {}
        for name, value in r.getheaders():
            name = name.lower()
            h[name] = h[name] + ", " + value if name in h else value
        if kp is not None:
            kp.record(method, path + " over TCP", r.status, h, payload)
        return r.status, h, payload
    finally:
        c.close()


# Runs as another user: one HTTP request over a UNIX socket, the answer as JSON on stdout.
_AS_USER_CLIENT = r"""
import http.client, json, socket, sys
path, method, target, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
c = C("localhost", timeout=30)
hdrs = {"Content-Type": "application/json"} if body else {}
c.request(method, target, body=body.encode() if body else None, headers=hdrs)
r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode("utf-8", "replace"),
                  "uid": __import__("os").getuid()}))
"""


def request_as_user(kp, method, path, body=None, user="nobody", group="nogroup"):
    """One request over kp's UNIX socket from a process running as user:group (the tests run as
    root; setpriv drops to the user with no supplementary groups). Returns (status, body bytes).
    The socket must be connectable by that user: see make_socket_public()."""
    setpriv = find_program("/usr/bin/setpriv", "setpriv")
    if setpriv is None:
        raise unittest.SkipTest("setpriv (util-linux) is needed to run a client as another user")
    if os.geteuid() != 0:
        raise unittest.SkipTest("running a client as another user needs root")
    data = json.dumps(body) if isinstance(body, (dict, list)) else (body or "")
    p = subprocess.run([setpriv, f"--reuid={user}", f"--regid={group}", "--clear-groups",
                        sys.executable, "-c", _AS_USER_CLIENT, kp.socket_path, method, path, data],
                       capture_output=True, timeout=REQUEST_TIMEOUT + 10, cwd="/",
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
    if p.returncode != 0:
        raise AssertionError(f"the client as {user} failed ({p.returncode}): "
                             f"{p.stderr.decode(errors='replace')[-2000:]}")
    doc = json.loads(p.stdout)
    if doc["uid"] == 0:
        raise AssertionError(f"the client meant to run as {user} ran as root")
    payload = doc["body"].encode()
    kp.record(method, path + f" as {user}", doc["status"], {}, payload)
    return doc["status"], payload


def make_socket_public(kp):
    """Lets any user reach kp's socket path: the test directory is 0700 (mkdtemp), the socket's
    own mode is the daemon's business (socket_mode)."""
    d = os.path.dirname(kp.socket_path)
    while d.startswith(kp.dir):
        os.chmod(d, os.stat(d).st_mode | 0o755)
        d = os.path.dirname(d)


class StatusScenario:
    """The scripted scenario the issue-5 suites look at afterwards.

    Pools: "alpha" (model ALPHA: keys a, b) and "beta" (model BETA: keys c, d, e; c is an
    "invalid-" key). run() does, in order:
      1. rotate:   a answers 429 with Retry-After 120, the request moves to b (a cools 120 s);
      2. figures:  a request served by b carries OpenAI rate-limit headers (remaining requests
                   42, tokens 9000, resets 6m0s / 1s);
      3. disable:  c answers 401, the request moves on, and c is disabled for auth once
                   keypool's own probe is refused too (waited for);
      4. recover:  d answers 429 with Retry-After 2 and cools, then is ready again (waited for);
      5. transient: one beta request answered 502, returned as is (its X-Keypool-Timeout of
                   3 s ends before the first backoff, 4.5 to 5.5 s, would), which leaves its key
                   (self.transient_key) with a failure in a row.
    retry.max_attempts = 2: a rotation is the second attempt (max_attempts counts every attempt).
    Every key is an obviously fake secret; times are wall-clock seconds (time.time()).
    """

    ALPHA = "z-ai/glm-4.5"
    BETA = "openai/gpt-test"
    FIGURES = {"x-ratelimit-remaining-requests": "42", "x-ratelimit-remaining-tokens": "9000",
               "x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "1s"}

    def __init__(self, tc, settings=None):
        self.tc = tc
        self.a, self.b = fake_secret(), fake_secret()
        self.c, self.d, self.e = fake_secret("invalid-"), fake_secret(), fake_secret()
        self.sim = tc.start_sim()
        s = {"workers": 2, "recovery_time": 900,
             "retry": {"max_attempts": 2, "backoff_initial_ms": 5000, "backoff_max_ms": 10000}}
        s.update(settings or {})
        self.settings = s
        self.started = time.time()
        self.kp = tc.start_keypool(self.sim, pools=[
            {"name": "alpha", "model": self.ALPHA, "keys": [self.a, self.b]},
            {"name": "beta", "model": self.BETA, "keys": [self.c, self.d, self.e]}],
            settings=s)
        self.answers = []               # (status, headers) of every proxied request sent

    def chat(self, model, headers=None, expect=200):
        status, h, body = self.kp.chat(model, headers=headers)
        if status != expect:
            raise AssertionError(f"a chat to {model} answered {status} (expected {expect}): "
                                 f"{body[:300]!r}")
        self.answers.append((status, h))
        return h

    def chat_until_hit(self, model, secret, limit=6):
        """Chats to model until the simulator has seen one more request with secret; returns
        the headers of the answer to the request that did it."""
        before = len(self.sim.requests_with(secret))
        for _ in range(limit):
            h = self.chat(model)
            if len(self.sim.requests_with(secret)) > before:
                return h
        raise AssertionError(f"{limit} requests to {model} and none reached {key_id(secret)}")

    def rotate(self):
        self.sim.set_rules({self.a: {"status": 429, "retry_after": "120"}})
        self.rotated_before = time.time()
        self.rotated = self.chat_until_hit(self.ALPHA, self.a)
        self.rotated_after = time.time()

    def figures(self):
        self.figures_at = time.time()
        h = self.chat(self.ALPHA, headers={"X-Sim-Headers": json.dumps(self.FIGURES)})
        if h.get("x-keypool-key") != key_id(self.b):
            raise AssertionError(f"with a cooling, b must serve alpha: {h}")

    def disable(self):
        self.chat_until_hit(self.BETA, self.c)
        wait_for(lambda: self.kp.key(self.c)["state"] == "disabled",
                 what="key c's 401 to be confirmed by keypool's own probe")

    def recover(self):
        self.sim.set_rules({self.d: {"status": 429, "retry_after": "2", "count": 1}})
        self.chat_until_hit(self.BETA, self.d)
        wait_for(lambda: self.kp.key(self.d)["state"] == "ready",
                 what="key d to be ready again once its 2 s Retry-After has passed")

    def transient(self):
        h = self.chat(self.BETA, headers={"X-Sim-Status": "502", "X-Keypool-Timeout": "3"},
                      expect=502)
        self.transient_key = h.get("x-keypool-key")

    def run(self):
        self.rotate()
        self.figures()
        self.disable()
        self.recover()
        self.transient()
        self.finished = time.time()
        return self


def assert_api_error(tc, body, code=None):
    """body is keypool's own error in the OpenAI shape {"error":{"message","type","code"}}, with
    any non-empty type: 401/403 answers use types such as "authentication_error" or
    "permission_error", which KeypoolTestCase.assertOpenAIError does not list. Returns the
    error object."""
    try:
        doc = json.loads(body)
    except ValueError:
        tc.fail(f"error body is not JSON: {body[:300]!r}")
    err = doc.get("error") if isinstance(doc, dict) else None
    tc.assertIsInstance(err, dict, f"no error object in {body[:300]!r}")
    tc.assertTrue(isinstance(err.get("message"), str) and err["message"], body)
    tc.assertTrue(isinstance(err.get("type"), str) and err["type"], body)
    tc.assertIn("code", err, body)
    if code is not None:
        tc.assertEqual(err["code"], code, body)
    return err


# --- an HTTPS upstream: nginx with a private CA -------------------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
OPENSSL = shutil.which("openssl")

# $ssl_session_reused is "r" for a resumed session; $connection numbers nginx's connections, and
# $connection_requests counts the requests each one carried.
NGINX_LOG_FORMAT = "$connection $connection_requests $ssl_session_reused $server_protocol $status"


def tls_tools_missing():
    """Why an HTTPS upstream cannot be made here (None when it can): for skipTest."""
    if not NGINX:
        return "nginx is not installed (scripts/deps installs nginx-light)"
    if not OPENSSL:
        return "openssl is not installed (scripts/deps installs it)"
    return None


def _openssl(*args, cwd):
    r = subprocess.run([OPENSSL, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{r.stderr.decode(errors='replace')}")


class TestCA:
    """A private certificate authority in directory d: ca.pem trusts what it signs."""

    def __init__(self, d, name="keypool test CA"):
        self.dir = d
        self.cert = os.path.join(d, "ca.pem")
        self.key = os.path.join(d, "ca.key")
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "2",
                 "-subj", "/CN=" + name, cwd=d)

    def issue(self, stem, names=("127.0.0.1", "localhost"), days=2, expired=False):
        """A server certificate and key (stem.pem, stem.key) for names (IPs or DNS names)."""
        key, csr, cert = (os.path.join(self.dir, stem + x) for x in (".key", ".csr", ".pem"))
        ext = os.path.join(self.dir, stem + ".ext")
        alt = ",".join(("IP:" if re.match(r"^[0-9.]+$", n) else "DNS:") + n for n in names)
        with open(ext, "w") as f:
            f.write(f"subjectAltName={alt}\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + names[0], cwd=self.dir)
        # Expired: openssl 3.0 has no -not_after, but a negative validity ends before it began.
        validity = ["-days", "-1" if expired else str(days)]
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 "-CAcreateserial", "-out", cert, "-extfile", ext, *validity, cwd=self.dir)
        return cert, key


class HTTPSUpstream:
    """nginx on an ephemeral loopback port, serving TLS (HTTP/1.1 and HTTP/2) with a certificate
    from a private CA made for it, in front of a Simulator (proxy_pass, unbuffered so streams
    flow). Everything lives in a private temp dir; stop() ends nginx and removes it.

    base_url: https://127.0.0.1:<port>/api/v1 (or host= "localhost"). ca: the TestCA whose ca.pem
    trusts the server. cert_names / expired / untrusted: make the certificate wrong on purpose
    (untrusted: signed by a second CA that ca.pem does not know). keepalive_requests: requests
    per connection before nginx closes it (HTTP/1.1) or sends GOAWAY (HTTP/2).
    """

    def __init__(self, sim, http2=True, keepalive_requests=1000, cert_names=("127.0.0.1", "localhost"),
                 expired=False, untrusted=False, host="127.0.0.1"):
        missing = tls_tools_missing()
        if missing:
            raise unittest.SkipTest(missing)
        self.dir = tempfile.mkdtemp(prefix="kpnginx-")
        self.proc = None
        try:
            self.ca = TestCA(self.dir)
            signer = TestCA(tempfile.mkdtemp(dir=self.dir), "some other CA") if untrusted else self.ca
            self.cert, self.key = signer.issue("server", cert_names, expired=expired)
            self.access_log = os.path.join(self.dir, "access.log")
            self.error_log = os.path.join(self.dir, "error.log")
            self._start(sim, http2, keepalive_requests)
        except BaseException:
            self.stop()
            raise
        self.base_url = f"https://{host}:{self.port}/api/v1"

    def _config(self, sim, http2, keepalive_requests):
        d = self.dir
        return f"""
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format kp '{NGINX_LOG_FORMAT}';
    access_log {self.access_log} kp;
    upstream sim {{ server 127.0.0.1:{sim.port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{self.port} ssl{' http2' if http2 else ''};
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_session_cache shared:kp:1m;
        keepalive_requests {keepalive_requests};
        client_max_body_size 32m;
        # A provider that refuses a request before it has read the body (an early 429).
        location /early/ {{
            add_header Retry-After 7 always;
            default_type application/json;
            return 429 '{{"error":{{"code":429,"message":"Rate limit exceeded"}}}}';
        }}
        # … or answers it at once without reading it.
        location /early200/ {{
            default_type application/json;
            return 200 '{{"id":"x","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"early"}},"finish_reason":"stop"}}]}}';
        }}
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""

    def _start(self, sim, http2, keepalive_requests):
        conf = os.path.join(self.dir, "nginx.conf")
        for attempt in range(5):
            self.port = free_tcp_port()
            with open(conf, "w") as f:
                f.write(self._config(sim, http2, keepalive_requests))
            self._err = open(os.path.join(self.dir, "nginx.stderr"), "ab")
            self.proc = subprocess.Popen([NGINX, "-p", self.dir, "-c", conf], stdin=subprocess.DEVNULL,
                                         stdout=self._err, stderr=self._err)
            end = time.monotonic() + DEADLINE
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                except OSError:
                    time.sleep(0.05)
            self.stop_process()
            # Most likely someone took the port between the probe and nginx's bind: try another.
        raise AssertionError("nginx did not start:\n" + self.stderr())

    def stderr(self):
        text = ""
        for name in ("nginx.stderr", "error.log"):
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    text += f.read().decode(errors="replace")
            except OSError:
                pass
        return text

    def access(self):
        """The access log, one dict per request: connection, requests (on that connection so
        far), reused (TLS session resumed), protocol, status."""
        entries = []
        try:
            with open(self.access_log) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 5:
                        entries.append({"connection": int(parts[0]), "requests": int(parts[1]),
                                        "reused": parts[2] == "r", "protocol": parts[3],
                                        "status": int(parts[4])})
        except FileNotFoundError:
            pass
        return entries

    def stop_process(self):
        if self.proc is not None:
            terminate(self.proc, 10)
            self._err.close()
        self.proc = None

    def stop(self):
        self.stop_process()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_https_upstream(tc, sim, **kwargs):
    """An HTTPSUpstream stopped at the end of TestCase tc (skipped when nginx is missing)."""
    up = HTTPSUpstream(sim, **kwargs)

    def finish():
        if tc._test_failed():
            err = up.stderr()
            if err.strip():
                sys.stderr.write(f"\n----- nginx errors ({tc.id()}) -----\n{err[-5000:]}")
        up.stop()
    tc.addCleanup(finish)
    return up

#!/usr/bin/env python3
"""upstream_sim.py — a stand-in for OpenRouter that keypool's integration tests and demo talk to.

Owns nothing of keypool's: it is the "provider" on the far side of the proxy. It answers the
OpenAI-compatible endpoints the way OpenRouter does (success, SSE streams, 401/402/429 with
OpenRouter's error shape and rate-limit headers), and lets a test decide what each request gets:

  * by the key itself: a key containing "invalid" is unknown (401), "nocredit" has no credits
    (402), "-limitN-" allows N requests per window (429 beyond that);
  * per request, through X-Sim-* headers that keypool forwards upstream untouched
    (X-Sim-Delay-Ms, X-Sim-Drop, X-Sim-Status, X-Sim-Body, X-Sim-Retry-After, X-Sim-Chunks,
    X-Sim-Chunk-Delay-Ms, plus the extras X-Sim-Headers and X-Sim-Stream-Error);
  * per key id, at run time, through the control API under /_sim/ (rules installed with
    POST /_sim/keys).

Every proxied request is recorded (GET /_sim/log) so tests can check which key served what, over
which connection, and whether keypool gave up on it. Keys are never printed or logged: only their
id, "kp-" + the first 10 hex digits of SHA-256(key), exactly as keypool names them.

Details a test may rely on beyond the obvious:
  * X-Sim-Headers: {"name": "value", ...} adds response headers to any answer after the limit
    check (e.g. retry-after-ms, anthropic-ratelimit-*); X-Sim-Stream-Error: CODE ends a stream
    with OpenRouter's mid-stream error event (finish_reason "error", no [DONE]) instead of "stop".
  * X-Sim-Body and a rule's "body" that start with "{" are sent verbatim as the JSON body, so any
    provider's error shape can be produced.
  * A client that hangs up during a delay or a stream is logged with "aborted": true (and status
    0 if nothing was answered yet); a truncated request is neither answered nor logged.
  * Rate-limit windows: the first request after a window ends opens the next one. seq keeps
    counting across POST /_sim/reset. GET /_sim/keys shows the installed rules and their counts.
  * Log entries carry "auth_header" (the header that carried the key: "authorization",
    "x-api-key" or "x-goog-api-key", else null), "auth_headers" (every key-carrying header the
    request had) and, once the answer is over (sent whole, or the client gone), "end_time"
    (absent until then), so [time, end_time] intervals show per-key concurrency.
  * X-Sim-Id: ID makes a completion's "id" ID instead of "gen-sim-<seq>", so two answers can be
    compared byte for byte.
  * Log entries of requests that carry a body (completions and unknown paths) also have
    "raw_body": the body exactly as received, as text (UTF-8, undecodable bytes replaced), when it
    is shorter than 64 KiB; "body" is its parsed form.
  * X-Sim-Stream-Raw: a JSON string, sent verbatim as the body of a 200 text/event-stream answer
    framed by Content-Length and followed by the end of the connection (for stream bodies no well
    behaved provider sends, such as a first event that never ends). After the limit check.
  * X-Sim-Raw: a JSON string sent verbatim as the WHOLE answer (status line, head and body),
    followed by the end of the connection: for answers that break HTTP (closed mid-head, a body
    short of its Content-Length, a status out of range, a flood of headers). Logged status -1.
  * Log entries carry "answer_time" from the moment the status line and headers of the answer
    went out (absent while nothing was answered).
  * Faults for chaos tests, on 200 answers: X-Sim-Reset-After: N ends the connection with a TCP
    reset (SO_LINGER 0) after N stream events (a non-stream answer: after its headers and half its
    body); X-Sim-Stall-After: N sends N stream events (N may be 0: headers only) and then nothing
    until the client hangs up (at most 120 s). Both are logged with "fault".
  * X-Sim-Echo-Auth: 1 (with X-Sim-Status) and a rule's "echo_auth": true append the header that
    carried the key, verbatim, to the error message, as providers quoting the request do.
    X-Sim-Unknown-Model: STATUS (4xx) answers OpenAI's model_not_found error quoting the model
    the request named (X-Sim-Retry-After adds Retry-After to it).
  * A rule (POST /_sim/keys) beyond status/retry_after/body/headers/count/delay_ms may have:
    "stream_error": CODE — the key's stream answers open with an error event as their FIRST
    event and then end (OpenRouter style; "stream_error_style": "anthropic" sends Anthropic's
    "event: error" instead); non-stream requests are answered normally. "drop": true — the
    connection is closed without an answer. "models_status": CODE (and "models_body") — what
    GET <prefix>/models answers for the key (count is not consumed by /models). "status" may be
    left out: the rule then leaves completions alone unless stream_error (implies 200) or drop.

Standard library only; runs on Python 3.11 (Debian 12's python3).

Usage:
  python3 tests/upstream_sim.py [--host 127.0.0.1] [--port 0] [--port-file FILE]
                              [--limit N] [--window S] [--log FILE]

stdout carries exactly one line, "LISTENING <port>"; diagnostics go to stderr.
"""

import argparse
import errno
import hashlib
import http
import json
import math
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers that carry the secret: never recorded anywhere.
SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")

# Exceptions that mean "the client went away"; never worth a traceback.
DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)

LIMIT_IN_KEY = re.compile(r"-limit(\d+)-")

# Bodies below this size are logged verbatim ("raw_body") as well as parsed.
RAW_BODY_LOG_LIMIT = 64 * 1024

CREDITS_MESSAGE = "Insufficient credits. Add more using https://openrouter.ai/credits"

# Messages for X-Sim-Status when no X-Sim-Body is given. The ones a classifier keys on follow
# OpenRouter's wording; anything else falls back to the HTTP reason phrase.
STATUS_MESSAGES = {
    401: "User not found.",
    402: CREDITS_MESSAGE,
    429: "Rate limit exceeded",
    502: "Provider returned error",
    503: "No available provider",
    529: "Overloaded",
}


# Anthropic's error type for a status, for its "event: error" stream events.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def key_id(key):
    """keypool's id for a key: "kp-" + the first 10 hex digits of SHA-256(key)."""
    return "kp-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:10]


def status_message(code):
    if code in STATUS_MESSAGES:
        return STATUS_MESSAGES[code]
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Simulated error"


def error_body(code, message, metadata=None):
    """OpenRouter's error shape. A message that starts with "{" is taken as the whole body."""
    if isinstance(message, str) and message.lstrip().startswith("{"):
        return message.encode("utf-8")
    err = {"code": code, "message": message}
    if metadata is not None:
        err["metadata"] = metadata
    return dumps({"error": err})


def dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def header_int(value, default):
    """An integer steering header; a malformed one is ignored rather than failing the request."""
    if value is None:
        return default
    try:
        return int(value.strip())
    except ValueError:
        return default


class SimState:
    """Everything shared between handler threads, behind one lock.

    The lock is held only for bookkeeping (never across sleeps or socket I/O), so a slow or
    stuck client never stalls the others.
    """

    def __init__(self, default_limit, window, log_path):
        self.lock = threading.Lock()
        self.default_limit = default_limit
        self.window = window
        self.seq = 0                    # monotonic across resets, so ids stay unique
        self.log = []                   # entries in arrival order
        self.windows = {}               # key id -> [window start, requests counted]
        self.rules = {}                 # key id -> rule dict (with "count" left, or None)
        self.log_file = open(log_path, "a", encoding="utf-8") if log_path else None

    # --- request log ---

    def new_entry(self, **fields):
        with self.lock:
            self.seq += 1
            entry = dict(seq=self.seq, time=time.time(), **fields)
            self.log.append(entry)
            return entry

    def update_entry(self, entry, **fields):
        with self.lock:
            entry.update(fields)

    def finish_entry(self, entry):
        """Called once per request when it is over; the --log file gets the final form."""
        with self.lock:
            entry["end_time"] = time.time()
            if self.log_file is None:
                return
            self.log_file.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self.log_file.flush()

    def close(self):
        # Under the lock: a handler thread may still be finishing a request.
        with self.lock:
            if self.log_file is not None:
                self.log_file.close()
                self.log_file = None

    def log_json(self):
        # Serialised under the lock: handler threads mutate entries concurrently.
        with self.lock:
            return dumps({"requests": self.log})

    def reset(self):
        with self.lock:
            self.log = []
            self.windows.clear()
            self.rules.clear()

    # --- per-key rules ---

    def set_rules(self, rules):
        with self.lock:
            for kid, rule in rules.items():
                if rule is None:
                    self.rules.pop(kid, None)
                else:
                    self.rules[kid] = rule

    def rules_json(self):
        with self.lock:
            return dumps(self.rules)

    def take_rule(self, kid):
        """The rule for kid if it has uses left and steers completions, consuming one; else None."""
        with self.lock:
            rule = self.rules.get(kid)
            if rule is None or "status" not in rule:
                return None
            count = rule.get("count")
            if count is not None:
                if count <= 0:
                    return None
                rule["count"] = count - 1
            return dict(rule)

    def peek_rule(self, kid):
        """The rule for kid whatever its count, unconsumed (for /models); else None."""
        with self.lock:
            rule = self.rules.get(kid)
            return dict(rule) if rule is not None else None

    # --- fixed-window request limits ---

    def admit(self, kid, limit, now):
        """Counts a request against kid's window.

        Returns (admitted, remaining, window_end). A window starts at the key's first
        request and lasts --window seconds; the first request after it ends opens the
        next one. Rejected requests are not counted.
        """
        with self.lock:
            w = self.windows.get(kid)
            if w is None or now >= w[0] + self.window:
                w = [now, 0]
                self.windows[kid] = w
            end = w[0] + self.window
            if w[1] >= limit:
                return False, 0, end
            w[1] += 1
            return True, limit - w[1], end


def validate_rules(body):
    """Checks a POST /_sim/keys body; returns (rules, None) or (None, error message)."""
    if not isinstance(body, dict):
        return None, "body must be a JSON object of key id -> rule or null"
    rules = {}
    for kid, rule in body.items():
        if rule is None:
            rules[kid] = None
            continue
        if not isinstance(rule, dict):
            return None, f"{kid}: rule must be an object or null"
        def is_status(v):
            return isinstance(v, int) and not isinstance(v, bool) and 200 <= v <= 599

        clean = {}
        for name in ("stream_error", "models_status"):
            v = rule.get(name)
            if v is not None:
                if not is_status(v):
                    return None, f"{kid}: {name} must be an integer 200..599"
                clean[name] = v
        style = rule.get("stream_error_style")
        if style is not None:
            if style not in ("openrouter", "anthropic"):
                return None, f"{kid}: stream_error_style must be \"openrouter\" or \"anthropic\""
            clean["stream_error_style"] = style
        if rule.get("models_body") is not None:
            b = rule["models_body"]
            clean["models_body"] = b if isinstance(b, str) else json.dumps(b)
        echo = rule.get("echo_auth")
        if echo is not None and not isinstance(echo, bool):
            return None, f"{kid}: echo_auth must be true or false"
        if echo:
            clean["echo_auth"] = True
        drop = rule.get("drop")
        if drop is not None and not isinstance(drop, bool):
            return None, f"{kid}: drop must be true or false"
        if drop:
            clean["drop"] = True
        status = rule.get("status")
        if status is None and ("stream_error" in clean or drop):
            status = 200
        if status is not None:
            if not is_status(status):
                return None, f"{kid}: status must be an integer 200..599"
            clean["status"] = status
        elif "models_status" not in clean:
            return None, f"{kid}: a rule needs status, stream_error, drop or models_status"
        if rule.get("retry_after") is not None:
            clean["retry_after"] = str(rule["retry_after"])
        if rule.get("body") is not None:
            b = rule["body"]
            clean["body"] = b if isinstance(b, str) else json.dumps(b)
        headers = rule.get("headers") or {}
        if not isinstance(headers, dict):
            return None, f"{kid}: headers must be an object"
        clean["headers"] = {str(k): str(v) for k, v in headers.items()}
        count = rule.get("count")
        if count is not None and (not isinstance(count, int) or count < 0):
            return None, f"{kid}: count must be a non-negative integer"
        clean["count"] = count
        delay = rule.get("delay_ms", 0) or 0
        if not isinstance(delay, (int, float)) or delay < 0:
            return None, f"{kid}: delay_ms must be a non-negative number"
        clean["delay_ms"] = delay
        rules[kid] = clean
    return rules, None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keypool-upstream-sim/1"
    # Idle keep-alive connections are closed after this long.
    timeout = 300

    def version_string(self):
        return self.server_version

    # The base class logs every request to stderr; the request log is /_sim/log instead.
    def log_message(self, format, *args):
        pass

    @property
    def state(self):
        return self.server.state

    # --- dispatch ---

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_PATCH(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def dispatch(self):
        self.entry = None           # the request log entry the answer belongs to, if any
        # Read the whole body first, whatever the answer, so keep-alive stays in step.
        raw = self.read_body()
        if raw is None:
            return
        path = self.path.split("?", 1)[0]
        if "/_sim/" in path or path == "/_sim":
            self.control(path[path.find("/_sim"):], raw)
            return
        if self.command == "POST" and path.endswith(
                ("/chat/completions", "/completions", "/embeddings")):
            self.completion(path, raw)
        elif self.command == "GET" and path.endswith("/models"):
            self.models(path)
        else:
            self.other(path, raw)

    def read_body(self):
        """The request body as bytes (Content-Length or chunked); None if there is none to
        answer (malformed framing gets a 400 here, a truncated body just ends the connection)."""
        te = self.headers.get("Transfer-Encoding", "")
        try:
            if "chunked" in te.lower():
                parts = []
                while True:
                    line = self.rfile.readline(65537)
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        # Skip trailers up to the blank line.
                        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline(3)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            if len(raw) < length:
                # The client left halfway through its request: nobody to answer.
                self.close_connection = True
                return None
            return raw
        except ValueError:
            self.close_connection = True
            self.send_json(400, error_body(400, "Malformed request body framing"))
            return None

    # --- answers ---

    def end_headers(self):
        super().end_headers()
        entry = getattr(self, "entry", None)
        if entry is not None and "answer_time" not in entry:
            self.state.update_entry(entry, answer_time=time.time())

    def reset_connection(self, entry):
        """Ends the connection with a TCP reset, the way a crashed middlebox does."""
        self.state.update_entry(entry, fault="reset")
        self.close_connection = True
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   b"\x01\x00\x00\x00\x00\x00\x00\x00")
        # close() would wait for rfile and wfile to let go of the socket: close the descriptor
        # itself, now (detach leaves the socket object unusable, so nothing writes to it later).
        os.close(self.connection.detach())

    def stall(self, entry):
        """Sends nothing more until the client hangs up (bounded)."""
        self.state.update_entry(entry, fault="stall")
        self.close_connection = True
        self.wfile.flush()
        end = time.monotonic() + 120
        while time.monotonic() < end and not self.peer_gone():
            time.sleep(0.05)
        raise ConnectionResetError("the client left a stalled answer")

    def send_json(self, status, body, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def peer_gone(self):
        """True if the client has closed its end (EOF pending on the socket)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- control API ---

    def control(self, path, raw):
        """The /_sim/ endpoints: no key, never recorded in the request log."""
        st = self.state
        ok = dumps({"ok": True})
        route = (self.command, path.rstrip("/"))
        if route == ("GET", "/_sim/health"):
            self.send_json(200, ok)
        elif route == ("GET", "/_sim/log"):
            self.send_json(200, st.log_json())
        elif route == ("POST", "/_sim/reset"):
            st.reset()
            self.send_json(200, ok)
        elif route == ("GET", "/_sim/keys"):
            self.send_json(200, st.rules_json())
        elif route == ("POST", "/_sim/keys"):
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                body = None
            rules, err = validate_rules(body)
            if err:
                self.send_json(400, dumps({"ok": False, "error": err}))
            else:
                st.set_rules(rules)
                self.send_json(200, ok)
        else:
            self.send_json(404, dumps({"ok": False, "error": "no such control endpoint"}))

    # --- provider endpoints ---

    def request_key(self):
        return self.key_and_header()[0]

    def key_and_header(self):
        """(the key, the lowercase name of the header that carried it), or (None, None)."""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
            if key:
                return key, "authorization"
        for name in ("x-api-key", "x-goog-api-key"):
            key = (self.headers.get(name) or "").strip()
            if key:
                return key, name
        return None, None

    def with_echoed_auth(self, message):
        """message followed by the header that carried the key, exactly as received: what a
        provider (or a proxy in front of one) does when it quotes the failed request."""
        _, name = self.key_and_header()
        if name is None:
            return message
        return f"{message} (request header {name}: {self.headers.get(name, '')})"

    def record(self, path, key, body, stream, raw=None):
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            if name in SECRET_HEADERS:
                continue
            headers[name] = headers[name] + ", " + value if name in headers else value
        model = body.get("model") if isinstance(body, dict) else None
        present = sorted({n.lower() for n in self.headers.keys()
                          if n.lower() in SECRET_HEADERS})
        more = {}
        if raw is not None and len(raw) < RAW_BODY_LOG_LIMIT:
            more["raw_body"] = raw.decode("utf-8", "replace")
        self.entry = self.state.new_entry(
            method=self.command, path=self.path,
            key_id=key_id(key) if key else None,
            model=model, stream=stream, status=0, aborted=False,
            peer_port=self.client_address[1], headers=headers, body=body,
            auth_header=self.key_and_header()[1] if key else None, auth_headers=present, **more)
        return self.entry

    def answer(self, entry, status, body, headers=None):
        self.state.update_entry(entry, status=status)
        self.send_json(status, body, headers)

    def key_check(self, key):
        """Checks 1, 3 and 4 of the decision order: (status, body) or None if the key may pass."""
        if key is None:
            return 401, error_body(401, "No auth credentials found")
        if "invalid" in key:
            return 401, error_body(401, "User not found.")
        if "nocredit" in key:
            return 402, error_body(402, CREDITS_MESSAGE,
                                   {"limit_source": "openrouter_credits"})
        return None

    def completion(self, path, raw):
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = None             # still answered, as model null
        stream = isinstance(body, dict) and body.get("stream") is True
        model = body.get("model") if isinstance(body, dict) else None
        key = self.request_key()
        entry = self.record(path, key, body, stream, raw)
        try:
            self.decide(entry, key, model, stream)
        except DISCONNECTS:
            self.close_connection = True
            self.state.update_entry(entry, aborted=True)
        finally:
            self.state.finish_entry(entry)

    def sleep_ms(self, entry, ms):
        """Sleeps, then reports whether the client is still there (marks the entry if not)."""
        if ms > 0:
            time.sleep(ms / 1000.0)
            if self.peer_gone():
                self.close_connection = True
                self.state.update_entry(entry, aborted=True)
                return False
        return True

    def decide(self, entry, key, model, stream):
        """The decision order for a completion; the first match answers."""
        h = self.headers
        st = self.state

        # The delay comes first so that any outcome can be made slow.
        if not self.sleep_ms(entry, header_int(h.get("X-Sim-Delay-Ms"), 0)):
            return

        # 1. No key.
        if key is None:
            self.answer(entry, *self.key_check(key))
            return
        kid = key_id(key)

        # 2. A runtime rule for this key id.
        rule = st.take_rule(kid)
        if rule is not None:
            if not self.sleep_ms(entry, rule.get("delay_ms", 0)):
                return
            if rule.get("drop"):
                # Status stays 0: nothing was answered.
                self.close_connection = True
                return
            extra = dict(rule.get("headers") or {})
            if "retry_after" in rule:
                extra["Retry-After"] = rule["retry_after"]
            status = rule["status"]
            if status == 200 and stream and "stream_error" in rule:
                self.stream(entry, self.generation(entry), model, extra,
                            first_error=(rule["stream_error"],
                                         rule.get("stream_error_style", "openrouter")))
            elif status == 200:
                self.success(entry, model, stream, extra)
            else:
                msg = rule.get("body", status_message(status))
                if rule.get("echo_auth"):
                    msg = self.with_echoed_auth(msg)
                self.answer(entry, status, error_body(status, msg), extra)
            return

        # 3 and 4. Unknown key, no credits.
        verdict = self.key_check(key)
        if verdict is not None:
            self.answer(entry, *verdict)
            return

        # 5. Per-key fixed-window request limit.
        extra = {}
        m = LIMIT_IN_KEY.search(key)
        limit = int(m.group(1)) if m else st.default_limit
        if limit > 0:
            now = time.time()
            admitted, remaining, end = st.admit(kid, limit, now)
            extra["X-RateLimit-Limit"] = str(limit)
            extra["X-RateLimit-Remaining"] = str(remaining)
            if not admitted:
                reset_ms = str(int(end * 1000))
                extra["X-RateLimit-Reset"] = reset_ms
                extra["Retry-After"] = str(max(1, math.ceil(end - now)))
                meta = {"headers": {"X-RateLimit-Limit": str(limit),
                                    "X-RateLimit-Remaining": "0",
                                    "X-RateLimit-Reset": reset_ms}}
                self.answer(entry, 429, error_body(
                    429, f"Rate limit exceeded: limit_rpm/sim/{limit}", meta), extra)
                return

        # Extra response headers for any steered or successful answer (an addition).
        try:
            more = json.loads(h.get("X-Sim-Headers") or "{}")
            if isinstance(more, dict):
                extra.update({str(k): str(v) for k, v in more.items()})
        except ValueError:
            pass

        # 6. Per-request steering.
        if h.get("X-Sim-Drop", "").strip() == "1":
            # Status stays 0: nothing was answered.
            self.close_connection = True
            return
        raw_answer = h.get("X-Sim-Raw")
        if raw_answer is not None:
            # The whole answer, status line and head included, exactly as given; then the end
            # of the connection (an answer cut mid-head, a short body, status 999, ...).
            try:
                text = json.loads(raw_answer)
            except ValueError:
                text = None
            if isinstance(text, str):
                self.close_connection = True
                self.state.update_entry(entry, status=-1)
                self.wfile.write(text.encode("utf-8"))
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        raw_stream = h.get("X-Sim-Stream-Raw")
        if raw_stream is not None:
            try:
                text = json.loads(raw_stream)
            except ValueError:
                text = None
            if isinstance(text, str):
                self.close_connection = True
                self.state.update_entry(entry, status=200)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                for name, value in extra.items():
                    self.send_header(name, value)
                data = text.encode("utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                return
        status = header_int(h.get("X-Sim-Unknown-Model"), None)
        if status is not None and 400 <= status <= 499:
            # OpenAI's answer to a model it does not know: the model, as the caller wrote it.
            if h.get("X-Sim-Retry-After") is not None:
                extra["Retry-After"] = h["X-Sim-Retry-After"]
            self.answer(entry, status, dumps({"error": {
                "message": f"The model `{model}` does not exist or you do not have access to it.",
                "type": "invalid_request_error", "param": None, "code": "model_not_found"}}), extra)
            return
        status = header_int(h.get("X-Sim-Status"), None)
        if status is not None and 200 < status <= 599:
            if h.get("X-Sim-Retry-After") is not None:
                extra["Retry-After"] = h["X-Sim-Retry-After"]
            msg = h.get("X-Sim-Body") or status_message(status)
            if h.get("X-Sim-Echo-Auth", "").strip() == "1":
                msg = self.with_echoed_auth(msg)
            self.answer(entry, status, error_body(status, msg), extra)
            return

        # 7. Success.
        self.success(entry, model, stream, extra)

    def generation(self, entry):
        return self.headers.get("X-Sim-Id") or f"gen-sim-{entry['seq']}"

    def success(self, entry, model, stream, extra):
        gen = self.generation(entry)
        if not stream:
            body = dumps({
                "id": gen, "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0,
                             "message": {"role": "assistant",
                                         "content": "Hello from the keypool simulator."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            })
            reset = header_int(self.headers.get("X-Sim-Reset-After"), None) is not None
            if reset or header_int(self.headers.get("X-Sim-Stall-After"), None) is not None:
                # Headers promising the whole body, then half of it and a reset, or nothing.
                self.state.update_entry(entry, status=200)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not reset:
                    self.stall(entry)
                self.wfile.write(body[:len(body) // 2])
                self.reset_connection(entry)
                return
            self.answer(entry, 200, body, extra)
            return
        self.stream(entry, gen, model, extra)

    def stream(self, entry, gen, model, extra, first_error=None):
        """An SSE answer, one event per HTTP chunk, flushed as it goes.

        first_error: (code, style) makes the first event an error event and ends the stream
        there, the way OpenRouter ("openrouter") or Anthropic ("anthropic") fail a stream
        that has just begun."""
        h = self.headers
        chunks = max(0, header_int(h.get("X-Sim-Chunks"), 5))
        delay = max(0, header_int(h.get("X-Sim-Chunk-Delay-Ms"), 0))
        stream_error = header_int(h.get("X-Sim-Stream-Error"), None)
        reset_after = header_int(h.get("X-Sim-Reset-After"), None)
        stall_after = header_int(h.get("X-Sim-Stall-After"), None)
        # HTTP/1.0 has no chunked coding: send the events raw and end with the connection.
        chunked = self.request_version != "HTTP/1.0"
        if not chunked:
            self.close_connection = True

        self.state.update_entry(entry, status=200)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        for name, value in extra.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

        def send(data):
            # A peer that has gone often lets one more write succeed; look first.
            if self.peer_gone():
                raise ConnectionResetError("client went away")
            if chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            self.wfile.write(data)

        def event(obj):
            send(b"data: " + dumps(obj) + b"\n\n")

        if first_error is not None:
            code, style = first_error
            if style == "anthropic":
                send(b"event: error\ndata: " + dumps({"type": "error", "error": {
                    "type": ANTHROPIC_ERROR_TYPES.get(code, "api_error"),
                    "message": status_message(code)}}) + b"\n\n")
            else:
                event({"id": gen, "object": "chat.completion.chunk", "model": model,
                       "error": {"code": code, "message": status_message(code)},
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]})
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            return

        for i in range(chunks):
            if i == reset_after:
                self.reset_connection(entry)
                return
            if i == stall_after:
                self.stall(entry)
            if i and delay:
                time.sleep(delay / 1000.0)
            event({"id": gen, "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {"content": f"tok{i} "},
                                "finish_reason": None}]})
        if delay and chunks:
            time.sleep(delay / 1000.0)
        if stream_error is not None:
            # OpenRouter's mid-stream failure: HTTP 200 already sent, error in an event.
            event({"id": gen, "object": "chat.completion.chunk", "model": model,
                   "error": {"code": stream_error, "message": status_message(stream_error)},
                   "choices": [{"index": 0, "delta": {"content": ""},
                                "finish_reason": "error"}]})
        else:
            event({"id": gen, "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 10, "completion_tokens": chunks,
                             "total_tokens": 10 + chunks}})
            send(b"data: [DONE]\n\n")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def models(self, path):
        key = self.request_key()
        entry = self.record(path, key, None, False)
        try:
            rule = self.state.peek_rule(key_id(key)) if key else None
            if rule is not None and "models_status" in rule:
                status = rule["models_status"]
                if status == 200:
                    body = rule.get("models_body") or dumps({"data": [{"id": "sim/model"}]})
                    self.answer(entry, 200, body.encode() if isinstance(body, str) else body)
                else:
                    self.answer(entry, status,
                                error_body(status, rule.get("models_body", status_message(status))))
                return
            verdict = self.key_check(key)
            if verdict is not None:
                self.answer(entry, *verdict)
            else:
                self.answer(entry, 200, dumps({"data": [{"id": "sim/model"}]}))
        except DISCONNECTS:
            self.close_connection = True
            self.state.update_entry(entry, aborted=True)
        finally:
            self.state.finish_entry(entry)

    def other(self, path, raw):
        """Anything else is recorded (it may be a routing bug worth seeing) and refused."""
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = None
        entry = self.record(path, self.request_key(), body, False, raw)
        known = path.endswith(("/chat/completions", "/completions", "/embeddings", "/models"))
        status = 405 if known else 404
        try:
            self.answer(entry, status, error_body(status, status_message(status)))
        except DISCONNECTS:
            self.close_connection = True
            self.state.update_entry(entry, aborted=True)
        finally:
            self.state.finish_entry(entry)


class SimServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # A client hanging up is ordinary; anything else is a simulator bug worth a trace.
        exc = sys.exc_info()[1]
        if isinstance(exc, DISCONNECTS) or (isinstance(exc, OSError) and exc.errno in (
                errno.EBADF, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)):
            return
        super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description="OpenRouter-like upstream simulator for keypool tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port number to this file")
    ap.add_argument("--limit", type=int, default=0,
                    help="requests per key per window (0 = unlimited); '-limitN-' in a key overrides")
    ap.add_argument("--window", type=float, default=60.0, help="rate-limit window in seconds")
    ap.add_argument("--log", help="append each finished request entry as a JSON line")
    args = ap.parse_args()
    if args.window <= 0:
        ap.error("--window must be positive")

    try:
        server = SimServer((args.host, args.port), Handler)
    except OSError as e:
        print(f"upstream_sim: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    server.state = SimState(args.limit, args.window, args.log)
    port = server.server_address[1]

    if args.port_file:
        # Written whole and renamed, so a poller never sees a half-written number.
        tmp = f"{args.port_file}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)

    # The stop signals are blocked before any thread starts (threads inherit the mask), so they
    # reach only the main thread's sigwait(), which wakes at once. serve_forever runs beside it:
    # calling shutdown() from the serving thread itself would deadlock.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                               daemon=True)
    serving.start()
    print(f"LISTENING {port}", flush=True)

    signal.sigwait(stop_signals)
    server.shutdown()
    server.server_close()
    server.state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The requests the openai SDK makes, with httpx alone (Debian: python3-httpx), over keypool's
UNIX socket: POST /v1/chat/completions plain, then with "stream": true, reading the server-sent
events as the SDK does. For programs that cannot take the openai package.

    KEYPOOL_SOCKET=/run/keypool/keypool.sock python3 examples/httpx_python.py
"""
import json
import os

import httpx

SOCKET = os.environ.get("KEYPOOL_SOCKET", "/run/keypool/keypool.sock")
MODEL = os.environ.get("KEYPOOL_MODEL", "z-ai/glm-4.5")
# What the SDK sends besides the body (the Authorization is ignored: keypool adds the pool's key).
HEADERS = {"Authorization": "Bearer unused", "Accept": "application/json",
           "User-Agent": "OpenAI/Python (keypool example)", "X-Stainless-Lang": "python"}

with httpx.Client(transport=httpx.HTTPTransport(uds=SOCKET), base_url="http://keypool/v1",
                  headers=HEADERS, timeout=60) as client:
    r = client.post("/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]})
    r.raise_for_status()
    print("plain:", r.json()["choices"][0]["message"]["content"])
    print("served by key", r.headers.get("x-keypool-key"), "of pool", r.headers.get("x-keypool-pool"))

    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
    text = []
    with client.stream("POST", "/chat/completions", json=body,
                       headers={"Accept": "text/event-stream"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                text.append(chunk["choices"][0].get("delta", {}).get("content") or "")
    print("stream:", "".join(text))

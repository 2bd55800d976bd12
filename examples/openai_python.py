#!/usr/bin/env python3
"""The openai package, unchanged, talking to keypool over its UNIX socket.

httpx (which the SDK uses) reaches the socket through its UNIX-socket transport; the host name in
base_url is only what the Host header says. The api_key is required by the SDK but ignored:
keypool puts a key of the pool in its place.

    pip install openai          # or: apt-get install python3-httpx, and see tests/integration/test_clients.py
    KEYPOOL_SOCKET=/run/keypool/keypool.sock python3 examples/openai_python.py
"""
import os

import httpx
import openai

SOCKET = os.environ.get("KEYPOOL_SOCKET", "/run/keypool/keypool.sock")
MODEL = os.environ.get("KEYPOOL_MODEL", "z-ai/glm-4.5")

client = openai.OpenAI(
    base_url="http://keypool/v1",
    api_key="unused",           # keypool adds the pool's key
    http_client=httpx.Client(transport=httpx.HTTPTransport(uds=SOCKET)),
)

reply = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Say hello."}])
print(reply.choices[0].message.content)

stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Say hello, slowly."}], stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

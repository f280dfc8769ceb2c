"""The two ASGI apps `bench_floor.py` runs under uvicorn: a small upstream, and the least a
forwarding hop in Python can be (`hop`): read the request, send it on over a pooled keep-alive
connection with the gateway's own client (`H1ForwardingClient`), relay the answer. No signature,
no session, no idempotency, no metrics: what is left is the server, the event loop and the
client, the part of the gateway's cost no Latitude feature adds.

    FLOOR_UPSTREAM=http://127.0.0.1:PORT uvicorn benchmarks._floor_apps:hop --app-dir .
"""

from __future__ import annotations

import os

from latitude.forwarding_h1 import H1ForwardingClient

# The size of the calendar's answer to a created event.
ANSWER = b'{"id": 1, "title": "standup", "when": "2026-12-02T10:00:00Z", "by": "ada"}' * 3
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"host"})


async def _body(receive) -> bytes:
    parts, more = [], True
    while more:
        message = await receive()
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(parts)


async def _lifespan(receive, send, on_shutdown=None) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def upstream(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await _body(receive)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]
    status = 200 if scope["method"] == "GET" else 201  # GET: the health check
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


class _Hop:
    def __init__(self) -> None:
        self.client: H1ForwardingClient | None = None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.close)
            return
        if self.client is None:
            self.client = H1ForwardingClient(os.environ["FLOOR_UPSTREAM"], pool_size=64)
        body = await _body(receive)
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        answer = await self.client.send(scope["method"], target, headers, body, timeout_s=5.0)
        relayed = [(k, v) for k, v in answer.headers if k not in _HOP_BY_HOP]
        await send({"type": "http.response.start", "status": answer.status, "headers": relayed})
        await send({"type": "http.response.body", "body": answer.body})


hop = _Hop()

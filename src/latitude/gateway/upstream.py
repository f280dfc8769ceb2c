"""`HttpUpstream`: an ASGI app that passes each request to an HTTP app written in any language.

It is what the sidecar (`latitude gateway --upstream URL`) puts behind `RegionGateway`. The
upstream learns what the gateway decided from two headers it can trust (the gateway strips
client-sent copies): `Forwarded` / `X-Forwarded-For` with the real client address, and
`Latitude-Database: replica | primary` saying which database this request must use.
"""

from __future__ import annotations

import aiohttp

from latitude import db
from latitude.forwarding import SKIP_AUTO_HEADERS, raw_url
from latitude.gateway.messages import (
    Receive,
    Scope,
    Send,
    build_forwarded,
    header,
    send_error,
)
from latitude.http_headers import HOP_BY_HOP


class HttpUpstream:
    # An app in another process reads its sessions from the region's store itself: the
    # primary puts a forwarded request's session there for it (gateway/primary.py).
    reads_sessions_from_store = True
    # Its SQL is not fenced (`latitude.db` cannot mark the claim from another process): a run
    # stopped part-way may have committed, and a retry would run it again, so it is never
    # stopped once it has begun (gateway/primary.py, `_within_budget`).
    stoppable = False

    def __init__(self, base_url: str, *, timeout_s: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                auto_decompress=False,
                skip_auto_headers=SKIP_AUTO_HEADERS,
            )
        client_ip = (scope.get("client") or ("unknown",))[0]
        headers = [
            # aiohttp writes values as UTF-8; the edge let through only ASCII or UTF-8.
            (k.decode("latin-1"), v.decode())
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in HOP_BY_HOP
            and k not in (b"forwarded", b"x-forwarded-for")
        ]
        headers += [
            (
                "forwarded",
                build_forwarded(
                    client_ip, scope.get("scheme", "http"), header(scope["headers"], b"host")
                ),
            ),
            ("x-forwarded-for", client_ip),
            ("x-forwarded-proto", scope.get("scheme", "http")),
            ("latitude-database", db.current_route.get()),
        ]
        host = header(scope["headers"], b"host")
        if host:
            headers.append(("x-forwarded-host", host))

        async def body():
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return

        path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        try:
            async with self._session.request(
                scope["method"],
                raw_url(self.base_url, path),
                headers=headers,
                data=body(),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as resp:
                out = [
                    (k, v)
                    for k, v in resp.raw_headers
                    if k.decode("latin-1").lower() not in HOP_BY_HOP
                ]
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, TimeoutError) as exc:
            await send_error(
                scope, send, 502, "The application did not answer", f"{self.base_url}: {exc!r}"
            )

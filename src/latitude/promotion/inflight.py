"""Writes in flight across a promotion: the one that was on its way to the old primary when the
epoch moved is sent again, with its idempotency key, to the new one.

A forwarded write that crosses the moment an epoch goes pending is held by the old primary's
gateway; when the epoch goes active that gateway is no longer primary and refuses it (`Demoted`:
unsigned, nothing ran). Relayed as it was, the client got a 502. The replica instead learns the
epoch the refusal carries (a signed token, verified on its own), follows it, and sends the write
again to the new primary. The key makes that safe whatever the first attempt did: the old
primary's idempotency records are in the database the new primary was promoted from.

When the new primary is this very region (the switchover's target had a write on its way out),
the write is delivered in process to this gateway, exactly as a peer's forwarded write arrives:
verified, claimed by its key, run, signed.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from latitude.forwarding import ForwardedResponse, NoAnswer
from latitude.gateway.deadlines import in_background

# Statuses an old primary may answer a write with because the epoch moved under it: a refusal
# (misdirected, writes paused, its idempotency store gone) or the app failing on its fenced
# database. Nothing of them is relayed once the primary has moved: the key is sent on instead.
MOVED_STATUSES = frozenset({421, 500, 503})


async def primary_moved(gateway, sent_to: str, status: int, token: str | None, verified: bool):
    """True if the write sent to `sent_to` must go again to the new primary: the answer (or the
    region's epoch file) names a newer epoch whose primary is another region, and the answer is
    one a moving primary gives (unsigned, or one of `MOVED_STATUSES`)."""
    gateway.epochs.heard(token)
    if verified and status not in MOVED_STATUSES:
        return False  # an answer to relay, whatever happened since
    await gateway.epochs.follow(gateway)
    return gateway.config.primary.name != sent_to


def way_to_primary(gateway):
    """The `Forwarding` to the current primary: the gateway's pool, or, when this region is the
    primary now, this gateway itself."""
    if gateway.config.is_primary:
        return ThisRegion(gateway)
    return gateway.forwarding


class ThisRegion:
    """Delivers a forwarded write to this region's own gateway, in process (its primary side
    verifies, claims and runs it as it would a peer's)."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        region = gateway.config.region
        self.base_url = (region.internal_url or region.public_url or "http://localhost").rstrip("/")

    async def can_connect(self, timeout_s: float | None = None) -> bool:
        return True

    async def send(
        self, method, path_and_query, headers, body, *, timeout_s, fresh_connection=False
    ) -> ForwardedResponse:
        gw = self.gateway
        url = urlsplit(self.base_url + path_and_query)
        if body is None or isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body or b"")
        else:
            data = b"".join([chunk async for chunk in body])
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.path.encode("latin-1"),
            "query_string": url.query.encode("latin-1"),
            "headers": [(b"host", url.netloc.encode("latin-1")), *headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        status, answer, chunks = 500, [], []
        answered = asyncio.Event()
        given = False

        async def receive() -> dict:
            nonlocal given
            if given:
                await answered.wait()
                return {"type": "http.disconnect"}
            given = True
            return {"type": "http.request", "body": data, "more_body": False}

        async def send(message: dict) -> None:
            nonlocal status, answer
            if message["type"] == "http.response.start":
                status, answer = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    answered.set()

        run = asyncio.ensure_future(gw(scope, receive, send))
        done, _ = await asyncio.wait({run}, timeout=timeout_s)
        if run not in done:
            in_background(run)  # it settles its key when it ends; a retry with the key learns it
            raise NoAnswer(f"no answer from this region's primary side within {timeout_s:.2f} s")
        answered.set()
        run.result()
        return ForwardedResponse(status, [(k.lower(), v) for k, v in answer], b"".join(chunks))

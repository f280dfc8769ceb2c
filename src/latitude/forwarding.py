"""The pooled, pre-warmed client that carries a request from a replica region to the primary.

Connections to the primary are opened at start-up and kept alive, so a forwarded request in
steady state pays one round trip, not TCP and TLS handshakes as well. The client reports how
an attempt failed in the terms the forwarding contract needs: `NotSent` (nothing left this
region: safe to handle locally) versus `NoAnswer` (the request may have been delivered: only a
retry with the same idempotency key is safe).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl


class ForwardingError(Exception):
    """Base of the forwarding client's errors."""


class NotSent(ForwardingError):
    """The primary could not be reached before anything was sent (refused, timed out, TLS)."""


class NoAnswer(ForwardingError):
    """The request may have reached the primary, but no complete answer came back."""


class AnswerTooLarge(ForwardingError):
    """The primary answered, but with more than `max_response_bytes`: it was not read whole.

    The primary has run the request and stored its outcome; a retry would only fetch the same
    answer again, so this is final, not retried."""

    def __init__(self, limit: int):
        super().__init__(f"the primary's answer is larger than {limit} bytes")
        self.limit = limit


# What aiohttp would add on its own to every request: the primary's app must see the client's
# headers, not the library's (Host is the one it must set: the signature covers @authority).
SKIP_AUTO_HEADERS = ("User-Agent", "Content-Type", "Accept", "Accept-Encoding")


def raw_url(base_url: str, path_and_query: str) -> yarl.URL:
    """The URL exactly as given: yarl would otherwise re-encode the path and query (`%7E` to
    `~`, `%2f`, dot segments), and the primary's app and signature must see the client's bytes."""
    return yarl.URL(base_url + path_and_query, encoded=True)


@dataclass
class ForwardedResponse:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lowercased, as ASGI carries them
    body: bytes

    def header(self, name: bytes | str) -> str | None:
        if isinstance(name, str):
            name = name.encode("latin-1")
        name = name.lower()
        return next((v.decode("latin-1") for k, v in self.headers if k == name), None)


class Forwarding(Protocol):
    """What a replica region's gateway needs of its way to the primary: `ForwardingClient`
    over the network, or an in-process fake in the unit tests. Headers are bytes pairs."""

    base_url: str

    async def send(
        self,
        method: str,
        path_and_query: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | bytes | None,
        *,
        timeout_s: float,
        fresh_connection: bool = False,
    ) -> ForwardedResponse:
        """One attempt: an answer of any status, or `NotSent` / `NoAnswer` / `AnswerTooLarge`."""
        ...

    async def can_connect(self, timeout_s: float | None = None) -> bool:
        """Whether the primary accepts a new connection now."""
        ...

    async def warm(self) -> int: ...

    async def keep_full(self) -> None:
        """Keep the pool's connections open while the gateway runs (a task it cancels)."""
        ...

    def pool_info(self) -> dict[str, int | bool]: ...

    async def close(self) -> None: ...


@dataclass
class ForwardingStats:
    """What `pool_info` reports (the gateway's own counters count requests and failures)."""

    warmed: int = 0
    opened: int = 0  # new connections requests opened (the pool had none idle, or a retry's)
    refilled: int = 0  # new connections opened in the background to keep the pool full
    probes: int = 0  # new connections opened by can_connect
    probes_spared: int = 0  # can_connect answered by a recent answer or a shared probe


def counting_connections(on_new) -> aiohttp.TraceConfig:
    """A trace that calls `on_new()` for each new connection a client session opens: what a
    process opens across a link, per purpose, is counted where it happens, not guessed from
    the far side."""
    trace = aiohttp.TraceConfig()

    async def opened(session, context, params) -> None:
        on_new()

    trace.on_connection_create_end.append(opened)
    return trace


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    context = (
        ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    )
    return context


class ForwardingBase:
    """What every client to one primary gateway (`base_url`) shares: its settings, its
    counters and the cheap answer to "is the primary reachable now" (`can_connect`).

    `pooling=False` opens a fresh connection per request, to reproduce what a deployment without
    a warm pool pays.
    """

    def __init__(
        self,
        base_url: str,
        *,
        pool_size: int = 8,
        pooling: bool = True,
        connect_timeout_s: float = 1.0,
        ca_file: str | None = None,
        max_response_bytes: int = 64 * 1024 * 1024,
        proof_of_life_s: float = 0.5,
    ):
        self.base_url = base_url.rstrip("/")
        self.pool_size = pool_size
        self.pooling = pooling
        self.connect_timeout_s = connect_timeout_s
        self.max_response_bytes = max_response_bytes
        self.proof_of_life_s = proof_of_life_s
        self._ssl = ssl_context(ca_file) if self.base_url.startswith("https:") else None
        self.stats = ForwardingStats()
        # Monotonic time of the last proof that the path is up: an answer, or a probe that got in.
        self._alive_at = float("-inf")
        self._probe: asyncio.Future[bool] | None = None

    async def can_connect(self, timeout_s: float | None = None) -> bool:
        """Whether the primary is reachable now.

        An answer received, or a probe that got in, within the last `proof_of_life_s` says so
        without a new connection: callers ask this for every late answer, and under load (many
        requests, each late) one new connection per question was a connection storm across the
        link. Otherwise a brand-new connection is opened (bypassing the pool), one at a time:
        callers asking while it is under way share its outcome. So at most one probe per
        `proof_of_life_s` per process, however many requests are late, and none while answers
        keep coming; a link cut within the last `proof_of_life_s` is seen that much later.
        """
        if time.monotonic() - self._alive_at < self.proof_of_life_s:
            self.stats.probes_spared += 1
            return True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._open_probe(timeout_s))
        else:
            self.stats.probes_spared += 1
        # Shielded: one caller giving up (its request answered or cancelled) must not cancel
        # the probe the others wait on.
        return await asyncio.shield(self._probe)

    async def keep_full(self) -> None:
        """Keep the pool's connections open while the gateway runs (`forwarding_h1`); aiohttp
        keeps its pool its own way, so this client only warms it at start-up."""
        return None

    async def _open_probe(self, timeout_s: float | None) -> bool:
        from urllib.parse import urlsplit

        self.stats.probes += 1
        parts = urlsplit(self.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, port), timeout_s or self.connect_timeout_s
            )
        except (TimeoutError, OSError):
            return False
        writer.close()
        self._alive_at = time.monotonic()
        return True


class ForwardingClient(ForwardingBase):
    """A keep-alive pool to one primary gateway (`base_url`), shared by a process's requests,
    on aiohttp. (`forwarding_h1.H1ForwardingClient` does the same job with less CPU.)"""

    def __init__(self, base_url: str, **settings) -> None:
        super().__init__(base_url, **settings)
        self._session: aiohttp.ClientSession | None = None

    def _new_session(self, *, force_close: bool) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0 if not force_close else 100,
            limit_per_host=0,
            keepalive_timeout=300 if not force_close else None,
            force_close=force_close,
            ssl=self._ssl if self._ssl is not None else False,
            enable_cleanup_closed=True,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            trace_configs=[counting_connections(self._count_opened)],
        )

    def _count_opened(self) -> None:
        self.stats.opened += 1

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session(force_close=not self.pooling)
        return self._session

    async def warm(self) -> int:
        """Open `pool_size` connections now, so the first requests find them ready."""
        if not self.pooling:
            return 0

        async def one() -> bool:
            try:
                async with self.session.get(
                    f"{self.base_url}/_latitude/health",
                    timeout=aiohttp.ClientTimeout(total=5, sock_connect=self.connect_timeout_s),
                ) as resp:
                    await resp.read()
                    return True
            except (TimeoutError, aiohttp.ClientError, OSError):
                return False

        # Concurrent requests force the pool to open that many connections at once.
        results = await asyncio.gather(*(one() for _ in range(self.pool_size)))
        self.stats.warmed = sum(results)
        return self.stats.warmed

    async def send(
        self,
        method: str,
        path_and_query: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | bytes | None,
        *,
        timeout_s: float,
        fresh_connection: bool = False,
    ) -> ForwardedResponse:
        """One attempt. Raises `NotSent` or `NoAnswer`; any HTTP status is a response."""
        session = self.session
        owned: aiohttp.ClientSession | None = None
        if fresh_connection and self.pooling:
            # A retry must not land on a pooled connection that may be the one that stalled.
            owned = session = self._new_session(force_close=True)
        try:
            async with session.request(
                method,
                raw_url(self.base_url, path_and_query),
                # aiohttp takes str headers; the edge let through only ASCII or UTF-8 values.
                headers=[(k.decode("latin-1"), v.decode()) for k, v in headers],
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout_s),
            ) as resp:
                data = await self._read_whole(resp)
                answer = [(k.lower(), v) for k, v in resp.raw_headers]
                self._alive_at = time.monotonic()
                return ForwardedResponse(resp.status, answer, data)
        except aiohttp.ClientConnectorError as exc:
            raise NotSent(f"cannot connect to the primary at {self.base_url}: {exc}") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise NotSent(f"connecting to {self.base_url} timed out") from exc
        except TimeoutError as exc:
            raise NoAnswer(f"no answer from the primary within {timeout_s:.2f} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise NoAnswer(f"the connection to the primary failed mid-request: {exc!r}") from exc
        finally:
            if owned is not None:
                await owned.close()

    async def _read_whole(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole answer, up to `max_response_bytes` (`content.read(n)` returns only what is
        buffered, so an answer larger than one read would be cut short)."""
        limit = self.max_response_bytes
        # A HEAD's Content-Length is that of the GET's body, which does not come.
        announced = None if resp.method == "HEAD" else resp.content_length
        if announced is not None and announced > limit:
            raise AnswerTooLarge(limit)
        data = bytearray()
        async for chunk in resp.content.iter_any():
            data += chunk
            if len(data) > limit:
                raise AnswerTooLarge(limit)
        if announced is not None and len(data) != announced:
            raise NoAnswer(f"the primary's answer ended after {len(data)} of {announced} bytes")
        return bytes(data)

    def pool_info(self) -> dict[str, int | bool]:
        connector = self._session.connector if self._session else None
        idle = sum(len(v) for v in getattr(connector, "_conns", {}).values()) if connector else 0
        return {
            "pooling": self.pooling,
            "idle_connections": idle,
            "warmed": self.stats.warmed,
            "opened": self.stats.opened,
            "probes": self.stats.probes,
            "probes_spared": self.stats.probes_spared,
        }

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

"""The forwarding client on plain asyncio protocols: keep-alive HTTP/1.1 connections to the
primary gateway, answers parsed by `httptools` (the parser uvicorn's server side uses).

It does one job, the one `forwarding.ForwardingClient` does on aiohttp, with a fraction of the
CPU: a forwarded write is one request with bytes headers the gateway built and signed, and one
whole answer read into memory up to a bound. No redirects, cookies, decompression, proxies or
header normalization (the primary's app and the signature must see the bytes as given), so
none of their cost. `benchmarks/bench_gateway.py --forwarding-client` measures both.

The contract is the same: `NotSent` when the connection could not be made (nothing left this
region), `NoAnswer` once anything may have been sent, `AnswerTooLarge` past the bound. A
connection goes back to the idle pool only after a complete answer that allows keep-alive;
anything else (an error, a timeout, a cancelled attempt, a HEAD's answer) closes it, so a
connection in the pool never holds the end of an old answer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from latitude.forwarding import (
    AnswerTooLarge,
    ForwardedResponse,
    ForwardingBase,
    NoAnswer,
    NotSent,
)

__all__ = ["H1ForwardingClient"]

log = logging.getLogger("latitude.forwarding")

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


class _Connection(asyncio.Protocol):
    """One connection to the primary, and the one answer it is reading (a responder: the state
    of one exchange lives here, reset for the next)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used_at = time.monotonic()  # when it last finished an answer (`replenish`)
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[ForwardedResponse] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reset()

    def _reset(self, head_only: bool = False) -> None:
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.headers_done = False
        self.keep_alive = False

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._answer is None:  # bytes nobody asked for: this connection's state is unknown
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(NoAnswer("the primary switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(NoAnswer(f"the primary's answer is not valid HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        if self.headers_done and not self._framed() and not self.head_only:
            self._finish()  # an answer delimited by the end of the connection
            return
        why = f": {exc!r}" if exc else ""
        self._fail(NoAnswer(f"the connection to the primary closed before the answer{why}"))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # ---- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        if self.head_only and self.status >= 200:
            # A HEAD's answer has no body whatever its Content-Length says: whole at its
            # headers, and the connection is not reused (the parser would wait for a body).
            self._finish()
            self.close()
            return
        length = next((v for k, v in self.headers if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            self._fail(AnswerTooLarge(self.limit))

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > self.limit:
            self._fail(AnswerTooLarge(self.limit))

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
            self._reset(self.head_only)
            return
        self.keep_alive = self._parser.should_keep_alive()
        self._finish()

    # ---- one exchange ----------------------------------------------------------------------

    def _framed(self) -> bool:
        return any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    def _finish(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(ForwardedResponse(self.status, self.headers, bytes(self.body)))

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self.close()

    async def exchange(
        self, head: bytes, body: AsyncIterator[bytes] | bytes | None, head_only: bool
    ) -> ForwardedResponse:
        self._reset(head_only)
        self._answer = answer = asyncio.get_running_loop().create_future()
        transport = self.transport
        try:
            if transport.is_closing():  # uvloop raises RuntimeError on a write to it
                raise ConnectionResetError("the connection closed before the request was sent")
            if isinstance(body, bytes | bytearray | memoryview):
                transport.write(head + bytes(body))
            else:
                transport.write(head)
                if body is not None:
                    async for chunk in body:
                        if answer.done() or self.closed or transport.is_closing():
                            break
                        if chunk:
                            transport.write(chunk)
                        if not self._can_write.is_set():
                            await self._can_write.wait()
            return await answer
        finally:
            self._answer = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class H1ForwardingClient(ForwardingBase):
    """A keep-alive pool of HTTP/1.1 connections to one primary gateway (`base_url`), shared
    by a process's requests. The pool keeps every connection that finished an answer; it
    opens a new one only when none is idle (`stats.opened` counts them). TLS when `base_url`
    is https (`ca_file`: a private CA)."""

    def __init__(self, base_url: str, **settings) -> None:
        super().__init__(base_url, **settings)
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the primary's URL must be http(s)://host[:port], not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._authority = parts.netloc.encode("idna")
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = self.max_response_bytes
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(limit),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                ),
                self.connect_timeout_s,
            )
        except TimeoutError as exc:
            raise NotSent(f"connecting to {self.base_url} timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise NotSent(f"cannot connect to the primary at {self.base_url}: {exc}") from exc
        return conn

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the one most surely alive
            # A transport closes before its protocol hears of it (connection_lost comes on a
            # later turn of the loop): such a connection has sent nothing of this request.
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    def _head(self, method: str, path_and_query: str, headers, body) -> bytes:
        lines = [f"{method} {path_and_query} HTTP/1.1".encode("latin-1")]
        has_host = has_length = False
        for name, value in headers:
            lowered = name.lower()
            has_host = has_host or lowered == b"host"
            has_length = has_length or lowered in (b"content-length", b"transfer-encoding")
            if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(name + b": " + value)
        if not has_host:
            lines.append(b"host: " + self._authority)
        if not has_length:
            if isinstance(body, bytes | bytearray | memoryview):
                lines.append(b"content-length: " + str(len(body)).encode())
            elif body is not None:
                raise ValueError("a streamed body needs a Content-Length header")
            elif method not in _NO_BODY_METHODS:
                lines.append(b"content-length: 0")
        return b"\r\n".join(lines) + b"\r\n\r\n"

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
        head = self._head(method, path_and_query, headers, body)
        started = time.monotonic()
        conn = None if fresh_connection or not self.pooling else self._idle_connection()
        if conn is None:
            conn = await self._connect()
            self.stats.opened += 1
        self._busy.add(conn)
        reusable = False
        try:
            left = max(0.001, timeout_s - (time.monotonic() - started))
            try:
                async with asyncio.timeout(left):
                    answer = await conn.exchange(head, body, method == "HEAD")
            except TimeoutError as exc:
                raise NoAnswer(f"no answer from the primary within {timeout_s:.2f} s") from exc
            except OSError as exc:
                raise NoAnswer(
                    f"the connection to the primary failed mid-request: {exc!r}"
                ) from exc
            self._alive_at = time.monotonic()
            reusable = conn.keep_alive and not conn.closed
            return answer
        finally:
            self._busy.discard(conn)
            if reusable and self.pooling:  # a fresh connection that answered is a good one too
                conn.used_at = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()

    async def warm(self) -> int:
        """Open `pool_size` connections now, so the first requests find them ready."""
        if not self.pooling:
            return 0
        opened = await asyncio.gather(
            *(self._checked_connection("opened") for _ in range(self.pool_size))
        )
        ready = [c for c in opened if c is not None]
        self._idle.extend(ready)
        self.stats.warmed = len(ready)
        return self.stats.warmed

    async def keep_full(self, every_s: float = 1.0, most_s: float = 30.0) -> None:
        """`replenish` every `every_s` for as long as the gateway runs (a task it cancels).
        While the primary cannot be reached, less and less often (doubling up to `most_s`), so
        an outage is not met with a connection attempt per pool slot every second; but at once
        (at the next `every_s`) when an answer or a probe proves the path up again, so the pool
        is not left short for the rest of a back-off once the outage is over."""
        wait, failed_at = every_s, None
        while True:
            slept = 0.0
            while slept < wait and (failed_at is None or self._alive_at <= failed_at):
                await asyncio.sleep(every_s)
                slept += every_s
            try:
                await self.replenish()
                wait, failed_at = every_s, None
            except NotSent:
                wait, failed_at = min(wait * 2, most_s), time.monotonic()
            except Exception as exc:  # a bug must not end the keeping, nor stay unseen
                log.warning("keeping the pool to %s full failed: %r", self.base_url, exc)
                wait, failed_at = min(wait * 2, most_s), time.monotonic()

    async def replenish(self, idle_for_s: float = 60.0) -> int:
        """Keep the pool full while no request needs it: a connection the primary closed (its
        restart, a reset link, its keep-alive timeout) is replaced now, in the background,
        instead of by the next write, which would pay a handshake across the ocean for it
        (a second round trip: the talk's "sometimes +200 ms"); a connection idle for
        `idle_for_s` asks the primary's health, so the primary's keep-alive timer (300 s
        under `latitude serve`) never closes it. Returns the connections opened; raises
        `NotSent` if the primary could not be reached (`keep_full` then backs off)."""
        if not self.pooling:
            return 0
        self._idle = [c for c in self._idle if not c.closed and not c.transport.is_closing()]
        now = time.monotonic()
        quiet = [c for c in self._idle if now - c.used_at >= idle_for_s]
        for conn in quiet:
            self._idle.remove(conn)  # no request takes it while it is asked
        kept = await asyncio.gather(*(self._still_alive(c) for c in quiet))
        self._idle.extend(c for c, ok in zip(quiet, kept, strict=True) if ok)
        missing = self.pool_size - len(self._idle) - len(self._busy)
        if missing <= 0:
            return 0
        opened = await asyncio.gather(
            *(self._checked_connection("refilled", raises=True) for _ in range(missing)),
            return_exceptions=True,
        )
        ready = [c for c in opened if isinstance(c, _Connection)]
        self._idle.extend(ready)
        failed = next((c for c in opened if isinstance(c, BaseException)), None)
        if failed is not None and not ready:
            raise failed if isinstance(failed, NotSent) else NotSent(str(failed))
        return len(ready)

    async def _still_alive(self, conn: _Connection) -> bool:
        self._busy.add(conn)
        try:
            return await self._health(conn)
        finally:
            self._busy.discard(conn)

    async def _checked_connection(self, counter: str, raises: bool = False) -> _Connection | None:
        """A new connection that has answered the primary's health check, or None (`raises`:
        `NotSent` when the primary cannot be reached at all); counted in `stats.<counter>`."""
        try:
            conn = await self._connect()
        except NotSent:
            if raises:
                raise
            return None
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        return conn if await self._health(conn) else None

    async def _health(self, conn: _Connection) -> bool:
        """Ask the primary's health over `conn`; a connection that does not answer well is
        closed."""
        try:
            answer = await asyncio.wait_for(
                conn.exchange(self._head("GET", "/_latitude/health", [], None), None, False), 5
            )
        except (NoAnswer, AnswerTooLarge, TimeoutError, OSError):
            conn.close()
            return False
        except BaseException:  # cut short (the caller's timeout, a shutdown): no socket left
            conn.close()
            raise
        if not conn.keep_alive or conn.closed or answer.status >= 500:
            conn.close()
            return False
        conn.used_at = time.monotonic()
        return True

    def pool_info(self) -> dict[str, int | bool]:
        return {
            "pooling": self.pooling,
            "idle_connections": sum(1 for c in self._idle if not c.closed),
            "warmed": self.stats.warmed,
            "opened": self.stats.opened,
            "refilled": self.stats.refilled,
            "probes": self.stats.probes,
            "probes_spared": self.stats.probes_spared,
        }

    async def close(self) -> None:
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        self._busy.clear()

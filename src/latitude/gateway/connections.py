"""Client connections that have not finished their headers: a bound on time, size and number.

uvicorn times out idle keep-alive connections (`timeout_keep_alive`) and can refuse requests
past a concurrency limit (`limit_concurrency`, counted once a request has arrived), but it
has no header read timeout: a connection that sends half a request line and then nothing stays
open forever, and a few hundred of them (slowloris) hold a worker's sockets. Its httptools
protocol has no bound on a header block's size either. `BoundedHttpToolsProtocol` (what
`latitude serve` runs: httptools costs less CPU per request than h11, benchmarks/README.md)
and `BoundedH11Protocol` are uvicorn's protocols with the bounds `latitude serve` reads from
`[gateway]`:

- `header_timeout_s`: from a connection's first byte of a request (or from its opening) to the
  end of that request's headers; past it the connection gets `408` and is closed.
- `max_headers_bytes` (plus room for the request line): a header block that grows past it gets
  `431`, naming the setting, and the connection is closed.
- `max_pending_headers`: how many connections of one worker process may be waiting for their
  headers at once; a new one past it closes the one that has waited longest (so a flood of
  slow connections cannot lock out a client that sends its request at once).

A keep-alive connection between requests is not waiting for headers until a byte arrives:
pooled connections from other regions stay open for `timeout_keep_alive`.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from latitude.gateway.config import DEFAULT_MAX_PENDING_HEADERS

_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


class _HeaderBounds:
    """The bounds, for a uvicorn protocol that calls `_await_headers` when a request's first
    byte may come and `_headers_done` when its headers are complete.

    The connections waiting for headers sit in one insertion-ordered dict per worker (shared
    through uvicorn's `server_state`), oldest first, each with the loop time it began waiting.
    One timer per worker fires at the oldest one's deadline: a request costs a dict insert and
    a delete, not a timer of its own to arm and cancel."""

    def _init_bounds(self, config, server_state) -> None:
        self.header_timeout_s = float(getattr(config, "header_timeout_s", 10.0))
        self.max_pending_headers = int(
            getattr(config, "max_pending_headers", DEFAULT_MAX_PENDING_HEADERS)
        )
        self.max_headers_bytes = getattr(config, "h11_max_incomplete_event_size", None)
        if not hasattr(server_state, "latitude_pending_headers"):
            server_state.latitude_pending_headers = _PendingHeaders(
                self.loop, self.header_timeout_s
            )
        self._pending: _PendingHeaders = server_state.latitude_pending_headers
        self._waiting_since: float | None = None

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _await_headers(self) -> None:
        self._waiting_since = self.loop.time()
        self._pending.add(self, self.max_pending_headers)

    def _headers_done(self) -> None:
        if self._waiting_since is not None:
            self._waiting_since = None
            self._pending.waiting.pop(self, None)

    def _header_timeout(self) -> None:
        self._headers_done()
        self._close_with(
            b"408 Request Timeout",
            f"The request's headers did not arrive within {self.header_timeout_s:g} s "
            "([gateway] header_timeout_s).",
        )

    def _headers_too_large(self) -> None:
        self._headers_done()
        self._close_with(
            b"431 Request Header Fields Too Large",
            f"The request's headers are over {self.max_headers_bytes:,} bytes "
            "([gateway] max_headers_bytes).",
        )

    def _close_with(self, status: bytes, msg: str) -> None:
        if self.transport.is_closing():
            return
        body = msg.encode()
        answer = _TIMEOUT_ANSWER.replace(b"408 Request Timeout", status)
        self.transport.write(answer % (len(body), body))
        self.transport.close()


class _PendingHeaders:
    """One worker's connections waiting for their headers, oldest first, and the one timer
    that times out the oldest."""

    def __init__(self, loop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.waiting: dict[_HeaderBounds, None] = {}
        self._timer = None

    def add(self, protocol: _HeaderBounds, limit: int) -> None:
        """`protocol` begins waiting; past `limit` waiting, the longest-waiting is closed."""
        self.waiting[protocol] = None
        while len(self.waiting) > limit:
            oldest = next(iter(self.waiting))
            oldest._headers_done()
            oldest.transport.close()
        if self._timer is None:
            self._timer = self.loop.call_at(protocol._waiting_since + self.timeout_s, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        while self.waiting:
            oldest = next(iter(self.waiting))
            due = oldest._waiting_since + self.timeout_s
            if due > now:
                self._timer = self.loop.call_at(due, self._expire)
                return
            oldest._header_timeout()


class BoundedHttpToolsProtocol(_HeaderBounds, HttpToolsProtocol):
    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._init_bounds(config, server_state)
        self._header_bytes = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._waiting_since is None and self._between_requests():
            self._await_headers()
        if self._waiting_since is not None:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still waiting for the end of the headers after all this (the parser called
        # `on_headers_complete` otherwise): a block past the limit is refused.
        if (
            self._waiting_since is not None
            and self.max_headers_bytes
            and self._header_bytes > self.max_headers_bytes
        ):
            self._headers_too_large()

    def on_headers_complete(self) -> None:
        self._headers_done()
        super().on_headers_complete()
        # httptools hands on only the path it parsed out of the target: a target that is not
        # a path (an absolute URL, a #fragment) must stay visible to the gateway's intake
        # check, as the whole target is with h11. The request's task has not run yet.
        if not self.url.startswith(b"/") or b"#" in self.url:
            self.scope["raw_path"] = self.url.partition(b"?")[0]

    def _headers_done(self) -> None:
        super()._headers_done()
        self._header_bytes = 0

    def connection_lost(self, exc) -> None:
        self._headers_done()
        super().connection_lost(exc)


class BoundedH11Protocol(_HeaderBounds, H11Protocol):
    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._init_bounds(config, server_state)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._waiting_since is None and self._between_requests():
            self._await_headers()
        super().data_received(data)
        if self._waiting_since is not None and self.conn.their_state is not h11.IDLE:
            self._headers_done()

    def connection_lost(self, exc) -> None:
        self._headers_done()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # h11 refuses a header block past its buffer limit with a bare 400; say what it was.
        buffered = len(self.conn.trailing_data[0])
        if self.max_headers_bytes and buffered > self.max_headers_bytes:
            self._headers_too_large()
            return
        super().send_400_response(msg)

    def _between_requests(self) -> bool:
        return self.conn.their_state is h11.IDLE and super()._between_requests()

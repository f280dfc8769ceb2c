"""One write per answer: a response's head and its body leave in one send.

uvicorn writes a response's status line and headers to the socket on `http.response.start`
and its body on `http.response.body`: two sends, two TCP segments, two wake-ups of the
reader for every answer of a few hundred bytes (on loopback a send also pays the receiver's
TCP work). nginx sends the two together. `CoalescingTransport` stands between uvicorn's
protocol and the socket's transport and holds back one small write (the head) until the next
write joins it, or until the event loop's next turn, whichever comes first, so an app that
sends its head and body back to back costs one send and nothing waits longer than a turn of
the loop. A large write is never held or copied; everything else is the transport's own.
"""

from __future__ import annotations

import asyncio

# Past this, a held write goes out on its own: joining would copy a large body for no send saved.
HOLD_BYTES = 16 * 1024


class CoalescingTransport:
    """`transport` with its small writes held for the next one (see the module's text)."""

    __slots__ = ("_transport", "_loop", "_held", "_flush_soon")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_soon: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(held) + len(data) <= 4 * HOLD_BYTES:
                self._transport.write(held + data)
                return
            self._transport.write(held)
        elif len(data) <= HOLD_BYTES and not self._transport.is_closing():
            self._held = data
            if self._flush_soon is None:
                self._flush_soon = self._loop.call_soon(self._flush_later)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Send what is held now (the answer is complete, or the connection closes)."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def _flush_later(self) -> None:
        self._flush_soon = None
        self.flush()

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str):
        # is_closing, get_extra_info, pause_reading, set_protocol, ...: the transport's own.
        return getattr(self._transport, name)

"""One send per answer: uvicorn's httptools protocol, as `latitude serve` runs it, on a
transport that records each write (no socket, no process)."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from uvicorn.server import ServerState

from latitude.gateway.coalescing import HOLD_BYTES, CoalescingTransport
from latitude.gateway.connections import BoundedHttpToolsProtocol


class RecordingTransport(asyncio.Transport):
    """What the protocol writes, one entry per write that would be one send."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def answering(*messages, pause_s: float = 0.0):
    async def app(scope, receive, send) -> None:
        await receive()
        for i, message in enumerate(messages):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            await send(message)

    return app


def start(status: int = 200, length: int | None = None) -> dict:
    headers = [(b"content-type", b"text/plain")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def connected(app) -> tuple[BoundedHttpToolsProtocol, RecordingTransport]:
    """`latitude serve`'s protocol for `app`, on a connection just made."""
    config = uvicorn.Config(app, lifespan="off", log_level="error")
    config.load()
    protocol = BoundedHttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def serve(app, requests: bytes, settle_s: float = 0.05) -> RecordingTransport:
    protocol, transport = connected(app)
    protocol.data_received(requests)
    await asyncio.sleep(settle_s)
    protocol.connection_lost(None)
    return transport


GET = b"GET /x HTTP/1.1\r\nhost: example.com\r\n\r\n"


async def test_an_answer_leaves_in_one_send_head_and_body_together():
    sent = await serve(answering(start(length=5), body(b"hello")), GET)
    assert len(sent.writes) == 1
    head, _, rest = sent.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and rest == b"hello"


async def test_pipelined_answers_keep_their_order():
    sent = await serve(answering(start(length=2), body(b"ok")), GET * 3)
    joined = b"".join(sent.writes)
    assert joined.count(b"HTTP/1.1 200 OK") == 3 and joined.endswith(b"\r\n\r\nok")
    assert len(sent.writes) == 3  # one per answer


async def test_answers_without_a_body_are_sent():
    head = b"HEAD /x HTTP/1.1\r\nhost: example.com\r\n\r\n"
    sent = await serve(answering(start(204), body(b"")), GET)
    assert len(sent.writes) == 1 and sent.writes[0].startswith(b"HTTP/1.1 204 No Content")
    sent = await serve(answering(start(length=5), body(b"")), head)
    assert len(sent.writes) == 1 and b"content-length: 5" in sent.writes[0]


async def test_a_streamed_answers_head_is_held_no_longer_than_a_turn_of_the_loop():
    app = answering(start(), body(b"first", more=True), body(b"last"), pause_s=0.2)
    protocol, transport = connected(app)
    protocol.data_received(GET)
    await asyncio.sleep(0.05)
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200 OK")
    await asyncio.sleep(0.5)
    assert b"".join(transport.writes[1:]) == b"5\r\nfirst\r\n4\r\nlast\r\n0\r\n\r\n"
    protocol.connection_lost(None)


async def test_a_large_body_is_written_as_it_is_not_copied_into_the_head():
    big = b"x" * (8 * HOLD_BYTES)
    sent = await serve(answering(start(length=len(big)), body(big)), GET)
    assert len(sent.writes) == 2 and sent.writes[1] == big


async def test_close_sends_what_is_held_first():
    loop = asyncio.get_running_loop()
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, loop)
    transport.write(b"last words")
    assert inner.writes == []
    transport.close()
    assert inner.writes == [b"last words"] and inner.closed


async def test_a_closing_transport_holds_nothing():
    loop = asyncio.get_running_loop()
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, loop)
    inner.closed = True
    with pytest.raises(AssertionError, match="after close"):
        transport.write(b"x")  # passed straight on: the transport's own answer to it stands

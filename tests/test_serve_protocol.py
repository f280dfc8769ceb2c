"""The protocol `latitude serve` runs (`BoundedHttpToolsProtocol`: uvicorn's, with header
bounds) under a real uvicorn on a real socket, driven by clients nobody here wrote: a
WebSocket upgrade hands the connection on, and pipelined keep-alive answers arrive whole and
in order."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from latitude.lab.harness import free_port

websocket = pytest.importorskip("websocket")  # websocket-client
pytest.importorskip("wsproto")  # uvicorn's WebSocket protocol here


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "echo " + (message.get("text") or "")})
    body = ("caf\u00e9 " * (int(scope["path"].strip("/") or "1"))).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server():
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http="latitude.gateway.connections:BoundedHttpToolsProtocol",
        ws="wsproto",
        loop="asyncio",
        log_level="warning",
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not running.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    running.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def test_a_websocket_upgrade_is_handed_on_by_latitude_serves_protocol(server):
    ws = websocket.create_connection(f"ws://127.0.0.1:{server}/chat", timeout=5)
    try:
        for n in range(50):
            ws.send(f"m{n}")
            assert ws.recv() == f"echo m{n}"
    finally:
        ws.close()


def test_keep_alive_answers_arrive_whole_and_in_order(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
        sizes = [1, 5000, 2, 20000]
        s.sendall(b"".join(b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % n for n in sizes))
        data = b""
        expected = [("caf\u00e9 " * n).encode() for n in sizes]
        while data.count(b"HTTP/1.1 200") < len(sizes) or not data.endswith(expected[-1]):
            chunk = s.recv(65536)
            assert chunk, data[-200:]
            data += chunk
        answers = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert [a.split(b"\r\n\r\n", 1)[1] for a in answers] == expected

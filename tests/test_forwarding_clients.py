"""Both forwarding clients (`H1ForwardingClient`, the default, and aiohttp's `ForwardingClient`)
against a real socket server that answers as a primary may, and as a broken one would: the
same answer or the same named error from both, and a connection pool that reuses what it can
and never what it must not."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from latitude.forwarding import AnswerTooLarge, ForwardingClient, NoAnswer, NotSent
from latitude.forwarding_h1 import H1ForwardingClient

CLIENTS = [H1ForwardingClient, ForwardingClient]


class Primary:
    """A socket server whose answer to each request is chosen by its path."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    def drop_all(self) -> None:
        """Close every connection, as a restarting primary does."""
        for writer in self.writers:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head[:-4].split(b"\r\n")
                headers = {}
                for field in fields:
                    name, _, value = field.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                self.requests.append((line, headers, body))
                path = line.split()[1].split(b"?")[0]
                if not await self.answer(path, line.split()[0], writer, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, path: bytes, method: bytes, w: asyncio.StreamWriter, body) -> bool:
        if path == b"/echo":
            w.write(
                b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\nx-a: 1\r\nx-a: 2\r\n" % len(body)
            )
            w.write(b"x-bytes: caf\xc3\xa9\r\n\r\n" + body)
        elif path == b"/chunked":
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            w.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        elif path == b"/until-close":
            w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
            await w.drain()
            return False
        elif path == b"/big":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000)
        elif path == b"/big-chunked":
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            w.write(b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n")
        elif path == b"/cut":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
            await w.drain()
            return False
        elif path == b"/silent":
            await asyncio.sleep(30)
        elif path == b"/garbage":
            w.write(b"SMTP ready\r\n\r\n")
        elif path == b"/continue":
            w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        elif path == b"/head" and method == b"HEAD":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        return True


@pytest.fixture
async def primary():
    server_side = Primary()
    server = await asyncio.start_server(server_side.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server_side.url = f"http://127.0.0.1:{port}"
    yield server_side
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 2)


@pytest.fixture(params=CLIENTS, ids=["h1", "aiohttp"])
async def client(request, primary):
    c = request.param(primary.url, max_response_bytes=4096, connect_timeout_s=1.0)
    yield c
    await c.close()


async def test_an_answer_comes_whole_and_the_connection_is_kept(client, primary):
    for n in range(5):
        body = f"event {n} \u00e9".encode()
        answer = await client.send(
            "POST",
            "/echo?q=%7E",
            [(b"content-length", str(len(body)).encode()), (b"x-title", "caf\u00e9".encode())],
            body,
            timeout_s=2,
        )
        assert (answer.status, answer.body) == (201, body)
        assert [v for k, v in answer.headers if k == b"x-a"] == [b"1", b"2"]
        assert answer.header("x-bytes").encode("latin-1") == "caf\u00e9".encode()
    assert primary.connections == 1 and client.pool_info()["idle_connections"] == 1
    line, headers, _ = primary.requests[-1]
    assert line == b"POST /echo?q=%7E HTTP/1.1"  # the target as given, not re-encoded
    assert headers[b"x-title"] == "caf\u00e9".encode() and headers[b"host"]


async def test_a_streamed_body_is_sent_as_it_comes(client, primary):
    async def chunks():
        for part in (b"one ", b"two ", b"three"):
            yield part

    answer = await client.send("POST", "/echo", [(b"content-length", b"13")], chunks(), timeout_s=2)
    assert answer.body == b"one two three"


async def test_chunked_and_close_delimited_answers(client, primary):
    assert (await client.send("GET", "/chunked", [], None, timeout_s=2)).body == b"hello world"
    assert (await client.send("GET", "/until-close", [], None, timeout_s=2)).body == b"all of it"
    assert (await client.send("GET", "/continue", [], None, timeout_s=2)).body == b"ok"


async def test_a_head_answer_has_no_body(client, primary):
    answer = await client.send("HEAD", "/head", [], None, timeout_s=2)
    assert (answer.status, answer.body, answer.header("content-length")) == (200, b"", "1234")
    assert (await client.send("GET", "/", [], None, timeout_s=2)).body == b"ok"


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_an_answer_over_the_bound_is_refused(client, primary, path):
    with pytest.raises(AnswerTooLarge):
        await client.send("GET", path, [], None, timeout_s=2)
    assert (await client.send("GET", "/", [], None, timeout_s=2)).body == b"ok"


@pytest.mark.parametrize("path", ["/cut", "/garbage"])
async def test_a_broken_answer_is_no_answer_and_its_connection_is_dropped(client, primary, path):
    with pytest.raises(NoAnswer):
        await client.send("GET", path, [], None, timeout_s=2)
    before = primary.connections
    assert (await client.send("GET", "/", [], None, timeout_s=2)).body == b"ok"
    assert primary.connections == before + 1


async def test_a_silent_primary_is_no_answer_at_the_timeout(client, primary):
    with pytest.raises(NoAnswer, match="within 0.30 s"):
        await client.send("POST", "/silent", [], None, timeout_s=0.3)


async def test_nobody_listening_is_not_sent(client):
    from latitude.lab.harness import free_port

    other = type(client)(f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    try:
        with pytest.raises(NotSent):
            await other.send("POST", "/", [], None, timeout_s=1)
        assert not await other.can_connect(0.5)
    finally:
        await other.close()


async def test_a_retry_on_a_fresh_connection_opens_one(client, primary):
    await client.send("GET", "/", [], None, timeout_s=2)
    await client.send("GET", "/", [], None, timeout_s=2, fresh_connection=True)
    assert primary.connections == 2


async def test_warm_opens_the_pool_and_requests_use_it(client, primary):
    assert await client.warm() == 8
    opened = primary.connections
    await asyncio.gather(*(client.send("GET", "/", [], None, timeout_s=2) for _ in range(8)))
    assert primary.connections == opened == 8


async def test_the_h1_client_refuses_a_header_with_a_line_break(primary):
    c = H1ForwardingClient(primary.url)
    try:
        with pytest.raises(ValueError, match="line break"):
            await c.send("GET", "/", [(b"x-evil", b"a\r\nx-injected: 1")], None, timeout_s=1)
        assert primary.requests == []
    finally:
        await c.close()


async def test_a_warm_up_cut_short_leaves_no_connection_open(primary):
    """The gateway bounds the warm-up after a promotion (2 s); what it opened meanwhile must be
    closed then, not left open for the garbage collector."""
    c = H1ForwardingClient(primary.url)
    silent = c._head("GET", "/silent", [], None)
    c._head = lambda *args: silent  # every health check hangs
    made, connect = [], c._connect

    async def tracked():
        made.append(await connect())
        return made[-1]

    c._connect = tracked
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.warm(), 0.3)
    assert primary.connections == len(made) == 8
    assert all(conn.transport.is_closing() for conn in made)
    await c.close()


def test_a_pooled_connection_closed_under_uvloop_is_passed_over():
    """uvloop raises RuntimeError on a write to a closed transport (asyncio drops the bytes), and
    a transport closes a turn of the loop before its protocol hears of it: a pooled connection
    caught in between has sent nothing, so the request goes on a fresh one, and a write to it
    is a connection error (NoAnswer), never a RuntimeError (the lab's fault run saw a 500)."""
    import uvloop

    async def scenario() -> None:
        server_side = Primary()
        server = await asyncio.start_server(server_side.handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = H1ForwardingClient(url, max_response_bytes=4096, connect_timeout_s=1.0)
        try:
            assert (await client.send("GET", "/", [], None, timeout_s=2)).status == 200
            (pooled,) = client._idle
            pooled.transport.close()
            assert not pooled.closed  # connection_lost has not run yet
            answer = await client.send("POST", "/echo", [], b"again", timeout_s=2)
            assert (answer.status, answer.body) == (201, b"again")
            assert client.stats.opened == 2
            with pytest.raises(ConnectionResetError):
                await pooled.exchange(b"GET / HTTP/1.1\r\n\r\n", None, False)
        finally:
            await client.close()
            server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# ---- the pool kept full -------------------------------------------------------------------


async def test_connections_the_primary_closed_are_replaced_before_a_write_needs_them(primary):
    client = H1ForwardingClient(primary.url, pool_size=3, connect_timeout_s=1.0)
    try:
        assert await client.warm() == 3
        primary.drop_all()  # a restart of the primary's gateway
        await asyncio.sleep(0.1)
        assert await client.replenish() == 3
        assert client.pool_info()["idle_connections"] == 3 and primary.connections == 6
        opened = client.pool_info()["opened"]
        for _ in range(3):
            assert (await client.send("POST", "/echo", [], b"x", timeout_s=2)).status == 201
        assert client.pool_info()["opened"] == opened and primary.connections == 6
        assert await client.replenish() == 0  # full: nothing more opened
    finally:
        await client.close()


async def test_a_quiet_connection_is_kept_open_by_asking_the_primarys_health(primary):
    client = H1ForwardingClient(primary.url, pool_size=1, connect_timeout_s=1.0)
    try:
        await client.warm()
        asked = len(primary.requests)
        assert await client.replenish(idle_for_s=60) == 0
        assert len(primary.requests) == asked  # used moments ago: left alone
        assert await client.replenish(idle_for_s=0) == 0
        assert primary.requests[-1][0] == b"GET /_latitude/health HTTP/1.1"
        assert primary.connections == 1 and client.pool_info()["idle_connections"] == 1
    finally:
        await client.close()


async def test_an_unreachable_primary_is_asked_less_and_less_often():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        client = H1ForwardingClient(f"http://127.0.0.1:{port}", pool_size=4)
        with pytest.raises(NotSent):
            await client.replenish()
        rounds = 0
        replenish = client.replenish

        async def counted(**kw):
            nonlocal rounds
            rounds += 1
            return await replenish(**kw)

        client.replenish = counted
        keeper = asyncio.create_task(client.keep_full(every_s=0.01, most_s=0.16))
        await asyncio.sleep(0.6)
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        # Every 10 ms would be ~60 rounds; doubling up to 160 ms leaves 6-7.
        assert 3 <= rounds <= 8, rounds
        await client.close()


async def test_the_pool_is_refilled_as_soon_as_an_answer_proves_the_primary_back():
    primary = Primary()
    server = await asyncio.start_server(primary.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # the primary is down: connections are refused
    client = H1ForwardingClient(f"http://127.0.0.1:{port}", pool_size=3, connect_timeout_s=1.0)
    keeper = asyncio.create_task(client.keep_full(every_s=0.02, most_s=30))
    try:
        await asyncio.sleep(1.5)  # failed rounds: the back-off has grown past a second
        assert client.pool_info()["idle_connections"] == 0
        server = await asyncio.start_server(primary.handle, "127.0.0.1", port, reuse_address=True)
        answer = await client.send("POST", "/echo", [], b"x", timeout_s=2)  # a request's own
        assert answer.status == 201
        await asyncio.sleep(0.3)  # a few of the keeper's ticks, far less than its back-off
        info = client.pool_info()
        assert info["idle_connections"] == 3 and info["refilled"] == 2, info
        assert info["opened"] == 1  # the request's connection; the rest refilled in the background
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await client.close()
        server.close()
        await server.wait_closed()

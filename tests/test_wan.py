"""The WAN emulator against a real echo server on 127.0.0.1: timing, integrity, cut/heal/reset."""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import threading
import time

import pytest

from latitude.lab.harness import EchoServer, wait_until
from latitude.lab.links import UnknownLinkError, WanEmulator
from latitude.lab.relay import LinkRelay


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def make_relay():
    relays: list[LinkRelay] = []

    def make(port: int, **kwargs) -> LinkRelay:
        relay = LinkRelay("127.0.0.1", port, **kwargs)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.close()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed with {size} bytes still expected")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def round_trips_ms(sock: socket.socket, count: int, message: bytes = b"ping" * 16) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(message)
        assert recv_exactly(sock, len(message)) == message
        times.append((time.perf_counter() - start) * 1000)
    return times


def test_ping_pong_pays_the_configured_rtt(echo, make_relay):
    relay = make_relay(echo.port, rtt_ms=100)
    with connect(relay.port) as sock:
        round_trips_ms(sock, 1)  # the first one also carries the emulated connect
        times = round_trips_ms(sock, 30)
    assert min(times) >= 100.0
    assert 100.0 <= statistics.median(times) <= 103.0, times


def test_new_connection_pays_the_handshake_before_its_first_reply(echo, make_relay):
    """Across a real link connect() takes one RTT before data can follow: the first round trip
    on a new connection costs two RTTs, the next ones one."""
    relay = make_relay(echo.port, rtt_ms=60)
    start = time.perf_counter()
    with connect(relay.port) as sock:
        round_trips_ms(sock, 1)
        first = (time.perf_counter() - start) * 1000
        second = round_trips_ms(sock, 1)[0]
    assert 120.0 <= first < 150.0, first
    assert 60.0 <= second < 75.0, second


def test_concurrent_streams_arrive_intact_and_in_order(echo, make_relay):
    relay = make_relay(echo.port, rtt_ms=20)
    size, streams = 2 * 1024 * 1024, 8
    results: dict[int, tuple[str, str]] = {}
    errors: list[BaseException] = []

    def one_stream(index: int) -> None:
        try:
            payload = os.urandom(size)
            with connect(relay.port, timeout=30) as sock:
                # Send from a second thread: echoing 2 MB back while we are still sending
                # would otherwise fill both ways and deadlock on socket buffers.
                sender = threading.Thread(target=sock.sendall, args=(payload,))
                sender.start()
                echoed = recv_exactly(sock, size)
                sender.join()
            results[index] = (
                hashlib.sha256(payload).hexdigest(),
                hashlib.sha256(echoed).hexdigest(),
            )
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    workers = [threading.Thread(target=one_stream, args=(i,)) for i in range(streams)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    assert len(results) == streams
    for sent, echoed in results.values():
        assert sent == echoed
    stats = relay.stats()
    assert stats["connections_total"] == streams
    assert stats["bytes_to_target"] == stats["bytes_to_client"] == size * streams


def test_half_close_propagates_after_the_delay(echo, make_relay):
    relay = make_relay(echo.port, rtt_ms=40)
    with connect(relay.port) as sock:
        round_trips_ms(sock, 1)
        sock.sendall(b"last words")
        start = time.perf_counter()
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 10) == b"last words"
        assert sock.recv(10) == b""  # the echo server saw our EOF and closed
        assert (time.perf_counter() - start) * 1000 >= 40.0
    wait_until(lambda: relay.stats()["connections_open"] == 0, 5.0)


def test_cut_refuses_connects_and_holds_data_until_heal(echo, make_relay):
    relay = make_relay(echo.port, rtt_ms=10)
    port = relay.port
    with connect(port) as live:
        round_trips_ms(live, 1)
        relay.cut()
        assert relay.stats()["state"] == "cut"
        with pytest.raises(ConnectionRefusedError):
            connect(port)
        payload = os.urandom(300_000)
        live.sendall(payload)
        live.settimeout(0.4)
        with pytest.raises(TimeoutError):
            live.recv(1)  # held, not delivered
        relay.heal()
        assert relay.port == port and relay.stats()["state"] == "up"
        live.settimeout(5)
        assert recv_exactly(live, len(payload)) == payload  # held, not dropped
        with connect(port) as fresh:  # same port listens again
            round_trips_ms(fresh, 1)


def test_reset_closes_live_connections(echo, make_relay):
    relay = make_relay(echo.port, rtt_ms=10)
    with connect(relay.port) as sock:
        round_trips_ms(sock, 1)
        relay.reset()
        sock.settimeout(2)
        with pytest.raises(ConnectionResetError):  # an RST, not a polite FIN
            sock.recv(1)
        assert relay.stats()["connections_open"] == 0
    with connect(relay.port) as again:  # the link itself is still up
        round_trips_ms(again, 1)


def test_unreachable_target_resets_the_client(make_relay):
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    relay = make_relay(dead_port, rtt_ms=10)
    with connect(relay.port) as sock:  # accepted locally: the SYN has yet to cross the link
        sock.settimeout(2)
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_set_rtt_while_running(echo, make_relay):
    relay = make_relay(echo.port, rtt_ms=20)
    with connect(relay.port) as sock:
        round_trips_ms(sock, 1)
        before = statistics.median(round_trips_ms(sock, 8))
        relay.set_rtt(60)
        after = statistics.median(round_trips_ms(sock, 8))
    assert 20.0 <= before < 23.0
    assert 60.0 <= after < 63.0


def test_jitter_varies_delay_but_keeps_order(echo, make_relay):
    relay = make_relay(echo.port, rtt_ms=10, jitter_ms=20, seed=7)
    messages = [f"{i:06d}".encode() for i in range(150)]
    with connect(relay.port) as sock:
        times = round_trips_ms(sock, 10)
        # Small sends spaced out so the relay sees (and jitters) them as separate chunks.
        for message in messages:
            sock.sendall(message)
            time.sleep(0.0005)
        assert recv_exactly(sock, 6 * len(messages)) == b"".join(messages)
    assert min(times) >= 10.0
    assert max(times) - min(times) > 3.0  # the jitter is really there


def test_close_leaves_no_thread_and_no_listener(echo):
    before = set(threading.enumerate())
    relay = LinkRelay("127.0.0.1", echo.port, rtt_ms=10)
    port = relay.port
    idle = connect(port)
    busy = connect(port)
    round_trips_ms(busy, 1)
    busy.sendall(b"in flight")
    wait_until(lambda: relay.stats()["connections_open"] == 2, 5.0)
    relay.close()
    leftovers = [t for t in threading.enumerate() if t not in before and t.name != "echo"]
    assert leftovers == []
    assert relay.stats()["state"] == "closed"
    with pytest.raises(ConnectionRefusedError):
        connect(port)
    relay.close()  # idempotent
    idle.close()
    busy.close()


def test_close_does_not_hang_on_a_target_that_never_reads():
    stubborn = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never reads
    before = set(threading.enumerate())
    relay = LinkRelay("127.0.0.1", stubborn.getsockname()[1], window=1 << 20)
    sock = connect(relay.port)
    sender = threading.Thread(target=_send_until_error, args=(sock, 64 << 20))
    sender.start()
    wait_until(lambda: relay.stats()["bytes_to_target"] > 0, 5.0)
    time.sleep(0.2)  # the relay's writer is now blocked on a full socket buffer
    start = time.monotonic()
    relay.close()
    assert time.monotonic() - start < 1.0
    sender.join(timeout=5)
    assert not sender.is_alive()
    assert [t for t in threading.enumerate() if t not in before] == []
    sock.close()
    stubborn.close()


def _send_until_error(sock: socket.socket, size: int) -> None:
    try:
        sock.sendall(b"\0" * size)
    except OSError:
        pass


def test_cut_relay_closes_cleanly(echo):
    before = set(threading.enumerate())
    relay = LinkRelay("127.0.0.1", echo.port, rtt_ms=10)
    with connect(relay.port) as sock:
        round_trips_ms(sock, 1)
        relay.cut()
        sock.sendall(b"held forever")
        relay.close()
    assert [t for t in threading.enumerate() if t not in before and t.name != "echo"] == []


def test_emulator_links_are_unordered_and_relays_reused(echo):
    with WanEmulator() as wan:
        link = wan.add_link("us-west", "eu-west", rtt_ms=30)
        assert wan.link("eu-west", "us-west") is link
        with pytest.raises(ValueError):
            wan.add_link("eu-west", "us-west", rtt_ms=10)
        with pytest.raises(UnknownLinkError) as caught:
            wan.link("us-west", "ap-south")
        assert isinstance(caught.value, KeyError)
        assert "ap-south" in str(caught.value) and "us-west<->eu-west" in str(caught.value)

        relay = wan.relay("eu-west", "us-west", "127.0.0.1", echo.port)
        assert wan.relay("us-west", "eu-west", "127.0.0.1", echo.port) is relay
        assert relay.rtt_ms == 30
        other = link.add_relay("127.0.0.1", echo.port)
        assert link.relays == (relay, other)

        link.set_rtt(50)
        assert relay.rtt_ms == other.rtt_ms == 50
        link.cut()
        assert link.stats()["state"] == "cut"
        assert {r["state"] for r in link.stats()["relays"]} == {"cut"}
        with pytest.raises(ConnectionRefusedError):
            connect(other.port)
        link.heal()
        with connect(other.port) as sock:
            assert min(round_trips_ms(sock, 2)) >= 50.0
        assert link.stats()["connections_total"] == 1
    assert relay.stats()["state"] == other.stats()["state"] == "closed"


def test_invalid_settings_are_refused(echo):
    with pytest.raises(ValueError):
        LinkRelay("127.0.0.1", echo.port, rtt_ms=-1)
    with pytest.raises(ValueError):
        WanEmulator().add_link("us-west", "us-west", rtt_ms=10)

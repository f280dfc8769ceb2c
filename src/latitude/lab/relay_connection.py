"""One connection through a :class:`~latitude.lab.relay.LinkRelay`: its two directions, each a
queue of stamped chunks with a reader thread and a writer thread (why threads, and the model of
a connection a packet trace would show: :mod:`latitude.lab.relay`).

A connection is the relay's own part: it reads the relay's delay, cut state and target, and
counts the bytes it sends into the relay's statistics.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latitude.lab.relay import LinkRelay

__all__ = ["LINGER_RESET", "Connection", "tune"]

# The relay's logger, as before this part had a module of its own.
log = logging.getLogger("latitude.lab.relay")

# Large reads keep an unconstrained link fast: one lock round trip and one send per 256 KiB.
CHUNK_SIZE = 256 * 1024
# A send blocked on a receiver that does not read gives up this often to notice an abort;
# otherwise close() could wait forever on a peer that never drains its socket.
_SEND_POLL_SECONDS = 0.05
_CONNECT_TIMEOUT_SECONDS = 5.0
# Writers wait on a condition (which an abort or a heal can interrupt) until this close to a
# deadline, then sleep the rest: uninterruptible, but short and more punctual.
_FINAL_SLEEP_SECONDS = 0.001

# Queue payloads besides data: an empty bytes is EOF (half-close), None is a reset.
_EOF = b""
_RESET = None

LINGER_RESET = struct.pack("ii", 1, 0)


@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


def _lower_timer_slack() -> None:
    """Let this thread's sleeps end on time.

    Linux stretches a thread's timed waits by its "timer slack" (50 us by default) so it can
    batch wake-ups; that alone would eat a third of our 0.3 ms budget per round trip. The
    setting is per thread, so only the writers pay nothing for it. Best effort elsewhere.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A blocking send returns (partially, or with EAGAIN) after this timeout, so a writer
    # stuck on a receiver that never reads can still notice an abort.
    timeout = struct.pack("ll", 0, int(_SEND_POLL_SECONDS * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)


class _Direction:
    """One direction of one relayed connection: a queue of stamped chunks and its two ends."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.src: socket.socket | None = None
        self.dst: socket.socket | None = None
        self.lock = threading.Lock()
        # Two conditions on one lock: the writer waits for data, the reader for room.
        self.has_data = threading.Condition(self.lock)
        self.has_room = threading.Condition(self.lock)
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued_bytes = 0
        self.last_deadline = 0.0

    def push(self, arrival: float, payload: bytes | None) -> None:
        """Schedule ``payload`` to cross the link; it never overtakes what is queued before it."""
        delay = self.conn.relay.one_way_delay()
        with self.lock:
            deadline = max(self.last_deadline, arrival + delay)
            self.last_deadline = deadline
            # A writer with a non-empty queue is already waiting for the earlier (sooner)
            # deadline, so only a transition from empty needs to wake it.
            if not self.queue:
                self.has_data.notify()
            self.queue.append((deadline, payload))
            if payload:
                self.queued_bytes += len(payload)

    def wake(self) -> None:
        with self.lock:
            self.has_data.notify_all()
            self.has_room.notify_all()

    def wait_until(self, deadline: float) -> bool:
        """Wait until ``deadline`` with the link up; False if the connection was aborted."""
        conn, relay = self.conn, self.conn.relay
        with self.lock:
            while not conn.aborted:
                if relay.is_cut:
                    self.has_data.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                self.has_data.wait(remaining)
        return False

    def read_loop(self) -> None:
        conn, src = self.conn, self.src
        assert src is not None
        window = conn.relay.window
        while True:
            try:
                data: bytes | None = src.recv(CHUNK_SIZE)
            except OSError:
                data = _RESET
            arrival = time.monotonic()
            if conn.aborted:
                return  # our own abort woke the read; nothing from here on is real traffic
            self.push(arrival, data)
            if not data:
                return  # EOF or reset: nothing more will come from this side
            with self.lock:
                while self.queued_bytes >= window and not conn.aborted:
                    self.has_room.wait()

    def write_loop(self) -> None:
        _lower_timer_slack()
        conn, relay = self.conn, self.conn.relay
        window = relay.window
        while True:
            with self.lock:
                while True:
                    if conn.aborted:
                        return
                    if not self.queue or relay.is_cut:
                        self.has_data.wait()
                        continue
                    deadline, payload = self.queue[0]
                    remaining = deadline - time.monotonic()
                    if remaining <= _FINAL_SLEEP_SECONDS:
                        break
                    # Coarse, abortable wait; the last stretch is slept precisely below.
                    self.has_data.wait(remaining - _FINAL_SLEEP_SECONDS)
                self.queue.popleft()
                if payload:
                    was_full = self.queued_bytes >= window
                    self.queued_bytes -= len(payload)
                    if was_full and self.queued_bytes < window:
                        self.has_room.notify()
            remaining = deadline - time.monotonic()
            if remaining > 0:
                # A plain sleep ends ~20 us closer to the deadline than a condition wait.
                time.sleep(remaining)
            if payload is _RESET:
                conn.abort(reset=True)
                return
            if not payload:
                conn.half_close(self)
                return
            if not self._send(payload):
                return

    def _send(self, data: bytes) -> bool:
        conn, dst = self.conn, self.dst
        assert dst is not None
        view = memoryview(data)
        while view:
            try:
                sent = dst.send(view)
            except BlockingIOError:
                if conn.aborted:
                    return False
                continue
            except OSError:
                # The receiver is gone (it closed or reset). The sender learns of it the way
                # TCP would tell it: a reset crossing the link back.
                conn.abort_after(conn.relay.one_way_delay())
                return False
            view = view[sent:]
            conn.relay.count(self.name, sent)
        return True


class Connection:
    """One client connection relayed to the target: two directions, up to four threads."""

    def __init__(self, relay: LinkRelay, client: socket.socket, number: int) -> None:
        self.relay = relay
        self.client = client
        self.target: socket.socket | None = None
        self.accepted_at = time.monotonic()
        self.label = f"wan-{relay.port}-c{number}"
        self.lock = threading.Lock()
        self.aborted = False
        self._aborted_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._live_threads = 0
        self._sockets_closed = False
        self.up = _Direction(self, "to_target")
        # The client's connect() returned at once here, but across a real link it returns after
        # the SYN / SYN-ACK round trip, and its first bytes arrive half a round trip later: a
        # new connection costs one RTT more than a warm one, as it does over an ocean.
        self.up.last_deadline = self.accepted_at + 3 * relay.one_way_delay()
        self.down = _Direction(self, "to_client")
        self.up.src = client
        self.down.dst = client

    def start(self) -> None:
        self._spawn(self.up.read_loop, "up-read")
        self._spawn(self._connect_then_forward, "up-write")

    def _connect_then_forward(self) -> None:
        # The SYN crosses the link: the target hears of the connection one-way delay later.
        if not self.up.wait_until(self.accepted_at + self.relay.one_way_delay()):
            return
        sock = self._open_target()
        if sock is None:
            if not self.aborted:
                # The client's connect already "succeeded" locally; the closest we can get to
                # the refusal it would have seen is a reset, one crossing of the link later.
                self.abort_after(self.relay.one_way_delay())
            return
        self.up.dst = sock
        self.down.src = sock
        if self._spawn(self.down.read_loop, "down-read") and self._spawn(
            self.down.write_loop, "down-write"
        ):
            self.up.write_loop()

    def _open_target(self) -> socket.socket | None:
        """Connect to the target, trying each of its addresses like ``create_connection``."""
        for family, address in self.relay.target_addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            with self.lock:
                if self.aborted:
                    sock.close()
                    return None
                self.target = sock  # published so that abort() can interrupt the connect
            try:
                sock.settimeout(_CONNECT_TIMEOUT_SECONDS)
                sock.connect(address)
                sock.settimeout(None)
                tune(sock)
                return sock
            except OSError as exc:
                log.debug("%s: connect to %s failed: %s", self.label, address, exc)
                with self.lock:
                    self.target = None
                    sock.close()
                if isinstance(exc, ConnectionRefusedError):
                    self.relay.target_refused()
        return None

    def _spawn(self, target: Callable[[], None], role: str) -> bool:
        with self.lock:
            if self.aborted:
                return False
            thread = threading.Thread(
                target=self._run, args=(target,), name=f"{self.label}-{role}", daemon=True
            )
            self._threads.append(thread)
            self._live_threads += 1
        thread.start()
        return True

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception:
            log.exception("%s: relay thread failed; resetting the connection", self.label)
            self.abort(reset=True)
        finally:
            with self.lock:
                self._live_threads -= 1
                last = self._live_threads == 0
                if last:
                    # Sockets are closed only once no thread can still be inside a call on
                    # them: closing under a blocked call would neither wake it nor be safe.
                    self._close_sockets()
            if last:
                self.relay.forget(self)

    def _close_sockets(self) -> None:
        if self._sockets_closed:
            return
        self._sockets_closed = True
        for sock in (self.client, self.target):
            if sock is not None:
                sock.close()

    def half_close(self, direction: _Direction) -> None:
        with self.lock:
            if self.aborted or self._sockets_closed or direction.dst is None:
                return
            try:
                direction.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def abort(self, reset: bool = True) -> None:
        """Tear the connection down; with ``reset`` both peers see an RST, not a FIN."""
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
            self._aborted_event.set()
            if not self._sockets_closed:
                for sock in (self.client, self.target):
                    if sock is None:
                        continue
                    try:
                        if reset:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                        # Wakes a blocked recv (or connect) without sending anything; the RST
                        # goes out when the last thread closes the socket.
                        sock.shutdown(socket.SHUT_RD)
                    except OSError:
                        pass
        self.up.wake()
        self.down.wake()

    def abort_after(self, delay: float) -> None:
        """Reset after ``delay`` (the reset crossing the link), unless aborted before."""
        if not self._aborted_event.wait(delay):
            self.abort(reset=True)

    def wake(self) -> None:
        self.up.wake()
        self.down.wake()

    def join(self) -> None:
        with self.lock:
            threads = list(self._threads)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join()

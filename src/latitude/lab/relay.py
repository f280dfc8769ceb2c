"""The WAN emulator's relay: one service made to look like it is across an ocean.

Kernel ``netem`` is not available to us, so a link is emulated in user space by a TCP relay
per service reached across it (the links themselves: :mod:`latitude.lab.links`). A :class:`LinkRelay` listens on 127.0.0.1 and forwards each
connection to its target, delaying every chunk by half the link's RTT (plus optional jitter)
in each direction, and can cut, heal or reset the link on command.

Why threads and not asyncio: asyncio rounds its epoll timeout up to whole milliseconds, so a
timer-driven relay overshoots every delay by up to 1 ms. Here each direction of a connection
has a reader thread that stamps arrival times and a writer thread that sleeps until each
chunk's deadline (a futex wait, precise to tens of microseconds once the thread's timer slack
is lowered) and then sends it. The relay then adds well under a millisecond of its own.

Model of one connection, in the order a packet trace would show it:

* The client's connect is accepted by our kernel at once (we cannot delay the handshake), but
  the SYN "crosses the link": the relay connects to the target one-way delay later, and no
  byte reaches the target before that. The target's replies cross back one-way later. A
  request on a fresh connection therefore costs one RTT, not the two of a real handshake.
* Each direction delivers chunk *i* at ``max(deadline[i-1], arrival[i] + rtt/2 + jitter)``:
  order and the exact byte stream are preserved, and jitter never reorders.
* EOF (half-close) and resets are events in the same stream: they cross the link after the
  data in front of them. A reset on either side resets both.
* ``cut()`` refuses new connections (the listening socket is closed, so connects get
  ECONNREFUSED) and holds live traffic: nothing is dropped, nothing delivered. ``heal()``
  listens again on the same port and delivers what was held, like TCP retransmitting after
  a partition.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["LinkRelay", "check_ms"]

log = logging.getLogger(__name__)

# Large reads keep an unconstrained link fast: one lock round trip and one send per 256 KiB.
CHUNK_SIZE = 256 * 1024
# Bytes a direction may hold before its reader stops reading, like a TCP receive window.
# Without it a fast sender facing a slow (or cut) receiver would grow the queue unbounded.
DEFAULT_WINDOW = 8 * 1024 * 1024
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

_LINGER_RESET = struct.pack("ii", 1, 0)


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


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A blocking send returns (partially, or with EAGAIN) after this timeout, so a writer
    # stuck on a receiver that never reads can still notice an abort.
    timeout = struct.pack("ll", 0, int(_SEND_POLL_SECONDS * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)


class _Direction:
    """One direction of one relayed connection: a queue of stamped chunks and its two ends."""

    def __init__(self, conn: _Connection, name: str) -> None:
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
        delay = self.conn.relay._one_way_delay()
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
                if relay._cut:
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
                    if not self.queue or relay._cut:
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
                conn.abort_after(conn.relay._one_way_delay())
                return False
            view = view[sent:]
            conn.relay._count(self.name, sent)
        return True


class _Connection:
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
        self.up.last_deadline = self.accepted_at + 3 * relay._one_way_delay()
        self.down = _Direction(self, "to_client")
        self.up.src = client
        self.down.dst = client

    def start(self) -> None:
        self._spawn(self.up.read_loop, "up-read")
        self._spawn(self._connect_then_forward, "up-write")

    def _connect_then_forward(self) -> None:
        # The SYN crosses the link: the target hears of the connection one-way delay later.
        if not self.up.wait_until(self.accepted_at + self.relay._one_way_delay()):
            return
        sock = self._open_target()
        if sock is None:
            if not self.aborted:
                # The client's connect already "succeeded" locally; the closest we can get to
                # the refusal it would have seen is a reset, one crossing of the link later.
                self.abort_after(self.relay._one_way_delay())
            return
        self.up.dst = sock
        self.down.src = sock
        if self._spawn(self.down.read_loop, "down-read") and self._spawn(
            self.down.write_loop, "down-write"
        ):
            self.up.write_loop()

    def _open_target(self) -> socket.socket | None:
        """Connect to the target, trying each of its addresses like ``create_connection``."""
        for family, address in self.relay._target_addresses:
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
                _tune(sock)
                return sock
            except OSError as exc:
                log.debug("%s: connect to %s failed: %s", self.label, address, exc)
                with self.lock:
                    self.target = None
                    sock.close()
                if isinstance(exc, ConnectionRefusedError):
                    self.relay._target_refused()
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
                self.relay._forget(self)

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
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
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


class LinkRelay:
    """A TCP relay that makes one service look like it is across an ocean.

    Listens on ``listen_host`` (``port`` 0 picks a free port; see :attr:`port`) and relays
    each connection to ``(target_host, target_port)`` with half of ``rtt_ms`` (plus up to
    ``jitter_ms`` of uniformly random extra) of delay each way. A new connection's first bytes
    also pay the TCP handshake (one RTT more), as across a real link. Every method is
    thread-safe.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rtt_ms: float = 0.0,
        jitter_ms: float = 0.0,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        window: int = DEFAULT_WINDOW,
        seed: int | None = None,
    ) -> None:
        check_ms("rtt_ms", rtt_ms)
        check_ms("jitter_ms", jitter_ms)
        info = socket.getaddrinfo(target_host, target_port, type=socket.SOCK_STREAM)
        self.target = (target_host, target_port)
        self._target_addresses = [(family, address) for family, _, _, _, address in info]
        self.listen_host = listen_host
        self.window = window
        self._rtt_ms = float(rtt_ms)
        self._jitter_ms = float(jitter_ms)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._state_changed = threading.Condition(self._lock)
        self._cut = False
        self._target_down = False
        self._prober: threading.Thread | None = None
        self._closed = False
        self._close_done = threading.Event()
        self._connections: set[_Connection] = set()
        self._numbers = itertools.count(1)
        self._accepted = 0
        self._bytes = {"to_target": 0, "to_client": 0}
        self._listener: socket.socket | None = self._listen(port)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"wan-{self.port}-accept", daemon=True
        )
        self._acceptor.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "cut" if self._cut else "up"
        return (
            f"<LinkRelay {self.listen_host}:{self.port} -> {self.target[0]}:{self.target[1]}"
            f" rtt={self._rtt_ms}ms jitter={self._jitter_ms}ms {state}>"
        )

    def __enter__(self) -> LinkRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    @property
    def rtt_ms(self) -> float:
        return self._rtt_ms

    @property
    def jitter_ms(self) -> float:
        return self._jitter_ms

    # -- control --------------------------------------------------------------------------

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the RTT for data arriving from now on (data in flight keeps its schedule)."""
        check_ms("rtt_ms", rtt_ms)
        self._rtt_ms = float(rtt_ms)

    def set_jitter(self, jitter_ms: float) -> None:
        check_ms("jitter_ms", jitter_ms)
        self._jitter_ms = float(jitter_ms)

    def cut(self) -> None:
        """Partition the link: new connects are refused, live connections stall (data held)."""
        with self._lock:
            if self._closed or self._cut:
                return
            self._cut = True
            self._drop_listener()

    def _target_refused(self) -> None:
        """The service behind the relay refused a connect: it is down (its host is not).

        A real client would have seen that refusal as ECONNREFUSED from its own connect; here
        its connect was already accepted locally. So that the next client sees the refusal
        honestly, stop listening until the target accepts again (probed every 100 ms).
        """
        with self._lock:
            if self._closed or self._target_down:
                return
            self._target_down = True
            self._drop_listener()
            self._prober = threading.Thread(
                target=self._probe_target, name=f"wan-{self.port}-probe", daemon=True
            )
            self._prober.start()

    def _probe_target(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            for family, address in self._target_addresses:
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as probe:
                        probe.settimeout(0.5)
                        probe.connect(address)
                except OSError:
                    continue
                with self._lock:
                    if self._closed:
                        return
                    self._target_down = False
                    if not self._cut:
                        try:
                            self._listener = self._listen(self.port)
                        except OSError as exc:
                            log.warning("wan relay %s: cannot listen again: %s", self.port, exc)
                    self._state_changed.notify_all()
                return
            with self._lock:
                if self._closed:
                    return
                self._state_changed.wait(0.1)

    def heal(self) -> None:
        """End a partition: listen again on the same port and deliver what was held."""
        with self._lock:
            if self._closed or not self._cut:
                return
            # Raises (and the link stays cut) if something else took the port meanwhile.
            if not self._target_down:
                self._listener = self._listen(self.port)
            self._cut = False
            self._state_changed.notify_all()
            connections = list(self._connections)
        for conn in connections:
            conn.wake()

    def reset(self) -> None:
        """Reset every live connection (both peers see an RST); the link stays as it was."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.abort(reset=True)
        for conn in connections:
            conn.join()

    def close(self) -> None:
        """Stop listening, reset every connection and join every thread. Idempotent."""
        with self._lock:
            if self._closed:
                first = False
            else:
                first = True
                self._closed = True
                self._drop_listener()
                self._state_changed.notify_all()
                connections = list(self._connections)
        if not first:
            if threading.current_thread() is not self._acceptor:
                self._close_done.wait()
            return
        try:
            for conn in connections:
                conn.abort(reset=True)
            for conn in connections:
                conn.join()
            self._acceptor.join()
            if self._prober is not None:
                self._prober.join()
        finally:
            self._close_done.set()

    def stats(self) -> dict[str, object]:
        with self._lock:
            state = "closed" if self._closed else "cut" if self._cut else "up"
            return {
                "state": state,
                "target_down": self._target_down,
                "port": self.port,
                "target": f"{self.target[0]}:{self.target[1]}",
                "rtt_ms": self._rtt_ms,
                "jitter_ms": self._jitter_ms,
                "connections_open": len(self._connections),
                "connections_total": self._accepted,
                "bytes_to_target": self._bytes["to_target"],
                "bytes_to_client": self._bytes["to_client"],
            }

    # -- internals ------------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Lets heal() rebind the port while connections accepted on it are still alive.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, port))
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            raise
        return sock

    def _drop_listener(self) -> None:
        # Called with the lock held. shutdown() wakes the acceptor blocked in accept() (a bare
        # close would not) and makes the kernel refuse connects at once.
        if self._listener is None:
            return
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._listener = None

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                while (self._cut or self._target_down) and not self._closed:
                    self._state_changed.wait()
                if self._closed:
                    return
                listener = self._listener
            assert listener is not None
            try:
                client, _ = listener.accept()
            except OSError as exc:
                with self._lock:
                    if self._closed:
                        return
                    if self._cut or self._target_down or self._listener is not listener:
                        continue  # cut (and maybe healed) under us: use the current listener
                if exc.errno not in (errno.ECONNABORTED, errno.EINTR):
                    # E.g. out of file descriptors: back off instead of spinning.
                    log.warning("wan relay %s: accept failed: %s", self.port, exc)
                    time.sleep(0.05)
                continue
            self._adopt(client)

    def _adopt(self, client: socket.socket) -> None:
        try:
            _tune(client)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._closed:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                client.close()
                return
            conn = _Connection(self, client, next(self._numbers))
            self._connections.add(conn)
            self._accepted += 1
            # Started under the lock so close() either sees this connection or refuses it.
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _count(self, direction: str, sent: int) -> None:
        with self._lock:
            self._bytes[direction] += sent

    def _one_way_delay(self) -> float:
        delay_ms = self._rtt_ms / 2
        if self._jitter_ms:
            delay_ms += self._random.uniform(0, self._jitter_ms)
        return delay_ms / 1000


def check_ms(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a number of milliseconds >= 0, got {value!r}")

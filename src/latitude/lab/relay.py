"""The WAN emulator's relay: one service made to look like it is across an ocean.

Kernel ``netem`` is not available to us, so a link is emulated in user space by a TCP relay
per service reached across it (the links themselves: :mod:`latitude.lab.links`). A :class:`LinkRelay` listens on 127.0.0.1 and forwards each
connection to its target, delaying every chunk by half the link's RTT (plus optional jitter)
in each direction, and can cut, heal or reset the link on command.

Why threads and not asyncio: asyncio rounds its epoll timeout up to whole milliseconds, so a
timer-driven relay overshoots every delay by up to 1 ms. Here each direction of a connection
has a reader thread that stamps arrival times and a writer thread that sleeps until each
chunk's deadline (a futex wait, precise to tens of microseconds once the thread's timer slack
is lowered) and then sends it. The relay then adds well under a millisecond of its own. (A
connection, its directions and their threads: :mod:`latitude.lab.relay_connection`.)

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

import errno
import itertools
import logging
import random
import socket
import threading
import time

from latitude.lab.relay_connection import LINGER_RESET, Connection, tune

__all__ = ["LinkRelay", "check_ms"]

log = logging.getLogger(__name__)

# Bytes a direction may hold before its reader stops reading, like a TCP receive window.
# Without it a fast sender facing a slow (or cut) receiver would grow the queue unbounded.
DEFAULT_WINDOW = 8 * 1024 * 1024


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
        self._connections: set[Connection] = set()
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

    def target_refused(self) -> None:
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
            tune(client)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._closed:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                client.close()
                return
            conn = Connection(self, client, next(self._numbers))
            self._connections.add(conn)
            self._accepted += 1
            # Started under the lock so close() either sees this connection or refuses it.
            conn.start()

    # -- what its connections ask of it ----------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def target_addresses(self) -> list[tuple[int, tuple]]:
        """Where the service behind the link listens: (address family, address) pairs."""
        return self._target_addresses

    def one_way_delay(self) -> float:
        """Seconds a piece of data sent now spends crossing the link (half the RTT, plus
        jitter drawn afresh for each piece)."""
        delay_ms = self._rtt_ms / 2
        if self._jitter_ms:
            delay_ms += self._random.uniform(0, self._jitter_ms)
        return delay_ms / 1000

    def count(self, direction: str, sent: int) -> None:
        """`sent` bytes crossed the link towards the target ("to_target") or the client."""
        with self._lock:
            self._bytes[direction] += sent

    def forget(self, conn: Connection) -> None:
        """A connection has ended: it is no longer the link's to reset or close."""
        with self._lock:
            self._connections.discard(conn)


def check_ms(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a number of milliseconds >= 0, got {value!r}")

"""The WAN emulator's links: the table of ocean links between regions, each carrying one
relay (:mod:`latitude.lab.relay`) per service reached across it, and the client for the link
host's control API (cut, heal, reset, re-time; served by :mod:`latitude.lab.supervisor`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from latitude.lab.errors import BadLabInput, LabError
from latitude.lab.relay import LinkRelay, check_ms

__all__ = ["TOKEN_HEADER", "Link", "LinkControl", "UnknownLinkError", "WanEmulator"]

TOKEN_HEADER = "X-Latitude-Lab-Token"


class Link:
    """An emulated link between regions ``a`` and ``b``, carrying one relay per service."""

    def __init__(self, a: str, b: str, rtt_ms: float, jitter_ms: float = 0.0) -> None:
        if a == b:
            raise ValueError(f"a link joins two different regions, got {a!r} twice")
        check_ms("rtt_ms", rtt_ms)
        check_ms("jitter_ms", jitter_ms)
        self.a = a
        self.b = b
        self._rtt_ms = float(rtt_ms)
        self._jitter_ms = float(jitter_ms)
        self._cut = False
        self._closed = False
        self._lock = threading.Lock()
        self._relays: list[LinkRelay] = []

    def __repr__(self) -> str:
        return f"<Link {self.a}<->{self.b} rtt={self._rtt_ms}ms relays={len(self._relays)}>"

    @property
    def name(self) -> str:
        return f"{self.a}<->{self.b}"

    @property
    def regions(self) -> frozenset[str]:
        return frozenset((self.a, self.b))

    @property
    def rtt_ms(self) -> float:
        return self._rtt_ms

    @property
    def jitter_ms(self) -> float:
        return self._jitter_ms

    @property
    def relays(self) -> tuple[LinkRelay, ...]:
        with self._lock:
            return tuple(self._relays)

    def add_relay(self, target_host: str, target_port: int) -> LinkRelay:
        """A new relay across this link to ``(target_host, target_port)``."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"link {self.name} is closed")
            relay = LinkRelay(
                target_host, target_port, rtt_ms=self._rtt_ms, jitter_ms=self._jitter_ms
            )
            if self._cut:
                relay.cut()  # a relay added to a cut link starts cut, like the link
            self._relays.append(relay)
            return relay

    def find_relay(self, target_host: str, target_port: int) -> LinkRelay | None:
        with self._lock:
            for relay in self._relays:
                if relay.target == (target_host, target_port):
                    return relay
        return None

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            relays = list(self._relays)
        for relay in relays:
            relay.cut()

    def heal(self) -> None:
        with self._lock:
            self._cut = False
            relays = list(self._relays)
        for relay in relays:
            relay.heal()

    def reset(self) -> None:
        for relay in self.relays:
            relay.reset()

    def set_rtt(self, rtt_ms: float) -> None:
        check_ms("rtt_ms", rtt_ms)
        with self._lock:
            self._rtt_ms = float(rtt_ms)
            relays = list(self._relays)
        for relay in relays:
            relay.set_rtt(rtt_ms)

    def set_jitter(self, jitter_ms: float) -> None:
        check_ms("jitter_ms", jitter_ms)
        with self._lock:
            self._jitter_ms = float(jitter_ms)
            relays = list(self._relays)
        for relay in relays:
            relay.set_jitter(jitter_ms)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            relays = list(self._relays)
        for relay in relays:
            relay.close()

    def stats(self) -> dict[str, object]:
        relays = [relay.stats() for relay in self.relays]
        with self._lock:
            state = "closed" if self._closed else "cut" if self._cut else "up"
            return {
                "link": self.name,
                "state": state,
                "rtt_ms": self._rtt_ms,
                "jitter_ms": self._jitter_ms,
                "connections_open": sum(r["connections_open"] for r in relays),
                "connections_total": sum(r["connections_total"] for r in relays),
                "bytes_to_target": sum(r["bytes_to_target"] for r in relays),
                "bytes_to_client": sum(r["bytes_to_client"] for r in relays),
                "relays": relays,
            }


class UnknownLinkError(KeyError):
    """No link joins the two regions asked for."""

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of its argument; a sentence reads better.
        return str(self.args[0]) if self.args else ""


class WanEmulator:
    """The table of emulated links, looked up by (unordered) pair of regions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[frozenset[str], Link] = {}

    def __enter__(self) -> WanEmulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def links(self) -> tuple[Link, ...]:
        with self._lock:
            return tuple(self._links.values())

    def add_link(self, a: str, b: str, rtt_ms: float, jitter_ms: float = 0.0) -> Link:
        link = Link(a, b, rtt_ms, jitter_ms)
        with self._lock:
            if link.regions in self._links:
                raise ValueError(f"a link between {a!r} and {b!r} already exists")
            self._links[link.regions] = link
        return link

    def link(self, a: str, b: str) -> Link:
        with self._lock:
            try:
                return self._links[frozenset((a, b))]
            except KeyError:
                known = ", ".join(sorted(link.name for link in self._links.values()))
                raise UnknownLinkError(
                    f"no link between {a!r} and {b!r}; known links: {known or '(none)'}"
                ) from None

    def relay(self, a: str, b: str, target_host: str, target_port: int) -> LinkRelay:
        """The relay across link a<->b to this target, created on first use."""
        link = self.link(a, b)
        # Serialised so two callers asking for the same target get the same relay.
        with self._lock:
            return link.find_relay(target_host, target_port) or link.add_relay(
                target_host, target_port
            )

    def close(self) -> None:
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close()

    def stats(self) -> list[dict[str, object]]:
        return [link.stats() for link in self.links]


@dataclass
class LinkControl:
    """A client for the link host's loopback control API (`latitude.lab.supervisor`)."""

    port: int
    token: str

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={TOKEN_HEADER: self.token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", str(exc))
            except ValueError:
                message = str(exc)
            # The supervisor answers 4xx for a link or action it does not know: bad input.
            raise (BadLabInput if exc.code < 500 else LabError)(message) from None
        except OSError as exc:
            raise LabError(
                f"the lab's link supervisor does not answer ({exc}); run `latitude lab down` and `latitude lab up`"
            ) from None

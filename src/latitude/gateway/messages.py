"""Small pieces of HTTP the gateway needs: trusted headers, `Forwarded`, spooled bodies,
captured responses, and the error pages it answers with."""

from __future__ import annotations

import asyncio
import html
import ipaddress
import json
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from latitude.signing import ContentDigest

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# A client may never set these: they carry trust that only a gateway may grant.
UNTRUSTED_PREFIXES = (b"x-forwarded-", b"latitude-")
UNTRUSTED_HEADERS = frozenset(
    {b"forwarded", b"x-real-ip", b"signature", b"signature-input", b"content-digest"}
)
SPOOL_MEMORY_BYTES = 1024 * 1024


def header(scope_headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in scope_headers:
        if k == name:
            return v.decode("latin-1")
    return None


def strip_untrusted(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` without the ones only a gateway may set (names compared in any case: a
    server that does not lowercase them must not let one through)."""
    out = []
    for k, v in headers:
        name = k.lower()
        if name in UNTRUSTED_HEADERS or name.startswith(UNTRUSTED_PREFIXES):
            continue
        out.append((k, v))
    return out


def client_address(
    peer: str | None, x_forwarded_for: str | None, trusted: tuple[ipaddress._BaseNetwork, ...]
) -> str | None:
    """The client's address: the TCP peer, unless the peer is a trusted proxy (a load balancer
    in front of the gateway), in which case the rightmost `X-Forwarded-For` entry that is not
    itself a trusted proxy. Anything malformed falls back to the peer: the header only ever
    counts when a trusted proxy wrote it."""

    def is_trusted(ip: str | None) -> bool:
        try:
            return ip is not None and any(ipaddress.ip_address(ip) in net for net in trusted)
        except ValueError:
            return False

    if not trusted or not is_trusted(peer) or not x_forwarded_for:
        return peer
    for entry in reversed([e.strip() for e in x_forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            return peer
        if not is_trusted(entry):
            return entry
    return peer


def _forwarded_node(ip: str) -> str:
    try:
        if isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address):
            return f'"[{ip}]"'
    except ValueError:
        return "unknown"
    return ip


# RFC 7230 token characters: a value made only of these needs no quotes.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _forwarded_value(value: str) -> str:
    """A token as is, anything else as a quoted-string with `"` and `\\` escaped (RFC 7239)."""
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_forwarded(client_ip: str | None, proto: str, host: str | None) -> str:
    """RFC 7239 `Forwarded` for one hop, from what this gateway itself saw. Every value is
    escaped, so no `Host` can add a parameter (`a";for=6.6.6.6` stays one host value)."""
    parts = [
        f"for={_forwarded_node(client_ip) if client_ip else 'unknown'}",
        f"proto={_forwarded_value(proto)}",
    ]
    if host:
        parts.append(f"host={_forwarded_value(host)}")
    return ";".join(parts)


def parse_forwarded(value: str) -> dict[str, str]:
    """The first element of a `Forwarded` header (the one our own gateway wrote), reading
    quoted-strings as RFC 7239 writes them: a `;`, `,` or `=` inside quotes is part of the value."""
    out: dict[str, str] = {}
    i, n = 0, len(value)
    while i < n:
        eq = value.find("=", i)
        if eq < 0:
            break
        name = value[i:eq].strip().lower()
        i = eq + 1
        if i < n and value[i] == '"':
            chars = []
            i += 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(value[i])
                i += 1
            i += 1  # the closing quote
            v = "".join(chars)
        else:
            j = i
            while j < n and value[j] not in ";,":
                j += 1
            v, i = value[i:j].strip(), j
        if name == "for" and v.startswith("[") and v.endswith("]"):
            v = v[1:-1]
        out.setdefault(name, v)
        while i < n and value[i] == " ":
            i += 1
        if i < n and value[i] == ",":
            break  # the next element is another hop's
        i += 1  # past ";"
    return out


class SpooledBody:
    """A request body kept in memory up to 1 MiB and on disk beyond, hashed as it arrives."""

    def __init__(self, prefix_length: int | None = None) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        self.digest = ContentDigest()
        self.size = 0
        # The digest of the first `prefix_length` bytes is taken on the way past, so the
        # request without its session is hashed in the same single pass as the whole.
        self.prefix_length = prefix_length
        self._prefix_value = ContentDigest().header_value() if prefix_length == 0 else None

    @classmethod
    async def read(
        cls,
        receive: Receive,
        prefix_length: int | None = None,
        idle_timeout_s: float | None = None,
        max_bytes: int | None = None,
    ) -> SpooledBody:
        """The whole body; `idle_timeout_s` bounds each wait for the next piece of it (a
        client that stalls mid-body raises `BodyStalled`), not the whole upload, and
        `max_bytes` its size (past it, `BodyTooLarge`: nothing more is spooled)."""
        body = cls(prefix_length)
        while True:
            try:
                message = await asyncio.wait_for(receive(), idle_timeout_s)
            except TimeoutError:
                body.close()
                raise BodyStalled(body.size, idle_timeout_s) from None
            if message["type"] == "http.disconnect":
                body.close()
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            if max_bytes is not None and body.size + len(chunk) > max_bytes:
                body.close()
                raise BodyTooLarge(max_bytes)
            if chunk:
                body.append(chunk)
            if not message.get("more_body", False):
                return body

    def append(self, chunk: bytes) -> None:
        self.file.write(chunk)
        cut = (self.prefix_length or 0) - self.size
        if self._prefix_value is None and self.prefix_length and 0 < cut <= len(chunk):
            self.digest.update(chunk[:cut])
            self._prefix_value = self.digest.header_value()
            self.digest.update(chunk[cut:])
        else:
            self.digest.update(chunk)
        self.size += len(chunk)

    async def chunks(
        self, size: int = 256 * 1024, limit: int | None = None
    ) -> AsyncIterator[bytes]:
        self.file.seek(0)
        left = self.size if limit is None else limit
        while left > 0:
            chunk = self.file.read(min(size, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk

    def prefix_digest(self, length: int) -> str:
        """`Content-Digest` of the first `length` bytes (the request without its session)."""
        if self._prefix_value is not None and length == self.prefix_length:
            return self._prefix_value
        digest = ContentDigest()  # not announced up front: one more pass over the spool
        self.file.seek(0)
        left = length
        while left > 0:
            chunk = self.file.read(min(256 * 1024, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        return digest.header_value()

    def read_tail(self, n: int) -> bytes:
        if n == 0:
            return b""
        self.file.seek(self.size - n)
        return self.file.read(n)

    def replay(self, limit: int, send: Send) -> tuple[Receive, Send]:
        """An ASGI `receive` that gives an app the first `limit` bytes of the body, and the
        `send` to pass it with. After the body, `receive` blocks until the response is complete
        and then says `http.disconnect`, as a server does: an app that listens for a disconnect
        while it works (Django does) must not hear one early."""
        chunks = self.chunks(limit=limit)
        body_done = False
        response_done = asyncio.Event()

        async def receive() -> dict:
            nonlocal body_done
            if body_done:
                await response_done.wait()
                return {"type": "http.disconnect"}
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def watched_send(message: dict) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                response_done.set()

        return receive, watched_send

    def close(self) -> None:
        self.file.close()


class ClientDisconnected(Exception):
    pass


def announced_length(headers) -> int:
    """The body's length as `Content-Length` announces it (0 when it does not: the server
    already refused a malformed one)."""
    value = header(headers, b"content-length")
    return int(value) if value and value.isdigit() else 0


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit:,} bytes")
        self.limit = limit


class BodyStalled(Exception):
    def __init__(self, size: int, idle_timeout_s: float):
        super().__init__(
            f"the request body stopped arriving: no bytes for {idle_timeout_s:g} s after "
            f"{size} bytes"
        )


@dataclass
class CapturedResponse:
    """An app's response, collected instead of sent, so it can be signed and carried back."""

    status: int = 500
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    started: bool = False

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
            self.started = True
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


async def send_response(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    headers = [
        (k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def wants_json(scope: Scope) -> bool:
    accept = (header(scope.get("headers", []), b"accept") or "").lower()
    return "application/json" in accept or (
        "text/html" not in accept and "*/*" not in accept and accept != ""
    )


async def send_error(
    scope: Scope,
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    data: dict | None = None,
) -> None:
    """A clear error in the client's language (JSON or HTML), never cached."""
    headers = [(b"cache-control", b"no-store"), *(extra_headers or [])]
    if wants_json(scope):
        body = json.dumps({"error": title, "detail": detail, **(data or {})}).encode()
        headers.append((b"content-type", b"application/json"))
    else:
        body = (
            f"<!doctype html><html><head><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(detail)}</p></body></html>"
        ).encode()
        headers.append((b"content-type", b"text/html; charset=utf-8"))
    await send_response(send, status, headers, body)


async def send_json(
    send: Send, status: int, data: dict, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_response(
        send,
        status,
        [(b"content-type", b"application/json"), (b"cache-control", b"no-store"), *(headers or [])],
        json.dumps(data).encode(),
    )

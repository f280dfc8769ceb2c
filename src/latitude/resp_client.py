"""The Valkey client of what a gateway asks on every forwarded request: `GET`, `SET` (with `EX`,
`NX`) and `DEL` of one key, the session store's and the replay cache's commands (and
`HINCRBYFLOAT`, for the figures the gateways publish once a second).

On one connection per process, pipelined: commands are written as they come and their replies
read back in order (RESP answers in order), so concurrent requests share the connection with
no pool and no lock per command. The protocol is asyncio's (a `Protocol`, a reply parser over
the bytes as they arrive), as `forwarding_h1` is for HTTP: redis-py's general client cost a
forwarded write's replica ~0.57 ms of CPU for its one `GET` (benchmarks/README.md, session 6).

The contract is redis-py's as the stores used it: `get` gives bytes or None, `set` True or None
(`NX` and the key existed), `delete` the count. A server's error reply raises `RespError`; a
connection that cannot be made, breaks, or does not answer within `timeout_s` raises
`RespConnectionError` and is closed (every command waiting on it fails with it). A command on a
connection that was already open when it broke is sent once more on a new one, as the stores'
redis-py client was told to (`Retry(NoBackoff(), 1)`): a Valkey that restarted fails no request.

URLs are redis-py's (`redis://`, `rediss://` for TLS, `unix://`, with user, password, `/db`
and `?socket_timeout=`, `?socket_connect_timeout=`), parsed by redis-py's own parser.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

__all__ = ["RespClient", "RespConnectionError", "RespError"]

DEFAULT_TIMEOUT_S = 2.0


class RespError(Exception):
    """The server answered the command with an error (`-ERR ...`)."""


class RespConnectionError(ConnectionError):
    """No connection, a broken one, or no answer in time: the command's fate is unknown."""


_INCOMPLETE = object()


def _parse(buf: bytearray, start: int) -> tuple[Any, int]:
    """One RESP2 reply from `buf` at `start`: (value, end), or (_INCOMPLETE, start). An error
    reply's value is a `RespError`; a nil bulk string is None."""
    line_end = buf.find(b"\r\n", start)
    if line_end < 0:
        return _INCOMPLETE, start
    kind, line = buf[start : start + 1], bytes(buf[start + 1 : line_end])
    after = line_end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RespError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, after
        if len(buf) < after + n + 2:
            return _INCOMPLETE, start
        return bytes(buf[after : after + n]), after + n + 2
    raise RespConnectionError(f"not a reply this client reads: {bytes(buf[start:after])[:40]!r}")


def _command(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One connection and the replies it still owes, oldest first."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future] = deque()
        self.buffer = bytearray()
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        at = 0
        try:
            while self.waiting:
                value, end = _parse(self.buffer, at)
                if value is _INCOMPLETE:
                    break
                at = end
                waiter = self.waiting.popleft()
                if waiter.done():  # its caller gave up: the reply is read and dropped
                    continue
                if isinstance(value, RespError):
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        except (RespConnectionError, ValueError) as exc:
            self.close(RespConnectionError(f"Valkey's answer is not RESP: {exc}"))
            return
        del self.buffer[:at]
        if self.buffer and not self.waiting:
            self.close(RespConnectionError("Valkey sent bytes nobody asked for"))

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        self.close(RespConnectionError(f"the connection to Valkey closed{why}"))

    def send(self, command: bytes) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        self.transport.write(command)
        return waiter

    def close(self, why: RespConnectionError) -> None:
        self.closed = True
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(why)
        if self.transport is not None:
            self.transport.close()


class RespClient:
    """A pipelined connection to one Valkey (or Redis): `get`, `set`, `delete`, `aclose`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.host, self.port, self.path, self.db = host, port, path, db
        self.username, self.password, self.tls = username, password, tls
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RespClient:
        from redis.asyncio.connection import SSLConnection, parse_url

        options = parse_url(url)
        tls = None
        if options.get("connection_class") is SSLConnection:
            tls = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
            if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "0"):
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        return cls(
            host=options.get("host") or "127.0.0.1",
            port=int(options.get("port") or 6379),
            path=options.get("path"),
            db=int(options.get("db") or 0),
            username=options.get("username"),
            password=options.get("password"),
            tls=tls,
            timeout_s=float(options.get("socket_timeout") or timeout_s),
            connect_timeout_s=float(options.get("socket_connect_timeout") or connect_timeout_s),
        )

    def __repr__(self) -> str:
        where = self.path or f"{self.host}:{self.port}"
        return f"RespClient({where}, db {self.db}{', tls' if self.tls else ''})"

    async def get(self, key: str | bytes) -> bytes | None:
        return await self._call(b"GET", key)

    async def set(
        self, key: str | bytes, value: bytes, *, ex: int | None = None, nx: bool = False
    ) -> bool | None:
        args: list[Any] = [b"SET", key, value]
        if ex is not None:
            args += [b"EX", int(ex)]
        if nx:
            args.append(b"NX")
        return True if await self._call(*args) == b"OK" else None

    async def delete(self, *keys: str | bytes) -> int:
        return await self._call(b"DEL", *keys)

    async def hincrbyfloat(self, key: str | bytes, field: str | bytes, amount: float) -> float:
        """Add `amount` to a hash field (the gateways' shared figures, once a second)."""
        return float(await self._call(b"HINCRBYFLOAT", key, field, repr(float(amount))))

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.close(RespConnectionError("the client was closed"))

    async def _call(self, *args: Any) -> Any:
        command = _command(*args)
        for attempt in (0, 1):
            conn, fresh = await self._connection()
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await conn.send(command)
            except TimeoutError:
                conn.close(RespConnectionError(f"Valkey did not answer in {self.timeout_s:g} s"))
                raise RespConnectionError(
                    f"{self!r}: no answer within {self.timeout_s:g} s"
                ) from None
            except RespConnectionError:
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _connection(self) -> tuple[_Connection, bool]:
        """The open connection (and False), or a new one (and True)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn, False
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn, True  # made by the call that held the lock: new all the same
            self._conn = await self._connect()
            return self._conn, True

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path:
                    _, conn = await loop.create_unix_connection(_Connection, self.path)
                else:
                    _, conn = await loop.create_connection(
                        _Connection, self.host, self.port, ssl=self.tls
                    )
                hello = []
                if self.password is not None:
                    auth = [self.username, self.password] if self.username else [self.password]
                    hello.append(conn.send(_command(b"AUTH", *auth)))
                if self.db:
                    hello.append(conn.send(_command(b"SELECT", self.db)))
                for reply in hello:
                    await reply
        except BaseException as exc:
            if conn is not None:
                conn.close(RespConnectionError("the connection was not set up"))
            if isinstance(exc, TimeoutError):
                raise RespConnectionError(
                    f"{self!r}: no connection within {self.connect_timeout_s:g} s"
                ) from None
            if isinstance(exc, RespError):  # AUTH or SELECT refused: the URL is wrong
                raise RespConnectionError(f"{self!r}: Valkey refused us: {exc}") from exc
            if isinstance(exc, OSError | ssl.SSLError):
                raise RespConnectionError(f"{self!r}: cannot connect: {exc}") from exc
            raise
        return conn

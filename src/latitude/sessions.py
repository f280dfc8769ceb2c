"""Region-local session stores, and moving one session's bytes between regions.

Sessions are region-local: each region keeps its own store (Valkey/Redis), there is no
global session. When a replica region forwards a write, the session's bytes travel with
it, packed by :class:`SessionCodec`; the primary's updated session comes back the same way
and is written to the replica's own store.

To Latitude a session is opaque bytes: an app in any language stores whatever it wants
(PHP's redis session handler stores its serialized array under ``PHPREDIS_SESSION:{sid}``,
which the ``key_template`` reproduces). :class:`SessionMiddleware` is a small ASGI
middleware for Python apps that want server-side JSON sessions in the region's store.

Parts:

- :class:`SessionStore` - the protocol (``get`` / ``set`` / ``delete`` / ``close``).
- :class:`ValkeySessionStore` - Valkey or Redis through `latitude.resp_client` (or a given
  ``redis.asyncio`` client).
- :class:`MemorySessionStore` - a dict in this process; **for tests only** (not shared
  between processes, lost on restart).
- :func:`session_store_from_url` - ``valkey://``, ``valkeys://``, ``redis://``,
  ``rediss://``, ``unix://`` or ``memory://``.
- :class:`SessionCodec` - ``pack`` / ``unpack`` with an explicit size limit: an oversize
  session is refused (:class:`SessionTooLarge`), never truncated, and a decompression bomb
  is stopped at the limit.
- :class:`SessionMiddleware` - ``scope["session"]`` as a dict (Starlette's
  ``request.session`` reads it).
- :func:`carried_sessions` - while a forwarded request runs at the primary, the session it
  brought is read and written in this process by every store above, not in the primary's own.

Session ids are checked before any key is built from them (:func:`check_session_id`):
8 to 256 characters of ``A-Z a-z 0-9 _ . ~ , -`` (the comma is in PHP's 6-bits-per-character
alphabet). Anything else raises :class:`InvalidSessionId`.

This module is a leaf: it imports no other ``latitude`` module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextvars import ContextVar
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from latitude.cookies import cookie_value

__all__ = [
    "DEFAULT_KEY_TEMPLATE",
    "DEFAULT_LIMIT_BYTES",
    "DEFAULT_TTL_S",
    "LIMIT_SETTING",
    "PHP_KEY_TEMPLATE",
    "CorruptSession",
    "InvalidSessionId",
    "MemorySessionStore",
    "SessionCodec",
    "SessionError",
    "SessionMiddleware",
    "SessionStore",
    "SessionStoreUnavailable",
    "SessionTooLarge",
    "ValkeySessionStore",
    "check_key_template",
    "carried_sessions",
    "check_session_id",
    "new_session_id",
    "session_store_from_url",
]

log = logging.getLogger(__name__)

DEFAULT_KEY_TEMPLATE = "latitude:session:{sid}"
PHP_KEY_TEMPLATE = "PHPREDIS_SESSION:{sid}"
DEFAULT_TTL_S = 86400
DEFAULT_LIMIT_BYTES = 1024 * 1024
LIMIT_SETTING = "[gateway] session_limit_bytes"
STORE_TIMEOUT_S = 2.0  # connect and per-command bound of a store made from a URL

_SID_RE = re.compile(r"[A-Za-z0-9_.~,-]{8,256}")


# --------------------------------------------------------------------------- errors


class SessionError(Exception):
    """Base class of every error raised by this module."""


class InvalidSessionId(SessionError, ValueError):
    """A session id that is not safe to build a store key from."""


class SessionTooLarge(SessionError):
    """A session over the configured limit; it was refused, not truncated."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size  # bytes; for unpack, a lower bound ("more than the limit")
        self.limit = limit


class CorruptSession(SessionError):
    """A packed session blob that cannot be decoded (unknown marker, bad zlib stream)."""


class SessionStoreUnavailable(SessionError):
    """The session store could not be reached or answered with an error."""


# --------------------------------------------------------------------------- ids and keys


def check_session_id(sid: object) -> str:
    """Return ``sid`` if it is a safe session id, else raise :class:`InvalidSessionId`."""
    if not isinstance(sid, str) or not _SID_RE.fullmatch(sid):
        shown = repr(sid)[:40] if isinstance(sid, str | bytes) else type(sid).__name__
        raise InvalidSessionId(
            f"invalid session id {shown}: expected 8 to 256 characters of A-Z a-z 0-9 _ . ~ , -"
        )
    return sid


def new_session_id() -> str:
    """A fresh random session id (256 bits, URL-safe base64: 43 characters)."""
    return secrets.token_urlsafe(32)


def check_key_template(template: str) -> str:
    """Return ``template`` if it contains ``{sid}`` exactly once, else raise ``ValueError``."""
    if not isinstance(template, str) or template.count("{sid}") != 1:
        raise ValueError(
            f"session key template {template!r} must contain the placeholder {{sid}} exactly "
            f"once, e.g. {DEFAULT_KEY_TEMPLATE!r} or, for PHP's redis session handler, "
            f"{PHP_KEY_TEMPLATE!r}"
        )
    return template


# --------------------------------------------------------------------------- stores


@runtime_checkable
class SessionStore(Protocol):
    """A region-local store of opaque session bytes, keyed by session id."""

    async def get(self, sid: str) -> bytes | None:
        """The session's bytes, or ``None`` if there is none (or it expired)."""
        ...

    async def set(self, sid: str, data: bytes, ttl_s: int | None = None) -> None:
        """Store the session; ``ttl_s=None`` uses the store's default time to live."""
        ...

    async def delete(self, sid: str) -> None:
        """Forget the session (no error if there is none)."""
        ...

    async def close(self) -> None:
        """Release connections the store opened itself."""
        ...


def _ttl(ttl_s: int | None, default_ttl_s: int | None) -> int | None:
    ttl = default_ttl_s if ttl_s is None else ttl_s
    if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
        raise ValueError(f"session ttl must be a positive number of seconds, not {ttl!r}")
    return ttl


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"session data must be bytes, not {type(data).__name__}")
    return bytes(data)


def valkey_client(url: str) -> Any:
    """A client of the region's Valkey (sessions), as every part uses it: one pipelined
    connection (`latitude.resp_client`); a connection to a Valkey that restarted fails once and
    the command is sent again on a new one; a store that is down or cut fails within the
    timeouts, not forever."""
    from latitude.resp_client import RespClient

    return RespClient.from_url(
        _redis_url(url), timeout_s=STORE_TIMEOUT_S, connect_timeout_s=STORE_TIMEOUT_S
    )


# --------------------------------------------------------------------------- carried sessions

# The sessions of the forwarded request running in this context (see `carried_sessions`).
_carried: ContextVar[dict[str, bytes | None] | None] = ContextVar(
    "latitude_carried_sessions", default=None
)


@contextlib.contextmanager
def carried_sessions(sid: str | None, data: bytes | None) -> Iterator[dict[str, bytes | None]]:
    """Run a forwarded request on the session it brought, held in this process.

    A session's home is its own region: at the primary it is needed only while the request
    runs, and the answer carries it back. So while this context is active, every store of
    this module reads ``sid`` (if any) from here, and writes and deletes any id here, without a round
    trip to the primary's store (before: one write of the copy before the run and one read
    after it). Yields the box: afterwards ``box[sid]`` is the session as the app left it
    (``None``: deleted), and an id the app made meanwhile is a key of its own. Only for apps in
    this process: an app behind HTTP (the sidecar) reads the primary's store itself.
    """
    box: dict[str, bytes | None] = {check_session_id(sid): data} if sid else {}
    token = _carried.set(box)
    try:
        yield box
    finally:
        _carried.reset(token)


def _carried_box() -> dict[str, bytes | None] | None:
    return _carried.get()


class ValkeySessionStore:
    """Sessions in Valkey or Redis: ``SET <key> <bytes> EX <ttl>``.

    ``url_or_client`` is a URL (``valkey://``, ``valkeys://``, ``redis://``, ``rediss://``,
    ``unix://``) or an existing ``redis.asyncio.Redis`` client. The store closes only a client
    it created itself; a client passed in belongs to the caller. The client must return bytes
    (``decode_responses=False``): sessions are opaque bytes.

    ``key_template`` places the key where the app looks for it (``{sid}`` is replaced by the
    session id). ``default_ttl_s=None`` stores sessions without expiry.
    """

    def __init__(
        self,
        url_or_client: Any,
        key_template: str = DEFAULT_KEY_TEMPLATE,
        default_ttl_s: int | None = DEFAULT_TTL_S,
    ) -> None:
        self.key_template = check_key_template(key_template)
        self.default_ttl_s = _ttl(None, default_ttl_s)
        if isinstance(url_or_client, str):
            self._client = valkey_client(url_or_client)
            self._owns_client = True
        else:
            kwargs = getattr(
                getattr(url_or_client, "connection_pool", None), "connection_kwargs", {}
            )
            if kwargs.get("decode_responses"):
                raise ValueError(
                    "the Redis client given to ValkeySessionStore decodes responses to str; "
                    "sessions are bytes: create it with decode_responses=False"
                )
            self._client = url_or_client
            self._owns_client = False

    @property
    def client(self) -> Any:
        return self._client

    def key(self, sid: str) -> str:
        """The store key for session ``sid`` (after checking the id)."""
        return self.key_template.replace("{sid}", check_session_id(sid))

    async def get(self, sid: str) -> bytes | None:
        key = self.key(sid)
        box = _carried_box()
        if box is not None and sid in box:
            return box[sid]
        try:
            return await self._client.get(key)
        except Exception as exc:
            raise _unavailable("read", exc) from exc

    async def set(self, sid: str, data: bytes, ttl_s: int | None = None) -> None:
        key, data, ttl = self.key(sid), _as_bytes(data), _ttl(ttl_s, self.default_ttl_s)
        box = _carried_box()
        if box is not None:
            box[sid] = data
            return
        try:
            await self._client.set(key, data, ex=ttl)
        except Exception as exc:
            raise _unavailable("write", exc) from exc

    async def delete(self, sid: str) -> None:
        key = self.key(sid)
        box = _carried_box()
        if box is not None:
            box[sid] = None
            return
        try:
            await self._client.delete(key)
        except Exception as exc:
            raise _unavailable("delete", exc) from exc

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _unavailable(what: str, exc: Exception) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(
        f"session store: could not {what} a session ({type(exc).__name__}: {exc})"
    )


class MemorySessionStore:
    """Sessions in a dict of this process. **Tests only**: not shared, lost on restart."""

    def __init__(
        self,
        default_ttl_s: int | None = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_ttl_s = _ttl(None, default_ttl_s)
        self._clock = clock
        self._data: dict[str, tuple[bytes, float | None]] = {}

    async def get(self, sid: str) -> bytes | None:
        box = _carried_box()
        if box is not None and check_session_id(sid) in box:
            return box[sid]
        entry = self._data.get(check_session_id(sid))
        if entry is None:
            return None
        data, expires_at = entry
        if expires_at is not None and self._clock() >= expires_at:
            del self._data[sid]
            return None
        return data

    async def set(self, sid: str, data: bytes, ttl_s: int | None = None) -> None:
        sid, data, ttl = check_session_id(sid), _as_bytes(data), _ttl(ttl_s, self.default_ttl_s)
        box = _carried_box()
        if box is not None:
            box[sid] = data
            return
        self._data[sid] = (data, None if ttl is None else self._clock() + ttl)

    async def delete(self, sid: str) -> None:
        box = _carried_box()
        if box is not None:
            box[check_session_id(sid)] = None
            return
        self._data.pop(check_session_id(sid), None)

    async def close(self) -> None:
        self._data.clear()


_SCHEMES = {
    "valkey": "redis",
    "valkeys": "rediss",
    "redis": "redis",
    "rediss": "rediss",
    "unix": "unix",
}


def _redis_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    mapped = _SCHEMES.get(scheme.lower()) if sep else None
    if mapped is None:
        raise ValueError(
            f"session store URL {url!r}: unsupported scheme {scheme!r}; use one of "
            "valkey://, valkeys://, redis://, rediss://, unix:// or memory:// (tests only)"
        )
    return f"{mapped}://{rest}"


def session_store_from_url(
    url: str,
    key_template: str = DEFAULT_KEY_TEMPLATE,
    default_ttl_s: int | None = DEFAULT_TTL_S,
) -> SessionStore:
    """A store for ``url``: ``memory://`` gives a :class:`MemorySessionStore` (tests only),
    every Valkey/Redis scheme a :class:`ValkeySessionStore`."""
    if urlsplit(url).scheme.lower() == "memory":
        check_key_template(key_template)
        return MemorySessionStore(default_ttl_s=default_ttl_s)
    return ValkeySessionStore(url, key_template=key_template, default_ttl_s=default_ttl_s)


# --------------------------------------------------------------------------- codec


class SessionCodec:
    """Pack one session's bytes for the trip between regions, and unpack them.

    Format: one marker byte (``0x01``: zlib) then the zlib stream. Later formats get new
    markers. The limit applies to the raw (uncompressed) session, both ways: ``pack``
    refuses a session over it, ``unpack`` stops decompressing one byte past it, so a small
    blob that would inflate to gigabytes is refused without being inflated.
    """

    MARKER_ZLIB = b"\x01"

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES, level: int = 6) -> None:
        if not isinstance(limit_bytes, int) or limit_bytes <= 0:
            raise ValueError(
                f"session limit must be a positive number of bytes, not {limit_bytes!r}"
            )
        self.limit_bytes = limit_bytes
        self.level = level

    def pack(self, data: bytes) -> bytes:
        data = _as_bytes(data)
        if len(data) > self.limit_bytes:
            raise SessionTooLarge(
                f"session is {len(data):,} bytes, over the limit of {self.limit_bytes:,} bytes; "
                f"it was refused, not truncated. Raise {LIMIT_SETTING} in latitude.toml to "
                "allow larger sessions.",
                size=len(data),
                limit=self.limit_bytes,
            )
        # zlib's state for its default 32 KiB window takes ten times as long to set up as a
        # session of a few hundred bytes takes to compress (benchmarks/README.md, session 12);
        # a window just larger than the session finds the same matches. Still a zlib stream:
        # any inflater (an older gateway's too) reads it.
        window_bits = min(15, max(9, len(data).bit_length()))
        packer = zlib.compressobj(self.level, zlib.DEFLATED, window_bits, max(1, window_bits - 7))
        return self.MARKER_ZLIB + packer.compress(data) + packer.flush()

    def unpack(self, blob: bytes) -> bytes:
        blob = _as_bytes(blob)
        if not blob:
            raise CorruptSession("packed session is empty (expected a format marker)")
        if blob[:1] != self.MARKER_ZLIB:
            raise CorruptSession(f"packed session has an unknown format marker 0x{blob[0]:02x}")
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(blob[1:], self.limit_bytes + 1)
        except zlib.error as exc:
            raise CorruptSession(f"packed session is not a valid zlib stream ({exc})") from exc
        if len(data) > self.limit_bytes:
            raise SessionTooLarge(
                f"session decompresses to more than {self.limit_bytes:,} bytes (the limit; "
                f"{len(blob):,} bytes packed); it was refused, not truncated. Raise "
                f"{LIMIT_SETTING} in latitude.toml to allow larger sessions.",
                size=len(data),
                limit=self.limit_bytes,
            )
        if not inflater.eof:
            raise CorruptSession("packed session is truncated (the zlib stream does not end)")
        if inflater.unused_data:
            raise CorruptSession(
                f"packed session has {len(inflater.unused_data)} bytes after the zlib stream"
            )
        return data


# --------------------------------------------------------------------------- middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class SessionMiddleware:
    """Server-side sessions for a Python ASGI app, in a region's :class:`SessionStore`.

    For each HTTP request:

    1. Read the session cookie (``cookie_name``); if it names a valid id, load its bytes from
       the store and JSON-decode them. ``scope["session"]`` is that dict (empty if none). An
       id the store does not hold is ignored: a new session always gets a new random id.
    2. Run the app.
    3. When the app starts its response, compare the dict with what was loaded:

       - unchanged: nothing is stored, no cookie is sent;
       - changed and not empty: save it as JSON under the same id, or under a new random id
         sent in ``Set-Cookie`` (``Path=/; HttpOnly; SameSite=Lax``, ``Secure`` over https);
       - emptied: delete the stored session and expire the cookie (a logout).

       Saving happens before the response start is passed on, so the next request the client
       makes already sees the change. A change made later (while the body streams) is saved
       when the app returns, if the session already has an id.

    Sessions expire ``ttl_s`` seconds (``None``: the store's default) after their last change.
    The cookie has no ``Max-Age`` unless ``max_age_s`` is given. WebSocket connections see
    ``scope["session"]`` read-only: there is no response to carry a cookie. A stored session
    that is not a JSON object (e.g. written by another app) is treated as empty, and replaced
    if the app writes to it. Store errors propagate (:class:`SessionStoreUnavailable`).
    """

    def __init__(
        self,
        app: ASGIApp,
        store: SessionStore,
        *,
        cookie_name: str = "session",
        ttl_s: int | None = None,
        max_age_s: int | None = None,
    ) -> None:
        if not _COOKIE_NAME_RE.fullmatch(cookie_name):
            raise ValueError(f"invalid session cookie name {cookie_name!r}")
        self.app = app
        self.store = store
        self.cookie_name = cookie_name
        self.ttl_s = ttl_s
        self.max_age_s = max_age_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        sid, session = await self._load(self._sid_from_cookie(scope))
        scope["session"] = session
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        saved = _encode(session)  # what the store holds (or b"{}" for "nothing")
        secure = scope.get("scheme") == "https"

        async def send_with_session(message: Message) -> None:
            nonlocal sid, saved
            if message["type"] == "http.response.start":
                current = _encode(session)
                if current != saved:
                    cookie = None
                    if not session:
                        if sid:
                            await self.store.delete(sid)
                            cookie = self._cookie("", secure, expire=True)
                        sid = None
                    else:
                        if sid is None:
                            sid = new_session_id()
                            cookie = self._cookie(sid, secure)
                        await self.store.set(sid, current, self.ttl_s)
                    saved = current
                    if cookie is not None:
                        headers = list(message.get("headers", []))
                        headers.append((b"set-cookie", cookie.encode("latin-1")))
                        message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_session)

        late = _encode(session)
        if late != saved:
            if sid and session:
                await self.store.set(sid, late, self.ttl_s)
            elif sid:
                await self.store.delete(sid)
            else:
                log.warning("session changed after the response started; no id to save it under")

    def _sid_from_cookie(self, scope: Scope) -> str | None:
        value = cookie_value(scope.get("headers", []), self.cookie_name)
        try:
            return check_session_id(value) if value is not None else None
        except InvalidSessionId:
            return None  # a hostile or stale cookie: start a fresh session

    async def _load(self, sid: str | None) -> tuple[str | None, dict]:
        """The cookie's id and its session; an id the store does not hold is dropped, so a
        client cannot choose the id of a session it is about to create (session fixation)."""
        data = await self.store.get(sid) if sid else None
        if data is None:
            return None, {}
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            log.warning("stored session is not a JSON object; starting from an empty session")
            return sid, {}
        return sid, value

    def _cookie(self, value: str, secure: bool, expire: bool = False) -> str:
        parts = [f"{self.cookie_name}={value}", "Path=/"]
        if expire:
            parts.append("Max-Age=0")
        elif self.max_age_s is not None:
            parts.append(f"Max-Age={self.max_age_s}")
        parts += ["HttpOnly", "SameSite=Lax"]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)


def _encode(session: dict) -> bytes:
    return json.dumps(session, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

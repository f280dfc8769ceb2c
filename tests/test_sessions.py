"""Region-local session stores (a real Valkey), the inter-region codec, and SessionMiddleware
behind a real uvicorn on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import zlib

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from latitude.lab.harness import free_port
from latitude.sessions import (
    PHP_KEY_TEMPLATE,
    CorruptSession,
    InvalidSessionId,
    MemorySessionStore,
    SessionCodec,
    SessionError,
    SessionMiddleware,
    SessionStore,
    SessionStoreUnavailable,
    SessionTooLarge,
    ValkeySessionStore,
    check_session_id,
    session_store_from_url,
)

SID = "abcdefgh12345678"


@pytest.fixture(scope="module")
def valkey_url(valkey_port):
    return f"valkey://127.0.0.1:{valkey_port}/0"


@pytest.fixture
async def raw(valkey_url):
    """A plain client on the same Valkey, to look at keys the way another app would."""
    client = aioredis.Redis.from_url(valkey_url.replace("valkey://", "redis://"))
    yield client
    await client.aclose()


# --------------------------------------------------------------------------- stores


async def test_valkey_set_get_delete_ttl(valkey_url, raw):
    store = session_store_from_url(valkey_url)
    assert isinstance(store, ValkeySessionStore) and isinstance(store, SessionStore)
    try:
        assert await store.get(SID) is None
        data = bytes(range(256)) * 4  # opaque bytes, not text
        await store.set(SID, data)
        assert await store.get(SID) == data
        assert await raw.get(f"latitude:session:{SID}") == data
        assert 86390 <= await raw.ttl(f"latitude:session:{SID}") <= 86400

        await store.set(SID, b"short", ttl_s=1)
        assert 0 < await raw.ttl(f"latitude:session:{SID}") <= 1
        await asyncio.sleep(1.2)
        assert await store.get(SID) is None  # expired in Valkey itself

        await store.set(SID, b"x")
        await store.delete(SID)
        assert await store.get(SID) is None
        await store.delete(SID)  # deleting nothing is fine
        with pytest.raises(ValueError, match="positive"):
            await store.set(SID, b"x", ttl_s=0)
    finally:
        await store.close()


async def test_php_key_template_puts_the_key_where_php_looks(valkey_url, raw):
    php_sid = "k3s9d0f8g7h6j5k4l3m2n1b0v9c8x7z6"  # PHP's default: 32 chars
    php_data = b'user_id|i:42;flash|s:5:"hello";'
    # PHP wrote a session: Latitude reads it under the same key.
    await raw.set(f"PHPREDIS_SESSION:{php_sid}", php_data, ex=1440)
    store = ValkeySessionStore(valkey_url, key_template=PHP_KEY_TEMPLATE, default_ttl_s=1440)
    try:
        assert store.key(php_sid) == f"PHPREDIS_SESSION:{php_sid}"
        assert await store.get(php_sid) == php_data
        # Latitude writes back (a session updated at the primary): PHP finds it.
        await store.set(php_sid, php_data + b"cart|i:3;")
        assert await raw.get(f"PHPREDIS_SESSION:{php_sid}") == php_data + b"cart|i:3;"
        assert await raw.exists(f"latitude:session:{php_sid}") == 0
    finally:
        await store.close()


async def test_key_template_needs_sid(valkey_url):
    for bad in ("latitude:session:", "{sid}:{sid}", "sessions:{id}"):
        with pytest.raises(ValueError, match=r"\{sid\}"):
            ValkeySessionStore(valkey_url, key_template=bad)
    with pytest.raises(ValueError, match=r"\{sid\}"):
        session_store_from_url("memory://", key_template="nope")
    # other braces are kept literally
    store = ValkeySessionStore(valkey_url, key_template="{app}:{sid}")
    assert store.key(SID) == "{app}:" + SID
    await store.close()


async def test_given_client_is_not_closed_and_must_return_bytes(valkey_url, raw):
    store = ValkeySessionStore(raw)
    await store.set(SID, b"v")
    await store.close()
    assert await raw.get(f"latitude:session:{SID}") == b"v"  # still usable
    text_client = aioredis.Redis.from_url(
        valkey_url.replace("valkey://", "redis://"), decode_responses=True
    )
    with pytest.raises(ValueError, match="decode_responses"):
        ValkeySessionStore(text_client)
    await text_client.aclose()


@pytest.mark.parametrize(
    "bad",
    [
        "short",
        "x" * 257,
        "",
        "abcdefgh\r\nFLUSHALL",
        "abcdefgh:other",
        "../../etc/passwd",
        "abcdefgh*",
        "abcdefgh ijk",
        "abcdéfghijk",
        "abcdefgh{sid}",
        b"abcdefghijkl",
        None,
    ],
)
async def test_unsafe_session_ids_refused(valkey_url, raw, bad):
    store = ValkeySessionStore(valkey_url)
    keys_before = await raw.dbsize()
    try:
        for call in (store.get(bad), store.set(bad, b"x"), store.delete(bad)):
            with pytest.raises(InvalidSessionId):
                await call
        assert await raw.dbsize() == keys_before
    finally:
        await store.close()
    with pytest.raises(InvalidSessionId):
        await MemorySessionStore().set(bad, b"x")


def test_safe_session_ids_accepted():
    for sid in ("a" * 8, "Z" * 256, "aB3_-.~,xyz", "k3s9d0f8g7h6j5k4l3m2n1b0v9c8x7z6"):
        assert check_session_id(sid) == sid
    assert issubclass(InvalidSessionId, ValueError) and issubclass(InvalidSessionId, SessionError)


def test_store_urls():
    assert isinstance(session_store_from_url("memory://"), MemorySessionStore)
    for url in ("redis://h:1/0", "rediss://h:1/0", "valkey://h:1/0", "valkeys://h:1/0"):
        assert isinstance(session_store_from_url(url), ValkeySessionStore)
    tls = session_store_from_url("valkeys://example.invalid:6380/2")
    client = tls.client
    assert (client.host, client.port, client.db) == ("example.invalid", 6380, 2)
    assert client.tls is not None and client.tls.verify_mode is ssl.CERT_REQUIRED
    plain = session_store_from_url("valkey://u:p%40ss@h:1/3?socket_timeout=0.25").client
    assert (plain.username, plain.password, plain.db, plain.tls) == ("u", "p@ss", 3, None)
    assert plain.timeout_s == 0.25
    with pytest.raises(ValueError, match="unsupported scheme 'http'"):
        session_store_from_url("http://h:1")


async def test_store_unreachable_is_a_session_error():
    store = ValkeySessionStore(f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=0.5")
    try:
        with pytest.raises(SessionStoreUnavailable, match="could not read"):
            await store.get(SID)
    finally:
        await store.close()


async def test_memory_store_expires():
    now = [100.0]
    store = MemorySessionStore(default_ttl_s=10, clock=lambda: now[0])
    await store.set(SID, b"data")
    assert await store.get(SID) == b"data"
    now[0] += 10
    assert await store.get(SID) is None


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize("size", [64 * 1024, 512 * 1024])
def test_codec_round_trips_large_sessions(size):
    codec = SessionCodec()
    data = os.urandom(size // 2) + b"user=alice;" * (size // 22)
    data = data[:size].ljust(size, b"\0")
    blob = codec.pack(data)
    assert blob[:1] == b"\x01"
    assert codec.unpack(blob) == data
    text = (json.dumps({"cart": list(range(20000))}).encode() * 10)[:size]
    assert len(codec.pack(text)) < size // 2  # compressed for the trip
    assert codec.unpack(codec.pack(text)) == text


@pytest.mark.parametrize("size", [0, 1, 200, 511, 512, 5000, 70_000])
def test_codec_packs_with_a_window_fit_to_the_session_that_any_inflater_reads(size):
    data = (b"session-" + bytes(range(256)) * (size // 256 + 1))[:size]
    blob = SessionCodec().pack(data)
    stream = blob[1:]
    window = 1 << ((stream[0] >> 4) + 8)  # RFC 1950: CINFO is log2(window) - 8
    assert window == max(512, min(32768, 1 << size.bit_length()))
    assert window > size or window == 32768
    assert zlib.decompress(stream) == data  # plain zlib: an older gateway reads it too
    assert SessionCodec().unpack(blob) == data
    # An older gateway's blob (the default 32 KiB window) still unpacks.
    assert SessionCodec().unpack(b"\x01" + zlib.compress(data, 6)) == data


def test_codec_limit_is_inclusive_and_oversize_refused_not_truncated():
    codec = SessionCodec(limit_bytes=64 * 1024)
    exact = os.urandom(64 * 1024)
    assert codec.unpack(codec.pack(exact)) == exact
    with pytest.raises(SessionTooLarge) as caught:
        codec.pack(exact + b"!")
    err = caught.value
    assert err.size == 64 * 1024 + 1 and err.limit == 64 * 1024
    message = str(err)
    assert "65,537 bytes" in message and "65,536 bytes" in message
    assert "[gateway] session_limit_bytes" in message and "not truncated" in message

    # The default limit is 1 MiB; the receiving side enforces its own limit too.
    big = SessionCodec().pack(b"a" * (1024 * 1024))
    with pytest.raises(SessionTooLarge, match=r"more than 65,536 bytes.*session_limit_bytes"):
        codec.unpack(big)
    with pytest.raises(SessionTooLarge):
        SessionCodec().pack(b"a" * (1024 * 1024 + 1))


def test_codec_refuses_a_decompression_bomb():
    bomb = b"\x01" + zlib.compress(b"\0" * (256 * 1024 * 1024), 9)  # 256 MiB inflated
    assert len(bomb) < 300 * 1024
    codec = SessionCodec()
    started = time.monotonic()
    with pytest.raises(SessionTooLarge) as caught:
        codec.unpack(bomb)
    assert caught.value.size == codec.limit_bytes + 1  # stopped one byte past the limit
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"", "empty"),
        (b"\x02" + zlib.compress(b"hi"), "unknown format marker 0x02"),
        (zlib.compress(b"hi"), "unknown format marker"),
        (b"\x01not zlib at all", "not a valid zlib stream"),
        (b"\x01" + zlib.compress(b"hello world" * 100)[:-6], "truncated"),
        (b"\x01" + zlib.compress(b"hello") + b"junk", "after the zlib stream"),
    ],
)
def test_codec_refuses_corrupt_blobs(blob, match):
    with pytest.raises(CorruptSession, match=match):
        SessionCodec().unpack(blob)


def test_codec_flipped_byte_is_refused():
    blob = bytearray(SessionCodec().pack(b"user_id=42;" * 1000))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(CorruptSession):
        SessionCodec().unpack(bytes(blob))


# --------------------------------------------------------------------------- middleware


async def login(request: Request) -> JSONResponse:
    body = await request.json()
    request.session["user"] = body["user"]
    return JSONResponse({"ok": True})


async def me(request: Request) -> JSONResponse:
    return JSONResponse({"user": request.session.get("user"), "session": dict(request.session)})


async def visit(request: Request) -> JSONResponse:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JSONResponse({"visits": request.session["visits"]})


async def logout(request: Request) -> JSONResponse:
    request.session.clear()
    return JSONResponse({"ok": True})


def build_app(store) -> SessionMiddleware:
    app = Starlette(
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/me", me),
            Route("/visit", visit, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
        ]
    )
    return SessionMiddleware(app, store, cookie_name="sid")


@pytest.fixture
async def served(valkey_url):
    """The app on a real uvicorn on a free port, stopped when the test ends."""
    store = ValkeySessionStore(valkey_url, key_template="test:mw:{sid}")
    port = free_port()
    config = uvicorn.Config(
        build_app(store), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", store
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await store.close()


async def test_middleware_login_then_next_request_sees_it(served, raw):
    base, store = served
    async with httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/me")
        assert r.json() == {"user": None, "session": {}}
        assert "set-cookie" not in r.headers  # empty session, no cookie: nothing stored
        assert [k async for k in raw.scan_iter("test:mw:*")] == []

        r = await client.post("/login", json={"user": "alice"})
        cookie = r.headers["set-cookie"]
        name_value, *attributes = [p.strip() for p in cookie.split(";")]
        name, sid = name_value.split("=", 1)
        assert name == "sid" and len(sid) == 43
        assert sorted(attributes) == ["HttpOnly", "Path=/", "SameSite=Lax"]  # no Secure: http
        assert json.loads(await raw.get(f"test:mw:{sid}")) == {"user": "alice"}
        assert 86390 <= await raw.ttl(f"test:mw:{sid}") <= 86400

        r = await client.get("/me")  # httpx sends the cookie back
        assert r.json()["user"] == "alice"
        assert "set-cookie" not in r.headers  # unchanged: not saved again, no cookie

        r = await client.post("/visit")
        assert r.json() == {"visits": 1} and "set-cookie" not in r.headers  # same sid
        assert json.loads(await store.get(sid)) == {"user": "alice", "visits": 1}

        r = await client.post("/logout")
        assert "Max-Age=0" in r.headers["set-cookie"]
        assert await raw.exists(f"test:mw:{sid}") == 0
        assert (await client.get("/me")).json()["user"] is None


async def test_middleware_secure_cookie_over_https_scheme(valkey_url):
    """Behind a TLS-terminating front uvicorn would set scheme=https; drive the ASGI app
    directly with that scope to check the attribute."""
    store = MemorySessionStore()
    app = build_app(store)
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b'{"user": "bob"}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/login",
        "raw_path": b"/login",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"example.com"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("example.com", 443),
    }
    await app(scope, receive, send)
    cookie = dict(sent[0]["headers"])[b"set-cookie"].decode()
    assert cookie.endswith("HttpOnly; SameSite=Lax; Secure")


async def test_middleware_ignores_unknown_or_hostile_cookies(served, raw):
    base, _ = served
    async with httpx.AsyncClient(base_url=base) as client:
        # A client-chosen id the store does not hold is not adopted (no session fixation).
        r = await client.post(
            "/login", json={"user": "mallory"}, headers={"cookie": "sid=attacker-chose-this"}
        )
        sid = r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        assert sid != "attacker-chose-this"
        assert await raw.exists("test:mw:attacker-chose-this") == 0
        # A hostile cookie value never reaches a key.
        r = await client.get("/me", headers={"cookie": "sid=../../x*{sid}:FLUSHALL"})
        assert r.status_code == 200 and r.json()["user"] is None
        r = await client.get("/me", headers={"cookie": "other=1; sid=" + sid})
        assert r.json()["user"] == "mallory"

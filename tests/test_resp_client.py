"""The gateway's Valkey client (`latitude.resp_client`) against a real Valkey: the three
commands, pipelining many callers on one connection, a Valkey that restarts, one that is not
there or does not answer, a refused AUTH, bytes of every value, and replies read by redis-py."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import redis.asyncio as aioredis

from latitude.lab.harness import free_port
from latitude.lab.valkey import running_valkey
from latitude.resp_client import RespClient, RespConnectionError, RespError


@pytest.fixture
async def client(valkey_port):
    c = RespClient(port=valkey_port)
    yield c
    await c.aclose()


async def test_get_set_delete_and_their_answers_as_redis_py_sees_them(client, valkey_port):
    key = f"resp-{os.urandom(4).hex()}"
    value = bytes(range(256)) * 4 + b"\r\n$-1\r\n"  # every byte, and RESP's own framing
    assert await client.get(key) is None
    assert await client.set(key, value, ex=30) is True
    assert await client.get(key) == value
    assert await client.set(key, b"other", nx=True) is None  # NX: it existed
    assert await client.get(key) == value
    other = aioredis.Redis(port=valkey_port)
    try:
        assert await other.get(key) == value and 0 < await other.ttl(key) <= 30
    finally:
        await other.aclose()
    assert await client.delete(key) == 1 and await client.delete(key) == 0
    assert await client.set("caf\xe9-" + key, b"\xff") is True  # a key outside ASCII
    assert await client.get("caf\xe9-" + key) == b"\xff"


async def test_many_callers_share_one_connection_and_each_gets_its_own_reply(client):
    keys = [f"resp-many-{i}-{os.urandom(3).hex()}" for i in range(200)]
    await asyncio.gather(*(client.set(k, k.encode() * (1 + i % 50)) for i, k in enumerate(keys)))
    values = await asyncio.gather(*(client.get(k) for k in keys))
    assert values == [k.encode() * (1 + i % 50) for i, k in enumerate(keys)]
    big = os.urandom(1024 * 1024)  # a reply that arrives in many pieces
    assert await client.set(keys[0], big) and await client.get(keys[0]) == big
    await client.delete(*keys)


async def test_an_error_reply_is_an_error_and_the_connection_goes_on(client, valkey_port):
    key = f"resp-list-{os.urandom(4).hex()}"
    other = aioredis.Redis(port=valkey_port)
    try:
        await other.rpush(key, b"x")
    finally:
        await other.aclose()
    with pytest.raises(RespError, match="WRONGTYPE"):
        await client.get(key)
    assert await client.delete(key) == 1  # same connection, next reply in order


async def test_a_valkey_that_restarts_fails_no_command():
    port = free_port()
    with running_valkey(port):
        c = RespClient(port=port)
        assert await c.set("k", b"before") is True
    with running_valkey(port):  # the old connection is dead; the first command is resent
        try:
            assert await c.get("k") is None  # a new, empty Valkey
            assert await c.set("k", b"after") is True
        finally:
            await c.aclose()


async def test_nobody_there_silence_and_a_refused_password_are_named_errors():
    port = free_port()
    c = RespClient(port=port, connect_timeout_s=1)
    with pytest.raises(RespConnectionError, match="cannot connect"):
        await c.get("k")
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        c = RespClient(port=silent.getsockname()[1], timeout_s=0.3, connect_timeout_s=0.3)
        with pytest.raises(RespConnectionError, match="no answer within 0.3 s"):
            await c.get("k")
        await c.aclose()
    finally:
        silent.close()
    with running_valkey(port):
        c = RespClient(port=port, password="wrong")
        with pytest.raises(RespConnectionError, match="refused us"):
            await c.get("k")
        await c.aclose()


async def test_hash_increments_add_up_as_redis_py_reads_them(client, valkey_port):
    key = f"resp-stats-{os.urandom(4).hex()}"
    await asyncio.gather(*(client.hincrbyfloat(key, "forwarded", 1) for _ in range(50)))
    assert await client.hincrbyfloat(key, "wait_ms_total", 2.5) == 2.5
    other = aioredis.Redis(port=valkey_port)
    try:
        assert await other.hgetall(key) == {b"forwarded": b"50", b"wait_ms_total": b"2.5"}
        await other.delete(key)
    finally:
        await other.aclose()

"""The forwarding pool under slow answers, in the shared lab world: a gateway whose answers are
late must not open new connections across the link (the liveness probe used to open one for
every 0.5 s an answer was late: 1,073 in 11.5 s at 64 concurrent clients)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid

import aiohttp

from latitude.lab.demo import calendar_argv
from latitude.lab.harness import free_port

PRIMARY, EU = "us-west", "eu-west"
SERVICE = "pooltest"
CLIENTS = 8
WRITES = 4
LINK_RTT_MS = 700  # every answer later than the gateway's 0.5 s path check


def app_relay_connections(world) -> int:
    """Connections accepted so far by the relays carrying eu-west's traffic to the primary's app."""
    target = f"127.0.0.1:{world.state().regions[PRIMARY].app_port}"
    for link in world.control().call("GET", "/status")["links"]:
        if {link["a"], link["b"]} == {PRIMARY, EU}:
            relays = [r for r in link["relays"] if r["target"] == target]
            assert relays, (target, link["relays"])  # "host:port" strings
            return sum(r["connections_total"] for r in relays)
    raise AssertionError("no us-west<->eu-west link")


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_latitude/status", timeout=10) as r:
        return json.loads(r.read())


def wait_up(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_latitude/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def test_late_answers_under_concurrency_open_no_new_link_connection(healed, calendar):
    world = calendar
    # A gateway of its own in eu-west, one process: one pool, one liveness probe to watch.
    port = free_port()
    world.set_service(EU, SERVICE, calendar_argv(world, EU, 1, extra=["--port", str(port)]))
    try:
        wait_up(port)
        base = f"http://127.0.0.1:{port}"
        sessions = [
            aiohttp.ClientSession(base, cookie_jar=aiohttp.CookieJar(unsafe=True))
            for _ in range(CLIENTS)
        ]
        statuses: list[int] = []
        try:
            for s in sessions:
                async with s.post("/login", json={"name": f"late-{uuid.uuid4().hex[:6]}"}) as r:
                    assert r.status == 200, await r.text()
            world.link("set", PRIMARY, EU, rtt_ms=LINK_RTT_MS)

            async def writer(i: int, s: aiohttp.ClientSession) -> None:
                # Staggered, so that answers keep arriving while others are still late.
                await asyncio.sleep(i * LINK_RTT_MS / 1000 / CLIENTS)
                for n in range(WRITES):
                    async with s.post("/events", json={"title": f"late {i}.{n}"}) as r:
                        await r.read()
                        statuses.append(r.status)

            writers = asyncio.gather(*(writer(i, s) for i, s in enumerate(sessions)))
            # Steady state: from the first answers on (the pool was warmed at start-up).
            await asyncio.sleep(1.5)
            before = app_relay_connections(world)
            forwarded_before = status(port)["decisions"].get("forwarded", 0)
            started = time.monotonic()
            await writers
            window_s = time.monotonic() - started
            world.link("set", PRIMARY, EU, rtt_ms=world.topology().rtt_ms(PRIMARY, EU))
            opened = app_relay_connections(world) - before
            after = status(port)
        finally:
            for s in sessions:
                await s.close()
        assert statuses == [201] * (CLIENTS * WRITES)
        late = after["decisions"].get("forwarded", 0) - forwarded_before
        # Every one of these answers was late by more than a path check's 0.5 s, so each
        # request asked whether the path is up at least once: one new connection per question
        # was 1.8 per late answer here. A recent answer (or probe) now proves the path is up,
        # and a probe is shared: at most one per 0.5 s, and far fewer than late answers.
        assert late >= CLIENTS * WRITES // 2
        assert opened <= window_s / 0.5 + 1, (opened, window_s, after["forwarding"])
        assert 4 * opened <= late, (opened, late, after["forwarding"])
        assert after["forwarding"]["probes_spared"] >= late // 2
        assert after["forwarding"]["idle_connections"] >= 1
    finally:
        world.kill(EU, SERVICE)


async def test_a_reset_link_leaves_the_pool_full_before_the_next_write(healed, calendar):
    """Every pooled connection reset (a middlebox, the primary's restart): the pool is full
    again within a second or two, in the background, so the next writes open no connection
    across the ocean (each would cost a second round trip)."""
    world = calendar
    port = free_port()
    world.set_service(EU, SERVICE, calendar_argv(world, EU, 1, extra=["--port", str(port)]))
    try:
        wait_up(port)
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}", cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as s:
            async with s.post("/login", json={"name": f"reset-{uuid.uuid4().hex[:6]}"}) as r:
                assert r.status == 200, await r.text()
            full = status(port)["forwarding"]["warmed"]
            assert full >= 1
            await asyncio.to_thread(world.link, "reset", PRIMARY, EU)
            deadline = time.monotonic() + 10
            while (pool := status(port)["forwarding"])["idle_connections"] < full:
                assert time.monotonic() < deadline, f"the pool stayed short after the reset: {pool}"
                await asyncio.sleep(0.1)
            opened = pool["opened"]
            for n in range(3):
                async with s.post("/events", json={"title": f"after reset {n}"}) as r:
                    assert r.status == 201, await r.text()
            assert status(port)["forwarding"]["opened"] == opened
    finally:
        world.kill(EU, SERVICE)

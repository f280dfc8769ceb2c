"""What a mirror answers must never be older than it admits (issue 10, items 2-4): no 304 for
changed bytes to a client revalidating with If-Modified-Since alone, health measured against
the primary's real head, stale indexes fetched from the primary. Real HTTP on loopback."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from latitude.mirror import ContentRoot, Item
from latitude.mirror.store import parse_http_date
from tests.test_mirror import keyring, net, until  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)


async def get(s: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, dict, bytes]:
    async with s.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_if_modified_since_alone_never_gets_304_for_changed_bytes(net):  # noqa: F811
    await net.primary()
    server, _ = await net.mirror("eu")
    mirror_url = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as s:
        for round_ in range(3):
            # Start right after a second boundary: all three publishes land in one second.
            await asyncio.sleep(1 - time.time() % 1 + 0.01)
            started = int(time.time())
            seen: dict[str, str] = {}
            for version in range(3):
                change = net.pub.publish("p2/acme/hello.json", f'{{"v": "{round_}.{version}"}}')
                body = f'{{"v": "{round_}.{version}"}}'.encode()
                await until(
                    lambda c=change: ContentRoot(net.tmp / "eu").cursor() >= c.serial,
                    what="sync",
                )
                for name, base in (("primary", net.primary_url), ("eu", mirror_url)):
                    url = f"{base}/p2/acme/hello.json"
                    if name in seen:  # revalidate as composer does: If-Modified-Since only
                        status, h, got = await get(s, url, **{"If-Modified-Since": seen[name]})
                        assert status == 200 and got == body, (name, round_, version, status)
                    status, h, got = await get(s, url)
                    assert status == 200 and got == body
                    seen[name] = h["Last-Modified"]
                    # An unchanged file is still revalidated cheaply.
                    status, _, _ = await get(s, url, **{"If-Modified-Since": h["Last-Modified"]})
                    assert status == 304, (name, version)
            assert int(time.time()) == started, "the machine was too slow for one second"


async def test_an_explicit_older_mtime_still_moves_last_modified_forward(net):  # noqa: F811
    await net.primary()
    first = net.pub.publish("x.json", "1", mtime=1_700_000_000.5)
    second = net.pub.publish("x.json", "2", mtime=1_600_000_000.0)
    assert int(second.mtime) > int(first.mtime)
    async with aiohttp.ClientSession() as s:
        status, h, _ = await get(
            s, f"{net.primary_url}/x.json", **{"If-Modified-Since": "Tue, 14 Nov 2023 22:13:20 GMT"}
        )
        assert status == 200 and parse_http_date(h["Last-Modified"]) == int(second.mtime)


# ------------------------------------------------------------------------------------ health


async def health(s: aiohttp.ClientSession, base: str) -> tuple[int, dict]:
    async with s.get(f"{base}/_latitude/mirror/health") as r:
        return r.status, await r.json()


async def test_health_compares_with_the_primarys_real_head_when_the_sync_is_stopped(net):  # noqa: F811
    await net.primary()
    net.pub.publish("simple/a/", "a")
    server, daemon = await net.mirror("eu", max_lag_s=1.0)
    base = f"http://127.0.0.1:{server.port}"
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 1, what="sync")
    async with aiohttp.ClientSession() as s:
        status, h = await health(s, base)
        assert status == 200 and h["healthy"] and h["sync"] == "running", h
        await net.stop_sync(daemon)
        status, h = await health(s, base)  # at once: no process holds the sync lock
        assert status == 503 and h["sync"] == "not running" and not h["healthy"], h
        assert any("sync daemon is not running" in p for p in h["problems"])
        published_at = time.time()
        for i in range(3):
            net.pub.publish(f"simple/b{i}/", "b")

        async def behind() -> dict:
            return (await health(s, base))[1]

        deadline = time.monotonic() + 5
        while (h := await behind())["behind_serials"] != 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert h["primary_serial"] == 4 and h["serial"] == 1 and h["behind_serials"] == 3, h
        assert published_at - 0.5 <= h["behind_since"] <= time.time()
        # A daemon that runs but cannot apply anything: unhealthy once behind past max_lag_s.
        net.sync("eu", files_url="http://127.0.0.1:9", inline=0)  # nothing listens there
        await until(lambda: ContentRoot(net.tmp / "eu").sync_running(), what="the daemon")
        status, h = await health(s, base)
        assert h["sync"] == "running" and h["behind_serials"] == 3
        await asyncio.sleep(1.2)
        status, h = await health(s, base)
        assert status == 503 and h["behind_seconds"] > 1.0 and h["behind_serials"] == 3, h
        assert any("max_lag_s" in p for p in h["problems"])


async def test_a_killed_sync_process_makes_health_503_at_once(net, tmp_path):  # noqa: F811
    import signal
    import subprocess
    import sys

    await net.primary()
    net.pub.publish("simple/a/", "a")
    server, _ = await net.mirror("eu", sync=False)
    base = f"http://127.0.0.1:{server.port}"
    code = (
        "import asyncio, os, sys; from latitude import signing; "
        "from latitude.mirror import SyncDaemon; "
        "k = signing.SigningKey('k1', bytes.fromhex(os.environ['KEY'])); "
        "asyncio.run(SyncDaemon(sys.argv[1], sys.argv[2], signing.Keyring([k], 'k1'),"
        " poll_timeout_s=10).run())"
    )
    key = net.keyring.signing_key.secret.hex()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(net.tmp / "eu"), net.primary_url],
        env={**os.environ, "KEY": key},
    )
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                status, h = await health(s, base)
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200 and h["sync"] == "running", h
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            status, h = await health(s, base)
            assert status == 503 and h["sync"] == "not running", h
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_mirror_started_before_its_primary_reports_it_reachable_at_once(net):  # noqa: F811
    """A failed head poll must not leave health saying "unreachable" for a whole long poll
    (poll_timeout_s) after the primary answers: nothing is published, so a parked poll would
    only end at its timeout. `latitude demo` waits for every mirror to be reachable."""
    import socket

    from latitude.mirror import MirrorServer, Publisher

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    net.primary_url = f"http://127.0.0.1:{port}"
    server, _ = await net.mirror("eu", poll_timeout_s=40)
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as s:
        await until(lambda: server._head_error is not None, what="the head poll to fail")
        status, h = await health(s, base)
        assert h["primary"] == "unreachable", h
        primary = MirrorServer(
            net.tmp / "primary",
            region="us",
            is_primary=True,
            keyring=net.keyring,
            poll_timeout_s=40,
        )
        await primary.start(port=port)
        net.servers.append(primary)
        net.pub = Publisher(net.tmp / "primary")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, h = await health(s, base)
            if h["primary"] == "reachable" and h["behind_seconds"] == 0:
                break
            await asyncio.sleep(0.05)
        assert status == 200 and h["primary"] == "reachable" and h["error"] is None, h
        assert h["behind_seconds"] == 0 and h["healthy"], h


# ------------------------------------------------------------------------- stale index files


async def test_an_index_known_to_be_behind_is_fetched_from_the_primary(net):  # noqa: F811
    primary = await net.primary()
    net.pub.publish_many(
        [
            Item("packages.json", '{"metadata-url": "/p2/%package%.json"}'),
            Item("p2/acme/hello.json", '{"v": "1.0.0"}'),
            Item("dist/hello-1.0.0.zip", b"zip 1"),
        ]
    )
    server, daemon = await net.mirror("eu")
    base = f"http://127.0.0.1:{server.port}"
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 3, what="sync")
    await net.stop_sync(daemon)
    net.pub.publish("p2/acme/hello.json", '{"v": "1.0.1"}')
    await until(lambda: server.behind(), what="the mirror to hear of the new head")
    async with aiohttp.ClientSession() as s:
        status, h, body = await get(s, f"{base}/p2/acme/hello.json")
        assert (
            status == 200 and body == b'{"v": "1.0.1"}' and h["Latitude-Mirror-Source"] == "primary"
        )
        status, h, body = await get(s, f"{base}/dist/hello-1.0.0.zip")  # not an index: local
        assert status == 200 and body == b"zip 1" and "Latitude-Mirror-Source" not in h
        # The stale local copy is left for the sync daemon to replace.
        assert (net.tmp / "eu/p2/acme/hello.json").read_bytes() == b'{"v": "1.0.0"}'
        # With the primary gone, the local copy is the best answer left (not a 502).
        await primary.close()
        status, h, body = await get(s, f"{base}/p2/acme/hello.json")
        assert status == 200 and body == b'{"v": "1.0.0"}', status

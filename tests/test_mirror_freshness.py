"""What a mirror answers must never be older than it admits (issue 10, items 2-4): no 304 for
changed bytes to a client revalidating with If-Modified-Since alone, health measured against
the primary's real head, stale indexes fetched from the primary. Real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from latitude.mirror import ContentRoot
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

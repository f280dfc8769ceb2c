"""The streaming feed on loopback: one held response carrying each change as it commits, signed
frame by frame, resumed by serial; and the sync daemon following it with every guarantee of the
mirror contract (the contract's own tests in test_mirror.py run through the stream too)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web

from latitude import signing
from latitude.mirror import ContentRoot, FeedClient, FeedError, Item, SyncDaemon
from latitude.mirror.changelog import Page
from latitude.mirror.feed import STREAM, FeedServer
from tests.test_mirror import Net, Recording, tree, until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keyring() -> signing.Keyring:
    return signing.Keyring([signing.SigningKey.generate("k1")], "k1")


@pytest.fixture
async def net(tmp_path, keyring):
    n = Net(tmp_path, keyring)
    try:
        yield n
    finally:
        await n.close()


async def next_page(frames, timeout: float = 5.0) -> Page:
    return await asyncio.wait_for(frames.__anext__(), timeout)


async def test_one_held_response_carries_each_commit_and_heartbeats(net):
    await net.primary()
    net.pub.publish("a.json", b'{"v": 1}')
    async with aiohttp.ClientSession() as s:
        feed = FeedClient(s, net.primary_url, net.keyring)
        async with feed.stream(0, heartbeat=1.0) as frames:
            first = await next_page(frames)
            assert [(c.serial, c.path) for c in first.changes] == [(1, "a.json")]
            assert first.changes[0].data == b'{"v": 1}'  # small files travel inline
            # Idle: a heartbeat (no changes) within the interval, on the same response.
            t0 = time.monotonic()
            beat = await next_page(frames)
            assert beat.changes == () and beat.head == 1
            assert 0.5 < time.monotonic() - t0 < 4
            # Each later commit arrives as its own frame, in order, with no new request.
            for i in range(2, 5):
                net.pub.publish(f"b{i}.json", b"{}")
                page = await next_page(frames)
                while not page.changes:  # a heartbeat may come first
                    page = await next_page(frames)
                assert [c.serial for c in page.changes] == [i]
        # Resume by serial: a new stream from 2 starts with serial 3.
        async with feed.stream(2, heartbeat=1.0) as frames:
            page = await next_page(frames)
            assert [c.serial for c in page.changes] == [3, 4]


async def test_stream_refuses_unsigned_other_keys_and_tampered_frames(net):
    await net.primary()
    net.pub.publish("GOOD.json", b'{"GOOD": 1}')
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net.primary_url}{STREAM}?since=0") as r:
            assert r.status == 401 and "signature" in (await r.text()).lower()
        other = signing.Keyring([signing.SigningKey.generate("k1")], "k1")
        with pytest.raises(FeedError, match="401"):
            async with FeedClient(s, net.primary_url, other).stream(0, 1.0) as frames:
                await next_page(frames)
        # A relay that rewrites bytes in flight (same length, so the framing still parses).
        proxy = await tampering_relay(net.primary_url, b"GOOD", b"EVIL")
        try:
            with pytest.raises(FeedError, match="signature|digest"):
                async with FeedClient(s, proxy.url, net.keyring).stream(0, 1.0) as frames:
                    await next_page(frames)
        finally:
            await proxy.close()


async def test_frames_that_do_not_continue_the_cursor_are_refused(net, keyring):
    """Genuinely signed frames, but one skips ahead (a dropped frame, a replay, a reorder)."""
    server = await net.primary()
    net.pub.publish_many([Item(f"f{i}.json", b"{}") for i in range(3)])
    feed: FeedServer = server.feed

    async def gappy(request: web.Request) -> web.StreamResponse:
        await feed._verify(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        changes = feed.log.since(0, 10).changes
        await resp.write(feed._frame(request, 0, Page(3, 0, changes[:1])))
        await resp.write(feed._frame(request, 2, Page(3, 0, changes[2:])))  # serial 2 lost
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get(STREAM, gappy)
    url = await net.app(app)
    async with aiohttp.ClientSession() as s:
        async with FeedClient(s, url, keyring).stream(0, 1.0) as frames:
            assert [c.serial for c in (await next_page(frames)).changes] == [1]
            with pytest.raises(FeedError, match="not from 1"):
                await next_page(frames)


async def test_stream_past_retention_answers_resync_and_ends(net):
    await net.primary()
    net.pub.publish_many([Item(f"f/{i}.txt", "x") for i in range(5)])
    net.pub.log.prune(older_than_s=0, now=time.time() + 1)
    async with aiohttp.ClientSession() as s:
        async with FeedClient(s, net.primary_url, net.keyring).stream(1, 1.0) as frames:
            page = await next_page(frames)
            assert page.resync
            with pytest.raises(StopAsyncIteration):
                await next_page(frames)


async def test_a_burst_arrives_whole_and_in_order(net):
    """100 publishes 10 ms apart while the mirror follows the stream: every file, in order,
    the cursor at the head, the tree identical; the index only after the files it names."""
    await net.primary()
    await net.mirror("eu", sync=False)
    d = net.sync("eu", cls=Recording)
    await until(lambda: ContentRoot(net.tmp / "eu").status().get("waiting_since"), what="parked")
    names = [f"packages/p{i}.whl" for i in range(100)]
    for n in names:
        net.pub.publish(n, n.encode() * 10)
        await asyncio.sleep(0.01)
    net.pub.publish("simple/p/", "".join(f'<a href="/{n}">x</a>' for n in names))
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == net.pub.serial, what="the burst")
    assert tree(net.tmp / "eu") == tree(net.tmp / "primary")
    assert d.stored == [*names, "simple/p/index.html"]  # in commit order, the index last
    # It stayed on one stream: nothing failed, nothing was re-requested.
    st = ContentRoot(net.tmp / "eu").status()
    assert st.get("error") is None and not st.get("resyncs")


async def test_mirror_parked_in_the_stream_reports_itself_current(net):
    await net.primary(poll_timeout_s=2)  # heartbeats every second
    server, _ = await net.mirror("eu", sync=False, poll_timeout_s=2)
    net.sync("eu", cls=lambda *a, **k: SyncDaemon(*a, **{**k, "poll_timeout_s": 2}))
    net.pub.publish("a.json", b"{}")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 1, what="sync")
    # Past the hold + 5 s that a parked poll counts as current: only heartbeats keep it so.
    await asyncio.sleep(8)
    report = server.health_report()
    assert report["healthy"] and report["behind_seconds"] == 0.0, report
    assert report["last_contact_s_ago"] < 2.5


async def test_primary_without_a_stream_is_long_polled(net):
    """An older primary (no /stream): the mirror falls back to long polls and still syncs."""
    await net.primary()
    url = await net.app(no_stream_proxy(net.primary_url))
    await net.mirror("eu", sync=False)
    daemon = net.sync("eu")
    daemon.primary_url = url  # the feed through the proxy; files straight from the primary
    net.pub.publish_many([Item(f"f/{i}.json", "{}") for i in range(5)])
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 5, what="sync via long polls")
    assert daemon.stream is False  # it noticed, and stays on long polls
    net.pub.publish("g.json", b"{}")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 6, what="the next change")


# ---- helpers -------------------------------------------------------------------------------


def no_stream_proxy(upstream: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if request.path == STREAM:
            return web.Response(status=404, text="not found")
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.request(
                request.method, upstream + request.raw_path, headers=request.headers
            ) as r:
                body = await r.read()
                skip = ("content-length", "transfer-encoding", "date", "server")
                headers = {k: v for k, v in r.headers.items() if k.lower() not in skip}
        return web.Response(status=r.status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class Relay:
    def __init__(self, server: asyncio.Server, url: str):
        self.server, self.url = server, url

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


async def tampering_relay(upstream: str, old: bytes, new: bytes) -> Relay:
    """A TCP relay to `upstream` that replaces `old` by `new` in what comes back."""
    host, port = upstream.rsplit("/", 1)[-1].split(":")

    async def pipe(reader, writer, rewrite: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data.replace(old, new) if rewrite else data)
                await writer.drain()
        writer.close()

    async def serve(client_r, client_w) -> None:
        up_r, up_w = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(client_r, up_w, False), pipe(up_r, client_w, True))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return Relay(server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")

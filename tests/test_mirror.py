"""The mirror's parts on loopback: change log, publisher, signed feed, sync daemon, serving, nginx.

Everything talks real HTTP over 127.0.0.1; the tests in test_mirror_lab.py run the same entry
points in the lab's regions, across its emulated links.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from latitude import signing
from latitude.mirror import (
    ChangeLog,
    ContentRoot,
    FeedClient,
    FeedError,
    Item,
    MirrorServer,
    Publisher,
    SyncDaemon,
)
from latitude.mirror.feed import SERIAL_HEADER
from latitude.mirror.sync import verdict

pytestmark = pytest.mark.timeout(60)


def tree(root: Path) -> dict[str, str]:
    return ContentRoot(root).hashes()


async def until(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def keyring() -> signing.Keyring:
    return signing.Keyring([signing.SigningKey.generate("k1")], "k1")


class Net:
    """A primary and mirrors on loopback, in this process (no emulated links)."""

    def __init__(self, tmp: Path, keyring: signing.Keyring):
        self.tmp = tmp
        self.keyring = keyring
        self.servers: list[MirrorServer] = []
        self.daemons: list[tuple[SyncDaemon, asyncio.Task]] = []
        self.apps: list[web.AppRunner] = []

    async def primary(self, **kw) -> MirrorServer:
        kw.setdefault("poll_timeout_s", 10)
        server = MirrorServer(
            self.tmp / "primary", region="us", is_primary=True, keyring=self.keyring, **kw
        )
        await server.start()
        self.servers.append(server)
        self.pub = Publisher(self.tmp / "primary")
        self.primary_url = f"http://127.0.0.1:{server.port}"
        return server

    async def mirror(
        self,
        name: str,
        *,
        sync: bool = True,
        files_url: str | None = None,
        primary_url: str | None = None,
        inline: int = 64 * 1024,
        **kw,
    ) -> tuple[MirrorServer, SyncDaemon | None]:
        server = MirrorServer(
            self.tmp / name,
            region=name,
            is_primary=False,
            primary_url=primary_url or self.primary_url,
            keyring=self.keyring,
            **kw,
        )
        await server.start()
        self.servers.append(server)
        daemon = self.sync(name, files_url, inline=inline) if sync else None
        return server, daemon

    def sync(self, name: str, files_url: str | None = None, cls=SyncDaemon, **kw) -> SyncDaemon:
        daemon = cls(
            self.tmp / name,
            self.primary_url,
            self.keyring,
            files_url=files_url,
            poll_timeout_s=10,
            region=name,
            **kw,
        )
        self.daemons.append((daemon, asyncio.create_task(daemon.run())))
        return daemon

    async def stop_sync(self, daemon: SyncDaemon) -> None:
        for d, task in self.daemons:
            if d is daemon:
                d.stop()
                await asyncio.wait_for(task, 15)

    async def app(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.apps.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        for d, _ in self.daemons:
            d.stop()
        for _, task in self.daemons:
            await asyncio.wait_for(task, 15)
        for s in self.servers:
            await s.close()
        for r in self.apps:
            await r.cleanup()
        if hasattr(self, "pub"):
            self.pub.close()


@pytest.fixture
async def net(tmp_path, keyring):
    n = Net(tmp_path, keyring)
    try:
        yield n
    finally:
        await n.close()


def corrupting_proxy(upstream: str, state: dict) -> web.Application:
    """Forwards to `upstream`; while state["corrupt"], turns every b"GOOD" into b"EVIL"."""

    async def handle(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.request(
                request.method,
                upstream + request.raw_path,
                data=await request.read(),
                headers=request.headers,
            ) as r:  # Host kept, as a TCP relay would
                body = await r.read()
                headers = {
                    k: v
                    for k, v in r.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "date", "server")
                }
        if state["corrupt"]:
            body = body.replace(b"GOOD", b"EVIL")
        state["requests"] = state.get("requests", 0) + 1
        return web.Response(status=r.status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


# ---------------------------------------------------------------------------------- change log


def test_change_log_serials_retention_snapshot(tmp_path):
    with Publisher(tmp_path / "p") as pub:
        a = pub.publish("a.txt", b"one")
        b = pub.publish("b.txt", "two")
        c = pub.publish("a.txt", b"three")
        d = pub.delete("b.txt")
        assert [a.serial, b.serial, c.serial, d.serial] == [1, 2, 3, 4]
        assert (tmp_path / "p/a.txt").read_bytes() == b"three" and not (
            tmp_path / "p/b.txt"
        ).exists()
        assert c.sha256 == hashlib.sha256(b"three").hexdigest()
    log = ChangeLog(tmp_path / "p/.latitude/changes.sqlite")  # durable: a new connection sees it
    try:
        page = log.since(1)
        assert [(x.serial, x.op, x.path) for x in page.changes] == [
            (2, "put", "b.txt"),
            (3, "put", "a.txt"),
            (4, "delete", "b.txt"),
        ]
        assert page.head == 4 and page.next == 4 and not page.resync
        assert log.since(1, limit=2).next == 3
        serial, files = log.snapshot()
        assert serial == 4 and [(f["path"], f["serial"]) for f in files] == [("a.txt", 3)]
        assert log.prune(older_than_s=3600) == 0  # nothing is that old
        assert log.prune(older_than_s=0, now=time.time() + 1) == 4
        assert log.since(3).resync and not log.since(4).resync
    finally:
        log.close()
    with Publisher(tmp_path / "p") as pub:  # serials are never reused, even after pruning
        assert pub.publish("c.txt", b"x").serial == 5


def test_publisher_paths_gzip_and_tree_scan(tmp_path):
    with Publisher(tmp_path / "p", precompress=True) as pub:
        changes = pub.publish_many([Item("simple/x/", "<a>x</a>"), Item("pkg/x.whl", b"\x00wheel")])
        assert [c.path for c in changes] == [
            "simple/x/index.html",
            "simple/x/index.html.gz",
            "pkg/x.whl",
        ]
        assert gzip.decompress((tmp_path / "p/simple/x/index.html.gz").read_bytes()) == b"<a>x</a>"
        for bad in ("../etc/passwd", "a/../../b", ".latitude/changes.sqlite", "a/.latitude-tmp-x"):
            with pytest.raises(ValueError):
                pub.publish(bad, b"no")
        assert not list((tmp_path / "p").rglob(".latitude-tmp-*"))
        # Files put in place by another tool (or a crash between rename and commit) are recorded.
        (tmp_path / "p/pkg/y.whl").write_bytes(b"y")
        (tmp_path / "p/pkg/x.whl").unlink()
        found = {(c.op, c.path) for c in pub.publish_tree()}
        assert found == {("put", "pkg/y.whl"), ("delete", "pkg/x.whl")}
        assert pub.publish_tree() == []
        gone = pub.delete("simple/x/")
        assert (
            gone.path == "simple/x/index.html.gz"
            and not (tmp_path / "p/simple/x/index.html").exists()
        )


# ------------------------------------------------------------------------------------- feed


async def test_feed_long_poll_wakes_on_publish_from_another_process(net, tmp_path):
    await net.primary()
    async with aiohttp.ClientSession() as s:
        feed = FeedClient(s, net.primary_url, net.keyring)
        assert (await feed.changes(0, 0)).head == 0
        poll = asyncio.create_task(feed.changes(0, 10))
        await asyncio.sleep(0.3)
        assert not poll.done()
        src = tmp_path / "index.html"
        src.write_text("hello")
        done_at: list[float] = []
        poll.add_done_callback(lambda _: done_at.append(time.monotonic()))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "latitude.cli",
            "mirror",
            "publish",
            "--root",
            str(tmp_path / "primary"),
            f"demo/index.html={src}",
            stdout=asyncio.subprocess.PIPE,
        )
        first = await proc.stdout.readline()  # printed once the commit is made
        printed_at = time.monotonic()
        out = first + await proc.stdout.read()
        await proc.wait()
        assert proc.returncode == 0 and b"serial 1" in out
        page = await poll
        # The poke from the publishing process wakes the parked poll at once (the 0.5 s
        # fallback poll of the log is not what answered it). Timed from the commit, not from
        # the spawn: a busy host takes seconds to start the publisher's interpreter.
        assert done_at[0] - printed_at < 0.5 + 5, "long poll did not return after the publish"
        assert [c.path for c in page.changes] == ["demo/index.html"] and page.head == 1


async def test_feed_refuses_unsigned_or_forged_and_detects_tampering(net):
    await net.primary()
    net.pub.publish("GOOD.json", b"{}")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{net.primary_url}/_latitude/mirror/changes?since=0&timeout=0") as r:
            assert r.status == 401 and "signature" in (await r.text()).lower()
        other = signing.Keyring([signing.SigningKey.generate("k1")], "k1")
        with pytest.raises(FeedError, match="401"):
            await FeedClient(s, net.primary_url, other).changes(0, 0)
        state = {"corrupt": True}
        proxy = await net.app(corrupting_proxy(net.primary_url, state))
        with pytest.raises(FeedError, match="signature|digest"):
            await FeedClient(s, proxy, net.keyring).changes(0, 0)  # sha256s could be forged
        state["corrupt"] = False
        page = await FeedClient(s, proxy, net.keyring).changes(0, 0)
        assert page.changes[0].path == "GOOD.json"


# ------------------------------------------------------------------------------------- sync


class Recording(SyncDaemon):
    """A sync daemon that notes the order in which it stores files."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored: list[str] = []

    async def store(self, items, touched):
        await super().store(items, touched)
        self.stored += [change.path for change, _ in items]


async def test_sync_applies_batches_in_order_and_keeps_last_modified(net):
    await net.primary()
    old = time.time() - 3600
    names = [f"packages/p{i}.whl" for i in range(300)]
    net.pub.publish_many(
        [Item(n, f"wheel {n}".encode() * 500, mtime=old) for n in names]
        + [Item("simple/p/", "".join(f'<a href="/{n}">x</a>' for n in names))]
        + [Item("big.bin", os.urandom(600_000))]
    )
    net.pub.publish("gone.txt", b"soon deleted")
    net.pub.delete("gone.txt")
    await net.mirror("eu", sync=False)
    daemon = d = net.sync("eu", cls=Recording)
    await until(
        lambda: ContentRoot(net.tmp / "eu").cursor() == net.pub.serial, what="mirror caught up"
    )
    assert tree(net.tmp / "eu") == tree(net.tmp / "primary")
    assert d.stored.index("simple/p/index.html") > max(d.stored.index(n) for n in names)
    assert "gone.txt" not in d.stored  # collapsed: only the last change of a path is applied
    assert 0 < d.files_inline < 300  # the feed carried some inline, bundles brought the rest
    assert int((net.tmp / "eu/packages/p1.whl").stat().st_mtime) == int(old)
    assert not list((net.tmp / "eu").rglob(".latitude-tmp-*"))
    # A publish now reaches the mirror through the parked long poll.
    t0 = time.monotonic()
    net.pub.publish("simple/q/", "new")
    await until(lambda: (net.tmp / "eu/simple/q/index.html").exists(), what="new file")
    assert time.monotonic() - t0 < 5
    assert daemon.status["caught_up_at"] > 0


async def test_bytes_not_matching_sha256_are_never_stored_and_cursor_waits_for_the_batch(net):
    await net.primary()
    net.pub.publish_many(
        [Item("ok.txt", b"fine"), Item("bad.txt", b"GOOD bytes"), Item("simple/i/", "idx")]
    )
    state = {"corrupt": True}
    proxy = await net.app(corrupting_proxy(net.primary_url, state))
    server, daemon = await net.mirror("eu", files_url=proxy, inline=0)
    await until(lambda: daemon.status.get("error"), what="the batch to fail")
    await asyncio.sleep(0.5)
    root = net.tmp / "eu"
    assert not (root / "bad.txt").exists()
    assert ContentRoot(root).cursor() == 0, "cursor saved before the batch fully succeeded"
    assert not (root / "simple/i/index.html").exists(), "an index was written before its files"
    assert "sha256" in daemon.status["error"]
    # The node serves the primary's (good) bytes for it, never the damaged ones.
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.port}/bad.txt") as r:
        assert r.status == 200 and await r.read() == b"GOOD bytes"
    state["corrupt"] = False
    await until(lambda: ContentRoot(root).cursor() == 3, timeout=15, what="recovery")
    assert (root / "bad.txt").read_bytes() == b"GOOD bytes"


async def test_file_older_than_its_change_is_retried_not_stored(net):
    """Mirror B syncs its feed from the primary but its files from mirror A, which lags.

    (Not an index: A would know its index is behind and ask the primary for it.)
    """
    await net.primary()
    net.pub.publish("packages/pkg.txt", "version 1", mtime=time.time() - 600)
    a_server, a_sync = await net.mirror("a")
    await until(lambda: ContentRoot(net.tmp / "a").cursor() == 1, what="A synced v1")
    await net.stop_sync(a_sync)
    net.pub.publish("packages/pkg.txt", "version 2")
    b_server, b_sync = await net.mirror(
        "b", files_url=f"http://127.0.0.1:{a_server.port}", inline=0
    )
    await until(
        lambda: "older than the change" in (b_sync.status.get("error") or ""),
        what="B refusing A's old copy",
    )
    assert not (net.tmp / "b/packages/pkg.txt").exists()
    assert ContentRoot(net.tmp / "b").cursor() == 0
    net.sync("a")  # A catches up; B's retry now gets version 2
    await until(lambda: ContentRoot(net.tmp / "b").cursor() == 2, timeout=15, what="B caught up")
    assert (net.tmp / "b/packages/pkg.txt").read_text() == "version 2"
    assert verdict(net.pub.log.since(1).changes[0], None) == "retry"


async def test_resync_after_retention_ends_with_identical_tree(net):
    await net.primary()
    net.pub.publish_many([Item(f"f/{i}.txt", f"v1 {i}") for i in range(20)])
    server, daemon = await net.mirror("eu")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 20, what="first sync")
    await net.stop_sync(daemon)
    net.pub.publish_many([Item(f"f/{i}.txt", f"v2 {i}") for i in range(10)])
    net.pub.delete_many([f"f/{i}.txt" for i in range(15, 20)])
    net.pub.publish("new/file.txt", b"new")
    (net.tmp / "eu/f/0.txt").write_text("local damage")  # resync compares hashes, not names
    assert net.pub.log.prune(older_than_s=0, now=time.time() + 1) == net.pub.serial
    daemon = net.sync("eu")
    await until(lambda: daemon.status.get("resyncs"), what="resync")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == net.pub.serial, what="resynced")
    assert tree(net.tmp / "eu") == tree(net.tmp / "primary")


# ------------------------------------------------------------------------------------ serving


async def test_serving_etag_304_gzip_fallback_proxy_and_serial(net):
    async def website(request: web.Request) -> web.Response:
        return web.Response(
            text=f"site {request.method} {request.path_qs} {await request.text()}",
            headers={"X-Site": "1"},
        )

    site = web.Application()
    site.router.add_route("*", "/{tail:.*}", website)
    site_url = await net.app(site)
    await net.primary(website_url=site_url, paths=("/simple/", "/packages/"))
    with Publisher(net.tmp / "primary", precompress=True) as pub:
        pub.publish("simple/demo/", "<html>" + "demo " * 200 + "</html>")
    server, daemon = await net.mirror("eu", website_url=site_url, paths=("/simple/", "/packages/"))
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 2, what="sync")
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(f"{base}/simple/demo/", headers={"Accept-Encoding": "identity"}) as r:
            body = await r.read()
            etag, lm = r.headers["ETag"], r.headers["Last-Modified"]
            assert (
                r.status == 200 and body.startswith(b"<html>") and r.headers[SERIAL_HEADER] == "2"
            )
            assert (
                etag == f'"{hashlib.sha256(body).hexdigest()}"'
                and r.headers["Vary"] == "Accept-Encoding"
            )
        async with s.get(f"{base}/simple/demo/", headers={"Accept-Encoding": "gzip, br"}) as r:
            assert (
                r.headers["Content-Encoding"] == "gzip" and gzip.decompress(await r.read()) == body
            )
        plain = {"Accept-Encoding": "identity"}
        async with s.get(f"{base}/simple/demo/", headers={**plain, "If-None-Match": etag}) as r:
            assert r.status == 304 and r.headers[SERIAL_HEADER] == "2"
        async with s.get(f"{base}/simple/demo/", headers={"If-None-Match": etag}) as r:
            assert (
                r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            )  # another representation
        async with s.get(f"{base}/simple/demo/", headers={**plain, "If-Modified-Since": lm}) as r:
            assert r.status == 304
        async with s.head(f"{base}/simple/demo/index.html", headers=plain) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == len(body)
        async with s.get(f"{base}/simple/demo", allow_redirects=False) as r:
            assert r.status == 301 and r.headers["Location"] == "/simple/demo/"
        async with s.get(f"{base}/simple/.latitude/cursor") as r:
            assert r.status == 404 and SERIAL_HEADER in r.headers
        # The website is the primary's: proxied, body and all.
        async with s.post(f"{base}/account/login?next=/", data=b"user=a") as r:
            assert (
                await r.text() == "site POST /account/login?next=/ user=a"
                and r.headers["X-Site"] == "1"
            )
            assert r.headers[SERIAL_HEADER] == "2"
        # A file the mirror lacks: fetched from the primary, kept, never 404.
        await net.stop_sync(daemon)
        net.pub.publish("packages/new.whl", b"wheel bytes")
        async with s.get(f"{base}/packages/new.whl") as r:
            assert r.status == 200 and await r.read() == b"wheel bytes"
            assert r.headers["Latitude-Mirror-Source"] == "primary"
        assert (net.tmp / "eu/packages/new.whl").read_bytes() == b"wheel bytes"
        async with s.get(f"{base}/packages/new.whl") as r:
            assert r.status == 200 and "Latitude-Mirror-Source" not in r.headers
        async with s.get(f"{base}/packages/absent.whl") as r:
            assert r.status == 404  # the primary does not have it either


async def test_primary_down_mirror_serves_last_copy_and_health_turns_503(net):
    primary = await net.primary()
    net.pub.publish("simple/a/", "a")
    server, daemon = await net.mirror("eu", max_lag_s=1.0)
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 1, what="sync")
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/_latitude/mirror/health") as r:
            h = await r.json()
            assert (
                r.status == 200
                and h["behind_serials"] == 0
                and h["behind_seconds"] == 0
                and h["healthy"]
            )
        await primary.close()
        await until(lambda: daemon.status.get("error"), what="the sync to notice")
        async with s.get(f"{base}/simple/a/") as r:
            assert r.status == 200 and await r.text() == "a" and r.headers[SERIAL_HEADER] == "1"
        async with s.get(f"{base}/simple/missing/") as r:
            assert r.status == 502  # cannot know: not a 404
        await asyncio.sleep(1.1)
        async with s.get(f"{base}/_latitude/mirror/health") as r:
            h = await r.json()
            assert r.status == 503 and h["primary"] == "unreachable" and h["behind_seconds"] > 1.0
            assert h["serial"] == 1


async def test_fallback_checks_the_primarys_bytes(net):
    await net.primary()
    net.pub.publish("x.txt", b"GOOD")
    state = {"corrupt": True}
    proxy = await net.app(corrupting_proxy(net.primary_url, state))
    server, _ = await net.mirror("eu", sync=False, primary_url=proxy)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.port}/x.txt") as r:
        assert r.status == 502 and b"EVIL" not in await r.read()
    assert not (net.tmp / "eu/x.txt").exists()


# -------------------------------------------------------------------------------------- nginx


def mirror_topology(
    tmp: Path, primary_port: int, eu_port: int, site_port: int, paths: list[str]
) -> Path:
    """A lab topology of two mirror regions, `us` (the primary, beside the website) and `eu`."""
    topo = tmp / "latitude.toml"
    topo.write_text(f"""
[lab]
[[regions]]
name = "us"
primary = true
location = [45.6, -121.2]
mirror_url = "http://127.0.0.1:{primary_port}"
internal_url = "http://127.0.0.1:{site_port}"
[[regions]]
name = "eu"
location = [53.3, -6.3]
mirror_url = "http://127.0.0.1:{eu_port}"
[mirror]
root = "{tmp}/{{region}}"
paths = {json.dumps(paths)}
""")
    return topo


def test_cli_nginx_config_and_publish(tmp_path):
    topo = mirror_topology(tmp_path, 9001, 9002, 9000, ["/simple/", "/packages/"])
    env = {**os.environ, "LATITUDE_TOPOLOGY": str(topo)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "latitude.cli", "mirror", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    r = run("nginx-config", "--region", "eu")
    assert r.returncode == 0, r.stderr
    assert (
        f"root {tmp_path}/eu;" in r.stdout
        and "try_files ${uri}index.html $uri @primary;" in r.stdout
    )
    assert "server 127.0.0.1:9001;" in r.stdout and "server 127.0.0.1:9000;" in r.stdout
    src = tmp_path / "f.html"
    src.write_text("hi")
    r = run("publish", "simple/f/=" + str(src))
    assert r.returncode == 0, r.stderr
    assert "serial 1" in r.stdout and (tmp_path / "us/simple/f/index.html").read_text() == "hi"
    # A sync daemon runs at the primary too (it idles until a promotion makes its region a
    # mirror), so it needs the keyring to follow epochs: without a secret it refuses to run.
    r = run("sync", "--region", "us")
    assert r.returncode == 2 and "signing key" in r.stderr and "always signed" in r.stderr


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    topo = tmp_path / "latitude.toml"
    topo.write_text("""
[lab]
[[regions]]
name = "us"
primary = true
location = [45.6, -121.2]
mirror_url = "http://127.0.0.1:9"
[[regions]]
name = "eu"
location = [53.3, -6.3]
mirror_url = "http://127.0.0.1:9"
[signing]
keys = [{ id = "k1", env = "LAT_TEST_MIRROR_KEY" }]
""")
    (tmp_path / "f.json").write_text("{}")
    bad = [
        (["sync", "--region", "mars"], "no region named 'mars'"),
        (["sync", "--region", "eu"], 'set root = "/srv/mirror" in the [mirror] table'),
        (["sync", "--region", "eu", "--root", "r", "--pool-size", "-3"], "--pool-size -3"),
        (["sync", "--region", "eu", "--root", "r", "--poll-interval", "-1"], "--poll-interval"),
        (["sync", "--region", "eu", "--root", "r", "--inline", "-5"], "--inline -5"),
        (["sync", "--region", "eu", "--root", "r", "--files-url", "nope"], "--files-url"),
        (["serve", "--region", "eu", "--root", "r", "--port", "99999"], "--port 99999"),
        (["serve", "--region", "eu", "--root", "r", "--max-lag", "-5"], "--max-lag -5"),
        (["serve", "--region", "eu", "--root", "r", "--path", "simple"], "--path 'simple'"),
        (["nginx-config", "--region", "eu", "--root", "r", "--listen", "80; evil"], "--listen"),
        (["nginx-config", "--region", "eu", "--root", "r", "--user", "a b"], "--user 'a b'"),
        (["nginx-config", "--region", "eu", "--root", "r b"], "content root"),
        (["publish", "--root", "r", "nothing-to-assign"], "write PATH=FILE"),
        (["publish", "--root", "r", "a=missing.bin"], "missing.bin: no such file"),
        (["publish", "--root", "r", "../x=f.json"], "'..' segment"),
    ]
    for args, expected in bad:
        r = subprocess.run(
            [sys.executable, "-m", "latitude.cli", "mirror", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
            env={**os.environ, "LATITUDE_TOPOLOGY": str(topo)},
        )
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, r.stderr)
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("x"))
    # The world in the way (not the input): exit 1, one line.
    r = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "mirror", "serve", "--region", "eu"]
        + ["--root", "r", "--host", "192.0.2.1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        # The secret is set: the mirror never serves without it (test_mirror_topology.py).
        env={**os.environ, "LATITUDE_TOPOLOGY": str(topo), "LAT_TEST_MIRROR_KEY": "k" * 40},
    )
    assert r.returncode == 1 and "cannot listen on 192.0.2.1:0" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    out = tmp_path / "missing-dir" / "x.conf"
    r = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "mirror", "nginx-config", "--region", "eu"]
        + ["--root", "r", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "LATITUDE_TOPOLOGY": str(topo)},
    )
    assert r.returncode == 1 and f"cannot write {out}" in r.stderr, r.stderr


async def test_bundle_answers_a_large_file_413_without_reading_it(net):
    """The bundle endpoint is unsigned (like a GET of the file): a request naming a large file
    thousands of times must not make the primary read it into memory each time."""
    from latitude.mirror.feed import BUNDLE, BUNDLE_FILE_MAX

    await net.primary()
    net.pub.publish("big.bin", b"x" * (BUNDLE_FILE_MAX + 1))
    net.pub.publish("small.json", b'{"a": 1}')
    async with aiohttp.ClientSession() as s:
        async with s.post(
            net.primary_url + BUNDLE, json={"paths": ["big.bin"] * 3000 + ["small.json"]}
        ) as r:
            assert r.status == 200
            frames = []
            while line := await r.content.readline():
                h = json.loads(line)
                frames.append((h, await r.content.readexactly(h["size"])))
    assert len(frames) == 3001
    assert all(h["status"] == 413 and h["size"] == 0 and h["serial"] == 1 for h, _ in frames[:-1])
    assert frames[-1][0]["status"] == 200 and frames[-1][1] == b'{"a": 1}'
    # A sync still fetches the large file, by GET.
    _, daemon = await net.mirror("eu")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 2, what="sync")
    assert (net.tmp / "eu" / "big.bin").stat().st_size == BUNDLE_FILE_MAX + 1

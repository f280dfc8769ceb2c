"""The config `latitude mirror nginx-config` prints, run by a real nginx beside `mirror serve`
(issue 10, item 5): never a compressed copy older than the file, the same content types and
Vary as `mirror serve`, no symlink followed, and defaults that do not clash with the node."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from latitude.lab.harness import find_nginx, free_port, nginx_running
from latitude.mirror import ContentRoot, Item, Publisher
from latitude.mirror.feed import SERIAL_HEADER
from tests.test_mirror import keyring, mirror_topology, net, until  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(90)

NGINX = find_nginx()
PATHS = ("/p2/", "/dist/", "/simple/", "/packages.json")
needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (not on PATH, nor in /usr/sbin): apt-get install nginx",
)


def topology(tmp: Path, primary_port: int, eu_port: int, site_port: int) -> Path:
    return mirror_topology(tmp, primary_port, eu_port, site_port, list(PATHS))


def cli(topo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latitude.cli", "mirror", *args],
        env={**os.environ, "LATITUDE_TOPOLOGY": str(topo)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_default_listen_runs_beside_the_node_and_nginx_accepts_the_config(tmp_path):
    topo = topology(tmp_path, 9001, 9002, 9000)
    r = cli(topo, "nginx-config", "--region", "eu", "--root", str(tmp_path / "eu"))
    assert r.returncode == 0, r.stderr
    assert "listen 8080;" in r.stdout and "listen 9002" not in r.stdout
    assert "server 127.0.0.1:9002;" in r.stdout  # health and serial from the node itself
    assert "gzip_static on" not in r.stdout and "gzip_vary on;" in r.stdout
    r = cli(topo, "nginx-config", "--region", "eu", "--listen", "127.0.0.1:9002")
    assert r.returncode == 2 and "9002" in r.stderr and "another port" in r.stderr
    if NGINX is None:
        pytest.skip("nginx is not installed: the printed config was not tested with `nginx -t`")
    conf_dir = tmp_path / "nginx"
    conf_dir.mkdir()
    r = cli(
        topo,
        "nginx-config",
        "--region",
        "eu",
        "--standalone",
        str(conf_dir),
        "-o",
        str(conf_dir / "nginx.conf"),
    )
    assert r.returncode == 0, r.stderr
    t = subprocess.run(
        [NGINX, "-t", "-c", str(conf_dir / "nginx.conf"), "-p", str(conf_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert t.returncode == 0, t.stderr


async def _started(proc: subprocess.Popen, url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"nginx exited: {proc.stderr.read().decode()}")
            await asyncio.sleep(0.05)
    pytest.fail("nginx did not answer within 10 s")


@needs_nginx
async def test_real_nginx_with_the_printed_config(net, tmp_path):  # noqa: F811
    async def website(request):
        return web.Response(text="the website")

    site = web.Application()
    site.router.add_get("/{tail:.*}", website)
    site_url = await net.app(site)
    paths = PATHS
    await net.primary(website_url=site_url, paths=paths)
    pub = Publisher(net.tmp / "primary", precompress=True)  # writes hello.json.gz as well
    try:
        pub.publish_many(
            [
                Item("packages.json", '{"metadata-url": "/p2/%package%.json"}'),
                Item("p2/acme/hello.json", '{"version": "1.0.4", "pad": "' + "x" * 400 + '"}'),
                Item("dist/acme-hello-1.0.4.zip", b"PK\x03\x04 zip"),
                Item("dist/acme_hello-1.0.4-py3-none-any.whl", b"PK\x03\x04 wheel"),
                Item("dist/acme-hello-1.0.4.tar.gz", gzip.compress(b"tar")),
                Item("simple/acme-hello/", "<html>links</html>"),
                Item("dist/README.txt", "read me " * 10),
            ]
        )
        server, daemon = await net.mirror("eu", website_url=site_url, paths=paths)
        head = pub.serial
        await until(lambda: ContentRoot(net.tmp / "eu").cursor() == head, what="sync")
        eu = net.tmp / "eu"
        assert (eu / "p2/acme/hello.json.gz").exists()

        port_of = lambda url: int(url.rsplit(":", 1)[1])  # noqa: E731
        topo = topology(tmp_path, port_of(net.primary_url), server.port, port_of(site_url))
        port = free_port()
        conf_dir = tmp_path / "nginx"
        conf_dir.mkdir()
        argv = [
            "nginx-config",
            "--region",
            "eu",
            "--root",
            str(eu),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        argv += ["--standalone", str(conf_dir), "-o", str(conf_dir / "nginx.conf")]
        if os.geteuid() == 0:
            argv += ["--user", "root"]  # the test's files are root's own
        r = cli(topo, *argv)
        assert r.returncode == 0, r.stderr
        with nginx_running(NGINX, conf_dir / "nginx.conf", conf_dir) as proc:
            base = f"http://127.0.0.1:{port}"
            node = f"http://127.0.0.1:{server.port}"
            await _started(proc, f"{base}/packages.json")
            await _check_nginx(net, pub, base, node, eu, daemon)
    finally:
        pub.close()


async def _check_nginx(mesh, pub, base: str, node: str, eu: Path, daemon) -> None:
    gz = {"Accept-Encoding": "gzip"}
    async with aiohttp.ClientSession(auto_decompress=False) as s:

        async def get(url: str, **headers: str) -> tuple[int, dict, bytes]:
            async with s.get(url, headers={"Accept-Encoding": "identity", **headers}) as r:
                return r.status, dict(r.headers), await r.read()

        # Content types and Vary: the same as `mirror serve` gives.
        for path in (
            "/packages.json",
            "/p2/acme/hello.json",
            "/dist/acme-hello-1.0.4.zip",
            "/dist/acme_hello-1.0.4-py3-none-any.whl",
            "/dist/acme-hello-1.0.4.tar.gz",
            "/simple/acme-hello/",
            "/dist/README.txt",
        ):
            for headers in ({"Accept-Encoding": "identity"}, gz):
                n_status, n_h, n_body = await get(base + path, **headers)
                m_status, m_h, m_body = await get(node + path, **headers)
                assert n_status == m_status == 200, path
                assert n_h["Content-Type"] == m_h["Content-Type"], (path, n_h, m_h)
                assert n_h.get("Vary") == m_h.get("Vary"), (path, headers, n_h, m_h)
                plain = lambda h, b: gzip.decompress(b) if h.get("Content-Encoding") else b  # noqa: E731
                assert plain(n_h, n_body) == plain(m_h, m_body), path
        assert n_h["Latitude-Mirror-Region"] == "eu"
        status, h, _ = await get(base + "/dist/acme-hello-1.0.4.zip")
        assert h["Content-Type"] == "application/zip"

        # A new version: nginx never hands out the old .gz, not even one left on disk.
        pub.publish("p2/acme/hello.json", '{"version": "1.0.5", "pad": "' + "y" * 400 + '"}')
        await until(lambda: ContentRoot(eu).cursor() == pub.serial, what="sync of 1.0.5")
        stale = gzip.compress(b'{"version": "1.0.4"}')
        (eu / "p2/acme/hello.json.gz").write_bytes(stale)
        os.utime(eu / "p2/acme/hello.json.gz", (time.time() + 60, time.time() + 60))
        status, h, body = await get(base + "/p2/acme/hello.json", **gz)
        assert status == 200 and h.get("Content-Encoding") == "gzip"
        assert b"1.0.5" in gzip.decompress(body), "nginx served a stale .gz"

        # If-Modified-Since alone, two publishes within one second: never a 304 for new bytes.
        await asyncio.sleep(1 - time.time() % 1 + 0.01)
        seen = None
        for v in ("1.0.6", "1.0.7"):
            pub.publish("p2/acme/hello.json", f'{{"version": "{v}"}}')
            await until(lambda: ContentRoot(eu).cursor() == pub.serial, what=f"sync of {v}")
            if seen:
                status, h, body = await get(
                    base + "/p2/acme/hello.json", **{"If-Modified-Since": seen}
                )
                assert status == 200 and v.encode() in body, (v, status)
            status, h, body = await get(base + "/p2/acme/hello.json")
            seen = h["Last-Modified"]
            status, _, _ = await get(base + "/p2/acme/hello.json", **{"If-Modified-Since": seen})
            assert status == 304

        # A symlink in the root is never followed.
        outside = eu.parent / "outside"
        outside.mkdir()
        (outside / "secret").write_text("SECRET")
        os.symlink(outside / "secret", eu / "dist/link.txt")
        status, _, body = await get(base + "/dist/link.txt")
        assert status in (403, 404) and b"SECRET" not in body

        # A local miss goes to the primary; other paths to the website; health to the node.
        pub.publish("dist/acme-hello-2.0.0.zip", b"PK new")
        await mesh.stop_sync(daemon)
        pub.publish("dist/acme-hello-2.0.1.zip", b"PK newer")
        status, h, body = await get(base + "/dist/acme-hello-2.0.1.zip")
        assert status == 200 and body == b"PK newer" and h["Latitude-Mirror-Source"] == "primary"
        status, _, body = await get(base + "/about")
        assert status == 200 and body == b"the website"
        status, h, body = await get(base + "/_latitude/mirror/health")
        assert status == 503 and SERIAL_HEADER in h and b'"sync": "not running"' in body
        status, _, _ = await get(base + "/.latitude/cursor")
        assert status == 404

"""No read or write of the mirror ever resolves outside its content root (issue 10, item 1).

A file symlink and a folder symlink pointing outside are planted in the primary's root and in a
mirror's root; serve, publish, scan, sync and delete must refuse them with a message naming the
link, and nothing outside the roots may be read or written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from latitude.mirror import ContentRoot, Publisher
from latitude.mirror.store import UnsafePath
from tests.test_mirror import keyring, net, until  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_bytes(b"SECRET BYTES")
    return d


def plant(root: Path, outside: Path) -> None:
    (root / "packages").mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "secret", root / "packages/link.txt")
    os.symlink(outside, root / "packages/linkdir")


def outside_untouched(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["secret"] and (
        (outside / "secret").read_bytes() == b"SECRET BYTES"
    )


async def test_serve_refuses_symlinks_on_the_primary_and_a_mirror(net, outside):  # noqa: F811
    await net.primary()
    net.pub.publish("packages/real.txt", b"real")
    server, _ = await net.mirror("eu")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 1, what="sync")
    plant(net.tmp / "primary", outside)
    plant(net.tmp / "eu", outside)
    async with aiohttp.ClientSession() as s:
        for base in (net.primary_url, f"http://127.0.0.1:{server.port}"):
            for path in ("packages/link.txt", "packages/linkdir/secret", "packages/linkdir/"):
                async with s.get(f"{base}/{path}") as r:
                    text = await r.text()
                    assert r.status == 403, (base, path, r.status, text)
                    assert "SECRET" not in text and "is a symlink" in text
                    assert (
                        "packages/link.txt" if "link.txt" in path else "packages/linkdir"
                    ) in text
            async with s.get(f"{base}/packages/real.txt") as r:
                assert r.status == 200 and await r.read() == b"real"


def test_publish_and_delete_through_a_folder_symlink_are_refused(tmp_path, outside):
    root = tmp_path / "primary"
    plant(root, outside)
    with Publisher(root) as pub:
        with pytest.raises(UnsafePath, match="packages/linkdir is a symlink"):
            pub.publish("packages/linkdir/x", b"escaped")
        with pytest.raises(UnsafePath, match="packages/link.txt is a symlink"):
            pub.publish("packages/link.txt", b"overwrite")
        with pytest.raises(UnsafePath, match="packages/linkdir is a symlink"):
            pub.delete("packages/linkdir/secret")
        assert pub.serial == 0
    assert outside_untouched(outside)
    assert os.readlink(root / "packages/link.txt") == str(outside / "secret")


def test_cli_publish_and_scan_name_the_symlink_and_publish_nothing(tmp_path, outside):
    root = tmp_path / "primary"
    plant(root, outside)
    (root / "packages/ok.txt").write_text("ok")
    src = tmp_path / "x"
    src.write_text("escaped")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "latitude.cli", "mirror", "publish", "--root", str(root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )

    r = run(f"packages/linkdir/x={src}")
    assert r.returncode == 1 and "packages/linkdir is a symlink" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run("--scan")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "packages/link.txt" in r.stderr and "packages/linkdir" in r.stderr
    assert outside_untouched(outside)
    with Publisher(root) as pub:
        assert pub.serial == 0  # the scan recorded nothing, not even ok.txt


async def test_sync_never_writes_through_a_folder_symlink_in_the_mirror_root(net, outside):  # noqa: F811
    await net.primary()
    (net.tmp / "eu/packages").mkdir(parents=True)
    os.symlink(outside, net.tmp / "eu/packages/linkdir")
    _, daemon = await net.mirror("eu")
    net.pub.publish("packages/linkdir/evil.txt", b"written outside?")
    await until(lambda: "is a symlink" in (daemon.status.get("error") or ""), what="the refusal")
    assert "packages/linkdir" in daemon.status["error"]
    assert outside_untouched(outside)
    assert ContentRoot(net.tmp / "eu").cursor() == 0  # the batch is not applied in part
    # The operator replaces the link with a real folder: the sync carries on.
    os.unlink(net.tmp / "eu/packages/linkdir")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() == 1, what="sync after the fix")
    assert (net.tmp / "eu/packages/linkdir/evil.txt").read_bytes() == b"written outside?"
    # A delete through a symlinked folder is refused as well.
    os.rename(net.tmp / "eu/packages/linkdir", net.tmp / "eu/packages/was")
    os.symlink(net.tmp / "eu/packages/was", net.tmp / "eu/packages/linkdir")
    net.pub.delete("packages/linkdir/evil.txt")
    await until(lambda: "is a symlink" in (daemon.status.get("error") or ""), what="the refusal")
    assert (net.tmp / "eu/packages/was/evil.txt").exists()
    assert outside_untouched(outside)

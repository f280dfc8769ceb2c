"""The mirror network in the lab: `latitude mirror serve` in every region, `latitude mirror sync`
in the replicas, all started as the lab's region services and talking across its links."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

from latitude.lab.harness import wait_until as wait_for
from latitude.lab.mirrors import start_lab_mirrors, wait_lab_mirrors_ready
from latitude.mirror import ContentRoot, Item, Publisher
from latitude.mirror.feed import SERIAL_HEADER

pytestmark = pytest.mark.timeout(90)

PRIMARY, EU, AP = "us-west", "eu-west", "ap-southeast"
REPLICAS = (EU, AP)


@pytest.fixture(scope="module")
def mirrors(world):
    roots = start_lab_mirrors(
        world, extra=("--max-lag", "3", "--poll-timeout", "5"), sync_extra=("--poll-timeout", "5")
    )
    try:
        assert wait_lab_mirrors_ready(world, timeout=30), (
            "mirrors not ready; see regions/*/mirror*.log"
        )
        yield roots
    finally:
        for region in roots:
            world.kill(region, "mirror")
            if region != PRIMARY:
                world.kill(region, "mirror-sync")


@pytest.fixture
def pub(mirrors):
    with Publisher(mirrors[PRIMARY]) as p:
        yield p


def url(world, region: str, path: str) -> str:
    return f"http://127.0.0.1:{world.state().regions[region].mirror_port}{path}"


def get(u: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(u, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def synced(mirrors, serial: int, regions=REPLICAS) -> bool:
    return all(ContentRoot(mirrors[r]).cursor() >= serial for r in regions)


def wheel(name: str, version: str) -> tuple[str, bytes]:
    """A tiny, valid pure-Python wheel built with zipfile (METADATA, WHEEL, RECORD)."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": f'VERSION = "{version}"\n'.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: latitude-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return f"{dist}-{version}-py3-none-any.whl", buf.getvalue()


def simple_index(name: str, wheels: dict[str, bytes]) -> str:
    links = "".join(
        f'<a href="../../packages/{fn}#sha256={hashlib.sha256(data).hexdigest()}">{fn}</a><br/>\n'
        for fn, data in wheels.items()
    )
    return f"<!DOCTYPE html>\n<html><body><h1>Links for {name}</h1>\n{links}</body></html>\n"


def publish_release(pub: Publisher, name: str, wheels: dict[str, bytes]) -> int:
    items = [Item(f"packages/{fn}", data) for fn, data in wheels.items()]
    items.append(Item(f"simple/{name}/", simple_index(name, wheels)))
    return pub.publish_many(items)[-1].serial


def test_pip_downloads_version_2_from_the_farthest_mirror_right_after_it_is_published(
    world, mirrors, pub, tmp_path
):
    name = f"latitude-demo-{secrets.token_hex(3)}"
    wheels = dict([wheel(name, "1")])
    serial = publish_release(pub, name, wheels)
    wait_for(lambda: synced(mirrors, serial), what="version 1 everywhere")
    wheels.update([wheel(name, "2")])
    publish_release(pub, name, wheels)
    # Right away, from the region farthest from the primary (165 ms RTT).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--index-url",
            url(world, AP, "/simple/"),
            f"{name}==2",
            "-d",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fn = f"{re.sub(r'[-_.]+', '_', name)}-2-py3-none-any.whl"
    assert (tmp_path / fn).read_bytes() == wheels[fn]


def test_index_from_one_mirror_file_from_a_lagging_one_is_200_not_404(world, mirrors, pub):
    world.kill(AP, "mirror-sync")  # ap-southeast stops syncing: it lags from now on
    try:
        name = f"race-{secrets.token_hex(3)}"
        wheels = dict([wheel(name, "1")])
        serial = publish_release(pub, name, wheels)
        wait_for(lambda: synced(mirrors, serial, (EU,)), what="eu-west to sync")
        status, _, index = get(url(world, EU, f"/simple/{name}/"))
        assert status == 200
        href = re.search(r'href="\.\./\.\./([^"#]+)', index.decode()).group(1)
        assert not (mirrors[AP] / href).exists()
        status, headers, body = get(url(world, AP, f"/{href}"))
        assert status == 200 and body == wheels[href.split("/")[-1]]
        assert headers["Latitude-Mirror-Source"] == "primary"
        assert (mirrors[AP] / href).read_bytes() == body  # and it keeps it
    finally:
        world.revive(AP, "mirror-sync")
    wait_for(lambda: synced(mirrors, pub.serial), what="ap-southeast to catch up")


def test_mirror_killed_mid_download_leaves_no_partial_file_and_resumes(world, mirrors, pub, healed):
    root = mirrors[AP]
    before = ContentRoot(root).cursor()
    blob = os.urandom(48 * 1024 * 1024)
    change = pub.publish("big/blob.bin", blob)
    partial = wait_for(
        lambda: (
            [p for p in (root / "big").glob(".latitude-tmp-*") if p.stat().st_size > 0]
            if (root / "big").is_dir()
            else None
        ),
        what="the download to start",
    )
    world.link("cut", PRIMARY, AP)  # freeze the transfer where it is, then crash the daemon
    world.kill(AP, "mirror-sync")
    assert partial[0].exists() and partial[0].stat().st_size < len(blob)
    assert not (root / "big/blob.bin").exists(), "a partial file took the real file's place"
    assert ContentRoot(root).cursor() == before < change.serial
    status, _, _ = get(url(world, AP, "/big/.latitude-tmp-x"))
    assert status == 404
    world.link("heal", PRIMARY, AP)
    world.revive(AP, "mirror-sync")
    wait_for(lambda: synced(mirrors, change.serial, (AP,)), timeout=30, what="resume")
    assert (
        hashlib.sha256((root / "big/blob.bin").read_bytes()).digest()
        == hashlib.sha256(blob).digest()
    )
    assert not list(root.rglob(".latitude-tmp-*"))
    pub.delete("big/blob.bin")


def test_a_delete_propagates(world, mirrors, pub):
    serial = pub.publish("simple/doomed/", "short-lived").serial
    wait_for(lambda: synced(mirrors, serial), what="the file everywhere")
    assert all((mirrors[r] / "simple/doomed/index.html").exists() for r in REPLICAS)
    serial = pub.delete("simple/doomed/").serial
    wait_for(lambda: synced(mirrors, serial), what="the delete everywhere")
    for region in REPLICAS:
        assert not (mirrors[region] / "simple/doomed/index.html").exists()
        status, headers, _ = get(url(world, region, "/simple/doomed/"))
        assert status == 404 and int(headers[SERIAL_HEADER]) >= serial


def test_primary_down_mirrors_keep_serving_their_last_copy_and_report_it(world, mirrors, pub):
    serial = pub.publish("simple/steady/", "still here").serial
    wait_for(lambda: synced(mirrors, serial), what="sync")
    world.kill(PRIMARY, "mirror")
    try:
        for region in REPLICAS:
            status, headers, body = get(url(world, region, "/simple/steady/"))
            assert status == 200 and body == b"still here" and int(headers[SERIAL_HEADER]) >= serial

        def stale():
            status, _, body = get(url(world, EU, "/_latitude/mirror/health"))
            return status == 503 and json.loads(body)

        report = wait_for(stale, timeout=15, what="health to turn 503 past --max-lag 3")
        assert (
            report["primary"] == "unreachable"
            and report["behind_seconds"] > 3
            and report["serial"] >= serial
        )
    finally:
        world.revive(PRIMARY, "mirror")
    assert wait_lab_mirrors_ready(world, timeout=30)


def test_cursor_past_retention_gets_resync_and_ends_with_an_identical_tree(world, mirrors, pub):
    world.kill(AP, "mirror-sync")
    try:
        pub.publish_many([Item(f"resync/{i}.json", json.dumps({"i": i})) for i in range(50)])
        pub.delete_many([f"resync/{i}.json" for i in range(40, 50)])
        (mirrors[AP] / "resync").mkdir(exist_ok=True)
        (mirrors[AP] / "resync/stray.json").write_text("not at the primary")
        assert pub.prune(older_than_s=0) == pub.serial  # ap-southeast's cursor is now too old
    finally:
        world.revive(AP, "mirror-sync")
    wait_for(
        lambda: (
            synced(mirrors, pub.serial, (AP,)) and ContentRoot(mirrors[AP]).status().get("resyncs")
        ),
        timeout=30,
        what="resync",
    )
    assert ContentRoot(mirrors[AP]).hashes() == ContentRoot(mirrors[PRIMARY]).hashes()

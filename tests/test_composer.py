"""The real `composer` (Debian's composer + php-cli) against a two-region mirror: a composer
repository (`packages.json` with `metadata-url`, p2 files, dist zips) published at the primary
and read through the eu mirror. Install, publish a new version, `composer update` sees it at
once, also when two versions are published within one second (composer revalidates p2 files
with If-Modified-Since alone), and while eu's sync daemon is down (issue 10)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from latitude.mirror import ContentRoot, Item
from tests.test_mirror import keyring, net, until  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)

COMPOSER = shutil.which("composer")
PHP = shutil.which("php")
PACKAGE = "acme/hello"


def dist_zip(version: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(
            "hello/composer.json",
            json.dumps({"name": PACKAGE, "version": version, "autoload": {"files": ["hello.php"]}}),
        )
        z.writestr("hello/hello.php", f"<?php function acme_hello() {{ return '{version}'; }}\n")
    return buf.getvalue()


class Repo:
    """The composer repository at the primary: every release is a zip and a new p2 file."""

    def __init__(self, pub, public_url: str):
        self.pub = pub
        self.url = public_url
        self.versions: list[dict] = []

    def release(self, version: str, mtime: float | None = None) -> int:
        data = dist_zip(version)
        zip_path = f"dist/acme-hello-{version}.zip"
        self.versions.append(
            {
                "name": PACKAGE,
                "version": version,
                "version_normalized": version + ".0",
                "type": "library",
                "autoload": {"files": ["hello.php"]},
                "dist": {
                    "type": "zip",
                    "url": f"{self.url}/{zip_path}",
                    "shasum": hashlib.sha1(data).hexdigest(),
                },
            }
        )
        p2 = json.dumps({"packages": {PACKAGE: list(reversed(self.versions))}})
        changes = self.pub.publish_many(
            [
                Item(zip_path, data),  # the file first, then the index naming it
                Item(f"p2/{PACKAGE}.json", p2, mtime),
                Item(
                    "packages.json",
                    json.dumps(
                        {
                            "packages": [],
                            "metadata-url": "/p2/%package%.json",
                            "available-packages": [PACKAGE],
                        }
                    ),
                ),
            ]
        )
        return changes[-1].serial


class Composer:
    def __init__(self, folder: Path, repo_url: str):
        self.folder = folder
        folder.mkdir()
        (folder / "composer.json").write_text(
            json.dumps(
                {
                    "name": "test/app",
                    "require": {PACKAGE: "^1.0"},
                    "repositories": [
                        {"type": "composer", "url": repo_url},
                        {"packagist.org": False},
                    ],
                    "config": {"secure-http": False},
                }
            )
        )
        self.env = {
            **os.environ,
            "COMPOSER_HOME": str(folder.parent / "composer-home"),
            "COMPOSER_CACHE_DIR": str(folder.parent / "composer-cache"),
            "COMPOSER_ALLOW_SUPERUSER": "1",
            "COMPOSER_NO_INTERACTION": "1",
            "COMPOSER_DISABLE_XDEBUG_WARN": "1",
        }

    async def run(self, *args: str) -> str:
        # A subprocess of the event loop: the mirror servers run in this same loop.
        proc = await asyncio.create_subprocess_exec(
            COMPOSER,
            *args,
            "--no-interaction",
            "--no-progress",
            "--no-plugins",
            cwd=self.folder,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, f"composer {' '.join(args)} failed:\n{text}"
        return text

    def locked(self) -> str:
        lock = json.loads((self.folder / "composer.lock").read_text())
        return next(p["version"] for p in lock["packages"] if p["name"] == PACKAGE)

    def installed(self) -> str:
        text = (self.folder / "vendor" / PACKAGE / "hello.php").read_text()
        return text.split("return '")[1].split("'")[0]


@pytest.mark.skipif(
    COMPOSER is None or PHP is None,
    reason="composer or php-cli is not installed (Debian packages composer, php-cli)",
)
async def test_composer_sees_every_new_version_through_the_eu_mirror_at_once(net, tmp_path):  # noqa: F811
    await net.primary()
    server, daemon = await net.mirror("eu")
    eu = f"http://127.0.0.1:{server.port}"
    repo = Repo(net.pub, eu)
    serial = repo.release("1.0.0")
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() >= serial, what="sync")
    app = Composer(tmp_path / "app", eu)
    await app.run("install")
    assert app.locked() == "1.0.0" and app.installed() == "1.0.0"

    # A new version: `composer update` right after the publish, not waiting for the sync.
    repo.release("1.0.1")
    await app.run("update")
    assert app.locked() == "1.0.1" and app.installed() == "1.0.1"

    # Two publishes within one second (the p2 file stamped with the same whole second, as a
    # publisher stamping release times would): composer's If-Modified-Since must not get 304.
    stamp = float(int(time.time()))
    serial = repo.release("1.0.2", mtime=stamp)
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() >= serial, what="sync of 1.0.2")
    await app.run("update")
    assert app.locked() == "1.0.2"
    serial = repo.release("1.0.3", mtime=stamp)
    await until(lambda: ContentRoot(net.tmp / "eu").cursor() >= serial, what="sync of 1.0.3")
    await app.run("update")
    assert app.locked() == "1.0.3" and app.installed() == "1.0.3"

    # The same in real time: publish, update, publish again at once, update.
    for first, second in (("1.0.4", "1.0.5"), ("1.0.6", "1.0.7")):
        serial = repo.release(first)
        await until(lambda s=serial: ContentRoot(net.tmp / "eu").cursor() >= s, what="sync")
        await app.run("update")
        assert app.locked() == first
        repo.release(second)
        await app.run("update")
        assert app.locked() == second and app.installed() == second

    # eu's sync daemon stops: eu's p2 file is stale, eu knows it, and asks the primary.
    await net.stop_sync(daemon)
    repo.release("1.1.0")
    await until(lambda: server.behind(), what="eu to hear of the new head")
    await app.run("update")
    assert app.locked() == "1.1.0" and app.installed() == "1.1.0"

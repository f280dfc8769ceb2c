"""One URL redactor: the password hidden, user, host, port and database kept; used by the
replay watcher's log line and by `latitude check`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from latitude.consistency import ReplayWatcher
from latitude.redact import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://app@db:5432/app", "postgresql://app@db:5432/app"),
        ("postgresql://db.internal/app", "postgresql://db.internal/app"),
        ("postgresql://app:@db/app", "postgresql://app:***@db/app"),
        # Unencoded '@', ':' and '/' in the password: the last '@' before the query ends it.
        ("postgresql://app:p@ss:w/rd@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            "postgresql://app@db/app?sslmode=require&password=s3cret",
            "postgresql://app@db/app?sslmode=require&password=***",
        ),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("host=db user=app password=s3cret dbname=app", "host=db user=app password=*** dbname=app"),
        ("host=db password='it''s secret' user=app", "host=db password=*** user=app"),
        ("", ""),
        (None, None),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    if url and "s3cret" in url:
        assert "s3cret" not in redact_url(url)


async def test_the_watcher_logs_its_replica_without_the_password(caplog):
    watcher = ReplayWatcher("postgresql://app:s3cret@127.0.0.1:1/app", connect_timeout_s=1)
    with caplog.at_level(logging.WARNING, logger="latitude.consistency"):
        await watcher.start(require_connection=False)
        watcher.healthy = True  # as if it had been connected: losing it is logged
        try:
            for _ in range(100):
                if "replay watcher lost" in caplog.text:
                    break
                await asyncio_sleep(0.02)
        finally:
            await watcher.close()
    assert "postgresql://app:***@127.0.0.1:1/app" in caplog.text
    assert "s3cret" not in caplog.text


async def asyncio_sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


def test_latitude_check_shows_the_database_without_the_password(tmp_path):
    (tmp_path / "latitude.toml").write_text(
        """
[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.2]
public_url = "https://us-west.example.com"
internal_url = "https://us-west.internal:8443"
database_url = "postgresql://app:s3cret@db.us-west.internal:5432/app"
session_store_url = "redis://sessions.us-west.internal:6379/0"

[signing]
keys = [{ id = "k1", env = "LAT_TEST_KEY" }]
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "check", "latitude.toml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200", "LAT_TEST_KEY": "k" * 40},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "postgresql://app:***@db." in result.stdout, result.stdout  # the table cuts the rest
    assert "s3cret" not in result.stdout + result.stderr

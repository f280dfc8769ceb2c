"""Django's ASGI app behind the region gateway: reads from the local replica, writes forwarded
to the primary region and run there against the primary database."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import psycopg
import pytest

from tests.extra_slots import EU, PRIMARY, free_port, topology_with_primary_at, wait_up

DJANGO = Path(__file__).resolve().parents[1] / "examples" / "django_app"


@pytest.fixture(scope="module")
def django_pair(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("django")
    ports = {PRIMARY: free_port(), EU: free_port()}
    relay = world.add_relay(EU, PRIMARY, ports[PRIMARY])
    seen_as = {PRIMARY: ports[PRIMARY], EU: relay}
    for region in (PRIMARY, EU):
        (folder / f"{region}.toml").write_text(
            topology_with_primary_at(world, region, f"http://127.0.0.1:{seen_as[region]}")
        )
    # The schema, made at the primary by Django's own migrations.
    env = {
        **world.region_env(PRIMARY),
        "LATITUDE_TOPOLOGY": str(folder / f"{PRIMARY}.toml"),
        "DJANGO_SETTINGS_MODULE": "example.settings",
        "PYTHONPATH": str(DJANGO),
    }
    migrate = subprocess.run(
        [sys.executable, str(DJANGO / "manage.py"), "migrate", "--noinput"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr
    for region in (PRIMARY, EU):
        world.set_service(
            region,
            "django",
            [
                sys.executable,
                "-m",
                "latitude.cli",
                "serve",
                "example.asgi:application",
                "--region",
                region,
                "--topology",
                str(folder / f"{region}.toml"),
                "--app-dir",
                str(DJANGO),
                "--port",
                str(ports[region]),
            ],
            env={"DJANGO_SETTINGS_MODULE": "example.settings", "DJANGO_DEBUG": "0"},
        )
        wait_up(f"http://127.0.0.1:{ports[region]}/_latitude/health")
    yield ports
    for region in (PRIMARY, EU):
        world.kill(region, "django")


async def test_django_reads_locally_and_writes_at_the_primary(world, django_pair):
    title = f"django {uuid.uuid4()}"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{django_pair[EU]}") as c:
        async with c.post("/events/", data={"title": title}) as r:
            assert r.status == 201, (await r.text())[:3000]
        primary_db = next(
            r["database_url"] for r in world.status()["regions"] if r["name"] == PRIMARY
        )
        with psycopg.connect(primary_db) as db:
            assert (
                db.execute(
                    "select count(*) from example_event where title = %s", (title,)
                ).fetchone()[0]
                == 1
            )
        deadline = time.monotonic() + 5
        while True:  # the read is served by eu-west's replica once it has replayed the write
            async with c.get("/events/") as r:
                body = await r.json()
            assert body["served_by"] == "replica" and body["database"] == "replica"
            if title in body["events"] or time.monotonic() > deadline:
                break
        assert title in body["events"]


async def test_a_django_write_marks_its_claim_in_its_own_transaction(world, django_pair):
    """The fence for Django: a forwarded write's claim is marked `applied` by the statement
    before the app's INSERT, in the same transaction (Django's autocommit: BEGIN, mark, INSERT,
    COMMIT), so a retry after a lost answer is settled "applied", never run twice. A read
    (GET) is not claimed and marks nothing."""
    key = f"django-fence-{uuid.uuid4()}"
    title = f"fenced {key}"
    primary_db = next(r["database_url"] for r in world.status()["regions"] if r["name"] == PRIMARY)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{django_pair[EU]}") as c:
        async with c.post("/events/", data={"title": title}, headers={"Idempotency-Key": key}) as r:
            assert r.status == 201, (await r.text())[:3000]
    with psycopg.connect(primary_db) as db:
        row = db.execute(
            "select state, applied from latitude_idempotency where key = %s", (key,)
        ).fetchone()
        stored = db.execute(
            "select count(*) from example_event where title = %s", (title,)
        ).fetchone()[0]
    assert row == ("completed", True) and stored == 1, (row, stored)

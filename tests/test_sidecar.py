"""`latitude gateway --upstream`: the same forwarding for an app in any language, with its
sessions moved between regions' Valkeys under PHP's own key template."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import aiohttp
import psycopg
import pytest
import redis

from tests.extra_slots import EU, PRIMARY, free_port, topology_with_primary_at, wait_up

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sidecars(world, tmp_path_factory):
    """An upstream app and a sidecar gateway in us-west and eu-west (extra lab slots)."""
    folder = tmp_path_factory.mktemp("sidecar")
    upstream = {r: free_port() for r in (PRIMARY, EU)}
    gateway = {r: free_port() for r in (PRIMARY, EU)}
    relay = world.add_relay(
        EU, PRIMARY, gateway[PRIMARY]
    )  # eu-west reaches us-west's sidecar across the ocean
    seen_as = {PRIMARY: gateway[PRIMARY], EU: relay}
    php = '\n[gateway]\nsession_cookie = "PHPSESSID"\nsession_key_template = "PHPREDIS_SESSION:{sid}"\n'
    for region in (PRIMARY, EU):
        topology = folder / f"{region}.toml"
        topology.write_text(
            topology_with_primary_at(world, region, f"http://127.0.0.1:{seen_as[region]}", php)
        )
        world.set_service(
            region,
            "php",
            [sys.executable, str(HERE / "sidecar_upstream.py"), str(upstream[region])],
            env={"LATITUDE_TOPOLOGY": str(topology)},
        )
        wait_up(f"http://127.0.0.1:{upstream[region]}/whoami")
        world.set_service(
            region,
            "sidecar",
            [
                sys.executable,
                "-m",
                "latitude.cli",
                "gateway",
                "--region",
                region,
                "--upstream",
                f"http://127.0.0.1:{upstream[region]}",
                "--topology",
                str(topology),
                "--port",
                str(gateway[region]),
            ],
        )
        wait_up(f"http://127.0.0.1:{gateway[region]}/_latitude/health")
    yield gateway
    for region in (PRIMARY, EU):
        for service in ("sidecar", "php"):
            world.kill(region, service)


async def test_sidecar_forwards_writes_and_moves_php_sessions(world, sidecars):
    valkeys = {r: redis.Redis(port=world.state().regions[r].valkey_port) for r in (PRIMARY, EU)}
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{sidecars[EU]}", cookie_jar=jar) as c:
        async with c.post("/login", data={"name": "alice"}) as r:
            assert r.status == 200 and (await r.json())["region"] == PRIMARY
        sid = next(m.value for m in jar if m.key == "PHPSESSID")
        key = f"PHPREDIS_SESSION:{sid}"
        # The session the primary's app created now lives in eu-west's Valkey, under PHP's key.
        assert valkeys[EU].get(key) == b'user|s:5:"alice";'
        assert 0 < valkeys[PRIMARY].ttl(key) <= 60  # the primary keeps only a short-lived copy
        text = f"note {uuid.uuid4()}"
        async with c.post(
            "/notes", data={"text": text}, headers={"X-Forwarded-For": "6.6.6.6"}
        ) as r:
            assert r.status == 201 and (await r.json())["region"] == PRIMARY
        assert valkeys[EU].get(key) == b'user|s:5:"alice";flash|s:5:"saved";'
        async with c.get("/whoami", headers={"X-Forwarded-For": "6.6.6.6"}) as r:
            me = await r.json()
        assert me == {
            "region": EU,
            "session": 'user|s:5:"alice";flash|s:5:"saved";',
            "client": "127.0.0.1",
            "database": "replica",
        }
    primary_db = next(r["database_url"] for r in world.status()["regions"] if r["name"] == PRIMARY)
    with psycopg.connect(primary_db) as db:
        rows = db.execute("select ip from sidecar_notes where text = %s", (text,)).fetchall()
    assert rows == [("127.0.0.1",)]

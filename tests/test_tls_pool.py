"""Forwarding over TLS (a CA made with trustme) through a warm pool, and the switch that turns
the pool off to show what each forwarded request pays without it."""

from __future__ import annotations

import sys
import uuid

import aiohttp
import pytest
import trustme

from latitude.lab.demo import CALENDAR_APP, REPO
from tests.extra_slots import EU, PRIMARY, free_port, topology_with_primary_at, wait_up


def relay_connections(world, port: int) -> int:
    for link in world.control().call("GET", "/status")["links"]:
        for relay in link["relays"]:
            if relay["port"] == port:
                return relay["connections_total"]
    raise AssertionError(f"no relay on port {port}")


@pytest.fixture(scope="module")
def tls_pair(calendar, tmp_path_factory):
    """A TLS primary gateway (us-west) and two eu-west gateways reaching it across the link:
    one pooled, one with --no-pool."""
    world = calendar
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    primary_port = free_port()
    relay = world.add_relay(EU, PRIMARY, primary_port)
    ports = {"pooled": free_port(), "unpooled": free_port()}
    # Only the primary serves TLS here; eu-west trusts the test CA when it dials the primary.
    tls = {
        PRIMARY: f'\n[gateway]\ntls_cert = "{cert_file}"\ntls_key = "{key_file}"\n',
        EU: f'\n[gateway]\nca_file = "{ca_file}"\n',
    }
    for region, seen in ((PRIMARY, primary_port), (EU, relay)):
        text = topology_with_primary_at(world, region, f"https://127.0.0.1:{seen}", tls[region])
        (folder / f"{region}.toml").write_text(text)

    def serve(region: str, service: str, port: int, *extra: str) -> None:
        world.set_service(
            region,
            service,
            [
                sys.executable,
                "-m",
                "latitude.cli",
                "serve",
                CALENDAR_APP,
                "--region",
                region,
                "--topology",
                str(folder / f"{region}.toml"),
                "--app-dir",
                str(REPO),
                "--port",
                str(port),
                *extra,
            ],
        )

    serve(PRIMARY, "app-tls", primary_port)
    wait_up(f"https://127.0.0.1:{primary_port}/_latitude/health", ca_file=ca_file)
    serve(EU, "app-pooled", ports["pooled"])
    serve(EU, "app-unpooled", ports["unpooled"], "--no-pool")
    for port in ports.values():
        wait_up(f"http://127.0.0.1:{port}/_latitude/health")
    yield {"relay": relay, **ports}
    for region, service in ((PRIMARY, "app-tls"), (EU, "app-pooled"), (EU, "app-unpooled")):
        world.kill(region, service)


async def post_events(port: int, n: int) -> None:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{port}", cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as c:
        async with c.post("/login", json={"name": f"tls-{uuid.uuid4().hex[:6]}"}) as r:
            assert r.status == 200, await r.text()
        for i in range(n):
            async with c.post("/events", json={"title": f"tls {i}"}) as r:
                assert r.status == 201, await r.text()
                assert (await r.json())["region"] == PRIMARY


async def test_tls_forwarding_over_a_warm_pool_opens_no_connection(calendar, tls_pair):
    await post_events(tls_pair["pooled"], 1)  # any lazy set-up is done
    before = relay_connections(calendar, tls_pair["relay"])
    await post_events(tls_pair["pooled"], 30)
    assert relay_connections(calendar, tls_pair["relay"]) == before


async def test_pool_switch_off_opens_a_connection_per_forward(calendar, tls_pair):
    before = relay_connections(calendar, tls_pair["relay"])
    await post_events(tls_pair["unpooled"], 10)
    # login + 10 writes, each on a fresh TCP + TLS connection
    assert relay_connections(calendar, tls_pair["relay"]) - before >= 11

"""The primary's run slots against the real lab: `latitude serve` with `max_runs = 1` in
us-west, eu-west's gateway forwarding to it over the lab's link. Writes past what one slot can
finish within their budgets are refused at the primary before anything of them runs (signed
`503` with the key, relayed by eu-west); the rest wait their turn; a refused write's retry with
its key runs once. The ones that ran are counted in the primary database."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.extra_slots import EU, PRIMARY, free_port, topology_with_primary_at, wait_up

REPO = Path(__file__).resolve().parents[1]
HOLD_MS = 400
SETTINGS = """
[gateway]
max_runs = 1
deadline_s = 2.0
"""


@pytest.fixture(scope="module")
def one_run(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    ports = {r: free_port() for r in (PRIMARY, EU)}
    seen = {PRIMARY: ports[PRIMARY], EU: world.add_relay(EU, PRIMARY, ports[PRIMARY])}
    cli = [sys.executable, "-m", "latitude.cli", "serve", "tests.edge_app:app"]
    try:
        for region in (PRIMARY, EU):
            topology = folder / f"{region}.toml"
            topology.write_text(
                topology_with_primary_at(
                    world, region, f"http://127.0.0.1:{seen[region]}", SETTINGS
                )
            )
            world.set_service(
                region,
                "one-run",
                [*cli, "--region", region, "--topology", str(topology)]
                + ["--port", str(ports[region]), "--app-dir", str(REPO)],
            )
        for region in (PRIMARY, EU):
            wait_up(f"http://127.0.0.1:{ports[region]}/_latitude/health", timeout=60)
        primary_db = next(
            r["database_url"] for r in world.status()["regions"] if r["name"] == PRIMARY
        )
        yield ports[EU], primary_db
    finally:
        for region in (PRIMARY, EU):
            try:
                world.kill(region, "one-run")
            except Exception:
                pass


def _recorded(primary_db: str, keys: list[str]) -> dict[str, int]:
    with psycopg.connect(primary_db) as db:
        rows = db.execute(
            "select key, count(*) from edge_writes where key = any(%s) group by key", (keys,)
        ).fetchall()
    return dict(rows)


async def test_writes_past_one_slot_are_refused_unrun_and_their_retry_runs_once(one_run):
    port, primary_db = one_run
    hold = {"x-hold-ms": str(HOLD_MS)}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        # Runs enough for the primary to know how long one holds its slot.
        for _ in range(10):
            r = await http.post("/w", headers={**hold, "x-record": f"warm-{uuid.uuid4()}"})
            assert r.status_code == 201, r.text
        keys = [f"burst-{uuid.uuid4()}" for _ in range(6)]
        answers = await asyncio.gather(
            *(http.post("/w", headers={**hold, "x-record": k}) for k in keys)
        )
        ran = [k for k, a in zip(keys, answers, strict=True) if a.status_code == 201]
        refused = [(k, a) for k, a in zip(keys, answers, strict=True) if a.status_code == 503]
        assert len(ran) + len(refused) == len(keys), [a.status_code for a in answers]
        assert ran and refused  # one slot finishes some of six 0.4 s runs in 2 s, not all
        unrun = [(k, a) for k, a in refused if "running at the primary" in a.json()["detail"]]
        assert unrun, [a.json()["detail"] for _, a in refused]
        for _, answer in refused:  # unrun, or (on a slow machine) stopped while held
            assert answer.headers["retry-after"] == "1" and answer.headers["idempotency-key"]
        assert "max_runs" in unrun[0][1].json()["detail"]
        assert _recorded(primary_db, keys) == {k: 1 for k in ran}  # no refused one wrote

        key, answer = unrun[0]
        again = await http.post(
            "/w",
            headers={**hold, "x-record": key, "idempotency-key": answer.headers["idempotency-key"]},
        )
        assert again.status_code == 201, again.text
        assert _recorded(primary_db, [key]) == {key: 1}

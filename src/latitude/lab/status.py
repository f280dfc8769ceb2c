"""`latitude lab status`: what runs in each region, what is down, replication lag, the links."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from latitude.lab import process
from latitude.lab.errors import LabError
from latitude.lab.postgres import database_url
from latitude.lab.state import LabState

if TYPE_CHECKING:
    from latitude.lab.world import LabWorld


def replication_rows(state: LabState) -> list[dict]:
    """Each replica's replication as the primary sees it (none if the primary is down)."""
    url = database_url(state.regions[state.primary].pg_port)
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as c:
            rows = c.execute(
                "select application_name, state,"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,"
                " extract(epoch from replay_lag) * 1000"
                " from pg_stat_replication"
            ).fetchall()
    except psycopg.Error:
        return []
    return [
        {
            "region": r[0],
            "state": r[1],
            "lag_bytes": r[2],
            "lag_ms": float(r[3]) if r[3] is not None else None,
        }
        for r in rows
    ]


def world_status(world: LabWorld) -> dict:
    state = world.state()
    topology = world.topology()
    supervisor_up = world.is_running()
    links: list[dict] = []
    if supervisor_up:
        with contextlib.suppress(LabError):
            links = world.control().call("GET", "/status", timeout=5)["links"]
    replication = {row["region"]: row for row in replication_rows(state)}
    regions = []
    down: list[str] = [] if supervisor_up else ["link supervisor"]
    for name, r in state.regions.items():
        pg_up = world._pg(state, name).is_running()
        valkey_up = process.read_pid(world._valkey_dir(name) / "valkey.pid") is not None
        services = {
            svc: "up" if process.read_pid(world._service_pid_file(name, svc)) else "down"
            for svc in r.services
        }
        app_state = services.get("app", "none")
        rep = replication.get(name)
        lag_bytes = lag_ms = None
        if r.role == "replica" and rep:
            lag_bytes = rep["lag_bytes"]
            lag_ms = (
                rep["lag_ms"] if rep["lag_ms"] is not None else (0.0 if lag_bytes == 0 else None)
            )
        if not pg_up:
            down.append(f"{name} db")
        if not valkey_up:
            down.append(f"{name} sessions")
        down += [f"{name} {svc}" for svc, st in services.items() if st == "down"]
        if r.role == "replica" and pg_up and not rep:
            down.append(f"{name} replication")
        regions.append(
            {
                "gateway": _gateway_stats(r.valkey_port, name) if valkey_up else {},
                "name": name,
                "role": r.role,
                "database_url": database_url(r.pg_port),
                "session_store_url": f"redis://127.0.0.1:{r.valkey_port}/0",
                "app_url": f"http://127.0.0.1:{r.app_port}",
                "mirror_url": f"http://127.0.0.1:{r.mirror_port}",
                "topology_file": r.topology_file,
                "ports": {
                    "pg": r.pg_port,
                    "valkey": r.valkey_port,
                    "app": r.app_port,
                    "mirror": r.mirror_port,
                },
                "db": "up" if pg_up else "down",
                "sessions": "up" if valkey_up else "down",
                "app": app_state,
                "services": services,
                "replication": rep["state"]
                if rep
                else (None if r.role == "primary" else "not streaming"),
                "lag_bytes": lag_bytes,
                "lag_ms": lag_ms,
            }
        )
    return {
        "state_dir": str(world.state_dir),
        "primary": state.primary,
        "epoch": asdict(state.current_epoch()),
        "promotion": _read_json(world.state_dir / "promotion.json"),
        "started_at": state.started_at,
        "up_seconds": state.up_seconds,
        "regions": regions,
        "links": [
            {
                "a": link["a"],
                "b": link["b"],
                "rtt_ms": link.get("rtt_ms"),
                "jitter_ms": link.get("jitter_ms"),
                "state": link.get("state"),
                "connections": link.get("connections_open"),
            }
            for link in links
        ]
        or [
            {"a": a, "b": b, "rtt_ms": topology.rtt_ms(a, b), "state": "unknown"}
            for a, b in topology.region_pairs()
        ],
        "down": down,
    }


def _gateway_stats(valkey_port: int, region: str) -> dict:
    """What the region's gateway processes have counted (reads waited, forwarded, ...)."""
    import redis

    try:
        client = redis.Redis(port=valkey_port, socket_timeout=1, socket_connect_timeout=1)
        with client:
            raw = client.hgetall(f"latitude:stats:{region}")
    except redis.RedisError:
        return {}
    return {k.decode(): round(float(v), 1) for k, v in raw.items()}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

"""What a series of requests cost each part of a lab world, counted by the parts themselves:
CPU time of a process tree (from /proc), commands a Valkey processed (`INFO commandstats`) and
statements a Postgres server ran (its own log, with `log_statement = 'all'` switched on by a
configuration reload for the duration only).

A statement is one client round trip for a driver that sends one statement per exchange, as
psycopg does outside pipeline mode; a Valkey command is one round trip unless it was pipelined.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import redis
from _lab import tree_cpu_seconds

from latitude.lab import LabWorld
from latitude.lab.postgres import database_url

# "LOG:  statement: ..." (simple protocol) or "LOG:  execute <unnamed>: ..." (extended).
_STATEMENT = re.compile(rb"LOG:  (?:statement|execute [^:]*):")


def valkey_commands(port: int) -> int:
    """Commands this Valkey has processed, not counting the INFO calls that ask."""
    with redis.Redis(host="127.0.0.1", port=port) as r:
        stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


def _set_log_statement(port: int, value: str | None) -> None:
    with psycopg.connect(database_url(port), autocommit=True) as conn:
        if value is None:
            conn.execute("ALTER SYSTEM RESET log_statement")
        else:
            conn.execute(f"ALTER SYSTEM SET log_statement = '{value}'")
        conn.execute("SELECT pg_reload_conf()")


class Census:
    """Counts over one window, per region: Valkey commands, Postgres statements, and the CPU
    time of the given process trees. Use as `with census.window() as w: ...; w.result`."""

    def __init__(self, world: LabWorld, cpu_pids: dict[str, int]):
        state = world.state()
        self.regions = list(state.regions)
        self.valkey = {r: state.regions[r].valkey_port for r in self.regions}
        self.pg = {r: state.regions[r].pg_port for r in self.regions}
        self.pg_log = {
            r: Path(state.regions[r].pg_data).parent / "postgres.log" for r in self.regions
        }
        self.cpu_pids = cpu_pids

    @contextlib.contextmanager
    def logging_statements(self) -> Iterator[None]:
        """`log_statement = 'all'` on every region's server (a standby too: it is a reload,
        not a write), reset afterwards."""
        done = []
        try:
            for r in self.regions:
                _set_log_statement(self.pg[r], "all")
                done.append(r)
            time.sleep(0.3)  # the reload reaches each backend at its next command
            yield
        finally:
            for r in done:
                _set_log_statement(self.pg[r], None)

    def _snapshot(self) -> dict:
        return {
            "cpu": {name: tree_cpu_seconds(pid) for name, pid in self.cpu_pids.items()},
            "valkey": {r: valkey_commands(p) for r, p in self.valkey.items()},
            "pg_log_offset": {r: self.pg_log[r].stat().st_size for r in self.regions},
        }

    @contextlib.contextmanager
    def window(self) -> Iterator[dict]:
        out: dict = {}
        before = self._snapshot()
        yield out
        time.sleep(0.3)  # let the servers' log lines land
        after = self._snapshot()
        out["cpu_s"] = {k: after["cpu"][k] - before["cpu"][k] for k in self.cpu_pids}
        out["valkey_commands"] = {r: after["valkey"][r] - before["valkey"][r] for r in self.regions}
        out["pg_statements"] = {}
        for r in self.regions:
            with open(self.pg_log[r], "rb") as f:
                f.seek(before["pg_log_offset"][r])
                chunk = f.read(after["pg_log_offset"][r] - before["pg_log_offset"][r])
            out["pg_statements"][r] = len(_STATEMENT.findall(chunk))

"""Promotion in production: the `Cluster` for `latitude promote REGION --topology FILE`.

It reaches what the topology names: each region's Postgres at its `database_url` (over SQL only)
and each region's gateway at its `internal_url` (`POST /_latitude/epoch`). Without a shell on
the database hosts, the old primary is fenced read-only (`default_transaction_read_only`, its
sessions ended) rather than stopped, and the command prints what to run on its host to make it
a replica (`pg_rewind`, `standby.signal`).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from latitude.promotion.epoch import Epoch, EpochFile, epoch_file_for, initial_epoch, verify_epoch
from latitude.promotion.follow import EPOCH_PATH
from latitude.promotion.journal import BadPromotion, Journal
from latitude.promotion.postgres import PgServer, PgUnavailable, slot_name
from latitude.promotion.regions_http import json_to_all
from latitude.signing import Keyring
from latitude.signing.keys import SigningConfigError, keyring_from_topology
from latitude.topology import Topology

HTTP_TIMEOUT_S = 3.0
STREAM_TIMEOUT_S = 20.0


def keyring_from(topology: Topology) -> Keyring:
    """Epochs are signed with the forwarding keys: the topology's keyring (fail closed)."""
    try:
        return keyring_from_topology(topology)
    except SigningConfigError as exc:
        raise BadPromotion(f"{exc} (epochs are signed with the forwarding keys)") from None


class RemoteCluster:
    def __init__(self, topology: Topology):
        self.topology = topology
        self.regions = [r.name for r in topology.regions]
        self.keyring = keyring_from(topology)
        self.synchronous = int(topology.replication.get("synchronous", 0) or 0)
        self.file = EpochFile(epoch_file_for(topology.source), self.keyring)
        missing = [r.name for r in topology.regions if not r.database_url]
        if missing:
            raise BadPromotion(f"regions without database_url: {', '.join(missing)}")

    def epoch(self) -> Epoch:
        newest = initial_epoch(self.topology)
        found = self.file.read()
        if found and found[0].newer_than(newest):
            newest = found[0]
        for answer in json_to_all(self._urls(), timeout_s=HTTP_TIMEOUT_S).values():
            token = answer.get("token") if isinstance(answer, dict) else None
            if token:
                try:
                    epoch = verify_epoch(self.keyring, token)
                except Exception:
                    continue
                if epoch.newer_than(newest):
                    newest = epoch
                    self.file.offer(token)
        return newest

    def journal(self) -> Journal:
        return Journal(Path(self.topology.source).absolute().parent)

    def pg(self, region: str) -> PgServer:
        return PgServer(region, self.topology.region(region).database_url, timeout_s=5)

    def conninfo(self, replica: str, upstream: str) -> str:
        params = conninfo_to_dict(self.topology.region(upstream).database_url)
        params.pop("dbname", None)
        params.setdefault("connect_timeout", "5")
        return make_conninfo(**params, application_name=replica)

    def _url(self, region) -> str | None:
        base = region.internal_url or region.public_url
        return base.rstrip("/") + EPOCH_PATH if base else None

    def _urls(self, skip: tuple[str, ...] = ()) -> dict[str, str]:
        urls = {r.name: self._url(r) for r in self.topology.regions if r.name not in skip}
        return {name: url for name, url in urls.items() if url}

    def publish(self, token: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
        self.file.offer(token)
        told = {}
        for name, answer in json_to_all(
            self._urls(skip), {"token": token}, timeout_s=HTTP_TIMEOUT_S
        ).items():
            if isinstance(answer, urllib.error.HTTPError):
                told[name] = f"refused ({answer.code})"
            elif isinstance(answer, OSError):
                told[name] = "unreachable"
            else:
                told[name] = "told"  # an answer that is not JSON was an answer all the same
        return told

    def record(self, epoch: Epoch, token: str, skip: tuple[str, ...] = ()) -> None:
        """The epoch file next to the topology is the record; the topology file is the user's."""

    def fence(self, region: str) -> int:
        return self.pg(region).fence_read_only()

    def unfence(self, region: str) -> None:
        self.pg(region).unfence()

    def repoint(self, region: str, primary: str) -> str:
        pg = self.pg(region)
        try:
            if not pg.in_recovery():
                return "is not a standby (left alone)"
            pg.set_upstream(self.conninfo(region, primary), slot_name(region))
        except PgUnavailable:
            return "unreachable: re-point it when it is back (`latitude rejoin`)"
        if self._streaming(region, primary):
            return "streams"
        return "does not stream: it is past the new timeline's fork; rewind it (`latitude rejoin`)"

    def _streaming(self, region: str, primary: str) -> bool:
        return self.wait_streaming(region, primary, STREAM_TIMEOUT_S)

    def wait_streaming(self, region: str, primary: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                rows = self.pg(primary).query(
                    "select 1 from pg_stat_replication where application_name = %s"
                    " and state = 'streaming'",
                    (region,),
                )
                if rows:
                    return True
            except (PgUnavailable, psycopg.Error):
                pass
            time.sleep(0.2)
        return False

    def rejoin(self, region: str, primary: str) -> str:
        return (
            "fenced read-only; to make it a replica run on its database host "
            f"`latitude rejoin {region} --topology FILE` (stop, pg_rewind from {primary}, "
            "standby.signal, start; --dry-run prints the steps)"
        )

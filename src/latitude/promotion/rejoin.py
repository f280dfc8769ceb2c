"""`latitude rejoin REGION --topology FILE`: bring an old primary back as a replica, in production.

Run on the region's database host (the data directory must be local): stop its Postgres
cleanly, `pg_rewind` it onto the new primary's timeline (the source server is the current
epoch's primary at the `database_url` the topology names; its diverging WAL is discarded; a
server that did not diverge needs no rewind and pg_rewind says so), write `standby.signal`
with `primary_conninfo` / `primary_slot_name` (and lift the read-only fence), make sure the new
primary keeps a slot for it, start it, and wait until it streams. The same steps as the lab's
`latitude lab revive` (`latitude.lab.promote.LabCluster.rejoin`), with the tools found on this
host instead of the lab's. `--dry-run` prints them and changes nothing.

Run as root, the tools run as the data directory's owner (Postgres refuses root).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from latitude.promotion.journal import BadPromotion, PromotionError
from latitude.promotion.postgres import PgUnavailable, slot_name

TOOLS = ("pg_ctl", "pg_rewind")
STREAM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Step:
    text: str  # what is done, shown as it starts (and all of them by --dry-run)
    argv: tuple[str, ...] | None = None  # a command, or None for a step done here


def find_tools(bindir: Path | None) -> Path:
    """The folder holding pg_ctl and pg_rewind: `--bindir`, or wherever PATH has pg_rewind."""
    if bindir is not None:
        missing = [t for t in TOOLS if not (bindir / t).is_file()]
        if missing:
            raise BadPromotion(
                f"{', '.join(missing)} not found in {bindir}; pass --bindir with the folder of "
                "the PostgreSQL server binaries (the version the data directory was made with)"
            )
        return bindir
    found = shutil.which("pg_rewind")
    if found is None or shutil.which("pg_ctl", path=str(Path(found).parent)) is None:
        raise BadPromotion(
            "pg_rewind is not on PATH: install the PostgreSQL server binaries "
            "(Debian: postgresql-NN, in /usr/lib/postgresql/NN/bin) or pass --bindir DIR"
        )
    return Path(found).parent


def local_data_dir(cluster, region: str, given: Path | None) -> Path:
    """The region's data directory, which must be on this host."""
    where = given
    if where is None:
        try:
            where = Path(cluster.pg(region).query("show data_directory")[0][0])
        except PgUnavailable:
            raise BadPromotion(
                f"{region}'s database does not answer, so its data directory is unknown; "
                "pass --data-dir DIR (on this host)"
            ) from None
    if not (where / "PG_VERSION").is_file():
        raise BadPromotion(
            f"{where} is not a Postgres data directory on this host: run `latitude rejoin "
            f"{region}` on {region}'s database host, or pass --data-dir with its local path"
        )
    return where


def _port(cluster, region: str) -> str | None:
    try:
        return str(cluster.pg(region).query("show port")[0][0])
    except PgUnavailable:
        return conninfo_to_dict(cluster.topology.region(region).database_url).get("port")


def plan(cluster, region: str, primary: str, data: Path, bindir: Path) -> list[Step]:
    source = cluster.conninfo(region, primary)
    running = (data / "postmaster.pid").exists()
    steps = []
    if running:
        steps.append(
            Step(
                f"stop {region}'s Postgres cleanly",
                (str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60"),
            )
        )
    steps += [
        Step(
            f"rewind it onto {primary}'s timeline",
            (
                str(bindir / "pg_rewind"),
                "-D",
                str(data),
                "--source-server",
                f"{source} dbname=postgres",
                "--progress",
            ),
        ),
        Step(
            f"standby.signal, primary_conninfo = '{source}', primary_slot_name = "
            f"'{slot_name(region)}', default_transaction_read_only = off"
        ),
        Step(f"a replication slot {slot_name(region)!r} on {primary}"),
        Step(
            f"start {region}'s Postgres as a standby",
            (
                str(bindir / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-l",
                str(data / "latitude-rejoin.log"),
                "-w",
                "-t",
                "120",
            ),
        ),
        Step(f"wait until it streams from {primary}"),
    ]
    return steps


def rejoin(
    cluster,
    region: str,
    *,
    data_dir: Path | None = None,
    bindir: Path | None = None,
    dry_run: bool = False,
    progress=print,
) -> list[str]:
    """Make `region` a streaming replica of the current primary; returns the lines to show."""
    if region not in cluster.regions:
        raise BadPromotion(
            f"unknown region {region!r}; the regions are {', '.join(cluster.regions)}"
        )
    primary = cluster.epoch().primary
    if region == primary:
        others = ", ".join(r for r in cluster.regions if r != primary)
        raise BadPromotion(
            f"{region} is the primary, so it has nothing to rejoin; `latitude rejoin` brings "
            f"back an old primary ({others})"
        )
    tools = find_tools(bindir)
    data = local_data_dir(cluster, region, data_dir)
    port = _port(cluster, region)
    steps = plan(cluster, region, primary, data, tools)
    if dry_run:
        return [
            f"{i}. {s.text}" + (f": {shlex.join(s.argv)}" if s.argv else "")
            for i, s in enumerate(steps, 1)
        ]
    owner = _owner(data)
    for i, step in enumerate(steps, 1):
        progress(f"[{i}/{len(steps)}] {step.text}")
        if step.argv is not None:
            _run(step.argv, owner)
        elif step.text.startswith("standby.signal"):
            _make_standby(data, cluster.conninfo(region, primary), slot_name(region), port, owner)
        elif step.text.startswith("a replication slot"):
            try:
                cluster.pg(primary).ensure_slots([region])
            except PgUnavailable as exc:
                raise PromotionError(f"{exc}; {region} is stopped and rewound: run again") from None
        elif not cluster.wait_streaming(region, primary, STREAM_TIMEOUT_S):
            raise PromotionError(
                f"{region} started but does not stream from {primary} within "
                f"{STREAM_TIMEOUT_S:.0f} s; see {data / 'latitude-rejoin.log'}"
            )
    return [f"{region} rejoined: a standby streaming from {primary}"]


def _owner(data: Path) -> dict:
    st = data.stat()
    if os.geteuid() == 0 and st.st_uid != 0:
        return {"user": st.st_uid, "group": st.st_gid, "extra_groups": []}
    return {}


def _run(argv: tuple[str, ...], owner: dict) -> None:
    tool = Path(argv[0]).name
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C", "PGCONNECT_TIMEOUT": "10"},
            **owner,
        )
    except subprocess.TimeoutExpired:
        raise PromotionError(f"{tool} did not finish within 600 s") from None
    if result.returncode != 0:
        detail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise PromotionError(f"{tool} failed: {detail}; nothing after it was done; run again")


def _make_standby(data: Path, conninfo: str, slot: str, port: str | None, owner: dict) -> None:
    """Settings in postgresql.auto.conf (the server is stopped), written temp-then-rename."""
    path = data / "postgresql.auto.conf"
    keys = {"primary_conninfo", "primary_slot_name", "default_transaction_read_only"}
    if port:
        keys.add("port")  # pg_rewind copied the source's settings, its port among them
    kept = [
        line
        for line in (path.read_text().splitlines() if path.exists() else [])
        if line.split("=", 1)[0].strip() not in keys
    ]
    quoted = conninfo.replace("'", "''")
    kept += [
        "# latitude rejoin",
        f"primary_conninfo = '{quoted}'",
        f"primary_slot_name = '{slot}'",
        "default_transaction_read_only = off",
        *([f"port = {port}"] if port else []),
    ]
    for target, text in ((path, "\n".join(kept) + "\n"), (data / "standby.signal", "")):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        if owner:
            os.chown(tmp, owner["user"], owner["group"])
        os.replace(tmp, target)

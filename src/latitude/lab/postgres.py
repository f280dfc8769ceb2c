"""One lab Postgres server: a primary made by `initdb`, or a streaming replica made by
`pg_basebackup -R` from the primary through the emulated link."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from latitude import atomic
from latitude.lab.binaries import RunAs

DATABASE = "app"
SUPERUSER = "postgres"

# Lab-only settings: durability against a machine crash buys nothing here and costs seconds.
LAB_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "fsync": "off",
    # pg_rewind (an old primary rejoining after a failover) needs both of these.
    "full_page_writes": "on",
    "wal_log_hints": "on",
    # A standby whose primary went away retries after this (default 5 s): with quorum commit,
    # the new primary's first commits wait for it to stream again.
    "wal_retrieve_retry_interval": "'500ms'",
    "shared_buffers": "32MB",
    "max_connections": "200",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "wal_receiver_status_interval": "1s",
    "hot_standby_feedback": "on",
    "log_min_messages": "warning",
}


INITDB_ARGS = ("-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")


class PostgresError(Exception):
    pass


def database_url(port: int, host: str = "127.0.0.1") -> str:
    return f"postgresql://{SUPERUSER}@{host}:{port}/{DATABASE}"


@dataclass
class PostgresNode:
    name: str
    data_dir: Path
    port: int
    bin_dir: Path
    run_as: RunAs

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    @property
    def url(self) -> str:
        return database_url(self.port)

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self._exec([str(self.bin_dir / tool), *args], tool, timeout)

    def _exec(self, cmd: list[str], tool: str, timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "PGCONNECT_TIMEOUT": "10"}
        try:
            result = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
                **self.run_as.popen_kwargs(),
            )
        except subprocess.TimeoutExpired:
            raise PostgresError(
                f"{self.name}: {tool} did not finish within {timeout:.0f} s"
            ) from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise PostgresError(f"{self.name}: {tool} failed: {' | '.join(detail)}")
        return result

    def _prepare_parent(self) -> None:
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self.run_as.own(parent)
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)

    def _configure(self, extra: dict[str, str]) -> None:
        settings = {**LAB_SETTINGS, "port": str(self.port), **extra}
        with open(self.data_dir / "postgresql.auto.conf", "a", encoding="utf-8") as f:
            f.write("\n# latitude lab\n")
            for key, value in settings.items():
                f.write(f"{key} = {value}\n")

    def init_primary(self, template: bool = True) -> None:
        """A new cluster: a copy of a cached `initdb` result when `template` (initdb costs
        0.6-1.5 s, its copy ~0.1 s), made by this same initdb on first use."""
        self._prepare_parent()
        if template:
            cached = self._template()
            self._exec(["cp", "-a", str(cached), str(self.data_dir)], "cp", 60)
        else:
            self._initdb(self.data_dir)
        self._configure({})
        with open(self.data_dir / "pg_hba.conf", "a", encoding="utf-8") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")

    def _initdb(self, target: Path) -> None:
        self._run("initdb", "-D", str(target), *INITDB_ARGS)

    def _template(self) -> Path:
        """The cached initdb result for these binaries, this user and these options."""
        initdb = (self.bin_dir / "initdb").resolve()
        st = initdb.stat()
        key = f"{initdb}|{st.st_size}|{st.st_mtime_ns}|{self.run_as.user}|{INITDB_ARGS}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cached = Path(tempfile.gettempdir()) / f"latitude-initdb-{os.geteuid()}-{digest}"
        if not (cached / "PG_VERSION").exists():
            # Built beside it and renamed into place: a concurrent `up` never sees half of it.
            building = cached.with_name(f"{cached.name}.{os.getpid()}-{secrets.token_hex(4)}")
            try:
                self._initdb(building)
                try:
                    os.rename(building, cached)
                except OSError:  # another `up` put its copy there first
                    if not (cached / "PG_VERSION").exists():
                        raise
            finally:
                shutil.rmtree(building, ignore_errors=True)
        return cached

    def create_database(self) -> None:
        with psycopg.connect(
            database_url(self.port).rsplit("/", 1)[0] + "/postgres", autocommit=True
        ) as c:
            exists = c.execute(
                "select 1 from pg_database where datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                c.execute(f"create database {DATABASE}")

    def create_slots(self, slots: list[str]) -> None:
        """Physical replication slots that keep WAL from now on (for `init_replica(reserved=True)`)."""
        with psycopg.connect(
            database_url(self.port).rsplit("/", 1)[0] + "/postgres", autocommit=True
        ) as c:
            for slot in slots:
                c.execute("select pg_create_physical_replication_slot(%s, true)", (slot,))

    def init_replica(self, upstream_port: int, slot: str, reserved: bool = False) -> None:
        """Clone the primary through `upstream_port` (the link relay), streaming via a slot.

        `reserved`: the slot exists already and has kept WAL since before this backup, so the
        backup carries no WAL (no second connection, no wait for the last segment: ~0.6 s
        less over a 125 ms link) and the replica streams what it needs when it starts."""
        self._prepare_parent()
        wal = ["-X", "none"] if reserved else ["-X", "stream", "-C", "-S", slot]
        self._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(upstream_port),
            "-U",
            SUPERUSER,
            "-D",
            str(self.data_dir),
            "-R",
            *wal,
            "-c",
            "fast",
            "--no-sync",
            timeout=300,
        )
        self._configure(
            {
                "primary_conninfo": (
                    f"'host=127.0.0.1 port={upstream_port} user={SUPERUSER} "
                    f"application_name={self.name} connect_timeout=5'"
                ),
                "primary_slot_name": f"'{slot}'",
            }
        )

    def start(self, timeout: float = 60) -> None:
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(timeout)),
            "-s",
            timeout=timeout + 5,
        )

    def stop(self, mode: str = "fast") -> None:
        if not self.is_running():
            return
        self._run(
            "pg_ctl",
            "stop",
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            "30",
            "-s",
            timeout=40,
        )

    def pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    # ---- promotion (latitude.promotion): demotion token, standby, rewind ----------------------

    def controldata(self) -> dict[str, str]:
        """`pg_controldata`: the cluster's state, timeline and latest checkpoint."""
        out = self._run("pg_controldata", "-D", str(self.data_dir), timeout=30).stdout
        return {
            k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())
        }

    def is_standby(self) -> bool:
        return (self.data_dir / "standby.signal").exists()

    def set_settings(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.auto.conf (the last one of a name wins); server down."""
        self._configure_only(settings)

    def _configure_only(self, settings: dict[str, str]) -> None:
        path = self.data_dir / "postgresql.auto.conf"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        text += "\n# latitude promotion\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        atomic.write_text(path, text, before_replace=self.run_as.own)

    def make_standby(self, upstream_port: int, slot: str) -> None:
        """Make this (stopped) server a streaming standby of the server behind `upstream_port`."""
        self._configure_only(
            {
                "primary_conninfo": (
                    f"'host=127.0.0.1 port={upstream_port} user={SUPERUSER} "
                    f"application_name={self.name} connect_timeout=5'"
                ),
                "primary_slot_name": f"'{slot}'",
                "default_transaction_read_only": "off",
                # pg_rewind copies the source's settings, its port among them: restate ours.
                "port": str(self.port),
            }
        )
        signal = self.data_dir / "standby.signal"
        signal.write_text("")
        self.run_as.own(signal)

    def rewind(self, source_port: int, timeout: float = 120) -> None:
        """`pg_rewind` this (stopped) server onto the timeline of the server at `source_port`."""
        self._run(
            "pg_rewind",
            "-D",
            str(self.data_dir),
            "--source-server",
            f"host=127.0.0.1 port={source_port} user={SUPERUSER} dbname=postgres connect_timeout=10",
            "--no-sync",
            timeout=timeout,
        )

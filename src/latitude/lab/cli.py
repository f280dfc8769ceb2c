"""`latitude lab ...`, `latitude demo` and `latitude mirror demo`: the commands that run in the
local world. Thin, as `latitude.cli` is: they parse arguments, call the lab, and print."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from latitude import atomic
from latitude.console import (
    StateDirOption,
    TopologyOption,
    fail,
    out,
    progress_printer,
    promotion_call,
)
from latitude.lab import LabWorld

lab_app = typer.Typer(
    no_args_is_help=True, help="The local world: regions joined by emulated ocean links."
)


@lab_app.command("up")
def lab_up(topology: TopologyOption = None, state_dir: StateDirOption = None) -> None:
    """Start the local world: Postgres with streaming replicas, Valkey, emulated links."""
    world = LabWorld(state_dir, topology, progress=progress_printer())
    world.up()
    print_status(world.status())


@lab_app.command("status")
def lab_status(
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show regions, ports, replication lag, links and what is down."""
    status = LabWorld(state_dir).status()
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)


@lab_app.command("down")
def lab_down(state_dir: StateDirOption = None) -> None:
    """Stop everything the lab started."""
    stopped = LabWorld(state_dir, progress=progress_printer()).down()
    out.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@lab_app.command("link")
def lab_link(
    action: Annotated[str, typer.Argument(help="cut, heal, reset or set")],
    a: Annotated[str, typer.Argument(help="One region of the link")],
    b: Annotated[str, typer.Argument(help="The other region")],
    rtt: Annotated[
        float | None, typer.Option("--rtt", help="New round-trip time in ms (set)")
    ] = None,
    jitter: Annotated[float | None, typer.Option("--jitter", help="New jitter in ms (set)")] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Cut, heal, reset or re-time the link between two regions."""
    result = LabWorld(state_dir).link(action, a, b, rtt_ms=rtt, jitter_ms=jitter)
    out.print(f"{a}↔{b}: {result.get('state')}, RTT {result.get('rtt_ms')} ms")


@lab_app.command("kill")
def lab_kill(
    region: str,
    part: Annotated[str, typer.Argument(help="db, sessions or app")],
    state_dir: StateDirOption = None,
) -> None:
    """Kill one part of a region (as a crash would)."""
    out.print(LabWorld(state_dir).kill(region, part))


@lab_app.command("revive")
def lab_revive(
    region: str,
    part: Annotated[
        str | None, typer.Argument(help="db, sessions or app (default: all, rejoining the db)")
    ] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Start a killed part of a region again (all of it: an old primary rejoins as a replica)."""
    if part is not None:
        out.print(LabWorld(state_dir).revive(region, part))
        return
    from latitude.lab.promote import revive_region

    for line in promotion_call(revive_region, LabWorld(state_dir), region):
        out.print(line)


@lab_app.command("promote")
def lab_promote(
    region: Annotated[str | None, typer.Argument(help="The replica region to promote.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Forced failover: the primary is unreachable.")
    ] = False,
    auto_choose: Annotated[
        bool, typer.Option("--auto-choose", help="With --force: the most caught-up replica.")
    ] = False,
    max_lag_bytes: Annotated[
        int | None, typer.Option("--max-lag-bytes", help="Refuse a switchover further behind.")
    ] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Move the primary to another region of the lab (switchover, or --force failover)."""
    from latitude.lab.promote import promote

    result = promotion_call(
        promote,
        LabWorld(state_dir),
        region,
        force=force,
        auto_choose=auto_choose,
        max_lag_bytes=max_lag_bytes,
        progress=progress_printer(),
    )
    print(json.dumps(result))


@lab_app.command("dashboard")
def lab_dashboard(
    state_dir: StateDirOption = None,
    region: Annotated[
        str | None, typer.Option("--region", "-r", help="Whose dashboard (default: the primary's).")
    ] = None,
    open_it: Annotated[bool, typer.Option("--open", help="Open it in a browser.")] = False,
) -> None:
    """Print (or open) the URL of a region's live dashboard: every region, updated each second."""
    world = LabWorld(state_dir)
    state = world.state()
    name = region or state.primary
    if name not in state.regions:
        fail(f"no region {name!r} in the lab (regions: {', '.join(state.regions)})", 2)
    if "app" not in state.regions[name].services:
        fail(f"{name} runs no app yet, so no dashboard; `latitude demo` starts one in every region")
    url = f"http://127.0.0.1:{state.regions[name].app_port}/_latitude/dashboard"
    out.print(f"{name}'s dashboard: {url}", highlight=False)
    if open_it:
        import webbrowser

        webbrowser.open(url)


@lab_app.command("place")
def lab_place(
    city: Annotated[str, typer.Argument(help="Sydney, Frankfurt, São Paulo, Tokyo, ...")],
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Put yourself in CITY: URLs to every region's app over client links timed by distance."""
    from latitude.lab import places

    try:
        where = places.place(city)
    except places.UnknownPlace as exc:
        fail(str(exc), 2)
    vantage = places.join(LabWorld(state_dir), where)
    if as_json:
        print(json.dumps(vantage.as_dict(), indent=2, ensure_ascii=False))
        return
    near, primary = vantage.nearest, vantage.primary
    out.print(
        f"you in {where.name} -> your nearest region ({near}, {vantage.rtt_ms[near]:.0f} ms): "
        f"{vantage.app_urls[near]}",
        highlight=False,
    )
    out.print(
        f"you in {where.name} -> the primary only ({primary}, {vantage.rtt_ms[primary]:.0f} ms): "
        f"{vantage.app_urls[primary]}",
        highlight=False,
    )
    for region, url in vantage.app_urls.items():
        if region not in (near, primary):
            out.print(
                f"you in {where.name} -> {region} ({vantage.rtt_ms[region]:.0f} ms): {url}",
                highlight=False,
            )
    out.print(
        f"dashboard (as seen from {where.name}): {vantage.app_urls[primary]}/_latitude/dashboard; "
        "the links stay until `latitude lab down`",
        highlight=False,
    )


def print_status(status: dict) -> None:
    epoch = status.get("epoch") or {}
    table = Table(
        title=f"lab world in {status['state_dir']}: primary {status['primary']}"
        f" (epoch {epoch.get('number', 1)})"
    )
    for col in (
        "region",
        "role",
        "pg",
        "valkey",
        "app",
        "replica state",
        "lag bytes",
        "lag ms",
        "waited (avg ms)",
        "forwarded (reads)",
    ):
        # Region names are never cut short, however narrow the terminal; other headers and
        # cells fold onto the next line rather than end in "…" (a cut figure misleads).
        width = max(len(r["name"]) for r in status["regions"]) if col == "region" else None
        table.add_column(col, no_wrap=col == "region", min_width=width, overflow="fold")
    for r in status["regions"]:
        ports = r["ports"]
        lag_ms = "" if r["lag_ms"] is None else f"{r['lag_ms']:.1f}"
        g = r.get("gateway") or {}
        waited = int(g.get("reads_waited", 0))
        avg = f" ({g.get('wait_ms_total', 0) / waited:.1f})" if waited else ""
        table.add_row(
            r["name"],
            r["role"],
            f"{ports['pg']} ({r['db']})",
            f"{ports['valkey']} ({r['sessions']})",
            f"{ports['app']} ({r['app']})",
            r["replication"] or "-",
            "" if r["lag_bytes"] is None else str(r["lag_bytes"]),
            lag_ms,
            f"{waited}{avg}" if g else "",
            f"{int(g.get('forwarded', 0))} ({int(g.get('reads_forwarded', 0))})" if g else "",
        )
    out.print(table)
    links = Table(title="links")
    names = [f"{link['a']} ↔ {link['b']}" for link in status["links"]] or [""]
    for col in ("link", "RTT ms", "jitter ms", "state", "open connections"):
        width = max(map(len, names)) if col == "link" else None
        links.add_column(col, no_wrap=col == "link", min_width=width)
    for link in status["links"]:
        links.add_row(
            f"{link['a']} ↔ {link['b']}",
            f"{link.get('rtt_ms') or 0:.0f}",
            f"{link.get('jitter_ms') or 0:.0f}",
            str(link.get("state")),
            str(link.get("connections", "")),
        )
    out.print(links)
    out.print(f"down: {', '.join(status['down'])}" if status["down"] else "down: nothing")
    running = status.get("promotion")
    if running:
        done = running.get("done") or ["nothing"]
        out.print(
            f"promotion to {running['target']} unfinished (done: {', '.join(done)}); "
            f"`latitude lab promote {running['target']}` finishes it"
        )


def demo(
    once: Annotated[
        bool, typer.Option("--once", help="Print the figures, then tear the world down.")
    ] = False,
    topology: TopologyOption = None,
    state_dir: StateDirOption = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures as JSON.")
    ] = None,
    reads: Annotated[int, typer.Option("--reads", min=1, help="Reads per scripted user.")] = 20,
    writes: Annotated[int, typer.Option("--writes", min=1, help="Writes per scripted user.")] = 10,
    place: Annotated[
        list[str] | None,
        typer.Option(
            "--place",
            help="A far user's city (repeat it; default: Sydney, Frankfurt, São Paulo, Tokyo, "
            "Virginia, Johannesburg). `--place none` skips far users.",
        ),
    ] = None,
) -> None:
    """Bring the world up with the calendar in every region, time a user next to each region and
    far users under four layouts, and keep it running until Ctrl-C."""
    from latitude.lab import demo as lab_demo
    from latitude.lab import places

    chosen = tuple(place) if place else lab_demo.DEFAULT_PLACES
    if chosen == ("none",):
        chosen = ()
    try:
        chosen = tuple(places.place(name).name for name in chosen)
    except places.UnknownPlace as exc:
        fail(str(exc), 2)
    progress = progress_printer()
    progress(
        "the demo: start a lab world (Postgres primary + streaming replicas, Valkey, emulated "
        "ocean links), run the calendar behind the gateway in every region, then time users"
    )
    world = LabWorld(state_dir, topology, progress=progress)
    # A SIGTERM at any point (a supervisor, a CI timeout, `kill`) stops the world as Ctrl-C
    # does: before, one that came while the demo measured left every process running.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        world.up()
        lab_demo.start_calendar(world, progress=progress)
        progress(f"users next to each region: {writes} writes, then {reads} reads each")
        figures = lab_demo.measure(world, reads=reads, writes=writes, progress=progress)
        print_figures(figures, world.topology().primary.name)
        layouts = None
        if chosen:
            progress(
                f"far users in {', '.join(chosen)}: the same work under {len(lab_demo.LAYOUTS)} "
                "layouts, side by side"
            )
            layouts = lab_demo.measure_layouts(
                world, chosen, reads=reads, writes=writes, progress=progress
            )
            print_layouts(layouts, world.topology().primary.name)
        progress("start a mirror in every region and publish a file at the primary")
        from latitude.lab.mirrors import propagation

        try:
            serial, seen = propagation(world, "demo/hello.json")
        except RuntimeError as exc:  # the mirrors did not become ready; `finally` downs the world
            fail(str(exc), 1)
        for name, ms in seen.items():
            figures[name]["mirror_propagation_ms"] = None if ms is None else round(ms, 1)
            when = f"{ms:.1f} ms" if ms is not None else "not within 10 s"
            out.print(f"mirror: /demo/hello.json (serial {serial}) was in {name} after {when}")
        print_status(world.status())
        if json_file:
            data = {"regions": figures}
            if layouts:
                data = {
                    "layouts": layouts["layouts"],
                    "regions": figures,
                    "places": layouts["places"],
                }
            atomic.write_json(json_file, data, indent=2, ensure_ascii=False)
            out.print(f"figures written to {json_file}", highlight=False)
            if layouts:
                chart = lab_demo.write_chart(layouts, json_file.with_suffix(".svg"))
                out.print(f"chart of the layouts table: {chart}", highlight=False)
        if not once:
            for name, f in figures.items():
                out.print(f"{name}: {f['url']}")
            for name, v in (layouts or {}).get("places", {}).items():
                near, primary = v["nearest"], v["primary"]
                out.print(
                    f"you in {name} -> your nearest region ({near}): {v['app_urls'][near]}; "
                    f"-> the primary only ({primary}): {v['app_urls'][primary]}",
                    highlight=False,
                )
            out.print(
                f"dashboard: {figures[world.topology().primary.name]['url']}/_latitude/dashboard"
            )
            out.print("the world is running; press Ctrl-C to stop it")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    finally:
        stopped = world.down()
        out.print(f"stopped: {', '.join(stopped)}")


def print_layouts(result: dict, primary: str) -> None:
    from latitude.lab.demo import LAYOUT_HELP

    where = result["places"]
    table = Table(title=f"far users: ms under four layouts (primary: {primary})")
    longest = max(
        len(f"{v['nearest']} ({max(v['rtt_ms'].values()):.0f} ms)") for v in where.values()
    )
    table.add_column("user in", no_wrap=True, min_width=max(len(p) for p in where))
    table.add_column("nearest region (RTT)", no_wrap=True, min_width=longest)
    table.add_column("RTT to primary", justify="right", no_wrap=True)
    table.add_column("layout", no_wrap=True, min_width=max(len(k) for k in LAYOUT_HELP))
    for col in ("read p50 / p99", "write p50 / p99"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for place, v in where.items():
        for i, (layout, by_place) in enumerate(result["layouts"].items()):
            f = by_place[place]
            table.add_row(
                place if i == 0 else "",
                f"{v['nearest']} ({v['rtt_ms'][v['nearest']]:.0f} ms)" if i == 0 else "",
                f"{v['rtt_ms'][v['primary']]:.0f} ms" if i == 0 else "",
                layout,
                f"{f['read_p50_ms']:.0f} / {f['read_p99_ms']:.0f}",
                f"{f['write_p50_ms']:.0f} / {f['write_p99_ms']:.0f}",
                end_section=i == len(result["layouts"]) - 1,
            )
    out.print(table)
    out.print("columns:", highlight=False)
    for line in (
        "user in: where the scripted user sits; its links to every region have RTTs from distance",
        "nearest region (RTT): the region closest to the user, and the user's RTT to it",
        "RTT to primary: the user's RTT straight to the primary region",
        "read / write p50 / p99: median / slowest-1% time of one read (GET of an event) and one "
        "write (create an event: eight SQL statements), in ms, as the user's client measured it "
        "(all figures in the --json file)",
    ):
        out.print(f"  {line}", highlight=False)
    out.print("layouts:", highlight=False)
    for layout, text in LAYOUT_HELP.items():
        out.print(f"  {layout}: {text}", highlight=False)


def print_figures(figures: dict, primary: str) -> None:
    table = Table(title=f"a user next to each region (primary: {primary})")
    for col in (
        "region",
        "read p50 ms",
        "write p50 ms",
        "ideal write ms",
        "write / ideal",
        "RTT to primary ms",
    ):
        width = max(map(len, figures)) if col == "region" else None
        table.add_column(col, no_wrap=col == "region", min_width=width)
    for name, f in figures.items():
        table.add_row(
            name,
            f"{f['read_p50_ms']:.1f}",
            f"{f['write_p50_ms']:.1f}",
            f"{f['ideal_write_ms']:.1f}",
            f"{f['write_vs_ideal']:.2f}" if f["write_vs_ideal"] else "-",
            f"{f['inter_region_rtt_ms']:.0f}",
        )
    out.print(table)
    out.print(
        "ideal = client RTT (0: the user sits next to its region) + RTT to the primary + the primary's own write time"
    )


def mirror_demo(
    state_dir: StateDirOption = None,
    path: Annotated[
        str, typer.Option("--path", help="Where to publish the demo file.")
    ] = "demo/hello.json",
) -> None:
    """In a running lab: start a mirror in every region, publish a file, show when each had it."""
    from latitude.lab.mirrors import demo
    from latitude.mirror.store import BadPath

    try:
        lines = demo(LabWorld(state_dir), path)
    except BadPath as exc:
        fail(str(exc), 2)
    for line in lines:
        out.print(line, highlight=False)


__all__ = ["demo", "lab_app", "mirror_demo"]

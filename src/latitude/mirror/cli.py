"""`latitude mirror ...`: publish, sync, serve, nginx-config, demo. Thin: parses and calls."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from latitude import atomic
from latitude.mirror.config import MirrorConfig, MirrorConfigError, mirror_keyring
from latitude.topology import load_topology

mirror_app = typer.Typer(
    no_args_is_help=True,
    help="The metadata mirror network: publish at the primary, sync and serve in every region.",
)
out = Console()
err = Console(stderr=True)

TopologyOpt = Annotated[
    Path | None,
    typer.Option(
        "--topology",
        "-t",
        envvar="LATITUDE_TOPOLOGY",
        help="Topology file (default ./latitude.toml).",
    ),
]
RegionOpt = Annotated[
    str | None,
    typer.Option("--region", "-r", envvar="LATITUDE_REGION", help="The region this node is in."),
]
RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="Content root (default: [mirror] root of the topology)."),
]


def _fail(message: str, code: int = 2) -> None:
    """One line and exit: 2 for bad input (the default), 1 when the world is in the way."""
    # escape: messages quote TOML ("[mirror]") and paths, which rich would take for markup.
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    # SystemExit, not typer.Exit: `latitude.cli.main` runs click with standalone_mode=False,
    # which turns typer.Exit into a return value that it then drops (exit status 0).
    raise SystemExit(code)


def _check(option: str, value: float | None, minimum: float, strict: bool = True) -> None:
    if value is not None and (value <= minimum if strict else value < minimum):
        _fail(f"{option} {value:g}: must be {'above' if strict else 'at least'} {minimum:g}")


def _check_url(option: str, value: str | None) -> None:
    if value is not None and not re.match(r"https?://[^\s/]+", value):
        _fail(f"{option} {value!r}: must be an http:// or https:// URL")


# nginx reads these words raw: a ';', brace, quote or space would end or add a directive.
_NGINX_UNSAFE = re.compile(r"[\s;{}'\"#\\$]")


def _nginx_word(option: str, value: str | None) -> None:
    if value is not None and (not value or _NGINX_UNSAFE.search(value)):
        _fail(f"{option} {value!r}: not a single nginx word (no spaces, ;, braces, quotes, # or $)")


def _config(
    topology: Path | None,
    region: str | None,
    root: Path | None,
    *,
    signed: bool = False,
    syncs: bool = False,
    **overrides,
) -> MirrorConfig:
    """The node's settings as the region's newest epoch has them; `signed`: with the keyring
    (its secret must be set: fail closed)."""
    return _role(topology, region, root, signed=signed, **overrides).config()


def _role(
    topology: Path | None,
    region: str | None,
    root: Path | None,
    *,
    signed: bool = False,
    **overrides,
):
    """The node's `MirrorRole`: its config as the region's newest epoch has it (the primary
    moves with promotions; `latitude.mirror.role`). `signed`: the feed is signed and verified,
    and epochs followed, with the topology's keyring, which must then have its secret."""
    from latitude.mirror.role import MirrorRole

    topo = load_topology(topology or Path("latitude.toml"))
    default_primary = overrides.pop("default_primary", False)
    changes = {k: v for k, v in overrides.items() if v is not None}
    keyring = None

    def make_config(seen: object) -> MirrorConfig:
        try:
            cfg = MirrorConfig.from_topology(seen, node, root, signed=False)
        except (MirrorConfigError, KeyError) as exc:
            _fail(str(exc).strip('"'))
        if keyring is not None:
            changes["keyring"] = keyring
        return replace(cfg, **changes) if changes else cfg

    node = region or ""
    if not node and default_primary:  # the newest epoch's primary (the publisher moves with it)
        node = MirrorRole(topo, node, make_config, keyring).primary
    if not node:
        _fail("which region is this node in? pass --region NAME (or set LATITUDE_REGION)")
    make_config(topo)  # a bad region or setting fails here, before the keyring is asked for
    if signed:
        try:
            keyring = mirror_keyring(topo)
        except MirrorConfigError as exc:
            _fail(str(exc).strip('"'))
    role = MirrorRole(topo, node, make_config, keyring)
    role.config()  # bad settings fail here, before anything starts
    return role


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _run_until_signal(main) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


@mirror_app.command("publish")
def publish(
    items: Annotated[
        list[str] | None,
        typer.Argument(help="PATH=FILE: publish FILE (or '-' for stdin) at PATH in the tree."),
    ] = None,
    delete: Annotated[
        list[str] | None, typer.Option("--delete", help="Delete PATH (repeatable).")
    ] = None,
    scan: Annotated[
        bool, typer.Option("--scan", help="Record whatever differs between the tree and the log.")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="Forget changes older than the retention window.")
    ] = False,
    gzip_: Annotated[
        bool, typer.Option("--gzip", help="Also publish FILE.gz for text files.")
    ] = False,
    topology: TopologyOpt = None,
    root: RootOpt = None,
) -> None:
    """Publish or delete files at the primary; each change gets the next serial."""
    from latitude.mirror.publisher import Item, Publisher

    if root is None:
        cfg = _config(topology, None, None, default_primary=True)
        root, retention = cfg.root, cfg.retention_s
    else:
        retention = 86400.0
        with_topo = topology or (Path("latitude.toml") if Path("latitude.toml").exists() else None)
        if with_topo:
            retention = float(load_topology(with_topo).mirror.get("retention_s", retention))
    batch = []
    for spec in items or []:
        dest, sep, src = spec.partition("=")
        if not sep:
            _fail(f"{spec!r}: write PATH=FILE, e.g. simple/demo/index.html=./index.html")
        if src != "-" and not Path(src).is_file():
            _fail(f"{src}: no such file")
        batch.append(Item(dest, sys.stdin.buffer.read() if src == "-" else Path(src)))
    if not (batch or delete or scan or prune):
        _fail("nothing to do: give PATH=FILE items, --delete PATH, --scan or --prune")
    from latitude.mirror.role import NotPrimary
    from latitude.mirror.store import BadPath, UnsafePath

    try:
        pub = Publisher(root, retention_s=retention, precompress=gzip_)
    except NotPrimary as exc:  # promoted away: publishing here would reach no mirror
        _fail(str(exc), 1)
    with pub:
        try:
            changes = pub.publish_many(batch) if batch else []
            changes += pub.delete_many(delete) if delete else []
            changes += pub.publish_tree() if scan else []
        except BadPath as exc:  # a symlink, '..', a reserved name: nothing was recorded
            _fail(str(exc), 1 if isinstance(exc, UnsafePath) else 2)
        for c in changes:
            detail = f"sha256 {c.sha256[:16]}… {c.size} bytes" if c.op == "put" else ""
            out.print(f"serial {c.serial}  {c.op:6} {c.path}  {detail}", highlight=False)
        if prune:
            out.print(f"pruned: a cursor below serial {pub.prune()} now gets resync")
        out.print(f"head serial {pub.serial}", highlight=False)


@mirror_app.command("sync")
def sync(
    region: RegionOpt = None,
    topology: TopologyOpt = None,
    root: RootOpt = None,
    poll_interval: Annotated[
        float | None,
        typer.Option("--poll-interval", help="Poll every N s instead of long-polling."),
    ] = None,
    files_url: Annotated[
        str | None,
        typer.Option("--files-url", help="Fetch files from here (default: the primary's mirror)."),
    ] = None,
    pool_size: Annotated[int, typer.Option("--pool-size", help="Concurrent downloads.")] = 32,
    bundles: Annotated[
        bool, typer.Option("--bundles/--no-bundles", help="Fetch small files many to a request.")
    ] = True,
    inline: Annotated[
        int,
        typer.Option("--inline", help="Ask the feed to carry files up to this size (0: never)."),
    ] = 64 * 1024,
    poll_timeout: Annotated[
        float | None, typer.Option("--poll-timeout", help="Long-poll hold, seconds.")
    ] = None,
    stream: Annotated[
        bool,
        typer.Option("--stream/--no-stream", help="Follow the streaming feed (else long-poll)."),
    ] = True,
) -> None:
    """Keep this region's copy in step with the primary (runs until stopped)."""
    from latitude.mirror.sync import SyncDaemon

    _check("--poll-interval", poll_interval, 0)
    _check("--poll-timeout", poll_timeout, 0)
    _check("--pool-size", pool_size, 0)
    _check("--inline", inline, 0, strict=False)
    _check_url("--files-url", files_url)
    from latitude.mirror.role import sync_following

    role = _role(topology, region, root, signed=True, poll_timeout_s=poll_timeout)
    role.config()  # bad settings fail here, before anything starts
    _logging()

    def make_daemon(cfg: MirrorConfig) -> SyncDaemon:
        logging.info("sync %s from %s into %s", cfg.region, cfg.primary_url, cfg.root)
        return SyncDaemon(
            cfg.root,
            cfg.primary_url,
            cfg.keyring,
            files_url=files_url,
            indexes=cfg.indexes,
            poll_timeout_s=cfg.poll_timeout_s,
            poll_interval_s=poll_interval,
            pool_size=pool_size,
            bundles=bundles,
            inline=inline,
            region=cfg.region,
            stream=stream,
        )

    async def main(stop: asyncio.Event) -> None:
        try:
            await sync_following(role, make_daemon, stop)
        except RuntimeError as exc:  # another daemon holds this root's sync lock
            _fail(str(exc), 1)

    _run_until_signal(main)


@mirror_app.command("serve")
def serve(
    region: RegionOpt = None,
    topology: TopologyOpt = None,
    root: RootOpt = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Listen address (default: from mirror_url).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Listen port (default: from mirror_url).")
    ] = None,
    paths: Annotated[
        list[str] | None,
        typer.Option("--path", help="A mirrored URL prefix (repeatable; default [mirror] paths)."),
    ] = None,
    max_lag: Annotated[
        float | None, typer.Option("--max-lag", help="Health is 503 beyond this lag, s.")
    ] = None,
    poll_timeout: Annotated[
        float | None, typer.Option("--poll-timeout", help="Long-poll hold, seconds.")
    ] = None,
) -> None:
    """Serve this region's copy (and, at the primary, the change feed)."""
    from latitude.mirror.server import MirrorServer

    _check("--max-lag", max_lag, 0, strict=False)
    _check("--poll-timeout", poll_timeout, 0)
    if port is not None and not 0 <= port <= 65535:
        _fail(f"--port {port}: a TCP port is 0 to 65535")
    for p in paths or ():
        if not p.startswith("/"):
            _fail(f"--path {p!r}: a URL prefix starts with '/', e.g. /simple/")
    from latitude.mirror.role import serve_following

    role = _role(
        topology,
        region,
        root,
        signed=True,
        paths=tuple(paths) if paths else None,
        max_lag_s=max_lag,
        poll_timeout_s=poll_timeout,
    )
    cfg = role.config()
    _logging()
    host, port = host or cfg.listen_host, port if port is not None else cfg.listen_port
    logging.info(
        "serve %s (%s) from %s on %s:%d",
        cfg.region,
        "primary" if cfg.is_primary else "mirror",
        cfg.root,
        host,
        port,
    )
    try:
        _run_until_signal(
            lambda stop: serve_following(role, MirrorServer.from_config, host, port, stop)
        )
    except OSError as exc:  # the address is taken, not this machine's, not allowed
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)


@mirror_app.command("nginx-config")
def nginx_config_cmd(
    region: RegionOpt = None,
    topology: TopologyOpt = None,
    root: RootOpt = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            help="nginx listen value (default 8080, beside `mirror serve` on mirror_url).",
        ),
    ] = None,
    node_url: Annotated[
        str | None,
        typer.Option(
            "--node-url",
            help="URL of `latitude mirror serve` on this node, for health and the serial "
            "(default: the region's mirror_url; 'none' to leave them out).",
        ),
    ] = None,
    standalone: Annotated[
        Path | None,
        typer.Option("--standalone", help="Write a whole nginx.conf keeping pid/logs/temp in DIR."),
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="With --standalone: the worker processes' user.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Print an nginx config that serves like `latitude mirror serve` (try_files, then the primary)."""
    from latitude.mirror.nginx import default_listen, nginx_config

    _nginx_word("--user", user)
    if listen is not None and (not listen.strip() or re.search(r"[;{}'\"#$\n\r]", listen)):
        _fail(f"--listen {listen!r}: give nginx's listen value, e.g. 8080 or 127.0.0.1:8080")
    cfg = _config(topology, region, root)
    _nginx_word("the content root", str(cfg.root))
    if standalone is not None:
        _nginx_word("--standalone", str(standalone.absolute()))
    listen = listen or default_listen(cfg.listen_port)
    if listen.rpartition(":")[2] == str(cfg.listen_port) and cfg.listen_host in (
        listen.rpartition(":")[0] or cfg.listen_host,
        "0.0.0.0",
    ):
        _fail(
            f"--listen {listen} is the port `latitude mirror serve` of {cfg.region} listens on "
            f"({cfg.listen_host}:{cfg.listen_port}, from mirror_url); give nginx another port"
        )
    node = f"http://{cfg.listen_host}:{cfg.listen_port}" if node_url is None else node_url
    text = nginx_config(
        region=cfg.region,
        root=cfg.root,
        listen=listen,
        primary_url=None if cfg.is_primary else cfg.primary_url,
        website_url=cfg.website_url,
        paths=cfg.paths,
        node_url=None if node.lower() == "none" else node,
        standalone=standalone.absolute() if standalone else None,
        user=user,
    )
    if output:
        try:
            atomic.write_text(output, text)  # nginx -s reload never reads half a file
        except OSError as exc:
            _fail(f"cannot write {output}: {exc.strerror or exc}", 1)
        err.print(f"wrote {escape(str(output))}")
    else:
        print(text, end="")

"""Run an app behind the gateway on a production ASGI server (uvicorn).

`latitude serve --region R module:app` wraps a Python ASGI app; `latitude gateway --region R
--upstream URL` fronts an HTTP app in any language. Worker processes each build the same stack
from the environment (`app_factory`), so each opens and warms its own pool at start-up.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import resource
import shutil
import socket
import tempfile
from urllib.parse import urlsplit

import uvicorn

from latitude.gateway.config import GatewayConfig
from latitude.gateway.connections import BoundedHttpToolsProtocol
from latitude.gateway.heap import FreezeHeapAfterStartup
from latitude.gateway.middleware import RegionGateway
from latitude.gateway.observe import Observe
from latitude.gateway.upstream import HttpUpstream

log = logging.getLogger("latitude.gateway")

ENV_APP = "LATITUDE_APP"
ENV_UPSTREAM = "LATITUDE_UPSTREAM"


class AppImportError(Exception):
    pass


def import_app(path: str):
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise AppImportError(f"{path!r} is not an import path; write it as package.module:app")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppImportError(f"cannot import {module_name!r}: {exc}") from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise AppImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    return app


def app_factory():
    """Called by uvicorn in each worker: the app named by the environment, behind the gateway."""
    overrides = {}
    if os.environ.get("LATITUDE_POOLING") in ("0", "false", "off"):
        overrides["pooling"] = False
    config = GatewayConfig.from_environment(**overrides)
    if os.environ.get(ENV_UPSTREAM):
        inner = HttpUpstream(os.environ[ENV_UPSTREAM])
    else:
        inner = import_app(os.environ[ENV_APP])
    return FreezeHeapAfterStartup(Observe(RegionGateway(inner, config), config))


def default_port(config: GatewayConfig) -> int:
    url = config.region.public_url or config.region.internal_url
    if url:
        parts = urlsplit(url)
        return parts.port or (443 if parts.scheme == "https" else 80)
    return 8000


# The soft limit asked for when the hard one allows (or is unlimited): past any pool and burst
# the gateway sees, still bounded.
OPEN_FILES_WANTED = 1 << 20


def raise_open_files_limit(limits=resource) -> int:
    """Raise this process's soft limit on open files to the hard one, as nginx's
    `worker_rlimit_nofile` would: the common default soft limit (1024) is reached by a few
    hundred clients plus the pools, and past it every accept fails. Returns the soft limit in
    force after (unchanged where raising it is refused). `limits`: the `resource` module, or
    anything with its four names."""
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == limits.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft == limits.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        limits.setrlimit(limits.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.debug("open files: the soft limit stays %d (%s)", soft, exc)
        return soft
    return wanted


def run(
    *,
    region: str,
    topology: str,
    app: str | None = None,
    upstream: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    pooling: bool = True,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    log_level: str = "warning",
) -> None:
    raise_open_files_limit()  # before the workers fork: they inherit it
    os.environ["LATITUDE_REGION"] = region
    os.environ["LATITUDE_TOPOLOGY"] = os.path.abspath(topology)
    if not pooling:
        os.environ["LATITUDE_POOLING"] = "0"
    if upstream:
        os.environ[ENV_UPSTREAM] = upstream
    else:
        os.environ[ENV_APP] = app
        import_app(app)  # fail here, clearly, rather than in every worker
    config = GatewayConfig.from_environment()
    server_config = _TcpConfig(
        "latitude.gateway.serve:app_factory",
        factory=True,
        host=host,
        port=port or default_port(config),
        workers=workers,
        lifespan="on",
        log_level=log_level,
        timeout_keep_alive=300,  # forwarded requests ride long-lived pooled connections
        # httptools + uvloop: less CPU per request than h11 + asyncio (benchmarks/README.md),
        # with the header bounds of `connections.py` on top.
        loop="uvloop",
        ssl_certfile=tls_cert or config.topology.gateway.get("tls_cert"),
        ssl_keyfile=tls_key or config.topology.gateway.get("tls_key"),
        access_log=False,
        # The gateway alone decides which client address to trust; uvicorn's own proxy-header
        # handling would believe any X-Forwarded-For sent from loopback.
        proxy_headers=False,
        http=BoundedHttpToolsProtocol,
        # Room for the gateway to see a header block up to its own limit and refuse it by name.
        h11_max_incomplete_event_size=config.max_headers_bytes + 8 * 1024,
    )
    server_config.header_timeout_s = config.header_timeout_s
    server_config.max_pending_headers = config.max_pending_headers
    server = uvicorn.Server(server_config)
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        with _metrics_folder():
            Multiprocess(server_config, sockets=[server_config.bind_socket()]).run()
    else:
        server.run()


@contextlib.contextmanager
def _metrics_folder():
    """Workers count into files in one fresh folder, so a scrape sees all of them (and none of
    an earlier run's); the user's own PROMETHEUS_MULTIPROC_DIR is kept if set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    folder = tempfile.mkdtemp(prefix="latitude-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _TcpConfig(uvicorn.Config):
    """uvicorn's shared worker socket is made without IPPROTO_TCP, so asyncio never sets
    TCP_NODELAY on its connections and every keep-alive response waits ~40 ms for a delayed
    ACK (Nagle). Making the socket with the protocol named restores TCP_NODELAY."""

    def bind_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise SystemExit(
                f"error: cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        sock.set_inheritable(True)
        return sock

"""Real nginx as a benchmark's peer: found (or installed from Debian's packages), started with its
own prefix and configuration in a temporary folder, and stopped cleanly (graceful SIGQUIT to the
master, SIGKILL to its process group only if that fails), also when the benchmark fails.

The proxy is the seed's "local keep-alive proxy": `proxy_pass` to one upstream, HTTP/1.1 with the
`Connection` header cleared so upstream connections are kept, `keepalive N` idle connections per
worker process (nginx keeps that pool per worker: a request that lands on a worker whose pool is
empty opens a new connection across the link).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _lab import HOST, free_port, say, wait_http

from latitude.lab import harness
from latitude.lab.harness import stop_nginx

CONF = """\
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream primary {{
        server {upstream};
        keepalive {keepalive};
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://primary;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
"""


def find_nginx(install: bool) -> tuple[str | None, str]:
    """nginx's path, or None and why not; with `install`, apt-get installs nginx-light."""
    found = harness.find_nginx()
    if found:
        return found, ""
    if not install:
        return None, "nginx is not installed; pass --install-nginx to apt-get install nginx-light"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "nginx is not installed and apt-get cannot run here (needs root and apt)"
    say("installing nginx-light from Debian's packages (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "nginx-light"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"`{' '.join(argv)}` failed: {done.stderr.strip()[-300:]}"
    # A package may start a system nginx of its own; this benchmark starts its own only.
    with contextlib.suppress(OSError, ValueError, ProcessLookupError):
        os.kill(int(Path("/run/nginx.pid").read_text()), signal.SIGQUIT)
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return (found, "") if os.access(found, os.X_OK) else (None, "nginx-light installed no nginx")


def nginx_or_exit(install: bool) -> str:
    """nginx's path, for a benchmark that has no figure without it: else its error, exit 2."""
    nginx, why = find_nginx(install)
    if nginx is None:
        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(2)
    return nginx


def nginx_version(nginx: str) -> str:
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True)
    return done.stderr.strip().split("/")[-1]


@dataclass
class Nginx:
    port: int
    pid: int  # the master process; its workers are its children
    workers: int
    keepalive: int
    upstream: str


@contextlib.contextmanager
def running_nginx(
    nginx: str, upstream: str, *, workers: int = 1, keepalive: int = 8, health: str = "/"
) -> Iterator[Nginx]:
    """nginx listening on a free port of 127.0.0.1 and proxying to `upstream` (host:port), until
    the block ends. Waits until `health` answers through it."""
    prefix = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    try:
        # Workers run as nobody when we are root: they must be able to reach the prefix.
        os.chmod(prefix, 0o755)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir()
        port = free_port()
        conf = prefix / "nginx.conf"
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(
            CONF.format(
                prefix=prefix,
                workers=workers,
                user="user nobody nogroup;" if os.geteuid() == 0 else "",
                upstream=upstream,
                keepalive=keepalive,
                listen=f"{HOST}:{port}",
            )
        )
        tmp.rename(conf)
        with open(prefix / "stderr.log", "wb") as stderr:
            proc = subprocess.Popen(
                [nginx, "-p", str(prefix), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            wait_http(f"http://{HOST}:{port}{health}", 15, "nginx", prefix / "error.log")
            yield Nginx(port, proc.pid, workers, keepalive, upstream)
        finally:
            stop_nginx(proc)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)

"""What the tests and the benchmarks share: free ports, waiting, a throwaway world, the calendar
in a region, a small health endpoint, echo servers, a writing user, and real nginx.

Everything listens and connects on 127.0.0.1 only, and whatever is started here is stopped by
the context manager or object that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.cookiejar import CookieJar
from pathlib import Path
from typing import TypeVar

from latitude.lab.ports import free_port, free_ports
from latitude.lab.world import LabWorld

__all__ = [
    "HEALTH_SERVER",
    "EchoServer",
    "TcpServer",
    "TimedOut",
    "Writer",
    "find_nginx",
    "free_port",
    "free_ports",
    "health_server_argv",
    "http_ok",
    "nginx_running",
    "start_calendar",
    "start_failover_watchers",
    "stop_process",
    "stop_nginx",
    "throwaway_world",
    "wait_http",
    "wait_until",
]

T = TypeVar("T")
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------- waiting


class TimedOut(AssertionError):
    """What was waited for did not happen in time (a test failure, not an error)."""


def wait_until(
    cond: Callable[[], T], timeout: float = 15.0, what: str = "the condition", step: float = 0.02
) -> T:
    """`cond()`'s first truthy value, polled every `step` s; `TimedOut` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(step)
    raise TimedOut(f"timed out after {timeout:g} s waiting for {what}")


def http_ok(url: str, timeout: float = 0.5, ok=(200,), context=None) -> bool:
    """Whether `url` answers with one of the `ok` statuses now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return r.status in ok
    except urllib.error.HTTPError as exc:
        return exc.code in ok
    except OSError:
        return False


def wait_http(
    url: str,
    timeout: float = 20,
    what: str | None = None,
    log: Path | None = None,
    ok=(200,),
    ca_file: Path | None = None,
) -> None:
    """Until `url` answers with an `ok` status; else `TimedOut`, with the end of `log`."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    try:
        wait_until(lambda: http_ok(url, 2, ok, context), timeout, what or url, step=0.1)
    except TimedOut:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        raise TimedOut(
            f"{what or 'nothing'} did not answer {url} within {timeout:g} s\n{tail}"
        ) from None


# ---------------------------------------------------------------------------------------- world


@contextlib.contextmanager
def throwaway_world(
    prefix: str, topology_text: str, progress: Callable[[str], None] | None = None
) -> Iterator[LabWorld]:
    """A lab world in a temporary folder: up on entry, down (with every service) on exit.

    SIGTERM is turned into KeyboardInterrupt for the duration (in the main thread), so `kill`
    tears the world down too; a second Ctrl-C cannot leave it half-stopped.
    """
    say = progress or (lambda _m: None)
    main = threading.current_thread() is threading.main_thread()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            (Path(tmp) / "topology.toml").write_text(topology_text)
            world = LabWorld(Path(tmp) / "lab", Path(tmp) / "topology.toml", progress=say)
            world.up()  # cleans up after itself if it fails half-way
            try:
                yield world
            finally:
                say("taking the world down")
                with _signals_ignored(main):
                    world.down()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_ignored(main: bool) -> Iterator[None]:
    if not main:
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def start_calendar(
    world: LabWorld,
    region: str,
    workers: int = 1,
    *,
    pooling: bool = True,
    wait: float | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """(Re)start the calendar behind the gateway in one region (with `env` added to the
    region's environment); with `wait`, until healthy."""
    from latitude.lab.demo import calendar_argv, wait_healthy

    extra = [] if pooling else ["--no-pool"]
    world.set_app(region, calendar_argv(world, region, workers, extra), env)
    if wait is not None:
        wait_healthy(world, region, wait)


def start_failover_watchers(world: LabWorld, regions) -> None:
    """`latitude failover watch` in each region (lab slot `watcher`), with its own topology."""
    import sys

    state = world.state()
    for region in regions:
        topology = state.region(region).topology_file
        argv = [sys.executable, "-m", "latitude.cli", "failover", "watch", "--region", region]
        world.set_service(region, "watcher", [*argv, "--topology", str(topology)])


def stop_process(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10, group: bool = False
) -> None:
    """Ask with `sig`, then insist: SIGKILL (to its process group with `group`) after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait()


# ------------------------------------------------------------------------ small servers to run

# A region's health endpoint, run as `python -c HEALTH_SERVER PORT [MODE_FILE]`. A mode may be
# written into MODE_FILE, applied per vantage point (the checker names itself in
# X-Latitude-Vantage), counted from the change:
#   lose-one      the first probe from each vantage point gets no answer in time, then all do
#   one-in-three  only every third probe from each vantage point is answered 200, others 503
# GET /_stats says what was served since the mode last changed.
HEALTH_SERVER = """
import asyncio, collections, sys
from aiohttp import web

mode_file = sys.argv[2] if len(sys.argv) > 2 else None
state = {"mode": "", "seen": collections.Counter(), "lost": collections.Counter(),
         "ok": collections.Counter()}

def mode():
    try:
        with open(mode_file) as f:
            current = f.read().strip()
    except (OSError, TypeError):
        current = ""
    if current != state["mode"]:
        state.update(mode=current, seen=collections.Counter(), lost=collections.Counter(),
                     ok=collections.Counter())
    return current.split(":")[0]

async def health(request):
    m = mode()
    v = request.headers.get("X-Latitude-Vantage", "?")
    state["seen"][v] += 1
    n = state["seen"][v]
    if m == "lose-one" and n == 1:
        state["lost"][v] += 1
        await asyncio.sleep(3)
    elif m == "one-in-three" and n % 3:
        return web.Response(status=503, text="flaky")
    state["ok"][v] += 1
    return web.Response(text="ok")

async def stats(request):
    mode()
    return web.json_response({k: dict(state[k]) for k in ("seen", "lost", "ok")})

app = web.Application()
app.router.add_get("/_latitude/health", health)
app.router.add_get("/_stats", stats)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def health_server_argv(python: str, port: int, mode_file: Path | None = None) -> list[str]:
    return [python, "-c", HEALTH_SERVER, str(port), *([str(mode_file)] if mode_file else [])]


class TcpServer:
    """A thread-per-connection TCP server on 127.0.0.1 running `handle` for each client."""

    def __init__(self, handle: Callable[[socket.socket], None], name: str = "tcp") -> None:
        self._handle = handle
        self._name = name  # each client's thread's name (a test tells them from the relay's)
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(client,), name=self._name, daemon=True
            )
            with self._lock:
                self._clients.append(client)
                self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            with contextlib.suppress(OSError):
                self._handle(client)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join()
        with self._lock:
            for client in self._clients:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def echo(client: socket.socket) -> None:
    """Echo every byte back; on EOF, finish echoing and close."""
    while data := client.recv(256 * 1024):
        client.sendall(data)


class EchoServer(TcpServer):
    def __init__(self) -> None:
        super().__init__(echo, name="echo")


# -------------------------------------------------------------------------------- a writing user


class Writer(threading.Thread):
    """A user next to one region, creating calendar events as fast as answers come back.

    `acked` holds (time, title, region that ran it) per acknowledged write, `refused` (time,
    status) per other answer (0: no answer), `failures` (time, status, the start of the body
    or the error) per failed POST.
    """

    def __init__(self, world: LabWorld, region: str, name: str = "writer"):
        super().__init__(daemon=True)
        self.port = world.state().regions[region].app_port
        self.region = region
        self.name_prefix = name
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        self.acked: list[tuple[float, str, str]] = []
        self.refused: list[tuple[float, int]] = []
        self.failures: list[tuple[float, int, str]] = []
        self.stop = threading.Event()

    def post(self, path: str, data: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"http://{HOST}:{self.port}{path}",
            data=json.dumps(data).encode(),
            headers={"content-type": "application/json", "accept": "application/json"},
            method="POST",
        )
        try:
            with self.opener.open(req, timeout=20) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            self.failures.append(
                (time.monotonic(), exc.code, exc.read()[:300].decode("utf-8", "replace"))
            )
            return exc.code, {}
        except OSError as exc:
            self.failures.append((time.monotonic(), 0, repr(exc)))
            return 0, {}

    def get(self, path: str, accept: str = "application/json") -> int:
        req = urllib.request.Request(f"http://{HOST}:{self.port}{path}", headers={"accept": accept})
        try:
            with self.opener.open(req, timeout=20) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def login(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.post("/login", {"name": f"{self.name_prefix}-{self.region}"})[0] == 200:
                return
            time.sleep(0.2)
        raise TimedOut(f"cannot sign in at {self.region}")

    def run(self) -> None:
        while not self.stop.is_set():
            title = f"{self.region}-{uuid.uuid4().hex[:12]}"
            status, body = self.post("/events", {"title": title})
            if status == 201:
                self.acked.append((time.monotonic(), title, body.get("region")))
            else:
                if status == 401:
                    self.login()
                self.refused.append((time.monotonic(), status))
                time.sleep(0.05)

    def longest_refusal(self) -> float:
        """The longest stretch from a refused write to the next acknowledged one."""
        longest, first_bad = 0.0, None
        events = sorted(
            [(t, True) for t, _, _ in self.acked] + [(t, False) for t, _ in self.refused]
        )
        for t, ok in events:
            if not ok and first_bad is None:
                first_bad = t
            elif ok and first_bad is not None:
                longest, first_bad = max(longest, t - first_bad), None
        if first_bad is not None:
            longest = max(longest, events[-1][0] - first_bad)
        return longest

    def gap_around(self, t0: float, t1: float) -> float:
        """The longest wait between two acknowledged writes in [t0 - 1 s, t1 + 5 s]."""
        times = [t for t, _, _ in self.acked if t0 - 1 <= t <= t1 + 5]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("nan"))


# ---------------------------------------------------------------------------------------- nginx


def find_nginx() -> str | None:
    """nginx's path ($NGINX, then PATH, then /usr/sbin and /usr/local/sbin), or None."""
    env = os.environ.get("NGINX")
    if env and os.access(env, os.X_OK):
        return env
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


@contextlib.contextmanager
def nginx_running(nginx: str, conf: Path, prefix: Path, **popen) -> Iterator[subprocess.Popen]:
    """nginx with `conf` and `prefix`, in a session of its own, until the block ends."""
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(prefix)],
        **{"stderr": subprocess.PIPE, **popen},
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_nginx(proc)


def stop_nginx(proc: subprocess.Popen) -> None:
    # SIGQUIT: the master lets its workers finish and exits; its process group only if not.
    stop_process(proc, signal.SIGQUIT, group=True)

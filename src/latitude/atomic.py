"""Temp file, fsync, rename: the one way anything is written (mirror, lab, routing, cli).

A reader of the target sees the old content or the new, never half a file: the new content goes
to a temp file in the target's own folder (a rename is atomic only within one file system) and
is renamed over the target once complete. With ``fsync`` (the default) the file is made durable
before the rename and the folder after it, so a crash cannot leave a renamed but empty file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_dir", "write_bytes", "write_json", "write_text"]


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename (or a new file) in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o666,
    fsync: bool = True,
    tmp_prefix: str = ".",
    before_replace: Callable[[Path], None] | None = None,
) -> None:
    """Replace `path` with `data` atomically.

    `mode` is given to the temp file when it is created (less the umask), so a secret written
    with 0o600 is never readable by others, not even for a moment. `tmp_prefix` names the temp
    file (a folder's readers may skip names with it). `before_replace` is called with the
    complete temp file just before the rename (to chown it, say).
    """
    path = Path(path)
    tmp = path.with_name(f"{tmp_prefix}{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", **options
) -> None:
    """`write_bytes` for text (`options` as there)."""
    write_bytes(path, text.encode(encoding), **options)


def write_json(
    path: str | os.PathLike[str],
    value: object,
    *,
    indent: int | None = None,
    ensure_ascii: bool = True,
    **options,
) -> None:
    """`write_bytes` for a JSON document (`options` as there)."""
    text = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)
    write_bytes(path, text.encode("utf-8"), **options)

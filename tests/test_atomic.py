"""The one atomic write: readers see the old file or the new one, never a part, never a temp."""

from __future__ import annotations

import json
import os
import stat

import pytest

from latitude import atomic


def test_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic.write_json(target, {"name": 'Zürich "quoted"'}, indent=2, ensure_ascii=False)
    assert json.loads(target.read_text(encoding="utf-8")) == {"name": 'Zürich "quoted"'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_secret_is_never_readable_by_others(tmp_path):
    target = tmp_path / "supervisor.json"
    seen: list[int] = []
    atomic.write_text(
        target, "token", mode=0o600, before_replace=lambda tmp: seen.append(tmp.stat().st_mode)
    )
    # Already private as a temp file, before it had its name.
    assert stat.S_IMODE(seen[0]) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "topology.toml"
    target.write_text("old")

    def refuse(tmp):
        assert tmp.read_text() == "new"  # complete before the rename
        raise PermissionError("chown refused")

    with pytest.raises(PermissionError):
        atomic.write_text(target, "new", before_replace=refuse)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["topology.toml"]


def test_the_temp_file_carries_the_prefix_readers_skip(tmp_path):
    names: list[str] = []
    atomic.write_bytes(
        tmp_path / "cursor",
        b"7\n",
        tmp_prefix=".latitude-tmp-",
        fsync=False,
        before_replace=lambda tmp: names.append(tmp.name),
    )
    assert names[0].startswith(".latitude-tmp-cursor.")
    assert (tmp_path / "cursor").read_bytes() == b"7\n"

"""`latitude routing export -o FILE`: the file is replaced whole or left as it was (temp file,
then rename), and a file that cannot be written is one clear line, exit 2."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from latitude.cli import app
from tests.test_routing import TOPOLOGY


def export(tmp_path, *args: str):
    topo = tmp_path / "latitude.toml"
    topo.write_text(TOPOLOGY)
    return CliRunner().invoke(app, ["routing", "export", *args, "-t", str(topo)])


def test_an_export_replaces_the_file_whole(tmp_path):
    out = tmp_path / "zone.txt"
    out.write_text("the old zone\n")
    result = export(tmp_path, "powerdns", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "ifurlup" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latitude.toml", "zone.txt"]


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "zone.txt"
    out.write_text("the old zone\n")

    def no_room(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_room)  # the rename that would publish the new file
    result = export(tmp_path, "powerdns", "-o", str(out))
    assert result.exit_code == 2, result.output
    assert out.read_text() == "the old zone\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latitude.toml", "zone.txt"]  # no temp
    assert "No space left on device" in result.output and "Traceback" not in result.output


def test_an_unknown_export_or_a_missing_folder_is_one_line_exit_2(tmp_path):
    out = tmp_path / "zone.txt"
    out.write_text("the old zone\n")
    result = export(tmp_path, "bind", "-o", str(out))
    assert result.exit_code == 2 and out.read_text() == "the old zone\n"
    result = export(tmp_path, "route53", "-o", str(tmp_path / "no-such-folder" / "r53.tf"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot write") and "Traceback" not in result.output

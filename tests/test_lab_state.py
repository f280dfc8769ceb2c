"""`state.json` as `LabState`: written atomically and privately, read back the same, and a
missing or damaged file is a clear error naming the file and what to do."""

from __future__ import annotations

import json
import stat

import pytest

from latitude.lab import LabError, LabNotRunning, LabWorld
from latitude.lab.state import LabEpoch, LabState, RegionState, ServiceSpec


def a_state(tmp_path) -> LabState:
    regions = {
        name: RegionState(
            role=role,
            pg_port=20000 + i,
            pg_data=str(tmp_path / name / "pg"),
            valkey_port=21000 + i,
            app_port=22000 + i,
            mirror_port=23000 + i,
            relays={
                other: {"pg": 24000 + i, "app": 25000 + i} for other in ("a", "b") if other != name
            },
            services={"app": ServiceSpec(["python", "-m", "app"], {"X": "ü"})} if i == 0 else {},
            topology_file=str(tmp_path / name / "latitude.toml"),
        )
        for i, (name, role) in enumerate((("a", "primary"), ("b", "replica")))
    }
    return LabState(
        started_at=1.5,
        source_topology="lab.toml",
        secret="s" * 48,
        data_root=str(tmp_path),
        pg_bin="/pg/bin",
        valkey_bin="/valkey",
        run_as="postgres",
        supervisor_pid_file=str(tmp_path / "supervisor.pid"),
        primary="a",
        regions=regions,
    )


def test_saved_state_reads_back_equal_and_private(tmp_path):
    state = a_state(tmp_path)
    path = tmp_path / "state.json"
    state.save(path)
    assert LabState.load(path) == state
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the world's signing secret
    state.epoch, state.up_seconds = LabEpoch(2, "b"), 3.25
    state.save(path)
    again = LabState.load(path)
    assert again == state and again.current_epoch() == LabEpoch(2, "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_the_file_keeps_the_layout_running_worlds_have(tmp_path):
    path = tmp_path / "state.json"
    a_state(tmp_path).save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["supervisor"] == {
        "pid_file": str(tmp_path / "supervisor.pid")
    }
    assert data["regions"]["a"]["services"]["app"] == {
        "argv": ["python", "-m", "app"],
        "env": {"X": "ü"},
    }
    assert "epoch" not in data and "up_seconds" not in data


def test_relay_ports_and_unknown_regions(tmp_path):
    state = a_state(tmp_path)
    assert state.relay_port("a", "a", "app") == 22000
    assert state.relay_port("a", "b", "pg") == 24001
    with pytest.raises(LabError, match=r"no region 'mars' in the lab \(regions: a, b\)"):
        state.region("mars")


def test_no_file_means_no_world(tmp_path):
    with pytest.raises(LabNotRunning, match="no lab world in .*latitude lab up"):
        LabWorld(tmp_path).state()


@pytest.mark.parametrize(
    "text, says",
    [
        ("{not json", "Expecting property name"),
        ('{"regions": {}}', "missing 'supervisor'"),
        ('{"version": 7}', "version 7"),
        ("[]", "damaged"),
    ],
)
def test_a_damaged_file_names_itself_and_the_way_out(tmp_path, text, says):
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(LabError) as e:
        LabWorld(tmp_path).state()
    message = str(e.value)
    assert str(tmp_path / "state.json") in message and says in message, message
    assert "latitude lab down" in message and not isinstance(e.value, LabNotRunning)


def test_down_clears_a_damaged_world(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    said: list[str] = []
    world = LabWorld(tmp_path, progress=said.append)
    assert world.down() == []  # nothing of it runs: no pid file names a live process
    assert not (tmp_path / "state.json").exists()
    assert any("damaged" in line for line in said), said
    with pytest.raises(LabNotRunning):
        world.state()

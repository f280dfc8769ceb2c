"""The failover watcher's own proposal: kept by this region, not by a majority at first (a
peer's answer came late), it is offered again until a majority holds it, never left pending
(every region that kept it would hold writes under it for good)."""

from __future__ import annotations

import shutil
from importlib import resources

import pytest

from latitude.promotion import automatic
from latitude.promotion.epoch import Epoch, sign_epoch
from latitude.topology import load_topology


class FakePg:
    promoted = 0

    def __init__(self, *args) -> None:
        pass

    def in_recovery(self) -> bool:
        return True

    def position(self) -> dict:
        return {"received": 100, "flush": 100}

    def promote(self) -> None:
        FakePg.promoted += 1

    def ensure_slots(self, others) -> None:
        pass

    def set_synchronous(self, quorum, others) -> None:
        pass


class FakeCluster:
    def __init__(self, topology) -> None:
        self.published: list[str] = []

    def publish(self, token: str) -> None:
        self.published.append(token)


@pytest.fixture
def watcher(tmp_path, monkeypatch):
    monkeypatch.setenv("LATITUDE_LAB_KEY", "unit-test-key-of-thirty-two-bytes-or-more")
    monkeypatch.delenv("LATITUDE_EPOCH_FILE", raising=False)
    path = tmp_path / "latitude.toml"
    shutil.copy(resources.files("latitude") / "data" / "lab.toml", path)
    monkeypatch.setattr(automatic, "PgServer", FakePg)
    monkeypatch.setattr(automatic, "RemoteCluster", FakeCluster)
    w = automatic.FailoverWatcher(load_topology(path), "eu-west")
    FakePg.promoted = 0
    return w


async def test_a_proposal_kept_here_only_is_offered_again_until_a_majority_holds_it(
    watcher, monkeypatch
):
    held_by_peers = [0, 1]  # the first round: no peer's answer in time; the second: one

    def propose(token: str) -> int:
        kept = watcher.epochs.offer(token) or watcher.epochs.read()[1] == token
        return int(bool(kept)) + held_by_peers.pop(0)

    monkeypatch.setattr(watcher, "_propose", propose)
    monkeypatch.setattr(automatic.random, "uniform", lambda a, b: 0.0)
    first = await watcher._promote(Epoch(1, "us-west", "active", 0.0), 2)
    assert "backing off" in first and FakePg.promoted == 0
    assert watcher.epoch().primary == "eu-west" and not watcher.epoch().active

    said = await watcher.step(None)  # the next round: the pending proposal is this region's
    assert said.startswith("promoted") and FakePg.promoted == 1
    assert watcher.promoted.number == 2 and watcher.promoted.active
    assert len(watcher.cluster.published) == 1


async def test_another_regions_pending_epoch_is_not_completed_here(watcher, monkeypatch):
    token = sign_epoch(watcher.keyring, Epoch(2, "ap-southeast", "pending", 0.0))
    watcher.epochs.offer(token)
    monkeypatch.setattr(watcher, "_propose", lambda token: pytest.fail("proposed"))
    assert await watcher.step(None) == "epoch pending" and FakePg.promoted == 0

"""The primary epoch without a lab: signing, ordering, the region's file, the topology keys."""

from __future__ import annotations

import pytest

from latitude.promotion.epoch import (
    ACTIVE,
    PENDING,
    Epoch,
    EpochError,
    EpochFile,
    sign_epoch,
    verify_epoch,
)
from latitude.promotion.follow import topology_for_epoch
from latitude.promotion.postgres import format_lsn, parse_lsn
from latitude.signing import Keyring, SigningKey
from latitude.topology import TopologyError, parse_topology

KEYRING = Keyring([SigningKey("k1", b"x" * 32), SigningKey("k2", b"y" * 32)], "k1")

TOPOLOGY = """
[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.2]
database_url = "postgresql://app@us.internal/app"
[[regions]]
name = "eu-west"
location = [53.3, -6.3]
database_url = "postgresql://app@eu.internal/app"
[lab]
"""


def test_sign_and_verify_round_trip():
    epoch = Epoch(7, "eu-west", ACTIVE, 1700000000.0)
    assert verify_epoch(KEYRING, sign_epoch(KEYRING, epoch)) == epoch
    # Rotation: a token signed with another key of the ring is accepted.
    other = Keyring(KEYRING._keys.values(), "k2")
    assert verify_epoch(KEYRING, sign_epoch(other, epoch)) == epoch


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace(t.split(".")[0], t.split(".")[0][:-2] + "AA"),  # payload changed
        lambda t: t.rsplit(".", 1)[0] + ".AAAA",  # signature changed
        lambda t: t.replace(".k1.", ".k9."),  # unknown key
        lambda t: "not-a-token",
        lambda t: "",
    ],
)
def test_untrusted_tokens_are_refused(mangle):
    token = sign_epoch(KEYRING, Epoch(2, "eu-west"))
    with pytest.raises(EpochError):
        verify_epoch(KEYRING, mangle(token))


def test_a_token_from_another_keyring_is_refused():
    stranger = Keyring([SigningKey("k1", b"z" * 32)], "k1")
    with pytest.raises(EpochError, match="does not match"):
        verify_epoch(KEYRING, sign_epoch(stranger, Epoch(9, "eu-west")))


def test_order_pending_then_active_then_next():
    pending, active, nxt = Epoch(2, "eu-west", PENDING), Epoch(2, "eu-west"), Epoch(3, "us-west")
    assert active.newer_than(pending) and nxt.newer_than(active) and nxt.newer_than(pending)
    assert not pending.newer_than(active) and not active.newer_than(active)
    assert pending.newer_than(None)


def test_epoch_file_keeps_only_newer(tmp_path):
    f = EpochFile(tmp_path / "epoch.json", KEYRING)
    assert f.read() is None
    assert f.offer(sign_epoch(KEYRING, Epoch(3, "eu-west"))) is not None
    assert f.offer(sign_epoch(KEYRING, Epoch(2, "us-west"))) is None  # older: ignored
    assert f.offer(sign_epoch(KEYRING, Epoch(3, "ap-southeast"))) is None  # same number: first wins
    assert f.read()[0] == Epoch(3, "eu-west", ACTIVE, 0.0)
    assert f.offer(sign_epoch(KEYRING, Epoch(4, "us-west", PENDING))) is not None
    assert f.read()[0].primary == "us-west" and not f.read()[0].active
    # A damaged file reads as no epoch, never as a wrong one.
    (tmp_path / "epoch.json").write_text('{"token": "forged"}')
    assert f.read() is None
    assert not list(tmp_path.glob("*.tmp"))


def test_topology_for_epoch_moves_the_primary_and_the_write_path():
    t = topology_for_epoch(parse_topology(TOPOLOGY), "eu-west")
    assert t.primary.name == "eu-west"
    us = t.region("us-west")
    assert not us.primary and us.primary_database_url == "postgresql://app@eu.internal/app"
    assert t.region("eu-west").primary_database_url is None


def test_replication_and_failover_keys_are_validated():
    t = parse_topology(TOPOLOGY + "[replication]\nsynchronous = 1\n[failover]\nautomatic = true\n")
    assert t.replication["synchronous"] == 1 and t.failover["automatic"] is True
    with pytest.raises(TopologyError) as info:
        parse_topology(TOPOLOGY + "[replication]\nsynchronous = 2\n")
    assert "only 1 replica regions" in str(info.value)
    with pytest.raises(TopologyError) as info:
        parse_topology(TOPOLOGY + '[failover]\nautomatic = "yes"\nafter = 3\n')
    text = str(info.value)
    assert "failover.automatic: must be true or false" in text and "after_s" in text


def test_lsn_text_round_trip():
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/3000108")) == "0/3000108"
    assert parse_lsn(None) is None


def test_journal_resumes_the_same_promotion_and_refuses_another(tmp_path):
    from latitude.promotion.journal import BadPromotion, Journal

    j = Journal(tmp_path)
    with pytest.raises(RuntimeError), j.running("eu-west", "switchover") as run:
        run.mark("checked")
        run.mark("pending", told={"us-west": "told"})
        raise RuntimeError("the command died here")
    # A step that changed something was done: the journal stays, to resume from.
    assert Journal(tmp_path).read()["done"] == ["checked", "pending"]
    with pytest.raises(BadPromotion, match="interrupted after step pending"):
        with Journal(tmp_path).running("ap-southeast", "switchover"):
            pass
    with Journal(tmp_path).running("eu-west", "switchover") as again:
        assert again.done("pending") and not again.done("fenced")
    assert Journal(tmp_path).read() is None  # finished: forgotten
    # Refused before anything changed: nothing to resume, nothing blocks the next one.
    with pytest.raises(BadPromotion), Journal(tmp_path).running("eu-west", "switchover") as run:
        run.mark("checked")
        raise BadPromotion("too far behind")
    assert Journal(tmp_path).read() is None

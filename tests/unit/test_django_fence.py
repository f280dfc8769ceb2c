"""The fence for Django (`latitude.db.django_router._django_fence`), against a small fake of a
Django connection and its psycopg connection: which statements get the claim's mark before
them, in which transaction, and what a lost claim does. The lab test in
tests/test_django_gateway.py checks the mark commits with a real Django write."""

from __future__ import annotations

import datetime

import pytest
from psycopg.pq import TransactionStatus

from latitude.db.django_router import _django_fence
from latitude.db.route import ClaimLost, claimed, route_to_primary, route_to_replica

STARTED = datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC)


class FakeInfo:
    transaction_status = TransactionStatus.IDLE


class FakeRaw:
    """The psycopg connection: records statements; the mark answers `marked` rows."""

    def __init__(self, autocommit: bool, marked: int = 1) -> None:
        self.autocommit = autocommit
        self.marked = marked
        self.info = FakeInfo()
        self.sent: list[str] = []

    def execute(self, sql, params=None):
        self.sent.append("mark" if "latitude_idempotency" in sql else sql)
        if sql == "begin" or (not self.autocommit and "latitude_idempotency" in sql):
            self.info.transaction_status = TransactionStatus.INTRANS
        if sql in ("commit", "rollback"):
            self.info.transaction_status = TransactionStatus.IDLE
        return self

    def fetchone(self):
        return (self.marked,)

    def cursor(self):  # the DBAPI way the shared mark (`route.mark_claim`) runs its statement
        raw = self

        class Cursor:
            def execute(self, sql, params=None):
                raw.execute(sql, params)

            def fetchone(self):
                return raw.fetchone()

            def close(self):
                pass

        return Cursor()


class FakeDjangoConnection:
    def __init__(self, raw: FakeRaw, alias: str = "default") -> None:
        self.alias = alias
        self.connection = raw


def run(raw: FakeRaw, sql: str, alias: str = "default", fails: bool = False) -> list[str]:
    def execute(sql, params, many, context):
        raw.sent.append(sql)
        if not raw.autocommit:
            raw.info.transaction_status = TransactionStatus.INTRANS
        if fails:
            raise RuntimeError("the statement failed")
        return "result"

    context = {"connection": FakeDjangoConnection(raw, alias)}
    assert _django_fence(execute, sql, None, False, context) == "result"
    return raw.sent


def test_in_a_transaction_the_first_statement_is_preceded_by_the_mark_and_no_other():
    raw = FakeRaw(autocommit=False)
    with route_to_primary(), claimed("k", STARTED):
        run(raw, "INSERT INTO events_event ...")
        run(raw, "UPDATE events_event ...")
    assert raw.sent == ["mark", "INSERT INTO events_event ...", "UPDATE events_event ..."]


def test_in_autocommit_a_write_is_its_own_marked_transaction_and_a_read_is_left_alone():
    raw = FakeRaw(autocommit=True)
    with route_to_primary(), claimed("k", STARTED):
        run(raw, "INSERT INTO events_event ...")
        run(raw, "  select id from events_event")
    assert raw.sent == [
        "begin",
        "mark",
        "INSERT INTO events_event ...",
        "commit",
        "  select id from events_event",
    ]


def test_a_lost_claim_refuses_the_transaction_before_the_apps_statement():
    for autocommit, expected in ((False, ["mark"]), (True, ["begin", "mark", "rollback"])):
        raw = FakeRaw(autocommit=autocommit, marked=0)
        with route_to_primary(), claimed("k", STARTED), pytest.raises(ClaimLost, match="'k'"):
            run(raw, "INSERT INTO events_event ...")
        assert raw.sent == expected


def test_a_failing_statement_in_autocommit_rolls_its_mark_back():
    raw = FakeRaw(autocommit=True)
    with route_to_primary(), claimed("k", STARTED), pytest.raises(RuntimeError):
        run(raw, "INSERT INTO events_event ...", fails=True)
    assert raw.sent == ["begin", "mark", "INSERT INTO events_event ...", "rollback"]


def test_no_mark_without_a_claim_on_the_replica_route_or_on_another_database():
    raw = FakeRaw(autocommit=False)
    with route_to_primary():
        run(raw, "INSERT 1")  # no claimed request
    on_replica = FakeRaw(autocommit=False)
    with route_to_replica(), claimed("k", STARTED):
        run(on_replica, "INSERT 2")
    other = FakeRaw(autocommit=False)
    with route_to_primary(), claimed("k", STARTED):
        run(other, "INSERT 3", alias="replica")
    assert (raw.sent, on_replica.sent, other.sent) == (["INSERT 1"], ["INSERT 2"], ["INSERT 3"])

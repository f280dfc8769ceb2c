"""Postgres replication positions: a WAL position (LSN) and the timeline it was written on.

A position such as ``16/B374D848`` is Postgres' own spelling of an LSN. A promotion starts a new
timeline: the new primary's WAL is the old timeline's up to the switch point, then its own. An
LSN alone is therefore not enough after a promotion: a position from the old timeline may lie
past the switch point (a write the promoted replica never received, lost in a forced failover),
and waiting for a replica of the new timeline to reach that LSN waits for nothing. So positions
carry their timeline: ``00000002/16/B374D848`` (eight hex digits, as in WAL file names, then
the LSN). The old form still parses, with the timeline unknown.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "POSITION_SQL",
    "Reach",
    "ReplicationPosition",
    "primary_position",
    "primary_position_async",
    "reach",
]

_POSITION_RE = re.compile(r"(?:([0-9A-Fa-f]{8})/)?([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_MAX_LSN = (1 << 64) - 1
_MAX_TIMELINE = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class ReplicationPosition:
    """A Postgres WAL position (``pg_lsn``), and the timeline it was written on if known.

    Positions on one timeline (or whose timeline is unknown) compare in WAL order; a position on
    a later timeline is after every position of an earlier one. ``a - b`` is the distance in
    bytes between the two LSNs.
    """

    value: int
    timeline: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise ValueError(f"a replication position is an int, got {self.value!r}")
        if not 0 <= self.value <= _MAX_LSN:
            raise ValueError(f"a replication position is between 0 and 2**64 - 1, got {self.value}")
        tli = self.timeline
        if tli is not None and (
            isinstance(tli, bool) or not isinstance(tli, int) or not 1 <= tli <= _MAX_TIMELINE
        ):
            raise ValueError(f"a replication timeline is between 1 and 2**32 - 1, got {tli!r}")

    @classmethod
    def parse(cls, text: str) -> ReplicationPosition:
        """Parse ``X/Y`` (Postgres' LSN text, 1-8 hex digits each side) or ``TTTTTTTT/X/Y``
        (the timeline in eight hex digits, then the LSN)."""
        if not isinstance(text, str):
            raise ValueError(f"a replication position is text like '16/B374D848', got {text!r}")
        m = _POSITION_RE.fullmatch(text)
        if not m:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise ValueError(
                f"{shown!r} is not a Postgres WAL position; expected two hex numbers of at "
                "most 8 digits separated by '/', like '16/B374D848', optionally after an "
                "8-digit timeline, like '00000002/16/B374D848'"
            )
        timeline = int(m[1], 16) if m[1] else None
        if timeline == 0:
            raise ValueError(f"{text!r}: timeline 0 does not exist (Postgres counts from 1)")
        return cls((int(m[2], 16) << 32) | int(m[3], 16), timeline)

    @classmethod
    def from_int(cls, value: int, timeline: int | None = None) -> ReplicationPosition:
        return cls(value, timeline)

    def to_int(self) -> int:
        return self.value

    def __int__(self) -> int:
        return self.value

    def on_timeline(self, timeline: int | None) -> ReplicationPosition:
        """This LSN on ``timeline``."""
        return dataclasses.replace(self, timeline=timeline)

    @property
    def lsn(self) -> str:
        """Postgres' own spelling of the LSN (pg_lsn_out): upper-case hex, no padding."""
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def __str__(self) -> str:
        if self.timeline is None:
            return self.lsn
        return f"{self.timeline:08X}/{self.lsn}"

    def __repr__(self) -> str:
        return f"ReplicationPosition('{self}')"

    def _keys(self, other: object) -> tuple[int, int]:
        if not isinstance(other, ReplicationPosition):
            raise TypeError
        a, b = self.timeline, other.timeline
        if a is not None and b is not None and a != b:
            return a, b
        return self.value, other.value

    def __lt__(self, other: object) -> bool:
        try:
            a, b = self._keys(other)
        except TypeError:
            return NotImplemented
        return a < b

    def __le__(self, other: object) -> bool:
        try:
            a, b = self._keys(other)
        except TypeError:
            return NotImplemented
        return a <= b

    def __gt__(self, other: object) -> bool:
        try:
            a, b = self._keys(other)
        except TypeError:
            return NotImplemented
        return a > b

    def __ge__(self, other: object) -> bool:
        try:
            a, b = self._keys(other)
        except TypeError:
            return NotImplemented
        return a >= b

    def __sub__(self, other: ReplicationPosition) -> int:
        if not isinstance(other, ReplicationPosition):
            return NotImplemented
        return self.value - other.value


class Reach(enum.Enum):
    """Whether a replica has reached a position (see :func:`reach`)."""

    REACHED = "reached"
    PENDING = "pending"
    #: from an older timeline than the replica's, and its LSN not replayed: waiting may never
    #: end (the write may lie past the switch point, lost), so the read asks the primary.
    OLDER_TIMELINE = "older timeline"


def reach(
    target: ReplicationPosition,
    replayed: ReplicationPosition | None,
    timeline: int | None = None,
) -> Reach:
    """Has a replica that replayed up to ``replayed`` reached ``target``?

    ``timeline``: the newest timeline known (the replica's own, or one learned from the
    primary's positions); defaults to ``replayed``'s. A target from an older timeline whose LSN
    the replica has replayed is reached: the new timeline holds all of the old one up to the
    switch point, and a write past it was lost everywhere. One whose LSN is not replayed is
    :attr:`Reach.OLDER_TIMELINE`: it may be replay lag within the old timeline, or a lost write
    that no wait would bring. Without timelines on both sides, LSNs alone decide.
    """
    if replayed is None:
        return Reach.PENDING
    if replayed.value >= target.value:
        return Reach.REACHED
    current = replayed.timeline
    if timeline is not None and (current is None or timeline > current):
        current = timeline
    if target.timeline is not None and current is not None and target.timeline < current:
        return Reach.OLDER_TIMELINE
    return Reach.PENDING


def _position_or_none(raw: Any, timeline: Any = None) -> ReplicationPosition | None:
    if raw is None:
        return None
    position = ReplicationPosition.parse(str(raw))
    return position.on_timeline(int(timeline)) if timeline else position


# ---- the primary's position -----------------------------------------------------------------

# pg_current_wal_lsn() is the primary's WAL *write* position. With synchronous_commit on (the
# default), a commit returns only after its WAL is flushed, so this position, read after the
# commit on any connection, is >= the end of the commit record; and it is WAL the walsender
# can already ship. pg_current_wal_insert_lsn() can run ahead of what has been written (other
# sessions' in-flight WAL) and, at a page boundary, points past the page header, beyond any
# replay position a replica reports until more WAL arrives: a waiting read could then wait for
# nothing. It is only needed when the app commits with synchronous_commit = off.
#
# The timeline is the first 8 hex digits of the WAL file name: pg_walfile_name() names the file
# on the primary's current (insertion) timeline, exact at once after a promotion, whereas
# pg_control_checkpoint() shows the timeline of the last checkpoint.
_WITH_TIMELINE = "substr(pg_walfile_name({lsn}), 1, 8) || '/' || {lsn}::text"

POSITION_SQL = f"({_WITH_TIMELINE.format(lsn='pg_current_wal_lsn()')})"
"""An SQL expression: the primary's position with its timeline, as text
(``00000001/16/B374D848``), for a query that reads it alongside other things."""

_PRIMARY_SQL = f"SELECT {_WITH_TIMELINE.format(lsn='l')} FROM pg_current_wal_lsn() AS l"
_PRIMARY_INSERT_SQL = (
    f"SELECT {_WITH_TIMELINE.format(lsn='l')} FROM pg_current_wal_insert_lsn() AS l"
)


def _primary_sql(insert: bool) -> str:
    return _PRIMARY_INSERT_SQL if insert else _PRIMARY_SQL


def primary_position(conn: Any, *, insert: bool = False) -> ReplicationPosition:
    """The primary's WAL position and timeline; call it after the write has committed.

    ``conn``: a psycopg connection or cursor, any DB-API cursor (e.g. Django's), or an
    SQLAlchemy ``Connection`` (for a ``Session``, pass ``session.connection()``).
    ``insert=True`` reads ``pg_current_wal_insert_lsn()`` instead (see the module source).
    """
    sql = _primary_sql(insert)
    if hasattr(conn, "exec_driver_sql"):  # SQLAlchemy Connection
        value = conn.exec_driver_sql(sql).scalar()
    else:
        cur = conn.execute(sql)
        value = (cur if cur is not None and hasattr(cur, "fetchone") else conn).fetchone()[0]
    return ReplicationPosition.parse(str(value))


async def primary_position_async(conn: Any, *, insert: bool = False) -> ReplicationPosition:
    """:func:`primary_position` for a psycopg ``AsyncConnection`` / ``AsyncCursor`` or an
    SQLAlchemy ``AsyncConnection``."""
    sql = _primary_sql(insert)
    if hasattr(conn, "exec_driver_sql"):
        value = (await conn.exec_driver_sql(sql)).scalar()
    else:
        cur = await conn.execute(sql)
        value = (await (cur if cur is not None else conn).fetchone())[0]
    return ReplicationPosition.parse(str(value))

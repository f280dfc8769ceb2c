"""What the gateway knows of an idempotency key: the answer of a claim (:class:`Claim`, its
:class:`Outcome`), the errors of the store, and :class:`OutcomeStore`, the interface the
gateway needs of the table (:class:`latitude.idempotency.IdempotencyStore` in the primary
database, or a fake in the unit tests). The contract is documented in :mod:`latitude.idempotency`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, Protocol

__all__ = [
    "Claim",
    "ClaimTooLate",
    "IdempotencyError",
    "IdempotencyUnavailable",
    "NonceRecord",
    "NonceUsed",
    "Outcome",
    "OutcomeStore",
]


class IdempotencyError(Exception):
    """Base class of the errors raised by this module."""


class IdempotencyUnavailable(IdempotencyError):
    """The primary database could not be reached (or failed) while claiming or storing.

    ``sent`` is False only when no statement was sent at all (no connection could be had), so
    the database certainly did not act on it."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class ClaimTooLate(IdempotencyError):
    """The claim reached the database after its ``not_after`` time: nothing was claimed."""


class NonceUsed(IdempotencyError):
    """The forwarded request's nonce was recorded before (a replay): nothing was claimed."""


class NonceRecord(NamedTuple):
    """A forwarded request's nonce as the primary's replay cache keeps it: its name (scoped by
    the key that signed it) and how long to keep it (as long as its signature is valid)."""

    name: str
    ttl_s: float


class Outcome(enum.StrEnum):
    NEW = "new"
    REPLAY = "replay"
    IN_PROGRESS = "in_progress"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`IdempotencyStore.begin`.

    ``status`` / ``headers`` / ``body`` are set for ``REPLAY`` only. Headers are
    ``(name, value)`` pairs of ``str`` (latin-1, as HTTP carries them), in the stored order;
    :meth:`asgi_headers` gives them as ASGI byte pairs. ``started_at`` is the claim's
    ``created_at`` (for ``NEW`` and ``IN_PROGRESS``). ``position`` (``REPLAY`` only) is the
    database's WAL position when the outcome was read: at or past the stored request's
    commits, so a replica that has replayed it shows what the request wrote.
    """

    outcome: Outcome
    key: str
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    started_at: datetime | None = None
    taken_over: bool = False
    position: str | None = None

    def asgi_headers(self) -> list[tuple[bytes, bytes]]:
        return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.headers]


class OutcomeStore(Protocol):
    """What the gateway needs of the table of idempotency keys and stored outcomes:
    `IdempotencyStore` in the primary database, or an in-memory fake in the unit tests."""

    async def begin(
        self,
        key: str,
        request_hash: str,
        stale_after_s: float = ...,
        *,
        not_after: float | None = None,
        timeout_s: float | None = None,
        nonce: NonceRecord | None = None,
    ) -> Claim: ...

    async def record_nonce(self, nonce: NonceRecord, *, timeout_s: float | None = None) -> bool: ...

    async def complete_at_position(
        self,
        key: str,
        status: int,
        headers: Iterable[Sequence[str | bytes]],
        body: bytes,
        *,
        claim: Claim | None = None,
        timeout_s: float | None = None,
    ) -> tuple[bool, str | None]: ...

    async def abandon(
        self, key: str, *, claim: Claim | None = None, timeout_s: float | None = None
    ) -> bool: ...

    async def complete_run(
        self,
        key: str,
        request_hash: str,
        runner: str,
        status: int,
        headers: Iterable[Sequence[str | bytes]],
        body: bytes,
        *,
        timeout_s: float | None = None,
    ) -> tuple[bool, str | None]: ...

    async def settle_run(
        self, key: str, runner: str, *, timeout_s: float | None = None
    ) -> bool: ...

    async def position(self, timeout_s: float | None = None) -> str: ...

    @property
    def owner(self) -> int | None: ...

    async def ping(self, timeout_s: float | None = None) -> None: ...

    async def ensure_schema(self) -> None: ...

    async def purge_periodically(
        self, retention_s: float = ..., every_s: float = ..., on_error=None
    ) -> None: ...

    async def close(self) -> None: ...

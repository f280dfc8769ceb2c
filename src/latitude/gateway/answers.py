"""Every answer the gateway gives of its own: one table from what went wrong to the status,
title and `Retry-After` the client gets, so one failure is answered alike wherever it is met.

Two kinds of failure reach the table: errors of the parts the gateway uses (the session store,
the signatures, the idempotency store, the forwarding client), and the gateway's own decisions
(`Refused` and its subclasses below), raised where they are made. Client-facing answers go out
in the client's language (`send_error`: JSON or HTML); the primary's answers to a forwarded
request are signed and plain text (`primary.py`), with the same statuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from latitude.forwarding import AnswerTooLarge
from latitude.gateway.envelope import IDEMPOTENCY_KEY, BadEnvelope
from latitude.gateway.messages import BodyStalled, BodyTooLarge, Scope, Send, send_error
from latitude.idempotency import IdempotencyUnavailable
from latitude.sessions import SessionError, SessionStoreUnavailable, SessionTooLarge
from latitude.signing import DigestMismatch, SignatureError


class Refused(Exception):
    """A refusal the gateway decides on itself. `key` is the request's idempotency key when a
    retry with it is the way on (the answer then carries it)."""

    def __init__(self, detail: str = "", *, key: str | None = None) -> None:
        super().__init__(detail)
        self.key = key


class DeadlinePassed(Refused):
    """The primary did not answer within the deadline; the request may yet run (once)."""


class ReadOnly(Refused):
    """Neither the primary region nor its database can be reached: nothing was changed."""


class KeyReused(Refused):
    """An idempotency key already used for a different request."""


class KeyInProgress(Refused):
    """A request with this idempotency key is running now."""


class BadAnswerSignature(Refused):
    """The primary's answer was not correctly signed."""


class PrimaryPaused(Refused):
    """The primary region answered a forwarded write with an unsigned 503 (it refuses writes
    for now: its lease ran out, it is moving). Unsigned, its word that nothing ran cannot be
    taken, so the client is told to retry with the key, which runs the request at most once."""


class NotPrimary(Refused):
    """A forwarded request reached a region that is not the primary."""


class Demoted(NotPrimary):
    """A forwarded request reached a region that a newer primary epoch has demoted."""


class Busy(Refused):
    """Every forwarding slot is taken and the queue for one is full (or outlasted the
    deadline) before anything was sent: nothing was changed."""


class BudgetSpent(Refused):
    """A forwarded request waited at the primary past the time its replica had left for it
    (`Latitude-Budget-Ms`): not run, since no one waits for its answer any more."""


class StoppedPastBudget(BudgetSpent):
    """A forwarded request's app run at the primary outlasted the time its replica had left for
    it and was stopped there, as if the app had failed: its key is released, or settled if a
    fenced transaction of the run had committed, so a retry with it runs the request at most
    once (for SQL that `latitude.db` fences; docs/gateway.md, known limits)."""


class GatewayFault(Refused):
    """The gateway itself failed (a bug: an error none of its parts names) while forwarding a
    request whose answer had not started: the client hears so, with the request's key."""


class FailedHere(Refused):
    """An error that no part names (the app's, unhandled, or the gateway's) stopped a request
    served in this region before its answer started: a named 500, logged with its traceback,
    never the server's bare one. `changes`: the request was one that may change things."""

    def __init__(self, region: str, *, changes: bool) -> None:
        super().__init__(region)
        self.changes = changes


class AppFailed(Refused):
    """The app raised, or left a session no store can keep, while running a forwarded request."""


def _nothing(exc: BaseException) -> dict:
    return {}


@dataclass(frozen=True)
class Refusal:
    status: int
    title: str
    retry_after_s: int | None = None
    detail: Callable[[BaseException], str] = str
    data: Callable[[BaseException], dict] = _nothing  # more fields for a JSON answer
    marker: bytes | None = None  # the primary's signed word on the key to the replica


def _deadline(exc: BaseException) -> str:
    return (
        f"The request was sent but {exc}. Retry with the header "
        f"Idempotency-Key: {exc.key}; it will not be applied twice."
    )


def _read_only(exc: BaseException) -> str:
    return (
        f"This region can serve reads but cannot make changes at the moment: {exc}. "
        f"Nothing was changed here. Retry shortly with the header Idempotency-Key: {exc.key}."
    )


def _busy(exc: BaseException) -> str:
    return f"{exc}. Nothing was sent to the primary region; retry in a moment."


def _budget_spent(exc: BaseException) -> str:
    return (
        f"{exc}. Nothing was changed; retry in a moment with the header Idempotency-Key: {exc.key}."
    )


def _stopped(exc: BaseException) -> str:
    return (
        f"{exc}. Retry in a moment with the header Idempotency-Key: {exc.key}; it will not be "
        "applied twice."
    )


def _fault(exc: BaseException) -> str:
    return (
        f"The gateway failed while forwarding the request ({exc}; logged). It may have reached "
        f"the primary region: retry with the header Idempotency-Key: {exc.key}; it will not be "
        "applied twice."
    )


def _failed_here(exc: BaseException) -> str:
    detail = (
        f"An error stopped the request in region {exc} before its answer started; it is "
        "logged there."
    )
    if getattr(exc, "changes", False):
        detail += " A change it made may stand: reload to see before trying again."
    return detail


def _stalled(exc: BaseException) -> str:
    return f"{exc} ([gateway] body_timeout_s)"


def _body_too_big(exc: BaseException) -> str:
    return f"{exc} ([gateway] max_body_bytes); nothing was sent or changed."


def _too_big(exc: BaseException) -> str:
    return (
        f"The primary region handled the request, but {exc} ([gateway] max_answer_bytes), so "
        "it was not relayed. Its outcome is stored: a retry with the header Idempotency-Key: "
        f"{getattr(exc, 'key', '')} gets the same answer, not a second run."
    )


def _store_down(exc: BaseException) -> str:
    detail = f"This region's session store does not answer ({exc}). Retry in a few seconds."
    key = getattr(exc, "key", None)
    if key:
        return detail + (
            " The request itself was carried out; retry with the header Idempotency-Key: "
            f"{key} to get its answer without running it again."
        )
    if getattr(exc, "nothing_done", False):
        return detail + " Nothing was changed."
    return detail


# First match wins (an exception's class or a base of it): subclasses before their bases.
TABLE: tuple[tuple[type[BaseException], Refusal], ...] = (
    (BodyStalled, Refusal(408, "Request body stalled", None, _stalled)),
    (
        BodyTooLarge,
        Refusal(
            413,
            "Request body too large",
            None,
            _body_too_big,
            lambda e: {"max_body_bytes": e.limit},
        ),
    ),
    (SessionTooLarge, Refusal(413, "Session too large to forward")),
    (SessionStoreUnavailable, Refusal(503, "Session store unavailable", 2, _store_down)),
    (SessionError, Refusal(413, "Session rejected")),
    (
        AnswerTooLarge,
        Refusal(
            502,
            "The primary region's answer is too large",
            None,
            _too_big,
            lambda e: {"max_answer_bytes": e.limit},
        ),
    ),
    (BadAnswerSignature, Refusal(502, "Bad answer from the primary region")),
    (PrimaryPaused, Refusal(503, "Writes paused at the primary region", 1)),
    (DeadlinePassed, Refusal(504, "The primary region did not answer in time", 1, _deadline)),
    (ReadOnly, Refusal(503, "Read-only for now", 5, _read_only, lambda e: {"read_only": True})),
    (Busy, Refusal(503, "Busy", 1, _busy)),
    (StoppedPastBudget, Refusal(503, "The primary region is overloaded", 1, _stopped)),
    (BudgetSpent, Refusal(503, "The primary region is overloaded", 1, _budget_spent)),
    (KeyReused, Refusal(422, "Idempotency-Key reused", marker=b"mismatch")),
    (KeyInProgress, Refusal(409, "Idempotency-Key in use", marker=b"in-progress")),
    (Demoted, Refusal(503, "Misdirected request", 1)),
    (NotPrimary, Refusal(421, "Misdirected request", 1)),
    (DigestMismatch, Refusal(401, "Forwarded request rejected")),
    (SignatureError, Refusal(401, "Forwarded request rejected")),
    (IdempotencyUnavailable, Refusal(503, "Idempotency store unavailable", 1)),
    (BadEnvelope, Refusal(400, "Bad forwarding envelope")),
    (GatewayFault, Refusal(502, "The gateway failed", 1, _fault)),
    (AppFailed, Refusal(500, "Internal error")),
    (FailedHere, Refusal(500, "Internal error", None, _failed_here)),
)


def refusal_for(exc: BaseException) -> Refusal:
    for kind, refusal in TABLE:
        if isinstance(exc, kind):
            return refusal
    raise LookupError(f"no answer is defined for {type(exc).__name__}") from exc


def answer_headers(exc: BaseException, refusal: Refusal) -> list[tuple[bytes, bytes]]:
    headers = []
    key = getattr(exc, "key", None)
    if key:
        headers.append((IDEMPOTENCY_KEY, key.encode("latin-1")))
    if refusal.retry_after_s is not None:
        headers.append((b"retry-after", str(refusal.retry_after_s).encode()))
    return headers


async def refuse(
    scope: Scope, send: Send, exc: BaseException, extra: list[tuple[bytes, bytes]] = ()
) -> None:
    """Answer the client for `exc`, as the table says, in its language."""
    refusal = refusal_for(exc)
    data = refusal.data(exc)
    key = getattr(exc, "key", None)
    if key:
        data["idempotency_key"] = key
    await send_error(
        scope,
        send,
        refusal.status,
        refusal.title,
        refusal.detail(exc),
        extra_headers=[*answer_headers(exc, refusal), *extra],
        data=data or None,
    )


def with_key(exc: BaseException, key: str | None, *, nothing_done: bool = False) -> BaseException:
    """`exc`, marked with the request's key (a retry with it gets the outcome) or as having
    changed nothing, for its answer."""
    exc.key = key
    exc.nothing_done = nothing_done
    return exc

"""The forwarding envelope: what a replica region's gateway adds to a request it carries to the
primary, and what the primary's gateway adds to the answer. Both directions, packed and
unpacked here, in bytes header pairs (as the ASGI server and the transports carry them).

A forwarded request is the client's request, less the headers only the edge may set, plus:
`Forwarded` (who the client is), `Idempotency-Key`, `Content-Digest` (of body + session),
`Latitude-Session-Length` (the replica region's session rides after the body) and
`Latitude-Forwarded-From`. Its answer is the app's answer plus the session after the run (at
the end of the body, `Latitude-Session-Length` bytes long), `Latitude-Session` (what that does
to the replica's copy: the `SessionTail`), `Latitude-Position` (the WAL position a replica must
have replayed to show the write) and the primary epoch. Both are signed (`SIGNED_*`).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from latitude.cookies import cookie_value, set_cookie_value
from latitude.gateway.classify import FORWARDED_FROM_HEADER
from latitude.gateway.messages import (
    Scope,
    build_forwarded,
    header,
    parse_forwarded,
    strip_untrusted,
)
from latitude.http_headers import HOP_BY_HOP
from latitude.sessions import InvalidSessionId, check_session_id

SESSION_LENGTH = b"latitude-session-length"
SESSION_STATE = b"latitude-session"
POSITION = b"latitude-position"
IDEMPOTENCY = b"latitude-idempotency"  # the primary's word on a key: in-progress | mismatch
IDEMPOTENCY_KEY = b"idempotency-key"
FORWARDED_FROM = FORWARDED_FROM_HEADER.encode()
# The time an attempt has left when the replica sends it, in whole milliseconds: the primary
# does not start work that has outwaited it (no one would receive its answer).
BUDGET = b"latitude-budget-ms"
STALE = b"latitude-stale"

# What a forwarded request's signature covers (when present), and must cover to be accepted.
SIGNED_REQUEST_HEADERS = (
    "content-digest",
    "content-type",
    "idempotency-key",
    "forwarded",
    SESSION_LENGTH.decode(),
    FORWARDED_FROM_HEADER,
    "cookie",
    "authorization",
    BUDGET.decode(),
)
SIGNED_RESPONSE_HEADERS = (
    "content-digest",
    "content-type",
    "location",
    "set-cookie",
    SESSION_LENGTH.decode(),
    SESSION_STATE.decode(),
    POSITION.decode(),
    IDEMPOTENCY.decode(),
)
# The gateway's own framing never reaches the client or the app.
INTERNAL_RESPONSE_HEADERS = frozenset(
    {
        SESSION_LENGTH,
        SESSION_STATE,
        POSITION,
        IDEMPOTENCY,
        b"signature",
        b"signature-input",
        b"content-digest",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"date",
        b"server",
    }
)
_NOT_CARRIED = frozenset(name.encode() for name in HOP_BY_HOP) | {IDEMPOTENCY_KEY}

Headers = list[tuple[bytes, bytes]]


class SessionTail(enum.StrEnum):
    """What an answer does to the replica region's copy of the session."""

    UPDATED = "updated"  # the session after the run rides at the end of the body
    DELETED = "deleted"  # the app emptied it
    UNCHANGED = "unchanged"  # every refusal: it never touches a session


class BadEnvelope(ValueError):
    """A forwarded request whose envelope headers do not add up (signed, so not an attack
    from outside: a gateway of another version, or a bug)."""


def request_fingerprint(scope: Scope, content_digest: str, session_id: str | None) -> str:
    """What makes two requests "the same" for an idempotency key: both sides compute it alike.
    The session id is part of it, so one user's key never replays another user's answer."""
    parts = [
        scope["method"],
        scope["path"],
        scope.get("query_string", b"").decode("latin-1"),
        content_digest,
        session_id or "",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def session_id(headers: Headers, cookie_name: str) -> str | None:
    """The session cookie's id, or None when there is none or it is not a valid id: a bad
    cookie is no session, as `SessionMiddleware` treats it, in every region and method."""
    sid = cookie_value(headers, cookie_name)
    try:
        return check_session_id(sid) if sid else None
    except InvalidSessionId:
        return None


def target(scope: Scope) -> str:
    """The request target exactly as the client sent it (path and query)."""
    path_qs = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        path_qs += "?" + scope["query_string"].decode("latin-1")
    return path_qs


def client_headers(headers: Headers) -> Headers:
    """An answer's headers without the gateway's framing."""
    return [(k, v) for k, v in headers if k.lower() not in INTERNAL_RESPONSE_HEADERS]


# ---- request, replica side -----------------------------------------------------------------


def pack_request(
    scope: Scope,
    *,
    key: str,
    content_digest: str,
    session_length: int,
    body_length: int,
    region: str,
) -> Headers:
    """The headers a replica's gateway sends (before signing): the client's, less the edge's
    own and hop-by-hop ones, plus the envelope."""
    headers = scope["headers"]
    client_ip = (scope.get("client") or (None, None))[0]
    out = [(k, v) for k, v in strip_untrusted(headers) if k.lower() not in _NOT_CARRIED]
    forwarded = build_forwarded(client_ip, scope.get("scheme", "http"), header(headers, b"host"))
    out += [
        (b"forwarded", forwarded.encode("latin-1")),
        (IDEMPOTENCY_KEY, key.encode("latin-1")),
        (b"content-digest", content_digest.encode("latin-1")),
        (SESSION_LENGTH, str(session_length).encode()),
        (FORWARDED_FROM, region.encode()),
    ]
    if body_length + session_length:
        out.append((b"content-length", str(body_length + session_length).encode()))
    return out


# ---- request, primary side -----------------------------------------------------------------


@dataclass(frozen=True)
class ForwardedRequest:
    """A verified forwarded request, unpacked: what the app at the primary is given."""

    key: str
    session_length: int  # the replica's session rides in the last bytes of the body
    scope: Scope  # the app's view: the client's host, address and scheme
    budget_s: float | None = None  # what the attempt had left when sent (`BUDGET`), if said


def announced_body_length(headers: Headers) -> int | None:
    """The request's own length (without the session that rides after it), from its signed
    headers; None if they do not say."""
    try:
        return int(header(headers, b"content-length") or "0") - int(
            header(headers, SESSION_LENGTH) or "0"
        )
    except ValueError:
        return None


def unpack_request(scope: Scope, body_size: int) -> ForwardedRequest:
    headers = scope["headers"]
    key = header(headers, IDEMPOTENCY_KEY)
    try:
        n = int(header(headers, SESSION_LENGTH) or "0")
    except ValueError:
        raise BadEnvelope("bad forwarding envelope") from None
    if not key or not 0 <= n <= body_size:
        raise BadEnvelope("bad forwarding envelope")
    budget = header(headers, BUDGET)
    if budget is not None and not (budget.isascii() and budget.isdigit()):
        raise BadEnvelope(f"bad forwarding envelope: {BUDGET.decode()} is {budget[:20]!r}")
    forwarded_value = header(headers, b"forwarded") or ""
    forwarded = parse_forwarded(forwarded_value)
    app_headers = [
        (k, v)
        for k, v in strip_untrusted(headers)
        if k not in (b"host", b"content-length", IDEMPOTENCY_KEY)
    ]
    app_headers += [
        (b"host", forwarded.get("host", header(headers, b"host") or "").encode("latin-1")),
        (b"content-length", str(body_size - n).encode()),
        (b"forwarded", forwarded_value.encode("latin-1")),
        (IDEMPOTENCY_KEY, key.encode("latin-1")),
    ]
    app_scope = {
        **scope,
        "headers": app_headers,
        "client": (forwarded.get("for", "unknown"), 0),
        "scheme": forwarded.get("proto", scope.get("scheme", "http")),
    }
    return ForwardedRequest(
        key=key,
        session_length=n,
        scope=app_scope,
        budget_s=None if budget is None else int(budget) / 1000,
    )


# ---- answer, primary side ------------------------------------------------------------------


def pack_answer(
    headers: Headers, body: bytes, session: bytes, tail: SessionTail
) -> tuple[Headers, bytes]:
    """The app's answer and the session after the run (with `SessionTail.UPDATED`), as one
    envelope: `(headers, body)`."""
    if tail is not SessionTail.UPDATED:
        session = b""
    out = client_headers(headers)
    out.append((SESSION_LENGTH, str(len(session)).encode()))
    out.append((SESSION_STATE, tail.value.encode()))
    return out, body + session


def refusal_tail() -> Headers:
    """The envelope of the gateway's own answers (a refusal or an error): no session rides
    along and the replica's copy is left as it is."""
    return [(SESSION_LENGTH, b"0"), (SESSION_STATE, SessionTail.UNCHANGED.value.encode())]


# ---- answer, replica side ------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardedAnswer:
    """A verified answer from the primary, unpacked."""

    status: int
    headers: Headers  # for the client: the gateway's framing removed
    body: bytes  # the app's body
    session: bytes  # the session after the run (with `SessionTail.UPDATED`)
    tail: SessionTail
    session_id: str | None  # the id the session is kept under (a new cookie's, or the client's)
    position: str | None  # the WAL position that holds the write


def unpack_answer(
    status: int, headers: Headers, body: bytes, cookie_name: str, sid: str | None
) -> ForwardedAnswer:
    n = int(header(headers, SESSION_LENGTH) or "0")
    n = min(max(n, 0), len(body))
    app_body, session = body[: len(body) - n], body[len(body) - n :]
    tail_text = header(headers, SESSION_STATE)
    try:
        tail = SessionTail(tail_text) if tail_text else None
    except ValueError:
        tail = SessionTail.UNCHANGED
    if tail is None:  # an older primary: a session rides along exactly when it changed
        tail = SessionTail.UPDATED if session else SessionTail.UNCHANGED
    new_sid = set_cookie_value(headers, cookie_name) or sid
    try:
        new_sid = check_session_id(new_sid) if new_sid else None
    except InvalidSessionId:
        new_sid = None  # the app named a session id no store may hold: the cookie is moot
    return ForwardedAnswer(
        status=status,
        headers=client_headers(headers),
        body=app_body,
        session=session,
        tail=tail,
        session_id=new_sid,
        position=header(headers, POSITION),
    )

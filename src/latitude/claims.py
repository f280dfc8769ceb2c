"""The schema of the idempotency table and of the replay cache of nonces beside it; the store's
claim of a new key (with or without the request's nonce) and the nonce's record; and the
statements the app's own transactions run for a claim: the fence (:func:`fence_statement`) and
the claim in the app's transaction (:func:`claim_statement`). Shared by the store
(:mod:`latitude.idempotency`, which documents the table) and :mod:`latitude.db`, which imports
no driver of ours beyond these strings.

This module is a leaf: it imports no other ``latitude`` module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "DEFAULT_PURGE_EVERY_S",
    "LIVENESS_LOCK_CLASS",
    "DEFAULT_RETENTION_S",
    "DEFAULT_STALE_AFTER_S",
    "LOST_ANSWER_BODY",
    "LOST_ANSWER_HEADERS",
    "CLAIM_NEW",
    "CLAIM_NEW_WITH_NONCE",
    "IN_TIME",
    "LOST_ANSWER_STATUS",
    "NONCES",
    "NONCE_INSERT",
    "NONCE_PURGE_EVERY_S",
    "SCHEMA",
    "TABLE",
    "check_key",
    "claim_statement",
    "fence_statement",
    "headers_json",
    "owner_gone",
]

TABLE = "latitude_idempotency"
# The primary's replay cache of forwarded requests' nonces, beside the claims: an eager claim
# records its request's nonce in its own statement (one round trip for both, and no session
# store on a forwarded write's way at the primary); replicated with the claims, so a promotion
# keeps it. `runner` tells a store's own retry of a statement (same runner) from a replay.
NONCES = "latitude_nonces"
NONCE_PURGE_EVERY_S = 60.0
DEFAULT_STALE_AFTER_S = 60.0
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_PURGE_EVERY_S = 3600.0

# The first key of the session advisory lock a live gateway process holds on a connection of its
# own (`latitude.liveness`); the second is the process's owner id, stored with its claims.
LIVENESS_LOCK_CLASS = 0x4C415431  # "LAT1"

_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as an HTTP header value allows

SCHEMA = f"""
create table if not exists {TABLE} (
    key text primary key,
    request_hash text not null,
    state text not null check (state in ('running', 'completed')),
    status int,
    headers jsonb,
    body bytea,
    created_at timestamptz not null default now(),
    completed_at timestamptz
);
alter table {TABLE} add column if not exists applied boolean not null default false;
alter table {TABLE} add column if not exists runner text;
alter table {TABLE} add column if not exists owner int;
create index if not exists {TABLE}_created_at on {TABLE} (created_at);
create table if not exists {NONCES} (
    nonce text primary key,
    runner text not null,
    expires_at timestamptz not null
);
create index if not exists {NONCES}_expires_at on {NONCES} (expires_at)
"""

# The nonce, recorded unless it is there already: it returns a row if it is new, or this
# runner's own (a retry of a statement that reached the database). Parameters: nonce, runner,
# seconds to keep it. Its commit waits for no flush: a record lost in a crash reopens replays
# only for signatures still valid then, and claims still keep those from running twice.
NONCE_INSERT = (
    f"insert into {NONCES} as s (nonce, runner, expires_at) "
    "select %s, %s, clock_timestamp() + make_interval(secs => %s) "
    "where set_config('synchronous_commit', 'off', true) is not null "
    "on conflict (nonce) do update set runner = excluded.runner "
    "where s.runner = excluded.runner returning 1"
)

# Without a deadline (parameter None), one that never passes: the statements stay the same.
IN_TIME = "clock_timestamp() < coalesce(to_timestamp(%s), 'infinity')"
# The claim of a new key (parameters: key, hash, owner, the call's runner token, deadline or
# None): a row, or none if the key is there already or the claim came after its deadline.
CLAIM_NEW = (
    f"insert into {TABLE} (key, request_hash, state, owner, runner) "
    f"select %s, %s, 'running', %s, %s where {IN_TIME} "
    "and set_config('synchronous_commit', 'off', true) is not null "
    "on conflict (key) do nothing returning created_at"
)
# The same with the request's nonce recorded first (parameters: the nonce's, then the claim's):
# whether the nonce is new (or this runner's), and the claim's time if one was made. A nonce
# recorded before claims nothing: the parts share one snapshot, so the claim sees the nonce's
# insert only through its returned row.
CLAIM_NEW_WITH_NONCE = (
    f"with n as ({NONCE_INSERT}), c as ("
    f"insert into {TABLE} (key, request_hash, state, owner, runner) "
    f"select %s, %s, 'running', %s, %s where exists (select 1 from n) and {IN_TIME} "
    "and set_config('synchronous_commit', 'off', true) is not null "
    "on conflict (key) do nothing returning created_at) "
    "select exists (select 1 from n), (select created_at from c)"
)

# Run by `latitude.db` as the first statement of each of the app's transactions on the primary
# while a claimed request runs: the mark commits with the transaction or not at all, and it
# row-locks the claim, so a retry that would take the claim over (or release it) waits for the
# transaction to end and then sees whether it committed.
_FENCE = (
    f"with m as (update {TABLE} set applied = true where key = %s and created_at = %s "
    "and state = 'running' returning 1) select count(*) from m"
)
_FENCE_IDLE = (
    f"with m as (update {TABLE} set applied = true where key = %s and created_at = %s "
    "and state = 'running' returning 1) "
    "select count(*), set_config('idle_in_transaction_session_timeout', %s, true) from m"
)


def owner_gone(row: str = "") -> str:
    """SQL that is true when the claim ``row`` (a table alias and a dot, or nothing) was made by a
    gateway process that no longer holds its liveness lock: it died (its connections closed with
    it), so its run is over and the claim need not wait ``stale_after_s``. A claim with no owner
    (made by a process without the lock) is never taken for gone."""
    return (
        f"({row}owner is not null and not exists (select 1 from pg_locks l "
        f"where l.locktype = 'advisory' and l.classid = {LIVENESS_LOCK_CLASS} "
        f"and l.objid = {row}owner::oid and l.objsubid = 2 "
        "and l.database = (select oid from pg_database where datname = current_database())))"
    )


# The claim made by the app's own transaction (see the module doc): insert the key as this run's,
# or take it if it is already this run's (an earlier transaction committed it) or a stale claim
# of the same request that no transaction committed. 0 rows: the key is anyone else's. A row
# another transaction is inserting makes this wait on the unique index until that one ends.
_CLAIM_IN_TRANSACTION = (
    f"with c as (insert into {TABLE} as t (key, request_hash, state, applied, runner, owner) "
    "values (%s, %s, 'running', true, %s, %s) "
    "on conflict (key) do update set applied = true, runner = excluded.runner, "
    "owner = excluded.owner, "
    "created_at = case when t.runner = excluded.runner then t.created_at else now() end "
    "where t.state = 'running' and t.request_hash = excluded.request_hash "
    "and (t.runner = excluded.runner or (not t.applied "
    f"and (t.created_at < now() - make_interval(secs => %s) or {owner_gone('t.')}))) "
    "returning 1) select count(*) from c"
)

# What a retry gets when a run committed its effects but its answer never reached the store
# (its process died, or its link broke after the commit): the request is not run again.
LOST_ANSWER_STATUS = 409
LOST_ANSWER_HEADERS = [("content-type", "application/json")]
LOST_ANSWER_BODY = (
    b'{"error": "Applied, but the answer was lost", "detail": "This request was carried out, '
    b'but its answer was lost on the way; it will not be run again. Reload to see its result."}'
)


def fence_statement(
    key: str, started_at: Any, idle_timeout_s: float | None = None
) -> tuple[str, tuple]:
    """The SQL (and parameters) that marks the claim ``(key, started_at)`` applied within the
    current transaction; it returns the number of claims marked (1, or 0 if the claim is no
    longer that run's). With ``idle_timeout_s``, the database also aborts the transaction if the
    app's next statement takes longer than that to arrive (a link that stalls mid-transaction
    must not hold the claim's row lock, and the outcome, hostage)."""
    if idle_timeout_s is None:
        return _FENCE, (key, started_at)
    return _FENCE_IDLE, (key, started_at, str(max(1, int(idle_timeout_s * 1000))))


def claim_statement(
    key: str,
    request_hash: str,
    runner: str,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    owner: int | None = None,
) -> tuple[str, tuple]:
    """The SQL (and parameters) that claims ``key`` for the run ``runner`` of the gateway process
    ``owner`` (its liveness id, or None) within the current transaction (see the module doc); it
    returns 1 if the key is now this run's, 0 if it is anyone else's (completed, running, or
    another request's)."""
    check_key(key)
    if not request_hash or not runner:
        raise ValueError("request_hash and runner must be non-empty strings")
    if stale_after_s <= 0:
        raise ValueError(f"stale_after_s must be positive, not {stale_after_s!r}")
    return _CLAIM_IN_TRANSACTION, (key, request_hash, runner, owner, float(stale_after_s))


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"invalid idempotency key {str(key)[:40]!r}: expected 1 to 255 visible ASCII characters"
        )
    return key


def header_text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def headers_json(headers: Iterable[Sequence[str | bytes]]) -> list[list[str]]:
    pairs = []
    for pair in headers:
        name, value = pair
        pairs.append([header_text(name), header_text(value)])
    return pairs

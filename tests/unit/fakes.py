"""In-memory stand-ins for the gateway's parts, behind the same interfaces as the real ones:
the outcome table with its replay cache of nonces (`OutcomeStore`), the way to the primary
(`Forwarding`). With `MemorySessionStore` (which ships with Latitude) they let two regions'
gateways run in one process, with no database, no Valkey and no sockets."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from latitude.claims import LOST_ANSWER_BODY, LOST_ANSWER_HEADERS, LOST_ANSWER_STATUS
from latitude.forwarding import ForwardedResponse, NoAnswer, NotSent
from latitude.idempotency import Claim, ClaimTooLate, IdempotencyUnavailable, Outcome
from latitude.outcome_store import NonceUsed


@dataclass
class Row:
    request_hash: str
    started_at: datetime
    state: str = "running"
    status: int | None = None
    headers: list = field(default_factory=list)
    body: bytes = b""
    applied: bool = False
    runner: str | None = None


class MemoryOutcomeStore:
    """The idempotency table, as `IdempotencyStore` keeps it in the primary database."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.calls: Counter[str] = Counter()
        self.down = False  # the database does not answer: nothing is sent
        self._lsn = itertools.count(0x1000, 0x10)
        self.owner = None  # no liveness lock: claims of a dead process wait for staleness
        self.nonces: dict[str, float] = {}  # recorded nonce -> when it expires (monotonic)

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.down:
            raise IdempotencyUnavailable("the primary database does not answer", sent=False)

    def _position(self) -> str:
        return f"0/{next(self._lsn):X}"

    def _nonce_is_new(self, nonce) -> bool:
        now = time.monotonic()
        if self.nonces.get(nonce.name, now) > now:
            return False
        self.nonces[nonce.name] = now + nonce.ttl_s
        return True

    async def record_nonce(self, nonce, *, timeout_s=None) -> bool:
        self._call("record_nonce")
        return self._nonce_is_new(nonce)

    async def begin(
        self, key, request_hash, stale_after_s=30.0, *, not_after=None, timeout_s=None, nonce=None
    ):
        self._call("begin")
        if nonce is not None and not self._nonce_is_new(nonce):  # recorded in the claim's statement
            raise NonceUsed(f"nonce {nonce.name!r} was recorded before")
        if not_after is not None and time.time() > not_after:
            raise ClaimTooLate(f"idempotency key {key!r}: the claim came after its deadline")
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = Row(request_hash, datetime.now(UTC))
            return Claim(Outcome.NEW, key, started_at=row.started_at)
        if row.request_hash != request_hash:
            return Claim(Outcome.MISMATCH, key)
        if row.state == "completed":
            return Claim(
                Outcome.REPLAY,
                key,
                status=row.status,
                headers=list(row.headers),
                body=row.body,
                position=self._position(),
            )
        return Claim(Outcome.IN_PROGRESS, key, started_at=row.started_at)

    async def complete_at_position(self, key, status, headers, body, *, claim=None, timeout_s=None):
        self._call("complete")
        row = self.rows.get(key)
        if row is None or row.state != "running":
            return False, self._position()
        if claim is not None and claim.started_at != row.started_at:
            return False, self._position()
        self._store(row, status, headers, body)
        return True, self._position()

    @staticmethod
    def _store(row: Row, status, headers, body) -> None:
        row.state, row.status, row.body = "completed", int(status), bytes(body)
        row.headers = [
            (
                k.decode("latin-1") if isinstance(k, bytes) else k,
                v.decode("latin-1") if isinstance(v, bytes) else v,
            )
            for k, v in headers
        ]

    def claim_in_transaction(self, pending) -> bool:
        """What `claim_statement` does as the first statement of an app's transaction (a fake
        app calls it): the key becomes the run's, or is found anyone else's. Not a call of the
        gateway's: it is the app's own statement."""
        self.calls["claim_in_transaction"] += 1
        row = self.rows.get(pending.key)
        if row is None:
            row = Row(pending.request_hash, datetime.now(UTC), applied=True, runner=pending.runner)
            self.rows[pending.key] = row
            return True
        mine = row.runner == pending.runner
        return row.state == "running" and row.request_hash == pending.request_hash and mine

    async def complete_run(
        self, key, request_hash, runner, status, headers, body, *, timeout_s=None
    ):
        self._call("complete_run")
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = Row(request_hash, datetime.now(UTC), runner=runner)
        elif row.runner != runner or row.state != "running":
            return False, self._position()
        self._store(row, status, headers, body)
        return True, self._position()

    async def settle_run(self, key, runner, *, timeout_s=None) -> bool:
        self._call("settle_run")
        row = self.rows.get(key)
        if row is None or row.runner != runner or row.state != "running":
            return False
        self._store(row, LOST_ANSWER_STATUS, LOST_ANSWER_HEADERS, LOST_ANSWER_BODY)
        return True

    async def abandon(self, key, *, claim=None, timeout_s=None) -> bool:
        self._call("abandon")
        row = self.rows.get(key)
        if row is None or row.state != "running":
            return False
        if claim is not None and claim.started_at != row.started_at:
            return False
        del self.rows[key]
        return True

    async def position(self, timeout_s=None) -> str:
        self._call("position")
        return self._position()

    async def ping(self, timeout_s=None) -> None:
        self._call("ping")

    async def ensure_schema(self) -> None:
        pass

    async def purge_periodically(self, retention_s=0, every_s=0, on_error=None) -> None:
        await asyncio.Event().wait()  # nothing to purge in memory: idle until cancelled

    async def close(self) -> None:
        pass


class MemoryReplayWatcher:
    """How far the local replica has replayed, set by the test (`ReplayWatcher` asks the
    replica database)."""

    def __init__(self, replayed: str = "0/0") -> None:
        from latitude.consistency import ReplicationPosition

        self._parse = ReplicationPosition.parse
        self.replayed = self._parse(replayed)
        self._moved = asyncio.Event()

    timeline = None

    def note_timeline(self, timeline: int | None) -> None:
        self.timeline = timeline

    def replay_to(self, position: str) -> None:
        self.replayed = self._parse(position)
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait_for(self, target, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.replayed < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._moved.wait(), left)
            except TimeoutError:
                return False
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class ASGIForwarding:
    """The way to the primary, delivered in process into the primary's gateway (an ASGI app),
    as httpx's ASGITransport does. `script` decides what each next attempt meets: None
    delivers it; `"refused"` raises `NotSent`; `"lost"` delivers it and loses the answer
    (`NoAnswer`, the request ran); `"dropped"` loses it before delivery (`NoAnswer`);
    `"stalled"` gives no answer until the attempt's time is up; `"broken"` fails as a bug in
    the client would (RuntimeError, before delivery). `one_way_s` is the link's
    delay each way; an answer that comes after the attempt's time is up is `NoAnswer`, as the
    real clients have it."""

    def __init__(self, app, base_url: str = "http://us-west.internal") -> None:
        self.app = app
        self.base_url = base_url
        self.one_way_s = 0.0
        self.script: list[str | None] = []
        self.reachable = True
        self.sent: list[dict] = []  # what each delivered attempt carried (scope and body)

    async def send(
        self, method, path_and_query, headers, body, *, timeout_s, fresh_connection=False
    ):
        what = self.script.pop(0) if self.script else None
        if what == "refused" or not self.reachable:
            raise NotSent(f"cannot connect to the primary at {self.base_url}")
        if what == "broken":
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        data = b""
        if isinstance(body, bytes):
            data = body
        elif body is not None:
            data = b"".join([chunk async for chunk in body])
        if what == "dropped":
            raise NoAnswer("the connection to the primary failed mid-request")
        if what == "stalled":  # a connection over a cut link: no error, no answer
            await asyncio.sleep(timeout_s)
            raise NoAnswer(f"no answer from the primary within {timeout_s:.2f} s")
        path, _, query = path_and_query.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": [(b"host", self.base_url.split("://", 1)[1].encode()), *headers],
            "client": ("10.0.0.2", 40000),
            "server": ("10.0.0.1", 80),
        }
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(self.one_way_s)
        self.sent.append({"scope": scope, "body": data})
        answer = await call(self.app, scope, data)
        await asyncio.sleep(self.one_way_s)
        if asyncio.get_running_loop().time() - started > timeout_s:
            raise NoAnswer(f"no answer from the primary within {timeout_s:.2f} s")
        if what == "lost":
            raise NoAnswer("no answer from the primary")
        return ForwardedResponse(
            answer.status, [(k.lower(), v) for k, v in answer.headers], answer.body
        )

    async def can_connect(self, timeout_s=None) -> bool:
        return self.reachable

    async def warm(self) -> int:
        return 0

    async def keep_full(self) -> None:
        return None  # nothing to keep: the primary is in process

    def pool_info(self) -> dict:
        return {"pooling": True, "idle_connections": 0}

    async def close(self) -> None:
        pass


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> str | None:
        return next((v.decode("latin-1") for k, v in self.headers if k == name), None)


async def call(app, scope: dict, body: bytes = b"") -> Answer:
    """Run one request through an ASGI app and collect its answer."""
    given = False
    answer = Answer(500, [], b"")
    done = asyncio.Event()

    async def receive() -> dict:
        nonlocal given
        if given:
            await done.wait()
            return {"type": "http.disconnect"}
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    done.set()
    return answer

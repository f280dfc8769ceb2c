"""Two regions' gateways in one process: us-west (primary) and eu-west, joined by an
in-process `Forwarding` and sharing one in-memory outcome table (the primary database's).
No database, no Valkey, no sockets: every test here runs in milliseconds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from latitude.db import ClaimInTransaction, ClaimRefused, current_claim
from latitude.gateway.config import GatewayConfig
from latitude.gateway.middleware import RegionGateway
from latitude.sessions import MemorySessionStore, SessionMiddleware
from latitude.topology import parse_topology
from tests.unit.fakes import ASGIForwarding, MemoryOutcomeStore, MemoryReplayWatcher, call

TOPOLOGY = """
[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.2]
public_url = "https://us-west.example.com"
internal_url = "http://us-west.internal"
database_url = "postgresql://app@db.us-west.internal/app"
session_store_url = "memory://"

[[regions]]
name = "eu-west"
location = [53.3, -6.3]
public_url = "https://eu-west.example.com"
internal_url = "http://eu-west.internal"
database_url = "postgresql://app@db.eu-west.internal/app"
session_store_url = "memory://"

[signing]
keys = [{ id = "k1", env = "UNIT_KEY" }]

[gateway]
deadline_s = 0.5
session_limit_bytes = 4096

[routes]
always_forward = ["/auth/*"]
local = ["/search"]
"""


@dataclass
class Database:
    """What the app keeps: shared by both regions (a replica that is never behind)."""

    events: dict[int, str] = field(default_factory=dict)
    runs: int = 0  # how many times a write ran: exactly-once is counted here
    outcomes: MemoryOutcomeStore | None = None

    def begin(self) -> None:
        """A transaction opens: what `latitude.db` does first inside a request whose claim is
        made in the app's transaction (`idempotency_claim = "in_transaction"`)."""
        pending = current_claim.get()
        if not isinstance(pending, ClaimInTransaction) or self.outcomes is None:
            return
        if not pending.refused and self.outcomes.claim_in_transaction(pending):
            pending.taken = True
            return
        pending.refused = True
        raise ClaimRefused(pending.key)


def calendar_app(db: Database):
    """A tiny app: events, sign-in (a server-side session), and what it was told."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, path, session = scope["method"], scope["path"], scope["session"]
        status, data = 200, {}
        if method == "POST" and path == "/events":
            db.begin()
            db.runs += 1
            event_id = len(db.events) + 1
            db.events[event_id] = json.loads(body or b"{}").get("title", "")
            status, data = 201, {"id": event_id, "by": session.get("user")}
        elif method == "GET" and path.startswith("/events/"):
            title = db.events.get(int(path.rsplit("/", 1)[1]))
            status, data = (200, {"title": title}) if title is not None else (404, {})
        elif method == "POST" and path == "/login":
            db.runs += 1
            session["user"] = json.loads(body)["name"]
        elif method == "POST" and path == "/logout":
            session.clear()
        elif method == "POST" and path == "/grow":
            session["blob"] = "x" * 10_000  # past session_limit_bytes
        elif path == "/boom":  # any method: a GET of it is served where it is asked
            raise RuntimeError("the app failed")
        elif method == "POST" and path == "/write-then-boom":
            db.begin()
            db.runs += 1
            raise RuntimeError("the app failed after its commit")
        elif method == "POST" and path == "/events/rendered":
            try:  # an app that renders its own page for a failed transaction
                db.begin()
                db.runs += 1
                status, data = 201, {"rendered": "created"}
            except ClaimRefused:
                status, data = 500, {"rendered": "sorry"}
        elif path == "/me":
            data = {"user": session.get("user")}
        elif path == "/seen":
            data = {
                "client": scope["client"][0],
                "scheme": scope["scheme"],
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "body": body.decode(),
            }
        else:
            status = 404
        payload = json.dumps(data).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


class Regions:
    """The two gateways and what they stand on."""

    def __init__(self, **gateway: object) -> None:
        environ = {"UNIT_KEY": "unit-test-secret-of-enough-length"}
        topology = parse_topology(TOPOLOGY, environ=environ)
        self.outcomes = MemoryOutcomeStore()
        self.db = Database(outcomes=self.outcomes)
        self.sessions = {"us-west": MemorySessionStore(), "eu-west": MemorySessionStore()}

        def gateway_for(region: str, **parts) -> RegionGateway:
            config = GatewayConfig.from_topology(topology, region, environ=environ, **gateway)
            app = SessionMiddleware(calendar_app(self.db), self.sessions[region])
            return RegionGateway(app, config, session_store=self.sessions[region], **parts)

        self.primary = gateway_for("us-west", idempotency=self.outcomes)
        self.link = ASGIForwarding(self.primary)
        self.watcher = MemoryReplayWatcher()
        self.replica = gateway_for(
            "eu-west",
            forwarding=self.link,
            fallback_store=self.outcomes,
            replay_watcher=self.watcher,
        )
        self.cookies: dict[str, str] = {}

    async def start(self) -> None:
        await self.primary.startup()
        await self.replica.startup()

    async def stop(self) -> None:
        await self.replica.shutdown()
        await self.primary.shutdown()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | dict = b"",
        *,
        region: str = "eu-west",
        headers: list[tuple[bytes, bytes]] = (),
        keep_cookies: bool = True,
    ):
        """One request from a user next to `region`, keeping cookies as a browser does."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        path, _, query = path.partition("?")
        sent = [(b"host", f"{region}.example.com".encode())]
        if not any(k == b"accept" for k, _ in headers):
            sent.append((b"accept", b"application/json"))
        if self.cookies and keep_cookies:
            jar = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            sent.append((b"cookie", jar.encode()))
        sent += list(headers)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "https",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": sent,
            "client": ("198.51.100.7", 51000),
            "server": ("127.0.0.1", 443),
        }
        gateway = self.primary if region == "us-west" else self.replica
        answer = await call(gateway, scope, body)
        for k, v in answer.headers:
            if k == b"set-cookie" and keep_cookies:
                name, _, rest = v.decode().partition("=")
                value = rest.split(";", 1)[0]
                if "Max-Age=0" in v.decode():
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
        return answer


@pytest.fixture
async def regions():
    world = Regions()
    await world.start()
    try:
        yield world
    finally:
        await world.stop()


@pytest.fixture
def make_regions():
    """Regions with other `[gateway]` settings; the test starts and stops them."""
    return Regions

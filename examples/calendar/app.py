"""A team calendar, like the SaaS the multi-region design comes from.

It is an ordinary Starlette app: server-side sessions in the region's Valkey, SQL through
SQLAlchemy. Latitude's gateway in front of it decides where each request runs; `latitude.db`
sends its SQL to the local replica or to the primary accordingly. Nothing here knows regions.

Run it behind the gateway: `latitude serve --region eu-west examples.calendar.app:app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.calendar import pages, tasks
from latitude.db import AsyncRoutedEngines
from latitude.sessions import SessionMiddleware, session_store_from_url
from latitude.topology import load_topology

SCHEMA = """
create table if not exists teams (
    id serial primary key, name text unique not null, event_count int not null default 0,
    last_activity timestamptz);
create table if not exists users (
    id serial primary key, name text unique not null, logins int not null default 0);
create table if not exists memberships (
    user_id int references users(id), team_id int references teams(id), role text not null,
    primary key (user_id, team_id));
create table if not exists events (
    id serial primary key, team_id int references teams(id), title text not null,
    starts_at timestamptz not null, created_by int references users(id),
    created_at timestamptz not null default now(), client_ip text);
create table if not exists audit (
    id bigserial primary key, user_id int, action text not null, event_id int,
    at timestamptz not null default now());
create table if not exists user_stats (
    user_id int primary key references users(id), events_created int not null default 0);
"""

TEAM = "core"


def _region() -> tuple[object, str]:
    topology = load_topology(os.environ["LATITUDE_TOPOLOGY"])
    return topology, os.environ["LATITUDE_REGION"]


topology, region_name = _region()
region = topology.region(region_name)
# CALENDAR_PRIMARY_POOL=none: a new connection to the primary database for every transaction,
# as the naive layout (`naive.py`) of the demo runs it.
_unpooled = os.environ.get("CALENDAR_PRIMARY_POOL") == "none"


def _pool_size() -> dict:
    """CALENDAR_POOL_SIZE=N: N pooled connections per database and no overflow, for as many
    clients at once (a benchmark's). SQLAlchemy's default (5, and 10 more opened and closed
    again as needed) makes every request past five at a time pay for a new connection: the
    database's cost, which drowns the one a benchmark measures."""
    value = os.environ.get("CALENDAR_POOL_SIZE")
    if value is None:
        return {}
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"CALENDAR_POOL_SIZE must be a whole number of connections, not {value!r}")
    return {"pool_size": int(value), "max_overflow": 0}


# Pinged before use: a promotion restarts databases, and a dead pooled connection must not fail
# the request that draws it.
engines = AsyncRoutedEngines.from_topology(
    topology,
    region_name,
    pool_pre_ping=True,
    primary_engine_kwargs={"poolclass": NullPool, "pool_pre_ping": False} if _unpooled else None,
    **({} if _unpooled else _pool_size()),
)


def current_user(request: Request) -> dict | None:
    return request.session.get("user")


def page(request: Request, name: str, status: int = 200, **ctx) -> Response:
    team = (current_user(request) or {}).get("team", TEAM)
    return pages.render(
        request, name, region=region_name, topology=topology, team=team, status=status, **ctx
    )


def refuse(request: Request, status: int, message: str) -> Response:
    """An error as a page for a browser, as JSON for a script."""
    if pages.wants_page(request):
        if status == 401:
            return page(request, "index.html", status, error=message, events=[])
        return page(request, "message.html", status, heading="That did not work", detail=message)
    return JSONResponse({"error": message}, status_code=status)


async def form_payload(request: Request) -> dict | Response:
    """The request's fields; a form post must carry its session's CSRF token."""
    data = await _payload(request)
    if pages.is_form(request) and not pages.csrf_ok(request, data):
        return refuse(
            request, 403, "this form has expired or came from another site; reload the page"
        )
    return data


async def login(request: Request) -> Response:
    form = await form_payload(request)
    if isinstance(form, Response):
        return form
    name = str(form.get("name", "")).strip()
    if not name or len(name) > 64:
        return refuse(request, 400, "give a name of 1 to 64 characters")
    team = str(form.get("team") or TEAM).strip()  # the team to join: everyone's by default
    if not team or len(team) > 64:
        return refuse(request, 400, "give a team name of 1 to 64 characters, or none")
    async with engines.engine().begin() as db:
        user_id = (
            await db.execute(
                text(
                    "insert into users (name, logins) values (:n, 1) on conflict (name)"
                    " do update set logins = users.logins + 1 returning id"
                ),
                {"n": name},
            )
        ).scalar_one()
        # Not an upsert that "updates" the name to get the id back: that takes the team row
        # FOR UPDATE, which waits until no event insert holds the row's foreign-key share lock,
        # and with writers creating events all the time a login starved for seconds (CI: 504).
        team_id = (
            await db.execute(
                text(
                    "insert into teams (name) values (:t) on conflict (name) do nothing returning id"
                ),
                {"t": team},
            )
        ).scalar_one_or_none() or (
            await db.execute(text("select id from teams where name = :t"), {"t": team})
        ).scalar_one()
        await db.execute(
            text(
                "insert into memberships (user_id, team_id, role) values (:u, :t, 'member')"
                " on conflict do nothing"
            ),
            {"u": user_id, "t": team_id},
        )
        await db.execute(
            text("insert into audit (user_id, action) values (:u, 'login')"), {"u": user_id}
        )
    request.session["user"] = {"id": user_id, "name": name, "team_id": team_id, "team": team}
    request.session["flash"] = f"Welcome, {name}"
    if pages.is_form(request):
        return pages.see_other("/")
    return JSONResponse({"user": request.session["user"]})


async def logout(request: Request) -> Response:
    form = await form_payload(request)
    if isinstance(form, Response):
        return form
    request.session.clear()
    if pages.is_form(request):
        return pages.see_other("/")
    return JSONResponse({"ok": True})


async def me(request: Request) -> Response:
    flash = request.session.pop("flash", None)
    return JSONResponse(
        {
            "user": current_user(request),
            "flash": flash,
            "region": region_name,
            "client_ip": request.client.host if request.client else None,
            "session_bytes": len(str(request.session)),
        }
    )


async def list_events(request: Request) -> Response:
    user = current_user(request)
    if not user and pages.wants_page(request):
        return page(request, "index.html", events=[])
    if not user:
        return JSONResponse({"error": "sign in first: POST /login"}, status_code=401)
    async with engines.engine().connect() as db:
        rows = (
            (
                await db.execute(
                    text(
                        "select id, title, starts_at, created_by from events where team_id = :t order by starts_at, id"
                    ),
                    {"t": user["team_id"]},
                )
            )
            .mappings()
            .all()
        )
    if pages.wants_page(request):
        return page(request, "index.html", events=[pages.event_view(r) for r in rows])
    events = [{**r, "starts_at": r["starts_at"].isoformat()} for r in rows]
    return JSONResponse({"region": region_name, "events": events})


async def get_event(request: Request) -> Response:
    async with engines.engine().connect() as db:
        row = (
            (
                await db.execute(
                    text("select id, title, starts_at from events where id = :i"),
                    {"i": int(request.path_params["id"])},
                )
            )
            .mappings()
            .first()
        )
    if row is None:
        return refuse(request, 404, "no such event")
    if pages.wants_page(request):
        if not current_user(request):
            return refuse(request, 401, "sign in first")
        return page(request, "event.html", event=pages.event_view(row))
    return JSONResponse({**row, "starts_at": row["starts_at"].isoformat()})


async def create_event(request: Request) -> Response:
    user = current_user(request)
    if not user:
        return refuse(request, 401, "sign in first: POST /login")
    data = await form_payload(request)
    if isinstance(data, Response):
        return data
    title = str(data.get("title", "")).strip()
    if not title:
        return refuse(request, 400, "an event needs a title")
    try:
        starts_at = _starts_at(data.get("starts_at")) or datetime.now(UTC)
    except ValueError:
        return refuse(request, 400, "starts_at must be an ISO 8601 time, e.g. 2026-12-01T10:00")
    # Realistic work, as in the original app: eight statements in one transaction.
    async with engines.engine().begin() as db:
        member = (
            await db.execute(
                text("select role from memberships where user_id = :u and team_id = :t"),
                {"u": user["id"], "t": user["team_id"]},
            )
        ).first()
        if member is None:
            return refuse(request, 403, "not a member of this team")
        await db.execute(text("select id from users where id = :u for share"), {"u": user["id"]})
        clashes = (
            await db.execute(
                text("select count(*) from events where team_id = :t and starts_at = :s"),
                {"t": user["team_id"], "s": starts_at},
            )
        ).scalar_one()
        event_id = (
            await db.execute(
                text(
                    "insert into events (team_id, title, starts_at, created_by, client_ip)"
                    " values (:t, :title, :s, :u, :ip) returning id"
                ),
                {
                    "t": user["team_id"],
                    "title": title,
                    "s": starts_at,
                    "u": user["id"],
                    "ip": request.client.host if request.client else None,
                },
            )
        ).scalar_one()
        await db.execute(
            text("insert into audit (user_id, action, event_id) values (:u, 'create', :e)"),
            {"u": user["id"], "e": event_id},
        )
        await db.execute(
            text("update teams set event_count = event_count + 1 where id = :t"),
            {"t": user["team_id"]},
        )
        await db.execute(
            text(
                "insert into user_stats (user_id, events_created) values (:u, 1) on conflict (user_id)"
                " do update set events_created = user_stats.events_created + 1"
            ),
            {"u": user["id"]},
        )
        await db.execute(
            text("update teams set last_activity = now() where id = :t"), {"t": user["team_id"]}
        )
        await tasks.remind_in(db, event_id, title)  # a job, committed with the event
    request.session["flash"] = f"Created {title!r}" + (
        " (clashes with another event)" if clashes else ""
    )
    if pages.is_form(request):
        return pages.see_other("/")
    return JSONResponse({"id": event_id, "title": title, "region": region_name}, status_code=201)


async def edit_event(request: Request) -> Response:
    user = current_user(request)
    if not user:
        return refuse(request, 401, "sign in first: POST /login")
    data = await form_payload(request)
    if isinstance(data, Response):
        return data
    event_id = int(request.path_params["id"])
    title = str(data.get("title", "")).strip()
    if pages.is_form(request) and not title:
        return refuse(request, 400, "an event needs a title")
    try:
        starts_at = _starts_at(data.get("starts_at"))
    except ValueError:
        return refuse(request, 400, "starts_at must be an ISO 8601 time, e.g. 2026-12-01T10:00")
    async with engines.engine().begin() as db:
        updated = (
            await db.execute(
                text(
                    "update events set title = :title, starts_at = coalesce(:s, starts_at)"
                    " where id = :i and team_id = :t returning id"
                ),
                {"title": title, "s": starts_at, "i": event_id, "t": user["team_id"]},
            )
        ).first()
        if updated:
            await db.execute(
                text("insert into audit (user_id, action, event_id) values (:u, 'edit', :e)"),
                {"u": user["id"], "e": event_id},
            )
    if pages.is_form(request):
        if not updated:
            return refuse(request, 404, "no such event")
        request.session["flash"] = f"Saved {title!r}"
        return pages.see_other("/")
    return JSONResponse(
        {"id": event_id} if updated else {"error": "no such event"},
        status_code=200 if updated else 404,
    )


async def delete_event(request: Request) -> Response:
    user = current_user(request)
    if not user:
        return refuse(request, 401, "sign in first: POST /login")
    data = await form_payload(request)
    if isinstance(data, Response):
        return data
    event_id = int(request.path_params["id"])
    async with engines.engine().begin() as db:
        deleted = (
            await db.execute(
                text("delete from events where id = :i and team_id = :t returning id"),
                {"i": event_id, "t": user["team_id"]},
            )
        ).first()
        if deleted:
            await db.execute(
                text("update teams set event_count = event_count - 1 where id = :t"),
                {"t": user["team_id"]},
            )
            await db.execute(
                text("insert into audit (user_id, action, event_id) values (:u, 'delete', :e)"),
                {"u": user["id"], "e": event_id},
            )
    if pages.is_form(request):
        if not deleted:
            return refuse(request, 404, "no such event")
        request.session["flash"] = "Deleted the event"
        return pages.see_other("/")
    return Response(status_code=204 if deleted else 404)


async def save_notes(request: Request) -> Response:
    """Keep arbitrary notes in the session (sessions of tens of KiB exist in real apps)."""
    data = await _payload(request)
    request.session["notes"] = str(data.get("notes", ""))
    return JSONResponse({"notes_bytes": len(request.session["notes"])})


async def upload(request: Request) -> Response:
    """An attachment upload: answers with what arrived (its size and sha256), streamed."""
    digest, size = hashlib.sha256(), 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse(
        {"bytes": size, "sha256": digest.hexdigest(), "region": region_name}, status_code=201
    )


async def auth_callback(request: Request) -> Response:
    """A GET that writes (an OAuth-style callback): listed `always_forward` in the topology."""
    async with engines.engine().begin() as db:
        await db.execute(text("insert into audit (action) values ('auth-callback')"))
    return JSONResponse({"ok": True, "region": region_name})


def _starts_at(value) -> datetime | None:
    """An ISO 8601 time; one without a zone (a browser's datetime-local) is UTC."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def _payload(request: Request) -> dict:
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = await request.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
    return dict(await request.form())


async def _writable(engine) -> bool:
    """False at an old primary revived after a failover: fenced read-only (latitude.promotion)."""
    async with engine.connect() as db:
        return (await db.execute(text("show transaction_read_only"))).scalar_one() == "off"


@contextlib.asynccontextmanager
async def lifespan(app):
    if region.primary and await _writable(engines.primary):
        async with engines.primary.begin() as db:
            await db.execute(text("select pg_advisory_xact_lock(4242)"))
            for statement in filter(str.strip, SCHEMA.split(";")):
                await db.execute(text(statement))
        await tasks.prepare(engines.primary)  # the job queue's tables, before any request
    else:
        # A fallback write (the primary's gateway unreachable) must fit the gateway's deadline:
        # its connections to the primary database over the ocean are made now, not then.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engines.warm(2), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tasks.warm(engines.primary), 5)
    yield
    await engines.dispose()
    await sessions.close()


sessions = session_store_from_url(region.session_store_url, key_template="latitude:session:{sid}")
app = SessionMiddleware(
    Starlette(
        routes=[
            Route("/", list_events),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/me", me),
            Route("/events", list_events),
            Route("/events", create_event, methods=["POST"]),
            Route("/events/{id:int}", get_event),
            Route("/events/{id:int}", edit_event, methods=["PUT", "PATCH", "POST"]),
            Route("/events/{id:int}", delete_event, methods=["DELETE"]),
            Route("/events/{id:int}/delete", delete_event, methods=["POST"]),
            Route("/notes", save_notes, methods=["POST"]),
            Route("/attachments", upload, methods=["POST"]),
            Route("/auth/callback", auth_callback),
        ],
        lifespan=lifespan,
    ),
    store=sessions,
)

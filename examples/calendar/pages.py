"""The calendar's HTML side: Jinja2 templates (autoescaped: an event title is text, never
markup), a CSRF token per session for forms, and the line every page ends with saying where it
was served and what it cost, from what Latitude's gateway tells the app:

* `latitude.db.current_route`: "replica" (a local read) or "primary";
* the request's note (`scope["latitude.note"]`, from `latitude.gateway.observe`): when the
  request arrived, which region is primary and whether it answers, the replica's lag;
* the `latitude_last_write` cookie the gateway sets on a browser's write: where it ran and how
  long it took, shown on the next page.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from latitude import db

NOTE = "latitude.note"
LAST_WRITE_COOKIE = "latitude_last_write"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def is_form(request: Request) -> bool:
    """A browser's form post (answered with pages and redirects); JSON bodies get JSON."""
    return request.headers.get("content-type", "").startswith(FORM_TYPES)


def wants_page(request: Request) -> bool:
    if request.method in ("GET", "HEAD"):
        return "text/html" in request.headers.get("accept", "")
    return is_form(request)


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return token


def csrf_ok(request: Request, form: dict) -> bool:
    """A form post must carry its session's token: another site's form cannot know it."""
    token = request.session.get("csrf")
    return bool(token) and secrets.compare_digest(str(form.get("csrf", "")), token)


def _ms_since_arrival(note: dict) -> float | None:
    started = note.get("started")
    return None if started is None else (time.perf_counter() - started) * 1000


def served_line(request: Request, region: str) -> str:
    """'read in eu-west from its replica, 3 ms (replica 40 ms behind)' and the like."""
    note = request.scope.get(NOTE) or {}
    ms = _ms_since_arrival(note)
    took = f"{ms:.0f} ms" if ms is not None else "time unknown (no Latitude gateway in front)"
    route = db.current_route.get()
    primary = note.get("primary")
    if request.method not in ("GET", "HEAD"):
        return f"answered in {region} (on its {route} database), {took}"
    if route == db.REPLICA:
        lag = note.get("replica_lag_s")
        behind = (
            "replica lag not yet sampled" if lag is None else f"replica {lag * 1000:.0f} ms behind"
        )
        waited = (note.get("read_wait_s") or 0) * 1000
        if waited >= 1:
            behind += f"; {waited:.0f} ms of it waiting for the replica to replay your last write"
        return f"read in {region} from its replica, {took} ({behind})"
    if primary and primary != region:
        return f"read in {region} from the primary database in {primary} over the ocean, {took}"
    return f"read in {region} from the primary database, {took}"


def last_write_line(request: Request, region: str, topology) -> str | None:
    """'your write went to us-west: 131 ms, one ocean round trip', from the gateway's cookie."""
    raw = request.cookies.get(LAST_WRITE_COOKIE)
    if not raw:
        return None
    try:
        ran_in, ms_text, outcome, *rest = raw.split(":")
        ms = float(ms_text)
        # The primary's own work (its gateway's Server-Timing): the rest is the ocean.
        at_primary = float(rest[0]) if rest else 0.0
        topology.region(ran_in)
    except (ValueError, KeyError):
        return None
    rtt = topology.rtt_ms(region, ran_in) if ran_in != region else 0.0
    if outcome == "read_only":
        return f"your change was not saved: the primary region does not answer ({ms:.0f} ms)"
    if outcome == "fallback":
        primary = topology.primary.name
        rtt = topology.rtt_ms(region, primary)
        trips = max(1, round(ms / rtt)) if rtt else 0
        return (
            f"your write ran here in {region} with its SQL sent to {primary}: {ms:.0f} ms, "
            f"{_trips(trips)} (the primary's gateway did not answer)"
        )
    if not rtt:
        return f"your write ran here in {ran_in}: {ms:.0f} ms, no ocean crossed"
    # Each trip costs at least the RTT (less a little jitter); what is left over is this
    # region's own work (a busy host's), not part of another trip.
    trips = max(1, int((ms - at_primary) / (0.9 * rtt)))
    work = f" ({at_primary:.0f} ms of it at the primary)" if at_primary >= 1 else ""
    return f"your write went to {ran_in}: {ms:.0f} ms, {_trips(trips)}{work}"


def _trips(n: int) -> str:
    word = NUMBERS.get(n, str(n))
    return f"{word} ocean round trip" + ("" if n == 1 else "s")


def render(
    request: Request, name: str, *, region: str, topology, team: str, status: int = 200, **ctx
) -> Response:
    note = request.scope.get(NOTE) or {}
    last_write = last_write_line(request, region, topology)
    page = templates.get_template(name).render(
        region=region,
        team=team,
        primary=topology.primary.name,
        user=request.session.get("user"),
        csrf=csrf_token(request),
        flash=request.session.pop("flash", None),
        error=ctx.pop("error", None),
        # Writes still work, slowly, while the primary's database answers (the gateway runs
        # them here): read-only only when neither does.
        read_only=note.get("primary_up") is False and note.get("primary_db_up") is not True,
        slow_writes=note.get("primary_up") is False and note.get("primary_db_up") is True,
        last_write=last_write,
        served=served_line(request, region),
        **ctx,
    )
    response = HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})
    if last_write is not None:
        response.delete_cookie(LAST_WRITE_COOKIE, path="/")
    return response


def see_other(path: str = "/") -> Response:
    return RedirectResponse(path, status_code=303)


def event_view(row) -> dict:
    starts: datetime = row["starts_at"]
    starts = starts.astimezone(UTC) if starts.tzinfo else starts
    return {
        "id": row["id"],
        "title": row["title"],
        "starts_at": starts.isoformat(),
        "starts_at_text": starts.strftime("%a %d %b %Y, %H:%M UTC"),
        "starts_at_local": starts.strftime("%Y-%m-%dT%H:%M"),
    }

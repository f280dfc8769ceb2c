"""Database routing for SQLAlchemy (sync and async) and Django, against the lab's real primary
(us-west) and its streaming replica in eu-west, the primary reached through the emulated link."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from latitude.consistency import (
    ReplayWatcher,
    ReplicationPosition,
    primary_position,
    primary_position_async,
)
from latitude.db import (
    AsyncRoutedEngines,
    LatitudeRouter,
    RoutedEngines,
    StrictLatitudeRouter,
    WriteOnReplicaError,
    current_route,
    database_urls,
    django_database,
    django_databases,
    is_read_only_error,
    request_context,
    route_to_primary,
    route_to_replica,
    sqlalchemy_url,
)
from latitude.topology import load_topology, parse_topology

TABLE = "db_probe"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "django_app"

# ---- units ---------------------------------------------------------------------------------


def test_sqlalchemy_url_uses_psycopg3():
    assert sqlalchemy_url("postgresql://a@h:5/db") == "postgresql+psycopg://a@h:5/db"
    assert sqlalchemy_url("postgres://a:b@h/db?sslmode=require") == (
        "postgresql+psycopg://a:b@h/db?sslmode=require"
    )
    assert sqlalchemy_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    with pytest.raises(ValueError, match="not a Postgres URL"):
        sqlalchemy_url("mysql://h/db")
    with pytest.raises(ValueError, match="not a database URL"):
        sqlalchemy_url("just-a-host")


def test_django_database_parses_the_url():
    entry = django_database("postgresql://app:p%40ss@db.internal:6543/cal?sslmode=require")
    assert entry["ENGINE"] == "django.db.backends.postgresql"
    assert (entry["NAME"], entry["USER"], entry["PASSWORD"]) == ("cal", "app", "p@ss")
    assert (entry["HOST"], entry["PORT"]) == ("db.internal", "6543")
    assert entry["OPTIONS"] == {"sslmode": "require"}
    assert entry["CONN_HEALTH_CHECKS"] is True
    socket_entry = django_database("postgresql:///cal?host=/run/postgresql")
    assert (socket_entry["HOST"], socket_entry["PORT"]) == ("/run/postgresql", "")
    with pytest.raises(ValueError, match="names no database"):
        django_database("postgresql://h:5432/")
    with pytest.raises(ValueError, match="not a Postgres URL"):
        django_database("redis://h/0")


TOPOLOGY = """
[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.2]
database_url = "postgresql://app@us.internal/cal"

[[regions]]
name = "eu-west"
location = [53.3, -6.3]
database_url = "postgresql://app@eu.internal/cal"

[[regions]]
name = "ap-southeast"
location = [1.3, 103.8]
database_url = "postgresql://app@ap.internal/cal"
primary_database_url = "postgresql://app@us-via-vpn.internal/cal"

[lab]
"""


def test_urls_and_settings_from_topology():
    topology = parse_topology(TOPOLOGY)
    us, eu = "postgresql://app@us.internal/cal", "postgresql://app@eu.internal/cal"
    assert database_urls(topology, "us-west") == (us, us)
    assert database_urls(topology, "eu-west") == (eu, us)  # defaults to the primary's URL
    assert database_urls(topology, "ap-southeast")[1] == "postgresql://app@us-via-vpn.internal/cal"
    settings = django_databases(topology, "eu-west")
    assert settings["default"]["HOST"] == "us.internal"
    assert settings["replica"]["HOST"] == "eu.internal"
    assert settings["replica"]["TEST"] == {"MIRROR": "default"}
    with pytest.raises(KeyError, match="no region named 'mars'"):
        database_urls(topology, "mars")


def test_the_router_follows_the_route():
    router, strict = (
        LatitudeRouter.__new__(LatitudeRouter),
        StrictLatitudeRouter.__new__(StrictLatitudeRouter),
    )  # without __init__: no Django needed for the decisions themselves
    assert router.db_for_read(None) == "replica" and router.db_for_write(None) == "default"
    assert strict.db_for_write(None) == "replica"
    with route_to_primary():
        assert router.db_for_read(None) == "default" and strict.db_for_write(None) == "default"
    assert router.allow_migrate("default", "events") and not router.allow_migrate("replica", "x")
    assert router.allow_relation(object(), object())


def test_read_only_error_is_recognised_through_wrappers():
    class PgError(Exception):
        sqlstate = "25006"

    class Wrapped(Exception):
        pass

    inner = PgError("cannot execute INSERT in a read-only transaction")
    outer = Wrapped("wrapped")
    outer.__cause__ = inner
    assert is_read_only_error(inner) and is_read_only_error(outer)
    assert not is_read_only_error(ValueError("x")) and not is_read_only_error(None)


# ---- against the lab -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(world):
    """The world as eu-west's processes see it: local replica, primary across the link."""
    regions = {r["name"]: r for r in world.status()["regions"]}
    env = world.region_env("eu-west")
    topology = load_topology(regions["eu-west"]["topology_file"], environ=env)
    primary_direct = regions["us-west"]["database_url"]
    with psycopg.connect(primary_direct, autocommit=True) as c:
        c.execute(f"create table if not exists {TABLE} (id serial primary key, note text)")
        position = primary_position(c)
    wait_replayed(regions["eu-west"]["database_url"], position)
    return {
        "topology": topology,
        "env": env,
        "ports": {name: r["ports"]["pg"] for name, r in regions.items()},
        "urls": {name: r["database_url"] for name, r in regions.items()},
    }


def wait_replayed(replica_url: str, position: ReplicationPosition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(replica_url, autocommit=True) as c:
        while time.monotonic() < deadline:
            replayed = c.execute("select pg_last_wal_replay_lsn()::text").fetchone()[0]
            if ReplicationPosition.parse(replayed) >= position:
                return
            time.sleep(0.005)
    raise AssertionError(f"{replica_url} did not replay {position} within {timeout} s")


WHO = text("select pg_is_in_recovery(), inet_server_port()")


def test_sync_engines_route_reads_to_the_replica_and_writes_to_the_primary(lab):
    engines = RoutedEngines.from_topology(lab["topology"], "eu-west")
    try:
        assert not engines.shared
        assert engines.primary.pool._pre_ping is True
        with engines.engine().connect() as c:  # the default route: replica
            assert tuple(c.execute(WHO).one()) == (True, lab["ports"]["eu-west"])
        with route_to_primary(), engines.session() as s:
            assert tuple(s.execute(WHO).one()) == (False, lab["ports"]["us-west"])
            s.execute(text(f"insert into {TABLE} (note) values ('via primary')"))
            s.commit()
            assert primary_position(s.connection()) > ReplicationPosition(0)
        with route_to_replica(), engines.session() as s:
            assert tuple(s.execute(WHO).one())[0] is True
        token = current_route.set("sideways")
        try:
            with pytest.raises(ValueError, match="'replica' or 'primary'"):
                engines.engine()
        finally:
            current_route.reset(token)
    finally:
        engines.dispose()


def test_a_write_on_the_replica_route_names_the_route_and_always_forward(lab):
    engines = RoutedEngines.from_topology(lab["topology"], "eu-west")
    try:
        with request_context("GET", "/calendar/export", "eu-west"), engines.session() as s:
            with pytest.raises(WriteOnReplicaError) as caught:
                s.execute(text(f"insert into {TABLE} (note) values ('nope')"))
            s.rollback()
            assert s.execute(text("select 1")).scalar() == 1  # the session is still usable
        message = str(caught.value)
        assert "GET /calendar/export in eu-west" in message
        assert "[routes] always_forward" in message and "latitude.toml" in message
        assert "read-only transaction" in message and f"INSERT INTO {TABLE}".lower() in (
            message.lower()
        )
        assert is_read_only_error(caught.value.__cause__)
        # The ORM's flush at commit goes the same way.
        with engines.session() as s:
            s.execute(text("select 1"))
            with pytest.raises(WriteOnReplicaError, match="outside of any request"):
                s.execute(text(f"update {TABLE} set note = 'x' where id = 1"))
    finally:
        engines.dispose()


def test_the_primary_region_shares_one_engine(lab, world):
    regions = {r["name"]: r for r in world.status()["regions"]}
    topology = load_topology(regions["us-west"]["topology_file"], environ=lab["env"])
    engines = RoutedEngines.from_topology(topology, "us-west")
    try:
        assert engines.shared and engines.engine() is engines.primary
        with engines.engine().connect() as c:
            assert c.execute(WHO).one()[0] is False
    finally:
        engines.dispose()


def test_the_apps_first_transaction_makes_the_claim(lab):
    """`claiming`: the first statement of each transaction on the primary claims the key for
    the run; the claim commits with the app's writes or not at all, and a transaction that
    finds the key anyone else's is refused before it writes anything."""
    from latitude.claims import SCHEMA
    from latitude.claims import TABLE as OUTCOMES
    from latitude.db import ClaimInTransaction, ClaimRefused, claiming

    primary = lab["urls"]["us-west"]
    engines = RoutedEngines(primary, primary)
    key = f"in-tx-{uuid.uuid4()}"
    note = f"claimed {key}"

    def row():
        with psycopg.connect(primary, autocommit=True) as c:
            return c.execute(
                f"select state, applied, runner from {OUTCOMES} where key = %s", (key,)
            ).fetchone()

    def notes():
        with psycopg.connect(primary, autocommit=True) as c:
            return c.execute(f"select count(*) from {TABLE} where note = %s", (note,)).fetchone()[0]

    with psycopg.connect(primary, autocommit=True) as c:
        c.execute("select pg_advisory_lock(hashtext(%s))", (OUTCOMES,))
        for statement in SCHEMA.split(";"):
            c.execute(statement)
    try:
        run = ClaimInTransaction(key, "h", "run-1")
        with route_to_primary(), claiming(run):
            with engines.engine().connect() as c:  # rolled back: the claim with it
                c.execute(text("select 1"))
                c.rollback()
            assert run.taken and row() is None
            with engines.engine().begin() as c:
                c.execute(text(f"insert into {TABLE} (note) values (:n)"), {"n": note})
            with engines.engine().begin() as c:  # the run's own claim: taken again
                c.execute(text("select 1"))
        assert row() == ("running", True, "run-1") and not run.refused

        # Another run of the same request (a duplicate, a retry) is refused before it writes.
        other = ClaimInTransaction(key, "h", "run-2")
        with route_to_primary(), claiming(other):
            with pytest.raises(ClaimRefused, match="already held or done"):
                with engines.engine().begin() as c:
                    c.execute(text(f"insert into {TABLE} (note) values (:n)"), {"n": note})
            assert other.refused and not other.taken
            with pytest.raises(ClaimRefused):  # every later transaction too
                with engines.engine().begin() as c:
                    c.execute(text("select 1"))
        assert notes() == 1 and row() == ("running", True, "run-1")
        # So is another request under the key.
        with route_to_primary(), claiming(ClaimInTransaction(key, "other", "run-3")):
            with pytest.raises(ClaimRefused), engines.engine().begin() as c:
                c.execute(text("select 1"))

        # A stale claim of the same request that no transaction committed is taken over.
        with psycopg.connect(primary, autocommit=True) as c:
            c.execute(
                f"update {OUTCOMES} set applied = false, runner = null, "
                "created_at = now() - interval '2 minutes' where key = %s",
                (key,),
            )
        successor = ClaimInTransaction(key, "h", "run-4")
        with route_to_primary(), claiming(successor), engines.engine().begin() as c:
            c.execute(text("select 1"))
        assert successor.taken and row() == ("running", True, "run-4")
    finally:
        engines.dispose()
        with psycopg.connect(primary, autocommit=True) as c:
            c.execute(f"delete from {OUTCOMES} where key = %s", (key,))


async def test_async_engines_read_your_writes_through_the_watcher(lab):
    """The whole path: write via the primary route, take the position, wait for the replica
    to replay it, then read on the replica route: every write is seen (0 stale reads)."""
    engines = AsyncRoutedEngines.from_topology(lab["topology"], "eu-west")
    try:
        await engines.warm(2)
        async with ReplayWatcher(lab["urls"]["eu-west"]) as watcher:
            stale = 0
            for _ in range(5):
                note = uuid.uuid4().hex
                with route_to_primary():
                    async with engines.session() as s:
                        await s.execute(
                            text(f"insert into {TABLE} (note) values (:n)"), {"n": note}
                        )
                        await s.commit()
                        position = await primary_position_async(await s.connection())
                assert await watcher.wait_for(position, timeout_s=10)
                async with engines.session() as s:  # the replica route
                    assert (await s.execute(WHO)).one()[0] is True
                    seen = await s.execute(
                        text(f"select 1 from {TABLE} where note = :n"), {"n": note}
                    )
                    stale += seen.first() is None
            assert stale == 0
        with request_context("GET", "/feed", "eu-west"):
            async with engines.engine().connect() as c:
                with pytest.raises(WriteOnReplicaError, match="GET /feed in eu-west"):
                    await c.execute(text(f"delete from {TABLE} where id = 0"))
    finally:
        await engines.dispose()


# ---- Django: the example project, in-process -----------------------------------------------


@pytest.fixture(scope="module")
def django_project(lab):
    """The example project configured for eu-west (the lab's region environment), migrated."""
    pytest.importorskip("django")
    import django
    from django.conf import settings

    with pytest.MonkeyPatch.context() as mp:
        for key in ("LATITUDE_TOPOLOGY", "LATITUDE_REGION", "LATITUDE_LAB_KEY"):
            mp.setenv(key, lab["env"][key])
        mp.setenv("DJANGO_SETTINGS_MODULE", "example.settings")
        mp.syspath_prepend(str(EXAMPLE))
        if settings.configured and settings.SETTINGS_MODULE != "example.settings":
            pytest.skip("Django is already configured by another test in this process")
        django.setup()
        from django.core.management import call_command
        from django.db import connections

        try:
            call_command("migrate", "events", database="default", verbosity=0)
        finally:
            connections.close_all()
        yield


@pytest.fixture
def django_app(django_project):
    """One test's use of the project: its database connections end with the test."""
    from django.db import connections

    try:
        yield
    finally:
        connections.close_all()


def test_django_reads_from_the_replica_and_writes_to_the_primary(django_app, lab):
    from django.db import connections
    from django.test import Client
    from events.models import Event

    assert connections["replica"].settings_dict["PORT"] == str(lab["ports"]["eu-west"])
    client = Client()
    title = f"standup-{uuid.uuid4().hex[:8]}"
    created = client.post("/events/", {"title": title})  # POST: the primary route
    assert created.status_code == 201, created.content
    position = ReplicationPosition.parse(created.json()["position"])
    assert Event.objects.using("default").filter(title=title).exists()

    wait_replayed(lab["urls"]["eu-west"], position)
    listed = client.get("/events/").json()  # GET: the replica route
    assert listed["database"] == "replica" and listed["served_by"] == "replica"
    assert title in listed["events"]

    # In code, the same decisions follow the route.
    assert Event.objects.all().db == "replica"
    with route_to_primary():
        assert Event.objects.all().db == "default"
    # The plain router sends a write made on the replica route to the primary.
    event = Event.objects.create(title="written during a read")
    assert event._state.db == "default"
    # A write forced onto the replica connection is translated, naming the request.
    with request_context("GET", "/events/", "eu-west"), pytest.raises(WriteOnReplicaError) as e:
        Event.objects.using("replica").filter(id=event.id).update(views=2)
    assert "GET /events/ in eu-west" in str(e.value) and "always_forward" in str(e.value)
    assert "'replica'" in str(e.value)


def test_django_strict_router_refuses_a_get_that_writes(django_app):
    from django.test import Client, override_settings
    from events.models import Event

    with route_to_primary():
        event = Event.objects.create(title="touched")
    with override_settings(DATABASE_ROUTERS=["latitude.db.StrictLatitudeRouter"]):
        client = Client(raise_request_exception=True)
        with pytest.raises(WriteOnReplicaError) as caught:
            client.get(f"/events/{event.id}/touch")
    message = str(caught.value)
    assert f"GET /events/{event.id}/touch" in message
    assert f'always_forward = ["/events/{event.id}/touch"]' in message
    # With the plain router the same GET writes through the primary (slowly, across the ocean).
    assert Client().get(f"/events/{event.id}/touch").status_code == 200

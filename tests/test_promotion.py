"""Promotion in the lab: switchover while writes flow, promote back, forced failover with the
primary region killed, the old primary fenced and rejoined, quorum commit, bad input.

These tests move the primary, so they run in their own lab world (never the shared `world`,
whose tests assume us-west is primary), and take it down afterwards.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from latitude.consistency import PositionCookie, ReplicationPosition, primary_position
from latitude.lab import LabWorld
from latitude.lab.demo import start_calendar, wait_healthy
from latitude.lab.harness import Writer, start_failover_watchers, wait_until
from latitude.lab.postgres import database_url
from latitude.promotion.journal import Journal

pytestmark = [pytest.mark.promotion, pytest.mark.slow, pytest.mark.timeout(300)]

REGIONS = ("us-west", "eu-west", "ap-southeast")


def start_apps(world: LabWorld) -> None:
    start_calendar(world, timeout=60)


@pytest.fixture(scope="module")
def promo(tmp_path_factory):
    """A three-region world of our own, with the calendar in every region."""
    world = LabWorld(tmp_path_factory.mktemp("promotion-lab"))
    world.up()
    try:
        start_apps(world)
        yield world
    finally:
        world.down()


def latitude(world: LabWorld, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latitude.cli", *args, "--state-dir", str(world.state_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pg(world: LabWorld, region: str) -> psycopg.Connection:
    port = world.state().regions[region].pg_port
    return psycopg.connect(database_url(port), autocommit=True, connect_timeout=5)


class RecordingWriter(Writer):
    """A `Writer` whose failed answers (`failures`) are sorted by what a client can do."""

    def server_errors(self) -> list[tuple[float, int, str]]:
        """Answers no client can act on: a 500 or a 502 (a 503 says when to retry)."""
        return [f for f in self.failures if f[1] in (0, 500, 502)]


def writers(world: LabWorld, regions) -> list[RecordingWriter]:
    ws = [RecordingWriter(world, r) for r in regions]
    for w in ws:
        w.login()
        w.start()
    return ws


def stop(ws: list[Writer]) -> None:
    for w in ws:
        w.stop.set()
    for w in ws:
        w.join(30)


def titles_in(world: LabWorld, region: str) -> set[str]:
    with pg(world, region) as c:
        return {r[0] for r in c.execute("select title from events").fetchall()}


def assert_refuses_writes(world: LabWorld, region: str) -> None:
    with pg(world, region) as c, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        c.execute("insert into audit (action) values ('direct write')")


def streams_from(world: LabWorld, primary: str) -> set[str]:
    with pg(world, primary) as c:
        return {
            r[0]
            for r in c.execute(
                "select application_name from pg_stat_replication where state = 'streaming'"
            ).fetchall()
        }


wait_for = functools.partial(wait_until, step=0.1)  # each poll opens a connection


def one_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# ---- bad input ---------------------------------------------------------------------------


def test_bad_input_one_line_exit_2(promo: LabWorld):
    one_error_line(latitude(promo, "lab", "promote", "us-west"), "already the primary")
    one_error_line(latitude(promo, "lab", "promote", "mars"), "unknown region", "eu-west")
    one_error_line(latitude(promo, "lab", "promote", "--auto-choose"), "--force")
    # A second promotion while one runs.
    with Journal(promo.state_dir).running("ap-southeast", "switchover"):
        one_error_line(latitude(promo, "lab", "promote", "eu-west"), "another promotion")
    assert Journal(promo.state_dir).read() is None
    # A replica that is behind: eu-west cut off from the primary while writes land there.
    promo.link("cut", "us-west", "eu-west")
    try:
        with pg(promo, "us-west") as c:
            c.execute("insert into audit (action) select 'filler' from generate_series(1, 500)")
        result = latitude(promo, "lab", "promote", "eu-west", "--max-lag-bytes", "1024")
        one_error_line(result, "behind", "--force")
    finally:
        promo.link("heal", "us-west", "eu-west")
    assert promo.status()["primary"] == "us-west"


# ---- planned switchover ------------------------------------------------------------------


def test_switchover_while_writes_flow_loses_nothing(promo: LabWorld):
    ws = writers(promo, REGIONS)
    try:
        time.sleep(2)
        started = time.monotonic()
        result = latitude(promo, "lab", "promote", "eu-west")
        finished = time.monotonic()
        assert result.returncode == 0, result.stderr
        assert "[9/9]" in result.stderr  # a progress line per step
        time.sleep(2)
    finally:
        stop(ws)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["to"] == "eu-west" and report["from"] == "us-west"

    acked = [a for w in ws for a in w.acked]
    lost = {title for _, title, _ in acked} - titles_in(promo, "eu-west")
    assert not lost, f"{len(lost)} acknowledged writes lost"
    for w in ws:
        assert w.longest_refusal() <= 5.0, (w.region, w.longest_refusal(), w.refused[-5:])
        # A write that crossed the moment the epoch went pending is held, retried at the new
        # primary or refused with a 503 that says to retry: never a 500 or a 502.
        assert not w.server_errors(), (w.region, w.server_errors())
        later = [region for t, _, region in w.acked if t > finished + 0.5]
        assert later and set(later) == {"eu-west"}, (w.region, set(later))
        assert any(t > started for t, _, _ in w.acked)
    # The old primary: its database refuses a direct write and streams from the new primary.
    assert_refuses_writes(promo, "us-west")
    wait_for(lambda: {"us-west", "ap-southeast"} <= streams_from(promo, "eu-west"), 20, "streams")
    status = promo.status()
    assert status["primary"] == "eu-west" and status["epoch"]["number"] == 2
    assert {r["name"]: r["role"] for r in status["regions"]} == {
        "us-west": "replica",
        "eu-west": "primary",
        "ap-southeast": "replica",
    }
    # The old primary now serves reads as a replica: a signed-in user whose writes went to the
    # new primary (position cookie) reads there, page and JSON, never a 500.
    old = next(w for w in ws if w.region == "us-west")
    assert old.post("/events", {"title": "after-switchover"})[0] == 201
    for accept in ("application/json", "text/html"):
        assert old.get("/events", accept) == 200, accept
    # Every region's dashboard shows the world as it is now.
    for region in REGIONS:
        port = promo.state().regions[region].app_port
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/_latitude/dashboard.json", timeout=10
        ) as r:
            summary = json.loads(r.read())
        assert summary["primary"] == "eu-west", (region, summary["primary"])
        assert summary["role"] == ("primary" if region == "eu-west" else "replica"), region


def gateway_status(world: LabWorld, region: str) -> dict:
    port = world.state().regions[region].app_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_latitude/status", timeout=10) as r:
        return json.loads(r.read())


def read_with_position(world: LabWorld, region: str, position: ReplicationPosition):
    """GET /events with a genuine position cookie: (status, the position cookie answered)."""
    cookie = PositionCookie(world.state().secret.encode())
    port = world.state().regions[region].app_port
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/events",
        headers={
            "accept": "application/json",
            "cookie": f"latitude_pos={cookie.issue(position, region)}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            status, headers = r.status, r.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    answered = None
    for header in headers.get_all("set-cookie") or []:
        name, _, rest = header.partition("=")
        if name.strip() == "latitude_pos":
            answered = cookie.read(rest.split(";", 1)[0])
    return status, answered


def test_a_position_from_the_old_timeline_never_waits_out_its_bound(promo: LabWorld):
    """After the switchover eu-west writes timeline 2. At ap-southeast, a cookie from timeline 1
    whose LSN the replica has not replayed (a write lost in a forced failover looks like this)
    is sent to the primary at once, and comes back on the new timeline; the same LSN on the
    current timeline still waits out the bound, as any unreached position does."""
    with pg(promo, "eu-west") as c:
        timeline = primary_position(c).timeline
    assert timeline >= 2  # a promotion started a timeline
    region = "ap-southeast"
    wait_for(
        lambda: gateway_status(promo, region)["consistency"]["watcher"]["timeline"] == timeline,
        20,
        "ap-southeast's watcher follows the new timeline",
    )
    far = ReplicationPosition.parse("FFFFFFF/0")
    before = gateway_status(promo, region)["consistency"]["watcher"]
    status, answered = read_with_position(promo, region, far.on_timeline(timeline - 1))
    after = gateway_status(promo, region)["consistency"]["watcher"]
    assert status in (200, 401), status
    assert answered is not None and answered.timeline == timeline  # forwarded: a new position
    assert after["reads_older_timeline"] == before["reads_older_timeline"] + 1
    assert after["reads_timed_out"] == before["reads_timed_out"]  # no wait for the bound
    # Control: the same LSN on the current timeline is waited for, then forwarded.
    status, answered = read_with_position(promo, region, far.on_timeline(timeline))
    control = gateway_status(promo, region)["consistency"]["watcher"]
    assert status in (200, 401), status
    assert answered is not None
    assert control["reads_timed_out"] == after["reads_timed_out"] + 1
    assert control["reads_older_timeline"] == after["reads_older_timeline"]


def test_promote_back(promo: LabWorld):
    result = latitude(promo, "lab", "promote", "us-west")
    assert result.returncode == 0, result.stderr
    w = Writer(promo, "eu-west")
    w.login()
    status, body = w.post("/events", {"title": "after-promote-back"})
    assert status == 201 and body["region"] == "us-west"
    assert_refuses_writes(promo, "eu-west")
    wait_for(lambda: {"eu-west", "ap-southeast"} <= streams_from(promo, "us-west"), 20, "streams")
    assert "after-promote-back" in titles_in(promo, "us-west")


# ---- everything else follows: DNS, exports, mirrors -----------------------------------------


def dig(port: int, name: str) -> list[str]:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), name, "+short", "+time=2", "+tries=1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return [line for line in out.stdout.split() if line]


def mirror_health(world: LabWorld, region: str) -> dict:
    port = world.state().regions[region].mirror_port
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/_latitude/mirror/health", timeout=2
        ) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}")
    except OSError:
        return {}


def published_everywhere(world: LabWorld, roots: dict, path: str, body: bytes, timeout: float):
    def arrived():
        return all(
            (root / path).exists() and (root / path).read_bytes() == body for root in roots.values()
        )

    wait_for(arrived, timeout, f"{path} in every region's mirror")


def test_dns_exports_and_mirrors_follow_the_epoch(promo: LabWorld):
    """After `latitude lab promote`: the DNS front answers the primary-only name with the new
    primary's address, the exports name it, and the mirror publisher role moved (the new primary
    publishes, the old one follows). Then the same, promoting back."""
    import os
    import shutil

    from latitude.lab import process
    from latitude.lab.mirrors import start_lab_mirrors, wait_lab_mirrors_ready
    from latitude.mirror.publisher import Publisher
    from latitude.mirror.role import NotPrimary

    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (Debian package dnsutils)")
    state = promo.state()
    assert state.primary == "us-west"
    address = {"us-west": "127.0.1.1", "eu-west": "127.0.2.1", "ap-southeast": "127.0.3.1"}
    env = {**os.environ, "LATITUDE_LAB_KEY": state.secret}
    lab_topology = str(promo.state_dir / "topology.toml")
    ready = promo.state_dir / "dns-ready.json"
    ready.unlink(missing_ok=True)
    dns = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "latitude.cli",
            "dns",
            "-t",
            lab_topology,
            "--port",
            "0",
            "--no-history",
            "--quiet",
            "--ready-file",
            str(ready),
            "--vantage",
            f"us-west={state.regions['us-west'].topology_file}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    roots = start_lab_mirrors(promo)
    try:
        wait_for(ready.exists, 30, "the DNS front listening")
        port = json.loads(ready.read_text())["dns_port"]
        name = "primary.calendar.latitude.test"
        assert dig(port, name) == [address["us-west"]]
        assert wait_lab_mirrors_ready(promo, 60)
        with Publisher(roots["us-west"]) as pub:
            pub.publish("simple/before/index.html", b"before")
        published_everywhere(promo, roots, "simple/before/index.html", b"before", 20)

        for new, old in (("eu-west", "us-west"), ("us-west", "eu-west")):
            result = latitude(promo, "lab", "promote", new)
            assert result.returncode == 0, result.stderr
            moved_at = time.monotonic()
            wait_for(lambda new=new: dig(port, name) == [address[new]], 10, f"{name} -> {new}")
            assert time.monotonic() - moved_at < 5
            assert dig(port, f"{old}.calendar.latitude.test") == [address[old]]  # pinned
            # A client with no location gets the primary: the epoch's, not the file's.
            assert dig(port, "calendar.latitude.test") == [address[new]]

            for target, line in (
                ("powerdns", f"{name}. 30 IN A {address[new]}"),
                ("route53", f'records = ["{address[new]}"]'),
            ):
                export = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "latitude.cli",
                        "routing",
                        "export",
                        target,
                        "-t",
                        lab_topology,
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert export.returncode == 0, export.stderr
                epoch = promo.status()["epoch"]["number"]
                primary_part = export.stdout.split("Primary-only names")[-1]
                assert line in primary_part and f"epoch {epoch}" in primary_part, export.stdout
                assert address[old] not in primary_part, primary_part

            # The new primary's mirror publishes; the old primary's follows it.
            wait_for(
                lambda new=new: mirror_health(promo, new).get("role") == "primary",
                30,
                f"{new}'s mirror serving the feed",
            )
            with pytest.raises(NotPrimary):
                Publisher(roots[old])
            body = f"published at {new}".encode()
            path = f"simple/{new}/index.html"
            wait_for(
                lambda new=new: not (roots[new] / ".latitude" / "retired").exists(),
                10,
                f"{new}'s root taken over",
            )
            with Publisher(roots[new]) as pub:
                change = pub.publish(path, body)
            assert change.serial > 1 << 40  # the new epoch's log: serials keep increasing
            published_everywhere(promo, roots, path, body, 30)
            health = mirror_health(promo, old)
            assert health.get("role") == "mirror", health
            wait_for(
                lambda old=old: mirror_health(promo, old).get("healthy"),
                30,
                f"{old} mirror healthy",
            )
    finally:
        dns.terminate()
        try:
            dns.wait(10)
        except subprocess.TimeoutExpired:
            dns.kill()
        for region in REGIONS:
            for service in ("mirror", "mirror-sync"):
                process.stop_pid_file(promo._service_pid_file(region, service))
    assert promo.status()["primary"] == "us-west"


# ---- workers -------------------------------------------------------------------------------


def reminders(world: LabWorld, region: str, event_id: int) -> list[str]:
    with pg(world, region) as c:
        if c.execute("select to_regclass('reminders')").fetchone()[0] is None:
            return []
        return [
            r[0]
            for r in c.execute(
                "select sent_by from reminders where event_id = %s", (event_id,)
            ).fetchall()
        ]


def test_workers_run_jobs_only_at_the_primary_and_follow_it(promo: LabWorld):
    state = promo.state()
    for region in REGIONS:
        argv = [
            sys.executable,
            "-m",
            "latitude.cli",
            "worker",
            "examples.calendar.tasks:tasks",
            "--region",
            region,
            "--topology",
            state.regions[region].topology_file,
            "--app-dir",
            str(Path(__file__).resolve().parent.parent),
        ]
        promo.set_service(region, "worker", argv)
    try:
        primary = promo.status()["primary"]
        w = Writer(promo, "eu-west")
        w.login()
        status, body = w.post("/events", {"title": "job-before"})
        assert status == 201
        sent = wait_for(lambda: reminders(promo, primary, body["id"]), 30, "the reminder")
        time.sleep(2)  # a second run would show up by now
        assert reminders(promo, primary, body["id"]) == [primary] == sent

        target = next(r for r in ("eu-west", "us-west") if r != primary)
        result = latitude(promo, "lab", "promote", target)
        assert result.returncode == 0, result.stderr
        status, body = w.post("/events", {"title": "job-after"})
        assert status == 201 and body["region"] == target
        wait_for(lambda: reminders(promo, target, body["id"]), 30, "the reminder after promotion")
        time.sleep(2)
        assert reminders(promo, target, body["id"]) == [target]
        log = promo.service_log(primary, "worker").read_text()
        assert "worker stopped" in log
        # The tests after this one start from the world's own primary, as it was given to us.
        result = latitude(promo, "lab", "promote", primary)
        assert result.returncode == 0, result.stderr
    finally:
        for region in REGIONS:
            from latitude.lab import process

            process.stop_pid_file(promo._service_pid_file(region, "worker"))


# ---- forced failover ---------------------------------------------------------------------


def test_forced_failover_fences_and_rejoins_the_old_primary(promo: LabWorld):
    assert promo.status()["primary"] == "us-west"
    ws = [Writer(promo, r) for r in ("eu-west", "ap-southeast")]
    for w in ws:
        w.login()  # signing in is a write too: before the primary dies
    for part in ("db", "app", "sessions"):
        promo.kill("us-west", part)
    for w in ws:
        w.start()
    try:
        time.sleep(1)
        late = [(round(time.monotonic() - t, 2), r) for w in ws for t, _, r in w.acked]
        assert not [x for x in late if x[0] < 0.8], late
        command_at = time.monotonic()
        result = latitude(promo, "lab", "promote", "--force", "--auto-choose")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        new = report["to"]
        assert new in ("eu-west", "ap-southeast") and "may_have_lost" in report
        first = wait_for(
            lambda: min((t for w in ws for t, _, _ in w.acked if t > command_at), default=None),
            30,
            "a write acknowledged after the failover",
        )
        assert first - command_at <= 15.0
        time.sleep(1)
    finally:
        stop(ws)
    acked = {title for w in ws for t, title, _ in w.acked if t > command_at}
    assert acked <= titles_in(promo, new)

    # The old primary comes back: fenced. Its database refuses writes; writes through its
    # gateway go to the new primary (it learned the epoch from its peers), none land at home.
    assert "read-only" in promo.revive("us-west", "db")
    promo.revive("us-west", "sessions")
    promo.revive("us-west", "app")
    wait_healthy(promo, "us-west", 60)
    assert_refuses_writes(promo, "us-west")
    w = Writer(promo, "us-west")
    w.login()
    status, body = w.post("/events", {"title": "via-old-primary"})
    assert status == 201 and body["region"] == new
    assert "via-old-primary" not in titles_in(promo, "us-west")

    result = latitude(promo, "rejoin", "us-west")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "us-west" in streams_from(promo, new), 20, "us-west streams again")
    wait_for(lambda: "via-old-primary" in titles_in(promo, "us-west"), 20, "replayed at us-west")
    assert_refuses_writes(promo, "us-west")


# ---- production: `latitude promote --topology` -------------------------------------------


def test_promote_with_a_topology_talks_to_the_databases_and_gateways(promo: LabWorld):
    """The production command, run as an operator in the primary region: the databases and the
    gateways are reached at the URLs the region's topology names (through the links)."""
    import os

    old = promo.status()["primary"]
    target = "us-west" if old != "us-west" else "eu-west"
    state = promo.state()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "latitude.cli",
            "promote",
            target,
            "--topology",
            state.regions[old].topology_file,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LATITUDE_LAB_KEY": state.secret},
    )
    assert result.returncode == 0, result.stderr
    assert f"{target} told" in result.stderr  # POST /_latitude/epoch reached the gateways
    w = Writer(promo, "ap-southeast")
    w.login()
    status, body = w.post("/events", {"title": "after-production-promote"})
    assert status == 201 and body["region"] == target
    assert_refuses_writes(promo, old)  # fenced read-only, still running

    # `latitude rejoin --topology` on the old primary's host: the tools found here, its data
    # directory local, pg_rewind from the new primary at the URL the region's topology names.
    node = promo._pg(promo.state(), old)
    region_topology = state.regions[old].topology_file

    def rejoin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "latitude.cli", "rejoin", *args, "-t", region_topology],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "LATITUDE_LAB_KEY": state.secret},
        )

    one_error_line(rejoin(target, "--bindir", str(node.bin_dir)), "is the primary")
    one_error_line(rejoin(old, "--bindir", str(promo.state_dir)), "pg_rewind", "--bindir")
    one_error_line(
        rejoin(old, "--bindir", str(node.bin_dir), "--data-dir", str(promo.state_dir)),
        "not a Postgres data directory on this host",
    )
    planned = rejoin(old, "--bindir", str(node.bin_dir), "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "pg_rewind -D" in planned.stdout and "standby.signal" in planned.stdout
    assert str(node.data_dir) in planned.stdout  # found by asking the server
    assert not node.is_standby() and node.is_running()  # a dry run changes nothing
    result = rejoin(old, "--bindir", str(node.bin_dir))
    assert result.returncode == 0, result.stderr
    assert "[2/6] rewind it onto" in result.stderr and "rejoined" in result.stdout
    wait_for(lambda: old in streams_from(promo, target), 20, f"{old} streams again")
    with pg(promo, old) as c:
        assert c.execute("select pg_is_in_recovery()").fetchone()[0] is True
    w.post("/events", {"title": "after-production-rejoin"})
    wait_for(lambda: "after-production-rejoin" in titles_in(promo, old), 20, "replayed there")
    # The lab's own record of who is primary learns of the production promotion (the tests
    # after this one read it).
    from latitude.lab.promote import LabCluster

    newest = LabCluster(promo).epoch()
    assert newest.primary == target
    promo.set_primary(newest.primary, newest.number)


# ---- a promotion that fails part-way -------------------------------------------------------


def test_a_promotion_that_fails_part_way_is_reported_and_resumed(promo: LabWorld):
    from latitude.lab.promote import LabCluster
    from latitude.promotion import switchover
    from latitude.promotion.postgres import PgServer, PgUnavailable

    old = promo.status()["primary"]
    target = next(r for r in REGIONS if r != old)

    class BrokenPromote(PgServer):
        def promote(self, timeout_s: float = 30) -> None:
            raise PgUnavailable(f"{self.name}: the connection dropped during pg_promote")

    class Flaky(LabCluster):
        def pg(self, region: str) -> PgServer:
            server = super().pg(region)
            return BrokenPromote(server.name, server.url) if region == target else server

    with pytest.raises(PgUnavailable):
        switchover(Flaky(promo), target, progress=lambda _line: None)
    # Stopped after fencing: no primary at all (never two), and the lab says what to do.
    with pg(promo, target) as c:
        assert c.execute("select pg_is_in_recovery()").fetchone()[0] is True
    assert not promo._pg(promo.state(), old).is_running()
    unfinished = promo.status()["promotion"]
    assert unfinished["target"] == target and "fenced" in unfinished["done"]
    shown = latitude(promo, "lab", "status")
    assert f"latitude lab promote {target}" in shown.stdout
    # Another target is refused until this one is finished; the same target resumes it.
    one_error_line(latitude(promo, "lab", "promote", old), "interrupted", target)
    result = latitude(promo, "lab", "promote", target)
    assert result.returncode == 0, result.stderr
    assert promo.status()["primary"] == target and promo.status()["promotion"] is None
    w = Writer(promo, "ap-southeast" if target != "ap-southeast" else "eu-west")
    w.login()
    status, body = w.post("/events", {"title": "after-resume"})
    assert status == 201 and body["region"] == target
    assert_refuses_writes(promo, old)


# ---- quorum commit -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sync_world(tmp_path_factory):
    source = Path(__file__).resolve().parent.parent / "src/latitude/data/lab.toml"
    topology = tmp_path_factory.mktemp("sync-topology") / "lab.toml"
    topology.write_text(source.read_text() + "\n[replication]\nsynchronous = 1\n")
    world = LabWorld(tmp_path_factory.mktemp("sync-lab"), topology)
    world.up()
    try:
        yield world
    finally:
        world.down()


def test_synchronous_quorum_forced_failover_loses_nothing(sync_world: LabWorld):
    with pg(sync_world, "us-west") as c:
        names = c.execute("show synchronous_standby_names").fetchone()[0]
        assert names.startswith("ANY 1")
        c.execute("create table acked (id int primary key)")
    acked: list[int] = []
    done = threading.Event()

    def write() -> None:
        with pg(sync_world, "us-west") as c:
            i = 0
            while not done.is_set():
                i += 1
                try:
                    c.execute("insert into acked values (%s)", (i,))  # autocommit: acknowledged
                except psycopg.Error:
                    return
                acked.append(i)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    time.sleep(2)
    sync_world.kill("us-west", "db")  # a crash in the middle of the writes
    done.set()
    t.join(10)
    assert len(acked) > 10
    result = latitude(sync_world, "lab", "promote", "--force", "--auto-choose")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rpo0"] is True
    with pg(sync_world, report["to"]) as c:
        have = {r[0] for r in c.execute("select id from acked").fetchall()}
        # The new primary commits with the remaining region as its quorum.
        assert c.execute("show synchronous_standby_names").fetchone()[0].startswith("ANY 1")
    assert not set(acked) - have, f"{len(set(acked) - have)} acknowledged writes lost"


# ---- automatic failover by majority ------------------------------------------------------


@pytest.fixture(scope="module")
def auto_world(tmp_path_factory):
    source = Path(__file__).resolve().parent.parent / "src/latitude/data/lab.toml"
    topology = tmp_path_factory.mktemp("auto-topology") / "lab.toml"
    topology.write_text(
        source.read_text() + "\n[failover]\nautomatic = true\nafter_s = 6\nlease_s = 3\n"
    )
    world = LabWorld(tmp_path_factory.mktemp("auto-lab"), topology)
    world.up()
    try:
        start_apps(world)
        start_failover_watchers(world, REGIONS)
        yield world
    finally:
        world.down()


def test_partitioned_primary_is_replaced_by_majority_one_primary_at_a_time(auto_world):
    world = auto_world
    ws = [Writer(world, r) for r in REGIONS]
    for w in ws:
        w.login()
        w.start()
    try:
        time.sleep(3)
        cut_at = time.monotonic()
        world.link("cut", "us-west", "eu-west")
        world.link("cut", "us-west", "ap-southeast")
        new_primary_ack = wait_for(
            lambda: min(
                (t for w in ws for t, _, region in w.acked if region != "us-west" and t > cut_at),
                default=None,
            ),
            60,
            "a write acknowledged by a new primary",
        )
        time.sleep(2)
    finally:
        stop(ws)
        world.link("heal", "us-west", "eu-west")
        world.link("heal", "us-west", "ap-southeast")
    by_old = [t for w in ws for t, _, region in w.acked if region == "us-west"]
    new = {region for w in ws for t, _, region in w.acked if t >= new_primary_ack}
    # One primary at every moment: the cut-off primary's last acknowledgement comes before the
    # new primary's first, and after it only the new primary acknowledges.
    assert max(by_old) < new_primary_ack, (max(by_old) - cut_at, new_primary_ack - cut_at)
    assert len(new) == 1 and new != {"us-west"}
    # The cut-off primary stopped acknowledging writes within its lease (3 s) and a margin.
    assert max(by_old) - cut_at <= 3 + 2.5
    elected = new.pop()
    assert world.status()["primary"] in ("us-west", elected)  # the lab's record may lag
    # Healed, the old primary's gateway learns the new epoch from its peers and forwards.
    w = Writer(world, "us-west")
    w.login()
    status, body = w.post("/events", {"title": "after-heal"})
    assert status == 201 and body["region"] == elected, (status, body)

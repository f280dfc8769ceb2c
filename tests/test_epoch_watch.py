"""Parts that follow the epoch without acting on it, without a lab: the watch, the DNS front's
primary-only names, the exports, the mirror's change log restarting in a new epoch."""

from __future__ import annotations

import pytest
from dnslib import DNSRecord

from latitude.mirror.changelog import ChangeLog
from latitude.mirror.role import NotPrimary, check_publishable, epoch_floor, retire, take_over
from latitude.mirror.store import ContentRoot
from latitude.promotion.epoch import Epoch, EpochFile, sign_epoch
from latitude.promotion.watch import EpochWatch
from latitude.routing.choice import RegionRouter
from latitude.routing.config import RoutingConfigError, routing_config
from latitude.routing.dns import DnsFront
from latitude.routing.export import powerdns_zone, route53_terraform
from latitude.signing import Keyring, SigningKey
from latitude.topology import parse_topology

SECRET = "s" * 40
ENV = {"WATCH_KEY": SECRET}

TOPOLOGY = """
[app]
name = "calendar"
[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.2]
[[regions]]
name = "eu-west"
location = [53.3, -6.3]
[signing]
keys = [{ id = "k1", env = "WATCH_KEY" }]
[lab]
[routing]
addresses = [["us-west", "127.0.1.1"], ["eu-west", "127.0.2.1"]]
"""


def topology_at(tmp_path, extra: str = "", environ=None):
    path = tmp_path / "latitude.toml"
    path.write_text(TOPOLOGY + extra)
    return parse_topology(
        TOPOLOGY + extra, source=str(path), environ=ENV if environ is None else environ
    )


KEYRING = Keyring([SigningKey("k1", SECRET.encode())], "k1")


def publish(tmp_path, epoch: Epoch, keyring=KEYRING) -> None:
    EpochFile(tmp_path / "epoch.json", keyring).offer(sign_epoch(keyring, epoch))


def test_watch_follows_the_newest_active_epoch_only(tmp_path):
    topology = topology_at(tmp_path)
    watch = EpochWatch(topology, peers=False)
    assert watch.refresh() == "us-west" and watch.topology() is topology
    publish(tmp_path, Epoch(2, "eu-west", "pending", 1.0))
    assert watch.refresh() == "us-west"  # pending: the old primary still holds the writes
    publish(tmp_path, Epoch(2, "eu-west", "active", 2.0))
    assert watch.refresh() == "eu-west"
    assert watch.topology().primary.name == "eu-west"
    # A token from other keys is not believed, however new.
    other = Keyring([SigningKey("k1", b"o" * 40)], "k1")
    assert not watch.offer(sign_epoch(other, Epoch(9, "us-west", "active", 3.0)))
    assert watch.primary == "eu-west"


def test_watch_without_a_key_secret_stays_on_the_topology(tmp_path):
    publish(tmp_path, Epoch(2, "eu-west", "active", 2.0))
    watch = EpochWatch(topology_at(tmp_path, environ={}), peers=False)
    assert watch.refresh() == "us-west"
    assert "no signing key secret" in watch.why_not


def front_for(topology, primary: list[str]):
    config = routing_config(topology)
    router = RegionRouter(topology, config, primary=lambda: primary[0])
    return DnsFront(config, router)


def ask(front: DnsFront, name: str) -> list[str]:
    answer = front.handle(DNSRecord.question(name).pack(), "127.0.0.1")
    return [str(rr.rdata) for rr in DNSRecord.parse(answer).rr]


def test_primary_only_names_follow_the_router_at_once(tmp_path):
    primary = ["us-west"]
    front = front_for(topology_at(tmp_path, 'primary_names = ["www", "admin"]\n'), primary)
    assert ask(front, "www.latitude.test") == ["127.0.1.1"]
    assert ask(front, "calendar.latitude.test") == ["127.0.1.1"]  # no location: the primary
    primary[0] = "eu-west"  # a promotion: the cached answers must not survive it
    assert ask(front, "www.latitude.test") == ["127.0.2.1"]
    assert ask(front, "admin.latitude.test") == ["127.0.2.1"]
    assert ask(front, "calendar.latitude.test") == ["127.0.2.1"]
    assert ask(front, "us-west.calendar.latitude.test") == ["127.0.1.1"]  # pinned stays
    default = front_for(topology_at(tmp_path), primary)
    assert ask(default, "primary.calendar.latitude.test") == ["127.0.2.1"]


@pytest.mark.parametrize(
    "value, words",
    [
        ('"www"', "list of host names"),
        ('["calendar"]', "already answered"),
        ('["www.elsewhere.org."]', "not a host name in the zone"),
    ],
)
def test_bad_primary_names_are_named(tmp_path, value, words):
    with pytest.raises(RoutingConfigError) as info:
        routing_config(topology_at(tmp_path, f"primary_names = {value}\n"))
    assert "routing.primary_names" in str(info.value) and words in str(info.value)


def test_exports_name_the_primary_they_are_given(tmp_path):
    topology = topology_at(tmp_path)
    config = routing_config(topology)
    epoch = Epoch(2, "eu-west", "active", 1.0)
    zone = powerdns_zone(topology, config, epoch, "eu-west").split("Primary-only names")[-1]
    assert "primary.calendar.latitude.test. 30 IN A 127.0.2.1" in zone and "epoch 2" in zone
    assert "127.0.1.1" not in zone
    tf = route53_terraform(topology, config, epoch, "eu-west").split("Primary-only names")[-1]
    assert 'records = ["127.0.2.1"]' in tf and "127.0.1.1" not in tf
    # Without an epoch the topology's primary, and the comment says where it came from.
    plain = powerdns_zone(topology, config).split("Primary-only names")[-1]
    assert "the topology (epoch 1)" in plain and "127.0.1.1" in plain


def test_a_new_primarys_log_starts_above_every_old_cursor(tmp_path):
    root = ContentRoot(tmp_path / "mirror").ensure()
    (root.root / "simple").mkdir()
    (root.root / "simple" / "a.json").write_bytes(b"{}")
    old = ChangeLog(root.state_dir / "changes.sqlite")
    old.begin()
    old.record([("put", "x", "0" * 64, 1, 1.0)] * 3)
    old.commit()
    old.close()
    take_over(root, 2, 3600)
    log = ChangeLog(root.state_dir / "changes.sqlite")
    assert log.head() == log.floor() == epoch_floor(2) > 3 and log.epoch() == 2
    assert [f["path"] for f in log.snapshot()[1]] == ["simple/a.json"]
    assert log.since(3).resync  # an old cursor resyncs
    assert not log.since(epoch_floor(2)).resync
    log.close()
    take_over(root, 2, 3600)  # idempotent: the log is not restarted twice
    retire(root, 3, "us-west")
    with pytest.raises(NotPrimary, match="publish at the primary"):
        check_publishable(root)
    take_over(root, 4, 3600)
    check_publishable(root)


def test_a_mirror_learns_the_epoch_from_its_regions_gateway(tmp_path):
    """A mirror whose folder is not the gateway's has no epoch file to read: its region's
    gateway (`GET /_latitude/epoch`) tells it; it asks no other region's gateway, and a token
    it cannot verify moves nothing."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from latitude.mirror.role import MirrorRole

    asked: dict[str, int] = {"us-west": 0, "eu-west": 0}
    tokens = {"eu-west": sign_epoch(KEYRING, Epoch(2, "eu-west", "active", 2.0))}

    def server_for(region: str) -> ThreadingHTTPServer:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                asked[region] += 1
                body = json.dumps({"region": region, "token": tokens.get(region)}).encode()
                self.send_response(200 if self.path == "/_latitude/epoch" else 404)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    servers = {r: server_for(r) for r in asked}
    try:
        urls = {r: f"http://127.0.0.1:{s.server_address[1]}" for r, s in servers.items()}
        text = TOPOLOGY.replace(
            "location = [45.6, -121.2]",
            f'location = [45.6, -121.2]\ninternal_url = "{urls["us-west"]}"',
        ).replace(
            "location = [53.3, -6.3]",
            f'location = [53.3, -6.3]\ninternal_url = "{urls["eu-west"]}"',
        )
        folder = tmp_path / "mirror-only"  # no epoch.json here: the gateways keep theirs elsewhere
        folder.mkdir()
        (folder / "latitude.toml").write_text(text)
        topology = parse_topology(text, source=str(folder / "latitude.toml"), environ=ENV)
        role = MirrorRole(topology, "eu-west", make_config=lambda topo: topo)
        assert role.primary == "eu-west" and role.epoch == 2
        assert asked == {"us-west": 0, "eu-west": 1}
        # A forged token from the gateway is not believed.
        tokens["eu-west"] = sign_epoch(
            Keyring([SigningKey("k1", b"o" * 40)], "k1"), Epoch(3, "us-west", "active", 3.0)
        )
        role.watch.refresh()
        assert role.primary == "eu-west" and role.epoch == 2
    finally:
        for s in servers.values():
            s.shutdown()
            s.server_close()

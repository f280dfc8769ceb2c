"""A deployment whose regions only mirror (packagist's case) needs no fake app values
(issue 10, item 6): a region lists the services it runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from latitude.mirror import MirrorConfig
from latitude.routing.config import routing_config
from latitude.topology import TopologyError, parse_topology

SECRET = "s" * 48

MIRROR_ONLY = """
[[regions]]
name = "us-east"
primary = true
location = [39.0, -77.5]
services = ["mirror"]
mirror_url = "https://mirror.us-east.example.com"

[[regions]]
name = "eu-west"
location = [53.35, -6.26]
services = ["mirror"]
mirror_url = "https://mirror.eu-west.example.com"

[signing]
keys = [{ id = "k1", env = "LATITUDE_KEY_K1" }]

[mirror]
root = "/srv/mirror"
"""


def test_a_mirror_only_topology_validates_and_configures_a_node():
    topo = parse_topology(MIRROR_ONLY, environ={"LATITUDE_KEY_K1": SECRET})
    assert [r.services for r in topo.regions] == [("mirror",), ("mirror",)]
    assert not topo.region("eu-west").runs("app")
    cfg = MirrorConfig.from_topology(topo, "eu-west")
    assert cfg.primary_url == "https://mirror.us-east.example.com" and cfg.website_url is None
    assert cfg.keyring is not None
    assert routing_config(topo).check_services == ("mirror",)


def test_services_decide_what_is_required():
    without_url = MIRROR_ONLY.replace('mirror_url = "https://mirror.eu-west.example.com"\n', "")
    with pytest.raises(TopologyError) as e:
        parse_topology(without_url, environ={"LATITUDE_KEY_K1": SECRET})
    assert any(
        "eu-west" in p and "mirror_url" in p and "runs the mirror" in p for p in e.value.problems
    ), e.value.problems
    typo = MIRROR_ONLY.replace('services = ["mirror"]', 'services = ["mirorr"]', 1)
    with pytest.raises(TopologyError) as e:
        parse_topology(typo, environ={"LATITUDE_KEY_K1": SECRET})
    assert any("services" in p and "mirorr" in p for p in e.value.problems)
    # Without `services` a region runs the app, which needs its URLs, as before.
    app = MIRROR_ONLY.replace('services = ["mirror"]\n', "")
    with pytest.raises(TopologyError) as e:
        parse_topology(app, environ={"LATITUDE_KEY_K1": SECRET})
    assert any("database_url" in p and 'services = ["mirror"]' in p for p in e.value.problems)


def test_latitude_check_accepts_a_mirror_only_topology(tmp_path):
    path = tmp_path / "latitude.toml"
    path.write_text(MIRROR_ONLY)
    r = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "check", str(path)],
        env={**os.environ, "LATITUDE_KEY_K1": SECRET, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "us-east" in r.stdout and "eu-west" in r.stdout and "(lab)" not in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "latitude.cli", "mirror", "nginx-config", "--region", "eu-west"],
        env={**os.environ, "LATITUDE_KEY_K1": SECRET, "LATITUDE_TOPOLOGY": str(path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "server mirror.us-east.example.com:443;" in r.stdout

"""A deployment whose regions only mirror (packagist's case) needs no fake app values
(issue 10, item 6): a region lists the services it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from latitude.mirror import MirrorConfig
from latitude.routing.config import routing_config
from latitude.topology import TopologyError, parse_topology
from tests.test_mirror import mirror_topology

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


# ---- the keyring fails closed: no secret, no mirror (never an unsigned feed) -----------------

KEYS = '\n[signing]\nkeys = [{ id = "k1", env = "LAT_TEST_MIRROR_KEY" }]\n'


def mirror_cli(path, *args: str, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if k != "LAT_TEST_MIRROR_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "latitude.cli", "mirror", *args, "--topology", str(path)],
        env={**environ, "COLUMNS": "300", **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def lab_mirrors(tmp_path, keys: str = "") -> Path:
    """Two mirror regions, us (the primary) and eu, in a lab topology: no secret is checked."""
    path = mirror_topology(tmp_path, 9, 9, 9, ["/"])
    path.write_text(path.read_text() + keys)
    return path


def test_a_mirror_without_a_secret_refuses_to_configure_naming_the_variable(tmp_path):
    from latitude.mirror import MirrorConfigError

    text = lab_mirrors(tmp_path, KEYS).read_text()
    topo = parse_topology(text, environ={})
    with pytest.raises(MirrorConfigError) as e:
        MirrorConfig.from_topology(topo, "eu")
    message = str(e.value)
    assert "LAT_TEST_MIRROR_KEY" in message and "is not set" in message, message
    assert "export LAT_TEST_MIRROR_KEY=" in message and "always signed" in message, message
    # A tool that signs nothing still configures, without a keyring.
    assert MirrorConfig.from_topology(topo, "eu", signed=False).keyring is None
    # With the secret set, the keyring is the topology's.
    with_secret = parse_topology(text, environ={"LAT_TEST_MIRROR_KEY": SECRET})
    keyring = MirrorConfig.from_topology(with_secret, "eu").keyring
    assert keyring is not None and keyring.key_ids == ("k1",)


def test_a_topology_with_no_signing_table_is_refused_naming_it(tmp_path):
    from latitude.mirror import MirrorConfigError

    topo = parse_topology(lab_mirrors(tmp_path).read_text(), environ={})
    with pytest.raises(MirrorConfigError, match=r"no signing key .*\[signing\] table"):
        MirrorConfig.from_topology(topo, "us")


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--region", "us", "--port", "0"],
        ["serve", "--region", "eu", "--port", "0"],
        ["sync", "--region", "eu"],
    ],
)
@pytest.mark.parametrize("keys", ["", KEYS], ids=["no [signing]", "secret unset"])
def test_serve_and_sync_without_a_secret_exit_2_with_the_fix(tmp_path, args, keys):
    r = mirror_cli(lab_mirrors(tmp_path, keys), *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    want = "LAT_TEST_MIRROR_KEY" if keys else "[signing]"
    assert want in lines[0] and "Traceback" not in r.stderr, lines[0]
    assert not (tmp_path / args[2]).exists()  # refused before the node touched its root


def test_tools_that_sign_nothing_need_no_secret(tmp_path):
    r = mirror_cli(lab_mirrors(tmp_path, KEYS), "nginx-config", "--region", "eu")
    assert r.returncode == 0, r.stderr
    assert f"root {tmp_path}/eu;" in r.stdout

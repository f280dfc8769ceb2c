"""The topology file: valid files load, each kind of bad input names its key and fix, exit 2."""

import os
import subprocess
import sys

import pytest

from latitude.topology import (
    TopologyError,
    default_lab_topology_path,
    load_topology,
    parse_topology,
)

SECRET = "s" * 40

GOOD = """
[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.2]
public_url = "https://us-west.example.com"
internal_url = "https://us-west.internal:8443"
database_url = "postgresql://app@db.us-west.internal:5432/app"
session_store_url = "redis://sessions.us-west.internal:6379/0"

[[regions]]
name = "eu-west"
location = [53.3, -6.3]
public_url = "https://eu-west.example.com"
internal_url = "https://eu-west.internal:8443"
database_url = "postgresql://app@db.eu-west.internal:5432/app"
session_store_url = "redis://sessions.eu-west.internal:6379/0"

[signing]
keys = [{ id = "k1", env = "LAT_TEST_KEY" }]

[routes]
always_forward = ["/auth/callback"]
local = ["/search"]

[[links.rtt]]
between = ["us-west", "eu-west"]
rtt_ms = 125
"""


def problems(text: str, env: dict | None = None) -> list[str]:
    with pytest.raises(TopologyError) as info:
        parse_topology(text, environ={"LAT_TEST_KEY": SECRET} if env is None else env)
    return info.value.problems


def test_good_topology_loads():
    t = parse_topology(GOOD, environ={"LAT_TEST_KEY": SECRET})
    assert t.primary.name == "us-west"
    assert [r.name for r in t.regions] == ["us-west", "eu-west"]
    assert t.rtt_ms("eu-west", "us-west") == 125
    assert t.signing_keys[0].secret == SECRET.encode()
    assert t.routes.always_forward == ("/auth/callback",)
    # a replica's fallback path defaults to the primary's database
    assert t.region("eu-west").primary_database_url == t.primary.database_url


def test_default_lab_topology():
    t = load_topology(default_lab_topology_path())
    assert t.primary.name == "us-west"
    assert {r.name for r in t.regions} == {"us-west", "eu-west", "ap-southeast"}
    assert t.rtt_ms("us-west", "eu-west") == 125
    assert t.rtt_ms("ap-southeast", "us-west") == 165
    assert t.rtt_ms("eu-west", "ap-southeast") == 170


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda s: s.replace('name = "eu-west"', 'name = "eu-west"\ncolour = "blue"'),
            "regions[2].colour: unknown key",
        ),
        (lambda s: s.replace("primary = true\n", ""), "no primary region"),
        (
            lambda s: s.replace("location = [53.3", "primary = true\nlocation = [53.3"),
            "2 primary regions",
        ),
        (lambda s: s.replace('name = "eu-west"', 'name = "us-west"'), "duplicate region 'us-west'"),
        (
            lambda s: s.replace("https://eu-west.example.com", "htps://eu-west"),
            "public_url: 'htps://eu-west' must use http:// or https://",
        ),
        (
            lambda s: s.replace("postgresql://app@db.eu-west", "mysql://app@db.eu-west"),
            "database_url: 'mysql://",
        ),
        (
            lambda s: s.replace("https://eu-west.internal:8443", "https://eu-west.internal:99999"),
            "internal_url: 'https://eu-west.internal:99999' is not a valid URL",
        ),
        (
            lambda s: s.replace("rtt_ms = 125", 'rtt_ms = "fast"'),
            "links.rtt[1].rtt_ms: must be a number",
        ),
        (
            lambda s: s.replace(
                'between = ["us-west", "eu-west"]', 'between = ["us-west", "mars"]'
            ),
            "unknown region 'mars'",
        ),
        (
            lambda s: s.replace("[routes]", "[routez]"),
            "routez: unknown key; did you mean 'routes'?",
        ),
        (
            lambda s: s.replace("location = [53.3, -6.3]", "location = [153.3, -6.3]"),
            "latitude 153.3 is outside -90..90",
        ),
    ],
)
def test_each_bad_input_names_key_and_fix(change, expected):
    found = problems(change(GOOD))
    assert any(expected in p for p in found), found


def test_missing_and_short_secret():
    assert any(
        "secret missing: environment variable LAT_TEST_KEY is not set" in p
        for p in problems(GOOD, env={})
    )
    short = problems(GOOD, env={"LAT_TEST_KEY": "short"})
    assert any("secret in LAT_TEST_KEY is 5 bytes; it must be at least 32" in p for p in short)


def test_malformed_toml_gives_line_number():
    text = GOOD.replace("[routes]", "[routes")
    line = text.splitlines().index("[routes") + 1
    found = problems(text)
    assert len(found) == 1 and found[0].startswith("malformed TOML") and f"line {line}," in found[0]


def test_all_problems_reported_at_once():
    bad = GOOD.replace("primary = true\n", "").replace("htt" + "ps://eu-west.example.com", "nope")
    assert len(problems(bad)) >= 2


def run_check(path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "LAT_TEST_KEY"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "latitude.cli", "check", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("primary = true\n", ""), "no primary region"),
        (GOOD.replace("[routes]", "[routes"), "malformed TOML"),
        (GOOD.replace('name = "eu-west"', 'name = "us-west"'), "duplicate region"),
        (GOOD, "secret missing"),
    ],
)
def test_cli_check_exit_2_without_traceback(tmp_path, text, expected):
    path = tmp_path / "latitude.toml"
    path.write_text(text)
    result = run_check(path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_check_prints_regions(tmp_path):
    path = tmp_path / "latitude.toml"
    path.write_text(GOOD)
    result = run_check(path, {"LAT_TEST_KEY": SECRET})
    assert result.returncode == 0, result.stderr
    assert "us-west" in result.stdout and "eu-west" in result.stdout and "primary" in result.stdout


# A topology with everything `to_toml` has to get right: quotes, backslashes, control characters
# and non-ASCII in names and URLs, explicit services, nested tables, odd keys and floats.
AWKWARD = r"""
[app]
name = "Café \"Zürich\" \\ 東京\t\u007f"

[[regions]]
name = "us-west"
primary = true
location = [45.6, -121.25]
public_url = "https://us-west.example.com/ümlaut?q=\"x\""
internal_url = "https://us-west.internal:8443"
database_url = "postgresql://app:p%22w\\d@db.us-west.internal:5432/app?application_name=Ünï"
session_store_url = "redis://sessions.us-west.internal:6379/0"
mirror_url = "https://mirror.us-west.example.com"

[[regions]]
name = "eu-west"
location = [53.3, -6.3]
public_url = "https://eu-west.example.com"
internal_url = "https://eu-west.internal:8443"
database_url = "postgresql://app@db.eu-west.internal:5432/app"
session_store_url = "redis://sessions.eu-west.internal:6379/0"
mirror_url = "https://mirror.eu-west.example.com"
services = ["app"]

[[regions]]
name = "ap-south"
location = [1.35, 103.82]
mirror_url = "https://mirror.ap-south.example.com"
services = ["mirror"]

[signing]
keys = [{ id = "k1 \"old\"", env = "LAT_TEST_KEY" }, { id = "k2-ñ", env = "LAT_TEST_KEY_2" }]
sign_with = "k2-ñ"

[routes]
always_forward = ["/auth/callback", "/ünïcode/\"path\""]
local = ["/search"]

[links]
default_rtt_ms = 150.5

[[links.rtt]]
between = ["us-west", "eu-west"]
rtt_ms = 125
jitter_ms = 0.25

[gateway]
deadline_s = 1e-05
session_cookie = "sid \"x\""
pooling = false

[mirror]
paths = { "p/ä b" = ["x", 1, 2.5, true], plain = { nested = "ö" } }

[replication]
synchronous = 1

[failover]
automatic = true
after_s = 3
"""


def test_to_toml_reads_back_as_the_same_topology():
    environ = {"LAT_TEST_KEY": SECRET, "LAT_TEST_KEY_2": "t" * 40}
    t = parse_topology(AWKWARD, environ=environ)
    assert t.app_name == 'Café "Zürich" \\ 東京\t\x7f'
    text = t.to_toml()
    again = parse_topology(text, source="again.toml", environ=environ)
    assert again == t
    assert again.to_toml() == text
    # The services a file would infer are left for it to infer; the others are written.
    assert text.count("services = ") == 2
    assert 'services = ["mirror"]' in text


@pytest.mark.parametrize("path", [default_lab_topology_path()])
def test_to_toml_round_trips_the_shipped_lab_topology(path):
    t = load_topology(path)
    assert parse_topology(t.to_toml()) == t
    assert t.is_lab and parse_topology(t.to_toml()).is_lab


def test_to_toml_names_a_value_it_cannot_write():
    from dataclasses import replace

    t = replace(parse_topology(GOOD, environ={"LAT_TEST_KEY": SECRET}), gateway={"x": object()})
    with pytest.raises(TypeError, match="cannot write object"):
        t.to_toml()

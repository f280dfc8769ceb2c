"""Unit tests for far users' places and the RTT model (no processes, no sockets)."""

from __future__ import annotations

import statistics

import pytest

from latitude.lab import places
from latitude.routing.geo import great_circle_km
from latitude.topology import default_lab_topology_path, load_topology

TOPOLOGY = load_topology(default_lab_topology_path())


def test_the_issue_names_are_all_there():
    for name in ("Sydney", "Frankfurt", "São Paulo", "Tokyo", "Virginia", "Johannesburg"):
        assert places.place(name).name == name


@pytest.mark.parametrize("spelling", ["sao paulo", "Sao-Paulo", "SÃO PAULO", "sao_paulo"])
def test_spellings_find_the_place(spelling):
    assert places.place(spelling).name == "São Paulo"


def test_an_unknown_place_names_the_known_ones():
    with pytest.raises(places.UnknownPlace) as info:
        places.place("Atlantis")
    assert "Atlantis" in str(info.value) and "Sydney" in str(info.value)


def test_model_follows_light_in_fibre():
    # 10,000 km: 2 x 10,000 x 1.5 / 204.2 + 2 = 148.9 ms.
    assert places.model_rtt_ms(10_000) == pytest.approx(148.9, abs=0.1)
    assert places.model_rtt_ms(0) == places.OVERHEAD_MS
    assert places.model_rtt_ms(2000) < places.model_rtt_ms(4000)


def reference_errors() -> dict[tuple[str, str], float]:
    """Model / published - 1 for every published pair (negative: the model is faster)."""
    out = {}
    for (a, b), published in places.PUBLISHED_RTT_MS.items():
        km = great_circle_km(*places.REFERENCE_SITES[a], *places.REFERENCE_SITES[b])
        out[(a, b)] = round(places.model_rtt_ms(km) / published - 1, 3)
    return out


def test_model_against_published_inter_region_figures():
    errors = reference_errors()
    assert len(errors) >= 20
    assert statistics.median(abs(e) for e in errors.values()) < 0.2
    # Never off by a factor of two either way.
    assert all(-0.5 < e < 1.0 for e in errors.values()), errors


def test_transatlantic_figure_within_ten_percent():
    km = great_circle_km(*places.REFERENCE_SITES["us-east-1"], *places.REFERENCE_SITES["eu-west-1"])
    assert places.model_rtt_ms(km) == pytest.approx(80.5, rel=0.1)


def test_nearest_regions():
    assert places.nearest_region(places.place("Frankfurt"), TOPOLOGY) == "eu-west"
    assert places.nearest_region(places.place("Sydney"), TOPOLOGY) == "ap-southeast"
    assert places.nearest_region(places.place("Virginia"), TOPOLOGY) == "us-west"


def test_a_region_on_the_way_bounds_the_far_rtt():
    # Dublin lies on the way from Frankfurt to Oregon: the far RTT is at least Frankfurt ->
    # Dublin plus the lab's own Dublin <-> Oregon link.
    rtts = places.client_rtts(places.place("Frankfurt"), TOPOLOGY)
    assert rtts["us-west"] >= rtts["eu-west"] + TOPOLOGY.rtt_ms("eu-west", "us-west")
    assert rtts["eu-west"] < 25


def test_a_region_off_the_way_does_not():
    # Singapore is not on the way from Sydney to Oregon: the Pacific is crossed directly.
    sydney = places.place("Sydney")
    rtts = places.client_rtts(sydney, TOPOLOGY)
    direct = places.model_rtt_ms(great_circle_km(sydney.latitude, sydney.longitude, 45.60, -121.18))
    assert rtts["us-west"] == pytest.approx(direct, abs=0.2)
    assert rtts["us-west"] < rtts["ap-southeast"] + TOPOLOGY.rtt_ms("ap-southeast", "us-west")


def test_link_names_never_clash_with_regions():
    names = {r.name for r in TOPOLOGY.regions}
    assert not names & {p.link_name for p in places.PLACES}
    assert places.place("São Paulo").link_name == "user-sao-paulo"

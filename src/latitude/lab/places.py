"""Far users: named places on the planet, each joined to every region of the lab by an emulated
client link whose round-trip time follows from distance.

The RTT model (`model_rtt_ms`): light in fibre covers c / 1.468 = 204 km per millisecond; a real
path is longer than the great circle (cables follow coasts and land at a few stations), by a
route factor of 1.5; and switching and the last mile add 2 ms. So

    rtt_ms = 2 * great_circle_km * 1.5 / 204 + 2

Checked against `PUBLISHED_RTT_MS` (AWS inter-region averages): the median error is under 20%,
the model is never off by more than a factor of two, and it is low for Europe <-> Asia (those
paths went round, not across). `tests/test_places.py` holds it to that.

A client reaches a far region over the same cables as the regions' own backbone: when the region
nearest to the client lies on the way (going through it is at most 15% longer than the great
circle), the client's RTT to the far region is never less than its RTT to the near region plus
the lab's own link from there. Without that rule a user in Frankfurt would reach Oregon
directly faster than Dublin reaches Oregon, which no packet does.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from latitude.routing.geo import great_circle_km
from latitude.topology import Topology

FIBRE_KM_PER_MS = 299_792.458 / 1.468 / 1000  # light in silica fibre, about 204 km/ms
ROUTE_FACTOR = 1.5
OVERHEAD_MS = 2.0
# A near region is "on the way" when going through it is at most this much longer.
ON_THE_WAY = 1.15


@dataclass(frozen=True)
class Place:
    name: str
    latitude: float
    longitude: float

    @property
    def key(self) -> str:
        return slug(self.name)

    @property
    def link_name(self) -> str:
        """The client end of its links in the WAN emulator (never a region's name)."""
        return f"user-{self.key}"


PLACES: tuple[Place, ...] = (
    Place("Sydney", -33.87, 151.21),
    Place("Frankfurt", 50.11, 8.68),
    Place("São Paulo", -23.55, -46.63),
    Place("Tokyo", 35.68, 139.69),
    Place("Virginia", 38.95, -77.45),
    Place("Johannesburg", -26.20, 28.05),
    Place("Dublin", 53.35, -6.26),
    Place("Oregon", 45.60, -121.18),
    Place("Singapore", 1.35, 103.82),
    Place("Mumbai", 19.08, 72.88),
    Place("London", 51.51, -0.13),
    Place("New York", 40.71, -74.01),
)

# Where the published figures' regions are (AWS region, city it is commonly placed in).
REFERENCE_SITES = {
    "us-east-1": (38.95, -77.45),  # Virginia
    "us-west-1": (37.35, -121.96),  # N. California
    "us-west-2": (45.60, -121.18),  # Oregon
    "eu-west-1": (53.35, -6.26),  # Ireland
    "eu-central-1": (50.11, 8.68),  # Frankfurt
    "ap-northeast-1": (35.68, 139.69),  # Tokyo
    "ap-northeast-2": (37.57, 126.98),  # Seoul
    "ap-southeast-1": (1.35, 103.82),  # Singapore
    "ap-southeast-2": (-33.87, 151.21),  # Sydney
    "sa-east-1": (-23.55, -46.63),  # São Paulo
}

# Average inter-region RTTs in ms, from the table "Latency Between AWS Global Regions" as
# reproduced at https://acomputerscientistlearnsaws.blogspot.com/2017/04/aws-regions.html
# (measured from EC2; a 2017 snapshot). Every pair of that table among these regions but the
# Singapore <-> Europe/Sydney ones, which were routed through the US at the time.
PUBLISHED_RTT_MS: dict[tuple[str, str], float] = {
    ("us-east-1", "us-west-1"): 72.7,
    ("us-east-1", "us-west-2"): 87.0,
    ("us-east-1", "eu-west-1"): 80.5,
    ("us-east-1", "eu-central-1"): 88.7,
    ("us-east-1", "ap-northeast-1"): 145.3,
    ("us-east-1", "ap-northeast-2"): 178.4,
    ("us-east-1", "ap-southeast-1"): 216.7,
    ("us-east-1", "ap-southeast-2"): 230.0,
    ("us-east-1", "sa-east-1"): 119.5,
    ("us-west-1", "us-west-2"): 19.5,
    ("us-west-2", "eu-west-1"): 137.0,
    ("us-west-2", "eu-central-1"): 159.5,
    ("us-west-2", "ap-northeast-1"): 89.1,
    ("us-west-2", "ap-northeast-2"): 118.3,
    ("us-west-2", "ap-southeast-1"): 161.4,
    ("us-west-2", "ap-southeast-2"): 162.2,
    ("us-west-2", "sa-east-1"): 182.7,
    ("eu-west-1", "eu-central-1"): 19.6,
    ("eu-west-1", "ap-northeast-1"): 212.4,
    ("eu-west-1", "ap-southeast-2"): 309.6,
    ("eu-west-1", "sa-east-1"): 191.3,
    ("eu-central-1", "ap-northeast-1"): 236.5,
    ("ap-northeast-1", "ap-northeast-2"): 31.4,
    ("ap-northeast-1", "ap-southeast-1"): 73.8,
    ("ap-northeast-1", "ap-southeast-2"): 103.9,
}


class UnknownPlace(LookupError):
    def __str__(self) -> str:
        return str(self.args[0])


def slug(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return "-".join(ascii_name.lower().split())


def place(name: str) -> Place:
    """The place called `name` (case, accents and spaces do not matter: "sao-paulo" works)."""
    wanted = slug(name.replace("_", " ").replace("-", " "))
    for p in PLACES:
        if p.key == wanted:
            return p
    known = ", ".join(p.name for p in PLACES)
    raise UnknownPlace(f"no place called {name!r}; known places: {known}")


def model_rtt_ms(km: float) -> float:
    """The round-trip time over `km` of great circle, by the fibre model above."""
    return round(2 * km * ROUTE_FACTOR / FIBRE_KM_PER_MS + OVERHEAD_MS, 1)


def _km_to(p: Place, topology: Topology, region: str) -> float:
    r = topology.region(region)
    return great_circle_km(p.latitude, p.longitude, r.latitude, r.longitude)


def nearest_region(p: Place, topology: Topology) -> str:
    return min((r.name for r in topology.regions), key=lambda name: _km_to(p, topology, name))


def client_rtts(p: Place, topology: Topology) -> dict[str, float]:
    """The RTT of the client link from `p` to every region, in topology order."""
    near = nearest_region(p, topology)
    near_km = _km_to(p, topology, near)
    out: dict[str, float] = {}
    for r in topology.regions:
        km = _km_to(p, topology, r.name)
        rtt = model_rtt_ms(km)
        if r.name != near:
            nr = topology.region(near)
            via_km = near_km + great_circle_km(nr.latitude, nr.longitude, r.latitude, r.longitude)
            if via_km <= ON_THE_WAY * km:
                rtt = max(rtt, round(model_rtt_ms(near_km) + topology.rtt_ms(near, r.name), 1))
        out[r.name] = rtt
    return out


@dataclass(frozen=True)
class Vantage:
    """A far user's view of the lab: a place, its RTT to every region, and URLs through them."""

    place: Place
    primary: str
    nearest: str
    rtt_ms: dict[str, float]
    app_urls: dict[str, str]

    def as_dict(self) -> dict:
        return {
            "place": self.place.name,
            "primary": self.primary,
            "nearest": self.nearest,
            "rtt_ms": self.rtt_ms,
            "app_urls": self.app_urls,
        }


def join(world, p: Place) -> Vantage:
    """Join `p` to every region of a running lab: a client link per region (RTT by the model)
    and a relay across it to the region's app. Idempotent: a second call re-uses them."""
    topology = world.topology()
    state = world.state()
    rtts = client_rtts(p, topology)
    urls = {}
    for region, rtt in rtts.items():
        world.add_link(p.link_name, region, rtt)
        port = world.add_relay(p.link_name, region, state.regions[region].app_port)
        urls[region] = f"http://127.0.0.1:{port}"
    return Vantage(p, topology.primary.name, nearest_region(p, topology), rtts, urls)


def relay_from(world, p: Place, region: str, port: int) -> str:
    """A URL that reaches `port` in `region` from `p`, over the place's client link."""
    return f"http://127.0.0.1:{world.add_relay(p.link_name, region, port)}"

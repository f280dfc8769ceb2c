"""The topology file, `latitude.toml`: regions, the primary, URLs, keys, routes, links.

Loading never raises on bad input with a traceback-worthy error: every problem found becomes
one line in `TopologyError.problems`, naming the key and saying how to fix it, so a user sees
all of them at once (the checks, key by key: `latitude.topology_validation`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path


class TopologyError(Exception):
    """The topology file cannot be used; `problems` holds one line per problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True)
class Region:
    name: str
    primary: bool
    latitude: float
    longitude: float
    public_url: str | None = None
    internal_url: str | None = None
    database_url: str | None = None
    primary_database_url: str | None = None
    session_store_url: str | None = None
    mirror_url: str | None = None
    services: tuple[str, ...] = ("app",)

    def runs(self, service: str) -> bool:
        return service in self.services

    @property
    def role(self) -> str:
        return "primary" if self.primary else "replica"


@dataclass(frozen=True)
class SigningKeySpec:
    """A signing key as named in the file; the secret itself only ever lives in the environment."""

    id: str
    env: str
    secret: bytes | None


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    rtt_ms: float
    jitter_ms: float = 0.0


@dataclass(frozen=True)
class Routes:
    local: tuple[str, ...] = ()
    always_forward: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topology:
    regions: tuple[Region, ...]
    signing_keys: tuple[SigningKeySpec, ...] = ()
    sign_with: str | None = None
    routes: Routes = Routes()
    links: tuple[LinkSpec, ...] = ()
    default_rtt_ms: float = 100.0
    gateway: Mapping[str, object] = field(default_factory=dict)
    mirror: Mapping[str, object] = field(default_factory=dict)
    routing: Mapping[str, object] = field(default_factory=dict)
    replication: Mapping[str, object] = field(default_factory=dict)
    failover: Mapping[str, object] = field(default_factory=dict)
    app_name: str = "app"
    is_lab: bool = False
    # Where it was read from: not part of what the topology says (a written-out copy is equal).
    source: str = field(default="<memory>", compare=False)

    @property
    def primary(self) -> Region:
        return next(r for r in self.regions if r.primary)

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.regions)
        raise KeyError(f"no region named {name!r} in {self.source} (regions: {known})")

    def link(self, a: str, b: str) -> LinkSpec:
        """The link between two regions; unlisted pairs get the default RTT."""
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        return LinkSpec(a, b, self.default_rtt_ms)

    def rtt_ms(self, a: str, b: str) -> float:
        return 0.0 if a == b else self.link(a, b).rtt_ms

    def region_pairs(self) -> list[tuple[str, str]]:
        names = [r.name for r in self.regions]
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]

    def with_primary_at(self, url: str) -> Topology:
        """The same topology with the primary's gateway (public and internal URL) at `url`."""
        regions = tuple(
            replace(r, public_url=url, internal_url=url) if r.primary else r for r in self.regions
        )
        return replace(self, regions=regions)

    def to_toml(self) -> str:
        """This topology as `latitude.toml` text: `parse_topology(t.to_toml()) == t` (with the
        same environment, since secrets stay in it and only their variables are named)."""
        out = ["[app]", f"name = {_toml(self.app_name)}", ""]
        if self.is_lab:
            out += ["[lab]", ""]
        for r in self.regions:
            out += ["[[regions]]", f"name = {_toml(r.name)}", f"primary = {_toml(r.primary)}"]
            out.append(f"location = {_toml([r.latitude, r.longitude])}")
            for key in (
                "public_url",
                "internal_url",
                "mirror_url",
                "database_url",
                "primary_database_url",
                "session_store_url",
            ):
                if (value := getattr(r, key)) is not None:
                    out.append(f"{key} = {_toml(value)}")
            # Written only where the file's default would differ, so the file reads as a
            # person would write it.
            if r.services != (("app", "mirror") if r.mirror_url is not None else ("app",)):
                out.append(f"services = {_toml(list(r.services))}")
            out.append("")
        if self.signing_keys:
            keys = [{"id": k.id, "env": k.env} for k in self.signing_keys]
            out += ["[signing]", f"keys = {_toml(keys)}"]
            if self.sign_with is not None:
                out.append(f"sign_with = {_toml(self.sign_with)}")
            out.append("")
        out += [
            "[routes]",
            f"local = {_toml(list(self.routes.local))}",
            f"always_forward = {_toml(list(self.routes.always_forward))}",
            "",
            "[links]",
            f"default_rtt_ms = {_toml(self.default_rtt_ms)}",
            "",
        ]
        for link in self.links:
            out += ["[[links.rtt]]", f"between = {_toml([link.a, link.b])}"]
            out += [f"rtt_ms = {_toml(link.rtt_ms)}", f"jitter_ms = {_toml(link.jitter_ms)}", ""]
        for table in ("gateway", "mirror", "routing", "replication", "failover"):
            if values := getattr(self, table):
                out.append(f"[{table}]")
                out += [f"{_toml_key(k)} = {_toml(v)}" for k, v in values.items()]
                out.append("")
        return "\n".join(out)


# TOML's basic strings: every control character but tab must be escaped, DEL included.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    chars = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            chars.append(_TOML_ESCAPES[ch])
        elif (ord(ch) < 0x20 and ch != "\t") or ch == "\x7f":
            chars.append(f"\\u{ord(ch):04x}")
        else:
            chars.append(ch)  # non-ASCII stays as it is: the file is UTF-8
    return '"' + "".join(chars) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml(value: object) -> str:
    """One TOML value, inline (arrays and tables on one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr is TOML too (1e-05, inf, nan), and reads back as the same float.
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def default_lab_topology_path() -> Path:
    """The three-region lab topology that ships inside the package."""
    return Path(str(resources.files("latitude").joinpath("data/lab.toml")))


def load_topology(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    secrets: bool = True,
) -> Topology:
    """Load and validate a topology file. `secrets=False` is for tools that sign nothing
    (routing): a signing key's secret need not be set in their environment."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(
            str(path), ["file not found; create it or pass --topology PATH to an existing file"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(str(path), [f"cannot read the file: {exc}"]) from None
    return parse_topology(text, source=str(path), environ=environ, secrets=secrets)


def parse_topology(
    text: str,
    source: str = "<memory>",
    environ: Mapping[str, str] | None = None,
    *,
    secrets: bool = True,
) -> Topology:
    environ = os.environ if environ is None else environ
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(source, [f"malformed TOML: {exc}"]) from None
    # Imported here: the validator builds this module's classes, so it imports this module.
    from latitude.topology_validation import Validator

    return Validator(source, environ, secrets).build(data)

"""`state.json`: what runs where in a lab world, as `latitude lab up` wrote it.

One `LabState` per world, read with :meth:`LabState.load` and written with :meth:`LabState.save`
(temp file, fsync, rename; private, as it holds the world's signing secret). A missing file means
no world (`LabNotRunning`); a damaged one says so, names the file and how to recover.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latitude import atomic
from latitude.lab.errors import BadLabInput, LabError, LabNotRunning

__all__ = ["LabEpoch", "LabState", "RegionState", "ServiceSpec"]

STATE_VERSION = 1


@dataclass
class ServiceSpec:
    """A command filling one of a region's slots (`app`, `mirror`, ...), run with `env` added."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class RegionState:
    role: str  # primary, replica or fenced
    pg_port: int
    pg_data: str
    valkey_port: int
    app_port: int
    mirror_port: int
    # relays[source][service]: the port a process in `source` dials to reach this region's service.
    relays: dict[str, dict[str, int]] = field(default_factory=dict)
    services: dict[str, ServiceSpec] = field(default_factory=dict)
    topology_file: str | None = None

    def port(self, service: str) -> int:
        """The region's own port for `service` (pg, valkey, app, mirror)."""
        return getattr(self, f"{service}_port")


@dataclass
class LabEpoch:
    number: int
    primary: str


@dataclass
class LabState:
    started_at: float
    source_topology: str
    secret: str
    data_root: str
    pg_bin: str
    valkey_bin: str
    run_as: str
    supervisor_pid_file: str
    primary: str
    regions: dict[str, RegionState]
    epoch: LabEpoch | None = None
    up_seconds: float | None = None

    def region(self, name: str) -> RegionState:
        try:
            return self.regions[name]
        except KeyError:
            raise BadLabInput(
                f"no region {name!r} in the lab (regions: {', '.join(self.regions)})"
            ) from None

    def relay_port(self, from_region: str, to_region: str, service: str) -> int:
        """The port a process in `from_region` dials to reach `to_region`'s service."""
        target = self.region(to_region)
        if from_region == to_region:
            return target.port(service)
        return target.relays[from_region][service]

    def current_epoch(self) -> LabEpoch:
        return self.epoch or LabEpoch(1, self.primary)

    # ---- the file --------------------------------------------------------------------------

    def to_json(self) -> dict:
        data = asdict(self)
        # The file's layout predates this class: keep it, so a running world reads the same.
        data = {"version": STATE_VERSION, **data}
        data["supervisor"] = {"pid_file": data.pop("supervisor_pid_file")}
        for key in ("epoch", "up_seconds"):
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict) -> LabState:
        data = dict(data)
        version = data.pop("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"version {version!r}, this latitude reads version {STATE_VERSION}")
        data["supervisor_pid_file"] = data.pop("supervisor")["pid_file"]
        regions = {}
        for name, r in data.pop("regions").items():
            services = {s: ServiceSpec(**spec) for s, spec in r.pop("services", {}).items()}
            regions[name] = RegionState(**r, services=services)
        epoch = data.pop("epoch", None)
        return cls(**data, regions=regions, epoch=LabEpoch(**epoch) if epoch else None)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LabState:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LabNotRunning(
                f"no lab world in {path.parent}; start one with `latitude lab up`"
            ) from None
        except OSError as exc:
            raise LabError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise LabError(
                f"{path} is damaged ({problem}); run `latitude lab down` (it stops what it "
                "can find) and `latitude lab up`"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic.write_json(path, self.to_json(), indent=2, mode=0o600)

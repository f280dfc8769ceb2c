"""The local world: regions on one machine, joined by emulated ocean links."""

from latitude.lab.world import LabAlreadyRunning, LabError, LabNotRunning, LabWorld

__all__ = ["LabAlreadyRunning", "LabError", "LabNotRunning", "LabWorld"]

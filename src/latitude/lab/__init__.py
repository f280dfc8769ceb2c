"""The local world: regions on one machine, joined by emulated ocean links."""

from latitude.lab.world import BadLabInput, LabAlreadyRunning, LabError, LabNotRunning, LabWorld

__all__ = ["BadLabInput", "LabAlreadyRunning", "LabError", "LabNotRunning", "LabWorld"]

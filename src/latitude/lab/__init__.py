"""The local world: regions on one machine, joined by emulated ocean links."""

from latitude.lab.errors import BadLabInput, LabAlreadyRunning, LabError, LabNotRunning
from latitude.lab.world import LabWorld

__all__ = ["BadLabInput", "LabAlreadyRunning", "LabError", "LabNotRunning", "LabWorld"]

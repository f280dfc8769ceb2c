"""What the lab raises: each message says what is wrong and what to do."""

from __future__ import annotations


class LabError(Exception):
    """The lab cannot do what was asked; the message says why and what to do."""

    exit_code = 1  # a problem with the running world


class BadLabInput(LabError):
    """The request names no such region, part, link or action, or a bad value."""

    exit_code = 2


class LabAlreadyRunning(LabError):
    pass


class LabNotRunning(LabError):
    pass

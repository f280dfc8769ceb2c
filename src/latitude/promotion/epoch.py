"""The primary epoch: which region is primary, as a versioned, signed, persisted fact.

The topology's `primary = true` is epoch 1. Each promotion publishes N + 1, first *pending*
(every gateway holds writes) then *active*. A token is `base64url(json) "." key id "."
base64url(hmac)`, signed with the forwarding keys, so only holders of those keys can move the
primary. Newer always wins; an epoch never goes back.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hmac
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from latitude import atomic
from latitude.signing import Keyring

PENDING = "pending"
ACTIVE = "active"
STATES = (PENDING, ACTIVE)
EPOCH_FILE = "epoch.json"
_LABEL = b"latitude-epoch\x00"
_MAX_TOKEN = 2048


class EpochError(Exception):
    """An epoch token that cannot be trusted (bad signature, unknown key, malformed)."""


@dataclass(frozen=True)
class Epoch:
    number: int
    primary: str
    state: str = ACTIVE
    issued_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def order(self) -> tuple[int, int]:
        # pending N < active N < anything N + 1
        return (self.number, STATES.index(self.state))

    def newer_than(self, other: Epoch | None) -> bool:
        return other is None or self.order() > other.order()

    def next(self, primary: str, state: str = PENDING) -> Epoch:
        return Epoch(self.number + 1, primary, state, time.time())

    def activated(self) -> Epoch:
        return Epoch(self.number, self.primary, ACTIVE, time.time())

    def __str__(self) -> str:
        return f"epoch {self.number} ({self.primary}{'' if self.active else ', pending'})"


def initial_epoch(topology) -> Epoch:
    """Epoch 1: the primary the topology file names."""
    return Epoch(1, topology.primary.name, ACTIVE, 0.0)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_epoch(keyring: Keyring, epoch: Epoch) -> str:
    payload = json.dumps(asdict(epoch), sort_keys=True, separators=(",", ":")).encode()
    key = keyring.signing_key
    return f"{_b64e(payload)}.{key.key_id}.{_b64e(key.sign(_LABEL + payload))}"


def verify_epoch(keyring: Keyring, token: str) -> Epoch:
    """The epoch in `token`, or `EpochError` saying why it is not trusted."""
    if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN:
        raise EpochError("no epoch token, or one too long")
    try:
        body, key_id, mac = token.strip().split(".")
        payload, mac_bytes = _b64d(body), _b64d(mac)
    except (ValueError, binascii.Error):
        raise EpochError("malformed epoch token") from None
    key = keyring.get(key_id)
    if key is None:
        raise EpochError(f"epoch signed with unknown key {key_id!r}")
    if not hmac.compare_digest(key.sign(_LABEL + payload), mac_bytes):
        raise EpochError("epoch signature does not match")
    try:
        data = json.loads(payload)
        epoch = Epoch(
            int(data["number"]), str(data["primary"]), str(data["state"]), float(data["issued_at"])
        )
    except (ValueError, KeyError, TypeError):
        raise EpochError("epoch token holds no valid epoch") from None
    if epoch.state not in STATES or epoch.number < 1:
        raise EpochError(f"epoch token holds an invalid epoch {data!r}")
    return epoch


def epoch_file_for(topology_path: str | os.PathLike[str]) -> Path:
    """Where a region keeps its newest epoch: `LATITUDE_EPOCH_FILE`, or next to its topology."""
    given = os.environ.get("LATITUDE_EPOCH_FILE")
    return Path(given) if given else Path(topology_path).absolute().parent / EPOCH_FILE


class EpochFile:
    """The region's newest epoch on disk, shared by all its gateway processes.

    `offer()` keeps a token only if it is newer than what the file holds (under a lock, so two
    processes learning different epochs at once keep the newest), written temp-then-rename.
    """

    def __init__(self, path: str | os.PathLike[str], keyring: Keyring):
        self.path = Path(path)
        self.keyring = keyring
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the last read
        self._cached: tuple[Epoch, str] | None = None

    def read(self) -> tuple[Epoch, str] | None:
        """(epoch, token) from the file, or None when absent or untrusted. Cheap when unchanged."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._cached = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return self._cached
        try:
            token = json.loads(self.path.read_text())["token"]
            self._cached = (verify_epoch(self.keyring, token), token)
        except (OSError, ValueError, KeyError, TypeError, EpochError):
            self._cached = None
        self._seen = stamp
        return self._cached

    def offer(self, token: str) -> Epoch | None:
        """Keep `token` if it is newer; return its epoch if it was kept, else None."""
        epoch = verify_epoch(self.keyring, token)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._seen = None
            current = self.read()
            if current is not None and not epoch.newer_than(current[0]):
                return None
            atomic.write_json(self.path, {"token": token, **asdict(epoch)})
            self._seen = None
            return epoch

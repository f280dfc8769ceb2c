"""The epoch for the parts that only follow it: routers, DNS exports and mirrors.

A gateway *acts* on the epoch (`follow.py`); a router or a mirror only needs to know which region
is primary now. `EpochWatch` tells it, from the same two sources a gateway learns from: the epoch
file next to its topology (the one every promotion writes in the lab, and `latitude promote`
writes beside the operator's topology), and the regions' gateways (`GET /_latitude/epoch`), which
is how a DNS server on another host hears of a promotion. Tokens are verified with the forwarding
keys; without a key secret nothing beyond the topology's epoch 1 is believed (fail closed: an
unsigned claim must not move a primary-only name).

The primary it names is that of the newest *active* epoch: while a switchover is pending the old
primary still holds the data and the gateways hold the writes, and a pending epoch can still be
rolled back.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from latitude.promotion.epoch import (
    Epoch,
    EpochError,
    EpochFile,
    epoch_file_for,
    initial_epoch,
    verify_epoch,
)
from latitude.promotion.follow import EPOCH_PATH, topology_for_epoch
from latitude.promotion.regions_http import json_to_all
from latitude.signing import Keyring, SigningKey

log = logging.getLogger("latitude.promotion")

PEER_TIMEOUT_S = 1.0


def keyring_or_none(topology) -> Keyring | None:
    """The forwarding keys whose secrets are set in this environment; None when none is."""
    keys = [SigningKey(k.id, k.secret) for k in topology.signing_keys if k.secret]
    if not keys:
        return None
    ids = [k.key_id for k in keys]
    return Keyring(keys, topology.sign_with if topology.sign_with in ids else ids[0])


class EpochWatch:
    def __init__(
        self,
        topology,
        keyring: Keyring | None = None,
        *,
        file: str | Path | None = None,
        peers: bool = True,
        ask: tuple[str, ...] | None = None,
    ):
        """`peers`: ask the regions' gateways too (`ask`: only these regions', e.g. a mirror
        asks its own region's, which knows every epoch its region does)."""
        self.base = topology
        self.ask = ask
        self.keyring = keyring if keyring is not None else keyring_or_none(topology)
        self.epoch: Epoch = initial_epoch(topology)
        self.token: str | None = None
        self._active = self.epoch.primary
        self.file: EpochFile | None = None
        if self.keyring is not None:
            source = Path(file) if file else Path(topology.source)
            if file or source.suffix == ".toml":
                path = source if file else epoch_file_for(source)
                self.file = EpochFile(path, self.keyring)
        self.peers = peers and self.keyring is not None
        self.why_not = (
            None
            if self.keyring is not None
            else "no signing key secret is set here, so epochs cannot be verified: "
            f"primary-only names stay on the topology's primary ({self.epoch.primary}); "
            "set the variables [signing] keys names to follow promotions"
        )

    @property
    def primary(self) -> str:
        """The primary region of the newest active epoch."""
        return self._active

    def topology(self):
        """The topology as the newest active epoch has it (its primary, everyone writing to it)."""
        if self._active == self.base.primary.name:
            return self.base
        return topology_for_epoch(self.base, self._active)

    def _take(self, epoch: Epoch, token: str) -> bool:
        if not epoch.newer_than(self.epoch):
            return False
        if epoch.primary not in {r.name for r in self.base.regions}:
            log.error("%s names an unknown region; ignored", epoch)
            return False
        self.epoch, self.token = epoch, token
        if epoch.active and epoch.primary != self._active:
            log.warning("following %s: %s is the primary now", epoch, epoch.primary)
            self._active = epoch.primary
        return True

    def offer(self, token: str | None) -> bool:
        if not token or self.keyring is None:
            return False
        try:
            epoch = verify_epoch(self.keyring, token)
        except EpochError as exc:
            log.warning("ignored an epoch: %s", exc)
            return False
        if not self._take(epoch, token):
            return False
        if self.file is not None:
            with contextlib.suppress(OSError, EpochError):
                self.file.offer(token)
        return True

    def refresh(self, *, ask_peers: bool | None = None) -> str:
        """Read the file (cheap when unchanged) and, unless told not to, ask the gateways.
        Returns the primary region. Blocking: call it from a thread in an event loop."""
        if self.file is not None:
            found = self.file.read()
            if found is not None:
                self._take(*found)
        if self.peers if ask_peers is None else (ask_peers and self.keyring is not None):
            for token in self._ask_gateways():
                self.offer(token)
        return self._active

    def _ask_gateways(self) -> list[str]:
        urls = {
            r.name: (r.internal_url or r.public_url).rstrip("/") + EPOCH_PATH
            for r in self.base.regions
            if (r.internal_url or r.public_url) and (self.ask is None or r.name in self.ask)
        }
        answers = json_to_all(urls, timeout_s=PEER_TIMEOUT_S).values()
        return [
            a["token"] for a in answers if isinstance(a, dict) and isinstance(a.get("token"), str)
        ]

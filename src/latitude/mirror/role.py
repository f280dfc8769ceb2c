"""A mirror node's role follows the primary epoch: the new primary publishes, the old one follows.

`latitude mirror serve` and `latitude mirror sync` run in every region and read the region's
epoch: its `epoch.json` (kept by the region's gateways and by every promotion) when the mirror's
topology is in the same folder, and the region's gateway's `GET /_latitude/epoch` every check
(so a mirror on another host or folder follows too; see `latitude.promotion.watch`). When the
epoch's primary changes:

* the region that became primary stops syncing, starts a change log of its own from the tree it
  holds, and serves the feed; its serials start at `epoch x 2^40`, so they keep increasing
  across the promotion and every cursor of the old log is below the new floor (its mirror
  resyncs, hash by hash: only files that differ are fetched);
* the region that stopped being primary retires its log (`Publisher` refuses to publish into
  it), serves as a mirror, and its sync daemon follows the new primary's feed;
* the other regions' mirrors and daemons re-point at the new primary.

Each process restarts its server or daemon in place for the new role; the serve port stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from latitude import atomic
from latitude.mirror.changelog import ChangeLog
from latitude.mirror.store import ContentRoot, sha256_file
from latitude.promotion.epoch import epoch_file_for
from latitude.promotion.watch import EpochWatch

log = logging.getLogger(__name__)

EPOCH_SERIALS = 1 << 40  # serials of epoch N's log start at N x 2^40
CHECK_S = 0.5
TAKEOVER_WAIT_S = 10.0
RETIRED = "retired"


class NotPrimary(Exception):
    """Publishing into a root whose region is not the primary any more."""


def epoch_floor(number: int) -> int:
    return 0 if number <= 1 else number * EPOCH_SERIALS


def retired_file(root: ContentRoot) -> Path:
    return root.state_dir / RETIRED


def check_publishable(root: ContentRoot) -> None:
    """Refuse to publish into the log of a region that is no longer primary."""
    marker = retired_file(root)
    if marker.exists():
        raise NotPrimary(
            f"{root.root} is a mirror now ({marker.read_text().strip()}): publish at the "
            "primary region's root; its sync daemon brings the change here"
        )


def take_over(root: ContentRoot, epoch: int, retention_s: float, wait_s: float = TAKEOVER_WAIT_S):
    """Make `root` the primary's root for `epoch`: with the sync lock held (no daemon writes
    here meanwhile), restart its change log from the tree it holds. Idempotent."""
    if epoch <= 1:
        retired_file(root).unlink(missing_ok=True)
        return
    lock = root.hold_sync_lock(wait_s)
    try:
        changes = ChangeLog(root.state_dir / "changes.sqlite", retention_s)
        try:
            if changes.epoch() < epoch or changes.floor() < epoch_floor(epoch):
                files = [
                    (f.path, sha256_file(root.file(f.path)), f.size, f.mtime) for f in root.walk()
                ]
                changes.restart(epoch_floor(epoch), epoch, files)
                log.warning(
                    "primary in epoch %d: a change log from serial %d with %d files",
                    epoch,
                    epoch_floor(epoch),
                    len(files),
                )
        finally:
            changes.close()
        retired_file(root).unlink(missing_ok=True)
    finally:
        lock.close()


def retire(root: ContentRoot, epoch: int, primary: str) -> None:
    if (root.state_dir / "changes.sqlite").exists():
        atomic.write_bytes(
            retired_file(root), f"epoch {epoch} names {primary} the primary\n".encode()
        )


class MirrorRole:
    """Which role this region's mirror has now, and the config for it.

    `make_config(topology)` builds the node's `MirrorConfig` from a topology whose primary is
    the epoch's (so `is_primary`, `primary_url` and `website_url` follow it).
    """

    def __init__(self, topology, region: str, make_config: Callable, keyring=None):
        self.region = region
        self.make_config = make_config
        source = Path(topology.source)
        file = epoch_file_for(source) if source.suffix == ".toml" else None
        # The region's epoch file when the mirror shares the gateway's folder, and its
        # gateway's `GET /_latitude/epoch` when it does not (or the file is behind).
        self.watch = EpochWatch(topology, keyring, file=file, ask=(region,))
        self.watch.refresh()

    @property
    def primary(self) -> str:
        return self.watch.primary

    @property
    def epoch(self) -> int:
        return self.watch.epoch.number

    def config(self):
        return self.make_config(self.watch.topology())

    async def changed(self, stop: asyncio.Event, primary: str) -> bool:
        """Wait until the primary is not `primary` (True) or `stop` is set (False)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_S)
            if stop.is_set():
                return False
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.watch.refresh)
            if self.watch.primary != primary:
                return True
        return False


async def _taking_over(cfg, epoch: int, stop) -> None:
    """`take_over`, retried while a sync daemon still holds the root (it stops within seconds
    of hearing of the epoch; one that never does is named in the log)."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(take_over, ContentRoot(cfg.root), epoch, cfg.retention_s)
            return
        except RuntimeError as exc:  # the sync lock: another process syncs into this root
            log.warning("cannot take over %s as primary yet: %s", cfg.root, exc)
            await asyncio.sleep(CHECK_S)


async def serve_following(role: MirrorRole, make_server, host: str, port: int, stop) -> None:
    """`latitude mirror serve`: the server for the current role, rebuilt when it changes."""
    while not stop.is_set():
        primary, cfg = role.primary, role.config()
        if cfg.is_primary:
            await _taking_over(cfg, role.epoch, stop)
        else:
            await asyncio.to_thread(retire, ContentRoot(cfg.root).ensure(), role.epoch, primary)
        server = make_server(cfg)
        await server.start(host, port)
        log.info("serving %s as %s", role.region, "primary" if cfg.is_primary else "mirror")
        try:
            moved = await role.changed(stop, primary)
        finally:
            await server.close()
        if moved:
            log.warning("the primary moved to %s: serving in the new role", role.primary)


async def sync_following(role: MirrorRole, make_daemon, stop) -> None:
    """`latitude mirror sync`: follow the current primary's feed; idle while this region is the
    primary (after taking its root over), and follow the new primary when it moves."""
    while not stop.is_set():
        primary, cfg = role.primary, role.config()
        if cfg.is_primary:
            await _taking_over(cfg, role.epoch, stop)
            log.info("%s is the primary: it publishes, nothing to sync", role.region)
            await role.changed(stop, primary)
            continue
        daemon = make_daemon(cfg)
        task = asyncio.create_task(daemon.run())
        changed = asyncio.create_task(role.changed(stop, primary))
        await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
        daemon.stop()
        try:
            await asyncio.wait_for(task, 5.0)
        except TimeoutError:
            pass  # cancelled by wait_for: the lock is released in its finally
        changed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await changed
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
        if not stop.is_set():
            log.warning("the primary moved to %s: following it", role.primary)

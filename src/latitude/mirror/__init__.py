"""The metadata mirror network (architecture A).

* `publisher`  the primary's API: publish / delete files, each change with a serial
* `changelog`  the change log behind it (retention, resync, snapshots)
* `feed`       the long-polled, signed change feed, both ends
* `sync`       the sync daemon a mirror runs
* `server`     `latitude mirror serve`: local copy, fallback to the primary, health
* `nginx`      the same serving rules as an nginx config, for production
* `store`      a content root on disk: atomic writes, the cursor
"""

from latitude.mirror.changelog import Change, ChangeLog, Page
from latitude.mirror.config import MirrorConfig, MirrorConfigError, mirror_keyring
from latitude.mirror.feed import FeedClient, FeedError, FeedServer
from latitude.mirror.nginx import nginx_config
from latitude.mirror.publisher import Item, Publisher
from latitude.mirror.server import MirrorServer
from latitude.mirror.store import ContentRoot
from latitude.mirror.sync import BatchFailed, SyncDaemon

__all__ = [
    "BatchFailed",
    "Change",
    "ChangeLog",
    "ContentRoot",
    "FeedClient",
    "FeedError",
    "FeedServer",
    "Item",
    "MirrorConfig",
    "MirrorConfigError",
    "MirrorServer",
    "Page",
    "Publisher",
    "SyncDaemon",
    "mirror_keyring",
    "nginx_config",
]

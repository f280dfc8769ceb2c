"""Losing the primary region and keeping writing: the primary epoch, planned switchover, forced
failover, fencing and rejoin (docs/promotion.md)."""

from latitude.promotion.epoch import Epoch, EpochError, sign_epoch, verify_epoch
from latitude.promotion.failover import failover
from latitude.promotion.journal import BadPromotion, PromotionError
from latitude.promotion.switchover import switchover

__all__ = [
    "BadPromotion",
    "Epoch",
    "EpochError",
    "PromotionError",
    "failover",
    "sign_epoch",
    "switchover",
    "verify_epoch",
]

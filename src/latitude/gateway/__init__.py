"""The region gateway: reads served locally, writes forwarded to the primary region."""

from latitude.gateway.classify import Decision, classify
from latitude.gateway.config import GatewayConfig, GatewayConfigError
from latitude.gateway.middleware import RegionGateway
from latitude.gateway.upstream import HttpUpstream

__all__ = [
    "Decision",
    "GatewayConfig",
    "GatewayConfigError",
    "HttpUpstream",
    "RegionGateway",
    "classify",
]

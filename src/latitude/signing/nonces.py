"""Nonces: fresh ones for signing, and the replay caches that remember the ones seen."""

from __future__ import annotations

import base64
import heapq
import math
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from latitude.signing.errors import NonceCacheError


def new_nonce() -> str:
    """128 random bits, base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


@runtime_checkable
class NonceCache(Protocol):
    """A replay cache shared by every process that verifies."""

    async def add_if_new(self, nonce: str, ttl_seconds: float) -> bool:
        """Record ``nonce`` for ``ttl_seconds``; ``False`` if it was already recorded."""
        ...


class MemoryNonceCache:
    """In-process replay cache (tests, single-process deployments). Entries expire."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            at, nonce = heapq.heappop(self._heap)
            if self._expiry.get(nonce) == at:
                del self._expiry[nonce]

    async def add_if_new(self, nonce: str, ttl_seconds: float) -> bool:
        now = self._clock()
        self._purge(now)
        if nonce in self._expiry:
            return False
        at = now + max(float(ttl_seconds), 0.001)
        self._expiry[nonce] = at
        heapq.heappush(self._heap, (at, nonce))
        return True

    def __len__(self) -> int:
        self._purge(self._clock())
        return len(self._expiry)


class ValkeyNonceCache:
    """Replay cache in Valkey/Redis (``SET key 1 NX EX ttl``), shared by all processes."""

    def __init__(
        self, redis_client: Any, prefix: str = "latitude:nonce:", *, owns_client: bool = False
    ) -> None:
        self._client = redis_client
        self._prefix = prefix
        self._owns_client = owns_client  # made for this cache: closed with it

    async def close(self) -> None:
        """Release the client's connection if this cache was given its own."""
        if self._owns_client:
            await self._client.aclose()

    async def add_if_new(self, nonce: str, ttl_seconds: float) -> bool:
        ttl = max(1, math.ceil(ttl_seconds))
        try:
            result = await self._client.set(self._prefix + nonce, b"1", nx=True, ex=ttl)
        except Exception as exc:
            raise NonceCacheError(
                f"replay cache unreachable ({type(exc).__name__}: {exc}); refusing to verify"
            ) from exc
        return bool(result)

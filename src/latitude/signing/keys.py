"""Shared HMAC secrets with ids, and the keyring that rotates them."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latitude.topology import Topology

MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class SigningKey:
    """A shared HMAC secret with an id. The secret never appears in ``repr``."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not self.key_id:
            raise ValueError("signing key id must be a non-empty string")
        if any(not (" " < c <= "~") for c in self.key_id):
            raise ValueError(
                f"signing key id {self.key_id!r} must be printable ASCII without spaces"
            )
        if not isinstance(self.secret, bytes | bytearray):
            raise ValueError(f"secret of signing key {self.key_id!r} must be bytes")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"secret of signing key {self.key_id!r} is {len(self.secret)} bytes; "
                f"at least {MIN_SECRET_BYTES} random bytes are required "
                "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        object.__setattr__(self, "secret", bytes(self.secret))

    @classmethod
    def generate(cls, key_id: str, nbytes: int = 32) -> SigningKey:
        """A key with a fresh random secret (tests, labs, first deployment)."""
        return cls(key_id, secrets.token_bytes(max(nbytes, MIN_SECRET_BYTES)))

    def sign(self, base: bytes) -> bytes:
        # The one-shot C path: no HMAC object per call.
        return hmac.digest(self.secret, base, "sha256")


class Keyring:
    """Keys accepted for verification (rotation), one of which signs."""

    def __init__(self, keys: Iterable[SigningKey], signing_key_id: str) -> None:
        by_id: dict[str, SigningKey] = {}
        for key in keys:
            if not isinstance(key, SigningKey):
                raise ValueError(f"keyring entries must be SigningKey, not {type(key).__name__}")
            if key.key_id in by_id:
                raise ValueError(f"signing key id {key.key_id!r} appears twice in the keyring")
            by_id[key.key_id] = key
        if signing_key_id not in by_id:
            known = ", ".join(sorted(by_id)) or "none"
            raise ValueError(
                f"signing key id {signing_key_id!r} is not among the keyring's keys ({known})"
            )
        self._keys = by_id
        self.signing_key_id = signing_key_id

    @property
    def signing_key(self) -> SigningKey:
        return self._keys[self.signing_key_id]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def get(self, key_id: str) -> SigningKey | None:
        return self._keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Keyring(key_ids={list(self._keys)!r}, signing_key_id={self.signing_key_id!r})"


class SigningConfigError(ValueError):
    """The topology names no signing key, or a key whose secret is not set (or too short)."""


def keyring_from_topology(topology: Topology, environ: Mapping[str, str] | None = None) -> Keyring:
    """The region keyring the topology's `[signing]` table describes: every key, with its secret
    from the environment, signing with `sign_with` (default: the first).

    Fails closed: a key whose secret is unset, or no key at all, is a `SigningConfigError` that
    names the setting and the fix; nothing ever falls back to unsigned.
    """
    environ = os.environ if environ is None else environ
    keys = []
    for spec in topology.signing_keys:
        secret = spec.secret or (environ.get(spec.env) or "").encode() or None
        if secret is None:
            raise SigningConfigError(
                f"signing key {spec.id}: environment variable {spec.env} (named in the "
                f"topology's [signing] keys) is not set; set it to the same secret in every "
                f"region, e.g. `export {spec.env}=$(openssl rand -base64 48)`"
            )
        try:
            keys.append(SigningKey(spec.id, secret))
        except ValueError as exc:
            raise SigningConfigError(f"{exc} (environment variable {spec.env})") from None
    if not keys:
        raise SigningConfigError(
            f"no signing key in {topology.source}: add a [signing] table with "
            'keys = [{ id = "k1", env = "LATITUDE_KEY_K1" }] and set LATITUDE_KEY_K1 to the '
            "same secret in every region (e.g. `export LATITUDE_KEY_K1=$(openssl rand -base64 48)`)"
        )
    return Keyring(keys, topology.sign_with or keys[0].key_id)

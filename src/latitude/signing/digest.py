"""RFC 9530 ``Content-Digest``: computed while a body streams past, checked failing closed."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any

from latitude.signing.canonical import byte_sequence_text, read_dictionary
from latitude.signing.errors import DigestMismatch

_DIGEST_ALGORITHMS: dict[str, Callable[..., Any]] = {
    "sha-256": hashlib.sha256,
    "sha-512": hashlib.sha512,
}


def _member(alg: str, digest: bytes) -> str:
    # The algorithm names are fixed, valid keys: writing the member directly is exact and
    # skips a general serializer.
    return f"{alg}={byte_sequence_text(digest)}"


def _hash(algorithm: str) -> Callable[..., Any]:
    try:
        return _DIGEST_ALGORITHMS[algorithm]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported digest algorithm {algorithm!r}; use one of {sorted(_DIGEST_ALGORITHMS)}"
        ) from None


def content_digest(body: bytes | bytearray | memoryview, algorithm: str = "sha-256") -> str:
    """``Content-Digest`` value for a whole body: ``sha-256=:<base64>:``."""
    return _member(algorithm, _hash(algorithm)(body).digest())


class ContentDigest:
    """Streaming ``Content-Digest``: feed chunks with ``update``, read ``header_value()``."""

    def __init__(self, algorithms: Sequence[str] = ("sha-256",)) -> None:
        if isinstance(algorithms, str):
            algorithms = (algorithms,)
        if not algorithms:
            raise ValueError("ContentDigest needs at least one algorithm")
        self._hashes = {alg: _hash(alg)() for alg in dict.fromkeys(algorithms)}
        self.length = 0

    @classmethod
    def for_header(cls, header_value: str | None) -> ContentDigest:
        """A digest computing the supported algorithms a received header lists."""
        members = _parse_digest_header(header_value)
        known = [alg for alg in members if alg in _DIGEST_ALGORITHMS]
        if not known:
            raise DigestMismatch(
                f"Content-Digest lists only unsupported algorithms ({', '.join(members)}); "
                f"supported: {', '.join(_DIGEST_ALGORITHMS)}"
            )
        return cls(known)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self._hashes)

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        for h in self._hashes.values():
            h.update(chunk)
        self.length += len(chunk)

    def digests(self) -> dict[str, bytes]:
        return {alg: h.digest() for alg, h in self._hashes.items()}

    def header_value(self) -> str:
        return ", ".join(_member(alg, h.digest()) for alg, h in self._hashes.items())


def _parse_digest_header(header_value: str | None) -> dict[str, bytes]:
    if header_value is None or not header_value.strip():
        raise DigestMismatch("Content-Digest header is missing")
    text = header_value.strip()
    try:
        members = read_dictionary(text)
    except ValueError as exc:
        raise DigestMismatch(f"Content-Digest header is malformed: {exc}") from None
    out: dict[str, bytes] = {}
    for alg, (value, _params) in members.items():
        if type(value) is not bytes:
            raise DigestMismatch(f"Content-Digest member {alg!r} is not a byte sequence")
        out[alg] = value
    return out


def verify_content_digest(
    header_value: str | None, body_or_digest: bytes | bytearray | memoryview | ContentDigest
) -> None:
    """Check a ``Content-Digest`` header against a body (or a streamed ``ContentDigest``).

    Fails closed: raises ``DigestMismatch`` if the header is missing or malformed, lists
    only unsupported algorithms, or any supported algorithm checked does not match.
    """
    members = _parse_digest_header(header_value)
    if isinstance(body_or_digest, ContentDigest):
        computed = body_or_digest.digests()
    else:
        computed = {
            alg: _DIGEST_ALGORITHMS[alg](body_or_digest).digest()
            for alg in members
            if alg in _DIGEST_ALGORITHMS
        }
    checked = [alg for alg in members if alg in computed]
    if not checked:
        raise DigestMismatch(
            f"Content-Digest lists {', '.join(members)} but the body was hashed with "
            f"{', '.join(computed) or 'nothing'}; supported: {', '.join(_DIGEST_ALGORITHMS)}"
        )
    for alg in checked:
        if not hmac.compare_digest(members[alg], computed[alg]):
            raise DigestMismatch(f"Content-Digest {alg} does not match the body")

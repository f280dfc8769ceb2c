"""The position of a client's last write, in an HMAC-signed, expiring cookie (``latitude_pos``).

The replica region's gateway keeps the primary's position after a write here, bound to the
region that issued it; a later read in that region waits for it (see :mod:`.policy`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from latitude.consistency.position import ReplicationPosition
from latitude.cookies import from_cookie_header

__all__ = ["CookieClaim", "PositionCookie"]

_COOKIE_KEY_LABEL = b"latitude position cookie v1"
_COOKIE_MAX_LEN = 512
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class CookieClaim:
    position: ReplicationPosition
    region: str
    expires_at: int


class PositionCookie:
    """The replication position of a client's last write, in a signed, expiring cookie.

    Value: ``base64url("<position>|<expires unix s>|<region>") "." base64url(hmac-sha256)``, the
    position with its timeline when known (``00000002/16/B374D848``; a cookie issued before
    positions carried one holds ``16/B374D848`` and still reads). The MAC
    key is derived from ``secret`` (so the signing secret can be shared safely). A cookie that is
    missing, unsigned, forged, tampered, expired or malformed reads as ``None``: the read then
    simply does not wait, which is what a client without a cookie gets too.
    """

    def __init__(self, secret: bytes, name: str = "latitude_pos", max_age_s: int = 30):
        if not isinstance(secret, bytes | bytearray) or len(secret) < 16:
            raise ValueError("PositionCookie needs a secret of at least 16 bytes")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{name!r} is not a usable cookie name")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s!r}")
        self.name = name
        self.max_age_s = int(max_age_s)
        self._key = hmac.new(bytes(secret), _COOKIE_KEY_LABEL, hashlib.sha256).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, self.name.encode() + b"\x00" + payload, hashlib.sha256).digest()

    def issue(self, position: ReplicationPosition, region: str, now: float | None = None) -> str:
        if not isinstance(position, ReplicationPosition):
            raise TypeError(f"position must be a ReplicationPosition, got {position!r}")
        if not _REGION_RE.fullmatch(region):
            raise ValueError(f"{region!r} is not a region name")
        expires = int(time.time() if now is None else now) + self.max_age_s
        payload = f"{position}|{expires}|{region}".encode("ascii")
        return f"{_b64e(payload)}.{_b64e(self._mac(payload))}"

    def read_claim(self, value: str | None, now: float | None = None) -> CookieClaim | None:
        """The verified contents of a cookie value, or ``None``. Never raises."""
        try:
            if not value or not isinstance(value, str) or len(value) > _COOKIE_MAX_LEN:
                return None
            body, sep, mac = value.partition(".")
            if not sep:
                return None
            payload = _b64d(body)
            if not hmac.compare_digest(_b64d(mac), self._mac(payload)):
                return None
            lsn, expires_text, region = payload.decode("ascii").split("|")
            if not expires_text.isdigit():
                return None
            expires = int(expires_text)
            if (time.time() if now is None else now) >= expires:
                return None
            return CookieClaim(ReplicationPosition.parse(lsn), region, expires)
        except (ValueError, TypeError, binascii.Error, UnicodeError):
            return None

    def read(self, value: str | None, now: float | None = None) -> ReplicationPosition | None:
        """The position in a cookie value, or ``None`` (missing, forged, expired...)."""
        claim = self.read_claim(value, now)
        return claim.position if claim else None

    def value_from_header(self, cookie_header: str | None) -> str | None:
        """This cookie's value in a request's ``Cookie`` header, if present."""
        return from_cookie_header(cookie_header, self.name)

    def set_cookie_header(self, value: str, secure: bool) -> str:
        """A ``Set-Cookie`` header value carrying ``value``."""
        attrs = f"{self.name}={value}; Path=/; Max-Age={self.max_age_s}; HttpOnly; SameSite=Lax"
        return attrs + "; Secure" if secure else attrs

    def clear_cookie_header(self, secure: bool) -> str:
        """A ``Set-Cookie`` header value that deletes the cookie."""
        attrs = f"{self.name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
        return attrs + "; Secure" if secure else attrs

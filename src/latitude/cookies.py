"""Reading cookies: the one parser for `Cookie` and `Set-Cookie` values (the session id, the
read-your-writes position), so every part of Latitude reads a cookie the same way."""

from __future__ import annotations

from collections.abc import Iterable

HeaderPairs = Iterable[tuple[bytes | str, bytes | str]]


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def from_cookie_header(cookie_header: str | None, name: str) -> str | None:
    """Cookie `name`'s value in one `Cookie` header (quotes removed), or None."""
    if not cookie_header or name not in cookie_header:  # the common case, at a glance
        return None
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def cookie_value(headers: HeaderPairs, name: str) -> str | None:
    """Cookie `name`'s value among a request's headers (every `Cookie` header), or None."""
    for k, v in headers:
        if (k.lower() == b"cookie") if isinstance(k, bytes) else (k.lower() == "cookie"):
            value = from_cookie_header(_text(v), name)
            if value is not None:
                return value
    return None


def set_cookie_value(headers: HeaderPairs, name: str) -> str | None:
    """The value a response's `Set-Cookie` gives cookie `name` (None if it sets none)."""
    for k, v in headers:
        if _text(k).lower() != "set-cookie":
            continue
        cname, _, cvalue = _text(v).split(";", 1)[0].partition("=")
        if cname.strip() == name:
            return cvalue.strip().strip('"')
    return None

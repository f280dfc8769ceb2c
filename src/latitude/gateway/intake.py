"""What the gateway refuses at the edge, before anything runs or is forwarded.

Every region checks the same things in the same order, so a request gets the same answer
wherever it lands (docs/gateway.md, "What the gateway refuses, and with what status"):

1. a header over `max_header_bytes`, or all of them over `max_headers_bytes`: `431`;
2. a control byte in any header, a non-ASCII byte in a header the forwarding signature covers
   (it can only sign visible ASCII), or a header that is not UTF-8 (it could not be carried
   byte for byte): `400`;
3. a `Host` that is not one `host[:port]` (it is written into `Forwarded` for the primary's
   app; nothing a client sends may change what that header says): `400`;
4. a request target that is not a path and query (`check_target`: an absolute URL, `*`, or a
   `#`, which no client sends and which could not reach the primary's app as sent): `400`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Headers whose value a forwarded request's signature covers (Host as @authority's source).
SIGNED_HEADERS = frozenset(
    {b"cookie", b"authorization", b"content-type", b"idempotency-key", b"host"}
)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
# Anything but tab and visible ASCII: a value without one needs none of the checks below.
_NOT_PLAIN = re.compile(rb"[^\x09\x20-\x7e]")
# A DNS name, an IPv4 address or a bracketed IPv6 address, and an optional port.
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)


@dataclass
class Refusal:
    status: int
    title: str
    detail: str


def check_request(
    headers: list[tuple[bytes, bytes]], *, max_header_bytes: int, max_headers_bytes: int
) -> Refusal | None:
    """The first reason to refuse these request headers, or None."""
    total = 0
    hosts = []
    for name, value in headers:
        size = len(name) + len(value)
        total += size + 4  # ": " and CRLF, as on the wire
        if name == b"host":
            hosts.append(value)
        if size <= max_header_bytes and _NOT_PLAIN.search(value) is None:
            continue
        shown = name.decode("latin-1")
        if size > max_header_bytes:
            return Refusal(
                431,
                "Request header too large",
                f"The {shown} header is {size:,} bytes; the limit is {max_header_bytes:,} bytes "
                "per header ([gateway] max_header_bytes).",
            )
        bad = _CONTROL.search(value)
        if bad:
            return Refusal(
                400,
                "Bad request header",
                f"The {shown} header holds the control byte 0x{bad.group()[0]:02x} at position "
                f"{bad.start()}; remove it.",
            )
        if name in SIGNED_HEADERS:
            bad = _NON_ASCII.search(value)
            if bad:
                return Refusal(
                    400,
                    "Bad request header",
                    f"The {shown} header holds the non-ASCII byte 0x{bad.group()[0]:02x} at "
                    f"position {bad.start()}; only ASCII can be carried in it (percent-encode "
                    "the value).",
                )
        elif _NON_ASCII.search(value):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return Refusal(
                    400,
                    "Bad request header",
                    f"The {shown} header is not valid UTF-8 (byte {exc.start}); send it as "
                    "ASCII or UTF-8.",
                )
    if total > max_headers_bytes:
        return Refusal(
            431,
            "Request headers too large",
            f"The request's headers are {total:,} bytes together; the limit is "
            f"{max_headers_bytes:,} bytes ([gateway] max_headers_bytes).",
        )
    if len(hosts) > 1:
        return Refusal(400, "Bad Host header", "The request has more than one Host header.")
    if hosts and not valid_host(hosts[0].decode("ascii")):
        return Refusal(
            400,
            "Bad Host header",
            f"The Host header {hosts[0].decode('ascii')[:100]!r} is not a host[:port].",
        )
    return None


def check_target(raw_path: bytes) -> Refusal | None:
    """The request target (before `?`) must be a path: `/...` without a fragment."""
    if raw_path.startswith(b"/") and b"#" not in raw_path:
        return None
    shown = raw_path.decode("latin-1")[:100]
    return Refusal(
        400,
        "Bad request target",
        f"The request target {shown!r} is not a path; send the path and query only "
        "(GET /path?query), without a #fragment.",
    )


def valid_host(value: str) -> bool:
    """Whether `value` is one `host[:port]` (a name, an IPv4 or a bracketed IPv6 address)."""
    if not _HOST.fullmatch(value):
        return False
    port = value.rpartition(":")[2] if not value.endswith("]") and ":" in value else None
    return port is None or 0 < int(port) <= 65535

# Frozen copy of src/latitude/signing.py at b55a3bf, before the split into a package: the
# baseline benchmarks/bench_signing.py times the package against in the same run. Do not edit.
"""RFC 9421 HTTP Message Signatures (``hmac-sha256``) and RFC 9530 ``Content-Digest``.

A replica region signs every request it forwards to the primary region; the primary
verifies it (key, time window, replay cache of nonces, covered components, body digest)
before running anything, and signs its answer bound to that very request.

Wire format (label ``latitude``)::

    Content-Digest: sha-256=:<base64 of sha256(body)>:
    Signature-Input: latitude=("@method" "@authority" "@path" "@query" "content-digest" ...)
        ;created=1700000000;expires=1700000030;keyid="k1";alg="hmac-sha256"
        ;nonce="<22 chars base64url>";tag="latitude-request"
    Signature: latitude=:<base64 of hmac-sha256(secret, signature base)>:

The response signature covers ``@status``, the response headers present among a list
(content digest, session, replication position, ...) and ``"signature";req;key="latitude"``:
the request's own signature value (RFC 9421 section 2.4), which itself covers the request's
random nonce. An answer therefore verifies only against the request it was made for.

Header values must be ASCII (visible characters, spaces and tabs): a value outside that
range cannot be put in a signature base and is refused, never silently altered.

This module is a leaf: it imports no other ``latitude`` module. Structured fields
(RFC 8941) are parsed and serialized by the small implementation below, which covers
dictionaries, inner lists, parameters and every bare item type.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

__all__ = [
    "ALGORITHM",
    "DEFAULT_LABEL",
    "MUST_COVER_REQUEST_HEADERS",
    "MUST_COVER_RESPONSE_HEADERS",
    "REQUEST_COVERED_HEADERS",
    "REQUEST_DERIVED_COMPONENTS",
    "REQUEST_TAG",
    "REQUIRED_REQUEST_COMPONENTS",
    "REQUIRED_RESPONSE_COMPONENTS",
    "RESPONSE_COVERED_HEADERS",
    "RESPONSE_TAG",
    "BadSignature",
    "Component",
    "ContentDigest",
    "DigestMismatch",
    "ExpiredSignature",
    "Keyring",
    "MalformedSignature",
    "MemoryNonceCache",
    "MissingComponent",
    "MissingSignature",
    "NonceCache",
    "NonceCacheError",
    "ReplayedNonce",
    "SignatureError",
    "SigningKey",
    "Token",
    "UnknownKey",
    "ValkeyNonceCache",
    "VerifiedSignature",
    "content_digest",
    "new_nonce",
    "parse_dictionary",
    "serialize_dictionary",
    "sign_request",
    "sign_response",
    "signature_base",
    "verify_content_digest",
    "verify_request",
    "verify_response",
]

ALGORITHM = "hmac-sha256"
DEFAULT_LABEL = "latitude"
REQUEST_TAG = "latitude-request"
RESPONSE_TAG = "latitude-response"
MIN_SECRET_BYTES = 32
DEFAULT_TTL = 30
DEFAULT_CLOCK_SKEW = 5
DEFAULT_MAX_AGE = 300

#: Derived components a forwarded request is signed over. ``@target-uri`` is avoided by
#: default: a TLS terminator in front of the primary changes the scheme, not the authority.
REQUEST_DERIVED_COMPONENTS: tuple[str, ...] = ("@method", "@authority", "@path", "@query")
#: Request headers covered when present at signing time.
REQUEST_COVERED_HEADERS: tuple[str, ...] = (
    "content-digest",
    "content-type",
    "idempotency-key",
    "forwarded",
    "latitude-session",
)
#: Components a verified request must cover. ``@target-uri`` satisfies the URI parts.
REQUIRED_REQUEST_COMPONENTS: tuple[str, ...] = (
    "@method",
    "@authority",
    "@path",
    "@query",
    "content-digest",
)
#: Request headers that, when present, must be covered (so none can be injected).
MUST_COVER_REQUEST_HEADERS: tuple[str, ...] = (
    "content-digest",
    "idempotency-key",
    "forwarded",
    "latitude-session",
)
#: Response headers covered when present at signing time.
RESPONSE_COVERED_HEADERS: tuple[str, ...] = (
    "content-digest",
    "content-type",
    "location",
    "latitude-session",
    "latitude-position",
)
#: Components a verified response must cover (the request binding is always required).
REQUIRED_RESPONSE_COMPONENTS: tuple[str, ...] = ("@status", "content-digest")
#: Response headers that, when present, must be covered.
MUST_COVER_RESPONSE_HEADERS: tuple[str, ...] = (
    "content-digest",
    "latitude-session",
    "latitude-position",
)

_MAX_COMPONENTS = 64
_MAX_NONCE_LENGTH = 128
_URI_PARTS = frozenset({"@authority", "@path", "@query", "@scheme"})
_REQUEST_DERIVED = frozenset({"@method", "@target-uri", "@authority", "@scheme", "@path", "@query"})


# --------------------------------------------------------------------------- errors


class SignatureError(Exception):
    """A signature or digest could not be verified; the message says what is wrong."""


class MissingSignature(SignatureError):
    """The message carries no signature with the expected label."""


class MalformedSignature(SignatureError):
    """``Signature-Input`` / ``Signature`` cannot be parsed or breaks a rule."""


class UnknownKey(SignatureError):
    """The ``keyid`` is not in the keyring."""


class BadSignature(SignatureError):
    """The signature value does not match the signature base."""


class ExpiredSignature(SignatureError):
    """Expired, too old, or created in the future beyond the allowed clock skew."""


class ReplayedNonce(SignatureError):
    """The nonce was already seen within its lifetime."""


class MissingComponent(SignatureError):
    """A required component is not covered, or a covered component is absent."""


class DigestMismatch(SignatureError):
    """``Content-Digest`` is missing, malformed, unsupported or does not match the body."""


class NonceCacheError(RuntimeError):
    """The replay cache could not be reached: fail closed (answer 503, run nothing)."""


# ------------------------------------------------------- structured fields (RFC 8941)


class Token(str):
    """A structured-field token (serialized bare, unlike a quoted string)."""

    __slots__ = ()


class _SFError(ValueError):
    pass


_DIGITS = "0123456789"
_LCALPHA = "abcdefghijklmnopqrstuvwxyz"
_ALPHA = _LCALPHA + _LCALPHA.upper()
_TCHAR = set("!#$%&'*+-.^_`|~" + _DIGITS + _ALPHA)
_TOKEN_CHARS = _TCHAR | {":", "/"}
_KEY_FIRST = set(_LCALPHA + "*")
_KEY_CHARS = set(_LCALPHA + _DIGITS + "_-.*")
_B64_RE = re.compile(r"[A-Za-z0-9+/=]*")
_MAX_INT = 999_999_999_999_999

BareItem = int | float | str | bytes | bool
Params = dict[str, BareItem]


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, what: str) -> _SFError:
        return _SFError(f"{what} at character {self.i} of {self.s!r}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip_sp(self) -> None:
        while self.peek() == " ":
            self.i += 1

    def skip_ows(self) -> None:
        while self.peek() in (" ", "\t") and self.peek():
            self.i += 1

    def key(self) -> str:
        start = self.i
        if self.peek() not in _KEY_FIRST or not self.peek():
            raise self.fail("expected a key (lowercase letter or '*')")
        self.i += 1
        while self.peek() and self.peek() in _KEY_CHARS:
            self.i += 1
        return self.s[start : self.i]

    def parameters(self) -> Params:
        params: Params = {}
        while self.peek() == ";":
            self.i += 1
            self.skip_sp()
            k = self.key()
            value: BareItem = True
            if self.peek() == "=":
                self.i += 1
                value = self.bare_item()
            params[k] = value
        return params

    def item(self) -> tuple[BareItem, Params]:
        value = self.bare_item()
        return value, self.parameters()

    def item_or_inner_list(self) -> tuple[Any, Params]:
        if self.peek() == "(":
            return self.inner_list()
        return self.item()

    def inner_list(self) -> tuple[list[tuple[BareItem, Params]], Params]:
        self.i += 1  # "("
        items: list[tuple[BareItem, Params]] = []
        while self.i < len(self.s):
            self.skip_sp()
            if self.peek() == ")":
                self.i += 1
                return items, self.parameters()
            items.append(self.item())
            if self.peek() not in (" ", ")"):
                raise self.fail("expected a space or ')' in an inner list")
        raise self.fail("unterminated inner list")

    def bare_item(self) -> BareItem:
        c = self.peek()
        if c == "-" or (c and c in _DIGITS):
            return self.number()
        if c == '"':
            return self.string()
        if c == ":":
            return self.byte_sequence()
        if c == "?":
            return self.boolean()
        if c and (c in _ALPHA or c == "*"):
            return self.token()
        raise self.fail("expected an item")

    def number(self) -> int | float:
        start = self.i
        sign = 1
        if self.peek() == "-":
            sign = -1
            self.i += 1
        if not (self.peek() and self.peek() in _DIGITS):
            raise self.fail("expected a digit")
        digits_start = self.i
        is_decimal = False
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in _DIGITS:
                self.i += 1
            elif c == "." and not is_decimal:
                if self.i - digits_start > 12:
                    raise self.fail("too many integer digits in a decimal")
                is_decimal = True
                self.i += 1
            else:
                break
            if not is_decimal and self.i - digits_start > 15:
                raise self.fail("integer too long")
            if is_decimal and self.i - digits_start > 16:
                raise self.fail("decimal too long")
        text = self.s[digits_start : self.i]
        if not is_decimal:
            return sign * int(text)
        if text.endswith("."):
            raise self.fail("decimal ends with '.'")
        if len(text.split(".")[1]) > 3:
            self.i = start
            raise self.fail("more than 3 fractional digits")
        return sign * float(text)

    def string(self) -> str:
        self.i += 1  # opening quote
        out: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            self.i += 1
            if c == "\\":
                if self.i >= len(self.s):
                    raise self.fail("string ends after a backslash")
                nxt = self.s[self.i]
                if nxt not in ('"', "\\"):
                    raise self.fail("invalid escape in a string")
                out.append(nxt)
                self.i += 1
            elif c == '"':
                return "".join(out)
            elif not (" " <= c <= "~"):
                raise self.fail("invalid character in a string")
            else:
                out.append(c)
        raise self.fail("unterminated string")

    def token(self) -> Token:
        start = self.i
        self.i += 1
        while self.peek() and self.peek() in _TOKEN_CHARS:
            self.i += 1
        return Token(self.s[start : self.i])

    def byte_sequence(self) -> bytes:
        self.i += 1  # ":"
        end = self.s.find(":", self.i)
        if end < 0:
            raise self.fail("unterminated byte sequence")
        chunk = self.s[self.i : end]
        if not _B64_RE.fullmatch(chunk):
            raise self.fail("invalid base64 in a byte sequence")
        try:
            value = base64.b64decode(chunk, validate=True)
        except binascii.Error as exc:
            raise self.fail(f"invalid base64 in a byte sequence ({exc})") from None
        self.i = end + 1
        return value

    def boolean(self) -> bool:
        self.i += 1  # "?"
        c = self.peek()
        if c not in ("0", "1") or not c:
            raise self.fail("expected ?0 or ?1")
        self.i += 1
        return c == "1"


def parse_dictionary(text: str) -> dict[str, tuple[Any, Params]]:
    """Parse an RFC 8941 Dictionary into ``{key: (value, params)}``.

    ``value`` is a bare item, or a list of ``(bare_item, params)`` for an inner list.
    Raises ``ValueError`` naming the position of the first error.
    """
    p = _Parser(text)
    p.skip_sp()
    out: dict[str, tuple[Any, Params]] = {}
    while p.i < len(p.s):
        k = p.key()
        if p.peek() == "=":
            p.i += 1
            out[k] = p.item_or_inner_list()
        else:
            out[k] = (True, p.parameters())
        p.skip_ows()
        if p.i >= len(p.s):
            return out
        if p.peek() != ",":
            raise p.fail("expected ',' between dictionary members")
        p.i += 1
        p.skip_ows()
        if p.i >= len(p.s):
            raise p.fail("trailing ',' in a dictionary")
    return out


def _serialize_key(key: str) -> str:
    if not key or key[0] not in _KEY_FIRST or any(c not in _KEY_CHARS for c in key):
        raise ValueError(f"invalid structured-field key {key!r}")
    return key


def _serialize_bare(value: BareItem) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        if not -_MAX_INT <= value <= _MAX_INT:
            raise ValueError(f"integer {value} is out of structured-field range")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) >= 1e12:
            raise ValueError(f"decimal {value} is out of structured-field range")
        text = f"{round(value, 3):.3f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if isinstance(value, Token):
        if (
            not value
            or not (value[0] in _ALPHA or value[0] == "*")
            or any(c not in _TOKEN_CHARS for c in value)
        ):
            raise ValueError(f"invalid structured-field token {value!r}")
        return str(value)
    if isinstance(value, str):
        if any(not (" " <= c <= "~") for c in value):
            raise ValueError(f"string {value!r} has characters outside printable ASCII")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes | bytearray | memoryview):
        return ":" + base64.b64encode(bytes(value)).decode("ascii") + ":"
    raise TypeError(f"cannot serialize {type(value).__name__} as a structured-field item")


def _serialize_params(params: Mapping[str, BareItem]) -> str:
    out = []
    for k, v in params.items():
        out.append(";" + _serialize_key(k) + ("" if v is True else "=" + _serialize_bare(v)))
    return "".join(out)


def _serialize_member_value(value: Any, params: Mapping[str, BareItem]) -> str:
    if isinstance(value, list):
        inner = " ".join(_serialize_bare(v) + _serialize_params(p) for v, p in value)
        return "(" + inner + ")" + _serialize_params(params)
    return _serialize_bare(value) + _serialize_params(params)


def serialize_dictionary(members: Mapping[str, tuple[Any, Mapping[str, BareItem]]]) -> str:
    """Serialize ``{key: (value, params)}`` (the shape ``parse_dictionary`` returns)."""
    out = []
    for k, (value, params) in members.items():
        if value is True:
            out.append(_serialize_key(k) + _serialize_params(params))
        else:
            out.append(_serialize_key(k) + "=" + _serialize_member_value(value, params))
    return ", ".join(out)


# ------------------------------------------------------------------------------ keys


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
        return hmac.new(self.secret, base, hashlib.sha256).digest()


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


def new_nonce() -> str:
    """128 random bits, base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


# ------------------------------------------------------------------ Content-Digest


_DIGEST_ALGORITHMS: dict[str, Callable[[], Any]] = {
    "sha-256": hashlib.sha256,
    "sha-512": hashlib.sha512,
}


def content_digest(body: bytes, algorithm: str = "sha-256") -> str:
    """``Content-Digest`` value for a whole body: ``sha-256=:<base64>:``."""
    d = ContentDigest((algorithm,))
    d.update(body)
    return d.header_value()


class ContentDigest:
    """Streaming ``Content-Digest``: feed chunks with ``update``, read ``header_value()``."""

    def __init__(self, algorithms: Sequence[str] = ("sha-256",)) -> None:
        if isinstance(algorithms, str):
            algorithms = (algorithms,)
        if not algorithms:
            raise ValueError("ContentDigest needs at least one algorithm")
        for alg in algorithms:
            if alg not in _DIGEST_ALGORITHMS:
                raise ValueError(
                    f"unsupported digest algorithm {alg!r}; use one of {sorted(_DIGEST_ALGORITHMS)}"
                )
        self._hashes = {alg: _DIGEST_ALGORITHMS[alg]() for alg in dict.fromkeys(algorithms)}
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
        return serialize_dictionary({alg: (d, {}) for alg, d in self.digests().items()})


def _parse_digest_header(header_value: str | None) -> dict[str, bytes]:
    if header_value is None or not header_value.strip():
        raise DigestMismatch("Content-Digest header is missing")
    try:
        members = parse_dictionary(header_value.strip())
    except ValueError as exc:
        raise DigestMismatch(f"Content-Digest header is malformed: {exc}") from None
    if not members:
        raise DigestMismatch("Content-Digest header is empty")
    out: dict[str, bytes] = {}
    for alg, (value, _params) in members.items():
        if not isinstance(value, bytes):
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
        body = bytes(body_or_digest)
        computed = {
            alg: _DIGEST_ALGORITHMS[alg](body).digest()
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


# ---------------------------------------------------------------------- components


@dataclass(frozen=True)
class Component:
    """A component identifier: a lowercase name plus parameters (only ``req``/``key``)."""

    name: str
    params: tuple[tuple[str, BareItem], ...] = ()

    @classmethod
    def of(cls, spec: str | Component) -> Component:
        if isinstance(spec, Component):
            return spec
        if spec.startswith('"'):
            p = _Parser(spec)
            value, params = p.item()
            if p.i != len(spec) or not isinstance(value, str) or isinstance(value, Token):
                raise ValueError(f"invalid component identifier {spec!r}")
            return cls(value, tuple(params.items()))
        return cls(spec.lower())

    @property
    def req(self) -> bool:
        return dict(self.params).get("req") is True

    @property
    def key(self) -> str | None:
        value = dict(self.params).get("key")
        return value if isinstance(value, str) else None

    def serialize(self) -> str:
        return _serialize_bare(self.name) + _serialize_params(dict(self.params))

    def __str__(self) -> str:
        return self.serialize()


def _request_binding(label: str) -> Component:
    return Component("signature", (("req", True), ("key", label)))


@dataclass(frozen=True)
class _Message:
    headers: Any
    method: str | None = None
    url: str | None = None
    status: int | None = None
    request_headers: Any = None


def _field_values(headers: Any, name: str) -> list[str]:
    """All values of a header field, case-insensitively, from any common header shape."""
    if headers is None:
        return []
    raw: Iterable[Any]
    if hasattr(headers, "getall"):  # multidict / aiohttp
        raw = headers.getall(name, [])
    elif hasattr(headers, "getlist"):  # starlette
        raw = headers.getlist(name)
    elif hasattr(headers, "get_list"):  # httpx
        raw = headers.get_list(name)
    else:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        raw = []
        for k, v in pairs:
            k = k.decode("latin-1") if isinstance(k, bytes | bytearray) else k
            if k.lower() == name:
                raw.append(v)
    out = []
    for v in raw:
        if isinstance(v, bytes | bytearray):
            v = bytes(v).decode("latin-1")
        out.append(str(v))
    return out


def _field_value(headers: Any, name: str) -> str | None:
    values = _field_values(headers, name)
    if not values:
        return None
    return ", ".join(v.strip(" \t") for v in values)


def _check_ascii(what: str, value: str) -> str:
    for c in value:
        if not (" " <= c <= "~" or c == "\t"):
            raise MalformedSignature(
                f"{what} contains {c!r}: only visible ASCII, spaces and tabs can be signed"
            )
    return value


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _url_parts(url: str) -> tuple[str, str, str, str]:
    """``(scheme, authority, path, query)`` as RFC 9421 derives them."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MalformedSignature(f"target URI {url!r} is invalid: {exc}") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host:
        raise MalformedSignature(f"target URI {url!r} must be absolute (scheme://host/path)")
    if ":" in host:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = parts.path or "/"
    return scheme, authority, path, parts.query


def _validate_component(comp: Component, *, response: bool) -> None:
    """Context-free checks of one component identifier (before any value is read)."""
    name = comp.name
    allowed = {"req", "key"} if name == "signature" else set()
    for k, _v in comp.params:
        if k not in allowed:
            raise MalformedSignature(f"component {comp} has unsupported parameter {k!r}")
    if name == "signature":
        if not comp.req or comp.key is None:
            raise MalformedSignature(f'component {comp} must be "signature";req;key="<label>"')
        if not response:
            raise MalformedSignature(f"component {comp} is only valid in a response")
    elif name == "@status":
        if not response:
            raise MalformedSignature("component @status is only valid in a response")
    elif name.startswith("@"):
        if name not in _REQUEST_DERIVED:
            raise MalformedSignature(f"derived component {name} is not supported")
        if response:
            raise MalformedSignature(f"component {name} is only valid in a request")
    elif not name or name != name.lower() or any(c not in _TCHAR for c in name):
        raise MalformedSignature(f"component {comp} is not a lowercase header field name")


def _validate_components(comps: Sequence[Component], *, response: bool) -> None:
    seen: set[str] = set()
    for comp in comps:
        _validate_component(comp, response=response)
        ident = comp.serialize()
        if ident in seen:
            raise MalformedSignature(f"component {ident} is listed twice")
        seen.add(ident)


def _component_value(msg: _Message, comp: Component) -> str:
    name = comp.name
    if name == "signature":
        if msg.request_headers is None:
            raise MissingComponent(f"component {comp} needs the request's headers")
        raw = _field_value(msg.request_headers, "signature")
        try:
            members = parse_dictionary(raw) if raw else {}
        except ValueError as exc:
            raise MalformedSignature(f"request Signature header is malformed: {exc}") from None
        if comp.key not in members:
            raise MissingComponent(
                f"component {comp}: the request has no signature labelled {comp.key!r}"
            )
        value, params = members[comp.key]
        return _serialize_member_value(value, params)
    if name.startswith("@"):
        if name == "@status":
            if not isinstance(msg.status, int) or not 100 <= msg.status <= 999:
                raise MalformedSignature(f"response status {msg.status!r} is not 3 digits")
            return str(msg.status)
        if msg.method is None or msg.url is None:
            raise MalformedSignature(f"component {name} needs the request method and URL")
        if name == "@method":
            return _check_ascii("@method", msg.method)
        scheme, authority, path, query = _url_parts(msg.url)
        if name == "@target-uri":
            value = f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")
        else:
            value = {
                "@scheme": scheme,
                "@authority": authority,
                "@path": path,
                "@query": "?" + query,
            }[name]
        return _check_ascii(name, value)
    value = _field_value(msg.headers, name)
    if value is None:
        where = "response" if msg.status is not None else "request"
        raise MissingComponent(
            f"header {name!r} is covered by the signature but absent from the {where}"
        )
    return _check_ascii(f"header {name!r}", value)


def signature_base(
    components: Sequence[str | Component],
    params: Mapping[str, BareItem],
    *,
    headers: Any = None,
    method: str | None = None,
    url: str | None = None,
    status: int | None = None,
    request_headers: Any = None,
) -> str:
    """The RFC 9421 signature base (section 2.5) for the given message and components.

    A component is a lowercase header name, a derived component (``@method``,
    ``@target-uri``, ``@authority``, ``@scheme``, ``@path``, ``@query``, ``@status``) or
    ``Component`` / serialized identifier such as ``'"signature";req;key="latitude"'``.
    """
    comps = [Component.of(c) for c in components]
    msg = _Message(headers, method, url, status, request_headers)
    try:
        return _base(msg, comps, dict(params))
    except SignatureError as exc:
        raise ValueError(f"cannot build the signature base: {exc}") from None


def _signature_params(comps: Sequence[Component], params: Mapping[str, BareItem]) -> str:
    return _serialize_member_value([(c.name, dict(c.params)) for c in comps], params)


def _base(msg: _Message, comps: Sequence[Component], params: Mapping[str, BareItem]) -> str:
    _validate_components(comps, response=msg.status is not None)
    lines = [f"{comp.serialize()}: {_component_value(msg, comp)}" for comp in comps]
    lines.append(f'"@signature-params": {_signature_params(comps, params)}')
    return "\n".join(lines)


# --------------------------------------------------------------------------- signing


def _now(now: float | None) -> int:
    return int(time.time() if now is None else now)


def _sign(
    keyring: Keyring,
    msg: _Message,
    comps: list[Component],
    *,
    now: float | None,
    ttl: int,
    nonce: str | None,
    tag: str,
    label: str,
) -> dict[str, str]:
    if ttl <= 0:
        raise ValueError(f"signature ttl must be positive, got {ttl}")
    created = _now(now)
    key = keyring.signing_key
    params: Params = {
        "created": created,
        "expires": created + int(ttl),
        "keyid": key.key_id,
        "alg": ALGORITHM,
        "nonce": nonce if nonce is not None else new_nonce(),
        "tag": tag,
    }
    try:
        base = _base(msg, comps, params)
    except SignatureError as exc:
        raise ValueError(f"cannot sign: {exc}") from None
    sig = key.sign(base.encode("ascii"))
    _serialize_key(label)
    return {
        "Signature-Input": f"{label}={_signature_params(comps, params)}",
        "Signature": f"{label}={_serialize_bare(sig)}",
    }


def sign_request(
    keyring: Keyring,
    *,
    method: str,
    url: str,
    headers: Any,
    now: float | None = None,
    ttl: int = DEFAULT_TTL,
    nonce: str | None = None,
    covered: Sequence[str] = REQUEST_COVERED_HEADERS,
    derived: Sequence[str] = REQUEST_DERIVED_COMPONENTS,
    label: str = DEFAULT_LABEL,
) -> dict[str, str]:
    """Sign a request; returns the ``Signature-Input`` and ``Signature`` headers to add.

    Covers ``derived`` (default ``@method @authority @path @query``; pass
    ``("@method", "@target-uri")`` to cover the whole URI) and each header of ``covered``
    present in ``headers``. ``url`` is the absolute URL the request is sent to, with the
    path and query exactly as sent (percent-encoding included). Set ``Content-Digest``
    in ``headers`` before signing.
    """
    msg = _Message(headers, method=method, url=url)
    comps = [Component.of(d) for d in derived]
    for name in covered:
        name = name.lower()
        if _field_values(headers, name):
            comps.append(Component(name))
    return _sign(keyring, msg, comps, now=now, ttl=ttl, nonce=nonce, tag=REQUEST_TAG, label=label)


def sign_response(
    keyring: Keyring,
    *,
    status: int,
    headers: Any,
    request_headers: Any,
    now: float | None = None,
    ttl: int = DEFAULT_TTL,
    nonce: str | None = None,
    covered: Sequence[str] = RESPONSE_COVERED_HEADERS,
    label: str = DEFAULT_LABEL,
) -> dict[str, str]:
    """Sign a response bound to its request.

    Covers ``@status``, each header of ``covered`` present in ``headers``, and
    ``"signature";req;key="<label>"``: the request's signature, taken from
    ``request_headers`` (the verified request's headers).
    """
    msg = _Message(headers, status=status, request_headers=request_headers)
    comps = [Component("@status")]
    for name in covered:
        name = name.lower()
        if _field_values(headers, name):
            comps.append(Component(name))
    comps.append(_request_binding(label))
    return _sign(keyring, msg, comps, now=now, ttl=ttl, nonce=nonce, tag=RESPONSE_TAG, label=label)


# ------------------------------------------------------------------------ verifying


@dataclass(frozen=True)
class VerifiedSignature:
    """What a verified signature vouches for."""

    label: str
    key_id: str
    created: int
    expires: int
    nonce: str
    components: tuple[str, ...]  # serialized identifiers, e.g. '"@method"'
    signature: bytes = field(repr=False)

    def covers(self, name: str) -> bool:
        ident = Component.of(name).serialize()
        return ident in self.components

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(Component.of(c).name for c in self.components)


def _parse_signature(headers: Any, label: str) -> tuple[list[Component], Params, bytes]:
    raw_input = _field_value(headers, "signature-input")
    raw_sig = _field_value(headers, "signature")
    if raw_input is None and raw_sig is None:
        raise MissingSignature("the message has no Signature-Input and no Signature header")
    if raw_input is None:
        raise MissingSignature("the message has a Signature header but no Signature-Input")
    if raw_sig is None:
        raise MissingSignature("the message has a Signature-Input header but no Signature")
    try:
        inputs = parse_dictionary(raw_input)
    except ValueError as exc:
        raise MalformedSignature(f"Signature-Input header is malformed: {exc}") from None
    try:
        sigs = parse_dictionary(raw_sig)
    except ValueError as exc:
        raise MalformedSignature(f"Signature header is malformed: {exc}") from None
    if label not in inputs and label not in sigs:
        raise MissingSignature(
            f"no signature labelled {label!r} (labels present: {', '.join(inputs) or 'none'})"
        )
    if label not in inputs:
        raise MalformedSignature(f"Signature has label {label!r} but Signature-Input does not")
    if label not in sigs:
        raise MalformedSignature(f"Signature-Input has label {label!r} but Signature does not")
    items, params = inputs[label]
    if not isinstance(items, list):
        raise MalformedSignature(f"Signature-Input {label!r} is not an inner list of components")
    if len(items) > _MAX_COMPONENTS:
        raise MalformedSignature(f"Signature-Input {label!r} lists over {_MAX_COMPONENTS} items")
    comps = []
    for value, cparams in items:
        if not isinstance(value, str) or isinstance(value, Token):
            raise MalformedSignature(
                f"Signature-Input {label!r} component {value!r} is not a quoted string"
            )
        comps.append(Component(value, tuple(cparams.items())))
    sig, sig_params = sigs[label]
    if not isinstance(sig, bytes):
        raise MalformedSignature(f"Signature {label!r} is not a byte sequence")
    if sig_params:
        raise MalformedSignature(f"Signature {label!r} has unexpected parameters")
    return comps, params, sig


def _check_params(params: Params, label: str, tag: str) -> tuple[str, int, int, str]:
    def need(name: str, kind: type) -> Any:
        if name not in params:
            raise MalformedSignature(f"Signature-Input {label!r} lacks the {name!r} parameter")
        value = params[name]
        ok = isinstance(value, kind) and not isinstance(value, bool | Token)
        if not ok:
            raise MalformedSignature(
                f"Signature-Input {label!r} parameter {name!r} must be a {kind.__name__}"
            )
        return value

    key_id = need("keyid", str)
    created = need("created", int)
    expires = need("expires", int)
    nonce = need("nonce", str)
    alg = params.get("alg", ALGORITHM)
    if alg != ALGORITHM:
        raise MalformedSignature(
            f"Signature-Input {label!r} algorithm {alg!r} is not supported (only {ALGORITHM!r})"
        )
    got_tag = params.get("tag")
    if got_tag != tag:
        raise MalformedSignature(
            f"Signature-Input {label!r} tag is {got_tag!r}, expected {tag!r} "
            "(a request signature is not a response signature and vice versa)"
        )
    if not 1 <= len(nonce) <= _MAX_NONCE_LENGTH:
        raise MalformedSignature(f"Signature-Input {label!r} nonce has a bad length")
    return key_id, created, expires, nonce


def _check_coverage(
    msg: _Message,
    comps: Sequence[Component],
    required: Sequence[str],
    must_cover: Sequence[str],
    label: str,
) -> None:
    covered = {c.serialize() for c in comps}
    names = {c.name for c in comps if not c.params}
    for spec in required:
        comp = Component.of(spec)
        if comp.serialize() in covered:
            continue
        if not comp.params and comp.name in _URI_PARTS and "@target-uri" in names:
            continue
        raise MissingComponent(f"signature {label!r} does not cover required component {comp}")
    for name in must_cover:
        name = name.lower()
        if name not in names and _field_values(msg.headers, name):
            raise MissingComponent(
                f"header {name!r} is present but not covered by signature {label!r}"
            )


def _verify(
    keyring: Keyring,
    msg: _Message,
    *,
    now: float | None,
    required: Sequence[str],
    must_cover: Sequence[str],
    body: bytes | ContentDigest | None,
    label: str,
    tag: str,
    max_age: int,
    clock_skew: int,
) -> VerifiedSignature:
    comps, params, sig = _parse_signature(msg.headers, label)
    key_id, created, expires, nonce = _check_params(params, label, tag)
    key = keyring.get(key_id)
    if key is None:
        raise UnknownKey(f"signature {label!r} uses unknown key id {key_id!r}")
    _validate_components(comps, response=msg.status is not None)
    _check_coverage(msg, comps, required, must_cover, label)
    t = _now(now)
    if expires < created:
        raise MalformedSignature(f"signature {label!r} expires ({expires}) before created")
    if expires - created > max_age:
        raise ExpiredSignature(
            f"signature {label!r} lifetime {expires - created} s exceeds the maximum {max_age} s"
        )
    if created > t + clock_skew:
        raise ExpiredSignature(
            f"signature {label!r} was created {created - t} s in the future "
            f"(allowed clock skew {clock_skew} s)"
        )
    if t > expires + clock_skew:
        raise ExpiredSignature(f"signature {label!r} expired {t - expires} s ago")
    base = _base(msg, comps, params)
    expected = key.sign(base.encode("ascii"))
    if not hmac.compare_digest(expected, sig):
        raise BadSignature(
            f"signature {label!r} (key {key_id!r}) does not match the message: a covered "
            "component was changed or the secret differs"
        )
    if body is not None:
        verify_content_digest(_field_value(msg.headers, "content-digest"), body)
    return VerifiedSignature(
        label=label,
        key_id=key_id,
        created=created,
        expires=expires,
        nonce=nonce,
        components=tuple(c.serialize() for c in comps),
        signature=sig,
    )


async def verify_request(
    keyring: Keyring,
    *,
    method: str,
    url: str,
    headers: Any,
    nonce_cache: NonceCache,
    now: float | None = None,
    required: Sequence[str] = REQUIRED_REQUEST_COMPONENTS,
    must_cover: Sequence[str] = MUST_COVER_REQUEST_HEADERS,
    body: bytes | ContentDigest | None = None,
    label: str = DEFAULT_LABEL,
    max_age: int = DEFAULT_MAX_AGE,
    clock_skew: int = DEFAULT_CLOCK_SKEW,
) -> VerifiedSignature:
    """Verify a forwarded request, then record its nonce; raise a ``SignatureError``.

    ``url`` is the absolute URL as received (raw, percent-encoded path and query).
    ``body`` (bytes or a ``ContentDigest`` fed while streaming) is checked against the
    covered ``Content-Digest``; when streaming, call ``verify_content_digest`` yourself
    after the last chunk. Raises ``NonceCacheError`` if the replay cache is unreachable.
    """
    msg = _Message(headers, method=method, url=url)
    verified = _verify(
        keyring,
        msg,
        now=now,
        required=required,
        must_cover=must_cover,
        body=body,
        label=label,
        tag=REQUEST_TAG,
        max_age=max_age,
        clock_skew=clock_skew,
    )
    remember = max(1.0, float(verified.expires + clock_skew - _now(now) + 1))
    if not await nonce_cache.add_if_new(f"{verified.key_id}:{verified.nonce}", remember):
        raise ReplayedNonce(f"nonce {verified.nonce!r} of signature {label!r} was already used")
    return verified


def verify_response(
    keyring: Keyring,
    *,
    status: int,
    headers: Any,
    request_headers: Any,
    now: float | None = None,
    required: Sequence[str] = REQUIRED_RESPONSE_COMPONENTS,
    must_cover: Sequence[str] = MUST_COVER_RESPONSE_HEADERS,
    body: bytes | ContentDigest | None = None,
    label: str = DEFAULT_LABEL,
    max_age: int = DEFAULT_MAX_AGE,
    clock_skew: int = DEFAULT_CLOCK_SKEW,
) -> VerifiedSignature:
    """Verify the primary's signed answer against the request that was sent.

    ``request_headers`` are the headers the request was sent with (they hold its
    ``Signature``). The binding ``"signature";req;key="<label>"`` is always required.
    """
    msg = _Message(headers, status=status, request_headers=request_headers)
    binding = _request_binding(label).serialize()
    return _verify(
        keyring,
        msg,
        now=now,
        required=(*required, binding),
        must_cover=must_cover,
        body=body,
        label=label,
        tag=RESPONSE_TAG,
        max_age=max_age,
        clock_skew=clock_skew,
    )


# ---------------------------------------------------------------------- nonce caches


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

    def __init__(self, redis_client: Any, prefix: str = "latitude:nonce:") -> None:
        self._client = redis_client
        self._prefix = prefix

    async def add_if_new(self, nonce: str, ttl_seconds: float) -> bool:
        ttl = max(1, math.ceil(ttl_seconds))
        try:
            result = await self._client.set(self._prefix + nonce, b"1", nx=True, ex=ttl)
        except Exception as exc:
            raise NonceCacheError(
                f"replay cache unreachable ({type(exc).__name__}: {exc}); refusing to verify"
            ) from exc
        return bool(result)

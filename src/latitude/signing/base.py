"""The RFC 9421 signature base (section 2.5): component identifiers, their values, the base.

The components a gateway covers are fixed per request shape (which optional headers are
present), so everything that depends on the component list alone (validation, the
serialized identifiers, the ``@signature-params`` inner list, how each value is read) is
worked out once per shape and kept; a message then costs only its values.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from latitude.signing.canonical import byte_sequence_text, read_dictionary
from latitude.signing.errors import MalformedSignature, MissingComponent, SignatureError
from latitude.signing.structured import (
    BareItem,
    Params,
    parse_item,
    serialize_inner_list,
    serialize_item,
    serialize_params,
)

MAX_COMPONENTS = 64
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_URI_PARTS = frozenset({"@authority", "@path", "@query", "@scheme"})
_REQUEST_DERIVED = frozenset({"@method", "@target-uri", "@authority", "@scheme", "@path", "@query"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNSIGNABLE = re.compile(r"[^\t\x20-\x7e]")


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
            value, params = parse_item(spec)
            if type(value) is not str:
                raise ValueError(f"invalid component identifier {spec!r}")
            return cls(value, tuple(params.items()))
        return cls(spec.lower())

    @property
    def req(self) -> bool:
        return dict(self.params).get("req") is True

    @property
    def key(self) -> str | None:
        value = dict(self.params).get("key")
        return value if type(value) is str else None

    def serialize(self) -> str:
        return _identifier(self)

    def __str__(self) -> str:
        return _identifier(self)


@functools.lru_cache(maxsize=512)
def _identifier(comp: Component) -> str:
    return serialize_item(comp.name, dict(comp.params))


def request_binding(label: str) -> Component:
    """``"signature";req;key="<label>"``: the request's signature, covered by its answer."""
    return Component("signature", (("req", True), ("key", label)))


# ------------------------------------------------------------------------ message fields


class Fields:
    """Header field values by lowercase name, from any common header shape."""

    __slots__ = ("_get",)

    def __init__(self, headers: Any) -> None:
        if headers is None:
            self._get: Any = _no_values
        elif hasattr(headers, "getall"):  # multidict / aiohttp
            self._get = lambda name: headers.getall(name, ())
        elif hasattr(headers, "getlist"):  # starlette
            self._get = headers.getlist
        elif hasattr(headers, "get_list"):  # httpx
            self._get = headers.get_list
        else:
            # A plain mapping or list of pairs: one pass, instead of one per component;
            # values are decoded only when looked up.
            index: dict[str, list[Any]] = {}
            for k, v in headers.items() if isinstance(headers, Mapping) else headers:
                if isinstance(k, bytes | bytearray):
                    k = k.decode("latin-1")
                index.setdefault(k.lower(), []).append(v)
            self._get = lambda name: index.get(name, ())

    def value(self, name: str) -> str | None:
        """The field's lines combined as RFC 9421 section 2.1 says; ``None`` if absent."""
        values = self._get(name)
        if not values:
            return None
        if len(values) == 1:
            return _text(values[0]).strip(" \t")
        return ", ".join(_text(v).strip(" \t") for v in values)

    def has(self, name: str) -> bool:
        return bool(self._get(name))


def _no_values(name: str) -> tuple[()]:
    return ()


def _text(value: Any) -> str:
    return bytes(value).decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


class Message:
    """What a signature base is built from: a request's or a response's parts."""

    __slots__ = ("fields", "method", "url", "status", "request_fields", "_uri")

    def __init__(
        self,
        headers: Any,
        method: str | None = None,
        url: str | None = None,
        status: int | None = None,
        request_headers: Any = None,
    ) -> None:
        self.fields = Fields(headers)
        self.method = method
        self.url = url
        self.status = status
        self.request_fields = None if request_headers is None else Fields(request_headers)
        self._uri: tuple[str, str, str, str] | None = None

    @property
    def is_response(self) -> bool:
        return self.status is not None

    def uri_parts(self) -> tuple[str, str, str, str]:
        """``(scheme, authority, path, query)`` as RFC 9421 derives them (parsed once)."""
        if self._uri is None:
            self._uri = _url_parts(self.url or "")
        return self._uri


def _url_parts(url: str) -> tuple[str, str, str, str]:
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
    return scheme, authority, parts.path or "/", parts.query


def _check_ascii(what: str, value: str) -> str:
    bad = _UNSIGNABLE.search(value)
    if bad is not None:
        raise MalformedSignature(
            f"{what} contains {bad.group()!r}: only visible ASCII, spaces and tabs can be signed"
        )
    return value


# ------------------------------------------------- the request's signature (the binding)

# Serialized members of request `Signature` fields this process generated or verified, by
# the field's exact text: the answer's binding reuses them instead of parsing the field
# again. The text determines the members, so an entry can never disagree with a parse;
# only fields that were signed here or verified go in, so a flood of bad ones evicts nothing.
_SIGNATURES: dict[str, dict[str, str]] = {}
_SIGNATURES_MAX = 1024


def remember_signature(raw: str, members: dict[str, str]) -> None:
    if len(_SIGNATURES) >= _SIGNATURES_MAX:
        try:
            del _SIGNATURES[next(iter(_SIGNATURES))]
        except (KeyError, RuntimeError, StopIteration):  # another thread evicted first
            pass
    _SIGNATURES[raw] = members


def member_text(value: Any, params: Params) -> str:
    """A dictionary member's value serialized as RFC 9421 section 2.1.2 covers it."""
    if type(value) is bytes and not params:
        return byte_sequence_text(value)
    if isinstance(value, list):
        return serialize_inner_list(value, params)
    return serialize_item(value, params)


def _signature_member(fields: Fields, label: str | None) -> str | None:
    raw = fields.value("signature")
    if not raw:
        return None
    members = _SIGNATURES.get(raw)
    if members is None:
        try:
            parsed = read_dictionary(raw)
        except ValueError as exc:
            raise MalformedSignature(f"request Signature header is malformed: {exc}") from None
        members = {k: member_text(v, p) for k, (v, p) in parsed.items()}
    return members.get(label) if label is not None else None


# --------------------------------------------------------------------------- shapes


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


class Shape:
    """A validated component list, with everything about it that no message changes."""

    __slots__ = ("components", "identifiers", "names", "inner", "_lines", "response")

    def __init__(self, components: tuple[Component, ...], response: bool) -> None:
        seen: set[str] = set()
        for comp in components:
            _validate_component(comp, response=response)
            ident = comp.serialize()
            if ident in seen:
                raise MalformedSignature(f"component {ident} is listed twice")
            seen.add(ident)
        self.components = components
        self.response = response
        self.identifiers = tuple(c.serialize() for c in components)
        self.names = frozenset(c.name for c in components if not c.params)
        self.inner = serialize_inner_list([(c.name, dict(c.params)) for c in components], {})
        self._lines = tuple(
            (f"{i}: ", _value_reader(c)) for i, c in zip(self.identifiers, components, strict=True)
        )

    def base(self, msg: Message, params_text: str) -> str:
        """The signature base for ``msg``; ``params_text`` is ``;created=...`` serialized."""
        lines = [prefix + read(msg) for prefix, read in self._lines]
        lines.append(f'"@signature-params": {self.inner}{params_text}')
        return "\n".join(lines)


@functools.lru_cache(maxsize=256)
def shape(components: tuple[Component, ...], response: bool) -> Shape:
    """The shape of a component list, validated once (raises ``MalformedSignature``)."""
    return Shape(components, response)


def _value_reader(comp: Component) -> Callable[[Message], str]:
    """How a component's value is read from a message, chosen once per shape."""
    name = comp.name
    if name == "signature":
        return functools.partial(_binding_value, comp)
    if name.startswith("@"):
        return functools.partial(_derived_value, name)
    # Most components are headers: their name's error text is formatted once, here.
    return functools.partial(_header_value, name, f"header {name!r}")


def _binding_value(comp: Component, msg: Message) -> str:
    if msg.request_fields is None:
        raise MissingComponent(f"component {comp} needs the request's headers")
    value = _signature_member(msg.request_fields, comp.key)
    if value is None:
        raise MissingComponent(
            f"component {comp}: the request has no signature labelled {comp.key!r}"
        )
    return value


def _derived_value(name: str, msg: Message) -> str:
    if name == "@status":
        if type(msg.status) is not int or not 100 <= msg.status <= 999:
            raise MalformedSignature(f"response status {msg.status!r} is not 3 digits")
        return str(msg.status)
    if msg.method is None or msg.url is None:
        raise MalformedSignature(f"component {name} needs the request method and URL")
    if name == "@method":
        return _check_ascii("@method", msg.method)
    scheme, authority, path, query = msg.uri_parts()
    if name == "@target-uri":
        value = f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")
    elif name == "@authority":
        value = authority
    elif name == "@path":
        value = path
    elif name == "@query":
        value = "?" + query
    else:
        value = scheme
    return _check_ascii(name, value)


def _header_value(name: str, what: str, msg: Message) -> str:
    value = msg.fields.value(name)
    if value is None:
        where = "response" if msg.is_response else "request"
        raise MissingComponent(f"{what} is covered by the signature but absent from the {where}")
    return _check_ascii(what, value)


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
    comps = tuple(Component.of(c) for c in components)
    msg = Message(headers, method, url, status, request_headers)
    try:
        return shape(comps, msg.is_response).base(msg, serialize_params(params))
    except SignatureError as exc:
        raise ValueError(f"cannot build the signature base: {exc}") from None

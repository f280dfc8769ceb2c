"""RFC 8941 structured fields, parsed and serialized by ``http-sf``.

``http-sf`` is the maintained replacement its author names for ``http-sfv``, whose package
description reads "This Package is DEPRECATED". It passes every RFC 8941 case of the httpwg
structured-field-tests suite; ``http-sfv`` 0.9.9 does not (it accepts ``1.`` and base64
with padding at the start or in the middle, and rejects the empty dictionary and list), so
it is not used. ``http-sf`` also parses RFC 9651's Date and Display String (9651 obsoletes 8941
and only adds types); every signing field checks the exact type of each value it uses, so
neither can stand in for a string, integer or byte sequence.

The shape is the library's: ``{key: (value, params)}``, where ``value`` is a bare item or,
for an inner list, a list of ``(bare_item, params)``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import http_sf
from http_sf import Token

__all__ = ["BareItem", "Params", "Token", "parse_dictionary", "serialize_dictionary"]

BareItem = int | float | Decimal | str | bytes | bool | Token
Params = dict[str, BareItem]


def parse_dictionary(text: str) -> dict[str, tuple[Any, Params]]:
    """Parse an RFC 8941 Dictionary into ``{key: (value, params)}``.

    Raises ``ValueError`` naming the problem and its position.
    """
    try:
        data = text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"character {text[exc.start]!r} at position {exc.start} is not allowed "
            f"in a structured field ({text!r})"
        ) from None
    try:
        return http_sf.parse(data, tltype="dictionary")  # type: ignore[return-value]
    except http_sf.StructuredFieldError as exc:
        raise ValueError(f"{exc} of {text!r}") from None


def serialize_dictionary(members: Mapping[str, tuple[Any, Mapping[str, BareItem]]]) -> str:
    """Serialize ``{key: (value, params)}`` (the shape ``parse_dictionary`` returns).

    An empty dictionary serializes to ``""`` (a field that should not be sent).
    """
    if not members:
        return ""
    try:
        return http_sf.ser(dict(members))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot serialize structured field {dict(members)!r}: {exc}") from None


def serialize_item(value: BareItem, params: Mapping[str, BareItem] | None = None) -> str:
    """One item (a bare item and its parameters), e.g. ``"@method"`` or ``"signature";req``."""
    try:
        return http_sf.ser((value, dict(params or {})))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot serialize structured-field item {value!r}: {exc}") from None


def serialize_params(params: Mapping[str, BareItem]) -> str:
    """Parameters alone: ``;created=1;keyid="k1"``.

    Every signature carries six and every verification re-serializes them, so the two
    types they hold take a short path whose output is plainly the RFC's: an Integer in
    range is its decimal digits, a String of printable ASCII without ``"`` or ``\\`` is
    itself between quotes. Everything else goes through ``http-sf``.
    """
    out = []
    for k, v in params.items():
        t = type(v)
        if t is int and -_MAX_INT <= v <= _MAX_INT:  # type: ignore[operator]
            out.append(f";{_key(k)}={v}")
        elif t is str and _PLAIN_STRING.fullmatch(v):  # type: ignore[arg-type]
            out.append(f';{_key(k)}="{v}"')
        else:
            # http-sf serializes parameters only after an item: serialize them after a
            # bare token of one character and drop it.
            out.append(serialize_item(_ANCHOR, {k: v})[1:])
    return "".join(out)


_MAX_INT = 999_999_999_999_999
_PLAIN_STRING = re.compile(r"[ !#-\[\]-~]*")


@functools.lru_cache(maxsize=64)
def _key(key: str) -> str:
    serialize_item(_ANCHOR, {key: True})  # raises ValueError for an invalid key
    return key


def serialize_inner_list(items: list[tuple[BareItem, Params]], params: Params) -> str:
    """An inner list with its parameters: ``("@method" "@path");created=1``."""
    # The member value of a one-member dictionary keyed "x" is the text after "x=".
    return serialize_dictionary({"x": (items, params)})[2:]


def parse_item(text: str) -> tuple[Any, Params]:
    """Parse one RFC 8941 Item (a component identifier such as ``"signature";req``)."""
    try:
        return http_sf.parse(text.encode("latin-1"), tltype="item")  # type: ignore[return-value]
    except (UnicodeEncodeError, http_sf.StructuredFieldError) as exc:
        raise ValueError(f"invalid structured-field item {text!r}: {exc}") from None


_ANCHOR = Token("x")

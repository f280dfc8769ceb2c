"""The exact forms a gateway writes, read without the general structured-field parser.

Gateways mostly read what gateways wrote: a ``Signature`` of one member
(``latitude=:<base64>:``), the ``Signature-Input`` parameters in the order and syntax
``messages`` serializes them, and a ``Content-Digest`` of one member (``sha-256=:<base64>:``).
Parsing those with ``http-sf`` is the largest share of a verification's CPU, so each is
matched here by one anchored, ASCII-only pattern and read directly. A reader returns exactly
what the full parse (``structured``) returns for the same text, or ``None`` for any other
text, which then takes the full parse: a text that is not in one of these forms (other
whitespace, order, members, escapes, padding, ...) is never read here, so nothing the full
parse rejects is accepted and nothing is read differently. ``byte_sequence_text`` writes a
signature's or digest's value as the general serializer does, without it.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from latitude.signing.structured import Params, parse_dictionary

# RFC 8941 grammar, spelled out: character classes such as \d would match non-ASCII digits.
_KEY = r"[a-z*][a-z0-9_.*-]*"
_BASE64 = r"[A-Za-z0-9+/]+={0,2}"
_INTEGER = r"([0-9]{1,15})"  # sign and decimals left to the full parse
_STRING = r'"([ !#-\[\]-~]*)"'  # printable ASCII without '"' and '\': no escapes

# Matched with fullmatch, anchored at both ends ("$" would let a trailing newline through).
_BYTE_SEQUENCE_MEMBER = re.compile(f"({_KEY})=:({_BASE64}):")
_SIGNATURE_PARAMS = re.compile(
    f";created={_INTEGER};expires={_INTEGER}"
    f";keyid={_STRING};alg={_STRING};nonce={_STRING};tag={_STRING}"
)


def byte_sequence_dictionary(text: str) -> dict[str, tuple[bytes, Params]] | None:
    """``key=:<base64>:``, a Dictionary of one Byte Sequence without parameters, or ``None``."""
    match = _BYTE_SEQUENCE_MEMBER.fullmatch(text)
    if match is None:
        return None
    key, encoded = match.groups()
    if len(encoded) % 4:
        return None  # padding left out: the full parse restores it
    try:
        # Padded as the full parse pads it: the same call on the same text.
        value = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return None
    return {key: (value, {})}


def signature_params(text: str) -> Params | None:
    """The parameters ``messages`` signs with, exactly as it writes them, or ``None``.

    ``;created=<int>;expires=<int>;keyid="..";alg="..";nonce="..";tag=".."``: the result is
    the parameters the full parse of the same text after an item returns, in that order.
    """
    match = _SIGNATURE_PARAMS.fullmatch(text)
    if match is None:
        return None
    created, expires, key_id, alg, nonce, tag = match.groups()
    return {
        "created": int(created),
        "expires": int(expires),
        "keyid": key_id,
        "alg": alg,
        "nonce": nonce,
        "tag": tag,
    }


def byte_sequence_text(value: bytes) -> str:
    """A Byte Sequence serialized (``:<base64>:``), as the full serializer writes it."""
    return f":{base64.b64encode(value).decode('ascii')}:"


def read_dictionary(text: str) -> dict[str, Any]:
    """A dictionary field: by the fast reader when it is our exact byte-sequence form, else by
    the full parse (which raises `ValueError` on a malformed field)."""
    fast = byte_sequence_dictionary(text)
    return fast if fast is not None else parse_dictionary(text)

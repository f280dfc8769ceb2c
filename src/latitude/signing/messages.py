"""Signing and verifying requests and their answers (RFC 9421, ``hmac-sha256``)."""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from latitude.signing.base import (
    MAX_COMPONENTS,
    Component,
    Message,
    Shape,
    member_text,
    remember_signature,
    request_binding,
    shape,
)
from latitude.signing.canonical import (
    byte_sequence_text,
    read_dictionary,
    signature_params,
)
from latitude.signing.digest import ContentDigest, verify_content_digest
from latitude.signing.errors import (
    BadSignature,
    ExpiredSignature,
    MalformedSignature,
    MissingComponent,
    MissingSignature,
    ReplayedNonce,
    SignatureError,
    UnknownKey,
)
from latitude.signing.keys import Keyring
from latitude.signing.nonces import NonceCache, new_nonce
from latitude.signing.structured import (
    Params,
    Token,
    parse_dictionary,
    parse_item,
    serialize_params,
)

ALGORITHM = "hmac-sha256"
DEFAULT_LABEL = "latitude"
REQUEST_TAG = "latitude-request"
RESPONSE_TAG = "latitude-response"
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

_MAX_NONCE_LENGTH = 128


def _now(now: float | None) -> int:
    return int(time.time() if now is None else now)


@functools.lru_cache(maxsize=64)
def _components(specs: tuple[str, ...]) -> tuple[Component, ...]:
    return tuple(Component.of(s) for s in specs)


@functools.lru_cache(maxsize=64)
def _lower(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n.lower() for n in names)


@functools.lru_cache(maxsize=64)
def _header_components(names: tuple[str, ...]) -> tuple[Component, ...]:
    return tuple(Component(n) for n in _lower(names))


def _present(msg: Message, names: Sequence[str]) -> tuple[Component, ...]:
    return tuple(c for c in _header_components(tuple(names)) if msg.fields.has(c.name))


# --------------------------------------------------------------------------- signing


def _sign(
    keyring: Keyring,
    msg: Message,
    comps: tuple[Component, ...],
    *,
    now: float | None,
    ttl: int,
    nonce: str | None,
    tag: str,
    label: str,
) -> tuple[dict[str, str], str]:
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
    params_text = serialize_params(params)
    try:
        sh = shape(comps, msg.is_response)
        base = sh.base(msg, params_text)
    except SignatureError as exc:
        raise ValueError(f"cannot sign: {exc}") from None
    sig = byte_sequence_text(key.sign(base.encode("ascii")))
    try:
        signature = f"{_key(label)}={sig}"
    except ValueError as exc:
        raise ValueError(f"cannot sign with label {label!r}: {exc}") from None
    return {"Signature-Input": f"{label}={sh.inner}{params_text}", "Signature": signature}, sig


@functools.lru_cache(maxsize=16)
def _key(label: str) -> str:
    # A label is a dictionary key: serializing a one-member parameter list checks it.
    serialize_params({label: True})
    return label


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
    msg = Message(headers, method=method, url=url)
    comps = _components(tuple(derived)) + _present(msg, covered)
    out, sig = _sign(
        keyring, msg, comps, now=now, ttl=ttl, nonce=nonce, tag=REQUEST_TAG, label=label
    )
    # The answer's binding covers this very field: keep its member, parsed, for then.
    remember_signature(out["Signature"], {label: sig})
    return out


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
    msg = Message(headers, status=status, request_headers=request_headers)
    comps = (_STATUS, *_present(msg, covered), request_binding(label))
    out, _sig = _sign(
        keyring, msg, comps, now=now, ttl=ttl, nonce=nonce, tag=RESPONSE_TAG, label=label
    )
    return out


_STATUS = Component("@status")


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


# Component lists of verified signatures, by the text of their Signature-Input up to the end
# of the list (`latitude=("@method" ... "cookie")`). A gateway's signatures come in a few fixed
# shapes, so that list, most of the field, is parsed once per shape and only the parameters
# after it each time. An entry's text holds one ")", its last character: whatever follows, a
# field starting with it starts with that complete inner list, so the entry always agrees with
# a full parse. Anything unusual (more members, other whitespace) takes the full parse.
_INPUT_SHAPES: dict[tuple[str, bool], tuple[Component, ...]] = {}
_INPUT_SHAPES_MAX = 256


def _known_input(
    raw: str, label: str, response: bool
) -> tuple[tuple[Component, ...], Params] | None:
    end = raw.find(")")
    comps = _INPUT_SHAPES.get((raw[: end + 1], response)) if end > 0 else None
    if comps is None or not raw.startswith(label + "="):
        return None
    params = signature_params(raw[end + 1 :])
    if params is not None:
        return comps, params
    try:
        # The parameters alone, parsed as those of a one-character token item: only an
        # exact "x" with parameters and nothing else after them is the full parse's result.
        anchor, params = parse_item("x" + raw[end + 1 :])
    except ValueError:
        return None
    if type(anchor) is not Token or str(anchor) != "x":
        return None
    return comps, params


def _remember_input(raw: str, label: str, sh: Shape) -> None:
    text = f"{label}={sh.inner}"
    if raw.startswith(text) and text.count(")") == 1:
        if len(_INPUT_SHAPES) >= _INPUT_SHAPES_MAX:
            try:
                del _INPUT_SHAPES[next(iter(_INPUT_SHAPES))]
            except (KeyError, RuntimeError, StopIteration):  # another thread evicted first
                pass
        _INPUT_SHAPES[(text, sh.response)] = sh.components


def _parse_signature(
    msg: Message, label: str
) -> tuple[tuple[Component, ...], Params, bytes, dict[str, Any], str]:
    raw_input = msg.fields.value("signature-input")
    raw_sig = msg.fields.value("signature")
    if raw_input is None and raw_sig is None:
        raise MissingSignature("the message has no Signature-Input and no Signature header")
    if raw_input is None:
        raise MissingSignature("the message has a Signature header but no Signature-Input")
    if raw_sig is None:
        raise MissingSignature("the message has a Signature-Input header but no Signature")
    known = _known_input(raw_input, label, msg.is_response)
    if known is None:
        try:
            inputs = parse_dictionary(raw_input)
        except ValueError as exc:
            raise MalformedSignature(f"Signature-Input header is malformed: {exc}") from None
    else:
        inputs = {label: known}
    try:
        sigs = read_dictionary(raw_sig)
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
    comps, params = known if known is not None else _input_member(inputs, label)
    sig, sig_params = sigs[label]
    if type(sig) is not bytes:
        raise MalformedSignature(f"Signature {label!r} is not a byte sequence")
    if sig_params:
        raise MalformedSignature(f"Signature {label!r} has unexpected parameters")
    return comps, params, sig, sigs, raw_input


def _input_member(inputs: dict[str, Any], label: str) -> tuple[tuple[Component, ...], Params]:
    items, params = inputs[label]
    if not isinstance(items, list):
        raise MalformedSignature(f"Signature-Input {label!r} is not an inner list of components")
    if len(items) > MAX_COMPONENTS:
        raise MalformedSignature(f"Signature-Input {label!r} lists over {MAX_COMPONENTS} items")
    comps = []
    for value, cparams in items:
        if type(value) is not str:
            raise MalformedSignature(
                f"Signature-Input {label!r} component {value!r} is not a quoted string"
            )
        comps.append(Component(value, tuple(cparams.items())))
    return tuple(comps), params


def _check_params(params: Params, label: str, tag: str) -> tuple[str, int, int, str]:
    def need(name: str, kind: type) -> Any:
        if name not in params:
            raise MalformedSignature(f"Signature-Input {label!r} lacks the {name!r} parameter")
        value = params[name]
        if type(value) is not kind:  # neither a bool for an int nor a token for a string
            raise MalformedSignature(
                f"Signature-Input {label!r} parameter {name!r} must be a {kind.__name__}"
            )
        return value

    key_id = need("keyid", str)
    created = need("created", int)
    expires = need("expires", int)
    nonce = need("nonce", str)
    alg = params.get("alg", ALGORITHM)
    if alg != ALGORITHM or type(alg) is not str:
        raise MalformedSignature(
            f"Signature-Input {label!r} algorithm {alg!r} is not supported (only {ALGORITHM!r})"
        )
    got_tag = params.get("tag")
    if got_tag != tag or type(got_tag) is not str:
        raise MalformedSignature(
            f"Signature-Input {label!r} tag is {got_tag!r}, expected {tag!r} "
            "(a request signature is not a response signature and vice versa)"
        )
    if not 1 <= len(nonce) <= _MAX_NONCE_LENGTH:
        raise MalformedSignature(f"Signature-Input {label!r} nonce has a bad length")
    return key_id, created, expires, nonce


@functools.lru_cache(maxsize=256)
def _coverage(
    sh: Shape, required: tuple[str, ...], must_cover: tuple[str, ...]
) -> tuple[Component | None, tuple[str, ...]]:
    """The first required component ``sh`` misses, and the must-cover headers it leaves out."""
    covered = set(sh.identifiers)
    missing = None
    for spec in required:
        comp = Component.of(spec)
        if comp.serialize() in covered:
            continue
        if not comp.params and comp.name in {"@authority", "@path", "@query", "@scheme"}:
            if "@target-uri" in sh.names:
                continue
        missing = comp
        break
    uncovered = tuple(n for n in _lower(must_cover) if n not in sh.names)
    return missing, uncovered


def _check_coverage(
    msg: Message, sh: Shape, required: Sequence[str], must_cover: Sequence[str], label: str
) -> None:
    missing, uncovered = _coverage(sh, tuple(required), tuple(must_cover))
    if missing is not None:
        raise MissingComponent(f"signature {label!r} does not cover required component {missing}")
    for name in uncovered:
        if msg.fields.has(name):
            raise MissingComponent(
                f"header {name!r} is present but not covered by signature {label!r}"
            )


def _verify(
    keyring: Keyring,
    msg: Message,
    *,
    now: float | None,
    required: Sequence[str],
    must_cover: Sequence[str],
    body: bytes | ContentDigest | None,
    label: str,
    tag: str,
    max_age: int,
    clock_skew: int,
) -> tuple[VerifiedSignature, dict[str, Any]]:
    comps, params, sig, sigs, raw_input = _parse_signature(msg, label)
    key_id, created, expires, nonce = _check_params(params, label, tag)
    key = keyring.get(key_id)
    if key is None:
        raise UnknownKey(f"signature {label!r} uses unknown key id {key_id!r}")
    sh = shape(comps, msg.is_response)
    _check_coverage(msg, sh, required, must_cover, label)
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
    base = sh.base(msg, serialize_params(params))
    if not hmac.compare_digest(key.sign(base.encode("ascii")), sig):
        raise BadSignature(
            f"signature {label!r} (key {key_id!r}) does not match the message: a covered "
            "component was changed or the secret differs"
        )
    _remember_input(raw_input, label, sh)
    if body is not None:
        verify_content_digest(msg.fields.value("content-digest"), body)
    verified = VerifiedSignature(
        label=label,
        key_id=key_id,
        created=created,
        expires=expires,
        nonce=nonce,
        components=sh.identifiers,
        signature=sig,
    )
    return verified, sigs


async def verify_request(
    keyring: Keyring, *, nonce_cache: NonceCache, **check: Any
) -> VerifiedSignature:
    """Verify a forwarded request, then record its nonce; raise a ``SignatureError``.

    The keywords are :func:`check_request`'s (``method``, ``url``, ``headers``, ``now``,
    ``required``, ``must_cover``, ``body``, ``label``, ``max_age``, ``clock_skew``).
    ``url`` is the absolute URL as received (raw, percent-encoded path and query).
    ``body`` (bytes or a ``ContentDigest`` fed while streaming) is checked against the
    covered ``Content-Digest``; when streaming, call ``verify_content_digest`` yourself
    after the last chunk. Raises ``NonceCacheError`` if the replay cache is unreachable.
    :func:`check_request` and :func:`record_nonce` are its two halves, for a caller that
    overlaps the nonce's round trip with other work (and acts on nothing before it is done).
    """
    verified = check_request(keyring, **check)
    await record_nonce(
        nonce_cache,
        verified,
        now=check.get("now"),
        clock_skew=check.get("clock_skew", DEFAULT_CLOCK_SKEW),
    )
    return verified


def check_request(
    keyring: Keyring,
    *,
    method: str,
    url: str,
    headers: Any,
    now: float | None = None,
    required: Sequence[str] = REQUIRED_REQUEST_COMPONENTS,
    must_cover: Sequence[str] = MUST_COVER_REQUEST_HEADERS,
    body: bytes | ContentDigest | None = None,
    label: str = DEFAULT_LABEL,
    max_age: int = DEFAULT_MAX_AGE,
    clock_skew: int = DEFAULT_CLOCK_SKEW,
) -> VerifiedSignature:
    """:func:`verify_request` but for its nonce: the request is not known to be new until
    :func:`record_nonce` has returned."""
    msg = Message(headers, method=method, url=url)
    verified, sigs = _verify(
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
    # The answer will be bound to this field: keep its members, parsed, for sign_response.
    raw = msg.fields.value("signature")
    if raw is not None:
        remember_signature(raw, {k: member_text(v, p) for k, (v, p) in sigs.items()})
    return verified


async def record_nonce(
    nonce_cache: NonceCache,
    verified: VerifiedSignature,
    *,
    now: float | None = None,
    clock_skew: int = DEFAULT_CLOCK_SKEW,
) -> None:
    """Record a checked request's nonce for as long as its signature is valid; `ReplayedNonce`
    if it was seen before (`NonceCacheError` if the replay cache is unreachable)."""
    name, remember = nonce_entry(verified, now=now, clock_skew=clock_skew)
    if not await nonce_cache.add_if_new(name, remember):
        raise replayed(verified)


def nonce_entry(
    verified: VerifiedSignature, *, now: float | None = None, clock_skew: int = DEFAULT_CLOCK_SKEW
) -> tuple[str, float]:
    """What a replay cache keeps of a checked request: its nonce's name (scoped by the key
    that signed it) and how many seconds to keep it, as long as the signature is valid."""
    remember = max(1.0, float(verified.expires + clock_skew - _now(now) + 1))
    return f"{verified.key_id}:{verified.nonce}", remember


def replayed(verified: VerifiedSignature) -> ReplayedNonce:
    """The refusal of a checked request whose nonce a replay cache had already seen."""
    return ReplayedNonce(
        f"nonce {verified.nonce!r} of signature {verified.label!r} was already used"
    )


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
    msg = Message(headers, status=status, request_headers=request_headers)
    verified, _sigs = _verify(
        keyring,
        msg,
        now=now,
        required=(*required, request_binding(label).serialize()),
        must_cover=must_cover,
        body=body,
        label=label,
        tag=RESPONSE_TAG,
        max_age=max_age,
        clock_skew=clock_skew,
    )
    return verified

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

One concept per module: ``keys`` (secrets, keyring), ``digest`` (Content-Digest), ``base``
(components and the signature base), ``messages`` (sign and verify requests and answers),
``nonces`` (fresh nonces, replay caches), ``errors``, and ``structured`` (RFC 8941 through
the ``http-sf`` library). The package imports no other ``latitude`` module.
"""

from latitude.signing.base import Component, signature_base
from latitude.signing.digest import ContentDigest, content_digest, verify_content_digest
from latitude.signing.errors import (
    BadSignature,
    DigestMismatch,
    ExpiredSignature,
    MalformedSignature,
    MissingComponent,
    MissingSignature,
    NonceCacheError,
    ReplayedNonce,
    SignatureError,
    UnknownKey,
)
from latitude.signing.keys import MIN_SECRET_BYTES, Keyring, SigningKey
from latitude.signing.messages import (
    ALGORITHM,
    DEFAULT_CLOCK_SKEW,
    DEFAULT_LABEL,
    DEFAULT_MAX_AGE,
    DEFAULT_TTL,
    MUST_COVER_REQUEST_HEADERS,
    MUST_COVER_RESPONSE_HEADERS,
    REQUEST_COVERED_HEADERS,
    REQUEST_DERIVED_COMPONENTS,
    REQUEST_TAG,
    REQUIRED_REQUEST_COMPONENTS,
    REQUIRED_RESPONSE_COMPONENTS,
    RESPONSE_COVERED_HEADERS,
    RESPONSE_TAG,
    VerifiedSignature,
    check_request,
    nonce_entry,
    record_nonce,
    replayed,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)
from latitude.signing.nonces import MemoryNonceCache, NonceCache, ValkeyNonceCache, new_nonce
from latitude.signing.structured import Token, parse_dictionary, serialize_dictionary

__all__ = [
    "ALGORITHM",
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_LABEL",
    "DEFAULT_MAX_AGE",
    "DEFAULT_TTL",
    "MIN_SECRET_BYTES",
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
    "check_request",
    "content_digest",
    "new_nonce",
    "parse_dictionary",
    "nonce_entry",
    "record_nonce",
    "replayed",
    "serialize_dictionary",
    "sign_request",
    "sign_response",
    "signature_base",
    "verify_content_digest",
    "verify_request",
    "verify_response",
]

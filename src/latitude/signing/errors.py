"""What can go wrong verifying a signature or a digest: one named exception per cause."""

from __future__ import annotations


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

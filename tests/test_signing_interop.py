"""latitude.signing against an independent RFC 9421 implementation: ``http-message-signatures``.

It verifies a request we signed and an answer we signed bound to it (``hmac-sha256``, our key
id, ``created`` / ``expires`` / ``nonce`` / ``tag``), and we verify a request and a bound answer
it signed. Its messages are real ``httpx`` requests and responses. Version 3 resolves
``"signature";req;key="latitude"`` (RFC 9421 section 2.4) itself, so the request binding is
checked by its code too, in both directions. What its API cannot express is checked on our
side only: it keeps no replay cache (nonce reuse is the caller's policy there), and it can
require a fixed list of components but not "every one of these headers that is present"
(our rule that no sensitive header rides unsigned).
"""

from __future__ import annotations

import datetime
import hashlib

import httpx
import pytest
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    InvalidSignature,
    MappingKeyResolver,
    algorithms,
)

from latitude.signing import (
    BadSignature,
    Keyring,
    MemoryNonceCache,
    ReplayedNonce,
    SigningKey,
    content_digest,
    new_nonce,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)

SECRET = hashlib.sha256(b"interop test secret").digest()
KEY_ID = "eu-west-2026"
URL = "https://primary.example.com/calendars/7/events?week=12&tz=UTC"
BODY = b'{"title": "standup"}'
ANSWER = b'{"id": 1}'
BINDING = '"signature";req;key="latitude"'


@pytest.fixture
def keyring() -> Keyring:
    return Keyring([SigningKey(KEY_ID, SECRET)], KEY_ID)


@pytest.fixture
def verifier() -> HTTPMessageVerifier:
    resolver = MappingKeyResolver(public_keys={KEY_ID: SECRET}, private_keys={})
    return HTTPMessageVerifier(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=resolver)


@pytest.fixture
def signer() -> HTTPMessageSigner:
    resolver = MappingKeyResolver(public_keys={}, private_keys={KEY_ID: SECRET})
    return HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=resolver)


def our_request(keyring: Keyring, body: bytes = BODY) -> httpx.Request:
    headers = {
        "Content-Type": "application/json",
        "Content-Digest": content_digest(body),
        "Idempotency-Key": "idem-0123456789",
        "Latitude-Session": "c2Vzc2lvbi1ieXRlcw",
    }
    headers.update(sign_request(keyring, method="POST", url=URL, headers=headers))
    return httpx.Request("POST", URL, headers=headers, content=body)


def our_answer(keyring: Keyring, request: httpx.Request) -> httpx.Response:
    headers = {
        "Content-Type": "application/json",
        "Content-Digest": content_digest(ANSWER),
        "Latitude-Position": "0/16B3748",
    }
    headers.update(
        sign_response(keyring, status=201, headers=headers, request_headers=request.headers)
    )
    return httpx.Response(201, headers=headers, content=ANSWER, request=request)


def test_it_verifies_our_request(keyring, verifier):
    request = our_request(keyring)
    (result,) = verifier.verify(
        request,
        expect_tag="latitude-request",
        require_components=("@method", "@authority", "@path", "@query", "content-digest"),
        body=BODY,
    )
    assert result.label == "latitude" and result.body == BODY
    params = result.parameters
    assert params["keyid"] == KEY_ID and params["alg"] == "hmac-sha256"
    assert params["expires"] - params["created"] == 30
    assert result.nonce == params["nonce"] and len(result.nonce) == 22
    covered = result.covered_components
    assert covered['"@authority"'] == "primary.example.com"
    assert covered['"@query"'] == "?week=12&tz=UTC"
    assert covered['"latitude-session"'] == "c2Vzc2lvbi1ieXRlcw"

    tampered = httpx.Request("POST", URL.replace("7", "8"), headers=request.headers, content=BODY)
    with pytest.raises(InvalidSignature):
        verifier.verify(tampered, expect_tag="latitude-request")
    with pytest.raises(InvalidSignature):
        verifier.verify(request, expect_tag="latitude-request", body=BODY + b" ")


def test_it_verifies_our_answer_bound_to_its_request(keyring, verifier):
    request = our_request(keyring)
    answer = our_answer(keyring, request)
    (result,) = verifier.verify(
        answer,
        expect_tag="latitude-response",
        require_components=("@status", "content-digest", "latitude-position", BINDING),
        body=ANSWER,
    )
    params = result.parameters
    assert params["keyid"] == KEY_ID and params["alg"] == "hmac-sha256" and result.nonce
    assert params["expires"] - params["created"] == 30 and params["tag"] == "latitude-response"
    assert result.nonce != request.headers["signature-input"].split('nonce="')[1][:22]
    # What it resolved as the binding is the request's own signature, byte for byte.
    assert "latitude=" + result.covered_components[BINDING] == request.headers["signature"]

    # The same answer presented with another request no longer verifies: the binding holds.
    other = our_request(keyring)
    moved = httpx.Response(201, headers=answer.headers, content=ANSWER, request=other)
    with pytest.raises(InvalidSignature):
        verifier.verify(moved, expect_tag="latitude-response")


async def test_we_verify_its_request(keyring, signer):
    now = datetime.datetime.now(datetime.UTC)
    nonce = new_nonce()
    headers = {"Content-Type": "application/json", "Idempotency-Key": "idem-42"}
    request = httpx.Request("POST", URL, headers=headers, content=BODY)
    signer.sign(
        request,
        key_id=KEY_ID,
        created=now,
        expires=now + datetime.timedelta(seconds=30),
        nonce=nonce,
        label="latitude",
        tag="latitude-request",
        covered_component_ids=(
            "@method",
            "@authority",
            "@path",
            "@query",
            "content-type",
            "idempotency-key",
        ),
        body=BODY,  # it adds Content-Digest and covers it
    )
    assert request.headers["content-digest"] == content_digest(BODY)
    cache = MemoryNonceCache()
    verified = await verify_request(
        keyring,
        method=request.method,
        url=str(request.url),
        headers=request.headers,
        nonce_cache=cache,
        body=BODY,
    )
    assert verified.key_id == KEY_ID and verified.nonce == nonce
    assert verified.covers("content-digest") and verified.covers("idempotency-key")
    assert verified.expires - verified.created == 30

    with pytest.raises(ReplayedNonce):
        await verify_request(
            keyring, method="POST", url=str(request.url), headers=request.headers, nonce_cache=cache
        )
    with pytest.raises(BadSignature):
        await verify_request(
            keyring,
            method="PUT",
            url=str(request.url),
            headers=request.headers,
            nonce_cache=MemoryNonceCache(),
        )


def test_we_verify_its_answer_bound_to_our_request(keyring, signer):
    request = our_request(keyring)
    answer = httpx.Response(
        200, headers={"Content-Type": "application/json"}, content=ANSWER, request=request
    )
    now = datetime.datetime.now(datetime.UTC)
    signer.sign(
        answer,
        key_id=KEY_ID,
        created=now,
        expires=now + datetime.timedelta(seconds=30),
        nonce=new_nonce(),
        label="latitude",
        tag="latitude-response",
        covered_component_ids=("@status", "content-type", BINDING),
        body=ANSWER,
    )
    verified = verify_response(
        keyring, status=200, headers=answer.headers, request_headers=request.headers, body=ANSWER
    )
    assert verified.covers(BINDING) and verified.covers("content-digest")
    assert verified.key_id == KEY_ID

    with pytest.raises(BadSignature):
        verify_response(
            keyring,
            status=200,
            headers=answer.headers,
            request_headers=our_request(keyring).headers,
        )

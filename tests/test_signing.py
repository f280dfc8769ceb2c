"""Tests for latitude.signing: RFC 9421 signatures, RFC 9530 digests, replay caches."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import uuid

import pytest

from latitude.lab.harness import free_port as _free_port
from latitude.signing import (
    BadSignature,
    Component,
    ContentDigest,
    DigestMismatch,
    ExpiredSignature,
    Keyring,
    MalformedSignature,
    MemoryNonceCache,
    MissingComponent,
    MissingSignature,
    NonceCache,
    NonceCacheError,
    ReplayedNonce,
    SignatureError,
    SigningKey,
    Token,
    UnknownKey,
    ValkeyNonceCache,
    content_digest,
    new_nonce,
    parse_dictionary,
    serialize_dictionary,
    sign_request,
    sign_response,
    signature_base,
    verify_content_digest,
    verify_request,
    verify_response,
)

NOW = 1_700_000_000
URL = "https://primary.example.com/calendars/7/events?week=12&tz=UTC"
BODY = b'{"title": "standup"}'

# RFC 9421 Appendix B.1.5 "test-shared-secret".
RFC_SECRET = base64.b64decode(
    "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ=="
)


def make_keyring(*ids: str, signing: str | None = None) -> Keyring:
    ids = ids or ("k1",)
    keys = [SigningKey(i, hashlib.sha256(i.encode()).digest()) for i in ids]
    return Keyring(keys, signing or ids[0])


def request_headers(body: bytes = BODY) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Content-Digest": content_digest(body),
        "Idempotency-Key": "idem-0123456789",
        "Forwarded": 'for="[2001:db8::1]";proto=https;host=app.example.com',
        "Latitude-Session": "c2Vzc2lvbi1ieXRlcw",
    }


def signed(keyring: Keyring | None = None, *, now: int = NOW, **kw) -> dict[str, str]:
    keyring = keyring or make_keyring()
    headers = request_headers()
    method = kw.pop("method", "POST")
    url = kw.pop("url", URL)
    headers.update(sign_request(keyring, method=method, url=url, headers=headers, now=now, **kw))
    return headers


async def verify(headers, *, keyring=None, method="POST", url=URL, cache=None, now=NOW, **kw):
    return await verify_request(
        keyring or make_keyring(),
        method=method,
        url=url,
        headers=headers,
        nonce_cache=cache if cache is not None else MemoryNonceCache(),
        now=now,
        **kw,
    )


# ----------------------------------------------------------------- RFC test vectors


RFC_B2_HEADERS = {
    "Host": "example.com",
    "Date": "Tue, 20 Apr 2021 02:07:55 GMT",
    "Content-Type": "application/json",
    "Content-Digest": "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNy"
    "ealdVLvRwEmTHWXvJwew==:",
    "Content-Length": "18",
}
RFC_B2_BODY = b'{"hello": "world"}'


def test_rfc9421_b25_hmac_sha256_vector():
    signature_input = (
        'sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret"'
    )
    expected_sig = "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:"
    expected_base = (
        '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
        '"@authority": example.com\n'
        '"content-type": application/json\n'
        '"@signature-params": ("date" "@authority" "content-type")'
        ';created=1618884473;keyid="test-shared-secret"'
    )
    parsed = parse_dictionary(signature_input)
    items, params = parsed["sig-b25"]
    comps = [Component(name, tuple(p.items())) for name, p in items]
    base = signature_base(
        comps,
        params,
        method="POST",
        url="http://example.com/foo?param=Value&Pet=dog",
        headers=RFC_B2_HEADERS,
    )
    assert base == expected_base
    sig = hmac.new(RFC_SECRET, base.encode("ascii"), hashlib.sha256).digest()
    assert serialize_dictionary({"sig-b25": (sig, {})}) == expected_sig
    assert SigningKey("test-shared-secret", RFC_SECRET).sign(base.encode()) == sig
    assert serialize_dictionary(parsed) == signature_input


def test_rfc9530_and_rfc9421_content_digest_examples():
    assert content_digest(RFC_B2_BODY) == "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
    assert content_digest(RFC_B2_BODY, "sha-512") == RFC_B2_HEADERS["Content-Digest"]
    verify_content_digest(RFC_B2_HEADERS["Content-Digest"], RFC_B2_BODY)


def test_rfc9421_b22_query_and_derived_components():
    base = signature_base(
        ["@authority", "content-digest", "@query"],
        {"created": 1618884473, "keyid": "test-key-rsa-pss"},
        method="POST",
        url="http://example.com/foo?param=Value&Pet=dog",
        headers=RFC_B2_HEADERS,
    )
    assert base.splitlines()[:3] == [
        '"@authority": example.com',
        '"content-digest": ' + RFC_B2_HEADERS["Content-Digest"],
        '"@query": ?param=Value&Pet=dog',
    ]


# ---------------------------------------------------------------------------- keys


def test_short_secret_refused():
    with pytest.raises(ValueError, match="at least 32"):
        SigningKey("k", b"x" * 31)


def test_key_repr_hides_secret_and_keyring_checks():
    key = SigningKey("k1", b"s" * 32)
    assert "sss" not in repr(key)
    with pytest.raises(ValueError, match="not among"):
        Keyring([key], "k2")
    with pytest.raises(ValueError, match="twice"):
        Keyring([key, SigningKey("k1", b"t" * 32)], "k1")
    ring = Keyring([key, SigningKey.generate("k2")], "k2")
    assert ring.signing_key.key_id == "k2" and "k1" in ring and len(ring) == 2
    assert "sss" not in repr(ring)


def test_nonce_is_128_bit_base64url():
    n = new_nonce()
    assert len(n) == 22 and "=" not in n
    assert len(base64.urlsafe_b64decode(n + "==")) == 16
    assert new_nonce() != n


# -------------------------------------------------------------------------- digest


def test_streaming_digest_matches_whole_body():
    d = ContentDigest()
    for i in range(0, len(BODY), 3):
        d.update(BODY[i : i + 3])
    assert d.header_value() == content_digest(BODY)
    verify_content_digest(content_digest(BODY), d)
    both = ContentDigest(("sha-256", "sha-512"))
    both.update(BODY)
    verify_content_digest(both.header_value(), BODY)


def test_digest_for_header_picks_supported_algorithms():
    header = "unixsum=:AAAA:, " + content_digest(BODY, "sha-512")
    d = ContentDigest.for_header(header)
    assert d.algorithms == ("sha-512",)
    d.update(BODY)
    verify_content_digest(header, d)


@pytest.mark.parametrize(
    "header, match",
    [
        (None, "missing"),
        ("", "missing"),
        ("sha-256=:not base64!:", "malformed"),
        ("sha-256=abc", "byte sequence"),
        ("md5=:AAAA:", "md5"),
        (content_digest(b"other body"), "does not match"),
        (content_digest(BODY) + ", sha-512=:AAAA:", "sha-512 does not match"),
    ],
)
def test_digest_fails_closed(header, match):
    with pytest.raises(DigestMismatch, match=match):
        verify_content_digest(header, BODY)


def test_digest_object_without_common_algorithm():
    d = ContentDigest(("sha-256",))
    d.update(BODY)
    with pytest.raises(DigestMismatch, match="hashed with sha-256"):
        verify_content_digest(content_digest(BODY, "sha-512"), d)
    with pytest.raises(DigestMismatch, match="unsupported"):
        ContentDigest.for_header("md5=:AAAA:")


# ----------------------------------------------------------------- request signing


async def test_round_trip():
    headers = signed()
    assert headers["Signature-Input"].startswith(
        'latitude=("@method" "@authority" "@path" "@query" "content-digest" "content-type" '
        '"idempotency-key" "forwarded" "latitude-session");created=1700000000;'
        'expires=1700000030;keyid="k1";alg="hmac-sha256";nonce="'
    )
    v = await verify(headers, body=BODY)
    assert v.key_id == "k1" and v.created == NOW and v.expires == NOW + 30
    assert len(v.nonce) == 22
    assert v.covers("content-digest") and v.covers("Latitude-Session")
    assert "@method" in v.component_names


async def test_header_shapes_are_case_insensitive():
    headers = signed()
    lower = {k.lower(): v for k, v in headers.items()}
    await verify(lower)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await verify(raw)


async def test_multiple_field_lines_are_combined():
    ring = make_keyring()
    base = [
        ("Content-Digest", content_digest(b"")),
        ("Forwarded", "for=1.2.3.4"),
        ("Forwarded", " for=5.6.7.8 "),
    ]
    sig = sign_request(ring, method="GET", url=URL, headers=base, now=NOW)
    headers = [*base, *sig.items()]
    await verify(headers, method="GET")
    swapped = [base[0], base[2], base[1], *sig.items()]
    with pytest.raises(BadSignature):
        await verify(swapped, method="GET")


async def test_target_uri_covers_uri_parts_and_normalizes_default_port():
    headers = signed(
        derived=("@method", "@target-uri"), url="https://Primary.example.com:443/a?b=1"
    )
    assert '"@target-uri"' in headers["Signature-Input"]
    await verify(headers, url="https://primary.example.com/a?b=1")
    with pytest.raises(BadSignature):
        await verify(headers, url="https://primary.example.com:8443/a?b=1")


def test_sign_refuses_non_ascii_header():
    headers = request_headers()
    headers["Latitude-Session"] = "caf\u00e9"
    with pytest.raises(ValueError, match="latitude-session"):
        sign_request(make_keyring(), method="POST", url=URL, headers=headers, now=NOW)


# ------------------------------------------------------------------------- tampering


async def test_changed_body_fails_digest():
    with pytest.raises(DigestMismatch, match="does not match the body"):
        await verify(signed(), body=BODY + b" ")


async def test_changed_body_streaming():
    d = ContentDigest.for_header(signed()["Content-Digest"])
    d.update(b"something else")
    with pytest.raises(DigestMismatch):
        await verify(signed(), body=d)


@pytest.mark.parametrize(
    "header", ["Content-Digest", "Idempotency-Key", "Forwarded", "Latitude-Session", "Content-Type"]
)
async def test_changed_header(header):
    headers = signed()
    headers[header] = headers[header][:-1] + ("x" if headers[header][-1] != "x" else "y")
    with pytest.raises(BadSignature, match="does not match"):
        await verify(headers)


@pytest.mark.parametrize(
    "url",
    [
        "https://primary.example.com/calendars/8/events?week=12&tz=UTC",
        "https://primary.example.com/calendars/7/events?week=13&tz=UTC",
        "https://primary.example.com/calendars/7/events",
        "https://evil.example.com/calendars/7/events?week=12&tz=UTC",
    ],
)
async def test_changed_path_query_or_authority(url):
    with pytest.raises(BadSignature):
        await verify(signed(), url=url)


async def test_changed_method():
    with pytest.raises(BadSignature):
        await verify(signed(), method="DELETE")


async def test_expired():
    with pytest.raises(ExpiredSignature, match="expired 15 s ago"):
        await verify(signed(), now=NOW + 30 + 5 + 10)
    await verify(signed(), now=NOW + 30 + 5)  # within clock skew


async def test_created_in_future():
    with pytest.raises(ExpiredSignature, match="in the future"):
        await verify(signed(now=NOW + 6))
    await verify(signed(now=NOW + 5))


async def test_lifetime_too_long():
    with pytest.raises(ExpiredSignature, match="lifetime"):
        await verify(signed(ttl=3600))


async def test_unknown_key():
    headers = signed(make_keyring("other"))
    with pytest.raises(UnknownKey, match="'other'"):
        await verify(headers)


async def test_wrong_secret():
    imposter = Keyring([SigningKey("k1", b"not the real secret, 32+ bytes!!")], "k1")
    with pytest.raises(BadSignature):
        await verify(signed(imposter))


async def test_replayed_nonce():
    cache = MemoryNonceCache()
    headers = signed()
    await verify(headers, cache=cache)
    with pytest.raises(ReplayedNonce, match="already used"):
        await verify(headers, cache=cache)


async def test_bad_signature_does_not_burn_nonce():
    cache = MemoryNonceCache()
    headers = signed(nonce="fixed-nonce")
    with pytest.raises(BadSignature):
        await verify(headers, cache=cache, method="PUT")
    await verify(headers, cache=cache)


async def test_covered_header_removed():
    headers = signed()
    del headers["Forwarded"]
    with pytest.raises(MissingComponent, match="'forwarded' is covered .* absent"):
        await verify(headers)


async def test_uncovered_sensitive_header_injected():
    headers = request_headers()
    del headers["Latitude-Session"]
    headers.update(sign_request(make_keyring(), method="POST", url=URL, headers=headers, now=NOW))
    await verify(headers)
    headers["Latitude-Session"] = "injected"
    with pytest.raises(MissingComponent, match="'latitude-session' is present but not covered"):
        await verify(headers)


async def test_required_component_not_covered():
    headers = request_headers()
    del headers["Content-Digest"]
    headers.update(sign_request(make_keyring(), method="POST", url=URL, headers=headers, now=NOW))
    with pytest.raises(MissingComponent, match="content-digest"):
        await verify(headers)
    headers2 = signed(derived=("@method",))
    with pytest.raises(MissingComponent, match="@authority"):
        await verify(headers2)


@pytest.mark.parametrize(
    "drop", [("Signature",), ("Signature-Input",), ("Signature", "Signature-Input")]
)
async def test_missing_signature(drop):
    headers = signed()
    for h in drop:
        del headers[h]
    with pytest.raises(MissingSignature):
        await verify(headers)


async def test_other_label_only():
    headers = signed(label="other")
    with pytest.raises(MissingSignature, match="labels present: other"):
        await verify(headers)


def _replace_input(headers, old, new):
    headers = dict(headers)
    assert old in headers["Signature-Input"]
    headers["Signature-Input"] = headers["Signature-Input"].replace(old, new)
    return headers


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h: {**h, "Signature-Input": "latitude=("}, "malformed"),
        (lambda h: {**h, "Signature-Input": 'latitude="@method"'}, "inner list"),
        (lambda h: {**h, "Signature": "latitude=abc"}, "byte sequence"),
        (lambda h: {**h, "Signature": "latitude=:!!:"}, "malformed"),
        (lambda h: {**h, "Signature": "other=:AAAA:"}, "Signature-Input has label"),
        (lambda h: _replace_input(h, ";created=1700000000", ""), "'created'"),
        (lambda h: _replace_input(h, ';keyid="k1"', ";keyid=k1"), "'keyid' must be a str"),
        (lambda h: _replace_input(h, ";expires=1700000030", ""), "'expires'"),
        (lambda h: _replace_input(h, ';alg="hmac-sha256"', ';alg="rsa-v1_5-sha256"'), "algorithm"),
        (lambda h: _replace_input(h, '"@method"', "method"), "quoted string"),
        (lambda h: _replace_input(h, '"@method"', '"@method";sf'), "unsupported parameter"),
        (lambda h: _replace_input(h, '"@method"', '"@request-target"'), "not supported"),
        (lambda h: _replace_input(h, '"@method"', '"Content-Type"'), "lowercase"),
        (lambda h: _replace_input(h, '"@method"', '"@authority"'), "listed twice"),
        (lambda h: _replace_input(h, '"@method"', '"@status"'), "only valid in a response"),
        (lambda h: _replace_input(h, "latitude-request", "latitude-response"), "tag"),
        # RFC 9651 types (Display String, Date) never stand in for RFC 8941 ones.
        (lambda h: _replace_input(h, '"@method"', '%"@method"'), "quoted string"),
        (lambda h: _replace_input(h, ';keyid="k1"', ";keyid=@1700000000"), "'keyid' must be a str"),
        (lambda h: _replace_input(h, ";created=1700000000", ";created=@1700000000"), "'created'"),
    ],
)
async def test_malformed_signature_input(mutate, match):
    headers = mutate(signed())
    with pytest.raises(MalformedSignature, match=match):
        await verify(headers)


async def test_every_error_is_a_signature_error():
    for cls in (
        MissingSignature,
        MalformedSignature,
        UnknownKey,
        BadSignature,
        ExpiredSignature,
        ReplayedNonce,
        MissingComponent,
        DigestMismatch,
    ):
        assert issubclass(cls, SignatureError)
    assert not issubclass(NonceCacheError, SignatureError)


async def test_known_shape_shortcut_agrees_with_a_full_parse():
    # The first verification of a shape parses the whole Signature-Input and remembers its
    # component list; later ones parse only the parameters after it. These must answer as a
    # full parse does.
    await verify(signed())
    for junk in ("abc", ":abc", " ", "=1", "(", ",", ", "):
        headers = signed()
        end = headers["Signature-Input"].index(")") + 1
        headers["Signature-Input"] = headers["Signature-Input"][:end] + junk
        with pytest.raises(MalformedSignature, match="malformed|lacks"):
            await verify(headers)
    headers = signed()
    headers_input = headers["Signature-Input"]
    end = headers_input.index(")") + 1
    headers["Signature-Input"] = headers_input[:end] + "abc" + headers_input[end:]
    with pytest.raises(MalformedSignature, match="malformed"):
        await verify(headers)
    headers = signed()
    headers["Signature-Input"] += ', other=("@method");created=1'
    headers["Signature"] += ", other=:AAAA:"
    assert (await verify(headers)).key_id == "k1"
    headers = signed()
    headers["Signature-Input"] = headers["Signature-Input"].replace(";created", ";  created")
    # Spaces after ";" are allowed; the base re-serializes the parameters canonically.
    assert (await verify(headers)).created == NOW


# --------------------------------------------------------------------------- rotation


async def test_rotation():
    old = make_keyring("k1")
    during = make_keyring("k1", "k2", signing="k2")
    after = make_keyring("k2")
    headers_old = signed(old)
    v = await verify(headers_old, keyring=during)
    assert v.key_id == "k1"
    v2 = await verify(signed(during), keyring=during)
    assert v2.key_id == "k2"
    await verify(signed(during), keyring=after)
    with pytest.raises(UnknownKey):
        await verify(signed(old), keyring=after)


# --------------------------------------------------------------------------- responses


def _request_and_response(status=201, **kw):
    ring = make_keyring()
    req = signed(ring)
    resp = {
        "Content-Type": "application/json",
        "Content-Digest": content_digest(b'{"id": 1}'),
        "Latitude-Session": "bmV3LXNlc3Npb24",
        "Latitude-Position": "0/16B3748",
    }
    resp.update(
        sign_response(ring, status=status, headers=resp, request_headers=req, now=NOW, **kw)
    )
    return ring, req, resp


def test_response_round_trip():
    ring, req, resp = _request_and_response()
    assert '"signature";req;key="latitude"' in resp["Signature-Input"]
    assert 'tag="latitude-response"' in resp["Signature-Input"]
    v = verify_response(
        ring, status=201, headers=resp, request_headers=req, now=NOW + 1, body=b'{"id": 1}'
    )
    assert v.covers('"signature";req;key="latitude"') and v.covers("@status")
    assert v.covers("latitude-session") and v.covers("latitude-position")


def test_response_bound_to_its_request():
    ring, req, resp = _request_and_response()
    other_req = signed(ring)
    assert other_req["Signature"] != req["Signature"]
    with pytest.raises(BadSignature):
        verify_response(ring, status=201, headers=resp, request_headers=other_req, now=NOW)


def test_binding_read_from_a_request_signature_field_seen_for_the_first_time():
    # The answer's binding is normally the request's Signature member kept from signing;
    # a field this process never produced (here: with a second member) is parsed instead.
    ring, req, resp = _request_and_response()
    with_other = {**req, "Signature": req["Signature"] + ", other=:AAAA:"}
    v = verify_response(ring, status=201, headers=resp, request_headers=with_other, now=NOW)
    assert v.covers('"signature";req;key="latitude"')
    other_value = {**req, "Signature": "other=:AAAA:, latitude=:" + "A" * 43 + "=:"}
    with pytest.raises(BadSignature):
        verify_response(ring, status=201, headers=resp, request_headers=other_value, now=NOW)


def test_response_tampering():
    ring, req, resp = _request_and_response()
    with pytest.raises(BadSignature):
        verify_response(ring, status=200, headers=resp, request_headers=req, now=NOW)
    for header in ("Latitude-Session", "Latitude-Position", "Content-Digest"):
        changed = {**resp, header: resp[header] + "x"}
        with pytest.raises(SignatureError):
            verify_response(ring, status=201, headers=changed, request_headers=req, now=NOW)
    with pytest.raises(DigestMismatch):
        verify_response(ring, status=201, headers=resp, request_headers=req, now=NOW, body=b"{}")
    with pytest.raises(ExpiredSignature):
        verify_response(ring, status=201, headers=resp, request_headers=req, now=NOW + 60)
    no_sig = {k: v for k, v in req.items() if k != "Signature"}
    with pytest.raises(MissingComponent, match="no signature labelled"):
        verify_response(ring, status=201, headers=resp, request_headers=no_sig, now=NOW)


async def test_response_signature_is_not_a_request_signature():
    ring, req, resp = _request_and_response()
    with pytest.raises(MalformedSignature, match="tag"):
        await verify(resp, keyring=ring)
    with pytest.raises(MalformedSignature, match="tag"):
        verify_response(ring, status=201, headers=req, request_headers=req, now=NOW)


def test_response_binding_is_mandatory():
    ring, req, _ = _request_and_response()
    resp = {"Content-Digest": content_digest(b"")}
    comps = ["@status", "content-digest"]
    params = {
        "created": NOW,
        "expires": NOW + 30,
        "keyid": "k1",
        "alg": "hmac-sha256",
        "nonce": "n",
        "tag": "latitude-response",
    }
    base = signature_base(comps, params, status=200, headers=resp)
    sig = ring.signing_key.sign(base.encode())
    resp["Signature-Input"] = serialize_dictionary({"latitude": ([(c, {}) for c in comps], params)})
    resp["Signature"] = serialize_dictionary({"latitude": (sig, {})})
    with pytest.raises(MissingComponent, match='"signature";req;key="latitude"'):
        verify_response(ring, status=200, headers=resp, request_headers=req, now=NOW, required=())


# ------------------------------------------------------------------ structured fields


@pytest.mark.parametrize(
    "text",
    [
        'a=1, b=?0;x, c=("x" y;p=2 :AAE=:);q="s\\"t", d, e=-1.5',
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
        "",
    ],
)
def test_structured_dictionary_round_trip(text):
    assert serialize_dictionary(parse_dictionary(text)) == text


def test_structured_parsing_details():
    parsed = parse_dictionary('  k=tok/en:x;a , j=("a")  ')
    assert parsed["k"] == (Token("tok/en:x"), {"a": True})
    assert isinstance(parsed["k"][0], Token)
    assert parsed["j"] == ([("a", {})], {})


@pytest.mark.parametrize(
    "text",
    [
        "a=1,",
        "A=1",
        "a=(1",
        'a="unterminated',
        "a=1 b=2",
        'a="\\x"',
        "a=1.2345",
        "a=?2",
        "a=1234567890123456",
        "a=:AA",
        # httpwg structured-field-tests cases http-sfv 0.9.9 wrongly accepts:
        "a=1.",
        "a=:=aGVsbG8=:",
        "a=:a=GVsbG8=:",
    ],
)
def test_structured_parse_errors(text):
    with pytest.raises(ValueError):
        parse_dictionary(text)


# ------------------------------------------------------------------------ nonce caches


async def test_memory_nonce_cache_expires():
    t = [0.0]
    cache = MemoryNonceCache(clock=lambda: t[0])
    assert isinstance(cache, NonceCache)
    assert await cache.add_if_new("a", 10)
    assert not await cache.add_if_new("a", 10)
    t[0] = 9.9
    assert not await cache.add_if_new("a", 10)
    t[0] = 10.0
    assert len(cache) == 0
    assert await cache.add_if_new("a", 10)


async def test_a_nonce_cache_closes_the_connection_it_owns(valkey_port):
    """A replay cache made with its own client closes that connection with it, seen from
    Valkey's side."""
    import redis.asyncio as aioredis

    from latitude.sessions import valkey_client

    watcher = aioredis.Redis(host="127.0.0.1", port=valkey_port)

    async def clients() -> set[str]:
        return {c["addr"] for c in await watcher.client_list()}

    try:
        before = await clients()
        cache = ValkeyNonceCache(
            valkey_client(f"valkey://127.0.0.1:{valkey_port}"), owns_client=True
        )
        assert await cache.add_if_new(f"n-{uuid.uuid4().hex}", 5)
        opened = await clients() - before
        assert len(opened) == 1  # the cache's own connection
        await cache.close()
        for _ in range(50):  # Valkey sees the close within a moment
            if not opened & await clients():
                break
            await asyncio.sleep(0.02)
        assert not opened & await clients()
    finally:
        await watcher.aclose()


async def test_valkey_nonce_cache(valkey_port):
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=valkey_port)
    try:
        cache = ValkeyNonceCache(client, prefix="test:nonce:")
        assert isinstance(cache, NonceCache)
        assert await cache.add_if_new("n1", 2.5)
        assert not await cache.add_if_new("n1", 2.5)
        assert 1 <= await client.ttl("test:nonce:n1") <= 3
        # Shared by every process: a second client sees the same nonce.
        other = ValkeyNonceCache(aioredis.Redis(host="127.0.0.1", port=valkey_port), "test:nonce:")
        assert not await other.add_if_new("n1", 2.5)
        await other._client.aclose()

        headers = signed()
        await verify(headers, cache=cache)
        with pytest.raises(ReplayedNonce):
            await verify(headers, cache=cache)
        keys = [k async for k in client.scan_iter("test:nonce:k1:*")]
        assert len(keys) == 1 and 30 <= await client.ttl(keys[0]) <= 37
    finally:
        await client.aclose()


async def test_valkey_unreachable_fails_closed():
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = aioredis.Redis(
        host="127.0.0.1", port=_free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(NonceCacheError, match="unreachable"):
            await verify(signed(), cache=ValkeyNonceCache(client))
    finally:
        await client.aclose()

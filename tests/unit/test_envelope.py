"""The forwarding envelope on its own: packing and unpacking both ways agree, and what a
client sends cannot pass for the envelope."""

from __future__ import annotations

import pytest

from latitude.gateway.envelope import (
    FORWARDED_FROM,
    IDEMPOTENCY_KEY,
    POSITION,
    SESSION_LENGTH,
    SESSION_STATE,
    BadEnvelope,
    SessionTail,
    client_headers,
    pack_answer,
    pack_request,
    refusal_tail,
    request_fingerprint,
    session_id,
    target,
    unpack_answer,
    unpack_request,
)

SID = "s" * 43


def scope(headers, method="POST", path="/events", query=b"", client="198.51.100.7"):
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "scheme": "https",
        "headers": headers,
        "client": (client, 5000),
    }


def test_a_packed_request_unpacks_to_the_clients_view():
    client = scope([(b"host", b"eu.example.com"), (b"content-type", b"application/json")])
    packed = pack_request(
        client,
        key="k-1",
        content_digest="sha-256=:x:",
        session_length=5,
        body_length=10,
        region="eu-west",
    )
    at_primary = scope([(b"host", b"us-west.internal"), *packed], client="10.0.0.2")
    request = unpack_request(at_primary, body_size=15)
    assert request.key == "k-1" and request.session_length == 5
    app_headers = dict(request.scope["headers"])
    assert app_headers[b"host"] == b"eu.example.com"
    assert app_headers[b"content-length"] == b"10"
    assert request.scope["client"] == ("198.51.100.7", 0)
    assert request.scope["scheme"] == "https"


def test_a_packed_request_names_its_region_length_and_key():
    packed = dict(
        pack_request(
            scope([(b"host", b"h")]),
            key="k",
            content_digest="d",
            session_length=0,
            body_length=0,
            region="eu-west",
        )
    )
    assert packed[FORWARDED_FROM] == b"eu-west" and packed[SESSION_LENGTH] == b"0"
    assert packed[IDEMPOTENCY_KEY] == b"k" and b"content-length" not in packed


def test_the_clients_own_key_and_hop_by_hop_headers_are_not_carried_twice():
    client = scope(
        [(b"host", b"h"), (IDEMPOTENCY_KEY, b"client-key"), (b"connection", b"keep-alive")]
    )
    packed = pack_request(
        client, key="client-key", content_digest="d", session_length=0, body_length=0, region="r"
    )
    assert [v for k, v in packed if k == IDEMPOTENCY_KEY] == [b"client-key"]
    assert b"connection" not in dict(packed)


def test_client_sent_envelope_headers_are_dropped_before_packing():
    client = scope([(b"host", b"h"), (b"latitude-forwarded-from", b"us-west")])
    packed = pack_request(
        client, key="k", content_digest="d", session_length=0, body_length=0, region="eu-west"
    )
    assert [v for k, v in packed if k == FORWARDED_FROM] == [b"eu-west"]


@pytest.mark.parametrize(
    "headers",
    [
        [(SESSION_LENGTH, b"0")],  # no key
        [(IDEMPOTENCY_KEY, b"k"), (SESSION_LENGTH, b"nine")],
        [(IDEMPOTENCY_KEY, b"k"), (SESSION_LENGTH, b"-1")],
        [(IDEMPOTENCY_KEY, b"k"), (SESSION_LENGTH, b"99")],  # longer than the body
    ],
)
def test_an_envelope_that_does_not_add_up_is_refused(headers):
    with pytest.raises(BadEnvelope):
        unpack_request(scope([(b"host", b"h"), *headers]), body_size=10)


def test_an_answer_with_a_session_unpacks_to_body_session_and_tail():
    headers, envelope = pack_answer(
        [(b"content-type", b"text/plain"), (b"set-cookie", f"session={SID}; Path=/".encode())],
        b"hello",
        b"SESSION",
        SessionTail.UPDATED,
    )
    headers.append((POSITION, b"0/16B3D28"))
    answer = unpack_answer(201, headers, envelope, "session", None)
    assert (answer.body, answer.session, answer.tail) == (b"hello", b"SESSION", SessionTail.UPDATED)
    assert answer.session_id == SID and answer.position == "0/16B3D28"
    assert all(k not in (SESSION_LENGTH, SESSION_STATE, POSITION) for k, _ in answer.headers)


def test_an_answer_without_a_session_says_deleted():
    headers, envelope = pack_answer([], b"bye", b"", SessionTail.DELETED)
    answer = unpack_answer(200, headers, envelope, "session", SID)
    assert answer.tail is SessionTail.DELETED and answer.session == b""
    assert answer.session_id == SID  # no new cookie: the client's own


def test_a_session_the_app_left_as_it_came_does_not_ride_back():
    headers, envelope = pack_answer([], b"ok", b"ignored", SessionTail.UNCHANGED)
    answer = unpack_answer(200, headers, envelope, "session", SID)
    assert answer.tail is SessionTail.UNCHANGED and (answer.body, answer.session) == (b"ok", b"")


def test_a_refusal_says_unchanged():
    answer = unpack_answer(503, [*refusal_tail()], b"no", "session", SID)
    assert answer.tail is SessionTail.UNCHANGED and answer.body == b"no"


def test_an_unknown_tail_changes_nothing():
    answer = unpack_answer(200, [(SESSION_STATE, b"sideways")], b"x", "session", SID)
    assert answer.tail is SessionTail.UNCHANGED


def test_a_session_length_past_the_body_is_clamped():
    answer = unpack_answer(200, [(SESSION_LENGTH, b"999")], b"abc", "session", None)
    assert answer.body == b"" and answer.session == b"abc"


def test_an_invalid_session_id_from_the_app_is_no_session():
    headers = [(b"set-cookie", b"session=bad!id; Path=/"), *refusal_tail()]
    assert unpack_answer(200, headers, b"", "session", None).session_id is None


def test_the_fingerprint_covers_method_path_query_body_and_session():
    base = scope([], query=b"a=1")
    one = request_fingerprint(base, "sha-256=:x:", SID)
    assert one == request_fingerprint(dict(base), "sha-256=:x:", SID)
    assert one != request_fingerprint({**base, "method": "PUT"}, "sha-256=:x:", SID)
    assert one != request_fingerprint({**base, "path": "/other"}, "sha-256=:x:", SID)
    assert one != request_fingerprint({**base, "query_string": b"a=2"}, "sha-256=:x:", SID)
    assert one != request_fingerprint(base, "sha-256=:y:", SID)
    assert one != request_fingerprint(base, "sha-256=:x:", "t" * 43)


@pytest.mark.parametrize(
    "cookie, expected",
    [
        (f"session={SID}".encode(), SID),
        (f'other=1; session="{SID}"'.encode(), SID),
        (b"session=short", None),
        (b"session=bad!value{}", None),
        (b"", None),
    ],
)
def test_the_session_cookie_is_read_one_way(cookie, expected):
    assert session_id([(b"cookie", cookie)], "session") == expected


def test_the_target_is_kept_exactly_as_sent():
    raw = {"path": "/a b", "raw_path": b"/a%20b/%2e%2e", "query_string": b"q=%7E"}
    assert target(raw) == "/a%20b/%2e%2e?q=%7E"


def test_client_headers_drop_the_gateways_framing_whatever_its_case():
    kept = client_headers([(b"Content-Digest", b"x"), (b"X-App", b"1"), (b"Signature", b"s")])
    assert kept == [(b"X-App", b"1")]

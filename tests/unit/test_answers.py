"""One table from what went wrong to what the client hears."""

from __future__ import annotations

import json

import pytest

from latitude.forwarding import AnswerTooLarge
from latitude.gateway.answers import (
    TABLE,
    AppFailed,
    BadAnswerSignature,
    DeadlinePassed,
    Demoted,
    KeyInProgress,
    KeyReused,
    NotPrimary,
    ReadOnly,
    refusal_for,
    refuse,
    with_key,
)
from latitude.gateway.envelope import BadEnvelope
from latitude.gateway.messages import BodyStalled
from latitude.idempotency import IdempotencyUnavailable
from latitude.sessions import CorruptSession, SessionStoreUnavailable, SessionTooLarge
from latitude.signing import DigestMismatch, SignatureError


@pytest.mark.parametrize(
    "exc, status",
    [
        (BodyStalled(10, 1.0), 408),
        (SessionTooLarge("big", size=2, limit=1), 413),
        (CorruptSession("bad"), 413),
        (SessionStoreUnavailable("down"), 503),
        (AnswerTooLarge(10), 502),
        (BadAnswerSignature("x"), 502),
        (DeadlinePassed("x", key="k"), 504),
        (ReadOnly("x", key="k"), 503),
        (KeyReused("x"), 422),
        (KeyInProgress("x"), 409),
        (NotPrimary("x"), 421),
        (Demoted("x"), 503),
        (SignatureError("x"), 401),
        (DigestMismatch("x"), 401),
        (IdempotencyUnavailable("x"), 503),
        (BadEnvelope("x"), 400),
        (AppFailed("x"), 500),
    ],
)
def test_each_failure_has_one_status(exc, status):
    assert refusal_for(exc).status == status


def test_subclasses_come_before_their_bases_in_the_table():
    kinds = [kind for kind, _ in TABLE]
    for i, kind in enumerate(kinds):
        for later in kinds[i + 1 :]:
            assert not issubclass(later, kind), f"{later.__name__} is shadowed by {kind.__name__}"


def test_an_unknown_failure_is_a_bug_not_a_guess():
    with pytest.raises(LookupError):
        refusal_for(ValueError("?"))


class Sent:
    def __init__(self):
        self.messages = []

    async def __call__(self, message):
        self.messages.append(message)

    @property
    def status(self):
        return self.messages[0]["status"]

    @property
    def headers(self):
        return dict(self.messages[0]["headers"])

    @property
    def json(self):
        return json.loads(self.messages[1]["body"])


async def test_a_refusal_with_a_key_carries_it_in_a_header_and_the_body():
    send = Sent()
    scope = {"headers": [(b"accept", b"application/json")]}
    await refuse(scope, send, DeadlinePassed("no answer came within 3 s", key="k-9"))
    assert send.status == 504 and send.headers[b"idempotency-key"] == b"k-9"
    assert send.json["idempotency_key"] == "k-9" and "k-9" in send.json["detail"]
    assert send.headers[b"cache-control"] == b"no-store"


async def test_a_store_outage_says_whether_anything_ran():
    scope = {"headers": [(b"accept", b"application/json")]}
    before, after = Sent(), Sent()
    await refuse(scope, before, with_key(SessionStoreUnavailable("down"), None, nothing_done=True))
    await refuse(scope, after, with_key(SessionStoreUnavailable("down"), "k-1"))
    assert "Nothing was changed" in before.json["detail"]
    assert "carried out" in after.json["detail"] and "k-1" in after.json["detail"]
    assert after.headers[b"retry-after"] == b"2"


async def test_a_refusal_to_a_browser_is_html_with_the_words_escaped():
    send = Sent()
    scope = {"headers": [(b"accept", b"text/html")]}
    await refuse(scope, send, KeyReused("<script>alert(1)</script>"))
    body = send.messages[1]["body"]
    assert send.status == 422 and b"<script>" not in body and b"&lt;script&gt;" in body

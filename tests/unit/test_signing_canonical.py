"""latitude.signing.canonical: the exact forms a gateway writes, read without ``http-sf``.

Every reader must, for every text, either decline (``None``) or return exactly what the full
parse returns: the same keys in the same order, the same values of the same types (a
``Token`` equals a ``str`` and ``True`` equals ``1`` in Python, so types are compared too).
Checked on what our signer writes, on hostile near-misses, and on seeded random mutations.
"""

from __future__ import annotations

import base64
import hashlib
import random
from typing import Any

import pytest

from latitude.signing import (
    DigestMismatch,
    Keyring,
    MemoryNonceCache,
    SignatureError,
    SigningKey,
    content_digest,
    sign_request,
    sign_response,
    verify_content_digest,
    verify_request,
    verify_response,
)
from latitude.signing import base as base_module
from latitude.signing import canonical as canonical_module
from latitude.signing import messages as messages_module
from latitude.signing.canonical import (
    byte_sequence_dictionary,
    byte_sequence_text,
    signature_params,
)
from latitude.signing.structured import (
    parse_dictionary,
    parse_item,
    serialize_item,
    serialize_params,
)

NOW = 1_700_000_000
URL = "https://primary.example.com/calendars/7/events?week=12&tz=UTC"
BODY = b'{"title": "standup"}'
INNER = '("@method" "@authority" "@path" "@query" "content-digest")'


def typed(value: Any) -> Any:
    """``value`` with every scalar's exact type beside it and every mapping's order kept."""
    if isinstance(value, dict):
        return [(k, typed(v)) for k, v in value.items()]
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    return (type(value).__name__, str(value) if type(value).__name__ == "Token" else value)


def full_dictionary(text: str) -> Any:
    try:
        return parse_dictionary(text)
    except ValueError:
        return "rejected"


def full_params(text: str) -> Any:
    """The parameters as the whole Signature-Input field's full parse returns them."""
    try:
        members = parse_dictionary(f"sig={INNER}{text}")
    except ValueError:
        return "rejected"
    if list(members) != ["sig"] or not isinstance(members["sig"][0], list):
        return "not parameters alone"
    return members["sig"][1]


def assert_dictionary_agrees(text: str) -> bool:
    fast = byte_sequence_dictionary(text)
    if fast is not None:
        assert typed(fast) == typed(full_dictionary(text)), text
    return fast is not None


def assert_params_agree(text: str) -> bool:
    fast = signature_params(text)
    if fast is not None:
        assert typed(fast) == typed(full_params(text)), text
        # The form messages fell back to before: the parameters after a one-character item.
        assert typed(parse_item("x" + text)[1]) == typed(fast), text
    return fast is not None


def params_text(**overrides: Any) -> str:
    params: dict[str, Any] = {
        "created": NOW,
        "expires": NOW + 30,
        "keyid": "k1",
        "alg": "hmac-sha256",
        "nonce": "AAAAAAAAAAAAAAAAAAAAAA",
        "tag": "latitude-request",
    }
    params.update(overrides)
    return serialize_params({k: v for k, v in params.items() if v is not None})


def keyring(key_id: str = "k1") -> Keyring:
    return Keyring([SigningKey(key_id, hashlib.sha256(key_id.encode()).digest())], key_id)


# ------------------------------------------------------------- what our signer writes

LABELS = ["latitude", "sig", "a", "*x", "l-1.b_c*", "x" * 40]
KEY_IDS = ["k1", "eu-west-2026", "!#$%&'()*+,-./:;<=>?@[]^_`{|}~", "K", "key=1;a=2", "a" * 80]
NONCES = ["AAAAAAAAAAAAAAAAAAAAAA", "n", "-_-_", "abc def", "n" * 128]


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("key_id", KEY_IDS)
def test_signed_request_and_answer_fields_are_read_by_the_fast_path(
    label: str, key_id: str
) -> None:
    ring = keyring(key_id)
    headers = {"Content-Digest": content_digest(BODY), "Content-Type": "application/json"}
    for nonce in NONCES:
        sig = sign_request(
            ring, method="POST", url=URL, headers=headers, now=NOW, nonce=nonce, label=label
        )
        answer = {"Content-Digest": content_digest(b"{}")}
        asig = sign_response(
            ring,
            status=201,
            headers=answer,
            request_headers={**headers, **sig},
            now=NOW,
            nonce=nonce,
            label=label,
        )
        for fields in (sig, asig):
            assert assert_dictionary_agrees(fields["Signature"])
            inner_end = fields["Signature-Input"].index(")") + 1
            assert assert_params_agree(fields["Signature-Input"][inner_end:])
        assert assert_dictionary_agrees(headers["Content-Digest"])
        assert assert_dictionary_agrees(answer["Content-Digest"])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"created": 0, "expires": 0},
        {"created": 999_999_999_999_999, "expires": 999_999_999_999_999},
        {"tag": "latitude-response"},
        {"tag": ""},
        {"keyid": "", "nonce": "", "alg": ""},
        {"nonce": "~!#[]^`{|}"},
    ],
)
def test_serialized_params_are_read_by_the_fast_path(overrides: dict[str, Any]) -> None:
    assert assert_params_agree(params_text(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"expires": None},  # our signer always writes expires: the full parse reads the rest
        {"alg": None},
        {"tag": None},
        {"keyid": 'quote"d'},
        {"keyid": "back\\slash"},
        {"created": -1},
        {"expires": -30},
        {"nonce": 7},
        {"created": "1700000000"},
        {"created": True},
        {"tag": b"latitude-request"},
    ],
)
def test_other_params_decline(overrides: dict[str, Any]) -> None:
    assert not assert_params_agree(params_text(**overrides))


def test_digests_of_many_bodies_are_read_by_the_fast_path() -> None:
    rng = random.Random(9530)
    for n in range(200):
        body = rng.randbytes(n)
        assert assert_dictionary_agrees(content_digest(body))
        assert assert_dictionary_agrees(content_digest(body, "sha-512"))


def test_byte_sequence_text_is_what_the_serializer_writes() -> None:
    rng = random.Random(8941)
    for n in range(100):
        value = rng.randbytes(n)
        assert byte_sequence_text(value) == serialize_item(value)


# ---------------------------------------------------------------- hostile near-misses

GOOD_SIG = "latitude=:" + base64.b64encode(bytes(range(32))).decode() + ":"
GOOD_B64 = GOOD_SIG[len("latitude=") :]

DICTIONARY_NEAR_MISSES = [
    GOOD_SIG,
    " " + GOOD_SIG,
    GOOD_SIG + " ",
    GOOD_SIG + "\n",
    GOOD_SIG + "\t",
    GOOD_SIG.replace("=:", "= :"),
    GOOD_SIG.replace("=:", " =:"),
    GOOD_SIG + ", other=:AAAA:",
    GOOD_SIG + ", latitude=:AAAA:",  # a duplicate member: the last wins in the full parse
    "other=:AAAA:, " + GOOD_SIG,
    GOOD_SIG + ";p",
    GOOD_SIG + ';key="v"',
    GOOD_SIG + ",",
    "Latitude" + GOOD_B64,
    "LATITUDE" + GOOD_B64,
    "1abc" + GOOD_B64,
    "-abc" + GOOD_B64,
    "é" + GOOD_B64,
    "latitudé" + GOOD_B64,
    "latitude=" + GOOD_B64.replace("A", "\u0410"),  # Cyrillic A
    "latitude=" + GOOD_B64.replace("0", "\u0660"),  # Arabic-Indic zero
    "latitude=" + GOOD_B64.replace("A", "\x00"),
    "latitude=::",
    "latitude=:=:",
    "latitude=:==:",
    "latitude=:A:",
    "latitude=:AA:",  # padding left out: the full parse restores it
    "latitude=:AAA:",
    "latitude=:AAAAA:",
    "latitude=:AA=:",
    "latitude=:AA==:",
    "latitude=:AAA=:",
    "latitude=:AA===:",
    "latitude=:A===:",
    "latitude=:AAAA=:",
    "latitude=:AAAA==:",
    "latitude=:AA==AA==:",
    "latitude=:AA=A:",
    "latitude=:QR==:",  # nonzero trailing bits: both read it as b"A"
    "latitude=:QUJ=:",
    "latitude=:-_-_:",  # base64url is not the RFC's alphabet
    "latitude=:AA AA:",
    "latitude=:AAAA",
    "latitude=AAAA:",
    "latitude=:AAAA::",
    "latitude=(:AAAA:)",
    "latitude=?1",
    "latitude",
    "latitude=",
    "=:AAAA:",
    "",
    "sha-256=:" + base64.b64encode(hashlib.sha256(b"").digest()).decode() + ":",
    "SHA-256=:" + base64.b64encode(hashlib.sha256(b"").digest()).decode() + ":",
    "sha-256=:" + base64.b64encode(hashlib.sha256(b"").digest()).decode() + ":, sha-512=:AA==:",
    "sha-256=" + base64.b64encode(hashlib.sha256(b"").digest()).decode(),
    "sha-256=:" + base64.b64encode(hashlib.sha256(b"").digest()).decode().rstrip("=") + ":",
    "sha-256=:" + base64.urlsafe_b64encode(b"\xfb\xff\xfe" * 11).decode() + ":",
]


@pytest.mark.parametrize("text", DICTIONARY_NEAR_MISSES)
def test_dictionary_near_misses_decline_or_agree(text: str) -> None:
    accepted = assert_dictionary_agrees(text)
    if full_dictionary(text) == "rejected":
        assert not accepted


P = params_text()
PARAMS_NEAR_MISSES = [
    P,
    " " + P,
    P + " ",
    P + "\n",
    P.replace(";", "; "),
    P.replace(";", " ;"),
    P.replace("=", " ="),
    P + ";",
    P + ";x",
    P + ";x=1",
    P + ";created=1",  # a duplicate parameter: the last value wins, in the first place
    P + ';tag="other"',
    ";created=1" + P,
    P.replace(";created=1700000000;expires=1700000030", ";expires=1700000030;created=1700000000"),
    P.replace("keyid", "KEYID"),
    P.replace("keyid", "Keyid"),
    P.replace("nonce", "nonce*"),
    P.replace("1700000000", "01700000000"),  # leading zero: still 1700000000
    P.replace("1700000000", "0001700000000"),  # 13 digits
    P.replace("1700000000", "9999999999999999"),  # 16 digits: too long for an integer
    P.replace("1700000000", "999999999999999"),  # 15 digits: the largest
    P.replace("1700000000", "1000000000000000"),
    P.replace("1700000000", "99999999999999999999999999999999"),
    P.replace("1700000000", "-1700000000"),
    P.replace("1700000000", "-0"),
    P.replace("1700000000", "+1700000000"),
    P.replace("1700000000", "1700000000.5"),
    P.replace("1700000000", "1700000000."),
    P.replace("1700000000", "1_700_000_000"),
    P.replace("1700000000", "\u0661\u0667\u0660\u0660"),  # Arabic-Indic digits
    P.replace("1700000000", "１７００"),  # fullwidth digits
    P.replace("1700000000", '"1700000000"'),
    P.replace("1700000000", "?1"),
    P.replace("1700000000", ""),
    P.replace('"k1"', '"k\\"1"'),
    P.replace('"k1"', '"k\\\\1"'),
    P.replace('"k1"', '"k\\1"'),
    P.replace('"k1"', '"k1'),
    P.replace('"k1"', "k1"),  # a token
    P.replace('"k1"', ":azE=:"),  # a byte sequence
    P.replace('"k1"', '"k\u00e91"'),
    P.replace('"k1"', '"k\x7f1"'),
    P.replace('"k1"', '"k\x001"'),
    P.replace('"k1"', '"k\t1"'),
    P.replace('"k1"', '"k\n1"'),
    P.replace('"k1"', '""'),
    P.replace('"k1"', '"k1""'),
    P.replace('"k1"', "'k1'"),
    P.replace('"k1"', '%"k1"'),
    P.replace('"hmac-sha256"', '"HMAC-SHA256"'),
    P.replace('"latitude-request"', '"latitude-request";'),
    P.replace(";tag=", ";tag= "),
    P.replace(';alg="hmac-sha256"', ""),
    P.replace(";expires=1700000030", ""),
    P.replace(";expires=1700000030", ";expires"),
    P.replace(";expires=1700000030", ";expires=?0"),
    P.replace(";expires=1700000030", ";expires=@1700000030"),
    P + ", other=()",
    P + ")",
    "",
    ";",
]


@pytest.mark.parametrize("text", PARAMS_NEAR_MISSES)
def test_params_near_misses_decline_or_agree(text: str) -> None:
    accepted = assert_params_agree(text)
    if not isinstance(full_params(text), dict):
        assert not accepted


EDIT_CHARACTERS = ' \t;,="\\:()-*A0é\x00'


def single_edits(text: str) -> list[str]:
    """Every text one inserted, deleted or replaced character away from ``text``."""
    out = []
    for i in range(len(text) + 1):
        out += [text[:i] + c + text[i:] for c in EDIT_CHARACTERS]
        if i < len(text):
            out.append(text[:i] + text[i + 1 :])
            out += [text[:i] + c + text[i + 1 :] for c in EDIT_CHARACTERS]
    return out


def test_every_single_edit_of_valid_fields_declines_or_agrees() -> None:
    for text in single_edits(P):
        assert_params_agree(text)
    for text in single_edits(GOOD_SIG) + single_edits(content_digest(BODY)):
        assert_dictionary_agrees(text)


# --------------------------------------------------------- seeded random mutations

# Characters that matter to the grammar, and some it forbids.
MUTATION_ALPHABET = list(' \t\n\r;=:,"\\()?*-_.+/0123456789aAzZé\x00\x7f\u0660') + ["==", '\\"']


def mutated(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(5)
        if op == 0:
            text = text[:i] + rng.choice(MUTATION_ALPHABET) + text[i:]
        elif op == 1 and text:
            text = text[:i] + text[i + 1 :]
        elif op == 2 and i < len(text):
            text = text[:i] + rng.choice(MUTATION_ALPHABET) + text[i + 1 :]
        elif op == 3:
            j = rng.randrange(len(text) + 1)
            a, b = sorted((i, j))
            text = text[:b] + text[a:b] + text[b:]  # a slice repeated
        else:
            parts = text.split(";")
            rng.shuffle(parts)
            text = ";".join(parts)
    return text


def test_random_mutations_of_valid_fields_decline_or_agree() -> None:
    rng = random.Random(9421)
    fast_dictionaries = fast_params = 0
    for _ in range(3000):
        key_id = rng.choice(KEY_IDS[:2])
        nonce = base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode()
        valid_params = params_text(keyid=key_id, nonce=nonce, created=rng.randrange(10**10))
        valid_sig = f"{rng.choice(LABELS)}=:{base64.b64encode(rng.randbytes(32)).decode()}:"
        valid_digest = content_digest(rng.randbytes(rng.randrange(64)))
        fast_params += assert_params_agree(mutated(valid_params, rng))
        fast_dictionaries += assert_dictionary_agrees(mutated(valid_sig, rng))
        fast_dictionaries += assert_dictionary_agrees(mutated(valid_digest, rng))
    # Some mutants (a changed digit or letter) stay in the exact form and are read fast.
    assert fast_params > 0 and fast_dictionaries > 0


# ----------------------------------------------- the callers, with and without the readers


def without_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    def decline(text: str) -> None:
        return None

    # The dictionary fields all go through canonical.read_dictionary.
    for module, names in (
        (messages_module, ("signature_params",)),
        (canonical_module, ("byte_sequence_dictionary",)),
    ):
        for name in names:
            monkeypatch.setattr(module, name, decline)


async def request_and_answer_outcome(headers: dict[str, str], answer: dict[str, str]) -> Any:
    ring = keyring()
    try:
        verified = await verify_request(
            ring,
            method="POST",
            url=URL,
            headers=headers,
            nonce_cache=MemoryNonceCache(),
            now=NOW,
            body=BODY,
        )
        # The answer's binding then reads the request's field, not what verifying kept.
        base_module._SIGNATURES.clear()
        bound = verify_response(
            ring, status=201, headers=answer, request_headers=headers, now=NOW, body=b"{}"
        )
    except SignatureError as exc:
        return type(exc).__name__, str(exc)
    return verified, bound


def signed_exchange(nonce: str) -> tuple[dict[str, str], dict[str, str]]:
    ring = keyring()
    headers = {"Content-Digest": content_digest(BODY), "Content-Type": "application/json"}
    headers.update(
        sign_request(ring, method="POST", url=URL, headers=headers, now=NOW, nonce=nonce)
    )
    answer = {"Content-Digest": content_digest(b"{}")}
    answer.update(
        sign_response(
            ring, status=201, headers=answer, request_headers=headers, now=NOW, nonce=nonce
        )
    )
    return headers, answer


async def test_verification_outcomes_are_those_of_the_full_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(1)
    cases = []
    for n in range(150):
        headers, answer = signed_exchange(f"nonce-{n}")
        if n % 3 == 1:
            headers = {**headers, "Signature": mutated(headers["Signature"], rng)}
        elif n % 3 == 2:
            field = rng.choice(["Signature-Input", "Signature", "Content-Digest"])
            answer = {**answer, field: mutated(answer[field], rng)}
        cases.append((headers, answer))
    fast = [await request_and_answer_outcome(h, a) for h, a in cases]
    with monkeypatch.context() as patched:
        without_fast_paths(patched)
        full = [await request_and_answer_outcome(h, a) for h, a in cases]
    assert fast == full
    assert sum(type(outcome[0]).__name__ == "VerifiedSignature" for outcome in fast) >= 50


def digest_outcome(header: str) -> str:
    try:
        verify_content_digest(header, BODY)
    except DigestMismatch as exc:
        return str(exc)
    return "matches"


def test_digest_outcomes_are_those_of_the_full_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(2)
    headers = [content_digest(BODY), f"  {content_digest(BODY)}\t"]
    headers += [mutated(content_digest(BODY), rng) for _ in range(300)]
    fast = [digest_outcome(h) for h in headers]
    with monkeypatch.context() as patched:
        without_fast_paths(patched)
        full = [digest_outcome(h) for h in headers]
    assert fast == full
    assert fast[:2] == ["matches", "matches"]
